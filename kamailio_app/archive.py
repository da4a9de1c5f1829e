"""The IM archive and the media record: one writer interface, two back ends.

``bodies`` holds one row per body the proxy viewed (its plaintext, for the
archiving service the operator runs the proxy for); ``media`` one row per
``m=`` line of every SDP seen (what a firewall would open).  The rows of one
message share its ``message_uid`` and are written in one transaction: a message is
in the archive whole or not at all.

``ArchiveStore`` is what the proxy writes to and ``e2m archive`` reads from.  This
module has its SQL (the same for both databases) and the embedded back end,
``SqliteArchive``: one file per proxy, WAL mode so readers and writers work side by
side, a short busy timeout so a write cannot hold up routing for long, the file
created 0600 (it holds plaintext).  PostgreSQL is ``archive_pg``; the spool that
covers its absences is ``archive_spool``.

Every Kamailio worker writes through its own connection (opened lazily after the
fork, reopened if the process changes).  Nothing here logs a body.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from e2m_plugins.privatefiles import PrivateFileError, check_private_file

from .archive_schema import ARCHIVE_VERSION, SchemaError, migrate, read_version

__all__ = ["Archive", "ArchiveStore", "ArchiveError", "ArchiveUnavailable", "SqlArchive",
           "SqliteArchive", "BodyRecord", "MediaRecord", "ArchivedBody", "new_message_uid",
           "content_uid", "MEDIA_COLUMNS"]


class ArchiveError(Exception):
    """The archive could not be written or read (locked, full, unreadable)."""


class ArchiveUnavailable(ArchiveError):
    """The database is away (refused, reset, timed out): the same write may succeed
    later.  Any other ``ArchiveError`` is about the data or the schema."""


def new_message_uid() -> str:
    """The id an archived message keeps from its first write to its last replay:
    random, so nodes and workers never collide, and naming nothing of the message."""
    return secrets.token_hex(12)


def _claim_private_file(path: Path) -> None:
    """Create ``path`` for us alone (exclusively, never through a symlink), or check
    that the file already there is a regular file of ours that no one else can read.
    The archive holds plaintext: whoever may write to its folder must not be able to
    make the proxy write it into a file of their choosing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        _check_private_file(path)
        return
    os.close(fd)


def _check_private_file(path: Path) -> None:
    try:
        check_private_file(path, "archive file")
    except PrivateFileError as exc:
        raise ArchiveError(f"{exc}: refused") from None


def content_uid(identity: Sequence[str | int | None], bodies: Sequence["BodyRecord"],
                media: Sequence["MediaRecord"] = ()) -> str:
    """The ``message_uid`` of a message as the archive would record it: the same for
    every copy of one message, so a retransmitted 2xx (or one an insider sends again
    and again to fill the archive) is stored once, by any worker or node (the
    ``(message_uid, part)`` pair is unique).  ``identity`` names the message within its
    dialog (Call-ID, tags, CSeq, status); every recorded field the message itself
    decides goes in, so two messages that differ in anything of theirs the archive
    shows (another CSeq, a signature that no longer checks, another signer) never
    share a uid.  A response's sender and Request-URI are not its own but what the
    node that read it kept with the request's transaction; a copy read without it (at
    another cluster node, or after the transaction ended) is the same answer and gets
    the same uid: the first copy recorded is the row (review 61).  160 bits: a sender
    who could make two of its own messages collide would archive only the first."""
    digest = hashlib.sha256()
    fields = [list(identity)]
    fields += [[b.call_id, b.from_uri if b.status is None else None, b.to_uri, b.method,
                b.direction, b.status, b.content_type, b.sha256, b.signature, b.signer,
                b.cid, b.request_uri if b.status is None else None]
               for b in bodies]
    fields.append("media")
    # (not the RTCP address: the body's digest covers it, and a node before schema 5
    # must give the same message the same id, review 131)
    fields += [[m.call_id, m.method, m.direction, m.media, m.address, m.port, m.port_count,
                m.proto, m.codecs, m.flow, m.rtcp_port] for m in media]
    digest.update(json.dumps(fields, separators=(",", ":")).encode("utf-8"))
    return "c" + digest.hexdigest()[:40]


@dataclass(frozen=True)
class BodyRecord:
    """One viewed body and where it came from.  ``plaintext`` never reaches a log."""

    call_id: str
    from_uri: str | None
    to_uri: str | None
    method: str
    direction: str
    content_type: str
    plaintext: bytes
    sha256: str
    signature: str
    signer: str | None = None
    cid: str | None = None
    status: int | None = None
    time: float | None = None
    request_uri: str | None = None    # a request's, as received (None for a response)

    def __repr__(self) -> str:
        return (f"BodyRecord({self.method} {self.direction} {self.content_type}, "
                f"{len(self.plaintext)} bytes, signature={self.signature})")


