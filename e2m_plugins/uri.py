"""SIP and SIPS URIs (RFC 3261 §19.1), the AoR in one, and the hosts in them.

The one place that takes a URI apart.  Certificates name users by SAN URI
(``certstore``), From and To carry the peer's URI (``sip.parse_address`` gives
it as text), proxies are named by host (``headers``), and the test PKI issues
certificates for AoRs (``testpki``): all of them read URIs and hosts here, so
an AoR a certificate names is the AoR a message names, byte for byte.

Rules (``docs/protocol.md`` §5.4):

- ``sip-uri = scheme ":" [ user [ ":" password ] "@" ] host [ ":" port ]
  *( ";" uri-parameter ) [ "?" headers ]`` with RFC 3261's character sets;
  anything else is ``MalformedError``.  The one unescaped ``@`` ends the user
  part (which may hold ``;`` and ``?``, as in ``sip:alice;day=tuesday@host``);
  a second ``@`` is refused.  A URI parameter given twice is refused too.
- An AoR (:class:`SipIdentity`) is user at host: ``sip`` and ``sips`` alike
  (the scheme asks for TLS hops, it does not change who the user is), the user
  case-sensitive after percent-decoding (invalid UTF-8 is refused), the host
  case-insensitive without a trailing dot and IPv6 in canonical form; port,
  URI parameters and headers do not count.  A URI with a password is no AoR.
- Hosts (:func:`validate_host`, :func:`host_key`): an RFC 3261 ``host`` -
  hostname, IPv4 or bracketed IPv6 without a zone - compared by
  :func:`host_key`.

Everything here is linear in its input; errors are ``MalformedError``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import unquote, urlsplit

from .errors import MalformedError

__all__ = [
    "SipIdentity", "SipUri", "aor_of", "check_http_url", "host_key", "http_url_host",
    "identity_of", "is_sip_uri", "parse_uri", "same_aor", "split_hostport", "validate_host",
]

_MAX_HOST = 255
_HOSTNAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?")
# RFC 3261 §25.1 character sets; ``%XX`` escapes never overlap the plain characters.
_USER = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/]|%[0-9A-Fa-f]{2})+")
_PASSWORD = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,]|%[0-9A-Fa-f]{2})*")
_PARAMCHARS = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()\[\]/:&+$]|%[0-9A-Fa-f]{2})+")
_HEADERS = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()\[\]/?:+$&=]|%[0-9A-Fa-f]{2})*")
_PORT = re.compile(r"[0-9]{1,5}")
_URL_FORBIDDEN = re.compile(r'[\s"\\<>\x00-\x1f\x7f]')
_MAX_URL = 2048


# -- hosts -----------------------------------------------------------------

def validate_host(host: str) -> str:
    """Return ``host`` stripped if it is an RFC 3261 ``host``, else MalformedError.

    Hostnames, IPv4 addresses and bracketed IPv6 references; no port, no URI.
    """
    host = host.strip(" \t")
    if host.startswith("["):
        if not host.endswith("]") or "%" in host:  # no zone ids in SIP (RFC 5118)
            raise MalformedError("bad IPv6 reference")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise MalformedError("bad IPv6 reference") from None
        return host
    if len(host) > _MAX_HOST or not _HOSTNAME.fullmatch(host):
        raise MalformedError("bad host")
    return host


def canonical_ip(host: str) -> str | None:
    """``host`` as one spelling of an IP address (None: not an address).  Brackets and
    an IPv4-mapped IPv6 form are taken off: ``[::FFFF:127.0.0.1]`` is ``127.0.0.1``,
    ``[2001:DB8:0::1]`` is ``2001:db8::1``."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@lru_cache(maxsize=256)
def host_key(host: str) -> str:
    """Comparison key: case-insensitive, no trailing dot, canonical IPv6."""
    host = host.strip(" \t").lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            return host
    return host


def split_hostport(text: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) -> (host, port or None); MalformedError."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise MalformedError("bad IPv6 reference")
        host, rest = text[:close + 1], text[close + 1:]
        if rest and not rest.startswith(":"):
            raise MalformedError("bad host and port")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = text.partition(":")
        port_text = port_text_ if colon else None
    port = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
            raise MalformedError("bad port")
        port = int(port_text)
    return validate_host(host), port


# -- SIP URIs --------------------------------------------------------------

@dataclass(frozen=True)
class SipIdentity:
    """The comparable part of a SIP or SIPS URI (an AoR): user (or None) at host."""

    user: str | None
    host: str

    def __str__(self) -> str:
        return f"sip:{self.user}@{self.host}" if self.user is not None else f"sip:{self.host}"


