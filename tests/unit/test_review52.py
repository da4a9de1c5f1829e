"""A fifty-second attacker's review (December 2026) of 1c8d0f2: the proxy's keys for
unvouched INVITE 2xx after review 50 (``git show a120f3c -- e2m_plugins/proxy.py
kamailio_app/kemi.py``).

``test_hole_*`` xfail strictly on 1c8d0f2 (their assertion is what a fix makes true);
``test_control_*`` are the same flows without the attack (they pass).

Fixed by withdrawing the copies: ``_keep_unvouched`` and ``request_kept`` are gone, and a
bodiless INVITE 2xx is again forwarded unread.  The tests now send the same 200s through
``inspect`` as any response (what Kamailio hands over), and guard that none of them keeps
a key.  Review 50's hole 2, which the copies were for, is a known limit again
(``tests/unit/test_review50.py``).

Since a120f3c an INVITE 2xx in its own transaction that took no fork slot
(``ProxyEngine._keep_unvouched``) copies the keys its INVITE kept (``request_kept``,
Kamailio's ``$avp(e2m_kept)``) from the early scope (Call-ID, From tag) into its own
dialog scope (Call-ID, From tag, *its* To tag), ``ttl=None`` (``DIALOG_TTL``, 12 h), as
the caller's (her keeper, her quota), "at most ``MAX_FORKS`` dialogs per early dialog and
node": counted by ``admit_fork("unvouched\\n<Call-ID>\\n<tag>\\n<first AoR>\\n<second
AoR>", <To tag>, MAX_FORKS)``.

Hole 1 (the bound is per pair of AoRs the *2xx* writes): the counter's name holds the
2xx's own From and To AoRs (``dialog_parties(response)``), not the INVITE's, and
nothing checks that they are the INVITE's.  tm matches a reply to its transaction by
the Via branch alone, so anyone who sees the branch (the callee, any hop past the
proxy) answers alice's INVITE with bare 200s, each with a new To AoR and To tag: each
names a fresh counter, so every one copies alice's key into a new dialog scope for 12 h
on her quota.  1,300 datagrams: about 1,250 copies (review 50's own test sends 20 with
one To AoR, which stays at 4); they fill her keeper quota (``max_entries // 8``) with
long-lived keys for 12 h, so each key she keeps from then on pushes out her oldest
long-lived one: a live call's (older than the copies).  Her next INVITE takes her
live call's key, and her re-INVITE in that call is answered 496 by her own proxy.

Hole 2 (copies under made-up tags outlive the call, 12 h, on her quota): even with the
same AoRs, the up to ``MAX_FORKS`` copies are all for a dialog's life; a made-up tag's
dialog never sees a BYE, and the real dialog's BYE (``end_dialog``:
``drop_scope`` of its own scope and its names in the early scopes) leaves them.  A hop
(or the callee) sends three bare 200s with made-up To tags in the transaction, next to
bob's real (sealed, vouched) 200: after the BYE alice's key stays kept in three
dialogs for 12 h, on her quota.  Before a120f3c a bare 200 kept nothing, and a later
fork's vouched 2xx keeps the key 200 s under the shared ``fork:`` keeper (the
``_fork`` rule: "only the first keeps keys for a dialog's life").
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, answer, apply_forward, known_proxy, ua_engine
from e2m_plugins.keycache import DialogScope
from e2m_plugins.proxy import EARLY_DIALOG_TTL, MAX_FORKS
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review12 import SDP_VIEW, _invite
from tests.unit.test_review46 import LATER, _Call, _reliable_183_then_bare_200
from tests.unit.test_review48 import _sent_nowhere


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


class _Shared(_Call):
    """alice calls bob through a proxy and cache another call already uses (review 46's
    ``_Call`` with its proxy, cache and clock handed in)."""

    def __init__(self, world, call_id: str, on: _Call) -> None:   # noqa: D107
        self.world, self.call_id = world, call_id
        self.now, self.cache, self.proxy = on.now, on.cache, on.proxy
        home = known_proxy(world, TRUSTED, SDP_VIEW)
        self.alice = ua_engine(world, "alice", proxies=(home,))
        self.bob = ua_engine(world, "bob", proxies=(home,))
        offer = self.alice.protect(_invite(world, "alice", "bob", call_id)).message
        verdict = self.proxy.inspect(offer)
        assert verdict.action == "forward", f"{verdict.code} {verdict.error}"
        self.who = self.proxy.answer_caller(offer, verdict)
        self.kept = verdict.kept
        self.delivered = self.bob.open(apply_forward(offer, verdict)).message


def _bare_200(call: _Call, to_tag: str, to_user: str | None = None, n: int = 0) -> SipMessage:
    """A 200 to alice's INVITE in its transaction (the proxy's Via branch, as the callee
    and every hop past the proxy see it), no body; ``to_user``: another To AoR.  The
    attacker's own Via on top sends the proxy's copy to a sink, so alice never sees it."""
    ok = make_response(call.delivered, 200, "OK", [("Contact", "<sip:x@192.0.2.66>")])
    to = call.delivered.get("To")
    if to_user is not None:
        to = f"<sip:{to_user}@{call.world.domain}>"
    return _sent_nowhere(ok.replace("To", f"{to};tag={to_tag}"), n)


def _dialogs_holding_her_key(call: _Call) -> int:
    """Confirmed dialogs of this call's Call-ID that hold a live key (any To tag)."""
    return len({scope for (scope, _), entry in call.cache._entries.items()
                if isinstance(scope, DialogScope) and scope.call_id == call.call_id
                and len(scope.tags) == 2 and call.now[0] < entry.expires})


