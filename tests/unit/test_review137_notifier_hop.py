"""Review 137 (attacker's review of 9e484f3), area 3 at the core: ``notifier.in_dialog_hop``
after review 136 K2 (a routed subscription's in-dialog requests held to its first hop:
over UDP from the port its Record-Route names, over a stream from its address on that
transport).  ``open_dialog`` / ``refresh_dialog`` called as ``kamailio_app/cert_route.py``
calls them (its ``_peer`` is ``$si``, ``$sp``, ``$pr``), no processes.

Honest break HB2: the source that opened a routed subscription cannot refresh it
---------------------------------------------------------------------------------

- Who: **nobody**; a hop whose SUBSCRIBE comes from another UDP port than its
  Record-Route names: one behind a port-translating NAT with ``advertise`` (the RR names
  the advertised port, the datagrams come from the NAT's mapping), or any proxy that
  record-routes a fixed address (``record_route_preset``, ``enable_double_rr = 0`` with
  two sockets).  A Kamailio hop with its defaults double-record-routes when the sockets
  differ and so names its sending port (``rr`` + core ``COND_IF_DIFF_REALMS``, read):
  not affected; no such hop was run.
- Observed: ``open_dialog`` accepts the SUBSCRIBE from ``192.0.2.7:40000`` with
  ``Record-Route: <sip:192.0.2.7:5060;lr>`` (``_next_hop`` compares the address only);
  its refresh (or unsubscribe) from the very same ``192.0.2.7:40000`` is
  ``SubscriberMovedError`` (the host's 481), every time: the subscriber subscribes anew
  at each refresh and cannot end it.  Before 9e484f3 the refresh was taken.
- Code at fault: ``e2m_plugins/notifier.py:214-220`` (the new port rule) against
  ``:115-124`` (``_next_hop``, the address only).
- Suggested fix: one rule at both ends: keep the SUBSCRIBE's own source (address, port,
  transport) in the subscription and hold in-dialog requests to it, or refuse at
  ``open_dialog`` what ``in_dialog_hop`` will refuse.

Honest break HB3: a TLS hop in RFC 5630's spelling
---------------------------------------------------

- Who: **nobody**; a hop reached over TLS that record-routes
  ``<sips:HOST:5061;transport=tcp;lr>`` (RFC 5630 3.1.3: ``transport=tls`` is
  deprecated, TLS over TCP is ``sips`` with ``transport=tcp``).  Kamailio writes
  ``transport=tls`` (control); no such hop was run.
- Observed: ``open_dialog`` accepts its SUBSCRIBE over TLS (``_transport`` reads
  ``tcp`` from the parameter, and only a UDP source is checked against it); every
  refresh over TLS from the same hop is ``SubscriberMovedError`` (481): ``peer.transport``
  ``tls`` != ``tcp``.
- Code at fault: ``e2m_plugins/notifier.py:109-112`` (``_transport``: the parameter
  wins over the ``sips`` scheme) used at ``:214``.
- Suggested fix: read ``sips`` with ``transport=tcp`` as TLS (as tm sends to it).

Tests: ``test_the_source_that_opened_a_routed_subscription_may_refresh_it`` and
``test_a_sips_transport_tcp_hop_refreshes_over_tls`` (strict xfails).  Controls
(unmarked): the hop sending from its record-routed port refreshes; review 136 K2's rule
still refuses another port than the SUBSCRIBE's; a TLS hop in Kamailio's spellings
(``sips:...;lr``, ``sip:...;transport=tls;lr``) refreshes over a new TLS connection.

Tried and held (area 3, run at the core in a scratch script): IPv6 hops
(``sip:[::1]:5080;lr``, ``sip:[::1];lr`` with the default port, ``[0:0::1]`` against
``::1``) refresh; ``transport=UDP`` upper case and a port written ``05080`` refresh;
another port or TCP from the hop's address is 481; a direct (unrouted) TCP subscriber
moves to its new connection, TLS from it is 481; ``transport=sctp`` over UDP is refused
at ``open_dialog``.  A ``maddr`` in the hop's Record-Route
(``sip:HOP:5080;maddr=VICTIM;lr``) is kept in the next hop, but this Kamailio is built
without ``HONOR_MADDR`` (review 99), so ``t_uac_send`` sends to the host: held, by the
build.  Not run: a real hop over TLS or behind NAT.

Fixed (stop 44), HB3: ``notifier._transport`` reads a ``sips`` URI's ``transport=tcp``
as TLS (RFC 5630 §3.1.2); the test failed before and passes now.

Left open (stop 44), HB2: the notifier keeps no record of the port a routed
subscription was opened from (its table stores the source address for the per-source
bound), so a hop whose UDP requests come from another port than its Record-Route
names gets 481 on each refresh, and its subscriber subscribes anew (RFC 6665
§4.1.2.2): the follow keeps working, with one new subscription per refresh.
Refusing such a subscription when it is opened would end the follow instead; storing
the opening port needs a column in both subscription tables.  The strict xfail stays.

Fixed (stop 47), HB2: a subscription keeps the port its opening SUBSCRIBE came from
(``Subscription.source_port``; column ``source_port`` of ``cert_subscriptions``, schema
version 2, added in place to a SQLite file or PostgreSQL tables of version 1 by the
proxy's start or ``e2m-proxy db upgrade``), and a routed UDP subscription's refresh may
come from that port as well as from the one its Record-Route names.  The strict xfail
failed (XPASS) on the fix; a datagram from a third port of the hop's address is still
481 (control).  A row made before the upgrade has port 0: such a subscription's hop
keeps the old rule until it subscribes anew.
"""

