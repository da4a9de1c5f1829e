"""A fifty-...th attacker's review (December 2026) of 7f22cee: honest flows and bypasses
of stop 37's newest rules, the phone half (the core half: ``tests/unit/test_review106.py``).
A real ``e2m-phone listen`` (pjsua2).

Hole 1 (``test_hole_the_callee_respells_the_to_and_his_straight_answer_is_taken``):
**insider UA**, the callee (bob, his own certificate).  Review 105's fix decides whether
a response must come from the home by reading the *response's* To (``_sent_home``,
phone.py:766-771): the callee writes that header, and pjsip matches a response to its
INVITE by the Via branch alone.  bob writes his own AoR in another spelling, with a
trailing dot (``sip:bob@127.0.0.1.``): the same AoR for the core (``host_key`` drops the
dot, so ``_check_parties`` and the signer check pass), but ``_sent_home`` compares the
host as written with our domain (no dot) and, for the home's places, only host *names*
(``ProxySource.names``), never a name against the address it was resolved to.

- Set-up: alice's phone with a registrar named by a host name (``sip:localhost:<port>``,
  as a real ``sip:sip.example.com`` for the domain ``example.com``), no outbound proxy,
  registered at the home's seat (review 92's ``Bob`` socket); she calls
  ``sip:bob@127.0.0.1:<home port>``, which goes to the home.
- Messages: bob's signed and sealed 200 (SDP answer, his tag, his own Contact, no
  Record-Route) whose To is ``<sip:bob@127.0.0.1.:<port>>;tag=...`` (signed with that
  context), sent over UDP from bob's own socket straight to alice's Via address.
- Effect (seen on 7f22cee): the call is CONFIRMED on bob's answer, no
  ``response_dropped``, ``responses_not_via_proxy`` 0; her ACK and every later request go
  to bob's Contact: the home never saw the answer (no archive or media row, no pinhole).
  The same 200 with the To as alice wrote it is dropped (control 2): the rule is live,
  the spelling alone passes it.  In a real domain the same: ``sip:bob@example.com.``
  against a phone whose registrar is ``sip:sip.example.com``.
- At fault: ``pjsua_hooks/phone.py`` ``E2MPhone._sent_home`` (phone.py:766-771): the
  decision reads a header of the response (the answerer's), compared as written.
- Fix: decide from what *we* sent, not from the answer: keep, per client transaction
  (the top Via branch of each request the phone sends, bounded like ``_rx_tsx``),
  whether it went home (its Request-URI's ``host_key`` is our domain or a home host, or
  it carried a Route to the home), and hold the response of such a branch to the home
  source; at least compare ``host_key`` of the To with ``host_key(self.domain)`` and a
  home name's resolved addresses (``ProxySource.matches`` on the host's canonical IP).

Controls: ``test_control_the_respelt_answer_through_the_home_sets_up_the_call`` (the
same respelt 200 from the home's socket is CONFIRMED: pjsip and the core take that To),
``test_control_the_honest_straight_answer_is_dropped`` (bob's 200 with the To alice
wrote, straight: dropped, ``responses_not_via_proxy`` 1: the set-up has the rule live).

Tried and held (read, or run in ``tests/unit/test_review106.py``): a To in upper case
(``lower()``), with a port, as an IPv4-mapped IPv6 literal (``ProxySource.names``
canonicalises it), with a trailing dot where the registrar URI names the domain itself
(``names`` drops the dot); a To naming another AoR is refused by the core
(``_check_parties``: BindingMismatchError) after the rule lets it through; a 3xx is not
followed (pjsua2's ``onCallRedirected`` default stops); ``register_via_proxy = false``
(the registrar is one of the home's places); the certificate client runs only with an
outbound proxy, whose every answer comes from the home.

Fixed (stop 37): a phone with only a registrar notes, when it sends a request, whether
it goes toward its home (its first Route, else its Request-URI, naming our domain or a
home host, compared by ``host_key`` and by the home's resolved addresses:
``E2MPhone._note_sent``), and holds that branch's answers to the home; the answer's own
To decides nothing.  The hole test failed on the code before (checked) and passes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SDP_ANSWER
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.stranger import HOST
from e2m_plugins import sip
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import TestPKI, init_test_pki
from tests.pjsua.test_review92_phone import Bob

pytestmark = [pytest.mark.pjsua2, pytest.mark.kamailio]

TAG = "r106a"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review106-pki"), domain=HOST,
                         users=("alice", "bob"), key_type="ec")


def _write_alice(directory: Path, pki_dir: Path, phone: dict) -> Path:
    return write_ua(directory, "alice", pki_dir, peer="bob", phone=phone, domain=HOST)


@pytest.fixture
def ringing(tmp_path: Path, pki) -> Iterator[tuple[PhoneProcess, Bob, sip.SipMessage]]:
    """alice's phone (registrar: the home's seat by a host name, no outbound proxy),
    registered there, has sent its INVITE to bob at the home."""
    home = Bob(pki)
    assert pki.directory is not None
    config = _write_alice(tmp_path, pki.directory,
                          {"registrar": f"sip:localhost:{home.port}", "transport": "udp"})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        register = home.receive(lambda m: m.is_request and m.method == "REGISTER")
        ok = make_response(register, 200, "OK",
                           [("Contact", f"{register.get('Contact')};expires=3600")], b"", None)
        home.send(ok.replace("To", f"{register.get('To')};tag=reg106"))
        alice.wait("registered", timeout=8)
        alice.send(f"call sip:bob@{HOST}:{home.port}")
        invite = home.receive(lambda m: m.is_request and m.method == "INVITE")
        yield alice, home, invite
    finally:
        alice.stop()
        home.close()


def _bobs_answer(home: Bob, invite: sip.SipMessage, port: int, to_host: str) -> bytes:
    delivered = home.engine.open(invite).message
    ok = make_response(delivered, 200, "OK", [("Contact", f"<sip:bob@{HOST}:{port}>")],
                       SDP_ANSWER, "application/sdp")
    ok = ok.replace("To", f"<sip:bob@{to_host}:{home.port}>;tag={TAG}")
    return home.engine.protect(ok).message.serialize()


def _confirmed(alice: PhoneProcess, mark: int, timeout: float) -> bool:
    try:
        alice.wait("call_state", where=lambda e: str(e.get("state", "")).upper()
                   .endswith("CONFIRMED"), since=mark, timeout=timeout)
    except Exception:  # noqa: BLE001 - the wait's timeout
        return False
    return True


def _straight(alice: PhoneProcess, home: Bob, invite: sip.SipMessage,
              to_host: str) -> tuple[bool, dict]:
    straight = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    straight.bind((HOST, 0))
    try:
        mark = alice.mark()
        straight.sendto(_bobs_answer(home, invite, straight.getsockname()[1], to_host),
                        home.source)
        confirmed = _confirmed(alice, mark, timeout=5)
        counts = alice.status()["counts"]
        print("confirmed", confirmed, "counts", counts)
        return confirmed, counts
    finally:
        straight.close()


def test_control_the_respelt_answer_through_the_home_sets_up_the_call(ringing):
    alice, home, invite = ringing
    assert invite.get("Route") is None        # no outbound proxy: sent to the domain
    mark = alice.mark()
    home.sock.sendto(_bobs_answer(home, invite, home.port, HOST + "."), home.source)
    assert _confirmed(alice, mark, timeout=8)


def test_control_the_honest_straight_answer_is_dropped(ringing):
    alice, home, invite = ringing
    confirmed, counts = _straight(alice, home, invite, HOST)
    assert not confirmed
    assert counts.get("responses_not_via_proxy", 0) >= 1


def test_hole_the_callee_respells_the_to_and_his_straight_answer_is_taken(ringing):
    alice, home, invite = ringing
    confirmed, counts = _straight(alice, home, invite, HOST + ".")
    assert not confirmed, "the call was set up by an answer the home never saw"
