"""Key derivation for ECDH key agreement (RFC 5753, RFC 8418)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from . import der, oids
from ..errors import UnsupportedAlgorithmError


@dataclass(frozen=True)
class KdfScheme:
    """A dhSinglePass-stdDH key agreement scheme: which KDF and which hash."""

    oid: str
    name: str
    kind: str  # "x963" or "hkdf"
    hash: type[hashes.HashAlgorithm]


_SCHEMES = [
    KdfScheme(oids.STDDH_SHA1KDF, "x963-sha1", "x963", hashes.SHA1),
    KdfScheme(oids.STDDH_SHA224KDF, "x963-sha224", "x963", hashes.SHA224),
    KdfScheme(oids.STDDH_SHA256KDF, "x963-sha256", "x963", hashes.SHA256),
    KdfScheme(oids.STDDH_SHA384KDF, "x963-sha384", "x963", hashes.SHA384),
    KdfScheme(oids.STDDH_SHA512KDF, "x963-sha512", "x963", hashes.SHA512),
    KdfScheme(oids.STDDH_HKDF_SHA256, "hkdf-sha256", "hkdf", hashes.SHA256),
    KdfScheme(oids.STDDH_HKDF_SHA384, "hkdf-sha384", "hkdf", hashes.SHA384),
    KdfScheme(oids.STDDH_HKDF_SHA512, "hkdf-sha512", "hkdf", hashes.SHA512),
]
SCHEMES_BY_OID = {s.oid: s for s in _SCHEMES}
SCHEMES_BY_NAME = {s.name: s for s in _SCHEMES}


def scheme_by_oid(dotted: str) -> KdfScheme:
    scheme = SCHEMES_BY_OID.get(dotted)
    if scheme is None:
        raise UnsupportedAlgorithmError(f"key agreement {oids.name_of(dotted)} is not supported")
    return scheme


def scheme_by_name(name: str) -> KdfScheme:
    scheme = SCHEMES_BY_NAME.get(name)
    if scheme is None:
        raise UnsupportedAlgorithmError(f"unknown KDF {name!r}; choose one of {sorted(SCHEMES_BY_NAME)}")
    return scheme


def shared_info(wrap_algorithm_der: bytes, ukm: bytes | None, kek_bytes: int) -> bytes:
    """ECC-CMS-SharedInfo (RFC 5753 §7.2): wrap algorithm, optional UKM, KEK size in bits."""
    parts = [wrap_algorithm_der]
    if ukm is not None:
        parts.append(der.explicit(0, der.octet_string(ukm)))
    parts.append(der.explicit(2, der.octet_string((kek_bytes * 8).to_bytes(4, "big"))))
    return der.seq(*parts)


def derive_kek(scheme: KdfScheme, shared_secret: bytes, info: bytes, kek_bytes: int) -> bytes:
    """Derive the key-encryption key from the ECDH secret.

    RFC 8418 puts the SharedInfo in HKDF's ``info`` and uses no salt (the UKM,
    when present, is already inside the SharedInfo).
    """
    if scheme.kind == "x963":
        return X963KDF(scheme.hash(), kek_bytes, info).derive(shared_secret)
    return HKDF(scheme.hash(), kek_bytes, None, info).derive(shared_secret)
