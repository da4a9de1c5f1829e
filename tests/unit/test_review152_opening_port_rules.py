"""Review 152 (attacker's review of 0a87de2, review 151's fixes, and db42521): the
copy rule of ``SubscriptionTable.add`` against ``notifier.in_dialog_hop``, at the core
and the SQLite table, no processes, called as ``kamailio_app/cert_route.py`` calls them.
Hole K1 (the opening port outlives its holder) is on the wire:
``tests/kamailio/test_review152_cert_opening_port_reuse_wire.py``; hole K3 (a new Event
id in someone's dialog, answered 481) in ``tests/kamailio/test_review152_cert_event_id_row_wire.py``.

Hole K2: a "copy" ends a routed follow from where its unsubscribe is 481
--------------------------------------------------------------------------

- Attacker: review 151 K2's (and 136 K2's): who knows a routed follow's opening SUBSCRIBE
  (dialog ids, URIs, Contact, route set) and sends from the hop's address, any port (a
  NAT co-tenant, a co-tenant of the hop's host); its Via chosen so tm's To tag collides
  (review 142's ``colliding_via``).
- Messages: that SUBSCRIBE, with ``Expires`` set as he likes (``min_expires``, 60 s by
  default; or ``Expires: 0`` when the certificate is held back: the row becomes a FETCH
  kept for ``HOLD`` = 32 s), in two cases:
  (a) a follow whose row has ``source_port`` 0 because version 1 wrote it, or an older
  node of a PostgreSQL cluster writes it after the upgrade (its INSERT names no
  ``source_port``): the copy over **UDP from any port** of the hop's address;
  (b) a follow opened over **TCP** (or TLS) through a hop whose Record-Route names UDP
  (``_next_hop`` allows it; ``source_port`` 0 since review 151): the copy over a **new
  TCP connection** from the hop's address.
- Effect observed: ``add`` takes both as copies (CSeq 1 then 2) and renews ``expires``
  from 1e10 to ``now + 60`` (200 + 60 = 260 here): the follow lapses a minute later
  (final NOTIFY ``terminated;reason=timeout``), a new one must be made.  The very
  peer's in-dialog ``SUBSCRIBE ... Expires: 0`` is ``SubscriberMovedError`` (481, row
  kept): for (a) ``in_dialog_hop`` takes the record-routed port only (review 151's
  "a version 1 row keeps the old rule (the record-routed port only)",
  ``docs/threat-model.md``), for (b) no stream for a UDP hop (review 134 K2).  Review
  143 allowed a copy to set the expiry because "it has to come from the follow's own next
  hop, from where an in-dialog refresh or unsubscribe already may": true of a direct
  follow only.
- Code at fault: ``kamailio_app/cert_table.py:413-414`` (the stored 0 matches any port,
  and a stream copy compares no port: the copy rule is not ``in_dialog_hop``'s) with
  ``:396-398`` (``renew`` sets ``expires`` from the copy).
- Suggested fix: a copy is taken only from a peer ``in_dialog_hop`` takes for the row
  (``cert_route.route_subscribe`` has the peer: check it against the stored
  subscription before ``add``), or a copy never shortens ``expires``.
- Test: ``test_a_copy_from_where_an_unsubscribe_is_481_does_not_set_the_expiry[...]``.

Controls
--------

- ``test_control_the_hop_retransmits_a_version_1_follow``: the copy from the
  record-routed port is a copy (CSeq 2), what a fix must keep.
- ``test_control_a_udp_opening_is_renewed_from_its_own_port_only``: a version-2 UDP
  follow: copy from its opening port taken, from the record-routed port and a third
  port refused (the rule 0a87de2 keeps).
- ``test_control_a_tcp_route_takes_a_copy_over_a_new_connection``: review 151 HB1 stays
  fixed (a TCP Record-Route: the copy over a new connection is a copy, as its refresh is
  taken).

Tried and held
--------------

- A UDP datagram from source port 0 matching a stored 0 (``peer.port in (RR, 0)``):
  Kamailio 5.6.3 drops it before any script (``udp_server.c``, "dropping 0 port
  packet"; read).  TCP/TLS openings store 0 and no datagram from their connection's
  port is the hop (review 151 K1 fixed; its unit and wire tests pass).
- A UDP copy of a TCP-opened follow: our Contact differs (``;transport=tcp``), so it is
  no copy (403).  A TCP copy of a UDP-opened follow: stored port P not in (0, 0): 403.
- ``ON CONFLICT`` never writes ``source_port`` (review 151 K2 holds: after a copy of a
  version-1 row from 41000, 41000 is not the hop).  A new Event id in a dialog from the
  same address but another port is a new row of its own with that port; the other row's
  port rule is per row (read: ``route_resubscribe`` reads the row by Event id).
- NAT rebinding of an honest UDP hop: its refresh from the new mapping is 481 as before
  0a0572e (no worse); a retransmission of its opening SUBSCRIBE from the new mapping is
  now 403 where it was a copy, but tm absorbs retransmissions while the transaction
  lives (matched by branch, whatever their port), so only a rebinding between its end
  (5 s after the 200) and Timer F (32 s) with the 200 lost meets it: not reported.
- IPv6 hops: ``_same_address`` and the site check as before (read); the upgrade paths
  (SQLite in ``BEGIN IMMEDIATE``, PostgreSQL under the migration lock) as review 151 read.
- db42521: an answer to a TCP NOTIFY sent over UDP (its branch known to the subscriber)
  now consumes the note, and the later TCP answer no longer closes the service's
  connection: the answerer's own place only (held 4 s), nothing gained over not
  answering (read).

Fixed (stop 47): K1, a target refresh (a new Contact) taken only because it came from
the port a routed UDP subscription was opened from is 481 (``notifier.refresh_dialog``):
whoever holds that port now may still end the follow (the subscriber is told
``terminated``), as the hop's record-routed socket could, but not move its NOTIFYs.
K2 and K3, an initial SUBSCRIBE naming a dialog we hold (a copy, or a new Event id in
it) is taken only from where that dialog's in-dialog requests may come
(``SubscriptionTable.add(..., opened_by=peer)`` with ``notifier.may_act_in``), else 403.
The hole tests failed on the code before and pass now; K3's test took the forged
SUBSCRIBE's 200 as given, and now accepts its 403 too (the secure outcome checked is
unchanged: carol's row stays and she is told of the change); the unit controls pass
the opening peer to ``add``.
"""

