"""A seventy-second attacker's review (December 2026) of 06451c8: this stop's latest fixes
attacked; here the dispatcher front's reply filter (``kemi.from_a_node``).

Hole 1 (``test_hole_an_answer_forged_from_a_nodes_udp_source_is_relayed_unread``)

Attacker: an insider UA (bob, the callee), or an untrusted hop on his side, that can
write a UDP datagram's source address and port (no BCP 38 filter between him and the
front; the threat model already counts a forged UDP source as the off-path sender's
tool, review 40's forged DMQ peer).

Messages: alice's encrypted INVITE through the front to node X; bob answers node X with
a 180, and sends his 200 (SDP answer sealed under the offer's CEK) straight to the
front with node X's Via taken off, in a UDP datagram whose source is a node's SIP
address and port (node A's 127.0.0.1:<port>, whichever node relayed; written with a raw
socket).

Effect: review 71's fix asks ``ds_is_from_list(1)``, which matches the source address,
port and protocol against set 1: a UDP datagram carries whatever source its sender
wrote, so the forged 200 is "from a node".  The front's tm matches its own branch and
relays it to alice unread (seen: alice's INVITE 200, her engine opens bob's SDP
answer, no node logs an INVITE response 200, no archived answer row): she takes it, the archive has
no response row for the call (and the firewall never saw its media lines).  Review
71's hole 2, back with one forged header field.
At fault: ``kamailio_app/kemi.py`` ``from_a_node``: ``if
KSR.dispatcher.ds_is_from_list(1) > 0: return True`` - a source address (UDP) proves
nothing; the same code's own comment in ``may_route_onward`` says so.
Fix: take replies from the nodes only over a transport whose source cannot be written
(TCP/TLS between front and nodes; drop any UDP reply at the front), or have each node
stamp what it forwards (a header with an HMAC of the Call-ID, CSeq and the front's
branch under the cluster's route-token key) that the front checks and removes; a
reply the front's branch names but no node stamped is dropped.

Controls: the same raw-socket 200 sent from bob's own address is dropped by the front
("not a node of ours"), so the datagram is well formed and reaches the front's reply
route; bob's 200 through the node is read and archived (review 71's control, kept).

Tried and held (read, not run unless said):
- ``ds_is_from_list(1)`` with no mode matches address, port *and* protocol: the nodes
  answer the front from the socket the front sent to (UDP here; over TCP the reply
  rides the front's own connection, whose remote port is the node's listener), the
  front's OPTIONS probes' replies come from there too, and a node that is down or
  probing is still in set 1 (the match reads the list, not the state): no legitimate
  reply is dropped in this set-up.
- A request a callee sends straight to the front (BYE, re-INVITE, NOTIFY, MESSAGE in
  a dialog, or a request with a body): the front never answers or relays a request
  itself, it dispatches it to a node, which reads it (route token, engine): review 71's
  tried row.
- ``front_counts_registration``: the pair key is ``identity_of(To)`` (user unescaped,
  case kept, host folded) and the nodes' AoR is the unescaped user as written
  (``use_domain 0``, ``case_sensitive 1``): every spelling the nodes take as one AoR
  is one pair or more at the front (host, password and parameter spellings over-count,
  never under-count), so the count is not evaded by spelling; a second To is refused
  before (sanity); several Contacts are one AoR.

Not fixed (stop 32): the front trusts a node's UDP address and port as a node trusts
a DMQ peer's (review 40); the test stays a strict xfail as a known limit
(docs/threat-model.md, Known limits: keep the nodes and the front where outsiders
cannot forge a source, or over TCP/TLS).
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from e2m_lab.cluster import REPLICATION, answers, contacts, register_bob, wait_until
from e2m_lab.flows import SDP_ANSWER
from e2m_plugins.sip import make_response

from tests.cluster.test_review71_cluster import _front, _SkippingBob

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="a raw socket needs root")]


def _spoofed_udp(payload: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
    """One UDP datagram with the source address and port ``src`` (IP_HDRINCL)."""
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload   # no checksum
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP,
                     0, socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        raw.sendto(ip + udp, dst)
    finally:
        raw.close()


class _ForgingBob(_SkippingBob):
    """bob, whose 200 past the node goes to the front from a source he writes: the
    relaying node's SIP address and port (``as_node``), or his own."""

    def __init__(self, pki) -> None:
        super().__init__(pki)
        self.as_node = True
        self.node_port: int | None = None   # a node's SIP port (set 1): any node will do

    def _respond(self, request):
        if request.method != "INVITE" or self.skip_to is None or request.to_tag is not None:
            return self._answer(request)
        top = request.get_all("Via")[0]
        trimmed = request.remove("Via", where=lambda value: value == top)
        answer = self._answer(trimmed)
        source = ("127.0.0.1", self.node_port if self.as_node else self.port)
        _spoofed_udp(answer.serialize(), source, ("127.0.0.1", self.skip_to))
        return make_response(request, 180, "Ringing").replace("To", answer.get("To") or "")


@pytest.fixture
def fbob(pki):
    phone = _ForgingBob(pki)
    yield phone
    phone.close()


def _call_with_forged_answer(cluster, proxy_factory, alice, fbob, as_node: bool):
    a, b = cluster.nodes
    front = _front(proxy_factory, cluster)
    register_bob(front, fbob)
    wait_until(lambda: contacts(a, "bob") and contacts(b, "bob"), REPLICATION,
               "bob's registration on both nodes")
    fbob.skip_to, fbob.as_node, fbob.node_port = front.port, as_node, a.port
    reply = alice.call(front)
    return front, reply


def test_control_a_raw_answer_from_bobs_own_address_is_dropped_by_the_front(
        cluster, proxy_factory, alice, fbob):
    front, reply = _call_with_forged_answer(cluster, proxy_factory, alice, fbob,
                                            as_node=False)
    assert reply is None or reply.status != 200, reply and reply.status
    wait_until(lambda: "not a node of ours: dropped" in front.log_since(0), 3,
               "the front's drop of bob's raw 200")


@pytest.mark.xfail(strict=True, reason="known limit (docs/threat-model.md): the front "
                   "trusts a node's UDP address and port, as nodes trust a DMQ peer's (review "
                   "72): a forged node source passes its reply filter")
def test_hole_an_answer_forged_from_a_nodes_udp_source_is_relayed_unread(
        cluster, proxy_factory, alice, fbob):
    front, reply = _call_with_forged_answer(cluster, proxy_factory, alice, fbob,
                                            as_node=True)
    a, _ = cluster.nodes
    took = reply is not None and reply.status == 200
    if took:
        print(f"\nalice took the forged 200: SDP answer {alice.open(reply) == SDP_ANSWER}")
        time.sleep(2.0)
    read = [n.name for n in cluster.nodes if "INVITE response 200" in n.log_since(0)]
    print(f"\nalice's INVITE: {reply and reply.status}; nodes that read a 200: {read}; "
          f"archived answers: {len(answers(a, alice.call_id))}")
    assert not took or answers(a, alice.call_id), \
        "alice took bob's SDP answer from the front; no node read it, the archive has no row"
