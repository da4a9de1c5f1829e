"""PROXY.toml's [auth], [tls] and [limits] (issue 14): defaults, mistakes, what is rendered."""

from __future__ import annotations

import os
import time

import io
import subprocess
from pathlib import Path

import pytest

from e2m_plugins.testpki import TestPKI
from kamailio_app import users
from kamailio_app.config import AppConfigError, load_app_config
from kamailio_app.launcher import (kamailio_command, render_cfg, tls_cfg_text, trusted_list_text,
                                   write_runtime_files)

LISTEN = '[kamailio]\nlisten = ["udp:127.0.0.1:5070", "tcp:127.0.0.1:5070"]\n'


def _load(tmp_path: Path, text: str):
    path = tmp_path / "PROXY.toml"
    path.write_text(text)
    path.chmod(0o600)          # one holding a database password must be (review 73)
    return load_app_config(path)


def _problems(tmp_path: Path, text: str) -> str:
    with pytest.raises(AppConfigError) as caught:
        _load(tmp_path, text)
    return str(caught.value)


def test_defaults_limits_on_auth_and_tls_off(tmp_path):
    config = _load(tmp_path, LISTEN)
    assert config.auth is None and config.tls is None
    limits = config.limits
    assert (limits.pike_requests, limits.pike_window, limits.ban_time) == (30, 2, 300)
    assert (limits.max_contacts, limits.registrations_per_source) == (10, 50)
    assert limits.tcp_idle_timeout == 120 and limits.trusted == ()
    # 256 MB shm, 320 KiB buffer + 2 KiB per connection: half of shm holds 407 of them
    assert limits.tcp_max_connections == 407 == limits.tls_max_connections
    text = render_cfg(config, tmp_path / "run")
    for line in ("server_signature=no", "sip_parser_log=4", "sip_parser_log_oneline=1",
                 "tcp_max_connections=407", "tcp_connection_lifetime=120",
                 'modparam("registrar", "max_contacts", 10)',
                 'modparam("pike", "reqs_density_per_unit", 30)', "#!define WITH_PIKE"):
        assert line in text
    assert "#!define WITH_AUTH" not in text and "#!define WITH_TLS" not in text


def test_auth_defaults_and_mistakes(tmp_path):
    config = _load(tmp_path, LISTEN + 'domains = ["example.com", "example.org"]\n[auth]\n')
    assert config.auth.realm == "example.com" and config.auth.table == "subscriber"
    assert config.auth.users == tmp_path / "users.sqlite"
    assert config.auth.db_url == f"sqlite:///{tmp_path}/users.sqlite"
    assert config.auth.db_module == "db_sqlite" and config.auth.nonce_expire == 300
    own = _load(tmp_path, LISTEN + '[auth]\nrealm = "example.net"\n'
                                   'db_url = "postgres://kamailio:pw@db.example.net/kamailio"\n')
    assert own.auth.users is None and own.auth.db_module == "db_postgres"
    text = _problems(tmp_path, LISTEN + '[auth]\nusers = "u.sqlite"\ndb_url = "mysql://x/y"\n'
                                        'nonce_expire = 0\ntable = "sub scriber"\nrelm = "x"\n')
    for word in ("realm", "not both", "nonce_expire", "table name", "relm"):
        assert word in text
    assert "scheme" in _problems(tmp_path, LISTEN + 'domains = ["example.com"]\n'
                                                    '[auth]\ndb_url = "oracle://x/y"\n')


