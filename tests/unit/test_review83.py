"""Review 83, hole 1 (fixed at stop 34), the record binding read without pjsua: a
received message's security record is kept under the digest of the very octets the hook
handed pjsip and looked up by the digest of pjsua's ``whole_msg``, so even with its
transaction's entry pushed out (a flood past ``_MEMO``) another message's record under
the same transaction key is never shown.  The wire tests:
``tests/pjsua/test_review83_phone.py``."""

from __future__ import annotations

from collections import OrderedDict, deque

from e2m_plugins import sip
from e2m_plugins.ua import SecurityInfo
from pjsua_hooks.phone import E2MCall, E2MPhone, _bounded_put_aged, handed_digest


def _phone() -> E2MPhone:
    phone = E2MPhone.__new__(E2MPhone)          # only the record keeping, no pjsua
    phone._rx_info = OrderedDict()
    phone.events, phone.errors = deque(), deque()
    phone.counts = {"events": 0, "errors": 0}
    phone.on_event = None

    class _Config:
        aor = "sip:bob@example.com"
    phone.config = _Config()                    # type: ignore[assignment]
    return phone


def _pair() -> tuple[bytes, bytes]:
    """alice's MESSAGE (as handed on) and a bodiless copy under its transaction key."""
    real = sip.make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:alice@example.com",
                            to_uri="sip:bob@example.com", body=b"hi", content_type="text/plain")
    return real.serialize(), real.with_body(b"").remove("Content-Type").serialize()


def test_the_copy_delivered_never_shows_the_real_ones_record():
    phone = _phone()
    real, copy = _pair()
    signed = SecurityInfo(content_type="text/plain", encrypted=True, signed=True)
    # only the real one's record left (the copy's pushed out, or never kept)
    _bounded_put_aged(phone._rx_info, (handed_digest(real), "MESSAGE"), signed, 0.0)
    phone._ev_message({"whole_msg": copy, "body": b"", "from_uri": "a", "to_uri": "b",
                       "content_type": ""})
    assert phone.events[-1]["security"] is None
    phone._ev_message({"whole_msg": real, "body": b"hi", "from_uri": "a", "to_uri": "b",
                       "content_type": "text/plain"})
    assert phone.events[-1]["security"]["signed"]


def test_an_incoming_call_shows_only_the_invite_pjsua_took():
    offer = {"direction": "rx", "what": "INVITE", "cseq": 1, "info": None, "bytes": 1,
             "tags": ("a1", "")}
    call = E2MCall(remote="sip:alice@example.com", outgoing=False, initial=(1, b"copy", "a1"))
    assert not E2MPhone._taken_by_call(call, {**offer, "handed": b"real"})
    assert E2MPhone._taken_by_call(call, {**offer, "handed": b"copy"})
    # a re-INVITE: inside the call's dialog (stop 35, review 93: the tags, not the CSeq)
    assert E2MPhone._taken_by_call(call, {**offer, "cseq": 2, "handed": b"reinvite",
                                          "tags": ("a1", "b1")})
    assert not E2MPhone._taken_by_call(call, {**offer, "cseq": 2, "handed": b"other"})
    assert E2MPhone._taken_by_call(call, {**offer, "direction": "tx", "handed": None})
