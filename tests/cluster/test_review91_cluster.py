"""A ninety-first attacker's review (December 2026) of ea4cf0c: the registrar's
per-source count and its settling (stop 34: ``kemi.count_registration``,
``settle_registration``, ``_bound_seconds``, ``_replied_seconds``, ``_UNSETTLED``,
``ksr_onreply_route``), on two real Kamailio 5.6 nodes, a dispatcher front and the
harness's PostgreSQL; the registrar open (no ``[auth]``), ``registrations_per_source`` 3.

Hole 1 (``test_hole_a_register_whose_200_the_front_drops_is_never_counted``): attacker:
an **insider UA** (or an **off-path sender**: he needs no answer, so S may be forged)
binding more AoRs from one address S than the cap, through the front.  Messages: from S,
REGISTERs for AoRs of his own, each carrying 17 ``Record-Route`` headers (any junk
entries) and the contact ``<sip:u@h>;x='y;expires=0;z='`` with ``Expires: 3600``
(review 85's spelling, which the front reads as a removal: its claim lives the 10 s
slack; a plain contact gives a claim of 32 + 10 s, the same hole 32 s later: probed,
after 43 s the first plain REGISTER from S was 200, the rest once htable's 10 s timer
had swept the lapsed claims).  The
node's registrar binds each for the hour and answers 200, and Kamailio copies the
request's Record-Route headers into a 2xx (``build_res_buf_from_sip_req``: RR for 180 to
299); the front's core reply route (``ksr_reply_route`` -> ``moved_route_entries``:
``count > len(_RECORD_ROUTE_SPECS)``, 16) drops that 200 as "a Record-Route past the
read bound", so tm's onreply route never runs and ``settle_registration(in_reply=True)``
never raises the claim to what the node bound.  Effect: the claim lapses after 10 s
(42 s for a plain contact) while the binding lives an hour on both nodes: after it, S
registers three more AoRs with plain REGISTERs (200 each), 6 live AoRs from one address
against a cap of 3, and as many more every 10 s (the per-source bound on registrar
state is gone; a non-UTF-8 octet in one Record-Route, or one past
``routes_within_bounds``, drops the 200 the same way).  At fault:
``kamailio_app/kemi.py`` ``count_registration`` (``lifetime = min(lifetime,
_UNSETTLED)``) trusting that a node's 2xx always reaches ``ksr_onreply_route``, and
``ksr_reply_route``'s ``moved_route_entries`` drop, which runs before it, for a reply
that answers a REGISTER (no route set is made by one).  Fix: refuse at the front (400)
a REGISTER carrying any Record-Route (meaningless in a REGISTER) and any request whose
Record-Route the reply route would refuse (more than 16 entries, not UTF-8, past
``routes_within_bounds``), so no reply the front drops can follow; and settle before any
drop: call ``settle_registration`` from ``ksr_reply_route`` for a node's 2xx to a
REGISTER (``t_check_trans``) before its checks, or keep an unsettled claim for what was
asked (``_asked_lifetime``, failing closed to ``MAX_EXPIRES``) when the transaction
ends without a reply the front took.

Hole 2 (``test_hole_one_strangers_register_takes_every_node_out_of_the_front``):
attacker: an **off-path sender** (no account, any address, sees nothing).  Messages: one
REGISTER for any AoR with 17 ``Record-Route`` headers (parameter ``seventeen``), or with
one ``Record-Route`` holding an octet that is not UTF-8 (``not_utf8``), through the
front.  Effect: the
node answers 200, the front drops it (as hole 1), so tm sees no reply on the branch:
after ``_FRONT_FR_TIMER_MS`` (7 s) ``failover`` (``t_branch_timeout`` and not
``t_branch_replied``) marks the node down (``ds_mark_dst``) and relays to the next,
which answers, is dropped and is marked down in turn: 14 s after one datagram every
caller of the domain gets ``503 No Node Available`` until a probe answers
(``probe_interval``, 10 s by default; 600 here to keep the test steady): one datagram
per probe interval keeps the whole domain down.  Review 18's wedge (fixed by waiting
longer than a node's own 408) back through the front's own drop.  At fault:
``kemi.py`` ``failover``: "the node did not answer at all" is read from tm, which never
saw the reply the core reply route dropped; with ``ksr_reply_route``'s
``moved_route_entries`` drop as above.  Fix: as hole 1 (refuse such requests at the
door: 400 before relaying), and a reply from a node that the front drops must still
count as the node's answer (note it on the transaction, e.g. ``t_check_trans`` then an
AVP or flag read by ``failover``, or drop it in tm's onreply route after
``t_branch_replied`` is set).

Hole 3 (``test_hole_each_node_gives_one_address_its_own_cap``): attacker: an
**insider UA** (or an off-path sender forging S) where clients reach the nodes of a
cluster directly (review 74's set-up, no front).  Messages: from S, three REGISTERs for
new AoRs to node A, three more to node B.  Effect: all six are 200 and live on both
nodes (dmq_usrloc replicates the bindings): e2mregs is per node and not replicated, so
a cluster of N nodes lets one address hold N times ``registrations_per_source`` AoRs,
and a node restarted (usrloc synced from its peer, e2mregs empty) starts its count of
every source at 0 while their AoRs live on.  At fault: the ``e2mregs`` htable in
``kamailio_app/templates/kamailio.cfg.tmpl`` (no ``dmqreplicate``), with
``count_registration`` claiming only the node's own slots.  Fix: claim a source's
slots cluster-wide (the shared database's claims, as ``replay_claims`` does for fork
slots), or replicate e2mregs over DMQ with ``dmq_init_sync`` (the cap then holds up to
the replication delay), or say so in the docs and require a front for the cap.

Controls: ``test_control_the_front_counts_quoted_registrations_it_sees_answered`` (the
same REGISTERs without the Record-Routes: settled to the hour, the fourth AoR 403 well
after the claim's 10 s), ``test_control_the_node_binds_and_copies_the_record_routes``
(hole 1 and 2's set-up: the node binds such a REGISTER and its 200 carries the 17
Record-Route headers), ``test_control_a_plain_register_leaves_the_nodes_up`` (without
the Record-Routes the front relays the 200 and every node stays up),
``test_control_a_node_refuses_the_fourth_aor`` (hole 3: one node's cap holds).

Tried and held (wire probes or reading, ea4cf0c):
- A To user part longer than Kamailio's 64 (``USERNAME_MAX_SIZE``) but under the
  core's 256: the registrar refuses (500), ``reg_fetch_contacts`` returns -1 and the
  slot is freed (no slot held for a refused save).
- The front's CSeq method other than REGISTER (so ``$rm`` in the reply route would not
  be REGISTER): 400 at the front (sanity).
- ``Contact: *`` and ``Expires: 0`` at node A: the removal is replicated to node B
  (dmq_usrloc), so no binding outlives its slot on another node; the slot is freed.
- Several contacts, ``expires`` parameter against the header, q-values: the node
  settles from usrloc (the longest binding), the front from the node's 2xx Contacts
  (unreadable or more than 16: ``MAX_EXPIRES``, fail closed).
- A REGISTER retransmitted: tm absorbs it before ``count_registration``; a copy racing
  in two workers over-counts (review 76: fail closed).
- A REGISTER that fails auth, 401 loops: the count applies only without ``[auth]``.
- Freeing another source's slot: a slot is freed only by a settle of its own (source,
  AoR) pair that finds nothing bound; an off-path sender forging S can de-register S's
  AoRs (an open registrar's known limit), which frees the slot with them.
- A slot settled to bindings another source made (S's REGISTER for an AoR T keeps
  bound, a junk contact with ``expires=0``): S's slot lives as long as T's binding,
  at most an hour per datagram, the cost of forging real bindings from S (known).
- Tag collisions (28 bits of the AoR's digest): a pair is reached only through its
  own pair item, which points only at a slot it claimed; no way found to make a pair
  item point at another AoR's slot.
- A 2xx forged towards the front from a node's address: the known limit "the front
  trusts a node's UDP address" (review 72), and it needs the front's branch.

Fixed (stop 35): a request whose Record-Route the reply checks cannot read whole (more
headers than they read, an octet that is not UTF-8, an entry past
``routes_within_bounds``) is answered 400 "Bad Record-Route" at the door, at the front
and at every node (``kemi._record_route_unvouchable`` in ``route_sanity``), and a front
runs none of the Record-Route checks on its nodes' replies (it writes no entry and
vouches for none).  Hole 1 now asserts the door's 400 besides the cap.  Hole 3 (each
node counts for itself where clients reach the nodes directly) is a known limit in
docs/threat-model.md: bounded by N times the cap; a front counts for all of them.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2m_lab.cluster import contacts, wait_until
from e2m_lab.kamailio_harness import build_request, udp_transaction
from e2m_lab.pytest_fixtures import failed, print_proxy_log
from tests.cluster.test_review71_cluster import _limited_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

LIMIT = 3
QUOTED = "<sip:{u}@{s}:4444>;x='y;expires=0;z='"     # the front reads a removal: 10 s
# 17 entries: one past what the front's reply route reads (_RECORD_ROUTE_SPECS, 16)
RECORD_ROUTES = [("Record-Route", f"<sip:127.0.0.{n}:5060;lr>") for n in range(2, 19)]


def _register(user: str, contact: str, expires: str = "3600", extra=()) -> bytes:
    return build_request("REGISTER", "sip:example.com", from_user=user, to_user=user,
                         headers=[("Contact", contact), ("Expires", expires), *extra])


def _status(proxy, request: bytes, source: str, timeout: float = 3.0):
    answer = udp_transaction(proxy.port, request, source=source, timeout=timeout)
    return answer.status if answer is not None else None


def _front(proxy_factory, nodes, probe_interval: int):
    a, b = nodes.nodes
    return proxy_factory("front", e2m=False, archive=False,
                         limits={"registrations_per_source": LIMIT, "pike_requests": 0},
                         extra={"dispatcher": {"destinations": [a.uri, b.uri],
                                               "probe_interval": probe_interval}})


def _nodes_up(front) -> int:
    """Nodes the front would send to (dispatcher flags A: active)."""
    return len(re.findall(r"FLAGS:\s*A", front.rpc("dispatcher.list")))


@pytest.fixture(scope="module")
def shared_nodes(module_proxy_factory, module_pg_url):
    """One pair of nodes for the module: every test here registers its own AoRs from a
    source of its own (direct to a node: 127.0.0.150 to .158), and what reaches the
    nodes through a front comes from the front's 127.0.0.1, one of the node's own
    addresses (``exempt_source``: not counted); each front (its dispatcher state, its
    own count) is the test's own.  So no test's counts or bindings are another's."""
    return _limited_cluster(module_proxy_factory, module_pg_url, LIMIT)


