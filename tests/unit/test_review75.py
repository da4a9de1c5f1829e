"""A seventy-fifth attacker's review (December 2026) of 8e54426: the curious chosen proxy,
again (``e2m_plugins/ua.py`` ``_protect``/``_seal_for``, ``dialog_keys.py`` reuse,
``learned_policies.py``, ``sdp.py``), with the real engines of ``e2m_lab.flows``.

``test_hole_*`` xfail strictly on 8e54426 (their assertion is the secure behaviour);
``test_control_*`` are the same flows without the attack, or show that the attack's
messages are taken as far as they should be (they pass).

Hole 1 (``test_hole_a_proxy_alice_refuses_reads_her_sdp_through_bobs_fresh_key``,
``test_hole_a_third_domain_proxy_reads_alices_sdp_after_a_rekey``,
``test_hole_the_peers_proxy_forges_a_493_and_reads_alices_answer``): a proxy the *peer*
chose reads the caller's SDP although the caller's own bound (``[e2m] accept_proxies``,
or by default her domain and the peer's) refuses it.  ``UAEngine._protect`` takes
``audience = proxies | shared.readers`` where ``shared`` is the dialog key with the most
readers (``DialogKeys._reusable``, "a proxy that read the offer reads the answer"), and
those readers come from the *peer's* signed context: nothing asks ``accepts_proxy`` about
them (``_readers_for`` does, for policies only).  A key the peer offered afresh names the
peer's own choice (bob's ``[[proxies]]`` entries pass ``_readers_for`` as configured,
whatever their domain).  Attacker: the curious chosen proxy, chosen by bob (his home proxy,
or a compliance recorder his configuration names in a third domain), that wants alice's
bodies too.  Messages: (a) late offer: alice's bodiless INVITE, bob's 200 with his SRTP
offer sealed for alice and Q under a fresh key K_b (readers [Q]), alice's ACK with her SRTP
answer; (b) early offer, a call longer than ``cek_max_age`` (3600 s) or ``cek_max_uses``:
bob's re-INVITE (hold, unhold) finds no usable key and offers K_b afresh for alice and Q;
alice's 200 answers; (c) at once, in any call: Q answers bob's first re-INVITE with a 493
carrying alice's certificate (public: it rides in every body she signs); bob retires every
key of the call (``_learn_493``, ``retire_dialog``) and retries under a fresh key naming Q;
alice's 200 answers under it.  Effect: alice's answer (her address, ports, codecs: the SDP view; the
SRTP keys stay sealed for bob alone) is sealed under K_b, which Q holds: Q opens and
archives it, and alice's own ``readable_by`` lists a host she refuses as a reader (a 496
or a policy from Q is refused by her: the controls).  Every later re-INVITE/UPDATE of
alice's in the call goes the same way (``_reusable`` prefers the key with the most readers).
Faulty lines: ``ua.py`` ``_protect``: ``audience = frozenset(p.host for p in proxies) |
(shared.readers if shared else frozenset())`` and ``dialog_keys.py`` ``_reusable``
(``shared = [k for k in keys if "?" not in k.readers]``: any named holder qualifies).
Fix: reuse for what we send only a key whose readers we would choose ourselves
(``is_configured(host) or accepts_proxy(host, peer)`` for each reader, e.g. a predicate
passed to ``reusable``/``reuse``); else seal under a fresh key for the peer and our own
readers (or under an exclusive key).  Review 63 listed "a peer-chosen proxy reading alice's
later SDP views under bob's answer key" as by design, "only the peer can name it": the peer
can name hosts the sender's own bound refuses.

What held (tried, no test kept unless named):

- SRTP keys: never in what a proxy opens.  ``separate_keys`` takes every ``a=crypto``,
  ``a=key-mgmt`` and ``k=`` line (attribute names without case, session level too); an SDP
  it cannot parse (upper-case letter, CR in a line, too big) is not sent at all; the keys go
  under an exclusive key only (``_reusable(exclusive=True)`` needs no readers) or the peer's
  certificate; every message under a reused key has a fresh CEK wrapped under the old one
  (kekri), so a proxy given its own RecipientInfo beside a kekri gets that message's CEK,
  never the dialog key (checked: bob's answer under alice's exclusive offer key with his
  proxy added leaves the key exclusive);
- a proxy chosen for ``MESSAGE:text/plain`` only: MESSAGE never offers or reuses a key
  (``SESSION_METHODS``), so it holds no dialog key and reads no SDP through reuse; an
  INVITE or UPDATE body reaches it only by a policy in force (``Rule.covers``);
- re-sealing the view with the sealed keys' reference (visible in the keys envelope's
  ``authAttrs``): ``_keep_received`` keeps only the reference the signed context names;
  the keys envelope is refused with more than one recipient, and kept as exclusive only when
  sealed to the certificate (not a kekri);
- dialog keys after BYE: the slots of the Call-ID between the parties go at our BYE or our
  2xx to the peer's; a later call has a new Call-ID and slots; MESSAGE text is never sealed
  under a key a proxy kept;
- a configured proxy's 496 with a wider policy header: a learnt entry beside the configured
  one, lapsing (review 63's fix); a 496 or policy from a host outside ``accept_proxies``:
  refused (controls below);
- a 4xx-6xx with an SDP goes out as it is (``_protectable``), but pjsip puts no SDP in a
  final failure answer; ``a=fingerprint`` and ``a=ice-pwd`` are in the view (not SRTP
  keys; the signature stops changes).

Fixed (stop 32): a UA reuses a dialog key for what it sends only when every holder is
a host it would choose itself (``DialogKeys.reusable``/``reuse`` take an
``acceptable`` test; ``UAEngine._chooser``: configured, or ``accepts_proxy``); all
three holes and the phone's turned XPASS, and the markers are gone.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SDP_VIEW, SRTP_ANSWER, SRTP_OFFER, TRUSTED, answer, apply_forward,
                           invite, known_proxy, proxy_engine, reinvite, reply_from, ua_engine)
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine
from tests.unit.test_review53 import Clock

BOBS = "bobs-proxy.example.com"          # bob's home proxy: alice's accept_proxies leaves it out
RECORDER = "recorder.elsewhere.net"      # bob's configured recorder, in neither party's domain
ALICE_KEY = b"WVNf"                      # SRTP_OFFER's key (alice's SDP in these flows)


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


def _bodiless_invite(world, call_id: str) -> SipMessage:
    return make_request("INVITE", f"sip:bob@{world.domain}", from_uri=world.aor("alice"),
                        to_uri=world.aor("bob"), call_id=call_id, cseq=1, from_tag="a1",
                        extra_headers=[("Contact", "<sip:alice@127.0.0.1:5061>")])


def _ack(world, call_id: str, sdp: bytes = b"") -> SipMessage:
    extra = dict(body=sdp, content_type="application/sdp") if sdp else {}
    return make_request("ACK", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                        to_uri=world.aor("bob"), call_id=call_id, cseq=1, from_tag="a1",
                        to_tag="b1", **extra)


def _seen(verdict) -> list[bytes]:
    return [s.plaintext for s in verdict.seen]


# --------------------------------------------------------------------------------------
# Hole 1 (a): late offer


def _late_offer(world, call_id: str):
    """alice (accept_proxies: the home proxy only) sends a bodiless INVITE; bob (home proxy
    BOBS configured for INVITE SDP) offers SRTP in his 200, through BOBS.
    Returns (alice, bob, q, what alice received)."""
    q = proxy_engine(world, BOBS, view=SDP_VIEW)
    alice = ua_engine(world, "alice", accept_proxies=(TRUSTED,))
    bob = ua_engine(world, "bob", proxies=(known_proxy(world, BOBS, SDP_VIEW),))
    sent = alice.protect(_bodiless_invite(world, call_id)).message
    verdict = q.inspect(sent)
    assert verdict.action == "forward"
    got = bob.open(apply_forward(sent, verdict)).message
    ok = bob.protect(answer(got, SRTP_ANSWER))
    assert ok.info.readable_by == (BOBS,)          # bob chose his proxy: by design
    verdict = q.inspect(ok.message)
    assert _seen(verdict) and b"a=crypto" not in _seen(verdict)[0]
    opened = alice.open(apply_forward(ok.message, verdict))
    assert b"a=crypto" in opened.message.body      # bob's keys reached alice alone
    return alice, bob, q


def test_control_alice_refuses_bobs_proxy_herself(world):
    """Asked directly, alice refuses BOBS: its 496 teaches nothing and sends nothing, and
    its policy header on bob's answer is not learnt."""
    alice = ua_engine(world, "alice", accept_proxies=(TRUSTED,))
    q = proxy_engine(world, BOBS, view=SDP_VIEW)
    plain = invite(world, SRTP_OFFER, call_id="r75-refuses")
    sent = alice.protect(plain)
    assert sent.info.readable_by == ()
    verdict = q.inspect(sent.message)
    assert verdict.action == "reply" and verdict.code == 496
    reaction = alice.react(reply_from(sent.message, verdict), plain)
    assert reaction.action == "fail" and "not a proxy we accept" in reaction.reason
    # and alice's domain default would have taken it: the refusal is her configuration's
    default = ua_engine(world, "alice")
    assert default.accepts_proxy(BOBS, world.aor("bob"))
    assert not alice.accepts_proxy(BOBS, world.aor("bob"))


