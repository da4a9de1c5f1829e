"""DialogKeys: the CEKs a UA keeps per dialog (RFC 3185 reuse): confirmation by the
2xx to the offering request only, retirement after a 496, who may read under which
key, age and use limits, and the bounds on dialogs and keys."""

from __future__ import annotations

import threading

import pytest

from e2m_plugins.dialog_keys import MAX_KEYS_PER_DIALOG, DialogKey, DialogKeys
from e2m_plugins.sip import SipMessage, make_request, make_response

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"
PROXY = "proxy.example.com"


def ref(n: int) -> bytes:
    return n.to_bytes(16, "big")


def cek(n: int) -> bytes:
    return bytes([n]) * 16


def request(method="INVITE", *, cseq=1, call_id="call@x", from_tag="a1",
            to_tag=None) -> SipMessage:
    """A request from alice to bob (the UAC's tag is ``a1``)."""
    return make_request(method, BOB, from_uri=ALICE, to_uri=BOB, call_id=call_id, cseq=cseq,
                        from_tag=from_tag, to_tag=to_tag)


def from_bob(method="INFO", *, cseq=1, call_id="call@x") -> SipMessage:
    """A request from bob to alice inside the dialog."""
    return make_request(method, ALICE, from_uri=BOB, to_uri=ALICE, call_id=call_id, cseq=cseq,
                        from_tag="b1", to_tag="a1")


def response(req: SipMessage, code: int, *, to_tag="b1") -> SipMessage:
    out = make_response(req, code, "Reason")
    if req.to_tag is None:
        out = out.replace("To", f"{req.get('To')};tag={to_tag}")
    return out


@pytest.fixture
def clock():
    return [1000.0]


@pytest.fixture
def keys(clock):
    return DialogKeys(max_age=3600, max_uses=100, clock=lambda: clock[0])


def refs(found):
    return [k.reference for k in found]


# -- confirmation ----------------------------------------------------------------------

def test_an_offered_key_waits_for_the_2xx_to_its_own_request(keys):
    invite = request(cseq=1)
    key = keys.offer(invite, ref(1), cek(1), frozenset())
    assert key is not None and not key.confirmed and key.offered_in == (1, "INVITE") and key.exclusive
    assert keys.usable(invite) == [] and keys.reusable(invite, exclusive=True) is None
    keys.settle(response(invite, 180))                     # provisional: nothing
    keys.settle(response(request(cseq=7), 200))            # a 2xx to another CSeq: nothing
    assert keys.usable(invite) == []
    keys.settle(response(invite, 200))
    ok = response(invite, 200)
    assert refs(keys.usable(ok)) == [ref(1)]
    assert keys.reusable(ok, exclusive=True) is key


def test_a_2xx_confirms_only_the_keys_offered_in_the_request_it_answers(keys):
    first = request(cseq=1)
    keys.offer(first, ref(1), cek(1), frozenset())
    keys.settle(response(first, 200))
    retry = request(cseq=2, to_tag="b1")                   # offered since, never answered
    keys.offer(retry, ref(2), cek(2), frozenset())
    keys.settle(response(first, 200))                      # retransmitted 200 of CSeq 1
    assert refs(keys.usable(retry)) == [ref(1)]
    assert [k.confirmed for k in keys.kept(retry)] == [True, False]


def test_a_key_offered_in_a_response_is_confirmed_by_a_request_in_the_dialog(keys):
    invite = request(cseq=1)
    ok = response(invite, 200)
    key = keys.offer(ok, ref(1), cek(1), frozenset())
    assert key.offered_in is None and not key.confirmed
    keys.settle(request("ACK", cseq=1))                    # no To tag: not in the dialog yet
    assert not key.confirmed
    keys.settle(request("ACK", cseq=1, to_tag="b1"))
    assert key.confirmed and keys.usable(ok) == [key]


def test_a_request_from_the_peer_does_not_vouch_for_keys_offered_in_requests(keys):
    invite = request(cseq=1)
    keys.offer(invite, ref(1), cek(1), frozenset())
    keys.settle(from_bob())
    assert keys.usable(invite) == []


def test_a_failure_response_drops_unconfirmed_keys_only(keys):
    invite = request(cseq=1)
    keys.offer(invite, ref(1), cek(1), frozenset())
    keys.settle(response(invite, 200))
    reinvite = request(cseq=2, to_tag="b1")
    keys.offer(reinvite, ref(2), cek(2), frozenset())
    keys.settle(response(reinvite, 496))
    assert refs(keys.kept(reinvite)) == [ref(1)]


