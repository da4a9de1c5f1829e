"""Review 52 hole 1 through a real Kamailio: tm hands a 2xx to the INVITE's onreply route
(with ``$avp(e2m_kept)``) by its Via branch alone, whatever its To says, and
``_keep_unvouched`` counts its copies per pair of AoRs the 2xx writes: bare 200s in
alice's INVITE transaction, each with a new To AoR and tag, each copy her key into a new
dialog record for 12 h (hole 1); and a bare 200 with a made-up To tag, then a BYE for
that made-up dialog, take the ringing INVITE's early key with the copy (hole 3).  The
engine's side: ``tests/unit/test_review52.py``.

Fixed by withdrawing the copies (a bodiless INVITE 2xx is forwarded unread again): the
holes' assertions hold, and the tests guard that they keep holding.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_plugins.proxy import MAX_FORKS
from e2m_plugins.sip import SipMessage, make_request, make_response

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)


def _bare_200(delivered: SipMessage, bob: RawUas, to_tag: str) -> SipMessage:
    ok = make_response(delivered, 200, "OK", [("Contact", f"<sip:bob@127.0.0.1:{bob.port}>")])
    ok = ok.replace("To", f"{delivered.get('To')};tag={to_tag}")
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

FLOOD = 12


def _flood(proxy, pki, call_id: str, *, new_aor: bool) -> int:
    bob, alice_ua, delivered = _offer_through(proxy, pki, call_id)
    try:
        for n in range(FLOOD):
            ok = _bare_200(delivered, bob, f"x{n}")
            if new_aor:
                ok = ok.replace("To", f"<sip:bob{n}@{pki.domain}>;tag=x{n}")
            bob.sock.sendto(ok.serialize(), ("127.0.0.1", proxy.port))
            time.sleep(0.02)
        return _records_after(proxy, 1 + FLOOD, 1.5)
    finally:
        alice_ua.close()
        bob.close()


def test_hole_200s_with_new_to_aors_each_copy_her_key(proxy_factory, pki):
    """Attacker: bob's side (the callee's phone, or a hop past the proxy: whoever sees
    the proxy's Via branch).  Steps: alice's signed INVITE offering her key, answered 183
    (the transaction stays open); 12 bare 200s through that branch, ``To:
    <sip:bob<n>@example.com>;tag=x<n>``.  Effect: 13 key-cache records (the early scope
    and 12 dialogs, each alice's key for 12 h on her quota), where review 50 promises at
    most ``MAX_FORKS`` dialogs per early dialog.  Fix: count the copies per INVITE (its
    Call-ID and From tag), or copy only when the 2xx's AoRs are the INVITE's."""
    proxy = proxy_factory("review52-aors", e2m=True, view=SDP_VIEW)
    records = _flood(proxy, pki, f"r52w-{time.monotonic_ns()}@x", new_aor=True)
    assert records <= 1 + MAX_FORKS, f"{records} key-cache records after {FLOOD} bare 200s"


def test_control_200s_with_bobs_aor_copy_nothing_either(proxy_factory, pki):
    proxy = proxy_factory("review52-aors-ctl", e2m=True, view=SDP_VIEW)
    records = _flood(proxy, pki, f"r52w-ctl-{time.monotonic_ns()}@x", new_aor=False)
    assert records == 1          # under review 50's copies: 1 + MAX_FORKS


def _made_up_dialog_ended(proxy, pki, call_id: str, *, copy: bool) -> tuple[int, int]:
    """alice's INVITE rings (183); bob's side sends (``copy``) a bare 200 To tag x0 through
    the INVITE's branch, then a BYE for dialog (C, a1, x0) through the proxy (its
    Record-Route as the Route set).  Returns the key-cache records before the BYE and
    after it."""
    bob, alice_ua, delivered = _offer_through(proxy, pki, call_id)
    try:
        if copy:
            bob.sock.sendto(_bare_200(delivered, bob, "x0").serialize(),
                            ("127.0.0.1", proxy.port))
        before = _records_after(proxy, 2 if copy else 1, 0.5)
        bye = make_request("BYE", delivered.address("Contact").uri if delivered.get("Contact")
                           else f"sip:alice@{pki.domain}",
                           from_uri=delivered.address("To").uri,
                           to_uri=delivered.address("From").uri, call_id=delivered.call_id,
                           cseq=7, from_tag="x0", to_tag=delivered.from_tag,
                           via_host=f"127.0.0.1:{bob.port}")
        for route in delivered.get_all("Record-Route"):
            bye = bye.add("Route", route)
        bob.sock.sendto(bye.serialize(), ("127.0.0.1", proxy.port))
        deadline = time.monotonic() + 2
        while proxy.htable_items() >= before and time.monotonic() < deadline:
            time.sleep(0.1)
        return before, proxy.htable_items()
    finally:
        alice_ua.close()
        bob.close()


def test_hole_a_made_up_200_and_its_bye_drop_the_ringing_calls_key(proxy_factory, pki):
    """Attacker: bob's side (the callee's phone, or a hop past the proxy) while alice's
    call rings.  Steps: a bare 200 To tag x0 through the INVITE's branch (the proxy copies
    alice's key into dialog (C, a1, x0)); a BYE for that dialog through the proxy.
    Effect: the BYE takes the copy and, by its name, alice's key in the early scope: no
    record is left, so bob's real answer sealed under her key is unreadable and her
    re-INVITEs get 496 (``tests/unit/test_review52.py``).  Fix: a BYE of a dialog an
    unvouched copy made takes only that copy, never the early scope's key."""
    proxy = proxy_factory("review52-bye", e2m=True, view=SDP_VIEW)
    before, after = _made_up_dialog_ended(proxy, pki, f"r52w-bye-{time.monotonic_ns()}@x",
                                          copy=True)
    assert before == 1            # the bare 200 copies nothing now (under review 50's: 2)
    assert after >= 1, "the BYE of a made-up dialog left no key of alice's ringing call"


def test_control_the_bye_alone_leaves_the_ringing_calls_key(proxy_factory, pki):
    proxy = proxy_factory("review52-bye-ctl", e2m=True, view=SDP_VIEW)
    before, after = _made_up_dialog_ended(proxy, pki, f"r52w-bye-ctl-{time.monotonic_ns()}@x",
                                          copy=False)
    assert before == after == 1
