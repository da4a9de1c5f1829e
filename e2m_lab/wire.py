"""Wire helpers for the reliability tests: raw bytes over UDP and TCP to a proxy,
the expected answer computed in process by the core's proxy engine on the same
bytes, restarting a proxy on its own port, Kamailio memory statistics, and a
secret scanner for logs.

Nothing here prints a body: reports show start lines, headers and body digests.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .kamailio_harness import ProxyHandle
from .processes import GROUP, processes_with

from e2m_plugins.errors import E2MError
from e2m_plugins.sip import SipMessage, frame_length, parse

_counter = iter(range(1, 1 << 30))


# --------------------------------------------------------------------------- transports

class Peer:
    """One client socket (UDP, or a TCP connection) toward a proxy on 127.0.0.1.

    ``via()`` is the Via a request sent from this socket must carry so the answer
    comes back here; ``send(data)`` sends raw bytes; ``final(timeout)`` returns the
    first final response (or None), provisional ones are skipped.
    """

    def __init__(self, transport: str, port: int) -> None:
        self.transport = transport
        self.port = port
        self.buffer = b""
        self.responses: list[SipMessage] = []
        self.unparsed: list[bytes] = []
        if transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", 0))
        elif transport == "tcp":
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        else:
            raise ValueError(transport)
        self.local_port = self.sock.getsockname()[1]

    def via(self, branch: str | None = None) -> str:
        branch = branch or f"z9hG4bK-rel{next(_counter)}x{os.getpid()}"
        return f"SIP/2.0/{self.transport.upper()} 127.0.0.1:{self.local_port};rport;branch={branch}"

    def send(self, data: bytes) -> None:
        if self.transport == "udp":
            self.sock.sendto(data, ("127.0.0.1", self.port))
        else:
            self.sock.sendall(data)

    def _read_some(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            if self.transport == "udp":
                data, _ = self.sock.recvfrom(65535)
                self._keep(data)
                return True
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return False
        if not data:
            return False          # the proxy closed the connection
        self.buffer += data
        while True:
            try:
                size = frame_length(self.buffer)
            except E2MError:
                self.unparsed.append(self.buffer)
                self.buffer = b""
                break
            if size is None:
                break
            self._keep(self.buffer[:size])
            self.buffer = self.buffer[size:]
        return True

    def _keep(self, data: bytes) -> None:
        try:
            self.responses.append(parse(data))
        except E2MError:
            self.unparsed.append(data)

    def final(self, timeout: float) -> SipMessage | None:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for response in self.responses[seen:]:
                if (response.status or 0) >= 200:
                    return response
            seen = len(self.responses)
            if not self._read_some(deadline):
                return None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def with_via(message: SipMessage, peer: Peer, *, keep_branch: bool = False) -> SipMessage:
    """``message`` with a Via to ``peer``'s socket: a new branch, or with ``keep_branch``
    the one it has (a UA engine knows the answers to what it protected by that branch,
    as a phone's are: a new one is a request it never sent)."""
    return message.replace("Via", peer.via(message.via_branch() if keep_branch else None))


def transact(port: int, message: SipMessage, transport: str = "udp",
             timeout: float = 5.0, *, keep_branch: bool = False) -> SipMessage | None:
    """Send a message (its Via rewritten to point at our socket, ``keep_branch`` as in
    ``with_via``); the final answer."""
    peer = Peer(transport, port)
    try:
        peer.send(with_via(message, peer, keep_branch=keep_branch).serialize())
        return peer.final(timeout)
    finally:
        peer.close()


# --------------------------------------------------------------------------- expectation

@dataclass(frozen=True)
class Expected:
    """What the proxy must do with some bytes: answer ``code``, or forward them
    (the far end answers 200), or drop them (``code`` None, ``forward`` False)."""

    code: int | None
    forward: bool = False
    error: str | None = None          # the engine's error class, when it decided
    certificate: bool = False         # the answer carries the proxy certificate (496)
    why: str = ""

    def describe(self) -> str:
        what = "forward" if self.forward else "drop" if self.code is None else str(self.code)
        return f"{what} ({self.error or self.why})"


def engine_for(proxy: ProxyHandle):
    """The core's proxy engine with the running proxy's own PROXY.toml (in process,
    an in-memory key cache): the same decisions on the same bytes."""
    from e2m_plugins.keycache import MemoryKeyCache
    from e2m_plugins.config import load_proxy_config
    from e2m_plugins.proxy import ProxyEngine
    return ProxyEngine(load_proxy_config(proxy.config_path), MemoryKeyCache())


def engine_expectation(engine: Any, data: bytes) -> Expected:
    """The answer the adapter gives for bytes Kamailio accepted as SIP: the core
    parser's refusal is 400 (kemi.py), else the engine's verdict."""
    try:
        message = parse(data)
    except E2MError as exc:
        return Expected(400, error=type(exc).__name__, why="core parser refuses")
    verdict = engine.inspect(message)
    if verdict.action == "reply":
        return Expected(verdict.code, error=verdict.error,
                        certificate=verdict.content_type == "application/pkix-cert")
    return Expected(None, forward=True, why="engine forwards")


# --------------------------------------------------------------------------- restart

def restart(proxy: ProxyHandle, *, down_seconds: float = 0.0) -> None:
    """Stop the proxy and start it again with the same PROXY.toml on the same port
    (its shared memory, so its key cache, is gone)."""
    proxy.stop()
    time.sleep(down_seconds)
    if not proxy.start():
        raise RuntimeError(f"{proxy.name} did not come back on {proxy.port}:\n"
                           f"{proxy.log_since(0)[-2000:]}")


# --------------------------------------------------------------------------- memory

def _numbers(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^\s*([a-z_]+):\s*(\d+)\s*$", text, re.MULTILINE)}


def memory_sample(proxy: ProxyHandle) -> dict[str, Any]:
    """Shared memory (core.shmmem) and private memory of every process (pkg.stats),
    in bytes, from the instance's own ctl socket."""
    shm = _numbers(proxy.rpc("core.shmmem"))
    pkg_text = proxy.rpc("pkg.stats")
    # pkg.stats prints each process's pid and name from the process table beside the
    # figures the process itself writes into a slot of its own once it runs: a slot not
    # yet written reads 0 (the TCP main process's, sampled early, then its 2.9 MB turned
    # into a soak "leak").  Such a row is left out; a process counts once, by pid.
    by_pid: dict[int, int] = {}
    names: dict[int, str] = {}
    for block in re.split(r"\n(?=\{)", pkg_text):
        values = _numbers(block)
        if values.get("real_used") and values.get("pid"):
            by_pid[values["pid"]] = values["real_used"]
            desc = re.search(r"^\s*desc:\s*(.*?)\s*$", block, re.MULTILINE)
            names[values["pid"]] = desc.group(1) if desc else "?"
    used = list(by_pid.values())
    return {
        "shm_used": shm.get("used"), "shm_real_used": shm.get("real_used"),
        "shm_max_used": shm.get("max_used"), "shm_fragments": shm.get("fragments"),
        "shm_total": shm.get("total"),
        "pkg_real_used_sum": sum(used) if used else None,
        "pkg_real_used_max": max(used) if used else None,
        "pkg_processes": len(used),
        # which process holds what, by pid (a soak failure names the process that grew)
        "pkg_by_pid": {str(pid): value for pid, value in by_pid.items()},
        "pkg_names": {str(pid): name for pid, name in names.items()},
        **process_memory(proxy),
    }


def pkg_over_common_processes(samples: list[dict[str, Any]]) -> list[str]:
    """Private memory summed, in every sample, over the processes whose figures every
    sample has: a process's first figures can come after the first samples (see
    ``memory_sample``), and a sum that gains a whole process's heap then
    looks like growth.  Returns the pids left out (their rows stay in each sample)."""
    tables = [s["pkg_by_pid"] for s in samples if s.get("pkg_by_pid")]
    if not tables:
        return []
    common = set.intersection(*(set(t) for t in tables))
    for sample in samples:
        table = sample.get("pkg_by_pid")
        if table and common:
            sample["pkg_real_used_sum"] = sum(table[pid] for pid in common)
            sample["pkg_real_used_max"] = max(table[pid] for pid in common)
    return sorted(set().union(*tables) - common, key=int)


def pkg_moved(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Each process whose private memory moved from one sample to the other, named, so a
    step in the sum points at its process (matched by pid: pkg.stats's names change)."""
    old, new = before.get("pkg_by_pid") or {}, after.get("pkg_by_pid") or {}
    names = {**before.get("pkg_names", {}), **after.get("pkg_names", {})}
    return {f"{pid} {names.get(pid, '?')}": new[pid] - old[pid]
            for pid in sorted(old.keys() & new.keys(), key=int) if new[pid] != old[pid]}


def kamailio_pids(proxy: ProxyHandle) -> list[int]:
    """Every process of the instance (Kamailio runs in its own process group)."""
    try:
        main = int((proxy.runtime_dir / "kamailio.pid").read_text())
    except (OSError, ValueError):
        return []
    return processes_with(GROUP, main)


def process_memory(proxy: ProxyHandle) -> dict[str, Any]:
    """Anonymous resident memory (RssAnon: heaps, so the embedded Python's objects too,
    which pkg.stats does not see) of every Kamailio process, in bytes."""
    values = []
    for pid in kamailio_pids(proxy):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^RssAnon:\s+(\d+) kB", text, re.MULTILINE)
        if match:
            values.append(int(match.group(1)) * 1024)
    return {"rss_anon_sum": sum(values) if values else None,
            "rss_anon_max": max(values) if values else None, "processes": len(values)}


def htable_entries(proxy: ProxyHandle) -> list[tuple[str, str]]:
    """(key, value) of every key-cache entry.  Values hold CEKs: never print them."""
    text = proxy.rpc("htable.dump", "e2mkeys")
    out = []
    for name, value in re.findall(r"name:\s*(\S+)\s*\n\s*value:\s*(.+)", text):
        out.append((name, value.strip()))
    return out


# --------------------------------------------------------------------------- secrets

def secret_forms(secret: bytes, *, text: bool = False) -> dict[str, bytes]:
    """The spellings under which a secret could show up in a log."""
    import base64
    forms = {"hex": secret.hex().encode(), "HEX": secret.hex().upper().encode(),
             "base64": base64.b64encode(secret).rstrip(b"="),
             "base64url": base64.urlsafe_b64encode(secret).rstrip(b"=")}
    if text:
        forms["raw"] = secret
    if len(secret) >= 12:
        forms["raw"] = secret
    return forms


def find_secrets(blob: bytes, secrets: dict[str, bytes]) -> list[str]:
    """Names of the secrets found in ``blob`` (never the secret itself)."""
    found = []
    for name, needle in secrets.items():
        if needle and needle in blob:
            found.append(name)
    return found


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def read_all(paths: Iterable[Path]) -> dict[str, bytes]:
    out = {}
    for path in paths:
        try:
            out[str(path)] = Path(path).read_bytes()
        except OSError:
            out[str(path)] = b""
    return out
