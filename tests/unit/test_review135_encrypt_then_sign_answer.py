"""Review 135, engine half of hole K1 (see ``tests/kamailio/test_review135_answer_walk_wire.py``
for the wire run and the full write-up).

An E2M callee's answer in RFC 3261 §23.2's order (encrypt-then-sign: a SignedData over
an ``enveloped-data`` entity), bound to the response by bob's signed SIP context and
sealed for alice alone (or for a proxy key the proxy lost), is opened by the E2M caller
``UAEngine`` alice to bob's SDP; the viewing proxy's ``response_refused`` is True for
it (``proxy._keyless_content`` counts the outer ``signed-data`` as readable without a
key), so Kamailio drops it in the core reply route.  The same content in the project's
own order (sign-then-encrypt, sealed whole) is not refused (controls).

Fixed (stop 43), K1: ``proxy._keyless_content`` looks through a signature: a
``signed-data`` is judged by the entity it carries (``cms.signed.signed_content``, read
and not verified), a ``multipart/signed`` by its first part, so an answer signed over
an envelope is sealed and is relayed with its error as documented.  On the code before,
the 3 hole tests failed; now they pass, and review 134's controls still drop a plain SDP
beside a stranger's envelope.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, UNTRUSTED, SipPath, answer, invite, \
    known_proxy, proxy_engine, ua_engine
from e2m_plugins import body as B
from e2m_plugins.cms import oids, seal
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.cms.signed import sign
from e2m_plugins.errors import ProxyCannotDecryptError
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)
_HEAD = (b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m"
         b"\r\nContent-Transfer-Encoding: binary\r\n\r\n")


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED, UNTRUSTED), users=("alice", "bob"))


def _setting(world):
    trusted = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    delivered = SipPath([proxy_engine(world, UNTRUSTED), trusted]).request(
        alice.protect(invite(world)).message).delivered
    return trusted, alice, bob, delivered


def _encrypt_then_sign(world, delivered, recipients):
    """bob's answer: his SDP sealed for ``recipients``, the envelope entity signed by
    bob with his SIP context bound to the 200 (what ``protect_content`` binds)."""
    plain = answer(delivered)
    envelope = seal(b"Content-Type: application/sdp\r\n\r\n" + SDP_ANSWER,
                    [recipient_for_certificate(c) for c in recipients]).der
    context = B.context_for(plain, time=time.time(), readers=(), content_id=None,
                            handling="required", cek_reference=None)
    extra = ((oids.SIP_CONTEXT, context.encode()),
             (oids.SIP_TO_TAG, B.encode_to_tag(plain.to_tag or "")))
    bob = world.user("bob")
    signed = sign(_HEAD + envelope, bob.cert, bob.key, extra_attributes=extra)
    reply = make_response(delivered, 200, "OK", [("Contact", "<sip:bob@127.0.0.1:5062>")],
                          body=signed,
                          content_type="application/pkcs7-mime; smime-type=signed-data")
    return reply.replace("To", plain.get("To"))


def test_control_the_e2m_caller_opens_the_encrypt_then_sign_answer(world):
    _, alice, _, delivered = _setting(world)
    reply = _encrypt_then_sign(world, delivered, [world.user("alice").cert])
    opened = alice.open(reply).message
    assert opened.body == SDP_ANSWER and opened.get("Content-Type") == "application/sdp"


def test_encrypt_then_sign_answer_for_the_caller_alone_is_not_refused(world):
    trusted, _, _, delivered = _setting(world)
    reading = trusted.read_response(
        _encrypt_then_sign(world, delivered, [world.user("alice").cert]))
    assert isinstance(reading.error, ProxyCannotDecryptError)
    assert not trusted.response_refused(reading)


def test_encrypt_then_sign_answer_when_the_proxy_lost_its_key_is_not_refused(world):
    """Sealed for alice and for the proxy's certificate; the proxy now reads with
    another key (restarted on a new certificate)."""
    _, _, _, delivered = _setting(world)
    reply = _encrypt_then_sign(world, delivered,
                               [world.user("alice").cert, world.proxy(TRUSTED).cert])
    other = proxy_engine(world, UNTRUSTED, view=SDP_VIEW)     # a key that opens nothing
    reading = other.read_response(reply)
    assert reading.error is not None
    assert not other.response_refused(reading)


def test_control_the_proxy_reads_encrypt_then_sign_sealed_for_it(world):
    """With its key, the proxy opens the same encrypt-then-sign answer: no error."""
    trusted, _, _, delivered = _setting(world)
    reading = trusted.read_response(_encrypt_then_sign(
        world, delivered, [world.user("alice").cert, world.proxy(TRUSTED).cert]))
    assert reading.error is None and [s.plaintext for s in reading.seen] == [SDP_ANSWER]


def test_control_sign_then_encrypt_for_the_caller_alone_is_not_refused(world):
    trusted, _, bob, _ = _setting(world)
    plain_alice = ua_engine(world, "alice")                   # knows no proxy
    offer = bob.open(plain_alice.protect(invite(world, call_id="r135@x")).message).message
    reading = trusted.read_response(bob.protect(answer(offer)).message)
    assert isinstance(reading.error, ProxyCannotDecryptError)
    assert not trusted.response_refused(reading)
