"""A seventeenth attacker's review (December 2026) of the sixteenth review's fixes (1082e3b:
``_first_tag``, one long-lived To tag per signed response context; bounded keepers in
``_spend``).  Both holes succeeded on 1082e3b; fixed since: a fork slot lives while the
message holding it could pass the time check (``made``), and the offerer's own request only
looks its tag up (a dialog the INVITE's 2xx confirmed keeps her key for its life, any other
tag as a later fork's).

1. Fork slots (``ReplayCache.admit_fork``, used by ``_fork`` and ``_first_tag``) are kept
   ``window + TRANSACTION_LIFETIME`` from their first sighting by the proxy's clock, while
   the response they bound can pass the time check until *its own* time plus the window
   (``check_and_record`` keeps its record that long: ``max(now, time)``).  A 2xx made by a
   clock running ahead (within the window) outlives its slots: once they are gone, a
   re-tagged copy is the "first" To tag again and keeps the key for a dialog's life.
2. The signed SIP context binds no To tag, for requests as for responses.  ``_spend``
   moves an early key on any request of the offerer's own that has a To tag, for the
   dialog's life (12 h), claiming no fork slot: a hop that re-tags alice's requests under
   her offer key makes one long-lived made-up dialog of each, beyond ``MAX_FORKS``.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, proxy_engine
from e2m_plugins.body import protect_content, with_entity
from e2m_plugins.cms.recipients import reuse_kek
from e2m_plugins.keycache import DialogScope, MemoryKeyCache
from e2m_plugins.proxy import EARLY_DIALOG_TTL, MAX_FORKS, ProxyEngine
from e2m_plugins.replay import MemoryReplayCache
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review12 import NEW_SDP, SDP_VIEW, _invite
from tests.unit.test_review15 import _with_to_tag
from tests.unit.test_review16 import (_call_then_bobs_keyed_200_to_an_update,
                                      _signed_offer_and_a_200)


# The attacks re-tag copies of signed bodies, which senders bind no To tag in only before
# ``e2m-sip-to-tag`` (tests/unit/test_to_tag_binding.py): the fork slots still serve them.
pytestmark = pytest.mark.usefixtures("older_senders")

@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


class _Clock:
    """One clock for the proxy (its time checks), its replay table and its key cache."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.now, tz=timezone.utc)


def _proxy(world, clock: _Clock) -> ProxyEngine:
    base = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    return ProxyEngine(base.config, MemoryKeyCache(clock=clock), clock=clock.utc,
                       replay=MemoryReplayCache(clock=clock))


def _long_lived(proxy: ProxyEngine, call_id: str, clock: _Clock) -> list[DialogScope]:
    """The two-tag dialogs of ``call_id`` holding a key past the early expiry."""
    return sorted({scope for (scope, _), kept in proxy.cache._entries.items()
                   if isinstance(scope, DialogScope) and scope.call_id == call_id
                   and not scope.early and kept.expires > clock.now + EARLY_DIALOG_TTL + 1},
                  key=lambda s: s.tags)


# -- 1. a 2xx made ahead of our clock outlives its first-tag slot -------------------------

def _update_answer_ahead(world, *, ahead: float, wait: float, copies: int):
    """alice calls bob (To tag phone); in the call alice's UPDATE, bob's signed 200 to it
    (made ``ahead`` seconds ahead of the proxy's clock: within the window) offers a key K.
    ``wait`` seconds later the hop between bob and the proxy sends ``copies`` copies of it
    with made-up To tags.  Returns the dialogs of the call that keep a key long."""
    clock = _Clock()
    proxy = _proxy(world, clock)
    _, reply, _, who = _call_then_bobs_keyed_200_to_an_update(world, proxy, "ahead@x",
                                                              at=clock.now + ahead)
    assert proxy.inspect(reply, caller=who).seen
    clock.now += wait
    read = 0
    for n in range(copies):                         # the hop between bob and the proxy
        read += bool(proxy.inspect(_with_to_tag(reply, f"hop{n}"), caller=who).seen)
    return _long_lived(proxy, "ahead@x", clock), read


