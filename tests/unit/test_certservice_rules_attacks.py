"""The certificate service's decisions and tables against an insider UA and a forger,
where the logic is pure (the wire attacks: tests/kamailio/test_certservice_attacks.py).

The owner the proxy passes to ``certservice.publish`` is built as cert_route builds it:
``sip:<the user digest authentication proved>@<the Request-URI's host>``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_plugins import certservice as cs
from e2m_plugins.notifier import Peer, next_hop_for_size, open_dialog
from e2m_plugins.sip import make_request
from e2m_plugins.testpki import TestPKI
from e2m_plugins.uri import parse_uri
from kamailio_app.cert_table import (FETCH, HELD, UNCONFIRMED, CertDatabase, SubscriptionLimits,
                                     SubscriptionRefused, SubscriptionTable, SubscriptionTaken)

BOB = "sip:bob@example.com"


def _der(pki: TestPKI, user: str) -> bytes:
    return pki.user(user, "ec").cert.public_bytes(Encoding.DER)


def _publish(uri: str, body: bytes | None, *, etag: str | None = None,
             expires: int | None = None, to: str | None = None):
    headers = [("Event", "certificate")]
    if etag:
        headers.append(("SIP-If-Match", etag))
    if expires is not None:
        headers.append(("Expires", str(expires)))
    return make_request("PUBLISH", uri, from_uri=to or uri, to_uri=to or uri,
                        extra_headers=headers, body=body or b"",
                        content_type=cs.CONTENT_TYPE if body else None)


def _owner(user: str, uri: str) -> str:
    """cert_route's owner: the authenticated user at the Request-URI's host ($rd)."""
    return f"sip:{user}@{parse_uri(uri).host}"


def _decide(pki, store, request, user):
    return cs.publish(request, authenticated=_owner(user, request.request_uri), store=store,
                      anchors=[pki.ca.cert], now=time.time())


# -- insider UA: publishing for someone else --------------------------------------------

@pytest.mark.parametrize("uri", [
    BOB, "sip:Bob@example.com", "sip:BOB@EXAMPLE.COM", "sip:%62ob@example.com",
    "sip:bob@example.com;user=phone", "sips:bob@example.com", "sip:bob@example.com:5060",
    "sip:bob;x=alice@example.com", "sip:bob@example.com.",
])
def test_alice_cannot_publish_for_bob_by_spelling_his_aor_differently(pki, uri):
    """alice (authenticated as alice) PUBLISHes bob's own certificate, and her own, to
    bob's AoR written every way that names him.  Result: 403 each time, nothing stored
    (the owner is compared after both sides are reduced to an AoR)."""
    store = cs.MemoryPublicationStore()
    for body in (_der(pki, "bob"), _der(pki, "alice")):
        answer = _decide(pki, store, _publish(uri, body), "alice")
        assert answer.code == 403, (uri, answer)
    assert store.current(BOB) is None


@pytest.mark.parametrize("uri", ["sip:Bob@example.com", "sip:BOB@example.com"])
def test_bob_in_another_case_is_not_bob(pki, uri):
    """SIP user parts are case-sensitive: ``sip:Bob@...`` is another AoR.  bob may not
    publish there (his own certificate names sip:bob@...), nor alice."""
    store = cs.MemoryPublicationStore()
    for user in ("bob", "alice"):
        assert _decide(pki, store, _publish(uri, _der(pki, "bob")), user).code == 403


def test_an_escaped_aor_lands_on_the_one_aor(pki):
    """bob writing his own AoR as ``%62ob``: stored under the one canonical AoR, where
    subscribers look, not beside it."""
    store = cs.MemoryPublicationStore()
    answer = _decide(pki, store, _publish("sip:%62ob@example.com", _der(pki, "bob")), "bob")
    assert answer.code == 200 and answer.aor == BOB
    assert store.current(BOB) is not None


def test_a_to_header_naming_alice_changes_nothing(pki):
    """The Request-URI decides whose AoR it is (RFC 3903 §4), never To or From: alice's
    PUBLISH to bob's Request-URI with To and From naming alice is still for bob: 403."""
    store = cs.MemoryPublicationStore()
    request = _publish(BOB, _der(pki, "alice"), to="sip:alice@example.com")
    assert _decide(pki, store, request, "alice").code == 403
    assert store.current(BOB) is None and store.current("sip:alice@example.com") is None


