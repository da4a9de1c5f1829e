"""A seventy-ninth attacker's review (December 2026) of 753b2c5: the stream transports.
The core half of the hole in ``tests/pjsua/test_review79_phone.py``.

Hole: an **off-path sender** (or any user) sends a MESSAGE for bob whose lines end in a
bare LF.  The proxy reads it with ``sip.parse(..., exact=True)`` (``kemi._read_message``),
which accepts bare LF line ends (``e2m_plugins/sip.py``, ``_parse_head``: a line is cut at
``\\n`` and a trailing ``\\r`` is merely dropped), so the proxy relays it down bob's TCP
connection; pjsip frames a stream by ``\\n\\r\\n`` only and swallows the requests that
follow it on that connection (seen: the next two, each 408 to its sender).

``exact`` exists for data another parser reads too (review 59, review 69): it should
refuse what a stock stack frames differently, bare LF line ends included.  That is the
fix this test asks for (a ``$mb`` check in ``route_sanity`` for requests the proxy relays
unread, a bare BYE, would close the rest).

The control: the same message with CRLF line ends parses exactly; and without ``exact``
bare LF stays accepted (RFC 3261 §7.5 asks a UA to be lenient on what it alone reads).

Fixed (stop 33): ``sip.parse(exact=True)`` refuses a head line that does not end in
CRLF; ``kemi.route_sanity`` answers such a request 400 before anything reads it and the
core reply route drops such a reply (``kemi._bare_line_ends``, the head only: a body may
hold any octets).  The holes turned XPASS and the markers are gone; controls that took
LF-only lines as read alike now assert the refusal (they said what the proxy did, not
what it should do).
"""

from __future__ import annotations

import pytest

from e2m_plugins import sip
from e2m_plugins.errors import MalformedError


def _message() -> bytes:
    return sip.make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:mallory@example.com",
                            to_uri="sip:bob@example.com", via_host="127.0.0.1:5070",
                            body=b"knock knock", content_type="text/plain").serialize()


def _bare_lf(wire: bytes) -> bytes:
    head, _, body = wire.partition(b"\r\n\r\n")
    return head.replace(b"\r\n", b"\n") + b"\n\n" + body


def test_control_a_crlf_message_parses_exactly_and_bare_lf_is_read_when_not_exact():
    wire = _message()
    assert sip.parse(wire, exact=True).body == b"knock knock"
    assert sip.parse(_bare_lf(wire)).body == b"knock knock"


def test_hole_an_exact_parse_takes_bare_lf_line_ends():
    with pytest.raises(MalformedError):
        sip.parse(_bare_lf(_message()), exact=True)


def test_hole_an_exact_parse_takes_a_single_bare_lf_before_the_blank_line():
    wire = _message()
    head, _, body = wire.partition(b"\r\n\r\n")
    with pytest.raises(MalformedError):
        sip.parse(head + b"\n\n" + body, exact=True)
