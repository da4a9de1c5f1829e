"""A fifty-third attacker's review (December 2026) of 50e6c26: the phone's dialog ends
after reviews 49 and 51 (``git show 53f7170 ef5d831 -- e2m_plugins pjsua_hooks``): a BYE
we get ends keys and policies at our 2xx to it; ``DialogKey.received_in`` names the
request's transaction; our failure to the INVITE we rang for ends that attempt; a dialog's
end takes the whole call's slots only when ``_another_dialog_of_ours`` is false, else its
own peer's slot; policies end per (Call-ID, peer); a new dialog whose From tag is one of
our own tags under the Call-ID is refused.

``test_hole_*`` xfail strictly on 50e6c26 (their assertion is the secure behaviour);
``test_control_*`` are the same flows without the attack, or show that the attack's
messages are accepted as far as they should be (they pass).

Hole 1 (``test_hole_a_second_dialog_with_the_peers_tag_ends_the_*``): the "own peer's
slot" that the end of a second dialog takes is named by the *peer's* tag, which the
second dialog's sender writes.  At the callee every key of the live call lives under the
caller's tag (``DialogKeys._keep``: the peer's tag), at the caller the keys the callee
offered (and hers since a rekey) under the callee's tag.  Review 51's own-tag refusal
looks at *our* tags only.  So a bare INVITE under the live call's Call-ID whose From tag
is the live dialog's *remote* tag (at the callee in another letter case: pjsip and the
hook's ``FirstCopy`` tell "A1" from "a1", the engine lower-cases both; at the caller the
exact tag, which no ``FirstCopy`` there remembers) is a second call to pjsip, and its end
(our 487 after a CANCEL, our 200 to its BYE, our BYE when it is never ACKed) drops the
live call's slot: its next re-INVITE gets 493.  Shown on the real phone too
(``tests/pjsua/test_review53_phone.py``).

Hole 2 (``test_hole_a_second_dialog_to_another_uri_ends_the_live_calls_policies``):
policies end per (Call-ID, peer AoR as written) whenever ``_another_dialog_of_ours`` is
false, and that test compares the *whole* parties, our side too.  A bare INVITE From
alice To another URI of the phone (``sip:bob@127.0.0.1``, any To: pjsua takes it) under
the live call's Call-ID has other parties, so its end is "the only dialog" and
``end_scope((C, alice))`` takes the live call's dialog policy: the phone's next body in
alice's call leaves her proxy out (496).

Hole 3 (``test_hole_a_held_second_dialog_keeps_the_callers_key_after_the_call``): the other
way round, a second dialog the sender keeps open (answered, ACKed, never ended) makes
``_another_dialog_of_ours`` true at the live call's real end: our 200 to bob's BYE takes
only the peer's slot, so alice's own INVITE key (under her tag) outlives the call by up
to ``cek_max_age`` (an hour), and the call's dialog policies (``end_scope`` is skipped)
up to their expiry.

Fixed (stop 30): a new dialog whose sender writes, in any letter case, a tag of a dialog
of ours under way under the Call-ID (ours or the peer's) is refused 482, but for a
retransmission of the INVITE that began it (``UAEngine._refuse_a_live_dialogs_tag``);
a dialog's end takes every slot of its parties but those named by another live dialog's
tags (``DialogKeys.end_dialog(keep=...)``), so neither a second dialog's end nor one
held open decides how much of the live call goes; its policies end unless another
dialog of ours with that peer is under way.  Each of the two rules alone closes hole 1 (checked
by turning the other off).  The holes' markers are gone; they are guards now.

What held (tried, no test kept unless named):

- the own-tag refusal in another case ("A1" for our "a1"): lower-cased, refused
  (``test_control_our_own_tag_in_another_case_is_refused``); whitespace or quotes
  around the tag (``;tag= a1``, ``;tag="a1"``), ``TAG=``: the core's parser strips them,
  and both the own-tag check and the hook's ``FirstCopy`` read the tag through it (only
  letter case differs between the two: hole 1); a tag given twice is refused;
- a new dialog with a To tag (our tag on the To side, a made-up From tag): pjsip finds
  no dialog and answers 481, and review 49 ends nothing on a received BYE;
- a stray failure to a copy of the ringing INVITE with our tag on it: ``_answered``
  names the branch, so only the rung transaction's failure ends the attempt;
- a BYE crossing a re-INVITE (either side): the BYE's 200 ends the call as it should;
  the re-INVITE's later 487/481 finds nothing to end;
- a CANCEL crossing the callee's 200: no 487 is sent, the caller's BYE ends the call;
- a BYE in the caller's early dialog answered 200 (``sent and confirmed is None``):
  pjsip ends the INVITE session on it, so the keys going is right;
- pushing the live call's ``_parties`` entry out (4096 LRU): entries come only from what
  we send (our INVITEs, our 1xx/2xx), every attempt the sender can end is forgotten,
  and pjsua holds 4 calls at once, so a stranger cannot hold 4096 of them.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import SDP_OFFER, TRUSTED, answer, invite, reinvite, ua_engine
from e2m_plugins.errors import BindingMismatchError, E2MError, MalformedError, MergedRequestError
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine
from pjsua_hooks.firstcopy import Duplicate, FirstCopy
from tests.unit.test_review43 import NEW_SDP, _reinvite_opens_at_the_answering_phone
from tests.unit.test_review49 import CONTACT_B, _ack, _with_to_tag
from tests.unit.test_review51 import (_bobs_reinvite_opens_at_alice, _call_with_a_dialog_policy,
                                      cancel_while_ringing,
                                      _phones_reinvite_readers)

HOP = "192.0.2.66:5060"
ENDINGS = ["cancelled while ringing", "answered, then the sender's BYE",
           "answered, never ACKed"]


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _engine(world, name: str, clock: Clock | None = None, **settings) -> UAEngine:
    engine = ua_engine(world, name, peers=("alice", "bob", "carol"), **settings)
    if clock is None:
        return engine
    return UAEngine(engine.config, clock=clock)


def _answered_call(world, call_id: str, clock: Clock | None = None
                   ) -> tuple[UAEngine, UAEngine]:
    """alice (tag a1) calls bob's phone, which answers 200 (tag ``phone``) under her
    offer key K0 and keeps it under (C, a1): the peer's tag.  alice ACKs."""
    alice, phone = _engine(world, "alice", clock), _engine(world, "bob", clock)
    offer = alice.protect(invite(world, call_id=call_id)).message
    ok = phone.protect(answer(phone.open(offer).message, to_tag="phone"))
    assert ok.info.key_reuse
    alice.open(ok.message)
    _ack(world, alice, phone, call_id)
    return alice, phone


