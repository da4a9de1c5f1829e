"""Attacks on certificate path building and on signer checks (issue 12, items 4 and 10).

Each test builds what an attacker can send (an off-path sender, an on-path hop
rewriting a body, an insider UA with a certificate of its own) and states the
bound or refusal that must hold.  Work is measured by counting calls to the
signature-check functions, never by wall time, except where the cost is not a
public-key operation (name preparation, certificate parsing); there the slow
function is made to fail the test if it is reached at all.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2m_plugins import certpath
from e2m_plugins.certfiles import load_certificate
from e2m_plugins.certpath import verify_chain
from e2m_plugins.certstore import check_proxy_certificate, check_user_certificate
from e2m_plugins.cms import signed
from e2m_plugins.cms.budget import message_budget
from e2m_plugins.cms.limits import DEFAULT_LIMITS, Limits
from e2m_plugins.cms.signed import sign, verify
from e2m_plugins.errors import (
    CertificateRejectedError,
    LimitExceededError,
    SignatureInvalidError,
    UnsupportedAlgorithmError,
    UntrustedSignerError,
)

NOW = datetime.now(timezone.utc)
CONTENT = b"MESSAGE body"
ALICE = "sip:alice@example.com"
# The foreign vectors' algorithms (RSA-1024, DSA, SHA-1): accepted only when asked.
LEGACY = Limits(accept_legacy_algorithms=True, min_rsa_bits=1024)


# -- building certificates --------------------------------------------------------------

@dataclass(frozen=True)
class Cred:
    cert: x509.Certificate
    key: PrivateKeyTypes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ec() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ku(**bits: bool) -> x509.KeyUsage:
    fields = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                  data_encipherment=False, key_agreement=False, key_cert_sign=False,
                  crl_sign=False, encipher_only=False, decipher_only=False)
    fields.update(bits)
    return x509.KeyUsage(**fields)


KU_CA = _ku(digital_signature=True, key_cert_sign=True, crl_sign=True)
KU_SIGNER = _ku(digital_signature=True)


def _cert(subject: x509.Name, public_key, issuer_key: PrivateKeyTypes,
          issuer_name: x509.Name | None = None, *, ca: bool | None = False,
          path_len: int | None = None, ku: x509.KeyUsage | None = KU_SIGNER,
          san: list[x509.GeneralName] | None = None,
          extra: list[tuple[x509.ExtensionType, bool]] = (), ids: bool = True,
          issuer_cert: x509.Certificate | None = None, serial: int | None = None,
          not_before: datetime | None = None, not_after: datetime | None = None,
          hash_alg: hashes.HashAlgorithm | None = None) -> x509.Certificate:
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer_name if issuer_name is not None else subject)
               .public_key(public_key)
               .serial_number(serial if serial is not None else x509.random_serial_number())
               .not_valid_before(not_before or NOW - timedelta(days=1))
               .not_valid_after(not_after or NOW + timedelta(days=30)))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_len),
                                        critical=True)
    if ku is not None:
        builder = builder.add_extension(ku, critical=True)
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if ids:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                                        critical=False)
        if issuer_cert is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),
                critical=False)
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hash_alg if hash_alg is not None else hashes.SHA256())


def _root(cn: str = "Attack Root", *, key=None, **kw) -> Cred:
    key = key or _ec()
    kw.setdefault("ca", True)
    kw.setdefault("ku", KU_CA)
    return Cred(_cert(_name(cn), key.public_key(), key, **kw), key)


def _sub_ca(cn: str, issuer: Cred, *, key=None, **kw) -> Cred:
    key = key or _ec()
    kw.setdefault("ca", True)
    kw.setdefault("ku", KU_CA)
    return Cred(_cert(_name(cn), key.public_key(), issuer.key, issuer.cert.subject,
                      issuer_cert=issuer.cert, **kw), key)


def _user(issuer: Cred, aor: str = ALICE, *, key=None, **kw) -> Cred:
    key = key or _ec()
    kw.setdefault("san", [x509.UniformResourceIdentifier(aor)])
    kw.setdefault("extra", [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                             False)])
    return Cred(_cert(_name(aor), key.public_key(), issuer.key, issuer.cert.subject,
                      issuer_cert=issuer.cert, **kw), key)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# Raw DER, for certificates no builder would make.

def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def _children(tlv: bytes) -> list[bytes]:
    """The TLVs inside the constructed value ``tlv``."""
    def header(data: bytes, i: int) -> tuple[int, int]:
        first = data[i + 1]
        if first < 0x80:
            return 2, first
        n = first & 0x7F
        return 2 + n, int.from_bytes(data[i + 2:i + 2 + n], "big")
    hdr, length = header(tlv, 0)
    body = tlv[hdr:hdr + length]
    out, i = [], 0
    while i < len(body):
        h, n = header(body, i)
        out.append(body[i:i + h + n])
        i += h + n
    return out


def _with_raw_extensions(cert: x509.Certificate, raw: list[bytes]) -> bytes:
    """``cert`` with more extensions (DER) appended; its signature no longer fits."""
    tbs_parts = _children(cert.tbs_certificate_bytes)
    assert tbs_parts[-1][0] == 0xA3
    exts = _children(_children(tbs_parts[-1])[0]) + raw
    tbs = _tlv(0x30, b"".join(tbs_parts[:-1]) + _tlv(0xA3, _tlv(0x30, b"".join(exts))))
    _, alg, sig = _children(_der(cert))
    return _tlv(0x30, tbs + alg + sig)


def _resign_sha1(cert: x509.Certificate,
                 issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """``cert`` signed again by ``issuer_key`` with ECDSA-SHA1 (builders refuse SHA-1)."""
    alg = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d0401")))  # ecdsa-with-SHA1
    parts = _children(cert.tbs_certificate_bytes)
    parts[2] = alg
    tbs = _tlv(0x30, b"".join(parts))
    signature = issuer_key.sign(tbs, ec.ECDSA(hashes.SHA1()))
    return x509.load_der_x509_certificate(_tlv(0x30, tbs + alg + _tlv(0x03, b"\x00" + signature)))


def _swap_certificates(data: bytes, certs: list[bytes], *, sid_issuer=None,
                       sid_serial: int | None = None) -> bytes:
    """A SignedData with its certificate set replaced (and the SignerInfo's sid)."""
    info = cms.ContentInfo.load(data)
    sd = info["content"]
    sd["certificates"] = [cms.CertificateChoices({"certificate": asn1_x509.Certificate.load(d)})
                          for d in certs]
    if sid_issuer is not None:
        sd["signer_infos"][0]["sid"] = cms.SignerIdentifier({"issuer_and_serial_number": {
            "issuer": sid_issuer, "serial_number": sid_serial}})
    return info.dump(force=True)


def _signed_by(signer_cert: x509.Certificate, root: Cred) -> bytes:
    """A SignedData naming ``signer_cert`` as its signer; the signature itself is made by
    another key (no one holds the private key of a certificate built around odd numbers),
    so it would never verify: the point is what happens *before* it is checked."""
    stand_in = _user(root)
    data = sign(CONTENT, stand_in.cert, stand_in.key)
    asn = asn1_x509.Certificate.load(_der(signer_cert))
    return _swap_certificates(data, [_der(signer_cert)],
                              sid_issuer=asn["tbs_certificate"]["issuer"],
                              sid_serial=signer_cert.serial_number)


# -- counting public-key work -------------------------------------------------------------

@pytest.fixture
def chain_checks(monkeypatch) -> list:
    """Every certificate signature check made by path building (fails past 2000)."""
    calls: list = []
    real = certpath.is_signed_by

    def counted(cert, issuer):
        calls.append((cert, issuer))
        if len(calls) > 2000:
            raise RuntimeError("runaway path building: more than 2000 signature checks")
        return real(cert, issuer)

    monkeypatch.setattr(certpath, "is_signed_by", counted)
    return calls


@pytest.fixture
def cms_checks(monkeypatch) -> list:
    """Every SignerInfo signature check."""
    calls: list = []
    real = signed._check_signature

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(signed, "_check_signature", counted)
    return calls


# -- 1. look-alike CAs: the path-building blow-up --------------------------------------------

def _lookalikes(root: Cred, n: int, key) -> list[x509.Certificate]:
    """``n`` self-signed CA certificates named like ``root``, all with ``key``, no key ids."""
    return [_cert(root.cert.subject, key.public_key(), key, root.cert.subject, ca=True,
                  ku=KU_CA, ids=False) for _ in range(n)]


def test_fifteen_lookalike_cas_cost_few_signature_checks(chain_checks) -> None:
    root = _root()
    attacker = _ec()
    fakes = _lookalikes(root, 15, attacker)
    leaf = _cert(_name("mallory"), _ec().public_key(), attacker, root.cert.subject,
                 san=[x509.UniformResourceIdentifier(ALICE)], ids=False)
    with pytest.raises((UntrustedSignerError, LimitExceededError)):
        verify_chain(leaf, [root.cert], fakes)
    assert len(chain_checks) <= 50


def test_fifteen_lookalike_cas_in_a_signed_body(chain_checks, cms_checks) -> None:
    root = _root()
    attacker = _ec()
    mallory = Cred(_cert(_name("mallory"), (k := _ec()).public_key(), attacker,
                         root.cert.subject, san=[x509.UniformResourceIdentifier(ALICE)],
                         ids=False), k)
    data = sign(CONTENT, mallory.cert, mallory.key, extra_certs=_lookalikes(root, 15, attacker))
    with pytest.raises((UntrustedSignerError, LimitExceededError)):
        verify(data, trust_anchors=[root.cert])
    assert len(chain_checks) + len(cms_checks) <= 50


def test_lookalikes_do_not_hide_the_real_path(chain_checks) -> None:
    root = _root()
    inter = _sub_ca("Attack Inter", root)
    leaf = _user(inter)
    attacker = _ec()
    fakes = [_cert(inter.cert.subject, attacker.public_key(), attacker, inter.cert.subject,
                   ca=True, ku=KU_CA, ids=False) for _ in range(14)]
    path = verify_chain(leaf.cert, [root.cert], fakes + [inter.cert])
    assert path == [leaf.cert, inter.cert, root.cert]
    assert len(chain_checks) <= 20


def test_duplicate_certificates_are_checked_once(chain_checks) -> None:
    root = _root()
    attacker = _ec()
    fake = _lookalikes(root, 1, attacker)[0]
    leaf = _cert(_name("mallory"), _ec().public_key(), attacker, root.cert.subject, ids=False)
    with pytest.raises(UntrustedSignerError):
        verify_chain(leaf, [root.cert], [fake] * 15)
    assert len(chain_checks) <= 3  # leaf vs root, leaf vs fake, fake vs root


def test_a_chain_of_distinct_keys_is_bounded(chain_checks) -> None:
    # 15 CAs of one name and 15 keys, each signed by the next: no loop rule applies, so the
    # budget (public-key operations per message) and the count of paths tried must stop it.
    root = _root()
    keys = [_ec() for _ in range(16)]
    fakes = [_cert(root.cert.subject, keys[i].public_key(), keys[i + 1], root.cert.subject,
                   ca=True, ku=KU_CA, ids=False) for i in range(15)]
    leaf = _cert(_name("mallory"), _ec().public_key(), keys[0], root.cert.subject, ids=False)
    with pytest.raises((UntrustedSignerError, LimitExceededError)):
        verify_chain(leaf, [root.cert], fakes)
    assert len(chain_checks) <= DEFAULT_LIMITS.max_public_key_ops


def test_path_building_spends_the_message_budget(chain_checks) -> None:
    root = _root()
    inter = _sub_ca("Attack Inter", root)
    leaf = _user(inter)
    with message_budget(1):
        with pytest.raises(LimitExceededError):
            verify_chain(leaf.cert, [root.cert], [inter.cert])
    assert len(chain_checks) == 1
    with message_budget(2):
        verify_chain(leaf.cert, [root.cert], [inter.cert])


# -- 2. RFC 5280 rules --------------------------------------------------------------------

def test_non_ca_intermediate_cannot_issue() -> None:
    root = _root()
    for ca in (False, None):  # cA false, or no basicConstraints at all
        inter = _sub_ca("Not A CA", root, ca=ca)
        leaf = _user(inter)
        with pytest.raises(UntrustedSignerError):
            verify_chain(leaf.cert, [root.cert], [inter.cert])


def test_path_len_zero_allows_no_ca_below() -> None:
    root = _root()
    top = _sub_ca("Top", root, path_len=0)
    below = _sub_ca("Below", top)
    leaf = _user(below)
    with pytest.raises(UntrustedSignerError, match="pathLen"):
        verify_chain(leaf.cert, [root.cert], [top.cert, below.cert])
    # Leaves directly under it are fine, and pathLen 1 allows one CA below.
    assert verify_chain(_user(top).cert, [root.cert], [top.cert])[-1] == root.cert
    top1 = _sub_ca("Top1", root, path_len=1)
    below1 = _sub_ca("Below1", top1)
    verify_chain(_user(below1).cert, [root.cert], [top1.cert, below1.cert])


def test_anchor_path_len_counts_too() -> None:
    root = _root(path_len=0)
    inter = _sub_ca("Inter", root)
    with pytest.raises(UntrustedSignerError, match="pathLen"):
        verify_chain(_user(inter).cert, [root.cert], [inter.cert])


def test_ca_without_key_cert_sign() -> None:
    root = _root()
    inter = _sub_ca("No keyCertSign", root, ku=_ku(digital_signature=True, crl_sign=True))
    with pytest.raises(UntrustedSignerError, match="keyUsage"):
        verify_chain(_user(inter).cert, [root.cert], [inter.cert])


def _constrained(root: Cred, permitted=None, excluded=None, critical=True) -> Cred:
    nc = x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)
    return _sub_ca("Constrained", root, extra=[(nc, critical)])


