"""``e2m-proxy users add|remove|list --config PROXY.toml``: the users of ``[auth]``.

Users live in Kamailio's standard ``subscriber`` table (``username``, ``domain``,
``ha1``, ``ha1b``), read by ``auth_db`` at every authentication, so a change takes
effect at once, with the proxy running.  ``[auth] users`` is an SQLite file created
with Kamailio's own schema (the ``*-create.sql`` scripts that Debian's
``kamailio-sqlite-modules`` ships) when it is missing.  With ``[cluster] db_url`` (or a
``postgres://`` ``[auth] db_url``) the table is in PostgreSQL, shared by every node,
made with Kamailio's PostgreSQL scripts by ``e2m-proxy db init``; any other ``[auth]
db_url`` is the operator's own database, managed with its own tools (``kamctl add``).

Only HA1 values are stored: ``MD5(user:realm:password)`` and
``MD5(user@domain:realm:password)`` (``ha1b``, for UAs that send the domain in the
user name).  The password is read from standard input (one line) when that is not a
terminal, or asked for twice on the terminal; it never appears on a command line, in
a log or in a process list.  The ``password`` column stays empty.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import re
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from e2m_plugins.cli.terminal import guard_terminal
from e2m_plugins.privatefiles import PrivateFileError, check_private_file

from .pgconn import PgUrl, connect

__all__ = ["UsersError", "ensure_users_db", "ensure_pg_users", "pg_users_ready", "ha1", "ha1b",
           "add_user",
           "remove_user", "list_users", "read_password", "main", "SCHEMA_DIR", "PG_SCHEMA_DIR"]

SCHEMA_DIR = Path("/usr/share/kamailio/db_sqlite")
PG_SCHEMA_DIR = Path("/usr/share/kamailio/postgres")
SCHEMA_FILES = ("standard-create.sql", "auth_db-create.sql")
# A SIP user part that needs no escaping, and no '@' or ':' (the ha1b form adds one).
_USER = re.compile(r"[A-Za-z0-9._~+-]{1,64}")
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class UsersError(Exception):
    """What went wrong, in words for the operator."""


def ha1(user: str, realm: str, password: str) -> str:
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()


def ha1b(user: str, domain: str, realm: str, password: str) -> str:
    return hashlib.md5(f"{user}@{domain}:{realm}:{password}".encode()).hexdigest()


def ensure_users_db(path: Path, schema_dir: Path = SCHEMA_DIR) -> bool:
    """Create ``path`` (mode 0600) with Kamailio's standard and auth_db schema unless it
    exists; True when it was created.  An existing one must be ours alone: it holds
    password equivalents (HA1), enough to answer a challenge as any user (review 73)."""
    if path.exists() or path.is_symlink():
        try:
            check_private_file(path, "[auth] users database")
        except PrivateFileError as exc:
            raise UsersError(str(exc)) from None
        return False
    scripts = [schema_dir / name for name in SCHEMA_FILES]
    missing = [str(p) for p in scripts if not p.is_file()]
    if missing:
        raise UsersError(f"Kamailio's SQLite schema is not installed ({', '.join(missing)}); "
                         "install kamailio-sqlite-modules")
    # Created empty with 0600 first: the file holds password equivalents (HA1).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        with sqlite3.connect(path) as db:
            for script in scripts:
                db.executescript(script.read_text())
    except sqlite3.Error as exc:
        path.unlink(missing_ok=True)
        raise UsersError(f"cannot create {path}: {exc}") from None
    return True


def _check_name(name: str) -> str:
    if not _USER.fullmatch(name):
        raise UsersError(f"{name!r} is not a user name (letters, digits and . _ ~ + -, "
                         "at most 64)")
    return name


def _check_table(table: str) -> str:
    if not _TABLE.fullmatch(table):
        raise UsersError(f"{table!r} is not a table name")
    return table


@contextmanager
def _session(where: Path | PgUrl, table: str) -> Iterator[tuple[Any, str]]:
    """A connection to the subscriber table's database in one transaction, committed
    at the end, and the driver's placeholder; every driver error as ``UsersError``."""
    _check_table(table)
    if isinstance(where, PgUrl):
        import psycopg
        try:
            with connect(where, statement_timeout_ms=5000, application_name="e2m-proxy users",
                         connect_timeout=5) as db:
                yield db, "%s"
        except psycopg.Error as exc:
            hint = " (run e2m-proxy db init)" if isinstance(exc, psycopg.errors.UndefinedTable) \
                else ""
            raise UsersError(f"{where.masked()}: {str(exc).strip().splitlines()[0]}{hint}") \
                from None
        return
    ensure_users_db(where)
    db = sqlite3.connect(where, timeout=5)
    try:
        with db:
            yield db, "?"
    except sqlite3.Error as exc:
        raise UsersError(f"{where}: {exc}") from None
    finally:
        db.close()


