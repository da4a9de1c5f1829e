"""A seventy-eighth attacker's review (December 2026) of 753b2c5: stop 32's
``db_cmd --owner-url`` (``_take_over``, ``_grant``, the ``e2m_bodies_fill_only``
trigger) against the nodes' own database account (the core parts of this review are in
``tests/unit/test_review78.py``).

Hole (``test_hole_a_schema_the_nodes_account_made_survives_the_take_over``)

Attacker: an insider who got the nodes' database password (``[cluster] db_url``, on
every node), on a database made the old way (``createdb -O e2m e2m``: review 76's
deployment), before the operator hardens it.

Messages (SQL over the nodes' account): before the hardening, once,
``CREATE SCHEMA <node>`` (the nodes' account owns the database, so it may; the schema
is named after the account: ``"$user"``, the first entry of PostgreSQL's default
``search_path``).  The operator then runs ``e2m-proxy db upgrade --owner-url`` with the
cluster's superuser (README's first way), which says "tables owned by <owner>; <node>
may only read, add rows and fill a copy's empty sender and Request-URI".  Afterwards,
whenever he likes: ``CREATE TABLE bodies (LIKE public.bodies INCLUDING ALL)`` and the
same for ``media`` (unqualified: they land in his schema), its identity
restarted past public's, ``INSERT INTO bodies OVERRIDING SYSTEM VALUE SELECT * FROM
public.bodies``, ``UPDATE bodies SET from_uri = 'sip:bob@example.com' WHERE
call_id = 'c1@carol'``.

Effect: all done.  Every node's unqualified ``INSERT INTO bodies`` (``archive.py``) now
lands in the nodes' own table (no trigger, theirs to rewrite or delete), and ``e2m
archive list`` over ``[cluster] db_url`` prints carol's verified message as bob's; the
owner's ``public.bodies`` misses every message archived since (dave's here).  Review 74's
and 76's hole, back through a schema the take-over never looked at.
At fault: ``kamailio_app/db_cmd.py`` ``_PLACES`` / ``_OWNERS`` read only
``current_schema()`` of the *owner's* session (``public``) and ``_take_over`` moves only
that schema; a schema the nodes' account owns elsewhere in the database (above all the
one its ``search_path`` reads first) is neither taken over nor reported, and the nodes'
connections (``pgconn.PgUrl.params``) set no ``search_path``.
Fix: in ``_grant``, take over (or refuse with ``REASSIGN OWNED BY``) every schema of the
database the nodes' account owns or may CREATE in (``pg_namespace.nspowner``,
``has_schema_privilege(node, nsp, 'CREATE')``), revoke ``CREATE`` on the database too,
check all of them before saying "tables owned by"; and pin the nodes' ``search_path``
(``-c search_path=public`` in ``PgUrl.params``, or ``ALTER ROLE node SET search_path``)
or schema-qualify the archive's statements.

Controls: ``test_control_without_a_schema_of_its_own_the_node_cannot_shadow_bodies``
(the same upgrade and the same statements with no schema made before: ``CREATE TABLE``
refused, the listing keeps carol as sender); the set-up's other half,
``test_control_the_upgrade_says_done_and_public_is_the_owners`` (the upgrade exits 0
with "tables owned by" and ``public``'s tables and the database are the superuser's:
the hardening did what it checks).

Tried and held (run where named):
- After the take-over the nodes' account cannot make a new schema (``CREATE SCHEMA``
  refused: the database is the owner's and PUBLIC has no CREATE there): the attack needs
  the password before the hardening, as above.
- ``cert_publications`` / ``cert_subscriptions``: the nodes' account may write any row
  (it is the certificate service); a published certificate is still checked against
  the trust anchors and the AoR by every UA, so a forged row gives no key the CA did not
  issue: within what a node is (not re-reported).
- The certificate service on the restricted account, read only (no Kamailio node was
  run with ``[certs]`` here): ``PostgresCertDatabase.ensure_schema`` only reads when
  the tables and their ``schema_version`` row are there (``db init --owner-url`` makes
  them as the owner); were ``[certs]`` enabled after the hardening, the node's CREATE
  is refused and the start stops (fail closed).  Its ``to_regclass`` and statements are
  unqualified too: the planted schema above shadows them the same way (the nodes'
  account may rewrite those tables anyway).
- The runtime dir check (``launcher._check_private``) and ``_write_private``
  (``O_EXCL|O_NOFOLLOW`` after an unlink, in a dir checked 0700 and ours with no parent
  others may rename in), ``privatefiles.read_private_file`` (``O_NOFOLLOW`` + ``fstat``
  of the descriptor read): read, held; no new effect beyond review 74's notes.

Fixed (stop 33): ``_grant`` refuses while the nodes' account owns any schema of the
database (``_NODE_SCHEMAS``), naming it with what to do; every client connects with
``search_path=public`` (``pgconn.SEARCH_PATH_OPTION``, in ``PgUrl.params`` and in
``db_postgres``' ``con_param``).  The hole test now asserts the refusal, then the
operator's drop and a clean take-over; ``test_a_schema_left_from_an_earlier_take_over_
shadows_nothing`` covers a database hardened by stop 32's take-over (failed before the
fix).  The insider's statements run from his own client, without our search path.
"""

