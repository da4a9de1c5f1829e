"""A second attacker's review of the phone: attacks on a real ``e2m-phone listen``
process (pjsua2) from plain sockets on loopback, no Kamailio.

``test_hole_*``: an attack that SUCCEEDED on the code as it stood when the review was
made (seen failing); the test asserts that it fails now.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER, ua_engine
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST, UdpStranger
from e2m_plugins import sip
from e2m_plugins.ua import next_attempt
from e2m_plugins.testpki import TestPKI, init_test_pki
from pjsua_hooks.firstcopy import Duplicate, FirstCopy

pytestmark = [pytest.mark.pjsua2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review2-pki"), users=("alice", "bob"),
                         key_type="ec")




@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _header(data: bytes, name: str) -> str:
    match = re.search(rb"(?im)^" + name.encode() + rb":\s*(.+?)\r$", data)
    assert match, name
    return match.group(1).decode()


def answered_and_acked(pki: TestPKI, bob: PhoneProcess, peer: UdpStranger, wire: bytes,
                       invite: sip.SipMessage) -> int:
    """alice's INVITE (``wire``, whose plain form is ``invite``) sent to bob by ``peer``:
    bob's phone rings and answers 200, alice's ACK goes back, pjsip's transaction is
    over.  Returns bob's event mark from before the INVITE."""
    mark = bob.mark()
    peer.send(wire)
    ok = peer.answered(invite.call_id, timeout=10)
    assert ok is not None and ok.startswith(b"SIP/2.0 200"), ok[:40] if ok else ok
    bob.wait("call_incoming", since=mark)
    ack = sip.make_request(
        "ACK", re.sub(r"^.*<|>.*$", "", _header(ok, "Contact")), from_uri=pki.aor("alice"),
        to_uri=pki.aor("bob"), call_id=invite.call_id, cseq=invite.cseq[0],
        from_tag=invite.from_tag, to_tag=sip.parse(ok).to_tag,
        via_host=f"{HOST}:{peer.local_port}")
    peer.send(ack.serialize())
    time.sleep(1.0)
    peer.drain()
    return mark


