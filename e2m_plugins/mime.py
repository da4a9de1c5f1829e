"""MIME framing of SIP bodies for S/MIME (RFC 3261 §23, RFC 3853, RFC 2045/2046, RFC 1847).

This is the one place where the core parses and builds MIME:

- ``application/pkcs7-mime`` entities around CMS DER (``smime_entity``);
- the entity that goes *inside* an envelope (``inner_entity``) and what comes
  out of one (``parse_entity``);
- ``multipart/mixed`` with per-part Content-ID and ``handling`` (e2m-sec-02 §4.2);
- ``multipart/signed`` with a detached ``application/pkcs7-signature`` (RFC 1847).

Sans-IO: bytes in, bytes and ``MimePart`` objects out.  Untrusted input only
ever raises ``MalformedError``, ``UnsupportedAlgorithmError`` (an unknown
transfer encoding or signature protocol) or ``LimitExceededError``; builders
raise ``ValueError`` when the caller hands them something unsendable.

Wire decisions (see also docs/protocol.md):

- Send ``Content-Transfer-Encoding: binary`` (RFC 3853); receive binary, 8bit,
  7bit, base64 and quoted-printable.
- Header order of an S/MIME entity follows the e2m-sec-02 examples:
  Content-Type, Content-Transfer-Encoding, Content-ID, Content-Disposition.
- Content-IDs are sent as ``<id@host>`` and matched with or without brackets.
- The inner entity carries no Content-Length: the CMS content already frames
  it, and RFC 3261 §23's examples have none (the e2m-sec drafts' examples do).
  On receipt a Content-Length is honoured the way SIP does: a shorter value
  cuts the body, a longer one is malformed.
- ``multipart/signed`` content is handed back exactly as it is on the wire,
  never rewritten to CRLF: SIP bodies are 8-bit clean and the signed part may
  be binary (an envelope, in encrypt-then-sign), where rewriting would
  corrupt it.  ``canonical_text`` is there for a caller that wants to retry a
  text part.
- Ambiguity fails closed: two Content-Type headers in a part, a parameter
  given twice, or two parts with the same Content-ID are all malformed,
  because a proxy and a UA could otherwise read different things.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from .cms import oids
from .cms.envelope import content_info_type
from .cms.limits import DEFAULT_LIMITS, Limits
from .errors import LimitExceededError, MalformedError, UnsupportedAlgorithmError
from .grammar import MIME, MIME_TOKEN, MIME_TOKEN_PATTERN, bare_ampersand, format_param
from .grammar import parse_params as _parse_params
from .lazy import lazy_property

__all__ = [
    "MimeLimits", "DEFAULT_MIME_LIMITS", "ContentType", "Disposition", "MimePart",
    "SignedParts", "parse_content_type", "parse_disposition", "parse_params",
    "format_params", "normalize_cid", "same_cid", "new_content_id", "make_part",
    "smime_entity", "encode_part", "inner_entity", "parse_entity", "body_part",
    "multipart_mixed", "parse_multipart", "multipart_signed", "parse_signed", "as_read",
    "smime_type_of", "is_cms", "find_by_cid", "walk", "canonical_text",
    "PKCS7_MIME", "PKCS7_SIGNATURE", "CMS_MIME_TYPES",
]

CRLF = b"\r\n"
PKCS7_MIME = "application/pkcs7-mime"
PKCS7_SIGNATURE = "application/pkcs7-signature"
CMS_MIME_TYPES = frozenset({PKCS7_MIME, "application/x-pkcs7-mime",
                            PKCS7_SIGNATURE, "application/x-pkcs7-signature"})
_SIGNATURE_TYPES = frozenset({PKCS7_SIGNATURE, "application/x-pkcs7-signature"})
_PKCS7_MIME_TYPES = frozenset({PKCS7_MIME, "application/x-pkcs7-mime"})

# smime-type values we send, by every spelling we accept (RFC 8551 vs RFC 8591 drafts).
_SMIME_TYPES = {
    "enveloped-data": "enveloped-data",
    "authenveloped-data": "authEnveloped-data",
    "auth-enveloped-data": "authEnveloped-data",
    "signed-data": "signed-data",
    "certs-only": "certs-only",
    "compressed-data": "compressed-data",
}
# What a pkcs7-mime part without smime-type holds, read from its ContentInfo.
_SMIME_TYPE_BY_OID = {
    oids.ENVELOPED_DATA: "enveloped-data",
    oids.AUTH_ENVELOPED_DATA: "authEnveloped-data",
    oids.SIGNED_DATA: "signed-data",
    oids.COMPRESSED_DATA: "compressed-data",
}

# RFC 2045 token and parameters: e2m_plugins.grammar (the MIME dialect).
_TOKEN = MIME_TOKEN_PATTERN
_TOKEN_RE = MIME_TOKEN
_MEDIA_TYPE = re.compile(rf"[ \t]*({_TOKEN})[ \t]*/[ \t]*({_TOKEN})[ \t]*")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext
_BLANK_LINE = re.compile(rb"\n\r?\n")
# RFC 2046 bchars; a boundary may not end in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_CID_FORBIDDEN = re.compile(r'[\s<>"\\]')
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Headers that describe a body (RFC 2045 §9, RFC 3261 §7.4); the rest of a SIP
# message's headers are not the body's business.  Compact forms per RFC 3261 §7.3.3.
_COMPACT = {"c": "Content-Type", "e": "Content-Encoding"}


@dataclass(frozen=True)
class MimeLimits:
    """Bounds for untrusted MIME; sizes follow the CMS ``Limits``."""

    max_bytes: int = DEFAULT_LIMITS.max_body_bytes
    max_parts: int = 16        # body parts in one multipart
    max_total_parts: int = 64  # body parts met in one ``walk``
    max_depth: int = DEFAULT_LIMITS.max_nesting_depth
    max_headers: int = 32
    max_header_bytes: int = 8192

    @classmethod
    def from_limits(cls, limits: Limits) -> MimeLimits:
        """MIME limits that agree with a CMS ``Limits`` on size and depth (made once per
        pair: a message asks for them several times, and they are immutable)."""
        if cls is not MimeLimits:
            return cls(max_bytes=limits.max_body_bytes, max_depth=limits.max_nesting_depth)
        return _mime_limits(limits.max_body_bytes, limits.max_nesting_depth)

    def check_size(self, length: int) -> None:
        if length > self.max_bytes:
            raise LimitExceededError(
                f"MIME body of {length} bytes exceeds the limit of {self.max_bytes}")


DEFAULT_MIME_LIMITS = MimeLimits()


@lru_cache(maxsize=16)
def _mime_limits(max_bytes: int, max_depth: int) -> MimeLimits:
    return MimeLimits(max_bytes=max_bytes, max_depth=max_depth)

Params = tuple[tuple[str, str | None], ...]  # a bare parameter has the value None


# -- parameters -------------------------------------------------------------------

def parse_params(text: str) -> Params:
    """``;name=value`` pairs (RFC 2045 §5.1, RFC 3261 generic-param), names lower-cased.

    The one grammar of :mod:`e2m_plugins.grammar`, MIME dialect: values may be
    tokens or quoted strings; a name without a value (bare) gets None.  A
    missing ``;`` between two parameters is forgiven when whitespace separates
    them (RFC 3261 §23.2's own example writes ``filename=smime.p7m
    handling=required``).  A parameter given twice, also as ``name`` next to
    its RFC 2231 form ``name*``, is malformed.
    """
    return tuple(_parse_params(text, MIME).items())


def format_params(value: str, params: Iterable[tuple[str, str | None]]) -> str:
    """``value; name=token; name="quoted string"`` as RFC 3261 §23 writes it."""
    items = [value] + [format_param(name, val, MIME) for name, val in params]
    return "; ".join(items)


def _lookup(params: Params, name: str) -> str | None:
    name = name.lower()
    return next((value for key, value in params if key == name), None)


@dataclass(frozen=True)
class ContentType:
    """A media type (lower-cased ``type/subtype``) and its parameters."""

    mime_type: str
    params: Params = ()

    def param(self, name: str) -> str | None:
        return _lookup(self.params, name)

    @property
    def is_multipart(self) -> bool:
        return self.mime_type.startswith("multipart/")

    def __str__(self) -> str:
        return format_params(self.mime_type, self.params)


@dataclass(frozen=True)
class Disposition:
    """A Content-Disposition (RFC 3261 §20.11): type plus parameters."""

    disposition_type: str
    params: Params = ()

    def param(self, name: str) -> str | None:
        return _lookup(self.params, name)

    @property
    def handling(self) -> str:
        # RFC 3261 §20.11: a missing handling parameter means "required".
        return (self.param("handling") or "required").lower()

    def __str__(self) -> str:
        return format_params(self.disposition_type, self.params)


# The same few Content-Type and Content-Disposition values come in every message;
# the results are frozen, so a bounded cache of parses is safe to share.
@lru_cache(maxsize=256)
def parse_content_type(value: str) -> ContentType:
    """Parse a Content-Type value; names and the media type are lower-cased.  A
    backslash in its parameters is refused: we would unescape a quoted value
    (``boundary="r\\62"`` is ``r62``), pjsip keeps it as written (review 62)."""
    main, _, rest = value.partition(";")
    if "\\" in rest:
        raise MalformedError("a backslash in a Content-Type parameter")
    match = _MEDIA_TYPE.fullmatch(main)
    if not match:
        raise MalformedError("malformed Content-Type")
    return ContentType(f"{match.group(1)}/{match.group(2)}".lower(), parse_params(rest))


@lru_cache(maxsize=256)
def parse_disposition(value: str) -> Disposition:
    """Parse a Content-Disposition value."""
    main, _, rest = value.partition(";")
    main = main.strip(" \t")
    if not _TOKEN_RE.fullmatch(main):
        raise MalformedError("malformed Content-Disposition")
    return Disposition(main.lower(), parse_params(rest))


# -- Content-ID -------------------------------------------------------------------

def normalize_cid(value: str) -> str:
    """A Content-ID without quotes or angle brackets: ``<a@b>``, ``"a@b"``, ``a@b`` -> ``a@b``."""
    cid = value.strip()
    if len(cid) >= 2 and cid[0] == '"' and cid[-1] == '"':
        cid = cid[1:-1].strip()
    if len(cid) >= 2 and cid[0] == "<" and cid[-1] == ">":
        cid = cid[1:-1].strip()
    return cid


def same_cid(a: str, b: str) -> bool:
    """Whether two Content-IDs name the same part (brackets ignored, domain case-insensitive)."""
    left, right = normalize_cid(a), normalize_cid(b)
    if not left or not right:
        return False
    l_local, l_at, l_domain = left.rpartition("@")
    r_local, r_at, r_domain = right.rpartition("@")
    return l_local == r_local and l_at == r_at and l_domain.lower() == r_domain.lower()


def new_content_id(host: str) -> str:
    """A fresh random Content-ID ``<random@host>`` (unguessable, so labels cannot collide)."""
    return _format_cid(f"{secrets.token_hex(12)}@{host}")


def _format_cid(cid: str) -> str:
    bare = normalize_cid(cid)
    if not bare or _CID_FORBIDDEN.search(bare):
        raise ValueError("a Content-ID must be one dot-atom@host without spaces or brackets")
    return f"<{bare}>"


# -- parts ------------------------------------------------------------------------

_SINGLE = ("content-type", "content-id", "content-disposition", "content-transfer-encoding")


@dataclass(frozen=True)
class MimePart:
    """One MIME entity: ordered headers (as written) and the body as on the wire.

    ``body`` is still transfer-encoded; ``decoded()`` undoes that.  The parsed
    header values are computed on first use.
    """

    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = field(default=b"", repr=False)  # may be a plaintext SDP or IM

    @lazy_property
    def _index(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        for key, value in self.headers:
            index.setdefault(key.lower(), []).append(value)
        return index

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None.

        The Content-* headers that describe the body must appear at most once.
        """
        lowered = name.lower()
        values = self._index.get(lowered)
        if not values:
            return None
        if len(values) > 1 and lowered in _SINGLE:
            raise MalformedError("a body part repeats a Content-* header")
        return values[0]

    @lazy_property
    def content_type(self) -> ContentType:
        value = self.header("content-type")
        if value is None:  # RFC 2045 §5.2 default
            return ContentType("text/plain", (("charset", "us-ascii"),))
        return parse_content_type(value)

    @lazy_property
    def disposition(self) -> Disposition | None:
        value = self.header("content-disposition")
        return None if value is None else parse_disposition(value)

    @property
    def handling(self) -> str:
        """``required`` or ``optional`` (or an extension); missing means required."""
        return "required" if self.disposition is None else self.disposition.handling

    @lazy_property
    def content_id(self) -> str | None:
        """The Content-ID without brackets, or None."""
        value = self.header("content-id")
        return None if value is None else normalize_cid(value) or None

    @lazy_property
    def transfer_encoding(self) -> str:
        value = self.header("content-transfer-encoding")
        return (value or "7bit").strip().lower()

    def decoded(self) -> bytes:
        """The body with its Content-Transfer-Encoding undone."""
        return _decode(self.body, self.transfer_encoding)


