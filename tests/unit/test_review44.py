"""A forty-fourth attacker's review (December 2026) of e492040: this week's cluster
changes, as an operator deploys them (``kamailio_app/examples/cluster-*.toml``).

Hole 1 (fork slots claimed in the shared database, review 39's fix): a fork slot's claim
name is a digest of an *early dialog* (Call-ID, From tag, the two AoRs), and nothing of
it need be signed.  ``ProxyEngine._view`` calls ``_fork`` for every INVITE 2xx with an
opened part whose ``_first_sighting`` passes, and ``_first_sighting`` passes at once
when no part carries a signed context (a plaintext SDP).  On a cluster a 2xx that
matches no transaction of the node is still read (``kemi.route_stray_reply``), so a
stranger who can send UDP to a node's SIP port makes one PostgreSQL INSERT into
``replay_claims`` per made-up Call-ID (``ClaimedReplayCache._claim_slot``), each row
living ``replay_window`` + 33 s, plus one ``e2mseen`` item replicated to every node.
Nothing of the attacker needs a certificate, a registration or a dialog.

Hole 2 (``config._dmq_socket_of_its_own``, review 42's fix): the check compares the
``dmq_address`` host as written with the listeners' IP addresses as strings.  A
``dmq_address`` that names the SIP listener in another spelling (an IPv6 address not
in its compressed form) passes, while ``ProxyApp.dmq_socket`` resolves it (getaddrinfo, ``canonical_ip``) to the
SIP listener's address and port, so ``dmq_accepts`` takes a forged KDMQ sent to the SIP
port: review 42's layout, accepted again, and on real processes the nodes start,
replicate, and take the forged KDMQ (``tests/cluster/test_review44_cluster.py``).
(A host name, ``sip:localhost:P`` for a ``udp:127.0.0.1:P`` listener, also passes the
check and ``dmq_accepts``, but there Kamailio's DMQ refuses to start: "server_uri is not
a socket the proxy is listening on"; it held, with Kamailio's message, not ours.)

Fixed: a stray INVITE 2xx takes a fork slot only when a key or a signed context touches
it (``ProxyEngine._view``): a stranger's plaintext one claims nothing.  ``dmq_address``
must name an IP address, kept in one spelling (``config.canonical_ip``), and is compared
with the listeners in that spelling.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, answer, proxy_engine
from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.keycache import MemoryKeyCache
from e2m_plugins.testpki import init_test_pki
from kamailio_app.bootstrap import ProxyApp
from kamailio_app.config import AppConfigError, parse_app_config
from kamailio_app.launcher import render_cfg
from kamailio_app.replay_claims import ClaimedReplayCache
from kamailio_app.replay_htable import HtableReplayCache
from tests.cluster.test_replay_claims import _Claims
from tests.cluster.test_review39_cluster import _bobs_answers, _for_life
from tests.unit.test_review12 import SDP_VIEW, _invite

DB = "postgres://e2m:pw@127.0.0.1:5432/e2m"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


def _node(world):
    """One cluster node as review 39's tests build it: its own replay table, the shared
    claims (a stand-in for PostgreSQL's ``replay_claims`` that counts the round trips)."""
    claims = _Claims()
    node = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache())
    node.replay = ClaimedReplayCache(HtableReplayCache(MemoryHtable(), window=300), claims)
    return node, claims


def _stray_plain_200(world, n: int):
    """What the stranger sends: a 200 to an INVITE nobody made, with a plaintext SDP
    answer (no CMS, no signature), its own Call-ID each time."""
    request = _invite(world, "alice", "bob", f"stray-{n}@attacker.example", from_tag=f"s{n}")
    return answer(request, to_tag=f"t{n}")


# --------------------------------------------------------------------------- hole 1

def test_hole_a_strangers_unsigned_stray_200s_each_claim_a_fork_slot_in_the_database(world):
    """Attacker: a stranger (no certificate, no account, not on any path) who can send
    UDP to a node's public SIP port, as any phone can.

    Attack: 200 OKs to INVITE that answer nothing (made-up Call-ID, From and To tags,
    any AoRs), each with a plaintext ``application/sdp`` body, sent to a node of a
    cluster ([cluster] with dmq_address: ``ksr_reply_route`` -> ``route_stray_reply``
    reads a reply no transaction matches).  A new Call-ID each time.

    Effect: the engine opens the plaintext part, finds no signed context (so
    ``_first_sighting`` passes without a record) and calls ``_fork`` for the "INVITE
    2xx"; ``ClaimedReplayCache.admit_fork`` claims slot 0 of that early dialog in the
    shared PostgreSQL: one INSERT round trip in a SIP worker and one ``replay_claims``
    row (alive ``replay_window`` + 33 s: 333 s by default) per datagram, plus one
    replicated ``e2mseen`` item.  The names are digests of the stranger's own fields,
    so every datagram is a distinct claim: the table and the timer's sweep grow with
    the stranger's packet rate (no flood limit applies to responses), and the workers
    spend their time in PostgreSQL round trips for nothing a node keeps.  Before review
    39 the same packets cost a local htable item only.

    Fix: claim (and take) a fork slot only for a 2xx that can move a kept key: when the
    early dialog holds a kept key (``_spend``'s look-up found one) or the 2xx's body is
    signed with a signed context (its replay record was claimed first, so a stranger
    cannot mint names); a plaintext 2xx to an early dialog with no kept key claims
    nothing."""
    node, claims = _node(world)
    for n in range(50):
        verdict = node.inspect(_stray_plain_200(world, n))
        assert verdict.action == "forward"        # read and passed on, as a stray reply is
    assert claims.asked == 0, f"{claims.asked} claims in the shared database for 50 " \
                              "unsigned stray 200s from a stranger"


