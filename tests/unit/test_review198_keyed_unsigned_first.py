"""Review 198 (attacker's review) of 826aaf8: ``keyed`` worked out only for a message
with no signed context, and a key the lookup found unsigned skipped with no second read.

826aaf8 fixed review 196 HB1 (a signed key gone since the reading still counted) and
kept issue 17's saving.  Compared with the code before c6d4dea (``c6d4dea^``: every
kekri that opened a part re-read, the keeper as kept *at the decision* counted):

Hole K1: a key found unsigned at the reading but signed at the decision makes nothing keyed
- Attacker: a party of the dialog (kept names bind the two parties) on a cluster, or any
  interleaving on one node; race-only.  The host reads a reply in the core reply route
  (``read_response``: the lookup, ``KeptLookup.keeper``) and decides in tm's reply route
  (``inspect`` -> ``_view`` -> ``_signers_key_opened``).  In between the record under
  the looked-up name can come to hold the same reference with a signed keeper: (a)
  another worker drops the scope (CANCEL/BYE/last use/expiry) and a signed offer puts
  it again; (b) DMQ (``e2mkeys`` has ``dmqreplicate=1``) overwrites the whole htable
  item with another node's record, whose key for that reference has a signed keeper
  (no drop needed: ``put`` never replaces a key on *one* node, but a replicated item
  replaces the node's record wholesale).
- Messages: alice's signed INVITE (her key kept early); the early record made to hold
  that key under ``unsigned:`` before bob's kekri answer is read (``read_response``);
  then (a) drop + signed put, or (b) another node's sealed record (same seal key, signed
  keeper) copied over the item, as DMQ would; then ``_signers_key_opened``.
- Effect observed: the cache holds the key with a signed keeper at the decision (1 of
  1 reads); ``c6d4dea^``'s rule (re-read, count a signed one) gives keyed=True; 826aaf8
  gives keyed=False (2 of 2 variants).  For a message with no signed context (a legacy
  answer) ``_fork`` then claims its slot with ``shared=False`` (node-local) where the old
  code claimed it across the cluster: another node may give the same slot to another
  To tag (slot 0 for a dialog's life twice).  The mirror image of review 196 HB1: the
  fix re-reads only one direction, so the decision is from the reading's keeper for
  unsigned keys and from the decision's for signed ones.
- Code at fault: e2m_plugins/proxy.py:899-900 (``found.keeper in unsigned`` ->
  ``continue`` with no read); the comment's premise "a put never replaces a kept key"
  holds per node, not for a drop+put or a DMQ-replicated item.
- Suggested fix: re-read every used ``KeptLookup`` (it runs only for context-less
  messages now, so the saving is kept for signed answers), or document that an
  unsigned-at-reading key never counts (and accept the node-local claim).
- Test: test_hole_k1_unsigned_at_reading_signed_at_decision_drop_and_put,
  test_hole_k1_dmq_record_overwrite_with_signed_keeper

Controls
- test_control_unsigned_kept_unsigned_is_not_keyed: found unsigned, still unsigned:
  keyed False (old and new).
- test_control_signed_kept_signed_is_keyed: found signed, still signed: True (both).
- test_control_signed_context_claims_shared_whatever_keyed: the all-None gate: a signed
  answer's ``reading.contexts`` give ``admit_fork(shared=True)`` for keyed False and True
  (2 of 2), so skipping the read there changes no claim.
- test_control_view_sees_reading_contexts: ``_view``'s fork claim for the signed answer
  is shared (1 claim, shared=True), the contexts ``_keep_keys`` and ``_fork`` get are
  the reading's.

Tried and held
- Same ``contexts`` everywhere: ``_view`` passes ``list(reading.contexts)`` to
  ``_fork`` and to ``_keep_keys`` (which passes the same list to ``_fork``); ``keyed``
  reaches nothing but ``_fork``'s ``shared``; so with any context not None ``shared``
  is True on both versions whatever ``keyed`` is.  ``_spend`` passes its own
  ``keyed=kept.keeper not in unsigned`` from a counted read: unchanged by 826aaf8.
- A context not None but unsigned/unchecked: ``_context`` returns a context for an
  unprotected or legacy part only when ``part.context_signed``; a protected non-legacy
  part without one raises 495.  Whatever it is, ``shared`` counts it the same on both
  versions (the gate only skips ``keyed`` where ``shared`` is True already).
- Two parts, one with a context and one without: ``all(c is None)`` False, ``shared``
  True by the other part: same claim.
- 2xx to a re-INVITE / PRACK / UPDATE: ``_invite_2xx`` needs cseq INVITE and
  ``_keep_keys`` uses ``_first_tag`` (no ``keyed``) for PRACK/UPDATE; a re-INVITE's 2xx
  is a dialog scope, keyed only changes ``shared``: same analysis.
- UA side: ``ua.py`` has no ``_signers_key_opened`` and no fork claim (grep); its only
  ``keyed`` (ua.py:923) says whether an SDP carries keying attributes, unrelated.
- Dialog scope unsigned, early scope signed (two references): ``kept_kek`` stops at the
  first scope holding a reference (dialog first, as before c6d4dea); each reference one
  ``KeptLookup``; the ``any`` over used ones re-reads the signed early one: True on both.
  One reference is never looked up in both scopes, so order cannot hide a signed one.

Fixed (stop 51): every lookup whose key opened a part is read again at the decision,
as before c6d4dea; ``keyed`` is still worked out only for a message with no signed
context (the control above: such a message's claim is shared whatever ``keyed`` says),
so a signed answer keeps the saving.  ``KeptLookup`` no longer carries a keeper (these
tests read the cache for the preconditions instead).
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, kekri_answer
from e2m_plugins.keycache import DialogScope
from e2m_plugins.proxy import LATER_FORK_KEEPER, UNSIGNED_KEEPER
from e2m_plugins.testpki import init_test_pki
from kamailio_app.keycache_htable import HtableKeyCache

SDP_VIEW = ("INVITE:application/sdp",)
UNSIGNED = (None, UNSIGNED_KEEPER, LATER_FORK_KEEPER)
SEAL = bytes(range(16))


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


class _Table:
    """An ``HtableBackend`` in a dict (one node's ``e2mkeys``)."""

    def __init__(self):
        self.cells: dict[str, str] = {}

    def set(self, key, value, ttl):
        self.cells[key] = value

    def get(self, key):
        return self.cells.get(key)

    def remove(self, key):
        self.cells.pop(key, None)

    def items(self):
        return list(self.cells.items())

    def lock(self, key):
        pass

    def unlock(self, key):
        pass


def _old_keyed(cache, opened, looked_up):
    """``c6d4dea^``'s ``_signers_key_opened``: every used lookup read again."""
    used = {e.recipient.identifier for p in opened for e in p.envelopes
            if e.recipient.kind == "kekri"}
    for found in looked_up:
        if f"kekid={found.reference.hex()}" in used:
            kept = cache.get(found.candidate, found.name, count=False)
            if kept is not None and kept.keeper not in UNSIGNED:
                return True
    return False


def _setup(world, cache=None):
    return kekri_answer(world, SDP_VIEW, cache=cache)


def _only_found(trusted, reply):
    """The early scope's record and name bob's answer will find, and the key."""
    probe = trusted.read_response(reply)
    assert probe.error is None and len(probe.looked_up) == 1
    found = probe.looked_up[0]
    kept = trusted.cache.get(found.candidate, found.name, count=False)
    assert kept is not None and kept.keeper not in UNSIGNED
    return found, kept


def _rekeep(cache, found, kept, keeper):
    cache.drop_scope(found.candidate)
    cache.put(found.candidate, found.name, kept.cek, max_decrypts=kept.max_decrypts,
              keeper=keeper)


def _decide(trusted, reading):
    return trusted._signers_key_opened(list(reading.opened), list(reading.looked_up))


def test_hole_k1_unsigned_at_reading_signed_at_decision_drop_and_put(world):
    trusted, reply = _setup(world)
    found, kept = _only_found(trusted, reply)
    _rekeep(trusted.cache, found, kept, UNSIGNED_KEEPER)      # unsigned when read
    reading = trusted.read_response(reply)
    assert trusted.cache.get(found.candidate, found.name, count=False).keeper == UNSIGNED_KEEPER
    _rekeep(trusted.cache, found, kept, kept.keeper)          # another worker: signed
    now = trusted.cache.get(found.candidate, found.name, count=False)
    assert now is not None and now.keeper == kept.keeper
    assert _old_keyed(trusted.cache, reading.opened, reading.looked_up) is True
    assert _decide(trusted, reading) is True, \
        "keyed=False: a key signed at the decision is judged by its keeper at the reading"


def test_hole_k1_dmq_record_overwrite_with_signed_keeper(world):
    node_a = _Table()
    cache_a = HtableKeyCache(node_a, seal_key=SEAL, origin="a")
    trusted, reply = _setup(world, cache=cache_a)
    found, kept = _only_found(trusted, reply)
    # node b keeps the same reference for the same scope with the signer as keeper
    node_b = _Table()
    cache_b = HtableKeyCache(node_b, seal_key=SEAL, origin="b")
    cache_b.put(found.candidate, found.name, kept.cek, max_decrypts=kept.max_decrypts,
                keeper=kept.keeper)
    _rekeep(cache_a, found, kept, UNSIGNED_KEEPER)            # node a's own: unsigned
    reading = trusted.read_response(reply)
    assert cache_a.get(found.candidate, found.name, count=False).keeper == UNSIGNED_KEEPER
    (name, raw), = node_b.items()
    node_a.cells[name] = raw                                  # DMQ: the item replaced
    assert cache_a.get(found.candidate, found.name, count=False).keeper == kept.keeper
    assert _old_keyed(cache_a, reading.opened, reading.looked_up) is True
    assert _decide(trusted, reading) is True, \
        "keyed=False on the node whose record DMQ replaced with a signed keeper's"


def test_control_unsigned_kept_unsigned_is_not_keyed(world):
    trusted, reply = _setup(world)
    found, kept = _only_found(trusted, reply)
    _rekeep(trusted.cache, found, kept, UNSIGNED_KEEPER)
    reading = trusted.read_response(reply)
    assert _old_keyed(trusted.cache, reading.opened, reading.looked_up) is False
    assert _decide(trusted, reading) is False


def test_control_signed_kept_signed_is_keyed(world):
    trusted, reply = _setup(world)
    reading = trusted.read_response(reply)
    found = reading.looked_up[0]
    assert trusted.cache.get(found.candidate, found.name, count=False).keeper not in UNSIGNED
    assert _old_keyed(trusted.cache, reading.opened, reading.looked_up) is True
    assert _decide(trusted, reading) is True


class _Spy:
    def __init__(self, replay):
        self.replay, self.calls = replay, []

    def admit_fork(self, *args, **kwargs):
        self.calls.append(kwargs.get("shared", True))
        return self.replay.admit_fork(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.replay, name)


def test_control_signed_context_claims_shared_whatever_keyed(world):
    trusted, reply = _setup(world)
    reading = trusted.read_response(reply)
    contexts = list(reading.contexts)
    assert contexts and all(c is not None for c in contexts)
    spy = _Spy(trusted.replay)
    trusted.replay = spy
    for keyed in (False, True):
        trusted._fork(reply, contexts, reply.from_tag, reply.to_tag or "", keyed=keyed)
    assert spy.calls == [True, True]


def test_control_view_sees_reading_contexts(world):
    trusted, reply = _setup(world)
    reading = trusted.read_response(reply)
    spy = _Spy(trusted.replay)
    trusted.replay = spy
    verdict = trusted.inspect(reply, caller="sip:alice@example.com", reading=reading)
    assert verdict is not None
    assert spy.calls and all(spy.calls), spy.calls
    # the dialog took its key (fork 0)
    assert isinstance(reading.looked_up[0].scope, DialogScope) and len(trusted.cache) >= 1
