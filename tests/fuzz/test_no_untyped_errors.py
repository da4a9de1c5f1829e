"""Every parser that sees network input, fed mutated valid input and random bytes.

The property (fuzzkit.run_one): only an ``E2MError`` may escape a target;
``ProxyEngine.inspect`` never raises at all; no input under 64 KiB takes a
second.  Seeds are valid E2M material made by the project's own code at test
time; hypothesis mutates them (bit flips, DER length rewrites, spans
duplicated, spliced or cut) and shrinks any failure to a small reproducer.
"""

from __future__ import annotations

import pytest
from fuzzreport import EXAMPLES, stats_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2m_lab import fuzzkit

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


@pytest.mark.parametrize("name", sorted(fuzzkit.TARGETS))
def test_seeds_are_accepted(kit, name):
    """The seeds are valid: a target that rejects its own seeds fuzzes nothing."""
    target = fuzzkit.TARGETS[name]
    seeds = target.seeds(kit)
    assert seeds
    stats = fuzzkit.Stats()
    for seed in seeds:
        fuzzkit.run_one(target, kit, seed, stats)
    # ua_open's seeds include the proxy's 496 (bob refuses its certificate body)
    assert stats.rejected <= (1 if name == "ua_open" else 0), stats.errors


@pytest.mark.parametrize("name", sorted(fuzzkit.TARGETS))
def test_mutated_valid_input_gives_only_typed_errors(kit, name):
    target = fuzzkit.TARGETS[name]
    stats = stats_for(name)

    @settings(max_examples=EXAMPLES, **SETTINGS)
    @given(fuzzkit.mutated(target.seeds(kit)))
    def check(data: bytes) -> None:
        fuzzkit.run_one(target, kit, data, stats)

    check()


@pytest.mark.parametrize("name", sorted(fuzzkit.TARGETS))
def test_random_bytes_give_only_typed_errors(kit, name):
    target = fuzzkit.TARGETS[name]
    stats = stats_for(name)
    # Random bytes behind a plausible start, so they get past the first check.
    prefix = {"sip": b"MESSAGE sip:b@x SIP/2.0\r\n", "proxy_inspect": b"INVITE sip:b@x SIP/2.0\r\n",
              "ua_open": b"SIP/2.0 200 OK\r\n", "sdp": b"v=0\r\n", "mime": b"Content-Type: ",
              "cms_envelope": b"\x30\x80", "cms_signed": b"\x30\x82", "smime_open": b"\x30"}

    @settings(max_examples=max(EXAMPLES // 2, 10), **SETTINGS)
    @given(st.binary(max_size=4096), st.booleans())
    def check(data: bytes, prefixed: bool) -> None:
        fuzzkit.run_one(target, kit, (prefix.get(name, b"") if prefixed else b"") + data, stats)

    check()


@pytest.mark.parametrize("name", sorted(fuzzkit.TARGETS))
def test_a_seeded_mutation_campaign(kit, name):
    """A fixed-seed campaign (no shrinking, cheap per input) over more inputs."""
    import random
    target = fuzzkit.TARGETS[name]
    seeds = target.seeds(kit)
    stats = stats_for(name)
    rng = random.Random(f"e2m-{name}")
    for _ in range(EXAMPLES * 3):
        fuzzkit.run_one(target, kit, fuzzkit.mutate(rng, seeds), stats)
