"""A fortieth attacker's review (December 2026) of 8041f1f, on a real two-node cluster
(PostgreSQL, DMQ): the cluster's replay claims (review 37's fix) where nobody made
their table.

The claims live in ``replay_claims``, archive schema 4, made by ``e2m-proxy db
init|upgrade`` only for the *archive*: ``db_cmd._archive_target`` is None for a
``[cluster]`` without an ``[archive]`` section (a cluster that shares registrations,
keys and replay records but keeps no IM archive, a configuration the docs allow), so
``db init`` prints "archive: none configured", ``db status`` exits 0, and nothing at
the proxy's start checks the claims' table either (``ProxyApp.load`` checks the schema
only of an archive).  Every node's first claim then fails (UndefinedTable), raises
the node's away flag, and the timer's probe (``SELECT 1 FROM replay_claims``) fails
for good: the flag never comes down, one warn line at start, and the cluster's replay
check is each node's own table, as before review 37.

``test_hole_*`` xfailed strictly on 8041f1f.  Its control (the same copies on a cluster
with an archive, relayed once, no claim unavailable) is review 37's hole test, which
now checks the counter too.

Fixed: a replicating E2M node uses the shared schema whether or not it keeps an archive
(``AppConfig.shared_schema``): ``db init|upgrade|status`` make and check it, the launcher
refuses to start a node whose database has not got it, and a probe the database refuses
(no table, no privilege) is an error line once a minute.  KDMQ is taken only over UDP,
received on this node's DMQ socket, from a peer's address and port, compared in one
spelling (``ProxyApp.dmq_accepts``).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import pytest

from e2m_lab.cluster import (REPLICATION, Cluster, captured_kdmq, contacts, dmq_port,
                             forged_kdmq, htable_dump, register_bob, start_cluster, stat,
                             wait_until)
from e2m_plugins.sip import parse
from kamailio_app.pgconn import PgUrl
from kamailio_app.replay_claims import ClaimsUnavailable, PgReplayClaims
from tests.cluster.test_review37_cluster import copies_to_both

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

_ATTEMPTS = 8      # the claim decides every copy; on the old code 4-13 in 10-30 doubled


def _start_without_archive(proxy_factory, db_url: str) -> Cluster:
    """``start_cluster`` with ``archive=False`` on both nodes: [cluster] (DMQ, the
    shared PostgreSQL for users and claims), no [archive].  The harness runs
    ``e2m-proxy db init`` for each node, as the operator does."""
    return start_cluster(proxy_factory, db_url, both={"archive": False})


def _db(config_path, verb: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "db", verb,
                           "--config", str(config_path)],
                          capture_output=True, text=True, timeout=120)


def _copies_to_both(alice_type, pki, bob, a, b) -> list[str]:
    """Review 37's attack, ``_ATTEMPTS`` calls: the Call-IDs that reached bob twice."""
    return copies_to_both(alice_type, pki, bob, a, b, _ATTEMPTS)


