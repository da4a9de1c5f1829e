"""Free loopback ports for lab processes (never 5060: a system Kamailio may own it)."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (never 5060)."""
    for _ in range(100):
        tcp, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if port != 5060:
                udp.bind(("127.0.0.1", port))
                return port
        except OSError:
            pass
        finally:
            tcp.close()
            udp.close()
    raise RuntimeError("no free port")
