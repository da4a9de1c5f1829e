"""A fifth attacker's review of the phone: the parties hijack (test_review2_ua) on a real
``e2m-phone listen`` process (pjsua2), from plain sockets on loopback, no Kamailio.

``test_hole_*``: an attack that SUCCEEDS on the code as it stands, kept as a strict
xfail (its assertion is what the fix must make true); see tests/unit/test_review5.py.
"""

from __future__ import annotations

import re
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

pytestmark = [pytest.mark.pjsua2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review5-pki"), users=("alice", "bob", "carol"),
                         key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    """bob's e2m-phone with SRTP (it answers calls itself)."""
    yield from answering_phone(tmp_path, pki, request)


def _contact(data: bytes) -> str:
    match = re.search(rb"(?im)^(?:Contact|m):\s*(.+?)\r$", data)
    assert match, "no Contact"
    return re.sub(r"^.*<|>.*$", "", match.group(1).decode())


class _Call:
    """alice's answered call to bob's phone from a plain socket, and carol's socket."""

    def __init__(self, pki: TestPKI, bob: PhoneProcess) -> None:
        self.pki = pki
        self.alice = ua_engine(pki, "alice", peers=("bob",))
        self.carol = ua_engine(pki, "carol", peers=("bob",))
        self.peer, self.thief = UdpStranger(bob.port), UdpStranger(bob.port)
        plain = sip.make_request(
            "INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("alice"),
            to_uri=pki.aor("bob"), via_host=f"{HOST}:{self.peer.local_port}", body=SRTP_OFFER,
            content_type="application/sdp",
            extra_headers=[("Contact", f"<sip:alice@{HOST}:{self.peer.local_port}>")])
        mark = bob.mark()
        self.peer.send(self.alice.protect(plain).message.serialize())
        ok = self.peer.answered(plain.call_id, timeout=10)
        assert ok is not None and ok.startswith(b"SIP/2.0 200"), ok[:40] if ok else ok
        bob.wait("call_incoming", since=mark)
        self.call_id = plain.call_id
        self.alice_tag, self.bob_tag = plain.from_tag, sip.parse(ok).to_tag
        self.target = _contact(ok)
        self.peer.send(sip.make_request(
            "ACK", self.target, from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
            call_id=self.call_id, cseq=1, from_tag=self.alice_tag, to_tag=self.bob_tag,
            via_host=f"{HOST}:{self.peer.local_port}").serialize())
        time.sleep(0.5)

    def hijack(self, cseq: int) -> int | None:
        """carol's re-INVITE naming the call (From carol, signed by her, media to her)."""
        reinvite = sip.make_request(
            "INVITE", self.target, from_uri=self.pki.aor("carol"), to_uri=self.pki.aor("bob"),
            call_id=self.call_id, cseq=cseq, from_tag=self.alice_tag, to_tag=self.bob_tag,
            via_host=f"{HOST}:{self.thief.local_port}",
            body=SRTP_OFFER.replace(b"49170", b"40000"), content_type="application/sdp",
            extra_headers=[("Contact", f"<sip:carol@{HOST}:{self.thief.local_port}>")])
        self.thief.send(self.carol.protect(reinvite).message.serialize())
        return self.thief.final(self.call_id, timeout=5)

    def bye(self, *, sender: str, cseq: int, from_tag: str, to_tag: str) -> int | None:
        """A bodiless BYE from carol's socket, as ``sender``."""
        bye = sip.make_request(
            "BYE", self.target, from_uri=self.pki.aor(sender), to_uri=self.pki.aor("bob"),
            call_id=self.call_id, cseq=cseq, from_tag=from_tag, to_tag=to_tag,
            via_host=f"{HOST}:{self.thief.local_port}")
        self.thief.send(bye.serialize())
        return self.thief.final(self.call_id, timeout=5)

    def close(self) -> None:
        hang_up_and_close(self.pki, self.target, self.call_id, (self.alice_tag, self.bob_tag),
                          self.peer, self.thief)


def hang_up_and_close(pki: TestPKI, target: str, call_id: str, tags: tuple[str, str],
                      peer: UdpStranger, *others: UdpStranger) -> None:
    """alice (``tags``: hers, bob's) hangs the call up from ``peer`` first (a 481 if it
    is over), then the sockets close: a live call makes the phone's quit wait 5 s for
    a BYE answer from a closed socket."""
    try:
        peer.send(sip.make_request(
            "BYE", target, from_uri=pki.aor("alice"), to_uri=pki.aor("bob"), call_id=call_id,
            cseq=90, from_tag=tags[0], to_tag=tags[1],
            via_host=f"{HOST}:{peer.local_port}").serialize())
        peer.final(call_id, timeout=2)
    finally:
        for sock in (peer, *others):
            sock.close()


def test_hole_a_bye_with_the_callees_tag_in_from_opens_the_call_to_carol(pki, bob):
    """Insider UA (carol) who read the ids of alice's call to bob off the wire.

    Control: carol's re-INVITE naming the call (alice's tag in From, bob's in To, From
    carol, signed by her, encrypted to bob) is refused 403 (``_check_parties``).  Then
    carol sends bob ``BYE`` with ``From: carol;tag=<bob's own tag>`` and ``To:
    bob;tag=zz``: the engine passes it (no dialog of bob's has To tag zz) but its
    ``_forget_parties`` drops the entry of the From tag, bob's; pjsip finds no dialog
    for To tag zz and answers 481, so the call goes on.  Carol's next re-INVITE is then
    answered 200 by pjsua: bob's SDP answer, with his SRTP keys, sealed for carol (the
    200's peer is its From: "tx 200 INVITE: encrypted for sip:carol@example.com"), and
    the call's media goes to carol's port (call_media remote_rtp 127.0.0.1:40000).
    Fix: tests/unit/test_review5.py::test_hole_a_bye_with_our_tag_in_from_*."""
    call = _Call(pki, bob)
    try:
        assert call.hijack(5) == 403                                  # control: refused
        assert call.bye(sender="carol", cseq=6, from_tag=call.bob_tag, to_tag="zz") == 481
        assert call.hijack(7) == 403, "carol's re-INVITE into alice's call was answered"
    finally:
        call.close()


def test_hole_a_bye_pjsip_refuses_as_out_of_order_still_opens_the_call(pki, bob):
    """The same with the call's own ids: ``BYE`` From alice (spoofed: a BYE has no body,
    nothing is signed), alice's tag, bob's tag, and CSeq 1 (alice's INVITE had 1).  The
    parties match, so ``_check_parties`` passes and ``_end_dialog`` drops bob's entry on
    receipt; pjsip then answers 500 (a CSeq not above the last, RFC 3261 12.2.2) and the
    call goes on.  Carol's re-INVITE is answered 200.  Only pjsip knows whether a BYE
    ends the dialog: the engine should drop the entry when it SENDS the 2xx to a BYE
    (and when it sends its own BYE), not when one arrives."""
    call = _Call(pki, bob)
    try:
        assert call.bye(sender="alice", cseq=1, from_tag=call.alice_tag,
                        to_tag=call.bob_tag) == 500
        assert call.hijack(7) == 403, "carol's re-INVITE into alice's call was answered"
    finally:
        call.close()
