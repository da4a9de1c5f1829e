"""A fifty-fifth attacker's review (December 2026) of 0a5b9ba: this morning's three
fixes (``git diff 50e6c26 -- e2m_plugins pjsua_hooks``): the phone's per-call event
routing (c24be17), the UA engine's refusal (482) of a new dialog naming a live dialog's
tag and ``end_dialog(keep=...)`` (b2ad514), and the single From/To/Call-ID/CSeq rule in
``parse`` and ``check_unambiguous`` (0a5b9ba).

``test_hole_*`` xfail strictly on 0a5b9ba (their assertion is the secure behaviour);
``test_control_*`` are the same flows without the attack, or show that the attack's
messages are accepted as far as they should be (they pass).

Hole 1 (``test_hole_a_second_dialog_ended_while_ringing_drops_the_early_key``): at the
*caller*, ``UAEngine._remote_tags`` knows the peer's tag of a dialog we began only from
``_confirmed`` (the first 2xx), so while alice's call rings ``_tags_of_other_dialogs``
is {a1} alone.  A bare INVITE to alice under the ringing call's Call-ID From bob (any
tag of its own, ``yy``; or bob's early tag ``phone``, read off the 180/183, which the
482 does not refuse yet), CANCELled or answered and BYEd, ends with
``end_dialog(keep={a1})``, which drops every other slot of {alice, bob} under the
Call-ID: (C, phone), the key bob's keyed 183 offered.  For the ``yy`` case this is a
regression of b2ad514: on 50e6c26 ``_another_dialog_of_ours`` limited that end to the
slot of its own peer's tag (checked: the same flow on 50e6c26's ``e2m_plugins`` keeps
(C, phone)).  Off-path sender who read the Call-ID and the AoRs; no certificate.

Hole 2 (``test_hole_a_second_dialog_with_the_callees_early_tag_keeps_the_calls_key``):
the same early window the other way round: the attacker's INVITE From bob;tag=phone,
taken while the call rings and then held open (answered, ACKed), makes ``_callers[a2] =
"phone"``; at the real call's end ``keep`` = {a2, phone}, so the call's key under (C,
phone) (K1 after a rekey) outlives the call for up to ``cek_max_age``: review 53 hole 3
is back through the early window (the 482 of the fix would refuse the same INVITE after
the 200: ``test_control_after_the_200_the_callees_tag_is_refused``).

What held (tried, no test kept unless named):

- header tricks against the single-header rule: ``From :`` / ``From\\t:`` (both head
  parsers strip the name), ``FROM``/``Call-Id``/``i``/``f``/``t`` (``canonical_name``
  lower-cases and maps compact forms), a folded second ``From`` (the slow parser unfolds
  into the previous header, a continuation line never starts a header), a header in a
  multipart body part (never in the SIP index); ``frame_length`` skips the check but
  every framed message then goes through ``parse`` (phone ``rawhook``/``phone.py`` and
  ``kemi.py`` all call ``sip.parse``) (``test_control_*_single_header*``);
- the 482 against legitimate requests: a CANCEL and a retransmission of the ringing
  INVITE carry its top Via branch (``_answered``), an in-dialog request has a To tag, an
  ACK for a non-2xx has a To tag; a caller's retry after our failure (new branch, same
  From tag) passes since the failure drops the entry (``_ends_our_answered_attempt``)
  (``test_control_a_cancel_of_the_ringing_invite_is_not_refused``,
  ``test_control_a_retry_after_our_failure_is_not_refused``);
- the loops over ``_parties`` are bounded by ``MAX_DIALOGS`` (4096) and entries come only
  from what we send; not a new unbounded cost.

Fixed (stop 30): the To tag of each accepted 1xx/2xx to an INVITE we sent that holds
keys is recorded as a peer's tag of that early dialog (``UAEngine._note_early_peer``, at
most ``MAX_SLOTS_PER_CALL`` per INVITE; review 56 made it "holds keys"), so a ringing
call's keyed slots are kept at another dialog's end and a new dialog naming that tag is
refused 482.  A tag a caller wrote (an INVITE we answered) keeps slots at another
dialog's end only when it is none of the ending dialog's own (hole 2: review 56's
fix).  The holes' markers are gone; they are guards now.
"""

from __future__ import annotations


import pytest

from e2m_lab.flows import SDP_OFFER, answer, invite, reinvite, ua_engine
from e2m_plugins import sip
from e2m_plugins.errors import MalformedError, MergedRequestError
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.ua import UAEngine
from tests.unit.test_review43 import NEW_SDP
from tests.unit.test_review49 import CONTACT_B, _ack, _with_to_tag
from tests.unit.test_review53 import (Clock, _bob_ends_the_call, _bobs_reinvite_opens_at_alice,
                                      _second_dialog)
