"""Digest challenges (RFC 3261 §22.4, RFC 7616): the realm a challenge names.

Whoever sends a 401 or 407 chooses its realm and nonce, and a UA's answer over them
lets the sender test password guesses offline.  So a phone answers only its home
realm (``pjsua_hooks/challenges.py``), and a proxy relays no challenge from
downstream that names its own realm, which only it may send (``kamailio_app``).
"""

from __future__ import annotations

import re

from .errors import MalformedError
from .grammar import split_header_list, unquote_string

__all__ = ["CHALLENGE_HEADERS", "challenge_realm", "names_realm"]

# the header each status carries its challenges in (pjsip answers either in either)
CHALLENGE_HEADERS = {401: "WWW-Authenticate", 407: "Proxy-Authenticate"}

_SCHEME = re.compile(r"\s*Digest\s+", re.IGNORECASE)
_REALM = re.compile(r'realm\s*=\s*(".*"|[^\s"]+)\s*', re.IGNORECASE | re.DOTALL)


def challenge_realm(value: str) -> str | None:
    """The realm of one Digest challenge header value; None when it is not Digest or
    names no realm, or more than one (what a client would read is then unclear).
    Parameters are split on commas outside quoted strings."""
    scheme = _SCHEME.match(value)
    if scheme is None:
        return None
    try:
        items = split_header_list(value[scheme.end():])
        found = [m.group(1) for m in map(_REALM.fullmatch, (i.strip() for i in items)) if m]
        if len(found) != 1:
            return None
        return unquote_string(found[0]) if found[0].startswith('"') else found[0]
    except MalformedError:
        return None


def names_realm(value: str, realm: str) -> bool:
    """Whether a challenge may be answered as one of ``realm`` (case does not count,
    as in pjsip): it names that realm, or none a client could read for sure."""
    found = challenge_realm(value)
    return found is None or found.lower() == realm.lower()
