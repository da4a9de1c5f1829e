"""Review 15's second hole on a real Kamailio: a third party who knows a call's Call-ID and
the caller's From tag must not empty the caller's early keys while the callee rings.

mallory learnt both (alice's call reached her first and she forwarded it with a 302, or
any branch alice's INVITE reached).  Before the fix she could drop alice's offer key in
two ways, each tried here against the proxy's own transaction handling:

* a bare BYE under those ids with a made-up To tag, routed with the Record-Route token
  the INVITE carried (``end_dialog_unread`` dropped the early scope with the BYE's), or
  with no To tag at all (its scope was the early scope itself);
* an INVITE of her own under those ids, to her own phone, which answers 486 (tm's
  failure route, ``drop_attempt_keys``, dropped every key of that early dialog).

Then bob's 200, sealed under alice's offer key, went unread: not in the archive, and
alice's requests in the call would get 496.  Each test failed before the fix (the
offer's record was gone); tests/unit/test_review15.py has the same attacks in the core.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa, answer_under_offer_key, register_contact
from e2m_plugins.sip import SipMessage, make_request, make_response

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mallorys_bye(delivered: SipMessage, bobs_port: int) -> SipMessage:
    """A bare BYE in a dialog alice never had: her Call-ID and tag, a made-up To tag, the
    route set the INVITE recorded (a UAS's route set is the Record-Route as received)."""
    bye = make_request("BYE", f"sip:bob@127.0.0.1:{bobs_port}", from_uri=delivered.address("From").uri,
                       to_uri=delivered.address("To").uri, call_id=delivered.call_id, cseq=9,
                       from_tag=delivered.from_tag or "", to_tag="m4deup", body=b"")
    for route in delivered.get_all("Record-Route"):
        bye = bye.add("Route", route)
    return bye


def _mallorys_invite(delivered: SipMessage) -> SipMessage:
    """Her own bodyless INVITE to her own phone, under alice's Call-ID and From tag."""
    return make_request("INVITE", "sip:mallory@example.com",
                        from_uri="sip:mallory@elsewhere.example", to_uri="sip:mallory@example.com",
                        call_id=delivered.call_id, cseq=7, from_tag=delivered.from_tag or "",
                        body=b"", extra_headers=[("Contact", "<sip:mallory@127.0.0.1:9>")])


@pytest.mark.parametrize("attack", ["a bare BYE", "a BYE without a To tag", "a failed INVITE"])
def test_a_third_party_cannot_drop_the_callers_early_keys(proxy_factory, pki, attack):
    proxy = proxy_factory("review15", e2m=True, view=SDP_VIEW)
    bob_engine = ua_engine(pki, "bob")
    bob = RawUas(lambda request: make_response(request, 180, "Ringing")
                 if request.method == "INVITE" else make_response(request, 200, "OK"))
    mallorys_phone = RawUas(lambda request: make_response(request, 486, "Busy Here")
                            if request.method == "INVITE" else make_response(request, 200, "OK"))
    alice_ua, mallory = SipUa(proxy.port, user="alice", timeout=5), SipUa(proxy.port, user="mallory")
    try:
        register_contact(proxy, "bob", bob.port)
        register_contact(proxy, "mallory", mallorys_phone.port)
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        offer = alice.protect(invite(pki, call_id=f"review15-{time.monotonic_ns()}@x")).message
        alice_ua.send(offer.replace("Via", alice_ua.via()))
        (delivered,) = bob.wait_for(1, method="INVITE")
        assert proxy.htable_items() == 1                  # alice's offer key, kept early

        if "BYE" in attack:
            bye = _mallorys_bye(delivered, bob.port).replace("Via", mallory.via())
            if attack == "a BYE without a To tag":
                bye = bye.replace("To", delivered.get("To"))
            mallory.send(bye)
            assert bob.wait_for(1, method="BYE"), "the BYE was not relayed"
        else:
            failed = mallory.transact(_mallorys_invite(delivered))
            assert failed is not None and failed.status == 486, failed
        time.sleep(0.3)                                   # the route has run
        assert proxy.htable_items() == 1, f"{attack} dropped alice's offer key"

        # bob answers under alice's offer key: the proxy must read it
        answer_under_offer_key(proxy, bob_engine, bob, delivered)
        deadline = time.monotonic() + 5
        while len(proxy.archive_rows()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = proxy.archive_rows()       # compared by digest: a failure prints no SDP
        assert [(r.direction, r.sha256) for r in rows] == [
            ("request", _sha256(SDP_OFFER)), ("response", _sha256(SDP_ANSWER))], \
            "bob's 200 went unread"
    finally:
        for peer in (alice_ua, mallory, bob, mallorys_phone):
            peer.close()
