"""The shared archive while its database is away: a bounded local spool, replayed.

What happens to a message's rows when PostgreSQL cannot take them:

- a request with ``[archive] fail_request_on_error = true`` is never spooled: its
  write fails (``ArchiveUnavailable``), the proxy answers 500 and nothing of it is
  stored anywhere, exactly as with the embedded archive;
- anything else (a request the operator lets through, every response, which cannot
  be refused) goes to the spool: an SQLite archive of this node (same schema, 0600),
  in one transaction, under the message's id;
- the replay (Kamailio's ``rtimer`` process, every second; ``e2m-proxy db replay``
  by hand) moves spooled messages, oldest first, one transaction each, into
  PostgreSQL and then out of the spool.  The rows keep their id, and the database
  ignores a message it already has, so a replay cut off between the two steps stores
  nothing twice;
- a message that fits nowhere (spool full: ``spool_max`` messages or ``spool_max_mb``;
  its sender's share of the spool full; no spool; the spool itself failing; rows the
  database refuses for good) is lost, and said so: one error line with its id, method,
  direction and Call-ID (never a body) and the counter ``e2m_archive_lost``.

Each sender has a share of both bounds (``spool_share`` percent), so that one sender
cannot take the spool from everyone else for the rest of an outage (review 32): the
share is the caller the proxy authenticated for the message's transaction (the key
cache's keeper: digest's user, or a signer over a bound SIP context), and every other
sender is in one group, ``UNAUTHENTICATED_CALLER``.  Responses count against a share
of their own per caller (``answer_share``: a callee must not spend the caller's).
Each spooled message's share and weight are kept beside it (``SpoolFile``), checked
and written in one transaction with its rows, so that the workers (separate
processes) never overfill a share between them.

While the spool holds messages, new ones join it (order is kept, and the workers do
not each wait on a dead database); a worker that saw the database fail does not try
it again for ``retry_after`` seconds.  Only the replay probes a database that is away.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .archive import (PAGES_IN_USE_SQL, PENDING_SQL, ArchiveError, ArchiveUnavailable,
                      ArchivedBody, BodyRecord, MediaRecord, SqliteArchive, new_message_uid)
from .archive_pg import PostgresArchive
from e2m_plugins.proxy import UNAUTHENTICATED_CALLER

__all__ = ["SpooledArchive", "SpoolFile", "ArchiveEvents", "COUNTERS"]

# statistics module variables (declared in the cfg template); names say what counted
COUNTERS = ("e2m_archive_spooled", "e2m_archive_replayed", "e2m_archive_lost",
            "e2m_archive_failed")
_BATCH = 100

_log = logging.getLogger("kamailio_app.archive")


def _log_line(level: str, line: str) -> None:
    _log.log(logging.ERROR if level == "error" else logging.WARNING if level == "warn"
             else logging.INFO, line)


@dataclass
class ArchiveEvents:
    """Where the archive reports: ``log(level, line)`` (info, warn, error) and
    ``count(name, n)``.  Inside Kamailio: its log and the statistics module; else
    Python's logging and a dict."""

    log: Callable[[str, str], None] = _log_line
    counts: dict[str, int] = field(default_factory=dict)
    counter: Callable[[str, int], None] | None = None

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n
        if self.counter is not None:
            self.counter(name, n)


def _describe(uid: str, bodies: Sequence[BodyRecord], media: Sequence[MediaRecord]) -> str:
    first: Any = (bodies or media)[0]
    return (f"message {uid} ({first.method} {first.direction}, Call-ID {first.call_id}, "
            f"{len(bodies)} bodies, {len(media)} media rows)")


# What a row weighs beyond its columns' octets: its numbers, its index entries.
_ROW_OVERHEAD = 128

_SHARES_TABLE = ("CREATE TABLE IF NOT EXISTS spool_shares (message_uid TEXT PRIMARY KEY, "
                 "share TEXT NOT NULL, weight INTEGER NOT NULL)")
# covering: a share's count and weight are read from the index, never past a body
_SHARES_INDEX = ("CREATE INDEX IF NOT EXISTS spool_shares_by_share "
                 "ON spool_shares (share, weight)")


def message_weight(bodies: Sequence[BodyRecord], media: Sequence[MediaRecord]) -> int:
    """Bytes a message counts for against its share of ``spool_max_mb``: every text and
    byte column of every row, as stored (a fixed estimate per row undercounted a media
    row's codecs 2400 times, review 34), and a little for the rest of the row."""
    total = 0
    for row in (*bodies, *media):
        total += _ROW_OVERHEAD
        for item in fields(row):
            value = getattr(row, item.name)
            if isinstance(value, str):
                total += len(value.encode("utf-8", "surrogatepass"))
            elif isinstance(value, (bytes, bytearray, memoryview)):
                total += len(value)
    return total


