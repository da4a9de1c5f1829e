"""A ninety-second attacker's review (December 2026) of ea4cf0c: in-dialog requests and
dialog keys, hole 1 on a real Kamailio (the core half and the report:
``tests/unit/test_review92.py``).

Attacker: an insider UA (alice, a party of the call) or an untrusted hop holding the
call's route token.  Messages: alice's signed INVITE through the home proxy (view INVITE
SDP) to bob, bob's 200 sealed under her offer key (the proxy reads it and keeps the key
for the dialog), then a bare BYE in the dialog, routed by its Record-Route, that bob's
phone refuses: CSeq 1 again (pjsip answers ``500`` to a CSeq below the last, RFC 3261
§12.2.2; bob's raw UAS answers 500 as pjsip would), or one naming carol as its sender
(the engine's 403).  The call goes on.  Effect: ``kemi.end_dialog_unread`` dropped the
dialog's key record on the BYE *request*: the key-cache holds nothing for the live call,
and alice's next re-INVITE under the dialog key is answered 496 by her own proxy (bob's
answers in flight go unread: no archive row, no media line).  At fault:
``kamailio_app/kemi.py`` line 1251 (``engine.end_unread`` before relaying) ->
``e2m_plugins/proxy.py`` lines 327/409.  Fix: end the keys at the BYE's 2xx, for its
parties' names only.

Fixed (stop 35): as ``tests/unit/test_review92.py``'s docstring says.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa, answer_under_offer_key, register_contact
from e2m_plugins.sip import SipMessage, make_request, make_response

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)
ALICES_NEW_SDP = SDP_ANSWER.replace(b"o=bob", b"o=alice").replace(b"49172", b"49176")


def _bobs_phone(request: SipMessage) -> SipMessage:
    """bob's side as pjsip answers: the INVITE rings (the test sends his 200 itself), a
    BYE with a CSeq below the dialog's last or a stranger's From is refused, the rest 200."""
    if request.method == "INVITE" and not request.to_tag:
        return make_response(request, 180, "Ringing")
    if request.method == "BYE":
        if request.address("From").uri.startswith("sip:carol@"):
            return make_response(request, 403, "Forbidden")
        if request.cseq[0] <= 1:
            return make_response(request, 500, "Out Of Order")
    return make_response(request, 200, "OK")


def _in_dialog(method: str, pki, ok: SipMessage, bobs_port: int, *, cseq: int,
               sender: str = "alice") -> SipMessage:
    """A request of alice's dialog (its route set from the 200's Record-Route)."""
    request = make_request(method, f"sip:bob@127.0.0.1:{bobs_port}", from_uri=pki.aor(sender),
                           to_uri=pki.aor("bob"), call_id=ok.call_id, cseq=cseq,
                           from_tag=ok.from_tag or "", to_tag=ok.to_tag or "", body=b"")
    for route in reversed(ok.get_all("Record-Route")):
        request = request.add("Route", route)
    return request


def _refused_bye_then_records(proxy_factory, pki, how: str | None) -> tuple[int, int, int]:
    """Returns the key-cache records after bob's 200, after the (refused) BYE, and the
    status of alice's re-INVITE under the dialog key after it."""
    proxy = proxy_factory(f"review92-{how or 'ctl'}", e2m=True, view=SDP_VIEW)
    bob_engine = ua_engine(pki, "bob")
    bob = RawUas(_bobs_phone)
    alice_ua = SipUa(proxy.port, user="alice", timeout=5)
    try:
        register_contact(proxy, "bob", bob.port)
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        call_id = f"review92-{time.monotonic_ns()}@x"
        # her Via before protect: the engine then knows bob's 200 as the answer to it
        # (``_sent_for``), which confirms her offer key for reuse
        offer = alice.protect(invite(pki, call_id=call_id).replace("Via", alice_ua.via()))
        alice_ua.send(offer.message)
        (delivered,) = bob.wait_for(1, method="INVITE")
        ok = answer_under_offer_key(proxy, bob_engine, bob, delivered)
        # the 200 as alice gets it (its Record-Route is her route set)
        deadline = time.monotonic() + 5
        got = None
        while time.monotonic() < deadline:
            got = alice_ua.receive(timeout=1)
            if got is not None and not got.is_request and got.status == 200:
                break
        assert got is not None and got.status == 200, "bob's 200 did not reach alice"
        alice.open(got)
        time.sleep(0.3)
        after_answer = proxy.htable_items()
        if how is not None:
            bye = _in_dialog("BYE", pki, got, bob.port, cseq=1,
                             sender="carol" if how == "third-party" else "alice")
            answer = alice_ua.transact(bye.replace("Via", alice_ua.via()))
            assert answer is not None and answer.status in (403, 500), answer
            time.sleep(0.3)
        after_bye = proxy.htable_items()
        plain = make_request("INVITE", f"sip:bob@127.0.0.1:{bob.port}", from_uri=pki.aor("alice"),
                             to_uri=pki.aor("bob"), call_id=call_id, cseq=2, from_tag="a1",
                             to_tag=got.to_tag or "b1", body=ALICES_NEW_SDP,
                             content_type="application/sdp",
                             extra_headers=[("Contact", f"<sip:alice@127.0.0.1:{alice_ua.local_port}>")])
        again = alice.protect(plain)
        assert again.info.key_reuse          # sealed for the proxy under the dialog key
        again = again.message
        for route in reversed(got.get_all("Record-Route")):
            again = again.add("Route", route)
        reply = alice_ua.transact(again.replace("Via", alice_ua.via()))
        status = reply.status if reply is not None else 0
        return after_answer, after_bye, status
    finally:
        alice_ua.close()
        bob.close()


def test_control_without_the_bye_the_reinvite_is_read(proxy_factory, pki):
    after_answer, after_bye, status = _refused_bye_then_records(proxy_factory, pki, None)
    assert after_answer >= 1 and after_bye == after_answer
    assert status == 200, f"alice's re-INVITE got {status}"


@pytest.mark.parametrize("how", ["stale-cseq", "third-party"])
def test_hole_a_refused_bye_drops_the_live_calls_keys(proxy_factory, pki, how):
    after_answer, after_bye, status = _refused_bye_then_records(proxy_factory, pki, how)
    assert after_answer >= 1
    assert after_bye == after_answer, f"{after_answer} key records before the BYE, {after_bye} after"
    assert status == 200, f"alice's re-INVITE got {status} from her own proxy"
