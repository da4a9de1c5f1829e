"""Review 138 (attacker's review of d24d457), area 1: the phone's TCP guard admitting the
home's addresses alone (``TcpGuard.admit_only``, ``admit_program``, called from
``E2MPhone.start``).  Real ``e2m-phone listen`` processes (bob; ``[phone] proxy`` at
127.0.0.2, where nobody listens), plain sockets from other loopback addresses
(``e2m_lab/stranger.py``, the ``lab`` fixture of ``test_phone_stranger.py``), no
Kamailio.

Hole K1: a phone bound to the wildcard address has no TCP gate at all
----------------------------------------------------------------------

- Attacker: an **off-path sender** (any address, sees nothing back it needs), against
  a phone whose ``[phone] host`` is ``0.0.0.0`` or ``::`` (listen on every interface:
  the phone loads and starts with it, and publishes the host's interface address:
  ``local`` ``192.0.2.2:<port>`` here, ``fd00::2:<port>`` for ``::``).
- Set-up and messages: (a) one TCP connection from 127.0.0.50 to the UDP phone's TCP
  listener, an OPTIONS over it; (b) ``tcp_flood``: 300 connections from 127.0.0.1, 2 ms
  apart, every second one closed at once (for ``::`` the same over IPv6 to ``::1``);
  (c) the same flood against a TCP phone (proxy ``sip:127.0.0.2:5090;transport=tcp``)
  and a TLS phone (``transport = "tls"``, proxy ``sips:127.0.0.2:5091``) on
  ``0.0.0.0``.
- Observed: (a) the connection completes and the OPTIONS is answered **403**; the
  phone's ``stats()["tcp"]`` says ``listener_found: False`` with
  ``admitted_sources: 1`` (the admitting filter was made for nobody).  (b) the phone
  process **dies with SIGABRT (rc -6) within about 3 s**, stderr ``TCP listener socket
  not found: connection limits without the gate`` then ``pj_ioqueue_register_sock2:
  Assertion `!pj_list_empty(&ioqueue->free_list)' failed`` (the abort
  ``tcpguard.py``'s budget gate exists to prevent); the same for ``::``.  (c) the TCP phone the
  same; the TLS phone logs ``TLS listener socket not found: strangers may connect to
  it`` at start, then the same assertion, rc -6.  The same 300-connection churn against phones bound to 127.0.0.1
  (UDP, TLS) and ``::1`` leaves them running and answering (controls).
- Code at fault: ``pjsua_hooks/tcpguard.py:145`` (``find_listener`` matches the
  socket's own name against ``(host, port)`` exactly) called with the transport's
  *published* address (``pjsua_hooks/endpoint.py:371-373``: ``localName``, which for a
  wildcard bind is the host's interface address, never ``0.0.0.0``/``::``) at
  ``endpoint.py:417`` and ``:383``; a listener not found is only a warning
  (``endpoint.py:418-419``, ``:384``): the guard runs without its SYN gate (fail open),
  so ``admit_only`` (``phone.py:606``) and the budget gate do nothing.
- Suggested fix: find the listener by the bound address (``tc.boundAddress``: match a
  wildcard socket name, or compare with the address asked for, not the published one),
  and fail closed: a phone whose TCP/TLS listener cannot be gated refuses to start (or
  closes that listener) instead of logging a warning.
- Tests: ``test_k1_a_wildcard_bound_phone_completes_no_strangers_connection``,
  ``test_k1_a_wildcard_bound_phone_survives_a_strangers_tcp_churn[udp-0.0.0.0|udp-::|
  tcp-0.0.0.0|tls-0.0.0.0]`` (strict xfail).

Honest break HB1: a home of more than 8 addresses loses arbitrary ones
------------------------------------------------------------------------

- Who: **nobody**; a phone behind a cluster with a front (``proxy``) and nodes
  (``home_sources``, one per node, as ``make demo-cluster`` writes them), 10 distinct
  addresses in all (front 127.0.0.2 and nodes 127.0.0.11-19); or fewer nodes given by
  names with A and AAAA records (read, not run: each address takes a place).
- Observed: the phone starts without complaint, ``admitted_sources: 8``; an OPTIONS
  over TCP from each home address: 8 answered, 2 got **no connection** (one run:
  127.0.0.13 and 127.0.0.14; another: the front 127.0.0.2 itself and 127.0.0.13).
  Which ones changes from start to start: the list comes from a ``frozenset`` of
  strings (hash-randomised order) and is cut at ``MAX_ADMITTED``.  These are addresses
  ``ProxySource`` holds as the home: their requests would be taken over UDP, while a
  large request (a certificate NOTIFY above 1300 octets, RFC 3261 18.1.1) over TCP never
  gets a connection.
- Code at fault: ``pjsua_hooks/tcpguard.py:210`` (``admit_only`` keeps the first
  ``MAX_ADMITTED`` silently) with ``pjsua_hooks/proxysource.py:79`` (the order: a
  frozenset) and ``pjsua_hooks/phone.py:274-278`` (no bound on ``home_sources``);
  the "at most 8" of ``pjsua_hooks/README.md`` is not enforced anywhere a user sees.
- Suggested fix: refuse such a configuration at load (``ConfigError`` naming the limit
  and counting resolved addresses), or make the filter take every address (a ``JA`` to
  the pass label after each match takes the 255-instruction reach of ``JEQ`` away).
- Test: ``test_hb1_every_home_address_gets_a_connection_in_a_ten_address_cluster``
  (strict xfail).

Controls (unmarked, pass)
-------------------------

- ``test_control_k1_a_phone_bound_to_its_address_survives_the_same_churn[udp|tls|::1]``:
  the same 300-connection churn, phone bound to 127.0.0.1 (UDP, TLS) or ``::1``: alive
  and answering.
- ``test_control_k1_a_phone_bound_to_its_address_admits_the_home_alone``: listener
  found, 1 address admitted, the home's OPTIONS over TCP answered, 127.0.0.50 gets no
  connection (review 134 K4's fix working).
- ``test_control_hb1_an_eight_address_cluster_gets_in_and_a_stranger_does_not``: front
  and 7 nodes: all 8 answered, 127.0.0.50 not.

Tried and held (area 1)
-----------------------

- IPv4-mapped spellings: ``admit_only`` maps ``::ffff:a.b.c.d`` to IPv4 as
  ``ProxySource`` does (``canonical_ip``), so the filter and the request check agree;
  an IPv6 SYN from a v4-mapped source is not taken by Linux's TCP (read); a phone on
  ``::1`` with a home on ``[::2]`` admits by IPv6 source (the ``::1`` control, and
  ``tests/pjsua/test_tcp_guard_admit.py``).
- Accepted-socket filter inheritance: Linux copies the listener's filter into the
  accepted socket at the handshake's end (``sk_clone_lock``), and the handshake's last
  ACK passes the listener's filter first, so an accepted connection carries a filter
  that passes its own peer (the home's address): the home's connection keeps working
  (the controls' OPTIONS answered; read, not further run).
- A home given by name, or a registrar and no outbound proxy: ``ProxySource``
  resolves the name once and the filter takes what it resolved, so filter and request
  check agree (one that does not resolve leaves the gate open, but then no request is
  taken from anyone either).  ``tests/e2e/test_udp_phone_tcp_listener.py`` covers the
  registrar-only case (its probe from the registrar's address is answered).
- The window before ``admit_only``: the listener is open (no filter) from
  ``transportCreate`` to ``admit_only`` in ``start()``, synchronous and without a pump;
  at most the accept queue (backlog 5, 6 connections) fills in it, each refused 403
  and bounded by ``tcp_max_connections`` and the 10 s first-message rule (read, not
  timed: too short to aim at from outside).
- The budget gate: strangers complete no connection, so they cannot push the count to
  48; a UDP phone opens no TCP connection of its own (bound account).
- The phone's own TCP/TLS connections: separate sockets that never pass through the
  listener, so no filter of its applies to them (read; the existing TLS and
  registered-TCP tests were not re-run here).
- A spoofed SYN from the home's address is admitted, its SYN-ACK goes to the real home,
  which resets it: nothing reaches pjsip's accept queue (read).

Not run: a registered TCP phone (``tcp_accept`` false) bound to ``0.0.0.0``; a real
Kamailio cluster with more than 8 nodes.

Fixed (stop 44), K1: ``find_listener`` looks for the socket by the address it was
bound to (``0.0.0.0`` or ``::`` included), not the one pjsip publishes, and a listener
that cannot be gated is an ``EndpointError``: the phone does not start rather than run
without its gate.  HB1: the filter compares every home address (each comparison with
its own ``ret``, one ``ja`` over the IPv6 part), up to ``MAX_ADMITTED`` = 64, and a
home of more is refused at start, never cut short.  On the code before, the K1 and HB1
tests failed (5 phones aborted on pjlib's free-list assertion, 1 stranger connected,
the ten-address cluster lost two nodes); they pass now.
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.stranger import HOST, tcp_flood
from tests.e2e.test_phone_stranger import assert_serving, lab, pki  # noqa: F401 (fixtures)
from tests.e2e.test_udp_phone_tcp_listener import _tcp_request

pytestmark = [pytest.mark.pjsua2]

HOME = "127.0.0.2"            # the outbound proxy's address (nobody listens there)
STRANGER = "127.0.0.50"       # an off-path sender's address
FLOOD = 300                   # connections, every second one closed at once


def _answered(port: int, source: str) -> int | None:
    """The final status an OPTIONS over a fresh TCP connection from ``source`` gets
    (None: no connection completed, or no answer)."""
    answer = _tcp_request(port, "OPTIONS", source=source, timeout=2)
    return None if answer is None else answer.status


def _flood6(port: int, count: int) -> list[socket.socket]:
    """``tcp_flood`` over IPv6 to [::1] (non-blocking connects, every second one closed)."""
    held = []
    for index in range(count):
        sock = socket.socket(socket.AF_INET6)
        sock.setblocking(False)
        try:
            sock.connect(("::1", port))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            sock.close()
            continue
        if index % 2:
            time.sleep(0.002)
            sock.close()
        else:
            held.append(sock)
        time.sleep(0.002)
    return held


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _flood(lab, bob, ipv6: bool = False) -> None:
    # from 127.0.0.1 (or ::1), not the home
    held = _flood6(bob.port, FLOOD) if ipv6 else tcp_flood(bob.port, FLOOD, close_every=2)
    try:
        time.sleep(2.0)
    finally:
        for sock in held:
            sock.close()


# -- hole K1: a phone bound to the wildcard address has no gate at all ------------------

def test_k1_a_wildcard_bound_phone_completes_no_strangers_connection(lab):
    bob = lab.phone(phone={"transport": "udp", "host": "0.0.0.0",
                           "proxy": f"sip:{HOME}:5090"})
    assert _answered(bob.port, HOME) is not None          # the home gets in
    assert _answered(bob.port, STRANGER) is None, bob.status()["tcp"]


@pytest.mark.parametrize("transport,host", [("udp", "0.0.0.0"), ("udp", "::"),
                                            ("tcp", "0.0.0.0"), ("tls", "0.0.0.0")])
def test_k1_a_wildcard_bound_phone_survives_a_strangers_tcp_churn(lab, transport, host):
    if host == "::" and not _ipv6():
        pytest.skip("no IPv6 loopback")
    home = "[::2]" if host == "::" else HOME
    proxy = {"udp": f"sip:{home}:5090", "tcp": f"sip:{home}:5090;transport=tcp",
             "tls": f"sips:{home}:5091"}[transport]
    bob = lab.phone(phone={"transport": transport, "host": host, "proxy": proxy})
    _flood(lab, bob, ipv6=host == "::")
    assert bob.alive, f"the phone died (rc={bob.process.returncode})"
    assert "tcp" in bob.status()              # its loop still answers (the status command)


@pytest.mark.parametrize("transport,host", [("udp", HOST), ("tls", HOST), ("udp", "::1")])
def test_control_k1_a_phone_bound_to_its_address_survives_the_same_churn(lab, transport, host):
    if host == "::1" and not _ipv6():
        pytest.skip("no IPv6 loopback")
    scheme = "sips" if transport == "tls" else "sip"
    home = "[::2]" if host == "::1" else HOME
    bob = lab.phone(phone={"transport": transport, "host": host,
                           "proxy": f"{scheme}:{home}:{5091 if transport == 'tls' else 5090}"})
    _flood(lab, bob, ipv6=host == "::1")
    assert bob.alive, f"the phone died (rc={bob.process.returncode})"
    if transport == "udp" and host == HOST:
        assert_serving(bob, lab.stranger(bob), "after the TCP churn")
    else:
        assert "tcp" in bob.status()          # its loop still answers (the status command)


def test_control_k1_a_phone_bound_to_its_address_admits_the_home_alone(lab):
    bob = lab.phone(phone={"transport": "udp", "host": HOST, "proxy": f"sip:{HOME}:5090"})
    status = bob.status()["tcp"]
    assert status["listener_found"] and status["admitted_sources"] == 1, status
    assert _answered(bob.port, HOME) is not None
    assert _answered(bob.port, STRANGER) is None


# -- honest break HB1: a home of more than MAX_ADMITTED addresses -----------------------

def _cluster(size: int) -> tuple[str, list[str]]:
    """The outbound proxy (a front) and ``size - 1`` nodes' URIs (``home_sources``)."""
    return f"sip:{HOME}:5090", [f"sip:127.0.0.{n}:5070" for n in range(11, 10 + size)]


def _home_answers(lab, size: int) -> tuple[dict[str, int | None], dict]:
    proxy, nodes = _cluster(size)
    bob = lab.phone(phone={"transport": "udp", "proxy": proxy, "home_sources": nodes})
    addresses = [HOME] + [node[4:].rsplit(":", 1)[0] for node in nodes]
    answers = {address: _answered(bob.port, address) for address in addresses}
    return answers, bob.status()["tcp"]


def test_hb1_every_home_address_gets_a_connection_in_a_ten_address_cluster(lab):
    answers, status = _home_answers(lab, 10)
    assert all(status is not None for status in answers.values()), (answers, status)


def test_control_hb1_an_eight_address_cluster_gets_in_and_a_stranger_does_not(lab):
    answers, status = _home_answers(lab, 8)
    assert status["admitted_sources"] == 8, status
    assert all(code is not None for code in answers.values()), answers
    assert _answered(int(lab.phones[0].port), STRANGER) is None
