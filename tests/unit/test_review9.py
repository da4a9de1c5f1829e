"""A ninth attacker's review (December 2026) of the eighth review's fixes (39656d0,
73c8564): signer-counted scopes, hashed keepers, the four-record memo, the locked
``drop_scope`` and the branch-only drop on an INVITE's failure response.

Each ``test_hole_*`` is an attack that succeeded on 73c8564.  All four are fixed and
pass: no response and no CANCEL drops a key now (the host's failure route ends a
failed attempt), and an answer's key is charged to a caller the proxy authenticated
(``ProxyEngine.answer_caller``).  Each ``test_held_*`` is an
attack the code refused, kept where nothing else covers it.  The docstring names the attacker
(docs/threat-model.md), what it gets and the fix.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SDP_OFFER, TRUSTED, answer, apply_forward, invite, known_proxy,
                           proxy_engine, ua_engine)
from e2m_plugins.keycache import DialogScope, MemoryKeyCache, scope_key
from e2m_plugins.proxy import EARLY_DIALOG_TTL
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "mallory"),
                         key_type="ec")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _answered(world, call_id: str, clock: Clock):
    """alice calls bob through a proxy that views SDP; bob's 200 is sealed under alice's
    offer key, which the proxy moves to the confirmed dialog's scope (the early copy
    lives ``EARLY_DIALOG_TTL``)."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    offer = alice.protect(invite(world, call_id=call_id)).message
    delivered = bob.open(apply_forward(offer, proxy.inspect(offer))).message
    ok = bob.protect(answer(delivered))
    assert ok.info.key_reuse
    assert proxy.inspect(ok.message, caller=world.aor("alice")).seen
    alice.open(ok.message)
    return alice, bob, proxy


def _proxy_reads_a_reinvite_under_the_calls_key(world, alice, proxy, call_id: str,
                                                  cseq: int, after: str) -> None:
    """alice's next re-INVITE of the call, sealed for the proxy under the call's key:
    the proxy must still read it (``after`` names what came before, for the message)."""
    again = alice.protect(invite(world, call_id=call_id, cseq=cseq, to_tag="b1",
                                 sdp=SDP_OFFER.replace(b"49170", b"49174")))
    assert again.info.key_reuse
    verdict = proxy.inspect(again.message)
    assert verdict.action == "forward" and verdict.seen, \
        f"the call's key went with {after}: {verdict.code} {verdict.error}"


# -- 1. a failure to a re-INVITE is no failure of a branch --------------------------------

def test_hole_a_491_to_a_reinvite_drops_every_key_of_the_confirmed_dialog(world):
    """Insider UA (bob, the callee), or anyone whose failure response to an in-dialog
    INVITE reaches the reply route: an untrusted hop downstream of the proxy, or in a
    cluster a stranger's stray response (``route_stray_reply`` reads a response that
    matches no transaction) naming the call's Call-ID and tags.  39656d0 made an
    INVITE failure drop ``DialogScope(Call-ID, From tag, To tag)`` with
    ``early=False``, meant as "this branch's scope".  For a re-INVITE the response's
    tags ARE the confirmed dialog's: a routine 491 Request Pending (glare) or a 488
    removes every key the call holds (alice's offer key moved there by ``_spend``,
    bob's answer keys).  The call goes on; alice's next re-INVITE under the kept key
    is a 496 round trip and every answer bob seals under it is forwarded unread (a
    response is never refused): bob, an insider, answers one re-INVITE 491 and his
    later bodies escape the archive.  Before 39656d0 the same response dropped only
    the early scope (``confirmed=False``), which the confirmed dialog no longer needs.
    kamailio_app/kemi.py's failure route already skips in-dialog requests (``$tt``).

    Fix (e2m_plugins/proxy.py ``_inspect_response``): a failure response must never
    drop a two-tag scope it cannot tell from a confirmed dialog's.  An ``in_dialog``
    flag from the host (Kamailio ``$T_req($tt)``) covers this hole but not the next
    one; the fix there (1xx keys under the responder's one-tag scope, nothing dropped
    on a failure response) covers both."""
    clock = Clock()
    alice, bob, proxy = _answered(world, "glare@x", clock)
    clock.now += EARLY_DIALOG_TTL + 1          # the call is a few minutes old
    assert proxy.cache.purge_expired() == 1    # the early copy went; the dialog's stays
    assert [scope for scope, _ in proxy.cache._entries] == [DialogScope("glare@x", "a1", "b1")]

    # alice's re-INVITE under the kept key is read; bob answers it 491 (glare)
    reinvite = invite(world, call_id="glare@x", cseq=2, to_tag="b1",
                      sdp=SDP_OFFER.replace(b"49170", b"49172"))
    sent = alice.protect(reinvite)
    assert sent.info.key_reuse
    verdict = proxy.inspect(sent.message)
    assert verdict.action == "forward" and verdict.seen
    delivered = bob.open(apply_forward(sent.message, verdict)).message
    pending = make_response(delivered, 491, "Request Pending")
    assert pending.to_tag == "b1" and pending.from_tag == "a1"
    assert proxy.inspect(pending, caller=world.aor("alice")).action == "forward"

    # the call goes on: alice tries again, still under the call's key
    _proxy_reads_a_reinvite_under_the_calls_key(world, alice, proxy, "glare@x", 3, "the 491")


