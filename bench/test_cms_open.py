"""Opening a 1 KB S/MIME body: our ``open_envelope`` per recipient kind,
cryptography's ``pkcs7_decrypt_der`` on the very same bytes, and the raw
primitives each path cannot avoid.  The report in conftest.py turns the
medians into ratios and differences; see README.md.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap
from cryptography.hazmat.primitives.serialization import pkcs7

from e2m_plugins.cms import (
    CertificateKey,
    KeyAgreeRecipient,
    KeyTransRecipient,
    Limits,
    describe_envelope,
    open_envelope,
    reuse_kek,
    seal,
)

# ------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def ktri_case(bench_pki, sdp_body):
    """ktri v0: RSA-2048 PKCS#1 v1.5, issuerAndSerialNumber, AES-128-CBC."""
    bob = bench_pki.user("bob", "rsa")
    sealed = seal(sdp_body, [KeyTransRecipient(bob.cert)], cipher="aes-128-cbc")
    desc = describe_envelope(sealed.der)
    assert desc.envelope_type == "enveloped-data" and desc.content_algorithm == "aes-128-cbc"
    assert [r.kind for r in desc.recipients] == ["ktri"]
    assert desc.recipients[0].identifier.startswith("issuer-serial=")
    return sealed.der, bob, [CertificateKey(bob.cert, bob.key)]


CBC = Limits(accept_cbc=True)   # CBC is refused by default; ktri_case is CBC (pkcs7_decrypt_der reads only CBC)


def _kari_case(pki, body, key_type, scheme):
    bob = pki.user("bob", key_type)
    sealed = seal(body, [KeyAgreeRecipient(bob.cert)], cipher="aes-128-gcm")
    desc = describe_envelope(sealed.der)
    assert desc.envelope_type == "auth-enveloped-data" and desc.content_algorithm == "aes-128-gcm"
    assert [r.kind for r in desc.recipients] == ["kari"]
    assert scheme in desc.recipients[0].key_algorithm.lower()
    return sealed.der, [CertificateKey(bob.cert, bob.key)]


@pytest.fixture(scope="module")
def kari_x25519_case(bench_pki, sdp_body):
    """kari: ephemeral-static X25519, HKDF-SHA256, AES-128 wrap, AES-128-GCM."""
    return _kari_case(bench_pki, sdp_body, "x25519", "hkdf")


@pytest.fixture(scope="module")
def kari_p256_case(bench_pki, sdp_body):
    """kari: ephemeral-static P-256, X9.63-KDF-SHA256, AES-128 wrap, AES-128-GCM."""
    return _kari_case(bench_pki, sdp_body, "ec", "sha256")


@pytest.fixture(scope="module")
def kekri_case(bench_pki, sdp_body):
    """The RFC 3185 reuse path: a second message under kekri built from the first CEK."""
    bob = bench_pki.user("bob", "rsa")
    reference = os.urandom(16)
    first = seal(sdp_body, [KeyTransRecipient(bob.cert)], cipher="aes-128-gcm", cek_reference=reference)
    opened = open_envelope(first.der, [CertificateKey(bob.cert, bob.key)], want_cek=True)
    assert opened.cek_reference == reference and opened.cek == first.cek
    second = seal(sdp_body, [reuse_kek(first.cek, reference)], cipher="aes-128-gcm")
    desc = describe_envelope(second.der)
    assert desc.content_algorithm == "aes-128-gcm"
    assert [r.kind for r in desc.recipients] == ["kekri"]
    return second.der, [reuse_kek(opened.cek, reference)]


# ------------------------------------------------------------ the paths
# Order matters a little: the two RSA openers run back to back so their ratio
# sees the same machine load.


def test_ktri_rsa_open_envelope(measure, ktri_case, sdp_body):
    data, _, keys = ktri_case
    assert open_envelope(data, keys, limits=CBC).plaintext == sdp_body
    result = measure("ktri_rsa_open", lambda: open_envelope(data, keys, limits=CBC))
    assert result.plaintext == sdp_body


