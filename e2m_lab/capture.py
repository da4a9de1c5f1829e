"""Loopback packet captures and SRTP key witnesses, for the demo and the tests.

- ``Capture``: tcpdump on ``lo`` into a pcap file, with ``datagrams()`` to read it;
- ``key_witnesses`` / ``contains_key``: find an SRTP key in packets by its SHA-256
  only (the phone writes digests, never keys, when ``E2M_PHONE_KEY_WITNESS`` is set).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["Capture", "tcpdump_command", "read_pcap", "key_witnesses", "contains_key"]


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
