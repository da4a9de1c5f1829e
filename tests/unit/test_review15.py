"""A fifteenth attacker's review (December 2026) of the twelfth to fourteenth reviews' fixes
(ff36fc9, df80d2a, c3cb96d: a response that spends or offers a key is recorded by context and
To tag; an early dialog's fork slots, bound to its two AoRs; only a 2xx claims a fork).

Each ``test_hole_*`` is an attack (or a legitimate flow) that succeeded on 33adaca.  Holes 1
and 3 are fixed (the response's replay record lower-cases the To tag; only the INVITE's 2xx
claims a fork, and only the offerer's own request moves her key); hole 2, older than the
fork slots, was fixed later (a BYE drops its own dialog's scope only; a failed transaction
drops only the keys its own request kept: ``ProxyEngine.end_attempt``); its tests were strict
xfails until then, and tests/kamailio/test_review15_wire.py makes both attacks on a real
Kamailio.  Each docstring names the attacker (docs/threat-model.md), what it gets and a fix.
``test_control_*`` are the same flows without the attack: they pass.

1. The response replay record keys the To tag as written, while scopes and fork slots
   lower-case it: copies of the real 200 with the case of its To tag changed are "first
   sightings" that find the key in the live dialog's own scope and spend one use each,
   until the dialog's key is used up.
2. Keys are dropped by Call-ID and tag alone: a third party who learnt a call's Call-ID and
   the caller's tag (mallory, who forwarded alice's call with a 302, as in the fourteenth
   review) empties the early scope before the callee answers: with a bare BYE (her route
   token is for that Call-ID and tag), or with an INVITE of her own under the same ids that
   fails (tm's failure route).  Kept names and fork slots bind the parties; drops do not.
3. "Only a 2xx claims a fork": any 2xx does, a 200 to an early UPDATE (preconditions)
   too, and so does a request in the early dialog that spends the offer key.  The real
   answer's dialog is then a later fork: the caller's key lives 200 s in her call.
"""

from __future__ import annotations

import re

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, answer, apply_forward, proxy_engine
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate, reuse_kek
from e2m_plugins.keycache import DialogScope, MemoryKeyCache
from e2m_plugins.proxy import EARLY_DIALOG_TTL, LATER_FORK_KEEPER, message_scope
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki
from kamailio_app.dialog_route import RouteTokens, dialog_parties
from tests.unit.test_review12 import NEW_SDP, SDP_VIEW, _invite, _ua
from tests.unit.test_review13 import _Clock, _reinvite, _reinvite_once_early_copies_are_gone


# The attacks re-tag copies of signed bodies, which senders bind no To tag in only before
# ``e2m-sip-to-tag`` (tests/unit/test_to_tag_binding.py): the fork slots still serve them.
pytestmark = pytest.mark.usefixtures("older_senders")

@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "mallory"),
                         key_type="ec")


def _with_to_tag(message: SipMessage, tag: str) -> SipMessage:
    return message.replace("To", re.sub(r";tag=[^;>\s]*", f";tag={tag}", message.get("To")))


def _case_variants(tag: str, count: int) -> list[str]:
    """``count`` spellings of ``tag`` other than itself, differing in letter case only
    (RFC 3261 §19.3: tags compare case-insensitively; the same tag to every UA)."""
    letters = [i for i, c in enumerate(tag) if c.isalpha()]
    assert 2 ** len(letters) > count
    out = []
    for n in range(1, count + 1):
        chars = list(tag)
        for bit, i in enumerate(letters):
            if n >> bit & 1:
                chars[i] = chars[i].upper()
        out.append("".join(chars))
    return out


# -- 1. case-changed copies of the real 200 use up the live dialog's key ------------------

PHONE_TAG = "bobsphonetag"      # 12 letters: 4,095 other spellings (a real UA's tags are longer)


def alices_call_through_a_proxy(world, call_id: str, clock):
    """A proxy on ``clock`` that views SDP, alice's and bob's UAs, and alice's signed offer
    to bob (offering its key) as the proxy read it: (proxy, alice, bob, offer, verdict,
    who pays for keys the answers offer)."""
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    alice, bob = _ua(world, "alice", "bob"), _ua(world, "bob", "alice")
    offer = alice.protect(_invite(world, "alice", "bob", call_id)).message
    verdict = proxy.inspect(offer)
    return proxy, alice, bob, offer, verdict, proxy.answer_caller(offer, verdict)


