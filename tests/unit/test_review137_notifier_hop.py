"""Review 137 (attacker's review of 9e484f3), area 3 at the core.  Docstring completed
below.
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

@pytest.mark.xfail(strict=True, reason="review 137 honest break HB2: a routed subscription "
                   "opened from a UDP port its Record-Route does not name is 481 on every "
                   "refresh from that very source")
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


# -- HB3: RFC 5630's spelling of a TLS hop ----------------------------------------------

@pytest.mark.xfail(strict=True, reason="review 137 honest break HB3: a TLS hop that "
                   "record-routes sips:...;transport=tcp (RFC 5630) opens a subscription "
                   "whose every refresh over TLS from it is 481")
def test_a_sips_transport_tcp_hop_refreshes_over_tls():
    route = f"<sips:{HOP}:5061;transport=tcp;lr>"
    sub, again = _opened_then_refreshed(route, Peer(HOP, 40000, "tls"), Peer(HOP, 40002, "tls"))
    assert again is not None and again.next_hop == sub.next_hop


@pytest.mark.parametrize("route", [f"<sips:{HOP}:5061;lr>",
                                   f"<sip:{HOP}:5061;transport=tls;lr>"])
def test_control_a_tls_hop_in_kamailios_spelling_refreshes_over_tls(route):
    sub, again = _opened_then_refreshed(route, Peer(HOP, 40000, "tls"), Peer(HOP, 40002, "tls"))
    assert again is not None and again.next_hop == sub.next_hop

