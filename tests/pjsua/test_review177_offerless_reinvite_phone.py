"""Review 177 (attacker's review of 9ab45c8), the real phone: bob's stock ``e2m-phone``
(pjsua2, SRTP, E2M required) in flows reviews 167 to 176 did not drive: a re-INVITE
without SDP (the phone's offer in its 200, the answer in alice's ACK), that 200's
retransmissions, a keyed ACK answer in the clear, and the phone's own log at the
highest level its settings allow.  No Kamailio: alice is her own engine on a UDP socket
(her datagrams as the home proxy would relay them, the proxy proxy.example.com viewing
``INVITE:application/sdp`` and ``ACK:application/sdp``, its certificate held by the
test to read what it could).  The phone runs in its own process (``PhoneProcess``).

Findings: none in the time given (about 20 minutes).

Controls (unmarked, pass):

- ``test_control_offerless_reinvite_200_is_split_and_its_retransmissions_hold_no_key``:
  alice's split SRTP INVITE, 200, ACK; then a re-INVITE with no body (CSeq 2).  The
  phone answers 200 with its own SDP offer: protected, no ``inline:`` on the wire nor in
  anything the proxy's key opens, and alice's engine reports it split (keys sealed for
  her).  Not ACKing it, alice's socket collects the phone's retransmissions of that 200
  (RFC 3261 13.3.1.4): each carries the same protected octets, none a key in the clear.
  Then alice's ACK carrying her keyed answer, protected by her engine (split for the
  viewing proxy), is taken: the call stays up (no ``error`` event, a BYE answered 200).
  Figures at 9ab45c8: 3 copies of the 200 in 4 s, 2727 bytes each, identical bodies.
- ``test_control_a_keyed_ack_in_the_clear_is_dropped_and_nothing_leaks_back``: the same
  offerless re-INVITE, alice's ACK answers with a keyed SDP in the clear (an insider or a
  downgrading hop): the phone refuses it (``rx`` error), sends nothing with a key.
- ``test_control_the_phones_log_at_level_5_holds_no_key``: bob's phone with
  ``log_level = 5`` (pjmedia prints the SRTP master keys at level 5: "TX: ... key=");
  after an SRTP call its stderr holds neither its own nor alice's key in base64, and no
  ``inline:``.  Figures at 9ab45c8: stderr 235 characters, one Python warning, no
  ``pjsua:`` line at all (the CLI sets up no log handler: the level only feeds a
  writer whose debug lines go nowhere), so this is a guard against a handler added
  later, not a finding.  3 passed in 9 s.

Tried and held (beyond the controls):

- The CLI (``pjsua_hooks/cli.py``) configures no Python logging handler, so the
  ``pjsua:`` debug lines of ``_LogWriter`` reach no file; where an application does
  configure one, ``redact_pjsua_line`` replaces ``key=``/``salt=`` values and whole
  messages are dropped unless ``log_messages`` (not a phone setting).
- The hook sits right after ``mod-pjsua-log`` (checked at registration), so pjsip's own
  TX message log sees the sealed octets, its RX log the sealed octets too.
- A failure answer with a keyed SDP: ``_refuse_to_send_plaintext`` refuses it whatever
  the status (review 167 K2 fix; not rerun with the phone).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_ANSWER, SRTP_OFFER, TRUSTED, known_proxy, ua_engine
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST, UdpStranger
from e2m_plugins import sip
from e2m_plugins.body import message_body, top_parts
from e2m_plugins.cms.envelope import open_envelope
from e2m_plugins.cms.recipients import CertificateKey
from e2m_plugins.errors import E2MError
from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.pjsua2]

SDP_VIEW = ("INVITE:application/sdp", "ACK:application/sdp")
_INLINE = re.compile(rb"inline:([A-Za-z0-9+/=]{20,})")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review177-pki"), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


@pytest.fixture
def loud_bob(tmp_path: Path, pki: TestPKI,
             request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request, log_level=5)


def _answers(peer: UdpStranger, call_id: str, method: str, timeout: float,
             want: int = 1) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(got) < want:
        for data in peer.drain(0.2):
            msg = sip.parse(data)
            if not msg.is_request and msg.call_id == call_id and (msg.status or 0) >= 200 \
                    and (msg.get("CSeq") or "").split()[-1] == method:
                got.append(data)
    return got


def _proxy_reads(pki: TestPKI, msg: sip.SipMessage) -> list[bytes]:
    cred = pki.proxy(TRUSTED)
    out = []
    for part in top_parts(message_body(msg)):
        try:
            out.append(open_envelope(part.decoded(),
                                     [CertificateKey(cred.cert, cred.key)]).plaintext)
        except E2MError:
            continue
    return out


class Call:
    """alice's engine and socket in one SRTP call to bob's phone."""

    def __init__(self, pki: TestPKI, bob: PhoneProcess) -> None:
        self.pki = pki
        self.peer = UdpStranger(bob.port)
        self.alice = ua_engine(pki, "alice", peers=("bob",),
                               proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        self.via = f"{HOST}:{self.peer.local_port}"
        self.contact = [("Contact", f"<sip:alice@{self.via}>")]
        self.plain = sip.make_request("INVITE", f"sip:bob@{HOST}:{bob.port}",
                                      from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
                                      via_host=self.via, body=SRTP_OFFER,
                                      content_type="application/sdp",
                                      extra_headers=self.contact)
        self.target = ""
        self.to_tag: str | None = None

    def req(self, method: str, cseq: int, body: bytes = b"") -> sip.SipMessage:
        return sip.make_request(method, self.target, from_uri=self.pki.aor("alice"),
                                to_uri=self.pki.aor("bob"), call_id=self.plain.call_id,
                                cseq=cseq, from_tag=self.plain.from_tag, to_tag=self.to_tag,
                                via_host=self.via, extra_headers=self.contact, body=body,
                                content_type="application/sdp" if body else None)

    def establish(self) -> None:
        protected = self.alice.protect(self.plain)
        assert protected.info.split
        self.peer.send(protected.message.serialize())
        got = _answers(self.peer, self.plain.call_id, "INVITE", 10)
        assert got and got[0].startswith(b"SIP/2.0 200"), got and got[0][:60]
        ok = sip.parse(got[0])
        assert b"inline:" not in got[0]
        self.alice.open(ok)
        self.target = re.sub(r"^.*<|>.*$", "", ok.get("Contact") or "")
        self.to_tag = ok.to_tag
        self.peer.send(self.req("ACK", 1).serialize())
        time.sleep(0.5)

    def bye(self, cseq: int) -> list[bytes]:
        self.peer.send(self.alice.protect(self.req("BYE", cseq)).message.serialize())
        return _answers(self.peer, self.plain.call_id, "BYE", 3)


def test_control_offerless_reinvite_200_is_split_and_its_retransmissions_hold_no_key(pki, bob):
    call = Call(pki, bob)
    try:
        call.establish()
        mark = bob.mark()
        reinvite = call.req("INVITE", 2)
        call.peer.send(call.alice.protect(reinvite).message.serialize())
        # no ACK yet: the phone retransmits its 200 (T1 = 500 ms, then 1 s, 2 s)
        copies = _answers(call.peer, reinvite.call_id, "INVITE", 4.0, want=3)
        assert copies and copies[0].startswith(b"SIP/2.0 200"), copies and copies[0][:80]
        assert len(copies) >= 2, f"{len(copies)} copies of the 200"
        for data in copies:
            assert b"inline:" not in data and b"a=crypto" not in data
            assert all(b"inline:" not in p for p in _proxy_reads(pki, sip.parse(data)))
        assert len({c.split(b"\r\n\r\n", 1)[1] for c in copies}) == 1   # same octets
        got = call.alice.open(sip.parse(copies[0]))
        assert got.info.split and b"inline:" in got.message.body      # alice reads bob's
        ack = call.req("ACK", 2, SRTP_ANSWER.replace(b"2890844527", b"2890844528"))
        sent = call.alice.protect(ack)
        assert sent.info.encrypted and b"inline:" not in sent.message.serialize()
        assert all(b"inline:" not in p for p in _proxy_reads(pki, sent.message))
        call.peer.send(sent.message.serialize())
        time.sleep(1.0)
        errors = bob.of("error", since=mark)
        assert not errors, errors
        byes = call.bye(3)
        assert byes and byes[0].startswith(b"SIP/2.0 200"), byes and byes[0][:60]
    finally:
        call.peer.close()


def test_control_a_keyed_ack_in_the_clear_is_dropped_and_nothing_leaks_back(pki, bob):
    call = Call(pki, bob)
    try:
        call.establish()
        mark = bob.mark()
        reinvite = call.req("INVITE", 2)
        call.peer.send(call.alice.protect(reinvite).message.serialize())
        copies = _answers(call.peer, reinvite.call_id, "INVITE", 3.0)
        assert copies and copies[0].startswith(b"SIP/2.0 200")
        call.alice.open(sip.parse(copies[0]))
        call.peer.send(call.req("ACK", 2, SRTP_ANSWER).serialize())    # keys in the clear
        time.sleep(1.5)
        assert bob.of("error", since=mark), "the plaintext keyed ACK was taken"
        for data in call.peer.drain(0.5):
            assert b"inline:" not in data
    finally:
        call.peer.close()


def test_control_the_phones_log_at_level_5_holds_no_key(pki, loud_bob):
    call = Call(pki, loud_bob)
    try:
        call.establish()
        time.sleep(1.0)
        call.bye(2)
        time.sleep(0.5)
    finally:
        call.peer.close()
    loud_bob.stop()
    text = loud_bob.stderr()
    alices = [m.group(1) for m in _INLINE.finditer(SRTP_OFFER)]
    assert alices
    keys = {k.split(b"|")[0].decode() for k in alices}
    # and the raw master key as pjmedia prints it (base64 of the 30 decoded bytes)
    keys |= {base64.b64encode(base64.b64decode(k)[:30]).decode() for k in keys}
    assert not any(k[:24] in text for k in keys)
    assert "inline:" not in text
