"""Certificates and private keys from files or bytes: PEM or DER, one or a bundle.

Every failure on bad input is a typed ``E2MError`` whose message never quotes key
material.  ``readable_certificate`` says whether ``cryptography`` can read every field
the checks rely on (it parses some lazily).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from .errors import E2MError, LimitExceededError, MalformedError, UnsupportedAlgorithmError
from .privatefiles import read_private_file

if TYPE_CHECKING:
    from .cms.limits import Limits

__all__ = ["PathOrData", "load_certificate", "load_certificates", "load_crls",
           "load_private_key", "load_private_key_file", "readable_certificate",
           "fully_readable", "CertificateCounts", "certificate_counts",
           "check_certificate_counts", "known_counts"]


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


# What a certificate holds, counted with the project's DER reader before cryptography
# reads it: cryptography builds a Python object for every name attribute and every
# extension entry (a subject of 670 RDNs cost 1.7 ms to read, and again on every
# ``cert.subject``; review 103), so a stranger's 16 KiB certificate is refused by what it
# holds, not only by its size.  See ``certificate_counts``.
_SAN_OID = "2.5.29.17"


@dataclass(frozen=True)
class CertificateCounts:
    """What one certificate holds, as counted by ``certificate_counts``."""

    elements: int           # DER elements, the contents of extensions included
    name_attributes: int    # attributes of its subject or issuer, whichever has more
    san_entries: int        # subjectAltName entries (0 without the extension)


# Extensions cryptography parses into objects (the rest it keeps as opaque bytes): an
# extension value our reader cannot count must not be one of these.
_PARSED_EXTENSIONS = frozenset(oid.dotted_string for oid in vars(x509.ExtensionOID).values()
                               if isinstance(oid, x509.ObjectIdentifier))


class _Uncountable(LimitExceededError):
    """An extension cryptography parses whose value our reader cannot count."""


def certificate_counts(der_bytes: bytes, max_elements: int) -> CertificateCounts:
    """Count a DER certificate's elements (extension values read as DER where they
    are), the attributes of its subject and of its issuer, and its SAN entries, reading
    at most ``max_elements`` elements: ``LimitExceededError`` past that, whatever the
    certificate holds (the work is bounded before it is done); ``MalformedError`` if
    the structure is not a certificate the reader can read."""
    from .cms import der   # cms.signed imports this module

    data = bytes(der_bytes)
    count = der.Count(max_elements)
    try:
        der.scan(data, count)                  # every element, headers only: bounded first
        fields = der.items(der.read_all(data), 3, "Certificate")
        tbs = der.items(fields[0].expect(der.SEQUENCE, "tbsCertificate"), 6, "tbsCertificate")
        at = 1 if tbs[0].tag == der.context(0) else 0
        if len(tbs) < at + 6:
            raise MalformedError("tbsCertificate: too few fields")
        widest = 0
        for name in (tbs[at + 2], tbs[at + 4]):            # issuer, subject
            rdns = der.items(name.expect(der.SEQUENCE, "Name"))
            widest = max(widest, sum(len(der.items(rdn.expect(der.SET, "RDN")))
                                     for rdn in rdns))
        san = 0
        for wrapper in (t for t in tbs[at + 6:] if t.tag == der.context(3)):
            for ext in der.items(der.items(wrapper, 1, "extensions")[0]):
                parts = der.items(ext.expect(der.SEQUENCE, "Extension"), 2, "Extension")
                value = parts[-1]
                if value.tag != der.OCTET_STRING:
                    raise MalformedError("Extension: extnValue is not an OCTET STRING")
                try:
                    der.scan(value.value, count)   # what it reads is counted, read or not
                except MalformedError:
                    if der.oid(parts[0]) in _PARSED_EXTENSIONS:
                        # cryptography would build what we could not count (review 105: a
                        # SAN whose first entry nests past our depth hid 5,300 entries):
                        # beyond what we bound, so refused as such
                        raise _Uncountable(f"extension {der.oid(parts[0])} cannot be "
                                           "counted") from None
                    continue   # kept as opaque bytes by cryptography: nothing built

                if der.oid(parts[0]) == _SAN_OID and value.value[:1] == b"\x30":
                    san = max(san, len(der.items(der.read_all(value.value))))
    except _Uncountable as exc:        # refused as beyond our bounds, by the usual type
        raise LimitExceededError(str(exc)) from None
    except LimitExceededError:
        raise LimitExceededError(f"certificate of more than {max_elements} DER elements "
                                 "(extension contents included)") from None
    except E2MError as exc:
        raise MalformedError(f"not a readable certificate: {exc}") from None
    return CertificateCounts(max_elements - count.left, widest, san)


def check_certificate_counts(counts: CertificateCounts, limits: Limits) -> None:
    """``LimitExceededError`` if a name or the SAN of a counted certificate is over
    ``limits`` (its elements are bounded while they are counted)."""
    if counts.name_attributes > limits.max_name_attributes:
        raise LimitExceededError(
            f"a certificate name of {counts.name_attributes} attributes exceeds the limit "
            f"of {limits.max_name_attributes}")
    if counts.san_entries > limits.max_san_entries:
        raise LimitExceededError(f"{counts.san_entries} subjectAltName entries exceed the "
                                 f"limit of {limits.max_san_entries}")


# Certificates read from messages, by their DER: a sender puts the same certificate in
# every message, and a certificate object keeps what it has parsed (extensions), so the
# checks after reading are cheaper too.  x509.Certificate is immutable.  Each entry keeps
# the certificate's counts too (None when unreadable), so a certificate seen again is
# checked against the limits of the call without being counted again.  Bounded (256
# certificates, each at most limits.max_certificate_bytes when read from a message);
# emptied when full.
_READ_MEMO: dict[bytes, tuple[x509.Certificate | None, CertificateCounts | None]] = {}
_READ_MEMO_MAX = 256
_UNREAD = (None, None)


# A certificate's own bytes, by the object: the per-message memos (paths, signing keys,
# identities, usage) key on these.  cryptography encodes a certificate anew on every
# ``public_bytes`` (some 30 µs) and hashes one by its parsed fields (some 4 µs), while
# the same bytes object hashes once.  Each entry holds its certificate, so an id is
# never reused while it is here; bounded as ``_READ_MEMO`` and emptied when full.
_KEY_OF: dict[int, tuple[x509.Certificate, bytes]] = {}
_KEY_OF_MAX = 256


def certificate_key(cert: x509.Certificate) -> bytes:
    """Bytes that stand for ``cert`` in a memo: its DER (as read from a message, or as
    cryptography writes it).  Two certificates have equal keys only if they are equal."""
    held = _KEY_OF.get(id(cert))
    if held is not None and held[0] is cert:
        return held[1]
    return _hold_key(cert, cert.public_bytes(serialization.Encoding.DER))


def _hold_key(cert: x509.Certificate, der: bytes) -> bytes:
    if len(_KEY_OF) >= _KEY_OF_MAX:
        _KEY_OF.clear()
    _KEY_OF[id(cert)] = (cert, der)
    return der


def known_counts(der_bytes: bytes) -> CertificateCounts | None:
    """The counts of a certificate ``readable_certificate`` has read, if it still
    remembers them."""
    return _READ_MEMO.get(bytes(der_bytes), _UNREAD)[1]


def readable_certificate(der: bytes, limits: Limits | None = None) -> x509.Certificate | None:
    """The certificate if cryptography can read every field we use, else None.

    Before cryptography reads anything, the certificate is counted
    (``certificate_counts``): more than ``limits.max_certificate_elements`` DER
    elements, a subject or issuer of more than ``limits.max_name_attributes``
    attributes or more than ``limits.max_san_entries`` SAN entries is
    ``LimitExceededError``; a structure the DER reader cannot read is unreadable (None).
    """
    if limits is None:
        from .cms.limits import DEFAULT_LIMITS   # cms.signed imports this module
        limits = DEFAULT_LIMITS
    der = bytes(der)
    known = _READ_MEMO.get(der)
    if known is not None:
        cert, counts = known
        if counts is not None:
            check_certificate_counts(counts, limits)
        return cert
    try:
        counts: CertificateCounts | None = certificate_counts(der, limits.max_certificate_elements)
    except MalformedError:
        counts = None
    cert: x509.Certificate | None = None
    if counts is not None:
        check_certificate_counts(counts, limits)   # refused: never read, never kept
        try:
            cert = x509.load_der_x509_certificate(der)
        except (ValueError, x509.InvalidVersion):
            cert = None
        if cert is not None and not fully_readable(cert):
            cert = None
        if cert is not None:
            _hold_key(cert, der)      # the bytes it was read from: no encoding again
    if len(_READ_MEMO) >= _READ_MEMO_MAX:
        _READ_MEMO.clear()
    _READ_MEMO[der] = (cert, counts)
    return cert
