"""Separate an SDP (RFC 8866) into what a proxy may read and the keys it may not.

e2m-sec-02 §4.2 (flow F): when the SDP carries SRTP keys (SDES ``a=crypto``,
MIKEY ``a=key-mgmt``, or the old ``k=``), a proxy that must read the SDP gets it
without the keying lines; it only needs addresses, ports and codecs for pinholes
or admission control.  The draft sends the peer a second, full copy; we send the
peer only the keying lines (``SdpKeys``, sealed for the peer alone and carried
under the sender's signature, docs/protocol.md §6.1), which it puts back into the
very SDP the proxy read (``merge_keys``).  So the two can never disagree (§13
item 8), and the message is half the size.

Only the line model is parsed: ``<type>=<value>`` lines ended by CRLF or LF,
the first one ``v=0``, with ``m=`` lines starting media sections.  Lines that
are kept are kept byte for byte.  Bad input raises ``MalformedError``, input
over the size limit ``LimitExceededError``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from .cms.limits import DEFAULT_LIMITS
from .errors import InconsistentSplitError, LimitExceededError, MalformedError
from .grammar import MIME_TOKEN_PATTERN

__all__ = ["SdpLine", "SdpKeys", "MediaLine", "KEYING_ATTRIBUTES", "parse_lines", "mentions_keys",
           "separate_keys", "merge_keys", "media_summary", "has_keys"]

KEYING_ATTRIBUTES: tuple[str, ...] = ("crypto", "key-mgmt")
MAX_SDP_BYTES = DEFAULT_LIMITS.max_body_bytes
MAX_MEDIA = 64

_LINE = re.compile(r"([a-z])=(.*)")
_TOKEN = MIME_TOKEN_PATTERN  # RFC 8866 token-char is the RFC 2045 token set
# m=<media> <port>[/<number of ports>] <proto> 1*(SP <fmt>)
_MEDIA = re.compile(rf"({_TOKEN}) ([0-9]{{1,5}})(?:/([0-9]{{1,5}}))? ({_TOKEN}(?:/{_TOKEN})*)"
                    rf"((?: [^ ]+)+)")
# c=<nettype> <addrtype> <connection-address>
_CONNECTION = re.compile(rf"({_TOKEN}) ({_TOKEN}) ([^ ]+)")
_RTCP = re.compile(r"([0-9]{1,5})(?: [^ ]+ ([^ ]+) ([^ ]+))?")
_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
# RFC 3551 static payload types, for m= lines without rtpmap.
_STATIC_PT = {"0": "PCMU/8000", "3": "GSM/8000", "4": "G723/8000", "8": "PCMA/8000",
              "9": "G722/8000", "13": "CN/8000", "18": "G729/8000", "26": "JPEG/90000",
              "31": "H261/90000", "34": "H263/90000"}


class SdpLine(NamedTuple):
    """One line: its type letter, value, the raw bytes (line end included), its media
    section.  A named tuple: an SDP makes one per line, and a frozen dataclass costs
    several times as much to build (proxy capacity, issue 17)."""

    kind: str
    value: str
    raw: bytes
    media_index: int | None  # None at session level

    @property
    def attribute(self) -> str | None:
        """The attribute name of an ``a=`` line, lower-cased."""
        if self.kind != "a":
            return None
        return self.value.partition(":")[0].strip().lower()


SESSION = -1            # SdpKeys: lines of the session section
_MAX_KEY_LINES = 64     # keying lines in one SDP (SDES offers a handful per medium)
_MAX_KEY_LINE_BYTES = 1024
_KEYS_MAX_BYTES = _MAX_KEY_LINES * (_MAX_KEY_LINE_BYTES + 2)   # all of them, line ends too


@dataclass(frozen=True)
class SdpKeys:
    """The keying lines of an SDP and where each stood: ``(section, raw line)`` with
    ``section`` -1 for the session and the 0-based index of its ``m=`` otherwise.

    On the wire (inside the sealed-keys envelope)::

        SdpKeys ::= SEQUENCE SIZE (1..64) OF SEQUENCE {
            section  INTEGER (-1..63),
            line     UTF8String (SIZE (3..1024)) }   -- "a=crypto:..." without line end
    """

    lines: tuple[tuple[int, str], ...] = field(repr=False)   # SRTP keys: never in a log

    def __repr__(self) -> str:
        return f"SdpKeys({len(self.lines)} lines)"

    def encode(self) -> bytes:
        from .cms import der
        return der.seq(*(der.seq(der.enc_integer(section), der.tlv(der.UTF8_STRING,
                                                                     line.encode("utf-8")))
                         for section, line in self.lines))

    @classmethod
    def decode(cls, data: bytes) -> "SdpKeys":
        """``MalformedError`` for anything but a well-formed, bounded ``SdpKeys``."""
        from .cms import der
        top = der.read_all(data, max_elements=1 + 3 * _MAX_KEY_LINES)
        items = der.items(top.expect(der.SEQUENCE, "SdpKeys"), 1, "SdpKeys")
        if len(items) > _MAX_KEY_LINES:
            raise MalformedError("SdpKeys: too many lines")
        lines = []
        for item in items:
            pair = der.items(item.expect(der.SEQUENCE, "SdpKeys line"), 2, "SdpKeys line")
            if len(pair) != 2:
                raise MalformedError("SdpKeys line: unexpected fields")
            section = der.integer(pair[0])
            raw = pair[1].expect(der.UTF8_STRING, "SdpKeys line").value
            if not SESSION <= section < MAX_MEDIA or not 3 <= len(raw) <= _MAX_KEY_LINE_BYTES:
                raise MalformedError("SdpKeys line out of range")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedError("SdpKeys line is not UTF-8") from None
            if _has_control(text):
                raise MalformedError("SdpKeys line holds a control character")
            lines.append((section, text))
        return cls(tuple(lines))


@dataclass(frozen=True)
class MediaLine:
    """What a firewall or media inspector needs to know about one ``m=`` section."""

    media: str
    port: int
    port_count: int
    proto: str
    formats: tuple[str, ...]
    address: str | None        # media c= or else session c=; None if neither
    address_type: str | None   # IP4 / IP6
    codecs: tuple[tuple[str, str], ...]  # (payload type, encoding name/clock[/channels])
    direction: str
    rtcp_port: int | None = None
    rtcp_address: str | None = None

    @property
    def codec_names(self) -> dict[str, str]:
        return dict(self.codecs)


def _raw_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    out = [line + b"\n" for line in lines[:-1]]
    return out + ([lines[-1]] if lines[-1] else [])


def _has_control(text: str) -> bool:
    """A control character other than HTAB: pjmedia ends an SDP line at a bare CR, so a
    CR in a line would start another line that only the peer's stack reads (review 84)."""
    return any(ord(c) < 0x20 and c != "\t" or c == "\x7f" for c in text)


