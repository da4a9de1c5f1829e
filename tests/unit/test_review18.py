"""An eighteenth attacker's review (December 2026) of a4bf6cf: keys go only with the
message that kept them (a BYE its own dialog's, and of the early scopes only the names
that dialog held; a failed transaction only ``Verdict.kept``, its request's fresh names).

No attack on the key drops succeeded; these ``test_control_*`` are the flows tried, each
with the attack, which the change holds (see the report of this review for the rest).
The one hole found is in the same failure route, on the dispatcher front's side: see
tests/kamailio/test_review18_wire.py.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import answer, apply_forward, proxy_engine, TRUSTED
from e2m_plugins.keycache import DialogScope, MemoryKeyCache
from e2m_plugins.proxy import EARLY_DIALOG_TTL, message_scope
from e2m_plugins.sip import make_request
from tests.unit.test_review12 import SDP_VIEW, _invite, _ua
from tests.unit.test_review13 import _Clock, _reinvite
from tests.unit.test_review15 import _with_to_tag, world  # noqa: F401 - the fixture

# The hop's copy is re-tagged, which only a body from a sender before ``e2m-sip-to-tag``
# survives (tests/unit/test_to_tag_binding.py): the fork slots still serve those.
pytestmark = pytest.mark.usefixtures("older_senders")

CALL = "r18@x"


def _answered_call(world, clock):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    alice, bob = _ua(world, "alice", "bob"), _ua(world, "bob", "alice")
    offer = alice.protect(_invite(world, "alice", "bob", CALL)).message
    verdict = proxy.inspect(offer)
    assert len(verdict.kept) == 1
    who = proxy.answer_caller(offer, verdict)
    ok = bob.protect(answer(bob.open(apply_forward(offer, verdict)).message, to_tag="b1"))
    assert ok.info.key_reuse
    assert proxy.inspect(ok.message, caller=who).seen
    alice.open(ok.message)
    return proxy, alice, ok, who, verdict


def test_control_a_hops_bye_for_a_retagged_copy_leaves_the_real_dialogs_key(world):
    """Untrusted hop between bob and the proxy (it saw the INVITE's Record-Route token):
    a copy of bob's 200 re-tagged hop1 moves alice's offer key into (r18@x, a1, hop1) as a
    later fork; its BYE for that dialog now takes the early copy of the name too
    (``drop_scope``: names the dialog held).  The real dialog holds its own copy: alice's
    re-INVITE is read once the early copies are gone."""
    clock = _Clock()
    proxy, alice, ok, who, _ = _answered_call(world, clock)
    assert proxy.inspect(_with_to_tag(ok.message, "hop1"), caller=who).seen
    assert len(proxy.cache._by_scope.get(DialogScope(CALL, "a1", "hop1"), ())) == 1
    proxy.end_answered("BYE", 200, CALL, "a1", "hop1")   # its 2xx (review 92)
    assert not proxy.cache._by_scope.get(DialogScope(CALL, "a1"))   # the early copy went
    clock.now += EARLY_DIALOG_TTL + 1
    verdict = _reinvite(world, proxy, alice, "alice", "bob", CALL, "b1", cseq=3)
    assert verdict.action == "forward" and verdict.seen


def test_control_a_third_partys_failed_invite_under_the_same_ids_names_none_of_alices(world):
    """Insider UA (mallory) with alice's Call-ID and tag, after alice's INVITE kept its key:
    her own INVITE (To bob, signed by her) under those ids, and one with alice as To (the
    same pair of AoRs sorted the other way would be needed to name alice's key): neither
    lists a name of alice's in ``Verdict.kept``, so their failures drop nothing of hers."""
    clock = _Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    alice, mallory = _ua(world, "alice", "bob"), _ua(world, "mallory", "bob", "alice")
    offer = alice.protect(_invite(world, "alice", "bob", CALL)).message
    first = proxy.inspect(offer)
    for callee, cseq in (("bob", 5), ("alice", 6)):
        hers = mallory.protect(_invite(world, "mallory", callee, CALL, cseq=cseq)).message
        verdict = proxy.inspect(hers)
        assert verdict.action == "forward"
        assert not set(verdict.kept) & set(first.kept)
        proxy.end_attempt(message_scope(hers), verdict.kept)
    assert proxy.cache.get(message_scope(offer), first.kept[0], count=False) is not None


def test_control_a_bare_bye_with_both_tags_alices_own_tag_ends_nothing(world):
    """The route token admits a request whose To tag is the caller's tag: a BYE with From
    tag a1 and To tag a1 names (r18@x, a1, a1), a dialog no message made, which holds
    none of alice's names: her offer key stays for bob's 200."""
    clock = _Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    alice = _ua(world, "alice", "bob")
    offer = alice.protect(_invite(world, "alice", "bob", CALL)).message
    first = proxy.inspect(offer)
    proxy.end_answered("BYE", 200, CALL, "a1", "a1")   # its 2xx (review 92)
    bye = make_request("BYE", f"sip:alice@{world.domain}", from_uri=world.aor("mallory"),
                       to_uri=world.aor("alice"), call_id=CALL, cseq=9, from_tag="m9",
                       to_tag="a1", body=b"")
    assert proxy.inspect(bye).action == "forward"
    assert proxy.cache.get(message_scope(offer), first.kept[0], count=False) is not None
