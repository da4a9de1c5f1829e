"""Review 151 (attacker's review of 0a0572e and db42521) on a real Kamailio: hole K1 of
``tests/unit/test_review151_opening_port.py`` (findings, code at fault and fixes are
written there; K2 and HB1 are tested at the table only).  Review 133's module fixture
``home`` (SQLite tables, ``notify_interval`` 2 s).

Hole K1 on the wire: carol subscribes over **TCP** from ``SRC:P`` with the Record-Route
of a UDP hop at her address (``<sip:SRC:H;lr>``, ``H`` a UDP client that gets and
answers the NOTIFYs).  The home takes it (200; ``next_hop`` the hop's UDP socket) and
keeps ``source_port = P``, the port of carol's TCP connection.  mallory binds the
**UDP** port ``P`` on ``SRC`` (a free number there: TCP and UDP ports are separate)
and sends the dialog's ``SUBSCRIBE ... Expires: 0``: observed 200 and the row gone
(carol's follow ended by a third party).  Same datagram from another UDP port of
``SRC``: 481, row kept (control).  Test:
``test_a_udp_unsubscribe_from_the_port_of_a_tcp_opening_is_481`` (strict xfail).

Controls
--------

- ``test_control_a_third_udp_port_is_481`` (above).
- ``test_control_the_hop_ends_the_tcp_opened_follow``: the hop's own unsubscribe from
  its record-routed UDP port is 200 and the row is gone.

Tried and held (reviews 150's and stop 47's tests not repeated)
---------------------------------------------------------------

- Item 1 (db42521, read against ``cert_route.py:468-501`` and the cfg's
  ``tm:local-request``): the note is removed only after the dialog check, so a reply
  with the right branch and another dialog's ids consumes nothing; a reply needs the
  NOTIFY's branch, which only its recipient (or the path) sees, so a stranger cannot
  eat an honest subscriber's note; an answer lost on the way consumes nothing (the
  note goes only when one reaches the core reply route), so the UDP retransmission's
  answer still confirms.  The first answer over a stranger's twin consumes his own
  NOTIFY's note only: one listing per NOTIFY, bounded by fetches (review 150's
  "what stays"; ~100 a second at most, ``max_subscribes_per_second``).  Parallel
  copies over two connections (TCP and TLS listeners) could both pass ``sht_get``
  before the ``sht_rm`` (no lock): a few listings per NOTIFY at most, not run.
- Item 2: a version-2 copy from another port is refused (unit control); IPv6 hops
  follow ``_same_address`` as before; a stream in-dialog request for a routed UDP hop
  is still 481 (unit control); the SQLite upgrade runs inside ``BEGIN IMMEDIATE`` with
  the column list read in that transaction, so workers opening the file together
  upgrade once; PostgreSQL upgrades under the migration lock and re-reads the version
  there (``upgrade_schema``), so two nodes at once do not both ALTER; a file or
  database of a newer version is refused by the new code (an old node's code cannot
  refuse version 2: it inserts by column list, its rows get port 0, which is K2's
  wildcard).  Read, not run against PostgreSQL.

Fixed (stop 47): K1 and HB1, the opening port is kept only for a subscription opened
over UDP (``notifier.open_dialog``; 0 for TCP and TLS, so no datagram matches it and a
stream copy over a new connection is still a copy); K2, a copy renews every field it
repeats but never ``source_port`` (``SubscriptionTable.add``).  The strict xfails failed
(XPASS) on the fix; the controls pass.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.kamailio.test_review133_cert_refresh_wire import (  # noqa: F401 - fixtures
    BOB, client, der_of, home, made, next_hop, publish, refresh, source)

pytestmark = pytest.mark.kamailio


def tcp_opened_follow(home, made, pki):
    """bob published; carol follows him over TCP through a UDP hop at her address
    (confirmed by the hop's answer to the first NOTIFY)."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    src = source()
    hop = client(home, made, "alice", src=src)
    carol = client(home, made, "carol", src=src, transport="tcp")
    route = f"sip:{src}:{hop.ua.local_port};lr"
    answer, dialog = carol.subscribe(BOB, 600, extra=[("Record-Route", f"<{route}>")])
    assert answer is not None and answer.status == 200 and dialog is not None, answer
    assert len(hop.wait_notifies(1)) == 1
    time.sleep(0.3)
    assert next_hop(home, dialog.call_id) == [(route, src)]
    return src, route, hop, carol, dialog


def udp_client_at(home, made, src: str, port: int):
    """A UDP client at ``src`` bound to ``port`` (mallory)."""
    mallory = client(home, made, "alice", src=src)
    mallory.ua.sock.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((src, port))
    sock.settimeout(mallory.ua.timeout)
    mallory.ua.sock, mallory.ua.local_port = sock, port
    return mallory


def test_a_udp_unsubscribe_from_the_port_of_a_tcp_opening_is_481(home, made, pki):
    src, route, _hop, carol, dialog = tcp_opened_follow(home, made, pki)
    mallory = udp_client_at(home, made, src, carol.ua.local_port)
    answer = refresh(mallory, dialog, cseq=carol.subscribes[-1].cseq[0] + 1, expires=0)
    assert answer is not None
    rows = next_hop(home, dialog.call_id)
    assert (answer.status, rows) == (481, [(route, src)])


def test_control_a_third_udp_port_is_481(home, made, pki):
    src, route, _hop, carol, dialog = tcp_opened_follow(home, made, pki)
    mallory = client(home, made, "alice", src=src)
    assert mallory.ua.local_port != carol.ua.local_port
    answer = refresh(mallory, dialog, cseq=carol.subscribes[-1].cseq[0] + 1, expires=0)
    assert answer is not None and answer.status == 481, answer
    assert next_hop(home, dialog.call_id) == [(route, src)]


def test_control_the_hop_ends_the_tcp_opened_follow(home, made, pki):
    _src, _route, hop, carol, dialog = tcp_opened_follow(home, made, pki)
    answer = refresh(hop, dialog, cseq=carol.subscribes[-1].cseq[0] + 1, expires=0)
    assert answer is not None and answer.status == 200, answer
    assert next_hop(home, dialog.call_id) == []