def test_name_constraints_permitted_uri_and_dns() -> None:
    root = _root()
    inter = _constrained(root, permitted=[x509.DNSName("example.net"),
                                          x509.UniformResourceIdentifier("example.net")])
    with pytest.raises(UntrustedSignerError, match="name constraints"):
        verify_chain(_user(inter, "sip:alice@example.com").cert, [root.cert], [inter.cert])
    verify_chain(_user(inter, "sip:alice@example.net").cert, [root.cert], [inter.cert])
    # A proxy certificate: SAN dNSName and sip:host URI.
    proxy = _user(inter, "sip:proxy.example.com", san=[x509.DNSName("proxy.example.com")])
    with pytest.raises(UntrustedSignerError, match="name constraints"):
        verify_chain(proxy.cert, [root.cert], [inter.cert])
    ok = _user(inter, "sip:example.net", san=[x509.DNSName("proxy.example.net"),
                                              x509.UniformResourceIdentifier("sip:example.net")])
    verify_chain(ok.cert, [root.cert], [inter.cert])


def test_name_constraints_uri_host_is_exact_unless_dotted() -> None:
    root = _root()
    exact = _constrained(root, permitted=[x509.UniformResourceIdentifier("example.net")])
    with pytest.raises(UntrustedSignerError, match="name constraints"):
        verify_chain(_user(exact, "sip:alice@sub.example.net").cert, [root.cert], [exact.cert])
    dotted = _constrained(root, permitted=[x509.UniformResourceIdentifier(".example.net")])
    verify_chain(_user(dotted, "sip:alice@sub.example.net").cert, [root.cert], [dotted.cert])
    with pytest.raises(UntrustedSignerError, match="name constraints"):
        verify_chain(_user(dotted, "sip:alice@example.net").cert, [root.cert], [dotted.cert])


