"""Review 127 (attacker's review of d2a6a56), wire: stop 42's certificate NOTIFY socket
(``CertService._sockets``, ``contact_uri``, ``$var(e2m_socket)`` into ``t_uac_send``,
``SubscriptionTable.claim_due``/``claim_lapsed`` restricted to the node's own Contacts),
run on a real Kamailio 5.6 E2M proxy with ``[certs]`` and ``[auth]``.

**No hole found in this area in the time given.**  What was tried, all unmarked
controls that pass (the set-up shown live):

- ``test_control_ipv6_subscription_is_claimed_as_the_nodes_own`` (``::1`` and, when the
  host has it, ``fd00::2``): the fix only works if the Contact a subscription is made
  with (``CertService._contact``: ``$pr``, ``$Ri``, ``$Rp``) is spelled exactly as the
  Contact the node computes from its ``[kamailio] listen`` entries (``contact_uri`` of
  the ``Listener``, whose host is ``ipaddress``'s compressed lower-case form).  A
  mismatch (upper-case or uncompressed IPv6 from Kamailio's ``ip_addr2a``) would make
  ``claim_due`` skip every such row on a single node: change NOTIFYs never sent until
  600 s after the follow lapsed.  Observed: rows ``sip:[::1]:<port>`` and
  ``sip:[fd00::2]:<port>``, equal to the listener's Contact; held.
- ``test_control_a_stream_follower_hears_of_a_replacement`` (TCP and TLS): a follower
  over a stream (the Contact ``;transport=tcp`` or ``tls``, socket ``tcp:``/``tls:``)
  gets the timer's change NOTIFY over its own connection (2 of 2 NOTIFYs, bodies 475
  and 474 octets over TCP); held.
- A wildcard TCP listener (``tcp:0.0.0.0:<port>``, which ``config.py`` allows): Kamailio
  gives ``$Ri`` 0.0.0.0 for the accepted connection too, so the row's Contact
  (``sip:0.0.0.0:<port>;transport=tcp``) is the listener's and the change NOTIFY came
  (2 of 2, row pending 2 -> 0); held (run once, not kept: the harness cannot start a
  proxy whose only UDP listener is a wildcard).
- ``test_control_a_large_change_reaches_a_udp_follower_over_tcp`` (TCP listener at the
  UDP port, and at another port): the subscription's socket is the UDP one, the 10 KiB
  certificate's NOTIFY must go over TCP (RFC 3261 18.1.1), so ``t_uac_send`` gets a UDP
  socket for a TCP destination.  Kamailio finds the TCP socket at that address (same
  port, or another); the follower accepted the connection and read the whole NOTIFY
  with the 10 KiB certificate (10,326 and 10,327 octets) both times; held.

Tried and held without a test of its own (reasoning on the code, or runs above):

- Key cache (stop 42, ``expire_within``): a failed INVITE's keys live at most 32 s
  more (``tests/kamailio/test_attempt_end_wire.py`` asserts the bound, passes); the
  cut never lengthens a life (``min``), a later put under the same name is ignored
  (``put`` never replaces, so it cannot restore 200 s), only names the failed request
  kept afresh are cut, in its own early scope (a third party's failing INVITE under
  alice's Call-ID and tag cuts none of hers: the names are bound to the dialog's AoRs
  and the request did not keep hers afresh).  A stranger's 2xx after the failure must
  match tm's branch (an off-path sender cannot) and cannot open under the offer key (an
  untrusted hop holds no CEK), so it moves no key into a confirmed dialog.  The callee
  (who holds the CEK) answering 486 then 200 within 32 s gets a normal call: that is
  the intended late-2xx path, each fork bounded by ``MAX_FORKS`` as before.  The
  keeper quota is charged 32 s for a failed attempt instead of 0, less than the 200 s
  an unanswered INVITE already costs.
- A possible honest break was examined and not confirmed: a late-2xx call whose 200
  does not reuse the offer key (callee with ``cek_reuse`` off) would leave the caller's
  offer key in the early scope only 32 s (instead of 200 s) for her first keyed
  in-dialog request; but the product's own UA drops its offered key on the failure
  answer (docs/protocol.md §2) and re-keys afresh, so no honest product UA reaches it.
"""

from __future__ import annotations

import socket
import sqlite3
import time

import pytest

from e2m_lab.certclient import CertClient
from e2m_lab.kamailio_harness import SipUa, start_proxy
from e2m_lab.ports import free_port
from e2m_plugins.sip import make_response, parse
from e2m_plugins.testpki import issue_user
from kamailio_app.cert_route import contact_uri
from kamailio_app.config import Listener
from tests.kamailio.test_certservice_attacks import frame_length
from tests.kamailio.test_certservice_wire import BOB, USERS, _large_certificate, _publish_ok, der

pytestmark = pytest.mark.kamailio


