"""A forty-third attacker's review (December 2026) of e492040: the phone's engine
(``e2m_plugins/ua.py``, ``e2m_plugins/dialog_keys.py``) answered by forks and hops.

``test_hole_*`` xfailed strictly on e492040 (their assertion is what a fix makes true);
``test_control_*`` are the same flows without the attack (they pass).  A control that
showed the fork hole's cost (one 493, then the retry opened) went with the fix.

Fixed (``e2m_plugins/dialog_keys.py``): a key is kept under the peer's tag first (the
caller's own tag is shared by every fork of its INVITE), so another fork's key is not
found in the dialog that answered; and keys we offered open before the peer confirmed
them (confirmation guards what we send), so the callee's early bodies under the
INVITE's key open.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, answer, invite, reinvite, ua_engine
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki

NEW_SDP = SDP_OFFER.replace(b"49170", b"49174")


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


def _forks_183(world, offer: SipMessage, to_tag: str) -> SipMessage:
    """A 183 with early media from another of bob's devices (its own To tag), signed by
    bob and bound to the message, under a fresh CEK it offers for reuse (a device or
    gateway that does not reuse the caller's offer key)."""
    progress = make_response(offer, 183, "Session Progress", [], SDP_ANSWER, "application/sdp")
    progress = progress.replace("To", f"{offer.get('To')};tag={to_tag}")
    cred = world.user("bob")
    entity, _ = protect_content("application/sdp", SDP_ANSWER,
                                [recipient_for_certificate(world.user("alice").cert)],
                                signer=(cred.cert, cred.key), cek_reference=new_reference(),
                                bind_to=progress)
    return with_entity(progress, entity)


def _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id: str) -> bool:
    out = alice.protect(reinvite(world, "alice", "bob", call_id, 2, "a1", "phone", sdp=NEW_SDP))
    try:
        phone.open(out.message)
    except E2MError:
        return False
    return True


def test_control_without_the_other_forks_183_alices_reinvite_opens_at_the_phone(world):
    call_id = "r43-fork-ok@x"
    alice = ua_engine(world, "alice")
    phone = ua_engine(world, "bob")
    offer = alice.protect(invite(world, call_id=call_id)).message
    delivered = phone.open(offer).message
    alice.open(phone.protect(answer(delivered, to_tag="phone")).message)
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


@pytest.mark.parametrize("when", ["before the 200", "after the 200"])
def test_hole_another_forks_183_keys_alices_reinvite_to_the_answering_phone(world, when):
    """Attacker: none needed (parallel forking with early media on one branch: bob's
    second device, or a UA holding bob's certificate that rings with early media); an
    untrusted on-path hop or the forking proxy that holds one fork's 183 back until
    another fork has answered makes it happen when it wants.

    Attack: alice's INVITE is forked to two of bob's devices.  Device 2 rings with a
    signed 183 with early media (To tag ``desk``, under a fresh CEK it offers for reuse,
    as any UA that does not reuse the offer key); device 1 answers 200 (To tag ``phone``,
    under alice's offer key, ``reusable``'s choice).  The 183 reaches alice before the
    200 or (held back) after it, when pjsip drops it (no transaction any more) but the
    hook has opened it first.  ``DialogKeys.keep_received`` files the 183's key under
    the first free or same-party slot: (Call-ID, alice's tag), which every dialog grown
    from her INVITE shares, the answered one (alice's tag, ``phone``) too.

    Effect: that key is the newest of the answered dialog, so ``reusable`` picks it for
    alice's next re-INVITE (hold, resume, a session-timer refresh with SDP) to device 1,
    which never had it: device 1 cannot open the body and answers 493.  The call's
    re-INVITE fails once before the retry under a fresh key (the 493 retires every key
    of the dialog and costs one of the call's ``MAX_RETRIES_PER_CALL``).  With SRTP,
    alice's new SRTP keys go to the device that did not answer.

    Fix: a response's key belongs to the dialog of its To tag: keep it under the
    (Call-ID, To tag) slot only and, once a 2xx confirmed a dialog of our INVITE, reuse
    only keys offered by the caller or received in that dialog (To tag as confirmed in
    ``UAEngine._confirmed``); keep nothing from a response that answers no live
    transaction of ours."""
    call_id = f"r43-fork-{when.split()[0]}@x"
    alice = ua_engine(world, "alice")
    phone = ua_engine(world, "bob")
    offer = alice.protect(invite(world, call_id=call_id)).message
    if when == "before the 200":
        alice.open(_forks_183(world, offer, "desk"))
    delivered = phone.open(offer).message
    alice.open(phone.protect(answer(delivered, to_tag="phone")).message)
    if when == "after the 200":
        alice.open(_forks_183(world, offer, "desk"))
    assert _reinvite_opens_at_the_answering_phone(world, alice, phone, call_id)


