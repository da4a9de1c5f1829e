"""Review 119 (attacker's review of bc215c1), cluster: honest break HB1 at a cluster's
node behind its front, where it takes one lost period, not two.  Two real Kamailio 5.6
nodes on DMQ and PostgreSQL with ``[cluster] front`` naming the front (as a deployment
behind a front has it: the nodes record-route and alias the front's address), and a real
dispatcher front (``[dispatcher]``, both nodes).  bob is ``e2m_lab.cluster.Bob`` (a raw
UAS, 200 to a MESSAGE), registered through the front.  The retransmission helper and the
single-proxy account are in ``tests/kamailio/test_review119_loop_wire.py``.

**Honest break HB1 (cluster): a caller's UDP retransmission that reaches the node after
the front's transaction ended is 482 "Loop Detected".**  No attacker: a caller whose
replies were lost for a few seconds (a NAT or radio outage).

- Messages: ``MESSAGE sip:bob@example.com`` to the front, then the same datagram again on
  RFC 3261's Timer E schedule at 0.5, 1.5, 3.5 and 7.5 s (the caller saw no answer).
- Observed on bc215c1 (two runs): 200 to the copies up to 3.5 s (absorbed by the front's
  transaction); **482 Loop Detected to the copy at 7.5 s**, from node A ("e2m: MESSAGE
  from 127.0.0.1 came back to us unchanged (a loop): refused"); tm ``created``: front 2,
  node A 1, node B 0.  bob got the MESSAGE once; the caller, once its path is back, is
  told "Loop Detected" for a MESSAGE bob got, after one lost period of ~7 s (Timer F
  allows 32 s).
- Why: the front's transaction ended ~5 s after the 200, so the copy at 7.5 s is a new
  transaction at the front, relayed to the same node (dispatcher by Call-ID) under the
  front's Via.  At the node the key (``_relay_key``) is noted from the first copy, and
  ``_came_back`` (``kamailio_app/kemi.py:711``) asks ``_carries_our_via`` (``:740-760``),
  which takes the front's Via for the node's own: the front's address is a core alias of
  every node (``kamailio_app/launcher.py:165-168``, ``_cluster_aliases``; ``_names_us``
  asks ``is_myself``, ``kemi.py:334-340``).  So at a node behind a front, every request
  that comes a second time within 32 s "carries a Via of ours".  Sent straight to a node
  (control below) the same copy at 7.5 s is relayed: it takes the third coming there.
- Suggested fix: ``_carries_our_via`` should look for a Via this node wrote (its own
  sockets, not the aliases it shares with a front or an advertised address), and, as for
  the single proxy, a coming under the very top Via (sent-by and branch) noted with the
  key is a retransmission, not a pass.

Scope (read): as in the single-proxy module, a body the node's engine checks for replay
is refused at its second coming by the proxy's replay check anyway
(``e2m_plugins/proxy.py:694``, ``retransmissions=False``); the 482 here hits what the
node relays without such a check (a plain MESSAGE, as sent here; any request when E2M is
off).

Controls (unmarked):

- ``test_control_copies_within_the_fronts_transaction_are_absorbed``: the copies up to
  3.5 s all get 200 and no node logs a loop.
- ``test_control_straight_to_a_node_the_second_coming_is_relayed``: the same schedule to
  7.5 s sent to node A directly: all 200, no loop line (the front's Via is the cause).

Fixed (stop 40): the loop note keeps the first coming's Via shape (the count of Via
entries and the bottom one); a copy with that shape, the same Max-Forwards and no Via of
ours below the top one (the front's, on top, has a new branch for each of its
transactions) is the first coming sent again, relayed and not counted
(``kemi._resent``).  The hole test failed on the code before the fix and passes with it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2m_lab.cluster import REPLICATION, VIEW, Bob, contacts, wait_dmq_up, \
    register_bob, wait_until
from e2m_lab.ports import free_port
from tests.kamailio.test_review114_loop_wire import _created, _message
from tests.kamailio.test_review119_loop_wire import LOOP_LOG, retransmit

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

FRONT_IP = "127.0.0.1"       # the front's one address, aliased by the nodes
TO_7_5 = (0, 0.5, 1.5, 3.5, 7.5)


@pytest.fixture(scope="module")
def cluster(module_proxy_factory, module_pg_url, pki):
    """(front, node A, node B, bob): bob registered through the front, on both nodes."""
    front_port = free_port()
    dmq_a = free_port(avoid={front_port})
    dmq_b = free_port(avoid={front_port, dmq_a})

    def node(name, own, peer):
        return module_proxy_factory(
            name, db_url=module_pg_url, view=VIEW,
            extra={"cluster": {"dmq_address": f"sip:127.0.0.1:{own}",
                               "peers": [f"sip:127.0.0.1:{peer}"],
                               "front": f"{FRONT_IP}:{front_port}"}})
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = [pool.submit(node, "node-a", dmq_a, dmq_b),
                   pool.submit(node, "node-b", dmq_b, dmq_a)]
        a, b = [one.result() for one in started]
    wait_dmq_up((a, b))
    front = module_proxy_factory(
        "front", e2m=False, archive=False, port=front_port,
        extra={"kamailio": {"listen": [f"udp:{FRONT_IP}:{front_port}"]},
               "dispatcher": {"destinations": [a.uri, b.uri], "probe_interval": 600}})
    bob = Bob(pki)
    register_bob(front, bob)
    wait_until(lambda: contacts(a, "bob") and contacts(b, "bob"), REPLICATION,
               "bob on both nodes")
    yield front, a, b, bob
    bob.close()


def _run(cluster, to, schedule, n):
    front, a, b, _ = cluster
    target = {"front": front, "a": a}[to]
    marks = [(node, node.log_mark()) for node in (a, b)]
    before = [_created(x) for x in (front, a, b)]
    out = retransmit(target.port, _message("bob", n), schedule, source="127.0.0.63")
    time.sleep(0.3)
    made = [_created(x) - y for x, y in zip((front, a, b), before)]
    logs = "".join(node.log_since(mark) for node, mark in marks)
    print("to", to, "answers", out, "created (front, A, B)", made)
    return [lines[-1] if lines else None for _, lines in out], logs


def test_hole_hb1_a_retransmission_through_the_front_is_not_a_loop(cluster):
    finals, logs = _run(cluster, "front", TO_7_5, 1)
    assert None not in finals, finals
    # secure: the same request again is answered as such (200), not as a loop
    assert finals == ["SIP/2.0 200 OK"] * len(TO_7_5), finals


def test_control_copies_within_the_fronts_transaction_are_absorbed(cluster):
    finals, logs = _run(cluster, "front", TO_7_5[:4], 2)
    assert finals == ["SIP/2.0 200 OK"] * 4, finals
    assert LOOP_LOG not in logs


def test_control_straight_to_a_node_the_second_coming_is_relayed(cluster):
    finals, logs = _run(cluster, "a", TO_7_5, 3)
    assert finals == ["SIP/2.0 200 OK"] * len(TO_7_5), finals
    assert LOOP_LOG not in logs
