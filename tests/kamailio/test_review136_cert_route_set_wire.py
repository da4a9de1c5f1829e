"""Review 136 (attacker's review of e01bb86), area 3, hole K2: a subscription with a
route set is ended by an unsubscribe from any port or transport of its first hop's
address.  Real Kamailio with review 133's module fixture ``home`` (``[certs]
notify_interval = 2``); carol follows bob's certificate over UDP from a loopback address
of her own, her SUBSCRIBE carrying the Record-Route a hop at that address adds
(``<sip:ADDRESS:PORT;lr>``, the port she sends from: what the visited proxy of
``make demo`` adds, with the hop and carol on one address to keep the set-up small);
"mallory" is a second ``CertClient`` at carol's address.

Hole K2
-------

- Attacker: an **off-path sender** who once read the subscription's ids (review 134
  K3's attacker), sending one UDP datagram with the first hop's source address and any
  other port; over TCP, anyone who can connect from that address (behind the same NAT,
  on the hop's host).  The same on IPv6 from any address of the hop's /56 (read, not
  run: the host's only check is ``site_of``).
- Messages: carol's follow over UDP with ``Record-Route: <sip:SRC:PORT;lr>`` (200, her
  first NOTIFY answered: confirmed); then one in-dialog SUBSCRIBE with ``Expires: 0``,
  CSeq + 1, from SRC at another port, over UDP or over a new TCP connection.
- Observed: ``200`` both ways; the row goes (``[('sip:127.0.133.3:46012;lr',
  '127.0.133.3')] -> []``) and carol gets a final NOTIFY ``Subscription-State:
  terminated;reason=timeout``: she is no longer told when bob's certificate changes.
  The same datagram on a subscription without a route set (control) is ``481`` and the
  row stays: review 134 K3's fix, whose threat-model row names as the residual "a
  spoofed datagram from the very port the NOTIFYs go to"; with a route set it is any
  port and any transport of the hop's address.
- Code at fault: ``e2m_plugins/notifier.py:203`` (``in_dialog_hop``: a subscription
  with a route set keeps its hop whoever sent the request; the port and transport
  rule below it is skipped) with ``kamailio_app/cert_route.py:271`` (the only other
  check, ``site_of``: the IPv4 address, or an IPv6 /56) and ``:291`` (the unsubscribe
  path relies on ``in_dialog_hop``).
- Suggested fix: hold a routed subscription's in-dialog requests to the source its
  SUBSCRIBE came from as ``in_dialog_hop`` holds a direct one's to its hop: over UDP
  the same address and port, over TCP/TLS the same address and transport (a new
  connection), else 481 and the row stays (for IPv6 the address, not the /56).
- Test: ``test_an_unsubscribe_from_another_port_does_not_end_a_routed_follow[udp|tcp]``
  (strict xfail).

Controls (unmarked, pass): ``test_control_without_a_route_set_the_same_datagram_is_481``
(review 134 K3's rule live: 481, row kept); ``test_control_carol_ends_her_routed_follow``
(the honest unsubscribe from her own port: 200, row gone);
``test_control_a_routed_unsubscribe_from_another_address_is_403`` (403, row kept).

Read, not run: the refresh variant (``Expires: 600`` from another port) leaves a routed
subscription's hop where it was (``in_dialog_hop`` returns it: NOTIFYs still go to the
route), so it only keeps the row alive.  Not tried: a front or cluster (the front does
not record-route, so a node sees the front as the source: a direct subscription to the
front's port), a TLS peer with another
certificate (``in_dialog_hop`` compares address and transport only, as review 134
accepted for TCP).

Areas 4 and 5 (not filed).  Area 4, run at the unit level (``late_2xx.LateAnswers.answer``
on a 2xx whose From is ``"Carol" <sip:carol@example.com>;tag=ours`` while the phone's tag
is ``OURS``): the ACK and the BYE carry that From, URI and display name, and the tag as
the 2xx wrote it (matched without case), not "the INVITE's From" that
``pjsua_hooks/late_2xx.py``'s docstring (lines 12-13) describes; the forger of a late 2xx
already picks their Request-URI and route (the documented bound), and no further effect
of the From was found (a bodiless ACK is relayed unread; the BYE is challenged under
``[auth]``).  The bounds read hold per INVITE (6 To tags, 16 ACKs each, matched by the
exact Call-ID, CSeq and branch); not run: whether evicting entries past ``MAX_LATE``
(32, which takes six failed INVITEs within 32 s) lets a copy of an evicted 2xx draw a
second BYE.  Area 5, read only: a request over the UDP phone's TCP listener passes
``_through_home`` from any port of the proxy's address (``ProxySource.matches(tcp=True)``)
and is refused 403 from any other address; a response over it must come from the
proxy's own address and port (``_answer_from_home`` matches without ``tcp``), so a TCP
connection from another port cannot answer; review 134 K4 (the churn) is open.

Fixed (stop 44), K2: ``notifier.in_dialog_hop`` holds a routed subscription's requests
to its first hop as NOTIFYs reach it: over UDP from the address and port its
Record-Route names, over TCP or TLS from that address on that transport; anything
else is 481 and the row stays.  Both hole tests failed on the code before (200, row
gone) and pass now; the controls still pass.
"""

