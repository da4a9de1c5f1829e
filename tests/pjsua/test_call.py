"""Calls through the raw hook: SDP rewritten on the wire both ways, media with
the null audio device, hold/unhold re-INVITEs, hang-up, and a refused INVITE."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.pjsua2
pj = pytest.importorskip("pjsua2")

from e2m_plugins import sip  # noqa: E402
from pjsua_hooks.endpoint import SendBlocked, SipEndpoint  # noqa: E402
from pjsua_hooks.rawhook import RawSipHook  # noqa: E402

PLAIN = b"s=pjmedia\r\n"
WIRE = b"s=pjmedia-as-it-crossed-the-wire\r\n"


def swap_sdp(data: bytes, old: bytes, new: bytes) -> bytes | None:
    msg = sip.parse(data)
    if not (msg.get("Content-Type") or "").startswith("application/sdp") or old not in msg.body:
        return None
    return msg.with_body(msg.body.replace(old, new)).serialize()


def state_is(state: int):  # type: ignore[no-untyped-def]
    return lambda e: e["state"] == state


@pytest.mark.parametrize("kind", ["udp", "tcp"])
def test_call_hold_unhold_hangup_with_sdp_rewritten(make_endpoint, kind: str) -> None:  # type: ignore[no-untyped-def]
    wire: list[bytes] = []

    def on_rx(data: bytes) -> bytes | None:
        wire.append(data)
        return swap_sdp(data, WIRE, PLAIN)

    hook = RawSipHook(on_tx=lambda d: swap_sdp(d, PLAIN, WIRE), on_rx=on_rx)
    ep: SipEndpoint = make_endpoint(hook=hook, require_e2m=True)
    ta, tb = ep.add_transport(kind), ep.add_transport(kind)
    alice, bob = ep.add_account("alice", ta), ep.add_account("bob", tb)
    ev = ep.events

    mark = ev.mark()
    call = alice.make_call(tb.uri("bob"))
    incoming = ev.wait("incoming_call", source=bob.uri, since=mark)
    # pjsua (through its rdata clone of the INVITE) saw the restored SDP
    assert PLAIN in incoming["whole_msg"] and WIRE not in incoming["whole_msg"]
    ev.wait("call_state", source=alice.uri, since=mark,
            where=state_is(pj.PJSIP_INV_STATE_CONFIRMED))
    ev.wait("call_state", source=bob.uri, since=mark,
            where=state_is(pj.PJSIP_INV_STATE_CONFIRMED))
    peer = bob.calls[0]
    assert ev.wait_until(lambda: call.media_active and peer.media_active, 5)
    ep.run_for(0.3)   # a little media over the null device

    mark = ev.mark()
    call.hold()
    assert ev.wait_until(lambda: (pj.PJMEDIA_TYPE_AUDIO, pj.PJSUA_CALL_MEDIA_LOCAL_HOLD) in call.media
                         and (pj.PJMEDIA_TYPE_AUDIO, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD) in peer.media, 5)
    mark = ev.mark()
    call.unhold()
    ev.wait("media", source=alice.uri, since=mark)
    assert ev.wait_until(lambda: call.media_active and peer.media_active, 5)

    # every SDP crossed the wire rewritten: offer, answer, both re-INVITEs and answers
    sdp_on_wire = [d for d in wire if b"application/sdp" in d]
    assert len(sdp_on_wire) >= 6
    assert all(WIRE in d and PLAIN not in d for d in sdp_on_wire)
    assert any(d.startswith(b"INVITE ") and b"a=sendonly" in d for d in sdp_on_wire)

    mark = ev.mark()
    call.end()
    ev.wait("call_state", source=alice.uri, since=mark,
            where=state_is(pj.PJSIP_INV_STATE_DISCONNECTED))
    ev.wait("call_state", source=bob.uri, since=mark,
            where=state_is(pj.PJSIP_INV_STATE_DISCONNECTED))
    assert call.disconnected and peer.disconnected
    assert not hook.errors


def test_invite_refused_by_tx_callback_sends_nothing(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    def on_tx(data: bytes) -> bytes | None:
        if data.startswith(b"INVITE "):
            raise PermissionError("E2M required and no certificate for the callee")
        return None

    ep: SipEndpoint = make_endpoint(hook=RawSipHook(on_tx=on_tx), require_e2m=True)
    alice = ep.add_account("alice", ep.add_transport("udp"))
    with pytest.raises(SendBlocked) as info:
        alice.make_call(udp_peer.uri("bob"))
    assert "PermissionError" in str(info.value)
    assert udp_peer.collect(ep.pump, 1.0) == []
    assert not alice.live_calls()
