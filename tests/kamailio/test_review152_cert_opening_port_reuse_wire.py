"""Review 152 (attacker's review of 0a87de2 and db42521) on a real Kamailio: the port a
routed UDP follow was opened from (``Subscription.source_port``, review 137 HB2's fix as
review 151 left it).  Review 133's module fixture ``home`` (SQLite tables,
``notify_interval`` 2 s, ``min_expires`` 2).  Set-up of every test (stop 47's
``routed_from_another_port``): bob publishes; carol subscribes over **UDP** from
``SRC:P`` with the Record-Route of a hop at her address (``<sip:SRC:H;lr>``, ``H`` a
UDP client that gets and answers the NOTIFYs); the home keeps ``source_port = P``.

Hole K1: the opening port is trusted for the follow's whole life, after its holder let it go
----------------------------------------------------------------------------------------------

- Attacker: review 136 K2's: a user behind the same NAT as the hop, or a co-tenant of the
  hop's host, who knows the follow's dialog ids; no spoofing.  The port ``P`` that
  ``in_dialog_hop`` now takes is, in both of review 137 HB2's cases, not the hop's for
  long: behind a port-translating NAT it is a mapping that lives as long as traffic keeps
  it (Linux conntrack: 30 s for a flow that is not a stream, the SUBSCRIBE and its 200;
  RFC 4787 REQ-5: two minutes at least), then the NAT gives that external port to the
  next flow that asks for it (a port-preserving NAT gives it to a co-tenant who binds
  ``P`` inside); a hop that sends each request from a fresh socket frees ``P`` at the end
  of the transaction, and any user of its host may bind it (no privilege above 1023).
  The follow lives ``max_subscribe_expires`` (up to an hour), its refreshes come every
  few minutes at most.
- Messages: carol's socket ``P`` closed (the mapping gone); mallory binds UDP ``SRC:P``
  and sends the dialog's in-dialog ``SUBSCRIBE`` (CSeq + 1, ``Expires: 600``) with
  ``Contact: <sip:mallory@127.0.0.1:5999>`` (a target refresh, RFC 6665 §4.1.2.1).
- Effect observed: ``200 OK``; the row's ``remote_target`` goes from
  ``sip:carol@SRC:P`` to ``sip:mallory@127.0.0.1:5999`` (``next_hop`` stays the hop):
  the refresh's NOTIFY and, after bob publishes a new certificate, its NOTIFY (678
  bytes) both carry Request-URI ``sip:mallory@127.0.0.1:5999`` (the hop forwards them
  there); carol is told nothing until her next refresh (which, for a hop behind a NAT,
  comes from a new mapping: 481, she subscribes anew).  The same datagram from a
  third port of ``SRC``: 481, row unchanged (control).  Before 0a0572e the opening port
  was nobody's: 481.  ``Expires: 0`` from ``P`` after the release (scratch run): 200,
  the row gone, a ``terminated;reason=timeout`` NOTIFY to carol through the hop (so
  that one is not silent: she may subscribe anew; not asserted here).
- Code at fault: ``e2m_plugins/notifier.py:230-232`` (``in_dialog_hop``: a UDP request
  from ``subscription.source_port`` is the hop, for the subscription's whole life, with
  ``refresh_dialog``'s target refresh, ``:193-199``) and
  ``kamailio_app/cert_route.py:298-301``.
- Suggested fix: take from the opening port only what the hop's absence cannot abuse
  silently: a plain refresh (the same Contact) and an unsubscribe (its final NOTIFY goes
  to the record-routed hop, so the subscriber is told); a target refresh from it is 481
  (the subscriber subscribes anew, as before 0a0572e).  Or trust the port only for a
  NAT binding's life after the last request from it (then this test needs a wait of
  that life before mallory's datagram).
- Test: ``test_a_target_refresh_from_a_released_opening_port_does_not_move_the_follow``.

Controls
--------

- ``test_control_a_third_port_cannot_move_the_follow``: the same datagram from another
  UDP port of ``SRC``: 481, ``remote_target`` still carol's.
- ``test_control_the_opener_refreshes_from_its_port``: carol, still holding ``P``, sends
  a refresh with her own Contact: 200 and her target kept (what the fix must keep).

Tried and held: see ``tests/unit/test_review152_opening_port_rules.py``.

Fixed (stop 47): K1 to K3, see ``tests/unit/test_review152_opening_port_rules.py``.
"""

