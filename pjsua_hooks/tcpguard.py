"""Keeps a phone's TCP transport below pjlib's handle limit.

pjsip registers every socket of the SIP endpoint (the listener, each TCP connection,
accepted or opened) with one ioqueue of ``PJ_IOQUEUE_MAX_HANDLES`` slots: 64 in the
pinned wheel (measured; ``pjsua_hooks/README.md``, "TCP").  A closed socket's slot comes back
only ``PJ_IOQUEUE_KEY_FREE_DELAY`` (500 ms) later.  When every slot is taken a new
connection is closed at once (clients are locked out, and so is every outgoing
connection); when the free list is empty while the count is still below the limit,
because slots wait out that delay, ``pj_ioqueue_register_sock2`` asserts and the
process aborts.  About 70 connections that come and go are enough.

:class:`TcpGuard` watches pjsua's transport states (``Endpoint.onTransportState``, run
synchronously on the owner thread when pjsip accepts a connection) and:

- keeps at most ``limit`` accepted connections: one more makes room by closing the
  stalest one (one that never sent a whole SIP message first, then the longest idle);
- counts every TCP slot in use, destroyed ones for ``CLOSING_FOR`` seconds after, and
  when that reaches ``budget`` stops the kernel from completing new connections on
  the listening socket (a classic BPF filter that drops every packet for it, so SYNs
  go unanswered and clients retry) until slots are free again; pjsip then drains at
  most the accept queue (backlog 5, 6 connections) after the gate closed;
- closes accepted connections that sent no whole message within
  ``first_message_timeout`` or nothing for ``idle_timeout`` (pjsip itself keeps an
  idle accepted connection for ever);
- with ``accept=False`` keeps the gate closed for good: the phone's own outgoing
  connections (to its proxy) work, no stranger connects to it;
- once told its home's addresses (``admit_only``: a phone with a home takes requests
  from nobody else), lets the kernel complete connections from those alone while the
  gate is not shut (a classic BPF filter comparing the IPv4 or IPv6 source).  A
  stranger's SYNs are then never answered, so they cannot fill the accept queue
  (pjsip's backlog of 5) or the slots, and the home gets in however fast strangers
  connect (review 134 K4: at some 500 a second the proxy's SYNs met a full queue).

It never calls pjsua itself: what to close is returned (``on_state`` for the
connection being accepted, which pjsip allows inside the callback; ``due`` for the
others, which the endpoint shuts down after the pump).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TcpGuard", "PJ_IOQUEUE_MAX_HANDLES", "find_listener", "admit_program"]

PJ_IOQUEUE_MAX_HANDLES = 64    # the pinned wheel: 62 connections + listener + one more
CLOSING_FOR = 1.5              # seconds a destroyed connection's slot is counted as taken
TP_CONNECTED, TP_DISCONNECTED, TP_SHUTDOWN, TP_DESTROY = 0, 1, 2, 3

_SO_ATTACH_FILTER, _SO_DETACH_FILTER = 26, 27     # Linux <asm-generic/socket.h>
# classic BPF (<linux/filter.h>): opcodes, and the offset at which a socket filter
# reads the network header (a TCP socket's filter sees the TCP header at 0)
_BPF_RET_K = 0x06                                  # BPF_RET | BPF_K
_BPF_LD_W_ABS, _BPF_LD_B_ABS = 0x20, 0x30          # BPF_LD | BPF_W or BPF_B | BPF_ABS
_BPF_RSH_K = 0x74                                  # BPF_ALU | BPF_RSH | BPF_K
_BPF_JEQ_K = 0x15                                  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_JA = 0x05                                     # BPF_JMP | BPF_JA (32-bit offset)
_SKF_NET_OFF = -0x100000
_PASS = 0xffffffff
# addresses one filter compares: a cluster's front and nodes fit many times over; a
# home of more is refused when the phone starts (``admit_only``), never cut short
MAX_ADMITTED = 64
_GATE_OPEN, _GATE_ADMITTING, _GATE_SHUT = "open", "admitting", "shut"


def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xffffffff)


def _net(offset: int) -> int:
    return _SKF_NET_OFF + offset


def admit_program(addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bytes:
    """A classic BPF socket filter that passes packets whose IP source is one of
    ``addresses`` (IPv4 or IPv6; give an IPv4-mapped one as IPv4) and drops the rest;
    an empty list drops everything.  Each comparison is followed by its own ``ret``,
    so no conditional jump reaches further than 7 instructions, and the one long jump
    (to the IPv4 block) is a ``ja``: any number of addresses fits."""
    v4 = [int(a) for a in addresses if a.version == 4]
    v6 = [struct.unpack("!4I", a.packed) for a in addresses if a.version == 6]
    v6_block: list[bytes] = []
    for words in v6:
        for i, word in enumerate(words):
            # on a mismatch skip the rest of this address (2 per word left, and its ret)
            v6_block += [_insn(_BPF_LD_W_ABS, _net(8 + 4 * i)),
                         _insn(_BPF_JEQ_K, word, 0, 2 * (3 - i) + 1)]
        v6_block.append(_insn(_BPF_RET_K, _PASS))
    v6_block.append(_insn(_BPF_RET_K, 0))
    head = [_insn(_BPF_LD_B_ABS, _net(0)), _insn(_BPF_RSH_K, 4),
            _insn(_BPF_JEQ_K, 4, 0, 1),                     # IPv4: on to the long jump
            _insn(_BPF_JA, 2 + len(v6_block)),             # over the IPv6 part
            _insn(_BPF_JEQ_K, 6, 1, 0),                     # IPv6: into its block
            _insn(_BPF_RET_K, 0)]
    v4_block = [_insn(_BPF_LD_W_ABS, _net(12))]
    for ip in v4:
        v4_block += [_insn(_BPF_JEQ_K, ip, 0, 1), _insn(_BPF_RET_K, _PASS)]
    v4_block.append(_insn(_BPF_RET_K, 0))
    return b"".join(head + v6_block + v4_block)


@dataclass
class _Conn:
    handle: Any            # the TransportHandle pjsua2 gave (for transportShutdown)
    direction: str         # "in" (accepted) or "out" (opened by pjsip)
    opened: float
    last_message: float | None = None
    messages: int = 0
    closing: bool = False  # shut down by us, or disconnected: slot still taken
    closing_since: float = 0.0


def _addresses_of(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """What ``host`` binds to: itself when it is an address, else what the name (or an
    ``inet_aton`` form such as ``127.1``) resolves to, as pjsip resolved it at bind
    time (review 139 HB1: a phone bound by name lost its listener)."""
    try:
        # without its zone: the socket's name carries none (review 140 HB1)
        return {ipaddress.ip_address(host.strip("[]").split("%")[0])}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    found = set()
    for info in infos:
        try:
            found.add(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
        except ValueError:
            continue
    return found


def find_listener(host: str, port: int) -> socket.socket | None:
    """A duplicate of the process's listening TCP socket bound to (host, port), found in
    /proc/self/fd (pjsua2 does not expose it).  ``host`` is the address the socket was
    bound to (``0.0.0.0`` or ``::`` for a wildcard), not the one pjsip publishes: a
    wildcard-bound phone's listener was never found, so it had no gate at all and a
    stranger's churn aborted it (review 138 K1).  Setting a socket filter on the
    duplicate sets it on the listener; close the duplicate before pjsip closes its
    own, or the port stays open.  A host name is matched by what it resolves to.  None
    when it cannot be found."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    wanted = _addresses_of(host)
    for name in fds:
        try:
            fd = int(name)
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            dup = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue
        try:
            if (dup.type == socket.SOCK_STREAM
                    and dup.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and dup.getsockname()[1] == port
                    and ipaddress.ip_address(dup.getsockname()[0].split("%")[0]) in wanted):
                return dup
        except (OSError, ValueError):     # not an IP socket, or gone meanwhile
            pass
        dup.close()
    return None