from e2m_plugins.testpki import init_test_pki


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


def _engine(world, name: str, clock: Clock) -> UAEngine:
    engine = ua_engine(world, name, peers=("alice", "bob", "carol"))
    return UAEngine(engine.config, clock=clock)


def _ringing_call(world, call_id: str, clock: Clock):
    """alice (tag a1) calls bob's phone; it rings (180, tag ``phone``) and alice gets the
    180.  Returns (alice, phone, the INVITE as the phone delivered it)."""
    alice, phone = _engine(world, "alice", clock), _engine(world, "bob", clock)
    offer = alice.protect(invite(world, call_id=call_id)).message
    delivered = phone.open(offer).message
    ringing = phone.protect(_with_to_tag(make_response(delivered, 180, "Ringing", [CONTACT_B]),
                                         delivered, "phone"))
    alice.open(ringing.message)
    return alice, phone, delivered


def _answer_and_rekey(world, alice: UAEngine, phone: UAEngine, delivered, call_id: str,
                      clock: Clock) -> None:
    """The phone answers 200 (tag ``phone``), alice ACKs; an hour later alice's session
    refresh offers a fresh key K1, kept at alice under (C, phone), the peer's tag."""
    ok = phone.protect(answer(delivered, to_tag="phone"))
    alice.open(ok.message)
    _ack(world, alice, phone, call_id)
    clock.now += alice.config.cek_max_age + 1
    refresh = alice.protect(reinvite(world, "alice", "bob", call_id, 2, "a1", "phone",
                                     sdp=NEW_SDP))
    assert not refresh.info.key_reuse
    got = phone.open(refresh.message).message
    ok2 = phone.protect(make_response(got, 200, "OK", [CONTACT_B], SDP_OFFER,
                                      "application/sdp"))
    assert ok2.info.key_reuse
    alice.open(ok2.message)


def _bare_invite_from_bobs_tag(world, call_id: str, tag: str = "phone"):
    return make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                        to_uri=world.aor("alice"), call_id=call_id, cseq=1, from_tag=tag,
                        via_host="192.0.2.66:5060")


# --------------------------------------------------------------------------------------
# Hole 1: the callee's tag is not a "live dialog's" tag at the caller until the 2xx


def test_control_after_the_200_the_callees_tag_is_refused(world):
    """The fix holds once the call is answered: the same bare INVITE is 482."""
    call_id = "r55-after-200@x"
    clock = Clock()
    alice, phone, delivered = _ringing_call(world, call_id, clock)
    alice.open(phone.protect(answer(delivered, to_tag="phone")).message)
    with pytest.raises(MergedRequestError):
        alice.open(_bare_invite_from_bobs_tag(world, call_id))


def test_control_without_the_attack_the_calls_keys_go_with_it(world):
    """Ringing, answered, rekeyed (K1 under (C, phone)), bob's re-INVITE opens; bob's
    BYE ends the call and no key of it stays at alice."""
    call_id = "r55-early-ok@x"
    clock = Clock()
    alice, phone, delivered = _ringing_call(world, call_id, clock)
    _answer_and_rekey(world, alice, phone, delivered, call_id, clock)
    assert _bobs_reinvite_opens_at_alice(world, alice, phone, call_id)
    assert alice.dialog_keys.for_call(call_id)
    _bob_ends_the_call(world, alice, call_id)
    assert not alice.dialog_keys.for_call(call_id)


def test_control_the_early_injection_is_taken_as_a_new_call(world):
    """The attack's premise, still true: while alice's call rings with a bodiless 180,
    the bare INVITE From bob;tag=phone opens at alice (no 482: the tag holds no keys,
    and a hop's bare 180s must not fill what the 482 guards, review 56), so pjsua takes
    it as a second call.  What it may not do is keep the call's keys (the hole below)."""
    call_id = "r55-early-taken@x"
    clock = Clock()
    alice, _, _ = _ringing_call(world, call_id, clock)
    opened = alice.open(_bare_invite_from_bobs_tag(world, call_id))
    assert opened.message.method == "INVITE"