from __future__ import annotations

import pytest

from e2m_plugins.errors import PolicyError
from e2m_plugins.notifier import Peer, open_dialog, refresh_dialog
from e2m_plugins.sip import make_request

CONTACT = "sip:198.51.100.1:5070"
HOP = "192.0.2.7"


def _subscribe(routes=(), contact="<sip:alice@203.0.113.5:5060>"):
    headers = [("Event", "certificate")]
    if contact:
        headers.append(("Contact", contact))
    headers += [("Record-Route", r) for r in routes]
    return make_request("SUBSCRIBE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                        to_uri="sip:bob@example.com", from_tag="al1", call_id="c137@x",
                        extra_headers=headers)


def _opened_then_refreshed(route: str, first: Peer, again: Peer):
    """The subscription opened by ``first`` through ``route``, then its refresh from
    ``again`` (None: refused, ``SubscriberMovedError``, the host's 481)."""
    sub = open_dialog(_subscribe((route,)), local_tag="t", peer=first, contact=CONTACT,
                      event_id=None, expires=1.0)
    try:
        return sub, refresh_dialog(sub, _subscribe(contact=None), 2.0, again)
    except PolicyError:
        return sub, None


# -- HB2: the hop's own source, accepted for the SUBSCRIBE, refused for its refresh ---

def test_the_source_that_opened_a_routed_subscription_may_refresh_it():
    source = Peer(HOP, 40000, "udp")        # the hop sends from 40000, record-routes 5060
    sub, again = _opened_then_refreshed(f"<sip:{HOP}:5060;lr>", source, source)
    assert again is not None and again.next_hop == sub.next_hop


def test_control_the_hop_sending_from_its_record_routed_port_refreshes():
    source = Peer(HOP, 5060, "udp")
    sub, again = _opened_then_refreshed(f"<sip:{HOP}:5060;lr>", source, source)
    assert again is not None and again.next_hop == sub.next_hop


def test_control_k2_another_port_than_the_subscribes_is_still_refused():
    sub, again = _opened_then_refreshed(f"<sip:{HOP}:5060;lr>", Peer(HOP, 5060, "udp"),
                                        Peer(HOP, 40001, "udp"))
    assert again is None


def test_control_hb2_a_third_port_of_the_hops_address_is_refused():
    """(stop 47) opened from 40000, record-routing 5060: a datagram from 40001 of the
    hop's address is neither, and may be forged"""
    sub, again = _opened_then_refreshed(f"<sip:{HOP}:5060;lr>", Peer(HOP, 40000, "udp"),
                                        Peer(HOP, 40001, "udp"))
    assert sub.source_port == 40000 and again is None


# -- HB3: RFC 5630's spelling of a TLS hop ----------------------------------------------

def test_a_sips_transport_tcp_hop_refreshes_over_tls():
    route = f"<sips:{HOP}:5061;transport=tcp;lr>"
    sub, again = _opened_then_refreshed(route, Peer(HOP, 40000, "tls"), Peer(HOP, 40002, "tls"))
    assert again is not None and again.next_hop == sub.next_hop


@pytest.mark.parametrize("route", [f"<sips:{HOP}:5061;lr>",
                                   f"<sip:{HOP}:5061;transport=tls;lr>"])
def test_control_a_tls_hop_in_kamailios_spelling_refreshes_over_tls(route):
    sub, again = _opened_then_refreshed(route, Peer(HOP, 40000, "tls"), Peer(HOP, 40002, "tls"))
    assert again is not None and again.next_hop == sub.next_hop

