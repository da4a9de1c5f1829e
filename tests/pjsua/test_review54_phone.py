"""A fifty-fourth attacker's review (December 2026) of 50e6c26: the mission's promises to
the sender, end to end; here on a real ``e2m-phone listen`` process (pjsua2), from plain
sockets on loopback, no Kamailio (which drops these requests: the proxy path holds,
``tests/kamailio/test_review54_wire.py``).

The gap (``tests/unit/test_review54.py``): the core reads the first instance of From,
To, Call-ID and CSeq, pjsip the last one.  The engine's checks pass on the first
instances, pjsua acts on the last ones.  An insider reaches the phone straight (its UDP
listener takes anyone's requests), an untrusted hop past the home proxy by appending
headers to what it forwards.

- ``test_hole_a_signed_message_with_a_second_from_is_shown_as_alices``: bob's phone
  shows carol's MESSAGE as ``"Alice" <sip:alice@example.com>``, "signed ... (trusted)".
- ``test_hole_a_third_partys_invite_with_second_ids_moves_a_live_calls_media``: carol's
  INVITE, her own new call to the engine, is a re-INVITE of alice's call to pjsip:
  answered 200, the call's media goes to carol's address.

Also seen, not kept as a test: an INVITE From carol with a second ``From: "Alice"``
rings as ``remote: "Alice" <sip:alice@example.com>`` and bob's 200 is sealed for alice
(pjsip's answer copies the last From).

Fixed (stop 30): a message with more than one From, To, Call-ID or CSeq (compact forms
counted with their long ones) is malformed: ``sip.parse`` refuses it (the phone answers
400 before pjsip sees it), and ``UAEngine.open`` and ``ProxyEngine.inspect`` check what
they are given (``SipMessage.check_unambiguous``).  The holes' markers are gone; they
are guards now.
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

CAROLS_RTP = "40404"
CAROLS_SDP = SRTP_OFFER.replace(b"49170", CAROLS_RTP.encode()).replace(b"o=alice", b"o=carol")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review54-pki"),
                         users=("alice", "bob", "carol"), key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _carols_message(pki: TestPKI, bob: PhoneProcess, peer: UdpStranger, *,
                    second_from: bool) -> list[dict]:
    """carol's signed MESSAGE, sealed for bob, sent to bob's phone straight (with a
    second ``From: "Alice"`` at the end when ``second_from``); bob's message_in events."""
    carol = ua_engine(pki, "carol", peers=("bob",))
    plain = sip.make_request("MESSAGE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("carol"),
                             to_uri=pki.aor("bob"), via_host=f"{HOST}:{peer.local_port}",
                             body=b"Pay the invoice to IBAN XX00 1234", content_type="text/plain")
    wire = carol.protect(plain).message
    if second_from:
        wire = wire.add("From", f'"Alice" <{pki.aor("alice")}>;tag=zz')
    mark = bob.mark()
    peer.send(wire.serialize())
    status = peer.final(plain.call_id, timeout=5)
    time.sleep(0.5)
    shown = bob.of("message_in", since=mark)
    assert status == 200 or not shown, (status, shown)
    return shown


def test_control_carols_signed_message_is_shown_as_hers(pki, bob):
    peer = UdpStranger(bob.port)
    try:
        (shown,) = _carols_message(pki, bob, peer, second_from=False)
        assert "sip:carol@example.com" in shown["from_uri"]
        assert shown["security"]["trusted"] and shown["security"]["signers"] == [pki.aor("carol")]
    finally:
        peer.close()


def test_hole_a_signed_message_with_a_second_from_is_shown_as_alices(pki, bob):
    """Attacker: insider UA carol (a certificate of our CA), straight to bob's phone; or
    an untrusted hop past the home proxy that appends one header to carol's message.

    Message: carol's MESSAGE (From carol, signed by carol, sealed for bob) plus
    ``From: "Alice" <sip:alice@example.com>;tag=zz`` as its last header.

    Effect (seen): answered 200; ``message_in`` with ``from_uri: "Alice"
    <sip:alice@example.com>``, ``security.trusted: True`` (the engine checked carol's
    signature against the first From; pjsip shows the last).

    At fault: ``e2m_plugins/sip.py`` ``parse`` keeps both From headers and every reader
    takes the first; ``pjsua_hooks/phone.py`` ``_on_rx`` hands pjsip the message with
    both.  Fix: refuse a message with more than one From, To, Call-ID or CSeq (400)."""
    peer = UdpStranger(bob.port)
    try:
        shown = _carols_message(pki, bob, peer, second_from=True)
        assert not any("alice" in event["from_uri"] for event in shown), shown
    finally:
        peer.close()


