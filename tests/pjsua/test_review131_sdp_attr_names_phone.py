"""Review 131 (attacker's review of 85ea3f7): where the home proxy's SDP view and bob's
real phone (pjsua2 / pjmedia 2.15.1) still read one offer differently after stop 42's
``_one_reading`` / ``_canonical_address`` (review 130 K1-K5).

Set-up (every test): review 130's, reused from
``tests/pjsua/test_review130_sdp_views_phone.py``: bob's real ``e2m-phone listen``
(SRTP, E2M required, answers by itself); alice is an **insider UA** whose own
``UAEngine`` protects her INVITE for bob (signed, sealed, bound) with the home proxy
``proxy.example.com`` as a reader of ``INVITE:application/sdp``; the proxy's
``ProxyEngine.inspect`` verdict on that very message gives the archive's media rows
(``bootstrap.media_records``) and the ``e2m media:`` log lines (``media_log_lines``);
then the message goes to bob's phone from a plain UDP socket, and UDP sockets on
loopback (127.0.0.1 and 127.0.0.9) count what the phone sends where.  Kamailio itself
is not in the loop (the rows are what the app makes of the engine's verdict, as the
running proxy does).  SDP: ``flows.SRTP_OFFER`` (session ``c=IN IP4 127.0.0.1``,
``m=audio P RTP/SAVP 0 8``, SDES key) with a fresh even port P and the lines named.
Figures: one run of the final module, and the same in a run with the marks removed.

The root cause of K1 and K2: pjmedia's attribute name is the longest run of token
characters after ``a=`` (``sdp.c:1315``, ``pj_scan_get(scanner, &cs_token, ...)``;
``TOKEN`` at ``sdp.c:37`` has no ``:``, space, tab, ``;`` or ``/``), and the rest of
the line, minus one ``:`` if there is one, is its value.  The view's name is the text
before the first ``:`` (``e2m_plugins/sdp.py:386``, ``partition(":")``), and its
direction is the whole value compared with the four words (``sdp.py:340-342``).

Hole K1: a direction attribute whose name is followed by something
------------------------------------------------------------------

- Attacker: insider UA misstating which way media went (the review 130 K3/K4 kind).
- Messages (media section, or session level): ``a=sendonly:x``, ``a=inactive x``,
  ``a=sendonly;x``, or ``a=sendonly x`` beside ``a=recvonly``.
- Observed: the proxy forwards; the row says ``flow sendrecv`` (``recvonly`` for the
  last case: bob may send), log ``... RTP/SAVP sendrecv``; bob answers 200, his media
  event is ``remote_hold`` with no ``remote_rtp``, and 0 RTP reach ``127.0.0.1:P`` in
  5 s (the sendonly cases: 2 RTCP at P+1; inactive: nothing at all).  pjmedia read
  ``sendonly``/``inactive`` (``sdp_neg.c:698-723``, ``sdp.c:1347`` at session level).
- Code at fault: ``e2m_plugins/sdp.py:340-342`` (``_direction``: whole value equal to a
  word; ``a=sendonly:x`` is counted as a direction by ``_one_reading`` yet read as none)
  and ``sdp.py:386-391`` (``_one_reading``: names cut at ``:`` only).
- Test: ``test_hole_k1_direction_name_ended_otherwise_archived_sendrecv[...]`` (5).
- Fix: take an attribute's name as pjmedia does (leading run of RFC 8866 token
  characters) for every check and reading, and refuse a viewed attribute with
  anything after a direction name, or any line whose token-name is viewed but whose
  text before ``:`` is not exactly that name.

Hole K2: ``a=rtcp`` followed by a space or a tab instead of ``:``
-----------------------------------------------------------------

- Attacker: insider UA hiding where her call's RTCP goes (review 130 K1/K2 again).
- Message: media section ends ``a=rtcp P+3 IN IP4 127.0.0.9`` then ``a=rtcp:P+1``
  (or with a tab after ``rtcp``, or the first line alone).
- Observed: forwarded; row ``rtcp_address 127.0.0.1, rtcp_port P+1`` and log ``... rtcp
  127.0.0.1:P+1`` (alone: no RTCP at all in row and log); bob answers 200, 5 RTP at
  ``127.0.0.1:P``, 2 RTCP at ``127.0.0.9:P+3``, 0 at ``127.0.0.1:P+1`` (all 3 cases).
  pjmedia's first ``rtcp`` attribute (``stream_info.c:539-540``) has the value
  ``" P+3 IN IP4 127.0.0.9"``, which ``pjmedia_sdp_attr_get_rtcp`` scans with
  ``PJ_SCAN_AUTOSKIP_WS`` (leading blanks skipped, ``sdp.c:414``).
- Code at fault: ``sdp.py:352-353`` (``_media_line``: ``partition(":")[0] == "rtcp"``)
  and ``sdp.py:386-391``.
- Test: ``test_hole_k2_rtcp_name_ended_by_white_space_rtcp_goes_elsewhere[...]`` (3).
- Fix: as K1 (token-name); with it, two ``rtcp`` attributes are refused and a blank
  before the value read (or refused) as pjmedia does.

Hole K5 (small): an ``a=rtcp`` address of another type than the stream's
--------------------------------------------------------------------------

- Attacker: insider UA making the archive name RTCP's address in a form a reader or a
  firewall fed from the log line takes for an IPv6 one.
- Message: ``a=rtcp:P+3 IN IP6 ::ffff:127.0.0.9`` in an ``IN IP4`` stream.
- Observed: forwarded, row ``rtcp_address ::ffff:127.0.0.9``; bob answers 200 and sends
  IPv4 RTCP to ``127.0.0.9:P+3`` (2 datagrams).  pjmedia ignores the attribute's
  address type and parses the address in the stream's family (``stream_info.c:546``,
  ``pj_sockaddr_init(rem_af, ...)``: glibc's resolver gives 127.0.0.9 for AF_INET).
- Code at fault: ``sdp.py:304-310`` (``_rtcp`` checks the address against its own
  type, not the stream's) and ``_canonical_address`` (an IPv4-mapped IPv6 literal is
  "plain").
- Test: ``test_hole_k5_rtcp_address_type_other_than_the_streams``.
- Fix: refuse an ``a=rtcp`` address whose type is not the stream's ``c=`` type, and
  IPv4-mapped IPv6 literals, or archive ``ip.ipv4_mapped``.

Controls (unmarked, pass)
-------------------------

- ``test_control_k1_exact_direction_archived_and_obeyed[...]``: ``a=sendonly``,
  ``a=inactive``: row says bob may not send, and he sends no RTP.
- ``test_control_k1_unknown_attribute_with_direction_word_inside_value``:
  ``a=extmap:1/sendonly urn:...`` (WebRTC): row ``sendrecv``, bob sends RTP.
- ``test_control_k2_rfc3605_rtcp_address_archived_and_used``: ``a=rtcp:P+3 IN IP4
  127.0.0.9``: row names 127.0.0.9:P+3 and the RTCP goes there.
- ``test_control_k2_two_rtcp_attributes_refused``: two ``a=rtcp:``: refused (stop 42).
- ``test_control_k5_rtcp_of_another_family_the_phone_cannot_use_is_refused_by_it``:
  ``a=rtcp:P+3 IN IP6 ::1`` on an IPv4 stream: bob answers 488, no media.

Honest SDP from real stacks through a real Kamailio: ``tests/kamailio/
test_review131_honest_sdp_wire.py`` (12 forms, none refused).  Schema 5 with an old
node: ``tests/cluster/test_review131_schema5_mixed_nodes.py`` (K3).  ``e2m archive
show``: ``tests/unit/test_review131_archive_show_rtcp.py`` (K4).

Tried and held
--------------

- ``a=rtcp-mux`` with ``a=rtcp:P+3 IN IP4 127.0.0.9``: the phone (rtcp-mux off
  locally) sends its RTCP to 127.0.0.9:P+3 as archived (2), 31 RTP to P: agree.
- ``a=rtcp:P+3 IN IP4 127.0.0.9/24``: refused by the view (``MalformedError``);
  pjmedia would read 127.0.0.9 (``sdp.c:439`` stops at ``/``): a refusal, safe side,
  and no stack writes it.
- Session-level ``a=rtcp``: neither side reads it (pjmedia only ``rem_m``'s).
- Session and media directions: pjmedia moves a session ``sendonly``/``recvonly``/
  ``inactive`` to media sections without their own (``sdp.c:1347-1395``, ``apply_media_direction``), the view
  does the same; a session ``a=sendrecv`` is ignored by both.  (Read, and the
  ``session-space`` case of K1 was run.)
- ``a= inactive``, ``a=inactive<TAB>``, ``a=RTCP``, ``a=rtcp :N``: refused by
  ``_one_reading`` (white space / case).
- Port 0 (``m=video 0``): row port 0, pjmedia skips the stream (``stream_info.c:496,526``):
  agree (run in the Kamailio module's ``mixed-levels`` SDP; the phone not run).
- ``b=`` and ``k=`` lines: ``k=`` is a keying line (split and sealed, never viewed);
  ``b=`` is read by neither summary nor routing (pjmedia only for bandwidth).
- ``a=ptime``, ``a=maxptime``, BUNDLE (``a=group``/``a=mid``): not read by the view;
  they change no address or direction in pjmedia 2.15.1 (BUNDLE is not implemented
  there; read only).

Fixed (stop 42), K1, K2, K5: ``sdp._one_reading`` takes an attribute's name as pjmedia
does (the leading run of token characters) and refuses a viewed one (``rtcp``, the four
directions) that is not written exactly (a direction alone; ``rtcp`` followed by ``:``);
an ``a=rtcp`` address must be of its stream's type.  On the code before all nine hole
tests failed; now they pass (the proxy refuses such offers 400).
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


# -- K5: an a=rtcp address of another address type than the stream's c= -------------------

def test_hole_k5_rtcp_address_type_other_than_the_streams(pki, bob):
    rtp = _even_port()
    hidden = (HIDDEN, rtp + 3)
    sink = Sink((HOST, rtp), (HOST, rtp + 1), hidden)
    try:
        verdict, rows, answer, _ = _offer(
            pki, bob, _sdp(rtp, f"a=rtcp:{rtp + 3} IN IP6 ::ffff:{HIDDEN}\r\n"))
        counts = sink.collect(hidden)
    finally:
        sink.close()
    print(counts)
    assert _answered(answer), answer
    assert counts[hidden] > 0 and counts[(HOST, rtp + 1)] == 0, counts   # IPv4 RTCP to HIDDEN
    # secure: refused, or archived as the IPv4 address the phone sends to
    assert verdict.action == "reply" or [(r["rtcp_address"], r["rtcp_port"]) for r in rows] \
        == [hidden], rows


def test_control_k5_rtcp_of_another_family_the_phone_cannot_use_is_refused_by_it(pki, bob):
    """``a=rtcp:P IN IP6 ::1`` on an IP4 stream: the view archives ``::1``; bob's phone
    answers 488 (pjmedia cannot make an IPv4 address of it): no call, nothing hidden."""
    rtp = _even_port()
    verdict, rows, answer, media = _offer(pki, bob, _sdp(rtp, f"a=rtcp:{rtp + 3} IN IP6 ::1\r\n"))
    assert answer is not None and answer.startswith(b"SIP/2.0 488"), answer
    assert media == []