def _decode(body: bytes, encoding: str) -> bytes:
    if encoding in ("binary", "8bit", "7bit"):
        return body
    if encoding == "base64":
        try:
            return base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise MalformedError("bad base64 body") from None
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    raise UnsupportedAlgorithmError("unsupported Content-Transfer-Encoding")


def _encode(body: bytes, encoding: str) -> bytes:
    if encoding in ("binary", "8bit", "7bit"):
        return body
    if encoding == "base64":
        text = base64.b64encode(body)
        return CRLF.join(text[i:i + 76] for i in range(0, len(text), 76))
    raise ValueError(f"cannot send transfer encoding {encoding!r}")


def _check_header(name: str, value: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"bad header name {name!r}")
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"header {name} value contains a line break")


def make_part(content_type: str | ContentType, body: bytes, *, content_id: str | None = None,
              disposition: str | Disposition | None = None,
              transfer_encoding: str | None = None,
              headers: Sequence[tuple[str, str]] = ()) -> MimePart:
    """Build a part; ``body`` is the raw content and is encoded for ``transfer_encoding``.

    Headers come out in the order Content-Type, Content-Transfer-Encoding,
    Content-ID, Content-Disposition, then ``headers``.
    """
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError("body must be bytes")
    lines: list[tuple[str, str]] = [("Content-Type", str(content_type))]
    if transfer_encoding:
        lines.append(("Content-Transfer-Encoding", transfer_encoding))
    if content_id is not None:
        lines.append(("Content-ID", _format_cid(content_id)))
    if disposition is not None:
        lines.append(("Content-Disposition", str(disposition)))
    lines.extend(headers)
    for name, value in lines:
        _check_header(name, value)
    encoded = _encode(bytes(body), (transfer_encoding or "binary").lower())
    return MimePart(tuple(lines), encoded)


