"""Review 201: what ``e2m-proxy`` (the launcher) passes on from Kamailio's log to the
operator's terminal, and the ``db``/``users`` listings.

Hole K1: the launcher shows a sender's Call-ID (log_prefix) with its invisible characters raw
- Attacker: any off-path sender: the cfg's ``log_prefix`` ("{$mt $hdr(CSeq) $ci} ",
  templates/kamailio.cfg.tmpl:23) puts the Call-ID, and the KEMI's info lines a From
  or a reason, in every record written while its request is handled
  (kemi.py:2280 "e2m: %s request %s" for every request).
- Messages: a MESSAGE whose Call-ID is ``ab<U+200B>c<U+2060><U+FEFF><U+00AD><U+200F>
  <U+061C><U+E0041>`` (zero-width space, word joiner, BOM, soft hyphen, RLM, ALM, a
  tag character); the record Kamailio writes for it reaches ``_pump_log`` through
  ``log_socket`` as in ``_run`` (launcher.py:719-724), after ``guard_terminal``.
- Effect observed: on a pty, ESC and U+202E in the same record came out as ``\\x1b``
  and ``\\u202e`` (guard held), but all 7 invisible format characters came out raw
  (0 of 7 written out): the operator reads Call-ID "abc-" where the message's is
  another value, so one dialog's (or one From's) log lines pass for another's, and
  the RLM/ALM marks (bidi marks, not embeddings) change the layout of the text
  around them in a bidi terminal.  ``printable`` (cli/__init__.py:165, review 199)
  writes these out; the log path uses only ``terminal_text``.
- Code at fault: e2m_plugins/cli/terminal.py:21-22 (``_UNSAFE`` has no Cf class
  but the bidi embeddings/isolates and U+FFF9-FFFB), used by ``_SafeBuffer.write``
  (terminal.py:55-59) for the launcher's pump (launcher.py:724).
- Suggested fix: in ``terminal_text`` also write out every format character
  (``unicodedata.category(ch) == "Cf"``: U+00AD, U+061C, U+200B-U+200F, U+2060-U+2064,
  U+FEFF, U+E0001-U+E007F) and the other non-printables ``printable`` escapes but
  tab/newline; or pass the pump's output through ``printable`` line by line.
- Test: ``test_launcher_log_writes_out_invisible_characters_of_a_call_id``.

Controls
- ``test_launcher_log_escapes_escape_sequences_and_bidi_overrides``: ESC [2J, BEL,
  CSI (U+009B), U+202E, U+2028 in a record's Call-ID are written out (``\\x1b``,
  ``\\x07``, ``\\x9b``, ``\\u202e``, ``\\u2028``), honest UTF-8 (``Zoë``, ``日本``) and
  the record's own newline stay as they are.

Tried and held
- ``e2m-proxy db init/upgrade/status/replay``: prints the configuration's names,
  schema versions and counts (db_cmd.py:67-155); nothing an archived message or a
  PUBLISH filled reaches its output.
- ``e2m-proxy users list``: prints ``subscriber.username`` raw through
  ``terminal_text`` (users.py:252), but the table is the operator's (``users add``
  admits ``[A-Za-z0-9._~+-]{1,64}`` only, users.py:46); no REGISTER writes it.  A
  name with U+200B put in by another tool would show as its look-alike (same gap as
  K1), not a peer's doing.
- ``e2m-phone`` (pjsua_hooks/cli.py:74, 251, 264): the event lines, message failure
  reasons and call reasons pass ``printable``; not driven with real pjsua2 in the
  time.
- Not tried in the time: a real Kamailio under ``e2m-proxy`` on a pty (the record
  above is the shape log_prefix gives; the pump, socket and guard are the launcher's
  own code, run in a child on a pty).

Fixed (stop 51): the terminal guard (``terminal_text``) writes out every format
character (Unicode category Cf: zero-width space, word joiner, BOM, soft hyphen, tags,
...), and the two joiners and three directional marks wherever they touch ASCII; next
to other scripts they stay (review 193's honest Arabic, Persian and emoji text).
"""

from __future__ import annotations

import sys

import pytest

from e2m_lab.terminal_run import on_a_terminal

# The launcher's own log path: guard_terminal, then Kamailio's stderr socket drained by
# _pump_log into sys.stderr.buffer (launcher._run).  The record names the writer's pid,
# as Kamailio's do (LogCutter keeps only records of the process that wrote them).
_PUMP = r'''
import os, sys
from kamailio_app.launcher import guard_terminal, _pump_log, log_socket
guard_terminal()
reader, writer = log_socket()
writer.sendall(sys.argv[1].replace("PID", str(os.getpid())).encode("utf-8"))
writer.close()
_pump_log(reader, sys.stderr.buffer)
'''


def _record(call_id: str) -> str:
    return (f" 5(PID) INFO: {{MESSAGE 1 MESSAGE {call_id}}} <script>: e2m: MESSAGE "
            "request relayed\n")


def _shown(call_id: str) -> bytes:
    code, out = on_a_terminal([sys.executable, "-c", _PUMP, _record(call_id)])
    assert code == 0, out
    assert b"e2m: MESSAGE request relayed" in out, out
    return out


INVISIBLE = "\u200b\u2060\ufeff\u00ad\u200f\u061c\U000e0041"


def test_launcher_log_writes_out_invisible_characters_of_a_call_id():
    out = _shown(f"ab\u200bc{INVISIBLE}-x")
    raw = [f"U+{ord(ch):04X}" for ch in INVISIBLE if ch.encode() in out]
    assert raw == [], f"shown raw on the operator's terminal: {raw}"


def test_launcher_log_escapes_escape_sequences_and_bidi_overrides():
    out = _shown("k\x1b[2J\x07\x9b\u202e\u2028-Zoë-日本")
    for raw in (b"\x1b", b"\x07", "\x9b".encode(), "\u202e".encode(), "\u2028".encode()):
        assert raw not in out, raw
    for shown in (b"\\x1b[2J", b"\\x07", b"\\x9b", b"\\u202e", b"\\u2028"):
        assert shown in out, shown
    assert "-Zoë-日本}".encode() in out
    assert out.endswith(b"relayed\n")
