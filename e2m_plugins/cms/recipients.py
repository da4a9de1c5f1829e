"""RecipientInfo: who can open an envelope, how to build one, how to open ours.

Three kinds (RFC 5652 §6.2):

* ktri  - RSA key transport, PKCS#1 v1.5 or OAEP;
* kari  - ephemeral-static ECDH on P-256 or X25519 (RFC 5753, RFC 8418);
* kekri - a pre-shared key-encryption key, also how a reused CEK (RFC 3185)
  is addressed.

Building objects (``KeyTransRecipient``, ``KeyAgreeRecipient``, ``SharedKEK``)
describe a recipient; opening objects (``CertificateKey``, ``SharedKEK``) hold
our own private material.  Neither keeps any state between messages (a
``CertificateKey`` keeps one secret derived from its RSA key, for implicit
rejection).

Opening is in two steps: ``match`` finds whether a RecipientInfo is ours with no
key operation, and ``Match.unwrap`` does the one operation, counted first against
the message's budget (``budget.spend``).  ``open_envelope`` unwraps only the first
match, so an envelope costs at most one RSA decryption or ECDH exchange.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding as _Encoding
from cryptography.hazmat.primitives.serialization import PublicFormat as _PublicFormat

from . import ciphers, der, kdf, oids
from .budget import spend
from ..errors import DecryptionError, MalformedError, UnsupportedAlgorithmError

_OAEP_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    oids.SHA1: hashes.SHA1, oids.SHA224: hashes.SHA224, oids.SHA256: hashes.SHA256,
    oids.SHA384: hashes.SHA384, oids.SHA512: hashes.SHA512,
}
_HASH_OIDS = {"sha1": oids.SHA1, "sha256": oids.SHA256, "sha384": oids.SHA384, "sha512": oids.SHA512}


# ----------------------------------------------------------------- identifiers

def subject_key_identifier(cert: x509.Certificate) -> bytes:
    """The certificate's SKI extension, or the RFC 5280 method-1 value."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def issuer_and_serial(cert: x509.Certificate) -> bytes:
    return der.seq(cert.issuer.public_bytes(), der.enc_integer(cert.serial_number))


def _rid_for(cert: x509.Certificate, use_ski: bool) -> bytes:
    """RecipientIdentifier: issuerAndSerialNumber or [0] subjectKeyIdentifier."""
    if use_ski:
        return der.tlv(der.context(0, False), subject_key_identifier(cert))
    return issuer_and_serial(cert)


class _RecipientId(NamedTuple):
    """A parsed rid in comparable form."""

    issuer_der: bytes | None = None
    serial: int | None = None
    ski: bytes | None = None
    encoded: bytes | None = None

    def describe(self) -> str:
        if self.ski is not None:
            return f"ski={self.ski.hex()}"
        return f"issuer-serial={self.serial:x}"


def _parse_issuer_serial(tlv: der.TLV) -> _RecipientId:
    # Keep the encoding: CertificateKey compares it byte for byte first (cheap).
    fields = der.items(tlv, 2, "IssuerAndSerialNumber")
    fields[0].expect(der.SEQUENCE, "issuer")
    return _RecipientId(issuer_der=fields[0].encoded, serial=der.integer(fields[1]), encoded=tlv.encoded)


# ------------------------------------------------------------ building side

@dataclass(frozen=True)
class KeyTransRecipient:
    """An RSA recipient; OAEP uses SHA-256 with MGF1-SHA-256 unless told otherwise."""

    certificate: x509.Certificate
    oaep: bool = False
    oaep_hash: str = "sha256"
    use_ski: bool = False

    def build(self, cek: bytes) -> bytes:
        public = self.certificate.public_key()
        if not isinstance(public, rsa.RSAPublicKey):
            raise UnsupportedAlgorithmError("key transport needs an RSA certificate")
        if self.oaep:
            hash_cls = _OAEP_HASHES[_HASH_OIDS[self.oaep_hash]]
            hash_alg = der.algorithm(_HASH_OIDS[self.oaep_hash])
            params = der.seq(der.explicit(0, hash_alg),
                             der.explicit(1, der.algorithm(oids.MGF1, hash_alg)))
            algorithm = der.algorithm(oids.RSAES_OAEP, params)
            encrypted = public.encrypt(cek, padding.OAEP(padding.MGF1(hash_cls()), hash_cls(), None))
        else:
            algorithm = der.algorithm(oids.RSA_ENCRYPTION, der.NULL_DER)
            encrypted = public.encrypt(cek, padding.PKCS1v15())
        version = 2 if self.use_ski else 0
        return der.seq(der.enc_integer(version), _rid_for(self.certificate, self.use_ski),
                       algorithm, der.octet_string(encrypted))

    @property
    def version(self) -> int:
        return 2 if self.use_ski else 0


