"""Review 27 (attacker's review of the pjsua2 phone): attacks on a real ``e2m-phone
listen`` process from plain sockets on loopback, no Kamailio.

``test_hole_*``: an attack that succeeded on ``342fe49`` (seen failing there: a strict
xfail), closed by ``pjsua_hooks/challenges.py``.  ``test_control_*``: the same flow without the attack.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.stranger import HOST
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI
from tests.pjsua.test_review2_phone import pki  # noqa: F401 - fixture

pytestmark = [pytest.mark.pjsua2]

PASSWORD = "al-review27-" + "s3cret"
BOB = "sip:bob@example.com"


class Hop:
    """A UDP socket the phone sends through (its outbound proxy's seat, here relaying
    what the next hop or the callee answers): requests in, responses out."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]

    def requests(self, method: str, timeout: float) -> list[tuple[sip.SipMessage, tuple]]:
        """Requests of ``method`` that arrive within ``timeout`` (waiting for the first)."""
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, source = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                break
            try:
                msg = sip.parse(data)
            except Exception:  # noqa: BLE001 - keep-alives
                continue
            if msg.is_request and msg.method == method:
                out.append((msg, source))
                deadline = min(deadline, time.monotonic() + 1.5)
        return out

    def answer(self, request: sip.SipMessage, source: tuple, status: int, reason: str,
               headers: list[tuple[str, str]] = ()) -> None:
        lines = [f"SIP/2.0 {status} {reason}"]
        lines += [f"Via: {v}" for v in request.get_all("Via")]
        to = request.get("To") or ""
        if ";tag=" not in to:
            to += ";tag=r27b"
        lines += [f"From: {request.get('From')}", f"To: {to}",
                  f"Call-ID: {request.call_id}", f"CSeq: {request.get('CSeq')}"]
        lines += [f"{n}: {v}" for n, v in headers]
        lines.append("Content-Length: 0")
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), source)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hop() -> Iterator[Hop]:
    h = Hop()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def alice(tmp_path: Path, pki: TestPKI, hop: Hop,  # noqa: F811 - the fixture
          request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    """alice's phone with a digest password, sending through ``hop``."""
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{hop.port}", "srtp": True})
    process = PhoneProcess(config, "alice", env={"E2M_PHONE_PASSWORD": PASSWORD})
    try:
        process.wait("started", timeout=15)
        yield process
    finally:
        process.stop()


def _digest_params(value: str) -> dict[str, str]:
    return {k.lower(): v.strip('"') for k, v in
            re.findall(r'(\w+)=("[^"]*"|[^,\s]+)', value)}


def _challenged(alice: PhoneProcess, hop: Hop, status: int, header: str,
                realm: str) -> tuple[sip.SipMessage, list[sip.SipMessage]]:
    """alice sends a MESSAGE to bob; the hop relays a ``status`` challenge naming
    ``realm`` (nonce of the challenger's choosing).  Returns the first attempt and the
    requests alice sends after the challenge."""
    alice.send(f"message {BOB} see you at noon")
    first = hop.requests("MESSAGE", timeout=10)
    assert first, "alice sent no MESSAGE"
    request, source = first[0]
    hop.answer(request, source, status,
               "Unauthorized" if status == 401 else "Proxy Authentication Required",
               [(header, f'Digest realm="{realm}", nonce="chosen-by-bob-27", '
                         'algorithm=MD5, qop="auth"')])
    # pjsip answers a challenge at once (the same loop turn): 2 s is ample for a retry
    again = [m for m, _ in hop.requests("MESSAGE", timeout=2)]
    for m in again:
        src = first[0][1]
        hop.answer(m, src, 200, "OK")
    return request, again


def _credentials_sent(again: list[sip.SipMessage]) -> list[dict[str, str]]:
    found = []
    for m in again:
        for name in ("Authorization", "Proxy-Authorization"):
            for value in m.get_all(name):
                found.append(_digest_params(value))
    return found


@pytest.mark.parametrize("status,header,realm", [
    (401, "WWW-Authenticate", "bob.example.net"),          # the callee, as a UAS
    (407, "Proxy-Authenticate", "visited.example.net"),    # a hop past the home proxy
    (401, "WWW-Authenticate", "example.com"),              # the callee claims our realm
    (407, "WWW-Authenticate", "example.com"),              # the wrong header for a 407
])
def test_hole_a_challenge_from_the_callee_or_a_hop_gets_alices_digest_response(
        alice, hop, status, header, realm):
    """Attacker: the callee (insider UA: any user alice writes to or calls), or an
    untrusted hop anywhere on the request's path (a visited proxy; a leg without TLS);
    every proxy relays a 401/407 toward the UAC, as RFC 3261 §22.3 has it.

    Attack: answer alice's MESSAGE (or INVITE) with a 401 ``WWW-Authenticate`` or a 407
    ``Proxy-Authenticate`` naming a realm of the attacker's (``bob.example.net``) and a
    nonce it chose.  The phone gives pjsua its password as ``AuthCredInfo("digest",
    "*", user, 0, password)`` (``endpoint.add_account``): realm ``*`` answers every
    challenge of every realm from whoever sends it.

    Effect: alice's phone sends the request again carrying her digest user name and a
    response over the attacker's nonce: MD5(MD5(alice:realm:password):nonce:nc:
    cnonce:auth:MD5(MESSAGE:uri)), which the attacker checks offline against a word
    list until it finds her password (asserted below: the response verifies with the
    password; nothing in it is secret from the one who chose realm and nonce), then
    registers as alice at her home proxy.  A hop on a leg without TLS (the phone's own
    UDP leg, a visited network) reads the retry as it passes; whether the home
    Kamailio hands the other realm's header on to the callee (its
    ``consume_credentials`` takes the credentials its own check used) was not tried
    here.  The phone shows nothing (no event about the challenge); the MESSAGE is
    simply "sent".

    Fix: pjsua has the password for the home realm only (``[phone] auth_realm``,
    default the AoR's domain) instead of ``*``, and the hook takes out of a 401/407,
    before pjsip reads it, every challenge but a 407's Proxy-Authenticate or a
    REGISTER's 401 WWW-Authenticate of that realm (``challenges.py``): the request
    ends with that status and a ``challenge_refused`` event.  A 407 of our realm from
    past the home proxy is the proxy's to stop (it does not relay one).  The last two
    cases are mine: a callee who names our realm in a 401, a 407 carrying
    WWW-Authenticate (pjsip answers either header in either status)."""
    _, again = _challenged(alice, hop, status, header, realm)
    creds = _credentials_sent(again)
    for c in creds:       # what the challenger can do with it: verify a password guess
        ha1 = hashlib.md5(f"alice:{c['realm']}:{PASSWORD}".encode()).hexdigest()
        ha2 = hashlib.md5(f"MESSAGE:{c['uri']}".encode()).hexdigest()
        want = hashlib.md5(f"{ha1}:{c['nonce']}:{c['nc']}:{c['cnonce']}:auth:{ha2}"
                           .encode()).hexdigest()
        assert c["response"] == want        # a guess of the password is checked offline
    assert not creds, (f"alice answered a {status} of realm {realm!r} with her digest "
                       f"response (user {creds[0].get('username')!r}), "
                       f"{len(again)} retries")
    refused = alice.wait("challenge_refused")
    assert refused["code"] == status and refused["realm"] == realm
    assert "nonce" not in str(refused) and PASSWORD not in str(refused)
    failed = alice.wait("message_failed")
    assert failed["code"] == status                 # ended, as with a wrong password


def test_control_the_homes_challenge_is_answered(alice, hop):
    """A 407 of the home realm (alice's own domain, what her proxy sends): answered with
    her credentials, as it must stay after a fix."""
    _, again = _challenged(alice, hop, 407, "Proxy-Authenticate", "example.com")
    creds = _credentials_sent(again)
    assert creds and creds[0]["username"] == "alice" and creds[0]["realm"] == "example.com"
    alice.wait("message_sent")


def test_control_without_a_challenge_no_credentials_leave(alice, hop):
    alice.send(f"message {BOB} see you at noon")
    got = hop.requests("MESSAGE", timeout=10)
    assert got
    request, source = got[0]
    assert not _credentials_sent([request])
    hop.answer(request, source, 200, "OK")
    alice.wait("message_sent")
