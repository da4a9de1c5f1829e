"""CMS SignedData (RFC 5652 section 5): make and check signatures.

asn1crypto builds what we sign; what we verify is read with the lean reader
(``cms.der``: each element once, a bounded number of them); every cryptographic step
is done by ``cryptography``.  Signers: RSA PKCS#1 v1.5, RSASSA-PSS, ECDSA and Ed25519
(RFC 8419); DSA and SHA-1 are never produced, and accepted when verifying only
with ``Limits(accept_legacy_algorithms=True)``, for old messages such as the
RFC 4134 examples.

Untrusted input is parsed in one guarded step that turns every structural
surprise into ``MalformedError``; the cryptographic checks then run on plain
values, so a bad signature can never be mistaken for bad DER.

Work on hostile input is bounded before it is done: each certificate is at most
``limits.max_certificate_bytes``; the signer certificate is found by serial number
and the exact DER of the issuer name (or ``cryptography``'s ``Name`` equality), never
by RFC 4518 preparation; its key is checked (``certpath.signing_key``) and its
keyUsage must allow digitalSignature before anything is verified; every signature
check, here and on the certificate path, is counted against the message's budget
of public-key operations (``cms.budget``).  SHA-1 and DSA are accepted only with
``limits.accept_legacy_algorithms`` (the RFC 4134 examples need it).
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from asn1crypto import algos
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ..errors import (
    E2MError,
    LimitExceededError,
    MalformedError,
    SignatureInvalidError,
    UnsupportedAlgorithmError,
    UntrustedSignerError,
)
from ..certpath import (
    Identities,
    certificate_identities,
    signing_key,
    verify_chain,
)
from ..certfiles import certificate_key, readable_certificate
from . import der, oids
from .budget import budget_scope, spend
from .limits import DEFAULT_LIMITS, Limits

__all__ = [
    "sign",
    "signed_content",
    "verify",
    "extract_certificates",
    "describe_signed",
    "SignedDescription",
    "SignerDescription",
    "VerifyResult",
    "SignerInfoResult",
]

_SIGNED_DATA = oids.SIGNED_DATA
_CONTENT_TYPE_ATTR = oids.CONTENT_TYPE_ATTR
_MESSAGE_DIGEST_ATTR = oids.MESSAGE_DIGEST_ATTR
_SIGNING_TIME_ATTR = oids.SIGNING_TIME_ATTR

# Content type names, for callers that prefer words to OIDs (one table: oids.py).
_CONTENT_TYPES = oids.CONTENT_TYPES
_CONTENT_TYPE_NAMES = {oid: name for name, oid in _CONTENT_TYPES.items()}

_DIGESTS: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    oids.SHA1: ("sha1", hashes.SHA1),
    oids.SHA224: ("sha224", hashes.SHA224),
    oids.SHA256: ("sha256", hashes.SHA256),
    oids.SHA384: ("sha384", hashes.SHA384),
    oids.SHA512: ("sha512", hashes.SHA512),
}
_DIGEST_OIDS = {name: oid for oid, (name, _) in _DIGESTS.items()}
# Digests we produce; SHA-1 and SHA-224 are only read.
_SIGNING_DIGESTS = ("sha256", "sha384", "sha512")

_RSA = oids.RSA_ENCRYPTION
_RSA_PSS = oids.RSASSA_PSS
_MGF1 = oids.MGF1
_EC_PUBLIC_KEY = oids.EC_PUBLIC_KEY
_ED25519 = oids.ED25519
_ED448 = oids.ED448
_DSA = oids.DSA

# signatureAlgorithm OID -> (kind, digest name bound to the OID or None, readable name).
_SIGNATURES: dict[str, tuple[str, str | None, str]] = {
    _RSA: ("rsa", None, "rsa"),
    oids.SHA1_WITH_RSA: ("rsa", "sha1", "sha1-rsa"),
    oids.SHA224_WITH_RSA: ("rsa", "sha224", "sha224-rsa"),
    oids.SHA256_WITH_RSA: ("rsa", "sha256", "sha256-rsa"),
    oids.SHA384_WITH_RSA: ("rsa", "sha384", "sha384-rsa"),
    oids.SHA512_WITH_RSA: ("rsa", "sha512", "sha512-rsa"),
    _RSA_PSS: ("rsa-pss", None, "rsassa-pss"),
    _EC_PUBLIC_KEY: ("ecdsa", None, "ecdsa"),
    oids.ECDSA_WITH_SHA1: ("ecdsa", "sha1", "sha1-ecdsa"),
    oids.ECDSA_WITH_SHA224: ("ecdsa", "sha224", "sha224-ecdsa"),
    oids.ECDSA_WITH_SHA256: ("ecdsa", "sha256", "sha256-ecdsa"),
    oids.ECDSA_WITH_SHA384: ("ecdsa", "sha384", "sha384-ecdsa"),
    oids.ECDSA_WITH_SHA512: ("ecdsa", "sha512", "sha512-ecdsa"),
    _ED25519: ("ed25519", None, "ed25519"),
    _ED448: ("ed448", None, "ed448"),
    _DSA: ("dsa", None, "dsa"),
    oids.DSA_WITH_SHA1: ("dsa", "sha1", "sha1-dsa"),
    oids.DSA_WITH_SHA1_OIW: ("dsa", "sha1", "sha1-dsa"),
    oids.DSA_WITH_SHA224: ("dsa", "sha224", "sha224-dsa"),
    oids.DSA_WITH_SHA256: ("dsa", "sha256", "sha256-dsa"),
}

# Structural surprises asn1crypto reports while parsing lazily.
_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)


@dataclass(frozen=True)
class SignerInfoResult:
    """One verified signer."""

    certificate: x509.Certificate
    identities: Identities
    digest_algorithm: str          # e.g. "sha256"
    signature_algorithm: str       # e.g. "sha256-rsa", "rsassa-pss", "ed25519"
    signing_time: datetime | None  # claimed by the signer, not proven
    chain: tuple[x509.Certificate, ...] = ()
    # Other signed attributes, by OID: the DER of each value (covered by the signature).
    attributes: dict[str, tuple[bytes, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyResult:
    """What a verified SignedData says; only returned when every signer checked out."""

    content: bytes = field(repr=False)  # plaintext: never in a repr, so never in a log
    content_type: str              # "data", "enveloped-data", ... or a dotted OID
    signers: tuple[SignerInfoResult, ...]
    certificates: tuple[x509.Certificate, ...] = ()


# --------------------------------------------------------------------------
# Signing


def _content_type_oid(content_type: str) -> str:
    name = content_type.strip().lower().replace("_", "-")
    if name in _CONTENT_TYPES:
        return _CONTENT_TYPES[name]
    if all(part.isdigit() for part in content_type.split(".")) and "." in content_type:
        return content_type
    raise ValueError(f"unknown content type {content_type!r}")


def _signing_time_der(moment: datetime) -> bytes:
    moment = moment.astimezone(timezone.utc) if moment.tzinfo else moment.replace(
        tzinfo=timezone.utc)
    # RFC 5652 11.3: UTCTime for 1950..2049, GeneralizedTime otherwise (seconds, Z).
    if 1950 <= moment.year <= 2049:
        return der.tlv(der.UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return der.tlv(der.GENERALIZED_TIME, f"{moment.year:04d}{moment:%m%d%H%M%S}Z".encode("ascii"))


def _attribute(oid: str, value_der: bytes) -> bytes:
    return der.seq(der.enc_oid(oid), der.set_of(value_der))


def _certificate_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _issuer_and_serial(cert_der: bytes) -> bytes:
    """IssuerAndSerialNumber from the certificate's own encodings, byte for byte."""
    tbs = der.items(der.items(der.read_all(cert_der), 3, "certificate")[0], 6, "tbsCertificate")
    at = 1 if tbs[0].tag == der.context(0) else 0          # [0] version is optional
    return der.seq(tbs[at + 2].expect(der.SEQUENCE, "issuer").encoded,
                   tbs[at].expect(der.INTEGER, "serialNumber").encoded)