def test_control_late_offer_works_and_bobs_proxy_reads_bobs_sdp_only(world):
    """The late-offer call goes through: bob's proxy reads bob's SDP view (his choice),
    never his SRTP key; alice's ACK with a bodiless answer reaches nobody else."""
    alice, bob, q = _late_offer(world, "r75-late-control")
    ack = alice.protect(_ack(world, "r75-late-control"))
    assert not q.inspect(ack.message).seen


def test_hole_a_proxy_alice_refuses_reads_her_sdp_through_bobs_fresh_key(world):
    call_id = "r75-late-hole"
    alice, bob, q = _late_offer(world, call_id)
    ack = alice.protect(_ack(world, call_id, SRTP_OFFER))
    verdict = q.inspect(ack.message)
    # the SRTP key never reaches it (held) ...
    assert all(ALICE_KEY not in p for p in _seen(verdict))
    got = bob.open(apply_forward(ack.message, verdict)).message
    assert ALICE_KEY in got.body
    # ... but nor may alice's SDP: she does not accept BOBS as a reader of her bodies
    assert BOBS not in ack.info.readable_by
    assert not verdict.seen


# --------------------------------------------------------------------------------------
# Hole 1 (b): early offer, a long call re-keyed by bob, default configuration


def _long_call(world, call_id: str, clock: Clock):
    """alice calls bob with SRTP (early offer, nobody reads it); bob's configured recorder
    (a third domain) reads what bob sends; once the call's key aged out (``cek_max_age``,
    60 s here for the default 3600, so that every clock stays within the replay window)
    bob re-INVITEs (hold, unhold)."""
    rec = proxy_engine(world, RECORDER, view=SDP_VIEW)
    alice = UAEngine(ua_engine(world, "alice", cek_max_age=60).config, clock=clock)
    bob = UAEngine(ua_engine(world, "bob", cek_max_age=60,
                             proxies=(known_proxy(world, RECORDER, SDP_VIEW),)).config,
                   clock=clock)
    sent = alice.protect(invite(world, SRTP_OFFER, call_id=call_id))
    assert sent.info.readable_by == ()
    got = bob.open(sent.message).message
    ok = bob.protect(answer(got, SRTP_ANSWER))
    # bob's recorder gets its own RecipientInfo beside the kekri under alice's exclusive
    # key: that message's CEK, not the key (which stays exclusive: the keys go under it)
    assert ok.info.readable_by == (RECORDER,) and ok.info.key_reuse and ok.info.split
    alice.open(ok.message)
    bob.open(alice.protect(_ack(world, call_id)).message)
    clock.now += alice.config.cek_max_age + 1
    re = bob.protect(reinvite(world, "bob", "alice", call_id, 1, "b1", "a1", SRTP_ANSWER))
    assert re.info.readable_by == (RECORDER,) and not re.info.key_reuse   # a fresh key
    assert _seen(rec.inspect(re.message))
    got = alice.open(re.message).message
    return alice, rec, got


