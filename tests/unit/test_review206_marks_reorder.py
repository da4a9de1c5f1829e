"""Review 206: the terminal guard after 51306de (review 204 K1-K4 fix), attacked.

Figures of what a bidi terminal shows come from GNU FriBidi (``fribidi_log2vis``, LTR
paragraph, marks and joiners dropped from the visual string), loaded with ctypes; the
hole tests themselves only look at ``terminal_text`` / ``SafeTerminal`` output.

Hole K1: an RLM between two non-ASCII punctuation marks reorders the ASCII digits after it
- Attacker: chooses a value shown by a CLI tool (display name, reason phrase, archived body).
- Messages: "\\u00b7<RLM>\\u00b710\\u00b720" (middle dots, RLM, "10", "20").
- Effect observed: ``terminal_text`` keeps the RLM (both neighbours are U+00B7, honest,
  no ASCII letter/digit beside it); FriBidi shows "·20·10·" for it, "··10·20" without
  the RLM: the operator reads 20 before 10 and sees no sign of the mark.
- Code at fault: e2m_plugins/cli/terminal.py:107-113 (``_kept_if_honest``: only the
  immediate neighbour is checked, but an RLM's effect runs through neutrals to the
  digits beyond; any honest punctuation counts as a reason to keep it).
- Suggested fix: keep RLM/ALM only beside a strong right-to-left letter (bidi class R/AL)
  and LRM only beside a strong letter, so punctuation alone never justifies a mark.
- Test: test_k1_rlm_between_punctuation_written_out.

Hole K2: a variation selector kept after a character that has no variation
- Attacker: as K1.
- Messages: "x\\u00b7<U+FE00>y", "\\uff21<U+FE00>" (fullwidth A), "\\u0628<U+FE00>".
- Effect observed: all three come back unchanged; U+FE00 after U+00B7 (no standardized
  variation sequence) shows nothing, so "x·<FE00>y" and "x·y" (lengths 4 and 3) read the
  same.  Any base whose name's first word is not LATIN/GREEK/CYRILLIC passes: MIDDLE DOT,
  FULLWIDTH LATIN ..., MATHEMATICAL BOLD ..., ARABIC LETTER ....
- Code at fault: e2m_plugins/cli/terminal.py:97 (``_selector_kept``: "not Latin/Greek/
  Cyrillic" stands for "has a variation"), :59-60 (``_script`` is the first word of the name).
- Suggested fix: keep U+FE0E/U+FE0F only after a character with the Emoji property (a
  small table), U+FE00-FE0D only for sequences in StandardizedVariants.txt; write out the rest.
- Test: test_k2_selector_after_base_without_variation_written_out.

Hole K3: a joiner between two CJK, Hangul or fullwidth characters kept
- Attacker: as K1.
- Messages: "中<ZWJ>文", "한<ZWJ>국", "\\uff21<ZWJ>\\uff22" (fullwidth A, B).
- Effect observed: unchanged; the ZWJ shows nothing between ideographs, syllables or
  fullwidth letters (no script forms a join there), so 3 characters read as the 2.
  Fullwidth Latin escapes the Latin check because its name starts "FULLWIDTH".
- Code at fault: e2m_plugins/cli/terminal.py:110-111 (any honest non-LGC pair keeps a joiner).
- Suggested fix: keep ZWJ only between emoji (Extended_Pictographic / modifiers) or after
  a virama-type mark / before one in Indic scripts; ZWNJ only in Arabic-script and Indic
  letters; never between Han, Hangul, Kana or fullwidth forms.
- Test: test_k3_joiner_between_cjk_hangul_fullwidth_written_out.

Hole K4: the text stream and its binary buffer judge marks apart
- Attacker: as K1, a tool that prints a label with ``print`` then writes the value's
  octets through ``sys.stdout.buffer``.
- Messages: text write "10", flush; buffer write "<RLM>·20·30\\n".
- Effect observed: the buffer's ``_Pieces`` starts with no context, so the RLM (whose
  terminal left neighbour is the ASCII "0") is kept: the terminal gets
  "10<RLM>·20·30", FriBidi shows "1030·20·" (whole string through ``terminal_text``:
  "10\\u200f·20·30", mark written out).
- Code at fault: e2m_plugins/cli/terminal.py:205 and :230 (two ``_Pieces`` for one terminal).
- Suggested fix: one ``_Pieces`` shared by ``SafeTerminal`` and its ``_SafeBuffer``
  (the buffer decodes, then feeds the shared one).
- Test: test_k4_text_then_buffer_shares_context.

Honest break HB1: a joiner before a virama is written out
- Messages: Bengali "র<ZWJ>্যাব" (RAB, ra-phala-ya), Sinhala touching letters
  "ක<ZWJ>්ව", Kannada "ರ<ZWJ>್ಕ", old-encoding Malayalam chillu "അവന്<ZWJ> ".
- Effect observed: each shows "\\u200d"; ``_neighbour`` rightwards returns the virama
  itself (a combining mark is not honest), so the joiner fails the pair test.
- Code at fault: e2m_plugins/cli/terminal.py:79 (rightwards a mark is the neighbour), :111.
- Suggested fix: rightwards, a virama (canonical combining class 9) after the joiner
  counts as its letter's cluster: look past it to the next letter, or accept it.
- Test: test_hb1_joiner_before_virama_kept.

Controls (unmarked, pass): whole-string RLM beside ASCII digits written out; Persian
ZWNJ, Hindi/Sinhala virama+ZWJ, emoji VS16, keycaps 1/*, ZWJ families and flags with
VS16, skin tone + ZWJ, CJK IVS, Mongolian FVS, Hebrew RLM before "!", Arabic ALM kept;
FriBidi figures for K1/K4 (skipped only if libfribidi is absent).

Tried and held:
- Flush context "x": text "ab<RLM>" flushed (RLM written out), then "<RLM>·" — the
  RLM sees "x" and is written out (conservative, not a hole).
- 64 Ki hold: 70 000 ZWSP then "a" — all written out as \\u200b, nothing raw.
- Mark beside a Hangul jongseong U+11A8 (Lo, zero width after a non-Hangul): kept as
  "honest" (ab\\u11a8<RLM>·) but the RLM there reorders only punctuation; no digits moved.
- Selector runs, two marks in a row: written out (review 204 fix holds).
- Mongolian vowel separator U+180E written out: deliberate (_UNSAFE lists it), not counted.

Fixed (stop 51): a directional mark stays only beside a strong right-to-left letter
(K1); U+FE0E/FE0F only after an emoji or symbol (or in a keycap), the other selectors
only after a math symbol or a CJK ideograph (K2); a joiner only between two emoji or
letters and combining marks of a joining script (Arabic, the Indic scripts, Syriac,
Mongolian...), so a virama on its right counts (K3, HB1); a terminal's text stream and
its buffer share one ``_Pieces``, the text going out first (K4).  The control that
showed K2 and K3's screens (``test_control_k2_k3_same_look``) asserted the old
behaviour and went with the fix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io

import pytest

from e2m_plugins.cli.terminal import SafeTerminal, terminal_text

RLM, ZWJ, ZWNJ = "\u200f", "\u200d", "\u200c"


def _fribidi():
    name = ctypes.util.find_library("fribidi")
    if not name:
        pytest.skip("libfribidi not installed")
    return ctypes.CDLL(name)


def _displayed(text: str) -> str:
    """What an LTR bidi terminal shows (FriBidi), invisible marks dropped."""
    lib = _fribidi()
    n = len(text)
    logical = (ctypes.c_uint32 * n)(*map(ord, text))
    visual = (ctypes.c_uint32 * (n + 1))()
    base = ctypes.c_uint32(0x110)           # FRIBIDI_PAR_LTR
    assert lib.fribidi_log2vis(logical, n, ctypes.byref(base), visual, None, None, None)
    return "".join(chr(visual[i]) for i in range(n)
                   if chr(visual[i]) not in "\u200e\u200f\u061c\u200c\u200d")


def _terminal_bytes(*writes: tuple[str, str]) -> str:
    raw = io.BytesIO()
    term = SafeTerminal(io.TextIOWrapper(raw, encoding="utf-8", write_through=True))
    for kind, text in writes:
        if kind == "text":
            term.write(text)
            term.flush()
        else:
            term.buffer.write(text.encode())
            term.buffer.flush()
    return raw.getvalue().decode()


# ---- holes -----------------------------------------------------------------------

def test_k1_rlm_between_punctuation_written_out():
    assert RLM not in terminal_text("\u00b7" + RLM + "\u00b710\u00b720")


def test_k2_selector_after_base_without_variation_written_out():
    for value in ("x\u00b7\ufe00y", "\uff21\ufe00", "\u0628\ufe00"):
        assert "\ufe00" not in terminal_text(value), ascii(value)


def test_k3_joiner_between_cjk_hangul_fullwidth_written_out():
    for value in ("\u4e2d" + ZWJ + "\u6587", "\ud55c" + ZWJ + "\uad6d", "\uff21" + ZWJ + "\uff22"):
        assert ZWJ not in terminal_text(value), ascii(value)


def test_k4_text_then_buffer_shares_context():
    shown = _terminal_bytes(("text", "10"), ("buffer", RLM + "\u00b720\u00b730\n"))
    assert RLM not in shown


def test_hb1_joiner_before_virama_kept():
    for value in ("\u09b0" + ZWJ + "\u09cd\u09af\u09be\u09ac",      # Bengali RAB
                  "\u0d9a" + ZWJ + "\u0dca\u0dc0",                  # Sinhala touching
                  "\u0cb0" + ZWJ + "\u0ccd\u0c95"):                  # Kannada
        assert terminal_text(value) == value, ascii(value)


# ---- controls --------------------------------------------------------------------

def test_control_k1_figures():
    assert _displayed("\u00b7" + RLM + "\u00b710\u00b720") == "\u00b720\u00b710\u00b7"
    assert _displayed("\u00b7\u00b710\u00b720") == "\u00b7\u00b710\u00b720"


def test_control_k4_figures_and_whole_string():
    assert terminal_text("10" + RLM + "\u00b720\u00b730") == "10\\u200f\u00b720\u00b730"
    assert _displayed("10" + RLM + "\u00b720\u00b730") == "1030\u00b720\u00b7"


@pytest.mark.parametrize("value", [
    "\u0645\u06cc" + ZWNJ + "\u062e\u0648\u0627\u0647\u0645",        # Persian
    "\u0915\u094d" + ZWJ + "\u0937",                                  # Hindi
    "\u0dc1\u0dca" + ZWJ + "\u0dbb\u0dd3",                            # Sinhala sri
    "\u2764\ufe0f", "1\ufe0f\u20e3", "*\ufe0f\u20e3",
    "\U0001f468" + ZWJ + "\U0001f469" + ZWJ + "\U0001f467",
    "\U0001f3f3\ufe0f" + ZWJ + "\U0001f308",
    "\U0001f469\U0001f3fd" + ZWJ + "\U0001f4bb",
    "\u845b\U000e0100", "\u1820\u180b",
    "\u05e9\u05dc\u05d5\u05dd" + RLM + "!", "\u0628\u061c\u00b7",
])
def test_control_honest_kept(value):
    assert terminal_text(value) == value


def test_control_rlm_beside_ascii_digit_written_out():
    assert terminal_text("10" + RLM + "20") == "10\\u200f20"


def test_held_flush_context_and_hold_bound():
    shown = _terminal_bytes(("text", "ab" + RLM), ("text", RLM + "\u00b7"))
    assert RLM not in shown
    shown = _terminal_bytes(("text", "\u200b" * 70000 + "a"))
    assert "\u200b" not in shown and shown.count("\\u200b") == 70000