def test_hole_a_captured_invite_sent_again_after_the_ack_rings_a_second_call(pki, bob):
    """Untrusted on-path hop (it forwarded alice's INVITE, so it has its bytes).

    Once bob's phone has answered 200 and got the ACK, pjsip ends the INVITE's server
    transaction at once (``sip_inv.c``: the ACK terminates it), so the very same bytes
    sent again are a new INVITE to pjsua.  The replay check let them through: a repeat
    with the same top Via branch within 32 s counts as a retransmission (pjsip is
    trusted to absorb it), and so did ``FirstCopy`` (same CSeq, same branch).  Bob's
    phone rang a second call shown as alice's, signed and trusted.  Now the ACK of an
    initial INVITE closes that exemption in ``FirstCopy``: a copy after it is 482."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    peer = UdpStranger(bob.port)
    try:
        plain = sip.make_request(
            "INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("alice"),
            to_uri=pki.aor("bob"), via_host=f"{HOST}:{peer.local_port}", body=SRTP_OFFER,
            content_type="application/sdp",
            extra_headers=[("Contact", f"<sip:alice@{HOST}:{peer.local_port}>")])
        wire = alice.protect(plain).message.serialize()
        mark = answered_and_acked(pki, bob, peer, wire, plain)
        peer.send(wire)                                  # the captured bytes, once more
        again = peer.answered(plain.call_id, timeout=3)
        time.sleep(0.5)
        calls = bob.of("call_incoming", since=mark)
        assert len(calls) == 1, f"a second call rang: {len(calls)} call_incoming events"
        assert again is None or not again.startswith(b"SIP/2.0 200")
    finally:
        peer.close()


def _tcp_exchange(sock: socket.socket, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``; the first final response read back (b"" if none)."""
    sock.sendall(data)
    buffer, end = b"", time.monotonic() + timeout
    while time.monotonic() < end:
        sock.settimeout(max(0.05, end - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            break
        if not chunk:
            break
        buffer += chunk
        for match in re.finditer(rb"SIP/2\.0 ([2-6]\d\d)", buffer):
            return buffer[match.start():]
    return b""


@pytest.fixture
def tcp_bob(tmp_path: Path, pki: TestPKI,
            request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request, transport="tcp", tcp_accept=True)


def test_hole_a_message_over_tcp_sent_again_with_its_branch_is_shown_twice(pki, tcp_bob):
    """Untrusted on-path hop, TCP.  pjsip ends a non-INVITE server transaction as soon
    as it answers over a reliable transport (Timer J = 0), so the same MESSAGE bytes
    sent again are a new request to pjsua; the replay check took them for a
    retransmission (same branch, within 32 s) and ``FirstCopy`` too: the message was
    shown twice."""
    _message_sent_twice_over_tcp(pki, tcp_bob)


def test_stop43_a_message_over_a_udp_phones_tcp_listener_sent_again_is_shown_once(pki, bob):
    """The same on a UDP phone, over the TCP listener it opens at its UDP port since
    stop 43 (RFC 3261 18.2.1; a phone without a home takes requests from anyone):
    ``FirstCopy`` holds a MESSAGE that came over TCP to the stream rule."""
    _message_sent_twice_over_tcp(pki, bob)


def _message_sent_twice_over_tcp(pki: TestPKI, phone: PhoneProcess) -> None:
    """alice's signed, sealed MESSAGE over one TCP connection to ``phone``, then the same
    bytes again: shown once, the copy not answered 200."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    tcp_bob = phone
    port = tcp_bob.port
    sock = socket.create_connection((HOST, port), timeout=5)
    try:
        local = sock.getsockname()[1]
        plain = sip.make_request(
            "MESSAGE", f"sip:bob@{HOST}:{port};transport=tcp", from_uri=pki.aor("alice"),
            to_uri=pki.aor("bob"), via_host=f"{HOST}:{local}", transport="TCP",
            body=b"pay carol 10 euros", content_type="text/plain")
        wire = alice.protect(plain).message.serialize()
        mark = tcp_bob.mark()
        first = _tcp_exchange(sock, wire)
        assert first.startswith(b"SIP/2.0 200"), first[:60]
        tcp_bob.wait("message_in", since=mark)
        time.sleep(0.5)
        second = _tcp_exchange(sock, wire)                 # the same bytes, the same branch
        time.sleep(0.5)
        shown = tcp_bob.of("message_in", since=mark)
        assert len(shown) == 1, f"the message was shown {len(shown)} times"
        assert not second.startswith(b"SIP/2.0 200"), second[:60]
    finally:
        sock.close()


# -- FirstCopy alone (no pjsua) ---------------------------------------------------------

def _request(method: str, *, to_tag: str | None = None) -> sip.SipMessage:
    return sip.make_request(method, "sip:bob@example.com", from_uri="sip:alice@example.com",
                            to_uri="sip:bob@example.com", call_id="fc@x", cseq=1,
                            from_tag="a1", to_tag=to_tag, body=b"v=0 offer",
                            content_type="application/sdp")


def test_firstcopy_a_retransmission_passes_until_the_ack_then_is_a_copy():
    seen = FirstCopy(max_age=332.0)
    invite = _request("INVITE")
    seen.check(invite, invite, True)
    seen.check(invite, invite, True)                        # a retransmission: pjsip's
    seen.check(_request("ACK", to_tag="b1").with_body(b""), invite, False)
    with pytest.raises(Duplicate):
        seen.check(invite, invite, True)
    other = _request("ACK", to_tag="b1").replace("CSeq", "7 ACK").with_body(b"")
    seen = FirstCopy(max_age=332.0)
    seen.check(invite, invite, True)
    seen.check(other, other, False)                         # not this INVITE's ACK
    seen.check(invite, invite, True)


def test_firstcopy_over_tcp_a_message_is_never_retransmitted():
    message = _request("MESSAGE")
    for reliable, copies in ((False, 0), (True, 1)):
        seen = FirstCopy(max_age=332.0, reliable=reliable)
        seen.check(message, message, True)
        try:
            seen.check(message, message, True)
        except Duplicate:
            pass
        assert seen.absorbed == copies


def test_hole_one_senders_flood_pushes_everyone_elses_first_copies_out():
    """Insider UA (mallory, a certificate of our CA) with an on-path hop's capture.
    ``FirstCopy`` kept 1024 entries, the oldest out first: 1024 signed MESSAGEs of
    mallory's own pushed out the entry of alice's digest-retried MESSAGE, and the
    captured first attempt (refused 407 on the way, never delivered) was then shown as
    a second copy.  Now one From AoR keeps at most 1/8 of the entries, its own oldest
    going first."""
    seen = FirstCopy(max_age=332.0, limit=64)
    alice = sip.make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                             to_uri="sip:bob@example.com", call_id="m@x", cseq=2,
                             from_tag="a1", body=b"hi", content_type="text/plain")
    seen.check(alice, alice, True)                              # the retry, delivered
    for n in range(200):
        flood = sip.make_request("MESSAGE", "sip:bob@example.com",
                                 from_uri="sip:mallory@example.com", to_uri="sip:bob@example.com",
                                 call_id=f"f{n}@x", from_tag="m1", body=b"x",
                                 content_type="text/plain")
        seen.check(flood, flood, True)
    assert len(seen) <= 64
    first_attempt = alice.replace("CSeq", "1 MESSAGE")
    with pytest.raises(Duplicate):
        seen.check(next_attempt(first_attempt).replace("CSeq", "1 MESSAGE"), alice, True)
