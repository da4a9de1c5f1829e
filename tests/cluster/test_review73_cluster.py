"""A seventy-third attacker's review (December 2026) of 06451c8: secure defaults and what an
operator actually deploys; here the shared archive's PostgreSQL role (``e2m-proxy db
init``, ``archive_schema``, ``archive_pg``).  The unit holes are in
``tests/unit/test_review73.py``.

Hole 4 (``test_hole_the_proxys_database_role_rewrites_and_deletes_archived_history``):
the attacker is an insider UA (or anyone, hole 2 of the unit module) who got the
credentials every node holds in PROXY.toml (``[cluster] db_url``).  The README has the
operator run ``e2m-proxy db init`` and every node with that one URL, so the proxy's role
owns ``bodies`` and ``media``.  With it he connects and (1) rewrites his own archived
MESSAGE (``UPDATE bodies SET plaintext = ..., sha256 = <its new digest>``: the row still
says ``signature verified``, ``signer`` his AoR), and (2) deletes another of his
messages and its media rows.  ``e2m archive show`` then prints the rewritten row as
verified and the deleted one is gone, with nothing anywhere telling the archive's reader
(an archive row missed or misattributed, unnoticed).  Nothing in the product needs
those rights on the shared archive: the nodes only INSERT, fill two empty columns of a
copy (``ON CONFLICT ... DO UPDATE SET from_uri = COALESCE(...), request_uri = ...``) and
read; DELETE is the SQLite spool's (``forget``), never PostgreSQL's.
At fault: ``kamailio_app/archive_schema.py`` ``migrate`` (tables created by, so owned by,
the role in ``db_url``) with ``db_cmd`` using the nodes' own URL for ``init``/
``upgrade``, and no integrity mark on a row.  Fix: ``db init`` under an owner role
(``--admin-url``) that grants the nodes' role ``SELECT, INSERT`` and ``UPDATE
(from_uri, request_uri)`` on ``bodies`` (``SELECT, INSERT`` on ``media``, the claims
what they need), no DELETE and no ownership; and/or chain each row to the previous one
with an HMAC under a key derived from the proxy's private key, checked by ``e2m
archive`` (which flags a row that does not check).

Control (``test_control_the_proxys_role_writes_and_reads_the_archive``): the same role
and database, after ``db init``, take a message the way a node writes it (and a second
copy fills nothing twice), and ``e2m archive list`` reads it back.

Tried and held: ``db status``/``init`` print the URL masked; the password is never in
argv (psycopg gets it as a parameter, Kamailio a 0600 pgpass).

Fixed (stop 32): ``e2m-proxy db init --owner-url`` makes the shared tables as an
owner account and grants the nodes' account only reads, inserts and the two fields a
copy fills (``db_cmd._grant``); the certificate tables are only read at a node's
start when present.  The hole test now uses that set-up (the UPDATE and both DELETEs
refused); a control shows the restricted account still records and lists, and an end
to end test runs two real nodes on it.  ``db init`` without ``--owner-url`` warns.
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


def _operator_database(postgres: PostgresServer) -> str:
    """What the README's operator makes: a login role for the nodes and a database it
    owns (``createuser e2m; createdb -O e2m e2m``); the URL every PROXY.toml carries."""
    role, name = f"node{secrets.token_hex(3)}", f"arch{secrets.token_hex(3)}"
    password = secrets.token_hex(12)
    postgres.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}';\n"
                  f'CREATE DATABASE "{name}" OWNER {role};\n', database="postgres")
    return f"postgres://{role}:{password}@{HOST}:{postgres.port}/{name}"


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "PROXY.toml"
    path.write_text(toml_text({
        "kamailio": {"listen": ["udp:127.0.0.1:5070"], "domains": ["example.com"]},
        "e2m": {"enabled": False}, "archive": {}, "auth": {}, "cluster": {"db_url": url}}))
    path.chmod(0o600)
    return path


def _message(text: bytes, call_id: str) -> tuple[list[BodyRecord], list[MediaRecord]]:
    body = BodyRecord(call_id=call_id, from_uri="sip:carol@example.com",
                      to_uri="sip:bob@example.com", method="MESSAGE", direction="request",
                      content_type="text/plain", plaintext=text,
                      sha256=hashlib.sha256(text).hexdigest(), signature="verified",
                      signer="sip:carol@example.com")
    media = MediaRecord(call_id=call_id, method="INVITE", direction="request", media="audio",
                        address="127.0.0.1", port=4000, port_count=1, proto="RTP/AVP",
                        codecs="0 PCMU/8000", flow="sendrecv")
    return [body], [media]


def _init(tmp_path: Path, url: str) -> Path:
    from kamailio_app.db_cmd import main as db_main
    config = _config(tmp_path, url)
    assert db_main(["init", "--config", str(config)]) == 0
    return config


def _owned_database(postgres: PostgresServer, monkeypatch) -> tuple[str, str]:
    """The fix's set-up (kamailio_app/README.md, "The shared database's roles"): an
    owner account owns the database; the nodes' account may only connect.  Returns
    (the nodes' URL, the owner's URL without its password, which db init reads from
    E2M_OWNER_PASSWORD)."""
    tag = secrets.token_hex(3)
    node, owner, name = f"node{tag}", f"owner{tag}", f"arch{tag}"
    node_pw, owner_pw = secrets.token_hex(12), secrets.token_hex(12)
    postgres.psql(f"CREATE ROLE {node} LOGIN PASSWORD '{node_pw}';\n"
                  f"CREATE ROLE {owner} LOGIN PASSWORD '{owner_pw}';\n"
                  f'CREATE DATABASE "{name}" OWNER {owner};\n', database="postgres")
    monkeypatch.setenv("E2M_OWNER_PASSWORD", owner_pw)
    return (f"postgres://{node}:{node_pw}@{HOST}:{postgres.port}/{name}",
            f"postgres://{owner}@{HOST}:{postgres.port}/{name}")


def _init_owned(tmp_path: Path, node_url: str, owner_url: str, capsys) -> Path:
    from kamailio_app.db_cmd import main as db_main
    config = _config(tmp_path, node_url)
    assert db_main(["init", "--config", str(config), "--owner-url", owner_url]) == 0
    assert "may only read, add rows" in capsys.readouterr().out
    return config


def test_control_the_nodes_account_of_an_owned_database_writes_and_reads(
        tmp_path, postgres, capsys, monkeypatch):
    """After the fix: with the tables owned by another account, the nodes' account
    still records a message (a copy stored once, its missing sender filled), and the
    archive CLI lists it."""
    node_url, owner_url = _owned_database(postgres, monkeypatch)
    config = _init_owned(tmp_path, node_url, owner_url, capsys)
    archive = PostgresArchive(PgUrl.parse(node_url))
    bodies, media = _message(b"carol: I will wire the money tomorrow", "c3@carol")
    uid = archive.record(bodies, media)
    assert archive.record(bodies, media, uid=uid) == uid
    archive.close()
    capsys.readouterr()
    assert e2m_main(["archive", "list", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("c3@carol") == 1


def test_control_the_proxys_role_writes_and_reads_the_archive(tmp_path, postgres, capsys):
    url = _operator_database(postgres)
    config = _init(tmp_path, url)
    archive = PostgresArchive(PgUrl.parse(url))
    bodies, media = _message(b"carol: I will wire the money tomorrow", "c1@carol")
    uid = archive.record(bodies, media)
    assert archive.record(bodies, media, uid=uid) == uid     # a copy: stored once
    archive.close()
    capsys.readouterr()
    assert e2m_main(["archive", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("c1@carol") == 1 and "verified" in out


def test_hole_the_proxys_database_role_rewrites_and_deletes_archived_history(
        tmp_path, postgres, capsys, monkeypatch):
    """The fix's set-up: db init --owner-url (the hole was shown with the nodes' account
    owning the tables, as `db init` alone still makes them, with a warning)."""
    import psycopg
    url, owner_url = _owned_database(postgres, monkeypatch)
    config = _init_owned(tmp_path, url, owner_url, capsys)
    archive = PostgresArchive(PgUrl.parse(url))
    archive.record(*_message(b"carol: I will wire the money tomorrow", "c1@carol"))
    archive.record(*_message(b"carol: delete the invoices before the audit", "c2@carol"))
    archive.close()

    refused = []
    forged = b"carol: I will not wire any money"
    with connect(PgUrl.parse(url), autocommit=True) as conn:     # the nodes' credentials
        for sql, args in (
                ("UPDATE bodies SET plaintext = %s, sha256 = %s WHERE call_id = %s",
                 (forged, hashlib.sha256(forged).hexdigest(), "c1@carol")),
                ("DELETE FROM bodies WHERE call_id = %s", ("c2@carol",)),
                ("DELETE FROM media WHERE call_id = %s", ("c2@carol",))):
            try:
                conn.execute(sql, args)
            except psycopg.errors.InsufficientPrivilege:
                refused.append(sql.split()[0])

    capsys.readouterr()
    assert e2m_main(["archive", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    out = tmp_path / "row1.txt"
    assert e2m_main(["archive", "show", "1", "--config", str(config), "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    noticed = any(word in (listing + shown).lower() for word in ("altered", "tamper", "missing",
                                                                 "does not check"))
    assert (len(refused) == 3) or noticed, (
        f"with the nodes' own db_url: refused {refused or 'nothing'}; the archive now shows "
        f"{out.read_bytes()!r} as carol's verified message and c2@carol is "
        f"{'gone' if 'c2@carol' not in listing else 'there'}, and e2m archive says nothing")


@pytest.mark.kamailio
@pytest.mark.slow
def test_a_cluster_on_an_owned_database_calls_and_archives(proxy_factory, postgres, tmp_path,
                                                           monkeypatch, pki, alice, bob):
    """The fix end to end: tables made by the owner account (db init --owner-url), two
    real nodes on the nodes' restricted account start (their own db init only finds
    the schema), a call offered at A and answered at B is archived, and that account
    still cannot rewrite the row."""
    import psycopg
    from e2m_lab.cluster import answers, register_bob, start_cluster
    from e2m_lab.cluster import VIEW
    from e2m_lab.kamailio_harness import write_proxy_config
    from kamailio_app.db_cmd import main as db_main
    node_url, owner_url = _owned_database(postgres, monkeypatch)
    # the operator's init: a node's own PROXY.toml (E2M on, so the certificate tables
    # too), with the owner's account
    config = write_proxy_config(tmp_path / "init", 5070, pki=pki, e2m=True, db_url=node_url,
                                view=VIEW)
    assert db_main(["init", "--config", str(config), "--owner-url", owner_url]) == 0
    a, b = start_cluster(proxy_factory, node_url).nodes
    register_bob(a, bob)
    bob.answer_to = b.port
    reply = alice.call(a)
    assert reply is not None and reply.status == 200
    assert answers(a, alice.call_id)
    with connect(PgUrl.parse(node_url), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE bodies SET plaintext = %s WHERE call_id = %s",
                         (b"forged", alice.call_id))

