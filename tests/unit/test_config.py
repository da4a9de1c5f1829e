"""UA.toml and PROXY.toml: loading, relative paths, one message per mistake."""

from __future__ import annotations

import shutil

import pytest

from e2m_plugins.config import ConfigError, load_proxy_config, load_ua_config

PROXY = "proxy.example.com"


@pytest.fixture
def confdir(pki, tmp_path):
    """The session PKI's files copied next to the configs, so paths are relative."""
    for name in ("ca.crt", "alice.crt", "alice.key", "bob.crt",
                 f"proxy-{PROXY}.crt", f"proxy-{PROXY}.key"):
        shutil.copy(pki.directory / name, tmp_path / name)
    return tmp_path


UA = """
[identity]
aor = "sip:alice@example.com"
cert = "alice.crt"
key = "alice.key"

[trust]
ca = ["ca.crt"]

[peers]
"sip:bob@example.com" = "bob.crt"

[[proxies]]
host = "proxy.example.com"
cert = "proxy-proxy.example.com.crt"
view = ["MESSAGE:*", "INVITE:application/sdp"]

[e2m]
sign = true
accept_proxies = [".example.com"]
"""

PROXY_TOML = """
[identity]
host = "proxy.example.com"
cert = "proxy-proxy.example.com.crt"
key = "proxy-proxy.example.com.key"

[trust]
ca = ["ca.crt"]

[policy]
view = ["MESSAGE:*", "INVITE:application/sdp"]
verify = []
cert_url = "http://127.0.0.1:5070/e2m/cert.der"

[kamailio]
listen = ["udp:127.0.0.1:5070"]
"""


def test_ua_config_loads_with_relative_paths(confdir):
    (confdir / "UA.toml").write_text(UA)
    config = load_ua_config(confdir / "UA.toml")
    assert config.aor == "sip:alice@example.com"
    assert list(config.peers) == ["sip:bob@example.com"]
    (proxy,) = config.proxies
    assert proxy.host == PROXY and [r.format() for r in proxy.view] == ["MESSAGE:*",
                                                                       "INVITE:application/sdp"]
    assert config.sign and config.require_e2m and config.accept_proxies == (".example.com",)
    assert "alice.key" not in repr(config) and "PRIVATE" not in repr(config)


def test_proxy_config_loads_and_keeps_adapter_sections(confdir):
    (confdir / "PROXY.toml").write_text(PROXY_TOML)
    config = load_proxy_config(confdir / "PROXY.toml")
    assert config.host == PROXY and config.cert_url.endswith("/e2m/cert.der")
    assert config.raw["kamailio"]["listen"] == ["udp:127.0.0.1:5070"]


def test_every_mistake_is_reported_once(confdir):
    bad = UA.replace('aor = "sip:alice@example.com"', 'aor = "alice"') \
            .replace('"bob.crt"', '"nobody.crt"') \
            .replace('view = ["MESSAGE:*"', 'view = ["MESSAGE"') \
            .replace("sign = true", 'sign = "yes"\ncolour = 1')
    (confdir / "UA.toml").write_text(bad)
    with pytest.raises(ConfigError) as caught:
        load_ua_config(confdir / "UA.toml")
    problems = caught.value.problems
    assert any("not a SIP URI" in p for p in problems)
    assert any("nobody.crt" in p and "not found" in p for p in problems)
    assert any("'MESSAGE'" in p for p in problems)
    assert any("[e2m].sign must be bool" in p for p in problems)
    assert any("unknown key 'colour'" in p for p in problems)
    assert len(problems) == 5, problems


def test_proxy_certificate_must_name_the_proxy_host(confdir):
    (confdir / "PROXY.toml").write_text(PROXY_TOML.replace('host = "proxy.example.com"',
                                                           'host = "other.example.com"'))
    with pytest.raises(ConfigError, match="not for other.example.com"):
        load_proxy_config(confdir / "PROXY.toml")


def test_a_users_certificate_must_be_for_its_aor(confdir):
    (confdir / "UA.toml").write_text(UA.replace('cert = "alice.crt"', 'cert = "bob.crt"'))
    with pytest.raises(ConfigError, match="not for sip:alice@example.com"):
        load_ua_config(confdir / "UA.toml")


def test_broken_toml_is_one_clear_error(tmp_path):
    (tmp_path / "x.toml").write_text("[identity\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_proxy_config(tmp_path / "x.toml")
