"""An eighty-seventh attacker's review (December 2026) of 39747f2: the shared
PostgreSQL's take-over (``e2m-proxy db init|upgrade --owner-url``,
``kamailio_app/db_cmd.py`` ``_take_over`` / ``_grant`` / ``_PLANTED``), on the
harness's real PostgreSQL, against the nodes' own database account.

Set-up of every test (review 78's and 80's): ``createdb -O node`` (the old idiom), ``db
init`` as the nodes' account, carol's messages ``c1@carol`` and ``c2@carol`` archived.
Attacker: an insider holding the nodes' database password (``[cluster] db_url``, on
every node) *before* the operator hardens the database; his statements run over that
account from his own client (libpq's defaults, as ``psql``).  The operator then hardens
it as README says, by either way (parametrised): ``way=superuser``, ``db upgrade
--owner-url`` with the cluster's superuser; ``way=reassign``, a superuser's ``REASSIGN
OWNED BY node TO owner`` then ``db upgrade --owner-url`` as the owner.  Where the
command refuses and names ``REASSIGN OWNED BY <node> TO <owner>`` as one of its two
remedies, the operator takes that one and runs it again (``_follow_advice``).  Each time
the command ends saying "tables owned by <owner>; <node> may only read, add rows and
fill a copy's empty sender and Request-URI".  (The tests below are the holes; each
docstring names its control.)

Hole 1 (``test_hole_a_grant_to_public_survives_the_take_over``, both ways, on the table
itself and on a view of it)

Messages: before the hardening, ``GRANT ALL ON bodies, media TO PUBLIC`` (he owns the
tables), or ``CREATE VIEW bodies_all AS SELECT * FROM bodies; GRANT ALL ON bodies_all
TO PUBLIC``.  After the hardening: ``DELETE FROM bodies WHERE call_id = 'c1@carol'``,
``UPDATE bodies SET plaintext = 'forged', sha256 = ... WHERE call_id = 'c2@carol'``
(through ``bodies_all`` in the view case).
Effect: both done.  Carol's archived message is gone and her other one reads the
forged text: review 73's hole (the nodes' account rewrites or deletes history) is back.
ALTER ... OWNER and REASSIGN OWNED keep a table's ACL (the grantor becomes the new
owner), and the take-over revokes only from the nodes' role, never from PUBLIC, of
which every role is a member.  A view is neither taken over (``_OWNERS`` reads
``relkind IN ('r', 'S')``) nor, once REASSIGN made it the owner's, named by the check;
a view runs with its owner's rights, so PUBLIC's DELETE through it is the owner's.
At fault: ``kamailio_app/db_cmd.py`` ``_grant``: ``REVOKE ALL ON ALL TABLES IN SCHEMA
public FROM {node}`` (and the sequences' line) name the node's role only; the check
before "tables owned by" reads owners (``_OWNERS``, ``_PLACES``, ``_PLANTED``), never
ACLs.  Fix: ``REVOKE ALL ... FROM PUBLIC`` too (tables, views, sequences, functions,
the schema and the database), and refuse, naming each, while any role but the owner's
and the grants of ``_NODE_GRANTS`` holds a privilege on any relation of the schema
(``aclexplode(relacl)``, ``information_schema.role_table_grants``), and while a view,
materialized view or foreign table is in the schema.

Hole 1b (``test_hole_a_public_grant_on_the_id_sequence_lets_the_node_rewind_it``,
both ways; the same cause on a sequence and the schema)

Messages: before, ``GRANT UPDATE ON SEQUENCE bodies_id_seq TO PUBLIC`` and ``GRANT
CREATE ON SCHEMA public TO PUBLIC`` (the database is his, so ``public``'s owner
``pg_database_owner`` is he); after the hardening, ``SELECT setval('bodies_id_seq',
1)`` and ``CREATE TABLE made_later (x int)``.
Effect: both done.  The next id a node draws is an existing row's: the INSERT fails
with a ``UniqueViolation`` (an ``IntegrityError``: dropped from the spool as "no retry
will help"), so carol's message is lost, and so is every message until the sequence
passes the highest id (he may rewind it again whenever he likes).  And the nodes'
account may again create objects in ``public`` that no check has seen (the take-over's
``REVOKE CREATE ON SCHEMA public FROM {node}`` names the role only).
At fault: ``_grant``'s REVOKEs (sequences: ``REVOKE ALL ON ALL SEQUENCES ... FROM
{node}``; the schema: ``REVOKE CREATE ON SCHEMA public FROM {node}``).  Fix: as Hole 1,
revoke from PUBLIC as well and refuse while any ACL entry but the intended ones is on
the schema, its relations and sequences, and the database.

Hole 2 (``test_hole_a_check_constraint_left_on_bodies_drops_carols_messages``, both
ways)

Messages: before, ``ALTER TABLE bodies ADD CONSTRAINT bodies_sane CHECK (from_uri IS
DISTINCT FROM 'sip:carol@example.com') NOT VALID`` (only built-in code: nothing the
nodes' account owns remains, so no way names it).
Effect: after the hardening every message carol sends is refused by the database
(``CheckViolation``, an ``IntegrityError``: the spool takes it for a row "no retry will
help" and drops it, ``e2m_archive_lost``): none of her messages is archived again.
At fault: ``_PLANTED`` reads triggers, rules, policies and functions, never
``pg_constraint`` (CHECK, and what else a constraint can carry).  Fix: refuse while a
table of the archive has a constraint ``archive_schema`` did not make (compare
``pg_get_constraintdef`` with the expected set), or drop them in the take-over.

Hole 3 (``test_hole_row_level_security_left_on_without_a_policy``, both ways)

Messages: before, ``ALTER TABLE bodies ENABLE ROW LEVEL SECURITY`` and nothing else
(no policy: ``_PLANTED`` lists ``pg_policy`` rows only).
Effect: after the hardening, row level security with no policy denies everything to
every role but the owner: each node's INSERT is refused ("new row violates row-level
security policy"): nothing is archived by any node from then on, and ``e2m archive
list`` over the nodes' URL shows an empty archive (carol's rows hidden).
At fault: ``_PLANTED`` (no read of ``pg_class.relrowsecurity``/``relforcerowsecurity``).
Fix: refuse (or ``ALTER TABLE ... DISABLE ROW LEVEL SECURITY``) while any table of the
schema has it on.

Hole 4 (``test_hole_a_trigger_named_like_ours_on_media_runs_owner_code``, both ways)

Messages: before, ``CREATE SCHEMA e2m_util``; ``CREATE FUNCTION e2m_util.keep()
RETURNS trigger SECURITY DEFINER ... DELETE FROM public.bodies WHERE from_uri =
'sip:carol@example.com'``; ``CREATE TRIGGER e2m_bodies_fill_only AFTER INSERT ON media
FOR EACH ROW EXECUTE FUNCTION e2m_util.keep()``.
Effect: with REASSIGN (README's second way, or the first way after its own refusal,
which names the schema and the function and offers REASSIGN), the schema and the
function become the owner's: ``_NODE_SCHEMAS`` no longer names the schema,
``_PLANTED`` reads functions in ``public`` only and exempts every trigger named
``e2m_bodies_fill_only`` on any table; the command says done.  The next call a node
archives with its SDP (dave's here) runs the function as the owner: every archived row
of carol's is deleted.  Review 85's lead (a), demonstrated.
At fault: ``_PLANTED``: ``tgname <> 'e2m_bodies_fill_only'`` (by name, on every table)
and ``p.pronamespace = current_schema()`` (functions elsewhere, e.g. in a schema a
REASSIGN gave the owner, are never read).  Fix: exempt only the trigger of that name on
``bodies`` whose ``tgfoid`` is ``public.e2m_bodies_fill_only()``; list every function
a trigger, constraint, default or index on the tables calls, whatever its schema; and
refuse any schema of the database but ``public`` (and ``pg_catalog``...) that the
owner did not make, rather than only those the nodes' account still owns.

Hole 5 (``test_hole_an_overload_of_our_functions_name_checks_every_insert``, both ways)

Messages: before, ``CREATE FUNCTION public.e2m_bodies_fill_only(text) RETURNS boolean
SECURITY DEFINER ... IF $1 <> 'c1@carol' THEN UPDATE public.bodies SET plaintext =
'forged', sha256 = ... WHERE call_id = 'c1@carol'; END IF; RETURN true``, and ``ALTER TABLE bodies ADD CONSTRAINT
bodies_call_id_ok CHECK (public.e2m_bodies_fill_only(call_id)) NOT VALID``.
Effect: the first way refuses, naming the function (the nodes' account owns it); after
REASSIGN (either way) the function is the owner's and its name (``proname <>
'e2m_bodies_fill_only'``, every overload) exempts it: done.  The next message a node
archives (dave's) runs it as the owner: carol's archived message now reads "forged"
(the fill-only trigger guards the sender and Request-URI only).  Review 85's lead (b)
and (c), demonstrated.
At fault: ``_PLANTED`` ``p.proname <> 'e2m_bodies_fill_only'`` and no read of
``pg_constraint``.  Fix: exempt ``'public.e2m_bodies_fill_only()'::regprocedure``
only, by OID, and read constraints (Hole 2).

Controls: ``test_control_the_take_over_of_a_clean_database_says_done_and_holds`` (both
ways, nothing planted: done, the nodes' DELETE and UPDATE of plaintext refused,
carol's new message archived as carol's, nothing deleted when dave's call with SDP is
archived; a second run on the hardened database says done again - the check does not
refuse a legitimate database); ``test_control_each_plant_is_made_while_the_tables_are_the_nodes``
(each plant's statements are all done by the nodes' account before the hardening, and
none of them can be made after a clean one: refused, or a GRANT that only warns and
leaves DELETE and UPDATE of plaintext refused).

Tried and held (run where named in the test, else read):
- ``ALTER DEFAULT PRIVILEGES`` by the nodes' account: it applies to objects *it*
  creates (``FOR ROLE`` only roles it is a member of), and after the take-over it can
  create nothing in ``public``; a ``pg_default_acl`` entry of its own is in
  ``pg_shdepend`` ('o'), named by the first way, the owner's after REASSIGN: no
  effect.  (Read.)
- Sequences: ``setval`` needs UPDATE on the sequence; the take-over grants USAGE only,
  and a PUBLIC ``UPDATE`` granted before is Hole 1's cause (``GRANT ALL ON SEQUENCE
  bodies_id_seq TO PUBLIC`` then ``setval(..., 1)`` would make every insert collide on
  ``id``: same fix).  A sequence the node made and a table owns moves with it. (Read.)
- Column defaults / generated columns: every column but ``id`` is named in
  ``_INSERT_BODY`` / ``_INSERT_MEDIA``, so a default the node set is never used; a
  default on ``id`` (identity dropped) can only collide, refusing rows (Hole 2's
  effect and fix: compare the table with ``archive_schema``).  (Read.)
- Expression indexes: their functions must be IMMUTABLE and PL/pgSQL refuses data
  changes in a non-volatile function, so an index can refuse a row, not change others
  (Hole 2's family).  Dropping the unique index ``bodies_message`` makes every
  ``ON CONFLICT (message_uid, part)`` fail: the same family, same fix.  (Read.)
- Domains and types: changing a column to a domain of his with a CHECK only refuses
  (Hole 2's family); a base type or a cast needs a C function (superuser) or ownership
  of a type the column uses; psycopg sends text parameters as ``unknown``/``text``, no
  custom assignment cast runs.  (Read.)
- Inheritance: a child table he made in ``public`` is a table of the schema, taken over
  and revoked like the others; rows in it show in ``SELECT FROM bodies`` but he could
  INSERT into ``bodies`` anyway (within a node's rights); a PUBLIC grant on it is Hole 1.
  Partitions: ``bodies`` cannot be turned into a partitioned table in place.  (Read.)
- Publications and ``pg_largeobject``: his publication is named by the first way
  (``pg_shdepend``), the owner's after REASSIGN, and he has no REPLICATION to stream
  it; the archive uses no large objects.  (Read.)
- ``ALTER TABLE ... SET (autovacuum_enabled = false)``: bloat, no row effect. (Read.)

Fixed (stop 34): ``_grant`` revokes from PUBLIC as well as from the nodes' role (every
table, sequence and routine of the schema, CREATE on the schema and on the database),
then refuses, naming each, before it commits: a view, materialized view, foreign,
partitioned or composite relation in the schema (``_KINDS``); row level security
enabled or forced on any table (``_RLS``); a grant the nodes' account can use (to
PUBLIC, itself or a role it is in) beyond the ones just made, on a relation, a column,
the schema (CREATE) or the database (CREATE), and the owner's default privileges giving
it any (``_ACLS``); any function, operator, type or collation outside ``pg_catalog``
that the schema's relations, their triggers, constraints, defaults, indexes, statistics,
policies or rules use (``_CODE``, from ``pg_depend``); and, on the tables a node writes,
any constraint, index, column, identity sequence, inheritance or unlogged table that
e2m-proxy's own DDL does not make, or that it makes and is missing (``_not_ours``: the
archive's steps and the certificates' DDL run on temporary tables in the same
transaction, read back the same way, compared as multisets, dropped).  Our trigger is
exempt only on ``bodies`` with ``tgfoid`` our function, and our function only by OID
(``_OURS``), not by name.  Holes 1 and 1b: the command now says done and the nodes'
DELETE, UPDATE, ``setval`` and CREATE are refused (a view is refused); holes 2, 3, 4
and 5: refused.  No assertion changed; the controls hold (a second run says done).
``test_fixed_the_classes_behind_the_holes_are_refused`` plants, by README's second way,
an unlogged ``bodies``, a sequence limit, a dropped or added index, a column default,
forced row level security, a child table, a materialized view and an operator of his
in a CHECK: each refused and named.
"""

