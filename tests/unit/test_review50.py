"""A fiftieth attacker's review (December 2026) of ce67e30: the proxy's fork slots and
cluster claims after review 48 (``git show c5fceec -- e2m_plugins/proxy.py kamailio_app``).

``test_hole_*`` xfail strictly on ce67e30 (their assertion is what a fix makes true);
``test_control_*`` are the same flows without the attack (they pass).

Since c5fceec a fork slot is shared across the cluster (``admit_fork(shared=True)``, one
``replay_claims`` INSERT per new slot) when the 2xx carries a signed context, or when
``_early_keyed`` finds *any* key under ``DialogScope(Call-ID, From tag)``: the early
dialog the slot is named after, by Call-ID and tag only.  The slot's name also holds
the 2xx's two AoRs (``dialog_parties``), which ``_early_keyed`` does not look at, and
the key found may be an unsigned one (``UNSIGNED_KEEPER``) the stranger kept itself.
Review 48 proposed both checks ("a kept key there counts only if it was kept for this
2xx's two AoRs"; "an unsigned key should not make a slot shared"); neither is in
c5fceec.

Hole 1 (shared claims at packet rate, once more): with ``[policy] legacy_peers``, a
stranger's one unsigned key-offering INVITE keys the early dialog (C, m1); then each
stray 200 under Call-ID C and From tag m1, with a new To AoR in the legacy domain (a new
slot name each time: slot 0 of a new early dialog) and review 46's unsigned key-offering
envelope, claims a new shared slot: one INSERT and one row per datagram, and a key kept
per datagram.  Review 46's rule ("a stranger's unsigned key-offering strays are decided
by the node alone") is bypassed by the stranger's own INVITE; review 48's fix (the From
tag's scope only) changes which tag the strays must carry, not their number.  The same
works under any live call's keyed early dialog (Call-ID and From tag read off the wire).

Hole 2 (a legitimate call, a late first refresh): a 2xx that nothing vouches for (a
plaintext 200, or a body-less one after the answer in a reliable 183) takes no slot and
moves nothing since c5fceec; the dialog's copy of the caller's key is left to her first
signed re-INVITE.  Her key waits for it in the early scope, which expires
``EARLY_DIALOG_TTL`` (200 s) after her INVITE: a first re-INVITE later than that (a
session-timer refresh, 900 s by default) finds no key and her own proxy answers 496.
Review 46's and 48's tests re-INVITE at once first, which hides it.  (Not new in
c5fceec: db5870b's slot taken by the bare 200 moved no key either.)

Fixed (hole 1): a slot is shared across the cluster only with a signed context, or when a
key a signed body offered opened the 2xx (``_signers_key_opened``: kept names bind the two
AoRs; an unsigned or later fork's key never counts).

Hole 2 is a known limit.  A fix (the INVITE 2xx, in its own transaction, copying the
INVITE's keys into its dialog) was made and withdrawn: review 52 showed the callee or a
hop past the proxy (both see the branch) could use those copies to fill the caller's
quota, keep her key 12 h after the call, and, with a BYE for a made-up dialog, take the
ringing call's key (``tests/unit/test_review52.py``).  What is left costs one 496 and
the phone's retry under a fresh key, for the first re-INVITE after 200 s of a call
answered in plaintext or by a bodiless 200 after a reliable 183.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, TRUSTED, answer
from e2m_plugins.body import with_entity
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review46 import LATER, LEGACY, _Call, _node, _plaintext_200, \
    _reliable_183_then_bare_200, stranger_body
from tests.unit.test_review48 import _keyed_call, _sent_nowhere


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


STRANGER = "sip:mallory@stranger.example"


def _stranger_invite(world, call_id: str) -> SipMessage:
    """The stranger's own INVITE to a legacy-domain user, with review 46's unsigned
    envelope for the proxy offering its CEK: the proxy keeps it under (``call_id``, m1)."""
    request = make_request("INVITE", f"sip:dave@{LEGACY}", from_uri=STRANGER,
                           to_uri=f"sip:dave@{LEGACY}", call_id=call_id, cseq=1,
                           from_tag="m1", body=SDP_OFFER, content_type="application/sdp")
    return with_entity(request, stranger_body(world))


def _stray_keyed_200(call_id: str, from_uri: str, from_tag: str, n: int, entity) -> SipMessage:
    """A 200 to an INVITE nobody sent: Call-ID ``call_id``, From tag ``from_tag`` (a keyed
    early dialog's), a new legacy-domain To AoR and To tag each time, the same unsigned
    key-offering envelope for the proxy."""
    request = make_request("INVITE", f"sip:d{n}@{LEGACY}", from_uri=from_uri,
                           to_uri=f"sip:d{n}@{LEGACY}", call_id=call_id, cseq=1,
                           from_tag=from_tag, body=SDP_ANSWER, content_type="application/sdp")
    return _sent_nowhere(with_entity(answer(request, to_tag=f"t{n}"), entity), n)


def test_hole_a_strangers_own_invite_makes_each_legacy_stray_claim_a_shared_slot(world):
    """Attacker: a stranger (no certificate, no account, no call to observe) who can send
    UDP to a cluster node's SIP port, on a cluster whose proxies name ``[policy]
    legacy_peers``.

    Steps: one INVITE of its own (From ``mallory@stranger.example`` tag m1, To
    ``dave@<legacy domain>``, Call-ID C) with review 46's unsigned AES-GCM envelope for
    the proxy's public certificate offering its CEK: the proxy keeps that key in the
    early scope (C, m1).  Then 50 "200 OK"s to an INVITE, Call-ID C, From
    ``mallory`` tag m1, To ``d<n>@<legacy domain>`` tag ``t<n>`` (new each time), each
    carrying the same unsigned key-offering envelope.

    Effect: each 200 is legacy (no signed context needed) and offers a key, so ``_view``
    calls ``_fork``; ``_early_keyed`` finds the stranger's own key under (C, m1) (the
    From tag's scope, review 48's fix), so the slot is ``shared``; its name holds the new
    To AoR, so it is slot 0 of a new early dialog each time, claimed in the database
    (``ClaimedReplayCache._claim_slot``): 50 datagrams, 50 PostgreSQL INSERTs in SIP
    workers, 50 ``replay_claims`` rows (333 s) and 50 replicated ``e2mseen`` items, and
    ``_keep_keys`` keeps each 200's key as fork 0's (no early expiry).  Reviews 44, 46
    and 48's hole through a fourth door: "a stranger's unsigned key-offering strays are
    decided by the node alone" holds only until the stranger sends one INVITE.

    Fix: make ``_early_keyed`` count only a key kept for the 2xx's own two AoRs (its
    kept name's prefix, ``kept_namer``: e.g. ``holds(scope, parties)``, or keep the
    parties' digest in the record) and only a signed one (a key kept under
    ``UNSIGNED_KEEPER`` proves nothing of anyone, so it must not make a slot shared:
    review 48's own suggestion).  Then each keyed early dialog has at most
    ``MAX_FORKS`` shared slots, and a stranger's none."""
    node, claims, cache = _node(world)
    call_id = "r50-mine@attacker.example"
    assert node.inspect(_stranger_invite(world, call_id)).action == "forward"
    entity = stranger_body(world)
    before, kept = claims.asked, len(cache)
    for n in range(50):
        assert node.inspect(_stray_keyed_200(call_id, STRANGER, "m1", n, entity)
                            ).action == "forward"
    added = claims.asked - before
    assert added <= 4, f"{added} claims in the shared database (and {len(cache) - kept} " \
                       "kept keys) for 50 stray 200s after one unsigned INVITE of the stranger's"


