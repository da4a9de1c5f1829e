"""A fifty-...th attacker's review (December 2026) of 7f22cee: honest flows and bypasses
of stop 37's newest rules, the core half (certificates counted before cryptography reads
them; the PEM reader of ``ua._certificate_from``).  The phone half (the answer rule,
hole 1) is ``tests/pjsua/test_review106_phone.py``.

Honest break 2 (``test_hole_a_pem_certificate_with_text_before_it_is_refused``): no
attacker; an honest proxy operator (or peer) whose certificate is served as PEM the way
OpenSSL writes it with explanatory text before the block: ``openssl pkcs12 -nokeys``
output (``Bag Attributes`` / ``subject=`` / ``issuer=`` lines) or ``openssl x509 -text``
output; also the ``X509 CERTIFICATE`` label cryptography reads.  Stop 37 (review 105)
made ``_certificate_from`` read PEM itself: only data that *starts* (after white space)
with ``-----`` is taken as PEM (ua.py:1404), anything else as DER, and only the label
``CERTIFICATE`` (``_PEM_CERTIFICATE``, ua.py:1415).

- Messages: ``UAEngine.add_proxy_certificate(host, pem)`` (a fetched cert-url, a 496
  body) and ``add_peer_certificate`` with such a text.
- Effect (seen on 7f22cee): ``CertificateRejectedError("not a readable certificate")``;
  on 0951fe9 the fallback ``x509.load_pem_x509_certificate`` took all three forms, so
  this is a regression: a phone can no longer learn that proxy's certificate (no body
  can be sealed for it, its 496 loops) nor that peer's.
- At fault: ``e2m_plugins/ua.py`` ``_certificate_from``, line 1404 (``if
  data.lstrip().startswith(b"-----")``) and ``_PEM_CERTIFICATE`` (line 1415).
- Fix: take PEM wherever ``-----BEGIN`` appears (``search``, not ``startswith``; the
  text before a block is ignored as RFC 7468 §2 says), and accept the label ``X509
  CERTIFICATE`` as cryptography does (RFC 7468 §5.1 notes it); the DER is counted as
  now.

Hole 3 (``test_hole_a_published_certificate_is_read_uncounted``): **insider UA** (alice,
authenticated by digest at her home).  The certificate service's publish check reads the
PUBLISH body with ``x509.load_der_x509_certificate`` directly
(``certservice.check_published_certificate``, certservice.py:168), never through
``readable_certificate``: the counts of stop 37 (512 elements, 100 SAN entries) are not
applied before cryptography builds the extensions.

- Messages: ``PUBLISH sip:alice@...`` (``Event: certificate``, her own AoR, digest
  answered) whose ``application/pkix-cert`` body is a 16,320-octet self-made
  certificate with 5,324 ``dNSName`` entries.
- Effect (seen on 7f22cee, ``process_time`` on this machine): ``check_not_a_ca`` reads
  the extensions and cryptography builds all 5,324 names before the SAN bound refuses it
  (403, "5324 subjectAltName entries exceed the limit of 100"): ~1.8-2.0 ms a PUBLISH,
  where the counted refusal of the same octets costs 0.15 ms (~12x).  Modest: one
  certificate per authenticated request; it is the last DER path that reads a
  certificate from the wire uncounted.
- At fault: ``e2m_plugins/certservice.py`` ``check_published_certificate``, line 168.
- Fix: read it with ``certfiles.readable_certificate(der)`` (``LimitExceededError`` ->
  ``CertificateRejectedError``), as ``ua._certificate_from`` does.

Controls: ``test_control_openssl_certificates_with_the_usual_extensions_are_read`` (a
leaf with AIA, CRL DP with a CRL issuer and reasons, policies with CPS and user-notice
qualifiers, an SCT list, issuer/subject information access, TLS feature, Netscape and
Microsoft extensions, a SAN with URI, DNS, email, IP, dirName, otherName and RID; a CA
with name constraints, policy constraints/mappings, inhibitAnyPolicy: all read, as DER,
PEM, CRLF PEM, a PEM chain, PEM with white space in it);
``test_control_the_same_pem_without_the_text_is_taken`` (the bag's certificate alone is
taken: only the text before it fails); ``test_control_an_honest_publication_is_taken``
and ``test_control_the_big_certificate_is_refused_while_counted``.

Tried and held: every OpenSSL extension above is counted and read (the 18-extension leaf
counts 192 elements); an extension in ``_PARSED_EXTENSIONS`` whose value the scan cannot
read is refused (review 105's fix); a PEM whose base64 is split by CR, tabs or spaces is
decoded; a PEM of a chain takes its first certificate, counted; a PEM with a bad base64
character is refused; no path left reads a PEM certificate from the wire uncounted
(``certfiles.load_certificate`` reads only configured files); the ``_PEM_CERTIFICATE``
search is linear (its class excludes ``-``).

Fixed (stop 37): a PEM certificate is found wherever its block starts (text before it, as
``openssl pkcs12``/``x509 -text`` write it; the ``X509 CERTIFICATE`` label too) and still
counted as DER (``ua._certificate_from``); a published certificate is read through
``certfiles.readable_certificate`` (counted first).  The hole tests failed on the code
before (checked) and pass.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from e2m_lab.flows import ua_engine
from e2m_plugins import certfiles, certservice
from e2m_plugins.errors import CertificateRejectedError, LimitExceededError
from e2m_plugins.testpki import TestPKI, init_test_pki
from tests.unit.test_review103 import _cold
from tests.unit.test_review105 import _largest

PROXY = "proxy.example.com"
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def pki() -> TestPKI:
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


def _proxy_pem(pki: TestPKI) -> bytes:
    return pki.proxy(PROXY).cert.public_bytes(PEM)


def _bag(pem: bytes) -> bytes:
    """What ``openssl pkcs12 -in x.p12 -nokeys`` writes."""
    return (b"Bag Attributes\n    localKeyID: CB 37 5B 7F 09 35 F3 95 68 0C 73 40 CA D8 55 C7"
            b" 4C 1F 5A 0F \nsubject=CN = proxy.example.com\nissuer=CN = E2M Test CA\n" + pem)


def _text(pem: bytes) -> bytes:
    """What ``openssl x509 -text`` writes: the dump, then the PEM block."""
    return (b"Certificate:\n    Data:\n        Version: 3 (0x2)\n"
            b"        Subject: CN = proxy.example.com\n" + pem)


def _x509_label(pem: bytes) -> bytes:
    return pem.replace(b"BEGIN CERTIFICATE", b"BEGIN X509 CERTIFICATE").replace(
        b"END CERTIFICATE", b"END X509 CERTIFICATE")


FORMS = {"pkcs12-bag": _bag, "x509-text": _text, "x509-label": _x509_label}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_control_cryptography_reads_the_form(pki, form):
    cert = x509.load_pem_x509_certificate(FORMS[form](_proxy_pem(pki)))
    assert cert == pki.proxy(PROXY).cert


def test_control_the_same_pem_without_the_text_is_taken(pki):
    engine = ua_engine(pki, "alice", peers=("bob",))
    pem = _proxy_pem(pki)
    assert engine.add_proxy_certificate(PROXY, pem) == pki.proxy(PROXY).cert
    engine = ua_engine(pki, "alice", peers=("bob",))
    assert engine.add_proxy_certificate(PROXY, pem.replace(b"\n", b"\r\n")) \
        == pki.proxy(PROXY).cert
    engine = ua_engine(pki, "alice", peers=())
    assert engine.add_peer_certificate(pki.aor("bob"), pki.user("bob").cert.public_bytes(PEM)) \
        == pki.user("bob").cert


@pytest.mark.parametrize("form", sorted(FORMS))
def test_hole_a_pem_certificate_with_text_before_it_is_refused(pki, form):
    engine = ua_engine(pki, "alice", peers=("bob",))
    assert engine.add_proxy_certificate(PROXY, FORMS[form](_proxy_pem(pki))) \
        == pki.proxy(PROXY).cert


# -- OpenSSL's usual extensions: read (held) ---------------------------------------

def _sct_list() -> bytes:
    sig = bytes(range(70))
    sct = (b"\x00" + b"\x11" * 32 + struct.pack(">Q", 1_700_000_000_000) + b"\x00\x00"
           + b"\x04\x03" + struct.pack(">H", len(sig)) + sig)
    body = struct.pack(">H", len(sct)) + sct
    body = struct.pack(">H", len(body)) + body
    return b"\x04" + bytes([len(body)]) + body


def _openssl_like() -> tuple[x509.Certificate, x509.Certificate]:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TestCA")])
    dir_name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "UK"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "Someone")])
    base = (x509.CertificateBuilder().serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .issuer_name(ca_name))
    ca = (base.subject_name(ca_name).public_key(ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
          .add_extension(x509.NameConstraints(
              permitted_subtrees=[x509.DNSName(".example.com"),
                                  x509.UniformResourceIdentifier(".example.com"),
                                  x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
                                  x509.DirectoryName(dir_name)],
              excluded_subtrees=[x509.RFC822Name(".bad.com")]), critical=True)
          .add_extension(x509.PolicyConstraints(0, 1), critical=True)
          .add_extension(x509.InhibitAnyPolicy(2), critical=True)
          .sign(ca_key, hashes.SHA256()))
    policy = x509.PolicyInformation(x509.ObjectIdentifier("1.3.6.1.4.1.99.1"), [
        "http://cps.example.com/",
        x509.UserNotice(x509.NoticeReference("Org", [1, 2, 3, 4]), "Explicit Text Here")])
    leaf = (base.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PROXY),
                                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ex")]))
            .public_key(key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH,
                                                  ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), False)
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier("sip:bob@127.0.0.1"), x509.DNSName(PROXY),
                x509.RFC822Name("bob@example.com"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DirectoryName(dir_name),
                x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"),
                               b"\x0c\x0fbob@example.com"),
                x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4"))]), False)
            .add_extension(x509.IssuerAlternativeName([
                x509.UniformResourceIdentifier("http://issuer.example.com/")]), False)
            .add_extension(x509.AuthorityInformationAccess([
                x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                       x509.UniformResourceIdentifier("http://ocsp.example.com/")),
                x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                                       x509.UniformResourceIdentifier("http://ca.example.com/"))]),
                False)
            .add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                [x509.UniformResourceIdentifier("http://crl.example.com/ca.crl")], None,
                frozenset({x509.ReasonFlags.key_compromise, x509.ReasonFlags.ca_compromise}),
                [x509.DirectoryName(dir_name)])]), False)
            .add_extension(x509.CertificatePolicies([
                x509.PolicyInformation(x509.ObjectIdentifier("1.2.3.4"), None), policy,
                x509.PolicyInformation(x509.ObjectIdentifier("2.5.29.32.0"), None)]), False)
            .add_extension(x509.TLSFeature([x509.TLSFeatureType.status_request]), False)
            .add_extension(x509.UnrecognizedExtension(           # Netscape cert type
                x509.ObjectIdentifier("2.16.840.1.113730.1.1"), b"\x03\x02\x05\xa0"), False)
            .add_extension(x509.UnrecognizedExtension(           # Netscape comment
                x509.ObjectIdentifier("2.16.840.1.113730.1.13"), b"\x16\x05hello"), False)
            .add_extension(x509.MSCertificateTemplate(x509.ObjectIdentifier("1.3.6.1.4.1.1.2.1"),
                                                      100, 0), False)
            .add_extension(x509.UnrecognizedExtension(           # MS template name (BMP)
                x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2"), b"\x1e\x08\x00U\x00s\x00e\x00r"),
                False)
            .add_extension(x509.UnrecognizedExtension(           # MS application policies
                x509.ObjectIdentifier("1.3.6.1.4.1.311.21.10"),
                b"\x30\x0c\x30\x0a\x06\x08\x2b\x06\x01\x05\x05\x07\x03\x02"), False)
            .add_extension(x509.UnrecognizedExtension(           # SCT list, as the CA writes it
                x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2"), _sct_list()), False)
            .add_extension(x509.SubjectInformationAccess([x509.AccessDescription(
                x509.ObjectIdentifier("1.3.6.1.5.5.7.48.5"),
                x509.UniformResourceIdentifier("http://repo.example.com/"))]), False)
            .sign(ca_key, hashes.SHA256()))
    return ca, leaf


def test_control_openssl_certificates_with_the_usual_extensions_are_read():
    from e2m_plugins.ua import _certificate_from
    for cert in _openssl_like():
        der, pem = cert.public_bytes(DER), cert.public_bytes(PEM)
        assert certfiles.readable_certificate(der) == cert
        assert len(cert.extensions) >= 5
        for form in (der, pem, pem.replace(b"\n", b"\r\n"), pem.replace(b"\n", b" \t\n"),
                     b"\n  " + pem, pem + _openssl_like()[0].public_bytes(PEM)):
            assert _certificate_from(form) == cert


# -- the certificate service's publish check ---------------------------------------

def test_control_an_honest_publication_is_taken(pki):
    cert = pki.user("alice").cert
    at = dt.datetime.now(dt.timezone.utc)
    assert certservice.check_published_certificate(
        cert.public_bytes(DER), pki.aor("alice"), [pki.ca.cert], at) == cert


def test_control_the_big_certificate_is_refused_while_counted(monkeypatch):
    big = _largest(opaque=False)
    _cold()
    seen: list[bytes] = []
    real = x509.load_der_x509_certificate
    monkeypatch.setattr(x509, "load_der_x509_certificate",
                        lambda data, *a: seen.append(bytes(data)) or real(data, *a))
    with pytest.raises(LimitExceededError):
        certfiles.readable_certificate(big)
    assert big not in seen                     # refused before cryptography read it
    assert len(big) <= certservice.MAX_CERTIFICATE_BYTES


def test_hole_a_published_certificate_is_read_uncounted(pki, monkeypatch):
    big = _largest(opaque=False)
    _cold()
    seen: list[bytes] = []
    real = x509.load_der_x509_certificate
    monkeypatch.setattr(x509, "load_der_x509_certificate",
                        lambda data, *a: seen.append(bytes(data)) or real(data, *a))
    at = dt.datetime.now(dt.timezone.utc)
    with pytest.raises(CertificateRejectedError):
        certservice.check_published_certificate(big, pki.aor("alice"), [pki.ca.cert], at)
    assert big not in seen, "cryptography read a certificate the counts refuse"
