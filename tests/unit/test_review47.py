"""A forty-seventh attacker's review (December 2026) of db5870b: the phone's dialog keys
after reviews 43 and 45 (``git show 060cb48 ecf8e3d``): slots (Call-ID, tag, parties),
a key under the peer's tag when the message has it, and ``UAEngine._end_dialog`` taking
our own tag's slot (the INVITE's key) and the call's policies only for a BYE of the
dialog the first 2xx made (``_confirmed``), or one we send before any 2xx.

``test_hole_*`` xfail strictly on db5870b (their assertion is what a fix makes true);
``test_control_*`` are the same flows without the attack (they pass).

Fixed: an INVITE we sent is remembered until its final answer (600 s since its last
1xx, not 64 s), so its 2xx still names the answered dialog; ending a call ends every
slot of its Call-ID between its parties (another fork's early key too); one Call-ID
holds at most ``MAX_SLOTS_PER_CALL`` slots; a response to nothing we sent keeps no key.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, answer, invite, reinvite, ua_engine
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.dialog_keys import DialogKeys
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine
from tests.unit.test_review2_ua import _Clock
from tests.unit.test_review43 import NEW_SDP, _forks_183


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


def _alice(world, clock: _Clock | None = None, **keys) -> UAEngine:
    engine = UAEngine(ua_engine(world, "alice", peers=("bob", "carol")).config,
                      clock=clock or _Clock())
    if keys:
        engine.dialog_keys = DialogKeys(max_age=engine.config.cek_max_age,
                                        max_uses=engine.config.cek_max_uses,
                                        clock=engine._clock, **keys)
    return engine


def _dialog(world, call_id: str) -> dict:
    return dict(from_uri=world.aor("alice"), to_uri=world.aor("bob"), call_id=call_id,
                from_tag="a1")


# --------------------------------------------------------------------------------------
# 1. A call answered more than 64 s after its only 180: ``_confirmed`` is never set


def _long_ring(world, call_id: str, ring: float):
    """alice calls bob; bob's phone sends one 180 (and no later 1xx) and answers 200
    ``ring`` seconds later, under alice's offer key K0 (``reusable``'s choice, so the
    200 offers no key of its own).  Returns (alice, clock, offer, phone)."""
    clock = _Clock()
    alice = _alice(world, clock)
    phone = ua_engine(world, "bob")
    offer = alice.protect(invite(world, call_id=call_id)).message
    delivered = phone.open(offer).message
    ringing = make_response(offer, 180, "Ringing")
    alice.open(ringing.replace("To", f"{offer.get('To')};tag=phone"))
    clock.now += ring
    ok = phone.protect(answer(delivered, to_tag="phone"))
    assert ok.info.key_reuse
    alice.open(ok.message)
    alice.protect(make_request("ACK", "sip:bob@127.0.0.1:5062", cseq=1, to_tag="phone",
                               **_dialog(world, call_id)))
    return alice, clock, offer, phone


def _second_fork_answers_and_is_ended(world, alice, offer, call_id: str) -> None:
    """bob's desk phone answers 200 too (tag desk); alice's phone ACKs and BYEs it
    (RFC 3261 §13.2.2.4, pjsip's forked-2xx handling)."""
    desk = ua_engine(world, "bob")
    alice.open(desk.protect(answer(desk.open(offer).message, to_tag="desk")).message)
    dialog = _dialog(world, call_id)
    alice.protect(make_request("ACK", "sip:bob@127.0.0.1:5099", cseq=1, to_tag="desk", **dialog))
    alice.protect(make_request("BYE", "sip:bob@127.0.0.1:5099", cseq=2, to_tag="desk", **dialog))


def _phones_reinvite_opens(world, alice, phone, call_id: str) -> bool:
    sent = phone.protect(reinvite(world, "bob", "alice", call_id, 5, "phone", "a1", sdp=NEW_SDP))
    assert sent.info.key_reuse
    try:
        alice.open(sent.message)
    except E2MError:
        return False
    return True


def test_control_a_prompt_answer_survives_our_bye_to_the_second_fork(world):
    """Review 45's fork flow, answered 10 s after the 180: the BYE to desk ends only
    (Call-ID, desk); the phone's re-INVITE under K0 opens."""
    call_id = "r47-fork-prompt@x"
    alice, _, offer, phone = _long_ring(world, call_id, 10)
    assert alice._confirmed.get("a1") == "phone"
    _second_fork_answers_and_is_ended(world, alice, offer, call_id)
    assert _phones_reinvite_opens(world, alice, phone, call_id)


def test_hole_a_call_answered_after_64_s_of_ringing_loses_its_key_to_our_bye_to_a_fork(world):
    """Attacker: none needed (parallel forking to two of bob's devices, both answered
    after a ring of more than 64 s, with one 180 and no later 1xx); or an
    insider callee (bob) who simply lets his phones ring 65 s before answering.

    Steps: alice's INVITE (tag a1, offer key K0 in (Call-ID, a1)) gets one 180 from the
    phone; 70 s later the phone answers 200 under K0.  ``_sent_for`` forgets an INVITE
    64 s after its last 1xx (``_SENT_LIFETIME``), so ``_note_confirmed`` ignores the 200:
    ``_confirmed`` has no entry for a1 (nor is K0 confirmed, nor the 200's policies
    learnt).  The desk phone's 200 comes too; pjsip ACKs it and sends a BYE to desk.
    ``_end_dialog(sent=True)`` sees ``confirmed is None`` and takes that as "a BYE we
    send before any 2xx": ``end_dialog`` without ``peer_tag`` empties (Call-ID, a1).

    Effect: review 45's hole comes back: the answered call's INVITE key K0 is gone at
    alice (and the call's dialog policies with it).  The phone's next re-INVITE or
    UPDATE, sealed under K0 as §2 lets it, is refused (493), costing a retry of the
    call's ``MAX_RETRIES_PER_CALL``, on every call that rang past a minute and forked.

    Fix: tell "before any 2xx" by what the dialog saw, not by ``_confirmed`` missing: note
    the first 2xx's To tag for an INVITE of ours whatever ``_sent_for`` says (the INVITE
    client transaction lasts until its final answer, RFC 3261 §17.1.1.2: keep the INVITE
    in ``_sent`` until a final status, bounded by Kamailio's fr_inv_timer, not 64 s after
    its last 1xx), and when in doubt end only the peer's slot."""
    call_id = "r47-fork-long@x"
    alice, _, offer, phone = _long_ring(world, call_id, 70)
    _second_fork_answers_and_is_ended(world, alice, offer, call_id)
    assert _phones_reinvite_opens(world, alice, phone, call_id)


def _bye_from_phone(world, alice, phone, call_id: str) -> None:
    """The phone hangs up; alice's phone answers the BYE 200."""
    bye = make_request("BYE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                       to_uri=world.aor("alice"), call_id=call_id, cseq=6, from_tag="phone",
                       to_tag="a1")
    alice.open(phone.protect(bye).message)
    alice.protect(make_response(bye, 200, "OK"))


def test_control_the_peers_bye_of_a_promptly_answered_call_ends_every_key(world):
    call_id = "r47-bye-prompt@x"
    alice, _, _, phone = _long_ring(world, call_id, 10)
    _bye_from_phone(world, alice, phone, call_id)
    assert alice.dialog_keys.for_call(call_id) == []


def test_hole_after_a_long_ring_the_peers_bye_leaves_the_invite_key_opening(world):
    """Attacker: none (a call answered more than 64 s after its only 180 and ended by
    the callee); the key left behind is then one the callee and every proxy that read
    the INVITE hold, kept and opening in alice's phone after the call is over.

    Steps: as above, ``_confirmed`` has no entry for a1.  bob hangs up: the BYE
    (From phone, To a1) is opened; ``_end_dialog(sent=False)`` finds ``confirmed`` None,
    so it ends only (Call-ID, phone); alice's 200 to the BYE runs ``_forget_parties`` and
    nothing else.  (Call-ID, a1) with K0 stays, and so do the call's dialog policies
    (``policies.end_call`` is never called).

    Effect: after the call K0 still opens a body naming (Call-ID, a1) between alice and
    bob until ``cek_max_age`` (an hour by default): "the dialog's keys go at BYE"
    (dialog_keys docstring) does not hold; the slot also counts against MAX_DIALOGS.

    Fix: our 2xx to a BYE that names our tag and the only (or the confirmed) remote tag
    ends the whole dialog, both slots and the policies; or end the INVITE's slot when
    no dialog of that INVITE is left."""
    call_id = "r47-bye-long@x"
    alice, _, _, phone = _long_ring(world, call_id, 70)
    _bye_from_phone(world, alice, phone, call_id)
    assert alice.dialog_keys.for_call(call_id) == []


# --------------------------------------------------------------------------------------
# 2. A fork's early key: its own slot, which nothing ends


def _early_forks_then_answered(world, alice, call_id: str, forks: int) -> tuple[SipMessage, UAEngine]:
    offer = alice.protect(invite(world, call_id=call_id)).message
    for n in range(forks):
        alice.open(_forks_183(world, offer, f"desk{n}"))
    phone = ua_engine(world, "bob")
    alice.open(phone.protect(answer(phone.open(offer).message, to_tag="phone")).message)
    alice.protect(make_request("ACK", "sip:bob@127.0.0.1:5062", cseq=1, to_tag="phone",
                               **_dialog(world, call_id)))
    return offer, phone


def test_control_a_call_without_early_forks_leaves_no_key_after_its_bye(world):
    call_id = "r47-early-none@x"
    alice = _alice(world)
    _, phone = _early_forks_then_answered(world, alice, call_id, 0)
    _bye_from_phone(world, alice, phone, call_id)
    assert alice.dialog_keys.for_call(call_id) == []


def test_hole_another_forks_early_key_outlives_the_call(world):
    """Attacker: none (forking with early media: device 2 rings with a 183 offering a
    key, device 1 answers; the proxy CANCELs device 2, whose 487 alice never sees).

    Steps: review 43 files device 2's key Kd under (Call-ID, desk0), the peer's tag.
    The call ends by the phone's BYE: ``end_dialog`` empties (Call-ID, a1) and (Call-ID,
    phone), the two slots the BYE names.  No message ever names desk0 again (no 2xx,
    no BYE for that early dialog), so (Call-ID, desk0) is ended by nobody.

    Effect: Kd stays kept and opening under (Call-ID, desk0) for ``cek_max_age`` after
    the call (the same after a call that fails: the final failure names one tag only).
    Before 060cb48 it sat in (Call-ID, a1) and went with the call.

    Fix: the end of the INVITE's dialog (the BYE of the confirmed dialog, a failure
    ending the attempt, ``forget_call``) ends every slot of the Call-ID between the two
    parties, early forks' included (keep a list of the tags each INVITE's forks used)."""
    call_id = "r47-early-one@x"
    alice = _alice(world)
    _, phone = _early_forks_then_answered(world, alice, call_id, 1)
    _bye_from_phone(world, alice, phone, call_id)
    assert alice.dialog_keys.for_call(call_id) == []


def _carols_call(world, alice, call_id: str) -> UAEngine:
    """carol calls alice; alice answers under carol's offer key (the call's only key)."""
    carol = ua_engine(world, "carol", peers=("alice",))
    request = make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("carol"),
                           to_uri=world.aor("alice"), call_id=call_id, cseq=1, from_tag="c1",
                           body=NEW_SDP, content_type="application/sdp",
                           extra_headers=[("Contact", "<sip:carol@127.0.0.1:5063>")])
    sent = carol.protect(request).message
    ok = alice.protect(answer(alice.open(sent).message, to_tag="a9"))
    assert ok.info.key_reuse
    carol.open(ok.message)
    return carol


