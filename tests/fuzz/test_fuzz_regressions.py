"""Bugs the fuzzing found in the core parsers, each with its minimal reproducer.

Each test states the behaviour we want.  A bug found and not yet fixed is a
strict xfail here plus an entry of ``fuzzkit.KNOWN_BUGS`` (which lets the
fuzzers step over it); when the fix lands both go and the test stays as a
regression test.  The six below are fixed.
"""

from __future__ import annotations

import pytest
from e2m_lab import flows
from e2m_plugins import sip
from e2m_plugins.cms import der, oids
from e2m_plugins.cms.envelope import content_info_type, open_envelope
from e2m_plugins.cms.signed import verify
from e2m_plugins.errors import E2MError, MalformedError
from e2m_plugins.proxy import Verdict
from e2m_plugins.layers import open_message


def _message_with_disposition_octet(kit) -> bytes:
    """A valid protected MESSAGE whose Content-Disposition carries one 0xFF octet."""
    wire = kit.proxy_messages[0]
    head = b"Content-Disposition: attachment"
    assert head in wire
    return wire.replace(head, head + b";x=\xff", 1)


# -- 1. a non-UTF-8 octet in a Content-* header -----------------------------------

SURROGATE = "sip.parse keeps header octets with surrogateescape; body.kekri_references re-encodes " \
            "the part with mime.encode_part, whose str.encode() raises UnicodeEncodeError"


def test_proxy_inspect_survives_a_non_utf8_content_header(kit):
    msg = sip.parse(_message_with_disposition_octet(kit))
    verdict = kit.proxy.inspect(msg)   # must never raise
    assert isinstance(verdict, Verdict)


def test_ua_open_takes_a_non_utf8_content_header_or_refuses_it_typed(kit):
    """The unknown parameter's value is not ours to judge: opening may succeed
    (it does: the CMS is read from the body) or fail with a typed error, never
    with anything else."""
    msg = sip.parse(_message_with_disposition_octet(kit))
    try:
        opened = kit.bob.open(msg)
    except E2MError:
        return
    assert opened.info.encrypted


# -- 2. an OBJECT IDENTIFIER arc too large to print -------------------------------

HUGE_OID = "der.oid turns each arc into decimal with str(); an arc of ~14,300 bits passes " \
           "Python's 4300-digit limit and raises ValueError (and the shift loop is quadratic)"


def _huge_oid_content_info() -> bytes:
    arc = b"\xff" * 2100 + b"\x01"          # one arc of 14,708 bits: 2.1 KB on the wire
    return der.seq(der.tlv(der.OID, arc), der.explicit(0, der.seq(b"")))


@pytest.mark.parametrize("entry", ["content_info_type", "open_envelope", "open_message"])
def test_huge_oid_arc_is_malformed(kit, entry):
    data = _huge_oid_content_info()
    call = {"content_info_type": lambda: content_info_type(data),
            "open_envelope": lambda: open_envelope(data, kit.keys),
            "open_message": lambda: open_message(data, keys=kit.keys, trust_anchors=kit.anchors)}
    with pytest.raises(E2MError):
        call[entry]()


def test_signed_data_path_already_refuses_a_huge_oid_arc(kit):
    """verify() parses with asn1crypto and wraps its errors: not affected."""
    with pytest.raises(MalformedError):
        verify(_huge_oid_content_info(), trust_anchors=kit.anchors)


def test_proxy_inspect_survives_a_huge_oid_arc(kit):
    from e2m_plugins import mime
    entity = mime.MimePart((("Content-Type", "application/pkcs7-mime"),), _huge_oid_content_info())
    msg = flows.message(kit.pki).with_body(entity.body, "application/pkcs7-mime")
    assert isinstance(kit.proxy.inspect(msg), Verdict)


# -- 3. constructed OCTET STRINGs nested deeper than the recursion limit ---------

NESTED = "der.octets joins BER constructed OCTET STRING segments by recursion with no depth " \
         "bound (the indefinite-length guard does not apply to definite lengths): RecursionError"


def _nested_octets_envelope(depth: int = 900) -> bytes:
    inner = der.tlv(der.OCTET_STRING, b"x" * 16)
    for _ in range(depth):
        inner = der.tlv(der.OCTET_STRING | der.CONSTRUCTED, inner)   # 0x24
    eci = der.seq(der.enc_oid(oids.DATA),
                  der.algorithm(oids.AES128_CBC, der.octet_string(b"\0" * 16)),
                  der.tlv(der.context(0), inner))
    body = der.seq(der.enc_integer(0), der.set_of(der.seq(b"\x02\x01\x00")), eci)
    return der.seq(der.enc_oid(oids.ENVELOPED_DATA), der.explicit(0, body))   # 3.5 KB


