"""Review 151 (attacker's review of 0a0572e, review 137 HB2's fix): the port a routed
subscription was opened from (``Subscription.source_port``, column ``source_port``,
schema version 2 of the certs component), at the core and the SQLite table, no
processes.  ``open_dialog`` / ``in_dialog_hop`` / ``SubscriptionTable.add`` called as
``kamailio_app/cert_route.py`` calls them.  The wire form of K1 is
``tests/kamailio/test_review151_cert_opening_port_wire.py``.

Hole K1: a routed follow opened over TCP or TLS is ended by a UDP datagram from its connection's port
----------------------------------------------------------------------------------------------------

- Attacker: anyone who can send UDP from the hop's address (a co-tenant of the hop's
  host, or a user behind the same NAT: review 136 K2's attacker, who knows the dialog's
  ids) and can bind the UDP port numbered as the hop's TCP connection to the proxy.
  TCP and UDP ports are separate spaces: the hop's TCP connection does not reserve the
  UDP port of that number (on the hop's host ``/proc/net/tcp`` shows it to every user).
- Messages: a hop sends the SUBSCRIBE over TCP (or TLS) from ``H:45678`` with a
  Record-Route naming UDP (``<sip:H:5060;lr>``: allowed, ``notifier._next_hop`` refuses
  only a UDP SUBSCRIBE asking for a stream); the attacker then sends the in-dialog
  ``SUBSCRIBE`` with ``Expires: 0`` (or a refresh moving the Contact) over **UDP** from
  ``H:45678``.
- Effect observed: ``open_dialog`` keeps ``source_port = 45678`` whatever the transport;
  ``in_dialog_hop`` takes a UDP request from ``H:45678`` (the hop, not
  ``SubscriberMovedError``); on the wire (real Kamailio) the forged unsubscribe is 200
  and the row is gone, a third UDP port of the address is 481.  Before 0a0572e only
  ``H:5060`` was taken.
- Code at fault: ``e2m_plugins/notifier.py:167`` (``source_port=peer.port`` for any
  transport) with ``:226-229`` (``same_socket`` compares a UDP peer's port with it).
- Suggested fix: keep the opening port only when the SUBSCRIBE came over UDP (store 0,
  or the opening transport with it), and compare it only with UDP requests of a
  subscription opened over UDP.
- Test: ``test_a_udp_datagram_from_the_port_of_a_tcp_opening_is_not_the_hop``.

Hole K2: a "copy" of a version-1 follow from another port takes over its dialog
--------------------------------------------------------------------------------

- Attacker: review 142 K1's: who knows a routed follow's dialog ids and sends
  from the hop's address (any port: a NAT co-tenant), during the life of a follow made
  before the upgrade (rows of version 1 keep ``source_port`` 0; a follow lasts up to
  ``max_subscribe_expires``; and a node of the old version in a rolling upgrade keeps
  writing 0).
- Messages: the initial SUBSCRIBE of the follow, byte for byte (its Via chosen to make
  tm's To tag collide, review 142), from ``H:41000`` over UDP.
- Effect observed: ``SubscriptionTable.add`` takes it as a copy (0 "matches any port")
  and its ``ON CONFLICT ... DO UPDATE`` writes ``source_port = 41000``: from then on
  ``in_dialog_hop`` takes the attacker's unsubscribe or Contact-moving refresh from
  ``H:41000`` (before the copy: ``SubscriberMovedError``) for the rest of the follow's
  life.  Before 0a0572e a copy from another port moved nothing
  (no port was kept and ``in_dialog_hop`` took the Record-Route's port alone).
- Code at fault: ``kamailio_app/cert_table.py:410-411`` (the wildcard 0) with ``:395``
  (``renew`` includes ``source_port``).
- Suggested fix: a copy never writes ``source_port`` (``renew`` of the columns up to
  ``expires``; an UPDATE only sets it where it was 0 and the peer is the Record-Route's
  port), or a copy of a port-0 row is taken only from the Record-Route's port.
- Test: ``test_a_copy_of_a_version_1_follow_does_not_give_its_dialog_to_another_port``.

Honest break HB1: a routed TCP or TLS follow's retransmission over a new connection is 403
------------------------------------------------------------------------------------------

- Who: nobody; a hop reached over TCP or TLS (stateless, or any hop whose connection to
  the proxy closed after the SUBSCRIBE and before its 200) that relays the subscriber's
  retransmission (same Via, so the same tm To tag) over a new connection: a new
  ephemeral port from the same address.
- Effect observed: ``add`` raises ``SubscriptionTaken`` (the host's 403 "not a copy")
  for the very same SUBSCRIBE from ``H:45679`` after ``H:45678``: the subscriber's
  transaction ends 403 while the row lives on (NOTIFYs to the hop, unconfirmed).  Before
  0a0572e it was renewed (200), and a refresh over a new connection of the same stream
  transport is taken by ``in_dialog_hop`` (review 133 K1's rule: a handshake proved it).
- Code at fault: ``kamailio_app/cert_table.py:410-411`` (the port compared for every
  transport).
- Suggested fix: compare ``source_port`` in the copy rule only for a subscription
  opened over UDP.
- Test: ``test_a_routed_tcp_follow_retransmitted_over_a_new_connection_is_a_copy``.

Controls
--------

- ``test_control_the_hop_port_and_a_udp_opening_port``: a UDP opening port and the
  Record-Route's port are taken; a third UDP port is refused, for a TCP opening too.
- ``test_control_a_version_1_follow_refuses_another_port_before_any_copy``.
- ``test_control_a_copy_of_a_version_2_follow_from_another_port_is_refused``.

Tried and held: see the wire module's docstring.

Fixed (stop 47): K1 and HB1, the opening port is kept only for a subscription opened
over UDP (``notifier.open_dialog``; 0 for TCP and TLS, so no datagram matches it and a
stream copy over a new connection is still a copy); K2, a copy renews every field it
repeats but never ``source_port`` (``SubscriptionTable.add``).  The strict xfails failed
(XPASS) on the fix; the controls pass.
"""