def _text(line: str) -> str:
    """One line of the decoded SDP without its line end (LF, or CRLF)."""
    text = line[:-1] if line.endswith("\r") else line
    if "\r" in text or "\0" in text:
        raise MalformedError("control character in an SDP line")
    return text


def _check_line(kind: str, value: str) -> None:
    if kind == "m":
        match = _MEDIA.fullmatch(value.rstrip(" \t"))  # some stacks leave a trailing space
        if not match:
            raise MalformedError("malformed m= line")
        if int(match.group(2)) > 65535 or (match.group(3) and int(match.group(3)) == 0):
            raise MalformedError("m= port or port count out of range")
    if kind == "c" and not _CONNECTION.fullmatch(value):
        raise MalformedError("malformed c= line")


def parse_lines(sdp: bytes, *, max_bytes: int = MAX_SDP_BYTES) -> list[SdpLine]:
    """Every line of ``sdp`` in order; blank lines are kept (kind "")."""
    if not isinstance(sdp, (bytes, bytearray, memoryview)):
        raise TypeError("SDP must be bytes")
    sdp = bytes(sdp)
    if len(sdp) > max_bytes:
        raise LimitExceededError(f"SDP of {len(sdp)} bytes exceeds the limit of {max_bytes}")
    try:
        # decoded whole: an LF is never inside a UTF-8 sequence, so the lines split the
        # same way in bytes and in text, and a line fails to decode alone iff the whole does
        decoded = sdp.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError("SDP is not UTF-8") from None
    result: list[SdpLine] = []
    media: int | None = None
    started = False
    for raw, line in zip(_raw_lines(sdp), decoded.split("\n")):
        text = _text(line)
        if not text.strip():  # tolerated, e.g. a second CRLF at the end
            result.append(SdpLine("", "", raw, media))
            continue
        match = _LINE.fullmatch(text)
        if not match:
            raise MalformedError("SDP line is not <letter>=<value>")
        kind, value = match.group(1), match.group(2)
        if not started and (kind, value) != ("v", "0"):
            raise MalformedError("SDP does not start with v=0")
        started = True
        _check_line(kind, value)
        if kind == "m":
            media = 0 if media is None else media + 1
            if media >= MAX_MEDIA:
                raise LimitExceededError(f"more than {MAX_MEDIA} media sections")
        result.append(SdpLine(kind, value, raw, media))
    if not started:
        raise MalformedError("empty SDP")
    return result