def alices_call(pki: TestPKI, bob: PhoneProcess, peer: UdpStranger
                ) -> tuple[sip.SipMessage, sip.SipMessage, str]:
    """alice calls bob's phone (SRTP, sealed and signed), bob answers, alice ACKs:
    (INVITE, 200, bob's Contact URI)."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    plain = sip.make_request("INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("alice"),
                             to_uri=pki.aor("bob"), via_host=f"{HOST}:{peer.local_port}",
                             body=SRTP_OFFER, content_type="application/sdp",
                             extra_headers=[("Contact", f"<sip:alice@{HOST}:{peer.local_port}>")])
    peer.send(alice.protect(plain).message.serialize())
    data = peer.answered(plain.call_id, timeout=10)
    assert data is not None and data.startswith(b"SIP/2.0 200"), data[:40] if data else data
    ok = sip.parse(data)
    contact = re.sub(r"^.*<|>.*$", "", ok.get("Contact") or "")
    ack = sip.make_request("ACK", contact, from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
                           call_id=plain.call_id, cseq=1, from_tag=plain.from_tag,
                           to_tag=ok.to_tag, via_host=f"{HOST}:{peer.local_port}")
    peer.send(ack.serialize())
    alice.open(ok)
    bob.wait("call_media", since=0)
    time.sleep(0.3)         # the 200 is ACKed: nothing more comes
    peer.drain()
    return plain, ok, contact


def _carols_reinvite(pki: TestPKI, bob: PhoneProcess, invite: sip.SipMessage,
                     ok: sip.SipMessage, carol_peer: UdpStranger, *, second_ids: bool
                     ) -> tuple[bytes | None, list[str]]:
    """carol's INVITE into alice's call: with ``second_ids``, her own new INVITE plus a
    second Call-ID, To (bob's tag) and CSeq of alice's call; else review 2's plain
    re-INVITE with the call's ids.  Returns the final answer and the remote RTP
    addresses bob's phone reported since."""
    carol = ua_engine(pki, "carol", peers=("bob",))
    extra = [("Contact", f"<sip:carol@{HOST}:{carol_peer.local_port}>")]
    if second_ids:
        plain = sip.make_request(
            "INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("carol"),
            to_uri=pki.aor("bob"), via_host=f"{HOST}:{carol_peer.local_port}",
            from_tag=invite.from_tag, body=CAROLS_SDP, content_type="application/sdp",
            extra_headers=extra)
        wire = (carol.protect(plain).message.add("Call-ID", invite.call_id)
                .add("To", f"<{pki.aor('bob')}>;tag={ok.to_tag}").add("CSeq", "2 INVITE"))
    else:
        plain = sip.make_request(
            "INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("carol"),
            to_uri=pki.aor("bob"), via_host=f"{HOST}:{carol_peer.local_port}",
            call_id=invite.call_id, cseq=2, from_tag=invite.from_tag, to_tag=ok.to_tag,
            body=CAROLS_SDP, content_type="application/sdp", extra_headers=extra)
        wire = carol.protect(plain).message
    mark = bob.mark()
    carol_peer.send(wire.serialize())
    # the refusal (400 since the fix) names the first Call-ID, carol's own; pjsip's answer
    # on the old code named the last, alice's call's
    answer = carol_peer.answered(plain.call_id, timeout=5) \
        or carol_peer.answered(invite.call_id, timeout=1)
    time.sleep(1.0)
    return answer, [event.get("remote_rtp") or "" for event in bob.of("call_media", since=mark)]


def test_control_a_third_partys_plain_reinvite_leaves_the_call_where_it_is(pki, bob):
    """Without the attack: carol's re-INVITE with the call's ids (review 2) is refused
    (403) and the media stays with alice."""
    peer, carol_peer = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, _ = alices_call(pki, bob, peer)
        answer, moved = _carols_reinvite(pki, bob, invite, ok, carol_peer, second_ids=False)
        assert answer is not None and answer.startswith(b"SIP/2.0 403"), answer[:40] if answer else answer
        assert not any(CAROLS_RTP in rtp for rtp in moved), moved
    finally:
        peer.close()
        carol_peer.close()


def test_hole_a_third_partys_invite_with_second_ids_moves_a_live_calls_media(pki, bob):
    """Attacker: insider UA carol who read the ids of alice's live call with bob.

    Message, straight to bob's phone: her own INVITE (new Call-ID, From carol with
    alice's From tag, To bob without a tag, CSeq 1, SDP with her RTP address and
    ``a=crypto``, signed by her, sealed for bob), then ``Call-ID`` of alice's call,
    ``To`` with bob's tag and ``CSeq: 2 INVITE`` appended.

    Effect (seen): the engine opens an initial INVITE from carol (no parties check: its
    first To has no tag); pjsip matches the last Call-ID and tags to alice's confirmed
    call and answers 200 (From alice, CSeq 2); ``call_media`` of alice's call now
    reports ``remote_rtp: 127.0.0.1:40404``, carol's address: bob talks to carol,
    shown as alice, "trusted".

    At fault and fix: as in ``tests/unit/test_review54.py`` (one From, To, Call-ID and
    CSeq, else 400, in the core's parser or the phone's ``_on_rx``)."""
    peer, carol_peer = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, _ = alices_call(pki, bob, peer)
        answer, moved = _carols_reinvite(pki, bob, invite, ok, carol_peer, second_ids=True)
        assert not any(CAROLS_RTP in rtp for rtp in moved), (moved, answer[:80] if answer else answer)
    finally:
        peer.close()
        carol_peer.close()
