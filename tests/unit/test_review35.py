"""A thirty-fifth attacker's review (December 2026) of f94124b: the phone's engine
(``e2m_plugins/ua.py``) across re-INVITEs that fail, and the curious chosen proxy.

The hole: a key offered in a re-INVITE (or UPDATE) that then fails is dropped by its
offerer (``DialogKeys.settle`` on the failure answer) but kept by the receiver, who took
it at ``open`` before pjsip answered 491/488/487 (``_keep_received``: "keys received from
the peer are usable at once").  The receiver's next body in the dialog goes under that
key, which its peer no longer has: 493, and the retry after the 493 picks the same key
again, so every later re-INVITE and UPDATE of the call fails (hold, resume, a session
timer's refresh, which then ends the call).

``test_hole_*`` xfail strictly on f94124b; ``test_control_*`` are the same flows without
the failure (they pass).

Fixed: our failure answer to the peer's request drops the keys that request offered
(``DialogKeys.answered``, from ``UAEngine.protect``, which every response the phone
sends passes, pjsip's own 491 and 487 too), and a 493 from the peer retires the
dialog's keys (``retire_dialog``), which the last test shows without a failed
re-INVITE (it failed before: the retry went under the same key).
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, answer, invite, reinvite, ua_engine
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine

NEW_SDP = SDP_OFFER.replace(b"49170", b"49174")
MAX_AGE = 600.0


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


class _Clock:
    def __init__(self) -> None:
        import time
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _phones(world, clock):
    """alice and bob on one clock, dialog keys rolled after ``MAX_AGE`` seconds."""
    def phone(name):
        config = ua_engine(world, name, cek_max_age=MAX_AGE).config
        return UAEngine(config, clock=clock)
    return phone("alice"), phone("bob")


def _call(world, call_id: str):
    """alice calls bob, bob answers; then the call's keys age out, as in any call longer
    than ``cek_max_age`` (so the next body of either side offers a fresh key)."""
    clock = _Clock()
    alice, bob = _phones(world, clock)
    offer = alice.protect(invite(world, call_id=call_id)).message
    delivered = bob.open(offer).message
    ok = bob.protect(answer(delivered, to_tag="b1")).message
    alice.open(ok)
    clock.now += MAX_AGE + 1
    return clock, alice, bob


def _bobs_reinvite_fails(world, alice, bob, call_id: str, status: int, reason: str) -> None:
    """bob's re-INVITE (a fresh key: the old ones aged out) reaches alice, whose pjsip
    answers it ``status`` (491 glare, 488, or the 487 after bob's CANCEL)."""
    sent = bob.protect(reinvite(world, "bob", "alice", call_id, 1, "b1", "a1", sdp=SDP_ANSWER))
    assert not sent.info.key_reuse                 # a fresh key, offered for reuse
    got = alice.open(sent.message)
    failure = alice.protect(make_response(got.message, status, reason)).message
    bob.open(failure)


def _alices_reinvite_opens_at_bob(world, alice, bob, call_id: str, cseq: int = 2) -> bool:
    out = alice.protect(reinvite(world, "alice", "bob", call_id, cseq, "a1", "b1", sdp=NEW_SDP))
    try:
        bob.open(out.message)
    except E2MError:
        return False
    return True


def test_control_after_bobs_reinvite_is_answered_alices_reinvite_opens(world):
    """No failure: alice answers bob's re-INVITE 200, bob's ACK confirms; her next
    re-INVITE (under bob's key or a fresh one) opens at bob."""
    call_id = "r35-ok@x"
    clock, alice, bob = _call(world, call_id)
    sent = bob.protect(reinvite(world, "bob", "alice", call_id, 1, "b1", "a1", sdp=SDP_ANSWER))
    got = alice.open(sent.message)
    ok = alice.protect(make_response(got.message, 200, "OK", [("Contact", "<sip:alice@127.0.0.1:5061>")],
                                     NEW_SDP, "application/sdp")).message
    bob.open(ok)
    assert _alices_reinvite_opens_at_bob(world, alice, bob, call_id)


def test_control_without_bobs_reinvite_alices_reinvite_opens(world):
    call_id = "r35-none@x"
    clock, alice, bob = _call(world, call_id)
    assert _alices_reinvite_opens_at_bob(world, alice, bob, call_id)


@pytest.mark.parametrize("status,reason", [(491, "Request Pending"),
                                           (488, "Not Acceptable Here"),
                                           (487, "Request Terminated")])
def test_hole_a_failed_reinvites_key_is_kept_by_its_receiver(world, status, reason):
    """Attacker: nobody (glare: both re-INVITE at once and both get 491; a CANCELed
    re-INVITE; a 488), or the untrusted hop, which makes any re-INVITE of bob's fail by
    delaying it into a crossing one or answering it 491 itself, or bob (the insider),
    who CANCELs his own re-INVITEs.

    Attack: once the call's keys have aged out (``cek_max_age``), bob's re-INVITE offers
    a fresh key; alice's engine keeps it at ``open`` (usable at once) before pjsip
    answers the re-INVITE ``status``; bob's engine drops it on that failure.

    Effect: alice's next re-INVITE (hold, resume, a session-timer refresh) is sealed
    under the key bob dropped: bob answers 493, and ``react`` re-protects the retry
    under the same key, three times, then gives up.  The call cannot be changed again
    until the key ages out (an hour by default); a session timer ends it.

    Fix: a key received in a request is usable only once our own 2xx to that request
    went out (or, from a response, once the response is a 2xx); a failure we send (or
    a CANCEL we get) for that request drops the keys it offered, as the offerer does:
    ``_keep_received`` could keep request keys unconfirmed and ``protect`` of our
    final answer confirm or drop them (``DialogKeys.settle`` for sent answers)."""
    call_id = f"r35-{status}@x"
    clock, alice, bob = _call(world, call_id)
    _bobs_reinvite_fails(world, alice, bob, call_id, status, reason)
    assert _alices_reinvite_opens_at_bob(world, alice, bob, call_id)


def test_hole_the_retry_after_the_493_reuses_the_dropped_key(world):
    """Attacker and attack as above (491 glare).  Effect: alice's ``react`` to bob's 493
    (which carries the certificate she already holds) re-protects the re-INVITE under
    the very key bob dropped, up to ``MAX_RETRIES_PER_CALL`` times, then ``fail``.
    Fix: as above; also, a 493 from the peer to a body under a dialog key should retire
    that key (``retire``, as ``retire_held_by`` does after a 496), so the retry goes to
    the peer's certificate."""
    call_id = "r35-retry@x"
    clock, alice, bob = _call(world, call_id)
    _bobs_reinvite_fails(world, alice, bob, call_id, 491, "Request Pending")
    plain = reinvite(world, "alice", "bob", call_id, 2, "a1", "b1", sdp=NEW_SDP)
    request = alice.protect(plain).message
    for _ in range(3):
        try:
            bob.open(request)
            return
        except E2MError as exc:
            reaction = alice.react(bob.refusal(request, exc), plain)
            assert reaction.action == "retry", reaction.reason
            request = reaction.request
    bob.open(request)


def test_a_493_to_a_body_under_a_dialog_key_retires_it_and_the_retry_opens(world):
    """The second half of the fix, shown without a failed re-INVITE: bob's phone lost
    the dialog's keys (restarted with the call still up, say) and answers alice's
    re-INVITE, sealed under the dialog key, 493.  The retry must go to his certificate,
    not under the same key again (it did, three times, then "gave up")."""
    call_id = "r35-lost@x"
    clock, alice, bob = _call(world, call_id)
    clock.now -= MAX_AGE + 1                  # the call's keys are still young
    restarted = UAEngine(bob.config, clock=clock)
    plain = reinvite(world, "alice", "bob", call_id, 2, "a1", "b1", sdp=NEW_SDP)
    request = alice.protect(plain)
    assert request.info.key_reuse             # sealed under the dialog's key
    try:
        restarted.open(request.message)
        raise AssertionError("a phone without the dialog's keys opened it")
    except E2MError as exc:
        reaction = alice.react(restarted.refusal(request.message, exc), plain)
    assert reaction.action == "retry", reaction.reason
    assert restarted.open(reaction.request).info.received
