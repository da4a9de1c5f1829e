"""A forty-ninth attacker's review (December 2026) of ce67e30: the phone's dialog keys after
reviews 47 and 48 and the last read (``git show c5fceec 00bced5 -- e2m_plugins``): INVITEs
remembered until answered, a call's end ending every slot of its Call-ID between its two
parties, at most ``MAX_SLOTS_PER_CALL`` slots per Call-ID and pair, and
``DialogKeys.answered`` dropping the key a request offered when we answer it with a failure.

``test_hole_*`` xfail strictly on ce67e30 (their assertion is what a fix makes true);
``test_control_*`` are the same flows without the attack (they pass).

Fixed: a BYE we get ends keys and policies only when we answer it 2xx (pjsip answers a
made-up tag 481); ``DialogKeys.answered`` matches the request's transaction (CSeq and
top Via branch), so our failure to a copy settles nothing of the original; our failure
to the INVITE we rang for ends the attempt's keys (our own 183 key too) and policies, so
cancelled calls leave no slot behind.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, answer, invite, ua_engine
from e2m_plugins.dialog_keys import DialogKeys
from e2m_plugins.errors import BindingMismatchError, E2MError
from e2m_plugins.sip import SipMessage, make_request, make_response, parse_address
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine
from pjsua_hooks.firstcopy import FirstCopy
from tests.unit.test_review43 import _reinvite_opens_at_the_answering_phone

CONTACT_B = ("Contact", "<sip:bob@127.0.0.1:5062>")


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


def _dialog(world, call_id: str) -> dict:
    return dict(from_uri=world.aor("alice"), to_uri=world.aor("bob"), call_id=call_id,
                from_tag="a1")


def _with_to_tag(response: SipMessage, request: SipMessage, tag: str) -> SipMessage:
    return response.replace("To", f"{request.get('To')};tag={tag}")


def _ack(world, alice: UAEngine, phone: UAEngine, call_id: str) -> None:
    ack = make_request("ACK", "sip:bob@127.0.0.1:5062", cseq=1, to_tag="phone",
                       **_dialog(world, call_id))
    phone.open(alice.protect(ack).message)


# --------------------------------------------------------------------------------------
# 1. A bare BYE with the caller's tag and a made-up To tag empties the callee's call


def _answered_call(world, call_id: str, phone: UAEngine | None = None
                   ) -> tuple[UAEngine, UAEngine]:
    """alice calls bob's ``phone`` (a fresh engine by default); it answers 200 (tag
    ``phone``) under alice's offer key K0 (``reusable``'s choice), which it keeps under
    (Call-ID, a1): the peer's tag."""
    alice = ua_engine(world, "alice")
    phone = phone or ua_engine(world, "bob")
    offer = alice.protect(invite(world, call_id=call_id)).message
    ok = phone.protect(answer(phone.open(offer).message, to_tag="phone"))
    assert ok.info.key_reuse
    alice.open(ok.message)
    _ack(world, alice, phone, call_id)
    return alice, phone


def _stray_bye(world, call_id: str, from_tag: str, to_tag: str) -> SipMessage:
    """A bare, unsigned BYE From alice To bob (AoRs as on the wire) with these tags."""
    return make_request("BYE", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                        to_uri=world.aor("bob"), call_id=call_id, cseq=9, from_tag=from_tag,
                        to_tag=to_tag, via_host="192.0.2.66:5060")


def test_control_the_callees_key_survives_a_stray_bye_with_a_made_up_from_tag(world):
    """Review 45's hop BYE, mirrored onto the callee: a made-up From tag ends nothing
    of the call; alice's re-INVITE under K0 opens at the phone."""
    call_id = "r49-bye-from@x"
    alice, phone = _answered_call(world, call_id)
    phone.open(_stray_bye(world, call_id, "zz", "phone"))
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


