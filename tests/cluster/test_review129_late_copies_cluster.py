"""Review 129 (attacker's review of 4129b80), cluster: stop 42's answer memory
(``e2manswered``, replicated by DMQ like the replay records; the replay check itself a
claim in the shared PostgreSQL) when a protected request's late copy reaches the other
node.  No hole found here.

Control (unmarked, passes): alice's signed MESSAGE through node A, bob (registered at
both nodes) answers 200; once DMQ carried the answer to node B, the same copy (same
Via: a sender whose answer was lost, failing over) sent to node B is answered ``200 OK``
by B from its memory ("a late copy of one answered 200" in B's log) and relayed
nowhere: bob got the MESSAGE once.  (Run: the answer reached B's table within the
first poll, well under a second on loopback.)

Tried and held, or not tried:

- A copy that beats DMQ to node B is refused 403 (the known limit, docs/threat-model.md,
  "through the cluster's front"): not reported again.
- Writing ``e2manswered`` at B with a forged KDMQ (to turn a refused request's late
  copy 403 into 200): not tried; it needs the message's replay key (a digest of its
  ids and AoRs) and a KDMQ B takes from a stranger, which earlier reviews' DMQ
  checks are about (``captured_kdmq``/``forged_kdmq``).
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.cluster import htable_dump, start_cluster, wait_until
from e2m_lab.flows import TRUSTED, known_proxy, message, ua_engine
from e2m_lab.kamailio_harness import RawUas, register_contact

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio]

VIEW = ("INVITE:application/sdp", "MESSAGE:*")


def _final(sock: socket.socket, raw: bytes, port: int) -> str | None:
    sock.sendto(raw, ("127.0.0.1", port))
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        try:
            line = sock.recvfrom(65535)[0].split(b"\r\n", 1)[0].decode()
        except socket.timeout:
            continue
        if not line.startswith("SIP/2.0 1"):
            return line
    return None


def test_control_a_late_copy_at_the_other_node_gets_the_2xx_and_reaches_nobody(
        proxy_factory, pg_url, pki):
    """alice's signed MESSAGE through node A (bob answers 200); once DMQ carried the
    answer, her copy (same Via: a sender whose answer was lost, failing over) to node
    B is answered 200 by B from ``e2manswered`` and relayed nowhere (bob got 1)."""
    nodes = start_cluster(proxy_factory, pg_url, both={"view": VIEW})
    bob = RawUas()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.3)
    try:
        for node in nodes.nodes:
            register_contact(node, "bob", bob.port)
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, VIEW),))
        via = f"SIP/2.0/UDP 127.0.0.1:{sock.getsockname()[1]};rport;branch=z9hG4bK-r129c"
        sent = alice.protect(message(pki).replace("Via", via)).message
        assert _final(sock, sent.serialize(), nodes.a.port) == "SIP/2.0 200 OK"
        wait_until(lambda: len(htable_dump(nodes.b, "e2manswered")) >= 1, 10,
                   "the answer replicated to B")
        mark = nodes.b.log_mark()
        assert _final(sock, sent.serialize(), nodes.b.port) == "SIP/2.0 200 OK"
        time.sleep(0.5)
        assert len(bob.wait_for(1, timeout=0.5, method="MESSAGE")) == 1
        assert nodes.b.wait_log("a late copy of one answered 200", mark, timeout=2)
    finally:
        bob.close()
        sock.close()
