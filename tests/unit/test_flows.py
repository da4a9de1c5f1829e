"""Flows A-F of the protocol digest §6, in memory: alice's UA engine -> an
untrusted proxy (no policy) -> the trusted proxy (with policy) -> bob's UA
engine, and back.  Each test asserts who could read what at every hop."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from e2m_lab.flows import CRYPTO, SDP_ANSWER, SDP_OFFER, SRTP_ANSWER, SRTP_OFFER, TRUSTED, UNTRUSTED, SipPath, answer, invite, known_proxy, message, proxy_engine, ua_engine

from e2m_plugins import mime
from e2m_plugins.body import message_body, open_part, top_parts
from e2m_plugins.cms.recipients import CertificateKey
from e2m_plugins.errors import DowngradeError, NoMatchingRecipientError, UntrustedSignerError
from e2m_plugins.headers import PROXY_BODY_POLICY, PROXY_REQUIRED_BODY
from e2m_plugins.keycache import DialogScope
from e2m_plugins.testpki import init_test_pki, issue_proxy, make_ca
from e2m_plugins.proxy import ProxyEngine
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.sip_errors import answer_for

SDP_VIEW = ("INVITE:application/sdp",)


@pytest.fixture(scope="module")
def world():
    """A PKI with alice, bob, carol and both proxies; RSA keys are slow, so one per module."""
    return init_test_pki(None, proxy_hosts=(TRUSTED, UNTRUSTED), users=("alice", "bob", "carol"))


def path_with(world, view=SDP_VIEW, verify=()):
    untrusted = proxy_engine(world, UNTRUSTED)
    trusted = proxy_engine(world, TRUSTED, view=view, verify=verify)
    return SipPath([untrusted, trusted]), untrusted, trusted


def assert_unreadable_by(world, host, msg):
    """``host``'s own key opens no part of the body."""
    key = CertificateKey(world.proxy(host).cert, world.proxy(host).key)
    for part in top_parts(message_body(msg)):
        with pytest.raises(NoMatchingRecipientError):
            open_part(part, [key], trust_anchors=(world.ca.cert,))


# -- Flow A -------------------------------------------------------------------