def sign(content: bytes, signer_cert: x509.Certificate, signer_key: PrivateKeyTypes, *,
         detached: bool = False, include_certificate: bool = True,
         extra_certs: Sequence[x509.Certificate] = (), content_type: str = "data",
         rsa_pss: bool = False, digest: str = "sha256",
         signing_time: datetime | None = None,
         extra_attributes: Sequence[tuple[str, bytes]] = ()) -> bytes:
    """Sign ``content``; return DER ContentInfo(SignedData).

    Always adds signed attributes (content-type, message-digest,
    signing-time), and ``extra_attributes`` as (OID, DER of the one value) pairs,
    so the signature covers them too.  RSA keys sign with PKCS#1 v1.5 (sha*WithRSAEncryption) or,
    with ``rsa_pss``, RSASSA-PSS (MGF1 with the same hash, salt = hash length);
    EC keys with ECDSA; Ed25519 keys always use SHA-512 as digestAlgorithm as
    RFC 8419 requires, whatever ``digest`` says.  The signer is identified by
    issuer and serial number.  ``extra_certs`` (e.g. intermediates) are added
    after the signer's certificate.
    """
    if not isinstance(content, (bytes, bytearray, memoryview)):
        raise TypeError("content must be bytes")
    content = bytes(content)
    digest = digest.lower().replace("-", "")
    if isinstance(signer_key, ed25519.Ed25519PrivateKey):
        digest = "sha512"
    if digest not in _SIGNING_DIGESTS:
        raise ValueError(f"digest must be one of {_SIGNING_DIGESTS}")
    if signer_cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            signer_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError("the private key does not belong to the signer certificate")
    hash_cls = next(cls for name, cls in _DIGESTS.values() if name == digest)
    digest_oid = _DIGEST_OIDS[digest]
    ct_oid = _content_type_oid(content_type)

    hasher = hashes.Hash(hash_cls())
    hasher.update(content)
    # Written with our own DER writer, not asn1crypto: asn1crypto takes any header
    # whose last octet is 0x80 (a length of 0x280, say) for an indefinite length and
    # re-encodes the whole tree, parsing eContent by its type on the way, which
    # failed on opaque content and could change bytes a signature covers.
    attrs = der.set_of(
        _attribute(oids.CONTENT_TYPE_ATTR, der.enc_oid(ct_oid)),
        _attribute(oids.SIGNING_TIME_ATTR,
                   _signing_time_der(signing_time or datetime.now(timezone.utc))),
        _attribute(oids.MESSAGE_DIGEST_ATTR, der.octet_string(hasher.finalize())),
        *(_attribute(oid, value) for oid, value in extra_attributes))
    # The signature covers the DER SET OF (tag 0x31), not the [0] IMPLICIT form.
    to_be_signed = attrs

    if isinstance(signer_key, rsa.RSAPrivateKey):
        if rsa_pss:
            hash_id = der.algorithm(digest_oid, der.NULL_DER)
            sig_alg = der.algorithm(_RSA_PSS, der.seq(
                der.explicit(0, hash_id),
                der.explicit(1, der.algorithm(_MGF1, hash_id)),
                der.explicit(2, der.enc_integer(hash_cls.digest_size))))
            signature = signer_key.sign(
                to_be_signed,
                padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls.digest_size),
                hash_cls())
        else:
            oid = next(o for o, (kind, d, _) in _SIGNATURES.items()
                       if kind == "rsa" and d == digest)
            # RFC 4055: sha*WithRSAEncryption carries NULL parameters.
            sig_alg = der.algorithm(oid, der.NULL_DER)
            signature = signer_key.sign(to_be_signed, padding.PKCS1v15(), hash_cls())
    elif rsa_pss:
        raise ValueError("rsa_pss needs an RSA key")
    elif isinstance(signer_key, ec.EllipticCurvePrivateKey):
        oid = next(o for o, (kind, d, _) in _SIGNATURES.items()
                   if kind == "ecdsa" and d == digest)
        sig_alg = der.algorithm(oid)
        signature = signer_key.sign(to_be_signed, ec.ECDSA(hash_cls()))
    elif isinstance(signer_key, ed25519.Ed25519PrivateKey):
        sig_alg = der.algorithm(_ED25519)
        signature = signer_key.sign(to_be_signed)
    else:
        raise ValueError("signer key must be RSA, EC or Ed25519")

    digest_alg = der.algorithm(digest_oid, der.NULL_DER)
    signer_cert_der = _certificate_der(signer_cert)
    signer_info = der.seq(
        der.enc_integer(1),                                  # v1: issuer and serial
        _issuer_and_serial(signer_cert_der),
        digest_alg,
        der.implicit(0, attrs),
        sig_alg,
        der.octet_string(signature))
    certs = ([signer_cert_der] if include_certificate else []) + [
        _certificate_der(c) for c in extra_certs]
    is_data = ct_oid == _CONTENT_TYPES["data"]
    encap = [der.enc_oid(ct_oid)]
    if not detached:
        encap.append(der.explicit(0, der.octet_string(content)))
    signed_data = [
        # RFC 5652 5.1: version 3 when the content is not id-data.
        der.enc_integer(1 if is_data else 3),
        der.set_of(digest_alg),
        der.seq(*encap),
    ]
    if certs:
        signed_data.append(der.implicit(0, der.set_of(*certs)))
    signed_data.append(der.set_of(signer_info))
    return der.seq(der.enc_oid(oids.SIGNED_DATA), der.explicit(0, der.seq(*signed_data)))


