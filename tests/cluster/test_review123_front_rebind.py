"""Review 123 (attacker's review of 487265c), cluster: honest break HB1 at a node behind
a dispatcher front, where it takes one lost period.  Two real Kamailio 5.6 nodes on DMQ
and PostgreSQL with ``[cluster] front`` and a real dispatcher front (review 119's
``cluster`` fixture, ``tests/cluster/test_review119_front_retransmit.py``); bob is
``e2m_lab.cluster.Bob`` (200 to a MESSAGE), registered through the front.  The
single-proxy account, the cause and the fix are in
``tests/kamailio/test_review123_rebind_wire.py``.

**Honest break HB1 (cluster): a caller's retransmission from a new NAT port, after the
front's transaction ended, is 482 "Loop Detected" at the node** (stop 40 fixed review
119's HB1 for a caller whose port stayed).

- Messages: ``MESSAGE sip:bob@example.com`` (``Via: SIP/2.0/UDP
  10.11.12.13:5060;rport;...``) to the front at 0, 0.5, 1.5 and 3.5 s from one UDP
  port, then the same datagram at 7.5 s from another port of the same address.
- Observed on 487265c (figures of the first run; the strict xfail held in a second): 200
  to the first four (the front's transaction absorbs them),
  **482 Loop Detected at 7.5 s** from node A ("came back to us unchanged (a loop):
  refused"); tm ``created``: front 2, node A 1, node B 0.  One lost period of ~7 s and
  a new mapping, and the caller is told "Loop Detected" for a MESSAGE bob got.
- Why: the front writes ``rport=<new port>`` into the caller's Via, so the bottom entry
  (``_via_shape``) differs and ``_resent`` is False; ``_came_back`` then asks
  ``_carries_our_via()`` over every entry, and the front's Via on top is one of the
  node's names (``kamailio_app/launcher.py:165-168``): refused at the second coming.

Controls (unmarked, pass):

- ``test_control_the_same_port_through_the_front_is_relayed``: the same five copies
  from one port: 200 to all, node A made 2 transactions, no loop line (stop 40's fix
  live).
- ``test_control_a_new_port_straight_to_a_node_is_relayed``: the new port at 7.5 s sent
  straight to node A: 200 to all.

Fixed (stop 41), HB1: the Via shape leaves out the bottom Via's ``received`` and
``rport`` parameters (what the first hop saw, not the sender's words), so a
retransmission from a new NAT port has the first coming's shape.  The hole test failed
on the code before the fix (a ``git stash`` of ``kamailio_app``) and passes with it;
the marker is off.
"""

from __future__ import annotations

import time

import pytest

from tests.cluster.test_review119_front_retransmit import FRONT_IP, TO_7_5, cluster  # noqa: F401
from tests.kamailio.test_review114_loop_wire import _created, _message
from tests.kamailio.test_review119_loop_wire import LOOP_LOG
from tests.kamailio.test_review123_rebind_wire import REBIND_AT, retransmit_rebound

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

def _run(cluster, to, n, rebind_at=REBIND_AT):  # noqa: F811
    front, a, b, bob = cluster
    target = {"front": front, "a": a}[to]
    marks = [(node, node.log_mark()) for node in (a, b)]
    before = [_created(x) for x in (front, a, b)]
    got_before = getattr(bob, "got", None)
    out = retransmit_rebound(target.port, _message("bob", n), TO_7_5, rebind_at=rebind_at)
    time.sleep(0.3)
    made = [_created(x) - y for x, y in zip((front, a, b), before)]
    logs = "".join(node.log_since(mark) for node, mark in marks)
    print("to", to, "answers", out, "created (front, A, B)", made,
          "loop lines", logs.count(LOOP_LOG), "bob", got_before, getattr(bob, "got", None))
    return [lines[-1] if lines else None for _, lines in out], logs


def test_hole_hb1_a_retransmission_from_a_new_port_through_the_front_is_not_a_loop(
        cluster):  # noqa: F811
    finals, logs = _run(cluster, "front", 11)
    assert None not in finals, finals
    # secure: the same request sent again is answered as such, not as a loop
    assert finals == ["SIP/2.0 200 OK"] * len(TO_7_5), finals
    assert LOOP_LOG not in logs


def test_control_the_same_port_through_the_front_is_relayed(cluster):  # noqa: F811
    finals, logs = _run(cluster, "front", 12, rebind_at=None)
    assert finals == ["SIP/2.0 200 OK"] * len(TO_7_5), finals
    assert LOOP_LOG not in logs


def test_control_a_new_port_straight_to_a_node_is_relayed(cluster):  # noqa: F811
    finals, logs = _run(cluster, "a", 13)
    assert finals == ["SIP/2.0 200 OK"] * len(TO_7_5), finals
    assert LOOP_LOG not in logs
