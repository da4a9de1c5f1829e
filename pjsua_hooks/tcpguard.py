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
  connections (to its proxy) work, no stranger connects to it.

It never calls pjsua itself: what to close is returned (``on_state`` for the
connection being accepted, which pjsip allows inside the callback; ``due`` for the
others, which the endpoint shuts down after the pump).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TcpGuard", "PJ_IOQUEUE_MAX_HANDLES", "find_listener"]

PJ_IOQUEUE_MAX_HANDLES = 64    # the pinned wheel: 62 connections + listener + one more
CLOSING_FOR = 1.5              # seconds a destroyed connection's slot is counted as taken
TP_CONNECTED, TP_DISCONNECTED, TP_SHUTDOWN, TP_DESTROY = 0, 1, 2, 3

_SO_ATTACH_FILTER, _SO_DETACH_FILTER = 26, 27     # Linux <asm-generic/socket.h>
_BPF_RET_K = 0x06                                  # BPF_RET | BPF_K


@dataclass
class _Conn:
    handle: Any            # the TransportHandle pjsua2 gave (for transportShutdown)
    direction: str         # "in" (accepted) or "out" (opened by pjsip)
    opened: float
    last_message: float | None = None
    messages: int = 0
    closing: bool = False  # shut down by us, or disconnected: slot still taken
    closing_since: float = 0.0


def find_listener(host: str, port: int) -> socket.socket | None:
    """A duplicate of the process's listening TCP socket on (host, port), found in
    /proc/self/fd (pjsua2 does not expose it).  Setting a socket filter on the
    duplicate sets it on the listener; close the duplicate before pjsip closes its
    own, or the port stays open.  None when it cannot be found."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
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
                    and dup.getsockname()[:2] == (host, port)):
                return dup
        except OSError:
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

    def _set_gate(self, closed: bool) -> None:
        if closed == self.gate_closed or self._listener is None:
            return
        try:
            if closed:
                insn = (ctypes.c_uint8 * 8).from_buffer_copy(
                    struct.pack("HBBI", _BPF_RET_K, 0, 0, 0))    # "ret 0": drop it
                self._filter_buf = insn
                prog = struct.pack("HxxxxxxP", 1, ctypes.addressof(insn))
                self._listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, prog)
                self.counts["gate_closings"] += 1
            else:
                self._listener.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        except OSError:
            return
        self.gate_closed = closed

    def _update_gate(self) -> None:
        self._set_gate(not self.accept or self.in_use() >= self.budget)

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
                "listener_found": self._listener is not None, **self.counts}
