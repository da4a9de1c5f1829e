"""``e2m-proxy db init|upgrade|status|replay --config PROXY.toml``: the databases
PROXY.toml names, made and migrated by the operator, not by a running proxy.

- ``init`` makes what is missing: the archive's tables at the current schema version
  (PostgreSQL with ``[cluster] db_url``, else the ``[archive] path`` file; a cluster
  of E2M nodes gets them for its replay claims even without ``[archive]``) and, for
  users in PostgreSQL, Kamailio's ``version`` and ``subscriber`` tables (its own
  scripts); the SQLite users file as the proxy would; with ``[cluster]`` and
  ``[certs]``, the certificate service's tables.  An archive already there at
  the current version is left alone; an older one is not touched: ``upgrade`` does
  that.
- ``upgrade`` migrates the archive (its versioned steps in one transaction) from any
  older version (the SQLite archive from before versioning is version 1).
- ``status`` prints each database's version and what waits in this node's spool
  (exit 1 when something needs ``init`` or ``upgrade``).
- ``replay`` moves this node's spool into PostgreSQL now (the proxy does it every
  second by itself).

Both ``init`` and ``upgrade`` may be run again and again (and from several nodes at
once: PostgreSQL migrations take an advisory lock).  URLs are printed with the
password masked.  Exit status: 0 done, 1 a database refused or is unreachable, 2 the
config is unusable.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from typing import Any

from e2m_plugins.cli.terminal import guard_terminal

from .archive import ArchiveError
from .archive_schema import ARCHIVE_VERSION, SchemaError
from .config import AppConfig, load_app_config
from .db_owner import TakeOverError, as_owner, grant_nodes
from .pgconn import driver_available, operational_errors

__all__ = ["main", "preflight"]


class _Failed(Exception):
    pass


def _archive_target(config: AppConfig) -> tuple[str, Any] | None:
    from .archive import SqliteArchive
    from .archive_store import open_shared
    if config.shared_schema and config.cluster is not None:
        what = "shared archive" if config.archive.shared else "shared database (replay claims)"
        return f"{what} {config.cluster.db.masked()}", open_shared(config)
    if config.archive.path is not None:
        return f"archive {config.archive.path}", SqliteArchive(config.archive.path)
    return None


def _version(store: Any) -> int:
    try:
        return store.version()
    except (ArchiveError, SchemaError, *operational_errors()) as exc:
        raise _Failed(f"cannot read the schema version: {type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def _migrate(config: AppConfig, *, create: bool, out: list[str]) -> None:
    target = _archive_target(config)
    if target is None:
        out.append("archive: none configured")
        return
    name, store = target
    found = _version(store)
    if create and 0 < found < ARCHIVE_VERSION:
        raise _Failed(f"{name}: schema version {found}; run e2m-proxy db upgrade")
    if found == ARCHIVE_VERSION:
        out.append(f"{name}: already at schema version {found}")
        return
    try:
        before, after = store.migrate(create=create)
    except (SchemaError, ArchiveError, sqlite3.Error) as exc:
        raise _Failed(f"{name}: {exc}") from None
    if before == after:
        out.append(f"{name}: already at schema version {after}")
        return
    verb = "created" if before == 0 else "upgraded"
    out.append(f"{name}: {verb} (schema version {before} -> {after})")


def _users(config: AppConfig, out: list[str]) -> None:
    from .users import ensure_pg_users, ensure_users_db
    auth = config.auth
    if auth is None:
        return
    if auth.pg is not None:
        made = ensure_pg_users(auth.pg, auth.table)
        out.append(f"users {auth.pg.masked()}: " +
                   (f"created {', '.join(made)}" if made else f"{auth.table} table present"))
    elif auth.users is not None:
        created = ensure_users_db(auth.users)
        out.append(f"users {auth.users}: {'created' if created else 'present'}")


def _certs(config: AppConfig, out: list[str]) -> None:
    """The certificate service's tables, in the shared database with ``[cluster]``."""
    if config.cluster is None or getattr(config, "certs", None) is None:
        return
    from .cert_table import CertTableError
    from .cert_table_pg import PostgresCertDatabase
    try:
        PostgresCertDatabase(config.cluster.db).ensure_schema()
    except CertTableError as exc:
        raise _Failed(str(exc)) from None
    out.append(f"certificate tables {config.cluster.db.masked()}: present")


def _status(config: AppConfig, out: list[str]) -> bool:
    target = _archive_target(config)
    good = True
    if target is None:
        out.append("archive: none configured")
    else:
        name, store = target
        found = _version(store)
        good = found == ARCHIVE_VERSION
        hint = "" if good else f" (this e2m-proxy needs {ARCHIVE_VERSION}: run e2m-proxy db " \
                               f"{'init' if found == 0 else 'upgrade'})"
        out.append(f"{name}: schema version {found}{hint}")
    spool = _spool(config)
    if spool is not None:
        out.append(f"spool {config.archive.spool}: {spool.pending()} messages waiting")
    return good


def _spool(config: AppConfig) -> Any:
    from .archive_store import open_spool
    spool = open_spool(config)
    return spool if spool is not None and spool.path.exists() else None


def _replay(config: AppConfig, out: list[str]) -> None:
    from .archive_spool import SpooledArchive
    from .archive_store import open_shared
    spool = _spool(config)
    if spool is None:
        out.append("no spool here")
        return
    archive = SpooledArchive(open_shared(config), spool,  # type: ignore[arg-type]
                             max_messages=config.archive.spool_max)
    moved = archive.replay(budget_s=3600.0)
    left = archive.pending()
    out.append(f"replayed {moved} messages; {left} still in the spool")
    if left:
        raise _Failed(f"{left} messages could not be replayed (is the database reachable?)")


