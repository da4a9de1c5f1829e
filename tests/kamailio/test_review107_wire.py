"""Review 107 (December 2026) of adf7317, wire half: REGISTER and the registrar on a
real Kamailio 5.6.3.  The phone's half (hole K2), the controls of both and the list of
what was tried and held are in ``tests/unit/test_review107.py``.

Hole K1 - a contact naming the proxy itself turns one stranger's datagram into 70
transactions past pike, and a burst of them empties Kamailio's shared memory
(``test_hole_a_contact_naming_the_proxy_turns_one_datagram_into_seventy_transactions``,
``test_hole_strangers_through_the_loop_exhaust_shared_memory``).

  Attacker: an insider UA with a password (alice, for her own AoR) - or, where the
  registrar is open (no ``[auth]``), any off-path sender alone - sets the trap once;
  then any off-path sender (no account, requests to our users are never challenged)
  springs it as often as it likes.
  Set-up: alice REGISTERs ``Contact: <sip:alice@127.0.0.1:PORT>``, PORT being the
  proxy's own SIP port (``;transport=tcp`` works alike).  The registrar binds it: 200.
  Messages: a stranger's plain ``MESSAGE sip:alice@example.com`` (From a foreign
  domain, Max-Forwards 70).
  Effect (seen): ``lookup`` rewrites the Request-URI to the contact, tm relays the
  MESSAGE to the proxy itself, which takes it as a new request from its own address,
  looks alice up again, and so on until Max-Forwards is spent: tm's ``created``
  counter grows by 70 for one datagram, the stranger gets 483 (an INVITE stops at 17
  passes on the Record-Route bound, 400; a stranger's ``Max-Forwards: 255`` is capped
  to 70 by maxfwd).  Every pass after the first comes from the proxy's own address,
  which ``exempt_source`` exempts from pike, so pike counts one request where the
  proxy works 70; each pass adds a Via, and each transaction is kept in tm's wait
  state for seconds.  Measured on this machine: 100 such MESSAGEs cost the proxy
  1.8-2.2 s of CPU (100 MESSAGEs to a real contact: 0.02 s) and 22 s to answer one
  by one; a burst of 100-150 sent at once from 20 loopback addresses (5-8 each, far
  under pike's 30 in 2 s) made Kamailio log "could not allocate shared memory from shm
  pool" / "new_t(): out of mem" 208-2457 times (``core.shmmem`` max_used 67,393,608 of
  67,108,784), and 28 of 30 (38 of 40 in a second run) honest MESSAGEs to bob sent
  during the next 3-4 s were answered 500.
  Code at fault: ``kamailio_app/kemi.py:1260-1272`` (``route_register`` saves any
  Contact; nothing refuses one naming our own sockets) with ``kemi.py:840-843``
  (``exempt_source``: a request from our own address - here our own relay - is
  never limited), and the relay of a looked-up target that is ourselves
  (``route_target``, kemi.py:1436, and ``relay``, 1485: no check that the next hop is
  not one of our own sockets).
  Suggested fix: refuse at REGISTER (403) a Contact whose host and port name one of
  our listen sockets or aliases (``KSR.is_myself`` on the contact URI, every contact
  of the request), and, as a second line, refuse to relay (482 Loop Detected) a
  request whose destination after ``lookup`` is ourselves; do not let a request that
  merely comes from our own address escape pike while the proxy relays to itself.

Controls: ``test_control_the_same_burst_at_a_real_contact_costs_one_transaction_each``
(the same stranger's MESSAGE to bob's real contact is one transaction and 200; the same
burst aimed at bob leaves all 30 of bob's later MESSAGEs 200 and no shm failure: the harm
is the loop's), ``test_control_the_loop_ends_in_483_and_max_forwards_above_70_is_capped``
(what the loop was, and that Max-Forwards bounded it at 70 passes; replaced in stop 38
by ``test_control_a_contact_on_our_host_at_another_port_binds_and_is_reached``).

Fixed (stop 38): a REGISTER whose Contact names one of the proxy's sockets or aliases
(``KSR.is_myself`` with the port written, else 5060/5061) is ``403 Contact Names This
Proxy`` (``kemi._contact_naming_us``); and the cfg's native ``onsend_route`` never
sends a request to one of the proxy's own SIP sockets (``to_ip==myself`` and one of
its listen ports), whatever the spelling and however the binding got into usrloc (a
Python onsend route cannot drop a send in 5.6.3: app_python3 returns 1 for it).  Both
hole tests failed on the code before (checked) and pass; stop 38 added the spellings
and the ``ul.add`` binding (the send check alone), which loop on the old code too, and
turned the 483 control into a control of the refusal and of a phone on the proxy's
own host at another port.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, build_request, udp_transaction
from e2m_plugins import sip

pytestmark = [pytest.mark.kamailio]

USERS = {"alice": "r107-alice-pw", "bob": "r107-bob-pw"}
BURST = 150          # strangers' MESSAGEs to alice, 20 source addresses (under pike's rate)
SOURCES = 20
HONEST = 30          # MESSAGEs to bob sent while the burst is worked off


@pytest.fixture
def proxy(proxy_factory):
    """A home proxy with [auth] (digest for REGISTER), the default [limits] (pike on,
    30 requests in 2 s per address), no E2M needed for the registrar."""
    return proxy_factory("r107-reg", e2m=False, auth=True, users=dict(USERS))


def _register(proxy, user: str, contact: str, source: str = "127.0.0.60"):
    ua = SipUa(proxy.port, user=user, password=USERS[user], source=source)
    try:
        reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        return ua.request(reg.replace("Contact", contact))
    finally:
        ua.close()


def _created(proxy) -> int:
    """tm's count of transactions created so far (``tm.stats``)."""
    found = re.search(r"created:\s*(\d+)", proxy.rpc("tm.stats"))
    assert found, "tm.stats unreadable"
    return int(found.group(1))