from __future__ import annotations

import hashlib

import pytest

from e2m_lab.postgres import HOST
from e2m_plugins.cli import main as e2m_main
from kamailio_app.archive import ArchiveError, MediaRecord
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.pgconn import PgUrl
from tests.cluster.test_review74_cluster import _body, _config, _roles
from tests.cluster.test_review78_cluster import _run

pytestmark = pytest.mark.postgres

WAYS = ["superuser", "reassign"]
_FORGED = ("forged", hashlib.sha256(b"forged").hexdigest())

_PLANTS = {
    "public_grant": [("GRANT ALL ON bodies, media TO PUBLIC", ())],
    "public_view": [("CREATE VIEW bodies_all AS SELECT * FROM bodies", ()),
                    ("GRANT ALL ON bodies_all TO PUBLIC", ())],
    "sequence": [("GRANT UPDATE ON SEQUENCE bodies_id_seq TO PUBLIC", ()),
                 ("GRANT CREATE ON SCHEMA public TO PUBLIC", ())],
    "check": [("ALTER TABLE bodies ADD CONSTRAINT bodies_sane CHECK (from_uri IS DISTINCT "
               "FROM 'sip:carol@example.com') NOT VALID", ())],
    "rls": [("ALTER TABLE bodies ENABLE ROW LEVEL SECURITY", ())],
    "media_trigger": [
        ("CREATE SCHEMA e2m_util", ()),
        ("CREATE FUNCTION e2m_util.keep() RETURNS trigger LANGUAGE plpgsql "
         "SECURITY DEFINER AS $f$ BEGIN "
         "DELETE FROM public.bodies WHERE from_uri = 'sip:carol@example.com'; "
         "RETURN NEW; END $f$", ()),
        ("CREATE TRIGGER e2m_bodies_fill_only AFTER INSERT ON media FOR EACH ROW "
         "EXECUTE FUNCTION e2m_util.keep()", ())],
    "overload_check": [
        ("CREATE FUNCTION public.e2m_bodies_fill_only(text) RETURNS boolean "
         "LANGUAGE plpgsql SECURITY DEFINER AS $f$ BEGIN IF $1 <> 'c1@carol' THEN "
         f"UPDATE public.bodies SET plaintext = '{_FORGED[0]}', sha256 = '{_FORGED[1]}' "
         "WHERE call_id = 'c1@carol'; END IF; RETURN true; END $f$", ()),
        ("ALTER TABLE bodies ADD CONSTRAINT bodies_call_id_ok "
         "CHECK (public.e2m_bodies_fill_only(call_id)) NOT VALID", ())],
}