from __future__ import annotations

import time

import pytest

from tests.kamailio.test_review133_cert_refresh_wire import (  # noqa: F401 - fixtures
    BOB, client, der_of, home, made, next_hop, publish, refresh, source)

pytestmark = pytest.mark.kamailio


def follow_through_a_hop(home, made, pki, *, route_set: bool = True):
    """bob's certificate published; carol follows it over UDP, her SUBSCRIBE carrying
    the Record-Route a hop at her address would add (``<sip:ADDRESS:PORT;lr>``, the
    port she sends from): a subscription with a route set.  Confirmed."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    src = source()
    carol = client(home, made, "carol", src=src, transport="udp")
    extra = [("Record-Route", f"<sip:{src}:{carol.ua.local_port};lr>")] if route_set else []
    answer, dialog = carol.subscribe(BOB, 600, extra=extra)
    assert answer is not None and answer.status == 200 and dialog is not None, answer
    assert len(carol.wait_notifies(1)) == 1
    time.sleep(0.3)
    return src, carol, dialog


def _unsubscribe(home, made, pki, *, route_set: bool, same_address: bool = True,
                 expires: int = 0, transport: str = "udp"):
    src, carol, dialog = follow_through_a_hop(home, made, pki, route_set=route_set)
    rows_before = next_hop(home, dialog.call_id)
    mallory = client(home, made, "alice", src=src if same_address else None,
                     transport=transport)
    answer = refresh(mallory, dialog, cseq=carol.subscribes[-1].cseq[0] + 1, expires=expires)
    rows_after = next_hop(home, dialog.call_id)
    before = len(carol.notifies)
    got = carol.wait_notifies(before + 1, timeout=1.5)[before:]
    states = [n.get("Subscription-State") for n in got]
    print(f"\nroute set {route_set}: Expires {expires} over {transport} from "
          f"{'carol' if same_address else 'another'} address, port {mallory.ua.local_port} "
          f"(carol's {carol.ua.local_port}): {answer.status if answer else None}; rows "
          f"{rows_before} -> {rows_after}; carol then got {states}")
    return answer, rows_before, rows_after


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_an_unsubscribe_from_another_port_does_not_end_a_routed_follow(
        home, made, pki, transport):
    """Secure, as review 134 K3's rule says of a direct subscription: a request from
    another port (or transport) than the subscription's own leaves the row in place."""
    answer, rows_before, rows_after = _unsubscribe(home, made, pki, route_set=True,
                                                   transport=transport)
    assert rows_after == rows_before, (answer.status if answer else None, rows_after)


def test_control_without_a_route_set_the_same_datagram_is_481(home, made, pki):
    answer, rows_before, rows_after = _unsubscribe(home, made, pki, route_set=False)
    assert answer is not None and answer.status == 481 and rows_after == rows_before


def test_control_carol_ends_her_routed_follow(home, made, pki):
    """The honest unsubscribe, from the port her SUBSCRIBE came from: 200, the row goes."""
    src, carol, dialog = follow_through_a_hop(home, made, pki)
    answer = refresh(carol, dialog, cseq=carol.subscribes[-1].cseq[0] + 1, expires=0)
    assert answer is not None and answer.status == 200, answer
    assert next_hop(home, dialog.call_id) == []


def test_control_a_routed_unsubscribe_from_another_address_is_403(home, made, pki):
    answer, rows_before, rows_after = _unsubscribe(home, made, pki, route_set=True,
                                                   same_address=False)
    assert answer is not None and answer.status == 403 and rows_after == rows_before