def _strangers_message(to_user: str, n: int, source: str, port: int) -> bytes:
    msg = sip.parse(build_request("MESSAGE", f"sip:{to_user}@example.com", to_user=to_user,
                                  body=b"hi", content_type="text/plain"))
    msg = msg.replace("From", f"<sip:s{n}@elsewhere.example.net>;tag=s{n}")
    return msg.replace("Via", f"SIP/2.0/UDP {source}:{port};rport;branch=z9hG4bK-r107s{n}") \
        .serialize()


def _one_strangers_message(proxy, to_user: str):
    msg = sip.parse(build_request("MESSAGE", f"sip:{to_user}@example.com", to_user=to_user,
                                  body=b"hi", content_type="text/plain"))
    msg = msg.replace("From", "<sip:someone@elsewhere.example.net>;tag=x1")
    return udp_transaction(proxy.port, msg, source="127.0.0.61", timeout=10)


def _burst_then_honest(proxy, target: str) -> tuple[dict, int]:
    """BURST strangers' MESSAGEs to ``target`` (fire and forget, from SOURCES loopback
    addresses, BURST/SOURCES each), then HONEST MESSAGEs to bob one by one; bob's
    answers by code, and the shm allocation failures Kamailio logged."""
    socks = []
    try:
        for n in range(BURST):
            source = f"127.0.2.{n % SOURCES + 2}"
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((source, 0))
            s.sendto(_strangers_message(target, n, source, s.getsockname()[1]),
                     ("127.0.0.1", proxy.port))
            socks.append(s)
        codes: dict = {}
        for j in range(HONEST):
            msg = sip.parse(build_request("MESSAGE", "sip:bob@example.com", to_user="bob",
                                          body=b"hello bob", content_type="text/plain"))
            msg = msg.replace("From", f"<sip:h{j}@elsewhere.example.net>;tag=h{j}")
            answer = udp_transaction(proxy.port, msg, source="127.0.3.9", timeout=2)
            code = answer.status if answer is not None else None
            codes[code] = codes.get(code, 0) + 1
            time.sleep(0.1)
    finally:
        for s in socks:
            s.close()
    log = proxy.log_path.read_text(errors="replace")
    return codes, log.count("could not allocate shared memory")


# -- hole K1 ------------------------------------------------------------------------------

def test_hole_a_contact_naming_the_proxy_turns_one_datagram_into_seventy_transactions(proxy):
    answer = _register(proxy, "alice", f"<sip:alice@127.0.0.1:{proxy.port}>")
    bound = answer is not None and answer.status == 200
    before = _created(proxy)
    reply = _one_strangers_message(proxy, "alice")
    time.sleep(0.5)
    created = _created(proxy) - before
    # secure: the REGISTER is refused, or the request is not relayed back to ourselves
    # (at most its own transaction and one more pass)
    assert not bound or created <= 2, \
        f"one MESSAGE made {created} transactions, answered {reply and reply.status}"


def test_hole_strangers_through_the_loop_exhaust_shared_memory(proxy):
    uas = RawUas()
    try:
        _register(proxy, "alice", f"<sip:alice@127.0.0.1:{proxy.port}>")
        ok = _register(proxy, "bob", f"<sip:bob@127.0.0.1:{uas.port}>")
        assert ok is not None and ok.status == 200
        codes, out_of_memory = _burst_then_honest(proxy, "alice")
    finally:
        uas.close()
    assert out_of_memory == 0 and codes == {200: HONEST}, \
        f"bob's MESSAGEs: {codes}; shm allocation failures logged: {out_of_memory}"


