"""Review 202: attacking b8a94a3's "honest neighbour" rule in the terminal guard
(``e2m_plugins/cli/terminal.py``: ``terminal_text``, ``_MARKS``, ``_honest_neighbour``).
The joiners (U+200C/D) and marks (LRM, RLM, ALM) stay raw when either neighbour is a
non-ASCII letter, mark, digit, punctuation or symbol; every other Cf is written out.

Hole K1: an invisible "honest" neighbour lets a mark stand between ASCII letters
- Attacker: whoever chooses a name the operator reads on a terminal (a Call-ID or URI in
  the launcher's Kamailio log, a certificate CN, ``--out -`` content).
- Messages: Call-ID ``ab<U+200D><U+FE0F>c``, ``ab<U+200E><U+034F>c``,
  ``ab<U+200F><U+180B>c``: the mark's neighbour is a variation selector, the combining
  grapheme joiner or a Mongolian variation selector: category Mn, so "honest", and
  invisible (glibc ``wcwidth`` 0 for U+FE0F, U+034F, U+180B).
- Effect observed: ``terminal_text`` returns each of the 3 unchanged (3 of 3 raw):
  the line reads ``abc``, review 201 K1's exact effect, on a line of ASCII only.
- Code at fault: e2m_plugins/cli/terminal.py:38-41 (``_honest_neighbour`` takes any
  non-ASCII L/M/N/P/S, visible or not); :66-69.
- Suggested fix: an honest neighbour must be visible: not a Default_Ignorable_Code_Point
  (U+034F, U+115F/60, U+17B4/5, U+180B-F, U+3164, U+FE00-FE0F, U+FFA0, U+E0100-E01EF);
  look past such characters to the next visible one (the emoji ``U+FE0F U+200D``
  case then still sees the emoji before the VS16).
- Test: test_k1_mark_beside_an_invisible_neighbour_between_ascii_is_written_out.

Hole K2: default-ignorable characters that are not Cf pass raw on their own
- Attacker, Messages: as K1, with the mark left out: ``ab<U+FE00>c``, ``ab<U+034F>c``,
  ``ab<U+E0100>c``, ``ab<U+17B4>c``, ``ab<U+115F>c``, ``ab<U+3164>c``.
- Effect observed: 267 of 267 assigned default-ignorable code points outside Cf
  (U+034F, U+115F, U+1160, U+17B4, U+17B5, U+180B-D, U+180F, U+3164, U+FFA0,
  U+FE00-FE0F, U+E0100-E01EF) are written raw wherever they stand, between ASCII
  letters too; wcwidth 0 for the variation selectors, CGJ, FVS, Khmer inherent vowels:
  ``ab<U+FE00>c`` reads ``abc``.  b8a94a3 closed Cf only; these are the same class.
- Code at fault: e2m_plugins/cli/terminal.py:29-33 (``_UNSAFE`` lists Cf, not
  Default_Ignorable_Code_Point).
- Suggested fix: write them out unless they follow an honest visible character they
  modify (VS15/16 after an emoji-capable symbol, U+E0100.. after a CJK ideograph,
  FVS after a Mongolian letter, CGJ/Khmer between letters of their script).
- Test: test_k2_default_ignorable_between_ascii_letters_is_written_out.

Hole K3: unassigned default-ignorable code points pass raw
- Messages: ``ab<U+2065>c``, ``ab<U+FFF0>c``, ``ab<U+E0080>c``, ``ab<U+E0FFF>c``.
- Effect observed: 3769 of 3769 (U+2065, U+FFF0-FFF8, U+E0000, U+E0002-E001F,
  U+E0080-E00FF, U+E01F0-E0FFF) raw; Unicode says a renderer shows them as nothing
  (they are reserved default-ignorable), so a newer terminal/font reads ``abc``.  No
  honest text contains an unassigned code point.
- Code at fault: e2m_plugins/cli/terminal.py:29-33.
- Suggested fix: write out every unassigned (Cn) code point, or at least these ranges.
- Test: test_k3_unassigned_default_ignorables_are_written_out.

Hole K4: a mark beside an ASCII letter is kept when its other neighbour is non-ASCII
- Messages: ``sip:bob@evil.example<RLM>ع`` (vs the same without the RLM),
  ``p<ZWJ>аypal`` (Cyrillic а), ``caf<ZWJ>é`` (Latin-1 é counts as "another script"),
  ``ع<LRM>123``.
- Effect observed: 4 of 4 unchanged: two different URIs/Call-IDs/names read the same;
  the LRM before digits also changes their display order (EN after AL becomes AN
  without it, L with it: ``ع123`` shows as ``123ع`` in an LTR line, ``ع<LRM>123`` as
  ``ع123``).  A joiner between an ASCII and a Latin-1/Cyrillic letter has no honest use.
- Code at fault: e2m_plugins/cli/terminal.py:66-69 (one honest side is enough).
- Suggested fix: write a mark out when either neighbour is an ASCII letter or digit;
  keep a joiner only when BOTH neighbours are honest and not Latin/Greek/Cyrillic.
  Residual by design: ``ع<RLM>`` vs ``ع`` at a line end still read the same.
- Test: test_k4_mark_beside_an_ascii_letter_or_digit_is_written_out.

Honest break HB1: a mark alone in one write of a terminal stream is written out
- Effect observed: ``"ع"``, ``"<ZWNJ>"``, ``"ع"`` as three ``buffer.write`` calls (or
  three ``SafeTerminal.write``: ``print`` writes each argument separately) show
  ``ع\\u200cع``; the same octets in one write show ``ع<ZWNJ>ع``.  Rare: only a write
  boundary on BOTH sides of the mark (``write_output`` writes ``--out -`` in one call).
  The decision is never looser across boundaries: a missing neighbour counts as
  not honest (see controls).
- Code at fault: e2m_plugins/cli/terminal.py:93-97, 118-120.
- Suggested fix: hold back a trailing run of marks (and one character) until the next
  write or ``flush``.
- Test: test_hb1_mark_alone_in_a_write_between_honest_neighbours_stays.

Honest break HB2: the three subdivision flags show as code points
- Effect observed: England/Scotland/Wales (U+1F3F4 + tags + U+E007F) show as
  ``🏴\\U000e0067...`` (by design in b8a94a3's comment); 3 of ~3,700 RGI emoji, the
  only tag sequences in use.
- Suggested fix: keep a tag run only as U+1F3F4, 5 tags among ``gbeng``/``gbsct``/
  ``gbwls``, U+E007F.
- Test: test_hb2_subdivision_flag_stays.

Controls (pass)
- test_control_honest_sequences_stay: rainbow flag (VS16+ZWJ), woman technologist with
  skin tone, ❤️‍🔥, Sinhala ශ්‍රී, Devanagari ZWNJ, Persian ZWNJ, Hebrew with RLM at the line
  start, Arabic with RLM at the line end: 8 of 8 unchanged.
- test_control_boundaries_never_loosen: 200 random split points of strings mixing ASCII,
  Arabic and marks through ``_SafeBuffer``: no mark raw in the split output that is
  written out in the whole one (0 of 200).
- test_control_cost_floods_linear: 4 M RLM, 2 M ``ع<RLM>``, 2 M ``a<RLM>``, 4 M
  surrogate escapes through ``terminal_text``: 0.66 / 1.95 / 1.34 / 1.79 s here, each
  2.0-2.3x its half-size run: linear, bounded.
- test_control_8mb_out_dash_on_a_pty: ``cms verify`` caps input at 256 KiB
  (cms/limits.py: "body of 8389183 bytes exceeds the limit of 262144"), so 8 MB of
  ``ع<RLM>a`` went through ``guard_terminal(); write_output("-", data)`` on a pty:
  exit 0, 8,388,606 octets in and out, 1.5 s end to end, every mark accounted for.

Tried and held
- Split writes never keep a mark the whole text writes out (missing neighbour = not
  honest); ZWJ cut mid-UTF-8 across writes is decoded whole (incremental decoder).
- A run of marks: only the ends beside honest text stay, also split across writes.
- Every other Cf (full scan, stop 51's test) is written out; isolates, embeddings,
  overrides written out.
- LRM/RLM beside ASCII in honest RTL text (``טלפון: <LRM>+972-3-...``) is written out:
  a cost of the design, not counted as a break (the K4 fix keeps it so).

Fixed (stop 51): a neighbour is the next visible character (selectors and format
characters skipped, four at most); a directional mark beside an ASCII letter or digit is
written out, and a joiner stays only between two visible characters outside ASCII and
outside Latin, Greek and Cyrillic; a variation selector stays only after a visible
character outside ASCII (or U+FE0F in a keycap); two marks in a row are written out; the
fillers, the combining grapheme joiner and every unassigned default-ignorable are
written out (K1 to K4).  The terminal streams judge each piece as in the whole stream
(``_Pieces``: trailing invisibles wait for the next piece, the last character written
is the next piece's context), which also fixes HB1.  HB2 stays, marked as a known limit.
"""
from __future__ import annotations

