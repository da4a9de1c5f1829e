"""Fixtures and failure reports shared by every test directory that drives a real
Kamailio (``tests/kamailio``, ``tests/reliability``, ``tests/e2e``).

A conftest imports the fixtures it wants from here.  ``failed(request)`` reads the
``rep_setup`` / ``rep_call`` reports that the root ``tests/conftest.py`` hook keeps on
each test item.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2m_plugins.testpki import TestPKI

from .kamailio_harness import ProxyHandle, ProxyStarter, RawUas, describe
from .sipp import SippRunner, redact_sip_text


def failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test's setup or call failed (for reports printed at teardown)."""
    return any(getattr(request.node, f"rep_{when}", None) is not None
               and getattr(request.node, f"rep_{when}").failed for when in ("setup", "call"))


def print_proxy_log(proxy: ProxyHandle, mark: int = 0, lines: int = 80) -> None:
    print(f"\n===== Kamailio log of {proxy.name} (port {proxy.port}), last {lines} lines =====")
    print("\n".join(proxy.log_since(mark).splitlines()[-lines:]))


@pytest.fixture
def proxy_factory(pki: TestPKI, tmp_path: Path,
                  request: pytest.FixtureRequest) -> Iterator[Callable[..., ProxyHandle]]:
    """``proxy_factory(name, **settings) -> ProxyHandle``: ``start_proxy`` with the
    session ``pki``; every proxy is stopped at teardown, its log printed on failure."""
    starter = ProxyStarter(pki, tmp_path)
    yield starter
    stopped = starter.stop_all()
    if failed(request):
        for handle in stopped:
            print_proxy_log(handle)


@pytest.fixture
def sipp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SippRunner]:
    """A ``SippRunner`` in the test's tmp dir; its traces (bodies redacted) on failure."""
    runner = SippRunner(tmp_path)
    yield runner
    runner.close()
    if failed(request):
        for name, result in runner.results:
            print(f"\n===== SIPp {name}: rc={result.rc} =====")
            print(redact_sip_text(result.messages)[-6000:])
            if result.errors.strip():
                print("--- errors ---\n" + result.errors[-2000:])
            if result.log.strip():
                print("--- scenario log ---\n" + result.log[-2000:])


@pytest.fixture
def raw_uas(request: pytest.FixtureRequest) -> Iterator[RawUas]:
    """A ``RawUas`` (200 to everything unless told otherwise); what it got on failure."""
    uas = RawUas()
    yield uas
    uas.close()
    if failed(request):
        print(f"\n===== raw UAS on {uas.port}: {len(uas.received)} requests =====")
        for message in uas.received:
            print(describe(message))
