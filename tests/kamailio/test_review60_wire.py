"""A sixtieth attacker's review (December 2026) of 8360976: the home proxy's older
services, fresh eyes -- the RFC 6072 certificate service on a real Kamailio, against
a certificate revoked after it was published (the core's decision:
tests/unit/test_review60.py).

The set-up, as an operator does it: the home proxy with ``[auth]`` and ``[certs]``
runs; bob PUBLISHes his certificate (200); later the CA revokes it (bob's key was
stolen, or bob left), and the operator puts the CRL in ``[trust] crls`` and restarts
the proxy -- the one way a CRL reaches it.  The certificate tables (``[certs] path``)
outlive the restart, as ``docs/protocol.md`` §11.2 wants for subscriptions.

Hole 1 -- the revoked certificate is still served after the restart
    Attacker: the **insider UA** who holds bob's stolen private key (or an off-path
    sender who has it: a fetch needs no credentials, but the harm is to the fetchers).
    Messages: none of his own is needed; alice sends ``SUBSCRIBE sip:bob@example.com``
    ``Event: certificate`` ``Expires: 0`` after the restart.
    Effect: the NOTIFY carries bob's revoked certificate, byte for byte.  Nothing in
    the proxy looks at a stored publication again: not at start, not on a fetch
    (``certservice.subscribe`` hands out ``current.der`` when its ``expires`` is
    ahead).  A subscriber that has no CRL (the phones' ``[trust] crls`` is optional)
    encrypts to a key its owner no longer controls, up to ``max_publish_expires``.
    At fault: ``e2m_plugins/certservice.py`` ``subscribe`` (``body = current.der if
    ... current.expires > now``) and ``kamailio_app/cert_route.py`` ``_body`` (the
    timer's NOTIFYs): the publication is trusted as it was when stored.
    Fix: check ``current.der`` against the anchors (and their CRLs) before serving it
    (``cert_route`` has them: ``self.anchors``), or sweep the publications against the
    anchors at start and drop (and tell the followers of) any that no longer check.

Hole 2 -- a refresh keeps it there until its notAfter
    Attacker: the **insider UA** (bob, or the thief with his key and password).
    Messages: ``PUBLISH sip:bob@example.com`` with digest as bob, ``SIP-If-Match``
    of his last entity-tag, ``Expires: 3600``, no body.
    Effect: 200 with a new entity-tag after the restart with the CRL, while the same
    certificate as a body is 403 "certificate refused" (the control).
    At fault: ``certservice.publish``, the ``if not body:`` branch (``_store`` of
    ``current.der`` with no check).  Fix: as in the unit module.

What held (tried here):
- bob's initial PUBLISH (and a replacement) of the revoked certificate as a body after
  the restart: 403 with ``Warning: 399 - "certificate refused"``, nothing changed;
- a fetch of a certificate that is not revoked after the restart: served (the tables
  outlive the restart as documented);
- alice refreshing bob's publication with his entity-tag under her own credentials:
  403 (``auth_check`` holds To/From to the digest user, the service the Request-URI).

Fixed (stop 31): a stored publication is served only while it still passes the
checks it was published under, against the anchors and CRLs loaded now
(``certservice.served_certificate``: a fetch's body and every NOTIFY the timer sends,
so followers get an empty NOTIFY and drop it); a bodiless refresh re-checks it too,
and one that fails is 403 with the Warning and removes the publication (its
entity-tag then gets 412).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.certclient import CertClient
from e2m_lab.kamailio_harness import ProxyHandle, start_proxy, write_proxy_config
from e2m_plugins.testpki import TestPKI, issue_user

from tests.unit.test_review60 import revocation_list

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
BOB = "sip:bob@example.com"
CERTS = {"notify_interval": 2, "min_expires": 2}
_sources = iter(range(60, 250))


def _source() -> str:
    return f"127.0.60.{next(_sources)}"


class Revoked:
    """The home proxy after the restart with the CRL: bob's entity-tag from before,
    his revoked certificate, and carol's one that was not revoked."""

    def __init__(self, proxy: ProxyHandle, etag: str, bob_der: bytes,
                 alice_der: bytes) -> None:
        self.proxy, self.etag, self.bob_der, self.alice_der = proxy, etag, bob_der, alice_der

    def client(self, user: str, password: bool = True) -> CertClient:
        return CertClient(self.proxy.port, user,
                          password=USERS[user] if password else None, source=_source())


