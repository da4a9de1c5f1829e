"""``e2m-phone`` against a home proxy that lets in only its own users (issue 14 §4):
HTTP Digest (``[phone] password_file`` / ``E2M_PHONE_PASSWORD``) and TLS toward the
proxy (``[phone] transport = "tls"``, verified against ``[trust] ca``).

A real Kamailio (``e2m-proxy`` with ``[auth]`` and a ``tls:`` listener), real
``e2m-phone`` processes, a loopback capture for what crosses the wire.  Evidence is
read from the capture, the phones' JSON events and the proxy's archive.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2m_lab.capture import Capture, tcpdump_command
from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_lab.phones import PhoneProcess, run_phone, write_ua
from e2m_lab.pytest_fixtures import PhoneGroup, phone_group

from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2]

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"
PROXY_HOST = "proxy.example.com"
# random per run: a test that finds one in a log or a packet found a real leak
PASSWORDS = {"alice": "al-" + secrets.token_urlsafe(12), "bob": "bo-" + secrets.token_urlsafe(12)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("auth-pki"), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """The home proxy: E2M and archive, digest for its users, a TLS listener."""
    handle = start_proxy(tmp_path_factory.mktemp("home"), pki=pki, e2m=True, auth=True,
                         users=dict(PASSWORDS), tls=True)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def phones(request: pytest.FixtureRequest, home: ProxyHandle) -> Iterator[PhoneGroup]:
    with phone_group(request, [home]) as group:
        yield group


def ua(directory: Path, pki: TestPKI, name: str, home: ProxyHandle, *, tls: bool = False,
       password: str | None = "right", trust: TestPKI | None = None,
       phone: dict[str, Any] | None = None) -> Path:
    """UA.toml for ``name`` at ``home``; ``password``: "right", a wrong one, or None
    (no password_file).  The password file sits next to the UA.toml, mode 0600."""
    directory = directory / name
    directory.mkdir(parents=True, exist_ok=True)
    target = home.tls_uri if tls else home.uri
    settings: dict[str, Any] = {"registrar": target, "proxy": target,
                                "register_via_proxy": False, "srtp": True}
    if tls:
        settings["transport"] = "tls"
    if password is not None:
        secret = directory / "password"
        secret.write_text((PASSWORDS[name] if password == "right" else password) + "\n")
        secret.chmod(0o600)
        settings["password_file"] = "password"       # relative to the UA.toml
    settings.update(phone or {})
    assert pki.directory is not None
    path = write_ua(directory, name, pki.directory, peer="bob" if name == "alice" else "alice",
                    phone=settings, e2m={"cert_url_hosts": ["127.0.0.1"]})
    if trust is not None:     # another CA as the only anchor
        assert trust.directory is not None
        text = path.read_text().replace(str(pki.directory / "ca.crt"),
                                        str(trust.directory / "ca.crt"))
        path.write_text(text)
    return path


def wire_capture(tmp_path: Path, home: ProxyHandle) -> Capture:
    if tcpdump_command() is None:
        pytest.skip("tcpdump cannot capture here")
    cap = Capture(tmp_path / "wire.pcap", f"udp port {home.port}")
    if not cap.running:
        pytest.skip(cap.why_not)
    return cap


def sip_on_wire(cap: Capture) -> list[sip.SipMessage]:
    cap.stop()
    out = []
    for _, _, payload in cap.datagrams():
        if b"SIP/2.0" in payload[:200]:
            try:
                out.append(sip.parse(payload))
            except Exception:  # noqa: BLE001 - keep-alives, fragments
                pass
    return out


def no_secret_anywhere(texts: list[bytes | str], *secrets_: str) -> None:
    for secret in secrets_:
        for text in texts:
            data = text.encode() if isinstance(text, str) else text
            assert secret.encode() not in data, "a secret (plaintext or password) leaked"


# --------------------------------------------------------------------------- register

def test_register_without_a_password_is_refused(tmp_path, pki, home):
    """Today's phone (no credentials) against the auth proxy: 401, never registered."""
    result = run_phone(ua(tmp_path, pki, "alice", home, password=None), "register")
    assert result.rc == 1
    (failed_event,) = result.of("register_failed")
    assert failed_event["code"] == 401
    assert not result.of("registered")