def test_hole_a_bare_bye_with_the_callers_tag_and_a_made_up_to_tag_drops_the_callees_key(world):
    """Attacker: an untrusted on-path hop, or anyone who read the INVITE's Call-ID, From
    tag and the two AoRs off the wire (all plaintext headers); no certificate, no
    signature.

    Steps: alice's call with bob's phone is answered (Call-ID C, tags a1/phone); the
    phone keeps alice's INVITE key K0 under (C, a1, {alice, bob}), the peer's tag, as
    every key of the call it receives or offers in a response (``DialogKeys._keep``).
    The attacker sends the phone a bare BYE: Call-ID C, From alice;tag=a1, To
    bob;tag=zz (a tag of its own making).  The hook opens it before pjsip looks for the
    dialog: ``_check_parties`` knows no tag zz, so it checks nothing; ``_end_dialog``
    finds no ``_confirmed`` entry for zz and calls ``end_dialog(peer_tag="a1")``, which
    drops every slot of C between alice and bob under tag a1: the whole call's keys at
    the callee.  pjsip then answers 481 (no dialog zz/a1): the call goes on.

    Effect: the live call's key is gone at the callee.  alice's next re-INVITE or UPDATE
    (hold, resume, session refresh) under K0, as §2 lets her, is refused 493, a retry of
    the call's ``MAX_RETRIES_PER_CALL``; the attacker repeats it after every rekey and
    can exhaust the retries.  Review 45 closed the mirror image (a made-up *From* tag
    with our real To tag), not this one: ``_confirmed`` knows only our own tags.

    Fix: a received BYE ends keys only for a dialog we know: its To tag (our tag) must
    be one of ours in ``_parties`` with this Call-ID and parties, and its From tag that
    dialog's remote tag (``_confirmed``, or the only one); otherwise it ends nothing
    here (pjsip will 481 it).  Better, end the keys on our own 2xx to the BYE
    (``protect``), which pjsip sends only for a dialog it has."""
    call_id = "r49-bye-to@x"
    alice, phone = _answered_call(world, call_id)
    phone.open(_stray_bye(world, call_id, "a1", "zz"))
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


# --------------------------------------------------------------------------------------
# 2. ``answered`` matches by CSeq alone: a failure to a copy drops the ringing INVITE's key


def _early_answer_then_copy(world, call_id: str, copy: str | None) -> tuple[UAEngine, UAEngine]:
    """alice calls bob's phone; it rings with a reliable 183 carrying its SDP answer under
    K0, then ``copy`` of alice's INVITE reaches the phone (another Via branch) and gets
    the hook's failure, which passes ``protect`` like every response the phone sends;
    the phone answers the call with a bodiless 200 (the answer went in the 183), alice
    ACKs.  Returns (alice, phone)."""
    alice = ua_engine(world, "alice")
    phone = ua_engine(world, "bob")
    first = FirstCopy(max_age=300.0)
    offer = alice.protect(invite(world, call_id=call_id)).message
    opened = phone.open(offer)
    first.check(offer, opened.message, opened.info.encrypted or opened.info.signed)
    delivered = opened.message
    progress = _with_to_tag(make_response(delivered, 183, "Session Progress",
                                          [CONTACT_B, ("Require", "100rel"), ("RSeq", "1")],
                                          SDP_ANSWER, "application/sdp"), delivered, "phone")
    sent = phone.protect(progress)
    assert sent.info.key_reuse
    alice.open(sent.message)
    if copy is not None:
        via = f"SIP/2.0/UDP 192.0.2.66:5060;branch=z9hG4bKcopy{len(copy)}"
        if copy == "a replayed copy of the signed INVITE":
            replayed = offer.replace("Via", via)
            with pytest.raises(E2MError) as refused:
                phone.open(replayed)
            failure = phone.refusal(replayed, refused.value)
            assert failure is not None and failure.status >= 400
        else:   # a bare INVITE with the ids
            bare = make_request("INVITE", "sip:bob@127.0.0.1:5062", cseq=1,
                                via_host="192.0.2.66:5060", **_dialog(world, call_id))
            # refused by the engine since review 53 (the caller's tag of a dialog we
            # answered, from another branch), before the hook's FirstCopy (482) sees it
            with pytest.raises(BindingMismatchError) as refused:
                phone.open(bare)
            failure = phone.refusal(bare, refused.value)
            assert failure is not None and failure.status >= 400
        phone.protect(failure)
    ok = _with_to_tag(make_response(delivered, 200, "OK", [CONTACT_B]), delivered, "phone")
    alice.open(phone.protect(ok).message)
    _ack(world, alice, phone, call_id)
    return alice, phone


def test_control_a_call_answered_early_goes_on_under_the_invite_key(world):
    call_id = "r49-copy-ok@x"
    alice, phone = _early_answer_then_copy(world, call_id, None)
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


@pytest.mark.parametrize("copy", ["a replayed copy of the signed INVITE",
                                  "a bare INVITE with the ids"])
