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
# Kept only where honest text needs them (reviews 202, 204, 206), written out anywhere
# else: a variation selector, alone, right after what it varies (``_selector_kept``);
# a joiner (U+200C, U+200D) between two characters of a joining script or two emoji
# (``_joins``); a directional mark (LRM, RLM, ALM) beside a strong right-to-left
# letter, with no ASCII letter or digit beside it.  A neighbour is the next visible
# character (up to four invisible ones skipped); on the left, a combining mark stands
# for its base (an accent on "c" for "c").  Two marks in a row, or two selectors, are
# written out.
_SELECTORS = "\u180b\u180c\u180d\u180f\ufe00-\ufe0f\U000e0100-\U000e01ef"
_KEPT_IF_HONEST = re.compile(f"[\u061c\u200c-\u200f]{{2,}}|[\u061c\u200c-\u200f]|[{_SELECTORS}]+")
_SELECTOR = re.compile(f"[{_SELECTORS}]")
_JOINERS = "\u200c\u200d"
_BLANKS = "\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0"
_LOOK = 4          # invisible characters (or combining marks) skipped to find a neighbour


def _honest(ch: str) -> bool:
    """A letter, digit, punctuation or symbol outside ASCII that shows."""
    return ch > "\x7f" and unicodedata.category(ch)[0] in "LNPS" \
        and not _SELECTOR.match(ch) and ch not in _BLANKS


def _script(ch: str) -> str:
    return unicodedata.name(ch, "").split(" ", 1)[0]


def _invisible(ch: str) -> bool:
    return bool(_SELECTOR.match(ch)) or unicodedata.category(ch) == "Cf"


def _neighbour(text: str, at: int, step: int) -> str:
    """The first visible character from ``at`` in direction ``step`` ("" if none near);
    leftwards, a combining mark's base instead of the mark."""
    for _ in range(_LOOK + 1):
        if not 0 <= at < len(text):
            return ""
        ch = text[at]
        if not _invisible(ch):
            if step > 0 or unicodedata.category(ch)[0] != "M":
                return ch
        at += step
    return ""


# Scripts that honestly join with U+200C/U+200D (Arabic-script Persian and Urdu, the
# Indic scripts, Syriac, Mongolian...); elsewhere (CJK, Hangul, Latin, fullwidth) a
# joiner only hides (review 206 K3)
_JOINING_SCRIPTS = frozenset((
    "ARABIC", "SYRIAC", "NKO", "MANDAIC", "DEVANAGARI", "BENGALI", "GURMUKHI", "GUJARATI",
    "ORIYA", "TAMIL", "TELUGU", "KANNADA", "MALAYALAM", "SINHALA", "MYANMAR", "KHMER",
    "TIBETAN", "MONGOLIAN"))


def _joins(ch: str) -> bool:
    """A neighbour a joiner may honestly stand by: an emoji or symbol, or a letter or
    combining mark (a virama: review 206 HB1) of a joining script."""
    if ch <= "\x7f" or ch in _BLANKS or _SELECTOR.match(ch):
        return False
    category = unicodedata.category(ch)
    return category in ("So", "Sk") or (category[0] in "LM" and _script(ch) in _JOINING_SCRIPTS)


def _right_to_left(ch: str) -> bool:
    """A strong right-to-left letter: what an RLM, LRM or ALM honestly stands by (beside
    punctuation a mark reorders the digits past it: review 206 K1)."""
    return ch > "\x7f" and unicodedata.bidirectional(ch) in ("R", "AL")


def _selector_kept(text: str, run: str, start: int, end: int) -> bool:
    """A variation selector, alone, after what it varies: U+FE0E/FE0F after an emoji or
    symbol (or in a keycap), the others after a math symbol or a CJK ideograph, the
    ideographic ones after a CJK ideograph, the Mongolian ones after a Mongolian letter
    (review 206 K2: not after any character at all)."""
    if len(run) > 1 or not start:
        return False
    base = text[start - 1]
    if run == "\ufe0f" and base in "0123456789#*" and text[end:end + 1] == "\u20e3":
        return True                                            # a keycap
    if not _honest(base):
        return False
    category, script = unicodedata.category(base), _script(base)
    if run >= "\U000e0100":
        return script == "CJK"
    if run < "\ufe00":
        return script == "MONGOLIAN"
    if run in "\ufe0e\ufe0f":
        return category in ("So", "Sm", "Sk")
    return category == "Sm" or script == "CJK"


def _kept_if_honest(text: str, match: re.Match[str]) -> str:
    run, start, end = match.group(0), match.start(), match.end()
    if _SELECTOR.match(run[0]):
        kept = _selector_kept(text, run, start, end)
        return run if kept else "".join(map(_written_out, run))
    if len(run) > 1:
        return "".join(map(_written_out, run))
    left, right = _neighbour(text, start - 1, -1), _neighbour(text, end, 1)
    if any(ch.isascii() and ch.isalnum() for ch in (left, right)):
        return _written_out(run)
    if run in _JOINERS:
        kept = _joins(left) and _joins(right)
    else:
        kept = _right_to_left(left) or _right_to_left(right)
    return run if kept else _written_out(run)


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
        # what is held is all invisible: only the new text's tail needs a look
        end = len(new)
        while end and not _ordinary(new[end - 1]):
            end -= 1
        ordinary_end = len(self._held) + end if end else 0
        piece, tail = text[:ordinary_end], text[ordinary_end:]
        if not final and len(tail) < _HOLD_AT_MOST:
            self._held = tail
            return self._shown(piece)
        # a flush (or too much held): the trailing invisibles are written out whatever
        # follows, and what follows sees an ASCII letter before it, as their written-out
        # form ends in one (review 204 K4)
        self._held = ""
        shown = self._shown(piece) + terminal_text(tail)
        if tail:
            self._context = "x"
        return shown

    def _shown(self, piece: str) -> str:
        if not piece:
            return ""
        shown = terminal_text(self._context + piece)
        if self._context:
            shown = shown[len(terminal_text(self._context)):]
        self._context = piece[-1]           # ordinary: the piece ends where one does
        return shown


class _SafeBuffer:
    """A terminal's binary stream that writes ``for_terminal`` of what it is given; a
    character split across two writes is decoded whole (review 195), and judged as in
    the whole stream (``_Pieces``)."""

    def __init__(self, raw: Any, encoding: str, pieces: _Pieces | None = None,
                 text: Any = None) -> None:
        self._raw = raw
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        # one terminal, one stream: its text side's pieces and ours are judged together
        # (review 206 K4), and its text goes out first
        self._pieces = pieces if pieces is not None else _Pieces()
        self._text = text

    def write(self, data: bytes) -> int:
        if self._text is not None:
            self._text.flush()
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
        self.buffer = _SafeBuffer(stream.buffer, encoding, self._pieces, stream) \
            if hasattr(stream, "buffer") else None

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
