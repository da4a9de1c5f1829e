"""Key derivation for ECDH key agreement (RFC 5753, RFC 8418)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from . import der, oids
from ..errors import UnsupportedAlgorithmError


@dataclass(frozen=True)
class KdfScheme:
    """A dhSinglePass-stdDH key agreement scheme: which KDF and which hash."""

    oid: str
    name: str
    kind: str  # "x963" or "hkdf"
    hash: type[hashes.HashAlgorithm]

    @property
    def hashlib_name(self) -> str:
        return self.hash.name


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


_SHARED_INFO_CACHE: dict[tuple[bytes, int], bytes] = {}


def shared_info(wrap_algorithm_der: bytes, ukm: bytes | None, kek_bytes: int) -> bytes:
    """ECC-CMS-SharedInfo (RFC 5753 §7.2): wrap algorithm, optional UKM, KEK size in bits."""
    if ukm is None:  # the common case repeats: a handful of wrap algorithms
        cached = _SHARED_INFO_CACHE.get((wrap_algorithm_der, kek_bytes))
        if cached is not None:
            return cached
    parts = [wrap_algorithm_der]
    if ukm is not None:
        parts.append(der.explicit(0, der.octet_string(ukm)))
    parts.append(der.explicit(2, der.octet_string((kek_bytes * 8).to_bytes(4, "big"))))
    encoded = der.seq(*parts)
    if ukm is None and len(_SHARED_INFO_CACHE) < 64:
        _SHARED_INFO_CACHE[(wrap_algorithm_der, kek_bytes)] = encoded
    return encoded


def derive_kek(scheme: KdfScheme, shared_secret: bytes, info: bytes, kek_bytes: int) -> bytes:
    """Derive the key-encryption key from the ECDH secret.

    X9.63 (SEC 1 §3.6.1): Hash(Z || counter || SharedInfo) blocks.  HKDF
    (RFC 5869): RFC 8418 puts the SharedInfo in ``info`` and uses no salt (the
    UKM, when present, is already inside the SharedInfo).  Written on hashlib
    and hmac directly because a KEK is at most two hash blocks and the
    cryptography KDF objects cost more to build than the hashing itself.
    """
    name = scheme.hashlib_name
    if scheme.kind == "x963":
        out = b""
        counter = 1
        while len(out) < kek_bytes:
            out += hashlib.new(name, shared_secret + counter.to_bytes(4, "big") + info).digest()
            counter += 1
        return out[:kek_bytes]
    digest_size = hashlib.new(name).digest_size
    prk = hmac.digest(b"\x00" * digest_size, shared_secret, name)
    out, block, counter = b"", b"", 1
    while len(out) < kek_bytes:
        block = hmac.digest(prk, block + info + bytes([counter]), name)
        out += block
        counter += 1
    return out[:kek_bytes]
