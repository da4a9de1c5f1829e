"""A thirteenth attacker's review (December 2026) of the twelfth review's fixes (8179a9a: a
response keeps and moves keys for at most ``MAX_FORKS`` To tags, a moved key counts against
whoever moved it, a stray answer's caller is the unauthenticated group).

Each ``test_hole_*`` is an attack that succeeded on 8179a9a (fixed since: a key an answer
moves stays its offerer's, only an early dialog's first dialog keeps keys for its life, later
forks keep theirs for the early expiry in one shared group ``fork:``); its docstring
names the attacker (docs/threat-model.md), what it gets and a fix.  ``test_control_*`` are
the same flows without the attack: they pass.

1. The moved key's keeper is now the mover.  For an answer that is
   ``answer:<caller> <responder>``, and ``keycache.key_signer`` reads the responder out of
   it: in the confirmed dialog's record the caller's offer key (the one both phones then
   seal the proxy's copy under) counts as the callee's own key.  ``scope_victim`` lets
   go of "the oldest key of whoever holds the most": a callee flooding the shared record
   with keys of his own now turns over the caller's key first, which the eighth review's
   fix promised could not happen ("a party keeps as many of its newest as the flooder
   holds").
1b. The same moved key now counts against the answer pair's small share (1/64 of the
   cache, trimmed first): the callee's answers to the caller's other calls, each offering
   a key of his own, turn it over.
2. The answer pair's quota groups still hold the caller's own group, and a hop's three
   made-up dialogs per response live 12 h (no BYE comes through us).  A hop in front of
   many callees (a visited domain's proxy) spreads them over many pairs, each pair under
   its small share, and fills the caller's own eighth: her calls that never went near
   the hop lose their keys.
3. A stray 200 (a cluster's floating address moved) moves an authenticated caller's
   offer key into the pair of the unauthenticated callers with the responder, which
   strangers' answered calls turn over.

1, 1b and 3 held on 8179a9a^ (the moved key was its offerer's); 2 is what is left of the
twelfth review's first hole.
"""

from __future__ import annotations

import re

import pytest

from e2m_lab.flows import (SDP_ANSWER, SDP_OFFER, TRUSTED, answer, apply_forward, known_proxy,
                           proxy_engine, ua_engine)
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.keycache import MAX_KEYS_PER_SCOPE, MemoryKeyCache
from e2m_plugins.proxy import EARLY_DIALOG_TTL
from e2m_plugins.sip import SipMessage, make_request
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review12 import (NEW_SDP, SDP_VIEW, _answer_offering_a_key, _call, _invite,
                                      _retag, _ua)

CALLEES = tuple(f"u{n}" for n in range(8))


class _Clock:
    """The key cache's clock (monotonic seconds), moved on by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# The attacks re-tag copies of signed bodies, which senders bind no To tag in only before
# ``e2m-sip-to-tag`` (tests/unit/test_to_tag_binding.py): the fork slots still serve them.
pytestmark = pytest.mark.usefixtures("older_senders")

@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,),
                         users=("alice", "bob", "carol", *CALLEES), key_type="ec")


def _reinvite(world, proxy, ua, caller: str, callee: str, call_id: str, to_tag: str,
              cseq: int = 2):
    """``caller``'s re-INVITE in her live call, sealed for the proxy under the key the
    call's 200 left in the dialog: the proxy's verdict."""
    again = ua.protect(_invite(world, caller, callee, call_id, cseq=cseq, to_tag=to_tag,
                               sdp=NEW_SDP))
    assert again.info.key_reuse                    # sealed for the proxy under the call's key
    return proxy.inspect(again.message)


def _reinvite_once_early_copies_are_gone(world, proxy, clock, alice, callee: str, call_id: str,
                                         to_tag: str):
    """alice's re-INVITE in her live call with ``callee`` once the offers' early copies
    are gone (``EARLY_DIALOG_TTL``): only the dialog's own copy of her key can open it."""
    clock.now += EARLY_DIALOG_TTL + 1
    return _reinvite(world, proxy, alice, "alice", callee, call_id, to_tag)


# -- 1. the moved offer key counts as the callee's in the dialog's record ----------------