@dataclass(frozen=True)
class KeyAgreeRecipient:
    """An ECDH recipient (P-256 or X25519) with an ephemeral originator key.

    ``kdf`` defaults to X9.63-KDF-SHA256 for P-256 (RFC 8591, what OpenSSL
    opens) and HKDF-SHA256 for X25519 (RFC 8551 / RFC 8418).
    """

    certificate: x509.Certificate
    kdf: str | None = None
    wrap: str = "aes128-wrap"
    ukm: bytes | None = None
    use_ski: bool = False
    version: int = field(default=3, init=False)

    def build(self, cek: bytes) -> bytes:
        public = self.certificate.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            if not isinstance(public.curve, ec.SECP256R1):
                raise UnsupportedAlgorithmError("only the P-256 curve is supported for ECDH")
            ephemeral = ec.generate_private_key(ec.SECP256R1())
            secret = ephemeral.exchange(ec.ECDH(), public)
            point = ephemeral.public_key().public_bytes(
                _Encoding.X962, _PublicFormat.UncompressedPoint)
            originator = der.seq(der.algorithm(oids.EC_PUBLIC_KEY), der.bit_string(point))
            scheme = kdf.scheme_by_name(self.kdf or "x963-sha256")
        elif isinstance(public, x25519.X25519PublicKey):
            ephemeral_x = x25519.X25519PrivateKey.generate()
            secret = ephemeral_x.exchange(public)
            raw = ephemeral_x.public_key().public_bytes(_Encoding.Raw, _PublicFormat.Raw)
            originator = der.seq(der.algorithm(oids.X25519), der.bit_string(raw))
            scheme = kdf.scheme_by_name(self.kdf or "hkdf-sha256")
        else:
            raise UnsupportedAlgorithmError("key agreement needs a P-256 or X25519 certificate")
        wrap_oid = ciphers.WRAP_BY_NAME.get(self.wrap)
        if wrap_oid is None:
            raise UnsupportedAlgorithmError(f"unknown key wrap {self.wrap!r}")
        kek_bytes = ciphers.kek_bytes_for_wrap(wrap_oid)
        wrap_alg = der.algorithm(wrap_oid)
        info = kdf.shared_info(wrap_alg, self.ukm, kek_bytes)
        kek = kdf.derive_kek(scheme, secret, info, kek_bytes)
        if self.use_ski:
            rid = der.tlv(der.context(0, True), der.octet_string(subject_key_identifier(self.certificate)))
        else:
            rid = issuer_and_serial(self.certificate)
        parts = [der.enc_integer(3), der.explicit(0, der.implicit(1, originator))]
        if self.ukm is not None:
            parts.append(der.explicit(1, der.octet_string(self.ukm)))
        parts.append(der.algorithm(scheme.oid, wrap_alg))
        parts.append(der.seq(der.seq(rid, der.octet_string(ciphers.wrap_key(kek, cek)))))
        return der.tlv(der.context(1, True), b"".join(parts))


