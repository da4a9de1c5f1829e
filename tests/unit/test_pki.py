"""The test-PKI generator and the certificate helpers."""

from __future__ import annotations

import stat
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from e2m_plugins.errors import MalformedError, UntrustedSignerError
from e2m_plugins.testpki import (Credential, init_test_pki, issue_user, load_ca, make_ca, write_credential)
from e2m_plugins.certpath import certificate_identities, verify_chain
from e2m_plugins.cms.limits import Limits
from e2m_plugins.certfiles import load_certificate, load_certificates, load_private_key

NOW = datetime.now(timezone.utc)


def _ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


# -- generation and identities ------------------------------------------------

def test_user_identities(pki) -> None:
    ids = certificate_identities(pki.user("alice").cert)
    assert ids.uris == ("sip:alice@example.com",)
    assert ids.dns_names == ()
    assert ids.common_name == "alice@example.com"


def test_proxy_identities(pki) -> None:
    ids = certificate_identities(pki.proxy("proxy.example.com").cert)
    assert ids.dns_names == ("proxy.example.com",)
    assert ids.uris == ("sip:proxy.example.com",)
    assert ids.common_name == "proxy.example.com"


@pytest.mark.parametrize("key_type,pub_cls,signs,encipher,agree", [
    ("rsa", rsa.RSAPublicKey, True, True, False),
    ("ec", ec.EllipticCurvePublicKey, True, False, True),
    ("x25519", x25519.X25519PublicKey, False, False, True),
    ("ed25519", ed25519.Ed25519PublicKey, True, False, False),
])
def test_key_types_and_key_usage(pki, key_type, pub_cls, signs, encipher, agree) -> None:
    name = {"x25519": "dana", "ed25519": "carol"}.get(key_type, "alice")
    cert = pki.user(name, key_type).cert
    assert isinstance(cert.public_key(), pub_cls)
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature is signs
    assert ku.value.key_encipherment is encipher
    assert ku.value.key_agreement is agree
    assert ku.value.key_cert_sign is False
    assert _ext(cert, x509.BasicConstraints).value.ca is False
    # AKI of the leaf points at the CA's SKI.
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == _ext(pki.ca.cert, x509.SubjectKeyIdentifier).value.digest
    assert verify_chain(cert, [pki.ca.cert]) == [cert, pki.ca.cert]


def test_ca_extensions(pki) -> None:
    bc = _ext(pki.ca.cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    assert _ext(pki.ca.cert, x509.KeyUsage).value.key_cert_sign is True
    assert isinstance(pki.ca.key, ec.EllipticCurvePrivateKey)


def test_serials_are_random(pki) -> None:
    serials = {pki.user("alice").cert.serial_number, pki.user("bob").cert.serial_number,
               pki.user("alice", "ec").cert.serial_number, pki.ca.cert.serial_number}
    assert len(serials) == 4


def test_x25519_cert_written_and_loadable(pki) -> None:
    cred = pki.user("dana", "x25519")
    assert cred.cert_path is not None and cred.cert_path.name == "dana-x25519.crt"
    cert = load_certificate(cred.cert_path)
    key = load_private_key(cred.key_path)
    assert isinstance(cert.public_key(), x25519.X25519PublicKey)
    assert isinstance(key, x25519.X25519PrivateKey)
    assert key.public_key().public_bytes_raw() == cert.public_key().public_bytes_raw()


def test_lazy_issue_is_cached(pki) -> None:
    first = pki.user("bob", "x25519")
    assert pki.user("bob", "x25519") is first
    assert certificate_identities(first.cert).uris == ("sip:bob@example.com",)


def test_rsa_ca(tmp_path) -> None:
    ca = make_ca("RSA CA", "rsa")
    user = issue_user(ca, "sip:erin@example.org", "ec")
    assert verify_chain(user.cert, [ca.cert]) == [user.cert, ca.cert]


def test_x25519_cannot_be_ca() -> None:
    with pytest.raises(ValueError):
        make_ca("nope", "x25519")


# -- files ---------------------------------------------------------------------

def test_file_modes_and_names(pki) -> None:
    d = pki.directory
    for stem in ("ca", "alice", "bob", "alice-ec", "dana-x25519", "proxy-proxy.example.com",
                 "proxy-proxy.example.com-ec", "proxy-proxy.example.com-x25519"):
        crt, key = d / f"{stem}.crt", d / f"{stem}.key"
        assert crt.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_write_credential_tightens_existing_file(tmp_path) -> None:
    ca = make_ca("CA")
    (tmp_path / "ca.key").write_bytes(b"old")
    (tmp_path / "ca.key").chmod(0o644)
    cred = write_credential(ca, tmp_path, "ca")
    assert stat.S_IMODE(cred.key_path.stat().st_mode) == 0o600
    again = load_ca(tmp_path)
    assert again.cert == ca.cert


def test_init_test_pki_layout(tmp_path) -> None:
    made = init_test_pki(tmp_path, domain="example.net", proxy_hosts=("p1.example.net",),
                         users=("zoe",), key_type="ec")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca.crt", "ca.key", "proxy-p1.example.net.crt", "proxy-p1.example.net.key",
        "zoe.crt", "zoe.key"]
    assert certificate_identities(made.user("zoe").cert).uris == ("sip:zoe@example.net",)
    assert made.proxy("p1.example.net").cert_path == tmp_path / "proxy-p1.example.net.crt"


