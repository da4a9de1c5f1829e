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

# What a terminal would obey, or shows as nothing so that one value reads as another,
# is written out: C0 controls but tab and newline, DEL, C1 controls (CSI is U+009B), the
# line and paragraph separators, the bidi embeddings, overrides and isolates (they
# reorder what follows), the interlinear annotation marks (review 197), the other
# format characters (zero-width space, word joiner, BOM, soft hyphen, tags: review 201,
# a Call-ID "ab<U+200B>c" in the log read "abc"), the fillers and the combining
# grapheme joiner, every unassigned default-ignorable code point (review 202), and the
# octets that were not UTF-8 (surrogate escapes).  Tags are written out even in a
# flag's tag sequence (shown as code points, not as the region's flag).
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u034f\u0600-\u0605\u06dd\u070f\u0890\u0891"
    "\u08e2\u115f\u1160\u17b4\u17b5\u180e\u200b\u2028-\u202e\u2060-\u206f\u3164"
    "\ufeff\uffa0\ufff0-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e00ff"
    "\U000e01f0-\U000e0fff\udc80-\udcff]")
# Kept only where honest text needs them (review 202), written out anywhere else:
# variation selectors right after a visible character outside ASCII (an emoji's,
# a CJK ideograph's, a Mongolian letter's), or U+FE0F in a keycap (``1`` FE0F 20E3);
# the joiners (U+200C, U+200D) between two such characters of a script other than
# Latin, Greek or Cyrillic (Persian, Indic, emoji sequences); the directional marks
# (LRM, RLM, ALM) beside one, with no ASCII letter or digit beside them.  A neighbour
# is the next visible character (up to four invisible ones skipped); two marks in a
# row are written out.
_SELECTORS = "\u180b\u180c\u180d\u180f\ufe00-\ufe0f\U000e0100-\U000e01ef"
_KEPT_IF_HONEST = re.compile(f"[\u061c\u200c-\u200f]{{2,}}|[\u061c\u200c-\u200f]|[{_SELECTORS}]+")
_SELECTOR = re.compile(f"[{_SELECTORS}]")
_JOINERS = "\u200c\u200d"
_LOOK = 4          # invisible characters skipped in looking for a neighbour


def _visible_outside_ascii(ch: str) -> bool:
    """A letter, mark, digit, punctuation or symbol outside ASCII that shows (not a
    selector, joiner or other ignorable: review 202 K1)."""
    return ch > "\x7f" and unicodedata.category(ch)[0] in "LMNPS" \
        and not _SELECTOR.match(ch) and ch not in "\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0"


