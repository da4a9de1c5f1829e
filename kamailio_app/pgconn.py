"""PostgreSQL for the proxy and its tools: the ``[cluster] db_url``, and connections
whose every wait is bounded.

One URL is read by two clients: Kamailio's ``db_postgres`` (``auth_db``) and psycopg 3
(the archive, ``e2m-proxy users`` and ``db``).  ``PgUrl`` splits it once, so both see
the same user, host, port and database; the password (percent-decoded) never goes
into the rendered cfg: Kamailio gets the URL without it and a 0600 passfile in the
runtime dir (libpq's ``passfile``), psycopg gets it as a connection parameter.  Every
text meant for a person or a log uses ``masked()``.

A dead or frozen database must not hold a Kamailio worker: connecting gives up after
``connect_timeout`` seconds (libpq), every statement after ``statement_timeout_ms``
on the server, and every wait of the client (a query, a commit, a server that stopped
answering without closing the connection) after ``op_timeout`` seconds.  A
connection is per process: one opened before Kamailio forks is never used by a child.
"""

from __future__ import annotations

import functools
import os
import re
import select
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

__all__ = ["PgUrl", "PgUrlError", "connect", "driver_available", "passfile_text",
           "operational_errors", "ProcessConnection"]

_SCHEMES = ("postgres", "postgresql")

# Every client names the schema the tables are in, so no other schema is searched
# first: PostgreSQL's default path starts with one named after the user, and the
# nodes' account could make that one and shadow the archive or the users (review 78).
SCHEMA = "public"
SEARCH_PATH_OPTION = f"-c search_path={SCHEMA}"
# What Kamailio's URL parser and libpq read alike (no percent-decoding there).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,62}")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")
_URL = re.compile(r"(?P<scheme>[a-z]+)://(?P<user>[^:@/]*)(?::(?P<password>[^@/]*))?@"
                  r"(?P<host>[^:/@]+)(?::(?P<port>[0-9]{1,5}))?/(?P<database>[^/?#]+)")


class PgUrlError(ValueError):
    """A db_url that cannot be used; the message never quotes the password."""


@dataclass(frozen=True)
class PgUrl:
    user: str
    password: str
    host: str
    port: int
    database: str

    @classmethod
    def parse(cls, text: str) -> PgUrl:
        """``postgres://user:password@host[:port]/database``; the password may be
        percent-encoded (``%40`` for ``@``)."""
        match = _URL.fullmatch(text.strip())
        if match is None or match.group("scheme") not in _SCHEMES:
            raise PgUrlError("must look like postgres://user:password@host:port/database")
        user, host, database = match.group("user"), match.group("host"), match.group("database")
        problems = [f"{what} {value!r} has characters Kamailio's db_postgres cannot take"
                    for what, value, shape in (("user", user, _NAME), ("host", host, _HOST),
                                               ("database", database, _NAME))
                    if not shape.fullmatch(value)]
        port = int(match.group("port") or 5432)
        if not 1 <= port <= 65535:
            problems.append(f"port {port} out of range")
        password = unquote(match.group("password") or "")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in password):
            problems.append("the password has control characters")
        if problems:
            raise PgUrlError("; ".join(problems))
        return cls(user, password, host, port, database)

    def masked(self) -> str:
        """The URL with the password replaced: for logs, errors and --print-cfg."""
        secret = ":***" if self.password else ""
        return f"postgres://{self.user}{secret}@{self.host}:{self.port}/{self.database}"

    def __repr__(self) -> str:
        return f"PgUrl({self.masked()!r})"

    __str__ = masked

    def kamailio_url(self) -> str:
        """For ``db_postgres``: no password (it comes from the passfile)."""
        return f"postgres://{self.user}@{self.host}:{self.port}/{self.database}"

    def params(self, *, connect_timeout: int = 2, statement_timeout_ms: int = 2000,
               application_name: str = "e2m-proxy") -> dict[str, Any]:
        """libpq connection parameters (psycopg's keyword arguments)."""
        op_ms = max(statement_timeout_ms, 1000)
        return {"host": self.host, "port": self.port, "dbname": self.database,
                "user": self.user, "password": self.password,
                # libpq counts whole seconds and treats 1 as 2
                "connect_timeout": max(2, connect_timeout),
                "options": f"-c statement_timeout={statement_timeout_ms} "
                           f"-c lock_timeout={statement_timeout_ms} {SEARCH_PATH_OPTION}",
                # unacknowledged data (a host gone from the network) gives up too
                "tcp_user_timeout": op_ms, "keepalives": 1, "keepalives_idle": 5,
                "keepalives_interval": 2, "keepalives_count": 2,
                "application_name": application_name}


