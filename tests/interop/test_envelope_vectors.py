"""Foreign envelopes (RFC 4134, draft-ireland-examples-cms) opened by our code."""

from __future__ import annotations

import base64
import email

import pytest

from e2m_plugins.cms import CertificateKey, Limits, SharedKEK, describe_envelope, open_envelope
from e2m_plugins.errors import NoMatchingRecipientError, UnsupportedAlgorithmError, DecryptionError
from e2m_plugins.certfiles import load_certificate, load_private_key

SAMPLE = b"This is some sample content."
# These foreign vectors are EnvelopedData (CBC), opened only when a setting accepts
# CBC; the RFC 4134 ones use 3DES, a legacy algorithm too.
CBC = Limits(accept_cbc=True)
LEGACY = Limits(accept_cbc=True, accept_legacy_algorithms=True)


def _key(folder, cert_name, key_name):
    return CertificateKey(load_certificate(folder / cert_name), load_private_key(folder / key_name))


@pytest.fixture(scope="module")
def rfc4134(vectors_dir):
    return vectors_dir / "rfc4134"


@pytest.fixture(scope="module")
def lamps(vectors_dir):
    return vectors_dir / "examples-cms"


def test_rfc4134_5_1_triple_des_to_bob(rfc4134):
    bob = _key(rfc4134, "BobRSASignByCarl.cer", "BobPrivRSAEncrypt.pri")
    with pytest.raises(UnsupportedAlgorithmError):   # 3DES: refused by default
        open_envelope((rfc4134 / "5.1.bin").read_bytes(), [bob])
    opened = open_envelope((rfc4134 / "5.1.bin").read_bytes(), [bob], limits=LEGACY)
    assert opened.plaintext == (rfc4134 / "ExContent.bin").read_bytes() == SAMPLE
    assert opened.content_algorithm == "des-ede3-cbc"
    assert opened.recipient.kind == "ktri"


def test_rfc4134_5_2_rc2_is_parsed_and_reported_unsupported(rfc4134):
    data = (rfc4134 / "5.2.bin").read_bytes()
    description = describe_envelope(data)
    assert description.content_algorithm == "rc2-cbc"
    assert [r.kind for r in description.recipients] == ["ktri", "kekri"]
    assert description.recipients[1].wrap_algorithm == "cmsrc2-wrap"
    bob = _key(rfc4134, "BobRSASignByCarl.cer", "BobPrivRSAEncrypt.pri")
    with pytest.raises(UnsupportedAlgorithmError):
        open_envelope(data, [bob])


def test_rfc4134_5_3_smime_entity(rfc4134):
    message = email.message_from_bytes((rfc4134 / "5.3.eml").read_bytes())
    assert message.get_content_type() == "application/pkcs7-mime"
    der = base64.b64decode(message.get_payload())
    bob = _key(rfc4134, "BobRSASignByCarl.cer", "BobPrivRSAEncrypt.pri")
    assert open_envelope(der, [bob], limits=LEGACY).plaintext == SAMPLE


def test_bob_and_dana_two_recipients_each_open(lamps):
    """Bob by RSA-OAEP-SHA256, Dana by X25519 X9.63-KDF: the UA+proxy shape."""
    data = (lamps / "binary-files" / "encryptedForBobAndDana.p7m").read_bytes()
    keys = lamps / "certs-and-keys"
    bob = _key(keys, "lamps-bob.encrypt.crt", "lamps-bob.decrypt.p8.pem")
    dana = _key(keys, "lamps-dana.encrypt.crt", "lamps-dana.decrypt.p8.pem")
    at_bob = open_envelope(data, [bob], limits=CBC)
    at_dana = open_envelope(data, [dana], limits=CBC)
    assert at_bob.plaintext == at_dana.plaintext == SAMPLE
    assert at_bob.recipient.key_algorithm == "rsaes-oaep"
    assert at_dana.recipient.key_algorithm == "x25519/ecdh-x963kdf-sha256"
    assert at_dana.content_algorithm == "aes-128-cbc"


def test_bob_oaep(lamps):
    keys = lamps / "certs-and-keys"
    bob = _key(keys, "lamps-bob.encrypt.crt", "lamps-bob.decrypt.p8.pem")
    data = (lamps / "binary-files" / "encryptedForBobRSAOaep.p7m").read_bytes()
    assert open_envelope(data, [bob], limits=CBC).plaintext == SAMPLE


def test_dana_x25519_hkdf_auth_enveloped(lamps):
    keys = lamps / "certs-and-keys"
    dana = _key(keys, "lamps-dana.encrypt.crt", "lamps-dana.decrypt.p8.pem")
    data = (lamps / "binary-files" / "authEnvelopedForDanaX25519HKDF.p7m").read_bytes()
    opened = open_envelope(data, [dana])
    assert opened.plaintext == SAMPLE
    assert opened.envelope_type == "auth-enveloped-data"
    assert opened.content_algorithm == "aes-128-gcm"
    assert opened.recipient.wrap_algorithm == "aes256-wrap"


def test_bob_chacha20_poly1305(lamps):
    keys = lamps / "certs-and-keys"
    bob = _key(keys, "lamps-bob.encrypt.crt", "lamps-bob.decrypt.p8.pem")
    data = (lamps / "binary-files" / "authEnvelopedForBobChaCha20Poly1305.p7m").read_bytes()
    opened = open_envelope(data, [bob])
    assert opened.plaintext == SAMPLE
    assert opened.content_algorithm == "chacha20-poly1305"


def test_kekri_without_the_kek_is_parsed_and_refused(lamps):
    """The KEK for this vector is not shipped: we can describe it, not open it."""
    data = (lamps / "binary-files" / "encryptedKekri.p7m").read_bytes()
    description = describe_envelope(data)
    assert [(r.kind, r.identifier, r.wrap_algorithm) for r in description.recipients] == [
        ("kekri", "kekid=" + b"keyid".hex(), "aes256-wrap")]
    assert description.content_algorithm == "aes-192-cbc"
    with pytest.raises(NoMatchingRecipientError):
        open_envelope(data, [SharedKEK(b"other", bytes(32))])
    with pytest.raises(DecryptionError):
        open_envelope(data, [SharedKEK(b"keyid", bytes(32))])
