"""``ReplayCache.admit_fork``: how many dialogs one early dialog may grow keys under, the
same in one process (``MemoryReplayCache``) and in Kamailio's shared table
(``HtableReplayCache`` over the stand-in htable)."""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, answer, apply_forward
from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.proxy import EARLY_DIALOG_TTL
from e2m_plugins.replay import MemoryReplayCache
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki
from kamailio_app.replay_htable import HtableReplayCache
from tests.unit.test_review12 import NEW_SDP, _invite
from tests.unit.test_review15 import alices_call_through_a_proxy

WINDOW = 300.0


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _memory(clock: Clock):
    return MemoryReplayCache(window=WINDOW, clock=clock)


def _htable(clock: Clock):
    return HtableReplayCache(MemoryHtable(clock), window=WINDOW, clock=clock)


CACHES = pytest.mark.parametrize("make", [_memory, _htable], ids=["memory", "htable"])


@CACHES
def test_each_tag_keeps_its_slot_and_a_fifth_gets_none(make):
    cache = make(Clock())
    assert [cache.admit_fork("call\na1", tag, 4) for tag in ("b1", "b2", "b1", "b3", "b4")] \
        == [0, 1, 0, 2, 3]
    assert cache.admit_fork("call\na1", "hop", 4) is None
    assert cache.admit_fork("call\na1", "b3", 4) == 2          # still its own
    assert cache.admit_fork("call\na2", "hop", 4) == 0         # another early dialog


@CACHES
def test_slots_are_forgotten_after_the_window_and_a_transaction(make):
    clock = Clock()
    cache = make(clock)
    for tag in ("b1", "b2", "b3", "b4"):
        cache.admit_fork("call\na1", tag, 4)
    clock.now += WINDOW + 10
    assert cache.admit_fork("call\na1", "late", 4) is None     # (the early key is gone by now)
    clock.now += 30
    assert cache.admit_fork("call\na1", "late", 4) == 0


@CACHES
def test_a_lookup_claims_nothing_and_a_body_made_ahead_keeps_its_slot_longer(make):
    clock = Clock()
    cache = make(clock)
    assert cache.admit_fork("call\na1", "b1", 4, claim=False) is None   # nothing claimed
    assert cache.admit_fork("call\na1", "b1", 4, made=clock.now + 250) == 0
    assert cache.admit_fork("call\na1", "b1", 4, claim=False) == 0
    assert cache.admit_fork("call\na1", "hop", 4, claim=False) is None  # looking takes none
    clock.now += WINDOW + 40             # past the window from now, not from the body's time
    assert cache.admit_fork("call\na1", "b1", 4, claim=False) == 0
    clock.now += 250
    assert cache.admit_fork("call\na1", "b1", 4, claim=False) is None


def test_the_memory_table_is_bounded_in_early_dialogs():
    cache = MemoryReplayCache(window=WINDOW, max_entries=8, clock=Clock())
    for n in range(100):
        assert cache.admit_fork(f"call-{n}\na1", "b1", 4) == 0
    assert len(cache._forks) <= 8


# -- at the proxy: early media from one device, the answer from another -------------------

def test_a_183_with_its_own_key_from_one_device_leaves_the_first_dialog_to_the_200(world):
    """A gateway rings with early media (a 183 on its To tag, offering a key of its own)
    and bob's phone answers on another To tag, under alice's offer key.  The dialog the
    200 confirms is the call: alice's key must be kept there for the dialog's life, not
    as a later fork's (200 s), so her re-INVITE after that is still read.  (On ff36fc9 the
    183 took the early dialog's first slot: the re-INVITE was 496.)"""
    clock = Clock()
    proxy, alice, bob, offer, verdict, who = alices_call_through_a_proxy(world, "early-media@x",
                                                                         clock)
    progress = make_response(offer, 183, "Session Progress", [], SDP_ANSWER, "application/sdp")
    progress = progress.replace("To", f"{offer.get('To')};tag=gateway")
    cred = world.user("bob")
    entity, _ = protect_content("application/sdp", SDP_ANSWER,
                                [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                signer=(cred.cert, cred.key), cek_reference=new_reference(),
                                bind_to=progress, readers=(TRUSTED,))
    assert proxy.inspect(with_entity(progress, entity), caller=who).seen
    ok = bob.protect(answer(bob.open(apply_forward(offer, verdict)).message, to_tag="phone"))
    assert ok.info.key_reuse                       # under alice's offer key
    assert proxy.inspect(ok.message, caller=who).seen
    alice.open(ok.message)
    clock.now += EARLY_DIALOG_TTL + 1              # the offer's early copy is gone
    again = alice.protect(_invite(world, "alice", "bob", "early-media@x", cseq=2,
                                  to_tag="phone", sdp=NEW_SDP))
    assert again.info.key_reuse
    verdict = proxy.inspect(again.message)
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"
