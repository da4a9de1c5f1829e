"""Fixtures for the reliability tests: real Kamailio (``e2m-proxy``), SIPp, raw UDP/TCP
peers, and (for the log test) ``e2m-phone`` processes.

Everything listens on 127.0.0.1 on free ports and is stopped in teardown, also when a
test fails; a failing test's report shows the exchange (start lines, headers, body
length and digest, never a body) and the tail of each Kamailio log it started.

``rproxy(name, **settings) -> ProxyHandle``: ``kamailio_harness.start_proxy`` with the
session ``pki`` (E2M on unless ``e2m=False``); stopped at teardown.
``sipp``: a ``kamailio_harness.SippRunner`` in the test's tmp dir.
``exchange``: a list the test appends lines to (what was sent and answered); printed
on failure.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for _p in (HERE.parent / "kamailio", HERE.parent / "e2e", HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from kamailio_harness import ProxyHandle, ProxyStarter, SippRunner, redact_sip_text  # noqa: E402

from e2m_plugins.pki import TestPKI  # noqa: E402


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(request.node, f"rep_{w}", None) is not None
               and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))


def print_log(proxy: ProxyHandle, lines: int = 80) -> None:
    print(f"\n===== Kamailio log of {proxy.name} (port {proxy.port}), last {lines} lines =====")
    print("\n".join(proxy.log_since(0).splitlines()[-lines:]))


@pytest.fixture
def exchange(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    lines: list[str] = []
    yield lines
    if failed(request) and lines:
        print(f"\n===== exchange ({len(lines)} lines, last 150) =====")
        print("\n".join(lines[-150:]))


@pytest.fixture
def rproxy(pki: TestPKI, tmp_path: Path,
           request: pytest.FixtureRequest) -> Iterator[Callable[..., ProxyHandle]]:
    starter = ProxyStarter(pki, tmp_path)
    yield starter
    stopped = starter.stop_all()
    if failed(request):
        for handle in stopped:
            print_log(handle)


@pytest.fixture
def sipp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SippRunner]:
    runner = SippRunner(tmp_path)
    yield runner
    runner.close()
    if failed(request):
        for name, result in runner.results:
            print(f"\n===== SIPp {name}: rc={result.rc} =====")
            print(redact_sip_text(result.messages)[-4000:])
            if result.errors.strip():
                print("--- errors ---\n" + result.errors[-1500:])
