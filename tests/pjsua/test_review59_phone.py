"""A fifty-ninth attacker's review (December 2026) of 8360976: the softphone against a
stranger and an insider, end to end (real pjsua2).  Here on a real ``e2m-phone listen``
process (bob, SRTP, E2M required), from plain UDP sockets on loopback, no Kamailio.

Hole 1 (``test_hole_*_past_content_length_*``): the core and pjsip read a datagram's
body differently.  ``sip.parse`` takes the body by Content-Length and drops the octets
after it (RFC 3261 §18.3); pjsip 2.15.1 (the pinned wheel) takes everything after the
blank line of a datagram as the body whenever a Content-Type is present.  The phone's
``_on_rx`` hands pjsip the original bytes whenever the engine changed nothing, which it
never does for a message it reads as bodiless.  So ``Content-Length: 0`` (with a
Content-Type) and a plaintext body after the head reach pjsua as a body no check read.

- Attacker: an off-path sender (any From, here the peer alice whose certificate bob
  holds) for a MESSAGE; an untrusted hop (or anyone who read the call's Call-ID and
  tags) for a re-INVITE into a live call.
- Messages: a MESSAGE ``Content-Type: text/plain``, ``Content-Length: 0``, then
  ``smuggled hello`` in the same datagram; a re-INVITE of alice's confirmed call with
  alice's ids, ``Content-Type: application/sdp``, ``Content-Length: 0``, then a
  plaintext SRTP offer with the attacker's RTP port and ``a=crypto`` key.
- Effect (seen): the MESSAGE is answered 200 and shown (``message_in``, text
  ``smuggled hello``, From alice) where the same body with a true Content-Length is
  refused 488 (DowngradeError); the re-INVITE is answered 200 and the live call's media
  goes to the attacker's port (``call_media`` ``remote_rtp: 127.0.0.1:40404``), with the
  attacker's own SRTP key for what bob hears: bob talks to the hop, hears the hop as
  alice.  The same SDP with a true Content-Length is refused 488.
- At fault: ``pjsua_hooks/phone.py`` ``E2MPhone._on_rx`` (``return None`` when the
  engine did not change the message: pjsip re-reads the raw datagram) with
  ``e2m_plugins/sip.py`` ``parse`` (octets after Content-Length silently dropped).
  Fix: in ``_on_rx`` (UDP), refuse 400 a message whose data goes past its
  Content-Length (or always hand pjsip ``msg.serialize()``, which is never longer).

Hole 2 (``test_hole_a_compact_typed_sdp_part_*``) and hole 3
(``test_hole_an_sdp_part_the_core_takes_for_the_preamble_*``): the core and pjsip read a
``multipart/mixed`` body differently (shown over UDP; no framing is involved, so TCP
should be alike: not run).  Hole 2: a part headed
``c: application/sdp`` is text/plain to the core (no compact forms in a part's headers,
``mime.MimePart.header``), SDP to pjsip (its SIP header parser reads part headers).
Hole 3: a first delimiter in mid-line (``x--r59``) is preamble to the core
(``mime._part_spans``, RFC 2046), a delimiter to pjsip (``pjsip_multipart_parse`` takes the
first ``--boundary`` anywhere).  Attacker, messages and effect as hole 1's re-INVITE: a
hop's plaintext SDP, no E2M, moves alice's live call's media to the hop.  Unit side:
``tests/unit/test_review59.py``.

What I tried that held (run, not kept as tests): the exact bytes of alice's signed
INVITE sent again after the ACK: 482 (``FirstCopy``); the same with the request line's
method written ``invite`` (pjsip reads it as INVITE, ``FirstCopy`` and the phone's row-8
refusal compare ``"INVITE"``): no answer, no call, nothing shown; a part headed
``CONTENT-TYPE`` or with a folded Content-Type: 488 (DowngradeError); two Content-Type
headers on the message or in a part: MalformedError.  Read in the code, not run: a
Content-Length larger than the data (``sip.parse``: 400), two different Content-Lengths
(400), ``l:`` beside ``Content-Length:`` (counted together), a second From/To/Call-ID/CSeq
in compact form (``_check_unambiguous`` counts compact forms with long ones: 400); on TCP
pjsip frames by Content-Length, so hole 1 is UDP only (holes 2 and 3 are not).

Fixed (stop 31), so that the core reads a body as the laxest stack behind it would:
a datagram with octets past its Content-Length is 400 at the phone (``sip.parse``
``exact``, as Kamailio's sanity check answers it); a body part's headers take the
compact ``c``/``e`` as Content-Type/Content-Encoding (``mime._header_lines``); a
multipart whose ``--boundary`` appears anywhere but at its delimiters (mid-line, in
the preamble or epilogue, followed by other characters) is MalformedError (400).  The
same reading serves the proxy, which uses the same MIME code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST, UdpStranger, sip_request
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki
from tests.pjsua.test_review54_phone import alices_call

pytestmark = [pytest.mark.pjsua2]

HOP_RTP = "40404"
HOP_SDP = SRTP_OFFER.replace(b"49170", HOP_RTP.encode()).replace(
    b"2890844526 2890844526", b"2890844526 2890844527")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review59-pki"),
                         users=("alice", "bob", "carol"), key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _call_id(data: bytes) -> str:
    return data.split(b"\r\nCall-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()


def _plain_message(peer: UdpStranger, tag: str, *, smuggled: bool) -> bytes:
    """A plaintext MESSAGE From alice: with a true Content-Length, or (``smuggled``)
    ``Content-Length: 0`` and the same text after the head in the same datagram."""
    text = b"smuggled hello"
    if smuggled:
        return sip_request("MESSAGE", peer.target, via=peer.via,
                           from_=f"<sip:alice@example.com>;tag={tag}",
                           headers=[("Content-Type", "text/plain")], content_length=0) + text
    return sip_request("MESSAGE", peer.target, via=peer.via,
                       from_=f"<sip:alice@example.com>;tag={tag}", body=text,
                       content_type="text/plain")


def test_control_a_plaintext_message_is_refused_488(bob):
    peer = UdpStranger(bob.port)
    try:
        data = _plain_message(peer, "r59c", smuggled=False)
        mark = bob.mark()
        peer.send(data)
        assert peer.final(_call_id(data), timeout=5) == 488
        time.sleep(0.3)
        assert not bob.of("message_in", since=mark)
        # the smuggled form is well formed to the core: one bodiless MESSAGE
        msg = sip.parse(_plain_message(peer, "r59c2", smuggled=True))
        assert msg.body == b"" and msg.get("Content-Type") == "text/plain"
    finally:
        peer.close()


def test_hole_a_plaintext_message_past_content_length_is_shown(bob):
    """Attacker: off-path sender (From alice, whose certificate bob holds; any From
    works).  Message: ``MESSAGE`` with ``Content-Type: text/plain``,
    ``Content-Length: 0`` and ``smuggled hello`` after the blank line, one datagram.
    Effect (seen): 200, ``message_in`` text ``smuggled hello`` from alice, security
    "plaintext", on a phone with ``[e2m] require = true``."""
    peer = UdpStranger(bob.port)
    try:
        data = _plain_message(peer, "r59h", smuggled=True)
        mark = bob.mark()
        peer.send(data)
        status = peer.final(_call_id(data), timeout=5)
        time.sleep(0.5)
        shown = [e for e in bob.of("message_in", since=mark) if "smuggled" in e.get("text", "")]
        assert not shown and status == 400, (status, len(shown))
    finally:
        peer.close()


def _preamble_multipart(sdp: bytes, *, line_start: bool = False) -> bytes:
    """A ``multipart/mixed;boundary=r59`` whose first delimiter is not at the start of a
    line (``x--r59``): RFC 2046 and the core take what follows for the preamble, and
    the text part after the next (true) delimiter for the only part; pjsip 2.15.1
    (``pjsip_multipart_parse``) looks for the first delimiter anywhere and takes the
    SDP for a part.  ``line_start``: the same with a true first delimiter (control)."""
    first = b"--r59" if line_start else b"x--r59"
    return (first + b"\r\nContent-Type: application/sdp\r\n\r\n" + sdp
            + b"\r\n--r59\r\nContent-Type: text/plain\r\n\r\nhi\r\n--r59--\r\n")


def _hops_reinvite(pki: TestPKI, bob: PhoneProcess, invite: sip.SipMessage,
                   ok: sip.SipMessage, contact: str, hop: UdpStranger, *, smuggled: bool = False,
                   part_header: str | None = None, preamble: bool = False
                   ) -> tuple[bytes | None, list[str]]:
    """The hop's re-INVITE with alice's ids and a plaintext SRTP offer (its RTP port,
    its key): with a true Content-Length, or (``smuggled``) ``Content-Length: 0`` and
    the SDP after the head, or (``part_header``) as the one part of a
    ``multipart/mixed`` whose type is given by that part header, or (``preamble``) as a
    part the core takes for the preamble (see ``_preamble_multipart``).  ACKs a 200.  Returns the final answer and the remote RTP
    addresses bob's phone reported since."""
    cseq = 3 if smuggled else 4 if part_header == "c" else 5 if preamble else 2
    plain = sip.make_request(
        "INVITE", contact, from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
        call_id=invite.call_id, cseq=cseq, from_tag=invite.from_tag, to_tag=ok.to_tag,
        via_host=f"{HOST}:{hop.local_port}",
        extra_headers=[("Contact", f"<sip:alice@{HOST}:{hop.local_port}>"),
                       ("Content-Type", "application/sdp")])
    wire = plain.serialize()
    assert wire.count(b"Content-Length: 0\r\n") == 1
    if smuggled:
        wire += HOP_SDP
    elif part_header is not None or preamble:
        body = _preamble_multipart(HOP_SDP) if preamble else (
            b"--r59\r\n" + (part_header or "").encode() + b": application/sdp\r\n\r\n" + HOP_SDP
            + b"\r\n--r59--\r\n")
        wire = wire.replace(b"Content-Type: application/sdp",
                            b"Content-Type: multipart/mixed;boundary=r59")
        wire = wire.replace(b"Content-Length: 0", b"Content-Length: %d" % len(body)) + body
    else:
        wire = wire.replace(b"Content-Length: 0", b"Content-Length: %d" % len(HOP_SDP)) + HOP_SDP
    return reinvite_and_ack(pki, bob, invite, ok, contact, hop, cseq, wire)


