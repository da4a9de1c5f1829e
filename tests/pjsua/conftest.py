"""pjsua2 tests run in child pytest processes; their outcomes are reported here.

An assertion inside pjsip aborts the whole process, so these tests must not
share one with the rest of the suite.  When pytest (the parent) reaches the
first selected test of a module in this directory, it runs that module's
selected tests in a fresh ``python -m pytest`` (the child, marked by
``E2M_PJSUA_CHILD=1``), which writes each test report as a JSON line.  The
parent then replays those reports as if the tests had run in-process, so
``pytest tests`` and ``pytest tests/pjsua -k ...`` show every test's outcome.
If the child dies (abort, segfault, timeout), the tests it did not report
fail with the exit status and the tail of its output.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _pytest.reports import TestReport

CHILD_ENV = "E2M_PJSUA_CHILD"
REPORTS_ENV = "E2M_PJSUA_REPORTS"
CHILD_TIMEOUT = float(os.environ.get("E2M_PJSUA_TIMEOUT", "240"))
HERE = Path(__file__).resolve().parent
IN_CHILD = os.environ.get(CHILD_ENV) == "1"


# -- parent side ----------------------------------------------------------------

def _ours(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def _run_child(config: pytest.Config, items: list[pytest.Item]) -> dict[str, list[TestReport]]:
    """Run ``items`` (one module) in a child pytest; reports by node id."""
    with tempfile.TemporaryDirectory(prefix="e2m-pjsua-") as tmp:
        reports_path = Path(tmp) / "reports.jsonl"
        output_path = Path(tmp) / "output.txt"
        env = dict(os.environ, **{CHILD_ENV: "1", REPORTS_ENV: str(reports_path)})
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
               "--rootdir", str(config.rootpath), *[i.nodeid for i in items]]
        status: str
        with open(output_path, "wb") as out:
            # Own session: on timeout the whole child group is killed, nothing else.
            proc = subprocess.Popen(cmd, cwd=str(config.rootpath), env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=CHILD_TIMEOUT)
                status = f"exit status {rc}" if rc >= 0 else \
                    f"killed by {signal.Signals(-rc).name}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = f"timed out after {CHILD_TIMEOUT:.0f}s and was killed"
        results: dict[str, list[TestReport]] = {}
        if reports_path.exists():
            for line in reports_path.read_text().splitlines():
                data = json.loads(line)
                if isinstance(data.get("longrepr"), list):
                    data["longrepr"] = tuple(data["longrepr"])   # a skip's (path, line, why)
                rep = config.hook.pytest_report_from_serializable(config=config, data=data)
                results.setdefault(rep.nodeid, []).append(rep)
        tail = output_path.read_text(errors="replace").splitlines()[-60:]
    for item in items:
        reps = results.get(item.nodeid, [])
        if not any(r.when == "teardown" for r in reps):
            reps = [r for r in reps if r.when != "call"] + [TestReport(
                item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed",
                f"the pjsua2 child process ended ({status}) before this test finished; "
                "last output:\n" + "\n".join(tail), "call", [], 0.0)]
            results[item.nodeid] = reps
    return results


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if IN_CHILD or not _ours(item):
        return None
    cache: dict[str, list[TestReport]] = item.config.stash.setdefault(_RESULTS, {})
    if item.nodeid not in cache:
        module = [i for i in item.session.items if i.path == item.path and _ours(i)]
        cache.update(_run_child(item.config, module))
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for rep in cache.pop(item.nodeid, []):
        item.ihook.pytest_runtest_logreport(report=rep)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


_RESULTS = pytest.StashKey[dict]()


# -- child side -------------------------------------------------------------------

_CONFIG: list[pytest.Config] = []


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG.append(config)


def pytest_runtest_logreport(report: TestReport) -> None:
    path = os.environ.get(REPORTS_ENV)
    if not IN_CHILD or not path or not _CONFIG:
        return
    data = _CONFIG[-1].hook.pytest_report_to_serializable(config=_CONFIG[-1], report=report)
    with open(path, "a") as fh:   # one line per report, flushed: survives a later abort
        fh.write(json.dumps(data) + "\n")


# -- fixtures (used in the child) -----------------------------------------------------

@pytest.fixture
def make_endpoint() -> Iterator[Callable[..., object]]:
    """Start a SipEndpoint (one at a time); it is closed after the test, even on failure."""
    from pjsua_hooks.endpoint import SipEndpoint

    started: list[SipEndpoint] = []

    def make(**kwargs: object) -> SipEndpoint:
        ep = SipEndpoint(**kwargs)  # type: ignore[arg-type]
        started.append(ep)
        return ep.start()

    yield make
    for ep in reversed(started):
        ep.close()


class UdpPeer:
    """A bare UDP socket on loopback that plays a SIP peer without any SIP stack."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def uri(self, user: str) -> str:
        return f"sip:{user}@127.0.0.1:{self.port}"

    def drain(self) -> None:
        while True:
            try:
                self.received.append(self.sock.recvfrom(65535))
            except BlockingIOError:
                return

    def collect(self, pump: Callable[[int], object], seconds: float,
                until: Callable[[list[bytes]], bool] | None = None) -> list[bytes]:
        """Pump the endpoint for up to ``seconds`` while gathering datagrams."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pump(10)
            self.drain()
            if until is not None and until([d for d, _ in self.received]):
                break
        return [d for d, _ in self.received]

    def send(self, data: bytes, port: int) -> None:
        self.sock.sendto(data, ("127.0.0.1", port))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp_peer() -> Iterator[UdpPeer]:
    peer = UdpPeer()
    try:
        yield peer
    finally:
        peer.close()
