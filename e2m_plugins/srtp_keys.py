"""Where SRTP keys may hide in a body a UA is about to send.

Only a whole ``application/sdp`` body is split (its keying lines sealed for the peer
alone, docs/protocol.md §6.1).  Anything else that holds keys must not be sealed for a
proxy, nor go out unprotected: ``holds_keys`` answers whether a body may hold any.

It looks at every part a reader without a key could read: the parts of multiparts,
the signed content of a ``multipart/signed`` or of a signed-data (a signature hides
nothing), the entity inside a SIP fragment or a CPIM wrapper (read leniently, as a
SIP parser would, not as strict MIME), with each part's transfer encoding, content
coding (gzip, deflate) and declared character set undone.  An SDP is parsed
(``sdp.has_keys``); every part's bytes, and its text in its declared charset, are
scanned for anything that looks like a keying line (``sdp.mentions_keys``), NULs
dropped (UTF-16 and UTF-32 without a charset).  Only an envelope (enveloped-data,
authEnveloped-data) is not looked into: its sender chose its readers.

It fails closed: what it cannot read whole counts as holding keys (an unknown content
coding or charset, a coded stream with bytes after its end or cut short, a signed
content that is not a MIME entity, a fragment's entity whose Content-Type does not
parse, an SDP that does not parse).  Its work is bounded: the parts met, their depth
and the bytes all content codings of one body may inflate to, together
(``Limits.max_body_bytes``).  Not found: keys a user encoded further themselves
(base64 in a chat text).
"""

from __future__ import annotations

import codecs
import re
import zlib
from collections.abc import Sequence

from . import mime
from .cms.limits import DEFAULT_LIMITS, Limits
from .cms.signed import signed_content
from .errors import E2MError, LimitExceededError, MalformedError
from .sdp import KEYING_ATTRIBUTES, has_keys, mentions_keys, separate_keys

__all__ = ["holds_keys", "without_keys"]

_ENVELOPES = ("enveloped-data", "authEnveloped-data")
_FRAGMENTS = ("message/sipfrag", "message/sip", "message/cpim")
_IDENTITY = ("", "identity")
_INFLATE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
            "deflate": zlib.MAX_WBITS}
# charsets whose bytes spell ASCII as ASCII: the byte scan already read them
_ASCII_SPELLED = ("us-ascii", "ascii", "utf-8", "utf8")
# text codecs whose decoding is not linear (punycode: review 172 K3); idna is built on it
_SLOW_CODECS = ("punycode", "idna")
# a SIP start line ahead of a fragment's headers (a request's or a status line)
_START_LINE = re.compile(rb"(?:SIP/2\.0[ \t]+\d{3}[^\r\n]*|[!-~]+[ \t]+[^ \t\r\n]+[ \t]+SIP/2\.0)"
                         rb"[ \t]*\r?\n")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_HEADER = re.compile(rb"([!-9;-~]+)[ \t]*:[ \t]*(.*)")
_WRAPPERS = 3    # header blocks before a fragment's own entity (CPIM has two)
# a fragment's headers that describe its body, compact forms (RFC 3261 §7.3.3) too
_BODY_HEADERS = {"content-type": "Content-Type", "c": "Content-Type",
                 "content-transfer-encoding": "Content-Transfer-Encoding",
                 "content-encoding": "Content-Encoding", "e": "Content-Encoding"}


WITHHELD = b"[withheld by the proxy: this part may hold SRTP keys]\r\n"


def without_keys(part: mime.MimePart, content: bytes,
                 keying_attributes: Sequence[str] = KEYING_ATTRIBUTES) -> bytes:
    """What a proxy may keep of a part it read (``content``, its plaintext): an SDP
    without its keying lines (the view a split would have given it), any other part as
    it is when it holds no keys, else ``WITHHELD`` whole.  A proxy reads the keys of an
    SDP a UA sent unsplit (a stock phone's SDES, a ``[[legacy]]`` peer, ``require =
    false``); it must not keep them (review 175 K1).  A part is not cut line by line:
    a key beside a cut line, or a cut marker larger than what it replaced, were what
    cutting left (review 176)."""
    if part.content_type.mime_type == "application/sdp":
        if not _may_name_keys(content, keying_attributes):
            return content        # no keying name anywhere: no second parse per SDP
        try:
            view, _ = separate_keys(content, keying_attributes)
        except (MalformedError, LimitExceededError):
            return WITHHELD
        return view
    cleartext = mime.MimePart(tuple((n, v) for n, v in part.headers
                                    if n.lower() != "content-transfer-encoding"), content)
    try:
        return WITHHELD if holds_keys(cleartext, keying_attributes) else content
    except E2MError:
        return WITHHELD


def _may_name_keys(sdp: bytes, keying_attributes: Sequence[str]) -> bool:
    """Whether ``sdp`` holds ``k=`` or a keying attribute's name anywhere (any case): a
    superset of what ``separate_keys`` takes out, a few microseconds on an SDP."""
    lowered = sdp.lower()
    return b"k=" in lowered or any(name.strip().lower().encode("ascii", "replace") in lowered
                                   for name in keying_attributes)


class _Unreadable(Exception):
    """Something in the body cannot be read whole: count it as holding keys."""


def holds_keys(part: mime.MimePart, keying_attributes: Sequence[str] = KEYING_ATTRIBUTES,
               limits: Limits = DEFAULT_LIMITS) -> bool:
    """Whether ``part`` may hold SRTP keys anywhere a reader without a key could read
    (see the module's docstring).  ``LimitExceededError`` past the bounds."""
    return _Reading(keying_attributes, limits).holds(part)


