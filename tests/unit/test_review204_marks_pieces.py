"""Review 204: attacker's review of 3090404 (``e2m_plugins/cli/terminal.py``: the
review 202 fix, marks judged by their visible neighbours, ``_Pieces`` over the terminal
streams).

Hole K1: a combining mark on an ASCII letter is a "visible non-ASCII" neighbour
- Attacker: any sender of text the tools print (a Call-ID, a display name, a reason
  phrase, a certificate's name).
- Messages: ``c\u0301<RLM>\u0301d`` or ``a\u0301<ZWJ>\u0301b``.
- Effect observed: ``terminal_text`` keeps the RLM and the ZWJ raw (``'ć\u200f́d'``,
  ``'á\u200d́b'``): two different values show alike, in Latin text where the rule means
  to write every mark out ("a mark beside ASCII alnum written out").  A combining mark
  is category M, so ``_visible_outside_ascii`` accepts it, and the ASCII check looks
  only at the mark, never at its base ``c``; its name is "COMBINING ...", so the
  Latin/Greek/Cyrillic check passes for a joiner too.
- Code at fault: e2m_plugins/cli/terminal.py:51 (``_visible_outside_ascii``: "LMNPS"
  takes M), :59-68 (``_neighbour`` stops at a combining mark), :82 and :85-86.
- Suggested fix: a neighbour is a grapheme's base: skip combining marks (category M)
  back to their base in ``_neighbour`` (and judge the base: ASCII alnum, Latin...).
- Test: test_k1_mark_between_combining_marks_on_ascii_is_written_out.

Hole K2: U+2800 BRAILLE PATTERN BLANK counts as a visible character
- Attacker: as K1.
- Messages: ``x\u2800<RLM>\u2800y``, ``\u2800<ZWJ>\u2800``.
- Effect observed: RLM and ZWJ kept raw (``'x⠀\u200f⠀y'``, ``'⠀\u200d⠀'``); U+2800 is
  So and shows as a blank, so the mark sits between two blanks and ``x⠀⠀y`` with and
  without it read the same.  (U+3000 and U+00A0 are Zs and are not counted visible:
  the RLM is written out beside them, held.)
- Code at fault: e2m_plugins/cli/terminal.py:51-52 (the blank list has the Hangul
  fillers but not U+2800; no check that the neighbour has ink).
- Suggested fix: add U+2800 to the characters that do not show (with the fillers), or
  count a neighbour visible only outside Z* and the blank-looking So.
- Test: test_k2_mark_beside_braille_blank_is_written_out.

Hole K3: variation selectors kept after any non-ASCII character, and in runs
- Attacker: as K1.
- Messages: ``caf\u00e9\ufe00`` (VS1 after a Latin-1 letter), ``e\u0301\ufe00`` (after
  a combining mark), ``\U0001F600`` + three U+FE0F.
- Effect observed: all kept raw (``'café︀'``, ``'é︀'``, ``'😀️️️'``): a selector after a
  letter with no variation sequence shows as nothing, so ``café`` and ``café<VS1>``
  read alike; a run of selectors is never honest (one selects a variant).
- Code at fault: e2m_plugins/cli/terminal.py:42 (``[selectors]+``: a run is one match),
  :75 (any ``_visible_outside_ascii`` base, Latin and combining marks included).
- Suggested fix: keep one selector only, only after an emoji/CJK/Mongolian base (or
  the keycap); write out the rest of a run.
- Test: test_k3_selector_after_latin_letter_is_written_out,
  test_k3_run_of_selectors_is_written_out.

Hole K4: a flush cuts the stream: the next piece is judged without the held marks
- Attacker: as K1; the tools flush between pieces (``print(..., flush=True)``,
  ``input()``), and the launcher's pump flushes ``sys.stderr.buffer`` after every batch,
  where a line over 64 KiB arrives in pieces (launcher.py:658-659, LogCutter.LIMIT).
- Messages: ``\u05d0<RLM>`` | flush | ``<RLM>\u05d0``; ``\u05d0<RLM>`` | flush | ``123``.
- Effect observed (through a pty, ``guard_terminal``): both RLMs reach the terminal raw
  (2 raw RLM, the whole stream gives 0: "two marks in a row written out"); an RLM
  before ASCII digits raw (whole stream: written out).  ``flush`` judges the held mark
  with no right neighbour (kept), and the context after it is "" (the last character
  was the mark), so the second mark is judged with no left one.
- Code at fault: e2m_plugins/cli/terminal.py:141-162 (``final`` releases the held tail
  judged as at the end of the stream; ``_context`` forgets a written invisible tail),
  :209-213, :182-186.
- Suggested fix: at a flush, judge a held mark as if an unknown (unsafe) character
  followed: write it out; keep the last ordinary character and the invisibles written
  after it as the context, so a mark after a flushed mark is still "two in a row".
- Test: test_k4_flush_between_marks_pty, test_k4_flush_before_digits.

Controls
- Honest text still kept: Hebrew word + RLM, Devanagari conjunct ZWJ, emoji ZWJ
  sequence, emoji + VS16, keycap; ``a<RLM>b`` written out (test_control_honest_kept).
- Pieces without a flush judge as the whole stream for K4's messages
  (test_control_pieces_without_flush_match_whole).
- The 64 Ki bound: 70 000 one-character writes of U+200B: at most 65 536 characters
  held, all written out at the bound and at flush (test_control_hold_bound).

Tried and held
- U+3000 and U+00A0 beside an RLM: written out (Zs is not "visible").
- Arabic-Indic digits ``\u0661<RLM>\u0662``: kept (the rule lets a mark stand in RTL
  text; not counted as a hole).  ``a\u0336b`` (strike-through on ASCII): shown as
  drawn, homoglyph-like, out of scope.
- ``input(prompt)`` under ``guard_terminal`` in a pty: the prompt is escaped
  (``\\x1b[31mPROMPT\\u202e?``) and shows before the read (input flushes).
- The context prefix trick: the context is one ordinary character (never a mark, a
  selector or CR), so its rendering does not depend on what follows; CR LF split
  across writes is joined (the CR is held).
- Cost (200 000 writes to a StringIO through SafeTerminal): 1-char ASCII 0.32 s,
  1-char U+200B 0.46 s, ``\u05d0<RLM>`` 0.84 s, 1-char CR 0.27 s, emoji then 200 000
  VS16 0.39 s; 20 000 writes of 100 Hebrew letters + RLM 0.19 s.  No quadratic growth.

Fixed (stop 51): leftwards a combining mark stands for its base, and an honest
neighbour is a letter, digit, punctuation or symbol outside ASCII that shows (no lone
combining mark, no blank such as U+2800) (K1, K2); a variation selector stays only
alone, after a character it varies (an emoji or symbol outside Latin, Greek and
Cyrillic, a CJK ideograph, a Mongolian letter) or in a keycap (K3); at a flush the held
invisibles are written out and what follows sees an ASCII letter before it (K4).
"""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2m_plugins.cli.terminal import SafeTerminal, _Pieces, terminal_text