@dataclass(frozen=True)
class MediaRecord:
    call_id: str
    method: str
    direction: str
    media: str
    address: str | None
    port: int
    port_count: int
    proto: str
    codecs: str                 # "0 PCMU/8000, 8 PCMA/8000"
    flow: str | None = None     # sendrecv / sendonly / recvonly / inactive
    rtcp_port: int | None = None
    time: float | None = None
    rtcp_address: str | None = None     # a=rtcp's address (RFC 3605), else the stream's


@dataclass(frozen=True, repr=False)
class ArchivedBody:
    """A row of ``bodies`` as read back."""

    id: int
    time: float
    call_id: str
    from_uri: str | None
    to_uri: str | None
    method: str
    direction: str
    status: int | None
    content_type: str
    plaintext: bytes
    sha256: str
    signature: str
    signer: str | None
    cid: str | None
    message_uid: str | None = None    # None: archived before message ids (schema 1)
    request_uri: str | None = None    # None: a response, or archived before schema 3

    def __repr__(self) -> str:
        return f"ArchivedBody(id={self.id}, {self.method} {self.direction}, {len(self.plaintext)} bytes)"

    def summary(self) -> dict[str, Any]:
        """Everything but the plaintext: safe to print or log."""
        return {"id": self.id, "time": self.time, "call_id": self.call_id,
                "from": self.from_uri, "to": self.to_uri, "method": self.method,
                "direction": self.direction, "status": self.status,
                "content_type": self.content_type, "length": len(self.plaintext),
                "sha256": self.sha256, "signature": self.signature, "signer": self.signer,
                "cid": self.cid, "message": self.message_uid,
                "request_uri": self.request_uri}


_BODY_COLUMNS = ("id", "time", "call_id", "from_uri", "to_uri", "method", "direction",
                 "status", "content_type", "plaintext", "sha256", "signature", "signer", "cid",
                 "message_uid", "request_uri")
MEDIA_COLUMNS = ("id", "time", "call_id", "method", "direction", "media", "address", "port",
                 "port_count", "proto", "codecs", "flow", "rtcp_port", "rtcp_address")
# A copy of a message already stored adds nothing, except what the stored row lacks:
# an answer's sender and Request-URI, which a copy read without the request's
# transaction (at another node: a hop's, sent there first) could not name (review 66).
# Only an empty field is filled; nothing stored is ever changed.
_INSERT_BODY = ("INSERT INTO bodies (time, call_id, from_uri, to_uri, method, direction, status, "
                "content_type, plaintext, sha256, signature, signer, cid, message_uid, part, "
                "request_uri) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (message_uid, part) DO UPDATE SET "
                "from_uri = COALESCE(bodies.from_uri, excluded.from_uri), "
                "request_uri = COALESCE(bodies.request_uri, excluded.request_uri)")
_INSERT_MEDIA = ("INSERT INTO media (time, call_id, method, direction, media, address, port, "
                 "port_count, proto, codecs, flow, rtcp_port, rtcp_address, message_uid, part) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT (message_uid, part) DO NOTHING")


# How many messages an SQLite archive holds (the spool's depth), and the bytes of its
# pages in use.
PENDING_SQL = ("SELECT count(*) FROM (SELECT message_uid FROM bodies UNION "
               "SELECT message_uid FROM media) AS m WHERE message_uid IS NOT NULL")
PAGES_IN_USE_SQL = ("SELECT (page_count - freelist_count) * page_size FROM "
                    "pragma_page_count(), pragma_freelist_count(), pragma_page_size()")