def test_name_constraints_excluded() -> None:
    root = _root()
    inter = _constrained(root, excluded=[x509.DNSName("example.com"),
                                         x509.UniformResourceIdentifier(".example.com"),
                                         x509.UniformResourceIdentifier("example.com")])
    for aor in ("sip:alice@example.com", "sips:bob@pbx.example.com:5061;transport=tls"):
        with pytest.raises(UntrustedSignerError, match="name constraints"):
            verify_chain(_user(inter, aor).cert, [root.cert], [inter.cert])
    verify_chain(_user(inter, "sip:alice@example.org").cert, [root.cert], [inter.cert])


def test_name_constraints_on_the_common_name_when_no_san() -> None:
    # certstore falls back to the CN for proxies without SAN names: so must the constraints.
    root = _root()
    inter = _constrained(root, permitted=[x509.DNSName("example.net")])
    proxy = _user(inter, "proxy.example.com", san=None)
    with pytest.raises(UntrustedSignerError, match="name constraints"):
        verify_chain(proxy.cert, [root.cert], [inter.cert])


def test_name_constraints_of_a_type_we_do_not_evaluate() -> None:
    root = _root()
    other = [x509.RegisteredID(x509.ObjectIdentifier("1.3.6.1.4.1.99999.7"))]
    for critical in (True, False):
        inter = _constrained(root, permitted=other, critical=critical)
        with pytest.raises(UntrustedSignerError, match="name constraints"):
            verify_chain(_user(inter).cert, [root.cert], [inter.cert])


