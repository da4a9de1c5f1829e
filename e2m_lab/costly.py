"""Hostile SIP messages built to cost a receiver as much as they can (issue 12, item 10).

``bench/test_hostile_cost.py`` times ``ProxyEngine.inspect`` and ``UAEngine.open`` on
each of these against a normal signed and encrypted MESSAGE; this module only builds
them, with the project's own code wherever the shape allows (``seal``, ``sign``,
``protect_content``, ``mime``, ``make_request``) and raw DER where no builder would
make the shape.

Every shape is one SIP request filled to one of two sizes:

* ``udp``: the whole message in one UDP datagram (65,507 octets, the most an IPv4
  datagram carries);
* ``tcp``: a body of at most 256 KiB (``Limits.max_body_bytes``; 512 octets less, see
  ``_SIZES``) in a message of at most 320 KiB (``sip.DEFAULT_MAX_SIZE``), the most the
  core accepts on a stream.

A builder takes a count (parts, elements, headers...) and ``_fill`` finds the largest
count that fits.  Unless a shape says ``insider``, nothing in it needs a key or a
certificate of ours: an off-path stranger knows the public certificates of the proxy
and of bob (a 493 or 496 answer hands them out), can write any From, and can sign with
keys and certificates it made itself.  The messages are MESSAGEs from "alice" to bob
(From spoofed) unless a shape needs an INVITE, labelled ``Proxy-Required-Body`` for
the proxy, which therefore opens them whatever its own policy says.

=============================  ===========================================================
shape                          what it is (and where the work goes)
=============================  ===========================================================
``kekri-lookups-via``          16 parts x 16 kekri with unknown key ids; the rest of the
                               datagram is Via headers (UDP only: over TCP the layered
                               shape below costs twice as much).  The proxy looks every kekri up
                               in its key cache, and each lookup works out the message's
                               transaction scope, which splits every Via character by
                               character (``message_scope`` -> ``via_branch``).
``kekri-lookups-via-layers``   the same with 10 parts (8 over UDP), each 4 envelopes
                               deep: the 3 outer ones hold 14 kekri, then the proxy's and
                               bob's RecipientInfos, which open them; the innermost 16
                               kekri.  30 of the 32 public-key operations, 580 lookups.
``signed-attrs-ber``           multipart/signed with a SignedData in BER, every length
                               indefinite, whose one signed attribute has as many NULL
                               values as fit; the signer certificate (self-made) is
                               there, the message digest is wrong, and the signed part
                               has bare LF line ends, so it is verified twice (as
                               received, then in canonical form).  asn1crypto re-scans
                               each indefinite element once per enclosing level.
``signer-name-reencoded``      the same, the bulk in the SignerInfo's issuer name
                               instead (one RDN repeating the CN of the stranger's
                               certificate), whose length octets end in 0x80: asn1crypto
                               takes that for an indefinite length and re-encodes the
                               whole name on ``dump()``.
``certificates-ber``           a SignedData (BER) whose certificate set holds as many
                               empty elements as fit (counted only after all are parsed).
``signer-infos-ber``           the same for the SignerInfo set.
``crls-ber``                   the same bulk in the ``crls`` field (never read, only
                               re-scanned), verified twice as in ``signed-attrs-ber``.
``sip-context-readers``        an envelope for the proxy and bob whose authenticated
                               e2m-sip-context lists as many (empty) readers as fit: it
                               is read whole before the 16-reader limit is checked.
``envelope-ber-parts``         16 parts, each an AuthEnvelopedData in BER (indefinite
                               lengths, encryptedContent in empty segments) near the
                               4096-element limit, for carol (no recipient for us).
``recipients-parts-layers``    16 parts x 4 nested envelopes x up to 16 RecipientInfos
                               for our keys (ktri for RSA, kari for P-256); each layer
                               opens but the innermost: a part that fails is skipped and
                               the next one tried, until the public-key budget stops it.
``lookalike-cas``              signed by the stranger's own key (a valid signature), its
                               certificate "issued" by our CA's name with an RSA
                               signature of 1024 octets; 15 CA certificates with that
                               name and RSA-8192 keys, e = 2^32 - 1 (the largest
                               accepted), are each tried on the path: 16 operations.
``rsa-8192-signer``            a signer certificate with an RSA-8192 key, e = 2^32 - 1,
                               and signed attributes out of DER order, so the signature
                               is checked twice (as sent and sorted).
``huge-san-unreadable``        the signer certificate cryptography cannot read (two
                               SKIs) with as many SAN entries as fit (issue 12: .native
                               over 128 k entries); now refused by size.
``combining-mark-issuer``      the SignerInfo names an issuer "a" + combining marks, and
                               16 certificates carry the matching serial (issue 12: RFC
                               4518 preparation, quadratic, 16 times).
``lookalike-paths-expired``    review 103, hole 1: signed by the stranger's own leaf (a
                               valid signature); 5 levels of 2 CA certificates sharing a
                               P-256 key per level (2^5 paths), the last issued by a name
                               Y of n RDNs, and 5 expired CA certificates whose subject is
                               Y: every path visits every expired look-alike.  Refused
                               when read (Y over 32 attributes, the certificates over 512
                               DER elements: 413) since stop 37.
``lookalike-paths-at-bound``   the same with Y of 32 RDNs, the most a name may have: read,
                               then the path walk stops at the 65th candidate visited
                               (``max_path_checks``), each expired look-alike's problem
                               decided once and none rendered but the one reported.
``long-named-certificates``    review 103, hole 2: 15 certificates whose subject and issuer
                               have n RDNs each (at most 16 KiB a certificate), and a
                               SignerInfo naming none of them.  Refused when read (413).
``long-names-at-bound``        the same with names of 32 RDNs (read, then 403: the signer
                               is not there).
``many-signers``               insider: carol (a user of our CA) signs 8 SignerInfos,
                               each verified with its path, then she is not the sender.
``many-labels``                Proxy-Required-Body headers naming other hosts fill the
                               message; the body is the stranger's unsigned envelope for
                               the proxy and bob, bound to the message (both refuse it,
                               495, once they have read the labels and opened it).
``many-policies``              an INVITE: Proxy-Body-Policy headers for hosts of our
                               domain fill the message (bob parses them twice and learns
                               them, for that dialog); body as above.
``long-via``                   Via headers fill the message; body as above.
``sdp-media-lines``            an INVITE whose (unsigned, bound) SDP for the proxy and
                               bob is as long as fits: a proxy that took it would
                               summarise its media; the stranger's is refused first.
=============================  ===========================================================
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2m_plugins import headers as hdr
from e2m_plugins import mime, sip
from e2m_plugins.body import protect_content, with_entity
from e2m_plugins.cms import ciphers, der, oids
from e2m_plugins.cms.envelope import Attribute
from e2m_plugins.cms.limits import DEFAULT_LIMITS
from e2m_plugins.cms.recipients import KeyTransRecipient, recipient_for_certificate
from e2m_plugins.cms.signed import sign
from e2m_plugins.sipcontext import context_for
from e2m_plugins.testpki import TestPKI

from .flows import SDP_OFFER, TRUSTED

__all__ = ["Shape", "TRANSPORTS", "SHAPES", "build", "UDP_DATAGRAM", "TCP_MESSAGE", "BODY_LIMIT"]

UDP_DATAGRAM = 65_507                       # IPv4: 65,535 - 8 (UDP) - 20 (IP)
TCP_MESSAGE = sip.DEFAULT_MAX_SIZE          # what sip.parse takes on a stream (320 KiB)
BODY_LIMIT = DEFAULT_LIMITS.max_body_bytes  # 256 KiB
TRANSPORTS = ("udp", "tcp")
# A multipart/signed is opened as an entity, its own headers put back in front of the
# body: a body of exactly 256 KiB is then refused by size before any work.  512 octets
# leave room for them.
_SIZES = {"udp": (UDP_DATAGRAM, UDP_DATAGRAM), "tcp": (TCP_MESSAGE, BODY_LIMIT - 512)}

MAX_PARTS = 16                  # mime.MimeLimits.max_parts
MAX_RECIPIENTS = DEFAULT_LIMITS.max_recipients
MAX_LAYERS = DEFAULT_LIMITS.max_nesting_depth
_HEADER_LINE = 8000             # under sip.DEFAULT_MAX_LINE (8 KiB) with the name
_BULK_OID = "1.3.6.1.4.1.55555.1"
_BARE_LF_TEXT = b"Content-Type: text/plain\n\nhostile text, bare LF line ends\n"
_INNER = b"Content-Type: text/plain\r\n\r\nhostile"
_NOW = datetime.now(timezone.utc)
# Parts of kekri-lookups-via-layers: each opens 3 envelopes, so 10 parts spend 30 of the
# 32 public-key operations; over UDP, lookups x Via octets is largest with 8.
_LAYERED_PARTS = {"udp": 8, "tcp": 10}


@dataclass(frozen=True, repr=False)
class Shape:
    """One hostile request, as the bytes a receiver gets."""

    name: str
    transport: str              # "udp" or "tcp"
    who: str                    # "stranger" or "insider"
    what: str
    count: int                  # the filled count (parts, elements, headers...)
    raw: bytes

    @property
    def key(self) -> str:
        return f"{self.name}/{self.transport}"

    def __repr__(self) -> str:
        return f"Shape({self.key}, {len(self.raw)} bytes, count={self.count})"


# -- the stranger's own material -------------------------------------------------------

def _ec() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(subject: x509.Name, public_key, signer_key, issuer: x509.Name, *,
                 ca: bool = False, san: Sequence[x509.GeneralName] = ()) -> x509.Certificate:
    """A certificate as the stranger makes it (valid for a month, digitalSignature)."""
    usage = dict(digital_signature=True, content_commitment=False, key_encipherment=False,
                 data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                 encipher_only=False, decipher_only=False)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(_NOW - timedelta(days=1))
               .not_valid_after(_NOW + timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(**usage), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
    return builder.sign(signer_key, hashes.SHA256())


def _der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _rsa_8192_public(exponent: int = 2**32 - 1) -> rsa.RSAPublicKey:
    """An RSA-8192 public key nobody holds the private key of (a random odd modulus):
    checking a signature with it costs what it costs with a real one."""
    n = secrets.randbits(8192) | (1 << 8191) | 1
    return rsa.RSAPublicNumbers(exponent, n).public_key()


class _Stranger:
    """What an off-path stranger brings: a key pair and a certificate it made itself,
    and what it knows of us (the public certificates of the proxy and of bob)."""

    def __init__(self, pki: TestPKI, host: str) -> None:
        self.pki, self.host = pki, host
        self.key = _ec()
        self.cert = _certificate(_name("stranger"), self.key.public_key(), self.key,
                                 _name("stranger"),
                                 san=[x509.UniformResourceIdentifier(pki.aor("alice"))])

    @cached_property
    def readers(self) -> list:
        """RecipientInfo builders for the proxy and bob (ktri or kari, by their keys)."""
        return [recipient_for_certificate(self.pki.proxy(self.host).cert),
                recipient_for_certificate(self.pki.user("bob").cert)]

    @cached_property
    def carol(self):
        return self.pki.user("carol")


# -- BER and DER ---------------------------------------------------------------------------

def _ber(tag: int, *parts: bytes) -> bytes:
    """A constructed element with an indefinite length (BER)."""
    return bytes([tag, 0x80]) + b"".join(parts) + b"\x00\x00"


def _tlv(tag: int, *parts: bytes) -> bytes:
    return der.tlv(tag, b"".join(parts))


def _length_ending_in_0x80(tag: int, contents: Callable[[int], bytes], count: int) -> bytes:
    """``tag`` around ``contents(c)`` for ``count`` or a little more, the first whose
    last length octet is 0x80: asn1crypto takes that for an indefinite length, and
    re-encodes the element and everything in it whenever it is dumped."""
    for c in range(count, count + 256):
        body = contents(c)
        if len(body) > 0xFF and len(body) % 256 == 0x80:
            return der.tlv(tag, body)
    raise AssertionError("no count gives a length ending in 0x80")


_SHA256_ALG = der.seq(der.enc_oid(oids.SHA256))
_ECDSA_SHA256_ALG = der.seq(der.enc_oid(oids.ECDSA_WITH_SHA256))


def _attribute(oid: str, *values: bytes) -> bytes:
    return der.seq(der.enc_oid(oid), der.tlv(der.SET, b"".join(values)))


def _signer_info(issuer_der: bytes, serial: int, attrs: bytes, *,
                 sig_alg: bytes = _ECDSA_SHA256_ALG,
                 signature: bytes = b"\x30\x06\x02\x01\x01\x02\x01\x01",
                 indefinite: bool = False) -> bytes:
    wrap = _ber if indefinite else _tlv
    return wrap(der.SEQUENCE, der.enc_integer(1), der.seq(issuer_der, der.enc_integer(serial)),
                _SHA256_ALG, wrap(der.context(0), attrs), sig_alg, der.octet_string(signature))


def _signed_data(signer_infos: bytes, *, certificates: bytes = b"", content: bytes | None = None,
                 crls: bytes | None = None, indefinite: bool = False) -> bytes:
    """ContentInfo(SignedData) around ready-made parts (the encapsulated content is
    data, detached when ``content`` is None)."""
    wrap = _ber if indefinite else _tlv
    encap = der.seq(der.enc_oid(oids.DATA), *(() if content is None else
                                              (der.explicit(0, der.octet_string(content)),)))
    fields = [der.enc_integer(1), der.tlv(der.SET, _SHA256_ALG), encap]
    if certificates:
        fields.append(wrap(der.context(0), certificates))
    if crls is not None:
        fields.append(wrap(der.context(1), crls))
    fields.append(wrap(der.SET, signer_infos))
    return wrap(der.SEQUENCE, der.enc_oid(oids.SIGNED_DATA), wrap(der.context(0),
                                                                  wrap(der.SEQUENCE, *fields)))


def _wrong_digest_attrs(bulk: bytes = b"") -> bytes:
    """content-type data, a message-digest that matches nothing, then ``bulk``."""
    return (_attribute(oids.CONTENT_TYPE_ATTR, der.enc_oid(oids.DATA))
            + _attribute(oids.MESSAGE_DIGEST_ATTR, der.octet_string(bytes(32))) + bulk)


def _auth_enveloped(content: bytes, infos: Sequence[bytes], cek: bytes, *,
                    content_type: str = oids.DATA, auth_attrs: Sequence[Attribute] = ()) -> bytes:
    """AuthEnvelopedData (AES-128-GCM) with the RecipientInfos in the order given
    (``seal`` sorts its SET, as DER wants; an attacker need not)."""
    attrs = list(auth_attrs)
    if content_type != oids.DATA:
        attrs.insert(0, Attribute(oids.CONTENT_TYPE_ATTR, (der.enc_oid(content_type),)))
    auth = der.set_of(*(a.encode() for a in attrs)) if attrs else None
    enc = ciphers.encrypt_content(ciphers.cipher_by_name("aes-128-gcm"), cek, content, aad=auth)
    body = [der.enc_integer(0), der.tlv(der.SET, b"".join(infos)),
            der.seq(der.enc_oid(content_type), enc.algorithm_der,
                    der.tlv(der.context(0, False), enc.ciphertext))]
    if auth is not None:
        body.append(der.implicit(1, auth))
    body.append(der.octet_string(enc.mac))
    return der.seq(der.enc_oid(oids.AUTH_ENVELOPED_DATA), der.explicit(0, der.seq(*body)))


def _garbled(info: bytes) -> bytes:
    """The same RecipientInfo with the last octet of its encrypted key flipped."""
    return info[:-1] + bytes([info[-1] ^ 0x01])


# -- SIP around it -----------------------------------------------------------------------

def _request(s: _Stranger, transport: str, method: str = "MESSAGE") -> sip.SipMessage:
    """A request from "alice" (spoofed) to bob, sent from 198.51.100.7 over ``transport``."""
    pki = s.pki
    headers = [("Contact", "<sip:alice@198.51.100.7:5060>")] if method == "INVITE" else []
    return sip.make_request(method, f"sip:bob@{pki.domain}", from_uri=pki.aor("alice"),
                            to_uri=pki.aor("bob"), transport=transport.upper(),
                            via_host="198.51.100.7:5060", extra_headers=headers)


def _labelled(s: _Stranger, msg: sip.SipMessage, entity: mime.MimePart,
              cid: str | None = None) -> sip.SipMessage:
    """``msg`` carrying ``entity``, labelled for the proxy (the whole body, or ``cid``)."""
    label = hdr.BodyLabel(s.host, (cid,) if cid else ())
    return with_entity(msg, entity).add(hdr.PROXY_REQUIRED_BODY,
                                        hdr.format_proxy_required_body(label))


def _smime(der_bytes: bytes, kind: str, cid: str | None = None,
           handling: str = "required") -> mime.MimePart:
    return mime.smime_entity(der_bytes, kind, content_id=cid, handling=handling)


def _parts(entities: Sequence[mime.MimePart]) -> mime.MimePart:
    return entities[0] if len(entities) == 1 else mime.multipart_mixed(list(entities))


def _bound_envelope(s: _Stranger, msg: sip.SipMessage, content_type: str, content: bytes,
                    cid: str = "body@198.51.100.7") -> mime.MimePart:
    """The stranger's body for the proxy and bob: unsigned, bound to ``msg`` (its SIP
    context in the envelope's authenticated attributes)."""
    entity, _ = protect_content(content_type, content, s.readers, content_id=cid, bind_to=msg,
                                readers=[s.host])
    return entity


