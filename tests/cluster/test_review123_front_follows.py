"""Review 123 (attacker's review of 487265c), cluster: the certificate service's
per-source bound at nodes behind a dispatcher front, with stop 40's exemption of our own
addresses (``kemi.exempt_source``: ``is_myself_srcip``, which takes the front's address,
a core alias of every node, for the node's own).  Tried and held (run); no strict xfail.

- Set-up: two real Kamailio 5.6 nodes on DMQ and PostgreSQL with ``[cluster] front``
  naming a front at its own address, 127.0.0.123 (the nodes listen on 127.0.0.1, so
  only the alias makes it "ours"), and the product's dispatcher front there.
- Attack: one stranger's address sends 30 follows of bob (each its own dialog) through
  the front.  Observed: **30 of 30 kept** (``max_subscriptions_per_source`` is 20; the
  node counts the front's address and exempts it, as review 71 saw for REGISTER),
  spread over both nodes (the front dispatches by Call-ID), all with source
  127.0.0.123.  But the node sends each NOTIFY to where the SUBSCRIBE came from, the
  front, which dispatches it to a node, and none reaches the subscriber (0 NOTIFYs):
  no follow is ever confirmed, and the service's probation (RFC 6665 4.2.2) drops
  every one: 29 rows on probation right after, **0 eight seconds later** ("N
  subscription(s) dropped: their NOTIFY was never answered").  At a full bound an
  unconfirmed row older than 1 s also makes room for an honest follower.  So the
  missing bound holds nothing: held.  (The README says phones behind a front take
  peers' certificates from ``[peers]`` or signed messages: following through a front
  does not work for anyone.)
- Control (unmarked): ``test_control_k1_one_address_straight_to_a_node_gets_its_places``:
  30 follows from one address straight to node A: 20 kept, 10 refused 403, 20 NOTIFYs.
- Observation, not a hole: review 122's HB1 test (``test_review122_visited_follows_wire``)
  passes on 487265c because its visited proxy sends from 127.0.0.1, the home's own
  address (``is_myself_srcip``), not because of ``[limits] trusted``; a visited proxy
  elsewhere must be listed there, as ``docs/threat-model.md`` says.
"""

from __future__ import annotations

import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2m_lab.certclient import CertClient
from e2m_lab.cluster import VIEW, wait_dmq_up
from e2m_lab import proxy_process
from e2m_lab.ports import free_port
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import make_request, parse

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

FRONT_IP = "127.0.0.123"     # the front's own address: the nodes (on 127.0.0.1) alias it
PER_SOURCE = 20              # [certs] max_subscriptions_per_source, the product's default
FOLLOWS = 30
BOB = "sip:bob@example.com"


@pytest.fixture(scope="module")
def nodes(module_proxy_factory, module_pg_url):
    """(front, node A): two nodes on DMQ and PostgreSQL behind a dispatcher front at its
    own address, as deployed (``[cluster] front``)."""
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
    with pytest.MonkeyPatch.context() as patch:     # the harness probes 127.0.0.1
        patch.setattr(proxy_process, "answers_options", _answers_at_front)
        front = module_proxy_factory(
            "front", e2m=False, archive=False, port=front_port,
            extra={"kamailio": {"listen": [f"udp:{FRONT_IP}:{front_port}"]},
                   "dispatcher": {"destinations": [a.uri, b.uri], "probe_interval": 600}})
    return front, a, b


def _answers_at_front(port, timeout=0.3):
    """``proxy_process.answers_options`` for a proxy listening on FRONT_IP only."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.connect((FRONT_IP, port))
        sock.settimeout(timeout)
        request = make_request("OPTIONS", f"sip:{FRONT_IP}:{port}", from_uri="sip:probe@localhost",
                               to_uri=f"sip:{FRONT_IP}:{port}")
        via = (f"SIP/2.0/UDP 127.0.0.1:{sock.getsockname()[1]};rport;"
               f"branch=z9hG4bK-probe{secrets.token_hex(6)}")
        sock.send(request.replace("Via", via).serialize())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = parse(sock.recv(65535))
            if (response.status or 0) >= 200:
                return response.status == 200
        return False
    except (OSError, E2MError):
        return False
    finally:
        sock.close()


class _To:
    """A UDP socket whose datagrams go to ``host`` (the harness's UA sends to 127.0.0.1)."""

    def __init__(self, sock, host):
        self._sock, self._host = sock, host

    def sendto(self, data, address):
        return self._sock.sendto(data, (self._host, address[1]))

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _follows(port, source, count=FOLLOWS, host="127.0.0.1"):
    """``count`` follows of bob (each its own dialog, every NOTIFY answered 200) from one
    address; the final answers' codes."""
    client = CertClient(port, "mallory", source=source)
    if host != "127.0.0.1":
        client.ua.sock = _To(client.ua.sock, host)
    try:
        codes = []
        for _ in range(count):
            answer, _ = client.subscribe(BOB, 3600)
            codes.append(answer.status if answer is not None else None)
            time.sleep(0.12)             # under pike's 30 requests per 2 s with the answers
        client.quiet(0.5)
        return codes, len(client.notifies)
    finally:
        client.close()


def test_control_k1_one_address_straight_to_a_node_gets_its_places(nodes):
    _, a, _ = nodes
    codes, notifies = _follows(a.port, "127.0.123.72")
    print(f"\nstraight to node A: {codes.count(200)} of {len(codes)} kept, NOTIFYs {notifies}")
    assert codes.count(200) == PER_SOURCE and codes[PER_SOURCE:] == [403] * (FOLLOWS - PER_SOURCE)


def _rows(url, source=None):
    """(rows for bob, of them on probation) in the cluster's table; ``source``: that one."""
    from kamailio_app.cert_table_pg import PostgresCertDatabase
    from kamailio_app.pgconn import PgUrl
    db = PostgresCertDatabase(PgUrl.parse(url))
    try:
        with db.read() as cursor:
            rows = cursor.execute("SELECT source, pending FROM cert_subscriptions "
                                  "WHERE aor = %s", (BOB,)).fetchall()
    finally:
        db.close()
    rows = [r for r in rows if source is None or r[0] == source]
    return len(rows), sum(1 for r in rows if r[1] & 2), sorted({r[0] for r in rows})


def test_held_follows_through_the_front_pass_the_bound_but_are_dropped_on_probation(
        nodes, module_pg_url):
    """One address through the front: every follow kept (the front's address is one of
    the nodes' own, so no per-source bound), but their NOTIFYs go to the front, which
    hands them to a node, and never reach the subscriber: each is dropped on probation
    (RFC 6665 4.2.2, 4 s after its first NOTIFY), so nothing is held."""
    front, a, b = nodes
    codes, notifies = _follows(front.port, "127.0.123.73", host=FRONT_IP)
    held = [_rows(module_pg_url, FRONT_IP)]
    time.sleep(8)
    held.append(_rows(module_pg_url, FRONT_IP))
    print(f"\nthrough the front: {codes.count(200)} of {len(codes)} kept, NOTIFYs {notifies}, "
          f"bob's rows (all, on probation, sources) then {held[0]}, 8 s later {held[1]}")
    assert codes.count(200) == FOLLOWS and notifies == 0
    assert held[1][0] == 0