def _bobs_keys_in_the_call(world, proxy, clock, call_id: str, count: int) -> int:
    """bob's re-INVITEs in the call (From tag b1, To tag a1), each signed by him, sealed
    for the proxy and offering a fresh key of his own (a phone with no reusable key
    offers one).  Returns how many the proxy read."""
    cred = world.user("bob")
    read = 0
    for n in range(count):
        clock.now += 1
        request = make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                               to_uri=world.aor("alice"), call_id=call_id, cseq=10 + n,
                               from_tag="b1", to_tag="a1", body=NEW_SDP,
                               content_type="application/sdp",
                               extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>")])
        entity, _ = protect_content("application/sdp", NEW_SDP,
                                    [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                    signer=(cred.cert, cred.key), cek_reference=new_reference(),
                                    bind_to=request, readers=(TRUSTED,))
        verdict = proxy.inspect(with_entity(request, entity))
        assert verdict.action == "forward", f"{verdict.code} {verdict.error}"
        read += bool(verdict.seen)
    return read


def _alices_reinvite_after_bobs_keys(world, count: int):
    clock = _Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    alice, bob = _ua(world, "alice", "bob"), _ua(world, "bob", "alice")
    _call(world, proxy, alice, bob, "alice", "bob", "flood@x", "b1")
    read = _bobs_keys_in_the_call(world, proxy, clock, "flood@x", count)
    clock.now += EARLY_DIALOG_TTL + 1          # the offer's early copy is gone (200 s)
    return _reinvite(world, proxy, alice, "alice", "bob", "flood@x", "b1"), read


def test_control_alices_reinvite_under_the_calls_key_is_read(world):
    verdict, _ = _alices_reinvite_after_bobs_keys(world, count=0)
    assert verdict.action == "forward" and verdict.seen


def test_hole_the_callees_own_keys_push_the_callers_moved_offer_key_out_of_their_call(world):
    """Insider UA (bob, the callee; no hop).  alice calls bob with a signed offer that offers
    its key; bob's 200 is sealed under it, so ``_spend`` moves it into the confirmed
    dialog (Call-ID, a1, b1).  Since 8179a9a the moved copy's keeper is the mover,
    ``answer_keeper(alice, bob)``, and ``keycache.key_signer`` of that is bob: in the
    record, alice's offer key is one of bob's keys.  bob then sends ``MAX_KEYS_PER_SCOPE``
    re-INVITEs in the call, each signed as himself and offering a fresh key (each a new
    request: no replay).  At the full record ``scope_victim`` counts bob as the holder of
    every key there and lets go of his oldest: alice's offer key.  Her next re-INVITE,
    sealed for the proxy under it (``key_reuse``), is 496 (a round trip per request;
    bob's answers under it go on unread, out of the archive).  On the code before
    8179a9a the moved key was alice's (``kept.keeper``): bob's flood turned over his own
    keys, as the eighth review's fix promised (tests/unit/test_review8.py builds the
    record with the moved offer under alice's name).

    Fix: keep the quota charge on the mover but the holder on the offerer: e.g. give a
    moved key a keeper that ``key_signer`` reads as the offer's signer (store the signer
    apart from the quota keeper), so ``scope_victim`` still counts the caller's offer as
    hers."""
    verdict, read = _alices_reinvite_after_bobs_keys(world, count=MAX_KEYS_PER_SCOPE)
    assert read == MAX_KEYS_PER_SCOPE
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE to bob: {verdict.code} {verdict.error} (after {read} keys of bob's)"


# -- 2. a hop in front of many callees fills the caller's own quota ------------------------

def _alices_reinvite_to_carol_after_calls_through_a_hop(world, copies: int):
    clock = _Clock()
    # quota 16 a keeper, a pair's share 2
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW,
                         cache=MemoryKeyCache(max_entries=128, clock=clock))
    alice = _ua(world, "alice", "bob", "carol", *CALLEES)
    carol = _ua(world, "carol", "alice")
    _call(world, proxy, alice, carol, "alice", "carol", "carol-call@x", "c1")   # her live call
    read = 0
    for n, callee_name in enumerate(CALLEES):
        clock.now += 1
        callee = _ua(world, callee_name, "alice")
        call_id = f"{callee_name}-call@x"
        ok = _call(world, proxy, alice, callee, "alice", callee_name, call_id, f"t{n}",
                   from_tag=f"a{n + 2}")
        for m in range(copies):          # the hop in front of the callees (their domain's)
            read += bool(proxy.inspect(_retag(ok, f"hop{n}x{m}"),
                                       caller=world.aor("alice")).seen)
        if callee_name == CALLEES[-1]:
            break                        # her call with the last one goes on
        bye = make_request("BYE", f"sip:{callee_name}@127.0.0.1:5062",
                           from_uri=world.aor("alice"), to_uri=world.aor(callee_name),
                           call_id=call_id, cseq=2, from_tag=f"a{n + 2}", to_tag=f"t{n}")
        assert proxy.inspect(bye).action == "forward"     # the short call is over
    clock.now += 1
    # alice's next call (a request offering a key), then her re-INVITE to carol
    offer = alice.protect(_invite(world, "alice", "bob", "next-call@x", from_tag="z1")).message
    assert proxy.inspect(offer).action == "forward"
    return _reinvite_once_early_copies_are_gone(world, proxy, clock, alice, "carol", "carol-call@x",
                                                "c1"), read


def test_control_alices_reinvite_to_carol_after_her_calls_to_eight_others_is_read(world):
    verdict, _ = _alices_reinvite_to_carol_after_calls_through_a_hop(world, copies=0)
    assert verdict.action == "forward" and verdict.seen


def test_hole_a_hop_in_front_of_many_callees_fills_the_callers_own_quota(world):
    """Untrusted hop in front of many callees (a visited domain's proxy, an SBC of a
    trunk: every call of alice's to that domain passes it; it does not carry her call with
    carol).  For each of alice's calls there, it sends the proxy three copies of the
    callee's 200 with made-up To tags (and no Record-Route of ours, so alice's ACK and BYE
    for those dialogs go around us): ``MAX_FORKS`` lets the first four To tags move her
    offer key, each into a dialog of 12 h that no BYE of ours ends.  The moved keys count
    against ``answer_keeper(alice, callee)``, whose groups are the pair (a small share),
    ``answered:<callee>`` and alice's own group.  Per callee the pair's share caps them,
    but over eight callees they fill alice's own eighth, and her next keys turn over her
    oldest long-lived one: the key of her live call with carol, which never went near
    the hop.  Here a cache of 128 (quota 16, pair share 2): alice talks with carol, makes
    seven short calls through the hop (each ended by a BYE through us) and an eighth that
    goes on; her next call's offer then evicts the carol call's key, and her re-INVITE to
    carol under it is 496 (carol's answers under it go on unread).  With no hop the
    short calls leave nothing behind (the control).  In a 10,000-key cache that is about
    420 calls through the hop in 12 h (a busy agent's day).  The twelfth review's price
    names only the pair's own calls.

    Fix: a key a response moves (or keeps) under a To tag we have not seen confirmed
    keeps the early lifetime (``EARLY_DIALOG_TTL``) until a request of that dialog (the
    ACK, which comes through our Record-Route) passes us; or the moved key counts
    against the pair and ``answered:<responder>`` only, not the caller's own group."""
    verdict, read = _alices_reinvite_to_carol_after_calls_through_a_hop(world, copies=3)
    assert read >= 2 * len(CALLEES)               # (the last calls' early keys go first)
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE to carol: {verdict.code} {verdict.error} (after {read} copies)"


def _alice_and_bob_at_a_proxy(world):
    """A fake clock, a proxy whose cache holds 512 keys (quota 64 a keeper, a pair's share
    8) and alice's and bob's phones."""
    clock = _Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW,
                         cache=MemoryKeyCache(max_entries=512, clock=clock))
    return clock, proxy, _ua(world, "alice", "bob"), _ua(world, "bob", "alice")


