"""A forty-eighth attacker's review (December 2026) of db5870b: the proxy's fork slots as
reviews 44 and 46 left them (``git show 1438a99 db5870b``).

``test_hole_*`` xfail strictly on db5870b (their assertion is what a fix makes true);
``test_control_*`` are the same flows without the attack (they pass).

Since db5870b an INVITE 2xx takes its fork slot whenever its early dialog holds a kept
key (``ProxyEngine._confirm_fork``, ``_early_keyed``: ``KeyCache.holds`` on
``early_scopes()``), with a plaintext body or none, and every INVITE 2xx is read
(``response_needs_reading``).  Nothing of such a 2xx is signed.

Hole 1 (slot 0 squatted by a 2xx that proves nothing): the first To tag an early
dialog's fork slots see is slot 0, the one dialog that keeps the caller's offer key for
its life; the next ones keep it ``EARLY_DIALOG_TTL`` (200 s).  A body-less (or
plaintext) 200 with a made-up To tag, read before the callee's real answer, now takes
slot 0, so the answered dialog is a "later fork": the caller's key lives 200 s in it and
her session refresh after that is answered 496 by her own proxy.  The squatting 200 can
be sent on so that the caller's phone never sees it (a second Via of the attacker's
choosing: her phone drops a response that matches none of its transactions; on a
cluster a stray reply goes wherever its next Via says).

Hole 2 (shared claims at packet rate again): ``_early_keyed`` asks whether *any* key is
kept under the Call-ID and *either* tag of the 2xx; the fork slot it then claims across
the cluster (``shared=True``) is named by the 2xx's Call-ID, *From* tag and AoRs.  So a
stray 200 whose To tag is a keyed early dialog's tag and whose From tag (or AoRs) is new
each time claims a new slot in the shared ``replay_claims`` per datagram: review 44's
and review 46's hole through a third door.  One keyed early dialog is enough (any live
call's Call-ID and tag, read off the wire; an insider's own signed INVITE; with
``[policy] legacy_peers`` a stranger's own unsigned one), and it stays keyed 200 s.

Fixed: an INVITE 2xx takes its fork slot only when a key or a signed context touches it
(review 44's rule again; a plaintext or bare one takes none, so it cannot squat slot
0); the dialog such a 2xx made takes its slot from the caller's own signed re-INVITE,
which binds its To tag (``_spend``); and a slot is shared across a cluster only when a
signed context is at stake or the early dialog it is named after (Call-ID, From tag)
holds a key.  A control that had the bare 200 claim its slot now has the re-INVITE
claim it.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, TRUSTED, answer, known_proxy, proxy_engine, \
    ua_engine
from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.body import with_entity
from e2m_plugins.keycache import MemoryKeyCache
from e2m_plugins.proxy import LATER_FORK_KEEPER
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki
from kamailio_app.replay_claims import ClaimedReplayCache
from kamailio_app.replay_htable import HtableReplayCache
from tests.cluster.test_replay_claims import _Claims
from tests.unit.test_review12 import SDP_VIEW, _invite
from tests.unit.test_review46 import LATER, LEGACY, _Call, _node, stranger_body


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


def _sent_nowhere(message: SipMessage, n: int) -> SipMessage:
    """The attacker's Via below the proxy's: the proxy sends the response on to a sink
    of the attacker's (or to alice's phone, which drops a response to none of its
    transactions), so alice never sees it."""
    return message.add("Via", f"SIP/2.0/UDP 192.0.2.66:5060;branch=z9hG4bK-r48-sink-{n}")


def _squatting_200(call: _Call, tag: str, *, sdp: bool) -> SipMessage:
    """A 200 to alice's INVITE the attacker writes from its ids (Call-ID, From tag, the
    AoRs, the proxy's Via): a made-up To tag, no body or a plaintext SDP, nothing signed."""
    ok = make_response(call.delivered, 200, "OK", [("Contact", "<sip:x@192.0.2.66>")],
                       SDP_ANSWER if sdp else b"", "application/sdp" if sdp else None)
    return _sent_nowhere(ok.replace("To", f"{call.delivered.get('To')};tag={tag}"), 0)


