"""Review 9's last hole on a real Kamailio: who pays for a key an answer offers.

The request route keeps ``ProxyEngine.answer_caller`` in ``$avp(e2m_caller)`` once
the request's verdict is known; tm carries the AVP with the transaction into the
onreply route (often another worker), where the engine charges the answer's key to
it.  The reply route's info line names the caller it charged (``caller=``), only when
the answer offered a key.  Before the fix that caller was the request's From as tm
kept it (``$T_req($fu)``), whoever wrote it: a stranger's made-up From was a fresh
quota group per call (tests/unit/test_review9.py shows what that let an insider do).
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, TRUSTED, known_proxy
from e2m_lab.kamailio_harness import RawUas, SipUa, registered_uas
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.config import UAConfig
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import issue_user
from e2m_plugins.ua import UAEngine

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)
USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
DAVE = "sip:dave@other.test"       # a certified user of another domain: no digest here


def _bobs_phone(pki, uas: RawUas):
    """bob answers every INVITE 200 with his SDP signed by him and sealed for the proxy
    under a fresh CEKReference: a key the proxy keeps, charged to the call's caller."""
    bob = pki.user("bob")
    proxy_cert = pki.proxy(TRUSTED).cert

    def respond(request: SipMessage) -> SipMessage:
        if request.method != "INVITE":
            return make_response(request, 200, "OK")
        response = make_response(request, 200, "OK", [("Contact", f"<sip:bob@127.0.0.1:{uas.port}>")])
        response = response.replace("To", f"{request.get('To')};tag=b{request.from_tag}")
        entity, _ = protect_content("application/sdp", SDP_ANSWER,
                                    [recipient_for_certificate(proxy_cert)],
                                    signer=(bob.cert, bob.key), cek_reference=new_reference(),
                                    bind_to=response, readers=(TRUSTED,))
        return with_entity(response, entity)
    return respond


def _plain_invite(caller: str, tag: str) -> SipMessage:
    """A plaintext SDP offer to bob (a ``view`` rule asks no signature of it)."""
    return make_request("INVITE", "sip:bob@example.com", from_uri=caller,
                        to_uri="sip:bob@example.com", call_id=f"caller-{tag}-{time.monotonic_ns()}@x",
                        from_tag=tag, body=SDP_OFFER, content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:caller@127.0.0.1:9>")])


def _charged(proxy, mark: int) -> str:
    """The caller the reply route charged for the one INVITE 200 since ``mark``."""
    line = "e2m: INVITE response 200 "
    assert proxy.wait_log(line, mark), proxy.log_since(mark)[-2000:]
    lines = [entry for entry in proxy.log_since(mark).splitlines() if line in entry]
    assert len(lines) == 1, lines
    assert " caller=" in lines[0], lines[0]
    return lines[0].rsplit(" caller=", 1)[1].strip()


def test_the_reply_route_charges_only_a_caller_the_proxy_authenticated(proxy_factory, pki):
    proxy = proxy_factory("caller", e2m=True, view=SDP_VIEW, auth=True, users=USERS)
    with registered_uas(proxy, "bob", USERS["bob"], "127.0.0.30") as uas:
        uas.responder = _bobs_phone(pki, uas)

        # alice, one of ours: digest proves her From (her SDP is plaintext, unsigned)
        alice = SipUa(proxy.port, user="alice", password=USERS["alice"], source="127.0.0.31")
        stranger = SipUa(proxy.port, user="x1", domain="evil.test", source="127.0.0.32")
        try:
            mark = proxy.log_mark()
            ok = alice.request(_plain_invite("sip:alice@example.com", "a1"))
            assert ok is not None and ok.status == 200, ok
            assert _charged(proxy, mark) == "sip:alice@example.com"

            # a made-up From of another domain reaches bob unchallenged: the shared group
            mark = proxy.log_mark()
            ok = stranger.transact(_plain_invite("sip:x1@evil.test", "x1"))
            assert ok is not None and ok.status == 200, ok
            assert _charged(proxy, mark) == "unauthenticated:"

            # dave of another domain, unchallenged too, but his offer is signed by him
            dave_cred = issue_user(pki.ca, DAVE, "ec")
            dave = UAEngine(UAConfig(aor=DAVE, certificate=dave_cred.cert,
                                     private_key=dave_cred.key, trust_anchors=(pki.ca.cert,),
                                     peers={"sip:bob@example.com": pki.user("bob").cert},
                                     proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),)))
            protected = dave.protect(_plain_invite(DAVE, "d1"))
            assert protected.info.signed and protected.info.encrypted
            signed = protected.message
            mark = proxy.log_mark()
            ok = stranger.transact(signed)
            assert ok is not None and ok.status == 200, ok
            assert _charged(proxy, mark) == DAVE
        finally:
            alice.close()
            stranger.close()
