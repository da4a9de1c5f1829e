"""Review 113 (attacker's review of d038d44): the shared PostgreSQL restarted under
Kamailio's own ``db_postgres`` (auth_db digest) and under the certificate service's
tables (``cert_table_pg``).  Review 110 restarted it under the archive and the replay
claims and listed these two as untried.

No hole was seen: both are controls that pass unmarked.

``test_control_digest_registers_across_a_database_restart`` -- set-up: the home proxy
with ``[auth]`` users in PostgreSQL (``_home`` of ``test_cluster_wire.py``), bob's
REGISTER with digest answered 200 four times, every Kamailio process connected
(``_wait_children_connected``).  The database is restarted (fast shutdown: the server
ends every session; started again; ``SELECT 1`` answers).  Messages: eight digest
REGISTERs of bob's, then four with a wrong password.  Observed: the first query of the
worker meets the dead session (``db_postgres_submit_query(): ... FATAL: terminating
connection due to administrator command``), db_postgres (``retries 1``) reconnects and
runs it again: all eight 200, all four 401.  Nothing fails open (a failed auth query
is ``_AUTH_ERROR``: 500 with Retry-After, test_cluster_wire's control).

``test_control_the_certificate_table_reads_after_a_database_restart`` -- a PUBLISH of
bob's certificate through ``PostgresCertDatabase`` (the core's ``certservice.publish``),
the database restarted, then a read: the certificate is served at once (review 110's
``ProcessConnection.get`` polls the kept session and replaces the dead one).
"""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.kamailio_harness import SipUa
from e2m_plugins import certservice as cs
from e2m_plugins.sip import make_request
from kamailio_app.cert_table import PublicationTable
from kamailio_app.cert_table_pg import PostgresCertDatabase
from kamailio_app.pgconn import PgUrl
from tests.cluster.test_cluster_wire import _home, _wait_children_connected

pytestmark = [pytest.mark.postgres]

BOB = "sip:bob@example.com"


def _restart(pg) -> None:
    """A routine restart: fast shutdown, the same cluster started again, answering."""
    pg.stop(keep=True)
    pg.start()
    assert pg.psql("SELECT 1").strip() == "1"


@pytest.mark.kamailio
def test_control_digest_registers_across_a_database_restart(proxy_factory, pki, own_postgres):
    proxy, uas = _home(proxy_factory, own_postgres.url, auth=True, users={"bob": "bob-pw"})
    bob = SipUa(proxy.port, user="bob", password="bob-pw")
    guess = SipUa(proxy.port, user="bob", password="guess")
    try:
        for _ in range(4):
            assert bob.register().status == 200
        _wait_children_connected(own_postgres)
        _restart(own_postgres)
        answers = [bob.register() for _ in range(8)]
        wrong = [guess.register() for _ in range(4)]
    finally:
        bob.close()
        guess.close()
        uas.close()
    assert [a.status if a else None for a in answers] == [200] * 8
    assert [w.status if w else None for w in wrong] == [401] * 4


def test_control_the_certificate_table_reads_after_a_database_restart(own_postgres, pki):
    db = PostgresCertDatabase(PgUrl.parse(own_postgres.url))
    try:
        db.ensure_schema()
        der = pki.user("bob", "ec").cert.public_bytes(Encoding.DER)
        request = make_request("PUBLISH", BOB, from_uri=BOB, to_uri=BOB,
                               extra_headers=[("Event", "certificate")], body=der,
                               content_type=cs.CONTENT_TYPE)
        done = cs.publish(request, authenticated=BOB, store=PublicationTable(db),
                          anchors=[pki.ca.cert], now=time.time())
        assert done.code == 200
        assert PublicationTable(db).current(BOB).der == der     # the session is kept
        _restart(own_postgres)
        assert PublicationTable(db).current(BOB).der == der
    finally:
        db.close()
