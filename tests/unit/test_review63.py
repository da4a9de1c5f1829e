"""A sixty-third attacker's review (December 2026) of 2377d59: the curious chosen proxy
and CEK reuse (RFC 3185) in the core (``e2m_plugins/ua.py`` ``protect``/``open``/``react``,
``dialog_keys.py``, ``learned_policies.py``, ``body.py``, ``cms/``, ``sdp.py``).

``test_hole_*`` xfail strictly on 2377d59 (their assertion is the secure behaviour);
``test_control_*`` are the same flows without the attack, or show that the attack's
messages are taken as far as they should be (they pass).

Hole 1 (``test_hole_replays_refused_by_the_phone_still_use_up_the_dialog_key``): the
phone's ``DialogKeys.opening_lookup`` counts a use of a kept key each time a kekri
naming its reference is *looked up* (``kek_for``: ``key.uses += 1``), and
``UAEngine._open`` looks it up (``open_part``, sign-then-encrypt: the envelope opens
before the signature, the SIP context and the replay record are checked) before it
refuses anything.  This is the proxy-side hole of the second review
(``test_review2_proxy.py::test_hole_one_users_replays_use_up_a_dialog_key``: "a lookup
only looks; the use is spent once the message passed every check"), never fixed on
the phone's side.  Attacker: an untrusted on-path hop, or the curious chosen proxy
(any party that forwards the call's in-dialog requests).  Messages: alice calls bob,
bob answers under alice's offer key K0 (RFC 3185 kekri), ACK; bob re-INVITEs (sealed
under K0), alice answers 200.  The hop sends alice ``cek_max_uses`` (100) copies of
bob's re-INVITE, each with a fresh top Via branch: each is refused (403 "Replayed or
stale body"), and each spends a use of K0.  Effect: K0 is used up at alice's phone
only (bob's count is 3); bob's next re-INVITE, sealed under K0 as ``reuse`` allows him,
is undecipherable at alice (493), and so is every body of his under K0 after that:
one 493 round trip per attack, repeatable at will, and with ``MAX_RETRIES_PER_CALL`` the
E2M retries of the call are spent.  The same works against bob with copies of alice's
requests, and against an early dialog's INVITE key.  Fix: as at the proxy, let
``opening_lookup`` only look, and count the use once ``open`` accepted the message
(after ``_check_replay``), e.g. record the references ``kek_for`` found and spend them
in ``_open`` next to ``_keep_received``.

Hole 2 (``test_hole_a_496_widens_a_configured_proxys_rules_for_good``): ``learn_496``
merges the rules a 496 brings (its Warning's content type for the method, and every
rule of a ``Proxy-Body-Policy`` it carries) into a *configured* ``[[proxies]]`` entry,
which keeps ``expires_at = None``: the rules the wire added never expire.  docs/protocol.md
§6 says a configured entry "wins over what the wire says" and that a learnt rule is kept
"never longer than ``max_policy_expires``" (86400 s); a 496 from a host that is not
configured does expire (the control).  Attacker: the curious chosen proxy alice
configured for ``INVITE:application/sdp`` only (firewall control), or any hop on alice's
path forging its 496 (the proxy's certificate is public and the 496 is checked against
the proxy's pinned one, which it is).  Messages: one 496 (proxy.example.com's
certificate, ``Warning: 399 proxy.example.com "text/plain"``) to one of alice's MESSAGEs.
Effect: from then on, for as long as the phone runs, every MESSAGE alice sends, to
anyone, is encrypted for that proxy, which her configuration did not choose for
MESSAGE, a day after the learnt rule should have lapsed, and with no 496 it would have
to send (and she would see) again.  A 496 carrying a policy header widens the entry to
any method the header names the same way (``announced.view`` merged).  Fix: in
``learn_496``, keep a configured entry as it is and put what the 496 teaches in a learnt
entry of its own (or refuse it, as ``learn_header`` does for a configured host), with
the usual expiry.  Note: ``tests/unit/test_learned_policies.py::
test_a_496_keeps_a_configured_entry_configured`` asserts the merge (``expires_at is None``
and the widened view) at the table's level, so the fix changes that test too; what it
does not show is the consequence at the engine: a wire-taught rule with no end.

What held (tried, no test kept unless named):

- sealed SDP keys for the peer alone: the sealed-keys envelope sits in the signed
  attributes; its CEK is kept exclusive only when sealed to our certificate (not a
  kekri); keys sealed for two recipients are refused (``open_sealed_keys``); a chosen
  proxy re-making the view envelope (it holds the CEK: sign-then-encrypt lets it
  re-encrypt the SignedData under any CEK) can only choose the CEK of a key whose
  readers (from the signed context) already name it: never exclusive, so no SRTP keys
  ever go under it (``_reusable(exclusive=True)`` needs no readers);
- a co-recipient naming the reference with another CEK: the kept key is never replaced,
  and ``_keep_received`` keeps only the reference the signed context names;
- a peer-chosen proxy (bob's, named in his signed readers) reading alice's later SDP
  views under bob's answer key: by design (§2 "a proxy that read the offer reads the
  answer"; the keys go sealed, exclusive); only the peer can name it;
- cross-dialog and cross-direction reuse: slots are (Call-ID, tag, parties), a
  re-tagged or third-party message finds no key; a legacy peer's key (``"?"``) is
  never reused, and nothing is reused toward a ``[[legacy]]`` peer;
- CBC downgrade: ``DEFAULT_LIMITS`` refuse CBC except from a named legacy peer under a
  signature; the reference and CEKMaxDecrypts of GCM envelopes are under the tag;
- 496 from a proxy of another domain (``accepts_proxy``), with a foreign certificate
  for a configured host (pinned), or with a fingerprint mismatch: refused;
- policy headers on a stranger's message or for a configured host: not learnt.

Fixed (stop 31): a dialog key found while opening a message counts its use only
once the message passed every check (``DialogKeys.opening_lookup`` returns
``PendingUses``; ``UAEngine._open`` spends them next to keeping the received keys),
as the proxy's ``_spend`` does; what a configured proxy's 496 teaches is an entry of
its own beside the configured one, with the usual expiry, so the configured rules
never widen (``LearnedPolicies.learn_496``).
"""

