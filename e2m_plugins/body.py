"""SIP bodies as E2M sees them: find the protected parts, open them, build them.

Both engines use this module: the UA to open what it receives and to build
what it sends, the proxy to open the parts it must view.  A SIP body is
either one entity (``application/pkcs7-mime``, ``multipart/signed`` or plain)
or a ``multipart/mixed`` of such entities (e2m-sec-02 §4.2, one part per
audience).  Every opened part yields its inner MIME entity: the plaintext
content type and content, plus each envelope and signature it came through.
"""

from __future__ import annotations

import hashlib
import os
import time as _time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import mime
from .certstore import check_user_names
from .cms import ciphers, oids
from .cms.envelope import Attribute, OpenedEnvelope, Sealed, content_info_type, open_envelope, seal
from .cms.limits import DEFAULT_LIMITS, Limits
from .cms.recipients import OpeningKey, Recipient
from .cms.signed import VerifyResult, sign, signed_content
from .errors import (BindingMismatchError, DecryptionError, DowngradeError, E2MError, LimitExceededError,
                     InconsistentSplitError, MalformedError, UnsupportedMediaTypeError)
from .sdp import SdpKeys
from .sip import SipMessage, canonical_name
from .sipcontext import SipContext, context_for, decode_to_tag, encode_to_tag
from .uri import host_key
from .layers import open_message, unauthenticated_plaintext
from .lazy import lazy_property

__all__ = ["OpenedPart", "message_body", "top_parts", "is_protected", "has_protection",
           "open_part", "check_signed_by", "check_context", "protect_content", "new_reference",
           "with_entity", "plaintext_leaves", "refuse_hidden_parts",
           "refuse_encoded_plaintext", "as_read"]

# What an E2M body may be; certs-only, compressed-data and bare signatures are not.
_OPENABLE = frozenset({"enveloped-data", "authEnveloped-data", "signed-data"})
REFERENCE_BYTES = 16  # a CEKReference: random, so it names nothing about the dialog


@dataclass(frozen=True, repr=False)
class OpenedPart:
    """One body part after every layer was opened; ``content`` is plaintext."""

    cid: str | None
    handling: str
    content_type: str                 # inner media type, lower case, no parameters
    content: bytes
    entity: mime.MimePart             # the inner entity, with its own headers
    envelopes: tuple[OpenedEnvelope, ...] = ()
    signatures: tuple[VerifyResult, ...] = ()
    context: SipContext | None = None          # what the sender said this part is for
    context_signed: bool = False               # ... under its signature (else: GCM only)

    def __repr__(self) -> str:  # plaintext never reaches a log
        return (f"OpenedPart(cid={self.cid!r}, {self.content_type}, {len(self.content)} bytes, "
                f"encrypted={self.encrypted}, signed={self.signed})")

    @property
    def encrypted(self) -> bool:
        return bool(self.envelopes)

    @property
    def signed(self) -> bool:
        return bool(self.signatures)

    @lazy_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def signers(self) -> tuple[str, ...]:
        """Each signer as its first SAN URI, else dNSName, else common name."""
        out = []
        for result in self.signatures:
            for signer in result.signers:
                ids = signer.identities
                out.append((ids.uris or ids.dns_names or (ids.common_name or "?",))[0])
        return tuple(out)

    @property
    def signer_certificates(self) -> tuple[x509.Certificate, ...]:
        return tuple(s.certificate for r in self.signatures for s in r.signers)

    @property
    def cek_references(self) -> tuple[tuple[bytes, bytes, OpenedEnvelope], ...]:
        """(reference, CEK, envelope) of the innermost envelope, when it offered reuse: the
        sender's own.  A hop can only add envelopes outside it, and one that wrapped the
        body in its own naming the sender's reference had its key kept for it, by the
        receiver as the dialog's (review 186) or by a proxy."""
        env = self.envelopes[-1] if self.envelopes else None
        if env is None or env.cek_reference is None or env.cek is None:
            return ()
        return ((env.cek_reference, env.cek, env),)


