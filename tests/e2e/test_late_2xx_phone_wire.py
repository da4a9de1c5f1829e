"""Review 129 HB1 on the wire: a real ``e2m-phone`` (alice) calls bob through a real
Kamailio E2M home proxy (viewing INVITE SDP, record-routing); bob's two devices are
``UAEngine``s behind one raw UDP socket registered as bob's contact.  Device 1 rings and
answers 486; 0.5 s later device 2 answers 200 under alice's offer key, which tm relays
as a late 2xx (RFC 3261 16.7).  alice's phone ACKs that 2xx and BYEs the call itself
(``pjsua_hooks/late_2xx.py``): both reach bob through the home proxy (its Record-Route
taken as route set), and the proxy lets them through (bodiless in-dialog requests).
Over TLS too (``open``), and at a home that challenges its users (``digest``), where the
BYE is answered 407 and sent again with the account's credentials (fixed at stop 44).
The same set-up with a socket in place of Kamailio: ``tests/pjsua/
test_review129_late_2xx_phone.py``.

Fixed (stop 44), the BYE at a home with ``[auth]``: before, the home answered the
phone's BYE 407 (the phone's ``late_answer_bye`` event: 407), the phone, sending it
outside pjsua's dialogs and their authentication, had no credentials to answer with,
and bob's socket got ``INVITE, ACK(f1), ACK(f2)`` and no BYE: his device 2, ACKed,
stayed in the call until its user hung up (strict xfail).  Now the phone sends the BYE
once more with a Proxy-Authorization of the home realm computed from the 407
(``pjsua_hooks/late_2xx.py``, ``LateAnswers.retry_bye``): CSeq one above the first BYE
(the INVITE's + 2), a new branch; the home checks it, takes the credentials off and
relays it, and bob's socket gets ``INVITE, ACK(f1), ACK(f2), BYE(f2)``, the BYE with
CSeq INVITE + 2 and no credentials left in it; alice's events say ``late_answer_bye``
407 then 200 and ``late_answer_bye_auth`` retried once.  A second 407 gets no further
BYE, a challenge of another realm or from a stranger no credentials
(``tests/unit/test_late_2xx_bye_auth.py``, ``tests/pjsua/
test_review129_late_2xx_phone.py``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest

from e2m_lab.flows import ua_engine
from e2m_lab.kamailio_harness import (ProxyHandle, RawUas, answer_under_offer_key,
                                      register_contact, start_proxy)
from e2m_lab.phones import write_ua
from e2m_lab.pytest_fixtures import PhoneGroup, phone_group
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import TestPKI

pytestmark = [pytest.mark.kamailio, pytest.mark.pjsua2]

BOB = "sip:bob@example.com"
PASSWORDS = {"alice": "al-" + secrets.token_urlsafe(12), "bob": "bo-" + secrets.token_urlsafe(12)}


@pytest.fixture(scope="module", params=["open", "digest"])
def tls_home(request: pytest.FixtureRequest, e2e_pki: TestPKI,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    """A home proxy with a TLS listener (alice's leg); ``digest``: it challenges its
    own users' requests, in-dialog ones too (issue 14)."""
    auth = {"auth": True, "users": dict(PASSWORDS)} if request.param == "digest" else {}
    handle = start_proxy(tmp_path_factory.mktemp("tls-home"), pki=e2e_pki, e2m=True,
                         tls=True, **auth)
    handle.digest = request.param == "digest"     # type: ignore[attr-defined]
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def tls_phones(request: pytest.FixtureRequest, tls_home: ProxyHandle) -> Iterator[PhoneGroup]:
    with phone_group(request, [tls_home]) as group:
        yield group


def _bobs_phone(request):
    if request.method == "INVITE":
        return None          # the devices answer by hand below
    return make_response(request, 200, "OK")      # the BYE (and anything else): 200


def test_a_late_2xx_through_the_home_proxy_is_acked_and_ended_by_the_phone(
        ua_config, phones, proxies, e2e_pki):
    home, _ = proxies
    bob = RawUas(_bobs_phone)
    try:
        register_contact(home, "bob", bob.port)
        alice = phones.start("alice", ua_config("alice", peer="bob"))
        alice.wait("registered", timeout=10)
        _late_2xx_flow(home, alice, bob, e2e_pki)
    finally:
        bob.close()


def test_over_tls_the_ack_and_bye_go_on_the_phones_tls_connection(request, tmp_path,
                                                                   tls_home, tls_phones,
                                                                   e2e_pki):
    """alice's phone reaches its home over TLS; bob's side is UDP.  Her ACK and BYE
    follow the TLS Record-Route: pjsip writes TLS into their Via.  With a home that
    challenges its users (``digest``) the BYE is answered 407 (the phone's
    ``late_answer_bye`` event: 407 Proxy Authentication Required) and the phone sends
    it once more with its account's credentials (stop 44): bob gets the ACK and that
    BYE."""
    home = tls_home
    bob = RawUas(_bobs_phone)
    try:
        register_contact(home, "bob", bob.port,
                         password=PASSWORDS["bob"] if home.digest else None)
        directory = tmp_path / "alice"
        directory.mkdir()
        phone = {"registrar": home.tls_uri, "proxy": home.tls_uri,
                 "register_via_proxy": False, "srtp": True, "transport": "tls"}
        if home.digest:
            secret = directory / "password"
            secret.write_text(PASSWORDS["alice"] + "\n")
            secret.chmod(0o600)
            phone["password_file"] = "password"
        assert e2e_pki.directory is not None
        config = write_ua(directory, "alice", e2e_pki.directory, peer="bob", phone=phone,
                          e2m={"cert_url_hosts": ["127.0.0.1"]})
        alice = tls_phones.start("alice", config)
        assert alice.wait("started")["transport"] == "tls"
        alice.wait("registered", timeout=10)
        mark = home.log_mark()
        _late_2xx_flow(home, alice, bob, e2e_pki, transport="TLS", digest=home.digest)
        log = home.log_since(mark)
        assert "sanity" not in log, log[-2000:]
    finally:
        bob.close()


def _late_2xx_flow(home: ProxyHandle, alice, bob: RawUas, pki: TestPKI,
                   transport: str = "UDP", digest: bool = False) -> None:
    """alice calls bob; device f1 rings and answers 486; device f2's 200 comes after it
    under alice's offer key: her phone's ACK and BYE must reach bob through ``home``.
    ``digest``: the home challenges the BYE (407) and the phone sends it again, once,
    with credentials (CSeq one higher)."""
    devices = {"f1": ua_engine(pki, "bob", peers=("alice",)),
               "f2": ua_engine(pki, "bob", peers=("alice",))}
    alice.send(f"call {BOB}")
    (delivered,) = bob.wait_for(1, method="INVITE", timeout=10)
    assert delivered.get_all("Record-Route"), "the home proxy record-routes"
    opened = devices["f1"].open(delivered).message
    for status, reason in ((180, "Ringing"), (486, "Busy Here")):
        reply = make_response(delivered, status, reason)
        reply = reply.replace("To", f"{delivered.get('To')};tag=f1")
        bob.sock.sendto(reply.serialize(), ("127.0.0.1", home.port))
        time.sleep(0.2)
    assert opened.body
    alice.wait("call_ended", timeout=5)
    time.sleep(0.5)
    mark = alice.mark()
    answer_under_offer_key(home, devices["f2"], bob, delivered, to_tag="f2")
    byes = bob.wait_for(1, method="BYE", timeout=5)
    time.sleep(2.0)                  # no retransmission once bob answered 200
    # read after the waits: ACK(f1) came before the 200, so waiting for "an ACK" could
    # return before ACK(f2) arrived (seen under load)
    acks = [m for m in bob.wait_for(2, method="ACK", timeout=5) if m.to_tag == "f2"]
    late = alice.of("late_answer", since=mark)
    assert [e["sent"] for e in late] == [["ACK", "BYE"]], alice.events[-10:]
    assert [e["status"] for e in alice.of("late_answer_bye", since=mark)] == \
        ([407, 200] if digest else [200]), alice.events[-10:]
    assert [(e["status"], e["retried"], e["tries"])
            for e in alice.of("late_answer_bye_auth", since=mark)] == \
        ([(407, True, 1)] if digest else []), alice.events[-10:]
    assert len(acks) == 1 and len(bob.wait_for(2, method="BYE", timeout=0.1)) == 1, \
        [(m.method, m.to_tag) for m in bob.received]
    (ack,), (bye,) = acks, byes
    for request in (ack, bye):
        # through the home proxy: its Via on top, alice's (pjsip's) below
        vias = request.get_all("Via")
        assert len(vias) >= 2 and f":{home.port}" in vias[0], vias
        assert vias[1].upper().startswith(f"SIP/2.0/{transport} "), vias
        assert request.request_uri == f"sip:bob@127.0.0.1:{bob.port}"
        assert request.to_tag == "f2" and request.from_tag == delivered.from_tag
    assert ack.cseq == (delivered.cseq[0], "ACK")
    # the retry with credentials is a new request: CSeq + 1 (RFC 3261 22.2); the home
    # took its credentials off before relaying (consume_credentials)
    assert bye.cseq == (delivered.cseq[0] + (2 if digest else 1), "BYE")
    assert not bye.get_all("Proxy-Authorization") and not bye.get_all("Authorization")
    assert not alice.of("error", since=mark), alice.of("error")
    assert not [e for e in alice.of("call_state", since=mark)
                if str(e.get("state", "")).upper().endswith("CONFIRMED")]
