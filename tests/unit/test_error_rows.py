"""Every row of the error table, reached by a real malformed or hostile message.

Each case builds a message with the project's own code (then breaks it), runs
it through the proxy engine or the UA engine, and checks the error class and
the SIP answer the table gives.  The last test checks that together the cases
reach every error class in the table (E2MError itself is only the fallback
for subclasses without a row of their own).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Callable

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, TRUSTED, answer, invite, known_proxy, message, proxy_engine, ua_engine

from e2m_plugins import errors as e
from e2m_plugins import mime
from e2m_plugins.body import protect_content
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.cms.signed import sign
from e2m_plugins.testpki import init_test_pki, issue_user, make_ca
from e2m_plugins.sip import SipMessage, make_response
from e2m_plugins.sip_errors import ERROR_TABLE, answer_for



@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"))


def _labelled(msg: SipMessage, entity: mime.MimePart, label: str | None = "auto") -> SipMessage:
    from e2m_plugins.body import with_entity
    out = with_entity(msg, entity)
    if label == "auto":
        label = f'{TRUSTED};cid="{entity.content_id}"' if entity.content_id else TRUSTED
    return out.add("Proxy-Required-Body", label) if label else out


def _envelope(world, recipients=("bob", TRUSTED), text=b"hi", *, signer=None,
              ctype="text/plain", cipher=None) -> mime.MimePart:
    certs = [world.proxy(r).cert if "." in r else world.user(r).cert for r in recipients]
    entity, _ = protect_content(ctype, text, [recipient_for_certificate(c) for c in certs],
                                signer=signer, content_id="p1@example.com", cipher=cipher)
    return entity


def _with_body(entity: mime.MimePart, body: bytes, **headers: str) -> mime.MimePart:
    hs = [(n, headers.get(n.lower().replace("-", "_"), v)) for n, v in entity.headers]
    return mime.MimePart(tuple(hs), body)


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


# -- hostile inputs ---------------------------------------------------------------

def garbage_der(world):
    env = _envelope(world)
    return _labelled(message(world), _with_body(env, b"\x30\x80\x02\x01\x05garbage"))


def truncated_base64(world):
    env = _envelope(world)
    b64 = base64.b64encode(env.body)[:-7]
    hs = [(n, v) for n, v in env.headers if n.lower() != "content-transfer-encoding"]
    return _labelled(message(world), mime.MimePart((*hs, ("Content-Transfer-Encoding", "base64")), b64))


def unknown_cipher(world):
    env = _envelope(world, cipher="aes-128-cbc")
    cbc = bytes.fromhex("0609608648016503040102")     # OID 2.16.840.1.101.3.4.1.2 (aes128-CBC)
    assert cbc in env.body
    ofb = cbc[:-1] + b"\x03"                           # ... .1.3, aes128-OFB: not for CMS here
    return _labelled(message(world), _with_body(env, env.body.replace(cbc, ofb)))


def bob_only(world):
    return _labelled(message(world), _envelope(world, ("bob",)), label=None)


def bad_gcm_tag(world):
    env = _envelope(world)
    return _labelled(message(world), _with_body(env, _flip_last(env.body)))


def bad_signature(world):
    alice = world.user("alice")
    entity = mime.inner_entity("text/plain", b"pay 10")
    signed = mime.multipart_signed(entity, sign(entity, alice.cert, alice.key, detached=True))
    return message(world).with_body(signed.body.replace(b"pay 10", b"pay 99"),
                                    signed.header("Content-Type"))


def foreign_ca_signer(world):
    stranger = issue_user(make_ca("Elsewhere CA"), world.aor("alice"))
    return _labelled(message(world), _envelope(world, signer=(stranger.cert, stranger.key)))


def carol_signs_as_alice(world):
    carol = world.user("carol")
    return _labelled(message(world), _envelope(world, signer=(carol.cert, carol.key)))


def oversized(world):
    return message(world, text=b"x" * (300 * 1024))


def unsigned_for_verifier(world):
    return _labelled(message(world), _envelope(world))


def compressed_data(world):
    env = _envelope(world)
    hs = [(n, v.replace("authEnveloped-data", "compressed-data")) for n, v in env.headers]
    return _labelled(message(world), mime.MimePart(tuple(hs), env.body))


def label_names_missing_part(world):
    return _labelled(message(world), _envelope(world), label=f'{TRUSTED};cid="nothere@x"')


def duplicate_labels(world):
    msg = _labelled(message(world), _envelope(world))
    return msg.add("Proxy-Required-Body", f'{TRUSTED};cid="p1@example.com"')


def malformed_label(world):
    return _labelled(message(world), _envelope(world), label=';cid="p1@example.com"')


def for_someone_else(world):
    return _labelled(message(world), _envelope(world, ("carol",)), label=None)


def only_optional_parts_for_others(world):
    a = _envelope(world, ("carol",))
    b = _envelope(world, (TRUSTED,))
    hs = lambda p, cid: tuple((n, v.replace("handling=required", "handling=optional")
                               .replace("p1@example.com", cid)) for n, v in p.headers)
    mixed = mime.multipart_mixed([mime.MimePart(hs(a, "a@x"), a.body),
                                  mime.MimePart(hs(b, "b@x"), b.body)])
    from e2m_plugins.body import with_entity
    return with_entity(message(world), mixed)


def body_from_another_dialog(world):
    """A valid protected body cut from one MESSAGE and pasted into another."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    original = alice.protect(message(world)).message
    from e2m_plugins.body import with_entity
    from e2m_plugins.body import message_body
    other = message(world)          # new Call-ID, new tags
    pasted = with_entity(other, message_body(original))
    for label in original.get_all("Proxy-Required-Body"):
        pasted = pasted.add("Proxy-Required-Body", label)
    return pasted


