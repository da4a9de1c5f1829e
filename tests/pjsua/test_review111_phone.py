"""Review 111 (an attacker's review of afb1199), phone: the home rule with any port of a
home address (stop 38: ``ProxySource.holds_address`` in ``E2MPhone._note_sent``).  A real
``e2m-phone listen`` (pjsua2); review 108's ``Call`` set-up (alice: registrar only,
``registrar = "sip:127.0.0.1:<home port>"``, UDP, no outbound proxy; bob's E2M engine).

Honest break H1 (``test_break_h1_a_peer_on_the_homes_address_cannot_answer_a_direct_call``):
no attacker.  alice, registered, calls ``sip:bob@127.0.0.1:<port>``: a peer that lives
on the home's address at another port (a service next to the proxy on its host, or the
home's own second listener).  With no outbound proxy pjsip sends the INVITE straight
there; bob answers his sealed 200 from that port.  Effect (seen): the call never
confirms, ``responses_not_via_proxy`` 1: alice drops the answer.  The INVITE's
destination is noted as "home" (any port of a home address, ``phone.py:789``), so its
answer must come from the home, but ``ProxySource.matches`` over UDP wants the
(address, port) the config named (``proxysource.py:93``, used at ``phone.py:764``):
the registrar's port only.  Before stop 38 the destination was not home and the answer
was taken.  The same mismatch makes the home's own answers from its second socket
unacceptable when a route set names that socket (K1 of the wire module).  Fix: when a
request is noted as going to a home address on port X, hold its answer to that same
(address, X) (keep the destination with the branch and compare the answer's source
with it), rather than to the registrar's port; or note it home only when the
destination is a configured (address, port).

Control (passes unmarked):
``test_control_h1_the_same_direct_call_answered_from_the_registrars_port``: the same
direct call to the registrar's port, answered (sealed) from there, confirms with
``responses_not_via_proxy`` 0: certificates, sealing and the flow work; only the port
differs.

Tried and held (read): a peer on another address (127.0.0.2) cannot stand for bob in
this set-up (his certificate names 127.0.0.1: ``MissingPeerCertificateError``, run),
so H1's peer must share the home's address, which is the case the brief asked about.
An attacker gains nothing from H1 that he could not by not answering: it is a refusal
of honest answers, not an acceptance of dishonest ones.  A TCP/TLS phone compares the
address only (``udp=False``) and is not affected (read).

Following peers (``certservice_client._follow_peers_in_use``, read): ``touch`` is called
only for the user's own sends (``send_message``, ``call``), so no stranger adds peers to
follow; ``_used`` is capped at 128, ``_subs`` at 64, and a follow returns once 64 are
held (no eviction, so no review 109 churn).  Left: ``_subscribe`` (a renewal, or a
certificate the engine wants for a send) still evicts the oldest subscription when 64
are held, and the evicted peer is followed again at the next slot: bounded (one more
SUBSCRIBE per renewal), not unbounded; and "the most recent are followed" is not quite
what happens (the first 64 keep their slots until they lapse, newer peers wait).

Fixed (stop 38): ``_note_sent`` keeps where each request went (when a home address);
``_answer_from_home`` takes an answer from there (over UDP the port too) or from the
home.  The break test failed on the code before (checked) and passes.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SDP_ANSWER
from e2m_lab.stranger import HOST
from e2m_plugins import sip
from e2m_plugins.sip import make_response
from tests.pjsua.test_review108_phone import Call, pki  # noqa: F401 (fixture)

pytestmark = [pytest.mark.pjsua2, pytest.mark.kamailio]


class Peer:
    """bob's phone on ``host`` (a UDP socket of its own), answering as bob's E2M UA with
    the engine the home socket of review 108's ``Call`` holds."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.source: tuple | None = None

    def receive(self, want, timeout: float = 8.0) -> sip.SipMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, source = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                break
            try:
                msg = sip.parse(data)
            except Exception:  # noqa: BLE001
                continue
            if want(msg):
                self.source = source
                return msg
        raise AssertionError(f"nothing of the kind at {self.host}:{self.port}")

    def close(self) -> None:
        self.sock.close()


class DirectCall(Call):
    """alice (registrar only, UDP) registered at the home; she calls bob straight at
    ``peer`` (his URI names his own address and port: no proxy on the way)."""

    def __init__(self, tmp_path: Path, pki, host: str) -> None:
        super().__init__(tmp_path, pki, "<sip:" + HOST + ":{port};lr;e2m-rr=00>")
        if host == "home":               # the home's own socket answers as bob
            self.peer = self.home
            self.peer.host = HOST
        else:
            self.peer = Peer(host)

    def direct(self) -> tuple[bool, dict, sip.SipMessage]:
        home, alice, peer = self.home, self.alice, self.peer
        alice.wait("started", timeout=15)
        register = home.receive(lambda m: m.is_request and m.method == "REGISTER")
        ok = make_response(register, 200, "OK",
                           [("Contact", f"{register.get('Contact')};expires=3600")], b"", None)
        home.send(ok.replace("To", f"{register.get('To')};tag=reg111"))
        alice.wait("registered", timeout=8)
        mark = alice.mark()
        alice.send(f"call sip:bob@{peer.host}:{peer.port}")
        try:
            invite = peer.receive(lambda m: m.is_request and m.method == "INVITE")
        except AssertionError:
            raise AssertionError("no INVITE at %s:%s; alice's events %r" % (
                peer.host, peer.port, alice.events[mark:])) from None
        delivered = home.engine.open(invite).message
        answer = make_response(delivered, 200, "OK",
                               [("Contact", f"<sip:bob@{peer.host}:{peer.port}>")],
                               SDP_ANSWER, "application/sdp")
        answer = answer.replace("To", f"{delivered.get('To')};tag=r111")
        peer.sock.sendto(home.engine.protect(answer).message.serialize(), peer.source)
        try:
            alice.wait("call_state", where=lambda e: str(e.get("state", "")).upper()
                       .endswith("CONFIRMED"), since=mark, timeout=6)
            confirmed = True
        except AssertionError:
            confirmed = False
        counts = alice.status()["counts"]
        return confirmed, counts, invite

    def close(self) -> None:
        super().close()
        self.peer.close()


@pytest.fixture
def call_factory(tmp_path: Path, pki) -> Iterator:
    made: list[DirectCall] = []

    def make(host: str) -> DirectCall:
        directory = tmp_path / str(len(made))
        directory.mkdir()
        call = DirectCall(directory, pki, host)
        made.append(call)
        return call

    yield make
    for call in made:
        call.close()


def test_break_h1_a_peer_on_the_homes_address_cannot_answer_a_direct_call(call_factory):
    call = call_factory(HOST)
    confirmed, counts, invite = call.direct()
    print("INVITE to", invite.request_uri, "confirmed", confirmed, "counts", counts)
    assert confirmed
    assert counts.get("responses_not_via_proxy", 0) == 0


def test_control_h1_the_same_direct_call_answered_from_the_registrars_port(call_factory):
    """The set-up is live: the same direct call to the home's registrar port, answered
    from there (bob's sealed 200), is taken.  Only the port differs in H1."""
    call = call_factory("home")
    confirmed, counts, invite = call.direct()
    print("INVITE to", invite.request_uri, "confirmed", confirmed, "counts", counts)
    assert confirmed
    assert counts.get("responses_not_via_proxy", 0) == 0
