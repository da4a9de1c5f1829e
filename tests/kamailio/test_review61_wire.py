"""A sixty-first attacker's review (December 2026) of 55dfdaa: the archive and the
cluster, on a real Kamailio: what the operator's archive tool shows of a stranger's row.

Hole (``test_hole_a_strangers_content_id_rewrites_the_sender_e2m_archive_show_prints``)

Attacker: an off-path sender (no account: a From of another domain is never
challenged).

Message: one plaintext MESSAGE to bob through a home proxy that views MESSAGE, its body
a ``multipart/mixed`` with one text part whose ``Content-ID`` holds terminal escape
sequences (the core's MIME parser refuses only CR and NUL in part headers; Kamailio
never reads them): cursor up ten lines, erase, ``from  sip:alice@example.com``, back
down, and an ordinary-looking cid line.

Effect: the row is archived with that cid, and ``e2m archive show ID`` prints it raw to
the operator's terminal: the screen shows the stranger's message as alice's.  The same
sequences could forge the signature and signer lines.  The phone's own printer escapes
such octets (threat model, phone row 9); the archive tool does not.

Tried and held: SIP headers (From, To, Call-ID) with control characters are refused by
the core; the SDP parser refuses control characters in every line (media rows); a
part's Content-Type is parsed to a token pair; NUL in a part header is refused.

Fixed (stop 31): the core refuses a part header with a control character (the proxy
answers 400; nothing relayed or archived), and ``e2m archive list``/``show`` print
every stored field escaped (``e2m_plugins.cli.printable``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from e2m_lab.kamailio_harness import ROOT, udp_send
from e2m_lab.sipp import register
from e2m_plugins.sip import make_request
from tests.unit.test_review61 import _FORGED_CID, _screen

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]


def _strangers_message(proxy_factory, sipp, raw_uas, content_id: str):
    """The stranger's MESSAGE to bob through a home proxy that views MESSAGE: the
    proxy and its answer."""
    proxy = proxy_factory("archiving", view=("MESSAGE:*",))
    register(proxy, "bob", raw_uas.port, sipp)
    body = (b"--XX\r\nContent-Type: text/plain\r\nContent-ID: <" + content_id.encode()
            + b">\r\n\r\nmeet me at noon\r\n--XX--\r\n")
    request = make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:eve@stranger.example",
                           to_uri="sip:bob@example.com", body=body,
                           content_type="multipart/mixed;boundary=XX")
    return proxy, udp_send(proxy.port, request)


def _archive_show(proxy) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "e2m_plugins.cli", "archive", "show", "1",
                           "--config", str(proxy.config_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)


def test_control_a_strangers_row_is_shown_as_the_strangers(proxy_factory, sipp, raw_uas):
    proxy, answer = _strangers_message(proxy_factory, sipp, raw_uas, "note1@stranger.example")
    assert answer is not None and answer.status == 200, answer and answer.status
    assert raw_uas.wait_for(1, method="MESSAGE")                   # bob got it
    shown = _archive_show(proxy)
    assert shown.returncode == 0, shown.stderr
    screen = _screen(shown.stdout)
    assert "from          sip:eve@stranger.example" in screen
    assert "cid           note1@stranger.example" in screen


def test_hole_a_strangers_content_id_rewrites_the_sender_e2m_archive_show_prints(
        proxy_factory, sipp, raw_uas):
    """Fixed: the part's header with escape sequences is refused (400), nothing is
    relayed or archived (what ``e2m archive show`` prints escaped a stored field
    anyway: ``tests/unit/test_review61.py``)."""
    proxy, answer = _strangers_message(proxy_factory, sipp, raw_uas, _FORGED_CID)
    assert answer is not None and answer.status == 400, answer and answer.status
    assert not raw_uas.wait_for(1, method="MESSAGE", timeout=0.5)
    assert "no archived body" in _archive_show(proxy).stderr
