"""An eleventh attacker's review (December 2026) of the tenth review's fixes (9ba8e7e: the
digest user names an answer's caller, ``SeenBody.bound``, ``answered:<responder>``), of
the response replay record (a723e7e: ``ProxyEngine._first_sighting``) and of the log
pump (7ca0cd1: ``kamailio_app/launcher.py _pump_log``).

Each ``test_hole_*`` is an attack that succeeded on 7ca0cd1 (a strict xfail there);
all three are fixed and pass; its docstring names the attacker (docs/threat-model.md),
what it got and the fix.  Three holes: the pump's cutting loop is quadratic in the backlog
it reads at once, so a full pipe of short lines drains about ten times slower than the
blocking reader it replaced; a response's replay record names no To tag, so the 2xx of
a second fork is "a copy" of the first and alice's key never reaches its dialog; and
Kamailio's sweep trims a responder's ``answered:`` group before the strangers' pair
with her, so strangers' calls between two sweeps evict authenticated callers' keys.
What the review tried and the code held is in the review's report.
"""

from __future__ import annotations

import io
import os
import time

import pytest

from e2m_lab.flows import (TRUSTED, answer, apply_forward, invite, known_proxy, proxy_engine,
                           ua_engine)
from e2m_plugins.keycache import DialogScope, MemoryKeyCache
from e2m_plugins.testpki import init_test_pki
from kamailio_app.launcher import PIPE_BYTES, _pump_log

SDP_VIEW = ("INVITE:application/sdp",)
_F_SETPIPE_SZ = 1031
# the shortest line a stranger's malformed datagram makes the core write (receive.c)
SHORT_LINE = (b" 7(4242) ERROR: <core> [core/receive.c:306]: receive_msg(): core parsing "
              b"of SIP message failed (127.0.0.1:5060/1)\n")


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


# -- 1. the log pump: a full pipe drains ten times slower than a small one ------------------

