"""Helpers for the Kamailio tests: free ports, proxies started by ``e2m-proxy``, SIPp
runners, a binary-safe UDP peer, and redaction of bodies in reports.  The fixtures
that use them are in conftest.py (see its docstring for the API).
"""


from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from e2m_plugins.pki import TestPKI
from e2m_plugins.sip import SipMessage, make_response, parse
from kamailio_app.instance import ProxyProcess
from pjsua_hooks.lab import toml_value  # the one TOML writer (imports no pjsua2)

ROOT = Path(__file__).resolve().parents[2]
SIPP_DIR = ROOT / "tests" / "sipp"
PROXY_HOST = "proxy.example.com"
START_TIMEOUT = 15.0


# --------------------------------------------------------------------------- ports

def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (never 5060)."""
    for _ in range(100):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if port == 5060:
                continue
            udp.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            tcp.close()
            udp.close()
    raise RuntimeError("no free port")


# --------------------------------------------------------------------------- redaction

def redact_sip_text(text: str) -> str:
    """A SIPp message trace with every body replaced by its length and digest.

    Bodies may be plaintext, which must not reach a report.  Messages in the trace
    keep their CRLFs; the trace's own lines end in LF, so the first CRLFCRLF of a
    block ends the message head.
    """
    out = []
    for block in re.split(r"(^-{20,}[^\n]*\n)", text, flags=re.MULTILINE):
        head, sep, body = block.partition("\r\n\r\n")
        if sep and body.strip():
            raw = body.rstrip("\n").encode("utf-8", "surrogateescape")
            digest = hashlib.sha256(raw).hexdigest()[:16]
            out.append(f"{head}\r\n\r\n[body: about {len(raw)} bytes, sha256 {digest}]\n\n")
        else:
            out.append(block)
    return "".join(out)


def describe(message: SipMessage) -> str:
    """Start line and headers of a message, the body only as its length and digest."""
    lines = [str(message.start_line)] + [f"{n}: {v}" for n, v in message.headers]
    digest = hashlib.sha256(message.body).hexdigest()[:16]
    return "\n".join(lines) + f"\n[body: {len(message.body)} bytes, sha256 {digest}]\n"


# --------------------------------------------------------------------------- SIP over UDP

_counter = iter(range(1, 1 << 30))


def udp_transaction(port: int, data: bytes, timeout: float = 3.0,
                    final_only: bool = True) -> SipMessage | None:
    """Send one request to 127.0.0.1:port; the (final) response, or None on timeout."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(timeout)
    try:
        sock.sendto(data, ("127.0.0.1", port))
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

def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, table in sections.items():
        out.append(f"[{name}]")
        out += [f"{key} = {toml_value(value)}" for key, value in table.items() if value is not None]
        out.append("")
    return "\n".join(out)


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
        if "bind" not in last_error.lower() and "address already in use" not in last_error.lower():
            break
    raise RuntimeError(f"proxy {directory.name} did not start; log tail:\n{last_error}")


# --------------------------------------------------------------------------- SIPp

@dataclass
class SippResult:
    rc: int
    output: str
    log: str
    messages: str
    errors: str

    def logged(self, name: str) -> list[str]:
        """Values the scenario logged as ``name=value``, in order."""
        return re.findall(rf"^{re.escape(name)}=(.*)$", self.log, re.MULTILINE)


def _render_scenario(scenario: str, workdir: Path, headers: list[tuple[str, str]] | None,
                     fill: dict[str, str] | None = None) -> Path:
    """tests/sipp/<scenario>; a ``*.tmpl.xml`` gets @@HEADERS@@ and the ``fill`` values."""
    source = SIPP_DIR / scenario
    if not scenario.endswith(".tmpl.xml"):
        return source
    if any("]]>" in n + v or "\n" in v or "\r" in v for n, v in headers or []):
        raise ValueError("header values cannot hold CDATA terminators or line breaks")
    text = source.read_text()
    text = text.replace("@@HEADERS@@\n", "".join(f"      {n}: {v}\n" for n, v in headers or []))
    for name, value in (fill or {}).items():
        text = text.replace(f"@@{name}@@", value)
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise ValueError(f"{scenario}: placeholders not filled: {left}")
    target = workdir / f"{source.name.replace('.tmpl.xml', '')}-{next(_counter)}.xml"
    target.write_text(text)
    return target


class SippUas:
    """A SIPp server scenario running in the background on ``port``."""

    def __init__(self, process: subprocess.Popen, port: int, files: dict[str, Path]) -> None:
        self.process, self.port, self.files = process, port, files

    def wait(self, timeout: float = 10.0) -> SippResult:
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            out, _ = self.process.communicate(timeout=5)
        return _result(self.process.returncode, out, self.files)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return ""


def _result(rc: int, output: bytes | str | None, files: dict[str, Path]) -> SippResult:
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else (output or "")
    return SippResult(rc, text, _read(files["log"]), _read(files["messages"]), _read(files["errors"]))


