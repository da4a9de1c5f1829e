"""``e2m sip protect|open|inspect`` on messages made by the project and by ``openssl cms``."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from e2m_plugins.cli import main
from e2m_plugins.sip import make_request, parse

PROXY = "proxy.example.com"
SDP = (b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
TEXT = b"meet me at noon"


@pytest.fixture
def configs(pki, tmp_path):
    """UA.toml for alice and bob, PROXY.toml for the trusted proxy, all pointing at the session PKI."""
    d = pki.directory
    def ua(name, peer, extra="", file=None):
        path = tmp_path / f"{file or name}.toml"
        path.write_text(f"""
[identity]
aor = "sip:{name}@example.com"
cert = "{d}/{name}.crt"
key = "{d}/{name}.key"

[trust]
ca = ["{d}/ca.crt"]

[peers]
"sip:{peer}@example.com" = "{d}/{peer}.crt"
{extra}
""")
        return path
    proxy_block = f"""
[[proxies]]
host = "{PROXY}"
cert = "{d}/proxy-{PROXY}.crt"
view = ["MESSAGE:*", "INVITE:application/sdp"]
"""
    proxy = tmp_path / "proxy.toml"
    proxy.write_text(f"""
[identity]
host = "{PROXY}"
cert = "{d}/proxy-{PROXY}.crt"
key = "{d}/proxy-{PROXY}.key"

[trust]
ca = ["{d}/ca.crt"]

