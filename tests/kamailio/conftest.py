"""Fixtures for tests against a real Kamailio (started with ``e2m-proxy``) and real SIPp.

Everything runs on 127.0.0.1 on free ports (never 5060); every process a test starts
is stopped in teardown, also when the test fails.  When a test fails, the report
shows the SIP exchange (SIPp traces and the raw UAS's log, bodies replaced by their
length and sha256) and the Kamailio log lines written during the test.

Fixture API (for flow tests written elsewhere; import helpers from this module
with ``from kamailio_harness import ...`` or use the fixtures):

``proxy_factory(name, *, e2m=True, next_hop=None, view=..., verify=..., archive=True,
                fail_request_on_error=False, workers=2, extra=None) -> ProxyHandle``
    Writes ``<tmp>/<name>/PROXY.toml`` and starts ``e2m-proxy`` on a free port (UDP and
    TCP share the number); returns once the proxy answers OPTIONS.  Stopped at teardown.
    ``e2m=True`` needs the session ``pki`` fixture's proxy credential for
    ``proxy.example.com`` (RSA).  ``extra`` is a dict of TOML sections merged in, e.g.
    ``{"policy": {"verify": ["MESSAGE:*"]}}``.

``home_proxy`` / ``visited_proxy`` (module scope)
    The trusted E2M proxy (view MESSAGE:text/plain and INVITE:application/sdp, SQLite
    archive) and an untrusted plain routing hop whose next_hop is the home proxy.

``ProxyHandle``: ``.port``, ``.uri`` (sip:127.0.0.1:port), ``.cert_url``,
    ``.archive_path``, ``.log_path``, ``.log_since(mark)``, ``.log_mark()``,
    ``.options()`` (raw OPTIONS, returns the response), ``.stop()``.

``sipp`` (function scope): ``SippRunner``
    ``.uac(scenario, target_port, keys={...}, headers=[(n, v)], expect=200) -> SippResult``
    runs to completion; ``.uas(scenario, keys=...) -> SippUas`` runs in the background on
    ``.port`` until ``.wait()``.  Scenarios are files of tests/sipp; a ``*.tmpl.xml``
    gets ``@@HEADERS@@`` and ``@@EXPECT@@`` filled in.  ``SippResult.rc``,
    ``.logged(name)`` (values the scenario logged as ``name=value``), ``.messages``
    (the SIPp message trace).

``raw_uas`` (function scope): ``RawUas``, a binary-safe UDP peer on ``.port`` that
    answers every request with 200 (or what ``.responder`` returns) and keeps the exact
    bytes in ``.received`` (list of ``e2m_plugins.sip.SipMessage``).

``register(proxy, user, contact_port, sipp)``: REGISTER through SIPp, returns the
    SippResult (its ``logged("Proxy-Body-Policy")`` is the policy header of the 200).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2m_plugins.pki import TestPKI
from kamailio_harness import (ProxyHandle, ProxyStarter, RawUas, SippRunner, describe,
                              redact_sip_text, start_proxy)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    for when in ("setup", "call"):
        report = getattr(request.node, f"rep_{when}", None)
        if report is not None and report.failed:
            return True
    return False


_RUNNING: list[ProxyHandle] = []


@pytest.fixture(autouse=True)
def _failure_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """On failure, print what the module-scoped proxies logged during the test."""
    marks = [(proxy, proxy.log_mark()) for proxy in list(_RUNNING)]
    yield
    if not _failed(request):
        return
    for proxy, mark in marks:
        _print_log(proxy, mark)


def _print_log(proxy: ProxyHandle, mark: int = 0) -> None:
    text = proxy.log_since(mark)
    print(f"\n===== Kamailio log of {proxy.name} (port {proxy.port}) during the test =====")
    print("\n".join(text.splitlines()[-80:]))


@pytest.fixture
def proxy_factory(pki: TestPKI, tmp_path: Path,
                  request: pytest.FixtureRequest) -> Iterator[Callable[..., ProxyHandle]]:
    starter = ProxyStarter(pki, tmp_path)
    yield starter
    stopped = starter.stop_all()
    if _failed(request):   # these proxies are gone before _failure_report runs
        for handle in stopped:
            _print_log(handle)


@pytest.fixture(scope="module")
def home_proxy(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """The trusted E2M proxy (archive on, views MESSAGE text and INVITE SDP)."""
    handle = start_proxy(tmp_path_factory.mktemp("home"), pki=pki, e2m=True)
    _RUNNING.append(handle)
    yield handle
    handle.stop()
    _RUNNING.remove(handle)


@pytest.fixture(scope="module")
def visited_proxy(home_proxy: ProxyHandle,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """An untrusted plain routing hop in front of the home proxy."""
    handle = start_proxy(tmp_path_factory.mktemp("visited"), pki=None, e2m=False,
                         next_hop=home_proxy.uri)
    _RUNNING.append(handle)
    yield handle
    handle.stop()
    _RUNNING.remove(handle)


@pytest.fixture
def sipp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SippRunner]:
    runner = SippRunner(tmp_path)
    yield runner
    runner.close()
    if _failed(request):
        for name, result in runner.results:
            print(f"\n===== SIPp {name}: rc={result.rc} =====")
            print(redact_sip_text(result.messages)[-6000:])
            if result.errors.strip():
                print("--- errors ---\n" + result.errors[-2000:])
            if result.log.strip():
                print("--- scenario log ---\n" + result.log[-2000:])


@pytest.fixture
def raw_uas(request: pytest.FixtureRequest) -> Iterator[RawUas]:
    uas = RawUas()
    yield uas
    uas.close()
    if _failed(request):
        print(f"\n===== raw UAS on {uas.port}: {len(uas.received)} requests =====")
        for message in uas.received:
            print(describe(message))