def test_register_with_the_right_password(tmp_path, pki, home):
    result = run_phone(ua(tmp_path, pki, "alice", home), "register")
    assert result.rc == 0, result.stderr
    (registered,) = result.of("registered")
    assert registered["code"] == 200
    assert PROXY_HOST in {p["host"] for p in registered["policies"]}
    no_secret_anywhere([result.stderr, repr(result.events)], PASSWORDS["alice"])


def test_register_with_a_wrong_password_is_refused(tmp_path, pki, home):
    wrong = "wrong-" + secrets.token_hex(6)
    result = run_phone(ua(tmp_path, pki, "alice", home, password=wrong), "register")
    assert result.rc == 1
    assert not result.of("registered")
    assert [e["code"] for e in result.of("register_failed")] == [401]
    assert "registration failed" in result.stderr
    no_secret_anywhere([result.stderr, repr(result.events), home.log_since(0)], wrong)


def test_password_from_the_environment(tmp_path, pki, home):
    config = ua(tmp_path, pki, "bob", home, password=None)
    result = run_phone(config, "register", env={"E2M_PHONE_PASSWORD": PASSWORDS["bob"]})
    assert result.rc == 0, result.stderr
    assert result.of("registered")[0]["code"] == 200


def test_a_password_file_others_may_read_is_refused(tmp_path, pki, home):
    config = ua(tmp_path, pki, "alice", home)
    (config.parent / "password").chmod(0o644)
    result = run_phone(config, "register")
    assert result.rc == 2
    assert "chmod 600" in result.stderr and PASSWORDS["alice"] not in result.stderr


def test_someone_elses_password_does_not_register_this_aor(tmp_path, pki, home):
    """alice's phone with auth_user bob and bob's password: bob may register only bob."""
    result = run_phone(ua(tmp_path, pki, "alice", home, password=PASSWORDS["bob"],
                          phone={"auth_user": "bob"}), "register")
    assert result.rc == 1
    assert [e["code"] for e in result.of("register_failed")] == [403]


# --------------------------------------------------------------------------- 407 retries

@pytest.mark.tcpdump
def test_message_and_call_through_407_each_body_protected_for_its_own_attempt(
        tmp_path, pki, home, phones):
    wire = wire_capture(tmp_path, home)
    mark = home.log_mark()
    bob = phones.start("bob", ua(tmp_path, pki, "bob", home))
    alice = phones.start("alice", ua(tmp_path, pki, "alice", home))
    text = "through digest " + secrets.token_hex(8)

    alice.send(f"message {BOB} {text}")
    sent = alice.wait("message_sent")
    got = bob.wait("message_in")
    assert got["text"] == text
    assert sent["code"] == 200 and sent["attempts"] == 1      # no E2M retry: digest only
    assert got["security"]["encrypted"] and got["security"]["peer"] == ALICE

    alice.send(f"call {BOB}")
    media = alice.wait("call_media", lambda e: "active" in e["audio"])
    bob.wait("call_media", lambda e: "active" in e["audio"])
    mark_a = alice.mark()
    alice.send("hangup")
    alice.wait("call_ended", since=mark_a)
    bob.wait("call_ended")

    messages = sip_on_wire(wire)
    for method, call_id in (("MESSAGE", sent["call_id"]), ("INVITE", media["call_id"])):
        requests = [m for m in messages if m.is_request and m.method == method
                    and m.call_id == call_id and m.request_uri.startswith("sip:bob")
                    and "alice" in (m.get("From") or "")]
        # the phone's own sends toward the proxy (the proxy's forwarded copy has a 2nd Via)
        sent_by_phone = [m for m in requests if len(m.get_all("Via")) == 1]
        challenges = [m for m in messages if not m.is_request and m.status == 407
                      and m.call_id == call_id]
        assert challenges, f"no 407 to the {method}"
        first, *retries = sorted({m.cseq[0]: m for m in sent_by_phone}.values(),
                                 key=lambda m: m.cseq[0])
        assert retries, f"no {method} retry after the 407"
        retry = retries[-1]
        assert first.get("Proxy-Authorization") is None
        assert retry.get("Proxy-Authorization") is not None
        # each attempt carries a body of its own, made for its own CSeq
        for attempt in (first, retry):
            assert (attempt.get("Content-Type") or "").startswith(("application/pkcs7-mime",
                                                                    "multipart/"))
        assert first.body != retry.body, "the retry reused the first attempt's body"
        # the proxy forwarded only the authenticated attempt, its credentials removed
        forwarded = [m for m in requests if len(m.get_all("Via")) >= 2]
        assert forwarded and all(m.cseq[0] == retry.cseq[0] for m in forwarded)
        assert all(m.get("Proxy-Authorization") is None for m in forwarded)
    # the home proxy read the text once, from the retry (the first attempt was refused
    # before inspection)
    with sqlite3.connect(home.archive_path) as db:
        rows = db.execute("SELECT plaintext FROM bodies WHERE call_id = ? AND method = "
                          "'MESSAGE'", (sent["call_id"],)).fetchall()
    assert [bytes(r[0]) for r in rows] == [text.encode()]
    # no plaintext or password on the wire, in the phones' output or the proxy's log
    packets = [p for _, _, p in wire.datagrams()]
    assert not [p for p in packets if b"m=audio" in p or b"a=crypto" in p]
    no_secret_anywhere(packets + [alice.stderr(), bob.stderr(), home.log_since(mark),
                                  repr(alice.events)],
                       text, PASSWORDS["alice"], PASSWORDS["bob"])
    no_secret_anywhere([repr(bob.events)], PASSWORDS["alice"], PASSWORDS["bob"])


