"""A sixty-fifth attacker's review (December 2026) of ef7ffd6: the phone's certificates
and what it learns, on a real ``e2m-phone`` (pjsua2).

Hole 1 of ``tests/unit/test_review65.py`` on the real phone: alice's outbound proxy is
a UDP socket of this test, the untrusted hop between alice and her certificate
service.  bob replaced his certificate (the old key leaked); alice follows his new one
through the service.  The hop (1) sends an empty NOTIFY at the current CSeq (review 26:
alice then holds nothing for bob and refuses to send, not sealing for the old key),
(2) sends alice a MESSAGE "from bob" signed with the *old* certificate and made more
than the replay window ago (a copy it kept, or one the key's thief made): alice's
phone refuses it (403, outside the accepted time window), but ``_check_signer`` has
already kept its signer's certificate as bob's.  alice's next MESSAGE to bob is sealed
for the old, compromised key.

Fixed (stop 31): a signer's certificate is kept only from a message accepted (after
the replay and context checks, ``UAEngine._learn_signer``), and checked as every
certificate from the wire is: not a CA, not issued before one held or given for that
peer (``_refuse_older``), and its issue time noted; the phone's certificate client
answers a bodiless ``pending`` NOTIFY 200 and changes nothing (the certificate comes
in the NOTIFY that follows).
"""

from __future__ import annotations

import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.phones import write_ua
from e2m_lab.pytest_fixtures import PhoneGroup
from e2m_plugins import sip
from e2m_plugins.config import UAConfig
from e2m_plugins.testpki import TestPKI, issue_user
from e2m_plugins.ua import UAEngine
from tests.pjsua.test_review4_phone import (  # noqa: F401 - fixtures: pki, group, hop
    Hop, group, hop, pki, sealed_for)

pytestmark = [pytest.mark.pjsua2]

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


def _message_or_none(hop: Hop, wait: float = 4.0) -> bytes | None:
    """alice's next MESSAGE body, or None when she sends none (refused for want of a
    certificate: the secure outcome)."""
    hop.sock.settimeout(wait)
    try:
        return hop.message()
    except (socket.timeout, TimeoutError):
        return None
    finally:
        hop.sock.settimeout(10)


def _follow_then_empty(pki: TestPKI, tmp_path: Path, group: PhoneGroup, hop: Hop):
    assert pki.directory is not None
    new = pki.user("bob").cert
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
        body = cert.public_bytes(Encoding.DER) if cert is not None else b""
        return sip.make_request(
            "NOTIFY", sip.parse_address(sub.get("Contact") or "").uri, from_uri=BOB,
            to_uri=ALICE, call_id=sub.call_id, from_tag=ok.to_tag, to_tag=sub.from_tag,
            cseq=cseq, via_host=f"127.0.0.1:{hop.port}",
            extra_headers=[("Event", "certificate"),
                           ("Subscription-State", "active;expires=3600")],
            body=body, content_type="application/pkix-cert" if body else None).serialize()

    assert hop.notify_answer(notify(new, 1), source) == 200
    assert sealed_for(hop.message(), new)                  # "one" went to bob's new key
    assert hop.notify_answer(notify(None, 1), source) == 200   # the hop's empty NOTIFY
    return alice, sub, source


def _old_signed_message(pki: TestPKI, old, contact: str, hop: Hop) -> bytes:
    """bob's old key signs a MESSAGE to alice, made 400 s ago (past the 300 s window)."""
    old_bob = UAEngine(UAConfig(aor=BOB, certificate=old.cert, private_key=old.key,
                                trust_anchors=(pki.ca.cert,),
                                peers={ALICE: pki.user("alice").cert}),
                       clock=lambda: time.time() - 400,
                       now=lambda: datetime.now(timezone.utc))
    plain = sip.make_request("MESSAGE", contact, from_uri=BOB, to_uri=ALICE,
                             via_host=f"127.0.0.1:{hop.port}", body=b"see you at noon",
                             content_type="text/plain")
    return old_bob.protect(plain).message.serialize()


def test_hole_a_refused_old_message_makes_the_phone_seal_for_bobs_old_key(
        tmp_path: Path, pki: TestPKI, group: PhoneGroup, hop: Hop) -> None:
    old = issue_user(pki.ca, BOB, "ec",
                     not_before=datetime.now(timezone.utc) - timedelta(days=10))
    alice, sub, source = _follow_then_empty(pki, tmp_path, group, hop)
    contact = sip.parse_address(sub.get("Contact") or "").uri
    hop.sock.sendto(_old_signed_message(pki, old, contact, hop), source)
    answer, _ = hop.next(lambda m: not m.is_request and m.cseq[1] == "MESSAGE")
    assert (answer.status or 0) >= 400                     # alice refused the message
    alice.send(f"message {BOB} three")
    body = _message_or_none(hop)
    assert body is None or not sealed_for(body, old.cert), \
        "alice sealed her MESSAGE for bob's old, replaced key"


def test_control_after_the_empty_notify_alone_alice_sends_nothing(
        tmp_path: Path, pki: TestPKI, group: PhoneGroup, hop: Hop) -> None:
    """Review 26's guarantee on the real phone: the empty NOTIFY alone leaves alice
    refusing to send to bob (no MESSAGE reaches the hop), never sealing for a key the
    hop chose."""
    _alice, _sub, _source = _follow_then_empty(pki, tmp_path, group, hop)
    _alice.send(f"message {BOB} three")
    assert _message_or_none(hop) is None
