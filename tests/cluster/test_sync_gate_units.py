"""The sync gate without Kamailio (kamailio_app/sync_gate.py): the readiness rule on a
clock the test moves, which KDMQ messages are part of a peer's dump, which peers a
node waits for, and the ``[cluster]`` sync settings and what the launcher renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from kamailio_app.config import AppConfigError, parse_app_config
from kamailio_app.launcher import render_cfg
from kamailio_app.sync_gate import DUMP, PART, PeerView, ReadinessRule, gate_peers, sync_kind

B, C = "10.0.0.2:5090", "10.0.0.3:5090"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rule(peers=(B,), wait=30, quiet=1.0, unreachable_after=6):
    clock = Clock()
    return ReadinessRule(peers, wait=wait, quiet=quiet, unreachable_after=unreachable_after,
                         clock=clock), clock


def test_not_ready_until_the_peers_dump_came_and_went_quiet():
    gate, clock = rule()
    clock.now = 0.2
    assert not gate.decide({}).ready                                  # nothing heard yet
    clock.now = 0.5
    assert not gate.decide({B: PeerView(active=True)}).ready          # active, no dump yet
    clock.now = 0.6
    assert not gate.decide({B: PeerView(True, dumped=0.55, last=0.55)}).ready
    clock.now = 1.5                                                   # a usrloc part later
    assert not gate.decide({B: PeerView(True, dumped=0.55, last=1.2)}).ready
    clock.now = 2.2
    done = gate.decide({B: PeerView(True, dumped=0.55, last=1.2)})
    assert done.ready and done.missing == () and B in done.why


def test_a_usrloc_part_alone_is_not_a_finished_sync():
    """usrloc sends nothing when it has nothing, so only htable's dump (always sent)
    proves the peer answered the sync request."""
    gate, clock = rule()
    clock.now = 4.0
    assert not gate.decide({B: PeerView(True, dumped=None, last=1.0)}).ready


def test_a_peer_not_active_after_the_bound_is_unreachable_and_the_node_serves_alone():
    gate, clock = rule(unreachable_after=6)
    clock.now = 5.9
    assert not gate.decide({B: PeerView(active=False)}).ready
    clock.now = 6.0
    alone = gate.decide({B: PeerView(active=False)})
    assert alone.ready and alone.missing == (B,) and "unreachable" in alone.why


def test_an_active_peer_is_waited_for_but_never_past_the_wait():
    gate, clock = rule(wait=10)
    clock.now = 9.9                           # active (it answered DMQ), dump never came
    assert not gate.decide({B: PeerView(active=True)}).ready
    clock.now = 10.0
    late = gate.decide({B: PeerView(active=True)})
    assert late.ready and late.missing == (B,) and "not caught up after 10 s" in late.why


def test_a_peer_sending_dumps_forever_does_not_wedge_the_node():
    gate, clock = rule(wait=10)
    for step in range(1, 100):
        clock.now = step * 0.2
        decision = gate.decide({B: PeerView(True, dumped=0.1, last=clock.now)})
        if decision.ready:
            break
    assert decision.ready and clock.now == pytest.approx(10.0) and decision.missing == (B,)


def test_every_peer_counts_one_caught_up_one_down():
    gate, clock = rule(peers=(B, C))
    clock.now = 3.0
    views = {B: PeerView(True, dumped=1.0, last=1.5), C: PeerView(active=False)}
    assert not gate.decide(views).ready       # C may still answer its notification
    clock.now = 6.0
    both = gate.decide(views)
    assert both.ready and both.missing == (C,)


def test_a_peer_that_went_quiet_is_not_taken_as_unreachable_and_vice_versa():
    gate, clock = rule(peers=(B, C))
    clock.now = 7.0                           # B dumped (DMQ lost sight of it since): caught up
    views = {B: PeerView(False, dumped=1.0, last=1.0), C: PeerView(True, dumped=6.5, last=6.5)}
    assert not gate.decide(views).ready       # C's dump still arriving
    clock.now = 7.5
    assert gate.decide(views).ready and gate.decide(views).missing == ()


def test_no_peer_at_all_is_ready_at_once():
    gate, clock = rule(peers=())
    assert gate.decide({}).ready


@pytest.mark.parametrize("args", [dict(wait=5, unreachable_after=6), dict(quiet=0),
                                  dict(unreachable_after=0)])
def test_the_rule_refuses_bounds_that_cannot_hold(args):
    with pytest.raises(ValueError):
        rule(**args)


@pytest.mark.parametrize("peer_id, body, kind", [
    ("htable", '{"cells":[', DUMP),
    ("htable", '{"cells":]', DUMP),
    ("usrloc", '{"multi":', PART),
    ("htable", '{"action"', None),         # a change replicated as it happens
    ("usrloc", '{"action"', None),
    ("notification_peer", "sip:127.0", None),
    ("htable", '{"multi":', None),
    ("", "", None),
])
def test_which_kdmq_is_part_of_a_dump(peer_id, body, kind):
    assert sync_kind(peer_id, body) == kind


def test_the_node_waits_for_its_peers_not_for_itself():
    sources = {("127.0.0.1", 5090), ("127.0.0.2", 5090), ("127.0.0.1", 5091)}
    assert gate_peers(sources, "127.0.0.1", 5090) == {"127.0.0.2:5090", "127.0.0.1:5091"}


# --------------------------------------------------------------------------- settings

DB = "postgres://e2m:pw@127.0.0.1:5432/e2m"
LISTEN = {"listen": ["udp:127.0.0.1:5060"], "domains": ["example.com"]}
DMQ = {"db_url": DB, "dmq_address": "sip:127.0.0.1:5090", "peers": ["sip:127.0.0.2:5090"]}


def _config(tmp_path: Path, **cluster):
    return parse_app_config({"kamailio": LISTEN, "e2m": {"enabled": False}, "cluster": cluster},
                            tmp_path / "PROXY.toml")


def test_sync_settings_defaults_and_values(tmp_path):
    default = _config(tmp_path, **DMQ).cluster
    assert (default.sync_wait, default.sync_unreachable_after, default.sync_quiet_ms) == (30, 6, 1000)
    assert default.gated
    set_ = _config(tmp_path, **DMQ, sync_wait=60, sync_unreachable_after=10,
                   sync_quiet_ms=500).cluster
    assert (set_.sync_wait, set_.sync_unreachable_after, set_.sync_quiet_ms) == (60, 10, 500)
    assert not _config(tmp_path, **DMQ, sync_wait=0).cluster.gated
    assert not _config(tmp_path, db_url=DB).cluster.gated        # no DMQ: nothing to wait for


@pytest.mark.parametrize("bad, says", [
    ({"sync_wait": -1}, "sync_wait"),
    ({"sync_wait": 601}, "sync_wait"),
    ({"sync_wait": "30"}, "sync_wait"),
    ({"sync_quiet_ms": 50}, "sync_quiet_ms"),
    ({"sync_unreachable_after": 0}, "sync_unreachable_after"),
    ({"sync_wait": 5, "sync_unreachable_after": 6}, "the wait would end first"),
])
def test_sync_setting_mistakes_are_refused(tmp_path, bad, says):
    with pytest.raises(AppConfigError) as caught:
        _config(tmp_path, **DMQ, **bad)
    assert says in str(caught.value)


def test_the_cfg_has_the_gate_only_on_a_gated_node(tmp_path):
    text = render_cfg(_config(tmp_path, **DMQ), tmp_path)
    assert "#!define WITH_SYNC_GATE" in text
    assert 'modparam("htable", "htable", "e2msync=>size=4;")' in text   # local: no dmqreplicate
    assert "route=ksr_sync_timer" in text and '"e2m_sync_wait_refused"' in text
    assert 'modparam("dmq_usrloc", "batch_msg_contacts", 20)' in text
    off = render_cfg(_config(tmp_path, **DMQ, sync_wait=0), tmp_path)
    assert "#!define WITH_SYNC_GATE" not in off
    alone = render_cfg(_config(tmp_path, db_url=DB), tmp_path)
    assert "#!define WITH_SYNC_GATE" not in alone
