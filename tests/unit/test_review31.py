"""Review 31 (attacker's review of this session's fixes), in memory.

Each ``test_hole_*`` was a strict xfail on ``1bfd413`` (closed since) whose assertion
is what a fix must make true; each ``test_control_*`` is the same flow without the fault (it passes).  The
wire half (a real Kamailio: a user's connection mark lowered) is
``tests/kamailio/test_review31_wire.py``.

1. **An outage PostgreSQL reports in SQLSTATE class 54 is taken for rows refused for
   good.**  Review 30 made ``psycopg.errors.ProgramLimitExceeded`` (class 54) a
   permanent refusal of the rows, for the 2704-byte index entry.  But the same code
   (54000, ``ERRCODE_PROGRAM_LIMIT_EXCEEDED``) is what PostgreSQL raises for *every*
   write when it stops assigning transaction ids to avoid wraparound
   (``varsup.c GetNewTransactionId``: "database is not accepting commands ... to avoid
   wraparound data loss"; the MultiXact variant alike), until a VACUUM: a database
   that is up and answering, merely not writing for a while.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kamailio_app.archive import ArchiveError, ArchiveUnavailable, BodyRecord, SqliteArchive
from kamailio_app.archive_spool import ArchiveEvents, SpooledArchive, SpoolFile

psycopg = pytest.importorskip("psycopg")

WRAPAROUND = ('database is not accepting commands that assign new transaction IDs to avoid '
              'wraparound data loss in database "e2m"')


def _body(n: int) -> BodyRecord:
    return BodyRecord(call_id=f"c{n}@x", from_uri="sip:alice@example.com",
                      to_uri="sip:bob@example.com", method="MESSAGE", direction="request",
                      content_type="text/plain", plaintext=b"words %d" % n, sha256="0" * 64,
                      signature="valid")


def _postgres(state: dict):
    """A ``PostgresArchive`` (its own error classification) over a database whose every
    write fails with ``state['error']`` (None: an SQLite file stands in for it)."""
    from kamailio_app.archive_pg import PostgresArchive
    from kamailio_app.pgconn import PgUrl

    class Database(PostgresArchive):
        def _connect(self):
            if state["error"] is not None:
                raise state["error"]
            return state["stand_in"]._connect()

        def _transaction(self, conn):
            return state["stand_in"]._transaction(conn)

    archive = Database(PgUrl.parse("postgres://e2m:pw@127.0.0.1:5432/e2m"))
    archive.dialect = "sqlite"          # the stand-in's placeholders
    return archive


def _spooled(tmp_path: Path, error) -> tuple[SpooledArchive, dict, list]:
    state = {"error": psycopg.OperationalError("connection refused"),
             "stand_in": SqliteArchive(tmp_path / "shared.sqlite")}
    lines: list[tuple[str, str]] = []
    spooled = SpooledArchive(_postgres(state), SpoolFile(tmp_path / "spool.sqlite"),
                             retry_after=0.0,
                             events=ArchiveEvents(log=lambda lvl, line: lines.append((lvl, line))))
    for n in range(3):                  # the database away: three messages wait
        spooled.record([_body(n)])
    assert spooled.spool.pending() == 3
    state["error"] = error              # back, but not writing yet (or a real limit)
    spooled.replay()
    spooled.record([_body(3)])
    return spooled, state, lines


def test_hole_a_database_stopped_for_wraparound_loses_every_message_and_the_spool(tmp_path):
    """Attacker: none needed (a fault); anyone who keeps the database's oldest xid
    pinned (a forgotten prepared transaction or replication slot, autovacuum behind on
    a busy archive) brings it nearer.

    Steps: the shared archive is away a while (messages are spooled, as promised), then
    PostgreSQL answers again but refuses writes for wraparound protection (SQLSTATE
    54000) until a VACUUM.

    Effect: ``PostgresArchive._failure`` reads ``ProgramLimitExceeded`` as "rows
    refused for good" (``ArchiveError``): ``SpooledArchive.replay`` drops every spooled
    message as lost and forgets it, and ``record`` loses each new one (no spool, no
    retry), for as long as the stop lasts; with ``fail_request_on_error`` requests get
    the permanent-error path.  ``archive_spool.py`` promises that messages wait in the
    spool while the database cannot take them and only rows "the database refuses for
    good" are lost; ``archive_pg.py`` that anything but the rows' own fault "may pass
    later".

    Fix: take only what is about the rows as permanent: 54000 with the index-row (or
    "row is too big" / value-size) message, or better check the rows' sizes before
    writing (the Call-ID bound already does); treat class 54 otherwise (wraparound,
    "statement too complex", MultiXact limits) as ``ArchiveUnavailable``."""
    spooled, _, lines = _spooled(
        tmp_path, psycopg.errors.ProgramLimitExceeded(WRAPAROUND))
    lost = [line for level, line in lines if "archive lost" in line]
    assert not lost, lost
    assert spooled.spool.pending() == 4


def test_control_a_database_still_away_keeps_every_message_spooled(tmp_path):
    spooled, _, lines = _spooled(tmp_path, psycopg.OperationalError("connection refused"))
    assert not [line for level, line in lines if "archive lost" in line]
    assert spooled.spool.pending() == 4


def test_class_54_is_an_outage_unless_it_names_the_row():
    """The wraparound stop waits (it was read as a refusal of the rows on ``1bfd413``);
    an index entry over PostgreSQL's limit is still a refusal of the rows (review 30)."""
    state = {"error": None, "stand_in": None}
    archive = _postgres(state)
    assert isinstance(archive._failure(psycopg.errors.ProgramLimitExceeded(WRAPAROUND),
                                       "write"), ArchiveUnavailable)
    too_big = psycopg.errors.ProgramLimitExceeded(
        "index row size 3016 exceeds btree version 4 maximum 2704 for index bodies_call_id")
    refused = archive._failure(too_big, "write")
    assert isinstance(refused, ArchiveError) and not isinstance(refused, ArchiveUnavailable)
