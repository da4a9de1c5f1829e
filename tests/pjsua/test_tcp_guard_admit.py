"""The TCP guard's admitting gate (review 134 K4): once told its home's addresses, the
listener's kernel completes connections from those alone, on bare sockets (no pjsua).
At some 500 connections a second from a stranger, pjsip's accept queue (backlog 5) was
full whenever the proxy's SYN came, so a shut-for-everyone gate was not enough."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from pjsua_hooks.tcpguard import MAX_ADMITTED, TP_CONNECTED, TcpGuard, admit_program


def _listener(family: int = socket.AF_INET, host: str = "127.0.0.1"
              ) -> tuple[socket.socket, int]:
    listener = socket.socket(family)
    listener.bind((host, 0))
    listener.listen(5)
    return listener, listener.getsockname()[1]


def _connects(source: str, port: int, family: int = socket.AF_INET,
              target: str = "127.0.0.1") -> bool:
    sock = socket.socket(family)
    sock.settimeout(0.6)
    try:
        sock.bind((source, 0))
        sock.connect((target, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


@pytest.fixture
def guarded() -> Iterator[tuple[TcpGuard, int]]:
    listener, port = _listener()
    guard = TcpGuard(lambda h: "in", limit=1, budget=2, accept=True)
    guard.attach_listener(socket.socket(fileno=os.dup(listener.fileno())))
    yield guard, port
    guard.close()
    listener.close()


def test_only_the_admitted_sources_connect(guarded):
    guard, port = guarded
    assert _connects("127.0.0.3", port)                   # no home known yet: open
    guard.admit_only(["127.0.0.2", "not an address", "::ffff:127.0.0.4"])
    assert guard.stats()["admitted_sources"] == 2 and not guard.gate_closed
    assert _connects("127.0.0.2", port) and _connects("127.0.0.4", port)
    assert not _connects("127.0.0.3", port)


def test_the_shut_gate_still_holds_the_home_out_past_the_budget(guarded):
    """The budget guards pjlib's 64 slots (an abort past them), whoever connects."""
    guard, port = guarded
    guard.admit_only(["127.0.0.2"])
    guard.on_state(1, TP_CONNECTED)
    guard.on_state(2, TP_CONNECTED)
    assert guard.gate_closed and not _connects("127.0.0.2", port)


def test_a_new_home_list_replaces_the_old_one(guarded):
    guard, port = guarded
    guard.admit_only(["127.0.0.2"])
    guard.admit_only(["127.0.0.5"])
    assert _connects("127.0.0.5", port) and not _connects("127.0.0.2", port)


def test_an_ipv6_listener_admits_by_ipv6_source():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        listener, port = _listener(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    guard = TcpGuard(lambda h: "in", accept=True)
    guard.attach_listener(socket.socket(fileno=os.dup(listener.fileno())))
    try:
        guard.admit_only(["::2"])
        assert not _connects("::1", port, socket.AF_INET6, "::1")
        guard.admit_only(["::2", "::1"])
        assert _connects("::1", port, socket.AF_INET6, "::1")
    finally:
        guard.close()
        listener.close()


def test_the_program_fits_its_jumps_for_the_most_addresses():
    many = [ipaddress.ip_address(f"2001:db8::{n}") for n in range(MAX_ADMITTED)] + \
        [ipaddress.ip_address(f"192.0.2.{n}") for n in range(MAX_ADMITTED)]
    program = admit_program(many)
    assert len(program) % 8 == 0
    jumps = [struct.unpack("HBBI", program[i:i + 8])[1:3] for i in range(0, len(program), 8)]
    assert all(0 <= j <= 255 for pair in jumps for j in pair)
    with pytest.raises(ValueError):
        admit_program(many * 5)              # past what one filter's jumps reach
