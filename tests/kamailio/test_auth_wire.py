"""Issue 14, digest authentication: the home proxy lets in only its own users.

Attacks first (each seen to succeed before ``[auth]`` existed: a REGISTER for bob from
anywhere, without credentials, got 200 and bob's calls went to whoever sent it), then
what a user may and may not do.  Real Kamailio on loopback; the users are SIP UAs
(``SipUa``) at loopback addresses other than the proxy's own (127.0.0.x), so the
flood limits apply to them as to any stranger.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.kamailio_harness import (ProxyHandle, RawUas, SipUa, parse_address_uri,
                                      registered_uas, wait_delivered,
                                      parse_challenge, start_proxy)
from e2m_plugins.sip import RequestLine, SipMessage, make_response
from e2m_plugins.testpki import TestPKI
from kamailio_app.launcher import OPEN_REGISTRAR_WARNING
from kamailio_app.users import ha1

pytestmark = pytest.mark.kamailio

ROOT = Path(__file__).resolve().parents[2]
USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}
TEXT = b"only for bob"


def answering(uas: RawUas, user: str = "bob"):
    """bob's phone: 200 to everything; an INVITE's 200 has a tag, a Contact and the
    Record-Route set, so the dialog goes on through the proxy."""
    def respond(request: SipMessage) -> SipMessage:
        answer = make_response(request, 200, "OK")
        if request.method == "INVITE":
            answer = answer.replace("To", f"{request.get('To')};tag={user}1")
            answer = answer.add("Contact", f"<sip:{user}@127.0.0.1:{uas.port}>")
        return answer
    return respond


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """The home proxy with [auth] (users.sqlite: alice, bob, carol) and E2M."""
    proxy = start_proxy(tmp_path_factory.mktemp("auth-home"), pki=pki, e2m=True, auth=True,
                        users=USERS)
    yield proxy
    proxy.stop()


@pytest.fixture
def bob(home: ProxyHandle) -> Iterator[RawUas]:
    """bob's phone, registered (with his password) at a fresh contact."""
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.20") as uas:
        uas.responder = answering(uas)
        yield uas


def _delivered(uas: RawUas, text: bytes, timeout: float = 2.0) -> bool:
    return wait_delivered(uas, text, timeout)


# -- attack: taking over bob's registration -------------------------------------------

def test_register_without_credentials_gets_a_challenge_and_registers_nothing(home, bob):
    thief = RawUas()      # where the thief wants bob's messages to go
    ua = SipUa(home.port, user="bob", source="127.0.0.21")      # no password
    try:
        reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "3600")])
        answer = ua.request(reg.replace("Contact", f"<sip:bob@127.0.0.1:{thief.port}>"))
        assert answer is not None and answer.status == 401
        challenge = parse_challenge(answer.get("WWW-Authenticate") or "")
        assert challenge["realm"] == "example.com" and challenge["nonce"]
        assert challenge["qop"] == "auth"
        alice = SipUa(home.port, user="alice", password=USERS["alice"], source="127.0.0.22")
        assert alice.message("bob", TEXT).status == 200
        assert _delivered(bob, TEXT) and thief.received == []
        alice.close()
    finally:
        ua.close()
        thief.close()


def test_a_wrong_password_stays_refused(home):
    ua = SipUa(home.port, user="bob", password="guessed", source="127.0.0.23")
    try:
        for _ in range(2):
            answer = ua.register()
            assert answer is not None and answer.status == 401
            assert "stale" not in (answer.get("WWW-Authenticate") or "").lower()
    finally:
        ua.close()
    assert home.wait_log("REGISTER from 127.0.0.23 refused: wrong password")


def test_the_right_password_registers_and_messages_reach_the_new_contact(home):
    phone = RawUas()
    ua = SipUa(home.port, user="carol", password=USERS["carol"], source="127.0.0.24")
    try:
        reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        answer = ua.request(reg.replace("Contact", f"<sip:carol@127.0.0.1:{phone.port}>"))
        assert answer is not None and answer.status == 200
        assert [m.status for m in ua.received] == [401, 200]
        alice = SipUa(home.port, user="alice", password=USERS["alice"], source="127.0.0.25")
        assert alice.message("carol", b"to carol").status == 200
        alice.close()
        assert _delivered(phone, b"to carol")
    finally:
        ua.close()
        phone.close()


