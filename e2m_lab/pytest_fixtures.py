"""Fixtures and failure reports shared by every test directory that drives a real
Kamailio (``tests/kamailio``, ``tests/reliability``, ``tests/e2e``).

A conftest imports the fixtures it wants from here.  ``failed(request)`` reads the
``rep_setup`` / ``rep_call`` reports that the root ``tests/conftest.py`` hook keeps on
each test item.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from e2m_plugins.testpki import TestPKI

from .kamailio_harness import ProxyHandle, ProxyStarter, RawUas, describe
from .phones import PhoneProcess, redact, write_ua
from .sipp import SippRunner, redact_sip_text


def failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test's setup or call failed (for reports printed at teardown)."""
    return any(getattr(request.node, f"rep_{when}", None) is not None
               and getattr(request.node, f"rep_{when}").failed for when in ("setup", "call"))


def print_proxy_log(proxy: ProxyHandle, mark: int = 0, lines: int = 80) -> None:
    print(f"\n===== Kamailio log of {proxy.name} (port {proxy.port}), last {lines} lines =====")
    print("\n".join(proxy.log_since(mark).splitlines()[-lines:]))


@contextmanager
def home_and_visited(start_home: Callable[[], ProxyHandle],
                     start_visited: Callable[[ProxyHandle], ProxyHandle]
                     ) -> Iterator[tuple[ProxyHandle, ProxyHandle]]:
    """(home, visited) for a module of phone tests: home first, the visited proxy (which
    needs home's address) after it; both stopped at the end, home also when the
    visited proxy does not start."""
    home = start_home()
    try:
        visited = start_visited(home)
    except BaseException:
        home.stop()
        raise
    try:
        yield home, visited
    finally:
        visited.stop()
        home.stop()


class PhoneGroup:
    """The ``e2m-phone`` processes one test starts; ``env``: extra environment per phone
    name (e.g. its ``E2M_PHONE_PASSWORD``)."""

    def __init__(self, env: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.env = dict(env or {})
        self.running: list[PhoneProcess] = []

    def start(self, name: str, config: Path, env: Mapping[str, str] | None = None,
              register: bool = True) -> PhoneProcess:
        """Start a phone and wait until it started (and registered, unless told not to)."""
        chosen = env if env is not None else self.env.get(name)
        phone = PhoneProcess(config, name, dict(chosen) if chosen is not None else None)
        self.running.append(phone)
        phone.wait("started", timeout=15)
        if register:
            phone.wait("registered", timeout=15)
        return phone


@contextmanager
def phone_group(request: pytest.FixtureRequest, proxies: Sequence[ProxyHandle],
                env: Mapping[str, Mapping[str, str]] | None = None) -> Iterator[PhoneGroup]:
    """A ``PhoneGroup`` whose phones are all stopped at the end; when the test failed,
    each phone's last events (texts redacted) and stderr, and each proxy's log since
    the start, are printed."""
    marks = [(proxy, proxy.log_mark()) for proxy in proxies]
    group = PhoneGroup(env)
    try:
        yield group
    finally:
        for phone in group.running:
            phone.stop()
        if failed(request):
            for phone in group.running:
                print(f"\n===== phone {phone.name} (rc={phone.process.returncode}) events =====")
                for event in phone.events[-40:]:
                    print(redact(event))
                print(f"--- stderr ---\n{phone.stderr()[-2000:]}")
            for proxy, mark in marks:
                print_proxy_log(proxy, mark, lines=60)


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


def answering_phone(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest,
                    **phone: object) -> Iterator[PhoneProcess]:
    """bob's e2m-phone with SRTP and ``phone`` settings (it answers calls itself), for
    a fixture to ``yield from``; its last events and stderr printed when the test
    failed."""
    assert pki.directory is not None
    config = write_ua(tmp_path, "bob", pki.directory, peer="alice", phone={"srtp": True, **phone})
    process = PhoneProcess(config, "bob")
    try:
        process.wait("started", timeout=15)
        yield process
    finally:
        process.stop()
        if failed(request):
            for event in process.events[-40:]:
                print(redact(event))
            print(process.stderr()[-3000:])