from __future__ import annotations

import sqlite3

import pytest

from e2m_plugins.notifier import Peer, SubscriberMovedError, in_dialog_hop, open_dialog
from e2m_plugins.sip import make_request
from kamailio_app.cert_table import (CertDatabase, SubscriptionLimits, SubscriptionTable,
                                     SubscriptionTaken)
from tests.unit.test_cert_schema_upgrade import version_1_file

HOP = "192.0.2.152"
BOB = "sip:bob@example.com"
ROUTE = f"sip:{HOP}:5060;lr"


def opened(peer: Peer, route: str = ROUTE, expires: float = 1e10):
    """carol's follow of bob through ``route``, opened by a SUBSCRIBE from ``peer``
    (``contact``: our Contact at the socket of ``peer``'s transport, as cert_route's)."""
    request = make_request("SUBSCRIBE", BOB, from_uri="sip:carol@example.com", to_uri=BOB,
                           call_id="c152", from_tag="f152",
                           extra_headers=[("Event", "certificate"),
                                          ("Contact", "<sip:carol@198.51.100.9:5062>"),
                                          ("Record-Route", f"<{route}>")])
    ours = "sip:198.51.100.1:5060" + ("" if peer.transport == "udp"
                                      else f";transport={peer.transport}")
    return open_dialog(request, local_tag="l152", peer=peer, contact=ours,
                       event_id=None, expires=expires)


