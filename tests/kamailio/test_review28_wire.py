"""Review 28: the proxy under load and outage, digest, connections (real Kamailio 5.6.3).

Two holes, each a strict xfail on ``342fe49`` whose assertion is what a fix must make
true, with a ``test_control_*`` of the same flow without the attack (they pass).  The
first is closed: ``route_auth`` names the From user (a REGISTER's To user), which
``auth_check``'s flag 1 holds to the credentials it verified.

1. **Digest: whom ``$au`` names.**  ``route_auth`` takes ``self.authenticated`` from
   ``$au`` once ``auth_check`` says yes.  ``auth_check`` (auth_db, flag 1) verifies the
   ``Proxy-Authorization`` header *whose realm is ours* and holds the From user to that
   header's user name; ``$au`` (pv ``pv_get_authattr``) reads the *first*
   ``Proxy-Authorization`` header of the message, whatever its realm, never verified.
   An insider puts a decoy header of another realm naming anyone before her own good
   credentials: ``digest_aor`` is then the decoy's name, and the reply route charges
   the answer's key to it (``ProxyEngine.answer_caller(digest_user=...)``).  That brings
   back reviews 9 and 10: keys charged to another user's caller group (which is also the
   group of her own offers: ``keeper_groups``), or a fresh caller group and a fresh pair
   share per call (``tests/unit/test_review9.py`` and ``test_review10.py`` show what
   that lets an insider do to the cache).

2. **TCP: the connection table.**  ``tcp_max_connections`` bounds shm (issue 14), but
   nothing bounds connections per source, and ``tcp_connection_lifetime`` is refreshed
   by RFC 5626 CRLF keep-alives: one stranger holds every slot for as long as it sends
   ``\\r\\n\\r\\n`` now and then (no request, so pike and the ban never see it), and no
   new TCP or TLS client connects.  The threat model's row ("idle ones closed after
   120 s") holds only for a flooder that stays silent (the control).
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.kamailio_harness import SipUa, digest_credentials, registered_uas
from e2m_plugins.sip import SipMessage
from tests.kamailio.test_answer_caller_wire import _bobs_phone, _charged, _plain_invite

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)
USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}
# credentials of another realm: auth_check skips them, $au reads them (they come first)
DECOY = ('Digest username="{user}", realm="elsewhere.invalid", nonce="0", uri="sip:x", '
         'response="00000000000000000000000000000000"')


def _carols_call(proxy, carol: SipUa, tag: str, decoy: str | None) -> str:
    """carol (an insider, her own password) calls bob with her own good credentials,
    after a decoy ``Proxy-Authorization`` naming ``decoy`` when one is given; bob's
    phone answers 200 with a key for the proxy.  Returns the caller the reply route
    charged for that key."""
    invite: SipMessage = _plain_invite("sip:carol@example.com", tag)
    if decoy is not None:
        invite = invite.add("Proxy-Authorization", DECOY.format(user=decoy))
    carol.nc += 1
    invite = invite.add("Proxy-Authorization", digest_credentials(
        carol.challenge[1], "INVITE", invite.request_uri or "", "carol", USERS["carol"],
        carol.nc))
    mark = proxy.log_mark()
    ok = carol.transact(invite, timeout=8)
    assert ok is not None and ok.status == 200, ok
    return _charged(proxy, mark)


@pytest.fixture
def caller_proxy(proxy_factory, pki):
    """A home proxy with [auth] and a view rule for INVITE SDP; bob registered, his
    phone answering every INVITE with an SDP sealed for the proxy under a fresh key;
    carol's UA holding a challenge (a first MESSAGE answered it)."""
    proxy = proxy_factory("review28-caller", e2m=True, view=SDP_VIEW, auth=True, users=USERS)
    with registered_uas(proxy, "bob", USERS["bob"], "127.0.0.30") as uas:
        uas.responder = _bobs_phone(pki, uas)
        carol = SipUa(proxy.port, user="carol", password=USERS["carol"], source="127.0.0.31")
        try:
            assert carol.message("bob", b"hello").status == 200      # 407, then 200
            yield proxy, carol
        finally:
            carol.close()


def test_control_carols_own_credentials_charge_carol(caller_proxy):
    proxy, carol = caller_proxy
    assert _carols_call(proxy, carol, "c0", None) == "sip:carol@example.com"


@pytest.mark.parametrize("decoys", [("alice",), ("made-up-1", "made-up-2")],
                         ids=["another-user", "a-fresh-group-per-call"])
