"""Certificate store and the user / proxy certificate checks."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2m_plugins.certstore import (
    CertStore,
    certificate_matches_aor,
    certificate_matches_host,
    check_proxy_certificate,
    check_user_certificate,
    fingerprint_sha256,
    matches_fingerprint,
)
from e2m_plugins.uri import SipIdentity, identity_of as parse_sip_uri
from e2m_plugins.errors import CertificateRejectedError, MalformedError, UntrustedSignerError
from e2m_plugins.testpki import Credential, TestPKI, issue_proxy, issue_user, make_ca

HOST = "proxy.example.com"
ALICE = "sip:alice@example.com"
NOW = datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def foreign_ca() -> Credential:
    return make_ca("Foreign CA", "ec")


def _build(ca: Credential, cn: str, san: list[x509.GeneralName] | None, *,
           key_usage: x509.KeyUsage | None = None,
           eku: list[x509.ObjectIdentifier] | None = None, ca_cert: bool = False,
           key: ec.EllipticCurvePrivateKey | None = None) -> Credential:
    """An EC P-256 certificate with exactly the extensions a test needs."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(NOW - timedelta(minutes=5))
               .not_valid_after(NOW + timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca_cert, path_length=None), critical=True))
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return Credential(cert=builder.sign(ca.key, hashes.SHA256()), key=key)


def _ku(**flags: bool) -> x509.KeyUsage:
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(**{n: flags.get(n, False) for n in names})


# --------------------------------------------------------------------------
# Names


def test_sip_uri_normalisation() -> None:
    alice = SipIdentity("alice", "example.com")
    for uri in ("sip:alice@example.com", "sips:alice@EXAMPLE.com", "SIP:alice@example.com.",
                "<sip:alice@example.com:5061;transport=tls?subject=x>", "sip:al%69ce@example.com"):
        assert parse_sip_uri(uri) == alice, uri
    assert parse_sip_uri("sip:Alice@example.com") != alice  # the user part is case-sensitive
    assert parse_sip_uri("sip:[2001:DB8::1]:5060") == SipIdentity(None, "[2001:db8::1]")
    for bad in ("tel:+123", "sip:alice:secret@example.com", "sip:@example.com", "mailto:a@b", "sip:"):
        assert parse_sip_uri(bad) is None, bad


def test_user_certificate_matches_its_aor(pki: TestPKI) -> None:
    cert = pki.user("alice").cert
    assert certificate_matches_aor(cert, ALICE)
    assert certificate_matches_aor(cert, "sips:alice@Example.COM:5061;transport=tls")
    assert not certificate_matches_aor(cert, "sip:bob@example.com")
    assert not certificate_matches_aor(cert, "sip:alice@example.org")
    with pytest.raises(MalformedError):
        certificate_matches_aor(cert, "sip:example.com")  # an AoR has a user part


# --------------------------------------------------------------------------
# User checks


def test_good_user_certificates_pass(pki: TestPKI) -> None:
    for kt in ("rsa", "ec"):
        path = check_user_certificate(pki.user("alice", kt).cert, ALICE, [pki.ca.cert])
        assert path[-1] == pki.ca.cert
    check_user_certificate(pki.user("dana", "x25519").cert, "sip:dana@example.com", [pki.ca.cert])


def test_user_aor_mismatch(pki: TestPKI) -> None:
    with pytest.raises(CertificateRejectedError, match="not for sip:bob@example.com"):
        check_user_certificate(pki.user("alice").cert, "sip:bob@example.com", [pki.ca.cert])


def test_user_cn_is_never_used(pki: TestPKI) -> None:
    cred = _build(pki.ca, "alice@example.com", None, key_usage=_ku(key_agreement=True))
    with pytest.raises(CertificateRejectedError, match="no SAN URI"):
        check_user_certificate(cred.cert, ALICE, [pki.ca.cert])


def test_untrusted_ca_is_rejected(pki: TestPKI, foreign_ca: Credential) -> None:
    cred = issue_user(foreign_ca, ALICE, "ec")
    with pytest.raises(CertificateRejectedError, match="no trusted path") as info:
        check_user_certificate(cred.cert, ALICE, [pki.ca.cert])
    assert isinstance(info.value, UntrustedSignerError)  # one hierarchy for callers


