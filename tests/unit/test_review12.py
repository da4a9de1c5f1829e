"""A twelfth attacker's review (December 2026) of the eleventh review's fixes (155a6c9: each
fork's 2xx its own first sighting, ``over_quota`` narrowest first, the linear log pump) and
of the answer's caller (1256985, 9ba8e7e: ``ProxyEngine.answer_caller``).

Each ``test_hole_*`` is an attack that succeeded on 155a6c9 (fixed in 8179a9a: a response
keeps and moves keys for at most four To tags, a moved key counts against whoever moved it,
a stray answer's caller is the unauthenticated group); its docstring names the attacker (docs/threat-model.md), what it gets and a fix.  One root:
the signed SIP context binds no To tag, so since 155a6c9 every re-tagged copy of a 2xx is
a new message, and a response keeps (``_keep_keys``) and moves (``_spend``) keys into the
dialog its To tag names, however many tags one answer comes with.  An untrusted hop
between the callee and the proxy (it sees the 200 and the proxy's Via branch) sends
the proxy copies of the callee's signed 200 with made-up To tags (and without the
proxy's Record-Route, so the ACK and BYE the caller's phone may send for each extra
dialog go straight to a Contact the hop wrote: the proxy never sees a BYE that would
end them).  Each copy is read, and:

1. moves the caller's offer key into a made-up dialog (12 h), counted against the
   caller's own quota alone: her next offer evicts her live call's key;
2. keeps the answer's fresh key under a made-up dialog in the pair's 1/64 share: the
   pair turns over its oldest, the real dialog's key;
3. in a cluster, sent to a node without the transaction (a stray reply), keeps it
   against the responder's own quota: his own calls' keys go.

1b. The callee needs no hop for the first: he holds the offer's CEK, and his requests
   with made-up From tags (To tag: the caller's) move her key the same way.

``test_control_*`` are the same flows without the hop: they pass.
"""

from __future__ import annotations

import re

import pytest

from e2m_lab.flows import (SDP_ANSWER, SDP_OFFER, TRUSTED, answer, apply_forward, known_proxy,
                           proxy_engine, ua_engine)
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate, reuse_kek
from e2m_plugins.keycache import DialogScope, MemoryKeyCache
from e2m_plugins.proxy import kept_name
from e2m_plugins.sip import SipMessage, make_request
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)
NEW_SDP = SDP_OFFER.replace(b"49170", b"49174")


# The attacks re-tag copies of signed bodies, which senders bind no To tag in only before
# ``e2m-sip-to-tag`` (tests/unit/test_to_tag_binding.py): the fork slots still serve them.
pytestmark = pytest.mark.usefixtures("older_senders")

@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="ec")


def _invite(world, caller: str, callee: str, call_id: str, *, from_tag: str = "a1",
            cseq: int = 1, to_tag: str | None = None, sdp: bytes = SDP_OFFER) -> SipMessage:
    return make_request("INVITE", f"sip:{callee}@{world.domain}", from_uri=world.aor(caller),
                        to_uri=world.aor(callee), call_id=call_id, cseq=cseq,
                        from_tag=from_tag, to_tag=to_tag, body=sdp,
                        content_type="application/sdp",
                        extra_headers=[("Contact", f"<sip:{caller}@127.0.0.1:5061>")])


def _retag(response: SipMessage, tag: str) -> SipMessage:
    """What the hop sends: the callee's signed 200 as it is, with another To tag (the
    signed SIP context binds none)."""
    return response.replace("To", re.sub(r";tag=[^;>\s]*", f";tag={tag}", response.get("To")))


def _ua(world, name: str, *peers: str):
    return ua_engine(world, name, peers=(name, *peers),
                     proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))


def _call(world, proxy, caller, callee, caller_name: str, callee_name: str, call_id: str,
          to_tag: str, from_tag: str = "a1") -> SipMessage:
    """``caller`` (signed, offering a key) calls ``callee`` through ``proxy``; the callee's
    200 is sealed under the offer's key, which the proxy moves to the confirmed dialog.
    Returns the 200 as the proxy read it."""
    offer = caller.protect(_invite(world, caller_name, callee_name, call_id,
                                   from_tag=from_tag)).message
    verdict = proxy.inspect(offer)
    assert verdict.action == "forward", f"{verdict.code} {verdict.error}"
    who = proxy.answer_caller(offer, verdict)
    ok = callee.protect(answer(callee.open(apply_forward(offer, verdict)).message,
                               to_tag=to_tag))
    assert ok.info.key_reuse                       # under the caller's offer key
    assert proxy.inspect(ok.message, caller=who).seen
    caller.open(ok.message)
    return ok.message


