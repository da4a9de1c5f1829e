"""Review 50 through a real Kamailio: an INVITE 2xx nothing vouches for (here a 200 with no
body, the answer having gone in a reliable 183) keeps the caller's offer key for the dialog
it confirms, from the names the INVITE kept (``$avp(e2m_kept)``, which tm hands back in the
reply route of that transaction).  The engine's side, and a stray's 200 (no transaction,
no names: nothing kept), are in ``tests/unit/test_review50.py``.

Before the fix the key stayed in the early scope alone (one key-cache record), and alice's
first re-INVITE after ``EARLY_DIALOG_TTL`` (200 s) got 496 from her own proxy.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_plugins.sip import SipMessage, make_response

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)


def _bare_200(delivered: SipMessage, bob: RawUas, to_tag: str) -> SipMessage:
    ok = make_response(delivered, 200, "OK", [("Contact", f"<sip:bob@127.0.0.1:{bob.port}>")])
    ok = ok.replace("To", f"{delivered.get('To')};tag={to_tag}")
    for route in delivered.get_all("Record-Route"):
        ok = ok.add("Record-Route", route)
    return ok


def _records_after(proxy, records: int, seconds: float = 2.0) -> int:
    deadline = time.monotonic() + seconds
    while proxy.htable_items() < records and time.monotonic() < deadline:
        time.sleep(0.1)
    return proxy.htable_items()


def _offer_through(proxy, pki, call_id: str) -> tuple[RawUas, SipUa, SipMessage]:
    """alice's signed INVITE offering her key, through ``proxy`` to bob's raw UAS (it
    answers 183 so the transaction stays open); returns (bob, alice's socket, the INVITE
    as bob got it) once the proxy kept her key (one record: the early scope)."""
    bob = RawUas(lambda request: make_response(request, 183, "Session Progress")
                 if request.method == "INVITE" else make_response(request, 200, "OK"))
    alice_ua = SipUa(proxy.port, user="alice", timeout=5)
    register_contact(proxy, "bob", bob.port)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    offer = alice.protect(invite(pki, call_id=call_id)).message
    alice_ua.send(offer.replace("Via", alice_ua.via()))
    (delivered,) = bob.wait_for(1, method="INVITE")
    assert _records_after(proxy, 1) == 1
    return bob, alice_ua, delivered


def test_a_bare_200_in_its_transaction_keeps_the_callers_key_for_the_dialog(proxy_factory, pki):
    proxy = proxy_factory("review50-bare", e2m=True, view=SDP_VIEW)
    bob, alice_ua, delivered = _offer_through(proxy, pki, f"r50w-{time.monotonic_ns()}@x")
    try:
        bob.sock.sendto(_bare_200(delivered, bob, "b1").serialize(), ("127.0.0.1", proxy.port))
        relayed = alice_ua.receive(3)
        while relayed is not None and (relayed.status or 0) < 200:
            relayed = alice_ua.receive(3)
        assert relayed is not None and relayed.status == 200
        # the early scope's record and the dialog's: her key kept for the dialog's life
        assert _records_after(proxy, 2) == 2
    finally:
        alice_ua.close()
        bob.close()