class SippRunner:
    """Runs SIPp scenarios from tests/sipp in ``workdir``; keeps traces for failure reports."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.results: list[tuple[str, SippResult]] = []
        self._servers: list[SippUas] = []

    def _files(self, tag: str) -> dict[str, Path]:
        n = next(_counter)
        return {kind: self.workdir / f"{tag}-{n}.{kind}" for kind in ("log", "messages", "errors")}

    def _args(self, scenario: Path, port: int, files: dict[str, Path],
              keys: dict[str, Any] | None, timeout: float) -> list[str]:
        args = ["sipp", "-sf", str(scenario), "-i", "127.0.0.1", "-p", str(port), "-m", "1",
                "-nostdin", "-timeout", f"{int(timeout)}s", "-timeout_error",
                "-trace_msg", "-message_file", str(files["messages"]),
                "-trace_logs", "-log_file", str(files["log"]),
                "-trace_err", "-error_file", str(files["errors"])]
        for key, value in (keys or {}).items():
            args += ["-key", key, str(value)]
        return args

    def uas(self, scenario: str, keys: dict[str, Any] | None = None, port: int | None = None,
            timeout: float = 20.0) -> SippUas:
        port = port or free_port()
        files = self._files("uas")
        path = _render_scenario(scenario, self.workdir, None)
        process = subprocess.Popen(self._args(path, port, files, keys, timeout), cwd=self.workdir,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        server = SippUas(process, port, files)
        self._servers.append(server)
        wait_udp_bound(port, process)
        return server

    def uac(self, scenario: str, target_port: int, keys: dict[str, Any] | None = None,
            headers: list[tuple[str, str]] | None = None, fill: dict[str, str] | None = None,
            extra_args: list[str] | None = None, timeout: float = 10.0) -> SippResult:
        files = self._files("uac")
        path = _render_scenario(scenario, self.workdir, headers, fill)
        args = self._args(path, free_port(), files, keys, timeout) + (extra_args or [])
        args.insert(1, f"127.0.0.1:{target_port}")
        done = subprocess.run(args, cwd=self.workdir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout + 10)
        result = _result(done.returncode, done.stdout, files)
        self.results.append((f"uac {scenario}", result))
        return result

    def close(self) -> None:
        for server in self._servers:
            server.stop()
            self.results.append((f"uas on {server.port}", _result(server.process.returncode or 0,
                                                                 b"", server.files)))


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


def sipp_stats(path: Path, counters: tuple[str, ...]) -> dict[str, int]:
    """The last row of a SIPp ``-trace_stat`` CSV (``;``-separated), for ``counters``."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    head = lines[0].rstrip(";").split(";")
    last = lines[-1].rstrip(";").split(";")
    out = {}
    for name in counters:
        if name in head:
            try:
                out[name] = int(last[head.index(name)])
            except (ValueError, IndexError):
                pass
    return out


def stop_process(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it does not go within ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_udp_bound(port: int, process: subprocess.Popen, timeout: float = 5.0) -> None:
    """Until SIPp holds the UDP port (so nothing is sent before it listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return
        finally:
            probe.close()
        time.sleep(0.05)
    if process.poll() is not None:
        raise RuntimeError(f"SIPp exited with {process.returncode} before listening on {port}")


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


# Written by the scenario itself (Call-ID through -cid_str); everything else comes from
# the message, including From (tag), To and CSeq, to which envelopes are bound.
_SIPP_MADE = {"via", "call-id", "max-forwards", "content-length", "content-type", "contact"}


def send_with_sipp(sipp: SippRunner, port: int, message: SipMessage, *, expect: int = 200,
                   workdir: Path, transport: str = "udp") -> SippResult:
    """Send ``message`` (made by a UA engine) with SIPp: SIPp writes the transaction and
    dialog headers, the message gives the rest (labels, policy, body) byte-exact."""
    from e2m_plugins.sip import canonical_name, parse_address
    scenario = {"MESSAGE": "uac_message.tmpl.xml", "INVITE": "uac_invite.tmpl.xml"}[message.method]
    headers = [(n, v) for n, v in message.headers if canonical_name(n) not in _SIPP_MADE]
    body_file = workdir / f"body-{next(_counter)}.bin"
    body_file.write_bytes(message.body)
    user = lambda name: parse_address(message.get(name) or "").uri.split(":", 1)[1].split("@")[0]
    number = message.cseq[0]
    if "%" in message.call_id:
        raise ValueError("sipp -cid_str would expand % in the Call-ID")
    return sipp.uac(scenario, port, headers=headers,
                    fill={"EXPECT": str(expect), "CSEQ": str(number), "NEXT_CSEQ": str(number + 1)},
                    extra_args=["-cid_str", message.call_id,
                                *(["-t", "t1"] if transport == "tcp" else [])],
                    keys={"from_user": user("From"), "to_user": user("To"),
                          "ctype": message.get("Content-Type") or "text/plain",
                          "bodyfile": body_file})


def udp_send(port: int, message: SipMessage, timeout: float = 5.0) -> SipMessage | None:
    """Send ``message`` from a fresh socket (its top Via points there, rport) and return
    the final response, byte-exact (496 bodies are DER)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(timeout)
    try:
        via = f"SIP/2.0/UDP 127.0.0.1:{sock.getsockname()[1]};rport;branch=z9hG4bK-u{next(_counter)}x{os.getpid()}"
        sock.sendto(message.replace("Via", via).serialize(), ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                raw, _ = sock.recvfrom(65535)
            except socket.timeout:
                return None
            response = parse(raw)
            if (response.status or 0) >= 200:
                return response
        return None
    finally:
        sock.close()


def register(proxy: ProxyHandle, user: str, contact_port: int, sipp: SippRunner) -> SippResult:
    """REGISTER ``user`` at ``proxy`` with Contact 127.0.0.1:``contact_port`` (via SIPp)."""
    result = sipp.uac("uac_register.xml", proxy.port,
                      keys={"user": user, "contact_port": contact_port})
    assert result.rc == 0, f"REGISTER {user} failed: {result.output[-500:]}"
    return result
