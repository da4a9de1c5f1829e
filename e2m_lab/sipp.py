"""SIPp from Python: scenarios from ``tests/sipp`` run as a UAC or a background UAS, with
their traces kept for failure reports (bodies redacted), and a UA engine's message sent
byte-exact through SIPp.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e2m_plugins.sip import SipMessage, canonical_name, parse_address

from .ports import free_port

if TYPE_CHECKING:
    from .kamailio_harness import ProxyHandle

ROOT = Path(__file__).resolve().parents[1]
SIPP_DIR = ROOT / "tests" / "sipp"

_counter = itertools.count(1)


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


def render_scenario(scenario: str, workdir: Path, headers: list[tuple[str, str]] | None,
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
        path = render_scenario(scenario, self.workdir, None)
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
        path = render_scenario(scenario, self.workdir, headers, fill)
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


# Written by the scenario itself (Call-ID through -cid_str); everything else comes from
# the message, including From (tag), To and CSeq, to which envelopes are bound.
_SIPP_MADE = {"via", "call-id", "max-forwards", "content-length", "content-type", "contact"}


def send_with_sipp(sipp: SippRunner, port: int, message: SipMessage, *, expect: int = 200,
                   workdir: Path, transport: str = "udp") -> SippResult:
    """Send ``message`` (made by a UA engine) with SIPp: SIPp writes the transaction and
    dialog headers, the message gives the rest (labels, policy, body) byte-exact."""
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


def register(proxy: "ProxyHandle", user: str, contact_port: int, sipp: SippRunner) -> SippResult:
    """REGISTER ``user`` at ``proxy`` with Contact 127.0.0.1:``contact_port`` (via SIPp)."""
    result = sipp.uac("uac_register.xml", proxy.port,
                      keys={"user": user, "contact_port": contact_port})
    assert result.rc == 0, f"REGISTER {user} failed: {result.output[-500:]}"
    return result
