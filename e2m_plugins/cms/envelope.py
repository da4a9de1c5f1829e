"""EnvelopedData (RFC 5652) and AuthEnvelopedData (RFC 5083/5084): seal and open.

One envelope, any number of recipients: the peer UA and the proxies it chose
each get a RecipientInfo over the same content-encryption key (CEK).

CEK reuse (RFC 3185): ``seal(..., cek_reference=...)`` puts id-aa-CEKReference
(and optionally id-aa-CEKMaxDecrypts) in unprotectedAttrs for EnvelopedData, and
in the authenticated authAttrs for AuthEnvelopedData, where the GCM tag covers
them.  ``open_envelope(..., want_cek=True)`` hands the CEK back so the caller can
keep it; a later envelope is addressed to ``recipients.reuse_kek(cek, reference)``.
Nothing is cached here.

What is opened is set by ``Limits``: CBC (EnvelopedData) only with
``accept_cbc``, 3DES only with ``accept_legacy_algorithms`` too.  Opening costs
at most one key operation per envelope: the first RecipientInfo addressed to one
of our keys decides, and that operation is counted against the message's budget
(``budget.spend``) before it runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from . import ciphers, der, oids
from .budget import budget_scope
from .limits import DEFAULT_LIMITS, Limits
from .recipients import Match, OpeningKey, Recipient, RecipientSummary, match, summarize
from ..errors import (
    DecryptionError,
    MalformedError,
    NoMatchingRecipientError,
    UnsupportedAlgorithmError,
)


@dataclass(frozen=True)
class Attribute:
    """A CMS attribute: its type and the DER encoding of each value."""

    oid: str
    values: tuple[bytes, ...]

    @property
    def name(self) -> str:
        return oids.name_of(self.oid)

    def encode(self) -> bytes:
        return der.seq(der.enc_oid(self.oid), der.set_of(*self.values))


def cek_reference_attributes(reference: bytes, max_decrypts: int | None = None) -> list[Attribute]:
    """The RFC 3185 attributes that ask recipients to keep this envelope's CEK."""
    if not reference:
        raise ValueError("a CEKReference must not be empty")
    attrs = [Attribute(oids.CEK_REFERENCE, (der.octet_string(reference),))]
    if max_decrypts is not None:
        if not 1 <= max_decrypts <= 2**31:
            raise ValueError("CEKMaxDecrypts must be between 1 and 2^31")
        attrs.append(Attribute(oids.CEK_MAX_DECRYPTS, (der.enc_integer(max_decrypts),)))
    return attrs


@dataclass(frozen=True, repr=False)
class Sealed:
    """A built envelope; ``cek`` is there so the sender may keep it for reuse."""

    der: bytes
    cek: bytes
    cek_reference: bytes | None

    def __repr__(self) -> str:
        return f"Sealed({len(self.der)} bytes, reference={self.cek_reference.hex() if self.cek_reference else None})"


