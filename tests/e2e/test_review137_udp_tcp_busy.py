"""Review 137 (attacker's review of 9e484f3), area 4: a UDP phone's TCP listener
(``SipEndpoint.add_udp_with_tcp``, ``TcpGuard``, ``ProxySource.matches(tcp=True)``).
Set-up: review 132's stranger lab (``tests/e2e/test_phone_stranger.py``, no Kamailio):
bob is a real ``e2m-phone`` over UDP registered at a registrar/proxy on 127.0.0.1 (his
home), with its TCP listener at the UDP port (the default); the stranger is at
127.0.0.2.

Hole K2: a stranger's busy connections keep the home out of the listener
-------------------------------------------------------------------------

- Attacker: an **off-path sender** at any address (no spoofing: TCP), against a phone
  or the large requests its home sends it (RFC 3261 18.1.1: above 1300 octets, over TCP
  to the UDP port, e.g. the certificate service's NOTIFY of a large certificate, stop
  43).
- Messages: ``tcp_max_connections`` TCP connections from 127.0.0.2, each sending an
  OPTIONS every 0.25 s (0.5 s with the default 32), read and answered 403 by the phone
  ("did not come through the home proxy").  Then the home opens a new connection from
  127.0.0.1, as a proxy does for a large request, and sends an OPTIONS: three tries,
  0.5 s apart.
- Observed: none of the home's three connections gets an answer: each is closed as
  soon as it is accepted (``accepted`` 7 = 4 + 3, ``evicted`` 0, the stranger's 4 all
  ``incoming``); the stranger got 24 answers (403) of 28 requests.  With the default
  ``tcp_max_connections`` = 32 (scratch run of this module, not kept): 32 connections,
  an OPTIONS every 0.5 s on each (64 requests/s), the same: ``[None, None, None]``,
  ``incoming`` 32, 192 requests sent and 160 answered 403 in the run.  The same
  connections idle (one request each, then silence): the home's connection evicts the
  stalest and is answered 200 (control).  So as long as a stranger keeps every
  accepted slot busy (a request per slot per second), no connection of the home
  reaches the phone: a large certificate NOTIFY (a peer's renewed or withdrawn
  certificate, review 107) never arrives, and Kamailio's send fails.
- Code at fault: ``pjsua_hooks/tcpguard.py:202-214`` (``_make_room``: when every other
  accepted connection carried a message within the last second, the new one is closed,
  whoever it comes from) with ``pjsua_hooks/endpoint.py:416-421`` (the UDP phone's
  listener has the guard of a TCP phone, whose accepted connections are all strangers'
  when ``tcp_accept`` is on; here the one legitimate peer, the home, competes with them
  on equal terms).  A stranger's messages count as activity although every one of them
  is refused (``pjsua_hooks/rawhook.py:346-348`` tells ``on_message`` of each whole
  message before the phone's ``_through_home`` refuses it).
- Suggested fix: on the UDP phone's listener, never close a connection from the home's
  address to make room (and evict a stranger's instead, busy or not), or do not count a
  request refused as not via the home as activity; simplest, accept connections from the
  home's addresses only (the SYN gate's BPF can filter on the source address), since
  nothing else may send the phone a request over it.
- Test: ``test_busy_strangers_do_not_keep_the_home_out_of_the_tcp_listener`` (strict
  xfail; ``tcp_max_connections`` = 4 to keep the load small).

Controls (unmarked, pass): ``test_control_idle_strangers_make_room_for_the_home`` (the
same 4 connections idle: the home's request 200, ``evicted`` >= 1) and
``test_control_the_homes_request_over_tcp_is_answered`` (no stranger: 200).

Tried and held (area 4, read in the code): a stranger's request over the listener from
any address but the home's is 403 and never reaches pjsua (review 132's tests); a
response over TCP is held to the home's address and port (``_answer_from_home`` calls
``matches`` without ``tcp``), so a stranger at another port of the home's host cannot
answer over it; the late BYE's 407 taken over TCP is held the same way (it must first
pass ``_answer_from_home``); a MESSAGE taken over TCP is held to ``FirstCopy``'s
stream rule (``reliable=True``: any repeat is a copy, 482).  Not run: a duplicate of a
UDP request sent again over the listener by the home (the home relays over UDP what
came over UDP; only a large request goes over TCP, and then only over TCP).

Fixed (stop 44), K2, by review 134 K4's fix (``TcpGuard.admit_only``): a phone with a
home completes TCP connections from the home's addresses alone, so a stranger at
another address gets no connection to keep busy.  The hole test failed on the code
before (the home's three tries unanswered) and passes now; the idle control now runs
its connections from the home's address, the only one admitted.  Left as it was: the
guard still counts a refused (403) request as activity, which matters only for a
stranger that can connect from the home's own address (the proxy's host).
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

    def __init__(self, port: int, count: int, *, busy: bool, every: float = EVERY,
                 source: str = OTHER_HOST) -> None:
        self.port, self.busy, self.every, self.source = port, busy, every, source
        self.socks: list[socket.socket] = []
        self.sent = self.answers = self.not_connected = 0
        self.stop = threading.Event()
        for _ in range(count):
            sock = socket.socket()
            sock.settimeout(2)
            sock.bind((source, 0))
            try:
                sock.connect((HOST, port))
            except OSError:          # stop 44: only the home's addresses connect
                self.not_connected += 1
                sock.close()
                continue
            self._send(sock)
            sock.setblocking(False)
            self.socks.append(sock)
            time.sleep(0.02)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, sock: socket.socket) -> None:
        local = sock.getsockname()[1]
        sock.sendall(sip_request("OPTIONS", f"sip:bob@{HOST}:{self.port};transport=tcp",
                                 via=f"SIP/2.0/TCP {self.source}:{local}",
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


def test_busy_strangers_do_not_keep_the_home_out_of_the_tcp_listener(bob):
    stranger = BusyStranger(bob.port, LIMIT, busy=True)
    try:
        time.sleep(1.0)
        statuses = _homes_requests(bob.port)
        tcp = bob.status()["tcp"]
    finally:
        stranger.close()
    # secure: the home's request over TCP is answered (the home's own connection is
    # never the one the guard closes for a stranger's); since stop 44 the stranger's
    # connections are not even completed (before: 4 of 4 connected, 403s answered)
    assert 200 in statuses, (statuses, tcp, stranger.sent, stranger.answers)
    assert stranger.not_connected == LIMIT and stranger.answers == 0, tcp


def test_control_idle_strangers_make_room_for_the_home(bob):
    """The same connections, each silent after its first request, from the home's own
    address (the only one the listener admits since stop 44): the home's new
    connection closes the stalest and is answered 200."""
    stranger = BusyStranger(bob.port, LIMIT, busy=False, source=HOST)
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
