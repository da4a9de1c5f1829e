"""A fifty-...th attacker's review (December 2026) of 0951fe9: stop 37's later fixes
(reviews 103 and 104), fresh eyes: the core half (certificates counted before
cryptography reads them).  The phone half is ``tests/pjsua/test_review105_phone.py``.

Hole 1 (``test_hole_a_san_behind_an_opaque_first_entry_is_read_uncounted``): **off-path
sender** (no account, no certificate of ours; also an **untrusted hop**, who can put the
same body in any request it forwards).  Stop 37 counts a certificate with
``cms.der.scan`` before cryptography reads it (``certfiles.certificate_counts``: 512 DER
elements with extension contents, 32 attributes a name, 100 SAN entries).  An
extension's value is scanned as DER, but a value the scan cannot read is skipped as
"opaque to us; cryptography refuses it if it must read it" (certfiles.py:185-186,
``except MalformedError: continue``): its elements stay uncounted and its SAN entries
are not counted at all (the ``san = max(...)`` line after the ``try`` is skipped).  The
scan refuses more than cryptography does: it nests at most 64 levels (``_MAX_DEPTH``)
and takes no high-numbered tag, while cryptography reads an ``otherName``'s value as one
opaque TLV whatever it holds.

- Messages: a MESSAGE "from alice" to bob over TCP, labelled for the proxy, whose body
  is a SignedData of 15 certificates of at most 16 KiB (the size bound) made by the
  stranger, each with a subjectAltName whose *first* entry is an ``otherName`` whose
  value nests 70 SEQUENCEs (133 octets), followed by ~5,300 ``dNSName`` "a" entries
  (3 octets each); a SignerInfo naming none of them (review 103 hole 2's shape).
- Effect (seen on 0951fe9): ``certificate_counts`` gives each certificate 110
  elements, 1 name attribute, 0 SAN entries, within every bound;
  ``readable_certificate`` hands all 15 to cryptography, whose ``fully_readable``
  (``cert.extensions``) builds a Python ``DNSName`` for each of the **79,000** entries
  of the message (245 KB), before the signer is looked for; then 403
  ``UntrustedSignerError`` (the SAN bound is checked only on a path).  CPU on this
  machine (``process_time``, cold memos, no spy): **36-53 ms at the proxy or bob's UA
  engine** per message, where the same certificates without the opaque entry are
  refused while counted in **0.3 ms** (413, nothing built) and an honest MESSAGE costs
  3.6 ms: review 103 hole 2's 64 ms, back under the new counts.  Three such certificates
  (49.7 KB, one UDP datagram) cost ~10-28 ms.  On Kamailio (read, not run): a binary
  body over 49,149 octets is refused (a NUL in a long message), but the core takes a
  ``Content-Transfer-Encoding: base64`` S/MIME body (``mime.py``), which has no NUL: ~11
  such certificates over TCP.  The phone reads 4,000 octets at most: out of reach.
  Related (read and run in a script, not a test): a certificate in PEM
  (``ua._certificate_from``, a 493/496 body or a fetched cert-url) is not counted at
  all: 5,323 DNSName built for one, 2.7 ms, bounded by one certificate per answer.
- At fault: ``e2m_plugins/certfiles.py`` ``certificate_counts``, lines 183-188
  (184: ``der.scan(value.value, count)``, 186: ``except MalformedError: continue``): an
  extension the scan cannot read is taken as counted while cryptography reads it anyway.
- Fix: an extension value the scan cannot read makes the certificate unreadable (None),
  at least for the extensions cryptography parses (SAN, IAN, CRL distribution points,
  policies, name constraints, AKI, AIA/SIA, SCTs: anything not in a short list of
  opaque OIDs); or count a SAN's entries with a header-only walk of its top level
  (``der.items`` of the SEQUENCE, which reads each GeneralName's header only) before the
  deep scan, and refuse any SAN whose entry cannot be scanned.

Controls: ``test_control_the_same_san_without_the_opaque_entry_is_refused_when_counted``
(5,300 entries, refused at count, nothing built: the bound works for the plain shape);
``test_control_a_certificate_with_the_opaque_other_name_is_read_by_cryptography`` (the
otherName alone with two dNSNames: well formed, cryptography reads it, what the
attacker relies on).

Tried and held (read or run here): BER indefinite lengths in a certificate (the scan
takes them, cryptography refuses the certificate: unreadable, nothing built); a name's
attributes hidden in a multi-valued RDN (counted per attribute across RDNs); the
issuer/subject fields located by position with an optional [0] version (the same as
cryptography's); a long UTF8String attribute (one element, cryptography builds one
``str``; ``_describe`` renders at most 8 RDNs then cuts); an extension value with
trailing octets (the scan refuses it, cryptography refuses it too for SAN: unreadable);
the memo (keyed by the full DER, emptied at 256: a stranger forces misses, but each
miss is bounded by the count, as review 103 said).

Read, not run (Kamailio): ``_message_octets``'s cache keyed by ``($mi, $ml)``: tm's
faked request takes the id of its request less one (another worker's numbering), so in
the failure route a worker or the timer process can meet a stale entry of the same
length; the only reader there is ``drop_attempt_keys`` (``end_attempt`` on the read
message's scope), so a stale hit leaves an attempt's keys to their own expiry (bounded)
and, when the stale message is the INVITE's own reply, reads the same early-dialog
scope: no hole found.  ``$bs`` vs the core's head: a bare-LF blank line Kamailio takes
as the head's end is inside the octets ``crlf_head`` checks: 400.  Targets' life: keys
extended by a later re-INVITE whose targets expired leave a BYE ending nothing; the keys
go at their expiry (bounded by ``keycache_expire``), the known limit for keys a
re-INVITE adds.

Fixed (stop 37), hole 1: ``certfiles.certificate_counts`` refuses (``LimitExceededError``,
413) a certificate with an extension cryptography parses (``x509.ExtensionOID``) whose
value the DER scan cannot count, before cryptography reads it; one it keeps as opaque
bytes stays uncounted (nothing is built for it).  ``ua._certificate_from`` counts a PEM
certificate as a DER one.  The hole tests failed on the code before (checked) and pass;
the opaque entry's control now shows cryptography reading it and our count refusing it.
"""

