"""The per-process memos of certificate reading and certificate signatures (issue 17).

A proxy sees the same sender certificate in every message, so ``readable_certificate``
keeps the parsed certificate by its DER and path building keeps "this certificate's
signature verifies under that key" by (certificate DER, issuer SPKI).  These tests are
the attacks on such a memo: an answer remembered for one certificate must never serve
another one that differs in any byte (a forged signature, a look-alike issuer), an
unreadable certificate stays unreadable, the work budget is spent as before, and the
memos stay bounded.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from e2m_plugins import certfiles, certpath
from e2m_plugins.certfiles import certificate_key
from e2m_plugins.certpath import verify_chain
from e2m_plugins.cms.budget import message_budget
from e2m_plugins.errors import LimitExceededError, UntrustedSignerError

NOW = datetime.now(timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, public_key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def pki():
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("Memo Root", root_key.public_key(), "Memo Root", root_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("alice", leaf_key.public_key(), "Memo Root", root_key, ca=False)
    return root, root_key, leaf, leaf_key


def _with_other_signature(cert: x509.Certificate) -> x509.Certificate:
    """The same certificate with the last byte of its signature changed: every field
    the same, the signature no longer the issuer's."""
    der = bytearray(_der(cert))
    der[-1] ^= 0x01
    return x509.load_der_x509_certificate(bytes(der))


def test_a_remembered_signature_does_not_vouch_for_a_forged_twin(pki) -> None:
    root, _, leaf, _ = pki
    assert verify_chain(leaf, [root])[-1] == root        # remembered: valid
    forged = _with_other_signature(leaf)
    assert forged.tbs_certificate_bytes == leaf.tbs_certificate_bytes
    with pytest.raises(UntrustedSignerError):
        verify_chain(forged, [root])
    assert verify_chain(leaf, [root])[-1] == root        # and the real one still is


def test_a_remembered_signature_does_not_vouch_under_a_look_alike_issuer(pki) -> None:
    root, _, leaf, _ = pki
    assert verify_chain(leaf, [root])
    # A CA with the same name and another key: the leaf is not its child.
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    impostor = _cert("Memo Root", impostor_key.public_key(), "Memo Root", impostor_key, ca=True)
    with pytest.raises(UntrustedSignerError):
        verify_chain(leaf, [impostor])


def test_a_failed_signature_is_not_turned_into_a_valid_one(pki) -> None:
    root, _, leaf, _ = pki
    forged = _with_other_signature(leaf)
    for _ in range(2):                                   # the second answer is remembered
        with pytest.raises(UntrustedSignerError):
            verify_chain(forged, [root])


def test_a_remembered_signature_still_spends_the_budget(pki) -> None:
    root, _, leaf, _ = pki
    verify_chain(leaf, [root])                           # now remembered
    with message_budget(0), pytest.raises(LimitExceededError):
        verify_chain(leaf, [root])
    with message_budget(1) as budget:
        verify_chain(leaf, [root])
    assert budget.spent == 1


def test_the_signature_memo_is_bounded(pki, monkeypatch) -> None:
    root, root_key, _, _ = pki
    monkeypatch.setattr(certpath, "_SIGNATURE_MEMO_MAX", 4)
    for n in range(10):
        key = ec.generate_private_key(ec.SECP256R1())
        verify_chain(_cert(f"user {n}", key.public_key(), "Memo Root", root_key, ca=False), [root])
        assert len(certpath._SIGNATURE_MEMO) <= 4


def test_readable_certificate_is_read_once_and_stays_bounded(pki, monkeypatch) -> None:
    _, root_key, leaf, _ = pki
    der = _der(leaf)
    first = certfiles.readable_certificate(der)
    assert first is not None and first == leaf
    assert certfiles.readable_certificate(bytes(der)) is first
    monkeypatch.setattr(certfiles, "_READ_MEMO_MAX", 3)
    for n in range(8):
        key = ec.generate_private_key(ec.SECP256R1())
        certfiles.readable_certificate(_der(_cert(f"u{n}", key.public_key(), "Memo Root",
                                                  root_key, ca=False)))
        assert len(certfiles._READ_MEMO) <= 3


