"""CEK cache: scopes, bounds (size, time, uses), serialisation, no key in reprs."""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import pytest

from e2m_plugins.errors import LimitExceededError, MalformedError
from e2m_plugins.keycache import (
    DIALOG_TTL,
    MAX_DECRYPTS_CAP,
    TRANSACTION_TTL,
    CachedKey,
    DialogScope,
    KeyCache,
    MemoryKeyCache,
    TransactionScope,
    decode_scope_keys,
    encode_scope_keys,
    scope_key,
    scope_victim,
    short_lived_key,
)

CEK = bytes(range(16))
REF = b"\x01\x02\x03\x04\x05\x06\x07\x08"
DIALOG = DialogScope("a84b4c76e66710@pc33.atlanta.com", "1928301774", "a6c85cf")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> MemoryKeyCache:
    return MemoryKeyCache(clock=clock)


def test_memory_cache_follows_the_interface(cache: MemoryKeyCache) -> None:
    assert isinstance(cache, KeyCache)


def test_dialog_scope_is_direction_independent() -> None:
    uac = DialogScope("cid@host", "FromTag", "totag")
    uas = DialogScope("cid@host", "totag", "fromtag")
    assert uac == uas and hash(uac) == hash(uas)
    assert DialogScope("CID@host", "a", "b") != DialogScope("cid@host", "a", "b")  # Call-ID exact
    assert DialogScope("cid", "a").early and not uac.early


def test_put_get_roundtrip(cache: MemoryKeyCache) -> None:
    cache.put(DIALOG, REF, CEK, cipher="aes-128-gcm")
    got = cache.get(DIALOG, REF)
    assert got is not None and got.cek == CEK and got.cipher == "aes-128-gcm"
    assert len(cache) == 1
    assert cache.get(DIALOG, b"other") is None


def test_ttl_with_fake_clock(cache: MemoryKeyCache, clock: FakeClock) -> None:
    cache.put(DIALOG, REF, CEK, ttl=10)
    clock.now += 9.9
    assert cache.get(DIALOG, REF) is not None
    clock.now += 0.1
    assert cache.get(DIALOG, REF) is None
    assert len(cache) == 0  # expired entries are dropped, not just hidden


def test_default_lifetimes(cache: MemoryKeyCache, clock: FakeClock) -> None:
    tx = TransactionScope("msg@host", 1, "z9hG4bK776asdhds")
    assert cache.put(tx, REF, CEK).expires == clock.now + TRANSACTION_TTL == clock.now + 32
    assert cache.put(DIALOG, REF, CEK).expires == clock.now + DIALOG_TTL
    clock.now += TRANSACTION_TTL
    assert cache.get(tx, REF) is None and cache.get(DIALOG, REF) is not None


def test_ttl_is_capped(clock: FakeClock) -> None:
    cache = MemoryKeyCache(default_ttl=60, max_ttl=100, transaction_ttl=5, clock=clock)
    assert cache.put(DIALOG, REF, CEK, ttl=10**9).expires == clock.now + 100
    with pytest.raises(ValueError):
        cache.put(DIALOG, REF, CEK, ttl=0)
    with pytest.raises(ValueError):
        MemoryKeyCache(default_ttl=200, max_ttl=100)


def test_max_decrypts_counts_uses(cache: MemoryKeyCache) -> None:
    cache.put(DIALOG, REF, CEK, max_decrypts=2)
    first, second = cache.get(DIALOG, REF), cache.get(DIALOG, REF)
    assert first is not None and first.max_decrypts == 1
    assert second is not None and second.max_decrypts == 0  # the last permitted use
    assert cache.get(DIALOG, REF) is None and len(cache) == 0


def test_max_decrypts_is_clamped(clock: FakeClock) -> None:
    cache = MemoryKeyCache(max_decrypts_cap=3, clock=clock)
    assert cache.put(DIALOG, REF, CEK, max_decrypts=2**31).max_decrypts == 3
    assert cache.put(DIALOG, REF, CEK).max_decrypts == 3  # "no limit" is clamped too
    assert MemoryKeyCache(clock=clock).put(DIALOG, REF, CEK).max_decrypts == MAX_DECRYPTS_CAP
    unlimited = MemoryKeyCache(max_decrypts_cap=None, clock=clock)
    assert unlimited.put(DIALOG, REF, CEK).max_decrypts is None
    for _ in range(5):
        assert unlimited.get(DIALOG, REF) is not None
    with pytest.raises(ValueError):
        cache.put(DIALOG, REF, CEK, max_decrypts=0)


def test_keys_never_cross_scopes(cache: MemoryKeyCache) -> None:
    other = DialogScope(DIALOG.call_id, "1928301774", "forked-branch-tag")
    tx = TransactionScope(DIALOG.call_id, 1, "z9hG4bK1")
    cache.put(DIALOG, REF, CEK)
    cache.put(other, REF, bytes(16))
    assert cache.get(tx, REF) is None
    a, b = cache.get(DIALOG, REF), cache.get(other, REF)
    assert a is not None and b is not None and a.cek == CEK and b.cek == bytes(16)


