"""Review 173, the real phone: an in-dialog UPDATE and a REFER with a new SRTP offer to bob's
``e2m-phone`` (pjsua2, SRTP, E2M required; no Kamailio: alice is her own engine on a
UDP socket, her datagrams as the home proxy would relay them).

Control (honest flow): alice's split INVITE is answered 200 and ACKed; her UPDATE with
a split SRTP offer (new o= version, new key) must be answered 200 with an SDP, protected,
holding bob's key for alice alone: nothing the proxy (proxy.example.com, whose
certificate the test holds) can open, nor the wire, holds an ``inline:`` key, and
alice's engine reports the answer split (view readable by proxy.example.com under the
dialog key, key sealed for her).  Figures at fe3afff: 200 UPDATE of 2672 bytes,
``split=True, key_reuse=True, readable_by=('proxy.example.com',)``; 1 passed in 2.9 s.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER, TRUSTED, known_proxy, ua_engine
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

SDP_VIEW = ("INVITE:application/sdp", "UPDATE:application/sdp")
NEW_KEY = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVowMTIz"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review173-pki"), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _answer_to(peer: UdpStranger, call_id: str, method: str, timeout: float) -> bytes | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for data in peer.drain(0.2):
            msg = sip.parse(data)
            if not msg.is_request and msg.call_id == call_id and (msg.status or 0) >= 200 \
                    and (msg.get("CSeq") or "").split()[-1] == method:
                return data
    return None


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


def _alices_srtp_invite(pki, bob, peer):
    """alice's engine (bob's certificate, the home proxy viewing SDP) and her plain SRTP
    INVITE to bob's phone from ``peer``'s socket, with its Via host and Contact."""
    alice = ua_engine(pki, "alice", peers=("bob",),
                      proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    via = f"{HOST}:{peer.local_port}"
    contact = [("Contact", f"<sip:alice@{via}>")]
    plain = sip.make_request("INVITE", f"sip:bob@{HOST}:{bob.port}",
                             from_uri=pki.aor("alice"), to_uri=pki.aor("bob"), via_host=via,
                             body=SRTP_OFFER, content_type="application/sdp",
                             extra_headers=contact)
    return alice, plain, via, contact


def test_control_update_with_a_new_srtp_offer_is_answered_and_keys_stay_end_to_end(pki, bob):
    peer = UdpStranger(bob.port)
    try:
        alice, plain, via, contact = _alices_srtp_invite(pki, bob, peer)
        protected = alice.protect(plain)
        assert protected.info.split
        peer.send(protected.message.serialize())
        data = _answer_to(peer, plain.call_id, "INVITE", 10)
        assert data is not None and data.startswith(b"SIP/2.0 200"), data and data[:60]
        ok = sip.parse(data)
        assert b"inline:" not in data
        alice.open(ok)
        target = re.sub(r"^.*<|>.*$", "", ok.get("Contact") or "")
        ack = sip.make_request("ACK", target, from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
                               call_id=plain.call_id, cseq=1, from_tag=plain.from_tag,
                               to_tag=ok.to_tag, via_host=via)
        peer.send(ack.serialize())
        time.sleep(0.5)
        offer = (SRTP_OFFER.replace(b"2890844526 2890844526", b"2890844526 2890844527")
                 .replace(b"WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz", NEW_KEY))
        assert offer != SRTP_OFFER
        update = sip.make_request("UPDATE", target, from_uri=pki.aor("alice"),
                                  to_uri=pki.aor("bob"), call_id=plain.call_id, cseq=2,
                                  from_tag=plain.from_tag, to_tag=ok.to_tag, via_host=via,
                                  body=offer, content_type="application/sdp",
                                  extra_headers=contact)
        sent = alice.protect(update)
        assert sent.info.split and NEW_KEY not in sent.message.serialize()
        peer.send(sent.message.serialize())
        data = _answer_to(peer, plain.call_id, "UPDATE", 10)
        assert data is not None, "no answer to the UPDATE"
        assert data.startswith(b"SIP/2.0 200"), data[:80]           # an honest UPDATE
        answer = sip.parse(data)
        assert answer.body and b"inline:" not in data               # not in the clear
        assert all(b"inline:" not in p for p in _proxy_reads(pki, answer))
        got = alice.open(answer)
        # the view under the dialog key the proxy holds, bob's key sealed for alice alone
        assert got.info.split and got.info.readable_by == (TRUSTED,)
        opened = got.message
        assert b"a=crypto:" in opened.body and b"inline:" in opened.body   # alice reads it
        bye = sip.make_request("BYE", target, from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
                               call_id=plain.call_id, cseq=3, from_tag=plain.from_tag,
                               to_tag=ok.to_tag, via_host=via)
        peer.send(alice.protect(bye).message.serialize())
        _answer_to(peer, plain.call_id, "BYE", 3)
    finally:
        peer.close()

def test_control_refer_is_accepted_and_its_notify_sipfrags_go_out(pki, bob):
    """An in-dialog REFER (target: a second socket of alice's, ``sip:alice@127.0.0.1:<p>``):
    bob's phone answers 202 and sends its NOTIFYs with message/sipfrag bodies (not
    refused, no key).  Figures at fe3afff: 202, NOTIFY "SIP/2.0 100 Trying", NOTIFY
    "SIP/2.0 500 Server Internal Error": the transferred INVITE to that AOR, whose
    certificate bob lacks, is refused before it leaves (call 503, nothing on the target
    socket in 3 s), as ``require`` wants; 1 passed in 9.5 s."""
    peer, other = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        alice, plain, via, contact = _alices_srtp_invite(pki, bob, peer)
        peer.send(alice.protect(plain).message.serialize())
        data = _answer_to(peer, plain.call_id, "INVITE", 10)
        assert data is not None and data.startswith(b"SIP/2.0 200"), data and data[:60]
        ok = sip.parse(data)
        alice.open(ok)
        target = re.sub(r"^.*<|>.*$", "", ok.get("Contact") or "")
        peer.send(sip.make_request("ACK", target, from_uri=pki.aor("alice"),
                                   to_uri=pki.aor("bob"), call_id=plain.call_id, cseq=1,
                                   from_tag=plain.from_tag, to_tag=ok.to_tag,
                                   via_host=via).serialize())
        time.sleep(0.5)
        refer = sip.make_request("REFER", target, from_uri=pki.aor("alice"),
                                 to_uri=pki.aor("bob"), call_id=plain.call_id, cseq=2,
                                 from_tag=plain.from_tag, to_tag=ok.to_tag, via_host=via,
                                 extra_headers=contact + [
                                     ("Refer-To", f"<sip:alice@{HOST}:{other.local_port}>")])
        peer.send(alice.protect(refer).message.serialize())
        got: list[bytes] = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            got += peer.drain(0.2)
            if any(d.startswith(b"NOTIFY ") for d in got):
                break
        heads = [d.split(b"\r\n", 1)[0] for d in got]
        assert any(h.startswith(b"SIP/2.0 202") for h in heads), heads
        notifies = [d for d in got if d.startswith(b"NOTIFY ")]
        assert notifies and all(b"inline:" not in d for d in notifies)
        assert any(b"message/sipfrag" in d for d in notifies)
        invites = [d for d in other.drain(3.0) if d.startswith(b"INVITE ")]
        assert all(b"inline:" not in d for d in invites)
    finally:
        peer.close()
        other.close()
