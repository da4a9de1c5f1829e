"""How the proxy counts a message's source: by the site that holds the address.

An IPv4 address is one party's (a home, an office behind NAT).  An IPv6 party holds a
whole prefix: a /64 per LAN, and a /56 (often a /48) per line, every address in it
free.  Counted by address, or even by /64, a stranger's bounds multiplied by the
addresses or LANs he holds (reviews 122, 124, 125).  So each per-source rule (TCP
connection shares, registrations on an open registrar, pike's bans, certificate
subscriptions) counts an IPv6 source by its /56, and an address that spells an IPv4
one (IPv4-mapped, 6to4, Teredo's client) as that IPv4 address.

Where honest parties share a site (an office LAN's phones, each with its own address),
a rule may count each address as well and give the site ``SITE_SHARES`` times its
bound (certificate subscriptions), or a rate ``SITE_SHARES`` times an address's, past
which messages are dropped and nobody is banned (``kemi.source_banned``).
"""

from __future__ import annotations

import ipaddress

__all__ = ["SITE_PREFIX", "SITE_SHARES", "site_of", "unmapped"]

SITE_PREFIX = 56     # the prefix of an IPv6 end site (RFC 6177: /48 to /64; /56 is common)
SITE_SHARES = 5      # a site may hold this many addresses' worth where each is counted


def site_of(address: str) -> str:
    """The site ``address`` is counted by: an IPv4 address as it is; an IPv6 one as its
    /56 network, or the IPv4 address it spells; anything else as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        teredo = ip.teredo
        embedded = ip.ipv4_mapped or ip.sixtofour or (teredo[1] if teredo else None)
        if embedded is not None:
            return str(embedded)
        return str(ipaddress.ip_network(f"{ip}/{SITE_PREFIX}", strict=False))
    return str(ip)


def unmapped(address: str) -> str:
    """The IPv4 address an IPv4-mapped IPv6 one (``::ffff:a.b.c.d``) is: what a
    dual-stack ``[::]`` listener reports for an IPv4 sender, which a rule naming IPv4
    peers (``[limits] trusted``) must still know (review 128); any other as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped) if mapped is not None else address
