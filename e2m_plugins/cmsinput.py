"""CMS as it reaches us: find the DER inside whatever wraps it, and verify a signature.

Input comes as raw DER (a SIP body with binary transfer encoding), PEM (from
``openssl cms -outform PEM``), bare base64, or an S/MIME entity
(``application/pkcs7-mime`` with any transfer encoding, or ``multipart/signed``).
MIME parsing itself lives in ``e2m_plugins.mime``; this module only finds the CMS
inside.  ``nested_cms`` says whether a layer's plaintext is itself CMS (how
``layers.open_message`` follows nesting).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Sequence

from cryptography import x509

from . import mime
from .cms.limits import DEFAULT_LIMITS, Limits
from .cms.signed import VerifyResult, verify
from .errors import MalformedError, SignatureInvalidError

__all__ = ["CmsInput", "load_cms_input", "load_cms_message", "nested_cms", "verify_input"]


_PEM_LABELS = (b"PKCS7", b"CMS", b"PKCS #7 SIGNED DATA")


_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 #]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


_B64_ONLY = re.compile(rb"^[A-Za-z0-9+/=\s]+$")


_HEADER_START = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]+:")


_CMS_TYPES = {"signed-data", "enveloped-data", "auth-enveloped-data"}


# A MIME header block whose Content-Type carries CMS, looked for in the first lines only.
_CMS_ENTITY = re.compile(
    rb"(?im)^content-type:[ \t]*(application/(x-)?pkcs7-(mime|signature)|multipart/signed)\b")


_HEAD_SCAN = 4096


@dataclass(frozen=True)
class CmsInput:
    """CMS DER plus what the wrapping told us.

    For ``multipart/signed``, ``detached_content`` is the signed part exactly
    as it was on the wire, which is what a detached signature covers when the
    sender kept its line ends.  ``mime_type`` and ``smime_type`` are set when
    the input was a MIME entity.
    """

    der: bytes
    detached_content: bytes | None = field(default=None, repr=False)  # signed plaintext
    mime_type: str | None = None
    smime_type: str | None = None


def load_cms_input(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The CMS DER inside ``data`` (DER, PEM, base64 or an S/MIME entity)."""
    return load_cms_message(data, limits=limits).der


def load_cms_message(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> CmsInput:
    """Like ``load_cms_input`` but also returns detached content and MIME types."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("CMS input must be bytes")
    data = bytes(data)
    limits.check_size(len(data))
    if not data:
        raise MalformedError("empty CMS input")
    if data[0] == 0x30:  # a DER SEQUENCE: ContentInfo as it is
        return CmsInput(der=data)
    stripped = data.lstrip()
    if stripped.startswith(b"-----BEGIN"):
        return CmsInput(der=_from_pem(stripped))
    if _HEADER_START.match(stripped):
        return _from_entity(mime.parse_entity(stripped, mime.MimeLimits.from_limits(limits)), limits)
    if _B64_ONLY.match(stripped):
        return CmsInput(der=_b64(stripped))
    raise MalformedError("input is neither DER, PEM, base64 nor an S/MIME entity")


def _b64(text: bytes) -> bytes:
    try:
        der = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError("bad base64 in CMS input") from None
    if not der or der[0] != 0x30:
        raise MalformedError("base64 does not hold a DER ContentInfo")
    return der


def _from_pem(text: bytes) -> bytes:
    match = _PEM.search(text)
    if not match:
        raise MalformedError("unterminated or unreadable PEM block")
    if match.group(1) not in _PEM_LABELS:
        raise MalformedError(f"PEM block is {match.group(1).decode()!r}, not PKCS7 or CMS")
    return _b64(match.group(2))


def _from_entity(part: mime.MimePart, limits: Limits) -> CmsInput:
    mime_type = part.content_type.mime_type
    if mime_type == "multipart/signed":
        signed = mime.parse_signed(part, mime.MimeLimits.from_limits(limits))
        return CmsInput(der=signed.signature, detached_content=signed.signed_bytes,
                        mime_type=mime_type, smime_type="signed-data")
    if not mime.is_cms(part):
        raise MalformedError(f"MIME type {mime_type!r} does not carry CMS")
    der = part.decoded()
    if not der or der[0] != 0x30:
        raise MalformedError("MIME body does not hold a DER ContentInfo")
    return CmsInput(der=der, mime_type=mime_type, smime_type=mime.smime_type_of(part))


def verify_input(message: CmsInput, *, trust_anchors: Sequence[x509.Certificate],
                 at: datetime | None = None, check_time: bool = True,
                 extra_certs: Sequence[x509.Certificate] = (), detached_content: bytes | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> VerifyResult:
    """Verify a loaded SignedData, with its multipart/signed content if it had one.

    S/MIME signs text in canonical form (CRLF line ends) but some senders
    write the part with bare LF: when the bytes as received do not verify,
    the canonical form is tried once.  Binary parts are never rewritten first.
    """
    content = detached_content if detached_content is not None else message.detached_content
    kwargs = dict(trust_anchors=trust_anchors, at=at, check_time=check_time,
                  extra_certs=extra_certs, limits=limits)
    try:
        return verify(message.der, detached_content=content, **kwargs)
    except SignatureInvalidError:
        canonical = mime.canonical_text(content) if content is not None else None
        if canonical is None or canonical == content:
            raise
        return verify(message.der, detached_content=canonical, **kwargs)


def nested_cms(content: bytes, content_type: str, limits: Limits) -> CmsInput | None:
    """The CMS inside a layer's content, or None when the content is final."""
    if content_type in _CMS_TYPES:
        return CmsInput(der=content)
    if content_type != "data":
        return None
    head = content[:_HEAD_SCAN]
    end = re.search(rb"\r?\n\r?\n", head)
    if end is None or not _CMS_ENTITY.search(head[:end.start()]):
        return None
    return load_cms_message(content, limits=limits)
