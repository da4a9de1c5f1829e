"""Review 117 (an attacker's review of 4587037), wire: the per-request htables
(``e2mbranch``, ``e2mloop``, ``e2mseen``) under a flood from many source addresses, each
address within the pike limits, on a real Kamailio 5.6.3 E2M proxy.

Hole K1 (``test_hole_k1_branch_notes_from_many_addresses_take_the_shm``): an **off-path
sender** (a stranger: no account, sees nothing but its own answers) with many source
addresses makes the proxy exhaust its shared memory; honest requests then get 500.

- Set-up: one E2M proxy (``proxy_factory``, open registrar, [limits] defaults: pike 30
  requests per 2 s per address), carol registered (a RawUas answering 200), alice a
  ``SipUa`` on her own address.  alice's MESSAGE to carol is delivered (200) first.
- Messages: 600 addresses (127.1.0.1 ...) each send 14 ``OPTIONS sip:nobody@example.com``
  a second (under pike's rate: no address is ever banned, ``e2mban`` stays empty), each
  request with a new RFC 3261 branch, until ``e2mbranch`` stops growing.
- Effect (seen, this 2-core box, the flooder on the same box): the proxy answered about
  6,600 requests a second; every one left an ``e2mbranch`` item of about 206 bytes of shm
  (measured: 7,725 items, +1.59 MB) for 64 s.  With ``shm_mb = 32`` (the smallest the
  config takes) shm was full after about 22 s at 165,127 items (real_used 36.2 MB of
  33.5 MB, "ht_cell_new(): no more shm"); with ``shm_mb = 64`` (the test harness's) after
  about 50 s at 347,489 items (real_used 72.7 MB of 67.1 MB).  In both, alice's MESSAGE
  after the flood got ``500 Server Internal Error`` (``t_newtran(): new_t failed``,
  kemi.py:1150 ``new_transaction``), and the proxy stays so until the items expire
  (64 s after their write, plus htable's timer).  The product default (256 MB) was not
  reached here: it needs about 1.3 million items in 64 s, some 20,000 requests a second,
  three times what this box made; a proxy with more cores (workers) goes faster.
- At fault: ``kamailio_app/kemi.py:624-643`` (``_branch_taken``: ``sht_sets`` of every
  new request's branch, called from ``route_new_transaction`` at ``kemi.py:1292``, before
  authentication and before any verdict, so a request that is answered 404/407/403 at
  once still costs 64 s of shm) and ``kamailio_app/templates/kamailio.cfg.tmpl:167``
  (``e2mbranch=>size=12;autoexpire=64``: an age bound, no count bound; htable has no
  item cap).  pike bounds each address, not their number: the count is bounded only by
  the proxy's throughput times 64 s.  README/threat model: "a stranger ... making a
  proxy lose state / spend unbounded memory".
- Fix (suggested): bound the table by count: keep a shared counter ($shv or a
  ``sht_inc`` per time slot) and stop noting branches past a cap (a share of shm, like
  ``tcp_max_connections``), falling back to tm's own match; or note the branch only for
  a request that is relayed (after ``route_auth`` and the verdict: a stranger's
  challenged or refused request then costs nothing), as ``e2mloop`` does
  (``_note_relayed``, ``kemi.py:1752``); and/or a total request rate (pike on the whole
  proxy, or ``pipelimit``) ahead of every table.

Controls (pass):

- ``test_control_k1_the_same_flood_from_one_address_is_banned``: one address sending as
  fast (over 1,000 OPTIONS in 5 s) is banned by pike after its 30 ("banned for 300 s"),
  ``e2mbranch`` holds at most what pike let in (<= 60), and alice's MESSAGE is delivered.
- The hole test's own first step: alice's MESSAGE before the flood is delivered (200).

Tried and held (this review, run):

- ``e2mban`` under the many-address flood: no address was banned (0 items), so the ban
  table itself cannot be grown by addresses under the rate; a banned one costs one
  item for ban_time (seen in the control).
- ``e2mloop`` under the same flood: 0 items (a stranger's OPTIONS to an unknown user is
  answered, never relayed; the table is written only in ``ksr_branch_route_sips`` as a
  request leaves: ``_note_relayed``).  Filling it needs relayed requests, each also a
  transaction: the same shm, bounded the same way as K1 by throughput, not tried further.
- ``e2mseen``: written only after a body's signature and time checks pass
  (``replay_htable.check_and_record``), so a stranger without a certificate of the CA
  cannot add items; an insider's are bounded by the window (``entry``: the later of now
  and the body's time, plus the window and 32 s), not tried on the wire.

Fixed (stop 39): the branch is noted only as its request is relayed (``_note_branch`` in
``relay``; the door only reads, ``_branch_taken``): the flood's OPTIONS, answered 404
at once, keep nothing.  The hole test failed on the code before the fix and passes with
it (marker removed).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, build_request, make_response
from e2m_lab.kamailio_harness import register_contact

pytestmark = [pytest.mark.kamailio]

SOURCES = 600          # 127.1.x.y, each one a stranger of its own
PER_SOURCE_RATE = 14   # requests per second per address: under pike's 30 per 2 s
FLOOD_LIMIT = 60.0     # seconds at most; the flood stops once shm is full


def _sources(count: int) -> list[socket.socket]:
    socks = []
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.1.{i // 250}.{i % 250 + 1}", 0))
        sock.setblocking(False)
        socks.append(sock)
    return socks


def _flood(proxy, count: int, rate: int, until) -> dict[str, int]:
    """Each of ``count`` addresses sends ``rate`` OPTIONS a second (each a new RFC 3261
    branch: one e2mbranch item for 64 s) until ``until()`` says stop."""
    socks = _sources(count)
    stats = {"sent": 0, "answers": 0}
    try:
        while not until():
            started = time.monotonic()
            for sock in socks:
                try:
                    sock.sendto(build_request("OPTIONS", "sip:nobody@example.com"),
                                ("127.0.0.1", proxy.port))
                    stats["sent"] += 1
                except OSError:
                    pass
                try:
                    while True:
                        sock.recv(65535)
                        stats["answers"] += 1
                except OSError:
                    pass
            left = 1.0 / rate - (time.monotonic() - started)
            if left > 0:
                time.sleep(left)
    finally:
        for sock in socks:
            sock.close()
    return stats


def _answering(uas: RawUas):
    def respond(request):
        return make_response(request, 200, "OK")
    return respond


def _honest_message(proxy, phone: RawUas, text: bytes, source: str) -> int | None:
    ua = SipUa(proxy.port, user="alice", source=source, timeout=3.0)
    try:
        answer = ua.message("carol", text)
    finally:
        ua.close()
    return None if answer is None else answer.status


def _delivered(phone: RawUas, text: bytes) -> bool:
    return any(m.body == text for m in phone.wait_for(1, timeout=2.0, method="MESSAGE"))


def _flood_until_full(proxy, sources: int, stop_at: float) -> dict[str, int]:
    """Flood from ``sources`` addresses until e2mbranch stops growing for 5 s (shm full),
    or FLOOD_LIMIT s; returns the flood's figures with the table's peak."""
    seen = {"items": 0, "still": 0, "deadline": time.monotonic() + stop_at}
    stop = threading.Event()

    def watch():
        while not stop.is_set() and time.monotonic() < seen["deadline"]:
            time.sleep(2.5)
            items = proxy.htable_items("e2mbranch")
            seen["still"] = seen["still"] + 1 if items <= seen["items"] else 0
            seen["items"] = max(seen["items"], items)
            if seen["still"] >= 2:
                break
        stop.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        stats = _flood(proxy, sources, PER_SOURCE_RATE, stop.is_set)
    finally:
        stop.set()
        watcher.join()
    stats["peak_items"] = seen["items"]
    return stats


def _start(proxy_factory, name: str, **settings):
    proxy = proxy_factory(name, e2m=True, **settings)
    phone = RawUas()
    phone.responder = _answering(phone)
    register_contact(proxy, "carol", phone.port, source="127.0.0.71")
    return proxy, phone


def test_hole_k1_branch_notes_from_many_addresses_take_the_shm(proxy_factory):
    proxy, phone = _start(proxy_factory, "k1", extra={"kamailio": {"shm_mb": 32}})
    try:
        assert _honest_message(proxy, phone, b"before the flood", "127.0.0.72") == 200
        assert _delivered(phone, b"before the flood")
        stats = _flood_until_full(proxy, SOURCES, FLOOD_LIMIT)
        shm = proxy.shm()
        print(f"\nK1: {stats}, shm {shm}, bans {proxy.htable_items('e2mban')}")
        assert proxy.htable_items("e2mban") == 0        # nobody was over pike's rate
        # secure: an honest user's MESSAGE still goes through after the flood
        status = _honest_message(proxy, phone, b"after the flood", "127.0.0.73")
        print(f"K1: honest MESSAGE after the flood: {status}")
        assert status == 200 and _delivered(phone, b"after the flood")
    finally:
        phone.close()


def test_control_k1_the_same_flood_from_one_address_is_banned(proxy_factory):
    """Control: one address sending as fast as the many did is banned by pike after its
    30; e2mbranch keeps at most what pike let in and honest users carry on."""
    proxy, phone = _start(proxy_factory, "k1-control", extra={"kamailio": {"shm_mb": 32}})
    try:
        deadline = time.monotonic() + 5.0
        stats = _flood(proxy, 1, 2000, lambda: time.monotonic() > deadline)
        assert stats["sent"] > 1000
        assert proxy.wait_log("banned for 300 s")
        assert proxy.htable_items("e2mbranch") <= 60
        assert _honest_message(proxy, phone, b"after one address", "127.0.0.74") == 200
        assert _delivered(phone, b"after one address")
    finally:
        phone.close()
