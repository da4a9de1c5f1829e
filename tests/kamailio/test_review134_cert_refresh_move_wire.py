"""Review 134 (attacker's review of 9952d84), area 3: the certificate service's refresh
over a new connection (review 133 K1's fix: ``notifier.refresh_dialog(peer=)``,
``cert_route.route_resubscribe``, ``cert_table.refreshed``).  Real Kamailio on loopback
with ``[certs] notify_interval = 2`` (review 133's module fixture ``home``); carol
follows bob's certificate over **UDP** from a loopback address of her own
(``CertClient``, answering each NOTIFY 200); "mallory" is a second ``CertClient``.  On
loopback "from carol's address" stands for another user behind the same NAT as carol
(or her NAT box itself) for TCP, and for a forged source address for UDP.  The
dialog's ids are what any hop on carol's UDP path reads from her SUBSCRIBE.

Hole K2: a TCP refresh from a UDP follower's address takes her NOTIFYs
-----------------------------------------------------------------------

- Attacker: an **untrusted hop** that read carol's UDP SUBSCRIBE (Call-ID, tags, CSeq),
  with a TCP connection from carol's address: another user behind carol's NAT, the NAT
  box, or a hop that can finish a TCP handshake for that address (it is on the path).
- Messages: carol's follow over UDP (``Expires: 600``), confirmed; then mallory's
  in-dialog refresh (same ids, CSeq + 1, ``Expires: 600``, her own Contact) over a new
  TCP connection from carol's address; then bob PUBLISHes a new certificate.
- Observed: the refresh is ``200``; ``next_hop`` moves from
  ``sip:127.0.133.3:<carol's UDP port>`` to ``sip:127.0.133.3:<mallory's port>;transport=tcp``;
  mallory gets the refresh's NOTIFY **and the change's NOTIFY** (475 octets each, bob's
  certificates); **carol gets 0** NOTIFYs.  Carol's own next refresh (UDP, her port) is
  then ``481`` (the row, now mallory's, stays until its expiry): until that refresh
  (her renewal; read, not run: the e2m-phone asks ``Expires: 3600`` and renews at 80 %
  of it, ``certservice_client._RENEW_FRACTION``, so up to 48 minutes) she is not told
  that bob's certificate changed or went, and mallory can keep the row alive with
  further refreshes.  Before stop 43 a TCP refresh
  from the same address left ``next_hop`` where it was.
- Code at fault: ``e2m_plugins/notifier.py:191-195`` moves the hop of any directly
  reached subscription to a TCP/TLS peer at the same IP address, including a UDP one
  (the handshake proves the address, not the subscriber: carol's UDP port is what her
  confirmed NOTIFY proved) and, by the same lines (read, not run), a TLS one to plain
  TCP.
- Fix: move the hop only between connections of the subscription's own transport (TCP
  to TCP, TLS to TLS); a refresh over another transport than the hop's, a UDP
  subscription's included, is 481 (subscribe anew), as a UDP refresh of a TCP one is.
- Test: ``test_a_tcp_refresh_from_a_udp_followers_address_does_not_take_her_notifies``
  (strict xfail).

Hole K3: an unsubscribe datagram from another port ends the follow
-------------------------------------------------------------------

- Attacker: an **off-path sender** that once read the dialog's ids (or a hop), sending
  one UDP datagram with carol's source address and any other port.
- Messages: carol's confirmed UDP follow; one in-dialog SUBSCRIBE with ``Expires: 0``
  (CSeq + 1) from carol's address at another port.
- Observed: ``200``; the subscription's row goes (1 -> 0); carol gets a final NOTIFY
  ``Subscription-State: terminated;reason=timeout``.  The same datagram with
  ``Expires: 600`` is ``481`` and the row stays (stop 43's rule: "a datagram from
  another port ... may be forged", "a forged datagram must not end it").  What the
  e2m-phone then does was read, not run: ``CertServiceClient`` marks the follow
  ``ended``, forgets it at its next tick, and ``_follow_peers_in_use`` follows bob
  again at that tick if he is a peer in use: for the e2m-phone the gap is likely a
  tick and a round trip, and the attacker needs the new dialog's ids to do it again.
  Low impact, but against the rule stop 43 states.  (It predates stop 43, which added
  the rule for the refresh only.)
- Code at fault: ``kamailio_app/cert_route.py:284-289``: the port and transport check
  lives in ``notifier.refresh_dialog``, called only when ``answer.expires``; an
  unsubscribe goes to ``subscriptions.remove`` after the address-only site check
  (``:271``).
- Fix: check the refresh's source against the hop before either branch (a datagram
  from another port or transport than the hop's: 481, row kept), for ``Expires: 0``
  too.
- Test: ``test_an_unsubscribe_datagram_from_another_port_does_not_end_the_follow``
  (strict xfail).

Controls (unmarked, pass):

- ``test_control_the_same_refresh_from_another_address_is_403``: K2's refresh over TCP
  from another address: 403, hop unchanged, carol gets the change's NOTIFY, mallory
  none.
- ``test_control_a_refresh_datagram_from_another_port_is_481``: K3's datagram with
  ``Expires: 600``: 481, row unchanged.
- ``test_control_an_unsubscribe_from_another_address_is_403``: K3's unsubscribe from
  another address: 403, row unchanged, no NOTIFY to carol.

Fixed (stop 43), K2 and K3: ``notifier.in_dialog_hop`` decides where a subscription's
NOTIFYs go after any request in its dialog, a refresh (``refresh_dialog``) or an
unsubscribe (``cert_route.route_resubscribe``): the same hop, or a new connection of
the same stream transport (TCP to TCP, TLS to TLS) from the subscription's address;
anything else (another UDP port, another transport, UDP to TCP as in K2, TLS down to
TCP) is 481 and the row stays.  On the code before (stop 43's first K1 fix), both hole
tests failed; now both pass, and ``tests/unit/test_notifier.py`` holds each case.
"""