def _before_hardening(tmp_path, postgres, capsys, plant: str | None):
    """``createdb -O node``, ``db init`` as the nodes' account, carol's two messages
    archived, then the insider's plant; returns what of the plant was done."""
    from kamailio_app.db_cmd import main as db_main
    roles = _roles(postgres, database_owner="node")
    config = _config(tmp_path, roles["node_url"])
    assert db_main(["init", "--config", str(config)]) == 0
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    archive.record([_body("c1@carol")], [])
    archive.record([_body("c2@carol")], [])
    archive.close()
    done = _run(roles["node_url"], _PLANTS[plant]) if plant else []
    capsys.readouterr()
    return roles, config, done


def _upgrade(roles, config, capsys, owner_url: str) -> tuple[int, str]:
    from kamailio_app.db_cmd import main as db_main
    code = db_main(["upgrade", "--config", str(config), "--owner-url", owner_url])
    out = capsys.readouterr()
    return code, out.out + out.err


def _harden(roles, config, postgres, monkeypatch, capsys, way: str) -> tuple[int, str]:
    """README's two ways (review 80's ``_harden``); where the command refuses and
    offers ``REASSIGN OWNED BY``, the operator does that and runs it again."""
    admin = PgUrl.parse(postgres.url_for(roles["db"]))
    if way == "superuser":
        monkeypatch.setenv("E2M_OWNER_PASSWORD", admin.password)
        owner, owner_url = admin.user, f"postgres://{admin.user}@{HOST}:{postgres.port}/{roles['db']}"
    else:
        postgres.psql(f"REASSIGN OWNED BY {roles['node']} TO {roles['owner']};\n",
                      database=roles["db"])
        monkeypatch.setenv("E2M_OWNER_PASSWORD", roles["owner_pw"])
        owner, owner_url = roles["owner"], roles["owner_url"]
    code, said = _upgrade(roles, config, capsys, owner_url)
    advice = f"REASSIGN OWNED BY {roles['node']} TO {owner}"
    if code != 0 and advice in said:
        print(f"\nfirst run refused: {said.strip()[:400]}\n-> the operator runs: {advice}")
        postgres.psql(advice + ";\n", database=roles["db"])
        code, said = _upgrade(roles, config, capsys, owner_url)
    print(f"\nupgrade --owner-url ({way}) exit {code}: {said.strip()[:400]}")
    return code, said


