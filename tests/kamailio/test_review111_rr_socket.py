"""Review 111 (an attacker's review of afb1199), wire: the reply's Record-Route socket
check of stop 38 (``kemi._names_the_transactions_socket``), on a real Kamailio 5.6.3.

Hole K1 (``test_hole_k1_200_sent_to_our_other_socket_carries_our_entry_moved_there``):
**insider UA**, the callee (or an untrusted hop on his leg).  Review 109's set-up: a
plain proxy on ``udp:127.0.0.1:P``, ``tcp:127.0.0.1:P`` and a second
``udp:127.0.0.1:P2``; bob (raw UAS) registered; alice (UDP) INVITEs him through P.
bob's 200 carries our entry moved to P2 (token untouched), exactly as in review 109,
but bob sends the 200 to P2 instead of back to P (a reply is matched by its branch on
any socket).  Effect (seen): the 200 reaches alice with
``Record-Route: <sip:127.0.0.1:P2;lr;e2m-rr=..>``, nothing is logged as dropped, her ACK
and re-INVITE sent to P2 reach bob (bob got INVITE, INVITE with To tag, ACK; the
re-INVITE answered 200): review 109's fix is bypassed by choosing the socket the reply
comes in on.  At fault: ``kamailio_app/kemi.py:400-402``: the allowed sockets include
the one the *reply* came in on (``$Ri``/``$Rp``), which the sender of the reply picks.
Fix: take the socket the branch was *sent* from (tm's branch send socket, e.g.
``$T_branch``/the request's ``$fs`` as relayed; on r2 the outgoing socket we wrote),
not the reply's receiving socket; or put host:port:transport of each entry under the
token's MAC when writing it.

Hole K2 (``test_hole_k2_callers_tls_entry_moved_to_our_udp_socket_is_relayed``):
**untrusted hop** on the callee's UDP leg (or the callee).  Proxy with ``[auth]`` and a
``tls:`` listener; alice over TLS (digest), bob registered over UDP: the proxy
record-routes twice (``r2=on``): ``sip:127.0.0.1:P;r2=on;lr;e2m-rr=T`` facing bob and
``sip:127.0.0.1:TLS;transport=tls;r2=on;lr;e2m-rr=T`` facing alice.  The hop rewrites
alice's entry to ``sip:127.0.0.1:P;r2=on;lr;e2m-rr=T`` (our own UDP socket, token kept)
and the 200 comes back to P as usual.  Effect (seen): alice's 200 carries both entries
naming UDP P, nothing dropped; her BYE along that route set, sent over UDP to P, is
answered 407 by the proxy, and her second BYE carries her MD5 digest response
(``Digest username="alice", realm="example.com", ... response=...``) over UDP in the
clear; bob got the BYE.  Her in-dialog leg is moved off TLS (review 81's hole 3
again, with our own UDP socket in place of the hop's address): a passive listener on
her access network reads her requests and gets a digest response to guess her
password against.  At fault: ``kamailio_app/kemi.py:400-402`` again: the check compares
(address, port) only, never the transport, and both of our entries' sockets are
allowed for either entry.  Fix: hold each entry of ours to the socket it was written
for, with its transport: the entry facing the caller (the lower of the r2 pair) to
the request's receiving socket and proto (``$T_req($Ri)``, ``$T_req($Rp)``,
``$T_req($pr)``), the one facing the callee to the branch's send socket; or MAC host,
port and transport in the token.

Controls (pass unmarked): ``test_control_k1_the_same_200_sent_back_where_the_invite_came_from_is_dropped``
(review 109's fix live: the moved entry in a 200 sent back to P is dropped, "not ours:
dropped" logged, no in-dialog request reaches bob);
``test_control_k1_an_untouched_200_on_the_other_socket_is_relayed`` (an untouched 200
sent to P2 is relayed and the call works: only the moved entry matters);
``test_control_k2_the_untouched_double_record_route_keeps_alice_on_tls`` (the honest
200 names the TLS socket for alice); ``test_control_k2_tls_entry_moved_to_a_udp_port_not_ours_is_dropped``
(the same rewrite to a UDP port where the proxy does not listen is dropped).

Tried and held:

- (honest flow) a 200 coming back over a TLS connection the proxy itself opened to a
  TLS next hop (UDP caller, double Record-Route UDP/TLS):
  ``test_control_h2_the_answer_of_a_tls_next_hop_reaches_alice`` passes, as does the
  UDP next hop control.  I expected ``$Rp`` to be the connection's ephemeral port and
  the 200 to be dropped; it was not (run).
- A stray reply (no transaction) is held to any socket of ours: a documented known
  limit, not counted.  The front, the advertised address and host names stand for
  every node: documented, not counted.
- IPv6 spellings and IPv4-mapped forms: both sides go through
  ``e2m_plugins.uri.canonical_ip`` (read only).
- A 1xx making an early dialog is checked by the same code (read): K1/K2 apply to it
  the same way; a re-INVITE's 2xx does not change a route set (RFC 3261 12.2.1.2).
- The DMQ socket (read): ``on_dmq_socket`` drops every request but KDMQ there before
  routing; a peer's KDMQ is taken first (``route_dmq``), so an honest KDMQ is not
  refused.  Replies are not held to it: K1's trick works with a node's DMQ socket as
  P2 (read, not run), but the caller's in-dialog requests sent there are then
  dropped, which only ends the callee's own call.

Fixed (stop 38): ``kemi._faces_the_caller`` replaces the socket check: our entry
nearest the caller (the lowest of ours) must name the socket the request came in on
(``$T_req($Ri)``, ``$T_req($Rp)``, ``$T_req($pr)``), transport included; the reply's own
socket no longer counts.  Both hole tests failed on the code before (checked) and pass.
"""

