"""An eighty-first attacker's review (December 2026) of 3653837: the phone's TLS toward
its proxy (``[phone] transport = "tls"``), with a real ``e2m-phone`` and Kamailio.

No hole here: every test is a control of what held.

- **Untrusted hop** holding a certificate of the phone's own CA issued for another name
  (``evil.example.org``, no IP SAN: another proxy's or service's certificate), standing
  in for the proxy at the address the phone dials: the phone's REGISTER never leaves
  (pjsip's ``verifyServer`` checks the name as well as the chain; the existing test,
  ``tests/e2e/test_phone_auth_tls.py``, tried another CA only).
- The same with a certificate of the phone's CA naming the address but expired
  (``notAfter`` yesterday): refused alike (``PJSIP_TLS_ECERTVERIF``).
- The control beside it: the same proxy set-up with the certificate naming the
  address registers (digest over TLS).

Kamailio-side holes of this review are in ``tests/kamailio/test_review81_wire.py``.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from e2m_lab.kamailio_harness import start_proxy
from e2m_lab.phones import run_phone, write_ua
from e2m_plugins.testpki import TestPKI, init_test_pki, issue_tls_server, tls_stem

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2]

PASSWORD = "al-" + secrets.token_urlsafe(12)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("r81-pki"), users=("alice", "bob"),
                         key_type="ec")


def _ua(directory: Path, pki: TestPKI, proxy) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    secret = directory / "password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    assert pki.directory is not None
    return write_ua(directory, "alice", pki.directory, peer="bob",
                    phone={"registrar": proxy.tls_uri, "proxy": proxy.tls_uri,
                           "register_via_proxy": False, "transport": "tls",
                           "password_file": "password"},
                    e2m={"cert_url_hosts": ["127.0.0.1"]})


def test_control_the_phone_registers_over_tls_to_a_certificate_naming_the_address(
        tmp_path, pki):
    proxy = start_proxy(tmp_path / "home", pki=pki, e2m=True, auth=True,
                        users={"alice": PASSWORD}, tls=True)
    try:
        result = run_phone(_ua(tmp_path / "alice", pki, proxy), "register", timeout=30)
        assert result.rc == 0, result.stderr[-800:]
        assert result.of("registered")
    finally:
        proxy.stop()


def test_control_a_certificate_of_our_ca_for_another_name_is_refused(tmp_path, pki):
    pki.tls_server("evil.example.org", ips=())          # same CA, no name for 127.0.0.1
    proxy = start_proxy(tmp_path / "evil", pki=pki, e2m=False, auth=True,
                        users={"alice": PASSWORD}, tls={"host": "evil.example.org"})
    mark = proxy.log_mark()
    try:
        result = run_phone(_ua(tmp_path / "alice", pki, proxy), "register", timeout=40)
        assert result.rc == 1
        assert not result.of("registered")
        (failure,) = result.of("register_failed")
        assert failure["code"] in (502, 503), failure
        assert "certificate" in failure["reason"].lower(), failure   # ECERTVERIF
        assert "REGISTER" not in proxy.log_since(mark)
    finally:
        proxy.stop()


def test_control_an_expired_certificate_of_our_ca_naming_the_address_is_refused(tmp_path, pki):
    host = "expired.example.org"
    now = datetime.now(timezone.utc)
    cred = issue_tls_server(pki.ca, host, "ec", ips=("127.0.0.1",),
                            not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    pki.tls_servers[host] = pki._store(cred, tls_stem(host))
    proxy = start_proxy(tmp_path / "expired", pki=pki, e2m=False, auth=True,
                        users={"alice": PASSWORD}, tls={"host": host})
    mark = proxy.log_mark()
    try:
        result = run_phone(_ua(tmp_path / "alice", pki, proxy), "register", timeout=40)
        assert result.rc == 1
        assert not result.of("registered")
        (failure,) = result.of("register_failed")
        assert "certificate" in failure["reason"].lower(), failure
        assert "REGISTER" not in proxy.log_since(mark)
    finally:
        proxy.stop()