from __future__ import annotations

import time

import pytest

from e2m_plugins.testpki import issue_user
from tests.kamailio.test_review133_cert_refresh_wire import (  # noqa: F401 - fixtures
    BOB, INTERVAL, client, der_of, home, made, next_hop, publish, refresh, source)

pytestmark = pytest.mark.kamailio


def follow_over_udp(home, made, pki):
    """bob's certificate published; carol follows it over UDP from her own address and
    answers its first NOTIFY (confirmed)."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    src = source()
    carol = client(home, made, "carol", src=src, transport="udp")
    answer, dialog = carol.subscribe(BOB, 600)
    assert answer is not None and answer.status == 200 and dialog is not None, answer
    assert len(carol.wait_notifies(1)) == 1
    time.sleep(0.3)
    return src, carol, dialog


def got_none(who, before: int) -> bool:
    return len(who.notifies) == before


def _move_attempt(home, made, pki, *, same_address: bool):
    src, carol, dialog = follow_over_udp(home, made, pki)
    [(hop_before, _)] = next_hop(home, dialog.call_id)
    # mallory: the dialog's ids read off carol's UDP SUBSCRIBE (a hop on her path), a
    # TCP connection from carol's address (her NAT's: another user behind it, or the
    # NAT box itself) or from another one
    mallory = client(home, made, "alice", src=src if same_address else None,
                     transport="tcp")
    answer = refresh(mallory, dialog, cseq=carol.subscribes[-1].cseq[0] + 1)
    [(hop_after, _)] = next_hop(home, dialog.call_id)
    mallory.wait_notifies(1, timeout=1.0)       # the refresh's own NOTIFY, if it moved
    at_refresh = len(mallory.notifies)
    before = len(carol.notifies)
    publish(home, made, der_of(issue_user(pki.ca, BOB, "ec")))   # bob's new certificate
    carol.wait_notifies(before + 1, timeout=INTERVAL + 3.0)
    mallory.wait_notifies(at_refresh + 1, timeout=1.0 if got_none(carol, before) else 0.5)
    got_carol = len(carol.notifies) - before
    got_mallory = len(mallory.notifies)
    bodies = [len(m.body or b"") for m in mallory.notifies]
    # carol's own next refresh, over UDP from her port
    again = refresh(carol, dialog, cseq=carol.subscribes[-1].cseq[0] + 5)
    print(f"carol's own refresh afterwards: {again.status if again else None}; rows "
          f"{next_hop(home, dialog.call_id)}")
    print(f"\nrefresh over TCP from {'carol' if same_address else 'another'} address: "
          f"{answer.status if answer else None}; next hop {hop_before} -> {hop_after}; "
          f"NOTIFYs: mallory at the refresh {at_refresh}; after bob's change: carol {got_carol}, "
          f"mallory {got_mallory - at_refresh} (bodies {bodies})")
    return answer, hop_before, hop_after, got_carol, got_mallory


def test_a_tcp_refresh_from_a_udp_followers_address_does_not_take_her_notifies(
        home, made, pki):
    """Secure: a UDP subscription's NOTIFYs keep going to the UDP port they were
    confirmed at (a TCP connection from the same address proves the address, not the
    subscriber): carol hears of bob's new certificate, mallory hears nothing."""
    _, hop_before, hop_after, got_carol, got_mallory = _move_attempt(
        home, made, pki, same_address=True)
    assert got_mallory == 0 and got_carol >= 1 and hop_after == hop_before


