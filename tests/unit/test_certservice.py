"""The RFC 6072 certificate service (e2m_plugins.certservice) and the UA's use of it.

PUBLISH follows RFC 3903 (entity-tags, refresh, modify, remove, 412, 423, 489); only the
owner of an AoR publishes there, and only a certificate that is that AoR's. SUBSCRIBE
fetches (Expires: 0) or follows. The UA keeps what the service gives as it keeps a
[peers] entry, bounded and for the subscription's time; [peers] wins.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization

from e2m_lab.flows import message, ua_engine
from e2m_plugins import certservice as cs
from e2m_plugins.errors import CertificateRejectedError
from e2m_plugins.sip import RequestLine, make_request
from e2m_plugins.testpki import init_test_pki, issue_user
from e2m_plugins.ua import MAX_SERVICE_PEERS, MissingPeerCertificateError, UAEngine

DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"))


def _der(cred) -> bytes:
    return cred.cert.public_bytes(DER)


def _publish(world, body: bytes | None, *, aor="bob", expires=None, etag=None,
             event="certificate", ctype=cs.CONTENT_TYPE):
    headers = [("Event", event)] if event else []
    if expires is not None:
        headers.append(("Expires", str(expires)))
    if etag is not None:
        headers.append(("SIP-If-Match", etag))
    if body:
        headers.append(("Content-Disposition", "signal"))
    return make_request("PUBLISH", world.aor(aor), from_uri=world.aor(aor), to_uri=world.aor(aor),
                        extra_headers=headers, body=body or b"",
                        content_type=ctype if body else None)


def _subscribe(world, aor="bob", expires=None, accept=None, event="certificate"):
    headers = [("Event", event)]
    if expires is not None:
        headers.append(("Expires", str(expires)))
    if accept:
        headers.append(("Accept", accept))
    return make_request("SUBSCRIBE", world.aor(aor), from_uri=world.aor("alice"),
                        to_uri=world.aor(aor), extra_headers=headers)


def _run(world, store, msg, who="bob", now=None):
    return cs.publish(msg, authenticated=world.aor(who) if who else None, store=store,
                      anchors=[world.ca.cert], now=now or time.time())


def test_publish_refresh_modify_remove(world):
    store = cs.MemoryPublicationStore()
    first = _run(world, store, _publish(world, _der(world.user("bob"))))
    assert (first.code, first.changed) == (200, "published")
    etag = dict(first.headers)["SIP-ETag"]
    assert store.current(world.aor("bob")).der == _der(world.user("bob"))

    refreshed = _run(world, store, _publish(world, None, etag=etag, expires=600))
    assert (refreshed.code, refreshed.changed, refreshed.expires) == (200, "refreshed", 600)
    new_etag = dict(refreshed.headers)["SIP-ETag"]
    assert new_etag != etag                              # RFC 3903: a new tag each time
    assert _run(world, store, _publish(world, None, etag=etag)).code == 412   # the old one

    new_key = issue_user(world.ca, world.aor("bob"), "ec")
    modified = _run(world, store, _publish(world, _der(new_key), etag=new_etag))
    assert (modified.code, modified.changed) == (200, "replaced")
    assert store.current(world.aor("bob")).der == _der(new_key)

    removed = _run(world, store, _publish(world, None, etag=dict(modified.headers)["SIP-ETag"],
                                          expires=0))
    assert (removed.code, removed.changed) == (200, "removed")
    assert store.current(world.aor("bob")) is None


def test_only_the_owner_publishes_and_only_its_own_certificate(world):
    store = cs.MemoryPublicationStore()
    unauthenticated = _run(world, store, _publish(world, _der(world.user("bob"))), who=None)
    assert unauthenticated.code == 403 and "[auth]" in unauthenticated.detail
    as_someone_else = _run(world, store, _publish(world, _der(world.user("bob"))), who="carol")
    assert as_someone_else.code == 403
    carols = _run(world, store, _publish(world, _der(world.user("carol"))))   # SAN names carol
    assert carols.code == 403 and "not for sip:bob" in carols.detail
    assert _run(world, store, _publish(world, _der(world.ca))).code == 403     # a CA
    expired = issue_user(world.ca, world.aor("bob"), "ec",
                         not_before=datetime.now(timezone.utc) - timedelta(days=20),
                         not_after=datetime.now(timezone.utc) - timedelta(days=1))
    assert _run(world, store, _publish(world, _der(expired))).code == 403
    garbage = _run(world, store, _publish(world, b"\x30\x03\x02\x01\x00"))
    assert garbage.code == 403 and "DER" in garbage.detail
    assert store.current(world.aor("bob")) is None


def test_rfc3903_answers(world):
    store = cs.MemoryPublicationStore()
    assert _run(world, store, _publish(world, _der(world.user("bob")), event="presence")).code == 489
    assert _run(world, store, _publish(world, _der(world.user("bob")), event=None)).code == 489
    brief = _run(world, store, _publish(world, _der(world.user("bob")), expires=10))
    assert brief.code == 423 and dict(brief.headers)["Min-Expires"] == "60"
    assert _run(world, store, _publish(world, None)).code == 400        # initial without a body
    assert _run(world, store, _publish(world, None, etag="nope")).code == 412
    pem = _run(world, store, _publish(world, _der(world.user("bob")), ctype="text/plain"))
    assert pem.code == 415 and dict(pem.headers)["Accept"] == cs.CONTENT_TYPE


def test_a_publication_lives_no_longer_than_its_certificate(world):
    store = cs.MemoryPublicationStore()
    short = issue_user(world.ca, world.aor("bob"), "ec",
                       not_after=datetime.now(timezone.utc) + timedelta(hours=1))
    answer = _run(world, store, _publish(world, _der(short), expires=86400))
    assert answer.code == 200 and answer.expires <= 3600


def _answer_subscribe(world, message, **kwargs) -> cs.Answer:
    """The service's answer, with the test CA as its anchor."""
    return cs.subscribe(message, anchors=[world.ca.cert], **kwargs)

