"""Envelopes for the padding-oracle checks: one good, the rest failing in every way
an attacker can choose, all for the same RSA key-transport recipient.

Used by ``tests/fuzz/test_oracle_answers.py`` (every failure gives the same
answer) and ``bench/test_oracle_timing.py`` (and takes the same time as a
good decryption, within noise), so both look at exactly the same inputs.

The RSA block is built by hand (textbook RSA with the public key) for the
padding cases, so the envelope is well-formed CMS whose encryptedKey decrypts
to exactly the block we want: a Bleichenbacher attacker's query.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from cryptography.hazmat.primitives.asymmetric import rsa

from e2m_plugins.cms.envelope import seal
from e2m_plugins.cms.recipients import CertificateKey, KeyTransRecipient

CONTENT = b"Content-Type: text/plain\r\n\r\nthe oracle test body, 64 bytes or so......\r\n"


@dataclass(frozen=True)
class _ChosenBlock:
    """A ktri recipient whose encryptedKey is ``block(cek)`` run through raw RSA (or PKCS#1 v1.5)."""

    certificate: object
    block: Callable[[bytes, int], bytes]   # (cek, k) -> k-byte block, already padded (or not)
    version: int = 0

    def build(self, cek: bytes) -> bytes:
        public = self.certificate.public_key()
        numbers = public.public_numbers()
        k = (public.key_size + 7) // 8
        good = KeyTransRecipient(self.certificate).build(cek)
        block = self.block(cek, k)
        assert len(block) == k
        encrypted = pow(int.from_bytes(block, "big"), numbers.e, numbers.n).to_bytes(k, "big")
        assert good[-k:] != encrypted and len(good) > k
        return good[:-k] + encrypted   # encryptedKey is the last field, k octets


def _nonzero(n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += bytes(b for b in os.urandom(n) if b)
    return bytes(out[:n])


def _pkcs1(payload: bytes, k: int) -> bytes:
    """A correct PKCS#1 v1.5 type 2 block around ``payload``."""
    return b"\x00\x02" + _nonzero(k - 3 - len(payload)) + b"\x00" + payload


# name -> what the RSA block holds.  All decrypt with the right private key.
BLOCKS: dict[str, Callable[[bytes, int], bytes]] = {
    # bad padding (a Bleichenbacher query that does not conform)
    "bad padding: first byte not 00": lambda cek, k: b"\x01" + _pkcs1(cek, k)[1:],
    "bad padding: block type 01": lambda cek, k: b"\x00\x01" + b"\xff" * (k - 3 - len(cek)) + b"\x00" + cek,
    "bad padding: no 00 separator": lambda cek, k: b"\x00\x02" + _nonzero(k - 2),
    "bad padding: padding string < 8 octets": lambda cek, k: (b"\x00\x02" + _nonzero(4) + b"\x00"
                                                               + os.urandom(k - 7)),
    # good padding, wrong content (a query that conforms)
    "good padding, CEK of 24 octets": lambda cek, k: _pkcs1(os.urandom(24), k),
    "good padding, empty CEK": lambda cek, k: _pkcs1(b"", k),
    "good padding, wrong CEK": lambda cek, k: _pkcs1(os.urandom(len(cek)), k),
}


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1:]


@dataclass(frozen=True)
class Case:
    name: str
    der: bytes
    keys: tuple[CertificateKey, ...]


def cases(cert, key: rsa.RSAPrivateKey, *, cipher: str = "aes-128-gcm") -> dict[str, Case]:
    """Every oracle case for ``cert``/``key`` with ``cipher`` (GCM or CBC), good one first."""
    ours = (CertificateKey(cert, key),)
    good = seal(CONTENT, [KeyTransRecipient(cert)], cipher=cipher).der
    out = {"good": Case("good", good, ours)}
    for name, block in BLOCKS.items():
        out[name] = Case(name, seal(CONTENT, [_ChosenBlock(cert, block)], cipher=cipher).der, ours)
    other = rsa.generate_private_key(public_exponent=65537, key_size=key.key_size)
    out["wrong private key"] = Case("wrong private key", good, (CertificateKey(cert, other),))
    if "gcm" in cipher:
        # AuthEnvelopedData without unauthAttrs ends with the 16-octet mac
        out["tampered GCM tag"] = Case("tampered GCM tag", _flip(good, len(good) - 1), ours)
        out["tampered ciphertext"] = Case("tampered ciphertext", _flip(good, len(good) - 16 - 20), ours)
    else:
        # EnvelopedData ends with the ciphertext: flipping the top bit of the last octet of the
        # next-to-last block makes the final padding octet >= 0x80, always invalid
        out["bad CBC padding"] = Case("bad CBC padding", _flip(good, len(good) - 17, 0x80), ours)
        out["tampered ciphertext"] = Case("tampered ciphertext", _flip(good, len(good) - 40), ours)
    return out


def oaep_good_and_bad(cert, key) -> dict[str, Case]:
    """OAEP (SHA-256): a good envelope and one whose block is not OAEP at all."""
    ours = (CertificateKey(cert, key),)
    good = seal(CONTENT, [KeyTransRecipient(cert, oaep=True)]).der
    k = (key.key_size + 7) // 8
    oaep_alg_good = KeyTransRecipient(cert, oaep=True).build(b"\x00" * 16)[:-k]
    numbers = cert.public_key().public_numbers()
    junk = pow(int.from_bytes(b"\x00" + os.urandom(k - 1), "big"), numbers.e, numbers.n).to_bytes(k, "big")
    start = good.index(oaep_alg_good) + len(oaep_alg_good)
    bad = good[:start] + junk + good[start + k:]
    assert len(bad) == len(good)
    return {"good": Case("good", good, ours), "bad OAEP block": Case("bad OAEP block", bad, ours)}


__all__ = ["BLOCKS", "CONTENT", "Case", "cases", "oaep_good_and_bad"]