def passfile_text(url: PgUrl) -> str:
    """One line of libpq's password file for ``url`` (``:`` and ``\\`` escaped)."""
    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")
    return ":".join(esc(str(v)) for v in (url.host, url.port, url.database, url.user,
                                          url.password)) + "\n"


def driver_available() -> str | None:
    """None when psycopg 3 imports; else why not (for one clear start-up error)."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        return f"psycopg 3 is not installed ({exc}); pip install 'psycopg[binary]'"
    return None


@functools.cache
def operational_errors() -> tuple[type[BaseException], ...]:
    """psycopg's errors for a database that is away (refused, reset, timed out, shut
    down).  psycopg is imported here, on first use, not by whoever reads the config."""
    try:
        import psycopg
    except ImportError:
        return ()
    return (psycopg.OperationalError, psycopg.InterfaceError)


@functools.cache
def _bounded_connection_class(op_timeout: float) -> Any:
    import psycopg

    class BoundedConnection(psycopg.Connection):
        """Every wait on the socket ends after ``op_timeout`` seconds (psycopg's own
        wait timeout), so a server that stops answering cannot hold the caller."""

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            try:
                return super().wait(gen, interval=interval,
                                    timeout=op_timeout if timeout is None else timeout)
            except psycopg.errors._WaitTimeout:   # noqa: SLF001 - psycopg's own signal
                self.close()                     # a query is in flight: unusable now
                raise psycopg.OperationalError(
                    f"no answer from the database in {op_timeout:g} s") from None

    return BoundedConnection


def connect(url: PgUrl, *, connect_timeout: int = 2, statement_timeout_ms: int = 2000,
            autocommit: bool = False, application_name: str = "e2m-proxy") -> Any:
    """A new psycopg connection to ``url`` with every wait bounded (see the module).
    Raises psycopg's ``OperationalError`` when the database cannot be reached."""
    cls = _bounded_connection_class(max(statement_timeout_ms, 1000) / 1000.0 + 0.5)
    return cls.connect(autocommit=autocommit, **url.params(
        connect_timeout=connect_timeout, statement_timeout_ms=statement_timeout_ms,
        application_name=application_name))


def _server_has_spoken(conn: Any) -> bool:
    """Whether an idle connection has something to read: an idle autocommit session is
    never spoken to unasked but when the server ends it (its FATAL, then the close).
    One poll of the socket, no wait (``poll``, not ``select``: a worker holding many
    TCP connections has descriptors past 1023, which ``select`` refuses, and every
    query then made a session anew: review 111); a socket that cannot be polled counts
    as ended."""
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class ProcessConnection:
    """One connection per process to ``url``, autocommit (callers open transactions):
    made on first use, so a connection inherited across Kamailio's fork is never used,
    and dropped after an error, so the next use connects anew."""

    def __init__(self, url: PgUrl, *, connect_timeout: int = 2,
                 statement_timeout_ms: int = 2000, application_name: str = "e2m-proxy") -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = statement_timeout_ms
        self.application_name = application_name
        self._conn: Any = None
        self._pid: int | None = None

    def get(self) -> Any:
        if self._conn is not None and self._pid == os.getpid() and not self._conn.closed:
            if not _server_has_spoken(self._conn):
                return self._conn
            # the server said something unasked: a restart or an administrator's
            # termination (its FATAL, then its close).  Taken for an outage, the first
            # query after a routine restart failed an honest request, lost its archive
            # row or skipped the cluster's replay claims (review 110): connect anew.
            self.drop()
        self._conn = None
        self._conn = connect(self.url, connect_timeout=self.connect_timeout,
                             statement_timeout_ms=self.statement_timeout_ms, autocommit=True,
                             application_name=self.application_name)
        self._pid = os.getpid()
        return self._conn

    def separate(self, *, statement_timeout_ms: int = 30000) -> Any:
        """A connection of its own (schema work: longer statements allowed)."""
        return connect(self.url, connect_timeout=self.connect_timeout, autocommit=True,
                       statement_timeout_ms=max(self.statement_timeout_ms, statement_timeout_ms),
                       application_name=self.application_name)

    def drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass
