"""A small test PKI and the certificate helpers the CMS core relies on.

The generator makes a CA, SIP user certificates (SAN URI = the AoR) and proxy
certificates (SAN dNSName = host plus SAN URI ``sip:host``) with RSA-2048,
EC P-256, X25519 (key agreement only) or Ed25519 keys.  It is meant for tests,
demos and the ``e2m pki`` command, not for running a production CA.

``verify_chain`` is a deliberately small path builder: it accepts the old and
odd certificates found in RFC 4134 and the LAMPS examples (DSA, SHA-1,
unknown extensions) that strict verifiers refuse, while still checking
signatures, names, validity and CA constraints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import MalformedError, UnsupportedAlgorithmError, UntrustedSignerError

__all__ = [
    "KeyType",
    "PrivateKey",
    "Credential",
    "TestPKI",
    "Identities",
    "generate_key",
    "make_ca",
    "issue_user",
    "issue_proxy",
    "write_credential",
    "init_test_pki",
    "load_ca",
    "load_certificate",
    "load_certificates",
    "load_private_key",
    "certificate_identities",
    "verify_chain",
    "is_signed_by",
    "readable_certificate",
    "MAX_PATH_LENGTH",
]

KeyType = Literal["rsa", "ec", "x25519", "ed25519"]
KEY_TYPES: tuple[KeyType, ...] = ("rsa", "ec", "x25519", "ed25519")

# Keys this module can generate; loaders may return any PrivateKeyTypes.
PrivateKey = Union[
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    x25519.X25519PrivateKey,
    ed25519.Ed25519PrivateKey,
]

# Longest chain verify_chain will build (leaf + intermediates + anchor).
MAX_PATH_LENGTH = 8

# Some clock skew between hosts is normal; back-date new certificates a little.
_BACKDATE = timedelta(minutes=5)

PathOrData = Union[bytes, bytearray, memoryview, str, os.PathLike]


@dataclass(frozen=True)
class Credential:
    """A certificate and its private key, plus where they live on disk if written."""

    cert: x509.Certificate
    key: PrivateKeyTypes
    cert_path: Path | None = None
    key_path: Path | None = None


@dataclass(frozen=True)
class Identities:
    """The names a certificate vouches for (SIP cares about SAN URIs first)."""

    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    common_name: str | None
    emails: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# Key and certificate generation


def generate_key(key_type: KeyType) -> PrivateKey:
    """Make a fresh private key of the given type."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "x25519":
        return x25519.X25519PrivateKey.generate()
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}; expected one of {KEY_TYPES}")


def _signing_hash(ca_key: PrivateKeyTypes) -> hashes.HashAlgorithm | None:
    # Ed25519 signs without a separate hash; everything else uses SHA-256.
    if isinstance(ca_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    if isinstance(ca_key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        return hashes.SHA256()
    raise ValueError("CA key must be RSA, EC or Ed25519 (it has to sign)")


def _validity(not_before: datetime | None, not_after: datetime | None,
              days: int) -> tuple[datetime, datetime]:
    now = datetime.now(timezone.utc)
    start = _as_utc(not_before) if not_before is not None else now - _BACKDATE
    end = _as_utc(not_after) if not_after is not None else now + timedelta(days=days)
    if end <= start:
        raise ValueError("not_after must be later than not_before")
    return start, end


def _as_utc(moment: datetime) -> datetime:
    # Naive datetimes are taken as UTC, which is what certificates use.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _key_usage(key_type_of: PrivateKeyTypes) -> x509.KeyUsage:
    public = key_type_of.public_key()
    signs = not isinstance(public, x25519.X25519PublicKey)
    return x509.KeyUsage(
        digital_signature=signs,
        content_commitment=False,
        # RSA transports content keys; EC and X25519 agree on them.
        key_encipherment=isinstance(public, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=isinstance(public, (ec.EllipticCurvePublicKey, x25519.X25519PublicKey)),
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(common_name: str, key_type: KeyType = "ec", days: int = 3650, *,
            not_before: datetime | None = None,
            not_after: datetime | None = None) -> Credential:
    """Make a self-signed CA (EC P-256 by default; RSA and Ed25519 also work)."""
    if key_type == "x25519":
        raise ValueError("an X25519 key cannot sign, so it cannot be a CA")
    key = generate_key(key_type)
    start, end = _validity(not_before, not_after, days)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, _signing_hash(key))
    )
    return Credential(cert=cert, key=key)


def _issue(ca: Credential, subject_cn: str, san: list[x509.GeneralName],
           key_type: KeyType, ekus: list[x509.ObjectIdentifier],
           not_before: datetime | None, not_after: datetime | None, days: int,
           key: PrivateKeyTypes | None) -> Credential:
    if key is None:
        key = generate_key(key_type)
    start, end = _validity(not_before, not_after, days)
    try:
        ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key), critical=True)
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(aki, critical=False)
        .sign(ca.key, _signing_hash(ca.key))
    )
    return Credential(cert=cert, key=key)