# --------------------------------------------------------------------------
# Parsing untrusted input into plain values


@dataclass(frozen=True)
class _Cert:
    der: bytes
    cert: x509.Certificate | None  # None: cryptography cannot read it


@dataclass(frozen=True)
class _Signer:
    sid_kind: str                       # "issuer_and_serial_number" | "subject_key_identifier"
    issuer: bytes | None                # the issuer Name as received (its whole encoding)
    serial: int | None
    ski: bytes | None
    digest_oid: str
    sig_oid: str
    sig_params: bytes | None            # RSASSA-PSS parameters as received
    signature: bytes
    signed_attrs_raw: bytes | None       # content octets of [0] signedAttrs as received
    signed_attrs_sorted: bytes | None    # the same attributes in DER order
    attrs: dict[str, list[der.TLV]]


@dataclass(frozen=True)
class _Parsed:
    content: bytes | None
    content_type_oid: str
    certs: tuple[_Cert, ...]
    signers: tuple[_Signer, ...]


def _der_set(content: bytes) -> bytes:
    """Wrap ``content`` as a DER SET (tag 0x31) with a definite length."""
    n = len(content)
    if n < 0x80:
        return b"\x31" + bytes([n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x31" + bytes([0x80 | len(length)]) + length + content


# Untrusted SignedData is read with the lean reader (cms.der): each element once, at most
# limits.max_der_elements of them, and counts checked as soon as they are known.
# asn1crypto re-scans BER indefinite lengths once per enclosing level and re-encodes
# any element whose length octets end in 0x80 when asked for its bytes; both made one
# stranger's message cost seconds.  It now sees only small, bounded pieces.
_MAX_PSS_PARAMS_BYTES = 256
_MAX_DESCRIBED_NAME_BYTES = 4096


def _parse(data: bytes, limits: Limits) -> _Parsed:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("CMS input must be bytes")
    data = bytes(data)
    limits.check_size(len(data))
    top = der.read_all(data, max_elements=limits.max_der_elements)
    info = der.items(top.expect(der.SEQUENCE, "ContentInfo"), 2, "ContentInfo")
    if der.oid(info[0]) != _SIGNED_DATA:
        raise MalformedError(f"ContentInfo holds {der.oid(info[0])}, not SignedData")
    wrapped = der.items(info[1].expect(der.context(0), "ContentInfo content"), 1, "content")
    if len(info) != 2 or len(wrapped) != 1:
        raise MalformedError("ContentInfo content is not one SignedData")
    fields = der.items(wrapped[0].expect(der.SEQUENCE, "SignedData"), 4, "SignedData")
    der.integer(fields[0])                               # version: any value is read
    fields[1].expect(der.SET, "digestAlgorithms")        # not used: each signer names its own
    content_type_oid, content = _encapsulated(fields[2])
    rest = fields[3:]
    certs: list[_Cert] = []
    if rest and rest[0].tag == der.context(0):
        certs = _certificates(rest.pop(0), limits)
    if rest and rest[0].tag == der.context(1):
        rest.pop(0)                                      # CRLs in the message play no part
    if len(rest) != 1:
        raise MalformedError("SignedData: unexpected fields")
    signer_infos = der.items(rest[0].expect(der.SET, "signerInfos"))
    limits.check_count("signers", len(signer_infos), limits.max_signers)
    signers = [_parse_signer(si, limits) for si in signer_infos]
    return _Parsed(content=content, content_type_oid=content_type_oid, certs=tuple(certs),
                   signers=tuple(signers))


def signed_content(data: bytes, limits: Limits = DEFAULT_LIMITS) -> bytes | None:
    """The content a SignedData carries (None when detached), read, NOT verified: for
    a caller that only asks what it wraps (``proxy._keyless_content``: is a signed
    answer an envelope inside?).  ``MalformedError`` or ``LimitExceededError``."""
    return _parse(data, limits).content


def _encapsulated(tlv: der.TLV) -> tuple[str, bytes | None]:
    """(eContentType, eContent or None when detached); eContent is always taken as the
    OCTET STRING it is (BER segments joined), never parsed further."""
    fields = der.items(tlv.expect(der.SEQUENCE, "encapContentInfo"), 1, "encapContentInfo")
    content_type_oid = der.oid(fields[0])
    if len(fields) == 1:
        return content_type_oid, None
    inner = der.items(fields[1].expect(der.context(0), "eContent"), 1, "eContent")
    if len(fields) != 2 or len(inner) != 1:
        raise MalformedError("encapContentInfo: unexpected fields")
    return content_type_oid, _octet_string(inner[0], "eContent")


def _octet_string(tlv: der.TLV, what: str) -> bytes:
    if tlv.tag & ~der.CONSTRUCTED != der.OCTET_STRING:
        raise MalformedError(f"{what}: not an OCTET STRING")
    return der.octets(tlv)


def _certificates(tlv: der.TLV, limits: Limits) -> list[_Cert]:
    choices = der.items(tlv)
    limits.check_count("certificates", len(choices), limits.max_certificates)
    certs = []
    for choice in choices:
        if choice.tag != der.SEQUENCE:
            continue  # attribute and other certificates play no part here
        encoded = choice.encoded
        if len(encoded) > limits.max_certificate_bytes:
            raise LimitExceededError(
                f"certificate of {len(encoded)} bytes exceeds the limit of "
                f"{limits.max_certificate_bytes}")
        # Counted before cryptography reads it (names, SAN, elements): over a limit is
        # LimitExceededError for the message, as a certificate over the size limit is.
        certs.append(_Cert(der=encoded, cert=readable_certificate(encoded, limits)))
    return certs


def _algorithm(tlv: der.TLV, what: str) -> tuple[str, der.TLV | None]:
    fields = der.items(tlv.expect(der.SEQUENCE, what), 1, what)
    if len(fields) > 2:
        raise MalformedError(f"{what}: unexpected fields")
    return der.oid(fields[0]), fields[1] if len(fields) == 2 else None


def _parse_signer(tlv: der.TLV, limits: Limits) -> _Signer:
    fields = der.items(tlv.expect(der.SEQUENCE, "SignerInfo"), 5, "SignerInfo")
    der.integer(fields[0])
    sid = fields[1]
    issuer = serial = ski = None
    if sid.tag == der.SEQUENCE:
        kind = "issuer_and_serial_number"
        ias = der.items(sid, 2, "IssuerAndSerialNumber")
        if len(ias) != 2:
            raise MalformedError("IssuerAndSerialNumber: unexpected fields")
        issuer = ias[0].expect(der.SEQUENCE, "issuer").encoded
        serial = der.integer(ias[1])
    elif sid.tag & ~der.CONSTRUCTED == der.context(0, constructed=False):
        kind = "subject_key_identifier"
        ski = der.octets(sid)
    else:
        raise MalformedError("unknown SignerIdentifier")
    digest_oid, _ = _algorithm(fields[2], "digestAlgorithm")
    rest = fields[3:]
    signed_attrs = rest.pop(0) if rest[0].tag == der.context(0) else None
    if len(rest) < 2 or len(rest) > 3 or (len(rest) == 3 and rest[2].tag != der.context(1)):
        raise MalformedError("SignerInfo: unexpected fields")
    sig_oid, params = _algorithm(rest[0], "signatureAlgorithm")
    sig_params = None
    if sig_oid == _RSA_PSS:
        if params is None or params.tag != der.SEQUENCE:
            raise MalformedError("RSASSA-PSS without parameters")
        sig_params = params.encoded
        if len(sig_params) > _MAX_PSS_PARAMS_BYTES:
            raise MalformedError("RSASSA-PSS parameters too long")
    signature = _octet_string(rest[1], "signature")

    raw = sorted_der = None
    attrs: dict[str, list[der.TLV]] = {}
    if signed_attrs is not None:
        items = der.items(signed_attrs)
        limits.check_count("signed attributes", len(items), limits.max_attributes)
        raw = _der_set(signed_attrs.value)
        sorted_der = _der_set(b"".join(sorted(item.encoded for item in items)))
        for item in items:
            pair = der.items(item.expect(der.SEQUENCE, "Attribute"), 2, "Attribute")
            if len(pair) != 2:
                raise MalformedError("Attribute: unexpected fields")
            oid = der.oid(pair[0])
            if oid in attrs:
                # RFC 5652 5.3: each attribute type appears at most once.
                raise MalformedError("a signed attribute type occurs twice")
            values = der.items(pair[1].expect(der.SET, "attrValues"))
            limits.check_count("attribute values", len(values), limits.max_attributes)
            attrs[oid] = values
    return _Signer(
        sid_kind=kind, issuer=issuer, serial=serial, ski=ski, digest_oid=digest_oid,
        sig_oid=sig_oid, sig_params=sig_params, signature=signature,
        signed_attrs_raw=raw, signed_attrs_sorted=sorted_der, attrs=attrs)


# --------------------------------------------------------------------------
# Verification


def _single(signer: _Signer, oid: str, what: str) -> der.TLV:
    values = signer.attrs.get(oid)
    if values is None:
        raise SignatureInvalidError(f"signed attributes lack {what}")
    if len(values) != 1:
        raise MalformedError(f"{what} attribute must have exactly one value")
    return values[0]


def _quick_time(tag: int, text: str) -> datetime | None:
    """The usual signing-time (all digits, then Z) read without strptime, which costs
    more than the rest of the attribute checks; None for anything else, which the
    general reading below then decides."""
    if not (text.endswith("Z") and text[:-1].isdigit() and text.isascii()):
        return None
    if tag == der.UTC_TIME and len(text) == 13:
        year, rest = int(text[:2]), text[2:]
        year += 2000 if year < 50 else 1900
    elif tag == der.GENERALIZED_TIME and len(text) == 15:
        year, rest = int(text[:4]), text[4:]
    else:
        return None
    try:
        return datetime(year, int(rest[0:2]), int(rest[2:4]), int(rest[4:6]), int(rest[6:8]),
                        int(rest[8:10]), tzinfo=timezone.utc)
    except ValueError:
        return None


def _time(tlv: der.TLV) -> datetime:
    """A signing-time value: UTCTime (years 1950-2049) or GeneralizedTime, in UTC."""
    text = bytes(tlv.value).decode("ascii", "replace")
    quick = _quick_time(tlv.tag, text)
    if quick is not None:
        return quick
    try:
        if tlv.tag == der.UTC_TIME and len(text) == 13:
            moment = datetime.strptime("20" + text, "%Y%m%d%H%M%SZ")
            if moment.year >= 2050:
                moment = moment.replace(year=moment.year - 100)
        elif tlv.tag == der.GENERALIZED_TIME and len(text) == 15:
            moment = datetime.strptime(text, "%Y%m%d%H%M%SZ")
        else:
            raise MalformedError("signing-time is not a UTC time")
    except ValueError:
        raise MalformedError("unreadable signing-time") from None
    return moment.replace(tzinfo=timezone.utc)


def _cert_name_key(name: x509.Name) -> tuple:
    return tuple(frozenset((a.oid.dotted_string, a.value) for a in rdn) for rdn in name.rdns)


# How ``cryptography`` decodes the string types of a name, to compare names by value.
_NAME_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x12: "ascii", 0x1A: "ascii",
                 0x14: "latin-1", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}


def _name_key(encoded: bytes) -> tuple | None:
    """The same key as ``_cert_name_key`` for a Name as received: attribute types and
    decoded values, compared exactly (no RFC 4518 preparation); linear in the name."""
    try:
        rdns = []
        for rdn in der.items(der.read_all(encoded, max_elements=1024)):
            attributes = set()
            for atv in der.items(rdn.expect(der.SET, "RDN")):
                pair = der.items(atv.expect(der.SEQUENCE, "AttributeTypeAndValue"), 2)
                value = pair[1]
                codec = _NAME_STRINGS.get(value.tag)
                attributes.add((der.oid(pair[0]),
                                bytes(value.value).decode(codec) if codec else value.encoded))
            rdns.append(frozenset(attributes))
        return tuple(rdns)
    except (E2MError, UnicodeDecodeError):
        return None


def _tbs_fields(cert_der: bytes) -> tuple[int, bytes, der.TLV]:
    """(serial number, issuer Name as encoded, subjectPublicKeyInfo) of a certificate,
    read without parsing the rest of it."""
    return _remembered_tbs_fields(bytes(cert_der))


# Every message of a sender carries the same certificate: its fields are read once
# per process (by its DER; bounded, least recently used out; a failure is not kept).
@functools.lru_cache(maxsize=256)
def _remembered_tbs_fields(cert_der: bytes) -> tuple[int, bytes, der.TLV]:
    cert = der.items(der.read_all(cert_der, max_elements=1024), 3, "Certificate")
    tbs = der.items(cert[0].expect(der.SEQUENCE, "tbsCertificate"), 6, "tbsCertificate")
    if tbs[0].tag == der.context(0):
        tbs = tbs[1:]
    if len(tbs) < 6:
        raise MalformedError("tbsCertificate: too few fields")
    return der.integer(tbs[0]), tbs[2].expect(der.SEQUENCE, "issuer").encoded, tbs[5]


def _find_signer_cert(signer: _Signer, pool: Sequence[_Cert]) -> _Cert:
    """The certificate a SignerInfo names: by serial number and the exact DER of the
    issuer name, else the same serial and an equal ``cryptography`` ``Name``; or by
    subjectKeyIdentifier.  Each comparison is linear in the names compared."""
    if signer.sid_kind == "issuer_and_serial_number":
        assert signer.issuer is not None
        wanted_key: list = []  # computed once, only if a serial matches but the DER differs
        for candidate in pool:
            try:
                serial, issuer, _ = _tbs_fields(candidate.der)
            except E2MError:
                continue  # a broken certificate simply does not match
            if serial != signer.serial:
                continue
            if issuer == signer.issuer:
                return candidate
            if candidate.cert is None:
                continue
            if not wanted_key:
                wanted_key.append(_name_key(signer.issuer))
            try:
                found = wanted_key[0] is not None and \
                    _cert_name_key(candidate.cert.issuer) == wanted_key[0]
            except ValueError:
                found = False
            if found:
                return candidate
    else:
        for candidate in pool:
            if candidate.cert is None:
                continue  # unreadable: it could not be used anyway
            try:
                ski = candidate.cert.extensions.get_extension_for_class(
                    x509.SubjectKeyIdentifier).value.digest
            except (x509.ExtensionNotFound, ValueError):
                continue
            if ski == signer.ski:
                return candidate
    raise UntrustedSignerError("signer certificate not found in the message or extra_certs")


def _unreadable_signer(found: _Cert) -> E2MError:
    """Why ``cryptography`` cannot read the signer certificate, from a bounded look at
    its key algorithm (never a full parse of what an attacker sent)."""
    try:
        _, _, spki = _tbs_fields(found.der)
        algorithm, params = _algorithm(
            der.items(spki.expect(der.SEQUENCE, "subjectPublicKeyInfo"), 2)[0], "algorithm")
    except E2MError:
        return MalformedError("the signer certificate is not well-formed")
    if algorithm == _DSA and (params is None or params.tag == der.NULL):
        return UnsupportedAlgorithmError(
            "the signer certificate cannot be read (DSA parameters inherited from the CA)")
    return MalformedError("the signer certificate cannot be read")


def _legacy_problem(signer: _Signer, limits: Limits) -> str | None:
    """SHA-1 digests and DSA signatures: only as legacy algorithms."""
    if limits.accept_legacy_algorithms:
        return None
    kind, bound_digest, name = _SIGNATURES[signer.sig_oid]
    if kind == "dsa":
        return "DSA signatures are a legacy algorithm, not accepted"
    if signer.digest_oid == oids.SHA1 or bound_digest == "sha1":
        return f"SHA-1 ({name}) is a legacy algorithm, not accepted"
    if kind == "rsa-pss" and signer.sig_params is not None:
        _, pss_hash = _pss_from_params(signer.sig_params)
        if isinstance(pss_hash, hashes.SHA1):
            return "RSASSA-PSS with SHA-1 is a legacy algorithm, not accepted"
    return None


def _pss_from_params(encoded: bytes) -> tuple[padding.PSS, hashes.HashAlgorithm]:
    try:
        params = algos.RSASSAPSSParams.load(encoded, strict=True)   # at most 256 bytes
        hash_oid = params["hash_algorithm"]["algorithm"].dotted
        mgf = params["mask_gen_algorithm"]
        if mgf["algorithm"].dotted != _MGF1:
            raise UnsupportedAlgorithmError("RSASSA-PSS with a mask generation other than MGF1")
        mgf_hash_oid = mgf["parameters"]["algorithm"].dotted
        salt = params["salt_length"].native
        trailer = params["trailer_field"].native
    except _PARSE_ERRORS:
        raise MalformedError("unreadable RSASSA-PSS parameters") from None
    if trailer not in ("trailer_field_bc", 1):
        raise UnsupportedAlgorithmError("RSASSA-PSS trailer field other than 0xBC")
    if hash_oid not in _DIGESTS or mgf_hash_oid not in _DIGESTS:
        raise UnsupportedAlgorithmError("RSASSA-PSS with an unsupported hash")
    return (padding.PSS(mgf=padding.MGF1(_DIGESTS[mgf_hash_oid][1]()), salt_length=salt),
            _DIGESTS[hash_oid][1]())


def _check_signature(signer: _Signer, public_key: object, message: bytes,
                     digest_cls: type[hashes.HashAlgorithm]) -> None:
    """Raise SignatureInvalidError unless ``signature`` is valid over ``message``."""
    kind, bound_digest, _ = _SIGNATURES[signer.sig_oid]
    hash_alg: hashes.HashAlgorithm = (
        _DIGESTS[_DIGEST_OIDS[bound_digest]][1]() if bound_digest else digest_cls())
    try:
        if kind == "rsa" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signer.signature, message, padding.PKCS1v15(), hash_alg)
        elif kind == "rsa-pss" and isinstance(public_key, rsa.RSAPublicKey):
            assert signer.sig_params is not None
            pss, pss_hash = _pss_from_params(signer.sig_params)
            public_key.verify(signer.signature, message, pss, pss_hash)
        elif kind == "ecdsa" and isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signer.signature, message, ec.ECDSA(hash_alg))
        elif kind == "ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signer.signature, message)
        elif kind == "ed448" and isinstance(public_key, ed448.Ed448PublicKey):
            public_key.verify(signer.signature, message)
        elif kind == "dsa" and isinstance(public_key, dsa.DSAPublicKey):
            public_key.verify(signer.signature, message, hash_alg)
        else:
            raise SignatureInvalidError(
                "signature algorithm does not fit the signer certificate's key")
    except InvalidSignature:
        raise SignatureInvalidError("signature does not verify") from None
    except UnsupportedAlgorithm:
        raise UnsupportedAlgorithmError("signature algorithm not supported here") from None
    except (ValueError, OverflowError):
        # e.g. a malformed DER ECDSA/DSA signature value, a PSS salt length beyond a C long
        raise SignatureInvalidError("signature value or parameters are malformed") from None