def _second_dialog(world, engine: UAEngine, call_id: str, *, caller: str, to_uri: str,
                   from_tag: str, our_tag: str, ending: str | None,
                   first: FirstCopy | None = None) -> None:
    """A bare, unsigned, bodiless INVITE From ``caller``'s AoR To ``to_uri`` under
    ``call_id`` with From tag ``from_tag`` reaches ``engine``'s phone (past the hook's
    ``first`` copy check when given), which pjsip takes as a second call (our tag
    ``our_tag``); then it is ended by ``ending`` (as review 51's test did), or, for
    None, answered, ACKed and held open."""
    def bare(method: str, cseq: int, to_tag: str | None = None) -> SipMessage:
        return make_request(method, f"sip:x@127.0.0.1:5062", from_uri=world.aor(caller),
                            to_uri=to_uri, call_id=call_id, cseq=cseq, from_tag=from_tag,
                            to_tag=to_tag, via_host=HOP,
                            extra_headers=[("Contact", f"<sip:{caller}@{HOP}>")])

    request = bare("INVITE", 1)
    try:
        opened = engine.open(request)
    except E2MError:
        return          # refused before pjsip sees it (what a fix may do): no second call
    if first is not None:
        first.check(request, opened.message, opened.info.encrypted or opened.info.signed)
    delivered = opened.message
    if ending == "cancelled while ringing":
        cancel_while_ringing(engine, delivered, bare("CANCEL", 1), our_tag)
        return
    engine.protect(answer(delivered, SDP_OFFER, to_tag=our_tag))
    if ending == "answered, never ACKed":
        engine.protect(make_request("BYE", f"sip:{caller}@{HOP}", from_uri=to_uri,
                                    to_uri=world.aor(caller), call_id=call_id, cseq=1,
                                    from_tag=our_tag, to_tag=from_tag))
        return
    engine.open(bare("ACK", 1, our_tag))
    if ending is None:
        return
    assert ending == "answered, then the sender's BYE"
    bye = bare("BYE", 2, our_tag)
    engine.open(bye)
    engine.protect(make_response(bye, 200, "OK"))