from __future__ import annotations

import re
import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, parse_address_uri, register_contact
from e2m_lab.ports import free_port
from e2m_plugins.sip import SipMessage, make_response
from tests.kamailio.test_review109_wire import _dialog as _dialog109, _moved_to, home  # noqa: F401

pytestmark = [pytest.mark.kamailio]

_VALUE = re.compile(r"e2m-rr=")
USERS = {"alice": "alice-R111-Pass", "bob": "bob-R111-Pass"}


# -- hole K1: the callee picks the socket his 200 comes in on --------------------------

class _Callee:
    """bob's UAS.  His 200 to the initial INVITE carries the Record-Route as ``rewrite``
    gives it and is sent to ``reply_port`` of the proxy (None: back where the INVITE came
    from, as RFC 3261 has it); 200 to anything else, sent back."""

    def __init__(self, rewrite, reply_port=None) -> None:
        self.uas = RawUas()
        self.rewrite = rewrite
        self.reply_port = reply_port
        self.uas.responder = self.respond

    def respond(self, request: SipMessage):
        answer = make_response(request, 200, "OK")
        if request.method != "INVITE" or request.to_tag:
            return answer
        answer = answer.replace("To", f"{request.get('To')};tag=bt111")
        answer = answer.add("Contact", f"<sip:bob@127.0.0.1:{self.uas.port}>")
        answer = answer.remove("Record-Route")
        for route in self.rewrite(list(request.get_all("Record-Route"))):
            answer = answer.add("Record-Route", route)
        if self.reply_port is None:
            return answer
        self.uas.sock.sendto(answer.serialize(), ("127.0.0.1", self.reply_port))
        return None

    def close(self) -> None:
        self.uas.close()


def _dialog(home, bob, source):
    """Review 109's call (INVITE, ACK and re-INVITE along the 200's route set), bob
    registered from 127.0.0.171."""
    return _dialog109(home, bob, source, bob_source="127.0.0.171")


def test_hole_k1_200_sent_to_our_other_socket_carries_our_entry_moved_there(home):
    bob = _Callee(_moved_to(home.second), reply_port=home.second)
    mark = home.log_mark()
    try:
        ok, answer, got = _dialog(home, bob, "127.0.0.172")
    finally:
        bob.close()
    print("200", ok and ok.status, "route set", ok and ok.get_all("Record-Route"),
          "re-INVITE answered", answer and answer.status,
          "bob got", [(m.method, m.to_tag) for m in got],
          "log", [ln for ln in home.log_since(mark).splitlines() if "dropped" in ln])
    # secure (review 109's rule): an entry of ours moved to another of our sockets is
    # dropped, whichever of our sockets the callee chose to answer on
    if ok is None or ok.status != 200:
        return
    assert f"127.0.0.1:{home.port};" in ok.get_all("Record-Route")[0]


