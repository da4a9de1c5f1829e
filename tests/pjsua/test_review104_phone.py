"""A fifty-...th attacker's review (December 2026) of 3724e89: stop 37's fixes, fresh eyes:
the phone half (the core half and the list of what held in the core:
``tests/unit/test_review104.py``).  A real ``e2m-phone listen`` (pjsua2).  Hole 2's
tests: alice, whose outbound proxy is a UDP socket of the test (the home proxy's seat,
review 92's ``Bob`` answering as bob's E2M UA), so that since review 102 (stop 37) her
phone takes requests only from that socket.  Hole 3's: bob registered at a real
Kamailio 5.6 with E2M on (review 102's set-up).

Hole 2 (``test_hole_the_callees_answer_sent_straight_to_the_phone_sets_up_the_call``):
**insider UA**, the callee (bob, his own certificate; no credentials needed).  Review
102's rule (``E2MPhone._through_home``) asks where a *request* came from; a response is
taken from anyone (``if home is None or not msg.is_request: return``).  The callee
learns the caller's address from the INVITE the home proxy relayed to him (her Via,
with ``received``/``rport`` as the proxy wrote them) and her branch beneath the proxy's.

- Messages: alice calls bob through her home proxy (here its seat).  bob's signed and
  sealed 200 (SDP answer, sealed for alice; under her offer's key, which the home proxy
  also holds), To tag his, no Record-Route, Contact his own address, is sent over UDP
  from bob's own socket straight to alice's phone (to the Via's address and port, with
  her Via and branch), never through the proxy.
- Effect (seen on 3724e89): the phone hands it to pjsua, which matches it to her INVITE
  by its branch: the call is CONFIRMED with bob's answer, and alice's ACK goes straight
  to bob's Contact (no Record-Route: the home proxy is out of the dialog).  The home
  proxy never saw the answer: no archive or media row of it, no firewall pinhole
  decided on it, exactly what review 71 refused at a cluster's front (the callee's 200
  sent straight past the node) and review 102 at the phone for requests.  Since the
  dialog's route set is now empty, every later in-dialog request of alice's (re-INVITE,
  BYE, MESSAGE in the dialog) also goes straight to bob, past the home's policy.
- At fault: ``pjsua_hooks/phone.py`` ``E2MPhone._through_home`` (phone.py:713,
  ``if home is None or not msg.is_request: return``): responses are not held to the
  home source.
- Fix: a phone with an outbound proxy drops (never hands pjsua) a response that did not
  come from its home source (``ProxySource.matches``), as it answers such a request 403
  (a response is not answered: dropped and counted, ``responses_not_via_proxy``); the
  certificate client's responses are the proxy's already.

Control (``test_control_the_callees_answer_through_the_home_sets_up_the_call``): the
same 200 from the proxy's seat confirms the call.

Hole 3 (``test_hole_a_registered_phone_without_a_proxy_shows_a_straight_message``):
**insider UA** (carol), review 102's very message, against bob's phone configured with a
``registrar`` (the real home Kamailio, E2M on, ``view`` MESSAGE text and INVITE SDP, the
SQLite archive) and no ``proxy``: the ordinary SIP set-up where a UA's requests go where
their Request-URI's domain says (RFC 3263), i.e. to the same home.  bob's phone learnt the
home's policy at REGISTER (its ``registered`` event lists ``MESSAGE:text/plain``), exactly
the premise of review 102's fix, yet ``_home_source`` is built only ``if proxies:``
(phone.py:537-544), so this phone takes requests from anyone.

- Messages: carol's signed MESSAGE, sealed for bob and ``proxy.example.com``, labelled
  for it, sent over UDP straight to bob's contact (his port), never through the home.
- Effect (seen on 3724e89): 200; bob shows it as carol's, ``readable_by``
  ``["proxy.example.com"]``; no archive row.  Review 102's hole, unchanged for a phone
  that registers without an outbound proxy (the docs call a phone without a proxy "peer
  to peer"; one with a registrar has a home and its policy).
- At fault: ``pjsua_hooks/phone.py`` ``E2MPhone.start`` (phone.py:537, ``if proxies:``).
- Fix: build ``_home_source`` when a ``proxy`` *or* a ``registrar`` is set (the
  registrar's address, ``home_sources`` for a domain whose requests come from other
  hosts); only a phone with neither is peer to peer.

Control (``test_control_carols_message_through_the_registrar_is_archived_and_shown``):
the same MESSAGE sent to the home (Request-URI bob's AoR) is archived as carol's and
shown.

Tried and held (the phone, read or run here): a request from bob's straight socket in
that call (a re-INVITE/BYE "from bob") is 403 with the Warning and a ``request_refused``
event, the call stays up, and the 403 is one small answer per request (under 600
octets, no body; its Warning names only the phone's own address: no amplification worth
the name) (``test_control_a_request_from_the_callees_own_socket_is_still_403``).  Read,
not run: an ACK from elsewhere is dropped unanswered (rawhook.py:393: an ACK is never
answered); a CANCEL from elsewhere is 403 before pjsua (``_through_home`` runs for every
request, after only the parse, the challenge filter and the certificate NOTIFY rule); an
IPv4-mapped IPv6 spelling of the proxy's address compares equal (``canonical_ip``); a
host name in ``proxy`` resolves once, at start, to every address (a stranger at another
address of the name is taken only if it is one of them).  Honest flows, read, not run:
a proxy URI with ``;maddr=`` is compared by its host, not its maddr (pjsip sends to the
maddr: requests from a proxy there would be refused; an honest break, not a security
hole); a home proxy with several UDP listeners should relay from the socket the REGISTER
came in on (usrloc keeps the received socket), so the registrar's address matches; a
proxy whose name changes address after start is refused until a restart (resolved once).

Fixed (stop 37): hole 2, a phone with an outbound proxy drops a response from elsewhere
(``E2MPhone._answer_from_home``); hole 3, a phone with a registrar and no outbound proxy
takes requests only from its home too.  Both hole tests pass.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SDP_ANSWER
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.stranger import HOST, UdpStranger
from e2m_plugins import sip
from e2m_plugins.sip import make_request, make_response
from tests.pjsua.test_review92_phone import Bob, pki  # noqa: F401  (pki: a fixture)

pytestmark = [pytest.mark.pjsua2, pytest.mark.kamailio]

BOB = "sip:bob@example.com"
TAG = "r104b"


@pytest.fixture
def ringing(tmp_path: Path, pki) -> Iterator[tuple[PhoneProcess, Bob, sip.SipMessage]]:  # noqa: F811
    """alice's phone (outbound proxy: the seat ``home``) has sent its INVITE to bob."""
    home = Bob(pki)
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{home.port}"})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        alice.send(f"call {BOB}")
        invite = home.receive(lambda m: m.is_request and m.method == "INVITE")
        yield alice, home, invite
    finally:
        alice.stop()
        home.close()