def _drain(backlog: int) -> float:
    """Seconds ``_pump_log`` takes over a pipe already holding ``backlog`` bytes of short
    log lines (Kamailio's workers wrote them while the pump slept)."""
    read_fd, write_fd = os.pipe()
    try:
        import fcntl
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        pytest.skip("this kernel does not give a pipe PIPE_BYTES")
    data = SHORT_LINE * (backlog // len(SHORT_LINE))
    os.write(write_fd, data)
    os.close(write_fd)
    out = io.BytesIO()
    with os.fdopen(read_fd, "rb") as reader:
        start = time.thread_time()      # the pump runs in this thread: its CPU alone
        _pump_log(reader, out)
        took = time.thread_time() - start
    assert out.getvalue() == data          # plain lines pass whole
    return took


def test_hole_a_full_log_pipe_of_short_lines_drains_ten_times_slower():
    """Off-path sender (a stranger's malformed datagrams: each makes the core write an
    ERROR line of ~120 octets, more for each line a parser error quotes).  7ca0cd1
    reads up to ``PIPE_BYTES`` (1 MiB) at once and then cuts lines off the front of
    ``pending`` with ``pending = pending[cut:]``: every line copies the rest of the
    buffer, so a read of n octets of short lines costs O(n^2 / line).  Measured here:
    a pipe full of 120-octet lines (1 MiB, ~8,700 lines) took 136 ms to drain, the same
    bytes in sixteen 64 KiB backlogs 16 ms in all, and the blocking ``readline`` loop
    it replaced 11 ms.  The comment "a pipe of PIPE_BYTES holds LOG_POLL s of any log
    rate a proxy can write" holds while the pump keeps up; past ~8 MB/s of short lines
    (the old reader kept up with ~90) each read finds more backlog and is slower
    still, the pipe fills, and every Kamailio worker blocks in write(2) on stderr: the
    proxy stops answering anyone until the stranger stops.

    Fixed (kamailio_app/launcher.py ``_pump_log``): cut by offset and slice once per
    read, e.g. ``pos = 0; while pos < len(pending): end = pending.find(b"\\n", pos,
    pos + LIMIT) ...; chunks.append(pending[pos:cut]); pos = cut`` and then
    ``pending = pending[pos:]`` (or ``bytearray`` with ``del pending[:cut]``, which
    CPython does in O(1) at the front); and read at most what one poll can hold."""
    _drain(64 * 1024)                                      # warm up imports and caches
    big = min(_drain(PIPE_BYTES - 4096) for _ in range(2))
    small = min(sum(_drain((PIPE_BYTES - 4096) // 16) for _ in range(16)) for _ in range(2))
    assert big < 3 * small, \
        f"1 MiB of backlog took {big * 1000:.0f} ms, sixteen 64 KiB ones {small * 1000:.0f} ms"


# -- 2. a response's replay record names no To tag -----------------------------------------

def test_hole_the_second_forks_200_is_a_copy_so_alices_key_never_reaches_its_dialog(world):
    """No attacker: bob has two devices (usrloc forks alice's INVITE to both) and both
    answer 200, each sealed under alice's offer key (kekri), each with its own To tag.
    RFC 3261 13.2.2.4 lets alice keep both dialogs.  a723e7e records a response that
    found a kept key under its context's ``replay_key()``: Call-ID, From tag, CSeq,
    method, AoRs and status, no To tag (the SIP context binds none).  Both 200s have
    the same key, so the second device's is "not its first sighting": it spends
    nothing, and ``_spend`` never keeps alice's key under that dialog's confirmed
    scope.  Her requests in that dialog find the key only in the early scope, which
    goes at ``EARLY_DIALOG_TTL`` or with the first dialog's BYE (``drop_scope`` takes
    the early scopes too): then a 496 round trip, and bob's answers there forwarded
    unread (the archive misses them).  Before a723e7e each 200 moved the key.

    Fixed without a protocol change: the response's record is keyed by
    ``replay_key()`` and the response's To tag (``_first_sighting``,
    ``SipContext.replay_key(to_tag)``), which gives a hop that re-tags copies one use
    per made-up tag (as every copy spent before a723e7e, bounded by the key's uses).
    Still better, later: bind the To tag of a response in its signed SIP context (the UAS chose it
    before signing; ``sipcontext._fields_of`` and ``replay_key`` take it for a response
    with a To tag, docs/protocol.md's SipContext gains the field), so each fork's 2xx
    is its own first sighting and a hop's re-tagged copy fails ``check_context``.
    """
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    desk, mobile = ua_engine(world, "bob"), ua_engine(world, "bob")
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache())
    offer = alice.protect(invite(world, call_id="forked@x")).message
    forwarded = apply_forward(offer, proxy.inspect(offer))
    for device, tag in ((desk, "desk"), (mobile, "mobile")):
        delivered = device.open(forwarded).message
        ok = device.protect(answer(delivered, to_tag=tag))
        assert ok.info.key_reuse                          # sealed under alice's offer key
        assert proxy.inspect(ok.message, caller=world.aor("alice")).seen
        alice.open(ok.message)                            # she keeps both dialogs

    caller_tag = offer.from_tag.lower()
    dialogs = sorted(tag for scope, _ in proxy.cache._entries
                     if isinstance(scope, DialogScope) and not scope.early
                     for tag in scope.tags if tag != caller_tag)
    # alice keeps the mobile dialog and ends the desk one (its BYE takes the early scope)
    proxy.end_dialog("forked@x", offer.from_tag, "desk")
    again = alice.protect(invite(world, call_id="forked@x", cseq=2, to_tag="mobile"))
    assert again.info.key_reuse
    verdict = proxy.inspect(again.message)
    assert verdict.action == "forward" and verdict.seen, \
        f"alice's re-INVITE on the mobile dialog: {verdict.code} {verdict.error} " \
        f"(her key was kept for the dialogs {dialogs})"


# -- 3. the htable sweep trims a responder's answers before the strangers' pair ------------

class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_hole_strangers_calls_between_two_sweeps_evict_authenticated_callers_answers():
    """Off-path sender calling an auto-answering party of ours (an IVR, a voicemail, a
    help desk's phone: ``bob`` here) that answers each call with a key.  9ba8e7e says
    strangers' calls, one pair ``answer:unauthenticated: <bob>`` of 1/64, fill at most
    1/64 of bob's ``answered:`` 1/8.  ``MemoryKeyCache`` trims at each put, the pair
    first, so that holds there.  Kamailio's ``HtableKeyCache`` trims in its sweep, every
    ``sweep_every`` puts per worker (1,000 with 10,000 entries): between two sweeps the
    strangers' pair grows past its share, and ``over_quota`` trims each group in the
    order it met the group among the records; a record of an authenticated caller's
    answer read first puts ``answered:<bob>`` first, which drops its own oldest,
    authenticated callers' keys, by as many as the pair is over; the pair then drops the
    strangers' excess too.  With the default sizes (quota 1,250, pair 156) one burst
    of ~1,000 strangers' calls between two sweeps takes ~1,000 of the keys of the
    authenticated calls bob holds (their re-INVITEs a 496 round trip, bob's answers in
    them forwarded unread).  Here a cache of 512 (quota 64, pair 8): 56 users' calls
    bob answered, then 12 strangers' calls: the sweep drops four users' keys.

    Fixed (e2m_plugins/keycache.py ``over_quota``): trim the narrowest groups first
    (``sorted(groups.values(), key=lambda group: group[0])``: every pair before any
    caller or ``answered:`` group, as ``MemoryKeyCache.put`` trims), so a broad group
    counts only what its pairs kept."""
    from e2m_lab.memory_htable import MemoryHtable
    from e2m_plugins.keycache import answer_keeper
    from e2m_plugins.proxy import UNAUTHENTICATED_CALLER
    from kamailio_app.keycache_htable import HtableKeyCache
    clock = Clock()
    cache = HtableKeyCache(MemoryHtable(clock), clock=clock, max_entries=512)
    bob = "sip:bob@example.com"

    def answered(call: str, caller: str) -> tuple[DialogScope, bytes]:
        clock.now += 1
        scope, name = DialogScope(f"{call}@x", call, "ivr"), call.encode()
        cache.put(scope, name, bytes(16), keeper=answer_keeper(caller, bob))
        return scope, name

    users = [answered(f"u{n}", f"sip:user{n}@example.com") for n in range(56)]
    strangers = [answered(f"s{n}", UNAUTHENTICATED_CALLER) for n in range(12)]
    cache.sweep()
    assert sum(cache.get(*s, count=False) is not None for s in strangers) == 8  # their 1/64
    lost = [scope.call_id for scope, name in users if cache.get(scope, name, count=False) is None]
    assert lost == [], f"strangers' calls evicted authenticated callers' keys: {lost}"