def test_hole_a_second_dialog_with_the_callees_early_tag_keeps_the_calls_key(world):
    """Attacker: an untrusted on-path hop, or an off-path sender who read the call's
    Call-ID and the 180's To tag (plaintext headers); no certificate.

    Messages: alice calls bob (C, a1); bob's phone rings: 180 To ...;tag=phone.  While it
    rings the attacker sends alice a bodiless INVITE: Call-ID C, From bob;tag=phone, To
    alice, a Via of its own.  ``_refuse_a_live_dialogs_tag`` finds no dialog of alice's
    whose peer's tag is ``phone`` (``_remote_tags`` reads ``_confirmed``, empty until the
    2xx), so it opens; pjsua answers it as a second call (tag a2), the attacker ACKs and
    holds it.  bob answers alice's call (200, tag phone), an hour later the call rekeys
    (K1, kept at alice under (C, phone)), then bob hangs up (BYE, alice's 200).

    Effect: ``_tags_of_other_dialogs`` at the call's end is {a2, ``_callers[a2]`` =
    phone}: ``end_dialog(keep=...)`` keeps (C, phone), so K1 outlives the call for up to
    ``cek_max_age`` (an hour), and a slot of the 4096 with it; review 53 hole 3 again.

    Fault: ``UAEngine._remote_tags`` (e2m_plugins/ua.py) knows the peer's tag of a dialog
    we began only from ``_confirmed``; and ``_tags_of_other_dialogs`` trusts the remote
    tag the *attacker* wrote (``_callers``) to protect slots of another dialog.

    Fix: remember the peer's tag of every early dialog of an INVITE we sent (each 1xx's
    To tag, in ``_sent``/a per-tag set) and refuse a new dialog naming one of them; and
    build ``keep`` from our own tags only, deciding a slot's owner by the INVITE it came
    in (our tag), never by a peer's tag a second dialog may share."""
    call_id = "r55-early-held@x"
    clock = Clock()
    alice, phone, delivered = _ringing_call(world, call_id, clock)
    _second_dialog(world, alice, call_id, caller="bob", to_uri=world.aor("alice"),
                   from_tag="phone", our_tag="a2", ending=None)
    # the held dialog's own key (alice's 200 in it) may stay while it lasts
    held = {key.reference for key in alice.dialog_keys.for_call(call_id)}
    _answer_and_rekey(world, alice, phone, delivered, call_id, clock)
    assert _bobs_reinvite_opens_at_alice(world, alice, phone, call_id)
    live = {key.reference for key in alice.dialog_keys.for_call(call_id)} - held
    assert live
    _bob_ends_the_call(world, alice, call_id)
    assert not live & {key.reference for key in alice.dialog_keys.for_call(call_id)}


def _keyed_ring(world, call_id: str):
    """alice (a1) calls bob; bob's phone rings with a signed 183 (tag ``phone``) that
    offers a fresh CEK for reuse, kept at alice under (C, phone).  Returns alice and the
    183's key references."""
    from tests.unit.test_review43 import _forks_183
    alice = _engine(world, "alice", Clock())
    offer = alice.protect(invite(world, call_id=call_id)).message
    before = {key.reference for key in alice.dialog_keys.for_call(call_id)}
    alice.open(_forks_183(world, offer, "phone"))
    early = {key.reference for key in alice.dialog_keys.for_call(call_id)} - before
    assert early
    return alice, early


def test_control_without_the_attack_the_early_key_stays(world):
    """The 183's key is kept at alice under (C, phone) while the call rings; a second
    dialog under *another* Call-ID, cancelled, leaves it."""
    call_id = "r55-early-ok@x"
    alice, early = _keyed_ring(world, call_id)
    _second_dialog(world, alice, "r55-elsewhere@x", caller="bob", to_uri=world.aor("alice"),
                   from_tag="yy", our_tag="a2", ending="cancelled while ringing")
    assert early <= {key.reference for key in alice.dialog_keys.for_call(call_id)}


