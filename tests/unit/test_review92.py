"""A ninety-second attacker's review (December 2026) of ea4cf0c: in-dialog
requests and dialog keys on the phone and the proxy, fresh eyes (re-INVITE, UPDATE, PRACK,
ACK, BYE, NOTIFY, CEK reuse across a re-INVITE, forks, glare, a CANCEL racing the 200),
with the real engines of ``e2m_lab.flows``.

``test_hole_*`` xfail strictly on ea4cf0c (their assertion is the secure behaviour);
``test_control_*`` are the same flows without the attack, or show that the attack's
messages are taken as far as they should be (they pass).

Hole 1 (``test_hole_a_bye_the_callee_refuses_still_drops_the_live_calls_keys_at_the_proxy``):
attackers: an **insider UA** (alice herself, a party of the call, hiding bob's answers from
the archive and the firewall) or an **untrusted hop** holding the call's route token (or a
third party with the call's ids, signed in as herself).  Messages: in alice's live call
with bob, through a home proxy viewing ``INVITE:application/sdp``: alice's re-INVITE
(CSeq 2, read by the proxy), then at once a bare ``BYE`` with the dialog's Call-ID and both
tags that bob's phone refuses: (a) CSeq 1, below the re-INVITE's (pjsip answers 500, RFC
3261 §12.2.2; ``Require: x`` and a 420 would do as well), or (b) ``From: carol`` with
alice's tag (bob's engine answers 403, ``_check_parties``).  The call goes on.  Effect: the
proxy takes the whole dialog scope on the BYE *request* (``kemi.end_dialog_unread`` ->
``ProxyEngine.end_unread`` -> ``end_dialog`` -> ``KeyCache.drop_scope``), whatever its
parties and whether it ends anything: bob's 200 to the re-INVITE, sealed under the
dialog key as the protocol asks (§2: the proxy that read the offer reads the answer), is
forwarded unread (``ProxyCannotDecryptError``): no archive row, no media line for the
firewall, while alice's phone shows it "readable by proxy.example.com"; every later
re-INVITE of either party is a 496 round trip.  The phone fixed the same thing in reviews
45 and 49 (a BYE ends keys only at its 2xx, and only between its parties); the proxy's
kept *names* bind the parties (review 2) but its *drop* binds neither the parties nor the
outcome.  At fault: ``e2m_plugins/proxy.py`` line 327 (``_inspect_request``: ``BYE`` ->
``end_dialog``) and line 409 (``drop_scope(DialogScope(call_id, from_tag, to_tag))``),
reached from ``kamailio_app/kemi.py`` line 1251 before the BYE is relayed.  Fix: end the
dialog's keys on the BYE's 2xx (the reply route has the transaction: keep the BYE's ids
and parties in an AVP), and drop only the names ``kept_namer`` makes for the BYE's two
AoRs (its parties), as ``DialogKeys.end_dialog`` does at the phone.

Hole 2 (``test_hole_a_stray_493_makes_alices_next_reinvite_go_under_a_key_bob_never_had``):
attacker: an **untrusted hop** (or anyone who has the call's ids; bob's certificate is
public: it rides in every body he signs).  Messages: while alice's re-INVITE (CSeq 2)
waits for bob's 200, a ``493`` with bob's certificate naming the call (alice's and bob's
tags) and ``CSeq: 1 INVITE`` on a Via branch of its own.  pjsip drops it (no transaction),
but the hook hands every accepted E2M answer of a confirmed call to
``UAEngine.react`` (``phone._keep_reaction``: matched by Call-ID and CSeq only, ``_plain``
still holds the INVITE's plaintext).  ``react`` settles nothing for a stray (``_settle``
checks ``_sent_for``, review 38) but ``_learn_493`` runs: every key of the dialog is
retired, and the "retry" it protects (never sent) offers a fresh key as ``CSeq 2 INVITE``.
Bob's real 200 to alice's real CSeq 2 then confirms that phantom key, the newest of the
dialog: alice's next re-INVITE (hold, unhold, a session refresh) is sealed under a key
bob never had: 493 at bob (``NoMatchingRecipientError``), a live call's next request
refused, and one of the call's three E2M retries spent per stray.  A stray 496 naming a
proxy alice accepts (its certificate is public too) does the same through
``_learn_496`` (``retire_held_by`` and a learnt policy).  At fault:
``e2m_plugins/ua.py`` ``react`` (line 1259 on): nothing asks ``_sent_for(response)``
before ``_learn_496``/``_learn_493`` (line 1317 ``retire_held_by``, line 1343
``retire_dialog``) and line 1289 protects a retry that keeps state although the phone may
never send it; ``pjsua_hooks/phone.py`` line 705 matches the answer to ``_plain`` by
(Call-ID, CSeq) without the Via branch.  Fix: ``react`` answers ``Reaction("none")`` for a
response ``_sent_for`` does not know (its Via branch is ours), as ``_settle`` does; the
phone keys ``_plain``/``_reactions`` by the top Via branch too, and the engine offers
keys for a retry only when the retry is sent (``protect`` of the retried request by the
stack, not inside ``react``).

Real processes: hole 1 through Kamailio (``tests/kamailio/test_review92_wire.py``: the
key records go 2 -> 0 on the refused BYE, the next re-INVITE gets 496 from alice's own
proxy), hole 2 on the real phone (``tests/pjsua/test_review92_phone.py``: hold, the stray,
bob's 200, then the phone's unhold cannot be opened by bob).

What held (tried, no test kept unless named):

- moving a signed body between dialogs, CSeqs or methods (an old re-INVITE's body in a new
  dialog or at another CSeq; a re-INVITE whose sealed body names another dialog; To/From
  tags stripped or changed): the signed SipContext binds Call-ID, From tag, CSeq number
  and method, both AoRs, the status and (``e2m-sip-to-tag``) the To tag: refused at the
  phone and the proxy; the same body again in its own dialog is a replay (403);
- a stray 481/200/491 naming a pending re-INVITE's CSeq: ``_settle`` asks ``_sent_for``
  (review 38), nothing dropped or confirmed (the 493/496 path through ``react`` is hole 2);
- glare (491 both ways): each side drops the key its crossing request offered
  (``settle``/``answered``), the proxy only the failed re-INVITE's fresh names
  (``end_attempt``); the next re-INVITE is read;
- a CANCEL racing the 200: the 200 to the CANCEL settles nothing (whole CSeq), a bare
  CANCEL ends nothing at the proxy (``end_unread``), the crossing 200 is read;
- two 2xx from two forks, each with its own body: the first pins ``_confirmed``, our BYE to
  the second ends only its slot; the proxy's later forks keep keys ``EARLY_DIALOG_TTL``;
- an UPDATE, PRACK or re-INVITE with SDP sealed for bob alone past a proxy viewing INVITE
  SDP: 496 (``Rule.covers``); an ACK or a response it cannot read is a known limit;
- CEK reuse across a re-INVITE: reused only when every holder is a host alice would choose
  (review 75); SRTP keys only under an exclusive key; a proxy's RecipientInfo beside a
  kekri carries that message's CEK, never the dialog key;
- a NOTIFY ahead of the SUBSCRIBE's 200 (certificate subscription): the first NOTIFY from
  the proxy's address pins the notifier's tag, so a hop's forged one makes the service's
  own NOTIFYs 481 until the renewal: the same as a hop dropping them (review 26's class of
  denial), not reported; pjsua's SUBSCRIBE/NOTIFY dialogs add no parties entry (review 6);
- a bare NOTIFY/INFO with a made-up To tag under a live Call-ID carrying a
  ``Proxy-Body-Policy``: taught as a dialog policy, but only for a host ``accepts_proxy``
  allows (the hop can put the same header on the real in-dialog messages: by design);
- per-dialog state: 8 keys a slot, 6 slots per Call-ID and pair, 4,096 slots; the phone's
  records per call, ``_update_reactions`` (16), ``_reactions`` (64), ``_sent`` (1,024):
  a peer's endless re-INVITEs grow nothing past those.

Fixed (stop 35): the proxy ends a dialog's keys at the BYE's 2xx, from its own
transaction (``ProxyEngine.end_answered``, called by ``kemi.end_answered_dialog`` in the
tm reply route with the ids of ``$T_req``), never at the request; a bare BYE is relayed
unread (``needs_no_reading``) and ends nothing.  ``UAEngine.react`` follows an E2M answer
only when it answers a request we sent, on its Via branch (``_sent_for`` and
``_answers``); the phone keys its plaintext copies and kept answers by the branch too
(``phone._tx_key``) and counts a stray one.  The core control of the call's own BYE now
hands the proxy bob's 200 to it; the phone hole waits for the stray to be counted, as
the phone no longer reacts to it.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from e2m_lab.flows import (SDP_ANSWER, SDP_VIEW, SRTP_ANSWER, SRTP_OFFER, TRUSTED, answer,
                           apply_forward, invite, known_proxy, proxy_engine, reinvite,
                           ua_engine)
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki

ALICES_NEW_SDP = SDP_ANSWER.replace(b"o=bob", b"o=alice").replace(b"49172", b"49176")
BOBS_NEW_SDP = SDP_ANSWER.replace(b"49172", b"49180")


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="ec")


# --------------------------------------------------------------------------------------
# Hole 1: a BYE the callee refuses ends the live call's keys at the proxy


def _call_through_the_proxy(world, call_id: str):
    """alice calls bob through the home proxy (view INVITE SDP); both phones know it.
    bob's 200 goes under alice's offer key, which the proxy moves into the dialog.
    Returns (proxy, alice, bob)."""
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    home = known_proxy(world, TRUSTED, SDP_VIEW)
    alice = ua_engine(world, "alice", peers=("bob",), proxies=(home,))
    bob = ua_engine(world, "bob", peers=("alice",), proxies=(home,))
    sent = alice.protect(invite(world, call_id=call_id)).message
    verdict = proxy.inspect(sent)
    assert verdict.action == "forward" and verdict.seen
    who = proxy.answer_caller(sent, verdict)
    ok = bob.protect(answer(bob.open(apply_forward(sent, verdict)).message))
    assert ok.info.key_reuse and ok.info.readable_by == (TRUSTED,)
    seen = proxy.inspect(ok.message, caller=who)
    assert seen.seen and seen.error is None
    alice.open(apply_forward(ok.message, seen))
    return proxy, alice, bob


def _bare_bye(world, call_id: str, how: str) -> SipMessage:
    """The BYE bob's phone refuses: a stale CSeq from alice (pjsip: 500), or carol's
    From with alice's tag (the engine: 403)."""
    sender = "alice" if how == "stale-cseq" else "carol"
    return make_request("BYE", "sip:bob@127.0.0.1:5062", from_uri=world.aor(sender),
                        to_uri=world.aor("bob"), call_id=call_id, cseq=1, from_tag="a1",
                        to_tag="b1")


