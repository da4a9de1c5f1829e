"""Malformed and hostile requests sent to a real E2M proxy: each gets its defined answer
(from the one error table, or Kamailio's own for broken SIP), and the proxy keeps
serving normal traffic right after each one.  Nothing refused is archived, and no
body text reaches the Kamailio log.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.flows import TRUSTED, message
from e2m_lab.kamailio_harness import ProxyHandle, RawUas, start_proxy, udp_send
from e2m_lab.sipp import SippRunner, register

from e2m_plugins import mime
from e2m_plugins.body import protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.cms.signed import sign
from e2m_plugins.testpki import TestPKI, issue_user, make_ca
from e2m_plugins.sip import SipMessage

SECRET = b"hostile-case secret text 7f3a"
GOOD = b"good message after a hostile one"
CID = "p1@example.com"


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


# -- building blocks -----------------------------------------------------------------

def _envelope(pki: TestPKI, msg: SipMessage, recipients=("bob", TRUSTED), text=SECRET, *,
              signer="alice", cipher=None, bind=True) -> mime.MimePart:
    certs = [pki.proxy(r).cert if "." in r else pki.user(r).cert for r in recipients]
    cred = pki.user(signer) if isinstance(signer, str) else signer
    entity, _ = protect_content("text/plain", text, [recipient_for_certificate(c) for c in certs],
                                signer=(cred.cert, cred.key) if cred else None,
                                content_id=CID, cipher=cipher, bind_to=msg if bind else None)
    return entity


def _labelled(msg: SipMessage, entity: mime.MimePart, label: str | None = "auto") -> SipMessage:
    out = with_entity(msg, entity)
    if label == "auto":
        label = f'{TRUSTED};cid="{CID}"'
    return out.add("Proxy-Required-Body", label) if label else out


def _replace_body(entity: mime.MimePart, body: bytes) -> mime.MimePart:
    return mime.MimePart(entity.headers, body)


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _msg(pki: TestPKI, text: bytes = SECRET) -> SipMessage:
    return message(pki, text)


# -- the cases -------------------------------------------------------------------------

def garbage_der(pki):
    m = _msg(pki)
    return _labelled(m, _replace_body(_envelope(pki, m), b"\x30\x80\x02\x01\x05garbage"))


def truncated_base64(pki):
    m = _msg(pki)
    env = _envelope(pki, m)
    hs = [(n, v) for n, v in env.headers if n.lower() != "content-transfer-encoding"]
    b64 = base64.b64encode(env.body)[:-7]
    return _labelled(m, mime.MimePart((*hs, ("Content-Transfer-Encoding", "base64")), b64))


def unknown_cipher(pki):
    m = _msg(pki)
    env = _envelope(pki, m, cipher="aes-128-cbc", bind=False)
    cbc = bytes.fromhex("0609608648016503040102")          # aes128-CBC
    return _labelled(m, _replace_body(env, env.body.replace(cbc, cbc[:-1] + b"\x03")))  # -> OFB


def not_a_recipient(pki):
    m = _msg(pki)
    return _labelled(m, _envelope(pki, m, ("bob",)), label=None)


def bad_gcm_tag(pki):
    m = _msg(pki)
    env = _envelope(pki, m)
    return _labelled(m, _replace_body(env, _flip_last(env.body)))


def tampered_signature(pki):
    alice = pki.user("alice")
    entity = mime.inner_entity("text/plain", b"pay 10 " + SECRET)
    signed = mime.multipart_signed(entity, sign(entity, alice.cert, alice.key, detached=True))
    return _msg(pki).with_body(signed.body.replace(b"pay 10", b"pay 99"),
                               signed.header("Content-Type"))


def foreign_ca_signer(pki):
    stranger = issue_user(make_ca("Elsewhere CA"), pki.aor("alice"))
    m = _msg(pki)
    return _labelled(m, _envelope(pki, m, signer=stranger))


def stranger_signs_as_alice(pki):
    m = _msg(pki)
    return _labelled(m, _envelope(pki, m, signer=pki.user("carol")))


def unsigned(pki):
    m = _msg(pki)
    return _labelled(m, _envelope(pki, m, signer=None))


def body_from_another_message(pki):
    m = _msg(pki)
    other = _msg(pki)                                         # another Call-ID and tag
    return _labelled(m, _envelope(pki, other))


def compressed_data(pki):
    m = _msg(pki)
    env = _envelope(pki, m)
    hs = tuple((n, v.replace("authEnveloped-data", "compressed-data")) for n, v in env.headers)
    return _labelled(m, mime.MimePart(hs, env.body))


def label_names_missing_part(pki):
    m = _msg(pki)
    return _labelled(m, _envelope(pki, m), label=f'{TRUSTED};cid="nothere@example.com"')


def duplicate_labels(pki):
    m = _msg(pki)
    return _labelled(m, _envelope(pki, m)).add("Proxy-Required-Body", f'{TRUSTED};cid="{CID}"')


def label_without_host(pki):
    m = _msg(pki)
    return _labelled(m, _envelope(pki, m), label=f';cid="{CID}"')


def multipart_without_boundary(pki):
    return _msg(pki).with_body(b"--x\r\nContent-Type: text/plain\r\n\r\n" + SECRET + b"\r\n--x--\r\n",
                               "multipart/mixed")


def unknown_transfer_encoding(pki):
    m = _msg(pki)
    env = _envelope(pki, m)
    hs = [(n, v) for n, v in env.headers if n.lower() != "content-transfer-encoding"]
    return _labelled(m, mime.MimePart((*hs, ("Content-Transfer-Encoding", "x-rot13")), env.body))


def content_type_without_subtype(pki):
    return _msg(pki).with_body(SECRET, "text")


def control_character_in_a_header(pki):
    m = _msg(pki)
    return _labelled(m, _envelope(pki, m)).add("Subject", "x\x01y")


def too_many_hops(pki):
    m = _msg(pki)
    return _labelled(m, _envelope(pki, m)).replace("Max-Forwards", "0")


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[TestPKI], SipMessage]
    code: int
    certificate: bool = False          # the answer carries our certificate (496)


CASES = [
    Case("garbage DER", garbage_der, 400),
    Case("truncated base64", truncated_base64, 400),
    Case("unknown content cipher", unknown_cipher, 415),
    Case("proxy not a recipient", not_a_recipient, 496, certificate=True),
    Case("bad GCM tag", bad_gcm_tag, 496, certificate=True),
    Case("tampered signature", tampered_signature, 403),
    Case("signer from a foreign CA", foreign_ca_signer, 403),
    Case("trusted stranger signs as the sender", stranger_signs_as_alice, 403),
    Case("unsigned where policy verifies", unsigned, 495),
    Case("body cut from another message", body_from_another_message, 403),
    Case("compressed-data", compressed_data, 415),
    Case("label names a missing part", label_names_missing_part, 400),
    Case("duplicate labels", duplicate_labels, 400),
    Case("label without host", label_without_host, 400),
    Case("multipart without boundary", multipart_without_boundary, 400),
    Case("unknown transfer encoding", unknown_transfer_encoding, 415),
    Case("content type without subtype", content_type_without_subtype, 400),
    Case("control character in a header", control_character_in_a_header, 400),
    Case("Max-Forwards 0", too_many_hops, 483),
]


def _good(pki: TestPKI) -> SipMessage:
    m = _msg(pki, GOOD)
    return _labelled(m, _envelope(pki, m, text=GOOD))


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
    udp_send(proxy.port, tampered_signature(pki))
    udp_send(proxy.port, garbage_der(pki))
    _serves(proxy, bob, pki)
    log = proxy.log_since(0)
    assert "e2m:" in log                                     # the log is the right one
    for text in (SECRET, GOOD, b"pay 10", b"pay 99"):
        assert text.decode() not in log
