"""Review 143: review 142's copy rule (``SubscriptionTable.add``: a first SUBSCRIBE that
names a subscription we hold renews it only as a copy of the one that made it), tried
for honest subscribers it might refuse and forgeries it might still let through.  No
hole and no honest break: controls only (the account is in
``tests/kamailio/test_review143_ack_wire.py``, item 3).

- An honest retransmission (the 200 was lost) over IPv6, whose source is kept as
  ``"<site> <address>"``: a copy, renewed (CSeq 1, then 2).
- A neighbour in the same /56 site (another address) writing the same dialog: refused
  ("made from another address"), the row unchanged.
- What an exact copy can still do: set the follow's expiry (here shortened).  It has to
  come from the follow's own next hop (address, port, transport, route set), from where
  an in-dialog refresh or unsubscribe already may; a copy from another port of that
  address is refused.
"""

from __future__ import annotations

import pytest

from e2m_plugins.notifier import Peer, open_dialog
from e2m_plugins.sip import make_request
from kamailio_app.cert_table import (CertDatabase, SubscriptionLimits, SubscriptionTable,
                                     SubscriptionTaken)

BOB = "sip:bob@example.com"


def _follow(ip: str, port: int = 5062, *, expires: float = 1e10, transport: str = "udp"):
    host = f"[{ip}]" if ":" in ip else ip
    request = make_request("SUBSCRIBE", BOB, from_uri="sip:carol@example.com", to_uri=BOB,
                           call_id="r143-c", from_tag="f",
                           extra_headers=[("Event", "certificate"),
                                          ("Contact", f"<sip:carol@{host}:5062>")])
    return open_dialog(request, local_tag="l", peer=Peer(ip, port, transport),
                       contact="sip:certs@proxy.example.com", event_id=None, expires=expires)


@pytest.fixture
def table(tmp_path) -> SubscriptionTable:
    return SubscriptionTable(CertDatabase(tmp_path / "certs.sqlite"))


def test_control_an_ipv6_retransmission_is_a_copy(table):
    limits = SubscriptionLimits()
    first = _follow("2001:db8:0:1::5")
    assert table.add(first, limits, 100.0) == 1
    assert table.add(_follow("2001:db8:0:1::5"), limits, 101.0) == 2


def test_control_a_neighbour_in_the_site_is_refused(table):
    limits = SubscriptionLimits()
    first = _follow("2001:db8:0:1::5")
    table.add(first, limits, 100.0)
    with pytest.raises(SubscriptionTaken, match="another address"):
        table.add(_follow("2001:db8:0:1::6"), limits, 101.0)
    kept = table.get("r143-c", "l", "f", "")
    assert kept is not None and kept.next_hop == first.next_hop


def test_control_an_exact_copy_sets_only_the_expiry(table):
    limits = SubscriptionLimits()
    first = _follow("192.0.2.77")
    table.add(first, limits, 100.0)
    with pytest.raises(SubscriptionTaken, match="not a copy"):
        table.add(_follow("192.0.2.77", 41000, expires=160.0), limits, 101.0)
    assert table.get("r143-c", "l", "f", "").expires == 1e10
    assert table.add(_follow("192.0.2.77", expires=160.0), limits, 102.0) == 2
    kept = table.get("r143-c", "l", "f", "")
    assert kept.expires == 160.0 and kept.next_hop == first.next_hop