def _with_lines(msg: sip.SipMessage, name: str, items: Sequence[str], *,
                after: str | None = None) -> sip.SipMessage:
    """``msg`` with ``items`` as comma lists in ``name`` headers of at most 8000 octets,
    placed after the first ``after`` header (default: at the end)."""
    lines, current = [], ""
    for item in items:
        if current and len(current) + 1 + len(item) > _HEADER_LINE:
            lines.append(current)
            current = ""
        current = f"{current},{item}" if current else item
    if current:
        lines.append(current)
    headers = list(msg.headers)
    at = len(headers)
    if after is not None:
        at = next(i for i, (n, _) in enumerate(headers) if n.lower() == after.lower()) + 1
    headers[at:at] = [(name, line) for line in lines]
    return sip.SipMessage(msg.start_line, tuple(headers), msg.body)


# -- the shapes ------------------------------------------------------------------------------

_AES128_WRAP = der.seq(der.enc_oid(oids.AES128_WRAP))
_FILLER_VIA = "SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bKv"


def _kekri(index: int) -> bytes:
    """A kekri for a key nobody kept (the shortest that parses): one key-cache lookup."""
    return der.tlv(der.context(2), der.enc_integer(4)
                   + der.seq(der.octet_string(index.to_bytes(2, "big"))) + _AES128_WRAP
                   + der.octet_string(b""))