def _reinvite_answered(world, call_id: str, bye: str | None):
    """alice's re-INVITE (CSeq 2) read by the proxy; ``bye``: the refused BYE goes through
    the proxy before bob's 200.  Returns (the proxy's verdict on bob's 200, what alice's
    phone says of it, the proxy and alice)."""
    proxy, alice, bob = _call_through_the_proxy(world, call_id)
    again = alice.protect(reinvite(world, "alice", "bob", call_id, 2, "a1", "b1",
                                   sdp=ALICES_NEW_SDP))
    assert again.info.key_reuse and again.info.readable_by == (TRUSTED,)
    verdict = proxy.inspect(again.message)
    assert verdict.action == "forward" and [s.plaintext for s in verdict.seen] == [ALICES_NEW_SDP]
    who = proxy.answer_caller(again.message, verdict)
    got = bob.open(apply_forward(again.message, verdict)).message
    if bye is not None:
        # kemi: a bare BYE is not read: end_dialog_unread -> end_unread(BYE, $ci, $ft, $tt),
        # which is what inspect does with it too
        assert proxy.inspect(_bare_bye(world, call_id, bye)).action == "forward"
    ok = bob.protect(answer(got, BOBS_NEW_SDP))
    assert ok.info.key_reuse and ok.info.readable_by == (TRUSTED,)   # the proxy should read it
    seen = proxy.inspect(ok.message, caller=who)
    shown = alice.open(apply_forward(ok.message, seen))
    return seen, shown.info, proxy, alice