def test_control_alice_never_accepts_the_recorder_herself(world):
    alice = ua_engine(world, "alice")
    assert not alice.accepts_proxy(RECORDER, world.aor("bob"))


def test_hole_a_third_domain_proxy_reads_alices_sdp_after_a_rekey(world):
    alice, rec, got = _long_call(world, "r75-rekey-hole", Clock())
    reply = alice.protect(answer(got, SRTP_OFFER, to_tag="a1"))
    verdict = rec.inspect(reply.message)
    assert all(ALICE_KEY not in p for p in _seen(verdict))     # keys held
    assert RECORDER not in reply.info.readable_by
    assert not verdict.seen


# --------------------------------------------------------------------------------------
# Hole 1 (c): the same at once: the proxy makes bob re-key with one forged 493


def _call_then_bobs_reinvite(world, call_id: str):
    """An answered SRTP call (early offer, nobody reads alice's offer); bob's recorder reads
    what bob sends; bob re-INVITEs (hold).  Returns (alice, bob, rec, plain, sent)."""
    rec = proxy_engine(world, RECORDER, view=SDP_VIEW)
    alice = ua_engine(world, "alice")
    bob = ua_engine(world, "bob", proxies=(known_proxy(world, RECORDER, SDP_VIEW),))
    got = bob.open(alice.protect(invite(world, SRTP_OFFER, call_id=call_id)).message).message
    alice.open(bob.protect(answer(got, SRTP_ANSWER)).message)
    bob.open(alice.protect(_ack(world, call_id)).message)
    plain = reinvite(world, "bob", "alice", call_id, 1, "b1", "a1", SRTP_ANSWER)
    sent = bob.protect(plain)
    assert sent.info.key_reuse and sent.info.readable_by == (RECORDER,)
    return alice, bob, rec, plain, sent.message


