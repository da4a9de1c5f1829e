"""Certificates we encrypt to: users by AoR, proxies by host, and the checks behind them.

The checks build on ``certpath.verify_chain`` (signatures, CA constraints, time)
and ``certpath.certificate_identities`` (names); this module adds the SIP name
rules and the "can we encrypt to this key" rule, and reports every failure as
``CertificateRejectedError`` with a reason a person can act on.

Name rules (URIs and hosts are read by ``e2m_plugins.uri``, the one URI parser):

* Users: the AoR must be one of the certificate's SAN URIs (RFC 8591, RFC
  6216); the CN is never used.  SIP URIs compare with ``sip`` and ``sips``
  alike (the scheme asks for TLS hops, it does not change who the user is),
  the user part case-sensitively after percent-decoding, the host
  case-insensitively without a trailing dot (IPv6 canonical); port, URI parameters and
  headers are ignored (an AoR names a user at a domain, not a contact).
  A URI with a password is never a match.
* Proxies: the host must equal a SAN dNSName or the host of a SAN ``sip:``
  URI without a user part (RFC 5922 style); the CN counts only when the
  certificate has neither.  Wildcard names never match: a 496 asks the UA to
  disclose data to this key, so the proxy must be named exactly.
* Keys: RSA within ``limits.min_rsa_bits``..``max_rsa_bits`` with an odd exponent
  below 2^32 (key transport), EC P-256 or X25519 (key agreement) - what ``cms`` can
  encrypt to.  A keyUsage extension, when present, must allow keyEncipherment (RSA)
  or keyAgreement (EC, X25519); an extendedKeyUsage, when present, must include
  emailProtection or anyExtendedKeyUsage (RFC 8550 §4.4.4).
* Signers (``for_encryption=False``): a key that can sign and passes
  ``certpath.check_public_key``, and a keyUsage, when present, with digitalSignature.

CRLs configured with ``[trust] crls`` travel with the anchors (``certpath.TrustAnchors``)
and are applied by ``verify_chain``; ``CertStore`` keeps them with its anchors.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import CertificateRejectedError, E2MError, MalformedError
from .certpath import (
    TrustAnchors,
    certificate_identities,
    check_public_key,
    signer_usage_problem,
    verify_chain,
)
from .certfiles import certificate_key
from .cms.limits import DEFAULT_LIMITS, Limits
from .uri import SipIdentity, aor_of, host_key, identity_of

__all__ = [
    "CertStore",
    "certificate_matches_aor",
    "certificate_matches_host",
    "check_user_certificate",
    "check_user_names",
    "check_proxy_certificate",
    "fingerprint_sha256",
    "matches_fingerprint",
    "MIN_RSA_BITS",
]

MIN_RSA_BITS = DEFAULT_LIMITS.min_rsa_bits  # below this RSA is no longer a safe key transport


# --------------------------------------------------------------------------
# Names




def certificate_matches_aor(cert: x509.Certificate, aor: str) -> bool:
    """True if one of the certificate's SAN URIs names ``aor`` (CN is not used)."""
    wanted = aor_of(aor)
    return any(identity_of(uri) == wanted for uri in certificate_identities(cert).uris)


def _proxy_names(cert: x509.Certificate) -> tuple[list[str], str]:
    """The names a proxy certificate vouches for, and where they came from."""
    ids = certificate_identities(cert)
    names = [host_key(d) for d in ids.dns_names]
    for uri in ids.uris:
        identity = identity_of(uri)
        if identity is not None and identity.user is None:
            names.append(identity.host)
    if names or ids.dns_names or ids.uris:
        return names, "subjectAltName"
    # CN only when the certificate has no SAN URI or dNSName at all (RFC 5922 style).
    return ([host_key(ids.common_name)] if ids.common_name else []), "common name"


def certificate_matches_host(cert: x509.Certificate, host: str) -> bool:
    """True if the certificate names ``host`` exactly; wildcards never match."""
    wanted = host_key(host)
    if not wanted or "*" in wanted:
        return False
    names, _ = _proxy_names(cert)
    return any(name == wanted for name in names if "*" not in name)


# --------------------------------------------------------------------------
# Checks


def _now(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(timezone.utc)
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:#x}"


def _key_problem(cert: x509.Certificate, limits: Limits) -> str | None:
    """None if ``cms`` can encrypt to this certificate's key, else why not."""
    try:
        public = cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return "public key that cannot be read"
    if isinstance(public, rsa.RSAPublicKey):
        try:
            check_public_key(public, limits)  # sizes and exponent
        except E2MError as exc:
            return str(exc)
        usage_needed = "key_encipherment"
    elif isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, ec.SECP256R1):
            return f"EC curve {public.curve.name} (only P-256 is supported)"
        usage_needed = "key_agreement"
    elif isinstance(public, x25519.X25519PublicKey):
        usage_needed = "key_agreement"
    else:
        return f"a {type(public).__name__.lstrip('_')} key cannot receive encrypted content"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not getattr(usage, usage_needed):
            return f"keyUsage does not allow {usage_needed.replace('_', '')}"
    except x509.ExtensionNotFound:
        pass
    return None


