"""The pure parts of the shared store, without PostgreSQL: ``[cluster]`` in PROXY.toml,
the db_url (one URL, two clients, the password masked everywhere), the versioned
schema on SQLite (the file from before versioning is upgraded in place), and the
spool's decisions against a stand-in database that fails on command."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from kamailio_app.archive import (ArchiveError, ArchiveUnavailable, BodyRecord, MediaRecord,
                                  SqliteArchive)
from kamailio_app.archive_schema import ARCHIVE_VERSION, STEPS, SchemaError, migrate, read_version
from kamailio_app.archive_spool import ArchiveEvents, SpooledArchive, SpoolFile
from kamailio_app.config import AppConfigError, parse_app_config
from kamailio_app.launcher import mask_passwords, render_cfg
from kamailio_app.pgconn import PgUrl, PgUrlError, passfile_text

LISTEN = {"listen": ["udp:127.0.0.1:5070"], "domains": ["example.com"]}
URL = "postgres://e2m:s3cret%40pw@db.example.net:5433/e2m"


def _config(tmp_path: Path, **sections):
    return parse_app_config({"kamailio": LISTEN, **sections}, tmp_path / "PROXY.toml")


# --------------------------------------------------------------------------- db_url

def test_the_url_is_split_once_and_the_password_never_shown():
    url = PgUrl.parse(URL)
    assert (url.user, url.password, url.host, url.port, url.database) == \
        ("e2m", "s3cret@pw", "db.example.net", 5433, "e2m")       # percent-decoded
    assert url.kamailio_url() == "postgres://e2m@db.example.net:5433/e2m"
    for shown in (url.masked(), str(url), repr(url)):
        assert "s3cret" not in shown and "***" in shown
    assert PgUrl.parse("postgresql://u:p@127.0.0.1/d").port == 5432
    params = url.params(connect_timeout=1, statement_timeout_ms=1500)
    assert params["connect_timeout"] == 2            # libpq's floor
    assert "statement_timeout=1500" in params["options"]
    assert passfile_text(PgUrl.parse("postgres://u:a%3Ab%5Cc@h:1/d")) == "h:1:d:u:a\\:b\\\\c\n"


@pytest.mark.parametrize("bad", [
    "mysql://u:p@h/d", "postgres://u:p@h", "postgres://u:p@h:99999/d", "postgres://u%22:p@h/d",
    "postgres://u:p@h/d;drop", "postgres://u:p%0A@h/d", "postgres://u:p@h:5432/d b"])
def test_urls_kamailio_or_libpq_would_read_differently_are_refused(bad):
    with pytest.raises(PgUrlError) as caught:
        PgUrl.parse(bad)
    assert "p%0A" not in str(caught.value)


def test_cluster_section_and_its_defaults(tmp_path):
    config = _config(tmp_path, cluster={"db_url": URL}, archive={}, auth={})
    assert config.cluster.db.host == "db.example.net"
    assert (config.cluster.connect_timeout, config.cluster.statement_timeout_ms) == (2, 2000)
    archive = config.archive
    assert archive.shared and archive.enabled and archive.path is None
    assert archive.spool == tmp_path / "archive-spool.sqlite"
    assert (archive.spool_max, archive.spool_max_mb, archive.spool_share) == (10000, 256, 12)
    # the users go to the same database; Kamailio's URL has no password
    assert config.auth.pg == config.cluster.db and config.auth.users is None
    assert config.auth.db_url == "postgres://e2m@db.example.net:5433/e2m"
    assert config.auth.db_module == "db_postgres"


def test_without_cluster_nothing_changes(tmp_path):
    config = _config(tmp_path, archive={"path": "a.sqlite"}, auth={})
    assert config.cluster is None and not config.archive.shared
    assert config.archive.path == tmp_path / "a.sqlite"
    assert config.auth.users == tmp_path / "users.sqlite" and config.auth.pg is None
    plain = _config(tmp_path)
    assert not plain.archive.enabled


def test_cluster_mistakes_are_listed_at_once(tmp_path):
    with pytest.raises(AppConfigError) as caught:
        _config(tmp_path, cluster={"db_url": "postgres://u:p@h", "db_connect_timeout": 0,
                                   "dmq": 1},
                archive={"path": "a.sqlite", "spool": "no/such/dir/s.sqlite"},
                auth={"users": "u.sqlite"})
    text = str(caught.value)
    for word in ("db_url", "db_connect_timeout", "dmq"):
        assert word in text
    with pytest.raises(AppConfigError) as caught:
        _config(tmp_path, cluster={"db_url": URL}, archive={"path": "a.sqlite"},
                auth={"users": "u.sqlite"})
    assert "[archive] path" in str(caught.value) and "[auth] users" in str(caught.value)
    with pytest.raises(AppConfigError, match="spool_max: is used only with"):
        _config(tmp_path, archive={"path": "a.sqlite", "spool_max": 5})
    with pytest.raises(AppConfigError, match="spool_share: is used only with"):
        _config(tmp_path, archive={"path": "a.sqlite", "spool_share": 50})
    for bad in (0, 101):
        with pytest.raises(AppConfigError, match="spool_share"):
            _config(tmp_path, cluster={"db_url": URL}, archive={"spool_share": bad})


def test_rendered_cfg_has_no_password_and_print_cfg_masks_others(tmp_path):
    config = _config(tmp_path, cluster={"db_url": URL}, archive={}, auth={},
                     e2m={"enabled": True})
    text = render_cfg(config, tmp_path / "run")
    assert "s3cret" not in text
    assert '"postgres://e2m@db.example.net:5433/e2m"' in text
    assert f"passfile={tmp_path}/run/pgpass" in text
    assert "#!define WITH_POSTGRES" in text and "#!define WITH_SHARED_ARCHIVE" in text
    assert mask_passwords('modparam("auth_db", "db_url", "mysql://k:pw@h/d")') == \
        'modparam("auth_db", "db_url", "mysql://k:***@h/d")'


# --------------------------------------------------------------------------- schema

_V1_FILE = STEPS[1]["sqlite"]     # the archive as every release before versioning made it


def _body(text: bytes = b"words", call_id: str = "c@x") -> BodyRecord:
    return BodyRecord(call_id=call_id, from_uri="sip:alice@example.com",
                      to_uri="sip:bob@example.com", method="MESSAGE", direction="request",
                      content_type="text/plain", plaintext=text, sha256="0" * 64,
                      signature="valid")


def _media(call_id: str = "c@x") -> MediaRecord:
    return MediaRecord(call_id=call_id, method="INVITE", direction="request", media="audio",
                       address="127.0.0.1", port=4000, port_count=1, proto="RTP/AVP",
                       codecs="0 PCMU/8000")


def _old_archive(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.executescript(_V1_FILE)
        db.execute("INSERT INTO bodies (time, call_id, method, direction, content_type, "
                   "plaintext, sha256, signature) VALUES (1, 'old@x', 'MESSAGE', 'request', "
                   "'text/plain', x'6f6c64', '', 'none')")
    path.chmod(0o600)


def test_a_file_from_before_versioning_is_version_1_and_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    _old_archive(path)
    archive = SqliteArchive(path)
    assert archive.version() == 1
    assert archive.migrate(create=False) == (1, ARCHIVE_VERSION)
    assert archive.migrate(create=False) == (ARCHIVE_VERSION, ARCHIVE_VERSION)   # idempotent
    (old,) = archive.bodies()
    assert old.plaintext == b"old" and old.message_uid is None
    uid = archive.record([_body()], [_media()])
    rows = archive.bodies()
    assert rows[-1].message_uid == uid and archive.media()[0]["call_id"] == "c@x"


def test_the_proxy_upgrades_its_own_file_on_first_use(tmp_path):
    path = tmp_path / "old.sqlite"
    _old_archive(path)
    SqliteArchive(path).record([_body()])
    with sqlite3.connect(path) as db:
        assert read_version(db, "sqlite") == ARCHIVE_VERSION
        assert db.execute("SELECT version FROM schema_version WHERE component = 'archive'"
                          ).fetchone() == (ARCHIVE_VERSION,)


def test_upgrade_refuses_nothing_and_a_newer_schema(tmp_path):
    empty = sqlite3.connect(tmp_path / "empty.sqlite", isolation_level=None)
    with pytest.raises(SchemaError, match="db init"):
        migrate(empty, "sqlite", create=False)
    migrate(empty, "sqlite")
    empty.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(SchemaError, match="newer"):
        migrate(empty, "sqlite")


def test_one_message_is_stored_once_whatever_replays_it(tmp_path):
    archive = SqliteArchive(tmp_path / "a.sqlite")
    uid = archive.record([_body(b"one"), _body(b"two")], [_media()])
    assert archive.record([_body(b"one"), _body(b"two")], [_media()], uid=uid) == uid
    assert [r.plaintext for r in archive.bodies()] == [b"one", b"two"]
    assert len(archive.media()) == 1
    assert archive.oldest_messages(10) == [uid]
    bodies, media = archive.message(uid)
    assert [b.plaintext for b in bodies] == [b"one", b"two"] and media[0].port == 4000
    archive.forget(uid)
    assert archive.pending() == 0 and archive.bodies() == []


# --------------------------------------------------------------------------- the spool

class FlakyDatabase(SqliteArchive):
    """A stand-in for PostgreSQL: an SQLite archive that is 'away' while ``down``."""

    down = False
    refuse = False

    def record(self, bodies, media=(), *, uid=None, may_spool=True):
        if self.down:
            raise ArchiveUnavailable("shared archive write failed: connection refused")
        if self.refuse:
            raise ArchiveError("shared archive write failed: DataError: invalid byte")
        return super().record(bodies, media, uid=uid)


def _spooled(tmp_path: Path, **settings) -> tuple[SpooledArchive, FlakyDatabase, list]:
    lines: list[tuple[str, str]] = []
    shared = FlakyDatabase(tmp_path / "shared.sqlite")
    spool = SpoolFile(tmp_path / "spool.sqlite")
    events = ArchiveEvents(log=lambda level, line: lines.append((level, line)))
    return SpooledArchive(shared, spool, events=events, **settings), shared, lines


def test_while_the_database_is_away_messages_wait_in_order_and_go_in_once(tmp_path):
    archive, shared, lines = _spooled(tmp_path)
    archive.record([_body(b"m0")])
    shared.down = True
    uids = [archive.record([_body(b"m%d" % i)], [_media()]) for i in range(1, 4)]
    assert archive.pending() == 3 and archive.events.counts == {"e2m_archive_spooled": 3}
    assert archive.replay() == 0                      # still away: nothing moves
    assert [level for level, _ in lines].count("warn") == 1
    assert archive.replay() == 0
    assert [level for level, _ in lines].count("warn") == 1     # said once, not every tick
    shared.down = False
    archive.record([_body(b"m4")])                    # joins the spool: order is kept
    assert archive.pending() == 4
    assert archive.replay() == 4 and archive.pending() == 0
    assert [r.plaintext for r in shared.bodies()] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert [r.message_uid for r in shared.bodies()][1:4] == uids
    assert len(shared.media()) == 3
    assert archive.events.counts["e2m_archive_replayed"] == 4
    assert not any(b"m1".decode() in line for _, line in lines)   # ids, never text
    assert any("reachable again" in line for _, line in lines)


def test_a_replay_cut_between_commit_and_forget_stores_nothing_twice(tmp_path):
    archive, shared, _ = _spooled(tmp_path)
    shared.down = True
    uid = archive.record([_body(b"once")], [_media()])
    shared.down = False
    shared.record(*archive.spool.message(uid), uid=uid)   # committed, then "crashed"
    assert archive.replay() == 1
    assert [r.plaintext for r in shared.bodies()] == [b"once"] and len(shared.media()) == 1


def test_a_request_that_must_be_archived_is_refused_not_spooled(tmp_path):
    archive, shared, _ = _spooled(tmp_path, retry_after=60)
    shared.down = True
    with pytest.raises(ArchiveUnavailable):
        archive.record([_body()], may_spool=False)
    assert archive.pending() == 0
    shared.down = False              # resting: no second try for retry_after seconds
    with pytest.raises(ArchiveUnavailable):
        archive.record([_body()], may_spool=False)
    assert shared.bodies() == []


def test_what_fits_nowhere_is_lost_and_said_with_its_id(tmp_path):
    # one sender: the node's bound, not a share (tests/unit/test_spool_share.py)
    archive, shared, lines = _spooled(tmp_path, max_messages=2, share_percent=100)
    shared.down = True
    kept = [archive.record([_body(b"k%d" % i)]) for i in range(2)]
    lost = archive.record([_body(b"secret text", call_id="full@x")], [_media("full@x")])
    assert archive.pending() == 2 and archive.events.counts["e2m_archive_lost"] == 1
    (line,) = [line for level, line in lines if level == "error"]
    assert lost in line and "full@x" in line and "spool is full" in line
    assert "secret" not in line and lost not in kept
    # rows the database refuses for good are lost too, once, and leave the spool
    shared.down, shared.refuse = False, True
    assert archive.replay() == 2 and archive.pending() == 0
    assert archive.events.counts["e2m_archive_lost"] == 3
    # no spool at all
    nospool = SpooledArchive(shared, None, events=ArchiveEvents(log=lambda *a: None))
    shared.refuse, shared.down = False, True
    nospool.record([_body()])
    assert nospool.events.counts == {"e2m_archive_lost": 1}


def test_the_spool_file_is_private(tmp_path):
    archive, shared, _ = _spooled(tmp_path)
    shared.down = True
    archive.record([_body()])
    assert stat.S_IMODE((tmp_path / "spool.sqlite").stat().st_mode) == 0o600
