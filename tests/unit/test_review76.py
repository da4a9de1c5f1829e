"""A seventy-sixth attacker's review (December 2026) of c882b11: this stop's last fixes
attacked - review 75's "reuse a dialog key only when we would choose every holder"
(``UAEngine._chooser``, ``DialogKeys.reusable(acceptable=)``), review 74's
``kemi.count_registration`` (one function for the front and the nodes), ``db_cmd._grant``
with its fill-only trigger, and the users of ``privatefiles``.  The count is run against
review 74's model of Kamailio's ``e2mregs`` htable and the registrar's location table
(imported from ``tests/unit/test_review74.py``), with two SIP workers interleaved.

Hole 1 (``test_hole_two_workers_bind_an_aor_past_the_cap_uncounted``)

Attacker: an off-path sender (no account) where the registrar is open (no ``[auth]``:
the default cluster), from one address S, straight to a node (or to the front, which
runs the same function).

Messages: S registers the cap's worth of AoRs (3 here).  Then, for each new AoR X, a
burst of copies of one REGISTER for X (same source, same To) sent at once over UDP, so
that two SIP workers take two copies at the same moment.

Effect: ``count_registration`` in worker A increments the pair ``S|X`` (1: new), then
S's count (4 > 3): it undoes S's count and *removes the pair* (``sht_rm``) before it
answers 403.  Worker B's copy, handled between A's ``sht_inc(pair)`` and A's
``sht_rm(pair)``, sees the pair at 2, takes the REGISTER for a refresh of an AoR S
already holds (``_touch_count``, allowed, nothing counted) and the registrar binds X.
X then lives a whole ``max_expires`` on the node with no pair and no count behind it;
every burst that wins the window binds one more: the number of AoRs one source holds
is bounded by its win rate times the contact lifetime, not by
``registrations_per_source`` (here 3 bursts won: 6 AoRs from one source against a cap
of 3).  The window is a few htable operations wide, so a burst of copies (pike's rate
allows them) wins it now and then; each won window is a binding the cap never sees.
At fault: ``kamailio_app/kemi.py`` ``count_registration``: ``if
KSR.htable.sht_inc(_REGS, pair) > 1: _touch_count(source); return True, None`` takes
"the pair's item is above 1" for "this pair was counted", while a concurrent refusal
still holds the item at 1 and then removes it (``KSR.htable.sht_rm(_REGS, pair)``);
the same holds for the save-failure rollback in ``route_register`` (a copy taken for a
refresh while the first copy's ``save`` fails and removes the pair).
Fix: make the pair's check and the source's count one critical section
(``KSR.htable.sht_lock(_REGS, pair)`` ... ``sht_unlock`` around ``count_registration``
and the rollback), or mark a pair counted only once its source was admitted (e.g. set
the pair to a "counted" value with ``sht_seti`` after the source's ``sht_inc`` passed,
and treat a pair that exists but is not yet "counted" as new: 403 or retry), never
``sht_rm`` a pair another worker may already have taken for counted.

The same at the front: ``test_hole_the_front_relays_an_aor_past_the_cap_uncounted``
(``count_registration`` is one function; the nodes behind it bind what it relays).

Controls: ``test_control_one_worker_refuses_the_fourth_aor_and_binds_nothing`` (the
same copies handled one after the other: every copy of the fourth AoR is 403, nothing
bound past the cap); ``test_control_two_workers_refreshing_a_counted_aor_pass``
(two copies of a refresh of a counted AoR, interleaved the same way, both pass and
count nothing: the interleaving itself is harmless where the pair was counted).

Tried and held (read, or run where named):
- An AoR spelled so the pair differs while the registrar binds the same AoR: the pair
  is the percent-decoded, case-kept user at the host key, the registrar's key the
  un-escaped, case-kept user (``case_sensitive 1``, ``use_domain 0``).  Every spelling
  that binds one AoR under two pairs (another host of ours, ``%61lice``, a password
  that makes the identity None) counts more, never less: tighter, no hole.  Two
  registrar AoRs under one pair would need two users that decode alike: none (case is
  kept, invalid UTF-8 gives no identity, the raw To is then the pair).
- A REGISTER the registrar refuses after counting (503 past ``max_contacts``, 400):
  the rollback decrements the source and removes the pair; a query (no Contact) or a
  ``Contact: *`` unregister counts and binds nothing: tighter.
- IPv6 sources: ``$si`` has no brackets and never a ``|``; ``partition("|")[0]`` is
  the source for any AoR (a ``|`` in the AoR is after the first one).
- Review 75's fix, read: the same ``acceptable`` is used for ``reusable`` (the
  audience) and ``reuse`` (the kekri), and ``_seal_keys`` reuses only exclusive keys
  with no readers, so a third-domain holder never gets the kekri; the answer to a
  re-INVITE she receives, a 183 or UPDATE/PRACK all go through ``_protect`` with
  ``peer`` from the To (requests) or From (responses), the dialog's peer, which a hop
  cannot change under a signed context.  The default ``accepts_proxy`` (her domain's
  and the peer's, any host in them) lets bob's domain's hosts read her answer: the
  documented rule (protocol.md "Whose key a UA reuses"), not a hole here.
  ``is_configured`` accepts a configured proxy for any method (one configured for
  MESSAGE only would read SDP under a key bob named it for); bob's own
  ``accepts_proxy`` keeps him from naming a third-domain host he did not configure,
  so only an insider peer (who can hand her SDP over anyway) gets there: held.
- ``db_cmd._grant`` and ``e2m_bodies_fill_only``: run in
  ``tests/cluster/test_review76_cluster.py`` (a hole there: a database the nodes'
  account owns keeps schema ``public`` theirs, and they drop the trigger).  On the
  owner's database the trigger holds (``DISABLE TRIGGER``, ``session_replication_role``
  refused).  A second INSERTed row (earlier time, another uid) with any sender and
  "verified" is within what the nodes' account must do (insert rows): the known limit
  "Without --owner-url" says it reads, inserts and fills; not re-reported.  A response
  row stored with an empty sender can be filled first by whoever holds that password:
  the "fill once" design review 66 chose, noted.
- ``privatefiles`` users, read: the proxy's and the phone's ``[identity] key``
  (``certfiles.load_private_key_file``), ``[tls] key``, PROXY.toml with a password,
  ``[auth] users``, the archive file and the phone's password file all pass it.
  ``e2m cms decrypt --key`` (``cli/cms_cmd._load_key``, ``cli.read_input``) reads a
  key the operator names on the command line without the check: a 0644 key there was
  already exposed by its mode; defence in depth only, noted, no new effect.

Fixed (stop 32): ``kemi.count_registration`` marks a pair counted (``sht_seti``) only
after its source was admitted and never removes it; an unmarked pair counts against
the source, so interleaved copies can only over-count (fail closed).  Both holes
turned XPASS; the markers are gone.  The save-failure rollback went with it: a
REGISTER the registrar refuses keeps its count until the pair expires.
"""

