"""Review 131: honest SDP from real stacks through a real Kamailio E2M proxy that views
SDP (controls for the "honest breaks" question of stop 42's ``_one_reading``).

Set-up: a home proxy per test (``proxy_factory``: real Kamailio via ``e2m-proxy``,
views ``INVITE:application/sdp``, SQLite archive); bob is ``raw_uas`` registered there
(SIPp REGISTER), answering with his own ``UAEngine`` (``bob_answers``); alice's
``UAEngine`` knows the proxy as an SDP reader and protects an INVITE whose SDP is the
one a real stack writes; SIPp sends it to the proxy and runs the dialog (INVITE, 200,
ACK, BYE).  Each offer is answered with another stack's answer, so both the request's
and the 200's SDP go through ``media_summary`` inside Kamailio.  The SDPs are written
from what those stacks send (transcribed from captures and their documentation, not
captured here; SRTP keys are SDES ``a=crypto`` so the split keys path runs, WebRTC's
DTLS fingerprint stays in the view): Chrome (``c=IN IP4 0.0.0.0``, ``a=rtcp:9 IN IP4
0.0.0.0``, BUNDLE, ``rtcp-mux``, audio and video; and after gathering, with
``a=candidate`` lines and an mDNS ``.local`` candidate), Firefox (no session ``c=``,
``a=extmap:2/recvonly``), Linphone over IPv6 (``c=IN IP6 ::1``, ``a=rtcp:7079``,
``a=rtcp-xr`` at the session level), Asterisk (``a=ptime``/``a=maxptime``),
FreeSWITCH (``a=rtcp:P IN IP4 A``), pjsua2 with ICE (``b=AS``/``b=TIAS``, ``a=X-nat``,
``a=rtcp:P IN IP4 A``, candidates), pjsua2 over IPv6 (``a=rtcp:P IN IP6 ::1``), a
pjsua2 RFC 2543 hold (``c=IN IP4 0.0.0.0``, ``a=sendonly``), IPv4 and IPv6 multicast
(``c=IN IP4 224.2.17.12/127``, ``c=IN IP6 FF15::101``, ``a=recvonly``), and ``c=``
and a direction at both levels with a rejected (port 0) video stream.

Each passes: 200 at alice, the archive has one media row per ``m=`` of the offer and
of the answer with the addresses, ports, directions and RTCP the SDP says (the rule
of stop 42 refused none of them).  No honest break was found in this set.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.sipp import register, send_with_sipp
from e2m_plugins.sdp import media_summary, separate_keys
from tests.kamailio.test_flows_wire import bob_answers

pytestmark = [pytest.mark.kamailio, pytest.mark.sipp]

SDP_VIEW = ("INVITE:application/sdp",)

CRYPTO = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n"
FP = "a=fingerprint:sha-256 D7:5B:8E:3F:12:0A:6C:91:7E:2B:44:19:C3:A8:5D:60:0F:E1:77:93:2C:4B:8A:16:D0:39:E5:7F:21:AC:68:B4\r\n"
def crlf(s): return ("\r\n".join(l.strip() for l in s.strip().splitlines()) + "\r\n")
CHROME = crlf("""v=0
o=- 4611731400430051336 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=extmap-allow-mixed
a=msid-semantic: WMS 3c8f
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:EsAw
a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y
a=ice-options:trickle
""") + FP + crlf("""a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=sendrecv
a=msid:3c8f 1b1c
a=rtcp-mux
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=fmtp:63 111/111
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:13 CN/8000
a=rtpmap:110 telephone-event/48000
a=rtpmap:126 telephone-event/8000
a=ssrc:1001 cname:abcdEFGH
a=ssrc:1001 msid:3c8f 1b1c
m=video 9 UDP/TLS/RTP/SAVPF 96 97
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:EsAw
a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y
a=ice-options:trickle
""") + FP + crlf("""a=setup:actpass
a=mid:1
a=extmap:14 urn:ietf:params:rtp-hdrext:toffset
a=sendrecv
a=msid:3c8f 2d2e
a=rtcp-mux
a=rtcp-rsize
a=rtpmap:96 VP8/90000
a=rtcp-fb:96 goog-remb
a=rtcp-fb:96 nack
a=rtcp-fb:96 nack pli
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
a=ssrc-group:FID 2001 2002
a=ssrc:2001 cname:abcdEFGH
a=ssrc:2002 cname:abcdEFGH
""")
# Chrome after gathering (a SIP gateway without trickle): c= names the default candidate
CHROME_GATHERED = CHROME.replace("c=IN IP4 0.0.0.0", "c=IN IP4 127.0.0.1", 1).replace(
    "m=audio 9 ", "m=audio 52000 ").replace("a=rtcp-mux\r\n", "a=rtcp-mux\r\na=candidate:842163049 1 udp 2122260223 127.0.0.1 52000 typ host generation 0 network-id 1 network-cost 10\r\na=candidate:1234567 1 udp 2122260223 3b2a9c1e-6f0d-4f5e-9d1a-0c7f2e6a8b11.local 52002 typ host generation 0\r\n", 1)
FIREFOX = crlf("""v=0
o=mozilla...THIS_IS_SDPARTA-99.0 5615240937405046032 0 IN IP4 0.0.0.0
s=-
t=0 0
""") + FP + crlf("""a=group:BUNDLE 0
a=ice-options:trickle
a=msid-semantic:WMS *
m=audio 9 UDP/TLS/RTP/SAVPF 109 9 0 8 101
c=IN IP4 0.0.0.0
a=sendrecv
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=extmap:2/recvonly urn:ietf:params:rtp-hdrext:csrc-audio-level
a=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid
a=fmtp:109 maxplaybackrate=48000;stereo=1;useinbandfec=1
a=fmtp:101 0-15
a=ice-pwd:8d0f3b2a1c4e5f6a7b8c9d0e1f2a3b4c
a=ice-ufrag:2f1e0d3c
a=mid:0
a=msid:{5ad6d9b1-3c1e-4a8e-9c2b-1d4f7e8a9b0c} {7e6f5d4c-3b2a-1908-f7e6-d5c4b3a29180}
a=rtcp-mux
a=rtpmap:109 opus/48000/2
a=rtpmap:9 G722/8000/1
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000/1
a=setup:actpass
a=ssrc:2655508255 cname:{6f2b1e0c-9a8d-4c7b-b6a5-948372615041}
""")
LINPHONE_V6 = crlf("""v=0
o=alice 1234 678 IN IP6 ::1
s=Talk
c=IN IP6 ::1
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
a=record:off
m=audio 7078 RTP/SAVP 96 97 0 8 101
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:101 telephone-event/8000
a=rtcp:7079
""") + CRYPTO + crlf("""a=rtcp-fb:* trr-int 1000
a=rtcp-fb:* ccm tmmbr
""")
ASTERISK = crlf("""v=0
o=- 1234 1236 IN IP4 127.0.0.1
s=Asterisk
c=IN IP4 127.0.0.1
t=0 0
m=audio 17014 RTP/SAVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
a=maxptime:150
a=sendrecv
""") + CRYPTO
FREESWITCH = crlf("""v=0
o=FreeSWITCH 1700000000 1700000001 IN IP4 127.0.0.1
s=FreeSWITCH
c=IN IP4 127.0.0.1
t=0 0
m=audio 24600 RTP/SAVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
a=sendrecv
a=rtcp:24601 IN IP4 127.0.0.1
""") + CRYPTO
PJSUA_ICE = crlf("""v=0
o=- 3912345678 3912345679 IN IP4 127.0.0.1
s=pjmedia
b=AS:84
t=0 0
a=X-nat:0
m=audio 4000 RTP/SAVP 0 101
c=IN IP4 127.0.0.1
b=AS:64
b=TIAS:64000
a=rtcp:4001 IN IP4 127.0.0.1
a=sendrecv
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ice-ufrag:2b2c6196
a=ice-pwd:06eb8c1a
a=candidate:H7f000001 1 UDP 2130706431 127.0.0.1 4000 typ host
a=candidate:H7f000001 2 UDP 2130706430 127.0.0.1 4001 typ host
""") + CRYPTO
PJSUA_V6 = crlf("""v=0
o=- 3912345678 3912345679 IN IP6 ::1
s=pjmedia
b=AS:84
t=0 0
a=X-nat:0
m=audio 4000 RTP/SAVP 0 101
c=IN IP6 ::1
b=TIAS:64000
a=rtcp:4001 IN IP6 ::1
a=sendrecv
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
""") + CRYPTO
PJSUA_HOLD_2543 = PJSUA_ICE.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0").replace(
    "a=rtcp:4001 IN IP4 127.0.0.1", "a=rtcp:4001 IN IP4 0.0.0.0").replace("a=sendrecv", "a=sendonly")
MULTICAST4 = crlf("""v=0
o=- 1 1 IN IP4 127.0.0.1
s=paging
c=IN IP4 224.2.17.12/127
t=0 0
m=audio 49230 RTP/AVP 0
a=recvonly
""")
MULTICAST6 = MULTICAST4.replace("c=IN IP4 224.2.17.12/127", "c=IN IP6 FF15::101")
MIXED_LEVEL = crlf("""v=0
o=- 1 1 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
a=sendrecv
m=audio 49170 RTP/SAVP 0
a=rtcp:49171
a=sendonly
m=video 0 RTP/SAVP 96
c=IN IP4 127.0.0.2
a=rtpmap:96 H264/90000
a=inactive
""") + CRYPTO
STACKS = {"chrome": CHROME, "chrome-gathered": CHROME_GATHERED, "firefox": FIREFOX,
          "linphone-ipv6": LINPHONE_V6, "asterisk": ASTERISK, "freeswitch": FREESWITCH,
          "pjsua-ice": PJSUA_ICE, "pjsua-ipv6": PJSUA_V6, "pjsua-hold-rfc2543": PJSUA_HOLD_2543,
          "multicast4": MULTICAST4, "multicast6": MULTICAST6, "mixed-levels": MIXED_LEVEL}

# each offer with the answer of another stack (both SDPs go through the proxy's view)
ANSWER_FOR = {"chrome": "freeswitch", "chrome-gathered": "asterisk", "firefox": "pjsua-ice",
              "linphone-ipv6": "pjsua-ipv6", "asterisk": "freeswitch", "freeswitch": "asterisk",
              "pjsua-ice": "pjsua-ice", "pjsua-ipv6": "linphone-ipv6",
              "pjsua-hold-rfc2543": "asterisk", "multicast4": "asterisk",
              "multicast6": "asterisk", "mixed-levels": "pjsua-ice"}


def _expected(sdp: str) -> list[tuple]:
    view, _ = separate_keys(sdp.encode())
    return [(m.media, m.address, m.port, m.direction, m.rtcp_address, m.rtcp_port)
            for m in media_summary(view)]


@pytest.mark.parametrize("offer", list(STACKS))
def test_control_honest_stack_sdp_through_a_viewing_kamailio(proxy_factory, sipp, raw_uas, pki,
                                                             tmp_path, offer):
    home_proxy = proxy_factory("home", e2m=True, view=SDP_VIEW)
    register(home_proxy, "bob", raw_uas.port, sipp)
    answer_sdp = STACKS[ANSWER_FOR[offer]]
    raw_uas.responder = bob_answers(ua_engine(pki, "bob"), raw_uas, answer_sdp.encode())
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    sent = alice.protect(invite(pki, STACKS[offer].encode())).message
    result = send_with_sipp(sipp, home_proxy.port, sent, workdir=tmp_path)
    assert result.rc == 0, result.output[-800:]
    assert raw_uas.wait_for(1, method="BYE")
    rows = home_proxy.media_rows()
    got = {d: [(r["media"], r["address"], r["port"], r["flow"], r["rtcp_address"],
                r["rtcp_port"]) for r in rows if r["call_id"] == sent.call_id
               and r["direction"] == d] for d in ("request", "response")}
    assert got == {"request": _expected(STACKS[offer]), "response": _expected(answer_sdp)}, got