def test_hole_a_live_calls_keyed_tag_makes_each_legacy_stray_claim_a_shared_slot(world):
    """Attacker: anyone who can send UDP to a cluster node's SIP port and read one
    ringing call's Call-ID and From tag (an untrusted hop, a forked branch's device, SIP
    over UDP read on the way), on a cluster with ``[policy] legacy_peers``.

    Steps: alice's signed INVITE (Call-ID C, tag a1) offers her key; the node keeps it
    under (C, a1).  The attacker sends 50 stray 200s, Call-ID C, From alice tag a1, To
    a new legacy-domain user and To tag each time, with the unsigned key-offering
    envelope.

    Effect: as above: alice's key under (C, a1) makes every stray's slot shared, and
    each names a new early dialog (its To AoR): 50 INSERTs and rows.

    Fix: as above (a key kept for the 2xx's own two AoRs, signed, makes it shared)."""
    node, claims, _ = _node(world)
    offer = _keyed_call(world, node, "r50-live@x")
    entity = stranger_body(world)
    before = claims.asked
    for n in range(50):
        assert node.inspect(_stray_keyed_200("r50-live@x", world.aor("alice"), offer.from_tag,
                                             n, entity)).action == "forward"
    added = claims.asked - before
    assert added <= 4, f"{added} claims in the shared database for 50 stray legacy 200s " \
                       "naming one keyed early dialog's From tag"


