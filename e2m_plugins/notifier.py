"""The notifier's side of an RFC 6665 subscription dialog, without I/O.

What a notifier keeps from a SUBSCRIBE it accepted (``open_dialog``), and the NOTIFY
it sends inside that dialog (``notify_request``): From is the SUBSCRIBE's To with our
tag, To its From with the subscriber's tag, the same Call-ID, our own CSeq space, our
Contact; the Record-Route set (top first) is the route set and the Contact the remote
target (RFC 3261 §12.1.1, §12.2.1.1; RFC 6665 §4.1.3, §4.2.2).

One rule of ours: a NOTIFY goes only back toward the address the SUBSCRIBE came from.
Without a route set it is sent there (not to the Contact's host: a subscriber behind
NAT is reached, and nobody can make the notifier send to a third party); with one,
the top Record-Route must name that address, or the SUBSCRIBE is refused
(``PolicyError``): otherwise a forged Record-Route aims NOTIFYs at a victim (seen: one
SUBSCRIBE of 369 octets made 4 NOTIFYs, 3,900 octets, with tm's UDP retransmissions).
From a UDP source, it must not ask for TCP or TLS either: that source may be forged,
and a connect to it that is never answered holds one of the proxy's connections.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import E2MError, MalformedError, PolicyError
from .grammar import SIP, split_header_list
from .sip import SipMessage, parse_address
from .uri import aor_of, parse_uri

__all__ = ["Peer", "Subscription", "NotifyRequest", "open_dialog", "refresh_dialog",
           "SubscriberMovedError", "in_dialog_hop",
           "notify_request", "next_hop_for_size", "stream_destination", "own_connection",
           "UDP_LIMIT"]

_TRANSPORTS = ("udp", "tcp", "tls")
_MAX_ROUTES = 16            # Record-Route entries kept per dialog; more is refused
_MAX_DIALOG_CHARS = 4096    # what one subscription may make the notifier keep
UDP_LIMIT = 1300            # RFC 3261 §18.1.1: a larger request needs congestion control
_SENDER_ADDS = 160          # what the sender (tm) adds: Via with branch, Max-Forwards, length


@dataclass(frozen=True)
class Peer:
    """Where a request came from: the address, port and transport it arrived on."""

    ip: str
    port: int
    transport: str = "udp"

    def uri(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        suffix = "" if self.transport == "udp" else f";transport={self.transport}"
        return f"sip:{host}:{self.port}{suffix}"


@dataclass(frozen=True)
class Subscription:
    """One accepted subscription: its dialog, and where its NOTIFYs go."""

    call_id: str
    local_tag: str             # ours: the To tag of our 200, the From tag of our NOTIFYs
    remote_tag: str            # the subscriber's From tag
    event_id: str              # the Event header's id parameter, "" without one
    aor: str                   # the resource: the Request-URI's AoR
    local_uri: str             # the SUBSCRIBE's To URI: our NOTIFYs' From
    remote_uri: str            # the SUBSCRIBE's From URI: our NOTIFYs' To
    remote_target: str         # the subscriber's Contact URI
    route_set: tuple[str, ...]  # Record-Route URIs, top (nearest to us) first
    next_hop: str              # where our NOTIFYs are sent
    source: str                # the subscriber's address (the per-source bound)
    contact: str               # our Contact URI
    expires: float             # epoch seconds
    source_port: int = 0       # the UDP port the opening SUBSCRIBE came from (0: not
                               # known, or it came over TCP or TLS)


@dataclass(frozen=True)
class NotifyRequest:
    """A NOTIFY to send: Request-URI, next hop and the dialog's headers (the caller
    adds Event, Subscription-State and the body)."""

    request_uri: str
    next_hop: str
    headers: tuple[tuple[str, str], ...]


def _uri(value: str, what: str) -> str:
    try:
        uri = parse_address(value).uri
        parse_uri(uri)
    except E2MError:
        raise MalformedError(f"unreadable {what}") from None
    return uri


def _route_set(message: SipMessage) -> tuple[str, ...]:
    routes: list[str] = []
    for value in message.get_all("Record-Route"):
        routes.extend(_uri(item, "Record-Route") for item in split_header_list(value))
    if len(routes) > _MAX_ROUTES:
        raise MalformedError(f"more than {_MAX_ROUTES} Record-Route entries")
    return tuple(routes)


def _same_address(host: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")) == ipaddress.ip_address(ip)
    except ValueError:
        return False      # a name: the proxy resolves none (dns=no), and it may be anyone's


def _transport(uri: str) -> str:
    """The transport a URI asks for; a ``sips`` URI's ``transport=tcp`` is TLS over TCP
    (RFC 5630 §3.1.2; review 137 HB3: a TLS hop's refresh was taken for another
    transport)."""
    parsed = parse_uri(uri)
    transport = (parsed.params.get("transport") or "").lower()
    if parsed.scheme == "sips" and transport in ("", "tcp"):
        return "tls"
    return transport or "udp"


def _next_hop(route_set: Sequence[str], peer: Peer) -> str:
    if not route_set:
        return peer.uri()
    if not _same_address(parse_uri(route_set[0]).host, peer.ip):
        raise PolicyError("the Record-Route set does not start at the address the "
                          "SUBSCRIBE came from")
    if peer.transport == "udp" and _transport(route_set[0]) != "udp":
        # a UDP source may be forged: a connect to it that is never answered holds
        # one of the proxy's TCP connections for the whole connect timeout
        raise PolicyError("a SUBSCRIBE over UDP whose Record-Route asks for "
                          f"{_transport(route_set[0])}")
    return route_set[0]


def _contact(message: SipMessage) -> str:
    values = [item for value in message.get_all("Contact") for item in split_header_list(value)]
    if len(values) != 1:
        raise MalformedError("a SUBSCRIBE needs exactly one Contact")
    return _uri(values[0], "Contact")


def open_dialog(message: SipMessage, *, local_tag: str, peer: Peer, contact: str,
                event_id: str | None, expires: float) -> Subscription:
    """The subscription an initial SUBSCRIBE opens, with ``local_tag`` as our tag.
    ``MalformedError`` (answer 400) for a SUBSCRIBE without a From tag or a usable
    Contact; ``PolicyError`` (403) when its route set leads elsewhere."""
    if peer.transport not in _TRANSPORTS:
        raise MalformedError(f"unknown transport {peer.transport!r}")
    remote_tag = message.from_tag
    if not remote_tag:
        raise MalformedError("a SUBSCRIBE needs a From tag")
    if event_id and not SIP.is_token(event_id):
        raise MalformedError("the Event id is not a token")
    route_set = _route_set(message)
    try:
        aor = str(aor_of(message.request_uri or ""))
        local_uri = message.address("To").uri
        remote_uri = message.address("From").uri
    except E2MError:
        raise MalformedError("unreadable Request-URI, From or To") from None
    sub = Subscription(call_id=message.call_id, local_tag=local_tag, remote_tag=remote_tag,
                       event_id=event_id or "", aor=aor, local_uri=local_uri,
                       remote_uri=remote_uri, remote_target=_contact(message),
                       route_set=route_set, next_hop=_next_hop(route_set, peer),
                       source=peer.ip, contact=contact, expires=expires,
                       # a datagram's port is the hop's socket; a connection's is
                       # not, and any UDP sender could take its number (review 151 K1)
                       source_port=peer.port if peer.transport == "udp" else 0)
    _check_size(sub)
    return sub


def _check_size(sub: Subscription) -> None:
    kept = (sub.call_id, sub.remote_tag, sub.event_id, sub.aor, sub.local_uri,
            sub.remote_uri, sub.remote_target, *sub.route_set)
    if sum(len(text) for text in kept) > _MAX_DIALOG_CHARS:
        raise MalformedError(f"a subscription of more than {_MAX_DIALOG_CHARS} characters "
                             "of dialog state")


class SubscriberMovedError(PolicyError):
    """A refresh from where the subscription's NOTIFYs cannot follow it: the host
    answers 481, and the subscriber subscribes anew (RFC 6665 §4.1.2.2)."""


def refresh_dialog(subscription: Subscription, message: SipMessage, expires: float,
                   peer: Peer | None = None) -> Subscription:
    """The subscription after a refreshing SUBSCRIBE in its dialog: a new expiry, and
    a new remote target when it carries a Contact (a target refresh, RFC 6665 §4.1.2.1).

    ``peer``, where the refresh came from (the host checked it is the subscription's
    address): the next hop follows it as ``in_dialog_hop`` says (a new connection of
    the subscription's own stream transport, review 133 K1), else
    ``SubscriberMovedError``."""
    target = _contact(message) if message.has("Contact") else subscription.remote_target
    hop = subscription.next_hop if peer is None else in_dialog_hop(subscription, peer)
    if peer is not None and target != subscription.remote_target \
            and _through_opening_port(subscription, peer):
        # the port a hop opened from may be one it has let go (a NAT mapping that
        # lapsed, a socket per request): whoever holds it now may end the follow, as
        # the hop's socket could, but not take its NOTIFYs (review 152 K1)
        raise SubscriberMovedError("a target refresh from the port the subscription was "
                                   "opened from, not the one its Record-Route names")
    refreshed = replace(subscription, remote_target=target, expires=expires, next_hop=hop)
    _check_size(refreshed)
    return refreshed


def may_act_in(subscription: Subscription, peer: Peer) -> bool:
    """Whether a request from ``peer`` may act in ``subscription``'s dialog
    (``in_dialog_hop`` takes it)."""
    try:
        in_dialog_hop(subscription, peer)
    except SubscriberMovedError:
        return False
    return True


def _record_routed_port(hop: str) -> int:
    target = parse_uri(hop)
    return target.port or (5061 if _transport(hop) == "tls" else 5060)


def _through_opening_port(subscription: Subscription, peer: Peer) -> bool:
    """A routed UDP subscription's request taken only because it came from the port the
    subscription was opened from (not the one its Record-Route names)."""
    return bool(subscription.route_set) and peer.transport == "udp" \
        and peer.port == subscription.source_port != _record_routed_port(subscription.next_hop)


def in_dialog_hop(subscription: Subscription, peer: Peer) -> str:
    """Where the subscription's NOTIFYs go after a request in its dialog (a refresh or
    an unsubscribe) from ``peer`` (the host checked it is the subscription's address).

    - Reached directly: the same hop, or over TCP or TLS the new connection of that
      same transport (a stream's next connection has a new port; a handshake proved
      its source).
    - Through a route set: its first hop stays, and the request must come from it as
      NOTIFYs reach it: over UDP from the port its Record-Route names (a proxy sends
      from the socket it record-routes) or from the port the subscription was opened
      from (a hop behind a port-translating NAT, or one that record-routes a fixed
      socket: review 137 HB2), over a stream from its address on that transport
      (review 136 K2: any port of the hop's address could end the follow).

    ``SubscriberMovedError`` for anything else: a datagram from another port may be
    forged, and another transport from that address may be anyone behind the same
    NAT (a UDP follower's NOTIFYs would go to a hop's TCP connection, a TLS one's to
    plain TCP: review 134 K2)."""
    hop = subscription.next_hop
    if peer.uri() == hop:
        return hop
    target = parse_uri(hop)
    transport = _transport(hop)
    same_stream = peer.transport == transport != "udp" and _same_address(target.host, peer.ip)
    if subscription.route_set:
        same_socket = peer.transport == transport == "udp" and \
            _same_address(target.host, peer.ip) and \
            peer.port in (_record_routed_port(hop), subscription.source_port)
        if same_socket or same_stream:
            return hop
    elif same_stream:
        return peer.uri()
    raise SubscriberMovedError("a request in the subscription from another port or "
                               "transport than the one its NOTIFYs go to")


def notify_request(subscription: Subscription, cseq: int) -> NotifyRequest:
    """The dialog part of the NOTIFY with CSeq ``cseq``: loose routing when the first
    route has ``lr``, strict routing (RFC 3261 §12.2.1.1) otherwise."""
    sub = subscription
    routes = list(sub.route_set)
    request_uri = sub.remote_target
    if routes and "lr" not in parse_uri(routes[0]).params:
        request_uri = routes.pop(0)
        routes.append(sub.remote_target)
    headers = [("From", f"<{sub.local_uri}>;tag={sub.local_tag}"),
               ("To", f"<{sub.remote_uri}>;tag={sub.remote_tag}"),
               ("Call-ID", sub.call_id), ("CSeq", f"{cseq} NOTIFY"),
               ("Contact", f"<{sub.contact}>")]
    headers += [("Route", f"<{route}>") for route in routes]
    return NotifyRequest(request_uri, sub.next_hop, tuple(headers))


def stream_destination(next_hop: str) -> tuple[str, int] | None:
    """The (host, port) a NOTIFY to ``next_hop`` connects to when it goes over TCP or
    TLS (the host as the URI writes it: an IPv6 address in brackets, its port or the
    transport's default), None over UDP."""
    transport = _transport(next_hop)
    if transport == "udp":
        return None
    uri = parse_uri(next_hop)
    return uri.host, uri.port or (5061 if transport == "tls" else 5060)


def own_connection(subscription: Subscription, next_hop: str) -> bool:
    """Whether ``next_hop`` is the subscriber's own source over the stream it subscribed
    on (a follow reached directly over TCP or TLS): that port is its connection's, not
    one anybody listens on, so a NOTIFY goes there only while the connection is open."""
    return not subscription.route_set and next_hop == subscription.next_hop \
        and stream_destination(next_hop) is not None


def next_hop_for_size(next_hop: str, size: int) -> str:
    """The next hop for a NOTIFY whose request line, headers and body are ``size``
    octets.  Over UDP a request above 1300 octets goes over a congestion-controlled
    transport (RFC 3261 §18.1.1): the same address and port over TCP.  It also keeps
    a forged source from being sent a large certificate: TCP needs its handshake."""
    uri = parse_uri(next_hop)
    transport = (uri.params.get("transport") or "udp").lower()
    if uri.scheme == "sips" or transport != "udp" or size + _SENDER_ADDS <= UDP_LIMIT:
        return next_hop
    base, _, params = next_hop.partition(";")
    kept = [p for p in params.split(";") if p and p.split("=", 1)[0].lower() != "transport"]
    return ";".join([base, *kept, "transport=tcp"])
