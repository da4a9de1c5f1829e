"""The pieces the phone uses against a stranger, in process (issue 13): the cert-url
rules and the bounded HTTP GET (``pjsua_hooks/fetcher.py``), the fetch pool's limits,
the TCP guard's counting and its SYN gate on a real listening socket
(``pjsua_hooks/tcpguard.py``), and the text printer's escaping (``cli.printable``).
None of them needs pjsua2; they live here with the phone's other tests."""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest

from e2m_lab.stranger import CertServer
from pjsua_hooks.cli import Printer, printable
from pjsua_hooks.fetcher import CertificateFetcher, FetchError, FetchRefused, check_url, http_get
from pjsua_hooks.tcpguard import TP_CONNECTED, TP_DESTROY, TcpGuard


# --------------------------------------------------------------------------- cert-url rules

@pytest.mark.parametrize("url, why", [
    ("ftp://p.example.com/c", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("http://a:b@p.example.com/c", "userinfo"),
    ("http://a@p.example.com/c", "userinfo"),
    ("http://other.example.com/c", "own host"),
    ("http://p.example.com:25/c", "port 25"),
    ("http://p.example.com:0/c", "port 0"),
    ("http://p.example.com:5070/c", "own SIP ports"),
    ("http://p.example.com/c#x", "fragment"),
    ("http://p.example.com/c d", "control"),
    ("http://p.example.com/" + "x" * 3000, "too long"),
    ("http://p.example.com:99999/c", "parse"),
])
def test_a_cert_url_is_refused_before_any_connection(url, why):
    with pytest.raises(FetchRefused) as info:
        check_url(url, "p.example.com", own_ports={5070})
    assert why.split()[0] in str(info.value) or why in ("too long", "control")


def test_a_cert_url_on_its_own_host_or_a_configured_one_is_taken():
    assert check_url("https://P.example.com/c?x=1", "p.example.com").port == 443
    assert check_url("http://p.example.com:8080/c", "p.example.com").path == "/c"
    assert check_url("http://127.0.0.1:8080/c", "p.example.com",
                     allowed_hosts=("127.0.0.1",)).host == "127.0.0.1"


# --------------------------------------------------------------------------- the GET

@pytest.fixture
def server():
    servers: list[CertServer] = []

    def make(mode: str, **kwargs) -> CertServer:
        s = CertServer(mode, **kwargs)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def _get(server: CertServer, timeout: float = 2.0, max_bytes: int = 65536) -> bytes:
    return http_get(check_url(server.url(), "127.0.0.1"), timeout=timeout, max_bytes=max_bytes)


def test_a_body_is_fetched(server):
    assert _get(server("body", body=b"\x30\x03\x02\x01\x05")) == b"\x30\x03\x02\x01\x05"


@pytest.mark.parametrize("mode, reason", [
    ("bad_status", "status line"), ("bad_chunk", "chunk size"), ("huge", "larger than"),
    ("redirect", "HTTP 302"),
])
def test_a_broken_answer_is_a_fetch_error(server, mode, reason):
    with pytest.raises(FetchError) as info:
        _get(server(mode, redirect_to="http://127.0.0.2/x"))
    assert reason in str(info.value)


def test_one_deadline_for_everything_not_per_read(server):
    start = time.monotonic()
    with pytest.raises(FetchError, match="deadline"):
        _get(server("slowloris", drip=0.05), timeout=0.6)
    assert time.monotonic() - start < 1.2


def test_a_silent_server_counts_the_connections_a_client_holds_not_more(server):
    # the e2e test asserts the phone's 4 fetches at once with this count: a client that
    # ends one connection and opens the next at once must not be seen holding both
    silent = server("silent")
    def fetch() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", silent.port))
        sock.sendall(b"GET /cert.der HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return sock

    held = [fetch() for _ in range(3)]
    time.sleep(0.3)                 # the server has read the requests: it waits silently
    for _ in range(40):
        held.pop(0).close()
        held.append(fetch())
    deadline = time.monotonic() + 3
    while silent.total_hits < 43 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (silent.connections, silent.max_active, silent.hits) == (43, 3, {"127.0.0.1": 43})
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 3
    while silent.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert silent.active == 0


def test_the_pool_runs_a_few_at_once_one_per_host_and_cools_down():
    running: dict[str, int] = {}
    most = [0]
    lock = threading.Lock()
    release = threading.Event()

    def get(target, *, timeout, max_bytes):
        with lock:
            running[target.host] = running.get(target.host, 0) + 1
            most[0] = max(most[0], sum(running.values()))
            assert running[target.host] == 1
        release.wait(2)
        with lock:
            running[target.host] -= 1
        raise OSError(111, "refused")

    pool = CertificateFetcher(timeout=1, max_bytes=10, max_parallel=3, cool_down=60, get=get)
    hosts = [f"h{i}.example.com" for i in range(8)]
    for host in hosts:
        assert pool.submit(host, f"http://{host}/c") is None
        assert pool.submit(host, f"http://{host}/c") is None      # busy: not queued twice
    time.sleep(0.2)
    assert most[0] == 3
    release.set()
    deadline = time.monotonic() + 5
    results = []
    while len(results) < 8 and time.monotonic() < deadline:
        results += pool.results()
        time.sleep(0.02)
    assert sorted(r.host for r in results) == hosts
    assert all(r.data is None and r.error == "ConnectionRefusedError" and "111" in r.detail for r in results), results
    assert pool.submit(hosts[0], f"http://{hosts[0]}/c") is None and not pool.busy()  # cooling
    assert "userinfo" in (pool.submit("x.example.com", "http://u@x.example.com/") or "")
    pool.close()


# --------------------------------------------------------------------------- the TCP guard

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_guard_keeps_the_limit_by_closing_the_stalest_connection():
    clock = Clock()
    guard = TcpGuard(lambda h: "in", limit=3, budget=6, clock=clock)
    for handle in (1, 2, 3):
        assert guard.on_state(handle, TP_CONNECTED) is False
        clock.now += 1
    guard.on_message(1)                     # 1 spoke; 2 never did and is the oldest silent one
    assert guard.on_state(4, TP_CONNECTED) is False
    assert guard.due() == [2]
    assert guard.stats()["incoming"] == 3 and guard.stats()["evicted"] == 1


def test_the_guard_counts_destroyed_slots_for_a_while_and_closes_silent_ones():
    clock = Clock()
    guard = TcpGuard(lambda h: "in", limit=10, budget=20, idle_timeout=30,
                     first_message_timeout=5, clock=clock)
    guard.on_state(1, TP_CONNECTED)
    guard.on_state(2, TP_CONNECTED)
    guard.on_message(2)
    guard.on_state(1, TP_DESTROY)
    assert guard.in_use() == 2               # 1's slot is still being freed by pjlib
    clock.now += 2
    assert guard.in_use() == 1
    guard.on_state(3, TP_CONNECTED)
    clock.now += 6
    assert guard.due() == [3]                # no whole message within 5 s
    clock.now += 30
    assert guard.due() == [2]                # silent for 30 s


def test_the_gate_stops_the_kernel_from_completing_connections():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]
    guard = TcpGuard(lambda h: "in", limit=1, budget=2, accept=True)
    guard.attach_listener(socket.socket(fileno=__import__("os").dup(listener.fileno())))

    def connects() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    try:
        assert connects()
        guard.on_state(1, TP_CONNECTED)
        guard.on_state(2, TP_CONNECTED)       # budget reached: the gate closes
        assert guard.gate_closed and not connects()
        guard.on_state(2, TP_DESTROY)
        time.sleep(1.6)                       # the destroyed slot counts for 1.5 s
        guard.due()
        assert not guard.gate_closed and connects()
    finally:
        guard.close()
        listener.close()


# --------------------------------------------------------------------------- text output

def test_text_output_escapes_what_a_terminal_would_not_show():
    line = printable('call from "\udcff\udcfe\x1b[2J\u202eevil" <sip:x@y>\n  security: x\nfake')
    assert "\\xff\\xfe\\x1b[2J\\u202eevil" in line
    assert "\n  security" in line and "\\x0afake" in line


def test_the_printer_never_raises_on_a_strict_ascii_stream():
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    printer = Printer(as_json=False, out=out)
    printer({"kind": "call_incoming", "remote": "\u00e9\udcff", "security": []})
    printer({"kind": "call_incoming"})        # fields missing
    out.flush()
    text = raw.getvalue().decode("ascii")
    assert "\\xe9\\xff" in text and printer.failures == 0
    out.close()
    printer({"kind": "error", "direction": "rx", "message": "x", "error": "E", "detail": "d"})
    assert printer.failures == 1
