"""The certificate service of RFC 6072 at a home proxy, without any I/O.

A phone PUBLISHes its own certificate to its AoR (``Event: certificate``, body
``application/pkix-cert``, RFC 3903 rules); anyone SUBSCRIBEs to an AoR to fetch
it (``Expires: 0``) or to follow it.  This module decides what each request gets
and what is stored; the adapter (Kamailio) authenticates, keeps the table and the
subscriptions, and sends the answers and NOTIFYs.

Where we differ from RFC 6072 / RFC 3903 (docs/protocol.md §11):

- one certificate per AoR: a new initial PUBLISH replaces the one there, and its
  old entity-tag stops matching (RFC 3903 would keep both publications);
- the certificate is checked before it is stored (RFC 6072 leaves that to the
  subscriber): a user certificate of our CA whose SAN URI is the AoR, not a CA,
  valid now, a key one can encrypt to.  A subscriber still checks it itself;
- a publication lives at most until its certificate's notAfter.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .certfiles import readable_certificate
from .certstore import check_not_a_ca, check_user_certificate
from .errors import CertificateRejectedError, E2MError, LimitExceededError
from .grammar import parse_params
from .sip import SipMessage
from .uri import aor_of

__all__ = [
    "EVENT",
    "CONTENT_TYPE",
    "Publication",
    "PublicationStore",
    "MemoryPublicationStore",
    "ServiceSettings",
    "Answer",
    "publish",
    "subscribe",
    "check_published_certificate",
    "served_certificate",
    "notify_headers",
    "event_id",
]

EVENT = "certificate"
CONTENT_TYPE = "application/pkix-cert"
MAX_CERTIFICATE_BYTES = 16 * 1024


@dataclass(frozen=True)
class Publication:
    """One AoR's current certificate, as the service keeps it (no private data)."""

    aor: str
    der: bytes
    fingerprint: str              # "sha256:<hex>"
    not_before: float             # epoch seconds
    not_after: float
    etag: str
    expires: float                # epoch seconds: when the publication lapses
    published_by: str             # the authenticated user who published it
    published_at: float


class PublicationStore(Protocol):
    """Where publications live (SQLite or PostgreSQL in the proxy; memory in tests).
    ``save`` replaces any publication of the same AoR."""

    def current(self, aor: str) -> Publication | None: ...
    def save(self, publication: Publication) -> None: ...
    def remove(self, aor: str) -> bool: ...


class MemoryPublicationStore:
    """A dict, for tests and for a proxy without a database."""

    def __init__(self) -> None:
        self._by_aor: dict[str, Publication] = {}

    def current(self, aor: str) -> Publication | None:
        return self._by_aor.get(aor)

    def save(self, publication: Publication) -> None:
        self._by_aor[publication.aor] = publication

    def remove(self, aor: str) -> bool:
        return self._by_aor.pop(aor, None) is not None


@dataclass(frozen=True)
class ServiceSettings:
    """Expiry bounds (seconds) for publications and subscriptions."""

    min_expires: int = 60
    default_publish_expires: int = 3600
    max_publish_expires: int = 7 * 86400
    default_subscribe_expires: int = 86400
    max_subscribe_expires: int = 86400


@dataclass(frozen=True)
class Answer:
    """What the adapter sends back, and what changed.

    ``changed`` is "published", "replaced", "refreshed" or "removed" (subscribers
    of ``aor`` get a NOTIFY for all but "refreshed"), or None.  ``body`` is the
    NOTIFY body a SUBSCRIBE gets (the DER, or empty when there is no certificate);
    ``expires`` the granted time (0 for a one-shot fetch).
    """

    code: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()
    aor: str | None = None
    changed: str | None = None
    body: bytes | None = None
    expires: int = 0
    detail: str = ""              # for the log: which check failed (never a body)


def _event_ok(message: SipMessage) -> bool:
    value = message.get("Event")
    return value is not None and value.partition(";")[0].strip().lower() == EVENT


def _bad_event() -> Answer:
    return Answer(489, "Bad Event", (("Allow-Events", EVENT),), detail="Event is not certificate")


def _expires(message: SipMessage, default: int,
             settings: ServiceSettings = ServiceSettings()) -> int | Answer:
    """The Expires header (``default`` when absent), or the answer to a bad one:
    400 when unreadable, 423 when shorter than ``min_expires`` but not 0."""
    value = (message.get("Expires") or str(default)).strip()
    if not value.isdigit() or len(value) > 10:
        return Answer(400, "Bad Request", detail="unreadable Expires")
    requested = int(value)
    if 0 < requested < settings.min_expires:
        return Answer(423, "Interval Too Brief", (("Min-Expires", str(settings.min_expires)),),
                      detail=f"Expires {requested}")
    return requested


