"""Review 193: what the command-line tools print to an operator's terminal, after the
review 191 fix (9668327: ``write_output("-")`` goes through ``for_terminal`` on a tty).

Every test below runs the tool with its stdout AND stderr on a pty (``_terminal``) and
counts the control octets that came out.  ESC = ``\\x1b``, BEL = ``\\x07``; the hostile
text is ``ESC ] 0 ; pwned BEL ESC [ 2 J`` (set the window title, clear the screen), the
same family as review 191's OSC 52 clipboard write.

Hole K1: ``e2m cms inspect`` prints a CMS's certificate names raw
- Attacker: anyone who sends a CMS (a SIP body, a mail, a file) that an operator inspects;
  no trust needed, ``inspect`` reads any SignedData.
- Messages: one SignedData carrying a self-signed certificate whose subject CN and SAN
  URI carry the sequence.
- Effect observed: ``e2m cms inspect --in X`` (text) wrote 8 ESC and 4 BEL to the
  terminal: ``subject``, ``issuer``, ``identities`` and the signer's ``issuer`` lines,
  each raw (``--json`` wrote 0: ``json.dumps`` escapes).
- Code at fault: e2m_plugins/cli/cms_cmd.py:362 (``_cmd_inspect`` prints
  ``render_text`` unescaped), values from :271 (``rfc4514_string``, which escapes
  only RFC 4514's specials) and :349/:353.
- Suggested fix: print each line of ``render_text`` through ``printable``.
- Test: test_cms_inspect_escapes_certificate_names.

Hole K2: error messages quote an attacker's text raw (``e2m: error: ...`` on stderr)
- Attacker: the sender of a CMS or a SIP message an operator checks with ``e2m``.
- Messages: (a) the SignedData of K1, verified against the operator's own CA;
  (b) a MESSAGE whose Content-Type is ``application/pkcs7-mime;
  smime-type=enveloped-data<U+009B>2J<U+202E>`` (a C1 CSI and a bidi override: no C0
  octet, so the parser's "control character in header section" check lets it by).
- Effect observed: (a) ``e2m cms verify`` failed with ``no trusted path for CN=eve..``
  quoting the subject and issuer: 4 ESC, 2 BEL on the terminal; (b) ``e2m sip open``
  failed with ``S/MIME type enveloped-data<U+009B>2j<U+202E> is not one E2M uses``: the
  CSI and the override reached the terminal as UTF-8 (``\\xc2\\x9b``, ``\\xe2\\x80\\xae``).
  ``_fail`` only folds whitespace.
- Code at fault: e2m_plugins/cli/__init__.py:118-121 (``_fail``), fed by
  e2m_plugins/certpath.py:875-877 and e2m_plugins/body.py:230.
- Suggested fix: ``_fail`` prints ``printable(text)`` (and ``ConfigError``'s lines each
  through it too).
- Tests: test_verify_failure_message_escapes_the_signers_names,
  test_sip_open_failure_message_escapes_c1_and_bidi.

Hole K3: ``e2m cms verify`` prints the signer's names raw on success
- Attacker: a signer whose root the operator trusts (a federated domain's own CA,
  ``--ca`` of the peer domain) names itself with the sequence in its SAN URI.
- Messages: the K1 SignedData, ``--ca`` its own certificate.
- Effect observed: exit 0 and the signer line ``sip:eve<ESC>]0;pwned<BEL><ESC>[2J@x``
  raw: 2 ESC, 1 BEL on the terminal (to stdout with ``--out FILE``, stderr with
  ``--out -``).
- Code at fault: e2m_plugins/cli/cms_cmd.py:227-228 (``_cmd_verify``'s
  ``print(line, file=stream)``), names from :203-211.
- Suggested fix: ``print(printable(line), ...)``.
- Test: test_cms_verify_escapes_signer_names.

Hole K4: ``e2m-proxy certs show`` prints a PUBLISHed certificate's names raw
- Attacker: a user of our domain whose CA takes the subject CN from the request (the
  service checks the SAN URI, the chain and the key, not the CN:
  ``check_published_certificate`` accepts it, as the test shows).
- Messages: a PUBLISH of that certificate (here: saved in the certificate table as the
  service saves it).
- Effect observed: ``e2m-proxy certs show sip:eve@example.com`` wrote 2 ESC, 1 BEL to
  the terminal on its ``subject`` line (the issuer is our CA: clean).
- Code at fault: kamailio_app/certs_cmd.py:76-81 (``_show``: ``rfc4514_string`` and
  the SAN URIs, ``issuer``, unescaped; ``_list`` :59-61 likewise, though its fields are
  checked AoRs and user names).
- Suggested fix: print the block through ``printable``.
- Test: test_certs_show_escapes_a_published_subject.

Hole K5: ``e2m-phone message`` prints a final answer's reason phrase raw
- Attacker: whoever answers the phone's MESSAGE (the callee, any proxy on the path,
  or anyone who can spoof the answer over UDP): pjsip takes the reason phrase up to the
  CRLF, ESC and all; the phone stores it as ``handle.reason`` (phone.py:1270).
- Messages: a final answer ``403 <ESC>]0;pwned<BEL><ESC>[2J``.
- Effect observed: ``e2m-phone: message failed: ...`` on stderr with 2 ESC, 1 BEL raw
  (the ``message_failed`` event on stdout goes through ``printable``: 0).  The same
  for ``e2m-phone call``'s ``call failed: <code> <reason>`` (cli.py:262).
- Code at fault: pjsua_hooks/cli.py:249 and :262.
- Suggested fix: ``printable(handle.reason)`` / ``printable(call.reason)`` (and the
  other stderr lines quoting an exception, :208, :211, :219, :276).
- Test: test_phone_message_failed_line_escapes_the_reason (drives ``_message`` with a
  stand-in phone whose handle holds the reason as phone.py stores it; no pjsua2).

Honest break HB1: ``for_terminal`` turns a tab into ``\\x09``
- Effect observed: ``a<TAB>b`` shown as ``a\\x09b``: a TSV, a log excerpt, an indented
  code snippet in a MESSAGE reads garbled on the terminal (``str.isprintable`` is False
  for TAB).
- Code at fault: e2m_plugins/cli/__init__.py:209-216 (``for_terminal`` via
  ``printable`` :163-181).
- Suggested fix: in ``for_terminal`` keep ``\\t`` (it moves the cursor, it does not
  command the terminal).
- Test: test_for_terminal_keeps_tabs.

Honest break HB2: ``for_terminal`` escapes honest Unicode spacing and joiners
- Effect observed: French ``Bonjour<U+00A0>!`` -> ``Bonjour\\xa0!``; CJK ``中文<U+3000>文``
  -> ``中文\\u3000文``; the family emoji ``👨<ZWJ>👩<ZWJ>👧`` -> ``👨\\u200d👩\\u200d👧``;
  Arabic's right-to-left mark ``<U+200F>`` -> ``\\u200f`` (4 of 4 mangled).
  ``isprintable`` is False for every space separator but U+0020 and every format
  character, harmless or not.
- Code at fault: e2m_plugins/cli/__init__.py:175 (``ch.isprintable()``).
- Suggested fix: for the text (not our one-line fields) keep category Zs and the
  harmless format characters (ZWJ, ZWNJ, LRM/RLM, soft hyphen, variation selectors);
  keep escaping C0/C1, the bidi embeddings/overrides/isolates U+202A-202E and
  U+2066-2069, line/paragraph separators.
- Test: test_for_terminal_keeps_honest_unicode_spacing_and_joiners.

Controls
- test_control_cms_inspect_json_escapes: ``--json`` of the K1 CMS: 0 ESC, 0 BEL.
- test_control_phone_event_line_escapes_the_reason: the phone's ``message_failed``
  event through ``Printer``: 0 ESC, the text shown as ``\\x1b``.
- test_control_for_terminal_keeps_utf8_crlf_and_long_lines: ``café``, ``中文``, emoji,
  CRLF -> LF (as a terminal shows it), a 1 MB line, all intact.
- test_control_for_terminal_cost_is_linear: 8 MiB of ESC (the worst case, 4 output
  characters each) in 2.2 s here, 32 MiB out; 8 MB of ordinary lines 0.7 s.
  Bounded at 20 s in the test.

Tried and held
- ``e2m cms decrypt`` of an envelope for a hostile certificate: the error quotes
  nothing (``no RecipientInfo is addressed to the keys given``); ``inspect`` of that
  envelope names the recipient by ``issuer-serial=5`` only.
- ``e2m sip inspect``/``open`` of a MESSAGE with ESC in the Content-Type, a
  ``name=``/``boundary=`` parameter, the Request-URI or a header name: refused with
  ``control character in header section`` (quotes nothing); ESC in a multipart
  part's header: ``control character in a MIME header``.  ``sip inspect``'s verdict is
  ``json.dumps`` (ASCII): 0 ESC for every message tried, and its 415 for the C1/bidi
  Content-Type (K2 b) is escaped there.
- ``e2m archive list/show`` (media rows included) and ``--json``: through
  ``printable``/``json.dumps`` (review 191's control still passes).
- ``e2m-proxy db``: prints only the configuration's names and counts, nothing a
  sender chose.
- The phone's event lines (stdout): ``Printer`` escapes every event, text and JSON.
- ``for_terminal`` on bytes that are not UTF-8: shown as ``\\xNN``, nothing raw.

Fixed (stop 50): not one print at a time: every command's ``main`` (``e2m``,
``e2m-proxy`` and its ``certs``, ``db``, ``users``, ``e2m-phone``) first calls
``e2m_plugins.cli.terminal.guard_terminal``, which wraps stdout and stderr, where they
are terminals, so that everything printed (listings, errors, Kamailio's log through
the launcher) passes ``terminal_text``: C0 controls but tab and newline, DEL, C1
controls, bidi embeddings/overrides/isolates and non-UTF-8 octets are written out;
tabs, spaces of any script, joiners and marks stay (HB1, HB2).  The phone's two
failure lines also pass ``printable`` where printed (K5 calls ``_message`` without
``main``).  Every hole test failed on the code before the fix and passes with it.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2m_lab.terminal_run import certs_show_on_a_terminal, e2m_argv, on_a_terminal
from e2m_plugins.cli.terminal import for_terminal

SEQ = "\x1b]0;pwned\x07\x1b[2J"          # window title, clear screen


def _terminal(argv: list[str], cwd: Path | None = None) -> tuple[int, bytes]:
    return on_a_terminal(argv, cwd=cwd)


_e2m = e2m_argv


def _count(out: bytes) -> tuple[int, int]:
    return out.count(b"\x1b"), out.count(b"\x07")


@pytest.fixture
def hostile(tmp_path):
    """A self-signed certificate named with SEQ (CN and SAN URI), and a SignedData by it."""
    from e2m_plugins.cms.signed import sign
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eve" + SEQ)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(5)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("sip:eve" + SEQ + "@x")]), False)
            .sign(key, hashes.SHA256()))
    pem = tmp_path / "eve.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    signed = tmp_path / "eve.p7"
    signed.write_bytes(sign(b"hello", cert, key, detached=False, include_certificate=True,
                            extra_certs=[], rsa_pss=False, digest="sha256"))
    return {"cert": pem, "cms": signed, "dir": tmp_path}


# ------------------------------------------------------------------ K1

def test_cms_inspect_escapes_certificate_names(hostile):
    rc, out = _terminal(_e2m("cms", "inspect", "--in", str(hostile["cms"])))
    print(f"\nrc {rc}; {_count(out)} (ESC, BEL) of {len(out)} octets")
    assert rc == 0 and b"subject" in out
    assert _count(out) == (0, 0)


def test_control_cms_inspect_json_escapes(hostile):
    rc, out = _terminal(_e2m("cms", "inspect", "--json", "--in", str(hostile["cms"])))
    assert rc == 0 and b"subject" in out
    assert _count(out) == (0, 0)


# ------------------------------------------------------------------ K2

def test_verify_failure_message_escapes_the_signers_names(hostile, pki):
    rc, out = _terminal(_e2m("cms", "verify", "--in", str(hostile["cms"]),
                             "--ca", str(pki.directory / "ca.crt"), "--out",
                             str(hostile["dir"] / "content")))
    print(f"\nrc {rc}; {_count(out)} (ESC, BEL): {out!r}")
    assert rc == 1 and b"no trusted path" in out
    assert _count(out) == (0, 0)


def _message(content_type: str) -> bytes:
    return (f"MESSAGE sip:bob@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK1\r\n"
            f"From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n"
            f"Call-ID: c1\r\nCSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: 2\r\n\r\nhi").encode()


def _bob_toml(pki, tmp_path: Path) -> Path:
    d = pki.directory
    path = tmp_path / "bob.toml"
    path.write_text(f'[identity]\naor = "sip:bob@example.com"\ncert = "{d}/bob.crt"\n'
                    f'key = "{d}/bob.key"\n\n[trust]\nca = ["{d}/ca.crt"]\n\n[peers]\n'
                    f'"sip:alice@example.com" = "{d}/alice.crt"\n')
    return path


def test_sip_open_failure_message_escapes_c1_and_bidi(pki, tmp_path):
    message = tmp_path / "m.sip"
    message.write_bytes(_message("application/pkcs7-mime; "
                                 "smime-type=enveloped-data\u009b2J\u202e"))
    rc, out = _terminal(_e2m("sip", "open", "--ua", str(_bob_toml(pki, tmp_path)),
                             "--in", str(message), "--out", str(tmp_path / "o.sip")))
    print(f"\nrc {rc}: {out!r}")
    assert rc == 1 and b"S/MIME type" in out
    assert b"\xc2\x9b" not in out and b"\xe2\x80\xae" not in out


# ------------------------------------------------------------------ K3

def test_cms_verify_escapes_signer_names(hostile):
    rc, out = _terminal(_e2m("cms", "verify", "--in", str(hostile["cms"]),
                             "--ca", str(hostile["cert"]), "--out",
                             str(hostile["dir"] / "content")))
    print(f"\nrc {rc}; {_count(out)} (ESC, BEL): {out!r}")
    assert rc == 0 and b"verification successful" in out
    assert _count(out) == (0, 0)


# ------------------------------------------------------------------ K4

def test_certs_show_escapes_a_published_subject(pki, tmp_path):
    from e2m_plugins.testpki import _issue
    aor = "sip:eve@example.com"
    cred = _issue(pki.ca, "eve" + SEQ, [x509.UniformResourceIdentifier(aor)], "ec",
                  [ExtendedKeyUsageOID.EMAIL_PROTECTION], None, None, 30, None)
    # the service takes it: SAN URI = AoR, chains to our CA, not a CA
    rc, out = certs_show_on_a_terminal(pki, tmp_path, aor,
                                       cred.cert.public_bytes(serialization.Encoding.DER))
    print(f"\nrc {rc}; {_count(out)} (ESC, BEL) of {len(out)} octets")
    assert rc == 0 and b"subject" in out
    assert _count(out) == (0, 0)


# ------------------------------------------------------------------ K5

_PHONE = """
import sys
from types import SimpleNamespace
from pjsua_hooks import cli
handle = SimpleNamespace(done=True, ok=False, reason=sys.argv[1])
phone = SimpleNamespace(send_message=lambda to, text: handle,
                        wait_until=lambda cond, timeout: cond())
