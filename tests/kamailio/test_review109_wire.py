"""Review 109 (an attacker's review of e180fd3), wire half of hole K1: what the real
Kamailio 5.6.3 does with a callee's 200 whose Record-Route entry of ours names another
of the proxy's own UDP sockets.  The phone's half (it then takes the callee's straight
answer), the hole's full write-up and its fix are in
``tests/pjsua/test_review109_phone.py``.

Set-up: a plain routing proxy (no [auth], no E2M) listening on
``udp:127.0.0.1:P``, ``tcp:127.0.0.1:P`` and a second ``udp:127.0.0.1:P2`` (a
multi-homed or multi-port proxy; in a cluster, each node's DMQ socket is such a second
UDP socket of its own, see ``tests/cluster/test_review109_dmq_loop.py``).  bob (a raw
UAS) registered; alice (``SipUa`` over UDP) INVITEs him through P.  **Insider UA**, the
callee: bob's 200 copies the Record-Route with our entry's port changed to P2, the
token untouched.

Effect (seen on e180fd3, ``test_hole_k1_our_entry_moved_to_our_other_udp_socket_is_relayed_and_routed``):
the 200 reaches alice with ``Record-Route: <sip:127.0.0.1:P2;lr;e2m-rr=..>``; her ACK
and her re-INVITE sent to P2 along that route set are routed to bob (he got INVITE,
ACK, INVITE; the re-INVITE answered 200).  So a UDP phone's in-dialog requests go to
a home port its registrar does not name, which stop 38's phone rule notes as "not
home" (the phone half).  At fault: ``kamailio_app/kemi.py:1244``
(``moved_route_entries``: ``KSR.is_myself(uri)`` accepts any socket of ours, the
token covers neither host nor port).

Controls (pass unmarked): ``test_control_k1_the_untouched_200_leads_alice_to_the_socket_she_called``
(untouched, alice's route set names P, the re-INVITE is routed and answered 200);
``test_control_k1_our_entry_moved_to_a_port_not_ours_is_dropped`` (the same rewrite to
a port where the proxy does not listen: dropped, "not ours: dropped" logged: the filter
is live; only another of our own sockets passes).

Tried and held: see the phone module and ``tests/unit/test_review109.py``.

Fixed (stop 38; tightened after review 111 as ``kemi._faces_the_caller``): ``kemi._names_the_transactions_socket``: an entry of ours that names
an address must name the socket the request came in on (``$T_req($Ri)``/``$Rp``) or
the one the reply did (our two entries when they differ); the moved 200 is dropped
like one moved to a port not ours.  The hole test's first assertion (the 200 reached
alice) was loosened to take the drop as the secure outcome.  It failed on the code
before (checked) and passes.  A stray reply is still held to any socket of ours.
"""

from __future__ import annotations

import re
import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_lab.ports import free_port
from e2m_plugins.sip import SipMessage, make_response

pytestmark = [pytest.mark.kamailio]

_VALUE = re.compile(r"e2m-rr=")


class _Callee:
    """bob's UAS; his 200 to an initial INVITE carries the Record-Route as ``rewrite``
    gives it (top first); 200 to anything else."""

    def __init__(self, rewrite) -> None:
        self.uas = RawUas()
        self.rewrite = rewrite
        self.uas.responder = self.respond

    def respond(self, request: SipMessage) -> SipMessage:
        answer = make_response(request, 200, "OK")
        if request.method != "INVITE" or request.to_tag:
            return answer
        answer = answer.replace("To", f"{request.get('To')};tag=bt109")
        answer = answer.add("Contact", f"<sip:bob@127.0.0.1:{self.uas.port}>")
        answer = answer.remove("Record-Route")
        for route in self.rewrite(list(request.get_all("Record-Route"))):
            answer = answer.add("Record-Route", route)
        return answer

    def close(self) -> None:
        self.uas.close()


