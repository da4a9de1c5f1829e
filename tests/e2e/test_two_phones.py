"""Two E2M softphones (``e2m-phone`` processes on real pjsua2) through two real
Kamailio proxies: alice reaches her home proxy (trusted: E2M, archive) through a
visited proxy (untrusted, plain routing); bob is registered at home.

Evidence is taken from the home proxy's archive (SQLite), the phones' JSON events
and a loopback capture; nothing is asserted by construction.
"""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from e2m_lab.kamailio_harness import UdpResponder
from e2m_lab.phones import run_phone
from e2m_lab.capture import contains_key, key_witnesses

from e2m_plugins import sip
from e2m_plugins.testpki import issue_proxy, make_ca

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2]   # tcpdump: the tests with a capture

BOB = "sip:bob@example.com"
ALICE = "sip:alice@example.com"
PROXY_HOST = "proxy.example.com"


def archive_rows(home, sql: str, *args):
    with sqlite3.connect(home.archive_path) as db:
        return db.execute(sql, args).fetchall()


def texts_archived(home) -> list[bytes]:
    return [bytes(r[0]) for r in archive_rows(home, "SELECT plaintext FROM bodies WHERE method = 'MESSAGE'")]


# --------------------------------------------------------------------------- register

def test_register_learns_the_home_policy_and_fetches_its_certificate(ua_config, proxies):
    home, _ = proxies
    result = run_phone(ua_config("alice", peer="bob", via_visited=True), "register")
    assert result.rc == 0, result.stderr
    (registered,) = result.of("registered")
    policy = {p["host"]: p for p in registered["policies"]}[PROXY_HOST]
    assert "MESSAGE:text/plain" in policy["view"] and "INVITE:application/sdp" in policy["view"]
    assert policy["cert_url"] == home.cert_url
    assert [e["host"] for e in result.of("proxy_certificate")] == [PROXY_HOST]
    assert not result.of("error")


# --------------------------------------------------------------------------- MESSAGE

@pytest.mark.tcpdump
def test_message_both_ways_is_archived_in_plaintext_at_home_only(ua_config, phones, proxies,
                                                                  capture):
    home, visited = proxies
    wire = capture.start(f"udp port {home.port} or udp port {visited.port}")
    bob = phones.start("bob", ua_config("bob", peer="alice"))
    alice = phones.start("alice", ua_config("alice", peer="bob", via_visited=True))
    to_bob = "to bob " + secrets.token_hex(8)
    to_alice = "to alice " + secrets.token_hex(8)

    alice.send(f"message {BOB} {to_bob}")
    sent = alice.wait("message_sent")
    got = bob.wait("message_in")
    bob.send(f"message {ALICE} {to_alice}")
    back = bob.wait("message_sent")
    got_back = alice.wait("message_in")

    assert got["text"] == to_bob and got_back["text"] == to_alice
    for event in (sent, back):
        assert event["code"] == 200 and event["attempts"] == 1
        assert event["security"]["encrypted"] and event["security"]["readable_by"] == [PROXY_HOST]
    for event, sender in ((got, ALICE), (got_back, BOB)):
        sec = event["security"]
        assert sec["encrypted"] and sec["peer"] == sender and PROXY_HOST in sec["readable_by"]
    # the trusted proxy read and archived both, in plaintext
    archived = texts_archived(home)
    assert to_bob.encode() in archived and to_alice.encode() in archived
    # ... and the CLI reads its archive without printing the text
    listing = subprocess.run([sys.executable, "-m", "e2m_plugins.cli", "archive", "list",
                              "--config", str(home.config_path)], capture_output=True, text=True)
    assert listing.returncode == 0 and "MESSAGE" in listing.stdout
    assert to_bob not in listing.stdout and to_alice not in listing.stdout
    # on the wire (both proxies' legs) neither text ever appears
    wire.stop()
    packets = wire.packets()
    assert any(b"MESSAGE sip:" in p for p in packets), "the capture saw no MESSAGE"
    assert not [p for p in packets if to_bob.encode() in p or to_alice.encode() in p]