def test_subscribe_fetches_and_follows(world):
    store = cs.MemoryPublicationStore()
    nothing = _answer_subscribe(world, _subscribe(world, expires=0), store=store, now=time.time())
    assert (nothing.code, nothing.body, nothing.expires) == (200, b"", 0)
    _run(world, store, _publish(world, _der(world.user("bob"))))
    fetched = _answer_subscribe(world, _subscribe(world, expires=0), store=store, now=time.time())
    assert fetched.body == _der(world.user("bob"))
    followed = _answer_subscribe(world, _subscribe(world, expires=10 ** 9), store=store, now=time.time())
    assert followed.expires == cs.ServiceSettings().max_subscribe_expires
    assert _answer_subscribe(world, _subscribe(world, expires=5), store=store, now=time.time()).code == 423
    assert _answer_subscribe(world, _subscribe(world, event="presence"), store=store, now=time.time()).code == 489
    assert _answer_subscribe(world, _subscribe(world, accept="application/pidf+xml"),
                             store=store, now=time.time()).code == 406
    lapsed = _answer_subscribe(world, _subscribe(world, expires=0), store=store, now=time.time() + 10 ** 7)
    assert lapsed.body == b""                         # a lapsed publication is not served
    assert cs.notify_headers(0, False) == [("Event", "certificate"),
                                           ("Subscription-State", "terminated;reason=timeout")]


# -- the UA --------------------------------------------------------------------------

def _notify(world, sender: str, body: bytes = b""):
    return make_request("NOTIFY", world.aor("alice"), from_uri=world.aor(sender),
                        to_uri=world.aor("alice"), extra_headers=[("Event", "certificate")],
                        body=body, content_type=cs.CONTENT_TYPE if body else None)


def test_the_ua_wants_fetches_and_uses_a_service_certificate(world):
    alice = ua_engine(world, "alice", peers=())             # no [peers]
    with pytest.raises(MissingPeerCertificateError):
        alice.protect(message(world))
    assert alice.peer_certificates_wanted() == [world.aor("bob")]
    alice.accept_certificate_notify(_notify(world, "bob", _der(world.user("bob"))),
                                    world.aor("bob"), expires_in=3600)
    assert alice.peer_certificates_wanted() == []
    assert alice.protect(message(world)).info.encrypted
    alice.accept_certificate_notify(_notify(world, "bob"), world.aor("bob"), expires_in=3600)
    with pytest.raises(MissingPeerCertificateError):   # removed: fails closed
        alice.protect(message(world))


