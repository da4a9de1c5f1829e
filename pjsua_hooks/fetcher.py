"""Proxy certificates fetched off the SIP loop, within limits a stranger cannot stretch.

A policy's ``cert-url`` names a server the phone does not know.  Fetching it on the
loop that answers SIP let one slow or broken server stop the phone (issue 13, rows
1-4).  Here:

- ``check_url`` refuses before any connection: a scheme other than http/https, user
  information, a host other than the policy's own unless the configuration names it
  (``[phone] cert_url_hosts``, ``[e2m] cert_url_hosts``: where a deployment serves its
  proxies' certificates), a port below 1024 other than 80 and 443, one of the phone's
  own SIP ports, control characters, more than 2048 characters;
- ``http_get`` is a small HTTP/1.1 GET on a raw socket (or TLS, verified with the
  system's CAs) with one **total** deadline for everything (connect, TLS handshake,
  request, every read), a size cap on the header and the body, status 200 only
  (redirects are not followed), strict chunked decoding;
- ``CertificateFetcher`` runs them on at most ``max_parallel`` worker threads, one
  per host at a time, with a cool-down per host after a failure, and hands results
  back through a queue that the owner thread drains (pjsua and the engine's
  certificate store are only touched there).

Every exception of a fetch (``http.client``, ``ssl``, ``socket``, anything) ends at the
worker's boundary as a failed result carrying the exception's class name and a
short reason; nothing of a body is kept in it.
"""

from __future__ import annotations

import itertools
import queue
import re
import select
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

from e2m_plugins.uri import host_key

__all__ = ["CertificateFetcher", "FetchResult", "FetchError", "FetchRefused", "check_url",
           "http_get"]

_MAX_URL = 2048
_MAX_HEADER = 16384
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")


class FetchError(Exception):
    """A fetch that failed on the wire (deadline, size, status, framing)."""