from __future__ import annotations

import time

import pytest
from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from e2m_lab import costly
from e2m_plugins import certfiles, sip
from e2m_plugins.cms.limits import DEFAULT_LIMITS
from e2m_plugins.errors import LimitExceededError
from tests.unit.test_review103 import World, _cert, _cold, _der, _ec, _short

SAN_BOUND = DEFAULT_LIMITS.max_san_entries
CERT_BYTES = DEFAULT_LIMITS.max_certificate_bytes
TCP_BODY = costly.BODY_LIMIT - 512


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _deep(levels: int = 70) -> bytes:
    """One TLV nesting ``levels`` SEQUENCEs around a NULL: past ``cms.der``'s 64 levels,
    one opaque value to cryptography."""
    value = b"\x05\x00"
    for _ in range(levels):
        value = b"\x30" + _len(len(value)) + value
    return value


OPAQUE = x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.99999.1"), _deep())


def _san_certificate(entries: int, *, opaque: bool) -> bytes:
    key = _ec()
    names: list[x509.GeneralName] = [OPAQUE] if opaque else []
    names += [x509.DNSName("a")] * entries
    return _der(_cert(_short("many"), _short("many"), key.public_key(), key, san=names))


def _largest(opaque: bool) -> bytes:
    """The certificate with the most dNSName entries under the 16 KiB bound."""
    small = _san_certificate(100, opaque=opaque)
    entries = 100 + (CERT_BYTES - len(small) - 64) // 3
    der = _san_certificate(entries, opaque=opaque)
    assert len(der) <= CERT_BYTES, len(der)
    return der


def _message(w: World, certs: list[bytes]) -> tuple[bytes, bytes]:
    s = w.stranger
    info = costly._signer_info(s.cert.issuer.public_bytes(), s.cert.serial_number,
                               costly._wrong_digest_attrs())
    data = costly._signed_data(info, certificates=b"".join(certs), content=costly._INNER)
    msg = costly._labelled(s, costly._request(s, "tcp"), costly._smime(data, "signed-data"))
    return data, msg.serialize()


