"""Review 123 (attacker's review of 487265c), cluster: who tells a follower that a
certificate changed, on two real Kamailio 5.6 nodes sharing the service's tables on
PostgreSQL (stop 40's fix of review 122 HB2).  The phone's half (its answer to such a
NOTIFY, with the real ``CertServiceClient``) is ``tests/unit/test_review123_notify_source.py``.

**Honest break HB4: a certificate's change (replacement, withdrawal) is told from the
node's DMQ socket; the phone answers 481 and the service forgets the follow.**  No
attacker (bob replacing his certificate, as after a lost phone).

- Set-up: nodes A and B (``e2m_lab.cluster``'s settings: DMQ on a socket of its own at
  the node's address, as ``kamailio_app/examples/cluster-node-a.toml`` has it,
  ``192.0.2.11:5090`` beside SIP's ``:5060``), ``[auth]``, ``[certs] notify_interval =
  1`` (a change told within a second, not a minute).  bob publishes at A.  Six followers
  at A on UDP (raw, answering NOTIFYs as an e2m-phone does: 200 from its proxy's address
  and port, 481 from anywhere else, ``CertServiceClient._notify``).
- Messages: six follows (``Expires: 3600``) at A, then bob's new certificate published
  at A.
- Observed on 487265c (four runs): every first NOTIFY came from A's SIP port (200);
  **every change NOTIFY came from a DMQ port**, A's or B's (3/3, 3/3, 4/2 and 2/4 in
  the four runs: both nodes' timers claim from the shared table), each answered 481, and
  **bob's subscriptions in the shared table went 6 -> 0**.  The followers, to whom each
  e2m-phone's state says "following bob", are told nothing more until their own
  renewal (80 % of 24 h): a withdrawal of a stolen key (the reason follows exist,
  review 107) never reaches them.  On 0aa8f85 (before stop 40; this file in an extracted
  tree): the same from A's DMQ port, all six (the nodes then kept SQLite files, so only
  A's timer sent them).  So the socket fault predates stop 40; the shared table adds
  NOTIFYs from the other node.
- Code at fault: the timer's NOTIFYs go by ``route[E2M_SEND_REQUEST]``
  (``kamailio_app/templates/kamailio.cfg.tmpl:387-389``: ``t_uac_send(..., "", ...)``,
  no socket) from ``CertService._notify`` (``kamailio_app/cert_route.py:311-322``) in
  the rtimer process, where Kamailio picks a socket by destination: with DMQ's listener
  at the same address, that one.  The first NOTIFY is sent from the SUBSCRIBE's own
  route and leaves from its socket.  Then any node's timer may claim a due NOTIFY
  (``SubscriptionTable.claim_due``, ``kamailio_app/cert_table.py:490-513``), and the
  phone takes NOTIFYs only from its one proxy (``pjsua_hooks/phone.py:1345-1354``:
  ``ProxySource.of_uris(proxies[:1])``, the port compared over UDP).
- Suggested fix: keep the local socket a subscription was made on (its dialog's
  Contact already names it) and pass it as ``t_uac_send``'s socket; in a cluster, let a
  node claim only subscriptions made at its own sockets (a ``node`` column, or the
  socket in the claim's WHERE), or have the phone take NOTIFYs from every node it lists
  in ``[phone] home_sources``; and never let a 481 to a NOTIFY from a socket the
  dialog was not made on end the subscription.

Control (unmarked, pass): ``test_control_hb4_the_first_notify_of_each_follow_comes_from_the_node``:
the six follows' first NOTIFYs came from A's SIP port and were answered 200, and the
table held six rows (the followers' rule and the set-up work).

Left open (stop 41), HB4: a cluster node's timer still sends certificate-change NOTIFYs
from its DMQ socket, and either node may send one; a phone takes NOTIFYs only from its
proxy's address and port, answers 481 and the service forgets the follow.  The fix
(send from the SIP socket the subscription came in on, and only from the node that
holds it, or tell the phone every node's address) touches the timer's send and the
shared table; the strict xfail stays.  Single nodes are not affected.

Fixed (stop 42), HB4: ``CertService`` maps our Contact at each listener to that socket
and sets ``$var(e2m_socket)`` (``t_uac_send``'s socket, ``route[E2M_SEND_REQUEST]``)
from the subscription's Contact; ``claim_due`` and ``claim_lapsed`` take only rows made
at one of the node's own Contacts (a lapsed row is anyone's after ``ORPHAN_GRACE``).
On the code before, the change NOTIFYs came from both DMQ ports (6 of 6 answered 481,
rows 6 -> 0); with the fix all six from A's SIP port, answered 200, rows 6 -> 6.  Unit
half: ``tests/unit/test_notify_socket.py``.
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.certclient import CertClient
from concurrent.futures import ThreadPoolExecutor

from e2m_lab.cluster import Cluster, _node_settings, wait_dmq_up
from e2m_lab.ports import free_port
from e2m_plugins.sip import make_response, parse
from tests.kamailio.test_review89_wire import BOB, USERS, bob_der

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio]

FOLLOWERS = 6


@pytest.fixture(scope="module")
def pair(module_proxy_factory, module_pg_url, pki):
    """Nodes A and B on one PostgreSQL (``e2m_lab.cluster.start_cluster``'s settings,
    ``[auth]`` for bob's PUBLISH), ``[certs] notify_interval = 1`` so a change is told
    within a second rather than a minute."""
    first = free_port()
    dmq = (first, free_port(avoid={first}))
    settings = [_node_settings(module_pg_url, dmq[0], dmq[1], None),
                _node_settings(module_pg_url, dmq[1], dmq[0], None)]
    for one in settings:
        one["extra"]["certs"] = {"notify_interval": 1}
        one["auth"] = True
    with ThreadPoolExecutor(max_workers=2) as pool:
        started_a = pool.submit(module_proxy_factory, "node-a", users=USERS, **settings[0])
        started_b = pool.submit(module_proxy_factory, "node-b", **settings[1])
        a, b = started_a.result(), started_b.result()
    wait_dmq_up((a, b))
    a.dmq_port, b.dmq_port = dmq
    return Cluster(a, b)


class _Follower:
    """A follower of bob's certificate at one node, on UDP, answering NOTIFYs as an
    e2m-phone does (``CertServiceClient._notify``): 200 from its proxy's address and
    port, 481 from anywhere else.  Every NOTIFY's source is kept."""

    def __init__(self, address: str, proxy_port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.address, self.port, self.proxy_port = address, self.sock.getsockname()[1], proxy_port
        self.seen: list[tuple[int, int]] = []     # (source port, the answer we gave)
        self.finals: list[int] = []               # final answers to our SUBSCRIBEs

    def follow(self, n: int) -> int | None:
        call_id = f"r123n-{n}-{self.port}"
        request = "\r\n".join([
            f"SUBSCRIBE {BOB} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.address}:{self.port};rport;branch=z9hG4bKr123n{n}x{self.port}",
            f"From: <sip:alice@example.com>;tag=t{n}", f"To: <{BOB}>", f"Call-ID: {call_id}",
            "CSeq: 1 SUBSCRIBE", "Max-Forwards: 70", "Event: certificate",
            "Accept: application/pkix-cert", "Expires: 3600",
            f"Contact: <sip:alice@{self.address}:{self.port}>", "Content-Length: 0", "", ""])
        self.sock.sendto(request.encode(), ("127.0.0.1", self.proxy_port))
        status = None
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not (status and self.seen):
            self.listen(0.2)
            if self.finals:
                status = self.finals.pop()
        return status

    def listen(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.02, deadline - time.monotonic()))
            try:
                data, source = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                return
            message = parse(data)
            if message.is_request and message.method == "NOTIFY":
                ours = source == ("127.0.0.1", self.proxy_port)
                code = 200 if ours else 481
                self.sock.sendto(make_response(message, code, "OK" if ours else
                                               "Subscription Does Not Exist").serialize(), source)
                self.seen.append((source[1], code))
            elif not message.is_request and (message.status or 0) >= 200:
                self.finals.append(message.status)

    def close(self):
        self.sock.close()


def _rows(url):
    from kamailio_app.cert_table_pg import PostgresCertDatabase
    from kamailio_app.pgconn import PgUrl
    db = PostgresCertDatabase(PgUrl.parse(url))
    try:
        with db.read() as cursor:
            return cursor.execute("SELECT count(*) FROM cert_subscriptions WHERE aor = %s",
                                  (BOB,)).fetchone()[0]
    finally:
        db.close()


def _publish(port, der):
    bob = CertClient(port, "bob", password=USERS["bob"], source="127.0.123.90")
    try:
        answer = bob.publish(der)
        return None if answer is None else answer.status
    finally:
        bob.close()


def _changed(pair, pki, module_pg_url):
    """Six followers of bob at node A (each NOTIFY answered as a phone does), then bob's
    certificate replaced by a PUBLISH at A; (first NOTIFYs' sources, the change NOTIFYs'
    sources with our answers, bob's rows before and after)."""
    a, b = pair.a, pair.b
    assert _publish(a.port, bob_der(pki)) == 200
    followers = [_Follower(f"127.0.123.{100 + i}", a.port) for i in range(FOLLOWERS)]
    try:
        codes = [f.follow(i) for i, f in enumerate(followers)]
        assert codes == [200] * FOLLOWERS, codes
        before = _rows(module_pg_url)
        assert _publish(a.port, bob_der(pki)) == 200       # bob's certificate replaced
        for _ in range(40):                                 # ~12 s for the timers
            for f in followers:
                f.listen(0.05)
        after = _rows(module_pg_url)
        first = [f.seen[0] for f in followers]
        changes = [s for f in followers for s in f.seen[1:]]
    finally:
        for f in followers:
            f.close()
    print(f"\nnode A SIP {a.port}, DMQ {a.dmq_port}; node B SIP {b.port}, DMQ {b.dmq_port}; "
          f"first NOTIFYs {first}; change NOTIFYs (source port, answer) {changes}; "
          f"bob's subscriptions {before} -> {after}")
    return first, changes, before, after


@pytest.fixture(scope="module")
def changed(pair, pki, module_pg_url):
    return _changed(pair, pki, module_pg_url), pair


def test_hole_hb4_a_change_is_told_from_the_port_the_follow_was_made_at(changed):
    (first, changes, before, after), pair = changed
    assert changes, "no change NOTIFY came"
    assert {port for port, _ in changes} == {pair.a.port}, changes
    assert after == before


def test_control_hb4_the_first_notify_of_each_follow_comes_from_the_node(changed):
    (first, changes, before, after), pair = changed
    assert first == [(pair.a.port, 200)] * FOLLOWERS and before == FOLLOWERS