def test_hole_a_decoy_credentials_header_names_the_caller(caller_proxy, decoys):
    """Attacker: insider UA (carol, a user of ours with her own password).
    Attack: every INVITE carries, before her own good ``Proxy-Authorization``, a decoy
    ``Proxy-Authorization: Digest username="alice", realm="elsewhere.invalid", ...``
    (any name, any response).  ``auth_check`` verifies the header of our realm
    (carol's), finds the From user is carol, says yes; ``route_auth`` then sets
    ``self.authenticated = $au``, and ``$au`` is the first header's user name: "alice".
    Effect: ``digest_aor`` is ``sip:alice@example.com``, so the key bob's answer offers is
    charged to alice's caller group (the group her own offers count in: carol's calls
    push alice's keys of calls under way out of the cache) and to the pair (alice, bob);
    with a new made-up name per call every call is a caller group and a pair share of
    its own, and carol's calls fill the cache past her quota (reviews 9 and 10 again).
    ``consume_credentials`` removes only the verified header: the decoy goes on to bob.
    Fix: take the authenticated user from what ``auth_check`` verified, not ``$au``: with
    flag 1 the From user (``$fU``, ``$tU`` for REGISTER) *is* the verified user name, or
    refuse a request with more than one ``Authorization``/``Proxy-Authorization``
    header (400) before ``auth_check``."""
    proxy, carol = caller_proxy
    charged = [_carols_call(proxy, carol, f"d{n}", decoy) for n, decoy in enumerate(decoys)]
    assert charged == ["sip:carol@example.com"] * len(decoys), charged


def test_held_a_decoy_naming_the_from_user_does_not_pass_the_identity_check(caller_proxy):
    """The decoy put to the other use: From alice, a decoy first naming alice, then
    carol's own good credentials.  If auth_check's From check read the first header as
    ``$au`` does, carol would send as alice; it reads the header it verified: 403."""
    proxy, carol = caller_proxy
    invite: SipMessage = _plain_invite("sip:alice@example.com", "as-alice")
    invite = invite.add("Proxy-Authorization", DECOY.format(user="alice"))
    carol.nc += 1
    invite = invite.add("Proxy-Authorization", digest_credentials(
        carol.challenge[1], "INVITE", invite.request_uri or "", "carol", USERS["carol"],
        carol.nc))
    answer = carol.transact(invite, timeout=8)
    assert answer is not None and answer.status == 403, answer and answer.status


# -- TCP: one stranger holds the connection table ----------------------------------------

SLOTS = 20
IDLE = 5      # [limits] tcp_idle_timeout, the least it takes


def _connect_from(proxy, source: str) -> socket.socket | None:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(1)
    try:
        sock.connect(("127.0.0.1", proxy.port))
    except OSError:
        sock.close()
        return None
    return sock


def _fill_the_table(proxy, source: str) -> list[socket.socket]:
    """Connections from ``source`` until Kamailio takes no more (twice its table)."""
    held = [sock for sock in (_connect_from(proxy, source) for _ in range(2 * SLOTS)) if sock]
    assert proxy.wait_log("maximum number of connections exceeded")
    return held


def _top_up(proxy, held: list[socket.socket], source: str) -> None:
    """The stranger keeps his pool full: connections the proxy closed (the ones past its
    table) are opened again, so a slot that frees is his again at once."""
    for sock in list(held):
        sock.setblocking(False)
        try:
            closed = sock.recv(65535) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        if closed:
            held.remove(sock)
            sock.close()
    while len(held) < 2 * SLOTS:
        sock = _connect_from(proxy, source)
        if sock is None:
            break
        held.append(sock)


def _a_new_tcp_client_registers(proxy, source: str) -> bool:
    try:
        ua = SipUa(proxy.port, transport="tcp", user="dora", source=source, timeout=1.5)
    except OSError:
        return False
    try:
        answer = ua.register()
        return answer is not None and answer.status == 200
    except OSError:
        return False
    finally:
        ua.close()