def _flood(call: _Call, count: int) -> None:
    for n in range(count):
        call.proxy.inspect(_bare_200(call, f"x{n}", to_user=f"bob{n}", n=n),
                           caller=call.who)


def _bye(call: _Call, to_tag: str = "b1") -> None:
    bye = make_request("BYE", f"sip:bob@{call.world.domain}", from_uri=call.world.aor("alice"),
                       to_uri=call.world.aor("bob"), call_id=call.call_id, cseq=5,
                       from_tag="a1", to_tag=to_tag)
    assert call.proxy.inspect(bye).action == "forward"
    # bob's 200 through the proxy's transaction ends the dialog's keys (review 92)
    call.proxy.end_answered("BYE", 200, bye.call_id, bye.from_tag, bye.to_tag)


# --------------------------------------------------------------------------- hole 1

def test_hole_each_200_with_a_new_to_aor_copies_her_key_for_12_h(world):
    """Attacker: the callee (an insider whose phone got the INVITE, Via branch and all),
    or any untrusted hop past the proxy: whoever sees the proxy's Via branch of alice's
    INVITE.  No certificate, nothing signed.

    Steps: alice's signed INVITE (Call-ID C, tag a1) offers her key; the proxy keeps it
    in the early scope and hands its name to the transaction (``$avp(e2m_kept)``).  The
    attacker sends 100 "200 OK"s to that INVITE through the proxy's branch, no body,
    each with ``To: <sip:bob<n>@example.com>;tag=x<n>`` (a new AoR and tag each) and
    its own Via on top (a sink: alice never sees them).

    Effect: each is in the transaction, so ``_keep_unvouched`` runs; the counter it
    asks (``admit_fork("unvouched\\nC\\na1\\n<first>\\n<second>", ...)``) is named after
    the 2xx's AoRs, new each time, so slot 0 is free every time: alice's key is copied
    into dialog (C, a1, x<n>) for 12 h (``ttl=None``) as hers, 100 copies where review
    50 promises "at most four such dialogs per early dialog and node".

    Fix: name the counter after the INVITE's parties, not the 2xx's (e.g. drop the
    AoRs from the name: the Call-ID and the From tag of a transaction of ours already
    name one early dialog), or copy only when the 2xx's two AoRs are those the kept
    names bind (``kept_namer(response)(reference)`` equals the name kept: the copy is
    useless under other parties anyway)."""
    call = _Call(world, "r52-aors@x")
    _flood(call, 100)
    assert _dialogs_holding_her_key(call) <= MAX_FORKS, \
        f"{_dialogs_holding_her_key(call)} dialogs hold alice's key for 12 h after 100 bare 200s"


