"""Flows A-F of the protocol digest §6 on the wire.

alice (SIPp, bodies made by her UA engine) -> visited proxy (Kamailio, plain routing,
untrusted) -> home proxy (Kamailio, E2M, archive) -> bob (a binary-safe UDP peer whose
answers bob's UA engine makes).  Each test checks what arrived byte-exact, what the
home proxy archived, and that the untrusted hop saw and changed nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.flows import CRYPTO, SDP_ANSWER, SDP_OFFER, SRTP_OFFER, TRUSTED, answer, invite, known_proxy, message, ua_engine
from e2m_lab.kamailio_harness import ProxyHandle, RawUas, udp_send
from e2m_lab.sipp import register, send_with_sipp

from e2m_plugins.headers import PROXY_BODY_POLICY, PROXY_REQUIRED_BODY, parse_policy_headers
from e2m_plugins.sip import RequestLine, SipMessage, make_response

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]

TEXT = b"Hello. This is confidential."
SDP_VIEW = ("INVITE:application/sdp",)


@dataclass
class World:
    home: ProxyHandle
    visited: ProxyHandle
    bob_uas: RawUas


def _world(proxy_factory, sipp, raw_uas, **home_settings) -> World:
    home = proxy_factory("home", e2m=True, **home_settings)
    visited = proxy_factory("visited", e2m=False, next_hop=home.uri)
    register(home, "bob", raw_uas.port, sipp)
    return World(home, visited, raw_uas)


def bob_answers(bob, uas: RawUas, sdp: bytes = SDP_ANSWER) -> Callable[[SipMessage], SipMessage]:
    """Bob's UA: open the INVITE, answer with his SDP protected by his engine (which
    reuses the offer's CEK when it can, Flow C); 200 to everything else."""
    def respond(request: SipMessage) -> SipMessage:
        if request.method != "INVITE":
            return make_response(request, 200, "OK")
        opened = bob.open(request).message
        reply = answer(opened, sdp, to_tag=secrets.token_hex(4))   # one per dialog, as phones do
        reply = reply.replace("Contact", f"<sip:bob@127.0.0.1:{uas.port}>")
        return bob.protect(reply).message
    return respond


# -- Flow D: MESSAGE archived as plaintext, ciphertext untouched -------------------------