def test_hole_a_cluster_without_an_archive_has_no_claims_and_relays_a_copy_twice(
        proxy_factory, pg_url, alice, bob):
    """Attacker: review 37's: an untrusted on-path hop between alice and the domain, or
    an off-path sender who sees her request and can reach both nodes.

    Precondition (no mistake of the operator's): a two-node cluster set up as the docs
    say, ``[cluster]`` with ``db_url``, DMQ and peers, no ``[archive]`` (the IM archive
    is optional), ``e2m-proxy db init`` run on each node: it answers "archive: none
    configured" and makes no ``replay_claims``; ``db status`` exits 0; the proxy
    starts without a word about the claims' table.

    Attack: alice's signed, encrypted INVITE sent, octet for octet with a fresh Via
    branch each, to node A and to node B at the same moment.

    Effect: each node's claim fails (``UndefinedTable``), which raises its away flag;
    the timer's probe reads the same missing table, so the flag never comes down:
    every signed request is counted in ``e2m_replay_claims_unavailable`` and decided by
    the node's own table alone.  The copies reach bob as two calls (review 37's hole,
    back for every such cluster, silently: one warn line per node at its first claim).

    Fix: make ``replay_claims`` wherever ``[cluster]`` and e2m are on (``db init`` /
    ``upgrade`` migrate the shared database whenever ``[cluster]`` is there, archive or
    not; ``db status`` says so) and have ``ProxyApp.load`` check its schema version (as
    it does the archive's) and refuse to start, rather than run the cluster without
    its replay claims; a probe that fails with a permanent error (UndefinedTable,
    InsufficientPrivilege) should be an error in the log every time, not a one-off
    warn."""
    cluster = _start_without_archive(proxy_factory, pg_url)
    a, b = cluster.nodes
    init = _db(a.config_path, "init")
    assert init.returncode == 0, init.stderr   # said "archive: none configured" before the fix
    register_bob(a, bob)
    wait_until(lambda: contacts(b, "bob"), REPLICATION, "bob's registration on B")
    twice = _copies_to_both(type(alice), alice.pki, bob, a, b)
    print(f"\nrelayed twice: {len(twice)} of {_ATTEMPTS} calls; claims unavailable: "
          f"A {stat(a, 'e2m_replay_claims_unavailable')}, "
          f"B {stat(b, 'e2m_replay_claims_unavailable')}")
    assert twice == []


def test_hole_db_init_makes_no_claims_table_for_a_cluster_without_an_archive(
        proxy_factory, pg_url):
    """The same precondition, without the call: after ``e2m-proxy db init`` (exit 0,
    "archive: none configured") the cluster's claims cannot be made, and the timer's
    probe can never lower the flag (``ClaimsUnavailable`` from both).  A fix makes the
    claim answer."""
    cluster = _start_without_archive(proxy_factory, pg_url)
    a, _ = cluster.nodes
    assert _db(a.config_path, "init").returncode == 0
    print("\n" + _db(a.config_path, "status").stdout)   # exit 0: nothing to do, it says
    claims = PgReplayClaims(PgUrl.parse(pg_url))
    try:
        claims.probe()
        made = claims.claim("r-review40", 60)
    except ClaimsUnavailable as exc:
        made = f"ClaimsUnavailable({exc})"
    assert made is True


def test_a_node_without_an_archive_does_not_start_on_a_database_without_the_claims(
        pg_url, tmp_path):
    """The launcher's preflight names the missing schema and the command that makes it,
    as it does for an archive's."""
    from kamailio_app.config import parse_app_config
    from kamailio_app.db_cmd import preflight
    config = parse_app_config({
        "kamailio": {"listen": ["udp:127.0.0.1:5060"], "domains": ["example.com"]},
        "cluster": {"db_url": pg_url, "dmq_address": "sip:127.0.0.1:5090",
                    "peers": ["sip:127.0.0.2:5090"]}}, tmp_path / "PROXY.toml")
    why = preflight(config)
    assert why is not None and "schema version 0" in why and "db init" in why


# --------------------------------------------------------------------------- KDMQ's source check

def _genuine_kdmq(cluster, tmp_path) -> bytes:
    try:
        return captured_kdmq(cluster, tmp_path / "dmq.pcap")
    except LookupError as exc:
        pytest.skip(str(exc))


_forged = forged_kdmq


def _udp_from(source_port: int, destination_port: int, payload: bytes) -> None:
    """A UDP datagram 127.0.0.1:source_port -> 127.0.0.1:destination_port written with a
    raw socket (the source port is one a running Kamailio holds: an off-path sender
    forging a peer's address does the same from anywhere that reaches the node)."""
    header = struct.pack("!HHHH", source_port, destination_port, 8 + len(payload), 0)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    try:
        raw.sendto(header + payload, ("127.0.0.1", 0))
    finally:
        raw.close()


def _raw_sockets() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP).close()
        return True
    except OSError:
        return False