def test_hole_a_failure_to_a_copy_of_the_ringing_invite_drops_its_key(world, copy):
    """Attacker: an untrusted on-path hop, or anyone who saw the INVITE (its Call-ID,
    From tag and AoRs, or the whole signed message); nothing signed of its own.

    Steps: alice's INVITE (CSeq 1, offer key K0) rings at bob's phone, which keeps K0 with
    ``received_in=(1, "INVITE")`` and sends a reliable 183 with its SDP answer under K0.
    While it rings the attacker sends the phone a copy: the signed INVITE itself with
    another Via branch (the replay check refuses it, 403), or a bare INVITE with the same
    Call-ID, From tag and CSeq 1 (the hook's ``FirstCopy`` answered 482; since review 53
    the engine refuses it first, 482).  Either answer
    passes ``protect``, and ``DialogKeys.answered`` drops every key of the slot whose
    ``received_in`` is that CSeq: K0, though the copy's transaction is not the INVITE's.
    The phone answers the real INVITE with a bodiless 200 (the answer went in the 183);
    alice's 200 confirms K0 (``settle``).

    Effect: alice's call runs on K0, which the callee no longer has: her next re-INVITE
    or UPDATE under it is refused 493 (a retry of ``MAX_RETRIES_PER_CALL``); her early
    UPDATE or PRACK with a body while ringing too.  (When the 200 carries SDP the phone
    offers a fresh key and alice usually switches to it; the drop still costs a
    public-key operation and, if alice's key had more readers, the 493.)

    Fix: match a failure to the request's transaction, not its CSeq: keep the request's
    top Via branch with ``received_in`` (Call-ID, CSeq and branch) and drop only on a
    failure with that branch; a refusal of a request ``open`` refused (a replay, a
    copy, an unknown dialog) must settle nothing at all."""
    call_id = f"r49-copy-{'signed' if 'signed' in copy else 'bare'}@x"
    alice, phone = _early_answer_then_copy(world, call_id, copy)
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


# --------------------------------------------------------------------------------------
# 3. The callee's own 183 key outlives the call a CANCEL ended


def _late_offer_183(world, phone: UAEngine, caller: str, call_id: str, tag: str,
                    caller_engine: UAEngine | None = None) -> SipMessage:
    """``caller``'s bodiless INVITE (late offer) rings at bob's phone, which sends a 183
    with its SDP offer: nothing of the caller's to reuse, so it is sealed to the caller's
    certificate under a fresh key the phone offers (kept under (Call-ID, tag)).
    Returns the INVITE as delivered."""
    request = make_request("INVITE", "sip:bob@127.0.0.1:5062", from_uri=world.aor(caller),
                           to_uri=world.aor("bob"), call_id=call_id, cseq=1, from_tag=tag,
                           extra_headers=[("Contact", f"<sip:{caller}@127.0.0.1:5063>")])
    if caller_engine is not None:
        request = caller_engine.protect(request).message
    delivered = phone.open(request).message
    progress = _with_to_tag(make_response(delivered, 183, "Session Progress", [CONTACT_B],
                                          SDP_OFFER, "application/sdp"), delivered, "b" + tag)
    sent = phone.protect(progress)
    assert sent.info.encrypted and not sent.info.key_reuse
    if caller_engine is not None:
        caller_engine.open(sent.message)
    return delivered


def _cancelled(world, phone: UAEngine, delivered: SipMessage, tag: str) -> None:
    """The caller CANCELs; the phone answers the CANCEL 200 and the INVITE 487."""
    cancel = make_request("CANCEL", "sip:bob@127.0.0.1:5062",
                          from_uri=_aor_of(delivered, "From"), to_uri=_aor_of(delivered, "To"),
                          call_id=delivered.call_id, cseq=1, from_tag=tag)
    cancel = cancel.replace("Via", delivered.get("Via") or "")
    phone.open(cancel)
    phone.protect(make_response(cancel, 200, "OK"))
    phone.protect(_with_to_tag(make_response(delivered, 487, "Request Terminated"),
                               delivered, "b" + tag))


def _aor_of(message: SipMessage, name: str) -> str:
    return parse_address(message.get(name) or "").uri


def test_control_a_late_offer_call_answered_and_ended_leaves_the_callee_no_key(world):
    """The same late-offer call answered 200 (the phone's offer) and ended by alice's BYE:
    ``_end_dialog`` takes every slot of the call at the phone."""
    call_id = "r49-late-ok@x"
    alice = ua_engine(world, "alice")
    phone = ua_engine(world, "bob")
    request = alice.protect(make_request("INVITE", "sip:bob@127.0.0.1:5062", cseq=1,
                                         **_dialog(world, call_id),
                                         extra_headers=[("Contact",
                                                         "<sip:alice@127.0.0.1:5061>")]))
    delivered = phone.open(request.message).message
    alice.open(phone.protect(answer(delivered, SDP_OFFER, to_tag="phone")).message)
    ack = make_request("ACK", "sip:bob@127.0.0.1:5062", cseq=1, to_tag="phone",
                       body=SDP_ANSWER, content_type="application/sdp", **_dialog(world, call_id))
    phone.open(alice.protect(ack).message)
    bye = make_request("BYE", "sip:bob@127.0.0.1:5062", cseq=2, to_tag="phone",
                       **_dialog(world, call_id))
    phone.open(alice.protect(bye).message)
    phone.protect(make_response(bye, 200, "OK"))
    assert phone.dialog_keys.for_call(call_id) == []