def test_control_bobs_reinvite_under_alices_key_shows_the_recorder_nothing_of_hers(world):
    alice, bob, rec, plain, sent = _call_then_bobs_reinvite(world, "r75-493-control")
    assert rec.inspect(sent).seen                   # bob's own SDP: his choice
    got = alice.open(sent).message
    reply = alice.protect(answer(got, SRTP_OFFER, to_tag="a1"))
    assert reply.info.readable_by == ()
    assert not rec.inspect(reply.message).seen


def test_hole_the_peers_proxy_forges_a_493_and_reads_alices_answer(world):
    from cryptography.hazmat.primitives import serialization
    alice, bob, rec, plain, sent = _call_then_bobs_reinvite(world, "r75-493-hole")
    # the recorder, on bob's path, answers bob's re-INVITE 493 as alice would: her
    # certificate is public (it rides in every body she signs)
    der = world.user("alice").cert.public_bytes(serialization.Encoding.DER)
    forged = make_response(sent, 493, "Undecipherable", [], der, "application/pkix-cert")
    reaction = bob.react(forged, plain)
    assert reaction.action == "retry"               # bob retires the call's keys, re-keys
    assert rec.inspect(reaction.request).seen       # a fresh key, the recorder a holder
    got = alice.open(reaction.request).message
    reply = alice.protect(answer(got, SRTP_OFFER, to_tag="a1"))
    verdict = rec.inspect(reply.message)
    assert all(ALICE_KEY not in p for p in _seen(verdict))     # keys held
    assert RECORDER not in reply.info.readable_by
    assert not verdict.seen