def taken(sub, peer: Peer) -> bool:
    try:
        in_dialog_hop(sub, peer)
    except SubscriberMovedError:
        return False
    return True


def version_1_table(tmp_path, sub):
    """The table of a proxy upgraded from version 1, holding ``sub`` as version 1 (or
    an older node) wrote it: no port."""
    path = tmp_path / "certs.sqlite"
    version_1_file(path)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO cert_subscriptions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                 "?, 1, 0, 0)", SubscriptionTable._values(sub)[:13])
    conn.commit()
    conn.close()
    return SubscriptionTable(CertDatabase(path))


def case_version_1(tmp_path):
    honest = opened(Peer(HOP, 5060, "udp"))
    table = version_1_table(tmp_path, honest)
    return table, Peer(HOP, 41000, "udp")


def case_tcp_opening(tmp_path):
    table = SubscriptionTable(CertDatabase(tmp_path / "certs.sqlite"))
    assert table.add(opened(Peer(HOP, 45678, "tcp")), SubscriptionLimits(), 100.0,
                      opened_by=Peer(HOP, 45678, "tcp")) == 1
    return table, Peer(HOP, 45999, "tcp")


@pytest.mark.parametrize("case", [case_version_1, case_tcp_opening],
                         ids=["version-1-row-udp", "tcp-opening-udp-route"])
def test_a_copy_from_where_an_unsubscribe_is_481_does_not_set_the_expiry(tmp_path, case):
    table, forger = case(tmp_path)
    before = table.get("c152", "l152", "f152", "")
    assert before is not None and before.expires == 1e10
    assert not taken(before, forger)                     # his unsubscribe: 481
    try:
        table.add(opened(forger, expires=200.0 + 60), SubscriptionLimits(), 200.0,
                      opened_by=forger)
    except SubscriptionTaken:
        pass                                             # refused: secure
    after = table.get("c152", "l152", "f152", "")
    assert after is not None and after.expires == 1e10, after.expires


def test_control_the_hop_retransmits_a_version_1_follow(tmp_path):
    table, _forger = case_version_1(tmp_path)
    assert table.add(opened(Peer(HOP, 5060, "udp")), SubscriptionLimits(), 200.0,
                      opened_by=Peer(HOP, 5060, "udp")) == 2


def test_control_a_udp_opening_is_renewed_from_its_own_port_only(tmp_path):
    table = SubscriptionTable(CertDatabase(tmp_path / "certs.sqlite"))
    assert table.add(opened(Peer(HOP, 40000, "udp")), SubscriptionLimits(), 100.0,
                      opened_by=Peer(HOP, 40000, "udp")) == 1
    assert table.add(opened(Peer(HOP, 40000, "udp")), SubscriptionLimits(), 101.0,
                      opened_by=Peer(HOP, 40000, "udp")) == 2
    # (stop 47) from the hop's socket: not a copy (another port); from a third port:
    # not where the dialog's requests may come from
    for port, why in ((5060, "not a copy"), (41000, "another port")):
        with pytest.raises(SubscriptionTaken, match=why):
            table.add(opened(Peer(HOP, port, "udp")), SubscriptionLimits(), 102.0,
                      opened_by=Peer(HOP, port, "udp"))
    kept = table.get("c152", "l152", "f152", "")
    assert kept is not None and kept.source_port == 40000


def test_control_a_tcp_route_takes_a_copy_over_a_new_connection(tmp_path):
    table = SubscriptionTable(CertDatabase(tmp_path / "certs.sqlite"))
    route = f"sip:{HOP}:5070;transport=tcp;lr"
    first = opened(Peer(HOP, 45678, "tcp"), route)
    assert table.add(first, SubscriptionLimits(), 100.0) == 1
    assert taken(first, Peer(HOP, 45679, "tcp"))
    assert table.add(opened(Peer(HOP, 45679, "tcp"), route), SubscriptionLimits(), 101.0,
                      opened_by=Peer(HOP, 45679, "tcp")) == 2
