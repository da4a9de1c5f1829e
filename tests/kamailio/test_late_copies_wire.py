"""A protected request's late copy is given the answer the request got (review 123 HB2),
and nothing else: what a hop can do with that memory, on a real Kamailio.

``kamailio_app/late_copies.py`` keeps, for 32 s, the 2xx a request the engine recorded
got; a copy the replay check refuses as that very message is answered so, statelessly,
and relayed nowhere.  Review 123's module shows the honest sender's late
retransmission (403 before, 200 now).  Here the attacker's side:

- an untrusted hop replays alice's signed MESSAGE after tm let go, under its own Via
  and from its own address: it gets a 200 from the proxy, and bob does not get the
  MESSAGE a second time (the archive keeps one row);
- a request that was refused (bob's 486) keeps no answer: its late copy is refused as
  the replay it now is, not answered 200;
- alice's next MESSAGE (a new body) goes to bob as ever.

Attack-first: on the code before the memory, the hop's replay got 403 (the replay
check) and bob got the MESSAGE once; with the memory it gets 200 and bob still got it
once: the memory gives a replayer nothing the replay check did not already deny.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, message, ua_engine
from e2m_plugins import sip
from tests.kamailio.test_review114_loop_wire import _register

pytestmark = [pytest.mark.kamailio]

WAIT_PAST_TM = 6.5        # tm's wait timer (5 s) after the final answer, and a margin


class _Bob:
    """bob's UAS: every MESSAGE answered ``status`` (retransmissions too), counted."""

    def __init__(self, status: int = 200):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port, self.status, self.got = self.sock.getsockname()[1], status, 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                continue
            msg = sip.parse(data)
            if msg.is_request and msg.method == "MESSAGE":
                self.got += 1
                reason = "OK" if self.status == 200 else "Busy Here"
                self.sock.sendto(sip.make_response(msg, self.status, reason).serialize(), peer)

    def close(self):
        self.running = False
        self.thread.join(timeout=2)
        self.sock.close()


def _status(sock: socket.socket, raw: bytes, port: int) -> str | None:
    sock.sendto(raw, ("127.0.0.1", port))
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            line = sock.recvfrom(65535)[0].split(b"\r\n", 1)[0].decode()
        except socket.timeout:
            continue
        if not line.startswith("SIP/2.0 1"):
            return line
    return None


def _via(sock: socket.socket, tag: str) -> str:
    host, port = sock.getsockname()
    return f"SIP/2.0/UDP {host}:{port};rport;branch=z9hG4bK-{tag}{time.monotonic_ns()}"


def _udp(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    sock.settimeout(0.3)
    return sock


@pytest.fixture
def home(proxy_factory, pki):
    return proxy_factory("late-copies", e2m=True, view=("MESSAGE:*",))


def _alice(pki):
    return ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))


def test_a_hops_late_replay_gets_a_200_and_reaches_nobody(home, pki):
    bob, alice_sock, hop_sock = _Bob(), _udp("127.0.0.66"), _udp("127.0.0.67")
    try:
        assert _register(home, "bob", pki.domain, f"<sip:bob@127.0.0.1:{bob.port}>").status == 200
        alice = _alice(pki)
        sent = alice.protect(message(pki).replace("Via", _via(alice_sock, "a"))).message
        assert _status(alice_sock, sent.serialize(), home.port) == "SIP/2.0 200 OK"
        time.sleep(WAIT_PAST_TM)
        # the hop's copy: alice's signed body and ids, its own Via, its own address
        replayed = sent.replace("Via", _via(hop_sock, "hop"))
        mark = home.log_mark()
        assert _status(hop_sock, replayed.serialize(), home.port) == "SIP/2.0 200 OK"
        time.sleep(0.5)
        assert bob.got == 1, "the replay reached bob"
        assert home.wait_log("a late copy of one answered 200", mark, timeout=2)
        # alice's next MESSAGE, a body of its own, is relayed as ever
        second = alice.protect(message(pki, text=b"and again").replace(
            "Via", _via(alice_sock, "a2"))).message
        assert _status(alice_sock, second.serialize(), home.port) == "SIP/2.0 200 OK"
        time.sleep(0.3)
        assert bob.got == 2
    finally:
        bob.close()
        alice_sock.close()
        hop_sock.close()


def test_a_refused_requests_late_copy_is_refused_not_answered_200(home, pki):
    bob, alice_sock = _Bob(status=486), _udp("127.0.0.68")
    try:
        assert _register(home, "bob", pki.domain, f"<sip:bob@127.0.0.1:{bob.port}>").status == 200
        sent = _alice(pki).protect(message(pki).replace("Via", _via(alice_sock, "r"))).message
        raw = sent.serialize()
        assert _status(alice_sock, raw, home.port) == "SIP/2.0 486 Busy Here"
        time.sleep(WAIT_PAST_TM)
        assert _status(alice_sock, raw, home.port) == "SIP/2.0 403 Forbidden"
        assert bob.got == 1
    finally:
        bob.close()
        alice_sock.close()
