"""Review 129 (attacker's review of 4129b80), the real phone: what alice's pjsua2
phone (``e2m-phone listen``, default settings) does with a 2xx relayed after her
INVITE's failure, now that her engine opens it (stop 42, review 127 HB1:
``DialogKeys.end_dialog(linger=...)``, ``UAEngine._open``).  Review 127 left this
untried ("what pjsip does with the late 2xx once opened was not run").

**Honest break HB1 (fixed at stop 43, see the end): the phone had no late-2xx
call; pjsip swallowed the 200.**  No attacker.

- Set-up: alice's real phone calls bob through a UDP socket (her outbound proxy in
  the test) that answers as bob's two devices would: each device its own
  ``UAEngine`` with bob's credentials (``peers`` alice).
- Messages: alice's keyed INVITE; device f1's 180; then either device f1's 486
  (``486``) or alice hangs up (``hangup``: her CANCEL, its 200, device f1's 487)
  (``cancel``); pjsip ACKs the failure (To tag f1).  0.5 s later device f2's 200 (To
  tag f2) sealed under alice's offer key (kekri: ``key_reuse`` True), as tm relays a
  late 2xx (RFC 3261 16.7).
- Observed (both variants): the phone's hook opens the 200 (no ``error`` event; on
  ``fea146e``, before the UA half of the fix, the same run shows an ``rx`` error
  event: the hook dropped it) and hands it to pjsip, which answers it with **a second
  ACK with To tag f1** (its INVITE client transaction, Completed after the failure,
  takes the 200 for a retransmitted final answer): **no ACK to f2, no BYE, call state
  stays DISCONNECTED**.  Messages bob's socket got: ``INVITE, ACK(f1), ACK(f1)``
  (``486``) and ``INVITE, CANCEL, ACK(f1), ACK(f1)`` (``cancel``).  So the call the
  stop meant to let through (review 125 HB2, review 127 HB1) still fails at the
  caller's phone, and device f2, which answered, gets no ACK: it retransmits its 200
  and ends the dialog after 64*T1 (RFC 3261 13.3.1.4; not waited for here); in the
  ``cancel`` case too the 2xx is owed an ACK (RFC 3261 13.2.2.4: each 2xx), and the
  call the user hung up a BYE.
- Code at fault: not the engine (it opens the 200 as meant, ``e2m_plugins/ua.py:931-
  938``) but the phone: ``pjsua_hooks/phone.py`` hands pjsip a late 2xx its
  transaction layer does not pass up (as observed: pjsip's INVITE client transaction,
  Completed after the failure, answers the 200 with the failure's ACK again).
- Suggested fix: in the hook, a 2xx to an INVITE whose failure the engine has seen
  (the engine knows: ``_sent`` has the first final status) is answered by the phone
  itself: ACK (a 2xx ACK, new branch, to its Contact, through its Record-Route) and
  then BYE, both protected by the engine (the call is over at the caller), so the
  callee's device stops retransmitting and the proxies drop the dialog's keys; or
  document that the phone ends such a call by silence (and the proxy's 32 s window
  then serves nothing for the product's own phones).

Controls (unmarked, pass):

- ``test_control_no_call_is_pushed_onto_the_phone_after_its_failure[486|cancel]``:
  the attacker's angle (an insider callee device, or anyone holding the offer's CEK,
  answering after the failure or after alice hung up): the phone takes no call, no
  CONFIRMED state, no media: the linger window opens no door on the real phone.
- ``test_control_the_same_200_without_a_failure_is_acked_and_the_call_confirmed``: the
  same 200 from device f2 with no failure first: ACKed (To tag f2) and CONFIRMED (the
  set-up is sound).

Tried and held:

- Sending under a retired key: ``DialogKeys._reusable`` skips retired keys (review
  127's unit test; alice's next INVITE in that Call-ID is keyed afresh).
- Opening past the window, and the window's extension by a second failure
  (``min``): ``tests/unit/test_review129_linger_bound.py`` (controls).
- A stray failure answer to make a confirmed call's keys linger (and die in 32 s):
  ``_ends_dialog`` ends nothing once the INVITE's first final status was a 2xx, and
  nothing for an answer to no request of ours (``_sent_for``).

Fixed (stop 43), HB1: the phone answers such a 2xx itself (``pjsua_hooks/late_2xx.py``).
Once the engine accepted a 2xx to a dialog-creating INVITE of ours whose first final
answer was a failure at most 64*T1 ago (``UAEngine.late_answer_to_failed_invite``), with
our From tag and one sip Contact, the hook drops it (pjsip never sees it, so its
completed transaction sends no second ACK(f1)) and the phone's loop has pjsip send a 2xx
ACK (new branch, To tag f2, the INVITE's CSeq number, Request-URI the 2xx's Contact,
Route the Record-Route reversed) and then a BYE (CSeq + 1) in a client transaction, both
through the hook and the engine; a ``late_answer`` event says so.  The same octets again
get the same ACK (same branch), no second BYE; the BYE's 200 ends its transaction.
Before (stop 42) bob's socket got ``INVITE, ACK(f1), ACK(f1)`` (486) and ``INVITE,
CANCEL, ACK(f1), ACK(f1)`` (cancel); now ``INVITE, ACK(f1), ACK(f2), BYE(f2)`` and
``INVITE, CANCEL, ACK(f1), ACK(f2), BYE(f2)``, the ACK and BYE to bob's Contact; with
the 200 sent twice more, ``..., BYE(f2), ACK(f2), ACK(f2)``, the three ACKs on one
branch.  Call state stays DISCONNECTED, no media (the controls).  Bounded: 6 To tags
per failed INVITE, 16 ACKs per 2xx, 32 late 2xx, each kept 32 s
(``tests/unit/test_late_2xx_answers.py``).  Who can forge one: whoever knows the
INVITE's Call-ID, CSeq and our Via branch and can make the engine accept the body (a
hop on the path holding the offer key, a callee device); it gets at most one ACK and
one BYE per To tag toward a Contact and Record-Route of its choosing.  A 2xx the engine
refuses (plaintext where E2M is required) or that answers nothing of ours (another
Call-ID) makes the phone send nothing and keep nothing
(``test_a_forged_late_2xx_makes_the_phone_send_nothing_and_keep_nothing``): the one
under another Call-ID, which the engine opens (sealed to alice's certificate) but which
answers nothing of hers, is dropped too, else pjsip's completed transaction (matching
by our branch alone) re-sent its failure ACK(f1) for it (seen in this test's first
run).  Through a real Kamailio home proxy (``tests/e2e/test_late_2xx_phone_wire.py``) the ACK and BYE follow
the 200's Record-Route to bob's contact; a first cut wrote a Content-Length into the
text pjsip parses, pjsip printed its own as well, and Kamailio's sanity check refused
both requests (two Content-Length headers): the text now carries none.  Two devices
answering after the failure (f2, then f3) each get an ACK and a BYE
(``test_two_devices_answering_after_the_failure_each_get_an_ack_and_a_bye``); at first
the BYE to f2 ended every key of the INVITE, the retired offer key too, and f3's 200
could not be opened (bob's socket got no BYE for f3): the engine's BYE to a late 2xx
now ends only that fork's slot (``UAEngine._ends_a_late_answer``), the retired keys
living to their own ``open_until``.  Over TLS to a Kamailio home the same holds (the
e2e module); at a home with ``[auth]`` the BYE is answered 407 (the phone's
``late_answer_bye`` event) and was not sent again with credentials, so bob's device,
ACKed, stayed in the call until its user hung up (strict xfail there until stop 44).

Fixed (stop 44): the phone answers its home's 407 to that BYE once with the account's
credentials (``LateAnswers.retry_bye``).  Here, with the socket in front playing a home
with ``[auth]`` (``ringing_with_password``): the home realm's 407 gets one BYE more, CSeq
+ 1, new branch, a digest over alice's password the test recomputes, and a second 407
(no ``stale=true``) nothing more
(``test_the_bye_answers_the_homes_407_once_with_credentials``); a 407 naming another
realm is stripped (``challenge_refused``) and gets no BYE with credentials
(``test_a_forged_realms_407_to_the_bye_gets_no_credentials``); a 407 of the home realm
from another socket is dropped (``response_dropped``) and answered by nothing
(``test_a_strangers_407_to_the_bye_gets_no_credentials``).
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SDP_ANSWER, ua_engine
from e2m_lab.kamailio_harness import digest_credentials, parse_challenge
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.stranger import HOST
from e2m_plugins import sip
from e2m_plugins.challenge import digest_params
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.pjsua2]

BOB = "sip:bob@example.com"
PASSWORD = "al-" + secrets.token_urlsafe(12)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review129-pki"), users=("alice", "bob"),
                         key_type="ec")


class Bob:
    """A UDP socket alice's phone sends through (her outbound proxy), answering as bob's
    two devices would (each its own ``UAEngine`` with bob's credentials)."""

    def __init__(self, pki: TestPKI) -> None:
        self.pki = pki
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.devices = {"f1": ua_engine(pki, "bob", peers=("alice",)),
                        "f2": ua_engine(pki, "bob", peers=("alice",)),
                        "f3": ua_engine(pki, "bob", peers=("alice",))}
        self.source: tuple | None = None
        self.log: list[sip.SipMessage] = []
        self.sent: dict[str, bytes] = {}     # device tag -> the last response's octets
        self.answer_byes = False             # answer alice's BYEs 200
        # or answer each BYE with what this returns (None: no answer)
        self.bye_answer: Callable[[sip.SipMessage], sip.SipMessage | None] | None = None

    def receive(self, want, timeout: float = 10.0) -> sip.SipMessage | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, source = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                break
            try:
                msg = sip.parse(data)
            except Exception:  # noqa: BLE001 - keep-alives
                continue
            self.log.append(msg)
            if msg.is_request and msg.method == "CANCEL":
                self.sock.sendto(make_response(msg, 200, "OK").serialize(), source)
            if msg.is_request and msg.method == "BYE" and self.bye_answer is not None:
                reply = self.bye_answer(msg)
                if reply is not None:
                    self.sock.sendto(reply.serialize(), source)
            elif msg.is_request and msg.method == "BYE" and self.answer_byes:
                self.sock.sendto(make_response(msg, 200, "OK").serialize(), source)
            if want(msg):
                self.source = source
                return msg
        return None

    def send(self, msg: sip.SipMessage | bytes) -> None:
        assert self.source is not None
        self.sock.sendto(msg if isinstance(msg, bytes) else msg.serialize(), self.source)

    def reply(self, invite: sip.SipMessage, tag: str, status: int, reason: str) -> None:
        opened = self.devices[tag].open(invite).message
        if status < 300 and status != 100:
            response = make_response(opened, status, reason,
                                     [("Contact", f"<sip:bob@{HOST}:{self.port}>")],
                                     SDP_ANSWER if status == 200 else b"",
                                     "application/sdp" if status == 200 else None)
        else:
            response = make_response(opened, status, reason)
        response = response.replace("To", f"{opened.get('To')};tag={tag}")
        if status == 200:
            protected = self.devices[tag].protect(response)
            assert protected.info.key_reuse        # under alice's offer key (kekri)
            response = protected.message
        self.sent[tag] = response.serialize()
        self.send(response)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ringing(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Bob, sip.SipMessage]]:
    yield from _ring(tmp_path, pki)


