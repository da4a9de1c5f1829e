"""Review 109 (an attacker's review of e180fd3): hole K2, review 107's self-relay loop
through a cluster node's DMQ socket, which stop 38's send check does not cover.  Two
real Kamailio 5.6.3 nodes on DMQ and PostgreSQL (``e2m_lab.cluster.start_cluster``: A
and B on 127.0.0.1, each with its own UDP DMQ socket, registrar open as in that
fixture), review 107's stranger MESSAGE and burst.

Hole K2 (``test_hole_k2_a_binding_naming_a_nodes_dmq_socket_loops_seventy_times``,
``test_hole_k2_strangers_through_the_dmq_loop_exhaust_shared_memory``):

- Attacker: an insider UA (alice, for her own AoR; with [auth] her password) - or,
  with the registrar open, any off-path sender - sets the trap once; then any off-path
  sender springs it (requests to our users are never challenged).
- Set-up: alice REGISTERs at node B ``Contact: <sip:alice@127.0.0.1:<A's DMQ port>>``.
  B's ``_contact_naming_us`` asks B's ``is_myself``: A's DMQ socket is not B's, so 200;
  dmq_usrloc replicates the binding to A.  (In exploration, also seen: at A itself
  ``<sip:dave@127.1:<A's DMQ port>>``, a spelling ``is_myself`` does not read as ours,
  is bound 200 and loops the same way.)
- Messages: a stranger's plain ``MESSAGE sip:alice@example.com`` to A (or to B).
- Effect (seen): A looks alice up and relays to its own DMQ socket: ``onsend_route``
  lets it go, because ``OWN_SIP_PORTS_TEST`` lists only ``[kamailio] listen`` ports
  (the DMQ socket is a ``listen=`` line of its own, ``launcher._listen_lines``).  The
  DMQ socket takes any method (only KDMQ goes to ``route_dmq``; a MESSAGE goes to
  ``route_request``), from A's own address (``exempt_source``: pike never counts it):
  70 transactions for one datagram entered at A, 70 entered at B (69 at A + 1 at B),
  the stranger answered 408.  Burst (review 107's: 150 MESSAGEs from 20 addresses, under
  pike's rate, then 30 MESSAGEs to bob one by one): 2,863 transactions on A,
  "could not allocate shared memory" logged 775 times (331 in the test run), 20 of 30
  (19 of 30) of bob's MESSAGEs answered 500; about 1.9 s of Kamailio CPU for the burst
  (measured once from /proc, not asserted).
- At fault: ``kamailio_app/launcher.py:117-118`` (``OWN_SIP_PORTS_TEST`` from
  ``config.kamailio.listen`` only) with ``kamailio_app/templates/kamailio.cfg.tmpl:349``;
  and ``kamailio_app/kemi.py:739-744`` (``ksr_request_route``: a request that is not
  KDMQ arriving on the DMQ socket is routed as any other).
- Fix: put the DMQ port in the send check (every ``listen=`` line the cfg gets, or
  ``to_ip==myself && to_port`` of any socket: ``is_myself("sip:$sndto(ip):$sndto(port)")``);
  refuse at the DMQ socket anything but KDMQ (``$Rp`` is the DMQ port: 403/drop before
  ``route_request``); and at REGISTER, refuse a Contact naming any node's socket
  ([cluster] peers and dmq addresses), not only this node's.

Control (passes unmarked):
``test_control_k2_the_node_refuses_its_own_dmq_socket_and_a_real_contact_is_one_pass``:
A answers 403 "Contact Names This Proxy" to a Contact naming its own DMQ socket; a
binding registered at B naming A's SIP socket makes at most 2 transactions (stop 38's
send check on A's SIP port is live); a stranger's MESSAGE to bob's real contact is one
transaction and 200.

Tried and held: see ``tests/unit/test_review109.py``.

Fixed (stop 38): a request other than KDMQ that comes in on the DMQ socket is dropped
unrouted (``kamailio.on_dmq_socket``), and a REGISTER whose Contact names any node's DMQ
socket is 403 (``kemi._dmq_places``).  Since B now refuses alice's REGISTER, the hole
tests put her binding in usrloc with ``ul.add`` (one that got there another way), so
they test the send side on its own.  Both failed on the code before (checked) and pass.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from e2m_lab.cluster import contacts, dmq_port, start_cluster, wait_until, REPLICATION
from e2m_lab.kamailio_harness import RawUas, SipUa, build_request, udp_transaction
from e2m_plugins import sip

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

from tests.kamailio.test_review107_wire import _strangers_message as burst_message  # noqa: E402

BURST = 150          # strangers' MESSAGEs to alice, from 20 addresses (review 107's burst)
HONEST = 30          # MESSAGEs to bob sent while the burst is worked off


def _created(node) -> int:
    found = re.search(r"created:\s*(\d+)", node.rpc("tm.stats"))
    assert found
    return int(found.group(1))


def _register(node, user: str, contact: str):
    ua = SipUa(node.port, user=user, source="127.0.0.60")
    try:
        reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        return ua.request(reg.replace("Contact", contact))
    finally:
        ua.close()


def _strangers_message(node, to_user: str, n: int = 1):
    msg = sip.parse(build_request("MESSAGE", f"sip:{to_user}@example.com", to_user=to_user,
                                  body=b"hi", content_type="text/plain"))
    msg = msg.replace("From", f"<sip:someone{n}@elsewhere.example.net>;tag=x{n}")
    return udp_transaction(node.port, msg, source="127.0.0.61", timeout=10)


@pytest.fixture
def cluster(proxy_factory, pg_url):
    return start_cluster(proxy_factory, pg_url)


def _burst_then_honest(node, target: str) -> tuple[dict, int]:
    """review 107's burst at ``node``: BURST strangers' MESSAGEs to ``target`` from 20
    loopback addresses, then HONEST MESSAGEs to bob one by one; bob's answers by code,
    and the shm allocation failures the node logged."""
    socks = []
    try:
        for n in range(BURST):
            source = f"127.0.2.{n % 20 + 2}"
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((source, 0))
            s.sendto(burst_message(target, n, source, s.getsockname()[1]),
                     ("127.0.0.1", node.port))
            socks.append(s)
        codes: dict = {}
        for j in range(HONEST):
            msg = sip.parse(build_request("MESSAGE", "sip:bob@example.com", to_user="bob",
                                          body=b"hello bob", content_type="text/plain"))
            msg = msg.replace("From", f"<sip:h{j}@elsewhere.example.net>;tag=h{j}")
            answer = udp_transaction(node.port, msg, source="127.0.3.9", timeout=2)
            code = answer.status if answer is not None else None
            codes[code] = codes.get(code, 0) + 1
            time.sleep(0.1)
    finally:
        for s in socks:
            s.close()
    return codes, node.log_path.read_text(errors="replace").count(
        "could not allocate shared memory")


def _bind_alice_to_as_dmq_socket_at_b(cluster):
    """alice's binding naming A's DMQ socket, on both nodes: by her REGISTER at B when
    B takes it; since stop 38 B refuses it (403), so the binding is put in usrloc as
    one that got there another way would be (``ul.add`` on each node: an old binding,
    a node of an older version), and the send side must hold on its own."""
    a, b = cluster.nodes
    contact = f"sip:alice@127.0.0.1:{dmq_port(a)}"
    answer = _register(b, "alice", f"<{contact}>")
    assert answer is not None and answer.status in (200, 403), answer and answer.status
    if answer.status == 403:
        assert answer.reason == "Contact Names This Proxy"
        for node in (a, b):
            node.rpc("ul.add", "location", "alice", contact, "600", "1.0", "s:0", "0", "0",
                     "4294967295")
    wait_until(lambda: contacts(a, "alice"), REPLICATION, "alice's binding on A")
    return a, b


def test_hole_k2_a_binding_naming_a_nodes_dmq_socket_loops_seventy_times(cluster):
    a, b = _bind_alice_to_as_dmq_socket_at_b(cluster)
    made = {}
    for name, node in (("A", a), ("B", b)):
        before = _created(a) + _created(b)
        reply = _strangers_message(node, "alice", len(made) + 1)
        time.sleep(1.0)
        made[name] = (_created(a) + _created(b) - before, reply and reply.status)
    print("transactions (both nodes) and answer, per entry node:", made)
    # secure: the request is not relayed back to the node (its own transaction, at most
    # one more pass at the other node)
    assert all(created <= 2 for created, _ in made.values()), made


def test_hole_k2_strangers_through_the_dmq_loop_exhaust_shared_memory(cluster):
    uas = RawUas()
    try:
        a, _ = _bind_alice_to_as_dmq_socket_at_b(cluster)
        ok = _register(a, "bob", f"<sip:bob@127.0.0.1:{uas.port}>")
        assert ok is not None and ok.status == 200
        codes, out_of_memory = _burst_then_honest(a, "alice")
    finally:
        uas.close()
    print("bob's MESSAGEs:", codes, "shm allocation failures:", out_of_memory)
    assert out_of_memory == 0 and codes == {200: HONEST}, (codes, out_of_memory)


def test_control_k2_the_node_refuses_its_own_dmq_socket_and_a_real_contact_is_one_pass(
        cluster):
    """The set-up is live: node A itself refuses a Contact naming its DMQ socket (403,
    ``_contact_naming_us``), a contact naming A's SIP socket registered at B makes no
    loop (A's ``onsend_route``), and a stranger's MESSAGE to bob's real contact is one
    transaction and 200."""
    uas = RawUas()
    try:
        a, b = cluster.nodes
        refused = _register(a, "carol", f"<sip:carol@127.0.0.1:{dmq_port(a)}>")
        assert refused is not None and refused.status == 403
        assert refused.reason == "Contact Names This Proxy"
        bound = _register(b, "dave", f"<sip:dave@127.0.0.1:{a.port}>")
        assert bound is not None and bound.status == 200
        wait_until(lambda: contacts(a, "dave"), REPLICATION, "dave's binding on A")
        before = _created(a) + _created(b)
        _strangers_message(a, "dave", 7)
        time.sleep(1.0)
        assert _created(a) + _created(b) - before <= 2
        ok = _register(a, "bob", f"<sip:bob@127.0.0.1:{uas.port}>")
        assert ok is not None and ok.status == 200
        before = _created(a)
        reply = _strangers_message(a, "bob", 8)
        assert reply is not None and reply.status == 200
        assert _created(a) - before == 1
    finally:
        uas.close()
