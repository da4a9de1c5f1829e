"""The caller's half of the late 2xx (review 127 HB1): at an INVITE's failure answer the
UA retires its offer's keys (never used to send again) but opens a 2xx under them for a
transaction's lifetime more, as the proxies keep theirs (review 125 HB2).  The wire
test is ``tests/kamailio/test_review127_cek_reuse_wire.py``.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, answer, invite, three_phones
from e2m_plugins.dialog_keys import DialogKeys
from e2m_plugins.replay import TRANSACTION_LIFETIME
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki


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


def test_a_lingering_key_opens_for_the_window_and_is_never_reused(world):
    clock = Clock()
    keys = DialogKeys(max_age=3600, max_uses=100, clock=clock)
    sent = invite(world, call_id="linger@x")
    keys.offer(sent, b"ref-1", bytes(16), frozenset())
    busy = make_response(sent, 486, "Busy Here").replace(
        "To", f"{sent.get('To')};tag=f1")
    keys.end_dialog(busy, linger=TRANSACTION_LIFETIME)
    keys.settle(busy)                  # the failure of the request that offered it
    late = answer(sent, to_tag="f2")
    assert keys.opening_lookup(late).lookup.lookup(b"ref-1") is not None
    assert keys.reusable(late, exclusive=True) is None
    assert keys.reusable(late, exclusive=False) is None
    clock.now += TRANSACTION_LIFETIME + 1
    assert keys.opening_lookup(late).lookup.lookup(b"ref-1") is None


def test_without_linger_the_keys_go_at_once(world):
    keys = DialogKeys(max_age=3600, max_uses=100)
    sent = invite(world, call_id="gone@x")
    keys.offer(sent, b"ref-1", bytes(16), frozenset())
    keys.end_dialog(make_response(sent, 481, "Call/Transaction Does Not Exist"))
    assert keys.kept(sent) == []


def test_the_caller_opens_a_2xx_after_another_forks_486(world):
    alice, bob, _ = three_phones(world)
    sent = alice.protect(invite(world, call_id="late2xx@x")).message
    got = bob.open(sent).message
    busy = make_response(got, 486, "Busy Here").replace("To", f"{got.get('To')};tag=f1")
    alice.open(busy)                                     # the INVITE's final answer
    late = bob.protect(answer(got, to_tag="f2")).message
    opened = alice.open(late)
    assert opened.message.body == SDP_ANSWER and opened.info.key_reuse
    # her next request in that call is keyed afresh: the retired key seals nothing
    again = alice.protect(invite(world, call_id="late2xx@x", cseq=2, to_tag="f2"))
    assert not again.info.key_reuse

