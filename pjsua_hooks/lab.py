"""A loopback lab for the demo and the end-to-end tests: phone processes, captures, configs.

One place for what ``make demo`` and ``tests/e2e`` both need:

- ``PhoneProcess``: ``e2m-phone --json listen --commands`` as a child process (pjsua
  allows one endpoint per process, and a pjsip abort must not take the caller with
  it), driven over stdin and read as JSON events;
- ``Capture``: tcpdump on ``lo`` into a pcap file, with ``datagrams()`` to read it;
- ``key_witnesses`` / ``contains_key``: find an SRTP key in packets by its SHA-256
  only (the phone writes digests, never keys, when ``E2M_PHONE_KEY_WITNESS`` is set);
- ``write_toml``: the small TOML subset our configs use.

Nothing here prints a message text, an SDP or a key.
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHONE = [sys.executable, "-m", "pjsua_hooks.cli"]

__all__ = ["PhoneProcess", "Capture", "tcpdump_command", "read_pcap", "key_witnesses",
           "contains_key", "write_toml", "toml_value", "free_port"]


# --------------------------------------------------------------------------- configs

def toml_value(value: Any) -> str:
    """A TOML literal for the values our configs hold (bool, number, list, string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``{section: {key: value}}``; keys are quoted (AoRs in ``[peers]`` need it)."""
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in table.items()
                  if v is not None]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (never 5060)."""
    for _ in range(100):
        tcp, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if port != 5060:
                udp.bind(("127.0.0.1", port))
                return port
        except OSError:
            pass
        finally:
            tcp.close()
            udp.close()
    raise RuntimeError("no free port")


# --------------------------------------------------------------------------- phones

class PhoneProcess:
    """``e2m-phone --json listen --commands`` in a child process."""

    def __init__(self, config: Path, name: str, env: Mapping[str, str] | None = None) -> None:
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
             timeout: float = 15.0, since: int = 0) -> dict[str, Any]:
        """The first event of ``kind`` (after index ``since``) that ``where`` accepts."""
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

    @property
    def port(self) -> int:
        """The phone's SIP port, from its ``started`` event."""
        return int(self.wait("started")["local"].rsplit(":", 1)[1])

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


# --------------------------------------------------------------------------- capture

def tcpdump_command() -> list[str] | None:
    """How to run tcpdump here, or None (not installed, or no capture rights)."""
    path = shutil.which("tcpdump") or ("/usr/sbin/tcpdump" if os.path.exists("/usr/sbin/tcpdump")
                                       else None)
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
    """tcpdump on loopback into a pcap file.

    ``running`` is False (and ``why_not`` says why) when tcpdump cannot capture
    here; the caller decides whether that is a skip or a fallback.
    """

    def __init__(self, path: Path, bpf: str = "udp") -> None:
        self.path = path
        self.process: subprocess.Popen | None = None
        self.why_not = ""
        command = tcpdump_command()
        if command is None:
            self.why_not = "tcpdump is not installed or may not capture (no root, sudo or cap_net_raw)"
            return
        self.log = path.with_suffix(".log")
        with open(self.log, "wb") as out:
            # --immediate-mode: without it tcpdump loses its last buffer on SIGINT
            self.process = subprocess.Popen([*command, "-i", "lo", "--immediate-mode", "-U",
                                             "-s", "0", "-w", str(path), bpf], stdout=out,
                                            stderr=out, start_new_session=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if b"listening on" in self.log.read_bytes():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.why_not = "tcpdump could not capture: " + self.log.read_text(errors="replace").strip()[:200]
        self.stop()
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            time.sleep(0.3)   # let the last packets reach the file
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def packets(self) -> list[bytes]:
        return read_pcap(self.path) if self.path.exists() else []

    def datagrams(self) -> list[tuple[int, int, bytes]]:
        """(source port, destination port, UDP payload) of each captured IPv4 datagram."""
        data = self.path.read_bytes() if self.path.exists() else b""
        if len(data) < 24:
            return []
        order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        link = struct.unpack(order + "I", data[20:24])[0]
        skip = 14 if link == 1 else 16 if link == 113 else 4 if link == 0 else 0
        out = []
        for frame in read_pcap(self.path):
            ip = frame[skip:]
            if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
                continue
            ihl = (ip[0] & 15) * 4
            sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
            out.append((sport, dport, ip[ihl + 8:]))
        return out


def read_pcap(path: Path) -> list[bytes]:
    """The captured frames of a classic pcap file (either byte order)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    out, offset = [], 24
    while offset + 16 <= len(data):
        _, _, incl, _ = struct.unpack(order + "IIII", data[offset:offset + 16])
        offset += 16
        out.append(data[offset:offset + incl])
        offset += incl
    return out


# --------------------------------------------------------------------------- SRTP key witnesses

def key_witnesses(path: Path) -> list[dict[str, Any]]:
    """The digests a phone wrote for the SRTP keys it offered (never the keys)."""
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