_AOR = re.compile(r"^(sips?):(?:([^@;?]+)@)?([^;?>]+)", re.IGNORECASE)


def _aor_parts(aor: str) -> tuple[str | None, str]:
    match = _AOR.match(aor.strip())
    if not match:
        raise ValueError(f"not a SIP address of record: {aor!r}")
    return match.group(2), match.group(3).lower()


def issue_user(ca: Credential, aor: str, key_type: KeyType = "rsa",
               not_before: datetime | None = None, not_after: datetime | None = None,
               *, days: int = 825, key: PrivateKeyTypes | None = None) -> Credential:
    """Issue a user certificate for a SIP AoR such as ``sip:alice@example.com``.

    The SAN URI is the AoR exactly as given; the CN is ``user@domain``.
    Pass ``key`` to certify an existing key instead of generating one.
    """
    user, host = _aor_parts(aor)
    common_name = f"{user}@{host}" if user else host
    return _issue(ca, common_name, [x509.UniformResourceIdentifier(aor.strip())], key_type,
                  [ExtendedKeyUsageOID.EMAIL_PROTECTION], not_before, not_after, days, key)


def issue_proxy(ca: Credential, host: str, key_type: KeyType = "rsa",
                not_before: datetime | None = None, not_after: datetime | None = None,
                *, days: int = 825, key: PrivateKeyTypes | None = None) -> Credential:
    """Issue a proxy certificate: SAN dNSName ``host`` and SAN URI ``sip:host``."""
    host = host.strip().lower()
    san: list[x509.GeneralName] = [x509.DNSName(host),
                                   x509.UniformResourceIdentifier(f"sip:{host}")]
    return _issue(ca, host, san, key_type,
                  [ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.SERVER_AUTH],
                  not_before, not_after, days, key)


# --------------------------------------------------------------------------
# Files


def _write_private(path: Path, data: bytes) -> None:
    # Create with 0600 from the start so the key is never world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the file may have existed with wider rights
        os.write(fd, data)
    finally:
        os.close(fd)


