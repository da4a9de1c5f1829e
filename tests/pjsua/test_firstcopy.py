"""``FirstCopy``: one delivery per new MESSAGE / initial INVITE, retransmissions pass,
bounded in count and age.  (The attack itself, on the wire: tests/e2e/test_phone_auth_tls.py.)"""

from __future__ import annotations

import pytest

from e2m_plugins import sip
from pjsua_hooks.firstcopy import Duplicate, FirstCopy

pytestmark = [pytest.mark.pjsua2]

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(method: str = "MESSAGE", *, cseq: int = 1, call_id: str = "c1",
            body: bytes = b"hello", to_tag: str | None = None) -> sip.SipMessage:
    return sip.make_request(method, BOB, from_uri=ALICE, to_uri=BOB, call_id=call_id,
                            cseq=cseq, from_tag="ft1", to_tag=to_tag, body=body,
                            content_type="text/plain")


def first_then(second: sip.SipMessage, first: sip.SipMessage | None = None,
               protected: bool = True) -> FirstCopy:
    seen = FirstCopy(max_age=332.0)
    first = first or request()
    seen.check(first, first, protected)
    seen.check(second, second, protected)
    return seen


def test_the_challenged_copy_of_a_message_is_refused_482():
    first = request(cseq=1)
    with pytest.raises(Duplicate) as dup:
        first_then(request(cseq=2), first)      # another CSeq and Via branch
    assert (dup.value.code, dup.value.reason) == (482, "Loop Detected")


def test_a_retransmission_passes():
    first = request()
    seen = first_then(first, first)      # same CSeq, same Via branch
    assert seen.absorbed == 0


def test_other_content_under_the_same_call_id_is_another_message():
    seen = first_then(request(cseq=2, body=b"second words"))
    assert len(seen) == 2 and seen.absorbed == 0


def test_any_second_initial_invite_is_refused_but_in_dialog_requests_pass():
    with pytest.raises(Duplicate):
        first_then(request("INVITE", cseq=2, body=b"v=0 other"), request("INVITE"))
    seen = first_then(request("INVITE", cseq=3, to_tag="tt"), request("INVITE"))
    assert seen.absorbed == 0


def test_unprotected_requests_are_not_remembered():
    seen = first_then(request(cseq=2), protected=False)
    assert len(seen) == 0


def test_bounded_in_age_and_count():
    clock = Clock()
    seen = FirstCopy(max_age=332.0, limit=3, clock=clock)
    first = request()
    seen.check(first, first, True)
    clock.now += 333
    again = request(cseq=2)
    seen.check(again, again, True)             # the first one aged out
    for n in range(10):
        other = request(call_id=f"x{n}")
        seen.check(other, other, True)
    assert len(seen) == 3
