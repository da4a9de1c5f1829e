"""Every SignedData among the foreign vectors, verified with exact content.

RFC 4134 (section 4): Alice/Diane signed by Carl; RSA-1024 and DSA keys,
SHA-1, certificates long expired -> check_time=False and ``LEGACY`` limits
(legacy algorithms, 1024-bit keys), passed explicitly here only; the defaults
for real traffic refuse them (tests/unit/test_certpath_attacks.py).

draft-ireland-examples-cms (LAMPS keys of RFC 9216): the issuing CAs
("Sample LAMPS RSA/Ed25519 Certification Authority") are not in the folder,
so the signer's own certificate is passed as the trust anchor (we trust that
leaf directly); these certificates are valid until 2052, so time checks stay on.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from e2m_plugins.cmsinput import load_cms_message, verify_input
from e2m_plugins.cms.limits import Limits
from e2m_plugins.cms.signed import extract_certificates, verify
from e2m_plugins.errors import (
    MalformedError,
    SignatureInvalidError,
    UnsupportedAlgorithmError,
    UntrustedSignerError,
)
from e2m_plugins.certfiles import load_certificate

EX_CONTENT = b"This is some sample content."
# What the RFC 4134 examples need: SHA-1, DSA, RSA-1024.  Test-only.
LEGACY = Limits(accept_legacy_algorithms=True, min_rsa_bits=1024)


@pytest.fixture(scope="module")
def rfc(vectors_dir: Path) -> Path:
    return vectors_dir / "rfc4134"


@pytest.fixture(scope="module")
def lamps(vectors_dir: Path) -> Path:
    return vectors_dir / "examples-cms"


@pytest.fixture(scope="module")
def carl(rfc: Path) -> list:
    return [load_certificate(rfc / "CarlRSASelf.cer"), load_certificate(rfc / "CarlDSSSelf.cer")]


def test_excontent_file(rfc: Path) -> None:
    assert (rfc / "ExContent.bin").read_bytes() == EX_CONTENT


# name, signer CN, digest, signature algorithm, signing time
RFC4134_ATTACHED = [
    ("4.1.bin", "AliceDSS", "sha1", "sha1-dsa", None),
    ("4.2.bin", "AliceRSA", "sha1", "rsa", None),
    # 4.4: signed attributes (with signing time); a countersignature by Diane
    # in the unsigned attributes is not checked (we ignore unsigned attributes).
    ("4.4.bin", "AliceDSS", "sha1", "sha1-dsa", datetime(2003, 5, 14, 15, 39, tzinfo=timezone.utc)),
    ("4.5.bin", "AliceRSA", "sha1", "rsa", None),          # BER, indefinite lengths
    ("4.7.bin", "AliceDSS", "sha1", "sha1-dsa", None),     # signer found by SKI
    ("4.10.bin", "AliceDSS", "sha1", "sha1-dsa", None),    # many odd signed attributes
]


@pytest.mark.parametrize("name,cn,digest,sig,when", RFC4134_ATTACHED)
def test_rfc4134_attached(rfc, carl, name, cn, digest, sig, when) -> None:
    result = verify((rfc / name).read_bytes(), trust_anchors=carl, check_time=False,
                    limits=LEGACY)
    assert result.content == EX_CONTENT
    assert result.content_type == "data"
    [signer] = result.signers
    assert signer.identities.common_name == cn
    assert signer.digest_algorithm == digest
    assert signer.signature_algorithm == sig
    assert signer.signing_time == when
    assert signer.chain[-1] in carl


def test_rfc4134_times_are_checked_by_default(rfc, carl) -> None:
    # Valid 1999..2039, so "now" passes and a date before 1999 must fail.
    data = (rfc / "4.2.bin").read_bytes()
    verify(data, trust_anchors=carl, limits=LEGACY)
    with pytest.raises(UntrustedSignerError, match="not yet valid"):
        verify(data, trust_anchors=carl, at=datetime(1990, 1, 1, tzinfo=timezone.utc),
               limits=LEGACY)


def test_rfc4134_wrong_anchor(rfc, carl) -> None:
    # An RSA-signed message does not chain to Carl's DSA root alone.
    with pytest.raises(UntrustedSignerError):
        verify((rfc / "4.2.bin").read_bytes(), trust_anchors=carl[1:], check_time=False,
               limits=LEGACY)


def test_rfc4134_detached_4_3(rfc, carl) -> None:
    data = (rfc / "4.3.bin").read_bytes()
    result = verify(data, trust_anchors=carl, check_time=False, detached_content=EX_CONTENT,
                    limits=LEGACY)
    assert result.content == EX_CONTENT
    with pytest.raises(MalformedError, match="detached"):
        verify(data, trust_anchors=carl, check_time=False, limits=LEGACY)
    with pytest.raises(SignatureInvalidError):
        verify(data, trust_anchors=carl, check_time=False, detached_content=EX_CONTENT + b"!",
               limits=LEGACY)


def test_rfc4134_multiple_signers_4_6(rfc, carl) -> None:
    # Diane's DSA certificate inherits its DSA parameters from Carl
    # (DianeDSSSignByCarlInherit); cryptography cannot load such a key, so the
    # second signer cannot be checked and verify() must refuse the whole message.
    with pytest.raises(UnsupportedAlgorithmError, match="inherited"):
        verify((rfc / "4.6.bin").read_bytes(), trust_anchors=carl, check_time=False, limits=LEGACY)


def test_rfc4134_multipart_signed_4_8(rfc, carl) -> None:
    message = load_cms_message((rfc / "4.8.eml").read_bytes())
    assert message.mime_type == "multipart/signed"
    # The signed first part has no headers: a blank line, then ExContent.  The file
    # has LF line ends; the signature covers the CRLF form, which verify_input tries.
    assert message.detached_content == b"\n" + EX_CONTENT
    result = verify_input(message, trust_anchors=carl, check_time=False, limits=LEGACY)
    assert result.content == b"\r\n" + EX_CONTENT
    assert result.signers[0].identities.common_name == "AliceDSS"


def test_rfc4134_pkcs7_mime_4_9(rfc, carl) -> None:
    message = load_cms_message((rfc / "4.9.eml").read_bytes())
    assert message.mime_type == "application/pkcs7-mime"
    assert message.smime_type == "signed-data"
    result = verify(message.der, trust_anchors=carl, check_time=False, limits=LEGACY)
    # The encapsulated content is a MIME entity with no headers.
    assert result.content == b"\r\n" + EX_CONTENT


def test_rfc4134_certs_only_4_11(rfc, carl) -> None:
    data = (rfc / "4.11.bin").read_bytes()
    with pytest.raises(SignatureInvalidError, match="no signature"):
        verify(data, trust_anchors=carl, check_time=False, limits=LEGACY)
    certs = extract_certificates(data)
    assert {c.subject.rfc4514_string() for c in certs} == {"CN=AliceDSS", "CN=CarlDSS"}  # the dump says DSS certs


# -- draft-ireland-examples-cms ---------------------------------------------------------

def _lamps_cert(lamps: Path, who: str):
    return load_certificate(lamps / "certs-and-keys" / f"lamps-{who}.crt")


@pytest.mark.parametrize("name,who,digest,sig", [
    ("signedByAliceRSA.p7m", "alice", "sha256", "rsa"),
    ("signedByAliceRSAPSS.p7m", "alice", "sha256", "rsassa-pss"),
    ("signedByCarlosEd25519.p7m", "carlos", "sha512", "ed25519"),
])
def test_lamps_attached(lamps, name, who, digest, sig) -> None:
    leaf = _lamps_cert(lamps, who)
    result = verify((lamps / "binary-files" / name).read_bytes(), trust_anchors=[leaf])
    assert result.content == EX_CONTENT
    [signer] = result.signers
    assert signer.certificate == leaf
    assert signer.identities.emails == (f"{who}@smime.example",)
    assert (signer.digest_algorithm, signer.signature_algorithm) == (digest, sig)
    assert signer.chain == (leaf,)


def test_lamps_untrusted_without_own_anchor(lamps) -> None:
    # The real issuer is not available: with another anchor, no path exists.
    data = (lamps / "binary-files" / "signedByAliceRSA.p7m").read_bytes()
    with pytest.raises(UntrustedSignerError, match="Sample LAMPS RSA"):
        verify(data, trust_anchors=[_lamps_cert(lamps, "carlos")])


def test_lamps_detached_ed25519(lamps) -> None:
    # The content is not stated in the dump; the draft signs ExContent, and
    # the pure Ed25519 signature (no signed attributes) verifies over it.
    data = (lamps / "binary-files" / "signedByCarlosDetached.p7m").read_bytes()
    carlos = _lamps_cert(lamps, "carlos")
    result = verify(data, trust_anchors=[carlos], detached_content=EX_CONTENT)
    assert result.content == EX_CONTENT
    assert result.signers[0].signature_algorithm == "ed25519"
    with pytest.raises(SignatureInvalidError):
        verify(data, trust_anchors=[carlos], detached_content=b"This is other content.")


def test_lamps_two_signers_no_certs(lamps) -> None:
    data = (lamps / "binary-files" / "signedByAliceAndCarlosNoCerts.p7m").read_bytes()
    alice, carlos = _lamps_cert(lamps, "alice"), _lamps_cert(lamps, "carlos")
    result = verify(data, trust_anchors=[alice, carlos], extra_certs=[alice, carlos])
    assert result.content == EX_CONTENT
    assert [s.certificate for s in result.signers] == [carlos, alice]
    assert result.certificates == ()
    # Without the certificates the signers cannot even be found.
    with pytest.raises(UntrustedSignerError, match="not found"):
        verify(data, trust_anchors=[alice, carlos])
    # Both signers must be trusted, not just one.
    with pytest.raises(UntrustedSignerError):
        verify(data, trust_anchors=[alice], extra_certs=[alice, carlos])