def _latin_greek_cyrillic(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith(("LATIN", "GREEK", "CYRILLIC"))


def _neighbour(text: str, at: int, step: int) -> str:
    """The first visible character from ``at`` in direction ``step`` ("" if none near)."""
    for _ in range(_LOOK + 1):
        if not 0 <= at < len(text):
            return ""
        ch = text[at]
        if not (_SELECTOR.match(ch) or unicodedata.category(ch) == "Cf"):
            return ch
        at += step
    return ""


def _kept_if_honest(text: str, match: re.Match[str]) -> str:
    run, start, end = match.group(0), match.start(), match.end()
    before = text[start - 1] if start else ""
    if _SELECTOR.match(run[0]):
        honest = _visible_outside_ascii(before) or (
            run == "\ufe0f" and before in "0123456789#*" and before != ""
            and text[end:end + 1] == "\u20e3")
        return run if honest else "".join(map(_written_out, run))
    if len(run) > 1:
        return "".join(map(_written_out, run))
    left, right = _neighbour(text, start - 1, -1), _neighbour(text, end, 1)
    if any(ch.isascii() and ch.isalnum() for ch in (left, right)):
        return _written_out(run)
    if run in _JOINERS:
        honest = all(_visible_outside_ascii(ch) and not _latin_greek_cyrillic(ch)
                     for ch in (left, right))
    else:
        honest = _visible_outside_ascii(left) or _visible_outside_ascii(right)
    return run if honest else _written_out(run)


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
    """``text`` with what a terminal would obey, or would show as nothing, written out
    (``\\x1b``, ``\\u202e``, ``\\u200b``)."""
    text = text.replace("\r\n", "\n")
    if _KEPT_IF_HONEST.search(text):
        text = _KEPT_IF_HONEST.sub(lambda match: _kept_if_honest(text, match), text)
    return _UNSAFE.sub(_escaped, text)


def for_terminal(data: bytes, encoding: str = "utf-8") -> bytes:
    """Octets meant for a terminal of ``encoding``, through ``terminal_text`` (read as
    UTF-8, other octets as ``\\xNN``); what the terminal cannot show is written out
    too, so no octet of a UTF-8 character reaches an 8-bit terminal as a C1 control
    (review 195: U+201B is E2 80 9B, and 9B is CSI)."""
    return terminal_text(data.decode("utf-8", "surrogateescape")).encode(
        encoding, "backslashreplace")


_HOLD_AT_MOST = 1 << 16     # characters held back waiting for a visible one


def _ordinary(ch: str) -> bool:
    """Not invisible (no format character, no selector) and not a CR (CR LF is one)."""
    return ch != "\r" and not _SELECTOR.match(ch) and unicodedata.category(ch) != "Cf"


class _Pieces:
    """``terminal_text`` over a stream written in pieces, deciding as over the whole:
    trailing invisible characters (and a CR) wait for the next piece, and the last
    character written goes before the next piece as its context, so a mark or selector
    is judged by the same neighbours however the stream was cut (review 202)."""

    def __init__(self) -> None:
        self._context = ""          # the last character written: ordinary
        self._held = ""

    def feed(self, text: str, final: bool = False) -> str:
        new, text = text, self._held + text
        cut = len(text)
        if not final:
            # what is held is all invisible: only the new text's tail needs a look
            end = len(new)
            while end and not _ordinary(new[end - 1]):
                end -= 1
            if end:
                cut = len(self._held) + end
            elif len(text) < _HOLD_AT_MOST:
                cut = 0
        if not cut:
            self._held = text
            return ""
        piece, self._held = text[:cut], text[cut:]
        shown = terminal_text(self._context + piece)
        if self._context:
            shown = shown[len(terminal_text(self._context)):]
        last = piece[-1]
        self._context = last if _ordinary(last) else ""
        return shown


class _SafeBuffer:
    """A terminal's binary stream that writes ``for_terminal`` of what it is given; a
    character split across two writes is decoded whole (review 195), and judged as in
    the whole stream (``_Pieces``)."""

    def __init__(self, raw: Any, encoding: str) -> None:
        self._raw = raw
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._pieces = _Pieces()

    def write(self, data: bytes) -> int:
        shown = self._pieces.feed(self._decoder.decode(bytes(data)))
        if shown:
            self._raw.write(shown.encode(self._encoding, "backslashreplace"))
        return len(data)

    def flush(self) -> None:
        shown = self._pieces.feed(self._decoder.decode(b"", final=True), final=True)
        if shown:
            self._raw.write(shown.encode(self._encoding, "backslashreplace"))
        self._raw.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class SafeTerminal(io.TextIOBase):
    """A terminal's text stream that writes ``terminal_text`` of what it is given,
    judged as in the whole stream (``_Pieces``)."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._stream = stream
        self._pieces = _Pieces()
        encoding = getattr(stream, "encoding", None) or "utf-8"
        self.buffer = _SafeBuffer(stream.buffer, encoding) if hasattr(stream, "buffer") else None

    def write(self, text: str) -> int:
        shown = self._pieces.feed(text)
        if shown:
            self._stream.write(shown)
        return len(text)

    def flush(self) -> None:
        shown = self._pieces.feed("", final=True)
        if shown:
            self._stream.write(shown)
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
