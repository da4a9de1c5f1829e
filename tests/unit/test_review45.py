"""A forty-fifth attacker's review (December 2026) of 1438a99: the phone's dialog-key rules
as review 43 changed them (``git show 060cb48``, ``e2m_plugins/dialog_keys.py``): keys we
offered open before the peer confirms them, and a key is kept under the peer's tag first.

``test_hole_*`` xfail strictly on 1438a99 (their assertion is what a fix makes true);
``test_control_*`` are the same flows without the attack (they pass).

Fixed (``e2m_plugins/dialog_keys.py``, ``UAEngine._end_dialog``): a slot is named by the
dialog's Call-ID, tag *and parties*, so a third party's call under the same ids has
slots of its own and never pushes a fork's key into the shared one; a key goes under
the peer's tag whenever the message has it.  A BYE takes the keys under our own tag
(the INVITE's, which every fork shares) and the call's policies only when it ends the
dialog the first 2xx made and we sent it, or names that dialog; any other BYE ends only
its own slot.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import answer, invite, reinvite, ua_engine
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import SipMessage, make_request
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review43 import NEW_SDP, _forks_183, _reinvite_opens_at_the_answering_phone


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


# --------------------------------------------------------------------------------------
# 1. A third party squats the other fork's slot: that fork's key goes to the shared one


def _carols_call_under(world, carol, call_id: str, tag: str) -> SipMessage:
    """carol's own INVITE to alice (From carol, signed and sealed by carol's phone, which
    offers a key for reuse as any E2M UA does) with the Call-ID of alice's call and the
    From tag ``tag`` she read off the wire."""
    request = make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("carol"),
                           to_uri=world.aor("alice"), call_id=call_id, cseq=1, from_tag=tag,
                           body=NEW_SDP, content_type="application/sdp",
                           extra_headers=[("Contact", "<sip:carol@127.0.0.1:5063>")])
    return carol.protect(request).message


def _forked_call(world, call_id: str, *, squat: bool) -> bool:
    alice = ua_engine(world, "alice", peers=("bob", "carol"))
    phone = ua_engine(world, "bob")
    carol = ua_engine(world, "carol", peers=("alice",))
    offer = alice.protect(invite(world, call_id=call_id)).message
    if squat:
        assert alice.open(_carols_call_under(world, carol, call_id, "desk")).info.trusted
    alice.open(_forks_183(world, offer, "desk"))
    delivered = phone.open(offer).message
    alice.open(phone.protect(answer(delivered, to_tag="phone")).message)
    return _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


def test_control_the_other_forks_key_stays_in_its_slot(world):
    """Review 43's fork flow without carol: device 2's 183 key is kept under (Call-ID,
    desk), alice's re-INVITE to device 1 opens."""
    assert _forked_call(world, "r45-fork-ok@x", squat=False)


def test_hole_a_third_partys_call_under_the_forks_tag_puts_its_key_in_the_shared_slot(world):
    """Attacker: insider UA (carol) who reads the ids off the wire (the dialog_keys
    docstring's "anyone who has read the ids off the wire ... signed as itself"): device
    2's tag is on its 180 Ringing, sent before the 183 with early media, or an untrusted
    on-path hop holds the 183 back a moment while carol uses the tag.

    Steps: alice's INVITE (Call-ID C, tag a1, offer key K0 in slot (C, a1)) is forked to
    bob's two devices.  Device 2 rings with a signed 183, To tag ``desk``, offering a fresh
    key Kd.  Before it reaches alice, carol sends alice an INVITE of her own, signed as
    carol, with Call-ID C and From tag ``desk``: alice opens it (it names none of her
    tags, so ``_check_parties`` has nothing to compare) and keeps carol's offered key in
    slot (C, desk), which now belongs to {alice, carol}.  Device 2's 183 arrives:
    ``_keep`` tries the peer's slot (C, desk) first, passes it over as squatted, and
    files Kd in the next one, (C, a1): the caller's own slot, which every fork shares.
    Device 1 answers 200 (tag ``phone``).

    Effect: review 43's hole is back at a third party's will: Kd is the newest key of
    the answered dialog (a1, phone), alice's next re-INVITE (hold, resume, session
    refresh) is sealed under it for the device that did not answer, device 1 answers
    493 (a retry, one of the call's ``MAX_RETRIES_PER_CALL``), and with SRTP alice's new
    keys go under a key the other device holds.

    Fix: a key received in (or offered in) a message that has the peer's tag belongs
    to the peer's slot only: when that slot is another pair's, keep nothing rather
    than fall back to our own tag's slot (our tag alone is the slot of the
    dialog-creating request); better, key the slots by the dialog's parties too
    ((Call-ID, tag, parties)), so a third party shares no slot with the pair at all."""
    assert _forked_call(world, "r45-fork-squat@x", squat=True)