def test_flow_a_shared_invite_read_by_trusted_proxy_and_bob_only(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    path, _, _ = path_with(world)

    sent = alice.protect(invite(world))
    assert sent.info.encrypted and sent.info.readable_by == (TRUSTED,)
    assert SDP_OFFER not in sent.message.serialize()
    labels = sent.message.get_all(PROXY_REQUIRED_BODY)
    assert len(labels) == 1 and labels[0].startswith(TRUSTED + ";cid=")

    trip = path.request(sent.message)
    assert trip.seen_by(UNTRUSTED) == []
    (seen,) = trip.seen_by(TRUSTED)
    assert seen.plaintext == SDP_OFFER and seen.content_type == "application/sdp"
    media = trip.hops[1].verdict.media
    assert [(m.address, m.port) for m in media] == [("127.0.0.1", 49170)]
    assert trip.delivered.body == sent.message.body      # no proxy altered the body
    assert_unreadable_by(world, UNTRUSTED, trip.delivered)

    opened = bob.open(trip.delivered)
    assert opened.message.body == SDP_OFFER
    assert opened.message.get("Content-Type") == "application/sdp"
    assert opened.info.encrypted and TRUSTED in opened.info.readable_by


def test_trusted_proxy_announces_its_policy_toward_the_uas(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    path, _, trusted = path_with(world)
    trip = path.request(alice.protect(invite(world)).message)
    policies = trip.delivered.get_all(PROXY_BODY_POLICY)
    assert policies == [trusted.policy_header()[1]]


# -- Flow B -------------------------------------------------------------------

def test_flow_b_discovery_by_496_then_retry(world):
    alice = ua_engine(world, "alice")
    bob = ua_engine(world, "bob")
    path, _, _ = path_with(world)
    plain = invite(world)

    first = alice.protect(plain)
    assert first.info.readable_by == ()
    trip = path.request(first.message)
    refusal = trip.reply
    assert refusal.status == 496
    assert refusal.get("Content-Type") == "application/pkix-cert"
    assert refusal.get("Warning") == f"380 {TRUSTED} \"Required to view 'application/sdp'\""
    assert refusal.get(PROXY_BODY_POLICY)
    assert trip.hops[0].verdict.action == "forward"     # the untrusted hop let it pass

    reaction = alice.react(refusal, plain)
    assert reaction.action == "retry" and reaction.learned == TRUSTED
    assert reaction.request.cseq == (2, "INVITE")
    assert reaction.request.get("Via") != plain.get("Via")     # a new transaction
    trip = path.request(reaction.request)
    assert trip.reply is None
    assert [s.plaintext for s in trip.seen_by(TRUSTED)] == [SDP_OFFER]
    assert bob.open(trip.delivered).message.body == SDP_OFFER


def test_flow_b_message_logging_needs_whole_body_so_no_warning(world):
    alice = ua_engine(world, "alice")
    path, _, _ = path_with(world, view=("MESSAGE:*",))
    plain = message(world)
    trip = path.request(alice.protect(plain).message)
    assert trip.reply.status == 496 and trip.reply.get("Warning") is None
    retry = alice.react(trip.reply, plain)
    trip = path.request(retry.request)
    assert [s.plaintext for s in trip.seen_by(TRUSTED)] == [b"Hello. This is confidential."]


def test_proactive_policy_from_register_200_needs_no_496(world):
    """The policy header on REGISTER 200 plus the certificate from its URL: the
    first INVITE is already readable by the proxy (no 496 round trip)."""
    alice = ua_engine(world, "alice")
    path, _, trusted = path_with(world)
    sent = alice.protect(invite(world, method="REGISTER").with_body(b"")).message
    register = make_response(sent, 200, "OK", [trusted.policy_header()])
    # the same answer to a REGISTER alice never sent teaches nothing
    assert alice.learn(make_response(invite(world, method="REGISTER"), 200, "OK",
                                     [trusted.policy_header()])) == []
    assert alice.learn(register) == [TRUSTED]
    (wanted,) = alice.certificates_wanted()
    assert wanted.host == TRUSTED and wanted.url and wanted.fingerprint
    alice.add_proxy_certificate(TRUSTED, trusted.certificate_der)   # as fetched from the URL
    assert alice.certificates_wanted() == []

    trip = path.request(alice.protect(invite(world)).message)
    assert trip.reply is None
    assert [s.plaintext for s in trip.seen_by(TRUSTED)] == [SDP_OFFER]


def test_policy_certificate_must_match_announced_fingerprint(world):
    alice = ua_engine(world, "alice")
    _, _, trusted = path_with(world)
    options = make_request("OPTIONS", f"sip:{world.domain}", from_uri=world.aor("alice"),
                           to_uri=world.aor("alice"))
    sent = alice.protect(options).message
    assert alice.learn(make_response(sent, 200, "OK", [trusted.policy_header()])) == [TRUSTED]
    other = issue_proxy(world.ca, TRUSTED)      # right name, right CA, another key
    from cryptography.hazmat.primitives.serialization import Encoding
    from e2m_plugins.errors import CertificateRejectedError
    with pytest.raises(CertificateRejectedError, match="fingerprint"):
        alice.add_proxy_certificate(TRUSTED, other.cert.public_bytes(Encoding.DER))
    assert alice.certificates_wanted()[0].host == TRUSTED


@pytest.mark.parametrize("forgery", ["other-host", "untrusted-ca", "expired"])
def test_forged_496_is_refused_and_nothing_is_sent(world, forgery):
    alice = ua_engine(world, "alice")
    plain = message(world)
    if forgery == "other-host":
        cred = world.proxy(UNTRUSTED)
    elif forgery == "untrusted-ca":
        cred = issue_proxy(make_ca("Evil CA"), TRUSTED)
    else:
        past = datetime.now(timezone.utc) - timedelta(days=30)
        cred = issue_proxy(world.ca, TRUSTED, not_before=past - timedelta(days=1),
                           not_after=past)
    from cryptography.hazmat.primitives.serialization import Encoding
    forged = make_response(alice.protect(plain).message, 496, "Proxy Indecipherable",
                           [("Warning", f"380 {TRUSTED} \"Required to view 'text/plain'\"")],
                           cred.cert.public_bytes(Encoding.DER), "application/pkix-cert")
    reaction = alice.react(forged, plain)
    assert reaction.action == "fail" and reaction.request is None
    assert alice.certs.proxy(TRUSTED) is None
    assert alice.protect(plain).info.readable_by == ()     # still for bob only


# -- Flow C -------------------------------------------------------------------

def test_flow_c_cek_reuse_lets_the_proxy_read_the_answer_and_reinvite(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    path, _, trusted = path_with(world)

    trip = path.request(alice.protect(invite(world)).message)
    assert len(trusted.cache) == 1                    # the INVITE's CEKReference kept
    delivered = bob.open(trip.delivered).message

    reply = bob.protect(answer(delivered))
    assert reply.info.key_reuse                       # kekri, no certificate needed
    back = path.response(reply.message)
    assert [s.plaintext for s in back.seen_by(TRUSTED)] == [SDP_ANSWER]
    assert back.seen_by(UNTRUSTED) == []
    opened = alice.open(back.delivered)
    assert opened.message.body == SDP_ANSWER and opened.info.key_reuse

    # re-INVITE inside the dialog: still under the reused key, still readable by the proxy
    reinvite = invite(world, call_id=delivered.call_id, cseq=2, to_tag="b1",
                      sdp=SDP_OFFER.replace(b"a=rtpmap:8", b"a=sendonly\r\na=rtpmap:8"))
    again = alice.protect(reinvite)
    assert again.info.key_reuse
    trip = path.request(again.message)
    assert trip.seen_by(TRUSTED)[0].plaintext.count(b"a=sendonly") == 1
    assert b"sendonly" in bob.open(trip.delivered).message.body

    # BYE ends the dialog: every kept key goes, at the proxy and at both UAs
    bye = invite(world, call_id=delivered.call_id, cseq=3, to_tag="b1", method="BYE", sdp=b"")
    bye = bye.with_body(b"")
    path.request(alice.protect(bye).message)
    bob.open(bye)
    bob.protect(make_response(bye, 200, "OK"))     # bob's stack accepts it: his keys go
    assert len(trusted.cache) != 0                 # (the proxy's wait for that 200)
    trusted.end_answered("BYE", 200, bye.call_id, bye.from_tag, bye.to_tag)
    assert len(trusted.cache) == 0
    assert len(alice.dialog_keys) == 0 and len(bob.dialog_keys) == 0


def _kept_dialog(world, trusted, call_id):
    """An INVITE with a CEKReference and its kekri answer through ``trusted``: one
    confirmed dialog with a kept key.  Returns the INVITE as bob received it."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    sent = alice.protect(invite(world, call_id=call_id)).message
    trusted.inspect(sent)
    delivered = bob.open(sent).message
    assert trusted.inspect(bob.protect(answer(delivered)).message).seen
    return delivered


@pytest.mark.parametrize("method", ["BYE", "CANCEL"])
def test_a_bye_ends_its_dialogs_keys_at_its_2xx_and_nothing_ends_them_before(world, method):
    """Kamailio relays a bodiless BYE or CANCEL unread (``needs_no_reading``: inspecting
    it would only forward it) and hands the answers to its own transaction to
    ``end_answered`` with the request's ids: a BYE's 2xx ends its dialog's keys and no
    other's; the request itself, a refusal of it or a CANCEL's 200 end nothing (a BYE
    the callee refuses leaves a live call: review 92)."""
    engine = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    _kept_dialog(world, engine, "end@x")
    _kept_dialog(world, engine, "other@x")
    to_tag = "b1" if method == "BYE" else None
    ending = invite(world, call_id="end@x", cseq=2 if method == "BYE" else 1, to_tag=to_tag,
                    method=method).with_body(b"")
    assert ProxyEngine.needs_no_reading(method, has_body=False, has_label=False,
                                        has_policy=False)
    verdict = engine.inspect(ending)
    assert (verdict.action, verdict.add_headers, verdict.remove_headers, verdict.seen) == (
        "forward", (), (), ())

    def left():
        return {scope.call_id for scope, _ in engine.cache._entries}
    ids = (ending.call_id, ending.from_tag, ending.to_tag)
    for refused in (100, 403, 481, 500):
        engine.end_answered(method, refused, *ids)
    assert left() == {"end@x", "other@x"}
    engine.end_answered(method, 200, *ids)
    # a CANCEL cannot end a confirmed dialog; a BYE's 2xx ends its own and no other
    assert left() == ({"other@x"} if method == "BYE" else {"end@x", "other@x"})


@pytest.mark.parametrize("method, status", [("MESSAGE", 200), ("INVITE", 180), ("INVITE", 200),
                                            ("BYE", 200), ("INVITE", 486)])
def test_a_response_is_skipped_unread_only_when_inspecting_it_would_do_nothing(world, method,
                                                                              status):
    trusted = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    sent = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),)).protect(
        invite(world, call_id="skip@x")).message
    trusted.inspect(sent)                       # the offer's key, under the early dialog
    request = invite(world, call_id="skip@x", method=method)
    response = make_response(request, status, "Whatever")
    assert not ProxyEngine.response_needs_reading(method, status, has_body=False,
                                                  has_policy=False)
    # what this branch's 18x could have kept (under the branch's own dialog scope)
    branch = DialogScope("skip@x", response.from_tag, response.to_tag)
    trusted.cache.put(branch, b"branch", bytes(16))
    verdict = trusted.inspect(response)
    assert (verdict.action, verdict.add_headers, verdict.seen) == ("forward", (), ())
    # no response drops a key, a failure neither: the offer's key (the early scope)
    # stays for the other branches, the branch's for a 491 to a re-INVITE; the host's
    # failure route ends the attempt when the whole INVITE failed
    assert len(trusted.cache) == 2
    assert ProxyEngine.response_needs_reading(method, status, has_body=True, has_policy=False)
    # a policy header (it may name us: review 57) is read even without a body
    assert ProxyEngine.response_needs_reading(method, status, has_body=False, has_policy=True)


def test_only_a_bare_bye_or_cancel_may_skip_the_read():
    assert not ProxyEngine.needs_no_reading("BYE", has_body=True, has_label=False,
                                            has_policy=False)
    assert not ProxyEngine.needs_no_reading("BYE", has_body=False, has_label=True,
                                            has_policy=False)
    assert not ProxyEngine.needs_no_reading("BYE", has_body=False, has_label=False,
                                            has_policy=True)
    for method in ("INVITE", "ACK", "MESSAGE", "UPDATE", "INFO"):
        assert not ProxyEngine.needs_no_reading(method, has_body=False, has_label=False,
                                                has_policy=False)


def test_key_reuse_never_crosses_dialogs(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    path, _, trusted = path_with(world)
    path.request(alice.protect(invite(world, call_id="one@x")).message)
    second = alice.protect(invite(world, call_id="two@x"))
    assert not second.info.key_reuse
    trip = path.request(second.message)
    assert trip.seen_by(TRUSTED)            # read through its own RecipientInfo


# -- Flow D -------------------------------------------------------------------

def test_flow_d_message_archiving_sign_then_encrypt(world):
    alice = ua_engine(world, "alice",
                      proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",), ("MESSAGE:*",)),))
    bob = ua_engine(world, "bob")
    path, _, _ = path_with(world, view=("MESSAGE:*",), verify=("MESSAGE:*",))
    sent = alice.protect(message(world))
    assert sent.info.signed and sent.info.encrypted
    trip = path.request(sent.message)
    (seen,) = trip.seen_by(TRUSTED)
    assert seen.plaintext == b"Hello. This is confidential."
    assert seen.signature == "valid" and seen.signer == world.aor("alice")
    opened = bob.open(trip.delivered)
    assert opened.message.body == b"Hello. This is confidential."
    assert opened.info.signed and opened.info.signers == (world.aor("alice"),)


# -- Flow E -------------------------------------------------------------------

def test_flow_e_495_then_signed_retry(world):
    # A UA set not to sign (bodies are signed by default) learns from the 495.
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),),
                      sign=False)
    path, _, _ = path_with(world, view=("MESSAGE:*",), verify=("MESSAGE:*",))
    plain = message(world)
    trip = path.request(alice.protect(plain).message)
    assert trip.reply.status == 495 and trip.reply.body == b""
    reaction = alice.react(trip.reply, plain)
    assert reaction.action == "retry"
    trip = path.request(reaction.request)
    assert trip.reply is None and trip.seen_by(TRUSTED)[0].signature == "valid"


def test_flow_e_signature_by_someone_else_is_refused_by_bob(world):
    """carol signs, alice's name is on the From: a trusted stranger is still refused."""
    carol = ua_engine(world, "carol", sign=True)
    bob = ua_engine(world, "bob", peers=("alice", "carol"))
    forged = carol.protect(message(world, sender="carol")).message
    forged = forged.replace("From", f"<{world.aor('alice')}>;tag={forged.from_tag}")
    with pytest.raises(UntrustedSignerError):
        bob.open(forged)


def test_flow_e_tampered_signed_message_gets_403_at_the_proxy(world):
    from e2m_plugins.cms.signed import sign
    alice_cred = world.user("alice")
    entity = mime.inner_entity("text/plain", b"pay 10")
    signed = mime.multipart_signed(entity, sign(entity, alice_cred.cert, alice_cred.key,
                                                detached=True))
    tampered = mime.MimePart(signed.headers, signed.body.replace(b"pay 10", b"pay 99"))
    msg = message(world).with_body(tampered.body, tampered.header("Content-Type"))
    path, _, _ = path_with(world, view=("MESSAGE:*",), verify=("MESSAGE:*",))
    trip = path.request(msg)
    assert trip.reply.status == 403


# -- Flow F -------------------------------------------------------------------

def test_flow_f_split_sdp_keeps_srtp_keys_end_to_end(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    path, _, _ = path_with(world)

    sent = alice.protect(invite(world, SRTP_OFFER))
    assert sent.info.split
    # one part: the SDP without keys for bob and the proxy, the keys sealed inside for bob
    assert sent.message.get("Content-Type").startswith("application/pkcs7-mime")
    trip = path.request(sent.message)
    (seen,) = trip.seen_by(TRUSTED)
    assert b"a=crypto" not in seen.plaintext and b"m=audio 49170 RTP/SAVP" in seen.plaintext
    opened = bob.open(trip.delivered)
    assert opened.message.body == SRTP_OFFER and opened.info.split

    # the answer is split the same way: the view under the shared key, keys under bob-alice only
    reply = bob.protect(answer(opened.message, SRTP_ANSWER))
    assert reply.info.split and reply.info.key_reuse
    back = path.response(reply.message)
    (seen,) = back.seen_by(TRUSTED)
    assert b"a=crypto" not in seen.plaintext
    assert alice.open(back.delivered).message.body == SRTP_ANSWER
    for hop in (*trip.hops, *back.hops):
        for body in hop.verdict.seen:
            assert CRYPTO.strip() not in body.plaintext


# What pjsua offers with the phone's defaults (two codecs, one SRTP suite).
PJSUA_OFFER = (b"v=0\r\no=- 3905209876 3905209876 IN IP4 127.0.0.1\r\ns=pjmedia\r\nb=AS:84\r\n"
               b"t=0 0\r\na=X-nat:0\r\nm=audio 4000 RTP/SAVP 0 8 101\r\nc=IN IP4 127.0.0.1\r\n"
               b"b=TIAS:64000\r\na=rtcp:4001 IN IP4 127.0.0.1\r\na=sendrecv\r\n"
               b"a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
               b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n"
               b"a=ssrc:1234567890 cname:7f3a9b2c4d5e6f70\r\n" + CRYPTO)


def test_a_signed_split_offer_fits_what_a_pjsip_peer_reads():
    """pjsip reads at most 4000 bytes of a message (PJSIP_MAX_PKT_LEN of the wheel).
    pjsua's own headers take about 800 and two proxies add about 450 (Via,
    Record-Route, the policy header), so the body must stay well under 2750: with
    P-256 keys a signed SRTP offer for bob and one proxy is about 2450 (the draft's
    two signed copies made it 5000, and bob answered 400)."""
    pki = init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    sent = alice.protect(invite(pki, PJSUA_OFFER)).message
    assert len(sent.body) <= 2600, len(sent.body)
    assert ua_engine(pki, "bob").open(sent).info.split


def test_srtp_keys_never_go_to_a_proxy_even_without_split_config(world):
    """With split off, an SDP with keys is not widened to proxies through reuse."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    sent = alice.protect(invite(world, SRTP_OFFER))
    assert sent.info.split   # default: split on


# -- Downgrade and plain ------------------------------------------------------

def test_plaintext_where_e2m_is_required_is_a_downgrade_488(world):
    bob = ua_engine(world, "bob")
    with pytest.raises(DowngradeError) as caught:
        bob.open(invite(world))
    assert answer_for(caught.value, "ua").code == 488


def test_plaintext_accepted_when_e2m_is_optional(world):
    bob = ua_engine(world, "bob", require_e2m=False)
    opened = bob.open(invite(world))
    assert opened.message.body == SDP_OFFER and not opened.info.encrypted


def test_missing_peer_certificate_fails_closed(world):
    from e2m_plugins.ua import MissingPeerCertificateError
    alice = ua_engine(world, "alice", peers=())
    with pytest.raises(MissingPeerCertificateError):
        alice.protect(message(world))


def test_untrusted_proxy_engine_forwards_everything_untouched(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    untrusted = proxy_engine(world, UNTRUSTED)
    sent = alice.protect(invite(world, SRTP_OFFER)).message
    verdict = untrusted.inspect(sent)
    assert verdict.action == "forward" and verdict.seen == () and verdict.media == ()
    assert verdict.add_headers == ()     # no policy, nothing to announce


def test_policies_and_496s_from_foreign_domains_are_ignored(world):
    """A hop may insert a policy header or forge a 496 for a host with a valid
    certificate from our CA; outside our domain and the peer's, it is ignored."""
    outsider = "proxy.elsewhere.test"
    alice = ua_engine(world, "alice")
    foreign = proxy_engine(world, outsider, view=("MESSAGE:*",))
    plain = message(world)
    assert alice.learn(make_response(plain, 200, "OK", [foreign.policy_header()])) == []
    refusal = SipPath([foreign]).request(alice.protect(plain).message).reply
    assert refusal.status == 496
    reaction = alice.react(refusal, plain)
    assert reaction.action == "fail" and "not a proxy we accept" in reaction.reason
    listed = ua_engine(world, "alice", accept_proxies=(outsider,))
    assert listed.react(refusal, plain).action == "none"     # it sent nothing (review 92)
    listed.protect(plain)
    assert listed.react(refusal, plain).action == "retry"


def test_493_teaches_alice_bobs_new_certificate(world):
    """alice holds an old certificate for bob; bob answers 493 with his own, alice
    checks it (SAN URI = bob, our CA) and retries; bob can read the retry."""
    from datetime import datetime, timedelta, timezone

    from e2m_plugins.testpki import issue_user
    # older than bob's current one (a 493 never brings back an older certificate)
    stale = issue_user(world.ca, world.aor("bob"),
                       not_before=datetime.now(timezone.utc) - timedelta(days=30))
    alice = ua_engine(world, "alice", peers=())
    alice.certs.add_user(world.aor("bob"), stale.cert)
    bob = ua_engine(world, "bob")
    plain = message(world)
    sent = alice.protect(plain).message
    with pytest.raises(NoMatchingRecipientError) as caught:
        bob.open(sent)
    refusal = bob.refusal(sent, caught.value)
    assert refusal.status == 493 and refusal.get("Content-Type") == "application/pkix-cert"
    reaction = alice.react(refusal, plain)
    assert reaction.action == "retry" and reaction.learned == world.aor("bob")
    assert bob.open(reaction.request).message.body == plain.body


def test_dialog_key_rolls_after_its_maximum_use_count(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),),
                      cek_max_uses=1)
    bob = ua_engine(world, "bob")
    path, _, trusted = path_with(world)
    delivered = bob.open(path.request(alice.protect(invite(world)).message).delivered).message
    first = bob.protect(answer(delivered))
    assert first.info.key_reuse
    alice.open(path.response(first.message).delivered)
    # the key is used up: the next body goes under fresh RecipientInfos and a new reference
    reinvite = invite(world, call_id=delivered.call_id, cseq=2, to_tag="b1")
    again = alice.protect(reinvite)
    assert not again.info.key_reuse
    trip = path.request(again.message)
    assert trip.seen_by(TRUSTED) and bob.open(trip.delivered).message.body == SDP_OFFER


def test_proxy_restart_mid_dialog_is_healed_by_496_and_rekeying(world):
    """The trusted proxy loses its key cache (restart): the next body under the
    reused key gets a 496, alice re-keys for bob and the proxy, and the dialog
    goes on with the proxy reading both directions again; nothing in plaintext."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    path, untrusted, _ = path_with(world)
    delivered = bob.open(path.request(alice.protect(invite(world)).message).delivered).message
    alice.open(path.response(bob.protect(answer(delivered)).message).delivered)

    restarted = proxy_engine(world, TRUSTED, view=SDP_VIEW)      # empty key cache
    path = SipPath([untrusted, restarted])
    reinvite = invite(world, call_id=delivered.call_id, cseq=2, to_tag="b1")
    sent = alice.protect(reinvite)
    assert sent.info.key_reuse
    refusal = path.request(sent.message).reply
    assert refusal.status == 496

    reaction = alice.react(refusal, reinvite)
    assert reaction.action == "retry"
    trip = path.request(reaction.request)
    assert trip.reply is None and trip.seen_by(TRUSTED)[0].plaintext == SDP_OFFER
    received = bob.open(trip.delivered).message
    back = path.response(bob.protect(answer(received)).message)
    assert [s.plaintext for s in back.seen_by(TRUSTED)] == [SDP_ANSWER]
    assert alice.open(back.delivered).message.body == SDP_ANSWER


def test_after_a_496_the_lost_key_still_opens_a_retransmission_but_is_not_reused(world):
    """The restart may also eat the ACK: bob then retransmits his 200, still under the
    key the proxy lost.  alice must open it (and ACK); she must not send under it."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    path, untrusted, _ = path_with(world)
    delivered = bob.open(path.request(alice.protect(invite(world)).message).delivered).message
    first_answer = path.response(bob.protect(answer(delivered)).message).delivered
    assert alice.open(first_answer).info.key_reuse

    path = SipPath([untrusted, proxy_engine(world, TRUSTED, view=SDP_VIEW)])  # restarted
    reinvite = invite(world, call_id=delivered.call_id, cseq=2, to_tag="b1")
    refusal = path.request(alice.protect(reinvite).message).reply
    assert refusal.status == 496 and alice.react(refusal, reinvite).action == "retry"

    assert alice.open(first_answer).message.body == SDP_ANSWER      # the retransmitted 200
    again = alice.protect(invite(world, call_id=delivered.call_id, cseq=3, to_tag="b1"))
    assert not again.info.key_reuse                                   # a fresh key, not the lost one
    trip = path.request(again.message)
    assert trip.reply is None and trip.seen_by(TRUSTED)[0].plaintext == SDP_OFFER


def test_no_answer_leaves_no_long_lived_key_at_the_proxy(world):
    """An INVITE whose far end never answers: the proxy's key expires with the
    transaction (200 s), not after the 12 h a dialog key may live; a 2xx turns
    it into a dialog key."""
    from e2m_plugins.keycache import MemoryKeyCache
    from e2m_plugins.proxy import EARLY_DIALOG_TTL
    clock = [1000.0]
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    trusted = proxy_engine(world, TRUSTED, view=SDP_VIEW,
                           cache=MemoryKeyCache(clock=lambda: clock[0]))
    sent = alice.protect(invite(world, call_id="lost@x")).message
    trusted.inspect(sent)
    assert len(trusted.cache) == 1
    clock[0] += EARLY_DIALOG_TTL + 1
    assert trusted.cache.purge_expired() == 1 and len(trusted.cache) == 0

    bob = ua_engine(world, "bob")
    sent = alice.protect(invite(world, call_id="kept@x")).message
    trusted.inspect(sent)
    reply = bob.protect(answer(bob.open(sent).message)).message
    assert trusted.inspect(reply).seen
    clock[0] += EARLY_DIALOG_TTL + 1
    trusted.cache.purge_expired()
    assert len(trusted.cache) == 1        # the confirmed dialog's key stays


def test_forget_call_drops_every_key_of_the_call(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    alice.protect(invite(world, call_id="gone@x"))
    assert alice.dialog_keys.for_call("gone@x")
    alice.forget_call("gone@x")
    assert len(alice.dialog_keys) == 0


def test_error_answers_are_neither_protected_nor_a_downgrade(world):
    """A 493's certificate or a 496 to a MESSAGE is not content the user protects:
    a UA sends it as it is and takes it in as it is, even when E2M is required."""
    from cryptography.hazmat.primitives.serialization import Encoding
    bob = ua_engine(world, "bob")
    plain = message(world)
    cert = world.user("bob").cert.public_bytes(Encoding.DER)
    refusal = make_response(plain, 493, "Undecipherable", [], cert, "application/pkix-cert")
    assert bob.protect(refusal).message.body == cert
    alice = ua_engine(world, "alice")
    assert alice.open(refusal).message.body == cert


def test_a_stripped_label_is_a_downgrade_but_a_proxy_removing_its_own_is_not(world):
    """The labelled proxies are bound into the envelope (SipBinding): a hop that
    strips Proxy-Required-Body is seen by bob (488); the trusted proxy removing its
    own label, while announcing its policy toward bob, is not."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    sent = alice.protect(invite(world)).message
    stripped = sent.remove(PROXY_REQUIRED_BODY)
    with pytest.raises(DowngradeError, match="removed on the way") as caught:
        bob.open(stripped)
    assert answer_for(caught.value, "ua").code == 488

    own = proxy_engine(world, TRUSTED, view=SDP_VIEW, remove_own_label=True)
    trip = SipPath([own]).request(alice.protect(invite(world)).message)
    assert not trip.delivered.get_all(PROXY_REQUIRED_BODY)
    assert trip.delivered.get(PROXY_BODY_POLICY)
    assert bob.open(trip.delivered).message.body == SDP_OFFER


def test_late_offer_and_update_are_protected_for_the_proxy_too(world):
    """INVITE without SDP, offer in the 200, answer in the ACK, then an UPDATE: every
    SDP is encrypted, the trusted proxy reads each one, and the ACK and the UPDATE go
    under the dialog's reused key."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob", proxies=(known_proxy(world, TRUSTED, ("INVITE:application/sdp",
                                                                          "UPDATE:application/sdp",
                                                                          "ACK:application/sdp")),))
    path, _, trusted = path_with(world, view=("INVITE:application/sdp", "UPDATE:application/sdp",
                                              "ACK:application/sdp"))
    bare = invite(world, call_id="late@x").with_body(b"")
    delivered = bob.open(path.request(alice.protect(bare).message).delivered).message

    offer = bob.protect(answer(delivered, SDP_ANSWER))            # the offer rides the 200
    back = path.response(offer.message)
    assert [s.plaintext for s in back.seen_by(TRUSTED)] == [SDP_ANSWER]
    assert alice.open(back.delivered).message.body == SDP_ANSWER

    ack = invite(world, call_id="late@x", to_tag="b1", method="ACK")   # the answer rides the ACK
    sent = alice.protect(ack)
    assert sent.info.encrypted and sent.info.key_reuse
    trip = path.request(sent.message)
    assert [s.plaintext for s in trip.seen_by(TRUSTED)] == [SDP_OFFER]
    assert bob.open(trip.delivered).message.body == SDP_OFFER

    update = invite(world, call_id="late@x", cseq=2, to_tag="b1", method="UPDATE",
                    sdp=SDP_OFFER.replace(b"49170", b"49172"))
    sent = alice.protect(update)
    assert sent.info.key_reuse
    trip = path.request(sent.message)
    assert b"49172" in trip.seen_by(TRUSTED)[0].plaintext
    assert b"49172" in bob.open(trip.delivered).message.body