def preflight(config: AppConfig) -> str | None:
    """Before Kamailio starts: None, or why it must not.  A database that cannot be
    reached now is no reason (the spool covers it); a missing driver or a schema this
    proxy cannot write is."""
    auth = config.auth
    if config.cluster is None and (auth is None or auth.pg is None):
        return None
    missing = driver_available()
    if missing is not None:
        return f"db_url: {missing}"
    if auth is not None and auth.pg is not None:
        problem = _users_preflight(auth.pg, auth.table, config)
        if problem is not None:
            return problem
    if not (config.e2m.enabled and config.shared_schema):
        return None
    from .archive_store import open_shared
    store = open_shared(config)
    url = config.cluster.db.masked()  # type: ignore[union-attr]
    try:
        found = store.version()  # type: ignore[attr-defined]
    except operational_errors():
        waits = ("archived messages wait in the spool" if config.archive.shared
                 else "each node's own replay table decides")
        print(f"e2m-proxy: warning: {url} is not reachable now; {waits} until it is",
              file=sys.stderr)
        return None
    if found != ARCHIVE_VERSION:
        return (f"{url}: schema version {found}, this e2m-proxy needs "
                f"{ARCHIVE_VERSION}: run e2m-proxy db {'init' if found == 0 else 'upgrade'} "
                f"--config {config.path}")
    return None


def _users_preflight(url: Any, table: str, config: AppConfig) -> str | None:
    """Kamailio's auth_db reads the users' database when its workers start and stops
    Kamailio when it cannot: say why before that happens."""
    from .users import UsersError, pg_users_ready
    try:
        if not pg_users_ready(url, table):
            return f"{url.masked()} has no {table} table (Kamailio's auth_db needs it): " \
                   f"run e2m-proxy db init --config {config.path}"
    except UsersError as exc:
        return (f"the users' database is not reachable ({exc}); Kamailio's auth_db "
                "connects to it when its workers start, so the proxy cannot start without it")
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e2m-proxy db",
        description="Make, migrate and inspect the databases of PROXY.toml (the archive, "
                    "and the users when they are in PostgreSQL).")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("init", "make what is missing, at the current schema version"),
                       ("upgrade", "migrate the archive schema to the current version"),
                       ("status", "schema versions and this node's spool"),
                       ("replay", "move this node's spool into the shared archive now")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", required=True, help="PROXY.toml")
        if name in ("init", "upgrade"):
            command.add_argument(
                "--owner-url", help="postgres://OWNER@HOST:PORT/DB (the password from "
                "E2M_OWNER_PASSWORD, else asked or read from stdin): make and own "
                "the shared tables as this account, and grant the nodes' account ([cluster] "
                "db_url) only what a node does (read, add rows); else the nodes' account owns "
                "them and can rewrite history")
    return parser


def _owner(config: AppConfig, url: str | None) -> Any:
    if url is None:
        return None
    from .pgconn import PgUrl, PgUrlError
    if config.cluster is None:
        raise _Failed("--owner-url is for the shared database of [cluster]")
    try:
        owner = PgUrl.parse(url)
    except PgUrlError as exc:
        raise _Failed(f"--owner-url: {exc}") from None
    db = config.cluster.db
    if (owner.host, owner.port, owner.database) != (db.host, db.port, db.database):
        # else the grants would go to another database than the one the nodes use
        raise _Failed(f"--owner-url names {owner.masked()}, not [cluster] db_url's "
                      f"database {db.masked()}: the same host, port and database, please")
    if not owner.password:
        # kept off the command line, which every local user sees in ps
        import getpass
        from dataclasses import replace
        password = os.environ.get("E2M_OWNER_PASSWORD") or (
            getpass.getpass(f"Password of {owner.user}: ") if sys.stdin.isatty()
            else sys.stdin.readline().rstrip("\n"))
        owner = replace(owner, password=password)
    return owner


def main(argv: list[str]) -> int:
    guard_terminal()          # it may be run on its own: what it lists, senders wrote
    args = _parser().parse_args(argv)
    try:
        config = load_app_config(args.config)
    except ValueError as exc:
        print(f"e2m-proxy db: {exc}", file=sys.stderr)
        return 2
    if config.cluster is not None and (missing := driver_available()) is not None:
        print(f"e2m-proxy db: {missing}", file=sys.stderr)
        return 2
    from .users import UsersError
    out: list[str] = []
    code = 0
    try:
        if args.command in ("init", "upgrade"):
            owner = _owner(config, args.owner_url)
            made = as_owner(config, owner) if owner is not None else config
            _migrate(made, create=args.command == "init", out=out)
            _users(made, out)
            _certs(made, out)
            if owner is not None:
                grant_nodes(config, owner, out)
            elif config.cluster is not None:
                out.append("warning: the nodes' account owns the shared tables, so its "
                           "password lets anyone rewrite or delete archived history; "
                           "give them to another account with --owner-url")
        elif args.command == "status":
            code = 0 if _status(config, out) else 1
        else:
            _replay(config, out)
    except (_Failed, TakeOverError, UsersError) as exc:
        if out:
            print("\n".join(out))
        print(f"e2m-proxy db: {exc}", file=sys.stderr)
        return 1
    print("\n".join(out))
    return code
