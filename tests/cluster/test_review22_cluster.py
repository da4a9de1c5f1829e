"""A twenty-second attacker's review (December 2026) of 64d5e2b: the cluster behind a
dispatcher front ([cluster] front), on real Kamailio nodes with DMQ and PostgreSQL.

A node behind a front names the front in its Record-Route and takes it as its own
(``launcher._cluster_aliases``: ``alias=<front>``), so that a Route naming the front is
"myself".  Kamailio's ``is_myself_srcip`` is ``check_self(<source ip>, 0, 0)``, which
looks through the aliases too, with any port: every request the front relays comes from
an address the node now calls its own.  ``kemi.exempt_source`` asks exactly that, so
behind a front every stranger is "the proxy itself": ``may_route_onward`` (the fix of
review 3 against the open relay of a preloaded Route) lets anyone's initial request
follow a Route past the node, and pike never counts anything at the nodes.

Here the front listens on 127.0.0.2 (a request that reached it there leaves from there)
and the nodes on 127.0.0.1, so only the alias can make the front "myself"; a stranger
sends from 127.0.0.51.  ``test_hole_*`` failed on 64d5e2b (the review's strict xfail)
and passes since ``may_route_onward`` trusts no source address, only a user's digest
(``tests/kamailio/test_review22_wire.py`` shows the same hole through a peer in
``[limits] trusted`` and from the proxy's own address); ``test_control_*`` are the same
request sent to a node straight, which the fix of review 3 refuses, and through the same
front to nodes that do not alias it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from e2m_lab.cluster import ADVERTISE, VIEW, wait_dmq_up
from e2m_lab.kamailio_harness import ProxyHandle, SipUa, wait_delivered
from e2m_lab.ports import free_port
from e2m_plugins.sip import SipMessage
from tests.kamailio.test_review22_wire import (  # noqa: F401 - elsewhere is a fixture
    assert_refused_not_relayed, elsewhere, preloaded_message)

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
FRONT_IP = "127.0.0.2"       # the front's own address: none of the nodes listens there


class _UaVia(SipUa):
    """A ``SipUa`` that sends to ``host`` (the front's address) instead of 127.0.0.1."""

    def __init__(self, host: str, port: int, **kwargs) -> None:
        self.host = host
        super().__init__(port, **kwargs)

    def send(self, message: SipMessage | bytes) -> None:
        data = message.serialize() if isinstance(message, SipMessage) else message
        if isinstance(message, SipMessage):
            self.sent.append(message)
        self.sock.sendto(data, (self.host, self.port))


def _behind_a_front(proxy_factory, pg_url: str, *, aliased: bool = True
                    ) -> tuple[ProxyHandle, ProxyHandle, ProxyHandle]:
    """Nodes A and B with [auth] (a stranger's request to our domain is never
    challenged; one of our users' always is), DMQ, and ``[cluster] front`` naming the
    front on ``FRONT_IP`` (``aliased``; else they advertise the floating ``ADVERTISE``
    and know nothing of the front); the front itself, listening there (and on 127.0.0.1
    for the harness's probes)."""
    front_port = free_port()
    dmq_a = free_port(avoid={front_port})
    dmq_b = free_port(avoid={front_port, dmq_a})
    def node(name: str, own: int, peer: int):
        return proxy_factory(
            name, db_url=pg_url, view=VIEW, auth=True,
            users=USERS if name == "node-a" else None,
            extra={"cluster": {"dmq_address": f"sip:127.0.0.1:{own}",
                               "peers": [f"sip:127.0.0.1:{peer}"],
                               **({"front": f"{FRONT_IP}:{front_port}"} if aliased
                                  else {"advertise": ADVERTISE})}})
    with ThreadPoolExecutor(max_workers=2) as pool:    # together: no sync gate wait
        started = [pool.submit(node, "node-a", dmq_a, dmq_b),
                   pool.submit(node, "node-b", dmq_b, dmq_a)]
        nodes = [one.result() for one in started]
    a, b = nodes
    wait_dmq_up(nodes)
    front = proxy_factory(
        "front", e2m=False, archive=False, port=front_port,
        extra={"kamailio": {"listen": [f"udp:{FRONT_IP}:{front_port}",
                                       f"tcp:{FRONT_IP}:{front_port}",
                                       f"udp:127.0.0.1:{front_port}",
                                       f"tcp:127.0.0.1:{front_port}"]},
               "dispatcher": {"destinations": [a.uri, b.uri], "probe_interval": 600}})
    return front, a, b


def test_control_a_strangers_preloaded_route_straight_to_a_node_is_refused(
        proxy_factory, pg_url, elsewhere):
    """Tried and held (review 3's fix): the same stranger's MESSAGE sent to node A itself
    with ``Route: <node A;lr>, <elsewhere;lr>`` is 403 Route Not Allowed and goes
    nowhere."""
    _front, a, _b = _behind_a_front(proxy_factory, pg_url)
    ua = SipUa(a.port, user="dave", domain="other.example.net", source="127.0.0.51")
    try:
        assert_refused_not_relayed(ua, f"<sip:127.0.0.1:{a.port};lr>", elsewhere,
                                   b"review22: straight to the node")
    finally:
        ua.close()


def test_control_through_a_front_the_nodes_do_not_alias_a_preloaded_route_is_refused(
        proxy_factory, pg_url, elsewhere):
    """The cause, not the front: the same request through the same front (on
    ``FRONT_IP``) to nodes that advertise a floating address instead of naming the front
    (no ``alias`` for it) is 403 Route Not Allowed: its source is nobody's own."""
    front, _a, _b = _behind_a_front(proxy_factory, pg_url, aliased=False)
    ua = _UaVia(FRONT_IP, front.port, user="dave", domain="other.example.net",
                source="127.0.0.51", timeout=4)
    try:
        assert_refused_not_relayed(ua, f"<sip:{FRONT_IP}:{front.port};lr>", elsewhere,
                                   b"review22: through a front the nodes do not alias")
    finally:
        ua.close()


def test_hole_a_stranger_through_the_front_is_relayed_anywhere(proxy_factory, pg_url,
                                                                elsewhere):
    """Off-path sender (no account, no spoofing).  A node behind a front has
    ``alias=<front>`` so that the front's Record-Route is its own; Kamailio's
    ``is_myself_srcip`` (``check_self(src_ip, 0, 0)``) matches aliases on any port, so the
    front's address is "myself" to every node, and every request the front relays passes
    ``kemi.exempt_source``.  dave sends the front a MESSAGE to bob@example.com (ours:
    never challenged) with ``Route: <sip:front;lr>, <sip:anywhere;lr>``.  The front hands
    it to a node with the Route set untouched; the node's ``loose_route`` takes the front
    entry as its own and sets the destination to the next; ``may_route_onward`` asks
    ``exempt_source``, which says yes: the node relays it to any address.  The open
    relay of review 3 is back for the whole domain behind a front (an INVITE so relayed
    is also record-routed, which mints the route token for the in-dialog relay), and
    pike never limits anything at the nodes.

    The review's suggested fix: the front's alias must not make its *source address* trusted.  ``exempt_source``
    should compare ``$si`` with the node's own listening sockets only (``KSR.is_myself``
    of ``sip:<si>:<sp>`` with the port, or the proxy's ``listen`` addresses parsed once),
    not ``is_myself_srcip``; a front that must be exempt from pike goes in ``[limits]
    trusted`` explicitly, and ``may_route_onward`` should not take a trusted *relay* (the
    front) for the request's author: behind a front, honour a preloaded Route only for a
    digest-authenticated user (or drop the exemption there altogether)."""
    front, _a, _b = _behind_a_front(proxy_factory, pg_url)
    ua = _UaVia(FRONT_IP, front.port, user="dave", domain="other.example.net",
                source="127.0.0.51", timeout=4)
    try:
        text = b"review22: through the front"
        answer = ua.transact(preloaded_message(ua, f"<sip:{FRONT_IP}:{front.port};lr>",
                                               elsewhere, text))
        relayed = wait_delivered(elsewhere, text, timeout=1.0)
        if relayed:     # the front relayed it from its own address, not the nodes' one
            got = next(m for m in elsewhere.received if m.body == text)
            assert any(f"{FRONT_IP}:{front.port}" in via for via in got.get_all("Via")), \
                got.get_all("Via")
        assert not relayed, (f"relayed past the node to a stranger's address "
                             f"(answer {answer.status if answer else None})")
    finally:
        ua.close()