def test_control_without_the_bye_bobs_answer_to_the_reinvite_is_read(world):
    seen, info, _, _ = _reinvite_answered(world, "r92-ctl@x", None)
    assert seen.error is None and [s.plaintext for s in seen.seen] == [BOBS_NEW_SDP]
    assert [m for m in seen.media]                       # the firewall's media line
    assert info.readable_by == (TRUSTED,)


def test_control_bobs_phone_refuses_the_third_partys_bye(world):
    """The BYE with carol's From and alice's tag is refused by bob's engine (403 class:
    ``BindingMismatchError``), so the call goes on; the stale-CSeq BYE is pjsip's 500."""
    _, _, bob = _call_through_the_proxy(world, "r92-bye@x")
    with pytest.raises(E2MError) as caught:
        bob.open(_bare_bye(world, "r92-bye@x", "third-party"))
    assert type(caught.value).__name__ == "BindingMismatchError"


def test_control_the_refused_bye_is_relayed_by_the_proxy(world):
    """The BYE is well formed and forwarded (a bare BYE is never refused by the engine)."""
    proxy, _, _ = _call_through_the_proxy(world, "r92-fwd@x")
    for how in ("stale-cseq", "third-party"):
        assert proxy.inspect(_bare_bye(world, "r92-fwd@x", how)).action == "forward"


