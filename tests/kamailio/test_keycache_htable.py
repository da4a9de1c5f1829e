"""HtableKeyCache logic on an in-process stand-in for Kamailio's htable.

The only fake in the Kamailio tests: ``MemoryHtable`` plays the htable (per-item
expiry, iteration, slot locks) so the cache's rules can be checked without a
running Kamailio.  The real ``KsrHtable`` is exercised by the flow tests (CEK reuse
across workers).
"""

from __future__ import annotations

import pytest

from e2m_plugins.errors import LimitExceededError
from e2m_plugins.keycache import (MAX_DECRYPTS_CAP, MAX_KEYS_PER_SCOPE, DialogScope, KeyCache,
                                  TransactionScope, scope_key)
from e2m_lab.memory_htable import MemoryHtable
from kamailio_app.keycache_htable import HtableKeyCache


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


CEK = bytes(range(16))
DIALOG = DialogScope("call-1@example.com", "AliceTag", "BobTag")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> MemoryHtable:
    return MemoryHtable(clock)


@pytest.fixture
def cache(table: MemoryHtable, clock: Clock) -> HtableKeyCache:
    return HtableKeyCache(table, clock=clock, max_entries=4, sweep_every=2)


def test_follows_the_core_protocol(cache):
    assert isinstance(cache, KeyCache)


def test_round_trip_through_the_text_form(cache, table):
    kept = cache.put(DIALOG, b"ref-1", CEK, max_decrypts=3, cipher="aes-128-gcm")
    key = scope_key(DIALOG)
    assert set(table.data) == {key}                  # one record for the scope, nothing else
    stored, _ = table.data[key]
    assert CEK.hex() not in stored and "ref-1" not in stored   # encoded, not raw
    got = cache.get(DIALOG, b"ref-1")
    assert got.cek == CEK and got.cipher == "aes-128-gcm" and got.max_decrypts == 2
    assert got.expires == kept.expires
    assert not table.locked


def test_uses_are_counted_and_the_last_use_removes_the_key(cache):
    cache.put(DIALOG, b"r", CEK, max_decrypts=2)
    assert cache.get(DIALOG, b"r").max_decrypts == 1
    assert cache.get(DIALOG, b"r").max_decrypts == 0
    assert cache.get(DIALOG, b"r") is None
    assert len(cache) == 0


def test_uses_are_capped(cache):
    cache.put(DIALOG, b"r", CEK, max_decrypts=10**6)
    assert cache.get(DIALOG, b"r").max_decrypts == MAX_DECRYPTS_CAP - 1


def test_expiry_in_the_value_is_checked_even_if_the_table_still_has_it(cache, table, clock):
    cache.put(TransactionScope("c@x", 1, "z9hG4bK-1"), b"r", CEK)      # 32 s
    key = next(iter(table.data))
    value, _ = table.data[key]
    table.data[key] = (value, clock() + 10_000)                          # table would keep it
    clock.now += 33
    assert cache.get(TransactionScope("c@x", 1, "z9hg4bk-1"), b"r") is None
    assert key not in table.data


def test_a_wrong_scope_or_reference_finds_nothing(cache):
    cache.put(DIALOG, b"r", CEK)
    assert cache.get(DialogScope("call-1@example.com", "AliceTag", "Other"), b"r") is None
    assert cache.get(DIALOG, b"other") is None
    assert cache.get(DialogScope("call-1@example.com", "bobtag", "alicetag"), b"r") is not None


def test_drop_scope_takes_the_early_copies_of_its_own_keys_only(cache):
    """A BYE's dialog takes from its early scopes the names it holds (the offer's key it
    took from there), not the rest: a dialog that never was (a made-up To tag) holds
    none of a party's names (review 15)."""
    early = DialogScope(DIALOG.call_id, "AliceTag")
    cache.put(early, b"offer", CEK)
    cache.put(early, b"another fork's", CEK)
    cache.put(DIALOG, b"offer", CEK)                  # the 2xx moved it into the dialog
    cache.put(DIALOG, b"answer", CEK)
    cache.put(DialogScope("call-2@example.com", "x", "y"), b"other", CEK)
    cache.drop_scope(DialogScope(DIALOG.call_id, "AliceTag", "made-up"))
    assert len(cache) == 5                            # nothing there: nothing taken
    cache.drop_scope(DIALOG)
    assert cache.get(early, b"offer") is None and cache.get(DIALOG, b"answer") is None
    assert cache.get(early, b"another fork's", count=False) is not None
    assert len(cache) == 2


