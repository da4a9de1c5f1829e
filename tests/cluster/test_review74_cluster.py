"""A seventy-fourth attacker's review (December 2026) of 8e54426: the last fixes of this
stop attacked; here the shared archive's roles (``e2m-proxy db init|upgrade
--owner-url``, ``db_cmd._grant``, review 73's fix).  The registration-count hole is in
``tests/unit/test_review74.py``.

Hole 2 (``test_hole_the_nodes_account_rewrites_the_sender_of_archived_rows``)

Attacker: an insider UA who got the credentials every node holds in PROXY.toml
(``[cluster] db_url``), on a database set up as the fix says (``db init --owner-url``:
the tables the owner's, the nodes' account granted ``UPDATE (from_uri, request_uri)``
on ``bodies`` so that a copy can fill an answer's missing sender).

Messages (SQL over the nodes' account): ``UPDATE bodies SET from_uri =
'sip:bob@example.com' WHERE call_id = 'c1@carol'`` (carol's archived MESSAGE), and
``UPDATE bodies SET from_uri = NULL, request_uri = NULL WHERE call_id = 'c2@carol'``.

Effect: both done.  ``e2m archive list`` prints carol's first message as sent by bob
(the list line shows the sender and "verified", not the signer), her second from
nobody ("-"): an archive row misattributed, unnoticed.  The column grant lets the
account change any row's sender and Request-URI, not only fill an empty one, which is
all a node does (``_INSERT_BODY``: ``COALESCE(bodies.from_uri, excluded.from_uri)``;
"Only an empty field is filled; nothing stored is ever changed").
At fault: ``kamailio_app/db_cmd.py`` ``_NODE_GRANTS``: ``("UPDATE (from_uri,
request_uri)", ("bodies",))`` - a column privilege bounds what may change, not from
what.
Fix: make the rule the database's: a ``BEFORE UPDATE`` trigger on ``bodies`` owned by
the owner (made by ``db init``/``upgrade``) that raises unless every other column is
unchanged and each of ``from_uri``/``request_uri`` was NULL or is unchanged (``OLD.x IS
NULL OR NEW.x IS NOT DISTINCT FROM OLD.x``); or a row-level security policy ``FOR
UPDATE USING (from_uri IS NULL OR request_uri IS NULL)`` plus that trigger for the
filled one; or a ``SECURITY DEFINER`` fill function as the only UPDATE path.

Control (``test_control_the_nodes_account_fills_an_answers_missing_sender``): on the
same set-up the nodes' account stores an answer read without its transaction (no
sender), and a copy with the sender fills it; a third copy with another sender
changes nothing (the product's own statement only ever fills).

Hole 3 (``test_hole_owner_url_over_tables_the_nodes_own_says_done_and_leaves_them``)

Attacker: the same insider (the nodes' password), on every deployment made before
this fix: ``db init`` alone made the tables as the nodes' account (review 73).  The
operator follows the README and moves them to an owner with ``e2m-proxy db upgrade
--owner-url``, naming the cluster's administrative account (a superuser, the one that
can act on tables another role owns).

Messages: ``db upgrade --config PROXY.toml --owner-url postgres://ADMIN@...``
(exit 0, "tables owned by ADMIN; NODE may only read, add rows and fill a copy's
sender and Request-URI"); then, over the nodes' account, ``GRANT ALL ON bodies TO
CURRENT_USER`` and ``UPDATE bodies SET plaintext = ...``.

Effect: the tables are still the nodes' (``_grant`` only REVOKEs and GRANTs; it never
``ALTER TABLE ... OWNER TO``), and an owner may grant itself back whatever was
revoked: the history is rewritten after the command said it was protected.
At fault: ``kamailio_app/db_cmd.py`` ``_grant`` (and the ``out.append("... tables owned
by {owner.user} ...")`` line): ownership is assumed, never checked or transferred.
Fix: in ``_grant``, ``ALTER TABLE ... OWNER TO`` the owner for each shared table (and
sequence) the nodes' account owns (possible for a superuser or a member of both
roles), else refuse with a clear message; and check ``pg_tables.tableowner`` before
printing that the owner has them.

Control (``test_control_owner_url_with_a_plain_owner_refuses_node_owned_tables``): the
same upgrade with a plain (non-superuser) owner account fails, so the operator is not
told anything false there (today it fails with an uncaught ``InsufficientPrivilege``
traceback from ``archive_schema.read_version``, not a line saying why: no security
effect, noted).  The README gives no way to move an existing deployment's tables.

Tried and held (read unless said):
- DELETE on ``replay_claims``: a node needs it (the timer's sweep), and the claim
  clock is the node's own, so the account can end any claim anyway (UPDATE of
  ``expires``); the claims only close review 37's race between two nodes (DMQ and
  each node's htable still hold the record), and an unreachable database is already
  a designed fallback to the node's own check: no replay passes that the designed
  fallback would not let pass.
- The certificate tables: the nodes write and delete them by design (PUBLISH,
  expiry); a row rewritten there still goes through the phone's certificate checks
  (chain, AoR, not older than one held): a denial of service at most, which the
  account's password gives anyway.
- ``REVOKE CREATE ON SCHEMA public``: PostgreSQL 15 (as here) gives PUBLIC no CREATE
  on ``public``, and the owner owns the database's ``public`` (pg_database_owner);
  on PostgreSQL 14 and older PUBLIC keeps CREATE, which a REVOKE from the role does
  not remove (noted for the README, not run).
- SQL injection through the role or table names: every name goes through
  ``sql.Identifier``; ``_NODE_GRANTS``' privilege text is a constant.
- Sequences: ``USAGE`` allows ``nextval``/``currval``, not ``setval`` (UPDATE): ids can
  be skipped (gaps), never rewound onto an existing row.
- ``E2M_OWNER_PASSWORD``: read from the environment, never printed (URLs masked);
  ``db init`` starts no child process that would inherit it.

Fixed (stop 32): ``db_cmd._grant`` takes every table and sequence over for the owner
(or refuses, naming ``REASSIGN OWNED BY``), checks that before it says so, and adds a
trigger owned by the owner that lets a row's ``from_uri`` and ``request_uri`` be
filled once and never changed; both holes turned XPASS and the markers are gone.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import pytest

from e2m_lab.postgres import HOST, PostgresServer
from e2m_lab.tomlfile import toml_text
from e2m_plugins.cli import main as e2m_main
from kamailio_app.archive import BodyRecord, MediaRecord
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.pgconn import PgUrl, connect

pytestmark = pytest.mark.postgres


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "PROXY.toml"
    path.write_text(toml_text({
        "kamailio": {"listen": ["udp:127.0.0.1:5070"], "domains": ["example.com"]},
        "e2m": {"enabled": False}, "archive": {}, "auth": {}, "cluster": {"db_url": url}}))
    path.chmod(0o600)
    return path


def _roles(postgres: PostgresServer, *, database_owner: str) -> dict[str, str]:
    """A nodes' role and an owner role with passwords, and a database owned by
    ``database_owner`` ("node" or "owner"); their names and URLs."""
    tag = secrets.token_hex(3)
    names = {"node": f"node{tag}", "owner": f"owner{tag}", "db": f"arch{tag}"}
    node_pw, owner_pw = secrets.token_hex(12), secrets.token_hex(12)
    postgres.psql(f"CREATE ROLE {names['node']} LOGIN PASSWORD '{node_pw}';\n"
                  f"CREATE ROLE {names['owner']} LOGIN PASSWORD '{owner_pw}';\n"
                  f'CREATE DATABASE "{names["db"]}" OWNER {names[database_owner]};\n',
                  database="postgres")
    names.update(
        node_url=f"postgres://{names['node']}:{node_pw}@{HOST}:{postgres.port}/{names['db']}",
        owner_url=f"postgres://{names['owner']}@{HOST}:{postgres.port}/{names['db']}",
        owner_pw=owner_pw)
    return names


def _body(call_id: str, *, status=None, from_uri="sip:carol@example.com") -> BodyRecord:
    text = f"carol: message {call_id}".encode()
    return BodyRecord(call_id=call_id, from_uri=from_uri, to_uri="sip:dave@example.com",
                      method="MESSAGE", direction="request" if status is None else "response",
                      status=status, content_type="text/plain", plaintext=text,
                      sha256=hashlib.sha256(text).hexdigest(), signature="verified",
                      signer="sip:carol@example.com")


def _owned(tmp_path, postgres, monkeypatch, capsys) -> tuple[dict[str, str], Path]:
    from kamailio_app.db_cmd import main as db_main
    roles = _roles(postgres, database_owner="owner")
    monkeypatch.setenv("E2M_OWNER_PASSWORD", roles["owner_pw"])
    config = _config(tmp_path, roles["node_url"])
    assert db_main(["init", "--config", str(config), "--owner-url", roles["owner_url"]]) == 0
    assert "may only read, add rows" in capsys.readouterr().out
    return roles, config


def test_control_the_nodes_account_fills_an_answers_missing_sender(
        tmp_path, postgres, monkeypatch, capsys):
    roles, config = _owned(tmp_path, postgres, monkeypatch, capsys)
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    unread = _body("a1@carol", status=200, from_uri=None)   # read without its transaction
    uid = archive.record([unread], [])
    assert archive.record([_body("a1@carol", status=200, from_uri="sip:dave@example.com")],
                          [], uid=uid) == uid
    assert archive.record([_body("a1@carol", status=200, from_uri="sip:eve@example.com")],
                          [], uid=uid) == uid
    archive.close()
    capsys.readouterr()
    assert e2m_main(["archive", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert "sip:dave@example.com" in listing and "eve" not in listing


def test_hole_the_nodes_account_rewrites_the_sender_of_archived_rows(
        tmp_path, postgres, monkeypatch, capsys):
    import psycopg
    roles, config = _owned(tmp_path, postgres, monkeypatch, capsys)
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    archive.record([_body("c1@carol")], [])
    archive.record([_body("c2@carol")], [])
    archive.close()

    done = []
    with connect(PgUrl.parse(roles["node_url"]), autocommit=True) as conn:
        for statement, args in (
                ("UPDATE bodies SET from_uri = %s WHERE call_id = %s",
                 ("sip:bob@example.com", "c1@carol")),
                ("UPDATE bodies SET from_uri = NULL, request_uri = NULL WHERE call_id = %s",
                 ("c2@carol",))):
            try:
                if conn.execute(statement, args).rowcount:
                    done.append(statement)
            except psycopg.errors.Error:
                pass
    capsys.readouterr()
    assert e2m_main(["archive", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    print(listing)
    assert not done, (f"the nodes' account changed {len(done)} archived rows' sender: "
                      f"e2m archive list now says\n{listing}")


def test_control_owner_url_with_a_plain_owner_refuses_node_owned_tables(
        tmp_path, postgres, monkeypatch, capsys):
    import psycopg
    from kamailio_app.db_cmd import main as db_main
    roles = _roles(postgres, database_owner="node")
    config = _config(tmp_path, roles["node_url"])
    assert db_main(["init", "--config", str(config)]) == 0          # before the fix
    assert "warning" in capsys.readouterr().out
    monkeypatch.setenv("E2M_OWNER_PASSWORD", roles["owner_pw"])
    try:
        code = db_main(["upgrade", "--config", str(config), "--owner-url", roles["owner_url"]])
    except psycopg.errors.InsufficientPrivilege as exc:     # today: a traceback, not a line
        code = f"uncaught {type(exc).__name__}"
    out = capsys.readouterr()
    print(code, out.out, out.err)
    assert code != 0
    assert "tables owned by" not in out.out


def test_hole_owner_url_over_tables_the_nodes_own_says_done_and_leaves_them(
        tmp_path, postgres, monkeypatch, capsys):
    import psycopg
    from kamailio_app.db_cmd import main as db_main
    roles = _roles(postgres, database_owner="node")
    config = _config(tmp_path, roles["node_url"])
    assert db_main(["init", "--config", str(config)]) == 0          # before the fix
    archive = PostgresArchive(PgUrl.parse(roles["node_url"]))
    archive.record([_body("c1@carol")], [])
    archive.close()
    capsys.readouterr()
    admin = PgUrl.parse(postgres.url_for(roles["db"]))             # the cluster's superuser
    monkeypatch.setenv("E2M_OWNER_PASSWORD", admin.password)
    admin_url = f"postgres://{admin.user}@{HOST}:{postgres.port}/{roles['db']}"
    code = db_main(["upgrade", "--config", str(config), "--owner-url", admin_url])
    said = capsys.readouterr().out
    print(said)
    forged = b"carol: I will not wire any money"
    rewritten = False
    with connect(PgUrl.parse(roles["node_url"]), autocommit=True) as conn:
        try:
            conn.execute("GRANT ALL ON bodies TO CURRENT_USER")
            rewritten = conn.execute(
                "UPDATE bodies SET plaintext = %s, sha256 = %s WHERE call_id = %s",
                (forged, hashlib.sha256(forged).hexdigest(), "c1@carol")).rowcount == 1
        except psycopg.errors.Error:
            pass
    assert code != 0 or not rewritten, (
        f"db upgrade --owner-url exited {code} saying {said.strip()!r}, and the nodes' "
        "account rewrote carol's archived message")