def test_control_the_same_refresh_from_another_address_is_403(home, made, pki):
    """Control: mallory's refresh from another address: 403, the hop stays, carol is
    told of bob's new certificate and mallory gets nothing."""
    answer, hop_before, hop_after, got_carol, got_mallory = _move_attempt(
        home, made, pki, same_address=False)
    assert answer is not None and answer.status == 403
    assert hop_after == hop_before and got_carol >= 1 and got_mallory == 0


def _unsubscribe_attempt(home, made, pki, *, same_address: bool):
    """carol follows over UDP; mallory sends the in-dialog unsubscribe (``Expires: 0``)
    as one datagram from carol's address at another port (what an off-path sender who
    once read the ids forges, or a hop sends) or from another address."""
    src, carol, dialog = follow_over_udp(home, made, pki)
    rows_before = next_hop(home, dialog.call_id)
    mallory = client(home, made, "alice", src=src if same_address else None,
                     transport="udp")
    answer = refresh(mallory, dialog, cseq=carol.subscribes[-1].cseq[0] + 1, expires=0)
    rows_after = next_hop(home, dialog.call_id)
    before = len(carol.notifies)
    got = carol.wait_notifies(before + 1, timeout=1.5)[before:]
    states = [n.get("Subscription-State") for n in got]
    print(f"\nunsubscribe from {'carol' if same_address else 'another'} address, port "
          f"{mallory.ua.local_port} (carol's {carol.ua.local_port}): "
          f"{answer.status if answer else None}; rows {rows_before} -> {rows_after}; "
          f"carol then got {states}")
    return answer, rows_before, rows_after


def test_an_unsubscribe_datagram_from_another_port_does_not_end_the_follow(home, made, pki):
    """Secure, as stop 43 says of a refresh (a datagram from another port than the
    subscription's may be forged: 481, the row stays): the same datagram with
    ``Expires: 0`` leaves the subscription in place."""
    _, rows_before, rows_after = _unsubscribe_attempt(home, made, pki, same_address=True)
    assert rows_after == rows_before


def test_control_a_refresh_datagram_from_another_port_is_481(home, made, pki):
    """Control (stop 43's rule): the same datagram with ``Expires: 600`` is 481 and
    the row stays."""
    src, carol, dialog = follow_over_udp(home, made, pki)
    rows_before = next_hop(home, dialog.call_id)
    mallory = client(home, made, "alice", src=src, transport="udp")
    answer = refresh(mallory, dialog, cseq=carol.subscribes[-1].cseq[0] + 1)
    assert answer is not None and answer.status == 481
    assert next_hop(home, dialog.call_id) == rows_before


def test_control_an_unsubscribe_from_another_address_is_403(home, made, pki):
    answer, rows_before, rows_after = _unsubscribe_attempt(home, made, pki,
                                                           same_address=False)
    assert answer is not None and answer.status == 403 and rows_after == rows_before