# -- 1b. the moved offer key is in the pair's small share: the callee's answers push it out --

def _alices_reinvite_after_bobs_answers(world, calls: int):
    clock, proxy, alice, bob = _alice_and_bob_at_a_proxy(world)
    _call(world, proxy, alice, bob, "alice", "bob", "live@x", "b1")      # their live call
    kept = 0
    for n in range(calls):        # alice calls bob again; he answers on four To tags
        clock.now += 1
        offer = alice.protect(_invite(world, "alice", "bob", f"again{n}@x",
                                      from_tag=f"z{n}")).message
        verdict = proxy.inspect(offer)
        assert verdict.action == "forward"
        who = proxy.answer_caller(offer, verdict)
        for fork in range(4):
            clock.now += 1
            ok = _answer_offering_a_key(world, offer, "bob", f"f{n}x{fork}")[0]
            kept += bool(proxy.inspect(ok, caller=who).seen)
    return _reinvite_once_early_copies_are_gone(world, proxy, clock, alice, "bob", "live@x",
                                                "b1"), kept


def test_control_alices_reinvite_in_her_live_call_with_bob_is_read(world):
    verdict, _ = _alices_reinvite_after_bobs_answers(world, calls=0)
    assert verdict.action == "forward" and verdict.seen


def test_hole_the_callees_answers_push_the_callers_moved_offer_key_out_of_the_pair(world):
    """Insider UA (bob, the callee; no hop), or a callee's phone answering with keys of its
    own.  alice and bob are in a call; its key (alice's offer, moved into the dialog by
    bob's 200) counts since 8179a9a against ``answer_keeper(alice, bob)``, whose first
    group is the pair's small share (1/64 of the cache, trimmed first).  alice calls bob
    again (here twice); each time he answers on four To tags (``MAX_FORKS``), each 200
    offering a fresh key of his own instead of reusing hers.  Those keys count against the
    same pair, and the pair trims its oldest: the live call's offer key.  alice's next
    re-INVITE in the live call, sealed for the proxy under it, is 496 (bob's answers under
    it go on unread).  Here a cache of 512 (pair share 8): eight answers.  In a 10,000-key
    cache 156 answers: about forty calls from alice, or fewer when his answers carry
    several parts each offering a key.  Before 8179a9a the moved key counted against alice
    alone and bob's answers turned over only his own answers' keys.  The fix suggested for
    the first hole (``key_signer``) does not reach this one.

    Fix: a key the first To tag's 2xx (or the caller's own request) moves stays the
    offerer's (its keeper as before 8179a9a); only a key a further fork's 2xx moves (the
    second to fourth To tag) counts against the answer's pair."""
    verdict, kept = _alices_reinvite_after_bobs_answers(world, calls=2)
    assert kept == 8
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE to bob: {verdict.code} {verdict.error} (after {kept} answers)"