def write_credential(cred: Credential, directory: str | os.PathLike, stem: str) -> Credential:
    """Write ``<stem>.crt`` (PEM) and ``<stem>.key`` (PEM PKCS#8, unencrypted, 0600)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cred.cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, cred.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return replace(cred, cert_path=cert_path, key_path=key_path)


@dataclass
class TestPKI:
    """A CA plus user and proxy credentials, addressed by name and key type.

    File layout in ``directory`` (when given):

    - ``ca.crt`` / ``ca.key``: the CA;
    - ``<user>.crt`` / ``<user>.key``: user ``sip:<user>@<domain>`` with the
      default key type, ``<user>-<keytype>.crt`` / ``.key`` for other key types;
    - ``proxy-<host>.crt`` / ``.key``: proxy ``<host>`` with the default key
      type, ``proxy-<host>-<keytype>.crt`` / ``.key`` for other key types.

    ``user()`` and ``proxy()`` issue missing credentials on first use and keep
    them, so tests can ask for any combination without a setup step.
    """

    __test__ = False  # not a pytest test class despite the name

    ca: Credential
    domain: str = "example.com"
    key_type: KeyType = "rsa"
    directory: Path | None = None
    users: dict[tuple[str, KeyType], Credential] = field(default_factory=dict)
    proxies: dict[tuple[str, KeyType], Credential] = field(default_factory=dict)

    def aor(self, name: str) -> str:
        return f"sip:{name}@{self.domain}"

    def _stem(self, base: str, key_type: KeyType) -> str:
        return base if key_type == self.key_type else f"{base}-{key_type}"

    def _store(self, cred: Credential, stem: str) -> Credential:
        return write_credential(cred, self.directory, stem) if self.directory else cred

    def user(self, name: str, key_type: KeyType | None = None) -> Credential:
        """The credential of ``sip:<name>@<domain>``; issued if not there yet."""
        kt = key_type or self.key_type
        cred = self.users.get((name, kt))
        if cred is None:
            cred = self._store(issue_user(self.ca, self.aor(name), kt), self._stem(name, kt))
            self.users[(name, kt)] = cred
        return cred

    def proxy(self, host: str, key_type: KeyType | None = None) -> Credential:
        """The credential of proxy ``host``; issued if not there yet."""
        kt = key_type or self.key_type
        cred = self.proxies.get((host, kt))
        if cred is None:
            cred = self._store(issue_proxy(self.ca, host, kt), self._stem(f"proxy-{host}", kt))
            self.proxies[(host, kt)] = cred
        return cred


def init_test_pki(directory: str | os.PathLike | None, domain: str = "example.com",
                  proxy_hosts: Sequence[str] = ("proxy.example.com",),
                  users: Sequence[str] = ("alice", "bob"), key_type: KeyType = "rsa",
                  *, ca_key_type: KeyType = "ec",
                  ca_name: str | None = None) -> TestPKI:
    """Create a CA and credentials for ``users`` and ``proxy_hosts``.

    Files (see ``TestPKI`` for the naming): ``ca.crt/.key``,
    ``<user>.crt/.key`` and ``proxy-<host>.crt/.key``.  With ``directory=None``
    nothing is written and everything stays in memory.
    """
    ca = make_ca(ca_name or f"E2M Test CA ({domain})", ca_key_type)
    out = Path(directory) if directory is not None else None
    if out is not None:
        ca = write_credential(ca, out, "ca")
    pki = TestPKI(ca=ca, domain=domain, key_type=key_type, directory=out)
    for name in users:
        pki.user(name)
    for host in proxy_hosts:
        pki.proxy(host)
    return pki


def load_ca(directory: str | os.PathLike) -> Credential:
    """Load ``ca.crt`` / ``ca.key`` written by ``init_test_pki``."""
    directory = Path(directory)
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    return Credential(cert=load_certificate(cert_path), key=load_private_key(key_path),
                      cert_path=cert_path, key_path=key_path)


# --------------------------------------------------------------------------
# Loading


def _read(data_or_path: PathOrData) -> bytes:
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        return bytes(data_or_path)
    if isinstance(data_or_path, str) and data_or_path.lstrip().startswith("-----BEGIN"):
        return data_or_path.encode("ascii", "replace")
    return Path(data_or_path).read_bytes()


def _looks_pem(data: bytes) -> bool:
    return b"-----BEGIN" in data[:4096]


def load_certificate(data_or_path: PathOrData) -> x509.Certificate:
    """One certificate, PEM or DER, from bytes, PEM text or a file path."""
    data = _read(data_or_path)
    try:
        if _looks_pem(data):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (ValueError, TypeError, x509.InvalidVersion) as exc:
        raise MalformedError(f"not a readable X.509 certificate: {exc}") from None


def load_certificates(data_or_path: PathOrData) -> list[x509.Certificate]:
    """All certificates of a PEM bundle (or the single one of a DER file)."""
    data = _read(data_or_path)
    if not _looks_pem(data):
        return [load_certificate(data)]
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, TypeError, x509.InvalidVersion) as exc:
        raise MalformedError(f"not a readable PEM certificate bundle: {exc}") from None
    if not certs:
        raise MalformedError("no certificate in PEM bundle")
    return certs


def load_private_key(data_or_path: PathOrData) -> PrivateKeyTypes:
    """A private key: PEM (PKCS#8 or traditional) or DER (PKCS#8 or traditional).

    Encrypted keys are refused: the test PKI writes them unencrypted and the
    proxy reads them from a protected file.
    """
    data = _read(data_or_path)
    try:
        if _looks_pem(data):
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except UnsupportedAlgorithm:
        raise UnsupportedAlgorithmError("private key of an unsupported type") from None
    except TypeError:
        # cryptography says "password was not given" for encrypted keys.
        raise MalformedError("private key is encrypted or unreadable") from None
    except ValueError:
        # The message of cryptography never contains key material, but keep ours fixed.
        raise MalformedError("not a readable private key") from None


# --------------------------------------------------------------------------
# Identities and path validation


def _fully_readable(cert: x509.Certificate) -> bool:
    """cryptography parses some fields lazily; touch the ones we rely on."""
    try:
        cert.version, cert.subject, cert.issuer, cert.serial_number  # noqa: B018
        cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
        cert.extensions  # noqa: B018 - raises on duplicate or broken extensions
        cert.tbs_certificate_bytes  # noqa: B018
    except (ValueError, x509.InvalidVersion, x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType):
        return False
    return True


def readable_certificate(der: bytes) -> x509.Certificate | None:
    """The certificate if cryptography can read every field we use, else None."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        return None
    return cert if _fully_readable(cert) else None


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
    when = _as_utc(at) if at is not None else datetime.now(timezone.utc)
    if not _fully_readable(cert):
        raise MalformedError("certificate has unreadable fields")
    # Skip unreadable candidates instead of failing: they may be irrelevant.
    anchors = [a for a in anchors if _fully_readable(a)]
    intermediates = [c for c in intermediates if _fully_readable(c)]
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