class _Reading:
    """One body's look: its bounds are shared by all its parts."""

    def __init__(self, keying_attributes: Sequence[str], limits: Limits) -> None:
        self.keying = keying_attributes
        self.limits = limits
        self.mime_limits = mime.MimeLimits.from_limits(limits)
        self.parts_left = self.mime_limits.max_total_parts
        self.inflate_left = limits.max_body_bytes

    def holds(self, part: mime.MimePart) -> bool:
        try:
            return self._visit(part, 0)
        except _Unreadable:
            return True

    def _visit(self, node: mime.MimePart, depth: int) -> bool:
        self.parts_left -= 1
        if self.parts_left < 0:
            raise LimitExceededError(
                f"more than {self.mime_limits.max_total_parts} body parts in all")
        if depth > self.mime_limits.max_depth:
            raise LimitExceededError("body parts nested too deep")
        try:
            ctype = node.content_type
            content = self._content(node)
        except MalformedError:
            raise _Unreadable from None
        if self._mentions(content, ctype.param("charset")):
            return True
        kind = ctype.mime_type
        if ctype.is_multipart:
            return any(self._visit(child, depth + 1)
                       for child in mime.parse_multipart(node, self.mime_limits))
        if mime.is_cms(node):
            return self._cms_holds(node, content, depth)
        if kind == "application/sdp":
            try:
                return has_keys(content, self.keying)
            except (MalformedError, LimitExceededError):
                raise _Unreadable from None
        if kind in _FRAGMENTS:
            inner = _fragment_entity(content)
            return inner is not None and self._visit(inner, depth + 1)
        return False

    def _mentions(self, content: bytes, charset: str | None) -> bool:
        """A keying line in the bytes (NULs dropped), or in the text the declared
        charset makes of them."""
        if mentions_keys(content.replace(b"\x00", b""), self.keying):
            return True
        charset = (charset or "").strip().lower()
        if not charset or charset in _ASCII_SPELLED:
            return False
        try:
            slow = codecs.lookup(charset).name in _SLOW_CODECS
        except LookupError:
            raise _Unreadable from None       # a charset we do not know
        if slow:
            raise _Unreadable                 # no text is sent so; its decoder is quadratic
        try:
            # bytes.decode takes text encodings only: a "charset" naming bz2 or zlib
            # (a codec without bound) is a LookupError (review 172 K2)
            text = content.decode(charset)
        except LookupError:
            raise _Unreadable from None
        except (UnicodeError, ValueError):
            raise _Unreadable from None       # not text in its own charset
        return mentions_keys(text.encode("utf-8", "surrogatepass"), self.keying)

    def _content(self, node: mime.MimePart) -> bytes:
        """The part's bytes with its transfer encoding and content coding undone."""
        content = node.decoded()
        coding = (node.header("Content-Encoding") or "").strip().lower()
        if coding in _IDENTITY:
            return content
        wbits = _INFLATE.get(coding)
        if wbits is None:
            raise _Unreadable
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(content, self.inflate_left + 1)
        except zlib.error:
            raise _Unreadable from None
        if len(out) > self.inflate_left:
            raise LimitExceededError("the body's content codings inflate past the body limit")
        if not inflater.eof or inflater.unused_data:
            raise _Unreadable                 # cut short, or more after its end
        self.inflate_left -= len(out)
        return out

    def _cms_holds(self, node: mime.MimePart, content: bytes, depth: int) -> bool:
        if node.content_type.mime_type.endswith("pkcs7-signature"):
            return False                      # a detached signature: no content in it
        kind = mime.smime_type_of(node)
        if kind in _ENVELOPES:
            return False
        if kind != "signed-data":
            raise _Unreadable                 # compressed-data and the like
        try:
            inner = signed_content(content, self.limits)
        except E2MError:
            raise _Unreadable from None
        if inner is None:
            return False                      # detached: the content is another part
        if self._mentions(inner, None):     # BER segments joined
            return True
        try:
            entity = mime.parse_entity(inner, self.mime_limits)
        except (MalformedError, LimitExceededError):
            raise _Unreadable from None       # S/MIME content is always an entity
        return self._visit(entity, depth + 1)


def _fragment_entity(content: bytes) -> mime.MimePart | None:
    """The entity a SIP fragment or a CPIM message carries, read as a SIP parser would
    (leading blank lines and a start line skipped, any headers, compact names, folded
    lines): the first header block with a Content-Type describes what follows it;
    blocks without one (CPIM's own) are skipped.  None when no block has a body (a
    status-only sipfrag: its bytes were scanned already)."""
    data = content
    for _ in range(_WRAPPERS):
        data = data.lstrip(b"\r\n")
        match = _START_LINE.match(data)
        if match:
            data = data[match.end():]
        split = _BLANK_LINE.search(data)
        if split is None:
            return None
        head, data = data[:split.start()], data[split.end():]
        described = _body_headers(head)
        if "Content-Type" in described:
            return mime.MimePart(tuple(described.items()), data)
    return None


def _body_headers(head: bytes) -> dict[str, str]:
    """The body-describing headers of a header block, folded lines joined; a line that
    is not a header makes the block unreadable."""
    out: dict[str, str] = {}
    lines = re.sub(rb"\r?\n[ \t]+", b" ", head).split(b"\n")
    for raw in lines:
        line = raw.rstrip(b"\r")
        match = _HEADER.fullmatch(line)
        if match is None:
            raise _Unreadable
        name = _BODY_HEADERS.get(match.group(1).decode("ascii").lower())
        if name is not None:
            if name in out:
                raise _Unreadable             # two say what the body is
            out[name] = match.group(2).decode("utf-8", "replace").strip()
    return out
