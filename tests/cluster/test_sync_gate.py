"""A restarted cluster node catches up (DMQ sync) before it serves (issue 16).

The attack: node A is down while B takes registrations and keeps replay records;
A comes back and is hammered with requests from the moment its SIP port answers.
Without a gate A answers some of them from the empty state it started with (a 404
for bob, who is registered on B).  With the gate (kamailio_app/sync_gate.py) every
request is answered 503 + Retry-After until A has B's state, then served right.
The cluster and the phones: e2m_lab/cluster.py.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable

import pytest

from e2m_lab.cluster import (REPLICATION, contacts, counters, htable_dump, register_bob,
                             wait_until)
from e2m_plugins.sip import SipMessage, make_request, parse

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

FILLER = 300            # replay records B holds besides bob's registration


def _message(sock: socket.socket) -> SipMessage:
    return make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:dave@example.com",
                        to_uri="sip:bob@example.com", call_id=f"gate-{secrets.token_hex(6)}",
                        from_tag=secrets.token_hex(4),
                        body=b"plain hello", content_type="text/plain")


_BRANCH = re.compile(r"branch=([^;,\s]+)")


def hammer(port: int, seconds: float, build: Callable[[], SipMessage] | None = None,
           done_after: tuple[int, int] = (200, 40),
           interval: float = 0.005) -> list[tuple[float, int]]:
    """Requests (``build()``, default a MESSAGE for bob) to 127.0.0.1:``port``, one
    every ``interval`` s, each a new transaction (its own Via branch), from before the
    node listens until ``done_after`` = (status, n): n answers in a row were that
    status (or ``seconds`` passed).  Returns (time sent, final status) per answered
    one, in the order they were sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    build = build or (lambda: _message(sock))
    wanted, run = done_after
    sent: dict[str, float] = {}
    final: dict[str, int] = {}

    def take(data: bytes) -> None:
        reply = parse(data)
        branch = _BRANCH.search(reply.get("Via") or "")
        if (reply.status or 0) >= 200 and branch and branch.group(1) in sent:
            final.setdefault(branch.group(1), reply.status)

    started = time.monotonic()
    next_send = started
    try:
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            if now >= next_send:
                branch = f"z9hG4bK-{secrets.token_hex(8)}"
                via = f"SIP/2.0/UDP 127.0.0.1:{sock.getsockname()[1]};rport;branch={branch}"
                sent[branch] = now - started
                try:
                    sock.sendto(build().replace("Via", via).serialize(), ("127.0.0.1", port))
                except OSError:
                    pass
                next_send = now + interval
            try:
                take(sock.recv(65535))
            except (BlockingIOError, ConnectionRefusedError):
                time.sleep(0.001)
                continue
            ordered = [final[b] for b in sent if b in final]
            if len(ordered) >= run and all(s == wanted for s in ordered[-run:]):
                break
        time.sleep(0.3)                       # the last ones' answers
        while True:
            try:
                take(sock.recv(65535))
            except (BlockingIOError, ConnectionRefusedError):
                break
    finally:
        sock.close()
    return [(sent[b], final[b]) for b in sent if b in final]


def tally(answered: list[tuple[float, int]]) -> dict[int, int]:
    return dict(sorted(Counter(s for _, s in answered).items()))


def fill_b(b) -> None:
    """State on B made while A is down: bob's registration (the test's witness) and
    FILLER replay records, so B's sync to A is more than one datagram."""
    for i in range(FILLER):
        b.rpc("htable.setxs", "e2mseen", f"filler-{i:04d}-{secrets.token_hex(8)}", "1", "600")


def test_a_restarted_node_answers_nothing_from_state_it_has_not_synced(cluster, bob):
    a, b = cluster.nodes
    a.kill()
    register_bob(b, bob)                                   # only ever made on B
    fill_b(b)
    assert contacts(b, "bob") and len(htable_dump(b, "e2mseen")) >= FILLER
    a.launcher.start()                                     # no wait: hammered from the start
    answered = hammer(a.port, seconds=30)
    statuses = [s for _, s in answered]
    print(f"\nMESSAGEs for bob at the restarted node: {tally(answered)}")
    served_empty = [t for t, s in answered if s == 404]
    first_ok = next((t for t, s in answered if s == 200), None)
    assert not served_empty, f"A answered {len(served_empty)} requests from unsynced state"
    assert set(statuses) <= {503, 200}, sorted(set(statuses))
    assert first_ok is not None and statuses[-1] == 200
    # once it serves, it serves from B's state: nothing 503 after the first 200
    assert all(s == 200 for t, s in answered if t > first_ok + 0.05)
    assert len(htable_dump(a, "e2mseen")) >= FILLER and contacts(a, "bob")
    assert counters(a)["e2m_sync_wait_refused"] == statuses.count(503)


def test_a_node_whose_peer_is_down_serves_after_the_bound_alone(cluster, bob):
    """One part failing must not take the domain down: A restarted while B is dead
    is refused for at most the unreachable bound, then serves what it has alone, and
    says so (log and counter)."""
    a, b = cluster.nodes
    b.kill()
    a.kill()
    mark = a.log_mark()
    probe = make_request("OPTIONS", f"sip:127.0.0.1:{a.port}", from_uri="sip:probe@example.com",
                         to_uri=f"sip:127.0.0.1:{a.port}")
    a.launcher.start()
    answered = hammer(a.port, seconds=20, build=lambda: probe, done_after=(200, 5),
                      interval=0.05)
    first_ok = next((t for t, s in answered if s == 200), None)
    print(f"\nA alone, OPTIONS: {tally(answered)}; serving {first_ok} s after it was started")
    assert {s for _, s in answered} <= {503, 200} and 503 in {s for _, s in answered}
    assert first_ok is not None and 5 < first_ok < 12      # sync_unreachable_after: 6 s
    assert all(s == 200 for t, s in answered if t > first_ok + 0.05)
    assert a.wait_log("serving without their state", mark)
    assert counters(a)["e2m_sync_incomplete"] == 1
    register_bob(a, bob)                                    # and serves
    assert contacts(a, "bob")


def test_a_restarted_node_takes_no_replay_of_a_request_its_peer_saw(cluster, alice, bob):
    """The replay record is state too: alice's INVITE went through B while A was down;
    the same INVITE, octet for octet, sent again and again to A from the moment A
    comes back must never reach bob a second time: 503 while A catches up, then 403
    (a replay), never forwarded (nor 404: bob's registration is B's state too)."""
    a, b = cluster.nodes
    a.kill()
    register_bob(b, bob)
    assert alice.call(b).status == 200
    alice.ack(b)
    fill_b(b)
    invites = len([m for m in bob.received if m.method == "INVITE"])
    a.launcher.start()
    answered = hammer(a.port, seconds=30, build=lambda: alice.last_invite,
                      done_after=(403, 20))
    print(f"\nthe replayed INVITE at the restarted node: {tally(answered)}")
    statuses = {s for _, s in answered}
    assert statuses <= {503, 403}, tally(answered)
    assert 403 in statuses
    time.sleep(0.5)
    assert len([m for m in bob.received if m.method == "INVITE"]) == invites, \
        "a replay reached bob through the restarted node"
    wait_until(lambda: htable_dump(a, "e2mseen"), REPLICATION, "the replay record on A")
