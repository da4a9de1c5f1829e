"""An eighty-first attacker's review (December 2026) of 3653837: TLS at the proxy (the
``[tls]`` listener, the tls.cfg the launcher renders, ``sips:`` routing), with stock
clients (``openssl s_client``, Python's ``ssl``), on a real Kamailio 5.6.3.

Hole 1 (``test_hole_a_sips_request_is_relayed_over_udp``): **untrusted hop** on the
callee's leg (it only reads what passes).  Alice, over TLS to the proxy and
authenticated, sends ``MESSAGE sips:bob@example.com`` (text/plain, "secret over sips"):
she asks for TLS on every hop (RFC 3261 §26.2.2, RFC 5630 §3.1.3).  Bob registered
``sip:bob@127.0.0.1:PORT`` over UDP.  The proxy answers 200 and relays the request to
bob over UDP, Request-URI rewritten to ``sip:``: the body, the From, the labels and
policy headers cross the UDP leg in clear, read by the hop alice asked to keep out.
At fault: ``kamailio_app/kemi.py`` ``route_target`` (line 880-882: ``rc =
KSR.registrar.lookup("location")`` / ``if rc > 0: return True``; likewise the
``next_hop`` branches, lines 884 and 892): nothing compares the scheme of the Request-URI
as received (``$ou``) with the transport the destination is reached over.  Fix: when
``$ou`` (or the top Route used) is ``sips:``, relay only if the destination is TLS
(``$du``/``$ru`` ``sips:`` or ``;transport=tls``, i.e. ``$dP``/``$nh(P)`` is ``tls``),
else answer ``480 Temporarily Unavailable`` with ``Warning: 380 ... "SIPS Not
Allowed"`` (RFC 5630 §3.1.3); the same rule on the failure route's next branch.

Hole 2 (``test_hole_a_stranger_on_alices_address_gets_her_requests``): **off-path
sender** sharing alice's public address (a carrier or hotel NAT, the seat of reviews 29
and 78), no account and no client certificate (``verify_client`` is off by default).
Alice registers over TLS; her contact is ``sip:alice@ADDR:PORT;transport=tls``, the
source of her connection.  Her connection dies (RST: a phone gone from its NAT); the
stranger opens a TLS connection from the same ``ADDR:PORT`` (the NAT hands the freed
port on; on loopback: ``SO_REUSEADDR`` and bind).  Bob then sends alice a MESSAGE: the
proxy looks alice's binding up and Kamailio sends the request down the connection that
now has that address, the stranger's.  Effect: the stranger reads bob's text for
alice (and would take her calls: answer, or hold bob's INVITE), for as long as her
binding lives (up to ``max_expires``).  At fault: ``kamailio_app/kemi.py``
``route_target`` (line 880, ``KSR.registrar.lookup``) with ``route_register``
(``KSR.registrar.save("location", 0)``): the binding keeps the address, not the
connection it was registered on; Kamailio's TCP layer finds a connection by address
(alias), whoever opened it.  Fix: relay to a TCP/TLS contact only on the connection it
was registered from: keep ``$conid`` with the binding (usrloc keeps it as the
contact's ``tcpconn_id``, readable with ``$ulc``/``reg_fetch_contacts``, or an htable
keyed by the binding's ruid), and after ``lookup`` use ``KSR.tcpops.tcp_conid_state``
to check it is still that connection, with ``set_forward_no_connect()`` so no other is
opened or picked; answer 480 when it is gone (or adopt RFC 5626 outbound, where the
flow token names the connection).

Hole 3 (``test_hole_a_hop_on_the_callees_leg_moves_the_callers_leg_off_tls``):
**untrusted hop** on the callee's UDP leg (it rewrites what it forwards).  Alice calls
bob over TLS (authenticated INVITE); the proxy record-routes twice (``r2=on``): a UDP
entry facing bob and ``sip:127.0.0.1:TLSPORT;transport=tls;r2=on;lr;e2m-rr=TOKEN``
facing alice.  The hop rewrites the second entry in bob's 200 to its own UDP address,
``sip:HOP:PORT;r2=on;lr;e2m-rr=TOKEN`` (token kept).  The proxy relays the 200 to
alice as it is.  Alice, following her route set (RFC 3261 §12.2), sends her BYE over
UDP to the hop; the hop answers 407 with the proxy's realm and a nonce of its own
choosing, and alice answers it.  Effect: her in-dialog leg is off TLS and runs through
the hop, and the hop holds a digest response for its own nonce: an offline password
guess checks against it (the test verifies the right guess matches), which the TLS
leg was there to prevent ("Digest no longer crosses the visited network in the clear",
issue 14).  The hop can relay her requests on: the token still admits them over UDP
(a BYE so sent to the proxy was relayed to bob, seen while probing).  At fault:
``kamailio_app/kemi.py`` ``record_route`` (line 466, ``KSR.rr.add_rr_param(
self.app.routes.param(call_id, from_tag or ""))``; ``dialog_route.py`` line 73,
``param`` binds Call-ID and tag only) and ``ksr_onreply_route``/``route_reply``
(lines 1163, 1200), which relay a 2xx whose Record-Route entries carrying our token
were rewritten. Fix: in the reply route, for a 2xx (and 18x) to a request we record-
routed, check that the entries with our token are the ones we wrote (host, port,
transport; for ``r2=on`` the pair as written) and drop the reply otherwise, or rewrite
them back; and bind the token to the side's transport (HMAC over Call-ID, tag and
``tls``/``udp``) so an in-dialog request on the caller's side over anything but TLS is
refused.

Controls (each passes): the legitimate flows (a ``sip:`` MESSAGE over TLS to a UDP
contact; bob's MESSAGE to alice on her live TLS connection, and a stranger's TLS
connection from another port of her address gets nothing; alice's 200 names the
proxy's TLS socket and her BYE along it reaches bob) and what held below.

What held (controls here, beside ``test_tls_wire.py``'s TLS 1.1 refusal):

1. Renegotiation: a client-initiated renegotiation (``s_client`` ``R``) on TLS 1.2 ends
   the connection (Kamailio's tls module refuses it by default); nothing reaches a worker.
2. Ciphers: a client offering only static-RSA CBC suites (``AES128-SHA``) and one
   offering NULL/aNULL/RC4/3DES suites get ``no shared cipher``; TLS 1.3 and TLS 1.2
   ECDHE-AEAD are what is agreed.
3. SNI naming another domain (``-servername evil.example.org``): the one default profile
   answers with the proxy's own certificate (no profile chosen by the client's name),
   and the request that follows is handled as any other: nothing to gain.
4. Digest over TLS is not bound to the connection: after alice's REGISTER succeeded on
   her TLS connection, a MESSAGE on that same connection without credentials is
   challenged (401/407) and not relayed; each request carries its own digest.

5. The phone (``tests/pjsua/test_review81_phone.py``): a proxy presenting a
   certificate of the phone's own CA for another name, or an expired one naming the
   address, gets no REGISTER (``PJSIP_TLS_ECERTVERIF``).

Not tried for lack of time: a reply for alice after her connection closed (the same
alias lookup as hole 2 should give it to the stranger too), a client certificate naming
another user with ``verify_client`` on (nothing in kemi.py reads the client
certificate: digest alone names the user), and the phone's own behaviour on a route
set rewritten to UDP (it has one TLS transport only: pjsip would fail the send rather
than use UDP; not run).

Fixed (stop 33): (1) a request to a ``sips:`` URI whose next hop is not TLS gets 480
with ``Warning: 380 "SIPS Not Allowed"`` (``kemi._sips_leaves_tls`` in ``relay``); (2) a
single proxy sets usrloc ``handle_lost_tcp``, so a contact goes with its connection (a
cluster cannot: Known limits); (3) the core reply route drops a reply in which an entry
carrying our token names no socket of ours (``moved_route_entries``).  The three holes
turned XPASS and the markers are gone; hole 3 now asserts the drop (alice gets no 200
whose route set leads to the hop) instead of a restored entry.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from e2m_lab.kamailio_harness import (RawUas, SipUa, parse_address_uri, parse_challenge,
                                      register_contact)
from e2m_plugins.sip import SipMessage, make_response, parse

pytestmark = [pytest.mark.kamailio, pytest.mark.openssl]

USERS = {"alice": "alice-R81-Pass", "bob": "bob-R81-Pass"}


def _bob_phone() -> RawUas:
    uas = RawUas()

    def respond(request: SipMessage) -> SipMessage:
        return make_response(request, 200, "OK")
    uas.responder = respond
    return uas


def _alice_tls(proxy, pki, source: str) -> SipUa:
    return SipUa(proxy.tls_port, transport="tls", user="alice", password=USERS["alice"],
                 source=source, ca_file=pki.directory / "ca.crt")


def _message_to_bob(ua: SipUa, scheme: str, text: bytes) -> SipMessage | None:
    uri = f"{scheme}:bob@example.com"
    return ua.request(ua.build("MESSAGE", uri, to=uri, body=text, content_type="text/plain"))


# -- hole 1: sips: relayed over UDP --------------------------------------------------

def test_control_a_sip_message_over_tls_reaches_a_udp_contact(proxy_factory, pki):
    home = proxy_factory("r81-sip", e2m=False, tls=True, auth=True, users=USERS)
    bob = _bob_phone()
    register_contact(home, "bob", bob.port, password=USERS["bob"], source="127.0.0.81")
    ua = _alice_tls(home, pki, "127.0.0.82")
    try:
        assert ua.register().status == 200
        answer = _message_to_bob(ua, "sip", b"plain sip over tls")
        assert answer is not None and answer.status == 200
        got = bob.wait_for(1, method="MESSAGE", timeout=2)
        assert [m.body for m in got] == [b"plain sip over tls"]
        assert got[0].get("Via").startswith("SIP/2.0/UDP")
    finally:
        ua.close()
        bob.close()


def test_hole_a_sips_request_is_relayed_over_udp(proxy_factory, pki):
    home = proxy_factory("r81-sips", e2m=False, tls=True, auth=True, users=USERS)
    bob = _bob_phone()
    register_contact(home, "bob", bob.port, password=USERS["bob"], source="127.0.0.83")
    ua = _alice_tls(home, pki, "127.0.0.84")
    try:
        assert ua.register().status == 200
        answer = _message_to_bob(ua, "sips", b"secret over sips")
        assert answer is not None            # authenticated and answered, as a control
        got = bob.wait_for(1, method="MESSAGE", timeout=2)
        # secure: a sips: request never leaves over UDP (480/"SIPS Not Allowed" instead)
        assert got == [], "relayed over UDP: %r" % [(m.request_uri, m.body) for m in got]
        assert answer.status >= 400
    finally:
        ua.close()
        bob.close()


# -- hole 2: a stranger's connection from alice's address takes her requests --------

def _tls_from(port: int, source: str, source_port: int, ca: Path) -> ssl.SSLSocket:
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    raw.bind((source, source_port))
    raw.settimeout(3)
    raw.connect(("127.0.0.1", port))
    return ssl.create_default_context(cafile=str(ca)).wrap_socket(
        raw, server_hostname="127.0.0.1")


def _read_for(sock: ssl.SSLSocket, seconds: float) -> bytes:
    data = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65535)
        except (socket.timeout, TimeoutError, ssl.SSLError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


def _send_in_background(bob: SipUa, text: bytes) -> threading.Thread:
    """bob's MESSAGE to alice (answering the proxy's challenge) on a thread of its own."""
    thread = threading.Thread(target=bob.message, args=("alice", text), daemon=True)
    thread.start()
    return thread


def test_control_bob_reaches_alice_on_her_tls_connection_only(proxy_factory, pki):
    home = proxy_factory("r81-conn", e2m=False, tls=True, auth=True, users=USERS)
    ca = pki.directory / "ca.crt"
    alice = _alice_tls(home, pki, "127.0.0.85")
    stranger = _tls_from(home.tls_port, "127.0.0.85", 0, ca)    # same address, other port
    bob = SipUa(home.port, user="bob", password=USERS["bob"], source="127.0.0.86")
    try:
        assert alice.register().status == 200
        sender = _send_in_background(bob, b"for alice only")
        request = alice.receive(5)
        assert request is not None and request.method == "MESSAGE"
        assert request.body == b"for alice only"
        alice.send(make_response(request, 200, "OK"))
        sender.join(5)
        assert _read_for(stranger, 1.0) == b""
    finally:
        for item in (alice, bob):
            item.close()
        stranger.close()


def test_hole_a_stranger_on_alices_address_gets_her_requests(proxy_factory, pki):
    home = proxy_factory("r81-reuse", e2m=False, tls=True, auth=True, users=USERS)
    ca = pki.directory / "ca.crt"
    alice = _alice_tls(home, pki, "127.0.0.87")
    port = alice.local_port
    assert alice.register().status == 200
    assert alice.contact.endswith(f"127.0.0.87:{port};transport=tls>")
    alice.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    alice.close()                                  # RST: her connection is gone
    time.sleep(0.5)
    stranger = _tls_from(home.tls_port, "127.0.0.87", port, ca)   # no account, no cert
    bob = SipUa(home.port, user="bob", password=USERS["bob"], source="127.0.0.88")
    try:
        sender = _send_in_background(bob, b"for alice only")
        seen = _read_for(stranger, 3.0)
        sender.join(6)
        assert seen.startswith(b"MESSAGE ") or seen == b"", seen[:200]   # well formed, if any
        # secure: nothing for alice goes down a connection she did not register on
        assert b"for alice only" not in seen, seen[:300]
    finally:
        bob.close()
        stranger.close()


# -- what held ---------------------------------------------------------------------

def _s_client(port: int, ca: str, *args: str) -> str:
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args,
                          "-CAfile", ca, "-brief"], input="", capture_output=True,
                         text=True, timeout=20)
    return out.stdout + out.stderr


def test_control_ciphers_and_sni(proxy_factory, pki):
    home = proxy_factory("r81-ciphers", e2m=False, tls=True, auth=True, users=USERS)
    ca = str(pki.directory / "ca.crt")
    for suites in ("AES128-SHA:AES256-SHA:AES128-SHA256", "NULL:eNULL:aNULL:RC4:3DES:DES"):
        out = _s_client(home.tls_port, ca, "-tls1_2", "-cipher", suites)
        assert "CONNECTION ESTABLISHED" not in out, out[-400:]
    assert home.wait_log("no shared cipher")
    out = _s_client(home.tls_port, ca, "-tls1_2", "-servername", "evil.example.org")
    assert "CONNECTION ESTABLISHED" in out and "CN = proxy.example.com" in out
    assert "Verification: OK" in out
    out = _s_client(home.tls_port, ca, "-tls1_3")
    assert "Protocol version: TLSv1.3" in out


def test_control_client_renegotiation_ends_the_connection(proxy_factory, pki):
    home = proxy_factory("r81-reneg", e2m=False, tls=True, auth=True, users=USERS)
    ca = str(pki.directory / "ca.crt")
    mark = home.log_mark()
    client = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{home.tls_port}",
                               "-tls1_2", "-CAfile", ca], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)
        assert client.poll() is None                    # the handshake completed
        client.stdin.write(b"R\n")
        client.stdin.flush()
        client.wait(timeout=5)                          # the proxy ended the connection
        output = client.stdout.read().decode(errors="replace")
        assert "RENEGOTIATING" in output
        assert "e2m:" not in home.log_since(mark)        # nothing reached a worker
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_control_each_request_on_a_tls_connection_is_challenged(proxy_factory, pki):
    home = proxy_factory("r81-digest", e2m=False, tls=True, auth=True, users=USERS)
    bob = _bob_phone()
    register_contact(home, "bob", bob.port, password=USERS["bob"], source="127.0.0.89")
    ua = _alice_tls(home, pki, "127.0.0.90")
    try:
        assert ua.register().status == 200
        # the same connection, a request without credentials: challenged, not relayed
        bare = ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                        body=b"no credentials", content_type="text/plain")
        answer = ua.transact(bare)
        assert answer is not None and answer.status in (401, 407)
        assert bob.wait_for(1, method="MESSAGE", timeout=1) == []
    finally:
        ua.close()
        bob.close()


# -- hole 3: the caller's TLS Record-Route rewritten by a hop on the callee's leg -----

def _callee_behind_hop(home, rewrite) -> RawUas:
    """bob's UAS; its 200 passes a hop on his UDP leg that applies ``rewrite`` to each
    Record-Route entry (the proxy's double Record-Route: UDP for bob, TLS for alice)."""
    uas = RawUas()

    def respond(request: SipMessage) -> SipMessage:
        answer = make_response(request, 200, "OK")
        if request.method == "INVITE":
            answer = answer.replace("To", f"{request.get('To')};tag=bt81")
            answer = answer.add("Contact", f"<sip:bob@127.0.0.1:{uas.port}>")
            answer = answer.remove("Record-Route")         # the hop's version instead
            for route in request.get_all("Record-Route"):
                answer = answer.add("Record-Route", rewrite(route))
        return answer
    uas.responder = respond
    return uas


def _invite_over_tls(home, pki, source: str) -> tuple[SipUa, SipMessage, SipMessage]:
    ua = _alice_tls(home, pki, source)
    assert ua.register().status == 200
    ok = ua.request(ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com"),
                    timeout=8)
    assert ok is not None and ok.status == 200, ok
    return ua, ua.sent[-1], ok


def _bye(ua: SipUa, invite: SipMessage, ok: SipMessage) -> SipMessage:
    routes = list(reversed(ok.get_all("Record-Route")))
    return ua.build("BYE", parse_address_uri(ok.get("Contact") or ""), to="sip:bob@example.com",
                    call_id=invite.get("Call-ID"), from_tag=invite.from_tag,
                    to_tag=ok.to_tag, routes=routes, cseq=invite.cseq[0] + 10)


def test_control_the_callers_record_route_names_the_tls_side(proxy_factory, pki):
    home = proxy_factory("r81-rr-ok", e2m=False, tls=True, auth=True, users=USERS)
    bob = _callee_behind_hop(home, lambda route: route)
    register_contact(home, "bob", bob.port, password=USERS["bob"], source="127.0.0.93")
    ua, invite, ok = _invite_over_tls(home, pki, "127.0.0.94")
    try:
        routes = ok.get_all("Record-Route")
        assert any(f":{home.tls_port};transport=tls" in r for r in routes), routes
        answer = ua.request(_bye(ua, invite, ok))       # along the route set, over TLS
        assert answer is not None and answer.status == 200
        assert [m.method for m in bob.wait_for(2, timeout=2)] == ["INVITE", "BYE"]
    finally:
        ua.close()
        bob.close()


def _digest_response(fields: dict[str, str], method: str, guess: str) -> str:
    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()
    ha1 = md5(f"{fields['username']}:{fields['realm']}:{guess}")
    ha2 = md5(f"{method}:{fields['uri']}")
    return md5(f"{ha1}:{fields['nonce']}:{fields['nc']}:{fields['cnonce']}:auth:{ha2}")


class _Hop:
    """The untrusted hop's own UDP socket: it challenges the first request it gets
    (realm of the proxy, a nonce of its choosing) and keeps the answer."""

    def __init__(self, realm: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))   # SipUa sends to 127.0.0.1
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.realm = realm
        self.got: list[SipMessage] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            request = parse(data)
            self.got.append(request)
            if request.get("Proxy-Authorization"):
                answer = make_response(request, 200, "OK")
            else:
                answer = make_response(request, 407, "Proxy Authentication Required").add(
                    "Proxy-Authenticate",
                    f'Digest realm="{self.realm}", nonce="chosen-by-the-hop", qop="auth"')
            self.sock.sendto(answer.serialize(), peer)

    def close(self) -> None:
        self._stop = True
        self._thread.join(1)
        self.sock.close()


