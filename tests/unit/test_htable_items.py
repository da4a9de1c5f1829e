"""``put_expiring`` against a model of Kamailio 5.6.3's ``ht_set_cell_ex`` (stop 46):
a string written with its own expiry over a shorter string (or a number) lands in a
new cell without one; a write in place keeps it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kamailio_app.htable_items import put_expiring
from kamailio_app.keycache_htable import KsrHtable

NEVER = 0


class BuggyHtable:
    """Items as (value, expires at); ``now`` stands still."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], tuple[object, int]] = {}
        self.calls: list[str] = []
        self.now = 1000

    def sht_setxs(self, table: str, key: str, value: str, seconds: int) -> int:
        self.calls.append("setxs")
        old = self.items.get((table, key))
        if old is not None and not (isinstance(old[0], str)
                                    and len(old[0].encode()) >= len(value.encode())):
            self.items[(table, key)] = (value, NEVER)    # the new cell; the old got the expiry
        else:
            self.items[(table, key)] = (value, self.now + seconds)
        return 1

    def sht_setex(self, table: str, key: str, seconds: int) -> int:
        self.calls.append("setex")
        value, _ = self.items[(table, key)]
        self.items[(table, key)] = (value, self.now + seconds)
        return 1

    def sht_get(self, table: str, key: str):
        self.calls.append("get")
        item = self.items.get((table, key))
        return None if item is None else item[0]

    def sht_rm(self, table: str, key: str) -> int:
        self.calls.append("rm")
        self.items.pop((table, key), None)
        return 1

    def sht_lock(self, table: str, key: str) -> int:
        self.calls.append("lock")
        return 1

    def sht_unlock(self, table: str, key: str) -> int:
        self.calls.append("unlock")
        return 1


def _ksr(htable: BuggyHtable):
    return SimpleNamespace(htable=htable)


def test_the_model_loses_the_expiry_of_a_longer_rewrite():
    table = BuggyHtable()
    table.sht_setxs("t", "k", "short", 60)
    table.sht_setxs("t", "k", "a longer value", 60)
    assert table.items[("t", "k")][1] == NEVER       # what review 147 saw


def test_a_longer_rewrite_keeps_its_expiry():
    table = BuggyHtable()
    put_expiring(_ksr(table), "t", "k", "short", 60)
    put_expiring(_ksr(table), "t", "k", "a longer value", 30, previous="short")
    assert table.items[("t", "k")] == ("a longer value", table.now + 30)


def test_an_unread_previous_value_is_treated_as_maybe_shorter():
    table = BuggyHtable()
    table.items[("t", "k")] = (7, table.now + 5)          # a number there, expired or not
    put_expiring(_ksr(table), "t", "k", "text", 30)
    assert table.items[("t", "k")] == ("text", table.now + 30)


def test_a_write_in_place_sets_the_expiry_once():
    table = BuggyHtable()
    table.items[("t", "k")] = ("a longer value", table.now + 5)
    put_expiring(_ksr(table), "t", "k", "short", 30, previous="a longer value")
    assert table.items[("t", "k")] == ("short", table.now + 30)
    assert table.calls == ["setxs"]                     # no second replicated action


def test_the_key_cache_backend_keeps_a_growing_records_expiry():
    table = BuggyHtable()
    backend = KsrHtable(_ksr(table), "e2mkeys")
    backend.set("record", "one key", 200)
    backend.set("record", "one key, and the answer's", 43200)
    assert table.items[("e2mkeys", "record")] == ("one key, and the answer's",
                                                   table.now + 43200)


def test_a_rewrite_longer_in_octets_but_not_in_characters_keeps_its_expiry():
    # review 196's aside: Kamailio writes in place only over as many octets
    table = BuggyHtable()
    put_expiring(_ksr(table), "t", "k", "abcd", 60)
    put_expiring(_ksr(table), "t", "k", "\u00e9\u00e9\u00e9", 30, previous="abcd")
    assert table.items[("t", "k")] == ("\u00e9\u00e9\u00e9", table.now + 30)


# -- stop 51: a write under the lock uses the value read there (one KSR call less) --

def _record(value: str) -> tuple[BuggyHtable, KsrHtable]:
    """A key-cache backend whose table holds ``value`` as item "record"."""
    table = BuggyHtable()
    table.items[("e2mkeys", "record")] = (value, table.now + 5)
    return table, KsrHtable(_ksr(table), "e2mkeys")


def _life(table: BuggyHtable) -> tuple[object, int]:
    return table.items[("e2mkeys", "record")]


def test_a_write_after_a_locked_read_reads_nothing_more_and_keeps_the_expiry():
    table, backend = _record("one key")
    backend.lock("record")
    assert backend.get("record") == "one key"
    backend.set("record", "one key, and the answer's", 43200)
    backend.unlock("record")
    assert table.calls == ["lock", "get", "setxs", "setex", "unlock"]
    assert _life(table) == ("one key, and the answer's", table.now + 43200)


def test_a_write_after_a_locked_remove_sets_the_expiry_again():
    table, backend = _record("a much longer value than the next")
    backend.lock("record")
    backend.get("record")
    backend.remove("record")
    backend.set("record", "short", 30)
    backend.unlock("record")
    assert _life(table) == ("short", table.now + 30)


@pytest.mark.parametrize("locked_first", [True, False])
def test_an_earlier_read_is_never_taken_for_the_value_written_over(locked_first):
    # between the read and a later lock another worker may rewrite the record: what was
    # read before must not stand for it (it would skip a needed setex)
    table, backend = _record("a long value read first")
    if locked_first:
        backend.lock("record")
    backend.get("record")
    if locked_first:
        backend.unlock("record")
    table.items[("e2mkeys", "record")] = ("short", table.now + 5)     # another worker
    backend.lock("record")
    backend.set("record", "longer than short", 30)
    backend.unlock("record")
    assert _life(table) == ("longer than short", table.now + 30)
    assert table.calls[-5:] == ["lock", "get", "setxs", "setex", "unlock"]