def test_unknown_critical_extension() -> None:
    root = _root()
    odd = [(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"),
                                       b"\x05\x00"), True)]
    leaf = _user(root, extra=odd)
    with pytest.raises(UntrustedSignerError, match="critical"):
        verify_chain(leaf.cert, [root.cert])
    inter = _sub_ca("Odd Inter", root, extra=odd)
    with pytest.raises(UntrustedSignerError, match="critical"):
        verify_chain(_user(inter).cert, [root.cert], [inter.cert])
    # The same extension, not critical, is ignored.
    calm = [(odd[0][0], False)]
    verify_chain(_user(root, extra=calm).cert, [root.cert])


@pytest.mark.parametrize("usage", [_ku(key_encipherment=True), _ku(content_commitment=True)],
                         ids=["keyEncipherment-only", "nonRepudiation-only"])
def test_signer_without_digital_signature(usage, cms_checks) -> None:
    root = _root()
    signer = _user(root, ku=usage)
    data = sign(CONTENT, signer.cert, signer.key)
    with pytest.raises(UntrustedSignerError, match="digitalSignature"):
        verify(data, trust_anchors=[root.cert])
    assert cms_checks == []  # refused before the signature is checked
    with pytest.raises(CertificateRejectedError, match="digitalSignature"):
        check_user_certificate(signer.cert, ALICE, [root.cert], for_encryption=False)


