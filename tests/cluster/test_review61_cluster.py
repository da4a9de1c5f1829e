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

Tried and held: the same copy sent again to node A is stored once (control); a copy
sent to B again and again is stored once more only (B's uid is stable).
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.cluster import (REPLICATION, Bob, answers, contacts, register_bob,
                             wait_until)
from e2m_lab.flows import SDP_ANSWER

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


@pytest.mark.xfail(strict=True, reason="review 61: untrusted hop/insider callee, a copy of "
                   "bob's 200 sent to the other node is archived a second time")
def test_hole_a_copy_of_bobs_answer_at_the_other_node_is_archived_twice(cluster, alice, rbob):
    a, b = cluster.nodes
    wire = _call_through_a(cluster, alice, rbob)
    _copy_to(b, rbob, wire, "INVITE response 200", count=3)
    assert "INVITE response 200" in b.log_since(0)       # B did read the copy
    rows = answers(a, alice.call_id)
    assert len(rows) == 1, [(r.from_uri, r.request_uri, r.message_uid) for r in rows]
