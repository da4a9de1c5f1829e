"""Issue 14: the key-cache items of an attempt go when the attempt ends, however it ends.

An INVITE with an encrypted offer leaves two key-cache items (the CEK and its dialog
index).  Before issue 14, an INVITE ended by tm's own 408 (the callee never answered)
never reached the reply route, and its items stayed until their expiry: 834 such
INVITEs left 1,668 items after every transaction was gone.  Now tm's failure route drops
them at once, as the reply route does for a failure answer and the CANCEL for itself.

Since stop 42 an INVITE that went out and failed keeps its offer's keys
``LATE_ANSWER_TTL`` (32 s) more, as tm keeps its branch note, for a 2xx that still comes
(review 125 HB2): the tests assert that bound.  A relay that failed sends nothing, so
its keys still go at once.
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.flows import TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa
from e2m_plugins.proxy import LATE_ANSWER_TTL
from e2m_plugins.sip import RequestLine, SipMessage, make_response

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)


def _items_gone(proxy, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proxy.htable_items() != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _items_expire_within(proxy, seconds: float, timeout: float) -> bool:
    """Every key-cache item will be gone within ``seconds`` (+1 for the dump's whole
    seconds); checked until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        lives = list(proxy.htable_lives().values())
        # (the offer's record is still there: a dump that read no name proves nothing)
        if lives and all(life <= seconds + 1 for life in lives):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _register(proxy, port: int) -> None:
    ua = SipUa(proxy.port, user="bob")
    reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
    assert ua.request(reg.replace("Contact", f"<sip:bob@127.0.0.1:{port}>")).status == 200
    ua.close()


@pytest.mark.parametrize("ending", ["tm's own 408", "a 486 from the callee", "a CANCEL"])
def test_the_offers_keys_go_when_the_invite_ends(proxy_factory, pki, ending):
    proxy = proxy_factory("attempts", e2m=True, view=SDP_VIEW)
    invites: list[SipMessage] = []
    callee = RawUas()

    def respond(request: SipMessage) -> SipMessage | None:
        if request.method == "INVITE":
            invites.append(request)
            if ending == "tm's own 408":
                return None                            # silence: tm times out
            if ending == "a 486 from the callee":
                return make_response(request, 486, "Busy Here")
            return make_response(request, 180, "Ringing")
        if request.method == "CANCEL":
            final = make_response(invites[-1], 487, "Request Terminated")
            callee.sock.sendto(final.serialize(), ("127.0.0.1", proxy.port))
        return make_response(request, 200, "OK")
    callee.responder = respond
    ua = SipUa(proxy.port, user="alice", timeout=10)
    try:
        _register(proxy, callee.port)
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        offer = alice.protect(invite(pki, call_id=f"attempt-{time.monotonic_ns()}@x"))
        assert offer.info.encrypted
        if ending != "a CANCEL":
            final = ua.transact(offer.message)
            assert final is not None and final.status == (408 if "408" in ending else 486)
        else:
            sent = offer.message.replace("Via", ua.via())
            ua.send(sent)
            callee.wait_for(1, method="INVITE")
            assert proxy.htable_items() == 1               # the offer's record (its early dialog)
            cancel = SipMessage(RequestLine("CANCEL", sent.request_uri or ""),
                                tuple((n, f"{sent.cseq[0]} CANCEL" if n == "CSeq" else v)
                                      for n, v in sent.headers
                                      if n in ("Via", "From", "To", "Call-ID", "CSeq",
                                               "Max-Forwards"))
                                + (("Content-Length", "0"),), b"")
            ua.send(cancel)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(
                    m.status == 487 for m in ua.received):
                ua.receive(0.5)
            assert any(m.status == 487 for m in ua.received)
        # a late 2xx may still come (review 125): the offer's record lives at most
        # LATE_ANSWER_TTL more, not its early dialog's 200 s
        assert _items_expire_within(proxy, LATE_ANSWER_TTL, 2.0), proxy.htable_lives()
    finally:
        ua.close()
        callee.close()


def test_a_failed_relay_drops_the_keys_too(proxy_factory, pki):
    """The callee's contact is a TCP port nobody listens on: tm cannot send, the INVITE
    is answered at once, and the offer's keys do not outlive it."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    proxy = proxy_factory("no-route", e2m=True, view=SDP_VIEW)
    ua = SipUa(proxy.port, user="bob", timeout=10)
    try:
        reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        reg = reg.replace("Contact", f"<sip:bob@127.0.0.1:{port};transport=tcp>")
        assert ua.request(reg).status == 200
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        final = ua.transact(alice.protect(invite(pki)).message)
        assert final is not None and final.status >= 400
        assert _items_gone(proxy, 2.0), proxy.htable_items()
    finally:
        ua.close()
