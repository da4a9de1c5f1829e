"""Helpers for the end-to-end tests: UA.toml files, ``e2m-phone`` child processes
driven over stdin/stdout (JSON events), a loopback packet capture, and a bare UDP
"proxy" that can forge answers.

Each phone runs in its own process (pjsua allows one endpoint per process, and a
pjsip abort must not take the test run with it).  Nothing here prints a message
text or an SDP: reports show event kinds and security attributes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PHONE = [sys.executable, "-m", "pjsua_hooks.cli"]


def write_ua(directory: Path, name: str, pki_dir: Path, *, peer: str | None,
             phone: dict[str, Any], e2m: dict[str, Any] | None = None) -> Path:
    """UA.toml for ``name`` (credentials ``<name>.crt/.key`` of the test PKI)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = ["[identity]", f'aor = "sip:{name}@example.com"',
             f"cert = {value(pki_dir / (name + '.crt'))}",
             f"key = {value(pki_dir / (name + '.key'))}",
             "[trust]", f"ca = [{value(pki_dir / 'ca.crt')}]"]
    if peer:
        lines += ["[peers]", f'"sip:{peer}@example.com" = {value(pki_dir / (peer + ".crt"))}']
    if e2m:
        lines += ["[e2m]"] + [f"{k} = {value(v)}" for k, v in e2m.items()]
    lines += ["[phone]"] + [f"{k} = {value(v)}" for k, v in phone.items()]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def redact(event: dict[str, Any]) -> dict[str, Any]:
    """An event fit for a failure report: message text replaced by its length."""
    out = dict(event)
    if "text" in out:
        out["text"] = f"[{len(out['text'])} chars]"
    sec = out.get("security")
    if isinstance(sec, dict):
        out["security"] = sec.get("summary")
    elif isinstance(sec, list):
        out["security"] = [f"{r['direction']} {r['what']}: {(r['security'] or {}).get('summary')}"
                           for r in sec[-2:]]
    return out


class PhoneProcess:
    """``e2m-phone --json listen --commands`` in a child process."""

    def __init__(self, config: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._new = threading.Condition()
        self.stderr_path = config.parent / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            [*PHONE, "--config", str(config), "--json", "listen", "--commands"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env={**os.environ, **(env or {})}, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._new:
                self.events.append(event)
                self._new.notify_all()

    def wait(self, kind: str, where: Callable[[dict[str, Any]], bool] | None = None,
             timeout: float = 10.0, since: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for event in self.events[since:]:
                    if event["kind"] == kind and (where is None or where(event)):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    kinds = [e["kind"] for e in self.events[-15:]]
                    raise AssertionError(f"{self.name}: no {kind!r} event within {timeout:.0f}s "
                                         f"(rc={self.process.poll()}); last events: {kinds}")
                self._new.wait(timeout=min(left, 0.2))

    def mark(self) -> int:
        with self._new:
            return len(self.events)

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process.poll() is None:
            try:
                self.send("quit")
                self.process.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()
        self._reader.join(timeout=2)
        self._stderr.close()
        return self.process.returncode

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class CliResult:
    rc: int
    events: list[dict[str, Any]]
    stderr: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]


def run_phone(config: Path, *args: str, timeout: float = 30.0,
              env: dict[str, str] | None = None) -> CliResult:
    """One ``e2m-phone --json`` command to completion."""
    done = subprocess.run([*PHONE, "--config", str(config), "--json", *args], cwd=ROOT,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    events = []
    for line in done.stdout.decode(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return CliResult(done.returncode, events, done.stderr.decode(errors="replace"))


# --------------------------------------------------------------------------- capture

def tcpdump_command() -> list[str] | None:
    """How to run tcpdump here, or None (not installed, or no capture rights)."""
    path = shutil.which("tcpdump")
    if path is None:
        return None
    if os.geteuid() == 0:
        return [path]
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", path, "--version"],
                                               capture_output=True).returncode == 0:
        return ["sudo", "-n", path]
    caps = subprocess.run(["getcap", path], capture_output=True, text=True) \
        if shutil.which("getcap") else None
    if caps is not None and "cap_net_raw" in caps.stdout:
        return [path]
    return None


class Capture:
    """tcpdump on loopback into a pcap file; ``packets()`` after ``stop()``."""

    def __init__(self, path: Path, bpf: str) -> None:
        command = tcpdump_command()
        if command is None:
            raise RuntimeError("tcpdump unavailable")
        self.path = path
        self.log = path.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([*command, "-i", "lo", "--immediate-mode", "-U", "-s", "0",
                                             "-w", str(path),
                                             bpf], stdout=log, stderr=log,
                                            start_new_session=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if b"listening on" in self.log.read_bytes():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"tcpdump exited: {self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        raise RuntimeError("tcpdump did not start listening")

    def stop(self) -> None:
        if self.process.poll() is None:
            time.sleep(0.3)   # let the last packets reach the file
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def packets(self) -> list[bytes]:
        return read_pcap(self.path)


def read_pcap(path: Path) -> list[bytes]:
    """The captured frames of a classic pcap file (either byte order)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    order = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    out, offset = [], 24
    while offset + 16 <= len(data):
        _, _, incl, _ = struct.unpack(order + "IIII", data[offset:offset + 16])
        offset += 16
        out.append(data[offset:offset + incl])
        offset += incl
    return out


def key_witnesses(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def contains_key(packet: bytes, witness: dict[str, Any]) -> bool:
    """Whether any window of ``packet`` hashes to the witnessed key (base64 or raw)."""
    for length, digest in ((witness["b64_len"], witness["b64_sha256"]),
                           (witness["raw_len"], witness["raw_sha256"])):
        if not length:
            continue
        for i in range(0, len(packet) - length + 1):
            if hashlib.sha256(packet[i:i + length]).hexdigest() == digest:
                return True
    return False


# --------------------------------------------------------------------------- forging peer

@dataclass
class ForgingProxy:
    """A bare UDP socket standing in as the phone's outbound proxy: answers every
    request with ``answer(request_bytes) -> bytes | None`` and keeps what arrived."""

    answer: Callable[[bytes], bytes | None]
    received: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
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

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.received.append(data)
            if data.startswith(b"SIP/2.0") or data.startswith(b"ACK "):
                continue
            reply = self.answer(data)
            if reply is not None:
                self.sock.sendto(reply, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