@pytest.fixture
def nodes(shared_nodes, request):
    marks = [(node, node.log_mark()) for node in shared_nodes.nodes]
    yield shared_nodes
    if failed(request):
        for node, mark in marks:
            print_proxy_log(node, mark)


@pytest.fixture
def front(proxy_factory, nodes):
    """A front whose nodes come back 2 s after being taken out (hole 1 is about the
    count, not the nodes)."""
    return _front(proxy_factory, nodes, 2), nodes


@pytest.fixture
def steady_front(proxy_factory, nodes):
    return _front(proxy_factory, nodes, 600), nodes


def _live(nodes, users) -> list[str]:
    a, b = nodes.nodes
    return [u for u in users if contacts(a, u) or contacts(b, u)]


# -- hole 1: a 200 the front drops leaves the AoR uncounted ----------------------------

def test_control_the_node_binds_and_copies_the_record_routes(nodes):
    """Before stop 35 the node bound it and copied the 17 Record-Routes into its 200
    (the hole's set-up); now it refuses it at the door and binds nothing.  With the
    Record-Route set a reply's checks read, it still binds and copies it."""
    a, _ = nodes.nodes
    source = "127.0.0.150"
    answer = udp_transaction(a.port, _register("r91n", QUOTED.format(u="r91n", s=source),
                                               extra=RECORD_ROUTES), source=source)
    assert answer is not None and answer.status == 400, answer
    assert not contacts(a, "r91n")
    answer = udp_transaction(a.port, _register("r91n", QUOTED.format(u="r91n", s=source),
                                               extra=RECORD_ROUTES[:2]), source=source)
    assert answer is not None and answer.status == 200, answer
    assert len(answer.get_all("Record-Route")) == 2
    assert [c.endswith(";expires=3600") for c in answer.get_all("Contact")] == [True]