def _is_keying(line: SdpLine, keying: frozenset[str]) -> bool:
    # Attribute names compared without case: removing too much is the safe side.
    if line.kind == "k":
        return True
    if line.kind != "a":
        return False
    # The name as pjmedia reads it, the leading run of token characters: it takes
    # "a=crypto 1 ... inline:" as a crypto line (review 173 K1); the text before ":"
    # would not name one
    name = _token_run(line.value)
    # RFC 5939 capability negotiation offers an attribute as "a=acap:<n> <attribute>":
    # an SDES key offered so is a key all the same (review 172 K1)
    return name in keying or (name == "acap" and _offered_attribute(line.value) in keying)


def _token_run(text: str) -> str:
    """The leading run of SDP token characters of ``text``, lower-cased."""
    match = _ATTRIBUTE_NAME.match(text.lstrip(" \t"))
    return match.group(0).lower() if match else ""


def _offered_attribute(value: str) -> str | None:
    """The attribute an ``a=acap`` line offers, lower-cased (None if it names none)."""
    offered = value.partition(":")[2].strip().split(None, 1)
    return _token_run(offered[1]) if len(offered) == 2 else None


def _keying_set(keying_attributes: Iterable[str]) -> frozenset[str]:
    if isinstance(keying_attributes, str):
        raise TypeError("keying_attributes must be a sequence of names, not one string")
    return frozenset(name.strip().lower() for name in keying_attributes)


def separate_keys(sdp: bytes, keying_attributes: Iterable[str] = KEYING_ATTRIBUTES, *,
                  max_bytes: int = MAX_SDP_BYTES) -> tuple[bytes, SdpKeys]:
    """The SDP without its keying lines (byte for byte otherwise), and those lines."""
    keying = _keying_set(keying_attributes)
    view: list[bytes] = []
    keys: list[tuple[int, str]] = []
    for line in parse_lines(sdp, max_bytes=max_bytes):
        if _is_keying(line, keying):
            keys.append((SESSION if line.media_index is None else line.media_index,
                         f"{line.kind}={line.value}"))
        else:
            view.append(line.raw)
    if len(keys) > _MAX_KEY_LINES or any(len(t.encode()) > _MAX_KEY_LINE_BYTES for _, t in keys):
        raise LimitExceededError("more keying lines than one SDP carries")
    return b"".join(view), SdpKeys(tuple(keys))