def test_in_memory_pki() -> None:
    made = init_test_pki(None, users=("a",), proxy_hosts=(), key_type="ec")
    assert made.user("a").cert_path is None


# -- loading -------------------------------------------------------------------

def test_load_der_and_pem(pki) -> None:
    cert = pki.user("alice").cert
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert load_certificate(der) == cert
    assert load_certificate(pem) == cert
    assert load_certificate(pem.decode()) == cert
    bundle = pem + pki.ca.cert.public_bytes(serialization.Encoding.PEM)
    assert load_certificates(bundle) == [cert, pki.ca.cert]
    assert load_certificates(der) == [cert]


def test_load_private_key_formats(pki) -> None:
    key = pki.user("alice").key
    nums = key.private_numbers()
    for enc, fmt in [
        (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8),
        (serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL),
        (serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL),
    ]:
        data = key.private_bytes(enc, fmt, serialization.NoEncryption())
        assert load_private_key(data).private_numbers() == nums


@pytest.mark.parametrize("garbage", [b"", b"\x30\x03\x02\x01", b"hello world",
                                     b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_load_errors_are_typed(garbage) -> None:
    with pytest.raises(MalformedError):
        load_certificate(garbage)
    with pytest.raises(MalformedError):
        load_certificates(garbage if garbage else b"-----BEGIN X-----\n")
    with pytest.raises(MalformedError):
        load_private_key(garbage)


def test_encrypted_key_refused_without_leaking(pki) -> None:
    data = pki.user("alice", "ec").key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(MalformedError) as info:
        load_private_key(data)
    assert "BEGIN" not in str(info.value)


def test_load_from_path(pki) -> None:
    cred = pki.user("bob")
    assert load_certificate(str(cred.cert_path)) == cred.cert
    assert load_certificates(cred.cert_path) == [cred.cert]


# -- verify_chain --------------------------------------------------------------

def test_chain_with_intermediate() -> None:
    root = make_ca("Root")
    # An intermediate CA is a CA certificate issued by the root.
    inter_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Inter")])
    inter_cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(root.cert.subject)
        .public_key(inter_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256()))
    inter = Credential(inter_cert, inter_key)
    leaf = issue_user(inter, "sip:x@example.com", "ec")
    assert verify_chain(leaf.cert, [root.cert], [inter_cert]) == [leaf.cert, inter_cert, root.cert]
    with pytest.raises(UntrustedSignerError, match="no trusted path"):
        verify_chain(leaf.cert, [root.cert])


def test_leaf_as_its_own_anchor(pki) -> None:
    cert = pki.user("bob").cert
    assert verify_chain(cert, [cert]) == [cert]


def test_expired() -> None:
    # The CA must have been valid back then too: the anchor's validity counts.
    ca = make_ca("Long CA", not_before=NOW - timedelta(days=60))
    cred = issue_user(ca, "sip:old@example.com", "ec",
                      not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1))
    with pytest.raises(UntrustedSignerError, match="expired"):
        verify_chain(cred.cert, [ca.cert])
    # The injectable clock and the switch both let it pass.
    verify_chain(cred.cert, [ca.cert], at=NOW - timedelta(days=10))
    verify_chain(cred.cert, [ca.cert], check_time=False)