def add_user(where: Path | PgUrl, table: str, realm: str, name: str, password: str) -> bool:
    """Add ``name`` (domain = realm) or change its password; True when it is new.
    ``where``: the SQLite file, or the PostgreSQL of ``[cluster] db_url``."""
    _check_name(name)
    if not password:
        raise UsersError("the password is empty")
    values = (ha1(name, realm, password), ha1b(name, realm, realm, password))
    with _session(where, table) as (db, p):
        row = db.execute(f"SELECT id FROM {table} WHERE username = {p} AND domain = {p}",
                         (name, realm)).fetchone()
        if row is None:
            db.execute(f"INSERT INTO {table} (username, domain, ha1, ha1b) "
                       f"VALUES ({p}, {p}, {p}, {p})", (name, realm, *values))
        else:
            db.execute(f"UPDATE {table} SET ha1 = {p}, ha1b = {p}, password = '' "
                       f"WHERE id = {p}", (*values, row[0]))
    return row is None


def remove_user(where: Path | PgUrl, table: str, realm: str, name: str) -> bool:
    _check_name(name)
    with _session(where, table) as (db, p):
        gone = db.execute(f"DELETE FROM {table} WHERE username = {p} AND domain = {p}",
                          (name, realm)).rowcount
    return gone > 0


def list_users(where: Path | PgUrl, table: str) -> list[str]:
    with _session(where, table) as (db, _):
        return [row[0] for row in
                db.execute(f"SELECT username FROM {table} ORDER BY username").fetchall()]


def _pg_has_table(db: Any, name: str) -> bool:
    return db.execute("SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() "
                      "AND tablename = %s", (name,)).fetchone() is not None


def pg_users_ready(url: PgUrl, table: str = "subscriber") -> bool:
    """Whether Kamailio's ``version`` table and the subscriber ``table`` are there."""
    with _session(url, table) as (db, _):
        return _pg_has_table(db, "version") and _pg_has_table(db, table)


def ensure_pg_users(url: PgUrl, table: str = "subscriber",
                    schema_dir: Path = PG_SCHEMA_DIR) -> list[str]:
    """Create Kamailio's ``version`` and ``subscriber`` tables in PostgreSQL with its own
    scripts (Debian ``kamailio-postgres-modules``) where they are missing; the names
    of the tables created."""
    _check_table(table)
    wanted = {"version": "standard-create.sql", "subscriber": "auth_db-create.sql"}
    made: list[str] = []
    from .archive_schema import MIGRATION_LOCK
    with _session(url, table) as (db, _):
        # several nodes may run db init at once: one makes the tables, the others wait
        db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        for name, script in wanted.items():
            if _pg_has_table(db, name):
                continue
            path = schema_dir / script
            if not path.is_file():
                raise UsersError(f"Kamailio's PostgreSQL schema is not installed ({path}); "
                                 "install kamailio-postgres-modules")
            db.execute(path.read_text())     # Kamailio's own DDL, no values of ours
            made.append(name)
    if table != "subscriber" and "subscriber" in made:
        made.append(f"(note: [auth] table = {table} must be made by you)")
    return made


def read_password(stdin: TextIO, *, ask: bool | None = None) -> str:
    """One line from ``stdin`` when it is not a terminal; else asked twice (not echoed)."""
    if ask is None:
        ask = stdin.isatty()
    if not ask:
        line = stdin.readline()
        if len(line) > 1024:
            raise UsersError("the password line is too long")
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise UsersError("the two passwords differ")
    return first


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e2m-proxy users",
        description="Manage the users of PROXY.toml [auth] (HA1 only; the password is read "
                    "from standard input, or asked for twice on a terminal).")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("add", "add a user or change its password"),
                       ("remove", "remove a user"), ("list", "list the user names")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", required=True, help="PROXY.toml")
        if name != "list":
            sub.add_argument("name", help="user name (the user part of the AoR)")
    return parser


def main(argv: list[str]) -> int:
    guard_terminal()          # it may be run on its own: what it lists, senders wrote
    args = _parser().parse_args(argv)
    from .config import load_app_config      # late: the launcher imports this module
    try:
        config = load_app_config(args.config)
    except ValueError as exc:
        print(f"e2m-proxy users: {exc}", file=sys.stderr)
        return 2
    auth = config.auth
    if auth is None:
        print("e2m-proxy users: PROXY.toml has no [auth] section", file=sys.stderr)
        return 2
    where: Path | PgUrl | None = auth.users or auth.pg
    if where is None:
        print("e2m-proxy users: [auth] db_url names your own database; manage its "
              f"{auth.table} table with its own tools (kamctl add)", file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            for name in list_users(where, auth.table):
                print(name)
        elif args.command == "add":
            _check_name(args.name)
            new = add_user(where, auth.table, auth.realm, args.name,
                           read_password(sys.stdin))
            print(f"{'added' if new else 'changed'} {args.name} (realm {auth.realm})")
        else:
            if not remove_user(where, auth.table, auth.realm, args.name):
                print(f"e2m-proxy users: no user {args.name!r}", file=sys.stderr)
                return 1
            print(f"removed {args.name}")
    except UsersError as exc:
        print(f"e2m-proxy users: {exc}", file=sys.stderr)
        return 1
    return 0