def test_hole_a_late_487_with_the_answered_tag_drops_the_confirmed_dialog(world):
    """Untrusted hop downstream of the proxy (on bob's side), or in a cluster a stranger
    whose stray response is read (``route_stray_reply``): after bob's 200 confirmed the
    call, a failure response to the SAME INVITE (CSeq 1 INVITE, no To tag in the
    request) carrying the 200's To tag.  tm runs the onreply route for a reply that
    matches the transaction before it decides not to relay it (a final answer was
    already sent), and a stray reply matches nothing and is read anyway.  The engine
    takes it for "one branch failed" and drops ``DialogScope(Call-ID, a1, b1)``: the
    answered dialog's keys.  An ``in_dialog`` flag alone (the first hole's fix) does
    not stop this: the request had no To tag.

    Fix (with the first hole's): drop a branch's two-tag scope only while no 2xx
    confirmed that branch.  Simplest in the engine: a key a provisional (1xx)
    response offers is kept under the responder's one-tag scope
    (``DialogScope(Call-ID, To tag)``, one of the confirmed dialog's ``early_scopes``,
    which ``_keys_for`` already searches and ``_spend`` moves into the dialog on the
    first confirming use) with ``EARLY_DIALOG_TTL``; then a failure response drops
    nothing at all in ``_inspect_response`` (a failed branch's 1xx keys expire in
    200 s; the failure route drops the caller's early scope as now), and no response
    can touch a two-tag scope."""
    clock = Clock()
    alice, bob, proxy = _answered(world, "late@x", clock)
    clock.now += EARLY_DIALOG_TTL + 1
    assert proxy.cache.purge_expired() == 1
    first = invite(world, call_id="late@x")                  # the INVITE as bob got it
    late = make_response(first, 487, "Request Terminated")
    late = late.replace("To", f"{first.get('To')};tag=b1")
    assert late.to_tag == "b1" and late.cseq == (1, "INVITE")
    assert proxy.inspect(late, caller=world.aor("alice")).action == "forward"

    _proxy_reads_a_reinvite_under_the_calls_key(world, alice, proxy, "late@x", 2, "a late 487")


# -- 2. a CANCEL that loses the race to a 200 ------------------------------------------------