import datetime
import io
import os
import pty
import random
import select
import subprocess
import sys
import time

import pytest

from e2m_lab.terminal_run import child_env
from e2m_plugins.cli.terminal import SafeTerminal, _SafeBuffer, terminal_text

MARKS = "\u061c\u200c\u200d\u200e\u200f"
ARABIC = "\u0639"


class _Raw(io.BytesIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("text", ["ab\u200d\ufe0fc", "ab\u200e\u034fc", "ab\u200f\u180bc"])
def test_k1_mark_beside_an_invisible_neighbour_between_ascii_is_written_out(text):
    shown = terminal_text(text)
    assert not any(m in shown for m in MARKS), ascii(shown)


DEFAULT_IGNORABLE_NOT_CF = [0x34F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D,
                            0x180F, 0x3164, 0xFFA0, *range(0xFE00, 0xFE10),
                            *range(0xE0100, 0xE01F0)]


def test_k2_default_ignorable_between_ascii_letters_is_written_out():
    raw = [f"U+{c:04X}" for c in DEFAULT_IGNORABLE_NOT_CF if chr(c) in terminal_text(f"ab{chr(c)}c")]
    print(f"\n{len(raw)} of {len(DEFAULT_IGNORABLE_NOT_CF)} raw")
    assert raw == []


UNASSIGNED_IGNORABLE = [0x2065, *range(0xFFF0, 0xFFF9), 0xE0000, *range(0xE0002, 0xE0020),
                        *range(0xE0080, 0xE0100), *range(0xE01F0, 0xE1000)]


def test_k3_unassigned_default_ignorables_are_written_out():
    raw = [f"U+{c:04X}" for c in UNASSIGNED_IGNORABLE if chr(c) in terminal_text(f"ab{chr(c)}c")]
    print(f"\n{len(raw)} of {len(UNASSIGNED_IGNORABLE)} raw")
    assert raw == []


@pytest.mark.parametrize("text", ["sip:bob@evil.example\u200f\u0639", "p\u200d\u0430ypal",
                                  "caf\u200d\u00e9", "\u0639\u200e123"])
def test_k4_mark_beside_an_ascii_letter_or_digit_is_written_out(text):
    shown = terminal_text(text)
    assert not any(m in shown for m in MARKS), ascii(shown)


def test_hb1_mark_alone_in_a_write_between_honest_neighbours_stays():
    raw = _Raw()
    term = SafeTerminal(io.TextIOWrapper(raw, encoding="utf-8"))
    for piece in (ARABIC, "\u200c", ARABIC):
        term.buffer.write(piece.encode())
    term.buffer.flush()
    assert raw.getvalue() == (ARABIC + "\u200c" + ARABIC).encode(), raw.getvalue()


@pytest.mark.xfail(strict=True, reason="known limit (stop 51): tags are written out, so a subdivision flag shows as code points (3 of about 3,700 emoji)")
def test_hb2_subdivision_flag_stays():
    scotland = "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"
    assert terminal_text(scotland) == scotland


HONEST = ["\U0001F3F3\ufe0f\u200d\U0001F308", "\U0001F469\U0001F3FD\u200d\U0001F4BB",
          "\u2764\ufe0f\u200d\U0001F525", "\u0dc1\u0dca\u200d\u0dbb\u0dd3",
          "\u0915\u094d\u200c\u0937", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
          "\u200f\u05e9\u05dc\u05d5\u05dd\n", "\u0645\u0631\u062d\u0628\u0627\u200f\n"]


def test_control_honest_sequences_stay():
    assert [terminal_text(s) == s for s in HONEST] == [True] * len(HONEST)


def test_control_boundaries_never_loosen():
    rng = random.Random(202)
    alphabet = ["a", "1", ".", " ", ARABIC, "\u0430", "\U0001F468", *MARKS]
    loosened = 0
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(40))
        data = text.encode()
        cuts = sorted(rng.sample(range(1, len(data)), 5))
        out = io.BytesIO()
        buf = _SafeBuffer(out, "utf-8")
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            buf.write(data[a:b])
        buf.flush()
        split, whole = out.getvalue().decode(), terminal_text(text)
        loosened += sum(split.count(m) > whole.count(m) for m in MARKS)
    assert loosened == 0