from __future__ import annotations

import pytest

from tests.unit.test_review74 import S, T, _aor, front, node  # noqa: F401  (fixtures)


def _interleave(proxy, hook_key: str):
    """Run a second worker's REGISTER (same source, same To) inside the first worker's
    first write to the source's own items (its count, later its slots): the moment
    between what it read and its verdict."""
    import sys
    htable = sys.modules["KSR"].htable
    state = {"armed": False, "second": "unset"}

    def hooked(inner):
        # the source's own items: its count (stop 32) or its slots ``source#i`` (review 78)
        def write(table: str, key: str, *value: int) -> int:
            result = inner(table, key, *value)
            if state["armed"] and key.split("#")[0] == hook_key:
                state["armed"] = False
                state["second"] = proxy.register(state["source"], state["to"])
            return result
        return write

    htable.sht_inc = hooked(htable.sht_inc)
    htable.sht_seti = hooked(htable.sht_seti)
    htable.sht_setxi = hooked(htable.sht_setxi)        # slots with their own lifetime

    def burst(source: str, to_uri: str):
        state.update(armed=True, source=source, to=to_uri, second="unset")
        first = proxy.register(source, to_uri)
        return first, state["second"]

    return burst


def test_control_one_worker_refuses_the_fourth_aor_and_binds_nothing(node):  # noqa: F811
    assert [node.register(S, _aor(n)) for n in range(3)] == [None] * 3
    for n in range(3, 6):
        assert [node.register(S, _aor(n)) for _ in range(4)] == [403] * 4
    assert sorted(node.location.live()) == sorted(_aor(n) for n in range(3))


def test_control_two_workers_refreshing_a_counted_aor_pass(node):  # noqa: F811
    assert [node.register(S, _aor(n)) for n in range(3)] == [None] * 3
    burst = _interleave(node, S)
    node.clock[0] += node.max_expires / 2
    assert burst(S, _aor(0)) == (None, None)          # both copies refresh, nothing more
    assert node.register(S, _aor(3)) == 403           # the count is still 3
    assert node.register(T, _aor(3)) is None          # another source: its own count
    assert len(node.location.live()) == 4


def test_hole_two_workers_bind_an_aor_past_the_cap_uncounted(node):  # noqa: F811
    assert [node.register(S, _aor(n)) for n in range(3)] == [None] * 3
    burst = _interleave(node, S)
    verdicts = [burst(S, _aor(n)) for n in range(3, 6)]
    live = node.location.live()
    print(f"\nbursts (first copy, concurrent copy): {verdicts}; live AoRs from S: {len(live)}")
    for n in range(3, 6):          # a later refresh of a won AoR: no pair, so 403
        assert node.register(S, _aor(n)) == 403
    assert len(live) <= 3, (f"one source holds {len(live)} AoRs against a cap of 3: "
                            f"{sorted(live)}")


def test_hole_the_front_relays_an_aor_past_the_cap_uncounted(front):  # noqa: F811
    assert [front.register(S, _aor(n)) for n in range(3)] == [None] * 3
    burst = _interleave(front, S)
    verdicts = [burst(S, _aor(n)) for n in range(3, 6)]
    live = front.location.live()
    print(f"\nfront bursts: {verdicts}; AoRs the nodes bound for S: {len(live)}")
    assert len(live) <= 3, f"one source holds {len(live)} AoRs against a cap of 3"
