"""A seventy-eighth attacker's review (December 2026) of 753b2c5: stop 32's fixes attacked
- ``kemi.count_registration`` (front and node: pairs ``source|sha256(AoR)[:32]`` marked
with ``sht_seti`` once admitted and never unmarked, ``_touch_count`` on a refresh, the
open registrar's 400), the front's reply filter and stray replies under pike,
``privatefiles`` / ``write_output(private=True)``, ``db_cmd --owner-url`` (``_take_over``,
``_grant``, ``e2m_bodies_fill_only``; run in ``tests/cluster/test_review78_cluster.py``)
and review 75's ``UAEngine._chooser`` / ``DialogKeys.reusable(acceptable=)``.  The count
is run against review 72's model of Kamailio's ``e2mregs`` htable and review 74's model
of the registrar's location table (``tests/unit/test_review74.py``).

Hole 1 (``test_hole_a_forged_burst_keeps_a_shared_address_full_while_alice_refreshes``,
and the same at the front: ``test_hole_the_front_keeps_a_forged_burst_counted_...``)

Attacker: an off-path sender (no account, sees nothing) where the registrar is open (no
``[auth]``, the default cluster), forging the UDP source address S of an office NAT (or
any address several phones share) behind which alice's phone is registered; or, with no
forgery at all, a stranger who shares that address (CGNAT, a hotel NAT: the attacker of
review 29's row in docs/threat-model.md).

Messages: once, from the forged source S, two REGISTERs for AoRs of his own
(``sip:junk0@``, ``sip:junk1@``; ``Expires: 0`` or no Contact does as well: the pair is
counted before the registrar reads the Contact).  Nothing more: he never refreshes them.

Effect: S's count is 3 (alice + 2) = the cap.  The junk contacts and their pairs expire
an hour later, but S's *count* is an item of its own that is decremented by nothing
(pairs are "never unmarked", and an expiring pair takes nothing off its source) and
that every refresh of alice's touches (``_touch_count``, review 72): it stays at 3 as
long as alice's phone is on.  Two hours later (one AoR live from S, cap 3) bob's new
phone behind the same NAT sends its first REGISTER: 403 "Too Many Registrations From
This Address", and so does every later one, for as long as alice refreshes - a one-shot
forgery becomes an unbounded lock-out (the known limit "get an address banned by
spoofing UDP from it" is bounded by ``ban_time``; this one by nothing).  The same
without an attacker: phones behind one address that come and go use up the cap one
re-registration after expiry at a time, and the address then registers nothing new
while any of its AoRs is refreshed - the count outlives the pairs it counts.
At fault: ``kamailio_app/kemi.py`` ``count_registration``: ``KSR.htable.sht_inc(_REGS,
source)`` counts a pair once, and no code ever takes it back when the pair's item
expires, while ``_touch_count(source)`` (``kemi.py`` line ~199) keeps the sum alive.
Fix: make the source's count the number of its live pairs, not a running sum: count
them (``$shtcn(e2mregs=>^<source>\\|)``, the pairs' names begin with the source) or
decrement the source when a pair expires (``event_route[htable:expired:e2mregs]``
with ``$shtrecord(key)``), and let ``_touch_count`` renew only what is counted.

Controls: ``test_control_without_the_forgery_bob_registers_behind_alice`` (the same
timeline without the two forged REGISTERs: bob registers, alice's refreshes pass);
``test_control_the_forged_aors_are_gone_from_the_location_table`` (the hole's set-up:
the two forged AoRs are bound, then gone, and S holds one live AoR when bob is refused);
``test_control_a_source_past_the_cap_is_refused`` (the cap still refuses a fourth live
AoR: the secure behaviour the hole asks for is not "no cap").

Tried and held (read, or run where named):
- Spellings: the pair is ``sha256(str(identity))``; ``str(identity)`` is injective
  (a host never holds ``@``, the user is what lies between ``sip:`` and the last ``@``),
  and the registrar's key (``use_domain 0``, ``case_sensitive 1``, un-escaped user) is a
  function of the identity: every spelling of one registrar AoR counts the same or
  more (another host, ``;user=phone`` with user parameters), never less.
- A stranger registering *alice's* AoR from many (forged) sources counts against each
  of those sources, never against alice's: her own REGISTER passes (an open registrar
  lets anyone bind alice's AoR anyway: the known limit).
- Workers racing: a pair is read then set only after its source's ``sht_inc`` passed;
  two copies may both count (fail closed); a refresh never unmarks a pair.
- The 400 of an open registrar for an unreadable To or an AoR over 256 characters: a
  real AoR is far shorter, and a compact ``t:`` To is the same ``$tu`` for Kamailio.
- ``UAEngine._chooser``: a holder is compared by ``host_key`` (case, trailing dot,
  IPv6 form); one with a port or a non-ASCII name matches no ``accept_proxies``
  entry nor domain suffix (``"proxy.example.com:5061".endswith(".example.com")`` is
  False; ``validate_host`` refuses non-ASCII): such a key is not reused, fail closed.
  ``evilexample.com`` does not end with ``.example.com``.

Fixed (stop 33): a source's count is its live AoRs, one slot each in e2mregs
(``source#1`` ... ``source#N``), claimed by the increment that takes a free slot from 0
to 1 and renewed only by the refresh of the AoR holding it (``kemi.count_registration``);
the counter and ``_touch_count`` are gone.  Both holes turned XPASS and the markers are
gone; ``test_refused_attempts_do_not_keep_a_full_sources_slots_alive`` (the fix's own
attack: a refused try must not renew the slots it reads) failed on the old code too.
The controls read the set-up before bob's REGISTER (he is now admitted).
"""