RLM, ZWJ = "\u200f", "\u200d"
ROOT = Path(__file__).resolve().parents[2]


def test_k1_mark_between_combining_marks_on_ascii_is_written_out():
    assert RLM not in terminal_text("c\u0301" + RLM + "\u0301d")
    assert ZWJ not in terminal_text("a\u0301" + ZWJ + "\u0301b")


def test_k2_mark_beside_braille_blank_is_written_out():
    assert RLM not in terminal_text("x\u2800" + RLM + "\u2800y")
    assert ZWJ not in terminal_text("\u2800" + ZWJ + "\u2800")


def test_k3_selector_after_latin_letter_is_written_out():
    assert "\ufe00" not in terminal_text("caf\u00e9\ufe00")
    assert "\ufe00" not in terminal_text("e\u0301\ufe00")


def test_k3_run_of_selectors_is_written_out():
    shown = terminal_text("\U0001F600" + "\ufe0f" * 3)
    assert shown.count("\ufe0f") <= 1


def _pty_run(code: str) -> bytes:
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["PYTHONPATH"] = str(ROOT)
        os.execv(sys.executable, [sys.executable, "-c", code])
    out = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        out += data
    os.waitpid(pid, 0)
    os.close(fd)
    return out


_K4_CHILD = (
    "import sys\n"
    "from e2m_plugins.cli.terminal import guard_terminal\n"
    "guard_terminal()\n"
    "sys.stdout.write('\\u05d0\\u200f'); sys.stdout.flush()\n"
    "sys.stdout.write('\\u200f\\u05d0\\n'); sys.stdout.flush()\n")


def test_k4_flush_between_marks_pty():
    whole = terminal_text("\u05d0" + RLM + RLM + "\u05d0\n")
    assert RLM not in whole                        # the rule: two in a row written out
    out = _pty_run(_K4_CHILD)
    assert "\u05d0".encode() in out                # the child ran
    assert RLM.encode() not in out, out


def test_k4_flush_before_digits():
    assert RLM not in terminal_text("\u05d0" + RLM + "123")
    sink = io.StringIO()
    term = SafeTerminal(sink)
    term.write("\u05d0" + RLM)
    term.flush()
    term.write("123\n")
    term.flush()
    assert RLM not in sink.getvalue(), repr(sink.getvalue())


def test_control_honest_kept():
    for honest in ("\u05e9\u05dc\u05d5\u05dd" + RLM + " \u05d0",
                   "\u0915\u094d" + ZWJ + "\u0937",
                   "\U0001F468" + ZWJ + "\U0001F469",
                   "\u2764\ufe0f",
                   "1\ufe0f\u20e3"):
        assert terminal_text(honest) == honest
    assert RLM not in terminal_text("a" + RLM + "b")


def test_control_pieces_without_flush_match_whole():
    for parts in (["\u05d0" + RLM, RLM + "\u05d0\n"], ["\u05d0" + RLM, "123\n"],
                  ["x\u3000", RLM, "\u3000y\n"]):
        pieces = _Pieces()
        got = "".join(pieces.feed(part) for part in parts) + pieces.feed("", final=True)
        assert got == terminal_text("".join(parts))


def test_control_hold_bound():
    pieces = _Pieces()
    out, most = [], 0
    for _ in range(70000):
        out.append(pieces.feed("\u200b"))
        most = max(most, len(pieces._held))
    out.append(pieces.feed("", final=True))
    assert most <= 1 << 16
    assert "".join(out) == "\\u200b" * 70000
