"""Review 109 (an attacker's review of e180fd3), phone half of hole K1: the registrar-only
phone's send-time home rule as stop 38 left it (``tx_destination``).  A real
``e2m-phone listen`` (pjsua2); the home is review 92's ``Bob`` socket plus a second UDP
socket on the same address (``TwoSocketHome``), bob's phone a UDP socket on 127.0.0.2
(review 108's ``Call``, reused).  The proxy's half (it relays and routes what this
needs) is ``tests/kamailio/test_review109_wire.py``.

Hole K1 (``test_hole_k1_a_route_to_the_homes_other_port_lets_the_callee_answer_the_reinvite_straight``):
**insider UA**, the callee (bob, his own certificate), against a phone with only a
registrar over UDP.

- Set-up: alice's phone, ``registrar = "sip:127.0.0.1:<home port>"``, UDP, no outbound
  proxy, registered; she calls bob through the home.  bob's 200 carries one
  Record-Route entry, the home's, but naming the home's *other* UDP port:
  ``<sip:127.0.0.1:<second port>;lr;e2m-rr=..>`` (bob wrote it so; the wire half shows
  the real proxy relays such a 200 when the port is one of its own sockets: a second
  UDP listener, or in a cluster every node's DMQ socket).
- Messages: her ACK and, on ``hold``, her re-INVITE go to the home's second socket
  (seen there, Route ``<sip:127.0.0.1:<second>;lr;..>``); bob answers the re-INVITE with
  his sealed 200 (SDP) from 127.0.0.2 straight to alice's Via address.
- Effect (seen on e180fd3): alice takes it: her ACK for the re-INVITE's CSeq reaches
  the home's second socket, ``responses_not_via_proxy`` 0, no ``response_dropped``.
  The home relayed the re-INVITE but never saw its answer (its archive row, its media
  rule), as in reviews 106 and 108.  This is a regression of stop 38's fix: review
  108's header rule (``ProxySource.names``) took any port of a home host as home; the
  destination rule compares address *and* port over UDP.
- At fault: ``pjsua_hooks/phone.py:787`` (``_note_sent``: ``home = destination is None
  or self._home_source.matches(destination)``) with ``pjsua_hooks/proxysource.py:93``
  (``matches`` over UDP: the (address, port) must be one the config named: the
  registrar's port only).  Also the proxy's ``moved_route_entries``
  (``kamailio_app/kemi.py:1244``): ``KSR.is_myself`` takes any of our sockets, so the
  callee may move our entry to another of them (the token binds neither host nor port).
- Fix: on the send side, a request whose destination is any address of the home counts
  as going home whatever the port (the port matters only for what is *received* over
  UDP); and/or the proxy drops a 2xx whose entry of ours names another socket than the
  one it wrote (compare with ``$Rn``/the socket the request came in on, or put the
  entry's host:port under the token's MAC).

Control (passes unmarked):
``test_control_k1_the_homes_registrar_port_holds_the_reinvite_answer_to_the_home``: the
same call and the same straight 200, the home's entry naming the registrar's port: no
ACK for it, ``responses_not_via_proxy`` 1 (the rule is live; only the port differs).

Tried and held (read unless said run): the initial INVITE and its ACK to the
registrar's port (run: the control); a retransmission leaves the hook by the
emitted-bytes shortcut without ``_note_sent``, but keeps its branch, so the first
note stands; a CANCEL shares the INVITE's branch and destination (same note); a
destination the hook cannot read counts as home (fail safe); a TCP/TLS phone's
``ProxySource`` compares the address only (``udp=False``), so K1 needs a UDP phone; a
route to the home's TLS-only port is unreachable for a UDP phone (pjsip has no TLS
transport there: the re-INVITE fails, no bypass).

Fixed (stop 38): the phone counts any port of a home address as home when it notes
where a request went (``ProxySource.holds_address``; the port still matters for what
is received over UDP), and the proxy drops a reply whose entry of ours names another
of its sockets (``tests/kamailio/test_review109_wire.py``).  The hole test failed on
the code before (checked) and passes.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SDP_ANSWER
from e2m_lab.stranger import HOST
from e2m_plugins import sip
from e2m_plugins.sip import make_response
from tests.pjsua.test_review108_phone import BOB_HOST, Call, pki  # noqa: F401 (fixture)

pytestmark = [pytest.mark.pjsua2, pytest.mark.kamailio]


class TwoSocketHome:
    """The home's second UDP socket on the same address (another listen port of the
    proxy: a second UDP listener, a cluster node's DMQ socket)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.source: tuple | None = None

    def receive(self, want, timeout: float = 8.0) -> sip.SipMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, source = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                break
            try:
                msg = sip.parse(data)
            except Exception:  # noqa: BLE001
                continue
            if want(msg):
                self.source = source
                return msg
        raise AssertionError("nothing of the kind on the home's second socket")

    def close(self) -> None:
        self.sock.close()