@pytest.fixture
def ringing_with_password(tmp_path: Path, pki: TestPKI
                          ) -> Iterator[tuple[PhoneProcess, Bob, sip.SipMessage]]:
    """The same, alice's phone holding digest credentials for realm example.com (the
    AoR's domain): the socket in front plays a home with ``[auth]``."""
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    yield from _ring(tmp_path, pki, password_file="password")


def _ring(tmp_path: Path, pki: TestPKI, **phone: str
          ) -> Iterator[tuple[PhoneProcess, Bob, sip.SipMessage]]:
    bob = Bob(pki)
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{bob.port}", **phone})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        alice.send(f"call {BOB}")
        invite = bob.receive(lambda m: m.is_request and m.method == "INVITE")
        assert invite is not None
        bob.reply(invite, "f1", 180, "Ringing")
        time.sleep(0.3)
        yield alice, bob, invite
    finally:
        alice.stop()
        bob.close()


def _states(alice: PhoneProcess, since: int) -> list[str]:
    return [str(e.get("state", "")).upper().rsplit("_", 1)[-1]
            for e in alice.of("call_state", since=since)]


def _after_late_200(alice: PhoneProcess, bob: Bob, invite: sip.SipMessage, *,
                    how: str) -> dict:
    """alice's call fails (``how``: device 1's 486, or alice hangs up: CANCEL, 487);
    0.5 s later device 2 answers 200 under her offer key.  What the phone did with it."""
    mark = alice.mark()
    if how == "486":
        bob.reply(invite, "f1", 486, "Busy Here")
    else:
        alice.send("hangup")
        assert bob.receive(lambda m: m.is_request and m.method == "CANCEL") is not None
        bob.reply(invite, "f1", 487, "Request Terminated")
    assert bob.receive(lambda m: m.is_request and m.method == "ACK") is not None
    time.sleep(0.5)
    late_mark = alice.mark()
    bob.reply(invite, "f2", 200, "OK")
    ack = bob.receive(lambda m: m.is_request and m.method == "ACK"
                      and (m.to_tag or "") == "f2", timeout=5)
    bye = bob.receive(lambda m: m.is_request and m.method == "BYE", timeout=5)
    time.sleep(0.5)
    return {"states": _states(alice, mark), "late_states": _states(alice, late_mark),
            "ack": ack is not None, "bye": bye is not None,
            "kinds": [e.get("kind") for e in alice.events[-15:]],
            "sent": [(m.method, m.to_tag) for m in bob.log if m.is_request]}