def seal(content: bytes, recipients: list[Recipient] | tuple[Recipient, ...], *,
         cipher: str = ciphers.DEFAULT_CIPHER, content_type: str = oids.DATA,
         cek_reference: bytes | None = None, cek_max_decrypts: int | None = None,
         extra_attributes: tuple[Attribute, ...] = (),
         authenticated_attributes: tuple[Attribute, ...] = ()) -> Sealed:
    """Encrypt ``content`` once for every recipient.

    GCM ciphers give AuthEnvelopedData, CBC ciphers EnvelopedData.  The
    CEKReference (and CEKMaxDecrypts) go in authAttrs for AuthEnvelopedData, so
    no hop can change them unseen, and in unprotectedAttrs for EnvelopedData
    (RFC 3185; see docs/protocol.md §2).  ``extra_attributes`` always go
    unprotected; ``authenticated_attributes`` are only possible with GCM and are
    covered by its tag.
    """
    if not recipients:
        raise ValueError("an envelope needs at least one recipient")
    spec = ciphers.cipher_by_name(cipher)
    cek = os.urandom(spec.key_bytes)
    infos = [r.build(cek) for r in recipients]
    unprotected = list(extra_attributes)
    reference_attrs = ([] if cek_reference is None
                       else cek_reference_attributes(cek_reference, cek_max_decrypts))
    if spec.aead:
        auth = reference_attrs + list(authenticated_attributes)
        if content_type != oids.DATA and not any(a.oid == oids.CONTENT_TYPE_ATTR for a in auth):
            # RFC 5083 §2.1: a non-data content type must be authenticated.
            auth.insert(0, Attribute(oids.CONTENT_TYPE_ATTR, (der.enc_oid(content_type),)))
        auth_set = der.set_of(*(a.encode() for a in auth)) if auth else None
        enc = ciphers.encrypt_content(spec, cek, content, aad=auth_set)
        body = [der.enc_integer(0), der.set_of(*infos), _encrypted_content_info(content_type, enc)]
        if auth_set is not None:
            body.append(der.implicit(1, auth_set))
        body.append(der.octet_string(enc.mac or b""))
        if unprotected:
            body.append(der.implicit(2, der.set_of(*(a.encode() for a in unprotected))))
        outer = oids.AUTH_ENVELOPED_DATA
    else:
        if authenticated_attributes:
            raise ValueError("authenticated attributes need an AEAD cipher (GCM)")
        unprotected = reference_attrs + unprotected
        enc = ciphers.encrypt_content(spec, cek, content)
        version = 2 if unprotected or any(r.version != 0 for r in recipients) else 0
        body = [der.enc_integer(version), der.set_of(*infos), _encrypted_content_info(content_type, enc)]
        if unprotected:
            body.append(der.implicit(1, der.set_of(*(a.encode() for a in unprotected))))
        outer = oids.ENVELOPED_DATA
    encoded = der.seq(der.enc_oid(outer), der.explicit(0, der.seq(*body)))
    return Sealed(encoded, cek, cek_reference)


def _encrypted_content_info(content_type: str, enc: ciphers.Encrypted) -> bytes:
    return der.seq(der.enc_oid(content_type), enc.algorithm_der,
                   der.tlv(der.context(0, False), enc.ciphertext))


# ------------------------------------------------------------------ parsing

class _Parsed(NamedTuple):
    envelope_type: str               # oids.ENVELOPED_DATA or oids.AUTH_ENVELOPED_DATA
    recipient_infos: list[der.TLV]
    content_type: str
    cipher_oid: str
    cipher_params: der.TLV | None
    ciphertext: bytes
    mac: bytes | None
    auth_attrs_der: bytes | None      # the SET as covered by the GCM tag
    auth_attributes: tuple[Attribute, ...]
    unprotected: tuple[Attribute, ...]


def _attributes(tlv: der.TLV, limits: Limits) -> tuple[Attribute, ...]:
    # Values are kept as their encodings; the elements inside them were read
    # (and counted) only if the SET was indefinite-length.
    attrs = []
    for item in tlv.children():
        fields = der.items(item.expect(der.SEQUENCE, "Attribute"), 2, "Attribute")
        values = tuple(v.encoded for v in fields[1].expect(der.SET, "attrValues").children())
        attrs.append(Attribute(der.oid(fields[0]), values))
    limits.check_count("attributes", len(attrs), limits.max_attributes)
    return tuple(attrs)


def content_info_type(data: bytes) -> str:
    """The dotted contentType of a ContentInfo (cheap: reads two headers, never the
    rest, so the layer's own parse is the only one that reads its elements)."""
    if not data or data[0] != der.SEQUENCE:
        raise MalformedError("ContentInfo: unexpected tag")
    first = der.first_child(data, whole=True)
    if first is None:
        raise MalformedError("empty ContentInfo")
    return der.oid(first)


