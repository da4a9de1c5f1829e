"""``kamailio_app.dialog_targets``: the names of a dialog's entries in ``e2mtargets`` and
their removal with the dialog's keys (review 99's known limit, closed in stop 37)."""

from __future__ import annotations

import types

from e2m_plugins.keycache import DialogScope, TransactionScope
from kamailio_app import dialog_targets as dt


def _ksr():
    table: dict = {}
    ksr = types.SimpleNamespace(htable=types.SimpleNamespace(
        sht_get=lambda name, key: table.get((name, key)),
        sht_rm=lambda name, key: table.pop((name, key), None)))
    return ksr, table


def _noted(table: dict, call_id: str, caller: str, callee: str) -> None:
    """What ``kemi.note_dialog_targets`` writes at the first 2xx."""
    table[(dt.TABLE, dt.caller_name(call_id, caller))] = "t1:-|" + dt.tag_digest(callee)
    table[(dt.TABLE, dt.dialog_name(call_id, caller, callee))] = \
        dt.tag_digest(callee) + "|t2:-"


def test_names_are_the_same_from_either_side_and_in_any_case():
    assert dt.dialog_name("c", "Ab", "cD") == dt.dialog_name("c", "cd", "AB")
    assert dt.caller_name("c", "Ab") == dt.caller_name("c", "aB")
    assert dt.dialog_name("c", "a", "b") != dt.dialog_name("c2", "a", "b")
    assert dt.callers_tag(dt.tag_digest("Callee") + "|x", "CALLEE", "caller") == "caller"
    assert dt.callers_tag(dt.tag_digest("Callee") + "|x", "caller", "callee") == "caller"


def test_the_key_caches_gone_removes_that_dialogs_two_entries_only():
    ksr, table = _ksr()
    _noted(table, "call-1", "CallerTag", "calleetag")
    _noted(table, "call-2", "x", "y")
    gone = dt.forgetter(ksr)
    gone(TransactionScope("call-1", 1, "z9hG4bK1"))           # not a dialog: nothing
    gone(DialogScope("call-1", "CallerTag"))                   # an early scope: nothing
    assert len(table) == 4
    gone(DialogScope("call-1", "CallerTag", "calleetag"))      # the scope lower-cases tags
    assert len(table) == 2 and all(dt.dialog_name("call-2", "x", "y") == k or
                                   dt.caller_name("call-2", "x") == k for _, k in table)
    gone(DialogScope("call-1", "CallerTag", "calleetag"))      # again: nothing left to do
    assert len(table) == 2
