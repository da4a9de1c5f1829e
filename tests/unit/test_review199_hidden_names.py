"""Review 199: a name an attacker chose shown as another name (zero-width and other
format characters) outside ``cms inspect``.

Hole K1: ``e2m-proxy certs show`` prints a published certificate's subject raw
- Attacker: a user of the home domain who publishes (PUBLISH, certificate service) a
  CA-issued certificate for its own AoR whose subject CN is ``ali<U+200B>ce``; the
  service accepts it (``check_published_certificate``: SAN URI = AoR, chains to the
  CA, not a CA).
- Messages: one PUBLISH of the certificate (here written straight into the table, as
  the service would after ``check_published_certificate``).
- Effect observed: ``e2m-proxy certs show sip:eve@example.com`` on a pty writes
  ``subject        CN=ali\\xe2\\x80\\x8bce`` -- the terminal shows ``CN=alice``; 0 of the
  output's octets are an escape of the U+200B (``guard_terminal`` keeps Cf characters
  other than bidi / U+FFF9..B, by design: joiners for honest scripts).
- Code at fault: kamailio_app/certs_cmd.py:76-79 (``_show``: ``rfc4514_string()`` of
  subject and issuer printed without ``printable``, as inspect now does since 826aaf8);
  likewise ``_list`` (:59-61) prints ``aor``/``published_by`` raw.
- Suggested fix: pass ``_show``'s and ``_list``'s lines through
  ``e2m_plugins.cli.printable`` (as ``archive_cmd`` and ``cms inspect`` do).
- Test: test_certs_show_writes_out_a_zero_width_subject.

Hole K2: ``e2m cms verify`` prints the signer's name raw after "verification successful"
- Attacker: holds a certificate under a trust anchor the operator passes with
  ``--ca``, with no SAN and CN ``ali<U+200B>ce``; signs a message with it.
- Messages: one SignedData (attached content, certificate included).
- Effect observed: ``e2m cms verify --in m.p7 --ca ca.crt --out content`` on a pty:
  rc 0, the signer line is ``ali\\xe2\\x80\\x8bce`` -- the terminal shows ``alice``,
  then ``e2m: verification successful: 1 signer(s)``.  The operator reads "signed by
  alice, verified".
- Code at fault: e2m_plugins/cli/cms_cmd.py:203-211 (``_signer_lines``: CN / subject)
  and :227-228 (``print(line)`` with no ``printable``).
- Suggested fix: ``print(printable(line), file=stream)`` in ``_cmd_verify``.
- Test: test_cms_verify_writes_out_a_zero_width_signer_name.

Controls
- test_control_printable_writes_out_format_characters: ``printable`` writes out
  U+200B, U+200C, U+200D, U+2060, U+FEFF, U+00AD (the inspect fix holds).
- test_control_cms_inspect_writes_out_a_zero_width_signer: ``cms inspect`` of K2's
  message: ``ali\\u200bce`` written out, no raw E2 80 8B octets.
- test_control_inspect_json_is_ascii: ``cms inspect --json`` escapes it as JSON
  (``\\u200b``, ensure_ascii).
- test_control_phone_printer_writes_out_a_zero_width_display_name: the phone's
  ``Printer`` (text) writes out a caller display name ``ali<U+200B>ce``; its JSON mode
  escapes it too.

Tried and held
- ``e2m archive list`` / ``show``: every row through ``printable`` (archive_cmd.py:69,
  103, 107); ``--json`` modes use ``json.dumps`` with ensure_ascii on (escapes U+200B).
- SAN URIs / DNS names of a certificate: IA5String, so ``cryptography`` refuses to build
  one with U+200B; a percent-escape (``%E2%80%8B``) shows as itself.
- ``e2m-proxy users list``: names are the operator's own (``users add``), not a peer's.
- ``printable`` and honest layout: tabs (``\\x09``) and a newline not followed by our
  two-space continuation are written out; inspect's own values hold no tab, so nothing
  honest observed broken there.  It also writes out ZWJ/ZWNJ (an emoji sequence shows
  as ``\\u200d``): the secure choice for a name, not counted as a break.

Read, not driven (time): ``e2m sip open``/``protect`` print ``info.describe()``
(sip_cmd.py:40, 55) raw; for a signer with no SAN URI/DNS name, ``describe`` says
``signed by <CN>`` (body.py:80-87), so K2's certificate would read "signed by alice"
there too; the same ``printable`` fix applies.

Fixed (stop 51): ``e2m-proxy certs list`` and ``show`` and ``e2m cms verify``'s signer
lines go through ``printable``; so do ``e2m sip protect``/``open``'s summaries (their
signer is named by a SAN URI, ASCII, once the UA checked it against From, so not shown
exploitable there: guarded all the same).
"""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from e2m_lab.terminal_run import certs_show_on_a_terminal, e2m_argv, on_a_terminal

