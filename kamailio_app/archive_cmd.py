"""``e2m archive``: read the IM archive and media record an E2M proxy wrote.

``list`` prints one line per archived body (never its text); ``show ID`` prints the
record and the media streams of its call, and writes the plaintext only to
``--out`` (``-`` for stdout), as every ``e2m`` command does with decrypted content.
The archive is found with ``--db FILE`` or through ``--config PROXY.toml``
(its ``[archive] path``, or with ``[cluster] db_url`` the shared PostgreSQL one).  The group reaches ``e2m`` through the ``e2m.commands``
entry point (pyproject.toml): the core's command line never imports the Kamailio app.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from e2m_plugins.cli import (CliFailure, Group, UsageError, positive_int, printable,
                             write_output)

from .archive import Archive, ArchiveError
from .archive_store import open_shared
from .config import load_app_config

__all__ = ["GROUP"]


def _archive(args: argparse.Namespace) -> Any:
    if bool(args.db) == bool(args.config):
        raise UsageError("give exactly one of --db FILE or --config PROXY.toml")
    if args.db:
        path = Path(args.db)
    else:
        settings = load_app_config(args.config)    # AppConfigError is a ValueError: exit 1
        if settings.archive.shared:
            return open_shared(settings)          # [cluster] db_url: PostgreSQL
        if settings.archive.path is None:
            raise CliFailure(f"{args.config} has no [archive] path")
        path = settings.archive.path
    if not path.is_file():
        raise CliFailure(f"no archive at {path}")
    return Archive(path, busy_timeout_ms=2000)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(call: Any) -> Any:
    try:
        return call()
    except ArchiveError as exc:
        raise CliFailure(str(exc)) from None


def _cmd_list(args: argparse.Namespace) -> int:
    archive = _archive(args)
    rows = _read(lambda: archive.bodies(limit=args.limit, call_id=args.call_id))
    if args.json:
        print(json.dumps([row.summary() for row in rows], indent=2))
        return 0
    if not rows:
        print("(archive is empty)")
        return 0
    print(f"{'ID':>5}  {'TIME (UTC)':20}  {'METHOD':8} {'DIR':8} {'TYPE':24} {'BYTES':>6}  "
          f"{'SIGNATURE':9}  FROM -> TO  CALL-ID")
    for row in rows:    # escaped: a stored field is what a sender wrote (review 61)
        print(printable(f"{row.id:>5}  {_when(row.time):20}  {row.method:8} {row.direction:8} "
                        f"{row.content_type[:24]:24} {len(row.plaintext):>6}  "
                        f"{row.signature:9}  {row.from_uri or '-'} -> {row.to_uri or '-'}"
                        f"{_sent_to(row)}  {row.call_id}"))
    return 0


def _sent_to(row: Any) -> str:
    """Where the request went (the Request-URI, and a Route set's next hop it followed)
    when that is not the party the row names: the To of a request, the sender of an
    answer (reviews 32, 33)."""
    party = row.to_uri if row.direction == "request" else row.from_uri
    if row.request_uri and row.request_uri != party:
        return f" (sent to {row.request_uri})"
    return ""


def _cmd_show(args: argparse.Namespace) -> int:
    archive = _archive(args)
    row = _read(lambda: archive.body(args.id))
    if row is None:
        raise CliFailure(f"no archived body with id {args.id}")
    media = _read(lambda: archive.media(call_id=row.call_id))
    if args.out:
        write_output(args.out, row.plaintext, private=True)
        if args.out == "-":
            return 0
    info = row.summary()
    if args.json:
        print(json.dumps({**info, "media": media}, indent=2))
        return 0
    info["time"] = _when(row.time)
    # escaped: a stored field is what a sender wrote, escape sequences and all (review 61)
    for key, value in info.items():
        print(printable(f"{key:13} {value if value is not None else '-'}"))
    for item in media:
        rtcp = "" if item.get("rtcp_port") is None else \
            f" rtcp {item.get('rtcp_address') or item['address'] or '-'}:{item['rtcp_port']}"
        print(printable(f"media         {item['method']} {item['direction']} {item['media']} "
                        f"{item['address'] or '-'}:{item['port']} {item['proto']} "
                        f"{item['codecs']} {item['flow'] or ''}".rstrip() + rtcp))
    if not args.out:
        print("(plaintext not shown; use --out FILE or --out - to read it)")
    return 0


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="FILE", help="the archive's SQLite file")
    parser.add_argument("--config", metavar="PROXY.toml",
                        help="find the archive in [archive] path or [cluster] db_url")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("list", help="one line per archived body (no text)",
                            description="List archived bodies, oldest first, without their text.")
    _where(p)
    p.add_argument("--limit", type=positive_int, default=50, help="the newest N bodies (default 50)")
    p.add_argument("--call-id", help="only bodies of this Call-ID")
    p.set_defaults(handler=_cmd_list)

    p = commands.add_parser("show", help="one archived body, its call's media; text with --out",
                            description="Show one archived body and the media streams of its "
                                        "call.  The plaintext goes only to --out.")
    p.add_argument("id", type=positive_int, metavar="ID")
    _where(p)
    p.add_argument("--out", metavar="FILE", help="write the plaintext here ('-' for stdout)")
    p.set_defaults(handler=_cmd_show)


GROUP = Group("archive", "read the IM archive and media record of an E2M proxy", _add_commands)
