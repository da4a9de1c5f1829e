"""The notifier's side of an RFC 6665 dialog (e2m_plugins.notifier): what is kept from a
SUBSCRIBE, where its NOTIFYs go, and the refusals (a route set that leads elsewhere)."""

from __future__ import annotations

import pytest

from e2m_plugins.errors import MalformedError, PolicyError
from e2m_plugins.notifier import (Peer, SubscriberMovedError, in_dialog_hop, notify_request,
                                 open_dialog, refresh_dialog)
from e2m_plugins.sip import make_request

PEER = Peer("192.0.2.7", 40123, "udp")
CONTACT = "sip:198.51.100.1:5070"


def _subscribe(*, contact="<sip:alice@192.0.2.7:40123>", routes=(), from_tag="al1",
               uri="sip:bob@example.com"):
    headers = [("Event", "certificate;id=7")]
    if contact:
        headers.append(("Contact", contact))
    headers += [("Record-Route", r) for r in routes]
    return make_request("SUBSCRIBE", uri, from_uri="sip:alice@example.com",
                        to_uri="sip:bob@example.com", from_tag=from_tag, call_id="c1@x",
                        extra_headers=headers)


def test_the_dialog_of_a_direct_subscriber():
    sub = open_dialog(_subscribe(), local_tag="ours", peer=PEER, contact=CONTACT,
                      event_id="7", expires=100.0)
    assert (sub.call_id, sub.local_tag, sub.remote_tag, sub.event_id) == ("c1@x", "ours", "al1", "7")
    assert (sub.aor, sub.local_uri, sub.remote_uri) == (
        "sip:bob@example.com", "sip:bob@example.com", "sip:alice@example.com")
    assert sub.remote_target == "sip:alice@192.0.2.7:40123"
    assert sub.next_hop == "sip:192.0.2.7:40123"          # where it came from, not the Contact
    assert sub.source == "192.0.2.7" and sub.route_set == ()
    notify = notify_request(sub, 3)
    headers = dict(notify.headers)
    assert notify.request_uri == "sip:alice@192.0.2.7:40123"
    assert headers["From"] == "<sip:bob@example.com>;tag=ours"
    assert headers["To"] == "<sip:alice@example.com>;tag=al1"
    assert headers["CSeq"] == "3 NOTIFY" and headers["Contact"] == f"<{CONTACT}>"
    assert "Route" not in headers


def test_a_tcp_subscriber_is_answered_on_its_transport():
    sub = open_dialog(_subscribe(), local_tag="t", peer=Peer("2001:db8::5", 51000, "tcp"),
                      contact=CONTACT, event_id=None, expires=1.0)
    assert sub.next_hop == "sip:[2001:db8::5]:51000;transport=tcp" and sub.event_id == ""


def test_the_route_set_is_the_record_route_set_in_order():
    routes = ["<sip:192.0.2.7:5070;lr>", "<sip:203.0.113.9;lr>, <sip:203.0.113.10;lr>"]
    sub = open_dialog(_subscribe(routes=routes), local_tag="t", peer=PEER, contact=CONTACT,
                      event_id=None, expires=1.0)
    assert sub.route_set == ("sip:192.0.2.7:5070;lr", "sip:203.0.113.9;lr",
                             "sip:203.0.113.10;lr")
    assert sub.next_hop == "sip:192.0.2.7:5070;lr"
    notify = notify_request(sub, 1)
    assert notify.request_uri == sub.remote_target                     # loose routing
    assert [v for n, v in notify.headers if n == "Route"] == [f"<{r}>" for r in sub.route_set]


def test_a_strict_router_gets_the_request_uri():
    sub = open_dialog(_subscribe(routes=["<sip:192.0.2.7:5070>"]), local_tag="t", peer=PEER,
                      contact=CONTACT, event_id=None, expires=1.0)
    notify = notify_request(sub, 1)
    assert notify.request_uri == "sip:192.0.2.7:5070"
    assert [v for n, v in notify.headers if n == "Route"] == [f"<{sub.remote_target}>"]


@pytest.mark.parametrize("route", ["<sip:203.0.113.66;lr>", "<sip:victim.example.net;lr>"])
def test_a_route_set_that_leads_elsewhere_is_refused(route):
    """A forged Record-Route would aim our NOTIFYs (and their retransmissions) at a
    third party: only the address the SUBSCRIBE came from may be the first hop."""
    with pytest.raises(PolicyError):
        open_dialog(_subscribe(routes=[route]), local_tag="t", peer=PEER, contact=CONTACT,
                    event_id=None, expires=1.0)


@pytest.mark.parametrize("kwargs", [{"contact": None}, {"contact": "<sip:a@h>, <sip:b@h>"},
                                    {"contact": "<mailto:a@h>"}, {"from_tag": ""},
                                    {"routes": ["<sip:192.0.2.7;lr>"] * 17},
                                    {"uri": "sip:example.com"}])
def test_what_a_dialog_cannot_be_made_of(kwargs):
    message = _subscribe(**kwargs)
    if kwargs.get("from_tag") == "":
        message = message.replace("From", "<sip:alice@example.com>")
    with pytest.raises(MalformedError):
        open_dialog(message, local_tag="t", peer=PEER, contact=CONTACT, event_id=None,
                    expires=1.0)