def merge_keys(view: bytes, keys: SdpKeys, keying_attributes: Iterable[str] = KEYING_ATTRIBUTES,
               *, max_bytes: int = MAX_SDP_BYTES) -> bytes:
    """``view`` with ``keys`` put back: each line at the end of its section (``k=``
    before the section's first ``a=``).  ``InconsistentSplitError`` when ``view``
    already holds keying lines, a key line is not a keying line (it would show the
    peer another session than the proxy saw), or names a section ``view`` lacks."""
    keying = _keying_set(keying_attributes)
    lines = parse_lines(view, max_bytes=max_bytes)
    if any(_is_keying(line, keying) for line in lines):
        raise InconsistentSplitError("the SDP the proxy read holds keys as well")
    sections = 1 + max((line.media_index for line in lines if line.media_index is not None),
                       default=-1)
    eol = b"\r\n" if not lines or lines[0].raw.endswith(b"\r\n") else b"\n"
    adds: dict[int, list[SdpLine]] = {}
    for section, text in keys.lines:
        match = None if _has_control(text) else _LINE.fullmatch(text)
        key = None if match is None else SdpLine(match.group(1), match.group(2),
                                                 text.encode() + eol, section)
        if key is None or not _is_keying(key, keying):
            raise InconsistentSplitError("the sealed keys hold a line that is not a keying line")
        if section >= sections:
            raise InconsistentSplitError("the sealed keys name a media section the SDP lacks")
        adds.setdefault(section, []).append(key)
    # where each section ends: its last line that is not blank
    last = {SESSION if line.media_index is None else line.media_index: index
            for index, line in enumerate(lines) if line.kind}
    out: list[bytes] = []
    for index, line in enumerate(lines):
        here = SESSION if line.media_index is None else line.media_index
        if line.kind == "a" and any(k.kind == "k" for k in adds.get(here, ())):
            out += [k.raw for k in adds[here] if k.kind == "k"]
            adds[here] = [k for k in adds[here] if k.kind != "k"]
        out.append(line.raw)
        if last.get(here) == index and adds.get(here):
            if not line.raw.endswith(b"\n"):      # a last line without its line end
                out.append(eol)
            out += [k.raw for k in adds.pop(here)]
    merged = b"".join(out)
    # what the peer's stack will read: the view's lines and the keying lines, nothing
    # else (a key line that reads as two lines would add one the proxy never saw)
    if [(line.kind, line.value) for line in parse_lines(merged, max_bytes=max_bytes +
                                                         _KEYS_MAX_BYTES)
            if not _is_keying(line, keying)] != [(line.kind, line.value) for line in lines]:
        raise InconsistentSplitError("the sealed keys would change the SDP the proxy read")
    return merged


def has_keys(sdp: bytes, keying_attributes: Iterable[str] = KEYING_ATTRIBUTES, *,
             max_bytes: int = MAX_SDP_BYTES) -> bool:
    """Whether the SDP holds any keying line (so a proxy must not get it whole)."""
    keying = _keying_set(keying_attributes)
    return any(_is_keying(line, keying) for line in parse_lines(sdp, max_bytes=max_bytes))


# ``k=`` methods (RFC 4566 §5.12): a text "k=3" is no key, "k=clear:..." is one
_K_METHODS = rb"(?:clear|base64|uri|prompt)\b"


@lru_cache(maxsize=16)
def _keying_line_pattern(keying: frozenset[str]) -> re.Pattern[bytes]:
    names = b"|".join(re.escape(name.encode("ascii", "replace")) for name in sorted(keying))
    # ``a=<name>`` anywhere in a line (bare CR line ends, a line run into text), "="
    # right after the "a" as in any SDP line, the name ending where pjmedia ends it (a
    # link's "?a=crypto&x" names "crypto&x", prose's "a = crypto," is none: review 176
    # HB1); ``k=<method>`` only at a line's start (a link's "?k=clear+..." is none); and
    # SDES key material itself, "inline:" and a base64 key and salt (30 octets and more
    # for every RFC 4568 suite: 40 characters), however the line around it is written
    return re.compile(rb"(?i)(?<![a-z0-9_-])a=[ \t]*(?:acap[ \t]*:[ \t]*[0-9]+[ \t]+)?(?:"
                      + names + rb")(?![!#-'*+.0-9a-z^-~-])"
                      + rb"|(?:^|[\r\n])[ \t]*k=[ \t]*" + _K_METHODS
                      + rb"|inline:[a-z0-9+/]{40}")


# what every match of the pattern above contains (it cannot start from a literal, so
# the regex engine tries each position: 36 µs a kilobyte; these take one)
_KEY_MARKS = (b"a=", b"k=", b"inline:")