def message_body(message: SipMessage, limits: Limits = DEFAULT_LIMITS) -> mime.MimePart | None:
    """The body of ``message`` as a MIME part from its own Content-* headers; None if empty."""
    if not message.body:
        return None
    if len(message.body) > limits.max_body_bytes:
        raise LimitExceededError(f"body of {len(message.body)} bytes exceeds "
                                 f"{limits.max_body_bytes}")
    return mime.body_part(message.headers, message.body, mime.MimeLimits.from_limits(limits))


def top_parts(part: mime.MimePart, limits: Limits = DEFAULT_LIMITS) -> list[mime.MimePart]:
    """The audience parts: those of a ``multipart/mixed``, else the body itself.  Two
    parts with one Content-ID are MalformedError, for the proxy and the UA alike: a
    label or a signed context names a part by it (review 66: the proxy refused such a
    body, the UA took it)."""
    if part.content_type.mime_type != "multipart/mixed":
        return [part]
    parts = mime.parse_multipart(part, mime.MimeLimits.from_limits(limits))
    ids = [p.content_id for p in parts if p.content_id]
    if len(set(map(mime.normalize_cid, ids))) != len(ids):
        raise MalformedError("two body parts share a Content-ID")
    return parts


def is_protected(part: mime.MimePart) -> bool:
    """True for S/MIME (``application/pkcs7-mime`` or ``multipart/signed``)."""
    return mime.is_cms(part) or part.content_type.mime_type == "multipart/signed"


def has_protection(part: mime.MimePart, limits: Limits = DEFAULT_LIMITS) -> bool:
    """True for an S/MIME body, or a ``multipart/mixed`` with an S/MIME part in it."""
    if is_protected(part):
        return True
    if part.content_type.mime_type != "multipart/mixed":
        return False
    return any(is_protected(p) for p in top_parts(part, limits))


def plaintext_leaves(part: mime.MimePart, limits: Limits = DEFAULT_LIMITS,
                     protected: list[mime.MimePart] | None = None) -> list[mime.MimePart]:
    """Every part of the body, at any depth, that carries content in the clear: not
    S/MIME and not a multipart.  A ``multipart/signed`` counts as one protected unit
    (its first part is the signed content, not a separate plaintext); the S/MIME parts
    met are added to ``protected`` when it is given."""
    leaves: list[mime.MimePart] = []
    mime_limits = mime.MimeLimits.from_limits(limits)
    seen = [0]

    def visit(node: mime.MimePart, depth: int) -> None:
        seen[0] += 1
        if seen[0] > mime_limits.max_total_parts:
            raise LimitExceededError(f"more than {mime_limits.max_total_parts} body parts in all")
        if is_protected(node):
            if protected is not None:
                protected.append(node)
            return
        if not node.content_type.is_multipart:
            leaves.append(node)
            return
        if depth >= mime_limits.max_depth:
            raise LimitExceededError("multiparts nested too deep")
        for child in mime.parse_multipart(node, mime_limits):
            visit(child, depth + 1)

    visit(part, 0)
    return leaves


def is_encrypted(part: mime.MimePart) -> bool:
    return mime.smime_type_of(part) in ("enveloped-data", "authEnveloped-data")