def test_plaintext_message_to_a_phone_requiring_e2m_is_refused_488(ua_config, phones,
                                                                    proxies):
    """A plaintext MESSAGE to bob, who requires E2M, through the home proxy (which
    forwards it): bob's phone answers 488 and shows nothing.  Sent straight to bob's
    contact it never reaches that rule: 403 at the door, it did not come through the
    home proxy (review 102, stop 37)."""
    import time

    home, _ = proxies
    bob = phones.start("bob", ua_config("bob", peer="alice"))
    host, port = bob.events[0]["local"].rsplit(":", 1)
    forger = UdpResponder(lambda data: None)

    def finals() -> dict[str, int]:
        out = {}
        for data in list(forger.received):
            answer = sip.parse(data)
            if not answer.is_request and (answer.status or 0) >= 200:
                out[answer.call_id] = answer
        return out

    try:
        sent = {}
        for where, uri, to in (("straight", f"sip:bob@{host}:{port}", (host, int(port))),
                               ("home", BOB, ("127.0.0.1", home.port))):
            request = sip.make_request("MESSAGE", uri, from_uri=ALICE, to_uri=BOB,
                                       body=b"plain words", content_type="text/plain")
            via = (f"SIP/2.0/UDP 127.0.0.1:{forger.port};rport;"
                   f"branch=z9hG4bK{secrets.token_hex(6)}")
            forger.sock.sendto(request.replace("Via", via).serialize(), to)
            sent[where] = request.call_id
        bob.wait("request_refused", timeout=5)
        bob.wait("error", lambda e: e["error"] == "DowngradeError", timeout=5)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len(finals()) < 2:
            time.sleep(0.05)
    finally:
        forger.close()
    answers = finals()
    straight, through = answers[sent["straight"]], answers[sent["home"]]
    assert straight.status == 403 and "home proxy" in (straight.get("Warning") or "")
    assert through.status == 488 and "E2M protection required" in (through.get("Warning") or "")
    assert not [e for e in bob.events if e["kind"] == "message_in"]


# --------------------------------------------------------------------------- calls

@pytest.mark.tcpdump
def test_call_with_srtp_split_sdp_cek_reuse_and_hold(ua_config, phones, proxies, capture,
                                                     tmp_path: Path):
    home, visited = proxies
    # every SIP datagram of the call passes a proxy (the phones send only to theirs):
    # all of loopback's UDP also held the floods of tests running beside it, and the
    # key search over every window of every packet took this test 885 s in one CI run
    wire = capture.start(f"udp port {home.port} or udp port {visited.port}")
    witness = tmp_path / "keys.jsonl"
    env = {"E2M_PHONE_KEY_WITNESS": str(witness)}
    bob = phones.start("bob", ua_config("bob", peer="alice"), env=env)
    alice = phones.start("alice", ua_config("alice", peer="bob", via_visited=True), env=env)

    alice.send(f"call {BOB}")
    media = alice.wait("call_media", lambda e: "active" in e["audio"])
    bob_media = bob.wait("call_media", lambda e: "active" in e["audio"])
    call_id = media["call_id"]
    offer, answer = media["security"][:2]
    assert offer["what"] == "INVITE" and offer["direction"] == "tx"
    assert offer["security"]["split"] and offer["security"]["readable_by"] == [PROXY_HOST]
    assert answer["what"] == "200 INVITE" and answer["security"]["key_reuse"]
    assert answer["security"]["split"] and answer["security"]["encrypted"]
    assert bob_media["security"][1]["security"]["key_reuse"]     # bob answered under the kept CEK

    mark = alice.mark()
    alice.send("hold")
    alice.wait("call_media", lambda e: "local_hold" in e["audio"], since=mark)
    alice.send("unhold")
    alice.wait("call_media", lambda e: "active" in e["audio"], since=mark)
    mark = alice.mark()
    alice.send("hangup")
    alice.wait("call_ended", since=mark)
    bob.wait("call_ended")

    # the home proxy read every SDP: offer and answer (through the reused CEK), and the
    # re-INVITEs; its media table has both ends' real RTP ports
    rows = archive_rows(home, "SELECT method, direction, port, proto, flow FROM media "
                              "WHERE call_id = ? ORDER BY id", call_id)
    alice_rtp = int(bob_media["remote_rtp"].rsplit(":", 1)[1])
    bob_rtp = int(media["remote_rtp"].rsplit(":", 1)[1])
    assert ("INVITE", "request", alice_rtp, "RTP/SAVP", "sendrecv") in rows
    assert ("INVITE", "response", bob_rtp, "RTP/SAVP", "sendrecv") in rows
    assert any(r[0] == "INVITE" and r[1] == "request" and r[4] == "sendonly" for r in rows)
    assert len([r for r in rows if r[1] == "request"]) >= 3          # offer, hold, unhold
    # what it archived is the proxy view: no SRTP key
    sdps = [bytes(r[0]) for r in archive_rows(
        home, "SELECT plaintext FROM bodies WHERE call_id = ?", call_id)]
    assert sdps and all(b"m=audio" in s and b"a=crypto" not in s for s in sdps)

    wire.stop()
    packets = wire.packets()
    witnesses = key_witnesses(witness)
    assert len(witnesses) >= 4       # both phones' offers/answers, re-INVITEs
    sip_packets = [p for p in packets if b"SIP/2.0" in p]
    assert any(b"INVITE sip:" in p for p in sip_packets)
    for line in (b"v=0\r\n", b"m=audio", b"a=rtpmap", b"a=crypto", b"inline:"):
        assert not [p for p in packets if line in p], f"{line!r} seen in plaintext on the wire"
    for w in witnesses:
        assert not any(contains_key(p, w) for p in packets), "an SRTP key crossed the wire"