def _eku_problem(cert: x509.Certificate) -> str | None:
    try:
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if ExtendedKeyUsageOID.EMAIL_PROTECTION in ekus or \
            ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in ekus:
        return None
    return "extendedKeyUsage lacks emailProtection"


def _signer_problem(cert: x509.Certificate, limits: Limits) -> str | None:
    """None if this certificate's key may make the signatures we verify, else why not."""
    try:
        check_public_key(cert.public_key(), limits, signing=True)
    except (UnsupportedAlgorithm, ValueError):
        return "public key that cannot be read"
    except E2MError as exc:
        return str(exc)
    return signer_usage_problem(cert)


def _check_chain(cert: x509.Certificate, anchors: Sequence[x509.Certificate],
                 intermediates: Sequence[x509.Certificate], at: datetime | None,
                 who: str, limits: Limits | None) -> list[x509.Certificate]:
    try:
        return verify_chain(cert, anchors, intermediates, at=_now(at), limits=limits)
    except E2MError as exc:  # untrusted, expired, not yet valid, revoked, unreadable
        raise CertificateRejectedError(f"certificate of {who} rejected: {exc}") from None


# Certificates whose usage passed, by (certificate_key, use, limits): a proxy checks the
# same sender's certificate for every message.  Refusals are worked out again; bounded
# and emptied when full.
_USAGE_OK: set[tuple[bytes, bool, Limits]] = set()
_USAGE_OK_MAX = 256


def _check_usage(cert: x509.Certificate, who: str, for_encryption: bool,
                 limits: Limits | None) -> None:
    limits = limits or DEFAULT_LIMITS
    key = (certificate_key(cert), for_encryption, limits)
    if key in _USAGE_OK:
        return
    problem = _eku_problem(cert)
    if problem is None:
        problem = _key_problem(cert, limits) if for_encryption else _signer_problem(cert, limits)
    if problem:
        raise CertificateRejectedError(f"certificate of {who} rejected: {problem}")
    if len(_USAGE_OK) >= _USAGE_OK_MAX:
        _USAGE_OK.clear()
    _USAGE_OK.add(key)


def check_user_certificate(cert: x509.Certificate, aor: str,
                           anchors: Sequence[x509.Certificate], at: datetime | None = None,
                           intermediates: Sequence[x509.Certificate] = (), *,
                           for_encryption: bool = True,
                           limits: Limits | None = None) -> list[x509.Certificate]:
    """Check that ``cert`` is ``aor``'s, trusted, valid at ``at`` and (by default)
    a key we can encrypt to.  Returns the path (leaf first, anchor last).

    Raises ``CertificateRejectedError``; a malformed ``aor`` raises
    ``MalformedError``.  Pass ``for_encryption=False`` for a signer's certificate
    (then the key must be able to sign and keyUsage allow digitalSignature).
    """
    identity = check_user_names(cert, aor, for_encryption=for_encryption, limits=limits)
    return _check_chain(cert, anchors, intermediates, at, str(identity), limits)


def check_user_names(cert: x509.Certificate, aor: str, *, for_encryption: bool = True,
                     limits: Limits | None = None) -> SipIdentity:
    """The name and key-usage half of ``check_user_certificate``, for a certificate
    whose path was already checked (a signer's, by the signature check): ``aor`` must
    be one of its SAN URIs and its key fit for the use.  Returns the AoR's identity."""
    identity = aor_of(aor)
    try:
        uris = certificate_identities(cert, limits).uris
    except E2MError as exc:
        raise CertificateRejectedError(f"certificate of {identity} rejected: {exc}") from None
    if not any(identity_of(uri) == identity for uri in uris):
        names = ", ".join(uris) or "no SAN URI"
        raise CertificateRejectedError(
            f"certificate {_describe(cert)} is not for {identity} (it names {names})")
    _check_usage(cert, str(identity), for_encryption, limits)
    return identity


def check_not_a_ca(cert: x509.Certificate) -> None:
    """A certificate service hands out users' certificates, and a CA's is none: refused
    at PUBLISH and in a NOTIFY alike.  (A legacy peer's self-signed certificate, put in
    ``[peers]`` and ``[trust]`` by hand, is taken there: it never comes from a service.)"""
    try:
        is_ca = certificate_identities(cert).is_ca
    except E2MError as exc:
        raise CertificateRejectedError(f"certificate rejected: {exc}") from None
    if is_ca:
        raise CertificateRejectedError("a CA certificate is not a user's")