def test_rsa_1024_signer_and_ca_refused_by_default(cms_checks) -> None:
    root = _root()
    weak = _user(root, key=rsa.generate_private_key(65537, 1024))
    data = sign(CONTENT, weak.cert, weak.key)
    with pytest.raises(UntrustedSignerError, match="1024"):
        verify(data, trust_anchors=[root.cert])
    assert cms_checks == []
    verify(data, trust_anchors=[root.cert], limits=LEGACY)
    weak_root = _root("Weak Root", key=rsa.generate_private_key(65537, 1024))
    leaf = _user(weak_root)
    with pytest.raises(UntrustedSignerError, match="1024"):
        verify_chain(leaf.cert, [weak_root.cert])
    verify_chain(leaf.cert, [weak_root.cert], limits=LEGACY)
    with pytest.raises(CertificateRejectedError, match="1024"):
        check_user_certificate(weak.cert, ALICE, [root.cert], for_encryption=False)


def _rsa_public(n: int, e: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(e, n).public_key()


def test_rsa_huge_exponent_refused_before_any_operation(chain_checks, cms_checks) -> None:
    root = _root()
    n = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
    odd = _cert(_name("huge e"), _rsa_public(n, 2**64 + 1), root.key, root.cert.subject,
                san=[x509.UniformResourceIdentifier(ALICE)], issuer_cert=root.cert)
    with pytest.raises(LimitExceededError, match="exponent"):
        verify(_signed_by(odd, root), trust_anchors=[root.cert])
    assert cms_checks == [] and chain_checks == []
    # As an issuer: its key is never used.
    ca = _cert(_name("huge e CA"), _rsa_public(n, 2**64 + 1), root.key, root.cert.subject,
               ca=True, ku=KU_CA, issuer_cert=root.cert)
    leaf = _cert(_name("leaf"), _ec().public_key(), _ec(), ca.subject, ids=False)
    with pytest.raises(UntrustedSignerError, match="exponent"):
        verify_chain(leaf, [root.cert], [ca])
    assert not any(issuer is ca for _, issuer in chain_checks)


def test_rsa_exponent_bounds(cms_checks) -> None:
    root = _root()
    n = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
    for e, refused in ((2**32 + 1, True), (2**32 - 1, False), (3, False)):
        odd = _cert(_name("odd e"), _rsa_public(n, e), root.key, root.cert.subject,
                    san=[x509.UniformResourceIdentifier(ALICE)], issuer_cert=root.cert)
        cms_checks.clear()
        if refused:
            with pytest.raises(LimitExceededError, match="exponent"):
                verify(_signed_by(odd, root), trust_anchors=[root.cert])
            assert cms_checks == []
        else:  # the key is acceptable: the (stand-in) signature is what fails
            with pytest.raises(SignatureInvalidError):
                verify(_signed_by(odd, root), trust_anchors=[root.cert])
            assert cms_checks


def test_rsa_huge_modulus_refused_before_any_operation(chain_checks, cms_checks) -> None:
    root = _root()
    n = secrets.randbits(16384) | (1 << 16383) | 1
    big = _cert(_name("huge n"), _rsa_public(n, 65537), root.key, root.cert.subject,
                san=[x509.UniformResourceIdentifier(ALICE)], issuer_cert=root.cert)
    with pytest.raises(LimitExceededError, match="16384"):
        verify(_signed_by(big, root), trust_anchors=[root.cert])
    assert cms_checks == [] and chain_checks == []
    ca = _cert(_name("huge n CA"), _rsa_public(n, 65537), root.key, root.cert.subject,
               ca=True, ku=KU_CA, issuer_cert=root.cert)
    leaf = _cert(_name("leaf"), _ec().public_key(), _ec(), ca.subject, ids=False)
    with pytest.raises(UntrustedSignerError, match="16384"):
        verify_chain(leaf, [root.cert], [ca])
    assert not any(issuer is ca for _, issuer in chain_checks)


def _huge_san_certificate(root: Cred, entries: int) -> bytes:
    base = _user(root)
    # ``entries`` empty dNSNames, then a second SKI so that cryptography cannot read it.
    san = _tlv(0x30, _tlv(0x06, bytes.fromhex("551d11"))
               + _tlv(0x04, _tlv(0x30, b"\x82\x00" * entries)))
    ski = _tlv(0x30, _tlv(0x06, bytes.fromhex("551d0e")) + _tlv(0x04, _tlv(0x04, b"\x01" * 20)))
    return _with_raw_extensions(base.cert, [san, ski])


def test_huge_san_is_refused_by_size_without_a_full_parse(monkeypatch) -> None:
    root = _root()
    der = _huge_san_certificate(root, 100_000)
    assert len(der) > 200_000
    asn = asn1_x509.Certificate.load(der)
    stand_in = _user(root)
    data = _swap_certificates(sign(CONTENT, stand_in.cert, stand_in.key), [der],
                              sid_issuer=asn["tbs_certificate"]["issuer"],
                              sid_serial=asn["tbs_certificate"]["serial_number"].native)

    def no_full_parse(self):
        raise AssertionError("a full asn1crypto parse of an attacker's certificate")

    monkeypatch.setattr(asn1_x509.Certificate, "native", property(no_full_parse))
    with pytest.raises(LimitExceededError, match="certificate"):
        verify(data, trust_anchors=[root.cert])


def test_many_san_entries_in_a_readable_certificate() -> None:
    root = _root()
    many = _user(root, san=[x509.UniformResourceIdentifier(f"sip:u{i}@example.com")
                            for i in range(DEFAULT_LIMITS.max_san_entries + 1)])
    data = sign(CONTENT, many.cert, many.key)
    with pytest.raises(LimitExceededError, match="subjectAltName"):
        verify(data, trust_anchors=[root.cert])
    with pytest.raises(CertificateRejectedError):
        check_user_certificate(many.cert, "sip:u1@example.com", [root.cert])


def test_issuer_name_with_combining_marks_is_compared_cheaply(monkeypatch) -> None:
    # The SignerInfo names an issuer whose RFC 4518 preparation is quadratic and fails at
    # the end; 16 certificates with the matching serial made asn1crypto redo it 16 times.
    root = _root()
    signer = _user(root)
    data = sign(CONTENT, signer.cert, signer.key)
    mean = asn1_x509.Name.build({"common_name": "a" + "\u0301\u0316" * 4000 + "\ufffd"})
    hostile = _swap_certificates(data, [_der(signer.cert)] * 16, sid_issuer=mean,
                                 sid_serial=signer.cert.serial_number)
    prepared: list = []
    real = asn1_x509.NameTypeAndValue._ldap_string_prep

    def counted(self, string):
        prepared.append(len(string))
        return real(self, string)

    monkeypatch.setattr(asn1_x509.NameTypeAndValue, "_ldap_string_prep", counted)
    with pytest.raises(UntrustedSignerError, match="not found"):
        verify(hostile, trust_anchors=[root.cert])
    assert prepared == []
    # The honest message is still found, by exact DER.
    verify(data, trust_anchors=[root.cert])
    assert prepared == []


def test_sha1_signed_certificates_refused_unless_legacy() -> None:
    root = _root()
    leaf = _resign_sha1(_user(root).cert, root.key)
    assert leaf.signature_hash_algorithm.name == "sha1"
    with pytest.raises(UntrustedSignerError, match="SHA-1|sha1"):
        verify_chain(leaf, [root.cert])
    verify_chain(leaf, [root.cert], limits=Limits(accept_legacy_algorithms=True))


def test_rfc4134_vectors_need_legacy_limits(vectors_dir: Path) -> None:
    d = vectors_dir / "rfc4134"
    carl = [load_certificate(d / "CarlRSASelf.cer"), load_certificate(d / "CarlDSSSelf.cer")]
    data = (d / "4.2.bin").read_bytes()  # RSA-1024, SHA-1
    with pytest.raises((UntrustedSignerError, UnsupportedAlgorithmError)):
        verify(data, trust_anchors=carl, check_time=False)
    # SHA-1 alone (key sizes allowed) is still refused.
    with pytest.raises((UntrustedSignerError, UnsupportedAlgorithmError)):
        verify(data, trust_anchors=carl, check_time=False, limits=Limits(min_rsa_bits=1024))
    verify(data, trust_anchors=carl, check_time=False, limits=LEGACY)


def test_user_certificate_key_sizes_in_certstore() -> None:
    root = _root()
    n = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
    huge_e = _cert(_name("huge e"), _rsa_public(n, 2**64 + 1), root.key, root.cert.subject,
                   san=[x509.UniformResourceIdentifier(ALICE)], issuer_cert=root.cert,
                   ku=_ku(key_encipherment=True))
    with pytest.raises(CertificateRejectedError, match="exponent"):
        check_user_certificate(huge_e, ALICE, [root.cert])
    with pytest.raises(CertificateRejectedError, match="exponent"):
        check_proxy_certificate(_cert(_name("proxy.example.com"), _rsa_public(n, 2**64 + 1),
                                      root.key, root.cert.subject, issuer_cert=root.cert,
                                      san=[x509.DNSName("proxy.example.com")],
                                      ku=_ku(key_encipherment=True)),
                                "proxy.example.com", [root.cert])


# -- 3. CRLs ------------------------------------------------------------------------------

def _crl(issuer: Cred, revoked: list[x509.Certificate] = (), *, key=None,
         last: datetime | None = None, next_: datetime | None = None
         ) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(issuer.cert.subject)
               .last_update(last or NOW - timedelta(hours=1))
               .next_update(next_ or NOW + timedelta(days=7)))
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
            .revocation_date(NOW - timedelta(hours=2)).build())
    return builder.sign(key or issuer.key, hashes.SHA256())


