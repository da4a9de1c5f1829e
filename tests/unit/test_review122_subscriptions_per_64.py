"""Review 122 (attacker's review of 2161459), the certificate service's bounds on follow
subscriptions (``kamailio_app/cert_table.py``) against one IPv6 /64.

Hole K1 (``test_hole_k1_one_ipv6_64_fills_the_services_subscriptions``): an **off-path
sender** (a stranger, no account) with an ordinary IPv6 access line, that is one /64,
holds every place of the certificate service and honest phones can no longer follow
any certificate.

- Set-up: the real ``SubscriptionTable`` on its SQLite file, with the bounds the proxy
  passes (``SubscriptionLimits``: per AoR, per source address, in all).  Product
  defaults are 100 / 20 / 10,000; the test scales the total to 200 so it runs in a
  second, the per-source bound (20) is the product's.
- Messages (what Kamailio hands the table): follow SUBSCRIBEs (``Expires`` > 0, the
  default grants 86,400 s) from ``2001:db8:122::1``, ``::2``, ... ``::a`` -- ten addresses
  of one /64 -- twenty from each, spread over 50 AoRs of the domain so the per-AoR
  bound never bites; the stranger answers each NOTIFY 200 (``confirm``: he really is at
  those addresses, so nothing is on probation and nothing can be evicted).
- Observed: all 200 are kept (20 per address, 10 addresses); then an honest phone at
  ``192.0.2.10`` following ``sip:bob@example.com`` is refused
  ``SubscriptionRefused: 200 subscriptions per proxy at most`` -- on the wire ``403 Too
  Many Subscriptions``.  With the product's bounds unscaled (a script, same helpers:
  500 addresses of the /64, 20 follows each, over 100 AoRs) the table took all 10,000
  in 2.4 s of table time (0.18 ms an add at the end) and the honest follow was refused
  ``10000 subscriptions per proxy at most``; on the wire the product's
  ``max_new_subscriptions_per_second`` (100) makes that 100 s; the
  places are then held for the subscriptions' 24 h by answering one NOTIFY each.  Every
  honest phone's follow is refused: it falls back to a fetch per send and, while the
  refusal is remembered, hears nothing when a peer withdraws a stolen key (the reason
  follows exist, review 107).  Per AoR the same /64 takes bob's 100 places from five
  of its addresses.
- Code at fault: ``kamailio_app/cert_table.py:361-364`` (``_check_bounds`` counts
  ``source = ?``, the exact address) with ``sub.source`` the bare ``$si``
  (``kamailio_app/cert_route.py:116-119``, ``_peer``; ``e2m_plugins/notifier.py:158``).
  The project already decided that "one line gets a /64 at least, and every address in
  it for free" (``kamailio_app/tcp_sweep.py:52-62``, ``share_key``; review 29), but the
  certificate service's per-source bound was not brought under that rule.
- Suggested fix: count ``max_subscriptions_per_source`` by ``tcp_sweep.share_key`` (a
  ``source_share`` column, or a ``LIKE`` on the /64's prefix as written by
  ``ipaddress``), keeping the exact address for the NOTIFY's next hop and the
  "taken from another source" rule.  The same look at ``registrations_per_source``
  (open registrar) is advised; not tried here.

Controls (unmarked, pass):

- ``test_control_k1_one_address_gets_its_twenty_places_and_no_more``: twenty follows
  from one IPv6 address are kept, the 21st is refused, and an honest phone elsewhere
  still follows: the per-source rule works for one address.
- ``test_control_k1_an_honest_phone_follows_while_the_service_has_room``: the honest
  follow of the hole test is kept on the same table when the /64's flood is absent.

Measured beside it (same script, 10,000 rows): ``changed`` for an AoR with 100 followers
1.6 ms, the timer's ``claim_due`` of those 100 NOTIFYs 21 ms, ``drop_unanswered`` 2.5
ms: the fan-out of a replaced certificate is bounded by the per-AoR bound and
``BATCH`` and cheap per tick.

Tried and held (this review): see ``tests/kamailio/test_review122_certservice_wire.py``.

Fixed (stop 40): see ``tests/kamailio/test_review122_certservice_wire.py``.  The hole
test failed on the code before the fix and passes with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2m_plugins.notifier import Peer, open_dialog
from e2m_plugins.sip import make_request
from kamailio_app.cert_table import (CertDatabase, SubscriptionLimits, SubscriptionRefused,
                                     SubscriptionTable)

DEFAULT = SubscriptionLimits()
SCALED = SubscriptionLimits(per_aor=DEFAULT.per_aor, per_source=DEFAULT.per_source, total=200)
PREFIX = "2001:db8:122::"          # one /64: the stranger's access line
AORS = 50


@pytest.fixture
def subs(tmp_path: Path):
    db = CertDatabase(tmp_path / "certs.sqlite")
    yield SubscriptionTable(db)
    db.close()


def _follow(n: int, source: str, aor: str):
    """The subscription Kamailio's cert_route would store for a follow SUBSCRIBE from
    ``source`` (its ``$si``) to ``aor``; ``n`` makes its dialog."""
    host = f"[{source}]" if ":" in source else source
    request = make_request("SUBSCRIBE", aor, from_uri="sip:x@example.net", to_uri=aor,
                           call_id=f"r122-{n}", from_tag=f"f{n}",
                           extra_headers=[("Event", "certificate"), ("Expires", "86400"),
                                          ("Contact", f"<sip:x@{host}:5062>")])
    return open_dialog(request, local_tag=f"l{n}", peer=Peer(source, 5062), contact="sip:p:1",
                       event_id=None, expires=1e10)


def _stranger_fills(subs: SubscriptionTable, addresses: int, per_address: int,
                    limits: SubscriptionLimits) -> tuple[int, int]:
    """Follows from ``addresses`` addresses of the /64, each NOTIFY answered; how many
    were kept and how many refused."""
    kept = refused = 0
    n = 0
    for a in range(1, addresses + 1):
        for _ in range(per_address):
            n += 1
            sub = _follow(n, f"{PREFIX}{a:x}", f"sip:u{n % AORS}@example.com")
            try:
                subs.add(sub, limits, 100.0 + n * 1e-3)
            except SubscriptionRefused:
                refused += 1
                continue
            subs.confirm(sub.call_id, sub.local_tag, sub.remote_tag, now=100.0)
            kept += 1
    return kept, refused


def _honest_follows(subs: SubscriptionTable, limits: SubscriptionLimits) -> bool:
    try:
        subs.add(_follow(99_999, "192.0.2.10", "sip:bob@example.com"), limits, 200.0)
    except SubscriptionRefused:
        return False
    return True


def test_hole_k1_one_ipv6_64_fills_the_services_subscriptions(subs):
    kept, refused = _stranger_fills(subs, 10, DEFAULT.per_source, SCALED)
    honest = _honest_follows(subs, SCALED)
    # secure: the /64 is one site (since stop 41: each address 20 places, the site
    # SITE_SHARES addresses' worth, 100; review 123 HB3), and the honest phone still follows
    assert (kept, honest) == (SCALED.per_site, True), \
        f"the /64 kept {kept} follows ({refused} refused); honest follow kept: {honest}"


def test_control_k1_one_address_gets_its_twenty_places_and_no_more(subs):
    kept, refused = _stranger_fills(subs, 1, DEFAULT.per_source + 1, SCALED)
    assert (kept, refused) == (DEFAULT.per_source, 1)
    assert _honest_follows(subs, SCALED)


def test_control_k1_an_honest_phone_follows_while_the_service_has_room(subs):
    assert _honest_follows(subs, SCALED)
    assert subs.count() == 1
