"""The attacks of the security issue, each as it would be run against the engines.

Every test plays one attacker of docs/threat-model.md with the project's own engines
and test PKI, in memory: the off-path sender, the untrusted on-path hop, the chosen
proxy turned curious, and the insider UA.  Each asserts the attack fails.
"""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.flows import (CRYPTO, SRTP_ANSWER, SRTP_OFFER, TRUSTED, UNTRUSTED, answer,
                           apply_forward, invite, known_proxy, message, proxy_engine, ua_engine)
from e2m_plugins import headers as hdr
from e2m_plugins import mime
from e2m_lab import hostile
from e2m_plugins.body import message_body, protect_content, seal_keys, top_parts, with_entity
from e2m_plugins.cms import oids
from e2m_plugins.cms.envelope import open_envelope, seal
from e2m_plugins.cms.recipients import CertificateKey, recipient_for_certificate, reuse_kek
from e2m_plugins.cms.signed import verify
from e2m_plugins.errors import E2MError, InconsistentSplitError
from e2m_plugins.sdp import separate_keys
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.sip_errors import answer_for
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import next_attempt

SDP_VIEW = ("INVITE:application/sdp",)
EVIL_SDP = (b"v=0\r\no=hop 1 1 IN IP4 203.0.113.66\r\ns=-\r\nc=IN IP4 203.0.113.66\r\n"
            b"t=0 0\r\nm=audio 6666 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
EVIL_HOST = "evil.example.com"       # in alice's domain, with a certificate from her CA


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED, UNTRUSTED, EVIL_HOST),
                         users=("alice", "bob", "carol", "mallory"))


def _proxy_key(world, host: str) -> CertificateKey:
    cred = world.proxy(host)
    return CertificateKey(cred.cert, cred.key)


def _opens(world, host: str, msg: SipMessage) -> list[bytes]:
    """The plaintexts ``host`` can open from ``msg``'s body (envelopes for its key)."""
    out = []
    for part in top_parts(message_body(msg)):
        try:
            out.append(open_envelope(part.decoded(), [_proxy_key(world, host)]).plaintext)
        except E2MError:
            continue
    return out


def _refused(engine, msg: SipMessage) -> E2MError:
    with pytest.raises(E2MError) as caught:
        engine.open(msg)
    return caught.value


# == untrusted hop ==============================================================

def test_hop_cannot_replace_the_offer_with_its_own_encrypted_to_bob(world):
    """Encryption is not authentication: the hop seals its own SDP (media to itself) to
    bob's public certificate, bound to the message, and sends it on as alice's."""
    alice = ua_engine(world, "alice")
    bob = ua_engine(world, "bob")
    sent = alice.protect(invite(world)).message
    forged_entity, _ = protect_content("application/sdp", EVIL_SDP,
                                       [recipient_for_certificate(world.user("bob").cert)],
                                       bind_to=sent)
    forged = with_entity(sent, forged_entity)
    error = _refused(bob, forged)
    assert answer_for(error, "ua").code == 495     # the UAC that meant it can sign and retry