def reinvite_and_ack(pki: TestPKI, bob: PhoneProcess, invite: sip.SipMessage,
                     ok: sip.SipMessage, contact: str, hop: UdpStranger, cseq: int,
                     wire: bytes) -> tuple[bytes | None, list[str]]:
    """The hop sends the re-INVITE ``wire`` of alice's call and ACKs a 200.  Returns
    the final answer and the remote RTP addresses bob's phone reported since."""
    mark = bob.mark()
    hop.send(wire)
    answer = hop.answered(invite.call_id, timeout=5)
    if answer is not None and answer.startswith(b"SIP/2.0 200"):
        ack = sip.make_request("ACK", contact, from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
                               call_id=invite.call_id, cseq=cseq, from_tag=invite.from_tag,
                               to_tag=ok.to_tag, via_host=f"{HOST}:{hop.local_port}")
        hop.send(ack.serialize())
    time.sleep(0.5)
    return answer, [event.get("remote_rtp") or "" for event in bob.of("call_media", since=mark)]


def test_control_a_plaintext_reinvite_is_refused_and_the_media_stays(pki, bob):
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop, smuggled=False)
        assert answer is not None and answer.startswith(b"SIP/2.0 488"), answer[:40] if answer else answer
        assert not any(HOP_RTP in rtp for rtp in moved), moved
    finally:
        peer.close()
        hop.close()


