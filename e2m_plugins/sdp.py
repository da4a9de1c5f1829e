"""Split an SDP (RFC 8866) into the proxy's view and the end-to-end copy.

e2m-sec-02 §4.2 (flow F): when the SDP carries SRTP keys (SDES ``a=crypto``,
MIKEY ``a=key-mgmt``, or the old ``k=``), the UA sends the whole SDP to the
peer and a copy without the keying lines to the proxy, which only needs
addresses, ports and codecs for pinholes or admission control.

The proxy cannot check that its copy agrees with the peer's (§13 item 8);
``consistent`` lets a UA that sees both do so.

Only the line model is parsed: ``<type>=<value>`` lines ended by CRLF or LF,
the first one ``v=0``, with ``m=`` lines starting media sections.  Lines that
are kept are kept byte for byte.  Bad input raises ``MalformedError``, input
over the size limit ``LimitExceededError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .cms.limits import DEFAULT_LIMITS
from .errors import LimitExceededError, MalformedError
from .grammar import MIME_TOKEN_PATTERN

__all__ = ["SdpLine", "SdpSplit", "MediaLine", "KEYING_ATTRIBUTES", "parse_lines",
           "split_for_proxy", "media_summary", "consistent", "has_keys"]

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


@dataclass(frozen=True)
class SdpLine:
    """One line: its type letter, value, the raw bytes (line end included), its media section."""

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


@dataclass(frozen=True)
class SdpSplit:
    """``proxy_view``: the SDP without keying lines; ``end_to_end``: the SDP as given."""

    proxy_view: bytes
    end_to_end: bytes


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


def _text(raw: bytes) -> str:
    body = raw[:-1] if raw.endswith(b"\n") else raw
    body = body[:-1] if body.endswith(b"\r") else body
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError("SDP is not UTF-8") from None
    if any(c in text for c in "\r\0"):
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
    result: list[SdpLine] = []
    media: int | None = None
    started = False
    for raw in _raw_lines(sdp):
        text = _text(raw)
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
    return line.kind == "k" or (line.kind == "a" and line.attribute in keying)


def _keying_set(keying_attributes: Iterable[str]) -> frozenset[str]:
    if isinstance(keying_attributes, str):
        raise TypeError("keying_attributes must be a sequence of names, not one string")
    return frozenset(name.strip().lower() for name in keying_attributes)


def split_for_proxy(sdp: bytes, keying_attributes: Iterable[str] = KEYING_ATTRIBUTES, *,
                    max_bytes: int = MAX_SDP_BYTES) -> SdpSplit:
    """The proxy's copy (keying lines removed, session and media level) and the full copy."""
    keying = _keying_set(keying_attributes)
    lines = parse_lines(sdp, max_bytes=max_bytes)
    view = b"".join(line.raw for line in lines if not _is_keying(line, keying))
    return SdpSplit(proxy_view=view, end_to_end=bytes(sdp))


def has_keys(sdp: bytes, keying_attributes: Iterable[str] = KEYING_ATTRIBUTES, *,
             max_bytes: int = MAX_SDP_BYTES) -> bool:
    """Whether the SDP holds any keying line (so the proxy must get a split copy)."""
    keying = _keying_set(keying_attributes)
    return any(_is_keying(line, keying) for line in parse_lines(sdp, max_bytes=max_bytes))


def consistent(proxy_view: bytes, full_sdp: bytes,
               keying_attributes: Iterable[str] = KEYING_ATTRIBUTES, *,
               max_bytes: int = MAX_SDP_BYTES) -> bool:
    """Whether the proxy's copy equals the full SDP once keying lines are set aside.

    Line ends and blank lines do not count; every other byte of every other
    line does, in order.
    """
    keying = _keying_set(keying_attributes)

    def essence(data: bytes) -> list[tuple[str, str]]:
        return [(line.kind, line.value) for line in parse_lines(data, max_bytes=max_bytes)
                if line.kind and not _is_keying(line, keying)]

    return essence(proxy_view) == essence(full_sdp)


# -- media summary ----------------------------------------------------------------

def _connection(value: str) -> tuple[str, str]:
    match = _CONNECTION.fullmatch(value)
    assert match  # checked while parsing
    # Multicast adds /ttl and /count; the address is what comes before.
    return match.group(3).split("/", 1)[0], match.group(2)


def _rtcp(value: str) -> tuple[int, str | None]:
    match = _RTCP.fullmatch(value.strip())
    if not match or int(match.group(1)) > 65535:
        raise MalformedError("malformed a=rtcp line")
    return int(match.group(1)), match.group(3)


def _codecs(formats: tuple[str, ...], proto: str, attrs: list[str]) -> tuple[tuple[str, str], ...]:
    mapped: dict[str, str] = {}
    listed = set(formats)  # a set: an SDP with many formats and rtpmaps stays linear
    for value in attrs:
        name, _, rest = value.partition(":")
        if name.strip().lower() != "rtpmap":
            continue
        pt, _, encoding = rest.strip().partition(" ")
        if pt in listed and encoding and pt not in mapped:
            mapped[pt] = encoding.strip()
    if "RTP/" in proto.upper():
        for pt in formats:
            if pt not in mapped and pt in _STATIC_PT:
                mapped[pt] = _STATIC_PT[pt]
    return tuple((pt, mapped[pt]) for pt in formats if pt in mapped)


def _direction(attrs: list[str]) -> str | None:
    return next((a.strip().lower() for a in attrs if a.strip().lower() in _DIRECTIONS), None)


def _media_line(section: list[SdpLine], session_c: tuple[str, str] | None,
                session_direction: str) -> MediaLine:
    match = _MEDIA.fullmatch(section[0].value.rstrip(" \t"))
    assert match  # checked while parsing
    formats = tuple(match.group(5).split())
    attrs = [line.value for line in section if line.kind == "a"]
    conn = next((_connection(line.value) for line in section if line.kind == "c"), session_c)
    rtcp = next((_rtcp(a.partition(":")[2]) for a in attrs
                 if a.partition(":")[0].strip().lower() == "rtcp"), None)
    return MediaLine(
        media=match.group(1), port=int(match.group(2)),
        port_count=int(match.group(3)) if match.group(3) else 1,
        proto=match.group(4), formats=formats,
        address=conn[0] if conn else None, address_type=conn[1] if conn else None,
        codecs=_codecs(formats, match.group(4), attrs),
        direction=_direction(attrs) or session_direction,
        rtcp_port=rtcp[0] if rtcp else None,
        rtcp_address=(rtcp[1] if rtcp else None) or (conn[0] if rtcp and conn else None))


def media_summary(sdp: bytes, *, max_bytes: int = MAX_SDP_BYTES) -> list[MediaLine]:
    """One ``MediaLine`` per ``m=`` section: addresses, ports, protocol and codecs, no keys."""
    lines = [line for line in parse_lines(sdp, max_bytes=max_bytes) if line.kind]
    session = [line for line in lines if line.media_index is None]
    session_c = next((_connection(line.value) for line in session if line.kind == "c"), None)
    session_direction = _direction([line.value for line in session if line.kind == "a"])
    sections: dict[int, list[SdpLine]] = {}
    for line in lines:
        if line.media_index is not None:
            sections.setdefault(line.media_index, []).append(line)
    return [_media_line(section, session_c, session_direction or "sendrecv")
            for _, section in sorted(sections.items())]
