"""Review 195: attacking e2daa71's ``guard_terminal`` (every command's stdout and
stderr, where they are terminals, pass ``terminal_text``).  Each command runs with its
stdout AND stderr on a pty (``_terminal``, OPOST off: octets as written) and the test
counts what an attacker's sequence left raw.

Hole K1: ``--out -`` to an 8-bit terminal: C1 controls pass inside UTF-8 sequences
- Attacker: a signer whose content the operator reads on a terminal (``e2m cms verify
  --out -``, likewise ``cms decrypt``/``sip open`` ``--out -``: every ``write_output("-")``).
- Messages: a SignedData whose content is ``<U+201B>[2J<U+2590>]0;pwned<U+2587>``
  encoded in UTF-8: ``e2 80 9b 5b 32 4a`` ``e2 96 90 ...`` ``e2 96 87``: every octet
  is part of a valid UTF-8 character, and ``9b`` (CSI), ``90`` (DCS), ``87`` are C1
  octets.
- Effect observed: with the terminal's encoding Latin-1 (``PYTHONIOENCODING=latin-1``,
  as under ``LANG=*.ISO-8859-1``; ``sys.stdout.encoding`` says so), the verify exits 0
  and writes 6 octets of 0x80-0x9f raw (0x80 0x9b, 0x96 0x90, 0x96 0x87 of 95 written): an 8-bit terminal (xterm
  without UTF-8, a Linux console in Latin-1) reads ``0x9b [2J`` as CSI 2J, clear screen,
  and 0x90 as the start of a DCS string.  The text path of the same process is safe
  (the characters it cannot encode raise), only the binary path is hit.
- Code at fault: e2m_plugins/cli/terminal.py:37-39 (``for_terminal`` decodes and
  re-encodes as UTF-8 whatever the terminal's encoding) via :47-49
  (``_SafeBuffer.write``); e2m_plugins/cli/__init__.py:222-223.
- Suggested fix: ``_SafeBuffer`` encodes with the stream's encoding (``errors=
  "backslashreplace"``) or, for a terminal whose encoding is not UTF-8, escapes every
  octet >= 0x80 of the output.
- Test: test_out_dash_to_latin1_terminal_leaves_no_c1_octet.

Honest break HB1: ``--out -`` on a terminal splits UTF-8 across writes into ``\\xNN``
- Effect observed: ``_SafeBuffer.write`` decodes each write on its own: a UTF-8
  character cut by two writes (``"é"`` as ``b"\\xc3"`` then ``b"\\xa9"``: any chunked
  copy to ``sys.stdout.buffer`` at a 64 KiB boundary) is shown as ``\\xc3\\xa9`` instead
  of ``é`` (1 of 1 split characters mangled; unsplit: fine).
- Code at fault: e2m_plugins/cli/terminal.py:47-49.
- Suggested fix: an incremental UTF-8 decoder (``codecs.getincrementaldecoder``,
  ``errors="surrogateescape"``) held by ``_SafeBuffer``, flushed at ``flush``.
- Test: test_safe_buffer_keeps_a_character_split_across_writes.

Controls
- test_control_out_dash_to_utf8_terminal: the K1 content on a UTF-8 terminal: exit 0,
  the content arrives as valid UTF-8 (xterm in UTF-8 mode reads ``e2 80 9b`` as
  U+201B, not CSI), 0 ESC.
- test_control_out_dash_to_pipe_is_byte_exact: the same verify with stdout a pipe:
  exactly the content, byte for byte (ESC, BEL, C1 and all).
- test_control_escape_split_across_writes: ESC at the end of one write and ``[2J`` at
  the start of the next (text and binary streams): ESC shown as ``\\x1b``; 0 ESC.
- test_control_os_level_streams_are_the_wrapped_ones: after ``guard_terminal``,
  ``print`` from a thread started before it, ``logging.lastResort``, ``warnings``
  and an unhandled exception's traceback: 4 of 4 shown as ``\\x1b[2J``, 0 ESC.
- HB1 shown: ``café`` written as two buffer writes came out ``caf\\xc3\\xa9``.

Tried and held (figures from this run)
- A ``logging.StreamHandler`` or ``def f(out=sys.stderr)`` bound at import time in the
  commands' packages: none (grep of e2m_plugins, kamailio_app, pjsua_hooks); the
  launcher's log pump takes ``sys.stderr.buffer`` after ``guard_terminal``.
- 8-bit C1 as lone octets (not UTF-8) and as U+0080..U+009F: escaped.
- ``--json`` on a terminal: ``json.dumps`` is ASCII; unchanged by the wrapper.
- 10 MB: ``for_terminal`` of 10 MB of ordinary text well under the 20 s bound (review
  193's cost control still passes).
- Not tried in the time: Kamailio's own stdout under ``e2m-proxy`` (inherited, not
  wrapped: launcher.py:721 redirects only stderr; the KEMI app prints nothing to
  stdout, so no attacker text was found to reach it), pjsua's console (goes through
  the Python ``_LogWriter``), U+2028/U+2029, U+FFF9..U+FFFB, LRM/RLM (kept on purpose,
  review 193 HB2; not commands to a terminal).
Fixed (stop 50): the terminal's binary stream writes what ``terminal_text`` leaves in
the terminal's own encoding, with what it cannot show written out (``\\u201b`` on a
Latin-1 terminal: no octet of a UTF-8 character arrives as a C1 control, K1), and it
decodes with an incremental UTF-8 decoder, so a character split across two writes is
kept whole (HB1).  Both tests failed on the code before the fix and pass with it.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2m_lab.terminal_run import e2m_argv, on_a_terminal, self_signed_message
from e2m_plugins.cli.terminal import SafeTerminal

ROOT = Path(__file__).resolve().parents[2]
CONTENT = "\u201b[2J\u2590]0;pwned\u2587".encode()       # C1 9b, 90, 87 inside UTF-8
C1 = bytes(range(0x80, 0xA0))


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PYTHONWARNINGS": "ignore", **extra}


def _terminal(argv: list[str], **env: str) -> tuple[int, bytes]:
    return on_a_terminal(argv, **env)


_e2m = e2m_argv


def _c1(out: bytes) -> int:
    return sum(out.count(bytes([b])) for b in C1)


@pytest.fixture
def signed(tmp_path):
    """A self-signed (clean names) signer and a SignedData of CONTENT by it."""
    pem, p7 = self_signed_message(tmp_path, CONTENT, "mallory", san_uri="sip:mallory@x")
    return ["cms", "verify", "--in", str(p7), "--ca", str(pem), "--out", "-"]


# ------------------------------------------------------------------ K1

def test_out_dash_to_latin1_terminal_leaves_no_c1_octet(signed):
    rc, out = _terminal(_e2m(*signed), PYTHONIOENCODING="latin-1")
    print(f"\nrc {rc}; {_c1(out)} C1 octets of {len(out)}: {out!r}")
    assert rc == 0 and b"[2J" in out
    assert _c1(out) == 0


def test_control_out_dash_to_utf8_terminal(signed):
    rc, out = _terminal(_e2m(*signed), PYTHONIOENCODING="utf-8")
    print(f"\nrc {rc}; {out!r}")
    assert rc == 0 and CONTENT in out         # valid UTF-8: no C1 for a UTF-8 terminal
    assert out.count(b"\x1b") == 0


def test_control_out_dash_to_pipe_is_byte_exact(tmp_path):
    payload = bytes(range(256)) + b"\x1b]0;pwned\x07\x1b[2J\r\n" + CONTENT
    pem, p7 = self_signed_message(tmp_path, payload, "m")
    done = subprocess.run(_e2m("cms", "verify", "--in", str(p7), "--ca", str(pem),
                               "--out", "-"), capture_output=True, env=_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == payload


# ------------------------------------------------------------------ HB1

class _Raw(io.BytesIO):
    def isatty(self) -> bool:
        return True


def test_safe_buffer_keeps_a_character_split_across_writes():
    raw = _Raw()
    term = SafeTerminal(io.TextIOWrapper(raw, encoding="utf-8"))
    data = "café".encode()
    term.buffer.write(data[:-1])
    term.buffer.write(data[-1:])
    term.buffer.flush()
    print(f"\n{raw.getvalue()!r}")
    assert raw.getvalue() == data


def test_control_escape_split_across_writes():
    raw = _Raw()
    term = SafeTerminal(io.TextIOWrapper(raw, encoding="utf-8"))
    term.write("a\x1b")
    term.write("[2J")
    term.flush()
    term.buffer.write(b"b\x1b")
    term.buffer.write(b"[2J")
    term.buffer.flush()
    out = raw.getvalue()
    print(f"\n{out!r}")
    assert out.count(b"\x1b") == 0 and out.count(b"\\x1b") == 2


_LATE = r"""
import sys, threading, time, logging, warnings
go = threading.Event()
def early():
    go.wait(); print("thread\x1b[2J"); sys.stdout.flush()
t = threading.Thread(target=early); t.start()
from e2m_plugins.cli.terminal import guard_terminal
guard_terminal()
go.set(); t.join()
logging.getLogger("x").warning("log\x1b[2J")
warnings.simplefilter("always"); warnings.warn("warn\x1b[2J")
raise RuntimeError("exc\x1b[2J")
"""


def test_control_os_level_streams_are_the_wrapped_ones():
    rc, out = _terminal([sys.executable, "-c", _LATE])
    print(f"\nrc {rc}; {out!r}")
    assert rc == 1
    for word in (b"thread", b"log", b"warn", b"exc"):
        assert word + b"\\x1b[2J" in out
    assert out.count(b"\x1b") == 0
