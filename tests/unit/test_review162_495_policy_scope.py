"""Review 162, unit: see the docstring of
``tests/pjsua/test_review162_invite_policy_answer_phone.py`` for every finding of
review 162 (hole K1 is shown here; honest break HB1 on the real phone there).
Fixed (stop 48): ``_policy_origin`` gives a 496 or 495 no origin, so nothing on it is
learnt by ``learn`` (from ``open``); ``_learn_495`` no longer calls ``learn``; a 496's
policy for the proxy whose certificate it carries is still merged by ``_learn_496``
once that certificate passed the checks.  Both hole tests, no longer marked, failed on
cbd1d09 and pass.
"""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.flows import message
from e2m_plugins import headers as hdr
from e2m_plugins.config import LegacyPeer, UAConfig
from e2m_plugins.learned_policies import LearnedPolicies, MAX_DIALOG_POLICIES
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine

HOME = "proxy.example.com"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _registered_alice(world, clock: Clock, **settings) -> UAEngine:
    """alice (``sign = false``), registered: the home's 200 taught its policy (view
    ``MESSAGE:text/plain``, 7200 s) for everything she sends, and she fetched its certificate."""
    cred = world.user("alice")
    alice = UAEngine(UAConfig(aor=world.aor("alice"), certificate=cred.cert,
                              private_key=cred.key, trust_anchors=(world.ca.cert,),
                              peers={world.aor(p): world.user(p).cert for p in ("bob", "carol")},
                              sign=False, **settings), clock=clock)
    register = make_request("REGISTER", f"sip:{HOME}", from_uri=world.aor("alice"),
                            to_uri=world.aor("alice"))
    alice.protect(register)
    ok = make_response(register, 200, "OK", [(hdr.PROXY_BODY_POLICY, hdr.PolicyHeader(
        HOME, view=(hdr.Rule("MESSAGE", "text/plain"),), expires=7200).format())], b"", None)
    alice.open(ok)
    alice.add_proxy_certificate(HOME, world.proxy(HOME).cert.public_bytes(Encoding.DER))
    return alice


def _bobs_495(world, alice: UAEngine, policy: hdr.PolicyHeader | None):
    """bob (or any hop of that transaction) answers alice's MESSAGE to him 495, with a
    ``Proxy-Body-Policy`` naming alice's home, ``verify="MESSAGE:*"``."""
    plain = message(world)
    sent = alice.protect(plain).message
    extra = [(hdr.PROXY_BODY_POLICY, policy.format())] if policy else []
    refusal = make_response(sent, 495, "Signature Required", extra, b"", None)
    alice.open(refusal)          # the phone opens every response first (phone.py _on_rx)
    return alice.react(refusal, plain)


EVIL = hdr.PolicyHeader(HOME, view=(hdr.Rule("MESSAGE", "text/plain"),),
                        verify=(hdr.Rule("MESSAGE", "*"),), expires=86400)


def test_hole_k1_a_495_to_bob_does_not_make_alice_sign_to_carol(world):
    clock = Clock()
    alice = _registered_alice(world, clock)
    assert not alice.protect(message(world, recipient="carol")).info.signed
    assert _bobs_495(world, alice, EVIL).action == "retry"
    clock.now += 3700     # past the 495's own ask (3600 s), the registrar not heard again
    later = alice.protect(message(world, recipient="carol"))
    assert not later.info.signed, ("an hour after bob's 495, alice signs her MESSAGE to "
                                   "carol: the 495's policy holds for everything she sends")


def test_hole_k1_a_495_policy_does_not_sign_to_a_legacy_peer_set_sign_false(world):
    clock = Clock()
    alice = _registered_alice(world, clock,
                              legacy=(LegacyPeer(world.aor("carol"), sign=False),))
    assert _bobs_495(world, alice, EVIL).action == "retry"
    assert not alice.protect(message(world, recipient="carol")).info.signed


def test_control_k1_a_495_without_a_policy_lapses_and_stays_with_bob(world):
    clock = Clock()
    alice = _registered_alice(world, clock)
    assert _bobs_495(world, alice, None).action == "retry"
    assert not alice.protect(message(world, recipient="carol")).info.signed
    assert alice.protect(message(world)).info.signed          # bob: asked
    clock.now += 3700
    after = alice.protect(message(world))
    assert not after.info.signed and HOME in after.info.readable_by


def test_held_dialog_victim_cost_at_the_bound():
    """Tried and held: ``_dialog_victim`` at the dialogs' bound, 16 dialogs of 16."""
    policies = LearnedPolicies()
    start = time.perf_counter()
    learnt = 0
    for d in range(64):
        for i in range(16):
            policies.learn_header(hdr.PolicyHeader(f"h{i}.example.com",
                                                   view=(hdr.Rule("INVITE", "*"),)),
                                  source="t", scope=f"call{d} sip:p{d}@example.com")
            learnt += 1
    took = time.perf_counter() - start
    assert len(policies) == MAX_DIALOG_POLICIES
    print(f"{learnt} learns, {took * 1e6 / learnt:.0f} us each")
    assert took / learnt < 0.002
