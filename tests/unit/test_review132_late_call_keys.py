"""Review 132 (attacker's review of 85ea3f7), engines: the keys of a call made by a late
2xx, as the caller's UA, the callee's UA and the home proxy each hold them.

**Honest break HB1 (engine level): in a call a 2xx made after its INVITE's failure,
the caller's UA drops the call's key 32 s after the failure while the callee's UA and
the proxy keep it for the call; the callee's next in-dialog request under it, read and
relayed by the proxy, is refused 493 by the caller.**

- Who: nobody hostile.  The everyday trigger is the one review 127 wrote up: tm's own
  408 (``fr_inv_timer``) crossing the callee's 200, which tm relays after the failure
  (RFC 3261 16.7).  (Any failure answer followed by a 2xx does the same: an untrusted
  hop between the proxy and alice that forges a 486 is another way in.)
- Set-up: alice's and bob's ``UAEngine`` on one test clock; the home proxy
  (``ProxyEngine``, viewing SDP, ``MemoryKeyCache`` on the same clock).  alice's keyed
  INVITE (CEK reuse, the default) through the proxy to bob; the proxy's failure route
  (``end_attempt(answer_may_follow=True)``) and alice's engine take a 408; bob's 200,
  1 s later, sealed under the offer's key K (``key_reuse``), read by the proxy and
  opened by alice (the stop-42 window).
- Observed: the proxy moves K into the confirmed dialog's scope for ``DIALOG_TTL``
  (43200 s left after the 200; the cut early copy, 31 s).  bob's engine holds K,
  unretired, confirmed, readers {proxy}: bob's re-INVITEs reuse it.  At +11 s bob's
  re-INVITE under K is relayed by the proxy and opened by alice.  At +41 s bob's
  re-INVITE under K is relayed by the proxy and alice's engine raises
  ``NoMatchingRecipientError`` (her answer: 493): ``for_call`` is empty, K went at
  ``open_until`` (``_end_lingering``).  bob recovers only through ``react`` on the 493
  (a retry keyed afresh: one extra round trip, one E2M retry of the 3 a call has), and
  so does every other UA that reuses K until it learns.  On a real pjsua2 caller the
  path is masked by the known review 129 HB1 (pjsip ignores the late 2xx), so this is
  shown with the engines, which are what a stack fixed for HB1 would run.
- Code at fault: ``e2m_plugins/dialog_keys.py:217-240`` (``settle``: the 2xx to the
  INVITE that offered K confirms it, but leaves ``open_until``, which
  ``end_dialog(linger=...)`` set at ``:300-306``), and ``:384-394``
  (``_end_lingering`` drops every key past ``open_until``, the one the late 2xx made a
  call's key too).  The proxy's half is as meant: ``e2m_plugins/proxy.py:612-614``
  keeps K for the dialog the INVITE's 2xx confirmed.
- Suggested fix: when an accepted 2xx to the INVITE confirms a dialog under a
  lingering key, the key is the call's again for opening: clear ``open_until`` in
  ``settle`` for a 2xx whose CSeq is the key's ``offered_in`` (keep ``retired``: alice
  still never sends under it), so alice opens it as long as bob and the proxy use it.

Controls (unmarked, pass):

- ``test_control_within_the_window_the_callees_reinvite_opens``: the same late call,
  bob's re-INVITE under K at +11 s: relayed and opened (the set-up is live).
- ``test_control_a_call_answered_in_time_keeps_its_key_for_the_call``: the same flow
  without the failure: bob's re-INVITE under K at +41 s opens (the rule the late call
  breaks).
- ``test_control_the_proxy_keeps_k_for_the_late_call``: the measured figures: the
  proxy holds K in the confirmed dialog's scope for ``DIALOG_TTL``, bob holds it
  unretired, alice's copy is retired and ``open_until`` is set.
- ``test_control_bob_recovers_through_react``: alice's 493 (``refusal``) taken by bob's
  ``react`` retires K and gives a retry keyed afresh, which alice opens.

Tried and held (engines, read or run here):

- The UA's ``_lingering`` deque under copies of a failure answer (an untrusted hop
  replaying the 486): each accepted copy appends one entry (20 000 copies: 20 000
  entries, 1.7 MB traced, 456 us a copy on this machine), but ``open_until`` is a
  ``min`` (no copy lengthens the key's life) and no entry is added once the slot went
  (32 s): bounded by the window times the rate, no amplification (one datagram, one
  entry).  Not kept as a test.
- A second failure answer cannot lengthen the window; a retired key never seals
  alice's next body (her re-INVITE in the late call is keyed afresh).
- The proxy's cut applies only to the request's fresh names (``Verdict.kept``); an
  in-dialog request's failure (491, 488) drops nothing (``$tt``), so a callee cannot cut
  a live dialog key by refusing a re-INVITE.
- Late copies (``kamailio_app/late_copies.py``): read only.  The answer key binds the
  replay key, To tag and Request-URI as received; a hop rewriting either gets 403, not
  the kept 200; INVITE/ACK/CANCEL 2xx are never kept; a failure is never kept.  No way
  seen to make a different signed body share a kept answer's key (the replay key is the
  signed context's digest).
- Certificate NOTIFY sockets (``cert_route.py``): listeners are IP literals only
  (``config._listener``), spelled as Python's ``ipaddress`` does, and ``contact_uri``
  lower-cases the proto, so a row made at one of the node's sockets is claimed by it;
  a node restarted without the row's listener leaves it to ``ORPHAN_GRACE`` (600 s
  after its lapse), by design (the Contact the subscriber refreshes at is gone too).
  Read, not run on the wire.  What did break there, a NOTIFY that must go over TCP to a
  real UDP phone, is HB2 in ``tests/e2e/test_review132_large_cert_notify.py``.

Fixed (stop 42), HB1: an accepted 2xx that confirms a lingering key (``settle``) clears
its ``open_until``: the late call keeps it for its life at alice too, retired (it seals
nothing of hers).  On the code before: bob's re-INVITE at +41 s refused 493 (and the
figures control saw alice's key gone at +40 s); now it opens.  The recovery control was
replaced: alice's own re-INVITE in the late call is keyed afresh.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from e2m_lab.flows import (SDP_VIEW, TRUSTED, answer, apply_forward, invite, known_proxy,
                           proxy_engine, reinvite)
from e2m_plugins.config import UAConfig
from e2m_plugins.keycache import DIALOG_TTL, DialogScope, MemoryKeyCache
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Call:
    """alice -> home proxy -> bob, every engine on one clock."""

    def __init__(self, pki, call_id: str) -> None:
        self.pki, self.call_id = pki, call_id
        self.clock = Clock()
        proxy = known_proxy(pki, TRUSTED, SDP_VIEW)
        self.alice = self._ua("alice", "bob", proxy)
        self.bob = self._ua("bob", "alice", proxy)
        self.cache = MemoryKeyCache(clock=self.clock)
        self.proxy = proxy_engine(pki, TRUSTED, view=SDP_VIEW, cache=self.cache)
        self.proxy._clock = lambda: datetime.fromtimestamp(self.clock(), timezone.utc)
        self.cseq = 0

    def _ua(self, name: str, peer: str, proxy) -> UAEngine:
        cred = self.pki.user(name)
        config = UAConfig(aor=self.pki.aor(name), certificate=cred.cert, private_key=cred.key,
                          trust_anchors=(self.pki.ca.cert,),
                          peers={self.pki.aor(peer): self.pki.user(peer).cert},
                          proxies=(proxy,))
        return UAEngine(config, clock=self.clock)

    def start(self, *, fail_first: bool) -> None:
        """alice's keyed INVITE; a 408 first (tm's, crossing) when ``fail_first``; then
        bob's 200 under the offer's key, relayed and opened by alice."""
        sent = self.alice.protect(invite(self.pki, call_id=self.call_id)).message
        verdict = self.proxy.inspect(sent)
        assert verdict.action == "forward" and verdict.kept
        relayed = apply_forward(sent, verdict)
        got = self.bob.open(relayed).message
        if fail_first:
            # the proxy's failure route for an INVITE that went out, then alice's engine
            self.proxy.end_attempt(DialogScope(self.call_id, "a1"), verdict.kept,
                                   answer_may_follow=True)
            timeout = make_response(relayed, 408, "Request Timeout").replace(
                "To", f"{relayed.get('To')};tag=tm408")
            self.alice.open(timeout)
            self.clock.now += 1
        ok = self.bob.protect(answer(got, to_tag="b1"))
        assert ok.info.key_reuse                  # bob's 200 under the offer's key K
        seen = self.proxy.inspect(ok.message)
        assert seen.action == "forward" and seen.seen
        assert self.alice.open(apply_forward(ok.message, seen)).info.key_reuse

    def bobs_reinvite(self):
        """bob's re-INVITE as his engine seals it, and the proxy's verdict on it."""
        self.cseq += 1
        sealed = self.bob.protect(reinvite(self.pki, "bob", "alice", self.call_id,
                                           self.cseq, "b1", "a1"))
        return sealed, self.proxy.inspect(sealed.message)


def test_hole_hb1_the_callees_reinvite_after_the_window_opens(pki):
    call = Call(pki, "r132-hb1@x")
    call.start(fail_first=True)
    call.clock.now += 40                          # 41 s after the 408
    sealed, verdict = call.bobs_reinvite()
    assert sealed.info.key_reuse and verdict.action == "forward"   # the proxy reads it
    # secure (honest) reading: the key the proxy and bob hold for the call opens at alice
    opened = call.alice.open(apply_forward(sealed.message, verdict))
    assert opened.info.key_reuse


def test_control_within_the_window_the_callees_reinvite_opens(pki):
    call = Call(pki, "r132-hb1-in@x")
    call.start(fail_first=True)
    call.clock.now += 10                          # 11 s after the 408
    sealed, verdict = call.bobs_reinvite()
    assert sealed.info.key_reuse and verdict.action == "forward"
    assert call.alice.open(apply_forward(sealed.message, verdict)).info.key_reuse


def test_control_a_call_answered_in_time_keeps_its_key_for_the_call(pki):
    call = Call(pki, "r132-hb1-ok@x")
    call.start(fail_first=False)
    call.clock.now += 41
    sealed, verdict = call.bobs_reinvite()
    assert sealed.info.key_reuse and verdict.action == "forward"
    assert call.alice.open(apply_forward(sealed.message, verdict)).info.key_reuse


def test_control_the_proxy_keeps_k_for_the_late_call(pki):
    call = Call(pki, "r132-hb1-fig@x")
    call.start(fail_first=True)
    confirmed = DialogScope(call.call_id, "a1", "b1")
    lives = {scope: entry.expires - call.clock.now
             for (scope, _), entry in call.cache._entries.items()}
    assert lives[confirmed] == pytest.approx(DIALOG_TTL)       # 43200 s
    assert lives[DialogScope(call.call_id, "a1")] <= 32         # the cut early copy
    bobs = call.bob.dialog_keys.for_call(call.call_id)
    assert [(k.retired, k.confirmed) for k in bobs] == [(False, True)]
    # (stop 42: the late 2xx confirmed K at alice too: kept for the call, still retired,
    # no longer lingering; on the code before it was gone at +40 s)
    alices = call.alice.dialog_keys.for_call(call.call_id)
    assert [(k.retired, k.open_until is not None) for k in alices] == [(True, False)]
    call.clock.now += 40
    assert len(call.alice.dialog_keys.for_call(call.call_id)) == 1   # kept at alice
    assert call.proxy.cache.get(confirmed, next(iter(
        r for (s, r) in call.cache._entries if s == confirmed)), count=False) is not None
    assert len(call.bob.dialog_keys.for_call(call.call_id)) == 1  # kept at bob


def test_control_alice_still_seals_nothing_under_the_retired_key(pki):
    """On the code before, bob's re-INVITE under K at +40 s got 493 and he recovered
    through ``react`` (one round trip lost).  Now it opens; and alice's own re-INVITE
    in the late call is keyed afresh, never sealed under the retired K."""
    call = Call(pki, "r132-hb1-react@x")
    call.start(fail_first=True)
    call.clock.now += 40
    call.cseq += 1
    plain = reinvite(pki, "alice", "bob", call.call_id, call.cseq, "a1", "b1")
    assert not call.alice.protect(plain).info.key_reuse


