"""The answer memory for a protected request's late copies (``kamailio_app/late_copies.py``)
and the engine's half of it (``Verdict.replay_key``); the wire tests are
``tests/kamailio/test_late_copies_wire.py`` and review 123's HB2 module.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, message, proxy_engine, ua_engine
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.sip import make_request
from kamailio_app.late_copies import (ANSWER_KEY_AVP, ANSWERED_TABLE, answer_key,
                                      note_answer_key, remember_answer, remembered_answer)

KEY = "0123456789abcdef0123456789abcdef"


class _Ns:
    pass


class FakeKSR:
    """pv (AVPs and the reply's status line) and one htable, with each item's life."""

    def __init__(self, **pvs) -> None:
        self.vars: dict[str, object] = dict(pvs)
        self.table: dict[tuple[str, str], tuple[str, int]] = {}
        self.pv = _Ns()
        self.pv.get = self.vars.get
        self.pv.sets = self.vars.__setitem__
        self.htable = _Ns()
        self.htable.sht_setxs = self._setxs
        self.htable.sht_setex = lambda t, k, ttl: self._setxs(t, k, self.table[(t, k)][0], ttl)
        self.htable.sht_get = lambda t, k: (self.table.get((t, k)) or (None,))[0]

    def _setxs(self, table: str, key: str, value: str, ttl: int) -> int:
        self.table[(table, key)] = (value, ttl)
        return 1


def _request(method: str = "MESSAGE", to_tag: str | None = None,
             uri: str = "sip:bob@example.com"):
    return make_request(method, uri, from_uri="sip:alice@example.com",
                        to_uri="sip:bob@example.com", call_id="c@x", to_tag=to_tag)


@pytest.mark.parametrize("method, key, noted", [
    ("MESSAGE", KEY, True),
    ("INVITE", KEY, False),          # its 2xx is end to end: never made up here
    ("CANCEL", KEY, False),
    ("MESSAGE", None, False),        # nothing recorded (no signed context)
    ("MESSAGE", "not-a-digest", False),
])
def test_only_a_recorded_non_invite_request_is_noted(method, key, noted):
    ksr = FakeKSR()
    note_answer_key(ksr, _request(method), key)
    assert (ANSWER_KEY_AVP in ksr.vars) is noted


def test_the_answer_is_bound_to_the_to_tag_and_request_uri():
    """One replay key in two forks (a sender before e2m-sip-to-tag: review 129 K1) or
    to two Request-URIs names two answers."""
    first = answer_key(KEY, _request(to_tag="f1"))
    assert first == answer_key(KEY, _request(to_tag="f1"))          # the same request
    assert first != answer_key(KEY, _request(to_tag="f2"))
    assert first != answer_key(KEY, _request(to_tag="f1", uri="sip:bob@192.0.2.9"))


def test_a_2xx_is_kept_for_a_transactions_lifetime_a_failure_is_not():
    request = _request()
    ksr = FakeKSR(**{"$rs": 486, "$rr": "Busy Here"})
    note_answer_key(ksr, request, KEY)
    remember_answer(ksr)
    assert ksr.table == {}
    ksr.vars.update({"$rs": 202, "$rr": "Accepted"})
    remember_answer(ksr)
    assert ksr.table == {(ANSWERED_TABLE, answer_key(KEY, request)): ("202 Accepted", 32)}
    assert remembered_answer(ksr, request, KEY) == (202, "Accepted")
    assert remembered_answer(ksr, request, "f" * 32) is None


def test_a_reason_phrase_that_could_carry_anything_is_not_kept():
    ksr = FakeKSR(**{"$rs": 200, "$rr": "OK\r\nX-Evil: 1"})
    note_answer_key(ksr, _request(), KEY)
    remember_answer(ksr)
    assert remembered_answer(ksr, _request(), KEY) == (200, "OK")


@pytest.mark.parametrize("held", ["486 Busy Here", "200", "abc OK", "200 \x00"])
def test_a_held_value_that_is_not_a_2xx_line_answers_nothing(held):
    ksr = FakeKSR()
    ksr.table[(ANSWERED_TABLE, answer_key(KEY, _request()))] = (held, 32)
    assert remembered_answer(ksr, _request(), KEY) is None


def test_the_engine_names_the_message_a_copy_repeats():
    pki = init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")
    proxy = proxy_engine(pki, TRUSTED, view=("MESSAGE:*",))
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))
    sent = alice.protect(message(pki)).message
    first = proxy.inspect(sent)
    assert first.action == "forward" and first.replay_key is not None
    again = proxy.inspect(sent)
    assert (again.action, again.code, again.error) == ("reply", 403, "ReplayError")
    assert again.replay_key == first.replay_key
    other = proxy.inspect(alice.protect(message(pki, b"another")).message)
    assert other.replay_key not in (None, first.replay_key)


def test_a_2xx_with_a_body_is_not_kept():
    """An UPDATE's 200 carries the SDP answer (review 129's untried): a status line made
    up from memory would lose it, so such an answer is not kept."""
    request = _request("UPDATE")
    ksr = FakeKSR(**{"$rs": 200, "$rr": "OK", "$bs": 312})
    note_answer_key(ksr, request, KEY)
    remember_answer(ksr)
    assert ksr.table == {}
    ksr.vars["$bs"] = 0
    remember_answer(ksr)
    assert remembered_answer(ksr, request, KEY) == (200, "OK")
