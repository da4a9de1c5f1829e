"""Review 39: an early dialog's fork slots (``ProxyEngine._fork``, ``admit_fork``) on a
cluster.

Since review 37 a node claims each *replay record* in the shared database before it lets a
body through (``kamailio_app/replay_claims.py``), so a copy sent to two nodes at once
passes one.  ``ClaimedReplayCache.admit_fork`` claims nothing: it asks the node's own
``e2mseen`` alone, and DMQ brings the slot items to the other node only later (and each
write carries the whole item, so the last one wins).  The fork limit (``MAX_FORKS``: the
first dialog keeps the offer's key for its life, the next three for ``EARLY_DIALOG_TTL``,
the rest none) is therefore counted per node.

These tests run the core engines as two nodes would: one shared key cache (the key
records replicated long before the answers came) and, for each node, its own replay table
(``HtableReplayCache`` over its own htable) behind one set of shared claims, with the
answers reaching both nodes within DMQ's delay.  No Kamailio is needed to show it.

``test_hole_*`` xfailed strictly on 8041f1f; ``test_control_*`` pass.

Fixed: ``ClaimedReplayCache.admit_fork`` claims each free slot's name in the shared
database before the node takes it (``HtableReplayCache.admit_fork``'s ``take``), and a
tag already holding a slot is looked for in every slot first (another node's slot may
not have reached this one yet).  While the database is away the node's own slots decide,
as for replay records.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, answer, apply_forward, proxy_engine
from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.keycache import DialogScope, MemoryKeyCache
from e2m_plugins.proxy import LATER_FORK_KEEPER, MAX_FORKS
from e2m_plugins.testpki import init_test_pki
from kamailio_app.replay_claims import ClaimedReplayCache
from kamailio_app.replay_htable import HtableReplayCache
from tests.cluster.test_replay_claims import _Claims
from tests.unit.test_review12 import SDP_VIEW, _invite, _ua

CALL = "forks39@x"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


def _nodes(world, count: int):
    """``count`` cluster nodes: one key cache (replicated), a replay table each, one
    shared claims table."""
    cache, claims = MemoryKeyCache(), _Claims()
    nodes = []
    for _ in range(count):
        node = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=cache)
        node.replay = ClaimedReplayCache(HtableReplayCache(MemoryHtable(), window=300), claims)
        nodes.append(node)
    return nodes, cache


def _bobs_answers(world, spread: list[list[str]]):
    """alice calls bob through node 0; bob (an insider callee: he holds her offer's CEK
    and signs answers of his own, each binding its own To tag) answers her INVITE with one
    signed 200 per tag, sealed under her offer key; ``spread[i]`` are the tags whose 200s
    reach node ``i`` (a stray reply at any node but the one that relayed the INVITE).
    Returns, per tag, the kept copy of alice's key in that dialog (None: none)."""
    nodes, cache = _nodes(world, len(spread))
    alice, bob = _ua(world, "alice", "bob"), _ua(world, "bob", "alice")
    offer = alice.protect(_invite(world, "alice", "bob", CALL)).message
    verdict = nodes[0].inspect(offer)
    assert verdict.action == "forward"
    who = nodes[0].answer_caller(offer, verdict)
    delivered = bob.open(apply_forward(offer, verdict)).message
    for n, tags in enumerate(spread):
        for tag in tags:
            ok = bob.protect(answer(delivered, to_tag=tag))
            assert ok.info.key_reuse                    # under alice's offer key
            assert nodes[n].inspect(ok.message, caller=who if n == 0 else None).seen
    kept = {}
    for tag in (t for tags in spread for t in tags):
        found = [entry for (scope, _), entry in cache._entries.items()
                 if scope == DialogScope(CALL, "a1", tag)]
        kept[tag] = found[0] if found else None
    return kept


def _for_life(kept) -> list[str]:
    """Tags whose dialog keeps alice's key for the dialog's life (her own quota)."""
    return [tag for tag, entry in kept.items()
            if entry is not None and entry.keeper != LATER_FORK_KEEPER]


def _any(kept) -> list[str]:
    return [tag for tag, entry in kept.items() if entry is not None]


def test_control_eight_answers_at_one_node_keep_the_key_in_four_dialogs_one_for_life(world):
    kept = _bobs_answers(world, [[f"t{n}" for n in range(8)]])
    assert _for_life(kept) == ["t0"]
    assert len(_any(kept)) == MAX_FORKS


def test_control_answers_at_the_other_node_after_the_first_are_later_forks_there_too(world):
    """One node only, but the stray replies are the ones that fork: the count holds."""
    kept = _bobs_answers(world, [[], [f"t{n}" for n in range(8)]])
    assert len(_for_life(kept)) == 1 and len(_any(kept)) == MAX_FORKS


def test_hole_answers_sent_to_two_nodes_at_once_double_the_fork_limit(world):
    """Attacker: insider UA (the callee bob, who holds alice's offer CEK and signs 200s
    of his own with any To tag), or an untrusted hop between the callee and the cluster
    with an older sender's 200 (no To tag bound: re-tagged copies).

    Attack: alice calls bob through node A.  Before DMQ has carried anything between the
    nodes (it replicates after the fact, a few ms to 100s of ms), bob sends four signed 200s
    to her INVITE, each with its own To tag and sealed under her offer key, to node A, and
    four more to node B (a stray reply: still read, ``_inspect_response``).

    Effect: each node counts the early dialog's forks in its own ``e2mseen``
    (``ClaimedReplayCache.admit_fork`` asks only ``self.local``), so each gives slot 0 to
    the first tag it saw: alice's key is kept for a dialog's life (12 h, on *her* quota)
    under two dialogs, one of them made up, and under eight dialogs in all where
    ``MAX_FORKS`` promises four.  With N nodes, N dialogs for life and 4N in all, per
    call; the 12 h copies, charged to alice, push her other calls' keys out at her quota
    twice as fast as the threat model's "one per call" accounting says.  Replication
    afterwards does not undo it (the keys are already put; slot items overwrite each
    other, so the nodes may even disagree later on which tag is slot 0).

    Fix: claim a fork slot in the shared database as a replay record is claimed (one
    claim name per early dialog and slot, the first claim wins; while the database is
    away, fall back to the node's table as ``check_and_record`` does), or give slot 0
    (keys for life) only to the tag the node that relayed the INVITE saw first and treat
    a stray reply's dialog as a later fork."""
    kept = _bobs_answers(world, [[f"a{n}" for n in range(4)], [f"b{n}" for n in range(4)]])
    assert len(_for_life(kept)) == 1, f"dialogs keeping alice's key for life: {_for_life(kept)}"
    assert len(_any(kept)) <= MAX_FORKS, f"dialogs keeping alice's key: {_any(kept)}"
