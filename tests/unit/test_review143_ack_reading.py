"""Review 143: honest E2M late-offer ACKs read as ``kemi.readable_ack`` reads them
(review 141's fix: ``check_readable``, then ``read_response`` and ``response_refused``;
a refused one is dropped on the wire).  No honest ACK tried is refused: controls only.
The review's account is in ``tests/kamailio/test_review143_ack_wire.py``.

alice (``ua_engine``) INVITEs bob without SDP through the home proxy (``proxy_engine``);
bob's 200 offers (read by the proxy as a response), and alice's ACK carries the answer,
protected by her engine for what she knows of the proxy.  Each case asserts that the
reading the Kamailio adapter asks for would relay the ACK, and that bob opens what the
proxy relays.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SDP_ANSWER, SDP_OFFER, SRTP_OFFER, TRUSTED, answer, apply_forward,
                           invite, known_proxy, proxy_engine, ua_engine)
from e2m_plugins.sip import RequestLine
from e2m_plugins.testpki import init_test_pki

SDP = ("INVITE:application/sdp",)


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


# (the proxy's view, its verify, what alice knows of it (None: nothing), the answer)
CASES = {
    "view, alice knows it": (SDP, (), (SDP, ()), SDP_OFFER),
    "view, alice does not know it": (SDP, (), None, SDP_OFFER),
    "verify only": ((), SDP, ((), SDP), SDP_OFFER),
    "view and verify": (SDP, SDP, (SDP, SDP), SDP_OFFER),
    "explicit ACK rule": (SDP + ("ACK:application/sdp",), (),
                          (SDP + ("ACK:application/sdp",), ()), SDP_OFFER),
    "SRTP, split SDP": (SDP, (), (SDP, ()), SRTP_OFFER),
}


@pytest.mark.parametrize("case", list(CASES))
def test_control_an_honest_late_offer_ack_is_not_dropped(pki, case):
    view, verify, known, sdp = CASES[case]
    proxy = proxy_engine(pki, TRUSTED, view=view, verify=verify)
    proxies = (known_proxy(pki, TRUSTED, *known),) if known is not None else ()
    alice = ua_engine(pki, "alice", proxies=proxies)
    bob = ua_engine(pki, "bob", proxies=proxies)
    call_id = "r143-" + case.replace(" ", "-").replace(",", "")
    sent = alice.protect(invite(pki, call_id=call_id).with_body(b"")).message
    delivered = apply_forward(sent, proxy.inspect(sent))
    ok = bob.protect(answer(bob.open(delivered).message, SDP_ANSWER)).message
    reading = proxy.read_response(ok)
    assert not proxy.response_refused(reading), reading.error
    proxy.inspect(ok, reading=reading)
    alice.open(ok)

    ack = invite(pki, sdp, call_id=call_id, to_tag=ok.to_tag, method="ACK")
    ack = alice.protect(ack.with_start_line(RequestLine("ACK", "sip:bob@127.0.0.1:5062"))).message
    assert sdp not in ack.body                       # protected, not plaintext
    proxy.check_readable(ack)
    read = proxy.read_response(ack)
    assert not proxy.response_refused(read), (case, read.error)      # relayed, not dropped
    verdict = proxy.inspect(ack)
    if known is None:                                # sealed for bob only: the known limit
        assert type(read.error).__name__ == "ProxyCannotDecryptError" and not read.media
    else:
        assert read.error is None and len(read.media) == 1 and verdict.action == "forward"
    assert bob.open(apply_forward(ack, verdict)).message.body == sdp
