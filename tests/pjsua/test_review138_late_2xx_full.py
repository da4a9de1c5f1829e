"""Review 138 (attacker's review of d24d457), area 2: the late-2xx table that refuses new
entries when full (``LateAnswers.answer``, review 137 K1's fix).  Set-up as review 137's
module (``tests/pjsua/test_review137_late_2xx_eviction.py``, its helpers): alice's real
phone (``e2m-phone listen``, default settings), a UDP socket as her outbound proxy that
answers as bob's devices, each a ``UAEngine`` with bob's credentials: f1 fails the
INVITEs (486), g1..g6 are the attacker's devices answering late, h1 is an honest fork
answering late (all under alice's offer key, signed by bob).

Hole K2: a callee's late 2xx fill the table; an honest late 2xx is then not answered
-------------------------------------------------------------------------------------

- Attacker: the **callee** (an insider UA's devices: anyone alice calls who can make
  the calls fail and then answer them) or, where the phone does not require E2M, an
  **untrusted hop** on the INVITE's path (it may forge the plaintext 2xx).  It needs
  ``ceil(MAX_LATE / MAX_PER_INVITE)`` = 6 failed INVITEs of alice within 32 s.
- Messages: alice calls bob 6 times, f1 answers each 486 (ACKed); g1..g6 each answer
  each INVITE 200 after the failure (36 late 200s): the first 32 get their ACK and BYE,
  the table is full (``late_2xx`` 32), the last 4 get nothing.  Then alice calls once
  more, f1 answers 486, and device h1 (a fork that answered after the failure, RFC
  3261 16.7: the honest case the late-2xx answers exist for) sends its 200.
- Observed: **no ACK and no BYE** for h1's 200 (3 s waited; the phone's table stays at
  32, ``{'ack': False, 'bye': False, 'byes': 0, 'table': 32}``): the hook drops it and
  nothing is sent.  With the attacker's devices answering one failed call only (6
  entries), the same h1 200 gets its ACK and one BYE (control).
- Cost (read, not timed: ``MAX_AGE`` = 64*T1): for 32 s after the attacker's entries
  were made, every late 2xx to any of alice's failed INVITEs, from anyone, is left
  unanswered: its device retransmits the 200 and keeps a call up for 64*T1 with nobody
  there, then ends it itself (RFC 3261 13.3.1.4), as before stop 43; the proxies keep
  that dialog's keys until then.  The attacker renews it with 6 more failed INVITEs
  per 32 s.  Alice sees nothing (her call had failed anyway); the cost falls on the
  people she called.  The table is one for all peers: nothing in
  ``LateAnswers.answer`` looks at who answered (in this harness both the attacker's and
  the honest devices are bob's, the only peer ``write_ua`` writes; the code does not
  compare the peer, so another callee's fork is treated the same).
- Code at fault: ``pjsua_hooks/late_2xx.py:385`` (``len(self._entries) >=
  self.max_entries``: one table of 32 for every peer and INVITE) with
  ``pjsua_hooks/phone.py:825-834`` (an empty answer: the 2xx is dropped, nothing sent).
- Suggested fix: keep the "never a second BYE" record apart from the full entries: a
  bounded set of the keys answered (Call-ID, CSeq, branch, To tag; a few dozen octets
  each, 32 s, e.g. 1024 of them) so a late 2xx past ``MAX_LATE`` still gets its one ACK
  and BYE (its copies an ACK rebuilt from the copy, never a BYE); or bound entries per
  peer (the failed INVITE's To AoR) so one callee cannot take every place.
- Test: ``test_k2_an_honest_late_200_is_acked_and_ended_while_a_callee_filled_the_table``
  (strict xfail).

Control (unmarked, passes):
``test_control_k2_an_honest_late_200_is_acked_and_ended_beside_one_callees_forks``: the
attacker's 6 devices answer one failed call (6 entries); h1's late 200 to the next
failed call gets an ACK and one BYE, the table holds 7.

Tried and held (area 2): review 137 K1's test (36 late 200s sent twice: 32 answered
once, no copy draws a second BYE) passes on this commit (run as a neighbour); a copy of
a held entry's 2xx draws an ACK only (review 137's control).  Not run: whether a 493
answered to alice's INVITE makes her phone retry it as a new call (up to
``max_retries``), which would give the attacker 3 failed INVITEs per user call; a hop at
a home with ``[auth]`` forging late 2xx to the first, 407-refused INVITE of each call
(where E2M is not required).

Fixed (stop 44), K2: the late-2xx answers keep two things apart: the ``MAX_LATE``
entries holding ACKs for copies (the oldest makes room), and every key answered within
``MAX_AGE`` (``MAX_ANSWERED``), so that making room never lets a copy draw a second
BYE (review 137 K1's hole, which the refusal this module attacked had closed).  The
hole test failed on the code before (the honest 200: no ACK, no BYE) and passes now.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.phones import PhoneProcess
from e2m_plugins.testpki import TestPKI
from pjsua_hooks.late_2xx import MAX_LATE, MAX_PER_INVITE
from tests.pjsua.test_review129_late_2xx_phone import Bob, pki  # noqa: F401 (fixture)
from tests.pjsua.test_review137_late_2xx_eviction import (_byes, _failed_invites, _late_200,
                                                          alice_calling)

pytestmark = [pytest.mark.pjsua2]

FORKS = [f"g{i}" for i in range(1, MAX_PER_INVITE + 1)]     # the attacker's devices
HONEST = "h1"                                               # a fork answering late
CALLS = -(-MAX_LATE // MAX_PER_INVITE)                      # 6 failed INVITEs fill it


@pytest.fixture
def alice_and_bob(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Bob]]:
    with alice_calling(tmp_path, pki, [*FORKS, HONEST]) as pair:
        yield pair


def _flood_table(alice: PhoneProcess, bob: Bob, calls: int) -> int:
    """``calls`` failed INVITEs, each answered late by the 6 attacker devices; returns
    how many of those late 200s got a BYE."""
    answered = 0
    for invite in _failed_invites(alice, bob, calls):
        for tag in FORKS:
            answered += _late_200(bob, invite, tag)[1]
    return answered


def _honest_late_200(alice: PhoneProcess, bob: Bob) -> dict:
    """One more call fails (486 from f1); fork h1 answers it 200 after the failure."""
    (invite,) = _failed_invites(alice, bob, 1)
    mark = len(bob.log)
    _, bye = _late_200(bob, invite, HONEST)
    acks = [m for m in bob.log[mark:] if m.is_request and m.method == "ACK"
            and m.to_tag == HONEST]
    return {"ack": bool(acks), "bye": bye,
            "byes": len(_byes(bob, invite.call_id, HONEST)),
            "table": alice.status()["late_2xx"],
            "counts": alice.status()["late_2xx_counts"]}


def test_k2_an_honest_late_200_is_acked_and_ended_while_a_callee_filled_the_table(
        alice_and_bob):
    alice, bob = alice_and_bob
    # since stop 44 a full table makes room (the evicted keys stay known): every one of
    # the attacker's late 200s is answered too (before: 32, the rest refused)
    assert _flood_table(alice, bob, CALLS) == CALLS * MAX_PER_INVITE
    seen = _honest_late_200(alice, bob)
    assert seen["ack"] and seen["bye"] and seen["byes"] == 1, seen
    assert seen["table"] == MAX_LATE, seen


def test_control_k2_an_honest_late_200_is_acked_and_ended_beside_one_callees_forks(
        alice_and_bob):
    """The same, the attacker's devices answering one failed call only (6 entries)."""
    alice, bob = alice_and_bob
    assert _flood_table(alice, bob, 1) == MAX_PER_INVITE
    seen = _honest_late_200(alice, bob)
    assert seen["ack"] and seen["bye"] and seen["byes"] == 1, seen
    assert seen["table"] == MAX_PER_INVITE + 1, seen