def test_control_the_strays_are_read_and_forwarded_and_claim_nothing_without_a_cluster(world):
    """The same datagrams on a node without claims: forwarded, nothing refused (so the
    fix must not refuse plaintext answers, which legacy phones send)."""
    node = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache())
    for n in range(5):
        assert node.inspect(_stray_plain_200(world, n)).action == "forward"


def test_control_a_genuine_signed_200_still_takes_its_fork_slot_once_in_the_cluster(world):
    """Review 39's flow: bob's signed 200s at one node keep alice's key for life once."""
    kept = _bobs_answers(world, [[f"t{n}" for n in range(3)]])
    assert _for_life(kept) == ["t0"]


# --------------------------------------------------------------------------- hole 2

def _config(tmp_path, listen, dmq_address, peer="sip:10.0.0.12:5090"):
    return parse_app_config({"kamailio": {"listen": listen, "domains": ["example.com"]},
                             "cluster": {"db_url": DB, "dmq_address": dmq_address,
                                         "peers": [peer]}}, tmp_path / "PROXY.toml")


SPELLINGS = [
    # the SIP listener's IPv6 address, not in its compressed spelling (shown on the wire:
    # tests/cluster/test_review44_cluster.py)
    (["udp:[::1]:5060", "tcp:[::1]:5060"], "sip:[0:0:0:0:0:0:0:1]:5060", ("::1", 5060)),
    (["udp:[2001:db8::11]:5060"], "sip:[2001:0db8:0000::0011]:5060", ("2001:db8::11", 5060)),
]


@pytest.mark.parametrize("listen,dmq,sip_socket", SPELLINGS)
def test_hole_a_dmq_address_spelled_otherwise_than_the_sip_listener_is_accepted(
        tmp_path, listen, dmq, sip_socket):
    """Attacker: review 40/42's off-path sender who forges a UDP source and reaches the
    node's SIP port (phones do), not the nodes' private DMQ network.

    Precondition: an operator writes ``[cluster] dmq_address`` as an IPv6 address not
    in its compressed form (leading zeros, no ``::``),
    where ``[kamailio] listen`` has the SIP UDP socket on that address and port.
    ``_dmq_socket_of_its_own`` compares ``dmq.host`` (as written, lower-cased) with
    ``item.host`` (an IP address, compressed) as strings: no match, no problem.

    Attack: review 42's: a genuine KDMQ htable replication, renamed, in a UDP datagram
    forged from a peer's DMQ address and port, sent to the node's SIP port.

    Effect: ``ProxyApp.dmq_socket`` resolves ``dmq_address`` (getaddrinfo, then
    ``canonical_ip``) to the SIP listener's own address and port, so ``dmq_accepts``
    is True for ``$Ri:$Rp`` = the SIP socket: the forged record is written into the
    replicated tables (a forged replay record refuses fresh requests, a removed one
    lets a replay through, a forged registration takes a user's calls).  Review 42's
    hole, back for these spellings.

    Fix: compare resolved, canonical addresses in ``_dmq_socket_of_its_own`` (resolve
    ``dmq_address`` as ``dmq_own_socket`` does, and compare with ``canonical_ip`` of
    each listener), or require ``dmq_address`` to be an IP literal and store it
    canonical (``parse_dmq_uri`` through ``ipaddress``)."""
    with pytest.raises(AppConfigError, match="dmq_address"):
        config = _config(tmp_path, listen, dmq)
        # what it leads to today (never reached once the config is refused):
        app = ProxyApp(config)
        peer = ("10.0.0.12", 5090)
        assert app.dmq_accepts(peer, "udp", sip_socket)         # the SIP socket itself
        render_cfg(config, tmp_path)


@pytest.mark.parametrize("listen,dmq", [(["udp:127.0.0.1:5060"], "sip:127.0.0.1:5060"),
                                        (["udp:[::1]:5060"], "sip:[::1]:5060")])
def test_control_the_same_spelling_as_the_listener_is_refused(tmp_path, listen, dmq):
    """Review 42's fix for the listener's own spelling holds."""
    with pytest.raises(AppConfigError, match="socket of its own"):
        _config(tmp_path, listen, dmq)


def test_control_a_dmq_name_on_a_port_of_its_own_is_refused_as_a_listen_name_is(tmp_path):
    """Before the fix a host name on a DMQ port of its own was taken (and kept the SIP
    port out); a name is not compared with the listeners, so ``dmq_address`` now names
    an IP address, as ``listen`` does."""
    with pytest.raises(AppConfigError, match="must name an IP address"):
        _config(tmp_path, ["udp:127.0.0.1:5060"], "sip:localhost:5090")