ZW = "\u200b"
SPOOF = "ali" + ZW + "ce"             # shows as "alice"
RAW = SPOOF.encode()                  # b"ali\xe2\x80\x8bce"
WRITTEN = b"ali\\u200bce"


def _cred(pki, cn: str, san: list[x509.GeneralName]):
    from e2m_plugins.testpki import _issue
    return _issue(pki.ca, cn, san, "ec", [ExtendedKeyUsageOID.EMAIL_PROTECTION],
                  None, None, 30, None)


@pytest.fixture
def signed_by_spoof(pki, tmp_path):
    """A SignedData by a CA-issued certificate with no SAN and CN ali<U+200B>ce."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from e2m_plugins.cms.signed import sign
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SPOOF)]))
            .issuer_name(pki.ca.cert.subject).public_key(key.public_key()).serial_number(199)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
            .sign(pki.ca.key, hashes.SHA256()))
    path = tmp_path / "m.p7"
    path.write_bytes(sign(b"pay bob 100", cert, key, detached=False,
                          include_certificate=True, extra_certs=[], rsa_pss=False,
                          digest="sha256"))
    return path


# ------------------------------------------------------------------ K1

def test_certs_show_writes_out_a_zero_width_subject(pki, tmp_path):
    aor = "sip:eve@example.com"
    cred = _cred(pki, SPOOF, [x509.UniformResourceIdentifier(aor)])
    rc, out = certs_show_on_a_terminal(pki, tmp_path, aor,
                                       cred.cert.public_bytes(serialization.Encoding.DER))
    line = next((x for x in out.splitlines() if x.startswith(b"subject")), b"")
    print(f"\nrc {rc}; subject line {line!r}")
    assert rc == 0 and line
    assert RAW not in out and WRITTEN in out


# ------------------------------------------------------------------ K2

def test_cms_verify_writes_out_a_zero_width_signer_name(pki, signed_by_spoof, tmp_path):
    rc, out = on_a_terminal(e2m_argv("cms", "verify", "--in", str(signed_by_spoof),
                                     "--ca", str(pki.directory / "ca.crt"),
                                     "--out", str(tmp_path / "content")))
    print(f"\nrc {rc}: {out!r}")
    assert rc == 0 and b"verification successful" in out
    assert RAW not in out and WRITTEN in out


# ------------------------------------------------------------------ controls

def test_control_printable_writes_out_format_characters():
    from e2m_plugins.cli import printable
    for ch in "\u200b\u200c\u200d\u2060\ufeff\u00ad":
        assert printable("ali" + ch + "ce") == f"ali\\u{ord(ch):04x}ce" if ord(ch) > 0xFF \
            else printable("ali" + ch + "ce") == f"ali\\x{ord(ch):02x}ce"
        assert ch not in printable("ali" + ch + "ce")


def test_control_cms_inspect_writes_out_a_zero_width_signer(signed_by_spoof):
    rc, out = on_a_terminal(e2m_argv("cms", "inspect", "--in", str(signed_by_spoof)))
    assert rc == 0 and b"subject" in out
    assert RAW not in out and WRITTEN in out


def test_control_inspect_json_is_ascii(signed_by_spoof):
    rc, out = on_a_terminal(e2m_argv("cms", "inspect", "--json", "--in", str(signed_by_spoof)))
    assert rc == 0 and RAW not in out and b"\\u200b" in out
    assert max(out) < 0x80


def test_control_phone_printer_writes_out_a_zero_width_display_name():
    import io
    from pjsua_hooks import cli
    for as_json in (False, True):
        out = io.StringIO()
        printer = cli.Printer(as_json, out)
        printer({"kind": "message_failed", "to": f'"{SPOOF}" <sip:eve@example.com>',
                 "code": 403, "reason": SPOOF})
        text = out.getvalue()
        assert printer.failures == 0 and text
        assert ZW not in text and "\\u200b" in text
