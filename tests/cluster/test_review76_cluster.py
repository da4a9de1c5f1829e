"""A seventy-sixth attacker's review (December 2026) of c882b11: review 74's
``db_cmd._grant`` and its ``e2m_bodies_fill_only`` trigger, against the nodes' own
database account (the core parts of this review are in ``tests/unit/test_review76.py``).

Hole (``test_hole_the_nodes_account_drops_the_fill_only_trigger_in_its_own_database``)

Attacker: an insider who got the nodes' database password (``[cluster] db_url``), on a
database created the way this project's deployments were made before ``--owner-url``
(``createuser e2m; createdb -O e2m e2m``: the database owned by the nodes' account),
on which the operator ran ``e2m-proxy db init --owner-url`` with the cluster's
superuser as the owner (README: "the owner must be a superuser there").

Messages (SQL over the nodes' account): ``DROP FUNCTION e2m_bodies_fill_only()
CASCADE`` (the trigger goes with it), then ``UPDATE bodies SET from_uri =
'sip:bob@example.com' WHERE call_id = 'c1@carol'``.  (``DROP TABLE bodies CASCADE`` is
allowed the same way and takes the whole archive; not run.)

Effect: ``db init`` said "tables owned by <owner>; <node> may only read, add rows and
fill a copy's empty sender and Request-URI", yet both statements were done and ``e2m
archive list`` shows carol's verified message as sent by bob: review 74's hole 1 back.
On PostgreSQL 15 the ``public`` schema belongs to ``pg_database_owner``, i.e. to the
database's owner, here the nodes' account; the owner of a schema may DROP any object in
it whoever owns the object, and the trigger is dropped with its function.  ``REVOKE
CREATE ON SCHEMA public FROM node`` does not touch that.
At fault: ``kamailio_app/db_cmd.py`` ``_grant``: it checks and takes over only the
owners of ``pg_class`` rows (``relkind IN ('r', 'S')``), never the database's owner
(``pg_database.datdba``) nor the schema's (``pg_namespace.nspowner``), and then says
"tables owned by" as if the nodes' account could not touch them.
Fix: in ``_grant`` (init and upgrade), refuse while the nodes' account owns the
database or the schema (directly or as ``pg_database_owner``), with what to do
(``ALTER DATABASE e2m OWNER TO e2m_owner`` as a superuser), or do it when the owner
may; check it again before saying "tables owned by"; keep the function in a schema the
nodes do not own.

Controls: ``test_control_on_a_database_the_owner_made_the_trigger_cannot_be_dropped``
(README's ``createdb -O e2m_owner``: DROP and UPDATE refused, as are ``ALTER TABLE ...
DISABLE TRIGGER`` and ``SET session_replication_role = replica``; the listing keeps
carol); ``test_control_reassign_owned_then_upgrade_leaves_the_trigger_standing``
(README's upgrade via a superuser's ``REASSIGN OWNED BY node TO owner``, which moves
the database too: held).

Noted, a defect (fail closed, no security effect by itself):
``test_control_upgrade_with_the_clusters_superuser_fails_on_bodies_id_seq``: ``db
upgrade --owner-url`` with a superuser on a node-made database ALTERs ``bodies`` (its
serial sequence follows) and then ``bodies_id_seq`` from the list read before:
"cannot change owner of sequence" - README's first upgrade way never completes (and
had it completed, the database would still be the nodes', as in the hole).

Fixed (stop 32): ``db_cmd._take_over`` makes the database and its schema the owner's
too, then the tables and, read again, the sequences left (the defect this module's
third control first recorded is gone: that control now checks the superuser's route
takes everything over); ``_grant`` checks all of it before it says so.  The hole
turned XPASS; the marker is gone.
"""

from __future__ import annotations

import pytest

from e2m_lab.postgres import HOST
from e2m_plugins.cli import main as e2m_main
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.pgconn import PgUrl, connect
from tests.cluster.test_review74_cluster import _body, _config, _owned, _roles

pytestmark = pytest.mark.postgres

_ATTACK = (("DROP FUNCTION e2m_bodies_fill_only() CASCADE", ()),
           ("UPDATE bodies SET from_uri = %s WHERE call_id = %s",
            ("sip:bob@example.com", "c1@carol")))


def _attack(node_url: str) -> list[str]:
    import psycopg
    done = []
    with connect(PgUrl.parse(node_url), autocommit=True) as conn:
        for statement, args in _ATTACK:
            try:
                cursor = conn.execute(statement, args)
                if statement.startswith("DROP") or cursor.rowcount:
                    done.append(statement)
            except psycopg.errors.Error as exc:
                print(f"refused: {statement}: {exc}")
    return done


