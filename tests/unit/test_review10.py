"""A tenth attacker's review (December 2026) of review 9's fix (1256985): an answer's key
is charged to a caller the proxy authenticated for the request
(``ProxyEngine.answer_caller``: digest, or the request body's signature), else to the
one shared group ``unauthenticated:``.

Each ``test_hole_*`` is an attack that succeeded on 1256985; all are fixed and pass
(each failed on the code before its fix); its docstring names the attacker
(docs/threat-model.md), what it got and the fix.  Four holes: digest proves a user
name, while the caller was the From with any of our host names (a quota group per name; its real-Kamailio half, which spellings pass
digest as whom, is tests/kamailio/test_review10_wire.py); a legacy peer's signature
binds no request, so a captured body names him the caller of any new call, and keeps
its key offer again under his quota; and an answer's key counts against no quota of
its responder, so an insider called by 64 users holds the whole cache.  What the
review tried and the code held is in the review's report, not here: existing tests
cover it.
"""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from e2m_lab.flows import SDP_OFFER, TRUSTED, proxy_engine
from e2m_plugins.body import protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.keycache import MemoryKeyCache
from e2m_plugins.proxy import UNAUTHENTICATED_CALLER
from e2m_plugins.sip import make_request
from e2m_plugins.testpki import init_test_pki, issue_user
from tests.unit.test_review9 import (Clock, _plain_call, _signed_answer,
                                     alices_call_with_a_kept_key)

SDP_VIEW = ("INVITE:application/sdp",)
DAVE = "sip:dave@legacy.test"      # a legacy peer (an RFC 3261 S/MIME stack) of another domain


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,),
                         users=("alice", "bob", "carol", "mallory"), key_type="ec")


def _answer_callers(cache: MemoryKeyCache) -> list[str]:
    """The caller of every answer's key the cache holds (``answer:<caller> <responder>``,
    %-quoted: the caller group ``keeper_groups`` charges)."""
    return [unquote(entry.keeper[len("answer:"):].partition(" ")[0])
            for entry in cache._entries.values()
            if entry.keeper and entry.keeper.startswith("answer:")]


def _cache(kind: str, size: int, clock: Clock):
    """The engine's own key cache, or Kamailio's (its records in a stand-in htable,
    swept after every put so the bounds hold at once)."""
    if kind == "memory":
        return MemoryKeyCache(max_entries=size, clock=clock)
    from e2m_lab.memory_htable import MemoryHtable
    from kamailio_app.keycache_htable import HtableKeyCache
    return HtableKeyCache(MemoryHtable(clock), clock=clock, max_entries=size, sweep_every=1)


# -- 1. digest proves a user name, not which of our host names the From writes --------------

def test_hole_one_digest_user_is_a_caller_group_for_every_name_of_ours(world):
    """Insider UA (mallory, a user of ours with a password).  Kamailio's ``auth_check``
    (flag 1) holds the credentials' user name to the From's user part only, and
    ``route_auth`` asks credentials of any From that ``from_ours`` takes as local:
    every ``[kamailio] domains`` entry, the identity host, and every address Kamailio
    takes as itself (its listen IPs).  So ``sip:mallory@example.com``,
    ``sip:mallory@proxy.example.com`` and ``sip:mallory@127.0.0.1`` all pass digest as
    mallory (tests/kamailio/test_review10_wire.py shows it on a real Kamailio), and
    ``answer_caller`` names each From as written (``_keeper`` folds case, ports, a
    trailing dot, but not the host): three caller groups, each with its own 1/8
    quota.  One authenticated user holds k/8 of the cache for k names of ours (a
    cluster node adds its front and its aliases); with the shared
    ``unauthenticated:`` group she fills as a stranger (and ``unsigned:`` where
    ``legacy_unsigned_cbc`` is on), seven names, or fewer with one accomplice, are
    8/8: the global bound then evicts the oldest key of anyone (alice's live call key:
    a 496 round trip, or her later bodies forwarded unread and missing from the
    archive), which 1256985 says a flood of answers never reaches.  Here a cache of 16
    (quota 2, a pair 1): mallory calls as three spellings of herself, carol's
    voicemail and bob's phone answer each call with a key: six keys charged to her.

    Fixed (kamailio_app/kemi.py ``note_caller``, e2m_plugins/proxy.py
    ``answer_caller(..., digest_user=)``): the identity digest proved names the
    caller, not the From: Kamailio passes ``sip:<$au>@<first [kamailio] domain, else
    the realm>``, so every spelling of one user is one caller group, as her signed
    requests already are (their signer must match one certificate SAN).  Here the
    test passes what kemi.py builds; tests/kamailio/test_review10_wire.py shows the
    spellings on a real Kamailio."""
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW,
                         cache=MemoryKeyCache(max_entries=16, clock=Clock()))
    spellings = ("sip:mallory@example.com", "sip:mallory@proxy.example.com",
                 "sip:mallory@127.0.0.1")
    for n, caller in enumerate(spellings):
        for callee in ("carol", "bob"):
            call = _plain_call(world, caller, callee, f"m{n}-{callee}@x", f"m{n}{callee}")
            verdict = proxy.inspect(call)
            assert verdict.action == "forward", f"{verdict.code} {verdict.error}"
            # what kemi.py's note_caller passes when route_auth's auth_check passed
            who = proxy.answer_caller(call, verdict, digest_user=world.aor("mallory"))
            assert proxy.inspect(_signed_answer(world, call, callee, "v"), caller=who).seen

    callers = _answer_callers(proxy.cache)
    assert set(callers) == {world.aor("mallory")}, \
        f"one digest user counts as {len(set(callers))} callers: {sorted(set(callers))}"
    assert len(callers) <= 2, "one digest user holds more than her caller quota"