def test_expired_and_not_yet_valid() -> None:
    # A CA of its own, valid long before and after, so only the leaf's dates matter.
    ca = make_ca("Long CA", "ec", not_before=NOW - timedelta(days=60), not_after=NOW + timedelta(days=60))
    expired = issue_user(ca, ALICE, "ec", NOW - timedelta(days=10), NOW - timedelta(days=1))
    with pytest.raises(CertificateRejectedError, match="expired"):
        check_user_certificate(expired.cert, ALICE, [ca.cert])
    future = issue_user(ca, ALICE, "ec", NOW + timedelta(days=1), NOW + timedelta(days=10))
    with pytest.raises(CertificateRejectedError, match="not yet valid"):
        check_user_certificate(future.cert, ALICE, [ca.cert])
    # ...and both are fine at a moment inside their validity.
    check_user_certificate(expired.cert, ALICE, [ca.cert], at=NOW - timedelta(days=5))
    check_user_certificate(future.cert, ALICE, [ca.cert], at=NOW + timedelta(days=5))


def test_signing_only_keys_cannot_be_encrypted_to(pki: TestPKI) -> None:
    carol = pki.user("carol", "ed25519").cert
    with pytest.raises(CertificateRejectedError, match="cannot receive encrypted content"):
        check_user_certificate(carol, "sip:carol@example.com", [pki.ca.cert])
    check_user_certificate(carol, "sip:carol@example.com", [pki.ca.cert], for_encryption=False)


