"""Review 119 (attacker's review of bc215c1), hole K1 at the unit level: a refused
RENEWAL of a certificate subscription makes the phone's client send a SUBSCRIBE at
every tick (the phone ticks it every 0.1 s, ``phone.py:1413``).

The real ``CertServiceClient`` with a real UA engine and test PKI; the SUBSCRIBEs
pjsua would send are written out (``e2m_lab.certservice_subscriber``), the clock is a
manual one.  The live proof with a real Kamailio certificate service, a real stranger
filling bob's places and real ``e2m-phone`` processes is
``tests/e2e/test_review119_cert_renewal_storm.py``, whose docstring gives the whole
account (attacker, messages, figures, code at fault, fix).

Summary.  Review 115's fix turns a refused *follow* into one fetch and remembers the
refusal for ``OUTCOME_MAX_AGE`` s, but only for the subscription that is the AoR's
current one (``_subscribe_answer``, ``certservice_client.py:426``: ``self._current.get
(sub.aor) == sub.token``).  A renewal is never the current one until its first NOTIFY
(``_subscribe(renew=True)`` does not set ``_current``, ``:290``), so its refusal takes the other
branch: ``_fail`` and ``state = "ended"``.  The next ``tick`` forgets the ended renewal
(``:226``) and, since the current subscription is still due and no renewal is pending
any more (``:246-255``), sends another renewal.  Nothing remembers the refusal for the
renewal path (``_follow_refused`` is not set; ``failure`` is not read there).

Measured here: bob followed with ``Expires: 3600``, granted 3600; at 2,900 s (past the
80 % renewal point) every renewal is answered ``403 Too Many Subscriptions`` (what the
service answers when a stranger holds the AoR's places, review 115): 100 ticks (10 s of
the phone's loop) sent 100 SUBSCRIBEs, each ``Expires: 3600``; 700 s to the
subscription's end would be ~7,000.

Control (unmarked): the first follow refused, as review 115 fixed it: one fetch, then
no more SUBSCRIBEs over 100 ticks.

Fixed (stop 40): see ``tests/e2e/test_review119_cert_renewal_storm.py``.  The hole test
failed on the code before the fix (100 SUBSCRIBEs) and passes with it.
"""

from __future__ import annotations

import pytest

from e2m_lab.certservice_subscriber import PROXY, subscriber
from e2m_plugins import sip
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_certservice_client import BOB, answer, der, go_out, notify_for, \
    subscribe_to_bob

TICKS = 100          # 10 s of the phone's loop (it ticks the client every 0.1 s)


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


@pytest.fixture
def setup(pki):
    made = subscriber(pki)
    return made.engine, made.client, made.clock, made.sent


def _refuse_all_new(client, sent, seen: int) -> int:
    """Answer every SUBSCRIBE sent since ``seen`` with 403 Too Many Subscriptions."""
    while seen < len(sent):
        out = go_out(client, BOB, sent[seen][1])
        assert client.on_rx(sip.make_response(out, 403, "Too Many Subscriptions"),
                            PROXY) is True
        seen += 1
    return seen


def _run_ticks(client, clock, sent, seen: int) -> int:
    for _ in range(TICKS):
        client.tick()
        seen = _refuse_all_new(client, sent, seen)
        clock.now += 0.1
    return seen


def test_hole_a_refused_renewal_is_not_sent_again_at_every_tick(pki, setup):
    engine, client, clock, sent = setup
    follow = subscribe_to_bob(engine, client, sent)
    ok = sip.make_response(follow, 200, "OK", extra_headers=[("Expires", "3600")])
    assert client.on_rx(ok, PROXY) is True
    assert answer(client, notify_for(follow, der(pki, "bob"), state="active;expires=3600",
                                     to_tag=ok.to_tag)) == 200
    assert engine.certs.user(BOB) is not None
    clock.now += 2900                  # past 80 % of 3600: the renewal is due
    client.touch(BOB)                  # alice still talks to bob
    before = len(sent)
    _run_ticks(client, clock, sent, before)
    renewals = sent[before:]
    print("SUBSCRIBEs in", TICKS, "ticks after the refused renewal:", len(renewals),
          "Expires:", sorted({dict(h)["Expires"] for _, h in renewals}))
    # secure: the refusal is remembered (a fetch at most), not re-sent at every tick
    assert len(renewals) <= 2, len(renewals)


def test_control_a_refused_first_follow_is_one_fetch_then_quiet(pki, setup):
    engine, client, clock, sent = setup
    follow = subscribe_to_bob(engine, client, sent)
    assert client.on_rx(sip.make_response(follow, 403, "Too Many Subscriptions"),
                        PROXY) is True
    client.tick()
    assert len(sent) == 2 and dict(sent[-1][1])["Expires"] == "0"        # one fetch
    fetch = go_out(client, BOB, sent[-1][1])
    assert client.on_rx(sip.make_response(fetch, 200, "OK", extra_headers=[("Expires", "0")]),
                        PROXY) is True
    assert answer(client, notify_for(fetch, der(pki, "bob"),
                                     state="terminated;reason=timeout")) == 200
    client.touch(BOB)
    _run_ticks(client, clock, sent, len(sent))
    assert len(sent) == 2, "no SUBSCRIBE after the fetch for 10 s of ticks"
