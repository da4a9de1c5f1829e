"""A failed INVITE removes its caller's target note only when its own transaction wrote
it (stop 41), on a real Kamailio.

The hole (found on stop 40's last read of its diff, not by a review): an **off-path
sender** or **insider UA** who knows alice's Call-ID and From tag (an untrusted hop
reads them) sends, while alice's INVITE rings, an INVITE of its own with them, to a
user who refuses it (486).  ``end_failed_invite_notes`` removed the caller's target
note ``c<digest(Call-ID, tag)>`` whoever had written it: alice's went, so her call's
2xx had no caller target to bind, and the BYE's 2xx could not end the dialog's keys
(they lived to their TTL: the documented fallback, not a disclosure).  Before the fix
``test_a_strangers_failing_invite_leaves_alices_ringing_note`` read 0 items after the
stranger's 486 (1 before it).

The fix: ``note_caller_target`` marks, in the transaction's AVP ``e2m_target_mine``,
that it wrote the note; the failure route removes it only under that mark.

Controls: a stranger's failing INVITE under its own ids leaves nothing behind (the
failure route still removes the note it wrote itself), and alice's INVITE still
notes its caller's target.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact, udp_transaction
from e2m_plugins.sip import make_request, make_response

pytestmark = pytest.mark.kamailio


def _ringing(request):
    return make_response(request, 180, "Ringing") if request.method == "INVITE" else None


def _busy(request):
    return make_response(request, 486, "Busy Here") if request.method == "INVITE" else None


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
    bob, carol = RawUas(_ringing), RawUas(_busy)
    register_contact(proxy, "bob", bob.port)
    register_contact(proxy, "carol", carol.port, source="127.0.0.72")
    return proxy, bob, carol


def _ring_bob(proxy, bob, call_id: str) -> SipUa:
    """alice's INVITE to bob, left ringing (bob answers 180 only)."""
    alice = SipUa(proxy.port, user="alice", timeout=3)
    alice.send(_invite(call_id, "alice-tag", "bob", "alice", alice.local_port)
               .replace("Via", alice.via()))
    assert bob.wait_for(1, method="INVITE"), "alice's INVITE did not reach bob"
    time.sleep(0.2)
    return alice


def test_a_strangers_failing_invite_leaves_alices_ringing_note(proxy_factory):
    proxy, bob, carol = _set_up(proxy_factory, "owner")
    call_id = f"owner-{time.monotonic_ns()}@x"
    alice = _ring_bob(proxy, bob, call_id)
    try:
        assert _items(proxy) == 1                   # alice's caller-target note
        # mallory: alice's Call-ID and From tag, to carol, who refuses it
        forged = _invite(call_id, "alice-tag", "carol", "mallory", 5999)
        reply = udp_transaction(proxy.port, forged, timeout=5, source="127.0.0.93")
        assert reply is not None and reply.status == 486, reply
        assert carol.wait_for(1, method="INVITE")
        time.sleep(0.3)
        assert _items(proxy) == 1, "the stranger's 486 removed alice's note"
    finally:
        alice.close()
        bob.close()
        carol.close()


def test_control_a_failing_invite_removes_the_note_it_wrote(proxy_factory):
    proxy, bob, carol = _set_up(proxy_factory, "owner-control")
    alice = _ring_bob(proxy, bob, f"owner-c-{time.monotonic_ns()}@x")
    try:
        assert _items(proxy) == 1
        for n in range(3):
            own = _invite(f"mallory-{n}-{time.monotonic_ns()}@x", f"m{n}", "carol",
                          "mallory", 5999)
            reply = udp_transaction(proxy.port, own, timeout=5, source="127.0.0.93")
            assert reply is not None and reply.status == 486, reply
        assert len(carol.wait_for(3, method="INVITE")) == 3
        time.sleep(0.3)
        assert _items(proxy) == 1          # alice's only: each 486 took its own note
    finally:
        alice.close()
        bob.close()
        carol.close()
