"""Review 31 (attacker's review of this session's fixes), against a real Kamailio 5.6.3.

Each ``test_hole_*`` was a strict xfail on ``1bfd413`` (closed since: a reply marks
nothing, and the sweep keeps the highest mark it saw) whose assertion is what a fix must
make true; each ``test_control_*`` is the same flow without the attack (it passes).

1. **A user's "authenticated" mark is overwritten by any later message.**  Review 29
   keeps a user's connection before a stranger's by its lifetime: ``route_auth`` sets
   idle+2 (``AUTHENTICATED``) when digest authentication lets a request in.  But
   ``mark_connection`` *sets* the lifetime, it never raises it: the next request on
   the connection (``route_request`` marks ``SPOKE`` before anything) or the next reply
   matching one of our transactions (``ksr_reply_route``) puts it back to idle+1.  A
   registered phone answers whatever the proxy relays to it (an OPTIONS, a MESSAGE, a
   call's 100/180), and anyone may send those to our users unauthenticated: the
   stranger of review 29 behind the user's NAT downgrades her connection at will and
   the share then closes it as the newest of equals.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from e2m_lab.kamailio_harness import SipUa, udp_transaction
from e2m_plugins.sip import make_request, make_response
from tests.kamailio.test_review27_wire import USERS
from tests.kamailio.test_review29_wire import (  # noqa: F401 - tcp_home: a fixture
    FIRST, SHARED, WINDOW, _keep_alive, _open, _stranger, tcp_home)

pytestmark = [pytest.mark.kamailio, pytest.mark.slow]   # the TCP tests wait out sweeps

ELSEWHERE = "127.0.0.84"       # a silent connection that shows when the sweep ticks
CALLER = "127.0.0.85"          # the stranger's own host (UDP), anywhere on the Internet


def _after_a_sweep(proxy) -> None:
    """Return right after a sweep tick: a silent connection from another address is
    closed by the first tick past ``tcp_first_message_timeout`` (so what follows runs
    well inside one 2 s period, not across a tick)."""
    probe = socket.socket()
    probe.bind((ELSEWHERE, 0))
    probe.connect(("127.0.0.1", proxy.port))
    probe.settimeout(4 * FIRST + 4)
    try:
        assert probe.recv(1) == b"", "the silent probe got data"
    except (ConnectionResetError, OSError):
        pass
    finally:
        probe.close()


def _options_to_alice(proxy) -> threading.Thread:
    """The stranger's unauthenticated OPTIONS to alice@example.com from his own host
    (toward our domain: no credentials asked), waiting for its final answer."""
    request = make_request("OPTIONS", "sip:alice@example.com", from_uri="sip:eve@example.net",
                           to_uri="sip:alice@example.com", call_id=f"r31-opt-{time.time()}@x")
    thread = threading.Thread(target=udp_transaction, args=(proxy.port, request),
                              kwargs={"timeout": 3, "source": CALLER}, daemon=True)
    thread.start()
    return thread


def _alice_answers(alice: SipUa) -> bool:
    """alice's phone answers the request the proxy relays to her connection (any phone
    answers an OPTIONS or a MESSAGE 200; a call 100/180)."""
    request = alice.receive(3)
    if request is None or not request.is_request:
        return False
    alice.send(make_response(request, 200, "OK"))
    return True


def _run(proxy, *, downgrade: bool, stranger: int = 5) -> tuple[bool, int, bool]:
    held = _stranger(proxy, stranger, request=True)       # five that spoke (OPTIONS)
    try:
        _after_a_sweep(proxy)
        assert sum(_open(s) for s in held) == stranger
        alice = SipUa(proxy.port, transport="tcp", user="alice", password=USERS["alice"],
                      source=SHARED, timeout=3)
        try:
            answer = alice.register()
            assert answer is not None and answer.status == 200, answer and answer.status
            answered = False
            if downgrade:
                thread = _options_to_alice(proxy)
                answered = _alice_answers(alice)
                thread.join(4)
            _keep_alive([alice.sock, *held], WINDOW)   # a sweep at least
            return _open(alice.sock), sum(_open(s) for s in held), answered
        finally:
            alice.close()
    finally:
        for sock in held:
            sock.close()


def test_hole_a_stranger_downgrades_alices_mark_with_one_options_and_pushes_her_out(tcp_home):
    """Attacker: off-path sender, no account, sharing one IPv4 address with a user of
    ours (CGNAT, hotel/office NAT): review 29's stranger, plus one request from anywhere.

    Attack: hold ``tcp_connections_per_source`` (5 here, up to 32 by default)
    connections from the shared address, each marked ``SPOKE`` by one OPTIONS (under
    pike).  When alice's phone (re)connects and registers (digest: ``AUTHENTICATED``,
    kept before him, as review 29 promises), send one OPTIONS (or MESSAGE, or INVITE)
    to ``sip:alice@example.com`` from any host: a request toward our domain needs no
    credentials.  The proxy relays it over alice's connection; her phone answers 200.
    (In practice he sends such a probe every few hundred ms, under pike's rate, so it
    lands before the next 2 s sweep whenever she reconnects.)

    Effect: ``ksr_reply_route`` sees a reply to our transaction and calls
    ``mark_connection(SPOKE)``: ``tcp_set_connection_lifetime(idle+1)`` overwrites the
    idle+2 that ``route_auth`` set.  At the next sweep the share holds six ``SPOKE``
    connections and alice's is the newest: closed "too many from one address".  Every
    reconnect goes the same way: she gets no call or MESSAGE (a TLS phone takes requests
    only on its own connection), which review 29's fix was to prevent.  Her own
    requests lower it too (a request before its challenge, a BYE or OPTIONS without
    credentials), and so does answering any call.

    Fix: a mark must only go up: keep each connection's highest level (e.g. an htable
    keyed by ``$conid``, set to AUTHENTICATED in ``route_auth``, checked in
    ``mark_connection`` before it lowers the lifetime; or have ``TcpSweeper`` keep the
    highest level it has seen per connection id, plus the kemi check for the first
    sweep)."""
    alice_open, his, answered = _run(tcp_home, downgrade=True)
    assert answered, "the OPTIONS never reached alice's connection"
    assert alice_open, "alice's registered connection was closed"
    assert his == 4


def test_control_alice_answering_stays_without_the_stranger(tcp_home):
    """Alice answers the same OPTIONS with no stranger on her address: under the share,
    nothing is closed (the downgrade alone costs her nothing)."""
    alice_open, _, answered = _run(tcp_home, downgrade=True, stranger=0)
    assert answered and alice_open