# --------------------------------------------------------------------------------------
# Hole 1 at the callee: the caller's own tag, in another letter case


def _phone_with_first_copy(world, call_id: str) -> tuple[UAEngine, UAEngine, FirstCopy]:
    """As ``_answered_call``, with the hook's FirstCopy having taken alice's INVITE."""
    alice, phone = _engine(world, "alice"), _engine(world, "bob")
    first = FirstCopy(max_age=332.0)
    offer = alice.protect(invite(world, call_id=call_id)).message
    opened = phone.open(offer)
    first.check(offer, opened.message, opened.info.encrypted or opened.info.signed)
    ok = phone.protect(answer(opened.message, to_tag="phone"))
    alice.open(ok.message)
    _ack(world, alice, phone, call_id)
    return alice, phone, first


def test_control_a_second_invite_with_the_callers_exact_tag_is_refused(world):
    """The exact tag a1 from another branch is refused by the engine (since the fix; the
    hook's FirstCopy would answer 482 too); a new tag (review 51) ends only its own slot:
    alice's re-INVITE opens."""
    call_id = "r53-exact@x"
    alice, phone, first = _phone_with_first_copy(world, call_id)
    bare = make_request("INVITE", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                        to_uri=world.aor("bob"), call_id=call_id, cseq=1, from_tag="a1",
                        via_host=HOP)
    with pytest.raises(BindingMismatchError):
        phone.open(bare)
    with pytest.raises(Duplicate):
        first.check(bare, bare, False)
    _second_dialog(world, phone, call_id, caller="alice", to_uri=world.aor("bob"),
                   from_tag="zz", our_tag="b3", ending="cancelled while ringing", first=first)
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


def test_control_the_caller_tag_in_another_case_passes_the_hook_not_the_engine(world):
    """"A1" is another tag to the hook (and to pjsip, which compares tags as written):
    the hook alone would deliver it as a new call.  The engine refuses it (since the
    fix): a1 is the peer's tag of a dialog of ours under way."""
    call_id = "r53-case-passes@x"
    _, phone, first = _phone_with_first_copy(world, call_id)
    request = make_request("INVITE", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                           to_uri=world.aor("bob"), call_id=call_id, cseq=1, from_tag="A1",
                           via_host=HOP)
    first.check(request, request, False)               # no Duplicate: a new call to it
    with pytest.raises(BindingMismatchError):
        phone.open(request)


def test_control_a_retransmission_of_the_answered_invite_still_opens(world):
    """The fix's exception: alice's INVITE itself again (its branch: our 200 was lost)
    is pjsip's to absorb, not refused as a new dialog naming her tag."""
    call_id = "r53-retransmitted@x"
    alice, phone = _engine(world, "alice"), _engine(world, "bob")
    offer = alice.protect(invite(world, call_id=call_id)).message
    delivered = phone.open(offer).message
    phone.protect(answer(delivered, to_tag="phone"))
    assert phone.open(offer).info.encrypted


