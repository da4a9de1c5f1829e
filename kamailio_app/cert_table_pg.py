"""The certificate service's tables in PostgreSQL (``[cluster] db_url``): the same
``PublicationTable`` and ``SubscriptionTable`` as on SQLite, over a connection of
``pgconn`` instead of the SQLite file.

``write()`` is what SQLite's ``BEGIN IMMEDIATE`` gives the tables there: one
transaction at a time over the service's rows, here across every node too (an
advisory lock held to the end of the transaction), so a PUBLISH's read-check-save and
a timer's claim are never interleaved with another node's.  A ``write()`` inside
another is a savepoint of the outer transaction.  A broken connection is dropped and
the next call connects anew; every wait is bounded (``pgconn``).  The tables are made
by ``e2m-proxy db init`` (``ensure_schema``), under the migration lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .archive_schema import MIGRATION_LOCK
from .cert_table import (_COMPONENT, _SCHEMA, SCHEMA_VERSION, CertDatabase, CertTableError,
                         upgrade_schema)
from .pgconn import PgUrl, ProcessConnection

__all__ = ["PostgresCertDatabase", "CERT_LOCK"]

CERT_LOCK = 0x6532_6D63      # pg_advisory_xact_lock key of the service's writes ("e2mc")


class PostgresCertDatabase(CertDatabase):
    dialect = "postgres"

    def __init__(self, url: PgUrl, *, connect_timeout: int = 2,
                 statement_timeout_ms: int = 2000) -> None:
        import psycopg
        self.url = url
        self._db = ProcessConnection(url, connect_timeout=connect_timeout,
                                     statement_timeout_ms=statement_timeout_ms,
                                     application_name="e2m-proxy certs")
        self._errors, self._idle = (psycopg.Error,), psycopg.pq.TransactionStatus.IDLE

    def __repr__(self) -> str:
        return f"PostgresCertDatabase({self.url.masked()!r})"

    def _connect(self) -> Any:
        try:
            return self._db.get()
        except self._errors as exc:
            raise self._failure(exc, "connect") from None

    def _failure(self, exc: BaseException, doing: str) -> CertTableError:
        self._db.drop()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CertTableError(f"{self.url.masked()}: {doing} failed: {first}")

    def ensure_schema(self, *, unreachable_ok: bool = False) -> None:
        """The service's tables and its ``schema_version`` row (``db init``), brought
        up to ``SCHEMA_VERSION`` (``db upgrade``).  Only read when they are there and
        current: the nodes' account may have no right to create or alter tables (the
        owner's do, ``db init --owner-url``; review 73).  With
        ``unreachable_ok`` (a node starting) a database that cannot be reached now is
        not fatal, as for the archive: the service answers 500 with Retry-After until
        it is back; ``db init`` still fails on it."""
        if unreachable_ok:
            try:
                self._db.separate().close()
            except self._errors:
                return
        try:
            with self._db.separate() as conn:
                present = conn.execute(
                    "SELECT to_regclass('cert_publications') IS NOT NULL AND "
                    "to_regclass('cert_subscriptions') IS NOT NULL AND "
                    "to_regclass('schema_version') IS NOT NULL").fetchone()[0]
                found = conn.execute(
                    "SELECT version FROM schema_version WHERE component = %s",
                    (_COMPONENT,)).fetchone() if present else None
                if found is not None and int(found[0]) == SCHEMA_VERSION:
                    return
        except self._errors as exc:
            raise self._failure(exc, "schema") from None
        try:
            with self._db.separate() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                for statement in _SCHEMA.format(blob="BYTEA").split(";"):
                    if statement.strip():
                        conn.execute(statement)
                columns = {row[0] for row in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = "
                    "'cert_subscriptions' AND table_schema = current_schema()")}
                upgrade_schema(conn.cursor(), self.sql, columns)
        except self._errors as exc:
            # an older version's tables, and this account may not alter them
            doing = "schema" if found is None else \
                f"schema upgrade from version {found[0]} (run e2m-proxy db upgrade)"
            raise self._failure(exc, doing) from None

    @contextmanager
    def read(self) -> Iterator[Any]:
        conn = self._connect()
        try:
            yield conn.cursor()
        except self._errors as exc:
            raise self._failure(exc, "read") from None

    @contextmanager
    def write(self) -> Iterator[Any]:
        conn = self._connect()
        if conn.info.transaction_status != self._idle:
            with conn.transaction():             # inside write(): a savepoint of it
                yield conn.cursor()
            return
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (CERT_LOCK,))
                yield conn.cursor()
        except self._errors as exc:
            raise self._failure(exc, "write") from None

    def close(self) -> None:
        self._db.drop()
