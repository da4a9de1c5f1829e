"""SIPp from Python: scenarios from ``tests/sipp`` run as a UAC or a background UAS, with
their traces kept for failure reports (bodies redacted), and a UA engine's message sent
byte-exact through SIPp.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e2m_plugins.sip import SipMessage, canonical_name, parse_address

from .processes import stop_process
from .ports import HOST, free_port, free_port_block

if TYPE_CHECKING:
    from .kamailio_harness import ProxyHandle

ROOT = Path(__file__).resolve().parents[1]
SIPP_DIR = ROOT / "tests" / "sipp"

_counter = itertools.count(1)
log = logging.getLogger(__name__)


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

BIND_ERROR = 254          # SIPp's EXIT_BIND_ERROR (-2): some bind() failed with EADDRINUSE
START_ATTEMPTS = 3        # starts of one SIPp on fresh ports before its bind error is final
READY_TIMEOUT = 5.0       # seconds for SIPp to bind all of its sockets


@dataclass(frozen=True)
class SippPorts:
    """Every port SIPp 3.6 binds when it starts, each one given explicitly.

    SIPp binds, in this order (src/sipp.cpp ``main``): the SIP socket (``-p``,
    ``open_connections``); two RTP sockets, audio on ``-mp`` and video on ``-mp`` + 2,
    bound "always ... to avoid ICMP errors", scenario with RTP or not
    (``setup_media_sockets``); the remote-control socket (``-cp``, on 0.0.0.0 unless
    ``-ci``; ``setup_ctrl_socket``).  Left to their defaults, the last two walk fixed
    ranges that every SIPp on the machine shares (6000, 6002, ... 100 tries; 8888 ...
    8947): a bind that fails there with EADDRINUSE on the last try ends SIPp with 254,
    and so does any explicit port that is taken.  Here all of them are fresh free ports
    on 127.0.0.1, so parallel SIPps never compete for a default, and a start that
    still loses a port race is retried on new ones (``start_sipp``).
    """

    sip: int
    media: int
    control: int

    @classmethod
    def allocate(cls, sip: int | None = None) -> "SippPorts":
        sip = sip or free_port()
        media = free_port_block((0, 2), avoid={sip})
        control = free_port(avoid={sip, media, media + 2})
        return cls(sip, media, control)

    def args(self) -> list[str]:
        return ["-p", str(self.sip), "-mi", HOST, "-mp", str(self.media),
                "-ci", HOST, "-cp", str(self.control)]

    @property
    def bound(self) -> tuple[int, ...]:
        """The ports SIPp holds once it has started."""
        return (self.sip, self.media, self.media + 2, self.control)


class SippStartError(RuntimeError):
    """SIPp exited (or never bound its sockets) while starting; ``output`` is what it said."""

    def __init__(self, message: str, rc: int | None, output: str) -> None:
        super().__init__(message)
        self.rc, self.output = rc, output

    @property
    def bind_error(self) -> bool:
        return self.rc == BIND_ERROR


def _read_output(process: subprocess.Popen, output: Path | None) -> str:
    if output is not None:
        return _read(output)
    stream = process.stdout or process.stderr
    if stream is not None and process.poll() is not None:
        try:
            data = stream.read()
        except (OSError, ValueError):
            return ""
        return data.decode("utf-8", "replace") if isinstance(data, bytes) else (data or "")
    return ""


_SIPP_ERROR = re.compile(r"^.*(?:Unable to|errno = |Address already in use|Error|ERROR).*$",
                         re.MULTILINE)


def sipp_error_lines(output: str) -> str:
    """SIPp's own error lines from its output (stderr, maybe mixed with its screen)."""
    lines = list(dict.fromkeys(m.group(0).strip() for m in _SIPP_ERROR.finditer(output)))
    return "\n".join(lines[-5:])


def bind_failure(rc: int | None, output: str) -> str | None:
    """Why SIPp could not bind (its message), when ``rc`` is its bind error; else None."""
    if rc != BIND_ERROR:
        return None
    return sipp_error_lines(output) or f"exit code {BIND_ERROR} (EXIT_BIND_ERROR, no message)"


