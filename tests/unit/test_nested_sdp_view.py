"""An SDP the view cannot see is not relayed under its rules (review 135 K2): a body
that nests ``application/sdp`` in a multipart the audience split does not take apart
(``multipart/alternative``, ``related``, a ``mixed`` inside the top ``mixed``), or nests
an S/MIME part there, is 415 for a request and refused (dropped by the host) as a
response: the rule review 126 set for a multipart inside an envelope
(``body.refuse_hidden_parts``), now for one in the clear too.  pjsip takes the SDP part of any
``multipart/*`` body; the proxy would have recorded no media for it."""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, SDP_VIEW, TRUSTED, answer, invite, \
    known_proxy, message, proxy_engine, ua_engine
from e2m_plugins.errors import UnsupportedMediaTypeError
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki

_B = "nest"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _wrap(subtype: str, inner_type: str, inner: bytes, boundary: str = _B) -> bytes:
    return (f"--{boundary}\r\nContent-Type: {inner_type}\r\n\r\n".encode() + inner
            + f"\r\n--{boundary}--\r\n".encode())


NESTINGS = {
    "alternative": ("multipart/alternative;boundary=nest",
                    _wrap("alternative", "application/sdp", SDP_OFFER)),
    "related": ("multipart/related;boundary=nest",
                _wrap("related", "application/sdp", SDP_OFFER)),
    "mixed-in-mixed": ("multipart/mixed;boundary=out",
                       _wrap("mixed", "multipart/mixed;boundary=nest",
                             _wrap("mixed", "application/sdp", SDP_OFFER), "out")),
    "alternative-in-mixed": ("multipart/mixed;boundary=out",
                             _wrap("mixed", "multipart/alternative;boundary=nest",
                                   _wrap("alternative", "application/sdp", SDP_OFFER), "out")),
}


@pytest.mark.parametrize("nesting", sorted(NESTINGS))
def test_a_nested_offer_sdp_is_415(world, nesting):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    content_type, body = NESTINGS[nesting]
    verdict = proxy.inspect(invite(world, body, call_id=f"n-{nesting}").with_body(body, content_type))
    assert verdict.action == "reply" and verdict.code == 415, verdict
    assert not verdict.media


@pytest.mark.parametrize("nesting", sorted(NESTINGS))
def test_a_nested_answer_sdp_is_refused(world, nesting):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    content_type, body = NESTINGS[nesting]
    request = invite(world, call_id=f"a-{nesting}")
    proxy.inspect(request)
    reply = answer(request).with_body(body.replace(SDP_OFFER, SDP_ANSWER), content_type)
    reading = proxy.read_response(reply)
    assert isinstance(reading.error, UnsupportedMediaTypeError)
    assert proxy.response_refused(reading)


def test_an_smime_part_nested_in_alternative_is_refused(world):
    """An envelope the top split does not reach is a part closed to the view."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    sealed = alice.protect(invite(world, call_id="inner-env")).message
    inner = f"{sealed.get('Content-Type')}"
    body = _wrap("alternative", inner, sealed.body)
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    verdict = proxy.inspect(sealed.with_body(body, "multipart/alternative;boundary=nest"))
    assert verdict.action == "reply" and verdict.code == 415, verdict


def test_controls_a_top_sdp_and_an_alternative_without_sdp_pass(world):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW + ("MESSAGE:text/plain",))
    content_type, body = NESTINGS["mixed-in-mixed"]
    flat = _wrap("mixed", "application/sdp", SDP_OFFER)
    verdict = proxy.inspect(invite(world, call_id="flat").with_body(
        flat, "multipart/mixed;boundary=nest"))
    assert verdict.action == "forward" and verdict.error is None and verdict.media
    text = (f"--{_B}\r\nContent-Type: text/plain\r\n\r\nhi\r\n--{_B}\r\n"
            f"Content-Type: text/html\r\n\r\n<p>hi</p>\r\n--{_B}--\r\n").encode()
    verdict = proxy.inspect(message(world).with_body(text, "multipart/alternative;boundary=nest"))
    assert verdict.action == "forward" and verdict.error is None


def test_no_rule_for_the_method_reads_nothing(world):
    """A proxy whose rules do not cover INVITE forwards the nesting unread, as before."""
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:text/plain",))
    content_type, body = NESTINGS["alternative"]
    verdict = proxy.inspect(invite(world, call_id="norule").with_body(body, content_type))
    assert verdict.action == "forward" and verdict.error is None