def readable_without_key(part: mime.MimePart, limits: Limits = DEFAULT_LIMITS) -> bool:
    """Whether any of ``part`` can be read without a key: a plaintext leaf, or a
    signature over something that can (a signature is looked through, its content
    read and not verified: signed over an envelope, RFC 3261 §23.2's encrypt-then-sign,
    is sealed; review 135 K1).  Unlike ``plaintext_leaves``, a signed part is not one
    protected unit here.  ``LimitExceededError`` past the MIME limits."""
    mime_limits = mime.MimeLimits.from_limits(limits)
    seen = [0]

    def visit(node: mime.MimePart, depth: int) -> bool:
        seen[0] += 1
        if depth > mime_limits.max_depth or seen[0] > mime_limits.max_total_parts:
            raise LimitExceededError("signatures and multiparts past the MIME limits")
        if is_encrypted(node):
            return False
        if mime.smime_type_of(node) == "signed-data":
            content = signed_content(node.body, limits)
            if content is None:
                return True     # detached, its content not here: nothing sealed to see
            return visit(mime.parse_entity(content, mime_limits), depth + 1)
        if mime.is_cms(node):
            return True         # another CMS type: not sealed
        if node.content_type.mime_type == "multipart/signed":
            return visit(mime.parse_multipart(node, mime_limits)[0], depth + 1)
        if node.content_type.is_multipart:
            return any(visit(child, depth + 1)
                       for child in mime.parse_multipart(node, mime_limits))
        return True             # a plaintext leaf

    return visit(part, 0)


def _inner_entity(content: bytes, limits: Limits) -> mime.MimePart:
    """The MIME entity inside the last layer (RFC 3261 §23: always an entity)."""
    try:
        return mime.parse_entity(content, mime.MimeLimits.from_limits(limits))
    except E2MError as exc:
        raise MalformedError(f"decrypted content is not a MIME entity: {exc}") from None


def open_part(part: mime.MimePart, keys: Sequence[OpeningKey], *,
              trust_anchors: Sequence[x509.Certificate], at: datetime | None = None,
              limits: Limits = DEFAULT_LIMITS) -> OpenedPart:
    """Open every layer of one body part; plain parts come back as they are.

    Raises the typed error of the first layer that fails (no recipient for
    us, bad key, bad signature, untrusted signer, malformed input).
    """
    if not is_protected(part):
        return OpenedPart(part.content_id, part.handling, part.content_type.mime_type,
                          part.decoded(), part)
    kind = mime.smime_type_of(part)
    if mime.is_cms(part) and kind not in _OPENABLE:
        raise UnsupportedMediaTypeError(f"S/MIME type {kind or part.content_type.mime_type} "
                                        "is not one E2M uses", content_type=kind)
    # A pkcs7-mime body is the CMS itself: no need to frame it again and re-parse it.
    data = part.decoded() if mime.is_cms(part) else mime.encode_part(part)
    opened = open_message(data, keys=keys, trust_anchors=trust_anchors,
                          want_cek=True, at=at, limits=limits)
    try:
        if opened.content_type != "data":
            raise MalformedError(f"unexpected innermost CMS content type {opened.content_type}")
        inner = _inner_entity(opened.content, limits)
        if is_protected(inner):
            raise MalformedError("nested S/MIME entity beyond what was opened")
        refuse_hidden_parts(inner, limits)
    except E2MError:
        if not unauthenticated_plaintext(opened.layers):
            raise
        inner = None
    if inner is None:  # see layers.open_message: no padding oracle through the answer
        raise DecryptionError() from None
    context, signed = _context_of(opened.envelopes, opened.signatures)
    return OpenedPart(part.content_id, part.handling, inner.content_type.mime_type,
                      inner.decoded(), inner, opened.envelopes, opened.signatures,
                      context, signed)


def refuse_hidden_parts(entity: mime.MimePart, limits: Limits = DEFAULT_LIMITS, *,
                        where: str = "inside the envelope") -> None:
    """A multipart the audience split does not take apart (one inside an envelope, or
    an ``alternative``, ``related`` or nested ``mixed`` in the clear) may hold neither
    an SDP nor S/MIME, at any depth.  The proxy views a session's media from an SDP
    part only, and a UA hands the multipart to its stack, which finds the SDP in it:
    an insider hid her call's media from the proxy that way (review 126 in an envelope,
    review 135 K2 in the clear).  A MESSAGE's multipart of text and files stays
    readable; one with an SDP in it is no E2M use."""
    if not entity.content_type.is_multipart:
        return
    nested: list[mime.MimePart] = []
    leaves = plaintext_leaves(entity, limits, protected=nested)
    if nested or any(leaf.content_type.mime_type == "application/sdp" for leaf in leaves):
        raise UnsupportedMediaTypeError(
            f"an SDP or S/MIME part inside a {entity.content_type.mime_type} {where}: "
            "send the SDP as a body part of its own",
            content_type=entity.content_type.mime_type)