@pytest.mark.parametrize("how", ["stale-cseq", "third-party"])
def test_hole_a_bye_the_callee_refuses_still_drops_the_live_calls_keys_at_the_proxy(world, how):
    seen, info, _, _ = _reinvite_answered(world, f"r92-{how}@x", how)
    assert info.readable_by == (TRUSTED,)       # alice's phone says the proxy read it ...
    assert seen.error is None, f"bob's answer was forwarded unread: {seen.error} {seen.detail}"
    assert [s.plaintext for s in seen.seen] == [BOBS_NEW_SDP]


@pytest.mark.parametrize("how", ["stale-cseq", "third-party"])
def test_hole_after_a_refused_bye_the_next_reinvite_is_refused_by_the_proxy(world, how):
    call_id = f"r92-next-{how}@x"
    proxy, alice, _ = _call_through_the_proxy(world, call_id)
    assert proxy.inspect(_bare_bye(world, call_id, how)).action == "forward"
    again = alice.protect(reinvite(world, "alice", "bob", call_id, 2, "a1", "b1",
                                   sdp=ALICES_NEW_SDP))
    verdict = proxy.inspect(again.message)
    assert verdict.action == "forward", f"{verdict.code} {verdict.error}"


def test_control_the_calls_own_bye_still_ends_its_keys_at_the_proxy(world):
    """What any fix must keep: the call's real BYE (alice's, CSeq above the last) leaves
    nothing for the next request under the dialog key (at its 2xx since stop 35: the
    host's ``end_answered`` for an answer to its own transaction)."""
    call_id = "r92-end@x"
    proxy, alice, _ = _call_through_the_proxy(world, call_id)
    bye = make_request("BYE", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                       to_uri=world.aor("bob"), call_id=call_id, cseq=2, from_tag="a1",
                       to_tag="b1")
    proxy.inspect(bye)
    assert len(proxy.cache) != 0          # fixed (stop 35): not at the request,
    proxy.end_answered("BYE", 200, call_id, "a1", "b1")     # but at bob's 200 to it
    assert len(proxy.cache) == 0


# --------------------------------------------------------------------------------------
# Hole 2: a stray 493 the phone's stack drops still makes the engine retire and re-key


