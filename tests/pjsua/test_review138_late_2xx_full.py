"""Review 138 (attacker's review of d24d457), area 2: the late-2xx table that refuses
new entries when full (``LateAnswers.answer``).  (Docstring: see the end of the
review; written after the runs.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import ua_engine
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.stranger import HOST
from e2m_plugins.testpki import TestPKI
from pjsua_hooks.late_2xx import MAX_LATE, MAX_PER_INVITE
from tests.pjsua.test_review129_late_2xx_phone import Bob, pki  # noqa: F401 (fixture)
from tests.pjsua.test_review137_late_2xx_eviction import _byes, _failed_invites, _late_200

pytestmark = [pytest.mark.pjsua2]

FORKS = [f"g{i}" for i in range(1, MAX_PER_INVITE + 1)]     # the attacker's devices
HONEST = "h1"                                               # a fork answering late
CALLS = -(-MAX_LATE // MAX_PER_INVITE)                      # 6 failed INVITEs fill it


@pytest.fixture
def alice_and_bob(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Bob]]:
    bob = Bob(pki)
    for tag in [*FORKS, HONEST]:
        bob.devices[tag] = ua_engine(pki, "bob", peers=("alice",))
    bob.answer_byes = True
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{bob.port}"})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        yield alice, bob
    finally:
        alice.stop()
        bob.close()


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


@pytest.mark.xfail(strict=True, reason="review 138 hole K2: a callee's 32 late 200s over 6 "
                   "failed calls fill the late-2xx table: another fork's honest late 200 "
                   "then gets no ACK and no BYE for 32 s")
def test_k2_an_honest_late_200_is_acked_and_ended_while_a_callee_filled_the_table(
        alice_and_bob):
    alice, bob = alice_and_bob
    assert _flood_table(alice, bob, CALLS) == MAX_LATE
    seen = _honest_late_200(alice, bob)
    assert seen["ack"] and seen["bye"], seen


def test_control_k2_an_honest_late_200_is_acked_and_ended_beside_one_callees_forks(
        alice_and_bob):
    """The same, the attacker's devices answering one failed call only (6 entries)."""
    alice, bob = alice_and_bob
    assert _flood_table(alice, bob, 1) == MAX_PER_INVITE
    seen = _honest_late_200(alice, bob)
    assert seen["ack"] and seen["bye"] and seen["byes"] == 1, seen
    assert seen["table"] == MAX_PER_INVITE + 1, seen
