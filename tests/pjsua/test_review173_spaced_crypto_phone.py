"""Review 173 K1 on the real phone (see tests/unit/test_review173_crypto_name_without_colon.py).

Control for hole K1: pjsua2 2.15.1 reads an ``a=crypto 1 AES_CM_... inline:<key>``
line (a space where RFC 4568 has the colon) as its SDES key.  Two accounts with SRTP
mandatory on one endpoint; a raw hook rewrites every sent ``a=crypto:`` to
``a=crypto `` (offer and answer).  The call is confirmed and both sides' audio is
active (under ``PJMEDIA_SRTP_MANDATORY`` a callee that found no usable key refuses the
offer, 488), so the spaced line carried the key pjsua used; ``e2m_plugins.sdp.has_keys``
said that SDP held no keys, so the split left the key in the proxy's view (the unit
module's K1).  Since stop 49 ``has_keys`` reads the name as pjmedia does and sees it.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.pjsua2
pj = pytest.importorskip("pjsua2")

from e2m_plugins import sip  # noqa: E402
from e2m_plugins.sdp import has_keys  # noqa: E402
from pjsua_hooks.endpoint import SipEndpoint  # noqa: E402
from pjsua_hooks.rawhook import RawSipHook  # noqa: E402


def _spaced(data: bytes) -> bytes | None:
    msg = sip.parse(data)
    if not (msg.get("Content-Type") or "").startswith("application/sdp") \
            or b"a=crypto:" not in msg.body:
        return None
    return msg.with_body(msg.body.replace(b"a=crypto:", b"a=crypto ")).serialize()


def test_control_pjsua_uses_a_crypto_key_whose_name_ends_with_a_space(make_endpoint) -> None:  # type: ignore[no-untyped-def]
    wire: list[bytes] = []
    hook = RawSipHook(on_tx=_spaced, on_rx=lambda d: wire.append(d) or None)
    ep: SipEndpoint = make_endpoint(hook=hook)
    ta, tb = ep.add_transport("udp"), ep.add_transport("udp")
    alice = ep.add_account("alice", ta, srtp=True)
    bob = ep.add_account("bob", tb, srtp=True)
    ev = ep.events
    mark = ev.mark()
    call = alice.make_call(tb.uri("bob"))
    for who in (alice, bob):
        ev.wait("call_state", source=who.uri, since=mark,
                where=lambda e: e["state"] == pj.PJSIP_INV_STATE_CONFIRMED)
    peer = bob.calls[0]
    assert ev.wait_until(lambda: call.media_active and peer.media_active, 5)
    sdps = [sip.parse(d).body for d in wire if b"application/sdp" in d]
    assert len(sdps) >= 2                               # offer and answer
    for body in sdps:
        assert b"a=crypto 1 " in body and b"a=crypto:" not in body and b"inline:" in body
        # what K1 was: e2m saw no key here; since its fix (stop 49) it sees one
        assert has_keys(body)
    mark = ev.mark()
    call.end()
    ev.wait("call_state", source=alice.uri, since=mark,
            where=lambda e: e["state"] == pj.PJSIP_INV_STATE_DISCONNECTED)
    assert not hook.errors