def _srtp_call(world, call_id: str):
    """alice calls bob (no proxy), SRTP offer and answer under alice's exclusive key; then
    alice's re-INVITE (CSeq 2) goes out and waits.  Returns (alice, bob, the INVITE's
    plaintext, the re-INVITE as sent)."""
    alice = ua_engine(world, "alice", peers=("bob",))
    bob = ua_engine(world, "bob", peers=("alice",))
    first = invite(world, call_id=call_id, sdp=SRTP_OFFER)
    got = bob.open(alice.protect(first).message).message
    ok = bob.protect(answer(got, SRTP_ANSWER))
    assert ok.info.key_reuse
    alice.open(ok.message)
    pending = alice.protect(reinvite(world, "alice", "bob", call_id, 2, "a1", "b1",
                                     sdp=SRTP_OFFER))
    return alice, bob, first, pending.message


def _stray_493(world, first: SipMessage) -> SipMessage:
    """A 493 with bob's (public) certificate naming the call and CSeq 1 INVITE, on a Via
    branch of the hop's own: no transaction of alice's stack matches it."""
    cert = world.user("bob").cert.public_bytes(serialization.Encoding.DER)
    stray = make_response(first, 493, "Undecipherable", [], cert, "application/pkix-cert")
    stray = stray.replace("To", f"{first.get('To')};tag=b1")
    return stray.replace("Via", "SIP/2.0/UDP 192.0.2.66:5060;branch=z9hG4bKhop92")


def _next_reinvite_after(world, alice, bob, first, pending, stray: SipMessage | None):
    """What the phone does with ``stray`` (``_keep_reaction`` -> ``_react_in_dialog``:
    ``open`` then ``react`` with the INVITE's plaintext from ``_plain``), then bob's real
    200 to CSeq 2, then alice's next re-INVITE (CSeq 3): what bob's phone makes of it."""
    if stray is not None:
        alice.open(stray)                          # accepted: pjsip drops it afterwards
        alice.react(stray, first)
    got = bob.open(pending).message
    alice.open(bob.protect(answer(got, SRTP_ANSWER)).message)
    third = alice.protect(reinvite(world, "alice", "bob", first.call_id, 3, "a1", "b1",
                                   sdp=SRTP_OFFER))
    return bob.open(third.message)


def test_control_without_the_stray_the_next_reinvite_opens_at_bob(world):
    alice, bob, first, pending = _srtp_call(world, "s92-ctl@x")
    opened = _next_reinvite_after(world, alice, bob, first, pending, None)
    assert opened.info.encrypted and opened.info.trusted and b"a=crypto" in opened.message.body


def test_control_the_stray_is_no_answer_to_anything_alice_sent(world):
    """The stray names no request of alice's (its Via branch is the hop's): the engine's
    own ``_sent_for`` says so, and ``open`` takes it (a bodiless-class answer, only
    ``_settle`` is guarded)."""
    alice, _, first, _ = _srtp_call(world, "s92-stray@x")
    stray = _stray_493(world, first)
    assert alice._sent_for(stray) is None
    assert alice.open(stray).info.content_type == "application/pkix-cert"


def test_hole_a_stray_493_makes_alices_next_reinvite_go_under_a_key_bob_never_had(world):
    alice, bob, first, pending = _srtp_call(world, "s92-hole@x")
    try:
        opened = _next_reinvite_after(world, alice, bob, first, pending,
                                      _stray_493(world, first))
    except E2MError as exc:
        pytest.fail(f"bob refused alice's next re-INVITE: {type(exc).__name__}: {exc}")
    assert b"a=crypto" in opened.message.body


def test_hole_react_follows_an_answer_to_nothing_we_sent(world):
    """The engine-level statement of hole 2: ``react`` of an answer ``_sent_for`` does not
    know should change nothing (``Reaction('none')``, no key retired)."""
    alice, _, first, _ = _srtp_call(world, "s92-react@x")
    stray = _stray_493(world, first)
    alice.open(stray)
    reaction = alice.react(stray, first)
    retired = [k for k in alice.dialog_keys.for_call(first.call_id) if k.retired]
    assert reaction.action == "none" and not retired, (reaction.action, len(retired))