# -- 3. a stray 200's move puts an authenticated call's key among strangers' answers ------

def _alices_reinvite_after_strangers_calls(world, calls: int):
    clock, proxy, alice, bob = _alice_and_bob_at_a_proxy(world)
    offer = alice.protect(_invite(world, "alice", "bob", "failover@x")).message
    verdict = proxy.inspect(offer)                 # node A relays alice's signed offer
    assert verdict.action == "forward" and verdict.seen
    assert proxy.answer_caller(offer, verdict) == world.aor("alice")   # authenticated
    ok = bob.protect(answer(bob.open(apply_forward(offer, verdict)).message, to_tag="b1"))
    assert ok.info.key_reuse
    # node A died; its floating address ([cluster] advertise) now on node B, which has
    # the replicated keys but no transaction: a stray reply, caller None
    assert proxy.inspect(ok.message, caller=None).seen
    alice.open(ok.message)
    for n in range(calls):      # strangers (no digest asked of a foreign From) call bob
        clock.now += 1
        request = make_request("INVITE", f"sip:bob@{world.domain}",
                               from_uri=f"sip:x{n}@evil.test", to_uri=world.aor("bob"),
                               call_id=f"stranger{n}@evil.test", from_tag=f"x{n}",
                               body=SDP_OFFER, content_type="application/sdp",
                               extra_headers=[("Contact", "<sip:x@192.0.2.7>")])
        seen = proxy.inspect(request)              # plaintext: view asks no signature
        assert seen.action == "forward"
        who = proxy.answer_caller(request, seen)
        # bob's phone answers (auto-answer, an IVR), sealing for us under a key it offers
        assert proxy.inspect(_answer_offering_a_key(world, request, "bob", f"s{n}")[0],
                             caller=who).seen
    clock.now += EARLY_DIALOG_TTL + 1          # the offer's early copy is gone (200 s)
    return _reinvite(world, proxy, alice, "alice", "bob", "failover@x", "b1")


def test_control_alices_reinvite_after_a_failover_is_read(world):
    verdict = _alices_reinvite_after_strangers_calls(world, calls=0)
    assert verdict.action == "forward" and verdict.seen


def test_hole_after_a_failover_strangers_calls_push_out_an_authenticated_calls_key(world):
    """Off-path sender (strangers calling bob, whose phone answers by itself or is an IVR),
    in a cluster with a floating address (``[cluster] advertise``).  alice (signed,
    authenticated) calls bob through node A; node A dies, its address moves to node B,
    and bob's 200 (sealed under alice's offer key) reaches node B as a stray reply:
    ``caller`` None.  Since 8179a9a the key it moves into the dialog counts against
    ``answer_keeper(UNAUTHENTICATED_CALLER, bob)``: the pair every stranger's answered
    call to bob shares (1/64 of the cache, trimmed first).  Strangers then call bob from
    made-up foreign Froms (no digest is asked of them, a plaintext offer needs no
    signature) and his answers each offer a key: the pair trims its oldest, alice's call
    key.  Her re-INVITE in the live call is 496 (bob's answers under it go on unread).
    Here a cache of 512: eight calls; 10,000 keys: 156.  Before 8179a9a the moved key
    stayed alice's; the ninth review's price promised strangers' calls turn over "never a
    key of a caller the proxy authenticated".

    Fix: a stray reply moves a key under the offer's own keeper (the offerer, who signed
    and was authenticated for it) and keeps no new key against a group strangers share
    unless the reply was seen first as a fork; or the offer's node replicates the
    caller with the early key (keep it in the key's record) so a stray reply finds it."""
    verdict = _alices_reinvite_after_strangers_calls(world, calls=8)
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE to bob: {verdict.code} {verdict.error}"