def test_control_the_same_strays_without_a_keyed_early_dialog_claim_nothing(world):
    """Review 46's rule where nothing is keyed: the same 50 strays, under a Call-ID no
    INVITE keyed, stay the node's own business."""
    node, claims, _ = _node(world)
    entity = stranger_body(world)
    for n in range(50):
        assert node.inspect(_stray_keyed_200("r50-nobody@attacker.example", STRANGER, "m1", n,
                                             entity)).action == "forward"
    assert claims.asked == 0


# --------------------------------------------------------------------------- hole 2

def _answered_without_vouching(world, call_id: str, how: str) -> _Call:
    """alice calls bob offering her key; bob answers with no 2xx that vouches for the
    dialog: ``plaintext`` (his 200's SDP in the clear; alice runs ``require_e2m =
    false``) or ``100rel`` (his SDP answer in a reliable 183 sealed under her key, then
    a 200 with no body: two E2M phones on every default)."""
    if how == "plaintext":
        call = _Call(world, call_id, require_e2m=False)
        call.response(_plaintext_200(call))
    else:
        call = _Call(world, call_id)
        progress, ok = _reliable_183_then_bare_200(call)
        call.response(progress)
        call.response(ok)
    return call


@pytest.mark.xfail(strict=True, reason="known limit (review 50; the copy that fixed it was "
                   "withdrawn after review 52): a 2xx nothing vouches for leaves the caller's "
                   "key in the early scope, so a first re-INVITE after 200 s gets one 496 "
                   "and the phone's retry under a fresh key")