def test_bobs_entity_tag_is_worth_nothing_to_alice(pki):
    """alice knows bob's SIP-ETag (a hop showed it to her): she refreshes, modifies or
    removes with it on her own AoR (412: tags are per AoR) or on bob's (403)."""
    store = cs.MemoryPublicationStore()
    etag = dict(_decide(pki, store, _publish(BOB, _der(pki, "bob")), "bob").headers)["SIP-ETag"]
    alice = "sip:alice@example.com"
    assert _decide(pki, store, _publish(alice, None, etag=etag), "alice").code == 412
    assert _decide(pki, store, _publish(alice, None, etag=etag, expires=0), "alice").code == 412
    assert _decide(pki, store, _publish(BOB, None, etag=etag, expires=0), "alice").code == 403
    assert _decide(pki, store, _publish(BOB, _der(pki, "alice"), etag=etag), "alice").code == 403
    assert store.current(BOB).etag == etag


# -- a large NOTIFY never goes over UDP ----------------------------------------------------

@pytest.mark.parametrize("hop, size, expected", [
    ("sip:192.0.2.1:5062", 900, "sip:192.0.2.1:5062"),
    ("sip:192.0.2.1:5062", 1200, "sip:192.0.2.1:5062;transport=tcp"),
    ("sip:192.0.2.1:5062;transport=UDP", 5000, "sip:192.0.2.1:5062;transport=tcp"),
    ("sip:192.0.2.9:5060;lr", 5000, "sip:192.0.2.9:5060;lr;transport=tcp"),
    ("sip:192.0.2.1:5062;transport=tcp", 5000, "sip:192.0.2.1:5062;transport=tcp"),
    ("sip:192.0.2.1:5061;transport=tls", 16000, "sip:192.0.2.1:5061;transport=tls"),
    ("sips:192.0.2.1:5061", 16000, "sips:192.0.2.1:5061"),
])
def test_a_notify_above_1300_octets_leaves_udp(hop, size, expected):
    """RFC 3261 §18.1.1, and the reflection of a large certificate toward a forged
    source: the NOTIFY with tm's additions above 1300 octets goes over TCP."""
    assert next_hop_for_size(hop, size) == expected


# -- the tables: forged subscriptions, replays from elsewhere -----------------------------

@pytest.fixture
def subs(tmp_path: Path):
    db = CertDatabase(tmp_path / "certs.sqlite")
    yield SubscriptionTable(db)
    db.close()


def _subscription(n: int, source: str = "192.0.2.1", expires: float = 1e10):
    request = make_request("SUBSCRIBE", BOB, from_uri="sip:alice@example.com", to_uri=BOB,
                           call_id=f"c{n}", from_tag=f"f{n}",
                           extra_headers=[("Event", "certificate"),
                                          ("Contact", f"<sip:alice@{source}:5062>")])
    return open_dialog(request, local_tag=f"l{n}", peer=Peer(source, 5062), contact="sip:x:1",
                       event_id=None, expires=expires)


def test_the_same_dialog_from_another_source_is_taken(subs):
    """A SUBSCRIBE replayed from elsewhere names the same dialog: refused, and the
    subscription keeps its source and first hop."""
    subs.add(_subscription(1), SubscriptionLimits(), 0.0)
    with pytest.raises(SubscriptionTaken):
        subs.add(_subscription(1, source="198.51.100.7"), SubscriptionLimits(), 1.0)
    kept = subs.get("c1", "l1", "f1", "")
    assert kept.source == "192.0.2.1" and "192.0.2.1" in kept.next_hop
    assert subs.add(_subscription(1), SubscriptionLimits(), 2.0) == 2   # its own renewal