# --------------------------------------------------------------------------------------
# The callee's early-dialog bodies under the caller's offer key


def _early(world, call_id: str):
    """alice (the caller's phone) calls bob (the callee's engine, as any E2M UA): alice's
    INVITE offers a key; bob opens it (a key received is usable at once)."""
    alice = ua_engine(world, "alice")
    bob = ua_engine(world, "bob")
    offer = alice.protect(invite(world, call_id=call_id)).message
    delivered = bob.open(offer).message
    return alice, bob, offer, delivered


def _bobs_183(delivered: SipMessage) -> SipMessage:
    """bob's reliable 183 with early media (RFC 3262), plaintext before protection."""
    progress = make_response(delivered, 183, "Session Progress",
                             [("Contact", "<sip:bob@127.0.0.1:5062>"), ("Require", "100rel"),
                              ("RSeq", "1")], SDP_ANSWER, "application/sdp")
    return progress.replace("To", f"{delivered.get('To')};tag=b1")


def _bobs_early_update(world, call_id: str) -> SipMessage:
    """bob's UPDATE in the early dialog (RFC 3311: preconditions, a new early-media
    offer), plaintext before protection."""
    return make_request("UPDATE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                        to_uri=world.aor("alice"), call_id=call_id, cseq=1,
                        from_tag="b1", to_tag="a1", body=NEW_SDP,
                        content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>")])


def test_control_bobs_200_under_alices_offer_key_opens(world):
    """The 200 is sealed the same way (under alice's offer key) and opens: the 2xx to
    her INVITE confirms the key before she opens it (``_settle`` runs first)."""
    alice, bob, _, delivered = _early(world, "r43-early-200@x")
    ok = bob.protect(answer(delivered, to_tag="b1"))
    assert ok.info.key_reuse
    assert alice.open(ok.message).info.trusted


def test_control_bobs_183_without_key_reuse_opens(world):
    """A callee with ``cek_reuse`` off seals its 183 to alice's certificate: it opens."""
    alice = ua_engine(world, "alice")
    bob = ua_engine(world, "bob", cek_reuse=False)
    offer = alice.protect(invite(world, call_id="r43-early-noreuse@x")).message
    delivered = bob.open(offer).message
    sent = bob.protect(_bobs_183(delivered))
    assert not sent.info.key_reuse
    assert alice.open(sent.message).info.trusted


@pytest.mark.parametrize("body", ["reliable 183", "early UPDATE"])
def test_hole_the_callees_early_body_under_the_callers_offer_key_is_refused(world, body):
    """Attacker: none needed: two E2M UAs that follow docs/protocol.md §2 (the callee the
    phone's own engine, ``UAEngine``), with early media or 100rel/preconditions.  A
    curious or hostile callee gets the same for free: it can keep the caller from ever
    hearing or reading its early dialog.

    Steps: alice's INVITE offers a key K (``DialogKeys.offer``, unconfirmed until the
    2xx to CSeq 1 INVITE).  bob opens it and keeps K "usable at once" (a received key).
    bob's reliable 183 with SDP (or his UPDATE in the early dialog) goes under K alone
    (``reusable`` picks it: a kekri, no RecipientInfo for alice's certificate).  At
    alice, ``opening_lookup`` offers only *confirmed* keys (``_usable``), and nothing
    confirms K before the 2xx: a response of status 1xx confirms nothing (``settle``),
    and a request from the peer confirms only keys offered in responses
    (``offered_in is None``).

    Effect: alice refuses every early body of bob's: the 183 is dropped (no early media,
    no PRACK, so a callee requiring 100rel gives the INVITE up after 64*T1 and the call
    never connects); bob's early UPDATE is answered 493 (each one, until the 2xx).  The
    rules contradict each other: the receiver may send under a key at once, the offerer
    may not open under it until the 2xx.

    Fix: open with our own unconfirmed offered keys too (a body under K, signed by the
    peer and bound to this message, is the proof that the peer holds it: confirm K on
    such a body), keeping the confirmation rule for *sending* only; or have the
    receiver not reuse a key received in a request until it has answered it 2xx."""
    call_id = f"r43-early-{body.split()[-1]}@x"
    alice, bob, _, delivered = _early(world, call_id)
    plain = _bobs_183(delivered) if body == "reliable 183" else _bobs_early_update(world, call_id)
    sent = bob.protect(plain)
    assert sent.info.key_reuse                      # under alice's offer key, as §2 allows
    try:
        opened = alice.open(sent.message)
    except E2MError as exc:
        pytest.fail(f"alice refused bob's {body}: {type(exc).__name__}: {exc}")
    assert opened.info.trusted and opened.message.body == plain.body
