"""Review 121 (attacker's review of 2161459), the phone's side of stop 40's cap on new
certificate subscriptions: the service's ``503`` with ``Retry-After: 5``
(``cert_route.CertService.admits_new_subscription``, ``BUSY_RETRY_AFTER``) as the real
``CertServiceClient`` takes it.  Real client, real UA engine and test PKI, the
SUBSCRIBEs pjsua would send written out (``e2m_lab.certservice_subscriber``), a manual
clock (review 119's unit set-up).

**Honest break HB1: one busy second at the service fails alice's send and shuts bob's
certificate out for 300 s** (``test_hb1_a_busy_second_is_retried_after_retry_after``).
No attacker needed (any second past ``max_new_subscriptions_per_second``: phones
re-registering together after a restart, each fetching its peers); a stranger keeping
the pipe full (review 120's 100 fetches a second, from a handful of addresses under
pike's rate) makes it happen to every phone at will.

- Set-up: alice's client (real ``CertServiceClient`` over a real UA engine), the engine
  wanting bob's certificate (a send was blocked for it).
- Messages: the follow ``SUBSCRIBE`` (``Expires: 3600``) answered ``503 Service
  Unavailable`` with ``Retry-After: 5`` (what ``admits_new_subscription`` sends,
  ``kamailio_app/cert_route.py:177-190``); the fetch that takes its place at the next
  tick (0.1 s later), the same 503.
- Observed (run): after the second 503, ``failure(bob)`` = "the certificate service
  answered 503 Service Unavailable", ``pending(bob)`` False; over the next 10 s of ticks
  (100 ticks, the engine still wanting bob) **0 SUBSCRIBEs**; the next one goes at 300 s
  (``OUTCOME_MAX_AGE``, control below).  In the phone, ``_await_peer_certificate``
  (``pjsua_hooks/phone.py:1396-1407``) retries the blocked send once the fetch is no
  longer pending and fails it: "not sent: no usable certificate for bob: the
  certificate service answered 503 Service Unavailable" (read; the control asserts the
  503 in that failure).  Only a new send by the user asks again (``want``
  ignores ``failure``); the timer's own fetches and the follow are off for 300 s (the
  refused follow is remembered as well).  The threat model's row for review 120 K5
  says "honest subscribers past the rate wait 5 s ... their phones fetch again": they
  do not wait, they fail.
- Code at fault: ``_subscribe_answer`` (``pjsua_hooks/certservice_client.py:424-445``)
  treats every status >= 300 alike: a follow's 503 is a refused follow (remembered 300
  s, ``:437``), a fetch's 503 a failure of bob's service (``:442``, remembered 300 s,
  read by ``tick`` at ``:240`` and ``_follow_peers_in_use`` at ``:273``); ``Retry-After``
  is never read.
- Suggested fix: a 503 (or 500/480/408 with ``Retry-After``) is "not now": keep the
  send waiting and send the fetch again after ``Retry-After`` (bounded, e.g. at most 10
  s and twice), without remembering a refused follow or a failure; only after that
  fail the send.

Controls (unmarked):

- ``test_control_hb1_no_storm_on_503``: the same busy second brings two SUBSCRIBEs and
  then none over 10 s of ticks (no storm on 503: the brief's "phones storming" held).
- ``test_control_hb1_the_failure_is_remembered_for_outcome_max_age``: nothing more to
  bob's service until 300 s, then one SUBSCRIBE (what HB1 costs, measured).

Tried and held: the refused-renewal fix (stop 40, review 119 K1) with 503 instead of 403
(read: same branch, no storm); a follow refused 403 then fetched 200 (review 115's path,
the existing unit tests).

Fixed (stop 40): a 480, 500 or 503 with Retry-After is "not now": the client sends the
same SUBSCRIBE again after it (at most 4 s, so the send blocked for it, which waits 6
s, still gets it), twice at most, before taking it for a refusal or a failure as
before (``certservice_client._BUSY``, ``BUSY_RETRIES``, event ``cert_service_busy``);
the service's Retry-After is now 2 s (its pipe counts per second).  The hole test
failed on the code before the fix (0 SUBSCRIBEs in the 10 s after) and passes with it.
The tests were rewritten with the fix, around a stand-in service busy for a while:
the hole as before (one busy second: bob's certificate had within 5 s, no failure);
the two controls now show what a service busy for a minute costs (at most six
SUBSCRIBEs, then the 503 as the send's failure) and that the failure is remembered
300 s as before.
"""