def test_unanswered_subscriptions_are_dropped_answered_ones_kept(subs):
    """Forged subscriptions (their NOTIFYs never answered) free their places once the
    NOTIFY's transaction is over; an answered one stays, also through a change."""
    limits = SubscriptionLimits(per_source=2)
    subs.add(_subscription(1), limits, 100.0)
    subs.add(_subscription(2), limits, 100.0)
    assert subs.confirm("c1", "l1", "f1") == 1
    assert subs.confirm("c1", "l1", "f1") == 0                 # once is enough
    assert subs.drop_unanswered(99.0, 10) == 0                 # still within its time
    subs.changed(BOB)
    assert subs.drop_unanswered(104.0, 10) == 1
    assert subs.count() == 1 and subs.get("c1", "l1", "f1", "") is not None
    [(claimed, _)] = subs.claim_due(200.0, 60, 10)             # the change still owed
    assert claimed.call_id == "c1"
    subs.add(_subscription(3), limits, 300.0)                  # the place is free again


def test_a_refresh_does_not_confirm(subs):
    """Whoever forged a SUBSCRIBE can forge its refresh (it can work out tm's To tag):
    only an answered NOTIFY takes a subscription off probation, and refreshes (in the
    dialog, or the initial SUBSCRIBE again) do not prolong it."""
    sub = _subscription(1)
    subs.add(sub, SubscriptionLimits(), 100.0)
    assert subs.refreshed(sub, 103.0) == 2
    assert subs.add(sub, SubscriptionLimits(), 103.5) == 3
    subs.changed(BOB)
    assert [cseq for _, cseq in subs.claim_due(103.8, 0, 10)] == [4]
    assert subs.drop_unanswered(101.0, 10) == 1        # still counted from 100.0


def test_an_answered_subscription_keeps_its_notify_clock(subs):
    """Off probation, every NOTIFY sets ``last_notify`` (the change interval)."""
    sub = _subscription(1)
    subs.add(sub, SubscriptionLimits(), 100.0)
    subs.confirm("c1", "l1", "f1")
    subs.refreshed(sub, 130.0)
    subs.changed(BOB)
    assert subs.claim_due(150.0, 60, 10) == []         # 20 s after the refresh's NOTIFY
    assert len(subs.claim_due(190.0, 60, 10)) == 1


def test_a_full_bound_makes_room_from_an_unanswered_subscription(subs):
    """At a full per-source bound, the oldest subscription whose NOTIFY went
    unanswered for a second gives its place; a younger one (its answer may be on the
    way) or an answered one does not."""
    limits = SubscriptionLimits(per_source=2)
    subs.add(_subscription(1), limits, 100.0)
    subs.add(_subscription(2), limits, 100.5)
    subs.confirm("c1", "l1", "f1")
    with pytest.raises(SubscriptionRefused):
        subs.add(_subscription(3), limits, 101.0)              # #2 only 0.5 s unanswered
    assert subs.add(_subscription(3), limits, 102.0) == 1      # #2 gives way
    assert subs.get("c2", "l2", "f2", "") is None
    assert subs.get("c1", "l1", "f1", "") is not None
    subs.confirm("c3", "l3", "f3")
    with pytest.raises(SubscriptionRefused):
        subs.add(_subscription(4), limits, 200.0)              # both answered: refused


# -- a large certificate is held until the subscriber answered at its address -----------

def test_a_held_fetch_is_released_into_its_final_notify(subs):
    """A UDP fetch whose NOTIFY would need TCP: kept (HELD, FETCH) until its small
    NOTIFY is answered; then it lapses at once, and its final NOTIFY (with the
    certificate) is for a confirmed subscriber: TCP is allowed."""
    subs.add(_subscription(1, expires=132.0), SubscriptionLimits(), 100.0, HELD | FETCH)
    assert subs.claim_lapsed(120.0, 10) == []
    assert subs.confirm("c1", "l1", "f1", now=101.0) == 1
    [claim] = subs.claim_lapsed(101.5, 10)
    assert claim.confirmed and claim[0].call_id == "c1" and claim[1] == 2


