"""Which in-dialog requests the proxy routes: a token in its own Record-Route.

A request with a To tag and a Route naming the proxy looks like a request inside a
dialog the proxy record-routed, and Kamailio's ``loose_route`` relays it to its
Request-URI.  Nothing in it says the proxy ever saw that dialog, so without a check
anyone could relay any request (ACKs and BYEs included, which are never challenged)
through the proxy to any address.  So the proxy puts a parameter in the Record-Route
it adds to a dialog-creating request: an HMAC of the dialog's Call-ID, the
caller's tag and the dialog's two parties (the From and To AoRs of that request, as the
core reads them, sorted) under a key of its own.  An in-dialog request is routed only
when one of its Route entries carries the token for its Call-ID, one of its tags (the
callee's requests carry the caller's tag in To) and its own From and To AoRs (the
callee's requests swap them: the sorted pair is the same).  RFC 3261 §12.2.1.1 keeps a
dialog's From and To URIs for its life, so a request of the dialog written "From
alice" by someone else is not routed: an ACK above all, which is never challenged
(review 98).  A From or To the core cannot read gets no token.

The key: every node of a cluster derives the same one from the proxy's private key
(as for the key-cache seal, with its own label), so a dialog outlives its node and
the proxy's restart.  A plain routing proxy (no ``[identity]``) makes one at start:
its dialogs do not outlive a restart of it.

What it does not bound: the parties of a dialog (who hold its token) may still put
any Request-URI in their own in-dialog requests; the proxy keeps no dialog state to
compare it with (docs/threat-model.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache

from e2m_plugins.errors import E2MError
from e2m_plugins.grammar import parse_params, split_header_list
from e2m_plugins.sip import parse_address
from e2m_plugins.uri import identity_of

__all__ = ["RouteTokens", "PARAM", "via_key", "MAX_ROUTE_ENTRIES", "dialog_ids", "routes_within_bounds",
           "written_as_ours", "UNROUTED_MARK", "route_entries", "route_set_digest",
           "UNREAD_ROUTE_SET", "same_route_uri", "double_rr_entry", "Parties",
           "dialog_parties", "carries_a_token"]

_IDS = ("$ci", "$ft", "$tt")
_REQUEST_IDS = ("$T_req($ci)", "$T_req($ft)", "$T_req($tt)")


def dialog_ids(ksr, *, of_request: bool = False) -> tuple[str, str | None, str | None]:
    """Call-ID, From tag and To tag (None when absent) from Kamailio's parse, as the core
    reads them: blanks around a value stripped.  Kamailio keeps a Call-ID's trailing
    blank, the core does not; every place that names a dialog from Kamailio's ids (the
    route token, the scope a BYE's 2xx ends) must name the one the core kept keys under
    (review 24).  ``of_request``: in a reply route, those of the transaction's request
    (what we relayed, not what the answer wrote)."""
    names = _REQUEST_IDS if of_request else _IDS
    call_id = (ksr.pv.get(names[0]) or "").strip(" \t")
    from_tag = (ksr.pv.get(names[1]) or "").strip(" \t") or None
    to_tag = (ksr.pv.get(names[2]) or "").strip(" \t") or None
    return call_id, from_tag, to_tag


# A dialog's two parties as a request names them: its From and To AoRs, in that order
# (``identity_of``), each as JSON.  A token binds them as (caller, callee): the order of
# the initial request, and of any request whose From tag is the caller's.
Parties = tuple[str, str]


def dialog_parties(from_uri: str | None, to_uri: str | None) -> Parties | None:
    """The parties (``Parties``) of a request whose From URI is ``from_uri`` and To URI
    ``to_uri`` (bare, as Kamailio's ``$fu``/``$tu``, or a name-addr): a sip:/sips: URI by
    its AoR as the core reads it, a URI of another scheme (``tel:``, a call to a number)
    as written, case folded (RFC 3261 §12.2.1.1 keeps a dialog's From and To URIs).  None
    when the core cannot read a sip:/sips: one, or there is none (no token is made or
    admitted for it: fail closed).  In the request's order, From first: which of them
    is the caller follows from which tag the token was made with (``admits``).
    Remembered for short URIs (a call's requests and replies ask it some ten times)."""
    if len(from_uri or "") + len(to_uri or "") > _CACHED_PARTIES_CHARS:
        return _dialog_parties(from_uri, to_uri)
    return _cached_dialog_parties(from_uri, to_uri)


def _dialog_parties(from_uri: str | None, to_uri: str | None) -> Parties | None:
    named = []
    for uri in (from_uri, to_uri):
        text = (uri or "").strip()
        # a bare URI's own ;params and user part are the URI's, never a header's
        # (review 99: "sip:+1555;npdi@gw" read as a name-addr was refused)
        try:
            bare = parse_address(text if "<" in text else f"<{text}>").uri if text else ""
        except E2MError:
            return None
        scheme = bare.partition(":")[0].lower()
        if scheme and scheme not in ("sip", "sips"):
            named.append(json.dumps([bare.lower()], separators=(",", ":")))
            continue
        identity = identity_of(bare) if bare else None
        if identity is None:
            return None
        named.append(json.dumps([identity.user, identity.host], separators=(",", ":")))
    return named[0], named[1]


# bounded in count and in size, as uri.identity_of's cache (review 77): a longer pair is
# worked out each time
_CACHED_PARTIES_CHARS = 512
_cached_dialog_parties = lru_cache(maxsize=1024)(_dialog_parties)


PARAM = "e2m-rr"             # the Record-Route URI parameter
UNROUTED_MARK = "e2mnr"      # our Via's parameter on a request we relay unrecorded
MAX_ROUTE_ENTRIES = 16       # Route entries read per request (a real route set has a few)
_MAX_ROUTE_TEXT = 4096       # characters of Route header read per request
# The parameter's value: the dialog's token, then a MAC of the caller's side of the
# route set, 64 bits of HMAC-SHA256 each (32 hex digits on the wire, as the 128-bit
# token alone was: an INVITE through two proxies reaches bob close to pjsip's 4,000
# octets).  A guess at either is one online try per call.  The token binds the
# dialog's parties since review 98: a dialog record-routed before that (its token made
# of the Call-ID and tag alone) is no longer routed in (its in-dialog requests are
# refused 403, its ACKs dropped) and must be set up again.
_TOKEN_BYTES = 8
_SIDE_BYTES = 8
_ENTRY = re.compile(r"<([^<>]*)>")
_TOKEN = re.compile(r";\s*" + re.escape(PARAM) +
                    r"\s*=\s*([0-9a-fA-F]{16})([0-9a-fA-F]{16})?(?=[;>\s]|$)", re.IGNORECASE)


class RouteTokens:
    """Makes and checks the Record-Route token of a dialog."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a route key needs at least 128 bits")
        self._key = key

    @classmethod
    def random(cls) -> RouteTokens:
        """For a proxy without an identity: a key of its own, made at start."""
        return cls(os.urandom(32))

    def token(self, call_id: str, tag: str, *, parties: Parties | None) -> str | None:
        """The token of the dialog ``call_id`` opened by the UA whose tag is ``tag``
        between ``parties`` (``dialog_parties``); None when those are unread (None)."""
        if parties is None:
            return None
        data = json.dumps([call_id, tag, list(parties)], separators=(",", ":"))
        return hmac.new(self._key, b"dialog\x00" + data.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()[:_TOKEN_BYTES].hex()

    def param(self, call_id: str, tag: str, callers_side: Iterable[str] | None = (),
              via: str | None = None, *, parties: Parties | None) -> str | None:
        """The parameter to add to the Record-Route (``rr.add_rr_param``), None when
        ``parties`` are unread (the request must then not be record-routed): the dialog's
        token (``token``) and a MAC of the Record-Route the request reached us with
        (``callers_side``: the caller's side of the route set; None when it cannot be
        read, and then no reply vouches for it: ``keeps_callers_side``) and of the top
        ``via`` the request reached us with (the reply brings it back below ours, at
        whichever node it reaches): another request with the dialog's ids, sent to get
        a MAC of a Record-Route of its sender's choosing, gets one for its own Via only;
        with the same Via it is the same transaction to tm, a retransmission absorbed
        (review 88)."""
        below: list[tuple[str, tuple[str, ...]]] | None = None
        if callers_side is not None:
            try:
                below = [_comparable(entry) for entry in _entries(callers_side)]
            except E2MError:
                below = None
        token = self.token(call_id, tag, parties=parties)
        if token is None:
            return None
        side = self._side(call_id, tag, below, via_key(via))
        return f";{PARAM}={token}{side}"

    def _side(self, call_id: str, tag: str, below: list[tuple[str, tuple[str, ...]]] | None,
              via: tuple[str, ...] | None) -> str:
        # None (unread) has a MAC of its own that no list's ever equals
        data = json.dumps([call_id, tag, via, below], separators=(",", ":"))
        return hmac.new(self._key, b"callers-side\x00" + data.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()[:_SIDE_BYTES].hex()

    def unrouted_mark(self, call_id: str, via: str | None) -> str:
        """The Via parameter value (``UNROUTED_MARK``) the proxy puts on its own Via of an
        INVITE or SUBSCRIBE it relays without record-routing (in a dialog): a MAC of
        the Call-ID and the request's top Via as it reached us.  A reply that matches
        no transaction (tm's wait ended, or another node got it) carries it back, so a
        re-INVITE's late 2xx, which has no Record-Route by right, is told from an
        initial INVITE's stripped of ours (review 90); it cannot be moved to another
        request's reply, whose Via below ours differs."""
        data = json.dumps([call_id, via_key(via)], separators=(",", ":"))
        return hmac.new(self._key, b"unrouted\x00" + data.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()[:_SIDE_BYTES].hex()

    def marks_unrouted(self, call_id: str, our_via: str | None, via: str | None) -> bool:
        """Whether ``our_via`` (a reply's top Via) carries the mark ``unrouted_mark``
        gives ``call_id`` and ``via`` (the Via below ours)."""
        if not our_via:
            return False
        try:
            value = parse_params(our_via.partition(";")[2]).get(UNROUTED_MARK)
        except E2MError:        # a parameter given twice, or unreadable: no mark
            return False
        return value is not None and hmac.compare_digest(value.lower(),
                                                         self.unrouted_mark(call_id, via))

    def admits(self, call_id: str, tags: Iterable[str | None], routes: Iterable[str], *,
               parties: Parties | None) -> bool:
        """Whether one of the Route header values ``routes`` carries the token of
        ``call_id`` with one of ``tags`` and ``parties`` (the request's own From and To,
        ``dialog_parties``; None: never).  Reads at most ``MAX_ROUTE_ENTRIES`` entries
        and ``_MAX_ROUTE_TEXT`` characters: a stranger's long Route costs no more."""
        return self.side(call_id, tags, routes, parties=parties) is not None

    def side(self, call_id: str, tags: Iterable[str | None], routes: Iterable[str], *,
             parties: Parties | None) -> int | None:
        """As ``admits``, which side the request comes from: 0 the caller's (the token's
        tag in From, ``parties`` as they are: From the caller), 1 the callee's (its tag
        in To, ``parties`` the other way round); None when no token fits.  A request with
        the caller's tag in From written From the callee fits none (review 99)."""
        if parties is None or not call_id:
            return None
        wanted = [(self.token(call_id, tag, parties=parties if i == 0 else parties[::-1]), i)
                  for i, tag in enumerate(tags) if tag]
        carried = [token for _, token in _carried(routes)]
        for token, index in wanted:
            if token is not None and any(hmac.compare_digest(token, t) for t in carried):
                return index
        return None

    def ours_in(self, call_id: str, tag: str, routes: Iterable[str], *,
                parties: Parties | None) -> list[str]:
        """The URIs of the Record-Route/Route entries ``routes`` that carry our token of
        ``call_id``, ``tag`` and ``parties``: entries this proxy wrote, whatever they now
        say (read as ``admits`` reads, as boundedly)."""
        wanted = self.token(call_id, tag, parties=parties)
        if not call_id or not tag or wanted is None:
            return []
        return [uri for uri, token in _carried(routes) if hmac.compare_digest(token, wanted)]


    def keeps_callers_side(self, call_id: str, tag: str, reply_routes: Iterable[str],
                           via: str | None = None, *, parties: Parties | None) -> bool:
        """Whether ``callers_side_entry`` finds the entry (below)."""
        return self.callers_side_entry(call_id, tag, reply_routes, via,
                                       parties=parties) is not None

    def callers_side_entry(self, call_id: str, tag: str, reply_routes: Iterable[str],
                           via: str | None = None, *, parties: Parties | None) -> str | None:
        """The URI of the entry this transaction wrote nearest the caller, or None.
        Whether an entry of the reply's Record-Route carrying our token of ``call_id``,
        ``tag`` and ``parties`` is followed by exactly the entries its request reached us with: the
        MAC after the token in its value (``param``) must be that of the entries below
        and of the ``via`` below ours in the reply (the request's top Via as it reached
        us; ``received`` and ``rport`` left out, which we add).
        A hop on the callee's side may add or rewrite entries above ours, never below:
        those would become the caller's first hops (review 82).  It needs no state: a
        stray reply (a hop changed our Via branch, or another node of a cluster got it)
        is checked the same (review 86).  Any such
        entry will do (a double Record-Route, a cluster's nodes sharing the key, a
        spiral).  Only one fits: in a double Record-Route the upper entry has the
        lower one below it, and in a spiral the other pass's entry has another Via
        below it (review 112: which of our entries faces the caller is this one, not
        the lowest).  Call it on routes ``routes_within_bounds`` has passed."""
        wanted = self.token(call_id, tag, parties=parties)
        if wanted is None:
            return None
        entries = _entries(reply_routes)
        for i, entry in enumerate(entries):
            inside = _ENTRY.search(entry)
            found = _TOKEN.search(inside.group(1)) if inside else None
            if found and found.group(2) and hmac.compare_digest(found.group(1).lower(), wanted) \
                    and hmac.compare_digest(found.group(2).lower(), self._side(
                        call_id, tag, [_comparable(e) for e in entries[i + 1:]],
                        via_key(via))):
                return inside.group(1)
        return None


_SENT_PROTOCOL = re.compile(r"\s*([^/\s]+\s*/\s*[^/\s]+\s*/\s*[^\s/;]+)\s*(.*)", re.S)


def via_key(via: str | None) -> tuple[str, ...] | None:
    """A Via entry as the MAC takes it: no blanks, its parameters as a set without
    ``received`` and ``rport`` (a proxy adds or fills them as it forwards).  Only the
    protocol and the parameter names are folded to one case: the sent-by and every
    value (the branch first) stay as written, as Kamailio's transaction match compares
    them, so a Via tm takes for another transaction never has alice's key (review 90:
    her branch in other letters got her MAC)."""
    if via is None:
        return None
    head, *params = via.split(";")
    found = _SENT_PROTOCOL.fullmatch(head)
    first = ("".join(found.group(1).split()).upper() + " " + "".join(found.group(2).split())
             if found else "".join(head.split()))
    kept = []
    for param in params:
        name, eq, value = param.partition("=")
        name = name.strip().lower()
        if name not in ("received", "rport"):
            kept.append(name + eq + value.strip())
    return (first, *sorted(kept))


# What Kamailio's rr module writes in our entry (``record_route``, double-RR's ``r2``,
# ``add_rr_param``'s token): any other parameter was put there by someone else.
_OWN_PARAMS = frozenset({"lr", "r2", "transport", PARAM})


def written_as_ours(uri: str) -> bool:
    """Whether ``uri``, an entry carrying our token, is as the proxy wrote it: sip or
    sips, no user part, no headers, no parameter but ``_OWN_PARAMS``.  ``is_myself``
    reads host, port and transport only; a ``maddr`` added to our entry sends the
    caller's in-dialog requests to the hop it names (pjsip follows it: review 90)."""
    scheme, _, rest = uri.partition(":")
    if scheme.strip().lower() not in ("sip", "sips") or "@" in rest or "?" in rest:
        return False
    _, *params = rest.split(";")
    return all(p.partition("=")[0].strip().lower() in _OWN_PARAMS for p in params)


def _entries(routes: Iterable[str]) -> list[str]:
    return [item for value in routes for item in split_header_list(value)]


def _comparable(entry: str) -> tuple[str, tuple[str, ...]]:
    """An entry's URI as a UAS may reprint it (pjsip puts ``lr`` first): no blanks,
    one case, its parameters as a set, ``lr=on`` as ``lr``; the display name and
    header parameters play no part in routing."""
    text = "".join(entry.split()).lower()
    inside = _ENTRY.search(text)
    base, *params = (inside.group(1) if inside else text).split(";")
    return base, tuple(sorted("lr" if p == "lr=on" else p for p in params))


def routes_within_bounds(routes: Iterable[str]) -> bool:
    """Whether ``routes`` is read whole by ``_carried``: at most ``MAX_ROUTE_ENTRIES``
    entries in ``_MAX_ROUTE_TEXT`` characters, every one in ``<...>`` as RFC 3261's
    name-addr has it (a check of what lies past the bound, or of an entry written
    without brackets that ``_carried`` does not see, cannot vouch for it)."""
    routes = list(routes)
    text = ",".join(routes)
    if len(text) > _MAX_ROUTE_TEXT:
        return False
    try:
        items = _entries(routes)
    except E2MError:
        return False
    return len(items) <= MAX_ROUTE_ENTRIES and all(_plain_entry(item) for item in items)


# A route set the checks could not read: never equal to any ``route_set_digest``.
UNREAD_ROUTE_SET = "-"


def route_entries(values: Iterable[str]) -> list[str] | None:
    """The entries of Route or Record-Route header values ``values``, in order; None
    when they are not read whole (``routes_within_bounds``)."""
    values = list(values)
    if not routes_within_bounds(values):
        return None
    try:
        return _entries(values)
    except E2MError:
        return None


def route_set_digest(entries: Iterable[str] | None) -> str:
    """A part of a dialog's route set (entries in the order a request's Route carries
    them) as a digest: each URI as written, blanks out and case folded (its parameters
    as a set, ``lr=on`` as ``lr``, as ``_comparable`` reads them, so a UA reprinting
    our entry with ``lr`` first still matches).  ``UNREAD_ROUTE_SET`` for None."""
    if entries is None:
        return UNREAD_ROUTE_SET
    try:
        text = json.dumps([_comparable(entry) for entry in entries], separators=(",", ":"))
    except (E2MError, ValueError):
        return UNREAD_ROUTE_SET
    return hashlib.sha256(b"e2m route set\x00" + text.encode("utf-8", "surrogateescape")
                          ).hexdigest()[:32]


def same_route_uri(entry: str, uri: str | None) -> bool:
    """Whether the Route entry ``entry`` names ``uri`` (a destination URI as
    ``loose_route`` set it from an entry), compared as ``route_set_digest`` compares."""
    if not uri:
        return False
    return _comparable(entry) == _comparable("<" + uri.strip() + ">")


def double_rr_entry(entry: str) -> bool:
    """Whether ``loose_route`` takes the entry after ``entry`` off too: our first entry
    of a double Record-Route carries ``r2`` (rr module's ``is_2rr``: ``r2`` or
    ``r2=on``; any other value is read here as ``r2`` too, which can only make the
    remaining Route differ from the route set, never match it by mistake: the
    destination check compares what ``loose_route`` chose)."""
    _, params = _comparable(entry)
    return any(p == "r2" or p.startswith("r2=") for p in params)


def _plain_entry(item: str) -> bool:
    """``<URI>`` with parameters after it at most: no display name, no quotes.  A quoted
    display name can hold a whole ``<...>`` of ours while the entry's own URI, the one
    a SIP stack routes by, is a hop's (review 86); no proxy writes one."""
    item = item.strip()
    return item.startswith("<") and item.count("<") == 1 and item.count(">") == 1 \
        and '"' not in item


def carries_a_token(routes: Iterable[str]) -> bool:
    """Whether an entry of the Route header values ``routes`` carries a route token of
    ours at all, whichever dialog's (read as ``admits`` reads)."""
    return any(True for _ in _carried(routes))


def _carried(routes: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(URI, token) of each entry of ``routes`` carrying a route token, at most
    ``MAX_ROUTE_ENTRIES`` entries of ``_MAX_ROUTE_TEXT`` characters."""
    text = ",".join(routes)[:_MAX_ROUTE_TEXT]
    for count, entry in enumerate(_ENTRY.finditer(text)):
        if count >= MAX_ROUTE_ENTRIES:
            break
        found = _TOKEN.search(entry.group(1))
        if found:
            yield entry.group(1), found.group(1).lower()
