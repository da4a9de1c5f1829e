"""Review 56 on the real phone: alice's ``e2m-phone listen`` calls bob through a UDP
socket (its outbound proxy's seat: the untrusted hop, which sees her INVITE's Via
branch) that rings as bob's E2M UA would (``UAEngine`` with bob's credentials).  See
``tests/unit/test_review56.py`` for the engine's side (hole 3) and what held.

Fixed (stop 30): an early peer's tag is recorded only when it holds keys (a hop's bare
180s fill nothing), and a dialog's end never takes another dialog's keyed slots; the
hole here (six strays let bob's tag past the 482, five did not) is gone with the list's
first-six rule, and the test now shows the defined behaviour (see its docstring).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SDP_ANSWER
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.stranger import HOST, UdpStranger
from e2m_plugins import sip
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import TestPKI
from tests.pjsua.test_review2_phone import pki  # noqa: F401 - fixture
from tests.pjsua.test_review43_phone import Bob

pytestmark = [pytest.mark.pjsua2]

BOB = "sip:bob@example.com"
BOB_TAG = "r56phone"


class _Hop(Bob):
    """A UDP socket alice's phone sends through (review 43's ``Bob``): it forwards
    nothing, rings as bob."""

    def ring(self, wire: sip.SipMessage, source: tuple, strays: int) -> None:
        """``strays`` bodiless 180s in the INVITE's transaction with made-up To tags, then
        bob's 183 with SDP (tag BOB_TAG) protected by bob's engine."""
        contact = [("Contact", f"<sip:bob@{HOST}:{self.port}>")]
        for n in range(strays):
            stray = make_response(wire, 180, "Ringing", contact)
            stray = stray.replace("To", f"{wire.get('To')};tag=r56stray{n}")
            self.sock.sendto(stray.serialize(), source)
        delivered = self.engine.open(wire).message
        progress = make_response(delivered, 183, "Session Progress", contact, SDP_ANSWER,
                                 "application/sdp")
        progress = progress.replace("To", f"{delivered.get('To')};tag={BOB_TAG}")
        self.sock.sendto(self.engine.protect(progress).message.serialize(), source)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ringing(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, _Hop]]:  # noqa: F811
    hop = _Hop(pki)
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{hop.port}"})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        yield alice, hop
    finally:
        alice.stop()
        hop.close()


def _final_at(sock, call_id: str, timeout: float) -> int | None:
    """The status of the first final response to ``call_id`` on ``sock`` (None: none)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data, _ = sock.recvfrom(65535)
        except (socket.timeout, TimeoutError):
            break
        try:
            msg = sip.parse(data)
        except Exception:  # noqa: BLE001 - keep-alives
            continue
        if not msg.is_request and (msg.status or 0) >= 200 and msg.call_id == call_id:
            return msg.status
    return None


def _bare_invite_with_bobs_early_tag(alice: PhoneProcess, pki: TestPKI, strays: int,  # noqa: F811
                                     hop: _Hop) -> tuple[int | None, int | None]:
    """alice calls bob; the hop rings with ``strays`` stray tags, then bob's 183; a
    bodiless INVITE under the call's Call-ID From bob;tag=BOB_TAG is sent to alice's
    phone, first from a stranger's socket, then from the hop's own (her outbound proxy:
    since review 102 a phone with one takes requests only from it).  Returns both final
    statuses at alice's phone (None: none in 3 s)."""
    alice.send(f"call {BOB}")
    wire, source = hop.invite(timeout=10)
    hop.ring(wire, source, strays)
    time.sleep(0.5)

    def invite(port: int) -> bytes:
        return make_request(
            "INVITE", f"sip:alice@{HOST}:{alice.port}", from_uri=pki.aor("bob"),
            to_uri=pki.aor("alice"), call_id=wire.call_id, cseq=1, from_tag=BOB_TAG,
            via_host=f"{HOST}:{port}",
            extra_headers=[("Contact", f"<sip:bob@{HOST}:{port}>")]).serialize()

    thief = UdpStranger(alice.port)
    try:
        thief.send(invite(thief.local_port))
        stranger = thief.final(wire.call_id, timeout=3)
    finally:
        thief.sock.close()
    hop.sock.sendto(invite(hop.port), (HOST, alice.port))
    return stranger, _final_at(hop.sock, wire.call_id, timeout=3)


def test_control_a_new_dialog_with_bobs_early_tag_is_a_second_call(ringing, pki):  # noqa: F811
    """Attacker: the untrusted hop alice's INVITE passes (it sees its branch); the
    second INVITE may come from anyone who read the 183's To tag, but since review 102
    (stop 37) alice's phone takes it only from her outbound proxy's seat, the hop:
    a stranger's copy is 403.

    Messages: alice's phone calls bob; the hop sends six bodiless 180s in the INVITE's
    transaction (To tags r56stray0..5), then bob's protected 183 (tag r56phone), sealed
    under alice's offer key (kept under her own tag); a bodiless INVITE From
    bob;tag=r56phone To alice under the call's Call-ID.

    On 00358fc six strays filled ``_early_peers`` (the first six tags, before any check)
    and five did not: the review's hole was that bob's tag got 200 after six, 482 after
    five.  Since the fix only a tag that holds keys is recorded, and bob's 183 keeps
    none under his tag (it reuses alice's key): the INVITE is a second call to pjsua
    (200) whatever the strays, and the end of such a dialog keeps the ringing call's
    keys, which is what matters (``tests/unit/test_review55.py``, ``test_review56.py``:
    a keyed early tag is refused 482, and a dialog's end never takes another's slots)."""
    alice, hop = ringing
    # review 102: from anyone but her proxy it is refused before anything is noted;
    # from the hop (her proxy's seat, which saw the 183) it is the second call
    assert _bare_invite_with_bobs_early_tag(alice, pki, 6, hop) == (403, 200)
