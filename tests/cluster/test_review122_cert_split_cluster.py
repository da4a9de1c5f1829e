"""Review 122 (attacker's review of 2161459), cluster: honest break HB2, a cluster's
nodes do not share the certificate service: each keeps its own SQLite file, and a
node that did not take bob's PUBLISH tells his followers he has no certificate.

No attacker.  Set-up: the two-node cluster of ``e2m_lab.cluster.start_cluster`` (real
Kamailio 5.6 nodes A and B, DMQ, one private PostgreSQL made by ``e2m-proxy db init``,
which also makes the service's ``cert_publications``/``cert_subscriptions`` tables
there), ``[auth]`` with the users in PostgreSQL, ``[certs]`` on (the default).  Which
node serves a request is what the dispatcher front (hash over Call-ID), DNS or the
floating address decide; here the clients name the node.

- Messages: bob ``PUBLISH``es his certificate (``Event: certificate``, digest) to node A:
  200.  alice fetches it (``SUBSCRIBE sip:bob@example.com``, ``Expires: 0``) from node A
  and from node B, and follows it (``Expires: 3600``) at node B.
- Observed (two runs): node A's NOTIFY carries bob's certificate (its DER, as
  published); node B's NOTIFYs carry no body, ``Subscription-State: terminated`` for the
  fetch and ``active`` for the follow: "no certificate".  Node B's ``certs.sqlite``
  (beside its PROXY.toml) has 0 publications, node A's 1, and PostgreSQL's
  ``cert_publications`` 0: nothing reads or writes the shared tables.  On a phone an
  empty NOTIFY means "its certificate service has no certificate for it": the send
  fails; one on a follow that had the certificate (a renewal is a new SUBSCRIBE, a new
  Call-ID, so another node behind a front) is "removed", ``UAEngine.drop_peer_certificate``
  (``e2m_plugins/ua.py:630-645``), which marks bob's current certificate withdrawn:
  it is refused from then on, from the service and from bob's own signatures, until
  bob has a newer one issued.
- Code at fault: ``kamailio_app/bootstrap.py:306-310`` builds
  ``CertService(config.certs, ...)`` without a ``db``, so ``CertService.__init__``
  (``kamailio_app/cert_route.py:79``) opens ``CertDatabase(settings.path)``, the
  node's SQLite file, also under ``[cluster] db_url``; ``PostgresCertDatabase``
  (``kamailio_app/cert_table_pg.py``) is only used by ``e2m-proxy db init``
  (``kamailio_app/db_cmd.py:102-113``, "the certificate service's tables, in the shared
  database with [cluster]").  The commit that brought both (ec351b6) says "state in a
  SQLite table (or PostgreSQL under [cluster])"; ``docs/protocol.md`` §11.3 says
  "sharing them between the nodes of a cluster is PostgreSQL's job".
- Suggested fix: under ``[cluster] db_url`` pass ``PostgresCertDatabase(config.cluster.db)``
  to ``CertService`` (the timer's claims are already written for two claimers), and
  a cluster test that a PUBLISH at one node is served at the other.

Second hole test (``test_hole_hb2_a_follow_renewed_at_the_other_node_withdraws_bobs_certificate``):
alice's engine takes the two NOTIFYs the nodes really sent (her follow at A, her renewal
served by B) and then refuses bob's same certificate: observed
``sip:bob@example.com: a certificate its service withdrew``.

Control (unmarked): ``test_control_hb2_the_node_that_took_the_publish_serves_it``: the
fetch at node A brings bob's certificate, byte for byte.

Fixed (stop 40): with ``[cluster]`` the certificate service's tables are its PostgreSQL
(``bootstrap``: ``PostgresCertDatabase(config.cluster.db)``), so every node serves what
any node was given.  Both hole tests failed on the code before the fix and pass with it
(``_publications`` now reads a node's SQLite file only where there is one).
"""

from __future__ import annotations

import sqlite3