def _seconds(text: str) -> float:
    t0 = time.perf_counter()
    terminal_text(text)
    return time.perf_counter() - t0


@pytest.mark.slow
def test_control_cost_floods_linear():
    surrogate = b"\xff".decode("utf-8", "surrogateescape")
    for unit, n in (("\u200f", 2_000_000), (ARABIC + "\u200f", 1_000_000),
                    ("a\u200f", 1_000_000), (surrogate, 2_000_000)):
        small, big = _seconds(unit * n), _seconds(unit * 2 * n)
        print(f"\n{unit!a} x{n}: {small:.2f}s, x{2 * n}: {big:.2f}s")
        assert big < 10 and big < 3.5 * small + 0.5


def _pty_run(argv: list[str]) -> tuple[int, bytes]:
    import termios
    leader, follower = pty.openpty()
    attrs = termios.tcgetattr(follower)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(follower, termios.TCSANOW, attrs)
    proc = subprocess.Popen(argv, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL,
                            env=child_env())
    os.close(follower)
    chunks = []
    try:
        while select.select([leader], [], [], 60)[0]:
            try:
                chunk = os.read(leader, 1 << 20)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks)


@pytest.mark.slow
def test_control_8mb_out_dash_on_a_pty(tmp_path):
    # ``cms verify`` caps its input at 256 KiB (limits.py), so 8 MB goes through the
    # same path directly: guard_terminal() then write_output("-", data) on a pty.
    unit = (ARABIC + "\u200fa").encode()                 # 6 octets
    content = unit * (8 * 1024 * 1024 // len(unit))
    (tmp_path / "c.bin").write_bytes(content)
    code = ("import sys; from pathlib import Path; from e2m_plugins.cli import write_output; "
            "from e2m_plugins.cli.terminal import guard_terminal; guard_terminal(); "
            "write_output('-', Path(sys.argv[1]).read_bytes())")
    t0 = time.perf_counter()
    rc, out = _pty_run([sys.executable, "-c", code, str(tmp_path / "c.bin")])
    seconds = time.perf_counter() - t0
    n = len(content) // len(unit)
    print(f"\nrc {rc}; {len(content)} octets in, {len(out)} out, {seconds:.1f}s; {out[-200:]!r}")
    assert rc == 0 and seconds < 60
    # every mark decided (raw or written out), none lost, none doubled; the content
    # puts each RLM between an Arabic letter and ASCII "a": kept today (K4)
    assert out.count("\u200f".encode()) + out.count(b"\\u200f") == n
