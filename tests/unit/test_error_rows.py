"""Every row of the error table, reached by a real malformed or hostile message.

Each case builds a message with the project's own code (then breaks it; the
builders are in ``e2m_lab/hostile.py``, shared with the wire tests), runs it through the proxy engine or the UA engine, and checks the error class and
the SIP answer the table gives.  The last test checks that together the cases
reach every error class in the table (E2MError itself is only the fallback
for subclasses without a row of their own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from e2m_lab import hostile as h
from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, TRUSTED, answer, invite, known_proxy, message, proxy_engine, ua_engine

from e2m_plugins import errors as e
from e2m_plugins.testpki import init_test_pki, issue_user, make_ca
from e2m_plugins.sip import make_response
from e2m_plugins.sip_errors import ERROR_TABLE, answer_for


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"))


# -- cases ------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    build: Callable
    error: type
    code: int | None
    role: str = "proxy"
    view: tuple[str, ...] = ("MESSAGE:*",)
    verify: tuple[str, ...] = ()


PROXY_CASES = [
    Case("garbage DER", h.garbage_der, e.MalformedError, 400),
    Case("truncated base64", h.truncated_base64, e.MalformedError, 400),
    Case("unknown content cipher", h.unknown_cipher, e.UnsupportedAlgorithmError, 415),
    Case("not a recipient", h.not_a_recipient, e.ProxyCannotDecryptError, 496),
    Case("bad GCM tag", h.bad_gcm_tag, e.ProxyCannotDecryptError, 496),
    Case("tampered signature", h.tampered_signature, e.SignatureInvalidError, 403, verify=("MESSAGE:*",)),
    Case("signer from a foreign CA", h.foreign_ca_signer, e.UntrustedSignerError, 403),
    Case("trusted stranger signs as the sender", h.stranger_signs_as_alice,
         e.CertificateRejectedError, 403),
    Case("oversized body", h.oversized, e.LimitExceededError, 413),
    Case("unsigned where policy verifies", h.unsigned, e.SignatureRequiredError, 495,
         verify=("MESSAGE:*",)),
    Case("compressed-data", h.compressed_data, e.UnsupportedMediaTypeError, 415),
    Case("label names a missing part", h.label_names_missing_part, e.MalformedError, 400),
    Case("duplicate labels", h.duplicate_labels, e.MalformedError, 400),
    Case("label without host", h.label_without_host, e.MalformedError, 400),
    Case("body from another dialog", h.body_from_another_dialog, e.BindingMismatchError, 403),
    Case("stale body", h.stale, e.ReplayError, 403),
]


@pytest.mark.parametrize("case", PROXY_CASES, ids=lambda c: c.name)
def test_proxy_answers_hostile_input_from_the_table(world, case):
    proxy = proxy_engine(world, TRUSTED, view=case.view, verify=case.verify)
    msg = case.build(world)
    verdict = proxy.inspect(msg)
    assert verdict.action == "reply", verdict
    assert verdict.error == case.error.__name__, verdict.detail
    assert verdict.code == case.code
    expected = answer_for(case.error("x"), "proxy")
    assert (verdict.code, verdict.reason) == (expected.code, expected.reason)
    if expected.accept:
        assert ("Accept", expected.accept) in verdict.add_headers
    # the proxy keeps serving: a good message right after is forwarded and viewed
    good = proxy.inspect(h.protected(world, b"hi"))
    assert good.action == "forward" and good.seen


UA_CASES = [
    Case("garbage DER", h.garbage_der, e.MalformedError, 400, "ua"),
    Case("unknown content cipher", h.unknown_cipher, e.UnsupportedAlgorithmError, 415, "ua"),
    Case("for someone else", h.for_someone_else, e.NoMatchingRecipientError, 493, "ua"),
    Case("bad GCM tag", h.bad_gcm_tag, e.DecryptionError, 493, "ua"),
    Case("only optional parts, none ours", h.only_optional_parts_for_others,
         e.UndecipherableError, 493, "ua"),
    Case("plaintext where E2M is required", h.plaintext_sdp, e.DowngradeError, 488, "ua"),
    Case("trusted stranger signs as the sender", h.stranger_signs_as_alice,
         e.UntrustedSignerError, 403, "ua"),
    Case("oversized body", h.oversized, e.LimitExceededError, 413, "ua"),
    Case("compressed-data", h.compressed_data, e.UnsupportedMediaTypeError, 415, "ua"),
    Case("body from another dialog", h.body_from_another_dialog, e.BindingMismatchError, 403, "ua"),
    Case("stale body", h.stale, e.ReplayError, 403, "ua"),
    Case("split SDP views differ", h.split_views_differ, e.InconsistentSplitError, 403, "ua"),
]


@pytest.mark.parametrize("case", UA_CASES, ids=lambda c: c.name)
def test_ua_refuses_hostile_input_with_the_table_answer(world, case):
    bob = ua_engine(world, "bob")
    with pytest.raises(case.error) as caught:
        bob.open(case.build(world))
    assert type(caught.value) is case.error
    assert answer_for(caught.value, "ua").code == case.code
    assert bob.open(h.protected(world, b"hi")).message.body == b"hi"


def test_uas_that_cannot_encrypt_its_answer_refuses_by_policy(world):
    """No certificate for alice and no key to reuse: bob must not answer in
    plaintext; the PolicyError row (403) is his answer."""
    # alice does not sign (so bob cannot take her certificate from a signature)
    alice = ua_engine(world, "alice", cek_reuse=False, sign=False)
    bob = ua_engine(world, "bob", peers=(), require_signature=False)
    received = bob.open(alice.protect(invite(world)).message).message
    with pytest.raises(e.PolicyError) as caught:
        bob.protect(answer(received, SDP_ANSWER))
    assert answer_for(caught.value, "ua").code == 403


def test_forged_496_is_a_local_refusal(world):
    alice = ua_engine(world, "alice")
    plain = message(world)
    evil = issue_user(make_ca("Evil"), "sip:x@evil.example")
    from cryptography.hazmat.primitives.serialization import Encoding
    forged = make_response(alice.protect(plain).message, 496, "Proxy Indecipherable",
                           [("Warning", f"380 {TRUSTED} \"Required to view 'text/plain'\"")],
                           evil.cert.public_bytes(Encoding.DER), "application/pkix-cert")
    assert alice.react(forged, plain).action == "fail"
    assert answer_for(e.CertificateRejectedError("x"), "ua") is None   # never answered on the wire


def test_a_new_dialog_naming_a_live_dialogs_tag_is_a_merged_request(world):
    """The caller's INVITE by a second path (its tag, another branch) after bob
    answered the first: 482 (RFC 3261 §8.2.2.2), the answered call untouched."""
    alice, bob = ua_engine(world, "alice"), ua_engine(world, "bob")
    offer = alice.protect(invite(world)).message
    bob.protect(answer(bob.open(offer).message, SDP_ANSWER, to_tag="b1"))
    copy = offer.replace("Via", "SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bKsecondpath")
    with pytest.raises(e.MergedRequestError) as caught:
        bob.open(copy)
    assert answer_for(caught.value, "ua").code == 482


def test_the_cases_reach_every_row_of_the_table():
    """The cases above (each checked by its own test) together reach every error class."""
    reached = {c.error for c in (*PROXY_CASES, *UA_CASES)}
    reached |= {e.PolicyError, e.CertificateRejectedError,   # the three tests just above
                e.MergedRequestError}
    missing = {cls.__name__ for cls in ERROR_TABLE if cls not in reached} - {"E2MError"}
    assert not missing, f"rows no hostile input reaches: {sorted(missing)}"


def test_signed_offer_teaches_bob_alice_certificate(world):
    alice = ua_engine(world, "alice", cek_reuse=False, sign=True)
    bob = ua_engine(world, "bob", peers=())
    received = bob.open(alice.protect(invite(world, SDP_OFFER)).message).message
    reply = bob.protect(answer(received, SDP_ANSWER))
    assert reply.info.encrypted
    assert alice.open(reply.message).message.body == SDP_ANSWER


def test_known_proxy_helper_is_consistent(world):
    assert known_proxy(world, TRUSTED, ("MESSAGE:*",)).view[0].format() == "MESSAGE:*"
