"""A seventy-first attacker's review (December 2026) of cdfc7a2: trust boundaries of the
cluster and its dispatcher front (real Kamailio nodes, real PostgreSQL).

Hole 1 (``test_hole_the_front_lifts_the_registrations_per_source_cap``)

Attacker: an off-path sender (no account) where the registrar is open (no ``[auth]``,
as the default cluster runs), behind a dispatcher front.

Messages: from one address (127.0.0.92), REGISTERs for eight different AoRs through the
front, ten a second (well under the front's pike rate); ``[limits]
registrations_per_source`` is 3 on both nodes.

Effect: every one is 200 and all eight AoRs are registered (and replicated): the cap on
the AoRs one source may register is void behind a front.  The node counts the source
address (``$si``) and skips ``exempt_source()`` ones, and every REGISTER the front relays
comes from the front, which the node aliases as its own (``is_myself_srcip`` matches an
alias on any port): nothing is counted.  The front counts nothing either (it is not a
registrar: ``local_register`` is False for a front).  So the bound on per-source
registrar state is gone; only the front's pike rate (30 requests / 2 s) and the
contacts' expiry limit it (about 15 AoRs a second for ``max_expires``).  Were the front
not "myself" at the nodes, the cap would count the whole domain as one source instead
(the first stranger's 3 would lock everyone out).
At fault: ``kamailio_app/kemi.py`` ``route_register``: ``... and not
self.exempt_source() and ...`` (and ``route_request``: ``local_register = ... and
self.app.config.dispatcher is None``, so the front never counts).
Fix: count on the front, which sees the real source: give the front the same
``e2mregs`` count for a REGISTER it relays (keyed by ``$si``, decremented when the node
answers non-2xx, in its reply/failure route), or have the front put the source in a
header only it may set (stripped from what clients send, e.g. ``X-E2M-Source`` signed
with the route-token key) that the nodes count by when the request comes from the front.

Hole 2 (``test_hole_an_answer_sent_to_the_front_past_the_node_is_relayed_unread``)

Attacker: an insider UA (bob, the callee) or an untrusted hop between bob and the
domain; the caller is behind the dispatcher front.

Messages: alice's encrypted INVITE (offer readable by the domain) through the front to
node X; bob answers node X with a 180, and sends his signed 200 (SDP answer sealed under
the offer's CEK) straight to the front's address with node X's Via taken off (the next
Via is the front's, whose address and port are in the INVITE bob received).

Effect: the front's tm matches its own branch and relays the 200 to alice; the front has
no engine and reads no reply (``read_reply``/``route_reply`` stop at ``engine is
None``).  No node ever sees the answer: alice takes bob's SDP answer, the archive has no
response row for the call, and the SDP's media lines never reach a node (firewall
control).  Review 69's single-proxy hole (a reply relayed statelessly unread), moved to
the front, where any reply that names the front's branch is taken from anyone.  (Node
X's INVITE transaction then times out after ``fr_inv_timer``, 30 s, and its failure
route drops the offer's kept keys: not waited for here.)
At fault: ``kamailio_app/kemi.py`` ``ksr_reply_route`` / ``ksr_onreply_route`` on a
front: nothing checks that a reply comes from a node (``read_reply``: ``if engine is
None ...: return None``).
Fix: on a front, drop in the core reply route every reply whose source is not one of
its dispatcher destinations (``KSR.dispatcher.ds_is_from_list(1)`` on ``$si``/``$sp``;
the nodes send from their SIP sockets), or refuse any reply a front did not get from a
node.

Hole 3 (``test_hole_a_policy_in_the_proxys_name_reaches_the_caller_past_the_node``)

Attacker: the same (insider callee, or a hop on his side).

Messages: as hole 2, bob's 200 also carrying ``Proxy-Body-Policy:
proxy.example.com;view="INVITE:application/sdp";cert-fp="sha256:<another
certificate's>"``.  alice's engine learnt the domain proxy's policy from its own
announcement (a phone given no ``[[proxies]]``, review 57's set-up).

Effect: a node removes a policy in its name from every response (review 57), but the
front relays this one untouched: alice's engine takes it (an answer to her INVITE),
sees another fingerprint, and drops the domain proxy's certificate; her next call
through the front carries no envelope for the proxy and is answered 496.  Review 57
hole 1 again, past the node.
At fault and fix: as hole 2 (the front relays a reply no node read; the engine's
``_policies_in_our_name`` never runs on it).

Controls: a stranger's fourth AoR straight at a node is 403 (the cap works where the
source is seen); bob's 200 through the node is read and archived; the same forged
policy through the node is removed, alice keeps her proxy and her next call is 200; a
P-Asserted-Identity on the 200 past the node is removed by the front itself; the
200 past the node sent to the *other* node (whose alias makes the front's Via its own)
is not taken by alice unread.

Tried and held:
- KDMQ sent to the front (read, not run): the front relays it to a node's SIP socket as
  any request, and the node refuses it there (403: only on the DMQ socket from a peer,
  review 42).
- A Route set past the node through the front (review 22/23, their tests): the node
  holds (``may_route_onward``); an in-dialog request the front dispatches without a
  token is 403/404 at the node, as is a stranger's in-dialog request straight at a node
  with the front's Route and no token (read: ``dialog_routed_here``).
- Identity headers on a reply past the node: the front's own ``ksr_onreply_route``
  drops P-Asserted-Identity and kin from any source that is not ``[limits] trusted``
  (``test_control_an_asserted_identity_on_an_answer_past_the_node_goes_at_the_front``);
  a second To/From/Call-ID/CSeq is dropped by the front's core reply route (read, not
  run).
- A 407 in the domain's realm sent past the node to the front (review 27): the front
  relays it (``own_realm_challenge`` is off on a front), but the caller's credentials
  for the forged nonce go to the node, which does not know the nonce, challenges again
  and relays nothing (``consume_credentials``): the callee never sees a digest response
  (read, not run).
- Digest across nodes (read): with ``one_time_nonce`` and ``nonce_count`` per node, a
  nonce from node A is checked at B against B's own slot for its index; an index
  beyond B's counter is stale, a reused slot takes one use; so one extra spend per
  node, as review 67 said.
- A stray reply from a stranger at either node: an unsigned one names no sender in the
  archive and is charged to the unauthenticated answers; a signed or sealed one needs
  the peer's key (read).

Fixed (stop 32): the front takes replies only from its nodes (``kemi.from_a_node``:
dispatcher set 1, else dropped in the core reply route), so holes 2 and 3 see no 200
(their assertions now take "not taken, or read and archived" and look for the drop in
the front's log; the asserted-identity control accepts no reply), and with the
registrar open the front counts the AoRs each source registers
(``kemi.front_counts_registration``, since review 74 ``count_registration``; hole 1's front is given the cap, as an operator
would, since it is the one that sees the sources).  All three turned XPASS; the
markers are gone.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2m_lab.cluster import (REPLICATION, Bob, Cluster, _node_settings, answers,
                             contacts, wait_dmq_up, register_bob, wait_until)
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.flows import SDP_ANSWER, TRUSTED, ua_engine
from e2m_lab.kamailio_harness import SipUa
from e2m_plugins import headers as hdr
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import make_request, make_response

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]


def _front(proxy_factory, nodes: Cluster, limits: dict | None = None):
    a, b = nodes.nodes
    return proxy_factory("front", e2m=False, archive=False, limits=limits,
                         extra={"dispatcher": {"destinations": [a.uri, b.uri],
                                               "probe_interval": 600}})


# --------------------------------------------------------------------------- hole 1

def _limited_cluster(proxy_factory, pg_url: str, per_source: int) -> Cluster:
    """``start_cluster`` (open registrar, no [auth]) with ``[limits]
    registrations_per_source`` set on both nodes."""
    from e2m_lab.ports import free_port
    first = free_port()
    dmq = (first, free_port(avoid={first}))
    settings = [_node_settings(pg_url, dmq[0], dmq[1], None),
                _node_settings(pg_url, dmq[1], dmq[0], None)]
    for one in settings:
        one["extra"]["limits"] = {"registrations_per_source": per_source}
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = [pool.submit(proxy_factory, f"node-{n}", **s)
                   for n, s in zip("ab", settings)]
        nodes = Cluster(*(s.result() for s in started))
    wait_dmq_up(nodes.nodes)
    return nodes


def _register_many(port: int, source: str, prefix: str, count: int) -> list[int | None]:
    statuses = []
    for n in range(count):
        ua = SipUa(port, user=f"{prefix}{n}", source=source)
        try:
            reply = ua.register()
            statuses.append(reply.status if reply is not None else None)
        finally:
            ua.close()
        time.sleep(0.1)          # well under pike's 30 requests in 2 s
    return statuses


PER_SOURCE = 3


def test_control_a_node_caps_the_aors_one_stranger_registers(proxy_factory, pg_url):
    nodes = _limited_cluster(proxy_factory, pg_url, PER_SOURCE)
    a, _ = nodes.nodes
    statuses = _register_many(a.port, "127.0.0.91", "ctl", PER_SOURCE + 2)
    assert statuses == [200] * PER_SOURCE + [403, 403], statuses


def test_hole_the_front_lifts_the_registrations_per_source_cap(proxy_factory, pg_url):
    nodes = _limited_cluster(proxy_factory, pg_url, PER_SOURCE)
    a, b = nodes.nodes
    # the operator gives the front the cap too: it is the one that sees the sources
    front = _front(proxy_factory, nodes, limits={"registrations_per_source": PER_SOURCE})
    statuses = _register_many(front.port, "127.0.0.92", "hole", PER_SOURCE + 5)
    registered = [n for n in range(PER_SOURCE + 5) if contacts(a, f"hole{n}") or
                  contacts(b, f"hole{n}")]
    print(f"\nthrough the front: {statuses}; AoRs registered: {len(registered)}")
    assert statuses[:PER_SOURCE] == [200] * PER_SOURCE, statuses
    assert len(registered) <= PER_SOURCE, \
        f"one stranger registered {len(registered)} AoRs (cap {PER_SOURCE}): {statuses}"


# --------------------------------------------------------------------------- hole 2

class _SkippingBob(Bob):
    """bob, an insider callee: his 200 to an INVITE goes straight to ``skip_to`` (the
    front's port) with the node's Via taken off, so only the front's Via and alice's
    remain; the node gets a 180 (its INVITE transaction waits)."""

    def __init__(self, pki) -> None:
        super().__init__(pki)
        self.skip_to: int | None = None
        self.policy: str | None = None      # a Proxy-Body-Policy put on his next 200
        self.other_nodes: tuple[int, ...] = ()   # send it to the node that did not relay
        self.asserted: str | None = None    # a P-Asserted-Identity put on his 200s

    def _answer(self, request):
        answer = super()._respond(request)
        if self.policy is not None and request.method == "INVITE":
            answer, self.policy = answer.add(hdr.PROXY_BODY_POLICY, self.policy), None
        if self.asserted and request.method == "INVITE":
            answer = answer.add("P-Asserted-Identity", self.asserted)
        return answer

    def _respond(self, request):
        if request.method != "INVITE" or self.skip_to is None or request.to_tag is not None:
            return self._answer(request)
        top = request.get_all("Via")[0]
        assert "," not in top
        trimmed = request.remove("Via", where=lambda value: value == top)
        answer = self._answer(trimmed)
        target = self.skip_to
        if self.other_nodes:     # the node that did not relay the INVITE
            (target,) = [port for port in self.other_nodes if f"127.0.0.1:{port}" not in top]
        self.sock.sendto(answer.serialize(), ("127.0.0.1", target))
        return make_response(request, 180, "Ringing").replace("To", answer.get("To") or "")


@pytest.fixture
def sbob(pki):
    phone = _SkippingBob(pki)
    yield phone
    phone.close()


def _call_through_front(cluster, proxy_factory, alice, sbob, skip: bool,
                        policy: str | None = None):
    a, b = cluster.nodes
    front = _front(proxy_factory, cluster)
    register_bob(front, sbob)
    wait_until(lambda: contacts(a, "bob") and contacts(b, "bob"), REPLICATION,
               "bob's registration on both nodes")
    if skip:
        sbob.skip_to = front.port
    sbob.policy = policy
    reply = alice.call(front)
    if skip and (reply is None or reply.status != 200):
        return front, reply      # the fix: the front drops an answer from a non-node
    assert reply is not None and reply.status == 200, reply and reply.status
    assert alice.open(reply) == SDP_ANSWER            # alice took bob's answer
    alice.ack(front)
    return front, reply


def test_control_bobs_answer_through_the_front_is_read_and_archived(cluster, proxy_factory,
                                                                  alice, sbob):
    _call_through_front(cluster, proxy_factory, alice, sbob, skip=False)
    a, _ = cluster.nodes
    wait_until(lambda: answers(a, alice.call_id), 5, "bob's answer archived")


def test_hole_an_answer_sent_to_the_front_past_the_node_is_relayed_unread(cluster,
                                                                        proxy_factory,
                                                                        alice, sbob):
    front, reply = _call_through_front(cluster, proxy_factory, alice, sbob, skip=True)
    a, b = cluster.nodes
    took = reply is not None and reply.status == 200
    # up to 2 s (was a fixed 2 s) for what the asserts below look for: the answer's
    # archive row (when alice took it) and the front's drop in its log
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not (
            (not took or answers(a, alice.call_id))
            and "not a node of ours: dropped" in front.log_since(0)):
        time.sleep(0.1)
    read = [n.name for n in cluster.nodes if "INVITE response 200" in n.log_since(0)]
    print(f"\nnodes that read a 200: {read}; archived answers: "
          f"{len(answers(a, alice.call_id))}")
    assert not took or answers(a, alice.call_id), \
        "alice took bob's SDP answer from the front; no node read it, the archive has no row"
    assert "not a node of ours: dropped" in front.log_since(0)


def test_control_an_asserted_identity_on_an_answer_past_the_node_goes_at_the_front(
        cluster, proxy_factory, alice, sbob):
    """bob's 200 past the node with ``P-Asserted-Identity: <sip:carol@example.com>``: the
    front's own reply route removes it (its source is no ``[limits] trusted`` peer)."""
    sbob.asserted = "<sip:carol@example.com>"
    a, b = cluster.nodes
    front = _front(proxy_factory, cluster)
    register_bob(front, sbob)
    wait_until(lambda: contacts(a, "bob") and contacts(b, "bob"), REPLICATION,
               "bob's registration on both nodes")
    sbob.skip_to = front.port
    reply = alice.call(front)
    # since review 71's fix the front drops the answer whole (not from a node)
    assert reply is None or reply.get("P-Asserted-Identity") is None


def test_control_an_answer_sent_past_its_node_to_the_other_node_is_never_taken_unread(
        cluster, proxy_factory, alice, sbob):
    """The same 200 without the carrying node's Via, sent to the *other* node instead of
    the front (its top Via is then the front's, which that node aliases as its own):
    it does not reach alice unread.  Seen: the other node logs nothing and forwards
    nothing; alice's INVITE ends without a 200.  The nodes hold; the front does not
    (hole 2)."""
    a, b = cluster.nodes
    front = _front(proxy_factory, cluster)
    register_bob(front, sbob)
    wait_until(lambda: contacts(a, "bob") and contacts(b, "bob"), REPLICATION,
               "bob's registration on both nodes")
    sbob.skip_to, sbob.other_nodes = front.port, (a.port, b.port)
    reply = alice.call(front)
    status = reply.status if reply is not None else None
    print(f"\nalice's INVITE, bob's 200 sent to the other node: {status}")
    assert status != 200 or answers(a, alice.call_id), \
        "alice took an answer no node read"


# --------------------------------------------------------------------------- hole 3

FORGED_FP = hashlib.sha256(b"not the domain's proxy certificate").digest()


def _forged_policy(node) -> str:
    """A Proxy-Body-Policy in the domain proxy's name, for another certificate."""
    return hdr.PolicyHeader(TRUSTED, view=(hdr.Rule.parse("INVITE:application/sdp"),),
                            cert_fingerprint=FORGED_FP, cert_url=node.cert_url).format()


def _learning_alice(pki, alice, node) -> None:
    """alice's engine learns the domain proxy's policy from its own announcement (a
    node's answer to her REGISTER, as a phone that is given no [[proxies]] does) and
    holds its certificate as fetched from its cert-url (review 57's set-up)."""
    own = node.options()
    assert own is not None and own.status == 200
    (announced,) = own.get_all(hdr.PROXY_BODY_POLICY)
    engine = ua_engine(pki, "alice", peers=("bob",))
    register = make_request("REGISTER", "sip:example.com", from_uri=pki.aor("alice"),
                            to_uri=pki.aor("alice"))
    engine.open(make_response(engine.protect(register).message, 200, "OK",
                              [(hdr.PROXY_BODY_POLICY, announced)]))
    engine.add_proxy_certificate(TRUSTED, pki.proxy(TRUSTED).cert.public_bytes(Encoding.DER))
    alice.engine = engine


def _forged_then_next_call(cluster, proxy_factory, pki, alice, sbob, skip: bool):
    a, _ = cluster.nodes
    _learning_alice(pki, alice, a)
    forged = _forged_policy(a)
    front, _ = _call_through_front(cluster, proxy_factory, alice, sbob, skip=skip,
                                   policy=forged)
    kept = alice.engine.certs.proxy(TRUSTED) is not None
    sbob.skip_to = None      # bob answers her next call through his node
    # her next call (a new dialog: the re-INVITE of this one reuses the kept key)
    alice.call_id = f"cl-next-{secrets.token_hex(6)}@127.0.0.1"
    alice.from_tag, alice.to_tag, alice.routes = secrets.token_hex(4), None, []
    try:
        reply = alice.call(front)
    except E2MError as exc:
        return kept, f"her engine refused to send: {type(exc).__name__}"
    return kept, reply.status if reply is not None else None


def test_control_a_policy_in_the_proxys_name_on_an_answer_through_the_node_goes(
        cluster, proxy_factory, pki, alice, sbob):
    """bob's 200 through the node with the forged policy: the node removes it (review
    57), alice keeps her proxy, and her re-INVITE through the front is answered 200."""
    kept, status = _forged_then_next_call(cluster, proxy_factory, pki, alice, sbob, skip=False)
    assert kept and status == 200, (kept, status)


def test_hole_a_policy_in_the_proxys_name_reaches_the_caller_past_the_node(
        cluster, proxy_factory, pki, alice, sbob):
    kept, status = _forged_then_next_call(cluster, proxy_factory, pki, alice, sbob, skip=True)
    print(f"\nafter bob's 200 came past the node: proxy certificate kept {kept}; "
          f"alice's next call: {status}")
    assert kept and status == 200, f"proxy certificate kept: {kept}; alice's next call: {status}"
