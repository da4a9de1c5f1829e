"""Proxies for tests and benchmarks: ``e2m-proxy`` instances with their own ports,
runtime dirs and logs, raw SIP over UDP, and binary-safe UDP peers standing in for a
UAS or a next hop.  SIPp is in ``e2m_lab.sipp``; the pytest fixtures that use both are
in ``e2m_lab.pytest_fixtures``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from e2m_plugins.testpki import TestPKI
from e2m_plugins.sip import SipMessage, make_response, parse
from .ports import free_port

from .proxy_process import ProxyProcess
from .tomlfile import toml_text

ROOT = Path(__file__).resolve().parents[1]
PROXY_HOST = "proxy.example.com"
START_TIMEOUT = 15.0


# --------------------------------------------------------------------------- redaction

def describe(message: SipMessage) -> str:
    """Start line and headers of a message, the body only as its length and digest."""
    lines = [str(message.start_line)] + [f"{n}: {v}" for n, v in message.headers]
    digest = hashlib.sha256(message.body).hexdigest()[:16]
    return "\n".join(lines) + f"\n[body: {len(message.body)} bytes, sha256 {digest}]\n"


# --------------------------------------------------------------------------- SIP over UDP

_counter = itertools.count(1)


def udp_transaction(port: int, request: bytes | SipMessage, timeout: float = 3.0,
                    final_only: bool = True) -> SipMessage | None:
    """Send one request to 127.0.0.1:port from a fresh socket; the (final) response, or
    None on timeout.  A ``SipMessage`` gets a top Via naming that socket (rport), so the
    answer comes back to it; bytes are sent as they are."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(timeout)
    try:
        if isinstance(request, SipMessage):
            via = (f"SIP/2.0/UDP 127.0.0.1:{sock.getsockname()[1]};rport;"
                   f"branch=z9hG4bK-u{next(_counter)}x{os.getpid()}")
            request = request.replace("Via", via).serialize()
        sock.sendto(request, ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                raw, _ = sock.recvfrom(65535)
            except socket.timeout:
                return None
            response = parse(raw)
            if not final_only or (response.status or 0) >= 200:
                return response
        return None
    finally:
        sock.close()


def build_request(method: str, uri: str, *, from_user: str = "alice", to_user: str = "bob",
                  headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                  content_type: str | None = None, call_id: str | None = None,
                  local_port: int = 9) -> bytes:
    """A request as a UA at 127.0.0.1 would send it (the response comes back to the sender:
    Kamailio answers to the source address, rport-style)."""
    n = next(_counter)
    call_id = call_id or f"raw-{os.getpid()}-{n}@127.0.0.1"
    hs = [("Via", f"SIP/2.0/UDP 127.0.0.1:{local_port};rport;branch=z9hG4bK-raw-{os.getpid()}-{n}"),
          ("From", f"<sip:{from_user}@example.com>;tag=raw{n}"),
          ("To", f"<sip:{to_user}@example.com>"),
          ("Call-ID", call_id), ("CSeq", f"1 {method}"), ("Max-Forwards", "70")]
    hs += headers or []
    if content_type:
        hs.append(("Content-Type", content_type))
    from e2m_plugins.sip import RequestLine
    return SipMessage(RequestLine(method, uri), tuple(hs), body).serialize()


# --------------------------------------------------------------------------- proxies

@dataclass
class ProxyHandle:
    name: str
    directory: Path
    config_path: Path
    port: int
    e2m: bool
    launcher: ProxyProcess | None = None
    log_path: Path = field(default=Path("/dev/null"))
    archive_path: Path | None = None
    cert_url: str | None = None

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    @property
    def runtime_dir(self) -> Path:
        return self.directory / "run"

    def log_mark(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, mark: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(mark)
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def options(self, timeout: float = 1.0) -> SipMessage | None:
        return udp_transaction(self.port, build_request("OPTIONS", self.uri, to_user="probe"),
                               timeout=timeout)

    def rpc(self, *command: str) -> str:
        """A kamcmd command on this instance's own ctl socket."""
        done = subprocess.run(["kamcmd", "-s", f"unix:{self.runtime_dir}/kamailio_ctl", *command],
                              capture_output=True, text=True, timeout=10)
        return done.stdout

    def htable_items(self, table: str = "e2mkeys") -> int:
        """How many entries the key cache holds (from htable.stats: counts, no values)."""
        text = self.rpc("htable.stats")
        match = re.search(rf"name:\s*{table}\s+slots:\s*\d+\s+all:\s*(\d+)", text)
        if not match:
            raise AssertionError(f"no stats for {table}: {text[:300]}")
        return int(match.group(1))

    def archive_rows(self) -> list[Any]:
        from kamailio_app.archive import Archive
        assert self.archive_path is not None, "this proxy keeps no archive"
        if not self.archive_path.exists():
            return []
        return Archive(self.archive_path, busy_timeout_ms=2000).bodies(limit=1000)

    def media_rows(self) -> list[dict[str, Any]]:
        from kamailio_app.archive import Archive
        assert self.archive_path is not None
        return Archive(self.archive_path, busy_timeout_ms=2000).media(limit=1000)

    @property
    def process(self) -> subprocess.Popen | None:
        """The launcher's process (tests signal it directly)."""
        return self.launcher.popen if self.launcher is not None else None

    def alive(self) -> bool:
        return self.launcher is not None and self.launcher.alive()

    def start(self) -> bool:
        """Start (or start again) with the same PROXY.toml on the same port; True once
        it answers OPTIONS."""
        if self.launcher is None:
            self.launcher = ProxyProcess(self.config_path, self.runtime_dir, self.log_path)
        self.launcher.start()
        return self.launcher.wait_ready(self.port, START_TIMEOUT)

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()


def write_proxy_config(directory: Path, port: int, *, pki: TestPKI | None, e2m: bool,
                       next_hop: str | None = None,
                       view: tuple[str, ...] = ("MESSAGE:text/plain", "INVITE:application/sdp"),
                       verify: tuple[str, ...] = (), archive: bool = True,
                       fail_request_on_error: bool = False, workers: int = 2,
                       log_level: str = "info", domains: tuple[str, ...] = ("example.com",),
                       extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """PROXY.toml for one proxy; returns its path.  The archive (when on) is archive.sqlite."""
    directory.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict[str, Any]] = {
        "kamailio": {"listen": [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}"],
                     "workers": workers, "shm_mb": 64, "pkg_mb": 16, "next_hop": next_hop,
                     "log_level": log_level, "domains": list(domains)},
        "e2m": {"enabled": e2m},
    }
    if e2m:
        assert pki is not None and pki.directory is not None
        cred = pki.proxy(PROXY_HOST)
        sections["identity"] = {"host": PROXY_HOST, "cert": str(cred.cert_path),
                                "key": str(cred.key_path)}
        sections["trust"] = {"ca": [str(pki.directory / "ca.crt")]}
        sections["policy"] = {"view": list(view), "verify": list(verify),
                              "cert_url": f"http://127.0.0.1:{port}/e2m/cert.der"}
        if archive:
            sections["archive"] = {"path": "archive.sqlite",
                                   "fail_request_on_error": fail_request_on_error}
    for name, table in (extra or {}).items():
        sections.setdefault(name, {}).update(table)
    path = directory / "PROXY.toml"
    path.write_text(toml_text(sections))
    return path


def start_proxy(directory: Path, *, pki: TestPKI | None, e2m: bool, attempts: int = 3,
                **settings: Any) -> ProxyHandle:
    """Write the config, start ``e2m-proxy`` and wait until it answers OPTIONS."""
    last_error = ""
    for _ in range(attempts):   # a port can be taken between probing and binding
        port = free_port()
        config = write_proxy_config(directory, port, pki=pki, e2m=e2m, **settings)
        handle = ProxyHandle(directory.name, directory, config, port, e2m,
                             log_path=directory / "kamailio.log")
        if e2m and settings.get("archive", True):
            handle.archive_path = directory / "archive.sqlite"
        if e2m:
            handle.cert_url = f"http://127.0.0.1:{port}/e2m/cert.der"
        if handle.start():
            return handle
        last_error = handle.log_since(0)[-3000:]
        handle.stop()
        # Only a port taken between probing and binding is worth another try; every
        # Kamailio log says "bind" (its "unable to import bind_ob"), so look for errno.
        if "address already in use" not in last_error.lower():
            break
    raise RuntimeError(f"proxy {directory.name} did not start; log tail:\n{last_error}")


class ProxyStarter:
    """Starts proxies for one test under ``directory`` and stops them all at the end
    (the body of the ``proxy_factory`` / ``proxy_factory`` fixtures)."""

    def __init__(self, pki: Any, directory: Path) -> None:
        self.pki, self.directory = pki, directory
        self.started: list[ProxyHandle] = []

    def __call__(self, name: str, *, e2m: bool = True, **settings: Any) -> ProxyHandle:
        handle = start_proxy(self.directory / name, pki=self.pki if e2m else None, e2m=e2m,
                             **settings)
        self.started.append(handle)
        return handle

    def stop_all(self) -> list[ProxyHandle]:
        for handle in self.started:
            handle.stop()
        return self.started


# --------------------------------------------------------------------------- raw UAS

Responder = Callable[[SipMessage], SipMessage | bytes | None]


class _UdpPeer:
    """A UDP socket on 127.0.0.1 served by a thread: ``_handle(datagram)`` returns the
    bytes to send back (or None).  Subclasses set their own state before calling
    ``super().__init__()``, which starts the thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    def _handle(self, data: bytes) -> bytes | None:
        raise NotImplementedError

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            reply = self._handle(data)
            if reply:
                self.sock.sendto(reply, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class UdpResponder(_UdpPeer):
    """A bare UDP peer: keeps every datagram as bytes and answers each request with
    ``answer(request_bytes) -> bytes | None`` (responses and ACKs are kept, never
    answered).  A far end that answers garbage, or a forging proxy."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        super().__init__()

    def _handle(self, data: bytes) -> bytes | None:
        self.received.append(data)
        if data.startswith((b"SIP/2.0", b"ACK ")):
            return None
        return self.answer(data)


class RawUas(_UdpPeer):
    """A binary-safe UDP SIP peer: keeps every request byte-exact and answers it.

    SIPp's message trace stops at the first NUL, so DER bodies are checked here.
    ``responder(request)`` returns the response to send (default: 200 with no body),
    as a message or as the exact bytes to send; None sends nothing.
    """

    def __init__(self, responder: Responder | None = None) -> None:
        self.responder = responder
        self.received: list[SipMessage] = []
        self.raw: list[bytes] = []          # requests as received, and what did not parse
        self._got = threading.Condition()
        super().__init__()

    def _handle(self, data: bytes) -> bytes | None:
        try:
            message = parse(data)
        except Exception:  # noqa: BLE001 - keep serving; the test sees .raw
            self.raw.append(data)
            return None
        if not message.is_request:
            return None
        with self._got:
            self.raw.append(data)
            self.received.append(message)
            self._got.notify_all()
        if message.method == "ACK":
            return None
        response = (self.responder or _ok)(message)
        if response is None or isinstance(response, bytes):  # bytes: framing tests
            return response
        return response.serialize()

    def wait_for(self, count: int = 1, timeout: float = 5.0, method: str | None = None) -> list[SipMessage]:
        deadline = time.monotonic() + timeout
        with self._got:
            while True:
                got = [m for m in self.received if method is None or m.method == method]
                if len(got) >= count or time.monotonic() >= deadline:
                    return got
                self._got.wait(timeout=max(0.01, deadline - time.monotonic()))


def _ok(request: SipMessage) -> SipMessage:
    return make_response(request, 200, "OK")


def udp_send(port: int, message: SipMessage, timeout: float = 5.0) -> SipMessage | None:
    """Send ``message`` from a fresh socket (its top Via points there, rport) and return
    the final response, byte-exact (496 bodies are DER)."""
    return udp_transaction(port, message, timeout=timeout)