@pytest.mark.parametrize("ending", ENDINGS)
def test_hole_a_second_dialog_with_the_peers_tag_ends_the_callees_live_keys(world, ending):
    """Attacker: an untrusted on-path hop, or an off-path sender who read the live call's
    Call-ID, the caller's From tag and the two AoRs (plaintext headers); no certificate,
    no signature.

    Messages: alice's call with bob's phone is answered (Call-ID C, tags a1/phone); the
    phone keeps alice's offer key K0 under (C, a1, {alice, bob}), the *peer's* tag.  The
    attacker sends the phone a bodiless INVITE: Call-ID C, From alice;tag=A1 (the
    caller's tag in upper case), To bob, a Via of its own.  The hook's ``FirstCopy``
    keys by the tag as written, so this is no copy; pjsip takes it as a new call; the
    own-tag refusal of review 51 looks only for *our* tags (phone), and finds none.
    The phone rings or answers with tag b2; the attacker CANCELs (our 487), or ACKs and
    BYEs (our 200), or never ACKs (the phone's BYE).  ``_end_dialog`` sees the live
    call's entry in ``_parties`` (``_another_dialog_of_ours``) and ends "only its own
    peer's slot": ``end_dialog(peer_tag="A1")``, which lower-cases the tag and drops
    (C, a1, {alice, bob}): the live call's slot.

    Effect: alice's next re-INVITE under K0 (hold, resume, a session refresh) is refused
    493 at the phone, one of the call's ``MAX_RETRIES_PER_CALL``; repeatable after each
    rekey.  The exact tag a1 does the same once the hook's FirstCopy entry is 332 s old,
    or at once when alice's INVITE had no body (FirstCopy keeps protected ones only).

    Fault: ``UAEngine._end_dialog`` (e2m_plugins/ua.py, the ``_another_dialog_of_ours``
    branch) ends the slot named by the ending dialog's *remote* tag, which is the sender's
    to write and may be the live dialog's remote tag.

    Fix: refuse a new dialog whose From tag (lower-cased) is the remote tag of a live
    dialog of ours under the Call-ID (``_confirmed`` values, or record the remote tag with
    ``_parties``), as review 51 refuses our own; better, record each slot with the
    INVITE (Call-ID, caller's tag as written, our tag) it belongs to, and end a second
    dialog's slots by that, never by a tag alone."""
    call_id = f"r53-case-{ENDINGS.index(ending)}@x"
    alice, phone, first = _phone_with_first_copy(world, call_id)
    _second_dialog(world, phone, call_id, caller="alice", to_uri=world.aor("bob"),
                   from_tag="A1", our_tag="b2", ending=ending, first=first)
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


def test_control_our_own_tag_in_another_case_is_refused(world):
    """What held: review 51's own-tag refusal lower-cases (alice's tag a1 as "A1")."""
    call_id = "r53-own-case@x"
    alice, _ = _answered_call(world, call_id)
    bare = make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                        to_uri=world.aor("alice"), call_id=call_id, cseq=1, from_tag="A1",
                        via_host=HOP)
    with pytest.raises(BindingMismatchError):
        alice.open(bare)


# --------------------------------------------------------------------------------------
# Hole 1 at the caller: the callee's exact tag (no FirstCopy entry there)


def _rekeyed_call(world, call_id: str) -> tuple[UAEngine, UAEngine, Clock]:
    """alice's answered call, an hour and a second later: K0 has aged out
    (``cek_max_age``), so her session refresh offers a fresh key K1 (to bob's
    certificate), kept at alice under (C, phone), the peer's tag; the phone answers
    under K1 and alice's 200 confirms it."""
    clock = Clock()
    alice, phone = _answered_call(world, call_id, clock)
    clock.now += alice.config.cek_max_age + 1
    refresh = alice.protect(reinvite(world, "alice", "bob", call_id, 2, "a1", "phone",
                                     sdp=NEW_SDP))
    assert not refresh.info.key_reuse
    delivered = phone.open(refresh.message).message
    ok = phone.protect(make_response(delivered, 200, "OK", [CONTACT_B], SDP_OFFER,
                                     "application/sdp"))
    assert ok.info.key_reuse
    alice.open(ok.message)
    return alice, phone, clock


def test_control_after_the_rekey_bobs_reinvite_opens_at_alice(world):
    call_id = "r53-caller-ok@x"
    alice, phone, _ = _rekeyed_call(world, call_id)
    assert _bobs_reinvite_opens_at_alice(world, alice, phone, call_id)


@pytest.mark.parametrize("ending", ENDINGS)
def test_control_a_second_dialog_with_a_new_tag_leaves_the_callers_keys(world, ending):
    """Review 51's attack (a tag of its own, yy) ends only its own slot."""
    call_id = f"r53-caller-new-{ENDINGS.index(ending)}@x"
    alice, phone, _ = _rekeyed_call(world, call_id)
    _second_dialog(world, alice, call_id, caller="bob", to_uri=world.aor("alice"),
                   from_tag="yy", our_tag="a2", ending=ending)
    assert _bobs_reinvite_opens_at_alice(world, alice, phone, call_id)


