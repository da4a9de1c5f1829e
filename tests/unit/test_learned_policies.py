"""LearnedPolicies: configured and learnt proxy policies, expiry, withdrawal, bounds,
merging after a 496, and the lookups the UA engine makes."""

from __future__ import annotations

import threading

import pytest

from e2m_plugins.config import DEFAULT_MAX_POLICY_EXPIRES, DEFAULT_POLICY_EXPIRES
from e2m_plugins.headers import PolicyHeader, Rule
from e2m_plugins.learned_policies import MAX_POLICIES, LearnedPolicies, LearnedPolicy

SDP = Rule("INVITE", "application/sdp")
TEXT = Rule("MESSAGE", "text/plain")
ANY_MESSAGE = Rule("MESSAGE", "*")
FP = bytes(range(32))
FP2 = bytes(range(1, 33))


@pytest.fixture
def clock():
    return [1000.0]


@pytest.fixture
def table(clock):
    return LearnedPolicies(clock=lambda: clock[0])


def header(host="p.example.com", *, view=(SDP,), verify=(), expires=None, fp=None, url=None):
    return PolicyHeader(host, view=view, verify=verify, cert_fingerprint=fp, cert_url=url,
                        expires=expires)


REGISTRAR = "REGISTER sip:example.com"     # the source: an answer to our REGISTER


def learn(table, value, *, source=REGISTRAR, scope=None):
    return table.learn_header(value, source=source, scope=scope)


def hosts(policies):
    return [p.host for p in policies]


# -- learning from policy headers ------------------------------------------------------

def test_a_header_is_kept_until_its_expires(table, clock):
    entry = learn(table, header(expires=60, fp=FP, url="https://p.example.com/c.der"))
    assert entry == LearnedPolicy("p.example.com", (SDP,), (), 1060.0, FP,
                                  "https://p.example.com/c.der", REGISTRAR, None)
    assert table.in_force() == [entry]
    clock[0] += 59.9
    assert hosts(table.in_force()) == ["p.example.com"]
    clock[0] += 0.1
    assert table.in_force() == [] and len(table) == 0    # expired, swept


def test_a_header_without_expires_gets_the_default(table, clock):
    entry = learn(table, header())
    assert entry is not None and entry.expires_at == 1000.0 + DEFAULT_POLICY_EXPIRES
    other = LearnedPolicies(clock=lambda: clock[0], default_expires=5)
    assert learn(other, header()).expires_at == 1005.0


def test_expires_is_capped_whatever_the_header_says(table, clock):
    entry = learn(table, header(expires=2**32 - 1))
    assert entry.expires_at == 1000.0 + DEFAULT_MAX_POLICY_EXPIRES
    short = LearnedPolicies(clock=lambda: clock[0], max_expires=60)
    assert learn(short, header(expires=3600)).expires_at == 1060.0


def test_a_new_header_replaces_the_learnt_entry_as_a_whole(table):
    learn(table, header(view=(SDP,), verify=(SDP,), fp=FP, expires=60))
    learn(table, header("P.Example.COM", view=(TEXT,), expires=120))
    (entry,) = table.in_force()
    assert (entry.view, entry.verify, entry.fingerprint, entry.expires_at) == (
        (TEXT,), (), None, 1120.0)


def test_expires_zero_withdraws_and_learns_nothing(table):
    learn(table, header())
    assert learn(table, header(expires=0)) is None
    assert table.in_force() == []
    assert learn(table, header("q.example.com", expires=0)) is None   # unknown: no-op
    assert len(table) == 0


def test_only_the_source_that_set_a_policy_can_withdraw_it(table):
    learn(table, header())
    assert learn(table, header(expires=0), source="OPTIONS sip:elsewhere.example.net") is None
    assert hosts(table.in_force()) == ["p.example.com"]            # still there
    learn(table, header(expires=0))                                 # the same source
    assert table.in_force() == []


def test_withdraw_forgets_learnt_entries_only(table):
    table.configure("conf.example.com", (SDP,), ())
    learn(table, header())
    assert table.withdraw("P.example.com") is True
    assert table.withdraw("p.example.com") is False
    assert table.withdraw("conf.example.com") is False
    assert hosts(table.in_force()) == ["conf.example.com"]


# -- dialog scopes ---------------------------------------------------------------------

def test_a_dialogs_policy_holds_in_that_dialog_only_and_goes_with_it(table):
    learn(table, header("d.example.com"), source="dialog call-1", scope="call-1")
    assert hosts(table.wanting("INVITE", "application/sdp", scope="call-1")) == ["d.example.com"]
    assert table.wanting("INVITE", "application/sdp", scope="call-2") == []
    assert table.wanting("INVITE", "application/sdp") == []
    assert hosts(table.everywhere()) == ["d.example.com"]
    table.end_scope("call-1")
    assert table.everywhere() == []


def test_a_global_policy_holds_in_every_dialog(table):
    learn(table, header())
    assert hosts(table.wanting("INVITE", "application/sdp", scope="call-9")) == ["p.example.com"]


# -- configured entries ----------------------------------------------------------------

def test_configured_entries_never_expire_and_win_over_the_wire(table, clock):
    configured = table.configure("conf.example.com", (SDP,), (TEXT,))
    assert configured.expires_at is None and table.is_configured("CONF.example.com")
    assert learn(table, header("conf.example.com", view=(TEXT,))) is None
    assert learn(table, header("conf.example.com", view=(TEXT,)), scope="c1") is None
    assert learn(table, header("conf.example.com", expires=0)) is None   # no withdrawal
    clock[0] += 10 * 365 * 24 * 3600
    assert table.in_force() == [configured]


