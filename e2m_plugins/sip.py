"""A small raw SIP message model: start line, ordered headers, body bytes.

This is not a SIP stack.  It parses one message (RFC 3261 §7) into an
immutable :class:`SipMessage`, lets callers read and change headers and the
body through copy methods, and serialises it back with CRLF line ends and a
Content-Length that always matches the body.

Decisions (see also ``docs/protocol.md`` §5):

- Header text is decoded as UTF-8 with ``surrogateescape`` so that any octets a
  peer sent come back out byte-exact; only control characters are refused (and, when
  read, a Call-ID or tag that is not visible ASCII).
- Folded header lines are unfolded on input (the fold becomes one SP).
- CRLF and bare LF line ends are both accepted; CRLFs before the start line
  (keep-alives, RFC 5626 §3.5.1) are skipped.
- The body is taken by Content-Length when present; octets after it are
  discarded, as RFC 3261 §18.3 says for datagrams.  A Content-Length larger
  than the data is an error.  Without Content-Length the rest is the body.
  :func:`frame_length` finds message boundaries on stream transports.
- Several Content-Length headers with different values are refused
  (request-smuggling style ambiguity).
- Header parameters, tokens, quoting and comma lists follow
  :mod:`e2m_plugins.grammar` (shared with MIME): a parameter given twice in
  one value is refused, a bare one (``;lr``) has the value None.  URIs are
  taken apart by :mod:`e2m_plugins.uri`.
"""

from __future__ import annotations

import re
from functools import lru_cache
import secrets
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Union

from .errors import LimitExceededError, MalformedError
from .grammar import (SIP_TOKEN, SIP_TOKEN_PATTERN, bare_ampersand, parse_params,
                      split_header_list, unquote_string)
from .uri import split_hostport
from .lazy import lazy_property

__all__ = [
    "STANDARD_METHODS", "canonical_method",
    "COMPACT_FORMS", "DEFAULT_MAX_HEADERS", "DEFAULT_MAX_LINE", "DEFAULT_MAX_SIZE",
    "Address", "DialogId", "RequestLine", "SipMessage", "StatusLine",
    "canonical_name", "frame_length", "make_request", "make_response", "parse", "parse_address",
    "via_sent_by",
]

DEFAULT_MAX_HEADERS = 256
DEFAULT_MAX_LINE = 8 * 1024
# Room for the CMS body limit (256 KiB) plus a generous header section.
DEFAULT_MAX_SIZE = 320 * 1024

# RFC 3261 §7.3.3 plus the extension compact forms registered since.
COMPACT_FORMS: dict[str, str] = {
    "i": "call-id", "f": "from", "t": "to", "v": "via", "c": "content-type",
    "l": "content-length", "m": "contact", "e": "content-encoding",
    "k": "supported", "s": "subject", "o": "event", "u": "allow-events",
    "r": "refer-to", "b": "referred-by", "x": "session-expires", "y": "identity",
}

_TOKEN = SIP_TOKEN  # RFC 3261 token (methods, header names): e2m_plugins.grammar
# What a Call-ID or a tag may hold here.  RFC 3261 allows less (a word, a token); this
# refuses what no grammar allows and what Kamailio's Python cannot read as a str (octets
# that are not UTF-8), so the proxy never keeps keys under ids its host cannot name.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
# The longest Call-ID or tag read: what a signed SIP context can bind (sipcontext), and
# what every store keeps and indexes (a PostgreSQL index entry holds 2704 bytes at most:
# a longer Call-ID made the shared archive refuse its rows, review 30).
MAX_ID_OCTETS = 1024
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(r"SIP/[0-9]{1,3}\.[0-9]{1,3}", re.IGNORECASE)
_BAD_VALUE_CHARS = re.compile(r"[\x00\r\n]")
_DIGITS = re.compile(r"[0-9]{1,10}")  # ASCII only: str.isdigit() accepts "²"


@dataclass(frozen=True)
class RequestLine:
    method: str
    request_uri: str
    version: str = "SIP/2.0"

    def __str__(self) -> str:
        return f"{self.method} {self.request_uri} {self.version}"