@pytest.mark.parametrize("ending", ENDINGS)
def test_hole_a_second_dialog_with_the_peers_tag_ends_the_callers_live_keys(world, ending):
    """Attacker: as above, toward the caller (it read the callee's To tag off the 200).

    Messages: alice's call with bob's phone (C, a1/phone) has rekeyed (her refresh after
    ``cek_max_age`` offered K1, kept at alice under (C, phone, {alice, bob}); the phone
    answered under it).  The attacker sends alice's phone a bodiless INVITE: Call-ID C,
    From bob;tag=phone (the callee's exact tag), To alice.  alice's hook has no
    ``FirstCopy`` entry for (C, phone): she never got an initial INVITE in this call;
    the own-tag refusal finds no tag of hers.  pjsip: a second call (tag a2), ended by
    CANCEL (her 487), by BYE (her 200), or never ACKed (her BYE).  ``_end_dialog`` ends
    "its own peer's slot", ``end_dialog(peer_tag="phone")``: (C, phone), K1.

    Effect: the phone's next re-INVITE (or UPDATE) in the call, under K1 as §2 lets it,
    is refused 493 at alice; repeatable.

    Fault and fix: as above (``UAEngine._end_dialog``)."""
    call_id = f"r53-caller-{ENDINGS.index(ending)}@x"
    alice, phone, _ = _rekeyed_call(world, call_id)
    _second_dialog(world, alice, call_id, caller="bob", to_uri=world.aor("alice"),
                   from_tag="phone", our_tag="a2", ending=ending)
    assert _bobs_reinvite_opens_at_alice(world, alice, phone, call_id)


# --------------------------------------------------------------------------------------
# Hole 2: a second dialog To another URI of ours ends the live call's policies


OTHER_TO = "sip:bob@127.0.0.1:5062"


@pytest.mark.parametrize("ending", ENDINGS)
def test_control_a_second_dialog_to_bobs_own_aor_leaves_the_policies(world, ending):
    """The same second dialog To bob's AoR (review 51's fix: ``_another_dialog_of_ours``
    is true, its end takes only its own slot, no policy)."""
    call_id = f"r53-policy-ok-{ENDINGS.index(ending)}@x"
    _, phone = _call_with_a_dialog_policy(world, call_id)
    _second_dialog(world, phone, call_id, caller="alice", to_uri=world.aor("bob"),
                   from_tag="zz", our_tag="b2", ending=ending)
    assert TRUSTED in _phones_reinvite_readers(world, phone, call_id)


def test_control_a_second_dialog_to_another_uri_is_taken(world):
    """The attack's INVITE (To the phone's contact URI) is opened: no body, no tag of
    ours; the phone's answer in it is sealed to alice's certificate."""
    call_id = "r53-policy-taken@x"
    _, phone = _call_with_a_dialog_policy(world, call_id)
    request = make_request("INVITE", OTHER_TO, from_uri=world.aor("alice"), to_uri=OTHER_TO,
                           call_id=call_id, cseq=1, from_tag="zz", via_host=HOP)
    delivered = phone.open(request).message
    assert phone.protect(answer(delivered, SDP_OFFER, to_tag="b2")).info.encrypted


@pytest.mark.parametrize("ending", ENDINGS)
def test_hole_a_second_dialog_to_another_uri_ends_the_live_calls_policies(world, ending):
    """Attacker: an untrusted hop or an off-path sender who read the call's Call-ID and
    alice's From (plaintext headers); an insider (carol) does it as well from her own
    phone; no signature.

    Messages: alice's call with bob's phone runs with her home proxy's dialog policy
    (scope (C, alice)): the phone's bodies in it are sealed for the proxy too.  The
    attacker sends the phone a bodiless INVITE under C, From alice;tag=zz, To
    <sip:bob@127.0.0.1:5062> (the phone's contact, or any URI: pjsua takes an INVITE
    whatever its To), and ends it as review 51 did (CANCEL, BYE, no ACK).  Its parties
    {alice, bob@127.0.0.1} are not the live call's, so ``_another_dialog_of_ours`` is
    false and ``_end_dialog`` goes on to ``policies.end_scope(dialog_scope(C, alice))``:
    the scope is the peer's AoR alone, and that is the live call's.

    Effect: the phone's next body in alice's call (a re-INVITE, an UPDATE, its 200 to
    hers) leaves her proxy out: the proxy answers 496 (a round trip and a retry of
    ``MAX_RETRIES_PER_CALL``; an answer cannot be retried).  Repeatable at will.

    Fault: ``UAEngine._end_dialog`` (e2m_plugins/ua.py, the ``end_scope`` line): a policy
    scope names the Call-ID and the peer only, not the dialog's other party (ours), so a
    dialog with other parties ends a scope it does not own.

    Fix: name a dialog policy's scope by the Call-ID and both parties
    (``dialog_parties``), as the key slots are (review 45), or skip ``end_scope`` while
    any dialog of ours under the Call-ID with that peer (``_parties``, whatever our side)
    is under way."""
    call_id = f"r53-policy-{ENDINGS.index(ending)}@x"
    _, phone = _call_with_a_dialog_policy(world, call_id)
    _second_dialog(world, phone, call_id, caller="alice", to_uri=OTHER_TO, from_tag="zz",
                   our_tag="b2", ending=ending)
    assert TRUSTED in _phones_reinvite_readers(world, phone, call_id)


