"""A fifty-sixth attacker's review (December 2026) of 00358fc: the phone after this
morning's fixes (``git diff 50e6c26 00358fc -- e2m_plugins pjsua_hooks``): the UA
engine's merged-request refusal (482, ``_remote_tags`` from ``_confirmed``,
``_callers`` and ``_early_peers``), the ``keep=`` rule of ``DialogKeys.end_dialog``,
policies kept while ``_another_dialog_with`` the peer, the single-header rule, and the
phone's per-call event routing (``PhoneCall.serial``, ``E2MPhone._call_of``).

``test_hole_*`` xfail strictly on 00358fc (their assertion is the secure behaviour);
``test_control_*`` are the same flows without the attack, or show that the attack's
messages are taken as far as they should be (they pass).

Hole 1 (``test_hole_a_refused_2xx_pins_the_confirmed_tag_and_the_callers_bye_keeps_her_key``):
at the *caller*, ``UAEngine._open`` runs ``_note_confirmed`` (and ``_note_early_peer``)
before any check of the body, so a 2xx to her INVITE that ``open`` then refuses still
records its To tag as the tag the first 2xx confirmed (``_confirmed.setdefault``: the
first one wins for good).  Attacker: an untrusted hop past the proxy, or the callee
(both see the INVITE's top Via branch, which ``_sent_for`` asks for).  Messages: alice's
INVITE (C, a1); the attacker sends her a 200 in that transaction with a made-up To tag
(``hop``) and a plaintext SDP, refused by alice's hook (``DowngradeError``: pjsip never
sees it); then bob's real 200 (tag ``phone``), ACK, call.  When alice hangs up (her
BYE; or bob's BYE and her 200) ``_end_dialog`` compares the BYE's tag with ``_confirmed``
(``hop``), takes the "BYE of another fork" branch and ends only (C, phone); and
``_forget_parties`` keeps a1's entry.  Effect: alice's INVITE key K0 (under (C, a1)), the
call's dialog policies and its ``_parties``/``_confirmed``/``_early_peers`` entry
outlive the call (the key for ``cek_max_age``, an hour; the entry until 4096 newer
dialogs push it out), one datagram per call.

Hole 2 (``test_hole_a_200_the_hook_refused_leaves_the_callers_key_after_our_failure``): at
the *callee*, ``UAEngine.protect`` runs ``_note_confirmed(sent=True)`` and
``dialog_keys.answered`` for our 200 before ``_protect`` seals it; when sealing fails
(``PolicyError``: SRTP keys that would reach a proxy with ``[e2m] split_sdp = false``;
``MissingPeerCertificateError``: the caller's certificate from the certificate
service lapsed while the phone rang) the 200 never leaves, pjsua answers the
error instead (``PhoneAccount._refuse_unanswered``), but the tag is "confirmed" and
the INVITE's key no longer "received in" a pending transaction.  The failure then
ends nothing: ``_ends_our_answered_attempt`` needs ``tag not in _confirmed``, and
``answered(500)`` finds no key of that transaction.  Effect: the caller's INVITE key,
her dialog policies and the ``_parties`` entry (with ``_callers``: a retry of hers under
the same Call-ID and tag is refused 482) outlive the failed call.  No attacker needed
(a legitimate failure); any caller can make it happen to a phone so configured.

Hole 3 (``test_hole_six_stray_1xx_tags_unprotect_the_callees_early_tag``, ``..._let_a_second_dialog_drop_the_early_key``): the
``MAX_SLOTS_PER_CALL`` (6) bound on ``_early_peers`` keeps the *first* six To tags
(``if remote not in peers and len(peers) < MAX_SLOTS_PER_CALL``), and ``_note_early_peer``
runs before the response is checked.  Attacker: an untrusted hop (it sees the INVITE's
branch) sends alice six bodiless 180s with made-up To tags (a 7-way fork does the same
by itself); bob's real keyed 183 (tag ``phone``) comes after.  Review 55's holes are back:
a bare INVITE From bob;tag=phone is not refused 482, and any second dialog's end
(``keep`` = {a1, the six made-up tags}) drops (C, phone), the 183's key.  On the real
phone (``tests/pjsua/test_review56_phone.py``) the bare INVITE is answered 200, a second
call (five stray tags: 482).

What held (tried, no test kept unless named):

- the 482 against legitimate requests at the callee: a CANCEL carries the INVITE's
  branch (``_answered``), PRACK/UPDATE/ACK of an early dialog carry a To tag, a
  retransmission of the INVITE before or after our 1xx/2xx is exempt by its branch, a
  retry after our own failure passes because the failure drops the entry (review 55's
  controls); a forked INVITE reaching the phone twice by two branches is 482 by RFC 3261
  §8.2.2.2 (FirstCopy said so before);
- a retransmission of the INVITE after our failure (pjsip's transaction completed)
  re-keeps K0 in ``open``, but pjsip retransmits the failure, which passes ``on_tx``
  again (bodiless: not in the hook's emitted set), and ``answered`` drops it;
- ``check_unambiguous``: review 55's spellings, and no new one found (``parse`` and
  both engines call it);
- the phone's event routing: every pjsua event carries its object's serial; an unknown
  serial falls back to the Call-ID entry, which a second dialog never takes while a
  live call holds it; an old attempt's events after a 496 retry fall back to the same
  call and its ``DISCONNECTED`` is ignored (``call_id != sip_call_id``); ``live_calls``
  counts ``done`` per E2MCall, and ``hangup`` ends ``call.current``, the call's own
  object (traced in the code, not run);
- the bounds: ``_callers`` holds one tag per ``_parties`` entry, ``_early_peers`` six per
  entry, both dropped with the entry (``_drop_party``) and with the 4096-entry LRU.

Fixed (stop 30): what a received response shows about our dialogs and keys
(``_note_confirmed``, ``_note_early_peer``, ``_settle``) is recorded only once ``open``
accepted it; what we send confirms a dialog and settles keys only once ``_protect``
sealed it; an early peer's tag is recorded only when it holds keys (a hop's bare 180s
fill nothing); and at a dialog's end a caller-written tag of another dialog keeps no
slot that is the ending dialog's own.  The holes' markers are gone; they are guards now.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SDP_ANSWER, SDP_VIEW, SRTP_ANSWER, SRTP_OFFER, TRUSTED, answer,
                           invite, known_proxy, ua_engine)
from e2m_plugins.errors import E2MError, MergedRequestError, PolicyError
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine
from tests.unit.test_review43 import _forks_183
from tests.unit.test_review49 import CONTACT_B, _ack, _with_to_tag
from tests.unit.test_review53 import Clock, _second_dialog



@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


def _engine(world, name: str, **settings) -> UAEngine:
    return ua_engine(world, name, peers=("alice", "bob", "carol"), **settings)


def _refs(engine: UAEngine, call_id: str) -> set[bytes]:
    return {key.reference for key in engine.dialog_keys.for_call(call_id)}


# --------------------------------------------------------------------------------------
# Hole 1: a 2xx the caller refuses still pins the tag "the first 2xx confirmed"


def _call_after_a_refused_200(world, call_id: str, *, forged: bool):
    """alice (a1) calls bob; with ``forged``, a 200 in her INVITE's transaction with To
    tag ``hop`` and a plaintext SDP reaches her first and is refused.  bob's phone then
    answers 200 (tag ``phone``) and alice ACKs.  Returns (alice, phone)."""
    alice, phone = _engine(world, "alice"), _engine(world, "bob")
    offer = alice.protect(invite(world, call_id=call_id)).message
    if forged:
        stray = _with_to_tag(make_response(offer, 200, "OK", [CONTACT_B], SDP_ANSWER,
                                           "application/sdp"), offer, "hop")
        with pytest.raises(E2MError):
            alice.open(stray)
    ok = phone.protect(answer(phone.open(offer).message, to_tag="phone"))
    alice.open(ok.message)
    _ack(world, alice, phone, call_id)
    return alice, phone


def _alice_hangs_up(world, alice: UAEngine, call_id: str) -> None:
    alice.protect(make_request("BYE", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                               to_uri=world.aor("bob"), call_id=call_id, cseq=2,
                               from_tag="a1", to_tag="phone", via_host="127.0.0.1:5061"))


def test_control_the_callers_bye_ends_every_key_of_her_call(world):
    call_id = "r56-confirmed-ok@x"
    alice, _ = _call_after_a_refused_200(world, call_id, forged=False)
    assert _refs(alice, call_id)
    _alice_hangs_up(world, alice, call_id)
    assert not _refs(alice, call_id)
    assert "a1" not in alice._parties


def test_control_the_stray_200_is_refused_and_the_call_goes_on(world):
    """The attack's 200 is refused by ``open`` (pjsip never sees it); the real call is
    answered and keyed as usual."""
    call_id = "r56-confirmed-taken@x"
    alice, _ = _call_after_a_refused_200(world, call_id, forged=True)
    assert _refs(alice, call_id)


def test_hole_a_refused_2xx_pins_the_confirmed_tag_and_the_callers_bye_keeps_her_key(world):
    """Attacker: an untrusted hop past the proxy, or the callee (both see alice's INVITE
    branch, which ``_sent_for`` asks of a response).

    Messages: alice's INVITE (C, a1); a 200 in its transaction, To ...;tag=hop, with a
    plaintext SDP: ``open`` runs ``_note_confirmed`` (``_confirmed[a1] = "hop"``, by
    ``setdefault``) before ``_refuse_plaintext`` raises DowngradeError; the hook drops it.
    bob's real 200 (tag phone) is taken, ACKed; alice hangs up (BYE a1/phone).

    Effect: ``_end_dialog`` sees a BYE whose tag is not the "confirmed" one and ends only
    (C, phone); alice's INVITE key K0 under (C, a1) stays usable for ``cek_max_age``
    after the call, and ``_forget_parties`` keeps the call's entry (so its dialog
    policies and the 482 on its tags stay too).

    Fault: ``UAEngine._open`` (e2m_plugins/ua.py): ``self._note_confirmed(message,
    sent=False)`` and ``self._note_early_peer(message)`` before the message is accepted.
    Fix: learn ``_confirmed``/``_early_peers`` (and ``_settle``) only after ``_open``
    returned (as ``learn`` is), or let a later accepted 2xx replace a refused one's tag."""
    call_id = "r56-confirmed@x"
    alice, _ = _call_after_a_refused_200(world, call_id, forged=True)
    _alice_hangs_up(world, alice, call_id)
    assert not _refs(alice, call_id)