def _verify_signer(signer: _Signer, content: bytes, content_type_oid: str,
                   pool: Sequence[_Cert], anchors: Sequence[x509.Certificate],
                   at: datetime | None, check_time: bool,
                   limits: Limits = DEFAULT_LIMITS) -> SignerInfoResult:
    if signer.digest_oid not in _DIGESTS:
        raise UnsupportedAlgorithmError(f"digest algorithm {signer.digest_oid} not supported")
    if signer.sig_oid not in _SIGNATURES:
        raise UnsupportedAlgorithmError(f"signature algorithm {signer.sig_oid} not supported")
    digest_name, digest_cls = _DIGESTS[signer.digest_oid]
    legacy = _legacy_problem(signer, limits)
    if legacy:
        raise UnsupportedAlgorithmError(legacy)

    found = _find_signer_cert(signer, pool)
    if found.cert is None:
        raise _unreadable_signer(found)
    # Everything about the signer's certificate and key is checked before its key is used.
    public_key = signing_key(found.cert, limits, found.der)

    signing_time: datetime | None = None
    if signer.signed_attrs_raw is None:
        spend("signature")
        _check_signature(signer, public_key, content, digest_cls)
    else:
        try:
            claimed_type = der.oid(_single(signer, _CONTENT_TYPE_ATTR, "content-type"))
            claimed_digest = _octet_string(_single(signer, _MESSAGE_DIGEST_ATTR,
                                                   "message-digest"), "message-digest")
            if _SIGNING_TIME_ATTR in signer.attrs:
                signing_time = _time(_single(signer, _SIGNING_TIME_ATTR, "signing-time"))
        except MalformedError as exc:
            raise MalformedError(f"unreadable signed attribute value: {exc}") from None
        if claimed_type != content_type_oid:
            raise SignatureInvalidError("content-type attribute differs from eContentType")
        hasher = hashes.Hash(digest_cls())
        hasher.update(content)
        if not isinstance(claimed_digest, bytes) or not _equal(hasher.finalize(), claimed_digest):
            raise SignatureInvalidError("message digest does not match the content")
        try:
            spend("signature")
            _check_signature(signer, public_key, signer.signed_attrs_raw, digest_cls)
        except SignatureInvalidError:
            # Senders must use DER; a few sort the SET OF wrongly, and RFC 5652
            # defines the signature over the DER form, so try that too.
            if signer.signed_attrs_sorted == signer.signed_attrs_raw:
                raise
            spend("signature")
            _check_signature(signer, public_key, signer.signed_attrs_sorted or b"", digest_cls)

    others = [c.cert for c in pool if c.cert is not None and c is not found]
    chain = verify_chain(found.cert, anchors, others, at=at, check_time=check_time,
                         limits=limits)
    return SignerInfoResult(
        certificate=found.cert,
        identities=certificate_identities(found.cert, limits),
        digest_algorithm=digest_name,
        signature_algorithm=_SIGNATURES[signer.sig_oid][2],
        signing_time=signing_time,
        chain=tuple(chain),
        attributes={oid: tuple(v.encoded for v in values) for oid, values in signer.attrs.items()
                    if oid not in (_CONTENT_TYPE_ATTR, _MESSAGE_DIGEST_ATTR, _SIGNING_TIME_ATTR)},
    )


