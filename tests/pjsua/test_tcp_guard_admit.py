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


def test_every_address_of_a_large_home_is_admitted_and_more_is_refused():
    """Review 138 HB1: a home of more addresses than the filter held lost some at
    random.  Now up to ``MAX_ADMITTED`` are all compared (the first and the last of
    each family connect), and more is refused whole."""
    listener, port = _listener()
    guard = TcpGuard(lambda h: "in", accept=True)
    guard.attach_listener(socket.socket(fileno=os.dup(listener.fileno())))
    try:
        v6 = [f"2001:db8::{n}" for n in range(MAX_ADMITTED // 2)]
        v4 = [f"127.0.1.{n}" for n in range(1, MAX_ADMITTED // 2 + 1)]
        guard.admit_only(v6 + v4)
        assert guard.stats()["admitted_sources"] == MAX_ADMITTED
        assert _connects(v4[0], port) and _connects(v4[-1], port)
        assert not _connects("127.0.2.1", port)
        with pytest.raises(ValueError):
            guard.admit_only(v4 + [f"127.0.3.{n}" for n in range(1, 40)])
        assert guard.stats()["admitted_sources"] == MAX_ADMITTED      # unchanged
    finally:
        guard.close()
        listener.close()


def test_no_conditional_jump_of_the_program_reaches_past_its_address():
    many = [ipaddress.ip_address(f"2001:db8::{n}") for n in range(MAX_ADMITTED)] + \
        [ipaddress.ip_address(f"192.0.2.{n}") for n in range(MAX_ADMITTED)]
    program = admit_program(many)
    insns = [struct.unpack("HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    assert len(insns) <= 4096                                  # BPF_MAXINSNS
    assert all(jt <= 7 and jf <= 7 for code, jt, jf, _ in insns if code == 0x15)