def test_hole_the_copies_fill_her_quota_and_push_out_her_live_calls_key(world):
    """Attacker: as above (the callee of one of alice's calls, or a hop past the proxy
    on it).

    Steps: alice is in a call with bob (call A: bob's signed 200 sealed under her offer
    key, which the proxy keeps for the dialog's life).  She calls someone through the
    attacker (call F): 1,300 bare 200s in F's INVITE transaction, each with a new To
    AoR and tag, as above (her quota on this cache, ``max_entries // KEEPER_SHARE``, is
    1,250).  Then alice places one more call (call B, just its INVITE: any key she
    offers will do), and re-INVITEs in call A under her key (a hold, a refresh).

    Effect: the copies are long-lived keys of alice's keeper and fill her quota (the
    copying stops only when F's early key, short-lived, is the one her quota drops).
    From then on, for 12 h, every key alice keeps costs her oldest long-lived key
    (``MemoryKeyCache._trim_keeper``: short-lived first but never the newest, then the
    oldest; the Kamailio sweep's ``over_quota`` likewise): her live calls' keys, which
    are older than the flood's copies.  B's INVITE pushes out call A's key, and her
    re-INVITE in call A is answered 496 by her own proxy (and bob's bodies sealed under
    it are unreadable).  One call through a hostile party takes E2M key reuse from each
    of alice's live calls in turn for 12 h (on a cluster each copy is a replicated
    record too).

    Fix: as above (at most ``MAX_FORKS`` copies per INVITE, whatever the 2xx's To says);
    and give the copies past the first dialog a later fork's terms
    (``EARLY_DIALOG_TTL``, ``LATER_FORK_KEEPER``), so no 2xx nothing vouches for adds
    long-lived keys to a party's quota past one dialog."""
    live = _Call(world, "r52-live@x")
    live.response(live.bob.protect(answer(live.delivered, to_tag="b1")).message)
    live.now[0] += LATER                     # the call runs; its early copy has expired
    _flood(_Shared(world, "r52-flooded@x", live), 1300)
    _Shared(world, "r52-next@x", live)       # her next call's INVITE keeps its key
    later = live.reinvite(2)
    assert later.action == "forward", f"alice's re-INVITE in her live call: {later.code} " \
                                      f"{later.reason} ({later.detail})"


def test_control_the_same_flood_with_the_invites_to_aor_copies_nothing(world):
    """The 200s keeping bob's AoR: no copy (review 50's path is withdrawn; under it they
    stayed at ``MAX_FORKS``), and her live call's re-INVITE after her next call's INVITE
    passes."""
    live = _Call(world, "r52-live-ctl@x")
    live.response(live.bob.protect(answer(live.delivered, to_tag="b1")).message)
    live.now[0] += LATER
    flooded = _Shared(world, "r52-flooded-ctl@x", live)
    for n in range(1300):
        flooded.proxy.inspect(_bare_200(flooded, f"x{n}", n=n), caller=flooded.who)
    assert _dialogs_holding_her_key(flooded) == 0
    _Shared(world, "r52-next-ctl@x", live)
    assert live.reinvite(2).action == "forward"


# --------------------------------------------------------------------------- hole 2

@pytest.mark.parametrize("how", ["sealed", "100rel"])
def test_hole_made_up_tags_keep_her_key_12_h_after_the_bye(world, how):
    """Attacker: the callee, or any untrusted hop past the proxy (it sees the INVITE's
    Via branch).

    Steps: alice calls bob offering her key; bob answers (``sealed``: his signed 200
    sealed under her key, which takes fork slot 0; ``100rel``: his answer in a reliable
    183 and a bare 200, review 50's own flow).  In the same transaction the attacker
    sends three bare 200s with bob's To AoR and made-up To tags x0, x1, x2 (its own Via
    on top: alice never sees them, never ACKs or BYEs them).  The call ends with alice's
    BYE (To tag b1); 250 s pass.

    Effect: each made-up tag took an unvouched slot, so alice's key was copied into
    (C, a1, x<n>) for the dialog's life, as hers.  The BYE ends (C, a1, b1) and its
    names in the early scopes, not those dialogs: her key stays kept 12 h after the
    call, in three dialogs no party has, on her quota.  Before a120f3c a bare 200 kept
    nothing, and a second dialog's vouched 2xx keeps the key 200 s under the shared
    ``fork:`` keeper ("only the first keeps keys for a dialog's life").

    Fix: give an unvouched copy beyond the early dialog's first dialog a later fork's
    terms (``EARLY_DIALOG_TTL``, ``LATER_FORK_KEEPER``), and none at all when the early
    dialog's vouched slot 0 is taken by another tag (the sealed 200 answered it); or let
    the answered dialog's BYE end the unvouched copies of its early dialog."""
    call = _Call(world, f"r52-bye-{how}@x")
    if how == "sealed":
        call.response(call.bob.protect(answer(call.delivered, to_tag="b1")).message)
    else:
        progress, ok = _reliable_183_then_bare_200(call)
        call.response(progress)
        call.response(ok)
    for n in range(3):
        call.proxy.inspect(_bare_200(call, f"x{n}", n=n), caller=call.who)
    _bye(call)
    call.now[0] += LATER
    assert _dialogs_holding_her_key(call) == 0, \
        f"{_dialogs_holding_her_key(call)} dialogs hold alice's key {LATER:.0f} s after her BYE"