def test_an_unreadable_certificate_stays_unreadable() -> None:
    garbage = b"\x30\x03\x02\x01\x00"
    assert certfiles.readable_certificate(garbage) is None
    assert certfiles.readable_certificate(garbage) is None


# --------------------------------------------------------------------------- known paths

def test_a_known_path_is_not_used_once_a_certificate_on_it_has_expired(pki) -> None:
    """The memo of whole paths (TrustAnchors.paths) keeps the window in which every
    certificate on the path is valid: a path found while the leaf was valid does not
    vouch for it after its notAfter, nor before its notBefore."""
    root, _, leaf, _ = pki
    anchors = certpath.TrustAnchors([root])
    assert verify_chain(leaf, anchors)[-1] == root and len(anchors.paths) == 1
    for moment in (leaf.not_valid_after_utc + timedelta(seconds=1),
                   leaf.not_valid_before_utc - timedelta(seconds=1)):
        with pytest.raises(UntrustedSignerError):
            verify_chain(leaf, anchors, at=moment)
    assert verify_chain(leaf, anchors)[-1] == root


def test_a_known_path_serves_only_its_own_anchors_and_leaf(pki) -> None:
    root, _, leaf, _ = pki
    anchors = certpath.TrustAnchors([root])
    verify_chain(leaf, anchors)
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    impostor = _cert("Memo Root", impostor_key.public_key(), "Memo Root", impostor_key, ca=True)
    with pytest.raises(UntrustedSignerError):                # other anchors: own memo
        verify_chain(leaf, certpath.TrustAnchors([impostor]))
    with pytest.raises(UntrustedSignerError):                # a twin of the leaf
        verify_chain(_with_other_signature(leaf), anchors)
    assert len(anchors.paths) == 1                           # refusals are never kept


def test_a_known_path_spends_the_budget_the_path_took(pki) -> None:
    root, _, leaf, _ = pki
    anchors = certpath.TrustAnchors([root])
    with message_budget(8) as first:
        verify_chain(leaf, anchors)
    with message_budget(8) as again:
        verify_chain(leaf, anchors)
    assert again.spent == first.spent == 1
    with message_budget(0), pytest.raises(LimitExceededError):
        verify_chain(leaf, anchors)


def test_known_paths_are_bounded_and_not_kept_with_crls(pki, monkeypatch) -> None:
    root, root_key, _, _ = pki
    monkeypatch.setattr(certpath.KnownPaths, "MAX", 4)
    anchors = certpath.TrustAnchors([root])
    for n in range(10):
        key = ec.generate_private_key(ec.SECP256R1())
        verify_chain(_cert(f"user {n}", key.public_key(), "Memo Root", root_key, ca=False),
                     anchors)
        assert len(anchors.paths) <= 4
    crl = (x509.CertificateRevocationListBuilder().issuer_name(root.subject)
           .last_update(NOW - timedelta(hours=1)).next_update(NOW + timedelta(days=1))
           .sign(root_key, hashes.SHA256()))
    with_crl = certpath.TrustAnchors([root], crls=[crl])
    key = ec.generate_private_key(ec.SECP256R1())
    verify_chain(_cert("user x", key.public_key(), "Memo Root", root_key, ca=False), with_crl)
    assert len(with_crl.paths) == 0          # a CRL can change: worked out every time


# --------------------------------------------------------------------------- signing-time

@pytest.mark.parametrize("tag, text", [
    (0x17, "491231235959Z"), (0x17, "500101000000Z"), (0x17, "261203150000Z"),
    (0x18, "20261203150000Z"), (0x18, "19991231235959Z"),
    (0x17, "261303150000Z"), (0x17, "261203156000Z"), (0x17, "26120315000Z0"),
    (0x18, "2026120315000Z"), (0x17, "２61203150000Z"), (0x17, "26120315000+Z"),
])
def test_the_quick_signing_time_reads_what_strptime_reads(tag, text) -> None:
    """The signing-time is read without strptime when it is plain digits; whatever
    else (a month 13, a leap second, a wrong length, a non-ASCII digit) goes the
    general way, so the answer (a time or MalformedError) is the same as before."""
    from e2m_plugins.cms import der, signed
    from e2m_plugins.errors import MalformedError

    def general(tlv):
        try:
            value = bytes(tlv.value).decode("ascii", "replace")
            fmt_text = ("20" + value) if tlv.tag == der.UTC_TIME else value
            moment = datetime.strptime(fmt_text, "%Y%m%d%H%M%SZ")
            if tlv.tag == der.UTC_TIME and moment.year >= 2050:
                moment = moment.replace(year=moment.year - 100)
            return moment.replace(tzinfo=timezone.utc)
        except ValueError:
            return MalformedError

    encoded = text.encode("utf-8")
    tlv = der.read_all(bytes([tag, len(encoded)]) + encoded)
    try:
        got = signed._time(tlv)
    except MalformedError:
        got = MalformedError
    want = general(tlv) if len(text) == (13 if tag == 0x17 else 15) else MalformedError
    assert got == want


