"""Issue 15 §2/§3: phones find each other's certificates at the home proxy's RFC 6072
certificate service, with no ``[peers]`` at all.

Real Kamailio (``[auth]`` with alice, bob and carol, the certificate service with a
2 s notify interval), real ``e2m-phone`` processes:

- bob registers and publishes his certificate; alice, with no ``[peers]``, sends him an
  encrypted MESSAGE and calls him with SRTP, having fetched his certificate first;
- bob's certificate is replaced (a new key): alice's subscription brings the new one
  and her next message is sealed for it (bob, who only has the new key, reads it);
- the operator removes it: alice's next send fails closed, naming bob and why.

Hostile cases: a certificate NOTIFY from a stranger (481, nothing kept); a notifier
that answers alice's SUBSCRIBE for bob with carol's certificate, or from carol's AoR
(a fake proxy on a UDP socket: the real one checks the SAN on PUBLISH and would never
send it): never used, the send fails with the check that failed.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.pytest_fixtures import PhoneGroup, phone_group
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki, issue_user, write_credential

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}
ALICE, BOB, CAROL = ("sip:alice@example.com", "sip:bob@example.com",
                     "sip:carol@example.com")
INTERVAL = 2


def fingerprint(cert: Any) -> str:
    return "sha256:" + hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("disc-pki"), users=("alice", "bob", "carol"),
                         key_type="ec")


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("disc-home"), pki=pki, e2m=True, auth=True,
                        users=USERS, extra={"certs": {"notify_interval": INTERVAL,
                                                      "min_expires": 2}})
    yield proxy
    proxy.stop()


@pytest.fixture
def group(request: pytest.FixtureRequest, home: ProxyHandle) -> Iterator[PhoneGroup]:
    env = {name: {"E2M_PHONE_PASSWORD": password} for name, password in USERS.items()}
    with phone_group(request, [home], env) as made:
        yield made


def ua(tmp_path: Path, name: str, pki_dir: Path, home: ProxyHandle, **phone: Any) -> Path:
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    settings = {"proxy": home.uri, "registrar": home.uri, "register_via_proxy": False,
                "srtp": True, **phone}
    settings = {k: v for k, v in settings.items() if v is not None}
    return write_ua(directory, name, pki_dir, peer=None, phone=settings,
                    e2m={"cert_url_hosts": ["127.0.0.1"]})


def certs_cli(proxy: ProxyHandle, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "certs", args[0],
                           "--config", str(proxy.config_path), *args[1:]],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def send(phone: PhoneProcess, to: str, text: str) -> dict[str, Any]:
    """``message TO TEXT``: its message_sent or message_failed event."""
    mark = phone.mark()
    phone.send(f"message {to} {text}")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for kind in ("message_sent", "message_failed"):
            found = phone.of(kind, since=mark)
            if found:
                return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{phone.name}: message to {to} neither sent nor failed")


def test_discover_replace_remove(tmp_path: Path, pki: TestPKI, home: ProxyHandle,
                                 group: PhoneGroup) -> None:
    assert pki.directory is not None
    bob = group.start("bob", ua(tmp_path, "bob", pki.directory, home))
    published = bob.wait("certificate_published", timeout=10)
    assert published["action"] == "initial" and published["code"] == 200
    bob_fp = fingerprint(pki.user("bob").cert)
    assert published["fingerprint"] == bob_fp
    assert BOB in certs_cli(home, "list").stdout

    alice = group.start("alice", ua(tmp_path, "alice", pki.directory, home))
    alice.wait("certificate_published", timeout=10)

    # 1. no [peers]: the first MESSAGE fetches bob's certificate, then goes encrypted
    sent = send(alice, BOB, "hello-bob")
    assert sent["kind"] == "message_sent", sent
    got = alice.wait("peer_certificate", lambda e: e["aor"] == BOB)
    assert got["fingerprint"] == bob_fp
    assert got["source"] == "certificate service of example.com"
    assert sent["security"]["encrypted"] and sent["security"]["peer"] == BOB
    received = bob.wait("message_in", lambda e: e["text"] == "hello-bob")
    assert received["security"]["encrypted"]

    # ... and a call with SRTP, its SDP sealed for bob
    mark = alice.mark()
    alice.send(f"call {BOB}")
    media = alice.wait("call_media", lambda e: "active" in e["audio"], since=mark, timeout=15)
    offers = [r for r in media["security"] if r["direction"] == "tx"]
    assert offers and offers[0]["security"]["encrypted"]
    assert offers[0]["security"]["peer"] == BOB
    alice.send("hangup")
    alice.wait("call_ended", since=mark, timeout=10)

    # 2. bob's certificate replaced (a new key): bob restarts with it and publishes
    new_dir = tmp_path / "bob-new-pki"
    new_dir.mkdir()
    new_bob = write_credential(issue_user(pki.ca, BOB, "ec"), new_dir, "bob")
    (new_dir / "ca.crt").write_bytes((pki.directory / "ca.crt").read_bytes())
    new_fp = fingerprint(new_bob.cert)
    bob.stop()
    group.running.remove(bob)
    mark = alice.mark()
    (tmp_path / "v2").mkdir()
    bob2 = group.start("bob", ua(tmp_path / "v2", "bob", new_dir, home))
    assert bob2.wait("certificate_published", timeout=10)["fingerprint"] == new_fp
    alice.wait("peer_certificate", lambda e: e["aor"] == BOB and e["fingerprint"] == new_fp,
               since=mark, timeout=3 * INTERVAL + 5)
    sent = send(alice, BOB, "hello-new-bob")
    assert sent["kind"] == "message_sent", sent
    assert bob2.wait("message_in", lambda e: e["text"] == "hello-new-bob")["security"][
        "encrypted"]

    # 3. removed by the operator: alice's next send fails closed, naming bob and why
    mark = alice.mark()
    removed = certs_cli(home, "remove", BOB)
    assert removed.returncode == 0, removed.stderr
    alice.wait("peer_certificate_removed", lambda e: e["aor"] == BOB, since=mark,
               timeout=INTERVAL + 5)
    before = len(bob2.of("message_in"))
    failed_send = send(alice, BOB, "must-not-go")
    assert failed_send["kind"] == "message_failed", failed_send
    assert BOB in failed_send["reason"] and "removed" in failed_send["reason"]
    time.sleep(0.5)
    assert len(bob2.of("message_in")) == before


def test_stranger_notify_is_ignored(tmp_path: Path, pki: TestPKI, home: ProxyHandle,
                                    group: PhoneGroup) -> None:
    """A NOTIFY with carol's (valid) certificate, in no subscription of alice's, from a
    socket that is not her proxy: answered 481 and never looked at.  carol never
    published, so alice's send to carol must still fail for want of a certificate."""
    assert pki.directory is not None
    alice = group.start("alice", ua(tmp_path, "alice", pki.directory, home))
    carol_der = pki.user("carol").cert.public_bytes(Encoding.DER)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.settimeout(3)
        host, port = stranger.getsockname()
        notify = sip.make_request(
            "NOTIFY", f"sip:alice@127.0.0.1:{alice.port}", from_uri=CAROL, to_uri=ALICE,
            call_id=uuid.uuid4().hex, to_tag="guess", via_host=f"{host}:{port}",
            extra_headers=[("Event", "certificate"),
                           ("Subscription-State", "active;expires=3600")],
            body=carol_der, content_type="application/pkix-cert")
        stranger.sendto(notify.serialize(), ("127.0.0.1", alice.port))
        answer = sip.parse(stranger.recvfrom(65536)[0])
    assert answer.status == 481
    alice.wait("cert_notify_refused")
    assert not alice.of("peer_certificate")
    result = send(alice, CAROL, "to-carol")
    assert result["kind"] == "message_failed"
    assert CAROL in result["reason"] and "no certificate" in result["reason"]


