"""A signed body binds the To tag of the message it was signed for (``e2m-sip-to-tag``).

Reviews 12 to 17 came from one gap: the signed SIP context named no To tag, so a hop
that re-tagged copies of a callee's signed 200 made new dialogs out of it, and only the
fork slots (``ProxyEngine._fork``) bounded what they could keep.  One price stayed: a
re-tagged copy sent before the real 200 took the early dialog's first fork, and alice's
key then lived only 200 s in her real call.  Now the signer binds the To tag in a signed
attribute of its own (old readers ignore it and still read the context), so such a copy
is a body made for another dialog: forwarded unread, keeping and claiming nothing.

``test_hole_*`` failed before the attribute (on a4bf6cf); bodies from senders older than
it bind no To tag and are read as before (``test_*older_sender*``).
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, answer, apply_forward, proxy_engine
from e2m_plugins.body import protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.errors import MalformedError
from e2m_plugins.sipcontext import decode_to_tag, encode_to_tag
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review12 import NEW_SDP, SDP_VIEW, _invite, _retag, _ua
from tests.unit.test_review13 import _Clock, _reinvite_once_early_copies_are_gone
from tests.unit.test_review15 import alices_call_through_a_proxy


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


def _offer_and_answer(world, call_id: str, to_tag: str = "b1"):
    """alice's signed offer through a fresh proxy and bob's signed 200 under her offer key
    (not yet shown to the proxy).  Returns (proxy, clock, alice, who, 200)."""
    clock = _Clock()
    proxy, alice, bob, offer, verdict, who = alices_call_through_a_proxy(world, call_id, clock)
    assert verdict.action == "forward"
    ok = bob.protect(answer(bob.open(apply_forward(offer, verdict)).message, to_tag=to_tag))
    assert ok.info.key_reuse
    return proxy, clock, alice, who, ok.message


def test_a_signed_200_binds_its_to_tag_lower_cased(world):
    proxy, _, _, who, ok = _offer_and_answer(world, "bound@x", to_tag="B1-Phone")
    seen = proxy.inspect(ok, caller=who)
    assert seen.seen and seen.error is None and seen.seen[0].bound
    assert proxy.inspect(_retag(ok, "b1-other"), caller=who).error == "BindingMismatchError"
    # the value on the wire: one UTF8String, lower-cased
    assert encode_to_tag("B1-Phone") == b"\x0c\x08b1-phone"
    assert decode_to_tag(encode_to_tag("B1-Phone")) == "b1-phone"


def test_a_case_changed_to_tag_is_the_same_dialog(world):
    """RFC 3261 §19.3: tags compare without case; a proxy or UA writing the tag in
    another case changes no dialog."""
    proxy, _, _, who, ok = _offer_and_answer(world, "case@x", to_tag="phone")
    seen = proxy.inspect(_retag(ok, "PHONE"), caller=who)
    assert seen.seen and seen.error is None


def test_hole_a_hops_retagged_copy_before_the_real_200_took_the_first_dialog(world):
    """Untrusted hop between bob and the proxy: it sends a copy of bob's signed 200 with a
    made-up To tag before the real one.  Before: the copy was read, claimed the early
    dialog's first fork and kept alice's key there for 12 h (a dialog no BYE ends, on her
    quota); the real dialog was a later fork, her key lived 200 s in it, and her
    re-INVITE after that was a 496 round trip.  Now the copy is a body made for another
    dialog: forwarded unread, claiming and keeping nothing."""
    proxy, clock, alice, who, ok = _offer_and_answer(world, "hop-first@x")
    copy = proxy.inspect(_retag(ok, "hop0"), caller=who)
    assert copy.action == "forward"          # a response is never refused
    assert not copy.seen and copy.error == "BindingMismatchError", copy.error
    real = proxy.inspect(ok, caller=who)
    assert real.seen and real.error is None
    alice.open(ok)
    verdict = _reinvite_once_early_copies_are_gone(world, proxy, clock, alice, "bob",
                                                   "hop-first@x", "b1")
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"


def test_hole_a_retagged_copy_of_alices_own_request_is_read(world):
    """Untrusted hop between alice and the proxy, re-tagging her re-INVITE: before, the
    copy was refused only as a replay (its context, without a To tag, was seen before);
    sent first, it was read and kept her key under the made-up dialog as a later fork's.
    Now it is refused as a body made for another dialog, before any replay record."""
    proxy, clock, alice, who, ok = _offer_and_answer(world, "req@x")
    assert proxy.inspect(ok, caller=who).seen
    alice.open(ok)
    again = alice.protect(_invite(world, "alice", "bob", "req@x", cseq=2, to_tag="b1",
                                  sdp=NEW_SDP)).message
    copy = proxy.inspect(_retag(again, "hop1"))
    assert copy.action == "reply" and copy.error == "BindingMismatchError", copy.error
    assert proxy.inspect(again).seen                 # the real one still passes afterwards


def _signed_200(world, call_id: str):
    """bob's signed 200 to alice's call, sealed for the proxy."""
    response = answer(_invite(world, "alice", "bob", call_id), to_tag="b1")
    cred = world.user("bob")
    entity, _ = protect_content("application/sdp", SDP_ANSWER,
                                [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                signer=(cred.cert, cred.key), bind_to=response,
                                readers=(TRUSTED,))
    return with_entity(response, entity)


@pytest.mark.parametrize("older", [True, False])
def test_an_older_senders_200_binds_no_to_tag_and_is_read_with_any(world, request, older):
    """A sender older than the attribute (``older_senders``: it writes none) binds no To
    tag: its 200 is read under any To tag, as before (the fork slots bound what such
    copies keep: tests/unit/test_forks.py).  A newer sender's copy under another tag is
    not read."""
    if older:
        request.getfixturevalue("older_senders")
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    ok = _signed_200(world, "older@x" if older else "newer@x")
    assert proxy.inspect(ok).seen
    copy = proxy.inspect(_retag(ok, "another"))
    if older:
        assert copy.seen and copy.error is None
    else:
        assert not copy.seen and copy.error == "BindingMismatchError"


def test_a_request_without_a_to_tag_binds_the_empty_one(world):
    """A new sender's initial INVITE binds "no To tag" (review 19): the same request given a
    made-up To tag is a body made for another message, not an older sender's."""
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    alice = _ua(world, "alice", "bob")
    offer = alice.protect(_invite(world, "alice", "bob", "untagged@x")).message
    copy = proxy.inspect(offer.replace("To", offer.get("To") + ";tag=hop0"))
    assert copy.action == "reply" and copy.error == "BindingMismatchError", copy.error
    verdict = proxy.inspect(offer)
    assert verdict.action == "forward" and verdict.seen and verdict.seen[0].bound
    assert encode_to_tag("") == b"\x0c\x00" and decode_to_tag(b"\x0c\x00") == ""


