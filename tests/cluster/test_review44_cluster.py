"""Review 44 on a real two-node cluster (PostgreSQL, DMQ, ``start_cluster``): a
stranger's unsigned stray 2xx to INVITE claims a fork slot in the shared database; and a
``dmq_address`` that names an IPv6 SIP listener in an uncompressed spelling passes
review 42's check, starts, replicates, and takes a forged KDMQ on that SIP socket
(``tests/unit/test_review44.py`` has the engine- and config-level tests).

``test_hole_*`` xfail strictly on e492040; ``test_control_*`` pass.

Fixed: a stray INVITE 2xx takes a fork slot only when a key or a signed context touches
it (``ProxyEngine._view``): a stranger's plaintext one claims nothing.  ``dmq_address``
must name an IP address, kept in one spelling (``config.canonical_ip``), and is compared
with the listeners in that spelling.  The IPv6 layout of the hole no longer starts, so
its control (a stranger's port refused on that layout) went with the fix.
"""

from __future__ import annotations

import re
import socket
import time

import psycopg
import pytest

from e2m_lab.cluster import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

_STRAYS = 200


def _stray(node_port: int, sink_port: int, n: int, status: str = "200 OK") -> bytes:
    """A response to an INVITE nobody sent, with a plaintext SDP answer: top Via the
    node, the next one a port where nothing listens (where the node forwards it)."""
    sdp = (b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           b"m=audio 3456 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
    # a 1xx with a To tag and no Record-Route of ours is dropped unread (stop 35): the
    # provisional strays make no dialog, so they are still read
    to_tag = "" if status.startswith("1") else f";tag=t{n}"
    head = (f"SIP/2.0 {status}\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{node_port};branch=z9hG4bK-r44-{n}\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{sink_port};branch=z9hG4bK-r44s-{n}\r\n"
            f"From: <sip:alice@example.com>;tag=s{n}\r\n"
            f"To: <sip:bob@example.com>{to_tag}\r\n"
            f"Call-ID: stray-{n}@attacker.example\r\n"
            f"CSeq: 1 INVITE\r\n"
            f"Contact: <sip:bob@127.0.0.1:{sink_port}>\r\n"
            f"Content-Type: application/sdp\r\n"
            f"Content-Length: {len(sdp)}\r\n\r\n")
    return head.encode() + sdp


def _fork_claims(pg_url: str) -> int:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM replay_claims WHERE name LIKE 'f%'"
                            ).fetchone()[0]


def _spray(node_port: int, status: str) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink_port = sink.getsockname()[1]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for n in range(_STRAYS):
            sender.sendto(_stray(node_port, sink_port, n, status), ("127.0.0.1", node_port))
            time.sleep(0.002)
    finally:
        sender.close()
        sink.close()


def test_hole_strangers_unsigned_stray_200s_fill_the_claims_table(cluster, pg_url):
    """Attacker: a stranger who can send UDP to a node's SIP port (no certificate, no
    account, no dialog, no forged source).

    Attack: 200 UDP datagrams, each a "200 OK" to an INVITE nobody sent (its own
    made-up Call-ID and tags, CSeq ``1 INVITE``) with a plaintext SDP body, sent to node
    A's SIP port (the second Via points at a port where nothing listens).

    Effect: ``ksr_reply_route`` -> ``route_stray_reply`` reads each one (a cluster
    reads replies no transaction matches), ``_view`` calls ``_fork`` (no signed
    context: ``_first_sighting`` passes without a record) and
    ``ClaimedReplayCache.admit_fork`` INSERTs slot 0 of the made-up early dialog into
    the shared ``replay_claims``: one PostgreSQL round trip in a SIP worker and one row,
    alive ``replay_window`` + 33 s, per datagram (and an ``e2mseen`` item replicated to
    the other node).  At line rate the table, its index and the timer's sweep grow with
    the stranger's packet rate; nothing of it keeps a key.

    Fix: claim a fork slot only when the 2xx can move a kept key (the early dialog
    holds one) or its body carries a signed context whose replay record was claimed
    first; a plaintext stray 2xx claims nothing in the database."""
    a, _ = cluster.nodes
    before = _fork_claims(pg_url)
    _spray(a.port, "200 OK")
    time.sleep(0.5)
    added = _fork_claims(pg_url) - before
    assert added == 0, f"{added} fork-slot claims in replay_claims from {_STRAYS} " \
                       "unsigned stray 200s of a stranger"


def test_control_stray_183s_with_the_same_bodies_claim_nothing(cluster, pg_url):
    """The same datagrams as 183s (an early answer claims no fork): no row; and the
    node still answers (its log shows the strays read)."""
    a, _ = cluster.nodes
    before = _fork_claims(pg_url)
    _spray(a.port, "183 Session Progress")
    time.sleep(0.5)
    assert _fork_claims(pg_url) - before == 0
    wait_until(lambda: re.search(r"INVITE response 183", a.log_path.read_text(errors="replace")) is not None, 5,
               "the stray 183s read by node A")


# --------------------------------------------------------------------------- hole 2 on the wire

_LONG_V6 = "0:0:0:0:0:0:0:1"        # ::1 as an operator may write it (not compressed)