@pytest.mark.parametrize("how", ["sealed", "100rel"])
def test_control_the_same_call_without_made_up_tags_keeps_nothing_after_the_bye(world, how):
    call = _Call(world, f"r52-bye-ctl-{how}@x")
    if how == "sealed":
        call.response(call.bob.protect(answer(call.delivered, to_tag="b1")).message)
    else:
        progress, ok = _reliable_183_then_bare_200(call)
        call.response(progress)
        call.response(ok)
    assert call.reinvite(2).action == "forward"
    assert _dialogs_holding_her_key(call) == 1
    _bye(call)
    call.now[0] += LATER
    assert _dialogs_holding_her_key(call) == 0


def test_control_a_vouched_later_forks_key_keeps_the_early_expiry(world):
    """The ``_fork`` rule hole 2 is measured against: a second dialog's signed 200 sealed
    under her key (bob's other device) keeps it ``EARLY_DIALOG_TTL`` only."""
    call = _Call(world, "r52-fork-ctl@x")
    call.response(call.bob.protect(answer(call.delivered, to_tag="b1")).message)
    call.response(call.bob.protect(answer(call.delivered, to_tag="b2")).message)
    assert _dialogs_holding_her_key(call) == 2
    _bye(call)
    call.now[0] += EARLY_DIALOG_TTL + 1
    assert _dialogs_holding_her_key(call) == 0


# --------------------------------------------------------------------------- hole 3

def _ringing_then_answered(world, call_id: str, *, copy: bool, bye: bool) -> _Call:
    """alice's INVITE rings; the attacker (``copy``) sends a bare 200 with a made-up To
    tag x0 through the INVITE's branch (to a sink) and (``bye``) a BYE From alice's tag
    a1 To tag x0 through the proxy; then bob answers with his signed 200 sealed under
    her offer key (To tag b1)."""
    call = _Call(world, call_id)
    if copy:
        call.proxy.inspect(_bare_200(call, "x0"), caller=call.who)
    if bye:
        _bye(call, to_tag="x0")
    call.response(call.bob.protect(answer(call.delivered, to_tag="b1")).message)
    return call


def test_hole_a_made_up_200_then_its_bye_drops_the_ringing_calls_key(world):
    """Attacker: the callee's side or any untrusted hop past the proxy (it sees the
    INVITE's Via branch and ids), while alice's call rings.

    Steps: a bare 200 to alice's INVITE through its branch, To tag x0 (made up), its own
    Via on top (a sink: alice never sees it); then a BYE, Call-ID C, From alice tag a1,
    To bob tag x0, through the proxy (bob's phone answers it 481: it does not matter).
    bob then answers for real: his signed 200, To tag b1, sealed under alice's key.

    Effect: the bare 200 copies alice's key into (C, a1, x0) (``_keep_unvouched``); the
    BYE ends that dialog, and ``drop_scope`` takes the names it holds from its early
    scopes too: alice's offer key in (C, a1) goes while the call still rings.  bob's
    sealed answer is then unreadable to the proxy (its SDP missing from the archive), no
    key is kept for the answered dialog, and alice's re-INVITE under her key is answered
    496 by her own proxy.  Review 45's rule ("a BYE for a dialog that never was takes no
    party's key") held because nothing could put a party's name in a made-up dialog
    without a body; the unvouched copy does it with a bare 200.

    Fix: ``_keep_unvouched`` must not make a dialog whose BYE ends the early copy: e.g.
    mark unvouched copies so that ``drop_scope`` takes only the dialog's own copy (not
    the early scope's) unless the dialog holds the early dialog's vouched slot 0, or
    copy only for the first unvouched 2xx and only when no other dialog of the early one
    holds a slot."""
    call = _ringing_then_answered(world, "r52-ringing@x", copy=True, bye=True)
    later = call.reinvite(2)
    assert later.action == "forward", f"alice's re-INVITE: {later.code} {later.reason}"


@pytest.mark.parametrize("copy, bye", [(False, True), (True, False)])
def test_control_the_bye_alone_or_the_200_alone_leaves_her_key(world, copy, bye):
    """Review 45's fix (a BYE with a made-up tag alone ends nothing), and the made-up 200
    alone (it takes no slot from bob's answer)."""
    call = _ringing_then_answered(world, f"r52-ringing-{copy}-{bye}@x", copy=copy, bye=bye)
    assert call.reinvite(2).action == "forward"
