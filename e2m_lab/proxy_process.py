"""Run one ``e2m-proxy`` from Python: start it, wait until it answers, stop all of it.

For tools that drive proxies (``make demo``, the test harness, the benchmarks).
The launcher starts Kamailio in a session of its own and passes SIGTERM on; if the
launcher is gone first (killed, crashed), Kamailio's process group would outlive
it, so ``stop`` also ends the group named in the runtime directory's pid file.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from e2m_plugins.errors import E2MError
from e2m_plugins.sip import make_request, parse

__all__ = ["ProxyProcess", "accepts_tcp", "answers_options"]

LAUNCHER_MODULE = "kamailio_app.launcher"
_PROJECT = Path(__file__).resolve().parents[1]   # -m finds the launcher from here, installed or not


def answers_options(port: int, timeout: float = 0.3) -> bool:
    """True when the proxy on 127.0.0.1:``port`` answers an OPTIONS to itself with 200."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        # connected: while nothing listens on the port, the kernel's port-unreachable
        # comes back at once as ConnectionRefusedError instead of a whole timeout
        sock.connect(("127.0.0.1", port))
        sock.settimeout(timeout)
        request = make_request("OPTIONS", f"sip:127.0.0.1:{port}", from_uri="sip:probe@localhost",
                               to_uri=f"sip:127.0.0.1:{port}")
        via = (f"SIP/2.0/UDP 127.0.0.1:{sock.getsockname()[1]};rport;"
               f"branch=z9hG4bK-probe{secrets.token_hex(6)}")
        sock.sendto(request.replace("Via", via).serialize(), ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = parse(sock.recv(65535))
            if (response.status or 0) >= 200:
                return response.status == 200
        return False
    except (OSError, E2MError):     # not up yet (refused, timeout) or not a SIP answer
        return False
    finally:
        sock.close()


def accepts_tcp(port: int, timeout: float = 0.3) -> bool:
    """True when something accepts a TCP connection on 127.0.0.1:``port`` (a TLS
    listener is only connected to, no handshake: that is the caller's test)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class ProxyProcess:
    """One launcher process for ``config``, its output appended to ``log_path``."""

    def __init__(self, config: Path, runtime_dir: Path, log_path: Path, *,
                 python: str = sys.executable) -> None:
        self.config = Path(config)
        self.runtime_dir = Path(runtime_dir)
        self.log_path = Path(log_path)
        self.python = python
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [self.python, "-m", LAUNCHER_MODULE, "--config", str(self.config),
                 "--runtime-dir", str(self.runtime_dir)],
                cwd=_PROJECT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_ready(self, port: int, timeout: float, *, tcp_ports: tuple[int, ...] = ()) -> bool:
        """Wait until the proxy answers OPTIONS on ``port`` and accepts connections on
        each of ``tcp_ports`` (its TLS listener, say); False if it died or timed out.
        The stream listeners are checked too because a test's first TLS connect once
        met "connection refused" right after the OPTIONS was answered."""
        deadline = time.monotonic() + timeout
        checks = [lambda: answers_options(port), *(lambda p=p: accepts_tcp(p) for p in tcp_ports)]
        while time.monotonic() < deadline and self.alive():
            if checks[0]():
                checks.pop(0)
                if not checks:
                    return True
                continue
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (then SIGKILL after ``timeout``); the launcher's exit code, if it ran."""
        kamailio_pid = self._kamailio_pid()
        code = None
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()
            code = self.popen.returncode
        if kamailio_pid is not None:
            try:    # normally gone already; if the launcher died first, this ends it
                os.killpg(kamailio_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.popen = None
        return code

    def _kamailio_pid(self) -> int | None:
        try:
            return int((self.runtime_dir / "kamailio.pid").read_text().strip())
        except (OSError, ValueError):
            return None
