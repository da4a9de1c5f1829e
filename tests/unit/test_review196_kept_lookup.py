"""Review 196 (attacker's review) of c6d4dea: the key cache made cheaper (issue 17).

c6d4dea claims no behaviour changed: ``_signers_key_opened`` decides ``keyed`` from
the keeper the kekri lookup saw (``KeptLookup.keeper``) instead of reading the cache
again; ``KsrHtable`` reuses the value read under a slot lock (``_held``) to decide
whether ``sht_setxs`` wrote in place; ``HtableKeyCache.get(count=True)`` takes the lock
without an unlocked look; ``_decode_scope`` is ``lru_cache``d.

Honest break HB1: ``keyed`` is decided from a key no longer kept
- Attacker: none needed to show it; it takes an interleaving.  The host reads a reply
  in the core reply route (``read_response``: the lookup) and ``inspect``s it later in
  tm's reply route with that reading (``kemi.py`` ``read_reply``/``route_reply``); in
  between another worker may drop the early dialog's keys (a CANCEL, a BYE, a sweep,
  another fork's 2xx spending the key's last use) or the key may expire.
- Messages: alice's signed INVITE (her key kept in the early scope), bob's kekri answer
  (key reuse) read with ``read_response``; the early scope's keys dropped
  (``cache.drop_scope``, as another worker would); ``_signers_key_opened`` then asked.
- Effect observed: before c6d4dea the second read found nothing, ``keyed`` = False;
  on c6d4dea ``keyed`` = True (1 of 1 runs), though the cache holds 0 keys of the
  scope.  ``keyed`` makes a fork claim shared across the cluster for a 2xx with no
  signed context (a legacy answer): one claim in the shared database that the old code
  would have left to the node.  For a signed answer (this flow) ``shared`` is True by
  its context anyway, so the end effect is limited to legacy answers and to the race
  window; the commit's "no behaviour changed" is not exact.
- Code at fault: e2m_plugins/proxy.py:890-894 (keeper as read at lookup, line 682).
- Suggested fix: keep the keeper (cheap), but also ask that the key is still live at
  the decision (e.g. ``expires`` in ``KeptLookup`` checked against the clock, and drop
  ``looked_up`` entries whose ``_spend`` found nothing), or document the change.
- Test: test_honest_break_keyed_from_a_key_dropped_after_the_reading

Controls
- test_control_keyed_with_the_key_still_kept: the same flow, key not dropped: keyed
  True on both versions.
- test_control_held_value_longer_write_sets_expiry_again /
  test_control_held_value_after_remove_sets_expiry: a model of 5.6.3's
  ``ht_set_cell_ex`` (copied in behaviour only: in place iff the old string is at least
  as long, else a new cell whose expiry is lost) under ``KsrHtable``: every write under
  a lock leaves the item with an expiry (put, counted get, drop, sweep paths).
- test_control_decoded_scope_is_immutable: the shared ``Scope`` from ``_decode_scope``
  is frozen (mutation raises), equal by value.

Tried and held
- Replacement of a live kept key: ``MemoryKeyCache.put`` and ``HtableKeyCache.put``
  return the held key for the same reference (never overwritten); ``scope_victim``
  evicts another reference, not the looked-up one; ``expire_within`` changes
  ``expires`` only (keeper kept).  Only a dropped/expired key then re-put (another
  keeper) or a DMQ record overwrite can change the keeper, all needing the same race
  as HB1.
- Two kekri/two parts: ``kept_kek`` appends one ``KeptLookup`` per found reference;
  the decision is an ``any`` over entries whose reference opened a part, exactly the
  old loop's set (no read in between changes the cache within one message).
- ``_held``: 5.6.3 slot locks are per slot, recursive per process (ht_slot_lock);
  ``ht_set_cell`` (DMQ replay, mode 1) and the timer take the same slot lock, so no
  other process writes the item between our locked read and write; nested lock of one
  name only drops ``_held`` (re-read, safe); unlock runs in ``finally`` on every path;
  the key and replay caches use separate tables (``e2mkeys``, ``e2mseen``) and one
  ``KsrHtable`` each, so no second object writes a held name in-process.

Fixed (stop 51): ``keyed`` is worked out only for a message with no signed context
(``_fork``: a signed one's claim is shared anyway), and there every lookup whose key
opened a part is read again, as before c6d4dea (review 198 found the half-way fix,
which re-read only keys found signed, wrong the other way), so a key gone since the
reading makes nothing keyed.  HB1's test passes.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, kekri_answer
from e2m_plugins.keycache import DialogScope, _decode_scope, _encode_scope
from e2m_plugins.testpki import init_test_pki
from kamailio_app.keycache_htable import HtableKeyCache, KsrHtable

SDP_VIEW = ("INVITE:application/sdp",)


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _answer_read(world):
    trusted, reply = kekri_answer(world, SDP_VIEW)
    reading = trusted.read_response(reply)
    assert reading.error is None and reading.looked_up
    return trusted, reading


def test_control_keyed_with_the_key_still_kept(world):
    trusted, reading = _answer_read(world)
    assert trusted._signers_key_opened(list(reading.opened), list(reading.looked_up))


def test_honest_break_keyed_from_a_key_dropped_after_the_reading(world):
    trusted, reading = _answer_read(world)
    found = reading.looked_up[0]
    trusted.cache.drop_scope(found.candidate)      # another worker's CANCEL/BYE/sweep
    assert trusted.cache.get(found.candidate, found.name, count=False) is None
    keyed = trusted._signers_key_opened(list(reading.opened), list(reading.looked_up))
    assert keyed is False, "keyed=True from a key the cache no longer holds"


class _Cell:
    def __init__(self, value, expire):
        self.value, self.expire = value, expire


class _FakeHt:
    """5.6.3 ``ht_set_cell_ex`` behaviour for strings: in place iff the old string is
    at least as long (expiry set); else a new cell whose expiry is lost (0: never)."""

    def __init__(self):
        self.cells: dict[str, _Cell] = {}
        self.locked: set[str] = set()

    def sht_get(self, table, key):
        cell = self.cells.get(key)
        return None if cell is None else cell.value

    def sht_setxs(self, table, key, value, seconds):
        cell = self.cells.get(key)
        if cell is not None and len(cell.value.encode()) >= len(value.encode()):
            cell.value, cell.expire = value, seconds
        elif cell is not None:
            self.cells[key] = _Cell(value, 0)
        else:
            self.cells[key] = _Cell(value, seconds)
        return 0

    def sht_setex(self, table, key, seconds):
        if key in self.cells:
            self.cells[key].expire = seconds

    def sht_rm(self, table, key):
        self.cells.pop(key, None)

    def sht_lock(self, table, key):
        self.locked.add(key)

    def sht_unlock(self, table, key):
        self.locked.discard(key)

    def sht_iterator_start(self, it, table):
        self.rows, self.at = list(self.cells.items()), -1
        return 0

    def sht_iterator_next(self, it):
        self.at += 1
        return 1 if self.at < len(self.rows) else -1

    def sht_iterator_end(self, it):
        self.rows = []


class _Pv:
    def __init__(self, ht):
        self.ht = ht

    def get(self, name):
        key, cell = self.ht.rows[self.ht.at]
        return key if name.startswith("$shtitkey") else cell.value


class _Ksr:
    def __init__(self):
        self.htable = _FakeHt()
        self.pv = _Pv(self.htable)


def _cache():
    ksr = _Ksr()
    return ksr, HtableKeyCache(KsrHtable(ksr, "e2mkeys"), default_ttl=3600, max_ttl=3600)


def _never_expiring(ksr):
    return [k for k, c in ksr.htable.cells.items() if c.expire == 0]


def test_control_held_value_longer_write_sets_expiry_again():
    ksr, cache = _cache()
    scope = DialogScope("c196@x", "a1", "b1")
    for n in range(6):                          # each put rewrites the record longer
        cache.put(scope, bytes([n]) * 16, bytes(16), max_decrypts=5, keeper="sip:a@x")
        assert not _never_expiring(ksr), f"put {n}: a record left with no expiry"
    for n in range(6):                          # counted uses: shorter and longer writes
        cache.get(scope, bytes([n]) * 16)
        assert not _never_expiring(ksr), f"use {n}: a record left with no expiry"
    cache.expire_within(scope, bytes([1]) * 16, 5)
    cache.sweep()
    assert ksr.htable.cells and not _never_expiring(ksr)
    assert not ksr.htable.locked


def test_control_held_value_after_remove_sets_expiry():
    ksr, cache = _cache()
    scope = DialogScope("c196b@x", "a1")
    cache.put(scope, b"r" * 16, bytes(16), max_decrypts=1)
    cache.get(scope, b"r" * 16)                 # last use: the record goes
    assert not ksr.htable.cells
    cache.put(scope, b"s" * 16, bytes(16))
    assert ksr.htable.cells and not _never_expiring(ksr)


def test_control_decoded_scope_is_immutable():
    scope = DialogScope("c196c@x", "a1", "b1")
    text = _encode_scope(scope)
    first, second = _decode_scope(text), _decode_scope(text)
    assert first is second and first == scope
    with pytest.raises(Exception):
        first.call_id = "other"                 # frozen: a shared object cannot change