@dataclass(frozen=True)
class StatusLine:
    status: int
    reason: str
    version: str = "SIP/2.0"

    def __str__(self) -> str:
        return f"{self.version} {self.status} {self.reason}"


StartLine = Union[RequestLine, StatusLine]


class DialogId(NamedTuple):
    call_id: str
    local_tag: str | None
    remote_tag: str | None


class Address(NamedTuple):
    """A From/To/Contact-style value: optional display name, URI, header params."""

    display_name: str | None
    uri: str
    params: dict[str, str | None]


# Methods of RFC 3261 and its extensions that stacks read in any case: Kamailio parses
# every method name case-insensitively and pjsip INVITE, ACK, BYE, CANCEL, OPTIONS and
# REGISTER (older pjsip more), though RFC 3261 §7.1 makes methods case-sensitive.
STANDARD_METHODS = frozenset({"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER",
                              "PRACK", "UPDATE", "SUBSCRIBE", "NOTIFY", "PUBLISH", "INFO",
                              "REFER", "MESSAGE"})


RFC3261_BRANCH_COOKIE = "z9hG4bK"    # RFC 3261 §8.1.1.7's magic cookie


def rfc3261_branch(branch: str | None) -> str | None:
    """``branch`` as pjsip and Kamailio's tm match a transaction by it: lower-cased, when
    it starts with the magic cookie in any case (pjsip compares both without case);
    None for an RFC 2543 branch (no cookie), which keys no transaction on its own."""
    if not branch or branch[:7].lower() != RFC3261_BRANCH_COOKIE.lower():
        return None
    return branch.lower()


_SENT_BY = re.compile(r"\s*SIP\s*/\s*2\.0\s*/\s*([^\s/;]+)\s+([^;\s]+)", re.IGNORECASE)


def via_sent_by(via: str) -> tuple[str, str, int | None]:
    """(transport, upper-cased; host; port or None) of one Via entry: its sent-protocol,
    blanks allowed around the slashes (RFC 3261 §20.42), then its sent-by.
    MalformedError when it has neither (a Via of ``;branch=x`` alone: review 100)."""
    found = _SENT_BY.match(via)
    if not found:
        raise MalformedError("Via without a sent-protocol and sent-by")
    host, port = split_hostport(found.group(2))
    return found.group(1).upper(), host, port


def canonical_method(method: str) -> str:
    """``method`` as the stacks downstream will take it: a standard method in any case
    is that method (``invite`` reaches pjsua as an INVITE); any other stays as written."""
    upper = method.upper()
    return upper if upper in STANDARD_METHODS else method


def canonical_name(name: str) -> str:
    """Lower-case long form of a header name, used for every lookup (cached: the
    same few dozen names come back in every message; a name longer than any header
    we know is not, so a stranger's 60 KB names cannot fill the cache: review 77)."""
    if len(name) > _CACHED_NAME_CHARS:
        return _canonical_name(name)
    return _cached_canonical_name(name)


_CACHED_NAME_CHARS = 64


def _canonical_name(name: str) -> str:
    low = name.strip().lower()
    return COMPACT_FORMS.get(low, low)


_cached_canonical_name = lru_cache(maxsize=1024)(_canonical_name)
canonical_name.cache_clear = _cached_canonical_name.cache_clear   # type: ignore[attr-defined]
canonical_name.cache_info = _cached_canonical_name.cache_info     # type: ignore[attr-defined]