def mentions_keys(text: bytes, keying_attributes: Iterable[str] = KEYING_ATTRIBUTES) -> bool:
    """Whether ``text``, which need not be an SDP (a SIP fragment, a CPIM wrapper, a
    text a user pasted an offer into), holds anything like a keying line anywhere in a
    line, or SDES key material.  Loose on purpose (any case, spaces after "=", anywhere
    in a line): a false alarm stops one message, a miss sends keys."""
    lowered = text.lower()
    if not any(mark in lowered for mark in _KEY_MARKS):
        return False
    return _keying_line_pattern(_keying_set(keying_attributes)).search(text) is not None


# -- media summary ----------------------------------------------------------------

def _connection(value: str) -> tuple[str, str]:
    match = _CONNECTION.fullmatch(value)
    assert match  # checked while parsing
    # Multicast adds /ttl and /count; the address is what comes before.
    return match.group(3).split("/", 1)[0], match.group(2)


def _rtcp(value: str) -> tuple[int, str | None, str]:
    """(port, address or None, address type) of an ``a=rtcp`` value."""
    match = _RTCP.fullmatch(value.strip())
    if not match or int(match.group(1)) > 65535:
        raise MalformedError("malformed a=rtcp line")
    if match.group(3) is not None:
        _canonical_address(match.group(2), match.group(3))
    return int(match.group(1)), match.group(3), match.group(2) or ""


# An rtpmap's encoding name/clock rate/channels as stacks write them ("opus/48000/2");
# a longer one names no codec here (this summary is for pinholes and the archive).
MAX_ENCODING_CHARS = 64


def _codecs(formats: tuple[str, ...], proto: str, attrs: list[str]) -> tuple[tuple[str, str], ...]:
    """(payload type, encoding) for each distinct format an rtpmap or the static table
    names.  Each format once: a format listed again repeated its rtpmap in the archive's
    codecs column (a 30 KB offer made a 75 MB row, review 34)."""
    mapped: dict[str, str] = {}
    listed = dict.fromkeys(formats)  # each once, in order; an SDP of many stays linear
    for value in attrs:
        name, _, rest = value.partition(":")
        if name.strip().lower() != "rtpmap":
            continue
        pt, _, encoding = rest.strip().partition(" ")
        encoding = encoding.strip()
        if pt in listed and encoding and len(encoding) <= MAX_ENCODING_CHARS \
                and pt not in mapped:
            mapped[pt] = encoding
    if "RTP/" in proto.upper():
        for pt in listed:
            if pt not in mapped and pt in _STATIC_PT:
                mapped[pt] = _STATIC_PT[pt]
    return tuple((pt, mapped[pt]) for pt in listed if pt in mapped)


def _direction(attrs: list[str]) -> str | None:
    # (spelled exactly: another spelling is refused, ``_one_reading``)
    return next((a for a in attrs if a in _DIRECTIONS), None)


def _media_line(section: list[SdpLine], session_c: tuple[str, str] | None,
                session_direction: str) -> MediaLine:
    match = _MEDIA.fullmatch(section[0].value.rstrip(" \t"))
    assert match  # checked while parsing
    formats = tuple(match.group(5).split())
    attrs = [line.value for line in section if line.kind == "a"]
    conn = next((_connection(line.value) for line in section if line.kind == "c"), session_c)
    rtcp = next((_rtcp(a.partition(":")[2]) for a in attrs
                 if a.partition(":")[0] == "rtcp"), None)
    if rtcp is not None and rtcp[1] is not None and (
            conn is None or rtcp[2].upper() != conn[1].upper()):
        # pjmedia reads it in the stream's family (review 131: IP6 ::ffff:127.0.0.9 on
        # an IPv4 stream went to 127.0.0.9)
        raise MalformedError("SDP: an a=rtcp address of another type than its stream's")
    return MediaLine(
        media=match.group(1), port=int(match.group(2)),
        port_count=int(match.group(3)) if match.group(3) else 1,
        proto=match.group(4), formats=formats,
        address=conn[0] if conn else None, address_type=conn[1] if conn else None,
        codecs=_codecs(formats, match.group(4), attrs),
        direction=_direction(attrs) or session_direction,
        rtcp_port=rtcp[0] if rtcp else None,
        rtcp_address=(rtcp[1] if rtcp else None) or (conn[0] if rtcp and conn else None))