from __future__ import annotations

import sqlite3

import pytest

from e2m_plugins.notifier import Peer, SubscriberMovedError, in_dialog_hop, open_dialog
from e2m_plugins.sip import make_request
from kamailio_app.cert_table import (CertDatabase, SubscriptionLimits, SubscriptionTable,
                                     SubscriptionTaken)
from tests.unit.test_cert_schema_upgrade import version_1_file

HOP = "192.0.2.151"
BOB = "sip:bob@example.com"


def opened(peer: Peer, route: str):
    """carol's follow of bob through ``route``, opened by a SUBSCRIBE from ``peer``."""
    request = make_request("SUBSCRIBE", BOB, from_uri="sip:carol@example.com", to_uri=BOB,
                           call_id="c151", from_tag="f151",
                           extra_headers=[("Event", "certificate"),
                                          ("Contact", "<sip:carol@198.51.100.9:5062>"),
                                          ("Record-Route", f"<{route}>")])
    return open_dialog(request, local_tag="l151", peer=peer,
                       contact="sip:certs@proxy.example.com", event_id=None, expires=1e10)


def taken(sub, peer: Peer) -> bool:
    try:
        in_dialog_hop(sub, peer)
    except SubscriberMovedError:
        return False
    return True


# -- K1 ---------------------------------------------------------------------------------

def test_a_udp_datagram_from_the_port_of_a_tcp_opening_is_not_the_hop():
    for transport in ("tcp", "tls"):
        sub = opened(Peer(HOP, 45678, transport), f"sip:{HOP}:5060;lr")
        assert sub.next_hop == f"sip:{HOP}:5060;lr"
        assert not taken(sub, Peer(HOP, 45678, "udp")), transport