def _fetch(client: CertClient, aor: str) -> bytes:
    before = len(client.notifies)
    answer, _ = client.subscribe(aor, 0)
    assert answer is not None and answer.status == 200, answer
    notifies = client.wait_notifies(before + 1)
    assert len(notifies) == before + 1, "no NOTIFY after a fetch"
    return notifies[-1].body


@pytest.fixture(scope="module")
def revoked(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Revoked]:
    directory = tmp_path_factory.mktemp("review60-home")
    proxy = start_proxy(directory, pki=pki, e2m=True, auth=True, users=USERS,
                        extra={"certs": dict(CERTS)})
    try:
        bob_cert = issue_user(pki.ca, BOB, "ec")
        alice_cert = issue_user(pki.ca, "sip:alice@example.com", "ec")
        bob_der = bob_cert.cert.public_bytes(Encoding.DER)
        alice_der = alice_cert.cert.public_bytes(Encoding.DER)
        etags = {}
        for user, body in (("bob", bob_der), ("alice", alice_der)):
            client = CertClient(proxy.port, user, password=USERS[user], source=_source())
            try:
                answer = client.publish(body, expires=3600)
                assert answer is not None and answer.status == 200, answer
                etags[user] = answer.get("SIP-ETag")
            finally:
                client.close()
        # the CA revokes bob's certificate; the operator adds its CRL and restarts
        crl = directory / "revoked.crl"
        crl.write_bytes(revocation_list(pki, [bob_cert.cert]).public_bytes(Encoding.PEM))
        proxy.stop()
        write_proxy_config(directory, proxy.port, pki=pki, e2m=True, auth=True,
                           users=USERS, extra={"certs": dict(CERTS),
                                               "trust": {"crls": [str(crl)]}})
        assert "crls" in (directory / "PROXY.toml").read_text()
        assert proxy.start(), proxy.log_since(0)[-2000:]
        yield Revoked(proxy, etags["bob"], bob_der, alice_der)
    finally:
        proxy.stop()


def _stored(proxy: ProxyHandle) -> bytes | None:
    with sqlite3.connect(Path(proxy.directory) / "certs.sqlite") as db:
        row = db.execute("SELECT der FROM cert_publications WHERE aor = ?", (BOB,)).fetchone()
    return bytes(row[0]) if row else None


def test_control_the_restarted_proxy_knows_the_revocation(revoked: Revoked):
    """The CRL is in force after the restart: bob's revoked certificate sent as a body
    (a replacement of his publication) is 403 'certificate refused'; alice's
    certificate (not revoked) is still served, so the tables outlived the restart."""
    bob = revoked.client("bob")
    alice = revoked.client("alice", password=False)
    try:
        answer = bob.publish(revoked.bob_der, expires=3600)
        assert answer is not None and answer.status == 403, answer
        assert "certificate refused" in (answer.get("Warning") or ""), answer
        assert "revoked" in revoked.proxy.log_since(0)
        assert _fetch(alice, "sip:alice@example.com") == revoked.alice_der
    finally:
        bob.close()
        alice.close()


def test_hole_a_revoked_certificate_is_served_after_the_restart_with_its_crl(revoked):
    alice = revoked.client("alice", password=False)
    try:
        served = _fetch(alice, BOB)
    finally:
        alice.close()
    assert served != revoked.bob_der, "the revoked certificate was served"


def test_hole_a_refresh_of_a_revoked_certificate_is_taken(revoked):
    bob = revoked.client("bob")
    try:
        answer = bob.publish(None, etag=revoked.etag, expires=3600)
    finally:
        bob.close()
    assert answer is not None
    if answer.status == 200:          # the next test run needs the new entity-tag
        revoked.etag = answer.get("SIP-ETag") or revoked.etag
    assert answer.status != 200 or _stored(revoked.proxy) != revoked.bob_der, answer


def test_control_alice_cannot_refresh_bobs_publication(revoked):
    """The refresh is bob's alone: alice, authenticated as herself, with bob's
    entity-tag on bob's AoR (From/To hers, or bob's) is refused."""
    alice = revoked.client("alice")
    try:
        for to in (None, "sip:alice@example.com"):
            answer = alice.publish(None, aor=BOB, to=to, etag=revoked.etag, expires=3600)
            assert answer is not None and answer.status == 403, (to, answer)
    finally:
        alice.close()
