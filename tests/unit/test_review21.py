"""A twenty-first attacker's review (December 2026) of 6ba91e7: a request's replay record
includes the To tag its body binds (``ProxyEngine._first_sighting``), and a dispatcher
front fails over on a node's 503 only when it is the sync gate's ``Catching Up`` (wire:
tests/kamailio/test_review21_wire.py, where the hole of this review is).

The replay change held.  The tests here are controls (they pass): what a hop can do with
a new sender's request now that its record carries the bound To tag.  The record's To
tag is the *signed* one (lower-cased by the attribute), not the message's, so every copy
that passes ``check_message`` has the same record: the same request again, a copy with
the To tag in another case, are replays; a copy under another tag ("" vs a real one, one
fork's into another's) fails the binding before anything is recorded, so the real one
passes after it.  Run as new senders (no ``older_senders``).
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review12 import _invite, _retag, _ua
from tests.unit.test_review20 import _forked_call, _reinvite


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


def _refused(verdict, error: str) -> bool:
    return verdict.action == "reply" and verdict.error == error


def test_control_the_same_reinvite_twice_is_still_a_replay(world):
    """alice's re-INVITE in fork b1, sent again by a hop: the second is refused (the To tag
    in the record changes nothing for a copy of the same message)."""
    proxy, alice = _forked_call(world, "r21-twice@x", ("b1", "b2"))
    real = _reinvite(world, alice, "r21-twice@x", "b1")
    assert proxy.inspect(real).action == "forward"
    again = proxy.inspect(real)
    assert _refused(again, "ReplayError"), (again.code, again.error)


def test_control_a_copy_with_the_to_tag_in_another_case_is_a_replay(world):
    """A hop's copy of the re-INVITE with To tag ``B1`` for ``b1``: the binding compares
    without case (passes) and the record holds the signed, lower-cased tag, so it is the
    same record: refused as a replay, before or after the real one."""
    proxy, alice = _forked_call(world, "r21-case@x", ("b1", "b2"))
    real = _reinvite(world, alice, "r21-case@x", "b1")
    assert proxy.inspect(real).action == "forward"
    upper = proxy.inspect(_retag(real, "B1"))
    assert _refused(upper, "ReplayError"), (upper.code, upper.error)

    proxy, alice = _forked_call(world, "r21-case2@x", ("b1", "b2"))
    real = _reinvite(world, alice, "r21-case2@x", "b1")
    assert proxy.inspect(_retag(real, "B1")).action == "forward"    # the hop's, first
    second = proxy.inspect(real)
    assert _refused(second, "ReplayError"), (second.code, second.error)


def test_control_a_forks_reinvite_replayed_into_the_other_fork_is_refused_first(world):
    """A captured re-INVITE of fork b1 re-tagged into fork b2 (sent before alice's own
    re-INVITE in b2, same CSeq): refused by the binding, nothing recorded, so alice's own
    b2 re-INVITE and her b1 one both pass after it."""
    proxy, alice = _forked_call(world, "r21-cross@x", ("b1", "b2"))
    b1 = _reinvite(world, alice, "r21-cross@x", "b1")
    copy = proxy.inspect(_retag(b1, "b2"))
    assert _refused(copy, "BindingMismatchError"), (copy.code, copy.error)
    assert proxy.inspect(_reinvite(world, alice, "r21-cross@x", "b2")).action == "forward"
    assert proxy.inspect(b1).action == "forward"


def test_control_an_initial_invite_given_a_made_up_to_tag_is_refused(world):
    """alice's initial INVITE (binds "") copied by a hop with a made-up To tag (an
    in-dialog request of a dialog the hop invents, a record keyed under another tag):
    refused by the binding; the real INVITE passes after it, and again is a replay."""
    proxy, _ = _forked_call(world, "r21-other@x", ())
    alice = _ua(world, "alice", "bob")
    offer = alice.protect(_invite(world, "alice", "bob", "r21-init@x")).message
    made_up = offer.replace("To", offer.get("To") + ";tag=hop1")
    copy = proxy.inspect(made_up)
    assert _refused(copy, "BindingMismatchError"), (copy.code, copy.error)
    assert proxy.inspect(offer).action == "forward"
    again = proxy.inspect(offer)
    assert _refused(again, "ReplayError"), (again.code, again.error)
