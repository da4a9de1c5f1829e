"""Review 191: the shared archive's spool during a PostgreSQL outage, the PostgreSQL
rows and errors, on a real Kamailio node and a real PostgreSQL killed for the outage.

A stranger's plaintext MESSAGEs to bob (never challenged, archived whole): one whose
body is an SDES SDP (``a=crypto ... inline:<key>``), four text MESSAGEs in one Call-ID
(CSeq 1..4), a copy of the first (new Via branch, same Call-ID, tags and CSeq: what a
hop's or a restarted UA's resend is) and a second MESSAGE with the first's text under
another Call-ID.  PostgreSQL is killed before them and started again after.

Hole K1: the spool keeps every replayed message's plaintext after it is "empty"
- Attacker: none needed (an honest user's privacy against whoever later reads the
  node's disk or its backups; or an operator's deletion from the shared archive, e.g.
  a retention purge or a user's erasure request, which the node's copy survives).
- Messages: the 6 above during the outage; the database back; the replay empties the
  spool (``pending() == 0``, ``e2m_archive_spooled`` 7, ``e2m_archive_lost`` 0).
- Effect observed: after the catch-up the spool's ``archive-spool.sqlite-wal`` (0600,
  ~350 KB for 7 small messages) still held 12, 6, 6 and 6 copies of the four texts
  (and the SDP, keys excluded); SQLite neither overwrites deleted cells nor truncates
  its WAL, so a checkpoint later only moves them into the main file's free pages.
  They stay on the node until the pages happen to be reused.
- Code at fault: kamailio_app/archive.py:349-357 (``SqlArchive.forget``: a plain
  DELETE) and kamailio_app/archive.py:397-408 (``SqliteArchive._open``: no
  ``secure_delete``), used by kamailio_app/archive_spool.py:334 (``_replay_one``).
- Suggested fix: ``PRAGMA secure_delete = ON`` for the spool's connections
  (``SpoolFile._connect``) and, once a replay leaves the spool empty,
  ``PRAGMA wal_checkpoint(TRUNCATE)`` (the WAL's old frames still hold the pages as
  they were before the delete).
- Test: test_a_replayed_spool_keeps_no_plaintext_of_its_messages.

Controls
- test_control_outage_keeps_no_key_and_loses_or_doubles_nothing: while spooled, the
  spool's three files (main, -wal, -shm) are 0600 and hold the texts (plaintext at
  rest, as the archive itself) but 0 octets of the SRTP key; after the catch-up the
  PostgreSQL archive has 6 body rows: the SDP without its ``a=crypto`` line (its
  ``m=`` and ``a=rtpmap`` kept), each text once in CSeq order (ids ascending), the copy
  of CSeq 1 absorbed (``content_uid``) and the same text under another Call-ID its own
  row; 0 lost.
- test_control_postgres_errors_do_not_quote_row_contents: rows PostgreSQL refuses
  (a NUL in a text column, a port count out of ``integer`` range) raise
  ``ArchiveError`` whose text holds none of the row's marker values.

Tried and held
- Keys in the spool or the shared archive: ``without_keys`` runs before a record is
  made (e2m_plugins/proxy.py ``_seen``), so neither the spool (SQLite, 3 files) nor
  PostgreSQL ever saw the key: 0 occurrences while spooled and after.
- Spool bounds against a stranger: one file, ``spool_max``/``spool_max_mb`` with the
  unauthenticated group's 12 % share (tests/cluster/test_spool_share_wire.py); the
  WAL is bounded by SQLite's auto-checkpoint (1000 pages).
- Dedupe: a copy of a MESSAGE (same ids, new branch) is one row whether spooled or
  not; two MESSAGEs with the same text under different Call-IDs are two rows.
- Order: replayed in ``min(time)`` order, which is arrival order; PostgreSQL ids follow.

Fixed (stop 50): K1, the spool's SQLite file runs with ``secure_delete`` (a removed
message leaves no text in free pages), and once a replay empties it its write-ahead log
is folded in and emptied (``SpoolFile.scrub``: ``wal_checkpoint(TRUNCATE)``).  K2, the
CLI's ``--out -`` writes to a terminal each line through ``printable``
(``cli.for_terminal``, since review 193 every command's terminal: ``cli.terminal``); a
pipe or a file still gets the exact octets.  The hole tests
failed on the code before the fix and pass with it.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import Iterator

import pytest

from e2m_lab.kamailio_harness import ProxyHandle
from e2m_lab.postgres import PostgresServer
from e2m_lab.wire import transact
from e2m_plugins.sip import make_request
from kamailio_app.archive import ArchiveError, BodyRecord, MediaRecord
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.pgconn import PgUrl
from tests.cluster.test_cluster_wire import _home, _spool, _stat, _wait_caught_up

pytestmark = [pytest.mark.kamailio, pytest.mark.postgres]

KEY = "WVNfX19zZWNyZXRfa2V5X2Zvcl9yZXZpZXdfMTkxXw"      # a marker in the key's place
SPOOL_FILES = ("", "-wal", "-shm", "-journal")


def _sdp(tag: str) -> bytes:
    return ("v=0\r\no=eve 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            "m=audio 40000 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}\r\n"
            f"a=tool:{tag}\r\n").encode()


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()


def _send(proxy: ProxyHandle, body: bytes, ctype: str, *, call_id: str,
          cseq: int = 1) -> int | None:
    request = make_request("MESSAGE", "sip:bob@example.com",
                           from_uri="sip:eve@stranger.example.net",
                           to_uri="sip:bob@example.com", call_id=call_id, cseq=cseq,
                           from_tag="ft191", body=body, content_type=ctype)
    answer = transact(proxy.port, request, timeout=8)
    return answer.status if answer is not None else None


def _spool_files(proxy: ProxyHandle) -> dict[str, tuple[int, bytes]]:
    """The spool's files: suffix -> (mode, content)."""
    out = {}
    for suffix in SPOOL_FILES:
        path = proxy.directory / ("archive-spool.sqlite" + suffix)
        if path.exists():
            out[suffix or "main"] = (stat.S_IMODE(os.stat(path).st_mode), path.read_bytes())
    return out


