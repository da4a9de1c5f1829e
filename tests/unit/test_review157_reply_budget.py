"""A hundred-and-fifty-seventh attacker's review (December 2026) of 4ce285d..0e83b36 as a
whole, here the reply limits of ``kamailio_app/kemi.py`` (``ksr_reply_route`` ->
``_reading_left``: at most ``READS_PER_BRANCH`` = 16 replies needing reading per branch
and ``READS_PER_TRANSACTION`` = 64 per transaction, htable ``e2mreplyreads`` keyed by
``$T(id_index):$T(id_label)[:$T_branch_idx]``, the rest dropped unread).  Pure logic,
run against ``_reading_left`` itself with a fake ``KSR`` whose htable does what
Kamailio's ``sht_inc`` does (an absent item starts at ``initval`` 0, each call adds 1
and returns the new value).

Hole K1: replies the branch cap already dropped still spend the transaction's budget
-------------------------------------------------------------------------------------

- Attacker: one contact of a callee AoR that forks (a second device on a shared or
  hot-desk account, or mallory's own phone in review 156's setting with an honest
  contact beside it): one branch of a forked INVITE.  No account of the caller's needed.
- Messages: on its own branch, 65 replies that need reading (a 183 with any body: the
  body need not be readable, the count is taken before the engine looks), i.e. 16 read
  then 49 dropped unread by the branch cap; dropped ones cost nothing but a header
  parse and two ``sht_inc`` each, so 65 go in well under a second.
- Effect observed: ``_reading_left`` increments both counts for every reply
  (``kemi.py:737-739``), so the transaction's count reaches 65 although only 16 of its
  replies were read; the next reply on ANY other branch (here branch 1's first 183 with
  SDP, and then its 200 with SDP) is past 64 and dropped unread
  (``ksr_reply_route``, ``kemi.py:2285-2292``: ``KSR.set_drop()``): 0 of 2 read on the
  honest branch, 16 read on the whole transaction instead of the stated "at most 64
  read".  The honest phone's 200 never reaches the caller (it is dropped before tm
  sees it), so on a forked call the chatty contact decides who can answer: only its
  own replies were read.  The README (``e2m_replies_unread`` row, ``pike_requests``
  row) and the docstring say 64 per transaction are *read*; 64 are *counted*, dropped
  ones included.
- Code at fault: ``kamailio_app/kemi.py:737-739`` (both ``sht_inc`` calls made
  unconditionally; the transaction's count is spent by replies the branch cap refuses).
- Suggested fix: count the transaction only for a reply its branch still may read
  (``sht_inc`` the branch; if past 16, drop without touching the transaction count;
  else ``sht_inc`` the transaction), so the per-transaction count is what was read and
  one branch can use at most 16 of the 64.  (Or decrement the transaction count back
  when the branch refused.)
- Test: ``test_hole_a_branch_past_its_cap_does_not_starve_the_others``.

Controls
--------

- ``test_control_branch_cap_and_transaction_cap_hold``: 20 on one branch: 16 read;
  then 4 branches of 16 each: 64 read and the 65th (a fifth branch) dropped.
- ``test_control_other_transactions_untouched``: a transaction spent by a chatty
  branch leaves another transaction's replies readable.

Tried and held (read, not run, for lack of time: the session was cut at ~35 minutes)
------------------------------------------------------------------------------------

- ``$T_branch_idx`` in the core reply route: tm's ``_tm_ctx.branch_index`` is
  per-process and only initialised once (``tm_ctx_init`` at mod_init), which would make
  it the previous message's branch; but ``t_check_trans`` on a reply calls
  ``tm_ctx_set_branch_index(branch)`` (tm.c 5.6.3, ``t_check_trans``), and
  ``_reading_left`` runs after it: held (as review 156 noted).
- ``Proxy-Body-Policy`` on replies: the engine adds its policy only to requests
  (``proxy._announce``) and to its own refusals, so a visited e2m proxy's relayed 180s
  without SDP do not need reading at home: no honest multi-device callee behind a
  visited proxy reaches 16 on the home's one branch from that alone.
- ``cert_route.on_reply``'s first-answer ``sht_rm`` with ``close_answered``'s listing
  done outside the lock only for an answer from a place at an id above its floor: one
  listing per NOTIFY sent, not per copy (review 150 K1 held).
- ``notifier._through_opening_port`` / ``may_act_in`` with ``SubscriptionTable.add``:
  a copy from the opening port must repeat the row's Contact (``_values[4:12]``
  compare), so it cannot move the NOTIFYs that ``refresh_dialog`` refuses to move
  (review 152 K1's fix not undone by the copy path).

Fixed (stop 47), K1: a reply counts toward its transaction only once its branch's cap
let it through (``kemi._reading_left``), so a chatty branch spends 16 of the 64 at most.
The strict xfail failed (XPASS) on the fix; the control that showed K1's effect (a
spent transaction reading nothing more) now checks that another branch still reads.
What stays: four branches of 16 (four contacts of one callee) spend the whole 64, and
a fifth branch's answers are then dropped unread.
"""

