"""Content encryption and key wrap: algorithm tables and the primitives.

Every failure while decrypting surfaces as the same ``DecryptionError`` so a
caller (or an attacker watching it) learns nothing about which step failed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from . import der, oids
from ..errors import DecryptionError, MalformedError, UnsupportedAlgorithmError

GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16


@dataclass(frozen=True)
class ContentCipher:
    """A content-encryption algorithm: its OID, key size and mode."""

    name: str
    oid: str
    key_bytes: int
    aead: bool
    block: str = "aes"   # "aes" or "3des"
    can_encrypt: bool = True


_CIPHERS = [
    ContentCipher("aes-128-cbc", oids.AES128_CBC, 16, False),
    ContentCipher("aes-256-cbc", oids.AES256_CBC, 32, False),
    ContentCipher("aes-128-gcm", oids.AES128_GCM, 16, True),
    ContentCipher("aes-256-gcm", oids.AES256_GCM, 32, True),
    ContentCipher("aes-192-cbc", oids.AES192_CBC, 24, False, can_encrypt=False),
    ContentCipher("aes-192-gcm", oids.AES192_GCM, 24, True, can_encrypt=False),
    ContentCipher("des-ede3-cbc", oids.DES_EDE3_CBC, 24, False, "3des", can_encrypt=False),
    ContentCipher("chacha20-poly1305", oids.CHACHA20_POLY1305, 32, True, "chacha", can_encrypt=False),
]
CIPHERS_BY_NAME = {c.name: c for c in _CIPHERS}
CIPHERS_BY_OID = {c.oid: c for c in _CIPHERS}
ENCRYPT_CIPHERS = tuple(c.name for c in _CIPHERS if c.can_encrypt)
DEFAULT_CIPHER = "aes-128-gcm"  # RFC 8591: AuthEnvelopedData with AES-128-GCM


def cipher_by_name(name: str) -> ContentCipher:
    cipher = CIPHERS_BY_NAME.get(name)
    if cipher is None or not cipher.can_encrypt:
        raise UnsupportedAlgorithmError(f"cannot encrypt with {name!r}; choose one of {ENCRYPT_CIPHERS}")
    return cipher


def cipher_by_oid(dotted: str) -> ContentCipher:
    cipher = CIPHERS_BY_OID.get(dotted)
    if cipher is None:
        raise UnsupportedAlgorithmError(f"content encryption {oids.name_of(dotted)} is not supported")
    return cipher


@dataclass(frozen=True)
class Encrypted:
    algorithm_der: bytes     # the AlgorithmIdentifier with its IV or GCM parameters
    ciphertext: bytes
    mac: bytes | None        # the GCM tag for AuthEnvelopedData


def encrypt_content(cipher: ContentCipher, cek: bytes, plaintext: bytes, aad: bytes | None = None) -> Encrypted:
    if len(cek) != cipher.key_bytes:
        raise ValueError("content key has the wrong length for the cipher")
    if cipher.aead:
        nonce = os.urandom(GCM_NONCE_BYTES)
        sealed = AESGCM(cek).encrypt(nonce, plaintext, aad)
        params = der.seq(der.octet_string(nonce), der.enc_integer(GCM_TAG_BYTES))
        return Encrypted(der.algorithm(cipher.oid, params), sealed[:-GCM_TAG_BYTES], sealed[-GCM_TAG_BYTES:])
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    enc = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    return Encrypted(der.algorithm(cipher.oid, der.octet_string(iv)), enc.update(padded) + enc.finalize(), None)


def _gcm_params(params: der.TLV | None) -> tuple[bytes, int]:
    if params is None or params.tag != der.SEQUENCE:
        raise MalformedError("GCM parameters missing")
    fields = der.items(params, 1, "GCMParameters")
    nonce = der.octets(fields[0].expect(der.OCTET_STRING, "GCM nonce"))
    icv_len = der.integer(fields[1]) if len(fields) > 1 else 12
    if not 7 <= len(nonce) <= 64 or icv_len not in (12, 13, 14, 15, 16):
        raise MalformedError("bad GCM parameters")
    return nonce, icv_len


def decrypt_content(cipher: ContentCipher, params: der.TLV | None, cek: bytes, ciphertext: bytes,
                    mac: bytes | None = None, aad: bytes | None = None) -> bytes:
    """Decrypt content; any failure (key, padding, tag) is one ``DecryptionError``."""
    if len(cek) != cipher.key_bytes:
        raise DecryptionError()
    if cipher.block == "chacha":
        return _decrypt_chacha(params, cek, ciphertext, mac, aad)
    if cipher.aead:
        nonce, icv_len = _gcm_params(params)
        if mac is None or len(mac) != icv_len:
            raise DecryptionError()
        try:
            if icv_len == GCM_TAG_BYTES and len(nonce) == GCM_NONCE_BYTES:
                return AESGCM(cek).decrypt(nonce, ciphertext + mac, aad)
            dec = Cipher(algorithms.AES(cek), modes.GCM(nonce, mac, min_tag_length=icv_len)).decryptor()
            if aad:
                dec.authenticate_additional_data(aad)
            return dec.update(ciphertext) + dec.finalize()
        except (InvalidTag, ValueError):
            raise DecryptionError() from None
    if params is None or params.tag != der.OCTET_STRING:
        raise MalformedError("CBC IV missing")
    iv = der.octets(params)
    if cipher.block == "3des":
        algo, block_bits = _triple_des(cek), 64
    else:
        algo, block_bits = algorithms.AES(cek), 128
    if len(iv) * 8 != block_bits:
        raise MalformedError("CBC IV has the wrong length")
    if not ciphertext or len(ciphertext) * 8 % block_bits:
        raise DecryptionError()
    dec = Cipher(algo, modes.CBC(iv)).decryptor()
    padded = dec.update(ciphertext) + dec.finalize()
    unpadder = padding.PKCS7(block_bits).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        pass
    # Raised outside the handler, so it carries no context that a caller (or a
    # traceback in a log) could use to tell bad padding from any other failure.
    raise DecryptionError() from None


def _decrypt_chacha(params: der.TLV | None, cek: bytes, ciphertext: bytes, mac: bytes | None,
                    aad: bytes | None) -> bytes:
    # RFC 8103: the parameters are just the 12-byte nonce; the tag is 16 bytes.
    if params is None or params.tag != der.OCTET_STRING or len(der.octets(params)) != 12:
        raise MalformedError("ChaCha20-Poly1305 nonce missing")
    if mac is None or len(mac) != 16:
        raise DecryptionError()
    try:
        return ChaCha20Poly1305(cek).decrypt(der.octets(params), ciphertext + mac, aad)
    except InvalidTag:
        raise DecryptionError() from None


def _triple_des(key: bytes):
    # TripleDES moved to the decrepit module in cryptography 43; import lazily
    # because only old messages (RFC 4134) still use it.
    try:
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    except ImportError:  # pragma: no cover - older cryptography
        TripleDES = algorithms.TripleDES  # type: ignore[attr-defined]
    return TripleDES(key)


# ---------------------------------------------------------------- key wrap

WRAP_BY_KEK_BYTES = {16: oids.AES128_WRAP, 24: oids.AES192_WRAP, 32: oids.AES256_WRAP}
KEK_BYTES_BY_WRAP = {v: k for k, v in WRAP_BY_KEK_BYTES.items()}
WRAP_BY_NAME = {"aes128-wrap": oids.AES128_WRAP, "aes192-wrap": oids.AES192_WRAP,
                "aes256-wrap": oids.AES256_WRAP}


def wrap_oid_for_kek(kek: bytes) -> str:
    try:
        return WRAP_BY_KEK_BYTES[len(kek)]
    except KeyError:
        raise ValueError("a KEK must be 16, 24 or 32 bytes") from None


def kek_bytes_for_wrap(dotted: str) -> int:
    try:
        return KEK_BYTES_BY_WRAP[dotted]
    except KeyError:
        raise UnsupportedAlgorithmError(f"key wrap {oids.name_of(dotted)} is not supported") from None


def wrap_key(kek: bytes, cek: bytes) -> bytes:
    return aes_key_wrap(kek, cek)


def unwrap_key(kek: bytes, wrapped: bytes) -> bytes:
    try:
        return aes_key_unwrap(kek, wrapped)
    except (InvalidUnwrap, ValueError):
        raise DecryptionError() from None
