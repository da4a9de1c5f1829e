"""The certificate service's tables on PostgreSQL (``kamailio_app.cert_table_pg``): the
core's PUBLISH decisions on them, the bounds, and two nodes claiming the same due
NOTIFYs, each claimed once; a write that fails half-way leaves nothing."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_plugins import certservice as cs
from e2m_plugins.notifier import Peer, open_dialog
from e2m_plugins.sip import make_request
from kamailio_app.archive_pg import PostgresArchive
from kamailio_app.archive_schema import ARCHIVE_VERSION
from kamailio_app.cert_table import (PublicationTable, SubscriptionLimits, SubscriptionRefused,
                                     SubscriptionTable)
from kamailio_app.cert_table_pg import PostgresCertDatabase
from kamailio_app.pgconn import PgUrl

pytestmark = pytest.mark.postgres

BOB = "sip:bob@example.com"


def _node(url: str) -> PostgresCertDatabase:
    return PostgresCertDatabase(PgUrl.parse(url))


def _subscription(n: int, *, source: str = "192.0.2.1"):
    request = make_request("SUBSCRIBE", BOB, from_uri="sip:alice@example.com", to_uri=BOB,
                           call_id=f"c{n}", from_tag=f"f{n}",
                           extra_headers=[("Event", "certificate"),
                                          ("Contact", "<sip:alice@192.0.2.1:5062>")])
    return open_dialog(request, local_tag=f"l{n}", peer=Peer(source, 5062), contact="sip:x:1",
                       event_id=None, expires=1e10)


def test_publications_and_subscriptions_on_postgres_shared_by_two_nodes(pg_url, pki):
    a, b = _node(pg_url), _node(pg_url)
    a.ensure_schema()
    b.ensure_schema()                               # idempotent, from any node
    der = pki.user("bob", "ec").cert.public_bytes(Encoding.DER)
    request = make_request("PUBLISH", BOB, from_uri=BOB, to_uri=BOB,
                           extra_headers=[("Event", "certificate")], body=der,
                           content_type=cs.CONTENT_TYPE)
    done = cs.publish(request, authenticated=BOB, store=PublicationTable(a),
                      anchors=[pki.ca.cert], now=time.time())
    assert (done.code, done.changed) == (200, "published")
    assert PublicationTable(b).current(BOB).der == der          # node b sees node a's

    limits = SubscriptionLimits(per_aor=100, per_source=30, total=100)
    subs_a, subs_b = SubscriptionTable(a), SubscriptionTable(b)
    for n in range(30):
        (subs_a if n % 2 else subs_b).add(_subscription(n), limits, 100.0)
    with pytest.raises(SubscriptionRefused, match="source"):
        subs_a.add(_subscription(99), limits, 100.0)
    assert subs_b.changed(BOB) == 30
    with ThreadPoolExecutor(2) as pool:      # both nodes' timers at once
        claims = list(pool.map(lambda subs: subs.claim_due(200.0, 60, 100), (subs_a, subs_b)))
    claimed = [sub.call_id for got in claims for sub, _ in got]
    assert sorted(claimed) == sorted(f"c{n}" for n in range(30))   # each exactly once

    with pytest.raises(RuntimeError):
        with PublicationTable(a).locked():
            PublicationTable(a).remove(BOB)
            raise RuntimeError("the worker fails half-way")
    assert PublicationTable(b).current(BOB) is not None
    a.close()
    b.close()


def test_the_certificate_tables_and_the_archive_share_schema_version(pg_url):
    archive = PostgresArchive(PgUrl.parse(pg_url))
    assert archive.migrate() == (0, ARCHIVE_VERSION)
    _node(pg_url).ensure_schema()
    assert archive.version() == ARCHIVE_VERSION
    assert archive.migrate() == (ARCHIVE_VERSION, ARCHIVE_VERSION)


def test_version_1_tables_gain_the_opening_port_and_keep_their_rows(pg_url):
    """(stop 47, review 137 HB2) tables an older e2m-proxy made, brought up to date by
    the next ``ensure_schema`` (a node's start, ``db upgrade``), once whatever the
    number of nodes."""
    import psycopg

    from kamailio_app.cert_table import SCHEMA_VERSION
    from tests.unit.test_cert_schema_upgrade import VERSION_1
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for statement in VERSION_1.split(";\n"):
            if statement.strip():
                conn.execute(statement)
    nodes = [_node(pg_url) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda node: node.ensure_schema(), nodes))
    kept = SubscriptionTable(nodes[0]).get("c1", "l1", "f1", "")
    assert kept is not None and kept.source_port == 0 and kept.route_set
    fresh = _subscription(7)
    SubscriptionTable(nodes[1]).add(fresh, SubscriptionLimits(), 100.0)
    assert SubscriptionTable(nodes[0]).get("c1", "l1", "f1", "") == kept
    assert SubscriptionTable(nodes[0]).get(*_key_of(fresh)).source_port == 5062
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version WHERE component = 'certs'"
                            ).fetchall() == [(SCHEMA_VERSION,)]
    for node in nodes:
        node.close()


def _key_of(sub) -> tuple[str, str, str, str]:
    return (sub.call_id, sub.local_tag, sub.remote_tag, sub.event_id)


def test_owned_version_1_tables_wait_for_db_upgrade(tmp_path, postgres, monkeypatch):
    """(stop 47) version 1 tables owned by the owner account (``db init --owner-url``),
    the nodes' account granted rows only: it may not alter them, so a node's start
    stops with what to run; ``ensure_schema`` as the owner (what ``db upgrade
    --owner-url`` runs) brings them up, and the node then starts and writes the port."""
    import os

    import psycopg

    from kamailio_app.cert_table import _SCHEMA, CertTableError
    from tests.cluster.test_review73_cluster import _owned_database
    from tests.unit.test_cert_schema_upgrade import VERSION_1
    node_url, owner_url = _owned_database(postgres, monkeypatch)
    owner_url = owner_url.replace("@", ":" + os.environ["E2M_OWNER_PASSWORD"] + "@", 1)
    node_user = PgUrl.parse(node_url).user
    with psycopg.connect(owner_url, autocommit=True) as conn:
        for statement in VERSION_1.split(";\n"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(_SCHEMA.format(blob="BYTEA").split(";")[0])   # cert_publications
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON cert_subscriptions, "
                     f"cert_publications, schema_version TO {node_user}")
    with pytest.raises(CertTableError, match="upgrade from version 1 .*db upgrade"):
        _node(node_url).ensure_schema(unreachable_ok=True)
    PostgresCertDatabase(PgUrl.parse(owner_url)).ensure_schema()
    started = _node(node_url)
    started.ensure_schema(unreachable_ok=True)
    SubscriptionTable(started).add(_subscription(3), SubscriptionLimits(), 100.0)
    assert SubscriptionTable(started).get("c3", "l3", "f3", "").source_port == 5062
    assert SubscriptionTable(started).get("c1", "l1", "f1", "").source_port == 0
    started.close()