def test_control_the_front_counts_quoted_registrations_it_sees_answered(front):
    proxy, nodes = front
    source = "127.0.0.151"
    users = [f"r91c{n}" for n in range(LIMIT)]
    assert [_status(proxy, _register(u, QUOTED.format(u=u, s=source)), source)
            for u in users] == [200] * LIMIT
    time.sleep(12)                   # past the claim's own 10 s: settled to the hour
    assert _status(proxy, _register("r91c9", f"<sip:r91c9@{source}:4444>"), source) == 403
    assert _live(nodes, users + ["r91c9"]) == users


def test_hole_a_register_whose_200_the_front_drops_is_never_counted(front):
    proxy, nodes = front
    source = "127.0.0.152"
    hidden = [f"r91h{n}" for n in range(LIMIT)]
    started = time.monotonic()
    for user in hidden:              # no answer needed (the front answered 408 later)
        udp_transaction(proxy.port, _register(user, QUOTED.format(u=user, s=source),
                                              extra=RECORD_ROUTES), source=source, timeout=0.2)
    # before stop 35 the node bound them and the front dropped its 200s; now the front
    # refuses them at the door (400 Bad Record-Route) and nothing is bound
    refused = _status(proxy, _register("r91h9", QUOTED.format(u="r91h9", s=source),
                                       extra=RECORD_ROUTES), source)
    time.sleep(max(0.0, started + 11 - time.monotonic()))
    wait_until(lambda: _nodes_up(proxy) > 0, 10, "a node up at the front")
    plain = [f"r91k{n}" for n in range(LIMIT)]
    codes = []
    for user in plain:
        # a refused REGISTER writes nothing; an expired claim may wait for htable's
        # timer (timer_interval 10 s) before its slot reads free
        while True:
            codes.append(_status(proxy, _register(user, f"<sip:{user}@{source}:4444>"),
                                 source))
            if codes[-1] == 200 or time.monotonic() > started + 24:
                break
            time.sleep(1)
    live = _live(nodes, hidden + plain)
    print(f"\nplain REGISTERs from {source} after the hidden ones: {codes}; live: {live}; "
          f"a hidden one now gets {refused}")
    assert refused == 400
    # secure: at most registrations_per_source AoRs bound from one address
    assert len(live) <= LIMIT, f"{len(live)} live AoRs from {source}: {live} ({codes})"