def test_hole_a_cancel_crossing_bobs_200_leaves_the_answer_and_the_call_unread(world):
    """Untrusted on-path hop upstream of the proxy (it has the INVITE's Via branch, so
    tm matches its CANCEL), or plain CANCEL/200 glare (RFC 3261 §9.1: the 200 wins).
    ``_inspect_request`` (and kemi.py's ``end_dialog_unread``) drop the early scope as
    soon as a CANCEL passes, before the INVITE's transaction has ended.  When bob
    answered first, his 200 (sealed under alice's offer key) reaches the proxy after the
    CANCEL: it cannot be opened (forwarded unread, the archive misses the answer), and
    with a forged CANCEL the call goes on with no key at the proxy: alice's next
    request under the call's key is a 496 round trip, bob's answers under it unread.
    The early scope only needs to go once the INVITE failed, which tm's failure route
    (``drop_attempt_keys``: "a CANCEL's 487") already does.

    Fix (e2m_plugins/proxy.py ``_inspect_request``, kamailio_app/kemi.py
    ``route_cancel``): a CANCEL drops nothing; the attempt's keys go in the failure
    route (Kamailio) or at ``EARLY_DIALOG_TTL`` (elsewhere).  ``only_ends_dialog``
    then covers BYE alone (a bare CANCEL is forwarded unread with nothing to do)."""
    from e2m_plugins.sip import make_request
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache())
    offer = alice.protect(invite(world, call_id="glare-cancel@x")).message
    delivered = bob.open(apply_forward(offer, proxy.inspect(offer))).message
    ok = bob.protect(answer(delivered))                  # bob answers ...
    assert ok.info.key_reuse
    cancel = make_request("CANCEL", offer.request_uri, from_uri=world.aor("alice"),
                          to_uri=world.aor("bob"), call_id="glare-cancel@x", cseq=1,
                          from_tag="a1")
    assert proxy.inspect(cancel).action == "forward"     # ... as the CANCEL passes
    seen = proxy.inspect(ok.message, caller=world.aor("alice"))
    assert seen.error is None and seen.seen, f"bob's 200 went unread: {seen.error}"



# -- 3. the quota groups of an answer's key (keeper_groups) --------------------------------

