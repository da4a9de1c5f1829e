"""The engine's reading of a response, split for a host that must drop one before the
route that applies its verdict (review 133 K3): ``ProxyEngine.read_response`` keeps,
spends and records nothing; ``inspect(reading=)`` applies it to that message alone."""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, UNTRUSTED, SipPath, answer, invite, \
    known_proxy, proxy_engine, ua_engine
from e2m_plugins.errors import MalformedError
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)
TWO_C = (b"v=0\r\no=bob 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
         b"m=audio 40404 RTP/AVP 0\r\nc=IN IP4 127.0.0.1\r\nc=IN IP4 127.0.0.9\r\n")


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED, UNTRUSTED), users=("alice", "bob"))


def _call(world):
    """alice's keyed INVITE through both proxies; bob's kekri answer (CEK reuse)."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    trusted = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    path = SipPath([proxy_engine(world, UNTRUSTED), trusted])
    trip = path.request(alice.protect(invite(world)).message)
    reply = bob.protect(answer(bob.open(trip.delivered).message)).message
    return trusted, trip.delivered, reply


def _cache_state(engine):
    """Every kept key with its scope and uses left (the memory cache's own table)."""
    return sorted((repr(scope), name, entry.max_decrypts)
                  for (scope, name), entry in engine.cache._entries.items())


def test_a_reading_keeps_spends_and_records_nothing_and_applies_once(world):
    trusted, _, reply = _call(world)
    before = _cache_state(trusted)
    reading = trusted.read_response(reply)
    assert reading.error is None and not reading.skipped
    assert [s.plaintext for s in reading.seen] == [SDP_ANSWER]
    assert _cache_state(trusted) == before          # nothing kept, moved or spent
    verdict = trusted.inspect(reply, caller="alice@example.com", reading=reading)
    assert verdict.error is None and [s.plaintext for s in verdict.seen] == [SDP_ANSWER]
    assert _cache_state(trusted) != before          # applied: the dialog took the key


def test_another_messages_reading_is_not_applied(world):
    """A reading made for one response, handed in with another, is ignored: that one
    is read afresh (a host that mixed two replies up applies nothing of the first)."""
    trusted, delivered, reply = _call(world)
    refused = make_response(delivered, 200, "OK", body=TWO_C, content_type="application/sdp")
    bad = trusted.read_response(refused)
    assert trusted.response_refused(bad) and isinstance(bad.error, MalformedError)
    verdict = trusted.inspect(reply, caller="alice@example.com", reading=bad)
    assert verdict.error is None and [s.plaintext for s in verdict.seen] == [SDP_ANSWER]
    good = trusted.read_response(reply)
    verdict = trusted.inspect(refused, reading=good)
    assert verdict.error == "MalformedError" and not verdict.seen


def test_only_a_body_that_cannot_be_taken_apart_is_refused(world):
    """A part that does not parse is refused (as the SDP view's refusal above); a body
    the proxy holds no key for (bob's answer under the CEK of an offer that never
    passed it) is not: it is relayed with its error, as documented."""
    trusted, delivered, _ = _call(world)
    junk = make_response(delivered, 200, "OK", body=b"\x30\x80garbage",
                         content_type="application/pkcs7-mime; smime-type=enveloped-data")
    assert trusted.response_refused(trusted.read_response(junk))
    alice = ua_engine(world, "alice")          # knows no proxy: sealed for bob alone
    bob = ua_engine(world, "bob")
    offer = bob.open(alice.protect(invite(world, call_id="other@x")).message).message
    closed = bob.protect(answer(offer)).message
    reading = trusted.read_response(closed)
    assert reading.error is not None and not trusted.response_refused(reading)
    assert trusted.inspect(closed, reading=reading).error == type(reading.error).__name__