def _alices_reinvite_after_case_copies(world, copies: int, *, made_up: bool = False):
    clock = _Clock()
    proxy, alice, bob, offer, verdict, who = alices_call_through_a_proxy(world, "case@x", clock)
    ok = bob.protect(answer(bob.open(apply_forward(offer, verdict)).message, to_tag=PHONE_TAG))
    assert ok.info.key_reuse                       # sealed under alice's offer key
    assert proxy.inspect(ok.message, caller=who).seen
    alice.open(ok.message)
    read = 0
    tags = [f"hop{n}" for n in range(copies)] if made_up else _case_variants(PHONE_TAG, copies)
    for tag in tags:                               # the hop between bob and the proxy
        read += bool(proxy.inspect(_with_to_tag(ok.message, tag), caller=who).seen)
    return _reinvite_once_early_copies_are_gone(world, proxy, clock, alice, "bob", "case@x",
                                                PHONE_TAG), read


def test_control_alices_reinvite_after_bobs_200_is_read(world):
    verdict, _ = _alices_reinvite_after_case_copies(world, copies=0)
    assert verdict.action == "forward" and verdict.seen


def test_control_as_many_copies_with_made_up_tags_leave_the_dialogs_key(world):
    """The same number of copies with made-up To tags spend only the early copy's uses
    (accepted since the eleventh review): the dialog's own copy stays."""
    verdict, read = _alices_reinvite_after_case_copies(world, copies=255, made_up=True)
    assert read == 255
    assert verdict.action == "forward" and verdict.seen


def test_hole_case_changed_copies_of_the_200_use_up_the_live_dialogs_key(world):
    """Untrusted hop between bob and the proxy (or, in a cluster, anyone on the path whose
    copy reaches a node as a stray reply).  bob's 200 is sealed under alice's offer key; the
    proxy moved that key into the dialog (Call-ID, a1, bobsphonetag) with the uses left
    (none asked: the cap, 256, less the 200's own).  The hop then sends copies of the same
    200 with the To tag's letters in other cases.  ``_first_sighting`` records a response by
    its context and ``message.to_tag`` as written, so each spelling is a first sighting;
    ``message_scope`` lower-cases the tag, so ``_keys_for`` finds the key in the dialog's
    OWN scope, and ``_spend`` counts a use of it (``cache.get(candidate, name)``) before it
    sees ``candidate == scope``.  255 spellings (a tag with 8 letters has them) use the key
    up: once the offer's early copy is gone (200 s), alice's re-INVITE in the call is 496,
    and every answer bob seals under the key goes on unread (out of the archive), for the
    whole call.  The copies are accepted for the 200's time window (300 s), so the hop
    can do it after the call is up; ``_fork`` is never asked (no fork bound applies), and
    copies with a made-up tag (which the twelfth review accepted "spend one use per tag")
    spend only the early copy's uses, never the dialog's.

    Fix: record the To tag lower-cased (``to_tag=(message.to_tag or "").lower()`` in
    ``_first_sighting``), as scopes and fork slots compare it; and do not count a use of
    a key a response found in its own (confirmed) scope unless it is its first sighting
    under that scope."""
    verdict, read = _alices_reinvite_after_case_copies(world, copies=255)
    assert read == 255                             # every copy was read, as a first sighting
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE: {verdict.code} {verdict.error} (after {read} copies)"


# -- 2. a third party with the call's Call-ID and tag drops the caller's offer key ----------

ROUTES = RouteTokens(b"k" * 32)          # the proxy's route key (kemi's Record-Route token)
PARTIES = dialog_parties("sip:alice@example.com", "sip:bob@example.com")   # the dialog's From and To


