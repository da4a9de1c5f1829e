"""Review 41: fork slots claimed in the cluster's database (``ClaimedReplayCache.admit_fork``,
``HtableReplayCache.admit_fork`` with ``take``), attacked on the core engines as two nodes
run them (the harness of ``test_review39_cluster.py``: one replicated key cache, a replay
table each, one set of shared claims, nothing replicated between the tables yet).

No attack on the new fork-slot claims succeeded within the review's time; these
``test_control_*`` tests are the flows tried, which held.
"""

from __future__ import annotations

from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.proxy import LATER_FORK_KEEPER
from kamailio_app.replay_claims import ClaimedReplayCache
from kamailio_app.replay_htable import HtableReplayCache
from tests.cluster.test_replay_claims import _Claims
from tests.cluster.test_review39_cluster import _any, _bobs_answers, _for_life, world  # noqa: F401


def test_control_a_fresh_copy_of_the_200_at_the_other_node_keeps_the_dialog_for_life(world):
    """The callee's 200 with To tag t0 at node A, and a second protection of it (same tag,
    new body: a stack that re-protects a retransmission, or a failover to node B) at node
    B before DMQ brought A's slot: B finds slot 0 claimed and gives t0 slot 1, but the
    key cache keeps what A put (a kept key is never replaced), so t0 keeps alice's key for
    the dialog's life on her quota, once."""
    kept = _bobs_answers(world, [["t0"], ["t0"]])
    assert _for_life(kept) == ["t0"]
    assert kept["t0"].keeper != LATER_FORK_KEEPER


def test_control_a_fork_at_each_node_is_one_dialog_for_life(world):
    kept = _bobs_answers(world, [["t0"], ["t1"]])
    assert len(_for_life(kept)) == 1 and len(_any(kept)) == 2


def test_control_gaps_never_give_more_than_the_limit_across_nodes():
    """Slots taken out of order at two nodes (gaps in each node's own view) and lookups
    past the gaps: never more than ``limit`` tags in all, each found again wherever it
    was taken."""
    claims = _Claims()
    a = ClaimedReplayCache(HtableReplayCache(MemoryHtable(), window=300), claims)
    b = ClaimedReplayCache(HtableReplayCache(MemoryHtable(), window=300), claims)
    got = {}
    for n, node in enumerate([a, b, b, a, b, a, a, b]):
        got[f"t{n}"] = node.admit_fork("early", f"t{n}", 4)
    admitted = {tag: slot for tag, slot in got.items() if slot is not None}
    assert len(admitted) == 4 and sorted(admitted.values()) == [0, 1, 2, 3]
    for tag, slot in admitted.items():
        owner = a if tag in ("t0", "t3", "t5", "t6") else b
        assert owner.admit_fork("early", tag, 4, claim=False) == slot
