"""The probation of unanswered subscriptions and the refusal of a dialog taken from
another source (tests/unit/test_certservice_rules_attacks.py) on PostgreSQL: the bit
arithmetic and the row-value DELETE are SQL that both back ends must take."""

from __future__ import annotations

import pytest

from e2m_plugins.notifier import Peer, open_dialog
from e2m_plugins.sip import make_request
from kamailio_app.cert_table import SubscriptionLimits, SubscriptionTable, SubscriptionTaken
from kamailio_app.cert_table_pg import PostgresCertDatabase
from kamailio_app.pgconn import PgUrl
from tests.unit.test_cert_table_copies import check_copies

pytestmark = pytest.mark.postgres

BOB = "sip:bob@example.com"


def _subscription(n: int, source: str = "192.0.2.77"):
    request = make_request("SUBSCRIBE", BOB, from_uri="sip:alice@example.com", to_uri=BOB,
                           call_id=f"probation-c{n}", from_tag=f"f{n}",
                           extra_headers=[("Event", "certificate"),
                                          ("Contact", f"<sip:alice@{source}:5062>")])
    return open_dialog(request, local_tag=f"l{n}", peer=Peer(source, 5062), contact="sip:x:1",
                       event_id=None, expires=1e10)


def test_probation_and_taken_dialogs_on_postgres(pg_url):
    db = PostgresCertDatabase(PgUrl.parse(pg_url))
    db.ensure_schema()
    subs = SubscriptionTable(db)
    try:
        with db.write() as cursor:
            cursor.execute("DELETE FROM cert_subscriptions WHERE call_id LIKE 'probation-%'")
        limits = SubscriptionLimits()
        subs.add(_subscription(1), limits, 100.0)
        subs.add(_subscription(2), limits, 100.0)
        with pytest.raises(SubscriptionTaken):
            subs.add(_subscription(1, source="198.51.100.7"), limits, 101.0)
        assert subs.confirm("probation-c1", "l1", "f1") == 1
        assert subs.changed(BOB) >= 2
        assert subs.drop_unanswered(104.0, 10) == 1
        assert subs.get("probation-c2", "l2", "f2", "") is None
        [(claimed, cseq)] = [c for c in subs.claim_due(200.0, 60, 100)
                             if c[0].call_id == "probation-c1"]
        assert cseq == 2 and claimed.source == "192.0.2.77"
        full = SubscriptionLimits(per_source=2)             # c1 answered, c3 not: c3 gives way
        subs.add(_subscription(3), full, 300.0)
        subs.add(_subscription(4), full, 302.0)
        assert subs.get("probation-c3", "l3", "f3", "") is None
    finally:
        with db.write() as cursor:
            cursor.execute("DELETE FROM cert_subscriptions WHERE call_id LIKE 'probation-%'")
        db.close()


def test_a_first_subscribe_renews_only_as_a_copy_on_postgres(pg_url):
    """Review 142 K1's rule (``tests/unit/test_cert_table_copies.py``) on PostgreSQL."""
    db = PostgresCertDatabase(PgUrl.parse(pg_url))
    db.ensure_schema()
    try:
        with db.write() as cursor:
            cursor.execute("DELETE FROM cert_subscriptions WHERE call_id = 'copy-c'")
        check_copies(SubscriptionTable(db))
    finally:
        with db.write() as cursor:
            cursor.execute("DELETE FROM cert_subscriptions WHERE call_id = 'copy-c'")
        db.close()
