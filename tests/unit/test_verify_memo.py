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