def test_revoked_leaf_is_refused() -> None:
    from e2m_plugins.certpath import TrustAnchors
    root = _root()
    leaf = _user(root)
    other = _user(root, "sip:bob@example.com")
    crl = _crl(root, [leaf.cert])
    with pytest.raises(UntrustedSignerError, match="revoked"):
        verify_chain(leaf.cert, [root.cert], crls=[crl])
    verify_chain(other.cert, [root.cert], crls=[crl])
    # Through the anchors given by the configuration, as the engines pass them.
    anchors = TrustAnchors([root.cert], crls=[crl])
    with pytest.raises(UntrustedSignerError, match="revoked"):
        verify(sign(CONTENT, leaf.cert, leaf.key), trust_anchors=anchors)
    verify(sign(CONTENT, other.cert, other.key), trust_anchors=anchors)
    with pytest.raises(CertificateRejectedError, match="revoked"):
        check_user_certificate(leaf.cert, ALICE, anchors, for_encryption=False)


def test_cert_store_keeps_the_crls_of_its_anchors() -> None:
    from e2m_plugins.certpath import TrustAnchors
    from e2m_plugins.certstore import CertStore

    root = _root()
    alice = _user(root, ku=_ku(digital_signature=True, key_agreement=True))
    bob = _user(root, "sip:bob@example.com", ku=_ku(digital_signature=True, key_agreement=True))
    store = CertStore(TrustAnchors([root.cert], crls=[_crl(root, [alice.cert])]))
    assert store.trust_anchors.crls
    with pytest.raises(CertificateRejectedError, match="revoked"):
        store.add_user(ALICE, alice.cert)
    store.add_user("sip:bob@example.com", bob.cert)


