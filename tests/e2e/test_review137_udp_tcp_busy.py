"""Review 137 (attacker's review of 9e484f3), area 4: a UDP phone's TCP listener.
Docstring completed below.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest

from e2m_lab.stranger import HOST, sip_request
from tests.e2e.test_phone_stranger import lab, pki  # noqa: F401  (fixtures)
from tests.e2e.test_udp_phone_tcp_listener import OTHER_HOST, _tcp_request

pytestmark = [pytest.mark.pjsua2]

LIMIT = 4            # [phone] tcp_max_connections for the test (default 32: the same rule)
EVERY = 0.25         # seconds between a busy connection's requests (the guard's bar: 1 s)


class BusyStranger:
    """``count`` TCP connections from OTHER_HOST (not the home's address) to the phone,
    each sending an OPTIONS every ``every`` seconds (``busy``) or one and then nothing
    (idle); the phone's answers (403) are read and counted."""

    def __init__(self, port: int, count: int, *, busy: bool, every: float = EVERY) -> None:
        self.port, self.busy, self.every = port, busy, every
        self.socks: list[socket.socket] = []
        self.sent = self.answers = 0
        self.stop = threading.Event()
        for _ in range(count):
            sock = socket.socket()
            sock.bind((OTHER_HOST, 0))
            sock.connect((HOST, port))
            self._send(sock)
            sock.setblocking(False)
            self.socks.append(sock)
            time.sleep(0.02)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, sock: socket.socket) -> None:
        local = sock.getsockname()[1]
        sock.sendall(sip_request("OPTIONS", f"sip:bob@{HOST}:{self.port};transport=tcp",
                                 via=f"SIP/2.0/TCP {OTHER_HOST}:{local}",
                                 call_id=uuid.uuid4().hex))
        self.sent += 1

    def _run(self) -> None:
        while not self.stop.is_set():
            for sock in self.socks:
                try:
                    while True:
                        data = sock.recv(65536)
                        if not data:
                            break
                        self.answers += data.count(b"SIP/2.0 403")
                except OSError:
                    pass
                if self.busy:
                    try:
                        self._send(sock)
                    except OSError:
                        pass
            self.stop.wait(self.every)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for sock in self.socks:
            sock.close()


def _homes_requests(port: int, tries: int = 3) -> list[int | None]:
    """The home (127.0.0.1, a fresh connection each time, as a proxy connects for a
    request above 1300 octets): the status of each attempt's answer (None: none)."""
    out = []
    for _ in range(tries):
        answer = _tcp_request(port, "OPTIONS", source=HOST, timeout=4)
        out.append(None if answer is None else answer.status)
        time.sleep(0.5)
    return out


@pytest.fixture
def bob(lab):
    home = lab.registrar([])
    phone = lab.phone(phone={"transport": "udp", "registrar": home.uri, "proxy": home.uri,
                             "tcp_max_connections": LIMIT})
    phone.wait("registered", timeout=10)
    return phone


@pytest.mark.xfail(strict=True, reason="review 137 hole K2: a stranger's busy TCP "
                   "connections keep the home's connection out of a UDP phone's listener")
def test_busy_strangers_do_not_keep_the_home_out_of_the_tcp_listener(bob):
    stranger = BusyStranger(bob.port, LIMIT, busy=True)
    try:
        time.sleep(1.0)
        statuses = _homes_requests(bob.port)
        tcp = bob.status()["tcp"]
    finally:
        stranger.close()
    assert stranger.answers > 0            # the phone kept answering the stranger: 403s
    # secure: the home's request over TCP is answered (the home's own connection is
    # never the one the guard closes for a stranger's)
    assert 200 in statuses, (statuses, tcp, stranger.sent, stranger.answers)


def test_control_idle_strangers_make_room_for_the_home(bob):
    """The same connections, each silent after its first request: the home's new
    connection closes the stalest and is answered 200."""
    stranger = BusyStranger(bob.port, LIMIT, busy=False)
    try:
        time.sleep(1.5)
        statuses = _homes_requests(bob.port, tries=1)
        tcp = bob.status()["tcp"]
    finally:
        stranger.close()
    assert statuses == [200], (statuses, tcp)
    assert tcp["evicted"] >= 1, tcp


def test_control_the_homes_request_over_tcp_is_answered(bob):
    assert _homes_requests(bob.port, tries=1) == [200]
