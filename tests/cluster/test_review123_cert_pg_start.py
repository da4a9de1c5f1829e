"""Review 123 (attacker's review of 487265c), cluster: the certificate service on the
cluster's PostgreSQL when a node starts while the database is down (commit 6a43fbe:
``bootstrap`` with ``PostgresCertDatabase``, ``ensure_schema(unreachable_ok=True)``).
No hole found here; these tests are the run that held (unmarked, pass).

- ``test_started_while_the_database_is_down_serves_once_it_is_back``: a node (E2M on,
  ``[certs]``, ``db_url`` a private PostgreSQL, no ``[auth]``) is stopped, the database
  killed, the node started: it starts ("is not reachable now"); a fetch of bob's
  certificate is answered **500** (the service's own answer while its tables are
  away); the database is started again and bob's publication written into the shared
  table (as another node that took his PUBLISH does); the next fetch is **200 and a
  NOTIFY with bob's 475-byte certificate**, at the first try (two runs).  Each worker
  connects on its own after the fork (``certs.db.close()`` in ``bootstrap``) and
  ``PostgresCertDatabase._failure`` drops a broken connection, so nothing stale is
  kept.
- ``test_control_started_with_the_database_up_serves``: the same without the outage.
- With ``[auth]`` a node cannot start while the database is down at all (the users'
  table is there; the launcher says so and exits): run, not kept as a test.
- Read, held: two nodes racing on one AoR's PUBLISH: ``PublicationTable.locked()`` is
  ``write()``, a transaction that first takes ``pg_advisory_xact_lock(CERT_LOCK)``
  (``kamailio_app/cert_table_pg.py:100-113``), and the nested writes inside it are
  savepoints of that transaction (autocommit connections, so a read leaves none open):
  the decision (read, entity-tag check, save) is serialised across nodes; the NOTIFYs
  it causes are claimed row by row with ``UPDATE ... WHERE pending & CHANGED RETURNING``
  (``cert_table.py:490-513``), so no NOTIFY is claimed twice.  Who sends them is honest
  break HB4 (``test_review123_cert_notify_node.py``).
- Read: ``ensure_schema(unreachable_ok=True)`` takes any connection error for
  "unreachable", a wrong password too: such a node starts and answers 500 instead of
  refusing to start; an operator's error, logged, not an attacker's.
"""

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
from tests.kamailio.test_review89_wire import BOB, bob_der

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio]


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
