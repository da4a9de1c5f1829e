"""A ``verify`` rule names a request's method and holds its responses too
(docs/protocol.md §5.1, "Meaning"): a plain, unsigned SDP answer under
``verify = INVITE:application/sdp`` cannot be answered 495, and being readable without
a key it is dropped by the host (review 135's observation, documented at stop 44)."""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, answer, invite, proxy_engine
from e2m_plugins.errors import SignatureRequiredError
from e2m_plugins.testpki import init_test_pki

SDP = ("INVITE:application/sdp",)


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def test_an_unsigned_plain_answer_under_verify_is_refused(world):
    proxy = proxy_engine(world, TRUSTED, view=SDP, verify=SDP)
    request = invite(world, call_id="verify-answer")
    assert proxy.inspect(request).code == 495          # the request: answered 495
    reading = proxy.read_response(answer(request))
    assert isinstance(reading.error, SignatureRequiredError)
    assert proxy.response_refused(reading)


def test_the_same_answer_under_view_alone_is_read_and_recorded(world):
    proxy = proxy_engine(world, TRUSTED, view=SDP)
    request = invite(world, call_id="view-answer")
    assert proxy.inspect(request).action == "forward"
    reading = proxy.read_response(answer(request))
    assert reading.error is None and not proxy.response_refused(reading) and reading.media
