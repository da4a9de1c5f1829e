"""Review 129, the real phone: what alice's pjsua2 phone does with a 2xx relayed after
her INVITE's failure, now that her engine opens it (stop 42, review 127 HB1).

(Write-up below, filled in as the runs were made.)
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SDP_ANSWER, ua_engine
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.stranger import HOST
from e2m_plugins import sip
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.pjsua2]

BOB = "sip:bob@example.com"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review129-pki"), users=("alice", "bob"),
                         key_type="ec")


class Bob:
    """A UDP socket alice's phone sends through (her outbound proxy), answering as bob's
    two devices would (each its own ``UAEngine`` with bob's credentials)."""

    def __init__(self, pki: TestPKI) -> None:
        self.pki = pki
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.devices = {"f1": ua_engine(pki, "bob", peers=("alice",)),
                        "f2": ua_engine(pki, "bob", peers=("alice",))}
        self.source: tuple | None = None
        self.log: list[sip.SipMessage] = []

    def receive(self, want, timeout: float = 10.0) -> sip.SipMessage | None:
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
            self.log.append(msg)
            if msg.is_request and msg.method == "CANCEL":
                self.sock.sendto(make_response(msg, 200, "OK").serialize(), source)
            if want(msg):
                self.source = source
                return msg
        return None

    def send(self, msg: sip.SipMessage) -> None:
        assert self.source is not None
        self.sock.sendto(msg.serialize(), self.source)

    def reply(self, invite: sip.SipMessage, tag: str, status: int, reason: str) -> None:
        opened = self.devices[tag].open(invite).message
        if status < 300 and status != 100:
            response = make_response(opened, status, reason,
                                     [("Contact", f"<sip:bob@{HOST}:{self.port}>")],
                                     SDP_ANSWER if status == 200 else b"",
                                     "application/sdp" if status == 200 else None)
        else:
            response = make_response(opened, status, reason)
        response = response.replace("To", f"{opened.get('To')};tag={tag}")
        if status == 200:
            protected = self.devices[tag].protect(response)
            assert protected.info.key_reuse        # under alice's offer key (kekri)
            response = protected.message
        self.send(response)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ringing(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Bob, sip.SipMessage]]:
    bob = Bob(pki)
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{bob.port}"})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        alice.send(f"call {BOB}")
        invite = bob.receive(lambda m: m.is_request and m.method == "INVITE")
        assert invite is not None
        bob.reply(invite, "f1", 180, "Ringing")
        time.sleep(0.3)
        yield alice, bob, invite
    finally:
        alice.stop()
        bob.close()


def _states(alice: PhoneProcess, since: int) -> list[str]:
    return [str(e.get("state", "")).upper().rsplit("_", 1)[-1]
            for e in alice.of("call_state", since=since)]


def _after_late_200(alice: PhoneProcess, bob: Bob, invite: sip.SipMessage, *,
                    how: str) -> dict:
    """alice's call fails (``how``: device 1's 486, or alice hangs up: CANCEL, 487);
    0.5 s later device 2 answers 200 under her offer key.  What the phone did with it."""
    mark = alice.mark()
    if how == "486":
        bob.reply(invite, "f1", 486, "Busy Here")
    else:
        alice.send("hangup")
        assert bob.receive(lambda m: m.is_request and m.method == "CANCEL") is not None
        bob.reply(invite, "f1", 487, "Request Terminated")
    assert bob.receive(lambda m: m.is_request and m.method == "ACK") is not None
    time.sleep(0.5)
    late_mark = alice.mark()
    bob.reply(invite, "f2", 200, "OK")
    ack = bob.receive(lambda m: m.is_request and m.method == "ACK"
                      and (m.to_tag or "") == "f2", timeout=5)
    bye = bob.receive(lambda m: m.is_request and m.method == "BYE", timeout=5)
    time.sleep(0.5)
    return {"states": _states(alice, mark), "late_states": _states(alice, late_mark),
            "ack": ack is not None, "bye": bye is not None,
            "kinds": [e.get("kind") for e in alice.events[-15:]],
            "sent": [(m.method, m.to_tag) for m in bob.log if m.is_request]}


def _acks(bob: Bob, tag: str) -> int:
    return sum(1 for m in bob.log if m.is_request and m.method == "ACK" and m.to_tag == tag)


@pytest.mark.xfail(strict=True, reason="review 129 HB1: the late 2xx the UA engine now "
                   "opens is swallowed by pjsip's completed INVITE transaction (it re-ACKs "
                   "the failure, never ACKs or BYEs the 200): no late-2xx call on the phone")
@pytest.mark.parametrize("how", ["486", "cancel"])
def test_honest_break_hb1_the_phone_acknowledges_a_late_2xx(ringing, how):
    alice, bob, invite = ringing
    seen = _after_late_200(alice, bob, invite, how=how)
    # the hook handed the 200 on (opened, no refusal): pjsip answered it with the
    # failure's ACK again
    assert not alice.of("error"), alice.of("error")
    assert _acks(bob, "f1") == 2, seen
    # RFC 3261 13.2.2.4: each 2xx is ACKed (and, a call the user no longer wants, BYEd)
    assert seen["ack"], seen
    if how == "cancel":
        assert seen["bye"], seen


@pytest.mark.parametrize("how", ["486", "cancel"])
def test_control_no_call_is_pushed_onto_the_phone_after_its_failure(ringing, how):
    """The attacker's angle (an insider callee device, or anyone holding the offer's
    CEK, answering after the failure or after alice hung up): the phone takes no call."""
    alice, bob, invite = ringing
    seen = _after_late_200(alice, bob, invite, how=how)
    assert "CONFIRMED" not in seen["late_states"], seen
    assert not any(e.get("kind") == "call_media" for e in alice.events), seen
    assert seen["states"] == ["DISCONNECTED"], seen


def test_control_the_same_200_without_a_failure_is_acked_and_the_call_confirmed(ringing):
    alice, bob, invite = ringing
    mark = alice.mark()
    bob.reply(invite, "f2", 200, "OK")
    ack = bob.receive(lambda m: m.is_request and m.method == "ACK"
                      and (m.to_tag or "") == "f2", timeout=5)
    assert ack is not None
    alice.wait("call_state", where=lambda e: str(e.get("state", "")).upper()
               .endswith("CONFIRMED"), since=mark, timeout=10)