class ArchiveStore(Protocol):
    """What the proxy writes to and ``e2m archive`` reads from, whatever the database."""

    def ensure_schema(self) -> None:
        """Make sure the schema is there and current before the workers fork."""

    def record(self, bodies: Sequence[BodyRecord], media: Sequence[MediaRecord] = (), *,
               uid: str | None = None, may_spool: bool = True, share: str | None = None) -> str:
        """Store one message's rows in one transaction; return its ``message_uid``.
        Raises ``ArchiveError`` when they were not stored (``may_spool``: a back end
        with a spool may keep them there instead, charged to ``share``: who caused the
        message, as the key cache names its keeper)."""

    def bodies(self, limit: int = 50, call_id: str | None = None) -> list[ArchivedBody]: ...

    def body(self, body_id: int) -> ArchivedBody | None: ...

    def media(self, call_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class SqlArchive:
    """The archive's SQL, written once for both databases (``?`` placeholders become
    ``%s`` for PostgreSQL); a back end supplies the connection, its transactions and
    how its errors read."""

    dialect = "sqlite"

    def _connect(self) -> Any:
        raise NotImplementedError

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        raise NotImplementedError
        yield

    def _failure(self, exc: Exception, doing: str) -> ArchiveError:
        raise NotImplementedError

    _errors: tuple[type[Exception], ...] = ()
    # every table with rows of a message, by message_uid (``forget`` empties them all)
    _message_tables: tuple[str, ...] = ("bodies", "media")

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgres" else text

    def check_version(self, conn: Any) -> None:
        found = read_version(conn, self.dialect)
        if found != ARCHIVE_VERSION:
            raise SchemaError(f"{self}: the archive schema is at version {found}, this "
                              f"e2m-proxy needs {ARCHIVE_VERSION}: run e2m-proxy db "
                              f"{'init' if found == 0 else 'upgrade'}")

    # -- writing -------------------------------------------------------------
    def record(self, bodies: Sequence[BodyRecord], media: Sequence[MediaRecord] = (), *,
               uid: str | None = None, may_spool: bool = True, share: str | None = None) -> str:
        """Write bodies and media rows of one message in one short transaction.  A
        message already stored under ``uid`` is left as it is (a replay).  There is no
        spool here: ``may_spool`` and ``share`` play no part."""
        uid = uid or new_message_uid()
        if not bodies and not media:
            return uid
        now = time.time()
        try:
            conn = self._connect()
            with self._transaction(conn):
                self._insert(conn, uid, bodies, media, now)
        except self._errors as exc:
            raise self._failure(exc, "write") from None
        return uid

    def _insert(self, conn: Any, uid: str, bodies: Sequence[BodyRecord],
                media: Sequence[MediaRecord], now: float) -> None:
        cursor = conn.cursor()
        if bodies:
            cursor.executemany(self._sql(_INSERT_BODY), [
                (b.time or now, b.call_id, b.from_uri, b.to_uri, b.method, b.direction,
                 b.status, b.content_type, bytes(b.plaintext), b.sha256, b.signature,
                 b.signer, b.cid, uid, part, b.request_uri) for part, b in enumerate(bodies)])
        if media:
            cursor.executemany(self._sql(_INSERT_MEDIA), [
                (m.time or now, m.call_id, m.method, m.direction, m.media, m.address, m.port,
                 m.port_count, m.proto, m.codecs, m.flow, m.rtcp_port, m.rtcp_address, uid,
                 part) for part, m in enumerate(media)])

    # -- reading -------------------------------------------------------------
    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return list(self._connect().execute(self._sql(sql), tuple(args)).fetchall())
        except self._errors as exc:
            raise self._failure(exc, "read") from None

    def bodies(self, limit: int = 50, call_id: str | None = None) -> list[ArchivedBody]:
        """The newest ``limit`` bodies, oldest first (optionally of one Call-ID)."""
        where, args = ("WHERE call_id = ?", [call_id]) if call_id else ("", [])
        rows = self._query(f"SELECT {', '.join(_BODY_COLUMNS)} FROM bodies {where} "
                           f"ORDER BY id DESC LIMIT ?", [*args, int(limit)])
        return [_archived(row) for row in reversed(rows)]

    def body(self, body_id: int) -> ArchivedBody | None:
        rows = self._query(f"SELECT {', '.join(_BODY_COLUMNS)} FROM bodies WHERE id = ?",
                           [int(body_id)])
        return _archived(rows[0]) if rows else None

    def media(self, call_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        where, args = ("WHERE call_id = ?", [call_id]) if call_id else ("", [])
        rows = self._query(f"SELECT {', '.join(MEDIA_COLUMNS)} FROM media {where} "
                           f"ORDER BY id DESC LIMIT ?", [*args, int(limit)])
        return [dict(zip(MEDIA_COLUMNS, row)) for row in reversed(rows)]

    # -- whole messages (the spool and its replay) -----------------------------
    def oldest_messages(self, limit: int) -> list[str]:
        """The ``message_uid``s of the oldest ``limit`` messages here."""
        rows = self._query("SELECT message_uid, min(time) AS first FROM (SELECT message_uid, "
                           "time FROM bodies UNION ALL SELECT message_uid, time FROM media) "
                           "AS m WHERE message_uid IS NOT NULL GROUP BY message_uid "
                           "ORDER BY first LIMIT ?", [int(limit)])
        return [row[0] for row in rows]

    def message(self, uid: str) -> tuple[list[BodyRecord], list[MediaRecord]]:
        """The rows of one message, in their order, as records to write elsewhere."""
        bodies = self._query("SELECT time, call_id, from_uri, to_uri, method, direction, "
                             "status, content_type, plaintext, sha256, signature, signer, cid, "
                             "request_uri FROM bodies WHERE message_uid = ? ORDER BY part", [uid])
        media = self._query("SELECT time, call_id, method, direction, media, address, port, "
                            "port_count, proto, codecs, flow, rtcp_port, rtcp_address "
                            "FROM media WHERE message_uid = ? ORDER BY part", [uid])
        return ([BodyRecord(call_id=r[1], from_uri=r[2], to_uri=r[3], method=r[4],
                            direction=r[5], status=r[6], content_type=r[7],
                            plaintext=bytes(r[8]), sha256=r[9], signature=r[10], signer=r[11],
                            cid=r[12], time=r[0], request_uri=r[13]) for r in bodies],
                [MediaRecord(call_id=r[1], method=r[2], direction=r[3], media=r[4],
                             address=r[5], port=r[6], port_count=r[7], proto=r[8], codecs=r[9],
                             flow=r[10], rtcp_port=r[11], time=r[0], rtcp_address=r[12])
                 for r in media])

    def forget(self, uid: str) -> None:
        """Remove one message's rows (one transaction)."""
        try:
            conn = self._connect()
            with self._transaction(conn):
                for table in self._message_tables:
                    conn.execute(self._sql(f"DELETE FROM {table} WHERE message_uid = ?"), (uid,))
        except self._errors as exc:
            raise self._failure(exc, "write") from None


def _archived(row: Sequence[Any]) -> ArchivedBody:
    values = list(row)
    values[9] = bytes(values[9])          # memoryview/bytes, whichever the driver gives
    return ArchivedBody(*values)


class SqliteArchive(SqlArchive):
    """An archive file; safe to share across ``fork`` (each process connects anew)."""

    dialect = "sqlite"
    _errors = (sqlite3.Error,)

    def __init__(self, path: str | os.PathLike[str], busy_timeout_ms: int = 200) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout_ms / 1000.0
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None

    def __repr__(self) -> str:
        return f"Archive({str(self.path)!r})"

    __str__ = __repr__

    def _failure(self, exc: Exception, doing: str) -> ArchiveError:
        return ArchiveError(f"archive {doing} failed: {type(exc).__name__}: {exc}")

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- connection ----------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            _claim_private_file(self.path)
            for suffix in ("-wal", "-shm"):   # SQLite's own files, if they are there already
                side = self.path.with_name(self.path.name + suffix)
                if os.path.lexists(side):
                    _check_private_file(side)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except (OSError, sqlite3.Error) as exc:
            raise ArchiveError(f"cannot open archive {self.path}: {exc}") from None
        return conn

    def _connect(self) -> sqlite3.Connection:
        # A connection inherited across fork must not be used by the child.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self._conn = None
        conn = self._open()
        try:
            # The embedded archive makes and upgrades itself (as before versioning):
            # a file from an older release is brought up to date on first use.
            if read_version(conn, self.dialect) != ARCHIVE_VERSION:
                migrate(conn, self.dialect)
        except (sqlite3.Error, SchemaError) as exc:
            conn.close()
            raise ArchiveError(f"cannot open archive {self.path}: {exc}") from None
        self._conn, self._pid = conn, os.getpid()
        return conn

    def migrate(self, *, create: bool = True) -> tuple[int, int]:
        """``e2m-proxy db init|upgrade``: (version before, version after)."""
        conn = self._open()
        try:
            return migrate(conn, self.dialect, create=create)
        finally:
            conn.close()

    def version(self) -> int:
        """The schema version in the file (0: none) without changing anything."""
        if not self.path.exists():
            return 0
        conn = self._open()
        try:
            return read_version(conn, self.dialect)
        finally:
            conn.close()

    def ensure_schema(self) -> None:
        """Create the file and tables now (before workers fork), then let go of them."""
        self._connect()
        self.close()

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def pending(self) -> int:
        """How many messages are in the file (the spool's depth)."""
        return int(self._query(PENDING_SQL)[0][0])

    def size_bytes(self) -> int:
        """The bytes the file's pages in use hold: SQLite keeps the pages of deleted rows
        on its free list, so the file's own size never shrinks (an emptied spool stayed
        "full" for good, review 32)."""
        return int(self._query(PAGES_IN_USE_SQL)[0][0])


# The name the embedded archive has always had.
Archive = SqliteArchive