def test_hole_kdmq_over_tcp_from_the_peers_dmq_port_number_is_taken(cluster, tmp_path):
    """Attacker: anyone who can open a TCP connection from a peer's address: an
    unprivileged local user (or any process) on a peer node's host, or on the host
    behind whose address a peer sits (a NAT, a shared host).  No raw sockets, no root.

    Attack: DMQ's socket is UDP only (``launcher._listen_lines``), so the same port
    number is free for TCP on the peer's host: bind a TCP socket to (peer address, the
    peer's DMQ port), connect to the node's SIP TCP listener and send KDMQ (here a
    genuine htable replication captured once, renamed to ``probe-tcp-ok``).

    Effect: ``route_dmq`` compares ``($si, $sp)`` only, not the transport ($pr) or the
    socket it came in on ($Ri/$Rp): the node hands it to ``dmq.handle_message`` and the
    record is written into ``e2mseen`` (a forged replay record: alice's next request is
    refused as a replay; the same way a deletion, or a forged registration through
    dmq_usrloc, which sends bob's calls to the attacker).

    Fix: take KDMQ only over UDP and only on this node's own DMQ socket (``$pr == udp``
    and ``($Ri, $Rp)`` == ``[cluster] dmq_address``), besides the peer's source address
    and port; refuse (403) KDMQ on every other listener."""
    a, b = cluster.nodes
    genuine = _genuine_kdmq(cluster, tmp_path)
    dmq_a = int(dmq_port(a))
    stream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    stream.bind(("127.0.0.1", dmq_a))       # A's DMQ port number, over TCP: nobody holds it
    stream.settimeout(3)
    try:
        stream.connect(("127.0.0.1", b.port))
        via = f"Via: SIP/2.0/TCP 127.0.0.1:{dmq_a};branch=z9hG4bK-r40tcp"
        stream.sendall(_forged(genuine, b"probe-tcp-ok", via))
        try:
            print("\nB answered: " + stream.recv(65535).split(b"\r\n", 1)[0].decode())
        except OSError:
            pass
    finally:
        stream.close()
    time.sleep(0.5)
    assert "probe-tcp-ok" not in htable_dump(b, "e2mseen")


def test_hole_kdmq_forged_to_the_sip_port_is_taken(cluster, tmp_path):
    """Attacker: an off-path sender who can forge a UDP source address (what the threat
    model grants it) and reaches the node's public SIP port, but not its DMQ socket,
    which the docs say to keep on the nodes' own network ("dmq_address must listen
    only on the nodes' own network ... never where strangers reach it",
    docs/threat-model.md, a rogue DMQ peer).

    Attack: KDMQ (a captured replication, renamed to ``probe-udp-ok``) in a UDP datagram
    from the peer's address and DMQ port, sent to the node's SIP port, not to its DMQ
    socket.

    Effect: the node takes it (``route_dmq`` never asks which socket the request came
    in on) and writes the record: the documented mitigation (a private DMQ socket)
    does not keep forged KDMQ out.

    Fix: take KDMQ only when it arrived on this node's DMQ socket (``$Ri:$Rp`` ==
    ``[cluster] dmq_address``, over UDP); 403 on every other listener."""
    if not _raw_sockets():
        pytest.skip("no raw sockets here")
    a, b = cluster.nodes
    genuine = _genuine_kdmq(cluster, tmp_path)
    dmq_a = int(dmq_port(a))
    via = f"Via: SIP/2.0/UDP 127.0.0.1:{dmq_a};branch=z9hG4bK-r40udp"
    _udp_from(dmq_a, b.port, _forged(genuine, b"probe-udp-ok", via))
    time.sleep(0.5)
    assert "probe-udp-ok" not in htable_dump(b, "e2mseen")


def test_control_kdmq_from_another_port_to_the_sip_port_is_refused(cluster, tmp_path):
    """The same KDMQ to B's SIP port from a port that is not a peer's: 403, not written."""
    a, b = cluster.nodes
    genuine = _genuine_kdmq(cluster, tmp_path)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    stranger.settimeout(3)
    try:
        via = f"Via: SIP/2.0/UDP 127.0.0.1:{stranger.getsockname()[1]};rport;branch=z9hG4bK-c"
        stranger.sendto(_forged(genuine, b"probe-ctl-no", via), ("127.0.0.1", b.port))
        assert parse(stranger.recv(65535)).status == 403
    finally:
        stranger.close()
    time.sleep(0.5)
    assert "probe-ctl-no" not in htable_dump(b, "e2mseen")
