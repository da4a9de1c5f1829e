"""A sixty-first attacker's review (December 2026) of 55dfdaa: the archive and the
cluster (real Kamailio, real PostgreSQL), on a two-node cluster.

Hole 1 (``test_hole_a_copy_of_bobs_answer_at_the_other_node_is_archived_twice``)

Attacker: the untrusted hop between bob and the domain (or bob, an insider callee),
who sees bob's 200 go to node A.

Messages: alice's INVITE through node A; bob's signed, encrypted 200 back through A
(archived once); then the very same datagram, byte for byte, sent to node B (a
retransmission that reaches the other holder of the floating address, or a hop's
copy).

Effect: node B matches no transaction, reads the copy as a stray reply
(``route_stray_reply``), and archives it again: the shared archive holds two response
rows for one answer.  ``content_uid`` digests every recorded field, and the copy at B
has no ``request_uri`` (no transaction AVP) where A's row has the Request-URI as
received, so the two copies get two uids.  docs/threat-model.md promises "copies of
one message share one message_uid ..., so it is stored once on any worker or node".

The same at the *same* node (``test_hole_a_late_copy_of_bobs_answer_at_the_same_node_
is_archived_twice``): once tm's transaction is gone (its wait timer, ~5 s after the 2xx),
a copy of bob's 200 sent to node A again is a stray there too and gets a second row.
bob's own phone does this when the ACK is lost (a 2xx is retransmitted for 32 s), so an
untrusted hop that drops alice's ACK doubles the row with no copy of its own.

Tried and held: the same copy sent again to node A within the transaction is stored
once (control); a copy sent to B again and again is stored once more only (B's uid is
stable); an insider callee's 200 sent only to B right after the INVITE (before DMQ could
carry the offer's key) was read there in 20 of 20 calls (DMQ won the race).

Hole 2 (``test_hole_a_strangers_stray_answers_lose_alices_answer_at_the_other_node``)

Attacker: an off-path stranger (no account, no call) who can reach a node, during an
outage of the shared database.

Messages: six plaintext "200 OK"s to INVITEs nobody sent (each its own Call-ID, top
Via the cluster's floating address) to node B; then alice calls bob through node A
and bob's answer reaches B (the floating address moved there: ``Bob.answer_to``).

Effect: a stray reply has no transaction, so ``observe`` charges it to
``answer_share(None)`` = "answers to <the unauthenticated group>", the share the
stranger's six datagrams filled (``spool_share`` 12 % of ``spool_max`` 50): bob's
answer to alice's (signed, bound) call is "lost ... over its share of the spool" and
never reaches the archive once the database is back.  At node A the same answer
would be charged to "answers to alice" (her own share, which no stranger can touch).

Tried and held: without the strangers' datagrams bob's answer through B is spooled and
replayed (control).

Hole 3 (``test_hole_strict_archiving_relays_an_acks_sdp_it_could_not_archive``)

Attacker: an insider UA (alice) on a proxy set up with ``[archive]
fail_request_on_error = true`` ("a request must not go on unarchived"), while the
shared database is away (an outage, or a frozen server).

Messages: alice's call to bob (answered while the database is up); then the database
is away and alice's in-dialog ACK carries an SDP (the session's answer in a late-offer
call, or a new media description) that the proxy views.

Effect: the ACK is relayed to bob and its SDP is archived nowhere, not even spooled:
``kemi.inspect_only`` lets ``observe`` fail (strict: ``may_spool=False``), the 500
cannot be sent for an ACK, and the ACK is relayed all the same.  On a proxy without
strict archiving the same ACK is spooled and replayed (control), so the operator who
asked for the stricter mode loses the body that the lax mode keeps.

Tried and held: the ACK's SDP is archived while the database is up (control).

Fixed (stop 31): a response's uid leaves out its sender and Request-URI, which only
the node holding the transaction knows, so every copy of one answer (another node, a
late copy) is one row; a stray reply is charged to its bound signer's answers, not to
the unauthenticated share; with ``fail_request_on_error`` an ACK (or CANCEL), which
cannot be answered 500, is spooled like a response (``ProxyApp.archiving_blocks``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2m_lab.cluster import (REPLICATION, Bob, Cluster, _node_settings, answers,
                             contacts, wait_dmq_up, register_bob, wait_until)
from kamailio_app.archive import SqliteArchive
from e2m_lab.flows import SDP_ANSWER
from tests.cluster.test_review33_cluster import _SDP, stray_answer

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]


class _RecordingBob(Bob):
    """bob, keeping the bytes of every 200 to an INVITE he sends."""

    def __init__(self, pki) -> None:
        super().__init__(pki)
        self.answers: list[bytes] = []

    def _respond(self, request):
        reply = super()._respond(request)
        if request.method == "INVITE" and reply is not None and getattr(reply, "status", 0) == 200:
            self.answers.append(reply.serialize())
        return reply


@pytest.fixture
def rbob(pki):
    phone = _RecordingBob(pki)
    yield phone
    phone.close()


def _call_through_a(cluster, alice, rbob) -> bytes:
    a, b = cluster.nodes
    register_bob(a, rbob)
    wait_until(lambda: contacts(b, "bob"), REPLICATION, "bob's registration on B")
    reply = alice.call(a)
    assert reply is not None and reply.status == 200, reply and reply.status
    assert alice.open(reply) == SDP_ANSWER
    alice.ack(a)
    (wire,) = rbob.answers
    wait_until(lambda: len(answers(a, alice.call_id)) == 1, 5, "bob's answer archived")
    return wire


def _copy_to(node, rbob, wire: bytes, marker: str, count: int = 1) -> None:
    before = node.log_since(0).count(marker)
    for _ in range(count):
        rbob.sock.sendto(wire, ("127.0.0.1", node.port))
    deadline = time.monotonic() + 5
    while node.log_since(0).count(marker) < before + count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)


def test_control_a_copy_of_bobs_answer_at_the_same_node_is_archived_once(cluster, alice, rbob):
    a, _ = cluster.nodes
    wire = _call_through_a(cluster, alice, rbob)
    _copy_to(a, rbob, wire, "INVITE response 200", count=3)
    rows = answers(a, alice.call_id)
    assert [r.sha256 for r in rows] == [rows[0].sha256] and len(rows) == 1
    assert rows[0].from_uri == "sip:bob@example.com"


def test_hole_a_copy_of_bobs_answer_at_the_other_node_is_archived_twice(cluster, alice, rbob):
    a, b = cluster.nodes
    wire = _call_through_a(cluster, alice, rbob)
    _copy_to(b, rbob, wire, "INVITE response 200", count=3)
    assert "INVITE response 200" in b.log_since(0)       # B did read the copy
    rows = answers(a, alice.call_id)
    assert len(rows) == 1, [(r.from_uri, r.request_uri, r.message_uid) for r in rows]


def test_hole_a_late_copy_of_bobs_answer_at_the_same_node_is_archived_twice(cluster, alice,
                                                                            rbob):
    a, _ = cluster.nodes
    wire = _call_through_a(cluster, alice, rbob)
    time.sleep(6.5)                      # tm's wait timer: the transaction is gone
    _copy_to(a, rbob, wire, "INVITE response 200")
    rows = answers(a, alice.call_id)
    assert len(rows) == 1, [(r.from_uri, r.request_uri, r.message_uid) for r in rows]


# --------------------------------------------------------------------------- hole 2

SPOOL_MAX = 50          # the default share of 12 %: six messages a sender


def _spooling_cluster(proxy_factory, db_url: str) -> Cluster:
    """``start_cluster`` with ``[archive] spool_max`` on both nodes."""
    from e2m_lab.ports import free_port
    first = free_port()
    dmq_a, dmq_b = first, free_port(avoid={first})
    settings = [_node_settings(db_url, dmq_a, dmq_b, None),
                _node_settings(db_url, dmq_b, dmq_a, None)]
    for one in settings:
        one["extra"]["archive"] = {"spool_max": SPOOL_MAX}
    with ThreadPoolExecutor(max_workers=2) as pool:
        started_a = pool.submit(proxy_factory, "node-a", **settings[0])
        started_b = pool.submit(proxy_factory, "node-b", **settings[1])
        nodes = Cluster(started_a.result(), started_b.result())
    wait_dmq_up(nodes.nodes)
    return nodes


def _pending(node) -> int:
    return SqliteArchive(node.directory / "archive-spool.sqlite").pending()


def _call_answered_through_b_during_an_outage(proxy_factory, own_postgres, alice, bob,
                                              strays: int):
    nodes = _spooling_cluster(proxy_factory, own_postgres.url)
    a, b = nodes.nodes
    register_bob(a, bob)
    wait_until(lambda: contacts(b, "bob"), REPLICATION, "bob's registration on B")
    own_postgres.kill()
    for n in range(strays):
        stray_answer(b, to_uri="sip:nobody@stranger.example", tag=f"r61s{n}",
                         from_uri="sip:mallory@stranger.example", wait=0.3)
    if strays:
        wait_until(lambda: b.log_since(0).count("e2m: archive lost") >= strays - 6
                   or _pending(b) >= 6, 5, "the strays spooled")
    bob.answer_to = b.port                        # the 200 comes back through B
    reply = alice.call(a)
    assert reply is not None and reply.status == 200, reply and reply.status
    assert alice.open(reply) == SDP_ANSWER        # alice's call works
    alice.ack(b)
    time.sleep(1.0)
    own_postgres.start()
    time.sleep(0.5)
    for node in nodes.nodes:
        wait_until(lambda node=node: _pending(node) == 0, 30, "spool replayed")
    return nodes


@pytest.mark.slow
def test_control_an_answer_through_the_other_node_is_spooled_and_replayed(
        proxy_factory, own_postgres, alice, bob):
    nodes = _call_answered_through_b_during_an_outage(proxy_factory, own_postgres, alice,
                                                      bob, strays=0)
    a, _ = nodes.nodes
    assert [r.plaintext for r in answers(a, alice.call_id)] == [SDP_ANSWER]


@pytest.mark.slow
def test_hole_a_strangers_stray_answers_lose_alices_answer_at_the_other_node(
        proxy_factory, own_postgres, alice, bob):
    nodes = _call_answered_through_b_during_an_outage(proxy_factory, own_postgres, alice,
                                                      bob, strays=8)
    a, b = nodes.nodes
    assert "over its share of the spool" in b.log_since(0)      # the strays filled it
    assert [r.plaintext for r in answers(a, alice.call_id)] == [SDP_ANSWER], \
        [line[line.find("e2m: archive"):] for line in b.log_since(0).splitlines()
         if alice.call_id in line and "e2m: archive" in line]


# --------------------------------------------------------------------------- hole 3

_ACK_SDP = _SDP.replace(b"40000", b"41234")


def _ack_with_sdp_during_an_outage(proxy_factory, own_postgres, alice, bob, *, strict: bool,
                                   outage: bool = True):
    from e2m_lab.cluster import VIEW
    home = proxy_factory("home", db_url=own_postgres.url, view=VIEW,
                         fail_request_on_error=strict)
    register_bob(home, bob)
    reply = alice.call(home)
    assert reply is not None and reply.status == 200, reply and reply.status
    alice.ack(home)
    if outage:
        own_postgres.kill()
    ack = alice._in_dialog("ACK", _ACK_SDP, cseq=alice.cseq).replace("Via", alice._via())
    alice.sock.sendto(ack.serialize(), ("127.0.0.1", home.port))
    wait_until(lambda: [m for m in bob.received if m.method == "ACK" and m.body], 5,
               "the ACK with its SDP at bob")
    time.sleep(1.0)
    if outage:
        own_postgres.start()
        time.sleep(0.5)
        wait_until(lambda: _pending(home) == 0, 30, "spool replayed")
        time.sleep(0.5)
    return home


def _ack_rows(home, call_id: str):
    return [r for r in home.archive_rows() if r.call_id == call_id and r.method == "ACK"]


def test_control_an_acks_sdp_is_archived_while_the_database_is_up(proxy_factory, own_postgres,
                                                                  alice, bob):
    home = _ack_with_sdp_during_an_outage(proxy_factory, own_postgres, alice, bob,
                                          strict=True, outage=False)
    assert [r.plaintext for r in _ack_rows(home, alice.call_id)] == [_ACK_SDP]


@pytest.mark.slow
def test_control_without_strict_archiving_the_acks_sdp_is_spooled_and_replayed(
        proxy_factory, own_postgres, alice, bob):
    home = _ack_with_sdp_during_an_outage(proxy_factory, own_postgres, alice, bob,
                                          strict=False)
    assert [r.plaintext for r in _ack_rows(home, alice.call_id)] == [_ACK_SDP]


@pytest.mark.slow
def test_hole_strict_archiving_relays_an_acks_sdp_it_could_not_archive(
        proxy_factory, own_postgres, alice, bob):
    home = _ack_with_sdp_during_an_outage(proxy_factory, own_postgres, alice, bob,
                                          strict=True)
    # bob got it (the helper waited for it): the archive must have it too
    assert [r.plaintext for r in _ack_rows(home, alice.call_id)] == [_ACK_SDP], \
        [line[line.find("e2m:"):] for line in home.log_since(0).splitlines()
         if "ACK" in line and "e2m:" in line][-4:]