def _answered(world, call_id: str, *, squat: bool, sdp: bool = False, after: bool = False):
    """alice calls bob (her offer key kept by the proxy); bob answers with his signed and
    sealed 200 (To tag b1), under her key.  ``squat``: the attacker's 200 reaches the
    proxy first (``after``: just after bob's)."""
    call = _Call(world, call_id)
    if squat and not after:
        assert call.proxy.inspect(_squatting_200(call, "x1", sdp=sdp),
                                  caller=call.who).action == "forward"
    ok = call.bob.protect(answer(call.delivered, to_tag="b1"))
    assert ok.info.key_reuse and ok.info.signed
    call.response(ok.message)
    if squat and after:
        assert call.proxy.inspect(_squatting_200(call, "x1", sdp=sdp),
                                  caller=call.who).action == "forward"
    return call


# --------------------------------------------------------------------------- hole 1

@pytest.mark.parametrize("sdp", [False, True], ids=["bare", "plaintext"])
def test_hole_a_made_up_200_first_takes_slot_0_and_the_callers_refresh_gets_496(world, sdp):
    """Attacker: anyone who has alice's INVITE's ids and can get a response read by the
    proxy before bob's answer: an untrusted hop between the proxy and bob (it sees the
    Via branch, so tm takes the 200 as the transaction's), a device on another branch of
    the fork (its own branch's 200s are the transaction's too), or, on a cluster, anyone
    who read Call-ID, From tag and AoRs off the wire (a stray reply is read too,
    ``kemi.route_stray_reply``).

    Steps: alice (E2M phone, every default) calls bob, offering her SDP's CEK for reuse;
    the proxy keeps it in the early scope (Call-ID, a1).  While bob rings, the attacker
    sends one "200 OK" to her INVITE with To tag ``x1``, no body (or a plaintext SDP),
    and a second Via of its own, so the proxy reads it and sends it where alice never
    sees it.  bob then answers with his signed 200 (To tag b1) sealed under her key;
    the call runs; alice re-INVITEs under her key at once (passes), and again after
    250 s (a session refresh, hold/resume).

    Effect: the made-up 200 passes ``_confirm_fork`` (the early dialog holds alice's
    key) and takes slot 0 (``admit_fork``); bob's real 200 gets slot 1, so ``_spend``
    copies alice's key into the answered dialog as a later fork's: ``EARLY_DIALOG_TTL``
    (200 s), keeper ``fork:``.  Her refresh after 250 s is answered 496 by her own
    proxy (as every later body bob or she seals under the key).  Four such 200s leave
    the real dialog no slot at all (the same 200 s through ``_spend``'s request
    branch).  At 1438a99 neither kind of 200 took a slot (review 44's gate; a bare one
    was never read).

    Fix: a 2xx that proves nothing (no signed context binding its To tag: body-less or
    plaintext) must not take slot 0 ahead of one that does.  E.g. mark slots taken by
    such a 2xx provisional: a signed 2xx that opens with the early key, or the offerer's
    own signed in-dialog request (its signed context binds the To tag), takes slot 0
    over a provisional holder; or let a provisional holder's copy be kept only for
    ``EARLY_DIALOG_TTL`` and be promoted to the dialog's life by alice's first signed
    request in it."""
    call = _answered(world, f"r48-squat-{sdp}@x", squat=True, sdp=sdp)
    copy = call.dialog_copy()
    later = call.refresh_after_a_while()
    assert later.action == "forward", f"alice's refresh after {LATER:.0f} s: {later.code} " \
                                      f"{later.reason} (her key in the answered dialog: " \
                                      f"keeper {copy.keeper!r})"


