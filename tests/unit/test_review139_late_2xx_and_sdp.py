"""Review 139, controls for areas 2 and 3 (the findings, and what was tried, are in the
docstring of ``tests/e2e/test_review139_listener_by_name.py``).

- Area 2 (``pjsua_hooks/late_2xx.py``): 40 late 200s over 7 failed INVITEs (6, 6, ...,
  4 To tags; the entry table holds 32, so 8 are evicted for room), then each 200 again
  with other octets: exactly 40 BYEs in all, never a second one for a 2xx, and a new
  INVITE's late 200 after that still gets its ACK and BYE.
- Area 3 (``e2m_plugins/sdp.py``): the line splitting after the one-decode change: a
  bare CR, a NUL and a non-UTF-8 octet are refused wherever they stand; U+2028 and
  U+0085 inside a value are not line ends; the memoised ``_canonical_address`` refuses
  an ``inet_aton`` spelling every time it is asked.
"""

from __future__ import annotations

import pytest

from e2m_plugins import sip
from e2m_plugins.errors import MalformedError
from e2m_plugins.sdp import media_summary, parse_lines
from pjsua_hooks.late_2xx import MAX_LATE, LateAnswers

VIA = "127.0.0.1:5099"
OUR_TAG = "alicetag"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _late_200(invite: int, to_tag: str, extra: str = "") -> tuple[sip.SipMessage, bytes]:
    text = (f"SIP/2.0 200 OK\r\n"
            f"Via: SIP/2.0/UDP {VIA};branch=z9hG4bKinv{invite}\r\n"
            f"From: <sip:alice@example.com>;tag={OUR_TAG}\r\n"
            f"To: <sip:bob@example.com>;tag={to_tag}\r\n"
            f"Call-ID: call{invite}@x\r\n"
            f"CSeq: 1 INVITE\r\n"
            f"Contact: <sip:bob@127.0.0.1:5070>\r\n"
            f"{extra}Content-Length: 0\r\n\r\n").encode()
    return sip.parse(text), text


def _byes(out) -> int:
    return sum(1 for o in out if o.method == "BYE")


def test_control_no_second_bye_for_a_copy_of_an_evicted_late_2xx():
    answers = LateAnswers(clock=Clock())
    firsts = [(i, f"t{j}") for i in range(7) for j in range(6)][:40]
    byes = sum(_byes(answers.answer(*_late_200(i, tag), OUR_TAG, VIA)) for i, tag in firsts)
    assert byes == 40 and len(answers) == MAX_LATE
    again = 0
    for i, tag in firsts:
        response, data = _late_200(i, tag, extra="Server: copy\r\n")     # other octets
        if answers.retransmission(data) is False:
            again += _byes(answers.answer(response, data, OUR_TAG, VIA))
    assert again == 0
    out = answers.answer(*_late_200(99, "honest"), OUR_TAG, VIA)
    assert [o.method for o in out] == ["ACK", "BYE"]


SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


@pytest.mark.parametrize("octets", [b"\r", b"\0", b"\xff", b"\xed\xa0\x80", b"\xc0\xaf"])
@pytest.mark.parametrize("where", [10, 40, len(SDP) - 3])
def test_control_a_control_or_non_utf8_octet_is_refused_anywhere(octets, where):
    with pytest.raises(MalformedError):
        media_summary(SDP[:where] + octets + SDP[where:])


def test_control_unicode_line_separators_are_not_line_ends():
    sdp = SDP + "a=label:x\u2028c=IN IP4 127.0.0.9\u0085\r\n".encode()
    lines = parse_lines(sdp)
    assert len(lines) == 8 and lines[-1].kind == "a"
    assert [m.address for m in media_summary(sdp)] == ["127.0.0.1"]


@pytest.mark.parametrize("round_", range(3))
def test_control_the_memoised_address_check_refuses_every_time(round_):
    with pytest.raises(MalformedError):
        media_summary(SDP.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 127.1"))
    assert [m.address for m in media_summary(SDP)] == ["127.0.0.1"]
