"""A small test PKI: a CA, SIP user and proxy certificates, written to a folder.

The generator makes a CA, SIP user certificates (SAN URI = the AoR), proxy
certificates (SAN dNSName = host plus SAN URI ``sip:host``) with RSA-2048,
EC P-256, X25519 (key agreement only) or Ed25519 keys, and TLS server certificates for
a proxy host (SAN dNSName, optionally IP addresses; EC P-256 or RSA).  It is meant for tests,
demos and the ``e2m pki`` command, not for running a production CA; the checks
a running UA or proxy makes are in ``certpath`` and ``certstore``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .certfiles import load_certificate, load_private_key
from .certpath import as_utc
from .errors import MalformedError
from .uri import parse_uri

__all__ = [
    "KeyType",
    "PrivateKey",
    "Credential",
    "TestPKI",
    "generate_key",
    "make_ca",
    "issue_user",
    "issue_proxy",
    "issue_tls_server",
    "tls_stem",
    "write_credential",
    "init_test_pki",
    "load_ca",
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


# Some clock skew between hosts is normal; back-date new certificates a little.
_BACKDATE = timedelta(minutes=5)



@dataclass(frozen=True)
class Credential:
    """A certificate and its private key, plus where they live on disk if written."""

    cert: x509.Certificate
    key: PrivateKeyTypes
    cert_path: Path | None = None
    key_path: Path | None = None




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
    start = as_utc(not_before) if not_before is not None else now - _BACKDATE
    end = as_utc(not_after) if not_after is not None else now + timedelta(days=days)
    if end <= start:
        raise ValueError("not_after must be later than not_before")
    return start, end




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
            not_after: datetime | None = None, subject: x509.Name | None = None) -> Credential:
    """Make a self-signed CA (EC P-256 by default; RSA and Ed25519 also work), named
    ``CN=common_name`` unless a whole ``subject`` is given."""
    if key_type == "x25519":
        raise ValueError("an X25519 key cannot sign, so it cannot be a CA")
    key = generate_key(key_type)
    start, end = _validity(not_before, not_after, days)
    name = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
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


def _aor_parts(aor: str) -> tuple[str | None, str]:
    """(user as written, lower-cased host) of a SIP URI; ValueError when it is none."""
    try:
        uri = parse_uri(aor)
    except MalformedError:
        raise ValueError(f"not a SIP address of record: {aor!r}") from None
    return uri.user, uri.host.lower()


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


TLS_KEY_TYPES: tuple[KeyType, ...] = ("ec", "rsa")


def tls_stem(host: str) -> str:
    """File stem of a proxy host's TLS server certificate: ``proxy-<host>-tls``."""
    return f"proxy-{host.strip().lower()}-tls"


def issue_tls_server(ca: Credential, host: str, key_type: KeyType = "ec",
                     ips: Sequence[str] = (), not_before: datetime | None = None,
                     not_after: datetime | None = None, *, days: int = 825,
                     key: PrivateKeyTypes | None = None) -> Credential:
    """A TLS certificate for a proxy host: SAN dNSName ``host`` (and an IP address SAN
    for each of ``ips``, for peers that connect by address), serverAuth and clientAuth
    (a proxy is the client when it connects to its next hop).  Separate from the
    proxy's S/MIME certificate, whose key may be X25519 and cannot serve TLS."""
    if key_type not in TLS_KEY_TYPES:
        raise ValueError(f"a TLS server key must be one of {TLS_KEY_TYPES}, not {key_type!r}")
    host = host.strip().lower()
    san: list[x509.GeneralName] = [x509.DNSName(host)]
    for text in ips:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError:
            raise ValueError(f"not an IP address: {text!r}") from None
    return _issue(ca, host, san, key_type,
                  [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
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
    tls_servers: dict[str, Credential] = field(default_factory=dict)

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

    def tls_server(self, host: str, ips: Sequence[str] = ("127.0.0.1",)) -> Credential:
        """The TLS server certificate of proxy ``host`` (EC P-256, SAN dNSName ``host``
        and the IP addresses ``ips``), as ``proxy-<host>-tls.crt/.key``; issued if not
        there yet."""
        cred = self.tls_servers.get(host)
        if cred is None:
            cred = self._store(issue_tls_server(self.ca, host, "ec", ips), tls_stem(host))
            self.tls_servers[host] = cred
        return cred


def init_test_pki(directory: str | os.PathLike | None, domain: str = "example.com",
                  proxy_hosts: Sequence[str] = ("proxy.example.com",),
                  users: Sequence[str] = ("alice", "bob"), key_type: KeyType = "rsa",
                  *, ca_key_type: KeyType = "ec",
                  ca_name: str | None = None, tls_ips: Sequence[str] | None = None) -> TestPKI:
    """Create a CA and credentials for ``users`` and ``proxy_hosts``.

    Files (see ``TestPKI`` for the naming): ``ca.crt/.key``,
    ``<user>.crt/.key`` and ``proxy-<host>.crt/.key``; with ``tls_ips`` (a list, maybe
    empty) also a TLS server certificate ``proxy-<host>-tls.crt/.key`` for every proxy
    host, with those IP address SANs.  With ``directory=None`` nothing is written and
    everything stays in memory.
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
        if tls_ips is not None:
            pki.tls_server(host, tls_ips)
    return pki


def load_ca(directory: str | os.PathLike) -> Credential:
    """Load ``ca.crt`` / ``ca.key`` written by ``init_test_pki``."""
    directory = Path(directory)
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    return Credential(cert=load_certificate(cert_path), key=load_private_key(key_path),
                      cert_path=cert_path, key_path=key_path)