def test_flow_d_message_archived_at_home_untouched_by_the_visited_hop(
        proxy_factory, sipp, raw_uas, pki, tmp_path):
    world = _world(proxy_factory, sipp, raw_uas, view=("MESSAGE:*",), verify=("MESSAGE:*",))
    alice = ua_engine(pki, "alice",
                      proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",), ("MESSAGE:*",)),))
    bob = ua_engine(pki, "bob")
    sent = alice.protect(message(pki, TEXT))
    assert sent.info.encrypted and sent.info.signed and TEXT not in sent.message.body

    result = send_with_sipp(sipp, world.visited.port, sent.message, expect=200, workdir=tmp_path)
    assert result.rc == 0, result.output[-800:]

    (got,) = raw_uas.wait_for(1, method="MESSAGE")
    assert got.body == sent.message.body                                 # byte-exact
    assert got.get_all(PROXY_REQUIRED_BODY) == sent.message.get_all(PROXY_REQUIRED_BODY)
    assert bob.open(got).message.body == TEXT

    (row,) = world.home.archive_rows()
    assert row.plaintext == TEXT and row.content_type == "text/plain"
    assert row.method == "MESSAGE" and row.direction == "request"
    assert row.signature == "valid" and row.signer == pki.aor("alice")
    assert row.from_uri == pki.aor("alice") and row.to_uri == pki.aor("bob")
    # The untrusted hop keeps no archive and never logs the text; nor does home.
    assert world.visited.archive_path is None
    for proxy in (world.home, world.visited):
        assert TEXT.decode() not in proxy.log_since(0)


# -- Flow B: 496 with the certificate, then the retry passes ---------------------------

def test_flow_b_496_with_certificate_and_warning_then_retry(proxy_factory, sipp, raw_uas, pki,
                                                            tmp_path):
    world = _world(proxy_factory, sipp, raw_uas)
    alice = ua_engine(pki, "alice")                      # knows nothing of the proxy yet
    plain = invite(pki)
    first = alice.protect(plain)
    assert first.info.readable_by == ()

    # on alice's own branch: her engine follows answers to what it sent (review 92)
    refusal = udp_send(world.visited.port, first.message, keep_branch=True)
    assert refusal is not None and refusal.status == 496
    assert refusal.get("Content-Type") == "application/pkix-cert"
    assert refusal.body == pki.proxy(TRUSTED).cert.public_bytes(Encoding.DER)
    assert refusal.get("Warning") == f"380 {TRUSTED} \"Required to view 'application/sdp'\""
    assert refusal.get(PROXY_BODY_POLICY)
    assert raw_uas.wait_for(1, timeout=0.3, method="INVITE") == []   # it went no further

    reaction = alice.react(refusal, plain)
    assert reaction.action == "retry" and reaction.learned == TRUSTED
    bob = ua_engine(pki, "bob")
    raw_uas.responder = bob_answers(bob, raw_uas)
    result = send_with_sipp(sipp, world.visited.port, reaction.request, workdir=tmp_path)
    assert result.rc == 0, result.output[-800:]
    (got,) = raw_uas.wait_for(1, method="INVITE")
    assert got.body == reaction.request.body
    requests = [r for r in world.home.archive_rows() if r.direction == "request"]
    assert [r.plaintext for r in requests] == [SDP_OFFER]


# -- Flows A and C: encrypted SDP read by home, answer under the reused CEK ------------

def test_flows_a_and_c_offer_and_answer_read_by_home_media_recorded_keys_dropped_on_bye(
        proxy_factory, sipp, raw_uas, pki, tmp_path):
    world = _world(proxy_factory, sipp, raw_uas, view=SDP_VIEW)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    bob = ua_engine(pki, "bob")
    raw_uas.responder = bob_answers(bob, raw_uas)
    sent = alice.protect(invite(pki))
    assert sent.info.readable_by == (TRUSTED,) and SDP_OFFER not in sent.message.body

    result = send_with_sipp(sipp, world.visited.port, sent.message, workdir=tmp_path)
    assert result.rc == 0, result.output[-800:]
    (got,) = raw_uas.wait_for(1, method="INVITE")
    assert got.body == sent.message.body
    assert raw_uas.wait_for(1, method="BYE")

    rows = world.home.archive_rows()
    assert [(r.direction, r.method, r.plaintext) for r in rows] == [
        ("request", "INVITE", SDP_OFFER), ("response", "INVITE", SDP_ANSWER)]
    assert rows[1].status == 200
    media = world.home.media_rows()
    assert [(m["direction"], m["address"], m["port"], m["proto"]) for m in media] == [
        ("request", "127.0.0.1", 49170, "RTP/AVP"), ("response", "127.0.0.1", 3456, "RTP/AVP")]
    assert media[0]["codecs"] == "0 PCMU/8000, 8 PCMA/8000"
    log = world.home.log_since(0)
    assert "e2m media: INVITE request audio 127.0.0.1:49170 RTP/AVP" in log
    assert "e2m media: INVITE response 200 audio 127.0.0.1:3456 RTP/AVP" in log
    # The BYE ended the dialog: the CEK kept from the INVITE is gone from shared memory.
    assert world.home.htable_items() == 0


def _without_content_length(wire: bytes) -> bytes:
    head, _, body = wire.partition(b"\r\n\r\n")
    kept = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"content-length:")]
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def test_an_answer_without_content_length_over_udp_is_still_read(proxy_factory, sipp, raw_uas,
                                                                  pki, tmp_path):
    """Over UDP a response may leave out Content-Length (RFC 3261 §20.14): the body is
    the rest of the datagram.  The home proxy must still read the SDP answer; a reply
    route that trusted Content-Length to say "no body" would let it pass unread."""
    world = _world(proxy_factory, sipp, raw_uas, view=SDP_VIEW)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    answers = bob_answers(ua_engine(pki, "bob"), raw_uas)

    def respond(request: SipMessage) -> SipMessage | bytes:
        reply = answers(request)
        return _without_content_length(reply.serialize()) if request.method == "INVITE" else reply
    raw_uas.responder = respond
    result = send_with_sipp(sipp, world.visited.port, alice.protect(invite(pki)).message,
                            workdir=tmp_path)
    assert result.rc == 0, result.output[-800:]
    rows = world.home.archive_rows()
    assert [(r.direction, r.method, r.plaintext) for r in rows] == [
        ("request", "INVITE", SDP_OFFER), ("response", "INVITE", SDP_ANSWER)]
    assert [m["direction"] for m in world.home.media_rows()] == ["request", "response"]


def test_a_late_answer_in_the_ack_is_read_and_a_bare_ack_passes(proxy_factory, sipp, raw_uas,
                                                                   pki):
    """Late offer: INVITE without SDP, the offer in the 200, the answer in the ACK.  The
    home proxy reads both SDPs (the ACK because it has a body: a bare ACK is relayed
    without being read), and bob gets both ACKs, the encrypted one byte-exact."""
    view = ("INVITE:application/sdp", "ACK:application/sdp")
    home = proxy_factory("home", e2m=True, view=view)
    register(home, "bob", raw_uas.port, sipp)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, view),))
    bob = ua_engine(pki, "bob", proxies=(known_proxy(pki, TRUSTED, view),))

    def respond(request: SipMessage) -> SipMessage:
        if request.method != "INVITE":
            return make_response(request, 200, "OK")
        offer = answer(bob.open(request).message, SDP_ANSWER)      # the offer rides the 200
        offer = offer.replace("Contact", f"<sip:bob@127.0.0.1:{raw_uas.port}>")
        return bob.protect(offer).message
    raw_uas.responder = respond

    call_id = "late-offer@127.0.0.1"
    ok = udp_send(home.port, alice.protect(invite(pki, call_id=call_id).with_body(b"")).message)
    assert ok is not None and ok.status == 200, ok and (ok.status, ok.reason)
    assert alice.open(ok).message.body == SDP_ANSWER
    routes = ok.get_all("Record-Route")
    assert routes, "the home proxy stays on the dialog's path"

    def ack(body: bytes) -> SipMessage:
        bare = invite(pki, body, call_id=call_id, to_tag=ok.to_tag, method="ACK")
        bare = bare.with_start_line(RequestLine("ACK", f"sip:bob@127.0.0.1:{raw_uas.port}"))
        for route in routes:          # one proxy: the route set is its Record-Route
            bare = bare.add("Route", route)
        return bare if not body else alice.protect(bare).message
    with_answer = ack(SDP_OFFER)
    assert SDP_OFFER not in with_answer.body
    udp_send(home.port, with_answer, timeout=0.3)        # ACK: nothing comes back
    (got,) = raw_uas.wait_for(1, method="ACK")
    assert got.body == with_answer.body
    udp_send(home.port, ack(b""), timeout=0.3)
    assert len(raw_uas.wait_for(2, method="ACK")) == 2

    rows = home.archive_rows()
    assert [(r.direction, r.method, r.plaintext) for r in rows] == [
        ("response", "INVITE", SDP_ANSWER), ("request", "ACK", SDP_OFFER)]