def test_a_replayed_authorization_header_is_refused(home, bob):
    """A captured REGISTER with its Authorization, sent again as a new request (a new
    branch and Call-ID, the thief's Contact): the nonce count was used, so a fresh
    challenge (stale) and nothing saved."""
    ua = SipUa(home.port, user="bob", password=USERS["bob"], source="127.0.0.26")
    thief = RawUas()
    try:
        assert ua.register().status == 200
        captured = next(m for m in reversed(ua.sent) if m.get("Authorization"))
        replay = captured.replace("Call-ID", "replayed@127.0.0.26").replace(
            "Contact", f"<sip:bob@127.0.0.1:{thief.port}>")
        answer = ua.transact(replay)
        assert answer is not None and answer.status == 401
        assert parse_challenge(answer.get("WWW-Authenticate") or "").get("stale", "").lower() \
            == "true"
        answer = ua.transact(captured)          # the very same request once more
        assert answer is not None and answer.status == 401
        alice = SipUa(home.port, user="alice", password=USERS["alice"], source="127.0.0.27")
        assert alice.message("bob", b"after the replay").status == 200
        alice.close()
        assert _delivered(bob, b"after the replay") and thief.received == []
    finally:
        ua.close()
        thief.close()


def test_credentials_are_reused_with_a_growing_count_and_never_forwarded(home, bob):
    ua = SipUa(home.port, user="alice", password=USERS["alice"], source="127.0.0.28")
    try:
        assert ua.message("bob", b"first").status == 200          # 407, then 200
        assert ua.message("bob", b"second").status == 200         # nc=2 at once
        assert [m.status for m in ua.received] == [407, 200, 200]
        assert _delivered(bob, b"second")
        for got in bob.received:
            assert got.get("Proxy-Authorization") is None and got.get("Authorization") is None
    finally:
        ua.close()


def test_a_stale_nonce_gets_a_fresh_challenge_with_stale_true(pki, tmp_path):
    proxy = start_proxy(tmp_path / "short-nonce", pki=None, e2m=False,
                        auth={"nonce_expire": 1}, users=USERS)
    ua = SipUa(proxy.port, user="alice", password=USERS["alice"], source="127.0.0.29")
    try:
        assert ua.register().status == 200
        time.sleep(2.5)
        stale = ua.transact(ua.build("REGISTER", "sip:example.com").replace(
            *ua.credentials("REGISTER", "sip:example.com")))
        assert stale is not None and stale.status == 401
        assert parse_challenge(stale.get("WWW-Authenticate") or "")["stale"].lower() == "true"
        assert ua.register().status == 200                   # the fresh nonce works
    finally:
        ua.close()
        proxy.stop()


def test_a_user_may_register_only_their_own_aor(home, bob):
    ua = SipUa(home.port, user="alice", password=USERS["alice"], source="127.0.0.30")
    thief = RawUas()
    try:
        reg = ua.build("REGISTER", "sip:example.com", to="sip:bob@example.com",
                       headers=[("Expires", "600")])
        answer = ua.request(reg.replace("Contact", f"<sip:bob@127.0.0.1:{thief.port}>"))
        assert answer is not None and answer.status == 403
        carol = SipUa(home.port, user="carol", password=USERS["carol"], source="127.0.0.31")
        assert carol.message("bob", b"still bob's").status == 200
        carol.close()
        assert _delivered(bob, b"still bob's") and thief.received == []
    finally:
        ua.close()
        thief.close()


def test_a_request_whose_from_is_another_local_user_is_refused(home, bob):
    ua = SipUa(home.port, user="alice", password=USERS["alice"], source="127.0.0.32")
    try:
        forged = ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                          body=b"signed, carol", content_type="text/plain")
        forged = forged.replace("From", "<sip:carol@example.com>;tag=forged1")
        answer = ua.request(forged)           # 407, then alice's credentials: 403
        assert answer is not None and answer.status == 403
        assert not _delivered(bob, b"signed, carol", timeout=0.5)
    finally:
        ua.close()


def test_strangers_reach_our_users_unchallenged_but_are_no_relay(home, bob):
    ua = SipUa(home.port, user="dave", domain="other.example.net", source="127.0.0.33")
    try:
        to_bob = ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                          body=b"from outside", content_type="text/plain")
        assert ua.transact(to_bob).status == 200
        assert _delivered(bob, b"from outside")
        onward = ua.build("MESSAGE", "sip:erin@elsewhere.example.org",
                          to="sip:erin@elsewhere.example.org", body=b"relay me",
                          content_type="text/plain")
        answer = ua.transact(onward)
        assert answer is not None and answer.status == 403
    finally:
        ua.close()