# --------------------------------------------------------------------------------------
# Hole 2: our 200 the hook refused to send makes our failure end nothing


def _phone_that_cannot_seal_its_200(world) -> UAEngine:
    """bob's phone with its home proxy reading SDP and ``[e2m] split_sdp = false``: an
    SDP with SRTP keys may not go under a key that proxy holds (``PolicyError``)."""
    return _engine(world, "bob", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),),
                   split_sdp=False)


def _rung_then_failed(world, call_id: str, *, tried_200: bool) -> UAEngine:
    """alice's SRTP INVITE reaches bob's phone, which rings (180, tag phone); with
    ``tried_200`` pjsua's 200 is refused by the hook; then pjsua's 500 ends the INVITE."""
    alice, phone = _engine(world, "alice"), _phone_that_cannot_seal_its_200(world)
    offer = alice.protect(invite(world, SRTP_OFFER, call_id=call_id)).message
    delivered = phone.open(offer).message
    assert _refs(phone, call_id)                      # K0, alice's offer key
    phone.protect(_with_to_tag(make_response(delivered, 180, "Ringing", [CONTACT_B]),
                               delivered, "phone"))
    if tried_200:
        with pytest.raises(PolicyError):
            phone.protect(answer(delivered, SRTP_ANSWER, to_tag="phone"))
    phone.protect(_with_to_tag(make_response(delivered, 500, "Server Internal Error"),
                               delivered, "phone"))
    return phone