def _forwarded_call(world, attack):
    """alice's call (Call-ID fwd@x, tag a1) first goes to mallory, who answers 302: alice's
    UA retries to bob with the same Call-ID and tag (RFC 3261 §8.1.3.4).  While bob rings,
    ``attack(proxy)`` runs, then bob answers under alice's offer key; returns alice's
    re-INVITE's verdict once the early copy is gone, and what the proxy saw of bob's 200."""
    clock = _Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    alice, bob = _ua(world, "alice", "bob", "mallory"), _ua(world, "bob", "alice")
    # (alice's phone sent it; a plaintext offer here, so that this UA object's own
    # record of the dialog with mallory does not stand in for the phone's retry logic)
    to_mallory = _invite(world, "alice", "mallory", "fwd@x")
    first = proxy.inspect(to_mallory)
    assert first.action == "forward"
    # mallory's 302 ends that attempt: the host's failure route drops what it kept
    proxy.end_attempt(message_scope(to_mallory), first.kept)
    offer = alice.protect(_invite(world, "alice", "bob", "fwd@x", cseq=2)).message
    verdict = proxy.inspect(offer)
    who = proxy.answer_caller(offer, verdict)
    attack(proxy)
    ok = bob.protect(answer(bob.open(apply_forward(offer, verdict)).message, to_tag="b1"))
    assert ok.info.key_reuse
    seen = proxy.inspect(ok.message, caller=who)
    alice.open(ok.message)
    clock.now += EARLY_DIALOG_TTL + 1              # the offer's early copy is gone
    return _reinvite(world, proxy, alice, "alice", "bob", "fwd@x", "b1", cseq=3), seen


def test_control_alices_forwarded_call_keeps_its_key(world):
    verdict, seen = _forwarded_call(world, lambda proxy: None)
    assert seen.seen and seen.error is None
    assert verdict.action == "forward" and verdict.seen


def _mallorys_bare_bye(proxy) -> None:
    # The INVITE alice sent mallory carried the proxy's Record-Route with the token of
    # (fwd@x, a1): a BYE naming that Call-ID and tag with any To tag is "routed here".
    token = ROUTES.token("fwd@x", "a1", parties=PARTIES)
    assert ROUTES.admits("fwd@x", ("a1", "m-any"), [f"<sip:{TRUSTED};lr;e2m-rr={token}>"], parties=PARTIES)
    # kemi.py route_in_dialog: loose_route, dialog_routed_here, then relayed_unread
    # (a bare BYE: no body, no label); since review 92 its keys go at its 2xx
    # (end_answered with the request's $ci, $ft, $tt): say mallory's side answered 200
    assert proxy.needs_no_reading("BYE", has_body=False, has_label=False,
                                  has_policy=False)
    proxy.end_answered("BYE", 200, "fwd@x", "a1", "m-any")


def _mallorys_failed_invite(proxy) -> None:
    # mallory's own INVITE (From: mallory, her credentials; or a foreign From to one of our
    # users, never challenged) with Call-ID fwd@x and From tag a1, to her own phone, which
    # answers 486: read (nothing to read: no body), relayed, and its failure runs
    # kemi.py drop_attempt_keys: what her INVITE kept ($avp(e2m_kept)) -> end_attempt
    own = make_request("INVITE", f"sip:mallory@{proxy.host}", from_uri="sip:mallory@elsewhere.example",
                       to_uri="sip:mallory@elsewhere.example", call_id="fwd@x", cseq=7,
                       from_tag="a1", body=b"")
    verdict = proxy.inspect(own)
    assert verdict.action == "forward"
    proxy.end_attempt(message_scope(own), verdict.kept)


def test_hole_a_third_partys_bare_bye_drops_the_callers_offer_key(world):
    """Insider UA (mallory: alice's call went to her first and she forwarded it with a 302,
    the seat of the fourteenth review; any branch alice's INVITE reached will do).  The
    INVITE she received carries our Record-Route with the token of (fwd@x, a1), which is
    all ``dialog_routed_here`` checks; a bare BYE is never challenged from a foreign From
    (``route_auth``: in-dialog) and is not read: ``end_dialog_unread`` ->
    ``end_unread("BYE", $ci, $ft, $tt)`` -> ``drop_scope(DialogScope(fwd@x, a1, any))``,
    which takes the early scope (fwd@x, a1) with it.  Sent while bob rings (she can send
    one every 100 ms after her 302), it empties alice's offer key: bob's 200 under it is
    forwarded unread (not in the archive) and moves nothing, so alice's requests in the
    call are 496 and bob's answers unread for the whole call.  The fourteenth review's fix
    bound the fork slots to the parties; the drops are bound to nothing (the UA's
    ``DialogKeys.end_dialog`` is: "a third who names the dialog's ids ends nothing").

    Fixed (``ProxyEngine.end_dialog``): a BYE drops its two-tag scope only (and a BYE
    without a To tag nothing: it named the early scope itself); the early scope's keys go
    at their early expiry, or with the failure of the INVITE transaction that kept them.
    Binding the route token to the INVITE's two AoRs as well would keep mallory's token
    from naming alice's call with bob."""
    verdict, seen = _forwarded_call(world, _mallorys_bare_bye)
    assert seen.seen and seen.error is None, f"bob's 200 went unread: {seen.error}"
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"


