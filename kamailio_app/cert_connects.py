"""The TCP and TLS connections the certificate service opens itself, and their bounds.

The service sends NOTIFYs from its timer, and Kamailio opens a connection when none is
open to the destination, which the subscriber chooses (a route set's first hop, the
TCP twin of a UDP subscriber's address for a certificate too large for UDP).  A connect
to a port that never answers holds one of the proxy's connections for the connect
timeout, one that is accepted and never answered for the idle timeout (120 s), and a
far end that pings keeps it longer (reviews 145 to 147).  So, per destination address
(an IPv6 site), the service holds at most ``MAX_CONNECTS`` *places*:

- every NOTIFY to a TCP or TLS destination other than a follow's own connection takes
  a place (``open_with``), whether or not Kamailio will reuse a connection: a place is
  the far end's address and port, and remembers the newest connection id there before
  its first send (its *floor*).  It is shared by the NOTIFYs to it while a lookup by
  address finds a connection there above the floor; when none is found, a listing
  decides: the place's connection still open (a twin took its address, review 149 K1)
  means the NOTIFY is not sent, none open means the place is taken anew;
- the place's connections are those the proxy opened to that address and port (local
  port none of our listeners') with an id above the floor: Kamailio numbers
  connections in order, so one that was there before (a connection the proxy relays
  calls over to that hop) is not the place's;
- they are closed ``CONNECT_LIFETIME`` s after the place was taken, answered or not,
  pinged or not, or when the NOTIFY's answer comes over them (``close_answered``);
- the connections are read from a listing (``core.tcp_list``), each second while any
  place is held (``sweep``, from the service's timer).  A place with none left is
  freed (a refused connect's, or one whose NOTIFY reused a connection, at the next
  tick); one is never held past ``PLACE_KEPT`` s, so that a hop the proxy also relays
  to has its new connections closed for a few seconds at most.

Neither Kamailio's per-connection lifetime nor a lookup by address can decide this.  tcp_main
arms a connection's timer with the global idle timeout when the connection reaches it,
so a shorter lifetime set later is not acted on (review 147 K1).  And the far end can
open a twin connection to us from the very address and port the proxy connected to
(``SO_REUSEPORT``): Kamailio then gives the address to the twin alone, so a lookup by
address finds the twin, even right after the connect, and once the twin is closed it
finds nothing while the proxy's connection lives on.  Freeing a place on the twin's
answer left the proxy's connections open without bound (review 147 K3).  And the
lookup (``tcp_get_conid``) asks for any local address while a send from a given socket
asks for that socket's: a twin to the proxy's other address was found by the one and
not the other, and the NOTIFY, taken to need no place, opened a connection nobody
counted (review 148 K1).  The listing tells them all apart by their local port.

State: htable ``e2mconnects`` (this node's only; the cfg's ``autoexpire`` drops an
item ``ITEM_KEPT`` s after its last write), one item per site, its value the
``"<host:port>@<taken, ms>@<floor>"`` of each place, read and written under the item's
lock.
"""

from __future__ import annotations

import ipaddress
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from .sources import site_of
from .tcp_sweep import LIVE_STATES, Connection, list_connections

__all__ = ["OpenedConnections", "MAX_CONNECTS", "CONNECT_LIFETIME", "ITEM_KEPT", "far_end"]

TABLE = "e2mconnects"
MAX_CONNECTS = 2                 # places per destination address (IPv6: site)
CONNECT_LIFETIME = 4             # s after the place was taken: its NOTIFY's transaction is over
PLACE_KEPT = 2 * CONNECT_LIFETIME  # s: a place is not held past this
ITEM_KEPT = 30                   # s: the cfg's autoexpire of e2mconnects
STREAM_ROUTE = "E2M_STREAM_OPEN"  # native: $var(e2m_conid) of an open connection, or 0
_ITERATOR = "e2mconnects"
_SWEEP_MAX = 1000                # sites looked at per sweep


def far_end(host: str, port: int | str) -> str:
    """``host:port`` spelt one way whatever the URI or the listing wrote (an IPv6
    address in brackets, compressed), so a place is found again."""
    bare = host.strip("[]")
    try:
        bare = str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    return (f"[{bare}]" if ":" in bare else bare) + f":{int(port)}"


Place = tuple[str, int, int]      # host:port, taken (ms), floor (a connection id)


def _places(value: Any) -> list[Place]:
    """The places an item holds; anything else in it is dropped."""
    places = []
    for word in str(value or "").split():
        hostport, taken, floor = (word.split("@") + ["", ""])[:3]
        if hostport and taken.isdigit() and floor.isdigit():
            places.append((hostport, int(taken), int(floor)))
    return places


def _spelt(places: list[Place]) -> str:
    return " ".join(f"{hostport}@{taken}@{floor}" for hostport, taken, floor in places)


