"""Review 51 on a real ``e2m-phone listen`` process (pjsua2, auto-answer): a bare second
dialog under a live call's Call-ID, From the caller's AoR with a tag of its own, answered
by pjsua and ended by the sender's BYE, ends the live call's keys at the phone (see
``tests/unit/test_review51.py``, hole 1).  From plain sockets on loopback, no Kamailio.

Fixed: see ``tests/unit/test_review51.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER, ua_engine
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST, UdpStranger
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki

from test_review5_phone import _contact, hang_up_and_close

pytestmark = [pytest.mark.pjsua2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review51-pki"), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    """bob's e2m-phone with SRTP (it answers calls itself)."""
    yield from answering_phone(tmp_path, pki, request)


def _final(sock: UdpStranger, call_id: str, cseq: str, timeout: float = 10.0) -> bytes | None:
    """The first final response to ``call_id`` with CSeq ``cseq`` (older ones skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = sock.answered(call_id, timeout=max(0.1, deadline - time.monotonic()))
        if data is None:
            return None
        if sip.parse(data).get("CSeq") == cseq:
            return data
    return None


ALICE_TAG = "a1b2c3d4e5f6"


class _AlicesCall:
    """alice's answered SRTP call to bob's phone (her From tag ``alice_tag``, her offer
    key K0) from a plain socket; her engine opened the 200, so her re-INVITE reuses K0."""

    def __init__(self, pki: TestPKI, bob: PhoneProcess, alice_tag: str = ALICE_TAG) -> None:
        self.pki = pki
        self.alice_tag = alice_tag
        self.alice = ua_engine(pki, "alice", peers=("bob",))
        self.peer, self.thief = UdpStranger(bob.port), UdpStranger(bob.port)
        plain = sip.make_request(
            "INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("alice"),
            to_uri=pki.aor("bob"), from_tag=self.alice_tag,
            via_host=f"{HOST}:{self.peer.local_port}", body=SRTP_OFFER,
            content_type="application/sdp",
            extra_headers=[("Contact", f"<sip:alice@{HOST}:{self.peer.local_port}>")])
        self.peer.send(self.alice.protect(plain).message.serialize())
        ok = _final(self.peer, plain.call_id, "1 INVITE")
        assert ok is not None and ok.startswith(b"SIP/2.0 200"), ok[:40] if ok else ok
        self.alice.open(sip.parse(ok))
        self.call_id = plain.call_id
        self.bob_tag, self.target = sip.parse(ok).to_tag, _contact(ok)
        self.peer.send(sip.make_request(
            "ACK", self.target, from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
            call_id=self.call_id, cseq=1, from_tag=self.alice_tag, to_tag=self.bob_tag,
            via_host=f"{HOST}:{self.peer.local_port}").serialize())
        time.sleep(0.5)

    def reinvite(self, cseq: int) -> int | None:
        """alice's signed re-INVITE (new media port), sealed under K0 as §2 lets her."""
        plain = sip.make_request(
            "INVITE", self.target, from_uri=self.pki.aor("alice"), to_uri=self.pki.aor("bob"),
            call_id=self.call_id, cseq=cseq, from_tag=self.alice_tag, to_tag=self.bob_tag,
            via_host=f"{HOST}:{self.peer.local_port}",
            body=SRTP_OFFER.replace(b"49170", b"40002"), content_type="application/sdp",
            extra_headers=[("Contact", f"<sip:alice@{HOST}:{self.peer.local_port}>")])
        out = self.alice.protect(plain)
        assert out.info.key_reuse                 # under K0, the call's key
        self.peer.send(out.message.serialize())
        answer = _final(self.peer, self.call_id, f"{cseq} INVITE")
        if answer is None:
            return None
        status = sip.parse(answer).status
        if status is None or not 200 <= status < 300:
            return status
        self.peer.send(sip.make_request(
            "ACK", self.target, from_uri=self.pki.aor("alice"), to_uri=self.pki.aor("bob"),
            call_id=self.call_id, cseq=cseq, from_tag=self.alice_tag, to_tag=self.bob_tag,
            via_host=f"{HOST}:{self.peer.local_port}").serialize())
        return status

    def bare_second_dialog(self, bob: PhoneProcess, from_tag: str,
                           to_uri: str | None = None) -> int | None:
        """A bodiless, unsigned INVITE From alice;tag=``from_tag`` under the call's
        Call-ID from the thief's socket.  When pjsua answers it 200 (a second call), the
        thief ACKs and BYEs and waits for the BYE's 200; returns the INVITE's status."""
        port = self.thief.local_port
        dialog = dict(from_uri=self.pki.aor("alice"), to_uri=to_uri or self.pki.aor("bob"),
                      call_id=self.call_id, from_tag=from_tag, via_host=f"{HOST}:{port}")
        self.thief.send(sip.make_request(
            "INVITE", f"sip:bob@{HOST}:{bob.port}", cseq=1,
            extra_headers=[("Contact", f"<sip:alice@{HOST}:{port}>")], **dialog).serialize())
        ok = _final(self.thief, self.call_id, "1 INVITE")
        assert ok is not None, "the phone did not answer the second INVITE"
        answered = sip.parse(ok)
        if answered.status != 200:
            return answered.status
        assert answered.to_tag != self.bob_tag                 # a second dialog of bob's
        target = _contact(ok)
        self.thief.send(sip.make_request("ACK", target, cseq=1, to_tag=answered.to_tag,
                                         **dialog).serialize())
        time.sleep(0.3)
        mark = bob.mark()
        self.thief.send(sip.make_request("BYE", target, cseq=2, to_tag=answered.to_tag,
                                         **dialog).serialize())
        bye = _final(self.thief, self.call_id, "2 BYE", timeout=5)
        assert bye is not None and bye.startswith(b"SIP/2.0 200"), bye[:60] if bye else bye
        bob.wait("call_ended", since=mark, timeout=5)
        return 200

    def close(self) -> None:
        hang_up_and_close(self.pki, self.target, self.call_id, (self.alice_tag, self.bob_tag),
                          self.peer, self.thief)


def test_control_alices_reinvite_under_her_key_is_answered(pki, bob):
    call = _AlicesCall(pki, bob)
    try:
        assert call.reinvite(2) == 200
    finally:
        call.close()


def test_hole_a_bare_second_dialog_under_the_call_id_ends_the_live_calls_key(pki, bob):
    """Attacker: anyone who read the live call's Call-ID and the two AoRs (plaintext
    headers), from any address; no certificate, no signature.

    Steps: alice's SRTP call with bob's phone is answered (K0 kept at the phone under
    (C, a1, {alice, bob})).  The attacker sends the phone a bodiless INVITE From
    alice;tag=zz51 To bob under Call-ID C; pjsua auto-answers it (a second call, its
    SDP offer sealed to alice's certificate), the attacker ACKs and BYEs; pjsua answers
    the BYE 200, and ``protect`` of that 200 runs ``_end_dialog``, whose
    ``DialogKeys.end_dialog`` drops every slot of C between alice and bob.

    Effect: alice's call goes on in pjsua, but her next re-INVITE under K0 (hold,
    resume, a refresh) is refused 493 at the phone.

    Fix: the end of a dialog ends only that INVITE's slots (see the unit test)."""
    call = _AlicesCall(pki, bob)
    try:
        assert call.bare_second_dialog(bob, "zz51") == 200
        assert call.reinvite(2) == 200
    finally:
        call.close()
