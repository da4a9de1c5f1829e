"""A seventh attacker's review (December 2026) of the sixth review's fixes (281be99).

Each ``test_hole_*`` is an attack that SUCCEEDS on the code as it stands; it is kept
as a strict xfail (the assertion is what the fix must make true) until the lead fixes
it.  ``test_held_*`` attacks the code refused, kept where nothing else covered them.
The docstring names the attacker (docs/threat-model.md), what it gets and the fix.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SDP_OFFER, TRUSTED, answer, apply_forward, known_proxy,
                           proxy_engine, ua_engine)
from e2m_plugins.keycache import KEEPER_SHARE, MemoryKeyCache
from e2m_plugins.sip import make_request
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)
ANSWERERS = tuple(f"ivr{n}" for n in range(KEEPER_SHARE))    # auto-answering parties


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,),
                         users=("alice", "bob", "carol") + ANSWERERS, key_type="ec")


def _small_proxy(world):
    """A proxy viewing SDP with a cache of 16 keys: a keeper's quota is 2."""
    return proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(max_entries=16))


def _carol_calls(world, proxy, carol, callee: str, call_id: str) -> None:
    """carol calls ``callee`` (an auto-answering party: a voicemail, an IVR, a
    conference bridge), whose 200 offers a fresh key the proxy keeps."""
    via = (known_proxy(world, TRUSTED, SDP_VIEW),)
    call = make_request("INVITE", world.aor(callee), from_uri=world.aor("carol"),
                        to_uri=world.aor(callee), call_id=call_id, from_tag="c1",
                        body=SDP_OFFER, content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:carol@127.0.0.1:5063>")])
    offer = carol.protect(call).message
    answering = ua_engine(world, callee, peers=("carol",), proxies=via)
    verdict = proxy.inspect(offer)
    # carol's offer is signed by her: her own caller group (digest not needed)
    caller = proxy.answer_caller(offer, verdict)
    assert caller == world.aor("carol")
    rung = answering.open(apply_forward(offer, verdict)).message
    assert proxy.inspect(answering.protect(answer(rung, to_tag="i1")).message,
                         caller=caller).seen


# -- 1. the pair quota (281be99): one user, many pairs ---------------------------------

def test_hole_one_caller_fills_the_cache_through_many_pairs(world):
    """Insider UA (carol) calling auto-answering parties (voicemail boxes, IVRs,
    conference bridges: each answers any caller with a fresh key).  Since 281be99 an
    answer's key counts against the PAIR ``pair:<caller> <responder>``: every callee
    carol picks is a fresh quota of ``max_entries // KEEPER_SHARE``.  With
    ``KEEPER_SHARE`` callees carol's calls reach the whole cache, and once the cache
    is over its bound ``_trim`` evicts the OLDEST key of anyone: the key of alice's
    call under way with bob (a pair carol is not in) goes, and the proxy can no longer
    read that call (496 round trip; the archive misses it).  Before 281be99 the same
    keys counted against carol (the caller) alone.  No ring at a human's phone: only
    machines answer.

    Fix (e2m_plugins/keycache.py + proxy.py ``_keep_keys``): bound what ONE AoR can
    reach through pairs, not only per pair: keep per AoR (each name in a ``pair:``
    keeper, and the plain keeper) a count of the keys naming it, and when a new key
    would put the CALLER (the ``$T_req($fu)`` side, who chose to make the calls) past
    ``keeper_quota``, do not keep the new key (fail closed: that call 496s) rather
    than evict anyone's; or charge each answer's key to both the pair and the
    caller's own quota (trimming the caller's oldest)."""
    from test_review6 import _alices_call_with_bob, _alices_key_still_kept
    proxy = _small_proxy(world)
    alice = _alices_call_with_bob(world, proxy, "alices-call7@x")
    via = (known_proxy(world, TRUSTED, SDP_VIEW),)
    carol = ua_engine(world, "carol", peers=ANSWERERS, proxies=via, cek_reuse=False)
    for callee in ANSWERERS:
        for n in range(2):                        # each pair's quota, no more
            _carol_calls(world, proxy, carol, callee, f"{callee}-{n}@x")
    assert _alices_key_still_kept(world, proxy, alice, "alices-call7@x"), \
        "carol's calls to auto-answering parties evicted the key of alice's call with bob"


def test_held_one_caller_calling_one_party_again_and_again_keeps_to_its_pair(world):
    """The same number of answers as above, all from ONE auto-answering party: they
    count against one pair (carol, ivr0) and evict only that pair's keys, never the
    key of alice's call with bob (the pair quota holds per pair)."""
    from test_review6 import _alices_call_with_bob, _alices_key_still_kept
    proxy = _small_proxy(world)
    alice = _alices_call_with_bob(world, proxy, "alices-call7b@x")
    via = (known_proxy(world, TRUSTED, SDP_VIEW),)
    carol = ua_engine(world, "carol", peers=ANSWERERS, proxies=via, cek_reuse=False)
    for n in range(2 * len(ANSWERERS)):
        _carol_calls(world, proxy, carol, ANSWERERS[0], f"one-{n}@x")
    assert _alices_key_still_kept(world, proxy, alice, "alices-call7b@x")


# -- 2. the 493 path (281be99 ``_learn_493``) ---------------------------------------------

def test_hole_a_493_brings_back_a_replaced_certificate(world):
    """Untrusted on-path hop that kept bob's REPLACED certificate (and its key: bob
    replaced it because that key leaked).  alice learnt bob's current certificate from
    the certificate service; the service path refuses any certificate issued before
    the one held (``_refuse_older``: 'a hop that kept bob's replaced certificate ...
    would otherwise bring it back').  281be99 added ``check_not_a_ca`` to
    ``_learn_493`` but not that check: the hop answers alice's next MESSAGE to bob
    with 493 and the OLD certificate (chained to the CA, bob's SAN, still in its
    validity); alice takes it, retries encrypted to the leaked key and keeps it as
    bob's for every later message (fail open: the hop reads them all).

    Fix (e2m_plugins/ua.py ``_learn_493`` / ``add_peer_certificate``): apply
    ``_refuse_older`` to a 493's certificate too (whenever any certificate of that
    AoR is held, not only a service's), or better: a 493 only ever adds a
    certificate for an AoR of which NONE is held (a held one, configured or from the
    service, is what a 493 may not replace); a 493 naming a held AoR is refused."""
    from datetime import datetime, timedelta, timezone

    from cryptography.hazmat.primitives import serialization

    from e2m_lab.flows import message
    from e2m_plugins.errors import NoMatchingRecipientError
    from e2m_plugins.testpki import issue_user
    bob_aor = world.aor("bob")
    now = datetime.now(timezone.utc)
    old = issue_user(world.ca, bob_aor, "ec", not_before=now - timedelta(days=60))
    current = issue_user(world.ca, bob_aor, "ec", not_before=now - timedelta(hours=1))
    der = serialization.Encoding.DER
    alice = ua_engine(world, "alice", peers=())
    alice.add_peer_certificate(bob_aor, current.cert.public_bytes(der), expires_in=3600)
    bob = ua_engine(world, "bob")
    plain = message(world)
    sent = alice.protect(plain).message
    with pytest.raises(NoMatchingRecipientError) as caught:
        bob.open(sent)                       # any refusal of bob's gives the hop a 493
    forged = bob.refusal(sent, caught.value).with_body(old.cert.public_bytes(der),
                                                       "application/pkix-cert")
    try:
        alice.react(forged, plain)
    except Exception:                        # refused loudly is as good as refused
        pass
    assert alice.certs.user(bob_aor).public_bytes(der) == current.cert.public_bytes(der), \
        "a 493 replaced bob's current certificate with his older, replaced one"


# -- 3. the parties table: a way back to the re-INVITE hijack -----------------------------

def test_hole_our_bye_to_a_second_fork_ends_the_live_calls_entry(world):
    """Insider UA (carol) who read the ids of alice's call to bob off the wire (the
    cast of test_review2_ua's hijack), or simply bob's forked second device.

    The parties entry is keyed by OUR tag alone, and ``_forget_parties`` drops it on
    any BYE we send with that tag.  After alice's call with bob (tags a1/b1) is up, a
    second 2xx to her INVITE arrives with another To tag (a fork: bob's second device;
    or carol's injected 200 without a body, which ``open`` accepts: the parties it names
    are alice and bob, as the entry's).  RFC 3261 §13.2.2.4: the UAC ACKs it and, not
    wanting a second call, ends it with a BYE From tag a1, To tag of the fork.  That
    BYE drops the entry of the call still under way with bob, and carol's re-INVITE
    into it (From carol, tags b1/a1) is taken (fail open: the hijack of
    test_review2_ua, back).  Whether pjsip BYEs a late forked 2xx is not checked here
    (no real phone): the engine cannot rely on it not doing so.

    Fix (e2m_plugins/ua.py): keep the REMOTE tag in the entry once a 2xx confirms it
    (``_note_confirmed``) and have ``_forget_parties`` (our BYE, our 2xx to a BYE)
    drop the entry only when the ended dialog's remote tag is that one (an unconfirmed
    entry: as now); and refuse, with ``require_e2m``, a 2xx to an INVITE of ours that
    carried an offer when the 2xx has no protected answer."""
    from e2m_lab.flows import three_phones
    from e2m_plugins.errors import BindingMismatchError
    from e2m_plugins.sip import make_response
    from test_review5 import _call, _carols_hijack
    alice, bob, carol = three_phones(world)
    sent = _call(world, alice, bob, "live7@x")
    fork = make_response(sent, 200, "OK", [("Contact", "<sip:bob@127.0.0.1:5099>")]) \
        .replace("To", f"{sent.get('To')};tag=zz")
    alice.open(fork)                                  # a second dialog: alice a1 / zz
    fork_dialog = dict(from_uri=world.aor("alice"), to_uri=world.aor("bob"),
                       call_id="live7@x", from_tag="a1", to_tag="zz")
    alice.protect(make_request("ACK", "sip:bob@127.0.0.1:5099", cseq=1, **fork_dialog))
    with pytest.raises(BindingMismatchError):                 # control: still refused
        alice.open(_carols_hijack(world, carol, "live7@x"))
    alice.protect(make_request("BYE", "sip:bob@127.0.0.1:5099", cseq=2, **fork_dialog))
    with pytest.raises(BindingMismatchError):
        alice.open(_carols_hijack(world, carol, "live7@x"))


def test_held_a_calls_security_records_are_bounded():
    """Review 7 (read, no wire test): each SDP message of a call added a security
    record, so a peer's endless re-INVITEs in one call grew the phone's memory. Now a
    call keeps its first offer and answer and then its latest records, 32 in all."""
    from e2m_plugins.sip import make_request
    from e2m_plugins.ua import SecurityInfo
    from pjsua_hooks.phone import _RECORDS_PER_CALL, E2MPhone
    phone = E2MPhone.__new__(E2MPhone)          # only the record keeping, no pjsua
    phone._call_security = {}
    for n in range(1, 500):
        msg = make_request("INVITE", "sip:bob@example.com", from_uri="sip:a@example.com",
                           to_uri="sip:bob@example.com", call_id="long@x", cseq=n)
        phone._note_call_security("rx", msg, "offer", SecurityInfo(content_type="application/sdp"))
    records = phone._call_security["long@x"]
    assert len(records) == _RECORDS_PER_CALL
    assert [r["cseq"] for r in records[:2]] == [1, 2] and records[-1]["cseq"] == 499
