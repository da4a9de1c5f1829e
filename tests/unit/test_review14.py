"""A fourteenth attacker's review (December 2026) of the thirteenth review's fixes (ff36fc9: a
key an answer moves stays its offerer's; an early dialog's first dialog keeps keys for its
life, the next three for ``EARLY_DIALOG_TTL`` under ``fork:``, any further none).

Each ``test_hole_*`` is an attack that succeeded on ff36fc9 and df80d2a (fixed since: the
fork slots are bound to the dialog's two AoRs, as kept names are); its docstring
names the attacker (docs/threat-model.md), what it gets and a fix.  ``test_control_*`` are
the same flows without the attack: they pass.

1. The fork slots (``ReplayCache.admit_fork``) are counted per Call-ID and first tag
   alone, while every kept key's name binds the dialog's two AoRs (``kept_name``: "a user
   cannot keep a key under the ids of another's dialog").  Anyone who knows a call's
   Call-ID and the caller's tag, and can get a signed answer of her own read under them,
   takes all four slots with dialogs of her own: the real callee's 200 then moves and
   keeps nothing.  Unlike the accepted race of a hop on the path ("the real dialog has it
   for 200 s"), the squatter is not on the call's path, and the real dialog gets no key.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import TRUSTED, proxy_engine
from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.keycache import MemoryKeyCache
from e2m_plugins.proxy import MAX_FORKS
from e2m_plugins.sip import make_request
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review12 import SDP_VIEW, _answer_offering_a_key, _call, _retag, _ua
from kamailio_app.replay_htable import HtableReplayCache
from tests.unit.test_review13 import _Clock, _reinvite_once_early_copies_are_gone

# the replay (and fork) table: one process's, or Kamailio's shared htable (its stand-in)
TABLES = pytest.mark.parametrize("table", ["memory", "htable"])


# The attacks re-tag copies of signed bodies, which senders bind no To tag in only before
# ``e2m-sip-to-tag`` (tests/unit/test_to_tag_binding.py): the fork slots still serve them.
pytestmark = pytest.mark.usefixtures("older_senders")

@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "mallory"),
                         key_type="ec")


# -- 1. a third party squats an early dialog's fork slots --------------------------------

def _alices_reinvite_after_mallory_squats(world, squat: bool, table: str = "memory"):
    clock = _Clock()
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(clock=clock))
    if table == "htable":
        proxy.replay = HtableReplayCache(MemoryHtable(time.time),
                                         window=proxy.config.replay_window)
    alice, bob = _ua(world, "alice", "bob"), _ua(world, "bob", "alice")
    read = 0
    if squat:
        # alice's call (Call-ID fwd@x, her tag a1) first went to mallory, who forwards her
        # calls to bob with a 302: a UAC retrying after a 3xx keeps Call-ID and From tag.
        # Before her 302, mallory's phone sends 200s of her own: signed as mallory (the
        # To she answers as), each offering a key, on four To tags of her choosing.
        to_mallory = make_request("INVITE", f"sip:mallory@{world.domain}",
                                  from_uri=world.aor("alice"), to_uri=world.aor("mallory"),
                                  call_id="fwd@x", cseq=1, from_tag="a1", body=b"",
                                  extra_headers=[("Contact", "<sip:alice@127.0.0.1:5061>")])
        ringing = _answer_offering_a_key(world, to_mallory, "mallory", "m0")[0]
        for n in range(MAX_FORKS):
            clock.now += 1
            read += bool(proxy.inspect(_retag(ringing, f"m{n}"),
                                       caller=world.aor("alice")).seen)
    # alice's INVITE to bob (same Call-ID and tag), sealed for the proxy and offering a
    # key; bob's 200 sealed under it: the proxy reads it
    _call(world, proxy, alice, bob, "alice", "bob", "fwd@x", "b1")
    return _reinvite_once_early_copies_are_gone(world, proxy, clock, alice, "bob", "fwd@x",
                                                "b1"), read


@TABLES
def test_control_alices_reinvite_after_a_forwarded_call_is_read(world, table):
    verdict, _ = _alices_reinvite_after_mallory_squats(world, squat=False, table=table)
    assert verdict.action == "forward" and verdict.seen


@TABLES
def test_hole_a_third_party_squats_the_fork_slots_and_the_real_dialog_keeps_no_key(world, table):
    """Insider UA (mallory, any user with a certificate; not on the path of alice's call
    with bob).  She needs a call's Call-ID and the caller's tag before the callee answers:
    here alice's call came to her first and she forwards it with a 302 (a UAC retrying
    after a 3xx keeps Call-ID and From tag); a fork branch of alice's call, or a stray
    reply sent to a cluster node (``route_stray_reply`` reads any response whose Via is
    the cluster's), would do as well.  Before her 302 she sends 200s signed as herself,
    each offering a key, re-tagged four times (the signed context binds no To tag): each
    is a first sighting and ``_keep_keys`` calls ``_fork(message, "a1", "m<n>")``, whose
    record is ``Call-ID + "\\n" + "a1"`` alone (no AoRs): her four dialogs take slots 0..3.
    alice's INVITE to bob (same Call-ID and tag) offers a key; bob's 200 is sealed under
    it and read, but ``_fork`` answers None: alice's key is not moved into her dialog
    with bob (and a key bob's 200 offered would not be kept).  Once the early copy is gone
    (200 s) her re-INVITE in the call, sealed for the proxy under the call key, is 496
    (a round trip each, and bob's answers under the key go on unread, out of the archive),
    for the whole call.  The accepted race (threat model, "The price") is a hop on the
    path, and there the real dialog still has the key for 200 s.

    Fix: key the fork record by the same party binding as the kept names (e.g. the
    ``kept_namer`` prefix of the two AoRs plus Call-ID and first tag), so only responses
    between the early dialog's own parties count against its slots."""
    verdict, read = _alices_reinvite_after_mallory_squats(world, squat=True, table=table)
    assert read == MAX_FORKS                        # mallory's 200s were read
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE to bob: {verdict.code} {verdict.error} (after {read} squats)"