def _equal(a: bytes, b: bytes) -> bool:
    # Constant-time compare: cheap, and removes any timing question.
    return hmac.compare_digest(a, b)


def _pool(parsed: _Parsed, extra_certs: Sequence[x509.Certificate]) -> list[_Cert]:
    pool = list(parsed.certs)
    seen = {c.der for c in pool}
    for cert in extra_certs:
        encoded = certificate_key(cert)
        if encoded not in seen:
            seen.add(encoded)
            pool.append(_Cert(der=encoded, cert=cert))
    return pool


def verify(data: bytes, *, trust_anchors: Sequence[x509.Certificate],
           detached_content: bytes | None = None, at: datetime | None = None,
           check_time: bool = True, extra_certs: Sequence[x509.Certificate] = (),
           limits: Limits = DEFAULT_LIMITS) -> VerifyResult:
    """Verify a DER ContentInfo(SignedData); every SignerInfo must check out.

    The signer certificate is looked up (by issuer and serial number, or by
    subject key identifier) among the message's certificates and
    ``extra_certs``; it must chain to ``trust_anchors`` at ``at`` (default
    now) unless ``check_time`` is False, with the CRLs of ``trust_anchors`` when it
    is a ``certpath.TrustAnchors``.  ``detached_content`` supplies the
    content when the signature is detached.  The work is spent from the message's
    budget of public-key operations (a fresh one of ``limits.max_public_key_ops``
    outside an engine).

    Raises MalformedError, UnsupportedAlgorithmError, SignatureInvalidError,
    UntrustedSignerError or LimitExceededError.
    """
    parsed = _parse(data, limits)
    if not parsed.signers:
        # A "certificates-only" SignedData proves nothing about any content.
        raise SignatureInvalidError("SignedData carries no signature")
    if parsed.content is None:
        if detached_content is None:
            raise MalformedError("the content is detached and none was supplied")
        content = bytes(detached_content)
    else:
        content = parsed.content
        if detached_content is not None and not _equal(bytes(detached_content), content):
            raise SignatureInvalidError("supplied content differs from the embedded content")
    pool = _pool(parsed, extra_certs)
    with budget_scope(limits.max_public_key_ops):
        signers = tuple(_verify_signer(s, content, parsed.content_type_oid, pool,
                                       trust_anchors, at, check_time, limits)
                        for s in parsed.signers)
    return VerifyResult(
        content=content,
        content_type=_CONTENT_TYPE_NAMES.get(parsed.content_type_oid, parsed.content_type_oid),
        signers=signers,
        certificates=tuple(c.cert for c in parsed.certs if c.cert is not None),
    )