def test_control_a_failure_after_ringing_ends_the_attempt(world):
    call_id = "r56-refused-ok@x"
    phone = _rung_then_failed(world, call_id, tried_200=False)
    assert not _refs(phone, call_id)
    assert "phone" not in phone._parties


def test_control_the_phone_cannot_seal_its_srtp_200(world):
    """The premise: the hook refuses the 200 (so pjsua answers an error instead)."""
    _rung_then_failed(world, "r56-refused-premise@x", tried_200=True)


def test_hole_a_200_the_hook_refused_leaves_the_callers_key_after_our_failure(world):
    """Attacker: none needed (a legitimate call that fails); any caller of such a phone.

    Messages: alice's SRTP INVITE; the phone rings (180, tag phone); pjsua's 200 is
    refused by ``protect`` (``PolicyError``), pjsua answers 500 instead.  ``protect`` of
    the 200 had already run ``_note_confirmed(sent=True)`` (``_confirmed[phone] = a1``)
    and ``dialog_keys.answered`` (K0's ``received_in`` cleared, as for a sent 2xx).

    Effect: the 500 is not "our failure to the INVITE we rang for"
    (``_ends_our_answered_attempt`` requires ``tag not in _confirmed``) and ``answered``
    finds no key received in that transaction: alice's K0 stays at the phone under (C,
    a1) for ``cek_max_age``, with the dialog policies of (C, alice) and the ``phone``
    entry (whose ``_callers`` makes alice's retry under C and a1 a 482).

    Fault: ``UAEngine.protect`` (e2m_plugins/ua.py): ``_note_confirmed`` and
    ``dialog_keys.answered`` before ``_protect`` succeeded.  Fix: do both only after
    ``_protect`` returned (or undo them when it raises)."""
    call_id = "r56-refused@x"
    phone = _rung_then_failed(world, call_id, tried_200=True)
    assert not _refs(phone, call_id)
    assert "phone" not in phone._parties


