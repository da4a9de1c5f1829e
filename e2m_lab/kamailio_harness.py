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
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from e2m_plugins.testpki import TestPKI
from e2m_plugins.sip import RequestLine, SipMessage, make_request, make_response, parse
from kamailio_app.launcher import CTL_PATH_MAX, CTL_SOCKET, LOG_POLL
from .ports import free_port

from .proxy_process import ProxyProcess
from .tomlfile import write_toml

ROOT = Path(__file__).resolve().parents[1]
PROXY_HOST = "proxy.example.com"
START_TIMEOUT = 15.0
# log_since waits this long: the launcher passes Kamailio's log on every LOG_POLL s
LOG_SETTLE = 5 * LOG_POLL


# --------------------------------------------------------------------------- redaction

def describe(message: SipMessage) -> str:
    """Start line and headers of a message, the body only as its length and digest."""
    lines = [str(message.start_line)] + [f"{n}: {v}" for n, v in message.headers]
    digest = hashlib.sha256(message.body).hexdigest()[:16]
    return "\n".join(lines) + f"\n[body: {len(message.body)} bytes, sha256 {digest}]\n"


# --------------------------------------------------------------------------- SIP over UDP

_counter = itertools.count(1)


def udp_transaction(port: int, request: bytes | SipMessage, timeout: float = 3.0,
                    final_only: bool = True, source: str = "127.0.0.1",
                    keep_branch: bool = False) -> SipMessage | None:
    """Send one request to 127.0.0.1:port from a fresh socket on ``source`` (any loopback
    address: a stranger other than the proxy's own address); the (final) response, or
    None on timeout.  A ``SipMessage`` gets a top Via naming that socket (rport), so the
    answer comes back to it, with a fresh branch unless ``keep_branch`` (a UA engine
    that made the request follows only answers to its own branch); bytes are sent as
    they are."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.settimeout(timeout)
    try:
        if isinstance(request, SipMessage):
            branch = request.via_branch() if keep_branch \
                else f"z9hG4bK-u{next(_counter)}x{os.getpid()}"
            via = f"SIP/2.0/UDP {source}:{sock.getsockname()[1]};rport;branch={branch}"
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
    return SipMessage(RequestLine(method, uri), tuple(hs), body).serialize()


# --------------------------------------------------------------------------- proxies

def runtime_dir_for(directory: Path) -> Path:
    """``directory``/run, or where that is too long for Kamailio's ctl socket (pytest's
    dirs under xdist: ``.../popen-gw0/<test>/<proxy>/run``) a short dir of its own in
    the temp dir, named for ``directory`` so a restart finds it again (removed by
    ``ProxyStarter.stop_all``)."""
    run = directory / "run"
    if len(os.fsencode(run / CTL_SOCKET)) <= CTL_PATH_MAX:
        return run
    digest = hashlib.sha256(os.fsencode(directory.resolve())).hexdigest()[:16]
    return Path(tempfile.gettempdir()).resolve() / f"e2m-run-{digest}"


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
    tls_port: int | None = None        # the tls: listener, when started with tls=...
    realm: str | None = None           # [auth] realm, when started with auth=...
    db_url: str | None = None          # [cluster] db_url, when started with db_url=...

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    @property
    def tls_uri(self) -> str:
        assert self.tls_port is not None, "this proxy has no TLS listener"
        return f"sip:127.0.0.1:{self.tls_port};transport=tls"

    def shm(self) -> dict[str, int]:
        """Kamailio's shared memory figures (core.shmmem: total, free, used, real_used ...)."""
        return {k: int(v) for k, v in re.findall(r"(\w+):\s*(\d+)", self.rpc("core.shmmem"))}

    def add_user(self, name: str, password: str) -> None:
        """Add an [auth] user with the operator's command (password on standard input)."""
        done = subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "users", "add",
                               "--config", str(self.config_path), name], input=password + "\n",
                              capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert done.returncode == 0, done.stderr

    @property
    def runtime_dir(self) -> Path:
        return runtime_dir_for(self.directory)

    def log_mark(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, mark: int = 0) -> str:
        """The log after ``mark``, once what Kamailio wrote until now has reached it (the
        launcher drains Kamailio's log pipe every ``LOG_POLL`` s)."""
        time.sleep(LOG_SETTLE)
        return self._log_now(mark)

    def _log_now(self, mark: int) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(mark)
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_log(self, text: str, mark: int = 0, timeout: float = 3.0) -> bool:
        """Whether ``text`` shows up in the log (after ``mark``) within ``timeout``: the
        launcher passes Kamailio's log on a moment after Kamailio wrote it."""
        deadline = time.monotonic() + timeout
        while text not in self._log_now(mark):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def options(self, timeout: float = 1.0) -> SipMessage | None:
        return udp_transaction(self.port, build_request("OPTIONS", self.uri, to_user="probe"),
                               timeout=timeout)

    def rpc(self, *command: str) -> str:
        """A kamcmd command on this instance's own ctl socket."""
        done = subprocess.run(["kamcmd", "-s", f"unix:{self.runtime_dir / CTL_SOCKET}", *command],
                              capture_output=True, text=True, timeout=10)
        return done.stdout

    def htable_items(self, table: str = "e2mkeys") -> int:
        """How many entries the key cache holds (from htable.stats: counts, no values)."""
        text = self.rpc("htable.stats")
        match = re.search(rf"name:\s*{table}\s+slots:\s*\d+\s+all:\s*(\d+)", text)
        if not match:
            raise AssertionError(f"no stats for {table}: {text[:300]}")
        return int(match.group(1))

    def htable_lives(self, table: str = "e2mkeys") -> dict[str, float]:
        """Seconds each item of ``table`` has left, by name (htable.dump for the names,
        then htable.get for each one's expiry, a local time to the second); an item
        without its own expiry counts as ``math.inf``.  Values are read and dropped:
        the key cache's are sealed."""
        import math
        names = re.findall(r"^\s*name:\s*(\S+)", self.rpc("htable.dump", table), re.M)
        lives: dict[str, float] = {}
        for name in names:
            found = re.search(r"expire:\s*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)",
                              self.rpc("htable.get", table, name))
            if found is None:
                lives[name] = math.inf
                continue
            at = time.mktime(time.strptime(found.group(1), "%Y-%m-%d %H:%M:%S"))
            lives[name] = at - time.time()
        return lives

    def archive(self) -> Any:
        """The archive this proxy writes (its SQLite file, or the shared PostgreSQL)."""
        from kamailio_app.archive import Archive
        if self.db_url is not None:
            from kamailio_app.archive_store import open_shared
            from kamailio_app.config import load_app_config
            return open_shared(load_app_config(self.config_path))
        assert self.archive_path is not None, "this proxy keeps no archive"
        return Archive(self.archive_path, busy_timeout_ms=2000)

    def archive_rows(self) -> list[Any]:
        if self.db_url is None and (self.archive_path is None or not self.archive_path.exists()):
            assert self.archive_path is not None, "this proxy keeps no archive"
            return []
        store = self.archive()
        try:
            return store.bodies(limit=100000)
        finally:
            store.close()

    def media_rows(self) -> list[dict[str, Any]]:
        store = self.archive()
        try:
            return store.media(limit=100000)
        finally:
            store.close()

    def db(self, *command: str) -> subprocess.CompletedProcess:
        """``e2m-proxy db COMMAND --config`` this proxy's PROXY.toml, as the operator runs it."""
        return subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "db", *command,
                               "--config", str(self.config_path)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)

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
        stream_ports = (self.tls_port,) if self.tls_port else ()
        return self.launcher.wait_ready(self.port, START_TIMEOUT, tcp_ports=stream_ports)

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()

    def kill(self) -> None:
        """SIGKILL every Kamailio process of this proxy and its launcher, as a crash
        or a power cut would: nothing is shut down in order.  ``start()`` brings it back."""
        import signal
        if self.launcher is None:
            return
        pid = self.launcher._kamailio_pid()
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.launcher.popen is not None:
            self.launcher.popen.kill()
            self.launcher.popen.wait()
        self.launcher.popen = None
        # Its pid may live on as a zombie nobody reaps (a container's init): the file
        # would make the next start refuse, as a reboot's would not.
        (self.runtime_dir / "kamailio.pid").unlink(missing_ok=True)


