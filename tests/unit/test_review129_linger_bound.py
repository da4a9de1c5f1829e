"""Review 129 (attacker's review of 4129b80), the caller's UA engine: how long a failed
INVITE's keys are kept since stop 42 (``DialogKeys.end_dialog(linger=...)``).

**Hole K2: the bound is kept for opening, not for keeping: a failed INVITE's CEK stays
in the caller's engine until ``cek_max_age`` (3600 s), not 32 s.**  Who gains: whoever
later reads the phone's memory (a crash dump, a compromised phone) with a capture of
the INVITE: the offer's CEK opens its SDP (its SRTP keys when it carried them) for an
hour after the failure, where before stop 42 the failure answer dropped it at once
(``end_dialog`` without ``linger``, ``_drop``).  No wire attacker; the docs' claim
(docs/protocol.md section 2: a dialog key lives until "a failure final response to
the INVITE (after which the caller's UA ... still opens a 2xx under it for 32 s)")
is the bound broken.

- Set-up: alice's ``UAEngine`` on a test clock, bob's device 1 a ``UAEngine``.
- Messages: alice's keyed INVITE (CEK reuse on, the default), device 1's 486 (To tag
  f1), opened by alice's engine (``_open`` -> ``_end_dialog(linger=32)``).
- Observed: right after, 1 key under the Call-ID (retired, ``open_until`` = now + 32).
  At +33 s and then +633 s, each time after more than ``_SWEEP_EVERY`` (256) other keys
  were kept (so the sweep ran): still 1 key, its CEK (16+ bytes) held.  Gone only at
  the first sweep past +3600 s (``test_control_k2_measured_...``).  It opens nothing
  after +32 s (control): the window itself holds.
- Code at fault: ``e2m_plugins/dialog_keys.py:296-300`` (``end_dialog`` with ``linger``
  retires the keys and sets ``open_until`` but leaves them in their slot) and
  ``:419-423`` (the sweep drops a slot only when every key in it is older than
  ``max_age``; ``open_until`` is never looked at), and ``settle`` (``:230-231``) keeps
  lingering keys on the failure too.  A side effect, by reading only: the slot
  counts against ``MAX_DIALOGS`` (4096) for the hour, where a failed attempt freed it.
- Suggested fix: treat ``open_until`` as an expiry: drop a key (and an emptied slot)
  whose ``open_until`` has passed, in ``_usable``/``_all`` when met and in the sweep
  (``all(now - k.created >= max_age or (k.open_until is not None and now >=
  k.open_until) ...)``), so the CEK is gone within the sweep after 32 s.

Controls (unmarked, pass):

- ``test_control_k2_the_lingering_key_stops_opening_after_the_window``: device 2's 200
  under the offer key opens at +30 s; another fork's 200 under it at +33 s raises
  ``NoMatchingRecipientError``.
- ``test_control_k2_measured_the_key_goes_only_at_cek_max_age``: the figures above.
- ``test_control_k2_a_dialog_the_peer_ends_drops_its_keys_at_once``: a 481 to alice's
  re-INVITE inside a confirmed call still drops every key of the call at once (no
  linger where none is meant).

Tried and held: a second failure cannot lengthen the window (``min``); a retired key
is never reused to send (``_reusable``); a stray failure answer to an INVITE already
answered 2xx, or to nothing alice sent, lingers nothing (``_ends_dialog``).

Fixed (stop 42), K2: ``DialogKeys`` notes each lingering slot with its ``open_until``
and drops the keys past it at the next use of the table (``_end_lingering``, from
``_all`` and ``for_call``), with no sweep: a failed INVITE's CEK is kept 32 s, not an
hour.  The measuring control now asserts the new bound (kept at +30 s, gone at +33 s).
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import answer, invite, ua_engine
from e2m_plugins.config import UAConfig
from e2m_plugins.errors import NoMatchingRecipientError
from e2m_plugins.replay import TRANSACTION_LIFETIME
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine

SWEEP_EVERY = 256          # e2m_plugins/dialog_keys.py _SWEEP_EVERY


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _alice(pki, clock: Clock) -> UAEngine:
    cred = pki.user("alice")
    config = UAConfig(aor=pki.aor("alice"), certificate=cred.cert, private_key=cred.key,
                      trust_anchors=(pki.ca.cert,), peers={pki.aor("bob"): pki.user("bob").cert})
    return UAEngine(config, clock=clock)


def _sweep(alice: UAEngine, pki) -> None:
    """Enough other keys kept for ``DialogKeys._keep`` to sweep aged-out slots once."""
    for n in range(SWEEP_EVERY + 1):
        other = make_request("MESSAGE", pki.aor("bob"), from_uri=pki.aor("alice"),
                             to_uri=pki.aor("bob"), call_id=f"sweep-{n}@x", cseq=1,
                             from_tag=f"s{n}", body=b"", content_type="text/plain")
        alice.dialog_keys.offer(other, b"sweep-%d" % n, bytes(16), frozenset())
    for n in range(SWEEP_EVERY + 1):
        alice.dialog_keys.forget_call(f"sweep-{n}@x")


def _failed_call(pki, clock: Clock, call_id: str):
    """alice's keyed INVITE, bob's device 1 answers 486: (alice, the INVITE as sent,
    as device 1 opened it)."""
    alice, bob = _alice(pki, clock), ua_engine(pki, "bob")
    sent = alice.protect(invite(pki, call_id=call_id)).message
    got = bob.open(sent).message
    busy = make_response(got, 486, "Busy Here").replace("To", f"{got.get('To')};tag=f1")
    alice.open(busy)
    return alice, sent, got


def test_hole_k2_a_failed_invites_key_is_gone_after_the_window(pki):
    clock = Clock()
    alice, _, _ = _failed_call(pki, clock, "r129-k2@x")
    assert len(alice.dialog_keys.for_call("r129-k2@x")) == 1     # lingering, retired
    clock.now += TRANSACTION_LIFETIME + 1
    _sweep(alice, pki)
    clock.now += 600
    _sweep(alice, pki)
    # docs/protocol.md section 2: the key opens a 2xx "for 32 s" after the failure; the
    # secure reading: it is not kept (CEK bytes in memory) any longer than that
    assert alice.dialog_keys.for_call("r129-k2@x") == []


def test_control_k2_the_lingering_key_stops_opening_after_the_window(pki):
    """The opening half of the bound holds: device 2's 200 under the offer key, coming
    after the window, is refused (within it, it opens: ``test_late_answer_ua``)."""
    clock = Clock()
    alice, sent, _ = _failed_call(pki, clock, "r129-k2-open@x")
    device2 = ua_engine(pki, "bob")
    got = device2.open(sent).message
    late = device2.protect(answer(got, to_tag="f2"))
    assert late.info.key_reuse
    # (a 2xx opened within the window makes the call, whose key then lives on: review
    # 132; so the window is shown with nothing answered inside it)
    clock.now += TRANSACTION_LIFETIME + 1
    with pytest.raises(NoMatchingRecipientError):
        alice.open(late.message)


def test_control_k2_the_key_is_kept_for_the_window_then_goes_unswept(pki):
    """What the hole test measured on the code before: kept at +33 s and +633 s (two
    sweeps), gone only at the first sweep past ``cek_max_age`` (3600 s).  Since stop 42:
    kept (retired) within the window, gone at the first use of the table after it,
    with no sweep."""
    clock = Clock()
    alice, _, _ = _failed_call(pki, clock, "r129-k2-age@x")
    clock.now += TRANSACTION_LIFETIME - 2
    kept = alice.dialog_keys.for_call("r129-k2-age@x")
    assert len(kept) == 1 and kept[0].retired and len(kept[0].cek) >= 16
    clock.now += 3
    assert alice.dialog_keys.for_call("r129-k2-age@x") == []


def test_control_k2_a_dialog_the_peer_ends_drops_its_keys_at_once(pki):
    """No linger where none is meant: a 481 to alice's re-INVITE inside a confirmed call
    ends the call's keys at once (``_ends_dialog``: 408/481 in a dialog)."""
    clock = Clock()
    alice, bob = _alice(pki, clock), ua_engine(pki, "bob")
    sent = alice.protect(invite(pki, call_id="r129-k2-481@x")).message
    got = bob.open(sent).message
    alice.open(bob.protect(answer(got, to_tag="b1")).message)
    again = alice.protect(invite(pki, call_id="r129-k2-481@x", cseq=2, to_tag="b1")).message
    gone = make_response(again, 481, "Call/Transaction Does Not Exist")
    alice.open(gone)
    assert alice.dialog_keys.for_call("r129-k2-481@x") == []
