"""A fifty-first attacker's review (December 2026) of 1c8d0f2: the phone's dialog keys after
review 49 (``git show 53f7170 -- e2m_plugins``): a BYE ends keys and policies at our 2xx
to it, our failure to the INVITE we rang for ends the attempt (``_end_dialog``: every
slot of the Call-ID between the parties, and ``policies.end_call``), and
``DialogKeys.answered`` matches a response by its transaction.

``test_hole_*`` xfail strictly on 1c8d0f2 (their assertion is what a fix makes true);
``test_control_*`` are the same flows without the attack (they pass).

Hole 1: the end of *any* dialog of a Call-ID between two AoRs ends every slot of that
Call-ID between them (``DialogKeys.end_dialog`` without ``peer_tag``).  pjsip takes an
initial INVITE with a live call's Call-ID and a new From tag as a second call (a second
dialog: threat model, the ``forget_call`` row), and a bodiless INVITE needs no signature,
so anyone who read the call's Call-ID and the two AoRs (plaintext headers) can open a
second dialog "between alice and bob" and end it: our 487 to its CANCEL (new in
review 49), our 200 to its BYE, or the phone's own BYE when its 200 is never ACKed.  The
live call's keys go with it, at the callee or at the caller.  Shown on the real pjsua
phone too (auto-answer, the sender's BYE: ``tests/pjsua/test_review51_phone.py``, 493).

Hole 2: ``policies.end_call`` drops every dialog policy of the Call-ID, whoever the
dialog is with; the slots were scoped to the two parties (review 45), the policies were
not.  The end of a third party's own call under the Call-ID (carol, with her own AoR)
takes the live call's proxy policies: the phone's next body in that call leaves its
proxy out (a 496 round trip and a retry of the call's ``MAX_RETRIES_PER_CALL``).

Fixed: the end of a dialog ends every slot of the Call-ID between its parties only when
no other dialog of ours with that Call-ID and those parties is under way (``_parties``);
else only its own peer's slot.  Policies end per dialog scope (Call-ID and peer), not per
Call-ID.  And a new dialog whose sender wrote one of our own tags under the Call-ID is
refused (ending it would end that tag's slot).
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.flows import SDP_OFFER, TRUSTED, answer, invite, reinvite, ua_engine
from e2m_plugins import headers as hdr
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine
from tests.unit.test_review43 import NEW_SDP, _reinvite_opens_at_the_answering_phone
from tests.unit.test_review49 import CONTACT_B, _answered_call, _with_to_tag

HOP = "192.0.2.66:5060"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


# --------------------------------------------------------------------------------------
# 1. A second dialog "between alice and bob" under the live call's Call-ID, ended


def cancel_while_ringing(engine: UAEngine, delivered: SipMessage, cancel: SipMessage,
                         our_tag: str) -> None:
    """``engine``'s phone rings (180, tag ``our_tag``) for ``delivered``; the sender's
    ``cancel`` comes (with the INVITE's Via); the phone answers it 200 and the INVITE 487."""
    engine.protect(_with_to_tag(make_response(delivered, 180, "Ringing", [CONTACT_B]),
                                delivered, our_tag))
    cancel = cancel.replace("Via", delivered.get("Via") or "")
    engine.open(cancel)
    engine.protect(make_response(cancel, 200, "OK"))
    engine.protect(_with_to_tag(make_response(delivered, 487, "Request Terminated"),
                                delivered, our_tag))


def _second_dialog(world, engine: UAEngine, call_id: str, *, caller: str, callee: str,
                   from_tag: str, our_tag: str, ending: str) -> None:
    """A bare, unsigned, bodiless INVITE From ``caller`` To ``callee`` (AoRs as on the
    wire) under ``call_id`` with the From tag ``from_tag`` reaches ``engine`` (the
    ``callee``'s phone), which pjsip takes as a second call; it is then ended by
    ``ending``:

    - "cancelled while ringing": the phone rings (180, tag ``our_tag``), the sender
      CANCELs, the phone answers 200 and 487 (an application that does not auto-answer);
    - "answered, then the sender's BYE": the phone answers 200 (pjsua's auto-answer,
      an SDP offer sealed to the caller's certificate), the sender ACKs and sends BYE,
      the phone answers 200;
    - "answered, never ACKed": pjsip gives up on the 200 after 32 s and sends its own
      BYE (``_protect`` of our BYE)."""
    def bare(method: str, cseq: int, to_tag: str | None = None) -> SipMessage:
        return make_request(method, f"sip:{callee}@127.0.0.1:5062", from_uri=world.aor(caller),
                            to_uri=world.aor(callee), call_id=call_id, cseq=cseq,
                            from_tag=from_tag, to_tag=to_tag, via_host=HOP,
                            extra_headers=[("Contact", f"<sip:{caller}@{HOP}>")])

    request = bare("INVITE", 1)
    delivered = engine.open(request).message
    if ending == "cancelled while ringing":
        cancel_while_ringing(engine, delivered, bare("CANCEL", 1), our_tag)
        return
    ok = engine.protect(answer(delivered, SDP_OFFER, to_tag=our_tag))
    assert ok.info.encrypted               # sealed to the caller: the sender reads nothing
    if ending == "answered, then the sender's BYE":
        engine.open(bare("ACK", 1, our_tag))
        bye = bare("BYE", 2, our_tag)
        engine.open(bye)
        engine.protect(make_response(bye, 200, "OK"))
        return
    assert ending == "answered, never ACKed"
    engine.protect(make_request("BYE", f"sip:{caller}@{HOP}", from_uri=world.aor(callee),
                                to_uri=world.aor(caller), call_id=call_id, cseq=1,
                                from_tag=our_tag, to_tag=from_tag))


ENDINGS = ["cancelled while ringing", "answered, then the sender's BYE",
           "answered, never ACKed"]


@pytest.mark.parametrize("ending", ENDINGS)
def test_control_a_third_partys_second_dialog_under_the_call_id_leaves_the_key(world, ending):
    """The same second dialog From carol (her own AoR, as review 45 had it): the slots
    name the parties, so alice's call keeps K0 at the phone."""
    call_id = f"r51-carol-{ENDINGS.index(ending)}@x"
    alice, phone = _answered_call(world, call_id)
    carol = world.user("carol").cert.public_bytes(Encoding.DER)
    phone.add_peer_certificate(world.aor("carol"), carol)
    _second_dialog(world, phone, call_id, caller="carol", callee="bob", from_tag="c1",
                   our_tag="b2", ending=ending)
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


def test_control_without_a_second_dialog_alices_reinvite_opens(world):
    call_id = "r51-none@x"
    alice, phone = _answered_call(world, call_id)
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


@pytest.mark.parametrize("ending", ENDINGS)
def test_hole_a_bare_second_dialog_under_the_call_id_ends_the_callees_live_keys(world, ending):
    """Attacker: an untrusted on-path hop, or an off-path sender who read the call's
    Call-ID and the two AoRs (plaintext headers); no certificate, no signature, no
    tag of the call (it makes up its own From tag).

    Steps: alice's call with bob's phone is answered (Call-ID C, tags a1/phone); the
    phone keeps alice's INVITE key K0 under (C, a1, {alice, bob}).  The attacker sends
    the phone a bodiless INVITE: Call-ID C, From alice;tag=zz (a new tag), To bob, a Via
    of its own.  Nothing refuses it: no To tag (``_check_parties`` checks nothing), no
    body (no signature needed, ``require_e2m`` looks at bodies), a new From tag
    (``FirstCopy`` keys by Call-ID and From tag), alice's certificate is known
    (``_refuse_unanswerable`` lets it ring).  pjsip takes it as a second call (a second
    dialog, tags zz/b2).  The attacker ends it: it CANCELs while the phone rings (our
    487 is ``_ends_our_answered_attempt``, new in review 49), or, on pjsua's
    auto-answer, ACKs and BYEs (our 200 to the BYE, ``_confirmed[b2]`` is zz, so it
    "ends the dialog the first 2xx made"), or simply never ACKs (pjsip's own BYE after
    32 s).  Each reaches ``_end_dialog`` without a peer tag, and
    ``DialogKeys.end_dialog`` drops *every* slot of C between {alice, bob}: the live
    call's (C, a1) too.  The attacker sees nothing of the phone's answer (sealed to
    alice's certificate) and needs none of it.

    Effect: the live call's key is gone at the callee.  alice's next re-INVITE or UPDATE
    under K0 (hold, resume, a session refresh), as §2 lets her, is refused 493, a retry
    of the call's ``MAX_RETRIES_PER_CALL``; the attacker repeats it after each rekey (a
    new From tag each time).  The call's dialog policies go too (``policies.end_call``).
    This is review 49's hole (a): a bare message that ends the live call's keys though
    pjsip keeps the call, by a second dialog that pjsip really has.

    Fix: the end of a dialog ends the slots of *that INVITE* only: its own tags (the
    peer's tag and ours) and, at the caller, the forks of the INVITE it sent (keys
    under the To tags of 1xx/2xx answering the INVITE we sent with this From tag).
    Record with each slot the INVITE (Call-ID, caller's tag) it belongs to and end by
    that, not by Call-ID and parties."""
    call_id = f"r51-bare-{ENDINGS.index(ending)}@x"
    alice, phone = _answered_call(world, call_id)
    _second_dialog(world, phone, call_id, caller="alice", callee="bob", from_tag="zz",
                   our_tag="b2", ending=ending)
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


def _bobs_reinvite_opens_at_alice(world, alice: UAEngine, phone: UAEngine, call_id: str) -> bool:
    out = phone.protect(reinvite(world, "bob", "alice", call_id, 1, "phone", "a1", sdp=NEW_SDP))
    assert out.info.encrypted
    try:
        alice.open(out.message)
    except E2MError:
        return False
    return True


def test_control_bobs_reinvite_opens_at_the_caller(world):
    call_id = "r51-caller-ok@x"
    alice, phone = _answered_call(world, call_id)
    assert _bobs_reinvite_opens_at_alice(world, alice, phone, call_id)


@pytest.mark.parametrize("ending", ENDINGS)
def test_hole_a_bare_second_dialog_under_the_call_id_ends_the_callers_live_keys(world, ending):
    """Attacker: as above, toward the caller.

    Steps: alice's call with bob's phone is answered (C, a1/phone); alice keeps her
    offer key K0 (C, a1) and the phone reuses it for its 200 and later bodies.  The
    attacker sends alice's phone a bodiless INVITE: Call-ID C, From bob;tag=yy, To
    alice.  ``dialog_parties`` is a set ({alice, bob} either way), so the second
    dialog's end (alice's 487, her 200 to the attacker's BYE, or her own BYE when her
    200 is never ACKed) drops every slot of C between them: (C, a1) and (C, phone).

    Effect: bob's next re-INVITE or UPDATE under K0 is refused 493 at alice (a retry
    of ``MAX_RETRIES_PER_CALL``, repeatable).

    Fix: as above."""
    call_id = f"r51-caller-{ENDINGS.index(ending)}@x"
    alice, phone = _answered_call(world, call_id)
    _second_dialog(world, alice, call_id, caller="bob", callee="alice", from_tag="yy",
                   our_tag="a2", ending=ending)
    assert _bobs_reinvite_opens_at_alice(world, alice, phone, call_id)


# --------------------------------------------------------------------------------------
# 2. A third party's own call under the Call-ID ends the live call's proxy policies


def _call_with_a_dialog_policy(world, call_id: str) -> tuple[UAEngine, UAEngine]:
    """alice's call with bob's phone, her INVITE reaching it with her home proxy's
    ``Proxy-Body-Policy`` (the proxy views SDP): the phone learns it for this dialog
    only (scope (C, alice)) and has the proxy's certificate."""
    alice = ua_engine(world, "alice")
    phone = ua_engine(world, "bob", peers=("alice", "carol"))
    phone.add_proxy_certificate(TRUSTED, world.proxy(TRUSTED).cert.public_bytes(Encoding.DER))
    policy = hdr.PolicyHeader(TRUSTED, view=(hdr.Rule.parse("INVITE:application/sdp"),)).format()
    offer = alice.protect(invite(world, call_id=call_id)).message.add(hdr.PROXY_BODY_POLICY,
                                                                     policy)
    delivered = phone.open(offer).message
    alice.open(phone.protect(answer(delivered, to_tag="phone")).message)
    return alice, phone


def _phones_reinvite_readers(world, phone: UAEngine, call_id: str) -> tuple[str, ...]:
    out = phone.protect(reinvite(world, "bob", "alice", call_id, 1, "phone", "a1", sdp=NEW_SDP))
    return out.info.readable_by


def test_control_the_phones_reinvite_in_alices_call_is_for_her_proxy_too(world):
    call_id = "r51-policy-ok@x"
    _, phone = _call_with_a_dialog_policy(world, call_id)
    assert TRUSTED in _phones_reinvite_readers(world, phone, call_id)


@pytest.mark.parametrize("ending", ENDINGS)
def test_hole_a_third_partys_call_under_the_call_id_ends_the_live_calls_policies(world, ending):
    """Attacker: an insider UA (carol, any user whose certificate the phone holds) who read
    the Call-ID of alice's call with bob (a plaintext header); signs nothing.

    Steps: alice's call with bob's phone runs with her home proxy's dialog policy
    (learnt from her INVITE, scope (C, alice)): the phone's bodies in it are sealed for
    the proxy too.  carol calls the phone with Call-ID C and her own AoR and tag (pjsip:
    a second dialog; review 45 made such a call's *slots* its own) and ends her call:
    CANCEL while it rings (our 487, ``_ends_our_answered_attempt``, new in review 49),
    or BYE after pjsua's auto-answer (our 200), or no ACK (the phone's BYE).
    ``_end_dialog`` calls ``policies.end_call(C)``, which drops every scope "C ..."
    whatever its peer: alice's dialog policy too.

    Effect: the phone's next body in alice's call (a re-INVITE, an UPDATE) is sealed
    without the proxy that must read it: her proxy answers 496 (a round trip and one of
    the call's ``MAX_RETRIES_PER_CALL``; a re-INVITE's answer, a response, cannot be
    retried at all).  carol repeats it at will.

    Fix: end only the ended dialog's scope, ``dialog_scope(Call-ID, peer)`` of its
    peer AoR (``LearnedPolicies.end_scope``), and only when no other live dialog of ours
    with that peer shares the Call-ID; never every scope of a Call-ID."""
    call_id = f"r51-policy-{ENDINGS.index(ending)}@x"
    _, phone = _call_with_a_dialog_policy(world, call_id)
    _second_dialog(world, phone, call_id, caller="carol", callee="bob", from_tag="c1",
                   our_tag="b2", ending=ending)
    assert TRUSTED in _phones_reinvite_readers(world, phone, call_id)


def test_a_new_dialog_that_names_our_own_tag_as_its_senders_is_refused(world):
    """Tried against the fix: the second dialog From bob;tag=a1 (alice's own tag in the
    live call), whose end would take the slot of that tag, her INVITE's key.  No UA
    picks another's tag: refused before pjsip sees it."""
    from e2m_plugins.errors import BindingMismatchError
    call_id = "r51-own-tag@x"
    alice, phone = _answered_call(world, call_id)
    bare = make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                        to_uri=world.aor("alice"), call_id=call_id, cseq=1, from_tag="A1",
                        via_host=HOP, extra_headers=[("Contact", f"<sip:bob@{HOP}>")])
    with pytest.raises(BindingMismatchError):
        alice.open(bare)
    assert _bobs_reinvite_opens_at_alice(world, alice, phone, call_id)