def test_not_yet_valid(pki) -> None:
    cred = issue_user(pki.ca, "sip:new@example.com", "ec",
                      not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=30))
    with pytest.raises(UntrustedSignerError, match="not yet valid"):
        verify_chain(cred.cert, [pki.ca.cert])
    verify_chain(cred.cert, [pki.ca.cert], at=NOW + timedelta(days=2))


def test_expired_ca(pki) -> None:
    old_ca = make_ca("Old CA", not_before=NOW - timedelta(days=20),
                     not_after=NOW - timedelta(days=10))
    leaf = issue_user(old_ca, "sip:y@example.com", "ec",
                      not_before=NOW - timedelta(days=15), not_after=NOW + timedelta(days=10))
    with pytest.raises(UntrustedSignerError, match="expired"):
        verify_chain(leaf.cert, [old_ca.cert])


def test_untrusted_ca(pki) -> None:
    other = make_ca("Other CA")
    with pytest.raises(UntrustedSignerError, match="neither a trust anchor"):
        verify_chain(pki.user("alice").cert, [other.cert])


def test_same_name_wrong_key(pki) -> None:
    # A CA with the same name but another key: the signature cannot match.
    impostor = make_ca(pki.ca.cert.subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME)[0].value)
    with pytest.raises(UntrustedSignerError, match="bad signature"):
        verify_chain(pki.user("alice").cert, [impostor.cert])


def test_tampered_signature(pki) -> None:
    der = bytearray(pki.user("alice", "ec").cert.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA signature value
    tampered = x509.load_der_x509_certificate(bytes(der))
    with pytest.raises(UntrustedSignerError, match="bad signature"):
        verify_chain(tampered, [pki.ca.cert])


def test_issuer_must_be_ca(pki) -> None:
    # A leaf cannot issue, even when it is a trust anchor.
    alice = pki.user("alice", "ec")
    fake = issue_user(alice, "sip:mallory@example.com", "ec")
    with pytest.raises(UntrustedSignerError, match="not a CA"):
        verify_chain(fake.cert, [alice.cert])


def test_rfc4134_rsa_and_dsa(vectors_dir) -> None:
    # RSA-1024, DSA and SHA-1: refused by default, so these old vectors get legacy limits.
    legacy = Limits(accept_legacy_algorithms=True, min_rsa_bits=1024)
    d = vectors_dir / "rfc4134"
    for leaf, root in [("AliceRSASignByCarl.cer", "CarlRSASelf.cer"),
                       ("AliceDSSSignByCarlNoInherit.cer", "CarlDSSSelf.cer")]:
        leaf_cert, root_cert = load_certificate(d / leaf), load_certificate(d / root)
        assert verify_chain(leaf_cert, [root_cert], check_time=False,
                            limits=legacy) == [leaf_cert, root_cert]
        with pytest.raises(UntrustedSignerError):
            verify_chain(leaf_cert, [root_cert], check_time=False)  # default limits
        with pytest.raises(UntrustedSignerError):
            # RSA leaf against DSA root and vice versa: names differ.
            verify_chain(leaf_cert, [load_certificate(d / ("CarlDSSSelf.cer" if "RSA" in leaf
                                                           else "CarlRSASelf.cer"))],
                         check_time=False, limits=legacy)


def test_rfc4134_dsa_inherited_params_is_typed(vectors_dir) -> None:
    # DSA parameters inherited from the issuer are not supported by cryptography.
    with pytest.raises(MalformedError):
        load_certificate(vectors_dir / "rfc4134" / "DianeDSSSignByCarlInherit.cer")
