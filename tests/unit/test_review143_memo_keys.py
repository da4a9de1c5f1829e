"""Review 143 (attacker's review of aa004e9), the issue 17 speed-ups at the unit level:
``certfiles.certificate_key`` and the memos keyed by it, the fast head reader's greedy
``_HEADER_LINES``, and ``lazy.lazy_property``.  No hole was found here: every test is a
control that passes unmarked and pins what held (the full account, with the wire
tests, is in ``tests/kamailio/test_review143_ack_wire.py``).

What was tried
--------------

- **Memo confusion through another encoding.**  ``certificate_key`` is the bytes a
  certificate was read from (``readable_certificate``) or, for one from elsewhere (a
  file, a builder) or after ``_KEY_OF`` was emptied, ``public_bytes(DER)``.  Two objects
  could share a memo entry (path, signing key, identities, usage verdict) only if
  cryptography read some non-DER bytes and wrote them back otherwise.  cryptography
  51.0.1 (rust-asn1) refuses every non-DER spelling tried (an unsorted SET OF in a
  two-attribute RDN: ``InvalidSetOrdering``; BOOLEAN TRUE as ``01``: ``InvalidValue``;
  an explicit DEFAULT ``critical FALSE``: ``EncodedDefault``; a long-form length:
  ``InvalidLength``; a non-minimal INTEGER: ``InvalidValue``), so ``readable_certificate``
  gives None for each and a certificate it reads writes back exactly the bytes it was
  read from: ``test_control_non_der_spellings_are_never_read`` and
  ``test_control_a_read_certificate_keys_by_its_bytes_before_and_after_eviction``.
- **Eviction and id reuse.**  ``_KEY_OF`` is keyed by ``id(cert)`` but each entry holds
  its certificate, and a hit is checked with ``is``: an id cannot be reused while held,
  and an emptied table recomputes the same bytes.  600 certificates read in a row keep
  it at 256 or fewer entries (``test_control_the_key_table_stays_bounded``).  A stranger
  who makes it thrash costs one ``public_bytes`` (some 30 µs) per honest certificate
  per clear, after 256 certificates of his own (each already a
  ``readable_certificate`` parse): not a lever.
- **A file's certificate and a message's**: equal DER, equal key, one memo entry; they
  are the same certificate (``test_control_a_file_certificate_and_a_message_copy_share_a_key``).
- **The greedy header regex.**  A seeded differential run of the fast head reader
  against the line-by-line parser over 20,000 heads built from names, colons, blanks,
  tabs, NBSP (``\\xa0`` and ``\\xc2\\xa0``), U+2028, NEL, invalid UTF-8, ``;=%"`` and
  CRLFs: whenever the fast path reads a head, the general parser reads the same start
  line, headers and body offset (67,178 of 200,000 read by the fast path in a scratch
  run, 0 differences).  A bare CR or LF, folding and control octets never reach the
  regex.  Backtracking is linear: the value's ``[^\\r\\n]*`` stops at the line's own
  CR, a line can fail only before its colon; 240 KB heads of 60 lines of 3,000 blanks
  then ``x`` and 500 ``" \\t"``, 4,000-octet names without a colon, ``"x "`` x 2,000 and
  ``" \\t"`` x 1,900 read in 4.5 to 10 ms (linear with size; measured, not asserted).
- **lazy_property**: no class using it has ``__slots__`` (``SipMessage``, ``MimePart``,
  ``OpenedPart``, ``certpath._Node`` all have a ``__dict__``); every property is a pure
  function of immutable fields but ``SipMessage._addresses``, a per-message memo dict:
  two threads racing its first read may each fill a dict of their own and one is lost,
  which only costs a second parse of an address.  Kamailio workers are processes with
  one interpreter thread; in the phone a message object is local to the callback that
  parsed it.  ``test_control_racing_first_reads_agree`` runs eight threads on one
  message's first reads.
"""

from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from e2m_plugins import certfiles, sip
from e2m_plugins.certfiles import certificate_key, readable_certificate
from e2m_plugins.errors import E2MError

NOW = datetime.now(timezone.utc)
_KEY = ec.generate_private_key(ec.SECP256R1())


def _certificate(serial: int = 5) -> x509.Certificate:
    """A self-signed certificate whose subject is one RDN of two attributes (a SET OF
    whose order DER fixes) with a critical extension (a BOOLEAN) and a SAN."""
    name = x509.Name([x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.COMMON_NAME, "b"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "a")])])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(_KEY.public_key()).serial_number(serial)
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("sip:bob@example.com")]), critical=False)
            .sign(_KEY, hashes.SHA256()))


# -- a small DER tree, to write the same certificate in other (non-DER) ways ----------

def _read(data: bytes, pos: int = 0) -> tuple[list, int]:
    tag = data[pos]
    first = data[pos + 1]
    if first < 0x80:
        length, start = first, pos + 2
    else:
        count = first & 0x7F
        length = int.from_bytes(data[pos + 2:pos + 2 + count], "big")
        start = pos + 2 + count
    content = data[start:start + length]
    if tag & 0x20:
        kids, at = [], 0
        while at < len(content):
            kid, at = _read(content, at)
            kids.append(kid)
        return [tag, kids], start + length
    return [tag, content], start + length


def _length(n: int, long_form: bool = False) -> bytes:
    if n < 0x80 and not long_form:
        return bytes([n])
    body = n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
    return bytes([0x80 | len(body)]) + body


def _write(node: list, long_at: object = None) -> bytes:
    tag, value = node
    content = b"".join(_write(k, long_at) for k in value) if isinstance(value, list) else value
    return bytes([tag]) + _length(len(content), long_form=node is long_at) + content