class OpenedConnections:
    """The service's own connections on this node; ``ksr`` is Kamailio's KSR module,
    ``listen_ports`` our TCP and TLS listeners' (a connection on none of them is one the
    proxy opened)."""

    def __init__(self, ksr: Any, listen_ports: Iterable[int],
                 clock: Callable[[], float] = time.time) -> None:
        self.ksr = ksr
        self.listen_ports = frozenset(listen_ports)
        self.clock = clock

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def conid_to(self, hostport: str) -> int:
        """The id of an open TCP or TLS connection to ``hostport``, 0 for none."""
        self.ksr.pv.sets("$var(e2m_hostport)", hostport)
        self.ksr.route(STREAM_ROUTE)
        return self.ksr.pv.get("$var(e2m_conid)") or 0

    def _store(self, site: str, before: list[Place], after: list[Place]) -> None:
        if after == before:
            return
        if after:
            # sht_sets with the table's autoexpire, not sht_setxs: in Kamailio 5.6 a
            # longer value written with an expiry of its own lands in a new cell that
            # never expires (review 147)
            self.ksr.htable.sht_sets(TABLE, site, _spelt(after))
        else:
            self.ksr.htable.sht_rm(TABLE, site)

    def open_with(self, host: str, port: int | str, send: Callable[[], None]) -> bool:
        """Call ``send`` (which may open a connection to ``host:port``) if a place there
        is held, or fewer than ``MAX_CONNECTS`` toward ``host``'s site are and one is
        taken; whether it was called.  Counted and taken under the item's lock, so
        workers racing toward one site cannot all take the last place."""
        site = site_of(host.strip("[]"))
        hostport = far_end(host, port)
        ksr = self.ksr
        ksr.htable.sht_lock(TABLE, site)
        try:
            held = _places(ksr.htable.sht_get(TABLE, site))
            place = next((place for place in held if place[0] == hostport), None)
            if place is not None:
                # shared only while a send there finds a connection the place's
                # first NOTIFY did not: a twin of the far end's can take the address
                # from the place's connection, and once the twin is reset a send would
                # open one more each time (review 149 K1)
                if self.conid_to(hostport) > place[2]:
                    send()
                    return True
                if self._own_alive(hostport, place[2]):
                    return False        # its connection lives, its address taken: owed
                held.remove(place)      # its connection is gone: the place is taken anew
            if len(held) >= MAX_CONNECTS:
                return False
            # the newest connection there now (any local address: Kamailio gives the
            # address to the newest): whatever the send opens is numbered above it
            floor = self.conid_to(hostport)
            send()
            # taken after the send: a listing made before it cannot drop the place
            # for want of a connection that did not exist yet (``sweep``)
            self._store(site, held, [*held, (hostport, self.now_ms(), floor)])
            return True
        finally:
            ksr.htable.sht_unlock(TABLE, site)

    def send_over(self, host: str, port: int | str, found: int,
                  send: Callable[[], None]) -> None:
        """Call ``send`` over a follow's own connection, ``found`` there just before.
        Should that connection close in between, tm opens another to the follow's
        port: one newer than ``found`` is then kept as a place (over the bound if need
        be: it exists already), so it is closed at its short life like the others.
        Sent and stored under the site's lock, as ``open_with`` does: the answer over
        such a new connection waits for its place (``close_answered``; review 207 HB1)."""
        hostport = far_end(host, port)
        site = site_of(host.strip("[]"))
        self.ksr.htable.sht_lock(TABLE, site)
        try:
            send()
            if self.conid_to(hostport) <= found:
                return
            held = _places(self.ksr.htable.sht_get(TABLE, site))
            if not any(place[0] == hostport for place in held):
                self._store(site, held, [*held, (hostport, self.now_ms(), found)])
        finally:
            self.ksr.htable.sht_unlock(TABLE, site)

    def close_answered(self) -> None:
        """The answer to one of our NOTIFYs, from the address and port of a place, over
        a connection the proxy opened there for it (its id above the place's floor, its
        local port no listener's): that connection is closed and the place freed now
        (review 146 HB1: UDP followers of a large certificate behind one address waited
        on connections left open).  One over a twin of the far end's, to one of our
        listeners, closes and frees nothing (review 147 K3).  The local port is read
        from the listing: ``$Rp`` is the port of the socket a connection is bound to, a
        listener's for the proxy's own connections too (stop 47)."""
        ksr = self.ksr
        if (ksr.pv.get("$proto") or "").lower() not in ("tcp", "tls"):
            return
        source = ksr.pv.get("$si") or ""
        hostport = far_end(source, ksr.pv.get("$sp") or 0)
        conid = ksr.pv.get("$conid") or 0
        site = site_of(source)

        def mine(held: list[Place]) -> list[Place]:
            return [place for place in held if place[0] == hostport and conid > place[2]]

        # read under the item's lock: ``open_with`` sends and then stores the place
        # under it, and an answer read in another process can come in between; without
        # the lock it found no place and closed nothing (stop 52).  Most answers come
        # from no place: the listing is made only for one that does, and outside the
        # lock (the workers sending toward that site wait on it)
        ksr.htable.sht_lock(TABLE, site)
        try:
            ours = mine(_places(ksr.htable.sht_get(TABLE, site)))
        finally:
            ksr.htable.sht_unlock(TABLE, site)
        if not ours or not self._opened_by_us(conid):
            return
        ksr.tcpops.tcp_close_connection()
        ksr.htable.sht_lock(TABLE, site)
        try:
            held = _places(ksr.htable.sht_get(TABLE, site))
            self._store(site, held, [place for place in held if place not in mine(held)])
        finally:
            ksr.htable.sht_unlock(TABLE, site)

    def _opened_by_us(self, conid: int) -> bool:
        """Whether connection ``conid`` is open and one the proxy opened."""
        try:
            return any(conn.id == conid for conn in self._listed_own())
        except ValueError:
            return False

    def _own_alive(self, hostport: str, floor: int) -> bool:
        """Whether a connection the proxy opened to ``hostport`` after ``floor`` is open
        (no listing: taken as open, so that nothing is opened past the bound)."""
        try:
            return any(far_end(conn.source, conn.source_port) == hostport and conn.id > floor
                       for conn in self._listed_own())
        except ValueError:
            return True

    def _listed_own(self) -> list[Connection]:
        """The open connections the proxy opened, from a listing made now; raises
        ``ValueError`` when there is none."""
        connections = list_connections(self.ksr)
        if connections is None:
            raise ValueError("core.tcp_list gave nothing")
        return self._own(connections)

    def _own(self, connections: Iterable[Connection]) -> list[Connection]:
        """Those of ``connections`` open and opened by the proxy (local port none of our
        listeners')."""
        return [conn for conn in connections
                if conn.state in LIVE_STATES and conn.local_port not in self.listen_ports]

    def sweep(self) -> list[int]:
        """When any place is held: list the connections, close those the proxy opened
        to a place taken ``CONNECT_LIFETIME`` s ago or more, and free the places with
        none left; the ids it asked to close."""
        sites = self._sites()
        if not sites:
            return []
        listed_ms = self.now_ms()
        connections = list_connections(self.ksr)
        return [] if connections is None else self.settle(sites, connections, listed_ms)

    def settle(self, sites: list[str], connections: Iterable[Connection],
               listed_ms: int) -> list[int]:
        """The places of ``sites`` against ``connections`` as listed at ``listed_ms``: a
        place taken before the listing with no connection of its own (the proxy opened
        it, its id above the floor) is freed, and so is one ``PLACE_KEPT`` s old; the
        connections of one taken ``CONNECT_LIFETIME`` s before are closed."""
        opened: dict[str, list[int]] = defaultdict(list)
        for conn in self._own(connections):
            opened[far_end(conn.source, conn.source_port)].append(conn.id)
        closed: list[int] = []
        for site in sites:
            self.ksr.htable.sht_lock(TABLE, site)
            try:
                before = _places(self.ksr.htable.sht_get(TABLE, site))
                after = []
                for hostport, taken, floor in before:
                    ids = [conid for conid in opened.get(hostport, []) if conid > floor]
                    if not ids and taken < listed_ms:
                        continue        # refused, closed, timed out, none opened: free
                    if ids and listed_ms - taken >= CONNECT_LIFETIME * 1000:
                        for conid in ids:
                            self.ksr.tcpops.tcp_close_connection_id(conid)
                        closed.extend(ids)
                        self.ksr.info("e2m certs: %d connection(s) the service opened to "
                                      "%s closed: %d ms old\n"
                                      % (len(ids), hostport, listed_ms - taken))
                    if listed_ms - taken < PLACE_KEPT * 1000:
                        after.append((hostport, taken, floor))
                self._store(site, before, after)
            finally:
                self.ksr.htable.sht_unlock(TABLE, site)
        return closed

    def _sites(self) -> list[str]:
        """The sites the table holds places for (read first: an item is not written
        while the iterator holds its slot)."""
        ksr = self.ksr
        sites: list[str] = []
        if ksr.htable.sht_iterator_start(_ITERATOR, TABLE) < 0:
            return sites
        try:
            while len(sites) < _SWEEP_MAX and ksr.htable.sht_iterator_next(_ITERATOR) > 0:
                site = ksr.pv.get(f"$shtitkey({_ITERATOR})")
                if isinstance(site, str):
                    sites.append(site)
        finally:
            ksr.htable.sht_iterator_end(_ITERATOR)
        return sites
