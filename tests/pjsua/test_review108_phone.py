"""Review 108 (an attacker's review of adf7317): the registrar-only phone's send-time
home rule (stop 37's fix of review 106), plus what else of stop 37 and of the archive
under a PostgreSQL outage was tried.  A real ``e2m-phone listen`` (pjsua2); the home
proxy is review 92's ``Bob`` socket (it registers alice and relays bob's 200 as the home
does), bob's own phone a UDP socket on 127.0.0.2.

Hole 1 (``test_hole_a_home_route_by_name_lets_the_callee_answer_the_reinvite_straight``,
``test_hole_a_strict_home_route_lets_the_callee_answer_the_reinvite_straight``):
**insider UA**, the callee (bob, his own certificate), against a phone with only a
registrar.  ``E2MPhone._note_sent`` (phone.py:773-788) decides whether a request goes
home from its headers: the first Route, else the Request-URI, whose host must be our
domain or one of the home's places (``ProxySource.names``, proxysource.py:96-102).  A
host *name* there is compared only with the names written in the phone's config, never
with the addresses the home was resolved to; and a strict route is not read as one.
So an in-dialog request that does go to the home is noted as not going home, and
``_answer_from_home`` (phone.py:757) takes its answer from anywhere.

- Set-up: alice's phone, ``registrar = "sip:127.0.0.1:<home port>"`` (the home named by
  its address), UDP, no outbound proxy, registered at the home; she calls
  ``sip:bob@127.0.0.1:<home port>``.  bob's 200 comes through the home with one
  Record-Route entry, the home's, and bob's Contact ``sip:bob@127.0.0.2:<port>``; the
  call is CONFIRMED and her ACK reaches the home.
- (a) The home's entry names it by a host name: ``<sip:localhost:<port>;lr;e2m-rr=..>``
  (a cluster's ``advertise = "sip.example.com"`` is put in Record-Route as a name,
  kamailio_app/README.md; the phone's registrar names the address, or the domain,
  whose A record is not the proxy in an SRV deployment).  (b) The home's entry without
  ``;lr`` (a strict route: pjsip puts it in the Request-URI and bob's Contact in the
  Route; ``dialog_route.written_as_ours`` accepts an entry missing ``lr``, read).
- Messages: alice holds the call (``hold``): her re-INVITE goes to the home's socket
  (seen there: (a) Route ``<sip:localhost:...;lr;...>``; (b) Request-URI
  ``sip:127.0.0.1:<home port>``, Route ``<sip:bob@127.0.0.2:...>``).  bob answers it
  with his sealed 200 (SDP) from 127.0.0.2, straight to alice's Via address.
- Effect (seen on adf7317, both forms): alice takes the answer: her ACK for the
  re-INVITE's CSeq reaches the home, ``responses_not_via_proxy`` 0, no
  ``response_dropped``.  The home relayed the re-INVITE but never saw its answer (its
  archive row of the answer's SDP, its media rule); every later answer to an in-dialog
  request of the call (BYE, UPDATE, INFO, MESSAGE) is taken from anywhere as well.  The
  same call with the home's entry as the registrar's address and ``;lr`` drops the
  same straight answer (``responses_not_via_proxy`` 1, no ACK): the rule is live, the
  spelling alone passes it.
- Reach on this project's proxy: (a) needs a home that record-routes by name (a
  cluster with ``advertise`` set to a name, or the domain's A record elsewhere than the
  proxy) and a phone configured with another spelling, both ordinary; bob then only
  answers straight what the home relayed to him.  (b) as shown needs a home that relays
  a strict-routed in-dialog request: this project's Kamailio would answer it 403 "Not
  Routed Here" (kemi.py:1110-1128: its token is then in the Request-URI, not in a Route,
  so ``dialog_routed_here`` finds none; read, not run), so on this proxy (b) is the
  same defect without an attack; it is kept as the second spelling of the rule's fault.
- At fault: ``pjsua_hooks/phone.py`` ``E2MPhone._note_sent`` (773-788), which re-derives
  the next hop from the headers, and ``ProxySource.names`` (proxysource.py:96-102),
  which never compares a name with the home's resolved addresses.
- Fix: note where the request actually went: the destination pjsip chose (the tx
  data's ``tp_info.dst_addr``, readable in the raw hook as ``rx_source`` is on receive)
  compared with ``ProxySource.matches``; or, short of that, take any request that
  carries a Route (a route set from the home's Record-Route) or whose Request-URI has no
  user part (a strict route) as going home, and resolve the home's Record-Route names
  once when the dialog is set up (outside the hook), adding them to the home's places.

Controls (pass unmarked): ``test_control_a_loose_home_route_holds_the_reinvite_answer_to_the_home``
and ``test_control_the_home_named_by_its_address_holds_the_reinvite_answer``: the same
call and the same straight 200 to the re-INVITE, with the home's entry as the
registrar's address (``;lr``): no ACK for it, ``responses_not_via_proxy`` 1.

Tried and held (read unless said run):

- phone: a response's branch in other letters (should pjsip match it to the
  transaction, ``_sent_home`` misses it and defaults to "went home": held to the home,
  fail safe; not run); a
  CANCEL or non-2xx ACK shares the INVITE's branch with the same Request-URI (same
  note); a 401 retry or re-REGISTER gets a new branch and is noted (its Request-URI is
  the registrar); the certificate client's PUBLISH/SUBSCRIBE leave the hook before
  ``_note_sent`` (never noted: held to the home); ``_sent_home`` is bounded at 512
  (``_MEMO``), the oldest out first, and a branch not found is held to the home (a
  peer-to-peer transaction outliving 512 sends would lose its answer: no attacker can
  make the phone send, since its requests come only from the home); IPv6 and
  IPv4-mapped spellings of the home's address (``canonical_ip``); the initial INVITE to
  the domain or the home's address (the run controls).
- PEM discovery (``ua._certificate_from``, ua.py:1400-1427): the regex is linear (each
  BEGIN scans base64 characters up to the next non-base64 octet); text before the
  block, CRLF inside, the X509 label are taken; a TRUSTED CERTIFICATE block is refused
  (a rare OpenSSL form, not an honest peer's answer); the DER is counted by
  ``readable_certificate`` either way.  ``certificate_counts`` and
  ``check_published_certificate``: review 106's shapes counted first (not re-run).
- Kamailio's whole-message read (kemi.py:176-235, 583-602): messages up to 49,149
  octets are read through one base64 (NUL-safe); longer ones in 32 KiB slices checked
  against ``$(mb{s.sha256})``, any mismatch 413 (requests) or dropped (replies);
  ``_LAST_READ`` is keyed by ``$mi``, ``$ml`` and ``$ci``: a failure route's faked
  request in another worker could meet a same-id, same-length, same-Call-ID entry of
  that worker only if a sender hits that worker's message counter exactly (no way to
  aim it seen; not run).
- Archive under an outage (archive_spool.py): a spool write checks the node's count
  and pages and the sender's share in one ``BEGIN IMMEDIATE`` transaction, a message's
  weight is at least the pages it took; replay is oldest-first, one transaction each,
  rows keep their uid (``INSERT`` ignores one the database already has: no duplicate on
  a cut replay); a spool that cannot be read makes writes go to PostgreSQL directly.
  No age bound: spooled rows wait until replayed (by design: nothing lost).  An
  insider filling his own share during an outage so that his later messages are lost
  but relayed is the documented known limit (threat model, review 32/34) with
  ``fail_request_on_error = false``; with it true his requests are 500.  Not re-run.

Fixed (stop 38): the phone notes where pjsip really sends each request: the
destination in pjsip's tx data (``tp_info``, read in the raw hook as
``tx_destination``, both known layouts tried and held to agree with themselves; the
start self-test checks it against its own OPTIONS), compared with the home's addresses
(``ProxySource.matches``).  How the route set spells the home no longer matters; an
unreadable destination counts as home.  Both hole tests failed on the code before
(checked) and pass.
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

TAG = "r108a"
BOB_HOST = "127.0.0.2"        # bob's own phone: another loopback address than the home's


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review108-pki"), domain=HOST,
                         users=("alice", "bob"), key_type="ec")


def _write_alice(directory: Path, pki_dir: Path, phone: dict) -> Path:
    return write_ua(directory, "alice", pki_dir, peer="bob", phone=phone, domain=HOST)


class Call:
    """alice (registrar only: the home's seat by its address), registered there, in a
    call with bob set up through the home; bob's phone listens on BOB_HOST."""

    def __init__(self, tmp_path: Path, pki: TestPKI, route_entry: str) -> None:
        self.home = Bob(pki)
        self.bob = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.bob.bind((BOB_HOST, 0))
        self.bob_port = self.bob.getsockname()[1]
        assert pki.directory is not None
        config = _write_alice(tmp_path, pki.directory,
                              {"registrar": f"sip:{HOST}:{self.home.port}", "transport": "udp"})
        self.alice = PhoneProcess(config, "alice")
        self.route_entry = route_entry.format(port=self.home.port)

    def up(self) -> sip.SipMessage:
        home, alice = self.home, self.alice
        alice.wait("started", timeout=15)
        register = home.receive(lambda m: m.is_request and m.method == "REGISTER")
        ok = make_response(register, 200, "OK",
                           [("Contact", f"{register.get('Contact')};expires=3600")], b"", None)
        home.send(ok.replace("To", f"{register.get('To')};tag=reg108"))
        alice.wait("registered", timeout=8)
        mark = alice.mark()
        alice.send(f"call sip:bob@{HOST}:{home.port}")
        invite = home.receive(lambda m: m.is_request and m.method == "INVITE")
        # bob's 200 as the home relays it: its Record-Route entry (as the test writes
        # it), bob's Contact on his own address
        delivered = home.engine.open(invite).message
        ok = make_response(delivered, 200, "OK",
                           [("Record-Route", self.route_entry),
                            ("Contact", f"<sip:bob@{BOB_HOST}:{self.bob_port}>")],
                           SDP_ANSWER, "application/sdp")
        ok = ok.replace("To", f"{delivered.get('To')};tag={TAG}")
        home.send(home.engine.protect(ok).message)
        alice.wait("call_state", where=lambda e: str(e.get("state", "")).upper()
                   .endswith("CONFIRMED"), since=mark, timeout=8)
        ack = home.receive(lambda m: m.is_request and m.method == "ACK")
        home.engine.open(ack)
        return invite

    def reinvite(self) -> sip.SipMessage:
        """alice holds the call: her re-INVITE, as it reached the home."""
        self.alice.send("hold")
        return self.home.receive(lambda m: m.is_request and m.method == "INVITE"
                                 and m.to_tag is not None)

    def straight_answer(self, reinvite: sip.SipMessage) -> None:
        """bob's sealed 200 to the re-INVITE, from his own socket straight to alice."""
        delivered = self.home.engine.open(reinvite).message
        ok = make_response(delivered, 200, "OK",
                           [("Contact", f"<sip:bob@{BOB_HOST}:{self.bob_port}>")],
                           SDP_ANSWER, "application/sdp")
        wire = self.home.engine.protect(ok).message.serialize()
        assert self.home.source is not None
        self.bob.sendto(wire, self.home.source)

    def acked(self, cseq: int, timeout: float = 4.0) -> bool:
        """Whether alice ACKed the 2xx of the request with ``cseq`` (she took it)."""
        try:
            self.home.receive(lambda m: m.is_request and m.method == "ACK"
                              and m.cseq[0] == cseq, timeout=timeout)
        except AssertionError:
            return False
        return True

    def close(self) -> None:
        self.alice.stop()
        self.home.close()
        self.bob.close()


@pytest.fixture
def call_factory(tmp_path: Path, pki) -> Iterator:
    made: list[Call] = []

    def make(route_entry: str) -> Call:
        call = Call(tmp_path / str(len(made)), pki, route_entry)
        made.append(call)
        return call

    (tmp_path / "0").mkdir()
    (tmp_path / "1").mkdir()
    yield make
    for call in made:
        call.close()


def _straight_reinvite_answer(call: Call) -> tuple[sip.SipMessage, bool, dict]:
    call.up()
    reinvite = call.reinvite()
    call.straight_answer(reinvite)
    acked = call.acked(reinvite.cseq[0])
    counts = call.alice.status()["counts"]
    print("re-INVITE", reinvite.request_uri, reinvite.get_all("Route"), "acked", acked,
          "counts", counts)
    return reinvite, acked, counts


def test_control_a_loose_home_route_holds_the_reinvite_answer_to_the_home(call_factory):
    call = call_factory("<sip:" + HOST + ":{port};lr>")
    reinvite, acked, counts = _straight_reinvite_answer(call)
    assert not acked
    assert counts.get("responses_not_via_proxy", 0) >= 1


def test_hole_a_strict_home_route_lets_the_callee_answer_the_reinvite_straight(call_factory):
    call = call_factory("<sip:" + HOST + ":{port}>")
    reinvite, acked, counts = _straight_reinvite_answer(call)
    # the request itself went to the home (strict routing: its Request-URI is the home)
    assert reinvite.request_uri.startswith(f"sip:{HOST}:{call.home.port}")
    assert not acked, "alice took a re-INVITE answer the home never saw"
    assert counts.get("responses_not_via_proxy", 0) >= 1


def test_control_the_home_named_by_its_address_holds_the_reinvite_answer(call_factory):
    """The home's entry with the address the registrar names: held (the control of hole 1
    in the spelling the lab's proxy writes)."""
    call = call_factory("<sip:" + HOST + ":{port};lr;e2m-rr=00>")
    reinvite, acked, counts = _straight_reinvite_answer(call)
    assert reinvite.get_all("Route")[0].startswith(f"<sip:{HOST}:")
    assert not acked
    assert counts.get("responses_not_via_proxy", 0) >= 1


def test_hole_a_home_route_by_name_lets_the_callee_answer_the_reinvite_straight(call_factory):
    call = call_factory("<sip:localhost:{port};lr;e2m-rr=00>")
    reinvite, acked, counts = _straight_reinvite_answer(call)
    # the re-INVITE went to the home (its socket got it), under its Route by name
    assert reinvite.get_all("Route")[0].startswith("<sip:localhost:")
    assert not acked, "alice took a re-INVITE answer the home never saw"
    assert counts.get("responses_not_via_proxy", 0) >= 1