import pytest

from e2m_lab.certclient import CertClient
from e2m_lab.cluster import start_cluster
from e2m_lab.flows import ua_engine
from e2m_plugins.errors import E2MError
from kamailio_app.cert_table_pg import PostgresCertDatabase
from kamailio_app.pgconn import PgUrl
from tests.kamailio.test_review89_wire import BOB, USERS, bob_der

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio]


@pytest.fixture(scope="module")
def split(module_proxy_factory, module_pg_url, pki):
    nodes = start_cluster(module_proxy_factory, module_pg_url, auth=True, users=USERS)
    der = bob_der(pki)
    bob = CertClient(nodes.a.port, "bob", password=USERS["bob"], source="127.0.122.41")
    try:
        answer = bob.publish(der)
        assert answer is not None and answer.status == 200, answer
    finally:
        bob.close()
    return nodes, der


def _notify(port: int, source: str, expires: int):
    alice = CertClient(port, "alice", source=source)
    try:
        answer, _ = alice.subscribe(BOB, expires)
        assert answer is not None and answer.status == 200, answer
        [notify] = alice.wait_notifies(1)[:1]
        return notify
    finally:
        alice.close()


def _publications(nodes, pg_url: str) -> dict[str, int]:
    counts = {}
    for name, node in (("A", nodes.a), ("B", nodes.b)):
        path = node.directory / "certs.sqlite"
        try:
            with sqlite3.connect(path) as conn:
                counts[name] = conn.execute(
                    "SELECT count(*) FROM cert_publications").fetchone()[0]
        except sqlite3.OperationalError:        # since the fix the nodes keep no file
            counts[name] = None
    db = PostgresCertDatabase(PgUrl.parse(pg_url))
    try:
        with db.read() as cursor:
            counts["pg"] = cursor.execute("SELECT count(*) FROM cert_publications").fetchone()[0]
    finally:
        db.close()
    return counts


def test_control_hb2_the_node_that_took_the_publish_serves_it(split):
    nodes, der = split
    notify = _notify(nodes.a.port, "127.0.122.42", 0)
    assert notify.body == der


def test_hole_hb2_another_node_says_bob_has_no_certificate(split, module_pg_url):
    nodes, der = split
    fetched = _notify(nodes.b.port, "127.0.122.43", 0)
    followed = _notify(nodes.b.port, "127.0.122.44", 3600)
    counts = _publications(nodes, module_pg_url)
    print(f"\nnode B fetch: {len(fetched.body)} bytes, {fetched.get('Subscription-State')}; "
          f"follow: {len(followed.body)} bytes, {followed.get('Subscription-State')}; "
          f"publications {counts}")
    assert fetched.body == der and followed.body == der, counts


def test_hole_hb2_a_follow_renewed_at_the_other_node_withdraws_bobs_certificate(split, pki):
    """alice's engine (``e2m_lab.flows.ua_engine``, as the phone's) takes the NOTIFYs the
    two nodes really sent: her follow at A (bob's certificate), then her renewal (a new
    SUBSCRIBE) served by B (empty).  Observed: the second drops bob's certificate and
    marks it withdrawn: ``add_peer_certificate`` of the very same DER (from A again, or
    learnt from bob's signature) is then refused "a certificate its service withdrew"."""
    nodes, der = split
    first = _notify(nodes.a.port, "127.0.122.45", 3600)
    renewal = _notify(nodes.b.port, "127.0.122.46", 3600)
    alice = ua_engine(pki, "alice", peers=("alice",))
    assert alice.accept_certificate_notify(first, BOB, 3600) is not None
    alice.accept_certificate_notify(renewal, BOB, 3600)
    try:
        alice.add_peer_certificate(BOB, der, expires_in=3600)
        refused = None
    except E2MError as exc:
        refused = str(exc)
    print(f"\nbob's certificate offered again after B's NOTIFY: {refused or 'kept'}")
    assert refused is None