def answer_share(caller: str | None, signer: str | None = None) -> str:
    """The share answers to ``caller``'s requests are charged to: not the caller's own
    (a callee's answers, as many as it likes, would spend the caller's share and lose
    her own messages, review 34), and bounded all the same (one per caller).  With no
    caller known (a cluster's stray reply), an answer signed for itself is charged to
    its ``signer``'s answers: a stranger's unsigned stray replies fill only the
    unauthenticated share, never a real answer's (review 61)."""
    if caller:
        return "answers to " + caller
    if signer:
        return "answers signed by " + signer
    return "answers to " + UNAUTHENTICATED_CALLER


@dataclass(frozen=True)
class SpoolLimits:
    """The bounds of one node's spool and of one sender's share of it."""

    max_messages: int
    max_bytes: int
    share_percent: int = 12

    @property
    def share_messages(self) -> int:
        return max(1, self.max_messages * self.share_percent // 100)

    @property
    def share_bytes(self) -> int:
        return max(1, self.max_bytes * self.share_percent // 100)


class _OverShare(Exception):
    """A message whose rows took more than its sender's share has left (rolls back)."""


class SpoolFile(SqliteArchive):
    """This node's spool: the archive's tables, and beside each message waiting the
    share it is charged to and what it weighs (``spool_shares``, this file only)."""

    _message_tables = ("bodies", "media", "spool_shares")

    def __repr__(self) -> str:
        return f"SpoolFile({str(self.path)!r})"

    __str__ = __repr__

    def _connect(self) -> sqlite3.Connection:
        fresh = self._conn is None or self._pid != os.getpid()
        conn = super()._connect()
        if fresh:
            try:
                # a message replayed or refused leaves no text behind in the file's
                # free pages (review 191)
                conn.execute("PRAGMA secure_delete = ON")
                conn.execute(_SHARES_TABLE)
                conn.execute(_SHARES_INDEX)
            except sqlite3.Error as exc:
                raise self._failure(exc, "open") from None
        return conn

    def scrub(self) -> None:
        """Once the spool is empty: fold the write-ahead log into the file and empty it,
        so no copy of a replayed message stays in the log's frames (review 191).  A
        worker still reading keeps it for the next time (best effort, never raises)."""
        try:
            conn = self._connect()
            if self._count(conn) == 0:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (ArchiveError, sqlite3.Error):
            pass

    def hold(self, bodies: Sequence[BodyRecord], media: Sequence[MediaRecord], *, uid: str,
             share: str, limits: SpoolLimits) -> str | None:
        """Keep one message charged to ``share`` if the spool and the share have room;
        None when kept, else why not.  The checks and the write are one transaction
        (BEGIN IMMEDIATE: one writer at a time across the workers)."""
        weight = message_weight(bodies, media)
        try:
            conn = self._connect()
            with self._transaction(conn):
                held = self._count(conn)
                before = self._bytes(conn)
                if held >= limits.max_messages or before >= limits.max_bytes:
                    return f"the spool is full ({held} messages)"
                mine, heavy = conn.execute(
                    "SELECT count(*), coalesce(sum(weight), 0) FROM spool_shares "
                    "WHERE share = ?", (share,)).fetchone()
                if mine >= limits.share_messages or heavy + weight > limits.share_bytes:
                    return (f"its sender is over its share of the spool ({mine} messages, "
                            f"{heavy} bytes)")
                self._insert(conn, uid, bodies, media, time.time())
                # What the rows took in pages, when more than their columns: a long
                # indexed value spills to overflow pages of its own (a 1000-octet
                # Call-ID on 128 media rows took 5 times its octets, review 36).
                weight = max(weight, self._bytes(conn) - before)
                if heavy + weight > limits.share_bytes:
                    raise _OverShare(f"its sender is over its share of the spool ({mine} "
                                     f"messages, {heavy} bytes; this one takes {weight})")
                conn.execute("INSERT OR IGNORE INTO spool_shares (message_uid, share, weight) "
                             "VALUES (?, ?, ?)", (uid, share, weight))
        except _OverShare as refused:      # rolled back: nothing of it stays
            return str(refused)
        except sqlite3.Error as exc:
            raise self._failure(exc, "write") from None
        return None

    @staticmethod
    def _count(conn: sqlite3.Connection) -> int:
        return int(conn.execute(PENDING_SQL).fetchone()[0])

    @staticmethod
    def _bytes(conn: sqlite3.Connection) -> int:
        return int(conn.execute(PAGES_IN_USE_SQL).fetchone()[0])


class SpooledArchive:
    """PostgreSQL first, the node's spool when it is away; one ``record`` for both."""

    def __init__(self, shared: PostgresArchive, spool: SpoolFile | None, *,
                 max_messages: int = 10000, max_bytes: int = 256 * 1024 * 1024,
                 share_percent: int = 12, retry_after: float = 1.0,
                 events: ArchiveEvents | None = None) -> None:
        self.shared = shared
        self.spool = spool if max_messages > 0 else None
        self.limits = SpoolLimits(max_messages, max_bytes, share_percent)
        self.retry_after = retry_after
        self.events = events or ArchiveEvents()
        self._rest_until = 0.0
        self._why = ""
        self._replay_blocked: str | None = None

    def __repr__(self) -> str:
        return f"SpooledArchive({self.shared!r}, spool={self.spool!r})"

    # -- writing -------------------------------------------------------------
    def record(self, bodies: Sequence[BodyRecord], media: Sequence[MediaRecord] = (), *,
               uid: str | None = None, may_spool: bool = True, share: str | None = None) -> str:
        """Into the database, or the spool charged to ``share`` (None: the one group of
        senders nobody authenticated)."""
        uid = uid or new_message_uid()
        if not bodies and not media:
            return uid
        if may_spool and self._spooling():
            why = "earlier messages are waiting in the spool"
        elif time.monotonic() < self._rest_until:
            why = self._why
        else:
            try:
                return self.shared.record(bodies, media, uid=uid)
            except ArchiveUnavailable as exc:
                self._rest_until, self._why = time.monotonic() + self.retry_after, str(exc)
                why = str(exc)
            except ArchiveError as exc:      # the rows themselves: no retry will help
                if not may_spool:
                    raise
                self._lost(uid, bodies, media, str(exc))
                return uid
        if not may_spool:
            raise ArchiveUnavailable(why)
        self._to_spool(uid, bodies, media, why, share or UNAUTHENTICATED_CALLER)
        return uid

    def _spooling(self) -> bool:
        if self.spool is None:
            return False
        try:
            return self.spool.pending() > 0
        except ArchiveError:
            return False

    def _to_spool(self, uid: str, bodies: Sequence[BodyRecord],
                  media: Sequence[MediaRecord], why: str, share: str) -> None:
        if self.spool is None:
            self._lost(uid, bodies, media, f"{why}; no spool ([archive] spool_max = 0)")
            return
        try:
            refused = self.spool.hold(bodies, media, uid=uid, share=share, limits=self.limits)
            if refused is not None:
                self._lost(uid, bodies, media, f"{why}; {refused}")
                return
        except ArchiveError as exc:
            self._lost(uid, bodies, media, f"{why}; spool: {exc}")
            return
        self.events.count("e2m_archive_spooled")
        self.events.log("info", f"e2m: archive {_describe(uid, bodies, media)} spooled: {why}")

    def _lost(self, uid: str, bodies: Sequence[BodyRecord], media: Sequence[MediaRecord],
              why: str) -> None:
        self.events.count("e2m_archive_lost")
        self.events.log("error", f"e2m: archive lost {_describe(uid, bodies, media)}: "
                                 f"not stored: {why}")

    # -- catching up ---------------------------------------------------------
    def replay(self, budget_s: float = 0.8) -> int:
        """Move spooled messages into the database, oldest first, until the spool is
        empty, the database fails or ``budget_s`` is spent; how many moved."""
        if self.spool is None:
            return 0
        deadline = time.monotonic() + budget_s
        moved = 0
        try:
            while time.monotonic() < deadline:
                uids = self.spool.oldest_messages(_BATCH)
                if not uids:
                    break
                for uid in uids:
                    if not self._replay_one(uid):
                        return moved
                    moved += 1
                    if time.monotonic() >= deadline:
                        break
        except ArchiveError as exc:          # the spool itself: try again next time
            self._blocked(f"spool: {exc}")
            return moved
        finally:
            if moved:
                self.spool.scrub()
                self.events.count("e2m_archive_replayed", moved)
                self.events.log("info", f"e2m: archive replayed {moved} spooled messages "
                                        f"into the shared archive; {self.pending()} wait")
        return moved

    def _replay_one(self, uid: str) -> bool:
        bodies, media = self.spool.message(uid)   # type: ignore[union-attr]
        try:
            self.shared.record(bodies, media, uid=uid)
        except ArchiveUnavailable as exc:
            self._blocked(str(exc))
            return False
        except ArchiveError as exc:              # rows it refuses for good: said, dropped
            if bodies or media:
                self._lost(uid, bodies, media, str(exc))
        else:
            if self._replay_blocked is not None:
                self._replay_blocked = None
                self.events.log("info", "e2m: shared archive reachable again")
        self.spool.forget(uid)                    # type: ignore[union-attr]
        return True

    def _blocked(self, why: str) -> None:
        if self._replay_blocked is None:       # one line when it starts, not every second
            self.events.log("warn", f"e2m: shared archive unavailable, {self.pending()} "
                                    f"messages spooled: {why}")
        self._replay_blocked = why

    def pending(self) -> int:
        """Messages in the spool (-1: the spool cannot be read)."""
        if self.spool is None:
            return 0
        try:
            return self.spool.pending()
        except ArchiveError:
            return -1

    # -- the rest of the interface -----------------------------------------------
    def ensure_schema(self) -> None:
        self.shared.ensure_schema()
        if self.spool is not None:
            self.spool.ensure_schema()

    def bodies(self, limit: int = 50, call_id: str | None = None) -> list[ArchivedBody]:
        return self.shared.bodies(limit, call_id)

    def body(self, body_id: int) -> ArchivedBody | None:
        return self.shared.body(body_id)

    def media(self, call_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return self.shared.media(call_id, limit)

    def close(self) -> None:
        self.shared.close()
        if self.spool is not None:
            self.spool.close()
