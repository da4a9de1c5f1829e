"""An eightieth attacker's review (December 2026) of 3653837: review 78's database fixes
(``pgconn.SEARCH_PATH_OPTION``, ``db_cmd._NODE_SCHEMAS``) and the take-over around them
(``db_cmd._take_over`` / ``_grant``), against the nodes' own database account, on the
harness's PostgreSQL (review 78's set-up: ``createdb -O node``, then README's two ways
of hardening).  The core parts of this review are in ``tests/unit/test_review80.py``.

Hole (``test_hole_a_trigger_the_nodes_account_put_on_bodies_survives_the_take_over``,
both of README's ways)

Attacker: an insider who got the nodes' database password (``[cluster] db_url``, on
every node) on a database made the old way (``createdb -O e2m e2m``), before the
operator hardens it: review 78's attacker, with a trigger instead of a schema.

Messages (SQL over the nodes' account, from his own client): before the hardening, once,
in ``public`` (the database, hence its ``public`` schema, is the nodes' account's):
``CREATE FUNCTION e2m_touch() RETURNS trigger ... NEW.from_uri := 'sip:bob@...' when it
is dave's ...`` and ``CREATE TRIGGER a_touch BEFORE INSERT ON bodies FOR EACH ROW
EXECUTE FUNCTION e2m_touch()`` (the table is still his).  The operator then runs
``e2m-proxy db upgrade --owner-url`` with the cluster's superuser (README's first way),
or a superuser's ``REASSIGN OWNED BY node TO owner`` then the upgrade as the owner (the
second); either says "tables owned by <owner>; <node> may only read, add rows and fill
a copy's empty sender and Request-URI".

Effect: the table changes hands, its triggers do not go: every row a node archives
afterwards passes his trigger, and dave's verified message is recorded, and listed by
``e2m archive list``, as bob's; the owner's table is the owner's, its rows written by
the insider's code (any rewrite or ``RETURN NULL`` - a message never archived - that
the function's body chose; with the first way the function stays his, a trigger owned
by the table's owner running code its owner did not write).  Review 74's hole (a node
rewriting who sent what) back through what the take-over never looked at.
At fault: ``kamailio_app/db_cmd.py`` ``_grant``: the take-over moves the database, the
schema, tables and sequences (``_PLACES``, ``_OWNERS``), and the check before "tables
owned by" reads only those and the nodes' schemas (``_NODE_SCHEMAS``); a table's
triggers (``pg_trigger``), and functions, types, operators, views' rules the nodes'
account made (``pg_proc.proowner`` ...), are neither removed nor reported.
Fix: before saying done, refuse (naming each, with ``DROP TRIGGER ... ON ...``) while a
table of the archive carries any trigger but ``e2m_bodies_fill_only`` (``SELECT tgname
FROM pg_trigger WHERE tgrelid = ...::regclass AND NOT tgisinternal``) and while the
nodes' account owns any object in the database (``pg_shdepend`` / ``pg_proc``,
``pg_type``, ``pg_operator``: ``REASSIGN OWNED`` does not make their code the owner's);
or drop every trigger but the owner's own.

Controls: ``test_control_without_a_planted_trigger_dave_stays_dave`` (the same hardening
and archiving with nothing planted: dave's row is dave's),
``test_control_after_the_hardening_the_node_cannot_add_a_trigger`` (``CREATE TRIGGER``
is refused once the table is the owner's: the attack needs the password before).

Tried and held (run where named, else read):
- ``ALTER ROLE <node> SET search_path = <anything>`` (a role may set its own defaults):
  the nodes and the tools send ``-c search_path=public`` in the start-up packet, which
  wins over a role's default; ``db_postgres`` the same (review 78's digest test).
- ``pg_temp``: searched first for relations, but per session: the insider's temporary
  ``bodies`` is seen by his session only.
- Functions or operators of his own in ``public`` shadowing the ones the nodes and tools
  call: ``pg_catalog`` is searched first (implicitly) and after the hardening the nodes'
  account has no ``CREATE`` on ``public`` (revoked, and PostgreSQL 15 gives ``PUBLIC``
  none); before it, only objects of names the tools do not call unqualified
  (``e2m_bodies_fill_only`` itself is replaced by the superuser's ``CREATE OR REPLACE``
  while its owner stays the node - see the fix above).
- Sequences: ``GRANT USAGE ON ALL SEQUENCES`` lets a node ``setval``? no: ``USAGE`` gives
  ``nextval``/``currval`` only; burning ids skips numbers, rows are not lost.

Fixed (stop 33): the take-over refuses while a trigger, rule, policy or function it
did not make is on the tables or in their schema, or the nodes' account still owns
anything in the database (``db_cmd._PLANTED``), naming each.  The hole test now
asserts the refusal by both ways, then the operator's drop and a take-over that keeps
dave's row dave's.
"""

from __future__ import annotations

import pytest

from e2m_lab.postgres import HOST
from e2m_plugins.cli import main as e2m_main
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.pgconn import PgUrl
from tests.cluster.test_review74_cluster import _body, _config, _roles
from tests.cluster.test_review78_cluster import _run

pytestmark = pytest.mark.postgres

