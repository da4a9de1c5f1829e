"""Where SRTP keys may hide in a body a UA is about to send.

Only a whole ``application/sdp`` body is split (its keying lines sealed for the peer
alone, docs/protocol.md §6.1).  Anything else that holds keys must not be sealed for a
proxy, nor go out unprotected: ``holds_keys`` answers whether a body may hold any.

It looks at every part a reader without a key could read: the parts of multiparts,
the signed content of a ``multipart/signed`` or of a signed-data (a signature hides
nothing), the entity inside a SIP fragment or a CPIM wrapper, with each part's
transfer encoding and content coding (gzip, deflate) undone.  An SDP is parsed
(``sdp.has_keys``); every part is also scanned as bytes, preamble and epilogue
included, NULs dropped (UTF-16 and UTF-32 text), for anything that looks like a keying
line (``sdp.mentions_keys``).  Only an envelope (enveloped-data, authEnveloped-data)
is not looked into: its sender chose its readers.  What cannot be looked into (an
unknown content coding, a compressed-data, an SDP that does not parse) counts as
holding keys.  Not found: keys a user encoded further themselves (base64 in a chat
text, another character set).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

from . import mime
from .cms.limits import DEFAULT_LIMITS, Limits
from .cms.signed import signed_content
from .errors import E2MError, LimitExceededError, MalformedError
from .sdp import KEYING_ATTRIBUTES, has_keys, mentions_keys

__all__ = ["holds_keys"]

_ENVELOPES = ("enveloped-data", "authEnveloped-data")
_FRAGMENTS = ("message/sipfrag", "message/sip", "message/cpim")
_IDENTITY = ("", "identity")
_INFLATE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
            "deflate": zlib.MAX_WBITS}
# a SIP start line ahead of a fragment's headers (a request's or a status line)
_START_LINE = re.compile(rb"(?:SIP/2\.0[ \t]+\d{3}[^\r\n]*|[!-~]+[ \t]+[^ \t\r\n]+[ \t]+SIP/2\.0)"
                         rb"[ \t]*\r?\n")
_WRAPPERS = 3    # header blocks before a fragment's own entity (CPIM has two)


def holds_keys(part: mime.MimePart, keying_attributes: Sequence[str] = KEYING_ATTRIBUTES,
               limits: Limits = DEFAULT_LIMITS) -> bool:
    """Whether ``part`` may hold SRTP keys anywhere a reader without a key could read
    (see the module's docstring).  ``LimitExceededError`` past the MIME bounds."""
    mime_limits = mime.MimeLimits.from_limits(limits)
    seen = [0]

    def visit(node: mime.MimePart, depth: int) -> bool:
        seen[0] += 1
        if seen[0] > mime_limits.max_total_parts:
            raise LimitExceededError(f"more than {mime_limits.max_total_parts} body parts in all")
        if depth > mime_limits.max_depth:
            raise LimitExceededError("body parts nested too deep")
        content = _content(node, mime_limits)
        if content is None:
            return True                       # a coding we cannot undo: cannot tell
        if mentions_keys(content.replace(b"\x00", b""), keying_attributes):
            return True
        ctype = node.content_type.mime_type
        if node.content_type.is_multipart:
            return any(visit(child, depth + 1) for child in mime.parse_multipart(node, mime_limits))
        if mime.is_cms(node):
            return _cms_holds(node, content, depth)
        if ctype == "application/sdp":
            try:
                return has_keys(content, keying_attributes)
            except (MalformedError, LimitExceededError):
                return True
        if ctype in _FRAGMENTS:
            inner = _fragment_entity(content, mime_limits)
            return inner is not None and visit(inner, depth + 1)
        return False

    def _cms_holds(node: mime.MimePart, content: bytes, depth: int) -> bool:
        if node.content_type.mime_type.endswith("pkcs7-signature"):
            return False                      # a detached signature: no content in it
        kind = mime.smime_type_of(node)
        if kind in _ENVELOPES:
            return False
        if kind != "signed-data":
            return True                       # compressed-data and the like: unseen
        try:
            inner = signed_content(content, limits)
        except E2MError:
            return True
        if inner is None:
            return False
        try:
            entity = mime.parse_entity(inner, mime_limits)
        except (MalformedError, LimitExceededError):
            return False                      # scanned as bytes above already
        return visit(entity, depth + 1)

    return visit(part, 0)


def _content(node: mime.MimePart, limits: mime.MimeLimits) -> bytes | None:
    """The part's bytes with its transfer encoding and content coding undone; None for a
    content coding this module does not know."""
    content = node.decoded()
    coding = (node.header("Content-Encoding") or "").strip().lower()
    if coding in _IDENTITY:
        return content
    wbits = _INFLATE.get(coding)
    if wbits is None:
        return None
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(content, limits.max_bytes + 1)
    except zlib.error:
        return None
    if len(out) > limits.max_bytes:
        raise LimitExceededError("a compressed body inflates past the body limit")
    return out


def _fragment_entity(content: bytes, limits: mime.MimeLimits) -> mime.MimePart | None:
    """The MIME entity a SIP fragment or a CPIM message carries: its start line (if
    any) dropped, header blocks without a Content-Type (CPIM's own) skipped; None when
    there is none to read (a status-only sipfrag, a fragment that does not parse:
    its bytes were scanned already)."""
    data = _START_LINE.sub(b"", content, count=1) if _START_LINE.match(content) else content
    for _ in range(_WRAPPERS):
        if not data.strip():
            return None
        try:
            entity = mime.parse_entity(data, limits)
        except (MalformedError, LimitExceededError):
            return None
        if entity.header("Content-Type") is not None:
            return entity
        data = entity.body
    return None