def test_control_k1_the_same_200_sent_back_where_the_invite_came_from_is_dropped(home):
    """Review 109's fix is live in this set-up: the same moved entry in a 200 sent back
    to the socket the INVITE left from is dropped."""
    mark = home.log_mark()
    bob = _Callee(_moved_to(home.second))
    try:
        ok, _, got = _dialog(home, bob, "127.0.0.173")
    finally:
        bob.close()
    assert ok is None or ok.status != 200
    assert "not ours: dropped" in home.log_since(mark)
    assert not [m for m in got if m.to_tag], "an in-dialog request reached bob"


def test_control_k1_an_untouched_200_on_the_other_socket_is_relayed(home):
    """Where a reply comes in plays no part when the entry is untouched: alice's route
    set names the socket she called, her re-INVITE is routed and answered."""
    bob = _Callee(lambda routes: routes, reply_port=home.second)
    try:
        ok, answer, got = _dialog(home, bob, "127.0.0.174")
    finally:
        bob.close()
    assert ok is not None and ok.status == 200
    assert f"127.0.0.1:{home.port};" in ok.get_all("Record-Route")[0]
    assert answer is not None and answer.status == 200
    # the ACK and the in-dialog INVITE reached bob (a loaded run retransmits the first
    # INVITE, so the order of arrival is not asserted)
    assert "ACK" in [m.method for m in got]
    assert [m for m in got if m.method == "INVITE" and m.to_tag]


# -- hole K2: the caller's TLS entry moved to our UDP socket (double Record-Route) -----

def _tls_home(proxy_factory, name):
    return proxy_factory(name, e2m=False, tls=True, auth=True, users=USERS)


def _callee(rewrite) -> RawUas:
    """bob's UAS on UDP; his 200 to the INVITE passes ``rewrite`` over each Record-Route
    value (the proxy's double Record-Route: UDP for bob, TLS for alice)."""
    uas = RawUas()

    def respond(request: SipMessage) -> SipMessage:
        answer = make_response(request, 200, "OK")
        if request.method == "INVITE" and not request.to_tag:
            answer = answer.replace("To", f"{request.get('To')};tag=bt111b")
            answer = answer.add("Contact", f"<sip:bob@127.0.0.1:{uas.port}>")
            answer = answer.remove("Record-Route")
            for route in request.get_all("Record-Route"):
                answer = answer.add("Record-Route", rewrite(route))
        return answer
    uas.responder = respond
    return uas


def _call_over_tls(home, pki, bob, source):
    """alice (TLS, digest) INVITEs bob (UDP); (her SipUa, the INVITE, the 200 or None)."""
    register_contact(home, "bob", bob.port, password=USERS["bob"], source="127.0.0.175")
    ua = SipUa(home.tls_port, transport="tls", user="alice", password=USERS["alice"],
               source=source, ca_file=pki.directory / "ca.crt")
    assert ua.register().status == 200
    ok = ua.request(ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com"),
                    timeout=5)
    return ua, ua.sent[-1], ok


def _bye_over_udp(home, invite, ok, source):
    """alice's BYE along the route set her 200 gave, sent as it says: UDP to the
    proxy's UDP port (what her phone does when its first entry names no TLS)."""
    routes = list(reversed(ok.get_all("Record-Route")))
    ua = SipUa(home.port, user="alice", password=USERS["alice"], source=source)
    try:
        bye = ua.build("BYE", parse_address_uri(ok.get("Contact") or ""),
                       to="sip:bob@example.com", call_id=invite.get("Call-ID"),
                       from_tag=invite.from_tag, to_tag=ok.to_tag, routes=routes,
                       cseq=invite.cseq[0] + 10)
        answer = ua.request(bye, preemptive=False, timeout=3)
        return answer, [m.status for m in ua.received], [
            m.get("Proxy-Authorization") or m.get("Authorization") for m in ua.sent]
    finally:
        ua.close()


@pytest.mark.openssl
def test_hole_k2_callers_tls_entry_moved_to_our_udp_socket_is_relayed(proxy_factory, pki):
    home = _tls_home(proxy_factory, "r111-tls-udp")

    def off_tls(route):        # token kept: only address, port and transport change
        return re.sub(r"sip:127\.0\.0\.1:\d+;transport=tls", f"sip:127.0.0.1:{home.port}",
                      route)
    bob = _callee(off_tls)
    mark = home.log_mark()
    ua, invite, ok = _call_over_tls(home, pki, bob, "127.0.0.176")
    try:
        routes = ok.get_all("Record-Route") if ok is not None else []
        bye, statuses, sent = _bye_over_udp(home, invite, ok, "127.0.0.176") \
            if ok is not None and ok.status == 200 else (None, [], [])
        time.sleep(0.3)
        print("200", ok and ok.status, "route set", routes, "UDP BYE answered",
              bye and bye.status, "answers", statuses, "credentials sent over UDP", sent,
              "bob got", [m.method for m in bob.received],
              "log", [ln for ln in home.log_since(mark).splitlines() if "dropped" in ln])
        # secure: alice gets no 200 whose route set takes her in-dialog requests off
        # TLS (dropped as one moved elsewhere, or her side still names the TLS socket)
        assert ok is None or ok.status != 200 or any(
            f":{home.tls_port};transport=tls" in r for r in routes), routes
    finally:
        ua.close()
        bob.close()


