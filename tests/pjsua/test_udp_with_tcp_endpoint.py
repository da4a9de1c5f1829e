"""``SipEndpoint.add_udp_with_tcp`` (stop 43, review 132 HB2): a UDP transport and a TCP
listener at one address and port (RFC 3261 18.2.1), in process.

- both at one port, the TCP guard on the listener (its listening socket found, an
  accepted connection counted);
- the hook tells a message that came over TCP from a datagram (``rx_over_tcp``), and
  the source of each;
- a port taken for TCP: an explicit port fails and leaves no UDP transport behind;
  port 0 tries another port.

The phone on top (a stranger's seat, the home rule): ``tests/e2e/test_udp_phone_tcp_listener.py``.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.pjsua2
pj = pytest.importorskip("pjsua2")

from e2m_lab.stranger import sip_request  # noqa: E402
from pjsua_hooks.endpoint import SipEndpoint  # noqa: E402
from pjsua_hooks.rawhook import RawSipHook  # noqa: E402


def _pump_until(ep: SipEndpoint, done: Callable[[], bool], seconds: float = 3.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ep.pump(10)
        if done():
            return True
    return False


def _options(port: int, via: str) -> bytes:
    return sip_request("OPTIONS", f"sip:probe@127.0.0.1:{port}", via=via,
                       call_id=uuid.uuid4().hex)


def test_udp_and_tcp_share_one_port_and_the_guard_holds_the_listener(make_endpoint: Any) -> None:
    seen: list[tuple[bool, tuple[str, int] | None]] = []
    hook = RawSipHook()
    ep: SipEndpoint = make_endpoint(hook=hook, tcp={"limit": 4})
    udp, tcp = ep.add_udp_with_tcp()
    assert (udp.kind, tcp.kind) == ("udp", "tcp")
    assert (udp.host, udp.port) == (tcp.host, tcp.port)
    guard = ep.tcp_guard
    assert guard is not None and guard.stats()["listener_found"] and guard.limit == 4

    def on_rx(data: bytes) -> None:
        if data.startswith(b"OPTIONS "):
            seen.append((hook.rx_over_tcp, hook.rx_source))

    hook.on_rx = on_rx
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stream = socket.create_connection((tcp.host, tcp.port), timeout=3)
    try:
        datagram.bind(("127.0.0.1", 0))
        datagram.sendto(_options(udp.port, f"SIP/2.0/UDP 127.0.0.1:{datagram.getsockname()[1]}"),
                        (udp.host, udp.port))
        assert _pump_until(ep, lambda: len(seen) == 1)
        stream.sendall(_options(tcp.port, f"SIP/2.0/TCP 127.0.0.1:{stream.getsockname()[1]}"))
        assert _pump_until(ep, lambda: len(seen) == 2)
        assert seen[0] == (False, ("127.0.0.1", datagram.getsockname()[1]))
        assert seen[1] == (True, ("127.0.0.1", stream.getsockname()[1]))
        assert hook.rx_over_tcp is False                  # only during on_rx
        assert guard.stats()["incoming"] == 1 and guard.counts["accepted"] == 1
        stream.settimeout(3)
        assert stream.recv(4096).startswith(b"SIP/2.0 ")  # answered on that connection
    finally:
        datagram.close()
        stream.close()


def test_an_explicit_port_taken_for_tcp_fails_and_leaves_no_udp_behind(make_endpoint: Any) -> None:
    ep: SipEndpoint = make_endpoint()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        with pytest.raises(Exception):  # noqa: B017 - pj.Error
            ep.add_udp_with_tcp(port)
        assert ep.transports == {} and ep.tcp_guard is None
    finally:
        blocker.close()
    ep.run_for(0.5)                                  # pjsip destroys a closed transport late
    udp, tcp = ep.add_udp_with_tcp(port)             # the UDP port was let go
    assert udp.port == tcp.port == port


def test_port_0_tries_another_port_when_tcp_is_taken(make_endpoint: Any) -> None:
    ep: SipEndpoint = make_endpoint()
    real = ep.add_transport
    failed: list[int] = []

    def add_transport(kind: str = "udp", port: int = 0, **kwargs: Any) -> Any:
        if kind == "tcp" and not failed:
            failed.append(port)
            raise RuntimeError("taken")              # as pjsua's bind error would
        return real(kind, port, **kwargs)

    ep.add_transport = add_transport  # type: ignore[method-assign]
    udp, tcp = ep.add_udp_with_tcp()
    assert failed and udp.port == tcp.port
    assert sorted(t.kind for t in ep.transports.values()) == ["tcp", "udp"]
