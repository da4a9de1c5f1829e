"""A ninetieth attacker's review (December 2026) of ea4cf0c: the proxy's Record-Route
filter, the phone's half: what pjsip does with the route set the filter lets through.

The filter (``kemi.moved_route_entries``) checks our own entry only with ``KSR.is_myself``
(host, port, transport) and the MAC after its token covers only the entries *below* it:
a hop on the callee's leg may add ``;maddr=<its address>`` to our entry, which still
names our socket (``tests/kamailio/test_review90_wire.py``,
``test_hole_a_maddr_added_to_our_entry_passes_the_filter``).  Here: pjsip (the phone's
stack) sends to the route's ``maddr`` (RFC 3261 19.1.1, RFC 3263), so the caller's ACK,
BYE and re-INVITEs leave for the hop's address.  Alice calls a bare UDP peer that
answers 200 with ``Record-Route: <sip:127.0.0.1:P;lr;maddr=127.0.0.2>``: her ACK goes to
127.0.0.2:P.  The control: the same entry without ``maddr`` brings her ACK to 127.0.0.1:P.

No hole is marked here (this is pjsip's documented behaviour, not the project's code):
both tests are controls that the wire hole has the effect it claims.

Fixed (stop 35): as ``tests/unit/test_review90.py``'s docstring says.
"""

from __future__ import annotations

import socket
import time

import pytest

pytestmark = pytest.mark.pjsua2

pj = pytest.importorskip("pjsua2")

from e2m_plugins import sip  # noqa: E402
from pjsua_hooks.endpoint import SipEndpoint  # noqa: E402

SDP = (b"v=0\r\no=bob 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40090 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def _ack_destination(make_endpoint, udp_peer, maddr: str | None) -> str | None:
    """Which address alice's ACK reaches: '127.0.0.1' (the peer), '127.0.0.2' (the
    hop listening on the peer's port there), or None."""
    hop = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hop.bind(("127.0.0.2", udp_peer.port))
    hop.setblocking(False)
    try:
        ep: SipEndpoint = make_endpoint()
        acc = ep.add_account("alice", ep.add_transport("udp"))
        acc.make_call(udp_peer.uri("bob"))
        grams = udp_peer.collect(ep.pump, 3.0, until=lambda g: any(
            d.startswith(b"INVITE ") for d in g))
        invite_data = next(d for d in grams if d.startswith(b"INVITE "))
        invite = sip.parse(invite_data)
        port = int(invite.get("Via").split()[1].split(";")[0].rsplit(":", 1)[1])
        entry = f"<sip:127.0.0.1:{udp_peer.port};lr{';maddr=' + maddr if maddr else ''}>"
        ok = sip.make_response(invite, 200, "OK", [
            ("Record-Route", entry),
            ("Contact", f"<sip:bob@127.0.0.1:{udp_peer.port}>")])
        ok = ok.replace("To", f"{invite.get('To')};tag=b90")
        ok = ok.with_body(SDP, "application/sdp")
        udp_peer.received.clear()
        udp_peer.send(ok.serialize(), port)
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            ep.pump(10)
            udp_peer.drain()
            if any(d.startswith(b"ACK ") for d, _ in udp_peer.received):
                return "127.0.0.1"
            try:
                data, _ = hop.recvfrom(65535)
            except BlockingIOError:
                continue
            if data.startswith(b"ACK "):
                return "127.0.0.2"
        return None
    finally:
        hop.close()


def test_control_alices_ack_follows_the_record_route_entry(make_endpoint, udp_peer):
    assert _ack_destination(make_endpoint, udp_peer, None) == "127.0.0.1"


def test_control_alices_ack_goes_to_the_maddr_of_the_entry(make_endpoint, udp_peer):
    """pjsip honours ``maddr`` in a route: the entry the wire hole lets through sends
    alice's in-dialog requests to the hop's address."""
    assert _ack_destination(make_endpoint, udp_peer, "127.0.0.2") == "127.0.0.2"