# --------------------------------------------------------------------------------------
# Hole 3: six stray 1xx tags fill _early_peers before the real callee's


def _ring_after_strays(world, call_id: str, strays: int):
    """alice (a1) calls bob; ``strays`` bodiless 180s in her INVITE's transaction, each
    with a made-up To tag, reach her, then bob's keyed 183 (tag phone).  Returns alice
    and the 183's key references."""
    alice = UAEngine(_engine(world, "alice").config, clock=Clock())
    offer = alice.protect(invite(world, call_id=call_id)).message
    for n in range(strays):
        alice.open(_with_to_tag(make_response(offer, 180, "Ringing", [CONTACT_B]), offer,
                                f"stray{n}"))
    before = _refs(alice, call_id)
    alice.open(_forks_183(world, offer, "phone"))
    early = _refs(alice, call_id) - before
    assert early
    return alice, early


def _bare_invite_from_bobs_tag(world, call_id: str, tag: str = "phone"):
    return make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                        to_uri=world.aor("alice"), call_id=call_id, cseq=1, from_tag=tag,
                        via_host="192.0.2.66:5060")


def test_control_five_strays_leave_room_for_the_callees_tag(world):
    """With five stray tags the sixth place is bob's: the 482 and ``keep`` cover it."""
    call_id = "r56-strays-5@x"
    alice, early = _ring_after_strays(world, call_id, 5)
    with pytest.raises(MergedRequestError):
        alice.open(_bare_invite_from_bobs_tag(world, call_id))
    _second_dialog(world, alice, call_id, caller="bob", to_uri=world.aor("alice"),
                   from_tag="yy", our_tag="a2", ending="cancelled while ringing")
    assert early <= _refs(alice, call_id)


def test_hole_six_stray_1xx_tags_unprotect_the_callees_early_tag(world):
    """Attacker: an untrusted hop (it sees alice's INVITE branch), or nobody but a 7-way
    fork.  Messages: six bodiless 180s To ...;tag=stray0..5 in alice's INVITE
    transaction, then bob's keyed 183 (tag phone); then a bare INVITE From bob;tag=phone
    under C.  Effect: ``_early_peers[a1]`` is full before bob's tag arrives, so the
    INVITE opens (review 55 hole 2's premise: pjsua takes it as a second call, which held
    open keeps the call's key after its end).

    Fault: ``UAEngine._note_early_peer`` keeps the first ``MAX_SLOTS_PER_CALL`` tags and
    runs before the response is checked.  Fix: record the tag only of a response the
    engine accepted and that carries a dialog-making body or a key (a slot), keep the
    newest tags (or every tag that holds a slot in ``DialogKeys``), and refuse a new
    dialog naming any tag that holds a slot under the Call-ID."""
    call_id = "r56-strays-482@x"
    alice, _ = _ring_after_strays(world, call_id, 6)
    with pytest.raises(MergedRequestError):
        alice.open(_bare_invite_from_bobs_tag(world, call_id))


@pytest.mark.parametrize("ending", ["cancelled while ringing", "answered, then the sender's BYE"])
def test_hole_six_stray_1xx_tags_let_a_second_dialog_drop_the_early_key(world, ending):
    """As above; then a bare INVITE From bob;tag=yy (anyone who read the Call-ID and the
    AoRs) is taken as a second call (a2) and CANCELled or BYEd.  Effect: ``keep`` at its
    end is {a1, stray0..5}: ``end_dialog`` drops (C, phone), the key bob's 183 offered
    (review 55 hole 1 again); bob's 200 or UPDATE under it cannot be opened."""
    call_id = f"r56-strays-end-{ending[:5]}@x"
    alice, early = _ring_after_strays(world, call_id, 6)
    _second_dialog(world, alice, call_id, caller="bob", to_uri=world.aor("alice"),
                   from_tag="yy", our_tag="a2", ending=ending)
    assert early <= _refs(alice, call_id)