@dataclass(frozen=True)
class SipUri:
    """One SIP or SIPS URI taken apart.  ``user`` and ``password`` are as written
    (still %-escaped); ``params`` has lower-cased names, None for a bare one;
    ``headers`` is the text after ``?`` ("" when there is none)."""

    scheme: str
    user: str | None
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: str = ""
    password: str | None = None

    @property
    def identity(self) -> SipIdentity | None:
        """User (percent-decoded) at host key, or None for a URI with a password."""
        if self.password is not None:
            return None
        user = None
        if self.user is not None:
            try:
                user = unquote(self.user, errors="strict")
            except UnicodeDecodeError:
                return None
        return SipIdentity(user, host_key(self.host))


def _uri_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in text.split(";"):
        name, eq, value = item.partition("=")
        if not _PARAMCHARS.fullmatch(name) or (eq and not _PARAMCHARS.fullmatch(value)):
            raise MalformedError("bad URI parameter")
        name = name.lower()
        if name in params:
            raise MalformedError(f"URI parameter {name} given twice")
        params[name] = value if eq else None
    return params


def parse_uri(text: str) -> SipUri:
    """A ``sip:``/``sips:`` URI (angle brackets allowed) taken apart; MalformedError."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if any(ch.isspace() for ch in text):
        raise MalformedError("white space in a SIP URI")
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in ("sip", "sips"):
        raise MalformedError("not a sip: or sips: URI")
    user = password = None
    userinfo, at, after = rest.partition("@")
    if at:
        if "@" in after:
            raise MalformedError("more than one '@' in a SIP URI")
        user, colon, pw = userinfo.partition(":")
        if not _USER.fullmatch(user) or (colon and not _PASSWORD.fullmatch(pw)):
            raise MalformedError("bad user part in a SIP URI")
        password = pw if colon else None
        rest = after
    rest, question, headers = rest.partition("?")
    if question and not _HEADERS.fullmatch(headers):
        raise MalformedError("bad headers in a SIP URI")
    hostport, semi, params = rest.partition(";")
    host, port = split_hostport(hostport)
    return SipUri(scheme, user, host, port, _uri_params(params) if semi else {},
                  headers, password)


# The cache holds what it is given: entries are bounded in count AND size, so a stranger's
# 60 KB From URIs cannot make 1024 entries weigh 120 MB per worker (review 77).  Real
# AoRs are far shorter; a longer URI is read each time, uncached.
_CACHED_URI_CHARS = 256


def identity_of(uri: str) -> SipIdentity | None:
    """The identity (AoR, or bare host) a SIP or SIPS URI names, or None."""
    if len(uri) > _CACHED_URI_CHARS:
        return _identity_of(uri)
    return _cached_identity_of(uri)


def _identity_of(uri: str) -> SipIdentity | None:
    try:
        return parse_uri(uri).identity
    except MalformedError:
        return None


_cached_identity_of = lru_cache(maxsize=1024)(_identity_of)   # SipIdentity is immutable


def is_sip_uri(uri: str) -> bool:
    """Whether ``parse_uri`` takes ``uri`` (remembered as ``identity_of`` is: a proxy
    checks the same From and To URIs in every request of a call)."""
    if len(uri) > _CACHED_URI_CHARS:
        return _is_sip_uri(uri)
    return _cached_is_sip_uri(uri)


def _is_sip_uri(uri: str) -> bool:
    try:
        parse_uri(uri)
    except (MalformedError, ValueError):
        return False
    return True


_cached_is_sip_uri = lru_cache(maxsize=1024)(_is_sip_uri)
identity_of.cache_clear = _cached_identity_of.cache_clear      # type: ignore[attr-defined]
identity_of.cache_info = _cached_identity_of.cache_info        # type: ignore[attr-defined]


def aor_of(uri: str) -> SipIdentity:
    """The AoR of a user's SIP URI; MalformedError when it is none (no user part,
    a password, not a SIP URI)."""
    identity = identity_of(uri)
    if identity is None or identity.user is None:
        raise MalformedError(f"not a SIP address of record: {uri!r}")
    return identity


def same_aor(a: str, b: str) -> bool:
    """Whether two URIs name the same user AoR; False when either is none."""
    left, right = identity_of(a), identity_of(b)
    return left is not None and left.user is not None and left == right


# -- http(s) URLs (cert-url) -----------------------------------------------

def check_http_url(url: str | None) -> str:
    """``url`` if it is an http or https URL with a host, else MalformedError."""
    http_url_host(url)
    assert url is not None
    return url


def http_url_host(url: str | None) -> str:
    """The lower-cased host of an http(s) URL; MalformedError for anything else."""
    if not url or len(url) > _MAX_URL or _URL_FORBIDDEN.search(url):
        raise MalformedError("bad cert-url")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a bad port
    except ValueError:
        raise MalformedError("bad cert-url") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise MalformedError("cert-url must be an http or https URL with a host")
    return parts.hostname
