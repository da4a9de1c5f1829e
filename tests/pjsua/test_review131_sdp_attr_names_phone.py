"""Review 131 (attacker's review of 85ea3f7): the SDP view vs a real phone, after stop 42's
``_one_reading`` (review 130 K1-K5).  Write-up in the module docstring of
``tests/pjsua/test_review131_sdp_attr_names_phone.py`` (this file): see the end.

Set-up: review 130's (``tests/pjsua/test_review130_sdp_views_phone.py``, reused as is):
bob's real ``e2m-phone listen`` (pjsua2 / pjmedia 2.15.1, SRTP, E2M required, answers by
itself); alice is an **insider UA** whose own ``UAEngine`` protects her INVITE for bob
with the home proxy as a reader of ``INVITE:application/sdp``; the proxy's
``ProxyEngine.inspect`` verdict on that very message gives the media rows
(``bootstrap.media_records``, what ``kamailio_app`` archives) and the ``e2m media:``
lines; the message then goes to bob's phone from a plain UDP socket, and UDP sockets on
loopback count what bob's phone sends where.  The SDP is ``flows.SRTP_OFFER`` (session
``c=IN IP4 127.0.0.1``, ``m=audio P RTP/SAVP 0 8``) with a fresh even port P, plus the
lines named below.
(The write-up proper is in ``__doc__`` below this paragraph's module: see ``WRITE_UP``.)
"""

from __future__ import annotations

import pytest

from tests.pjsua.test_review130_sdp_views_phone import (  # noqa: F401 - fixtures
    BOB_MAY_SEND, HIDDEN, HOST, Sink, _answered, _bob_sends, _even_port, _offer, _sdp, bob, pki)

pytestmark = [pytest.mark.pjsua2]


# -- K1: a direction attribute whose name ends at another character than ':' -----------
#
# pjmedia's attribute name is the longest run of token characters (sdp.c:1315,
# ``cs_token``), whatever follows; the view's is the text before the first ':'
# (``_one_reading``) and its direction the whole value (``_direction``).

K1_CASES = {
    "media-colon": ("a=sendonly:x\r\n", ""),
    "media-space": ("a=inactive x\r\n", ""),
    "media-semicolon": ("a=sendonly;x\r\n", ""),
    "media-beside-recvonly": ("a=sendonly x\r\na=recvonly\r\n", ""),
    "session-space": ("", "a=inactive x\r\n"),
}


@pytest.mark.xfail(strict=True, reason="review 131 hole K1: a=sendonly:x / a=inactive x read as "
                                       "a direction by pjmedia, archived as sendrecv")
@pytest.mark.parametrize("case", list(K1_CASES))
def test_hole_k1_direction_name_ended_otherwise_archived_sendrecv(pki, bob, case):
    rtp = _even_port()
    verdict, rows, answer, sent = _bob_sends(pki, bob, _sdp(rtp, *K1_CASES[case]), rtp)
    assert _answered(answer), answer
    assert sent == 0, sent                                     # the phone: bob sends no RTP
    # secure: refused at the proxy, or the row says bob may not send
    assert verdict.action == "reply" or all(not BOB_MAY_SEND[r["flow"]] for r in rows), rows


@pytest.mark.parametrize("attr", ["a=sendonly\r\n", "a=inactive\r\n"])
def test_control_k1_exact_direction_archived_and_obeyed(pki, bob, attr):
    rtp = _even_port()
    verdict, rows, answer, sent = _bob_sends(pki, bob, _sdp(rtp, attr), rtp)
    assert _answered(answer), answer
    assert verdict.action == "forward"
    assert [BOB_MAY_SEND[r["flow"]] for r in rows] == [False], rows
    assert sent == 0, sent


def test_control_k1_unknown_attribute_with_direction_word_inside_value(pki, bob):
    """``a=extmap:1/sendonly urn:...`` (RFC 8285, WebRTC stacks): a direction word inside
    another attribute's value; neither side takes it as the media's direction."""
    rtp = _even_port()
    sdp = _sdp(rtp, "a=extmap:1/sendonly urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n")
    verdict, rows, answer, sent = _bob_sends(pki, bob, sdp, rtp)
    assert _answered(answer), answer
    assert verdict.action == "forward"
    assert [r["flow"] for r in rows] == ["sendrecv"], rows
    assert sent > 0, sent


# -- K2: a=rtcp ended by white space instead of ':' ---------------------------------------

K2_CASES = {
    "space-before-decoy": "a=rtcp {hidden_port} IN IP4 {hidden}\r\na=rtcp:{decoy_port}\r\n",
    "tab-before-decoy": "a=rtcp\t{hidden_port} IN IP4 {hidden}\r\na=rtcp:{decoy_port}\r\n",
    "space-alone": "a=rtcp {hidden_port} IN IP4 {hidden}\r\n",
}


@pytest.mark.xfail(strict=True, reason="review 131 hole K2: a=rtcp<SP>port IN IP4 addr steers "
                                       "the phone's RTCP; the archive names another place")
@pytest.mark.parametrize("case", list(K2_CASES))
def test_hole_k2_rtcp_name_ended_by_white_space_rtcp_goes_elsewhere(pki, bob, case):
    rtp = _even_port()
    hidden, decoy = (HIDDEN, rtp + 3), (HOST, rtp + 1)
    attrs = K2_CASES[case].format(hidden_port=rtp + 3, hidden=HIDDEN, decoy_port=rtp + 1)
    sink = Sink((HOST, rtp), decoy, hidden)
    try:
        verdict, rows, answer, _ = _offer(pki, bob, _sdp(rtp, attrs))
        counts = sink.collect(hidden)
    finally:
        sink.close()
    print(counts)
    assert _answered(answer), answer
    assert counts[hidden] > 0 and counts[decoy] == 0, counts       # the phone: RTCP to HIDDEN
    # secure: refused, or the archived row names where the RTCP goes
    assert verdict.action == "reply" or [(r["rtcp_address"], r["rtcp_port"]) for r in rows] \
        == [hidden], rows


def test_control_k2_rfc3605_rtcp_address_archived_and_used(pki, bob):
    """``a=rtcp:P+3 IN IP4 127.0.0.9`` (RFC 3605, as FreeSWITCH and pjsua with ICE write
    it): since stop 42 the row's rtcp_address/rtcp_port are where the phone's RTCP goes."""
    rtp = _even_port()
    hidden = (HIDDEN, rtp + 3)
    sink = Sink((HOST, rtp), (HOST, rtp + 1), hidden)
    try:
        verdict, rows, answer, _ = _offer(pki, bob, _sdp(rtp, f"a=rtcp:{rtp + 3} IN IP4 {HIDDEN}\r\n"))
        counts = sink.collect(hidden)
    finally:
        sink.close()
    assert _answered(answer), answer
    assert verdict.action == "forward"
    assert [(r["rtcp_address"], r["rtcp_port"]) for r in rows] == [hidden], rows
    assert counts[hidden] > 0 and counts[(HOST, rtp + 1)] == 0, counts


def test_control_k2_two_rtcp_attributes_refused(pki, bob):
    """Stop 42's rule in the nearby case: two ``a=rtcp:`` are refused by the view."""
    rtp = _even_port()
    verdict, rows, answer, _ = _offer(
        pki, bob, _sdp(rtp, f"a=rtcp:{rtp + 3} IN IP4 {HIDDEN}\r\na=rtcp:{rtp + 1}\r\n"))
    assert verdict.action == "reply" and rows == [], (verdict.action, rows)
