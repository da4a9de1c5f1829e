"""A twentieth attacker's review (December 2026) of this session's changes: a4bf6cf (keys go
only with the message that kept them), 633897a + 455fd33 (a signed body binds its message's
To tag, ``e2m-sip-to-tag``, "" for none) and 383420b (the front's failover; wire test in
tests/kamailio/test_review20_wire.py).

Every signed body now says which dialog it was made for, yet the proxy still records a
*request* against replay by its context alone (``ProxyEngine._first_sighting``:
``check_and_record(contexts[0], None, ...)``, no To tag), although a response's record has
carried its To tag since review 11.  Two requests that differ only in their To tag are two
messages of two dialogs: the caller's requests to each fork of a forked call (RFC 3261
§13.2.2.4: a UAC may keep every dialog a forked INVITE's 2xx made, and each dialog's
CSeq goes on from the INVITE's, so her first re-INVITE in each is CSeq 2, her ACK of each
2xx carries the INVITE's CSeq).  The proxy refuses the second as a replay of the first.
Before 633897a that was the price of a context that bound no To tag (a hop's re-tagged
copy had to be a replay); now a new sender's re-tagged copy is refused by
``check_message`` before any record, and the To tag the body binds can be part of what
is recorded, as it is for responses.

``test_hole_*`` was a strict xfail (it fails on 455fd33) and passes since a request's replay
record includes the To tag its body binds (``ProxyEngine._first_sighting``); its docstring
names who is hurt, the flow, the effect and the fix.  ``test_control_*`` is the same flow without the second
fork (or the attack) and passes.  Run as new senders (no ``older_senders``).

Held (tried, no test): a re-tagged copy is refused before any replay record or key use
(proxy and UA), so it cannot spend the real message's record; a second signer or an
outer layer binding another tag, or none, next to one that binds a tag (refused:
``_context_of`` sees two tags); older readers skip the attribute (``cms/signed.py`` keeps
unknown attributes, reads none it does not know); the UA binds the tag of the bytes it
signs (``protect`` of the message as sent, the pjsua hook on the wire bytes), so CANCEL,
a non-2xx ACK (no body), retries after 401/407/491/3xx (a new request, re-protected by
``next_attempt``) and callee re-INVITEs bind what they carry; duplicate or mixed-case
``tag`` parameters are malformed to the core's parser; a BYE for a dialog that holds
nothing takes nothing from the early scopes; a failed request drops only names it kept
afresh (``Verdict.kept``).  Noted, not an attack: a To tag over 1024 octets (legal SIP)
cannot be decoded (``sipcontext._MAX_TEXT``), so every signed body bound to it is
refused, where before 633897a only the Call-ID and From tag had that bound.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_OFFER, TRUSTED, answer, apply_forward, proxy_engine
from e2m_plugins.keycache import MemoryKeyCache
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review12 import NEW_SDP, SDP_VIEW, _invite, _retag, _ua
from tests.unit.test_review13 import _Clock


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


def _forked_call(world, call_id: str, tags: tuple[str, ...]):
    """alice's signed offer through a fresh proxy, forked to bob's devices (one UA engine
    each, all bob), each of which answers 200 with its own To tag; the proxy reads each
    200 and alice opens each.  Returns (proxy, alice)."""
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=_Clock()))
    alice = _ua(world, "alice", "bob")
    offer = alice.protect(_invite(world, "alice", "bob", call_id)).message
    verdict = proxy.inspect(offer)
    assert verdict.action == "forward", f"{verdict.code} {verdict.error}"
    who = proxy.answer_caller(offer, verdict)
    delivered = apply_forward(offer, verdict)
    for tag in tags:
        device = _ua(world, "bob", "alice")
        ok = device.protect(answer(device.open(delivered).message, to_tag=tag)).message
        seen = proxy.inspect(ok, caller=who)
        assert seen.seen and seen.error is None, seen.error
        alice.open(ok)
    return proxy, alice


def _reinvite(world, alice, call_id: str, to_tag: str):
    """alice's first re-INVITE in the dialog with ``to_tag`` (CSeq 2: the dialog's CSeq goes
    on from the INVITE's), signed, sealed for the proxy."""
    return alice.protect(_invite(world, "alice", "bob", call_id, cseq=2, to_tag=to_tag,
                                 sdp=NEW_SDP)).message


def test_control_a_reinvite_in_the_second_fork_alone_is_read(world):
    """The flow without the first fork's re-INVITE: alice's re-INVITE in the dialog with
    bob's second device is read and forwarded."""
    proxy, alice = _forked_call(world, "fork-control@x", ("b1", "b2"))
    verdict = proxy.inspect(_reinvite(world, alice, "fork-control@x", "b2"))
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"


def test_control_a_retagged_copy_of_a_reinvite_is_still_refused(world):
    """What keeps the fix safe: a hop's copy of alice's re-INVITE in one fork, re-tagged for
    the other, is refused by the To tag binding (before any replay record), and the real
    re-INVITE passes after it."""
    proxy, alice = _forked_call(world, "fork-copy@x", ("b1", "b2"))
    real = _reinvite(world, alice, "fork-copy@x", "b1")
    copy = proxy.inspect(_retag(real, "b2"))
    assert copy.action == "reply" and copy.error == "BindingMismatchError", copy.error
    assert proxy.inspect(real).action == "forward"


def test_hole_the_callers_reinvite_in_a_second_fork_is_refused_as_a_replay(world):
    """No attacker: a legitimate forked call breaks.  alice calls bob, whose two devices both
    answer 200 (To tags b1, b2); she keeps both dialogs (RFC 3261 §13.2.2.4 allows it, and
    a UAC keeps them until it has ACKed and chosen).  Her re-INVITE in the first dialog is
    read; her re-INVITE in the second (CSeq 2 as well: each dialog's CSeq goes on from the
    INVITE's) is a different message, signed for its own To tag, yet the proxy answers it
    ``403 Replayed or stale body``: ``_first_sighting`` records a request by its context
    alone, and the two contexts differ only in the To tag the record leaves out.  The same
    refusal meets her ACKs of the two 2xx when they carry bodies (a late offer: both are
    CSeq 1 ACK; Kamailio's ``inspect_only`` then leaves the second answer unarchived), her
    PRACKs and UPDATEs in two early dialogs, any request with a body that she sends in two
    forks at the same CSeq.

    Fix: record a request's body with the To tag its signer bound when it binds one
    (``check_and_record(context, None, retransmissions=False, to_tag=context.to_tag)``:
    None for an older sender's body, which keeps today's key; the replay htable's key the
    same way) — safe now that a re-tagged copy of a new sender's body fails
    ``check_message`` before it is recorded (test_control_a_retagged_copy_...), as the
    response side already does (``replay_key(to_tag)``)."""
    proxy, alice = _forked_call(world, "fork@x", ("b1", "b2"))
    first = proxy.inspect(_reinvite(world, alice, "fork@x", "b1"))
    assert first.action == "forward" and first.seen, f"{first.code} {first.error}"
    second = proxy.inspect(_reinvite(world, alice, "fork@x", "b2"))
    assert second.action == "forward" and second.seen, f"{second.code} {second.error}"