def test_call_first_fetches_then_calls(tmp_path: Path, pki: TestPKI, home: ProxyHandle,
                                       group: PhoneGroup) -> None:
    """The first protected message to bob is an INVITE: blocked in the hook, bob's
    certificate fetched, the call made again, up with SRTP and its offer sealed for bob."""
    assert pki.directory is not None
    group.start("bob", ua(tmp_path, "bob", pki.directory, home)).wait(
        "certificate_published", timeout=10)
    alice = group.start("alice", ua(tmp_path, "alice", pki.directory, home))
    mark = alice.mark()
    alice.send(f"call {BOB}")
    media = alice.wait("call_media", lambda e: "active" in e["audio"], since=mark, timeout=15)
    assert alice.of("peer_certificate", since=mark)[0]["aor"] == BOB
    offers = [r for r in media["security"] if r["direction"] == "tx"]
    assert offers and offers[0]["security"]["encrypted"] and offers[0]["security"]["peer"] == BOB
    assert not alice.of("call_failed", since=mark)
    alice.send("hangup")
    alice.wait("call_ended", since=mark, timeout=10)


class FakeNotifier:
    """A 'proxy' on a UDP socket that answers a certificate SUBSCRIBE with 200 and a
    NOTIFY of its choosing: a certificate service that lies."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[sip.SipMessage] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self) -> tuple[sip.SipMessage, tuple[str, int]]:
        data, source = self.sock.recvfrom(65536)
        msg = sip.parse(data)
        if msg.is_request:
            self.requests.append(msg)
        return msg, source

    def serve_subscribe(self, *, notify_from: str, der: bytes) -> sip.SipMessage:
        """Wait for a SUBSCRIBE, accept it, NOTIFY ``der`` from ``notify_from``; the
        phone's answer to the NOTIFY."""
        while True:
            sub, source = self.receive()
            if sub.is_request and sub.method == "SUBSCRIBE":
                break
        ok = sip.make_response(sub, 200, "OK", extra_headers=[
            ("Expires", "3600"), ("Contact", f"<sip:127.0.0.1:{self.port}>")])
        self.sock.sendto(ok.serialize(), source)
        notify = sip.make_request(
            "NOTIFY", sip.parse_address(sub.get("Contact") or "").uri,
            from_uri=notify_from, to_uri=ALICE, call_id=sub.call_id, from_tag=ok.to_tag,
            to_tag=sub.from_tag, via_host=f"127.0.0.1:{self.port}",
            extra_headers=[("Event", "certificate"),
                           ("Subscription-State", "active;expires=3600")],
            body=der, content_type="application/pkix-cert")
        self.sock.sendto(notify.serialize(), source)
        while True:
            answer, _ = self.receive()
            if not answer.is_request and answer.cseq[1] == "NOTIFY":
                return answer


