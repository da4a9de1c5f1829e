"""A fifty-...th attacker's review (December 2026) of 0951fe9: stop 37's later fixes
(reviews 103 and 104), fresh eyes: the phone half (the core half and what held there:
``tests/unit/test_review105.py``).  A real ``e2m-phone listen`` (pjsua2).

Hole 2 (``test_hole_a_registered_phone_takes_the_callees_straight_answer``): **insider
UA**, the callee (bob, his own certificate).  Review 104 extended the home rule for
*requests* to a phone with a registrar and no outbound proxy (its requests go where
their Request-URI's domain says, RFC 3263: to the same home), but the rule for
*responses* stays with an outbound proxy only: ``self._answers_from_home =
bool(proxies)`` (phone.py:551), so ``_answer_from_home`` returns at once for such a
phone.  Review 104's hole 2, unchanged for the set-up review 104's hole 3 calls a home.

- Set-up: alice's phone registered at her home (here a UDP socket of the test in the
  home's seat, review 92's ``Bob``, answering as bob's E2M UA; the PKI's domain is that
  host, 127.0.0.1, so her call to ``sip:bob@127.0.0.1:<home port>`` goes to the home as
  RFC 3263 sends it), ``registrar`` set, no ``proxy``.
- Messages: alice calls bob; the INVITE reaches the home.  bob's signed and sealed 200
  (SDP answer, his tag, his own Contact, no Record-Route) is sent over UDP from bob's own
  socket straight to alice's phone (to her Via's address and port, with her branch),
  never through the home.
- Effect (seen on 0951fe9): the phone hands it to pjsua, the call is CONFIRMED on bob's
  answer (``responses_not_via_proxy`` 0, no ``response_dropped``) and alice's ACK goes
  straight to bob's Contact: the home never saw the answer
  (no archive or media row, no pinhole decided on it) and the dialog's route set is
  empty, so her later requests in it go past the home too.
- At fault: ``pjsua_hooks/phone.py`` ``E2MPhone.start``, line 551
  (``self._answers_from_home = bool(proxies)``).
- Fix: a phone with a home holds responses to it as it holds requests: for a phone with
  a registrar and no outbound proxy, drop a response to a request that was sent to the
  home (its Request-URI's host is the registrar's, or the request was routed there)
  unless it comes from the home source; or simply require every response from the home
  when the phone has one (a phone calling a foreign domain directly would list it in
  ``home_sources``, as a cluster does).

Control (``test_control_the_callees_answer_through_the_home_sets_up_the_call``): the
same 200 from the home's socket confirms the call (the set-up is sound).

Tried and held (read, not run): a request from elsewhere to this phone is 403 (review
104's fix, ``_through_home`` for a registrar); an IPv4-mapped source compares equal
(``canonical_ip``); over TCP/TLS only the address is compared (a registered TCP phone
accepts no stranger's connection: ``tcp_accept`` off with a registrar).

Fixed (stop 37), hole 2: ``E2MPhone._answer_from_home`` drops a response from elsewhere
also for a phone with only a registrar, when its request went home (``_sent_home``: the
To names a user of our own domain or a home's host); the hole test passes.
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

TAG = "r105b"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review105-pki"), domain=HOST,
                         users=("alice", "bob"), key_type="ec")


def _write_alice(directory: Path, pki_dir: Path, phone: dict) -> Path:
    return write_ua(directory, "alice", pki_dir, peer="bob", phone=phone, domain=HOST)


@pytest.fixture
def ringing(tmp_path: Path, pki) -> Iterator[tuple[PhoneProcess, Bob, sip.SipMessage]]:
    """alice's phone (registrar: the seat ``home``, no outbound proxy), registered there
    (200, no policy), has sent its INVITE to bob at the home."""
    home = Bob(pki)
    assert pki.directory is not None
    config = _write_alice(tmp_path, pki.directory,
                          {"registrar": f"sip:{HOST}:{home.port}", "transport": "udp"})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        register = home.receive(lambda m: m.is_request and m.method == "REGISTER")
        ok = make_response(register, 200, "OK",
                           [("Contact", f"{register.get('Contact')};expires=3600")], b"", None)
        home.send(ok.replace("To", f"{register.get('To')};tag=reg105"))
        alice.wait("registered", timeout=8)
        alice.send(f"call sip:bob@{HOST}:{home.port}")
        invite = home.receive(lambda m: m.is_request and m.method == "INVITE")
        yield alice, home, invite
    finally:
        alice.stop()
        home.close()


def _bobs_answer(home: Bob, invite: sip.SipMessage, port: int) -> bytes:
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


def test_control_the_callees_answer_through_the_home_sets_up_the_call(ringing):
    alice, home, invite = ringing
    assert invite.get("Route") is None        # no outbound proxy: sent to the domain
    mark = alice.mark()
    home.sock.sendto(_bobs_answer(home, invite, home.port), home.source)
    assert _confirmed(alice, mark, timeout=8)


def test_hole_a_registered_phone_takes_the_callees_straight_answer(ringing):
    alice, home, invite = ringing
    straight = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    straight.bind((HOST, 0))
    try:
        mark = alice.mark()
        straight.sendto(_bobs_answer(home, invite, straight.getsockname()[1]), home.source)
        confirmed = _confirmed(alice, mark, timeout=5)
        print("confirmed", confirmed, "counts", alice.status()["counts"])
        assert not confirmed, "the call was set up by an answer the home never saw"
    finally:
        straight.close()
