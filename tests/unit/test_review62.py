"""A sixty-second attacker's review (December 2026) of 2377d59: what the core reads vs
what pjsip (and Kamailio) read - differential parsing of SIP bodies.  The phone's side,
shown on a real ``e2m-phone``, is ``tests/pjsua/test_review62_phone.py``; here the core's
reading that makes each hole.

- ``test_hole_a_quoted_boundary_with_a_backslash_escape_hides_an_sdp_part``: attacker,
  an untrusted hop (or anyone who read a live call's ids; also an insider through the
  proxy, which reads the body with the same core).  Message: a re-INVITE whose
  ``Content-Type`` is ``multipart/mixed;boundary="r\\62"`` (a quoted string with a
  backslash escape, RFC 2045 / RFC 822 quoted-pair).  The core unquotes it to ``r62``
  (``grammar.unquote_string``); pjsip 2.15 (``pjsip_multipart_parse``) only strips the
  two quotes and uses ``r\\62``.  The body: ``--r62`` / ``Content-Type: text/plain`` /
  ``--r\\62`` / ``Content-Type: application/sdp`` / <plaintext SDP> / ``--r\\62--`` /
  ``--r62--``.  Effect: ``UAEngine.open`` (E2M required) sees one text/plain part, no
  DowngradeError; pjsip's delimiters are the ``--r\\62`` lines, its one part is the
  plaintext SDP offer (on the real phone the live call's media moves to the hop).  At
  fault: ``e2m_plugins/mime.py`` ``_boundary_of`` (takes the unescaped quoted string).
  Fix: refuse a boundary whose quoted form holds a backslash (or any quoted-pair), or
  refuse a multipart whose body holds ``--`` + the raw quoted text too.

- ``test_hole_an_ampersand_in_a_content_type_parameter_hides_an_sdp`` and
  ``test_hole_an_ampersand_in_a_part_content_type_hides_an_sdp``: the same attacker and
  effect.  Message: a re-INVITE whose ``Content-Type`` is
  ``text/plain;x=y&c:application/sdp`` over a plaintext SDP (or a ``multipart/mixed``
  part headed so).  The core's parameter value is any run without space, ``"`` or
  ``;`` (``grammar.Dialect.param``): one Content-Type, text/plain, ``x`` =
  ``y&c:application/sdp``.  pjsip's parameter value is a token (``y``), and its
  ``parse_hdr_end`` takes ``&`` for the end of a header (the header separator of a SIP
  URI, applied to every typed header of a message or a body part): ``c:application/sdp``
  is a second Content-Type, and ``int_parse_msg`` / ``parse_multipart_part`` keep the
  last one.  At fault: ``e2m_plugins/grammar.py`` (parameter values wider than pjsip's)
  with ``mime.parse_content_type``.  Fix: refuse a Content-Type (message or part) whose
  parameter values are not RFC 2045 tokens or quoted strings (in particular ``&``
  outside a quoted string), or hand pjsip a body re-typed from what the core read.

What held (read or run, see the controls): a plain quoted boundary without escapes;
two ``boundary`` parameters (MalformedError); ``boundary`` next to ``boundary*``
(MalformedError); a part whose header name has a space before the colon
(MalformedError); a bare CR in a part's header (MalformedError).  On the real phone
(not kept as tests): ``multipart/mixed;bo%75ndary=x62;boundary=r62`` (pjsip does not
take the %-escaped name for ``boundary``: 415, no media moved); carol's signed MESSAGE
with ``Max-Forwards: 70&f:<alice>`` (pjsua shows the first From, carol's).

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

import pytest

from e2m_lab.flows import SRTP_OFFER, ua_engine
from e2m_plugins import mime, sip
from e2m_plugins.body import message_body, plaintext_leaves
from e2m_plugins.errors import DowngradeError, MalformedError
from e2m_plugins.testpki import TestPKI, init_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review62-pki"), users=("alice", "bob"),
                         key_type="ec")


def _invite(body: bytes, content_type: str) -> sip.SipMessage:
    return sip.make_request("INVITE", "sip:bob@127.0.0.1:5070", from_uri="sip:alice@example.com",
                            to_uri="sip:bob@example.com", body=body, content_type=content_type)


# -- hole 1: a quoted boundary with a quoted-pair ------------------------------------

ESCAPED_CT = 'multipart/mixed;boundary="r\\62"'


def escaped_boundary_body(sdp: bytes) -> bytes:
    """To the core (boundary ``r62``): one text/plain part whose text holds the rest.
    To pjsip (boundary ``r\\62``, quotes stripped, escape kept): one SDP part."""
    return (b"--r62\r\nContent-Type: text/plain\r\n\r\n"
            b"--r\\62\r\nContent-Type: application/sdp\r\n\r\n" + sdp
            + b"\r\n--r\\62--\r\n"
            b"\r\n--r62--\r\n")


def pjsip_boundary(content_type: str) -> str:
    """The boundary as pjsip 2.15 takes it: the raw parameter text, the two quotes
    removed when it starts with one (``pjsip_multipart_parse``), escapes kept."""
    raw = content_type.split("boundary=", 1)[1].split(";", 1)[0].strip()
    return raw[1:-1] if len(raw) > 2 and raw.startswith('"') else raw


def pjsip_parts(body: bytes, boundary: str) -> list[bytes]:
    """The parts pjsip 2.15's ``pjsip_multipart_parse`` finds (first delimiter anywhere,
    each next one by ``strstr``), as raw part bytes (headers and body)."""
    delim = b"--" + boundary.encode()
    pos = body.find(delim)
    parts = []
    while pos >= 0:
        pos += len(delim)
        if body.startswith(b"--", pos):
            break
        while body[pos:pos + 1] in (b" ", b"\t"):
            pos += 1
        pos += 1 if body[pos:pos + 1] == b"\r" else 0
        assert body[pos:pos + 1] == b"\n"
        start = pos + 1
        nxt = body.find(delim, start)
        assert nxt >= 0
        end = nxt
        if end > start and body[end - 1:end] == b"\n":
            end -= 1
        if end > start and body[end - 1:end] == b"\r":
            end -= 1
        parts.append(body[start:end])
        pos = nxt
    return parts


def test_control_a_quoted_boundary_without_escape_is_read_alike(pki):
    """The same body and boundary quoted without a backslash (``"r62"``): pjsip and the
    core agree on the delimiter, and the core refuses: the ``--r\\62`` text inside the
    text part is only text to both, but a plaintext SDP part at a true delimiter is
    refused (DowngradeError)."""
    bob = ua_engine(pki, "bob", peers=("alice",))
    body = (b"--r62\r\nContent-Type: application/sdp\r\n\r\n" + SRTP_OFFER + b"\r\n--r62--\r\n")
    ct = 'multipart/mixed;boundary="r62"'
    assert pjsip_boundary(ct) == "r62"
    with pytest.raises(DowngradeError):
        bob.open(_invite(body, ct))
    # the attack's message, to pjsip's reading: one part, the SDP (before the fix the
    # core read one text/plain part under the unescaped boundary r62)
    msg = _invite(escaped_boundary_body(SRTP_OFFER), ESCAPED_CT)
    (part,) = pjsip_parts(msg.body, pjsip_boundary(ESCAPED_CT))
    assert part.startswith(b"Content-Type: application/sdp\r\n\r\nv=0")


def test_hole_a_quoted_boundary_with_a_backslash_escape_hides_an_sdp_part(pki):
    bob = ua_engine(pki, "bob", peers=("alice",))
    msg = _invite(escaped_boundary_body(SRTP_OFFER), ESCAPED_CT)
    with pytest.raises((DowngradeError, MalformedError)):
        bob.open(msg)


# -- hole 2: '&' ends a header for pjsip ---------------------------------------------

AMP_CT = "text/plain;x=y&c:application/sdp"


def test_control_a_text_plain_invite_passes_and_the_core_reads_one_content_type(pki):
    """A re-INVITE body typed ``text/plain;x=y`` is no SDP to refuse (the phone lets it
    through; pjsua takes no offer from it).  The attack's Content-Type is well formed to
    the core: text/plain with one parameter ``x`` whose value runs to the end."""
    bob = ua_engine(pki, "bob", peers=("alice",))
    bob.open(_invite(b"hello", "text/plain;x=y"))
    part = message_body(_invite(SRTP_OFFER, AMP_CT))
    assert part.content_type.mime_type == "text/plain"
    assert part.content_type.params == (("x", "y&c:application/sdp"),)


def test_hole_an_ampersand_in_a_content_type_parameter_hides_an_sdp(pki):
    """pjsip's parameter value is a token (``y``); its ``parse_hdr_end`` takes ``&`` for
    the end of a header (the separator of headers in a URI), so ``c:application/sdp``
    is a second Content-Type, the one ``int_parse_msg`` keeps."""
    bob = ua_engine(pki, "bob", peers=("alice",))
    with pytest.raises((DowngradeError, MalformedError)):
        bob.open(_invite(SRTP_OFFER, AMP_CT))


def test_hole_an_ampersand_in_a_part_content_type_hides_an_sdp(pki):
    bob = ua_engine(pki, "bob", peers=("alice",))
    body = (b"--r62\r\nContent-Type: " + AMP_CT.encode() + b"\r\n\r\n" + SRTP_OFFER
            + b"\r\n--r62--\r\n")
    with pytest.raises((DowngradeError, MalformedError)):
        bob.open(_invite(body, "multipart/mixed;boundary=r62"))


# -- what held ---------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [
    "multipart/mixed;boundary=r62;boundary=x62",
    "multipart/mixed;boundary=r62;BOUNDARY=x62",
    "multipart/mixed;boundary=r62;boundary*=x62",
])
def test_control_two_boundary_parameters_are_refused(content_type):
    with pytest.raises(MalformedError):
        mime.parse_content_type(content_type)


@pytest.mark.parametrize("header", [b"Content-Type : application/sdp",
                                    b"X: y\rContent-Type: application/sdp"])
def test_control_odd_part_headers_are_refused(pki, header):
    bob = ua_engine(pki, "bob", peers=("alice",))
    body = b"--r62\r\n" + header + b"\r\n\r\n" + SRTP_OFFER + b"\r\n--r62--\r\n"
    with pytest.raises((MalformedError, DowngradeError)):
        bob.open(_invite(body, "multipart/mixed;boundary=r62"))


@pytest.mark.parametrize("header,value,refused", [
    ("Expires", "60&c:application/sdp", True),           # any typed header, not only Content-Type
    ("Max-Forwards", "70&f:<sip:alice@example.com>", True),
    ("Session-Expires", "90;refresher=uac&c:application/sdp", True),
    ("Allow-Events", "certificate&c:application/sdp", True),
    ("X-Anything", "http://a.example/?b=1&c=2", False),    # untyped: text to the line's end
    ("Contact", "<sip:a@127.0.0.1?x=1&y=2>", False),        # inside <...>: the URI's
    ("Contact", '"Tom & Jerry" <sip:a@127.0.0.1>', False),  # inside a quoted string
    ("Subject", "Tom & Jerry", False),                     # free text, read to the line's end
    ("User-Agent", "a&b/1.0", False),
])
def test_an_ampersand_outside_quotes_ends_no_header_of_ours(header, value, refused):
    """My variant of the review's second hole: ``&`` ends every header pjsip parses by
    type, so the core refuses it outside quotes and ``<...>`` in any header a stack
    parses by type (``sip._check_unambiguous``), in ``parse`` and in both engines."""
    msg = sip.make_request("INVITE", "sip:bob@127.0.0.1:5070", from_uri="sip:alice@example.com",
                           to_uri="sip:bob@example.com", body=b"hi", content_type="text/plain",
                           extra_headers=[(header, value)])
    wire = msg.serialize()
    if refused:
        with pytest.raises(MalformedError, match="'&'"):
            sip.parse(wire)
        with pytest.raises(MalformedError):
            msg.check_unambiguous()
    else:
        assert sip.parse(wire).get(header) == value
        msg.check_unambiguous()
