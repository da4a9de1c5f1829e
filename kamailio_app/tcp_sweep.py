"""Which TCP and TLS connections the proxy closes because they hold a slot unused.

Kamailio 5.6 bounds connections in all (``tcp_max_connections``) and closes one that
was idle for ``tcp_connection_lifetime``, but a CRLF keep-alive counts as traffic and
nothing bounds connections per address.  A stranger who opens every slot and sends a
keep-alive on each now and then holds the table for as long as he likes, and sends no
request that pike could count (review 28).  So every few seconds a timer process lists
the connections (``core.tcp_list``) and closes:

* one accepted on our listeners that has carried no SIP request within
  ``[limits] tcp_first_message_timeout`` seconds.  A message marks its connection by
  setting its lifetime a little over the idle timeout, which ``core.tcp_list`` shows:
  one second over for a request (ACK and CANCEL aside: ``SPOKE``), two for a request
  digest authentication let in (``AUTHENTICATED``).  A reply or an HTTP request marks
  nothing (an accepted connection is reachable only once it carried a request).  A
  later message may write a lower mark (the lifetime is one value), so the sweep keeps
  the highest it saw for the connection's life (review 31);
* beyond ``[limits] tcp_connections_per_source`` accepted from one source (its site,
  ``sources.site_of``: an IPv6 /56 counts as one; the proxy's own and ``trusted`` ones
  aside): authenticated ones
  are kept first, then those that spoke, each oldest first (review 29: a stranger
  behind a user's NAT must not push the user's connection out).

Connections we opened (to a next hop, to a phone's contact) are on no listener port:
neither rule touches them (the certificate service bounds its own: ``cert_connects``).  What is kept here is one first-seen time and one highest
mark per listed connection, dropped once the connection is gone: bounded by the table.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .sources import site_of

__all__ = ["AUTHENTICATED", "Connection", "LIVE_STATES", "SPOKE", "TcpSweeper",
           "list_connections", "marked_lifetime", "parse_tcp_list"]

# states in which a connection is still a slot someone holds
LIVE_STATES = {"CONN_OK", "CONN_INIT", "CONN_ACCEPT", "CONN_CONNECT"}


# what a connection's lifetime says it carried (seconds over the idle timeout)
SPOKE, AUTHENTICATED = 1, 2


def marked_lifetime(idle_timeout: int, level: int = SPOKE) -> int:
    """The lifetime of a connection that carried a message of ``level``."""
    return idle_timeout + level


@dataclass(frozen=True)
class Connection:
    """One row of ``core.tcp_list``."""

    id: int
    source: str          # the remote address
    local_port: int      # ours: a listener's port for an accepted connection
    lifetime: int
    state: str
    source_port: int = 0  # the remote port


def list_connections(ksr: Any) -> list[Connection] | None:
    """The proxy's TCP and TLS connections now (``core.tcp_list`` run in this process
    through jsonrpcs), None when the answer is empty."""
    ksr.jsonrpcs.exec('{"jsonrpc": "2.0", "method": "core.tcp_list", "id": 1}')
    body = ksr.pv.get("$jsonrpl(body)")
    return parse_tcp_list(body) if body else None


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
                                  int(row["lifetime"]), str(row["state"]),
                                  int(row.get("src_port", 0))))
        except (KeyError, TypeError, ValueError):
            continue
    return out


class TcpSweeper:
    """Decides, per listing, which connections to close (see the module)."""

    def __init__(self, *, listen_ports: Iterable[int], idle_timeout: int,
                 first_message_timeout: float, per_source: int,
                 exempt: Callable[[str], bool]) -> None:
        self.listen_ports = frozenset(listen_ports)
        self.idle_timeout = idle_timeout
        self.first_message_timeout = first_message_timeout
        self.per_source = per_source
        self.exempt = exempt
        self._first_seen: dict[int, float] = {}
        self._best: dict[int, int] = {}          # the highest mark seen, per connection

    def to_close(self, connections: Iterable[Connection], now: float) -> dict[int, str]:
        """{connection id: why} for the ones to close now."""
        live = [c for c in connections if c.state in LIVE_STATES]
        seen = {c.id: self._first_seen.get(c.id, now) for c in live}
        self._first_seen = seen                  # the gone ones are forgotten
        self._best = {c.id: max(self._best.get(c.id, 0), self._mark(c)) for c in live}
        close: dict[int, str] = {}
        by_source: dict[str, list[Connection]] = defaultdict(list)
        for conn in live:
            if conn.local_port not in self.listen_ports or self.exempt(conn.source):
                continue                         # one we opened; ours; trusted
            if self.level(conn) == 0 and now - seen[conn.id] >= self.first_message_timeout:
                close[conn.id] = "no SIP message"
                continue
            by_source[site_of(conn.source)].append(conn)
        for conns in by_source.values():
            if len(conns) <= self.per_source:
                continue
            # keep the authenticated ones, then those that spoke, each oldest first
            conns.sort(key=lambda c: (-self.level(c), seen[c.id], c.id))
            for conn in conns[self.per_source:]:
                close[conn.id] = "too many from one address"
        return close

    def level(self, conn: Connection) -> int:
        """The most the connection has carried so far: 0, ``SPOKE`` or
        ``AUTHENTICATED`` (the highest mark seen, or its mark now)."""
        return max(self._best.get(conn.id, 0), self._mark(conn))

    def _mark(self, conn: Connection) -> int:
        level = conn.lifetime - self.idle_timeout
        return level if level in (SPOKE, AUTHENTICATED) else 0