def test_hole_the_callees_183_key_outlives_the_cancelled_call(world):
    """Attacker: none needed (a caller who hangs up while a callee's 183 early media
    rings); the key left behind is one the caller and every proxy that read the 183 hold.

    Steps: alice's bodiless INVITE (late offer, or an offer the 183 cannot reuse: SRTP
    keys past a reading proxy) rings at bob's phone, which sends a 183 with SDP sealed
    under a fresh key Kb that it offers for reuse (``DialogKeys.offer``: a response's
    key goes under the peer's tag, (C, a1)).  alice CANCELs; the phone answers 200 and
    487.  ``protect`` of the 487 runs ``_forget_parties`` (the parties entry goes) and
    ``answered`` (which drops only keys the *peer* offered in that request); nothing
    calls ``end_dialog`` for a failure we send, and ``_end_dialog`` runs only for a
    BYE or a failure we receive.

    Effect: after the call Kb stays kept, and opening (unconfirmed keys open: review 43),
    under (C, a1) between alice and bob for ``cek_max_age`` (an hour by default); "the
    dialog's keys go at ... a failed INVITE" (dialog_keys docstring) does not hold on the
    callee side.  The slot counts against ``MAX_DIALOGS``: see the flood below.

    Fix: our final failure to an initial INVITE (the one whose 1xx began the entry,
    ``_ends_our_answered_attempt``, or any when no 2xx went out) ends the attempt's
    keys as a received one does (``dialog_keys.end_dialog`` of its Call-ID and parties,
    and ``policies.end_call``)."""
    call_id = "r49-late-cancel@x"
    alice = ua_engine(world, "alice")
    phone = ua_engine(world, "bob")
    delivered = _late_offer_183(world, phone, "alice", call_id, "a1", alice)
    assert phone.dialog_keys.for_call(call_id)
    _cancelled(world, phone, delivered, "a1")
    assert phone.dialog_keys.for_call(call_id) == []


SLOTS = 32      # MAX_DIALOGS (4096) made small; the attack scales with it


def _phone_in_a_call(world, call_id: str) -> tuple[UAEngine, UAEngine]:
    phone = ua_engine(world, "bob", peers=("alice", "carol"))
    phone.dialog_keys = DialogKeys(max_age=phone.config.cek_max_age,
                                   max_uses=phone.config.cek_max_uses, max_dialogs=SLOTS)
    return _answered_call(world, call_id, phone)


def test_control_a_few_cancelled_calls_leave_a_live_call_its_key(world):
    call_id = "r49-flood-ok@x"
    alice, phone = _phone_in_a_call(world, call_id)
    for n in range(3):
        delivered = _late_offer_183(world, phone, "carol", f"r49-flood-ok-{n}@x", f"c{n}")
        _cancelled(world, phone, delivered, f"c{n}")
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


def test_hole_unsigned_cancelled_calls_push_a_live_calls_key_out(world):
    """Attacker: any UA whose certificate the phone has (carol: a ``[peers]`` entry or
    one the certificate service gives); she signs nothing (bodiless INVITEs need no
    signature), needs no ids of the victim's call, and holds no call open.

    Steps: alice's call with the phone runs on K0 in (C, a1).  carol sends MAX_DIALOGS
    bodiless INVITEs (a new Call-ID each) and CANCELs each once it rings with a 183 (a
    UA engine that sends early media); each leaves the phone's 183 key in a slot of its
    own (above), which nothing ends.  ``_keep`` evicts the oldest slot past
    ``max_dialogs``: alice's call's.  (Review 47 bounded the slots of one Call-ID and
    dropped keys of answers to nothing we sent; the lead "an insider's many key-offering
    INVITEs" needed a signature per INVITE, and her own keys go with our 487.)

    Effect: alice's next re-INVITE under K0 is refused at the phone (493); every live
    call of the phone loses its keys the same way, for two unsigned messages per slot.
    On the pjsua phone as shipped (auto-answer 200 or a 180 without SDP) the 183 is not
    sent; an application or UA that rings with early media is exposed.

    Fix: end the attempt's keys on our failure (above); count slots per peer AoR, and
    evict slots of failed or unanswered attempts before confirmed calls."""
    call_id = "r49-flood@x"
    alice, phone = _phone_in_a_call(world, call_id)
    for n in range(SLOTS):
        delivered = _late_offer_183(world, phone, "carol", f"r49-flood-{n}@x", f"c{n}")
        _cancelled(world, phone, delivered, f"c{n}")
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)
