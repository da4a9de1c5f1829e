"""A second attacker's review of the UA engine (the phone's core), in memory.

Each ``test_hole_*`` is an attack that SUCCEEDED on the code as it stood when the
review was made (each was seen failing); the test asserts that it fails now.
``test_held_*`` tests are attacks the code already refused, kept where nothing else
covered them.  The docstring names the attacker, what it got and the fix.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import (CRYPTO, SDP_ANSWER, SRTP_ANSWER, SRTP_OFFER, TRUSTED, answer,
                           invite, reinvite, three_phones, ua_engine)
from e2m_plugins.body import message_body, open_part, open_sealed_keys, top_parts
from e2m_plugins.cms.recipients import CertificateKey, KekLookup
from e2m_plugins.errors import BindingMismatchError, E2MError
from e2m_plugins.headers import PROXY_BODY_POLICY
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.sip_errors import answer_for
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine, next_attempt



@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="ec")




def _call(world, alice, bob, call_id):
    """alice calls bob with SRTP through a proxy that views SDP; returns (sent INVITE,
    bob's protected 200 as alice got it)."""
    sent = alice.protect(invite(world, SRTP_OFFER, call_id=call_id)).message
    got = bob.open(sent).message
    reply = bob.protect(answer(got, SRTP_ANSWER)).message
    assert alice.open(reply).message.body == SRTP_ANSWER
    return sent, reply


def _as_carol(message, world):
    """The same SIP ids, with carol's AoR where bob's was (To of alice's request)."""
    to = message.get("To").replace(world.aor("bob"), world.aor("carol"))
    return message.replace("To", to)


def _keys_read_by(engine, call_id, message) -> bytes | None:
    """What ``engine``'s holder could read of ``message`` with its own certificate and
    every CEK it keeps for ``call_id``: the SDP keys sealed inside, else None."""
    kept = {k.reference: k.cek[::-1] for k in engine.dialog_keys.for_call(call_id)}
    keys = [CertificateKey(engine.config.certificate, engine.config.private_key),
            KekLookup(kept.get)]
    for part in top_parts(message_body(message)):
        try:
            opened = open_part(part, keys, trust_anchors=engine.config.trust_anchors)
            found = open_sealed_keys(opened, keys, sender=(opened.signers or (None,))[0])
        except E2MError:
            continue
        if found is not None:
            return found[0].encode()
    return None


# -- dialog keys and the dialog's parties ------------------------------------------------

def test_hole_an_insider_plants_an_exclusive_key_in_another_users_dialog(world):
    """Insider UA (carol) who sees a dialog's ids (an on-path hop she runs or shares,
    or headers read off the wire: Call-ID, alice's tag, the INVITE's branch).

    Carol sends alice a 200 to alice's INVITE to bob, To carol (so the signature check,
    "the signer is the To of a response", passes with carol's own certificate), with an
    SDP answer whose keys carol seals to alice: a key "only the two UAs hold".  Before:
    the engine kept it in the slot (Call-ID, alice's tag), the slot of alice's dialog
    with bob, and alice's next SRTP offer to bob (a re-INVITE: hold, resume) sealed
    alice's SRTP keys under carol's key: carol read them.  Now the answer is refused
    (it names alice's dialog with bob, ``_check_parties``), and were that record gone
    (its table is bounded) the keys still belong to the dialog's two parties: a message
    whose From/To AoRs are not the dialog's neither adds to nor reads its keys."""
    alice, bob, carol = three_phones(world)
    sent, _ = _call(world, alice, bob, "plant@x")
    # carol's forged answer: alice's INVITE (same branch, CSeq, tags), To carol
    forged = carol.protect(answer(_as_carol(sent, world), SRTP_ANSWER, to_tag="c1")).message
    with pytest.raises(BindingMismatchError):
        alice.open(forged)
    alice._parties.clear()                            # as if pushed out of its bound
    alice.open(forged)                                # taken now, as carol's own answer
    reinvite = alice.protect(invite(world, SRTP_OFFER.replace(b"49170", b"49180"),
                                    call_id="plant@x", cseq=2, to_tag="b1")).message
    stolen = _keys_read_by(carol, "plant@x", reinvite)
    assert stolen is None or CRYPTO.strip() not in stolen
    assert CRYPTO.strip() in bob.open(reinvite).message.body       # bob still reads it




def test_hole_an_insider_reinvites_into_another_users_dialog(world):
    """Insider UA (carol) who read a dialog's ids (Call-ID, both tags) off the wire.

    She sends alice a re-INVITE with bob's tags, From carol, signed by carol and
    encrypted to alice: every check passed (the signer is the From), and pjsip matches
    an in-dialog request by Call-ID and tags alone, so the SDP would have moved the
    media of alice's call with bob to carol (the phone showing it "signed by carol,
    trusted").  A BYE from carol with the same ids ended the dialog's keys.  Now a
    message that names a dialog of ours with other parties than the dialog's is
    refused (403 "Body bound to another message") before anything else is done."""
    alice, bob, carol = three_phones(world)
    sent, _ = _call(world, alice, bob, "hijack@x")
    hijack = carol.protect(reinvite(world, "carol", "alice", "hijack@x", 77, "b1", "a1",
                                     SDP_ANSWER.replace(b"49172", b"40000"))).message
    with pytest.raises(BindingMismatchError) as caught:
        alice.open(hijack)
    assert answer_for(caught.value, "ua").code == 403
    bye = make_request("BYE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("carol"),
                       to_uri=world.aor("alice"), call_id="hijack@x", cseq=78,
                       from_tag="b1", to_tag="a1")
    with pytest.raises(BindingMismatchError):
        alice.open(bye)
    assert alice.dialog_keys.kept(sent)
    # bob's own re-INVITE in the same dialog still opens
    mine = bob.protect(reinvite(world, "bob", "alice", "hijack@x", 79, "b1", "a1")).message
    assert alice.open(mine).message.body == SDP_ANSWER


def test_hole_a_third_partys_answer_to_our_invite_is_taken(world):
    """Insider UA (carol) who saw alice's INVITE to bob (its branch, CSeq, tag): her own
    signed 200, To carol, was opened as the answer to alice's call (signer = To), so
    pjsip would have connected alice's call to bob with carol's media.  Now refused: the
    INVITE went to bob, its answers come from bob."""
    alice, bob, carol = three_phones(world)
    sent = alice.protect(invite(world, SRTP_OFFER, call_id="answer@x")).message
    forged = carol.protect(answer(_as_carol(sent, world), SRTP_ANSWER, to_tag="c1")).message
    with pytest.raises(BindingMismatchError):
        alice.open(forged)
    got = bob.open(sent).message
    assert alice.open(bob.protect(answer(got, SRTP_ANSWER)).message).message.body == SRTP_ANSWER


def test_hole_a_late_failure_to_an_answered_invite_drops_the_live_dialogs_keys(world):
    """Untrusted on-path hop (saw alice's INVITE: its branch and CSeq).  After bob's
    200 it sends alice a 486 to the same INVITE.  pjsip drops it (the INVITE's client
    transaction ended at the 2xx), but the engine read it first as "the INVITE that made
    the dialog failed" and dropped the live call's keys and policies: bob's next
    re-INVITE under the dialog key could not be opened (493, the call stuck).  Now a
    failure to an INVITE already answered 2xx ends nothing."""
    alice, bob, _ = three_phones(world)
    sent, _ = _call(world, alice, bob, "late@x")
    alice.open(make_response(sent, 486, "Busy Here"))
    assert alice.dialog_keys.kept(sent)
    mine = bob.protect(reinvite(world, "bob", "alice", "late@x", 9, "b1", "a1")).message
    assert alice.open(mine).message.body == SDP_ANSWER


def test_held_a_408_or_481_to_an_answered_reinvite_still_ends_the_dialog(world):
    """The late-answer rule above must not keep a dialog the peer says is gone."""
    alice, bob, _ = three_phones(world)
    sent, _ = _call(world, alice, bob, "gone@x")
    again = alice.protect(invite(world, SRTP_OFFER, call_id="gone@x", cseq=2,
                                 to_tag="b1")).message
    alice.open(make_response(again, 481, "Call/Transaction Does Not Exist"))
    assert alice.dialog_keys.kept(sent) == []


def test_hole_dialog_keys_of_a_dialog_belong_to_its_two_parties():
    """``DialogKeys`` alone (the engine's table of dialogs can lose a dialog to its
    bound, and the proxy-side view of a dialog is the same ids): a third party's
    message with the dialog's Call-ID and tags neither adds a key to the dialog, nor
    confirms, drops or ends its keys.  Before, any message naming the ids did all four."""
    from e2m_plugins.dialog_keys import DialogKeys
    alice, bob, carol = ("sip:alice@example.com", "sip:bob@example.com",
                         "sip:carol@example.com")
    keys = DialogKeys(max_age=3600, max_uses=100, clock=lambda: 1000.0)

    def msg(frm, to, *, cseq=1, to_tag=None, from_tag="a1"):
        return make_request("INVITE", to, from_uri=frm, to_uri=to, call_id="c@x", cseq=cseq,
                            from_tag=from_tag, to_tag=to_tag)

    offer = msg(alice, bob)
    keys.offer(offer, b"\x01" * 16, b"\x11" * 16, frozenset())
    ok = make_response(offer, 200, "OK").replace("To", f"<{bob}>;tag=b1")
    keys.settle(ok)
    assert [k.reference for k in keys.usable(ok)] == [b"\x01" * 16]
    # carol's 200 to the same INVITE (To carol) and her re-INVITE with the same tags
    hers = make_response(msg(alice, carol), 200, "OK").replace("To", f"<{carol}>;tag=b1")
    keys.keep_received(hers, b"\x02" * 16, b"\x22" * 16, readers=frozenset())
    for n in range(3, 12):                               # 8 a slot: she cannot push bob's out
        keys.keep_received(msg(carol, alice, cseq=n, from_tag="b1", to_tag="a1"),
                           bytes([n]) * 16, bytes([n]) * 16, readers=frozenset())
    assert [k.reference for k in keys.usable(ok)] == [b"\x01" * 16]
    assert keys.reusable(ok, exclusive=True).reference == b"\x01" * 16
    assert all(k.parties == {alice, carol} for k in keys.usable(hers))   # hers only
    # bob's own key offered in his request is kept beside the dialog's first one
    mine = msg(bob, alice, cseq=30, from_tag="b1", to_tag="a1")
    assert keys.keep_received(mine, b"\x30" * 16, b"\x33" * 16, readers=frozenset())
    assert len(keys.usable(ok)) == 2
    assert {k.reference for k in keys.usable(mine)} == {k.reference for k in keys.usable(ok)}
    keys.end_dialog(msg(carol, alice, cseq=20, from_tag="b1", to_tag="a1"))
    assert keys.usable(ok)
    keys.end_dialog(msg(bob, alice, cseq=21, from_tag="b1", to_tag="a1"))
    assert keys.usable(ok) == []


def test_hole_an_insider_reinvites_with_the_tags_alone(world):
    """The same re-INVITE under a Call-ID of carol's own: pjsip finds the dialog of a
    request by its To tag (the dialog set) and From tag alone, never the Call-ID
    (``sip_ua_layer.c``, ``mod_ua_on_rx_request``).  Refused too."""
    alice, bob, carol = three_phones(world)
    _call(world, alice, bob, "tags@x")
    hijack = carol.protect(reinvite(world, "carol", "alice", "carols-own@x", 5, "b1", "a1",
                                     SDP_ANSWER.replace(b"49172", b"40000"))).message
    with pytest.raises(BindingMismatchError):
        alice.open(hijack)
    spoof = bob.protect(reinvite(world, "bob", "alice", "carols-own@x", 6, "b1", "a1")).message
    with pytest.raises(BindingMismatchError):                  # bob's ids, another Call-ID
        alice.open(spoof)


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_defect_a_call_that_rings_past_64_s_is_still_ours(world):
    """Not an attack: the bound on remembered requests (``_sent``: 64 s) is a
    non-INVITE transaction's lifetime, but an INVITE waits for its final answer as long
    as the callee rings.  Before, any request sent after 64 s of ringing (a REGISTER
    refresh) pushed the INVITE out, and the 200 that came then taught none of its
    dialog's policies (nor would a late failure have ended the attempt).  Now each
    provisional answer keeps the INVITE another 64 s; and a lookup never returns an
    entry older than that (before, only sending another request aged entries out, so
    an idle phone took an answer to a REGISTER of hours ago)."""
    clock = _Clock()
    alice = UAEngine(ua_engine(world, "alice", peers=("bob",)).config, clock=clock)
    bob = ua_engine(world, "bob")
    sent = alice.protect(invite(world, call_id="ringing@x")).message
    to = f"{sent.get('To')};tag=b1"
    for _ in range(4):                                # 180s every 30 s: 120 s of ringing
        clock.now += 30
        alice.open(make_response(sent, 180, "Ringing").replace("To", to))
    alice.protect(make_request("REGISTER", f"sip:{world.domain}", from_uri=world.aor("alice"),
                               to_uri=world.aor("alice")))
    policy = (PROXY_BODY_POLICY, f"{TRUSTED};view=INVITE:application/sdp")
    ok = bob.protect(answer(bob.open(sent).message)).message.add(*policy)
    assert alice.open(ok).message.body == SDP_ANSWER   # bob's time: 120 s behind, in the window
    assert [p.host for p in alice.policies.everywhere() if p.scope] == [TRUSTED]

    # an idle engine: a 200 to a REGISTER sent 10 minutes ago teaches nothing
    register = alice.protect(make_request("REGISTER", f"sip:{world.domain}",
                                          from_uri=world.aor("alice"),
                                          to_uri=world.aor("alice"))).message
    clock.now += 600
    assert alice.learn(make_response(register, 200, "OK", [policy])) == []


def test_hole_a_refused_replay_still_leaves_its_keys_behind(world):
    """Untrusted on-path hop: after the call ended (BYE: every key gone), it sends bob
    alice's captured INVITE again with a new branch.  Bob refuses it (403, replayed),
    but the engine had kept its CEKs before the replay check: a dead dialog's keys,
    usable again under its ids, and a refused message that taught the engine something
    ("only a message we accepted may teach us anything").  Now keys are kept only
    once the message passed every check."""
    alice, bob, _ = three_phones(world)
    sent, _ = _call(world, alice, bob, "dead@x")
    bye = make_request("BYE", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                       to_uri=world.aor("bob"), call_id="dead@x", cseq=2, from_tag="a1",
                       to_tag="b1")
    bob.open(alice.protect(bye).message)
    bob.protect(make_response(bye, 200, "OK"))
    assert bob.dialog_keys.for_call("dead@x") == []
    with pytest.raises(E2MError):
        bob.open(next_attempt(sent).replace("CSeq", sent.get("CSeq")))
    assert bob.dialog_keys.for_call("dead@x") == []


def test_held_the_table_of_dialog_parties_is_bounded_and_fed_only_by_what_we_send(world):
    """The parties table (``_check_parties``) holds our tag of each INVITE dialog we
    send in, at most MAX_DIALOGS, least recently used out; what others send us, and our
    answers to anything but an INVITE (pjsua's 200 to a stranger's OPTIONS, a 403), add
    nothing."""
    from e2m_plugins.dialog_keys import MAX_DIALOGS
    alice = ua_engine(world, "alice", peers=("bob",), cek_reuse=False)
    for n in range(MAX_DIALOGS + 50):
        alice._record_parties(invite(world, call_id=f"c{n}@x", from_tag=f"t{n}"))
    assert len(alice._parties) == MAX_DIALOGS
    stranger = make_request("OPTIONS", "sip:alice@example.com", from_uri="sip:x@example.net",
                            to_uri=world.aor("alice"), call_id="s@x")
    alice.protect(make_response(stranger, 200, "OK"))
    alice.protect(make_response(invite(world, call_id="s2@x"), 403, "Forbidden"))
    alice.open(stranger)
    assert "s@x" not in {c for c, _ in alice._parties.values()}
    assert "s2@x" not in {c for c, _ in alice._parties.values()}


def _rung_and_cancelled(world, alice, n):
    """A stranger's INVITE to alice: her phone rings (180, our tag), then the stranger
    CANCELs and the phone answers the INVITE 487."""
    call = make_request("INVITE", world.aor("alice"), from_uri="sip:flood@example.net",
                        to_uri=world.aor("alice"), call_id=f"ring-{n}@x", from_tag=f"f{n}")
    ringing = make_response(call, 180, "Ringing")
    alice.protect(ringing)
    alice.protect(make_response(call, 487, "Request Terminated").replace("To", ringing.get("To")))


def test_hole_a_flood_of_rung_calls_pushed_a_live_call_out_of_the_parties_table(world):
    """Off-path sender + insider UA. The parties table kept every INVITE dialog we ever
    rang or answered until MAX_DIALOGS newer ones pushed it out: a stranger's INVITE
    and CANCEL, repeated, left one entry each. Once alice's call with bob was gone from
    it, carol's re-INVITE naming that call (signed as herself) was taken (fail open).
    Now an entry goes when its dialog ends (BYE, a failure that ends the attempt, the
    application's ``forget_call``), so the table holds only dialogs still under way."""
    from e2m_plugins.dialog_keys import MAX_DIALOGS
    alice, bob, carol = three_phones(world)
    _call(world, alice, bob, "long@x")
    for n in range(MAX_DIALOGS + 10):
        _rung_and_cancelled(world, alice, n)
    hijack = carol.protect(reinvite(world, "carol", "alice", "long@x", 77, "b1", "a1",
                                     SDP_ANSWER.replace(b"49172", b"40000"))).message
    with pytest.raises(BindingMismatchError):
        alice.open(hijack)


def test_held_a_failed_reinvite_keeps_the_dialogs_parties_and_a_bye_drops_them(world):
    """Only the end of a dialog drops its entry: alice answering a re-INVITE of her
    confirmed call 491 keeps it (carol still refused); the BYE ends it."""
    alice, bob, carol = three_phones(world)
    _call(world, alice, bob, "kept@x")
    bobs = reinvite(world, "bob", "alice", "kept@x", 5, "b1", "a1")
    alice.protect(make_response(bobs, 491, "Request Pending"))
    hijack = carol.protect(reinvite(world, "carol", "alice", "kept@x", 78, "b1", "a1")).message
    with pytest.raises(BindingMismatchError):
        alice.open(hijack)
    before = len(alice._parties)
    alice.protect(make_request("BYE", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                               to_uri=world.aor("bob"), call_id="kept@x", cseq=2,
                               from_tag="a1", to_tag="b1"))
    assert len(alice._parties) == before - 1
    assert "kept@x" not in {c for c, _ in alice._parties.values()}


def test_held_a_failure_to_another_invite_naming_a_ringing_call_drops_nothing(world):
    """While alice's phone rings (its 180 began the entry), a hop sends another INVITE
    with the same Call-ID and alice's tag; pjsip answers it with a failure. Only a
    failure in the INVITE's own transaction (its top Via branch) ends the entry, so
    carol still cannot step into the ringing call."""
    alice, bob, carol = three_phones(world)
    offer = bob.protect(make_request(
        "INVITE", world.aor("alice"), from_uri=world.aor("bob"), to_uri=world.aor("alice"),
        call_id="ring@x", from_tag="b9", body=SDP_ANSWER, content_type="application/sdp",
        extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>")])).message
    ringing = make_response(offer, 180, "Ringing")
    alice.protect(ringing)
    forged = offer.replace("To", ringing.get("To")).replace(
        "Via", "SIP/2.0/UDP 192.0.2.66:5060;branch=z9hG4bK-forged")
    alice.protect(make_response(forged, 491, "Request Pending"))
    alias = ringing.to_tag
    hijack = carol.protect(reinvite(world, "carol", "alice", "ring@x", 9, "b9", alias)).message
    with pytest.raises(BindingMismatchError):
        alice.open(hijack)
    alice.protect(make_response(offer, 487, "Request Terminated").replace("To", ringing.get("To")))
    assert "ring@x" not in {c for c, _ in alice._parties.values()}
