"""A fifty-ninth attacker's review (December 2026) of 8360976: the softphone against a
stranger and an insider, end to end (real pjsua2).  The phone's side, shown on a real
``e2m-phone``, is ``tests/pjsua/test_review59_phone.py``; here the core's reading that
makes one of its holes.

- ``test_hole_a_body_part_typed_by_compact_c_is_not_read_as_sdp``: attacker, an
  untrusted hop (or anyone who read a call's ids; also an insider through the proxy).
  Message: a re-INVITE whose body is ``multipart/mixed`` with one part headed
  ``c: application/sdp`` (the compact Content-Type of RFC 3261 §7.3.3) holding a
  plaintext SDP.  Effect: ``UAEngine.open`` (E2M required) accepts it as a text/plain
  part, no ``DowngradeError``; pjsip reads the part's headers with its SIP header parser
  (``c`` = Content-Type) and takes the SDP: on the real phone the live call's media
  moves to the hop.  At fault: ``e2m_plugins/mime.py`` reads a part's headers without
  compact forms (``MimePart.header``; ``_COMPACT`` is applied in ``body_part`` to the
  SIP message's own headers only).  Fix: expand ``c``/``e`` in a part's headers too
  (or refuse them).

- ``test_hole_an_sdp_after_a_mid_line_first_delimiter_passes_the_downgrade_check``:
  the same attacker and effect, the SDP put where RFC 2046 (and the core) see the
  preamble: the first ``--boundary`` mid-line, which pjsip takes for a delimiter.

What held: the same part headed ``Content-Type``, ``CONTENT-TYPE`` or folded: refused
(DowngradeError); two Content-Type headers on the message or in a part: MalformedError;
a MESSAGE with any plaintext part: refused whatever its type.

Fixed (stop 31), so that the core reads a body as the laxest stack behind it would:
a datagram with octets past its Content-Length is 400 at the phone (``sip.parse``
``exact``, as Kamailio's sanity check answers it); a body part's headers take the
compact ``c``/``e`` as Content-Type/Content-Encoding (``mime._header_lines``); a
multipart whose ``--boundary`` appears anywhere but at its delimiters (mid-line, in
the preamble or epilogue, followed by other characters) is MalformedError (400).  The
same reading serves the proxy, which uses the same MIME code.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SRTP_OFFER, ua_engine
from e2m_plugins import sip
from e2m_plugins.body import message_body, plaintext_leaves
from e2m_plugins.errors import DowngradeError, MalformedError
from e2m_plugins.testpki import TestPKI, init_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review59-pki"), users=("alice", "bob"),
                         key_type="ec")


def _invite_with_part(header: str) -> sip.SipMessage:
    body = (b"--r59\r\n" + header.encode() + b": application/sdp\r\n\r\n" + SRTP_OFFER
            + b"\r\n--r59--\r\n")
    return sip.make_request("INVITE", "sip:bob@127.0.0.1:5070", from_uri="sip:alice@example.com",
                            to_uri="sip:bob@example.com", body=body,
                            content_type="multipart/mixed;boundary=r59")


def test_control_a_plaintext_sdp_part_is_refused(pki):
    bob = ua_engine(pki, "bob", peers=("alice",))
    msg = _invite_with_part("Content-Type")
    with pytest.raises(DowngradeError):
        bob.open(msg)
    # the compact form parses as a header (now read as the Content-Type it is to pjsip)
    (leaf,) = plaintext_leaves(message_body(_invite_with_part("c")))
    assert len(leaf.headers) == 1 and leaf.headers[0][1] == "application/sdp"


def test_hole_a_body_part_typed_by_compact_c_is_not_read_as_sdp(pki):
    bob = ua_engine(pki, "bob", peers=("alice",))
    msg = _invite_with_part("c")
    (leaf,) = plaintext_leaves(message_body(msg))
    assert leaf.content_type.mime_type == "application/sdp", leaf.content_type
    with pytest.raises(DowngradeError):
        bob.open(msg)


def _preamble_invite(line_start: bool) -> sip.SipMessage:
    first = b"--r59" if line_start else b"x--r59"
    body = (first + b"\r\nContent-Type: application/sdp\r\n\r\n" + SRTP_OFFER
            + b"\r\n--r59\r\nContent-Type: text/plain\r\n\r\nhi\r\n--r59--\r\n")
    return sip.make_request("INVITE", "sip:bob@127.0.0.1:5070", from_uri="sip:alice@example.com",
                            to_uri="sip:bob@example.com", body=body,
                            content_type="multipart/mixed;boundary=r59")


def test_control_an_sdp_part_after_a_true_first_delimiter_is_refused(pki):
    bob = ua_engine(pki, "bob", peers=("alice",))
    with pytest.raises(DowngradeError):
        bob.open(_preamble_invite(line_start=True))


def test_hole_an_sdp_after_a_mid_line_first_delimiter_passes_the_downgrade_check(pki):
    """Attacker: untrusted hop (or anyone with a call's ids).  Message: a re-INVITE whose
    multipart's first delimiter is ``x--r59`` (mid-line), followed by a plaintext SDP
    part, then a true delimiter and a text/plain part.  Effect: ``UAEngine.open`` (E2M
    required) accepts it (the SDP is preamble to ``mime._part_spans``); pjsip's
    multipart parser takes the first ``--r59`` anywhere and the SDP as the first part
    (``tests/pjsua/test_review59_phone.py``: the live call's media moves).  Fix: refuse
    ``--boundary`` in a multipart's preamble or epilogue."""
    bob = ua_engine(pki, "bob", peers=("alice",))
    with pytest.raises((DowngradeError, MalformedError)):
        bob.open(_preamble_invite(line_start=False))