def test_a_refresh_moves_the_target_and_the_expiry():
    sub = open_dialog(_subscribe(), local_tag="t", peer=PEER, contact=CONTACT,
                      event_id=None, expires=1.0)
    moved = refresh_dialog(sub, _subscribe(contact="<sip:alice@192.0.2.7:40999>"), 50.0)
    assert (moved.remote_target, moved.expires) == ("sip:alice@192.0.2.7:40999", 50.0)
    kept = refresh_dialog(sub, _subscribe(contact=None), 60.0)
    assert kept.remote_target == sub.remote_target and kept.next_hop == sub.next_hop


def test_what_a_subscription_may_make_us_keep_is_bounded():
    """Each kept subscription is a row: its dialog state is capped (a SUBSCRIBE is
    otherwise up to 320 KiB), and the Event id must be a token (it is sent back)."""
    long_contact = f"<sip:{'a' * 5000}@192.0.2.7:40123>"
    with pytest.raises(MalformedError, match="characters"):
        open_dialog(_subscribe(contact=long_contact), local_tag="t", peer=PEER,
                    contact=CONTACT, event_id=None, expires=1.0)
    sub = open_dialog(_subscribe(), local_tag="t", peer=PEER, contact=CONTACT,
                      event_id=None, expires=1.0)
    with pytest.raises(MalformedError):
        refresh_dialog(sub, _subscribe(contact=long_contact), 2.0)
    with pytest.raises(MalformedError, match="token"):
        open_dialog(_subscribe(), local_tag="t", peer=PEER, contact=CONTACT,
                    event_id="a b", expires=1.0)


# -- a refresh from another connection (review 133 K1) ------------------------------

TCP_PEER = Peer("192.0.2.7", 40123, "tcp")


def test_a_refresh_over_a_new_tcp_connection_moves_the_next_hop():
    """A TCP client's next connection has a new port: the NOTIFYs follow it (a TLS one
    too), and a refresh over the same connection changes nothing."""
    sub = open_dialog(_subscribe(), local_tag="t", peer=TCP_PEER, contact=CONTACT,
                      event_id=None, expires=1.0)
    assert sub.next_hop == "sip:192.0.2.7:40123;transport=tcp"
    same = refresh_dialog(sub, _subscribe(contact=None), 2.0, TCP_PEER)
    assert same.next_hop == sub.next_hop
    moved = refresh_dialog(sub, _subscribe(contact=None), 2.0, Peer("192.0.2.7", 50999, "tcp"))
    assert moved.next_hop == "sip:192.0.2.7:50999;transport=tcp"
    over_tls = open_dialog(_subscribe(), local_tag="t", peer=Peer("192.0.2.7", 40123, "tls"),
                           contact=CONTACT, event_id=None, expires=1.0)
    tls = refresh_dialog(over_tls, _subscribe(contact=None), 2.0, Peer("192.0.2.7", 50998, "tls"))
    assert tls.next_hop == "sip:192.0.2.7:50998;transport=tls"


@pytest.mark.parametrize("held, peer", [
    ("udp", Peer("192.0.2.7", 40999, "udp")),     # a NAT's new port (or a forged one)
    ("udp", Peer("192.0.2.7", 50999, "tcp")),     # UDP to TCP: anyone behind her NAT (review 134 K2)
    ("tcp", Peer("192.0.2.7", 40123, "udp")),     # TCP to UDP
    ("tcp", Peer("192.0.2.7", 50998, "tls")),     # another transport
    ("tls", Peer("192.0.2.7", 50997, "tcp")),     # TLS down to plain TCP
    ("tcp", Peer("192.0.2.8", 50999, "tcp"))])    # another address
def test_a_refresh_the_notifies_cannot_follow_is_refused(held, peer):
    """A datagram's source may be forged (it would steer NOTIFYs to another port of the
    subscriber's address), another transport from her address may be anyone behind
    her NAT, and another address is not the subscriber's: ``SubscriberMovedError``
    (the host answers 481: subscribe anew), for a refresh and an unsubscribe alike."""
    sub = open_dialog(_subscribe(), local_tag="t", peer=Peer("192.0.2.7", 40123, held),
                      contact=CONTACT, event_id=None, expires=1.0)
    with pytest.raises(SubscriberMovedError):
        refresh_dialog(sub, _subscribe(contact=None), 2.0, peer)
    with pytest.raises(SubscriberMovedError):
        in_dialog_hop(sub, peer)


def test_a_refresh_through_a_route_set_keeps_its_first_hop():
    """Through a proxy in front (Record-Route), the first hop stays the route set's,
    whatever connection the proxy's refresh came over."""
    route = "<sip:192.0.2.7:5060;transport=tcp;lr>"
    sub = open_dialog(_subscribe(routes=(route,)), local_tag="t", peer=TCP_PEER,
                      contact=CONTACT, event_id=None, expires=1.0)
    again = refresh_dialog(sub, _subscribe(contact=None), 2.0, Peer("192.0.2.7", 50999, "tcp"))
    assert again.next_hop == sub.next_hop