def test_control_the_hop_port_and_a_udp_opening_port():
    route = f"sip:{HOP}:5060;lr"
    udp = opened(Peer(HOP, 40000, "udp"), route)
    assert taken(udp, Peer(HOP, 5060, "udp")) and taken(udp, Peer(HOP, 40000, "udp"))
    assert not taken(udp, Peer(HOP, 40001, "udp"))
    tcp = opened(Peer(HOP, 45678, "tcp"), route)
    assert taken(tcp, Peer(HOP, 5060, "udp"))
    assert not taken(tcp, Peer(HOP, 45679, "udp"))
    assert not taken(tcp, Peer(HOP, 45678, "tcp"))       # a stream for a UDP hop: 481


# -- K2 ---------------------------------------------------------------------------------

def version_1_follow(tmp_path):
    """The table of a proxy upgraded from version 1, holding carol's routed follow as
    version 1 wrote it (no port), confirmed; the follow as the service opened it."""
    route = f"sip:{HOP}:5060;lr"
    sub = opened(Peer(HOP, 5060, "udp"), route)
    path = tmp_path / "certs.sqlite"
    version_1_file(path)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO cert_subscriptions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                 "?, 1, 0, 0)", SubscriptionTable._values(sub)[:13])
    conn.commit()
    conn.close()
    table = SubscriptionTable(CertDatabase(path))           # upgraded here (version 2)
    kept = table.get("c151", "l151", "f151", "")
    assert kept is not None and kept.source_port == 0
    return table, sub, kept


def test_control_a_version_1_follow_refuses_another_port_before_any_copy(tmp_path):
    _table, _sub, kept = version_1_follow(tmp_path)
    assert taken(kept, Peer(HOP, 5060, "udp"))
    assert not taken(kept, Peer(HOP, 41000, "udp"))


def test_a_copy_of_a_version_1_follow_does_not_give_its_dialog_to_another_port(tmp_path):
    table, sub, _kept = version_1_follow(tmp_path)
    forged = opened(Peer(HOP, 41000, "udp"), f"sip:{HOP}:5060;lr")
    try:
        table.add(forged, SubscriptionLimits(), 200.0)
    except SubscriptionTaken:
        pass                                             # refused: secure as well
    after = table.get("c151", "l151", "f151", "")
    assert after is not None
    assert not taken(after, Peer(HOP, 41000, "udp")), after.source_port


def test_control_a_copy_of_a_version_2_follow_from_another_port_is_refused(tmp_path):
    table = SubscriptionTable(CertDatabase(tmp_path / "certs.sqlite"))
    route = f"sip:{HOP}:5060;lr"
    assert table.add(opened(Peer(HOP, 40000, "udp"), route), SubscriptionLimits(), 100.0) == 1
    with pytest.raises(SubscriptionTaken, match="not a copy"):
        table.add(opened(Peer(HOP, 41000, "udp"), route), SubscriptionLimits(), 101.0)
    kept = table.get("c151", "l151", "f151", "")
    assert kept is not None and kept.source_port == 40000


# -- HB1 --------------------------------------------------------------------------------

def test_a_routed_tcp_follow_retransmitted_over_a_new_connection_is_a_copy(tmp_path):
    table = SubscriptionTable(CertDatabase(tmp_path / "certs.sqlite"))
    for transport in ("tcp", "tls"):
        route = f"sip:{HOP}:5070;transport={transport};lr"
        first = opened(Peer(HOP, 45678, transport), route)
        again = opened(Peer(HOP, 45679, transport), route)
        assert first.next_hop == again.next_hop == route
        assert taken(first, Peer(HOP, 45679, transport))     # its refresh would be taken
        table.forget_dialog("c151", "l151", "f151")
        assert table.add(first, SubscriptionLimits(), 100.0) == 1
        assert table.add(again, SubscriptionLimits(), 101.0) == 2, transport