# -- hole 2: the same 200, dropped, takes the nodes out --------------------------------

def test_control_a_plain_register_leaves_the_nodes_up(steady_front):
    proxy, _ = steady_front
    assert _status(proxy, _register("r91u", "<sip:r91u@127.0.0.153:4444>"),
                   "127.0.0.153") == 200
    time.sleep(15)
    assert _nodes_up(proxy) == 2
    assert _status(proxy, _register("r91alice", "<sip:r91alice@127.0.0.154:4444>"),
                   "127.0.0.154") == 200


def _strangers_register(shape: str) -> bytes:
    if shape == "seventeen":
        return _register("r91x", "<sip:r91x@127.0.0.9:4444>", extra=RECORD_ROUTES)
    request = _register("r91y", "<sip:r91y@127.0.0.9:4444>",
                        extra=[("Record-Route", "<sip:127.0.0.2:5060;lr>;x=MARK")])
    return request.replace(b"x=MARK", b"x=\xff\xfe")        # one octet not UTF-8


@pytest.mark.parametrize("shape", ["seventeen", "not_utf8"])
def test_hole_one_strangers_register_takes_every_node_out_of_the_front(steady_front, shape):
    proxy, _ = steady_front
    udp_transaction(proxy.port, _strangers_register(shape), source="127.0.0.155", timeout=0.2)
    time.sleep(15.5)                 # two branches of 7 s each (_FRONT_FR_TIMER_MS)
    up = _nodes_up(proxy)
    alice = _status(proxy, _register("r91al", "<sip:r91al@127.0.0.156:4444>"), "127.0.0.156")
    print(f"\nnodes up at the front: {up}; alice's REGISTER: {alice}")
    # secure: the nodes answered; a legitimate user's REGISTER is served
    assert alice == 200, f"alice got {alice}; {up} node(s) up after one stranger's REGISTER"


