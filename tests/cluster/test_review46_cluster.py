"""Review 46 on a real two-node cluster (PostgreSQL, DMQ): with ``[policy] legacy_peers``
a stranger's stray 200s to INVITE, each carrying one unsigned envelope for the proxy
that offers its CEK, claim a fork slot each in the shared ``replay_claims`` (review 44's
hole through the legacy door; ``tests/unit/test_review46.py`` hole 3 at the engine).

``test_hole_*`` xfail strictly on 1438a99; ``test_control_*`` pass.

Fixed: see ``tests/unit/test_review46.py``.
"""

from __future__ import annotations

import socket
import time

import psycopg
import pytest

from e2m_lab.cluster import Cluster, _node_settings, wait_dmq_up
from e2m_lab.flows import SDP_ANSWER, answer
from e2m_lab.kamailio_harness import PROXY_HOST
from e2m_lab.ports import free_port
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.sip import make_request

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

_STRAYS = 200
LEGACY = "resip.example.org"


def _start(proxy_factory, db_url: str) -> Cluster:
    """``start_cluster``'s two nodes, each with ``[policy] legacy_peers``."""
    from concurrent.futures import ThreadPoolExecutor
    dmq_a = free_port()
    dmq_b = free_port(avoid={dmq_a})
    settings = [_node_settings(db_url, dmq_a, dmq_b, None),
                _node_settings(db_url, dmq_b, dmq_a, None)]
    for one in settings:
        one["extra"]["policy"] = {"legacy_peers": [LEGACY]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        started_a = pool.submit(proxy_factory, "node-a", **settings[0])
        started_b = pool.submit(proxy_factory, "node-b", **settings[1])
        nodes = Cluster(started_a.result(), started_b.result())
    wait_dmq_up(nodes.nodes)
    return nodes


def _fork_claims(pg_url: str) -> int:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM replay_claims WHERE name LIKE 'f%'"
                            ).fetchone()[0]


def _entity(pki, offer_key: bool):
    """One envelope for the node's (public) certificate, unsigned, no SIP context;
    offering its CEK for reuse or not."""
    entity, _ = protect_content("application/sdp", SDP_ANSWER,
                                [recipient_for_certificate(pki.proxy(PROXY_HOST).cert,
                                                           oaep=True)],
                                cek_reference=new_reference() if offer_key else None)
    return entity


def _stray(pki, entity, node_port: int, sink_port: int, n: int) -> bytes:
    request = make_request("INVITE", f"sip:dave@{LEGACY}", from_uri="sip:alice@example.com",
                           to_uri=f"sip:dave@{LEGACY}", call_id=f"stray46-{n}@attacker.example",
                           cseq=1, from_tag=f"s{n}", body=SDP_ANSWER,
                           content_type="application/sdp")
    reply = with_entity(answer(request, to_tag=f"t{n}"), entity)
    reply = reply.remove("Via").add("Via", f"SIP/2.0/UDP 127.0.0.1:{node_port};"
                                            f"branch=z9hG4bK-r46-{n}")
    reply = reply.add("Via", f"SIP/2.0/UDP 127.0.0.1:{sink_port};branch=z9hG4bK-r46s-{n}")
    return reply.serialize()


def _spray(pki, entity, node_port: int) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for n in range(_STRAYS):
            sender.sendto(_stray(pki, entity, node_port, sink.getsockname()[1], n),
                          ("127.0.0.1", node_port))
            time.sleep(0.002)
    finally:
        sender.close()
        sink.close()


def test_hole_strangers_legacy_stray_200s_fill_the_claims_table(proxy_factory, pg_url, pki):
    """Attacker: a stranger who can send UDP to a node's SIP port (no certificate, no
    account, no dialog, no forged source), on a cluster with ``[policy] legacy_peers``.

    Attack: 200 datagrams, each a "200 OK" to an INVITE nobody sent (its own Call-ID
    and tags, To a user of the legacy domain), all carrying the same unsigned AES-GCM
    envelope for the node's certificate with a ``CEKReference``, sent to node A's SIP
    port.

    Effect: each is read (``route_stray_reply``), needs no signed context (legacy), so
    no replay record stops it, and "offers" a key: ``_fork`` INSERTs slot 0 of a new
    early dialog into ``replay_claims`` for each (a PostgreSQL round trip in a SIP
    worker, a row for 333 s), and a key is kept and replicated for each.

    Fix: see ``tests/unit/test_review46.py::test_hole_strangers_legacy_stray_200s_each_claim_a_fork_slot``."""
    a, _ = _start(proxy_factory, pg_url).nodes
    before = _fork_claims(pg_url)
    _spray(pki, _entity(pki, offer_key=True), a.port)
    time.sleep(0.5)
    added = _fork_claims(pg_url) - before
    assert added == 0, f"{added} fork-slot claims in replay_claims from {_STRAYS} stray " \
                       "200s of a stranger"


def test_control_the_same_strays_without_a_key_offer_claim_nothing(proxy_factory, pg_url,
                                                                     pki):
    """The same datagrams with an envelope that offers no key: no row (review 44's fix),
    though each is read (the stray's body opened: the node's log says so)."""
    a, _ = _start(proxy_factory, pg_url).nodes
    before = _fork_claims(pg_url)
    _spray(pki, _entity(pki, offer_key=False), a.port)
    time.sleep(0.5)
    assert _fork_claims(pg_url) - before == 0