def _parse(data: bytes, limits: Limits) -> _Parsed:
    limits.check_size(len(data))
    top = der.read_all(data, max_elements=limits.max_der_elements).expect(der.SEQUENCE, "ContentInfo")
    ci = der.items(top, 2, "ContentInfo")
    kind = der.oid(ci[0])
    if kind not in (oids.ENVELOPED_DATA, oids.AUTH_ENVELOPED_DATA):
        raise MalformedError(f"not an enveloped message but {oids.name_of(kind)}")
    body = der.items(ci[1].expect(der.context(0), "content"), 1, "content")[0].expect(der.SEQUENCE, "body")
    fields = der.items(body, 3, "EnvelopedData")
    idx = 1
    if fields[idx].tag == der.context(0):
        idx += 1  # originatorInfo: certificates we do not need to open
    ris = list(fields[idx].expect(der.SET, "recipientInfos").children())
    if not ris:
        raise MalformedError("no recipientInfos")
    limits.check_count("recipients", len(ris), limits.max_recipients)
    if len(fields) <= idx + 1:
        raise MalformedError("encryptedContentInfo missing")
    eci = der.items(fields[idx + 1].expect(der.SEQUENCE, "EncryptedContentInfo"), 2, "EncryptedContentInfo")
    alg = der.items(eci[1].expect(der.SEQUENCE, "contentEncryptionAlgorithm"), 1, "algorithm")
    if len(eci) < 3:
        raise UnsupportedAlgorithmError("detached encrypted content is not supported")
    enc_tlv = eci[2]
    if enc_tlv.tag not in (der.context(0, False), der.context(0, True)):
        raise MalformedError("encryptedContent: unexpected tag")
    ciphertext = der.octets(enc_tlv)
    rest = fields[idx + 2:]
    mac = None
    auth_der = None
    auth_attrs: tuple[Attribute, ...] = ()
    unprotected: tuple[Attribute, ...] = ()
    if kind == oids.AUTH_ENVELOPED_DATA:
        if rest and rest[0].tag == der.context(1):
            auth_attrs = _attributes(rest[0], limits)
            auth_der = bytes([der.SET]) + rest[0].encoded[1:]  # AAD is the SET OF form
            rest = rest[1:]
        if not rest or rest[0].tag != der.OCTET_STRING:
            raise MalformedError("AuthEnvelopedData: mac missing")
        mac = der.octets(rest[0])
        rest = rest[1:]
        if rest and rest[0].tag == der.context(2):
            unprotected = _attributes(rest[0], limits)
            rest = rest[1:]
    else:
        if rest and rest[0].tag == der.context(1):
            unprotected = _attributes(rest[0], limits)
            rest = rest[1:]
    if rest:
        raise MalformedError("unexpected trailing fields in the envelope")
    return _Parsed(kind, ris, der.oid(eci[0]), der.oid(alg[0]), alg[1] if len(alg) > 1 else None,
                   ciphertext, mac, auth_der, auth_attrs, unprotected)


# ------------------------------------------------------------------ opening

@dataclass(frozen=True, repr=False)
class OpenedEnvelope:
    """The result of opening an envelope for one of our keys."""

    plaintext: bytes
    content_type: str                    # inner eContentType: "data", "signed-data", ... or dotted
    envelope_type: str                   # "enveloped-data" or "auth-enveloped-data"
    content_algorithm: str               # e.g. "aes-128-gcm"
    recipient: RecipientSummary          # the RecipientInfo that matched
    matched_key: OpeningKey
    recipient_infos: tuple[der.TLV, ...] = field(repr=False)
    unprotected_attributes: tuple[Attribute, ...]
    authenticated_attributes: tuple[Attribute, ...]
    cek_reference: bytes | None
    cek_max_decrypts: int | None
    cek: bytes | None = field(default=None)  # only when asked for

    @cached_property
    def recipient_count(self) -> int:
        """How many recipients' keys the envelope carries: one kari RecipientInfo may
        carry a key for each of several recipients, so RecipientInfos are not counted
        (stop 50).  Worked out when first asked: the proxy never asks."""
        return sum(len(summarize(ri)) for ri in self.recipient_infos)

    def __repr__(self) -> str:  # plaintext and keys never reach a log by accident
        return (f"OpenedEnvelope({self.envelope_type}, {self.content_algorithm}, "
                f"{len(self.plaintext)} bytes, via {self.recipient.kind} {self.recipient.identifier})")


def _single_value(attrs: tuple[Attribute, ...], oid: str) -> bytes | None:
    found = [a for a in attrs if a.oid == oid]
    if not found:
        return None
    if len(found) > 1 or len(found[0].values) != 1:
        raise MalformedError(f"{oids.name_of(oid)} must appear once with one value")
    return found[0].values[0]


def open_envelope(data: bytes, keys: list[OpeningKey] | tuple[OpeningKey, ...], *, want_cek: bool = False,
                  limits: Limits = DEFAULT_LIMITS) -> OpenedEnvelope:
    """Decrypt ``data`` with whichever of ``keys`` it is addressed to.

    Raises ``NoMatchingRecipientError`` when none of ``keys`` is a recipient,
    ``DecryptionError`` for any failure once a recipient matched, and for a CBC
    envelope (EnvelopedData) unless ``limits.accept_cbc``: CBC has no integrity,
    so what follows its decryption is a padding oracle waiting for an answer
    that differs.  ``UnsupportedAlgorithmError`` for 3DES unless
    ``limits.accept_legacy_algorithms``.

    The first RecipientInfo addressed to one of ``keys`` decides: if it does not
    open, no other is tried, so an envelope costs at most one key operation
    (counted in the message's budget, ``budget.spend``, before it runs).
    """
    with budget_scope(limits.max_public_key_ops):
        return _open(data, keys, want_cek, limits)


