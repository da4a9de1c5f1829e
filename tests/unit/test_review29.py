"""Review 29 (attacker's review of this session's fixes): the TCP sweep, in memory.

``kamailio_app.tcp_sweep.TcpSweeper`` decides which connections the rtimer process
closes (review 28).  Each ``test_hole_*`` was a strict xfail on ``4518507`` whose
assertion is what a fix must make true (now closed: ``tcp_sweep.share_key`` counts an
IPv6 /64 as one address, and connections the proxy opened are in no share);
``test_control_*`` is the same flow without the attack (it passes).  The wire half (a real Kamailio) is
``tests/kamailio/test_review29_wire.py``.
"""

from __future__ import annotations

import pytest

from kamailio_app.tcp_sweep import Connection, TcpSweeper
from tests.unit.test_tcp_sweep import IDLE, MARKED, conn, sweeper


def _v6_sweeper(per_source: int = 32) -> TcpSweeper:
    return TcpSweeper(listen_ports={5060, 5061}, idle_timeout=IDLE, first_message_timeout=10,
                      per_source=per_source, exempt=lambda ip: False)


def test_hole_one_ipv6_host_holds_the_table_from_addresses_of_its_own_prefix():
    """Attacker: off-path sender with an ordinary IPv6 access line (one /64, the
    smallest prefix a home or mobile line gets; SLAAC privacy addresses are free to
    make) against a proxy with an IPv6 TCP/TLS listener (``[kamailio] listen`` takes
    ``tcp:[2001:db8::1]:5060``; ``tcp_sweep`` takes ``src_ip`` as printed).

    Attack: open the whole table (``tcp_max_connections``, 407 by default at 256 MB),
    each connection from a new address of his /64; on each send one stray SIP reply
    (marks it without pike: ``ksr_reply_route`` marks before anything) or one OPTIONS,
    then a CRLF keep-alive now and then.

    Effect: ``tcp_connections_per_source`` (32) counts per exact address, so every
    address holds one connection, under its share: the sweep closes none of the 407,
    and no new TCP/TLS client (a phone that lost its connection, a new one) gets a
    slot for as long as he likes.  This is review 28's hole again, from one host: the
    threat model's accepted "from many addresses" limit here costs nothing.

    Fix: count IPv6 sources per prefix (a /64 at least; pike's tree groups the same
    way), e.g. ``ipaddress.ip_network(f"{src}/64", strict=False)`` as the share key,
    with its own bound."""
    s = _v6_sweeper()
    table = [Connection(n, f"2001:db8:0:7::{n:x}", 5060, MARKED, "CONN_OK")
             for n in range(1, 408)]
    s.to_close(table, 0.0)
    closed = s.to_close(table, 30.0)
    assert len(table) - len(closed) <= 32, f"{len(table) - len(closed)} of one /64 kept"


def test_control_one_ipv4_address_holds_its_share_only():
    s = _v6_sweeper()
    table = [Connection(n, "198.51.100.7", 5060, MARKED, "CONN_OK") for n in range(1, 408)]
    s.to_close(table, 0.0)
    assert len(table) - len(s.to_close(table, 30.0)) == 32


def test_hole_a_connection_the_proxy_opened_is_closed_as_the_addresss_extra():
    """Attacker: off-path sender (or an insider) who shares an address with a peer the
    proxy connects out to: a phone's TCP contact behind the same NAT/CGNAT address, a
    next hop's host.

    Attack: hold ``tcp_connections_per_source`` connections from that address, each
    marked once (a stray reply or an OPTIONS), kept with keep-alives.

    Effect: ``TcpSweeper.to_close`` puts every live connection of the address in the
    share, outgoing ones too (only the first-message rule looks at ``local_port``); the
    proxy's own connection to the peer (local port not a listener, and unmarked until
    something comes back on it) sorts last and is closed "too many from one address"
    within 2 s.  README (``[limits]``) and ``tcp_sweep.py``'s docstring say
    "Connections the proxy opened are left alone".

    Fix: leave connections whose ``local_port`` is not a listener out of the
    per-source share, as the docs say."""
    s = sweeper(per_source=3)
    held = [conn(n, spoke=True) for n in (1, 2, 3)]          # the attacker's, marked
    ours = conn(9, port=40123)                               # the proxy dialled out
    s.to_close(held + [ours], 0.0)
    assert 9 not in s.to_close(held + [ours], 3.0)


def test_control_a_connection_the_proxy_opened_alone_is_kept():
    s = sweeper(per_source=3)
    ours = conn(9, port=40123)
    s.to_close([ours], 0.0)
    assert s.to_close([ours], 60.0) == {}
