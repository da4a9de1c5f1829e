"""Malformed and hostile requests sent to a real E2M proxy: each gets its defined answer
(from the one error table, or Kamailio's own for broken SIP), and the proxy keeps
serving normal traffic right after each one.  Nothing refused is archived, and no
body text reaches the Kamailio log.  The requests are ``e2m_lab.hostile``'s, the same the
engine-level error-row tests (``tests/unit/test_error_rows.py``) use.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab import hostile as h
from e2m_lab.flows import TRUSTED
from e2m_lab.hostile import SECRET
from e2m_lab.kamailio_harness import ProxyHandle, RawUas, start_proxy, udp_send
from e2m_lab.sipp import SippRunner, register

from e2m_plugins.testpki import TestPKI
from e2m_plugins.sip import SipMessage

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]

GOOD = b"good message after a hostile one"


@pytest.fixture(scope="module")
def strict(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyHandle, RawUas]]:
    """An E2M proxy that views and verifies every MESSAGE, with bob registered behind it."""
    proxy = start_proxy(tmp_path_factory.mktemp("strict"), pki=pki, e2m=True,
                        view=("MESSAGE:*",), verify=("MESSAGE:*",))
    bob = RawUas()
    try:
        runner = SippRunner(tmp_path_factory.mktemp("strict-sipp"))
        register(proxy, "bob", bob.port, runner)
        runner.close()
        yield proxy, bob
    finally:
        bob.close()
        proxy.stop()


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[TestPKI], SipMessage]
    code: int
    certificate: bool = False          # the answer carries our certificate (496)


CASES = [
    Case("garbage DER", h.garbage_der, 400),
    Case("truncated base64", h.truncated_base64, 400),
    Case("unknown content cipher", h.unknown_cipher, 415),
    Case("proxy not a recipient", h.not_a_recipient, 496, certificate=True),
    Case("bad GCM tag", h.bad_gcm_tag, 496, certificate=True),
    Case("tampered signature", h.tampered_signature, 403),
    Case("signer from a foreign CA", h.foreign_ca_signer, 403),
    Case("trusted stranger signs as the sender", h.stranger_signs_as_alice, 403),
    Case("unsigned where policy verifies", h.unsigned, 495),
    Case("body cut from another message", h.body_from_another_dialog, 403),
    Case("compressed-data", h.compressed_data, 415),
    Case("label names a missing part", h.label_names_missing_part, 400),
    Case("duplicate labels", h.duplicate_labels, 400),
    Case("label without host", h.label_without_host, 400),
    Case("multipart without boundary", h.multipart_without_boundary, 400),
    Case("unknown transfer encoding", h.unknown_transfer_encoding, 415),
    Case("content type without subtype", h.content_type_without_subtype, 400),
    Case("control character in a header", h.control_character_in_a_header, 400),
    Case("Max-Forwards 0", h.too_many_hops, 483),
]


def _good(pki: TestPKI) -> SipMessage:
    return h.protected(pki, GOOD)


def _serves(proxy: ProxyHandle, bob: RawUas, pki: TestPKI) -> None:
    """A normal, signed and encrypted MESSAGE is still viewed and delivered."""
    before = len(bob.received)
    good = _good(pki)
    answer = udp_send(proxy.port, good)
    assert answer is not None and answer.status == 200, answer
    got = bob.wait_for(before + 1, method="MESSAGE")[-1]
    assert got.body == good.body


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_request_gets_its_answer_and_the_proxy_keeps_serving(strict, pki, case):
    proxy, bob = strict
    archived = len(proxy.archive_rows())
    delivered = len(bob.received)
    answer = udp_send(proxy.port, case.build(pki))
    assert answer is not None, "no answer"
    assert answer.status == case.code, (answer.status, answer.reason, answer.get("Warning"))
    if case.certificate:
        assert answer.get("Content-Type") == "application/pkix-cert"
        assert answer.body == pki.proxy(TRUSTED).cert.public_bytes(Encoding.DER)
    assert len(bob.received) == delivered                  # refused means not forwarded
    assert len(proxy.archive_rows()) == archived           # ... and not archived
    _serves(proxy, bob, pki)


def test_garbage_datagrams_get_no_answer_and_do_not_stop_the_proxy(strict, pki):
    proxy, bob = strict
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for junk in (b"\x00" * 64, b"MESSAGE\r\n\r\n", bytes(range(256)), b"SIP/2.0 200\r\n\r\n"):
            sock.sendto(junk, ("127.0.0.1", proxy.port))
    finally:
        sock.close()
    _serves(proxy, bob, pki)


def test_no_body_text_in_the_log(strict, pki):
    proxy, bob = strict
    udp_send(proxy.port, h.tampered_signature(pki))
    udp_send(proxy.port, h.garbage_der(pki))
    _serves(proxy, bob, pki)
    log = proxy.log_since(0)
    assert "e2m:" in log                                     # the log is the right one
    for text in (SECRET, GOOD, b"pay 10", b"pay 99"):
        assert text.decode() not in log