def test_tls_defaults_from_the_identity_and_mistakes(tmp_path, pki: TestPKI):
    identity = pki.proxy("proxy.example.com", "ec")
    base = ('[kamailio]\nlisten = ["udp:127.0.0.1:5070", "tls:127.0.0.1:5071"]\n'
            f'[identity]\nhost = "proxy.example.com"\ncert = "{identity.cert_path}"\n'
            f'key = "{identity.key_path}"\n[trust]\nca = ["{pki.directory}/ca.crt"]\n')
    config = _load(tmp_path, base)
    assert config.tls.cert == identity.cert_path and config.tls.key == identity.key_path
    assert config.tls.ca == (pki.directory / "ca.crt",) and config.tls.method == "TLSv1.2+"
    assert config.local_names == ("proxy.example.com",)
    text = tls_cfg_text(config.tls, tmp_path / "ca.pem")
    server, client = text.split("[client:default]")
    assert "method = TLSv1.2+" in server and "verify_certificate = no" in server
    assert "verify_certificate = yes" in client and "require_certificate = yes" in client
    assert f"ca_list = {tmp_path / 'ca.pem'}" in client
    # a key-agreement (X25519) identity cannot serve TLS; TLS 1.1 is never accepted
    x = pki.proxy("proxy.example.com", "x25519")
    text = _problems(tmp_path, base.replace(str(identity.cert_path), str(x.cert_path))
                     .replace(str(identity.key_path), str(x.key_path)))
    assert "X25519" in text
    assert "TLS 1.0 and 1.1" in _problems(tmp_path, base + '[tls]\nmin_version = "TLSv1.1"\n')
    plain = _problems(tmp_path, '[kamailio]\nlisten = ["udp:127.0.0.1:5070", '
                                '"tls:127.0.0.1:5071"]\n[e2m]\nenabled = false\n')
    assert "cert and key are needed" in plain and "ca" in plain
    hop = _problems(tmp_path, LISTEN + 'next_hop = "sip:192.0.2.1:5061;transport=tls"\n'
                                       '[e2m]\nenabled = false\n')
    assert "tls: socket" in hop


def test_limits_mistakes_and_a_connection_cap_that_would_take_all_shm(tmp_path):
    text = _problems(tmp_path, LISTEN + 'shm_mb = 64\n[limits]\ntrusted = ["not-an-ip"]\n'
                                        'tcp_max_connections = 5000\npike = 3\n')
    assert "not-an-ip" in text and "tcp_max_connections" in text and "pike" in text
    config = _load(tmp_path, LISTEN + 'shm_mb = 64\ntcp_max_message_kb = 32\n[limits]\n'
                                      'trusted = ["192.0.2.7", "10.0.0.0/8"]\n'
                                      'pike_requests = 0\ntcp_max_connections = 900\n')
    assert config.limits.tcp_max_connections == 900
    assert trusted_list_text(config.limits.trusted).splitlines()[1:] == [
        "1 192.0.2.7 32", "1 10.0.0.0 8"]
    text = render_cfg(config, tmp_path / "run")
    assert "#!define WITH_PIKE" not in text and "#!define WITH_TRUSTED" in text


@pytest.mark.kamailio    # kamailio -c
def test_shared_memory_uses_tlsf_unless_told_otherwise(tmp_path):
    """Debian's qm keeps debugging records on every fragment (bench/README.md: tlsf
    took a third off a relayed call's CPU); qm stays available for hunting a leak."""
    def allocator(text: str) -> str:
        command = kamailio_command(_load(tmp_path, text), tmp_path / "k.cfg", tmp_path)
        return command[command.index("-x") + 1]
    assert allocator(LISTEN) == "tlsf"
    assert allocator(LISTEN + 'shm_allocator = "qm"\n') == "qm"
    assert "shm_allocator" in _problems(tmp_path, LISTEN + 'shm_allocator = "malloc"\n')


