"""Certification paths: who a certificate names, and whether it chains to a trust anchor.

``verify_chain`` is a deliberately small path builder: it accepts the old and odd
certificates found in RFC 4134 and the LAMPS examples (DSA, SHA-1, unknown extensions)
that strict verifiers refuse, while still checking signatures, names, validity and CA
constraints.  ``certificate_identities`` gives the names a certificate vouches for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from .certfiles import fully_readable
from .errors import MalformedError, UntrustedSignerError

__all__ = ["Identities", "certificate_identities", "verify_chain", "is_signed_by", "as_utc",
           "MAX_PATH_LENGTH"]


# Longest chain verify_chain will build (leaf + intermediates + anchor).
MAX_PATH_LENGTH = 8


@dataclass(frozen=True)
class Identities:
    """The names a certificate vouches for (SIP cares about SAN URIs first)."""

    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    common_name: str | None
    emails: tuple[str, ...] = ()


def as_utc(moment: datetime) -> datetime:
    # Naive datetimes are taken as UTC, which is what certificates use.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def certificate_identities(cert: x509.Certificate) -> Identities:
    """SAN URIs, SAN dNSNames, SAN rfc822Names and the first subject CN."""
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
        emails = tuple(san.get_values_for_type(x509.RFC822Name))
    except x509.ExtensionNotFound:
        pass
    except ValueError as exc:  # duplicate or broken extensions
        raise MalformedError(f"unreadable certificate extensions: {exc}") from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    if isinstance(cn, bytes):
        cn = cn.decode("utf-8", "replace")
    return Identities(uris=uris, dns_names=dns, common_name=cn, emails=emails)


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:#x}"


def is_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s key made the signature on ``cert`` (names not checked)."""
    try:
        public = issuer.public_key()
        sig_hash = cert.signature_hash_algorithm
        params = cert.signature_algorithm_parameters
        tbs, sig = cert.tbs_certificate_bytes, cert.signature
        if isinstance(public, rsa.RSAPublicKey):
            if not isinstance(params, (padding.PKCS1v15, padding.PSS)) or sig_hash is None:
                return False
            public.verify(sig, tbs, params, sig_hash)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            if not isinstance(params, ec.ECDSA):
                return False
            public.verify(sig, tbs, params)
        elif isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            if sig_hash is not None:
                return False
            public.verify(sig, tbs)
        elif isinstance(public, dsa.DSAPublicKey):
            if sig_hash is None:
                return False
            public.verify(sig, tbs, sig_hash)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _can_issue(issuer: x509.Certificate, is_anchor: bool) -> str | None:
    """None if ``issuer`` may sign certificates, else the reason it may not."""
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            return f"{_describe(issuer)} is not a CA"
    except x509.ExtensionNotFound:
        # Trust anchors are trusted by configuration (v1 roots have no
        # extensions); intermediates must prove they are CAs.
        if not is_anchor:
            return f"{_describe(issuer)} has no CA basicConstraints"
    except ValueError:
        return f"{_describe(issuer)} has unreadable extensions"
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            return f"{_describe(issuer)} may not sign certificates (keyUsage)"
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        return f"{_describe(issuer)} has unreadable extensions"
    return None


def _time_problem(cert: x509.Certificate, at: datetime) -> str | None:
    if at < cert.not_valid_before_utc:
        return (f"certificate {_describe(cert)} is not yet valid "
                f"(valid from {cert.not_valid_before_utc.isoformat()})")
    if at > cert.not_valid_after_utc:
        return (f"certificate {_describe(cert)} has expired "
                f"(valid until {cert.not_valid_after_utc.isoformat()})")
    return None


def verify_chain(cert: x509.Certificate, anchors: Sequence[x509.Certificate],
                 intermediates: Sequence[x509.Certificate] = (), at: datetime | None = None,
                 check_time: bool = True) -> list[x509.Certificate]:
    """Build and check a path from ``cert`` to one of ``anchors``.

    Returns the path, leaf first and anchor last (just ``[cert]`` if the
    certificate is itself an anchor).  Checks each signature, issuer/subject
    name chaining, CA basicConstraints and keyUsage of issuers, and the
    validity period of every certificate on the path at ``at`` (default now,
    UTC) unless ``check_time`` is False.  Raises ``UntrustedSignerError``.
    """
    when = as_utc(at) if at is not None else datetime.now(timezone.utc)
    if not fully_readable(cert):
        raise MalformedError("certificate has unreadable fields")
    # Skip unreadable candidates instead of failing: they may be irrelevant.
    anchors = [a for a in anchors if fully_readable(a)]
    intermediates = [c for c in intermediates if fully_readable(c)]
    anchor_der = {a.public_bytes(serialization.Encoding.DER) for a in anchors}
    # Anchors first so that a shorter path to a trusted certificate wins.
    candidates = list(anchors) + [c for c in intermediates
                                  if c.public_bytes(serialization.Encoding.DER) not in anchor_der]
    problems: list[str] = []

    def time_ok(c: x509.Certificate) -> bool:
        if not check_time:
            return True
        problem = _time_problem(c, when)
        if problem:
            problems.append(problem)
            return False
        return True

    def extend(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        current = path[-1]
        if current.public_bytes(serialization.Encoding.DER) in anchor_der:
            return path
        if len(path) >= MAX_PATH_LENGTH:
            problems.append(f"path longer than {MAX_PATH_LENGTH} certificates")
            return None
        for issuer in candidates:
            if issuer.subject != current.issuer or any(issuer == p for p in path):
                continue
            if not is_signed_by(current, issuer):
                problems.append(f"bad signature on {_describe(current)} "
                                f"for issuer {_describe(issuer)}")
                continue
            is_anchor = issuer.public_bytes(serialization.Encoding.DER) in anchor_der
            reason = _can_issue(issuer, is_anchor)
            if reason:
                problems.append(reason)
                continue
            if not time_ok(issuer):
                continue
            found = extend(path + [issuer])
            if found:
                return found
        return None

    if time_ok(cert):
        found = extend([cert])
        if found:
            return found
    if problems:
        # The first problem met is the one nearest the leaf: the most useful.
        raise UntrustedSignerError(f"no trusted path for {_describe(cert)}: {problems[0]}")
    raise UntrustedSignerError(
        f"no trusted path for {_describe(cert)}: issuer {cert.issuer.rfc4514_string()} "
        "is neither a trust anchor nor among the supplied certificates")
