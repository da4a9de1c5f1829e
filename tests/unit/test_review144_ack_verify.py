"""Review 144 (attacker's review of aa004e9): a late offer's answer in the ACK under a
``verify`` rule, in the engines (``ProxyEngine.read_response``/``response_refused``, what
``kemi.readable_ack`` asks, and ``UAEngine.open``, what an E2M callee takes).

Set-up: a home proxy with ``view`` and ``verify = INVITE:application/sdp``; alice (the
insider caller) sends an INVITE without SDP; bob (an E2M phone's engine, knowing that
proxy) offers in his signed, bound 200 sealed for alice and the proxy, which the proxy
reads (no error, one media line); alice's ACK carries the answer on ``127.0.0.9``.  The
wire half of this review is ``tests/kamailio/test_review144_answers_wire.py``.

No hole was confirmed.  Controls (unmarked, pass):

- ``test_control_an_honest_ack_answer_is_read_under_verify``: alice's engine protects
  the ACK (sealed under the dialog key for bob and the proxy, signed and bound): the
  proxy reads it without error (media ``127.0.0.9:49170``) and bob takes it.
- ``test_control_a_plain_unsigned_ack_answer_is_dropped``: the same SDP in the clear:
  ``SignatureRequiredError`` and ``response_refused`` True, so ``readable_ack`` drops it
  (review 141's fix covers the verify rule too); bob refuses it (``DowngradeError``).
- ``test_control_an_answer_signed_by_another_user_is_refused_by_the_phone``: sealed for
  bob and the proxy, signed by carol: the proxy's reading fails (no signed SIP context
  for the ACK) but it is sealed whole, so it would be relayed (``response_refused``
  False); bob's engine refuses it strict or lax (``UntrustedSignerError``: the
  signature is not the sender's).
- ``test_control_an_unsigned_sealed_answer_is_refused_by_a_default_phone``: sealed for
  bob and the proxy, no signature, no SIP context: bob's default engine refuses it
  (``require_signature``).

Observation (not claimed as a hole, asserted in that last control as what happens
today): the proxy *opens* that unsigned sealed answer (its reading fails with
``SignatureRequiredError``, after ``open_part`` succeeded), yet ``response_refused`` is
False (nothing in it is readable without a key), so by the code the ACK is relayed,
counted in ``e2m_acks_unread`` and not recorded (``kamailio_app/kemi.py:2185-2203``,
``readable_ack``, returns it; ``inspect_only`` at ``:2158-2176`` counts the 495 verdict
and archives nothing, as its ``seen`` is empty; read, not run on the wire here); a phone with ``[e2m] require_signature = false``
(``bob_lax`` here) takes its SDP (``127.0.0.9:49174``).  The same insider gets the same
end through the documented limit (``docs/threat-model.md`` "Still open": an ACK sealed
whole for the callee alone, signed and bound, is relayed and taken by any phone), so
nothing new is gained; but here the proxy had the plaintext in hand.  Suggested
hardening: in ``readable_ack`` (and ``read_reply``) record the media of parts that
opened before the policy or signature check failed, or drop an ACK whose failure is
anything but ``ProxyCannotDecryptError``.

Left as it is (stop 45): dropping every ACK or response whose body the proxy opened
and then refused for its signature would also drop a callee's honest answer whenever
the proxy lacks the signer's anchor; the insider gains nothing he does not have by
sealing for the callee alone.  Noted in the stop's report.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, TRUSTED, answer, known_proxy, proxy_engine, \
    ua_engine
from e2m_plugins.body import protect_content
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.errors import DowngradeError, SignatureRequiredError, UntrustedSignerError, \
    E2MError
from e2m_plugins.sdp import media_summary
from e2m_plugins.sip import SipMessage, make_request

VIEW = ("INVITE:application/sdp",)
MOVED = SDP_OFFER.replace(b"127.0.0.1", b"127.0.0.9")


@pytest.fixture
def call(pki):
    """The late-offer call up to bob's 200 (read by the proxy, opened by alice)."""
    proxy = proxy_engine(pki, TRUSTED, view=VIEW, verify=VIEW)
    reader = known_proxy(pki, TRUSTED, VIEW, VIEW)
    alice = ua_engine(pki, "alice", proxies=(reader,))
    bob = ua_engine(pki, "bob", proxies=(reader,))
    invite = make_request("INVITE", f"sip:bob@{pki.domain}", from_uri=pki.aor("alice"),
                          to_uri=pki.aor("bob"), call_id="r144", from_tag="a1",
                          extra_headers=[("Contact", "<sip:alice@127.0.0.1:5061>")])
    sent = alice.protect(invite).message
    assert proxy.inspect(sent).action == "forward"
    ok = bob.protect(answer(bob.open(sent).message, SDP_ANSWER, to_tag="b1")).message
    reading = proxy.read_response(ok)
    assert reading.error is None and len(reading.media) == 1
    proxy.inspect(ok, reading=reading)
    alice.open(ok)
    return pki, proxy, alice, bob