def _tree(cert: x509.Certificate) -> list:
    return _read(cert.public_bytes(serialization.Encoding.DER))[0]


def _unsorted_set(cert: x509.Certificate) -> bytes:
    tree = _tree(cert)
    subject = tree[1][0][1][5]                     # tbs: version, serial, alg, issuer, validity, subject
    rdn = subject[1][0]
    rdn[1].reverse()                               # (O, CN): a SET OF out of DER order
    return _write(tree)


def _boolean_01(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER).replace(
        bytes.fromhex("0101ff0402"), bytes.fromhex("0101010402"), 1)


def _explicit_default(cert: x509.Certificate) -> bytes:
    tree = _tree(cert)
    extensions = tree[1][0][1][7][1][0]            # [3] EXPLICIT Extensions
    san = extensions[1][1]                         # (oid, OCTET STRING): critical omitted
    san[1].insert(1, [0x01, b"\x00"])              # critical FALSE, written out
    return _write(tree)


def _long_length(cert: x509.Certificate) -> bytes:
    tree = _tree(cert)
    serial = tree[1][0][1][1]
    return _write(tree, long_at=serial)


def _nonminimal_integer(cert: x509.Certificate) -> bytes:
    tree = _tree(cert)
    serial = tree[1][0][1][1]
    serial[1] = b"\x00" + serial[1]
    return _write(tree)


SPELLINGS = {"unsorted SET OF": _unsorted_set, "BOOLEAN 01": _boolean_01,
             "explicit DEFAULT": _explicit_default, "long-form length": _long_length,
             "non-minimal INTEGER": _nonminimal_integer}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_control_non_der_spellings_are_never_read(spelling: str) -> None:
    cert = _certificate()
    der = cert.public_bytes(serialization.Encoding.DER)
    other = SPELLINGS[spelling](cert)
    assert other != der and _read(other)[1] == len(other)      # well-framed, not DER
    assert readable_certificate(der) is not None
    assert readable_certificate(other) is None


def test_control_a_read_certificate_keys_by_its_bytes_before_and_after_eviction() -> None:
    der = _certificate(serial=143).public_bytes(serialization.Encoding.DER)
    cert = readable_certificate(der)
    assert cert is not None and certificate_key(cert) == der
    certfiles._KEY_OF.clear()                      # what a full table does
    assert certificate_key(cert) == der            # written anew: the same octets


def test_control_a_file_certificate_and_a_message_copy_share_a_key(tmp_path) -> None:
    built = _certificate(serial=1431)
    path = tmp_path / "bob.pem"
    path.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    from_file = x509.load_pem_x509_certificate(path.read_bytes())
    from_message = readable_certificate(built.public_bytes(serialization.Encoding.DER))
    assert from_message is not None and from_file is not from_message
    assert certificate_key(from_file) == certificate_key(from_message)
    assert from_file == from_message


def test_control_the_key_table_stays_bounded() -> None:
    for serial in range(1000, 1600):
        cert = readable_certificate(_certificate(serial).public_bytes(serialization.Encoding.DER))
        assert cert is not None
        assert len(certfiles._KEY_OF) <= certfiles._KEY_OF_MAX


# -- the fast head reader ----------------------------------------------------------------

_PIECES = [b"a", b"B", b"-", b" ", b"\t", b":", b"x", b"\xc3\xa9", b"\xff", b"\xa0",
           b"\xc2\xa0", b"\xe2\x80\xa8", b"\x85", b";", b"=", b'"', b"\r\n", b"%"]


def test_control_the_fast_head_reader_reads_as_the_general_parser() -> None:
    rng = random.Random(143)
    fast = 0
    for _ in range(20000):
        lines = [b"INVITE sip:a@b SIP/2.0"]
        for _ in range(rng.randint(0, 4)):
            lines.append(b"".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 12))))
        data = b"\r\n".join(lines) + b"\r\n\r\n"
        quick = sip._parse_plain_head(data, 64, 4096)
        if quick is None:
            continue
        fast += 1
        try:
            general = sip._parse_head(data, 64, 4096)
        except E2MError as exc:           # pragma: no cover - would be a finding
            pytest.fail(f"fast path read what the general parser refuses: {data!r}: {exc}")
        assert (quick.start_line, quick.headers, quick.body_start) == \
            (general.start_line, general.headers, general.body_start), data
    assert fast > 5000                     # the fast path was exercised


@pytest.mark.parametrize("line", [b"A:" + b" " * 3000 + b"x" + b" \t" * 500,
                                  b"A:" + b"x " * 2000, b"A" + b" \t" * 1900 + b"y"])
def test_control_long_blank_runs_read_alike(line: bytes) -> None:
    data = b"INVITE sip:a@b SIP/2.0\r\n" + (line + b"\r\n") * 3 + b"\r\n"
    quick = sip._parse_plain_head(data, 64, 1 << 20)
    if b":" in line:
        general = sip._parse_head(data, 64, 1 << 20)
        assert quick is not None and quick.headers == general.headers
    else:
        assert quick is None               # no colon: left to the general parser


# -- lazy_property -----------------------------------------------------------------------

def test_control_racing_first_reads_agree() -> None:
    data = (b"MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
            b"From: <sip:alice@example.com>;tag=a\r\nTo: <sip:bob@example.com>\r\n"
            b"Call-ID: c\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n")
    for _ in range(50):
        message = sip.parse(data)
        message.__dict__.pop("_index", None)       # the first read still to come
        seen: list = []
        start = threading.Barrier(8)

        def read() -> None:
            start.wait()
            seen.append((message.get("Call-ID"), message.address("From").uri,
                         message.get_all("Via")))

        threads = [threading.Thread(target=read) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(seen) == 8 and len(set(map(repr, seen))) == 1
