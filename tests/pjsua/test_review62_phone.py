"""A sixty-second attacker's review (December 2026) of 2377d59: what the core reads vs
what pjsip reads (differential parsing), on a real ``e2m-phone listen`` process (bob,
SRTP, E2M required) from plain UDP sockets on loopback, no Kamailio.  The core's side
is ``tests/unit/test_review62.py``.

Hole 1 (``test_hole_an_sdp_behind_an_escaped_quoted_boundary_moves_a_live_calls_media``):

- Attacker: an untrusted hop on alice's path (or anyone who read the live call's
  Call-ID and tags).
- Messages: alice's signed and sealed call to bob (answered, ACKed); then the hop's
  re-INVITE with alice's ids, ``Content-Type: multipart/mixed;boundary="r\\62"`` and the
  body ``--r62`` / ``Content-Type: text/plain`` / (blank) / ``--r\\62`` /
  ``Content-Type: application/sdp`` / (blank) / <plaintext SRTP offer, the hop's RTP
  port 40404 and its own a=crypto key> / ``--r\\62--`` / (blank) / ``--r62--``; then
  its ACK.
- Effect (seen): see the test's assertion message; the core (boundary unquoted to
  ``r62``) sees one text/plain part and lets the message through unchanged, so
  ``_on_rx`` hands pjsip the original octets; pjsip's ``pjsip_multipart_parse`` strips
  the quotes only, its delimiter is ``--r\\62``, its one part the SDP offer.
- At fault: ``e2m_plugins/mime.py`` ``_boundary_of`` (the unquoted value) with
  ``pjsua_hooks/phone.py`` ``_on_rx`` (``return None``: the raw bytes go to pjsip).
  Fix: refuse a quoted boundary holding a quoted-pair (a backslash), as pjsip
  cannot read it the same way.

Hole 2 (``test_hole_an_ampersand_in_a_content_type_parameter_makes_pjsip_read_an_sdp``,
``test_hole_an_ampersand_in_a_part_content_type_makes_pjsip_read_an_sdp``):

- Attacker and set-up as hole 1.
- Messages: the hop's re-INVITE with ``Content-Type: text/plain;x=y&c:application/sdp``
  and its plaintext SRTP offer as the whole body; or a ``multipart/mixed;boundary=r62``
  whose one part is headed that way; then its ACK.
- Effect (seen, both): 200, ``call_media`` ``remote_rtp: 127.0.0.1:40404``.  The core
  reads text/plain with one parameter ``x="y&c:application/sdp"`` and lets the message
  through unchanged; pjsip's parameter value is a token (``y``) and ``parse_hdr_end``
  takes ``&`` for the end of the header, so ``c:application/sdp`` is a second
  Content-Type, the last, which pjsip keeps.
- At fault: ``e2m_plugins/grammar.py`` (``Dialect.param``: a value is any run without
  space, ``"`` or ``;``) as used by ``mime.parse_content_type``.  Fix: a Content-Type
  parameter value must be an RFC 2045 token or a quoted string (refuse ``&`` and the
  other non-token characters), at message and part level.

What held (run on the real phone): an SDP part at a true delimiter of a plainly quoted
boundary (control, 488); a body typed ``text/plain;x=y`` (control: no offer taken);
``multipart/mixed;bo%75ndary=x62;boundary=r62`` with the SDP behind ``--x62`` (pjsip
does not decode the name to ``boundary``: 415, no media moved); carol's own signed and
sealed MESSAGE with ``Max-Forwards: 70&f:<sip:alice@example.com>;tag=...`` (the core
reads one From, carol's; pjsua showed it From carol: the first From is the one shown).

Fixed (stop 31): a Content-Type parameter with a backslash is MalformedError
(``mime.parse_content_type``: pjsip keeps a quoted value's escapes, we would not); an
``&`` outside quotes and ``<...>`` is MalformedError in any header SIP stacks parse by
type (pjsip's list; Subject or an X- header is text to the line's end)
(``sip._check_unambiguous``, in ``parse`` and both engines) and in any body part's
header (``mime._header_lines``): pjsip ends a header it parses by type at such an
``&``.  The second rule covers every typed header, not only Content-Type: my own
variant, ``Expires: 60&c:application/sdp`` after a text/plain Content-Type, moved the
live call's media on the real phone before the fix
(``test_an_ampersand_after_another_typed_header_makes_no_second_content_type``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER, ua_engine
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST, UdpStranger
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI, init_test_pki
from tests.pjsua.test_review54_phone import alices_call
from tests.pjsua.test_review59_phone import reinvite_and_ack

pytestmark = [pytest.mark.pjsua2]

HOP_RTP = "40404"
HOP_SDP = SRTP_OFFER.replace(b"49170", HOP_RTP.encode()).replace(
    b"2890844526 2890844526", b"2890844526 2890844527")
ESCAPED_CT = 'multipart/mixed;boundary="r\\62"'


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review62-pki"),
                         users=("alice", "bob", "carol"), key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _hops_reinvite(pki: TestPKI, bob: PhoneProcess, invite: sip.SipMessage,
                   ok: sip.SipMessage, contact: str, hop: UdpStranger, cseq: int,
                   content_type: str, body: bytes, last: str | None = None
                   ) -> tuple[bytes | None, list[str]]:
    """The hop's re-INVITE with alice's ids and ``body`` typed ``content_type`` (and the
    header line ``last`` after every other but Content-Length); ACKs a 200.  Returns the
    final answer and the remote RTP addresses bob reported since."""
    plain = sip.make_request(
        "INVITE", contact, from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
        call_id=invite.call_id, cseq=cseq, from_tag=invite.from_tag, to_tag=ok.to_tag,
        via_host=f"{HOST}:{hop.local_port}",
        extra_headers=[("Contact", f"<sip:alice@{HOST}:{hop.local_port}>"),
                       ("Content-Type", content_type)])
    wire = plain.serialize()
    if last is not None:
        wire = wire.replace(b"Content-Length: 0", last.encode() + b"\r\nContent-Length: 0")
    wire = wire.replace(b"Content-Length: 0", b"Content-Length: %d" % len(body)) + body
    return reinvite_and_ack(pki, bob, invite, ok, contact, hop, cseq, wire)


def _escaped_body(sdp: bytes) -> bytes:
    return (b"--r62\r\nContent-Type: text/plain\r\n\r\n"
            b"--r\\62\r\nContent-Type: application/sdp\r\n\r\n" + sdp
            + b"\r\n--r\\62--\r\n"
            b"\r\n--r62--\r\n")


def _head(answer: bytes | None) -> bytes | None:
    return answer[:40] if answer else answer


def test_control_an_sdp_behind_a_plain_quoted_boundary_is_refused(pki, bob):
    """The SDP part at a true delimiter of a quoted boundary without escape
    (``boundary="r62"``): 488, the media stays with alice."""
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        body = b"--r62\r\nContent-Type: application/sdp\r\n\r\n" + HOP_SDP + b"\r\n--r62--\r\n"
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop, 2,
                                       'multipart/mixed;boundary="r62"', body)
        assert answer is not None and answer.startswith(b"SIP/2.0 488"), _head(answer)
        assert not any(HOP_RTP in rtp for rtp in moved), moved
    finally:
        peer.close()
        hop.close()


def test_hole_an_sdp_behind_an_escaped_quoted_boundary_moves_a_live_calls_media(pki, bob):
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop, 3, ESCAPED_CT,
                                       _escaped_body(HOP_SDP))
        assert not any(HOP_RTP in rtp for rtp in moved), (moved, _head(answer))
        assert answer is not None and not answer.startswith(b"SIP/2.0 2"), _head(answer)
    finally:
        peer.close()
        hop.close()



# -- hole 2: '&' ends a header for pjsip ---------------------------------------------

AMP_CT = "text/plain;x=y&c:application/sdp"


def test_control_an_sdp_typed_text_plain_is_let_through_and_not_taken(pki, bob):
    """A plain ``Content-Type: text/plain;x=y`` over the hop's SDP text: the core lets it
    through (not an SDP), and pjsua takes no offer from it: the media stays."""
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop, 2,
                                       "text/plain;x=y", HOP_SDP)
        assert answer is not None, answer
        assert not any(HOP_RTP in rtp for rtp in moved), (moved, _head(answer))
    finally:
        peer.close()
        hop.close()


def test_hole_an_ampersand_in_a_content_type_parameter_makes_pjsip_read_an_sdp(pki, bob):
    """Attacker: untrusted hop (or anyone with the live call's ids).  Message: a
    re-INVITE with alice's ids, ``Content-Type: text/plain;x=y&c:application/sdp`` and
    the hop's plaintext SRTP offer as the body; then its ACK.  The core's parameter value
    is everything up to ``;``/space (``x="y&c:application/sdp"``): text/plain, let
    through unchanged.  pjsip's parameter value is a token (``y``), and its
    ``parse_hdr_end`` takes ``&`` for the end of the header (the URI-header separator),
    so ``c:application/sdp`` is a second Content-Type, the one ``int_parse_msg`` keeps."""
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop, 3, AMP_CT, HOP_SDP)
        assert not any(HOP_RTP in rtp for rtp in moved), (moved, _head(answer))
        assert answer is not None and not answer.startswith(b"SIP/2.0 2"), _head(answer)
    finally:
        peer.close()
        hop.close()


def test_hole_an_ampersand_in_a_part_content_type_makes_pjsip_read_an_sdp(pki, bob):
    """The same inside a ``multipart/mixed`` part (pjsip parses a part's headers with
    ``pjsip_parse_headers``, the same ``&`` rule; ``parse_multipart_part`` keeps the
    last Content-Type)."""
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        body = (b"--r62\r\nContent-Type: " + AMP_CT.encode() + b"\r\n\r\n" + HOP_SDP
                + b"\r\n--r62--\r\n")
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop, 3,
                                       "multipart/mixed;boundary=r62", body)
        assert not any(HOP_RTP in rtp for rtp in moved), (moved, _head(answer))
        assert answer is not None and not answer.startswith(b"SIP/2.0 2"), _head(answer)
    finally:
        peer.close()
        hop.close()



def test_an_ampersand_after_another_typed_header_makes_no_second_content_type(pki, bob):
    """Found while fixing review 62 (the same attacker and effect, my own variant): the
    ``&`` rule is pjsip's for every header it parses by type, not for Content-Type
    only.  Message: the hop's re-INVITE typed ``text/plain`` (the core lets it through
    unread) with ``Expires: 60&c:application/sdp`` after its Content-Type: pjsip ends
    Expires at the ``&`` and reads a second Content-Type, the SDP's, the last one.
    Refused 400, the media stays."""
    peer, hop = UdpStranger(bob.port), UdpStranger(bob.port)
    try:
        invite, ok, contact = alices_call(pki, bob, peer)
        answer, moved = _hops_reinvite(pki, bob, invite, ok, contact, hop, 3, "text/plain",
                                       HOP_SDP, last="Expires: 60&c:application/sdp")
        assert not any(HOP_RTP in rtp for rtp in moved), (moved, _head(answer))
        assert answer is not None and answer.startswith(b"SIP/2.0 400"), _head(answer)
    finally:
        peer.close()
        hop.close()
