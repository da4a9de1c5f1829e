"""An off-path stranger against an ``e2m-phone``: plain sockets, no SIP stack.

What a stranger on the network can do to a phone is send it datagrams, open TCP
connections to it, and answer HTTP requests the phone makes to it.  This module gives
the tests (``tests/e2e/test_phone_stranger.py``) and the phone soak
(``bench/phone_soak.py``) those three seats:

- ``sip_request`` / ``sip_response``: raw SIP text, framed as the caller asks (a
  Content-Length that matches unless told otherwise);
- ``UdpStranger``: one UDP socket; ``send``, ``answers`` (responses to one Call-ID),
  ``probe`` (an OPTIONS round trip: the phone's event loop is alive and answering);
- ``tcp_probe``: the same over a fresh TCP connection;
- ``CertServer``: an HTTP server on loopback whose every answer is hostile in one
  chosen way (bad status line, bad chunk size, one header byte at a time, silence, a
  body larger than any certificate, a redirect) or a given body;
- ``FakeRegistrar``: a UDP "registrar" that answers every request 200 with the headers
  it is given (how a policy reaches a phone as the answer to its own REGISTER);
- ``rss_kib``: a process's resident set size from ``/proc``.

Nothing here prints a body.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from e2m_plugins.sip import SipMessage, parse

__all__ = ["sip_request", "sip_response", "UdpStranger", "tcp_probe", "tcp_flood", "CertServer",
           "FakeRegistrar", "rss_kib", "HOST", "final_answer_over"]

HOST = "127.0.0.1"
_counter = iter(range(1, 1 << 62))


def _branch() -> str:
    return f"z9hG4bK-str{next(_counter)}x{os.getpid()}"


def sip_request(method: str, target: str, *, via: str, call_id: str | None = None,
                cseq: int = 1, from_: str = "<sip:stranger@example.net>;tag=s1",
                to: str = "<sip:bob@example.com>", headers: Iterable[tuple[str, str]] = (),
                body: bytes = b"", content_type: str | None = None,
                content_length: int | None = None) -> bytes:
    """A request as bytes.  ``via`` is the sent-by part (``SIP/2.0/UDP host:port``)."""
    call_id = call_id or uuid.uuid4().hex
    lines = [f"{method} {target} SIP/2.0", f"Via: {via};rport;branch={_branch()}",
             "Max-Forwards: 70", f"From: {from_}", f"To: {to}", f"Call-ID: {call_id}",
             f"CSeq: {cseq} {method}"]
    if method == "INVITE":
        lines.append("Contact: <sip:stranger@" + via.split()[-1] + ">")
    lines += [f"{n}: {v}" for n, v in headers]
    if body and content_type:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def sip_response(status: int, reason: str, *, method: str, via: str, call_id: str | None = None,
                 cseq: int = 1, headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
                 content_type: str | None = None) -> bytes:
    """A response that answers nothing the phone sent (a stray one)."""
    call_id = call_id or uuid.uuid4().hex
    lines = [f"SIP/2.0 {status} {reason}", f"Via: {via};branch={_branch()}",
             "From: <sip:bob@example.com>;tag=b1", "To: <sip:stranger@example.net>;tag=s2",
             f"Call-ID: {call_id}", f"CSeq: {cseq} {method}"]
    lines += [f"{n}: {v}" for n, v in headers]
    if body and content_type:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _status_of(data: bytes) -> int | None:
    if not data.startswith(b"SIP/2.0 "):
        return None
    try:
        return int(data[8:11])
    except ValueError:
        return None


def _call_id_of(data: bytes) -> bytes | None:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"call-id", b"i"):
            return value.strip()
    return None


class UdpStranger:
    """One UDP socket on 127.0.0.1 that talks to a phone on ``port``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.bind((HOST, 0))
        self.local_port = self.sock.getsockname()[1]
        self.via = f"SIP/2.0/UDP {HOST}:{self.local_port}"
        self.target = f"sip:bob@{HOST}:{port}"
        self._kept: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (HOST, self.port))

    def request(self, method: str, **kwargs: object) -> tuple[bytes, str]:
        """Send ``method`` to the phone; returns (bytes sent, Call-ID)."""
        call_id = str(kwargs.pop("call_id", None) or uuid.uuid4().hex)
        data = sip_request(method, self.target, via=self.via, call_id=call_id,
                           **kwargs)  # type: ignore[arg-type]
        self.send(data)
        return data, call_id

    def drain(self, timeout: float = 0.0) -> list[bytes]:
        """Every datagram that arrived (waiting up to ``timeout`` for the first)."""
        out = []
        self.sock.settimeout(timeout if timeout > 0 else None)
        if timeout <= 0:
            self.sock.setblocking(False)
        try:
            while True:
                data, _ = self.sock.recvfrom(65535)
                out.append(data)
                self.sock.setblocking(False)
        except (BlockingIOError, socket.timeout, TimeoutError):
            pass
        finally:
            self.sock.setblocking(True)
        self._kept = (self._kept + out)[-200:]
        return out

    def final(self, call_id: str, timeout: float) -> int | None:
        """The status of the first final response to ``call_id`` within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        wanted = call_id.encode()
        for data in self._kept:
            status = _status_of(data)
            if status and status >= 200 and _call_id_of(data) == wanted:
                self._kept.remove(data)
                return status
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                return None
            status = _status_of(data)
            if status and status >= 200 and _call_id_of(data) == wanted:
                return status
            self._kept = (self._kept + [data])[-200:]

    def answered(self, data_call_id: str, timeout: float) -> bytes | None:
        """The first final response to ``data_call_id`` as bytes (or None)."""
        deadline = time.monotonic() + timeout
        wanted = data_call_id.encode()
        while True:
            for data in self._kept:
                status = _status_of(data)
                if status and status >= 200 and _call_id_of(data) == wanted:
                    self._kept.remove(data)
                    return data
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                return None
            self._kept = (self._kept + [data])[-200:]

    def probe(self, timeout: float = 2.0) -> float | None:
        """Seconds an OPTIONS took to be answered (None: no answer within ``timeout``)."""
        start = time.monotonic()
        _, call_id = self.request("OPTIONS")
        status = self.final(call_id, timeout)
        return time.monotonic() - start if status is not None else None

    def close(self) -> None:
        self.sock.close()


def final_answer_over(sock: socket.socket, timeout: float) -> SipMessage | None:
    """The first final answer that arrives on the connected stream ``sock`` within
    ``timeout`` (provisionals skipped, each answer's body by its Content-Length); None
    when the peer closes or nothing final comes."""
    buffer = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
        while b"\r\n\r\n" in buffer:
            head, _, rest = buffer.partition(b"\r\n\r\n")
            answer = parse(head + b"\r\n\r\n")
            buffer = rest[int(answer.get("Content-Length") or 0):]
            if (answer.status or 0) >= 200:
                return answer
    return None


def tcp_probe(port: int, timeout: float = 3.0) -> float | None:
    """An OPTIONS over a fresh TCP connection: seconds to the final answer, or None."""
    start = time.monotonic()
    try:
        sock = socket.create_connection((HOST, port), timeout=timeout)
    except OSError:
        return None
    try:
        local = sock.getsockname()[1]
        call_id = uuid.uuid4().hex
        sock.sendall(sip_request("OPTIONS", f"sip:bob@{HOST}:{port};transport=tcp",
                                 via=f"SIP/2.0/TCP {HOST}:{local}", call_id=call_id))
        buffer = b""
        while time.monotonic() - start < timeout:
            sock.settimeout(max(0.05, timeout - (time.monotonic() - start)))
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, TimeoutError, OSError):
                return None
            if not chunk:
                return None
            buffer += chunk
            status = _status_of(buffer)
            if status and status >= 200 and b"\r\n\r\n" in buffer:
                return time.monotonic() - start
        return None
    finally:
        sock.close()


def tcp_flood(port: int, count: int, *, close_every: int = 2,
              pause: float = 0.002) -> list[socket.socket]:
    """Open ``count`` TCP connections to ``port`` (non-blocking connects, nothing sent);
    every ``close_every``-th is closed again at once (0: none), so the phone sees
    connections come and go as well as pile up.  Returns the ones still open."""
    held: list[socket.socket] = []
    for index in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect((HOST, port))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            sock.close()
            continue
        if close_every and index % close_every == close_every - 1:
            time.sleep(pause)
            sock.close()
        else:
            held.append(sock)
        time.sleep(pause)
    return held


# --------------------------------------------------------------------------- HTTP

class CertServer:
    """A loopback HTTP server, one hostile behaviour for every request.

    ``mode``: ``bad_status`` (a status line that is no HTTP), ``bad_chunk`` (chunked,
    with a chunk size that is no number), ``slowloris`` (one header byte every
    ``drip`` seconds, for ever), ``silent`` (accepts, reads, never answers), ``huge``
    (a 2 MiB body), ``redirect`` (302 to ``redirect_to``), ``body`` (200 with
    ``body``).  ``hosts``: the loopback addresses it listens on (one port for all).
    ``hits`` counts requests per host.
    """

    def __init__(self, mode: str, *, hosts: Sequence[str] = (HOST,), body: bytes = b"",
                 drip: float = 1.5, redirect_to: str = "") -> None:
        self.mode = mode
        self.body = body
        self.drip = drip
        self.redirect_to = redirect_to
        self.hits: dict[str, int] = {}
        self.connections = 0
        self.active = 0           # connections being served now
        self.max_active = 0       # the most served at once
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listeners: list[socket.socket] = []
        port = 0
        for host in hosts:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(64)
            self._listeners.append(sock)
        self.port = port
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def url(self, host: str = HOST, path: str = "/cert.der") -> str:
        return f"http://{host}:{self.port}{path}"

    @property
    def total_hits(self) -> int:
        with self._lock:
            return sum(self.hits.values())

    def _accept(self) -> None:
        silent: dict[socket.socket, tuple[str, bytearray]] = {}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(self._listeners + list(silent), [], [], 0.1)
                # A client ends one fetch (its FIN) before it opens the next; on loopback
                # the FIN is queued before the new connection is.  Reading every silent
                # connection's end again just before accepting keeps ``active`` the
                # number of connections the client really holds, not one that lags it.
                if silent:
                    ended, _, _ = select.select(list(silent), [], [], 0)
                    for conn in ended:
                        self._read_silent(conn, silent)
                for listener in (sock for sock in ready if sock in self._listeners):
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        continue
                    host = listener.getsockname()[0]
                    with self._lock:
                        self.connections += 1
                    if self.mode == "silent":
                        conn.setblocking(False)
                        silent[conn] = (host, bytearray())
                        with self._lock:
                            self.active += 1
                            self.max_active = max(self.max_active, self.active)
                        continue
                    thread = threading.Thread(target=self._serve, args=(conn, host),
                                              daemon=True)
                    thread.start()
                    self._threads.append(thread)
        finally:
            for conn in silent:
                conn.close()

    def _read_silent(self, conn: socket.socket,
                     silent: dict[socket.socket, tuple[str, bytearray]]) -> None:
        """Read what a silent connection sent; count its request once its header is
        complete, and drop the connection when the client ends it."""
        host, request = silent[conn]
        complete = b"\r\n\r\n" in request
        while True:            # to the end of what is queued: a request and its FIN
            try:
                chunk = conn.recv(4096)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                del silent[conn]
                conn.close()
                with self._lock:
                    self.active -= 1
                break
            if len(request) < 65536:
                request += chunk
        if not complete and b"\r\n\r\n" in request:
            with self._lock:
                self.hits[host] = self.hits.get(host, 0) + 1

    def _serve(self, conn: socket.socket, host: str) -> None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            with self._lock:
                self.hits[host] = self.hits.get(host, 0) + 1
            self._answer(conn)
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self.active -= 1

    def _answer(self, conn: socket.socket) -> None:
        mode = self.mode
        if mode == "bad_status":
            conn.sendall(b"HTTQ/9 two hundred\r\nContent-Length: 3\r\n\r\nabc")
        elif mode == "bad_chunk":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"zz-not-hex\r\nabc\r\n0\r\n\r\n")
        elif mode == "slowloris":
            head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100000
            for byte in head:
                if self._stop.wait(self.drip):
                    return
                conn.sendall(bytes([byte]))
        elif mode == "huge":
            size = 2 << 20
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/pkix-cert\r\n"
                         b"Content-Length: %d\r\n\r\n" % size)
            block = b"\x30" * 65536
            for _ in range(size // len(block)):
                conn.sendall(block)
        elif mode == "redirect":
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: " + self.redirect_to.encode()
                         + b"\r\nContent-Length: 0\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/pkix-cert\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.body)
                         + self.body)

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=2)
        for sock in self._listeners:
            sock.close()
        for thread in self._threads:
            thread.join(timeout=0.5)


# --------------------------------------------------------------------------- registrar

class FakeRegistrar:
    """A UDP server on 127.0.0.1 answering every request 200, REGISTER with ``headers``
    (e.g. a Proxy-Body-Policy): a policy reaching the phone in the answer to its own
    request, the one way issue 12 leaves for learning one."""

    def __init__(self, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.headers = list(headers)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.uri = f"sip:{HOST}:{self.port}"
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            if data.startswith(b"SIP/2.0") or b"\r\n\r\n" not in data:
                continue
            head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
            method = head[0].split(" ", 1)[0]
            self.requests.append(method)
            if method == "ACK":
                continue
            keep = [h for h in head[1:] if h.split(":", 1)[0].strip().lower()
                    in ("via", "v", "from", "f", "call-id", "i", "cseq")]
            to = next((h for h in head[1:] if h.split(":", 1)[0].strip().lower() in ("to", "t")),
                      "To: <sip:x@invalid>")
            extra = []
            if method == "REGISTER":
                contact = next((h for h in head[1:] if h.lower().startswith(("contact:", "m:"))),
                               None)
                if contact:
                    extra.append(contact.split(";expires", 1)[0] + ";expires=300")
                extra += [f"{n}: {v}" for n, v in self.headers]
            lines = ["SIP/2.0 200 OK", *keep, to + ";tag=reg1", *extra, "Content-Length: 0"]
            try:
                self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), addr)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


# --------------------------------------------------------------------------- memory

def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0
