"""A UDP ``e2m-phone`` also listens on TCP at its UDP port (stop 43, review 132 HB2).

RFC 3261 18.1.1 moves a request above 1300 octets to TCP, to the port the UA gave for
UDP; 18.2.1 says a UA listening for UDP on a port listens for TCP there too.  The
certificate service does exactly that with a large certificate's NOTIFY
(``tests/e2e/test_review132_large_cert_notify.py``).  Here, from a stranger's seat
(``e2m_lab/stranger.py``, the fixtures of ``test_phone_stranger.py``, no Kamailio), what
the new listener must not give away:

- it exists at the UDP port, and ``udp_tcp_listener = false`` takes it away;
- the TCP guard bounds it as on a TCP phone (a flood, idle and half-sent connections);
- a request over it is held to the home: from the proxy's address at any port it is
  the home's (as on a TCP phone); from another address the connection is not even
  completed (stop 44: the gate admits the home's addresses alone), and the port rule
  for datagrams is unchanged;
- the phone's own requests stay on UDP, Via and all, even above 1300 octets.
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from e2m_lab.stranger import (HOST, UdpStranger, final_answer_over, sip_request, tcp_flood,
                              tcp_probe)
from e2m_plugins import sip
from tests.e2e.test_phone_stranger import ALICE, assert_serving, lab, pki  # noqa: F401

pytestmark = [pytest.mark.pjsua2]

OTHER_HOST = "127.0.0.2"    # a stranger's address: loopback, not the proxy's


def _tcp_request(port: int, method: str, *, source: str = HOST,
                 timeout: float = 5.0) -> sip.SipMessage | None:
    """``method`` over a fresh TCP connection from ``source`` to the phone; its final
    answer (None: none within ``timeout``)."""
    sock = socket.socket()
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect((HOST, port))
        local = sock.getsockname()[1]
        call_id = uuid.uuid4().hex
        sock.sendall(sip_request(method, f"sip:bob@{HOST}:{port};transport=tcp",
                                 via=f"SIP/2.0/TCP {source}:{local}", call_id=call_id,
                                 body=b"hello" if method == "MESSAGE" else b"",
                                 content_type="text/plain" if method == "MESSAGE" else None))
        return final_answer_over(sock, timeout)
    except OSError:
        return None
    finally:
        sock.close()


def test_a_udp_phone_listens_on_tcp_at_its_udp_port(lab):
    bob = lab.phone(phone={"transport": "udp"})
    assert bob.of("started")[0]["tcp_listener"] is True
    took = tcp_probe(bob.port, timeout=3)
    assert took is not None, "no answer over TCP at the UDP phone's port"
    status = bob.status()["tcp"]
    assert status["listener_found"] and status["accepting"], status
    assert_serving(bob, lab.stranger(bob), "UDP after a TCP probe")


def test_the_listener_can_be_turned_off(lab):
    bob = lab.phone(phone={"transport": "udp", "udp_tcp_listener": False})
    assert bob.of("started")[0]["tcp_listener"] is False
    assert tcp_probe(bob.port, timeout=1.5) is None
    assert bob.status()["tcp"] is None
    assert_serving(bob, lab.stranger(bob))


def test_a_registered_udp_phone_accepts_tcp_by_default(lab):
    """A TCP phone with a registrar refuses every connection (``tcp_accept``); a UDP
    phone's listener exists for its proxy to connect to, so it accepts."""
    from pjsua_hooks.phone import PhoneSettings

    registrar = lab.registrar([])
    assert PhoneSettings(registrar=registrar.uri).accepts_tcp is True
    assert PhoneSettings(registrar=registrar.uri, transport="tcp").accepts_tcp is False
    bob = lab.phone(phone={"transport": "udp", "registrar": registrar.uri})
    bob.wait("registered", timeout=10)
    assert bob.status()["tcp"]["accepting"] is True
    assert tcp_probe(bob.port, timeout=3) is not None