def refuse_encoded_plaintext(entity: mime.MimePart, limits: Limits = DEFAULT_LIMITS) -> None:
    """``UnsupportedMediaTypeError`` for a part in the clear, or any leaf of it, whose
    Content-Transfer-Encoding changes its octets (a quoted-printable soft line break or
    ``=XX``, base64): a SIP stack reads an SDP or a text as sent (pjsip does not know
    the header), while ``decoded`` undoes it, so the view would summarise other media
    than the phone takes (a soft line break joins a ``c=`` line to the attribute before
    it: review 136 K1).  Held to it: an SDP and ``text/*``, what a stack reads as text
    (a phone shows a MESSAGE's text raw, the archive would keep it decoded); a file's
    base64 is decoded by whoever saves it (review 137 HB1).  A header whose decoding
    changes nothing reads the same on both sides and passes.  Inside an envelope both
    sides decode: only the clear is held."""
    for leaf in plaintext_leaves(entity, limits):
        read_as_text = leaf.content_type.mime_type == "application/sdp" \
            or leaf.content_type.mime_type.startswith("text/")
        if read_as_text and leaf.transfer_encoding not in ("7bit", "8bit", "binary") \
                and leaf.decoded() != leaf.body:
            raise UnsupportedMediaTypeError(
                f"a {leaf.content_type.mime_type} in the clear with Content-Transfer-Encoding "
                f"{leaf.transfer_encoding}: a SIP stack reads its octets as sent",
                content_type=leaf.content_type.mime_type)


def _context_of(envelopes: Sequence[OpenedEnvelope], signatures: Sequence[VerifyResult]
                ) -> tuple[SipContext | None, bool]:
    """The part's SipContext: from its signatures when signed (the sender's word),
    else from the envelopes' authenticated attributes; every copy must agree."""
    signed = [v for result in signatures for signer in result.signers
              for v in signer.attributes.get(oids.SIP_CONTEXT, ())]
    sealed = [v for env in envelopes for attribute in env.authenticated_attributes
              if attribute.oid == oids.SIP_CONTEXT for v in attribute.values]
    found = [SipContext.decode(v) for v in (*signed, *sealed)]
    if any(c != found[0] for c in found[1:]):
        raise BindingMismatchError("the body's SIP contexts disagree")
    if signatures and not signed and found:
        # Signed, but the signature does not cover a context: only the envelope's does,
        # which any holder of the CEK could have made.  Treat it as unsigned context.
        return found[0], False
    if not found:
        return None, False
    # the To tag the signers bound (every signer of a context must bind the same one)
    tags = {decode_to_tag(v) if v is not None else None
            for result in signatures for signer in result.signers
            if signer.attributes.get(oids.SIP_CONTEXT)
            for v in (signer.attributes.get(oids.SIP_TO_TAG) or (None,))}
    if len(tags) > 1:
        raise BindingMismatchError("the body's signers bound different To tags")
    tag = next(iter(tags), None)
    return (replace(found[0], to_tag=tag) if tag is not None else found[0]), bool(signed)


