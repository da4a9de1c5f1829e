"""What the command-line tools write to a terminal: text an attacker chose (a name in a
certificate, a reason phrase, an archived message, an error quoting input) shown as
text, never obeyed as an escape sequence (reviews 191, 193).

``guard_terminal`` wraps a process's stdout and stderr where they are terminals, so
every line any command prints passes ``terminal_text``; a pipe or a file gets exactly
what was written."""

from __future__ import annotations

import codecs
import io
import re
import sys
from typing import Any

# C0 controls but tab and newline, DEL, C1 controls (CSI is U+009B), the line and
# paragraph separators (a line break no one sees as one), the bidi embeddings,
# overrides and isolates (they reorder what follows), the interlinear annotation
# marks (they hide what they enclose: review 197), and the octets that were not UTF-8
# (surrogate escapes).  Spaces of any script, joiners and marks stay.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                     "\ufff9-\ufffb\udc80-\udcff]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def terminal_text(text: str) -> str:
    """``text`` with what a terminal would obey written out (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_escaped, text.replace("\r\n", "\n"))


def for_terminal(data: bytes, encoding: str = "utf-8") -> bytes:
    """Octets meant for a terminal of ``encoding``, through ``terminal_text`` (read as
    UTF-8, other octets as ``\\xNN``); what the terminal cannot show is written out
    too, so no octet of a UTF-8 character reaches an 8-bit terminal as a C1 control
    (review 195: U+201B is E2 80 9B, and 9B is CSI)."""
    return terminal_text(data.decode("utf-8", "surrogateescape")).encode(
        encoding, "backslashreplace")


class _SafeBuffer:
    """A terminal's binary stream that writes ``for_terminal`` of what it is given; a
    character split across two writes is decoded whole (review 195)."""

    def __init__(self, raw: Any, encoding: str) -> None:
        self._raw = raw
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")

    def write(self, data: bytes) -> int:
        text = self._decoder.decode(bytes(data))
        if text:
            self._raw.write(terminal_text(text).encode(self._encoding, "backslashreplace"))
        return len(data)

    def flush(self) -> None:
        rest = self._decoder.decode(b"", final=True)
        if rest:
            self._raw.write(terminal_text(rest).encode(self._encoding, "backslashreplace"))
        self._raw.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class SafeTerminal(io.TextIOBase):
    """A terminal's text stream that writes ``terminal_text`` of what it is given."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._stream = stream
        encoding = getattr(stream, "encoding", None) or "utf-8"
        self.buffer = _SafeBuffer(stream.buffer, encoding) if hasattr(stream, "buffer") else None

    def write(self, text: str) -> int:
        self._stream.write(terminal_text(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        return self._stream.encoding


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def guard_terminal() -> None:
    """Wrap this process's stdout and stderr, where they are terminals, in
    ``SafeTerminal``; call it first in a command's ``main``."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SafeTerminal) and _is_terminal(stream):
            setattr(sys, name, SafeTerminal(stream))
