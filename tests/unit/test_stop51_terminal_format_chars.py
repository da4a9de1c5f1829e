"""The terminal guard and format characters (stop 51, after reviews 197 and 201).

Every character of Unicode category Cf is written out by ``terminal_text`` (a zero-width
space, a word joiner, a BOM, a soft hyphen or a tag makes one value read as another),
except the two joiners and three directional marks: honest Arabic, Persian, Indic and
emoji text needs them, so they stay beside a letter or symbol of another script and are
written out anywhere else (beside ASCII, at an edge, beside each other; review 202
made the rule stricter: ``test_review202_honest_neighbour.py``)."""

from __future__ import annotations

import unicodedata

import pytest

from e2m_plugins.cli.terminal import terminal_text

MARKS = "\u061c\u200c\u200d\u200e\u200f"


def test_every_other_format_character_is_written_out():
    raw = [f"U+{code:04X}" for code in range(0x110000)
           if unicodedata.category(chr(code)) == "Cf" and chr(code) not in MARKS
           and terminal_text(chr(code)) == chr(code)]
    assert raw == []


@pytest.mark.parametrize("mark", list(MARKS))
@pytest.mark.parametrize("text", ["ali{}ce", "{}alice", "alice{}", "{}", "a{}{}b", "a\u00ad{}\u200bb"])
def test_a_mark_among_ascii_or_invisibles_is_written_out(mark, text):
    shown = terminal_text(text.format(mark, mark))
    assert mark not in shown and f"\\u{ord(mark):04x}" in shown


@pytest.mark.parametrize("text", ["\U0001F468\u200d\U0001F469\u200d\U0001F467",   # a family
                                  "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian
                                  "\u0645\u0631\u062d\u0628\u0627\u200f",               # Arabic, RLM
                                  "\u0915\u094d\u200d\u0937"])                        # Devanagari
def test_a_mark_in_honest_text_of_another_script_stays(text):
    assert terminal_text(text) == text


def test_two_marks_in_a_row_are_written_out_even_in_honest_text():
    arabic = "\u0639"
    shown = terminal_text(arabic + "\u200f\u200f" + arabic)
    assert shown == arabic + "\\u200f\\u200f" + arabic
