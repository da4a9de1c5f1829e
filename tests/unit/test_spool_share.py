"""Each sender's share of the node's spool (``kamailio_app/archive_spool.py``,
``[archive] spool_share``): by messages and by bytes, shared by every worker process,
given back as the spool drains.  The stand-in database and the record helpers are the
cluster unit tests'."""

from __future__ import annotations

import multiprocessing
import sqlite3
from dataclasses import replace

from kamailio_app.archive import SqliteArchive
from kamailio_app.archive_spool import SpooledArchive, SpoolFile, SpoolLimits, message_weight
from tests.cluster.test_cluster_units import FlakyDatabase, _body, _media, _spooled

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


def _lost(archive) -> int:
    return archive.events.counts.get("e2m_archive_lost", 0)


def test_a_share_is_a_percentage_of_each_bound_and_never_nothing():
    limits = SpoolLimits(max_messages=10000, max_bytes=256 * 1024 * 1024)
    assert (limits.share_messages, limits.share_bytes) == (1200, 32212254)
    assert SpoolLimits(3, 100, 12).share_messages == 1          # at least one message
    assert SpoolLimits(50, 1000, 100).share_messages == 50


def test_each_sender_stops_at_its_share_and_the_others_go_on(tmp_path):
    archive, shared, lines = _spooled(tmp_path, max_messages=50, share_percent=10)
    shared.down = True
    for n in range(8):
        archive.record([_body(b"a%d" % n, call_id=f"a{n}@x")], share=ALICE)
    assert archive.pending() == 5 and _lost(archive) == 3
    assert "over its share of the spool (5 messages" in lines[-1][1]
    for n in range(3):                                   # bob is unaffected
        archive.record([_body(b"b%d" % n, call_id=f"b{n}@x")], share=BOB)
    archive.record([_body(b"s", call_id="s@x")])         # no share: the stranger's group
    assert archive.pending() == 9 and _lost(archive) == 3


def test_a_share_counts_bytes_too(tmp_path):
    body = b"x" * 20_000
    archive, shared, _ = _spooled(tmp_path, max_bytes=1024 * 1024, share_percent=10)
    shared.down = True
    for n in range(10):
        archive.record([_body(body + b"%d" % n, call_id=f"a{n}@x")], share=ALICE)
    weight = message_weight([_body(body + b"0")], [])
    held = sqlite3.connect(archive.spool.path).execute(
        "SELECT count(*), sum(weight) FROM spool_shares WHERE share = ?", (ALICE,)).fetchone()
    # what her rows took (at least their columns' octets) fills her 104,857 bytes
    assert 3 <= held[0] <= (1024 * 1024 // 10) // weight < 10 and held[0] == archive.pending()
    assert held[1] <= 1024 * 1024 // 10 < held[1] + weight
    archive.record([_body(b"small", call_id="b@x")], share=BOB)
    assert archive.pending() == held[0] + 1


def test_a_response_without_a_caller_and_a_stranger_share_one_group(tmp_path):
    archive, shared, _ = _spooled(tmp_path, max_messages=20, share_percent=10)
    shared.down = True
    archive.record([_body(b"stray answer")], [_media()], share=None)
    archive.record([_body(b"stranger", call_id="s@x")], share="unauthenticated:")
    archive.record([_body(b"third", call_id="t@x")])
    assert archive.pending() == 2 and _lost(archive) == 1


def test_the_share_is_given_back_as_the_spool_drains(tmp_path):
    archive, shared, _ = _spooled(tmp_path, max_messages=20, share_percent=10)
    shared.down = True
    for n in range(3):
        archive.record([_body(b"a%d" % n, call_id=f"a{n}@x")], share=ALICE)
    assert archive.pending() == 2
    shared.down = False
    assert archive.replay() == 2 and archive.pending() == 0
    shared.down = True
    for n in range(3, 5):
        archive.record([_body(b"a%d" % n, call_id=f"a{n}@x")], share=ALICE)
    assert archive.pending() == 2 and _lost(archive) == 1
    count = sqlite3.connect(archive.spool.path).execute(
        "SELECT count(*) FROM spool_shares").fetchone()[0]
    assert count == 2                                     # no rows left for replayed ones


def test_a_spool_written_before_shares_replays_and_takes_shares(tmp_path):
    """A node upgraded with messages waiting: they have no share (count for the node's
    bounds only), are replayed as before, and new ones are charged to their sender."""
    old = SqliteArchive(tmp_path / "spool.sqlite")
    old.record([_body(b"old", call_id="old@x")], uid="c" + "0" * 40)
    old.close()
    shared = FlakyDatabase(tmp_path / "shared.sqlite")
    archive = SpooledArchive(shared, SpoolFile(tmp_path / "spool.sqlite"), max_messages=20,
                             share_percent=10)
    shared.down = True
    for n in range(3):
        archive.record([_body(b"a%d" % n, call_id=f"a{n}@x")], share=ALICE)
    assert archive.pending() == 3
    shared.down = False
    assert archive.replay() == 3
    assert [r.plaintext for r in shared.bodies()] == [b"old", b"a0", b"a1"]


def _worker(path: str, shared_path: str, worker: int, count: int) -> None:
    shared = FlakyDatabase(shared_path)
    shared.down = True
    archive = SpooledArchive(shared, SpoolFile(path), max_messages=100, share_percent=10)
    for n in range(count):
        archive.record([replace(_body(b"w%d-%d" % (worker, n), call_id=f"w{worker}-{n}@x"))],
                       share=ALICE)


def test_workers_in_separate_processes_never_overfill_a_share(tmp_path):
    """The check and the write are one transaction: four processes writing one sender's
    messages at once leave exactly the share (10 of 100), not one each over it."""
    path, shared_path = str(tmp_path / "spool.sqlite"), str(tmp_path / "shared.sqlite")
    SpoolFile(path).ensure_schema()
    FlakyDatabase(shared_path).ensure_schema()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_worker, args=(path, shared_path, w, 20)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert SpoolFile(path).pending() == 10
