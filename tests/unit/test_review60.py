"""A sixtieth attacker's review (December 2026) of 8360976: the home proxy's older
services, fresh eyes -- the RFC 6072 certificate service against revocation (the core's
decisions here; the same on a real Kamailio: tests/kamailio/test_review60_wire.py).

Hole 1 -- a refresh keeps a revoked certificate in the directory
    Attacker: an **insider UA** -- bob himself after his certificate was revoked for
    cause, or whoever stole bob's private key together with his password (the very
    case revocation is for).  ``docs/protocol.md`` §11.2 says the proxy checks a
    certificate before it stores it: "a path to ``[trust] ca`` (and its CRLs)".
    Messages: bob's initial PUBLISH of his certificate (200, an entity-tag); the CA
    revokes it and the operator adds the CRL to ``[trust] crls``; then
    ``PUBLISH sip:bob@example.com`` with ``SIP-If-Match: <etag>``, ``Expires: 3600``
    and no body, every hour.
    Effect: each refresh is 200 with a new entity-tag: ``certservice.publish`` stores
    ``current.der`` again (``_store(..., "refreshed")``) without checking it against
    the anchors and their CRLs, while the same certificate sent as a body is 403
    "certificate refused".  The revoked certificate stays in the directory until its
    notAfter, and every subscriber that fetches bob's AoR is handed a key its owner
    no longer controls (a body encrypted to it is read by the key's thief).
    At fault: ``e2m_plugins/certservice.py`` ``publish``, the ``if not body:`` branch
    (and ``subscribe``, which hands out ``current.der`` unchecked).
    Fix: on a refresh, run ``check_published_certificate(current.der, aor, anchors,
    now)`` as for a body, and on refusal remove the publication (403 with the
    Warning); the wire side (served after a restart with the CRL) in the wire module.

What held (tried here):
- an initial PUBLISH (and a modification with SIP-If-Match) of the revoked certificate
  as a body: 403 "certificate refused" (``test_control_*``);
- a refresh cannot extend a publication past the certificate's notAfter (``_store``
  caps the grant), nor revive a lapsed entity-tag (412).

Fixed (stop 31): a stored publication is served only while it still passes the
checks it was published under, against the anchors and CRLs loaded now
(``certservice.served_certificate``: a fetch's body and every NOTIFY the timer sends,
so followers get an empty NOTIFY and drop it); a bodiless refresh re-checks it too,
and one that fails is 403 with the Warning and removes the publication (its
entity-tag then gets 412).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_plugins import certservice as cs
from e2m_plugins.certpath import TrustAnchors
from e2m_plugins.sip import make_request
from e2m_plugins.testpki import TestPKI, issue_user

BOB = "sip:bob@example.com"


def revocation_list(pki: TestPKI, revoked: list[x509.Certificate]
                    ) -> x509.CertificateRevocationList:
    """A current CRL of the test CA listing ``revoked``."""
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(pki.ca.cert.subject)
               .last_update(now - timedelta(hours=1))
               .next_update(now + timedelta(days=7)))
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
            .revocation_date(now - timedelta(minutes=30)).build())
    return builder.sign(pki.ca.key, hashes.SHA256())


def _publish(body: bytes | None, *, etag: str | None = None, expires: int = 3600):
    headers = [("Event", "certificate"), ("Expires", str(expires))]
    if etag:
        headers.append(("SIP-If-Match", etag))
    return make_request("PUBLISH", BOB, from_uri=BOB, to_uri=BOB, extra_headers=headers,
                        body=body or b"", content_type=cs.CONTENT_TYPE if body else None)


def _decide(store, request, anchors):
    # cert_route's owner: the authenticated user at the Request-URI's host
    return cs.publish(request, authenticated=BOB, store=store, anchors=anchors,
                      now=time.time())


@pytest.fixture(scope="module")
def bob_and_crl(pki: TestPKI):
    """A certificate of bob's of its own (the session's is shared), the anchors
    before its revocation and after (the CRL in ``[trust] crls``)."""
    bob = issue_user(pki.ca, BOB, "ec")
    der = bob.cert.public_bytes(Encoding.DER)
    before = TrustAnchors([pki.ca.cert])
    after = TrustAnchors([pki.ca.cert], crls=[revocation_list(pki, [bob.cert])])
    return der, before, after


def _published(der, before):
    store = cs.MemoryPublicationStore()
    answer = _decide(store, _publish(der), before)
    assert answer.code == 200, answer
    etag = dict(answer.headers)["SIP-ETag"]
    return store, etag


def test_control_a_revoked_certificate_sent_as_a_body_is_refused(bob_and_crl):
    """The set-up is sound: bob's certificate publishes before its revocation; once the
    CRL is among the anchors, the same certificate as a body (initial PUBLISH, or a
    modification under the live entity-tag) is 403 'certificate refused', and a refresh
    under the old anchors is 200 (the refresh itself is well formed)."""
    der, before, after = bob_and_crl
    assert _decide(cs.MemoryPublicationStore(), _publish(der), after).code == 403
    store, etag = _published(der, before)
    modified = _decide(store, _publish(der, etag=etag), after)
    assert modified.code == 403, modified
    assert "revoked" in modified.detail, modified.detail
    store, etag = _published(der, before)
    assert _decide(store, _publish(None, etag=etag), before).code == 200


def test_hole_a_refresh_keeps_a_revoked_certificate_published(bob_and_crl):
    der, before, after = bob_and_crl
    store, etag = _published(der, before)
    # the CA revokes bob's certificate; the operator adds the CRL ([trust] crls)
    answer = _decide(store, _publish(None, etag=etag), after)
    served = _fetch(store, after)
    assert answer.code != 200 and served.body != der, (answer, len(served.body or b""))


def _fetch(store, anchors) -> cs.Answer:
    """alice's fetch of bob's certificate (Expires: 0)."""
    return cs.subscribe(make_request("SUBSCRIBE", BOB, from_uri="sip:alice@example.com",
                                     to_uri=BOB,
                                     extra_headers=[("Event", "certificate"),
                                                    ("Expires", "0"),
                                                    ("Contact", "<sip:a@127.0.0.1>")]),
                        store=store, anchors=anchors, now=time.time())


def test_a_revoked_publication_is_neither_served_nor_refreshed(bob_and_crl):
    """The fix, in full: once the CRL is among the anchors, a fetch gets no
    certificate (without any refresh: the stored publication is checked when served),
    and the refresh is 403 and removes the publication, so the entity-tag is gone
    (412 after).  Under the old anchors the same publication is served."""
    der, before, after = bob_and_crl
    store, etag = _published(der, before)
    assert _fetch(store, before).body == der
    assert _fetch(store, after).body == b""
    assert cs.served_certificate(store, BOB, after, time.time()) == b""
    refused = _decide(store, _publish(None, etag=etag), after)
    assert refused.code == 403 and "revoked" in refused.detail, refused
    assert store.current(BOB) is None
    assert _decide(store, _publish(None, etag=etag), before).code == 412
