"""Fixtures for the end-to-end tests: two real Kamailio proxies (started with
``e2m-proxy`` through the Kamailio tests' harness), phones as ``e2m-phone`` child
processes, a loopback capture.  Everything is stopped in teardown, also on failure;
a failing test's report shows each phone's events (message text redacted, bodies
never) and the tail of both Kamailio logs.

``e2e_pki``: a test PKI with P-256 keys for alice, bob and proxy.example.com.  EC, not
RSA: pjsip reads at most 4000 bytes per message, and a split SRTP INVITE with RSA-2048
recipients plus the two proxies' headers is larger than that.
``proxies``: (home, visited): home trusted (E2M, archive, views MESSAGE text and
INVITE SDP), visited untrusted (``[e2m] enabled = false``, next hop home).
``phones``: ``phones.start(name, config) -> PhoneProcess``; all stopped at teardown.
``ua_config(name, peer=..., via_visited=..., e2m={...}, phone={...})``: a UA.toml.
``capture``: ``capture.start(bpf) -> Capture`` (skips when tcpdump cannot capture).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent

from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_lab.pytest_fixtures import PhoneGroup, home_and_visited, phone_group
from e2m_lab.phones import write_ua
from e2m_lab.capture import Capture, tcpdump_command

from e2m_plugins.testpki import TestPKI, init_test_pki  # noqa: E402


@pytest.fixture(scope="module")
def e2e_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("e2e-pki"), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture(scope="module")
def proxies(e2e_pki: TestPKI,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyHandle, ProxyHandle]]:
    with home_and_visited(
            lambda: start_proxy(tmp_path_factory.mktemp("home"), pki=e2e_pki, e2m=True),
            lambda home: start_proxy(tmp_path_factory.mktemp("visited"), pki=None, e2m=False,
                                     next_hop=home.uri)) as both:
        yield both


@pytest.fixture
def phones(request: pytest.FixtureRequest,
           proxies: tuple[ProxyHandle, ProxyHandle]) -> Iterator[PhoneGroup]:
    with phone_group(request, proxies) as group:
        yield group


@pytest.fixture
def ua_config(tmp_path: Path, e2e_pki: TestPKI,
              proxies: tuple[ProxyHandle, ProxyHandle]) -> Callable[..., Path]:
    home, visited = proxies

    def make(name: str, *, peer: str | None = None, via_visited: bool = False,
             e2m: dict[str, Any] | None = None, phone: dict[str, Any] | None = None,
             registrar: bool = True) -> Path:
        settings: dict[str, Any] = {"proxy": visited.uri if via_visited else home.uri,
                                    "register_via_proxy": False, "srtp": True}
        if registrar:
            settings["registrar"] = home.uri
        settings.update(phone or {})
        assert e2e_pki.directory is not None
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        # the proxies serve their certificates on loopback, not on their host names
        e2m = {"cert_url_hosts": ["127.0.0.1"], **(e2m or {})}
        return write_ua(directory, name, e2e_pki.directory, peer=peer, phone=settings, e2m=e2m)

    return make


class Captures:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: list[Capture] = []

    def start(self, bpf: str) -> Capture:
        if tcpdump_command() is None:
            pytest.skip("tcpdump is missing or cannot capture here (not root, no sudo -n, "
                        "no cap_net_raw)")
        cap = Capture(self.directory / f"capture-{len(self.running)}.pcap", bpf)
        self.running.append(cap)
        return cap


@pytest.fixture
def capture(tmp_path: Path) -> Iterator[Captures]:
    group = Captures(tmp_path)
    try:
        yield group
    finally:
        for cap in group.running:
            cap.stop()
