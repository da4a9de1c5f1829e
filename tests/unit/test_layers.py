"""Nested layers: sign-then-encrypt and encrypt-then-sign, at CMS and MIME level."""

from __future__ import annotations

import base64

import pytest

from e2m_plugins.cms import CertificateKey, KeyTransRecipient, Limits, SharedKEK, open_envelope, seal
from e2m_plugins.layers import open_message
from e2m_plugins.cms.signed import sign
from e2m_plugins.errors import (
    LimitExceededError,
    MalformedError,
    NoMatchingRecipientError,
    SignatureInvalidError,
    UntrustedSignerError,
)

TEXT = b"Content-Type: text/plain\r\n\r\nsee you at noon"
KEK = SharedKEK(b"k1", bytes(range(16)))


def _entity(der: bytes, smime_type: str, binary: bool = True) -> bytes:
    head = (f"Content-Type: application/pkcs7-mime; smime-type={smime_type}; name=smime.p7m\r\n"
            "Content-Disposition: attachment; handling=required; filename=smime.p7m\r\n")
    if binary:
        return head.encode() + b"Content-Transfer-Encoding: binary\r\n\r\n" + der
    return head.encode() + b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(der)


def test_sign_then_encrypt_cms_level(pki):
    alice, bob = pki.user("alice", "ec"), pki.user("bob")
    signed = sign(TEXT, alice.cert, alice.key)
    sealed = seal(signed, [KeyTransRecipient(bob.cert)], content_type="1.2.840.113549.1.7.2")
    opened = open_message(sealed.der, keys=[CertificateKey(bob.cert, bob.key)], trust_anchors=[pki.ca.cert])
    assert opened.content == TEXT
    assert opened.order == "sign-then-encrypt"
    assert opened.signatures[0].signers[0].identities.uris == (pki.aor("alice"),)
    assert opened.envelopes[0].content_type == "signed-data"


@pytest.mark.parametrize("binary", [True, False])
def test_sign_then_encrypt_mime_level(pki, binary):
    alice, bob = pki.user("alice"), pki.user("bob")
    inner = _entity(sign(TEXT, alice.cert, alice.key), "signed-data", binary)
    sealed = seal(inner, [KeyTransRecipient(bob.cert)])
    opened = open_message(_entity(sealed.der, "authEnveloped-data"),
                          keys=[CertificateKey(bob.cert, bob.key)], trust_anchors=[pki.ca.cert])
    assert opened.content == TEXT and opened.order == "sign-then-encrypt"


def test_encrypt_then_sign(pki):
    """RFC 3261 §23.2 order: the envelope is the signed content."""
    alice, bob = pki.user("alice"), pki.user("bob")
    sealed = seal(TEXT, [KeyTransRecipient(bob.cert)], cipher="aes-128-cbc")
    signed = sign(_entity(sealed.der, "enveloped-data"), alice.cert, alice.key)
    opened = open_message(signed, keys=[CertificateKey(bob.cert, bob.key)], trust_anchors=[pki.ca.cert],
                          limits=Limits(accept_cbc=True))  # CBC only when accepted
    assert opened.content == TEXT and opened.order == "encrypt-then-sign"


def test_detached_multipart_signed_inside_envelope(pki):
    alice = pki.user("alice")
    signature = sign(TEXT, alice.cert, alice.key, detached=True)
    boundary = "b1"
    multipart = (f"Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; "
                 f"micalg=sha-256; boundary={boundary}\r\n\r\n").encode() + (
        f"--{boundary}\r\n").encode() + TEXT + (f"\r\n--{boundary}\r\n"
        "Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
        "Content-Transfer-Encoding: binary\r\n\r\n").encode() + signature + f"\r\n--{boundary}--\r\n".encode()
    sealed = seal(multipart, [KEK])
    opened = open_message(sealed.der, keys=[KEK], trust_anchors=[pki.ca.cert])
    assert opened.content == TEXT and opened.order == "sign-then-encrypt"


def test_plain_inner_entity_is_final(pki):
    sealed = seal(TEXT, [KEK])
    opened = open_message(sealed.der, keys=[KEK])
    assert opened.layers and opened.order == "encrypted" and opened.content == TEXT


def test_inner_signature_failures_propagate(pki):
    alice, bob = pki.user("alice"), pki.user("bob")
    signed = bytearray(sign(TEXT, alice.cert, alice.key))
    signed[signed.find(b"noon")] ^= 0x20
    sealed = seal(bytes(signed), [KEK], content_type="1.2.840.113549.1.7.2")
    with pytest.raises(SignatureInvalidError):
        open_message(sealed.der, keys=[KEK], trust_anchors=[pki.ca.cert])
    good = seal(sign(TEXT, alice.cert, alice.key), [KEK], content_type="1.2.840.113549.1.7.2")
    with pytest.raises(UntrustedSignerError):
        open_message(good.der, keys=[KEK], trust_anchors=[bob.cert])
    with pytest.raises(NoMatchingRecipientError):
        open_message(good.der, keys=[], trust_anchors=[pki.ca.cert])


def test_nesting_depth_is_bounded():
    layer = TEXT
    for _ in range(6):
        layer = _entity(seal(layer, [KEK]).der, "enveloped-data")
    with pytest.raises(LimitExceededError):
        open_message(layer, keys=[KEK], limits=Limits(max_nesting_depth=4))
    assert open_message(layer, keys=[KEK], limits=Limits(max_nesting_depth=8)).content == TEXT


def test_entity_claiming_cms_with_garbage_is_malformed():
    inner = b"Content-Type: application/pkcs7-mime; smime-type=signed-data\r\n\r\nnot cms at all"
    with pytest.raises(MalformedError):
        open_message(seal(inner, [KEK]).der, keys=[KEK])
    assert open_envelope(seal(inner, [KEK]).der, [KEK]).plaintext == inner


def test_reprs_of_opened_things_never_show_plaintext(pki):
    """Whatever a caller logs with %r, the plaintext stays out of it."""
    from e2m_plugins import mime
    from e2m_plugins.cms.signed import verify
    from e2m_plugins.cmsinput import load_cms_message

    alice = pki.user("alice")
    secret = b"Content-Type: text/plain\r\n\r\nthe vault code is 4711"
    signed = sign(secret, alice.cert, alice.key)
    detached = mime.encode_part(mime.multipart_signed(secret, sign(secret, alice.cert, alice.key, detached=True)))
    opened = open_message(seal(signed, [KEK], content_type="1.2.840.113549.1.7.2").der,
                          keys=[KEK], trust_anchors=[pki.ca.cert])
    things = [opened, *opened.layers, verify(signed, trust_anchors=[pki.ca.cert]),
              load_cms_message(detached), mime.parse_entity(secret)]
    for thing in things:
        assert "4711" not in repr(thing), type(thing).__name__