def _index_headers(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Values by canonical header name, in message order."""
    index: dict[str, list[str]] = {}
    for name, value in headers:
        key = canonical_name(name)
        values = index.get(key)
        if values is None:
            index[key] = [value]
        else:
            values.append(value)
    return index


def _check_header(name: str, value: str) -> None:
    # Refuse what would let a caller inject extra header lines.
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"bad header name {name!r}")
    if _BAD_VALUE_CHARS.search(value):
        raise ValueError(f"header {name} value contains CR, LF or NUL")


@dataclass(frozen=True, repr=False)
class SipMessage:
    """One SIP request or response.  Immutable: changes return a new message."""

    start_line: StartLine
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", tuple((n, v) for n, v in self.headers))
        object.__setattr__(self, "body", bytes(self.body))
        for name, value in self.headers:
            _check_header(name, value)

    def __repr__(self) -> str:
        # Never show the body: it may be plaintext that must not reach logs.
        return (f"SipMessage({str(self.start_line)!r}, {len(self.headers)} headers, "
                f"{len(self.body)} body bytes)")

    # -- start line -------------------------------------------------------
    @property
    def is_request(self) -> bool:
        return isinstance(self.start_line, RequestLine)

    @property
    def method(self) -> str:
        """The request method; for a response, the method in its CSeq."""
        if isinstance(self.start_line, RequestLine):
            return self.start_line.method
        return self.cseq[1]

    @property
    def request_uri(self) -> str | None:
        sl = self.start_line
        return sl.request_uri if isinstance(sl, RequestLine) else None

    @property
    def status(self) -> int | None:
        sl = self.start_line
        return sl.status if isinstance(sl, StatusLine) else None

    @property
    def reason(self) -> str | None:
        sl = self.start_line
        return sl.reason if isinstance(sl, StatusLine) else None

    # -- header access ----------------------------------------------------
    @classmethod
    def _from_parser(cls, start_line: StartLine, headers: tuple[tuple[str, str], ...],
                     body: bytes, index: dict[str, list[str]]) -> SipMessage:
        # The parser has already checked every name and value (tokens, no CR, LF
        # or NUL), so the checks of __post_init__ would only repeat its work.
        msg = object.__new__(cls)
        object.__setattr__(msg, "start_line", start_line)
        object.__setattr__(msg, "headers", headers)
        object.__setattr__(msg, "body", body)
        msg.__dict__["_index"] = index      # what the lazy_property would build
        return msg

    @lazy_property
    def _index(self) -> dict[str, list[str]]:
        # Built on the first lookup; the message is immutable, so it never goes
        # stale.  Private: get() and get_all() never hand these lists out.
        return _index_headers(self.headers)

    def check_unambiguous(self) -> None:
        """``MalformedError`` when another stack would read the headers otherwise: a
        header SIP allows once (From, To, Call-ID, CSeq) there twice, or an ``&`` that
        ends a header to pjsip (``_check_unambiguous``).  ``parse`` checks every message
        it reads; the engines check what they are given."""
        _check_unambiguous(self._index)

    def get(self, name: str) -> str | None:
        """Value of the first instance of ``name`` (compact forms match)."""
        values = self._index.get(canonical_name(name))
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Every instance of ``name`` in order; commas are NOT split here."""
        return list(self._index.get(canonical_name(name), ()))

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def add(self, name: str, value: str) -> SipMessage:
        """Append a header instance after all others."""
        return self._with_headers(self.headers + ((name, value),))

    def insert(self, name: str, value: str, index: int = 0) -> SipMessage:
        """Insert a header instance at ``index`` (default: the very top, as for Via)."""
        hs = list(self.headers)
        hs.insert(index, (name, value))
        return self._with_headers(tuple(hs))

    def remove(self, name: str, where: Callable[[str], bool] | None = None) -> SipMessage:
        """Drop every instance of ``name``, or only those whose value satisfies ``where``."""
        key = canonical_name(name)
        kept = tuple((n, v) for n, v in self.headers
                     if canonical_name(n) != key or (where is not None and not where(v)))
        return self._with_headers(kept)

    def replace(self, name: str, value: str) -> SipMessage:
        """Set ``name`` to one instance: the first keeps its place, the rest go."""
        key = canonical_name(name)
        out: list[tuple[str, str]] = []
        done = False
        for n, v in self.headers:
            if canonical_name(n) != key:
                out.append((n, v))
            elif not done:
                out.append((n, value))
                done = True
        if not done:
            out.append((name, value))
        return self._with_headers(tuple(out))

    def with_body(self, body: bytes, content_type: str | None = None) -> SipMessage:
        """A copy with a new body.

        ``content_type`` replaces Content-Type when given; an empty body with no
        type drops Content-Type.  Content-Length is set to match.  Other body
        headers (Content-Disposition, Content-Encoding) are the caller's job.
        """
        msg = SipMessage(self.start_line, self.headers, bytes(body))
        if content_type is not None:
            msg = msg.replace("Content-Type", content_type)
        elif not body:
            msg = msg.remove("Content-Type")
        return msg.replace("Content-Length", str(len(body)))

    def with_start_line(self, start_line: StartLine) -> SipMessage:
        return SipMessage(start_line, self.headers, self.body)

    def _with_headers(self, headers: tuple[tuple[str, str], ...]) -> SipMessage:
        return SipMessage(self.start_line, headers, self.body)

    # -- dialog helpers ---------------------------------------------------
    @property
    def call_id(self) -> str:
        value = self.get("Call-ID")
        if not value:
            raise MalformedError("no Call-ID header")
        if not _VISIBLE_ASCII.fullmatch(value):
            raise MalformedError("Call-ID is not visible ASCII")
        if len(value) > MAX_ID_OCTETS:
            raise MalformedError(f"Call-ID longer than {MAX_ID_OCTETS} octets")
        return value

    @property
    def from_tag(self) -> str | None:
        return self._tag("From")

    @property
    def to_tag(self) -> str | None:
        return self._tag("To")

    def _tag(self, name: str) -> str | None:
        tag = self.address(name).params.get("tag")
        if tag is not None and not _VISIBLE_ASCII.fullmatch(tag):
            raise MalformedError(f"{name} tag is not visible ASCII")
        if tag is not None and len(tag) > MAX_ID_OCTETS:
            raise MalformedError(f"{name} tag longer than {MAX_ID_OCTETS} octets")
        return tag

    def address(self, name: str) -> Address:
        """The first ``name`` header (From, To, ...) parsed; MalformedError if absent.

        Parsed once per message: the result is shared, so do not modify its params.
        """
        key = canonical_name(name)
        parsed = self._addresses.get(key)
        if parsed is None:
            value = self.get(key)
            if value is None:
                raise MalformedError(f"no {name} header")
            parsed = self._addresses[key] = parse_address(value)
        return parsed

    @lazy_property
    def _addresses(self) -> dict[str, Address]:
        return {}

    @property
    def cseq(self) -> tuple[int, str]:
        value = self.get("CSeq")
        if value is None:
            raise MalformedError("no CSeq header")
        parts = value.split()
        if len(parts) != 2 or not _DIGITS.fullmatch(parts[0]):
            raise MalformedError("bad CSeq header")
        if not _TOKEN.fullmatch(parts[1]):
            raise MalformedError("bad CSeq method")
        return int(parts[0]), parts[1]

    def via_branch(self, *, bottom: bool = False) -> str:
        """The branch of the top Via (the last hop's transaction), or of the bottom one
        (the originating UAC's: the same in a request and its responses, at every
        hop).  ``MalformedError`` without a Via or a branch, with a parameter given
        twice (pjsip and tm keep the last, others the first), or a branch that is not a
        token (RFC 3261 §25.1: a quoted one is read with its quotes by pjsip)."""
        # only the header line that holds the wanted Via is split, not every one
        values = self.get_all("Via")
        vias = split_header_list(values[-1 if bottom else 0]) if values else []
        if not vias:
            raise MalformedError("message without Via")
        branch = parse_params(vias[-1 if bottom else 0].partition(";")[2],
                              keep_quotes=True).get("branch")
        if not branch:
            raise MalformedError("Via without a branch")
        if not _TOKEN.fullmatch(branch):
            raise MalformedError("Via branch is not a token")
        return branch

    def transaction_branch(self) -> str | None:
        """The top Via's branch as a transaction layer matches it (``rfc3261_branch``);
        None for an RFC 2543 branch.  ``MalformedError`` as ``via_branch``."""
        return rfc3261_branch(self.via_branch())

    def dialog_id(self, *, as_uas: bool = False) -> DialogId:
        """(Call-ID, local tag, remote tag); the UAC's local tag is the From tag."""
        ftag, ttag = self.from_tag, self.to_tag
        if as_uas:
            return DialogId(self.call_id, ttag, ftag)
        return DialogId(self.call_id, ftag, ttag)

    # -- output -----------------------------------------------------------
    def serialize(self) -> bytes:
        """Wire form with CRLF line ends and a Content-Length equal to len(body)."""
        lines = [str(self.start_line)]
        length_written = False
        for name, value in self.headers:
            if canonical_name(name) == "content-length":
                if not length_written:
                    lines.append(f"{name}: {len(self.body)}")
                    length_written = True
                continue
            lines.append(f"{name}: {value}")
        if not length_written:
            lines.append(f"Content-Length: {len(self.body)}")
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + self.body


# -- parsing ---------------------------------------------------------------

class _Head(NamedTuple):       # a tuple: made for every message read, a frozen dataclass costs more
    start_line: StartLine | None  # None only for an incomplete stream buffer
    headers: tuple[tuple[str, str], ...]
    body_start: int
    complete: bool  # False when the data ended before the blank line


def _decode(line: bytes) -> str:
    return line.decode("utf-8", "surrogateescape")


def _parse_start_line(line: str) -> StartLine:
    if line[:4].upper() == "SIP/":
        parts = line.split(" ", 2)
        if len(parts) < 2 or not _VERSION.fullmatch(parts[0]):
            raise MalformedError("bad status line")
        code = parts[1]
        if not re.fullmatch(r"[1-6][0-9]{2}", code):
            raise MalformedError("bad status code")
        reason = parts[2] if len(parts) == 3 else ""
        return StatusLine(int(code), reason, parts[0])
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise MalformedError("bad request line")
    method, uri, version = parts
    if not _TOKEN.fullmatch(method) or not _VERSION.fullmatch(version):
        raise MalformedError("bad request line")
    return RequestLine(method, uri, version)


def _parse_header_line(line: str) -> tuple[str, str]:
    name, colon, value = line.partition(":")
    name = name.rstrip(" \t")
    if not colon or not _TOKEN.fullmatch(name):
        raise MalformedError("bad header line")
    return name, value.strip(" \t")


# The common head: CRLF line ends, no folding, no control characters.  Anything
# else (or any doubt) goes to the line-by-line parser, which gives the errors.
_CTL_BUT_LINE_ENDS = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Whole lines only (^ and \r$): a line that does not match is simply not counted.  The
# value is greedy up to its last character that is not white space: a lazy one is tried
# again at every character (twice the cost of the whole parse of a small head).
_HEADER_LINES = re.compile(
    rf"^({SIP_TOKEN_PATTERN})[ \t]*:[ \t]*((?:[^\r\n]*[^\r\n \t])?)[ \t]*\r$", re.M)


def _parse_plain_head(data: bytes, max_headers: int, max_line: int) -> _Head | None:
    """The head of a plain message in a few C-level passes; None when the general
    parser must look (then it accepts or refuses exactly as it always did)."""
    pos = _skip_keepalives(data)
    end = data.find(b"\r\n\r\n", pos)
    if end <= pos or end - pos > max_line:      # no line can be longer than the head
        return None
    raw = data[pos:end]
    crlf = raw.count(b"\r\n")
    if (raw.count(b"\r") != crlf or raw.count(b"\n") != crlf      # a bare CR or LF
            or b"\n " in raw or b"\n\t" in raw                      # folding
            or _CTL_BUT_LINE_ENDS.search(raw)):
        return None
    text = raw.decode("utf-8", "surrogateescape") + "\r\n"
    first = text.index("\r\n")
    count = crlf                                    # header lines after the start line
    if count > max_headers:
        return None
    headers = _HEADER_LINES.findall(text, first + 2)
    if len(headers) != count:                       # some line is not name: value
        return None
    try:
        start = _parse_start_line(text[:first])
    except MalformedError:
        return None
    return _Head(start, tuple(headers), end + 4, True)


def _skip_keepalives(data: bytes) -> int:
    pos = 0
    while data.startswith(b"\r\n", pos) or data.startswith(b"\n", pos):
        pos += 2 if data[pos] == 0x0D else 1
    return pos


def _parse_head(data: bytes, max_headers: int, max_line: int,
                stream: bool = False) -> _Head:
    """Start line and headers.  ``stream``: an unterminated line means "wait"."""
    pos = _skip_keepalives(data)
    start: StartLine | None = None
    headers: list[list[str]] = []
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0 and stream:
            if len(data) - pos > max_line:
                raise LimitExceededError(f"header line longer than {max_line} bytes")
            break
        end = len(data) if nl < 0 else nl
        raw = data[pos:end]
        pos = len(data) if nl < 0 else nl + 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > max_line:
            raise LimitExceededError(f"header line longer than {max_line} bytes")
        if not raw:
            if start is None:
                raise MalformedError("empty start line")
            return _Head(start, _freeze(headers), pos, True)
        start = _take_line(raw, start, headers, max_headers, max_line)
    if start is None and not stream:
        raise MalformedError("no start line")
    return _Head(start, _freeze(headers), len(data), False)


def _take_line(raw: bytes, start: StartLine | None, headers: list[list[str]],
               max_headers: int, max_line: int) -> StartLine:
    """Consume one non-empty head line; returns the (possibly new) start line."""
    if _CTL.search(raw):
        raise MalformedError("control character in header section")
    line = _decode(raw)
    if start is None:
        return _parse_start_line(line)
    if line[0] in " \t":
        _unfold(headers, line, max_line)
    elif len(headers) >= max_headers:
        raise LimitExceededError(f"more than {max_headers} headers")
    else:
        headers.append(list(_parse_header_line(line)))
    return start


def _unfold(headers: list[list[str]], line: str, max_line: int) -> None:
    if not headers:
        raise MalformedError("continuation line without a header")
    last = headers[-1]
    piece = line.strip(" \t")
    last[1] = f"{last[1]} {piece}" if last[1] and piece else last[1] + piece
    if len(last[1]) > max_line:
        raise LimitExceededError(f"folded header longer than {max_line} bytes")


def _freeze(headers: list[list[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((n, v) for n, v in headers)


def _content_length(index: dict[str, list[str]]) -> int | None:
    values = {v.strip() for v in index.get("content-length", ())}
    if not values:
        return None
    if len(values) > 1:
        raise MalformedError("conflicting Content-Length headers")
    value = values.pop()
    if not _DIGITS.fullmatch(value):
        raise MalformedError("bad Content-Length")
    return int(value)


# Headers a message carries once (RFC 3261 §7.3.1: no comma-list form), compact forms
# counted with their long ones.  The core reads the first copy and pjsip the last, so a
# second one would be what the stack acts on while every check ran on the first: a signed
# MESSAGE shown as another sender's, a new call taken into a live one (review 54).
# Kamailio drops such a request too.
_SINGLE_HEADERS = ("from", "to", "call-id", "cseq")
# Headers SIP stacks parse by type (pjsip 2.15's parsers: core, auth, event, 100rel,
# session timers, replaces; with the body's own): such a parser ends the header at an
# ``&`` outside quotes and <...>, and reads what follows as another header.  Others
# (Subject, User-Agent, X-...) are read as text to the end of the line.
_TYPED_HEADERS = frozenset({
    "accept", "allow", "call-id", "contact", "content-length", "content-type", "cseq",
    "expires", "from", "max-forwards", "min-expires", "record-route", "route", "require",
    "retry-after", "supported", "to", "unsupported", "via", "authorization",
    "proxy-authorization", "www-authenticate", "proxy-authenticate", "event",
    "allow-events", "subscription-state", "rseq", "rack", "session-expires", "min-se",
    "replaces", "refer-to", "referred-by", "content-encoding", "content-disposition"})


def _check_unambiguous(index: dict[str, list[str]]) -> None:
    """``MalformedError`` for headers another SIP stack would read otherwise than we do:
    a header SIP allows once given twice (pjsip acts on the last copy, review 54), or
    an ``&`` outside quotes and ``<...>`` in a header a stack parses by type (pjsip ends
    it there and reads the rest as another header, review 62)."""
    for name in _SINGLE_HEADERS:
        values = index.get(name)
        if values is not None and len(values) > 1:
            raise MalformedError(f"more than one {name} header")
    for name, values in index.items():
        for value in values:
            if "&" in value and name in _TYPED_HEADERS and bare_ampersand(value):
                raise MalformedError(f"an '&' outside quotes in {name}: another stack "
                                     "ends the header there")


def _check_size(data: bytes, max_size: int) -> None:
    if len(data) > max_size:
        raise LimitExceededError(f"message of {len(data)} bytes exceeds {max_size}")


def crlf_head(head: bytes) -> bool:
    """True when ``head`` (a message's start line and headers, its blank line
    included) ends every line in CRLF: it ends in CRLF CRLF, and every CR and every LF
    in it belongs to a CRLF.  What a stream peer such as pjsip can frame."""
    pairs = head.count(b"\r\n")
    return (head.endswith(b"\r\n\r\n") and head.count(b"\r") == pairs
            and head.count(b"\n") == pairs)


def parse(data: bytes, *, max_headers: int = DEFAULT_MAX_HEADERS,
          max_line: int = DEFAULT_MAX_LINE, max_size: int = DEFAULT_MAX_SIZE,
          exact: bool = False) -> SipMessage:
    """Parse one complete SIP message (a datagram or an already framed message).

    Raises MalformedError on bad syntax or a truncated body, LimitExceededError
    when a limit is passed.  Octets after the Content-Length body are dropped,
    or with ``exact`` refused (MalformedError): for data another parser reads
    too, which may take them for the body (pjsip does, for a datagram with a
    Content-Type; Kamailio answers such a datagram 400).  ``exact`` also refuses
    a head line ending in a bare LF, which pjsip cannot frame on a stream.
    """
    data = bytes(data)
    _check_size(data, max_size)
    head = _parse_plain_head(data, max_headers, max_line) or _parse_head(data, max_headers, max_line)
    assert head.start_line is not None
    if exact and not crlf_head(data[:head.body_start]):
        # pjsip frames a stream by CRLF only: relayed, a bare LF or CR lost the
        # messages behind it on the connection (reviews 79, 80)
        raise MalformedError("a line of the head does not end in CRLF")
    index = _index_headers(head.headers)
    _check_unambiguous(index)
    length = _content_length(index)
    if length is None:
        body = data[head.body_start:]
    elif head.body_start + length > len(data):
        raise MalformedError("Content-Length exceeds the data")
    elif exact and head.body_start + length < len(data):
        raise MalformedError("octets after the Content-Length body")
    else:
        body = data[head.body_start:head.body_start + length]
    return SipMessage._from_parser(head.start_line, head.headers, body, index)


def frame_length(data: bytes, *, max_headers: int = DEFAULT_MAX_HEADERS,
                 max_line: int = DEFAULT_MAX_LINE,
                 max_size: int = DEFAULT_MAX_SIZE) -> int | None:
    """Octets taken by the first message in a stream buffer, or None if incomplete.

    On streams Content-Length is mandatory (RFC 3261 §18.3), so a complete head
    without it is MalformedError.  Leading keep-alive CRLFs count as consumed.
    """
    data = bytes(data)
    head = _parse_head(data[:max_size], max_headers, max_line, stream=True)
    if not head.complete:
        if len(data) >= max_size:
            raise LimitExceededError(f"header section exceeds {max_size} bytes")
        return None
    length = _content_length(_index_headers(head.headers))
    if length is None:
        raise MalformedError("no Content-Length on a stream")
    total = head.body_start + length
    if total > max_size:
        raise LimitExceededError(f"message of {total} bytes exceeds {max_size}")
    return total if total <= len(data) else None


# -- header value helpers --------------------------------------------------

def _address_split(value: str) -> tuple[int, int]:
    """(index of the ``<`` or -1, index just after the address part)."""
    quoted = escaped = False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            escaped = ch == "\\"
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch == "<":
            close = value.find(">", i)
            if close < 0:
                raise MalformedError("unterminated <...> in address")
            return i, close + 1
        elif ch == ";":
            return -1, i  # addr-spec form: parameters after the URI are header params
    if quoted:
        raise MalformedError("unterminated quoted string in address")
    return -1, len(value)


def parse_address(value: str) -> Address:
    """Split a From/To/Contact/Route value into display name, URI and params."""
    lt, end = _address_split(value)
    params = parse_params(value[end:])
    if lt >= 0:
        display = value[:lt].strip(" \t")
        uri = value[lt + 1:end - 1].strip(" \t")
        name = unquote_string(display) if display.startswith('"') else display or None
        return Address(name, uri, params)
    addr = value[:end].strip(" \t")
    if not addr:
        raise MalformedError("empty address")
    return Address(None, addr, params)


# -- building responses ----------------------------------------------------

def _random_tag() -> str:
    return secrets.token_hex(8)


_DIALOG_CREATING = ("INVITE", "SUBSCRIBE", "REFER")


def make_response(request: SipMessage, code: int, reason: str,
                  extra_headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
                  content_type: str | None = None) -> SipMessage:
    """A response to ``request`` per RFC 3261 §8.2.6.2.

    Copies every Via (in order), From, To, Call-ID and CSeq; adds a random To
    tag when the request had none and ``code`` > 100; and, in a 1xx/2xx to a request
    that may create a dialog (INVITE, SUBSCRIBE, no To tag), its Record-Route
    (RFC 3261 12.1.1).  Used for 496/495.
    """
    if not request.is_request:
        raise ValueError("make_response needs a request")
    if not 100 <= code <= 699:
        raise ValueError("status code out of range")
    if _BAD_VALUE_CHARS.search(reason):
        raise ValueError("reason phrase contains CR, LF or NUL")
    headers = [("Via", v) for v in request.get_all("Via")]
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = request.get(name)
        if value is None:
            raise MalformedError(f"request has no {name} header")
        if name == "To" and code > 100 and request.to_tag is None:
            value = f"{value};tag={_random_tag()}"
        headers.append((name, value))
    if 100 < code < 300 and request.to_tag is None and \
            request.method in _DIALOG_CREATING:
        # RFC 3261 12.1.1: a response that may create a dialog carries the route set
        headers.extend(("Record-Route", v) for v in request.get_all("Record-Route"))
    headers.extend(extra_headers)
    if body and content_type is None:
        raise ValueError("a body needs a content type")
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    headers.append(("Content-Length", str(len(body))))
    return SipMessage(StatusLine(code, reason), tuple(headers), bytes(body))


def make_request(method: str, request_uri: str, *, from_uri: str, to_uri: str,
                 call_id: str | None = None, cseq: int = 1, from_tag: str | None = None,
                 to_tag: str | None = None, via_host: str = "127.0.0.1:5060",
                 transport: str = "UDP", extra_headers: Iterable[tuple[str, str]] = (),
                 body: bytes = b"", content_type: str | None = None) -> SipMessage:
    """A minimal, well-formed request (RFC 3261 §8.1.1) for tools, demos and tests."""
    if not _TOKEN.fullmatch(method):
        raise ValueError("bad method")
    if body and content_type is None:
        raise ValueError("a body needs a content type")
    to_value = f"<{to_uri}>" + (f";tag={to_tag}" if to_tag else "")
    headers = [
        ("Via", f"SIP/2.0/{transport} {via_host};branch=z9hG4bK{secrets.token_hex(8)}"),
        ("Max-Forwards", "70"),
        ("From", f"<{from_uri}>;tag={from_tag or _random_tag()}"),
        ("To", to_value),
        ("Call-ID", call_id or f"{secrets.token_hex(12)}@e2m"),
        ("CSeq", f"{cseq} {method}"),
        *extra_headers,
    ]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    headers.append(("Content-Length", str(len(body))))
    return SipMessage(RequestLine(method, request_uri), tuple(headers), bytes(body))
