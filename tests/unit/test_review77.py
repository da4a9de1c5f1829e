"""A seventy-seventh attacker's review (December 2026) of c882b11: a stranger filling what
the proxy and the phone keep (count AND age): the core's caches, without Kamailio.

The holes on a real Kamailio, with the attacker, the messages and the measured effect,
are in ``tests/kamailio/test_review77_wire.py`` (hole 1: long From URIs through
``kemi.from_ours``; hole 2: stray 401s with long header names through
``kemi.own_realm_challenge``).  Here the two caches at fault, fed what Kamailio hands
them (its ``$fu`` and header names have no line limit, unlike ``sip.parse``'s 8 KiB):

- ``test_hole_identity_of_keeps_a_strangers_uris_in_full``: ``uri.identity_of`` is an
  ``lru_cache(maxsize=1024)``: 1,100 distinct 60,000-character URIs leave ~120 MB
  behind (the URI and its user part per entry), never aged.  Fix: do not cache (or
  refuse) a URI longer than a header line the core would take; bound the cache in bytes.
- ``test_hole_canonical_name_keeps_a_strangers_names_in_full``: ``sip.canonical_name``,
  the same: 1,100 60,000-character header names leave ~120 MB.  Fix: cache only names
  no longer than the longest one we ever look for.

Controls: the same number of short URIs and names keep little (the bound in entries is
real, the growth is their size), and a long URI is still read right (nothing refused by
today's code: the attack's input is what the caches see).

Tried and held: see the wire module's docstring.

Fixed (stop 32): ``uri.identity_of`` and ``sip.canonical_name`` cache only short
inputs (256 and 64 characters); a longer one is read each time.  Both holes turned
XPASS; the markers are gone.
"""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from e2m_plugins import sip, uri

COUNT = 1100          # past the caches' 1024 entries
LONG = 60_000         # what one UDP datagram carries in one From or header name
BOUND = 16 << 20      # what a stranger may leave behind: 16 MiB


def _kept(call, inputs) -> int:
    """Bytes still allocated after ``call`` has seen every input (the inputs dropped)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for make in inputs:
            call(make())
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _long_uri(n: int) -> str:
    return f"sip:{n:05d}" + "a" * LONG + "@evil.example"


def test_control_identity_of_reads_a_long_uri_and_short_ones_keep_little():
    identity = uri.identity_of(_long_uri(7))
    assert identity is not None and identity.host == "evil.example"
    assert identity.user is not None and len(identity.user) == LONG + 5
    uri.identity_of.cache_clear()
    kept = _kept(uri.identity_of,
                 (lambda n=n: f"sip:short{n}@evil.example" for n in range(COUNT)))
    assert uri.identity_of.cache_info().currsize == 1024
    assert kept < 2 << 20, kept


def test_hole_identity_of_keeps_a_strangers_uris_in_full():
    uri.identity_of.cache_clear()
    try:
        kept = _kept(uri.identity_of, (lambda n=n: _long_uri(n) for n in range(COUNT)))
        print(f"review77: identity_of keeps {kept / 2**20:.1f} MiB")
        assert kept < BOUND, f"identity_of keeps {kept / 2**20:.1f} MiB"
    finally:
        uri.identity_of.cache_clear()


def test_control_canonical_name_short_names_keep_little():
    assert sip.canonical_name("X-" + "A" * LONG) == "x-" + "a" * LONG
    sip.canonical_name.cache_clear()
    kept = _kept(sip.canonical_name, (lambda n=n: f"X-Short-{n}" for n in range(COUNT)))
    assert kept < 2 << 20, kept


def test_hole_canonical_name_keeps_a_strangers_names_in_full():
    sip.canonical_name.cache_clear()
    try:
        kept = _kept(sip.canonical_name,
                     (lambda n=n: f"X-{n:05d}-" + "a" * LONG for n in range(COUNT)))
        print(f"review77: canonical_name keeps {kept / 2**20:.1f} MiB")
        assert kept < BOUND, f"canonical_name keeps {kept / 2**20:.1f} MiB"
    finally:
        sip.canonical_name.cache_clear()