class OtherSocketCall(Call):
    """review 108's call, the home's Record-Route entry naming its second socket."""

    def __init__(self, tmp_path: Path, pki, second: bool) -> None:
        self.second = TwoSocketHome()
        entry = f"<sip:{HOST}:{self.second.port};lr;e2m-rr=00>" if second \
            else "<sip:" + HOST + ":{port};lr;e2m-rr=00>"
        super().__init__(tmp_path, pki, entry)
        self.target = self.second if second else self.home

    def up(self) -> sip.SipMessage:
        """review 108's ``Call.up``, alice's ACK taken where her route set sends it."""
        home, alice = self.home, self.alice
        alice.wait("started", timeout=15)
        register = home.receive(lambda m: m.is_request and m.method == "REGISTER")
        ok = make_response(register, 200, "OK",
                           [("Contact", f"{register.get('Contact')};expires=3600")], b"", None)
        home.send(ok.replace("To", f"{register.get('To')};tag=reg109"))
        alice.wait("registered", timeout=8)
        mark = alice.mark()
        alice.send(f"call sip:bob@{HOST}:{home.port}")
        invite = home.receive(lambda m: m.is_request and m.method == "INVITE")
        delivered = home.engine.open(invite).message
        ok = make_response(delivered, 200, "OK",
                           [("Record-Route", self.route_entry),
                            ("Contact", f"<sip:bob@{BOB_HOST}:{self.bob_port}>")],
                           SDP_ANSWER, "application/sdp")
        ok = ok.replace("To", f"{delivered.get('To')};tag=r109")
        home.send(home.engine.protect(ok).message)
        alice.wait("call_state", where=lambda e: str(e.get("state", "")).upper()
                   .endswith("CONFIRMED"), since=mark, timeout=8)
        ack = self.target.receive(lambda m: m.is_request and m.method == "ACK")
        home.engine.open(ack)
        return invite

    def reinvite(self) -> sip.SipMessage:
        self.alice.send("hold")
        return self.target.receive(lambda m: m.is_request and m.method == "INVITE"
                                   and m.to_tag is not None)

    def straight_answer(self, reinvite: sip.SipMessage) -> None:
        delivered = self.home.engine.open(reinvite).message
        ok = make_response(delivered, 200, "OK",
                           [("Contact", f"<sip:bob@{BOB_HOST}:{self.bob_port}>")],
                           SDP_ANSWER, "application/sdp")
        wire = self.home.engine.protect(ok).message.serialize()
        assert self.target.source is not None
        self.bob.sendto(wire, self.target.source)

    def acked(self, cseq: int, timeout: float = 4.0) -> bool:
        try:
            self.target.receive(lambda m: m.is_request and m.method == "ACK"
                                and m.cseq[0] == cseq, timeout=timeout)
        except AssertionError:
            return False
        return True

    def close(self) -> None:
        super().close()
        self.second.close()


@pytest.fixture
def call_factory(tmp_path: Path, pki) -> Iterator:
    made: list[OtherSocketCall] = []

    def make(second: bool) -> OtherSocketCall:
        directory = tmp_path / str(len(made))
        directory.mkdir()
        call = OtherSocketCall(directory, pki, second)
        made.append(call)
        return call

    yield make
    for call in made:
        call.close()


def _run(call):
    call.up()
    reinvite = call.reinvite()
    call.straight_answer(reinvite)
    acked = call.acked(reinvite.cseq[0])
    counts = call.alice.status()["counts"]
    print("re-INVITE", reinvite.request_uri, reinvite.get_all("Route"), "acked", acked,
          "counts", counts)
    return reinvite, acked, counts


def test_hole_k1_a_route_to_the_homes_other_port_lets_the_callee_answer_the_reinvite_straight(
        call_factory):
    call = call_factory(True)
    reinvite, acked, counts = _run(call)
    # the re-INVITE went to the home: its other socket got it, under the home's entry
    assert reinvite.get_all("Route")[0].startswith(f"<sip:{HOST}:{call.second.port};lr")
    assert not acked, "alice took a re-INVITE answer the home never saw"
    assert counts.get("responses_not_via_proxy", 0) >= 1


def test_control_k1_the_homes_registrar_port_holds_the_reinvite_answer_to_the_home(
        call_factory):
    call = call_factory(False)
    reinvite, acked, counts = _run(call)
    assert reinvite.get_all("Route")[0].startswith(f"<sip:{HOST}:{call.home.port};lr")
    assert not acked
    assert counts.get("responses_not_via_proxy", 0) >= 1
