"""A nineteenth attacker's review (December 2026) of 633897a (a signed body binds its
message's To tag, ``e2m-sip-to-tag``) and 383420b (the front marks a node down only when it
replied nothing).

The To tag is bound only when the message it was signed for *has* one
(``protect_content``: ``bind_to.to_tag`` truthy).  A body signed for a request outside a
dialog (an initial INVITE, its retry after a 3xx or a 407 on the same Call-ID and From
tag) therefore carries no ``e2m-sip-to-tag``, exactly like a body from a sender older
than the attribute, and a reader cannot tell the two apart: ``SipContext.to_tag`` is None
and ``check_message`` accepts it under *any* To tag.  An untrusted hop that adds a To tag
to a new sender's initial INVITE turns it into an "in-dialog" request of a dialog it made
up, and the proxy reads it as such: ``_keep_keys`` keeps the offer's key under the made-up
dialog's scope (not an early one: for a dialog's life, 12 h, on the offerer's quota),
with no fork slot asked (only responses claim those), and Kamailio's failure route drops
nothing for a request with a To tag (``drop_attempt_keys``), so bob's 481 to the copy
leaves it there.  Reviews 12 to 17's "re-tagged requests of the offerer's own keep her key
for a dialog's life" (review 17) thus still works for new senders, through the requests
that had no To tag.

What it takes on the wire: the copy must reach the proxy before the real request (the
real one is then a replay, refused; the hop costs alice that attempt, or uses an attempt
the proxy never read: her INVITE retried on the same Call-ID and From tag after a 3xx,
sent through the hop before the proxy), and, to pass Kamailio's in-dialog route, a Route
with the proxy's token for the Call-ID and From tag (which the hop read in the
Record-Route of the earlier attempt's 18x) and, for one of our own users, her digest
credentials copied from the real retry (first use of that nonce count wins).  Only the
engine is tested here.

``test_hole_*`` was a strict xfail (each failed on 7205123); fixed as the review proposed: a
new sender binds the empty tag for a message without one, so only a body without the
attribute at all reads as an older sender's.  Its docstring names the attacker, the
attack, the effect and the fix.  ``test_control_*`` is the same flow without the attack.
Run as new senders (no ``older_senders``).

Held (tried, no test): stripping or replacing the attribute (signed; unsigned attributes
are never read), a second signer or layer binding another tag or none (refused: the
signers' tags differ), an attribute with several values (refused), a zero-value
attribute (only its signer can write it), the authAttrs copy (carries no tag, and a
context only it carries is refused 495); a re-tagged copy is refused before any replay
record or key use, at the proxy and at the UA; case changes read as the same dialog;
the pjsua phone signs on the wire bytes (every tagged response and in-dialog request
binds its tag); the decode is one bounded UTF8String per value.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, proxy_engine
from e2m_plugins.keycache import DialogScope, MemoryKeyCache
from e2m_plugins.proxy import EARLY_DIALOG_TTL, ProxyEngine
from e2m_plugins.replay import MemoryReplayCache
from e2m_plugins.sip import SipMessage
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review12 import SDP_VIEW, _invite, _ua
from tests.unit.test_review17 import _Clock, _call_and_requests, _long_lived, _reinvite


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


def _add_to_tag(message: SipMessage, tag: str) -> SipMessage:
    """What the hop sends: the request as alice signed it, with a To tag it made up."""
    assert message.to_tag is None
    return message.replace("To", f"{message.get('To')};tag={tag}")


def _proxy(clock: _Clock, world, max_entries: int = 65536) -> ProxyEngine:
    base = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    return ProxyEngine(base.config, MemoryKeyCache(max_entries=max_entries, clock=clock),
                       clock=clock.utc, replay=MemoryReplayCache(clock=clock))


def _alices_offer(world, call_id: str) -> SipMessage:
    """alice's initial INVITE to bob, protected by her UA as a new sender does (signed,
    sealed for the proxy, offering a key for reuse)."""
    alice = _ua(world, "alice", "bob")
    protected = alice.protect(_invite(world, "alice", "bob", call_id))
    assert protected.info.signed and protected.info.encrypted
    return protected.message


# -- 1. a new sender's tagless request binds no To tag: read under any --------------------

def _one_offer(world, retag: str | None):
    clock = _Clock()
    proxy = _proxy(clock, world)
    offer = _alices_offer(world, "tagless@x")
    verdict = proxy.inspect(_add_to_tag(offer, retag) if retag else offer)
    return verdict, _long_lived(proxy, "tagless@x", clock), proxy, offer


def test_control_alices_initial_invite_keeps_her_key_in_the_early_dialog_only(world):
    verdict, dialogs, _, _ = _one_offer(world, None)
    assert verdict.action == "forward" and verdict.seen and verdict.seen[0].bound
    assert dialogs == []                   # early only: 200 s unless a 2xx confirms it


def test_hole_a_new_senders_initial_invite_with_a_made_up_to_tag_is_read(world):
    """Untrusted hop between alice and the proxy.  alice's UA is a new sender, but her
    initial INVITE has no To tag, so its signed body carries no ``e2m-sip-to-tag``: to
    the proxy it is a body from a sender older than the attribute.  The hop adds a To tag
    (``hop0``) and sends it first.  Today: read, bound (``SeenBody.bound``), and her offer
    key is kept under the made-up dialog (Call-ID, a1, hop0) for a dialog's life (12 h, her
    quota), not in the early dialog for 200 s; the real INVITE after it is refused as a
    replay (``ReplayError``).  A
    downgrade of a new sender's body to an old one's: the binding holds only for messages
    that had a To tag when signed.

    Fix: bind the absence too: a new sender writes ``e2m-sip-to-tag`` on every signed body
    with a context, the empty string when the message has no To tag, and a reader refuses
    a body whose bound tag (empty included) is not the message's; only a body without the
    attribute at all is an older sender's."""
    verdict, dialogs, _, _ = _one_offer(world, "hop0")
    assert verdict.error == "BindingMismatchError", \
        f"{verdict.action} {verdict.code} {verdict.error}, seen={verdict.seen}"
    assert dialogs == [], f"dialogs keeping her key for their life: {[d.tags for d in dialogs]}"


