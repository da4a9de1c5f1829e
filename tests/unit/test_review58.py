"""A fifty-eighth attacker's review (December 2026) of b4bb1dc: the last two fixes
(reviews 56 and 57), quickly: the UA engine's dialog and key state learnt only from
accepted responses and sealed answers; the proxy's removal of policies in its own name
from responses and bare BYE/CANCEL, of asserted identities, and of replies with a second
From/To/Call-ID/CSeq.

Hole 1 is Kamailio's (``tests/kamailio/test_review58_wire.py``,
``test_hole_a_bare_ack_carries_a_policy_in_the_proxys_name``): **insider UA** (alice,
the caller; any user whose calls reach bob through bob's home proxy) or an **untrusted
hop** before that proxy.  alice's ACK to bob's 200 (in the dialog, Route: the proxy's
Record-Route) carries ``Proxy-Body-Policy: <bob's proxy>;...;cert-fp="sha256:<another
certificate>"``.  Review 57 made the proxy remove policies in its name from every
request it reads, responses, and bare BYE/CANCEL; but an in-dialog ACK is relayed by
``kemi.route_in_dialog`` with ``KSR.tm.t_relay()`` alone (a bare ACK), or after
``inspect_only`` (an ACK with a body), which never applies ``verdict.remove_headers``.
bob's engine learns policies from any request of his dialog with a To tag (an ACK
included, ``UAEngine._policy_origin``); the fingerprint differs, so ``learn`` drops his
home proxy's certificate globally (``certs.remove_proxy``) and his next MESSAGE, to
anyone, is refused 496 by his own proxy (controls here).  At fault:
``kamailio_app/kemi.py`` ``route_in_dialog`` (``if KSR.is_ACK(): ... KSR.tm.t_relay()``)
and ``inspect_only``.  Fix: before relaying any ACK (and CANCEL), remove policy headers
naming this proxy (a header-only pass: ``KSR.hdr.is_present(PROXY_BODY_POLICY)`` then
``engine._policies_in_our_name``/``_remove_by_name``), and let ``inspect_only`` apply
``verdict.remove_headers``; or have the UA not learn from an ACK (nothing asked it).

Controls (this module): the engine's ``inspect`` of that ACK removes the policy (the fix
is at hand); bob, opening the ACK as Kamailio relays it, drops his proxy's certificate
and his next MESSAGE is 496 at his own proxy; the same call with an honest ACK leaves
his next MESSAGE read by the proxy.

Looked at, held (engine):

- ``open`` runs ``_note_confirmed``/``_note_early_peer``/``_settle`` only after
  ``_open`` accepted the response; a failure's dialog end (``_ends_dialog``) still runs
  before the body checks, so a failure with a body that does not open still ends the
  INVITE attempt's keys and entry.
- ``_note_early_peer`` keeps only tags holding keys; a bare 180's tag is not in
  ``_early_peers`` but holds no key either, so a second dialog naming it cannot drop a
  key (none exists under it) and ``_tags_of_other_dialogs`` keeps the caller's slots.
- ``_tags_of_other_dialogs``: a held second dialog naming the callee's tag (``written``)
  no longer keeps the real call's keys past its BYE; a second dialog ending keeps the
  live call's sure tags (its own and its confirmed/early peers').
- CANCEL with a policy: the UA learns nothing from it (no To tag), so the unread relay
  of a CANCEL does not matter.

Fixed (stop 30): the proxy reads an in-dialog ACK that carries a ``Proxy-Body-Policy``
(as one with a body) and ``inspect_only`` applies the verdict's ``remove_headers``, so
a policy in the proxy's name goes from an ACK as from any request.  The hole's marker
is gone; it is a guard now.
"""

from __future__ import annotations

import hashlib

import pytest

from e2m_lab.flows import TRUSTED, answer, apply_forward, invite, message, proxy_engine, ua_engine
from e2m_plugins import headers as hdr
from e2m_plugins.sip import make_request
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review57 import registered_user

VIEW = ("MESSAGE:*",)
FORGED_FP = hashlib.sha256(b"not the home proxy's certificate").digest()


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"))


def _forged_policy(proxy):
    return hdr.PolicyHeader(TRUSTED, view=proxy.config.view, cert_fingerprint=FORGED_FP,
                            cert_url=proxy.config.cert_url).format()


def _ack(world, call_id, to_tag, headers):
    return make_request("ACK", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                        to_uri=world.aor("bob"), call_id=call_id, cseq=1, from_tag="a1",
                        to_tag=to_tag, extra_headers=headers)


def _call_then_ack(world, proxy, call_id, *, forged: bool):
    """alice calls bob through his proxy; bob answers; alice's ACK (with the forged
    policy or not) reaches bob as Kamailio relays an ACK (untouched).  Returns bob and
    the ACK."""
    bob = registered_user(world, proxy, "bob")
    alice = ua_engine(world, "alice", peers=("bob",))
    sent = alice.protect(invite(world, call_id=call_id)).message
    delivered = bob.open(apply_forward(sent, proxy.inspect(sent))).message
    ok = bob.protect(answer(delivered)).message
    alice.open(apply_forward(ok, proxy.inspect(ok)))
    headers = [(hdr.PROXY_BODY_POLICY, _forged_policy(proxy))] if forged else []
    ack = alice.protect(_ack(world, call_id, ok.to_tag, headers)).message
    bob.open(ack)
    return bob, ack


def _bobs_next_message(world, proxy, bob):
    sent = bob.protect(message(world, b"bob to carol", sender="bob", recipient="carol")).message
    return proxy.inspect(sent)


def test_control_the_engine_removes_the_policy_from_an_ack_it_reads(world):
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    ack = _ack(world, "r58-ack-read@x", "b1", [(hdr.PROXY_BODY_POLICY, _forged_policy(proxy))])
    verdict = proxy.inspect(ack)
    assert verdict.action == "forward"
    assert verdict.remove_headers == ((hdr.PROXY_BODY_POLICY, _forged_policy(proxy)),)


def test_control_an_honest_ack_leaves_bobs_proxy_in_place(world):
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    bob, _ = _call_then_ack(world, proxy, "r58-ack-honest@x", forged=False)
    assert bob.certs.proxy(TRUSTED) is not None
    verdict = _bobs_next_message(world, proxy, bob)
    assert verdict.action == "forward" and verdict.seen, verdict


def test_control_an_ack_with_the_policy_no_longer_drops_bobs_proxys_certificate(world):
    """The wire hole's effect was: bob opens alice's ACK as Kamailio relays it (the
    policy in his proxy's name still on it), drops his proxy's certificate, and his next
    MESSAGE, to carol, is refused 496 by his own proxy.  Since stop 48 (review 164 K2) a
    dialog's policy takes no certificate from the other calls: bob keeps it."""
    proxy = proxy_engine(world, TRUSTED, view=VIEW)
    bob, _ = _call_then_ack(world, proxy, "r58-ack-forged@x", forged=True)
    assert bob.certs.proxy(TRUSTED) is not None
    verdict = _bobs_next_message(world, proxy, bob)
    assert verdict.action == "forward", verdict