def _carols_reinvite_opens(world, alice, carol, call_id: str) -> bool:
    out = carol.protect(make_request("INVITE", "sip:alice@127.0.0.1:5061",
                                     from_uri=world.aor("carol"), to_uri=world.aor("alice"),
                                     call_id=call_id, cseq=2, from_tag="c1", to_tag="a9",
                                     body=SDP_ANSWER, content_type="application/sdp",
                                     extra_headers=[("Contact", "<sip:carol@127.0.0.1:5063>")]))
    assert out.info.key_reuse
    try:
        alice.open(out.message)
    except E2MError:
        return False
    return True


SLOTS = 32      # MAX_DIALOGS (4096) made small; the attack scales with it


def test_control_carols_call_keeps_its_key_beside_a_forked_call_of_alices(world):
    alice = _alice(world, max_dialogs=SLOTS)
    carol = _carols_call(world, alice, "r47-carol-ok@x")
    offer = alice.protect(invite(world, call_id="r47-bob-few@x")).message
    for n in range(3):
        alice.open(_forks_183(world, offer, f"desk{n}"))
    assert _carols_reinvite_opens(world, alice, carol, "r47-carol-ok@x")


def test_hole_one_callees_many_183s_push_out_the_keys_of_alices_other_calls(world):
    """Attacker: insider callee (bob, called by alice once), or a forking proxy/gateway
    that fans alice's INVITE out wide, each leg ringing with a keyed 183.

    Steps: alice is in a call with carol (running on carol's INVITE key, in slot
    (C1, c1)).  alice calls bob; bob sends MAX_DIALOGS signed 183s to that INVITE, each
    with its own To tag and a fresh CEK offered for reuse.  Since 060cb48 each is kept
    under the peer's tag: one new slot each ((C2, tagN, {alice, bob})), where before they
    shared (C2, a1) and its 8-key bound.  ``_keep`` evicts the oldest slot once
    ``max_dialogs`` are kept: carol's call first, then every other call of alice's.

    Effect: carol's next re-INVITE (hold, resume, session refresh; sealed under her
    INVITE key) is refused at alice (493); every live call of alice's loses its keys the
    same way (alice's own INVITE key K0 to bob among them), for as long as bob keeps ringing (the 183s are responses: no replay
    record, no ``_sent_for`` check in ``keep_received``).

    Fix: bound the slots one INVITE's early dialogs may take (as the proxy's
    ``MAX_FORKS``), keep a fork's key only for a response to a request we sent
    (``_sent_for``), and evict idle slots first rather than the oldest inserted."""
    alice = _alice(world, max_dialogs=SLOTS)
    carol = _carols_call(world, alice, "r47-carol@x")
    offer = alice.protect(invite(world, call_id="r47-bob-many@x")).message
    for n in range(SLOTS):
        alice.open(_forks_183(world, offer, f"desk{n}"))
    assert _carols_reinvite_opens(world, alice, carol, "r47-carol@x")


