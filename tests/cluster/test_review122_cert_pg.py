"""Review 122 (attacker's review of 2161459), cluster: hole K1 on the PostgreSQL back end
of the certificate service's tables (``kamailio_app/cert_table_pg.py``).

The reasoning, the figures on SQLite and on a real Kamailio, the code at fault and the
fix are in ``tests/unit/test_review122_subscriptions_per_64.py`` and
``tests/kamailio/test_review122_certservice_wire.py``.  Here the same follows (twenty
from each of ten addresses of ``2001:db8:122::/64``, each confirmed as ``on_reply``
confirms it) go into the tables on a private PostgreSQL: all 200 are kept and an honest
phone's follow is ``SubscriptionRefused`` (403 Too Many Subscriptions).  The per-source
bound is the product's (20), the total scaled to 200.

Note (honest break HB2, ``test_review122_cert_split_cluster.py``): today a running
node does not use these tables at all (each keeps its own SQLite file), so K1 hits
each node's own table; once HB2 is fixed the bound is the cluster's, and this is the
table that must count a /64 as one source.

Control (unmarked): one IPv6 address gets its twenty places and no more on PostgreSQL,
and the honest phone still follows.

Fixed (stop 40): see ``tests/kamailio/test_review122_certservice_wire.py``; the same
``SubscriptionTable`` over PostgreSQL.  The hole test failed on the code before the fix
and passes with it.
"""

from __future__ import annotations

import pytest

from kamailio_app.cert_table import SubscriptionTable
from kamailio_app.cert_table_pg import PostgresCertDatabase
from kamailio_app.pgconn import PgUrl
from tests.unit.test_review122_subscriptions_per_64 import (DEFAULT, SCALED, _honest_follows,
                                                            _stranger_fills)

pytestmark = pytest.mark.postgres


@pytest.fixture
def subs(pg_url):
    db = PostgresCertDatabase(PgUrl.parse(pg_url))
    db.ensure_schema()
    yield SubscriptionTable(db)
    db.close()


def test_hole_k1_pg_one_ipv6_64_fills_the_clusters_subscriptions(subs):
    kept, refused = _stranger_fills(subs, 10, DEFAULT.per_source, SCALED)
    honest = _honest_follows(subs, SCALED)
    # since stop 41 the /64's site holds SITE_SHARES addresses' worth (100; review 123 HB3)
    assert (kept, honest) == (SCALED.per_site, True), \
        f"the /64 kept {kept} follows ({refused} refused); honest follow kept: {honest}"


def test_control_k1_pg_one_address_gets_its_twenty_places(subs):
    kept, refused = _stranger_fills(subs, 1, DEFAULT.per_source + 1, SCALED)
    assert (kept, refused) == (DEFAULT.per_source, 1)
    assert _honest_follows(subs, SCALED)