def _open(data: bytes, keys: list[OpeningKey] | tuple[OpeningKey, ...], want_cek: bool,
          limits: Limits) -> OpenedEnvelope:
    parsed = _parse(data, limits)
    cipher = ciphers.cipher_by_oid(parsed.cipher_oid)
    if cipher.block == "3des" and not limits.accept_legacy_algorithms:
        raise UnsupportedAlgorithmError("content encryption des-ede3-cbc is refused (legacy algorithm)")
    authenticated = parsed.envelope_type == oids.AUTH_ENVELOPED_DATA
    if cipher.aead != authenticated:
        raise MalformedError("content cipher does not fit the envelope type")
    key_list = list(keys)
    found: Match | None = None
    for ri in parsed.recipient_infos:
        found = match(ri, key_list)
        if found is not None:
            break
    if found is None:
        raise NoMatchingRecipientError("no RecipientInfo is addressed to the keys given")
    if not authenticated and not limits.accept_cbc:
        # Refused before any key work, with the answer of a wrong key.  The algorithm is
        # in the clear, so naming the setting (for the log) tells a hop nothing new.
        raise DecryptionError("decryption failed: CBC is opened only for a peer a setting "
                              "names (UA.toml [[legacy]], PROXY.toml [policy] legacy_peers)")
    unwrapped = found.unwrap(cipher.key_bytes)
    plaintext = ciphers.decrypt_content(cipher, parsed.cipher_params, unwrapped.cek, parsed.ciphertext,
                                        parsed.mac, parsed.auth_attrs_der)
    # RFC 3185 reads the reference from unprotectedAttrs.  AuthEnvelopedData can do
    # better: only a reference under the GCM tag is used (one in unauthAttrs could
    # have been put there, or changed, by any hop); it is still listed as an attribute.
    reuse_attrs = parsed.auth_attributes if authenticated else parsed.unprotected
    ref_der = _single_value(reuse_attrs, oids.CEK_REFERENCE)
    max_der = _single_value(reuse_attrs, oids.CEK_MAX_DECRYPTS)
    reference = der.octets(der.read_all(ref_der, max_elements=limits.max_der_elements)
                           .expect(der.OCTET_STRING, "CEKReference")) if ref_der else None
    max_decrypts = der.integer(der.read_all(max_der, max_elements=limits.max_der_elements)) if max_der else None
    if reference is not None and not reference:
        raise MalformedError("empty CEKReference")
    return OpenedEnvelope(
        plaintext=plaintext, content_type=oids.name_of(parsed.content_type),
        envelope_type=oids.name_of(parsed.envelope_type), content_algorithm=cipher.name,
        recipient=unwrapped.summary, matched_key=unwrapped.key,
        recipient_infos=tuple(parsed.recipient_infos),
        unprotected_attributes=parsed.unprotected, authenticated_attributes=parsed.auth_attributes,
        cek_reference=reference, cek_max_decrypts=max_decrypts,
        cek=unwrapped.cek if want_cek else None)


@dataclass(frozen=True)
class EnvelopeDescription:
    """Structure of an envelope for ``e2m cms inspect``: no plaintext, no keys."""

    envelope_type: str
    content_type: str
    content_algorithm: str
    ciphertext_bytes: int
    recipients: tuple[RecipientSummary, ...]
    unprotected_attributes: tuple[Attribute, ...]
    authenticated_attributes: tuple[Attribute, ...]


def describe_envelope(data: bytes, limits: Limits = DEFAULT_LIMITS) -> EnvelopeDescription:
    parsed = _parse(data, limits)
    summaries: list[RecipientSummary] = []
    for ri in parsed.recipient_infos:
        summaries.extend(summarize(ri))
    return EnvelopeDescription(
        oids.name_of(parsed.envelope_type), oids.name_of(parsed.content_type),
        oids.name_of(parsed.cipher_oid), len(parsed.ciphertext), tuple(summaries),
        parsed.unprotected, parsed.auth_attributes)