def test_the_ua_refuses_what_is_not_the_subscribed_peers(world):
    alice = ua_engine(world, "alice", peers=())
    with pytest.raises(CertificateRejectedError):      # a NOTIFY from someone else
        alice.accept_certificate_notify(_notify(world, "carol", _der(world.user("carol"))),
                                        world.aor("bob"), expires_in=3600)
    with pytest.raises(CertificateRejectedError) as caught:   # bob's NOTIFY, carol's cert
        alice.accept_certificate_notify(_notify(world, "bob", _der(world.user("carol"))),
                                        world.aor("bob"), expires_in=3600)
    assert "sip:bob@" in str(caught.value)              # names the AoR and the check
    assert alice.certs.user(world.aor("bob")) is None


def test_a_configured_peer_wins_and_service_certificates_lapse(world):
    clock = [1_000_000.0]
    alice = UAEngine(ua_engine(world, "alice").config, clock=lambda: clock[0],
                     now=lambda: datetime.now(timezone.utc))
    other = issue_user(world.ca, world.aor("bob"), "ec")
    with pytest.raises(CertificateRejectedError):
        alice.add_peer_certificate(world.aor("bob"), _der(other), expires_in=60)
    assert alice.drop_peer_certificate(world.aor("bob")) is False
    assert alice.certs.user(world.aor("bob")) == world.user("bob").cert

    carol = UAEngine(ua_engine(world, "carol", peers=()).config, clock=lambda: clock[0],
                     now=lambda: datetime.now(timezone.utc))
    carol.add_peer_certificate(world.aor("bob"), _der(world.user("bob")), expires_in=60)
    assert carol.protect(message(world, sender="carol")).info.encrypted
    clock[0] += 61
    with pytest.raises(MissingPeerCertificateError):
        carol.protect(message(world, sender="carol"))


def test_service_certificates_are_bounded(world):
    alice = ua_engine(world, "alice", peers=())
    bob = _der(world.user("bob"))
    alice.add_peer_certificate(world.aor("bob"), bob, expires_in=3600)
    for index in range(MAX_SERVICE_PEERS):
        cred = issue_user(world.ca, f"sip:u{index}@example.com", "ec")
        alice.add_peer_certificate(f"sip:u{index}@example.com", _der(cred), expires_in=3600)
    assert alice.certs.user(world.aor("bob")) is None           # the oldest went
    assert len(alice._service_peers) == MAX_SERVICE_PEERS


def test_a_lapsed_publication_has_no_entity_tag_left(world):
    """RFC 3903 §4.4: once a publication expired its entity-tag is unknown (412), even
    before the proxy's sweep removed the row; a fresh PUBLISH starts over."""
    store = cs.MemoryPublicationStore()
    now = time.time()
    first = _run(world, store, _publish(world, _der(world.user("bob")), expires=60), now=now)
    etag = dict(first.headers)["SIP-ETag"]
    later = now + 61
    assert _run(world, store, _publish(world, None, etag=etag), now=later).code == 412
    again = _run(world, store, _publish(world, _der(world.user("bob"))), now=later)
    assert (again.code, again.changed) == (200, "published")


def test_a_refresh_inside_the_dialog_names_its_resource(world):
    """A refreshing SUBSCRIBE goes to the notifier's Contact; the adapter passes the
    subscription's AoR."""
    store = cs.MemoryPublicationStore()
    _run(world, store, _publish(world, _der(world.user("bob"))))
    refresh = _subscribe(world, expires=600).with_start_line(
        RequestLine("SUBSCRIBE", "sip:198.51.100.1:5070"))
    assert _answer_subscribe(world, refresh, store=store, now=time.time()).code == 400
    answer = _answer_subscribe(world, refresh, store=store, now=time.time(), aor=world.aor("bob"))
    assert (answer.code, answer.expires, answer.body) == (200, 600, _der(world.user("bob")))


def test_notify_headers_repeat_the_event_id():
    assert cs.notify_headers(30, True, "7") == [
        ("Event", "certificate;id=7"), ("Subscription-State", "active;expires=30"),
        ("Content-Type", "application/pkix-cert")]
