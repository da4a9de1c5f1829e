"""Review 120 (December 2026) of bc215c1, on a real Kamailio 5.6 E2M proxy with its
certificate service: SUBSCRIBE fetches (RFC 6072, ``Expires: 0``) from many addresses.

Hole K5 (``test_hole_k5_fetches_from_many_addresses_take_the_shm``): an **off-path
sender** (a stranger: no account; over UDP his addresses may as well be forged) makes
the proxy run out of shared memory with certificate fetches, each address well under
pike's rate; honest requests then get 500.

- Set-up: one E2M proxy (``proxy_factory``, open registrar, [certs] on by default,
  ``shm_mb = 32``: the smallest the config takes, as in review 117), dave registered (a
  RawUas answering 200).  No certificate published (the NOTIFYs are small; a published
  one changes nothing below).
- Messages: 48 addresses (127.3.1.1 ...) each send 10 fetches a second (``SUBSCRIBE
  sip:bob@example.com``, ``Event: certificate``, ``Expires: 0``, 330 octets, new
  Call-ID, tag and branch each), 480 a second for 20 s, and never answer the NOTIFYs;
  alice sends dave a MESSAGE every 4 s.
- Observed (two runs, the same figures): 4 s in, ``real_used`` 33.66 MB of 33.55 MB
  (from 3.27 MB); 1,968 fetches sent, 1,367 answered 200, 553 ``500``; every one of
  alice's 4 MESSAGEs got ``500`` (log: ``build_cell(): could not allocate shared memory``,
  ``new_t(): out of mem``, ``t_newtran(): new_t failed`` at ``kemi.py``
  ``new_transaction <- route_certs``, 4,871 times; ``t_uac_prepare(): short of cell
  shmem`` 165 times).  No address was banned (``e2mban`` 0).  The memory is transient:
  it came back to 3.2 MB 6 s after such a flood stopped (probe run) -- the proxy is
  down for as long as the flood lasts.  About 15 KB of shm per fetch for several
  seconds: a tm server transaction (``route_certs`` -> ``new_transaction``,
  ``kamailio_app/kemi.py:1667-1670``) kept for its wait time after the 200, and the
  NOTIFY's client transaction (``cert_route.CertService._notify`` -> ``t_uac_send``,
  ``kamailio_app/cert_route.py:287-298``), retransmitted to an address that never
  answers until ``fr`` 2.5 s and then kept for its wait.  Nothing bounds the number of
  fetches in flight: a fetch is never stored, so ``max_subscriptions`` and the
  per-source and per-AoR bounds do not count it; pike bounds each address, not their
  number.  README/threat model: "a stranger making a proxy ... spend unbounded memory".
  The product default (256 MB) was not tried: by these figures it needs about 8 times
  the rate (some 3,900 fetches a second), more than this 2-core box made.
- Fix (suggested): a count of NOTIFY transactions in flight (a shared counter, or
  ``tm``'s own ``$T(...)`` stats) past which a fetch is answered ``503`` with
  ``Retry-After`` (no NOTIFY); answer a fetch's SUBSCRIBE statelessly (its 200 needs no
  server transaction: a retransmitted fetch is just another fetch); or a total request
  rate for the service (``pipelimit``) ahead of ``route_certs``.

Control ``test_control_k5_the_same_flood_of_options_leaves_honest_users_served`` (passes):
the same 48 addresses at the same rate, OPTIONS to an unknown user (404 at once):
no ban, no 500, shm flat at 3.27-3.28 MB, every honest MESSAGE 200.  So the rate and
the addresses are within what the proxy takes; the fetch's cost is the difference.

Tried and held (this review, run): long Call-IDs and tags in the fetches (800 and 100
characters): the ``e2mnotify`` table stays at one item whatever the flood (see
``test_review120_notify_branch_wire.py``, hole K2: every NOTIFY is noted under one
empty name), and a NOTIFY past 1,300 octets makes the fetch a held subscription,
counted against the per-source bound (20): ``403 Too Many Subscriptions`` to most.

Fixed (stop 40): ``[certs] max_new_subscriptions_per_second`` (default 100; renamed
``max_subscribes_per_second`` when review 121 had renewals counted too): initial
SUBSCRIBEs, fetches and follows, served per second in all, counted by Kamailio's
``pipelimit`` (one pipe, TAILDROP, 1 s interval) before any transaction is made; past
it, ``503`` with ``Retry-After: 5``, stateless, counted in ``e2m_certs_busy``
(``CertService.admits_new_subscription``).  The hole test failed on the code before the
fix and passes with it.
"""

from __future__ import annotations

import collections
import os
import socket
import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, build_request, make_response
from e2m_lab.kamailio_harness import register_contact

