"""A seventy-first attacker's review (December 2026) of cdfc7a2: trust boundaries of the
cluster and its dispatcher front (real Kamailio nodes, real PostgreSQL).

(filled in below, per hole, once shown)
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2m_lab.cluster import (REPLICATION, Bob, Cluster, _node_settings, answers, contacts,
                             dmq_peer_active, register_bob, wait_until)
from e2m_lab.flows import SDP_ANSWER
from e2m_lab.kamailio_harness import SipUa
from e2m_plugins.sip import make_response

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]


def _front(proxy_factory, nodes: Cluster):
    a, b = nodes.nodes
    return proxy_factory("front", e2m=False, archive=False,
                         extra={"dispatcher": {"destinations": [a.uri, b.uri],
                                               "probe_interval": 600}})


# --------------------------------------------------------------------------- hole 1

def _limited_cluster(proxy_factory, pg_url: str, per_source: int) -> Cluster:
    """``start_cluster`` (open registrar, no [auth]) with ``[limits]
    registrations_per_source`` set on both nodes."""
    from e2m_lab.ports import free_port
    first = free_port()
    dmq = (first, free_port(avoid={first}))
    settings = [_node_settings(pg_url, dmq[0], dmq[1], None),
                _node_settings(pg_url, dmq[1], dmq[0], None)]
    for one in settings:
        one["extra"]["limits"] = {"registrations_per_source": per_source}
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = [pool.submit(proxy_factory, f"node-{n}", **s)
                   for n, s in zip("ab", settings)]
        nodes = Cluster(*(s.result() for s in started))
    wait_until(lambda: all(dmq_peer_active(n) for n in nodes.nodes), 15, "DMQ peers up")
    return nodes


def _register_many(port: int, source: str, prefix: str, count: int) -> list[int | None]:
    statuses = []
    for n in range(count):
        ua = SipUa(port, user=f"{prefix}{n}", source=source)
        try:
            reply = ua.register()
            statuses.append(reply.status if reply is not None else None)
        finally:
            ua.close()
        time.sleep(0.1)          # well under pike's 30 requests in 2 s
    return statuses


PER_SOURCE = 3


def test_control_a_node_caps_the_aors_one_stranger_registers(proxy_factory, pg_url):
    nodes = _limited_cluster(proxy_factory, pg_url, PER_SOURCE)
    a, _ = nodes.nodes
    statuses = _register_many(a.port, "127.0.0.91", "ctl", PER_SOURCE + 2)
    assert statuses == [200] * PER_SOURCE + [403, 403], statuses


@pytest.mark.xfail(strict=True, reason="review 71: off-path sender registers any number of "
                                       "AoRs through the front (registrations_per_source void)")
def test_hole_the_front_lifts_the_registrations_per_source_cap(proxy_factory, pg_url):
    nodes = _limited_cluster(proxy_factory, pg_url, PER_SOURCE)
    a, b = nodes.nodes
    front = _front(proxy_factory, nodes)
    statuses = _register_many(front.port, "127.0.0.92", "hole", PER_SOURCE + 5)
    registered = [n for n in range(PER_SOURCE + 5) if contacts(a, f"hole{n}") or
                  contacts(b, f"hole{n}")]
    print(f"\nthrough the front: {statuses}; AoRs registered: {len(registered)}")
    assert statuses[:PER_SOURCE] == [200] * PER_SOURCE, statuses
    assert len(registered) <= PER_SOURCE, \
        f"one stranger registered {len(registered)} AoRs (cap {PER_SOURCE}): {statuses}"


# --------------------------------------------------------------------------- hole 2

class _SkippingBob(Bob):
    """bob, an insider callee: his 200 to an INVITE goes straight to ``skip_to`` (the
    front's port) with the node's Via taken off, so only the front's Via and alice's
    remain; the node gets a 180 (its INVITE transaction waits)."""

    def __init__(self, pki) -> None:
        super().__init__(pki)
        self.skip_to: int | None = None

    def _respond(self, request):
        if request.method != "INVITE" or self.skip_to is None or request.to_tag is not None:
            return super()._respond(request)
        top = request.get_all("Via")[0]
        assert "," not in top
        trimmed = request.remove("Via", where=lambda value: value == top)
        answer = super()._respond(trimmed)
        self.sock.sendto(answer.serialize(), ("127.0.0.1", self.skip_to))
        return make_response(request, 180, "Ringing").replace("To", answer.get("To") or "")


@pytest.fixture
def sbob(pki):
    phone = _SkippingBob(pki)
    yield phone
    phone.close()


def _call_through_front(cluster, proxy_factory, alice, sbob, skip: bool):
    a, b = cluster.nodes
    front = _front(proxy_factory, cluster)
    register_bob(front, sbob)
    wait_until(lambda: contacts(a, "bob") and contacts(b, "bob"), REPLICATION,
               "bob's registration on both nodes")
    if skip:
        sbob.skip_to = front.port
    reply = alice.call(front)
    assert reply is not None and reply.status == 200, reply and reply.status
    assert alice.open(reply) == SDP_ANSWER            # alice took bob's answer
    alice.ack(front)
    return front


def test_control_bobs_answer_through_the_front_is_read_and_archived(cluster, proxy_factory,
                                                                  alice, sbob):
    _call_through_front(cluster, proxy_factory, alice, sbob, skip=False)
    a, _ = cluster.nodes
    wait_until(lambda: answers(a, alice.call_id), 5, "bob's answer archived")


@pytest.mark.xfail(strict=True, reason="review 71: insider callee sends his 200 to the front "
                                       "past the node: relayed unread, never archived")
def test_hole_an_answer_sent_to_the_front_past_the_node_is_relayed_unread(cluster,
                                                                        proxy_factory,
                                                                        alice, sbob):
    _call_through_front(cluster, proxy_factory, alice, sbob, skip=True)
    a, b = cluster.nodes
    time.sleep(2.0)
    read = [n.name for n in cluster.nodes if "INVITE response 200" in n.log_since(0)]
    print(f"\nnodes that read a 200: {read}; archived answers: "
          f"{len(answers(a, alice.call_id))}")
    assert answers(a, alice.call_id), \
        "alice took bob's SDP answer from the front; no node read it, the archive has no row"
