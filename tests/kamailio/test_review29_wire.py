"""Review 29 (attacker's review of this session's fixes), against a real Kamailio 5.6.3.

Each ``test_hole_*`` was a strict xfail on ``4518507`` whose assertion is what a fix
must make true; each ``test_control_*`` is the same flow without the attack (it
passes).  Closed: the challenge check fails closed on what it cannot read, and a
connection's mark says who spoke (a stray reply marks nothing; an authenticated
request marks it above any other; ``tcp_sweep.py``).  In-memory halves: ``tests/unit/test_review29.py``.

1. **The own-realm challenge check fails open.**  ``ksr_onreply_route`` (and, for a
   stray reply, ``ksr_reply_route``) call ``own_realm_challenge``, which reads every
   challenge header with ``KSR.textopsx.hf_iterator_hbody``.  app_python3 hands a
   header over as ``str``: one octet that is not UTF-8 anywhere in the header raises
   ``UnicodeDecodeError`` (review 23), the ``except Exception`` around it logs "reply
   route" and lets the reply go on, so the callee's challenge in the home realm is
   relayed to the caller as it came (a stray one forwarded), the review 27 fix undone.
2. **The TCP sweep keeps an address's oldest connections.**  Over
   ``tcp_connections_per_source`` it closes the newest, marked or not; a stranger who
   shares an address with users (CGNAT, a hotel NAT) and marked his connections first
   (one stray reply each: no request, pike never counts him) has every later one
   closed, the users' registered connections included.
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.kamailio_harness import SipUa
from e2m_plugins.sip import parse
from tests.kamailio.test_review27_wire import (  # noqa: F401 - fixtures
    USERS, _alice_writes, _stray, bob, challenging, home)

pytestmark = pytest.mark.kamailio

# the callee's challenge in the home realm with one octet 0xff in an opaque it chose
# (surrogateescape: the harness writes it as the raw octet)
OPAQUE_FF = 'Digest realm="example.com", nonce="bob-chose", qop="auth", opaque="x\udcff"'
PLAIN = 'Digest realm="example.com", nonce="bob-chose", qop="auth", opaque="x"'


def test_hole_one_non_utf8_octet_lets_the_callees_home_realm_challenge_through(home, bob):
    """Attacker: the callee (insider UA), or a hop past the home proxy.

    Attack: answer alice's MESSAGE (or INVITE) with a 407 whose ``Proxy-Authenticate``
    names the home realm, as in review 27, with one octet 0xff in a parameter of its
    own (``opaque="x\\xff"``; any header it reads would do).

    Effect: ``own_realm_challenge`` raises ``UnicodeDecodeError`` in
    ``hf_iterator_hbody``; ``ksr_onreply_route`` logs it and returns without setting
    the AVP, so the failure route relays the 407 instead of answering 502: alice's UA
    gets the callee's challenge of her home realm (the phone keeps it: its parser
    decodes with ``surrogateescape`` and reads realm example.com; pjsip answers it).
    The stray variant (no transaction) is forwarded by ``ksr_reply_route`` the same way.
    What the retry's response then yields the callee depends on the home proxy's own
    nonce check (not shown here): the review 27 promise "the home proxy relays no
    downstream challenge in its own realm" does not hold.

    Fix: fail closed: a 401/407 whose challenge headers cannot be read (a
    ``UnicodeDecodeError``, any exception in the check) counts as naming our realm:
    ``ksr_onreply_route`` sets the AVP (502), ``ksr_reply_route`` drops the stray one."""
    bob.responder = challenging(407, "Proxy-Authenticate", OPAQUE_FF)
    answer = _alice_writes(home)
    assert bob.wait_for(1, method="MESSAGE")
    assert answer is not None
    relayed = [m for m in [answer] if "bob-chose" in (m.get("Proxy-Authenticate") or "")]
    assert answer.status == 502 and not relayed, (answer.status,
                                                  answer.get("Proxy-Authenticate"))


def test_control_the_same_challenge_without_the_octet_is_refused(home, bob):
    bob.responder = challenging(407, "Proxy-Authenticate", PLAIN)
    answer = _alice_writes(home)
    assert answer is not None and answer.status == 502
    assert home.wait_log("challenges in our realm: refused")


def test_hole_a_stray_home_realm_challenge_with_a_non_utf8_octet_is_forwarded(home):
    """The same octet in a stray 407 (an off-path sender or a hop that knows alice's
    Via): ``ksr_reply_route``'s check raises, the reply goes on statelessly."""
    got = _stray(home, OPAQUE_FF, "ff")
    assert got is None, parse(got).get("Proxy-Authenticate")


def test_control_a_stray_home_realm_challenge_is_dropped(home):
    assert _stray(home, PLAIN, "plain") is None


# -- TCP: a stranger sharing an address with users --------------------------------------

SLOTS = 20          # tcp_max_connections: tcp_connections_per_source is 5
IDLE = 5            # tcp_idle_timeout, the least it takes
FIRST = 2           # tcp_first_message_timeout: a silent connection goes sooner
WINDOW = 3.5        # a sweep (every 2 s, rtimer e2mtcp) falls inside it, with margin
SHARED = "127.0.0.81"


@pytest.fixture
def tcp_home(proxy_factory):
    return proxy_factory("review29-tcp", e2m=False, auth=True, users=USERS,
                         limits={"tcp_idle_timeout": IDLE, "tcp_max_connections": SLOTS,
                                 "tcp_first_message_timeout": FIRST})


