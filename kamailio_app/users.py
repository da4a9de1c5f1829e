"""``e2m-proxy users add|remove|list --config PROXY.toml``: the users of ``[auth]``.

Users live in Kamailio's standard ``subscriber`` table (``username``, ``domain``,
``ha1``, ``ha1b``), read by ``auth_db`` at every authentication, so a change takes
effect at once, with the proxy running.  ``[auth] users`` is an SQLite file created
with Kamailio's own schema (the ``*-create.sql`` scripts that Debian's
``kamailio-sqlite-modules`` ships) when it is missing; with ``[auth] db_url`` the
operator's own database is used and managed with its own tools (``kamctl add``).

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
from pathlib import Path
from typing import TextIO

__all__ = ["UsersError", "ensure_users_db", "ha1", "ha1b", "add_user", "remove_user",
           "list_users", "read_password", "main", "SCHEMA_DIR"]

SCHEMA_DIR = Path("/usr/share/kamailio/db_sqlite")
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
    exists; True when it was created."""
    if path.exists():
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


def _connect(path: Path, table: str) -> sqlite3.Connection:
    if not _TABLE.fullmatch(table):
        raise UsersError(f"{table!r} is not a table name")
    ensure_users_db(path)
    db = sqlite3.connect(path, timeout=5)
    return db


def add_user(path: Path, table: str, realm: str, name: str, password: str) -> bool:
    """Add ``name`` (domain = realm) or change its password; True when it is new."""
    _check_name(name)
    if not password:
        raise UsersError("the password is empty")
    db = _connect(path, table)
    try:
        with db:
            row = db.execute(f"SELECT id FROM {table} WHERE username = ? AND domain = ?",
                             (name, realm)).fetchone()
            values = (ha1(name, realm, password), ha1b(name, realm, realm, password))
            if row is None:
                db.execute(f"INSERT INTO {table} (username, domain, ha1, ha1b) "
                           "VALUES (?, ?, ?, ?)", (name, realm, *values))
            else:
                db.execute(f"UPDATE {table} SET ha1 = ?, ha1b = ?, password = '' WHERE id = ?",
                           (*values, row[0]))
    except sqlite3.Error as exc:
        raise UsersError(f"{path}: {exc}") from None
    finally:
        db.close()
    return row is None


def remove_user(path: Path, table: str, realm: str, name: str) -> bool:
    _check_name(name)
    db = _connect(path, table)
    try:
        with db:
            gone = db.execute(f"DELETE FROM {table} WHERE username = ? AND domain = ?",
                              (name, realm)).rowcount
    except sqlite3.Error as exc:
        raise UsersError(f"{path}: {exc}") from None
    finally:
        db.close()
    return gone > 0


def list_users(path: Path, table: str) -> list[str]:
    db = _connect(path, table)
    try:
        return [row[0] for row in db.execute(f"SELECT username FROM {table} ORDER BY username")]
    except sqlite3.Error as exc:
        raise UsersError(f"{path}: {exc}") from None
    finally:
        db.close()


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
    if auth.users is None:
        print("e2m-proxy users: [auth] db_url names your own database; manage its "
              f"{auth.table} table with its own tools (kamctl add)", file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            for name in list_users(auth.users, auth.table):
                print(name)
        elif args.command == "add":
            _check_name(args.name)
            new = add_user(auth.users, auth.table, auth.realm, args.name,
                           read_password(sys.stdin))
            print(f"{'added' if new else 'changed'} {args.name} (realm {auth.realm})")
        else:
            if not remove_user(auth.users, auth.table, auth.realm, args.name):
                print(f"e2m-proxy users: no user {args.name!r}", file=sys.stderr)
                return 1
            print(f"removed {args.name}")
    except UsersError as exc:
        print(f"e2m-proxy users: {exc}", file=sys.stderr)
        return 1
    return 0
