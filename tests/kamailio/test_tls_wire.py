"""Issue 14, TLS: the labels, the policy header and Digest no longer cross the visited
network in the clear.

Before issue 14 the proxy spoke only UDP and TCP (a ``tls:`` listener was refused by the
config).  Now: TLS 1.2 and later only, a challenge and a call over TLS, the visited
proxy reaching the home proxy over TLS and verifying its certificate against [tls] ca,
and client certificates when verify_client is on.
"""

from __future__ import annotations

import subprocess

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa
from e2m_plugins.sip import SipMessage, make_response
from e2m_plugins.testpki import init_test_pki

pytestmark = [pytest.mark.kamailio, pytest.mark.openssl]

USERS = {"alice": "alice-Tls-Pass", "bob": "bob-Tls-Pass"}


def _bob_phone() -> RawUas:
    uas = RawUas()

    def respond(request: SipMessage) -> SipMessage:
        answer = make_response(request, 200, "OK")
        if request.method == "INVITE":
            answer = answer.replace("To", f"{request.get('To')};tag=bt1")
            answer = answer.add("Contact", f"<sip:bob@127.0.0.1:{uas.port}>")
        return answer
    uas.responder = respond
    return uas


def _register(proxy_port: int, uas: RawUas, source: str) -> None:
    ua = SipUa(proxy_port, user="bob", password=USERS["bob"], source=source)
    reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
    answer = ua.request(reg.replace("Contact", f"<sip:bob@127.0.0.1:{uas.port}>"))
    ua.close()
    assert answer is not None and answer.status == 200, answer


def _s_client(port: int, version: str, ca: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", version,
                           "-CAfile", ca, "-verify_return_error", "-brief"],
                          input="", capture_output=True, text=True, timeout=20)


def test_tls_1_1_is_refused_and_1_2_accepted(proxy_factory, pki):
    proxy = proxy_factory("tls-versions", e2m=False, tls=True)
    ca = str(pki.directory / "ca.crt")
    old = _s_client(proxy.tls_port, "-tls1_1", ca)
    assert "CONNECTION ESTABLISHED" not in old.stdout + old.stderr
    assert "alert protocol version" in old.stdout + old.stderr or old.returncode != 0
    new = _s_client(proxy.tls_port, "-tls1_2", ca)
    assert "CONNECTION ESTABLISHED" in new.stdout + new.stderr, new.stderr[-800:]
    assert "Protocol version: TLSv1.2" in new.stdout + new.stderr
    assert "Verification: OK" in new.stdout + new.stderr


def test_a_challenge_a_message_and_a_call_over_tls(proxy_factory, pki):
    home = proxy_factory("tls-home", e2m=True, tls=True, auth=True, users=USERS)
    bob = _bob_phone()
    ua = SipUa(home.tls_port, transport="tls", user="alice", password=USERS["alice"],
               source="127.0.0.40", ca_file=pki.directory / "ca.crt")
    try:
        _register(home.port, bob, "127.0.0.41")
        answer = ua.register()
        assert answer is not None and answer.status == 200
        assert [m.status for m in ua.received] == [401, 200]    # challenged over TLS
        assert ua.message("bob", b"over TLS").status == 200
        call = ua.call("bob", hold=0.2)
        assert call["invite"].status == 200 and call["bye"].status == 200
        assert [m.method for m in bob.received] == ["MESSAGE", "INVITE", "ACK", "BYE"]
        # the dialog's route set names the TLS side for alice and UDP for bob
        routes = call["invite"].get_all("Record-Route")
        assert any("transport=tls" in r for r in routes)
    finally:
        ua.close()
        bob.close()


def test_the_visited_proxy_reaches_home_over_tls_and_verifies_it(proxy_factory, pki, tmp_path):
    home = proxy_factory("home", e2m=True, tls=True, auth=True, users=USERS)
    bob = _bob_phone()
    _register(home.port, bob, "127.0.0.42")
    visited = proxy_factory("visited", e2m=False, tls=True, domains=(),
                            next_hop=f"sip:127.0.0.1:{home.tls_port};transport=tls")
    ua = SipUa(visited.port, user="alice", password=USERS["alice"], source="127.0.0.43")
    try:
        assert ua.register().status == 200           # 401 and 200 from home, through TLS
        assert ua.message("bob", b"via the visited network").status == 200
        assert bob.wait_for(1, method="MESSAGE")[0].body == b"via the visited network"
        call = ua.call("bob", hold=0.2)
        assert call["invite"].status == 200 and call["bye"].status == 200
    finally:
        ua.close()

    # A visited proxy whose [tls] ca does not know home's certificate does not talk to it.
    stranger_ca = init_test_pki(tmp_path / "other-ca", users=(), proxy_hosts=())
    wary = proxy_factory("wary", e2m=False, tls={"ca": [str(stranger_ca.directory / "ca.crt")]},
                         domains=(), next_hop=f"sip:127.0.0.1:{home.tls_port};transport=tls")
    ua = SipUa(wary.port, user="alice", password=USERS["alice"], source="127.0.0.44")
    mark = home.log_mark()
    try:
        answer = ua.register()
        assert answer is None or answer.status >= 400
        assert "REGISTER" not in home.log_since(mark)
        assert wary.wait_log("certificate verify failed")
    finally:
        ua.close()
        bob.close()


def test_verify_client_asks_for_a_certificate_from_our_ca(proxy_factory, pki):
    home = proxy_factory("strict-tls", e2m=False, tls={"verify_client": True}, auth=True,
                         users=USERS)
    try:
        ua = SipUa(home.tls_port, transport="tls", user="alice", password=USERS["alice"],
                   source="127.0.0.45", ca_file=pki.directory / "ca.crt")
    except OSError:
        pass                     # refused in the handshake
    else:
        try:                     # TLS 1.3: the refusal shows at the first read
            assert ua.register() is None and ua.received == []
        finally:
            ua.close()
    bob = _bob_phone()
    _register(home.port, bob, "127.0.0.46")
    visited = proxy_factory("visited-with-cert", e2m=False, tls=True, domains=(),
                            next_hop=f"sip:127.0.0.1:{home.tls_port};transport=tls")
    ua = SipUa(visited.port, user="alice", password=USERS["alice"], source="127.0.0.47")
    try:
        assert ua.message("bob", b"a proxy with a certificate").status == 200
    finally:
        ua.close()
        bob.close()