from __future__ import annotations

import os

import pytest

from e2m_lab.flows import (SDP_ANSWER, SDP_OFFER, TRUSTED, answer, invite, known_proxy,
                           message, proxy_engine, reinvite, reply_from, ua_engine)
from e2m_plugins.errors import E2MError, ReplayError
from e2m_plugins.sip import SipMessage, make_request
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine
from tests.unit.test_review53 import Clock


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


def _engine(world, name: str, clock: Clock | None = None, **settings) -> UAEngine:
    engine = ua_engine(world, name, peers=("alice", "bob", "carol"), **settings)
    return engine if clock is None else UAEngine(engine.config, clock=clock)


def _new_branch(request: SipMessage) -> SipMessage:
    """A hop's copy of ``request``: the same bytes, a top Via branch of its own."""
    via = request.get("Via") or ""
    head = via.split(";branch=")[0]
    return request.replace("Via", f"{head};branch=z9hG4bK{os.urandom(6).hex()}")


# --------------------------------------------------------------------------------------
# Hole 1: refused copies of a request spend uses of the phone's dialog key


def _call_with_a_reinvite(world, call_id: str):
    """alice (a1) calls bob (b1), bob answers under K0, ACK; bob re-INVITEs under K0 and
    alice answers 200.  Returns (alice, bob, bob's sealed re-INVITE)."""
    alice, bob = _engine(world, "alice"), _engine(world, "bob")
    offer = alice.protect(invite(world, call_id=call_id)).message
    ok = bob.protect(answer(bob.open(offer).message, to_tag="b1"))
    assert ok.info.key_reuse
    alice.open(ok.message)
    ack = make_request("ACK", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                       to_uri=world.aor("bob"), call_id=call_id, cseq=1, from_tag="a1",
                       to_tag="b1")
    bob.open(alice.protect(ack).message)
    sent = bob.protect(reinvite(world, "bob", "alice", call_id, 1, "b1", "a1", SDP_ANSWER))
    assert sent.info.key_reuse
    got = alice.open(sent.message).message
    reply = alice.protect(answer(got, SDP_OFFER))
    bob.open(reply.message)
    return alice, bob, sent.message