def _socket_ports(pid: int) -> set[int] | None:
    """Local ports of the UDP and TCP sockets process ``pid`` holds, from /proc (None
    where /proc cannot tell).  Reading /proc leaves the ports alone, unlike a probe that
    binds them, which can take a port from SIPp in the instant SIPp binds it."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("udp", "udp6", "tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_sipp_ready(process: subprocess.Popen, ports: Iterable[int],
                    timeout: float = READY_TIMEOUT, *, output: Path | None = None) -> None:
    """Until SIPp holds every port of ``ports`` (so nothing is sent before it listens, and
    a bind that fails shows here, not later as a lost message).

    Raises ``SippStartError`` with SIPp's own error lines when it exits first (exit
    code 254: a port was taken) or does not bind them within ``timeout``.  ``output`` is
    the file SIPp's stderr goes to; without it, its stdout/stderr pipe is read.
    """
    ports = tuple(ports)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            text = _read_output(process, output)
            reason = sipp_error_lines(text) or "(no error message)"
            raise SippStartError(f"SIPp exited with {process.returncode} before listening on "
                                 f"{ports[0]} (ports {', '.join(map(str, ports))}): {reason}",
                                 process.returncode, text)
        # Read from /proc, never by binding the port ourselves: a probe bind in the
        # instant SIPp binds makes SIPp exit 254 (seen 5 times in 48,000 starts).
        owned = _socket_ports(process.pid) or set()
        if set(ports) <= owned:
            return
        if time.monotonic() > deadline:
            missing = sorted(set(ports) - owned)
            raise SippStartError(f"SIPp (pid {process.pid}) did not bind {missing} within "
                                 f"{timeout:g} s", None, _read_output(process, output))
        time.sleep(0.01)


def wait_udp_bound(port: int, process: subprocess.Popen, timeout: float = READY_TIMEOUT,
                   *, output: Path | None = None) -> None:
    """Until SIPp holds the UDP ``port``; ``SippStartError`` (with SIPp's message) if it
    exits first or has not bound it within ``timeout``."""
    wait_sipp_ready(process, (port,), timeout, output=output)




def _retrying(reason: str, attempt: int, attempts: int, what: str) -> None:
    log.warning("SIPp %s could not bind (%s); starting it again on fresh ports "
                "(attempt %d of %d)", what, reason.replace("\n", " | "), attempt + 1, attempts)


def start_sipp(args: list[str], *, cwd: Path, output: Path, sip_port: int | None = None,
               screen: bool = True, exit_ok: bool = False, attempts: int = START_ATTEMPTS,
               timeout: float = READY_TIMEOUT) -> tuple[subprocess.Popen, SippPorts]:
    """Start ``args`` (a ``sipp`` command line without ports) in the background on fresh
    ``SippPorts``; returns once SIPp holds all of them.

    SIPp's stderr (and its screen on stdout, unless ``screen`` is False) goes to
    ``output``.  A start that ends with SIPp's bind error (254) is retried on new ports,
    up to ``attempts`` starts, each logged with SIPp's message; any other failure, or
    the last one, raises ``SippStartError``.  ``sip_port`` fixes the SIP port (then a
    taken SIP port is final at once).  ``exit_ok``: a SIPp that has already finished
    (any exit code but 254) counts as started, for clients that may be done quickly.
    """
    output.write_bytes(b"")
    for attempt in range(1, attempts + 1):
        ports = SippPorts.allocate(sip_port)
        with open(output, "ab") as out:
            process = subprocess.Popen([*args, *ports.args()], cwd=cwd,
                                       stdout=out if screen else subprocess.DEVNULL, stderr=out)
        try:
            wait_sipp_ready(process, ports.bound, timeout, output=output)
            return process, ports
        except SippStartError as error:
            stop_process(process)
            if exit_ok and error.rc is not None and not error.bind_error:
                return process, ports
            reason = bind_failure(error.rc, error.output)
            fixed = sip_port is not None and "main socket" in (reason or "")
            if reason is None or fixed or attempt == attempts:
                raise
            _retrying(reason, attempt, attempts, f"on {ports.bound}")
    raise AssertionError("unreachable")


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
    # The scenarios say ISO-8859-1: one character per octet, so a filled-in regexp may
    # name any octet of a binary body (tests/sipp/uac_subscribe_cert.tmpl.xml).
    text = source.read_text(encoding="latin-1")
    text = text.replace("@@HEADERS@@\n", "".join(f"      {n}: {v}\n" for n, v in headers or []))
    for name, value in (fill or {}).items():
        text = text.replace(f"@@{name}@@", value)
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise ValueError(f"{scenario}: placeholders not filled: {left}")
    target = workdir / f"{source.name.replace('.tmpl.xml', '')}-{next(_counter)}.xml"
    target.write_text(text, encoding="latin-1")
    return target


class SippUas:
    """A SIPp server scenario running in the background on ``port``."""

    def __init__(self, process: subprocess.Popen, ports: SippPorts, files: dict[str, Path]) -> None:
        self.process, self.ports, self.files = process, ports, files
        self.port = ports.sip

    def wait(self, timeout: float = 10.0) -> SippResult:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            self.process.wait(timeout=5)
        return _result(self.process.returncode, _read(self.files["output"]), self.files)

    def stop(self) -> None:
        stop_process(self.process)


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
        return {kind: self.workdir / f"{tag}-{n}.{kind}"
                for kind in ("log", "messages", "errors", "output")}

    def _args(self, scenario: Path, files: dict[str, Path], keys: dict[str, Any] | None,
              timeout: float) -> list[str]:
        """The command line without ports (``SippPorts.args`` adds them)."""
        args = ["sipp", "-sf", str(scenario), "-i", HOST, "-m", "1",
                "-nostdin", "-timeout", f"{int(timeout)}s", "-timeout_error",
                "-trace_msg", "-message_file", str(files["messages"]),
                "-trace_logs", "-log_file", str(files["log"]),
                "-trace_err", "-error_file", str(files["errors"])]
        for key, value in (keys or {}).items():
            args += ["-key", key, str(value)]
        return args

    def uas(self, scenario: str, keys: dict[str, Any] | None = None, port: int | None = None,
            timeout: float = 20.0) -> SippUas:
        files = self._files("uas")
        path = render_scenario(scenario, self.workdir, None)
        process, ports = start_sipp(self._args(path, files, keys, timeout), cwd=self.workdir,
                                    output=files["output"], sip_port=port)
        server = SippUas(process, ports, files)
        self._servers.append(server)
        return server

    def uac(self, scenario: str, target_port: int, keys: dict[str, Any] | None = None,
            headers: list[tuple[str, str]] | None = None, fill: dict[str, str] | None = None,
            extra_args: list[str] | None = None, timeout: float = 10.0,
            attempts: int = START_ATTEMPTS) -> SippResult:
        """Runs to completion.  A run that ended with SIPp's bind error before it sent
        anything is run again on fresh ports (up to ``attempts`` runs, each logged)."""
        path = render_scenario(scenario, self.workdir, headers, fill)
        for attempt in range(1, attempts + 1):
            files = self._files("uac")
            ports = SippPorts.allocate()
            args = [*self._args(path, files, keys, timeout), *ports.args(), *(extra_args or [])]
            args.insert(1, f"127.0.0.1:{target_port}")
            done = subprocess.run(args, cwd=self.workdir, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=timeout + 10)
            result = _result(done.returncode, done.stdout, files)
            reason = bind_failure(result.rc, result.output)
            if reason is None or result.messages.strip() or attempt == attempts:
                break
            self.results.append((f"uac {scenario} (could not bind, run again)", result))
            _retrying(reason, attempt, attempts, f"uac {scenario} on {ports.bound}")
        self.results.append((f"uac {scenario}", result))
        return result

    def close(self) -> None:
        for server in self._servers:
            server.stop()
            self.results.append((f"uas on {server.port}", _result(server.process.returncode or 0,
                                                                 _read(server.files["output"]),
                                                                 server.files)))


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
