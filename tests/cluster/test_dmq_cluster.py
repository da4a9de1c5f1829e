"""Two home nodes of one domain on Kamailio DMQ and one PostgreSQL: any node takes any
message of a dialog, a node killed (SIGKILL) mid-call loses no call, registration or
archived message, a replicated key-cache entry that does not open is refused, KDMQ
is taken only from the peers, the counters move, and a dispatcher front keeps a call
going when its node dies.  The cluster and the phones: e2m_lab/cluster.py.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from e2m_lab.cluster import (REPLICATION, Alice, answers, captured_kdmq, contacts, counters,
                             dmq_port, forged_kdmq, htable_dump, register_bob,
                             start_cluster, stat, wait_dmq_up, wait_until)
from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, invite, ua_engine
from e2m_lab.kamailio_harness import SipUa
from e2m_plugins.sip import parse

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

_KDMQ_GIVE_UP = 5.5     # tm's fr_timer (5 s, the cfg template) and a margin


# --------------------------------------------------------------------------- tests

def test_offer_through_a_answer_through_b_reinvite_through_b_bye_drops_keys_everywhere(
        cluster, alice, bob):
    a, b = cluster.nodes
    register_bob(a, bob)
    wait_until(lambda: contacts(b, "bob"), REPLICATION, "bob's registration on B")
    replicated_b = stat(b, "e2m_ceks_replicated")

    bob.answer_to = b.port                         # the 200 comes back through B
    reply = alice.call(a)
    assert reply is not None and reply.status == 200, reply and reply.status
    assert alice.open(reply) == SDP_ANSWER
    (invited,) = bob.wait_for(1, method="INVITE")
    assert invited.body == alice.sent_bodies[0]    # byte-exact through A
    assert [r.plaintext for r in answers(b, alice.call_id)] == [SDP_ANSWER]
    assert "INVITE response 200 action=forward seen=application/sdp" in b.log_since(0)
    assert stat(b, "e2m_ceks_replicated") > replicated_b      # the key A kept
    alice.ack(b)

    again = alice.reinvite(b)
    assert again is not None and again.status == 200
    assert alice.open(again) == SDP_ANSWER
    offers = [r.plaintext for r in b.archive_rows()
              if r.call_id == alice.call_id and r.direction == "request"]
    assert offers == [SDP_OFFER, SDP_OFFER.replace(b"49170", b"49180")]

    assert max(n.htable_items() for n in cluster.nodes) > 0
    ended = alice.bye(a)
    assert ended is not None and ended.status == 200
    wait_until(lambda: all(n.htable_items() == 0 for n in cluster.nodes), REPLICATION,
               "the dialog's keys gone from both nodes")


def test_a_request_seen_by_a_is_a_replay_at_b(cluster, alice, bob):
    """The replay record is replicated: alice's INVITE, octet for octet, sent again
    through the other node (a new transaction) is refused there as a replay, and B
    counts the 403."""
    a, b = cluster.nodes
    register_bob(a, bob)
    assert alice.call(a).status == 200
    alice.ack(a)
    refused = stat(b, "e2m_refused_403")
    wait_until(lambda: htable_dump(b, "e2mseen"), REPLICATION, "the replay record on B")
    again = alice.transact(b, alice.last_invite)
    assert again is not None and again.status == 403, again and again.status
    assert stat(b, "e2m_refused_403") == refused + 1
    assert len(bob.wait_for(2, timeout=0.5, method="INVITE")) == 1   # it went no further


# --------------------------------------------------------------------------- split brain

def forged_entry(name: str, genuine: str, cluster_key: bytes) -> tuple[str, bytes]:
    """What a rogue DMQ peer would write under ``name``: the same scope and references
    as the genuine record, CEKs of its own choosing, sealed under its own key (it does
    not hold the domain's private key).  Returns the value and its first CEK."""
    import base64
    import os
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from dataclasses import replace
    from e2m_plugins.keycache import decode_scope_keys, encode_scope_keys
    data = base64.b64decode(genuine)
    plain = AESGCM(cluster_key).decrypt(data[:12], data[12:], name.encode()).decode()
    scope, kept = decode_scope_keys(plain)
    rogue = [(replace(entry, cek=os.urandom(len(entry.cek))), origin) for entry, origin in kept]
    nonce = os.urandom(12)
    sealed = AESGCM(AESGCM.generate_key(bit_length=256)).encrypt(
        nonce, encode_scope_keys(scope, rogue).encode(), name.encode())
    return base64.b64encode(nonce + sealed).decode(), rogue[0][0].cek


def test_split_brain_a_forged_replicated_key_entry_is_refused_not_used(cluster, alice, bob):
    """A rogue peer on the DMQ bus (here: node A's own management socket, whose writes
    DMQ replicates like any other) replaces the CEK kept for a call with one of its
    choosing before the answer reaches B.  B must not open the answer with it: the
    entry does not authenticate under the domain's seal, so B refuses and drops it,
    archives nothing of the answer, and passes the answer on untouched."""
    from e2m_plugins.config import load_proxy_config
    from kamailio_app.bootstrap import cluster_seal_key
    a, b = cluster.nodes
    register_bob(a, bob)
    wait_until(lambda: contacts(b, "bob"), REPLICATION, "bob's registration on B")
    key = cluster_seal_key(load_proxy_config(a.config_path))
    forged: dict[str, str] = {}

    def rogue_write() -> None:
        # called by bob's phone between the INVITE and its 200
        kept = htable_dump(a)          # one record per scope: the INVITE's early dialog
        assert kept, "A kept no key for the offer"
        for name, value in kept.items():
            forged[name], _ = forged_entry(name, value, key)
            a.rpc("htable.sets", "e2mkeys", name, forged[name])
        wait_until(lambda: all(htable_dump(b).get(n) == v for n, v in forged.items()),
                   REPLICATION, "the forged entries replicated to B")

    bob.before_answer = rogue_write
    bob.answer_to = b.port
    mark = b.log_mark()
    reply = alice.call(a)
    assert reply is not None and reply.status == 200
    assert alice.open(reply) == SDP_ANSWER                   # passed on untouched
    assert forged
    # (the launcher passes Kamailio's log on a moment after it was written)
    assert b.wait_log("does not open (forged, or sealed elsewhere): refused", mark), \
        b.log_since(mark)[-2000:]
    assert b.wait_log("INVITE response 200 action=forward seen=-", mark), b.log_since(mark)[-2000:]
    assert answers(b, alice.call_id) == []                   # nothing read with it
    assert all(htable_dump(b).get(n) is None for n in forged)   # and it is gone


def test_kdmq_from_a_stranger_is_refused_and_changes_nothing(cluster, tmp_path):
    """KDMQ is taken only from a configured peer's DMQ socket.  A genuine htable
    replication from A to B is captured on the wire and sent again by a stranger
    (another socket), renamed: B answers 403 and its table does not change."""
    try:
        genuine = captured_kdmq(cluster, tmp_path / "dmq.pcap")
    except LookupError as exc:
        pytest.skip(str(exc))
    b = cluster.b
    dmq_b = dmq_port(b)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    stranger.settimeout(3)
    via = f"Via: SIP/2.0/UDP 127.0.0.1:{stranger.getsockname()[1]};rport;branch=z9hG4bK-x1"
    replay = forged_kdmq(genuine, b"probe-strngr", via)
    mark = b.log_mark()
    try:
        stranger.sendto(replay, ("127.0.0.1", int(dmq_b)))
        answer_ = parse(stranger.recv(65535))
    finally:
        stranger.close()
    assert answer_.status == 403
    assert b.wait_log("not a [cluster] peer: refused", mark)
    time.sleep(0.5)
    assert "probe-strngr" not in htable_dump(b, "e2mseen")


def test_the_harness_restarts_a_node_its_peer_does_not_list_as_active(cluster, monkeypatch):
    """The cluster fixture's own guard (a loaded CI run once waited 30 s for DMQ): a
    408 to B's start-up notification leaves A "pending" on B until the next ping, 60 s
    on, and nothing the harness can ask of DMQ sets that state.  So B's view is made to
    read so (the list B shows is faked as missing A until A starts again); the wait
    restarts A, and the real lists of both nodes then hold each other."""
    from e2m_lab import cluster as harness
    a, b = cluster.nodes
    real = harness.dmq_peer_lists
    pid = a.launcher._kamailio_pid()
    monkeypatch.setattr(harness, "dmq_peer_lists", lambda node, peer: real(node, peer) and not (
        node is b and peer is a and a.launcher._kamailio_pid() == pid))
    waited = wait_dmq_up(cluster.nodes, restart_after=1.0)
    assert a.launcher._kamailio_pid() != pid and waited >= 1.0
    assert real(b, a) and real(a, b)


# --------------------------------------------------------------------------- a node dies

def test_node_killed_mid_call_b_carries_the_call_registrations_and_archive_then_a_catches_up(
        cluster, alice, bob, pki):
    a, b = cluster.nodes
    register_bob(a, bob)
    carol = SipUa(a.port, user="carol")
    try:
        assert carol.register().status == 200                  # made on A
    finally:
        carol.close()
    wait_until(lambda: contacts(b, "bob") and contacts(b, "carol"), REPLICATION,
               "A's registrations on B")
    reply = alice.call(a)                                      # all through A
    assert reply is not None and reply.status == 200 and alice.open(reply) == SDP_ANSWER
    alice.ack(a)
    before = [(r.direction, r.plaintext) for r in a.archive_rows() if r.call_id == alice.call_id]
    assert before == [("request", SDP_OFFER), ("response", SDP_ANSWER)]
    wait_until(lambda: b.htable_items() > 0, REPLICATION, "the call's keys on B")

    a.kill()                                                   # SIGKILL, mid-call
    assert not a.alive() and a.options(timeout=0.3) is None

    again = alice.reinvite(b)                                  # the dialog goes on via B
    assert again is not None and again.status == 200, again and again.status
    assert alice.open(again) == SDP_ANSWER
    ringing = SipUa(b.port, user="dave")
    try:                                                       # registered on A, served by B
        to_bob = ringing.message("bob", b"plain hello")
        assert to_bob is not None and to_bob.status == 200
    finally:
        ringing.close()
    assert [m.body for m in bob.received if m.method == "MESSAGE"] == [b"plain hello"]
    assert contacts(b, "carol")                                # still there on B
    ended = alice.bye(b)
    assert ended is not None and ended.status == 200
    wait_until(lambda: b.htable_items() == 0, REPLICATION, "the keys gone from B")
    # B's KDMQ to the dead A (the first call's keys set, then dropped) is retransmitted
    # by tm until its fr_timer (5 s) ends: a copy of a set that reaches A after its
    # sync and after the last copy of the drop leaves A a stale key of an ended call
    # (known limit, kamailio_app/README.md).  A comes back once those have ended.
    changes_end = time.monotonic() + _KDMQ_GIVE_UP
    rows = [(r.direction, r.plaintext) for r in b.archive_rows() if r.call_id == alice.call_id]
    moved = SDP_OFFER.replace(b"49170", b"49180")
    assert rows == before + [("request", moved), ("response", SDP_ANSWER)]   # nothing lost

    # a call set up on B while A is down, still up when A comes back
    second = Alice(pki)
    try:
        assert second.call(b).status == 200
        second.ack(b)
        time.sleep(max(0.0, changes_end - time.monotonic()))
        assert a.start(), a.log_since(0)[-2000:]
        caught_up = wait_until(lambda: contacts(a, "bob") and contacts(a, "carol")
                               and a.htable_items() == b.htable_items() > 0, 5,
                               "A caught up with B (DMQ sync)")
        print(f"\nA restarted: caught up {caught_up:.2f} s after it answered OPTIONS")
        again = second.reinvite(a)                             # with the key B kept
        assert again is not None and again.status == 200 and second.open(again) == SDP_ANSWER
        assert second.bye(a).status == 200
        wait_until(lambda: a.htable_items() == b.htable_items() == 0, REPLICATION,
                   "the second call's keys gone from both")
    finally:
        second.close()


# --------------------------------------------------------------------------- counters

def test_counters_per_node_move_opened_refused_kept_replicated_expired_peers(
        proxy_factory, pg_url, alice, bob, pki):
    """kamcmd stats.get_statistics: what each node opened, refused (by code), kept,
    used from the other node, saw expire; and its DMQ peers up (1 each here, 0 on B
    once A is gone: within [cluster] dmq_ping_interval, a missed ping's 5 s and the
    counter's 5 s)."""
    cluster = start_cluster(proxy_factory, pg_url, kamailio={"keycache_expire": 10},
                            cluster={"dmq_ping_interval": 5})
    a, b = cluster.nodes
    # the counter is set every 5 s (kemi ksr_cluster_timer); start_cluster waits for
    # DMQ's own view of the peers
    wait_until(lambda: all(counters(n)["e2m_dmq_peers_up"] == 1 for n in cluster.nodes), 15,
               "e2m_dmq_peers_up set on both nodes")
    start = {n.name: counters(n) for n in cluster.nodes}
    register_bob(a, bob)
    wait_until(lambda: contacts(b, "bob"), REPLICATION, "bob's registration on B")

    stranger = ua_engine(pki, "alice")                    # does not know the proxy: 496
    refused = SipUa(a.port).transact(stranger.protect(invite(pki)).message)
    assert refused is not None and refused.status == 496
    garbage = invite(pki, b"\x30\x80 not DER").replace(
        "Content-Type", 'application/pkcs7-mime; smime-type=enveloped-data')
    bad = SipUa(a.port).transact(garbage)
    assert bad is not None and bad.status == 400

    bob.answer_to = b.port
    assert alice.call(a).status == 200                     # offer at A, answer at B
    moved = {n.name: {k: v - start[n.name].get(k, 0) for k, v in counters(n).items()}
             for n in cluster.nodes}
    print(f"\ncounters moved: {moved}")
    assert moved["node-a"]["e2m_refused_496"] == 1 and moved["node-a"]["e2m_refused_400"] == 1
    assert moved["node-a"]["e2m_bodies_opened"] == 1 and moved["node-b"]["e2m_bodies_opened"] == 1
    assert moved["node-a"]["e2m_ceks_kept"] >= 1 and moved["node-b"]["e2m_ceks_replicated"] >= 1
    assert moved["node-b"]["e2m_refused_496"] == 0

    # no BYE: the call's keys run out (keycache_expire 10 s) on each node by itself
    wait_until(lambda: all(counters(n)["e2m_ceks_expired"] > start[n.name]["e2m_ceks_expired"]
                           for n in cluster.nodes), 30, "expired keys counted on both")
    a.kill()
    wait_until(lambda: counters(b)["e2m_dmq_peers_up"] == 0, 30, "B sees A gone")


# --------------------------------------------------------------------------- a front

def test_dispatcher_front_balances_probes_and_a_call_survives_its_node(cluster, proxy_factory,
                                                                      alice, bob):
    """Phones talk to a front (Kamailio's dispatcher, [dispatcher]): it picks a node per
    Call-ID, probes both with OPTIONS, and once the node carrying a call is killed
    (SIGKILL) sends the call's re-INVITE and BYE to the other one."""
    a, b = cluster.nodes
    front = proxy_factory("front", e2m=False, archive=False,
                          extra={"dispatcher": {"destinations": [a.uri, b.uri],
                                                "probe_interval": 1}})
    listed = front.rpc("dispatcher.list")
    assert a.uri in listed and b.uri in listed
    register_bob(front, bob)
    wait_until(lambda: contacts(a, "bob") and contacts(b, "bob"), REPLICATION,
               "bob's registration (made through the front) on both nodes")
    reply = alice.call(front)
    assert reply is not None and reply.status == 200 and alice.open(reply) == SDP_ANSWER
    alice.ack(front)
    carrier, other = (a, b) if alice.call_id in a.log_since(0) else (b, a)
    assert alice.call_id not in other.log_since(0)
    assert answers(carrier, alice.call_id)                     # the node read the answer

    carrier.kill()
    wait_until(lambda: re.search(rf"URI: {re.escape(carrier.uri)}\s+FLAGS: I",
                                 front.rpc("dispatcher.list")), 10,
               "the front took the dead node out")
    again = alice.reinvite(front)
    assert again is not None and again.status == 200 and alice.open(again) == SDP_ANSWER
    assert alice.call_id in other.log_since(0)                 # the other node took it
    ended = alice.bye(front)
    assert ended is not None and ended.status == 200
    wait_until(lambda: other.htable_items() == 0, REPLICATION, "the keys gone")


def test_dispatcher_front_fails_over_before_a_probe_notices(cluster, proxy_factory, alice, bob):
    """The node carrying a call dies between two probes: the front's next request of
    the call goes to it, gets no answer, and the failure route marks it down and sends
    the request to the other node (ds_mark_dst, ds_next_dst)."""
    a, b = cluster.nodes
    front = proxy_factory("front", e2m=False, archive=False,
                          extra={"dispatcher": {"destinations": [a.uri, b.uri],
                                                "probe_interval": 600}})
    register_bob(front, bob)
    wait_until(lambda: contacts(a, "bob") and contacts(b, "bob"), REPLICATION,
               "bob's registration on both nodes")
    assert alice.call(front).status == 200
    alice.ack(front)
    carrier, other = (a, b) if alice.call_id in a.log_since(0) else (b, a)
    wait_until(lambda: other.htable_items() > 0, REPLICATION, "the call's keys on the other")
    carrier.kill()
    started = time.monotonic()
    again = alice.reinvite(front)
    took = time.monotonic() - started
    assert again is not None and again.status == 200 and alice.open(again) == SDP_ANSWER
    print(f"\nfailover: the re-INVITE answered {took:.1f} s after it was sent")
    assert re.search(rf"URI: {re.escape(carrier.uri)}\s+FLAGS: I", front.rpc("dispatcher.list"))
    ended = alice.bye(front)                                   # straight to the live node
    assert ended is not None and ended.status == 200
