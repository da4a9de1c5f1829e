"""``kamailio_app.tcp_sweep``: which connections the proxy closes (review 28), in memory.
The wire tests are in ``tests/kamailio/test_review28_wire.py``."""

from __future__ import annotations

import json

import pytest

from kamailio_app.config import AppConfigError, load_app_config
from kamailio_app.tcp_sweep import Connection, TcpSweeper, marked_lifetime, parse_tcp_list

IDLE = 120
MARKED = marked_lifetime(IDLE)


def sweeper(per_source: int = 3, exempt=lambda ip: ip == "192.0.2.1") -> TcpSweeper:
    return TcpSweeper(listen_ports={5060, 5061}, idle_timeout=IDLE, first_message_timeout=10,
                      per_source=per_source, exempt=exempt)


def conn(cid: int, source: str = "198.51.100.7", *, port: int = 5060, spoke: bool = False,
         state: str = "CONN_OK") -> Connection:
    return Connection(cid, source, port, MARKED if spoke else IDLE, state)


def test_parse_tcp_list_reads_the_rpc_answer_and_skips_odd_rows():
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": [
        {"id": 7, "type": "TCP", "state": "CONN_OK", "timeout": 100, "lifetime": 121,
         "ref_count": 1, "src_ip": "198.51.100.7", "src_port": 40000,
         "dst_ip": "192.0.2.1", "dst_port": 5060},
        {"id": "x"}, "not a row"]})
    assert parse_tcp_list(body) == [Connection(7, "198.51.100.7", 5060, 121, "CONN_OK", 40000)]
    with pytest.raises(ValueError):
        parse_tcp_list(json.dumps({"error": {"code": 500}}))


def test_a_connection_that_never_spoke_goes_after_the_first_message_timeout():
    s = sweeper()
    listing = [conn(1), conn(2, spoke=True), conn(3, port=40123)]     # 3: one we opened
    assert s.to_close(listing, 100.0) == {}
    assert s.to_close(listing, 109.0) == {}
    assert s.to_close(listing, 110.0) == {1: "no SIP message"}


def test_one_address_keeps_its_share_oldest_and_used_first():
    s = sweeper(per_source=3)
    s.to_close([conn(1, spoke=True), conn(2)], 0.0)
    later = [conn(1, spoke=True), conn(2), conn(3, spoke=True), conn(4), conn(5)]
    assert s.to_close(later, 5.0) == {4: "too many from one address",
                                      5: "too many from one address"}


def test_our_own_and_trusted_addresses_are_never_closed():
    s = sweeper(per_source=1)
    listing = [conn(n, "192.0.2.1") for n in range(5)]
    assert s.to_close(listing, 0.0) == {} and s.to_close(listing, 60.0) == {}


def test_gone_connections_are_forgotten_and_dead_states_ignored():
    s = sweeper()
    s.to_close([conn(1), conn(2)], 0.0)
    assert s.to_close([conn(2, state="CONN_EOF")], 1.0) == {}
    assert s._first_seen == {}                      # bounded by what is listed
    assert s.to_close([conn(1)], 20.0) == {}        # a new connection reusing id 1


def test_config_defaults_and_bounds(tmp_path):
    def limits(**table):
        path = tmp_path / "PROXY.toml"
        lines = ['[kamailio]', 'listen = ["udp:127.0.0.1:5070", "tcp:127.0.0.1:5070"]',
                 '[e2m]', 'enabled = false', '[limits]']
        lines += [f"{k} = {v}" for k, v in table.items()]
        path.write_text("\n".join(lines) + "\n")
        return load_app_config(path).limits
    d = limits(tcp_max_connections=20)
    assert d.tcp_connections_per_source == 5 and d.tcp_first_message_timeout == 10
    assert limits().tcp_connections_per_source == 32
    assert limits(tcp_idle_timeout=5).tcp_first_message_timeout == 5
    with pytest.raises(AppConfigError):
        limits(tcp_max_connections=20, tcp_connections_per_source=21)
    with pytest.raises(AppConfigError):
        limits(tcp_idle_timeout=30, tcp_first_message_timeout=31)


def test_authenticated_connections_are_kept_before_those_that_only_spoke():
    from kamailio_app.tcp_sweep import AUTHENTICATED
    s = sweeper(per_source=2)
    authed = Connection(9, "198.51.100.7", 5060, marked_lifetime(IDLE, AUTHENTICATED), "CONN_OK")
    old = [conn(1, spoke=True), conn(2, spoke=True)]
    s.to_close(old, 0.0)
    assert s.to_close([*old, authed], 5.0) == {2: "too many from one address"}


def test_a_lower_mark_written_later_does_not_lower_what_the_sweep_saw():
    """The lifetime is one value: a later message may write a lower mark over an
    authenticated one (review 31); the sweep keeps the highest it saw."""
    from kamailio_app.tcp_sweep import AUTHENTICATED
    s = sweeper(per_source=2)
    old = [conn(1, spoke=True), conn(2, spoke=True)]
    authed = Connection(9, "198.51.100.7", 5060, marked_lifetime(IDLE, AUTHENTICATED), "CONN_OK")
    s.to_close([*old, authed], 0.0)
    lowered = Connection(9, "198.51.100.7", 5060, marked_lifetime(IDLE), "CONN_OK")
    assert s.to_close([*old, lowered], 5.0) == {2: "too many from one address"}