def _acks(bob: Bob, tag: str) -> int:
    return sum(1 for m in bob.log if m.is_request and m.method == "ACK" and m.to_tag == tag)


def _requests(bob: Bob, method: str, tag: str | None = None) -> list[sip.SipMessage]:
    return [m for m in bob.log if m.is_request and m.method == method
            and (tag is None or m.to_tag == tag)]


@pytest.mark.parametrize("how", ["486", "cancel"])
def test_hb1_fixed_the_phone_acknowledges_and_ends_a_late_2xx(ringing, how):
    alice, bob, invite = ringing
    bob.answer_byes = True
    seen = _after_late_200(alice, bob, invite, how=how)
    assert not alice.of("error"), alice.of("error")
    # RFC 3261 13.2.2.4: the 2xx is ACKed, and the call nobody wants any more is BYEd
    assert seen["ack"] and seen["bye"], seen
    # pjsip never saw the 2xx: its completed transaction sent no second ACK(f1)
    assert _acks(bob, "f1") == 1, seen
    (ack,), (bye,) = _requests(bob, "ACK", "f2"), _requests(bob, "BYE")
    contact = f"sip:bob@{HOST}:{bob.port}"
    assert ack.request_uri == bye.request_uri == contact
    assert ack.cseq == (invite.cseq[0], "ACK") and bye.cseq == (invite.cseq[0] + 1, "BYE")
    assert ack.from_tag == bye.from_tag == invite.from_tag and bye.to_tag == "f2"
    assert ack.call_id == bye.call_id == invite.call_id
    assert len({invite.via_branch(), ack.via_branch(), bye.via_branch()}) == 3
    assert not ack.body and not bye.body
    # one Content-Length, pjsip's own (Kamailio refuses two)
    assert len(ack.get_all("Content-Length")) == len(bye.get_all("Content-Length")) == 1
    alice.wait("late_answer", timeout=5)
    late = alice.of("late_answer")
    assert [e["sent"] for e in late] == [["ACK", "BYE"]], late
    assert "CONFIRMED" not in seen["late_states"], seen
    # the BYE's 200 was absorbed by its transaction: no retransmission, no error
    assert bob.receive(lambda m: m.is_request and m.method == "BYE", timeout=2) is None
    assert not alice.of("error")