def test_a_call_with_credentials_and_its_ack_without(home, bob):
    ua = SipUa(home.port, user="alice", password=USERS["alice"], source="127.0.0.34")
    try:
        call = ua.call("bob", hold=0.2)
        assert call["invite"].status == 200 and call["bye"].status == 200
        methods = [m.method for m in bob.received]
        assert methods[-3:] == ["INVITE", "ACK", "BYE"]
        acks = [m for m in ua.sent if m.method == "ACK"]
        assert acks and all(a.get("Proxy-Authorization") is None for a in acks)
    finally:
        ua.close()


def test_cancel_is_never_challenged(home):
    """INVITE (with credentials) to a phone that rings; the CANCEL carries none and is
    relayed all the same; the INVITE ends 487."""
    phone = RawUas()
    invites: list[SipMessage] = []

    def ringing(request: SipMessage) -> SipMessage | None:
        if request.method == "INVITE":
            invites.append(request)
            ring = make_response(request, 180, "Ringing")
            return ring.replace("To", f"{request.get('To')};tag=c1")
        if request.method == "CANCEL":
            final = make_response(invites[-1], 487, "Request Terminated")
            phone.sock.sendto(final.replace("To", f"{invites[-1].get('To')};tag=c1").serialize(),
                              ("127.0.0.1", home.port))
        return make_response(request, 200, "OK")
    phone.responder = ringing
    owner = SipUa(home.port, user="carol", password=USERS["carol"], source="127.0.0.35")
    ua = SipUa(home.port, user="alice", password=USERS["alice"], source="127.0.0.36")
    try:
        reg = owner.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        assert owner.request(reg.replace("Contact", f"<sip:carol@127.0.0.1:{phone.port}>")) \
            .status == 200
        assert ua.message("carol", b"call you").status == 200     # learns the challenge
        invite = ua.build("INVITE", "sip:carol@example.com", to="sip:carol@example.com")
        invite = invite.replace(*ua.credentials("INVITE", "sip:carol@example.com"))
        invite = invite.replace("Via", ua.via())
        ua.send(invite)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(m.status == 180 for m in ua.received):
            ua.receive(0.2)
        assert any(m.status == 180 for m in ua.received)
        cancel = SipMessage(RequestLine("CANCEL", invite.request_uri or ""),
                            tuple((n, v if n != "CSeq" else f"{invite.cseq[0]} CANCEL")
                                  for n, v in invite.headers
                                  if n not in ("Proxy-Authorization", "Contact",
                                               "Content-Type", "Content-Length"))
                            + (("Content-Length", "0"),), b"")
        ua.send(cancel)
        finals = {}
        while time.monotonic() < deadline + 5 and len(finals) < 2:
            got = ua.receive(0.5)
            if got is not None and (got.status or 0) >= 200:
                finals[got.cseq[1]] = got.status
        assert finals == {"CANCEL": 200, "INVITE": 487}
        assert [m.method for m in phone.received] == ["MESSAGE", "INVITE", "CANCEL", "ACK"]
        assert all(m.get("Proxy-Authorization") is None for m in phone.received)
    finally:
        ua.close()
        owner.close()
        phone.close()


# -- the operator's side --------------------------------------------------------------

def test_without_auth_the_launcher_warns_once_that_the_registrar_is_open(proxy_factory):
    proxy = proxy_factory("open", e2m=False)
    assert proxy.wait_log(OPEN_REGISTRAR_WARNING)
    assert proxy.log_since(0).count(OPEN_REGISTRAR_WARNING) == 1


