"""Review 108 (phone half): the registrar-only phone's send-time home rule.

(The full account of this review is in this docstring; the archive half, if any, is in
``tests/cluster/test_review108_*``.)

Hole 1 placeholder.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SDP_ANSWER
from e2m_lab.phones import PhoneProcess
from e2m_lab.stranger import HOST
from e2m_lab.tomlfile import toml_value
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
    value = toml_value
    lines = ["[identity]", f'aor = "sip:alice@{HOST}"',
             f"cert = {value(pki_dir / 'alice.crt')}", f"key = {value(pki_dir / 'alice.key')}",
             "[trust]", f"ca = [{value(pki_dir / 'ca.crt')}]",
             "[peers]", f'"sip:bob@{HOST}" = {value(pki_dir / "bob.crt")}',
             "[phone]"] + [f"{k} = {value(v)}" for k, v in phone.items()]
    path = directory / "alice.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


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


@pytest.mark.xfail(strict=True, reason="review 108 hole 1: the home's Record-Route entry "
                   "without ;lr (strict routing) makes _note_sent read bob's Contact as the "
                   "target: bob's straight answer to alice's re-INVITE is taken")
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


@pytest.mark.xfail(strict=True, reason="review 108 hole 1: the home record-routes by a host "
                   "name (cluster advertise) while the registrar names its address: "
                   "_note_sent notes the re-INVITE as not going home and bob's straight "
                   "answer is taken")
def test_hole_a_home_route_by_name_lets_the_callee_answer_the_reinvite_straight(call_factory):
    call = call_factory("<sip:localhost:{port};lr;e2m-rr=00>")
    reinvite, acked, counts = _straight_reinvite_answer(call)
    # the re-INVITE went to the home (its socket got it), under its Route by name
    assert reinvite.get_all("Route")[0].startswith("<sip:localhost:")
    assert not acked, "alice took a re-INVITE answer the home never saw"
    assert counts.get("responses_not_via_proxy", 0) >= 1