def _has_address(address: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


def _subscribe6(address: str, port: int) -> tuple[int | None, int]:
    """A raw IPv6 follow of bob from ``address``: (final status, NOTIFYs answered)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    mine = sock.getsockname()[1]
    call_id = f"r127-v6-{time.monotonic_ns()}"
    request = "\r\n".join([
        f"SUBSCRIBE {BOB} SIP/2.0",
        f"Via: SIP/2.0/UDP [{address}]:{mine};rport;branch=z9hG4bKr127{time.monotonic_ns()}",
        "From: <sip:x@example.net>;tag=t1", f"To: <{BOB}>", f"Call-ID: {call_id}",
        "CSeq: 1 SUBSCRIBE", "Max-Forwards: 70", "Event: certificate",
        "Accept: application/pkix-cert", "Expires: 3600",
        f"Contact: <sip:x@[{address}]:{mine}>", "Content-Length: 0", "", ""])
    status, notifies = None, 0
    try:
        sock.sendto(request.encode(), (address, port))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, source = sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                break
            message = parse(data)
            if message.is_request and message.method == "NOTIFY":
                sock.sendto(make_response(message, 200, "OK").serialize(), source)
                notifies += 1
            elif not message.is_request and message.call_id == call_id:
                status = message.status
    finally:
        sock.close()
    return status, notifies


@pytest.mark.parametrize("address", ["::1", "fd00::2"])
def test_control_ipv6_subscription_is_claimed_as_the_nodes_own(proxy_factory, address):
    if not _has_address(address):
        pytest.skip(f"{address} is not an address of this host")
    port = free_port()
    listen = [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", f"udp:[{address}]:{port}"]
    proxy = proxy_factory("r127-v6", port=port, extra={"kamailio": {"listen": listen}})
    status, notifies = _subscribe6(address, port)
    assert status == 200 and notifies >= 1, (status, notifies)
    with sqlite3.connect(proxy.directory / "certs.sqlite") as db:
        contacts = [row[0] for row in db.execute("SELECT contact FROM cert_subscriptions")]
    ours = contact_uri("udp", Listener("udp", address, port).host, port)
    # the row is made at a Contact the node claims (CertService._sockets' key)
    assert contacts == [ours], (contacts, ours)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_control_a_stream_follower_hears_of_a_replacement(pki, tmp_path, transport):
    proxy = start_proxy(tmp_path, pki=pki, e2m=True, auth=True, users=USERS,
                        tls=transport == "tls", extra={"certs": {"notify_interval": 1}})
    try:
        bob = CertClient(proxy.port, "bob", password=USERS["bob"], source="127.0.0.61")
        etag = _publish_ok(bob, der(pki.user("bob", "ec")))
        alice = CertClient(proxy.tls_port if transport == "tls" else proxy.port, "alice",
                           source="127.0.0.62", transport=transport,
                           ca_file=pki.directory / "ca.crt")
        answer, _ = alice.subscribe(BOB, 600)
        assert answer is not None and answer.status == 200, answer
        assert len(alice.wait_notifies(1)) == 1
        replacement = der(issue_user(pki.ca, BOB, "ec"))
        _publish_ok(bob, replacement, etag=etag)
        notifies = alice.wait_notifies(2, timeout=6)
        assert len(notifies) == 2 and notifies[1].body == replacement
        bob.close()
        alice.close()
    finally:
        proxy.stop()


@pytest.mark.parametrize("tcp_elsewhere", [False, True], ids=["tcp-same-port", "tcp-other-port"])
def test_control_a_large_change_reaches_a_udp_follower_over_tcp(pki, tmp_path, tcp_elsewhere):
    port = free_port()
    tcp = free_port(avoid={port}) if tcp_elsewhere else port
    proxy = start_proxy(tmp_path, pki=pki, e2m=True, auth=True, users=USERS, port=port,
                        extra={"certs": {"notify_interval": 1},
                               "kamailio": {"listen": [f"udp:127.0.0.1:{port}",
                                                       f"tcp:127.0.0.1:{tcp}"]}})
    made: list = []
    try:
        bob = CertClient(proxy.port, "bob", password=USERS["bob"], source="127.0.0.61")
        made.append(bob)
        etag = _publish_ok(bob, der(pki.user("bob", "ec")))
        ua = SipUa(proxy.port, user="carol", source="127.0.0.63")
        made.append(ua)
        listener = socket.socket()           # RFC 3261 18.2.1: TCP at the UDP port too
        made.append(listener)
        listener.bind((ua.source, ua.local_port))
        listener.listen(1)
        listener.settimeout(8)
        request = "\r\n".join([
            f"SUBSCRIBE {BOB} SIP/2.0",
            f"Via: SIP/2.0/UDP {ua.source}:{ua.local_port};rport;branch=z9hG4bKr127"
            f"{time.monotonic_ns()}",
            "From: <sip:carol@example.com>;tag=c1", f"To: <{BOB}>",
            f"Call-ID: r127-big-{time.monotonic_ns()}", "CSeq: 1 SUBSCRIBE", "Max-Forwards: 70",
            "Event: certificate", "Accept: application/pkix-cert", "Expires: 600",
            f"Contact: <sip:carol@{ua.source}:{ua.local_port}>", "Content-Length: 0", "", ""])
        ua.sock.sendto(request.encode(), ("127.0.0.1", proxy.port))
        answer = ua.receive(3)
        assert answer is not None and answer.status == 200, answer
        first = ua.receive(3)
        assert first is not None and first.method == "NOTIFY"
        ua.send(make_response(first, 200, "OK"))       # confirmed: no longer on probation
        time.sleep(0.5)
        large = _large_certificate(pki, BOB, 10 * 1024)
        _publish_ok(bob, large, etag=etag)
        conn, _ = listener.accept()
        made.append(conn)
        conn.settimeout(5)
        data = b""
        while (length := frame_length(data) if data else None) is None or len(data) < length:
            chunk = conn.recv(65535)
            assert chunk, "the proxy closed the connection before a whole NOTIFY"
            data += chunk
        notify = parse(data[:frame_length(data)])
        conn.sendall(make_response(notify, 200, "OK").serialize())
        assert notify.method == "NOTIFY" and notify.body == large
        assert notify.call_id == first.call_id and notify.cseq[0] == first.cseq[0] + 1
    finally:
        for item in made:
            item.close()
        proxy.stop()