def test_a_retransmitted_late_2xx_gets_an_ack_each_and_one_bye(ringing):
    alice, bob, invite = ringing
    bob.answer_byes = True
    seen = _after_late_200(alice, bob, invite, how="486")
    assert seen["ack"] and seen["bye"], seen
    for _ in range(2):     # device f2 did not get the ACK: the same 200 again
        bob.send(bob.sent["f2"])
        assert bob.receive(lambda m: m.is_request and m.method == "ACK"
                           and m.to_tag == "f2", timeout=5) is not None
    bob.receive(lambda m: False, timeout=1.5)
    acks = _requests(bob, "ACK", "f2")
    assert len(acks) == 3 and len({a.via_branch() for a in acks}) == 1
    assert len(_requests(bob, "BYE")) == 1
    assert _acks(bob, "f1") == 1
    assert not alice.of("error")
    status = alice.status()
    assert status["late_2xx"] == 1, status
    assert status["late_2xx_counts"]["acks_again"] == 2, status


def test_two_devices_answering_after_the_failure_each_get_an_ack_and_a_bye(ringing):
    """Devices f2 and f3 both answer after f1's 486: the BYE to f2 must not take the
    offer key f3's 200 is sealed under (it did at first: f3's 200 could not be opened,
    so it got no ACK)."""
    alice, bob, invite = ringing
    bob.answer_byes = True
    seen = _after_late_200(alice, bob, invite, how="486")
    assert seen["ack"] and seen["bye"], seen
    bob.reply(invite, "f3", 200, "OK")
    assert bob.receive(lambda m: m.is_request and m.method == "BYE" and m.to_tag == "f3",
                       timeout=5) is not None, [(m.method, m.to_tag) for m in bob.log]
    assert [len(_requests(bob, "ACK", t)) for t in ("f1", "f2", "f3")] == [1, 1, 1]
    assert [m.to_tag for m in _requests(bob, "BYE")] == ["f2", "f3"]
    # the phone reports a late answer after sending its BYE: bob may see the BYE first
    first = alice.events.index(alice.wait("late_answer", timeout=5))
    alice.wait("late_answer", since=first + 1, timeout=5)
    assert [e["sent"] for e in alice.of("late_answer")] == [["ACK", "BYE"]] * 2
    assert not alice.of("error"), alice.of("error")


