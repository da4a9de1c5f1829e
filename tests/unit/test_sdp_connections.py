"""Two ``c=`` lines at one SDP level are refused (review 128 K1): a summary would name
one address while a stack may send to the other (pjmedia keeps the last; the phone half
is ``tests/pjsua/test_review128_two_connections_phone.py``)."""

from __future__ import annotations

import pytest

from e2m_lab.flows import SRTP_OFFER, TRUSTED, invite, known_proxy, proxy_engine, ua_engine
from e2m_plugins.errors import MalformedError
from e2m_plugins.sdp import media_summary
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)
MEDIA_TWICE = SRTP_OFFER.replace(b"a=rtpmap:0", b"c=IN IP4 127.0.0.1\r\nc=IN IP4 127.0.0.9\r\n"
                                 b"a=rtpmap:0", 1)
SESSION_TWICE = SRTP_OFFER.replace(b"t=0 0", b"c=IN IP4 127.0.0.9\r\nt=0 0", 1)


def test_the_offers_used_here_have_one_connection_line_each_level():
    assert media_summary(SRTP_OFFER)
    assert MEDIA_TWICE != SRTP_OFFER and SESSION_TWICE != SRTP_OFFER


@pytest.mark.parametrize("sdp, where", [(MEDIA_TWICE, "media section 0"),
                                        (SESSION_TWICE, "session level")])
def test_two_connection_lines_at_one_level_are_refused(sdp, where):
    with pytest.raises(MalformedError, match=where):
        media_summary(sdp)


def test_one_at_the_session_level_and_one_in_a_section_is_fine():
    both = SRTP_OFFER.replace(b"a=rtpmap:0", b"c=IN IP4 127.0.0.9\r\na=rtpmap:0", 1)
    assert [m.address for m in media_summary(both)] == ["127.0.0.9"]


def test_the_proxy_refuses_such_an_offer_before_anything_is_kept():
    pki = init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")
    proxy = proxy_engine(pki, TRUSTED, view=SDP_VIEW)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    verdict = proxy.inspect(alice.protect(invite(pki).with_body(MEDIA_TWICE)).message)
    assert (verdict.action, verdict.code, verdict.error) == ("reply", 400, "MalformedError")
    assert verdict.kept == () and not verdict.media
    honest = proxy.inspect(alice.protect(invite(pki, call_id="honest@x")).message)
    assert honest.action == "forward" and honest.media


# -- review 130: what else a stack could read otherwise ------------------------------

def _with(extra: bytes, where: bytes = b"a=rtpmap:0") -> bytes:
    return SRTP_OFFER.replace(where, extra + where, 1)


@pytest.mark.parametrize("sdp, why", [
    (_with(b"a=RTCP:5003\r\n"), "a=rtcp spelled"),                  # pjmedia ignores it
    (_with(b"a=rtcp :5003\r\n"), "a=rtcp spelled"),
    (_with(b"a=INACTIVE\r\n"), "a=inactive spelled"),
    (SRTP_OFFER.replace(b"t=0 0", b"t=0 0\r\na=Sendonly", 1), "a=sendonly spelled"),
    (_with(b"a=recvonly\r\na=sendonly\r\n"), "more than one direction"),
    (_with(b"a=rtcp:5003\r\na=rtcp:5005\r\n"), "more than one a=rtcp"),
    (SRTP_OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 127.0.0.011", 1), "plain IP"),
    (SRTP_OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 2130706441", 1), "plain IP"),
    (SRTP_OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 0x7f.0.0.1", 1), "plain IP"),
    (SRTP_OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 pbx.example.com", 1), "plain IP"),
    (SRTP_OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP6 127.0.0.1", 1), "plain IP"),
    (SRTP_OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP6 fe80::1%eth0", 1), "plain IP"),
    (_with(b"a=rtcp:5003 IN IP4 0x7f.0.0.9\r\n"), "plain IP"),
    # review 131: the name ends where pjmedia ends it (":", white space, ";", "/")
    (_with(b"a=sendonly:x\r\n"), "a=sendonly spelled"),
    (_with(b"a=inactive x\r\n"), "a=inactive spelled"),
    (_with(b"a=sendonly;x\r\n"), "a=sendonly spelled"),
    (_with(b"a=rtcp 5003 IN IP4 127.0.0.9\r\n"), "a=rtcp spelled"),
    (_with(b"a=rtcp\t5003\r\n"), "a=rtcp spelled"),
    (_with(b"a=rtcp:5003 IN IP6 ::ffff:127.0.0.9\r\n"), "another type"),
])
def test_an_sdp_a_stack_could_read_otherwise_is_refused(sdp, why):
    with pytest.raises(MalformedError, match=why):
        media_summary(sdp)


def test_the_plain_forms_are_read_and_the_rtcp_address_named():
    both = _with(b"a=rtcp:5003 IN IP4 127.0.0.9\r\na=sendonly\r\n")
    (line,) = media_summary(both)
    assert (line.direction, line.rtcp_port, line.rtcp_address) == ("sendonly", 5003, "127.0.0.9")
    v6 = SRTP_OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP6 2001:DB8:0:0::9", 1)
    assert [m.address for m in media_summary(v6)] == ["2001:DB8:0:0::9"]


@pytest.mark.parametrize("attribute", [b"a=rtcp-mux", b"a=rtcp-fb:* nack", b"a=extmap:1/sendonly x",
                                       b"a=sendrecv"])
def test_attributes_that_only_look_alike_are_read_as_before(attribute):
    assert media_summary(_with(attribute + b"\r\n"))