def test_a_scope_is_one_record_and_a_bye_removes_it_by_name(cache, table):
    early = DialogScope(DIALOG.call_id, "AliceTag")
    cache.put(early, b"offer", CEK)
    cache.put(DIALOG, b"answer", CEK)
    cache.put(DIALOG, b"re-invite", CEK)
    cache.put(DIALOG, b"answer", b"\x09" * 16)        # kept once, the first CEK stays
    other = DialogScope("call-2@example.com", "x", "y")
    cache.put(other, b"kept", CEK)
    assert set(table.data) == {scope_key(early), scope_key(DIALOG), scope_key(other)}
    assert len(cache) == 4 and cache.get(DIALOG, b"answer", count=False).cek == CEK
    table.reads = table.gets = 0
    # its record: looked for, then read under its lock (the names it held); each early
    # scope looked for, and the one that is there read under its lock: no walk of the table
    cache.drop_scope(DIALOG)
    assert table.reads == 0 and table.gets == 5 and not table.locked
    assert set(table.data) == {scope_key(early), scope_key(other)}    # no name in common
    assert cache.get(other, b"kept") is not None


def test_a_put_is_one_read_and_one_write_and_a_look_one_read(cache, table):
    table.gets = table.sets = 0
    cache.put(DIALOG, b"r", CEK)
    assert (table.gets, table.sets) == (1, 1)
    table.gets = table.sets = 0
    assert cache.get(DIALOG, b"r", count=False) is not None
    assert (table.gets, table.sets) == (1, 0)


def test_a_scope_holds_its_bound_and_a_flood_pushes_out_only_its_own(table, clock):
    """Anyone whose message with a dialog's Call-ID and tags is read can add keys to
    its record: past ``MAX_KEYS_PER_SCOPE`` the biggest holder's oldest goes, so a
    flood turns over its own keys, never the party's (``keycache.scope_victim``)."""
    cache = HtableKeyCache(table, clock=clock, max_entries=1000)
    cache.put(DIALOG, b"alice", CEK, keeper="sip:alice@example.com")
    for n in range(MAX_KEYS_PER_SCOPE + 8):
        clock.now += 1
        cache.put(DIALOG, b"carol%d" % n, CEK, keeper="sip:carol@example.com")
    assert len(cache) == MAX_KEYS_PER_SCOPE and set(table.data) == {scope_key(DIALOG)}
    assert cache.get(DIALOG, b"alice") is not None
    assert cache.get(DIALOG, b"carol0") is None
    assert cache.get(DIALOG, b"carol%d" % (MAX_KEYS_PER_SCOPE + 7)) is not None


def test_a_record_lives_as_long_as_its_longest_key_and_the_sweep_keeps_the_rest(
        cache, table, clock):
    cache.put(DIALOG, b"long", CEK, ttl=300)
    cache.put(DIALOG, b"short", CEK, ttl=10)
    assert table.data[scope_key(DIALOG)][1] == clock.now + 300
    clock.now += 100
    assert cache.sweep() == 1                     # the short key, not the record
    assert cache.get(DIALOG, b"long", count=False) is not None
    assert cache.get(DIALOG, b"short", count=False) is None
    cache.drop_scope(DIALOG)
    assert cache.get(DIALOG, b"long") is None and not table.data
    # a transaction's keys are one record too: the failure route drops it by name
    transaction = TransactionScope("c", 1, "z9hG4bK1")
    cache.put(transaction, b"t", CEK)
    assert set(table.data) == {scope_key(transaction)}
    cache.drop_scope(transaction)
    assert not table.data


