"""Fourth review, the phone: a stale certificate NOTIFY replayed by an untrusted hop.

A real ``e2m-phone`` (alice) whose outbound proxy is a UDP socket of this test: the
hop between alice and her certificate service, forwarding what the service says.
bob's certificate was replaced (a new key; say the old one leaked): the service's
NOTIFY of the old one (CSeq 1) and of the new one (CSeq 2) passed the hop, which
keeps a copy of the first and sends it again.  RFC 3261 §12.2.2: a request whose
CSeq is lower than the dialog's remote sequence number is answered 500 and not
used.  The phone takes it: alice's next MESSAGE to bob is sealed for the old key.
"""

from __future__ import annotations

import socket
from datetime import datetime, timedelta, timezone
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.phones import write_ua
from e2m_lab.pytest_fixtures import PhoneGroup, phone_group
from e2m_plugins import sip
from e2m_plugins.cms.recipients import issuer_and_serial, subject_key_identifier
from e2m_plugins.testpki import TestPKI, init_test_pki, issue_user

pytestmark = [pytest.mark.pjsua2]

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


class Hop:
    """The untrusted hop, standing in for alice's proxy on a UDP socket: it answers
    her requests 200 (a MESSAGE is "delivered" to the hop) and sends NOTIFYs."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.messages: list[sip.SipMessage] = []

    def close(self) -> None:
        self.sock.close()

    def next(self, want) -> tuple[sip.SipMessage, tuple[str, int]]:
        """The next datagram ``want`` accepts; other requests are answered 200."""
        while True:
            data, source = self.sock.recvfrom(65536)
            msg = sip.parse(data)
            if want(msg):
                return msg, source
            if msg.is_request and msg.method not in ("ACK", "SUBSCRIBE"):
                self.sock.sendto(sip.make_response(msg, 200, "OK").serialize(), source)

    def message(self) -> bytes:
        """The body of alice's next MESSAGE (answered 200)."""
        msg, source = self.next(lambda m: m.is_request and m.method == "MESSAGE")
        self.sock.sendto(sip.make_response(msg, 200, "OK").serialize(), source)
        return msg.body or b""

    def notify_answer(self, notify: bytes, to: tuple[str, int]) -> int:
        self.sock.sendto(notify, to)
        answer, _ = self.next(lambda m: not m.is_request and m.cseq[1] == "NOTIFY")
        return answer.status or 0


def sealed_for(body: bytes, cert) -> bool:
    return issuer_and_serial(cert) in body or subject_key_identifier(cert) in body


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("r4-pki"), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture
def group(request: pytest.FixtureRequest) -> Iterator[PhoneGroup]:
    with phone_group(request, []) as made:
        yield made


@pytest.fixture
def hop() -> Iterator[Hop]:
    made = Hop()
    yield made
    made.close()


def test_hole_a_replayed_older_notify_makes_alice_seal_for_bobs_old_key(
        tmp_path: Path, pki: TestPKI, group: PhoneGroup, hop: Hop) -> None:
    assert pki.directory is not None
    old = issue_user(pki.ca, BOB, "ec",             # bob's first certificate
                     not_before=datetime.now(timezone.utc) - timedelta(days=10)).cert
    new = pki.user("bob").cert                       # the one he replaced it with
    directory = tmp_path / "alice"
    directory.mkdir()
    config = write_ua(directory, "alice", pki.directory, peer=None,
                      phone={"proxy": f"sip:127.0.0.1:{hop.port}", "register_via_proxy": False})
    alice = group.start("alice", config, register=False)

    alice.send(f"message {BOB} one")
    sub, source = hop.next(lambda m: m.is_request and m.method == "SUBSCRIBE")
    ok = sip.make_response(sub, 200, "OK", extra_headers=[
        ("Expires", "3600"), ("Contact", f"<sip:127.0.0.1:{hop.port}>")])
    hop.sock.sendto(ok.serialize(), source)

    def notify(cert, cseq: int) -> bytes:
        return sip.make_request(
            "NOTIFY", sip.parse_address(sub.get("Contact") or "").uri, from_uri=BOB,
            to_uri=ALICE, call_id=sub.call_id, from_tag=ok.to_tag, to_tag=sub.from_tag,
            cseq=cseq, via_host=f"127.0.0.1:{hop.port}",
            extra_headers=[("Event", "certificate"),
                           ("Subscription-State", "active;expires=3600")],
            body=cert.public_bytes(Encoding.DER),
            content_type="application/pkix-cert").serialize()

    stale = notify(old, 1)                     # the copy the hop keeps
    assert hop.notify_answer(stale, source) == 200
    assert sealed_for(hop.message(), old)      # "one" went to bob's key of that time
    assert hop.notify_answer(notify(new, 2), source) == 200
    alice.send(f"message {BOB} two")
    assert sealed_for(hop.message(), new)      # bob replaced it: alice follows

    answer = hop.notify_answer(stale, source)  # the same datagram, sent again
    alice.send(f"message {BOB} three")
    body = hop.message()
    assert not sealed_for(body, old), "alice sealed for bob's old, replaced key"
    assert sealed_for(body, new)
    assert answer == 500
