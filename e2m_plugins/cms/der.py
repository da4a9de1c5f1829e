"""A lean DER/BER reader and a DER writer for the CMS structures we handle.

Why not asn1crypto on this path: a proxy opens one envelope per SIP message and
asn1crypto spends 40-120 µs per parse, more than the key unwrap and AES that
follow.  This reader walks the bytes once with plain slices and builds no
objects beyond what the caller asks for.  It accepts the BER forms that real
senders emit (indefinite lengths, constructed OCTET STRINGs) and rejects
anything out of bounds with ``MalformedError``.

Each element is read once per parse.  An indefinite-length element can only be
measured by reading its children, so those are kept on it; a definite-length
element reads its children the first time they are asked for and keeps them too.
So a deeply nested BER body costs what it holds, not what it holds times its
depth.  ``read_all(data, max_elements=n)`` also bounds the elements one body may
make us read (``LimitExceededError``), counted across every later ``items`` and
``children`` call on that parse.
"""

from __future__ import annotations

from typing import Iterator

from ..errors import LimitExceededError, MalformedError

# Universal tags (class 0) as they appear in the identifier octet.
BOOLEAN = 0x01
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
UTF8_STRING = 0x0C
SEQUENCE = 0x30
SET = 0x31
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18

CONSTRUCTED = 0x20
CONTEXT = 0x80

_MAX_DEPTH = 64  # nesting guard, counted from the element a parse started at
_NO_LIMIT = 1 << 62


def context(number: int, constructed: bool = True) -> int:
    """Identifier octet of a context-specific tag [number] (low tag numbers only)."""
    return CONTEXT | (CONSTRUCTED if constructed else 0) | number


