"""SDP keys separated for the proxy (flow F) and put back by the peer, media summary,
robustness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2m_plugins.errors import E2MError, InconsistentSplitError, LimitExceededError, MalformedError
from e2m_plugins.sdp import (
    SdpKeys,
    has_keys,
    media_summary,
    merge_keys,
    parse_lines,
    separate_keys,
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


def _sections(data: bytes) -> list[tuple[int | None, list[str]]]:
    """Each section's lines, sorted: the order of attributes in a section is free."""
    out: dict[int | None, list[str]] = {}
    for line in parse_lines(data):
        if line.kind:
            out.setdefault(line.media_index, []).append(f"{line.kind}={line.value}")
    return [(k, sorted(v)) for k, v in out.items()]


def test_separate_removes_all_key_material() -> None:
    view, keys = separate_keys(SRTP_SDP)
    for secret in SECRETS:
        assert secret not in view
    assert b"a=crypto" not in view and b"a=key-mgmt" not in view
    # Everything else is kept, byte for byte and in order.
    kept = [line for line in _text_lines(SRTP_SDP)
            if not line.startswith(("a=crypto", "a=key-mgmt"))]
    assert _text_lines(view) == kept
    assert [section for section, _ in keys.lines] == [-1, 0, 0, 1]
    assert "inline" not in repr(keys) and "mikey" not in repr(keys)   # never in a log


def test_merge_puts_the_keys_back_into_the_sdp_the_proxy_read() -> None:
    view, keys = separate_keys(SRTP_SDP)
    merged = merge_keys(view, SdpKeys.decode(keys.encode()))
    assert _sections(merged) == _sections(SRTP_SDP)
    assert media_summary(merged) == media_summary(view) == media_summary(SRTP_SDP)
    assert not has_keys(view) and has_keys(merged)
    assert separate_keys(merged)[0] == view


def test_k_lines_and_configured_attributes() -> None:
    sdp = (b"v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nk=clear:secret-session\nt=0 0\n"
           b"m=audio 4000 RTP/AVP 0\nk=base64:c2VjcmV0\na=ice-pwd:asd88fgpdd777uzjYhagZg\n"
           b"a=ice-ufrag:8hhY\n")
    keying = ("crypto", "key-mgmt", "ICE-PWD")
    view, keys = separate_keys(sdp, keying_attributes=keying)
    assert view == (b"v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nt=0 0\n"
                    b"m=audio 4000 RTP/AVP 0\na=ice-ufrag:8hhY\n")
    assert b"ice-pwd" in separate_keys(sdp)[0]  # not keying by default
    merged = merge_keys(view, keys, keying_attributes=keying)
    assert _sections(merged) == _sections(sdp)
    # k= goes before the section's first a= line, as RFC 4566 orders them
    assert merged.index(b"k=base64") < merged.index(b"a=ice-ufrag")


@pytest.mark.parametrize("section,line", [
    (0, "c=IN IP4 203.0.113.66"),            # another address for the peer than the proxy saw
    (0, "a=sendonly"),                       # another direction
    (0, "m=audio 5000 RTP/SAVP 0"),          # another stream
    (5, "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:KEY"),   # a section the SDP lacks
    (0, "not a line"),
])
def test_sealed_keys_cannot_change_the_session(section: int, line: str) -> None:
    """The peer gets exactly the SDP the proxy read, plus keying lines: a sender who
    shows the proxy one session cannot give the peer another (issue 12, item 7)."""
    view, _ = separate_keys(SRTP_SDP)
    with pytest.raises(InconsistentSplitError):
        merge_keys(view, SdpKeys(((section, line),)))


def test_a_view_that_holds_keys_is_refused() -> None:
    _, keys = separate_keys(SRTP_SDP)
    with pytest.raises(InconsistentSplitError):
        merge_keys(SRTP_SDP, keys)


@pytest.mark.parametrize("data", [
    b"", b"\x30\x00", b"\x30\x03\x02\x01\x00",
    b"\x30\x08\x30\x06\x02\x01\x40\x0c\x01x",                 # section 64
    b"\x30\x07\x30\x05\x02\x01\x00\x0c\x00",                   # empty line
])
def test_sdp_keys_decode_refuses_what_is_not_one(data: bytes) -> None:
    with pytest.raises(MalformedError):
        SdpKeys.decode(data)


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
        separate_keys(sdp, max_bytes=200)


def test_bad_rtcp_and_media_count() -> None:
    with pytest.raises(MalformedError):
        media_summary(b"v=0\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:port\r\n")
    with pytest.raises(LimitExceededError):
        parse_lines(b"v=0\r\n" + b"m=audio 4000 RTP/AVP 0\r\n" * 65)
    with pytest.raises(TypeError):
        separate_keys(SRTP_SDP, keying_attributes="crypto")


def test_lf_only_and_missing_final_newline() -> None:
    sdp = b"v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nt=0 0\nm=audio 4000 RTP/AVP 0\na=crypto:1 x"
    view, _ = separate_keys(sdp)
    assert view == sdp[:sdp.index(b"a=crypto")]
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
        view, keys = separate_keys(data)
    except E2MError:
        return
    # Whatever parses separates cleanly: no keys left, and they go back where they were.
    assert b"KEY" not in view
    merged = merge_keys(view, SdpKeys.decode(keys.encode()) if keys.lines else keys)
    assert _sections(merged) == _sections(data)
    try:
        assert media_summary(view) == media_summary(data)
    except MalformedError:  # e.g. a bad a=rtcp line, found by the summary only
        pass