def _stray_183(world, call_id: str) -> SipMessage:
    """carol's signed 183 'answering' an INVITE of alice's that never was: From alice
    (tag s1), To carol (tag s2), under a fresh CEK carol offers for reuse."""
    fake = make_request("INVITE", "sip:carol@127.0.0.1:5063", from_uri=world.aor("alice"),
                        to_uri=world.aor("carol"), call_id=call_id, cseq=1, from_tag="s1")
    progress = make_response(fake, 183, "Session Progress", [], SDP_ANSWER, "application/sdp")
    progress = progress.replace("To", f"{fake.get('To')};tag=s2")
    cred = world.user("carol")
    entity, _ = protect_content("application/sdp", SDP_ANSWER,
                                [recipient_for_certificate(world.user("alice").cert)],
                                signer=(cred.cert, cred.key), cek_reference=new_reference(),
                                bind_to=progress)
    return with_entity(progress, entity)


def test_control_one_stray_183_leaves_a_live_call_its_key(world):
    alice = _alice(world, max_dialogs=SLOTS)
    carol = _carols_call(world, alice, "r47-stray-ok@x")
    alice.open(_stray_183(world, "r47-stray-0@x"))
    assert _carols_reinvite_opens(world, alice, carol, "r47-stray-ok@x")


def test_hole_stray_signed_183s_to_no_request_of_ours_push_out_live_calls_keys(world):
    """Attacker: any insider UA with a certificate (carol), off-path: she needs no call
    with alice and no ids of one.

    Steps: carol sends alice's phone MAX_DIALOGS 183s, each with a fresh Call-ID, From
    alice, To carol, signed by carol, bound to the message, sealed to alice and offering
    a CEK for reuse.  The phone's hook opens every received message before pjsip looks
    for its transaction; ``_open`` checks the signer (To: carol) and the response's
    context time, and ``_keep_received`` keeps the CEK: nothing asks whether the 183
    answers a request alice sent (``_sent_for``, which ``_settle`` and ``_note_confirmed``
    do check).  Each is a new slot, and ``_keep`` evicts the oldest slot past
    ``max_dialogs``.  pjsip then drops the strays (no transaction).

    Effect: every live call's dialog keys are pushed out of alice's phone; each peer's
    next re-INVITE/UPDATE under its key is refused (493, a retry), and a steady trickle
    keeps doing it.  (Here carol's own call is the victim for brevity; any call is.)

    Fix: keep (or confirm) a key from a response only when it answers a request we sent
    (``_sent_for``), as ``_settle`` does; and evict idle or stranger slots before live
    ones."""
    alice = _alice(world, max_dialogs=SLOTS)
    carol = _carols_call(world, alice, "r47-stray-live@x")
    for n in range(SLOTS):
        alice.open(_stray_183(world, f"r47-stray-{n}@x"))
    assert _carols_reinvite_opens(world, alice, carol, "r47-stray-live@x")


def test_a_third_party_under_the_call_id_cannot_use_up_the_pairs_slots(world):
    """The per-call bound counts the pair's slots: carol's keys under the same Call-ID
    (she learnt it) fill her own, and bob's answer still keeps its key."""
    from e2m_plugins.dialog_keys import MAX_SLOTS_PER_CALL
    keys = DialogKeys(max_age=3600, max_uses=100, clock=lambda: 1000.0)
    alice, bob, carol = world.aor("alice"), world.aor("bob"), world.aor("carol")

    def msg(frm, to, from_tag):
        return make_request("INVITE", to, from_uri=frm, to_uri=to, call_id="c47@x",
                            cseq=1, from_tag=from_tag)
    for n in range(MAX_SLOTS_PER_CALL + 2):
        keys.keep_received(msg(carol, alice, f"c{n}"), bytes([n]) * 16, bytes([n]) * 16,
                           readers=frozenset())
    assert keys.keep_received(msg(bob, alice, "b1"), b"\xbb" * 16, b"\xbb" * 16,
                              readers=frozenset()) is not None