class _Parse:
    """One parse of one body: how many more elements it may read, and its bound."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int | None) -> None:
        self.limit = _NO_LIMIT if limit is None else limit
        self.left = self.limit


class TLV:
    """One element: its identifier octet and where its contents lie in ``buf``.

    ``end`` is the end of the contents; ``next`` is where the following element
    starts (they differ by two for indefinite-length elements).  A plain slotted
    class rather than a frozen dataclass: a frozen dataclass's ``__init__``
    costs several times more, and the opener makes some twenty of these per
    message.  Treat instances as read-only.
    """

    __slots__ = ("buf", "tag", "header_start", "start", "end", "next", "depth", "_parse", "_kids")

    def __init__(self, buf: bytes, tag: int, header_start: int, start: int, end: int,
                 next: int, depth: int = 0, parse: _Parse | None = None,  # noqa: A002 - DER's word
                 kids: list["TLV"] | None = None) -> None:
        self.buf = buf
        self.tag = tag
        self.header_start = header_start
        self.start = start
        self.end = end
        self.next = next
        self.depth = depth
        self._parse = parse
        self._kids = kids

    def __repr__(self) -> str:
        return f"TLV(tag=0x{self.tag:02x}, length={self.end - self.start})"

    @property
    def constructed(self) -> bool:
        return bool(self.tag & CONSTRUCTED)

    @property
    def indefinite(self) -> bool:
        return self.next != self.end

    @property
    def value(self) -> bytes:
        return self.buf[self.start:self.end]

    @property
    def encoded(self) -> bytes:
        """The whole element (header and contents) as bytes."""
        return self.buf[self.header_start:self.next]

    def _children(self) -> list["TLV"]:
        """The children, read on first use and kept (never read twice)."""
        kids = self._kids
        if kids is None:
            if not self.tag & CONSTRUCTED:
                raise MalformedError("expected a constructed element")
            parse = self._parse if self._parse is not None else _Parse(None)
            buf, pos, end, depth = self.buf, self.start, self.end, self.depth + 1
            if depth > _MAX_DEPTH and pos < end:
                raise MalformedError("DER nested too deeply")
            kids = []
            while pos < end:
                child = _read(buf, pos, end, depth, parse)
                kids.append(child)
                pos = child.next
            self._kids = kids
        return kids

    def children(self) -> Iterator["TLV"]:
        if not self.constructed:
            raise MalformedError("expected a constructed element")
        return iter(self._children())

    def expect(self, tag: int, what: str) -> "TLV":
        if self.tag != tag:
            raise MalformedError(f"{what}: unexpected tag 0x{self.tag:02x}")
        return self


def read(buf: bytes, pos: int = 0, limit: int | None = None, *, max_elements: int | None = None) -> TLV:
    """Decode the element starting at ``pos`` without reading past ``limit``."""
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    return _read(buf, pos, len(buf) if limit is None else limit, 0, _Parse(max_elements))


def _read(buf: bytes, pos: int, limit: int, depth: int, parse: _Parse) -> TLV:
    # The hot path: ``buf`` is bytes (indexing bytes is cheaper than a memoryview).
    # One call reads one element (an indefinite one also reads its children, each
    # through this function once): ``parse.left`` counts them down.  ``depth`` is
    # checked by whoever reads children (once per parent, not per element).
    parse.left -= 1
    if parse.left < 0:
        raise LimitExceededError(f"more than {parse.limit} DER elements in one body")
    if pos + 2 > limit:
        raise MalformedError("truncated DER element")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise MalformedError("high-numbered ASN.1 tags are not used in CMS")
    first = buf[pos + 1]
    pos_len = pos + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        if not tag & CONSTRUCTED:
            raise MalformedError("indefinite length on a primitive element")
        # Indefinite length: its children must be read to find the end-of-contents
        # octets, so they are kept on the element and never read again.
        kids: list[TLV] = []
        cur = pos_len
        while True:
            if cur + 2 > limit:
                raise MalformedError("unterminated indefinite-length element")
            if buf[cur] == 0 and buf[cur + 1] == 0:
                return TLV(buf, tag, pos, pos_len, cur, cur + 2, depth, parse, kids)
            if depth >= _MAX_DEPTH:
                raise MalformedError("DER nested too deeply")
            child = _read(buf, cur, limit, depth + 1, parse)
            kids.append(child)
            cur = child.next
    else:
        count = first & 0x7F
        if count > 4 or pos_len + count > limit:
            raise MalformedError("bad DER length")
        length = int.from_bytes(buf[pos_len:pos_len + count], "big")
        pos_len += count
    end = pos_len + length
    if end > limit:
        raise MalformedError("DER element runs past the end of its container")
    return TLV(buf, tag, pos, pos_len, end, end, depth, parse)


class Count(_Parse):
    """A bound on the elements several parses may read together (``read_all(...,
    count=)``): what one has read is no longer left to the others, whether it
    succeeded or not.  ``left`` is what is left."""

    __slots__ = ()


def read_all(data: bytes | memoryview, *, max_elements: int | None = None,
             count: Count | None = None) -> TLV:
    """Decode one element that must span ``data`` exactly.

    ``max_elements`` bounds the elements this parse may read, now and through
    later ``items``/``children`` calls on what it returns; ``count`` instead shares
    one bound between this parse and others.
    """
    buf = data if isinstance(data, bytes) else bytes(data)
    tlv = _read(buf, 0, len(buf), 0, count if count is not None else _Parse(max_elements))
    if tlv.next != len(buf):
        raise MalformedError("trailing bytes after the DER element")
    return tlv


def scan(data: bytes | memoryview, count: Count) -> None:
    """Read every element of the one element that spans ``data`` (itself and all it
    holds) by its header only, building nothing, each counted against ``count``:
    ``LimitExceededError`` past it, ``MalformedError`` where ``read_all`` would refuse.
    What it read before either stays counted.  About a third of the cost of reading
    the same elements with ``read_all`` and ``items``, for a count of what a
    certificate holds before anything else reads it."""
    buf = data if isinstance(data, bytes) else bytes(data)
    end = _scan(buf, 0, len(buf), 0, count)
    if end != len(buf):
        raise MalformedError("trailing bytes after the DER element")


def _scan(buf: bytes, pos: int, limit: int, depth: int, count: Count) -> int:
    """The element at ``pos`` and everything in it; returns where the next one starts.
    Its header checks are ``_read``'s, written again rather than shared: ``_read`` is the
    opener's hot path (some 80 elements per message), where a call per element costs."""
    count.left -= 1
    if count.left < 0:
        raise LimitExceededError(f"more than {count.limit} DER elements in one body")
    if pos + 2 > limit:
        raise MalformedError("truncated DER element")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise MalformedError("high-numbered ASN.1 tags are not used in CMS")
    first = buf[pos + 1]
    start = pos + 2
    if first == 0x80:
        if not tag & CONSTRUCTED:
            raise MalformedError("indefinite length on a primitive element")
        if depth >= _MAX_DEPTH:
            raise MalformedError("DER nested too deeply")
        cur = start
        while True:
            if cur + 2 > limit:
                raise MalformedError("unterminated indefinite-length element")
            if buf[cur] == 0 and buf[cur + 1] == 0:
                return cur + 2
            cur = _scan(buf, cur, limit, depth + 1, count)
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n > 4 or start + n > limit:
            raise MalformedError("bad DER length")
        length = int.from_bytes(buf[start:start + n], "big")
        start += n
    end = start + length
    if end > limit:
        raise MalformedError("DER element runs past the end of its container")
    if tag & CONSTRUCTED and start < end:
        if depth >= _MAX_DEPTH:
            raise MalformedError("DER nested too deeply")
        cur = start
        while cur < end:
            cur = _scan(buf, cur, end, depth + 1, count)
    return end