@dataclass(frozen=True)
class SignerDescription:
    """What a SignerInfo claims, unverified: for ``e2m cms inspect`` and logs."""

    identifier: str                       # "issuer-serial=<hex>" or "ski=<hex>"
    issuer: str | None                    # RFC 4514 issuer name for issuer-serial ids
    digest_algorithm: str
    signature_algorithm: str
    signed_attributes: tuple[tuple[str, str | None], ...]  # (name, readable value or None)


@dataclass(frozen=True)
class SignedDescription:
    """Structure of a SignedData without verifying it and without its content."""

    content_type: str                     # the encapsulated content type, by name
    detached: bool
    content_bytes: int | None
    certificates: tuple[x509.Certificate, ...]
    unreadable_certificates: int
    signers: tuple[SignerDescription, ...]
    nested_cms: bytes | None              # the content when it is itself CMS, else None


def _describe_attribute(oid: str, values: list[der.TLV]) -> tuple[str, str | None]:
    name = oids.name_of(oid)
    if len(values) != 1:
        return name, None
    value = values[0]
    try:
        if oid == _CONTENT_TYPE_ATTR:
            return name, oids.name_of(der.oid(value))
        if oid == _SIGNING_TIME_ATTR:
            return name, _time(value).isoformat()
        if oid == _MESSAGE_DIGEST_ATTR:
            return name, _octet_string(value, "message-digest").hex()
    except MalformedError:
        pass
    return name, None


