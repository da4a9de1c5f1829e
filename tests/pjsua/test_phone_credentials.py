"""``[phone] password_file`` / ``auth_user`` / ``transport = "tls"`` as the phone reads
them (``pjsua_hooks.credentials`` and ``phone.load_phone_config``): what is refused and
that no message ever quotes the password."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from e2m_lab.phones import write_ua
from e2m_plugins.config import ConfigError
from e2m_plugins.testpki import TestPKI, init_test_pki
from pjsua_hooks.credentials import PASSWORD_ENV, PasswordError, read_password, tls_uri
from pjsua_hooks.phone import E2MPhone, PhoneError, load_phone_config

pytestmark = [pytest.mark.pjsua2]

SECRET = "pw-" + secrets.token_urlsafe(10)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("cred-pki"), users=("alice", "bob"),
                         key_type="ec")


def config(tmp_path: Path, pki: TestPKI, **phone: object) -> Path:
    assert pki.directory is not None
    settings = {"registrar": "sip:127.0.0.1:5999", **phone}
    return write_ua(tmp_path, "alice", pki.directory, peer=None, phone=settings)


def secret_file(tmp_path: Path, text: str = SECRET + "\n", mode: int = 0o600,
                name: str = "pw") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_password_file_relative_to_the_ua_toml(tmp_path, pki):
    secret_file(tmp_path)
    _, settings = load_phone_config(config(tmp_path, pki, password_file="pw"))
    assert settings.password_file == str(tmp_path / "pw")
    assert read_password(settings.password_file, {}) == SECRET
    assert SECRET not in repr(settings)


def test_the_file_wins_over_the_environment(tmp_path):
    path = secret_file(tmp_path)
    assert read_password(str(path), {PASSWORD_ENV: "other"}) == SECRET
    assert read_password(None, {PASSWORD_ENV: "from-env"}) == "from-env"
    assert read_password(None, {}) is None
    assert read_password(None, {PASSWORD_ENV: ""}) is None


def test_password_in_the_toml_is_refused_without_quoting_it(tmp_path, pki):
    path = config(tmp_path, pki)
    path.write_text(path.read_text() + f'password = "{SECRET}"\n')
    with pytest.raises(ConfigError) as err:
        load_phone_config(path)
    assert "password_file" in str(err.value) and PASSWORD_ENV in str(err.value)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o666], ids=["640", "604", "666"])
def test_a_file_others_may_read_or_write_is_refused(tmp_path, pki, mode):
    secret_file(tmp_path, mode=mode)
    with pytest.raises(ConfigError) as err:
        load_phone_config(config(tmp_path, pki, password_file="pw"))
    assert "chmod 600" in str(err.value) and SECRET not in str(err.value)


@pytest.mark.parametrize("text, why", [("", "empty"), ("\n", "empty"),
                                       (SECRET + "\nsecond line\n", "one line"),
                                       (SECRET + "\x00", "one line"),
                                       ("x" * 300, "more than")],
                         ids=["empty", "newline", "two-lines", "nul", "long"])
def test_unusable_password_files(tmp_path, text, why):
    path = secret_file(tmp_path, text)
    with pytest.raises(PasswordError) as err:
        read_password(str(path), {})
    assert why in str(err.value) and SECRET not in str(err.value)


def test_a_symlink_or_missing_file_is_refused(tmp_path, pki):
    target = secret_file(tmp_path)
    (tmp_path / "link").symlink_to(target)
    for name in ("link", "missing"):
        with pytest.raises(ConfigError):
            load_phone_config(config(tmp_path, pki, password_file=name))


def test_the_file_changing_after_load_stops_the_start(tmp_path, pki):
    """Read again at start: a file made readable by others meanwhile stops the phone
    before pjsua starts (PhoneError, no endpoint)."""
    path = secret_file(tmp_path)
    phone = E2MPhone(*load_phone_config(config(tmp_path, pki, password_file="pw")))
    path.chmod(0o644)
    with pytest.raises(PhoneError) as err:
        phone.start()
    assert phone.endpoint is None and SECRET not in str(err.value)
    phone.close()


def test_auth_user_must_be_a_user_name(tmp_path, pki):
    _, settings = load_phone_config(config(tmp_path, pki, auth_user="alice.1"))
    assert settings.auth_user == "alice.1"
    for bad in ("", "a b", 'x"y', "a@b", "x" * 65):
        with pytest.raises(ConfigError):
            load_phone_config(config(tmp_path, pki, auth_user=bad))


def test_tls_needs_tls_uris(tmp_path, pki):
    with pytest.raises(ConfigError) as err:
        load_phone_config(config(tmp_path, pki, transport="tls"))
    assert "transport=tls" in str(err.value)
    _, settings = load_phone_config(config(
        tmp_path, pki, transport="tls", registrar="sip:127.0.0.1:5061;transport=tls",
        proxy="sips:127.0.0.1:5061"))
    assert settings.transport == "tls"
    assert tls_uri("sip:h;transport=TLS") and tls_uri("sips:h") and not tls_uri("sip:h")
    assert not tls_uri("sip:h;transport=tcp")
