"""Certification paths: who a certificate names, and whether it chains to a trust anchor.

``verify_chain`` builds a path from a certificate to one of the trust anchors and
checks it (RFC 5280 §6, without certificate policies) for a bounded amount of work,
since the intermediates usually come from the message being checked:

* **Work.**  Candidates are deduplicated by DER and found by issuer name
  (``cryptography``'s ``Name`` equality, never RFC 4518 preparation), issuers whose
  subjectKeyIdentifier equals the authorityKeyIdentifier first, those whose SKI
  differs last.  A path never holds one subject and key twice (look-alike CAs),
  a certificate's signature is checked at most once per issuer key, and each check
  is counted against the message's public-key budget (``cms.budget``) *before* it
  runs.  Visiting more than ``limits.max_path_checks`` candidate issuers (every
  visit counts, refused or tried), or a certificate over
  ``limits.max_certificate_bytes`` or over the counts of
  ``certfiles.certificate_counts`` (DER elements, name attributes, SAN entries), is
  ``LimitExceededError``.  A node's issuer and time problems are decided once; the
  reasons a path fails are kept as data and only the one reported is rendered, from
  at most the first 8 RDNs of a name.
* **Keys and algorithms, before use.**  ``check_public_key``: RSA and DSA moduli of
  ``min_rsa_bits``..``max_rsa_bits``, RSA exponents odd in 3..2^32, EC on P-256,
  P-384 or P-521, Ed25519/Ed448, DSA only with ``accept_legacy_algorithms``.
  Certificate signatures use SHA-2 (or none, for EdDSA); SHA-1 only as legacy.
* **RFC 5280 rules.**  Every issuer is a CA (basicConstraints cA; a trust anchor
  without the extension, such as a v1 root, is trusted by configuration) whose
  keyUsage, when present, allows keyCertSign; pathLenConstraint (the anchor's too);
  nameConstraints for dNSName, URI (the host, e.g. of ``sip:`` URIs), rfc822Name,
  directoryName and iPAddress, with a subject CN that looks like a host name standing
  in for a dNSName when the leaf has no SAN dNSName or URI (``certstore`` reads it
  then); constraints of any other type are refused, critical or not.  Unknown
  critical extensions are refused on every certificate but the anchor.  Validity at
  ``at`` for the whole path.
* **CRLs** (``crls=``, or the ``crls`` of a :class:`TrustAnchors`, i.e. ``[trust]
  crls``).  A CRL counts for an issuer only if it names the issuer, the issuer may
  sign CRLs (keyUsage cRLSign when present), its signature verifies with the
  issuer's key (counted like a certificate signature) and it is current (thisUpdate
  <= at <= nextUpdate; no nextUpdate means no expiry; not checked when ``check_time``
  is False, like the certificates).  An issuer that has CRLs of
  which none counts (expired, future, forged) fails closed: its certificates are
  refused until a current CRL is configured.  Issuers without any CRL are not checked.

``certificate_identities`` gives the names a certificate vouches for.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import (
    dsa, ec, ed448, ed25519, padding, rsa, x448, x25519,
)
from cryptography.x509.oid import ExtensionOID, NameOID

from .certfiles import (
    certificate_counts,
    certificate_key,
    check_certificate_counts,
    fully_readable,
    known_counts,
)
from .errors import (
    E2MError,
    LimitExceededError,
    MalformedError,
    UnsupportedAlgorithmError,
    UntrustedSignerError,
)
from .uri import parse_uri
from .lazy import lazy_property

if TYPE_CHECKING:
    from .cms.limits import Limits

__all__ = ["Identities", "TrustAnchors", "certificate_identities", "verify_chain",
           "is_signed_by", "as_utc", "check_public_key", "signer_usage_problem",
           "check_certificate_size", "MAX_PATH_LENGTH"]


# Longest chain verify_chain will build (leaf + intermediates + anchor).
MAX_PATH_LENGTH = 8

# Curves whose signatures we check; others are refused before use.
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_MAX_RSA_EXPONENT = 2**32
# Hashes of certificate and CRL signatures; SHA-1 only as a legacy algorithm.
_HASHES = ("sha224", "sha256", "sha384", "sha512")
# Extensions whose meaning we apply, so that they may be critical.  Certificate
# policies are not processed: with no policy required by us (RFC 5280 6.1 with
# initial-policy-set anyPolicy and no explicit policy) they never change the outcome.
# Policy constraints and mappings could, so they are refused when critical.
_UNDERSTOOD = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.NAME_CONSTRAINTS,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.CERTIFICATE_POLICIES,
})
# Critical CRL extensions we may ignore: a partial or delta CRL still lists revocations.
_CRL_UNDERSTOOD = frozenset({ExtensionOID.ISSUING_DISTRIBUTION_POINT,
                             ExtensionOID.DELTA_CRL_INDICATOR})
_NAME_TYPES = (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name,
               x509.DirectoryName, x509.IPAddress)
_HOSTLIKE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                       r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?")


def _limits(limits: Limits | None) -> Limits:
    if limits is not None:
        return limits
    from .cms.limits import DEFAULT_LIMITS  # cms.signed imports this module
    return DEFAULT_LIMITS


@dataclass(frozen=True)
class Identities:
    """The names a certificate vouches for (SIP cares about SAN URIs first)."""

    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    common_name: str | None
    emails: tuple[str, ...] = ()
    is_ca: bool = False                 # basicConstraints cA: a CA, never a user


class TrustAnchors(tuple):
    """Trust anchor certificates with the CRLs configured next to them (``[trust] crls``).

    A tuple, so it goes wherever a sequence of anchors goes; ``verify_chain`` (and so
    every check built on it) applies its ``crls`` unless given CRLs of its own.
    ``paths``: the paths found to these anchors (``KnownPaths``), when there are no CRLs.
    """

    crls: tuple[x509.CertificateRevocationList, ...]
    paths: KnownPaths

    def __new__(cls, certificates: Iterable[x509.Certificate] = (),
                crls: Iterable[x509.CertificateRevocationList] = ()) -> TrustAnchors:
        self = super().__new__(cls, tuple(certificates))
        self.crls = tuple(crls)
        self.paths = KnownPaths()
        return self

    def __repr__(self) -> str:
        return f"TrustAnchors({len(self)} certificates, {len(self.crls)} CRLs)"


@dataclass(frozen=True)
class _KnownPath:
    """A path ``verify_chain`` found, the public-key operations it took, and the time
    every certificate on it is valid in."""

    path: tuple[x509.Certificate, ...]
    spent: int
    valid_from: datetime
    valid_until: datetime

    def holds_at(self, when: datetime) -> bool:
        return self.valid_from <= when <= self.valid_until


class KnownPaths:
    """The paths found to one set of anchors, by the leaf's and the offered
    intermediates' DER (with the limits and whether time was checked).

    Without CRLs, whether a path holds depends on nothing else but the time, and
    each path keeps the window in which all its certificates are valid: every
    message of a sender carries the same certificate, and a proxy otherwise
    rebuilds and rechecks the same path per message (about a fifth of opening one).
    Only paths that held are kept, so a refusal is always worked out again; a hit
    spends the same budget the path took.  Bounded: ``MAX`` paths, emptied when
    full (a flood of new certificates costs what it did before).
    """

    MAX = 256

    def __init__(self) -> None:
        self._paths: dict[tuple, _KnownPath] = {}

    def __len__(self) -> int:
        return len(self._paths)

    def get(self, key: tuple) -> _KnownPath | None:
        return self._paths.get(key)

    def keep(self, key: tuple, known: _KnownPath) -> None:
        if len(self._paths) >= self.MAX:
            self._paths.clear()
        self._paths[key] = known


def as_utc(moment: datetime) -> datetime:
    # Naive datetimes are taken as UTC, which is what certificates use.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
    except ValueError as exc:  # duplicate or broken extensions
        raise MalformedError(f"unreadable certificate extensions: {exc}") from None


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # duplicate or broken extensions
        raise MalformedError(f"unreadable certificate extensions: {exc}") from None


def check_certificate_size(cert: x509.Certificate, limits: Limits | None = None,
                           der: bytes | None = None) -> None:
    """``LimitExceededError`` if the certificate's DER, its element count, a name or its
    SAN is over the limits (``certfiles.certificate_counts``; the counts of a
    certificate read from a message are remembered)."""
    limits = _limits(limits)
    if der is None:
        der = certificate_key(cert)
    if len(der) > limits.max_certificate_bytes:
        raise LimitExceededError(f"certificate of {len(der)} bytes exceeds the limit of "
                                 f"{limits.max_certificate_bytes}")
    counts = known_counts(der)
    if counts is None:
        try:
            counts = certificate_counts(der, limits.max_certificate_elements)
        except MalformedError:
            counts = None   # cryptography read it: what it holds is checked below
    elif counts.elements > limits.max_certificate_elements:
        raise LimitExceededError(f"certificate of more than {limits.max_certificate_elements} "
                                 "DER elements (extension contents included)")
    if counts is not None:
        check_certificate_counts(counts, limits)
    san = _san(cert)
    if san is not None and len(san) > limits.max_san_entries:
        raise LimitExceededError(f"{len(san)} subjectAltName entries exceed the limit of "
                                 f"{limits.max_san_entries}")


# certificate_identities by (certificate_key, limits): a proxy asks it twice per body
# of the same sender (the signature check, then the From check).  Bounded like the signature memo above.
_IDENTITIES: dict[tuple[bytes, Limits], Identities] = {}
_IDENTITIES_MAX = 256


def certificate_identities(cert: x509.Certificate,
                           limits: Limits | None = None) -> Identities:
    """SAN URIs, SAN dNSNames, SAN rfc822Names and the first subject CN.

    More than ``limits.max_san_entries`` SAN entries is ``LimitExceededError``.
    """
    key = (certificate_key(cert), _limits(limits))
    known = _IDENTITIES.get(key)
    if known is None:
        known = _read_identities(cert, key[1])
        if len(_IDENTITIES) >= _IDENTITIES_MAX:
            _IDENTITIES.clear()
        _IDENTITIES[key] = known
    return known


def _read_identities(cert: x509.Certificate, limits: Limits) -> Identities:
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    san = _san(cert)
    if san is not None:
        bound = limits.max_san_entries
        if len(san) > bound:
            raise LimitExceededError(
                f"{len(san)} subjectAltName entries exceed the limit of {bound}")
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
        emails = tuple(san.get_values_for_type(x509.RFC822Name))
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    if isinstance(cn, bytes):
        cn = cn.decode("utf-8", "replace")
    return Identities(uris=uris, dns_names=dns, common_name=cn, emails=emails,
                      is_ca=_is_ca(cert))


# RDNs of a name rendered in a description: RFC 4514 writes the last RDN first, so these
# are the last ones; the text is then cut to 120 characters.
_DESCRIBED_RDNS = 8


def _describe(cert: x509.Certificate) -> str:
    try:
        text = _name_text(cert.subject) or f"serial {cert.serial_number:#x}"
    except ValueError:
        text = f"serial {cert.serial_number:#x}"
    return text


def _name_text(name: x509.Name) -> str:
    """At most the 8 RDNs an RFC 4514 string begins with, cut to 120 characters: names
    come from the attacker as often as not, so a description costs a bounded prefix
    and log lines stay short."""
    rdns = name.rdns
    shown = rdns if len(rdns) <= _DESCRIBED_RDNS else rdns[-_DESCRIBED_RDNS:]
    text = x509.Name(shown).rfc4514_string()
    if len(shown) < len(rdns) and len(text) <= 117:
        text += ",..."
    return text if len(text) <= 120 else text[:117] + "..."


class _Later:
    """A reason a path fails, kept as data: the certificates' names are rendered only
    when the reason is reported.  A path search may meet a reason on every candidate
    it visits; it reports one (review 103: 160 names of 680 RDNs rendered per
    message).  ``str()`` and f-strings render it (once)."""

    __slots__ = ("_render", "_text")

    def __init__(self, render) -> None:
        self._render, self._text = render, None

    def __str__(self) -> str:
        if self._text is None:
            self._text = self._render()
        return self._text

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return f"_Later({str(self)!r})"


def _later(render) -> _Later:
    return _Later(render)


# --------------------------------------------------------------------------
# Keys, algorithms, usages


def check_public_key(public_key: object, limits: Limits | None = None, *,
                     signing: bool = False) -> None:
    """Refuse a key before any operation with it.

    RSA: ``min_rsa_bits`` <= modulus <= ``max_rsa_bits``, exponent odd, 3 <= e < 2^32.
    DSA: only with ``accept_legacy_algorithms``, modulus within the same bounds.  EC:
    P-256, P-384, P-521.  Ed25519, Ed448; X25519 and X448 only when not ``signing``.
    A size over a limit is ``LimitExceededError``; a weak key ``UntrustedSignerError``;
    a key type or curve we do not use ``UnsupportedAlgorithmError``.
    """
    limits = _limits(limits)
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if bits > limits.max_rsa_bits:
            raise LimitExceededError(
                f"RSA key of {bits} bits exceeds the limit of {limits.max_rsa_bits}")
        if bits < limits.min_rsa_bits:
            raise UntrustedSignerError(
                f"RSA key of {bits} bits (minimum {limits.min_rsa_bits})")
        e = public_key.public_numbers().e
        if e >= _MAX_RSA_EXPONENT:
            raise LimitExceededError(f"RSA public exponent of {e.bit_length()} bits "
                                     "(the limit is 32 bits)")
        if e < 3 or e % 2 == 0:
            raise UntrustedSignerError("RSA public exponent must be odd and at least 3")
    elif isinstance(public_key, dsa.DSAPublicKey):
        if not limits.accept_legacy_algorithms:
            raise UnsupportedAlgorithmError("DSA keys are legacy algorithms, not accepted")
        bits = public_key.key_size
        if bits > limits.max_rsa_bits:
            raise LimitExceededError(
                f"DSA key of {bits} bits exceeds the limit of {limits.max_rsa_bits}")
        if bits < limits.min_rsa_bits:
            raise UntrustedSignerError(f"DSA key of {bits} bits (minimum {limits.min_rsa_bits})")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _CURVES):
            raise UnsupportedAlgorithmError(f"EC curve {public_key.curve.name} is not supported")
    elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        pass
    elif isinstance(public_key, (x25519.X25519PublicKey, x448.X448PublicKey)):
        if signing:
            raise UntrustedSignerError("a key-agreement key cannot sign")
    else:
        raise UnsupportedAlgorithmError(
            f"public key type {type(public_key).__name__.lstrip('_')} is not supported")


def _key_problem(cert: x509.Certificate, limits: Limits, signing: bool) -> str | None:
    try:
        public = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return _later(lambda: f"{_describe(cert)} has a public key that cannot be read")
    try:
        check_public_key(public, limits, signing=signing)
    except E2MError as exc:
        return _later(lambda message=str(exc): f"{_describe(cert)}: {message}")
    return None


def _hash_problem(algorithm_name: str | None, limits: Limits) -> str | None:
    """None if a signature with this hash (None: EdDSA) is acceptable."""
    if algorithm_name is None or algorithm_name in _HASHES:
        return None
    if algorithm_name == "sha1":
        return None if limits.accept_legacy_algorithms else \
            "SHA-1 (a legacy algorithm, not accepted)"
    return f"{algorithm_name} (not accepted)"


def _signature_problem(cert: x509.Certificate, limits: Limits) -> str | None:
    """Why the signature *on* ``cert`` cannot be accepted, whoever the issuer."""
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return _later(lambda: f"{_describe(cert)} is signed with an unsupported algorithm")
    problem = _hash_problem(algorithm.name if algorithm is not None else None, limits)
    return _later(lambda: f"{_describe(cert)} is signed with {problem}") if problem else None


def signer_usage_problem(cert: x509.Certificate) -> str | None:
    """None if ``cert`` may make signatures: a keyUsage, when present, must allow
    digitalSignature (nonRepudiation alone is not enough for a SIP signature)."""
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    except ValueError:
        return "unreadable keyUsage"
    return None if usage.digital_signature else "keyUsage does not allow digitalSignature"


# signing_key by (certificate_key, limits): every message of a sender carries the same
# certificate, and loading and checking its key cost a proxy more than the signature it
# then verifies.  Only keys that passed are kept (a refusal is worked out again);
# bounded and emptied when full, like the memos above.
_SIGNING_KEYS: dict[tuple[bytes, Limits], object] = {}
_SIGNING_KEYS_MAX = 256


def signing_key(cert: x509.Certificate, limits: Limits | None = None,
                der: bytes | None = None) -> object:
    """The public key of a signer's certificate, once the certificate's size, the key
    (``check_public_key``, signing) and its keyUsage (``signer_usage_problem``) are
    checked: ``LimitExceededError``, ``UnsupportedAlgorithmError`` or
    ``UntrustedSignerError`` otherwise.  The certificate's path is not checked here."""
    limits = _limits(limits)
    key = (certificate_key(cert), limits)
    known = _SIGNING_KEYS.get(key)
    if known is not None:
        return known
    check_certificate_size(cert, limits, der)
    try:
        public_key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise UnsupportedAlgorithmError("the signer's public key type is not supported") from None
    check_public_key(public_key, limits, signing=True)
    usage = signer_usage_problem(cert)
    if usage:
        raise UntrustedSignerError(f"the signer certificate's {usage}")
    if len(_SIGNING_KEYS) >= _SIGNING_KEYS_MAX:
        _SIGNING_KEYS.clear()
    _SIGNING_KEYS[key] = public_key
    return public_key