# --------------------------------------------------------------------------- TLS

def test_message_and_call_over_tls_with_digest(tmp_path, pki, home, phones):
    mark = home.log_mark()
    bob = phones.start("bob", ua(tmp_path, pki, "bob", home, tls=True))
    alice = phones.start("alice", ua(tmp_path, pki, "alice", home, tls=True))
    assert alice.wait("started")["transport"] == "tls"
    text = "over tls " + secrets.token_hex(8)
    alice.send(f"message {BOB} {text}")
    assert alice.wait("message_sent")["code"] == 200
    assert bob.wait("message_in")["text"] == text

    alice.send(f"call {BOB}")
    media = alice.wait("call_media", lambda e: "active" in e["audio"])
    bob.wait("call_media", lambda e: "active" in e["audio"])
    offer = media["security"][0]
    assert offer["what"] == "INVITE" and PROXY_HOST in offer["security"]["readable_by"]
    mark_a = alice.mark()
    alice.send("hangup")
    alice.wait("call_ended", since=mark_a)
    log = home.log_since(mark)
    no_secret_anywhere([log, alice.stderr(), bob.stderr()], text, PASSWORDS["alice"])


def test_tls_to_a_proxy_whose_certificate_is_from_another_ca_is_refused(tmp_path, pki,
                                                                        tmp_path_factory):
    """The phone trusts only its own CA; a proxy with a TLS certificate of another CA
    (same name, same address) never sees a REGISTER."""
    other = init_test_pki(tmp_path_factory.mktemp("other-pki"), users=("alice",),
                          key_type="ec")
    stranger = start_proxy(tmp_path / "stranger", pki=other, e2m=False, tls=True)
    try:
        result = run_phone(ua(tmp_path, pki, "alice", stranger, tls=True), "register",
                           timeout=40)
        assert result.rc == 1
        assert not result.of("registered")
        (failure,) = result.of("register_failed")
        assert failure["code"] in (502, 503), failure
        assert "certificate" in failure["reason"].lower(), failure
    finally:
        stranger.stop()


def test_tls_phone_refuses_a_plain_registrar_uri(tmp_path, pki, home):
    config = ua(tmp_path, pki, "alice", home, phone={"transport": "tls"})
    result = run_phone(config, "register")
    assert result.rc == 2
    assert "transport=tls" in result.stderr


