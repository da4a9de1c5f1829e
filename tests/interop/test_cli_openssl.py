"""The ``e2m`` command against ``openssl cms``, both ways, as real subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.openssl

REPO = Path(__file__).resolve().parents[2]
CONTENT = b"v=0\r\no=bob 2890844527 2890844527 IN IP4 198.51.100.4\r\ns=-\r\nc=IN IP4 198.51.100.4\r\n"
KEK = "000102030405060708090a0b0c0d0e0f"
KEK_ID = "c0ffee02"
PROXY = "proxy.example.com"
CIPHERS = ["aes-128-cbc", "aes-256-cbc", "aes-128-gcm", "aes-256-gcm"]


def _e2m_command() -> list[str]:
    # The console script of this interpreter's environment if installed, else
    # the module; PYTHONPATH below makes either one import this checkout.
    script = Path(sys.executable).with_name("e2m")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "e2m_plugins.cli"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def e2m(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([*_e2m_command(), *args], capture_output=True, env=_env(), timeout=120)
    assert done.returncode == expect, (args, done.returncode, done.stderr.decode(errors="replace"))
    return done


def openssl_run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", "cms", *args], capture_output=True, timeout=60)


def openssl(*args: str) -> bytes:
    done = openssl_run(*args)
    assert done.returncode == 0, (args, done.stderr.decode(errors="replace"))
    return done.stdout


def _openssl_version() -> tuple[int, int]:
    if shutil.which("openssl") is None:
        return (0, 0)
    words = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.split()
    try:
        major, minor = words[1].split(".")[:2]
        return int(major), int(minor)
    except (IndexError, ValueError):
        return (0, 0)


# OpenSSL before 3.2 cannot sign or verify Ed25519 in CMS ("invalid digest").
ED25519_IN_OPENSSL = pytest.mark.skipif(_openssl_version() < (3, 2),
                                        reason="openssl cms handles Ed25519 only from 3.2 on")


@pytest.fixture
def plain(tmp_path) -> Path:
    path = tmp_path / "plain.sdp"
    path.write_bytes(CONTENT)
    return path


# ---------------------------------------------------------------- e2m -> openssl

@pytest.mark.parametrize("cipher", CIPHERS)
def test_e2m_encrypt_opened_by_openssl(pki, tmp_path, plain, openssl_attributes, cipher):
    bob, alice, proxy_ec = pki.user("bob"), pki.user("alice"), pki.proxy(PROXY, "ec")
    env = tmp_path / "env.der"
    e2m("cms", "encrypt", "--cipher", cipher, "--recip", str(bob.cert_path), "--recip", str(proxy_ec.cert_path),
        "--kek-id", KEK_ID, "--kek", KEK, "--in", str(plain), "--out", str(env))
    common = ("-decrypt", "-binary", "-inform", "DER", "-in", str(env))
    for cred in (bob, proxy_ec):
        assert openssl(*common, "-recip", str(cred.cert_path), "-inkey", str(cred.key_path)) == CONTENT
    assert openssl(*common, "-secretkey", KEK, "-secretkeyid", KEK_ID) == CONTENT
    # OAEP as its own envelope: openssl then needs no hint to pick the padding.  The
    # CEKReference lands in unprotectedAttrs (CBC), which every OpenSSL 3.0 reads, or in
    # authAttrs (GCM), which one with issue 26101 rejects: then the known limit holds.
    with_ref, without = tmp_path / "ref.der", tmp_path / "noref.der"
    oaep = ("cms", "encrypt", "--cipher", cipher, "--oaep", "--recip", str(alice.cert_path), "--in", str(plain))
    e2m(*oaep, "--cek-reference", "0a0b", "--out", str(with_ref))
    e2m(*oaep, "--out", str(without))

    def decrypt(path: Path) -> subprocess.CompletedProcess[bytes]:
        return openssl_run("-decrypt", "-binary", "-inform", "DER", "-in", str(path),
                           "-recip", str(alice.cert_path), "-inkey", str(alice.key_path))
    if cipher.endswith("-cbc"):
        done = decrypt(with_ref)
        assert (done.returncode, done.stdout) == (0, CONTENT), done.stderr.decode(errors="replace")
    else:
        openssl_attributes.assert_opens_or_known_limit(decrypt, with_ref, without, CONTENT)


# ---------------------------------------------------------------- openssl -> e2m

@pytest.mark.parametrize("outform", ["DER", "PEM", "SMIME"])
@pytest.mark.parametrize("cipher", ["aes-128-cbc", "aes-256-gcm"])
def test_openssl_encrypt_opened_by_e2m(pki, tmp_path, plain, outform, cipher):
    bob, proxy_ec = pki.user("bob"), pki.proxy(PROXY, "ec")
    env = tmp_path / f"env.{outform.lower()}"
    env.write_bytes(openssl("-encrypt", "-binary", "-outform", outform, f"-{cipher}", "-in", str(plain),
                            "-recip", str(bob.cert_path), "-recip", str(proxy_ec.cert_path)))
    for cred in (bob, proxy_ec):
        out = tmp_path / f"out-{cred.cert_path.stem}"
        e2m("cms", "decrypt", "--recip", str(cred.cert_path), "--key", str(cred.key_path),
            *(["--accept-cbc"] if "cbc" in cipher else []), "--in", str(env), "--out", str(out))
        assert out.read_bytes() == CONTENT


def test_openssl_kek_and_oaep_opened_by_e2m(pki, tmp_path, plain):
    alice = pki.user("alice")
    env = tmp_path / "env.der"
    env.write_bytes(openssl("-encrypt", "-binary", "-outform", "DER", "-aes-128-gcm", "-in", str(plain),
                            "-recip", str(alice.cert_path), "-keyopt", "rsa_padding_mode:oaep",
                            "-secretkey", KEK, "-secretkeyid", KEK_ID))
    out = tmp_path / "out"
    e2m("cms", "decrypt", "--kek-id", KEK_ID, "--kek", KEK, "--in", str(env), "--out", str(out))
    assert out.read_bytes() == CONTENT
    e2m("cms", "decrypt", "--recip", str(alice.cert_path), "--key", str(alice.key_path),
        "--in", str(env), "--out", str(out))
    assert out.read_bytes() == CONTENT
    shown = e2m("cms", "inspect", "--in", str(env)).stdout.decode()
    assert "rsaes-oaep" in shown and f"kekid={KEK_ID}" in shown
    assert b"IN IP4" not in e2m("cms", "inspect", "--in", str(env), "--json").stdout


# ---------------------------------------------------------------- signatures

@pytest.mark.parametrize("who", ["rsa", "ec", pytest.param("ed25519", marks=ED25519_IN_OPENSSL), "proxy"])
def test_e2m_sign_verified_by_openssl(pki, tmp_path, plain, who):
    cred = {"rsa": pki.user("alice"), "ec": pki.user("alice", "ec"),
            "ed25519": pki.user("carol", "ed25519"), "proxy": pki.proxy(PROXY, "ec")}[who]
    signed, detached = tmp_path / "s.der", tmp_path / "d.der"
    e2m("cms", "sign", "--signer", str(cred.cert_path), "--key", str(cred.key_path),
        "--in", str(plain), "--out", str(signed))
    assert openssl("-verify", "-binary", "-inform", "DER", "-in", str(signed),
                   "-CAfile", str(pki.ca.cert_path)) == CONTENT
    e2m("cms", "sign", "--signer", str(cred.cert_path), "--key", str(cred.key_path), "--detached",
        "--in", str(plain), "--out", str(detached))
    assert openssl("-verify", "-binary", "-inform", "DER", "-in", str(detached), "-content", str(plain),
                   "-CAfile", str(pki.ca.cert_path)) == CONTENT


def test_e2m_rsa_pss_verified_by_openssl(pki, tmp_path, plain):
    bob = pki.user("bob")
    signed = tmp_path / "s.der"
    e2m("cms", "sign", "--signer", str(bob.cert_path), "--key", str(bob.key_path), "--rsa-pss",
        "--in", str(plain), "--out", str(signed))
    assert openssl("-verify", "-binary", "-inform", "DER", "-in", str(signed),
                   "-CAfile", str(pki.ca.cert_path)) == CONTENT


@pytest.mark.parametrize("form", ["DER", "PEM", "SMIME-opaque", "SMIME-multipart"])
def test_openssl_sign_verified_by_e2m(pki, tmp_path, plain, form):
    alice = pki.user("alice")
    args = ["-sign", "-binary", "-in", str(plain), "-signer", str(alice.cert_path), "-inkey", str(alice.key_path)]
    if form in ("DER", "PEM"):
        args += ["-nodetach", "-outform", form]
    elif form == "SMIME-opaque":
        args += ["-nodetach", "-outform", "SMIME"]
    else:
        args += ["-outform", "SMIME"]  # detached: multipart/signed
    signed = tmp_path / "signed"
    signed.write_bytes(openssl(*args))
    out = tmp_path / "out"
    done = e2m("cms", "verify", "--ca", str(pki.ca.cert_path), "--in", str(signed), "--out", str(out))
    assert out.read_bytes() == CONTENT
    assert done.stdout.decode().splitlines() == ["sip:alice@example.com"]


def test_openssl_detached_der_verified_by_e2m_with_content(pki, tmp_path, plain):
    proxy = pki.proxy(PROXY, "ec")
    signed = tmp_path / "d.der"
    signed.write_bytes(openssl("-sign", "-binary", "-outform", "DER", "-in", str(plain),
                               "-signer", str(proxy.cert_path), "-inkey", str(proxy.key_path)))
    out = tmp_path / "out"
    done = e2m("cms", "verify", "--ca", str(pki.ca.cert_path), "--content", str(plain),
               "--in", str(signed), "--out", str(out))
    assert out.read_bytes() == CONTENT
    assert done.stdout.decode().splitlines() == [f"sip:{PROXY}", PROXY]
    shown = e2m("cms", "inspect", "--in", str(signed)).stdout.decode()
    assert "detached: yes" in shown and "CN=proxy.example.com" in shown


# ---------------------------------------------------------------- exit codes

def test_exit_codes_as_a_process(pki, tmp_path, plain):
    bob, alice = pki.user("bob"), pki.user("alice")
    env = tmp_path / "env.der"
    env.write_bytes(openssl("-encrypt", "-binary", "-outform", "DER", "-aes-128-gcm", "-in", str(plain),
                            str(bob.cert_path)))
    out = tmp_path / "out"
    wrong = e2m("cms", "decrypt", "--recip", str(alice.cert_path), "--key", str(alice.key_path),
                "--in", str(env), "--out", str(out), expect=1)
    lines = wrong.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("e2m: error: ")
    assert not out.exists() and wrong.stdout == b""
    bad_flag = e2m("cms", "decrypt", "--no-such-flag", "--in", str(env), "--out", str(out), expect=2)
    assert b"usage:" in bad_flag.stderr
    e2m("cms", "encrypt", "--kek-id", KEK_ID, "--in", str(plain), "--out", str(out), expect=2)
    e2m("--help")


def test_module_entry_point_works(tmp_path):
    """``python -m e2m_plugins.cli`` whatever the console script situation."""
    done = subprocess.run([sys.executable, "-m", "e2m_plugins.cli", "pki", "init", str(tmp_path),
                           "--key-type", "ec", "--user", "u"], capture_output=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert str(tmp_path / "u.crt") in done.stdout.decode().splitlines()