def is_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s key made the signature on ``cert`` (names not checked)."""
    try:
        return _signature_verifies(issuer.public_key(), cert.tbs_certificate_bytes,
                                   cert.signature, cert.signature_hash_algorithm,
                                   cert.signature_algorithm_parameters,
                                   cert.signature_algorithm_oid.dotted_string)
    except (UnsupportedAlgorithm, ValueError, TypeError):
        return False


# Whether a certificate's signature verifies under an issuer key depends on nothing but
# the certificate's DER and the key, so the answer is kept per process: every message of
# a sender carries the same certificate, and a proxy otherwise repeats one ECDSA or RSA
# verification per message.  Bounded (256 entries of at most a 16 KiB certificate and a
# key each); emptied when full (a flood of new certificates costs what it did before).
_SIGNATURE_MEMO: dict[tuple[bytes, bytes], bool] = {}
_SIGNATURE_MEMO_MAX = 256


def _remembered_signature(key: tuple[bytes, bytes], cert: x509.Certificate,
                          issuer: x509.Certificate) -> bool:
    """``is_signed_by(cert, issuer)``; ``key`` is (cert's DER, issuer's SPKI DER)."""
    known = _SIGNATURE_MEMO.get(key)
    if known is None:
        known = is_signed_by(cert, issuer)
        if len(_SIGNATURE_MEMO) >= _SIGNATURE_MEMO_MAX:
            _SIGNATURE_MEMO.clear()
        _SIGNATURE_MEMO[key] = known
    return known


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    # Not crl.is_signature_valid: it says False for DSA (the RFC 4134 CRLs).
    try:
        return _signature_verifies(issuer.public_key(), crl.tbs_certlist_bytes, crl.signature,
                                   crl.signature_hash_algorithm,
                                   crl.signature_algorithm_parameters,
                                   crl.signature_algorithm_oid.dotted_string)
    except (UnsupportedAlgorithm, ValueError, TypeError):
        return False


def _signature_verifies(public: object, tbs: bytes, sig: bytes, sig_hash: object,
                        params: object, oid: str) -> bool:
    try:
        if isinstance(public, rsa.RSAPublicKey):
            if not isinstance(params, (padding.PKCS1v15, padding.PSS)) or sig_hash is None:
                return False
            public.verify(sig, tbs, params, sig_hash)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            if params is None and sig_hash is not None and oid.startswith("1.2.840.10045.4."):
                params = ec.ECDSA(sig_hash)  # cryptography gives none for ecdsa-with-SHA1
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


def _extension(cert: x509.Certificate, cls: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _can_issue(issuer: x509.Certificate, is_anchor: bool) -> str | None:
    """None if ``issuer`` may sign certificates, else the reason it may not."""
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            return _later(lambda: f"{_describe(issuer)} is not a CA")
    except x509.ExtensionNotFound:
        # Trust anchors are trusted by configuration (v1 roots have no
        # extensions); intermediates must prove they are CAs.
        if not is_anchor:
            return _later(lambda: f"{_describe(issuer)} has no CA basicConstraints")
    except ValueError:
        return _later(lambda: f"{_describe(issuer)} has unreadable extensions")
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            return _later(lambda: f"{_describe(issuer)} may not sign certificates (keyUsage)")
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        return _later(lambda: f"{_describe(issuer)} has unreadable extensions")
    return None


def _critical_problem(cert: x509.Certificate) -> str | None:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _UNDERSTOOD:
            return _later(lambda: f"{_describe(cert)} has an unknown critical extension "
                                  f"{ext.oid.dotted_string}")
    return None


def _time_problem(cert: x509.Certificate, at: datetime) -> str | None:
    if at < cert.not_valid_before_utc:
        return _later(lambda: f"certificate {_describe(cert)} is not yet valid "
                      f"(valid from {cert.not_valid_before_utc.isoformat()})")
    if at > cert.not_valid_after_utc:
        return _later(lambda: f"certificate {_describe(cert)} has expired "
                      f"(valid until {cert.not_valid_after_utc.isoformat()})")
    return None


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


# --------------------------------------------------------------------------
# Name constraints (RFC 5280 4.2.1.10)


def _dns_within(name: str, constraint: str) -> bool:
    name, constraint = name.lower().rstrip("."), constraint.lower().rstrip(".")
    if not constraint:
        return True
    if constraint.startswith("."):
        return name.endswith(constraint)
    return name == constraint or name.endswith("." + constraint)


def _host_within(host: str, constraint: str) -> bool:
    # URI and rfc822Name constraints: a host exactly, or ".domain" for any host below.
    constraint = constraint.lower().rstrip(".")
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint


def _email_within(address: str, constraint: str) -> bool:
    local, at, host = address.rpartition("@")
    if not at:
        return False
    if "@" in constraint:  # one mailbox: local part exact, host without case
        c_local, _, c_host = constraint.rpartition("@")
        return local == c_local and host.lower().rstrip(".") == c_host.lower().rstrip(".")
    return _host_within(host.lower().rstrip("."), constraint)


def _uri_host(uri: str) -> str | None:
    scheme = uri.partition(":")[0].lower()
    try:
        if scheme in ("sip", "sips"):
            host = parse_uri(uri).host
        else:
            host = urlsplit(uri).hostname or ""
    except (E2MError, ValueError):
        return None
    host = host.lower().rstrip(".")
    return host or None


def _rdn_key(rdn: x509.RelativeDistinguishedName) -> frozenset:
    # A rough caseIgnoreMatch (case and runs of spaces), linear in the name.
    return frozenset((a.oid.dotted_string, " ".join(str(a.value).casefold().split()))
                     for a in rdn)


def _dn_within(name: x509.Name, base: x509.Name) -> bool:
    rdns, base_rdns = name.rdns, base.rdns
    if len(base_rdns) > len(rdns):
        return False
    return all(_rdn_key(a) == _rdn_key(b) for a, b in zip(rdns, base_rdns))


def _ip_within(address: object, network: object) -> bool:
    return (isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            and isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address))
            and address.version == network.version and address in network)


def _constrained_names(cert: x509.Certificate, is_leaf: bool) -> dict[type, list]:
    """The names of ``cert`` that name constraints apply to, by GeneralName type.

    URIs are given as their host (None when there is none)."""
    names: dict[type, list] = {t: [] for t in _NAME_TYPES}
    if cert.subject.rdns:
        names[x509.DirectoryName].append(cert.subject)
    for attribute in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        names[x509.RFC822Name].append(str(attribute.value))
    san = _san(cert)
    for general in san or ():
        if isinstance(general, x509.UniformResourceIdentifier):
            names[x509.UniformResourceIdentifier].append(_uri_host(general.value))
        elif isinstance(general, _NAME_TYPES):
            names[type(general)].append(general.value)
    if is_leaf and not names[x509.DNSName] and not names[x509.UniformResourceIdentifier]:
        # certstore names a proxy by its CN when there is no SAN name: constrain it too.
        for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = str(attribute.value)
            if _HOSTLIKE.fullmatch(value):
                names[x509.DNSName].append(value)
    return names


_MATCHERS = {
    x509.DNSName: _dns_within,
    x509.UniformResourceIdentifier: _host_within,
    x509.RFC822Name: _email_within,
    x509.DirectoryName: _dn_within,
    x509.IPAddress: _ip_within,
}


def _constraints_problem(ca: x509.Certificate, nc: x509.NameConstraints,
                         cert: x509.Certificate, is_leaf: bool) -> str | None:
    names = _constrained_names(cert, is_leaf)
    for kind, values in names.items():
        permitted = [s.value for s in nc.permitted_subtrees or () if isinstance(s, kind)]
        excluded = [s.value for s in nc.excluded_subtrees or () if isinstance(s, kind)]
        if not permitted and not excluded:
            continue
        within = _MATCHERS[kind]
        for value in values:
            if value is None:  # a URI without a host: nothing to compare, fail closed
                return _later(lambda: f"name constraints of {_describe(ca)}: "
                                      f"{_describe(cert)} has a URI without a host")
            if permitted and not any(within(value, c) for c in permitted):
                return _later(lambda value=value: f"name constraints of {_describe(ca)} do not "
                              f"permit {_short(value)} in {_describe(cert)}")
            if any(within(value, c) for c in excluded):
                return _later(lambda value=value: f"name constraints of {_describe(ca)} exclude "
                              f"{_short(value)} in {_describe(cert)}")
    return None


def _short(value: object) -> str:
    text = value.rfc4514_string() if isinstance(value, x509.Name) else str(value)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _constraints_static_problem(cert: x509.Certificate, limits: Limits) -> str | None:
    nc = _extension(cert, x509.NameConstraints)
    if nc is None:
        return None
    subtrees = list(nc.permitted_subtrees or ()) + list(nc.excluded_subtrees or ())
    if len(subtrees) > limits.max_san_entries:
        return _later(lambda: f"name constraints of {_describe(cert)}: {len(subtrees)} subtrees "
                              f"exceed the limit of {limits.max_san_entries}")
    odd = sorted({type(s).__name__ for s in subtrees if not isinstance(s, _NAME_TYPES)})
    if odd:
        return _later(lambda: f"name constraints of {_describe(cert)} use {', '.join(odd)}, "
                              "which are not evaluated here")
    return None


# --------------------------------------------------------------------------
# Path building


class _Node:
    """A candidate on a path; what it costs to read is read once, when first needed."""

    def __init__(self, cert: x509.Certificate, der: bytes, anchor: bool) -> None:
        self.cert, self.der, self.anchor = cert, der, anchor
        self.issuer_problem: _Later | None = None   # computed once, when first needed
        self.issuer_checked = False
        self.time_problem: _Later | None = None     # the same for its validity
        self.time_checked = False
        self.memo: dict = {}

    # cryptography builds a new Name (an object per attribute) on every access.
    @lazy_property
    def subject(self) -> x509.Name:
        return self.cert.subject

    @lazy_property
    def issuer(self) -> x509.Name:
        return self.cert.issuer

    @lazy_property
    def spki(self) -> bytes:
        try:
            return self.cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        except (ValueError, UnsupportedAlgorithm):
            return b"unreadable:" + self.der  # never verifies anything; unique to it

    @lazy_property
    def loop_key(self) -> tuple[bytes, bytes]:
        # A path holds one subject with one key at most (RFC 4158 loop detection).
        return (self.subject.public_bytes(), self.spki)

    @lazy_property
    def ski(self) -> bytes | None:
        value = _extension(self.cert, x509.SubjectKeyIdentifier)
        return value.digest if value is not None else None

    @lazy_property
    def aki(self) -> bytes | None:
        value = _extension(self.cert, x509.AuthorityKeyIdentifier)
        return value.key_identifier if value is not None else None


def _crl_problem(crl: x509.CertificateRevocationList, limits: Limits, when: datetime,
                 check_time: bool) -> str | None:
    """Why ``crl`` cannot count, its signature aside."""
    try:
        algorithm = crl.signature_hash_algorithm
        problem = _hash_problem(algorithm.name if algorithm is not None else None, limits)
    except UnsupportedAlgorithm:
        problem = "an unsupported algorithm"
    if problem:
        return f"the CRL is signed with {problem}"
    for ext in crl.extensions:
        if ext.critical and ext.oid not in _CRL_UNDERSTOOD:
            return f"the CRL has an unknown critical extension {ext.oid.dotted_string}"
    if check_time:
        if when < crl.last_update_utc:
            return f"the CRL is not yet valid (thisUpdate {crl.last_update_utc.isoformat()})"
        if crl.next_update_utc is not None and when > crl.next_update_utc:
            return f"the CRL has expired (nextUpdate {crl.next_update_utc.isoformat()})"
    return None


def _is_revoked(crl: x509.CertificateRevocationList, serial: int) -> bool:
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    if entry is None:
        return False
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except (x509.ExtensionNotFound, ValueError):
        return True
    return reason != x509.ReasonFlags.remove_from_crl  # a delta CRL lifting a hold


def verify_chain(cert: x509.Certificate, anchors: Sequence[x509.Certificate],
                 intermediates: Sequence[x509.Certificate] = (), at: datetime | None = None,
                 check_time: bool = True, *, limits: Limits | None = None,
                 crls: Sequence[x509.CertificateRevocationList] | None = None
                 ) -> list[x509.Certificate]:
    """Build and check a path from ``cert`` to one of ``anchors`` (module docstring).

    Returns the path, leaf first and anchor last (just ``[cert]`` if the
    certificate is itself an anchor).  ``crls`` defaults to ``anchors.crls`` when
    ``anchors`` is a :class:`TrustAnchors`.  Raises ``UntrustedSignerError`` when no
    path holds, ``LimitExceededError`` when the work or a size is over ``limits``,
    ``MalformedError`` for an unreadable leaf.  Runs inside the message's budget of
    public-key operations, or a fresh one of ``limits.max_public_key_ops``.
    """
    from .cms.budget import budget_scope

    limits = _limits(limits)
    if crls is None:
        crls = getattr(anchors, "crls", ())
    with budget_scope(limits.max_public_key_ops) as budget:
        memo = anchors.paths if isinstance(anchors, TrustAnchors) and not crls else None
        if memo is None:
            return _verify_chain(cert, anchors, intermediates, at, check_time, limits,
                                 tuple(crls))
        when = as_utc(at) if at is not None else datetime.now(timezone.utc)
        key = (certificate_key(cert), tuple(certificate_key(c) for c in intermediates),
               check_time, limits)
        known = memo.get(key)
        if known is not None and (not check_time or known.holds_at(when)):
            if known.spent:
                budget.spend("certificate signature (path known)", known.spent)
            return list(known.path)
        before = budget.spent
        path = _verify_chain(cert, anchors, intermediates, when, check_time, limits, ())
        memo.keep(key, _KnownPath(tuple(path), budget.spent - before,
                                  max(c.not_valid_before_utc for c in path),
                                  min(c.not_valid_after_utc for c in path)))
        return path


def _verify_chain(cert: x509.Certificate, anchors: Sequence[x509.Certificate],
                  intermediates: Sequence[x509.Certificate], at: datetime | None,
                  check_time: bool, limits: Limits,
                  crls: tuple[x509.CertificateRevocationList, ...]) -> list[x509.Certificate]:
    from .cms.budget import spend

    when = as_utc(at) if at is not None else datetime.now(timezone.utc)
    if not fully_readable(cert):
        raise MalformedError("certificate has unreadable fields")
    leaf_der = certificate_key(cert)
    check_certificate_size(cert, limits, leaf_der)
    # Reasons met, as data (``_Later``): only the first is rendered, when reported.
    problems: list[_Later | str] = []

    def fail() -> UntrustedSignerError:
        if problems:
            # The first problem met is the one nearest the leaf: the most useful.
            return UntrustedSignerError(f"no trusted path for {_describe(cert)}: {problems[0]}")
        return UntrustedSignerError(
            f"no trusted path for {_describe(cert)}: issuer {_describe_name(cert.issuer)} "
            "is neither a trust anchor nor among the supplied certificates")

    def time_ok(node: _Node) -> bool:
        # Decided once per node (a node may be visited on many paths), like its
        # issuer problem below.
        if not check_time:
            return True
        if not node.time_checked:
            node.time_checked = True
            node.time_problem = _time_problem(node.cert, when)
        if node.time_problem:
            problems.append(node.time_problem)
            return False
        return True

    # Candidates: anchors first (a shorter path to a trusted certificate wins), then
    # the intermediates; one node per DER, oversized (counted before they are read
    # further) or unreadable ones skipped.
    nodes: list[_Node] = []
    seen: set[bytes] = set()
    for candidate, is_anchor in [(a, True) for a in anchors] + [(c, False) for c in intermediates]:
        der = certificate_key(candidate)
        if der in seen:
            continue
        seen.add(der)
        if not is_anchor:
            try:
                check_certificate_size(candidate, limits, der)
            except E2MError as exc:
                problems.append(_later(lambda c=candidate, message=str(exc):
                                       f"{_describe(c)}: {message}"))
                continue
        if not fully_readable(candidate):
            continue
        nodes.append(_Node(candidate, der, is_anchor))
    by_subject: dict[x509.Name, list[_Node]] = {}
    for node in nodes:
        by_subject.setdefault(node.subject, []).append(node)

    leaf = _Node(cert, leaf_der, False)
    if not time_ok(leaf):
        raise fail()
    if leaf_der in {n.der for n in nodes if n.anchor}:
        return [cert]
    for problem in (_critical_problem(cert), _key_problem(cert, limits, signing=False),
                    _signature_problem(cert, limits)):
        if problem:
            problems.append(problem)
            raise fail()

    signatures: dict[tuple[bytes, bytes], bool] = {}
    visits = 0     # candidate issuers visited, whatever became of them

    def issuer_problem(node: _Node) -> _Later | None:
        if not node.issuer_checked:
            node.issuer_checked = True
            node.issuer_problem = (
                _can_issue(node.cert, node.anchor)
                or _key_problem(node.cert, limits, signing=True)
                or (None if node.anchor else _critical_problem(node.cert))
                or (None if node.anchor else _signature_problem(node.cert, limits))
                or _constraints_static_problem(node.cert, limits)
                or (None if node.anchor else _san_problem(node.cert, limits)))
        return node.issuer_problem

    def signed_by(child: _Node, issuer: _Node) -> bool:
        key = (child.der, issuer.spki)
        if key not in signatures:
            spend("certificate signature")   # the budget counts it, remembered or not
            signatures[key] = _remembered_signature(key, child.cert, issuer.cert)
        return signatures[key]

    def candidates(child: _Node) -> list[_Node]:
        found = by_subject.get(child.issuer, [])
        # Issuers whose SKI is the child's AKI first, then those that do not say, then
        # those whose SKI differs (tried last, as a mismatched AKI proves nothing).
        def rank(n: _Node) -> int:
            if child.aki is None or n.ski is None:
                return 1
            return 0 if n.ski == child.aki else 2
        return sorted(found, key=rank)

    def extend(path: list[_Node], loop_keys: frozenset) -> list[_Node] | None:
        nonlocal visits
        current = path[-1]
        if current.anchor:
            problem = _path_problem(path, limits, crls, when, check_time, spend)
            if problem:
                problems.append(problem)
                return None
            return path
        if len(path) >= MAX_PATH_LENGTH:
            problems.append(f"path longer than {MAX_PATH_LENGTH} certificates")
            return None
        for issuer in candidates(current):
            # Every visit counts, refused or tried: 2^5 look-alike paths to five expired
            # CAs were 62 signature checks but 222 visits (review 103).
            visits += 1
            if visits > limits.max_path_checks:
                raise LimitExceededError(f"more than {limits.max_path_checks} candidate "
                                         f"issuers visited for {_describe(cert)}")
            if issuer is current or issuer.loop_key in loop_keys:
                continue
            reason = issuer_problem(issuer)
            if reason:
                problems.append(reason)
                continue
            if not time_ok(issuer):
                continue
            if not signed_by(current, issuer):
                problems.append(_later(lambda c=current.cert, i=issuer.cert:
                                       f"bad signature on {_describe(c)} "
                                       f"for issuer {_describe(i)}"))
                continue
            found = extend(path + [issuer], loop_keys | {issuer.loop_key})
            if found:
                return found
        return None

    found = extend([leaf], frozenset({leaf.loop_key}))
    if found:
        return [n.cert for n in found]
    raise fail()


def _describe_name(name: x509.Name) -> str:
    try:
        return _name_text(name)
    except ValueError:
        return "(unreadable)"


def _san_problem(cert: x509.Certificate, limits: Limits) -> str | None:
    try:
        check_certificate_size(cert, limits)
    except E2MError as exc:
        return _later(lambda message=str(exc): f"{_describe(cert)}: {message}")
    return None


def _path_problem(path: list[_Node], limits: Limits,
                  crls: tuple[x509.CertificateRevocationList, ...], when: datetime,
                  check_time: bool, spend) -> str | None:
    """The rules that depend on the whole path (leaf first, anchor last): path length
    constraints, name constraints, then revocation."""
    certs = [n.cert for n in path]
    for i in range(1, len(certs)):
        ca = certs[i]
        bc = _extension(ca, x509.BasicConstraints)
        if bc is not None and bc.path_length is not None:
            below = sum(1 for c in certs[1:i] if not _self_issued(c))
            if below > bc.path_length:
                return _later(lambda ca=ca, bc=bc, below=below:
                              f"pathLenConstraint {bc.path_length} of {_describe(ca)} allows "
                              f"fewer CA certificates below it than the {below} on this path")
        nc = _extension(ca, x509.NameConstraints)
        if nc is not None:
            for j in range(i):
                if j > 0 and _self_issued(certs[j]):
                    continue  # RFC 5280 6.1.3 (b): self-issued CA certificates are exempt
                problem = _constraints_problem(ca, nc, certs[j], is_leaf=j == 0)
                if problem:
                    return problem
    if crls:
        for child, issuer in zip(path, path[1:]):
            problem = _revocation_problem(child, issuer, limits, crls, when, check_time, spend)
            if problem:
                return problem
    return None


def _revocation_problem(child: _Node, issuer: _Node, limits: Limits,
                        crls: tuple[x509.CertificateRevocationList, ...], when: datetime,
                        check_time: bool, spend) -> str | None:
    key = ("revocation", child.der)
    if key in issuer.memo:
        return issuer.memo[key]
    relevant = [crl for crl in crls if crl.issuer == issuer.cert.subject]
    result: str | None = None
    if relevant:
        usable, why = [], []
        usage = _extension(issuer.cert, x509.KeyUsage)
        for crl in relevant:
            problem = _crl_problem(crl, limits, when, check_time)
            if problem is None and usage is not None and not usage.crl_sign:
                problem = "its issuer may not sign CRLs (keyUsage)"
            if problem is None:
                verified = issuer.memo.get(("crl", id(crl)))
                if verified is None:
                    spend("CRL signature")
                    verified = _crl_signed_by(crl, issuer.cert)
                    issuer.memo[("crl", id(crl))] = verified
                if not verified:
                    problem = "its signature does not verify with the issuer's key"
            if problem:
                why.append(problem)
            else:
                usable.append(crl)
        if not usable:
            result = _later(lambda: f"no usable CRL for {_describe(issuer.cert)} ({why[0]}); "
                            "its certificates are refused until a current CRL is configured")
        elif any(_is_revoked(crl, child.cert.serial_number) for crl in usable):
            result = _later(lambda: f"certificate {_describe(child.cert)} is revoked")
    issuer.memo[key] = result
    return result