def encode_part(part: MimePart) -> bytes:
    """The entity as bytes: ``Name: value`` CRLF lines, an empty line, the body."""
    out = bytearray()
    for name, value in part.headers:
        _check_header(name, value)
        # surrogateescape gives back the octets a header arrived with (sip.parse keeps them so)
        out += f"{name}: {value}".encode("utf-8", "surrogateescape") + CRLF
    return bytes(out + CRLF + part.body)


def _smime_type(smime_type: str) -> str:
    canonical = _SMIME_TYPES.get(smime_type.strip().lower())
    if canonical is None:
        raise ValueError(f"unknown smime-type {smime_type!r}")
    return canonical


def smime_entity(der: bytes, smime_type: str, *, content_id: str | None = None,
                 handling: str = "required", transfer_encoding: str = "binary") -> MimePart:
    """``application/pkcs7-mime`` around CMS DER, framed as RFC 3261 §23 and RFC 3853 say.

    ``smime_type`` is ``enveloped-data``, ``authEnveloped-data`` (also spelled
    ``auth-enveloped-data``; RFC 8551's spelling is sent), ``signed-data``,
    ``certs-only`` or ``compressed-data``.  ``handling=optional`` marks a part
    meant only for a proxy (e2m-sec-02 §4.2).  Base64 is only for a 7-bit hop.
    """
    if not der or der[0] != 0x30:
        raise ValueError("der must be a DER ContentInfo")
    kind = _smime_type(smime_type)
    filename = "smime.p7c" if kind == "certs-only" else "smime.p7m"
    content_type = ContentType(PKCS7_MIME, (("smime-type", kind), ("name", filename)))
    disposition = Disposition("attachment", (("handling", handling), ("filename", filename)))
    return make_part(content_type, der, content_id=content_id, disposition=disposition,
                     transfer_encoding=transfer_encoding)