@pytest.mark.parametrize("from_tag", ["yy", "phone"])
@pytest.mark.parametrize("ending", ["cancelled while ringing", "answered, then the sender's BYE"])
def test_hole_a_second_dialog_ended_while_ringing_drops_the_early_key(world, ending, from_tag):
    """Attacker: an off-path sender who read the Call-ID and the two AoRs (any tag of its
    own: ``yy``), or an on-path hop (also with bob's tag ``phone``); no certificate.

    Messages: alice's call rings with bob's signed 183 (tag phone) offering a fresh CEK
    (early media, or a gateway that does not reuse her key), kept at alice under (C,
    phone).  The attacker's bare INVITE From bob;tag=yy (or ;tag=phone, not refused
    either: nothing confirmed yet) To alice under C is taken as a second call (a2) and
    CANCELled (alice's 487) or answered and BYEd (alice's 200).
    ``_tags_of_other_dialogs`` is {a1}: a1's peer's tag is unknown before the 2xx
    (``_remote_tags`` reads ``_confirmed``/``_callers`` only), so
    ``end_dialog(keep={a1})`` drops every slot of {alice, bob} under C but a1's: (C,
    phone), the 183's key.  Before b2ad514 ``_another_dialog_of_ours`` limited that end
    to the slot of its own peer's tag (yy): a regression of the fix for the new-tag case.

    Effect: bob's 200 (or PRACK/UPDATE body) under the key his 183 offered finds no key at
    alice; the early media key is gone; repeatable on every ring.

    Fault: ``UAEngine._end_dialog``/``_tags_of_other_dialogs`` (e2m_plugins/ua.py): the
    early dialogs of an INVITE we sent are invisible to ``keep``.  Fix: record the To tag
    of every 1xx/2xx to an INVITE we sent (``_sent`` entry) as a live dialog's peer's
    tag: put it in ``keep`` and refuse a new dialog naming it (482); better, end a
    second dialog's slots by the INVITE (our tag) they came in, never by a tag set."""
    call_id = f"r55-early-end-{from_tag}-{ending[:5]}@x"
    alice, early = _keyed_ring(world, call_id)
    _second_dialog(world, alice, call_id, caller="bob", to_uri=world.aor("alice"),
                   from_tag=from_tag, our_tag="a2", ending=ending)
    assert early <= {key.reference for key in alice.dialog_keys.for_call(call_id)}


# --------------------------------------------------------------------------------------
# What held: the single-header rule against header-name tricks, the 482 against CANCEL


_HEAD = ("INVITE sip:bob@127.0.0.1 SIP/2.0\r\n"
         "Via: SIP/2.0/UDP 192.0.2.66:5060;branch=z9hG4bK-r55\r\n"
         "From: <sip:alice@example.com>;tag=a1\r\n"
         "To: <sip:bob@example.com>\r\n"
         "Call-ID: r55-hdr@x\r\n"
         "CSeq: 1 INVITE\r\n"
         "Max-Forwards: 70\r\n")


@pytest.mark.parametrize("second", [
    "From : <sip:carol@example.com>;tag=c1",
    "FROM\t: <sip:carol@example.com>;tag=c1",
    "f: <sip:carol@example.com>;tag=c1",
    "Call-Id: other@x",
    "i:other@x",
    "t: <sip:carol@example.com>",
    "cseq: 2 INVITE",
    "X-Pad: 1\r\nFrom:\r\n <sip:carol@example.com>;tag=c1",
])
@pytest.mark.parametrize("ending", ["\r\n", "\n"])
def test_control_a_second_single_header_is_malformed_whatever_its_spelling(second, ending):
    """Both head parsers (the fast CRLF one and the line-by-line one, LF ends), compact
    forms, case, whitespace before the colon, a folded value: refused."""
    data = (_HEAD + second + "\r\nContent-Length: 0\r\n\r\n").replace("\r\n", ending)
    with pytest.raises(MalformedError):
        sip.parse(data.encode())


def test_control_a_folded_line_never_starts_a_second_from():
    """A continuation line that looks like a header is part of the previous value."""
    data = (_HEAD + "Subject: hi\r\n From: <sip:carol@example.com>;tag=c1\r\n"
            "Content-Length: 0\r\n\r\n")
    msg = sip.parse(data.encode())
    assert msg.from_tag == "a1" and len(msg.get_all("From")) == 1


def test_control_a_cancel_of_the_ringing_invite_is_not_refused(world):
    """The 482 spares the CANCEL of the INVITE the phone rings for (its top Via branch)."""
    call_id = "r55-cancel@x"
    clock = Clock()
    alice, phone, delivered = _ringing_call(world, call_id, clock)
    cancel = make_request("CANCEL", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                          to_uri=world.aor("bob"), call_id=call_id, cseq=1, from_tag="a1",
                          via_host="127.0.0.1:5061").replace("Via", delivered.get("Via") or "")
    assert phone.open(cancel).message.method == "CANCEL"


def test_control_a_retry_after_our_failure_is_not_refused(world):
    """The caller's retry (same From tag, new branch, CSeq 2) after the phone's 486 to
    the INVITE it rang for opens: the failure ended the entry."""
    call_id = "r55-retry@x"
    clock = Clock()
    alice, phone, delivered = _ringing_call(world, call_id, clock)
    phone.protect(_with_to_tag(make_response(delivered, 486, "Busy Here"), delivered, "phone"))
    retry = alice.protect(invite(world, call_id=call_id).replace(
        "CSeq", "2 INVITE").replace("Via", "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-r55retry"))
    assert phone.open(retry.message).message.method == "INVITE"