def test_a_record_moved_to_another_scope_or_from_before_does_not_open(cache, table):
    """The record's name is sealed in: a copy under another scope's name (or an item
    of the old one-name-per-key format, or an old index) is never used, and a
    sweep removes what does not open."""
    other = DialogScope("call-2@example.com", "x", "y")
    cache.put(DIALOG, b"r", CEK)
    table.set(scope_key(other), table.get(scope_key(DIALOG)), 600)
    assert cache.get(other, b"r") is None and scope_key(other) not in table.data
    table.set(scope_key(DIALOG) + "0102", "k1|AQ|d,c,t|1|2|-|-|AA", 600)
    table.set("@" + scope_key(DIALOG), "1800000600 0102", 600)
    assert cache.sweep() == 2 and set(table.data) == {scope_key(DIALOG)}
    assert cache.get(DIALOG, b"r").cek == CEK


def test_drop_one(cache):
    cache.put(DIALOG, b"a", CEK)
    cache.put(DIALOG, b"b", CEK)
    cache.drop(DIALOG, b"a")
    assert cache.get(DIALOG, b"a") is None and cache.get(DIALOG, b"b") is not None


def test_corrupt_values_are_ignored_and_removed(cache, table):
    key = scope_key(DIALOG)
    table.set(key, "k1|garbage", 100)
    assert cache.get(DIALOG, b"r") is None
    assert key not in table.data


def test_sweep_keeps_the_newest_within_the_bound(cache, clock):
    for n in range(6):
        clock.now += 1
        cache.put(DialogScope(f"c{n}", "t"), b"r", CEK)
    cache.sweep()
    assert len(cache) == 4
    assert cache.get(DialogScope("c0", "t"), b"r") is None
    assert cache.get(DialogScope("c5", "t"), b"r") is not None


def test_refuses_material_out_of_bounds(cache):
    with pytest.raises(LimitExceededError):
        cache.put(DIALOG, b"r", bytes(65))
    with pytest.raises(LimitExceededError):
        cache.put(DIALOG, bytes(257), CEK)
    with pytest.raises(ValueError):
        cache.put(DIALOG, b"r", CEK, ttl=0)


def test_repr_holds_no_key(cache):
    cache.put(DIALOG, b"r", CEK)
    assert CEK.hex() not in repr(cache)


def test_gone_is_told_of_each_scope_whose_record_left_and_of_no_other(table, clock):
    """``gone`` (what a dialog keeps beside its keys goes with them: dialog_targets.py):
    a record emptied by a use, a drop, a BYE's ``drop_scope`` or a sweep (expiry, a
    keeper's quota) names its scope; a record that still holds a key, or one that does
    not open (no scope to name), does not."""
    told: list = []
    cache = HtableKeyCache(table, clock=clock, max_entries=1000, max_per_keeper=2,
                           sweep_every=10**6, gone=told.append)
    used = DialogScope("c-used", "a", "b")
    cache.put(used, b"r", CEK, max_decrypts=1)
    cache.put(DIALOG, b"one", CEK)
    cache.put(DIALOG, b"two", CEK)
    assert cache.get(used, b"r") is not None and told == [used]       # its last use
    cache.drop(DIALOG, b"one")
    assert told == [used]                                             # "two" is left
    cache.drop(DIALOG, b"two")
    assert told == [used, DIALOG]
    bye = DialogScope("c-bye", "a", "b")
    cache.put(bye, b"r", CEK)
    cache.drop_scope(bye)
    assert told[-1] == bye
    told.clear()
    scopes = [DialogScope(f"c-q{n}", "a", "b") for n in range(4)]
    for n, scope in enumerate(scopes):
        clock.now += 1
        cache.put(scope, b"r", CEK, keeper="sip:mallory@example.com")
    expiring = DialogScope("c-exp", "a", "b")
    cache.put(expiring, b"r", CEK, ttl=5)
    table.data["forged/"] = ("not a record", clock.now + 100)
    clock.now += 10
    cache.sweep()
    assert set(told) == {scopes[0], scopes[1], expiring}, told        # quota 2, expiry
