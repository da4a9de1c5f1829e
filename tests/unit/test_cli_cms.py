"""``e2m cms ...`` called in-process through ``main([...])``."""

from __future__ import annotations

import argparse
import base64
import json
from datetime import datetime, timedelta, timezone

import pytest

from e2m_plugins.cli import Group, _REGISTRY, main, register_group
from e2m_plugins.cms.signed import sign
from e2m_plugins.testpki import issue_user, write_credential

# Distinctive so that any leak into inspect output or messages is easy to spot.
SECRET = b"v=0\r\no=alice 42 42 IN IP4 192.0.2.7\r\ns=TOP-SECRET-SDP-9f3a\r\n"
KEK = "000102030405060708090a0b0c0d0e0f"
KEK_ID = "c0ffee01"
PROXY = "proxy.example.com"


@pytest.fixture
def plain(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_bytes(SECRET)
    return path


def _paths(cred) -> tuple[str, str]:
    return str(cred.cert_path), str(cred.key_path)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier calls printed
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_error_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("e2m: error: "), err


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert "TOP-SECRET" not in text
        assert SECRET.hex() not in text
        assert base64.b64encode(SECRET).decode() not in text


# ---------------------------------------------------------------- encrypt / decrypt

@pytest.mark.parametrize("cipher", ["aes-128-cbc", "aes-256-cbc", "aes-128-gcm", "aes-256-gcm"])
def test_encrypt_decrypt_rsa_each_cipher(pki, tmp_path, plain, capsys, cipher):
    bob_crt, bob_key = _paths(pki.user("bob"))
    env, out = tmp_path / "env.der", tmp_path / "out.txt"
    code, _, err = _run(capsys, "cms", "encrypt", "--recip", bob_crt, "--cipher", cipher,
                        "--in", str(plain), "--out", str(env))
    assert code == 0, err
    assert env.read_bytes()[:1] == b"\x30"  # DER
    cbc = ["--accept-cbc"] if "cbc" in cipher else []
    if cbc:   # refused unless asked for, with the one answer every decryption failure gets
        code, _, err = _run(capsys, "cms", "decrypt", "--recip", bob_crt, "--key", bob_key,
                            "--in", str(env), "--out", str(out))
        assert code == 1 and "decryption failed" in err
    code, _, err = _run(capsys, "cms", "decrypt", "--recip", bob_crt, "--key", bob_key, *cbc,
                        "--in", str(env), "--out", str(out))
    assert code == 0, err
    assert out.read_bytes() == SECRET
    _assert_no_secret(err)


def test_default_cipher_is_aes128_gcm(pki, tmp_path, plain, capsys):
    env = tmp_path / "env.der"
    assert main(["cms", "encrypt", "--recip", str(pki.user("bob").cert_path),
                 "--in", str(plain), "--out", str(env)]) == 0
    code, out, _ = _run(capsys, "cms", "inspect", "--in", str(env), "--json")
    info = json.loads(out)
    assert info["envelope"]["envelope_type"] == "auth-enveloped-data"
    assert info["envelope"]["content_algorithm"] == "aes-128-gcm"


def test_every_recipient_kind_opens_the_same_envelope(pki, tmp_path, plain, capsys):
    """ktri OAEP (RSA), kari P-256, kari X25519 and two kekri pairs in one envelope."""
    alice, proxy_ec, dana = pki.user("alice"), pki.proxy(PROXY, "ec"), pki.user("dana", "x25519")
    env = tmp_path / "env.der"
    code, _, err = _run(capsys, "cms", "encrypt", "--oaep",
                        "--recip", str(alice.cert_path), "--recip", str(proxy_ec.cert_path),
                        "--recip", str(dana.cert_path),
                        "--kek-id", KEK_ID, "--kek", KEK, "--kek-id", "02", "--kek", "ff" * 32,
                        "--in", str(plain), "--out", str(env))
    assert code == 0, err
    openers = [
        ["--recip", str(alice.cert_path), "--key", str(alice.key_path)],
        ["--recip", str(proxy_ec.cert_path), "--key", str(proxy_ec.key_path)],
        ["--recip", str(dana.cert_path), "--key", str(dana.key_path)],
        ["--kek-id", KEK_ID, "--kek", KEK],
        ["--kek-id", "02", "--kek", "ff" * 32],
        # Several keys: pairs are matched in order, the one that fits is used.
        ["--recip", str(pki.user("bob").cert_path), "--key", str(pki.user("bob").key_path),
         "--recip", str(dana.cert_path), "--key", str(dana.key_path)],
    ]
    for index, opener in enumerate(openers):
        out = tmp_path / f"out{index}.txt"
        code, _, err = _run(capsys, "cms", "decrypt", *opener, "--in", str(env), "--out", str(out))
        assert code == 0, (opener, err)
        assert out.read_bytes() == SECRET
    code, out, _ = _run(capsys, "cms", "inspect", "--in", str(env), "--json")
    recips = json.loads(out)["envelope"]["recipients"]
    assert sorted(r["kind"] for r in recips) == ["kari", "kari", "kekri", "kekri", "ktri"]
    assert {r["key_algorithm"] for r in recips if r["kind"] == "ktri"} == {"rsaes-oaep"}
    assert any(r["identifier"] == f"kekid={KEK_ID}" for r in recips)


def test_decrypt_accepts_pem_and_smime_input(pki, tmp_path, plain, capsys):
    bob_crt, bob_key = _paths(pki.user("bob"))
    env = tmp_path / "env.der"
    assert main(["cms", "encrypt", "--recip", bob_crt, "--in", str(plain), "--out", str(env)]) == 0
    b64 = base64.encodebytes(env.read_bytes())
    pem = tmp_path / "env.pem"
    pem.write_bytes(b"-----BEGIN CMS-----\n" + b64 + b"-----END CMS-----\n")
    smime = tmp_path / "env.p7m"
    smime.write_bytes(b"MIME-Version: 1.0\r\n"
                      b"Content-Type: application/pkcs7-mime; smime-type=authEnveloped-data\r\n"
                      b"Content-Transfer-Encoding: base64\r\n\r\n" + b64)
    for source in (pem, smime):
        out = tmp_path / (source.name + ".out")
        code, _, err = _run(capsys, "cms", "decrypt", "--recip", bob_crt, "--key", bob_key,
                            "--in", str(source), "--out", str(out))
        assert code == 0, err
        assert out.read_bytes() == SECRET


def test_cek_reference_is_shown_in_hex(pki, tmp_path, plain, capsys):
    env = tmp_path / "env.der"
    assert main(["cms", "encrypt", "--recip", str(pki.user("bob").cert_path), "--cipher", "aes-128-cbc",
                 "--cek-reference", "d1a1060001", "--cek-max-decrypts", "5",
                 "--in", str(plain), "--out", str(env)]) == 0
    code, out, err = _run(capsys, "cms", "inspect", "--in", str(env))
    assert code == 0
    assert "cek-reference" in out and "d1a1060001" in out
    assert "cek-max-decrypts" in out
    info = json.loads(_run(capsys, "cms", "inspect", "--in", str(env), "--json")[1])
    attrs = {a["name"]: a["values"] for a in info["envelope"]["unprotected_attributes"]}
    assert attrs == {"cek-reference": ["d1a1060001"], "cek-max-decrypts": [5]}
    bob_crt, bob_key = _paths(pki.user("bob"))
    code, _, err = _run(capsys, "cms", "decrypt", "--recip", bob_crt, "--key", bob_key,
                        "--accept-cbc", "--in", str(env), "--out", str(tmp_path / "o"))
    assert code == 0 and "d1a1060001" in err


def test_decrypt_output_file_is_private(pki, tmp_path, plain):
    bob_crt, bob_key = _paths(pki.user("bob"))
    env, out = tmp_path / "env.der", tmp_path / "out.txt"
    assert main(["cms", "encrypt", "--recip", bob_crt, "--in", str(plain), "--out", str(env)]) == 0
    assert main(["cms", "decrypt", "--recip", bob_crt, "--key", bob_key,
                 "--in", str(env), "--out", str(out)]) == 0
    assert out.stat().st_mode & 0o077 == 0


def test_out_dash_writes_stdout(pki, tmp_path, plain, capsysbinary):
    bob_crt, bob_key = _paths(pki.user("bob"))
    env = tmp_path / "env.der"
    assert main(["cms", "encrypt", "--recip", bob_crt, "--in", str(plain), "--out", str(env)]) == 0
    capsysbinary.readouterr()
    assert main(["cms", "decrypt", "--recip", bob_crt, "--key", bob_key, "--in", str(env), "--out", "-"]) == 0
    assert capsysbinary.readouterr().out == SECRET


# ---------------------------------------------------------------- failures: exit 1

def test_wrong_key_exits_1_with_one_line(pki, tmp_path, plain, capsys):
    env = tmp_path / "env.der"
    assert main(["cms", "encrypt", "--recip", str(pki.user("bob").cert_path),
                 "--in", str(plain), "--out", str(env)]) == 0
    alice_crt, alice_key = _paths(pki.user("alice"))
    out = tmp_path / "out.txt"
    code, stdout, err = _run(capsys, "cms", "decrypt", "--recip", alice_crt, "--key", alice_key,
                             "--in", str(env), "--out", str(out))
    assert code == 1
    _assert_one_error_line(err)
    assert not out.exists()
    # A KEK with the right id but the wrong value: ours, yet it does not open.
    assert main(["cms", "encrypt", "--kek-id", KEK_ID, "--kek", KEK,
                 "--in", str(plain), "--out", str(env)]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, "cms", "decrypt", "--kek-id", KEK_ID, "--kek", "11" * 16,
                        "--in", str(env), "--out", str(out))
    assert code == 1
    _assert_one_error_line(err)
    _assert_no_secret(err)


def test_tampered_envelope_exits_1(pki, tmp_path, plain, capsys):
    bob_crt, bob_key = _paths(pki.user("bob"))
    env = tmp_path / "env.der"
    assert main(["cms", "encrypt", "--recip", bob_crt, "--in", str(plain), "--out", str(env)]) == 0
    data = bytearray(env.read_bytes())
    data[-20] ^= 0x01  # inside the GCM tag or ciphertext
    env.write_bytes(bytes(data))
    capsys.readouterr()
    code, _, err = _run(capsys, "cms", "decrypt", "--recip", bob_crt, "--key", bob_key,
                        "--in", str(env), "--out", str(tmp_path / "o"))
    assert code == 1
    _assert_one_error_line(err)


def test_unreadable_files_exit_1(pki, tmp_path, plain, capsys):
    bob_crt, bob_key = _paths(pki.user("bob"))
    missing = str(tmp_path / "missing")
    not_cert = tmp_path / "junk.crt"
    not_cert.write_bytes(b"not a certificate")
    cases = [
        ["cms", "encrypt", "--recip", bob_crt, "--in", missing, "--out", str(tmp_path / "o")],
        ["cms", "encrypt", "--recip", missing, "--in", str(plain), "--out", str(tmp_path / "o")],
        ["cms", "encrypt", "--recip", str(not_cert), "--in", str(plain), "--out", str(tmp_path / "o")],
        ["cms", "encrypt", "--recip", bob_crt, "--in", str(plain), "--out", str(tmp_path / "no" / "dir")],
        ["cms", "decrypt", "--recip", bob_crt, "--key", missing, "--in", str(plain), "--out", str(tmp_path / "o")],
        ["cms", "decrypt", "--recip", bob_crt, "--key", bob_key, "--in", str(plain), "--out", str(tmp_path / "o")],
        ["cms", "inspect", "--in", str(plain)],
        ["cms", "inspect", "--in", missing],
    ]
    for argv in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 1, argv
        _assert_one_error_line(err)
        _assert_no_secret(err)


def test_key_that_does_not_fit_the_certificate_exits_1(pki, tmp_path, plain, capsys):
    code, _, err = _run(capsys, "cms", "decrypt", "--recip", str(pki.user("bob").cert_path),
                        "--key", str(pki.user("alice").key_path), "--in", str(plain), "--out", str(tmp_path / "o"))
    assert code == 1 and "does not belong" in err
    _assert_one_error_line(err)


def test_signing_only_certificate_cannot_be_a_recipient(pki, tmp_path, plain, capsys):
    code, _, err = _run(capsys, "cms", "encrypt", "--recip", str(pki.user("carol", "ed25519").cert_path),
                        "--in", str(plain), "--out", str(tmp_path / "o"))
    assert code == 1
    _assert_one_error_line(err)


# ---------------------------------------------------------------- usage errors: exit 2

def test_usage_errors_exit_2(pki, tmp_path, plain, capsys):
    bob_crt, bob_key = _paths(pki.user("bob"))
    io = ["--in", str(plain), "--out", str(tmp_path / "o")]
    cases = [
        [],
        ["cms"],
        ["nosuchgroup"],
        ["cms", "nosuch"],
        ["cms", "encrypt", *io],                                         # no recipient
        ["cms", "encrypt", "--recip", bob_crt, "--kek-id", KEK_ID, *io],  # --kek-id without --kek
        ["cms", "encrypt", "--kek", KEK, *io],                           # --kek without --kek-id
        ["cms", "encrypt", "--kek-id", KEK_ID, "--kek", "0102", *io],    # KEK of a bad length
        ["cms", "encrypt", "--kek-id", "xyz", "--kek", KEK, *io],        # not hex
        ["cms", "encrypt", "--recip", bob_crt, "--cipher", "des-ede3-cbc", *io],
        ["cms", "encrypt", "--recip", bob_crt, "--cek-max-decrypts", "3", *io],
        ["cms", "encrypt", "--recip", bob_crt, "--in", str(plain)],      # no --out
        ["cms", "decrypt", "--recip", bob_crt, *io],                     # --recip without --key
        ["cms", "decrypt", "--key", bob_key, *io],
        ["cms", "decrypt", *io],                                         # no key at all
        ["cms", "sign", "--signer", bob_crt, *io],                       # no --key
        ["cms", "verify", *io],                                          # no --ca
        ["cms", "inspect"],
        ["cms", "encrypt", "--recip", bob_crt, "--bogus", *io],
    ]
    for argv in cases:
        code, out, err = _run(capsys, *argv)
        assert code == 2, argv
        assert "usage:" in err, argv
        assert not (tmp_path / "o").exists()


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "cms" in capsys.readouterr().out
    assert main(["cms", "encrypt", "--help"]) == 0
    assert "--kek-id" in capsys.readouterr().out


def test_bad_kek_is_not_echoed(capsys, tmp_path, plain):
    code, _, err = _run(capsys, "cms", "encrypt", "--kek-id", KEK_ID, "--kek", "secretkeyzz",
                        "--in", str(plain), "--out", str(tmp_path / "o"))
    assert code == 2 and "secretkeyzz" not in err


# ---------------------------------------------------------------- sign / verify

def test_sign_verify_encapsulated(pki, tmp_path, plain, capsys):
    alice_crt, alice_key = _paths(pki.user("alice"))
    signed, out = tmp_path / "s.der", tmp_path / "out.txt"
    code, _, err = _run(capsys, "cms", "sign", "--signer", alice_crt, "--key", alice_key,
                        "--in", str(plain), "--out", str(signed))
    assert code == 0, err
    code, stdout, err = _run(capsys, "cms", "verify", "--ca", str(pki.ca.cert_path),
                             "--in", str(signed), "--out", str(out))
    assert code == 0, err
    assert out.read_bytes() == SECRET
    assert stdout.splitlines() == ["sip:alice@example.com"]


@pytest.mark.parametrize("signer", ["ec", "ed25519", "proxy", "rsa-pss"])
def test_sign_verify_key_types_and_identities(pki, tmp_path, plain, capsys, signer):
    extra: list[str] = []
    if signer == "ec":
        cred, expected = pki.user("alice", "ec"), ["sip:alice@example.com"]
    elif signer == "ed25519":
        cred, expected = pki.user("carol", "ed25519"), ["sip:carol@example.com"]
    elif signer == "proxy":
        cred, expected = pki.proxy(PROXY, "ec"), [f"sip:{PROXY}", PROXY]
    else:
        cred, expected, extra = pki.user("bob"), ["sip:bob@example.com"], ["--rsa-pss", "--digest", "sha384"]
    signed, out = tmp_path / "s.der", tmp_path / "out.txt"
    assert main(["cms", "sign", "--signer", str(cred.cert_path), "--key", str(cred.key_path), *extra,
                 "--in", str(plain), "--out", str(signed)]) == 0
    capsys.readouterr()
    code, stdout, err = _run(capsys, "cms", "verify", "--ca", str(pki.ca.cert_path),
                             "--in", str(signed), "--out", str(out))
    assert code == 0, err
    assert stdout.splitlines() == expected
    assert out.read_bytes() == SECRET


def test_detached_signature(pki, tmp_path, plain, capsys):
    alice_crt, alice_key = _paths(pki.user("alice"))
    signed, out = tmp_path / "s.der", tmp_path / "out.txt"
    assert main(["cms", "sign", "--signer", alice_crt, "--key", alice_key, "--detached",
                 "--in", str(plain), "--out", str(signed)]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, "cms", "verify", "--ca", str(pki.ca.cert_path),
                        "--in", str(signed), "--out", str(out))
    assert code == 1
    _assert_one_error_line(err)
    code, stdout, err = _run(capsys, "cms", "verify", "--ca", str(pki.ca.cert_path), "--content", str(plain),
                             "--in", str(signed), "--out", str(out))
    assert code == 0, err
    assert out.read_bytes() == SECRET
    other = tmp_path / "other.txt"
    other.write_bytes(SECRET + b"x")
    code, _, err = _run(capsys, "cms", "verify", "--ca", str(pki.ca.cert_path), "--content", str(other),
                        "--in", str(signed), "--out", str(out))
    assert code == 1
    _assert_one_error_line(err)
    info = json.loads(_run(capsys, "cms", "inspect", "--in", str(signed), "--json")[1])
    assert info["signed_data"]["detached"] is True


def test_verify_failures_exit_1(pki, tmp_path, plain, capsys):
    alice_crt, alice_key = _paths(pki.user("alice"))
    signed = tmp_path / "s.der"
    assert main(["cms", "sign", "--signer", alice_crt, "--key", alice_key,
                 "--in", str(plain), "--out", str(signed)]) == 0
    # Untrusted: the only anchor is an unrelated certificate.
    code, _, err = _run(capsys, "cms", "verify", "--ca", str(pki.user("bob").cert_path),
                        "--in", str(signed), "--out", str(tmp_path / "o"))
    assert code == 1
    _assert_one_error_line(err)
    # Tampered content: flip a byte of the encapsulated SDP.
    data = signed.read_bytes()
    at = data.index(b"TOP-SECRET")
    signed.write_bytes(data[:at] + b"X" + data[at + 1:])
    code, _, err = _run(capsys, "cms", "verify", "--ca", str(pki.ca.cert_path),
                        "--in", str(signed), "--out", str(tmp_path / "o"))
    assert code == 1
    _assert_one_error_line(err)
    _assert_no_secret(err)
    assert not (tmp_path / "o").exists()


def test_sign_failures_exit_1(pki, tmp_path, plain, capsys):
    dana = pki.user("dana", "x25519")  # key agreement only: cannot sign
    code, _, err = _run(capsys, "cms", "sign", "--signer", str(dana.cert_path), "--key", str(dana.key_path),
                        "--in", str(plain), "--out", str(tmp_path / "o"))
    assert code == 1
    _assert_one_error_line(err)
    code, _, err = _run(capsys, "cms", "sign", "--signer", str(pki.user("alice").cert_path),
                        "--key", str(pki.user("bob").key_path), "--in", str(plain), "--out", str(tmp_path / "o"))
    assert code == 1 and "does not belong" in err


def test_no_time_check_accepts_expired_signer(pki, tmp_path, plain, capsys):
    now = datetime.now(timezone.utc)
    expired = write_credential(
        issue_user(pki.ca, "sip:old@example.com", "ec", not_before=now - timedelta(days=30),
                   not_after=now - timedelta(days=1)), tmp_path, "old")
    signed, out = tmp_path / "s.der", tmp_path / "out.txt"
    assert main(["cms", "sign", "--signer", str(expired.cert_path), "--key", str(expired.key_path),
                 "--in", str(plain), "--out", str(signed)]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, "cms", "verify", "--ca", str(pki.ca.cert_path), "--in", str(signed),
                        "--out", str(out))
    assert code == 1 and "expired" in err
    code, stdout, err = _run(capsys, "cms", "verify", "--ca", str(pki.ca.cert_path), "--no-time-check",
                             "--in", str(signed), "--out", str(out))
    assert code == 0, err
    assert stdout.strip() == "sip:old@example.com"


def test_verify_multipart_signed_uses_its_first_part(pki, tmp_path, capsys):
    alice = pki.user("alice", "ec")
    part = b"Content-Type: application/sdp\r\n\r\n" + SECRET
    sig = sign(part, alice.cert, alice.key, detached=True)
    entity = (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
              b'micalg=sha-256; boundary="b1"\r\n\r\n--b1\r\n' + part + b"\r\n--b1\r\n"
              b"Content-Type: application/pkcs7-signature\r\nContent-Transfer-Encoding: base64\r\n\r\n"
              + base64.encodebytes(sig) + b"\r\n--b1--\r\n")
    src, out = tmp_path / "msg.eml", tmp_path / "out.txt"
    src.write_bytes(entity)
    code, stdout, err = _run(capsys, "cms", "verify", "--ca", str(pki.ca.cert_path),
                             "--in", str(src), "--out", str(out))
    assert code == 0, err
    assert out.read_bytes() == part
    code, stdout, _ = _run(capsys, "cms", "inspect", "--in", str(src))
    assert code == 0 and "multipart/signed" in stdout
    _assert_no_secret(stdout)


# ---------------------------------------------------------------- inspect

def test_inspect_envelope_text_and_json_never_show_content(pki, tmp_path, plain, capsys):
    env = tmp_path / "env.der"
    assert main(["cms", "encrypt", "--recip", str(pki.user("bob").cert_path),
                 "--recip", str(pki.proxy(PROXY, "x25519").cert_path), "--kek-id", KEK_ID, "--kek", KEK,
                 "--cek-reference", "abcd", "--in", str(plain), "--out", str(env)]) == 0
    capsys.readouterr()
    code, text, err = _run(capsys, "cms", "inspect", "--in", str(env))
    assert code == 0, err
    for expected in ("content-type: auth-enveloped-data", "content-algorithm: aes-128-gcm",
                     f"ciphertext-bytes: {len(SECRET)}", "kind: ktri", "kind: kari", "kind: kekri",
                     "x25519/ecdh-hkdf-sha256", f"kekid={KEK_ID}", "cek-reference", "abcd"):
        assert expected in text, expected
    _assert_no_secret(text, err)
    assert KEK not in text
    code, js, _ = _run(capsys, "cms", "inspect", "--in", str(env), "--json")
    info = json.loads(js)
    assert info["content_type"] == "auth-enveloped-data" and info["input"] == "der"
    assert len(info["envelope"]["recipients"]) == 3
    _assert_no_secret(js)
    assert KEK not in js


def test_inspect_signed_data(pki, tmp_path, plain, capsys):
    alice_crt, alice_key = _paths(pki.user("alice"))
    signed = tmp_path / "s.der"
    assert main(["cms", "sign", "--signer", alice_crt, "--key", alice_key,
                 "--in", str(plain), "--out", str(signed)]) == 0
    capsys.readouterr()
    code, text, _ = _run(capsys, "cms", "inspect", "--in", str(signed))
    assert code == 0
    for expected in ("content-type: signed-data", "detached: no", "digest-algorithm: sha256",
                     "signature-algorithm: sha256-rsa", "CN=alice@example.com", "sip:alice@example.com",
                     "message-digest", "signing-time", f"content-bytes: {len(SECRET)}"):
        assert expected in text, expected
    _assert_no_secret(text)
    info = json.loads(_run(capsys, "cms", "inspect", "--in", str(signed), "--json")[1])
    signer = info["signed_data"]["signers"][0]
    assert signer["digest_algorithm"] == "sha256"
    assert info["signed_data"]["certificates"][0]["subject"] == "CN=alice@example.com"
    _assert_no_secret(json.dumps(info))


def test_inspect_opens_nested_cms_layers(pki, tmp_path, plain, capsys):
    """Sign-then-encrypt the other way round: a SignedData around an envelope."""
    env = tmp_path / "env.der"
    assert main(["cms", "encrypt", "--recip", str(pki.user("bob").cert_path), "--cipher", "aes-256-cbc",
                 "--in", str(plain), "--out", str(env)]) == 0
    alice = pki.user("alice", "ec")
    outer = tmp_path / "outer.der"
    outer.write_bytes(sign(env.read_bytes(), alice.cert, alice.key, content_type="enveloped-data"))
    capsys.readouterr()
    code, js, _ = _run(capsys, "cms", "inspect", "--in", str(outer), "--json")
    assert code == 0
    info = json.loads(js)
    assert info["signed_data"]["encapsulated_content_type"] == "enveloped-data"
    assert info["signed_data"]["encapsulated"]["envelope"]["content_algorithm"] == "aes-256-cbc"
    _assert_no_secret(js)


# ---------------------------------------------------------------- group registry

def test_registered_group_is_dispatched(capsys):
    seen: list[argparse.Namespace] = []

    def add(commands: argparse._SubParsersAction) -> None:
        p = commands.add_parser("ping")
        p.add_argument("--n", type=int, default=1)
        p.set_defaults(handler=lambda args: seen.append(args) or 0)

    register_group(Group("demo-test", "test group", add))
    try:
        assert main(["demo-test", "ping", "--n", "3"]) == 0
        assert seen and seen[0].n == 3
        assert main(["demo-test"]) == 2
    finally:
        _REGISTRY.pop("demo-test", None)