@pytest.mark.parametrize("forgery", ["plaintext", "other_call_id"])
def test_a_forged_late_2xx_makes_the_phone_send_nothing_and_keep_nothing(ringing, forgery):
    """After the 486, a 200 the engine does not accept as the answer to that INVITE: a
    plaintext SDP (E2M required: refused), or a sealed one under another Call-ID (the
    offer key does not open it; sealed to alice's certificate it opens but answers
    nothing of hers).  The phone sends no ACK for it and no BYE, and keeps nothing."""
    alice, bob, invite = ringing
    bob.reply(invite, "f1", 486, "Busy Here")
    assert bob.receive(lambda m: m.is_request and m.method == "ACK") is not None
    device = bob.devices["f2"]
    opened = device.open(invite).message
    forged = make_response(opened, 200, "OK", [("Contact", f"<sip:bob@{HOST}:{bob.port}>")],
                           SDP_ANSWER, "application/sdp")
    forged = forged.replace("To", f"{opened.get('To')};tag=f2")
    if forgery == "other_call_id":
        forged = device.protect(forged.replace("Call-ID", "forged-" + invite.call_id)).message
    bob.send(forged)
    assert bob.receive(lambda m: m.is_request and (m.method == "BYE" or m.to_tag == "f2"),
                       timeout=3) is None
    assert not _requests(bob, "BYE") and not _requests(bob, "ACK", "f2")
    # nor does pjsip: its completed transaction would have matched the other Call-ID's
    # 200 by our branch alone and ACKed it with the failure's ACK(f1) again
    assert _acks(bob, "f1") == 1, [(m.method, m.to_tag) for m in bob.log]
    assert not alice.of("late_answer")
    status = alice.status()
    assert status["late_2xx"] == 0 and status["late_2xx_counts"]["answered"] == 0, status


@pytest.mark.parametrize("how", ["486", "cancel"])
def test_control_no_call_is_pushed_onto_the_phone_after_its_failure(ringing, how):
    """The attacker's angle (an insider callee device, or anyone holding the offer's
    CEK, answering after the failure or after alice hung up): the phone takes no call."""
    alice, bob, invite = ringing
    seen = _after_late_200(alice, bob, invite, how=how)
    assert "CONFIRMED" not in seen["late_states"], seen
    assert not any(e.get("kind") == "call_media" for e in alice.events), seen
    assert seen["states"] == ["DISCONNECTED"], seen


def test_control_the_same_200_without_a_failure_is_acked_and_the_call_confirmed(ringing):
    alice, bob, invite = ringing
    mark = alice.mark()
    bob.reply(invite, "f2", 200, "OK")
    ack = bob.receive(lambda m: m.is_request and m.method == "ACK"
                      and (m.to_tag or "") == "f2", timeout=5)
    assert ack is not None
    alice.wait("call_state", where=lambda e: str(e.get("state", "")).upper()
               .endswith("CONFIRMED"), since=mark, timeout=10)
    # no failure first: pjsip's own call, the phone does not step in
    assert not alice.of("late_answer") and not _requests(bob, "BYE")


# -- stop 44: the BYE answers its home's digest challenge ------------------------------

def _challenge(realm: str, nonce: str) -> Callable[[sip.SipMessage], sip.SipMessage]:
    value = f'Digest realm="{realm}", nonce="{nonce}", qop="auth"'
    return lambda bye: make_response(bye, 407, "Proxy Authentication Required") \
        .add("Proxy-Authenticate", value)


def _with_credentials(bye: sip.SipMessage) -> bool:
    return bool(bye.get_all("Proxy-Authorization") or bye.get_all("Authorization"))