@pytest.mark.parametrize("how", ["plaintext", "100rel"])
def test_hole_b_the_first_refresh_after_200_s_gets_496(world, how):
    """Attacker: none (a legitimate call: review 46's flows, with the caller's first
    in-dialog request coming when session timers send it, not at once).

    Flow: alice calls bob offering her SDP's CEK for reuse; bob answers with a
    plaintext 200 (alice has ``require_e2m = false``), or with his SDP answer in a
    reliable 183 sealed under her key and a body-less 200 (RFC 3262).  The call runs;
    alice's first re-INVITE (a session refresh, RFC 4028: at half the 1800 s default
    Session-Expires, i.e. 900 s; here after ``LATER`` = 250 s), sealed under her key as
    the 2xx confirmed it.

    Effect: since c5fceec such a 2xx takes no fork slot and moves nothing (``_view``:
    nothing vouches for it, or it has no body), so alice's key stays where her INVITE
    kept it: the early scope (C, a1), ``EARLY_DIALOG_TTL`` (200 s from the INVITE).  The
    slot and the dialog's copy are left to "the caller's own signed re-INVITE"
    (``_spend``), but a re-INVITE that comes after 200 s finds no key anywhere: her own
    proxy answers 496 (her phone retires the key and retries; every later body bob
    seals under her key is refused too).  Review 46's tests send a re-INVITE at once
    first, which moves the key in time and hides this.

    Fix: let the INVITE 2xx that takes no slot still keep the caller's key for the
    dialog it confirms, e.g. copy it into the dialog scope (the caller's keeper, node
    local, at most ``MAX_FORKS`` per early dialog and its parties) with the dialog's
    life, or renew the early copy's expiry to a dialog's until her signed re-INVITE
    claims the slot; or have the caller's phone send no key-reusing body into a dialog
    whose 2xx nothing vouched for."""
    call = _answered_without_vouching(world, f"r50-late-{how}@x", how)
    call.now[0] += LATER
    later = call.reinvite(2)
    assert later.action == "forward", f"alice's first re-INVITE after {LATER:.0f} s: " \
                                      f"{later.code} {later.reason}"


@pytest.mark.parametrize("how", ["plaintext", "100rel"])
def test_control_the_same_call_refreshed_at_once_then_late_passes(world, how):
    """Review 46/48's flow: the first re-INVITE at once moves the key for the dialog's
    life, and the late one passes."""
    call = _answered_without_vouching(world, f"r50-soon-{how}@x", how)
    assert call.refresh_after_a_while().action == "forward"


def test_control_a_sealed_200_then_a_late_first_refresh_passes(world):
    call = _Call(world, "r50-sealed-late@x")
    ok = call.bob.protect(answer(call.delivered, to_tag="b1"))
    call.response(ok.message)
    call.now[0] += LATER
    assert call.reinvite(2).action == "forward"


# ------------------------------------------------ the fix's own bounds (attacks tried on it)

def _bare_200(call: _Call, to_tag: str) -> SipMessage:
    ok = make_response(call.delivered, 200, "OK", [("Contact", "<sip:bob@127.0.0.1:5062>")])
    return ok.replace("To", f"{call.delivered.get('To')};tag={to_tag}")


def _dialogs_holding_her_key(call: _Call) -> int:
    return len({scope for (scope, _) in call.cache._entries
                if getattr(scope, "tags", ()) and len(scope.tags) == 2})


def test_a_stray_bare_200_keeps_nothing_for_a_dialog(world):
    """The same 200 with no transaction of ours behind it (a cluster's stray reply, or
    any answer the host cannot match): no names, nothing kept."""
    call = _Call(world, "r50-stray@x")
    call.proxy.inspect(_bare_200(call, "b1"), caller=call.who)
    assert _dialogs_holding_her_key(call) == 0


def test_sealed_200s_past_max_forks_keep_her_key_for_life_in_one_dialog_only(world):
    """The insider callee (he holds her CEK) answers in the transaction with eight 200s
    sealed under her key, a new To tag each: the first dialog keeps her key for its life,
    the next three as later forks (200 s), the rest nothing; the unvouched path gives
    none of them more."""
    from e2m_plugins.proxy import LATER_FORK_KEEPER, MAX_FORKS
    call = _Call(world, "r50-forks@x")
    for n in range(MAX_FORKS + 4):
        ok = call.bob.protect(answer(call.delivered, to_tag=f"f{n}"))
        assert ok.info.key_reuse
        call.proxy.inspect(ok.message, caller=call.who)
    dialogs = {}
    for (scope, _), entry in call.cache._entries.items():
        if len(getattr(scope, "tags", ())) == 2:
            dialogs.setdefault(scope, []).append(entry.keeper)
    for_life = [s for s, keepers in dialogs.items() if LATER_FORK_KEEPER not in keepers]
    assert len(for_life) == 1 and len(dialogs) == MAX_FORKS, dialogs