def test_control_without_the_made_up_200_the_key_is_kept_for_life(world):
    call = _answered(world, "r48-squat-none@x", squat=False)
    assert call.dialog_copy().keeper != LATER_FORK_KEEPER
    assert call.refresh_after_a_while().action == "forward"


@pytest.mark.parametrize("sdp", [False, True], ids=["bare", "plaintext"])
def test_control_a_made_up_200_after_the_answer_changes_nothing(world, sdp):
    call = _answered(world, f"r48-squat-after-{sdp}@x", squat=True, sdp=sdp, after=True)
    assert call.dialog_copy().keeper != LATER_FORK_KEEPER
    assert call.refresh_after_a_while().action == "forward"


# --------------------------------------------------------------------------- hole 2

def _cluster_node(world):
    """One cluster node (review 44's): its own replay table, the shared claims (a
    stand-in for PostgreSQL's ``replay_claims`` that counts the round trips)."""
    claims, cache = _Claims(), MemoryKeyCache()
    node = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=cache)
    node.replay = ClaimedReplayCache(HtableReplayCache(MemoryHtable(), window=300), claims)
    return node, claims


def _stray_bare_200(world, call_id: str, to_tag: str, n: int) -> SipMessage:
    """A body-less 200 to an INVITE nobody sent: ``call_id``, To tag ``to_tag``, a new
    From tag each time (any AoRs would do as well: they are in the slot's name too)."""
    request = make_request("INVITE", world.aor("bob"), from_uri=world.aor("alice"),
                           to_uri=world.aor("bob"), call_id=call_id, cseq=1,
                           from_tag=f"f{n}")
    ok = make_response(request, 200, "OK", [])
    return _sent_nowhere(ok.replace("To", f"{request.get('To')};tag={to_tag}"), n)


def _keyed_call(world, node, call_id: str):
    """alice's signed INVITE through ``node``, offering her key: its early dialog is keyed."""
    home = known_proxy(world, TRUSTED, SDP_VIEW)
    alice = ua_engine(world, "alice", proxies=(home,))
    offer = alice.protect(_invite(world, "alice", "bob", call_id)).message
    assert node.inspect(offer).action == "forward"
    return offer


def test_hole_stray_bare_200s_under_a_keyed_tag_each_claim_a_shared_slot(world):
    """Attacker: anyone who can send UDP to a cluster node's SIP port and knows the
    Call-ID and From tag of one call ringing in the last 200 s (an untrusted hop, a
    forked branch's device, a callee, anyone who reads SIP over UDP), or an insider who
    makes one of her own with a signed INVITE.

    Steps: alice's INVITE (Call-ID C, From tag a1) offers her key; node A keeps it in
    the early scope (C, a1).  The attacker sends 50 "200 OK"s to an INVITE, no body,
    Call-ID C, To tag ``a1``, a new From tag each (``f0``, ``f1``, ...), a second Via
    to a sink.

    Effect: each is read (every INVITE 2xx is read, a stray one too on a cluster);
    ``_early_keyed`` finds a key under (C, a1), one of the 2xx's two early scopes, so
    ``_confirm_fork`` calls ``_fork`` with ``shared=True``, whose slot is named by C,
    the *From* tag and the AoRs: a new early dialog each time.  50 datagrams, 50
    PostgreSQL INSERTs in SIP workers (``ClaimedReplayCache._claim_slot``), 50 rows
    living 333 s and 50 replicated ``e2mseen`` slot items; with new From tags or AoRs
    without end, for as long as the early scope is keyed (200 s; any new call renews
    the supply).  Review 44's and 46's hole again.

    Fix: ask about the early dialog the slot is named after, and its parties: a 2xx
    grows from the early scope of its *From* tag (the INVITE's), so ``_early_keyed``
    should look at ``DialogScope(call_id, from_tag)`` only, and a kept key there counts
    only if it was kept for this 2xx's two AoRs (``kept_namer``'s prefix: e.g. keep the
    parties' digest in the record, or ``holds(scope, parties)``).  Then each keyed early
    dialog has at most ``MAX_FORKS`` shared slots, whatever the attacker sends."""
    node, claims = _cluster_node(world)
    offer = _keyed_call(world, node, "r48-flood@x")
    before = claims.asked
    for n in range(50):
        assert node.inspect(_stray_bare_200(world, "r48-flood@x", offer.from_tag, n)
                            ).action == "forward"
    added = claims.asked - before
    assert added <= 4, f"{added} claims in the shared database for 50 stray body-less " \
                       "200s naming one keyed early dialog's tag"