def _served_within(proxy, held: list[socket.socket], keepalive: bool, seconds: float,
                   reconnect: bool = True) -> bool:
    """Whether a new TCP client (another address) registers within ``seconds`` while the
    stranger's connections stay open, sending a CRLF keep-alive every second or nothing
    (and, with ``reconnect``, opening a new one for each the proxy closed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if keepalive:
            if reconnect:
                _top_up(proxy, held, "127.0.0.71")
            for sock in held:
                try:
                    sock.sendall(b"\r\n\r\n")
                except OSError:
                    pass
        if _a_new_tcp_client_registers(proxy, "127.0.0.72"):
            return True
        time.sleep(1.0)
    return False


@pytest.fixture
def tcp_proxy(proxy_factory):
    return proxy_factory("review28-tcp", e2m=False,
                         limits={"tcp_idle_timeout": IDLE, "tcp_max_connections": SLOTS})


def _a_stranger_fills_the_table(proxy, *, keepalive: bool, seconds: float = 4 * IDLE) -> bool:
    """A new client registers first; one stranger then fills the table (reconnecting
    for each connection closed): whether a new client is served within ``seconds``."""
    assert _a_new_tcp_client_registers(proxy, "127.0.0.70")
    held = _fill_the_table(proxy, "127.0.0.71")
    try:
        return _served_within(proxy, held, keepalive=keepalive, seconds=seconds)
    finally:
        for sock in held:
            sock.close()


def test_control_a_silent_stranger_loses_the_table_at_the_idle_timeout(tcp_proxy):
    assert _a_stranger_fills_the_table(tcp_proxy, keepalive=False)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known limit (docs/threat-model.md): Kamailio 5.6 "
                   "has no per-address limit at accept, so a stranger who opens a new "
                   "connection for each one closed refills the table between sweeps "
                   "(5.8's tcp_accept_iplimit, or nftables ct count, closes it)")
def test_hole_a_stranger_holds_every_tcp_slot_with_keepalives(tcp_proxy):
    """Attacker: off-path sender, no account, one address.
    Attack: open connections until Kamailio refuses more (``tcp_max_connections``; by
    default what fits in half of shm, ~390 at 256 MB), then send ``\\r\\n\\r\\n`` on each
    every second (a RFC 5626 keep-alive; a byte every ``tcp_idle_timeout`` would do),
    opening a new connection whenever one of his is closed (a slot that frees is his).
    No request is sent, so pike never counts the source and it is never banned.
    Effect: the idle timeout never fires (the keep-alive is traffic); after four idle
    timeouts no new TCP client (another address) connects and registers: every user
    over TCP or TLS who was not connected before is locked out as long as the stranger
    likes; shm stays bounded (issue 14's fix holds), the service does not.
    Fix: bound connections per source address (Kamailio 5.8's ``tcp_accept_iplimit``, or
    the kernel: nftables/iptables ``connlimit`` written by the launcher next to
    ``tcp_max_connections``), and close a connection that has carried no whole SIP
    request within a short first-message timeout whatever keep-alives it sent."""
    assert _a_stranger_fills_the_table(tcp_proxy, keepalive=True, seconds=IDLE + 2)


@pytest.mark.slow
def test_hole_keepalives_alone_hold_the_table(tcp_proxy):
    """The same stranger without the reconnecting: keep-alives on the connections he
    has, four from each of five addresses (so no address is over its share).  Before
    the sweep (seen on ``5721b32``) they held every slot past four idle timeouts; now a
    connection that carried no SIP message within ``tcp_first_message_timeout`` is
    closed whatever keep-alives it sent (``tcp_sweep.py``)."""
    held = [sock for n in range(SLOTS) if (sock := _connect_from(
        tcp_proxy, f"127.0.0.{71 + n % 5}")) is not None]
    assert tcp_proxy.wait_log("maximum number of connections exceeded") or len(held) == SLOTS
    try:
        assert _served_within(tcp_proxy, held, keepalive=True, seconds=4 * IDLE,
                              reconnect=False)
        assert tcp_proxy.wait_log("closed: no SIP message")
    finally:
        for sock in held:
            sock.close()


def test_hole_connections_that_each_sent_a_request_hold_the_table(tcp_proxy):
    """A stranger whose every connection sent one OPTIONS (under pike's rate), then
    keep-alives: each is "in use", so the first-message rule spares them, and they held
    every slot (seen on ``5721b32``).  Now one address holds at most
    ``tcp_connections_per_source`` (a quarter of this table: 5); the rest are closed."""
    held = _fill_the_table(tcp_proxy, "127.0.0.71")
    try:
        for n, sock in enumerate(held):
            try:
                sock.sendall((f"OPTIONS sip:127.0.0.1:{tcp_proxy.port} SIP/2.0\r\n"
                              f"Via: SIP/2.0/TCP 127.0.0.71;branch=z9hG4bK-r28o{n}\r\n"
                              f"From: <sip:s@127.0.0.71>;tag=o{n}\r\nTo: <sip:p@127.0.0.1>\r\n"
                              f"Call-ID: r28o{n}@x\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                              "Content-Length: 0\r\n\r\n").encode())
            except OSError:
                pass
            time.sleep(0.1)           # 10/s: under pike's 30 per 2 s
        assert _served_within(tcp_proxy, held, keepalive=True, seconds=4 * IDLE,
                              reconnect=False)
        assert tcp_proxy.wait_log("closed: too many from one address")
    finally:
        for sock in held:
            sock.close()