@pytest.mark.parametrize("lie", ["another AoR's certificate", "from another AoR"])
def test_lying_notifier_is_never_used(tmp_path: Path, pki: TestPKI, home: ProxyHandle,
                                      group: PhoneGroup, lie: str) -> None:
    """alice subscribes to bob; the notifier sends carol's (valid, CA-signed)
    certificate, From bob or From carol.  Neither is used: the send to bob fails,
    naming bob and the failed check, and nothing is sealed for carol's key either."""
    assert pki.directory is not None
    fake = FakeNotifier()
    try:
        alice = group.start("alice", ua(tmp_path, "alice", pki.directory, home,
                                        proxy=f"sip:127.0.0.1:{fake.port}", registrar=None),
                            register=False)
        carol_der = pki.user("carol").cert.public_bytes(Encoding.DER)
        mark = alice.mark()
        alice.send(f"message {BOB} secret-for-bob")
        answer = fake.serve_subscribe(notify_from=BOB if lie.startswith("another") else CAROL,
                                      der=carol_der)
        assert answer.status == 200          # the dialog is ours; its content is not used
        refused = alice.wait("peer_certificate_refused", since=mark)
        assert refused["aor"] == BOB
        failed_send = alice.wait("message_failed", since=mark)
        assert BOB in failed_send["reason"] and "refused" in failed_send["reason"]
        check = ("is not for sip:bob@example.com" if lie.startswith("another")
                 else "came from sip:carol@example.com")
        assert check in failed_send["reason"], failed_send["reason"]
        assert not alice.of("peer_certificate", since=mark)
        assert not [r for r in fake.requests if r.method == "MESSAGE"]
        # carol's certificate was not kept for carol either: a send to her needs a fetch
        alice.send(f"message {CAROL} hi")
        sub, _ = fake.receive()
        assert sub.method == "SUBSCRIBE" and CAROL in (sub.get("To") or "")
    finally:
        fake.close()


def test_over_tcp(tmp_path: Path, pki: TestPKI, home: ProxyHandle, group: PhoneGroup) -> None:
    """The same discovery with both phones on TCP: the NOTIFY comes back over the
    connection alice opened (its source port is not the proxy's listening port)."""
    assert pki.directory is not None
    home_tcp = f"{home.uri};transport=tcp"
    bob = group.start("bob", ua(tmp_path, "bob", pki.directory, home, transport="tcp",
                                proxy=home_tcp, registrar=home_tcp))
    bob.wait("certificate_published", timeout=10)
    alice = group.start("alice", ua(tmp_path, "alice", pki.directory, home, transport="tcp",
                                    proxy=home_tcp, registrar=home_tcp))
    sent = send(alice, BOB, "over-tcp")
    assert sent["kind"] == "message_sent", sent
    assert alice.of("peer_certificate")[0]["aor"] == BOB
    assert bob.wait("message_in", lambda e: e["text"] == "over-tcp")["security"]["encrypted"]


def test_publication_refreshed_with_its_entity_tag(tmp_path: Path, pki: TestPKI,
                                                  home: ProxyHandle, group: PhoneGroup) -> None:
    """pjsip's publication client refreshes before the granted time ends: no body,
    SIP-If-Match with the entity-tag of the 200 (the proxy would answer 412 to any
    other), and the certificate stays published."""
    assert pki.directory is not None
    bob = group.start("bob", ua(tmp_path, "bob", pki.directory, home,
                                cert_publish_expires=10))
    first = bob.wait("certificate_published", timeout=10)
    assert first["action"] == "initial" and first["expires"] == "10"
    refreshed = bob.wait("certificate_published", lambda e: e["action"] == "refresh",
                         timeout=15)
    assert refreshed["code"] == 200
    assert not bob.of("certificate_publish_failed")
    assert BOB in certs_cli(home, "list").stdout