def check_context(opened: OpenedPart, message: SipMessage, *,
                  labels_present: set[str] | None = None) -> SipContext | None:
    """The part's SipContext, checked against ``message`` and the part itself.

    ``BindingMismatchError`` when the context names another message, or another
    Content-ID or handling than the part has (parts swapped or relabelled).  With
    ``labels_present`` (the hosts the message still names, in ``Proxy-Required-Body``
    or as a proxy that announced its policy on it), a reader the sender named that is
    gone raises ``DowngradeError``: a hop stripped its label.  None when the part
    carries no context (CBC envelopes, unsigned bodies of other implementations).
    """
    context = opened.context
    if context is None:
        return None
    context.check_message(message)
    context.check_part(opened.cid, opened.handling)
    if labels_present is not None:
        stripped = set(context.readers) - {host_key(h) for h in labels_present}
        if stripped:
            raise DowngradeError("Proxy-Required-Body for " + ", ".join(sorted(stripped))
                                 + " was removed on the way")
    return context


def check_signed_by(opened: OpenedPart, aor: str) -> None:
    """A signature must be ``aor``'s own: a trusted stranger's is refused too.

    The signature check already built each signer's path to the trust anchors (with the
    message's intermediates); what is left is the name: ``aor`` among the
    signer certificate's SAN URIs, and a key fit for signing.  Raises
    ``CertificateRejectedError`` naming whom the certificate is for.
    """
    problem: E2MError | None = None
    for cert in opened.signer_certificates:
        try:
            check_user_names(cert, aor, for_encryption=False)
            return
        except E2MError as exc:
            problem = exc
    if problem is not None:
        raise problem


def new_reference() -> bytes:
    return os.urandom(REFERENCE_BYTES)


# Whether a signed body binds its message's To tag (``e2m-sip-to-tag``).  Senders before
# it did not; tests of the paths that still serve them (the fork slots) sign as they did.
SIGN_TO_TAG = True


def protect_content(content_type: str, content: bytes, recipients: Sequence[Recipient], *,
                    signer: tuple[x509.Certificate, PrivateKeyTypes] | None = None,
                    cek_reference: bytes | None = None, content_id: str | None = None,
                    handling: str = "required", cipher: str | None = None,
                    bind_to: SipMessage | None = None, readers: Sequence[str] = (),
                    at: float | None = None,
                    sealed_keys: bytes | None = None) -> tuple[mime.MimePart, Sealed]:
    """Encrypt one body for ``recipients``, signing it first when ``signer`` is given.

    Sign-then-encrypt as e2m-sec-02 and RFC 8591 prefer: the SignedData is the
    envelope's content (eContentType signed-data), so every recipient, proxy
    included, can check that the content is the sender's.  With ``bind_to``, the
    part's ``SipContext`` (that message, ``readers``: the proxies asked to read it,
    the Content-ID, handling and CEK reference, made ``at``) goes into the signed
    attributes, or, unsigned, into AuthEnvelopedData's authenticated ones.
    ``sealed_keys`` (``seal_keys``: an SDP's keying lines for the peer alone) is
    a signed attribute too: only a signed body carries keys past a proxy.
    """
    if sealed_keys is not None and signer is None:
        raise ValueError("sealed SDP keys travel only under the sender's signature")
    inner = mime.inner_entity(content_type, content)
    context = None if bind_to is None else context_for(
        bind_to, time=at if at is not None else _time.time(), readers=readers,
        content_id=content_id, handling=handling, cek_reference=cek_reference)
    payload, payload_type = inner, oids.DATA
    if signer is not None:
        extra = ((oids.SIP_CONTEXT, context.encode()),) if context is not None else ()
        if SIGN_TO_TAG and context is not None and bind_to is not None:
            # "" for a message without one (a dialog-creating request): bound too, or a
            # copy given a made-up To tag would read as an older sender's body (review 19)
            extra += ((oids.SIP_TO_TAG, encode_to_tag(bind_to.to_tag or "")),)
        if sealed_keys is not None:
            extra += ((oids.SDP_KEYS, sealed_keys),)
        payload = sign(inner, signer[0], signer[1], extra_attributes=extra)
        payload_type = oids.SIGNED_DATA
    kwargs: dict = {} if cipher is None else {"cipher": cipher}
    if context is not None and signer is None \
            and ciphers.cipher_by_name(cipher or ciphers.DEFAULT_CIPHER).aead:
        # Unsigned, only AuthEnvelopedData can authenticate an attribute (docs/protocol.md
        # §2); signed, the signature covers it and a second copy would only add bytes.
        kwargs["authenticated_attributes"] = (Attribute(oids.SIP_CONTEXT, (context.encode(),)),)
    sealed = seal(payload, list(recipients), content_type=payload_type,
                  cek_reference=cek_reference, **kwargs)
    auth = content_info_type(sealed.der) == oids.AUTH_ENVELOPED_DATA
    smime_type = "authEnveloped-data" if auth else "enveloped-data"
    entity = mime.smime_entity(sealed.der, smime_type, content_id=content_id, handling=handling)
    return entity, sealed



