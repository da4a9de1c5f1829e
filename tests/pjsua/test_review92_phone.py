"""A ninety-second attacker's review (December 2026) of ea4cf0c: in-dialog requests and
dialog keys, hole 2 on the real phone (the core half and the report:
``tests/unit/test_review92.py``).

alice's ``e2m-phone listen`` (pjsua2, default settings, bob in ``[peers]``) calls bob
through a UDP socket that answers as bob's E2M UA would (``UAEngine`` with bob's
credentials), and that is also where the attacker sits (an untrusted hop on alice's leg;
anyone with the call's ids and bob's public certificate will do).

Hole (``test_hole_a_stray_493_makes_the_phones_next_reinvite_unreadable_for_bob``):
messages: the call (INVITE, bob's 200 under alice's key, ACK); ``hold`` (alice's
re-INVITE, CSeq 2); before bob answers it, a ``493`` carrying bob's certificate, naming the
call (both tags) and ``CSeq: 1 INVITE``, on a Via branch of the attacker's (no transaction
of pjsip's matches it: pjsip drops it); bob's 200 to the hold; ``unhold`` (CSeq 3).
Effect: the hook hands the stray to ``UAEngine.react`` (``_keep_reaction``: a confirmed
call, ``_plain`` has CSeq 1's plaintext), which retires the call's keys and protects a
retry that is never sent, offering a fresh key as "CSeq 2 INVITE"; bob's real 200 to CSeq
2 confirms that key, and the phone's unhold is sealed under it: bob cannot open it (493),
the call's next request refused.

Control (``test_control_without_the_stray_the_unhold_opens_at_bob``): the same call and
hold without the stray: the unhold opens at bob.

Fixed (stop 35): as ``tests/unit/test_review92.py``'s docstring says.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from e2m_lab.flows import SDP_ANSWER, ua_engine
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.stranger import HOST
from e2m_plugins import sip
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.pjsua2]

BOB = "sip:bob@example.com"
TAG = "r92b"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review92-pki"), users=("alice", "bob"),
                         key_type="ec")


class Bob:
    """A UDP socket alice's phone sends through, answering as bob's E2M UA."""

    def __init__(self, pki: TestPKI) -> None:
        self.pki = pki
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.engine = ua_engine(pki, "bob", peers=("alice",))
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

    def answer(self, wire: sip.SipMessage) -> sip.SipMessage:
        """bob's 200 (sealed by his engine) to ``wire``; then alice's ACK is taken."""
        delivered = self.engine.open(wire).message
        ok = make_response(delivered, 200, "OK", [("Contact", f"<sip:bob@{HOST}:{self.port}>")],
                           SDP_ANSWER, "application/sdp")
        if not delivered.to_tag:
            ok = ok.replace("To", f"{delivered.get('To')};tag={TAG}")
        self.send(self.engine.protect(ok).message)
        cseq = wire.cseq[0]
        ack = self.receive(lambda m: m.is_request and m.method == "ACK" and m.cseq[0] == cseq)
        self.engine.open(ack)
        return delivered

    def stray_493(self, invite: sip.SipMessage) -> sip.SipMessage:
        """A 493 naming the call's first INVITE (CSeq 1) with bob's public certificate,
        alice's Via with a branch of the attacker's."""
        cert = self.pki.user("bob").cert.public_bytes(serialization.Encoding.DER)
        stray = make_response(invite, 493, "Undecipherable", [], cert, "application/pkix-cert")
        stray = stray.replace("To", f"{invite.get('To')};tag={TAG}")
        via = invite.get("Via") or ""
        head, _, params = via.partition(";")
        kept = [p for p in params.split(";") if p and not p.strip().lower().startswith("branch=")]
        return stray.replace("Via", ";".join([head, *kept, "branch=z9hG4bK-hop92-stray"]))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def call(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Bob, sip.SipMessage]]:
    bob = Bob(pki)
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{bob.port}"})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        alice.send(f"call {BOB}")
        invite = bob.receive(lambda m: m.is_request and m.method == "INVITE")
        bob.answer(invite)
        alice.wait("call_state", where=lambda e: str(e.get("state", "")).upper()
                   .endswith("CONFIRMED"), timeout=10)
        yield alice, bob, invite
    finally:
        alice.stop()
        bob.close()


def _unhold_at_bob(alice: PhoneProcess, bob: Bob, invite: sip.SipMessage,
                   stray: bool) -> sip.SipMessage:
    """hold (bob answers it, after the stray when ``stray``), then unhold: what bob's
    engine makes of the unhold (raises when it cannot open it)."""
    alice.send("hold")
    held = bob.receive(lambda m: m.is_request and m.method == "INVITE" and m.to_tag == TAG)
    if stray:
        mark = alice.mark()
        bob.send(bob.stray_493(invite))
        # the phone handled it before bob answers the hold: its engine reacted (before
        # stop 35), or it counted a stray answer to nothing it sent (since)
        deadline = time.monotonic() + 5
        while not alice.of("e2m_answer", since=mark) and \
                not alice.status()["counts"]["stray_e2m_answers"]:
            assert time.monotonic() < deadline, "the phone never handled the stray 493"
            time.sleep(0.1)
    bob.answer(held)
    time.sleep(0.3)
    alice.send("unhold")
    try:
        unhold = bob.receive(lambda m: m.is_request and m.method == "INVITE"
                             and m.cseq[0] > held.cseq[0])
    except AssertionError:
        raise AssertionError(f"no unhold; the phone's last events: "
                             f"{[e.get('kind') for e in alice.events[-12:]]} "
                             f"{[e for e in alice.events[-12:] if 'error' in str(e)][:3]}") from None
    return bob.engine.open(unhold).message


def test_control_without_the_stray_the_unhold_opens_at_bob(call):
    alice, bob, invite = call
    opened = _unhold_at_bob(alice, bob, invite, stray=False)
    assert opened.body and b"m=audio" in opened.body


def test_hole_a_stray_493_makes_the_phones_next_reinvite_unreadable_for_bob(call):
    alice, bob, invite = call
    try:
        opened = _unhold_at_bob(alice, bob, invite, stray=True)
    except E2MError as exc:
        pytest.fail(f"bob cannot open the phone's unhold: {type(exc).__name__}: {exc}")
    assert opened.body and b"m=audio" in opened.body