def _ack(pki, body: bytes = MOVED, content_type: str = "application/sdp") -> SipMessage:
    return make_request("ACK", "sip:bob@127.0.0.1:5062", from_uri=pki.aor("alice"),
                        to_uri=pki.aor("bob"), call_id="r144", from_tag="a1", to_tag="b1",
                        cseq=1, body=body, content_type=content_type)


def _sealed(pki, port: int, signer: str | None) -> SipMessage:
    """MOVED on ``port``, sealed for bob and the proxy (no SIP context), signed by
    ``signer`` or not at all."""
    recipients = [recipient_for_certificate(pki.user("bob").cert),
                  recipient_for_certificate(pki.proxy(TRUSTED).cert)]
    who = (pki.user(signer, "ec").cert, pki.user(signer, "ec").key) if signer else None
    entity, _ = protect_content("application/sdp",
                                MOVED.replace(b"49170", str(port).encode()), recipients,
                                signer=who)
    return _ack(pki, entity.body, str(entity.content_type))


def _opened_by(engine, message):
    try:
        return [(m.address, m.port) for m in media_summary(engine.open(message).message.body)]
    except E2MError as exc:
        return exc


def test_control_an_honest_ack_answer_is_read_under_verify(call):
    pki, proxy, alice, bob = call
    ack = alice.protect(_ack(pki)).message
    reading = proxy.read_response(ack)
    assert reading.error is None, reading.error
    assert [(m.address, m.port) for m in reading.media] == [("127.0.0.9", 49170)]
    assert proxy.inspect(ack, reading=reading).action == "forward"
    assert _opened_by(bob, ack) == [("127.0.0.9", 49170)]


def test_control_a_plain_unsigned_ack_answer_is_dropped(call):
    pki, proxy, _, bob = call
    ack = _ack(pki)
    reading = proxy.read_response(ack)
    assert isinstance(reading.error, SignatureRequiredError)
    assert proxy.response_refused(reading)          # readable_ack drops it
    assert isinstance(_opened_by(bob, ack), DowngradeError)


def test_control_an_answer_signed_by_another_user_is_refused_by_the_phone(call, pki):
    _, proxy, _, bob = call
    lax = ua_engine(pki, "bob", proxies=(known_proxy(pki, TRUSTED, VIEW, VIEW),),
                    require_signature=False)
    ack = _sealed(pki, 49176, "carol")
    reading = proxy.read_response(ack)
    assert reading.error is not None and not proxy.response_refused(reading)  # relayed
    assert isinstance(_opened_by(bob, ack), UntrustedSignerError)
    assert isinstance(_opened_by(lax, ack), UntrustedSignerError)


def test_control_an_unsigned_sealed_answer_is_refused_by_a_default_phone(call, pki):
    _, proxy, _, bob = call
    lax = ua_engine(pki, "bob", proxies=(known_proxy(pki, TRUSTED, VIEW, VIEW),),
                    require_signature=False)
    ack = _sealed(pki, 49174, None)
    reading = proxy.read_response(ack)
    # the proxy opened it and refused it for its signature, yet would relay it unrecorded
    assert isinstance(reading.error, SignatureRequiredError)
    assert not proxy.response_refused(reading) and not reading.media
    assert proxy.inspect(ack).action == "reply"      # kemi counts it, relays, records nothing
    assert isinstance(_opened_by(bob, ack), SignatureRequiredError)
    # the observation: a phone that does not require signatures takes it
    assert _opened_by(lax, ack) == [("127.0.0.9", 49174)]