def test_a_held_subscription_is_owed_its_certificate_at_once(subs):
    """A subscription whose certificate was held: the 2xx makes it due now, whatever
    the notify interval; a renewal keeps an answered subscription answered."""
    sub = _subscription(1)
    subs.add(sub, SubscriptionLimits(), 100.0, HELD)
    assert subs.claim_due(100.5, 60, 10) == []
    subs.confirm("c1", "l1", "f1", now=100.6)
    [claim] = subs.claim_due(100.7, 60, 10)
    assert claim.confirmed and claim[1] == 2
    subs.add(sub, SubscriptionLimits(), 200.0)                 # the same dialog again
    assert subs.flags(sub) & UNCONFIRMED == 0
    subs.hold(sub)                                             # held again (a refresh)
    subs.confirm("c1", "l1", "f1", now=201.0)
    assert len(subs.claim_due(201.5, 60, 10)) == 1


@pytest.mark.parametrize("size, confirmed, held, transport", [
    (500, False, False, "udp"), (10_000, False, True, "udp"), (10_000, True, False, "tcp"),
])
def test_the_notify_plan(size, confirmed, held, transport):
    """cert_route's choice for one NOTIFY: small ones as they are; a large one to a
    subscriber that has not answered yet goes without body, ``pending``, over UDP; to
    one that has, over TCP with the certificate."""
    from kamailio_app.cert_route import CertService
    body = b"\x30" * size
    ruri, hop, headers, sent, was_held = CertService._plan(_subscription(1), 1, 600, body,
                                                           confirmed)
    assert was_held is held
    assert (sent == b"") is held and ("pending;expires=600" in headers) is held
    assert ("transport=tcp" in hop) is (transport == "tcp")
    assert ruri.startswith("sip:alice@")


def test_the_timer_serves_the_longest_waiting_first(subs):
    """Under a flood of due NOTIFYs (more than a tick's BATCH), the ones that waited
    longest go first: nobody is starved by rows the database happens to list first."""
    for n, last in ((1, 50.0), (2, 10.0), (3, 30.0)):
        sub = _subscription(n)
        subs.add(sub, SubscriptionLimits(), last)
        subs.confirm(f"c{n}", f"l{n}", f"f{n}")
    subs.changed(BOB)
    order = [subs.claim_due(200.0, 60, 1)[0][0].call_id for _ in range(3)]
    assert order == ["c2", "c3", "c1"]


@pytest.mark.parametrize("route, transport, refused", [
    ("<sip:192.0.2.1:5062;lr>", "udp", False),
    ("<sip:192.0.2.1:5062;transport=tcp;lr>", "udp", True),
    ("<sip:192.0.2.1:5062;transport=TLS;lr>", "udp", True),
    ("<sips:192.0.2.1:5061;lr>", "udp", True),
    ("<sip:192.0.2.1:5062;transport=tcp;lr>", "tcp", False),
    ("<sip:192.0.2.1:5062;lr>", "tcp", False),
])
def test_a_udp_subscriber_cannot_ask_for_a_connection(route, transport, refused):
    """A SUBSCRIBE over UDP (its source may be forged) whose Record-Route names that
    source but asks for TCP or TLS: the NOTIFY would make the proxy connect to it, and
    a connect that is never answered holds one of the proxy's connections: refused."""
    from e2m_plugins.errors import PolicyError
    request = make_request("SUBSCRIBE", BOB, from_uri="sip:alice@example.com", to_uri=BOB,
                           from_tag="f1", extra_headers=[
                               ("Event", "certificate"), ("Record-Route", route),
                               ("Contact", "<sip:alice@192.0.2.1:5062>")])
    def opened():
        return open_dialog(request, local_tag="l1", peer=Peer("192.0.2.1", 5062, transport),
                           contact="sip:x:1", event_id=None, expires=1e10)
    if refused:
        with pytest.raises(PolicyError):
            opened()
    else:
        assert opened().next_hop == route[1:-1]