def test_drop_and_drop_scope(cache: MemoryKeyCache) -> None:
    other = DialogScope("elsewhere", "x", "y")
    early = DialogScope(DIALOG.call_id, "1928301774")  # the INVITE's key, before the To tag
    cache.put(DIALOG, REF, CEK)
    cache.put(DIALOG, b"second", CEK)
    cache.put(early, REF, CEK)
    cache.put(other, REF, CEK)
    cache.drop(other, REF)
    assert cache.get(other, REF) is None
    cache.put(other, REF, CEK)
    cache.drop_scope(DIALOG)  # BYE
    assert cache.get(DIALOG, REF) is None and cache.get(DIALOG, b"second") is None
    assert cache.get(early, REF) is None
    assert cache.get(other, REF) is not None and len(cache) == 1
    cache.drop_scope(DIALOG)  # dropping again is harmless


def test_size_bound_evicts_oldest(clock: FakeClock) -> None:
    cache = MemoryKeyCache(max_entries=3, clock=clock)
    for i in range(4):
        cache.put(DIALOG, bytes([i]), CEK)
    assert len(cache) == 3
    assert cache.get(DIALOG, b"\x00") is None
    assert all(cache.get(DIALOG, bytes([i])) is not None for i in (1, 2, 3))


def test_a_kept_key_is_never_replaced(cache: MemoryKeyCache) -> None:
    """A second put for the same reference keeps the first CEK (issue 12 item 9)."""
    cache.put(DIALOG, REF, CEK)
    assert cache.put(DIALOG, REF, bytes(32)).cek == CEK
    got = cache.get(DIALOG, REF)
    assert len(cache) == 1 and got is not None and got.cek == CEK


def test_hundred_thousand_inserts_stay_bounded(clock: FakeClock) -> None:
    cache = MemoryKeyCache(max_entries=1000, clock=clock)
    for i in range(100_000):
        cache.put(DialogScope(f"call-{i}", "a", "b"), REF, CEK)
    assert len(cache) == 1000
    assert len(cache._by_scope) == 1000  # the scope index shrinks with the entries
    assert cache.get(DialogScope("call-99999", "a", "b"), REF) is not None
    assert cache.get(DialogScope("call-0", "a", "b"), REF) is None


def test_expired_entries_are_purged(cache: MemoryKeyCache, clock: FakeClock) -> None:
    cache.put(DIALOG, REF, CEK, ttl=1)
    cache.put(DIALOG, b"long", CEK, ttl=100)
    clock.now += 2
    assert cache.purge_expired() == 1 and len(cache) == 1
    cache.put(DIALOG, b"a", CEK, ttl=1)
    clock.now += 200
    cache.put(DIALOG, b"b", CEK)  # puts sweep expired entries off the old end
    assert len(cache) == 1


def test_wire_material_is_bounded(cache: MemoryKeyCache) -> None:
    with pytest.raises(LimitExceededError):
        cache.put(DIALOG, b"r" * 257, CEK)
    with pytest.raises(LimitExceededError):
        cache.put(DIALOG, REF, b"k" * 65)
    with pytest.raises(MalformedError):
        cache.put(DIALOG, b"", CEK)


def test_repr_hides_the_cek(cache: MemoryKeyCache) -> None:
    secret = bytes.fromhex("deadbeefcafebabe0011223344556677")
    entry = cache.put(DIALOG, REF, secret)
    for text in (repr(entry), str(entry), repr(cache), repr(cache.get(DIALOG, REF))):
        assert "deadbeef" not in text and "\\xde" not in text and str(list(secret)) not in text
        assert "DEADBEEF" not in text.upper()


def test_encode_decode_round_trip(clock: FakeClock) -> None:
    scopes = [DIALOG, DialogScope("odd|call,id %x@[::1]\n", "t|1"),
              TransactionScope("m@h", 7, "z9hG4bK-a|b")]
    for scope in scopes:
        entry = CachedKey(cek=os.urandom(32), reference=os.urandom(20), scope=scope,
                          created=1_700_000_000.25, expires=1_700_043_200.5, max_decrypts=9,
                          cipher="aes-256-gcm")
        bare = CachedKey(cek=CEK, reference=REF, scope=scope, created=1.0, expires=2.0)
        odd = replace(bare, reference=b"other", keeper="answer:sip%3Aodd|user sip:x\n|y")
        kept = [(entry, "sip:node-a:5090"), (bare, ""), (odd, "node|b\nc")]
        text = encode_scope_keys(scope, kept)
        assert text.startswith("r1|") and text.count("\n") == 3     # one line per key
        assert decode_scope_keys(text) == (scope, kept)


def test_a_scope_key_names_its_scope_and_says_whether_it_is_short_lived() -> None:
    long_scope = DialogScope("x" * 5000 + " with spaces", "t" * 300, "u")
    name = scope_key(long_scope)
    assert " " not in name and len(name) <= 160 and name.endswith("/")
    assert scope_key(DIALOG) == f"d:{DIALOG.call_id}:1928301774:a6c85cf/"
    assert scope_key(DialogScope(DIALOG.call_id, "A6C85CF", "1928301774")) == scope_key(DIALOG)
    assert not short_lived_key(name) and not short_lived_key(scope_key(DIALOG))
    assert short_lived_key(scope_key(DialogScope("a:b:c@x", "t:1")))        # parts hashed
    assert short_lived_key(scope_key(TransactionScope("c@x", 1, "z9hG4bK-1")))


