"""Review 112 (an attacker's review of d038d44), cluster: review 107's relay loop
between a cluster's two nodes, each binding naming the other node's SIP socket.  Two
real Kamailio 5.6.3 nodes on DMQ and PostgreSQL (``e2m_lab.cluster.start_cluster``:
A and B on 127.0.0.1, registrar open as in that fixture), review 107/109's stranger
MESSAGE and burst (helpers of ``tests/cluster/test_review109_dmq_loop.py``).

Hole K1 (``test_hole_k1_bindings_naming_each_others_sip_socket_loop_seventy_times``,
``test_hole_k1_strangers_through_the_node_ping_pong_exhaust_shared_memory``): a bypass
of reviews 107/109's fixes.

- Attacker: an insider UA (dave, his own AoR; with [auth] his password), or anyone
  where the registrar is open, sets the trap with two REGISTERs; then any off-path
  sender springs it (requests to our users are never challenged).
- Set-up: dave REGISTERs at B ``Contact: <sip:dave@127.0.0.1:<A's SIP port>>`` and at A
  ``Contact: <sip:dave@127.0.0.1:<B's SIP port>>``.  Each names the other node, so
  ``_contact_naming_us`` (``kamailio_app/kemi.py:343-366``: ``is_myself`` and the DMQ
  sockets only) answers 200 twice; dmq_usrloc replicates both: each node holds both
  contacts.
- Messages: one stranger's ``MESSAGE sip:dave@example.com`` to A (then one to B).
- Effect (seen): each node forks to both contacts; the one naming itself is stopped
  by its ``onsend_route``, the other goes to the other node, which does the same:
  70 transactions (tm ``created``, both nodes) for one datagram entered at A and 70
  for one entered at B, the stranger answered 408.  Burst (review 109's: 150 such
  MESSAGEs from 20 addresses under pike's rate, then 30 MESSAGEs to bob one by one):
  4,504 and 4,522 transactions on the two nodes (two runs), "could not allocate shared
  memory" logged 269 / 278 times on A and 62 / 60 on B, 20 / 22 of bob's 30 MESSAGEs
  answered 500.  The threat
  model's row for review 107 says "a binding naming another node of the cluster makes
  one extra pass": true of one binding, not of two pointing at each other.
- At fault: ``kamailio_app/kemi.py:343-366`` (the REGISTER rule covers this node's
  sockets and every node's DMQ socket, not the other nodes' SIP sockets) and
  ``kamailio_app/templates/kamailio.cfg.tmpl:349-354`` (``onsend_route``: this node's
  own SIP ports only).  On 127.0.0.1 every pass is from the node's own address, which
  pike never counts; on separate hosts a node is counted unless listed in ``[limits]
  trusted``.
- Fix: refuse at REGISTER a Contact naming any node's address (the peers' addresses
  are known from ``[cluster] peers``), and, more generally, loop detection (RFC 3261
  16.3 step 4: a request carrying one of our Vias with a MAC of its present
  Request-URI, From tag, Call-ID and CSeq gets 482; see
  ``tests/kamailio/test_review112_pingpong.py``, hole K2, for two proxies that are no
  cluster).

Controls (pass unmarked): ``test_control_k1_one_binding_naming_the_other_node_is_two_passes``
(dave's binding at B naming A's SIP socket alone: at most two transactions, as the
threat model says; A refuses a Contact naming its own SIP socket, 403).

Tried and held (run): a binding at B naming A's DMQ socket by a name (``localhost``)
or a short spelling (``127.1``) is bound 200 (``_dmq_places`` compares canonical
addresses: a documentation inaccuracy, "a REGISTER whose Contact names any node's DMQ
socket is 403"), but A drops the MESSAGE at its DMQ socket (``on_dmq_socket``): one
transaction, the stranger gets 408.  Other attempts: ``tests/kamailio/test_review112_spiral.py``.

Fixed (stop 39): loop detection at each node (``kemi._came_back``, htable ``e2mloop``):
a request relayed and coming back unchanged is 482; between two nodes the loop ends at
the fourth pass.  Both hole tests failed on the code before the fix and pass with it
(markers removed).
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.cluster import contacts, start_cluster, wait_until, REPLICATION
from e2m_lab.kamailio_harness import RawUas
from tests.cluster.test_review109_dmq_loop import (
    HONEST, _burst_then_honest, _created, _register, _strangers_message)

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]


@pytest.fixture
def cluster(proxy_factory, pg_url):
    return start_cluster(proxy_factory, pg_url)


def _ping_pong(cluster):
    """dave's two bindings, each at one node naming the other's SIP socket; True when
    both were bound and replicated, False when a node refused one (secure)."""
    a, b = cluster.nodes
    first = _register(b, "dave", f"<sip:dave@127.0.0.1:{a.port}>")
    second = _register(a, "dave", f"<sip:dave@127.0.0.1:{b.port}>")
    statuses = (first and first.status, second and second.status)
    if 403 in statuses:
        return False
    assert statuses == (200, 200), statuses
    wait_until(lambda: len(contacts(a, "dave")) >= 2 and len(contacts(b, "dave")) >= 2,
               REPLICATION, "both of dave's bindings on both nodes")
    return True


def test_hole_k1_bindings_naming_each_others_sip_socket_loop_seventy_times(cluster):
    if not _ping_pong(cluster):
        return
    a, b = cluster.nodes
    made = {}
    for name, node in (("A", a), ("B", b)):
        before = _created(a) + _created(b)
        reply = _strangers_message(node, "dave", len(made) + 1)
        time.sleep(1.0)
        made[name] = (_created(a) + _created(b) - before, reply and reply.status)
    print("transactions (both nodes) and answer, per entry node:", made)
    # secure: the request is not sent round between the nodes
    assert all(created <= 4 for created, _ in made.values()), made


def test_hole_k1_strangers_through_the_node_ping_pong_exhaust_shared_memory(cluster):
    uas = RawUas()
    try:
        if not _ping_pong(cluster):
            return
        a, b = cluster.nodes
        ok = _register(a, "bob", f"<sip:bob@127.0.0.1:{uas.port}>")
        assert ok is not None and ok.status == 200
        before = _created(a) + _created(b)
        codes, out_of_memory = _burst_then_honest(a, "dave")
        made = _created(a) + _created(b) - before
        on_b = b.log_path.read_text(errors="replace").count("could not allocate shared memory")
    finally:
        uas.close()
    print("bob's MESSAGEs:", codes, "shm allocation failures A/B:", out_of_memory, on_b,
          "transactions:", made)
    assert out_of_memory == 0 and on_b == 0 and codes == {200: HONEST}, (codes, out_of_memory)


def test_control_k1_one_binding_naming_the_other_node_is_two_passes(cluster):
    a, b = cluster.nodes
    refused = _register(a, "erin", f"<sip:erin@127.0.0.1:{a.port}>")
    assert refused is not None and refused.status == 403
    bound = _register(b, "dave", f"<sip:dave@127.0.0.1:{a.port}>")
    assert bound is not None and bound.status == 200
    wait_until(lambda: contacts(a, "dave"), REPLICATION, "dave's binding on A")
    before = _created(a) + _created(b)
    _strangers_message(b, "dave", 9)
    time.sleep(1.0)
    assert _created(a) + _created(b) - before <= 2