def _rows(postgres, roles) -> dict[str, tuple[str, str]]:
    """call_id -> (from_uri, plaintext) in the owner's public.bodies."""
    text = postgres.psql("SELECT call_id || '|' || coalesce(from_uri, '') || '|' || "
                         "convert_from(plaintext, 'UTF8') FROM public.bodies ORDER BY id;\n",
                         database=roles["db"])
    rows = {}
    for line in text.strip().splitlines():
        call_id, from_uri, plain = line.split("|", 2)
        rows[call_id] = (from_uri, plain)
    return rows


def _archive(roles, body_call_id: str, *, from_uri: str, with_media: bool = False) -> str:
    """A node archives one message (and its SDP's media row); "" or why it failed."""
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    media = [MediaRecord(call_id=body_call_id, method="INVITE", direction="request",
                         media="audio", address="127.0.0.1", port=4000, port_count=1,
                         proto="RTP/SAVP", codecs="0 PCMU/8000")] if with_media else []
    try:
        archive.record([_body(body_call_id, from_uri=from_uri)], media)
        return ""
    except ArchiveError as exc:
        return str(exc)
    finally:
        archive.close()


def _listing(config, capsys) -> str:
    capsys.readouterr()
    code = e2m_main(["archive", "list", "--config", str(config)])
    out = capsys.readouterr()
    return f"(exit {code}) " + out.out + out.err