def _reinvite_in_live_call(world, proxy, ua, caller: str, callee: str, call_id: str):
    """``caller``'s re-INVITE in her live call with ``callee`` (its To tag c1), sealed for
    the proxy under the key the call's 200 left in the dialog: the proxy's verdict."""
    again = ua.protect(_invite(world, caller, callee, call_id, cseq=2, to_tag="c1",
                               sdp=NEW_SDP))
    assert again.info.key_reuse                    # sealed for the proxy under the call's key
    return proxy.inspect(again.message)


def _alices_next_call_then_her_reinvite_to_carol(world, proxy, alice):
    """alice's next call (any request of hers that offers a key: it may evict her oldest),
    then her re-INVITE in her live call with carol: the proxy's verdict on it."""
    offer = alice.protect(_invite(world, "alice", "bob", "next-call@x", from_tag="a3")).message
    assert proxy.inspect(offer).action == "forward"
    return _reinvite_in_live_call(world, proxy, alice, "alice", "carol", "carol-call@x")


# -- 1. re-tagged copies move the caller's offer key into made-up dialogs, on her quota ----

def _alices_reinvite_after_a_hop(world, copies: int):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW,
                         cache=MemoryKeyCache(max_entries=64))       # a keeper's quota: 8
    alice, bob, carol = _ua(world, "alice", "bob", "carol"), _ua(world, "bob", "alice"), \
        _ua(world, "carol", "alice")
    _call(world, proxy, alice, carol, "alice", "carol", "carol-call@x", "c1")   # her live call
    ok = _call(world, proxy, alice, bob, "alice", "bob", "bob-call@x", "b1", from_tag="a2")
    read = 0
    for n in range(copies):                        # the hop between bob and the proxy
        read += bool(proxy.inspect(_retag(ok, f"hop{n}"), caller=world.aor("alice")).seen)
    return _alices_next_call_then_her_reinvite_to_carol(world, proxy, alice), read


def test_control_alices_reinvite_under_her_calls_key_is_read(world):
    verdict, _ = _alices_reinvite_after_a_hop(world, copies=0)
    assert verdict.action == "forward" and verdict.seen


def test_hole_retagged_200s_move_alices_offer_key_into_made_up_dialogs_on_her_quota(world):
    """Untrusted hop between bob and the proxy (or bob himself, an insider callee, who
    answers with many To tags).  bob's 200 is sealed under alice's offer key (kekri).
    The hop sends the proxy copies of it with made-up To tags: since 155a6c9 each is
    "its own first sighting" (``_first_sighting`` keys the record by the To tag), so
    ``_spend`` spends a use of the early key and puts a copy of it under the confirmed
    scope (Call-ID, alice's tag, the made-up tag) for ``DIALOG_TTL`` (12 h; no BYE will
    ever end those dialogs), with ``keeper=kept.keeper``: alice's own quota, the one her
    own requests' keys count against, and no pair share.  One offer key gives up to 255
    copies (``MAX_DECRYPTS_CAP``); five of alice's calls through the hop fill her 1/8
    of a 10,000-key cache with junk for 12 h.  From then on each key alice's requests
    offer evicts her oldest long-lived key (``_trim_keeper``: short-lived first, then
    the oldest): her live call's.  Here a cache of 64 (quota 8): alice talks with
    carol; she calls bob through the hop, which sends 20 re-tagged copies; alice's next
    call evicts the carol call's key, and her re-INVITE to carol, sealed under it, is
    496 (a round trip; carol's answers under it go on unread, missing from the archive).
    (alice's phone may ACK and BYE each extra dialog, and a BYE through the proxy would
    drop it: the hop takes the proxy's Record-Route out of the copies, so those requests
    go to the Contact the hop wrote, around the proxy.)

    Fix: a key moved by a response counts against that answer's keeper
    (``answer_keeper(caller, responder)``: the pair's 1/64 and ``answered:<responder>``),
    not the offerer's alone; and move one offer key into at most a few forks (e.g. four
    To tags per early key), or bind the response's To tag in its signed SIP context so
    that only the responder can make a fork."""
    verdict, read = _alices_reinvite_after_a_hop(world, copies=20)
    assert read > 0                                # the copies were read as the real one
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE to carol: {verdict.code} {verdict.error} (after {read} copies)"


# -- 2. re-tagged copies of an answer offering a key turn over the pair's share -----------