def test_control_copies_within_the_slots_life_keep_nothing_long(world):
    dialogs, read = _update_answer_ahead(world, ahead=250, wait=200, copies=3)
    assert read == 3
    assert [d.tags for d in dialogs] == [("a1", "phone")]


def test_hole_a_2xx_made_ahead_outlives_its_first_tag_slot(world):
    """Untrusted hop between bob and the proxy (bob's clock runs 250 s ahead: within the
    300 s window, so his bodies are read for up to 550 s after we first see them).
    ``_first_tag`` asks ``admit_fork``, whose entry lives ``window + TRANSACTION_LIFETIME``
    (332 s) from the first sighting by the proxy's clock; ``check_and_record`` keeps the
    response's record until ``max(now, body time) + window + 32``.  340 s after bob's 200
    to UPDATE (offering K) the slot is gone but the body still passes the time check: the
    hop's first re-tagged copy is a first sighting and the *first* To tag again, so K is
    kept 12 h in a made-up dialog on the pair's quota, a second one beside the real
    dialog's (and, for an INVITE's 2xx, ``_fork`` hands out all four slots again).  It
    doubles what review 16's fix bounded; the Kamailio table (``HtableReplayCache``) has
    the same expiry, per slot.

    Fix: keep an early dialog's slots as long as the bodies that may claim them can pass
    the time check: pass the body's time to ``admit_fork`` and keep the entry (each slot,
    in the htable) until ``max(now, time) + window + TRANSACTION_LIFETIME``."""
    dialogs, read = _update_answer_ahead(world, ahead=250, wait=340, copies=3)
    assert read == 3
    assert [d.tags for d in dialogs] == [("a1", "phone")], \
        f"dialogs keeping a key for their life: {[d.tags for d in dialogs]}"


# -- 2. re-tagged copies of alice's own requests each keep her key for a dialog's life ---

def _call_and_requests(world, proxy, clock, call_id: str, tags: list[str]):
    """alice offers K in her INVITE ``call_id``; bob's 200 (phone) is sealed for the proxy
    under K, so it moves K into (a1, phone).  Within the early expiry alice sends
    re-INVITEs in the call under K; the hop between her and the proxy gives the i-th the
    To tag ``tags[i]`` (the signed context binds no To tag; her Route keeps its token for
    Call-ID and a1).  Returns K (sealed) and the proxy's verdicts on the re-INVITEs."""
    bobs = world.user("bob")
    _, sealed, who, ok = _signed_offer_and_a_200(world, proxy, "alice", call_id, at=clock.now)
    entity, _ = protect_content("application/sdp", SDP_ANSWER,
                                [reuse_kek(sealed.cek, sealed.cek_reference)],
                                signer=(bobs.cert, bobs.key), bind_to=ok, readers=(TRUSTED,),
                                at=clock.now)
    assert proxy.inspect(with_entity(ok, entity), caller=who).seen
    verdicts = [_reinvite(world, proxy, clock, call_id, 2 + n, tag, sealed)
                for n, tag in enumerate(tags)]
    return sealed, verdicts


def _reinvite(world, proxy, clock, call_id: str, cseq: int, tag: str, sealed):
    """alice's re-INVITE in the call under K, as the proxy receives it (To tag ``tag``)."""
    clock.now += 1
    mine = world.user("alice")
    again = _invite(world, "alice", "bob", call_id, cseq=cseq, to_tag="phone", sdp=NEW_SDP)
    entity, _ = protect_content("application/sdp", NEW_SDP,
                                [reuse_kek(sealed.cek, sealed.cek_reference)],
                                signer=(mine.cert, mine.key), bind_to=again,
                                readers=(TRUSTED,), at=clock.now)
    return proxy.inspect(_with_to_tag(with_entity(again, entity), tag))