# -- controls ------------------------------------------------------------------------

@pytest.mark.parametrize("way", WAYS)
def test_control_the_take_over_of_a_clean_database_says_done_and_holds(
        tmp_path, postgres, monkeypatch, capsys, way):
    roles, config, _ = _before_hardening(tmp_path, postgres, capsys, None)
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, way)
    assert code == 0 and "tables owned by" in said, said
    attempts = _run(roles["node_url"], [
        ("DELETE FROM bodies WHERE call_id = 'c1@carol'", ()),
        ("UPDATE bodies SET plaintext = %s, sha256 = %s WHERE call_id = 'c2@carol'",
         (_FORGED[0].encode(), _FORGED[1]))])
    assert attempts == [], attempts
    assert _archive(roles, "c3@carol", from_uri="sip:carol@example.com") == ""
    assert _archive(roles, "d1@dave", from_uri="sip:dave@example.com", with_media=True) == ""
    rows = _rows(postgres, roles)
    assert set(rows) == {"c1@carol", "c2@carol", "c3@carol", "d1@dave"}, rows
    assert rows["c1@carol"][0] == "sip:carol@example.com" and "forged" not in str(rows)
    listing = _listing(config, capsys)
    assert "c3@carol" in listing or "sip:carol@example.com" in listing, listing
    # the check does not refuse the database it just hardened
    again = _upgrade(roles, config, capsys, roles["owner_url"] if way == "reassign" else
                     f"postgres://{PgUrl.parse(postgres.url_for(roles['db'])).user}@{HOST}:"
                     f"{postgres.port}/{roles['db']}")
    assert again[0] == 0 and "tables owned by" in again[1], again