# -- 2. a legacy peer's signature binds no request ----------------------------------------

def _legacy_call(world, dave, call_id: str, from_tag: str, callee: str, body=None):
    """An INVITE from dave, a ``[policy] legacy_peers`` party: his SDP signed by him and
    sealed for the proxy and the callee, with no SIP context (a legacy stack binds
    none).  ``body``: a body captured before, put in a new request."""
    request = make_request("INVITE", world.aor(callee), from_uri=DAVE, to_uri=world.aor(callee),
                           call_id=call_id, from_tag=from_tag,
                           extra_headers=[("Contact", "<sip:dave@192.0.2.9>")])
    if body is None:
        body, _ = protect_content("application/sdp", SDP_OFFER,
                                  [recipient_for_certificate(world.proxy(TRUSTED).cert),
                                   recipient_for_certificate(world.user(callee).cert)],
                                  signer=(dave.cert, dave.key))
    return with_entity(request, body), body


def test_hole_a_legacy_peers_replayed_signature_names_him_the_caller(world):
    """Insider UA who once took a call from dave, a legacy peer of ours (an RFC 3261
    S/MIME stack: ``[policy] legacy_peers``): here alice, or an untrusted hop on that
    call's path; both hold the body's bytes.  A legacy body needs no signed SIP
    context (``ProxyEngine._context``), so nothing binds dave's signature to the
    request carrying it, and ``_check_replay`` has no context to record: the
    attacker puts dave's captured signed offer into new INVITEs (new Call-IDs, From
    dave, which is not one of our users: no digest asked) to parties that answer with
    a key whatever they get (an insider's own phone, mallory; an IVR).  Each verdict
    shows a "valid" signature by the From, so ``answer_caller`` names dave, and every
    answer's key counts against dave's own caller quota (1/8; a pair 1/64): the sweep
    then drops dave's oldest, his live call's key (its later bodies 496 or forwarded
    unread; the archive misses them).  Before 1256985 any From did this; after it, a
    legacy peer's captured body still does, at no cost.  In a cache of 16 (quota 2)
    dave's real call to alice and two replays answered by carol and mallory took his
    live call's answer key (measured in this review; the test asserts the caller named).

    Fixed (e2m_plugins/proxy.py ``answer_caller``): a body that already signed another
    request proves nothing of this one's From: a signer names the caller only for a
    part whose signed SIP context was checked against this request and recorded
    against replay (``SeenBody.bound``, never set under the legacy exemption).  The
    price: a legacy peer's calls are in the shared group, where a flood of strangers'
    calls turns their answers' keys over (a 496 round trip or an answer unread)."""
    dave = issue_user(world.ca, DAVE, "ec")
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, legacy_peers=(DAVE,),
                         cache=MemoryKeyCache(max_entries=16, clock=Clock()))

    real, captured = _legacy_call(world, dave, "daves-call@x", "d1", "alice")
    verdict = proxy.inspect(real)
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"
    who = proxy.answer_caller(real, verdict)
    assert proxy.inspect(_signed_answer(world, real, "alice", "a1"), caller=who).seen

    named = []
    for n, callee in enumerate(("carol", "mallory")):
        replay, _ = _legacy_call(world, dave, f"replay-{n}@x", f"r{n}", callee, body=captured)
        verdict = proxy.inspect(replay)
        assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"
        who = proxy.answer_caller(replay, verdict)
        named.append(who)
        assert proxy.inspect(_signed_answer(world, replay, callee, "v"), caller=who).seen
    # a body that signed another request is no proof of this one's From
    assert named == [UNAUTHENTICATED_CALLER] * 2, \
        f"a replayed legacy body named its signer as the caller: {named}"