def test_remembered_identities_belong_to_their_own_certificate_and_stay_bounded(
        pki, monkeypatch) -> None:
    root, root_key, leaf, _ = pki
    assert certpath.certificate_identities(leaf).common_name == "alice"
    twin_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("mallory", twin_key.public_key(), "Memo Root", root_key, ca=False)
    assert certpath.certificate_identities(other).common_name == "mallory"
    assert certpath.certificate_identities(leaf).common_name == "alice"
    monkeypatch.setattr(certpath, "_IDENTITIES_MAX", 3)
    for n in range(8):
        key = ec.generate_private_key(ec.SECP256R1())
        certpath.certificate_identities(_cert(f"u{n}", key.public_key(), "Memo Root",
                                              root_key, ca=False))
        assert len(certpath._IDENTITIES) <= 3


def _user_cert(subject: str, root_key, *, signing: bool) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name("Memo Root"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"sip:{subject}@example.com")]), critical=False)
            .add_extension(x509.KeyUsage(
                digital_signature=signing, content_commitment=not signing,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
                critical=True)
            .sign(root_key, hashes.SHA256()))


def test_a_remembered_signing_key_is_its_own_certificates_and_a_refusal_is_never_kept(
        pki, monkeypatch) -> None:
    """``signing_key`` (the signer's key loaded and checked once per certificate): a
    certificate whose keyUsage forbids signing is refused every time, even right after
    a twin that may sign (same subject, same issuer, other key and usage) was taken;
    each certificate gets its own key; the memo stays bounded."""
    _, root_key, _, _ = pki
    good = _user_cert("alice", root_key, signing=True)
    bad = _user_cert("alice", root_key, signing=False)
    key = certpath.signing_key(good)
    assert certpath.signing_key(good) is key          # remembered
    for _ in range(2):
        with pytest.raises(UntrustedSignerError, match="digitalSignature"):
            certpath.signing_key(bad)
    assert (certificate_key(bad), certpath._limits(None)) not in certpath._SIGNING_KEYS
    assert (certificate_key(good), certpath._limits(None)) in certpath._SIGNING_KEYS
    assert certpath.signing_key(good).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        good.public_key().public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    monkeypatch.setattr(certpath, "_SIGNING_KEYS_MAX", 3)
    for n in range(8):
        certpath.signing_key(_user_cert(f"u{n}", root_key, signing=True))
        assert len(certpath._SIGNING_KEYS) <= 3


def test_a_remembered_usage_is_its_own_certificates(pki) -> None:
    """``certstore._check_usage`` remembers only certificates that passed, by the
    certificate and the use: the signing twin passing never lets the non-signing one
    through, and a certificate fit to sign is still checked afresh for encryption."""
    from e2m_plugins import certstore
    from e2m_plugins.errors import CertificateRejectedError
    _, root_key, _, _ = pki
    good = _user_cert("alice", root_key, signing=True)
    bad = _user_cert("alice", root_key, signing=False)
    certstore.check_user_names(good, "sip:alice@example.com", for_encryption=False)
    for _ in range(2):
        with pytest.raises(CertificateRejectedError):
            certstore.check_user_names(bad, "sip:alice@example.com", for_encryption=False)
    with pytest.raises(CertificateRejectedError):       # an EC signing key encrypts nothing
        certstore.check_user_names(good, "sip:alice@example.com", for_encryption=True)
