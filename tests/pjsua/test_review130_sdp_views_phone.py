"""Review 130 (attacker's review of 4129b80): where the home proxy's view of an SDP and
bob's real phone (pjsua2 / pjmedia 2.15.1) read the same offer differently, after review
128 K1 (two ``c=`` lines, now refused).

Set-up (every test): bob's real ``e2m-phone listen`` (SRTP, E2M required, answers by
itself; review 126's ``answering_phone`` and ``_call``).  alice is an **insider UA**: her
own ``UAEngine`` protects her INVITE exactly as her phone does (signed, sealed for bob,
bound to the message) with the home proxy ``proxy.example.com`` as a reader of
``INVITE:application/sdp``.  That very message is handed to the proxy's ``ProxyEngine``
(``inspect``: the verdict's ``media`` is what ``kamailio_app`` archives through
``bootstrap.media_records`` and logs through ``bootstrap.media_log_lines``, the line the
README calls "what a firewall would open"), then sent from a plain UDP socket to bob's
phone.  UDP sockets on loopback addresses (127.0.0.1, .9, .11) count the datagrams bob's
phone sends to each place, so "where media goes" is what the phone did, not a reading
of pjmedia's source.  The Kamailio process itself was not run: the rows are made by the
app's own ``media_records`` from the engine's verdict, which is what the running proxy
does.  The SDP is ``flows.SRTP_OFFER`` (session ``c=IN IP4 127.0.0.1``, ``m=audio P
RTP/SAVP 0 8``) with a fresh even port P.  All figures: one run each of the final
module, and the same in an earlier exploratory run.

Hole K1: ``a=RTCP`` in any case is read by the view, pjmedia reads only ``a=rtcp``
------------------------------------------------------------------------------------

- Attacker: insider UA (alice) hiding where her call's RTCP goes.
- Message: media section ends ``a=RTCP:P+1`` then ``a=rtcp:P+3 IN IP4 127.0.0.9``.
- Observed: the proxy forwards; its media row is ``address 127.0.0.1, port P,
  rtcp_port P+1`` (looks like the default pair); bob answers 200 and sends RTCP to
  ``127.0.0.9:P+3`` (2 datagrams in the wait), 0 to ``127.0.0.1:P+1``.
- Code at fault: ``e2m_plugins/sdp.py:349`` (``_media_line``: the first attribute whose
  name ``.lower()`` is ``rtcp``); pjmedia (``stream_info.c:539``,
  ``pjmedia_sdp_attr_find2`` -> ``sdp.c:156`` ``pj_strcmp``) takes the first attribute
  named exactly ``rtcp``.  SDP attribute names are case-sensitive (RFC 8866 §5.13).
- Test: ``test_hole_k1_upper_case_rtcp_attribute_rtcp_goes_elsewhere``.
- Fix: compare attribute names as the peer's stack does (exactly), or refuse an SDP with
  an attribute whose name differs from a known one only in case, or with more than one
  ``rtcp`` attribute in a section.

Hole K2: ``a=rtcp``'s address is summarised but neither archived nor logged
----------------------------------------------------------------------------

- Attacker: insider UA, same aim, with a fully ordinary SDP.
- Message: media section ends ``a=rtcp:P+3 IN IP4 127.0.0.9`` (RFC 3605, lower case).
- Observed: ``media_summary`` is right (``rtcp_address 127.0.0.9, rtcp_port P+3``), but
  the media row is ``address 127.0.0.1 ... rtcp_port P+3`` (no RTCP address column) and
  the log line ``e2m media: INVITE request audio 127.0.0.1:P RTP/SAVP sendrecv`` (no
  RTCP at all); bob sends RTCP to ``127.0.0.9:P+3`` (2 datagrams).  Reading the archive,
  the RTCP went to 127.0.0.1.
- Code at fault: ``kamailio_app/bootstrap.py:125-133`` (``media_records`` drops
  ``line.rtcp_address``), ``kamailio_app/archive_schema.py:59`` (no column for it),
  ``bootstrap.py:136`` (the log line).
- Test: ``test_hole_k2_rtcp_address_is_not_archived``.
- Fix: archive and log ``rtcp_address`` (a column; the line as "rtcp a:p"), or refuse an
  ``a=rtcp`` address other than the section's connection address.

Hole K3: ``a=INACTIVE`` archived as inactive, pjmedia ignores it and media flows
--------------------------------------------------------------------------------

- Attacker: insider UA hiding that a call carried media ("it never connected").
- Message: ``a=INACTIVE`` in the media section, or at the session level.
- Observed: row ``flow inactive``, log line ``... RTP/SAVP inactive``; bob answers 200,
  ``call_media`` active with ``remote_rtp 127.0.0.1:P``, and 31 RTP datagrams reach
  ``127.0.0.1:P`` in 5 s (both levels), as for a plain sendrecv offer (31).
- Code at fault: ``e2m_plugins/sdp.py:338`` (``_direction`` lower-cases) and ``:377``
  (session level); pjmedia (``sdp_neg.c:698-723``, ``sdp.c:1363`` for the session
  level) finds ``inactive``/``sendonly``/``recvonly`` by exact name.
- Test: ``test_hole_k3_upper_case_inactive_media_flows[media|session]``.
- Fix: exact-case direction names (an upper-case one is then no direction, as for
  pjmedia), or refuse a direction attribute in the wrong case.

Hole K4: several direction attributes: the view takes the first, pjmedia by precedence
------------------------------------------------------------------------------------

- Attacker: insider UA misstating which way media went.
- Message: ``a=recvonly`` then ``a=sendonly`` in the media section.
- Observed: row ``flow recvonly`` (alice only receives: bob would send); bob answers
  200, his call has no active media (``remote_rtp`` empty) and 0 RTP reach
  ``127.0.0.1:P``: pjmedia read ``sendonly`` (alice sends, bob only receives).
- Code at fault: ``e2m_plugins/sdp.py:338`` (``next(...)``: the first); pjmedia
  ``sdp_neg.c:698-723``: ``inactive``, else ``sendonly``, else ``recvonly``, whatever the
  order.
- Test: ``test_hole_k4_two_direction_attributes_flow_reversed``.
- Fix: refuse more than one direction attribute per level (RFC 3264 §5.1: at most one).

Hole K5: ``c=`` addresses in ``inet_aton`` forms are archived verbatim
----------------------------------------------------------------------

- Attacker: insider UA making the archive (and a firewall fed from the log line) name
  another address, or none, than the one media goes to.
- Message: session ``c=IN IP4 127.0.0.011`` (octal last byte), ``c=IN IP4 2130706441``
  (one number), ``c=IN IP4 0x7f.0.0.9`` (hex), ``c=IN IP4 127.0.0.9<TAB>x``.
- Observed (each): the row's address is the text as written (``127.0.0.011`` reads as
  127.0.0.11 to anyone reading dotted decimal; Python's ``ipaddress`` refuses all four);
  bob answers 200, ``remote_rtp 127.0.0.9:P``, 10 RTP datagrams at ``127.0.0.9:P``, 0 at
  ``127.0.0.11:P`` and ``127.0.0.1:P``.  pjmedia's address is ``pj_sockaddr_init`` ->
  ``pj_inet_aton`` (glibc ``inet_aton``: octal, hex, 1-3 part forms) with a
  ``getaddrinfo`` fallback (so a DNS name would also be resolved by the phone at call
  time, the archive keeping only the name: not run), and ends at a tab
  (``sdp.c:1155``, ``"/ \t\r\n"``).
- Code at fault: ``e2m_plugins/sdp.py:41`` (``_CONNECTION``: any non-space text) and
  ``:296-300`` (``_connection`` keeps it as written).
- Test: ``test_hole_k5_connection_address_forms[...]`` (4 cases).
- Fix: for ``IN IP4``/``IN IP6`` accept only a canonical dotted quad / RFC 4291 text
  (``ipaddress.ip_address`` and ``str(ip) == text``), refuse anything else (or a name)
  in a viewed SDP; the same for ``a=rtcp``'s address.

Controls (unmarked, pass)
-------------------------

- ``test_control_k1_k2_pjsua_style_rtcp_port_archived_and_used``: ``a=rtcp:P+3`` (port
  only, lower case, as pjsua writes it): row ``127.0.0.1 ... rtcp_port P+3`` and the
  phone's RTCP at ``127.0.0.1:P+3`` (none at P+1).
- ``test_control_k3_k4_one_lower_case_direction_as_archived[...]``: none, ``sendrecv``,
  ``recvonly`` -> row says bob may send and he sends (31 RTP); ``inactive``, ``sendonly``
  -> row says he may not, and 0 RTP.
- ``test_control_k5_dotted_quad_archived_and_used``: ``c=IN IP4 127.0.0.9``: row
  ``127.0.0.9``, RTP there, none at 127.0.0.1.

Tried and held
--------------

- Two ``a=rtcp`` (both lower case): both sides take the first (``sdp.py:349`` and
  ``pjmedia_sdp_attr_find``), agree.  ``a=rtcp :N`` (space before the colon): the view
  reads N; pjmedia's value is ``" :N"``, which ``pjmedia_sdp_attr_get_rtcp`` refuses, so
  RTCP goes to P+1: read only, not run (a mismatch of the K1 kind, port only).
- ``m=`` port: the view takes 1-5 digits and refuses > 65535 and a port count of 0;
  pjmedia's token + ``pj_strtoul3`` give the same number for every such form; a
  leading ``+``, a tab or a non-digit are refused by the view.  A tab inside the format
  list (``RTP/SAVP 8<TAB>0``): the view lists 8 and 0, pjmedia 8 only; bob's phone
  answered 488 (no PCMA): no call, nothing to hide (the reverse order would make the
  archive list one codec too many; not run).
- Upper-case type letters (``C=``), a leading or whitespace-only line, a bare CR or a
  NUL inside a line: refused by ``parse_lines`` (``_LINE`` is ``[a-z]=``; ``_text``).
  A blank line mid-SDP: the view keeps reading, pjmedia refuses the whole SDP (the call
  fails: no media to hide).  ``c= IN ...``/double spaces: refused by ``_CONNECTION``.
- ICE candidates: bob's phone has ICE off, so ``a=candidate`` lines are ignored by it
  as by the view (not run with ICE on).
- Static payload types: pjmedia takes PT < 96 by number, ignoring an ``a=rtpmap:0
  PCMA/8000`` that the view archives as PCMA (read only; a codec column, not where
  media goes).
- Dual-stack ``[::]`` listener (second target): ``trusted_peer`` now unmaps
  ``::ffff:a.b.c.d`` before ``allow_address``, ``exempt_address`` unmaps before the
  network test; Linux drops IPv6 packets whose source is IPv4-mapped, so a stranger
  cannot present a mapped trusted address.  Read only, not run (see the report's
  untried list).

Fixed (stop 42), K1-K5: ``sdp.media_summary`` refuses (``MalformedError``, 400 at a
viewing proxy) an SDP whose media a stack could read otherwise: a viewed attribute
(``rtcp`` and the four directions) spelled in another case or with white space, two
direction attributes or two ``a=rtcp`` at one level, and a ``c=`` or ``a=rtcp``
address that is not a plain IP literal of its type (IPv4 as four decimal numbers
without leading zeros, IPv6 without a zone; no names).  An ``a=rtcp`` address is now
archived (schema 5, ``media.rtcp_address``) and named in the ``e2m media:`` line.  On
the code before the fix all nine hole tests failed; now they pass.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER, TRUSTED, known_proxy, proxy_engine, ua_engine
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import UdpStranger
from e2m_plugins.testpki import TestPKI, init_test_pki
from kamailio_app.bootstrap import media_log_lines, media_records
from tests.pjsua.test_review126_inner_multipart_phone import _alices_invite, _call

pytestmark = [pytest.mark.pjsua2]

SDP_VIEW = ("INVITE:application/sdp",)
HOST = "127.0.0.1"       # the offer's c= (session level): where the archive says media goes
HIDDEN = "127.0.0.9"     # where alice wants bob's phone to send, unnamed by the archive
WAIT = 12.0              # how long to collect packets (not asserted on)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review130-pki"), proxy_hosts=(TRUSTED,),
                         users=("alice", "bob", "carol"), key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


class Sink:
    """UDP sockets on loopback counting the datagrams bob's phone sends to each."""

    def __init__(self, *addresses: tuple[str, int]) -> None:
        self.socks: dict[tuple[str, int], socket.socket] = {}
        self.counts = dict.fromkeys(addresses, 0)
        for address in addresses:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(address)
            s.setblocking(False)
            self.socks[address] = s

    def _drain(self) -> None:
        for address, s in self.socks.items():
            while True:
                try:
                    s.recvfrom(4096)
                except BlockingIOError:
                    break
                self.counts[address] += 1

    def collect(self, want: tuple[str, int] | None = None, timeout: float = WAIT) -> dict:
        """Counts after ``timeout`` or, with ``want``, as soon as something reached it."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not (want and self.counts[want]):
            self._drain()
            time.sleep(0.1)
        self._drain()
        return dict(self.counts)

    def close(self) -> None:
        for s in self.socks.values():
            s.close()


def _even_port() -> int:
    """A free even UDP port on every loopback address used here (and the next ones)."""
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST, 0))
        port = s.getsockname()[1]
        s.close()
        if port % 2 == 0 and port < 65000:
            return port


def _sdp(rtp: int, media_attrs: str = "", session_attrs: str = "") -> bytes:
    sdp = SRTP_OFFER.replace(b"49170", str(rtp).encode())
    if session_attrs:
        sdp = sdp.replace(b"t=0 0\r\n", b"t=0 0\r\n" + session_attrs.encode())
    return sdp + media_attrs.encode()


def _offer(pki: TestPKI, bob: PhoneProcess, sdp: bytes):
    """alice's INVITE with ``sdp``, protected by her engine for bob with the home proxy as
    an SDP reader; the proxy engine's verdict on that very message, then the message
    sent to bob's phone.  -> (verdict, bob's answer, remote_rtp of his media events)"""
    peer = UdpStranger(bob.port)
    try:
        plain = _alices_invite(pki, bob, peer).with_body(sdp)
        alice = ua_engine(pki, "alice", peers=("bob",),
                          proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        wire = alice.protect(plain).message
        verdict = proxy_engine(pki, TRUSTED, view=SDP_VIEW).inspect(wire)
        answer, media = _call(pki, bob, peer, wire, plain)
        rows = [asdict(r) for r in media_records(wire, verdict.media)]
        print("verdict", verdict.action, verdict.code, verdict.error)
        print("rows", rows)
        print("log", media_log_lines(wire, verdict.media))
        print("answer", answer[:40] if answer else answer, "media", media)
        return verdict, rows, answer, media
    finally:
        peer.close()


def _answered(answer: bytes | None) -> bool:
    return answer is not None and answer.startswith(b"SIP/2.0 200")


# -- K1: a=RTCP (any case) read by the view, only a=rtcp by pjmedia ----------------------

def test_hole_k1_upper_case_rtcp_attribute_rtcp_goes_elsewhere(pki, bob):
    rtp = _even_port()
    decoy, hidden = (HOST, rtp + 1), (HIDDEN, rtp + 3)
    sdp = _sdp(rtp, f"a=RTCP:{rtp + 1}\r\na=rtcp:{rtp + 3} IN IP4 {HIDDEN}\r\n")
    sink = Sink((HOST, rtp), decoy, hidden)
    try:
        verdict, rows, answer, _ = _offer(pki, bob, sdp)
        counts = sink.collect(hidden)
    finally:
        sink.close()
    print(counts)
    assert _answered(answer), answer
    assert counts[hidden] > 0 and counts[decoy] == 0, counts      # the phone: RTCP to HIDDEN
    # secure: refused at the proxy, or the view names where the RTCP goes
    named = {(m.rtcp_address, m.rtcp_port) for m in verdict.media}
    assert verdict.action == "reply" or hidden in named, (verdict.action, named)


# -- K2: the rtcp address is in the summary, not in the archive row or log line ---------

def test_hole_k2_rtcp_address_is_not_archived(pki, bob):
    rtp = _even_port()
    hidden = (HIDDEN, rtp + 3)
    sdp = _sdp(rtp, f"a=rtcp:{rtp + 3} IN IP4 {HIDDEN}\r\n")
    sink = Sink((HOST, rtp), (HOST, rtp + 1), hidden)
    try:
        verdict, rows, answer, _ = _offer(pki, bob, sdp)
        counts = sink.collect(hidden)
    finally:
        sink.close()
    print(counts)
    assert _answered(answer), answer
    assert counts[hidden] > 0, counts                                  # the phone: RTCP to HIDDEN
    assert [(m.rtcp_address, m.rtcp_port) for m in verdict.media] == [hidden]  # summary: right
    # secure: the archived row says where the RTCP goes (or the offer is refused)
    assert verdict.action == "reply" or any(HIDDEN in str(v) for row in rows
                                            for v in row.values()), rows


def test_control_k1_k2_pjsua_style_rtcp_port_archived_and_used(pki, bob):
    """The a=rtcp pjsua itself writes (port only, lower case): the row's rtcp_port is
    where the phone's RTCP arrives, at the c= address."""
    rtp = _even_port()
    rtcp = (HOST, rtp + 3)
    sink = Sink((HOST, rtp), (HOST, rtp + 1), rtcp)
    try:
        verdict, rows, answer, _ = _offer(pki, bob, _sdp(rtp, f"a=rtcp:{rtp + 3}\r\n"))
        counts = sink.collect(rtcp)
    finally:
        sink.close()
    print(counts)
    assert _answered(answer), answer
    assert verdict.action == "forward"
    assert [(r["address"], r["rtcp_port"]) for r in rows] == [rtcp]
    assert counts[rtcp] > 0 and counts[(HOST, rtp + 1)] == 0, counts