def test_hole_a_legacy_peers_replayed_key_offer_spends_his_own_quota(world):
    """The same capture without any answering party: untrusted hop or a recipient of
    dave's legacy call (as above) replays his signed body that offers a CEKReference
    (a legacy stack that signs may carry RFC 3185's attribute) in new INVITEs with
    new Call-IDs.  ``_keep_keys`` keeps the reference again under each new dialog,
    charged to the signer dave (``keeper()`` for a signed part), so his quota fills
    with copies and the sweep drops his oldest: the live call's key.  In a cache of
    16 (quota 2) two replays took it (measured in this review).

    Fixed (e2m_plugins/proxy.py ``_keep_keys``): a key from a part whose
    signed SIP context was checked against this request is its signer's; any other
    (a legacy part has none to say which request offered it, and reSIProcate offers
    no CEKReference anyway) is kept under the shared ``unsigned:`` keeper."""
    from e2m_plugins.body import new_reference
    dave = issue_user(world.ca, DAVE, "ec")
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, legacy_peers=(DAVE,),
                         cache=MemoryKeyCache(max_entries=16, clock=Clock()))
    captured, _ = protect_content("application/sdp", SDP_OFFER,
                                  [recipient_for_certificate(world.proxy(TRUSTED).cert),
                                   recipient_for_certificate(world.user("alice").cert)],
                                  signer=(dave.cert, dave.key), cek_reference=new_reference())
    first, _ = _legacy_call(world, dave, "daves-call@x", "d1", "alice", body=captured)
    assert proxy.inspect(first).seen
    for n in range(2):
        replay, _ = _legacy_call(world, dave, f"replay-{n}@x", f"r{n}", "alice", body=captured)
        verdict = proxy.inspect(replay)
        assert verdict.action == "reply" or verdict.seen, f"{verdict.code} {verdict.error}"
    charged = [scope.call_id for (scope, _), entry in proxy.cache._entries.items()
               if entry.keeper == DAVE and scope.call_id.startswith("replay-")]
    assert charged == [], f"dave's replayed key offer was kept again, as his: {charged}"


# -- 3. a responder's answers count against no quota of her own -----------------------------

@pytest.mark.parametrize("kind", ["memory", "htable"])
def test_hole_a_much_called_insider_fills_the_cache_with_her_answers(world, kind):
    """Insider UA (mallory) whom many of our users call (a help desk, a shared line):
    ``keeper_groups`` charges an answer's key to the pair (1/64) and to the caller
    (1/8), never to the responder, so she may hold 1/64 of the cache per distinct
    authenticated caller: 64 callers who each call her once in a key's lifetime (12 h)
    let her fill all of it (each call answered by 2xx on many To tags, or a 2xx whose
    body has many signed parts, each offering a fresh key), and the global bound then
    evicts the oldest long-lived key of anyone: alice's call with bob (a 496 round
    trip for her next request under it, or a body forwarded unread and missing from
    the archive).  1256985 took the made-up callers away; real ones still do it.
    Here a cache of 128 (quota 16, a pair 2): 64 users call mallory once each and
    she answers each call on two To tags; alice's re-INVITE under her call's key is
    then answered 496.

    Fixed (e2m_plugins/keycache.py ``keeper_groups``): an answer's key also counts
    against a group of its responder's answers, ``answered:<responder>`` (1/8, apart
    from her own requests' keeper so answering never spends what she sends).  Review
    7 kept the responder out because a flood of calls to an auto-answering party
    would turn over its answers to real calls; since 1256985 every unauthenticated
    caller is one group whose pair with a responder holds 1/64, so strangers can fill
    at most 1/64 of her 1/8, and only authenticated callers (eight of them at 1/64
    each) reach it."""
    from e2m_lab.flows import invite
    clock = Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=_cache(kind, 128, clock))
    alice = alices_call_with_a_kept_key(world, proxy)

    for n in range(64):
        clock.now += 1
        call = _plain_call(world, f"sip:user{n}@example.com", "mallory", f"u{n}@x", f"u{n}")
        verdict = proxy.inspect(call)
        who = proxy.answer_caller(call, verdict, digest_user=f"sip:user{n}@example.com")
        assert who == f"sip:user{n}@example.com"
        for tag in ("m1", "m2"):
            assert proxy.inspect(_signed_answer(world, call, "mallory", tag), caller=who).seen

    clock.now += 1
    again = alice.protect(invite(world, call_id="alices-call@x", cseq=2, to_tag="b1"))
    assert again.info.key_reuse
    verdict = proxy.inspect(again.message)
    assert verdict.action == "forward" and verdict.seen, \
        f"mallory's answers to 64 callers evicted alice's call key: {verdict.code}"