from __future__ import annotations

import socket
import sqlite3
import time

import pytest

from tests.kamailio.test_review133_cert_refresh_wire import (  # noqa: F401 - fixtures
    BOB, client, der_of, home, made, next_hop, publish, source)

pytestmark = pytest.mark.kamailio

MALLORY = "sip:mallory@127.0.0.1:5999"


def routed_udp_follow(home, made, pki):
    """bob published; carol follows him over UDP from her own port through a hop whose
    record-routed UDP socket is another port of her address (confirmed by the hop)."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    src = source()
    hop = client(home, made, "alice", src=src)
    carol = client(home, made, "carol", src=src)
    route = f"sip:{src}:{hop.ua.local_port};lr"
    answer, dialog = carol.subscribe(BOB, 600, extra=[("Record-Route", f"<{route}>")])
    assert answer is not None and answer.status == 200 and dialog is not None, answer
    assert len(hop.wait_notifies(1)) == 1
    time.sleep(0.3)
    assert next_hop(home, dialog.call_id) == [(route, src)]
    return src, route, hop, carol, dialog


def remote_target(home, call_id: str) -> list[str]:
    with sqlite3.connect(home.directory / "certs.sqlite") as conn:
        return [row[0] for row in conn.execute(
            "SELECT remote_target FROM cert_subscriptions WHERE call_id = ?", (call_id,))]


def in_dialog(sender, dialog, cseq: int, contact: str, expires: int = 600):
    """The dialog's in-dialog SUBSCRIBE from ``sender``'s UA with ``contact``."""
    request = sender.ua.build("SUBSCRIBE", dialog.target, to=BOB, call_id=dialog.call_id,
                              from_tag=dialog.from_tag, to_tag=dialog.to_tag, cseq=cseq,
                              headers=[("Event", "certificate"), ("Expires", str(expires)),
                                       ("Contact", contact),
                                       ("Accept", "application/pkix-cert")])
    answer = sender.ua.request(request)
    sender._answer_notifies()
    return answer


def rebound(home, made, src: str, port: int):
    """A UDP client at ``src`` that binds ``port`` once its holder let it go."""
    mallory = client(home, made, "alice", src=src)
    mallory.ua.sock.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((src, port))
    sock.settimeout(mallory.ua.timeout)
    mallory.ua.sock, mallory.ua.local_port = sock, port
    return mallory


def test_a_target_refresh_from_a_released_opening_port_does_not_move_the_follow(
        home, made, pki):
    src, _route, _hop, carol, dialog = routed_udp_follow(home, made, pki)
    carol_target = remote_target(home, dialog.call_id)
    port = carol.ua.local_port
    carol.ua.sock.close()                            # the NAT mapping / the socket gone
    mallory = rebound(home, made, src, port)
    answer = in_dialog(mallory, dialog, carol.subscribes[-1].cseq[0] + 1, f"<{MALLORY}>")
    assert answer is not None
    assert (answer.status, remote_target(home, dialog.call_id)) == (481, carol_target)


def test_control_a_third_port_cannot_move_the_follow(home, made, pki):
    src, _route, _hop, carol, dialog = routed_udp_follow(home, made, pki)
    carol_target = remote_target(home, dialog.call_id)
    mallory = client(home, made, "alice", src=src)
    answer = in_dialog(mallory, dialog, carol.subscribes[-1].cseq[0] + 1, f"<{MALLORY}>")
    assert answer is not None and answer.status == 481, answer
    assert remote_target(home, dialog.call_id) == carol_target


def test_control_the_opener_refreshes_from_its_port(home, made, pki):
    _src, route, hop, carol, dialog = routed_udp_follow(home, made, pki)
    carol_target = remote_target(home, dialog.call_id)
    answer = in_dialog(carol, dialog, carol.subscribes[-1].cseq[0] + 1, carol.ua.contact)
    assert answer is not None and answer.status == 200, answer
    assert remote_target(home, dialog.call_id) == carol_target
    assert len(hop.wait_notifies(2)) == 2                 # the refresh's NOTIFY, to the hop