# -- hole 3: each node counts for itself ------------------------------------------------

def test_control_a_node_refuses_the_fourth_aor(nodes):
    a, _ = nodes.nodes
    source = "127.0.0.157"
    codes = [_status(a, _register(f"r91o{n}", f"<sip:r91o{n}@{source}:4444>"), source)
             for n in range(LIMIT + 1)]
    assert codes == [200] * LIMIT + [403], codes


@pytest.mark.xfail(strict=True, reason=(
    "known limit (docs/threat-model.md): without a front, each node counts the AoRs one "
    "address binds there: N nodes bind N times registrations_per_source (review 91)"))
def test_hole_each_node_gives_one_address_its_own_cap(nodes):
    a, b = nodes.nodes
    source = "127.0.0.158"
    users = [f"r91m{n}" for n in range(2 * LIMIT)]
    codes = [_status(node, _register(u, f"<sip:{u}@{source}:4444>"), source)
             for node, u in zip([a] * LIMIT + [b] * LIMIT, users)]
    wait_until(lambda: all(contacts(a, u) for u in users[:codes.count(200)]), 5,
               "bindings replicated")
    live = _live(nodes, users)
    print(f"\nfrom {source}: {codes}; live on the cluster: {live}")
    assert len(live) <= LIMIT, f"{len(live)} live AoRs from {source} on two nodes: {codes}"


# -- my variant (stop 35): the front's other reply checks -------------------------------

@pytest.mark.parametrize("header", ["To", "From", "Call-ID"])
def test_a_register_with_a_second_single_header_leaves_the_nodes_up(steady_front, header):
    """The front drops a reply with a second From, To, Call-ID or CSeq (review 67's
    framing checks), and a node's registrar copies what a request carried into its 200:
    could one REGISTER with a second To take a node out as 17 Record-Routes did (hole
    2)?  It held: Kamailio's own parse refuses the request at the front (no answer it
    can build for a second From or To), and no node is marked down."""
    proxy, _ = steady_front
    second = {"To": "<sip:r91d@example.com>", "From": "<sip:r91d@example.com>;tag=x",
              "Call-ID": "second@x"}[header]
    request = _register("r91d", "<sip:r91d@127.0.0.9:4444>", extra=[(header, second)])
    sent = time.monotonic()
    answer = udp_transaction(proxy.port, request, source="127.0.0.159", timeout=3)
    # two branches of 7 s each (_FRONT_FR_TIMER_MS) from the request's arrival: looked
    # at as long after it as hole 2 does (its 0.2 s and 15.5 s); the 3 s spent waiting
    # for an answer count towards them
    time.sleep(max(0.0, sent + 0.2 + 15.5 - time.monotonic()))
    up = _nodes_up(proxy)
    alice = _status(proxy, _register("r91al", "<sip:r91al@127.0.0.156:4444>"), "127.0.0.156")
    assert answer is None or answer.status >= 400, answer.status
    assert (up, alice) == (2, 200)