def _reinvite(world, sender, receiver, call_id, cseq, from_tag, to_tag, port=b"49190"):
    return make_request("INVITE", f"sip:{receiver}@127.0.0.1:5061", from_uri=world.aor(sender),
                        to_uri=world.aor(receiver), call_id=call_id, cseq=cseq,
                        from_tag=from_tag, to_tag=to_tag,
                        body=SDP_OFFER.replace(b"49170", port), content_type="application/sdp",
                        extra_headers=[("Contact", f"<sip:{sender}@127.0.0.1:5062>")])


def _ok(request, engine):
    return engine.protect(make_response(request, 200, "OK", [("Contact", "<sip:x@127.0.0.1>")],
                                        SDP_ANSWER, "application/sdp")).message


@pytest.mark.parametrize("failure", [407, 491])
def test_a_challenged_reinvite_keeps_the_dialog_keys_so_the_answer_opens(world, failure):
    """The callee holds the call (bob's re-INVITE) and the home proxy challenges it
    (407; or alice answers 491): a failure answer to a RE-INVITE leaves the dialog as
    it was.  Before: bob's engine dropped every key of the dialog at the 407, his retry
    offered a fresh key, alice answered under a key they had shared before, and bob
    could not open the 200 (NoMatchingRecipientError: the call stuck on hold).  Only
    the keys offered in the failed request go; 481 or 408 still end the dialog."""
    proxy = known_proxy(world, TRUSTED, SDP_VIEW)
    alice = ua_engine(world, "alice", proxies=(proxy,))
    bob = ua_engine(world, "bob", proxies=(proxy,))
    trusted = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    call_id = f"held-{failure}@x"

    def through(message):                                 # every message via the proxy
        assert trusted.inspect(message).action == "forward"
        return message

    sent = through(alice.protect(invite(world, call_id=call_id)).message)
    got = bob.open(sent).message
    assert alice.open(through(bob.protect(answer(got)).message)).message.body == SDP_ANSWER
    for cseq in (2, 3):                                  # alice holds and takes it back
        mine = through(alice.protect(invite(world, call_id=call_id, cseq=cseq,
                                            to_tag="b1")).message)
        assert alice.open(through(_ok(bob.open(mine).message, bob))).message.body == SDP_ANSWER
    first = bob.protect(_reinvite(world, "bob", "alice", call_id, 7000, "b1", "a1")).message
    refused = make_response(first, failure, "Proxy Authentication Required")
    bob.open(refused)
    assert bob.dialog_keys.kept(first)                    # the dialog's keys stayed
    retry = through(bob.protect(_reinvite(world, "bob", "alice", call_id, 7001, "b1",
                                          "a1")).message)
    reply = _ok(alice.open(retry).message, alice)
    assert trusted.inspect(reply).seen
    assert bob.open(reply).message.body == SDP_ANSWER

    gone = bob.protect(_reinvite(world, "bob", "alice", call_id, 7002, "b1", "a1")).message
    bob.open(make_response(gone, 481, "Call/Transaction Does Not Exist"))
    assert bob.dialog_keys.kept(gone) == []


def test_a_failure_answer_to_nothing_we_sent_drops_no_key(world):
    """An off-path sender's forged 4xx to an INVITE of a live dialog (matching no
    request we sent) would have dropped the dialog's keys."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    sent = alice.protect(invite(world, call_id="forged-4xx@x")).message
    alice.open(bob.protect(answer(bob.open(sent).message)).message)
    forged = make_response(invite(world, call_id="forged-4xx@x", cseq=9, to_tag="b1"),
                           486, "Busy Here")
    alice.open(forged)
    assert alice.dialog_keys.kept(sent)
