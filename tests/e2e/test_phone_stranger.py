"""The softphone against an off-path stranger (issue 13): plain sockets against a real
``e2m-phone listen`` process (bob), on loopback and free ports, no Kamailio.

Each row of the issue's table is a test, plus attacks of our own from the same seat.
What every test ends with: the phone process is still running and still answers an
OPTIONS at once (its event loop is not stuck), and what it keeps stays bounded.

A policy reaches the phone two ways here: in a stranger's OPTIONS (the issue's rows; the
engine of issue 12 stops learning from those, and then these cases only show the phone
stays up) and in the 200 of a "registrar" the phone REGISTERs with (an answer to its own
request, which issue 12 keeps): that one keeps the fetch path reachable.  The policy host
is 127.0.0.1 (``[e2m] accept_proxies``), so a cert-url on the policy's own host reaches
the test's HTTP server.

A failing test prints each phone's stderr tail and its last events (message texts and
bodies never).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2m_lab.phones import PhoneProcess, redact, run_phone, write_ua
from e2m_lab.ports import free_port
from e2m_lab.pytest_fixtures import failed
from e2m_lab.stranger import (CertServer, FakeRegistrar, UdpStranger, rss_kib, sip_request,
                              sip_response, tcp_flood, tcp_probe)
from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.pjsua2]

ALICE = "sip:alice@example.com"
BOB = "sip:bob@example.com"
SERVING = 1.0          # an OPTIONS must be answered within this many seconds


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("stranger-pki"), users=("alice", "bob"),
                         key_type="ec")


class Lab:
    """Phones, strangers and servers of one test; all stopped at teardown."""

    def __init__(self, directory: Path, pki: TestPKI) -> None:
        self.directory = directory
        self.pki = pki
        self.phones: list[PhoneProcess] = []
        self.closers: list[Any] = []

    def config(self, name: str, *, peer: str | None, phone: dict[str, Any] | None = None,
               e2m: dict[str, Any] | None = None) -> Path:
        directory = self.directory / name
        directory.mkdir(exist_ok=True)
        assert self.pki.directory is not None
        return write_ua(directory, name, self.pki.directory, peer=peer,
                        phone={"srtp": True, **(phone or {})}, e2m=e2m)

    def phone(self, name: str = "bob", *, peer: str | None = "alice",
              phone: dict[str, Any] | None = None, e2m: dict[str, Any] | None = None,
              as_json: bool = True, env: dict[str, str] | None = None,
              wait_started: bool = True) -> PhoneProcess:
        proc = PhoneProcess(self.config(name, peer=peer, phone=phone, e2m=e2m), name, env,
                            as_json=as_json)
        self.phones.append(proc)
        if wait_started:
            proc.wait("started", timeout=15)
        return proc

    def stranger(self, phone: PhoneProcess) -> UdpStranger:
        stranger = UdpStranger(phone.port)
        self.closers.append(stranger)
        return stranger

    def server(self, mode: str, **kwargs: Any) -> CertServer:
        server = CertServer(mode, **kwargs)
        self.closers.append(server)
        return server

    def registrar(self, headers: list[tuple[str, str]]) -> FakeRegistrar:
        registrar = FakeRegistrar(headers)
        self.closers.append(registrar)
        return registrar

    def close(self, report: bool) -> None:
        for phone in self.phones:
            phone.stop()
        for thing in self.closers:
            thing.close()
        if report:
            for phone in self.phones:
                print(f"\n===== phone {phone.name} (rc={phone.process.returncode}) "
                      f"last events =====")
                for event in phone.events[-40:]:
                    print(redact(event))
                print(f"--- stderr tail ---\n{phone.stderr()[-3000:]}")


@pytest.fixture
def lab(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[Lab]:
    world = Lab(tmp_path, pki)
    try:
        yield world
    finally:
        world.close(failed(request))


def assert_serving(phone: PhoneProcess, stranger: UdpStranger, what: str = "") -> float:
    """The process runs and answers an OPTIONS within SERVING seconds."""
    assert phone.alive, f"{what}: the phone exited (rc={phone.process.returncode})"
    took = stranger.probe(timeout=SERVING + 1)
    assert took is not None and took < SERVING, \
        f"{what}: an OPTIONS was not answered within {SERVING}s (took {took})"
    assert phone.alive
    return took


def keep_serving(phone: PhoneProcess, stranger: UdpStranger, seconds: float,
                 what: str) -> list[float]:
    """OPTIONS every 0.25 s for ``seconds``: every one answered within SERVING s."""
    took = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        took.append(assert_serving(phone, stranger, what))
        time.sleep(0.25)
    return took


def policy(host: str, url: str, view: str = "MESSAGE:*") -> tuple[str, str]:
    return ("Proxy-Body-Policy", f'{host};view="{view}";cert-url="{url}"')


def fetch_errors(phone: PhoneProcess, since: int = 0) -> list[dict[str, Any]]:
    return [e for e in phone.of("error", since) if e.get("direction") == "fetch"]


def policy_phone(lab: Lab, vector: str, headers: list[tuple[str, str]],
                 accept: list[str], **phone: Any) -> tuple[PhoneProcess, UdpStranger]:
    """bob, and the policy ``headers`` delivered by ``vector``: "options" (a stranger's
    OPTIONS) or "register" (the 200 to bob's own REGISTER)."""
    settings: dict[str, Any] = {"fetch_timeout": 2.0, **phone}
    if vector == "register":
        settings["registrar"] = lab.registrar(headers).uri
    bob = lab.phone(phone=settings, e2m={"accept_proxies": accept})
    stranger = lab.stranger(bob)
    if vector == "options":
        stranger.request("OPTIONS", headers=headers)
    return bob, stranger


VECTORS = ["options", "register"]


# --------------------------------------------------------------------------- rows 1-4: fetching

@pytest.mark.parametrize("vector", VECTORS)
def test_row1_a_cert_url_with_userinfo_neither_ends_the_phone_nor_is_fetched(lab, vector):
    server = lab.server("body", body=b"not a certificate", hosts=("127.0.0.2",))
    headers = [policy("127.0.0.1", "http://a:b@127.0.0.1/x"),          # the URL
               policy("proxy.example.com", "http://a:b@127.0.0.1/x"),
               policy("127.0.0.2", f"http://a:b@127.0.0.2:{server.port}/x")]
    bob, stranger = policy_phone(lab, vector, headers,
                                 ["127.0.0.1", "127.0.0.2", ".example.com"])
    time.sleep(1.5)
    keep_serving(bob, stranger, 1.0, "after a cert-url with userinfo")
    assert server.total_hits == 0, "a cert-url with userinfo was fetched"
    if vector == "register":
        assert any("userinfo" in e["detail"] for e in fetch_errors(bob))


@pytest.mark.parametrize("vector", VECTORS)
@pytest.mark.parametrize("mode", ["bad_status", "bad_chunk", "huge"])
def test_row2_a_broken_http_answer_is_a_fetch_error_not_an_exit(lab, vector, mode):
    server = lab.server(mode)
    bob, stranger = policy_phone(lab, vector, [policy("127.0.0.1", server.url())], ["127.0.0.1"])
    # the register vector's fetch ends before "listen" begins; an OPTIONS' within 1 s
    deadline = time.monotonic() + 1.5
    while not fetch_errors(bob) and time.monotonic() < deadline and bob.alive:
        time.sleep(0.1)
    keep_serving(bob, stranger, 0.5, f"after a {mode} answer")
    if vector == "register":     # issue 12's engine learns from this one only
        (error, *_) = fetch_errors(bob)
        assert error["message"] == "127.0.0.1" and error["error"]
    assert server.total_hits <= 1, "fetched again without a cool-down"


@pytest.mark.parametrize("vector", VECTORS)
def test_row3_a_slowloris_cert_server_neither_stalls_the_loop_nor_outlives_the_deadline(
        lab, vector):
    server = lab.server("slowloris", drip=1.5)
    bob, stranger = policy_phone(lab, vector, [policy("127.0.0.1", server.url())], ["127.0.0.1"],
                                 fetch_timeout=2.0)
    keep_serving(bob, stranger, 5.0, "while a cert server drips a byte every 1.5 s")
    if vector == "register":
        errors = fetch_errors(bob)
        assert errors, "the slow fetch never ended"
        assert "deadline" in errors[0]["detail"], errors[0]
        took = errors[0]["time"] - bob.wait("registered")["time"]
        assert took < 2.0 + 1.0, f"the fetch took {took:.1f} s with a 2 s deadline"


def test_row4_34_hosts_outside_their_own_cert_url_host_fetch_nothing(lab):
    server = lab.server("silent")
    headers = [policy(f"h{i}.example.com", server.url()) for i in range(34)]
    bob = lab.phone(phone={"fetch_timeout": 2.0})
    stranger = lab.stranger(bob)
    stranger.request("OPTIONS", headers=headers)
    keep_serving(bob, stranger, 3.0, "after 34 policies pointing elsewhere")
    assert server.connections == 0, "a cert-url on another host than its policy was fetched"


@pytest.mark.parametrize("vector", VECTORS)
def test_row4_34_silent_cert_servers_are_fetched_a_few_at_a_time_off_the_loop(lab, vector):
    # the engine reads at most 16 policies from one message (issue 12): a registrar that
    # announces 34 teaches nothing, so its 200 carries 16, all of them served silently
    hosts = [f"127.0.0.{i}" for i in range(1, 35 if vector == "options" else 17)]
    server = lab.server("silent", hosts=hosts)
    headers = [policy(h, server.url(h)) for h in hosts]
    bob, stranger = policy_phone(lab, vector, headers, hosts, fetch_timeout=2.0)
    took = keep_serving(bob, stranger, 6.0, "while 34 cert servers never answer")
    assert max(took) < SERVING
    # 4 workers: the silent server reads a connection's end before it accepts the next
    # one, so it counts exactly what the phone holds open (a lagging count once saw 6)
    assert server.max_active <= 4, f"{server.max_active} fetches at once"
    assert server.connections <= 4 * (6 // 2 + 1), "more fetches than 4 workers can make"
    assert max(server.hits.values(), default=1) == 1, "a host was fetched again at once"
    if vector == "register":
        assert server.connections >= 4


def test_extra_a_redirect_to_another_host_is_not_followed(lab):
    other = lab.server("body", body=b"x", hosts=("127.0.0.2",))
    server = lab.server("redirect", redirect_to=other.url("127.0.0.2"))
    bob, stranger = policy_phone(lab, "register", [policy("127.0.0.1", server.url())],
                                 ["127.0.0.1", "127.0.0.2"])
    deadline = time.monotonic() + 5
    while not fetch_errors(bob) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.total_hits == 1 and other.total_hits == 0
    assert "302" in fetch_errors(bob)[0]["detail"]
    assert_serving(bob, stranger)


def test_extra_a_cert_url_on_a_privileged_or_the_phones_own_port_is_refused(lab):
    own = free_port()
    headers = [policy("127.0.0.1", "http://127.0.0.1:25/c"),
               policy("127.0.0.2", f"http://127.0.0.2:{own}/c")]
    bob, stranger = policy_phone(lab, "register", headers, ["127.0.0.1", "127.0.0.2"],
                                 port=own)
    assert bob.port == own
    bob.wait("registered", timeout=5)
    deadline = time.monotonic() + 3
    while len(fetch_errors(bob)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    errors = {e["message"]: e["detail"] for e in fetch_errors(bob)}
    assert "port 25" in errors.get("127.0.0.1", ""), errors
    assert "own SIP ports" in errors.get("127.0.0.2", ""), errors
    assert_serving(bob, stranger)


# --------------------------------------------------------------------------- row 5: TCP

def test_row5_200_tcp_connections_neither_abort_the_phone_nor_lock_out_a_real_call(lab):
    bob = lab.phone(phone={"transport": "tcp"})
    port = bob.port
    held = tcp_flood(port, 200, close_every=2)
    try:
        time.sleep(1.0)
        assert bob.alive, f"the phone died under 200 TCP connections (rc={bob.process.returncode})"
        took = None
        deadline = time.monotonic() + 20
        while took is None and time.monotonic() < deadline:
            took = tcp_probe(port, timeout=4)
        assert took is not None, "no new TCP client got an answer while the flood held on"
        alice_cfg = lab.config("alice", peer="bob", phone={
            "transport": "tcp", "proxy": f"sip:127.0.0.1:{port};transport=tcp"})
        result = run_phone(alice_cfg, "call", BOB, "--seconds", "1", "--timeout", "20",
                           timeout=60)
        media = [e for e in result.of("call_media") if "active" in e["audio"]]
        assert result.rc == 0 and media, f"a real call failed: {result.stderr[-800:]}"
        status = bob.status()
        assert status["tcp"]["incoming"] <= status["tcp"]["limit"]
        assert bob.alive
    finally:
        for sock in held:
            sock.close()


def test_extra_idle_and_half_sent_tcp_connections_are_closed(lab):
    bob = lab.phone(phone={"transport": "tcp", "tcp_idle_timeout": 2.0})
    port = bob.port
    held = tcp_flood(port, 10, close_every=0)
    half = tcp_flood(port, 5, close_every=0)
    for sock in half:
        sock.setblocking(True)
        sock.sendall(b"OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 1")
    try:
        time.sleep(1.0)
        assert bob.status()["tcp"]["incoming"] >= 10
        time.sleep(4.0)
        closed = 0
        for sock in held + half:
            sock.setblocking(True)
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == 15, f"only {closed} of 15 idle connections were closed"
        assert bob.status()["tcp"]["incoming"] == 0
        assert tcp_probe(port) is not None
    finally:
        for sock in held + half:
            sock.close()


def test_extra_a_tcp_phone_that_does_not_accept_lets_no_stranger_connect(lab):
    """``tcp_accept = false`` (a TCP phone's default when a registrar is set): the
    listener exists, no connection to it completes; the phone's own outgoing connections
    still work.  (A UDP phone's TCP listener accepts by default, registered or not: its
    proxy connects to it, stop 43, ``tests/e2e/test_udp_phone_tcp_listener.py``.)"""
    from pjsua_hooks.phone import PhoneSettings

    assert PhoneSettings(registrar="sip:127.0.0.1:5070", transport="tcp").accepts_tcp is False
    assert PhoneSettings(transport="tcp").accepts_tcp is True
    alice = lab.phone("alice", peer="bob", phone={"transport": "tcp"})
    bob = lab.phone(phone={"transport": "tcp", "tcp_accept": False,
                           "proxy": f"sip:127.0.0.1:{alice.port};transport=tcp"})
    assert tcp_probe(bob.port, timeout=1.5) is None, "a stranger got an answer over TCP"
    status = bob.status()
    assert status["tcp"]["accepting"] is False and status["tcp"]["incoming"] == 0
    bob.send(f"message {ALICE} over bob's own connection")
    assert bob.wait("message_sent", timeout=10)["code"] == 200
    alice.wait("message_in", timeout=5)
    assert bob.alive


# --------------------------------------------------------------------------- rows 6-7: memory

def _flood_and_measure(bob: PhoneProcess, stranger: UdpStranger, build, count: int,
                       answered: bool) -> tuple[int, int]:
    """Send ``count`` messages built by ``build(i)``; RSS (KiB) after the first fifth and
    at the end.  Paced so that none is lost in the phone's socket buffer (a burst of
    100 datagrams overflows it): by the answers when ``answered``, else by an OPTIONS
    every 40 messages (one socket, one thread: an answered OPTIONS means every
    datagram before it was handled)."""
    window: list[str] = []
    first = 0
    for index in range(count):
        data, call_id = build(index)
        stranger.send(data)
        if answered:
            window.append(call_id)
            if len(window) >= 16:
                got = 0
                deadline = time.monotonic() + 5
                while got < len(window) and time.monotonic() < deadline:
                    got += len(stranger.drain(timeout=0.5))
                assert got >= len(window) - 1, f"only {got} of {len(window)} answered at {index}"
                window.clear()
        elif index % 40 == 39:
            assert stranger.probe(timeout=5) is not None, f"stalled at message {index}"
        if index == count // 5:
            stranger.probe(timeout=5)
            first = rss_kib(bob.pid)
    stranger.drain(timeout=1.0)
    assert stranger.probe(timeout=5) is not None
    return first, rss_kib(bob.pid)


def test_row6_refused_messages_with_3kb_call_ids_do_not_grow_the_phone(lab):
    bob = lab.phone()
    stranger = lab.stranger(bob)
    pad = "c" * 3000

    def build(i: int) -> tuple[bytes, str]:
        call_id = f"{pad}-{i}"
        return sip_request("MESSAGE", stranger.target, via=stranger.via, call_id=call_id,
                           body=b"plaintext", content_type="text/plain"), call_id

    first, last = _flood_and_measure(bob, stranger, build, 20000, answered=True)
    growth = (last - first) / 1024
    print(f"RSS {first} -> {last} KiB")
    assert growth < 6, f"RSS grew {growth:.1f} MiB over 16 k refused MESSAGEs"
    status = bob.status()
    assert status["events"] <= status["limits"]["events"]
    assert status["errors"] <= status["limits"]["errors"]
    assert_serving(bob, stranger)


def test_row7_stray_493s_do_not_grow_the_phone(lab):
    bob = lab.phone()
    stranger = lab.stranger(bob)
    cert = (Path(str(lab.pki.directory)) / "alice.crt").read_bytes()

    def build(i: int) -> tuple[bytes, str]:
        return sip_response(493, "Undecipherable", method="MESSAGE",
                            via=f"SIP/2.0/UDP 127.0.0.1:{bob.port}", body=cert,
                            content_type="application/pkix-cert"), ""

    first, last = _flood_and_measure(bob, stranger, build, 20000, answered=False)
    growth = (last - first) / 1024
    print(f"RSS {first} -> {last} KiB")
    assert growth < 6, f"RSS grew {growth:.1f} MiB over 16 k stray 493s"
    status = bob.status()
    assert status["reactions"] <= status["limits"]["reactions"]
    assert_serving(bob, stranger)


# --------------------------------------------------------------------------- row 8: INVITE

def test_row8_invites_the_phone_cannot_answer_securely_are_refused_at_once(lab):
    bob = lab.phone()
    port = bob.port
    stranger = lab.stranger(bob)
    for _ in range(5):
        _, call_id = stranger.request("INVITE")
        status = stranger.final(call_id, timeout=2.0)
        assert status is not None and status >= 400, f"no final answer at once (got {status})"
    refused = bob.wait("call_refused", timeout=2)
    assert refused["reason"] and refused["code"] >= 400
    deadline = time.monotonic() + 3
    while len(bob.of("call_refused")) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(bob.of("call_refused")) == 5
    assert bob.status()["pjsua_calls"] == 0, "a refused INVITE still holds a call slot"
    alice_cfg = lab.config("alice", peer="bob", phone={"proxy": f"sip:127.0.0.1:{port}"})
    result = run_phone(alice_cfg, "call", BOB, "--seconds", "1", timeout=40)
    media = [e for e in result.of("call_media") if "active" in e["audio"]]
    assert result.rc == 0 and media, f"a real call after 5 strangers failed: {result.stderr[-500:]}"


def test_extra_an_encrypted_invite_from_a_stranger_without_a_key_to_reuse_is_refused(lab):
    """Anyone can encrypt an offer to bob's public certificate: without a signature
    (no certificate of the caller) and without a key offered for reuse, bob cannot
    protect his answer either; refused at once as well."""
    from e2m_plugins import sip
    from e2m_plugins.body import protect_content, with_entity
    from e2m_plugins.cms.recipients import recipient_for_certificate
    from e2m_lab.flows import SDP_OFFER

    bob = lab.phone()
    stranger = lab.stranger(bob)
    msg = sip.parse(sip_request("INVITE", stranger.target, via=stranger.via))
    entity, _ = protect_content("application/sdp", SDP_OFFER,
                                [recipient_for_certificate(lab.pki.user("bob").cert)],
                                bind_to=msg)
    stranger.send(with_entity(msg, entity).serialize())
    status = stranger.final(msg.call_id, timeout=2.0)
    assert status is not None and status >= 400, f"no final answer at once (got {status})"
    # an engine that requires signatures refuses it itself (495); otherwise the phone
    # does, since its answer could not be protected
    assert status == 495 or bob.wait("call_refused", timeout=2)["call_id"] == msg.call_id
    assert bob.status()["pjsua_calls"] == 0


def _header(data: bytes, name: bytes) -> str:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode()
    raise AssertionError(f"no {name!r} header")


def test_extra_calls_that_end_leave_no_call_objects_behind(lab):
    """Twelve short calls "from alice" (a stranger spoofing her From, no body: bob can
    protect his answer, so pjsua answers 200), each ACKed and hung up at once: bob
    keeps at most 8 ended pjsua call objects, frees their slots safely (a real call
    afterwards works), and answers throughout."""
    bob = lab.phone()
    port = bob.port
    stranger = lab.stranger(bob)
    for n in range(12):
        _, call_id = stranger.request("INVITE", from_=f"<{ALICE}>;tag=sp{n}", to=f"<{BOB}>")
        ok = stranger.answered(call_id, timeout=5)
        assert ok is not None and ok.startswith(b"SIP/2.0 200"), ok[:40] if ok else None
        to = _header(ok, b"to")
        contact = _header(ok, b"contact").strip("<>").split(">")[0]
        for method, cseq in (("ACK", 1), ("BYE", 2)):
            stranger.send(sip_request(method, contact, via=stranger.via, call_id=call_id,
                                      cseq=cseq, from_=f"<{ALICE}>;tag=sp{n}", to=to))
        assert stranger.final(call_id, timeout=5) == 200     # the BYE's
    time.sleep(1.5)       # the sweep runs every second
    status = bob.status()
    print("after 12 calls:", {k: status[k] for k in ("pjsua_calls", "calls", "call_ids")})
    assert status["pjsua_calls"] <= 8, status
    assert_serving(bob, stranger)
    alice_cfg = lab.config("alice", peer="bob", phone={"proxy": f"sip:127.0.0.1:{port}"})
    result = run_phone(alice_cfg, "call", BOB, "--seconds", "1", timeout=40)
    media = [e for e in result.of("call_media") if "active" in e["audio"]]
    assert result.rc == 0 and media, \
        f"a real call after 12 ended ones failed: {result.stderr[-500:]}"
    assert bob.alive


# --------------------------------------------------------------------------- row 9: text output

def test_row9_text_output_survives_any_bytes_in_a_header(lab):
    env = {"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    bob = lab.phone(as_json=False, env=env)
    stranger = lab.stranger(bob)
    names = ['"\udcff\udcfe" ', '"\udcff\x1b[31mred\x1b]0;title\x07" ']
    for who in [f"{name}<sip:{user}>;tag=t{i}" for i, name in enumerate(names)
                for user in ("alice@example.com", "mallory@example.net")]:
        _, call_id = stranger.request("INVITE", from_=who)
        stranger.final(call_id, timeout=3.0)
        _, call_id = stranger.request("MESSAGE", from_=who, body=b"hi", content_type="text/plain")
        stranger.final(call_id, timeout=3.0)
    time.sleep(0.5)
    assert_serving(bob, stranger, "after invalid UTF-8 and escapes in From")
    lines = [e["line"] for e in bob.of("text")]
    assert not any(b"\x1b" in line or b"\x07" in line for line in lines), \
        "a terminal escape from the network reached stdout"
    assert any(b"\\xff" in line for line in lines), "the undecodable byte was not shown escaped"


# --------------------------------------------------------------------------- extra: one datagram

def test_extra_a_battery_of_odd_single_datagrams_leaves_the_phone_serving(lab):
    bob = lab.phone()
    stranger = lab.stranger(bob)
    via = stranger.via
    target = stranger.target
    cases = [
        sip_response(200, "OK", method="INVITE", via=f"SIP/2.0/UDP 127.0.0.1:{bob.port}",
                     body=b"v=0\r\n", content_type="application/sdp"),
        sip_response(496, "Proxy Indecipherable", method="INVITE",
                     via=f"SIP/2.0/UDP 127.0.0.1:{bob.port}"),
        sip_response(495, "Signature Required", method="MESSAGE",
                     via=f"SIP/2.0/UDP 127.0.0.1:{bob.port}",
                     headers=[policy("proxy.example.com", "http://proxy.example.com/c")]),
        sip_request("BYE", target, via=via),
        sip_request("CANCEL", target, via=via),
        sip_request("ACK", target, via=via),
        sip_request("INVITE", target, via=via, to=f"<{BOB}>;tag=nosuchdialog"),
        sip_request("INVITE", target, via=via, body=b"v=0\r\n", content_type="application/sdp"),
        sip_request("OPTIONS", target, via=via, headers=[("Proxy-Body-Policy", "x" * 3500)]),
        sip_request("MESSAGE", target, via=via, body=b"\x00" * 100, content_type="text/plain"),
        sip_request("REGISTER", target, via=via),
        sip_request("SUBSCRIBE", target, via=via, headers=[("Event", "presence")]),
        sip_request("NOTIFY", target, via=via, headers=[("Event", "message-summary")]),
        sip_request("REFER", target, via=via, headers=[("Refer-To", "<sip:x@127.0.0.1:9>")]),
        sip_request("INFO", target, via=via, body=b"x", content_type="application/x"),
    ]
    for data in cases:
        stranger.send(data)
        assert_serving(bob, stranger, data.split(b"\r\n", 1)[0].decode(errors="replace"))