# The attributes the summary reads: each must be spelled as stacks match it (pjmedia
# compares names byte for byte) and said once per level, else a stack may read the
# media's way differently from the archive (review 130).
_VIEWED_ATTRIBUTES = frozenset({"rtcp", *_DIRECTIONS})
_ATTRIBUTE_NAME = re.compile(rf"(?:{_TOKEN})?")


def _one_reading(level: list[SdpLine], where: str) -> None:
    """``MalformedError`` for a level whose media the summary and a stack could read
    differently: two ``c=`` lines (pjmedia keeps the last: review 128; RFC 4566 §5.7
    allows more only for a multicast session's layers, which no phone here makes); a
    viewed attribute spelled in another case or with white space (``a=RTCP``,
    ``a=INACTIVE``, ``a=rtcp :N``: pjmedia ignores them); two direction attributes or
    two ``a=rtcp`` (review 130: pjmedia ranks directions, the summary took the first);
    a connection or RTCP address that is not a plain IP address (pjmedia reads
    ``127.0.0.011``, ``2130706441`` and ``0x7f.0.0.9`` as ``inet_aton`` does, and would
    resolve a name)."""
    if sum(1 for line in level if line.kind == "c") > 1:
        raise MalformedError(f"SDP: more than one c= line {where}")
    for line in level:
        if line.kind == "c":
            _canonical_address(*_connection(line.value)[::-1])
    values = [line.value for line in level if line.kind == "a"]
    # the name as pjmedia takes it: the leading run of token characters, which ends at
    # ":", white space, ";" or "/" alike (review 131: "a=sendonly:x" is sendonly there)
    names = [_ATTRIBUTE_NAME.match(value).group(0) for value in values]
    for name, value in zip(names, values):
        if name.lower() not in _VIEWED_ATTRIBUTES and value.strip().lower() not in \
                _VIEWED_ATTRIBUTES and value.partition(":")[0].strip().lower() != "rtcp":
            continue
        exact = value == name if name in _DIRECTIONS else value.startswith("rtcp:")
        if name not in _VIEWED_ATTRIBUTES or not exact:
            raise MalformedError(f"SDP: a=%s spelled as stacks do not read it {where}"
                                 % (name.lower() or value.strip().lower()))
    if sum(1 for name in names if name in _DIRECTIONS) > 1:
        raise MalformedError(f"SDP: more than one direction attribute {where}")
    if names.count("rtcp") > 1:
        raise MalformedError(f"SDP: more than one a=rtcp {where}")


@lru_cache(maxsize=256)      # pure; a proxy sees the same few addresses again and again
def _canonical_address(address_type: str, address: str) -> None:
    """The address of a ``c=`` line, as the summary names it: an IP literal of its
    address type, an IPv4 one as four decimal numbers without leading zeros (what every
    stack reads alike; ``inet_aton`` forms are not), an IPv6 one without a zone."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    version = {"IP4": 4, "IP6": 6}.get(address_type.upper())
    if ip is None or ip.version != version or "%" in address \
            or (version == 4 and str(ip) != address):
        raise MalformedError("SDP: a connection address that is not a plain IP address")


def media_summary(sdp: bytes, *, max_bytes: int = MAX_SDP_BYTES) -> list[MediaLine]:
    """One ``MediaLine`` per ``m=`` section: addresses, ports, protocol and codecs, no keys.
    ``MalformedError`` for an SDP a stack could read another way than this summary
    (``_one_reading``): no summary could then say where the media goes."""
    lines = [line for line in parse_lines(sdp, max_bytes=max_bytes) if line.kind]
    session = [line for line in lines if line.media_index is None]
    _one_reading(session, "at the session level")
    session_c = next((_connection(line.value) for line in session if line.kind == "c"), None)
    session_direction = _direction([line.value for line in session if line.kind == "a"])
    sections: dict[int, list[SdpLine]] = {}
    for line in lines:
        if line.media_index is not None:
            sections.setdefault(line.media_index, []).append(line)
    for index, section in sections.items():
        _one_reading(section, f"in media section {index}")
    return [_media_line(section, session_c, session_direction or "sendrecv")
            for _, section in sorted(sections.items())]
