"""Review 181 (attacker's review of ea96db7), the real phone: SRTP keys in a reliable 183
and the phone's PRACK, early UPDATE and re-INVITE offers from the peer (the phone as
answerer), the phone as callee behind an SDP-viewing proxy, a second fork's 200 after the
call is up, a late 200 after a failure, and a CANCEL of a ringing call.  The phone is the
stock ``e2m-phone`` (pjsua2, SRTP, E2M required) in its own process; the peer is a
``UAEngine`` on a UDP socket that knows proxy.example.com viewing ``INVITE``, ``UPDATE``,
``PRACK`` and ``ACK`` SDP; the test holds that proxy's certificate to read what it could
(``_no_key_anywhere``: no ``inline:``/``a=crypto`` on the wire nor in any envelope the
proxy's certificate opens).  No Kamailio.

Findings: none in the time given (about 20 minutes).

Controls (unmarked, pass; 12 passed in 29 s):

- ``test_control_reliable_split_183_is_pracked_without_keys``: bob's split 183 with
  ``Require: 100rel``, ``RSeq: 1``: the phone (INVITE ``Supported: 100rel``) PRACKs it
  (``RAck: 1 ...``), the PRACK carries no body, early media comes up, no error; nothing
  the phone sent holds a key.
- ``test_control_reliable_183_whose_keys_the_proxy_reads_is_refused_unpracked``: the
  same 183 sealed whole for alice and the proxy (review 179 K1's form): an ``error``
  event, no PRACK in 2 s, no media; bob's split 200 afterwards is ACKed (no hang).
- ``test_control_early_update_offer_split_is_answered_without_keys_to_the_proxy``: in
  the early dialog, bob's split UPDATE offer: the phone answers 200 with its SDP sealed
  to bob alone (bob's engine: ``readable_by=()``, signed by alice, ``split=False``), no
  key on the wire nor for the proxy.
- ``test_control_early_update_whose_keys_the_proxy_reads_is_refused``: bob's UPDATE
  keyed and sealed for alice and the proxy: answered 403, nothing keyed sent.
- ``test_control_reinvite_offer_from_the_peer_is_answered_without_keys_to_the_proxy``:
  after the call is up, bob's split re-INVITE: the phone's 200 reuses an exclusive dialog
  key (``key_reuse=True``, ``readable_by=()``), ACK taken, no error.
- ``test_control_reinvite_whose_keys_the_proxy_reads_is_refused``: answered 403.
- ``test_control_second_forks_split_200_after_the_call_is_up_is_acked_and_ended``: f2's
  split 200 after f1's call is up: ACK and BYE to f2, no keys in either.
- ``test_second_forks_200_whose_keys_the_proxy_reads_after_the_call_is_up``: f2's 200
  sealed for alice and the proxy: refused (``error``), no ACK in 3 s, no media.
- ``test_late_200_after_failure_whose_keys_the_proxy_reads``: f1's 486, then f2's 200
  sealed for alice and the proxy (``late_2xx.py`` path): refused, no ACK, ``error``.
- ``test_control_callee_refuses_an_offer_whose_keys_the_proxy_reads_and_leaks_nothing``:
  alice's INVITE sealed whole for bob's phone and the proxy (refused since 3c955cd): the
  phone answers ``403 Forbidden`` at once (one final answer in 3 s, no media, ``error``
  event), nothing keyed.
- ``test_control_callee_answers_a_split_offer_via_a_viewing_proxy_without_keys``: alice's
  split INVITE (the phone learns the proxy's reading from the INVITE): the phone's 200
  and its retransmissions are split (``split=True``, view readable by the proxy, keys
  for alice alone), no key on the wire nor for the proxy.
- ``test_control_cancel_of_a_ringing_call_leaks_no_key``: the phone with
  ``auto_answer = false``: statuses seen ``[100, 200 (CANCEL), 487, 487, 487]`` (the 487
  retransmitted: the test sends no ACK), no body keyed.

Tried and held (beyond the controls):

- The phone never sent a keyed PRACK: it has no SDP of its own to put there (the 183
  was its answer), and a PRACK with body would go through ``_protect`` like any request.
- Not checked: whether the proxy could open a kekri envelope under a dialog key it
  holds (``_no_key_anywhere`` tries only the proxy's certificate); the engine's
  ``readable_by`` and ``split`` figures above say the keys were sealed under exclusive
  keys.  Not done: a Kamailio in the path; the phone's own 180/183 (it only sends 180
  while fetching certificates, review 162); PRACK with an offer from the peer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_ANSWER, SRTP_OFFER, TRUSTED, known_proxy, ua_engine
from e2m_lab.key_checks import keys_shown, proxy_reads, sealed_whole
from e2m_lab.phone_peer import Devices, ringing_phone
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST, UdpStranger
from e2m_plugins import sip
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.pjsua2]

SDP_VIEW = ("INVITE:application/sdp", "UPDATE:application/sdp", "PRACK:application/sdp",
            "ACK:application/sdp")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review181-pki"),
                         users=("alice", "bob", "carol"), key_type="ec")


def _recipient(cert):
    return recipient_for_certificate(cert, use_ski=True)


# -- the phone as caller: bob's devices answer on a socket -----------------------------

@pytest.fixture
def ringing(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Devices, sip.SipMessage]]:
    with ringing_phone(tmp_path, pki, Devices(pki, SDP_VIEW)) as call:
        yield call


def _media(alice: PhoneProcess, since: int) -> list:
    return alice.of("call_media", since=since)


def _kinds(phone: PhoneProcess, since: int) -> list:
    return [e["kind"] for e in phone.events[since:]]


RELIABLE = (("Require", "100rel"), ("RSeq", "1"))


def _leaky(pki: TestPKI, msg: sip.SipMessage) -> sip.SipMessage:
    """bob's keyed SDP sealed whole for alice and the viewing proxy, its context naming
    the proxy (review 179 K1's form)."""
    out = sealed_whole(pki, "bob", msg, [TRUSTED],
                   [_recipient(pki.user("alice").cert), _recipient(pki.proxy(TRUSTED).cert)])
    assert any(b"inline:" in p for p in proxy_reads(pki, out))
    return out


def _split_183(bob: Devices, invite: sip.SipMessage, tag: str = "f1",
               rseq: int = 1) -> sip.SipMessage:
    sent = bob.devices[tag].protect(bob.response(
        invite, tag, 183, "Session Progress", SRTP_ANSWER,
        (("Require", "100rel"), ("RSeq", str(rseq)))))
    assert sent.info.split and b"inline:" not in sent.message.serialize()
    return sent.message


def test_control_reliable_split_183_is_pracked_without_keys(pki, ringing):
    alice, bob, invite = ringing
    mark = alice.mark()
    bob.send(_split_183(bob, invite))
    prack = bob.receive(lambda m: m.is_request and m.method == "PRACK", timeout=5)
    assert prack is not None, _kinds(alice, mark)
    assert (prack.get("RAck") or "").split()[0] == "1"
    time.sleep(0.7)
    assert not alice.of("error", since=mark), alice.of("error", since=mark)
    assert _media(alice, mark)
    assert not keys_shown(pki, bob.log)


def test_control_reliable_183_whose_keys_the_proxy_reads_is_refused_unpracked(pki, ringing):
    alice, bob, invite = ringing
    mark = alice.mark()
    leaky = _leaky(pki, bob.response(invite, "f1", 183, "Session Progress", SRTP_ANSWER,
                                     (("Require", "100rel"), ("RSeq", "1"))))
    bob.send(leaky)
    prack = bob.receive(lambda m: m.is_request and m.method == "PRACK", timeout=2)
    assert prack is None
    assert alice.of("error", since=mark) and not _media(alice, mark), _kinds(alice, mark)
    # the call goes on: bob's split 200 is taken and ACKed
    ok = bob.devices["f1"].protect(bob.response(invite, "f1", 200, "OK", SRTP_ANSWER))
    bob.send(ok.message)
    ack = bob.receive(lambda m: m.is_request and m.method == "ACK", timeout=5)
    assert ack is not None, _kinds(alice, mark)
    assert not keys_shown(pki, bob.log)


def _early(pki, alice, bob, invite):
    bob.send(_split_183(bob, invite))
    prack = bob.receive(lambda m: m.is_request and m.method == "PRACK", timeout=5)
    assert prack is not None
    time.sleep(0.3)


def _answer_to(bob: Devices, req: sip.SipMessage, timeout: float = 5.0) -> sip.SipMessage | None:
    return bob.receive(lambda m: not m.is_request and m.call_id == req.call_id
                       and (m.status or 0) >= 200
                       and (m.get("CSeq") or "") == req.get("CSeq"), timeout=timeout)


def test_control_early_update_offer_split_is_answered_without_keys_to_the_proxy(pki, ringing):
    alice, bob, invite = ringing
    _early(pki, alice, bob, invite)
    mark = alice.mark()
    offer = SRTP_ANSWER.replace(b"2890844527", b"2890844600")
    update = bob.devices["f1"].protect(bob.request(invite, "f1", "UPDATE", offer))
    assert update.info.split
    bob.send(update.message)
    answer = _answer_to(bob, update.message)
    assert answer is not None, _kinds(alice, mark)
    print("UPDATE answer", answer.status, answer.get("Content-Type"))
    assert answer.status == 200, answer.status
    assert not keys_shown(pki, bob.log)
    opened = bob.devices["f1"].open(answer)
    print("UPDATE answer info", opened.info)
    assert b"inline:" in opened.message.body        # bob reads alice's new key
    assert not opened.info.readable_by
    assert not alice.of("error", since=mark), alice.of("error", since=mark)


def test_control_early_update_whose_keys_the_proxy_reads_is_refused(pki, ringing):
    alice, bob, invite = ringing
    _early(pki, alice, bob, invite)
    update = _leaky(pki, bob.request(invite, "f1", "UPDATE",
                                     SRTP_ANSWER.replace(b"2890844527", b"2890844600")))
    bob.send(update)
    answer = _answer_to(bob, update, timeout=5)
    print("leaky UPDATE answer", answer and answer.status)
    assert answer is not None and answer.status >= 400, answer and answer.status
    assert not keys_shown(pki, bob.log)


def _up(pki, alice, bob, invite) -> None:
    ok = bob.devices["f1"].protect(bob.response(invite, "f1", 200, "OK", SRTP_ANSWER))
    assert ok.info.split
    bob.send(ok.message)
    ack = bob.receive(lambda m: m.is_request and m.method == "ACK", timeout=5)
    assert ack is not None
    time.sleep(0.5)


def test_control_reinvite_offer_from_the_peer_is_answered_without_keys_to_the_proxy(pki, ringing):
    alice, bob, invite = ringing
    _up(pki, alice, bob, invite)
    mark = alice.mark()
    offer = SRTP_ANSWER.replace(b"2890844527", b"2890844700")
    reinvite = bob.devices["f1"].protect(bob.request(invite, "f1", "INVITE", offer))
    assert reinvite.info.split
    bob.send(reinvite.message)
    answer = _answer_to(bob, reinvite.message, timeout=5)
    assert answer is not None and answer.status == 200, (answer and answer.status,
                                                         _kinds(alice, mark))
    opened = bob.devices["f1"].open(answer)
    print("re-INVITE answer info", opened.info)
    assert b"inline:" in opened.message.body and not opened.info.readable_by
    bob.send(bob.request(invite, "f1", "ACK").replace(
        "CSeq", f"{reinvite.message.get('CSeq').split()[0]} ACK"))
    time.sleep(1.0)
    assert not alice.of("error", since=mark), alice.of("error", since=mark)
    assert not keys_shown(pki, bob.log)


def test_control_reinvite_whose_keys_the_proxy_reads_is_refused(pki, ringing):
    alice, bob, invite = ringing
    _up(pki, alice, bob, invite)
    mark = alice.mark()
    reinvite = _leaky(pki, bob.request(invite, "f1", "INVITE",
                                       SRTP_ANSWER.replace(b"2890844527", b"2890844700")))
    bob.send(reinvite)
    answer = _answer_to(bob, reinvite, timeout=5)
    print("leaky re-INVITE answer", answer and answer.status, _kinds(alice, mark))
    assert answer is not None and answer.status >= 400
    assert not keys_shown(pki, bob.log)


def test_control_second_forks_split_200_after_the_call_is_up_is_acked_and_ended(pki, ringing):
    alice, bob, invite = ringing
    _up(pki, alice, bob, invite)
    mark = alice.mark()
    ok2 = bob.devices["f2"].protect(bob.response(invite, "f2", 200, "OK",
                                                 SRTP_ANSWER.replace(b"QUJD", b"RkYy")))
    bob.send(ok2.message)
    ack = bob.receive(lambda m: m.is_request and m.method == "ACK" and m.to_tag == "f2",
                      timeout=5)
    bye = bob.receive(lambda m: m.is_request and m.method == "BYE" and m.to_tag == "f2",
                      timeout=5)
    print("fork2", ack is not None, bye is not None, _kinds(alice, mark))
    assert ack is not None and bye is not None
    assert not keys_shown(pki, bob.log)


def test_second_forks_200_whose_keys_the_proxy_reads_after_the_call_is_up(pki, ringing):
    alice, bob, invite = ringing
    _up(pki, alice, bob, invite)
    mark = alice.mark()
    leaky = _leaky(pki, bob.response(invite, "f2", 200, "OK",
                                     SRTP_ANSWER.replace(b"QUJD", b"RkYy")))
    bob.send(leaky)
    ack = bob.receive(lambda m: m.is_request and m.method == "ACK" and m.to_tag == "f2",
                      timeout=3)
    time.sleep(0.5)
    print("leaky fork2", ack is not None, _kinds(alice, mark))
    assert alice.of("error", since=mark)
    assert len(_media(alice, mark)) == 0
    assert not keys_shown(pki, bob.log)


def test_late_200_after_failure_whose_keys_theproxy_reads(pki, ringing):
    alice, bob, invite = ringing
    mark = alice.mark()
    bob.send(bob.response(invite, "f1", 486, "Busy Here"))
    assert bob.receive(lambda m: m.is_request and m.method == "ACK", timeout=5) is not None
    leaky = _leaky(pki, bob.response(invite, "f2", 200, "OK",
                                     SRTP_ANSWER.replace(b"QUJD", b"RkYy")))
    bob.send(leaky)
    ack = bob.receive(lambda m: m.is_request and m.method == "ACK" and m.to_tag == "f2",
                      timeout=3)
    time.sleep(0.5)
    print("late leaky", ack is not None, _kinds(alice, mark))
    assert ack is None and alice.of("error", since=mark)
    assert not keys_shown(pki, bob.log)


# -- the phone as callee: alice is an engine on a socket --------------------------------

@pytest.fixture
def callee(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


@pytest.fixture
def silent_callee(tmp_path: Path, pki: TestPKI,
                  request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request, auto_answer=False)


def _alice_invite(pki: TestPKI, phone: PhoneProcess, peer: UdpStranger) -> sip.SipMessage:
    via = f"{HOST}:{peer.local_port}"
    return sip.make_request("INVITE", f"sip:bob@{HOST}:{phone.port}", from_uri=pki.aor("alice"),
                            to_uri=pki.aor("bob"), via_host=via, body=SRTP_OFFER,
                            content_type="application/sdp",
                            extra_headers=[("Contact", f"<sip:alice@{via}>")])


def _collect(peer: UdpStranger, call_id: str, seconds: float) -> list[bytes]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for data in peer.drain(0.2):
            if sip.parse(data).call_id == call_id:
                out.append(data)
    return out


def test_control_callee_refuses_an_offer_whose_keys_the_proxy_reads_and_leaks_nothing(
        pki, callee):
    peer = UdpStranger(callee.port)
    try:
        plain = _alice_invite(pki, callee, peer)
        leaky = sealed_whole(pki, "alice", plain, [TRUSTED],
                             [_recipient(pki.user("bob").cert),
                              _recipient(pki.proxy(TRUSTED).cert)])
        assert any(b"inline:" in p for p in proxy_reads(pki, leaky))
        mark = callee.mark()
        started = time.monotonic()
        peer.send(leaky.serialize())
        got = _collect(peer, plain.call_id, 3.0)
        finals = [sip.parse(d) for d in got if not sip.parse(d).is_request
                  and (sip.parse(d).status or 0) >= 200]
        print("callee answers", [d[:24] for d in got], time.monotonic() - started,
              _kinds(callee, mark))
        assert finals and 400 <= (finals[0].status or 0) < 700, [d[:30] for d in got]
        assert not _media(callee, mark)
        assert not keys_shown(pki, got)
    finally:
        peer.close()


def test_control_callee_answers_a_split_offer_via_a_viewing_proxy_without_keys(pki, callee):
    peer = UdpStranger(callee.port)
    try:
        alice = ua_engine(pki, "alice", peers=("bob",),
                          proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        plain = _alice_invite(pki, callee, peer)
        sent = alice.protect(plain)
        assert sent.info.split
        peer.send(sent.message.serialize())
        got = _collect(peer, plain.call_id, 2.5)     # the 200 and its retransmissions
        oks = [d for d in got if d.startswith(b"SIP/2.0 200")]
        print("callee", [d[:24] for d in got])
        assert oks
        assert not keys_shown(pki, got)
        opened = alice.open(sip.parse(oks[0]))
        # split: the proxy reads the view, the keys are sealed for alice alone
        assert b"inline:" in opened.message.body and opened.info.split
    finally:
        peer.close()


def test_control_cancel_of_a_ringing_call_leaks_no_key(pki, silent_callee):
    peer = UdpStranger(silent_callee.port)
    try:
        alice = ua_engine(pki, "alice", peers=("bob",),
                          proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        plain = _alice_invite(pki, silent_callee, peer)
        sent = alice.protect(plain)
        peer.send(sent.message.serialize())
        first = _collect(peer, plain.call_id, 1.0)
        cancel = sip.SipMessage(sip.RequestLine("CANCEL", plain.request_uri),
                                tuple((n, v) for n, v in sent.message.headers
                                      if n.lower() in ("via", "from", "to", "call-id",
                                                       "max-forwards"))
                                + (("CSeq", "1 CANCEL"), ("Content-Length", "0")), b"")
        peer.send(cancel.serialize())
        got = first + _collect(peer, plain.call_id, 2.0)
        statuses = [sip.parse(d).status for d in got if not sip.parse(d).is_request]
        print("cancel", statuses)
        assert 487 in statuses, statuses
        assert not keys_shown(pki, got)
    finally:
        peer.close()