def test_the_command_line_call_with_hold_holds_and_unholds(ua_config, phones, proxies):
    """``e2m-phone call TO --hold``: both re-INVITEs go through, protected, and the home
    proxy reads the sendonly and the sendrecv offers."""
    home, _ = proxies
    phones.start("bob", ua_config("bob", peer="alice"))
    result = run_phone(ua_config("alice", peer="bob", via_visited=True),
                       "call", BOB, "--seconds", "2", "--hold")
    assert result.rc == 0, result.stderr
    (info,) = [e for e in result.of("info") if "hold" in e]
    assert info["hold"] and info["unhold"]
    call_id = result.of("call_started")[-1]["call_id"]
    flows = [r[0] for r in archive_rows(home, "SELECT flow FROM media WHERE call_id = ? AND "
                                              "direction = 'request' ORDER BY id", call_id)]
    assert flows[-2:] == ["sendonly", "sendrecv"], flows


def test_496_discovery_when_the_policy_was_not_learnt(ua_config, phones, proxies):
    home, _ = proxies
    bob = phones.start("bob", ua_config("bob", peer="alice"))
    config = ua_config("alice", peer="bob", via_visited=True,
                       e2m={"accept_policy_headers": False})
    text = "discovered " + secrets.token_hex(8)
    result = run_phone(config, "message", BOB, text)
    assert result.rc == 0, result.stderr
    (answer,) = result.of("e2m_answer")
    assert answer["code"] == 496 and answer["action"] == "retry" and answer["learned"] == PROXY_HOST
    (sent,) = result.of("message_sent")
    assert sent["attempts"] == 2 and sent["security"]["readable_by"] == [PROXY_HOST]
    assert bob.wait("message_in")["text"] == text
    assert texts_archived(home).count(text.encode()) == 1

    call = run_phone(config, "call", BOB, "--seconds", "1")
    assert call.rc == 0, call.stderr
    assert [e["code"] for e in call.of("e2m_answer")] == [496]
    assert [e["attempt"] for e in call.of("call_started")] == [1, 2]
    assert call.of("call_ended")[-1]["media_was_active"]


@pytest.mark.parametrize("forgery", ["other-host", "untrusted-ca", "expired"])
def test_forged_496_is_refused_and_nothing_goes_out_in_plaintext(ua_config, e2e_pki, forgery):
    from datetime import datetime, timedelta, timezone

    from cryptography.hazmat.primitives.serialization import Encoding

    if forgery == "other-host":
        cred = issue_proxy(e2e_pki.ca, "evil.example.org")
    elif forgery == "untrusted-ca":
        cred = issue_proxy(make_ca("Evil CA"), PROXY_HOST)
    else:
        past = datetime.now(timezone.utc) - timedelta(days=30)
        cred = issue_proxy(e2e_pki.ca, PROXY_HOST, not_before=past - timedelta(days=1),
                           not_after=past)
    der = cred.cert.public_bytes(Encoding.DER)

    def answer(data: bytes) -> bytes:
        request = sip.parse(data)
        return sip.make_response(request, 496, "Proxy Indecipherable",
                                 [("Warning", f"380 {PROXY_HOST} \"Required to view 'text/plain'\"")],
                                 der, "application/pkix-cert").serialize()

    forger = UdpResponder(answer)
    try:
        config = ua_config("alice", peer="bob", registrar=False, phone={"proxy": forger.uri})
        text = "forged " + secrets.token_hex(8)
        result = run_phone(config, "message", BOB, text)
    finally:
        forger.close()
    assert result.rc == 1
    assert "message failed: 496 not followed" in result.stderr
    (failed,) = result.of("message_failed")
    assert failed["code"] == 496 and failed["attempts"] == 1
    requests = [d for d in forger.received if d.startswith(b"MESSAGE ")]
    assert len(requests) == 1                              # no retry
    assert not [d for d in forger.received if text.encode() in d]
    assert b"application/pkcs7-mime" in requests[0]