def write_proxy_config(directory: Path, port: int, *, pki: TestPKI | None, e2m: bool,
                       next_hop: str | None = None,
                       view: tuple[str, ...] = ("MESSAGE:text/plain", "INVITE:application/sdp"),
                       verify: tuple[str, ...] = (), archive: bool = True,
                       fail_request_on_error: bool = False, workers: int = 2,
                       log_level: str = "info", domains: tuple[str, ...] = ("example.com",),
                       auth: bool | dict[str, Any] = False,
                       users: dict[str, str] | None = None,
                       tls: bool | dict[str, Any] = False, tls_port: int | None = None,
                       limits: dict[str, Any] | None = None,
                       db_url: str | None = None,
                       extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """PROXY.toml for one proxy; returns its path.  The archive (when on) is archive.sqlite.

    ``db_url``: a ``[cluster]`` on that PostgreSQL: the archive there (with this proxy's
    spool, archive-spool.sqlite) and, with ``auth``, its users there too.

    ``auth``: an ``[auth]`` section (True: the defaults, users.sqlite in ``directory``; a
    dict: those keys), with ``users`` (name: password) added as the operator would.
    Without it the registrar is open, as before issue 14.  ``tls``: a ``tls:`` listener
    on ``tls_port`` with the TLS certificate of ``PROXY_HOST`` (or ``tls["host"]``) from
    ``pki`` and its CA (a dict adds [tls] keys).  ``limits``: ``[limits]`` keys (the
    defaults are the product's: every test client on 127.0.0.1 is the proxy's own
    address, which pike never limits)."""
    directory.mkdir(parents=True, exist_ok=True)
    listen = [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}"]
    if tls:
        assert tls_port is not None, "tls=... needs a tls_port"
        listen.append(f"tls:127.0.0.1:{tls_port}")
    sections: dict[str, dict[str, Any]] = {
        "kamailio": {"listen": listen,
                     "workers": workers, "shm_mb": 64, "pkg_mb": 16, "next_hop": next_hop,
                     "log_level": log_level, "domains": list(domains)},
        "e2m": {"enabled": e2m},
    }
    if tls:
        assert pki is not None and pki.directory is not None, "tls=... needs the pki"
        settings = dict(tls) if isinstance(tls, dict) else {}
        server = pki.tls_server(settings.pop("host", PROXY_HOST))
        sections["tls"] = {"cert": str(server.cert_path), "key": str(server.key_path),
                           "ca": [str(pki.directory / "ca.crt")], **settings}
    if db_url:
        sections["cluster"] = {"db_url": db_url}
    if auth:
        own = {} if db_url else {"users": "users.sqlite"}
        sections["auth"] = {**own, **(auth if isinstance(auth, dict) else {})}
    if limits:
        sections["limits"] = dict(limits)
    if e2m:
        assert pki is not None and pki.directory is not None
        cred = pki.proxy(PROXY_HOST)
        sections["identity"] = {"host": PROXY_HOST, "cert": str(cred.cert_path),
                                "key": str(cred.key_path)}
        sections["trust"] = {"ca": [str(pki.directory / "ca.crt")]}
        sections["policy"] = {"view": list(view), "verify": list(verify),
                              "cert_url": f"http://127.0.0.1:{port}/e2m/cert.der"}
        if archive:
            sections["archive"] = {"fail_request_on_error": fail_request_on_error}
            if not db_url:
                sections["archive"]["path"] = "archive.sqlite"
    for name, table in (extra or {}).items():
        sections.setdefault(name, {}).update(table)
    path = write_toml(directory / "PROXY.toml", sections)
    if users:
        from kamailio_app.config import load_app_config
        from kamailio_app.users import add_user
        settings = load_app_config(path).auth
        assert settings is not None, "users=... needs auth=..."
        where = settings.users or settings.pg
        assert where is not None
        if db_url:
            _db_init(path)       # the subscriber table, made as the operator makes it
        for name, password in users.items():
            add_user(where, settings.table, settings.realm, name, password)
    return path


def _db_init(config: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "db", "init",
                           "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def _ports_named(settings: dict[str, Any]) -> set[int]:
    """Ports the settings name already (a node's DMQ address and peers): chosen free by
    the caller but not bound yet, so free_port could hand one out again as the SIP port
    (a cluster test once failed so: "also served by [kamailio] listen")."""
    cluster = (settings.get("extra") or {}).get("cluster") or {}
    texts = [cluster.get("dmq_address") or "", *(cluster.get("peers") or ())]
    return {int(found) for text in texts for found in re.findall(r":(\d+)(?:;|$)", str(text))}


def start_proxy(directory: Path, *, pki: TestPKI | None, e2m: bool, attempts: int = 3,
                port: int | None = None, **settings: Any) -> ProxyHandle:
    """Write the config, start ``e2m-proxy`` and wait until it answers OPTIONS.
    ``port``: its SIP port, chosen by the caller (who had to name it to others first);
    else a free one, and another one if it was taken before Kamailio bound it."""
    last_error = ""
    chosen = port
    named = _ports_named(settings)
    for _ in range(1 if chosen else attempts):
        port = chosen or free_port(avoid=named)
        tls_port = free_port(avoid={port, *named}) if settings.get("tls") else None
        config = write_proxy_config(directory, port, pki=pki, e2m=e2m, tls_port=tls_port,
                                    **settings)
        handle = ProxyHandle(directory.name, directory, config, port, e2m,
                             log_path=directory / "kamailio.log", tls_port=tls_port)
        if settings.get("auth"):
            auth = settings["auth"]
            handle.realm = (auth.get("realm") if isinstance(auth, dict) else None) \
                or (settings.get("domains") or ("example.com",))[0]
        if settings.get("db_url"):
            handle.db_url = settings["db_url"]
            _db_init(config)
        elif e2m and settings.get("archive", True):
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
        wants_pki = e2m or bool(settings.get("tls"))
        handle = start_proxy(self.directory / name, pki=self.pki if wants_pki else None,
                             e2m=e2m, **settings)
        self.started.append(handle)
        return handle

    def stop_all(self) -> list[ProxyHandle]:
        for handle in self.started:
            handle.stop()
            if handle.directory not in handle.runtime_dir.parents:
                shutil.rmtree(handle.runtime_dir, ignore_errors=True)
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
        self.errors: list[Exception] = []      # what the handler raised (it keeps serving)
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
            if self._stop.is_set():
                return          # close()'s wake-up datagram, or one that came with it
            try:
                reply = self._handle(data)
            except Exception as exc:  # noqa: BLE001 - a responder's bug must not end the peer
                self.errors.append(exc)  # (the test sees it here; nothing is answered)
                continue
            if reply:
                self.sock.sendto(reply, peer)

    def close(self) -> None:
        self._stop.set()
        try:      # wake the reader now instead of at its next 0.2 s timeout
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
                waker.sendto(b"", ("127.0.0.1", self.port))
        except OSError:
            pass
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


def wait_delivered(uas: RawUas, body: bytes, timeout: float = 2.0) -> bool:
    """Whether a request with exactly ``body`` reached ``uas`` within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m.body == body for m in uas.received):
            return True
        time.sleep(0.05)
    return False


@contextmanager
def registered_uas(proxy: "ProxyHandle", user: str, password: str, source: str,
                   responder: Responder | None = None) -> Iterator[RawUas]:
    """A ``RawUas`` registered at ``proxy`` as ``user`` (digest with ``password``, the
    REGISTER sent from ``source``), closed afterwards; ``responder`` as for RawUas."""
    uas = RawUas()
    uas.responder = responder
    ua = SipUa(proxy.port, user=user, password=password, source=source)
    try:
        reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        answer = ua.request(reg.replace("Contact", f"<sip:{user}@127.0.0.1:{uas.port}>"))
        assert answer is not None and answer.status == 200, answer
        yield uas
    finally:
        ua.close()
        uas.close()


def register_contact(proxy: "ProxyHandle", user: str, port: int, *, password: str | None = None,
                     source: str = "127.0.0.1") -> None:
    """Register ``sip:user@127.0.0.1:port`` as ``user``'s contact at ``proxy`` (digest with
    ``password`` when asked), the REGISTER sent from ``source``."""
    ua = SipUa(proxy.port, user=user, password=password, source=source)
    try:
        reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        answer = ua.request(reg.replace("Contact", f"<sip:{user}@127.0.0.1:{port}>"))
        assert answer is not None and answer.status == 200, answer
    finally:
        ua.close()


def answer_under_offer_key(proxy: "ProxyHandle", bob_engine: Any, bob: "RawUas",
                           delivered: SipMessage, *, to_tag: str = "b1",
                           logged: str = "e2m: INVITE response 200") -> SipMessage:
    """bob (``bob``'s socket, ``bob_engine``'s keys) answers the INVITE the proxy
    ``delivered`` with a 200 sealed under the caller's offer key (CEK reuse), his To tag
    ``to_tag``, the route set copied back, sent to the proxy; returns the 200 as sent,
    once the proxy logged ``logged`` (reading it, or dropping it)."""
    from .flows import SDP_ANSWER, answer
    reply = answer(bob_engine.open(delivered).message, SDP_ANSWER, to_tag=to_tag)
    reply = reply.replace("Contact", f"<sip:bob@127.0.0.1:{bob.port}>")
    protected = bob_engine.protect(reply)
    assert protected.info.key_reuse
    bob.sock.sendto(protected.message.serialize(), ("127.0.0.1", proxy.port))
    assert proxy.wait_log(logged, timeout=5)
    return protected.message


def _ok(request: SipMessage) -> SipMessage:
    return make_response(request, 200, "OK")


def udp_send(port: int, message: SipMessage, timeout: float = 5.0, *,
             keep_branch: bool = False) -> SipMessage | None:
    """Send ``message`` from a fresh socket (its top Via points there, rport) and return
    the final response, byte-exact (496 bodies are DER)."""
    return udp_transaction(port, message, timeout=timeout, keep_branch=keep_branch)


# --------------------------------------------------------------------------- a UA with digest

_CHALLENGE_PARAM = re.compile(r'([A-Za-z-]+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


def parse_challenge(value: str) -> dict[str, str]:
    """The parameters of a ``Digest`` challenge (WWW-/Proxy-Authenticate), lower-case keys."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise ValueError(f"not a Digest challenge: {value!r}")
    return {k.lower(): quoted if quoted or unquoted == "" else unquoted
            for k, quoted, unquoted in _CHALLENGE_PARAM.findall(rest)}


def digest_credentials(challenge: dict[str, str], method: str, uri: str, user: str,
                       password: str, nc: int = 1, cnonce: str | None = None) -> str:
    """An ``Authorization``/``Proxy-Authorization`` value answering ``challenge``
    (RFC 2617 MD5, with qop=auth when the challenge offers it), as any UA makes it."""
    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()
    realm, nonce = challenge["realm"], challenge["nonce"]
    ha1, ha2 = md5(f"{user}:{realm}:{password}"), md5(f"{method}:{uri}")
    fields = [f'username="{user}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"',
              "algorithm=MD5"]
    if "auth" in [q.strip() for q in challenge.get("qop", "").split(",")]:
        cnonce = cnonce or os.urandom(8).hex()
        count = f"{nc:08x}"
        response = md5(f"{ha1}:{nonce}:{count}:{cnonce}:auth:{ha2}")
        fields += ["qop=auth", f"nc={count}", f'cnonce="{cnonce}"']
    else:
        response = md5(f"{ha1}:{nonce}:{ha2}")
    fields.append(f'response="{response}"')
    return "Digest " + ", ".join(fields)


class SipUa:
    """A SIP UA for tests that talks to one proxy (127.0.0.1:``port``) over ``transport``
    (udp, tcp or tls) from the loopback address ``source``, and answers 401/407 with
    HTTP Digest when it has a ``password``, reusing the last challenge with a growing
    nonce count as stock UAs do.  One transaction at a time.

    TLS verifies the proxy's certificate against ``ca_file`` (its IP address SAN).
    ``sent`` keeps every request as sent, ``received`` every message that came back."""

    def __init__(self, port: int, *, transport: str = "udp", source: str = "127.0.0.1",
                 user: str = "alice", password: str | None = None, domain: str = "example.com",
                 ca_file: Path | None = None, timeout: float = 3.0) -> None:
        self.port, self.transport, self.source = port, transport.lower(), source
        self.user, self.password, self.domain = user, password, domain
        self.timeout = timeout
        self.challenge: tuple[str, dict[str, str]] | None = None   # (header name, params)
        self.nc = 0
        self.cseq = 0
        self.sent: list[SipMessage] = []
        self.received: list[SipMessage] = []
        self._buffer = b""
        if self.transport == "udp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind((source, 0))
        else:
            raw = socket.socket()
            raw.bind((source, 0))
            raw.settimeout(timeout)
            raw.connect(("127.0.0.1", port))
            if self.transport == "tls":
                import ssl
                context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                raw = context.wrap_socket(raw, server_hostname="127.0.0.1")
            self.sock = raw
        self.sock.settimeout(timeout)
        self.local_port = self.sock.getsockname()[1]

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{self.domain}"

    @property
    def contact(self) -> str:
        suffix = "" if self.transport == "udp" else f";transport={self.transport}"
        return f"<sip:{self.user}@{self.source}:{self.local_port}{suffix}>"

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- the wire --------------------------------------------------------------
    def send(self, message: SipMessage | bytes) -> None:
        data = message.serialize() if isinstance(message, SipMessage) else message
        if isinstance(message, SipMessage):
            self.sent.append(message)
        if self.transport == "udp":
            self.sock.sendto(data, ("127.0.0.1", self.port))
        else:
            self.sock.sendall(data)

    def receive(self, timeout: float | None = None) -> SipMessage | None:
        """The next message from the proxy, or None after ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if self.transport != "udp":
                message = self._frame()
                if message is not None:
                    self.received.append(message)
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65535)
            except (socket.timeout, TimeoutError):
                return None
            except OSError:
                return None
            if self.transport == "udp":
                message = parse(data)
                self.received.append(message)
                return message
            if not data:
                return None
            self._buffer += data

    def _frame(self) -> SipMessage | None:
        head, sep, rest = self._buffer.partition(b"\r\n\r\n")
        while not sep and self._buffer.startswith(b"\r\n"):     # keep-alive CRLFs
            self._buffer = self._buffer[2:]
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
        if not sep:
            return None
        match = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
        length = int(match.group(1)) if match else 0
        if len(rest) < length:
            return None
        self._buffer = rest[length:]
        return parse(head + sep + rest[:length])

    def via(self) -> str:
        return (f"SIP/2.0/{self.transport.upper()} {self.source}:{self.local_port};rport;"
                f"branch=z9hG4bK-ua{next(_counter)}x{os.getpid()}")

    # -- transactions ------------------------------------------------------------
    def transact(self, request: SipMessage, timeout: float | None = None) -> SipMessage | None:
        """Send ``request`` (a fresh top Via) and return its final response (None: none);
        a non-2xx final answer to an INVITE is acknowledged, as RFC 3261 17.1.1.3 says."""
        request = request.replace("Via", self.via())
        self.send(request)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            message = self.receive(deadline - time.monotonic())
            if message is None:
                return None
            if message.is_request or message.get("Call-ID") != request.get("Call-ID") \
                    or message.cseq != request.cseq:
                continue
            if (message.status or 0) < 200:
                continue
            if request.method == "INVITE" and (message.status or 0) >= 300:
                self.send(self._ack_for(request, message))
            return message
        return None

    @staticmethod
    def _ack_for(invite: SipMessage, answer: SipMessage) -> SipMessage:
        headers = [("Via", invite.get("Via") or ""), ("Max-Forwards", "70"),
                   ("From", invite.get("From") or ""), ("To", answer.get("To") or ""),
                   ("Call-ID", invite.get("Call-ID") or ""),
                   ("CSeq", f"{invite.cseq[0]} ACK")]
        headers += [("Route", r) for r in invite.get_all("Route")]
        headers.append(("Content-Length", "0"))
        return SipMessage(RequestLine("ACK", invite.request_uri or ""), tuple(headers), b"")

    def credentials(self, method: str, uri: str) -> tuple[str, str] | None:
        """(header name, value) answering the last challenge with the next nonce count."""
        if self.challenge is None or self.password is None:
            return None
        name, params = self.challenge
        self.nc += 1
        header = "Authorization" if name.lower() == "www-authenticate" else "Proxy-Authorization"
        return header, digest_credentials(params, method, uri, self.user, self.password, self.nc)

    def build(self, method: str, uri: str, *, to: str | None = None,
              call_id: str | None = None, from_tag: str | None = None,
              to_tag: str | None = None, cseq: int | None = None,
              headers: list[tuple[str, str]] | None = None, body: bytes = b"",
              content_type: str | None = None, routes: list[str] | None = None) -> SipMessage:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        extra = [("Route", r) for r in routes or []]
        if method in ("REGISTER", "INVITE"):
            extra.append(("Contact", self.contact))
        extra += headers or []
        return make_request(method, uri, from_uri=self.aor, to_uri=to or self.aor,
                            call_id=call_id or f"ua-{os.getpid()}-{next(_counter)}@{self.source}",
                            cseq=cseq, from_tag=from_tag or f"t{next(_counter)}", to_tag=to_tag,
                            extra_headers=extra, body=body, content_type=content_type)

    def request(self, request: SipMessage, *, preemptive: bool = True,
                timeout: float | None = None) -> SipMessage | None:
        """Send ``request``; when challenged (401/407) and it has a password, once more
        with credentials and the next CSeq.  ``preemptive``: send credentials from the
        last challenge right away (nonce count + 1), as UAs that cache them do."""
        method, uri = request.method, request.request_uri or ""
        if preemptive:
            creds = self.credentials(method, uri)
            if creds is not None:
                request = request.replace(*creds)
        answer = self.transact(request, timeout)
        if answer is None or answer.status not in (401, 407) or self.password is None:
            return answer
        name = "WWW-Authenticate" if answer.status == 401 else "Proxy-Authenticate"
        value = answer.get(name)
        if value is None:
            return answer
        self.challenge, self.nc = (name, parse_challenge(value)), 0
        self.cseq = max(self.cseq, request.cseq[0]) + 1
        retry = request.remove("Authorization").remove("Proxy-Authorization")
        retry = retry.replace("CSeq", f"{self.cseq} {method}")
        creds = self.credentials(method, uri)
        assert creds is not None
        return self.transact(retry.replace(*creds), timeout)

    def register(self, expires: int = 600, **kwargs: Any) -> SipMessage | None:
        return self.request(self.build("REGISTER", f"sip:{self.domain}",
                                       headers=[("Expires", str(expires))]), **kwargs)

    def message(self, to_user: str, text: bytes, **kwargs: Any) -> SipMessage | None:
        return self.request(self.build("MESSAGE", f"sip:{to_user}@{self.domain}",
                                       to=f"sip:{to_user}@{self.domain}", body=text,
                                       content_type="text/plain"), **kwargs)

    def call(self, to_user: str, sdp: bytes = b"", *, hold: float = 0.0) -> dict[str, Any]:
        """INVITE (answering the challenge), ACK along the Record-Route set, BYE
        (answering its challenge with the cached one); the finals of both."""
        invite = self.build("INVITE", f"sip:{to_user}@{self.domain}",
                            to=f"sip:{to_user}@{self.domain}", body=sdp,
                            content_type="application/sdp" if sdp else None)
        ok = self.request(invite, timeout=self.timeout + 5)
        result: dict[str, Any] = {"invite": ok, "bye": None}
        if ok is None or ok.status != 200:
            return result
        sent = self.sent[-1]
        routes = list(reversed(ok.get_all("Record-Route")))
        target = parse_address_uri(ok.get("Contact") or "")
        ack = self.build("ACK", target, to=f"sip:{to_user}@{self.domain}",
                         call_id=sent.get("Call-ID"), from_tag=sent.from_tag, cseq=sent.cseq[0],
                         to_tag=ok.to_tag, routes=routes)
        self.send(ack.replace("Via", self.via()))
        time.sleep(hold)
        bye = self.build("BYE", target, to=f"sip:{to_user}@{self.domain}",
                         call_id=sent.get("Call-ID"), from_tag=sent.from_tag,
                         to_tag=ok.to_tag, routes=routes)
        result["bye"] = self.request(bye)
        return result


def parse_address_uri(value: str) -> str:
    """The URI of a name-addr or addr-spec header value (Contact, Record-Route)."""
    value = value.strip()
    if "<" in value:
        return value[value.index("<") + 1:value.index(">")]
    return value.split(";", 1)[0]


def captured_credentials(proxy: "ProxyHandle", user: str, password: str, source: str,
                         method: str, target: str, digest_uri: str | None = None) -> str:
    """The Proxy-Authorization ``user``'s UA sends after ``proxy``'s 407 to its
    ``method`` to ``target`` (a text body), with ``digest_uri`` as the digest ``uri``
    (default the target): what a hop in front of the proxy holds, nonce count 1, unused."""
    ua = SipUa(proxy.port, user=user, password=password, source=source)
    try:
        answer = ua.transact(ua.build(method, target, to=target, body=b"challenge me",
                                      content_type="text/plain"))
        assert answer is not None and answer.status == 407, answer
        return digest_credentials(parse_challenge(answer.get("Proxy-Authenticate") or ""),
                                  method, digest_uri or target, user, password, 1)
    finally:
        ua.close()


def message_with_credentials(proxy: "ProxyHandle", user: str, source: str, target: str,
                             credentials: str, text: bytes) -> SipMessage | None:
    """A MESSAGE from ``user`` to ``target`` carrying ``credentials`` someone else made
    (the sender knows no password), and the proxy's answer."""
    ua = SipUa(proxy.port, user=user, source=source)
    try:
        request = ua.build("MESSAGE", target, to=target, body=text, content_type="text/plain")
        return ua.transact(request.replace("Proxy-Authorization", credentials))
    finally:
        ua.close()