def _answer_offering_a_key(world, request: SipMessage, responder: str, to_tag: str):
    """``responder``'s signed 200, sealed for the proxy, offering a fresh CEKReference (what
    an answering party sends to a caller it has no certificate for).  Returns the 200,
    its reference and its CEK."""
    response = answer(request, to_tag=to_tag)
    cred = world.user(responder)
    reference = new_reference()
    entity, sealed = protect_content("application/sdp", SDP_ANSWER,
                                     [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                     signer=(cred.cert, cred.key), cek_reference=reference,
                                     bind_to=response, readers=(TRUSTED,))
    return with_entity(response, entity), reference, sealed.cek


def _bobs_reinvite_under_his_key(world, proxy, call_id: str, cek: bytes, reference: bytes):
    """bob's re-INVITE in the call, signed, sealed for the proxy under the key his 200
    offered (kekri, RFC 3185)."""
    request = make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                           to_uri=world.aor("alice"), call_id=call_id, cseq=1, from_tag="b1",
                           to_tag="a1", body=NEW_SDP, content_type="application/sdp",
                           extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>")])
    cred = world.user("bob")
    entity, _ = protect_content("application/sdp", NEW_SDP, [reuse_kek(cek, reference)],
                                signer=(cred.cert, cred.key), bind_to=request,
                                readers=(TRUSTED,))
    return proxy.inspect(with_entity(request, entity))


def _bobs_answer_after_a_hop(world, copies: int):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW,
                         cache=MemoryKeyCache(max_entries=512))  # quota 64, a pair's share 8
    offer = _invite(world, "alice", "bob", "answered@x")          # plaintext: view asks no signature
    verdict = proxy.inspect(offer)
    assert verdict.action == "forward"
    caller = proxy.answer_caller(offer, verdict, digest_user=world.aor("alice"))
    ok, reference, cek = _answer_offering_a_key(world, offer, "bob", "b1")
    assert proxy.inspect(ok, caller=caller).seen
    read = 0
    for n in range(copies):                        # the hop between bob and the proxy
        read += bool(proxy.inspect(_retag(ok, f"hop{n}"), caller=caller).seen)
    kept = proxy.cache.get(DialogScope("answered@x", "a1", "b1"), kept_name(ok, reference),
                           count=False)
    return _bobs_reinvite_under_his_key(world, proxy, "answered@x", cek, reference), kept, read


def test_control_bobs_reinvite_under_the_key_his_answer_offered_is_read(world):
    verdict, kept, _ = _bobs_answer_after_a_hop(world, copies=0)
    assert kept is not None
    assert verdict.action == "forward" and verdict.seen


def test_hole_retagged_copies_of_an_answer_evict_the_real_dialogs_key_from_the_pair(world):
    """Untrusted hop between bob and the proxy.  bob's signed 200 offers a fresh key (a
    CEKReference; he has no certificate of alice's caller, or simply starts one).  Its
    copies are not recorded at all (``_first_sighting`` records only a response that
    spends a kept key) and every copy runs ``_keep_keys``; with a made-up To tag each is
    a new dialog scope, so each keeps bob's key again under ``answer:<alice> <bob>``,
    whose share is 1/64 of the cache (156 of 10,000).  The pair trims its oldest first:
    the real dialog's key, after share copies (here a cache of 512: 8 copies).  bob's
    later requests in the call sealed under his key are 496 (a round trip each) and the
    answers under it go on unread: the archive misses them.  Before 155a6c9 the same
    held (no response was recorded); 155a6c9 says a re-tagging hop spends one use per
    tag, but here it spends nobody's use: it evicts.

    Fix: keep (and move) a response's keys only at its first sighting, and only for a
    bounded number of To tags per request (forks: e.g. four per early scope), or bind the
    response's To tag in its signed SIP context (protocol change) so a hop's re-tagged
    copy fails ``check_context``."""
    verdict, kept, read = _bobs_answer_after_a_hop(world, copies=8)
    assert read == 8                               # every copy was read as the real one
    assert kept is not None, "the real dialog's key went from the pair's share"
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"


# -- 3. in a cluster, stray re-tagged copies count against the responder's own quota ------

def _bobs_call_after_stray_copies(world, copies: int):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW,
                         cache=MemoryKeyCache(max_entries=64))       # a keeper's quota: 8
    bob, carol = _ua(world, "bob", "carol", "alice"), _ua(world, "carol", "bob")
    _call(world, proxy, bob, carol, "bob", "carol", "bobs-call@x", "c1")   # bob's live call
    offer = _invite(world, "alice", "bob", "to-bob@x")
    assert proxy.inspect(offer).action == "forward"
    ok, _, _ = _answer_offering_a_key(world, offer, "bob", "b1")
    read = 0
    for n in range(copies):
        # sent to a node of the cluster that has no transaction for it: the core's reply
        # route reads it as a stray reply (kemi.py route_stray_reply), and $avp(e2m_caller)
        # is not there: caller None
        read += bool(proxy.inspect(_retag(ok, f"hop{n}"), caller=None).seen)
    return _reinvite_in_live_call(world, proxy, bob, "bob", "carol", "bobs-call@x"), read


def test_control_bobs_reinvite_in_his_own_call_is_read(world):
    verdict, _ = _bobs_call_after_stray_copies(world, copies=0)
    assert verdict.action == "forward" and verdict.seen


