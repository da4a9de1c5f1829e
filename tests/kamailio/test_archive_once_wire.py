"""The archive keeps one row per distinct body of a message, however often it passes.

A UAS retransmits its 200 to an INVITE until the ACK comes (RFC 3261 §13.3.1.4), and a
proxy forwards every copy (§16.7: 2xx responses go end to end).  So does an insider UA
that keeps sending its 200 on purpose, to fill the archive.  Each copy the home proxy
opens is the same message: its archive rows are written once.  A message that differs
in anything the archive records (a second answer in a re-INVITE, the same SDP under
another CSeq, a copy whose signature no longer checks) is still a row of its own.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, TRUSTED, answer, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import udp_send
from e2m_lab.sipp import register

from e2m_plugins.sip import SipMessage, make_response

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]

SDP_VIEW = ("INVITE:application/sdp",)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wait_for_lines(proxy, text: str, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while proxy.log_since(0).count(text) < count:
        assert time.monotonic() < deadline, proxy.log_since(0)[-3000:]
        time.sleep(0.05)


def test_a_retransmitted_200_is_archived_once(proxy_factory, sipp, raw_uas, pki):
    home = proxy_factory("home", e2m=True, view=SDP_VIEW)
    register(home, "bob", raw_uas.port, sipp)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    bob = ua_engine(pki, "bob")
    sent: list[bytes] = []

    def respond(request: SipMessage) -> SipMessage:
        if request.method != "INVITE":
            return make_response(request, 200, "OK")
        reply = answer(bob.open(request).message, SDP_ANSWER)
        reply = reply.replace("Contact", f"<sip:bob@127.0.0.1:{raw_uas.port}>")
        wire = bob.protect(reply).message.serialize()
        sent.append(wire)
        return wire
    raw_uas.responder = respond

    ok = udp_send(home.port, alice.protect(invite(pki, call_id="twice@127.0.0.1")).message)
    assert ok is not None and ok.status == 200, ok and (ok.status, ok.reason)
    (wire,) = sent
    # No ACK yet: bob's phone sends its 200 again, as it must (and as often as it likes).
    for _ in range(5):
        raw_uas.sock.sendto(wire, ("127.0.0.1", home.port))
    _wait_for_lines(home, "e2m: INVITE response 200", 6)

    rows = home.archive_rows()      # compared by digest: a failure never prints the SDP
    assert [(r.direction, r.sha256) for r in rows] == [
        ("request", _sha256(SDP_OFFER)), ("response", _sha256(SDP_ANSWER))]
    assert [m["direction"] for m in home.media_rows()] == ["request", "response"]