from __future__ import annotations

import sys
import types

import pytest


@pytest.fixture
def kemi_fake(monkeypatch):
    fake = types.ModuleType("KSR")
    fake.kx = types.SimpleNamespace(get_def=lambda name: None)
    monkeypatch.setitem(sys.modules, "KSR", fake)
    sys.modules.pop("kamailio_app.kemi", None)
    import kamailio_app.kemi as kemi
    monkeypatch.setattr(kemi, "KSR", fake)
    table: dict = {}
    state = {"$T(id_index)": 1234, "$T(id_label)": 987654321, "$T_branch_idx": 0,
             "$rs": 183, "$rm": "INVITE", "$si": "127.0.0.9"}

    def sht_inc(name, key):
        table[(name, key)] = table.get((name, key), 0) + 1
        return table[(name, key)]

    # (the public-key operations the branch and transaction spent, reserved under the
    # item's lock: reviews 161 and 163)
    fake.htable = types.SimpleNamespace(
        sht_inc=sht_inc, sht_get=lambda name, key: table.get((name, key)),
        sht_seti=lambda name, key, value: table.__setitem__((name, key), value),
        sht_lock=lambda name, key: None, sht_unlock=lambda name, key: None)
    fake.pv = types.SimpleNamespace(get=lambda name: state.get(name))
    fake.statistics = types.SimpleNamespace(update_stat=lambda name, n: None)
    fake.warn = lambda text: None
    yield kemi, state, table
    sys.modules.pop("kamailio_app.kemi", None)


def _replies(kemi, state, branch: int, count: int, *, label: int | None = None) -> int:
    """``count`` replies needing reading on ``branch``: how many ``_reading_left`` let
    through to be read."""
    state["$T_branch_idx"] = branch
    if label is not None:
        state["$T(id_label)"] = label
    read = 0
    for _ in range(count):
        left = kemi._reading_left()
        if left:
            read += 1
            # a protected 200's reading spends 2 (review 163 measured 2 to 3): 64 of
            # them fit a transaction's 128 operations, so the reading caps show here
            kemi._settle_reply_ops(left[0], left[1], 2)
    return read


def test_hole_a_branch_past_its_cap_does_not_starve_the_others(kemi_fake):
    kemi, state, _ = kemi_fake
    assert (kemi.READS_PER_BRANCH, kemi.READS_PER_TRANSACTION) == (16, 64)
    chatty = _replies(kemi, state, 0, 65)
    assert chatty == 16                      # the branch cap holds for the chatty branch
    # the honest contact's 183 with SDP, then its 200 with SDP
    honest = _replies(kemi, state, 1, 2)
    print(f"chatty branch: {chatty} of 65 read; honest branch: {honest} of 2 read; "
          f"transaction: {chatty + honest} read")
    assert honest == 2, "the other branch's replies were dropped unread after only " \
                        f"{chatty} reads on the transaction"


def test_control_branch_cap_and_transaction_cap_hold(kemi_fake):
    kemi, state, _ = kemi_fake
    assert _replies(kemi, state, 0, 20, label=1) == 16
    # a fresh transaction: four branches of 16 each are all read, a fifth branch is not
    read = sum(_replies(kemi, state, branch, 16, label=2) for branch in range(4))
    assert read == 64
    assert _replies(kemi, state, 4, 1, label=2) == 0


def test_control_other_transactions_untouched(kemi_fake):
    kemi, state, _ = kemi_fake
    _replies(kemi, state, 0, 100, label=5)
    # (stop 47) the chatty branch spent only its 16 of the 64: another branch reads
    assert _replies(kemi, state, 1, 1, label=5) == 1
    assert _replies(kemi, state, 1, 2, label=6) == 2      # another transaction


def test_stop48_concurrent_readings_reserve_the_branch_budget(kemi_fake):
    """Review 163 K1 at the unit level: readings let in before any settles (workers
    reading at once) hold what they may spend, so a fifth is refused on the branch's
    64 operations; what they did not spend comes back."""
    kemi, state, table = kemi_fake
    state["$T_branch_idx"], state["$T(id_label)"] = 0, 7
    held = [kemi._reading_left() for _ in range(5)]
    assert [h is not None for h in held] == [True] * 4 + [False]
    assert all(h[1] == kemi.REPLY_READING_OPS for h in held[:4])
    for keys, granted in held[:4]:
        kemi._settle_reply_ops(keys, granted, 3)
    assert kemi._reading_left() is not None           # 12 spent: room again
