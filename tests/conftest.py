"""Shared fixtures: one test PKI per session, and the foreign test vectors."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2m_plugins.testpki import TestPKI, init_test_pki

# proxy_factory, sipp and raw_uas: the fixtures of every directory that drives Kamailio;
# needs: the markers kamailio, sipp, pjsua2, tcpdump, openssl skip a test where that is missing
pytest_plugins = ["e2m_lab.pytest_fixtures", "e2m_lab.needs"]

DOMAIN = "example.com"
PROXY_HOST = "proxy.example.com"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    """Keep each phase's report on the item, so fixtures can print more on failure
    (``e2m_lab.pytest_fixtures.failed``)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A CA (EC P-256) and credentials written under a session tmp dir.

    Pre-issued, because RSA key generation is slow and every test shares them:

    - ``pki.user("alice")`` / ``pki.user("bob")``: RSA (the default key type);
    - ``pki.user("alice", "ec")`` / ``pki.user("bob", "ec")``: EC P-256
      ("alice_ec" / "bob_ec");
    - ``pki.user("dana", "x25519")``: X25519, key agreement only ("dana_x");
    - ``pki.user("carol", "ed25519")``: Ed25519 signer;
    - ``pki.proxy("proxy.example.com", kt)`` for kt in rsa, ec, x25519.

    Anything else, e.g. ``pki.user("bob", "x25519")``, is issued on first use
    and cached for the rest of the session.  Files: see ``TestPKI``.
    """
    directory = tmp_path_factory.mktemp("pki")
    result = init_test_pki(directory, domain=DOMAIN, proxy_hosts=(PROXY_HOST,),
                           users=("alice", "bob"), key_type="rsa")
    for name in ("alice", "bob"):
        result.user(name, "ec")
    result.user("dana", "x25519")
    result.user("carol", "ed25519")
    for key_type in ("ec", "x25519"):
        result.proxy(PROXY_HOST, key_type)
    return result


@pytest.fixture
def older_senders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sign as senders before ``e2m-sip-to-tag`` did: no To tag bound, so a re-tagged
    copy of a signed 2xx still reads as a new dialog's (what the fork slots bound)."""
    monkeypatch.setattr("e2m_plugins.body.SIGN_TO_TAG", False)


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The foreign CMS vectors kept in the repository (``tests/vectors``, see its README)."""
    path = Path(__file__).resolve().parent / "vectors"
    assert path.is_dir(), f"test vectors missing: expected them at {path}"
    return path