def _open(sock: socket.socket) -> bool:
    """Whether the proxy has not closed ``sock`` (what it sent before is read away:
    CRLF pongs to our keep-alives, responses)."""
    sock.setblocking(False)
    try:
        while True:
            if sock.recv(65535) == b"":
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def _stranger(proxy, n: int, request: bool = False) -> list[socket.socket]:
    """``n`` connections from the shared address, each marked (before the fix) by one
    stray reply (a 200 to nothing: pike counts requests only), or with ``request`` by
    one OPTIONS (under pike's rate), which marks it as having spoken."""
    held = []
    for i in range(n):
        sock = socket.socket()
        sock.bind((SHARED, 0))
        sock.settimeout(1)
        sock.connect(("127.0.0.1", proxy.port))
        start = f"OPTIONS sip:127.0.0.1:{proxy.port} SIP/2.0" if request else "SIP/2.0 200 OK"
        sock.sendall((f"{start}\r\nVia: SIP/2.0/TCP 127.0.0.1:{proxy.port};"
                      f"branch=z9hG4bK-r29s{i}\r\nFrom: <sip:s@x>;tag=s{i}\r\n"
                      f"To: <sip:p@x>{'' if request else f';tag=p{i}'}\r\n"
                      f"Call-ID: r29s{i}@x\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                      "Content-Length: 0\r\n\r\n").encode())
        held.append(sock)
        time.sleep(0.1)                  # under pike's 30 requests per 2 s
    return held


def _alice_stays_connected(proxy, held: list[socket.socket], seconds: float) -> tuple[bool, int]:
    """alice (a user, digest password) connects over TCP from the shared address and
    registers; both sides send a CRLF keep-alive every second.  Whether her connection
    is still open after ``seconds``, and how many of the stranger's are."""
    alice = SipUa(proxy.port, transport="tcp", user="alice", password=USERS["alice"],
                  source=SHARED, timeout=3)
    try:
        answer = alice.register()
        assert answer is not None and answer.status == 200, answer and answer.status
        _keep_alive([alice.sock, *held], seconds)
        return _open(alice.sock), sum(_open(s) for s in held)
    finally:
        alice.close()


def _keep_alive(socks: list[socket.socket], seconds: float) -> None:
    """A CRLF keep-alive on each of ``socks`` every second for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in socks:
            try:
                sock.sendall(b"\r\n\r\n")
            except OSError:
                pass
        time.sleep(1.0)


@pytest.mark.slow
def test_hole_a_stranger_behind_the_users_nat_closes_their_registered_connections(tcp_home):
    """Attacker: off-path sender, no account, sharing one IPv4 address with users of
    ours (a mobile operator's CGNAT, a hotel, campus or office NAT).

    Attack: open ``tcp_connections_per_source`` connections (here 5; by default a
    quarter of the table, at most 32) from the shared address; send on each one stray
    SIP reply (``ksr_reply_route`` marks the connection before anything else; pike
    counts requests only, so he is never banned), then a CRLF keep-alive now and then.

    Effect: alice, behind the same address, connects over TCP (TLS alike) and
    registers with her password (200); her connection is marked like his, but newer:
    ``TcpSweeper`` keeps marked connections oldest first, so hers is closed "too many
    from one address" at the next sweep (2 s), and so is every one she opens again.
    A TLS phone takes requests only on its own connection: alice gets no call or
    MESSAGE, for as long as the stranger likes.  No attack needed for the same effect
    when more than 32 phones sit behind one NAT (the newest lose).

    Fix: make the mark say who spoke: e.g. a second lifetime value for a connection
    that carried a digest-authenticated request (``route_auth`` succeeded) or a reply
    matching one of our transactions, never closed by the share (or closed last); a
    stray reply or an HTTP GET should not mark at all."""
    held = _stranger(tcp_home, 5)
    try:
        # a stray reply marks nothing now: past the first-message timeout and a sweep
        # (2 s) they are gone
        deadline = time.monotonic() + FIRST + 3
        while sum(_open(s) for s in held) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sum(_open(s) for s in held) == 0
        alice_open, _ = _alice_stays_connected(tcp_home, held, WINDOW)
        assert alice_open, "alice's registered connection was closed"
    finally:
        for sock in held:
            sock.close()


@pytest.mark.slow
def test_hole_a_stranger_whose_connections_spoke_still_cannot_push_alice_out(tcp_home):
    """The same stranger marking his five connections with one OPTIONS each (they did
    speak, so they stay): alice's connection carried a digest-authenticated request and
    is kept before them; the share closes one of his instead."""
    held = _stranger(tcp_home, 5, request=True)
    try:
        time.sleep(FIRST + 3)            # past the first-message timeout and a sweep
        assert sum(_open(s) for s in held) == 5      # spoke: not closed as silent
        alice_open, his = _alice_stays_connected(tcp_home, held, WINDOW)
        assert alice_open, "alice's registered connection was closed"
        assert his == 4                              # the share took one of his
    finally:
        for sock in held:
            sock.close()


@pytest.mark.slow
def test_control_alices_registered_connection_stays_without_the_stranger(tcp_home):
    alice_open, _ = _alice_stays_connected(tcp_home, [], WINDOW)
    assert alice_open