def test_users_add_list_remove_keep_only_ha1(tmp_path):
    config = tmp_path / "PROXY.toml"
    config.write_text('[kamailio]\nlisten = ["udp:127.0.0.1:5999"]\ndomains = ["example.com"]\n'
                      '[e2m]\nenabled = false\n[auth]\nusers = "users.sqlite"\n')
    password = "correct horse battery staple"

    def users(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "users", *args,
                               "--config", str(config)], input=stdin, capture_output=True,
                              text=True, timeout=30, cwd=ROOT)
    added = users("add", "dora", stdin=password + "\n")
    assert added.returncode == 0, added.stderr
    assert users("add", "erin", stdin="another one\n").returncode == 0
    listed = users("list")
    assert listed.stdout.split() == ["dora", "erin"]
    db = tmp_path / "users.sqlite"
    assert db.stat().st_mode & 0o077 == 0                       # 0600: HA1 is a secret
    assert password.encode() not in db.read_bytes()
    row = sqlite3.connect(db).execute(
        "SELECT domain, password, ha1 FROM subscriber WHERE username = 'dora'").fetchone()
    assert row == ("example.com", "", ha1("dora", "example.com", password))
    assert sqlite3.connect(db).execute(
        "SELECT table_version FROM version WHERE table_name = 'subscriber'").fetchone() == (7,)
    assert users("remove", "erin").returncode == 0
    assert users("list").stdout.split() == ["dora"]
    assert users("remove", "erin").returncode == 1
    bad = users("add", "bad name", stdin="x\n")
    assert bad.returncode == 1 and "not a user name" in bad.stderr
    empty = users("add", "frank", stdin="\n")
    assert empty.returncode == 1 and "empty" in empty.stderr


def test_users_added_while_the_proxy_runs_can_register_at_once(proxy_factory):
    proxy = proxy_factory("live-users", e2m=False, auth=True)
    ua = SipUa(proxy.port, user="gina", password="gina-Pass-9", source="127.0.0.37")
    try:
        assert ua.register().status == 401
        proxy.add_user("gina", "gina-Pass-9")
        ua.challenge = None
        assert ua.register().status == 200
    finally:
        ua.close()


def test_register_to_the_identity_host_is_answered_here_not_at_next_hop(proxy_factory, raw_uas):
    """[identity] host counts as the proxy itself, like its domains."""
    proxy = proxy_factory("identity", e2m=True, next_hop=raw_uas.uri, auth=True, users=USERS)
    ua = SipUa(proxy.port, user="alice", password=USERS["alice"], source="127.0.0.38")
    try:
        reg = ua.build("REGISTER", "sip:proxy.example.com", headers=[("Expires", "600")])
        answer = ua.request(reg)
        assert answer is not None and answer.status == 200
        options = ua.transact(ua.build("OPTIONS", "sip:proxy.example.com",
                                       to="sip:proxy.example.com").replace(
                                           "From", "<sip:probe@other.example.net>;tag=p1"))
        assert options is not None and options.status == 200
        elsewhere = ua.transact(ua.build("REGISTER", "sip:elsewhere.example.org",
                                         headers=[("Expires", "600")]))
        assert elsewhere is not None and elsewhere.status == 403     # no REGISTER relay
        assert raw_uas.received == []
        assert parse_address_uri(answer.get("Contact") or "").startswith("sip:alice@127.0.0.38")
    finally:
        ua.close()


def test_a_keepalive_from_our_own_domain_is_answered_not_challenged(proxy_factory):
    """A dispatcher front probes its nodes with OPTIONS from an address of theirs
    (``sip:dispatcher@<its address>``, which the nodes count as their own).  Before:
    407, so the front took every node with [auth] out (503 No Node Available).  The
    OPTIONS names no user; a request to a user still needs credentials."""
    proxy = proxy_factory("keepalive", e2m=False, auth=True, users=USERS)
    ua = SipUa(proxy.port, user="alice", source="127.0.0.40")
    try:
        probe = ua.transact(ua.build("OPTIONS", "sip:127.0.0.1", to="sip:127.0.0.1").replace(
            "From", "<sip:dispatcher@127.0.0.1>;tag=ds1"))
        assert probe is not None and probe.status == 200
        to_user = ua.transact(ua.build("OPTIONS", "sip:bob@example.com"))
        assert to_user is not None and to_user.status == 407
    finally:
        ua.close()


def test_no_answer_names_the_software_or_its_version(home):
    """Before: ``Server: kamailio (5.6.3 (x86_64/linux))`` on every answer."""
    import urllib.request
    options = home.options()
    ua = SipUa(home.port, user="bob", source="127.0.0.39")
    try:
        challenge = ua.register()
    finally:
        ua.close()
    for answer in (options, challenge):
        assert answer is not None
        assert answer.get("Server") is None and answer.get("User-Agent") is None
    with urllib.request.urlopen(home.cert_url, timeout=5) as served:
        assert "kamailio" not in str(served.headers).lower()
