"""Review 28's lead, in memory: a request refused after the proxy kept its keys.

The reviewer read (not reported as a hole: only the sender's own quota pays) that an
insider's signed INVITE whose SDP the proxy cannot summarise is refused (400) after
``_keep_keys`` ran: the offer key stayed 200 s although the INVITE never went on, and
the keys it used were spent.  Seen failing on ``4518507``: the cache held the key.
Now the SDP is summarised before anything is kept or spent.
"""

from __future__ import annotations

import pytest

import os

from e2m_lab.flows import SDP_OFFER, TRUSTED, invite, proxy_engine
from e2m_plugins.body import protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate

SDP_VIEW = ("INVITE:application/sdp",)


@pytest.fixture(scope="module")
def world():
    from e2m_plugins.testpki import init_test_pki
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _offer(world, sdp: bytes, call_id: str):
    request = invite(world, b"", call_id=call_id)
    alice = world.user("alice")
    part, _ = protect_content("application/sdp", sdp,
                              [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                              signer=(alice.cert, alice.key), cek_reference=os.urandom(16),
                              bind_to=request, readers=[TRUSTED])
    return with_entity(request, part)


@pytest.mark.parametrize("sdp", [
    SDP_OFFER.replace(b"m=audio 49170", b"m=audio 99999"),       # port out of range
    SDP_OFFER.replace(b"c=IN IP4", b"c=IN"),                       # malformed c= line
])
def test_hole_a_refused_offer_keeps_no_key(world, sdp):
    """Insider UA (her own UA refuses such SDP; she builds the body herself): an offer
    that names a key for the proxy to keep, signed, with SDP the proxy cannot read."""
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    sent = _offer(world, sdp, "bad-sdp@x")
    verdict = proxy.inspect(sent)
    assert verdict.action == "reply" and verdict.code == 400, verdict
    assert len(proxy.cache) == 0 and verdict.kept == ()


def test_control_the_same_offer_with_good_sdp_keeps_its_key(world):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    sent = _offer(world, SDP_OFFER, "good-sdp@x")
    verdict = proxy.inspect(sent)
    assert verdict.action == "forward" and len(proxy.cache) == 1 and verdict.kept