def alices_call_with_a_kept_key(world, proxy):
    """alice (digest-authenticated) calls bob through ``proxy``; bob's 200 is sealed under
    her offer's key, which the proxy keeps for the call (``alices-call@x``, To tag b1).
    Returns alice's UA engine, for a later request under that key."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    offer = alice.protect(invite(world, call_id="alices-call@x")).message
    verdict = proxy.inspect(offer)
    caller = proxy.answer_caller(offer, verdict, digest_user=world.aor("alice"))
    ok = bob.protect(answer(bob.open(apply_forward(offer, verdict)).message))
    assert ok.info.key_reuse      # under alice's offer key, which the 200 keeps for the call
    assert proxy.inspect(ok.message, caller=caller).seen
    alice.open(ok.message)
    return alice


def _call_through(proxy, request, *, digest_user: str | None = None) -> str:
    """The request through the proxy, and the caller the host keeps with its transaction
    for the answers (Kamailio: ``$avp(e2m_caller)``, read back in the reply route)."""
    verdict = proxy.inspect(request)
    assert verdict.action == "forward", f"{verdict.code} {verdict.error}"
    return proxy.answer_caller(request, verdict, digest_user=digest_user)


def _signed_answer(world, request, responder: str, to_tag: str):
    """``responder``'s 200 to ``request``: its SDP signed by the responder (context bound
    to the response) and sealed for the proxy with a fresh CEKReference, which the proxy
    keeps.  What an answering party sends to a caller it has no certificate for."""
    from e2m_plugins.body import new_reference, protect_content, with_entity
    from e2m_plugins.cms.recipients import recipient_for_certificate
    from e2m_lab.flows import SDP_ANSWER
    response = answer(request, to_tag=to_tag)
    cred = world.user(responder)
    entity, _ = protect_content("application/sdp", SDP_ANSWER,
                                [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                signer=(cred.cert, cred.key), cek_reference=new_reference(),
                                bind_to=response, readers=(TRUSTED,))
    return with_entity(response, entity)


def _plain_call(world, caller: str, callee: str, call_id: str, from_tag: str):
    """An INVITE with a plaintext SDP offer (no signature: a ``view`` rule asks none)."""
    from e2m_plugins.sip import make_request
    return make_request("INVITE", world.aor(callee), from_uri=caller, to_uri=world.aor(callee),
                        call_id=call_id, from_tag=from_tag, body=SDP_OFFER,
                        content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:caller@192.0.2.7>")])


def _small_cache(kind: str, clock: Clock):
    """A key cache of 16 (a keeper's quota: 2): the engine's own, or Kamailio's (its
    records in a stand-in htable, swept after every put so the bound holds at once)."""
    if kind == "memory":
        return MemoryKeyCache(max_entries=16, clock=clock)
    from e2m_lab.memory_htable import MemoryHtable
    from kamailio_app.keycache_htable import HtableKeyCache
    return HtableKeyCache(MemoryHtable(clock), clock=clock, max_entries=16, sweep_every=1)


@pytest.mark.parametrize("kind", ["memory", "htable"])
def test_hole_one_insider_answering_calls_from_made_up_froms_fills_the_cache(world, kind):
    """Insider UA (mallory), the premise of test_review8's first hole: she calls herself
    from made-up Froms (``sip:xN@evil.test``: no digest is asked of a From that is not
    one of our users, and a plaintext SDP offer needs no signature under a ``view``
    rule) and answers each call signed as herself, offering a key (12 h: a confirmed
    dialog).  ``keeper_groups(answer:<xN> mallory)`` was the pair (1/64) and the
    caller ``xN`` (1/8): both new for every call, and mallory, the one identity the
    proxy authenticated, counted in no group at all.  ``scope_victim`` counts by
    signer inside one scope, but across scopes nothing did: her calls filled the cache,
    and the global bound evicted the oldest long-lived key of anyone: alice's call with
    bob (its later bodies 496 or forwarded unread, the archive misses them).  Here a
    cache of 16 (quota 2): 16 such calls.  In a 10,000-key cache: 10,000 calls of
    hers, each a plain INVITE and a 200.  With no insider at all: an off-path sender
    calling an auto-answering party of ours (voicemail, IVR: test_review7's answerers,
    each 200 with a fresh key) from made-up Froms got the same, as kemi.py's
    ``route_auth`` lets a foreign From reach a local Request-URI unauthenticated.
    Shown through the engine as a host drives it: each request's inspection, the caller
    ``answer_caller`` names for it (Kamailio keeps it in a transaction AVP), and that
    caller passed with the answer.  On 73c8564 the host passed the request's From
    (``$T_req($fu)``), and alice's key went.

    Fix (e2m_plugins/proxy.py ``ProxyEngine.answer_caller``, kamailio_app/kemi.py
    ``note_caller`` and ``_caller``): an answer's caller is named only by an identity
    the proxy authenticated for the request: its digest user (Kamailio: the request
    route passes whether ``auth`` passed, and the transaction carries the answer into
    the reply route in ``$avp(e2m_caller)``) or the AoR that signed its body; a caller
    with neither (a foreign, unauthenticated From) is one shared caller group
    (``UNAUTHENTICATED_CALLER``, as ``UNSIGNED_KEEPER`` is for unsigned bodies), so
    all answers to unauthenticated calls share one 1/8 quota and turn over only each
    other's keys, never a local user's."""
    clock = Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=_small_cache(kind, clock))
    alice = alices_call_with_a_kept_key(world, proxy)

    for n in range(16):
        clock.now += 1
        call = _plain_call(world, f"sip:x{n}@evil.test", "mallory", f"mallory-{n}@x", f"x{n}")
        caller = _call_through(proxy, call)
        assert proxy.inspect(_signed_answer(world, call, "mallory", "m"), caller=caller).seen

    clock.now += 1
    again = alice.protect(invite(world, call_id="alices-call@x", cseq=2, to_tag="b1"))
    assert again.info.key_reuse
    assert proxy.inspect(again.message).seen, \
        "one insider's answers to calls from made-up Froms evicted alice's call key"


def test_an_answers_caller_is_one_the_proxy_authenticated(world):
    """The caller groups ``answer_caller`` gives: a digest-authenticated caller (even with
    a plaintext body) and a caller whose body's signature the proxy checked keep a
    group of their own (test_review7's caller quota holds per caller); the same From
    with neither (where [auth] is off anyone may write it), and a stranger's, are the
    one unauthenticated group; a request relayed unread is named by digest alone."""
    from e2m_plugins.keycache import answer_keeper
    from e2m_plugins.proxy import UNAUTHENTICATED_CALLER
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache())
    alice_aor = world.aor("alice")
    plain = _plain_call(world, alice_aor.upper().replace("SIP:", "sip:"), "bob", "plain@x", "p1")
    assert _call_through(proxy, plain, digest_user=alice_aor) == alice_aor
    assert _call_through(proxy, plain) == UNAUTHENTICATED_CALLER
    stranger = _plain_call(world, "sip:x1@evil.test", "bob", "stranger@x", "s1")
    assert _call_through(proxy, stranger) == UNAUTHENTICATED_CALLER
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    signed = alice.protect(invite(world, call_id="signed@x")).message
    assert _call_through(proxy, signed) == alice_aor
    # one keeper per AoR: the host's case and parameters fold, the user's case does not
    # (user Alice is another account than alice: review 68)
    assert proxy.answer_caller("sip:alice@EXAMPLE.com;transport=udp", None,   # a $fu
                               digest_user="sip:alice@EXAMPLE.com") == alice_aor
    assert proxy.answer_caller("sip:Alice@EXAMPLE.com;transport=udp", None,
                               digest_user="sip:Alice@EXAMPLE.com") == "sip:Alice@example.com"
    assert proxy.answer_caller(alice_aor, None) == UNAUTHENTICATED_CALLER

    # the keys the answers offer: the pair with the authenticated caller, or the shared group
    bob_aor = world.aor("bob")
    for call, caller, tag in ((plain, alice_aor, "b1"),
                              (stranger, UNAUTHENTICATED_CALLER, "b2")):
        assert proxy.inspect(_signed_answer(world, call, "bob", tag), caller=caller).seen
    keepers = {entry.keeper for entry in proxy.cache._entries.values()}
    assert answer_keeper(alice_aor, bob_aor) in keepers
    assert answer_keeper(UNAUTHENTICATED_CALLER, bob_aor) in keepers


# -- 4. what held ------------------------------------------------------------------------------

def test_held_one_long_named_insider_is_one_signer_in_both_keeper_forms_even_flooding_first():
    """Insider UA (mallory) with an AoR of over 64 octets (kept hashed: ``#`` + SHA-256)
    learns the call's tags from a 180 and fills the confirmed dialog's scope BEFORE the
    200: 16 keys of requests she signs (keeper: her AoR, hashed by ``new_entry``) and 16
    answers she signs to INVITEs from made-up Froms (keeper: ``answer:<From>
    %23<hash>``, hashed and %-quoted).  ``key_signer`` unquotes the answer's responder
    to the same ``#<hash>`` as the request keeper, so her 32 keys are one holder: the
    key ``_spend`` moves in for alice and bob's answer key each push out her oldest,
    and 64 more of hers in either form leave both alone.  (Blocking the parties'
    keys instead, ``scope_victim`` returning None, takes 31 distinct signers besides
    alice: 31 certified AoRs, more than one insider.)"""
    from e2m_lab.memory_htable import MemoryHtable
    from e2m_plugins.keycache import MAX_KEYS_PER_SCOPE, answer_keeper, key_signer
    from kamailio_app.keycache_htable import HtableKeyCache
    clock = Clock()
    cache = HtableKeyCache(MemoryHtable(clock), clock=clock, max_entries=10_000)
    dialog = DialogScope("prefilled@x", "a1", "b1")
    mallory = f"sip:{'m' * 80}@evil.test"
    alice, bob = "sip:alice@example.com", "sip:bob@example.com"

    def flood(n: int) -> None:
        clock.now += 1
        keeper = mallory if n % 2 else answer_keeper(f"sip:x{n}@evil.test", mallory)
        cache.put(dialog, b"m%d" % n, bytes(16), keeper=keeper)

    for n in range(MAX_KEYS_PER_SCOPE):
        flood(n)
    kept = cache._live_keys(scope_key(dialog), dialog, clock.now)
    assert len(kept) == MAX_KEYS_PER_SCOPE
    assert len({key_signer(entry.keeper) for entry, _ in kept}) == 1
    clock.now += 1
    cache.put(dialog, b"alice-offer", bytes(16), keeper=alice)
    clock.now += 1
    cache.put(dialog, b"bob-answer", bytes(16), keeper=answer_keeper(alice, bob))
    for n in range(MAX_KEYS_PER_SCOPE, 3 * MAX_KEYS_PER_SCOPE):
        flood(n)
    assert cache.get(dialog, b"alice-offer", count=False) is not None
    assert cache.get(dialog, b"bob-answer", count=False) is not None
    assert len(cache._live_keys(scope_key(dialog), dialog, clock.now)) == MAX_KEYS_PER_SCOPE

