"""A certificate NOTIFY leaves from the socket its subscription was made at, and only
the node that has that socket sends it (review 123 HB4).

On a cluster node the timer's NOTIFYs left from whatever socket Kamailio chose for the
destination (the DMQ one, at the same address), and either node's timer claimed them
from the shared table; a phone takes NOTIFYs only from where it subscribed, answered
481, and the service forgot the follow (6 to 0).  The wire test with two nodes is
``tests/cluster/test_review123_cert_notify_node.py``; here the two halves of the fix
on a SQLite table and a stand-in for KSR: the claims filtered by our own Contacts, and
``$var(e2m_socket)`` (``t_uac_send``'s socket) set from the subscription's Contact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2m_plugins.notifier import Peer, open_dialog
from e2m_plugins.sip import make_request
from kamailio_app.cert_route import CertService, contact_uri
from kamailio_app.cert_table import (ORPHAN_GRACE, CertDatabase, SubscriptionLimits,
                                     SubscriptionTable)
from kamailio_app.config import CertSettings, Listener
from tests.unit.test_review26 import FakeKSR

BOB = "sip:bob@example.com"
OURS = Listener("udp", "192.0.2.11", 5060)
THEIRS = Listener("udp", "192.0.2.12", 5060)
DMQ = Listener("udp", "192.0.2.11", 5090)


def _subscription(n: int, at: Listener, expires: float = 1e10):
    request = make_request("SUBSCRIBE", BOB, from_uri="sip:alice@example.com", to_uri=BOB,
                           call_id=f"c{n}", from_tag=f"f{n}",
                           extra_headers=[("Event", "certificate"),
                                          ("Contact", f"<sip:alice@198.51.100.{n}:5062>")])
    return open_dialog(request, local_tag=f"l{n}", peer=Peer(f"198.51.100.{n}", 5062),
                       contact=contact_uri(at.proto, at.host, at.port), event_id=None,
                       expires=expires)


@pytest.fixture
def subs(tmp_path: Path):
    db = CertDatabase(tmp_path / "certs.sqlite")
    yield SubscriptionTable(db)
    db.close()


def test_a_node_claims_only_the_changes_owed_at_its_own_contacts(subs):
    subs.add(_subscription(1, OURS), SubscriptionLimits(), 100.0)
    subs.add(_subscription(2, THEIRS), SubscriptionLimits(), 100.0)
    assert subs.changed(BOB) == 2
    mine = {contact_uri(OURS.proto, OURS.host, OURS.port)}
    claimed = subs.claim_due(200.0, 60, 10, mine)
    assert [sub.call_id for sub, _ in claimed] == ["c1"]
    assert subs.claim_due(200.0, 60, 10, set()) == []        # no socket: nothing is ours
    # the other node's is still owed, to that node (None: any, a single node's tables)
    assert [sub.call_id for sub, _ in subs.claim_due(200.0, 60, 10)] == ["c2"]


def test_another_nodes_lapsed_follow_waits_for_it_then_is_anyones(subs):
    subs.add(_subscription(1, THEIRS, expires=150.0), SubscriptionLimits(), 100.0)
    mine = {contact_uri(OURS.proto, OURS.host, OURS.port)}
    assert subs.claim_lapsed(200.0, 10, mine) == []           # its node says the last word
    [(gone, _)] = subs.claim_lapsed(150.0 + ORPHAN_GRACE + 1, 10, mine)
    assert gone.call_id == "c1" and subs.count() == 0         # that node is gone for good


def test_the_notify_names_the_socket_the_follow_was_made_at(tmp_path: Path):
    ksr = FakeKSR()
    service = CertService(CertSettings(path=tmp_path / "certs.sqlite"), [], ksr,
                          listeners=[OURS, DMQ, Listener("tls", "192.0.2.11", 5061)])
    try:
        service._notify(_subscription(1, OURS), 2, 100, b"", True)
        assert ksr.vars["$var(e2m_socket)"] == "udp:192.0.2.11:5060"     # not DMQ's :5090
        tls = _subscription(2, Listener("tls", "192.0.2.11", 5061))
        service._notify(tls, 2, 100, b"", True)
        assert ksr.vars["$var(e2m_socket)"] == "tls:192.0.2.11:5061"
        # made at no socket of ours (its node gone): tm chooses, as before
        service._notify(_subscription(3, THEIRS), 2, 100, b"", True)
        assert ksr.vars["$var(e2m_socket)"] == ""
    finally:
        service.db.close()


def test_the_contact_is_the_one_a_subscribe_is_answered_with(tmp_path: Path):
    """The Contact kept with a subscription (``_contact``, from the socket the SUBSCRIBE
    came in on) is the key the socket is found by: one function makes both."""
    ksr = FakeKSR()
    ksr.vars = {"$pr": "tcp", "$Ri": "2001:db8::11", "$Rp": 5060}
    service = CertService(CertSettings(path=tmp_path / "certs.sqlite"), [], ksr,
                          listeners=[Listener("tcp", "2001:db8::11", 5060)])
    try:
        contact = service._contact()
        assert contact == "sip:[2001:db8::11]:5060;transport=tcp"
        assert service._sockets == {contact: "tcp:[2001:db8::11]:5060"}
    finally:
        service.db.close()
