"""Review 27, the proxy's half: a challenge from downstream that names the home realm.

The review showed (``tests/pjsua/test_review27_phone.py``) that a phone answering any
challenge hands its challenger a digest response to test password guesses against.
The phone now answers only its home realm; a callee (an insider UA) or a hop past the
home proxy could still claim that realm in its own 401/407, and the home proxy relayed
it to the caller unchanged: seen on ``33ea142``, where every ``test_hole_*`` here
failed (alice got the callee's challenge of realm ``example.com``).

Fix (``kemi.own_realm_challenge``): a 401/407 from downstream with a challenge in the
proxy's own realm, or one whose realm cannot be read for sure, is answered ``502 Bad
Gateway`` by the failure route; a stray one (no transaction) is dropped.  Challenges
of other realms go on: a UA's to refuse, as the phone does.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from e2m_lab.kamailio_harness import ProxyHandle, RawUas, SipUa, registered_uas
from e2m_plugins.sip import SipMessage, make_response, parse

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-27", "bob": "bob-Secret-27"}


@pytest.fixture
def home(proxy_factory) -> ProxyHandle:
    return proxy_factory("home27", e2m=True, auth=True, users=USERS)


@pytest.fixture
def bob(home: ProxyHandle) -> Iterator[RawUas]:
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.31") as uas:
        yield uas


def challenging(status: int, header: str, value: str):
    def respond(request: SipMessage) -> SipMessage:
        reason = "Unauthorized" if status == 401 else "Proxy Authentication Required"
        answer = make_response(request, status, reason)
        return answer.replace("To", f"{request.get('To')};tag=bob27").add(header, value)
    return respond


def _alice_writes(home: ProxyHandle) -> SipMessage | None:
    alice = SipUa(home.port, user="alice", password=USERS["alice"], source="127.0.0.32")
    try:
        return alice.message("bob", b"meet at noon")
    finally:
        alice.close()


OURS = [
    (407, "Proxy-Authenticate", 'Digest realm="example.com", nonce="bob-chose", qop="auth"'),
    (401, "WWW-Authenticate", 'Digest realm="example.com", nonce="bob-chose", qop="auth"'),
    (407, "Proxy-Authenticate", 'Digest realm="EXAMPLE.com", nonce="bob-chose"'),
    (407, "Proxy-Authenticate", 'Digest realm="exam\\ple.com", nonce="bob-chose"'),
    (407, "Proxy-Authenticate", 'Digest realm=example.com, nonce="bob-chose"'),
    (407, "Proxy-Authenticate", 'Digest realm="bob.example.net", realm="example.com", nonce="n"'),
    (407, "WWW-Authenticate", 'Digest realm="example.com", nonce="bob-chose"'),
]


@pytest.mark.parametrize("status,header,value", OURS)
def test_hole_a_callees_challenge_in_the_home_realm_reaches_the_caller(home, bob, status,
                                                                       header, value):
    """Attacker: the callee (insider UA), or a hop past the home proxy.  Attack: answer
    alice's MESSAGE with a challenge naming the home proxy's own realm (in any spelling
    a UA would read as it: case, a quoted escape, no quotes; two realms; the other
    header).  Effect before the fix: relayed to alice as it was; her UA answers it as
    her home's and the callee tests password guesses offline."""
    bob.responder = challenging(status, header, value)
    answer = _alice_writes(home)
    assert bob.wait_for(1, method="MESSAGE")                    # it did reach bob
    assert answer is not None and answer.status == 502, answer and answer.status
    assert not answer.get("WWW-Authenticate") and not answer.get("Proxy-Authenticate")
    assert home.wait_log("challenges in our realm: refused")


def test_control_another_realms_challenge_goes_on(home, bob):
    """A challenge of the callee's own realm is relayed: a UA's to answer or refuse
    (the phone refuses it, ``pjsua_hooks/challenges.py``)."""
    value = 'Digest realm="bob.example.net", nonce="bob-chose"'
    bob.responder = challenging(407, "Proxy-Authenticate", value)
    answer = _alice_writes(home)
    assert answer is not None and answer.status == 407
    assert answer.get("Proxy-Authenticate") == value


def test_control_the_homes_own_challenge_still_comes(home):
    alice = SipUa(home.port, user="alice", source="127.0.0.33")      # no password
    try:
        answer = alice.message("bob", b"hello")
        assert answer is not None and answer.status == 407
        assert 'realm="example.com"' in (answer.get("Proxy-Authenticate") or "")
    finally:
        alice.close()


def _stray(home: ProxyHandle, value: str, tag: str = "") -> bytes | None:
    """A 407 matching no transaction, its top Via the proxy's, the next a listener's:
    what the listener gets when the proxy forwards it statelessly.  ``value`` may hold
    surrogates (octets that are not UTF-8, sent as they are)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(1.5)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stray = (f"SIP/2.0 407 Proxy Authentication Required\r\n"
                 f"Via: SIP/2.0/UDP 127.0.0.1:{home.port};branch=z9hG4bK-stray27a{tag}\r\n"
                 f"Via: SIP/2.0/UDP 127.0.0.1:{listener.getsockname()[1]};branch=z9hG4bK-s27b\r\n"
                 f"From: <sip:alice@example.com>;tag=a27\r\nTo: <sip:bob@example.com>;tag=b27\r\n"
                 f"Call-ID: stray27-{tag}{value[-6:].encode('ascii', 'replace').hex()}@x\r\n"
                 f"CSeq: 2 MESSAGE\r\nProxy-Authenticate: {value}\r\nContent-Length: 0\r\n\r\n"
                 ).encode("utf-8", "surrogateescape")
        sender.sendto(stray, ("127.0.0.1", home.port))
        try:
            return listener.recv(65535)
        except (socket.timeout, TimeoutError):
            return None
    finally:
        listener.close()
        sender.close()


def test_hole_a_stray_challenge_in_the_home_realm_is_forwarded(home):
    """The same challenge sent to the proxy outside any transaction (an off-path sender
    or a hop that knows alice's Via): forwarded statelessly before the fix."""
    assert _stray(home, 'Digest realm="example.com", nonce="n1"') is None
    got = _stray(home, 'Digest realm="elsewhere.example.net", nonce="n2"')   # control
    assert got is not None and parse(got).status == 407
