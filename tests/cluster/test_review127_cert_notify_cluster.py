"""Review 127 (attacker's review of d2a6a56), cluster: stop 42's "a node claims only the
subscriptions made at its own Contacts" (``SubscriptionTable.claim_due``/``claim_lapsed``
with ``contacts``, ``CertService._sockets``), on two real Kamailio 5.6 nodes sharing the
certificate service's tables on PostgreSQL (review 123's ``pair`` fixture: DMQ on a
socket of its own at each node, ``[certs] notify_interval = 1``).

**No hole found here.**  Control (unmarked, passes):

- ``test_control_a_change_published_at_b_is_told_by_a``: six followers of bob at node A
  (raw UDP, answering as an e2m-phone does: 200 from A's SIP address and port, 481 from
  anywhere else), then bob's new certificate published at **node B**.  B marks the
  shared rows changed, but only A claims them (they were made at A's Contact): every
  change NOTIFY came from A's SIP port and was answered 200; the rows stay 6 -> 6.
  (The mark is in the shared table, so the node a PUBLISH lands on does not matter.)

Tried and held (reasoning on the code and on review 123's runs):

- A refresh of a follow at A arriving at B (a phone whose next request goes to the
  other node) would have its NOTIFY leave from a socket B picks; but a phone sends
  in-dialog requests to the Contact it was given (A's), and a stranger needs the
  dialog's identifiers and the subscriber's source address (the refresh is refused
  403 from another source), with which an unsubscribe at A already ends the follow.
- Orphaned rows (their node gone for good): another node removes them only
  ``ORPHAN_GRACE`` (600 s) after they lapsed, and until then tells their followers
  nothing; but such a follower takes NOTIFYs only from the gone node, so no node could
  have told it anything.  The late final NOTIFY carries only the AoR's public
  certificate.
"""

from __future__ import annotations

import pytest

from tests.cluster.test_review123_cert_notify_node import (FOLLOWERS, _Follower, _publish,
                                                           _rows, pair)  # noqa: F401
from tests.kamailio.test_review89_wire import bob_der

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio]


def test_control_a_change_published_at_b_is_told_by_a(pair, pki, module_pg_url):  # noqa: F811
    a, b = pair.a, pair.b
    assert _publish(a.port, bob_der(pki)) == 200
    followers = [_Follower(f"127.0.127.{100 + i}", a.port) for i in range(FOLLOWERS)]
    try:
        codes = [f.follow(i) for i, f in enumerate(followers)]
        assert codes == [200] * FOLLOWERS, codes
        before = _rows(module_pg_url)
        assert _publish(b.port, bob_der(pki)) == 200      # replaced, at the other node
        for _ in range(40):                                # ~12 s for the timers
            for f in followers:
                f.listen(0.05)
        after = _rows(module_pg_url)
        changes = [s for f in followers for s in f.seen[1:]]
    finally:
        for f in followers:
            f.close()
    print(f"\nA {a.port}/{a.dmq_port}, B {b.port}/{b.dmq_port}: change NOTIFYs {changes}, "
          f"rows {before} -> {after}")
    assert len(changes) >= FOLLOWERS, changes
    assert set(changes) == {(a.port, 200)}, changes
    assert after == before == FOLLOWERS