def inner_entity(content_type: str, body: bytes, *, content_length: bool = False,
                 headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """The MIME entity that gets encrypted or signed: ``Content-Type: <type>`` CRLF CRLF body.

    No Content-Length by default (RFC 3261 §23 examples); ``content_length``
    adds one, as the e2m-sec drafts' examples show.  The body is not touched:
    SDP already uses CRLF, and binary content must stay binary.
    """
    extra = list(headers)
    if content_length:
        extra.append(("Content-Length", str(len(body))))
    return encode_part(make_part(parse_content_type(content_type), body, headers=extra))


# -- parsing entities -------------------------------------------------------------

def _header_lines(block: bytes, limits: MimeLimits) -> tuple[tuple[str, str], ...]:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError("MIME headers are not UTF-8") from None
    headers: list[list[str]] = []
    for line in text.split("\n"):
        line = line[:-1] if line.endswith("\r") else line
        # a header is text (RFC 5322 §2.2): a control character (an escape sequence
        # for an operator's terminal, review 61) has no business in one; HTAB may
        if _HEADER_CONTROL.search(line):
            raise MalformedError("control character in a MIME header")
        if bare_ampersand(line):        # pjsip ends a part's typed header there (review 62)
            raise MalformedError("an '&' outside quotes in a MIME header")
        if line[:1] in (" ", "\t"):  # folded continuation
            if not headers:
                raise MalformedError("MIME headers start with a continuation line")
            headers[-1][1] += " " + line.strip(" \t")
            continue
        name, sep, value = line.partition(":")
        if not sep or not _HEADER_NAME.fullmatch(name):
            raise MalformedError("malformed MIME header line")
        # a SIP stack reads a part's headers with its SIP parser: ``c`` is Content-Type
        # there (pjsip), so it must be here too, or a part typed so escapes every check
        headers.append([_COMPACT.get(name.lower(), name), value.strip(" \t")])
        if len(headers) > limits.max_headers:
            raise LimitExceededError(f"more than {limits.max_headers} MIME headers")
    return tuple((name, value.strip(" \t")) for name, value in headers)


def _split_entity(data: bytes, limits: MimeLimits) -> MimePart:
    """Headers up to the first empty line, then the body.

    A part may start with the empty line (no headers at all), and a part that
    ends right after its headers (no empty line) has an empty body.
    """
    if not data:
        return MimePart()
    for blank in (CRLF, b"\n"):
        if data.startswith(blank):
            return MimePart((), data[len(blank):])
    match = _BLANK_LINE.search(data, 0, limits.max_header_bytes + 3)
    if match:
        head, body = data[:match.start()], data[match.end():]
    elif len(data) > limits.max_header_bytes:
        raise LimitExceededError("MIME header block too large")
    else:
        head, body = data.rstrip(b"\r\n"), b""
        if not head:
            return MimePart()
    return MimePart(_header_lines(head, limits), body)


def _apply_content_length(part: MimePart) -> MimePart:
    value = part.header("content-length")
    if value is None:
        return part
    if not re.fullmatch(r"[0-9]{1,10}", value):
        raise MalformedError("bad Content-Length in a MIME entity")
    length = int(value)
    if length > len(part.body):
        raise MalformedError("MIME entity shorter than its Content-Length")
    # Like SIP over UDP: octets past Content-Length are not part of the body.
    return MimePart(part.headers, part.body[:length])


def _check_entity(part: MimePart) -> MimePart:
    # Parse the body-describing headers now, so that bad ones fail here.
    part.content_type, part.disposition, part.content_id, part.transfer_encoding  # noqa: B018
    return part


def parse_entity(data: bytes, limits: MimeLimits = DEFAULT_MIME_LIMITS) -> MimePart:
    """Parse a whole MIME entity, e.g. the plaintext that came out of an envelope."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("MIME entity must be bytes")
    data = bytes(data)
    limits.check_size(len(data))
    if not data:
        raise MalformedError("empty MIME entity")
    return _check_entity(_apply_content_length(_split_entity(data, limits)))


def body_part(headers: Iterable[tuple[str, str]], body: bytes,
              limits: MimeLimits = DEFAULT_MIME_LIMITS) -> MimePart:
    """The body of a SIP message as a part, from the message's own headers.

    Keeps the Content-* headers (compact ``c``/``e`` expanded) except
    Content-Length, which frames the SIP message, not the body.
    """
    limits.check_size(len(body))
    kept: list[tuple[str, str]] = []
    for name, value in headers:
        wanted = _body_header_name(name)
        if wanted is not None:
            kept.append((wanted, value.strip()))
    return _check_entity(MimePart(tuple(kept), bytes(body)))


@lru_cache(maxsize=512)
def _body_header_name(name: str) -> str | None:
    """The name a SIP header keeps on the body part, or None if it is not a body
    header (cached: a message repeats the same few dozen names)."""
    name = _COMPACT.get(name.strip().lower(), name.strip())
    lowered = name.lower()
    if lowered.startswith("content-") and lowered != "content-length":
        return name
    return None


# -- multipart --------------------------------------------------------------------

def _boundary_of(part: MimePart) -> bytes:
    boundary = part.content_type.param("boundary")
    if not boundary or not _BOUNDARY.fullmatch(boundary):
        raise MalformedError("multipart without a valid boundary")
    return boundary.encode("ascii")


def _part_spans(body: bytes, boundary: bytes, limits: MimeLimits) -> list[tuple[int, int]]:
    """Offsets of each body part (RFC 2046 §5.1.1).

    A delimiter is ``--boundary`` at the start of the body or of a line,
    optionally ``--`` (the close delimiter), then transport padding and the
    end of the line.  The line break before it belongs to the delimiter.  The
    boundary anywhere else in the body is refused (``MalformedError``).
    """
    delimiter = re.compile(rb"(?:\A|\r\n|\n)--" + re.escape(boundary)
                           + rb"(--)?[ \t]*(?=\r\n|\n|\Z)")
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for seen, match in enumerate(delimiter.finditer(body), 1):
        if start is not None:
            spans.append((start, max(start, match.start())))
            if len(spans) > limits.max_parts:
                raise LimitExceededError(f"more than {limits.max_parts} body parts")
        if match.group(1):
            if not spans:
                raise MalformedError("multipart closes before its first part")
            # ``--boundary`` anywhere else (mid-line, before the first delimiter, after
            # the close, followed by other characters) is a delimiter to a laxer parser
            # (pjsip's): what it would take for a part, we would not have checked
            if body.count(b"--" + boundary) != seen:
                raise MalformedError("a multipart's boundary appears outside its delimiters")
            return spans
        end = match.end()
        start = end + (2 if body.startswith(CRLF, end) else 1 if body.startswith(b"\n", end) else 0)
    raise MalformedError("multipart without a close delimiter")


def _multipart_body(part: MimePart, limits: MimeLimits) -> tuple[bytes, list[tuple[int, int]]]:
    if not part.content_type.is_multipart:
        raise MalformedError("not a multipart body")
    if part.transfer_encoding not in ("7bit", "8bit", "binary"):
        raise MalformedError("a multipart must not be transfer-encoded")  # RFC 2045 §6.4
    limits.check_size(len(part.body))
    return part.body, _part_spans(part.body, _boundary_of(part), limits)


def parse_multipart(part: MimePart, limits: MimeLimits = DEFAULT_MIME_LIMITS) -> list[MimePart]:
    """The body parts of a multipart part, in order (preamble and epilogue dropped)."""
    body, spans = _multipart_body(part, limits)
    return [_check_entity(_split_entity(body[s:e], limits)) for s, e in spans]


def _fresh_boundary(contents: Sequence[bytes]) -> str:
    while True:
        boundary = "e2m-" + secrets.token_hex(16)
        marker = b"--" + boundary.encode()
        if not any(marker in content for content in contents):
            return boundary


def _assemble(contents: Sequence[bytes], boundary: str) -> bytes:
    marker = b"--" + boundary.encode("ascii")
    out = bytearray()
    for content in contents:
        out += marker + CRLF + content + CRLF
    return bytes(out + marker + b"--" + CRLF)


def _pick_boundary(contents: Sequence[bytes], boundary: str | None) -> str:
    if boundary is None:
        return _fresh_boundary(contents)
    if not _BOUNDARY.fullmatch(boundary):
        raise ValueError("boundary must be 1-70 RFC 2046 bchars")
    if any(b"--" + boundary.encode() in content for content in contents):
        raise ValueError("boundary occurs inside a part")
    return boundary


def as_read(part: MimePart, limits: MimeLimits = DEFAULT_MIME_LIMITS,
            _depth: int = 0) -> MimePart:
    """``part`` written again from what this module read of it: its Content-Type from
    the parse, and a multipart's parts (each written again so) under a fresh boundary,
    preamble and epilogue left out.  A laxer parser reading the result finds what we
    found: no part, type or boundary of its own reading (reviews 59 and 62: pjsip read
    a plaintext SDP where we read text or nothing)."""
    content_type = part.content_type
    body = part.body
    if content_type.is_multipart:
        if _depth >= limits.max_depth:
            raise LimitExceededError("multiparts nested too deep")
        contents = [encode_part(as_read(child, limits, _depth + 1))
                    for child in parse_multipart(part, limits)]
        boundary = _fresh_boundary(contents)
        content_type = ContentType(content_type.mime_type, tuple(
            (name, value) for name, value in content_type.params if name != "boundary")
            + (("boundary", boundary),))
        body = _assemble(contents, boundary)
    headers = [("Content-Type", str(content_type))]
    headers += [(name, value) for name, value in part.headers
                if name.lower() not in ("content-type", "content-length")]
    return MimePart(tuple(headers), body)


def multipart_mixed(parts: Sequence[MimePart], *, boundary: str | None = None,
                    disposition: str | Disposition | None = None) -> MimePart:
    """``multipart/mixed`` of ``parts`` (e2m-sec-02 §4.2).

    Give each part its own Content-ID and handling (``smime_entity`` does):
    ``optional`` for proxy-only envelopes, ``required`` for the UAS part.  The
    multipart itself gets a Content-Disposition only if ``disposition`` is
    given: absent means handling=required, which is what e2m-sec-02 asks for.
    """
    if not parts:
        raise ValueError("a multipart needs at least one part")
    contents = [encode_part(p) for p in parts]
    chosen = _pick_boundary(contents, boundary)
    return make_part(ContentType("multipart/mixed", (("boundary", chosen),)),
                     _assemble(contents, chosen), disposition=disposition)


@dataclass(frozen=True)
class SignedParts:
    """A parsed ``multipart/signed``.

    ``signed_bytes`` is exactly what the detached signature covers: from the
    first byte of the signed part's headers up to, not including, the line
    break before the next delimiter.
    """

    signed_bytes: bytes
    signed_part: MimePart
    signature: bytes
    micalg: str | None


def multipart_signed(signed: bytes | MimePart, signature_der: bytes, *,
                     micalg: str = "sha-256", boundary: str | None = None) -> MimePart:
    """``multipart/signed`` (RFC 1847, RFC 3261 §23.4) of a signed entity and its signature.

    ``signed`` must be the very bytes that were signed (e.g. ``inner_entity``
    output), or a part whose ``encode_part`` bytes were signed.
    """
    content = encode_part(signed) if isinstance(signed, MimePart) else bytes(signed)
    if not signature_der or signature_der[0] != 0x30:
        raise ValueError("signature_der must be a DER ContentInfo")
    signature = make_part(
        ContentType(PKCS7_SIGNATURE, (("name", "smime.p7s"),)), signature_der,
        disposition=Disposition("attachment", (("handling", "required"),
                                               ("filename", "smime.p7s"))),
        transfer_encoding="binary")
    contents = [content, encode_part(signature)]
    chosen = _pick_boundary(contents, boundary)
    content_type = ContentType("multipart/signed", (
        ("protocol", PKCS7_SIGNATURE), ("micalg", micalg), ("boundary", chosen)))
    return make_part(content_type, _assemble(contents, chosen))


def parse_signed(part: MimePart, limits: MimeLimits = DEFAULT_MIME_LIMITS) -> SignedParts:
    """Split a ``multipart/signed`` into the signed bytes and the signature DER."""
    if part.content_type.mime_type != "multipart/signed":
        raise MalformedError("not a multipart/signed body")
    protocol = part.content_type.param("protocol")
    if protocol is None:
        raise MalformedError("multipart/signed without a protocol parameter")
    if protocol.lower() not in _SIGNATURE_TYPES:
        raise UnsupportedAlgorithmError("multipart/signed with a non-CMS signature protocol")
    body, spans = _multipart_body(part, limits)
    if len(spans) != 2:
        raise MalformedError("multipart/signed needs exactly two parts")
    signed_bytes = body[spans[0][0]:spans[0][1]]
    signature = _check_entity(_split_entity(body[spans[1][0]:spans[1][1]], limits))
    if signature.content_type.mime_type not in _SIGNATURE_TYPES:
        raise MalformedError("second part of multipart/signed is not a pkcs7-signature")
    der = signature.decoded()
    if not der or der[0] != 0x30:
        raise MalformedError("signature part does not hold a DER ContentInfo")
    try:
        signed_part = _check_entity(_split_entity(signed_bytes, limits))
    except MalformedError:
        # openssl signs bare text with no MIME headers at all: the signature
        # covers the bytes, so a headerless part is still a valid signed part.
        signed_part = MimePart((), signed_bytes)
    return SignedParts(signed_bytes, signed_part, der, part.content_type.param("micalg"))


def canonical_text(data: bytes) -> bytes:
    """Every line break as CRLF (RFC 5751 §3.1.1), for text only: binary would break."""
    return data.replace(CRLF, b"\n").replace(b"\n", CRLF)


# -- helpers for the engines ------------------------------------------------------

def is_cms(part: MimePart) -> bool:
    """Whether the part's media type says its body is CMS (pkcs7-mime or -signature)."""
    return part.content_type.mime_type in CMS_MIME_TYPES


def smime_type_of(part: MimePart) -> str | None:
    """The smime-type of a pkcs7-mime part in RFC 8551 spelling, or None for other parts.

    Old senders omit the parameter; then the ContentInfo's contentType says.
    An unknown value comes back lower-cased as it is.
    """
    if part.content_type.mime_type not in _PKCS7_MIME_TYPES:
        return None
    value = part.content_type.param("smime-type")
    if value:
        return _SMIME_TYPES.get(value.lower(), value.lower())
    return _SMIME_TYPE_BY_OID.get(content_info_type(part.decoded()))


def find_by_cid(parts: Iterable[MimePart], cid: str) -> MimePart | None:
    """The one part whose Content-ID is ``cid`` (with or without brackets), or None.

    Two parts with that Content-ID are malformed: a proxy and the UAS must not
    be able to pick different ones.
    """
    found = [p for p in parts if p.content_id is not None and same_cid(p.content_id, cid)]
    if len(found) > 1:
        raise MalformedError("two body parts share one Content-ID")
    return found[0] if found else None


def walk(part: MimePart, limits: MimeLimits = DEFAULT_MIME_LIMITS) -> Iterator[MimePart]:
    """``part`` and every part nested in it through multiparts, depth first, in order.

    Does not look inside CMS: parse the plaintext of an envelope and walk it
    again.  Depth and the total number of parts are bounded.
    """
    count = [0]
    yield from _walk(part, 0, limits, count)


def _walk(part: MimePart, depth: int, limits: MimeLimits, count: list[int]) -> Iterator[MimePart]:
    count[0] += 1
    if count[0] > limits.max_total_parts:
        raise LimitExceededError(f"more than {limits.max_total_parts} body parts in all")
    yield part
    if not part.content_type.is_multipart:
        return
    if depth >= limits.max_depth:
        raise LimitExceededError("multiparts nested too deep")
    for child in parse_multipart(part, limits):
        yield from _walk(child, depth + 1, limits, count)