@dataclass(frozen=True, repr=False)
class SharedKEK:
    """A pre-shared key-encryption key with its identifier (kekri).

    Used both to build a kekri and, on the opening side, as our own key.
    """

    key_id: bytes
    kek: bytes
    version: int = field(default=4, init=False)

    def __post_init__(self) -> None:
        ciphers.wrap_oid_for_kek(self.kek)  # validates the length
        if not self.key_id:
            raise ValueError("a KEK needs a non-empty identifier")

    def __repr__(self) -> str:  # never show the key itself
        return f"SharedKEK(key_id={self.key_id.hex()})"

    def build(self, cek: bytes) -> bytes:
        wrapped = ciphers.wrap_key(self.kek, cek)
        return der.tlv(der.context(2, True), b"".join([
            der.enc_integer(4), der.seq(der.octet_string(self.key_id)),
            der.algorithm(ciphers.wrap_oid_for_kek(self.kek)), der.octet_string(wrapped)]))


@dataclass(frozen=True, repr=False)
class KekLookup:
    """An opening key that finds KEKs while the envelope is opened.

    ``lookup(key_id)`` returns the KEK for a kekri identifier, or None.  A
    receiver with many kept keys (a proxy's CEK cache) passes one of these
    instead of scanning the envelope for identifiers first.
    """

    lookup: Callable[[bytes], bytes | None]

    def __repr__(self) -> str:
        return "KekLookup()"


def reuse_kek(previous_cek: bytes, reference: bytes) -> SharedKEK:
    """The kekri recipient for a message sent under a reused CEK (RFC 3185).

    The KEK is the earlier message's CEK with its bytes reversed, and its
    identifier is the earlier message's CEKReference.
    """
    return SharedKEK(key_id=reference, kek=previous_cek[::-1])


Recipient = KeyTransRecipient | KeyAgreeRecipient | SharedKEK


def recipient_for_certificate(cert: x509.Certificate, *, oaep: bool = False, use_ski: bool = False,
                              kdf_name: str | None = None, ukm: bytes | None = None) -> Recipient:
    """Pick ktri for RSA and kari for P-256 / X25519 certificates."""
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        return KeyTransRecipient(cert, oaep=oaep, use_ski=use_ski)
    if isinstance(public, (ec.EllipticCurvePublicKey, x25519.X25519PublicKey)):
        return KeyAgreeRecipient(cert, kdf=kdf_name, ukm=ukm, use_ski=use_ski)
    raise UnsupportedAlgorithmError("certificate key must be RSA, P-256 or X25519")


# ------------------------------------------------------------- opening side

