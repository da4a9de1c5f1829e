"""A seventy-ninth attacker's review (December 2026) of 753b2c5: the stream transports,
here a real ``e2m-phone`` (pjsua2) registered over TCP behind a real Kamailio 5.6.3
(``start_proxy``: E2M on, open registrar, no view rule so that alice's sealed MESSAGEs
pass it unopened).

Hole: **one LF-only request wedges a TCP phone's connection.**

- Attacker: an **off-path sender** (or any user: an **insider UA**).  It needs only bob's
  AoR: the proxy relays anyone's MESSAGE to a registered user.
- Messages: one MESSAGE to ``sip:bob@example.com`` over UDP to the proxy whose lines end
  in a bare LF (``\\n``) instead of CRLF.  Kamailio's parser and the core
  (``e2m_plugins.sip``) both take LF line ends, the sanity checks pass, and the proxy
  relays it (adding its own CRLF Via and a Content-Length) down the TCP connection the
  phone registered on.  pjsip frames a stream by looking for ``"\\n\\r\\n"``
  (``pjsip_find_msg``'s ``end_hdr``): a header block ending in ``\\n\\n`` never ends for
  it, so it keeps reading and swallows the next message the proxy sends on that
  connection as the rest of the first, which then does not parse.
- Effect: the bare-LF MESSAGE itself is never answered, and alice's signed, sealed
  MESSAGE that follows it on bob's connection never reaches bob's phone: the proxy
  answers her 408 after tm's timer, nothing is shown.  Seen on 753b2c5: the next two
  requests for bob were lost (408 each), the third and later got through (the
  swallowed octets end where pjsip's Content-Length count ends), with the phone's own
  connection (default ``tcp_accept``) and with a connection the proxy opened to an
  accepting phone alike.  Any request for bob can be the one lost (an INVITE, a
  re-INVITE or BYE of a live call); one datagram from anyone does it, so a sender
  repeating it keeps bob's TCP phone losing requests; no log line says why.
- At fault: the proxy relays a message whose line ends are bare LF onto a stream
  (``kamailio_app/kemi.py`` ``route_request`` -> ``route_sanity``: nothing refuses bare
  LF, and ``e2m_plugins/sip.py`` ``_parse_head`` accepts it), while the next hop's stack
  frames streams by CRLF CRLF only.
- Fix: refuse (400) a request or drop a reply whose header lines do not all end in CRLF
  (RFC 3261 §7: CRLF is the line end) before relaying it, at least when the next hop
  is a stream: one check in ``route_sanity``/``read_reply`` (a ``$mb`` scan or
  ``exact`` parse that rejects bare LF), and the same in the phone's raw hook for what
  it receives.

The control sends the same two MESSAGEs, the first with CRLF line ends: both reach
bob's phone and are answered.  A second control shows the LF-only message relayed
whole over UDP is read by a UDP peer (so it is well formed enough for the proxy).

Fixed (stop 33): ``sip.parse(exact=True)`` refuses a head line that does not end in
CRLF; ``kemi.route_sanity`` answers such a request 400 before anything reads it and the
core reply route drops such a reply (``kemi._bare_line_ends``, the head only: a body may
hold any octets).  The holes turned XPASS and the markers are gone; controls that took
LF-only lines as read alike now assert the refusal (they said what the proxy did, not
what it should do).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import ua_engine
from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.pjsua2, pytest.mark.kamailio]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review79-pki"), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture
def proxy(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    handle = start_proxy(tmp_path_factory.mktemp("review79-home"), pki=pki, e2m=True, view=())
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def tcp_bob(tmp_path: Path, pki: TestPKI, proxy: ProxyHandle) -> Iterator[PhoneProcess]:
    """bob's phone, registered at the proxy over TCP with the default ``tcp_accept``
    (false with a registrar): the proxy reaches it on the connection it registered on,
    the one connection every request for bob shares."""
    assert pki.directory is not None
    directory = tmp_path / "bob"
    directory.mkdir()
    config = write_ua(directory, "bob", pki.directory, peer="alice",
                      phone={"registrar": proxy.uri + ";transport=tcp",
                             "proxy": proxy.uri + ";transport=tcp",
                             "register_via_proxy": False, "srtp": True, "transport": "tcp"},
                      e2m={"cert_url_hosts": ["127.0.0.1"]})
    phone = PhoneProcess(config, "bob")
    try:
        phone.wait("registered", timeout=15)
        yield phone
    finally:
        phone.stop()


class Sender:
    """A UDP socket that sends requests to the proxy and collects its answers."""

    def __init__(self, proxy: ProxyHandle) -> None:
        self.proxy = proxy
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, ("127.0.0.1", self.proxy.port))

    def final_answer(self, call_id: str, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65535)
            except (socket.timeout, TimeoutError):
                return None
            if call_id.encode() in data and data[8:9] in b"23456" and data.startswith(b"SIP/2.0"):
                return data
        return None

    def close(self) -> None:
        self.sock.close()


def _first(sender: Sender, *, bare_lf: bool | str) -> tuple[bytes, str]:
    """A plain MESSAGE to bob, its line ends bare LF (``"last"``: only the last header
    line's and the blank line's) or CRLF."""
    call_id = "r79-first-%d-%d@127.0.0.1" % (os.getpid(), time.monotonic_ns())
    plain = sip.make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:mallory@example.com",
                             to_uri="sip:bob@example.com", call_id=call_id,
                             via_host="127.0.0.1:%d" % sender.port,
                             body=b"knock knock", content_type="text/plain")
    wire = plain.serialize()
    if bare_lf:
        head, _, body = wire.partition(b"\r\n\r\n")
        if bare_lf != "last":
            head = head.replace(b"\r\n", b"\n")
        wire = head + b"\n\n" + body
    return wire, call_id


def _alices(pki: TestPKI, sender: Sender, text: bytes) -> tuple[bytes, str]:
    """alice's signed MESSAGE, sealed for bob, as her phone would send it."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    plain = sip.make_request("MESSAGE", "sip:bob@example.com", from_uri=pki.aor("alice"),
                             to_uri=pki.aor("bob"), via_host="127.0.0.1:%d" % sender.port,
                             body=text, content_type="text/plain")
    return alice.protect(plain).message.serialize(), plain.call_id


