"""The archive on a real PostgreSQL, without Kamailio: ``e2m-proxy db init|upgrade|status``
(versioned, idempotent, from several nodes at once, from an old SQLite file too), the
rows read back by ``e2m archive``, every wait bounded when the server freezes, and a
replay that never stores a message twice."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from e2m_lab.kamailio_harness import ROOT
from e2m_lab.tomlfile import write_toml
from e2m_plugins.cli import main as e2m_main
from kamailio_app.archive import ArchiveUnavailable, BodyRecord, MediaRecord, SqliteArchive
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.archive_schema import ARCHIVE_VERSION, migrate
from kamailio_app.archive_spool import ArchiveEvents, SpooledArchive, SpoolFile
from kamailio_app.pgconn import PgUrl, connect

pytestmark = pytest.mark.postgres

def _config(tmp_path: Path, url: str | None, **archive: object) -> Path:
    sections: dict = {"kamailio": {"listen": ["udp:127.0.0.1:5070"], "domains": ["example.com"]},
                      "e2m": {"enabled": False}, "archive": dict(archive), "auth": {}}
    if url:
        sections["cluster"] = {"db_url": url}
    return write_toml(tmp_path / "PROXY.toml", sections)     # 0600: it holds a password


def _db(config: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "db", *command,
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def _body(text: bytes, call_id: str = "c@x") -> BodyRecord:
    return BodyRecord(call_id=call_id, from_uri="sip:alice@example.com",
                      to_uri="sip:bob@example.com", method="INVITE", direction="request",
                      content_type="application/sdp", plaintext=text, sha256="0" * 64,
                      signature="valid", signer="sip:alice@example.com")


def _media(call_id: str = "c@x", port: int = 4000) -> MediaRecord:
    return MediaRecord(call_id=call_id, method="INVITE", direction="request", media="audio",
                       address="127.0.0.1", port=port, port_count=1, proto="RTP/AVP",
                       codecs="0 PCMU/8000", flow="sendrecv")


def test_db_init_and_upgrade_are_versioned_and_idempotent(tmp_path, pg_url, postgres):
    config = _config(tmp_path, pg_url)
    assert _db(config, "status").returncode == 1             # nothing there yet
    upgrade_nothing = _db(config, "upgrade")
    assert upgrade_nothing.returncode == 1 and "db init" in upgrade_nothing.stderr
    first = _db(config, "init")
    assert first.returncode == 0, first.stderr
    assert f"created (schema version 0 -> {ARCHIVE_VERSION})" in first.stdout
    assert "created version, subscriber" in first.stdout        # Kamailio's auth_db tables
    again = _db(config, "init")
    assert again.returncode == 0 and "already at schema version" in again.stdout
    assert "subscriber table present" in again.stdout
    assert _db(config, "upgrade").returncode == 0
    status = _db(config, "status")
    assert status.returncode == 0 and f"schema version {ARCHIVE_VERSION}" in status.stdout
    database = PgUrl.parse(pg_url).database
    assert postgres.psql("SELECT component, version FROM schema_version",
                         database=database).split() == [f"archive|{ARCHIVE_VERSION}"]
    assert postgres.psql("SELECT table_version FROM version WHERE table_name = 'subscriber'",
                         database=database).strip() == "7"
    for out in (first, again, status):
        assert PgUrl.parse(pg_url).password not in out.stdout + out.stderr


def test_an_older_shared_schema_is_upgraded_step_by_step_and_refused_until_then(tmp_path, pg_url):
    url = PgUrl.parse(pg_url)
    with connect(url, autocommit=True) as conn:
        assert migrate(conn, "postgres", target=1) == (0, 1)
    config = _config(tmp_path, pg_url)
    init = _db(config, "init")
    assert init.returncode == 1 and "run e2m-proxy db upgrade" in init.stderr
    with pytest.raises(Exception, match="version 1, this e2m-proxy needs"):
        PostgresArchive(url).ensure_schema()     # a proxy would refuse to start
    upgraded = _db(config, "upgrade")
    assert upgraded.returncode == 0 and f"upgraded (schema version 1 -> {ARCHIVE_VERSION})" \
        in upgraded.stdout
    archive = PostgresArchive(url)
    archive.ensure_schema()                      # the proxy's own check passes now
    uid = archive.record([_body(b"after the upgrade")], [_media()])
    assert archive.bodies()[0].message_uid == uid


def test_several_nodes_may_run_init_at_once(tmp_path, pg_url):
    configs = []
    for n in range(3):
        (tmp_path / f"n{n}").mkdir()
        configs.append(_config(tmp_path / f"n{n}", pg_url))
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda c: _db(c, "init"), configs))
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    assert sum("created (schema" in r.stdout for r in results) == 1


def test_db_upgrade_brings_an_sqlite_archive_from_before_versioning_up_to_date(tmp_path):
    path = tmp_path / "archive.sqlite"
    with sqlite3.connect(path, isolation_level=None) as old:    # as releases before made it
        migrate(old, "sqlite", target=1)
        old.execute("DROP TABLE schema_version")
        old.execute("INSERT INTO bodies (time, call_id, method, direction, content_type, "
                    "plaintext, sha256, signature) VALUES (1, 'old@x', 'MESSAGE', 'request', "
                    "'text/plain', x'6f6c64', '', 'none')")
    path.chmod(0o600)
    config = _config(tmp_path, None, path="archive.sqlite")
    status = _db(config, "status")
    assert status.returncode == 1 and "schema version 1" in status.stdout
    done = _db(config, "upgrade")
    assert done.returncode == 0 and f"upgraded (schema version 1 -> {ARCHIVE_VERSION})" \
        in done.stdout
    assert "already at" in _db(config, "upgrade").stdout
    assert SqliteArchive(path).bodies()[0].plaintext == b"old"


def test_round_trip_and_e2m_archive_reads_the_shared_archive(tmp_path, pg_url, capsys):
    config = _config(tmp_path, pg_url)
    assert _db(config, "init").returncode == 0
    archive = PostgresArchive(PgUrl.parse(pg_url))
    uid = archive.record([_body(b"v=0 offer\r\n", "call-1@x")],
                         [_media("call-1@x"), _media("call-1@x", 4002)])
    archive.record([_body(b"other", "call-2@x")])
    assert e2m_main(["archive", "list", "--config", str(config), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["call_id"] for row in listed] == ["call-1@x", "call-2@x"]
    assert listed[0]["message"] == uid and "plaintext" not in listed[0]
    out = tmp_path / "text"
    assert e2m_main(["archive", "show", str(listed[0]["id"]), "--config", str(config),
                     "--json", "--out", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [m["port"] for m in shown["media"]] == [4000, 4002]
    assert out.read_bytes() == b"v=0 offer\r\n"


def test_a_frozen_database_holds_a_writer_for_at_most_its_timeouts(tmp_path, own_postgres):
    """SIGSTOP: connections stay open and nothing answers (no reset, no refusal)."""
    url = PgUrl.parse(own_postgres.url)
    config = _config(tmp_path, own_postgres.url)
    assert _db(config, "init").returncode == 0
    archive = PostgresArchive(url, statement_timeout_ms=1000)
    archive.record([_body(b"before")])            # a connection is open
    own_postgres.pause()
    try:
        for what in ("open connection", "new connection"):
            started = time.monotonic()
            with pytest.raises(ArchiveUnavailable):
                archive.record([_body(b"frozen")])
            took = time.monotonic() - started
            print(f"\nfrozen database, {what}: gave up after {took:.2f} s")
            assert took < 3.5, f"{what}: {took:.1f} s"
    finally:
        own_postgres.resume()
    archive.record([_body(b"after")])             # reconnects by itself
    assert [r.plaintext for r in archive.bodies()] == [b"before", b"after"]


def test_replay_into_postgres_is_whole_ordered_and_never_twice(tmp_path, own_postgres):
    url = PgUrl.parse(own_postgres.url)
    assert _db(_config(tmp_path, own_postgres.url), "init").returncode == 0
    lines: list[str] = []
    spooled = SpooledArchive(PostgresArchive(url), SpoolFile(tmp_path / "spool.sqlite"),
                             events=ArchiveEvents(log=lambda level, line: lines.append(line)))
    spooled.record([_body(b"first")], [_media()])
    own_postgres.kill()
    uids = [spooled.record([_body(b"during %d" % i)], [_media(), _media(port=4002)])
            for i in range(5)]
    assert spooled.pending() == 5
    # one message went in already and its spool copy stayed (a replay cut off)
    own_postgres.start()
    PostgresArchive(url).record(*spooled.spool.message(uids[0]), uid=uids[0])
    assert spooled.replay() == 5 and spooled.pending() == 0
    shared = PostgresArchive(url)
    rows = shared.bodies()
    assert [r.plaintext for r in rows] == [b"first"] + [b"during %d" % i for i in range(5)]
    assert len(shared.media()) == 1 + 2 * 5
    assert spooled.replay() == 0
    assert not any(b"during".decode() in line for line in lines)


def test_a_missing_table_keeps_the_spool_waiting_and_loses_nothing(tmp_path, pg_url):
    """Not every error of the database is about the rows: a table that is not there
    (yet, or dropped by mistake) must leave the spool for later, not empty it as lost."""
    url = PgUrl.parse(pg_url)
    lines: list[tuple[str, str]] = []
    events = ArchiveEvents(log=lambda level, line: lines.append((level, line)))
    spooled = SpooledArchive(PostgresArchive(url), SpoolFile(tmp_path / "spool.sqlite"),
                             events=events)
    uids = [spooled.record([_body(b"waiting %d" % n)], [_media()]) for n in range(3)]
    assert spooled.pending() == 3                  # no schema: spooled, not lost
    assert spooled.replay() == 0 and spooled.pending() == 3
    assert "e2m_archive_lost" not in spooled.events.counts
    assert _db(_config(tmp_path, pg_url), "init").returncode == 0
    assert spooled.replay() == 3
    assert [r.message_uid for r in PostgresArchive(url).bodies()] == uids
    assert not [line for level, line in lines if level == "error"]