def _target(message: SipMessage) -> str | None:
    """The AoR a PUBLISH or SUBSCRIBE is about: its Request-URI (RFC 3903 §4)."""
    try:
        return str(aor_of(message.request_uri or ""))
    except E2MError:
        return None


def check_published_certificate(der: bytes, aor: str, anchors: Sequence[x509.Certificate],
                                at: datetime) -> x509.Certificate:
    """The certificate a user may publish for ``aor``: readable DER of at most 16 KiB,
    not a CA, within its validity, SAN URI equal to ``aor``, chaining to ``anchors``
    and a key one can encrypt to.  ``CertificateRejectedError`` naming the check."""
    if len(der) > MAX_CERTIFICATE_BYTES:
        raise CertificateRejectedError(f"certificate of {len(der)} bytes is too large")
    try:
        # counted before cryptography reads it, as every certificate from the wire is
        # (review 106: a SAN of 5,324 names was built before its bound refused it)
        cert = readable_certificate(der)
    except LimitExceededError as exc:
        raise CertificateRejectedError(f"certificate refused: {exc}") from None
    if cert is None:
        raise CertificateRejectedError("not a DER certificate")
    check_not_a_ca(cert)
    check_user_certificate(cert, aor, anchors, at)
    return cert


def _new_etag() -> str:
    return secrets.token_urlsafe(12)


def publish(message: SipMessage, *, authenticated: str | None, store: PublicationStore,
            anchors: Sequence[x509.Certificate], now: float,
            settings: ServiceSettings = ServiceSettings()) -> Answer:
    """Decide a PUBLISH of ``Event: certificate``.

    ``authenticated`` is the AoR the proxy's digest authentication proved (None
    without it): only the owner of the Request-URI's AoR may publish there.
    """
    if not _event_ok(message):
        return _bad_event()
    aor = _target(message)
    if aor is None:
        return Answer(400, "Bad Request", detail="Request-URI is not an AoR")
    if authenticated is None:
        return Answer(403, "Forbidden", aor=aor,
                      detail="PUBLISH needs digest authentication ([auth] in PROXY.toml)")
    try:
        owner = str(aor_of(authenticated))
    except E2MError:
        owner = None
    if owner != aor:
        return Answer(403, "Forbidden", aor=aor,
                      detail=f"{authenticated} may not publish for {aor}")
    requested = _expires(message, settings.default_publish_expires, settings)
    if isinstance(requested, Answer):
        return replace(requested, aor=aor)
    body = message.body or b""
    match = message.get("SIP-If-Match")
    current = store.current(aor)
    if current is not None and current.expires <= now:
        current = None               # lapsed: its entity-tag is no longer valid (412)
    if match is not None and (current is None or match.strip() != current.etag):
        return Answer(412, "Conditional Request Failed", aor=aor, detail="unknown entity-tag")

    if requested == 0:                                     # removal (RFC 3903 §4.5)
        if match is None or body:
            return Answer(400, "Bad Request", aor=aor,
                          detail="a removal needs SIP-If-Match and no body")
        store.remove(aor)
        return Answer(200, "OK", (("Expires", "0"),), aor=aor, changed="removed")

    if not body:
        if match is None:
            return Answer(400, "Bad Request", aor=aor, detail="an initial PUBLISH needs a body")
        assert current is not None
        try:    # revoked or its CA dropped since it was published: no more time for it
            check_published_certificate(current.der, aor, anchors,
                                        datetime.fromtimestamp(now, timezone.utc))
        except CertificateRejectedError as exc:
            store.remove(aor)
            return Answer(403, "Forbidden", (("Warning", '399 - "certificate refused"'),),
                          aor=aor, detail=f"the published certificate: {exc}",
                          changed="removed")
        return _store(store, current.der, current.not_before, current.not_after, aor, owner,
                      requested, now, settings, "refreshed")

    ctype = (message.get("Content-Type") or "").partition(";")[0].strip().lower()
    if ctype != CONTENT_TYPE:
        return Answer(415, "Unsupported Media Type", (("Accept", CONTENT_TYPE),), aor=aor,
                      detail=f"Content-Type {ctype or 'missing'}")
    disposition = message.get("Content-Disposition")
    if disposition is not None and disposition.partition(";")[0].strip().lower() != "signal":
        return Answer(415, "Unsupported Media Type", (("Accept", CONTENT_TYPE),), aor=aor,
                      detail="Content-Disposition other than signal")
    try:
        cert = check_published_certificate(body, aor, anchors,
                                           datetime.fromtimestamp(now, timezone.utc))
    except CertificateRejectedError as exc:
        return Answer(403, "Forbidden", (("Warning", '399 - "certificate refused"'),), aor=aor,
                      detail=str(exc))
    der = cert.public_bytes(serialization.Encoding.DER)
    changed = "published" if current is None else "replaced"
    if current is not None and current.der == der:
        changed = "refreshed"
    return _store(store, der, cert.not_valid_before_utc.timestamp(),
                  cert.not_valid_after_utc.timestamp(), aor, owner, requested, now, settings,
                  changed)


