"""Review 125: PLACEHOLDER, filled in below."""

from __future__ import annotations

import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact, udp_transaction
from e2m_plugins.sip import make_request, make_response

pytestmark = pytest.mark.kamailio


def _ringing(request):
    return make_response(request, 180, "Ringing") if request.method == "INVITE" else None


def _answer(request):
    """mallory's own UAS (registered as carol): every INVITE answered 200 with a Contact."""
    if request.method != "INVITE":
        return None
    return make_response(request, 200, "OK",
                         extra_headers=[("Contact", "<sip:carol@127.0.0.72:5998>")])


def _invite(call_id: str, from_tag: str, to_user: str, from_user: str, port: int):
    return make_request("INVITE", f"sip:{to_user}@example.com",
                        from_uri=f"sip:{from_user}@elsewhere.example",
                        to_uri=f"sip:{to_user}@example.com", call_id=call_id,
                        from_tag=from_tag, extra_headers=[
                            ("Contact", f"<sip:{from_user}@127.0.0.1:{port}>")])


def _items(proxy) -> int:
    return proxy.htable_items("e2mtargets")


def _set_up(proxy_factory, name: str):
    proxy = proxy_factory(name, e2m=True)
    bob, carol = RawUas(_ringing), RawUas(_answer)
    register_contact(proxy, "bob", bob.port)
    register_contact(proxy, "carol", carol.port, source="127.0.0.72")
    return proxy, bob, carol


def _ring_bob(proxy, bob, call_id: str) -> SipUa:
    alice = SipUa(proxy.port, user="alice", timeout=3)
    alice.send(_invite(call_id, "alice-tag", "bob", "alice", alice.local_port)
               .replace("Via", alice.via()))
    assert bob.wait_for(1, method="INVITE"), "alice's INVITE did not reach bob"
    time.sleep(0.2)
    return alice


@pytest.mark.xfail(strict=True, reason="review 125 hole K3: a stranger's INVITE under alice's "
                   "Call-ID/tag answered 200 (keyless) removes alice's ringing caller note")
def test_hole_k3_a_strangers_answered_invite_takes_alices_ringing_note(proxy_factory):
    proxy, bob, carol = _set_up(proxy_factory, "r125-owner200")
    call_id = f"r125-{time.monotonic_ns()}@x"
    alice = _ring_bob(proxy, bob, call_id)
    try:
        before = _items(proxy)
        assert before == 1                           # alice's caller-target note
        forged = _invite(call_id, "alice-tag", "carol", "mallory", 5999)
        reply = udp_transaction(proxy.port, forged, timeout=5, source="127.0.0.93")
        assert reply is not None and reply.status == 200, reply
        assert carol.wait_for(1, method="INVITE")
        time.sleep(0.3)
        # secure: a 2xx to an INVITE whose transaction did not write the note leaves it
        assert _items(proxy) == 1, "the stranger's 200 removed alice's note"
    finally:
        alice.close()
        bob.close()
        carol.close()


def test_control_k3_a_strangers_own_answered_invites_leave_alices_note(proxy_factory):
    proxy, bob, carol = _set_up(proxy_factory, "r125-owner200-c")
    alice = _ring_bob(proxy, bob, f"r125-c-{time.monotonic_ns()}@x")
    try:
        assert _items(proxy) == 1
        for n in range(3):
            own = _invite(f"mallory-{n}-{time.monotonic_ns()}@x", f"m{n}", "carol",
                          "mallory", 5999)
            reply = udp_transaction(proxy.port, own, timeout=5, source="127.0.0.93")
            assert reply is not None and reply.status == 200, reply
        assert len(carol.wait_for(3, method="INVITE")) == 3
        time.sleep(0.3)
        assert _items(proxy) == 1        # alice's only: each keyless 200 took its own note
    finally:
        alice.close()
        bob.close()
        carol.close()
