"""Envelope interop with `openssl cms` (Debian's OpenSSL 3.0), both directions."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from e2m_plugins.cms import (
    CertificateKey,
    KeyAgreeRecipient,
    KeyTransRecipient,
    SharedKEK,
    open_envelope,
    seal,
)

pytestmark = [pytest.mark.openssl,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")]

CONTENT = b"v=0\r\no=alice 2890844526 2890844526 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
KEK = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
KEK_ID = bytes.fromhex("c0ffee01")


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", "cms", *args], input=stdin, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def _openssl_decrypt(tmp_path, der: bytes, *extra: str) -> bytes:
    path = tmp_path / "in.der"
    path.write_bytes(der)
    return _openssl("-decrypt", "-binary", "-inform", "DER", "-in", str(path), *extra)


def _recip_args(cred) -> tuple[str, ...]:
    return ("-recip", str(cred.cert_path), "-inkey", str(cred.key_path))


@pytest.mark.parametrize("cipher", ["aes-128-cbc", "aes-256-cbc", "aes-128-gcm", "aes-256-gcm"])
def test_ours_opened_by_openssl_each_recipient(pki, tmp_path, cipher):
    """One envelope for ktri v1.5, ktri OAEP (SKI rid), kari P-256 and kekri."""
    bob, alice, proxy_ec = pki.user("bob"), pki.user("alice"), pki.proxy("proxy.example.com", "ec")
    sealed = seal(CONTENT, [KeyTransRecipient(bob.cert), KeyTransRecipient(alice.cert, oaep=True, use_ski=True),
                            KeyAgreeRecipient(proxy_ec.cert), SharedKEK(KEK_ID, KEK)], cipher=cipher)
    assert _openssl_decrypt(tmp_path, sealed.der, *_recip_args(bob)) == CONTENT
    assert _openssl_decrypt(tmp_path, sealed.der, *_recip_args(alice)) == CONTENT
    assert _openssl_decrypt(tmp_path, sealed.der, *_recip_args(proxy_ec)) == CONTENT
    assert _openssl_decrypt(tmp_path, sealed.der, "-secretkey", KEK.hex(), "-secretkeyid", KEK_ID.hex()) == CONTENT


def test_ours_with_cek_reference_opened_by_openssl(pki, tmp_path):
    bob = pki.user("bob")
    for cipher in ("aes-128-cbc", "aes-128-gcm"):
        sealed = seal(CONTENT, [KeyTransRecipient(bob.cert)], cipher=cipher, cek_reference=b"dialog-1")
        assert _openssl_decrypt(tmp_path, sealed.der, *_recip_args(bob)) == CONTENT


def _openssl_encrypt(tmp_path, cipher: str, *recipient_args: str) -> bytes:
    src = tmp_path / "plain.txt"
    src.write_bytes(CONTENT)
    return _openssl("-encrypt", "-binary", "-outform", "DER", "-in", str(src), f"-{cipher}", *recipient_args)


@pytest.mark.parametrize("cipher", ["aes-128-cbc", "aes-256-cbc", "aes-128-gcm", "aes-256-gcm"])
def test_openssl_multi_recipient_opened_by_us(pki, tmp_path, cipher):
    bob, alice = pki.user("bob"), pki.user("alice")
    proxy_ec = pki.proxy("proxy.example.com", "ec")
    der = _openssl_encrypt(
        tmp_path, cipher,
        "-recip", str(bob.cert_path),
        "-recip", str(alice.cert_path), "-keyopt", "rsa_padding_mode:oaep",
        "-keyopt", "rsa_oaep_md:sha256", "-keyopt", "rsa_mgf1_md:sha256",
        "-recip", str(proxy_ec.cert_path),
        "-secretkey", KEK.hex(), "-secretkeyid", KEK_ID.hex())
    at_bob = open_envelope(der, [CertificateKey(bob.cert, bob.key)])
    at_alice = open_envelope(der, [CertificateKey(alice.cert, alice.key)])
    at_proxy = open_envelope(der, [CertificateKey(proxy_ec.cert, proxy_ec.key)])
    at_kek = open_envelope(der, [SharedKEK(KEK_ID, KEK)])
    assert at_bob.plaintext == at_alice.plaintext == at_proxy.plaintext == at_kek.plaintext == CONTENT
    assert at_bob.recipient.key_algorithm == "rsa-pkcs1v15"
    assert at_alice.recipient.key_algorithm == "rsaes-oaep"
    assert at_proxy.recipient.kind == "kari"
    assert at_bob.content_algorithm == cipher


def test_openssl_ski_rids_and_sha256_kdf_opened_by_us(pki, tmp_path):
    bob, proxy_ec = pki.user("bob"), pki.proxy("proxy.example.com", "ec")
    der = _openssl_encrypt(tmp_path, "aes-128-gcm", "-keyid", "-recip", str(bob.cert_path),
                           "-recip", str(proxy_ec.cert_path), "-keyopt", "ecdh_kdf_md:sha256")
    assert open_envelope(der, [CertificateKey(bob.cert, bob.key)]).recipient.identifier.startswith("ski=")
    at_proxy = open_envelope(der, [CertificateKey(proxy_ec.cert, proxy_ec.key)])
    assert at_proxy.plaintext == CONTENT
    assert at_proxy.recipient.key_algorithm == "ec-public-key/ecdh-x963kdf-sha256"
