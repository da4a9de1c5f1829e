"""The phone's answer to a 2xx relayed after its INVITE failed (review 129 HB1), without
pjsip: which 2xx the engine calls late (``UAEngine.late_answer_to_failed_invite``), the
ACK and BYE ``pjsua_hooks.late_2xx`` writes for it, and the bounds on what it keeps.
The wire test with a real phone is ``tests/pjsua/test_review129_late_2xx_phone.py``.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import answer, invite, three_phones
from e2m_plugins import sip
from e2m_plugins.replay import TRANSACTION_LIFETIME
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki
from pjsua_hooks.late_2xx import MAX_ACKS, MAX_PER_INVITE, LateAnswers, build_ack, build_bye

VIA = "127.0.0.1:5099"


@pytest.fixture(scope="module")
def world():
    from e2m_lab.flows import TRUSTED
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="ec")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _failed_call(world, call_id: str, status: int = 486):
    """alice's INVITE, bob's device f1 fails it; returns (alice, bob, what bob got)."""
    alice, bob, _ = three_phones(world)
    sent = alice.protect(invite(world, call_id=call_id)).message
    got = bob.open(sent).message
    fail = make_response(got, status, "Busy Here").replace("To", f"{got.get('To')};tag=f1")
    alice.open(fail)
    return alice, bob, got


def _late(bob, got, to_tag: str = "f2", record_route: tuple[str, ...] = ()):
    plain = answer(got, to_tag=to_tag)
    for value in record_route:
        plain = plain.add("Record-Route", value)
    return bob.protect(plain).message


# -- the engine: which 2xx is late ----------------------------------------------------

def test_the_engine_names_a_2xx_after_its_invites_failure(world):
    alice, bob, got = _failed_call(world, "late-a@x")
    late = _late(bob, got)
    alice.open(late)
    assert alice.late_answer_to_failed_invite(late) == 486


def test_a_2xx_without_a_failure_first_is_not_late(world):
    alice, bob, _ = three_phones(world)
    sent = alice.protect(invite(world, call_id="late-b@x")).message
    got = bob.open(sent).message
    ok = bob.protect(answer(got, to_tag="f2")).message
    alice.open(ok)
    assert alice.late_answer_to_failed_invite(ok) is None


def test_a_2xx_to_nothing_we_sent_or_another_branch_is_not_late(world):
    alice, bob, got = _failed_call(world, "late-c@x")
    late = _late(bob, got)
    alice.open(late)
    other_branch = late.replace("Via", "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKforged")
    other_call = late.replace("Call-ID", "someone-else@x")
    assert alice.late_answer_to_failed_invite(other_branch) is None
    assert alice.late_answer_to_failed_invite(other_call) is None
    # pjsip matches by the branch alone: the phone drops the one with our branch
    assert alice.names_a_failed_invites_branch(other_call)
    assert not alice.names_a_failed_invites_branch(other_branch)
    # a failure answer is no 2xx
    assert alice.late_answer_to_failed_invite(
        make_response(got, 486, "Busy Here").replace("To", f"{got.get('To')};tag=f1")) is None


def test_lateness_ends_a_transaction_lifetime_after_the_failure(world):
    alice, bob, got = _failed_call(world, "late-d@x")
    late = _late(bob, got)
    alice.open(late)
    real = alice._clock
    alice._clock = lambda: real() + TRANSACTION_LIFETIME + 1
    assert alice.late_answer_to_failed_invite(late) is None


# -- the ACK and the BYE ----------------------------------------------------------------

def test_the_ack_and_bye_follow_rfc_3261_13_2_2_4(world):
    _, bob, got = _failed_call(world, "late-e@x")
    late = _late(bob, got, record_route=("<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"))
    ack = sip.parse(build_ack(late, VIA))
    bye = sip.parse(build_bye(late, VIA))
    assert ack.method == "ACK" and bye.method == "BYE"
    assert ack.request_uri == bye.request_uri == "sip:bob@127.0.0.1:5062"   # the Contact
    assert ack.cseq == (got.cseq[0], "ACK") and bye.cseq == (got.cseq[0] + 1, "BYE")
    assert ack.to_tag == bye.to_tag == "f2" and ack.from_tag == bye.from_tag == got.from_tag
    assert ack.call_id == bye.call_id == got.call_id
    # Record-Route reversed: the proxy nearest to us first
    assert ack.get_all("Route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    branches = {got.via_branch(), ack.via_branch(), bye.via_branch()}
    assert len(branches) == 3 and all(b.startswith("z9hG4bK") for b in branches)
    assert not ack.body and not bye.body
    # pjsip prints its own Content-Length: one in the text would make two (Kamailio: 400)
    assert not ack.has("Content-Length") and not bye.has("Content-Length")


@pytest.mark.parametrize("change", ["no_contact", "two_contacts", "uri_headers", "tel"])
def test_a_2xx_without_a_usable_target_gets_nothing(world, change):
    _, bob, got = _failed_call(world, f"late-f-{change}@x")
    late = _late(bob, got)
    late = {"no_contact": late.remove("Contact"),
            "two_contacts": late.add("Contact", "<sip:evil@192.0.2.9>"),
            "uri_headers": late.replace("Contact", "<sip:bob@127.0.0.1?Route=x>"),
            "tel": late.replace("Contact", "<tel:+123>")}[change]
    table = LateAnswers()
    assert table.answer(late, late.serialize(), got.from_tag, VIA) == []
    assert len(table) == 0 and table.counts["refused"] == 1


def test_a_foreign_from_tag_gets_nothing(world):
    _, bob, got = _failed_call(world, "late-g@x")
    late = _late(bob, got)
    table = LateAnswers()
    assert table.answer(late, late.serialize(), "not-ours", VIA) == []
    assert len(table) == 0


# -- retransmissions and bounds -----------------------------------------------------------

def test_one_bye_per_late_2xx_and_the_same_ack_for_each_copy(world):
    _, bob, got = _failed_call(world, "late-h@x")
    late = _late(bob, got)
    data = late.serialize()
    table = LateAnswers()
    first = table.answer(late, data, got.from_tag, VIA)
    assert [o.method for o in first] == ["ACK", "BYE"]
    assert [o.stateful for o in first] == [False, True]
    again = table.retransmission(data)
    assert again is not None and again is not False and again.data == first[0].data
    # the same 2xx with other octets (re-sealed): an ACK, never a second BYE
    other = _late(bob, got)
    assert [o.method for o in table.answer(other, other.serialize(), got.from_tag, VIA)] \
        == ["ACK"]
    assert table.retransmission(b"SIP/2.0 200 OK\r\n\r\n") is False
    # the BYE's final answer is told once (its retransmission is not)
    bye = sip.parse(first[1].data)
    ok = make_response(bye, 200, "OK")
    assert table.bye_answered(ok) is not None and table.bye_answered(ok) is None
    assert table.bye_answered(make_response(bye, 100, "Trying")) is None


def test_acks_per_late_2xx_are_bounded(world):
    _, bob, got = _failed_call(world, "late-i@x")
    late = _late(bob, got)
    data = late.serialize()
    table = LateAnswers()
    table.answer(late, data, got.from_tag, VIA)
    sent = [table.retransmission(data) for _ in range(3 * MAX_ACKS)]
    assert sum(1 for s in sent if s) == MAX_ACKS - 1       # MAX_ACKS in all
    assert all(s is None for s in sent[MAX_ACKS - 1:])     # dropped, nothing sent


def test_to_tags_per_invite_entries_and_age_are_bounded(world):
    _, bob, got = _failed_call(world, "late-j@x")
    clock = Clock()
    table = LateAnswers(clock=clock, max_entries=8)
    byes = 0
    for i in range(MAX_PER_INVITE + 5):
        late = _late(bob, got, to_tag=f"fork{i}")
        byes += sum(1 for o in table.answer(late, late.serialize(), got.from_tag, VIA)
                    if o.method == "BYE")
    assert byes == MAX_PER_INVITE and len(table) == MAX_PER_INVITE
    # other INVITEs' late 2xx: the table never holds more than its bound
    for n in range(6):
        _, bob2, got2 = _failed_call(world, f"late-k{n}@x")
        late = _late(bob2, got2)
        table.answer(late, late.serialize(), got2.from_tag, VIA)
    assert len(table) == 8
    late = _late(bob, got, to_tag="fork0")
    clock.now += TRANSACTION_LIFETIME + 1
    assert table.retransmission(late.serialize()) is False
    assert len(table) == 0


def test_our_bye_to_one_late_fork_leaves_the_next_forks_2xx_openable(world):
    """Two devices answer after the failure: the BYE to the first ends only its slot;
    the INVITE's retired keys still open the second's 2xx (until their own end)."""
    alice, bob, got = _failed_call(world, "late-m@x")
    first = _late(bob, got, to_tag="f2")
    bye = sip.parse(build_bye(alice.open(first).message, VIA))
    alice.protect(bye)
    second = _late(bob, got, to_tag="f3")
    assert alice.open(second).info.key_reuse
    assert alice.late_answer_to_failed_invite(second) == 486
    # the retired keys never seal anything again
    again = alice.protect(invite(world, call_id="late-m@x", cseq=got.cseq[0] + 2,
                                 to_tag="f3"))
    assert not again.info.key_reuse