_PLANT = (("CREATE FUNCTION e2m_touch() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
           "IF NEW.from_uri = 'sip:dave@example.com' THEN "
           "NEW.from_uri := 'sip:bob@example.com'; NEW.signer := 'sip:bob@example.com'; "
           "END IF; RETURN NEW; END $f$", ()),
          ("CREATE TRIGGER a_touch BEFORE INSERT ON bodies FOR EACH ROW "
           "EXECUTE FUNCTION e2m_touch()", ()))


def _before_hardening(tmp_path, postgres, capsys, *, plant: bool):
    from kamailio_app.db_cmd import main as db_main
    roles = _roles(postgres, database_owner="node")
    config = _config(tmp_path, roles["node_url"])
    assert db_main(["init", "--config", str(config)]) == 0
    if plant:
        assert len(_run(roles["node_url"], _PLANT)) == 2
    capsys.readouterr()
    return roles, config


def _harden(roles, config, postgres, monkeypatch, capsys, way: str) -> tuple[int, str]:
    from kamailio_app.db_cmd import main as db_main
    if way == "superuser":
        admin = PgUrl.parse(postgres.url_for(roles["db"]))
        monkeypatch.setenv("E2M_OWNER_PASSWORD", admin.password)
        owner_url = f"postgres://{admin.user}@{HOST}:{postgres.port}/{roles['db']}"
    else:
        postgres.psql(f"REASSIGN OWNED BY {roles['node']} TO {roles['owner']};\n",
                      database=roles["db"])
        monkeypatch.setenv("E2M_OWNER_PASSWORD", roles["owner_pw"])
        owner_url = roles["owner_url"]
    code = db_main(["upgrade", "--config", str(config), "--owner-url", owner_url])
    out = capsys.readouterr()
    return code, out.out + out.err


def _archive_dave(roles, config, postgres, capsys) -> tuple[str, str]:
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    archive.record([_body("d1@dave", from_uri="sip:dave@example.com")], [])
    archive.close()
    capsys.readouterr()
    assert e2m_main(["archive", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    recorded = postgres.psql("SELECT from_uri FROM public.bodies WHERE call_id = 'd1@dave';\n",
                             database=roles["db"]).strip()
    return listing, recorded


@pytest.mark.parametrize("way", ["superuser", "reassign"])
def test_control_without_a_planted_trigger_dave_stays_dave(tmp_path, postgres, monkeypatch,
                                                           capsys, way):
    roles, config = _before_hardening(tmp_path, postgres, capsys, plant=False)
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, way)
    assert code == 0 and "tables owned by" in said, said
    listing, recorded = _archive_dave(roles, config, postgres, capsys)
    assert recorded == "sip:dave@example.com" and "sip:bob@" not in listing, listing


def test_control_after_the_hardening_the_node_cannot_add_a_trigger(tmp_path, postgres,
                                                                   monkeypatch, capsys):
    roles, config = _before_hardening(tmp_path, postgres, capsys, plant=False)
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, "superuser")
    assert code == 0, said
    assert _run(roles["node_url"], _PLANT) == []          # no CREATE on public, not the owner


@pytest.mark.parametrize("way", ["superuser", "reassign"])
def test_hole_a_trigger_the_nodes_account_put_on_bodies_survives_the_take_over(
        tmp_path, postgres, monkeypatch, capsys, way):
    """Fixed (stop 33): the take-over refuses while a trigger, rule, policy or function
    it did not make is on the tables (``db_cmd._PLANTED``), naming it; once the
    operator dropped it, the take-over goes through and dave's row stays dave's."""
    roles, config = _before_hardening(tmp_path, postgres, capsys, plant=True)
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, way)
    print(f"\nupgrade exit {code}: {said.strip()[:300]}")
    assert code != 0 and "trigger a_touch on bodies" in said, said
    assert "function e2m_touch()" in said, said
    postgres.psql("DROP TRIGGER a_touch ON bodies; DROP FUNCTION e2m_touch();\n",
                  database=roles["db"])
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, way)
    assert code == 0 and "tables owned by" in said, said
    listing, recorded = _archive_dave(roles, config, postgres, capsys)
    triggers = postgres.psql("SELECT tgname || ' ' || pg_get_userbyid(p.proowner) FROM pg_trigger t "
                             "JOIN pg_proc p ON p.oid = t.tgfoid "
                             "WHERE tgrelid = 'public.bodies'::regclass AND NOT tgisinternal;\n",
                             database=roles["db"]).split("\n")
    print(f"triggers on bodies: {triggers}\ndave's row recorded as from {recorded}\n{listing}")
    assert recorded == "sip:dave@example.com", (
        f"the upgrade said done ({said.strip()[:120]}), and dave's message was archived "
        f"as from {recorded}")


def test_an_extensions_functions_in_public_do_not_stop_the_take_over(
        tmp_path, postgres, monkeypatch, capsys):
    """The check names code the nodes' account left, not an operator's extension: a
    superuser's ``CREATE EXTENSION`` in ``public`` (its functions are the extension's)
    leaves the take-over saying done."""
    roles, config = _before_hardening(tmp_path, postgres, capsys, plant=False)
    postgres.psql("CREATE EXTENSION IF NOT EXISTS pgcrypto SCHEMA public;\n",
                  database=roles["db"])
    code, said = _harden(roles, config, postgres, monkeypatch, capsys, "superuser")
    assert code == 0 and "tables owned by" in said, said