from __future__ import annotations

import pytest

from e2m_lab.certservice_subscriber import PROXY, subscriber
from e2m_plugins import sip
from e2m_plugins.testpki import init_test_pki
from pjsua_hooks import certservice_client as csc
from tests.unit.test_certservice_client import BOB, answer, der, go_out, notify_for, want

BUSY = [("Retry-After", "2")]       # what the service sends past its rate (stop 40: 2 s)


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


@pytest.fixture
def setup(pki):
    made = subscriber(pki)
    return made.engine, made.client, made.clock, made.sent


class _Service:
    """bob's certificate service as the client meets it: every SUBSCRIBE answered 503
    with ``BUSY`` while ``busy_until`` (manual clock) is ahead, then 200 and a NOTIFY
    with bob's certificate."""

    def __init__(self, pki, client, clock, sent, busy_until):
        self.pki, self.client, self.clock, self.sent = pki, client, clock, sent
        self.busy_until, self.seen, self.busy_answers = busy_until, 0, 0

    def answer_new(self):
        while self.seen < len(self.sent):
            out = go_out(self.client, BOB, self.sent[self.seen][1])
            self.seen += 1
            if self.clock.now < self.busy_until:
                self.busy_answers += 1
                assert self.client.on_rx(sip.make_response(out, 503, "Service Unavailable",
                                                           extra_headers=BUSY), PROXY) is True
                continue
            ok = sip.make_response(out, 200, "OK", extra_headers=[("Expires", out.get("Expires"))])
            assert self.client.on_rx(ok, PROXY) is True
            expires = out.get("Expires")
            state = "terminated;reason=timeout" if expires == "0" else f"active;expires={expires}"
            assert answer(self.client, notify_for(out, der(self.pki, "bob"), state=state,
                                                  to_tag=ok.to_tag)) == 200


def _ticks(service, engine, seconds, wanting=True):
    for _ in range(int(seconds * 10)):              # the phone ticks every 0.1 s
        service.clock.now += 0.1
        if wanting and engine.certs.user(BOB) is None:
            want(engine, BOB)                       # alice still wants to reach bob
        service.client.tick()
        service.answer_new()


def _start(pki, setup, busy_for):
    engine, client, clock, sent = setup
    service = _Service(pki, client, clock, sent, clock.now + busy_for)
    want(engine, BOB)
    client.tick()
    service.answer_new()
    return engine, client, service


def test_hb1_a_busy_second_is_retried_after_retry_after(pki, setup):
    engine, client, service = _start(pki, setup, busy_for=1.0)
    assert client.pending(BOB) and client.failure(BOB) is None    # the send still waits
    _ticks(service, engine, 5)
    print("SUBSCRIBEs", len(service.sent), "answered busy", service.busy_answers,
          "failure", client.failure(BOB))
    # secure: the service said "in 2 s": asked again then, bob's certificate had well
    # within the 6 s a blocked send waits, and no failure remembered
    assert engine.certs.user(BOB) is not None, client.failure(BOB)
    assert client.failure(BOB) is None
    assert service.busy_answers == 1 and len(service.sent) == 2


def test_control_hb1_no_storm_on_503(pki, setup):
    """Control: a service busy for a minute gets a bounded number of SUBSCRIBEs (the
    follow and its retries, then the fetch in its place and its retries), and the
    send is then failed with the service's answer."""
    engine, client, service = _start(pki, setup, busy_for=60.0)
    _ticks(service, engine, 60)
    print("SUBSCRIBEs", len(service.sent), "failure", client.failure(BOB))
    assert len(service.sent) <= 2 * (1 + csc.BUSY_RETRIES)
    assert not client.pending(BOB) and "503" in (client.failure(BOB) or "")


def test_control_hb1_the_failure_is_remembered_for_outcome_max_age(pki, setup):
    """Control: past its retries the busy service is a failure, remembered
    ``OUTCOME_MAX_AGE`` (300 s): nothing more is asked until then, then once more."""
    engine, client, service = _start(pki, setup, busy_for=1000.0)
    _ticks(service, engine, 30)
    asked = len(service.sent)
    assert "503" in (client.failure(BOB) or "")
    _ticks(service, engine, csc.OUTCOME_MAX_AGE - 40)
    assert len(service.sent) == asked
    _ticks(service, engine, 20)
    assert len(service.sent) > asked