@pytest.mark.parametrize("spelling", [
    "localhost:{port}",            # a name that resolves to us, no alias of ours
    "127.0.0.1:{port};transport=tcp",
    "127.0.0.1.:{port}",           # a trailing dot
    "127.1:{port}",                # inet_aton's short form
    "[::ffff:127.0.0.1]:{port}",   # IPv4-mapped
])
def test_hole_a_contact_naming_the_proxy_in_another_spelling_loops_no_more(proxy, spelling):
    """Stop 38's own variants of hole K1: whatever the REGISTER check reads, a request
    relayed to one of the proxy's own sockets must not come back (at most one
    transaction for the stranger's MESSAGE, and one more pass)."""
    host = spelling.format(port=proxy.port)
    answer = _register(proxy, "alice", f"<sip:alice@{host}>")
    bound = answer is not None and answer.status == 200
    before = _created(proxy)
    reply = _one_strangers_message(proxy, "alice")
    time.sleep(0.5)
    created = _created(proxy) - before
    assert not bound or created <= 2, \
        f"{host}: one MESSAGE made {created} transactions, answered {reply and reply.status}"


def test_hole_a_binding_the_register_check_never_saw_loops_no_more(proxy):
    """Stop 38's variant of hole K1 past the REGISTER check: a binding naming the proxy
    that reached usrloc another way (added before the check existed, replicated from a
    node, ``ul.add``).  The send check (``ksr_onsend_route``) must stop the request at
    the first pass, however the binding got there."""
    out = proxy.rpc("ul.add", "location", "alice", f"sip:alice@127.0.0.1:{proxy.port}",
                    "600", "1.0", "s:0", "0", "0", "4294967295")
    assert f"127.0.0.1:{proxy.port}" in proxy.rpc("ul.lookup", "location", "alice"), out
    before = _created(proxy)
    reply = _one_strangers_message(proxy, "alice")
    time.sleep(0.5)
    created = _created(proxy) - before
    assert created <= 2, f"one MESSAGE made {created} transactions, answered {reply and reply.status}"
    assert "a request to this proxy's own socket" in proxy.log_path.read_text(errors="replace")
    assert reply is not None and reply.status == 500      # the relay failed at once


# -- controls -----------------------------------------------------------------------------

def test_control_the_same_burst_at_a_real_contact_costs_one_transaction_each(proxy):
    """The set-up is live and the harm is the loop's: the same BURST aimed at bob's
    real contact leaves bob's later MESSAGEs all answered 200, nothing logged about
    shared memory; one stranger's MESSAGE to a real contact is one transaction."""
    uas = RawUas()
    try:
        ok = _register(proxy, "bob", f"<sip:bob@127.0.0.1:{uas.port}>")
        assert ok is not None and ok.status == 200
        before = _created(proxy)
        reply = _one_strangers_message(proxy, "bob")
        assert reply is not None and reply.status == 200
        assert _created(proxy) - before == 1
        codes, out_of_memory = _burst_then_honest(proxy, "bob")
    finally:
        uas.close()
    assert out_of_memory == 0 and codes == {200: HONEST}, (codes, out_of_memory)


def test_control_a_contact_on_our_host_at_another_port_binds_and_is_reached(proxy):
    """The check reads the socket, not the host: a phone on the proxy's own machine
    (another port; every test here runs so) registers and gets its MESSAGE; the same
    AoR bound to the proxy's own port is refused (403), by every transport, and a
    Contact without a port names 5060, not ours."""
    uas = RawUas()
    try:
        ok = _register(proxy, "alice", f"<sip:alice@127.0.0.1:{uas.port}>")
        assert ok is not None and ok.status == 200
        reply = _one_strangers_message(proxy, "alice")
        assert reply is not None and reply.status == 200
        for contact in (f"<sip:alice@127.0.0.1:{proxy.port}>",
                        f"<sip:alice@127.0.0.1:{proxy.port};transport=tcp>",
                        f"<sip:alice@127.0.0.1:{uas.port}>, <sip:alice@127.0.0.1:{proxy.port}>"):
            refused = _register(proxy, "alice", contact)
            assert refused is not None and refused.status == 403, contact
            assert refused.reason == "Contact Names This Proxy"
        assert proxy.port != 5060
        portless = _register(proxy, "alice", "<sip:alice@127.0.0.1>")
        assert portless is not None and portless.status == 200
    finally:
        uas.close()
