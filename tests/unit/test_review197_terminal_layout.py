"""Review 197: attacking ``terminal_text``/``guard_terminal`` (e2daa71, ea0a6df) with
characters a terminal or the operator's eye treats as layout, not text.  Every command
runs with stdout and stderr on one pty (``e2m_lab.terminal_run.on_a_terminal``).

Hole K1: ``e2m cms inspect`` shows invisible characters of a certificate name raw (spoof)
- Attacker: whoever makes a certificate the operator inspects (a signer's or
  recipient's certificate carried in a SignedData/EnvelopedData).
- Messages: a SignedData carrying a self-signed certificate whose CN is
  ``ali<U+200B>ce`` (zero-width space); likewise U+2060, U+FEFF, U+2028/U+2029,
  U+FFF9..U+FFFB, U+061C (Arabic letter mark), U+180E.
- Effect observed: ``e2m cms inspect`` (exit 0) writes the subject as
  ``CN=ali\\xe2\\x80\\x8bce``: 10 of 10 invisible characters in the test arrive raw
  (U+200B, U+2060, U+FEFF, U+2028, U+2029, U+FFF9..B, U+061C, U+180E; the probe also
  saw ZWNJ, ZWJ, LRM, RLM, SHY raw), so on a terminal
  the name reads ``CN=alice``, the same as the real alice's.  The same certificate's
  name in ``e2m cms verify`` (``_signer_lines`` -> ``printable``) is written out
  (``\\u200b``): only the guard stands in front of ``inspect``, and ``terminal_text``
  keeps every format character but the bidi embeddings/overrides/isolates.
- Code at fault: e2m_plugins/cli/cms_cmd.py:271 (``_certificate_entry``: names
  rendered raw) and :353 (``render_text``); e2m_plugins/cli/terminal.py:20
  (``_UNSAFE``: no Cf/Zl/Zp but U+202A..E, U+2066..9).
- Suggested fix: one-line fields (names, subjects, issuers) through ``printable``
  in ``render_text`` (review 193 HB2 keeps joiners and marks for running text only,
  not for names); or ``printable`` for every leaf value of the text rendering.
- Test: test_inspect_writes_out_invisible_characters_of_a_subject.

Hole K2: the guard passes line/paragraph separators and interlinear annotation
- Attacker: a signer whose content the operator reads with ``--out -`` on a terminal;
  a file the operator's argument came from (argparse quotes an unrecognized argument).
- Messages: content ``line1<U+2028>line2<U+2029>x<U+FFF9>shown<U+FFFA>hidden<U+FFFB>``;
  the same string as an argument (``--bogus...``).
- Effect observed: ``cms verify --out -`` and argparse's ``unrecognized arguments``
  write U+2028, U+2029, U+FFF9, U+FFFA, U+FFFB raw: 5 of 5 in each; review 193's
  design (HB2's suggested fix: "keep escaping ... line/paragraph separators") says they
  are escaped, ``terminal_text`` does not.  U+2028/9 are a line break to anything
  that lays out Unicode text (a terminal's text copied on, a log viewer), and
  U+FFF9..B mark text to be hidden as an annotation.
- Code at fault: e2m_plugins/cli/terminal.py:20 (``_UNSAFE``).
- Suggested fix: add ``\\u2028\\u2029\\ufff9-\\ufffb`` to ``_UNSAFE``.
- Test: test_guard_writes_out_separators_and_annotations.

Controls
- test_control_inspect_keeps_honest_names: CN ``Zoë Ångström 中文 😀`` shown as the
  same UTF-8 on the terminal, not written out.
- test_control_bidi_nel_del_escaped: U+202E, U+2066, U+0085, DEL in content
  (``--out -``) and in a CN (``inspect``): 0 raw on the terminal.
- test_control_out_dash_piped_is_byte_exact: the K2 content to a pipe: byte for byte.
- test_control_inspect_json_is_ascii: ``--json`` on the terminal: every octet ASCII.
- test_control_combining_flood_cost: ``terminal_text`` of 10**6 combining marks
  (U+0301) on one letter: unchanged, 0.003 s (bound 5 s); the display of a
  stack is the terminal's own matter, nothing is obeyed.

Tried and held (figures from the probe of this review)
- ``cms verify`` signer names (``printable``): 0 of 21 characters raw.
- argparse ``invalid choice``: quotes ``repr`` and then the guard: format characters
  written out (``\\u200b``); only U+3164 HANGUL FILLER and U+2800 BRAILLE BLANK pass
  (printable letters/symbols that render blank: a homoglyph matter, beyond a
  terminal guard).  argparse's messages go to ``sys.stderr`` looked up at call
  time, after ``guard_terminal``: ESC written out (review 195 control).
- C1 NEL (U+0085), DEL, RLO: escaped everywhere they were sent.
- ``--json``: ``json.dumps`` ASCII, 0 raw.
- Not done in the time: ``getpass``/``input`` prompts (none found in the commands by
  grep), tracebacks of ``e2m-proxy`` subcommands, the phone through pjsua2.

Fixed (stop 51): (K1) ``e2m cms inspect``'s text output passes every value through
``printable`` (what would not show as itself, a zero-width space among them, written
out); (K2) the terminal guard writes out U+2028, U+2029 and U+FFF9..U+FFFB.  Joiners and
marks stay in the guard (honest scripts and emoji need them).
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


from e2m_lab.terminal_run import child_env, e2m_argv, on_a_terminal, self_signed_message
from e2m_plugins.cli.terminal import terminal_text

INVISIBLE = ["\u200b", "\u2060", "\ufeff", "\u2028", "\u2029", "\ufff9", "\ufffa",
             "\ufffb", "\u061c", "\u180e"]
LAYOUT = ["\u2028", "\u2029", "\ufff9", "\ufffa", "\ufffb"]
K2_CONTENT = "line1\u2028line2\u2029x\ufff9shown\ufffahidden\ufffb"


def _signed(tmp_path: Path, cn: str, content: bytes = b"hello") -> tuple[Path, Path]:
    return self_signed_message(tmp_path, content, cn)


def _raw(out: bytes, chars: list[str]) -> list[str]:
    return [f"U+{ord(c):04X}" for c in chars if c.encode() in out]


# ------------------------------------------------------------------ K1

def test_inspect_writes_out_invisible_characters_of_a_subject(tmp_path):
    left = []
    for n, ch in enumerate(INVISIBLE):
        d = tmp_path / str(n)
        d.mkdir()
        _, p7 = _signed(d, f"ali{ch}ce")
        rc, out = on_a_terminal(e2m_argv("cms", "inspect", "--in", str(p7)))
        assert rc == 0 and b"subject" in out
        left += _raw(out, [ch])
    print(f"\n{len(left)} of {len(INVISIBLE)} raw: {left}")
    assert left == []


# ------------------------------------------------------------------ K2

def test_guard_writes_out_separators_and_annotations(tmp_path):
    pem, p7 = _signed(tmp_path, "mallory", K2_CONTENT.encode())
    rc, out = on_a_terminal(e2m_argv("cms", "verify", "--in", str(p7), "--ca", str(pem),
                                     "--out", "-"))
    assert rc == 0 and b"line1" in out
    rc2, err = on_a_terminal(e2m_argv("cms", "inspect", "--in", str(p7),
                                      "--bogus" + K2_CONTENT))
    assert rc2 == 2 and b"unrecognized" in err
    print(f"\n--out -: {_raw(out, LAYOUT)}; argparse: {_raw(err, LAYOUT)}")
    assert _raw(out, LAYOUT) == [] and _raw(err, LAYOUT) == []


# ------------------------------------------------------------------ controls

def test_control_inspect_keeps_honest_names(tmp_path):
    honest = "Zoë Ångström 中文 😀"
    _, p7 = _signed(tmp_path, honest)
    rc, out = on_a_terminal(e2m_argv("cms", "inspect", "--in", str(p7)))
    assert rc == 0
    assert honest.encode() in out


def test_control_bidi_nel_del_escaped(tmp_path):
    bad = ["\u202e", "\u2066", "\x85", "\x7f"]
    pem, p7 = _signed(tmp_path, "e\u202ev\u2066e\x85x\x7f", ("t" + "".join(bad)).encode())
    rc, out = on_a_terminal(e2m_argv("cms", "verify", "--in", str(p7), "--ca", str(pem),
                                     "--out", "-"))
    assert rc == 0
    rc2, out2 = on_a_terminal(e2m_argv("cms", "inspect", "--in", str(p7)))
    assert rc2 == 0
    assert _raw(out, bad) == [] and _raw(out2, bad) == []
    assert b"\x7f" not in out + out2 and b"\\u202e" in out2


def test_control_out_dash_piped_is_byte_exact(tmp_path):
    pem, p7 = _signed(tmp_path, "mallory", K2_CONTENT.encode())
    proc = subprocess.run(e2m_argv("cms", "verify", "--in", str(p7), "--ca", str(pem),
                                   "--out", "-"), capture_output=True, env=child_env(),
                          timeout=60)
    assert proc.returncode == 0
    assert proc.stdout == K2_CONTENT.encode()


def test_control_inspect_json_is_ascii(tmp_path):
    _, p7 = _signed(tmp_path, "ali\u200bce\u2028")
    rc, out = on_a_terminal(e2m_argv("cms", "inspect", "--json", "--in", str(p7)))
    assert rc == 0 and b"subject" in out
    assert all(b < 0x80 for b in out)


def test_control_combining_flood_cost():
    flood = "a" + "\u0301" * 10**6
    start = time.perf_counter()
    shown = terminal_text(flood)
    took = time.perf_counter() - start
    print(f"\n10**6 combining marks: {took:.3f} s")
    assert shown == flood and took < 5