def _store(store: PublicationStore, der: bytes, not_before: float, not_after: float, aor: str,
           owner: str, requested: int, now: float, settings: ServiceSettings,
           changed: str) -> Answer:
    granted = int(min(requested, settings.max_publish_expires, not_after - now))
    if granted < settings.min_expires:
        return Answer(403, "Forbidden", aor=aor, detail="the certificate expires too soon")
    etag = _new_etag()
    store.save(Publication(aor=aor, der=der, fingerprint="sha256:" + hashlib.sha256(der).hexdigest(),
                           not_before=not_before, not_after=not_after, etag=etag,
                           expires=now + granted, published_by=owner, published_at=now))
    return Answer(200, "OK", (("SIP-ETag", etag), ("Expires", str(granted))), aor=aor,
                  changed=changed, expires=granted)


def _accepts_pkix(message: SipMessage) -> bool:
    accept = message.get_all("Accept")
    if not accept:
        return True
    kinds = {item.partition(";")[0].strip().lower()
             for value in accept for item in value.split(",")}
    return bool(kinds & {CONTENT_TYPE, "application/*", "*/*"})


def served_certificate(store: PublicationStore, aor: str,
                       anchors: Sequence[x509.Certificate], now: float) -> bytes:
    """The certificate a fetch or a NOTIFY hands out for ``aor``: its live
    publication's, only while it still passes the checks it was published under
    (anchors and their CRLs as loaded now: a certificate revoked since is no
    longer served); else empty."""
    current = store.current(aor)
    if current is None or current.expires <= now:
        return b""
    try:
        check_published_certificate(current.der, aor, anchors,
                                    datetime.fromtimestamp(now, timezone.utc))
    except CertificateRejectedError:
        return b""
    return current.der


def subscribe(message: SipMessage, *, store: PublicationStore,
              anchors: Sequence[x509.Certificate], now: float,
              settings: ServiceSettings = ServiceSettings(), aor: str | None = None) -> Answer:
    """Decide a SUBSCRIBE of ``Event: certificate`` (no authentication, RFC 6072
    §6.6): 200 with the granted Expires, and the first NOTIFY's body.  ``aor``: the
    resource of the subscription a SUBSCRIBE refreshes inside its dialog (its
    Request-URI is then the notifier's Contact, not the AoR)."""
    if not _event_ok(message):
        return _bad_event()
    aor = aor or _target(message)
    if aor is None:
        return Answer(400, "Bad Request", detail="Request-URI is not an AoR")
    if not _accepts_pkix(message):
        return Answer(406, "Not Acceptable", aor=aor, detail="Accept excludes application/pkix-cert")
    requested = _expires(message, settings.default_subscribe_expires, settings)
    if isinstance(requested, Answer):
        return replace(requested, aor=aor)
    granted = min(requested, settings.max_subscribe_expires)
    body = served_certificate(store, aor, anchors, now)
    return Answer(200, "OK", (("Expires", str(granted)),), aor=aor, body=body, expires=granted)


def notify_headers(expires_left: int, has_body: bool,
                   event_id: str | None = None) -> list[tuple[str, str]]:
    """Headers of a certificate NOTIFY besides the dialog's own (RFC 6665 §4.1.3); the
    Event repeats the SUBSCRIBE's ``id`` parameter (§8.2.1)."""
    state = (f"active;expires={expires_left}" if expires_left > 0
             else "terminated;reason=timeout")
    event = f"{EVENT};id={event_id}" if event_id else EVENT
    headers = [("Event", event), ("Subscription-State", state)]
    if has_body:
        headers.append(("Content-Type", CONTENT_TYPE))
    return headers


def event_id(message: SipMessage) -> str | None:
    """The ``id`` parameter of the Event header (RFC 6665 §8.2.1), if any."""
    value = message.get("Event") or ""
    return parse_params(value.partition(";")[2]).get("id")