def test_revoked_intermediate_is_refused() -> None:
    root = _root()
    inter = _sub_ca("Revoked Inter", root)
    leaf = _user(inter)
    with pytest.raises(UntrustedSignerError, match="revoked"):
        verify_chain(leaf.cert, [root.cert], [inter.cert], crls=[_crl(root, [inter.cert])])
    verify_chain(leaf.cert, [root.cert], [inter.cert], crls=[_crl(root)])


def test_forged_crl_is_not_trusted() -> None:
    root = _root()
    leaf = _user(root)
    forged = _crl(root, [leaf.cert], key=_ec())  # the root's name, another key
    # Its entries are ignored next to a good CRL ...
    verify_chain(leaf.cert, [root.cert], crls=[forged, _crl(root)])
    # ... and alone it leaves the issuer without a usable CRL: fail closed.
    with pytest.raises(UntrustedSignerError, match="CRL"):
        verify_chain(leaf.cert, [root.cert], crls=[forged])


def test_expired_or_future_crl_fails_closed_for_its_issuer() -> None:
    root = _root()
    leaf = _user(root)
    stale = _crl(root, last=NOW - timedelta(days=10), next_=NOW - timedelta(days=1))
    with pytest.raises(UntrustedSignerError, match="CRL"):
        verify_chain(leaf.cert, [root.cert], crls=[stale])
    early = _crl(root, last=NOW + timedelta(days=1), next_=NOW + timedelta(days=10))
    with pytest.raises(UntrustedSignerError, match="CRL"):
        verify_chain(leaf.cert, [root.cert], crls=[early])
    # A current CRL next to the stale one is enough; other issuers are not affected.
    verify_chain(leaf.cert, [root.cert], crls=[stale, _crl(root)])
    other_root = _root("Other Root")
    verify_chain(_user(other_root).cert, [other_root.cert], crls=[stale])