from __future__ import annotations

import pytest

from e2m_lab.postgres import HOST
from e2m_plugins.cli import main as e2m_main
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.pgconn import PgUrl, connect
from tests.cluster.test_review74_cluster import _body, _config, _roles

pytestmark = pytest.mark.postgres

_SHADOW = (("CREATE TABLE bodies (LIKE public.bodies INCLUDING ALL)", ()),
           ("CREATE TABLE media (LIKE public.media INCLUDING ALL)", ()),
           ("ALTER TABLE bodies ALTER id RESTART WITH 1000", ()),
           ("INSERT INTO bodies OVERRIDING SYSTEM VALUE SELECT * FROM public.bodies", ()),
           ("UPDATE bodies SET from_uri = %s WHERE call_id = %s",
            ("sip:bob@example.com", "c1@carol")))


def _run(node_url: str, statements) -> list[str]:
    """The insider's statements over the nodes' account, from his own client: libpq's
    defaults (no ``search_path`` of ours), as ``psql`` would send them."""
    import psycopg
    url = PgUrl.parse(node_url)
    done = []
    with psycopg.connect(host=url.host, port=url.port, dbname=url.database, user=url.user,
                         password=url.password, autocommit=True) as conn:
        for statement, args in statements:
            try:
                cursor = conn.execute(statement, args)
                if statement.startswith(("CREATE", "ALTER")) or cursor.rowcount:
                    done.append(statement)
            except psycopg.errors.Error as exc:
                print(f"refused: {statement}: {exc}")
    return done


def _before_hardening(tmp_path, postgres, capsys, *, plant: bool):
    """``createdb -O node``, ``db init`` as the nodes' account, carol's message archived;
    with ``plant`` the insider makes a schema named after the nodes' account."""
    from kamailio_app.db_cmd import main as db_main
    roles = _roles(postgres, database_owner="node")
    config = _config(tmp_path, roles["node_url"])
    assert db_main(["init", "--config", str(config)]) == 0
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    archive.record([_body("c1@carol")], [])
    archive.close()
    if plant:
        assert _run(roles["node_url"], [(f'CREATE SCHEMA "{roles["node"]}"', ())])
    capsys.readouterr()
    return roles, config


def _harden(roles, config, postgres, monkeypatch, capsys, *, expect: int = 0) -> str:
    """README's first way: ``db upgrade --owner-url`` with the cluster's superuser."""
    from kamailio_app.db_cmd import main as db_main
    admin = PgUrl.parse(postgres.url_for(roles["db"]))
    monkeypatch.setenv("E2M_OWNER_PASSWORD", admin.password)
    admin_url = f"postgres://{admin.user}@{HOST}:{postgres.port}/{roles['db']}"
    code = db_main(["upgrade", "--config", str(config), "--owner-url", admin_url])
    out = capsys.readouterr()
    assert code == expect, out.out + out.err
    assert ("tables owned by" in out.out) == (expect == 0), out.out + out.err
    return out.out + out.err