def test_a_cfg_with_auth_tls_and_trusted_peers_passes_kamailio_check(tmp_path, pki: TestPKI):
    tls = pki.tls_server("proxy.example.com")
    config = _load(tmp_path, '[kamailio]\nlisten = ["udp:127.0.0.1:5070", "tcp:127.0.0.1:5070", '
                             '"tls:127.0.0.1:5071"]\ndomains = ["example.com"]\n'
                             '[e2m]\nenabled = false\n[auth]\n'
                             f'[tls]\ncert = "{tls.cert_path}"\nkey = "{tls.key_path}"\n'
                             f'ca = ["{pki.directory}/ca.crt"]\nverify_client = true\n'
                             '[limits]\ntrusted = ["192.0.2.0/24"]\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "kamailio.cfg").write_text(render_cfg(config, run))
    write_runtime_files(config, run)
    assert (tmp_path / "users.sqlite").exists()           # created with the schema
    assert "verify_certificate = yes" in (run / "tls.cfg").read_text().split("[client")[0]
    checked = subprocess.run(["/usr/sbin/kamailio", "-c", "-f", str(run / "kamailio.cfg")],
                             capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stderr.decode()[-1500:]


def test_the_password_is_asked_twice_on_a_terminal(monkeypatch):
    answers = iter(["first", "second"])
    monkeypatch.setattr(users.getpass, "getpass", lambda prompt: next(answers))
    with pytest.raises(users.UsersError, match="differ"):
        users.read_password(io.StringIO(), ask=True)
    answers = iter(["same", "same"])
    assert users.read_password(io.StringIO(), ask=True) == "same"
    assert users.read_password(io.StringIO("from a pipe\n"), ask=False) == "from a pipe"


def test_pki_init_and_issue_make_tls_server_certificates(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from e2m_plugins.cli import main as e2m_main
    assert e2m_main(["pki", "init", str(tmp_path / "pki"), "--proxy", "proxy.example.com",
                     "--tls-ip", "127.0.0.1"]) == 0
    assert e2m_main(["pki", "issue", str(tmp_path / "pki"), "--tls", "visited.example.com"]) == 0
    for host, ips in (("proxy.example.com", ["127.0.0.1"]), ("visited.example.com", [])):
        cert = x509.load_pem_x509_certificate(
            (tmp_path / "pki" / f"proxy-{host}-tls.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [host]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ips
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert (tmp_path / "pki" / f"proxy-{host}-tls.key").stat().st_mode & 0o077 == 0


def test_the_digest_nonce_secret_is_one_per_identity_private_and_not_in_the_cfg(tmp_path,
                                                                               pki: TestPKI):
    """Review 67: two nodes holding the proxy's private key derive one nonce secret (a
    nonce node A gave is good at node B), in a 0600 file of the runtime dir that the
    cfg includes; it never appears in the cfg (``--print-cfg``)."""
    from e2m_lab.kamailio_harness import write_proxy_config
    from kamailio_app.config import load_app_config
    from kamailio_app.launcher import AUTH_SECRET_FILE
    secrets_seen = []
    for node in ("a", "b"):
        path = write_proxy_config(tmp_path / node, 5070, pki=pki, e2m=True, auth=True,
                                  users={"alice": "alice-pw"})
        config = load_app_config(path)
        run = tmp_path / node / "run"
        run.mkdir()
        text = render_cfg(config, run)
        write_runtime_files(config, run)
        secret_file = run / AUTH_SECRET_FILE
        assert secret_file.stat().st_mode & 0o777 == 0o600
        line = secret_file.read_text()
        secret = line.split('"')[-2]
        assert len(secret) == 64 and secret not in text
        assert f'import_file "{secret_file}"' in text
        secrets_seen.append(secret)
    assert secrets_seen[0] == secrets_seen[1]


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o711])
def test_a_runtime_dir_others_can_enter_is_refused(tmp_path, pki: TestPKI, capsys, mode):
    """The runtime dir holds the control socket and the RPC FIFO: whoever reaches them
    runs any RPC (``ul.add`` binds alice's AoR to their contact, ``htable.flush`` drops
    every call's keys).  A ``--runtime-dir`` others may enter (systemd's
    RuntimeDirectory is 0755 by default) is refused with the reason, not used."""
    from e2m_lab.kamailio_harness import write_proxy_config
    from kamailio_app.launcher import main
    path = write_proxy_config(tmp_path / "p", 5070, pki=pki, e2m=True)
    run = tmp_path / "shared-run"
    run.mkdir(mode=mode)
    run.chmod(mode)
    assert main(["--config", str(path), "--runtime-dir", str(run), "--print-cfg"]) == 2
    assert "runtime dir" in capsys.readouterr().err and not (run / "kamailio.cfg").exists()
    run.chmod(0o700)                              # the control: owner only is taken
    assert main(["--config", str(path), "--runtime-dir", str(run), "--print-cfg"]) == 0


def test_a_runtime_dir_too_long_for_the_control_socket_is_refused_with_the_reason(
        tmp_path, pki: TestPKI, capsys):
    """Kamailio stops at start with "init_unix_sock: name too long" when the ctl
    socket's path passes 104 octets; the launcher says which dir and why first."""
    from e2m_lab.kamailio_harness import write_proxy_config
    from kamailio_app.launcher import CTL_PATH_MAX, CTL_SOCKET, main
    path = write_proxy_config(tmp_path / "p", 5070, pki=pki, e2m=True)
    base = len(os.fsencode(tmp_path.resolve())) + 1 + len(CTL_SOCKET) + 1
    fits = tmp_path / ("r" * (CTL_PATH_MAX - base))
    long = tmp_path / ("r" * (CTL_PATH_MAX - base + 1))
    assert main(["--config", str(path), "--runtime-dir", str(long), "--print-cfg"]) == 2
    err = capsys.readouterr().err
    assert "too long" in err and str(long) in err and not long.exists()
    assert main(["--config", str(path), "--runtime-dir", str(fits), "--print-cfg"]) == 0


def test_the_rpc_fifo_and_control_socket_are_the_owners_alone(tmp_path, pki: TestPKI):
    """Kamailio makes the jsonrpcs FIFO 0660 unless told: group members could run RPC."""
    from e2m_lab.kamailio_harness import write_proxy_config
    config = load_app_config(write_proxy_config(tmp_path / "p", 5070, pki=pki, e2m=True))
    text = render_cfg(config, tmp_path)
    assert 'modparam("jsonrpcs", "fifo_mode", 0600)' in text
    assert 'modparam("ctl", "mode", 0600)' in text


def test_a_given_runtime_dir_keeps_no_secret_after_the_stop(tmp_path, pki: TestPKI):
    """With ``--runtime-dir`` the dir stays; the nonce secret and the rest go (review 68
    noted the secret left behind)."""
    from e2m_lab.kamailio_harness import write_proxy_config
    from kamailio_app.launcher import AUTH_SECRET_FILE, _cleanup
    config = load_app_config(write_proxy_config(tmp_path / "p", 5070, pki=pki, e2m=True,
                                                auth=True, users={"alice": "alice-pw"}))
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    write_runtime_files(config, run)
    assert (run / AUTH_SECRET_FILE).exists()
    _cleanup(run, created=False)
    assert run.is_dir() and not (run / AUTH_SECRET_FILE).exists()


def test_db_init_owner_url_must_name_the_nodes_database(tmp_path, pki: TestPKI, capsys):
    """``--owner-url`` for another database than ``[cluster] db_url``'s would grant and
    take over there and leave the nodes' own tables theirs: refused before connecting."""
    from e2m_lab.kamailio_harness import write_proxy_config
    from kamailio_app.db_cmd import main as db_main
    path = write_proxy_config(tmp_path / "p", 5070, pki=pki, e2m=True,
                              db_url="postgres://node:pw@127.0.0.1:5999/arch")
    code = db_main(["init", "--config", str(path), "--owner-url",
                    "postgres://owner:x@127.0.0.1:5999/other"])
    err = capsys.readouterr().err
    assert code == 1 and "the same host, port and database" in err and "x@" not in err


@pytest.mark.kamailio
def test_the_owner_password_is_not_handed_to_kamailio(proxy_factory, monkeypatch):
    # An operator who ran `E2M_OWNER_PASSWORD=... e2m-proxy db init` in a shell that
    # exported it, then `e2m-proxy run` there: every Kamailio process (each parses what
    # strangers send) would hold the password of the account that owns the archive's
    # tables, which the nodes' own account is kept from (review 73).
    secret = "owner-secret-" + os.urandom(6).hex()
    monkeypatch.setenv("E2M_OWNER_PASSWORD", secret)
    proxy = proxy_factory("p", e2m=False)
    from kamailio_app.launcher import _group_members
    leader = proxy.launcher._kamailio_pid()
    assert leader is not None
    # Kamailio answers before all of its processes are forked (a CI run under load
    # read 2 of them): wait for the rest before reading their environments
    deadline = time.monotonic() + 15
    members = _group_members(leader)
    while len(members) <= 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        members = _group_members(leader)
    assert len(members) > 2, members
    for pid in members:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"E2M_PROXY_CONFIG=" in environ      # what it is given is readable
        assert secret.encode() not in environ and b"E2M_OWNER_PASSWORD" not in environ, pid