def test_deeply_nested_constructed_octet_string_is_malformed(kit):
    with pytest.raises(MalformedError):
        open_envelope(_nested_octets_envelope(), kit.keys)


def test_proxy_inspect_survives_nested_octet_strings(kit):
    msg = flows.message(kit.pki).with_body(_nested_octets_envelope(), "application/pkcs7-mime")
    assert isinstance(kit.proxy.inspect(msg), Verdict)


# -- 4. an RSASSA-PSS salt length that does not fit a C long ----------------------

PSS_SALT = "signed._check_signature catches ValueError from cryptography's verify, but a PSS " \
           "saltLength >= 2**31 raises OverflowError, which escapes verify()"


def _pss_signed_with_salt(kit, salt: int) -> bytes:
    from asn1crypto import cms
    info = cms.ContentInfo.load(kit.signed[1])          # RSASSA-PSS seed
    params = info["content"]["signer_infos"][0]["signature_algorithm"]["parameters"]
    params["salt_length"] = salt
    return info.dump(force=True)


@pytest.mark.parametrize("salt", [2**31, 2**80])
def test_pss_salt_length_out_of_range_is_a_typed_error(kit, salt):
    with pytest.raises(E2MError):
        verify(_pss_signed_with_salt(kit, salt), trust_anchors=kit.anchors)


def test_pss_reproducer_really_is_pss(kit):
    """Guard for the reproducer above: the seed it edits is RSASSA-PSS signed and verifies."""
    assert bytes.fromhex("06092a864886f70d01010a") in kit.signed[1]   # id-RSASSA-PSS
    assert verify(kit.signed[1], trust_anchors=kit.anchors).signers


# -- 5. a certificate with a duplicated extension ------------------------------------

DUP_EXT = "certfiles.fully_readable reads cert.extensions to catch duplicate extensions but only " \
          "catches ValueError/InvalidVersion; cryptography raises x509.DuplicateExtension"

AKI_OID, SKI_OID = bytes.fromhex("0603551d23"), bytes.fromhex("0603551d0e")


def _der(cert) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding
    return cert.public_bytes(Encoding.DER)


def test_signed_data_with_a_duplicate_extension_certificate_is_a_typed_error(kit):
    data = kit.signed[0]
    assert data.count(AKI_OID) == 1
    with pytest.raises(E2MError):   # the AKI is renamed SKI: two SKI extensions
        verify(data.replace(AKI_OID, SKI_OID, 1), trust_anchors=kit.anchors)


def test_forged_496_with_a_duplicate_extension_certificate_fails_cleanly(kit):
    cert = _der(kit.pki.proxy(flows.TRUSTED).cert).replace(AKI_OID, SKI_OID, 1)
    plain = flows.message(kit.pki)
    warning = f"380 {flows.TRUSTED} \"Required to view 'text/plain'\""
    alice = flows.ua_engine(kit.pki, "alice")
    # an answer to what alice sent (her engine follows no other: review 92)
    forged = sip.make_response(alice.protect(plain).message, 496, "Proxy Indecipherable",
                               [("Warning", warning)], cert, "application/pkix-cert")
    assert alice.react(forged, plain).action == "fail"


# -- 6. a certificate whose public key cannot be loaded --------------------------------

SPKI = "certstore._key_problem calls cert.public_key() unguarded: an unknown key algorithm " \
       "(UnsupportedAlgorithm) or a broken SubjectPublicKeyInfo (ValueError) escapes UAEngine.react"


def test_493_with_an_unreadable_public_key_fails_cleanly(kit):
    rsa_encryption = bytes.fromhex("06092a864886f70d010101")
    cert = _der(kit.pki.user("bob").cert)
    assert cert.count(rsa_encryption) == 1
    cert = cert.replace(rsa_encryption, bytes.fromhex("06092a864886f70d010109"))   # 1.2.840.113549.1.1.9
    plain = flows.message(kit.pki)
    alice = flows.ua_engine(kit.pki, "alice")
    refusal = sip.make_response(alice.protect(plain).message, 493, "Undecipherable", [], cert,
                                "application/pkix-cert")
    assert alice.react(refusal, plain).action == "fail"