@pytest.mark.openssl
def test_control_k2_the_untouched_double_record_route_keeps_alice_on_tls(proxy_factory, pki):
    home = _tls_home(proxy_factory, "r111-tls-ok")
    bob = _callee(lambda route: route)
    ua, _, ok = _call_over_tls(home, pki, bob, "127.0.0.177")
    try:
        assert ok is not None and ok.status == 200
        routes = ok.get_all("Record-Route")
        assert any(f":{home.tls_port};transport=tls" in r for r in routes), routes
        assert any(f"127.0.0.1:{home.port};" in r for r in routes), routes
    finally:
        ua.close()
        bob.close()


@pytest.mark.openssl
def test_control_k2_tls_entry_moved_to_a_udp_port_not_ours_is_dropped(proxy_factory, pki):
    home = _tls_home(proxy_factory, "r111-tls-else")
    elsewhere = free_port(avoid={home.port, home.tls_port})

    def elsewhere_udp(route):
        return re.sub(r"sip:127\.0\.0\.1:\d+;transport=tls", f"sip:127.0.0.1:{elsewhere}",
                      route)
    bob = _callee(elsewhere_udp)
    mark = home.log_mark()
    ua, _, ok = _call_over_tls(home, pki, bob, "127.0.0.178")
    try:
        assert ok is None or ok.status != 200
        assert home.wait_log("not ours: dropped", mark)
    finally:
        ua.close()
        bob.close()


# -- tried and held: a 200 over a TLS connection the proxy opened (double Record-Route) -

def _via_next_hop(proxy_factory, name, hop_uri):
    return proxy_factory(name, e2m=False, tls=True, domains=(), next_hop=hop_uri)


def _invite_through(visited, source):
    ua = SipUa(visited.port, user="alice", source=source)
    try:
        return ua.request(ua.build("INVITE", "sip:bob@example.net", to="sip:bob@example.net"),
                          timeout=5)
    finally:
        ua.close()


@pytest.mark.openssl
def test_control_h2_the_answer_of_a_tls_next_hop_reaches_alice(proxy_factory, pki, tmp_path):
    from e2m_plugins.testpki import issue_tls_server, write_credential
    from tests.kamailio.test_review67_wire import TlsNextHop
    cred = write_credential(issue_tls_server(pki.ca, "hop.example.net", "ec", ("127.0.0.1",)),
                            tmp_path, "hop-tls")
    hop = TlsNextHop(cred.cert_path, cred.key_path)
    visited = _via_next_hop(proxy_factory, "r111-tls-hop",
                            f"sip:127.0.0.1:{hop.port};transport=tls")
    mark = visited.log_mark()
    try:
        ok = _invite_through(visited, "127.0.0.179")
        time.sleep(0.3)
        dropped = [ln for ln in visited.log_since(mark).splitlines() if "dropped" in ln]
        print("hop got", [m.method for m in hop.received],
              "Record-Route", hop.received[0].get_all("Record-Route") if hop.received else None,
              "alice got", ok and ok.status, "log", dropped)
        assert [m.method for m in hop.received][:1] == ["INVITE"]
        assert ok is not None and ok.status == 200, dropped
    finally:
        hop.close()


def test_control_h2_the_answer_of_a_udp_next_hop_reaches_alice(proxy_factory):
    hop = RawUas()
    visited = _via_next_hop(proxy_factory, "r111-udp-hop", f"sip:127.0.0.1:{hop.port}")
    try:
        ok = _invite_through(visited, "127.0.0.180")
        assert [m.method for m in hop.received][:1] == ["INVITE"]
        assert ok is not None and ok.status == 200
        assert any(_VALUE.search(r) for r in ok.get_all("Record-Route"))
    finally:
        hop.close()