def test_received_keys_are_usable_at_once_and_found_from_either_side(keys):
    invite = request(cseq=1)                               # only the UAC's tag
    key = keys.keep_received(invite, ref(1), cek(1), readers=frozenset())
    assert key.confirmed and key.exclusive and key.readers == frozenset()
    assert keys.usable(response(invite, 200)) == [key]     # both tags
    assert keys.usable(from_bob()) == [key]                # the tags the other way round
    assert keys.usable(request(call_id="other@x")) == []   # never outside its dialog


def test_who_holds_a_received_key(keys):
    invite = request()
    labelled = keys.keep_received(invite, ref(1), cek(1), readers=frozenset({PROXY}))
    assert labelled.readers == {PROXY} and not labelled.exclusive
    unvouched = keys.keep_received(invite, ref(2), cek(2), readers=None)   # nothing signed
    assert unvouched.readers == {"?"} and not unvouched.exclusive


# -- which key a new message may reuse -------------------------------------------------

def test_srtp_content_only_under_a_key_no_proxy_holds(keys):
    invite = request()
    keys.keep_received(invite, ref(1), cek(1), readers=frozenset({PROXY}))
    assert keys.reusable(invite, exclusive=True) is None
    alone = keys.keep_received(invite, ref(2), cek(2), readers=frozenset())
    assert keys.reusable(invite, exclusive=True) is alone


def test_shared_content_prefers_the_key_most_proxies_hold_never_unnamed_holders(keys):
    invite = request()
    both = keys.keep_received(invite, ref(1), cek(1), readers=frozenset({PROXY, "p2.example.com"}))
    keys.keep_received(invite, ref(2), cek(2), readers=frozenset({PROXY}))
    keys.keep_received(invite, ref(3), cek(3), readers=None)   # "?"
    assert keys.reusable(invite, exclusive=False) is both


def test_the_newest_key_wins_among_equals_and_reuse_counts_a_use(keys):
    invite = request()
    keys.keep_received(invite, ref(1), cek(1), readers=frozenset())
    newest = keys.keep_received(invite, ref(2), cek(2), readers=frozenset())
    assert keys.reusable(invite, exclusive=True) is newest and newest.uses == 0
    assert keys.reuse(invite, exclusive=True) is newest and newest.uses == 1


# -- retirement ------------------------------------------------------------------------

def test_keys_the_refusing_proxy_held_are_retired_never_reused_still_opened(keys):
    invite = request()
    held = keys.keep_received(invite, ref(1), cek(1), readers=frozenset({"Proxy.Example.com"}))
    other = keys.keep_received(invite, ref(2), cek(2), readers=frozenset())
    keys.retire_held_by(request(cseq=2, to_tag="b1"), PROXY)
    assert held.retired and not other.retired
    assert keys.reusable(invite, exclusive=False) is other
    assert keys.opening_lookup(invite).lookup.lookup(ref(1)) == cek(1)[::-1]   # still opens
    # the same reference seen again (a retransmission) stays retired
    again = keys.keep_received(invite, ref(1), cek(1), readers=frozenset({PROXY}))
    assert again.retired and keys.reusable(invite, exclusive=False) is other


# -- age and uses ----------------------------------------------------------------------

def test_keys_are_used_only_while_young_and_under_their_use_count(clock):
    keys = DialogKeys(max_age=60, max_uses=2, clock=lambda: clock[0])
    invite = request()
    key = keys.keep_received(invite, ref(1), cek(1), readers=frozenset())
    pending = keys.opening_lookup(invite)
    assert pending.lookup.lookup(ref(1)) == cek(1)[::-1] and key.uses == 0
    assert pending.lookup.lookup(ref(9)) is None
    pending.spend()                       # the message was accepted: one use
    assert key.uses == 1
    pending.spend()                       # counted once
    assert key.uses == 1
    keys.opening_lookup(invite).lookup.lookup(ref(1))    # a refused message: no spend
    assert key.uses == 1
    assert keys.reuse(invite, exclusive=True) is key and key.uses == 2
    assert keys.usable(invite) == [] and keys.opening_lookup(invite).lookup.lookup(ref(1)) is None

    young = keys.keep_received(invite, ref(2), cek(2), readers=frozenset())
    clock[0] += 59
    assert keys.usable(invite) == [young]
    clock[0] += 1
    assert keys.usable(invite) == [] and keys.reusable(invite, exclusive=True) is None
    assert refs(keys.kept(invite)) == [ref(1), ref(2)]     # kept until swept or evicted