def test_hole_a_third_partys_failed_invite_drops_the_callers_offer_key(world):
    """Insider UA or off-path sender who knows a call's Call-ID and the caller's tag
    (mallory after her 302, as above; no route token needed).  While bob rings she sends
    an INVITE of her own with Call-ID fwd@x and From tag a1 to her own phone, which
    answers 486.  kemi.py ``drop_attempt_keys`` (tm's failure route) sees an INVITE without
    a To tag and calls ``end_dialog($ci, $ft, None, confirmed=False)``: the early scope
    (fwd@x, a1) goes, alice's offer key with it.  Same consequence as 2a: bob's 200 unread,
    nothing moved, alice's re-INVITE 496 for the whole call.

    Fixed (``ProxyEngine.end_attempt``, kemi.py ``drop_attempt_keys``): the failure
    route drops only the keys that transaction's own request kept afresh
    (``Verdict.kept``, carried in ``$avp(e2m_kept)``), not every key under its Call-ID
    and From tag."""
    verdict, seen = _forwarded_call(world, _mallorys_failed_invite)
    assert seen.seen and seen.error is None, f"bob's 200 went unread: {seen.error}"
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"


def test_hole_a_bare_bye_without_a_to_tag_drops_the_callers_offer_key(world):
    """The same seat as the bare BYE above, without even a made-up To tag: Kamailio's $tt
    is empty, and ``end_unread("BYE", fwd@x, a1, None)`` named ``DialogScope(fwd@x, a1)``:
    the early scope itself.  Found while fixing 2a (it failed on 809c731).  A BYE without
    both tags now ends nothing."""
    def bye_without_to_tag(proxy) -> None:
        proxy.end_answered("BYE", 200, "fwd@x", "a1", None)   # (answered 200: review 92)
    verdict, seen = _forwarded_call(world, bye_without_to_tag)
    assert seen.seen and seen.error is None, f"bob's 200 went unread: {seen.error}"
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"


def test_control_a_failed_invite_of_her_own_with_a_key_drops_only_hers(world):
    """mallory's INVITE under alice's ids offers a key of her own (to bob, signed as
    herself): its failure drops that key and leaves alice's."""
    clock = _Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    alice, mallory = _ua(world, "alice", "bob"), _ua(world, "mallory", "bob")
    offer = alice.protect(_invite(world, "alice", "bob", "own@x")).message
    first = proxy.inspect(offer)
    assert len(first.kept) == 1 and len(proxy.cache) == 1
    hers = mallory.protect(_invite(world, "mallory", "bob", "own@x", cseq=5)).message
    verdict = proxy.inspect(hers)
    assert verdict.action == "forward" and len(verdict.kept) == 1 and len(proxy.cache) == 2
    assert verdict.kept != first.kept
    proxy.end_attempt(message_scope(hers), verdict.kept)
    assert len(proxy.cache) == 1
    assert proxy.cache.get(message_scope(offer), first.kept[0], count=False) is not None


# -- 3. a 2xx to an early UPDATE, or an early request, claims the first fork ----------------

