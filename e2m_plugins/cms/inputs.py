"""Turn what people and peers hand us into CMS DER.

A CMS body reaches the core as raw DER (a SIP body with binary transfer
encoding), as PEM from ``openssl cms -outform PEM``, as bare base64, or as an
S/MIME MIME entity (``application/pkcs7-mime`` / ``-signature`` with base64 or
binary transfer encoding, or a whole ``multipart/signed``).  Everything here
only unwraps; the CMS itself is parsed and checked elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from ..errors import MalformedError, UnsupportedAlgorithmError
from .limits import DEFAULT_LIMITS, Limits

__all__ = ["CmsInput", "load_cms_input", "load_cms_message"]

_PEM_LABELS = (b"PKCS7", b"CMS", b"PKCS #7 SIGNED DATA")
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 #]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_B64_ONLY = re.compile(rb"^[A-Za-z0-9+/=\s]+$")
_HEADER_START = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]+:")
_CMS_MIME_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime",
                   "application/pkcs7-signature", "application/x-pkcs7-signature")


@dataclass(frozen=True)
class CmsInput:
    """CMS DER plus what the wrapping told us.

    ``detached_content`` is set for ``multipart/signed``: the first body part
    in canonical form (CRLF line ends, its MIME headers included), which is
    exactly what the detached signature covers.  ``mime_type`` and
    ``smime_type`` are set when the input was a MIME entity.
    """

    der: bytes
    detached_content: bytes | None = None
    mime_type: str | None = None
    smime_type: str | None = None


def load_cms_input(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The CMS DER inside ``data`` (DER, PEM, base64 or an S/MIME entity).

    For ``multipart/signed`` this is the signature part; use
    ``load_cms_message`` to get the signed content as well.
    """
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
        return _from_mime(stripped, limits, depth=0)
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


def _split_entity(entity: bytes) -> tuple[dict[str, str], bytes]:
    """Headers (lower-case names, unfolded) and the body of a MIME entity."""
    crlf, lf = entity.find(b"\r\n\r\n"), entity.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        head, body = entity[:crlf], entity[crlf + 4:]
    elif lf >= 0:
        head, body = entity[:lf], entity[lf + 2:]
    else:
        raise MalformedError("MIME entity has no blank line after its headers")
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedError("MIME headers are not ASCII") from None
    headers: dict[str, str] = {}
    last: str | None = None
    for line in text.replace("\r\n", "\n").split("\n"):
        if line[:1] in (" ", "\t"):  # folded continuation
            if last is None:
                raise MalformedError("MIME header block starts with a continuation")
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MalformedError("malformed MIME header line")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers, body


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in re.finditer(r'\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*;?', rest):
        raw = match.group(2).strip()
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[match.group(1).lower()] = raw
    return main.strip().lower(), params


def _decode_body(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower() or "7bit"
    if encoding == "base64":
        return _b64(body)
    if encoding in ("binary", "8bit", "7bit"):
        return body
    raise UnsupportedAlgorithmError(f"transfer encoding {encoding!r} not supported for CMS")


def _canonical(text: bytes) -> bytes:
    # S/MIME signs the canonical form: every line break is CRLF.
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _from_mime(entity: bytes, limits: Limits, depth: int) -> CmsInput:
    if depth > limits.max_nesting_depth:
        raise MalformedError("MIME nesting too deep")
    headers, body = _split_entity(entity)
    mime_type, params = _content_type(headers.get("content-type", "text/plain"))
    if mime_type == "multipart/signed":
        return _from_multipart_signed(body, params, limits, depth)
    if mime_type not in _CMS_MIME_TYPES:
        raise MalformedError(f"MIME type {mime_type!r} does not carry CMS")
    der = _decode_body(body, headers.get("content-transfer-encoding", "7bit"))
    if not der or der[0] != 0x30:
        raise MalformedError("MIME body does not hold a DER ContentInfo")
    return CmsInput(der=der, mime_type=mime_type, smime_type=params.get("smime-type"))


def _drop_final_break(part: bytes) -> bytes:
    # RFC 2046: the line break before a delimiter belongs to the delimiter,
    # not to the part (this matters for binary signature parts too).
    if part.endswith(b"\r\n"):
        return part[:-2]
    return part[:-1] if part.endswith(b"\n") else part


def _from_multipart_signed(body: bytes, params: dict[str, str], limits: Limits,
                           depth: int) -> CmsInput:
    boundary = params.get("boundary")
    if not boundary:
        raise MalformedError("multipart/signed without boundary")
    delimiter = b"--" + boundary.encode("ascii", "replace")
    parts: list[list[bytes]] = []
    current: list[bytes] | None = None
    closed = False
    for line in body.splitlines(keepends=True):
        bare = line.rstrip(b"\r\n").rstrip(b" \t")
        if bare == delimiter + b"--":
            if current is not None:
                parts.append(current)
            closed = True
            break
        if bare == delimiter:
            if current is not None:
                parts.append(current)
            current = []
        elif current is not None:
            current.append(line)
    if not closed or len(parts) != 2:
        raise MalformedError("multipart/signed needs exactly two parts and a closing boundary")
    signed_part, signature_part = (_drop_final_break(b"".join(p)) for p in parts)
    signature = _from_mime(signature_part, limits, depth + 1)
    if signature.mime_type not in ("application/pkcs7-signature",
                                   "application/x-pkcs7-signature"):
        raise MalformedError("second part of multipart/signed is not a pkcs7-signature")
    return CmsInput(der=signature.der, detached_content=_canonical(signed_part),
                    mime_type="multipart/signed", smime_type=signature.smime_type)