def _describe_name(encoded: bytes) -> str:
    """An issuer name for people to read; a stranger's huge name is only measured."""
    if len(encoded) > _MAX_DESCRIBED_NAME_BYTES:
        return f"<a name of {len(encoded)} bytes>"
    try:
        return asn1_x509.Name.load(encoded, strict=True).human_friendly
    except _PARSE_ERRORS:
        return "<an unreadable name>"


def _describe_signer(signer: _Signer) -> SignerDescription:
    if signer.ski is not None:
        identifier, issuer = f"ski={signer.ski.hex()}", None
    else:
        identifier = f"issuer-serial={signer.serial:x}"
        issuer = _describe_name(signer.issuer) if signer.issuer is not None else None
    digest = _DIGESTS.get(signer.digest_oid, (signer.digest_oid, None))[0]
    signature = _SIGNATURES.get(signer.sig_oid, ("", None, signer.sig_oid))[2]
    attributes = tuple(_describe_attribute(oid, values) for oid, values in signer.attrs.items())
    return SignerDescription(identifier, issuer, digest, signature, attributes)


def describe_signed(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> SignedDescription:
    """Describe a SignedData's structure; nothing is verified, no content returned
    except a nested CMS layer (so a caller can describe that too)."""
    parsed = _parse(data, limits)
    nested = parsed.content if parsed.content_type_oid in (
        oids.SIGNED_DATA, oids.ENVELOPED_DATA, oids.AUTH_ENVELOPED_DATA) else None
    return SignedDescription(
        content_type=oids.name_of(parsed.content_type_oid),
        detached=parsed.content is None,
        content_bytes=None if parsed.content is None else len(parsed.content),
        certificates=tuple(c.cert for c in parsed.certs if c.cert is not None),
        unreadable_certificates=sum(1 for c in parsed.certs if c.cert is None),
        signers=tuple(_describe_signer(s) for s in parsed.signers),
        nested_cms=nested,
    )


def extract_certificates(data: bytes, *,
                         limits: Limits = DEFAULT_LIMITS) -> list[x509.Certificate]:
    """The certificates a SignedData carries (e.g. a certs-only message); not verified."""
    parsed = _parse(data, limits)
    return [c.cert for c in parsed.certs if c.cert is not None]