@pytest.mark.parametrize("plant", sorted(_PLANTS))
def test_control_each_plant_is_made_while_the_tables_are_the_nodes(
        tmp_path, postgres, monkeypatch, capsys, plant):
    roles, _config_path, done = _before_hardening(tmp_path, postgres, capsys, plant)
    assert len(done) == len(_PLANTS[plant]), done
    # after a clean hardening none of it can be made
    clean = tmp_path / "clean"
    clean.mkdir()
    roles2, config2, _ = _before_hardening(clean, postgres, capsys, None)
    code, said = _harden(roles2, config2, postgres, monkeypatch, capsys, "superuser")
    assert code == 0, said
    # (a GRANT by a role that holds no grant option only warns: psycopg counts it done)
    made = [s for s in _run(roles2["node_url"], _PLANTS[plant]) if not s.startswith("GRANT")]
    assert made == [], made
    attempts = _run(roles2["node_url"], [
        ("DELETE FROM bodies WHERE call_id = 'c1@carol'", ()),
        ("UPDATE bodies SET plaintext = %s, sha256 = %s WHERE call_id = 'c2@carol'",
         (_FORGED[0].encode(), _FORGED[1]))])
    assert attempts == [], attempts


# -- holes ---------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["table", "view"])
@pytest.mark.parametrize("way", WAYS)
def test_hole_a_grant_to_public_survives_the_take_over(tmp_path, postgres, monkeypatch,
                                                       capsys, way, via):
    plant = "public_grant" if via == "table" else "public_view"
    roles, config, done = _before_hardening(tmp_path, postgres, capsys, plant)
    assert len(done) == len(_PLANTS[plant]), done
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, way)
    table = "bodies" if via == "table" else "bodies_all"
    attempts = _run(roles["node_url"], [
        (f"DELETE FROM {table} WHERE call_id = 'c1@carol'", ()),
        (f"UPDATE {table} SET plaintext = %s, sha256 = %s WHERE call_id = 'c2@carol'",
         (_FORGED[0].encode(), _FORGED[1]))])
    rows = _rows(postgres, roles)
    print(f"the nodes' account did: {attempts}\nowner's bodies now: {rows}")
    assert code != 0 or (attempts == [] and "c1@carol" in rows
                         and rows["c2@carol"][1] != "forged"), (
        f"the take-over said done ({said.strip()[:100]}), and the nodes' account then did "
        f"{attempts}: bodies holds {rows}")