if sys.argv[2] == "event":
    cli.Printer(False)({"kind": "message_failed", "to": "sip:bob@example.com",
                        "code": 403, "reason": sys.argv[1]})
    sys.exit(0)
sys.exit(cli._message(phone, "sip:bob@example.com", "hi", 5.0, cli._Stop()))
"""


def test_phone_message_failed_line_escapes_the_reason():
    rc, out = _terminal([sys.executable, "-c", _PHONE, SEQ, "line"])
    print(f"\nrc {rc}; {_count(out)} (ESC, BEL): {out!r}")
    assert rc == 1 and b"message failed" in out
    assert _count(out) == (0, 0)


def test_control_phone_event_line_escapes_the_reason():
    rc, out = _terminal([sys.executable, "-c", _PHONE, SEQ, "event"])
    assert rc == 0 and b"FAILED: 403" in out and b"\\x1b" in out
    assert _count(out) == (0, 0)


# ------------------------------------------------------------------ for_terminal

def test_for_terminal_keeps_tabs():
    assert for_terminal(b"name\tcount\nalice\t3\n") == b"name\tcount\nalice\t3\n"


def test_for_terminal_keeps_honest_unicode_spacing_and_joiners():
    honest = ["Bonjour\u00a0!", "中文\u3000文", "👨\u200d👩\u200d👧", "مرحبا\u200f"]
    mangled = [t for t in honest if for_terminal(t.encode()) != t.encode()]
    print(f"\n{len(mangled)} of {len(honest)} mangled")
    assert mangled == []


def test_control_for_terminal_keeps_utf8_crlf_and_long_lines():
    text = "café ü 中文 😀\r\nline two\r\n".encode()
    assert for_terminal(text) == "café ü 中文 😀\nline two\n".encode()
    long = b"x" * 1_000_000 + b"\n"
    assert for_terminal(long) == long
    assert for_terminal(b"\xff\x1bok") == b"\\xff\\x1bok"


def test_control_for_terminal_cost_is_linear():
    worst = b"\x1b" * (8 << 20)
    started = time.perf_counter()
    out = for_terminal(worst)
    took = time.perf_counter() - started
    print(f"\n{len(worst)} octets in {took:.2f} s, {len(out)} out")
    assert len(out) == 4 * len(worst) and took < 20
