"""[cluster]: a node that starts catches up with its peers (DMQ sync) before it serves.

Kamailio's DMQ sync has no end marker.  At start, once a peer answers DMQ's
notification, htable (dmq_init_sync) and dmq_usrloc (sync) each ask every active
peer for everything it holds; the peer answers with dumps:

  htable:     KDMQ to ``htable`` whose body is ``{"cells":[...]}``, in chunks, the
              last one sent even when empty, so every peer's dump shows up;
  dmq_usrloc: KDMQ to ``usrloc`` whose body is ``{"multi":{...}}`` (batch_msg_contacts
              > 1 in the cfg; a registration replicated as it happens is one contact,
              ``{"action":...}``, so the dumps are told apart), nothing when empty.

The readiness rule (``ReadinessRule``): the node serves once every configured peer
is either caught up (its htable dump arrived and no dump message from it for
``quiet`` seconds) or taken as unreachable (DMQ has not seen it active after
``unreachable_after`` seconds: its notification transaction has timed out), or at
the latest after ``wait`` seconds whatever the peers did.  Serving without some
peer's state is logged and counted (``e2m_sync_incomplete``).  Until then every
request but the peers' KDMQ is answered 503 + Retry-After (``e2m_sync_wait_refused``),
OPTIONS included, so a dispatcher front keeps the node out of its set.

Kamailio runs the request route in several processes: the receivers note what
came from which peer in the local htable ``e2msync`` (two items per configured peer
and one flag: bounded), one rtimer process applies the rule and sets the flag, and
each process remembers the flag once it has seen it set.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TABLE", "DUMP", "PART", "PeerView", "Decision", "ReadinessRule", "sync_kind",
           "KsrSyncGate", "gate_peers", "for_cluster"]

TABLE = "e2msync"      # cfg template: local (never replicated), no expiry
DUMP = "dump"          # a chunk of a peer's htable dump (the part that always comes)
PART = "part"          # a chunk of a peer's usrloc dump
RETRY_AFTER = 2        # seconds, in the 503
# The reason phrase of that 503.  A front's probes get it too (OPTIONS is gated), which
# takes the node out of the front until it has caught up; no reply makes a front fail
# over (kemi.py ``failover``: a callee could forge one, review 21).
CATCHING_UP = "Catching Up"


def sync_kind(peer_id: str, body_start: str) -> str | None:
    """Which part of a sync a KDMQ message is (its R-URI user is the DMQ peer id),
    None when it is not one (a notification, a change replicated as it happens)."""
    if peer_id == "htable" and body_start.startswith('{"cells"'):
        return DUMP
    if peer_id == "usrloc" and body_start.startswith('{"multi"'):
        return PART
    return None


@dataclass(frozen=True)
class PeerView:
    """What this node knows of one peer: DMQ lists it active; when (seconds since the
    node started) its htable dump was first seen, and its last dump message."""

    active: bool = False
    dumped: float | None = None
    last: float | None = None


@dataclass(frozen=True)
class Decision:
    """``ready``: serve from now on.  ``missing``: the peers it serves without
    (unreachable, or not caught up when the wait ran out); ``why``: one line for
    the log."""

    ready: bool
    missing: tuple[str, ...] = ()
    why: str = ""


class ReadinessRule:
    """The rule above, on a clock of seconds since the node started (injectable)."""

    def __init__(self, peers: Iterable[str], *, wait: float, quiet: float,
                 unreachable_after: float, clock: Callable[[], float]) -> None:
        if not (0 < quiet and 0 < unreachable_after <= wait):
            raise ValueError("need 0 < quiet and 0 < unreachable_after <= wait")
        self.peers = tuple(sorted(set(peers)))
        self.wait, self.quiet, self.unreachable_after = wait, quiet, unreachable_after
        self.clock = clock

    def decide(self, views: Mapping[str, PeerView]) -> Decision:
        now = self.clock()
        caught_up, unreachable, waiting = [], [], []
        for peer in self.peers:
            view = views.get(peer, PeerView())
            if view.dumped is not None and view.last is not None \
                    and now - view.last >= self.quiet:
                caught_up.append(peer)
            elif view.dumped is None and not view.active and now >= self.unreachable_after:
                unreachable.append(peer)
            else:
                waiting.append(peer)
        if not waiting:
            if unreachable:
                return Decision(True, tuple(unreachable),
                                "peers unreachable after %g s: %s" % (
                                    self.unreachable_after, ", ".join(unreachable)))
            return Decision(True, (), "caught up with %s" % (", ".join(caught_up) or "nobody"))
        if now >= self.wait:
            missing = tuple(waiting + unreachable)
            return Decision(True, missing, "not caught up after %g s with %s" % (
                self.wait, ", ".join(missing)))
        return Decision(False)


def gate_peers(sources: Iterable[tuple[str, int]], own_host: str, own_port: int) -> frozenset[str]:
    """``ip:port`` of every peer the node waits for: the DMQ sources it takes KDMQ from
    (a DNS name of all the nodes includes this one: left out)."""
    try:
        own = {info[4][0] for info in socket.getaddrinfo(own_host, own_port,
                                                         type=socket.SOCK_DGRAM)}
    except OSError:
        own = {own_host}
    return frozenset("%s:%d" % (ip, port) for ip, port in sources
                     if not (port == own_port and ip in own))


class KsrSyncGate:
    """The rule inside Kamailio: ``refuses()`` in the request route, ``observe()`` for
    each KDMQ from a peer, ``tick()`` in its rtimer.  Made in mod_init (before the
    fork): every process shares ``base``, the node's start on the monotonic clock."""

    def __init__(self, ksr: Any, peers: Iterable[str], *, wait: float, quiet: float,
                 unreachable_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ksr = ksr
        self.peers = frozenset(peers)
        self.clock = clock
        self.base = clock()
        self.rule = ReadinessRule(self.peers, wait=wait, quiet=quiet,
                                  unreachable_after=unreachable_after, clock=self.elapsed)
        self._open = False          # this process has seen the flag set

    def elapsed(self) -> float:
        return self.clock() - self.base

    def is_open(self) -> bool:
        if not self._open and (self.ksr.htable.sht_get(TABLE, "ready") == 1
                               or self.elapsed() >= self.rule.wait):
            # the bound holds in every process, even if the timer never runs
            self._open = True
        return self._open

    # -- request route: False lets the request through
    def refuses(self) -> bool:
        if self.is_open():
            return False
        ksr = self.ksr
        if not ksr.is_ACK():        # an ACK has no answer: dropped, its 2xx is resent
            ksr.hdr.append_to_reply("Retry-After: %d\r\n" % RETRY_AFTER)
            ksr.sl.sl_send_reply(503, CATCHING_UP)
            ksr.statistics.update_stat("e2m_sync_wait_refused", 1)
        return True

    # -- KDMQ from a configured peer (route_dmq), before DMQ takes it
    def observe(self, peer: str) -> None:
        if peer not in self.peers or self.is_open():
            return
        kind = sync_kind(self.ksr.pv.get("$rU") or "",
                         self.ksr.pv.get("$(rb{s.substr,0,9})") or "")
        if kind is None:
            return
        now = int(self.elapsed() * 1000)
        if kind == DUMP and self.ksr.htable.sht_get(TABLE, "dumped:" + peer) is None:
            self.ksr.htable.sht_seti(TABLE, "dumped:" + peer, now)
        self.ksr.htable.sht_seti(TABLE, "last:" + peer, now)

    # -- rtimer: apply the rule until it says ready
    def tick(self) -> Decision | None:
        if self.is_open():
            return None
        active = self._active_peers()
        views = {peer: PeerView(active=peer in active,
                                dumped=self._seconds("dumped:" + peer),
                                last=self._seconds("last:" + peer)) for peer in self.peers}
        decision = self.rule.decide(views)
        if decision.ready:
            self.ksr.htable.sht_seti(TABLE, "ready", 1)
            self._open = True
            if decision.missing:
                self.ksr.statistics.update_stat("e2m_sync_incomplete", 1)
                self.ksr.warn("e2m: serving without their state: %s\n" % decision.why)
            else:
                self.ksr.info("e2m: serving: %s after %.2f s\n" % (decision.why,
                                                                 self.elapsed()))
        return decision

    def _seconds(self, key: str) -> float | None:
        value = self.ksr.htable.sht_get(TABLE, key)
        return value / 1000.0 if isinstance(value, int) else None

    def _active_peers(self) -> set[str]:
        """``ip:port`` of the nodes DMQ lists active (dmq.list_nodes)."""
        self.ksr.jsonrpcs.execx('{"jsonrpc": "2.0", "method": "dmq.list_nodes", "id": 1}')
        try:
            nodes = json.loads(self.ksr.pv.get("$jsonrpl(body)") or "{}").get("result") or []
        except ValueError:
            return set()
        out = set()
        for node in nodes:
            if isinstance(node, dict) and node.get("status") == "active" and not node.get("local"):
                try:
                    out.add("%s:%d" % (node.get("resolved_ip") or node.get("host"),
                                       int(node.get("port") or 0)))
                except (TypeError, ValueError):
                    continue
        return out


def for_cluster(ksr: Any, cluster: Any, sources: Iterable[tuple[str, int]]) -> KsrSyncGate | None:
    """The gate for a [cluster] node with DMQ peers (None: no gate, ``sync_wait = 0``
    or no DMQ); ``sources``: the peers' resolved DMQ sockets (ProxyApp.dmq_sources)."""
    if cluster is None or not cluster.gated:
        return None
    peers = gate_peers(sources, cluster.dmq_address.host, cluster.dmq_address.port)
    return KsrSyncGate(ksr, peers, wait=cluster.sync_wait, quiet=cluster.sync_quiet_ms / 1000.0,
                       unreachable_after=cluster.sync_unreachable_after)
