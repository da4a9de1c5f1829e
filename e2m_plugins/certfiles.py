"""Certificates and private keys from files or bytes: PEM or DER, one or a bundle.

Every failure on bad input is a typed ``E2MError`` whose message never quotes key
material.  ``readable_certificate`` says whether ``cryptography`` can read every field
the checks rely on (it parses some lazily).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .errors import MalformedError, UnsupportedAlgorithmError
from .privatefiles import read_private_file

__all__ = ["PathOrData", "load_certificate", "load_certificates", "load_crls",
           "load_private_key", "load_private_key_file", "readable_certificate",
           "fully_readable"]


PathOrData = Union[bytes, bytearray, memoryview, str, os.PathLike]


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


def load_crls(data_or_path: PathOrData) -> list[x509.CertificateRevocationList]:
    """The CRLs of a PEM file (one or more ``X509 CRL`` blocks) or the one of a DER file.

    Nothing is checked here: ``certpath`` uses a CRL only once its signature verifies
    with the issuer's key on a path, and only while it is current.
    """
    data = _read(data_or_path)
    try:
        if not _looks_pem(data):
            return [x509.load_der_x509_crl(data)]
        blocks = []
        for block in data.split(b"-----BEGIN X509 CRL-----")[1:]:
            end = block.find(b"-----END X509 CRL-----")
            if end < 0:
                raise ValueError("unterminated PEM block")
            blocks.append(b"-----BEGIN X509 CRL-----" + block[:end] + b"-----END X509 CRL-----\n")
        if not blocks:
            raise ValueError("no X509 CRL block")
        return [x509.load_pem_x509_crl(block) for block in blocks]
    except (ValueError, TypeError) as exc:
        raise MalformedError(f"not a readable CRL: {exc}") from None


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


def load_private_key_file(path: str | Path) -> PrivateKeyTypes:
    """A configured private key file, which only its owner may read
    (``privatefiles.read_private_file``: refused otherwise, as OpenSSH does)."""
    return load_private_key(read_private_file(path, "private key", 1 << 16))


def fully_readable(cert: x509.Certificate) -> bool:
    """cryptography parses some fields lazily; touch the ones we rely on."""
    try:
        cert.version, cert.subject, cert.issuer, cert.serial_number  # noqa: B018
        cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
        cert.extensions  # noqa: B018 - raises on duplicate or broken extensions
        cert.tbs_certificate_bytes  # noqa: B018
    except (ValueError, TypeError, x509.InvalidVersion, x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType):
        # TypeError: a name attribute whose value is a BIT STRING under another type
        # (cryptography allows it only for x500UniqueIdentifier)
        return False
    return True


# Certificates read from messages, by their DER: a sender puts the same certificate in
# every message, and a certificate object keeps what it has parsed (extensions), so the
# checks after reading are cheaper too.  x509.Certificate is immutable.  Bounded (256
# certificates, each at most limits.max_certificate_bytes when read from a message);
# emptied when full.
_READ_MEMO: dict[bytes, x509.Certificate | None] = {}
_READ_MEMO_MAX = 256
_UNREAD = object()


def readable_certificate(der: bytes) -> x509.Certificate | None:
    """The certificate if cryptography can read every field we use, else None."""
    der = bytes(der)
    known = _READ_MEMO.get(der, _UNREAD)
    if known is not _UNREAD:
        return known   # type: ignore[return-value]
    try:
        cert: x509.Certificate | None = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        cert = None
    if cert is not None and not fully_readable(cert):
        cert = None
    if len(_READ_MEMO) >= _READ_MEMO_MAX:
        _READ_MEMO.clear()
    _READ_MEMO[der] = cert
    return cert