@pytest.mark.parametrize("way", WAYS)
def test_hole_a_check_constraint_left_on_bodies_drops_carols_messages(
        tmp_path, postgres, monkeypatch, capsys, way):
    roles, config, done = _before_hardening(tmp_path, postgres, capsys, "check")
    assert done, done
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, way)
    failed = _archive(roles, "c3@carol", from_uri="sip:carol@example.com")
    rows = _rows(postgres, roles)
    print(f"carol's new message: {failed or 'stored'}\nowner's bodies: {sorted(rows)}")
    assert code != 0 or (failed == "" and "c3@carol" in rows), (
        f"the take-over said done, and carol's message was refused: {failed}")


@pytest.mark.parametrize("way", WAYS)
def test_hole_row_level_security_left_on_without_a_policy(
        tmp_path, postgres, monkeypatch, capsys, way):
    roles, config, done = _before_hardening(tmp_path, postgres, capsys, "rls")
    assert done, done
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, way)
    failed = _archive(roles, "d1@dave", from_uri="sip:dave@example.com")
    listing = _listing(config, capsys)
    rows = _rows(postgres, roles)
    print(f"dave's message: {failed or 'stored'}\nowner's bodies: {sorted(rows)}\n"
          f"e2m archive list over the nodes' URL: {listing.strip()[:300]}")
    assert code != 0 or (failed == "" and "d1@dave" in rows and "c1@carol" in listing), (
        f"the take-over said done; dave's message: {failed}; listing: {listing[:200]}")


@pytest.mark.parametrize("way", WAYS)
def test_hole_a_trigger_named_like_ours_on_media_runs_owner_code(
        tmp_path, postgres, monkeypatch, capsys, way):
    roles, config, done = _before_hardening(tmp_path, postgres, capsys, "media_trigger")
    assert len(done) == 3, done
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, way)
    failed = _archive(roles, "d1@dave", from_uri="sip:dave@example.com", with_media=True)
    rows = _rows(postgres, roles)
    owner = postgres.psql("SELECT pg_get_userbyid(proowner) FROM pg_proc "
                          "WHERE oid = 'e2m_util.keep()'::regprocedure;\n",
                          database=roles["db"]).strip()
    print(f"dave's call: {failed or 'stored'}; e2m_util.keep() owned by {owner}\n"
          f"owner's bodies after it: {sorted(rows)}")
    assert code != 0 or {"c1@carol", "c2@carol"} <= set(rows), (
        f"the take-over said done, and archiving dave's call deleted carol's rows: {rows}")