class _Built:
    """GeneralNames cryptography builds (``DNSName`` objects) and certificates it loads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dns = self.loaded = 0
        made = x509.DNSName._init_without_validation.__func__
        load = x509.load_der_x509_certificate

        def counted_made(cls, value):
            self.dns += 1
            return made(cls, value)

        def counted_load(data, *args, **kwargs):
            self.loaded += 1
            return load(data, *args, **kwargs)

        monkeypatch.setattr(x509.DNSName, "_init_without_validation", classmethod(counted_made))
        monkeypatch.setattr(x509, "load_der_x509_certificate", counted_load)

    def of(self, fn):
        _cold()
        self.dns = self.loaded = 0
        start = time.process_time()
        result = fn()
        self.ms = (time.process_time() - start) * 1000
        return result

    def __repr__(self) -> str:
        return f"{self.loaded} certificates loaded, {self.dns} DNSName built, {self.ms:.1f} ms"


def _run(w: World, role: str, raw: bytes):
    result = w.run(role, raw)
    return (result.error, result.code) if role == "proxy" else (type(result).__name__, None)


# ------------------------------------------------------------------ controls

def test_control_a_certificate_with_the_opaque_other_name_is_read_by_cryptography(
        monkeypatch) -> None:
    """The opaque entry is well formed: cryptography reads the certificate and its SAN.
    Since stop 37 ours refuses to count it (a SAN cryptography would build, which our
    reader cannot count), so nothing is built."""
    der = _san_certificate(2, opaque=True)
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(san) == 3 and isinstance(san[0], x509.OtherName)
    with pytest.raises(LimitExceededError, match="cannot be counted"):
        certfiles.certificate_counts(der, DEFAULT_LIMITS.max_certificate_elements)
    built = _Built(monkeypatch)
    with pytest.raises(LimitExceededError):
        built.of(lambda: certfiles.readable_certificate(der))
    assert built.loaded == 0


@pytest.mark.parametrize("role", ["proxy", "ua"])
def test_control_the_same_san_without_the_opaque_entry_is_refused_when_counted(
        world: World, role: str, monkeypatch) -> None:
    der = _largest(opaque=False)
    with pytest.raises(LimitExceededError):
        certfiles.certificate_counts(der, DEFAULT_LIMITS.max_certificate_elements)
    # 15 different certificates (the memo reads each DER once)
    _, raw = _message(world, [der] + [_largest(opaque=False) for _ in range(14)])
    assert len(sip.parse(raw).body) <= TCP_BODY and len(raw) <= costly.TCP_MESSAGE
    built = _Built(monkeypatch)
    outcome = built.of(lambda: _run(world, role, raw))
    print(role, outcome, built)
    assert outcome[0] == "LimitExceededError" and outcome[1] in (413, None), outcome
    assert built.loaded == 0 and built.dns == 0, built


# ------------------------------------------------------------------ holes

@pytest.mark.parametrize("role", ["proxy", "ua"])
def test_hole_a_san_behind_an_opaque_first_entry_is_read_uncounted(world: World, role: str,
                                                                   monkeypatch) -> None:
    der = _largest(opaque=True)
    try:
        counts: object = certfiles.certificate_counts(der, DEFAULT_LIMITS.max_certificate_elements)
    except LimitExceededError as exc:        # stop 37: a SAN it cannot count is refused
        counts = exc
    print("counted", counts, "octets", len(der))
    # 15 different certificates (the memo reads each DER once)
    _, raw = _message(world, [der] + [_largest(opaque=True) for _ in range(14)])
    assert len(sip.parse(raw).body) <= TCP_BODY and len(raw) <= costly.TCP_MESSAGE
    built = _Built(monkeypatch)
    outcome = built.of(lambda: _run(world, role, raw))
    print(role, outcome, built)
    # secure: refused like the plain shape, before cryptography builds a SAN over the bound
    assert built.dns <= 15 * SAN_BOUND, built
    assert outcome[0] == "LimitExceededError", outcome