# --------------------------------------------------------------------------------------
# Hole 3: a held second dialog keeps the live call's key after the call


def _bob_ends_the_call(world, alice: UAEngine, call_id: str) -> None:
    """bob's BYE in the live call (C, phone/a1); alice's phone answers 200."""
    bye = make_request("BYE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                       to_uri=world.aor("alice"), call_id=call_id, cseq=2, from_tag="phone",
                       to_tag="a1", via_host="127.0.0.1:5062")
    alice.open(bye)
    alice.protect(make_response(bye, 200, "OK"))


def test_control_the_callers_key_goes_with_the_call(world):
    call_id = "r53-held-ok@x"
    alice, _ = _answered_call(world, call_id)
    assert alice.dialog_keys.for_call(call_id)
    _bob_ends_the_call(world, alice, call_id)
    assert not alice.dialog_keys.for_call(call_id)


def test_hole_a_held_second_dialog_keeps_the_callers_key_after_the_call(world):
    """Attacker: an untrusted hop or an off-path sender who read the call's ids.

    Messages: during alice's call with bob (C, a1/phone), a bodiless INVITE to alice under
    C, From bob;tag=yy (a tag of its own), To alice; alice's phone answers it (pjsua's
    auto-answer, her SDP sealed to bob's certificate), the attacker ACKs and then sends
    nothing: the second call stays up.  bob ends the real call (BYE, alice's 200).
    ``_end_dialog`` finds the held dialog's entry (a2) in ``_parties``, so it takes only
    the peer's slot (C, phone) and skips ``end_scope``.

    Effect: alice's own INVITE key K0, under (C, a1), outlives the call for up to
    ``cek_max_age`` (an hour; review 47 counted such a leftover as a hole), and the
    call's dialog policies (scope (C, bob)) up to their expiry; each such call also
    holds its slot in the 4096 of the table.

    Fault: ``UAEngine._end_dialog`` / ``_another_dialog_of_ours``: a second dialog whose
    existence the sender controls decides how much of the *live* call its end takes.

    Fix: end the ended dialog's own slots always in full (its INVITE's slot under our
    tag and its peer's), deciding by the INVITE a slot belongs to rather than by whether
    some other dialog shares the Call-ID."""
    call_id = "r53-held@x"
    alice, _ = _answered_call(world, call_id)
    live = {key.reference for key in alice.dialog_keys.for_call(call_id)}
    assert live
    _second_dialog(world, alice, call_id, caller="bob", to_uri=world.aor("alice"),
                   from_tag="yy", our_tag="a2", ending=None)
    _bob_ends_the_call(world, alice, call_id)
    # the held dialog's own slot (the key alice's 200 offered in it) may stay while it
    # lasts; none of the ended call's keys may
    assert not live & {key.reference for key in alice.dialog_keys.for_call(call_id)}


def test_hole_a_second_dialog_without_a_via_branch_passes_the_482_at_the_caller(world):
    """Found in the last read of the fix (stop 30): the refusal let through a request whose
    top Via branch equals the INVITE of ours that began the dialog, and a dialog alice
    began by *sending* the INVITE has no such branch kept (None): a bare INVITE From
    bob;tag=phone with a Via of no branch (RFC 2543 style, which stacks still take) had
    None == None and was taken as a new call, whose end would drop the live slots."""
    call_id = "r53-no-branch@x"
    alice, _, _ = _rekeyed_call(world, call_id)
    bare = make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                        to_uri=world.aor("alice"), call_id=call_id, cseq=1, from_tag="phone",
                        via_host=HOP).replace("Via", f"SIP/2.0/UDP {HOP}")
    with pytest.raises(MalformedError):
        bare.via_branch()                     # no branch at all
    with pytest.raises(MergedRequestError):
        alice.open(bare)