def _outage(proxy_factory, own_pg):
    """The messages above during an outage; (proxy, texts, SDP tag, spool files while
    spooled, spool files after the catch-up)."""
    proxy, _uas = _home(proxy_factory, own_pg.url)
    own_pg.kill()
    tag = secrets.token_hex(4)
    cid = f"c191-{tag}@stranger.example.net"
    texts = [f"t-{tag}-{n}".encode() for n in range(4)]
    assert _send(proxy, _sdp(tag), "application/sdp", call_id="sdp-" + cid) == 200
    for n, text in enumerate(texts):
        assert _send(proxy, text, "text/plain", call_id=cid, cseq=n + 1) == 200
    assert _send(proxy, texts[0], "text/plain", call_id=cid, cseq=1) == 200     # a copy
    assert _send(proxy, texts[0], "text/plain", call_id="other-" + cid) == 200  # same text
    time.sleep(0.5)
    assert _spool(proxy).pending() == 6
    spooled = _spool_files(proxy)
    own_pg.start()
    time.sleep(0.5)
    _wait_caught_up(proxy, timeout=30.0)
    time.sleep(1.5)                  # the replay's own commit and any checkpoint
    return proxy, texts, tag, spooled, _spool_files(proxy)


@pytest.mark.slow
def test_a_replayed_spool_keeps_no_plaintext_of_its_messages(proxy_factory, own_pg):
    proxy, texts, tag, _spooled, after = _outage(proxy_factory, own_pg)
    assert _spool(proxy).pending() == 0
    left = {name: [data.count(text) for text in texts] for name, (_m, data) in after.items()}
    print(f"\nspool files after the catch-up: "
          f"{ {name: len(data) for name, (_m, data) in after.items()} }, texts left {left}")
    assert all(sum(counts) == 0 for counts in left.values()), left
    assert all(tag.encode() not in data for _m, data in after.values())


@pytest.mark.slow
def test_control_outage_keeps_no_key_and_loses_or_doubles_nothing(proxy_factory, own_pg):
    proxy, texts, tag, spooled, after = _outage(proxy_factory, own_pg)
    assert set(spooled) >= {"main", "-wal"}
    assert all(mode == 0o600 for mode, _data in spooled.values())
    assert sum(data.count(texts[1]) for _m, data in spooled.values()) >= 1   # at rest
    for files in (spooled, after):
        assert all(KEY.encode() not in data for _m, data in files.values())
    rows = proxy.archive_rows()
    assert all(KEY.encode() not in row.plaintext for row in rows)
    sdp = [row for row in rows if row.content_type == "application/sdp"]
    assert len(sdp) == 1 and b"a=crypto" not in sdp[0].plaintext
    assert b"m=audio 40000" in sdp[0].plaintext and b"a=rtpmap:0" in sdp[0].plaintext
    text_rows = [(row.call_id, row.plaintext) for row in rows
                 if row.content_type == "text/plain"]
    cid = f"c191-{tag}@stranger.example.net"
    assert text_rows == [(cid, t) for t in texts] + [("other-" + cid, texts[0])]
    assert [row.id for row in rows] == sorted(row.id for row in rows)
    assert _stat(proxy, "e2m_archive_lost") == 0


def test_control_postgres_errors_do_not_quote_row_contents(own_pg):
    store = PostgresArchive(PgUrl.parse(own_pg.url))
    store.migrate()
    marker = "zq191marker"
    body = BodyRecord(call_id=f"{marker}\x00@x", from_uri=f"sip:{marker}@x", to_uri=None,
                      method="MESSAGE", direction="request", content_type="text/plain",
                      plaintext=marker.encode(), sha256="0" * 64, signature="none")
    media = MediaRecord(call_id=f"{marker}@x", method="INVITE", direction="request",
                        media="audio", address="127.0.0.1", port=4000, port_count=2 ** 40,
                        proto="RTP/AVP", codecs=f"0 {marker}")
    texts = []
    for bodies, lines in (([body], []), ([], [media])):
        with pytest.raises(ArchiveError) as caught:
            store.record(bodies, lines)
        texts.append(str(caught.value))
    store.close()
    print("\n" + "\n".join(texts))
    assert all(marker not in text for text in texts)
