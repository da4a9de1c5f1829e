"""The certificate service's places toward one address (``kamailio_app.cert_connects``),
against a listing of connections, with a stand-in for Kamailio's KSR (stop 46)."""

from __future__ import annotations

import json

from kamailio_app.cert_connects import (CONNECT_LIFETIME, MAX_CONNECTS, PLACE_KEPT,
                                        OpenedConnections, far_end)
from kamailio_app.tcp_sweep import Connection

LISTENER = 5060
STRANGER = "192.0.2.7"


class FakeKsr:
    def __init__(self) -> None:
        self.items: dict[str, str] = {}
        self.closed: list[int] = []
        self.locked: list[str] = []
        self.htable = self
        self.tcpops = self
        self.pv = self
        self.vars: dict[str, object] = {}
        self.found: dict[str, int] = {}      # host:port -> the connection a lookup finds
        self.jsonrpcs = self
        self.listing: list[Connection] = []  # what core.tcp_list answers
        self.listings = 0

    # htable
    def sht_get(self, table, key):
        return self.items.get(key)

    def sht_sets(self, table, key, value):
        self.items[key] = value

    def sht_rm(self, table, key):
        self.items.pop(key, None)

    def sht_lock(self, table, key):
        self.locked.append(key)

    def sht_unlock(self, table, key):
        assert self.locked.pop() == key

    def sht_iterator_start(self, name, table):
        self._keys = list(self.items)
        return 0

    def sht_iterator_next(self, name):
        if not self._keys:
            return -1
        self.vars[f"$shtitkey({name})"] = self._keys.pop(0)
        return 1

    def sht_iterator_end(self, name):
        return 0

    # tcpops, pv, core
    def tcp_close_connection_id(self, conid):
        self.closed.append(conid)
        return 1

    def tcp_close_connection(self):
        self.closed.append(self.vars["$conid"])

    def exec(self, command):
        assert json.loads(command)["method"] == "core.tcp_list"
        self.listings += 1
        self.vars["$jsonrpl(body)"] = json.dumps({"result": [
            {"id": c.id, "src_ip": c.source, "src_port": c.source_port,
             "dst_port": c.local_port, "lifetime": c.lifetime, "state": c.state}
            for c in self.listing]})

    def get(self, name):
        return self.vars.get(name)

    def sets(self, name, value):
        self.vars[name] = value

    def info(self, text):
        pass

    def route(self, name):
        assert name == "E2M_STREAM_OPEN"
        self.vars["$var(e2m_conid)"] = self.found.get(self.vars["$var(e2m_hostport)"], 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _service():
    ksr, clock = FakeKsr(), Clock()
    return ksr, clock, OpenedConnections(ksr, [LISTENER], clock=clock)


def _outbound(conid: int, port: int, local: int = 40000 + 1) -> Connection:
    return Connection(conid, STRANGER, local, 120, "CONN_OK", port)


def test_far_end_is_spelt_one_way():
    assert far_end("[0:0:0:0:0:0:0:1]", "5060") == far_end("::1", 5060) == "[::1]:5060"
    assert far_end("192.0.2.7", 9) == "192.0.2.7:9"


def test_no_more_than_two_places_per_address():
    ksr, clock, service = _service()
    sent = []
    for port in (1001, 1002, 1003):
        assert service.open_with(STRANGER, port, lambda: sent.append(port)) is (port != 1003)
    assert sent == [1001, 1002] and MAX_CONNECTS == 2
    assert ksr.locked == []                            # every lock given back


def _opens(ksr: FakeKsr, port: int, conid: int):
    """A send to ``port`` that opens connection ``conid`` (found there from now on)."""
    def send() -> None:
        ksr.found[f"{STRANGER}:{port}"] = conid
        ksr.listing.append(_outbound(conid, port))
    return send


def test_notifies_to_a_held_place_share_its_connection():
    ksr, clock, service = _service()
    sent = []
    for conid, port in enumerate((1001, 1001, 1002, 1001, 1003), start=1):
        opens = _opens(ksr, port, conid)
        service.open_with(STRANGER, port, lambda: (sent.append(port), opens()))
    assert sent == [1001, 1001, 1002, 1001]
    assert ksr.items[STRANGER].count("@") == 2 * 2     # two places, three fields each
    assert ksr.listings == 0                           # each found its place's connection


def test_a_place_whose_address_a_twin_took_is_not_shared():
    """Review 149 K1: the place's connection lives, but a lookup by address no longer
    finds it (a twin took the address and was reset): a send would open another."""
    ksr, clock, service = _service()
    sent = []
    service.open_with(STRANGER, 1001, _opens(ksr, 1001, 4))
    del ksr.found[f"{STRANGER}:1001"]                  # the alias gone with the twin
    assert service.open_with(STRANGER, 1001, lambda: sent.append(1)) is False
    assert sent == [] and ksr.listings == 1
    ksr.found[f"{STRANGER}:1001"] = 9                  # a live twin: the send goes over it
    assert service.open_with(STRANGER, 1001, lambda: sent.append(2)) is True
    assert sent == [2]


def test_a_place_whose_connection_is_gone_is_taken_anew():
    """(closed at its short life, the place not yet freed by a listing): the NOTIFY
    goes now, over a new connection, and the place is counted from now."""
    ksr, clock, service = _service()
    service.open_with(STRANGER, 1001, _opens(ksr, 1001, 4))
    ksr.listing.clear()
    del ksr.found[f"{STRANGER}:1001"]
    clock.now += CONNECT_LIFETIME + 0.5
    assert service.open_with(STRANGER, 1001, _opens(ksr, 1001, 5)) is True
    assert ksr.items[STRANGER] == f"{STRANGER}:1001@{service.now_ms()}@0"


def test_without_a_listing_a_stolen_place_opens_nothing():
    ksr, clock, service = _service()
    service.open_with(STRANGER, 1001, _opens(ksr, 1001, 4))
    del ksr.found[f"{STRANGER}:1001"]
    ksr.exec = lambda command: ksr.vars.__setitem__("$jsonrpl(body)", "")
    assert service.open_with(STRANGER, 1001, lambda: None) is False


def test_a_connection_there_before_the_place_is_not_its_own():
    """(a connection the proxy relays calls over to a hop, opened before the NOTIFY)"""
    ksr, clock, service = _service()
    ksr.found[f"{STRANGER}:1001"] = 7                  # the newest there: the floor
    service.open_with(STRANGER, 1001, lambda: None)
    clock.now += CONNECT_LIFETIME + 1
    relay, ours = _outbound(6, 1001), _outbound(8, 1001)
    assert service.settle([STRANGER], [relay, ours], service.now_ms()) == [8]
    clock.now += 1
    service.settle([STRANGER], [relay], service.now_ms())
    assert ksr.items == {}                           # freed: only the older one is left


def test_no_place_is_held_past_its_time():
    ksr, clock, service = _service()
    service.open_with(STRANGER, 1001, lambda: None)
    clock.now += PLACE_KEPT
    assert service.settle([STRANGER], [_outbound(4, 1001)], service.now_ms()) == [4]
    assert ksr.items == {}


def test_a_place_frees_only_when_the_listing_shows_none_of_ours_there():
    ksr, clock, service = _service()
    service.open_with(STRANGER, 1001, lambda: None)
    service.open_with(STRANGER, 1002, lambda: None)
    clock.now += 1
    listed = service.now_ms()
    twin = Connection(9, STRANGER, LISTENER, 120, "CONN_OK", 1001)   # his, to our listener
    service.settle([STRANGER], [twin, _outbound(4, 1002)], listed)
    # 1001: only his twin is left there, the proxy's own is gone: free; 1002 held
    assert service.open_with(STRANGER, 1003, lambda: None)
    assert not service.open_with(STRANGER, 1004, lambda: None)


def test_a_place_taken_after_the_listing_is_kept():
    ksr, clock, service = _service()
    listed = service.now_ms() - 5
    service.open_with(STRANGER, 1001, lambda: None)
    service.settle([STRANGER], [], listed)
    assert STRANGER in ksr.items


def test_the_proxys_connections_are_closed_at_their_short_life_answered_or_not():
    ksr, clock, service = _service()
    service.open_with(STRANGER, 1001, lambda: None)
    clock.now += CONNECT_LIFETIME - 0.5
    assert service.settle([STRANGER], [_outbound(4, 1001)], service.now_ms()) == []
    clock.now += 0.5
    assert service.settle([STRANGER], [_outbound(4, 1001)], service.now_ms()) == [4]
    assert ksr.closed == [4]
    clock.now += 1
    service.settle([STRANGER], [], service.now_ms())  # gone now: the place is free
    assert ksr.items == {}                           # and the emptied item removed


def test_an_answer_closes_the_proxys_connection_not_a_twin():
    ksr, clock, service = _service()
    service.open_with(STRANGER, 1001, lambda: None)
    twin = Connection(9, STRANGER, LISTENER, 120, "CONN_OK", 1001)
    ksr.listing = [_outbound(4, 1001), twin]
    # $Rp names the listener for both (the socket a connection is bound to): it must
    # not decide (stop 47); the listing's local port does
    ksr.vars.update({"$proto": "tcp", "$si": STRANGER, "$sp": 1001, "$conid": 9,
                     "$Rp": LISTENER})
    service.close_answered()                          # over his twin, to our listener
    assert ksr.closed == [] and STRANGER in ksr.items
    ksr.vars.update({"$conid": 4})                    # over the proxy's own
    service.close_answered()
    assert ksr.closed == [4]
    assert ksr.items == {}                            # its place freed at once


def test_an_answer_from_no_place_lists_nothing():
    ksr, clock, service = _service()
    service.open_with(STRANGER, 1001, lambda: None)
    ksr.listing = [_outbound(4, 1002)]
    ksr.vars.update({"$proto": "tcp", "$si": STRANGER, "$sp": 1002, "$conid": 4})
    service.close_answered()                          # another port: no place there
    ksr.vars.update({"$proto": "udp", "$sp": 1001, "$conid": None})
    service.close_answered()                          # over UDP
    assert ksr.listings == 0 and ksr.closed == [] and STRANGER in ksr.items


def test_a_follows_own_connection_gone_at_the_send_is_kept_as_a_place():
    ksr, clock, service = _service()
    hostport = f"{STRANGER}:1001"
    ksr.found[hostport] = 5
    service.send_over(STRANGER, 1001, 5, lambda: None)          # sent over it: nothing kept
    assert ksr.items == {}
    service.send_over(STRANGER, 1001, 5, lambda: ksr.found.__setitem__(hostport, 9))
    clock.now += CONNECT_LIFETIME + 1                           # tm opened 9 in between
    assert service.settle([STRANGER], [_outbound(9, 1001)], service.now_ms()) == [9]
