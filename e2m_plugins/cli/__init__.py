"""The ``e2m`` command: one parser, subcommand groups registered by name.

Each group (``cms``, ``pki``, ``sip``, ``demo``) lives in its own module and exposes
``GROUP``, a ``Group`` that adds its subcommands to the parser; a group of an adapter
(``archive``, from ``kamailio_app``) comes through the ``e2m.commands`` entry point.  ``main`` builds the parser from the registry, runs the chosen handler
and turns failures into exit codes:

* 0 - success;
* 1 - a cryptographic or input failure (any ``E2MError``, an unreadable file),
  reported as ONE line ``e2m: error: <message>`` on stderr;
* 2 - a usage error (argparse's own convention, also for our cross-option
  checks such as ``--kek-id`` without ``--kek``).

Handlers never print plaintext, content keys or private keys; only ``--out``
receives decrypted or verified content.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import E2MError
from ..config import ConfigError
from .terminal import guard_terminal

__all__ = ["printable", "Group", "UsageError", "CliFailure", "register_group", "build_parser", "main",
           "read_input", "write_output", "positive_int"]

PROG = "e2m"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Options that parse but do not fit together; exits 2 with the usage line."""


class CliFailure(Exception):
    """A failure that is not an ``E2MError`` but is still the input's fault (exit 1)."""


Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Group:
    """A subcommand group: ``add_commands`` receives the group's own subparsers.

    Each command parser must ``set_defaults(handler=...)``; the handler gets
    the parsed namespace and returns an exit code.
    """

    name: str
    help: str
    add_commands: Callable[[argparse._SubParsersAction], None]


# Modules that define the built-in groups, imported when the parser is built.
_BUILTIN_MODULES = ("e2m_plugins.cli.cms_cmd", "e2m_plugins.cli.pki_cmd", "e2m_plugins.cli.demo_cmd",
                    "e2m_plugins.cli.sip_cmd")
# Groups that live in an adapter (``e2m archive`` is the Kamailio app's) are entry points
# of this group, so the core never imports an adapter.
ENTRY_POINT_GROUP = "e2m.commands"
_REGISTRY: dict[str, Group] = {}


def register_group(group: Group) -> None:
    """Add (or replace) a subcommand group, e.g. from a plugin or a test."""
    _REGISTRY[group.name] = group


def _load_builtin_groups() -> None:
    for module_name in _BUILTIN_MODULES:
        module = importlib.import_module(module_name)
        group = getattr(module, "GROUP")
        _REGISTRY.setdefault(group.name, group)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            group = entry.load()
        except ImportError as exc:   # an adapter that is not installed: its group is left out
            print(f"{PROG}: warning: {entry.name} commands unavailable: {exc}", file=sys.stderr)
            continue
        if isinstance(group, Group):
            _REGISTRY.setdefault(group.name, group)


def build_parser() -> argparse.ArgumentParser:
    """The full ``e2m`` parser with every registered group."""
    _load_builtin_groups()
    parser = argparse.ArgumentParser(
        prog=PROG, description="End-to-middle S/MIME for SIP: CMS and test-PKI tools.")
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for group in _REGISTRY.values():
        sub = groups.add_parser(group.name, help=group.help, description=group.help)
        commands = sub.add_subparsers(dest="command", metavar="COMMAND", required=True)
        group.add_commands(commands)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the chosen subcommand, so usage errors show its own usage line."""
    found = parser
    for name in (args.group, args.command):
        action = next((a for a in found._actions if isinstance(a, argparse._SubParsersAction)), None)
        if action is None or name not in action.choices:
            break
        found = action.choices[name]
    return found


def _fail(message: str) -> int:
    # One line, whatever the message holds: keeps scripts and logs readable.
    text = " ".join(str(message).split()) or "failed"
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Run ``e2m`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    guard_terminal()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        try:
            _command_parser(parser, args).error(str(exc))
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else EXIT_USAGE
        return EXIT_USAGE  # pragma: no cover - error() always exits
    except E2MError as exc:
        return _fail(str(exc) or exc.__class__.__name__)
    except ConfigError as exc:
        # Several lines on purpose: one per mistake in the file.
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except CliFailure as exc:
        return _fail(str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    except ValueError as exc:
        # The core raises ValueError for caller mistakes it can name (a key that
        # does not fit its certificate, a bad KEK length); messages hold no secrets.
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


_CONTINUATION = "\n  "     # our own multi-line events indent their second line


def printable(text: str) -> str:
    """``text`` with everything a terminal would not show as itself escaped: bytes
    that were not UTF-8 (surrogate escapes) as ``\\xNN``, control and format
    characters (escape sequences, bidi overrides) as ``\\xNN``/``\\uNNNN``; our
    own line breaks (a newline and two spaces) are kept."""
    out = []
    for index, ch in enumerate(text):
        code = ord(ch)
        if ch == "\n" and text.startswith(_CONTINUATION, index):
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def positive_int(text: str) -> int:
    """argparse ``type`` for a count or an id: a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# ------------------------------------------------------------ shared file I/O

def read_input(path: str, what: str = "input") -> bytes:
    """Bytes of ``path`` (``-`` is stdin); an unreadable file is a ``CliFailure``."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliFailure(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def write_output(path: str, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` (``-`` is stdout).

    On a terminal guarded by ``terminal.guard_terminal``, stdout shows ``data``
    escaped.  ``private`` writes a new file, 0600 from the start, and renames it over
    ``path``:
    decrypted content must not become readable by others through a loose umask, nor
    through a file that already exists with a looser mode or someone's open
    descriptor on it (review 73).
    """
    if path == "-":
        out: BinaryIO = sys.stdout.buffer
        out.write(data)       # a terminal's buffer escapes it (terminal.guard_terminal)
        out.flush()
        return
    try:
        if private:
            target = Path(path)
            fd, temporary = tempfile.mkstemp(dir=target.parent or ".",
                                             prefix=f".{target.name}.")   # 0600
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(temporary, target)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        else:
            Path(path).write_bytes(data)
    except OSError as exc:
        raise CliFailure(f"cannot write {path}: {exc.strerror or exc}") from None