# -- K3/K4: the direction the archive records is not the phone's -------------------------

def _bob_sends(pki, bob, sdp, rtp):
    sink = Sink((HOST, rtp), (HOST, rtp + 1))
    try:
        verdict, rows, answer, media = _offer(pki, bob, sdp)
        counts = sink.collect(timeout=5.0)   # bob's RTP (20 ms frames) when he sends at all
    finally:
        sink.close()
    print(counts)
    return verdict, rows, answer, counts[(HOST, rtp)]


# the offerer's view: does the offer let bob send to alice?
BOB_MAY_SEND = {"sendrecv": True, "recvonly": True, "sendonly": False, "inactive": False}


@pytest.mark.parametrize("level", ["media", "session"])
def test_hole_k3_upper_case_inactive_media_flows(pki, bob, level):
    rtp = _even_port()
    attrs = {"media": ("a=INACTIVE\r\n", ""), "session": ("", "a=INACTIVE\r\n")}[level]
    verdict, rows, answer, sent = _bob_sends(pki, bob, _sdp(rtp, *attrs), rtp)
    assert _answered(answer), answer
    assert sent > 0                                                  # the phone sends RTP
    assert verdict.action == "reply" or all(BOB_MAY_SEND[r["flow"]] for r in rows), rows


def test_hole_k4_two_direction_attributes_flow_reversed(pki, bob):
    rtp = _even_port()
    verdict, rows, answer, sent = _bob_sends(pki, bob, _sdp(rtp, "a=recvonly\r\na=sendonly\r\n"),
                                             rtp)
    assert _answered(answer), answer
    assert sent == 0                                          # the phone: bob sends nothing
    assert verdict.action == "reply" or all(not BOB_MAY_SEND[r["flow"]] for r in rows), rows


