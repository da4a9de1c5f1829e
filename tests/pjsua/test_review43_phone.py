"""Review 43 on the real phone: alice's ``e2m-phone listen`` calls bob through a UDP
socket (its outbound proxy's seat) that answers as bob's E2M UA would (the phone's own
engine, ``UAEngine``, with bob's credentials).

``test_hole_*``: strict xfail on e492040, passing since the fix (``tests/unit/test_review43.py`` has the engine's
side and the fix); ``test_control_*``: the same flow without the cause.
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
from e2m_plugins.testpki import TestPKI
from tests.pjsua.test_review2_phone import pki  # noqa: F401 - fixture

pytestmark = [pytest.mark.pjsua2]

BOB = "sip:bob@example.com"


class Bob:
    """A UDP socket alice's phone sends through, answering as bob's E2M UA."""

    def __init__(self, pki: TestPKI, **settings) -> None:  # noqa: F811
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.engine = ua_engine(pki, "bob", **settings)

    def invite(self, timeout: float) -> tuple[sip.SipMessage, tuple]:
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
            if msg.is_request and msg.method == "INVITE":
                return msg, source
        raise AssertionError("alice sent no INVITE")

    def early_media(self, wire: sip.SipMessage, source: tuple) -> bool:
        """Open alice's INVITE, answer 183 with an SDP protected by bob's engine; True
        when it went under a reused key (alice's offer key)."""
        delivered = self.engine.open(wire).message
        progress = make_response(delivered, 183, "Session Progress",
                                 [("Contact", f"<sip:bob@{HOST}:{self.port}>")],
                                 SDP_ANSWER, "application/sdp")
        progress = progress.replace("To", f"{delivered.get('To')};tag=r43b")
        sent = self.engine.protect(progress)
        self.sock.sendto(sent.message.serialize(), source)
        return sent.info.key_reuse

    def close(self) -> None:
        self.sock.close()


def _alice(tmp_path: Path, pki: TestPKI, bob: Bob) -> PhoneProcess:  # noqa: F811
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{bob.port}"})
    process = PhoneProcess(config, "alice")
    process.wait("started", timeout=15)
    return process


@pytest.fixture
def reusing(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Bob]]:  # noqa: F811
    bob = Bob(pki)
    alice = _alice(tmp_path, pki, bob)
    try:
        yield alice, bob
    finally:
        alice.stop()
        bob.close()


@pytest.fixture
def not_reusing(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Bob]]:  # noqa: F811
    bob = Bob(pki, cek_reuse=False)
    alice = _alice(tmp_path, pki, bob)
    try:
        yield alice, bob
    finally:
        alice.stop()
        bob.close()


def _refused_183s(alice: PhoneProcess, bob: Bob, *, reused: bool) -> list[dict]:
    mark = alice.mark()
    alice.send(f"call {BOB}")
    wire, source = bob.invite(timeout=10)
    assert bob.early_media(wire, source) is reused
    time.sleep(2.0)
    return [e for e in alice.of("error", since=mark)
            if e.get("direction") == "rx" and str(e.get("message", "")).startswith("183")]


def test_control_a_183_sealed_to_alices_certificate_is_taken(not_reusing):
    alice, bob = not_reusing
    assert _refused_183s(alice, bob, reused=False) == []


def test_hole_the_callees_183_under_alices_offer_key_is_refused_by_her_phone(reusing):
    """Attacker: none needed (a callee's E2M UA that follows docs/protocol.md §2 and
    rings with early media: "keys received from the peer are usable at once").

    Steps: alice's phone calls bob; its INVITE offers a key (unconfirmed until the 2xx).
    bob's UA answers 183 with SDP under that key (a kekri alone, as ``UAEngine.protect``
    does).  alice's hook opens it with confirmed keys only and finds none.

    Effect: the phone drops the 183 (an ``error`` event, NoMatchingRecipientError): no
    early media; with 100rel it would send no PRACK and the callee gives the call up.

    Fix: see ``tests/unit/test_review43.py::test_hole_the_callees_early_body_under_the_
    callers_offer_key_is_refused``."""
    alice, bob = reusing
    refused = _refused_183s(alice, bob, reused=True)
    assert refused == [], [(e.get("message"), e.get("error"), e.get("detail")) for e in refused]