def _bobs_answer(home: Bob, invite: sip.SipMessage, port: int) -> bytes:
    """bob's 200 to alice's INVITE as his E2M UA protects it: SDP answer, his tag, his
    own Contact (``port``), no Record-Route."""
    delivered = home.engine.open(invite).message
    ok = make_response(delivered, 200, "OK", [("Contact", f"<sip:bob@{HOST}:{port}>")],
                       SDP_ANSWER, "application/sdp")
    ok = ok.replace("To", f"{delivered.get('To')};tag={TAG}")
    return home.engine.protect(ok).message.serialize()


def _confirmed(alice: PhoneProcess, mark: int, timeout: float) -> bool:
    try:
        alice.wait("call_state", where=lambda e: str(e.get("state", "")).upper()
                   .endswith("CONFIRMED"), since=mark, timeout=timeout)
    except Exception:  # noqa: BLE001 - the wait's timeout
        return False
    return True


def _ack_at(sock: socket.socket, timeout: float) -> sip.SipMessage | None:
    sock.settimeout(timeout)
    try:
        while True:
            data, _ = sock.recvfrom(65535)
            msg = sip.parse(data)
            if msg.is_request and msg.method == "ACK":
                return msg
    except (socket.timeout, TimeoutError):
        return None


def test_control_the_callees_answer_through_the_home_sets_up_the_call(ringing):
    alice, home, invite = ringing
    mark = alice.mark()
    home.sock.sendto(_bobs_answer(home, invite, home.port), home.source)
    assert _confirmed(alice, mark, timeout=8)


def test_hole_the_callees_answer_sent_straight_to_the_phone_sets_up_the_call(ringing):
    alice, home, invite = ringing
    straight = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    straight.bind((HOST, 0))
    try:
        mark = alice.mark()
        straight.sendto(_bobs_answer(home, invite, straight.getsockname()[1]), home.source)
        confirmed = _confirmed(alice, mark, timeout=5)
        ack = _ack_at(straight, 1.0) if confirmed else None
        print("confirmed", confirmed, "ACK straight to bob", ack is not None,
              "requests_not_via_proxy", alice.status()["counts"].get("requests_not_via_proxy"))
        assert not confirmed, "the call was set up by an answer the home proxy never saw"
    finally:
        straight.close()