def test_key_kept_from_the_invite_is_shared_by_all_workers(proxy_factory, sipp, raw_uas, pki,
                                                          tmp_path):
    """The INVITE and its 200 are handled by different workers often enough: with four
    workers and several calls, every answer must still be read (the htable is shared)."""
    world = _world(proxy_factory, sipp, raw_uas, view=SDP_VIEW, workers=4)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    bob = ua_engine(pki, "bob")
    raw_uas.responder = bob_answers(bob, raw_uas)
    for _ in range(3):
        result = send_with_sipp(sipp, world.visited.port, alice.protect(invite(pki)).message,
                                workdir=tmp_path)
        assert result.rc == 0, result.output[-800:]
    answers = [r for r in world.home.archive_rows() if r.direction == "response"]
    assert [r.plaintext for r in answers] == [SDP_ANSWER] * 3


# -- Flow F: split SDP, SRTP keys never reach the proxy ------------------------------------

def test_flow_f_split_sdp_srtp_keys_stay_end_to_end(proxy_factory, sipp, raw_uas, pki, tmp_path):
    world = _world(proxy_factory, sipp, raw_uas, view=SDP_VIEW)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    bob = ua_engine(pki, "bob")
    opened: list[bytes] = []
    answering = bob_answers(bob, raw_uas)

    def respond(request: SipMessage) -> SipMessage:
        if request.method == "INVITE":
            opened.append(ua_engine(pki, "bob").open(request).message.body)
        return answering(request)
    raw_uas.responder = respond

    sent = alice.protect(invite(pki, SRTP_OFFER))
    assert sent.info.split
    result = send_with_sipp(sipp, world.visited.port, sent.message, workdir=tmp_path)
    assert result.rc == 0, result.output[-800:]
    assert opened == [SRTP_OFFER]                           # bob got the keys
    (row, *_) = world.home.archive_rows()
    assert b"m=audio 49170 RTP/SAVP" in row.plaintext
    for archived in world.home.archive_rows():
        assert b"a=crypto" not in archived.plaintext          # the proxy never did
    assert CRYPTO.strip().decode() not in world.home.log_since(0)


# -- Flow E: 495 for an unsigned body, then the signed retry ----------------------------

def test_flow_e_495_then_signed_retry(proxy_factory, sipp, raw_uas, pki, tmp_path):
    world = _world(proxy_factory, sipp, raw_uas, view=("MESSAGE:*",), verify=("MESSAGE:*",))
    # a UA set not to sign (bodies are signed by default) learns from the 495
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),),
                      sign=False)
    plain = message(pki, TEXT)
    unsigned = alice.protect(plain)
    assert not unsigned.info.signed
    refusal = udp_send(world.visited.port, unsigned.message, keep_branch=True)
    assert refusal is not None and refusal.status == 495 and refusal.body == b""

    retry = alice.react(refusal, plain)
    assert retry.action == "retry"
    result = send_with_sipp(sipp, world.visited.port, retry.request, workdir=tmp_path)
    assert result.rc == 0, result.output[-800:]
    (row,) = world.home.archive_rows()
    assert row.signature == "valid" and row.plaintext == TEXT


def test_policy_header_reaches_the_called_ua_and_the_cert_url_matches(
        proxy_factory, sipp, raw_uas, pki, tmp_path):
    world = _world(proxy_factory, sipp, raw_uas, view=("MESSAGE:*",))
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))
    result = send_with_sipp(sipp, world.visited.port, alice.protect(message(pki, TEXT)).message,
                            workdir=tmp_path)
    assert result.rc == 0, result.output[-800:]
    (got,) = raw_uas.wait_for(1, method="MESSAGE")
    (policy,) = parse_policy_headers(got.get_all(PROXY_BODY_POLICY))
    assert policy.is_for(TRUSTED) and policy.cert_url == world.home.cert_url
    with urllib.request.urlopen(policy.cert_url, timeout=5) as fetched:
        assert hashlib.sha256(fetched.read()).digest() == policy.cert_fingerprint