def _own_requests_retagged(world, tags: list[str]):
    clock = _Clock()
    proxy = _proxy(world, clock)
    _, verdicts = _call_and_requests(world, proxy, clock, "mine@x", tags)
    return _long_lived(proxy, "mine@x", clock), verdicts


def test_control_alices_own_requests_in_the_call_keep_one_dialog(world):
    dialogs, verdicts = _own_requests_retagged(world, ["phone"] * 6)
    assert all(v.action == "forward" and v.seen for v in verdicts)
    assert [d.tags for d in dialogs] == [("a1", "phone")]


def test_hole_retagged_own_requests_each_keep_her_key_for_a_dialogs_life(world):
    """Untrusted hop between alice and the proxy.  The signed context of a request binds
    no To tag either (only the replay record stops a second copy).  ``_spend`` moves an
    early key on a request when its signer is the key's keeper and it has a To tag, with
    ``fork = 0``: for the dialog's life (12 h), keeper alice, no ``_fork`` slot asked.  The
    hop gives each of alice's requests under her offer key within the early expiry
    (re-INVITEs here; an early dialog's PRACKs or UPDATEs, an ACK with SDP) a made-up
    To tag: each one moves K into a dialog of its own that no BYE ends, past the
    ``MAX_FORKS`` bound (one dialog for life, three for 200 s) the answers are held to;
    every one counts against alice's quota, and once it is full her oldest long-lived
    keys (other calls') go.  (The re-tagged request itself fails at bob: 481.)

    Fix: have a request's move ask the early dialog's fork slots as an INVITE's 2xx does
    (``_fork(message, early, other)``, a tag with no slot keeping nothing long), or let
    only the tag the INVITE's 2xx claimed (slot 0) take the key for the dialog's life."""
    tags = [f"hop{n}" for n in range(MAX_FORKS + 2)]
    dialogs, verdicts = _own_requests_retagged(world, tags)
    assert all(v.action == "forward" and v.seen for v in verdicts), \
        [f"{v.code} {v.error}" for v in verdicts]
    assert [d.tags for d in dialogs] == [("a1", "phone")], \
        f"dialogs keeping her key for their life: {[d.tags for d in dialogs]}"


def _live_call_after_retagged_calls(world, tags: list[str]):
    """A small cache (a keeper's quota: 48 // KEEPER_SHARE = 6 keys).  alice's live call
    live@x with bob (K1 moved into (a1, phone)); then her call next@x, whose re-INVITEs
    the hop re-tags with ``tags``; then another call of hers; then, after the early
    expiry, alice's re-INVITE in the live call under K1: the proxy's verdict."""
    clock = _Clock()
    base = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    proxy = ProxyEngine(base.config, MemoryKeyCache(max_entries=48, clock=clock),
                        clock=clock.utc, replay=MemoryReplayCache(clock=clock))
    k1, _ = _call_and_requests(world, proxy, clock, "live@x", [])
    _call_and_requests(world, proxy, clock, "next@x", tags)
    _call_and_requests(world, proxy, clock, "third@x", [])      # her next call, untouched
    clock.now += EARLY_DIALOG_TTL + 1
    return _reinvite(world, proxy, clock, "live@x", 9, "phone", k1)


def test_control_alices_live_call_keeps_its_key_beside_her_next_call(world):
    verdict = _live_call_after_retagged_calls(world, ["phone"] * 6)
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"


def test_hole_retagged_own_requests_evict_her_live_calls_key(world):
    """The same hop, as it costs alice: the made-up dialogs are long-lived keys on her
    own quota, so (here with a small cache; with the default one, a quota's worth of her
    requests through the hop in 12 h) her quota is all long-lived keys, and her next
    call's offer key pushes out her oldest, her live call's: her next re-INVITE in that
    call is 496.  (The early key of the call being re-tagged is trimmed first, which stops
    that call's copies at the quota, not the harm.)"""
    verdict = _live_call_after_retagged_calls(world, [f"hop{n}" for n in range(6)])
    assert verdict.action == "forward" and verdict.seen, f"{verdict.code} {verdict.error}"