def test_hop_cannot_forge_a_message_the_home_proxy_archives_under_alice(world):
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",), verify=("MESSAGE:*",))
    original = message(world)
    entity, _ = protect_content("text/plain", b"Send the money to account 666.",
                                [recipient_for_certificate(world.user("bob").cert),
                                 recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                bind_to=original)
    forged = with_entity(original, entity).add(
        hdr.PROXY_REQUIRED_BODY, hdr.format_proxy_required_body(hdr.BodyLabel(TRUSTED, ())))
    verdict = proxy.inspect(forged)
    assert verdict.action == "reply" and verdict.code == 495 and not verdict.seen
    bob = ua_engine(world, "bob")
    _refused(bob, forged)


def test_messages_are_signed_by_default_and_described_by_their_signer(world):
    alice = ua_engine(world, "alice")
    bob = ua_engine(world, "bob")
    sent = alice.protect(message(world))
    assert sent.info.signed
    opened = bob.open(sent.message)
    assert opened.info.signed and opened.info.signers == (world.aor("alice"),)
    assert world.aor("alice") in opened.info.describe()


def test_an_unsigned_body_is_never_described_as_the_peers(world):
    """With unsigned bodies accepted on purpose, the description names nobody."""
    alice = ua_engine(world, "alice", sign=False)
    bob = ua_engine(world, "bob", require_signature=False)
    opened = bob.open(alice.protect(message(world)).message)
    assert not opened.info.signed and world.aor("alice") not in opened.info.describe()


def test_a_captured_message_replayed_with_a_new_branch_is_refused(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",))
    bob = ua_engine(world, "bob")
    sent = alice.protect(message(world)).message
    first = proxy.inspect(sent)
    assert first.action == "forward" and len(first.seen) == 1
    bob.open(apply_forward(sent, first))
    replay = next_attempt(sent).replace("CSeq", sent.get("CSeq"))   # new branch only
    again = proxy.inspect(replay)
    assert again.action == "reply" and not again.seen
    _refused(bob, apply_forward(replay, first))


def test_a_message_readdressed_to_carol_is_refused_and_never_archived(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",))
    sent = alice.protect(message(world)).message
    carol = world.aor("carol")
    readdressed = SipMessage(sent.start_line.__class__(sent.method, carol),
                             sent.headers, sent.body).replace("To", f"<{carol}>")
    verdict = proxy.inspect(readdressed)
    assert verdict.action == "reply" and not verdict.seen


def test_bob_cannot_rewrap_alices_signed_text_as_a_new_message_to_carol(world):
    """A recipient holds alice's SignedData; wrapped in a new envelope from 'alice' to
    carol, it must not pass as alice's message to carol."""
    alice = ua_engine(world, "alice")
    sent = alice.protect(message(world)).message
    (part,) = top_parts(message_body(sent))
    bob_key = CertificateKey(world.user("bob").cert, world.user("bob").key)
    inner = open_envelope(part.decoded(), [bob_key])
    assert inner.content_type == "signed-data"
    to_carol = message(world, recipient="carol")
    resealed = seal(inner.plaintext, [recipient_for_certificate(world.user("carol").cert)],
                    content_type=oids.SIGNED_DATA)
    entity = mime.smime_entity(resealed.der, "authEnveloped-data")
    carol = ua_engine(world, "carol")
    _refused(carol, with_entity(to_carol, entity))


def test_hop_cannot_strip_the_label_of_a_proxy_alice_chose(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    sent = alice.protect(invite(world)).message
    stripped = sent.remove(hdr.PROXY_REQUIRED_BODY)
    _refused(bob, stripped)


def test_a_policy_header_for_the_proxy_put_in_by_an_earlier_hop_is_replaced(world):
    """A hop before the home proxy announces a weaker policy in its name; the proxy
    removes it and announces its own, so the UAS learns only the real one."""
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    sent = alice.protect(invite(world)).message
    forged = hdr.PolicyHeader(TRUSTED, view=(), verify=()).format()
    verdict = proxy.inspect(sent.add(hdr.PROXY_BODY_POLICY, forged))
    out = apply_forward(sent.add(hdr.PROXY_BODY_POLICY, forged), verdict)
    assert out.get_all(hdr.PROXY_BODY_POLICY) == [proxy.policy_header()[1]]


# == chosen proxy turned curious ================================================

def test_chosen_proxy_cannot_make_bob_think_the_view_key_is_his_alone(world):
    """The proxy re-seals the body for bob alone under a key it knows (its own
    RecipientInfo gone), keeping its label: the key now looks like bob's alone.  Bob
    must not then send his keying lines under that key, or under the proxy's."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    sent = alice.protect(invite(world, SRTP_OFFER)).message
    (part,) = top_parts(message_body(sent))
    view = open_envelope(part.decoded(), [_proxy_key(world, TRUSTED)], want_cek=True)
    inner_type = oids.SIGNED_DATA if view.content_type == "signed-data" else oids.DATA
    resealed = seal(view.plaintext, [recipient_for_certificate(world.user("bob").cert)],
                    content_type=inner_type, cek_reference=view.cek_reference)
    fake = mime.smime_entity(resealed.der, "authEnveloped-data",
                             content_id=part.content_id, handling=part.handling)
    tampered = with_entity(sent, fake)
    try:
        opened = bob.open(tampered)
    except E2MError:
        return                                          # refused outright: attack failed
    reply = bob.protect(answer(opened.message, SRTP_ANSWER)).message
    # the proxy holds the re-sealed key and its own: no keying line of bob's answer opens
    stolen = [reuse_kek(resealed.cek, view.cek_reference), _proxy_key(world, TRUSTED)]
    for reply_part in top_parts(message_body(reply)):
        try:
            plain = open_envelope(reply_part.decoded(), stolen).plaintext
        except E2MError:
            continue
        assert b"inline:" not in plain and CRYPTO.split(b" ", 1)[0] not in plain
        sealed = verify(plain, trust_anchors=[world.ca.cert]).signers[0].attributes
        for keys in sealed.get(oids.SDP_KEYS, ()):
            with pytest.raises(E2MError):
                open_envelope(keys, stolen)


def test_srtp_keys_are_never_sealed_for_a_proxy_even_with_split_off(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),),
                      split_sdp=False)
    try:
        sent = alice.protect(invite(world, SRTP_OFFER)).message
    except E2MError:
        return
    for plain in _opens(world, TRUSTED, sent):
        assert b"inline:" not in plain


# == off-path sender ============================================================

def _stranger_options(world, policy: str, to: str = "alice") -> SipMessage:
    return make_request("OPTIONS", world.aor(to), from_uri="sip:stranger@example.net",
                        to_uri=world.aor(to), extra_headers=[(hdr.PROXY_BODY_POLICY, policy)])


def test_a_strangers_options_teaches_alice_no_policy(world):
    alice = ua_engine(world, "alice")
    alice.open(_stranger_options(
        world, f'{EVIL_HOST};view="MESSAGE:*";cert-url="http://{EVIL_HOST}/c.der"'))
    assert alice.certificates_wanted() == []          # no URL fetched for a stranger
    try:   # the adapter would fetch it if asked: the CA issued it, so it would pass
        alice.add_proxy_certificate(EVIL_HOST, world.proxy(EVIL_HOST).cert.public_bytes(Encoding.DER))
    except E2MError:
        pass
    sent = alice.protect(message(world))
    assert EVIL_HOST not in sent.info.readable_by
    assert _opens(world, EVIL_HOST, sent.message) == []


def test_a_stranger_cannot_withdraw_the_real_proxys_policy(world):
    alice = ua_engine(world, "alice")
    register = make_request("REGISTER", f"sip:{world.domain}", from_uri=world.aor("alice"),
                            to_uri=world.aor("alice"))
    sent = alice.protect(register).message
    policy = hdr.PolicyHeader(TRUSTED, view=(hdr.Rule.parse("MESSAGE:*"),)).format()
    alice.open(make_response(sent, 200, "OK", [(hdr.PROXY_BODY_POLICY, policy)]))
    alice.add_proxy_certificate(TRUSTED, world.proxy(TRUSTED).cert.public_bytes(Encoding.DER))
    assert TRUSTED in alice.protect(message(world)).info.readable_by
    alice.open(_stranger_options(world, f"{TRUSTED};expires=0"))
    assert TRUSTED in alice.protect(message(world)).info.readable_by


def test_learnt_policies_expire_even_when_they_say_never(world):
    alice = ua_engine(world, "alice")
    register = make_request("REGISTER", f"sip:{world.domain}", from_uri=world.aor("alice"),
                            to_uri=world.aor("alice"))
    sent = alice.protect(register).message
    ok = make_response(sent, 200, "OK", [(hdr.PROXY_BODY_POLICY,
                                          f'{TRUSTED};view="MESSAGE:*";expires=4294967295')])
    alice.open(ok)
    (policy,) = alice.policies.in_force()
    assert policy.expires_at - time.time() <= 7 * 86400


def test_a_cert_url_on_another_host_is_not_fetched(world):
    alice = ua_engine(world, "alice")
    register = make_request("REGISTER", f"sip:{world.domain}", from_uri=world.aor("alice"),
                            to_uri=world.aor("alice"))
    sent = alice.protect(register).message
    ok = make_response(sent, 200, "OK", [(hdr.PROXY_BODY_POLICY,
                                          f'{TRUSTED};view="MESSAGE:*";cert-url="http://attacker.example.net/c"')])
    alice.open(ok)
    assert all(w.url is None or "attacker" not in w.url for w in alice.certificates_wanted())


# == insider UA =================================================================

def test_insider_cannot_hide_text_from_the_archive_behind_a_decoy(world):
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",))
    original = message(world)
    signer = (world.user("alice").cert, world.user("alice").key)
    decoy, _ = protect_content("text/plain", b"Lunch at noon?",
                               [recipient_for_certificate(world.user("bob").cert),
                                recipient_for_certificate(world.proxy(TRUSTED).cert)],
                               signer=signer, content_id="decoy@example.com", bind_to=original)
    real, _ = protect_content("text/plain", b"The real plan.",
                              [recipient_for_certificate(world.user("bob").cert)],
                              signer=signer, content_id="real@example.com", bind_to=original)
    sent = with_entity(original, mime.multipart_mixed([decoy, real])).add(
        hdr.PROXY_REQUIRED_BODY, hdr.format_proxy_required_body(hdr.BodyLabel(TRUSTED, ("decoy@example.com",))))
    verdict = proxy.inspect(sent)
    assert verdict.action == "reply" and verdict.code == 496


def test_sealed_keys_cannot_show_bob_another_session_than_the_proxy_saw(world):
    """The insider gives the proxy one session and, among the keys sealed for bob, a
    c= line that moves the media elsewhere: bob gets the SDP the proxy read, plus
    keying lines only, or nothing."""
    bob = ua_engine(world, "bob")
    assert isinstance(_refused(bob, hostile.split_views_differ(world)), InconsistentSplitError)
    # and an SDP the proxy read that holds keys as well: refused, not merged
    msg = invite(world, SRTP_OFFER, call_id="x4")
    view, keys = separate_keys(SRTP_OFFER)
    entity, _ = protect_content(
        "application/sdp", SRTP_OFFER,
        [recipient_for_certificate(world.user("bob").cert),
         recipient_for_certificate(world.proxy(TRUSTED).cert)],
        signer=(world.user("alice").cert, world.user("alice").key), bind_to=msg,
        readers=[TRUSTED],
        sealed_keys=seal_keys(keys, recipient_for_certificate(world.user("bob").cert)).der)
    assert isinstance(_refused(bob, with_entity(msg, entity).add(hdr.PROXY_REQUIRED_BODY, TRUSTED)),
                      InconsistentSplitError)


def test_sealed_keys_open_for_the_peer_alone(world):
    """Keys sealed for bob and the proxy (an insider's, or a buggy sender's) are refused:
    a key the proxy holds is no place for bob's keys in the answer either."""
    bob = ua_engine(world, "bob")
    msg = invite(world, SRTP_OFFER, call_id="x5")
    view, keys = separate_keys(SRTP_OFFER)
    both = [recipient_for_certificate(world.user("bob").cert),
            recipient_for_certificate(world.proxy(TRUSTED).cert)]
    entity, _ = protect_content(
        "application/sdp", view, both,
        signer=(world.user("alice").cert, world.user("alice").key), bind_to=msg,
        readers=[TRUSTED], sealed_keys=seal(keys.encode(), both).der)
    assert isinstance(_refused(bob, with_entity(msg, entity).add(hdr.PROXY_REQUIRED_BODY, TRUSTED)),
                      InconsistentSplitError)


def test_nested_plaintext_sdp_is_a_downgrade(world):
    bob = ua_engine(world, "bob")
    offer = invite(world)
    inner = mime.multipart_mixed([mime.parse_entity(mime.inner_entity("application/sdp", offer.body))])
    # an S/MIME part that makes the body look protected, for someone else entirely
    junk, _ = protect_content("text/plain", b"x", [recipient_for_certificate(world.user("carol").cert)],
                              handling="optional")
    sent = with_entity(offer, mime.multipart_mixed([inner, junk]))
    error = _refused(bob, sent)
    assert answer_for(error, "ua").code in (488, 400, 493)


def test_a_response_signed_by_someone_else_is_refused(world):
    alice = ua_engine(world, "alice")
    sent = alice.protect(invite(world)).message
    reply = make_response(sent, 200, "OK", [("Contact", "<sip:bob@127.0.0.1:5062>")],
                          b"", None).replace("To", f"<{world.aor('bob')}>;tag=b1")
    entity, _ = protect_content("application/sdp", EVIL_SDP,
                                [recipient_for_certificate(world.user("alice").cert)],
                                signer=(world.user("mallory").cert, world.user("mallory").key),
                                bind_to=reply)
    _refused(alice, with_entity(reply.with_body(b"x", "application/sdp"), entity))


def test_a_496_certificate_never_replaces_a_configured_proxys(world):
    """A 496 'from' the configured proxy host with another certificate of the same CA
    for that name (a rogue issuance) must not replace the pinned one."""
    pinned = known_proxy(world, TRUSTED, SDP_VIEW)
    alice = ua_engine(world, "alice", proxies=(pinned,))
    from e2m_plugins.testpki import issue_proxy
    rogue = issue_proxy(world.ca, TRUSTED)
    sent = alice.protect(invite(world)).message
    refusal = make_response(sent, 496, "Proxy Indecipherable",
                            [("Warning", f'380 {TRUSTED} "Required to view \'application/sdp\'"')],
                            rogue.cert.public_bytes(Encoding.DER), "application/pkix-cert")
    alice.react(refusal, invite(world))
    assert alice.certs.proxy(TRUSTED).public_bytes(Encoding.DER) == \
        pinned.certificate.public_bytes(Encoding.DER)