def _early_update_then_answer(world, early: str | None):
    """alice calls bob; bob's gateway (To tag gw) rings with early media.  ``early``:
    "update" - alice's UPDATE in the early dialog (RFC 3311, preconditions), whose 200 from
    the gateway (signed as bob) offers a key; "request" - the gateway's own UPDATE to alice,
    sealed under her offer key (it opened the INVITE: a key received is usable at once).
    Then bob's phone answers the INVITE on To tag "phone" under alice's offer key.
    Returns alice's re-INVITE's verdict once the early copy is gone, and the moved key."""
    clock = _Clock()
    proxy, alice, bob, offer, verdict, who = alices_call_through_a_proxy(world, "precond@x", clock)
    delivered = bob.open(apply_forward(offer, verdict)).message
    cred = world.user("bob")
    if early == "update":
        update = make_request("UPDATE", "sip:bob@127.0.0.1:5070", from_uri=world.aor("alice"),
                              to_uri=world.aor("bob"), call_id="precond@x", cseq=2,
                              from_tag="a1", to_tag="gw", body=b"",
                              extra_headers=[("Contact", "<sip:alice@127.0.0.1:5061>")])
        assert proxy.inspect(update).action == "forward"
        ok = make_response(update, 200, "OK", [("Contact", "<sip:bob@127.0.0.1:5070>")],
                           SDP_ANSWER, "application/sdp")
        entity, _ = protect_content("application/sdp", SDP_ANSWER,
                                    [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                    signer=(cred.cert, cred.key), cek_reference=new_reference(),
                                    bind_to=ok, readers=(TRUSTED,))
        assert proxy.inspect(with_entity(ok, entity), caller=who).seen
    elif early == "request":
        sealed = bob.dialog_keys.kept(delivered)[0]       # alice's offer key, as bob holds it
        update = make_request("UPDATE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                              to_uri=world.aor("alice"), call_id="precond@x", cseq=1,
                              from_tag="gw", to_tag="a1", body=NEW_SDP,
                              content_type="application/sdp",
                              extra_headers=[("Contact", "<sip:bob@127.0.0.1:5070>")])
        entity, _ = protect_content("application/sdp", NEW_SDP,
                                    [reuse_kek(sealed.cek, sealed.reference)],
                                    signer=(cred.cert, cred.key), bind_to=update,
                                    readers=(TRUSTED,))
        assert proxy.inspect(with_entity(update, entity)).seen
    ok = bob.protect(answer(delivered, to_tag="phone"))
    assert ok.info.key_reuse
    assert proxy.inspect(ok.message, caller=who).seen
    alice.open(ok.message)
    moved = [entry for (scope, _), entry in proxy.cache._entries.items()
             if scope == DialogScope("precond@x", "a1", "phone")]
    return _reinvite_once_early_copies_are_gone(world, proxy, clock, alice, "bob", "precond@x",
                                                "phone"), moved


def test_control_alices_reinvite_after_early_media_and_an_answer_is_read(world):
    verdict, moved = _early_update_then_answer(world, None)
    assert [entry.keeper for entry in moved] != [LATER_FORK_KEEPER]
    assert verdict.action == "forward" and verdict.seen


def test_hole_a_200_to_an_early_update_takes_the_first_fork_from_the_answer(world):
    """Nobody (a legitimate flow: preconditions, RFC 3312/3311), or the callee.  alice's
    INVITE forks; bob's gateway rings with early media on To tag gw, alice sends an UPDATE
    in that early dialog and the gateway's 200 to it offers a key of its own.
    ``_keep_keys`` asks ``_fork`` for every 2xx in a two-tag scope (``_confirms_dialog``:
    any 2xx), not only the INVITE's: the 200 to UPDATE takes slot 0 of (precond@x, a1).
    bob's phone then answers the INVITE on To tag phone: slot 1, a later fork, so
    ``_spend`` keeps alice's offer key in the real call for ``EARLY_DIALOG_TTL`` under
    ``fork:``.  After 200 s alice's re-INVITE in the call is 496 (a round trip each time;
    bob's answers under the key unread).  df80d2a fixed this for an 18x only.

    Fix: only a 2xx to the dialog-creating INVITE (CSeq method INVITE, in an early
    dialog's first transaction) claims a fork slot; other messages look their tag up in
    the slots without claiming one (a tag with no slot keeps keys for the early expiry)."""
    verdict, moved = _early_update_then_answer(world, "update")
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE: {verdict.code} {verdict.error} (key kept by {[e.keeper for e in moved]})"
    assert [entry.keeper for entry in moved] != [LATER_FORK_KEEPER], "the call is a later fork"


def test_hole_an_early_request_under_the_offer_key_takes_the_first_fork(world):
    """Nobody (a legitimate flow), or the callee.  As 3a, but the gateway itself sends an
    UPDATE in its early dialog (From tag gw, To tag a1) sealed under alice's offer key,
    which it holds (it opened the INVITE; a received key is usable at once).  ``_spend``
    finds the key in the early scope and, the request having a To tag
    (``_confirms_dialog``), claims ``_fork(a1, gw)`` = slot 0 and moves the key there for
    12 h on the gateway's signer (bob).  bob's phone's 200 on To tag phone is slot 1: the
    real call keeps alice's key 200 s under ``fork:``; her re-INVITE after that is 496.

    Fix: as 3a: a request in an early dialog never claims a fork slot (it may move the key
    for the early expiry, or only into a dialog a 2xx to the INVITE already claimed)."""
    verdict, moved = _early_update_then_answer(world, "request")
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE: {verdict.code} {verdict.error} (key kept by {[e.keeper for e in moved]})"
    assert [entry.keeper for entry in moved] != [LATER_FORK_KEEPER], "the call is a later fork"