# --------------------------------------------------------------------------------------
# 2. Ending another dialog of the INVITE drops the answered dialog's offer key


def _answered_then(world, call_id: str, ending: str | None) -> bool:
    """alice calls bob; bob's phone answers 200 (tag ``phone``) under alice's offer key
    K0 (``reusable``'s choice); then ``ending`` ends some other dialog of her INVITE.
    Returns whether the phone's next re-INVITE (sealed under K0, the only key it has)
    opens at alice."""
    alice = ua_engine(world, "alice")
    phone = ua_engine(world, "bob")
    offer = alice.protect(invite(world, call_id=call_id)).message
    ok = phone.protect(answer(phone.open(offer).message, to_tag="phone"))
    assert ok.info.key_reuse
    alice.open(ok.message)
    dialog = dict(from_uri=world.aor("alice"), to_uri=world.aor("bob"), call_id=call_id,
                  from_tag="a1")
    alice.protect(make_request("ACK", "sip:bob@127.0.0.1:5062", cseq=1, to_tag="phone", **dialog))
    if ending == "our BYE to a second fork's 200":
        desk = ua_engine(world, "bob")
        alice.open(desk.protect(answer(desk.open(offer).message, to_tag="desk")).message)
        alice.protect(make_request("ACK", "sip:bob@127.0.0.1:5099", cseq=1, to_tag="desk",
                                   **dialog))
        alice.protect(make_request("BYE", "sip:bob@127.0.0.1:5099", cseq=2, to_tag="desk",
                                   **dialog))
    elif ending == "a hop's bare BYE with a made-up tag":
        alice.open(make_request("BYE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                                to_uri=world.aor("alice"), call_id=call_id, cseq=7,
                                from_tag="zz", to_tag="a1", body=b""))
    sent = phone.protect(reinvite(world, "bob", "alice", call_id, 5, "phone", "a1", sdp=NEW_SDP))
    assert sent.info.key_reuse
    try:
        alice.open(sent.message)
    except E2MError:
        return False
    return True


def test_control_the_answering_phones_reinvite_under_the_offer_key_opens(world):
    assert _answered_then(world, "r45-bye-ok@x", None)


@pytest.mark.parametrize("ending", ["our BYE to a second fork's 200",
                                    "a hop's bare BYE with a made-up tag"])
def test_hole_ending_another_dialog_of_the_invite_drops_the_answered_dialogs_key(world, ending):
    """Attacker: none needed (parallel forking: two of bob's devices answer 200, and
    alice's phone ends the second dialog with a BYE, RFC 3261 §13.2.2.4); or an untrusted
    on-path hop (it read Call-ID and alice's tag) that sends alice a bare, unsigned BYE
    From bob with a To tag a1 and a From tag of its own making (pjsip answers 481, the
    call goes on; the engine has already ended the keys: ``_open`` runs ``_end_dialog``
    for any BYE that passes ``_check_parties``, whose AoRs a hop rewrites freely).

    Steps: the answered dialog (a1, phone) lives on K0, alice's INVITE key, kept in
    (Call-ID, a1): review 43 leaves the INVITE's key in the caller's slot, shared by
    every dialog of the INVITE.  The BYE names (a1, desk) or (zz, a1);
    ``DialogKeys.end_dialog`` empties both of its slots, (Call-ID, a1) among them.

    Effect: alice drops the key the answered call runs on.  The phone's next re-INVITE
    or UPDATE (sealed under K0, as §2 lets it) is refused at alice (493), costing a
    retry of the call's ``MAX_RETRIES_PER_CALL``; the hop can repeat it (and
    ``_end_dialog`` also ends the call's learnt dialog policies).  Not new in review 43
    (on 060cb48^ every key of the call sat in that slot and went the same way), but
    the promise "a fork's key stays in its dialog" does not hold for the INVITE's key.

    Fix: a BYE with both tags ends only its peer's slot; the keys of our own tag's slot
    (the INVITE's) go only when no dialog of that INVITE is left (the confirmed remote
    tag, ``UAEngine._confirmed``, is the one whose BYE takes them) or when they age out;
    and a received BYE should end keys only once the stack accepted it (not a 481)."""
    assert _answered_then(world, f"r45-bye-{'fork' if 'fork' in ending else 'hop'}@x", ending)