def _after(roles, config, capsys) -> tuple[list[str], str, str]:
    """The insider's statements, then a node archives dave's message; what was done,
    ``e2m archive list`` over the nodes' URL, and the call-ids in the owner's table."""
    done = _run(roles["node_url"], _SHADOW)
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    archive.record([_body("d1@dave", from_uri="sip:dave@example.com")], [])
    archive.close()
    capsys.readouterr()
    assert e2m_main(["archive", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    return done, listing


def test_control_the_upgrade_says_done_and_public_is_the_owners(
        tmp_path, postgres, monkeypatch, capsys):
    roles, config = _before_hardening(tmp_path, postgres, capsys, plant=False)
    _harden(roles, config, postgres, monkeypatch, capsys)
    admin = PgUrl.parse(postgres.url_for(roles["db"])).user
    held = postgres.psql(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE n.nspname = 'public' AND pg_get_userbyid(c.relowner) = '{roles['node']}';\n"
        f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{roles['db']}';\n",
        database=roles["db"]).split()
    print(f"\npublic tables still the node's, database owner: {held}")
    assert held[:2] == ["0", admin], held
    # after the take-over no new schema can be made: only one made before is a way in
    assert _run(roles["node_url"], [('CREATE SCHEMA later', ())]) == []


def test_control_without_a_schema_of_its_own_the_node_cannot_shadow_bodies(
        tmp_path, postgres, monkeypatch, capsys):
    roles, config = _before_hardening(tmp_path, postgres, capsys, plant=False)
    _harden(roles, config, postgres, monkeypatch, capsys)
    done, listing = _after(roles, config, capsys)
    assert done == [], done
    assert "sip:carol@example.com" in listing and "sip:bob@" not in listing
    assert "sip:dave@example.com" in listing


def test_hole_a_schema_the_nodes_account_made_survives_the_take_over(
        tmp_path, postgres, monkeypatch, capsys):
    """Fixed (stop 33): the take-over refuses while the nodes' account owns a schema,
    and names it; once the operator dropped it, the same statements are refused."""
    roles, config = _before_hardening(tmp_path, postgres, capsys, plant=True)
    said = _harden(roles, config, postgres, monkeypatch, capsys, expect=1)
    assert f"schema {roles['node']}" in said and "REASSIGN OWNED BY" in said, said
    postgres.psql(f'DROP SCHEMA "{roles["node"]}" CASCADE;\n', database=roles["db"])
    _harden(roles, config, postgres, monkeypatch, capsys)
    done, listing = _after(roles, config, capsys)
    public = postgres.psql("SELECT call_id FROM public.bodies ORDER BY id;\n",
                           database=roles["db"]).split()
    print(f"{said}done: {done}\n{listing}\nowner's public.bodies: {public}")
    assert not done and "sip:bob@" not in listing and "d1@dave" in public, (
        f"the nodes' account did {done}; e2m archive list says\n"
        f"{listing}\nand the owner's public.bodies holds only {public}")


def test_a_schema_left_from_an_earlier_take_over_shadows_nothing(
        tmp_path, postgres, monkeypatch, capsys):
    """A database hardened before the schema check (stop 32's take-over said done with
    the planted schema there): the nodes and the archive tool name only ``public``
    (pgconn.SEARCH_PATH_OPTION), so the insider's own ``bodies`` takes no row and is
    never shown."""
    import kamailio_app.db_owner as db_owner
    roles, config = _before_hardening(tmp_path, postgres, capsys, plant=True)
    nothing = "SELECT nspname FROM pg_namespace WHERE false AND %s::text IS NULL"
    monkeypatch.setattr(db_owner, "_NODE_SCHEMAS", nothing)   # stop 32 had neither check
    monkeypatch.setattr(db_owner, "_PLANTED", nothing)
    _harden(roles, config, postgres, monkeypatch, capsys)
    shadow = [(statement.replace("TABLE bodies", f'TABLE "{roles["node"]}".bodies')
               .replace("TABLE media", f'TABLE "{roles["node"]}".media')
               .replace("INTO bodies", f'INTO "{roles["node"]}".bodies')
               .replace("UPDATE bodies", f'UPDATE "{roles["node"]}".bodies'), args)
              for statement, args in _SHADOW]
    assert len(_run(roles["node_url"], shadow)) == len(shadow)    # his schema, his tables
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    archive.record([_body("d1@dave", from_uri="sip:dave@example.com")], [])
    archive.close()
    capsys.readouterr()
    assert e2m_main(["archive", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    public = postgres.psql("SELECT call_id FROM public.bodies ORDER BY id;\n",
                           database=roles["db"]).split()
    print(f"\n{listing}\nowner's public.bodies: {public}")
    assert "sip:carol@example.com" in listing and "sip:bob@" not in listing, listing
    assert public == ["c1@carol", "d1@dave"], public


def test_a_shadow_users_table_is_never_read_by_the_nodes_digest(proxy_factory, pg_url):
    """The same schema trick against Kamailio's own reader (``auth_db`` over
    ``db_postgres``): the insider copies ``subscriber`` into a schema named after the
    nodes' account and gives alice a password of his.  ``db_postgres`` connects with
    ``search_path=public`` too, so his password gets 401 and hers still 200."""
    from e2m_lab.cluster import start_cluster
    from e2m_lab.kamailio_harness import SipUa
    users = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
    a, _b = start_cluster(proxy_factory, pg_url, auth=True, users=users).nodes
    account = PgUrl.parse(pg_url).user
    planted = _run(pg_url, [
        (f'CREATE SCHEMA "{account}"', ()),
        (f'CREATE TABLE "{account}".subscriber (LIKE public.subscriber INCLUDING ALL)', ()),
        (f'INSERT INTO "{account}".subscriber SELECT * FROM public.subscriber', ()),
        (f"UPDATE \"{account}\".subscriber SET ha1 = md5('alice:' || domain || ':mallory'), "
         "ha1b = md5('alice@' || domain || ':' || domain || ':mallory') "
         "WHERE username = 'alice'", ())])
    assert len(planted) == 4, planted
    statuses = {}
    for password in ("mallory", users["alice"]):
        ua = SipUa(a.port, user="alice", password=password, source="127.0.0.86")
        try:
            answer = ua.register()
            statuses[password] = answer.status if answer is not None else None
        finally:
            ua.close()
    print(f"\nREGISTER as alice with the planted password, then hers: {statuses}")
    assert statuses == {"mallory": 401, users["alice"]: 200}, statuses