def plaintext_sdp(world):
    return invite(world)


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
    Case("garbage DER", garbage_der, e.MalformedError, 400),
    Case("truncated base64", truncated_base64, e.MalformedError, 400),
    Case("unknown content cipher", unknown_cipher, e.UnsupportedAlgorithmError, 415),
    Case("not a recipient", bob_only, e.ProxyCannotDecryptError, 496),
    Case("bad GCM tag", bad_gcm_tag, e.ProxyCannotDecryptError, 496),
    Case("tampered signature", bad_signature, e.SignatureInvalidError, 403, verify=("MESSAGE:*",)),
    Case("signer from a foreign CA", foreign_ca_signer, e.UntrustedSignerError, 403),
    Case("trusted stranger signs as the sender", carol_signs_as_alice,
         e.CertificateRejectedError, 403),
    Case("oversized body", oversized, e.LimitExceededError, 413),
    Case("unsigned where policy verifies", unsigned_for_verifier, e.SignatureRequiredError, 495,
         verify=("MESSAGE:*",)),
    Case("compressed-data", compressed_data, e.UnsupportedMediaTypeError, 415),
    Case("label names a missing part", label_names_missing_part, e.MalformedError, 400),
    Case("duplicate labels", duplicate_labels, e.MalformedError, 400),
    Case("label without host", malformed_label, e.MalformedError, 400),
    Case("body from another dialog", body_from_another_dialog, e.BindingMismatchError, 403),
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
    alice = world.user("alice")
    good = proxy.inspect(_labelled(message(world), _envelope(world, signer=(alice.cert, alice.key))))
    assert good.action == "forward" and good.seen


UA_CASES = [
    Case("garbage DER", garbage_der, e.MalformedError, 400, "ua"),
    Case("unknown content cipher", unknown_cipher, e.UnsupportedAlgorithmError, 415, "ua"),
    Case("for someone else", for_someone_else, e.NoMatchingRecipientError, 493, "ua"),
    Case("bad GCM tag", bad_gcm_tag, e.DecryptionError, 493, "ua"),
    Case("only optional parts, none ours", only_optional_parts_for_others,
         e.UndecipherableError, 493, "ua"),
    Case("plaintext where E2M is required", plaintext_sdp, e.DowngradeError, 488, "ua"),
    Case("trusted stranger signs as the sender", carol_signs_as_alice,
         e.UntrustedSignerError, 403, "ua"),
    Case("oversized body", oversized, e.LimitExceededError, 413, "ua"),
    Case("compressed-data", compressed_data, e.UnsupportedMediaTypeError, 415, "ua"),
    Case("body from another dialog", body_from_another_dialog, e.BindingMismatchError, 403, "ua"),
]


@pytest.mark.parametrize("case", UA_CASES, ids=lambda c: c.name)
def test_ua_refuses_hostile_input_with_the_table_answer(world, case):
    bob = ua_engine(world, "bob")
    with pytest.raises(case.error) as caught:
        bob.open(case.build(world))
    assert type(caught.value) is case.error
    assert answer_for(caught.value, "ua").code == case.code
    assert bob.open(_labelled(message(world), _envelope(world))).message.body == b"hi"


def test_uas_that_cannot_encrypt_its_answer_refuses_by_policy(world):
    """No certificate for alice and no key to reuse: bob must not answer in
    plaintext; the PolicyError row (403) is his answer."""
    alice = ua_engine(world, "alice", cek_reuse=False)
    bob = ua_engine(world, "bob", peers=())
    received = bob.open(alice.protect(invite(world)).message).message
    with pytest.raises(e.PolicyError) as caught:
        bob.protect(answer(received, SDP_ANSWER))
    assert answer_for(caught.value, "ua").code == 403


def test_forged_496_is_a_local_refusal(world):
    alice = ua_engine(world, "alice")
    plain = message(world)
    evil = issue_user(make_ca("Evil"), "sip:x@evil.example")
    from cryptography.hazmat.primitives.serialization import Encoding
    forged = make_response(plain, 496, "Proxy Indecipherable",
                           [("Warning", f"380 {TRUSTED} \"Required to view 'text/plain'\"")],
                           evil.cert.public_bytes(Encoding.DER), "application/pkix-cert")
    assert alice.react(forged, plain).action == "fail"
    assert answer_for(e.CertificateRejectedError("x"), "ua") is None   # never answered on the wire


def test_the_cases_reach_every_row_of_the_table():
    """The cases above (each checked by its own test) together reach every error class."""
    reached = {c.error for c in (*PROXY_CASES, *UA_CASES)}
    reached |= {e.PolicyError, e.CertificateRejectedError}   # the two tests just above
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
