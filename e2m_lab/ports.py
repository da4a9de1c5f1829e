"""Free loopback ports for lab processes (never 5060: a system Kamailio may own it).

A free port is only a guess: it is released before the process that will use it binds
it, and anything may take it in between (an ephemeral port, a parallel run).  Whoever
starts a process on these ports must retry on fresh ones when its bind fails
(``e2m_lab.sipp.start_sipp``, ``kamailio_harness.start_proxy``).
"""

from __future__ import annotations

import socket
from collections.abc import Collection

__all__ = ["free_port", "free_port_block"]

HOST = "127.0.0.1"
_NEVER = {5060}


def _probe(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 for both UDP and TCP right now."""
    tcp, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.bind((HOST, port))
        udp.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        tcp.close()
        udp.close()


def free_port_block(offsets: tuple[int, ...] = (0,), *, avoid: Collection[int] = ()) -> int:
    """A port ``p`` such that ``p + o`` is free (UDP and TCP on 127.0.0.1) for every
    offset ``o``, none of them 5060 or in ``avoid``.  ``p`` is picked by the kernel
    (bind to port 0), so it lies in the ephemeral range, not in a fixed default range
    that parallel runs would share."""
    for _ in range(200):
        tcp = socket.socket()
        try:
            tcp.bind((HOST, 0))
            base = tcp.getsockname()[1]
        finally:
            tcp.close()
        ports = [base + o for o in offsets]
        if any(p > 65535 or p in _NEVER or p in avoid for p in ports):
            continue
        if all(_probe(p) for p in ports):
            return base
    raise RuntimeError(f"no free port block {offsets}")


def free_port(*, avoid: Collection[int] = ()) -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (never 5060, nor one in ``avoid``)."""
    return free_port_block((0,), avoid=avoid)