def _run(pki: TestPKI, proxy: ProxyHandle, bob: PhoneProcess,
         make_first: Callable[[Sender], tuple[bytes, str]]
         ) -> tuple[bytes | None, bytes | None, list[str]]:
    """``make_first(sender)``'s message to bob, then alice's signed one; the answers to
    both and what bob's phone showed (review 80 sends its own first message)."""
    sender = Sender(proxy)
    try:
        mark = bob.mark()
        first, first_id = make_first(sender)
        sender.send(first)
        first_answer = sender.final_answer(first_id, timeout=2.0)
        text = b"meet at noon %d" % time.monotonic_ns()
        second, second_id = _alices(pki, sender, text)
        sender.send(second)
        second_answer = sender.final_answer(second_id, timeout=6.0)
        time.sleep(0.3)
        shown = [e.get("text", "") for e in bob.of("message_in", since=mark)]
        return first_answer, second_answer, shown
    finally:
        sender.close()


def test_control_crlf_messages_reach_a_tcp_phone(pki, proxy, tcp_bob):
    first, second, shown = _run(pki, proxy, tcp_bob, lambda s: _first(s, bare_lf=False))
    assert first is not None                     # the phone answered the plain one (refused)
    assert second is not None and second.startswith(b"SIP/2.0 200"), second
    assert any(t.startswith("meet at noon") for t in shown), shown


def test_the_bare_lf_message_is_refused_over_udp_too(pki, proxy):
    """Fixed (stop 33): the proxy answers the attack's message 400 whatever the next
    hop's transport, and relays nothing: a UDP peer registered as dave gets nothing.
    (Before the fix this was the control "relayed and read over UDP".)"""
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    sender = Sender(proxy)
    try:
        reg = sip.make_request("REGISTER", "sip:example.com", from_uri="sip:dave@example.com",
                               to_uri="sip:dave@example.com", via_host="127.0.0.1:%d" % sender.port,
                               extra_headers=[("Contact", "<sip:dave@127.0.0.1:%d>"
                                               % peer.getsockname()[1]), ("Expires", "60")])
        sender.send(reg.serialize())
        assert sender.final_answer(reg.call_id, 3.0) is not None
        wire, call_id = _first(sender, bare_lf=True)
        sender.send(wire.replace(b"sip:bob@", b"sip:dave@"))
        answer = sender.final_answer(call_id, 3.0)
        assert answer is not None and answer.startswith(b"SIP/2.0 400"), answer
        peer.settimeout(1.0)
        with pytest.raises(socket.timeout):
            peer.recv(65535)
        crlf, crlf_id = _first(sender, bare_lf=False)        # the same, CRLF: relayed
        sender.send(crlf.replace(b"sip:bob@", b"sip:dave@"))
        peer.settimeout(3)
        assert crlf_id.encode() in peer.recv(65535)
    finally:
        peer.close()
        sender.close()


@pytest.mark.parametrize("bare_lf", [True, "last"], ids=["every-line", "last-lines-only"])
def test_hole_one_bare_lf_message_wedges_a_tcp_phones_connection(pki, proxy, tcp_bob,
                                                                  bare_lf):
    first, second, shown = _run(pki, proxy, tcp_bob, lambda s: _first(s, bare_lf=bare_lf))
    assert second is not None and second.startswith(b"SIP/2.0 200"), \
        "alice's MESSAGE after the bare-LF one was never answered"
    assert any(t.startswith("meet at noon") for t in shown), shown