class FetchRefused(FetchError):
    """A URL refused before any connection."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str


def check_url(url: str, policy_host: str, *, allowed_hosts: Collection[str] = (),
              own_ports: Collection[int] = ()) -> Target:
    """The parts of ``url`` if the phone may fetch it for ``policy_host``; FetchRefused."""
    if not isinstance(url, str) or not url or len(url) > _MAX_URL or _CONTROL.search(url):
        raise FetchRefused("cert-url is empty, too long or has control characters or spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise FetchRefused("cert-url does not parse") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchRefused("cert-url scheme is not http or https")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise FetchRefused("cert-url carries userinfo")
    host = parts.hostname
    if not host:
        raise FetchRefused("cert-url has no host")
    if host_key(host) != host_key(policy_host) \
            and host_key(host) not in {host_key(h) for h in allowed_hosts}:
        raise FetchRefused("cert-url host is neither the policy's own host nor one of "
                           "cert_url_hosts")
    if port is None:
        port = 443 if scheme == "https" else 80
    if port == 0 or (port < 1024 and port not in (80, 443)):
        raise FetchRefused(f"cert-url port {port} is not 80, 443 or above 1023")
    if port in own_ports:
        raise FetchRefused(f"cert-url port {port} is one of the phone's own SIP ports")
    if parts.fragment:
        raise FetchRefused("cert-url has a fragment")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port, path)


# --------------------------------------------------------------------------- the GET

class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise FetchError("total deadline passed")
        return left


def _wait(sock: socket.socket, write: bool, deadline: _Deadline) -> None:
    readers, writers = ([], [sock]) if write else ([sock], [])
    if not any(select.select(readers, writers, [], deadline.left())):
        raise FetchError("total deadline passed")


def _connect(target: Target, deadline: _Deadline) -> socket.socket:
    # getaddrinfo cannot be interrupted; it runs on a worker thread, never the loop.
    infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    if not infos:
        raise FetchError("host does not resolve")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err not in (0, 115, 11):          # EINPROGRESS, EAGAIN
            raise OSError(err, "connect failed")
        _wait(sock, True, deadline)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, "connect failed")
        if target.scheme == "https":
            context = ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=target.host,
                                       do_handshake_on_connect=False)
            while True:
                try:
                    sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    _wait(sock, False, deadline)
                except ssl.SSLWantWriteError:
                    _wait(sock, True, deadline)
        return sock
    except BaseException:
        sock.close()
        raise


def _send_all(sock: socket.socket, data: bytes, deadline: _Deadline) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, ssl.SSLWantWriteError):
            _wait(sock, True, deadline)
            continue
        except ssl.SSLWantReadError:
            _wait(sock, False, deadline)
            continue
        view = view[sent:]


def _recv(sock: socket.socket, deadline: _Deadline) -> bytes:
    while True:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return sock.recv(65536)
        try:
            return sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            _wait(sock, False, deadline)
        except ssl.SSLWantWriteError:
            _wait(sock, True, deadline)


def _dechunk(data: bytes, limit: int) -> bytes | None:
    """The body of a complete chunked encoding; None while incomplete; FetchError."""
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            if len(data) - pos > 64:
                raise FetchError("chunk size line too long")
            return None
        size_text = data[pos:end].split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 8 or not re.fullmatch(rb"[0-9A-Fa-f]+", size_text):
            raise FetchError("bad chunk size")
        size = int(size_text, 16)
        if len(out) + size > limit:
            raise FetchError(f"body larger than {limit} bytes")
        start = end + 2
        if size == 0:
            return bytes(out)   # trailers ignored
        if len(data) < start + size + 2:
            return None
        if data[start + size:start + size + 2] != b"\r\n":
            raise FetchError("chunk not followed by CRLF")
        out += data[start:start + size]
        pos = start + size + 2


def http_get(target: Target, *, timeout: float, max_bytes: int,
             user_agent: str = "e2m-phone") -> bytes:
    """GET ``target``: the body of a 200 answer, all within ``timeout`` seconds."""
    deadline = _Deadline(timeout)
    sock = _connect(target, deadline)
    try:
        default = 443 if target.scheme == "https" else 80
        host = f"[{target.host}]" if ":" in target.host else target.host
        authority = host if target.port == default else f"{host}:{target.port}"
        _send_all(sock, (f"GET {target.path} HTTP/1.1\r\nHost: {authority}\r\n"
                         f"User-Agent: {user_agent}\r\nAccept: application/pkix-cert\r\n"
                         "Connection: close\r\n\r\n").encode("ascii"), deadline)
        data = b""
        head: bytes | None = None
        length: int | None = None
        chunked = False
        body_at = 0
        while True:
            chunk = _recv(sock, deadline)
            data += chunk
            if head is None:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > _MAX_HEADER:
                        raise FetchError(f"header larger than {_MAX_HEADER} bytes")
                    if not chunk:
                        raise FetchError("connection closed before the header ended")
                    continue
                head, body_at = data[:end], end + 4
                lines = head.split(b"\r\n")
                status = _STATUS.fullmatch(lines[0])
                if status is None:
                    raise FetchError("bad HTTP status line")
                if status.group(1) != b"200":
                    raise FetchError(f"HTTP {status.group(1).decode()} (only 200 is taken)")
                for line in lines[1:]:
                    name, colon, value = line.partition(b":")
                    if not colon:
                        raise FetchError("bad HTTP header line")
                    name, value = name.strip().lower(), value.strip()
                    if name == b"content-length":
                        if not value.isdigit() or length is not None:
                            raise FetchError("bad Content-Length")
                        length = int(value)
                        if length > max_bytes:
                            raise FetchError(f"body larger than {max_bytes} bytes")
                    elif name == b"transfer-encoding":
                        if value.lower() != b"chunked":
                            raise FetchError("unsupported Transfer-Encoding")
                        chunked = True
            body = data[body_at:]
            if chunked:
                whole = _dechunk(body, max_bytes)
                if whole is not None:
                    return whole
                if not chunk:
                    raise FetchError("connection closed inside the chunked body")
            elif length is not None:
                if len(body) >= length:
                    return body[:length]
                if not chunk:
                    raise FetchError("connection closed before Content-Length bytes")
            else:
                if len(body) > max_bytes:
                    raise FetchError(f"body larger than {max_bytes} bytes")
                if not chunk:
                    return body
            if len(body) > max_bytes + 65536:
                raise FetchError(f"body larger than {max_bytes} bytes")
    finally:
        sock.close()


# --------------------------------------------------------------------------- the pool

@dataclass(frozen=True)
class FetchResult:
    host: str
    url: str
    data: bytes | None          # the body, or None when it failed
    error: str = ""             # the exception's class name
    detail: str = ""            # a short reason (no body)


class CertificateFetcher:
    """At most ``max_parallel`` fetches at once, one per host, ``cool_down`` seconds
    between failed attempts for a host.  ``submit`` on the owner thread; ``results``
    drains what the workers finished.  ``get`` is the download (``http_get`` with the
    phone's limits; tests may give another)."""

    def __init__(self, *, timeout: float, max_bytes: int, max_parallel: int = 4,
                 cool_down: float = 30.0, allowed_hosts: Collection[str] = (),
                 own_ports: Callable[[], Collection[int]] = lambda: (),
                 get: Callable[..., bytes] = http_get, max_hosts: int = 512) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_parallel = max_parallel
        self.cool_down = cool_down
        self.allowed_hosts = tuple(allowed_hosts)
        self.own_ports = own_ports
        self._get = get
        self._max_hosts = max_hosts
        # (rank, order, job): an urgent fetch (a ringing call's answer waits for it)
        # goes before the others, each in the order it came; None stops a worker
        self._jobs: queue.PriorityQueue[tuple[int, int, tuple[str, str, Target] | None]] = \
            queue.PriorityQueue()
        self._order = itertools.count()
        self._done: queue.SimpleQueue[FetchResult] = queue.SimpleQueue()
        self._busy: set[str] = set()                     # hosts queued or being fetched
        # (host, URL) -> its last failure: per URL, so one caller's bad URL for a host
        # does not keep another's good one for it out (review 166 K1)
        self._tried: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def busy(self) -> bool:
        with self._lock:
            return bool(self._busy)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._busy)

    def submit(self, host: str, url: str, *, force: bool = False,
               urgent: bool = False) -> str | None:
        """Queue a fetch of ``url`` for ``host`` (``urgent``: before every fetch not so,
        review 164 K1: a caller's 16 silent hosts held the queue while another call's
        answer waited).  Returns None when queued or when the host is busy or cooling
        down (say nothing: it was reported before), else why it is refused (report it
        once: the caller then cools the host down too)."""
        key = host_key(host)
        now = time.monotonic()
        with self._lock:
            if self._closed or key in self._busy:
                return None
            if self._cooling(key, url, now, force):
                return None
            self._note_failure((key, url), now)        # a success removes it again
        try:
            target = check_url(url, host, allowed_hosts=self.allowed_hosts,
                               own_ports=set(self.own_ports()))
        except FetchRefused as exc:
            return str(exc)
        with self._lock:
            self._busy.add(key)
            if len(self._workers) < min(self.max_parallel, len(self._busy)):
                worker = threading.Thread(target=self._work, name="e2m-cert-fetch",
                                          daemon=True)
                self._workers.append(worker)
                worker.start()
        self._jobs.put((0 if urgent else 1, next(self._order), (host, url, target)))
        return None

    def refused(self, host: str, url: str) -> None:
        """What was fetched for ``host`` from ``url`` was refused (not its certificate,
        not the announced one): cool that URL down as a failed fetch, or the policy
        still wanting it fetches again at once (review 164 K3: 48 GETs in 5 s)."""
        with self._lock:
            self._note_failure((host_key(host), url), time.monotonic())

    def would_fetch(self, host: str, url: str) -> bool:
        """``submit`` would queue ``url`` for ``host`` now, or it is being fetched: not
        cooling down after a failure (a call waits only for what can come)."""
        with self._lock:
            return not self._closed and (host_key(host) in self._busy or not self._cooling(
                host_key(host), url, time.monotonic(), False))

    def _cooling(self, key: str, url: str, now: float, force: bool) -> bool:
        last = self._tried.get((key, url))
        return last is not None and now - last < (min(2.0, self.cool_down) if force
                                                  else self.cool_down)

    def _note_failure(self, key: tuple[str, str], when: float) -> None:
        self._tried[key] = when
        self._tried.move_to_end(key)
        while len(self._tried) > self._max_hosts:
            self._tried.popitem(last=False)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()[2]
            if job is None:
                return
            host, url, target = job
            try:
                data = self._get(target, timeout=self.timeout, max_bytes=self.max_bytes)
                result = FetchResult(host, url, bytes(data))
            except Exception as exc:  # noqa: BLE001 - the thread boundary: nothing escapes
                result = FetchResult(host, url, None, type(exc).__name__,
                                     _reason(exc))
            with self._lock:
                self._busy.discard(host_key(host))
                if result.data is not None:
                    self._tried.pop((host_key(host), url), None)
                else:
                    self._note_failure((host_key(host), url), time.monotonic())
            self._done.put(result)

    def results(self) -> list[FetchResult]:
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        """Stop taking work; workers finish their fetch (each within its deadline)."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        for _ in workers:
            self._jobs.put((2, next(self._order), None))


def _reason(exc: BaseException) -> str:
    """A short, body-free reason: our own errors say what they are; others give
    their class and errno only (their text can quote what the server sent)."""
    if isinstance(exc, FetchError):
        return str(exc)[:200]
    errno = getattr(exc, "errno", None)
    return f"{type(exc).__name__}" + (f" (errno {errno})" if errno else "")