# -- bounds ----------------------------------------------------------------------------

def test_a_full_table_pushes_out_the_learnt_entry_that_expires_first(clock):
    table = LearnedPolicies(clock=lambda: clock[0], max_entries=3)
    table.configure("conf.example.com", (SDP,), ())          # configured entries count
    learn(table, header("a.example.com", expires=100))
    learn(table, header("b.example.com", expires=50))
    learn(table, header("c.example.com", expires=200))
    assert len(table) == 3
    assert sorted(hosts(table.in_force())) == ["a.example.com", "c.example.com",
                                                "conf.example.com"]


def test_default_bound_is_max_policies(clock):
    table = LearnedPolicies(clock=lambda: clock[0])
    for i in range(MAX_POLICIES + 10):
        learn(table, header(f"h{i}.example.com"))
    assert len(table) == MAX_POLICIES


def test_a_496_is_held_to_the_bound_too(clock):
    table = LearnedPolicies(clock=lambda: clock[0], max_entries=1)
    learn(table, header("a.example.com"))
    table.learn_496("b.example.com", (TEXT,), None)
    assert len(table) == 1 and hosts(table.in_force()) == ["b.example.com"]


# -- 496 -------------------------------------------------------------------------------

def test_a_496_merges_into_what_the_host_had(table, clock):
    learn(table, header(view=(SDP,), verify=(SDP,), fp=FP, url="https://p.example.com/c",
                        expires=60))
    entry = table.learn_496("p.example.com", (TEXT, SDP),
                            header(view=(ANY_MESSAGE,), verify=(TEXT,), fp=FP2, expires=30))
    assert entry.view == (SDP, ANY_MESSAGE, TEXT)        # old, announced, needed; each once
    assert entry.verify == (SDP, TEXT)
    assert (entry.fingerprint, entry.url, entry.expires_at) == (FP2, None, 1030.0)
    assert table.in_force() == [entry]


def test_an_expired_entry_brings_nothing_back_into_a_496(table, clock):
    learn(table, header(view=(SDP,), expires=10))
    clock[0] += 11
    entry = table.learn_496("p.example.com", (TEXT,), None)
    assert entry.view == (TEXT,)


def test_a_496_without_a_policy_header_keeps_for_the_default_time(table):
    entry = table.learn_496("p.example.com", (ANY_MESSAGE,), None)
    assert entry == LearnedPolicy("p.example.com", (ANY_MESSAGE,), (),
                                  1000.0 + DEFAULT_POLICY_EXPIRES, None, None, "496", None)
    # expires=0 in a 496's policy header is not a withdrawal: the default applies
    again = table.learn_496("p.example.com", (TEXT,), header(view=(), expires=0))
    assert again.expires_at == 1000.0 + DEFAULT_POLICY_EXPIRES
    assert again.view == (ANY_MESSAGE, TEXT)


def test_a_496_keeps_a_configured_entry_as_configured_and_its_lesson_lapses(table, clock):
    """What a configured proxy's 496 teaches is kept beside its entry, for the
    usual time: the configured rules never widen for good (review 63)."""
    table.configure("conf.example.com", (SDP,), ())
    entry = table.learn_496("conf.example.com", (TEXT,), None)
    assert entry.expires_at is not None and entry.view == (TEXT,) and entry.source == "496"
    assert table.is_configured("conf.example.com")
    assert hosts(table.wanting("MESSAGE", "text/plain")) == ["conf.example.com"]
    assert hosts(table.wanting("INVITE", "application/sdp")) == ["conf.example.com"]
    clock[0] += entry.expires_at - clock[0]
    assert hosts(table.wanting("MESSAGE", "text/plain")) == []
    assert hosts(table.wanting("INVITE", "application/sdp")) == ["conf.example.com"]
    assert table.withdraw("conf.example.com") is False       # nothing learnt is left
    assert table.is_configured("conf.example.com")


# -- lookups ---------------------------------------------------------------------------

def test_wanting_names_the_proxies_that_must_read_or_verify(table, clock):
    table.configure("view.example.com", (SDP,), ())
    learn(table, header("verify.example.com", view=(), verify=(TEXT,), expires=10))
    learn(table, header("any.example.com", view=(Rule("*", "*"),)))
    assert hosts(table.wanting("INVITE", "application/sdp")) == ["view.example.com",
                                                                   "any.example.com"]
    assert hosts(table.wanting("MESSAGE", "text/plain; charset=utf-8")) == [
        "verify.example.com", "any.example.com"]
    assert [p.wants_signature("MESSAGE", "text/plain") for p in table.wanting(
        "MESSAGE", "text/plain")] == [True, False]
    clock[0] += 10
    assert hosts(table.wanting("MESSAGE", "text/plain")) == ["any.example.com"]


def test_fingerprint_is_the_announced_one_while_in_force(table, clock):
    assert table.fingerprint("p.example.com") is None
    learn(table, header(fp=FP, expires=10))
    assert table.fingerprint("P.EXAMPLE.COM") == FP
    clock[0] += 20
    assert table.fingerprint("p.example.com") is None    # expired: it says nothing now


def test_concurrent_learning_keeps_the_bound(clock):
    table = LearnedPolicies(clock=lambda: clock[0], max_entries=50)

    def work(n):
        for i in range(100):
            learn(table, header(f"h{n}-{i}.example.com"))
            table.wanting("INVITE", "application/sdp")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(table) == 50