def test_hole_a_hop_on_the_callees_leg_moves_the_callers_leg_off_tls(proxy_factory, pki):
    home = proxy_factory("r81-rr-hop", e2m=False, tls=True, auth=True, users=USERS)
    hop: _Hop | None = None

    def to_the_hop(route: str) -> str:      # keeps the route token, drops TLS
        assert hop is not None
        return re.sub(r"sip:127\.0\.0\.1:\d+;transport=tls", f"sip:127.0.0.1:{hop.port}",
                      route)
    bob = _callee_behind_hop(home, to_the_hop)
    register_contact(home, "bob", bob.port, password=USERS["bob"], source="127.0.0.96")
    ua = _alice_tls(home, pki, "127.0.0.97")
    realm = None
    try:
        assert ua.register().status == 200
        realm = parse_challenge(ua.received[0].get("WWW-Authenticate") or "")["realm"]
        hop = _Hop(realm)
        mark = home.log_mark()
        ok = ua.request(ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com"),
                        timeout=3)
        # Fixed (stop 33): the 200 whose entry with our token names the hop never
        # reaches alice, so she has no route set through it (the hop can drop a call
        # anyway; it can no longer move her leg)
        assert ok is None or ok.status != 200 or all(
            f"127.0.0.1:{hop.port}" not in r for r in ok.get_all("Record-Route")), ok
        assert home.wait_log("not ours: dropped", mark)
    finally:
        ua.close()
        bob.close()
        if hop is not None:
            hop.close()
