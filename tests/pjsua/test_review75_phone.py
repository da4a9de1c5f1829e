"""A seventy-fifth attacker's review (December 2026) of 8e54426, on the real phone: the
curious chosen proxy, again.  alice's ``e2m-phone listen`` (pjsua2, default settings: she
accepts proxies of her domain and bob's only) calls bob through a UDP socket that answers
as bob's E2M UA would (``UAEngine`` with bob's credentials and a ``[[proxies]]`` entry for
his compliance recorder ``recorder.elsewhere.net``, a third domain, viewing INVITE SDP).

Hole (``test_hole_bobs_recorder_reads_the_real_phones_answer_after_one_forged_493``):
attacker: the recorder, chosen by bob, on bob's path.  Messages: alice's INVITE (early
offer, sealed for bob alone), bob's 200 (under alice's key, the recorder given its own
RecipientInfo), ACK; bob's re-INVITE (hold); the recorder answers it 493 with alice's
public certificate; bob retires the call's keys and sends the re-INVITE again under a fresh
key naming the recorder; alice's phone answers 200.  Effect: the phone's answer SDP (its
address, port and codecs; keys, if any, stay sealed for bob) is sealed under the fresh key:
the recorder opens it, though alice's phone refuses that host as a reader
(``accepts_proxy``).  The engine's side, the faulty lines and the fix:
``tests/unit/test_review75.py``.

Control (``test_control_bobs_reinvite_under_alices_key_leaves_the_phones_answer_closed``):
the same call without the forged 493: bob's re-INVITE goes under alice's key, and the
phone's answer reaches nobody but bob.

Fixed (stop 32): see tests/unit/test_review75.py; the real phone's answer is no longer
sealed under the recorder's key (XPASS, marker gone).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from e2m_lab.flows import SDP_ANSWER, SDP_VIEW, known_proxy, proxy_engine, ua_engine
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.stranger import HOST
from e2m_plugins import sip
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.pjsua2]

BOB = "sip:bob@example.com"
RECORDER = "recorder.elsewhere.net"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review75-pki"), users=("alice", "bob"),
                         key_type="ec")


class Bob:
    """A UDP socket alice's phone sends through, answering as bob's E2M UA."""

    def __init__(self, pki: TestPKI) -> None:
        self.pki = pki
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.engine = ua_engine(pki, "bob", peers=("alice",),
                                proxies=(known_proxy(pki, RECORDER, SDP_VIEW),))
        self.recorder = proxy_engine(pki, RECORDER, view=SDP_VIEW)
        self.source: tuple | None = None

    def receive(self, want, timeout: float = 10.0) -> sip.SipMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, source = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                break
            try:
                msg = sip.parse(data)
            except Exception:  # noqa: BLE001 - keep-alives
                continue
            if want(msg):
                self.source = source
                return msg
        raise AssertionError("the phone sent nothing of the kind")

    def send(self, msg: sip.SipMessage) -> None:
        assert self.source is not None
        self.sock.sendto(msg.serialize(), self.source)

    def answer_the_call(self) -> tuple[sip.SipMessage, str]:
        """Take alice's INVITE, answer 200 (SDP for alice and the recorder), take her ACK.
        Returns (alice's INVITE as opened, her Contact URI)."""
        wire = self.receive(lambda m: m.is_request and m.method == "INVITE")
        assert self.recorder.inspect(wire).seen == ()       # nobody reads alice's offer
        delivered = self.engine.open(wire).message
        ok = make_response(delivered, 200, "OK", [("Contact", f"<sip:bob@{HOST}:{self.port}>")],
                           SDP_ANSWER, "application/sdp")
        ok = ok.replace("To", f"{delivered.get('To')};tag=r75b")
        sent = self.engine.protect(ok)
        assert sent.info.readable_by == (RECORDER,)
        self.send(sent.message)
        ack = self.receive(lambda m: m.is_request and m.method == "ACK")
        self.engine.open(ack)
        contact = sip.parse_address(delivered.get("Contact") or "").uri
        return delivered, contact

    def reinvite(self, invite: sip.SipMessage, contact: str) -> sip.SipMessage:
        plain = make_request("INVITE", contact, from_uri=BOB, to_uri="sip:alice@example.com",
                             call_id=invite.call_id, cseq=1, from_tag="r75b",
                             to_tag=invite.from_tag, via_host=f"{HOST}:{self.port}",
                             extra_headers=[("Contact", f"<sip:bob@{HOST}:{self.port}>")],
                             body=SDP_ANSWER.replace(b"a=rtpmap", b"a=sendonly\r\na=rtpmap", 1),
                             content_type="application/sdp")
        return plain

    def phones_answer(self, request: sip.SipMessage) -> sip.SipMessage:
        self.send(request)
        cseq = request.cseq
        reply = self.receive(lambda m: not m.is_request and m.status == 200 and m.cseq == cseq)
        self.send(make_request("ACK", request.start_line.request_uri, from_uri=BOB,
                               to_uri="sip:alice@example.com", call_id=request.call_id,
                               cseq=cseq[0], from_tag="r75b", to_tag=reply.to_tag,
                               via_host=f"{HOST}:{self.port}"))
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def call(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Bob]]:
    bob = Bob(pki)
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{bob.port}"})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        alice.send(f"call {BOB}")
        yield alice, bob
    finally:
        alice.stop()
        bob.close()


def test_control_bobs_reinvite_under_alices_key_leaves_the_phones_answer_closed(call):
    alice, bob = call
    invite, contact = bob.answer_the_call()
    sent = bob.engine.protect(bob.reinvite(invite, contact))
    assert sent.info.key_reuse
    assert bob.recorder.inspect(sent.message).seen      # on bob's path: bob's own SDP
    reply = bob.phones_answer(sent.message)
    assert reply.body                                   # the phone answered with an SDP
    assert bob.recorder.inspect(reply).seen == ()
    assert bob.engine.open(reply).message.body.startswith(b"v=0")


def test_hole_bobs_recorder_reads_the_real_phones_answer_after_one_forged_493(call, pki):
    alice, bob = call
    invite, contact = bob.answer_the_call()
    plain = bob.reinvite(invite, contact)
    sent = bob.engine.protect(plain)
    der = pki.user("alice").cert.public_bytes(serialization.Encoding.DER)
    forged = make_response(sent.message, 493, "Undecipherable", [], der,
                           "application/pkix-cert")
    reaction = bob.engine.react(forged, plain)
    assert reaction.action == "retry" and reaction.request is not None
    assert bob.recorder.inspect(reaction.request).seen  # on bob's path: keeps the fresh key
    reply = bob.phones_answer(reaction.request)
    assert reply.body
    assert bob.engine.open(reply).message.body.startswith(b"v=0")   # bob reads it
    assert bob.recorder.inspect(reply).seen == ()
