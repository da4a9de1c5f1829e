"""Review 123 (attacker's review of 487265c), wire: honest break HB1, the loop rule's
retransmission exemption (``kemi._resent``, stop 40's fix of review 119 HB1) misses a
caller whose public address changed, when another proxy is in front of ours.  The
cluster side (where it takes one lost period, not two) is
``tests/cluster/test_review123_front_rebind.py``.

**Honest break HB1: a caller's retransmission from a new NAT port is taken for a loop
pass; behind another proxy the third coming is 482 "Loop Detected".**  No attacker: a
caller on UDP whose answers were lost for some seconds (a radio or NAT outage, review
119's case) and whose NAT gave it a new public port meanwhile (a NAT whose mapping
lapsed or was rebuilt, a phone moving between networks: the usual end of such an
outage).

- Set-up: plain home proxy H with bob registered (a raw UAS answering 200); a plain
  visited/outbound proxy V (``next_hop`` H) where the caller sends.
- Messages: one ``MESSAGE sip:bob@example.com`` with ``Via: SIP/2.0/UDP
  10.11.12.13:5060;rport;branch=...`` (the caller's private address) sent on RFC 3261's
  Timer E schedule (0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5 s), the datagram unchanged; from
  7.5 s on it leaves from another UDP port of the caller's address.
- Observed on 487265c (figures of the first run; the strict xfail held in a second):
  200 to the copies up to 11.5 s, **482 Loop Detected at 15.5 s**
  (the home logs "came back to us unchanged (a loop): refused"); tm ``created``: V 3,
  H 2; bob got the MESSAGE twice (0 and 7.5 s).  The caller is told "Loop Detected" for
  a MESSAGE bob got.
- Why: ``_via_shape`` (``kamailio_app/kemi.py:707-725``) takes the bottom Via entry as
  it arrives at H, and that entry carries the ``rport=<port>`` (and ``received=``) the
  proxy before H wrote into it (RFC 3581; every stateful proxy does it for a Via with
  ``rport``; checked with a raw sink behind the product's visited proxy: the two copies
  left it with ``...;received=127.0.0.64;rport=33419;branch=...`` and ``...;rport=39190;
  ...``).  With the caller's new port the bottom entry differs, so the copy at 7.5
  s is not "sent again" (``_resent``, ``:728-738``) and ``_note_relayed`` counts it as
  a pass (``:763-772``); the copy at 15.5 s is neither (its shape is still not the
  first coming's) and ``passes + 1 >= _MAX_PASSES`` (``:760``, ``_MAX_PASSES = 2`` at
  ``:776``) refuses it.  Behind a cluster's front the second coming is refused already
  (the front's Via is one of the node's names: cluster module).
- Suggested fix: take the bottom entry's sent-by and branch only for the shape (the
  UA's own words), not the parameters a previous hop adds to it (``received``,
  ``rport``'s value); or count resent copies under their own RFC-sized bound (see
  K1 in ``test_review123_loop_resent_wire.py``) rather than exempting by shape.

Controls (unmarked, pass):

- ``test_control_hb1_behind_a_proxy_the_same_port_is_relayed``: the same schedule
  without the new port: 200 to all seven, bob got it three times, no loop line (stop
  40's fix working behind a proxy).
- ``test_control_hb1_a_new_port_straight_to_the_home_is_relayed``: the new port at 7.5
  s, sent straight to H: 200 to all seven (the bottom Via is then the caller's own,
  unchanged).

Tried and held: see the K1 module (``test_review123_loop_resent_wire.py``).

Fixed (stop 41), HB1: the Via shape leaves out the bottom Via's ``received`` and
``rport`` parameters (what the first hop saw, not the sender's words), so a
retransmission from a new NAT port has the first coming's shape.  The hole test failed
on the code before the fix (a ``git stash`` of ``kamailio_app``) and passes with it;
the marker is off.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.kamailio.test_review114_loop_wire import _created, _message, _register
from tests.kamailio.test_review119_loop_wire import LOOP_LOG, TIMER_E, _Uas

pytestmark = [pytest.mark.kamailio]

REBIND_AT = 7.5          # from this copy on, the caller's datagrams come from a new port


def retransmit_rebound(port, raw, schedule, *, source="127.0.0.64", rebind_at=REBIND_AT):
    """Send the one request ``raw`` (``@@VIA@@`` filled once: one Via, one branch) at each
    offset of ``schedule``, as RFC 3261's Timer E has a caller who sees no answer do;
    from ``rebind_at`` on (None: never) from another UDP port of the same address (a
    NAT that gave the caller a new mapping, or a phone that moved), the datagram
    unchanged.  [(offset, status lines read within 0.4 s)]."""
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    first.bind((source, 0))
    later = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    later.bind((source, 0))
    for sock in (first, later):
        sock.settimeout(0.3)
    # the Via the phone wrote (its private address behind the NAT): rport asks for the
    # answers to come to where the datagram came from
    via = f"SIP/2.0/UDP 10.11.12.13:5060;rport;branch=z9hG4bK-r123-{time.monotonic_ns()}"
    raw = raw.replace(b"@@VIA@@", via.encode())
    start, out = time.monotonic(), []
    try:
        for at in schedule:
            sock = later if rebind_at is not None and at >= rebind_at else first
            time.sleep(max(0.0, start + at - time.monotonic()))
            sock.sendto(raw, ("127.0.0.1", port))
            got = []
            end = time.monotonic() + 0.4
            while time.monotonic() < end:
                try:
                    got.append(sock.recvfrom(65535)[0].split(b"\r\n", 1)[0].decode())
                except socket.timeout:
                    break
            out.append((at, got))
    finally:
        first.close()
        later.close()
    return out


@pytest.fixture
def behind(proxy_factory):
    """(visited proxy, home, bob's UAS): bob registered at the home; the visited proxy
    (plain, ``next_hop`` the home) is where the caller sends."""
    home = proxy_factory("r123-home", e2m=False)
    visited = proxy_factory("r123-visited", e2m=False, next_hop=home.uri)
    uas = _Uas()
    bound = _register(home, "bob", "example.com", f"<sip:bob@127.0.0.1:{uas.port}>")
    assert bound is not None and bound.status == 200
    yield visited, home, uas
    uas.close()


def _run(behind, to, n, rebind_at=REBIND_AT):
    visited, home, uas = behind
    port = {"visited": visited.port, "home": home.port}[to]
    mark = home.log_mark()
    before = [_created(x) for x in (visited, home)]
    out = retransmit_rebound(port, _message("bob", n), TIMER_E, rebind_at=rebind_at)
    time.sleep(0.3)
    made = [_created(x) - y for x, y in zip((visited, home), before)]
    log = home.log_since(mark)
    print(f"\nto {to}, rebind at {rebind_at}: answers {out}; created (visited, home) {made}; "
          f"bob got {uas.got}; loop lines at home {log.count(LOOP_LOG)}")
    return [lines[-1] if lines else None for _, lines in out], log


def test_hole_hb1_behind_a_proxy_a_retransmission_from_a_new_port_is_not_a_loop(behind):
    finals, log = _run(behind, "visited", 21)
    assert None not in finals, finals
    assert finals == ["SIP/2.0 200 OK"] * len(TIMER_E), finals
    assert LOOP_LOG not in log


def test_control_hb1_behind_a_proxy_the_same_port_is_relayed(behind):
    finals, log = _run(behind, "visited", 22, rebind_at=None)
    assert finals == ["SIP/2.0 200 OK"] * len(TIMER_E), finals
    assert LOOP_LOG not in log


def test_control_hb1_a_new_port_straight_to_the_home_is_relayed(behind):
    finals, log = _run(behind, "home", 23)
    assert finals == ["SIP/2.0 200 OK"] * len(TIMER_E), finals
    assert LOOP_LOG not in log
