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
import unicodedata
from typing import Any

# What a terminal would obey, or shows as nothing so that one value reads as another:
# C0 controls but tab and newline, DEL, C1 controls (CSI is U+009B), the line and
# paragraph separators, the bidi marks, embeddings, overrides and isolates (they
# reorder what follows), the interlinear annotation marks (review 197), the other
# format characters (zero-width space, word joiner, BOM, soft hyphen, tags: review 201,
# a Call-ID "ab<U+200B>c" in the log read "abc"), and the octets that were not UTF-8
# (surrogate escapes).  The two joiners (U+200C, U+200D) and the three directional
# marks (LRM, RLM, ALM: ``_MARKS``) stay beside a letter or symbol of another script,
# where honest text needs them (Persian, Arabic, Indic, emoji sequences), and are
# written out anywhere else (beside ASCII or each other), where they only hide.  Tags are written out even in
# a flag's tag sequence: shown as code points, not as the region's flag.
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u0600-\u0605\u06dd\u070f\u0890\u0891"
    "\u08e2\u180e\u200b\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff"
    "\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f\udc80-\udcff]")
_MARKS = re.compile("[\u061c\u200c-\u200f]+")    # runs of joiners and directional marks
_MARKS_WRITTEN_OUT = {code: f"\\u{code:04x}" for code in (0x061C, 0x200C, 0x200D, 0x200E, 0x200F)}


def _honest_neighbour(ch: str) -> bool:
    """A character a joiner or mark may honestly stand beside: a letter, mark, digit,
    punctuation or symbol outside ASCII (Arabic, Persian, Indic, an emoji)."""
    return ch > "\x7f" and unicodedata.category(ch)[0] in "LMNPS"


def _escaped(match: re.Match[str]) -> str:
    return _written_out(match.group(0))


def _written_out(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def terminal_text(text: str) -> str:
    """``text`` with what a terminal would obey written out (``\\x1b``, ``\\u202e``)."""
    text = text.replace("\r\n", "\n")
    if _MARKS.search(text):
        def marks(match: re.Match[str]) -> str:
            # inside a run each mark's neighbours are marks: only the first may stand
            # beside an honest character before it, only the last beside one after it
            start, end, run = match.start(), match.end(), match.group(0)
            shown = run.translate(_MARKS_WRITTEN_OUT)      # six characters each
            if end < len(text) and _honest_neighbour(text[end]):
                shown = shown[:-6] + run[-1]
            if start > 0 and _honest_neighbour(text[start - 1]):
                shown = run[0] + shown[6:]
            return shown
        text = _MARKS.sub(marks, text)
    return _UNSAFE.sub(_escaped, text)


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