def test_crl_issuer_needs_crl_sign() -> None:
    root = _root(ku=_ku(digital_signature=True, key_cert_sign=True))
    leaf = _user(root)
    with pytest.raises(UntrustedSignerError, match="CRL"):
        verify_chain(leaf.cert, [root.cert], crls=[_crl(root)])


def test_crl_signature_is_counted(chain_checks) -> None:
    root = _root()
    leaf = _user(root)
    with message_budget(1):
        with pytest.raises(LimitExceededError):
            verify_chain(leaf.cert, [root.cert], crls=[_crl(root)])
    with message_budget(2):
        verify_chain(leaf.cert, [root.cert], crls=[_crl(root)])


def test_rfc4134_crl_revokes_alice_dss(vectors_dir: Path) -> None:
    from e2m_plugins.certfiles import load_crls
    d = vectors_dir / "rfc4134"
    carl, alice = load_certificate(d / "CarlDSSSelf.cer"), load_certificate(
        d / "AliceDSSSignByCarlNoInherit.cer")
    for_all = load_crls(d / "CarlDSSCRLForAll.crl")
    empty = load_crls(d / "CarlDSSCRLEmpty.crl")
    with pytest.raises(UntrustedSignerError, match="revoked"):
        verify_chain(alice, [carl], check_time=False, limits=LEGACY, crls=for_all)
    verify_chain(alice, [carl], check_time=False, limits=LEGACY, crls=empty)


def test_config_loads_trust_crls(pki, tmp_path) -> None:
    from e2m_plugins.config import ConfigError, load_proxy_config, load_ua_config

    ca = Cred(pki.ca.cert, pki.ca.key)
    bob = pki.user("bob")
    crl = _crl(ca, [bob.cert])
    (tmp_path / "ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "bad.crl").write_bytes(b"not a crl")
    for name in ("ca.crt", "alice.crt", "alice.key", "proxy-proxy.example.com.crt",
                 "proxy-proxy.example.com.key"):
        (tmp_path / name).write_bytes((pki.directory / name).read_bytes())
        if name.endswith(".key"):
            (tmp_path / name).chmod(0o600)     # a key others may read is refused
    ua = tmp_path / "UA.toml"
    ua.write_text('[identity]\naor = "sip:alice@example.com"\ncert = "alice.crt"\n'
                  'key = "alice.key"\n[trust]\nca = ["ca.crt"]\ncrls = ["ca.crl"]\n')
    config = load_ua_config(ua)
    assert config.crls == (crl,) and config.trust_anchors.crls == (crl,)
    with pytest.raises(CertificateRejectedError, match="revoked"):
        check_user_certificate(bob.cert, "sip:bob@example.com", config.trust_anchors)
    proxy = tmp_path / "PROXY.toml"
    proxy.write_text('[identity]\nhost = "proxy.example.com"\n'
                     'cert = "proxy-proxy.example.com.crt"\n'
                     'key = "proxy-proxy.example.com.key"\n'
                     '[trust]\nca = ["ca.crt"]\ncrls = ["ca.crl"]\n[policy]\n')
    assert load_proxy_config(proxy).trust_anchors.crls == (crl,)
    ua.write_text(ua.read_text().replace('"ca.crl"', '"bad.crl", "missing.crl"'))
    with pytest.raises(ConfigError) as err:
        load_ua_config(ua)
    assert len(err.value.problems) == 2
