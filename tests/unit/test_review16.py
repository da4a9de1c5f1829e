"""A sixteenth attacker's review (December 2026) of the fifteenth review's fixes (ed09737:
only the INVITE's 2xx claims a fork; only the offerer's own request moves her key).
Both holes succeeded on ed09737 and are fixed since: a 2xx to anything but the INVITE keeps
its keys for a dialog's life under the first To tag its signed context is seen with only
(``ProxyEngine._first_tag``), and the offerer's own request compares bounded keepers.

1. ``_keep_keys`` asks ``_fork`` only for a 2xx to INVITE.  Before ed09737 every 2xx in a
   two-tag scope claimed a slot, which is what bounded how many made-up dialogs re-tagged
   copies of one signed 2xx (the signed SIP context binds no To tag) keep keys in for a
   dialog's life (MAX_FORKS, later ones 200 s under ``fork:``).  A 2xx to UPDATE, PRACK,
   INFO, ... now claims nothing and is bounded by nothing: each re-tagged copy is a first
   sighting and keeps the key 12 h under the pair's keeper, and the pair's quota then
   evicts the pair's real keys.
2. ``_spend`` moves an early key on a request only when ``_signed_keeper`` equals
   ``kept.keeper``; the cache stores keepers through ``bounded_keeper`` (hashed past 64
   octets), the signer is compared unhashed: a long AoR's own request never moves her key.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, answer, apply_forward, proxy_engine
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate, reuse_kek
from e2m_plugins.keycache import DialogScope, MemoryKeyCache
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review12 import NEW_SDP, SDP_VIEW, _invite, _ua
from tests.unit.test_review13 import _Clock
from tests.unit.test_review15 import _with_to_tag


# The attacks re-tag copies of signed bodies, which senders bind no To tag in only before
# ``e2m-sip-to-tag`` (tests/unit/test_to_tag_binding.py): the fork slots still serve them.
pytestmark = pytest.mark.usefixtures("older_senders")

@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


# -- 1. re-tagged copies of a 200 to UPDATE evict the pair's real dialog key --------------

def _call_then_bobs_keyed_200_to_an_update(world, proxy, call_id: str, *,
                                           at: float | None = None):
    """alice calls bob (To tag phone; bob's 200 under her offer key), then sends an UPDATE
    in the call; bob's 200 to it (signed, sealed for the proxy, made ``at``) offers a key
    K of his own.  Returns alice, that 200 (not yet inspected), its sealed content (K) and
    the UPDATE's caller as the proxy noted it."""
    alice, bob = _ua(world, "alice", "bob"), _ua(world, "bob", "alice")
    offer = alice.protect(_invite(world, "alice", "bob", call_id)).message
    verdict = proxy.inspect(offer)
    who = proxy.answer_caller(offer, verdict)
    ok = bob.protect(answer(bob.open(apply_forward(offer, verdict)).message, to_tag="phone"))
    assert proxy.inspect(ok.message, caller=who).seen
    update = make_request("UPDATE", "sip:bob@127.0.0.1:5070", from_uri=world.aor("alice"),
                          to_uri=world.aor("bob"), call_id=call_id, cseq=2, from_tag="a1",
                          to_tag="phone", body=b"",
                          extra_headers=[("Contact", "<sip:alice@127.0.0.1:5061>")])
    verdict = proxy.inspect(update)
    assert verdict.action == "forward"
    who = proxy.answer_caller(update, verdict)
    cred = world.user("bob")
    reply = make_response(update, 200, "OK", [("Contact", "<sip:bob@127.0.0.1:5070>")],
                          SDP_ANSWER, "application/sdp")
    entity, sealed = protect_content("application/sdp", SDP_ANSWER,
                                     [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                     signer=(cred.cert, cred.key), cek_reference=new_reference(),
                                     bind_to=reply, readers=(TRUSTED,), at=at)
    return alice, with_entity(reply, entity), sealed, who


def _update_answer_then_copies(world, copies: int):
    """alice calls bob (To tag phone; bob's 200 under her offer key).  In the call alice
    sends an UPDATE; bob's 200 to it (signed, sealed for the proxy) offers a key K of his
    own for the dialog.  The hop between bob and the proxy then sends ``copies`` copies
    of that 200 with made-up To tags.  Returns the proxy's verdict on alice's next
    re-INVITE in the call sealed under K, and how many copies were read."""
    clock = _Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    alice, reply, sealed, who = _call_then_bobs_keyed_200_to_an_update(world, proxy, "upd@x")
    assert proxy.inspect(reply, caller=who).seen
    read = 0
    for n in range(copies):                        # the hop between bob and the proxy
        clock.now += 0.01
        read += bool(proxy.inspect(_with_to_tag(reply, f"hop{n}"), caller=who).seen)
    # alice's re-INVITE in the call, sealed for the proxy under bob's key K
    again = _invite(world, "alice", "bob", "upd@x", cseq=3, to_tag="phone", sdp=NEW_SDP)
    mine = world.user("alice")
    entity, _ = protect_content("application/sdp", NEW_SDP,
                                [reuse_kek(sealed.cek, sealed.cek_reference)],
                                signer=(mine.cert, mine.key), bind_to=again, readers=(TRUSTED,))
    kept = sum(1 for scope, _ in proxy.cache._entries
               if isinstance(scope, DialogScope) and scope.call_id == "upd@x")
    return proxy.inspect(with_entity(again, entity)), read, kept


def test_control_alices_reinvite_under_bobs_update_answer_key_is_read(world):
    verdict, _, _ = _update_answer_then_copies(world, copies=0)
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"


def test_hole_retagged_copies_of_a_200_to_update_evict_the_dialogs_key(world):
    """Untrusted hop between bob and the proxy (or bob, the insider UA).  bob's 200 to
    alice's in-dialog UPDATE is signed and offers a key K (keeper ``answer:alice bob``),
    kept in (upd@x, a1, phone).  Its signed context binds no To tag, so each copy with a
    made-up To tag is a first sighting (``_first_sighting`` records context + To tag);
    ``_keep_keys`` asks ``_fork`` only when CSeq's method is INVITE, so no copy is a
    "later fork": every one keeps K for DIALOG_TTL (12 h) in its own made-up dialog under
    the pair's keeper.  The pair's group holds quota // KEEPER_SHARE (156 with the default
    cache) and trims its oldest long-lived key: the real dialog's K.  alice's re-INVITE
    under K is then 496 (a round trip each time; bob's answers under K unread), and the
    hop can keep doing it to every key the pair's 2xx to UPDATE/PRACK/INFO offer.

    Fix: have every 2xx in a two-tag scope (not only the INVITE's) look its To tag up in
    the early dialog's fork slots: claim one only for the INVITE's 2xx, and a 2xx whose
    tag holds no slot keeps its keys for EARLY_DIALOG_TTL under ``fork:`` (as a later
    fork's do), never long-lived on the pair's quota."""
    verdict, read, kept = _update_answer_then_copies(world, copies=160)
    assert read == 160
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE: {verdict.code} {verdict.error} ({kept} keys kept under upd@x)"


# -- 2. a long AoR's own request never moves her key (hashed keeper != signer) ------------

LONG = "alice-" + "x" * 46   # sip:<64 octets>: past MAX_KEEPER_OCTETS (kept as '#' + hash),
                             # its certificate's CN user@host still within X.520's 64


@pytest.fixture(scope="module")
def world2():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", LONG),
                         key_type="ec")


def _signed_offer_and_a_200(world, proxy, caller: str, call_id: str, *,
                            at: float | None = None):
    """``caller``'s INVITE to bob, signed, sealed for the proxy and offering a key K (made
    ``at``), read by the proxy.  Returns the INVITE, K (sealed), the caller the proxy
    noted for it, and bob's plaintext 200 to it on To tag phone."""
    mine = world.user(caller)
    invite = _invite(world, caller, "bob", call_id)
    entity, sealed = protect_content("application/sdp", invite.body,
                                     [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                     signer=(mine.cert, mine.key), cek_reference=new_reference(),
                                     bind_to=invite, readers=(TRUSTED,), at=at)
    invite = with_entity(invite, entity)
    verdict = proxy.inspect(invite)
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"
    ok = _with_to_tag(make_response(invite, 200, "OK", [("Contact", "<sip:bob@127.0.0.1:5070>")],
                                    SDP_ANSWER, "application/sdp"), "phone")
    return invite, sealed, proxy.answer_caller(invite, verdict), ok


def _own_request_moves(world, caller: str):
    """``caller`` offers a key K in her INVITE; bob's 200 (To tag phone) is sealed for the
    proxy under a fresh key of his (none offered), so it moves nothing.  ``caller``'s
    re-INVITE in the call under K (her own request: it should move K into the dialog);
    then, once the early copy is gone, a second one under K: the proxy's verdict."""
    clock = _Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    mine, bobs = world.user(caller), world.user("bob")
    to_proxy = [recipient_for_certificate(world.proxy(TRUSTED).cert)]
    invite, sealed, who, ok = _signed_offer_and_a_200(world, proxy, caller, "long@x")
    entity, _ = protect_content("application/sdp", SDP_ANSWER, to_proxy,
                                signer=(bobs.cert, bobs.key), bind_to=ok, readers=(TRUSTED,))
    assert proxy.inspect(with_entity(ok, entity), caller=who).seen
    verdicts = []
    for cseq in (2, 3):
        again = _invite(world, caller, "bob", "long@x", cseq=cseq, to_tag="phone", sdp=NEW_SDP)
        entity, _ = protect_content("application/sdp", NEW_SDP,
                                    [reuse_kek(sealed.cek, sealed.cek_reference)],
                                    signer=(mine.cert, mine.key), bind_to=again,
                                    readers=(TRUSTED,))
        verdicts.append(proxy.inspect(with_entity(again, entity)))
        clock.now += 201                           # past EARLY_DIALOG_TTL
    return verdicts


def test_control_a_short_aors_own_request_moves_her_key(world2):
    first, second = _own_request_moves(world2, "alice")
    assert first.seen and second.action == "forward" and second.seen, \
        f"{second.code} {second.error}"


def test_hole_a_long_aors_own_request_does_not_move_her_key(world2):
    """Nobody (a legitimate flow; any user whose AoR is longer than 64 octets).  ``_spend``
    moves an early key on a request only when ``_signed_keeper(...) == kept.keeper``; the
    cache stored the keeper through ``bounded_keeper`` ('#' + 32 hex of its hash for a
    name past MAX_KEEPER_OCTETS), while ``_signed_keeper`` returns ``_keeper(From)`` as
    is.  The two never match: her re-INVITE under her own offer key is read but moves
    nothing, and once the early copy is gone (200 s) her next one is 496 for the whole call.

    Fix: compare ``bounded_keeper(self._signed_keeper(...))`` with ``kept.keeper`` (or keep
    the unhashed name next to the hashed one)."""
    first, second = _own_request_moves(world2, LONG)
    assert first.seen
    assert second.action == "forward" and second.seen, f"{second.code} {second.error}"
