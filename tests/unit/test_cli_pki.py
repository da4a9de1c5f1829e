"""``e2m pki init`` and ``e2m pki issue`` called in-process through ``main([...])``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519

from e2m_plugins.cli import main
from e2m_plugins.certpath import certificate_identities, verify_chain
from e2m_plugins.certfiles import load_certificate, load_private_key
from e2m_plugins.testpki import make_ca, write_credential


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def ec_pki(tmp_path_factory) -> Path:
    """One EC test PKI for the issue tests (EC keys are quick to make)."""
    directory = tmp_path_factory.mktemp("cli-pki")
    assert main(["pki", "init", str(directory), "--key-type", "ec", "--domain", "sip.test",
                 "--user", "alice", "--proxy", "edge.sip.test"]) == 0
    return directory


def test_init_defaults_list_every_file(tmp_path, capsys):
    directory = tmp_path / "pki"
    code, out, err = _run(capsys, "pki", "init", str(directory), "--key-type", "ec")
    assert code == 0, err
    listed = [Path(line) for line in out.splitlines()]
    names = sorted(p.name for p in listed)
    assert names == sorted(["ca.crt", "ca.key", "alice.crt", "alice.key", "bob.crt", "bob.key",
                            "proxy-proxy.example.com.crt", "proxy-proxy.example.com.key"])
    assert all(p.is_file() for p in listed)
    for key in directory.glob("*.key"):
        assert key.stat().st_mode & 0o077 == 0
    ca = load_certificate(directory / "ca.crt")
    alice = load_certificate(directory / "alice.crt")
    assert certificate_identities(alice).uris == ("sip:alice@example.com",)
    assert isinstance(alice.public_key(), ec.EllipticCurvePublicKey)
    verify_chain(alice, [ca])
    proxy = certificate_identities(load_certificate(directory / "proxy-proxy.example.com.crt"))
    assert proxy.dns_names == ("proxy.example.com",)


def test_init_domain_users_and_proxies(tmp_path, capsys):
    directory = tmp_path / "pki"
    # Both list forms: several values after one flag, and the flag repeated.
    code, out, err = _run(capsys, "pki", "init", str(directory), "--domain", "voip.test",
                          "--user", "ann", "ben", "--user", "cy", "--proxy", "p1.voip.test",
                          "--proxy", "p2.voip.test", "--key-type", "x25519")
    assert code == 0, err
    for stem in ("ann", "ben", "cy", "proxy-p1.voip.test", "proxy-p2.voip.test"):
        assert (directory / f"{stem}.crt").is_file(), stem
    ben = load_certificate(directory / "ben.crt")
    assert certificate_identities(ben).uris == ("sip:ben@voip.test",)
    assert isinstance(ben.public_key(), x25519.X25519PublicKey)
    assert not (directory / "alice.crt").exists()


def test_init_default_proxy_follows_domain(tmp_path, capsys):
    code, out, _ = _run(capsys, "pki", "init", str(tmp_path), "--domain", "d.test", "--user", "u",
                        "--key-type", "ec")
    assert code == 0
    assert (tmp_path / "proxy-proxy.d.test.crt").is_file()


def test_init_refuses_to_replace_a_ca(tmp_path, capsys):
    assert main(["pki", "init", str(tmp_path), "--key-type", "ec", "--user", "a"]) == 0
    old = (tmp_path / "ca.crt").read_bytes()
    code, _, err = _run(capsys, "pki", "init", str(tmp_path), "--key-type", "ec", "--user", "a")
    assert code == 1 and err.startswith("e2m: error: ") and len(err.strip().splitlines()) == 1
    assert (tmp_path / "ca.crt").read_bytes() == old
    code, _, _ = _run(capsys, "pki", "init", str(tmp_path), "--key-type", "ec", "--user", "a", "--force")
    assert code == 0 and (tmp_path / "ca.crt").read_bytes() != old


def test_init_usage_errors(tmp_path, capsys):
    for argv in (["pki", "init"], ["pki", "init", str(tmp_path), "--key-type", "dsa"],
                 ["pki", "init", str(tmp_path), "--ca-key-type", "x25519"], ["pki"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2, argv
        assert "usage:" in err


def test_issue_user_reads_domain_from_ca(ec_pki, capsys):
    code, out, err = _run(capsys, "pki", "issue", str(ec_pki), "--user", "carol", "--key-type", "ec",
                          "--days", "7")
    assert code == 0, err
    listed = [Path(line) for line in out.splitlines()]
    assert [p.name for p in listed] == ["carol.crt", "carol.key"]
    cert = load_certificate(listed[0])
    assert certificate_identities(cert).uris == ("sip:carol@sip.test",)
    lifetime = cert.not_valid_after_utc - datetime.now(timezone.utc)
    assert timedelta(days=6) < lifetime <= timedelta(days=7)
    verify_chain(cert, [load_certificate(ec_pki / "ca.crt")])
    assert isinstance(load_private_key(listed[1]), ec.EllipticCurvePrivateKey)


def test_issue_proxy_rsa(ec_pki, capsys):
    code, out, err = _run(capsys, "pki", "issue", str(ec_pki), "--proxy", "core.sip.test")
    assert code == 0, err
    cert = load_certificate(ec_pki / "proxy-core.sip.test.crt")
    ids = certificate_identities(cert)
    assert ids.dns_names == ("core.sip.test",) and ids.uris == ("sip:core.sip.test",)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    verify_chain(cert, [load_certificate(ec_pki / "ca.crt")])


def test_issue_does_not_overwrite(ec_pki, capsys):
    # alice.crt exists from init: a second alice gets alice-<keytype>.
    code, out, err = _run(capsys, "pki", "issue", str(ec_pki), "--user", "alice", "--key-type", "x25519")
    assert code == 0, err
    assert [Path(line).name for line in out.splitlines()] == ["alice-x25519.crt", "alice-x25519.key"]
    before = (ec_pki / "alice-x25519.crt").read_bytes()
    code, _, err = _run(capsys, "pki", "issue", str(ec_pki), "--user", "alice", "--key-type", "x25519")
    assert code == 1 and err.startswith("e2m: error: ")
    assert (ec_pki / "alice-x25519.crt").read_bytes() == before
    code, _, _ = _run(capsys, "pki", "issue", str(ec_pki), "--user", "alice", "--key-type", "x25519", "--force")
    assert code == 0 and (ec_pki / "alice-x25519.crt").read_bytes() != before


def test_issue_full_aor(ec_pki, capsys):
    code, out, err = _run(capsys, "pki", "issue", str(ec_pki), "--user", "sip:dave@other.test",
                          "--key-type", "ed25519")
    assert code == 0, err
    cert = load_certificate(ec_pki / "dave.crt")
    assert certificate_identities(cert).uris == ("sip:dave@other.test",)


def test_issue_failures(tmp_path, ec_pki, capsys):
    # No CA in the directory: an input failure.
    code, _, err = _run(capsys, "pki", "issue", str(tmp_path / "empty"), "--user", "x", "--key-type", "ec")
    assert code == 1 and err.startswith("e2m: error: ")
    # Usage errors.
    for argv in (["pki", "issue", str(ec_pki)],
                 ["pki", "issue", str(ec_pki), "--user", "a", "--proxy", "b"],
                 ["pki", "issue", str(ec_pki), "--user", "a", "--days", "0"],
                 ["pki", "issue", str(ec_pki), "--user", "a", "--days", "soon"],
                 ["pki", "issue", str(ec_pki), "--user", "a", "--key-type", "dsa"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2, argv
        assert "usage:" in err


def test_issue_from_foreign_ca_needs_domain(tmp_path, capsys):
    write_credential(make_ca("Some Other CA", "ec"), tmp_path, "ca")
    code, _, err = _run(capsys, "pki", "issue", str(tmp_path), "--user", "eve", "--key-type", "ec")
    assert code == 2 and "--domain" in err
    code, _, err = _run(capsys, "pki", "issue", str(tmp_path), "--user", "eve", "--key-type", "ec",
                        "--domain", "foreign.test")
    assert code == 0, err
    cert = load_certificate(tmp_path / "eve.crt")
    assert certificate_identities(cert).uris == ("sip:eve@foreign.test",)
    assert cert.issuer == x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes()).subject


def test_pki_then_cms_round_trip(ec_pki, tmp_path, capsys):
    """The files pki makes are what cms encrypt/decrypt take."""
    assert main(["pki", "issue", str(ec_pki), "--user", "fay", "--key-type", "x25519"]) == 0
    plain, env, out = tmp_path / "p", tmp_path / "e", tmp_path / "o"
    plain.write_bytes(b"INVITE body")
    assert main(["cms", "encrypt", "--recip", str(ec_pki / "fay.crt"), "--recip", str(ec_pki / "alice.crt"),
                 "--in", str(plain), "--out", str(env)]) == 0
    assert main(["cms", "decrypt", "--recip", str(ec_pki / "fay.crt"), "--key", str(ec_pki / "fay.key"),
                 "--in", str(env), "--out", str(out)]) == 0
    assert out.read_bytes() == b"INVITE body"
