"""The archive in PostgreSQL (``[cluster] db_url``): the same tables and SQL as the
embedded one, written from every node.

Each process (a Kamailio worker, the replay timer, a tool) opens its own connection
on first use and drops it at the first error; the next write connects anew, so the
archive comes back by itself when the database does.  Every wait is bounded
(``pgconn``).  The schema is made and migrated by ``e2m-proxy db init|upgrade``, not
by the proxy: a proxy that finds an old schema refuses to start rather than write
rows an older layout cannot hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .archive import ArchiveError, ArchiveUnavailable, SqlArchive
from .archive_schema import SchemaError, migrate, read_version
from .pgconn import PgUrl, ProcessConnection

__all__ = ["PostgresArchive"]

# PostgreSQL's messages for a row that is too large for good (class 54)
_ROW_LIMITS = re.compile(r"index row (size|requires)|row is too big", re.IGNORECASE)


class PostgresArchive(SqlArchive):
    """The shared archive; safe to share across ``fork`` (each process connects anew)."""

    dialect = "postgres"

    def __init__(self, url: PgUrl, *, connect_timeout: int = 2,
                 statement_timeout_ms: int = 2000) -> None:
        import psycopg
        self.url = url
        self._db = ProcessConnection(url, connect_timeout=connect_timeout,
                                     statement_timeout_ms=statement_timeout_ms)
        self._errors = (psycopg.Error,)
        # rows the database can never take (bad bytes, a broken constraint); anything
        # else (away, full disk, missing table, lock timeout) may pass later
        self._permanent = (psycopg.DataError, psycopg.IntegrityError)
        # SQLSTATE class 54 is both: a row past one of the database's limits (an index
        # entry over 2704 bytes, review 30) never passes, but the write stop that guards
        # against transaction id wraparound lasts only until a VACUUM (review 31)
        self._limits = psycopg.errors.ProgramLimitExceeded

    def __repr__(self) -> str:
        return f"PostgresArchive({self.url.masked()!r})"

    __str__ = __repr__

    # -- connection ----------------------------------------------------------
    def _connect(self) -> Any:
        return self._db.get()

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        with conn.transaction():
            yield

    def _failure(self, exc: Exception, doing: str) -> ArchiveError:
        self._db.drop()
        # psycopg's messages name the server and the statement, never our values
        text = f"shared archive {doing} failed: {type(exc).__name__}: " \
               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}"
        if isinstance(exc, self._permanent) or (
                isinstance(exc, self._limits) and _ROW_LIMITS.search(str(exc))):
            return ArchiveError(text)
        return ArchiveUnavailable(text)

    def close(self) -> None:
        self._db.drop()

    # -- schema ----------------------------------------------------------------
    def ensure_schema(self) -> None:
        """Check, before the workers fork, that the schema is the one we write.  A
        database that cannot be reached now is not fatal: its absence is what the
        spool covers.  A wrong schema is (``SchemaError``)."""
        try:
            conn = self._db.separate()
        except self._errors:
            return
        try:
            self.check_version(conn)
        finally:
            conn.close()

    def version(self) -> int:
        with self._db.separate() as conn:
            return read_version(conn, self.dialect)

    def migrate(self, *, create: bool = True) -> tuple[int, int]:
        """``e2m-proxy db init|upgrade``: (version before, version after)."""
        try:
            with self._db.separate() as conn:
                return migrate(conn, self.dialect, create=create)
        except self._errors as exc:
            raise SchemaError(f"{self.url.masked()}: {type(exc).__name__}: "
                              f"{str(exc).strip()}") from None