def test_hole_a_stranger_keys_an_early_dialog_then_each_stray_claims_a_shared_slot(world):
    """Attacker: a stranger (no certificate, no account, no call to observe) who can send
    UDP to a cluster node's SIP port, on a cluster with ``[policy] legacy_peers``.

    Steps: one INVITE of its own (From a made-up AoR, To a user of the legacy domain,
    Call-ID C, tag m1) carrying review 46's unsigned AES-GCM envelope for the proxy's
    public certificate with a ``CEKReference``: a legacy body needs no signed context,
    so the proxy keeps the key in the early scope (C, m1) (unsigned keeper).  Then 50
    body-less stray 200s, Call-ID C, To tag m1, a new From tag each.

    Effect: review 46's fix keeps the 200s that *offer* an unsigned key local, but these
    offer none: ``_early_keyed`` finds the stranger's own key under (C, m1), so each
    200 claims a new shared slot: 50 datagrams, 50 INSERTs and rows.

    Fix: as the hole above (the From tag's early scope, the 2xx's parties); and an
    unsigned key (``UNSIGNED_KEEPER``) should not make a slot shared (review 46's own
    rule: "only when a signed context or a kept key is at stake")."""
    node, claims, _ = _node(world)
    request = make_request("INVITE", f"sip:dave@{LEGACY}", from_uri="sip:mallory@stranger.example",
                           to_uri=f"sip:dave@{LEGACY}", call_id="r48-mine@attacker.example",
                           cseq=1, from_tag="m1", body=SDP_OFFER, content_type="application/sdp")
    assert node.inspect(with_entity(request, stranger_body(world))).action == "forward"
    before = claims.asked
    for n in range(50):
        assert node.inspect(_stray_bare_200(world, "r48-mine@attacker.example", "m1", n)
                            ).action == "forward"
    added = claims.asked - before
    assert added <= 4, f"{added} claims in the shared database for 50 stray body-less 200s " \
                       "after one unsigned INVITE of the stranger's"


def test_control_stray_bare_200s_for_an_unkeyed_call_claim_nothing(world):
    """Review 46's rule holds where no key is kept: the same 50 strays, for a Call-ID
    no INVITE keyed, claim nothing."""
    node, claims = _cluster_node(world)
    for n in range(50):
        assert node.inspect(_stray_bare_200(world, "r48-nobody@x", "a1", n)).action == "forward"
    assert claims.asked == 0


def test_control_after_a_bare_200_her_reinvite_claims_the_slot_once(world):
    """The keyed call answered with no body (the answer went in a reliable 183): the
    200 claims nothing; alice's own signed re-INVITE under her key, which binds its To
    tag, takes the answered dialog's slot across the cluster, once (review 46 needs
    it)."""
    call = _Call(world, "r48-real@x")
    claims = _Claims()
    call.proxy.replay = ClaimedReplayCache(HtableReplayCache(MemoryHtable(), window=300),
                                           claims)
    ok = make_response(call.delivered, 200, "OK", [])
    call.response(ok.replace("To", f"{call.delivered.get('To')};tag=b1"))
    assert claims.asked == 0
    assert call.reinvite(2).action == "forward"
    assert sorted(name[0] for name in claims.held) == ["f", "r"]   # its slot, its record
    assert call.dialog_copy().keeper != LATER_FORK_KEEPER