class TcpGuard:
    """The TCP connections of one endpoint, bounded (see the module docstring).

    ``direction(handle)`` says "in", "out" or None for a transport handle
    (``pjsip_abi.tcp_direction``); ``clock`` is monotonic seconds.
    """

    def __init__(self, direction: Callable[[int], str | None], *, limit: int = 32,
                 budget: int = 48, idle_timeout: float = 120.0,
                 first_message_timeout: float = 10.0, accept: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < limit < budget <= PJ_IOQUEUE_MAX_HANDLES - 12:
            raise ValueError("need 0 < limit < budget <= PJ_IOQUEUE_MAX_HANDLES - 12")
        self._direction = direction
        self.limit = limit
        self.budget = budget
        self.idle_timeout = idle_timeout
        self.first_message_timeout = min(first_message_timeout, idle_timeout)
        self.accept = accept
        self._clock = clock
        self._conns: dict[int, _Conn] = {}
        self._closed: deque[float] = deque()          # destroy times, newest last
        self._evict: list[int] = []
        self._listener: socket.socket | None = None
        self._filter_buf: Any = None
        self._gate = _GATE_OPEN
        self._admitted: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
        self.gate_closed = False
        self.counts = {"accepted": 0, "evicted": 0, "idle_closed": 0, "gate_closings": 0}

    # -- the listener ------------------------------------------------------------------
    def attach_listener(self, listener: socket.socket | None) -> bool:
        """Take the duplicate of the listening socket the gate works on."""
        self._listener = listener
        self._update_gate()
        return listener is not None

    def close(self) -> None:
        """Let the listener go (before pjsip closes it)."""
        if self._listener is not None:
            try:
                self._listener.close()
            finally:
                self._listener = None

    def admit_only(self, addresses: Iterable[str]) -> None:
        """From now on let the kernel complete connections from ``addresses`` alone (the
        home proxy's), while the gate is not shut.  ``ValueError`` past ``MAX_ADMITTED``;
        none that reads as an IP address leaves the gate as it was."""
        found = []
        for text in addresses:
            try:
                ip = ipaddress.ip_address(text.strip("[]"))
            except ValueError:
                continue
            mapped = getattr(ip, "ipv4_mapped", None)
            found.append(mapped or ip)
        admitted = tuple(dict.fromkeys(found))
        if len(admitted) > MAX_ADMITTED:
            # cut short, the addresses left out would change from start to start
            # (review 138 HB1): refused whole instead
            raise ValueError(f"a home of {len(admitted)} addresses: at most "
                             f"{MAX_ADMITTED} can be admitted")
        self._admitted = admitted
        self._update_gate(again=True)      # a new list: the filter is made again

    def _set_gate(self, state: str, again: bool = False) -> None:
        if (state == self._gate and not again) or self._listener is None:
            return
        try:
            if state == _GATE_OPEN:
                if self._gate != _GATE_OPEN:
                    self._listener.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
            else:
                program = admit_program(self._admitted if state == _GATE_ADMITTING else ())
                insn = (ctypes.c_uint8 * len(program)).from_buffer_copy(program)
                self._filter_buf = insn
                prog = struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(insn))
                self._listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, prog)
                if state == _GATE_SHUT and self._gate != _GATE_SHUT:
                    self.counts["gate_closings"] += 1
        except OSError:
            return
        self._gate = state
        self.gate_closed = state == _GATE_SHUT

    def _update_gate(self, again: bool = False) -> None:
        if not self.accept or self.in_use() >= self.budget:
            state = _GATE_SHUT
        else:
            state = _GATE_ADMITTING if self._admitted else _GATE_OPEN
        self._set_gate(state, again)

    # -- counting ------------------------------------------------------------------------
    def _sweep_closed(self, now: float) -> None:
        while self._closed and now - self._closed[0] > CLOSING_FOR:
            self._closed.popleft()

    def in_use(self) -> int:
        """TCP slots taken: live connections and those destroyed within CLOSING_FOR s."""
        self._sweep_closed(self._clock())
        return len(self._conns) + len(self._closed)

    def incoming(self) -> list[_Conn]:
        return [c for c in self._conns.values() if c.direction == "in" and not c.closing]

    # -- pjsua's transport states (inside the pump) ----------------------------------------
    def on_state(self, handle: Any, state: int) -> bool:
        """A TCP transport changed state; True: shut ``handle`` down at once."""
        key = int(handle)
        now = self._clock()
        conn = self._conns.get(key)
        if state == TP_CONNECTED and conn is None:
            direction = self._direction(key)
            if direction is None:
                return False
            conn = self._conns[key] = _Conn(handle, direction, now)
            refuse = False
            if direction == "in":
                self.counts["accepted"] += 1
                refuse = not self.accept or self._make_room(conn, now)
            if refuse:
                self._closing(conn, now)
            self._update_gate()
            return refuse
        if conn is None:
            if state == TP_DESTROY and self._direction(key) is not None:
                self._closed.append(now)      # a connect that never completed
                self._update_gate()
            return False
        if state in (TP_DISCONNECTED, TP_SHUTDOWN):
            self._closing(conn, now)
        elif state == TP_DESTROY:
            del self._conns[key]
            self._closed.append(now)
        self._update_gate()
        return False

    def _make_room(self, new: _Conn, now: float) -> bool:
        """One accepted connection over ``limit``: close the stalest; True if that is
        ``new`` itself (every other one carried a message within the last second)."""
        live = self.incoming()
        if len(live) <= self.limit:
            return False

        def staleness(c: _Conn) -> tuple[int, float]:
            return (0 if c.messages == 0 else 1, c.last_message or c.opened)

        victim = min((c for c in live if c is not new), key=staleness)
        if victim.messages and victim.last_message is not None and now - victim.last_message < 1:
            return True
        self._closing(victim, now)
        self._evict.append(int(victim.handle))
        self.counts["evicted"] += 1
        return False

    def on_message(self, transport: int) -> None:
        """The hook saw a whole SIP message arrive on ``transport``."""
        conn = self._conns.get(transport)
        if conn is not None:
            conn.messages += 1
            conn.last_message = self._clock()

    # -- the main loop -----------------------------------------------------------------
    def due(self) -> list[Any]:
        """Handles to shut down now (evicted, silent too long); marks them closing."""
        now = self._clock()
        out = [self._conns[k].handle for k in self._evict if k in self._conns]
        self._evict.clear()
        for conn in self.incoming():
            silent = now - (conn.last_message or conn.opened)
            if (conn.messages == 0 and silent > self.first_message_timeout) \
                    or silent > self.idle_timeout:
                self._closing(conn, now)
                self.counts["idle_closed"] += 1
                out.append(conn.handle)
        for key, conn in list(self._conns.items()):
            if conn.closing and now - conn.closing_since > 60:   # no DESTROY ever came
                del self._conns[key]
                self._closed.append(now)
        self._update_gate()
        return out

    @staticmethod
    def _closing(conn: _Conn, now: float) -> None:
        if not conn.closing:
            conn.closing, conn.closing_since = True, now

    def stats(self) -> dict[str, Any]:
        live = list(self._conns.values())
        return {"incoming": len([c for c in live if c.direction == "in" and not c.closing]),
                "outgoing": len([c for c in live if c.direction == "out" and not c.closing]),
                "slots_in_use": self.in_use(), "limit": self.limit, "budget": self.budget,
                "accepting": self.accept, "gate_closed": self.gate_closed,
                "admitted_sources": len(self._admitted),
                "listener_found": self._listener is not None, **self.counts}