def test_control_a_request_from_the_callees_own_socket_is_still_403(ringing, pki):  # noqa: F811
    """Held: once the call is up (through the home), a BYE "from bob" sent from bob's own
    socket is refused 403 with the Warning; the call stays up."""
    alice, home, invite = ringing
    mark = alice.mark()
    home.sock.sendto(_bobs_answer(home, invite, home.port), home.source)
    assert _confirmed(alice, mark, timeout=8)
    thief = UdpStranger(alice.port)
    try:
        bye = make_request("BYE", f"sip:alice@{HOST}:{alice.port}", from_uri=pki.aor("bob"),
                           to_uri=pki.aor("alice"), call_id=invite.call_id, cseq=7,
                           from_tag=TAG, to_tag=invite.from_tag,
                           via_host=f"{HOST}:{thief.local_port}")
        thief.send(bye.serialize())
        answer = thief.answered(invite.call_id, timeout=5)
        assert answer is not None
        response = sip.parse(answer)
        assert response.status == 403
        assert "did not come through the home proxy" in (response.get("Warning") or "")
        assert len(answer) < 600, len(answer)
        refused = alice.wait("request_refused", lambda e: e["method"] == "BYE", since=mark,
                             timeout=5)
        assert refused["source"] == f"{HOST}:{thief.local_port}"
        assert not alice.of("call_ended", since=mark)
    finally:
        thief.close()


# -- hole 3: a phone with a registrar and no outbound proxy takes requests from anyone ---

VIEW = ("MESSAGE:text/plain", "INVITE:application/sdp")


@pytest.fixture
def home(pki102, tmp_path_factory: pytest.TempPathFactory):
    from e2m_lab.kamailio_harness import start_proxy
    handle = start_proxy(tmp_path_factory.mktemp("review104-home"), pki=pki102, e2m=True,
                         view=VIEW)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def pki102(tmp_path_factory: pytest.TempPathFactory):
    from e2m_plugins.testpki import init_test_pki
    return init_test_pki(tmp_path_factory.mktemp("review104-pki"),
                         users=("alice", "bob", "carol"), key_type="ec")


@pytest.fixture
def bob_registered(tmp_path: Path, pki102, home) -> Iterator[PhoneProcess]:
    """bob's phone over UDP registered at the home proxy, no outbound proxy (its requests
    go where their Request-URI says, RFC 3263): it learnt the home's policy at REGISTER."""
    directory = tmp_path / "bob"
    directory.mkdir()
    config = write_ua(directory, "bob", pki102.directory, peer="alice",
                      phone={"registrar": home.uri, "srtp": True, "transport": "udp"},
                      e2m={"cert_url_hosts": ["127.0.0.1"]})
    phone = PhoneProcess(config, "bob")
    try:
        registered = phone.wait("registered", timeout=15)
        views = [rule for p in registered.get("policies", ()) for rule in p["view"]]
        assert "MESSAGE:text/plain" in views, registered   # bob knows the proxy archives IM
        yield phone
    finally:
        phone.stop()


def test_control_carols_message_through_the_registrar_is_archived_and_shown(pki102, home,
                                                                             bob_registered):
    from tests.pjsua.test_review102_phone import _carols_message, _rows_with, _shown
    text = b"review 104 control: the invoice goes to IBAN XX00 4444"
    peer = UdpStranger(home.port)
    try:
        wire = _carols_message(pki102, pki102.aor("bob"), peer.local_port, text)
        mark = bob_registered.mark()
        peer.send(wire.serialize())
        assert peer.final(wire.call_id, timeout=8) == 200
        assert _shown(bob_registered, mark, text)
        rows = _rows_with(home, text)
        assert len(rows) == 1 and rows[0].from_uri == pki102.aor("carol"), rows
    finally:
        peer.close()


def test_hole_a_registered_phone_without_a_proxy_shows_a_straight_message(pki102, home,
                                                                         bob_registered):
    from tests.pjsua.test_review102_phone import _carols_message, _rows_with, _shown
    text = b"review 104 hole: the invoice goes to IBAN XX00 5555"
    bob = bob_registered
    peer = UdpStranger(bob.port)
    try:
        wire = _carols_message(pki102, f"sip:bob@{HOST}:{bob.port}", peer.local_port, text)
        mark = bob.mark()
        peer.send(wire.serialize())
        status = peer.final(wire.call_id, timeout=8)
        shown = _shown(bob, mark, text, timeout=3.0)
        archived = _rows_with(home, text)
        print("status", status, "shown", len(shown),
              "readable_by", [e["security"].get("readable_by") for e in shown],
              "archived", len(archived))
        assert archived or not shown, (status, len(shown))
    finally:
        peer.close()