def test_hole_in_a_cluster_stray_retagged_answers_fill_the_responders_own_quota(world):
    """Untrusted hop between bob and a [cluster] (its Via names the cluster's advertised
    address: the hop may deliver to any node).  It sends copies of bob's 200 to alice,
    each with a made-up To tag, to a node that did not relay alice's INVITE: there the
    core's reply route reads them as stray replies (``route_stray_reply``), with no
    ``$avp(e2m_caller)``, so ``inspect(caller=None)`` counts each key against the
    responder alone, ``_keeper(bob)``: the very group bob's own requests' keys count
    against (not ``answered:bob``, not a pair share).  1,250 copies (of one 200, or a
    few) fill bob's 1/8 and trim his own keys, short-lived first, then his oldest: his
    live calls' keys (his re-INVITEs under them 496, the answers under them unread).
    Here a cache of 64 (quota 8): bob calls carol; then 8 stray copies of his answer to
    alice evict the key of his call with carol.

    Fix: a stray reply's key counts against ``answered:<responder>`` (and a pair with a
    shared stray caller group), never the responder's own requests' group; with fix 2
    (a bounded number of To tags per request, or the To tag signed) the hop has no
    copies to send."""
    verdict, read = _bobs_call_after_stray_copies(world, copies=8)
    assert read == 8
    assert verdict.action == "forward" and verdict.seen, \
        f"bob's re-INVITE to carol: {verdict.code} {verdict.error}"


# -- 1b. the callee needs no hop: requests with made-up From tags move the offer key too ---

def _alices_reinvite_after_bobs_requests(world, requests: int):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW,
                         cache=MemoryKeyCache(max_entries=64))       # a keeper's quota: 8
    alice, carol = _ua(world, "alice", "bob", "carol"), _ua(world, "carol", "alice")
    _call(world, proxy, alice, carol, "alice", "carol", "carol-call@x", "c1")   # her live call
    # alice calls bob: her signed offer, sealed for bob and the proxy, offers its key
    offer = _invite(world, "alice", "bob", "bob-call@x", from_tag="a2")
    reference, alice_cred, bob_cred = new_reference(), world.user("alice"), world.user("bob")
    entity, sealed = protect_content(
        "application/sdp", SDP_OFFER,
        [recipient_for_certificate(world.proxy(TRUSTED).cert),
         recipient_for_certificate(bob_cred.cert)],
        signer=(alice_cred.cert, alice_cred.key), cek_reference=reference, bind_to=offer,
        readers=(TRUSTED,))
    assert proxy.inspect(with_entity(offer, entity)).seen
    read = 0
    for n in range(requests):
        # bob, who opened the offer and so holds its CEK, sends requests "in the dialog"
        # (To tag: alice's; the route token names Call-ID and that tag), each with a
        # From tag of his making, signed as himself, sealed under alice's offer key
        request = make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                               to_uri=world.aor("alice"), call_id="bob-call@x", cseq=1,
                               from_tag=f"bob{n}", to_tag="a2", body=NEW_SDP,
                               content_type="application/sdp",
                               extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>")])
        part, _ = protect_content("application/sdp", NEW_SDP, [reuse_kek(sealed.cek, reference)],
                                  signer=(bob_cred.cert, bob_cred.key), bind_to=request,
                                  readers=(TRUSTED,))
        read += bool(proxy.inspect(with_entity(request, part)).seen)
    return _alices_next_call_then_her_reinvite_to_carol(world, proxy, alice), read


def test_control_alices_reinvite_after_her_call_to_bob_is_read(world):
    verdict, _ = _alices_reinvite_after_bobs_requests(world, requests=0)
    assert verdict.action == "forward" and verdict.seen


def test_hole_callees_requests_with_made_up_tags_move_alices_offer_key_on_her_quota(world):
    """Insider UA (bob, whom alice calls; no hop needed).  bob opened alice's offer, so he
    holds its CEK.  Before answering (or instead), he sends requests under the INVITE's
    Call-ID with alice's tag as To tag (what the route token checks) and a made-up From
    tag each, signed as himself, sealed under alice's offer key (kekri).  Each is a new
    request (its own SIP context: no replay), its key is found in the early scope
    (Call-ID, alice's tag), and ``_spend`` (a request with a To tag "confirms") copies
    it into the made-up dialog for 12 h with ``keeper=kept.keeper``: alice's quota.  As
    in the first hole, alice's next offer then evicts her live call's key (496).  The
    requests here are re-INVITEs (any method the proxy's rules or a label make it read
    works the same); what alice's phone answers them does not matter.

    Fix: as the first hole: a key moved by a message counts against that message's
    sender (a request's From, a response's answer keeper), not the offerer's alone, and
    one early key moves into a bounded number of dialogs."""
    verdict, read = _alices_reinvite_after_bobs_requests(world, requests=20)
    assert read > 0
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE to carol: {verdict.code} {verdict.error} (after {read} requests)"