def check_proxy_certificate(cert: x509.Certificate, host: str,
                            anchors: Sequence[x509.Certificate], at: datetime | None = None,
                            intermediates: Sequence[x509.Certificate] = (), *,
                            for_encryption: bool = True,
                            limits: Limits | None = None) -> list[x509.Certificate]:
    """Check that ``cert`` names proxy ``host`` exactly, is trusted, valid at ``at``
    and (by default) a key we can encrypt to.  Returns the path.

    This is the check a UA runs on the certificate of a 496 or of a policy
    header before it discloses anything (protocol digest §7).
    """
    wanted = host_key(host)
    if not wanted or "*" in wanted or any(ch.isspace() for ch in wanted):
        raise MalformedError(f"not a proxy host name: {host!r}")
    try:
        names, source = _proxy_names(cert)
    except E2MError as exc:
        raise CertificateRejectedError(f"certificate of {wanted} rejected: {exc}") from None
    if not certificate_matches_host(cert, wanted):
        wild = any("*" in n for n in names)
        raise CertificateRejectedError(
            f"certificate {_describe(cert)} is not for {wanted} "
            f"({source}: {', '.join(names) or 'none'}"
            f"{'; wildcard names are not accepted' if wild else ''})")
    _check_usage(cert, wanted, for_encryption, limits)
    return _check_chain(cert, anchors, intermediates, at, wanted, limits)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """``sha256:`` + lowercase hex SHA-256 of the DER certificate (policy header form)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def matches_fingerprint(cert: x509.Certificate, fingerprint: bytes | str) -> bool:
    """True if ``fingerprint`` (raw 32-byte digest, as ``headers`` keeps it, or the
    ``sha256:<hex>`` text, colons and case ignored) is this certificate's."""
    if isinstance(fingerprint, str):
        algo, _, digits = fingerprint.strip().partition(":")
        digits = digits.replace(":", "")
        if algo.lower() != "sha256" or not re.fullmatch(r"[0-9A-Fa-f]{64}", digits):
            return False
        fingerprint = bytes.fromhex(digits)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return hmac.compare_digest(digest, bytes(fingerprint))


# --------------------------------------------------------------------------
# Store


@dataclass(frozen=True)
class _Stored:
    cert: x509.Certificate
    not_before: datetime   # latest notBefore along the path
    not_after: datetime    # earliest notAfter along the path: the whole path must hold


def _stored(path: list[x509.Certificate]) -> _Stored:
    return _Stored(cert=path[0], not_before=max(c.not_valid_before_utc for c in path),
                   not_after=min(c.not_valid_after_utc for c in path))


class CertStore:
    """Checked certificates to encrypt to: users by AoR, proxies by host.

    Every certificate is checked when added (``check_user_certificate`` /
    ``check_proxy_certificate`` against ``trust_anchors``) and is returned
    only while it and its whole path are within their validity period.
    One certificate per AoR or host; adding again replaces it.  ``clock``
    returns an aware UTC datetime (default: now).
    """

    def __init__(self, trust_anchors: Sequence[x509.Certificate],
                 clock: Callable[[], datetime] | None = None) -> None:
        # A TrustAnchors keeps its CRLs ([trust] crls); anything else becomes a tuple.
        self._anchors = (trust_anchors if isinstance(trust_anchors, TrustAnchors)
                         else tuple(trust_anchors))
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._lock = threading.Lock()
        self._users: dict[SipIdentity, _Stored] = {}
        self._proxies: dict[str, _Stored] = {}

    def __repr__(self) -> str:
        return f"CertStore({len(self._users)} users, {len(self._proxies)} proxies)"

    @property
    def trust_anchors(self) -> tuple[x509.Certificate, ...]:
        return self._anchors

    def add_user(self, aor: str, cert: x509.Certificate,
                 intermediates: Sequence[x509.Certificate] = ()) -> None:
        """Check and keep ``cert`` as the certificate to encrypt to for ``aor``."""
        path = check_user_certificate(cert, aor, self._anchors, self._clock(), intermediates)
        with self._lock:
            self._users[aor_of(aor)] = _stored(path)

    def add_proxy(self, host: str, cert: x509.Certificate,
                  intermediates: Sequence[x509.Certificate] = ()) -> None:
        """Check and keep ``cert`` as the certificate of proxy ``host``."""
        path = check_proxy_certificate(cert, host, self._anchors, self._clock(), intermediates)
        with self._lock:
            self._proxies[host_key(host)] = _stored(path)

    def user(self, aor: str) -> x509.Certificate | None:
        """The certificate of ``aor`` if known and valid now."""
        identity = identity_of(aor)
        if identity is None:
            return None
        with self._lock:
            return self._valid(self._users, identity)

    def proxy(self, host: str) -> x509.Certificate | None:
        """The certificate of proxy ``host`` if known and valid now."""
        with self._lock:
            return self._valid(self._proxies, host_key(host))

    def remove_user(self, aor: str) -> bool:
        identity = identity_of(aor)
        with self._lock:
            return identity is not None and self._users.pop(identity, None) is not None

    def remove_proxy(self, host: str) -> bool:
        with self._lock:
            return self._proxies.pop(host_key(host), None) is not None

    def _valid(self, table: dict, key: object) -> x509.Certificate | None:
        entry = table.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now > entry.not_after:
            del table[key]  # expired for good: forget it
            return None
        if now < entry.not_before:
            return None     # clock went back; keep it for later
        return entry.cert
