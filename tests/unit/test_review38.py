"""A thirty-eighth attacker's review (December 2026) of ac8ba80: the newest fixes (the
phone's dialog keys settled by the whole CSeq, the cluster's replay claims, the spool's
page-growth weight).

The holes:

- Review 36's fix was narrowed (0fe2814): ``settle`` no longer asks whether a response
  answers a request the phone sent (``_sent_for``), it only compares the whole CSeq.
  A stray response (no transaction: another Via branch, from anyone who learnt the
  dialog's Call-ID and tags; the CSeq number of alice's next re-INVITE is the last one
  plus one) that names the pending re-INVITE's own CSeq (``2 INVITE``) still settles
  its key: a stray failure drops it (bob's 200 under it cannot be opened: the
  re-INVITE times out and the call ends), a stray 200 confirms it (the real 488 then
  leaves it at alice while bob dropped it: 493 at her next re-INVITE).

- ``ClaimedReplayCache.check_and_record`` (the cluster's replay claims, review 37) reads
  its clock before the claim and rests until that time plus ``retry_after``: a claim
  that fails slowly (a frozen database: the 2 s connect or 2.5 s query timeout) leaves
  a rest that has already ended, so the worker asks again at once, at every request,
  waiting its whole timeout each time (the wire twin:
  ``tests/cluster/test_review38_cluster.py``).

``test_hole_*`` xfail strictly on ac8ba80; ``test_control_*`` are the same flows without
the attack (they pass).

Fixed: the engine settles keys only on an answer to a request it sent (``_sent_for``:
its Via branch too), and a failed claim raises the node's flag, which only the timer's
probe lowers (``ClaimedReplayCache.tend``).
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER
from e2m_lab.memory_htable import MemoryHtable
from kamailio_app.archive_spool import ArchiveEvents
from kamailio_app.replay_claims import CLAIMS_COUNTER, ClaimedReplayCache, ClaimsUnavailable
from kamailio_app.replay_htable import HtableReplayCache
from e2m_plugins.sip import make_response
from tests.unit.test_review35 import _call, world  # noqa: F401  (fixture)
from tests.unit.test_review36 import (OK_HEADERS, _alices_next_reinvite_opens_at_bob,
                                      _alices_reinvite, _in_dialog, _opens)


# -- a stray response naming the pending re-INVITE's whole CSeq settles its key ----------

def _stray(world, call_id: str, status: int, reason: str, cseq: int = 2,
           method: str = "INVITE"):
    """A response naming alice's dialog and the CSeq ``cseq method``, answering nothing
    alice sent (its Via branch is a fresh one: pjsip matches no transaction)."""
    request = _in_dialog(world, method, "alice", "bob", call_id, cseq, "a1", "b1")
    return make_response(request, status, reason)


@pytest.mark.parametrize("numbers", [(2,), tuple(range(1, 21))], ids=["exact", "burst 1-20"])
def test_hole_a_stray_481_naming_the_reinvites_cseq_drops_its_key(world, numbers):
    """Attacker: anyone who learnt the dialog's Call-ID and tags (review 36's attacker: a
    hop that relayed one message of the call, a party the call was forwarded from), off
    path: no transaction is needed, only the CSeq number of alice's pending re-INVITE,
    which is the call's last number plus one (here 2).

    Attack: while alice's re-INVITE (CSeq ``2 INVITE``, a fresh key after the call's keys
    aged out) is pending, send alice's phone a 481 naming the dialog and ``2 INVITE``,
    with any Via branch.  ``UAEngine._open`` settles before pjsip matches a transaction,
    and since 0fe2814 ``_settle`` no longer asks ``_sent_for`` whether alice sent the
    request answered: ``DialogKeys.settle`` drops every unconfirmed key whose
    ``offered_in`` is ``(2, "INVITE")``.  Bob got the re-INVITE and kept the key.

    Effect: bob answers 200 with his SDP answer sealed under that key (the newest of the
    dialog, ``reusable``); alice cannot open it (the phone drops it): bob retransmits for
    32 s, the re-INVITE times out, no ACK, pjsip ends the call (review 36's effect,
    with the exact CSeq instead of any).

    Fix: settle only on a response to a request the phone sent (``_sent_for``, the Via
    branch as it left: record it in the transmit hook after the Via is final, or settle
    from pjsip's transaction callback rather than from ``open``); a stray response
    settles nothing, as ``_ends_dialog`` already does.  (The number need not be known:
    a burst of strays for ``1 INVITE`` to ``20 INVITE`` does the same, and the others
    change nothing, since ``_ends_dialog`` ignores answers to nothing we sent.)"""
    call_id = f"r38-stray-481-{len(numbers)}@x"
    clock, alice, bob = _call(world, call_id)
    got = _alices_reinvite(world, alice, bob, call_id)
    for number in numbers:          # the attacker need not know the number: a burst
        alice.open(_stray(world, call_id, 481, "Call/Transaction Does Not Exist", cseq=number))
    ok = bob.protect(make_response(got, 200, "OK", OK_HEADERS, SDP_ANSWER, "application/sdp"))
    assert ok.info.key_reuse                   # under the key alice offered
    assert _opens(alice, ok.message)


def test_control_a_stray_481_naming_another_cseq_leaves_the_key(world):
    """The same stray 481 under another CSeq (``2 OPTIONS``, ``3 INVITE``): settles
    nothing since review 36, and bob's 200 under the re-INVITE's key opens."""
    call_id = "r38-stray-other@x"
    clock, alice, bob = _call(world, call_id)
    got = _alices_reinvite(world, alice, bob, call_id)
    alice.open(_stray(world, call_id, 481, "Call/Transaction Does Not Exist", method="OPTIONS"))
    alice.open(_stray(world, call_id, 481, "Call/Transaction Does Not Exist", cseq=3))
    ok = bob.protect(make_response(got, 200, "OK", OK_HEADERS, SDP_ANSWER, "application/sdp"))
    assert ok.info.key_reuse and _opens(alice, ok.message)


def test_hole_a_stray_200_naming_the_reinvites_cseq_confirms_its_key(world):
    """Attacker: as above (off path, with the dialog's Call-ID and tags).

    Attack: while alice's re-INVITE (``2 INVITE``, fresh key) is pending, send her a
    stray 200 naming ``2 INVITE`` (no body, any Via branch).  ``settle`` confirms the
    key.  Bob then refuses the re-INVITE 488 (or the hop makes it fail: 491): bob drops
    the key (``answered``, review 35), alice keeps it (a failure drops only unconfirmed
    keys).

    Effect: alice's next re-INVITE (hold, resume, a session-timer refresh) goes under a
    key bob does not hold: 493 and a retry every time (review 36's first hole, reached
    with the exact CSeq).

    Fix: as above (settle only answers to requests the phone sent)."""
    call_id = "r38-stray-200@x"
    clock, alice, bob = _call(world, call_id)
    got = _alices_reinvite(world, alice, bob, call_id)
    alice.open(_stray(world, call_id, 200, "OK"))
    alice.open(bob.protect(make_response(got, 488, "Not Acceptable Here")).message)
    assert _alices_next_reinvite_opens_at_bob(world, alice, bob, call_id, 3)


def test_control_without_the_stray_200_the_488_drops_the_key_at_both(world):
    call_id = "r38-488@x"
    clock, alice, bob = _call(world, call_id)
    got = _alices_reinvite(world, alice, bob, call_id)
    alice.open(bob.protect(make_response(got, 488, "Not Acceptable Here")).message)
    assert _alices_next_reinvite_opens_at_bob(world, alice, bob, call_id, 3)


# -- the claims' rest after a failure that took its timeout -------------------------------

class _Monotonic:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now


class _SlowClaims:
    """The shared database as a worker sees it: ``claim`` takes ``delay`` seconds of the
    worker's clock, then fails when ``frozen`` (a timeout) or answers."""

    def __init__(self, clock: _Monotonic, delay: float) -> None:
        self.clock, self.delay = clock, delay
        self.frozen = True
        self.asked = 0
        self.held: set[str] = set()

    def claim(self, name: str, ttl: int) -> bool:
        self.asked += 1
        self.clock.now += self.delay
        if self.frozen:
            raise ClaimsUnavailable("OperationalError")
        if name in self.held:
            return False
        self.held.add(name)
        return True


class _Ctx:
    def __init__(self, key: str) -> None:
        import time
        self.key, self.time = key, time.time()

    def check_time(self, now, window):
        pass

    def replay_key(self, to_tag=None):
        return self.key + (to_tag or "")


def _worker(delay: float):
    clock = _Monotonic()
    claims = _SlowClaims(clock, delay)
    events = ArchiveEvents()
    node = ClaimedReplayCache(HtableReplayCache(MemoryHtable(), window=300), claims,
                              events=events)
    return node, claims, clock, events


def _requests(node, clock, count: int, spacing: float) -> None:
    for n in range(count):
        node.check_and_record(_Ctx(f"k{n}"), None, retransmissions=False)
        clock.now += spacing


def test_hole_a_slow_failure_leaves_no_rest_and_every_request_waits(world):
    """Attacker: nobody (the shared database frozen: every claim fails only after its
    timeout, ``connect_timeout`` 2 s or the query's 2.5 s).

    Attack: five signed requests reach one worker, 0.2 s apart, while the database is
    frozen.

    Effect: ``check_and_record`` takes ``now`` before the claim and, on
    ``ClaimsUnavailable``, sets ``_rest_until = now + retry_after``: 2 s later that
    moment is past, so the next request asks the database again and waits again.  All
    five ask (and each waits 2 s), where the module docstring says "an outage costs one
    timeout per worker" a second, and ``docs/protocol.md`` §10 one per worker and outage.

    Fix: ``_rest_until = self._clock() + self.retry_after`` after the failure (or a rest
    per outage, the probing left to one process)."""
    node, claims, clock, events = _worker(delay=2.0)
    _requests(node, clock, 5, 0.2)
    assert claims.asked == 1, f"{claims.asked} requests waited {claims.delay} s each"


def test_control_a_fast_failure_rests_a_second(world):
    """The same requests while the database refuses at once (down, port closed): the
    first asks, the next four are decided by the node's own table (counted)."""
    node, claims, clock, events = _worker(delay=0.0)
    _requests(node, clock, 5, 0.2)
    assert claims.asked == 1 and events.counts[CLAIMS_COUNTER] == 5


def test_control_a_slow_answer_is_a_claim(world):
    """A database that answers, slowly: every request is claimed, a copy is refused."""
    from e2m_plugins.errors import ReplayError
    node, claims, clock, events = _worker(delay=0.3)
    claims.frozen = False
    _requests(node, clock, 3, 0.2)
    assert claims.asked == 3 and claims.held == {"rk0", "rk1", "rk2"}
    other = ClaimedReplayCache(HtableReplayCache(MemoryHtable(), window=300), claims)
    with pytest.raises(ReplayError, match="another node"):
        other.check_and_record(_Ctx("k1"), None, retransmissions=False)