def _kekri_parts(s: _Stranger, parts: int, layers: int) -> mime.MimePart:
    """``parts`` parts, each ``layers`` envelopes deep: the innermost holds 16 kekri
    only (no recipient for us: the part is skipped), each outer one 14 kekri, then the
    proxy's and bob's RecipientInfos, which open it."""
    entities = []
    for i in range(parts):
        content, ctype = _INNER, oids.DATA
        for layer in range(layers):
            cek = os.urandom(16)
            ours = [] if layer == 0 else [r.build(cek) for r in s.readers]
            kekri = [_kekri(k) for k in range(MAX_RECIPIENTS - len(ours))]
            content = _auth_enveloped(content, kekri + ours, cek, content_type=ctype)
            ctype = oids.AUTH_ENVELOPED_DATA
        entities.append(_smime(content, "authEnveloped-data", f"k{i}@198.51.100.7", "optional"))
    return _parts(entities)


def _kekri_lookups_via(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    msg = _labelled(s, _request(s, transport), _kekri_parts(s, MAX_PARTS, 1))
    return _with_lines(msg, "Via", [_FILLER_VIA] * n, after="Via")


def _kekri_layers_via(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    msg = _request(s, transport)
    msg = _labelled(s, msg, _kekri_parts(s, _LAYERED_PARTS[transport], MAX_LAYERS))
    return _with_lines(msg, "Via", [_FILLER_VIA] * n, after="Via")


def _multipart_signed(s: _Stranger, transport: str, signature: bytes) -> sip.SipMessage:
    """A multipart/signed whose signed part has bare LF line ends (verified twice)."""
    entity = mime.multipart_signed(_BARE_LF_TEXT, signature)
    return _labelled(s, _request(s, transport), entity)


def _signed_attrs_ber(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    bulk = _ber(der.SEQUENCE, der.enc_oid(_BULK_OID), _ber(der.SET, der.NULL_DER * n))
    info = _signer_info(s.cert.issuer.public_bytes(), s.cert.serial_number,
                        _wrong_digest_attrs(bulk), indefinite=True)
    return _multipart_signed(s, transport, _signed_data(
        info, certificates=_der_of(s.cert), indefinite=True))


def _signer_name_reencoded(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    # One RDN repeating CN=stranger: by the name key of _find_signer_cert (a set per RDN)
    # it equals the issuer of the stranger's certificate, so the signer is found and the
    # wrong digest then makes it verify twice.
    cn = der.seq(der.enc_oid("2.5.4.3"), der.tlv(der.UTF8_STRING, b"stranger"))
    issuer = _length_ending_in_0x80(der.SEQUENCE, lambda c: der.tlv(der.SET, cn * c), n)
    info = _signer_info(issuer, s.cert.serial_number, _wrong_digest_attrs())
    return _multipart_signed(s, transport, _signed_data(info, certificates=_der_of(s.cert)))


def _certificates_ber(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    info = _signer_info(s.cert.issuer.public_bytes(), s.cert.serial_number, _wrong_digest_attrs())
    return _multipart_signed(s, transport, _signed_data(
        info, certificates=b"\x30\x00" * n, indefinite=True))


def _signer_infos_ber(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    return _multipart_signed(s, transport, _signed_data(
        b"\x30\x00" * n, certificates=_der_of(s.cert), indefinite=True))


def _crls_ber(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    info = _signer_info(s.cert.issuer.public_bytes(), s.cert.serial_number, _wrong_digest_attrs(),
                        indefinite=True)
    return _multipart_signed(s, transport, _signed_data(
        info, certificates=_der_of(s.cert), crls=_ber(der.SEQUENCE, der.NULL_DER * n),
        indefinite=True))


def _sip_context_readers(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    msg = _request(s, transport)
    cid = "ctx@198.51.100.7"
    real = context_for(msg, time=_NOW.timestamp(), readers=[s.host], content_id=cid)
    fields = der.items(der.read_all(real.encode()), 11)
    value = der.seq(*(f.encoded for f in fields[:8]), der.tlv(der.SEQUENCE, b"\x0c\x00" * n),
                    *(f.encoded for f in fields[9:]))
    cek = os.urandom(16)
    data = _auth_enveloped(_INNER, [r.build(cek) for r in s.readers], cek,
                           auth_attrs=[Attribute(oids.SIP_CONTEXT, (value,))])
    return _labelled(s, msg, _smime(data, "authEnveloped-data", cid), cid)


def _envelope_ber_parts(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    carol = KeyTransRecipient(s.carol.cert)
    parts = []
    for i in range(MAX_PARTS):
        cek = os.urandom(16)
        enc = ciphers.encrypt_content(ciphers.cipher_by_name("aes-128-gcm"), cek, _INNER)
        segments = _ber(der.context(0),
                        _ber(0x24, b"\x04\x00" * n, der.octet_string(enc.ciphertext)))
        body = _ber(der.SEQUENCE, der.enc_integer(0), _ber(der.SET, carol.build(cek)),
                    _ber(der.SEQUENCE, der.enc_oid(oids.DATA), enc.algorithm_der, segments),
                    der.octet_string(enc.mac))
        data = _ber(der.SEQUENCE, der.enc_oid(oids.AUTH_ENVELOPED_DATA), _ber(der.context(0), body))
        parts.append(_smime(data, "authEnveloped-data", f"b{i}@198.51.100.7", "optional"))
    return _labelled(s, _request(s, transport), _parts(parts))


def _recipients_parts_layers(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    """``n`` RecipientInfos per layer: ours (the proxy's, bob's) first, then garbled
    copies; in the innermost layer the garbled ones come first, so it never opens."""
    parts = []
    for i in range(MAX_PARTS):
        content, ctype = _INNER, oids.DATA
        for layer in range(MAX_LAYERS):
            cek = os.urandom(16)
            good = [r.build(cek) for r in s.readers]
            bad = [_garbled(good[k % 2]) for k in range(max(0, n - 2))]
            infos = [_garbled(g) for g in good] + bad if layer == 0 else good + bad
            content = _auth_enveloped(content, infos[:max(n, 2)], cek, content_type=ctype)
            ctype = oids.AUTH_ENVELOPED_DATA
        parts.append(_smime(content, "authEnveloped-data", f"r{i}@198.51.100.7", "optional"))
    return _labelled(s, _request(s, transport), _parts(parts))


def _lookalike_cas(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    ca_name = s.pki.ca.cert.subject
    fakes = [_certificate(ca_name, _rsa_8192_public(), _ec(), ca_name, ca=True)
             for _ in range(min(n, DEFAULT_LIMITS.max_certificates - 1))]
    key = _ec()
    made = _certificate(_name("alice@example.com"), key.public_key(),
                        rsa.generate_private_key(65537, 2048), ca_name,
                        san=[x509.UniformResourceIdentifier(s.pki.aor("alice"))])
    # An RSA signature as long as the look-alikes' moduli, so that checking it against
    # each of them is a full RSA-8192 operation (it verifies under none).
    tbs, algorithm, _ = der.items(der.read_all(_der_of(made)))
    leaf = x509.load_der_x509_certificate(der.seq(
        tbs.encoded, algorithm.encoded, der.bit_string(b"\x00" + os.urandom(1023))))
    data = sign(_INNER, leaf, key, extra_certs=fakes)   # a valid signature, by its own key
    return _labelled(s, _request(s, transport), _smime(data, "signed-data"))


def _rsa_8192_signer(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    cert = _certificate(_name("stranger"), _rsa_8192_public(), s.key, _name("stranger"),
                        san=[x509.UniformResourceIdentifier(s.pki.aor("alice"))])
    digest = hashlib.sha256(_INNER).digest()
    attrs = (_attribute(oids.MESSAGE_DIGEST_ATTR, der.octet_string(digest))   # not DER order
             + _attribute(oids.CONTENT_TYPE_ATTR, der.enc_oid(oids.DATA)))
    signature = (secrets.randbits(8190) | 1).to_bytes(1024, "big")
    info = _signer_info(cert.issuer.public_bytes(), cert.serial_number, attrs,
                        sig_alg=der.algorithm(oids.SHA256_WITH_RSA, der.NULL_DER),
                        signature=signature)
    data = _signed_data(info, certificates=_der_of(cert), content=_INNER)
    return _labelled(s, _request(s, transport), _smime(data, "signed-data"))


def _huge_san_unreadable(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    base = s.cert
    san = der.seq(der.enc_oid("2.5.29.17"), der.octet_string(der.seq(b"\x82\x00" * n)))
    ski = der.seq(der.enc_oid("2.5.29.14"), der.octet_string(der.octet_string(b"\x01" * 20)))
    tbs = der.items(der.read_all(base.tbs_certificate_bytes))
    exts = der.items(der.items(tbs[-1])[0])
    tbs_der = der.seq(*(t.encoded for t in tbs[:-1]),
                      der.explicit(3, der.seq(*(e.encoded for e in exts), san, ski)))
    outer = der.items(der.read_all(_der_of(base)))
    cert = der.seq(tbs_der, outer[1].encoded, outer[2].encoded)
    info = _signer_info(base.issuer.public_bytes(), base.serial_number, _wrong_digest_attrs())
    data = _signed_data(info, certificates=cert, content=_INNER)
    return _labelled(s, _request(s, transport), _smime(data, "signed-data"))


def _combining_mark_issuer(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    alice = s.pki.user("alice").cert
    mean = ("a" + "\u0301\u0316" * n + "\ufffd").encode("utf-8")
    issuer = der.seq(der.set_of(der.seq(der.enc_oid("2.5.4.3"), der.tlv(der.UTF8_STRING, mean))))
    info = _signer_info(issuer, alice.serial_number, _wrong_digest_attrs())
    data = _signed_data(info, certificates=_der_of(alice) * DEFAULT_LIMITS.max_certificates,
                        content=_INNER)
    return _labelled(s, _request(s, transport), _smime(data, "signed-data"))


def _long_name(rdns: int) -> x509.Name:
    return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                         "a")])
                      for _ in range(rdns)])


def _ca_certificate(subject: x509.Name, issuer: x509.Name, public_key, signer_key, *,
                    expired: bool = False) -> x509.Certificate:
    start, end = ((_NOW - timedelta(days=60), _NOW - timedelta(days=30)) if expired
                  else (_NOW - timedelta(days=1), _NOW + timedelta(days=30)))
    usage = dict(digital_signature=True, content_commitment=False, key_encipherment=False,
                 data_encipherment=False, key_agreement=False, key_cert_sign=True,
                 crl_sign=True, encipher_only=False, decipher_only=False)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(**usage), critical=True)
            .sign(signer_key, hashes.SHA256()))


def _lookalike_paths(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    levels, width, expired = 5, 2, 5
    keys = [_ec() for _ in range(levels + 1)]
    names = [_name(f"level {i}") for i in range(levels)]
    long_name = _long_name(n)
    certs = []
    for i in range(levels):
        issuer = names[i + 1] if i + 1 < levels else long_name
        certs += [_ca_certificate(names[i], issuer, keys[i].public_key(), keys[i + 1])
                  for _ in range(width)]
    old = _ec()
    certs += [_ca_certificate(long_name, _name("old"), old.public_key(), old, expired=True)
              for _ in range(expired)]
    leaf_key = _ec()
    leaf = _certificate(_name("alice"), leaf_key.public_key(), keys[0], names[0],
                        san=[x509.UniformResourceIdentifier(s.pki.aor("alice"))])
    data = sign(_INNER, leaf, leaf_key, extra_certs=certs)   # a valid signature, its own
    return _labelled(s, _request(s, transport), _smime(data, "signed-data"))


def _long_named_certificates(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    key = _ec()
    certs = b"".join(_der_of(_ca_certificate(_long_name(n), _long_name(n), key.public_key(),
                                             key))
                     for _ in range(DEFAULT_LIMITS.max_certificates - 1))
    info = _signer_info(s.cert.issuer.public_bytes(), s.cert.serial_number, _wrong_digest_attrs())
    data = _signed_data(info, certificates=certs, content=_INNER)
    return _labelled(s, _request(s, transport), _smime(data, "signed-data"))


def _many_signers(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    carol = s.carol
    one = der.items(der.read_all(sign(_INNER, carol.cert, carol.key)))
    sd = der.items(der.items(one[1])[0])
    infos = der.items(sd[-1])[0].encoded * min(n, DEFAULT_LIMITS.max_signers)
    data = _signed_data(infos, certificates=_der_of(carol.cert), content=_INNER)
    return _labelled(s, _request(s, transport), _smime(data, "signed-data"))


def _hosts(n: int) -> list[str]:
    return [f"h{i}.example.com" for i in range(n)]


def _many_labels(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    msg = _request(s, transport)
    entity = _bound_envelope(s, msg, "text/plain", b"hostile")
    msg = _labelled(s, msg, entity, entity.content_id)
    return _with_lines(msg, hdr.PROXY_REQUIRED_BODY, [f'{h};cid="c@x"' for h in _hosts(n)])


def _many_policies(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    msg = _request(s, transport, "INVITE")
    entity = _bound_envelope(s, msg, "application/sdp", SDP_OFFER)
    msg = _labelled(s, msg, entity, entity.content_id)
    rules = '"MESSAGE:*,INVITE:application/sdp,UPDATE:application/sdp"'
    return _with_lines(msg, hdr.PROXY_BODY_POLICY,
                       [f"{h};view={rules};verify={rules};expires=3600" for h in _hosts(n)])


def _long_via(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    msg = _request(s, transport)
    entity = _bound_envelope(s, msg, "text/plain", b"hostile")
    msg = _labelled(s, msg, entity, entity.content_id)
    return _with_lines(msg, "Via", [_FILLER_VIA] * n, after="Via")


def _sdp_media_lines(s: _Stranger, transport: str, n: int) -> sip.SipMessage:
    msg = _request(s, transport, "INVITE")
    head, media = SDP_OFFER.split(b"m=", 1)
    lines = b"".join(b"a=x:%d\r\n" % i for i in range(n))
    entity = _bound_envelope(s, msg, "application/sdp", head + b"m=" + media + lines)
    return _labelled(s, msg, entity, entity.content_id)


# name -> (builder, who, the transports it is built for, what it is in one line)
_Builder = Callable[[_Stranger, str, int], sip.SipMessage]
SHAPES: dict[str, tuple[_Builder, str, tuple[str, ...], str]] = {
    "kekri-lookups-via": (_kekri_lookups_via, "stranger", ("udp",),   # tcp: see -layers
                          "16 parts x 16 kekri (unknown ids), the rest Via headers"),
    "kekri-lookups-via-layers": (_kekri_layers_via, "stranger", TRANSPORTS,
                                 "the same, 4 layers per part, 3 opened by our keys"),
    "signed-attrs-ber": (_signed_attrs_ber, "stranger", TRANSPORTS,
                         "multipart/signed, SignedData in BER, a signed attribute of n "
                         "NULL values, verified twice"),
    "signer-name-reencoded": (_signer_name_reencoded, "stranger", TRANSPORTS,
                              "SignerInfo issuer: one RDN of n CNs, length ending in 0x80"),
    "certificates-ber": (_certificates_ber, "stranger", TRANSPORTS,
                         "SignedData in BER with n empty certificates"),
    "signer-infos-ber": (_signer_infos_ber, "stranger", TRANSPORTS,
                         "SignedData in BER with n empty SignerInfos"),
    "crls-ber": (_crls_ber, "stranger", TRANSPORTS,
                 "SignedData in BER with n elements in crls, verified twice"),
    "sip-context-readers": (_sip_context_readers, "stranger", TRANSPORTS,
                            "envelope for us whose authenticated SIP context has n readers"),
    "envelope-ber-parts": (_envelope_ber_parts, "stranger", TRANSPORTS,
                           "16 parts, each a BER envelope of ~n elements, not for us"),
    "recipients-parts-layers": (_recipients_parts_layers, "stranger", TRANSPORTS,
                                "16 parts x 4 layers x n RecipientInfos for our keys"),
    "lookalike-cas": (_lookalike_cas, "stranger", ("udp",),
                      "own valid signature, 15 CA look-alikes with RSA-8192 keys, e = 2^32 - 1"),
    "rsa-8192-signer": (_rsa_8192_signer, "stranger", ("udp",),
                        "signer key RSA-8192, e = 2^32 - 1, signature checked twice"),
    "huge-san-unreadable": (_huge_san_unreadable, "stranger", TRANSPORTS,
                            "unreadable signer certificate with n SAN entries"),
    "combining-mark-issuer": (_combining_mark_issuer, "stranger", TRANSPORTS,
                              "issuer 'a' + n combining-mark pairs, 16 certificates "
                              "with its serial"),
    "lookalike-paths-expired": (_lookalike_paths, "stranger", TRANSPORTS,
                                "2^5 look-alike CA paths to 5 expired CAs named by n RDNs"),
    "lookalike-paths-at-bound": (_lookalike_paths, "stranger", ("udp",),
                                 "the same with names of 32 RDNs (max_name_attributes)"),
    "long-named-certificates": (_long_named_certificates, "stranger", TRANSPORTS,
                                "15 certificates whose subject and issuer have n RDNs each"),
    "long-names-at-bound": (_long_named_certificates, "stranger", ("udp",),
                            "the same with names of 32 RDNs (max_name_attributes)"),
    "many-signers": (_many_signers, "insider", ("udp",),
                     "carol signs 8 SignerInfos, each with its path"),
    "many-labels": (_many_labels, "stranger", TRANSPORTS,
                    "n Proxy-Required-Body labels for other hosts"),
    "many-policies": (_many_policies, "stranger", TRANSPORTS,
                      "INVITE with n Proxy-Body-Policy values for hosts of our domain"),
    "long-via": (_long_via, "stranger", TRANSPORTS, "n Via entries"),
    "sdp-media-lines": (_sdp_media_lines, "stranger", TRANSPORTS,
                        "INVITE, an SDP of n attribute lines for the proxy and bob"),
}

# Shapes whose size is set by a limit, not by the message size: one count, no search.
_FIXED = {"lookalike-cas": 15, "rsa-8192-signer": 1, "many-signers": 8,
          "lookalike-paths-at-bound": DEFAULT_LIMITS.max_name_attributes,
          "long-names-at-bound": DEFAULT_LIMITS.max_name_attributes}
# Counts past which a shape is refused outright (cheaply): the fill stops there.
# long-named-certificates: 670 RDNs make a certificate of 16,344 octets (16 KiB at most);
# lookalike-paths-expired: 1,330 RDNs keep each expired look-alike under 16 KiB too.
_CAPS = {"recipients-parts-layers": MAX_RECIPIENTS, "long-named-certificates": 670,
         "lookalike-paths-expired": 1330,
         "envelope-ber-parts": DEFAULT_LIMITS.max_der_elements - 64}


def _fits(msg: sip.SipMessage, transport: str) -> bool:
    total, body = _SIZES[transport]
    return len(msg.serialize()) <= total and len(msg.body) <= body


def _fill(build: Callable[[int], sip.SipMessage], transport: str,
          cap: int | None = None) -> tuple[int, sip.SipMessage]:
    """The largest count (up to ``cap``) whose message fits ``transport``, and that message:
    a guess from the size of one unit, a bracket around it, then bisection."""
    made: dict[int, sip.SipMessage] = {}

    def fits(n: int) -> bool:
        if n not in made:
            made[n] = build(n)
        return _fits(made[n], transport)

    if not fits(1):
        raise ValueError("the shape does not fit even with a count of 1")
    limit = cap if cap is not None else 1 << 30
    total, body = _SIZES[transport]
    one, two = made[1], build(2)
    unit = max(1, len(two.serialize()) - len(one.serialize()))
    room = min(total - len(one.serialize()), body - len(one.body))
    guess = max(1, min(limit, 1 + room // unit))
    lo, hi, step = 1, limit + 1, max(1, guess // 128)
    if fits(guess):
        lo = guess
        while lo < limit:
            probe = min(limit, lo + step)
            if not fits(probe):
                hi = probe
                break
            lo, step = probe, step * 2
    else:
        hi = guess
        while True:
            probe = max(1, hi - step)
            if fits(probe):
                lo = probe
                break
            hi, step = probe, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, made[lo]


def build(pki: TestPKI, *, host: str = TRUSTED, names: Sequence[str] | None = None,
          transports: Sequence[str] = TRANSPORTS) -> list[Shape]:
    """Every shape (or those in ``names``) for each of ``transports`` it is made for."""
    stranger = _Stranger(pki, host)
    out = []
    for name, (builder, who, made_for, what) in SHAPES.items():
        if names is not None and name not in names:
            continue
        for transport in (t for t in transports if t in made_for):
            def make(n: int, builder=builder, transport=transport) -> sip.SipMessage:
                return builder(stranger, transport, n)
            if name in _FIXED:
                count, msg = _FIXED[name], make(_FIXED[name])
                if not _fits(msg, transport):
                    raise AssertionError(f"{name} does not fit {transport}")
            else:
                count, msg = _fill(make, transport, _CAPS.get(name))
            out.append(Shape(name, transport, who, what, count, msg.serialize()))
    return out