def test_a_full_scope_lets_go_of_the_biggest_holders_oldest_key() -> None:
    def key(n: int, keeper: str | None) -> CachedKey:
        return CachedKey(cek=CEK, reference=b"r%d" % n, scope=DIALOG, created=float(n),
                         expires=1e9, keeper=keeper)
    alice = [key(n, "alice") for n in range(3)]
    carol = [key(n, "carol") for n in range(3, 8)]
    assert scope_victim(alice + carol, "alice") is carol[0]   # carol holds the most
    assert scope_victim(alice + carol, "carol") is carol[0]
    even = alice + carol[:2]
    assert scope_victim(even, "alice") is alice[0]            # a tie: the newcomer's own
    assert scope_victim(even, "carol") is carol[0]
    assert scope_victim(even, "bob") is alice[0]              # a tie for a third: the first
    assert scope_victim(alice, None) is alice[0]


def test_memory_cache_holds_a_scope_to_its_bound(clock: FakeClock) -> None:
    from e2m_plugins.keycache import MAX_KEYS_PER_SCOPE
    cache = MemoryKeyCache(clock=clock)
    cache.put(DIALOG, b"alice", CEK, keeper="alice")
    for n in range(MAX_KEYS_PER_SCOPE + 5):
        clock.now += 1
        cache.put(DIALOG, b"carol%d" % n, CEK, keeper="carol")
    assert len(cache) == MAX_KEYS_PER_SCOPE
    assert cache.get(DIALOG, b"alice") is not None             # the flood's own went
    assert cache.get(DIALOG, b"carol0") is None and cache.get(DIALOG, b"carol36") is not None


def test_one_keeper_past_its_quota_loses_its_own_keys(clock: FakeClock) -> None:
    """1/8 of the cache each: mallory's fourth key pushes out her own oldest (her
    short-lived ones first), never alice's; keys with no keeper count for nobody."""
    cache = MemoryKeyCache(max_entries=24, clock=clock)
    cache.put(DIALOG, REF, CEK, keeper="sip:alice@example.com")
    early = DialogScope("e@x", "m0")
    cache.put(early, b"early", CEK, keeper="sip:mallory@example.com")
    for n in range(4):
        clock.now += 1
        cache.put(DialogScope(f"m{n}@x", "m1", "b1"), b"call", CEK, keeper="sip:mallory@example.com")
    assert cache.get(DIALOG, REF) is not None
    assert cache.get(early, b"early") is None                 # her short-lived one went first
    held = [n for n in range(4) if cache.get(DialogScope(f"m{n}@x", "m1", "b1"), b"call")]
    assert held == [1, 2, 3]
    for n in range(10):
        cache.put(DialogScope(f"n{n}@x", "t"), b"free", CEK)
    assert len(cache) == 1 + 3 + 10


@pytest.mark.parametrize("text", ["", "k1|", "r2|[\"d\",\"c\",\"t\"]", "r1|d,c,t", "r1|[\"q\",\"c\"]",
                                  "r1|[\"d\",\"c\"]", "r1|[\"t\",\"c\",\"x\",\"b\"]", "r1|{}",
                                  "r1|[\"d\",\"c\",1]", "r1|[\"d\",\"c\",\"\"]",
                                  "r1|[\"d\",\"c\",\"t\"]\nAQ|1|2|-|-|AA|-", "r1|[\"d\",\"c\",\"t\"]\nAQ|one|2|-|-|AA|-|-",
                                  "r1|[\"d\",\"c\",\"t\"]\nAQ|1|2|0|-|AA|-|-", "r1|[\"d\",\"c\",\"t\"]\n|1|2|-|-|AA|-|-",
                                  "r1|[\"d\",\"c\",\"t\"]\nAQ|1|2|-|-||-|-", "r1|[\"d\",\"c\",\"t\"]\nAQ|1|2|-|-|A|-|-",
                                  "r1|[\"d\",\"c\",\"t\"]\nAQ|1|2|-|-|AA|_w|-", "r1|[\"t\",\"c\",\"-1\",\"b\"]"])
def test_decode_rejects_garbage(text: str) -> None:
    with pytest.raises(MalformedError):
        decode_scope_keys(text)


def test_thread_safety_smoke(clock: FakeClock) -> None:
    cache = MemoryKeyCache(max_entries=500, clock=clock)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(2000):
                scope = DialogScope(f"c{n}-{i % 50}", "a", "b")
                cache.put(scope, REF, CEK, max_decrypts=3)
                cache.get(scope, REF)
                if i % 7 == 0:
                    cache.drop_scope(scope)
        except BaseException as exc:  # noqa: BLE001 - report any failure in the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) <= 500
    assert sum(len(v) for v in cache._by_scope.values()) == len(cache)
