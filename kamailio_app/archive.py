"""The IM archive and the media record: one SQLite file per proxy.

``bodies`` holds one row per body the proxy viewed (its plaintext, for the
archiving service the operator runs the proxy for); ``media`` one row per
``m=`` line of every SDP seen (what a firewall would open).

Every Kamailio worker writes through its own connection (opened lazily after
the fork, reopened if the process changes).  WAL mode lets the readers (``e2m
archive``) and the writers work side by side, and a short busy timeout bounds
how long a write can hold up routing.  The file is created 0600: it holds
plaintext.  Nothing here logs a body.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Archive", "ArchiveError", "BodyRecord", "MediaRecord", "ArchivedBody", "SCHEMA"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS bodies (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          REAL    NOT NULL,
    call_id       TEXT    NOT NULL,
    from_uri      TEXT,               -- who sent the body (a response: the responder)
    to_uri        TEXT,               -- the other party
    method        TEXT    NOT NULL,
    direction     TEXT    NOT NULL CHECK (direction IN ('request', 'response')),
    status        INTEGER,
    content_type  TEXT    NOT NULL,
    plaintext     BLOB    NOT NULL,
    sha256        TEXT    NOT NULL,
    signature     TEXT    NOT NULL,
    signer        TEXT,
    cid           TEXT
);
CREATE INDEX IF NOT EXISTS bodies_call_id ON bodies (call_id);
CREATE TABLE IF NOT EXISTS media (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          REAL    NOT NULL,
    call_id       TEXT    NOT NULL,
    method        TEXT    NOT NULL,
    direction     TEXT    NOT NULL CHECK (direction IN ('request', 'response')),
    media         TEXT    NOT NULL,
    address       TEXT,
    port          INTEGER NOT NULL,
    port_count    INTEGER NOT NULL,
    proto         TEXT    NOT NULL,
    codecs        TEXT    NOT NULL,
    flow          TEXT,
    rtcp_port     INTEGER
);
CREATE INDEX IF NOT EXISTS media_call_id ON media (call_id);
"""


class ArchiveError(Exception):
    """The archive could not be written or read (locked, full, unreadable)."""


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
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ArchiveError(f"{path} is not a regular file (a symlink?): refused")
    if info.st_uid != os.getuid():
        raise ArchiveError(f"{path} belongs to another user: refused")
    if info.st_mode & 0o077:
        raise ArchiveError(f"{path} is readable or writable by others "
                           f"(mode {stat.S_IMODE(info.st_mode):o}): refused; chmod 600 it")


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

    def __repr__(self) -> str:
        return f"ArchivedBody(id={self.id}, {self.method} {self.direction}, {len(self.plaintext)} bytes)"

    def summary(self) -> dict[str, Any]:
        """Everything but the plaintext: safe to print or log."""
        return {"id": self.id, "time": self.time, "call_id": self.call_id,
                "from": self.from_uri, "to": self.to_uri, "method": self.method,
                "direction": self.direction, "status": self.status,
                "content_type": self.content_type, "length": len(self.plaintext),
                "sha256": self.sha256, "signature": self.signature, "signer": self.signer,
                "cid": self.cid}


_BODY_COLUMNS = ("id", "time", "call_id", "from_uri", "to_uri", "method", "direction",
                 "status", "content_type", "plaintext", "sha256", "signature", "signer", "cid")


class Archive:
    """An archive file; safe to share across ``fork`` (each process connects anew)."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout_ms: int = 200) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout_ms / 1000.0
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None

    def __repr__(self) -> str:
        return f"Archive({str(self.path)!r})"

    # -- connection ----------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # A connection inherited across fork must not be used by the child.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self._conn = None
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
            conn.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ArchiveError(f"cannot open archive {self.path}: {exc}") from None
        self._conn, self._pid = conn, os.getpid()
        return conn

    def ensure_schema(self) -> None:
        """Create the file and tables now (before workers fork), then let go of them."""
        self._connect()
        self.close()

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    # -- writing -------------------------------------------------------------
    def record(self, bodies: Sequence[BodyRecord], media: Sequence[MediaRecord] = ()) -> None:
        """Write bodies and media rows of one message in one short transaction."""
        if not bodies and not media:
            return
        conn = self._connect()
        now = time.time()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO bodies (time, call_id, from_uri, to_uri, method, direction, "
                    "status, content_type, plaintext, sha256, signature, signer, cid) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(b.time or now, b.call_id, b.from_uri, b.to_uri, b.method, b.direction,
                      b.status, b.content_type, bytes(b.plaintext), b.sha256, b.signature,
                      b.signer, b.cid) for b in bodies])
                conn.executemany(
                    "INSERT INTO media (time, call_id, method, direction, media, address, port, "
                    "port_count, proto, codecs, flow, rtcp_port) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(m.time or now, m.call_id, m.method, m.direction, m.media, m.address,
                      m.port, m.port_count, m.proto, m.codecs, m.flow, m.rtcp_port)
                     for m in media])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise ArchiveError(f"archive write failed: {type(exc).__name__}: {exc}") from None

    # -- reading -------------------------------------------------------------
    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            return conn.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise ArchiveError(f"archive read failed: {exc}") from None

    def bodies(self, limit: int = 50, call_id: str | None = None) -> list[ArchivedBody]:
        """The newest ``limit`` bodies, oldest first (optionally of one Call-ID)."""
        where, args = ("WHERE call_id = ?", [call_id]) if call_id else ("", [])
        rows = self._query(f"SELECT {', '.join(_BODY_COLUMNS)} FROM bodies {where} "
                           f"ORDER BY id DESC LIMIT ?", [*args, int(limit)])
        return [ArchivedBody(*row) for row in reversed(rows)]

    def body(self, body_id: int) -> ArchivedBody | None:
        rows = self._query(f"SELECT {', '.join(_BODY_COLUMNS)} FROM bodies WHERE id = ?",
                           [int(body_id)])
        return ArchivedBody(*rows[0]) if rows else None

    def media(self, call_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        where, args = ("WHERE call_id = ?", [call_id]) if call_id else ("", [])
        names = ("id", "time", "call_id", "method", "direction", "media", "address", "port",
                 "port_count", "proto", "codecs", "flow", "rtcp_port")
        rows = self._query(f"SELECT {', '.join(names)} FROM media {where} "
                           f"ORDER BY id DESC LIMIT ?", [*args, int(limit)])
        return [dict(zip(names, row)) for row in reversed(rows)]