def test_the_bye_answers_the_homes_407_once_with_credentials(ringing_with_password):
    """The socket in front (alice's outbound proxy, her home) challenges the BYE with
    the home realm: the phone sends it again once, CSeq + 1, with a digest over
    alice's password that the home can check; a second 407 gets nothing more."""
    alice, bob, invite = ringing_with_password
    challenges: list[sip.SipMessage] = []

    def answer_bye(bye: sip.SipMessage) -> sip.SipMessage | None:
        if not _with_credentials(bye):
            challenges.append(bye)
            return _challenge("example.com", "home-nonce-1")(bye)
        return _challenge("example.com", "home-nonce-2")(bye)     # no stale: refused

    bob.bye_answer = answer_bye
    seen = _after_late_200(alice, bob, invite, how="486")
    assert seen["ack"] and seen["bye"], seen
    retry = bob.receive(lambda m: m.is_request and m.method == "BYE"
                        and _with_credentials(m), timeout=5)
    assert retry is not None, [(m.method, m.cseq) for m in bob.log]
    bob.receive(lambda m: False, timeout=2.0)
    byes = _requests(bob, "BYE")
    first = [m for m in byes if not _with_credentials(m)]
    again = [m for m in byes if _with_credentials(m)]
    # the first BYE, then one retry (each with any UDP retransmission of it before its
    # 407: a loaded machine answers later than T1)
    assert len({m.via_branch() for m in first}) == 1 \
        and len({m.via_branch() for m in again}) == 1, \
        [(m.cseq, m.via_branch()) for m in byes]
    assert retry.cseq == (invite.cseq[0] + 2, "BYE")
    assert retry.via_branch() != first[0].via_branch()
    assert retry.request_uri == first[0].request_uri and retry.to_tag == "f2"
    (value,) = retry.get_all("Proxy-Authorization")
    params = digest_params(value)
    assert params is not None and params["realm"] == "example.com"
    expected = digest_credentials(parse_challenge(
        'Digest realm="example.com", nonce="home-nonce-1", qop="auth"'), "BYE",
        retry.request_uri or "", "alice", PASSWORD, cnonce=params["cnonce"])
    assert digest_params(expected)["response"] == params["response"]   # type: ignore
    events = [(e["status"], e["retried"]) for e in alice.of("late_answer_bye_auth")]
    assert events == [(407, True), (407, False)], alice.events[-10:]
    assert PASSWORD not in repr(list(alice.events))
    assert alice.status()["late_2xx_counts"]["bye_auth_retries"] == 1


def test_a_forged_realms_407_to_the_bye_gets_no_credentials(ringing_with_password):
    """A 407 naming a realm alice does not use (a hop phishing for a digest of her
    password): the BYE is not sent again, with or without credentials."""
    alice, bob, invite = ringing_with_password
    bob.bye_answer = _challenge("evil.example", "evil-nonce")
    seen = _after_late_200(alice, bob, invite, how="486")
    assert seen["bye"], seen
    bob.receive(lambda m: False, timeout=2.0)
    byes = _requests(bob, "BYE")
    assert not [m for m in byes if _with_credentials(m)]
    assert len({m.via_branch() for m in byes}) == 1, \
        [(m.cseq, m.via_branch()) for m in byes]
    assert [e["retried"] for e in alice.of("late_answer_bye_auth")] == [False]
    assert alice.of("challenge_refused"), alice.events[-10:]


def test_a_strangers_407_to_the_bye_gets_no_credentials(ringing_with_password):
    """A 407 of the home realm, but from a socket that is not alice's home (an
    off-path forger who learnt the BYE's branch): dropped, never answered."""
    alice, bob, invite = ringing_with_password
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind((HOST, 0))

    def forge(bye: sip.SipMessage) -> None:
        assert bob.source is not None
        stranger.sendto(_challenge("example.com", "forged")(bye).serialize(), bob.source)
        return None      # the home itself does not answer (yet)

    try:
        bob.bye_answer = forge
        seen = _after_late_200(alice, bob, invite, how="486")
        assert seen["bye"], seen
        bob.receive(lambda m: False, timeout=1.5)
        byes = _requests(bob, "BYE")
        assert byes and not [m for m in byes if _with_credentials(m)]
        assert len({m.via_branch() for m in byes}) == 1
        assert not alice.of("late_answer_bye_auth")
        assert alice.of("response_dropped"), alice.events[-10:]
    finally:
        stranger.close()