def first_child(data: bytes | memoryview, *, whole: bool = False) -> TLV | None:
    """The first element inside the constructed element that starts ``data``, reading
    nothing else: not the rest of an indefinite-length outer element, not its end.
    (A cheap look at a ContentInfo's contentType; ``read_all`` checks the whole.)
    ``whole``: a definite-length outer element must span ``data`` exactly."""
    buf = data if isinstance(data, bytes) else bytes(data)
    if len(buf) < 2:
        raise MalformedError("truncated DER element")
    if not buf[0] & CONSTRUCTED or buf[0] & 0x1F == 0x1F:
        raise MalformedError("expected a constructed element")
    first = buf[1]
    start, end = 2, len(buf)
    if first < 0x80:
        end = start + first
    elif first != 0x80:
        count = first & 0x7F
        if count > 4 or start + count > len(buf):
            raise MalformedError("bad DER length")
        end = start + count + int.from_bytes(buf[start:start + count], "big")
        start += count
    if end > len(buf):
        raise MalformedError("DER element runs past the end of its container")
    if whole and first != 0x80 and end != len(buf):
        raise MalformedError("trailing bytes after the DER element")
    if start == end or (first == 0x80 and buf[start:start + 2] == b"\x00\x00"):
        return None
    return _read(buf, start, end, 1, _Parse(None))


def items(tlv: TLV, minimum: int = 0, what: str = "structure") -> list[TLV]:
    """The children of a constructed element, with a minimum count check."""
    kids = tlv._kids
    if kids is None:
        # TLV._children inlined: this is the opener's hot path.
        if not tlv.tag & CONSTRUCTED:
            raise MalformedError(f"{what}: expected a constructed element")
        parse = tlv._parse if tlv._parse is not None else _Parse(None)
        buf, pos, end, depth = tlv.buf, tlv.start, tlv.end, tlv.depth + 1
        if depth > _MAX_DEPTH and pos < end:
            raise MalformedError("DER nested too deeply")
        kids = []
        while pos < end:
            # most elements have a short definite length: read here, as ``_read`` would,
            # without a call each (anything else, or any doubt, goes to ``_read``)
            if parse.left > 0 and pos + 2 <= end:
                tag, first = buf[pos], buf[pos + 1]
                nxt = pos + 2 + first
                if first < 0x80 and tag & 0x1F != 0x1F and nxt <= end:
                    parse.left -= 1
                    kids.append(TLV(buf, tag, pos, pos + 2, nxt, nxt, depth, parse))
                    pos = nxt
                    continue
            child = _read(buf, pos, end, depth, parse)
            kids.append(child)
            pos = child.next
        tlv._kids = kids
    if len(kids) < minimum:
        raise MalformedError(f"{what}: too few fields")
    return kids[:]


