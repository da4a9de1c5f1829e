"""Review 123 (attacker's review of 487265c), cluster: the certificate service on the
cluster's PostgreSQL when a node starts while the database is down
(``bootstrap`` with ``PostgresCertDatabase``, ``ensure_schema(unreachable_ok=True)``).
Docstring completed below."""

from __future__ import annotations

import hashlib
import time

import pytest

from e2m_lab.certclient import CertClient
from e2m_lab.cluster import VIEW
from e2m_plugins.certservice import Publication
from kamailio_app.cert_table import PublicationTable
from kamailio_app.cert_table_pg import PostgresCertDatabase
from kamailio_app.pgconn import PgUrl
from tests.kamailio.test_review89_wire import BOB, USERS, bob_der

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio]


def _publish(port, der, source):
    bob = CertClient(port, "bob", password=USERS["bob"], source=source)
    try:
        answer = bob.publish(der)
        return None if answer is None else answer.status
    finally:
        bob.close()


def _fetch(port, source):
    alice = CertClient(port, "alice", source=source)
    try:
        answer, _ = alice.subscribe(BOB, 0)
        if answer is None or answer.status != 200:
            return (None if answer is None else answer.status), None
        notifies = alice.wait_notifies(1)
        return 200, (notifies[0].body if notifies else None)
    finally:
        alice.close()


def _node(proxy_factory, url):
    # no [auth]: its users' database must be reachable at start (auth_db), so a node
    # with [auth] on the cluster's database cannot start while it is down at all
    return proxy_factory("home", db_url=url, view=VIEW)


def _put_bob(url, der):
    """bob's publication written into the cluster's tables (as another node that took
    his PUBLISH does)."""
    from cryptography import x509
    cert = x509.load_der_x509_certificate(der)
    now = time.time()
    db = PostgresCertDatabase(PgUrl.parse(url))
    try:
        PublicationTable(db).save(Publication(
            aor=BOB, der=der, fingerprint="sha256:" + hashlib.sha256(der).hexdigest(),
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(), etag="r123",
            expires=now + 3600, published_by="bob", published_at=now))
    finally:
        db.close()


def test_started_while_the_database_is_down_serves_once_it_is_back(proxy_factory, pki,
                                                                     own_postgres):
    proxy = _node(proxy_factory, own_postgres.url)
    proxy.stop()
    own_postgres.kill()
    assert proxy.start(), proxy.log_since(0)[-2000:]
    der = bob_der(pki)
    down = _fetch(proxy.port, "127.0.123.11")
    own_postgres.start()
    _put_bob(own_postgres.url, der)
    answers = []
    for n in range(10):
        answers.append(_fetch(proxy.port, f"127.0.123.{20 + n}"))
        if answers[-1][0] == 200:
            break
        time.sleep(1)
    print(f"\nwhile down: fetch {down[0]}; back: fetches "
          f"{[(code, len(body or b'')) for code, body in answers]}")
    assert answers[-1] == (200, der)


def test_control_started_with_the_database_up_serves(proxy_factory, pki, own_postgres):
    proxy = _node(proxy_factory, own_postgres.url)
    der = bob_der(pki)
    _put_bob(own_postgres.url, der)
    assert _fetch(proxy.port, "127.0.123.51") == (200, der)
