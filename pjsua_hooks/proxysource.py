"""Is this the source of our proxy?  The one answer the phone uses everywhere it asks.

A phone with an outbound proxy learns the home's policy at REGISTER (what the home
proxy views and archives).  A request that reaches the phone from anywhere else never
crossed that proxy: its policy never applied (review 102: an insider's MESSAGE sent
straight to bob's UDP phone was shown and never archived).  Two places ask the
question: ``E2MPhone._on_rx`` (requests) and ``CertServiceClient._from_proxy``
(certificate NOTIFYs).  Both ask :class:`ProxySource`.

- :func:`proxy_address` reads where a proxy URI points: its host (brackets taken off an
  IPv6 reference) and port, 5061 by default for ``sips:`` or a TLS phone, else 5060.
- :class:`ProxySource` holds those places as addresses in one spelling (``ipaddress``'s
  compressed form, an IPv4-mapped IPv6 address as its IPv4 one).  A host name is
  resolved once, when it is built (``getaddrinfo``, A and AAAA, as pjsip's own resolver
  does without a nameserver configured), never inside the hook; a name that does not
  resolve matches nothing (fail closed: the phone could not reach that proxy either).
- :meth:`ProxySource.matches` compares a received message's ``(host, port)``: its
  address, and over UDP its port too (over TCP/TLS the proxy may open a connection from
  a port of its choosing; a registered TCP phone only takes its own connection anyway).
  A UDP phone also listens on TCP at its UDP port (RFC 3261 18.2.1: the proxy sends a
  request above 1300 octets there, 18.1.1): a message that came over such a connection
  (``tcp=True``) is compared by address alone, as on a TCP phone.  Its datagrams keep
  the port rule.

Known limit: over UDP the source address is what the datagram says; an off-path sender
can forge it (it sees no answer).  TLS to the proxy is the answer to that.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

from e2m_plugins.errors import E2MError
from e2m_plugins.uri import canonical_ip, parse_uri

__all__ = ["ProxySource", "proxy_address", "canonical_ip"]

Resolver = Callable[[str], Iterable[str]]


def proxy_address(uri: str, tls: bool = False) -> tuple[str, int] | None:
    """(host, port) a proxy URI points at; None when it cannot be read."""
    try:
        parsed = parse_uri(uri)
    except E2MError:
        return None
    if not parsed.host:
        return None
    default = 5061 if parsed.scheme == "sips" or tls else 5060
    return parsed.host.strip("[]"), parsed.port or default


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


class ProxySource:
    """The addresses (and ports) our proxy's messages come from.

    ``places``: (host, port) pairs, an IP address in any spelling or a host name.
    ``udp``: compare the port too.  ``resolve(name) -> addresses``: how a name is
    looked up (default ``getaddrinfo``; called here, once per name, never later).
    """

    def __init__(self, places: Iterable[tuple[str, int]], *, udp: bool = True,
                 resolve: Resolver = _resolve) -> None:
        self.udp = udp
        self.places = tuple(places)
        found: set[tuple[str, int]] = set()
        for host, port in self.places:
            ip = canonical_ip(host)
            addresses = [ip] if ip is not None else [canonical_ip(a) for a in resolve(host)]
            found.update((a, port) for a in addresses if a is not None)
        self.addresses = frozenset(found)

    @classmethod
    def of_uris(cls, uris: Iterable[str | None], *, tls: bool = False, udp: bool = True,
                resolve: Resolver = _resolve) -> ProxySource | None:
        """The source of the proxies these URIs name (None ones skipped); None when none
        can be read."""
        places = [p for p in (proxy_address(u, tls) for u in uris if u) if p is not None]
        return cls(places, udp=udp, resolve=resolve) if places else None

    def matches(self, source: tuple[str, int] | None, *, tcp: bool = False) -> bool:
        """Whether ``source`` (a received message's host and port) is our proxy.

        ``tcp``: the message came over a TCP connection (a UDP phone's TCP listener):
        the proxy opened it from a port of its choosing, so only the address counts."""
        if source is None:
            return False
        ip = canonical_ip(source[0])
        if ip is None:
            return False
        if self.udp and not tcp:
            return (ip, source[1]) in self.addresses
        return any(ip == address for address, _ in self.addresses)

    def holds_address(self, host: str) -> bool:
        """Whether ``host`` (an address in any spelling) is one of our proxy's addresses,
        whatever the port: where a request we send goes (a proxy may listen on several
        ports; review 109: a route set moved to its other UDP port)."""
        ip = canonical_ip(host)
        return ip is not None and any(ip == address for address, _ in self.addresses)

    def __repr__(self) -> str:
        return f"ProxySource({sorted(self.addresses)!r}, udp={self.udp})"
