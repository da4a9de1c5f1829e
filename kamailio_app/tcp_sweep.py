"""Which TCP and TLS connections the proxy closes because they hold a slot unused.

Kamailio 5.6 bounds connections in all (``tcp_max_connections``) and closes one that
was idle for ``tcp_connection_lifetime``, but a CRLF keep-alive counts as traffic and
nothing bounds connections per address.  A stranger who opens every slot and sends a
keep-alive on each now and then holds the table for as long as he likes, and sends no
request that pike could count (review 28).  So every few seconds a timer process lists
the connections (``core.tcp_list``) and closes:

* one accepted on our listeners that has carried no SIP message (nor an HTTP request
  for our certificate) within ``[limits] tcp_first_message_timeout`` seconds.  A message
  marks its connection: the request and reply routes set its lifetime to ``marked``,
  one second over the idle timeout, which ``core.tcp_list`` shows;
* beyond ``[limits] tcp_connections_per_source`` from one address (the proxy's own and
  ``trusted`` ones aside): the newest first, unmarked ones before marked ones.

Connections we opened (to a next hop, to a phone's contact) are on no listener port
and are never "first message" candidates.  What is kept here is one first-seen time
per listed connection, dropped once the connection is gone: bounded by the table.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["Connection", "TcpSweeper", "marked_lifetime", "parse_tcp_list"]

# states in which a connection is still a slot someone holds
_LIVE = {"CONN_OK", "CONN_INIT", "CONN_ACCEPT", "CONN_CONNECT"}


def marked_lifetime(idle_timeout: int) -> int:
    """The lifetime a connection gets once it carried a message (see the module)."""
    return idle_timeout + 1


@dataclass(frozen=True)
class Connection:
    """One row of ``core.tcp_list``."""

    id: int
    source: str          # the remote address
    local_port: int      # ours: a listener's port for an accepted connection
    lifetime: int
    state: str


def parse_tcp_list(body: str) -> list[Connection]:
    """The connections in a JSON-RPC answer to ``core.tcp_list`` (rows that do not read
    as one are skipped).  Raises ``ValueError`` when the answer is no such list."""
    answer = json.loads(body)
    rows = answer.get("result") if isinstance(answer, dict) else None
    if not isinstance(rows, list):
        raise ValueError("core.tcp_list gave no list")
    out = []
    for row in rows:
        try:
            out.append(Connection(int(row["id"]), str(row["src_ip"]), int(row["dst_port"]),
                                  int(row["lifetime"]), str(row["state"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


class TcpSweeper:
    """Decides, per listing, which connections to close (see the module)."""

    def __init__(self, *, listen_ports: Iterable[int], idle_timeout: int,
                 first_message_timeout: float, per_source: int,
                 exempt: Callable[[str], bool]) -> None:
        self.listen_ports = frozenset(listen_ports)
        self.marked = marked_lifetime(idle_timeout)
        self.first_message_timeout = first_message_timeout
        self.per_source = per_source
        self.exempt = exempt
        self._first_seen: dict[int, float] = {}

    def to_close(self, connections: Iterable[Connection], now: float) -> dict[int, str]:
        """{connection id: why} for the ones to close now."""
        live = [c for c in connections if c.state in _LIVE]
        seen = {c.id: self._first_seen.get(c.id, now) for c in live}
        self._first_seen = seen                  # the gone ones are forgotten
        close: dict[int, str] = {}
        by_source: dict[str, list[Connection]] = defaultdict(list)
        for conn in live:
            if self.exempt(conn.source):
                continue
            spoke = conn.lifetime == self.marked
            if not spoke and conn.local_port in self.listen_ports and \
                    now - seen[conn.id] >= self.first_message_timeout:
                close[conn.id] = "no SIP message"
                continue
            by_source[conn.source].append(conn)
        for conns in by_source.values():
            if len(conns) <= self.per_source:
                continue
            # keep the ones that carried messages, then the oldest
            conns.sort(key=lambda c: (c.lifetime != self.marked, seen[c.id], c.id))
            for conn in conns[self.per_source:]:
                close[conn.id] = "too many from one address"
        return close
