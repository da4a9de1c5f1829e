"""Review 142 K1 at the table: a first SUBSCRIBE that names a subscription the service
holds (its To tag is sl's checksum of the Via and Call-ID, which a forger who knows the
dialog's ids can make collide) renews it only when it is a copy of the SUBSCRIBE that
made it: the same source, AoR, URIs, route set and next hop.  Anything else is
``SubscriptionTaken`` and the row stays as it was.  The PostgreSQL table runs the same
``add`` (``tests/cluster/test_cert_probation_pg.py``)."""

from __future__ import annotations

import pytest

from e2m_plugins.notifier import Peer, open_dialog
from e2m_plugins.sip import make_request
from kamailio_app.cert_table import (CertDatabase, SubscriptionLimits, SubscriptionTable,
                                     SubscriptionTaken)

BOB = "sip:bob@example.com"


def subscription(*, aor: str = BOB, port: int = 5062, record_route: str | None = None,
                 contact: str = "sip:carol@192.0.2.77:5062"):
    """carol's follow (Call-ID ``copy-c``, her tag ``f``, ours ``l``) as the service
    opens it from a SUBSCRIBE from 192.0.2.77:``port``."""
    extra = [("Event", "certificate"), ("Contact", f"<{contact}>")]
    if record_route:
        extra.append(("Record-Route", f"<{record_route}>"))
    request = make_request("SUBSCRIBE", aor, from_uri="sip:carol@example.com", to_uri=aor,
                           call_id="copy-c", from_tag="f", extra_headers=extra)
    return open_dialog(request, local_tag="l", peer=Peer("192.0.2.77", port),
                       contact="sip:certs@proxy.example.com", event_id=None, expires=1e10)


def check_copies(table: SubscriptionTable) -> None:
    limits = SubscriptionLimits()
    first = subscription(record_route="sip:192.0.2.77:5070;lr")
    assert table.add(first, limits, 100.0) == 1
    assert table.add(first, limits, 101.0) == 2          # a copy (its 200 was lost): renewed
    forged = [subscription(record_route="sip:192.0.2.77:5070;lr", aor="sip:alice@example.com"),
              subscription(record_route="sip:192.0.2.77:41000;lr"),
              subscription(),                            # no route: NOTIFYs to the sender
              subscription(record_route="sip:192.0.2.77:5070;lr",
                           contact="sip:carol@192.0.2.77:41000"),
              # (stop 47) from another port: renewed, its refreshes would be taken
              # from that port (review 137 HB2's rule)
              subscription(record_route="sip:192.0.2.77:5070;lr", port=41001)]
    for other in forged:
        with pytest.raises(SubscriptionTaken, match="not a copy"):
            table.add(other, limits, 102.0)
    kept = table.get("copy-c", "l", "f", "")
    assert kept is not None and kept.aor == BOB and kept.next_hop == first.next_hop
    assert kept.remote_target == first.remote_target
    assert kept.source_port == first.source_port == 5062


def test_a_first_subscribe_renews_only_as_a_copy(tmp_path) -> None:
    check_copies(SubscriptionTable(CertDatabase(tmp_path / "certs.sqlite")))


def test_control_a_subscription_from_a_port_is_its_own_next_hop() -> None:
    """What the forged copies differ in is what a NOTIFY would follow."""
    assert subscription(port=41000).next_hop != subscription().next_hop
    routed = subscription(record_route="sip:192.0.2.77:5070;lr")
    assert "5070" in routed.next_hop and routed.route_set
