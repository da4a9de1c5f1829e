"""A second attacker's review of the proxy, on the wire (real Kamailio on loopback).

Only what lives in the KEMI/cfg layer is tried here; the engine's holes are in
``tests/unit/test_review2_proxy.py``.  ``test_hole_*`` succeeded when the review found
it (seen failing) and is closed now; ``test_held_*`` the code already refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from e2m_lab.cluster import lone_node as cluster_lone_node
from e2m_lab.kamailio_harness import (ProxyHandle, RawUas, SipUa, registered_uas, start_proxy,
                                      wait_delivered)
from e2m_plugins.testpki import TestPKI

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("review2-home"), pki=pki, e2m=True, auth=True,
                        users=USERS)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def bob(home: ProxyHandle) -> Iterator[RawUas]:
    """bob's phone, registered with his password; answers 200 to everything."""
    from e2m_plugins.sip import make_response
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.20",
                        lambda request: make_response(request, 200, "OK")) as uas:
        yield uas


def _delivered(uas: RawUas, text: bytes, timeout: float = 1.0) -> bool:
    return wait_delivered(uas, text, timeout)


# Spellings of carol's AoR that the core (and so every UA's signer check and the
# archive) reads as sip:carol@example.com.
CAROL_SPELLINGS = [
    "<sip:carol@example.com:5999>",          # a port: Kamailio's myself check wants ours
    "<sip:carol@example.com.>",              # a trailing dot
    "<sips:carol@example.com>",
    "<sip:carol@EXAMPLE.COM>",
    "<sip:carol@example.com;transport=tcp>",
    "<sip:%63arol@example.com>",             # an escaped user
    "<sip:carol@Example.Com.:5060>",         # case, trailing dot and a port at once
]


@pytest.mark.parametrize("spelling", CAROL_SPELLINGS)
def test_hole_a_stranger_sends_as_a_local_user_without_digest(home, bob, spelling):
    """HOLE (off-path sender, or an insider posing as another): "with [auth], digest for
    requests whose From is one of our users" was decided by Kamailio's
    ``is_myself_furi``, which takes the host as written.  ``From:
    <sip:carol@example.com.>`` (a trailing dot) is not "myself", so the request was
    taken as a stranger's toward our domain: no challenge, answered 200 and delivered
    to bob (seen; the other spellings here were challenged already).  Every other part
    of the project (the engine's signer check, the UA, the archive) reads that From as
    carol's AoR.

    Fix (kemi.py): a From is ours when Kamailio says so *or* the core's AoR of it names
    one of our domains; such a request needs carol's credentials.
    """
    ua = SipUa(home.port, user="mallory", domain="other.example.net", source="127.0.0.41")
    text = ("posing as carol: %s" % spelling).encode()
    try:
        forged = ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                          body=text, content_type="text/plain")
        forged = forged.replace("From", f"{spelling};tag=forged{abs(hash(spelling)) % 10**6}")
        answer = ua.transact(forged)
        assert answer is not None and answer.status in (401, 407, 403), answer
        assert not _delivered(bob, text, timeout=0.5)
    finally:
        ua.close()


def test_held_a_stranger_from_another_domain_still_reaches_our_user(home, bob):
    ua = SipUa(home.port, user="dave", domain="other.example.net", source="127.0.0.42")
    try:
        to_bob = ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                          body=b"review2: from outside", content_type="text/plain")
        answer = ua.transact(to_bob)
        assert answer is not None and answer.status == 200
        assert _delivered(bob, b"review2: from outside")
    finally:
        ua.close()


def test_hole_a_forged_in_dialog_request_is_relayed_anywhere(home):
    """HOLE (off-path sender), fixed: a request with a To tag and a Route naming the
    proxy was taken as "inside a dialog" (``loose_route``) and relayed to its
    Request-URI, with no check that the proxy ever record-routed such a dialog, and
    ``route_auth`` let a stranger's in-dialog request through.  So anyone could relay
    MESSAGEs, INVITEs (and ACKs, never challenged) through the home proxy to any
    address: here a UAS that is none of our users', which answered 200.

    Now the proxy's Record-Route carries a token (an HMAC of Call-ID and tag,
    ``kamailio_app/dialog_route.py``) and an in-dialog request without it is 403.
    """
    elsewhere = RawUas()
    from e2m_plugins.sip import make_response
    elsewhere.responder = lambda request: make_response(request, 200, "OK")
    ua = SipUa(home.port, user="dave", domain="other.example.net", source="127.0.0.43")
    try:
        forged = ua.build("MESSAGE", f"sip:erin@127.0.0.1:{elsewhere.port}",
                          to="sip:erin@elsewhere.example.org", to_tag="made-up",
                          routes=[f"<sip:127.0.0.1:{home.port};lr>"],
                          body=b"review2: relayed", content_type="text/plain")
        answer = ua.transact(forged)
        relayed = _delivered(elsewhere, b"review2: relayed", timeout=0.5)
        assert not relayed, f"relayed to a stranger's address (answer {answer.status if answer else None})"
    finally:
        ua.close()
        elsewhere.close()


# -- cluster: KDMQ from strangers ------------------------------------------------------

@pytest.fixture(scope="module")
def lone_node(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """A [cluster] node whose one peer never runs (``e2m_lab.cluster.lone_node``)."""
    with cluster_lone_node(pki, tmp_path_factory.mktemp("review2-node"), "review2") as node:
        yield node


BURST = 150


@pytest.mark.postgres
def test_hole_kdmq_from_a_stranger_is_answered_and_logged_past_the_flood_limits(lone_node):
    """HOLE (off-path sender): KDMQ is handled before the flood limits, so a stranger's
    KDMQ got a 403 and a warning line each, at any rate: pike never counted them (a
    burst of 60: 60 answers, 60 log lines; a log filled at line rate, a reflector of
    403s).  Now a burst of 150 gets about 38, then a ban.

    Fix (kemi.py ``route_dmq``): a KDMQ that is not a peer's goes through the flood
    limits before it is answered: past pike's rate the source is banned (one line) and
    dropped.
    """
    import socket
    node = lone_node
    mark = node.log_mark()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.47", 0))
    sock.settimeout(0.3)
    port = sock.getsockname()[1]
    answers = 0
    try:
        for n in range(BURST):
            sock.sendto((f"KDMQ sip:htable@127.0.0.1:{node.dmq_port} SIP/2.0\r\n"
                         f"Via: SIP/2.0/UDP 127.0.0.47:{port};rport;branch=z9hG4bK-k{n}\r\n"
                         f"From: <sip:127.0.0.47:{port}>;tag=s{n}\r\n"
                         f"To: <sip:htable@127.0.0.1:{node.dmq_port}>\r\n"
                         f"Call-ID: review2-kdmq-{n}\r\nCSeq: 1 KDMQ\r\nMax-Forwards: 1\r\n"
                         "Content-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                         '{"cells":[]').encode() + b"}", ("127.0.0.1", node.dmq_port))
        while True:
            try:
                sock.recv(65535)
                answers += 1
            except socket.timeout:
                break
    finally:
        sock.close()
    time.sleep(0.3)
    log = node.log_since(mark)
    logged = log.count("not a [cluster] peer: refused")
    # pike counts per window of 2 s (30 requests): a burst may straddle two windows
    assert answers <= 60 and logged <= 60, f"{answers} answers and {logged} log lines for {BURST}"
    assert "127.0.0.47 banned" in log
