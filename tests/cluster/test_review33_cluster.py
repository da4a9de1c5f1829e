"""Review 33 on a real two-node cluster (PostgreSQL, DMQ): a stray answer (no
transaction on the node that reads it) is archived under its own To.

Review 32 made an answer's row name whom the request was sent to, kept with the
transaction (``$avp(e2m_callee)``).  A node of a cluster also reads responses that
match no transaction of its own (``kemi.route_stray_reply``: a reply to a request
another node sent, brought by the front or the floating address), and there no AVP is
set: ``observe`` passes no responder and ``body_records`` falls back to the answer's own
To, which whoever answers writes: review 32's fourth hole, still open on that path, and
for anyone at all, since a stray reply needs no request.

The holes were strict xfails on ``cb85899`` and are closed (``f2734f1``): the responder
is the Request-URI as received (or the next hop of a Route set past us), both rows keep
where the request went, and a stray unsigned answer names no sender.
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.cluster import ADVERTISE

pytestmark = [pytest.mark.kamailio, pytest.mark.postgres]

_SDP = (b"v=0\r\no=- 1 1 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\n"
        b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def stray_answer(node, *, to_uri: str, tag: str, from_uri: str = "sip:alice@example.com",
                 wait: float = 0.5) -> None:
    """An off-path stranger's forged 183 to an INVITE (a plaintext SDP answer), Via the
    cluster's floating address, sent straight to ``node``: no request ever went out.
    Its Call-ID is ``r33-stray-<tag>@example.com``."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(wait)
    port = sink.getsockname()[1]
    # a 183 without a To tag (stop 34): a stray 2xx to an INVITE without our Record-Route
    # entry is dropped before it is read, and since stop 35 a 1xx with a To tag (an early
    # dialog) too; a provisional answer that makes no dialog is still read and archived
    head = (f"SIP/2.0 183 Session Progress\r\n"
            f"Via: SIP/2.0/UDP {ADVERTISE};branch=z9hG4bK-r33stray{tag}\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-r33orig{tag}\r\n"
            f"From: <{from_uri}>;tag=a{tag}\r\n"
            f"To: <{to_uri}>\r\n"
            f"Call-ID: r33-stray-{tag}@example.com\r\n"
            f"CSeq: 1 INVITE\r\n"
            f"Contact: <sip:x@192.0.2.9>\r\n"
            f"Content-Type: application/sdp\r\n"
            f"Content-Length: {len(_SDP)}\r\n\r\n").encode("ascii")
    try:
        sink.sendto(head + _SDP, ("127.0.0.1", node.port))
        try:
            sink.recv(65535)
        except OSError:
            pass
    finally:
        sink.close()


def _rows_for(node, call_id: str, wait: float = 5.0):
    deadline = time.monotonic() + wait
    while True:
        rows = [r for r in node.archive_rows() if r.call_id == call_id]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_control_a_stray_answer_is_still_archived_but_names_no_sender(cluster):
    """A stray answer (no transaction on this node) is still read and archived; with the
    fix its unsigned body names nobody as its sender, whatever its To says (before, it
    named the To: this control asserted eve)."""
    stray_answer(cluster.a, to_uri="sip:eve@rival.example", tag="c1")
    rows = _rows_for(cluster.a, "r33-stray-c1@example.com")
    assert [(r.direction, r.from_uri) for r in rows] == [("response", None)]


def test_hole_a_strangers_stray_answer_is_archived_as_one_of_our_users(cluster):
    """Attacker: an off-path stranger (no account, no certificate, no call), who can
    reach a node of a cluster (``[cluster] advertise`` or ``front``).

    Attack: one UDP datagram to a node: a "200 OK" to an INVITE whose top Via is the
    cluster's floating address (any branch), ``From: alice``, ``To: carol``, a plaintext
    SDP answer.  It matches no transaction, so ``ksr_reply_route`` hands it to
    ``route_stray_reply``, which reads and archives it as a reply to another node's
    request.

    Effect: a response row ``carol -> alice`` (signature ``none``) with its media row,
    in the shared archive: "carol answered alice's call" for a call that never was.
    ``observe`` finds no ``$avp(e2m_callee)`` (no transaction) and ``body_records``
    falls back to the answer's own To: review 32's fix covers only replies to this
    node's own transactions.  The same happens to a real answer to another node's
    request (node A's INVITE, the 200 brought to B by the floating address): archived
    under whatever To its sender wrote.

    Fix: replicate whom the request was sent to with the keys (the key record the
    other node kept, keyed by the Via branch / transaction), and archive a stray
    answer for which nothing was kept with no user's name (``from_uri`` NULL or
    "unknown responder"), or not at all; a node should read only stray replies whose
    branch one of its peers recorded."""
    stray_answer(cluster.a, to_uri="sip:carol@example.com", tag="h1")
    rows = _rows_for(cluster.a, "r33-stray-h1@example.com")
    assert rows, "nothing archived (the control shows a stray answer is)"
    assert all(r.from_uri != "sip:carol@example.com" for r in rows), \
        [(r.direction, r.from_uri, r.to_uri, r.signature) for r in rows]