def test_hole_a_plaintext_sdp_past_content_length_moves_a_live_calls_media(pki, bob):
    """Attacker: untrusted hop on alice's path (or anyone who read the call's Call-ID
    and tags).  Message: a re-INVITE of alice's confirmed call (her ids, CSeq 3,
    ``Content-Type: application/sdp``, ``Content-Length: 0``) with a plaintext SRTP
    offer (``m=audio 40404 RTP/SAVP``, ``a=crypto`` of its choosing) after the head, one
    datagram; then its ACK.  Effect (seen): 200, ``call_media`` ``remote_rtp:
    127.0.0.1:40404``: bob's media goes to the hop, and what bob hears is keyed by the
    hop, shown as alice's trusted call."""
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop, smuggled=True)
        assert not any(HOP_RTP in rtp for rtp in moved), (moved, answer[:40] if answer else answer)
        assert answer is not None and answer.startswith(b"SIP/2.0 400"), answer[:40] if answer else answer
    finally:
        peer.close()
        hop.close()


def test_control_a_plaintext_sdp_part_of_a_multipart_is_refused(pki, bob):
    """The same multipart with the part's type written ``Content-Type``: 488, the media
    stays with alice."""
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop,
                                       part_header="Content-Type")
        assert answer is not None and answer.startswith(b"SIP/2.0 488"), answer[:40] if answer else answer
        assert not any(HOP_RTP in rtp for rtp in moved), moved
    finally:
        peer.close()
        hop.close()