from __future__ import annotations

import pytest

from tests.unit.test_review74 import front, node  # noqa: F401  (fixtures)

S = "192.0.2.50"                 # an office NAT: alice's phone, later bob's (and forged)


def _alice_and_maybe_forgery(proxy, forged: bool) -> list[int | None]:
    """alice registers from S; the stranger, forging S, registers two AoRs once; alice
    refreshes every half hour for two and a half hours; then bob's first REGISTER."""
    assert proxy.register(S, "sip:alice@example.com") is None
    if forged:
        assert [proxy.register(S, f"sip:junk{n}@example.com") for n in range(2)] == [None, None]
    for _ in range(5):
        proxy.clock[0] += proxy.max_expires / 2
        assert proxy.register(S, "sip:alice@example.com") is None      # alice's refresh
    return [proxy.register(S, "sip:bob@example.com")]


def test_control_without_the_forgery_bob_registers_behind_alice(node):  # noqa: F811
    assert _alice_and_maybe_forgery(node, forged=False) == [None]
    assert sorted(node.location.live()) == ["sip:alice@example.com", "sip:bob@example.com"]


def test_control_the_forged_aors_are_gone_from_the_location_table(node):  # noqa: F811
    bob = _alice_and_maybe_forgery(node, forged=True)
    others = [aor for aor in node.location.live() if aor != "sip:bob@example.com"]
    assert others == ["sip:alice@example.com"], node.location.live()
    assert "sip:junk0@example.com" in node.location.aors        # they were bound once
    print(f"\nbob's first REGISTER, S holding one live AoR besides (cap 3): {bob}")


def test_control_a_source_past_the_cap_is_refused(node):  # noqa: F811
    assert [node.register(S, f"sip:user{n}@example.com") for n in range(4)] == \
        [None, None, None, 403]


def test_hole_a_forged_burst_keeps_a_shared_address_full_while_alice_refreshes(node):  # noqa: F811
    bob = _alice_and_maybe_forgery(node, forged=True)
    live = node.location.live()
    assert bob == [None], (f"bob's first REGISTER from {S} got {bob[0]} while the address "
                           f"holds {len(live)} live AoR(s) {live} against a cap of 3")


def test_control_the_front_relays_bob_without_the_forgery(front):  # noqa: F811
    assert _alice_and_maybe_forgery(front, forged=False) == [None]


def test_hole_the_front_keeps_a_forged_burst_counted_while_alice_refreshes(front):  # noqa: F811
    bob = _alice_and_maybe_forgery(front, forged=True)
    assert bob == [None], f"the front refused bob's first REGISTER from {S}: {bob[0]}"


def test_refused_attempts_do_not_keep_a_full_sources_slots_alive(node):  # noqa: F811
    """The fix's own attack: with S full, the stranger keeps trying new AoRs (each 403)
    every quarter of the slots' lifetime.  A try reads the slots and writes none, so
    the three junk slots still expire on time and bob then registers from S."""
    assert [node.register(S, f"sip:junk{n}@example.com") for n in range(3)] == [None] * 3
    for round_ in range(4):
        node.clock[0] += node.max_expires / 4 - 1
        assert node.register(S, f"sip:try{round_}@example.com") == 403
    node.clock[0] += 15                  # past the slots' 10 s of slack (review 80)
    assert node.register(S, "sip:bob@example.com") is None


def test_a_refresh_keeps_its_one_slot_and_a_copy_cannot_take_a_second(node):  # noqa: F811
    """A refresh renews the slot it holds (no new slot per refresh), so three AoRs
    refreshed for hours still leave S at three."""
    assert [node.register(S, f"sip:user{n}@example.com") for n in range(3)] == [None] * 3
    for _ in range(6):
        node.clock[0] += node.max_expires / 2
        assert [node.register(S, f"sip:user{n}@example.com") for n in range(3)] == [None] * 3
        assert node.register(S, "sip:user9@example.com") == 403