def test_ktri_rsa_pkcs7_decrypt_der(measure, paired, ktri_case, sdp_body):
    data, bob, keys = ktri_case
    # Same bytes, same answer, before anything is timed.
    assert pkcs7.pkcs7_decrypt_der(data, bob.cert, bob.key, []) == open_envelope(data, keys, limits=CBC).plaintext
    result = measure("ktri_rsa_pkcs7", lambda: pkcs7.pkcs7_decrypt_der(data, bob.cert, bob.key, []))
    assert result == sdp_body
    paired("ktri_rsa_vs_pkcs7", lambda: open_envelope(data, keys, limits=CBC),
           lambda: pkcs7.pkcs7_decrypt_der(data, bob.cert, bob.key, []))


def test_kari_x25519_open_envelope(measure, kari_x25519_case, sdp_body):
    data, keys = kari_x25519_case
    assert open_envelope(data, keys).plaintext == sdp_body
    result = measure("kari_x25519_open", lambda: open_envelope(data, keys))
    assert result.plaintext == sdp_body


def test_kari_p256_open_envelope(measure, kari_p256_case, sdp_body):
    data, keys = kari_p256_case
    assert open_envelope(data, keys).plaintext == sdp_body
    result = measure("kari_p256_open", lambda: open_envelope(data, keys))
    assert result.plaintext == sdp_body


def test_kekri_open_envelope(measure, kekri_case, sdp_body):
    data, keys = kekri_case
    assert open_envelope(data, keys).plaintext == sdp_body
    result = measure("kekri_open", lambda: open_envelope(data, keys))
    assert result.plaintext == sdp_body


# ------------------------------------------------------- raw primitives


def test_raw_rsa2048_decrypt_pkcs1v15(measure, paired, bench_pki, ktri_case):
    key = bench_pki.user("bob", "rsa").key
    cek = os.urandom(16)
    encrypted = key.public_key().encrypt(cek, padding.PKCS1v15())
    result = measure("raw_rsa_decrypt", lambda: key.decrypt(encrypted, padding.PKCS1v15()))
    assert result == cek
    data, _, keys = ktri_case
    paired("ktri_rsa_vs_raw_decrypt", lambda: open_envelope(data, keys, limits=CBC),
           lambda: key.decrypt(encrypted, padding.PKCS1v15()))


def test_raw_x25519_exchange(measure, paired, bench_pki, kari_x25519_case):
    key = bench_pki.user("bob", "x25519").key
    assert isinstance(key, x25519.X25519PrivateKey)
    peer = x25519.X25519PrivateKey.generate().public_key()
    result = measure("raw_x25519_exchange", lambda: key.exchange(peer))
    assert len(result) == 32
    data, keys = kari_x25519_case
    paired("kari_x25519_vs_exchange", lambda: open_envelope(data, keys), lambda: key.exchange(peer))


def test_raw_p256_exchange(measure, paired, bench_pki, kari_p256_case):
    key = bench_pki.user("bob", "ec").key
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    algorithm = ec.ECDH()
    result = measure("raw_p256_exchange", lambda: key.exchange(algorithm, peer))
    assert len(result) == 32
    # what a kari carries: the uncompressed point, to be loaded on every open
    assert len(peer.public_bytes(serialization.Encoding.X962,
                                 serialization.PublicFormat.UncompressedPoint)) == 65
    data, keys = kari_p256_case
    paired("kari_p256_vs_exchange", lambda: open_envelope(data, keys), lambda: key.exchange(algorithm, peer))


def test_raw_aes_unwrap_and_gcm_1k(measure, paired, sdp_body, kekri_case):
    kek, cek, nonce = os.urandom(16), os.urandom(16), os.urandom(12)
    wrapped = aes_key_wrap(kek, cek)
    sealed = AESGCM(cek).encrypt(nonce, sdp_body, None)

    def unwrap_and_decrypt() -> bytes:
        return AESGCM(aes_key_unwrap(kek, wrapped)).decrypt(nonce, sealed, None)

    assert measure("raw_unwrap_gcm", unwrap_and_decrypt) == sdp_body
    data, keys = kekri_case
    paired("kekri_vs_unwrap_gcm", lambda: open_envelope(data, keys), unwrap_and_decrypt)