@pytest.fixture
def home(proxy_factory):
    port = free_port()
    second = free_port(avoid={port})
    handle = proxy_factory("r109-2udp", e2m=False, port=port, extra={"kamailio": {"listen": [
        f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", f"udp:127.0.0.1:{second}"]}})
    handle.second = second
    return handle


def _moved_to(port):
    def rewrite(routes):
        return [re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", r) if _VALUE.search(r) else r
                for r in routes]
    return rewrite


def _dialog(home, bob, source, *, bob_source="127.0.0.71"):
    """alice's INVITE to bob through the home; her ACK and a re-INVITE along the route
    set her 200 gave, sent to the port its first entry names.  (200, re-INVITE answer,
    what bob got)."""
    register_contact(home, "bob", bob.uas.port, source=bob_source)
    ua = SipUa(home.port, user="alice", source=source)
    try:
        invite = ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com")
        ok = ua.request(invite, timeout=5)
        if ok is None or ok.status != 200:
            return ok, None, list(bob.uas.received)
        routes = [r.strip() for v in reversed(ok.get_all("Record-Route")) for r in v.split(",")]
        first = re.search(r"127\.0\.0\.1:(\d+)", routes[0])
        ua.port = int(first.group(1))
        target = f"sip:bob@127.0.0.1:{bob.uas.port}"
        to = ok.get("To")
        ids = dict(call_id=invite.get("Call-ID"), from_tag=invite.get("From").split("tag=")[1])
        ack = ua.build("ACK", target, to=to, cseq=invite.cseq[0], routes=routes, **ids)
        ack = ack.replace("To", to)
        ua.send(ack.replace("Via", ua.via()))
        again = ua.build("INVITE", target, to=to, routes=routes, **ids).replace("To", to)
        answer = ua.transact(again, timeout=5)
        time.sleep(0.3)
        return ok, answer, list(bob.uas.received)
    finally:
        ua.close()


def test_hole_k1_our_entry_moved_to_our_other_udp_socket_is_relayed_and_routed(home):
    bob = _Callee(_moved_to(home.second))
    try:
        ok, answer, got = _dialog(home, bob, "127.0.0.72")
    finally:
        bob.close()
    # secure: the moved 200 is dropped (as one moved to a port not ours), or the 200
    # that reaches alice leads her to the socket her dialog went through (stop 38: the
    # first assertion was that it reached her; dropping it is the fix)
    if ok is None or ok.status != 200:
        assert not [m for m in got if m.method == "INVITE" and m.to_tag], \
            "the moved 200 was dropped, yet an in-dialog INVITE reached bob"
        return
    routes = ok.get_all("Record-Route")
    print("route set", routes, "re-INVITE answered", answer and answer.status,
          "bob got", [(m.method, m.to_tag) for m in got])
    assert f"127.0.0.1:{home.port};" in routes[0], routes


def test_control_k1_the_untouched_200_leads_alice_to_the_socket_she_called(home):
    bob = _Callee(lambda routes: routes)
    try:
        ok, answer, got = _dialog(home, bob, "127.0.0.73")
    finally:
        bob.close()
    assert ok is not None and ok.status == 200
    assert f"127.0.0.1:{home.port};" in ok.get_all("Record-Route")[0]
    assert answer is not None and answer.status == 200
    # the ACK and the in-dialog INVITE reached bob (a loaded run retransmits the first
    # INVITE, so the order of arrival is not asserted)
    assert "ACK" in [m.method for m in got]
    assert [m for m in got if m.method == "INVITE" and m.to_tag]


def test_control_k1_our_entry_moved_to_a_port_not_ours_is_dropped(home):
    """The filter is live in this set-up: the same rewrite to a port of the host where
    the proxy does not listen is dropped (``moved_route_entries``)."""
    elsewhere = free_port(avoid={home.port, home.second})
    mark = home.log_mark()
    bob = _Callee(_moved_to(elsewhere))
    try:
        ok, _, _ = _dialog(home, bob, "127.0.0.74")
    finally:
        bob.close()
    assert ok is None or ok.status != 200
    assert "not ours: dropped" in home.log_since(mark)