def _start_v6_sharing(proxy_factory, db_url: str):
    """Two nodes behind a front (``[cluster] front``, nothing listening there: DMQ does
    not need it).  Each node also serves SIP on IPv6 (``udp:[::1]:Q``, a listener phones
    reach), and its ``dmq_address`` is that socket written uncompressed
    (``sip:[0:0:0:0:0:0:0:1]:Q``), peers the same way."""
    from concurrent.futures import ThreadPoolExecutor

    from e2m_lab.cluster import Cluster, _node_settings, wait_dmq_up
    from e2m_lab.ports import free_port
    port_a = free_port()
    port_b = free_port(avoid={port_a})
    v6_a = free_port(avoid={port_a, port_b})
    v6_b = free_port(avoid={port_a, port_b, v6_a})
    # behind a front (examples/cluster-node-a.toml's layout): no advertise on the listeners
    front = free_port(avoid={port_a, port_b, v6_a, v6_b})
    settings = [_node_settings(db_url, v6_a, v6_b, front),
                _node_settings(db_url, v6_b, v6_a, front)]
    for one, port, own, peer in ((settings[0], port_a, v6_a, v6_b),
                                 (settings[1], port_b, v6_b, v6_a)):
        one["extra"]["cluster"]["dmq_address"] = f"sip:[{_LONG_V6}]:{own}"
        one["extra"]["cluster"]["peers"] = [f"sip:[{_LONG_V6}]:{peer}"]
        one["extra"]["kamailio"] = {"listen": [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}",
                                               f"udp:[::1]:{own}"]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        started_a = pool.submit(proxy_factory, "node-a", port=port_a, **settings[0])
        started_b = pool.submit(proxy_factory, "node-b", port=port_b, **settings[1])
        a, b = started_a.result(), started_b.result()
    cluster = Cluster(a, b)
    wait_dmq_up(cluster.nodes)
    return cluster, v6_a, v6_b


def _genuine_kdmq6(cluster, tmp_path, port_b: int) -> bytes:
    """``test_review40_cluster._genuine_kdmq`` over IPv6: A writes ``probe-from-a``
    into ``e2mseen``; its KDMQ as it reached B's DMQ socket, captured on the wire."""
    import struct

    from e2m_lab.capture import Capture, read_pcap, tcpdump_command
    from e2m_lab.cluster import REPLICATION, htable_dump
    if tcpdump_command() is None:
        pytest.skip("tcpdump cannot capture here")
    a, b = cluster.nodes
    capture = Capture(tmp_path / "dmq6.pcap", bpf=f"ip6 and udp and dst port {port_b}")
    try:
        a.rpc("htable.setxs", "e2mseen", "probe-from-a", "1", "60")
        wait_until(lambda: htable_dump(b, "e2mseen").get("probe-from-a") == "1", REPLICATION,
                   "the peer's write on B")
        time.sleep(0.3)
    finally:
        capture.stop()
    data = capture.path.read_bytes()
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    link = struct.unpack(order + "I", data[20:24])[0]
    skip = 14 if link == 1 else 16 if link == 113 else 4 if link == 0 else 0
    for frame in read_pcap(capture.path):
        ip = frame[skip:]
        if len(ip) > 48 and ip[0] >> 4 == 6 and ip[6] == 17:
            payload = ip[48:]
            if payload.startswith(b"KDMQ ") and b"probe-from-a" in payload:
                return payload
    raise AssertionError("no KDMQ captured")


def _udp6_from(source_port: int, destination_port: int, payload: bytes) -> None:
    """A UDP datagram [::1]:source_port -> [::1]:destination_port written with a raw
    socket (the kernel fills the checksum): a source port a running Kamailio holds."""
    import struct
    header = struct.pack("!HHHH", source_port, destination_port, 8 + len(payload), 0)
    raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
    try:
        raw.setsockopt(socket.IPPROTO_IPV6, 7, 6)      # IPV6_CHECKSUM at offset 6
        raw.sendto(header + payload, ("::1", 0))
    finally:
        raw.close()


def test_hole_kdmq_forged_to_a_sip_socket_spelled_otherwise_is_taken(proxy_factory, pg_url,
                                                                     tmp_path):
    """Attacker: review 40/42's off-path sender who forges a UDP source and reaches a
    SIP listener of the node (here its IPv6 one).

    Precondition: ``[kamailio] listen`` has ``udp:[::1]:Q`` (SIP on IPv6) and
    ``[cluster] dmq_address = "sip:[0:0:0:0:0:0:0:1]:Q"``: the same socket, written
    uncompressed (peers likewise).  Review 42's check compares ``dmq.host`` as written
    with the listener's compressed address, so config and launcher take it; Kamailio
    folds the launcher's second ``listen=`` into the first and DMQ finds its socket (it
    compares addresses): the nodes start and replicate.

    Attack: a genuine KDMQ htable replication captured once, renamed
    (``probe-six-ok``), sent from node A's DMQ address and port (forged, raw socket) to
    node B's IPv6 SIP socket.

    Effect: written into B's ``e2mseen``: ``dmq_accepts`` resolves ``dmq_address`` to
    (``::1``, Q), the very SIP socket.  Review 42's hole in another spelling (a forged
    replay record refuses a fresh request, a removed one lets a replay through,
    dmq_usrloc takes a forged registration).

    Fix: ``_dmq_socket_of_its_own`` compares canonical addresses (``canonical_ip`` of
    both sides, a name resolved), or ``parse_dmq_uri`` stores an IP literal canonical
    and refuses names."""
    from e2m_lab.cluster import htable_dump
    from tests.cluster.test_review40_cluster import _forged
    try:
        cluster, v6_a, v6_b = _start_v6_sharing(proxy_factory, pg_url)
    except Exception as exc:        # refused at start: what the fix makes true
        assert "dmq_address" in str(exc)
        return
    a, b = cluster.nodes
    genuine = _genuine_kdmq6(cluster, tmp_path, v6_b)
    via = f"Via: SIP/2.0/UDP [::1]:{v6_a};branch=z9hG4bK-r44six"
    _udp6_from(v6_a, v6_b, _forged(genuine, b"probe-six-ok", via))
    time.sleep(0.5)
    assert "probe-six-ok" not in htable_dump(b, "e2mseen")