def test_a_malformed_to_tag_value_is_a_typed_error():
    for value in (b"", b"\x04\x02ab", b"\x0c\x05ab", b"\x0c\x02ab\x00"):
        with pytest.raises(MalformedError):
            decode_to_tag(value)


@pytest.mark.parametrize("value", [b"\x04\x02ab", b"\x0c\x05ab"])
def test_a_signed_request_with_a_malformed_to_tag_is_answered_400(world, monkeypatch, value):
    """Bad input gets a defined answer: a body signed with a broken ``e2m-sip-to-tag``
    value (not a UTF8String, a wrong length) is refused 400 as a request and forwarded
    unread, with the error named, as a response; the proxy goes on serving."""
    import e2m_plugins.body as body
    monkeypatch.setattr(body, "encode_to_tag", lambda tag: value)
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    broken = _ua(world, "alice", "bob").protect(_invite(world, "alice", "bob", "bad@x")).message
    response = _signed_200(world, "bad-200@x")
    monkeypatch.undo()
    verdict = proxy.inspect(broken)
    assert (verdict.action, verdict.code, verdict.error) == ("reply", 400, "MalformedError")
    answered = proxy.inspect(response)
    assert answered.action == "forward" and not answered.seen
    assert answered.error == "MalformedError"
    good = _ua(world, "alice", "bob").protect(_invite(world, "alice", "bob", "good@x")).message
    assert proxy.inspect(good).seen
