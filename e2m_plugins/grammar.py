"""The lexical rules SIP headers and MIME headers share: token, quoted-string,
parameters, comma lists.

One copy, so that the SIP model (:mod:`e2m_plugins.sip`), the MIME framing
(:mod:`e2m_plugins.mime`) and the E2M headers (:mod:`e2m_plugins.headers`) read
a value the same way.  RFC 3261 §25.1 and RFC 2045 §5.1 mostly agree; where
they really differ the difference is a field of a :class:`Dialect` (``SIP`` or
``MIME``), not a second parser:

- Token characters.  An RFC 3261 ``token`` is alphanumerics and ``-.!%*_+`'~``.
  An RFC 2045 token is any printable ASCII but the tspecials
  ``()<>@,;:\\"/[]?=``, so it also has ``#$&^{|}`` (RFC 3261 lists ``{}`` among
  its separators and leaves ``#$&^|`` out of token).  SDP (RFC 4566) uses the
  RFC 2045 set.
- Separators.  MIME parameters may follow each other with only whitespace
  between them: RFC 3261 §23.2's own Content-Disposition example writes
  ``filename=smime.p7m handling=required``.  SIP parameters need the ``;``.
- RFC 2231 (MIME only).  ``name*``, ``name*0``, ``name*0*`` ... are encoded or
  continued forms of ``name``.  They are not decoded here and keep their own
  names, but a plain name and an RFC 2231 form of the same name in one header
  are refused: a decoding parser would read the other value.

Parameters, the same in both dialects (``docs/protocol.md`` §5):

- Names are case-insensitive and come back lower-cased.
- A bare parameter (``;lr``) is present with the value ``None``; ``name=""`` is
  the empty string; ``name=`` with nothing after it is malformed.
- A value is a quoted-string (returned unescaped) or a run of characters other
  than whitespace, ``"`` and ``;`` (tokens, hosts, IPv6 references, ``<ids>``).
- :func:`parse_params` refuses a parameter given twice: two values for one name
  are an ambiguity that two parsers (a proxy's and a UA's) may resolve
  differently.  :func:`parse_param_list` keeps repeats in order, for the one
  grammar that allows a list (Proxy-Required-Body's ``cid``); its caller decides.

Every parser here runs in time linear in its input (no nested quantifiers that
can backtrack) and reports bad input as ``MalformedError``; the builders raise
``ValueError`` for what cannot be written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import MalformedError

__all__ = [
    "MIME", "MIME_TOKEN", "MIME_TOKEN_PATTERN", "SIP", "SIP_TOKEN", "SIP_TOKEN_PATTERN",
    "Dialect", "format_param", "parse_param_list", "parse_params", "quote_if_needed",
    "quote_string", "split_header_list", "unquote_string", "bare_ampersand",
    "retry_after_seconds",
]

# RFC 3261 §25.1 token.
SIP_TOKEN_PATTERN = r"[A-Za-z0-9\-.!%*_+`'~]+"
# RFC 2045 §5.1 token: printable ASCII except SPACE and tspecials (= RFC 4566 token).
MIME_TOKEN_PATTERN = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
SIP_TOKEN = re.compile(SIP_TOKEN_PATTERN)
MIME_TOKEN = re.compile(MIME_TOKEN_PATTERN)

# A quoted-string: each character either plain or backslash-escaped.  The two
# alternatives can never start at the same character, so matching is linear.
_QUOTED_PATTERN = r'"(?:[^"\\]|\\.)*"'
_QUOTED = re.compile(_QUOTED_PATTERN, re.DOTALL)
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)
_UNQUOTABLE = re.compile(r"[\x00\r\n]")


@dataclass(frozen=True)
class Dialect:
    """Where SIP and MIME header parameters differ (see the module docstring)."""

    name: str
    token: re.Pattern[str]
    space_separates: bool   # whitespace alone may separate two parameters
    rfc2231: bool           # ``name*`` and ``name*N`` are forms of ``name``
    param: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # name [= value]; a value is a quoted-string or a run without WSP, '"', ';'.
        # Whitespace after a bare name is left for the caller (it may separate).
        object.__setattr__(self, "param", re.compile(
            rf'({self.token.pattern})(?:[ \t]*=[ \t]*({_QUOTED_PATTERN}|[^;\s"]+))?', re.DOTALL))

    def is_token(self, text: str) -> bool:
        return self.token.fullmatch(text) is not None


SIP = Dialect("SIP", SIP_TOKEN, space_separates=False, rfc2231=False)
MIME = Dialect("MIME", MIME_TOKEN, space_separates=True, rfc2231=True)


# -- quoting ---------------------------------------------------------------

def unquote_string(text: str) -> str:
    """Content of one quoted-string (surrounding quotes included in ``text``)."""
    text = text.strip(" \t")
    if not _QUOTED.fullmatch(text):
        raise MalformedError("not a well-formed quoted string")
    return _ESCAPED.sub(r"\1", text[1:-1])


def quote_string(text: str) -> str:
    """A quoted-string whose content is ``text`` (backslash and quote escaped)."""
    if _UNQUOTABLE.search(text):
        raise ValueError("CR, LF or NUL cannot be quoted")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_if_needed(text: str, dialect: Dialect = SIP) -> str:
    """``text`` as it is when it is a token of ``dialect``, else quoted."""
    return text if dialect.is_token(text) else quote_string(text)


# -- where a header ends ---------------------------------------------------

def bare_ampersand(value: str) -> bool:
    """Whether ``value`` holds an ``&`` outside quoted strings and ``<...>``.  pjsip ends
    every header it parses by type at such an ``&`` (the header separator of a SIP
    URI) and reads what follows as another header: ``Expires: 60&c:application/sdp``
    is a second Content-Type to it, nothing to us (review 62)."""
    if "&" not in value:
        return False
    depth, quoted, escaped = 0, False, False
    for ch in value:
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "&" and depth == 0:
            return True
    return False


# -- comma lists -----------------------------------------------------------

def split_header_list(value: str) -> list[str]:
    """Split a header value on commas outside quoted strings and <...>.

    Empty elements are dropped; an unterminated quote or bracket is an error.
    """
    items: list[str] = []
    buf: list[str] = []
    quoted = angle = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif quoted:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif angle:
            angle = ch != ">"
        elif ch == '"':
            quoted = True
        elif ch == "<":
            angle = True
        elif ch == ",":
            items.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    if quoted or angle or escaped:
        raise MalformedError("unterminated quoted string or <...> in header value")
    items.append("".join(buf))
    return [item.strip(" \t") for item in items if item.strip(" \t")]


# -- parameters ------------------------------------------------------------

def parse_param_list(text: str, dialect: Dialect = SIP, *, keep_quotes: bool = False
                     ) -> list[tuple[str, str | None]]:
    """``;a=b;c;d="x;y"`` -> [("a","b"), ("c",None), ("d","x;y")], in order.

    Names are lower-cased; quoted values are unescaped (kept as written, quotes
    and all, with ``keep_quotes``: for a value whose grammar is a token), other
    values are kept verbatim; a bare name gets None.  A leading ``;`` and empty
    segments are skipped.  Repeats are kept: use :func:`parse_params` unless the
    grammar of the header allows a name more than once.
    """
    out: list[tuple[str, str | None]] = []
    pos, end = _skip_blanks(text, 0), len(text)
    separated, gap = True, False
    while pos < end:
        if text[pos] == ";":
            separated = True
            pos = _skip_blanks(text, pos + 1)
            continue
        match = dialect.param.match(text, pos)
        if match is None or not (separated or (gap and dialect.space_separates)):
            raise MalformedError("malformed header parameter")
        raw = match.group(2)
        if raw is None:
            value = None
        elif raw[0] == '"' and not keep_quotes:
            value = _ESCAPED.sub(r"\1", raw[1:-1])
        else:
            value = raw
        out.append((match.group(1).lower(), value))
        pos = _skip_blanks(text, match.end())
        separated, gap = False, pos > match.end()
    return out


def _skip_blanks(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    return pos


def parse_params(text: str, dialect: Dialect = SIP, *, keep_quotes: bool = False
                 ) -> dict[str, str | None]:
    """:func:`parse_param_list` as a dict, in order; a name given twice is malformed.

    In the MIME dialect ``name`` next to ``name*`` or ``name*N`` counts as
    given twice (RFC 2231: they are one parameter to a decoding parser).
    """
    out: dict[str, str | None] = {}
    for name, value in parse_param_list(text, dialect, keep_quotes=keep_quotes):
        if name in out:
            raise MalformedError(f"header parameter {name} given twice")
        out[name] = value
    if dialect.rfc2231:
        for name in out:
            star = name.find("*")
            if star > 0 and name[:star] in out:
                raise MalformedError(f"header parameter {name[:star]} given twice (RFC 2231)")
    return out


def format_param(name: str, value: str | None, dialect: Dialect = SIP,
                 force_quote: bool = False) -> str:
    """``name``, ``name=token`` or ``name="quoted string"`` (no leading ``;``).

    ValueError for a name that is not a token or a value that cannot be quoted.
    """
    if not dialect.is_token(name):
        raise ValueError(f"bad parameter name {name!r}")
    if value is None:
        return name
    return f"{name}={quote_string(value) if force_quote else quote_if_needed(value, dialect)}"


def retry_after_seconds(value: str | None) -> int | None:
    """The delta-seconds a Retry-After value starts with (RFC 3261 20.33: a comment or
    parameters may follow), six digits read at most; None when it starts with none."""
    text = (value or "").strip()
    digits = text[:len(text) - len(text.lstrip("0123456789"))]
    return int(digits[:6]) if digits else None