@pytest.mark.parametrize("way", WAYS)
def test_hole_an_overload_of_our_functions_name_checks_every_insert(
        tmp_path, postgres, monkeypatch, capsys, way):
    roles, config, done = _before_hardening(tmp_path, postgres, capsys, "overload_check")
    assert len(done) == 2, done
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, way)
    failed = _archive(roles, "d1@dave", from_uri="sip:dave@example.com")
    rows = _rows(postgres, roles)
    capsys.readouterr()
    e2m_main(["archive", "list", "--config", str(config)])
    listing = capsys.readouterr().out
    print(f"dave's message: {failed or 'stored'}\nowner's bodies: {rows}\n{listing}")
    assert code != 0 or rows["c1@carol"][1] != "forged", (
        f"the take-over said done, and archiving dave's message rewrote carol's: {rows}")


@pytest.mark.parametrize("way", WAYS)
def test_hole_a_public_grant_on_the_id_sequence_lets_the_node_rewind_it(
        tmp_path, postgres, monkeypatch, capsys, way):
    roles, config, done = _before_hardening(tmp_path, postgres, capsys, "sequence")
    assert len(done) == 2, done
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, way)
    after = _run(roles["node_url"], [("SELECT setval('bodies_id_seq', 1)", ()),
                                     ("CREATE TABLE made_later (x int)", ())])
    failed = _archive(roles, "c3@carol", from_uri="sip:carol@example.com")
    rows = _rows(postgres, roles)
    print(f"the nodes' account did: {after}\ncarol's new message: {failed or 'stored'}\n"
          f"owner's bodies: {sorted(rows)}")
    assert code != 0 or (after == [] and failed == "" and "c3@carol" in rows), (
        f"the take-over said done; the nodes' account then did {after}, and carol's "
        f"message: {failed}")


# -- the classes behind the holes (stop 34) -------------------------------------------

_CLASSES = {
    "unlogged": (["ALTER TABLE bodies SET UNLOGGED"], "UNLOGGED"),
    "sequence_limit": (["ALTER SEQUENCE bodies_id_seq MAXVALUE 10"], "sequence id"),
    "dropped_index": (["DROP INDEX bodies_message"], "lacks index"),
    "expression_index": (["CREATE INDEX bx ON bodies (lower(call_id))"], "index bx"),
    "column_default": (["ALTER TABLE bodies ALTER COLUMN signer SET DEFAULT 'x'"],
                       "column signer"),
    "forced_rls": (["ALTER TABLE bodies FORCE ROW LEVEL SECURITY"], "row level security"),
    "child_table": (["CREATE TABLE kid () INHERITS (bodies)"], "inherited by kid"),
    "materialized_view": (["CREATE MATERIALIZED VIEW mv AS SELECT 1 AS x"],
                          "materialized view mv"),
    "operator": (["CREATE SCHEMA ops", "CREATE FUNCTION ops.f(text, text) RETURNS bool "
                  "LANGUAGE sql AS 'SELECT true'", "CREATE OPERATOR ops.=== (LEFTARG = text, "
                  "RIGHTARG = text, FUNCTION = ops.f)", "ALTER TABLE media ADD CONSTRAINT m "
                  "CHECK (call_id OPERATOR(ops.===) 'x') NOT VALID"], "uses operator ops.==="),
}


@pytest.mark.parametrize("plant", sorted(_CLASSES))
def test_fixed_the_classes_behind_the_holes_are_refused(tmp_path, postgres, monkeypatch,
                                                        capsys, plant):
    """Each made by the nodes' account before the hardening (README's second way, the
    one that leaves the least named): refused, naming it."""
    statements, named = _CLASSES[plant]
    monkeypatch.setitem(_PLANTS, plant, [(s, ()) for s in statements])
    roles, config, done = _before_hardening(tmp_path, postgres, capsys, plant)
    assert len(done) == len(statements), done
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, "reassign")
    assert code != 0 and named in said and "run this again" in said, said