pytestmark = [pytest.mark.kamailio]

SOURCES = 48            # 127.3.x.y: each one a stranger of its own
PER_SOURCE_RATE = 10    # requests a second per address: under pike's 30 per 2 s
FLOOD_SECONDS = 20.0
PROBE_EVERY = 4.0       # an honest MESSAGE every 4 s during the flood


def _fetch(n: int, host: str, port: int) -> bytes:
    """The smallest certificate fetch (RFC 6072: no account needed), new ids each."""
    return (f"SUBSCRIBE sip:bob@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{port};rport;branch=z9hG4bK-f{os.getpid()}-{n}\r\n"
            f"From: <sip:m@elsewhere.example>;tag=t{n}\r\nTo: <sip:bob@example.com>\r\n"
            f"Call-ID: f{os.getpid()}-{n}\r\nCSeq: 1 SUBSCRIBE\r\nMax-Forwards: 70\r\n"
            f"Event: certificate\r\nExpires: 0\r\nContact: <sip:{host}:{port}>\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def _options(n: int, host: str, port: int) -> bytes:
    return build_request("OPTIONS", "sip:nobody@example.com", local_port=port)


def _flood(proxy, dave: RawUas, make) -> tuple[collections.Counter, list]:
    """SOURCES addresses each send PER_SOURCE_RATE requests a second (``make``) and
    never answer the NOTIFYs they get; alice sends dave a MESSAGE every PROBE_EVERY s."""
    socks = []
    for i in range(SOURCES):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.3.{1 + i // 250}.{i % 250 + 1}", 0))
        sock.setblocking(False)
        socks.append(sock)
    stats: collections.Counter = collections.Counter()
    honest = []
    started = last = time.monotonic()
    n = 0
    try:
        while time.monotonic() - started < FLOOD_SECONDS:
            tick = time.monotonic()
            for sock in socks:
                host, port = sock.getsockname()
                n += 1
                sock.sendto(make(n, host, port), ("127.0.0.1", proxy.port))
                stats["sent"] += 1
                try:
                    while True:
                        data = sock.recv(65535)
                        stats[data[:11].decode("ascii", "replace")
                              if data.startswith(b"SIP/2.0") else "NOTIFY"] += 1
                except OSError:
                    pass
            if time.monotonic() - last >= PROBE_EVERY:
                last = time.monotonic()
                ua = SipUa(proxy.port, user="alice", source="127.0.0.72", timeout=2.0)
                try:
                    answer = ua.message("dave", f"probe {len(honest)}".encode())
                finally:
                    ua.close()
                honest.append(None if answer is None else answer.status)
                print(round(last - started), "shm", proxy.shm()["real_used"], dict(stats),
                      honest[-1], flush=True)
            left = 1.0 / PER_SOURCE_RATE - (time.monotonic() - tick)
            if left > 0:
                time.sleep(left)
    finally:
        for sock in socks:
            sock.close()
    return stats, honest


def _start(proxy_factory, name: str):
    proxy = proxy_factory(name, e2m=True, extra={"kamailio": {"shm_mb": 32}})
    dave = RawUas()
    dave.responder = lambda request: make_response(request, 200, "OK")
    register_contact(proxy, "dave", dave.port, source="127.0.0.75")
    return proxy, dave


def test_hole_k5_fetches_from_many_addresses_take_the_shm(proxy_factory):
    proxy, dave = _start(proxy_factory, "k5")
    try:
        stats, honest = _flood(proxy, dave, _fetch)
        print(f"\nK5: {dict(stats)}, honest {honest}, bans {proxy.htable_items('e2mban')}, "
              f"shm {proxy.shm()}")
        assert proxy.htable_items("e2mban") == 0          # nobody over pike's rate
        assert stats["SIP/2.0 200"] > 1000                # the fetches were served
        # secure: honest users are still served during a stranger's fetches
        assert honest == [200] * len(honest)
    finally:
        dave.close()


def test_control_k5_the_same_flood_of_options_leaves_honest_users_served(proxy_factory):
    """Control: the same addresses at the same rate, OPTIONS to an unknown user
    (answered at once, nothing kept): no ban, every honest MESSAGE delivered."""
    proxy, dave = _start(proxy_factory, "k5-control")
    try:
        stats, honest = _flood(proxy, dave, _options)
        print(f"\ncontrol: {dict(stats)}, honest {honest}")
        assert proxy.htable_items("e2mban") == 0
        assert stats["sent"] > 8000 and stats["SIP/2.0 500"] == 0
        assert honest == [200] * len(honest) and len(honest) >= 4
    finally:
        dave.close()