def _listing(config, capsys) -> str:
    capsys.readouterr()
    assert e2m_main(["archive", "list", "--config", str(config)]) == 0
    return capsys.readouterr().out


def test_control_on_a_database_the_owner_made_the_trigger_cannot_be_dropped(
        tmp_path, postgres, monkeypatch, capsys):
    import psycopg
    roles, config = _owned(tmp_path, postgres, monkeypatch, capsys)
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    archive.record([_body("c1@carol")], [])
    archive.close()
    assert _attack(roles["node_url"]) == []
    with connect(PgUrl.parse(roles["node_url"]), autocommit=True) as conn:
        for statement in ("ALTER TABLE bodies DISABLE TRIGGER e2m_bodies_fill_only",
                          "SET session_replication_role = replica"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    listing = _listing(config, capsys)
    assert "sip:carol@example.com" in listing and "bob" not in listing


def _before_fix(tmp_path, postgres, capsys):
    """A deployment from before ``--owner-url``: ``createdb -O e2m e2m``, ``db init``
    as the nodes' account, carol's message archived."""
    from kamailio_app.db_cmd import main as db_main
    roles = _roles(postgres, database_owner="node")
    config = _config(tmp_path, roles["node_url"])
    assert db_main(["init", "--config", str(config)]) == 0
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    archive.record([_body("c1@carol")], [])
    archive.close()
    capsys.readouterr()
    return roles, config


def test_control_upgrade_with_the_clusters_superuser_takes_everything_over(
        tmp_path, postgres, monkeypatch, capsys):
    """README's first way (the owner a superuser) now runs: the database, its tables and
    their sequences become the owner's (the serial sequence moves with its table and is
    not ALTERed twice; that "cannot change owner of sequence" failure was the defect
    this control first recorded)."""
    from kamailio_app.db_cmd import main as db_main
    roles, config = _before_fix(tmp_path, postgres, capsys)
    admin = PgUrl.parse(postgres.url_for(roles["db"]))
    monkeypatch.setenv("E2M_OWNER_PASSWORD", admin.password)
    admin_url = f"postgres://{admin.user}@{HOST}:{postgres.port}/{roles['db']}"
    code = db_main(["upgrade", "--config", str(config), "--owner-url", admin_url])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    held = postgres.psql(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE n.nspname = 'public' AND pg_get_userbyid(c.relowner) = '{roles['node']}';\n"
        f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{roles['db']}';\n",
        database=roles["db"]).split()
    assert held == ["0", admin.user], held


def test_control_reassign_owned_then_upgrade_leaves_the_trigger_standing(
        tmp_path, postgres, monkeypatch, capsys):
    """README's second way: a superuser's ``REASSIGN OWNED BY node TO owner`` moves the
    database too, and the upgraded database holds against the same attack."""
    from kamailio_app.db_cmd import main as db_main
    roles, config = _before_fix(tmp_path, postgres, capsys)
    postgres.psql(f"REASSIGN OWNED BY {roles['node']} TO {roles['owner']};\n",
                  database=roles["db"])
    monkeypatch.setenv("E2M_OWNER_PASSWORD", roles["owner_pw"])
    assert db_main(["upgrade", "--config", str(config), "--owner-url", roles["owner_url"]]) == 0
    assert "tables owned by" in capsys.readouterr().out
    assert _attack(roles["node_url"]) == []
    listing = _listing(config, capsys)
    assert "sip:carol@example.com" in listing and "bob" not in listing


def test_hole_the_nodes_account_drops_the_fill_only_trigger_in_its_own_database(
        tmp_path, postgres, monkeypatch, capsys):
    from kamailio_app.db_cmd import main as db_main
    roles = _roles(postgres, database_owner="node")       # createdb -O e2m e2m, as before
    config = _config(tmp_path, roles["node_url"])
    admin = PgUrl.parse(postgres.url_for(roles["db"]))    # the cluster's superuser as owner
    monkeypatch.setenv("E2M_OWNER_PASSWORD", admin.password)
    admin_url = f"postgres://{admin.user}@{HOST}:{postgres.port}/{roles['db']}"
    assert db_main(["init", "--config", str(config), "--owner-url", admin_url]) == 0
    said = capsys.readouterr().out
    assert "tables owned by" in said
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    archive.record([_body("c1@carol")], [])
    archive.close()
    done = _attack(roles["node_url"])
    listing = _listing(config, capsys)
    print(f"{said}{done}\n{listing}")
    assert not done, (f"after {said.strip()!r} the nodes' account did {done}; e2m archive "
                      f"list now says\n{listing}")