def _bobs_next_reinvite(world, alice: UAEngine, bob: UAEngine, call_id: str) -> bytes:
    sent = bob.protect(reinvite(world, "bob", "alice", call_id, 2, "b1", "a1", SDP_ANSWER))
    assert sent.info.key_reuse               # bob still holds K0 as usable
    return alice.open(sent.message).message.body


def test_control_the_dialog_key_carries_bobs_next_reinvite(world):
    alice, bob, captured = _call_with_a_reinvite(world, "r63-uses-control")
    # a hop's copy with a branch of its own is refused as a replay
    with pytest.raises(ReplayError):
        alice.open(_new_branch(captured))
    assert _bobs_next_reinvite(world, alice, bob, "r63-uses-control") == SDP_ANSWER


def test_hole_replays_refused_by_the_phone_still_use_up_the_dialog_key(world):
    call_id = "r63-uses-hole"
    alice, bob, captured = _call_with_a_reinvite(world, call_id)
    for _ in range(alice.config.cek_max_uses):
        with pytest.raises(E2MError):        # every copy is refused (403, then 493) ...
            alice.open(_new_branch(captured))
    # ... so none may cost the live call its key: bob's next body under it must open
    assert _bobs_next_reinvite(world, alice, bob, call_id) == SDP_ANSWER


# --------------------------------------------------------------------------------------
# Hole 2: a 496 widens a configured proxy's rules, and what it added never expires


def _after_a_496(world, *, configured: bool):
    """alice (with a clock) sends bob a MESSAGE; the home proxy, which views MESSAGE
    text, answers 496; alice learns and retries.  ``configured``: alice has the proxy in
    ``[[proxies]]`` for ``INVITE:application/sdp`` only.  Returns (alice, clock)."""
    clock = Clock()
    proxies = (known_proxy(world, TRUSTED, ("INVITE:application/sdp",)),) if configured else ()
    alice = _engine(world, "alice", clock, proxies=proxies)
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:text/plain",))
    plain = message(world)
    sent = alice.protect(plain)
    assert TRUSTED not in sent.info.readable_by
    verdict = proxy.inspect(sent.message)
    assert verdict.action == "reply" and verdict.code == 496
    reaction = alice.react(reply_from(sent.message, verdict), plain)
    assert reaction.action == "retry" and TRUSTED in (reaction.learned or "")
    return alice, clock


def _later_message_readers(world, alice: UAEngine) -> tuple[str, ...]:
    return alice.protect(message(world, b"a day later")).info.readable_by


def test_control_a_496_from_a_proxy_not_configured_lapses(world):
    alice, clock = _after_a_496(world, configured=False)
    assert TRUSTED in _later_message_readers(world, alice)     # learnt at once
    clock.now += alice.config.max_policy_expires + 60
    assert TRUSTED not in _later_message_readers(world, alice)


def test_control_the_configured_proxy_reads_no_message_before_any_496(world):
    clock = Clock()
    alice = _engine(world, "alice", clock,
                    proxies=(known_proxy(world, TRUSTED, ("INVITE:application/sdp",)),))
    assert TRUSTED not in _later_message_readers(world, alice)
    assert TRUSTED in alice.protect(invite(world)).info.readable_by


def test_hole_a_496_widens_a_configured_proxys_rules_for_good(world):
    alice, clock = _after_a_496(world, configured=True)
    assert TRUSTED in _later_message_readers(world, alice)     # learnt at once, as above
    clock.now += alice.config.max_policy_expires + 60
    # a rule the wire taught lives at most max_policy_expires (docs/protocol.md §6)
    assert TRUSTED not in _later_message_readers(world, alice)