def test_a_tcp_flood_on_a_udp_phones_port_is_bounded_as_on_a_tcp_phone(lab):
    bob = lab.phone(phone={"transport": "udp", "tcp_max_connections": 8})
    stranger = lab.stranger(bob)
    held = tcp_flood(bob.port, 200, close_every=2)
    try:
        time.sleep(1.0)
        assert bob.alive, f"the phone died under a TCP flood (rc={bob.process.returncode})"
        assert_serving(bob, stranger, "UDP during the TCP flood")
        took = None
        deadline = time.monotonic() + 20
        while took is None and time.monotonic() < deadline:
            took = tcp_probe(bob.port, timeout=4)
        assert took is not None, "no new TCP client got an answer while the flood held on"
        status = bob.status()["tcp"]
        assert status["incoming"] <= status["limit"] == 8, status
        assert status["evicted"] + status["gate_closings"] > 0, status
        assert bob.alive
    finally:
        for sock in held:
            sock.close()


def test_idle_and_half_sent_connections_to_a_udp_phone_are_closed(lab):
    bob = lab.phone(phone={"transport": "udp", "tcp_idle_timeout": 2.0})
    held = tcp_flood(bob.port, 6, close_every=0)
    half = tcp_flood(bob.port, 3, close_every=0)
    for sock in half:
        sock.setblocking(True)
        sock.sendall(b"OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 1")
    try:
        time.sleep(1.0)
        assert bob.status()["tcp"]["incoming"] >= 6
        time.sleep(4.0)
        closed = 0
        for sock in held + half:
            sock.setblocking(True)
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == 9, f"only {closed} of 9 idle connections were closed"
        assert bob.status()["tcp"]["incoming"] == 0
    finally:
        for sock in held + half:
            sock.close()


def test_a_request_over_tcp_is_held_to_the_home_by_address(lab):
    """bob's home is a registrar/proxy on 127.0.0.1 (UDP).  Over TCP: from 127.0.0.1,
    any port, the home's (200); from 127.0.0.2, a stranger's connection is never
    completed (the guard's gate admits the home's addresses alone, review 134 K4:
    before, it was completed and the request answered 403, ``request_refused``).  Over
    UDP from 127.0.0.1 but not the proxy's port: 403, as before."""
    home = lab.registrar([])
    bob = lab.phone(phone={"transport": "udp", "registrar": home.uri, "proxy": home.uri})
    bob.wait("registered", timeout=10)

    ok = _tcp_request(bob.port, "OPTIONS", source=HOST)
    assert ok is not None and ok.status == 200, ok and ok.start_line
    accepted = bob.status()["tcp"]["accepted"]
    assert bob.status()["tcp"]["admitted_sources"] == 1

    for method in ("OPTIONS", "MESSAGE"):
        assert _tcp_request(bob.port, method, source=OTHER_HOST, timeout=2) is None
    status = bob.status()["tcp"]
    assert status["accepted"] == accepted and not status["gate_closed"], status
    assert not bob.of("message_in") and not bob.of("request_refused")

    stranger = UdpStranger(bob.port)
    try:
        _, call_id = stranger.request("OPTIONS")
        assert stranger.final(call_id, timeout=5) == 403
    finally:
        stranger.close()


def test_the_phones_own_large_request_stays_on_udp(lab):
    """A MESSAGE above 1300 octets leaves over UDP with a UDP Via (the account is bound
    to the UDP transport; pjsip's switch to TCP is skipped), as before the listener."""
    proxy = UdpStranger(1)      # only its socket: it receives what bob sends it
    lab.closers.append(proxy)
    bob = lab.phone(phone={"transport": "udp", "proxy": f"sip:{HOST}:{proxy.local_port}"})
    bob.send(f"message {ALICE} {'x' * 1500}")
    deadline = time.monotonic() + 10
    got: list[bytes] = []
    while not got and time.monotonic() < deadline:
        got = [d for d in proxy.drain(0.5) if d.startswith(b"MESSAGE ")]
    assert got, "bob's large MESSAGE never reached his proxy over UDP"
    message = sip.parse(got[0])
    assert len(got[0]) > 1300
    assert (message.get("Via") or "").startswith("SIP/2.0/UDP "), message.get("Via")
    contact = message.get("Contact") or ""
    assert "transport=tcp" not in contact.lower(), contact