def test_password_in_the_toml_is_refused(tmp_path, pki, home):
    config = ua(tmp_path, pki, "alice", home, password=None)
    secret = "in-the-toml-" + secrets.token_hex(4)
    config.write_text(config.read_text() + f'password = "{secret}"\n')
    result = run_phone(config, "register")
    assert result.rc == 2
    assert "password_file" in result.stderr and secret not in result.stderr


@pytest.mark.tcpdump
def test_the_challenged_first_attempt_sent_to_the_peer_is_not_delivered_again(
        tmp_path, pki, home, phones):
    """Attack: a MESSAGE's first attempt (protected, then refused with 407) is a valid
    body bound to its own CSeq.  Someone who saw it sends it straight to bob after the
    authenticated retry was delivered: bob must not show the message a second time.
    Since review 102 (stop 37) bob's phone takes requests only from its proxy: the
    straight copy is 403 at the door (``FirstCopy``'s 482 still guards a phone without
    one, or a forged UDP source: ``tests/pjsua/test_review2_phone.py``); sent through
    the home proxy it is challenged again (407) and never reaches bob."""
    import socket

    wire = wire_capture(tmp_path, home)
    bob = phones.start("bob", ua(tmp_path, pki, "bob", home))
    alice = phones.start("alice", ua(tmp_path, pki, "alice", home))
    text = "once only " + secrets.token_hex(8)
    alice.send(f"message {BOB} {text}")
    sent = alice.wait("message_sent")
    bob.wait("message_in")
    wire.stop()
    raw = [p for _, _, p in wire.datagrams() if p.startswith(b"MESSAGE ")
           and sent["call_id"].encode() in p and b"Proxy-Authorization" not in p
           and p.count(b"\nVia:") + p.count(b"\nv:") == 1]
    assert raw, "the capture has no challenged first attempt"
    mark = bob.mark()
    answers = {}
    for where, port in (("straight", bob.port), ("home", home.port)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(3)
            sock.sendto(raw[0], ("127.0.0.1", port))
            try:
                answers[where] = sip.parse(sock.recv(65535)).status
            except (TimeoutError, socket.timeout):
                answers[where] = None
        finally:
            sock.close()
    alice_mark = alice.mark()
    alice.send("status")
    alice.wait("status", since=alice_mark)
    bob.send("status")
    bob.wait("status", since=mark)
    assert not bob.of("message_in", since=mark), f"bob showed the message again ({answers})"
    assert answers == {"straight": 403, "home": 407}
    assert [e["method"] for e in bob.of("request_refused", since=mark)] == ["MESSAGE"]


@pytest.mark.tcpdump
def test_the_challenged_first_invite_sent_to_the_peer_rings_no_second_call(
        tmp_path, pki, home, phones):
    """Attack: the 407-refused first INVITE, sent straight to bob while the real call
    (the authenticated retry) is up, must not start a second call at bob.  Since review
    102 (stop 37) it is 403 at the door of bob's phone (it did not come through the
    home proxy; ``FirstCopy``'s 482 still guards a phone without a proxy:
    ``tests/pjsua/test_review2_phone.py``); through the home it is challenged again."""
    import socket

    wire = wire_capture(tmp_path, home)
    bob = phones.start("bob", ua(tmp_path, pki, "bob", home))
    alice = phones.start("alice", ua(tmp_path, pki, "alice", home))
    alice.send(f"call {BOB}")
    media = alice.wait("call_media", lambda e: "active" in e["audio"])
    bob.wait("call_media", lambda e: "active" in e["audio"])
    wire.stop()
    raw = [p for _, _, p in wire.datagrams() if p.startswith(b"INVITE ")
           and media["call_id"].encode() in p and b"Proxy-Authorization" not in p
           and p.count(b"\nVia:") + p.count(b"\nv:") == 1]
    assert raw, "the capture has no challenged first INVITE"
    mark = bob.mark()
    finals = {}
    for where, port in (("straight", bob.port), ("home", home.port)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(3)
            sock.sendto(raw[0], ("127.0.0.1", port))
            answers = []
            try:
                while True:
                    answers.append(sip.parse(sock.recv(65535)))
                    if answers[-1].status >= 200:
                        break
            except (TimeoutError, socket.timeout):
                pass
            finals[where] = [a.status for a in answers if a.status >= 200]
        finally:
            sock.close()
    bob.send("status")
    bob.wait("status", since=mark)
    assert not bob.of("call_incoming", since=mark), f"a second call rang at bob ({finals})"
    assert finals == {"straight": [403], "home": [407]}
    assert [e["method"] for e in bob.of("request_refused", since=mark)] == ["INVITE"]
    mark_a = alice.mark()
    alice.send("hangup")
    alice.wait("call_ended", since=mark_a)


def test_strangers_connecting_to_a_tls_phones_listener_do_not_end_it(tmp_path, pki, home,
                                                                     phones):
    """pjlib gives every socket one of 64 ioqueue slots and aborts when connections come
    and go faster than slots return (pjsua_hooks/README.md, "TCP").  The TLS listener
    has no certificate (nobody can complete a handshake with it) and a registered phone
    gets its requests on its own connection: strangers must not get a socket at all.
    (Before the gate: 45 of these 180 connections were completed; the phone lived.)"""
    import socket
    import time

    bob = phones.start("bob", ua(tmp_path, pki, "bob", home, tls=True))
    alice = phones.start("alice", ua(tmp_path, pki, "alice", home, tls=True))
    opened = 0
    for _ in range(6):
        batch = []
        for _ in range(30):
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.connect_ex(("127.0.0.1", bob.port))
            except OSError:
                pass
            batch.append(sock)
        time.sleep(0.3)
        for sock in batch:
            try:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and \
                        sock.getpeername():
                    opened += 1
            except OSError:
                pass
            sock.close()
    time.sleep(1)
    assert bob.alive, f"bob's phone ended (rc={bob.process.poll()})"
    text = "still here " + secrets.token_hex(4)
    mark = bob.mark()
    alice.send(f"message {BOB} {text}")
    assert bob.wait("message_in", since=mark)["text"] == text
    assert opened == 0, f"{opened} stranger connections reached the listener"


class _OneTlsServer:
    """A TLS server on loopback with the proxy's TLS certificate (the right CA and IP
    SAN) that speaks only ``version``: records whether a handshake completed and what
    the client sent first."""

    def __init__(self, pki: TestPKI, version: Any) -> None:
        import socket
        import ssl
        import threading
        import warnings

        cred = pki.tls_server(PROXY_HOST)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.context.set_ciphers("DEFAULT:@SECLEVEL=0")
            self.context.minimum_version = self.context.maximum_version = version
        self.context.load_cert_chain(str(cred.cert_path), str(cred.key_path))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.handshakes: list[str] = []
        self.received = b""
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import ssl

        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                continue
            raw.settimeout(3)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    self.handshakes.append(tls.version() or "?")
                    self.received += tls.recv(4096)
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(type(exc).__name__)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)
        self.listener.close()


@pytest.mark.parametrize("version, connects", [("TLSv1_1", False), ("TLSv1_2", True)],
                         ids=["tls1.1-refused", "tls1.2-taken"])
def test_the_phone_speaks_tls_1_2_only(tmp_path, pki, home, version, connects):
    """pjsua's default ``proto`` mask (TLS 1.0-1.2) wins over ``method``: without
    ``proto`` the phone would agree to TLS 1.1."""
    import ssl
    import time

    server = _OneTlsServer(pki, getattr(ssl.TLSVersion, version))
    try:
        target = f"sip:127.0.0.1:{server.port};transport=tls"
        config = ua(tmp_path, pki, "alice", home, tls=True,
                    phone={"registrar": target, "proxy": target})
        phone = PhoneProcess(config, "alice")
        try:
            phone.wait("started", timeout=15)
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and not (server.handshakes or server.errors):
                time.sleep(0.1)
        finally:
            phone.stop()
        if connects:
            assert server.handshakes == ["TLSv1.2"] and server.received.startswith(b"REGISTER ")
        else:
            assert server.handshakes == [] and server.errors, "a TLS 1.1 handshake completed"
    finally:
        server.close()