_MAX_SEGMENT_DEPTH = 8  # BER segments of segments: real encoders use one level


def octets(tlv: TLV, _depth: int = 0) -> bytes:
    """Contents of an OCTET STRING, joining BER constructed segments."""
    if not tlv.constructed:
        return tlv.value
    if _depth >= _MAX_SEGMENT_DEPTH:
        raise MalformedError("constructed OCTET STRING nested too deeply")
    return b"".join(octets(child, _depth + 1) for child in tlv.children())


def integer(tlv: TLV) -> int:
    tlv.expect(INTEGER, "INTEGER")
    if tlv.end == tlv.start:
        raise MalformedError("empty INTEGER")
    return int.from_bytes(tlv.buf[tlv.start:tlv.end], "big", signed=True)


_OID_CACHE: dict[bytes, str] = {}
_OID_CACHE_MAX = 512  # distinct OIDs seen in practice are a few dozen
_MAX_ARC_BYTES = 20   # 140 bits: room for UUID arcs (2.25.<128 bits>), no more
_MAX_OID_BYTES = 128


def oid(tlv: TLV) -> str:
    """Dotted form of an OBJECT IDENTIFIER (decoded once per distinct value)."""
    tlv.expect(OID, "OBJECT IDENTIFIER")
    raw = tlv.buf[tlv.start:tlv.end]
    cached = _OID_CACHE.get(raw)
    if cached is not None:
        return cached
    if not raw or raw[-1] & 0x80 or len(raw) > _MAX_OID_BYTES:
        raise MalformedError("bad OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    arc_bytes = 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        arc_bytes += 1
        if arc_bytes > _MAX_ARC_BYTES:  # keeps the shifts linear and str() cheap
            raise MalformedError("OBJECT IDENTIFIER arc too large")
        if not byte & 0x80:
            arcs.append(value)
            value = 0
            arc_bytes = 0
    first = arcs[0]
    top = min(first // 40, 2)
    dotted = ".".join(str(a) for a in [top, first - 40 * top] + arcs[1:])
    if len(_OID_CACHE) < _OID_CACHE_MAX:
        _OID_CACHE[raw] = dotted
    return dotted


def bit_string_bytes(tlv: TLV) -> bytes:
    tlv.expect(BIT_STRING, "BIT STRING")
    raw = tlv.value
    if not raw or raw[0] != 0:
        raise MalformedError("BIT STRING with unused bits")
    return raw[1:]


# --------------------------------------------------------------------------
# Writer: plain functions returning DER bytes.


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, contents: bytes) -> bytes:
    return bytes([tag]) + _length(len(contents)) + contents


def seq(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def set_of(*parts: bytes) -> bytes:
    """SET OF in DER order (elements sorted by their encodings)."""
    return tlv(SET, b"".join(sorted(parts)))


def octet_string(value: bytes) -> bytes:
    return tlv(OCTET_STRING, value)


def enc_integer(value: int) -> bytes:
    length = max(1, (value.bit_length() + 8) // 8)
    return tlv(INTEGER, value.to_bytes(length, "big", signed=True))


def enc_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2:
        raise ValueError("an OID needs two arcs")
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return tlv(OID, bytes(out))


def bit_string(value: bytes) -> bytes:
    return tlv(BIT_STRING, b"\x00" + value)


def explicit(number: int, inner: bytes) -> bytes:
    return tlv(context(number, True), inner)


def implicit(number: int, inner_der: bytes) -> bytes:
    """Re-tag an encoded element as [number] IMPLICIT, keeping its form bit."""
    constructed = bool(inner_der[0] & CONSTRUCTED)
    return bytes([context(number, constructed)]) + inner_der[1:]


def algorithm(dotted: str, params: bytes | None = None) -> bytes:
    """AlgorithmIdentifier; ``params`` is already-encoded DER or None for absent."""
    return seq(enc_oid(dotted), params or b"")


NULL_DER = b"\x05\x00"