# -- 2. as it costs alice: her quota fills with made-up dialogs ---------------------------

def _live_call_after_offers(world, retag: bool, calls: int = 6):
    """A small cache (a keeper's quota: 48 // KEEPER_SHARE = 6 keys).  alice's live call
    live@x with bob (her key K1 moved into (a1, phone)); then ``calls`` calls of hers whose
    initial INVITEs the hop re-tags (``retag``) or passes as they are; then, after the
    early expiry, alice's re-INVITE in the live call under K1: the proxy's verdict."""
    clock = _Clock()
    proxy = _proxy(clock, world, max_entries=48)
    k1, _ = _call_and_requests(world, proxy, clock, "live@x", [])
    for n in range(calls):
        clock.now += 1
        offer = _alices_offer(world, f"next{n}@x")
        verdict = proxy.inspect(_add_to_tag(offer, f"hop{n}") if retag else offer)
        if not retag:
            assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"
    long_lived = [s for s in (DialogScope(f"next{n}@x", "a1", f"hop{n}") for n in range(calls))
                  if any(k[0] == s for k in proxy.cache._entries)]
    clock.now += EARLY_DIALOG_TTL + 1
    return _reinvite(world, proxy, clock, "live@x", 9, "phone", k1), long_lived


def test_control_alices_live_call_keeps_its_key_beside_her_next_calls(world):
    verdict, long_lived = _live_call_after_offers(world, retag=False)
    assert long_lived == []
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"


def test_hole_retagged_initial_invites_evict_her_live_calls_key(world):
    """The same hop, as it costs alice (the review 17 attack, through the requests a new
    sender cannot bind a To tag in): each of her next calls' INVITEs, re-tagged, keeps its
    offer key for a dialog's life on her own quota; once the quota is all such keys, the
    oldest, her live call's, goes and her next re-INVITE in that call is 496 (here with a
    small cache; with the default one, a quota's worth of her calls through the hop in
    12 h).  Fix: as above (bind the absence of a To tag)."""
    verdict, long_lived = _live_call_after_offers(world, retag=True)
    assert verdict.action == "forward" and verdict.seen, \
        f"{verdict.code} {verdict.error}; made-up dialogs holding her keys: {len(long_lived)}"