def seal_keys(keys: SdpKeys, recipient: Recipient, *,
              cek_reference: bytes | None = None) -> Sealed:
    """An SDP's keying lines sealed for the peer alone (one RecipientInfo), to travel
    as the ``e2m-sdp-keys`` signed attribute of the part the proxies read."""
    return seal(keys.encode(), [recipient], cek_reference=cek_reference)


def open_sealed_keys(opened: OpenedPart, keys: Sequence[OpeningKey], *, sender: str | None,
                     limits: Limits = DEFAULT_LIMITS) -> tuple[SdpKeys, OpenedEnvelope] | None:
    """The keying lines a signed SDP part carries for us (``seal_keys``), or None.

    Refused (``InconsistentSplitError``) when the part is not a signed SDP, more than one
    signature carries keys, they were sealed for anyone but one recipient (a key others
    hold is no place for SRTP keys, ours in the answer included), or the signer that
    carries them is not ``sender``: a co-signer (a proxy that holds the body's key and
    signs the sender's content too) must not choose the keys (review 174 K1)."""
    found = [(signer, values) for result in opened.signatures for signer in result.signers
             for values in (signer.attributes.get(oids.SDP_KEYS),) if values]
    if not found:
        return None
    if len(found) != 1 or len(found[0][1]) != 1 or opened.content_type != "application/sdp":
        raise InconsistentSplitError("sealed SDP keys must come once, signed, with an SDP")
    try:
        if sender is None:
            raise InconsistentSplitError("sealed SDP keys from a sender we cannot name")
        check_user_names(found[0][0].certificate, sender, for_encryption=False)
    except E2MError:
        raise InconsistentSplitError("sealed SDP keys signed by someone other than the "
                                     "sender") from None
    envelope = open_envelope(found[0][1][0], list(keys), want_cek=True, limits=limits)
    if envelope.recipient_count != 1 or envelope.content_type != "data":
        raise InconsistentSplitError("the SDP keys were sealed for more than the peer")
    return SdpKeys.decode(envelope.plaintext), envelope


def with_entity(message: SipMessage, entity: mime.MimePart) -> SipMessage:
    """``message`` carrying ``entity``: its Content-* headers become the message's.

    The old Content-* headers go (Content-Length is rewritten by ``with_body``),
    so no stale Content-Disposition or transfer encoding survives a change.
    """
    kept = tuple((n, v) for n, v in message.headers
                 if not _is_content_header(n))
    updated = SipMessage(message.start_line, kept + tuple(entity.headers), message.body)
    return updated.with_body(entity.body)


def as_read(message: SipMessage, limits: Limits = DEFAULT_LIMITS) -> SipMessage:
    """``message`` with its body written again as the core read it (``mime.as_read``):
    what a UA hands its SIP stack after the checks, so that the stack cannot find a
    body part, a type or a boundary no check saw.  A bodiless message as it is."""
    part = message_body(message, limits)
    if part is None:
        return message
    return with_entity(message, mime.as_read(part, mime.MimeLimits.from_limits(limits)))


def _is_content_header(name: str) -> bool:
    key = canonical_name(name)
    return key.startswith("content-") and key != "content-length"