def test_key_usage_eku_curve_and_rsa_size(pki: TestPKI) -> None:
    san = [x509.UniformResourceIdentifier(ALICE)]
    sign_only = _build(pki.ca, "a", san, key_usage=_ku(digital_signature=True))
    with pytest.raises(CertificateRejectedError, match="keyUsage does not allow keyagreement"):
        check_user_certificate(sign_only.cert, ALICE, [pki.ca.cert])
    tls_only = _build(pki.ca, "a", san, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(CertificateRejectedError, match="emailProtection"):
        check_user_certificate(tls_only.cert, ALICE, [pki.ca.cert])
    p384 = _build(pki.ca, "a", san, key=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(CertificateRejectedError, match="only P-256"):
        check_user_certificate(p384.cert, ALICE, [pki.ca.cert])
    small = issue_user(pki.ca, ALICE, key=rsa.generate_private_key(65537, 1024))
    with pytest.raises(CertificateRejectedError, match="1024 bits"):
        check_user_certificate(small.cert, ALICE, [pki.ca.cert])


# --------------------------------------------------------------------------
# Proxy checks


def test_good_proxy_certificates_pass(pki: TestPKI) -> None:
    for kt in ("rsa", "ec", "x25519"):
        path = check_proxy_certificate(pki.proxy(HOST, kt).cert, HOST, [pki.ca.cert])
        assert path[0] == pki.proxy(HOST, kt).cert and path[-1] == pki.ca.cert
    path = check_proxy_certificate(pki.proxy(HOST, "x25519").cert, "PROXY.example.com.", [pki.ca.cert])
    assert path[-1] == pki.ca.cert


def test_proxy_wrong_host(pki: TestPKI) -> None:
    with pytest.raises(CertificateRejectedError, match="not for ss1.atlanta.example.com"):
        check_proxy_certificate(pki.proxy(HOST, "x25519").cert, "ss1.atlanta.example.com",
                                [pki.ca.cert])
    # A user's certificate does not name a host even if the domain matches.
    with pytest.raises(CertificateRejectedError):
        check_proxy_certificate(pki.user("alice", "ec").cert, "example.com", [pki.ca.cert])


def test_proxy_untrusted_and_expired(pki: TestPKI, foreign_ca: Credential) -> None:
    with pytest.raises(CertificateRejectedError, match="no trusted path"):
        check_proxy_certificate(issue_proxy(foreign_ca, HOST, "x25519").cert, HOST, [pki.ca.cert])
    old = issue_proxy(pki.ca, HOST, "x25519", NOW - timedelta(days=3), NOW - timedelta(days=2))
    with pytest.raises(CertificateRejectedError, match="expired"):
        check_proxy_certificate(old.cert, HOST, [pki.ca.cert])


def test_wildcards_are_refused(pki: TestPKI) -> None:
    wild = issue_proxy(pki.ca, "*.example.com", "x25519").cert
    assert not certificate_matches_host(wild, HOST)
    with pytest.raises(CertificateRejectedError, match="wildcard"):
        check_proxy_certificate(wild, HOST, [pki.ca.cert])
    with pytest.raises(MalformedError):
        check_proxy_certificate(wild, "*.example.com", [pki.ca.cert])
    cn_wild = _build(pki.ca, "*.example.com", None)
    assert not certificate_matches_host(cn_wild.cert, HOST)


def test_cn_counts_only_without_san_names(pki: TestPKI) -> None:
    cn_only = _build(pki.ca, HOST, None, key_usage=_ku(key_agreement=True))
    check_proxy_certificate(cn_only.cert, HOST, [pki.ca.cert])
    # With a SAN naming another host, the CN is ignored.
    other_san = _build(pki.ca, HOST, [x509.DNSName("other.example.com")])
    with pytest.raises(CertificateRejectedError, match="subjectAltName: other.example.com"):
        check_proxy_certificate(other_san.cert, HOST, [pki.ca.cert])
    # A SAN sip: URI without a user part names the host too.
    uri_only = _build(pki.ca, "x", [x509.UniformResourceIdentifier(f"sip:{HOST}")])
    assert certificate_matches_host(uri_only.cert, HOST)


def test_intermediate_ca(pki: TestPKI) -> None:
    inter = _build(pki.ca, "E2M Intermediate", None, ca_cert=True,
                   key_usage=_ku(key_cert_sign=True, crl_sign=True, digital_signature=True))
    leaf = issue_proxy(inter, HOST, "x25519").cert
    with pytest.raises(CertificateRejectedError):
        check_proxy_certificate(leaf, HOST, [pki.ca.cert])
    path = check_proxy_certificate(leaf, HOST, [pki.ca.cert], intermediates=[inter.cert])
    assert path == [leaf, inter.cert, pki.ca.cert]


# --------------------------------------------------------------------------
# Fingerprints


def test_fingerprint_format(pki: TestPKI) -> None:
    cert = pki.proxy(HOST, "x25519").cert
    fp = fingerprint_sha256(cert)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    assert fp == "sha256:" + digest.hex()
    assert matches_fingerprint(cert, fp) and matches_fingerprint(cert, digest)
    assert matches_fingerprint(cert, "SHA256:" + ":".join(f"{b:02X}" for b in digest))
    assert not matches_fingerprint(cert, fingerprint_sha256(pki.proxy(HOST, "ec").cert))
    assert not matches_fingerprint(cert, "sha1:" + digest.hex()[:40])


# --------------------------------------------------------------------------
# Store


class Clock:
    # Starts at the wall clock, not at NOW: a slow suite reaches these tests minutes after
    # the module was imported, and certificates issued since then are not valid at NOW.
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def test_store_by_aor_and_host(pki: TestPKI) -> None:
    store = CertStore([pki.ca.cert])
    alice = pki.user("alice").cert
    store.add_user("sips:alice@EXAMPLE.com", alice)
    assert store.user(ALICE) == alice and store.user("<sip:alice@example.com;transport=tcp>") == alice
    assert store.user("sip:bob@example.com") is None and store.user("garbage") is None
    proxy = pki.proxy(HOST, "x25519").cert
    store.add_proxy("Proxy.Example.Com", proxy)
    assert store.proxy(HOST) == proxy and store.proxy("other.example.com") is None
    assert "alice" not in repr(store)
    assert store.remove_user(ALICE) and not store.remove_user(ALICE)
    assert store.remove_proxy(HOST) and store.proxy(HOST) is None


def test_store_refuses_bad_certificates(pki: TestPKI, foreign_ca: Credential) -> None:
    store = CertStore([pki.ca.cert])
    with pytest.raises(CertificateRejectedError):
        store.add_user("sip:bob@example.com", pki.user("alice").cert)
    with pytest.raises(CertificateRejectedError):
        store.add_proxy(HOST, issue_proxy(foreign_ca, HOST, "x25519").cert)
    with pytest.raises(CertificateRejectedError):
        store.add_proxy("evil.example.com", pki.proxy(HOST, "x25519").cert)
    assert store.user("sip:bob@example.com") is None and store.proxy(HOST) is None


def test_store_is_expiry_aware(pki: TestPKI) -> None:
    clock = Clock()
    store = CertStore([pki.ca.cert], clock=clock)
    short = issue_proxy(pki.ca, HOST, "x25519", NOW - timedelta(hours=1), NOW + timedelta(hours=1))
    store.add_proxy(HOST, short.cert)
    assert store.proxy(HOST) == short.cert
    clock.now = NOW + timedelta(hours=2)
    assert store.proxy(HOST) is None
    clock.now = NOW
    assert store.proxy(HOST) is None  # expired entries are forgotten, not revived


def test_store_follows_the_shortest_lived_certificate_on_the_path(pki: TestPKI) -> None:
    inter = _build(pki.ca, "Short Intermediate", None, ca_cert=True,
                   key_usage=_ku(key_cert_sign=True, digital_signature=True))
    leaf = issue_proxy(inter, HOST, "x25519", days=365).cert
    clock = Clock()
    store = CertStore([pki.ca.cert], clock=clock)
    store.add_proxy(HOST, leaf, intermediates=[inter.cert])
    assert store.proxy(HOST) == leaf
    clock.now = inter.cert.not_valid_after_utc + timedelta(seconds=1)  # leaf still valid
    assert store.proxy(HOST) is None
