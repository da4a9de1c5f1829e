"""SignedData: our own round trips, tampering, trust, time, limits, inputs."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest
from asn1crypto import cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2m_plugins.cmsinput import load_cms_input, load_cms_message, verify_input
from e2m_plugins.cms.limits import Limits
from e2m_plugins.cms.signed import extract_certificates, sign, verify
from e2m_plugins.errors import (
    E2MError,
    LimitExceededError,
    MalformedError,
    SignatureInvalidError,
    UnsupportedAlgorithmError,
    UntrustedSignerError,
)
from e2m_plugins.testpki import Credential, issue_user, make_ca

CONTENT = b"v=0\r\no=alice 1 1 IN IP4 192.0.2.1\r\ns=-\r\n"
NOW = datetime.now(timezone.utc).replace(microsecond=0)

# (user, key type, rsa_pss, expected signatureAlgorithm name, expected digest)
SIGNERS = [
    ("alice", "rsa", False, "sha256-rsa", "sha256"),
    ("alice", "rsa", True, "rsassa-pss", "sha256"),
    ("alice", "ec", False, "sha256-ecdsa", "sha256"),
    ("carol", "ed25519", False, "ed25519", "sha512"),  # RFC 8419: SHA-512
]


def _cred(pki, user, key_type):
    return pki.user(user, key_type)


def _rebuild(der: bytes, change) -> bytes:
    """Parse, let ``change`` edit the SignedData, and re-encode."""
    info = cms.ContentInfo.load(der)
    change(info["content"])
    return info.dump(force=True)


# -- round trips -----------------------------------------------------------------

@pytest.mark.parametrize("detached", [False, True], ids=["attached", "detached"])
@pytest.mark.parametrize("user,key_type,pss,sig_name,digest", SIGNERS,
                         ids=["rsa", "rsa-pss", "ecdsa", "ed25519"])
def test_round_trip(pki, user, key_type, pss, sig_name, digest, detached) -> None:
    cred = _cred(pki, user, key_type)
    der = sign(CONTENT, cred.cert, cred.key, rsa_pss=pss, detached=detached, signing_time=NOW)
    assert (CONTENT in der) is not detached
    result = verify(der, trust_anchors=[pki.ca.cert],
                    detached_content=CONTENT if detached else None)
    assert result.content == CONTENT
    assert result.content_type == "data"
    [signer] = result.signers
    assert signer.certificate == cred.cert
    assert signer.identities.uris == (f"sip:{user}@example.com",)
    assert signer.signature_algorithm == sig_name
    assert signer.digest_algorithm == digest
    assert signer.signing_time == NOW
    assert signer.chain == (cred.cert, pki.ca.cert)
    assert result.certificates == (cred.cert,)


@pytest.mark.parametrize("digest", ["sha384", "sha512"])
@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_other_digests(pki, key_type, digest) -> None:
    cred = pki.user("bob", key_type)
    der = sign(CONTENT, cred.cert, cred.key, digest=digest)
    [signer] = verify(der, trust_anchors=[pki.ca.cert]).signers
    assert signer.digest_algorithm == digest
    assert signer.signature_algorithm.startswith(digest)


def test_pss_with_sha512(pki) -> None:
    cred = pki.user("alice")
    der = sign(CONTENT, cred.cert, cred.key, rsa_pss=True, digest="sha512")
    assert verify(der, trust_anchors=[pki.ca.cert]).signers[0].signature_algorithm == "rsassa-pss"


def test_default_signing_time_is_now(pki) -> None:
    cred = pki.user("alice", "ec")
    [signer] = verify(sign(CONTENT, cred.cert, cred.key), trust_anchors=[pki.ca.cert]).signers
    assert abs(signer.signing_time - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_far_signing_time_uses_generalized_time(pki) -> None:
    cred = pki.user("alice", "ec")
    when = datetime(2051, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    der = sign(CONTENT, cred.cert, cred.key, signing_time=when)
    assert verify(der, trust_anchors=[pki.ca.cert]).signers[0].signing_time == when


def test_other_content_type(pki) -> None:
    cred = pki.user("alice", "ec")
    der = sign(b"\x30\x00", cred.cert, cred.key, content_type="enveloped-data")
    assert cms.ContentInfo.load(der)["content"]["version"].native == "v3"
    assert verify(der, trust_anchors=[pki.ca.cert]).content_type == "enveloped-data"
    der = sign(b"x", cred.cert, cred.key, content_type="1.2.3.4")
    assert verify(der, trust_anchors=[pki.ca.cert]).content_type == "1.2.3.4"


def test_without_included_certificate(pki) -> None:
    cred = pki.user("bob", "ec")
    der = sign(CONTENT, cred.cert, cred.key, include_certificate=False)
    assert cms.ContentInfo.load(der)["content"]["certificates"].native is None
    result = verify(der, trust_anchors=[pki.ca.cert], extra_certs=[cred.cert])
    assert result.signers[0].certificate == cred.cert
    with pytest.raises(UntrustedSignerError, match="not found"):
        verify(der, trust_anchors=[pki.ca.cert])


def test_signer_found_by_subject_key_identifier(pki) -> None:
    # The sid is not covered by the signature, so it can be swapped for the SKI.
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key)
    ski = cred.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    def to_ski(sd):
        sd["signer_infos"][0]["sid"] = cms.SignerIdentifier({"subject_key_identifier": ski})
    assert verify(_rebuild(der, to_ski), trust_anchors=[pki.ca.cert]).content == CONTENT


def test_intermediates_from_message(pki) -> None:
    # A leaf under an intermediate CA; the intermediate travels in the message.
    key = ec.generate_private_key(ec.SECP256R1())
    inter_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Inter")]))
        .issuer_name(pki.ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=1)).not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(pki.ca.key, hashes.SHA256()))
    leaf = issue_user(Credential(inter_cert, key), "sip:ivy@example.com", "ec")
    der = sign(CONTENT, leaf.cert, leaf.key, extra_certs=[inter_cert])
    [signer] = verify(der, trust_anchors=[pki.ca.cert]).signers
    assert signer.chain == (leaf.cert, inter_cert, pki.ca.cert)
    bare = sign(CONTENT, leaf.cert, leaf.key)
    with pytest.raises(UntrustedSignerError):
        verify(bare, trust_anchors=[pki.ca.cert])
    verify(bare, trust_anchors=[pki.ca.cert], extra_certs=[inter_cert])


# -- tampering -------------------------------------------------------------------

@pytest.mark.parametrize("user,key_type,pss,sig_name,digest", SIGNERS,
                         ids=["rsa", "rsa-pss", "ecdsa", "ed25519"])
def test_tampered_content(pki, user, key_type, pss, sig_name, digest) -> None:
    cred = _cred(pki, user, key_type)
    der = sign(CONTENT, cred.cert, cred.key, rsa_pss=pss)
    bad = der.replace(b"alice 1 1", b"alice 1 2")
    assert bad != der
    with pytest.raises(SignatureInvalidError, match="digest"):
        verify(bad, trust_anchors=[pki.ca.cert])
    detached = sign(CONTENT, cred.cert, cred.key, rsa_pss=pss, detached=True)
    with pytest.raises(SignatureInvalidError):
        verify(detached, trust_anchors=[pki.ca.cert], detached_content=CONTENT + b" ")


@pytest.mark.parametrize("user,key_type,pss,sig_name,digest", SIGNERS,
                         ids=["rsa", "rsa-pss", "ecdsa", "ed25519"])
def test_tampered_signature(pki, user, key_type, pss, sig_name, digest) -> None:
    cred = _cred(pki, user, key_type)
    der = bytearray(sign(CONTENT, cred.cert, cred.key, rsa_pss=pss))
    der[-1] ^= 0x01  # the signature value is the last field of the message
    with pytest.raises(SignatureInvalidError):
        verify(bytes(der), trust_anchors=[pki.ca.cert])


def test_tampered_signed_attribute(pki) -> None:
    cred = pki.user("alice")
    der = sign(CONTENT, cred.cert, cred.key, signing_time=NOW)

    def later(sd):
        attrs = sd["signer_infos"][0]["signed_attrs"]
        for attr in attrs:
            if attr["type"].native == "signing_time":
                attr["values"] = [cms.Time({"utc_time": NOW + timedelta(hours=1)})]
    with pytest.raises(SignatureInvalidError):
        verify(_rebuild(der, later), trust_anchors=[pki.ca.cert])


def test_content_type_attribute_must_match(pki) -> None:
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key)

    def retype(sd):
        sd["encap_content_info"]["content_type"] = "1.2.3.4"
    with pytest.raises(SignatureInvalidError, match="content-type"):
        verify(_rebuild(der, retype), trust_anchors=[pki.ca.cert])


def test_detached_content_disagreeing_with_embedded(pki) -> None:
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key)
    assert verify(der, trust_anchors=[pki.ca.cert], detached_content=CONTENT).content == CONTENT
    with pytest.raises(SignatureInvalidError):
        verify(der, trust_anchors=[pki.ca.cert], detached_content=b"other")


def test_detached_without_content(pki) -> None:
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key, detached=True)
    with pytest.raises(MalformedError, match="detached"):
        verify(der, trust_anchors=[pki.ca.cert])


def test_signature_algorithm_not_fitting_key(pki) -> None:
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key)

    def claim_rsa(sd):
        sd["signer_infos"][0]["signature_algorithm"] = {"algorithm": "sha256_rsa"}
    with pytest.raises(SignatureInvalidError, match="fit"):
        verify(_rebuild(der, claim_rsa), trust_anchors=[pki.ca.cert])


def test_unsupported_algorithms(pki) -> None:
    cred = pki.user("alice")
    der = sign(CONTENT, cred.cert, cred.key)

    def md5(sd):
        sd["signer_infos"][0]["digest_algorithm"] = {"algorithm": "md5"}

    def odd_sig(sd):
        sd["signer_infos"][0]["signature_algorithm"] = {"algorithm": "1.2.3.4.5"}
    for change in (md5, odd_sig):
        with pytest.raises(UnsupportedAlgorithmError):
            verify(_rebuild(der, change), trust_anchors=[pki.ca.cert])


# -- trust and time ----------------------------------------------------------------

def test_wrong_anchor(pki) -> None:
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key)
    with pytest.raises(UntrustedSignerError):
        verify(der, trust_anchors=[make_ca("Somebody else").cert])
    with pytest.raises(UntrustedSignerError):
        verify(der, trust_anchors=[])


def test_expired_signer(pki) -> None:
    old = issue_user(pki.ca, "sip:old@example.com", "ec",
                     not_before=NOW - timedelta(days=3), not_after=NOW - timedelta(minutes=1))
    der = sign(CONTENT, old.cert, old.key)
    with pytest.raises(UntrustedSignerError, match="expired"):
        verify(der, trust_anchors=[pki.ca.cert])
    assert verify(der, trust_anchors=[pki.ca.cert], check_time=False).content == CONTENT


def test_injectable_clock(pki) -> None:
    future = issue_user(pki.ca, "sip:future@example.com", "ec",
                        not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=5))
    der = sign(CONTENT, future.cert, future.key)
    with pytest.raises(UntrustedSignerError, match="not yet valid"):
        verify(der, trust_anchors=[pki.ca.cert])
    assert verify(der, trust_anchors=[pki.ca.cert], at=NOW + timedelta(days=2)).content == CONTENT
    with pytest.raises(UntrustedSignerError, match="expired"):
        verify(der, trust_anchors=[pki.ca.cert], at=NOW + timedelta(days=6))


# -- limits and malformed input -----------------------------------------------------

def test_limits(pki) -> None:
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key)
    anchors = [pki.ca.cert]
    for limits in (Limits(max_body_bytes=len(der) - 1), Limits(max_certificates=0),
                   Limits(max_signers=0), Limits(max_attributes=2)):
        with pytest.raises(LimitExceededError):
            verify(der, trust_anchors=anchors, limits=limits)
    verify(der, trust_anchors=anchors, limits=Limits(max_body_bytes=len(der), max_signers=1,
                                                     max_certificates=1, max_attributes=3))


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"hello", b"\x30\x80", b"\x30\x03\x02\x01\x01"])
def test_garbage_is_malformed(pki, garbage) -> None:
    with pytest.raises(MalformedError):
        verify(garbage, trust_anchors=[pki.ca.cert])


def test_not_signed_data_and_trailing_bytes(pki) -> None:
    data_info = cms.ContentInfo({"content_type": "data", "content": b"x"}).dump()
    with pytest.raises(MalformedError, match="not SignedData"):
        verify(data_info, trust_anchors=[pki.ca.cert])
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key)
    with pytest.raises(MalformedError):
        verify(der + b"\x00", trust_anchors=[pki.ca.cert])
    with pytest.raises(MalformedError):
        verify(der[:-5], trust_anchors=[pki.ca.cert])


def test_no_signers(pki) -> None:
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key)

    def drop(sd):
        sd["signer_infos"] = []
    certs_only = _rebuild(der, drop)
    with pytest.raises(SignatureInvalidError, match="no signature"):
        verify(certs_only, trust_anchors=[pki.ca.cert])
    assert extract_certificates(certs_only) == [cred.cert]


def test_sign_refuses_bad_arguments(pki) -> None:
    alice, bob = pki.user("alice", "ec"), pki.user("bob", "ec")
    with pytest.raises(ValueError):
        sign(CONTENT, alice.cert, bob.key)
    dana = pki.user("dana", "x25519")
    with pytest.raises(ValueError):
        sign(CONTENT, dana.cert, dana.key)
    with pytest.raises(ValueError):
        sign(CONTENT, alice.cert, alice.key, rsa_pss=True)
    with pytest.raises(ValueError):
        sign(CONTENT, alice.cert, alice.key, digest="md5")
    with pytest.raises(ValueError):
        sign(CONTENT, alice.cert, alice.key, content_type="nonsense")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255),
       cut=st.booleans())
def test_mutations_only_raise_typed_errors(pki, position, value, cut) -> None:
    cred = pki.user("alice", "ec")
    der = _mutation_base(pki)
    position %= len(der)
    mutated = der[:position] if cut else der[:position] + bytes([value]) + der[position + 1:]
    try:
        result = verify(mutated, trust_anchors=[pki.ca.cert])
    except E2MError:
        return
    # Some bytes (e.g. in the unsigned sid or the signing time's unused
    # encoding) can change without breaking anything; the content must not.
    assert result.content == CONTENT
    assert result.signers[0].certificate == cred.cert


def test_a_name_attribute_turned_into_a_bit_string_is_a_typed_error(pki) -> None:
    """Any byte of a signed body set to 0x03 (the BIT STRING tag): a certificate name
    attribute whose value becomes a BIT STRING made cryptography raise TypeError while
    reading the subject, out of ``verify`` (hypothesis found it in the test above)."""
    der = _mutation_base(pki)
    for position in range(len(der)):
        mutated = der[:position] + b"\x03" + der[position + 1:]
        try:
            verify(mutated, trust_anchors=[pki.ca.cert])
        except E2MError:
            pass


_BASE: dict[str, bytes] = {}


def _mutation_base(pki) -> bytes:
    if "der" not in _BASE:
        cred = pki.user("alice", "ec")
        _BASE["der"] = sign(CONTENT, cred.cert, cred.key)
    return _BASE["der"]


# -- inputs ------------------------------------------------------------------------------

def test_inputs_der_pem_base64(pki) -> None:
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key)
    b64 = base64.encodebytes(der)
    assert load_cms_input(der) == der
    assert load_cms_input(b"-----BEGIN PKCS7-----\n" + b64 + b"-----END PKCS7-----\n") == der
    assert load_cms_input(b"\n-----BEGIN CMS-----\r\n" + b64 + b"-----END CMS-----") == der
    assert load_cms_input(b64) == der
    with pytest.raises(MalformedError):
        load_cms_input(b"-----BEGIN CERTIFICATE-----\n" + b64 + b"-----END CERTIFICATE-----\n")
    with pytest.raises(MalformedError):
        load_cms_input(b"-----BEGIN PKCS7-----\n!!!\n-----END PKCS7-----\n")
    with pytest.raises(LimitExceededError):
        load_cms_input(der, limits=Limits(max_body_bytes=10))


def test_inputs_mime_entities(pki) -> None:
    cred = pki.user("alice", "ec")
    der = sign(CONTENT, cred.cert, cred.key)
    b64 = base64.encodebytes(der)
    entity = (b"Content-Type: application/pkcs7-mime;\r\n smime-type=signed-data;"
              b" name=smime.p7m\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64)
    message = load_cms_message(entity)
    assert message.der == der and message.smime_type == "signed-data"
    assert message.mime_type == "application/pkcs7-mime"
    binary = (b"Content-Type: application/pkcs7-mime; smime-type=signed-data\r\n"
              b"Content-Transfer-Encoding: binary\r\n\r\n" + der)
    assert load_cms_input(binary) == der
    with pytest.raises(MalformedError):
        load_cms_input(b"Content-Type: text/plain\r\n\r\nhello")
    with pytest.raises(MalformedError):
        load_cms_input(b"Content-Type: application/pkcs7-mime\r\n")


def test_inputs_multipart_signed(pki) -> None:
    cred = pki.user("alice", "ec")
    part = b"Content-Type: application/sdp\r\n\r\n" + CONTENT.rstrip(b"\r\n")
    der = sign(part, cred.cert, cred.key, detached=True)
    # LF line ends on purpose: the signed part is canonicalised to CRLF again.
    entity = (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\n'
              b' micalg=sha-256; boundary="b1"\n\n'
              b"preamble\n--b1\n" + part.replace(b"\r\n", b"\n") + b"\n--b1\n"
              b"Content-Type: application/pkcs7-signature; name=smime.p7s\n"
              b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(der) +
              b"\n--b1--\nepilogue\n")
    message = load_cms_message(entity)
    assert message.der == der
    assert message.detached_content == part.replace(b"\r\n", b"\n")  # as on the wire
    with pytest.raises(SignatureInvalidError):
        verify(message.der, trust_anchors=[pki.ca.cert], detached_content=message.detached_content)
    result = verify_input(message, trust_anchors=[pki.ca.cert])  # retries the CRLF form
    assert result.content == part
    with pytest.raises(MalformedError):
        load_cms_message(entity.replace(b"--b1--", b"--b2--"))


def test_inputs_multipart_signed_binary_signature(pki) -> None:
    # A binary signature part: the CRLF before the closing delimiter is not DER.
    cred = pki.user("alice", "ec")
    part = b"Content-Type: text/plain\r\n\r\nhi"
    der = sign(part, cred.cert, cred.key, detached=True)
    entity = (b"Content-Type: multipart/signed; boundary=xyz; "
              b"protocol=\"application/pkcs7-signature\"\r\n\r\n--xyz\r\n" + part +
              b"\r\n--xyz\r\nContent-Type: application/pkcs7-signature\r\n"
              b"Content-Transfer-Encoding: binary\r\n\r\n" + der + b"\r\n--xyz--\r\n")
    message = load_cms_message(entity)
    assert message.der == der and message.detached_content == part


# -- describe ----------------------------------------------------------------------------

def test_describe_signed_reports_structure_not_content(pki) -> None:
    from e2m_plugins.cms import KeyTransRecipient, seal
    from e2m_plugins.cms.signed import describe_signed

    cred = pki.user("alice", "ec")
    described = describe_signed(sign(CONTENT, cred.cert, cred.key))
    assert described.content_type == "data" and not described.detached
    assert described.content_bytes == len(CONTENT) and described.nested_cms is None
    assert described.certificates == (cred.cert,)
    [signer] = described.signers
    assert signer.digest_algorithm == "sha256" and signer.signature_algorithm == "sha256-ecdsa"
    attributes = dict(signer.signed_attributes)
    assert attributes["content-type"] == "data" and "signing-time" in attributes
    assert CONTENT.hex() not in repr(described)
    detached = describe_signed(sign(CONTENT, cred.cert, cred.key, detached=True, include_certificate=False))
    assert detached.detached and detached.content_bytes is None and detached.certificates == ()
    envelope = seal(CONTENT, [KeyTransRecipient(pki.user("bob").cert)]).der
    outer = describe_signed(sign(envelope, cred.cert, cred.key, content_type="auth-enveloped-data"))
    assert outer.content_type == "auth-enveloped-data" and outer.nested_cms == envelope
    with pytest.raises(MalformedError):
        describe_signed(envelope)


# -- work per message: counted before it is done ----------------------------------

def _to_ber(encoded: bytes, keep_der: tuple[int, ...] = (0xA0,)) -> bytes:
    """Re-encode every constructed element with indefinite lengths, as a streaming
    encoder (openssl cms -stream) does; ``keep_der`` tags stay as they are (the signed
    attributes, which the signature covers in DER)."""
    from e2m_plugins.cms import der

    def walk(tlv) -> bytes:
        if not tlv.constructed or tlv.tag in keep_der or tlv.tag == 0x30 and tlv.depth > 3:
            return tlv.encoded
        return bytes([tlv.tag, 0x80]) + b"".join(walk(k) for k in der.items(tlv)) + b"\0\0"
    return walk(der.read_all(encoded))


def test_a_streamed_ber_signed_data_verifies(pki) -> None:
    cred = pki.user("alice", "ec")
    ber = _to_ber(sign(CONTENT, cred.cert, cred.key))
    assert b"\x30\x80" in ber
    assert verify(ber, trust_anchors=[pki.ca.cert]).content == CONTENT


def test_an_issuer_name_whose_length_ends_in_0x80_is_matched_as_received(pki) -> None:
    """asn1crypto re-encodes a structure whose length octets end in 0x80 whenever its
    bytes are asked for; the issuer is now compared as received."""
    from cryptography.x509.oid import NameOID
    for pad in range(1, 64):
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o" * 50),
                             x509.NameAttribute(NameOID.COMMON_NAME, "c" * pad)])
        if subject.public_bytes()[1:3] == b"\x81\x80":
            break
    else:
        raise AssertionError("no name of 128 octets")
    ca = make_ca("unused", subject=subject)
    cred = issue_user(ca, "sip:alice@example.com", "ec")
    result = verify(sign(CONTENT, cred.cert, cred.key), trust_anchors=[ca.cert])
    assert result.signers[0].certificate == cred.cert


def test_signed_attribute_values_are_counted_before_they_are_read(pki) -> None:
    cred = pki.user("alice", "ec")

    def many_values(sd) -> None:
        attrs = sd["signer_infos"][0]["signed_attrs"]
        attrs.append(cms.CMSAttribute({"type": "1.2.3.4",
                                       "values": [core.Null() for _ in range(5000)]}))
    with pytest.raises(LimitExceededError):
        verify(_rebuild(sign(CONTENT, cred.cert, cred.key), many_values),
               trust_anchors=[pki.ca.cert])
    with pytest.raises(LimitExceededError):   # and every body's elements are counted
        verify(sign(CONTENT, cred.cert, cred.key), trust_anchors=[pki.ca.cert],
               limits=Limits(max_der_elements=10))


@pytest.mark.parametrize("content_type", ["enveloped-data", "auth-enveloped-data", "1.2.3.4"])
def test_non_data_content_is_signed_as_opaque_bytes_at_every_length(pki, content_type) -> None:
    """asn1crypto takes any DER header ending in 0x80 (e.g. a length of 0x280) for
    an indefinite length and re-encodes the whole tree, eContent included: it then
    parsed the eContent by its content type and failed or changed the signed bytes.
    Lengths sweep past two such boundaries, with content that is not DER."""
    cred = pki.user("alice", "ec")
    for size in range(300, 620):
        content = bytes([0x30, 0x82]) + bytes(size)        # claims a SEQUENCE, is not one
        der = sign(content, cred.cert, cred.key, content_type=content_type)
        got = verify(der, trust_anchors=[pki.ca.cert])
        assert (got.content, got.content_type) == (content, content_type)