def test_hole_a_compact_typed_sdp_part_moves_a_live_calls_media(pki, bob):
    """Attacker: untrusted hop on alice's path (or anyone who read the call's ids); shown
    over UDP (the datagram framing plays no part; TCP not run).  Message: a re-INVITE of alice's
    confirmed call (her ids, CSeq 4) whose body is ``multipart/mixed`` with one part,
    headed ``c: application/sdp`` (RFC 3261 §7.3.3's compact Content-Type), holding a
    plaintext SRTP offer with the hop's RTP port and key; then its ACK.

    Effect (seen): 200, ``call_media`` ``remote_rtp: 127.0.0.1:40404``.  The core reads
    a body part's headers with no compact forms (``mime.MimePart.header`` looks up
    ``content-type`` only; ``c`` is expanded for the SIP message's own headers in
    ``mime.body_part``, not for a part's): the part is ``text/plain`` by RFC 2045's
    default, no plaintext SDP to refuse.  pjsip parses a part's headers with its SIP
    header parser (``c`` is Content-Type) and finds the SDP offer.

    At fault: ``e2m_plugins/mime.py`` ``_header_lines`` / ``MimePart._index`` (no
    compact forms in a part).  Fix: expand ``c``/``e`` (``_COMPACT``) when a part's
    headers are read, or refuse a part header named ``c``/``e``."""
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop, part_header="c")
        assert not any(HOP_RTP in rtp for rtp in moved), (moved, answer[:40] if answer else answer)
        assert answer is not None and answer.startswith(b"SIP/2.0 488"), answer[:40] if answer else answer
    finally:
        peer.close()
        hop.close()


def test_hole_an_sdp_part_the_core_takes_for_the_preamble_moves_a_live_calls_media(pki, bob):
    """Attacker: untrusted hop on alice's path (or anyone who read the call's ids); shown
    over UDP.  Message: a re-INVITE of alice's confirmed call (her ids, CSeq 5) with a
    ``multipart/mixed;boundary=r59`` body ``x--r59 CRLF Content-Type: application/sdp
    CRLF CRLF <plaintext SRTP offer, the hop's port and key> CRLF --r59 CRLF
    Content-Type: text/plain CRLF CRLF hi CRLF --r59--``; then its ACK.

    Effect (seen): 200, ``call_media`` ``remote_rtp: 127.0.0.1:40404``.  The core finds
    delimiters only at the start of a line (``mime._part_spans``): the SDP is preamble,
    the one part is text/plain, nothing to refuse.  pjsip's ``pjsip_multipart_parse``
    takes the first ``--r59`` wherever it is, so its first part is the SDP offer.

    At fault: ``e2m_plugins/mime.py`` ``_part_spans`` (RFC-correct, but not pjsip's
    reading) with ``phone.py`` ``_on_rx`` handing pjsip the body as received.  Fix:
    refuse a multipart whose preamble (or epilogue) holds ``--boundary`` anywhere, or
    hand pjsip a body re-assembled from the parts the core read."""
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop, preamble=True)
        assert not any(HOP_RTP in rtp for rtp in moved), (moved, answer[:40] if answer else answer)
        assert answer is not None and answer.startswith(b"SIP/2.0 400"), answer[:40] if answer else answer
    finally:
        peer.close()
        hop.close()