# -- the end of a dialog ---------------------------------------------------------------

def test_end_dialog_and_forget_call(keys):
    invite = request()
    keys.keep_received(invite, ref(1), cek(1), readers=frozenset())
    keys.keep_received(from_bob(), ref(2), cek(2), readers=frozenset())
    keys.keep_received(request(call_id="other@x"), ref(3), cek(3), readers=frozenset())
    assert len(keys) == 3 and refs(keys.for_call("call@x")) == [ref(1), ref(2)]
    keys.end_dialog(request("BYE", cseq=2, to_tag="b1"))    # both slots of the dialog
    assert keys.for_call("call@x") == [] and len(keys) == 1
    keys.forget_call("other@x")
    assert len(keys) == 0


def test_a_message_without_tags_keeps_nothing(keys):
    untagged = make_request("INVITE", BOB, from_uri=ALICE, to_uri=BOB, call_id="c@x")
    untagged = untagged.replace("From", f"<{ALICE}>")
    assert untagged.from_tag is None
    assert keys.offer(untagged, ref(1), cek(1), frozenset()) is None
    assert len(keys) == 0


# -- bounds ----------------------------------------------------------------------------

def test_at_most_max_keys_per_dialog_the_newest_stay(keys):
    invite = request()
    for n in range(MAX_KEYS_PER_DIALOG + 3):
        keys.keep_received(invite, ref(n), cek(n), readers=frozenset())
    assert refs(keys.kept(invite)) == [ref(n) for n in range(3, MAX_KEYS_PER_DIALOG + 3)]
    # a key offered again under a kept reference changes nothing: the first CEK stays
    first = keys.kept(invite)[0]
    assert keys.keep_received(invite, ref(3), cek(99), readers=frozenset()) is first
    assert first.cek == cek(3) and refs(keys.kept(invite))[0] == ref(3)
    assert len(keys.kept(invite)) == MAX_KEYS_PER_DIALOG


def test_at_most_max_dialogs_the_oldest_goes(clock):
    keys = DialogKeys(max_age=3600, max_uses=100, clock=lambda: clock[0], max_dialogs=3,
                      max_keys_per_dialog=2)
    for n in range(5):
        keys.keep_received(request(call_id=f"c{n}@x"), ref(n), cek(n), readers=frozenset())
    assert len(keys) == 3
    assert [bool(keys.for_call(f"c{n}@x")) for n in range(5)] == [False, False, True, True, True]


def test_dialogs_whose_keys_all_aged_out_are_swept_every_256_keeps(clock):
    keys = DialogKeys(max_age=60, max_uses=100, clock=lambda: clock[0])
    keys.keep_received(request(call_id="old@x"), ref(0), cek(0), readers=frozenset())
    clock[0] += 61
    for n in range(1, 255):
        keys.keep_received(request(call_id=f"c{n}@x"), ref(n), cek(n), readers=frozenset())
    assert keys.for_call("old@x")                          # 255 keeps: not swept yet
    keys.keep_received(request(call_id="c255@x"), ref(255), cek(255), readers=frozenset())
    assert keys.for_call("old@x") == [] and len(keys) == 255


def test_no_cek_in_reprs(keys):
    key = keys.keep_received(request(), ref(1), cek(0xAB), readers=frozenset())
    assert "abab" not in repr(key).lower() and "\\xab" not in repr(key).lower()
    assert isinstance(key, DialogKey) and "1 of 4096" in repr(keys)


def test_concurrent_use_keeps_the_bounds(clock):
    keys = DialogKeys(max_age=3600, max_uses=10_000, clock=lambda: clock[0], max_dialogs=20)

    def work(n):
        for i in range(200):
            msg = request(call_id=f"c{n}-{i % 30}@x")
            keys.keep_received(msg, ref(i), cek(i % 256), readers=frozenset())
            keys.reuse(msg, exclusive=True)
            pending = keys.opening_lookup(msg)
            pending.lookup.lookup(ref(i))
            pending.spend()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 20
