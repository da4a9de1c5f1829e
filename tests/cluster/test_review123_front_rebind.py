"""Review 123 (attacker's review of 487265c), cluster: the loop rule's retransmission
exemption (``kemi._resent``) at a node behind a dispatcher front, for a caller whose
address changed.  Module docstring completed below (holes, controls, tried and held)."""

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


@pytest.mark.xfail(strict=True, reason="review 123 hole HB1: a caller's retransmission "
                   "from a new NAT port after the front's transaction ended is 482 at the node")
def test_hole_hb1_a_retransmission_from_a_new_port_through_the_front_is_not_a_loop(cluster):  # noqa: F811
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