@pytest.mark.parametrize("attr, may_send", [("", True), ("a=sendrecv\r\n", True),
                                            ("a=recvonly\r\n", True), ("a=inactive\r\n", False),
                                            ("a=sendonly\r\n", False)])
def test_control_k3_k4_one_lower_case_direction_as_archived(pki, bob, attr, may_send):
    rtp = _even_port()
    verdict, rows, answer, sent = _bob_sends(pki, bob, _sdp(rtp, attr), rtp)
    assert _answered(answer), answer
    assert [BOB_MAY_SEND[r["flow"]] for r in rows] == [may_send], rows
    assert (sent > 0) == may_send, sent


# -- K5: c= addresses that are not dotted quads ------------------------------------------

@pytest.mark.parametrize("written", ["127.0.0.011", "2130706441", "0x7f.0.0.9", "127.0.0.9\tx"])
def test_hole_k5_connection_address_forms(pki, bob, written):
    rtp = _even_port()
    hidden, decimal = (HIDDEN, rtp), ("127.0.0.11", rtp)
    sdp = _sdp(rtp).replace(b"c=IN IP4 127.0.0.1", f"c=IN IP4 {written}".encode())
    sink = Sink(hidden, decimal, (HOST, rtp))
    try:
        verdict, rows, answer, media = _offer(pki, bob, sdp)
        counts = sink.collect(hidden)
    finally:
        sink.close()
    print(counts)
    assert _answered(answer), answer
    assert media == [f"{HIDDEN}:{rtp}"] and counts[hidden] > 0 and counts[decimal] == 0, counts
    # secure: refused, or the archive names the address the phone sends to
    assert verdict.action == "reply" or [r["address"] for r in rows] == [HIDDEN], rows


def test_control_k5_dotted_quad_archived_and_used(pki, bob):
    rtp = _even_port()
    hidden = (HIDDEN, rtp)
    sdp = _sdp(rtp).replace(b"c=IN IP4 127.0.0.1", f"c=IN IP4 {HIDDEN}".encode())
    sink = Sink(hidden, (HOST, rtp))
    try:
        verdict, rows, answer, media = _offer(pki, bob, sdp)
        counts = sink.collect(hidden)
    finally:
        sink.close()
    assert _answered(answer), answer
    assert [r["address"] for r in rows] == [HIDDEN], rows
    assert media == [f"{HIDDEN}:{rtp}"] and counts[hidden] > 0 and counts[(HOST, rtp)] == 0
