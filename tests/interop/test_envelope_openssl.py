"""Envelope interop with `openssl cms` (Debian's OpenSSL 3.0), both directions."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from e2m_plugins.cms import (
    CertificateKey,
    KeyAgreeRecipient,
    KeyTransRecipient,
    Limits,
    SharedKEK,
    describe_envelope,
    oids,
    open_envelope,
    seal,
    sign,
)

pytestmark = pytest.mark.openssl

CONTENT = b"v=0\r\no=alice 2890844526 2890844526 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
KEK = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
KEK_ID = bytes.fromhex("c0ffee01")
PROBE_DATA = Path(__file__).resolve().parents[2] / ".ci" / "openssl-probe.d"


def _openssl_run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", "cms", *args], input=stdin, capture_output=True, timeout=60)


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    done = _openssl_run(*args, stdin=stdin)
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


def _decrypt_for(cred) -> Callable[[Path], subprocess.CompletedProcess[bytes]]:
    """``openssl cms -decrypt`` of a DER file for ``cred``, pass or fail."""
    return lambda path: _openssl_run("-decrypt", "-binary", "-inform", "DER", "-in", str(path), *_recip_args(cred))


@pytest.mark.parametrize("cipher", ["aes-128-cbc", "aes-128-gcm", "aes-256-gcm"])
def test_ours_with_cek_reference_opened_by_openssl(pki, tmp_path, openssl_attributes, cipher):
    """CBC: the reference is in unprotectedAttrs, which every OpenSSL 3.0 reads.  GCM: in
    authAttrs [1], which an OpenSSL with issue 26101 rejects (and only then)."""
    bob = pki.user("bob")
    with_ref, without = tmp_path / "ref.der", tmp_path / "plain.der"
    with_ref.write_bytes(seal(CONTENT, [KeyTransRecipient(bob.cert)], cipher=cipher, cek_reference=b"dialog-1").der)
    without.write_bytes(seal(CONTENT, [KeyTransRecipient(bob.cert)], cipher=cipher).der)
    decrypt = _decrypt_for(bob)
    if cipher.endswith("-cbc"):
        done = decrypt(with_ref)
        assert (done.returncode, done.stdout) == (0, CONTENT), done.stderr.decode(errors="replace")
    else:
        openssl_attributes.assert_opens_or_known_limit(decrypt, with_ref, without, CONTENT)


def test_ours_signed_then_sealed_with_gcm_opened_by_openssl(pki, tmp_path, openssl_attributes):
    """Sign-then-encrypt under GCM, as a UA sends it: eContentType signed-data puts a
    content-type attribute in authAttrs [1] (RFC 5083 §2.1), the other attribute
    place issue 26101 gets wrong.  The control is the same SignedData sealed as data."""
    alice, bob = pki.user("alice"), pki.user("bob")
    signed = sign(CONTENT, alice.cert, alice.key)
    with_auth, without = tmp_path / "auth.der", tmp_path / "plain.der"
    with_auth.write_bytes(seal(signed, [KeyTransRecipient(bob.cert)], cipher="aes-128-gcm",
                               content_type=oids.SIGNED_DATA).der)
    without.write_bytes(seal(signed, [KeyTransRecipient(bob.cert)], cipher="aes-128-gcm").der)
    assert [a.oid for a in describe_envelope(with_auth.read_bytes()).authenticated_attributes] == [
        oids.CONTENT_TYPE_ATTR]
    openssl_attributes.assert_opens_or_known_limit(_decrypt_for(bob), with_auth, without, signed)


def test_openssl_probe_envelopes_are_ours():
    """The probe `make setup` runs: AuthEnvelopedData made by ``seal`` for the throwaway
    KEK, a CEKReference in unauthAttrs (where ``seal`` put it before it moved to
    authAttrs; the probe tests OpenSSL's decoding of [2], so it stays), and a control
    without attributes.  We read that reference but do not use it for reuse: it is not
    under the GCM tag."""
    kek = SharedKEK(bytes.fromhex((PROBE_DATA / "kek-id.hex").read_text().strip()),
                    bytes.fromhex((PROBE_DATA / "kek.hex").read_text().strip()))
    content = (PROBE_DATA / "content.txt").read_bytes()
    with_attrs = open_envelope((PROBE_DATA / "with-unauthattrs.der").read_bytes(), [kek])
    control = open_envelope((PROBE_DATA / "without-attrs.der").read_bytes(), [kek])
    assert with_attrs.plaintext == control.plaintext == content
    assert with_attrs.envelope_type == control.envelope_type == "auth-enveloped-data"
    assert [a.name for a in with_attrs.unprotected_attributes] == ["cek-reference"]
    assert with_attrs.cek_reference is None and not with_attrs.authenticated_attributes
    assert not control.unprotected_attributes and not control.authenticated_attributes


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
    cbc = Limits(accept_cbc=True)   # CBC only when accepted
    at_bob = open_envelope(der, [CertificateKey(bob.cert, bob.key)], limits=cbc)
    at_alice = open_envelope(der, [CertificateKey(alice.cert, alice.key)], limits=cbc)
    at_proxy = open_envelope(der, [CertificateKey(proxy_ec.cert, proxy_ec.key)], limits=cbc)
    at_kek = open_envelope(der, [SharedKEK(KEK_ID, KEK)], limits=cbc)
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
