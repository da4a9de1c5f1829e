"""Review 112 (an attacker's review of d038d44), wire: stop 38's
``kemi._faces_the_caller`` on a spiral, on real Kamailio 5.6.3 proxies.

Honest break H1 (``test_honest_break_h1_a_spiral_from_a_tcp_caller_is_dropped_at_the_second_pass``):
nobody attacks.  Set-up: two plain proxies (``e2m=False``): the home H (domain
example.com, ``udp`` and ``tcp`` on 127.0.0.1:H, ``next_hop`` the visited proxy V) and V
(domain example.net).  carol (raw UAS) is registered at H; bob@example.net is
registered at V with ``Contact: <sip:carol@127.0.0.1:H>`` (he forwards his calls to
carol, an honest binding: it names H, not V).  alice, over TCP, sends
``INVITE sip:bob@example.net`` to H.  The INVITE spirals H -> V -> H -> carol: H
record-routes twice on its first pass (TCP in, UDP out: ``r2=on``), V once, H once more
on its second pass.  carol's 200 carries ``Record-Route: <sip:127.0.0.1:H;lr;e2m-rr=T2>,
<sip:127.0.0.1:V;lr;..>, <sip:127.0.0.1:H;r2=on;lr;e2m-rr=T1>,
<sip:127.0.0.1:H;transport=tcp;r2=on;lr;e2m-rr=T1>`` (the token's first half is the
same on both passes: same Call-ID, From tag, From and To AoRs).  Effect (seen): H logs
``e2m: a 200 whose Record-Route names 1 address(es), not ours: dropped`` on every
retransmission of carol's 200 and alice gets 408 instead of 200: the call never sets
up.  At fault: ``kamailio_app/kemi.py:1315`` (with ``_faces_the_caller``,
``kemi.py:378-407``): "our entry nearest the caller" is taken as the lowest entry
carrying our token (``ours[-1]``), whichever pass wrote it; at the second pass's
transaction that is the first pass's TCP entry facing alice, compared with the socket
the *second* pass's request came in on (UDP from V): transport differs, dropped.  The
check before stop 38 compared address and port only, so this call worked (read: both
passes used 127.0.0.1:H).  Fix: hold to ``$T_req`` only the entry this transaction
wrote: the lowest of ours whose MAC (``keeps_callers_side``) matches this
transaction's top Via below ours, or the entry whose r2 pair sits directly above
the entries the request came with; the other passes' entries only to ``is_myself``.

Controls (pass unmarked): ``test_control_h1_the_same_spiral_from_a_udp_caller_sets_up``
(alice over UDP: every entry names UDP H, the 200 reaches her with the four
entries, so the set-up and carol work); ``test_control_h1_a_tcp_caller_calling_carol_directly_sets_up``
(alice over TCP calls carol@example.com at H without the spiral: the double
Record-Route TCP/UDP is relayed, so TCP itself is not the trouble).  Checked on the
code before stop 38 (``1be0d30``, an extracted copy, this module run against it): the
hole test XPASSes there, so the break is new in stop 38.

Other holes of this review: ``tests/kamailio/test_review112_pingpong.py`` (K2: two
proxies whose bindings name each other loop a stranger's MESSAGE 70 times) and
``tests/cluster/test_review112_cluster_loop.py`` (K1: the same between a cluster's nodes,
and the burst that exhausts their shared memory).

Tried and held (for the whole review):

- ``_faces_the_caller`` against other spellings of our address (run, review 111's
  K1 set-up: the caller's entry moved to our second UDP socket written as
  ``127.0.0.01``, ``127.000.000.001``, ``127.0.0.1.``, ``127.0.0.257``): ``canonical_ip``
  takes each for a name and ``_faces_the_caller`` would let it by, but Kamailio's
  ``is_myself`` does not take any of them for ours (it compares the listen address as
  text), so each 200 was dropped as "not ours" and no in-dialog request reached bob.
  An IPv4-mapped form is not ours to ``is_myself`` either (read).
- An entry spelled by a name: only our aliases (the domains, the identity host, the
  front, the advertised address; ``auto_aliases=no``) pass ``is_myself``, and those
  stand for every node: the documented known limit, not counted (a TLS caller's
  entry moved to ``sip:example.com:P`` would take her off TLS where the domain resolves
  to the proxy: the class of that limit; not run).
- A Record-Route repeating our entry: a moved copy above the real one leaves the real
  one lowest (checked against ``$T_req``) and alice's first hop; a copy below it breaks
  the MAC of the entries below ours (``keeps_callers_side``) and is dropped (read).
- Early 1xx with Record-Route, replies to CANCEL/PRACK/UPDATE: the same code path, and
  in-dialog requests are not record-routed (read, not run); a stray reply is held to
  any socket of ours: documented.
- A REGISTER naming our SIP socket by a spelling ``is_myself`` does not read
  (``127.0.0.01``, ``localhost``, ``127.1``; run): each bound 200, but a stranger's
  MESSAGE to it made one transaction and got 500: ``onsend_route`` compares the
  resolved address (``to_ip``).  (A documentation nit: the 403 rule does not catch
  these spellings; the send check does.)  ``Path`` is not stored (no path module,
  read); ``maddr`` on a contact: the relay resolves to our socket, stopped by
  ``onsend_route`` again (read); a 3xx naming us: tm does not follow redirects here
  (no ``uac_redirect``; read).
- A binding naming a node's DMQ socket by a name or ``127.1`` (run, cluster): bound, but
  the DMQ socket drops it, one transaction (see ``tests/cluster/test_review112_cluster_loop.py``).
- The phone's home rule (read): a response to a branch not noted (destination
  unreadable) is held to the home; a note is only made from pjsip's real destination;
  over TCP/TLS only the address is compared (a party sharing the home's address is
  needed, out of scope); the certificate service (whose PUBLISH/SUBSCRIBE are not
  noted) exists only with an outbound proxy, where every answer is held to it.
- ``pgconn.ProcessConnection.get`` (read): a dropped session is closed before a new one
  is made (no descriptor growth over restarts; a session inherited over fork is
  forgotten unclosed, once per process); an idle session is not spoken to unasked
  (review 111's reading of PostgresMain); a half-open connection is bounded by
  ``tcp_user_timeout``/keepalives and psycopg's bounded wait.

Fixed (stop 39): each transaction checks the Record-Route entry it wrote itself, the one
whose MAC fits the entries and the Via below it (``RouteTokens.callers_side_entry``),
against the socket its request came in on; the first pass's entry is no longer read as
the second's.  The test failed on the code before the fix and passes with it (marker
removed).
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_lab.ports import free_port

pytestmark = [pytest.mark.kamailio]


def _proxies(proxy_factory, name):
    """(home H, visited V, carol): carol registered at H, bob@example.net at V with a
    binding naming H (he forwards to carol)."""
    v_port = free_port()
    visited = proxy_factory(name + "-v", e2m=False, port=v_port, domains=("example.net",))
    home = proxy_factory(name + "-h", e2m=False, next_hop=f"sip:127.0.0.1:{v_port}")
    carol = RawUas()
    register_contact(home, "carol", carol.port, source="127.0.0.191")
    reg = SipUa(visited.port, user="bob", domain="example.net", source="127.0.0.192")
    try:
        request = reg.build("REGISTER", "sip:example.net", headers=[("Expires", "600")])
        answer = reg.request(request.replace("Contact", f"<sip:carol@127.0.0.1:{home.port}>"))
        assert answer is not None and answer.status == 200, answer
    finally:
        reg.close()
    return home, visited, carol


def _call(home, target, transport, source):
    ua = SipUa(home.port, transport=transport, user="alice", source=source)
    try:
        return ua.request(ua.build("INVITE", target, to=target), timeout=6)
    finally:
        ua.close()


def test_honest_break_h1_a_spiral_from_a_tcp_caller_is_dropped_at_the_second_pass(
        proxy_factory):
    home, _, carol = _proxies(proxy_factory, "r112-sp-tcp")
    mark = home.log_mark()
    try:
        ok = _call(home, "sip:bob@example.net", "tcp", "127.0.0.193")
        time.sleep(0.3)
        log = [ln for ln in home.log_since(mark).splitlines() if "dropped" in ln]
        print("alice got", ok and ok.status, "carol got",
              [(m.method, m.get_all("Record-Route")) for m in carol.received][:1], "log", log)
    finally:
        carol.close()
    assert [m.method for m in carol.received][:1] == ["INVITE"]     # the spiral reached her
    assert ok is not None and ok.status == 200, log


def test_control_h1_the_same_spiral_from_a_udp_caller_sets_up(proxy_factory):
    home, _, carol = _proxies(proxy_factory, "r112-sp-udp")
    try:
        ok = _call(home, "sip:bob@example.net", "udp", "127.0.0.194")
    finally:
        carol.close()
    assert ok is not None and ok.status == 200
    routes = ok.get_all("Record-Route")
    assert len([r for r in routes if f"127.0.0.1:{home.port};" in r]) == 2, routes


def test_control_h1_a_tcp_caller_calling_carol_directly_sets_up(proxy_factory):
    home, _, carol = _proxies(proxy_factory, "r112-sp-direct")
    try:
        ok = _call(home, "sip:carol@example.com", "tcp", "127.0.0.195")
    finally:
        carol.close()
    assert ok is not None and ok.status == 200
    assert any(";transport=tcp;" in r for r in ok.get_all("Record-Route"))