[policy]
view = ["MESSAGE:*", "INVITE:application/sdp"]
verify = []
""")
    verify_proxy = tmp_path / "verify-proxy.toml"
    verify_proxy.write_text(proxy.read_text().replace("verify = []", 'verify = ["MESSAGE:*"]'))
    # openssl-made bodies are CBC, with no SIP context: taken only where a setting says so
    legacy = 'legacy_peers = ["sip:alice@example.com"]\nlegacy_unsigned_cbc = true\n'
    legacy_proxy = tmp_path / "legacy-proxy.toml"
    legacy_proxy.write_text(proxy.read_text() + legacy)
    legacy_verify_proxy = tmp_path / "legacy-verify-proxy.toml"
    legacy_verify_proxy.write_text(verify_proxy.read_text() + legacy)
    legacy_bob = ua("bob", "alice", '\n[[legacy]]\npeer = "sip:alice@example.com"\n'
                    'accept_unsigned = true\naccept_unsigned_cbc = true\n', file="legacy-bob")
    return {"alice": ua("alice", "bob", proxy_block), "bob": ua("bob", "alice"),
            "proxy": proxy, "verify_proxy": verify_proxy, "legacy_proxy": legacy_proxy,
            "legacy_verify_proxy": legacy_verify_proxy, "legacy_bob": legacy_bob,
            "dir": tmp_path}


def _write(path: Path, message) -> Path:
    path.write_bytes(message.serialize() if hasattr(message, "serialize") else message)
    return path


def _inspect(capsys, proxy_toml, message_path) -> dict:
    capsys.readouterr()
    assert main(["sip", "inspect", "--proxy", str(proxy_toml), "--in", str(message_path)]) == 0
    return json.loads(capsys.readouterr().out)


def _invite() -> bytes:
    return make_request("INVITE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                        to_uri="sip:bob@example.com", body=SDP,
                        content_type="application/sdp").serialize()


def test_protect_inspect_open_round_trip(configs, capsys, tmp_path):
    plain = _write(tmp_path / "plain.sip", _invite())
    out = tmp_path / "out.sip"
    assert main(["sip", "protect", "--ua", str(configs["alice"]), "--in", str(plain),
                 "--out", str(out)]) == 0
    assert SDP not in out.read_bytes()
    assert "encrypted for sip:bob@example.com, proxy.example.com" in capsys.readouterr().err

    verdict = _inspect(capsys, configs["proxy"], out)
    assert verdict["action"] == "forward"
    (viewed,) = verdict["viewed"]
    assert viewed["content_type"] == "application/sdp" and viewed["length"] == len(SDP)
    assert viewed["sha256"] == hashlib.sha256(SDP).hexdigest()
    assert verdict["media"][0]["port"] == 40000
    assert "v=0" not in json.dumps(verdict)              # digests only, never the text

    opened = tmp_path / "opened.sip"
    assert main(["sip", "open", "--ua", str(configs["bob"]), "--in", str(out),
                 "--out", str(opened)]) == 0
    assert parse(opened.read_bytes()).body == SDP
    assert (opened.stat().st_mode & 0o077) == 0          # plaintext file is private


def test_inspect_answers_496_for_a_body_it_cannot_read(configs, capsys, tmp_path):
    plain = _write(tmp_path / "plain.sip", _invite())
    bob_only = tmp_path / "bob-only.toml"
    bob_only.write_text(configs["alice"].read_text().split("[[proxies]]")[0])
    out = tmp_path / "out.sip"
    assert main(["sip", "protect", "--ua", str(bob_only), "--in", str(plain), "--out", str(out)]) == 0
    verdict = _inspect(capsys, configs["proxy"], out)
    assert (verdict["action"], verdict["code"]) == ("reply", 496)
    assert verdict["body_content_type"] == "application/pkix-cert" and verdict["body_length"] > 300
    headers = dict(verdict["add_headers"])
    assert headers["Warning"] == f"380 {PROXY} \"Required to view 'application/sdp'\""
    assert headers["Proxy-Body-Policy"].startswith(PROXY + ";")


def test_open_of_a_body_for_someone_else_names_the_493(configs, capsys, tmp_path):
    plain = _write(tmp_path / "plain.sip", _invite())
    out = tmp_path / "out.sip"
    main(["sip", "protect", "--ua", str(configs["alice"]), "--in", str(plain), "--out", str(out)])
    capsys.readouterr()
    assert main(["sip", "open", "--ua", str(configs["alice"]), "--in", str(out),
                 "--out", str(tmp_path / "x.sip")]) == 1
    assert "493 Undecipherable" in capsys.readouterr().err
    assert not (tmp_path / "x.sip").exists()


def test_config_mistakes_are_listed_one_per_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[identity]\naor = "bob"\ncert = "missing.crt"\n\n[policy]\nview = ["nonsense"]\n')
    assert main(["sip", "inspect", "--proxy", str(bad), "--in", str(bad)]) == 1
    err = capsys.readouterr().err
    for problem in ("[identity].host is required", "missing.crt", "[identity].key is required",
                    "missing section [trust]", "'nonsense'"):
        assert problem in err
    assert err.count("\n  - ") >= 5


# -- messages made by openssl cms ----------------------------------------------------

def _openssl(*args: str, data: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", "cms", *args], input=data, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def _sip_with_cms(der: bytes, smime_type: str = "enveloped-data", cid: str = "1234@atlanta",
                  method: str = "MESSAGE") -> bytes:
    """A SIP request carrying openssl's DER with the draft's framing and label."""
    head = (f"{method} sip:bob@example.com SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKossl1\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=9fx\r\n"
            "To: <sip:bob@example.com>\r\nCall-ID: openssl-1@example.com\r\n"
            f"CSeq: 1 {method}\r\n"
            f"Proxy-Required-Body: {PROXY};cid={cid}\r\n"
            f"Content-Type: application/pkcs7-mime;smime-type={smime_type};name=smime.p7m\r\n"
            "Content-Transfer-Encoding: binary\r\n"
            f"Content-ID: {cid}\r\n"
            "Content-Disposition: attachment;filename=smime.p7m;handling=required\r\n"
            f"Content-Length: {len(der)}\r\n\r\n")
    return head.encode() + der


@pytest.mark.openssl
def test_openssl_enveloped_message_is_viewed_by_the_proxy_and_opened_by_bob(pki, configs, capsys, tmp_path):
    d = pki.directory
    entity = b"Content-Type: text/plain\r\n\r\n" + TEXT
    der = _openssl("-encrypt", "-binary", "-outform", "DER", "-aes-128-cbc",
                   "-recip", str(d / "bob.crt"), "-recip", str(d / f"proxy-{PROXY}.crt"),
                   data=entity)
    msg = _write(tmp_path / "ossl.sip", _sip_with_cms(der))
    # by default refused: CBC and no SIP context, from a sender no setting names
    refused = _inspect(capsys, configs["proxy"], msg)
    assert refused["action"] == "reply" and not refused["viewed"]
    assert main(["sip", "open", "--ua", str(configs["bob"]), "--in", str(msg),
                 "--out", str(tmp_path / "no.sip")]) != 0
    verdict = _inspect(capsys, configs["legacy_proxy"], msg)
    assert verdict["action"] == "forward"
    assert verdict["viewed"][0]["sha256"] == hashlib.sha256(TEXT).hexdigest()
    opened = tmp_path / "opened.sip"
    assert main(["sip", "open", "--ua", str(configs["legacy_bob"]), "--in", str(msg),
                 "--out", str(opened)]) == 0
    assert parse(opened.read_bytes()).body == TEXT


@pytest.mark.openssl
def test_openssl_envelope_for_bob_only_gets_496_without_warning(pki, configs, capsys, tmp_path):
    d = pki.directory
    der = _openssl("-encrypt", "-binary", "-outform", "DER", "-aes-256-cbc",
                   "-recip", str(d / "bob.crt"), data=b"Content-Type: text/plain\r\n\r\n" + TEXT)
    verdict = _inspect(capsys, configs["proxy"], _write(tmp_path / "m.sip", _sip_with_cms(der)))
    assert verdict["code"] == 496
    assert "Warning" not in dict(verdict["add_headers"])   # MESSAGE:* = the whole body


@pytest.mark.openssl
def test_openssl_sign_then_encrypt_is_verified_by_a_verifying_proxy(pki, configs, capsys, tmp_path):
    d = pki.directory
    signed = _openssl("-sign", "-binary", "-nodetach", "-outform", "SMIME",
                      "-signer", str(d / "alice.crt"), "-inkey", str(d / "alice.key"),
                      data=b"Content-Type: text/plain\r\n\r\n" + TEXT)
    der = _openssl("-encrypt", "-binary", "-outform", "DER", "-aes-128-cbc",
                   "-recip", str(d / "bob.crt"), "-recip", str(d / f"proxy-{PROXY}.crt"),
                   data=signed)
    msg = _write(tmp_path / "st.sip", _sip_with_cms(der))
    verdict = _inspect(capsys, configs["legacy_verify_proxy"], msg)
    assert verdict["action"] == "forward", verdict
    (viewed,) = verdict["viewed"]
    assert viewed["signature"] == "valid" and viewed["signer"] == "sip:alice@example.com"
    opened = tmp_path / "o.sip"
    assert main(["sip", "open", "--ua", str(configs["legacy_bob"]), "--in", str(msg),
                 "--out", str(opened)]) == 0
    assert "signed by sip:alice@example.com (trusted)" in capsys.readouterr().err


@pytest.mark.openssl
def test_openssl_unsigned_envelope_gets_495_from_a_verifying_proxy(pki, configs, capsys, tmp_path):
    d = pki.directory
    der = _openssl("-encrypt", "-binary", "-outform", "DER", "-aes-128-cbc",
                   "-recip", str(d / "bob.crt"), "-recip", str(d / f"proxy-{PROXY}.crt"),
                   data=b"Content-Type: text/plain\r\n\r\n" + TEXT)
    verdict = _inspect(capsys, configs["legacy_verify_proxy"],
                       _write(tmp_path / "u.sip", _sip_with_cms(der)))
    assert (verdict["code"], verdict["reason"]) == (495, "Signature Required")
