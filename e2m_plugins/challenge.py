"""Digest challenges (RFC 3261 §22.4, RFC 7616): the realm a challenge names, and the
answer to one (``digest_authorization``, for a phone's own requests).

Whoever sends a 401 or 407 chooses its realm and nonce, and a UA's answer over them
lets the sender test password guesses offline.  So a phone answers only its home
realm (``pjsua_hooks/challenges.py``), and a proxy relays no challenge from
downstream that names its own realm, which only it may send (``kamailio_app``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable

from .errors import MalformedError
from .grammar import quote_string, split_header_list, unquote_string

__all__ = ["CHALLENGE_HEADERS", "challenge_realm", "digest_params", "names_realm",
           "credentials_fit_request", "digest_authorization", "DIGEST_ALGORITHMS", "Credentials"]

# the header each status carries its challenges in (pjsip answers either in either)
CHALLENGE_HEADERS = {401: "WWW-Authenticate", 407: "Proxy-Authenticate"}

_SCHEME = re.compile(r"\s*Digest\s+", re.IGNORECASE)
_PARAM = re.compile(r'([A-Za-z-]+)\s*=\s*(".*"|[^\s"]+)\s*', re.DOTALL)


def _digest_param(value: str, name: str) -> str | None:
    """The one ``name`` parameter of a Digest challenge or credentials header value;
    None when it is not Digest or has no such parameter, or more than one (what the
    other side reads is then unclear).  Parameters are split on commas outside quoted
    strings."""
    scheme = _SCHEME.match(value)
    if scheme is None:
        return None
    try:
        found = [m.group(2) for m in map(_PARAM.fullmatch, (i.strip() for i in
                                                           split_header_list(value[scheme.end():])))
                 if m and m.group(1).lower() == name]
        if len(found) != 1:
            return None
        return unquote_string(found[0]) if found[0].startswith('"') else found[0]
    except MalformedError:
        return None


def digest_params(value: str) -> dict[str, str] | None:
    """Every parameter of one Digest challenge header value, names lower-cased and
    quoted values unquoted; None when it is not Digest, or any item is not a
    ``name=value`` pair, or a name comes twice (a client answering it must read it as
    the sender meant, with no second reading left to a laxer parser)."""
    scheme = _SCHEME.match(value)
    if scheme is None:
        return None
    params: dict[str, str] = {}
    try:
        for item in split_header_list(value[scheme.end():]):
            found = _PARAM.fullmatch(item.strip())
            if found is None:
                return None
            name, raw = found.group(1).lower(), found.group(2)
            if name in params:
                return None
            params[name] = unquote_string(raw) if raw.startswith('"') else raw
    except MalformedError:
        return None
    return params


def challenge_realm(value: str) -> str | None:
    """The realm of one Digest challenge header value; None when it is not Digest or
    names no realm, or more than one (what a client would read is then unclear)."""
    return _digest_param(value, "realm")


def credentials_fit_request(values: list[str], realm: str, request_uri: str,
                            names_us: Callable[[str], bool] = lambda uri: False) -> bool:
    """Whether every Digest credentials value of ``realm`` (case does not count) names
    ``request_uri`` as its ``uri``, as RFC 7616 §3.4.6 asks a server to check: digest
    proves the method and that URI, so a hop that took alice's credentials for a
    request to bob must not spend them on a target of its own (review 67).  Every one
    of our realm, since which one the proxy's digest check read is not ours to know.
    A ``uri`` that ``names_us`` (the proxy itself, no user: what SIPp writes unless
    given ``-auth_uri``) fits only a request to the proxy itself (a REGISTER): bound to
    no target, it must not carry one (review 68)."""
    ours = [v for v in values if (_digest_param(v, "realm") or "").lower() == realm.lower()]
    return bool(ours) and all(
        (uri := _digest_param(v, "uri")) is not None
        and (uri == request_uri or (names_us(uri) and names_us(request_uri)))
        for v in ours)


def names_realm(value: str, realm: str) -> bool:
    """Whether a challenge may be answered as one of ``realm`` (case does not count,
    as in pjsip): it names that realm, or none a client could read for sure."""
    found = challenge_realm(value)
    return found is None or found.lower() == realm.lower()


# (user, password, realm): the phone's digest credentials, read when a challenge is
# answered and dropped after (a phone's ``E2MPhone._credentials``)
Credentials = tuple[str, str, str]

# RFC 7616 3.3 / RFC 8760: the algorithms pjsip 2.15.1 answers too (sip_auth_client.c's
# table; no -sess variants, no AKA), by their IANA names, upper-cased
DIGEST_ALGORITHMS = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}


def digest_authorization(challenge: dict[str, str], credentials: Credentials,
                         method: str, uri: str, *, cnonce: str | None = None) -> str:
    """The Digest credentials answering ``challenge`` for ``method`` ``uri`` (RFC 7616
    3.4 / RFC 2617: qop=auth with nc 1 and a fresh cnonce when offered, else the
    RFC 2069 form), as a Proxy-Authorization value.  The password and HA1 live only in
    this call."""
    user, password, _ = credentials
    realm, nonce = challenge["realm"], challenge["nonce"]
    algorithm = challenge.get("algorithm", "MD5").upper()
    name = DIGEST_ALGORITHMS[algorithm]

    def h(text: str) -> str:
        return hashlib.new(name, text.encode("utf-8")).hexdigest()

    ha2 = h(f"{method}:{uri}")
    fields = [f"username={quote_string(user)}", f"realm={quote_string(realm)}",
              f"nonce={quote_string(nonce)}", f"uri={quote_string(uri)}"]
    offered = [q.strip().lower() for q in challenge.get("qop", "").split(",") if q.strip()]
    ha1 = h(f"{user}:{realm}:{password}")
    if offered:
        cnonce = cnonce or secrets.token_hex(8)
        # a new nonce is answered with count 1; a retry always follows a new challenge
        response = h(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}")
        fields += [f"response={quote_string(response)}", f"algorithm={algorithm}",
                   f"cnonce={quote_string(cnonce)}", "qop=auth", "nc=00000001"]
    else:
        response = h(f"{ha1}:{nonce}:{ha2}")
        fields += [f"response={quote_string(response)}", f"algorithm={algorithm}"]
    if "opaque" in challenge:
        fields.append(f"opaque={quote_string(challenge['opaque'])}")
    return "Digest " + ", ".join(fields)
