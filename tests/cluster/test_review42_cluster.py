"""A forty-second attacker's review (December 2026) of a31495c, on a real two-node
cluster (PostgreSQL, DMQ): review 40's fix, "KDMQ only over UDP, on this node's
``dmq_address`` socket, from a peer's address and port".

The fix compares ``$Ri:$Rp`` with ``[cluster] dmq_address``.  Nothing keeps that socket
apart from the SIP listeners: ``[cluster] dmq_address`` may name a ``[kamailio] listen``
UDP socket, and the launcher is written for it (``launcher._listen_lines``: "the DMQ
socket when no listener is already on it": no second ``listen=`` line, DMQ's
``server_address`` is the SIP socket).  Configuration, launcher and proxy start without a
word (``public_dmq_warning`` speaks only of a globally routable address).  On such a
node the SIP port *is* the DMQ socket, so review 40's forged UDP KDMQ "to the public SIP
port" is taken again.

``test_hole_*`` xfailed strictly on a31495c (a control showed a stranger's KDMQ refused
and the nodes' own replication working on the shared socket).  The configuration-level
test is in ``tests/unit/test_review42.py``.

Fixed: the configuration refuses a ``dmq_address`` that a ``[kamailio] listen`` UDP
socket serves (the same address and port, or a wildcard on its port) and a wildcard
``dmq_address``; the launcher always gives DMQ a listener of its own.  The node does
not start, so the forged KDMQ has no shared socket to reach (review 40's wire tests
cover the documented layout).
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.cluster import Cluster, htable_dump, start_cluster
from e2m_lab.ports import free_port
from tests.cluster.test_review40_cluster import _forged, _genuine_kdmq, _udp_from

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]


def _start_sharing(proxy_factory, db_url: str) -> Cluster:
    """Two nodes whose DMQ socket is their SIP UDP listener: ``dmq_address =
    sip:127.0.0.1:<the node's SIP port>`` (a layout the config and the launcher took as
    it was before the fix: one port per node, DMQ on it)."""
    port_a = free_port()
    port_b = free_port(avoid={port_a})
    return start_cluster(proxy_factory, db_url, ports=(port_a, port_b),
                         dmq_ports=(port_a, port_b))


def test_hole_kdmq_forged_to_a_sip_port_that_is_the_dmq_socket_is_taken(
        proxy_factory, pg_url, tmp_path):
    """Attacker: review 40's off-path sender: it can forge a UDP source address and
    reaches the node's SIP port (phones do), not a private DMQ network.

    Precondition: a cluster whose nodes' ``[cluster] dmq_address`` is their own SIP UDP
    listener (``listen = ["udp:H:P", ...]``, ``dmq_address = "sip:H:P"``).  Config,
    ``e2m-proxy`` and Kamailio take it; no warning unless H is a global address (a
    private LAN that serves phones gets none).

    Attack: KDMQ (a genuine htable replication captured once, renamed to
    ``probe-shr-ok``) in a UDP datagram from the peer's address and port (its SIP port,
    which is its DMQ port) to the node's SIP port.

    Effect: ``dmq_accepts`` sees UDP, ``$Ri:$Rp`` == dmq_address and a peer's source: the
    record is written into ``e2mseen`` (a forged replay record refuses alice's next
    request; a deletion lets a replay through; through dmq_usrloc a forged registration
    takes bob's calls).  Review 40's hole, back for this layout.

    Fix: refuse at config load a ``dmq_address`` that is also a ``[kamailio] listen``
    socket (same address and port, or a wildcard listener on its port), so the DMQ
    socket is always one only the nodes' network reaches, and drop the launcher's
    "no listener is already on it" branch."""
    with pytest.raises(Exception) as refused:   # the harness raises what e2m-proxy said
        cluster = _start_sharing(proxy_factory, pg_url)
        a, b = cluster.nodes
        genuine = _genuine_kdmq(cluster, tmp_path)
        via = f"Via: SIP/2.0/UDP 127.0.0.1:{a.port};branch=z9hG4bK-r42shr"
        _udp_from(a.port, b.port, _forged(genuine, b"probe-shr-ok", via))
        time.sleep(0.5)
        assert "probe-shr-ok" not in htable_dump(b, "e2mseen")
    assert "dmq_address" in str(refused.value) and "socket of its own" in str(refused.value)
