"""Review 128, hole K1: two ``c=`` lines in one media section; the archive records the
first, the phone sends media to the second.

- Attacker: an **insider UA** (alice, a registered user) who wants her call's media to go
  somewhere the home proxy's archive (and any firewall fed from its view) does not name.
- Set-up: bob's real ``e2m-phone listen`` (pjsua2, SRTP, E2M required, answers by itself;
  review 126's fixture and ``_call`` helper); alice's offer from a plain UDP socket,
  protected by her own ``UAEngine`` exactly as her phone does (signed, sealed for bob,
  bound to the message).
- Message: an INVITE whose SDP media section has ``c=IN IP4 127.0.0.1`` then
  ``c=IN IP4 127.0.0.9`` (RFC 4566 allows several c= per section only for layered
  multicast; nothing here refuses two unicast ones).
- Observed (two runs): ``sdp.media_summary`` (what ``ProxyEngine._view``,
  ``e2m_plugins/proxy.py:655``, writes to the media row and the ``e2m media:`` log line)
  gives ``127.0.0.1``; bob's phone answers ``200`` and its ``call_media`` event says
  ``remote_rtp 127.0.0.9:49170``: pjmedia's SDP parser keeps the *last* ``c=`` of a
  section (each one overwrites ``media->conn``), the core the *first*.  The archived
  media address is not where the media goes.  (Shown through the engine's own summary
  function and the real phone; the Kamailio media row was not run for lack of time, but
  it is written from the same ``media`` tuple.)  The same mismatch is expected for two
  session-level ``c=`` lines (``sdp.py:365``), untried on the phone.
- Code at fault: ``e2m_plugins/sdp.py:347`` (``_media_line``: ``next(...)`` takes the
  first ``c=``) and ``:365`` (session level), with ``parse_lines`` (``sdp.py:179``)
  accepting any number of ``c=`` lines.
- Suggested fix: refuse (488 at the proxy, refused body at the phone) an SDP with more
  than one ``c=`` at session level or in one media section, before it is summarised or
  handed to pjsip; at the least read the last one, as pjmedia does.

Control (unmarked, passes): ``test_control_k1_one_connection_line_media_as_summarised``:
the same offer with its one session-level ``c=``: 200 and media at the summarised
address, so the harness and the phone's media event are live.

Fixed (stop 42), K1: ``sdp.media_summary`` refuses more than one ``c=`` line at the
session level or in one media section (``MalformedError``), so a proxy that views SDP
refuses such an offer 400 before anything is archived or relayed
(``tests/unit/test_sdp_connections.py``).  The hole test now asserts that refusal, and
still shows live why it is needed: bob's phone, reached without that proxy, sends to the
last ``c=``.  The phone itself is left as it is (with no proxy viewing there is no
archive to mislead).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER, ua_engine
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import UdpStranger
from e2m_plugins.errors import MalformedError
from e2m_plugins.sdp import media_summary
from e2m_plugins.testpki import TestPKI, init_test_pki
from tests.pjsua.test_review126_inner_multipart_phone import _alices_invite, _call

pytestmark = [pytest.mark.pjsua2]

ARCHIVED = "127.0.0.1"       # the first c= of the media section: what the proxy records
HIDDEN = "127.0.0.9"         # the second: where the media goes
TWO_C = SRTP_OFFER.replace(b"a=rtpmap:0", f"c=IN IP4 {ARCHIVED}\r\nc=IN IP4 {HIDDEN}\r\n"
                           "a=rtpmap:0".encode(), 1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review128-pki"),
                         users=("alice", "bob", "carol"), key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _offer(pki, bob, peer, sdp: bytes):
    plain = _alices_invite(pki, bob, peer).with_body(sdp)
    alice = ua_engine(pki, "alice", peers=("bob",))
    return _call(pki, bob, peer, alice.protect(plain).message, plain)


def test_hole_k1_two_connection_lines_media_goes_where_the_archive_does_not_say(pki, bob):
    # secure (stop 42): no summary is made of such an offer, so a proxy that views SDP
    # refuses it (tests/unit/test_sdp_connections.py: the engine answers 400) ...
    with pytest.raises(MalformedError, match="more than one c= line"):
        media_summary(TWO_C)
    # ... because a real phone reached without that proxy sends to the last one, which
    # no first-line summary names (this half is the reason, asserted live)
    peer = UdpStranger(bob.port)
    try:
        answer, media = _offer(pki, bob, peer, TWO_C)
    finally:
        peer.close()
    print(answer[:40] if answer else answer, media)
    assert answer is not None and answer.startswith(b"SIP/2.0 200"), answer
    assert media and all(rtp.startswith(HIDDEN + ":") for rtp in media), media


def test_control_k1_one_connection_line_media_as_summarised(pki, bob):
    one_c = SRTP_OFFER
    summary = [m.address for m in media_summary(one_c)]
    peer = UdpStranger(bob.port)
    try:
        answer, media = _offer(pki, bob, peer, one_c)
    finally:
        peer.close()
    print(summary, answer[:40] if answer else answer, media)
    assert answer is not None and answer.startswith(b"SIP/2.0 200"), answer
    assert media and all(rtp.startswith(summary[0] + ":") for rtp in media), media