@dataclass(frozen=True, repr=False)
class CertificateKey:
    """Our certificate and its private key (RSA, P-256 or X25519)."""

    certificate: x509.Certificate
    private_key: object
    _issuer_der: bytes = field(init=False)
    _ski: bytes = field(init=False)
    _ias_der: bytes = field(init=False)
    # ktri implicit rejection: derived from the RSA private key on first use.
    _rejection_kdk: bytes | None = field(init=False, default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_issuer_der", self.certificate.issuer.public_bytes())
        object.__setattr__(self, "_ski", subject_key_identifier(self.certificate))
        object.__setattr__(self, "_ias_der", issuer_and_serial(self.certificate))

    def __repr__(self) -> str:
        return f"CertificateKey(subject={self.certificate.subject.rfc4514_string()!r})"

    def matches(self, rid: _RecipientId) -> bool:
        if rid.ski is not None:
            return rid.ski == self._ski
        if rid.encoded == self._ias_der:
            return True
        return rid.serial == self.certificate.serial_number and rid.issuer_der == self._issuer_der


OpeningKey = CertificateKey | SharedKEK | KekLookup


@dataclass(frozen=True)
class RecipientSummary:
    """What a RecipientInfo says about itself (never key material)."""

    kind: str                    # "ktri", "kari", "kekri", "pwri", "ori"
    identifier: str              # "issuer-serial=..", "ski=..", "kekid=.."
    key_algorithm: str           # readable algorithm name
    wrap_algorithm: str | None = None


class _KtriParsed(NamedTuple):
    rid: _RecipientId
    algorithm: der.TLV
    encrypted_key: bytes


def _parse_ktri(tlv: der.TLV) -> _KtriParsed:
    fields = der.items(tlv, 4, "KeyTransRecipientInfo")
    rid_tlv = fields[1]
    if rid_tlv.tag == der.context(0, False):
        rid = _RecipientId(ski=rid_tlv.value)
    else:
        rid = _parse_issuer_serial(rid_tlv.expect(der.SEQUENCE, "rid"))
    return _KtriParsed(rid, fields[2].expect(der.SEQUENCE, "keyEncryptionAlgorithm"),
                       der.octets(fields[3].expect(der.OCTET_STRING, "encryptedKey")))


class _KariParsed(NamedTuple):
    originator_alg: str
    originator_key: bytes
    ukm: bytes | None
    scheme_oid: str
    wrap_alg: der.TLV
    keys: list[tuple[_RecipientId, bytes]]


def _parse_kari(tlv: der.TLV) -> _KariParsed:
    fields = der.items(tlv, 4, "KeyAgreeRecipientInfo")
    originator = der.items(fields[1].expect(der.context(0), "originator"), 1, "originator")[0]
    if originator.tag != der.context(1):
        raise UnsupportedAlgorithmError("static-static key agreement (no originator key) is not supported")
    okey = der.items(originator, 2, "OriginatorPublicKey")
    orig_alg = der.oid(der.items(okey[0].expect(der.SEQUENCE, "algorithm"), 1)[0])
    orig_key = der.bit_string_bytes(okey[1])
    idx, ukm = 2, None
    if fields[2].tag == der.context(1):
        ukm = der.octets(der.items(fields[2], 1, "ukm")[0].expect(der.OCTET_STRING, "ukm"))
        idx = 3
    if len(fields) < idx + 2:
        raise MalformedError("KeyAgreeRecipientInfo: too few fields")
    alg = der.items(fields[idx].expect(der.SEQUENCE, "keyEncryptionAlgorithm"), 2, "key agreement algorithm")
    keys = []
    for rek in fields[idx + 1].expect(der.SEQUENCE, "recipientEncryptedKeys").children():
        rid_tlv, enc = der.items(rek, 2, "RecipientEncryptedKey")[:2]
        if rid_tlv.tag == der.context(0):
            rid = _RecipientId(ski=der.octets(der.items(rid_tlv, 1, "rKeyId")[0].expect(der.OCTET_STRING, "ski")))
        else:
            rid = _parse_issuer_serial(rid_tlv.expect(der.SEQUENCE, "rid"))
        keys.append((rid, der.octets(enc.expect(der.OCTET_STRING, "encryptedKey"))))
    return _KariParsed(orig_alg, orig_key, ukm, der.oid(alg[0]), alg[1].expect(der.SEQUENCE, "wrap"), keys)


class _KekriParsed(NamedTuple):
    key_id: bytes
    wrap_oid: str
    encrypted_key: bytes


def _parse_kekri(tlv: der.TLV) -> _KekriParsed:
    fields = der.items(tlv, 4, "KEKRecipientInfo")
    kekid = der.items(fields[1].expect(der.SEQUENCE, "kekid"), 1, "KEKIdentifier")[0]
    wrap = der.items(fields[2].expect(der.SEQUENCE, "keyEncryptionAlgorithm"), 1)[0]
    return _KekriParsed(der.octets(kekid.expect(der.OCTET_STRING, "keyIdentifier")), der.oid(wrap),
                        der.octets(fields[3].expect(der.OCTET_STRING, "encryptedKey")))


KIND_BY_TAG = {der.SEQUENCE: "ktri", der.context(1): "kari", der.context(2): "kekri",
               der.context(3): "pwri", der.context(4): "ori"}


def addressed_only_to(recipient_infos: Sequence[der.TLV],
                      certificates: Sequence[x509.Certificate]) -> bool:
    """Whether every recipient key of ``recipient_infos`` names one of ``certificates``
    (issuer and serial, or SKI); a kekri or any other kind names none of them."""
    named = [CertificateKey(cert, None) for cert in certificates]
    for tlv in recipient_infos:
        kind = KIND_BY_TAG.get(tlv.tag)
        if kind == "ktri":
            rids = [_parse_ktri(tlv).rid]
        elif kind == "kari":
            rids = [rid for rid, _ in _parse_kari(tlv).keys]
        else:
            return False
        if not all(any(key.matches(rid) for key in named) for rid in rids):
            return False
    return True


def summarize(tlv: der.TLV) -> list[RecipientSummary]:
    """Describe a RecipientInfo (one entry per recipient key it carries)."""
    kind = KIND_BY_TAG.get(tlv.tag)
    if kind == "ktri":
        p = _parse_ktri(tlv)
        alg = der.oid(der.items(p.algorithm, 1)[0])
        return [RecipientSummary("ktri", p.rid.describe(), oids.name_of(alg))]
    if kind == "kari":
        k = _parse_kari(tlv)
        wrap = oids.name_of(der.oid(der.items(k.wrap_alg, 1)[0]))
        scheme = oids.name_of(k.scheme_oid)
        return [RecipientSummary("kari", rid.describe(), f"{oids.name_of(k.originator_alg)}/{scheme}", wrap)
                for rid, _ in k.keys]
    if kind == "kekri":
        e = _parse_kekri(tlv)
        return [RecipientSummary("kekri", f"kekid={e.key_id.hex()}", oids.name_of(e.wrap_oid),
                                 oids.name_of(e.wrap_oid))]
    if kind is None:
        raise MalformedError("unknown RecipientInfo choice")
    return [RecipientSummary(kind, "-", "unsupported")]


class Unwrapped(NamedTuple):
    """The content key recovered for one of our keys, and how (internal: never logged)."""

    cek: bytes
    summary: RecipientSummary
    key: OpeningKey

    def __repr__(self) -> str:  # the CEK never reaches a log
        return f"Unwrapped({self.summary.kind} {self.summary.identifier})"


class Match:
    """A RecipientInfo addressed to one of our keys, found without any key operation.

    ``unwrap(cek_bytes)`` does the work (an RSA decryption or an ECDH exchange is
    counted against the message budget first, see ``budget.spend``) and raises
    ``DecryptionError`` when it does not give a key.
    """

    __slots__ = ("_unwrap",)

    def __init__(self, unwrap: Callable[[int], Unwrapped]) -> None:
        self._unwrap = unwrap

    def __repr__(self) -> str:
        return "Match()"

    def unwrap(self, cek_bytes: int) -> Unwrapped:
        return self._unwrap(cek_bytes)


def match(tlv: der.TLV, keys: list[OpeningKey]) -> Match | None:
    """Whether this RecipientInfo is addressed to one of ``keys`` (None: to someone else).

    Only parsing and identifier comparison (and, for a ``KekLookup``, the lookup):
    no public-key work.  Algorithms we cannot use for a key of ours raise
    ``UnsupportedAlgorithmError`` here, before anything is spent.
    """
    kind = KIND_BY_TAG.get(tlv.tag)
    if kind == "ktri":
        return _match_ktri(_parse_ktri(tlv), keys)
    if kind == "kari":
        return _match_kari(_parse_kari(tlv), keys)
    if kind == "kekri":
        return _match_kekri(_parse_kekri(tlv), keys)
    if kind is None:
        raise MalformedError("unknown RecipientInfo choice")
    return None  # pwri / ori: never ours


def try_open(tlv: der.TLV, keys: list[OpeningKey], cek_bytes: int) -> Unwrapped | None:
    """Recover the CEK from this RecipientInfo if it is addressed to one of ``keys``.

    Returns None when it is addressed to someone else.  Raises
    ``DecryptionError`` when it is ours but the key does not open it.  Must run
    inside a ``budget_scope`` (``open_envelope`` opens one).
    """
    found = match(tlv, keys)
    return None if found is None else found.unwrap(cek_bytes)


# -- ktri: RSA key transport ---------------------------------------------------------

_REJECTION_LABEL = b"e2m-plugins ktri implicit rejection v1"


def _rejection_key(key: CertificateKey, private: rsa.RSAPrivateKey) -> bytes:
    """A secret only the private key gives, kept on ``key`` after the first use."""
    kdk = key._rejection_kdk
    if kdk is None:
        numbers = private.private_numbers()
        size = (private.key_size + 7) // 8
        kdk = hmac.digest(_REJECTION_LABEL, numbers.d.to_bytes(size, "big"), "sha256")
        object.__setattr__(key, "_rejection_kdk", kdk)
    return kdk


def _implicit_rejection_cek(kdk: bytes, encrypted_key: bytes, cek_bytes: int) -> bytes:
    """The CEK used when the RSA block is not a CEK: HMAC-SHA256 under a secret of the
    private key, over the encryptedKey.  The same query always gives the same (wrong)
    key, as RSA implicit rejection does (draft-irtf-cfrg-rsa-guidance), so asking
    twice tells an attacker nothing, and nobody without the private key can predict it."""
    out = b""
    counter = 0
    while len(out) < cek_bytes:
        out += hmac.digest(kdk, bytes([counter, cek_bytes]) + encrypted_key, "sha256")
        counter += 1
    return out[:cek_bytes]


def _match_ktri(p: _KtriParsed, keys: list[OpeningKey]) -> Match | None:
    for key in keys:
        if not isinstance(key, CertificateKey) or not key.matches(p.rid):
            continue
        private = key.private_key
        if not isinstance(private, rsa.RSAPrivateKey):
            raise UnsupportedAlgorithmError("key transport recipient needs an RSA private key")
        alg_fields = der.items(p.algorithm, 1, "keyEncryptionAlgorithm")
        alg_oid = der.oid(alg_fields[0])
        if alg_oid == oids.RSA_ENCRYPTION:
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
        elif alg_oid == oids.RSAES_OAEP:
            pad = _oaep_padding(alg_fields[1] if len(alg_fields) > 1 else None)
        else:
            raise UnsupportedAlgorithmError(f"key transport {oids.name_of(alg_oid)} is not supported")
        summary = RecipientSummary("ktri", p.rid.describe(), oids.name_of(alg_oid))
        return Match(lambda cek_bytes, key=key, private=private, pad=pad, summary=summary:
                     _unwrap_ktri(p, key, private, pad, summary, cek_bytes))
    return None


def _unwrap_ktri(p: _KtriParsed, key: CertificateKey, private: rsa.RSAPrivateKey,
                 pad: padding.AsymmetricPadding, summary: RecipientSummary, cek_bytes: int) -> Unwrapped:
    # Bleichenbacher / Manger defence (RFC 3218): a failed RSA decryption goes on
    # with a CEK of the right length, so it fails later exactly like a wrong key
    # or a tampered ciphertext would, with the same error and similar time.  That
    # CEK is derived before decrypting, whatever happens (the same work either
    # way), and is deterministic per (private key, encryptedKey).  OpenSSL 3.2+
    # does its own implicit rejection for PKCS#1 v1.5 (a synthetic message, also
    # deterministic); older ones raise.  Either way the answer to a query never
    # varies.
    spend("rsa-decrypt")
    fallback = _implicit_rejection_cek(_rejection_key(key, private), p.encrypted_key, cek_bytes)
    try:
        cek = private.decrypt(p.encrypted_key, pad)
    except ValueError:
        cek = b""
    if len(cek) != cek_bytes:
        cek = fallback
    return Unwrapped(cek, summary, key)


def _oaep_padding(params: der.TLV | None) -> padding.OAEP:
    hash_oid, mgf_hash_oid = oids.SHA1, oids.SHA1
    if params is not None and params.tag == der.SEQUENCE:
        for item in params.children():
            inner = der.items(item, 1, "RSAES-OAEP-params")[0]
            if item.tag == der.context(0):
                hash_oid = der.oid(der.items(inner, 1)[0])
            elif item.tag == der.context(1):
                mgf = der.items(inner, 2, "maskGenAlgorithm")
                if der.oid(mgf[0]) != oids.MGF1:
                    raise UnsupportedAlgorithmError("only MGF1 is supported for OAEP")
                mgf_hash_oid = der.oid(der.items(mgf[1], 1)[0])
            elif item.tag == der.context(2):
                source = der.items(inner, 1, "pSourceAlgorithm")
                label = der.octets(source[1]) if len(source) > 1 else b""
                if der.oid(source[0]) != oids.P_SPECIFIED or label:
                    raise UnsupportedAlgorithmError("OAEP labels are not supported")
    if hash_oid not in _OAEP_HASHES or mgf_hash_oid not in _OAEP_HASHES:
        raise UnsupportedAlgorithmError("unsupported OAEP hash")
    return padding.OAEP(padding.MGF1(_OAEP_HASHES[mgf_hash_oid]()), _OAEP_HASHES[hash_oid](), None)


# -- kari: ECDH key agreement ----------------------------------------------------------

def _match_kari(k: _KariParsed, keys: list[OpeningKey]) -> Match | None:
    for rid, wrapped in k.keys:
        for key in keys:
            if not isinstance(key, CertificateKey) or not key.matches(rid):
                continue
            if not isinstance(key.private_key, (x25519.X25519PrivateKey, ec.EllipticCurvePrivateKey)):
                raise UnsupportedAlgorithmError(
                    "key agreement recipient needs a P-256 or X25519 private key")
            scheme = kdf.scheme_by_oid(k.scheme_oid)
            wrap_oid = der.oid(der.items(k.wrap_alg, 1)[0])
            kek_bytes = ciphers.kek_bytes_for_wrap(wrap_oid)
            summary = RecipientSummary("kari", rid.describe(),
                                       f"{oids.name_of(k.originator_alg)}/{oids.name_of(k.scheme_oid)}",
                                       oids.name_of(wrap_oid))
            return Match(lambda cek_bytes, key=key, wrapped=wrapped, scheme=scheme, kek_bytes=kek_bytes,
                         summary=summary: _unwrap_kari(k, key, wrapped, scheme, kek_bytes, summary))
    return None


def _unwrap_kari(k: _KariParsed, key: CertificateKey, wrapped: bytes, scheme: kdf.KdfScheme,
                 kek_bytes: int, summary: RecipientSummary) -> Unwrapped:
    spend("ecdh")
    secret = _ecdh(key.private_key, k.originator_alg, k.originator_key)
    # SharedInfo repeats the wrap AlgorithmIdentifier exactly as sent.
    info = kdf.shared_info(k.wrap_alg.encoded, k.ukm, kek_bytes)
    kek = kdf.derive_kek(scheme, secret, info, kek_bytes)
    return Unwrapped(ciphers.unwrap_key(kek, wrapped), summary, key)


def _ecdh(private: object, originator_alg: str, originator_key: bytes) -> bytes:
    try:
        if isinstance(private, x25519.X25519PrivateKey):
            if originator_alg != oids.X25519:
                raise DecryptionError()
            return private.exchange(x25519.X25519PublicKey.from_public_bytes(originator_key))
        if isinstance(private, ec.EllipticCurvePrivateKey):
            if originator_alg != oids.EC_PUBLIC_KEY:
                raise DecryptionError()
            peer = ec.EllipticCurvePublicKey.from_encoded_point(private.curve, originator_key)
            return private.exchange(ec.ECDH(), peer)
    except ValueError:
        # An invalid point or an all-zero X25519 result: treat like a wrong key.
        raise DecryptionError() from None
    raise UnsupportedAlgorithmError("key agreement recipient needs a P-256 or X25519 private key")


# -- kekri: a shared (or kept) key-encryption key ---------------------------------------

def _match_kekri(e: _KekriParsed, keys: list[OpeningKey]) -> Match | None:
    for key in keys:
        kek = None
        if isinstance(key, SharedKEK) and key.key_id == e.key_id:
            kek = key.kek
        elif isinstance(key, KekLookup):
            kek = key.lookup(e.key_id)
        if kek is not None:
            summary = RecipientSummary("kekri", f"kekid={e.key_id.hex()}",
                                       oids.name_of(e.wrap_oid), oids.name_of(e.wrap_oid))
            return Match(lambda cek_bytes, key=key, kek=kek, summary=summary:
                         _unwrap_kekri(e, key, kek, summary))
    return None


def _unwrap_kekri(e: _KekriParsed, key: OpeningKey, kek: bytes, summary: RecipientSummary) -> Unwrapped:
    if ciphers.kek_bytes_for_wrap(e.wrap_oid) != len(kek):
        raise DecryptionError()
    return Unwrapped(ciphers.unwrap_key(kek, e.encrypted_key), summary, key)
