"""SDP split for the proxy (flow F), media summary, consistency, robustness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2m_plugins.errors import E2MError, LimitExceededError, MalformedError
from e2m_plugins.sdp import (
    consistent,
    has_keys,
    media_summary,
    parse_lines,
    split_for_proxy,
)

KEY1 = "inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:32"
KEY2 = "inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32"
MIKEY = "mikey AQAFgM0XflABAAAAAAAAAAAAAAsAyONQ6gAAAAAAAAAAAAAAAAABAAAAAA"

# SRTP with SDES at media level and MIKEY at session level (RFC 4568, RFC 4567).
SRTP_SDP = (
    "v=0\r\n"
    "o=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\n"
    "s=-\r\n"
    "c=IN IP4 192.0.2.10\r\n"
    "t=0 0\r\n"
    f"a=key-mgmt:{MIKEY}\r\n"
    "m=audio 49170 RTP/SAVP 0 96\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
    "a=fmtp:96 useinbandfec=1\r\n"
    f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY1}\r\n"
    f"a=crypto:2 AES_CM_128_HMAC_SHA1_32 {KEY2}\r\n"
    "a=rtcp:49171\r\n"
    "a=candidate:1 1 UDP 2130706431 192.0.2.10 49170 typ host\r\n"
    "a=sendrecv\r\n"
    "m=video 51372 RTP/SAVP 31 97\r\n"
    "c=IN IP6 2001:db8::10\r\n"
    "a=rtpmap:97 H264/90000\r\n"
    f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 {KEY1}\r\n"
    "a=recvonly\r\n"
).encode()

SECRETS = [KEY1.encode(), KEY2.encode(), MIKEY.encode(), b"inline:", b"mikey"]


def _text_lines(data: bytes) -> list[str]:
    return data.decode().splitlines()


def test_split_removes_all_key_material() -> None:
    split = split_for_proxy(SRTP_SDP)
    assert split.end_to_end == SRTP_SDP
    for secret in SECRETS:
        assert secret not in split.proxy_view
    assert b"a=crypto" not in split.proxy_view and b"a=key-mgmt" not in split.proxy_view
    # Everything else is kept, byte for byte and in order.
    kept = [line for line in _text_lines(SRTP_SDP)
            if not line.startswith(("a=crypto", "a=key-mgmt"))]
    assert _text_lines(split.proxy_view) == kept
    assert split.proxy_view.endswith(b"a=recvonly\r\n")


def test_proxy_view_keeps_ports_and_codecs() -> None:
    split = split_for_proxy(SRTP_SDP)
    assert media_summary(split.proxy_view) == media_summary(SRTP_SDP)
    assert consistent(split.proxy_view, split.end_to_end)
    assert not has_keys(split.proxy_view) and has_keys(SRTP_SDP)


def test_k_lines_and_configured_attributes() -> None:
    sdp = (b"v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nk=clear:secret-session\nt=0 0\n"
           b"m=audio 4000 RTP/AVP 0\nk=base64:c2VjcmV0\na=ice-pwd:asd88fgpdd777uzjYhagZg\n"
           b"a=ice-ufrag:8hhY\n")
    split = split_for_proxy(sdp, keying_attributes=("crypto", "key-mgmt", "ICE-PWD"))
    assert split.proxy_view == (b"v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nt=0 0\n"
                                b"m=audio 4000 RTP/AVP 0\na=ice-ufrag:8hhY\n")
    assert b"ice-pwd" in split_for_proxy(sdp).proxy_view  # not keying by default
    assert consistent(split.proxy_view, sdp, keying_attributes=("ice-pwd",))


def test_consistent_detects_differences() -> None:
    view = split_for_proxy(SRTP_SDP).proxy_view
    assert not consistent(view.replace(b"49170", b"49180", 1), SRTP_SDP)
    assert not consistent(view.replace(b" 0 96", b" 96", 1), SRTP_SDP)
    assert not consistent(view.replace(b"a=recvonly\r\n", b""), SRTP_SDP)
    # Line ends do not matter; a proxy view that still holds keys is a leak, not a mismatch.
    assert consistent(view.replace(b"\r\n", b"\n"), SRTP_SDP)
    assert consistent(SRTP_SDP, SRTP_SDP)


def test_media_summary_two_streams() -> None:
    audio, video = media_summary(SRTP_SDP)
    assert (audio.media, audio.address, audio.address_type) == ("audio", "192.0.2.10", "IP4")
    assert (audio.port, audio.port_count, audio.proto) == (49170, 1, "RTP/SAVP")
    assert audio.formats == ("0", "96")
    assert audio.codec_names == {"0": "PCMU/8000", "96": "opus/48000/2"}
    assert (audio.rtcp_port, audio.rtcp_address, audio.direction) == (49171, "192.0.2.10",
                                                                      "sendrecv")
    assert (video.media, video.address, video.address_type) == ("video", "2001:db8::10", "IP6")
    assert (video.port, video.formats) == (51372, ("31", "97"))
    assert video.codecs == (("31", "H261/90000"), ("97", "H264/90000"))
    assert video.direction == "recvonly" and video.rtcp_port is None


def test_media_summary_details() -> None:
    sdp = (b"v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nt=0 0\r\na=sendonly\r\n"
           b"m=audio 5000/2 RTP/AVP 8\r\nc=IN IP4 233.252.0.1/127/2\r\n"
           b"a=rtcp:5010 IN IP4 198.51.100.9\r\n"
           b"m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n")
    audio, data = media_summary(sdp)
    assert (audio.address, audio.port_count, audio.direction) == ("233.252.0.1", 2, "sendonly")
    assert audio.codecs == (("8", "PCMA/8000"),)
    assert (audio.rtcp_port, audio.rtcp_address) == (5010, "198.51.100.9")
    assert data.address is None and data.codecs == () and data.formats == ("webrtc-datachannel",)


@pytest.mark.parametrize("sdp,error", [
    (b"", MalformedError),
    (b"\r\n\r\n", MalformedError),
    (b"o=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\n", MalformedError),        # no v=
    (b"v=1\r\n", MalformedError),
    (b"v=0\r\ns=\xff\xfe\r\n", MalformedError),                      # not UTF-8
    (b"v=0\r\nhello world\r\n", MalformedError),
    (b"v=0\r\nV=0\r\n", MalformedError),
    (b"v=0\r\ns=a\rb\r\n", MalformedError),                          # lone CR
    (b"v=0\r\ns=a\x00\r\n", MalformedError),
    (b"v=0\r\nm=audio\r\n", MalformedError),                         # bad m= lines
    (b"v=0\r\nm=audio 4000 RTP/AVP\r\n", MalformedError),
    (b"v=0\r\nm=audio port RTP/AVP 0\r\n", MalformedError),
    (b"v=0\r\nm=audio 70000 RTP/AVP 0\r\n", MalformedError),
    (b"v=0\r\nm=audio 4000/0 RTP/AVP 0\r\n", MalformedError),
    (b"v=0\r\nc=IN IP4\r\n", MalformedError),
    (b"v=0\r\n" + b"a=x\r\n" * 50, LimitExceededError),
])
def test_malformed(sdp: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        split_for_proxy(sdp, max_bytes=200)


def test_bad_rtcp_and_media_count() -> None:
    with pytest.raises(MalformedError):
        media_summary(b"v=0\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:port\r\n")
    with pytest.raises(LimitExceededError):
        parse_lines(b"v=0\r\n" + b"m=audio 4000 RTP/AVP 0\r\n" * 65)
    with pytest.raises(TypeError):
        split_for_proxy(SRTP_SDP, keying_attributes="crypto")


def test_lf_only_and_missing_final_newline() -> None:
    sdp = b"v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nt=0 0\nm=audio 4000 RTP/AVP 0\na=crypto:1 x"
    split = split_for_proxy(sdp)
    assert split.proxy_view == sdp[:sdp.index(b"a=crypto")]
    assert [line.media_index for line in parse_lines(sdp)] == [None] * 4 + [0, 0]


# -- properties -----------------------------------------------------------------------

_sdp_lines = st.lists(st.sampled_from([
    "o=- 1 1 IN IP4 192.0.2.1", "s=-", "c=IN IP4 192.0.2.1", "c=IN IP6 ::1/3", "t=0 0",
    "m=audio 4000 RTP/AVP 0 8", "m=video 0 RTP/SAVP 96", "m=audio 1/2 RTP/AVP 0",
    "a=rtpmap:96 VP8/90000", "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:KEY",
    "a=key-mgmt:mikey KEY", "k=clear:KEY", "a=rtcp:4001", "a=rtcp:x", "a=sendonly", "",
    "m=bad", "x", "a=Crypto:2 y inline:KEY", "c=IN", "\u00e9=1", "s=\u00e9"]),
    max_size=20)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 _sdp_lines.map(lambda lines: "\r\n".join(["v=0", *lines]).encode())))
def test_parsers_raise_only_typed_errors(data: bytes) -> None:
    try:
        split = split_for_proxy(data)
    except E2MError:
        return
    # Whatever parses splits cleanly: no keys left, consistent, same media.
    assert b"KEY" not in split.proxy_view
    assert consistent(split.proxy_view, split.end_to_end)
    try:
        assert media_summary(split.proxy_view) == media_summary(data)
    except MalformedError:  # e.g. a bad a=rtcp line, found by the summary only
        pass
