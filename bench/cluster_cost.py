"""What DMQ replication costs per dialog: one home node against node A of a two-node
cluster (issue 16 §3), on loopback.

Both configurations use the same private PostgreSQL for the archive (``[cluster]
db_url``); the cluster adds DMQ (``dmq_address``, ``peers``): the registrations and
the key cache, dialog index and replay record replicated to node B.  Each dialog is
alice's INVITE with an encrypted offer, bob's encrypted answer (read by the node with
the key it kept), the ACK and the BYE, one after the other from one thread
(``e2m_lab.cluster`` phones).  Reported per configuration: dialogs, the median and
95th percentile of a dialog's wall time, and (when tcpdump can capture) the KDMQ
requests and octets that reached node B per dialog, and the claims the cluster made
in its shared database per dialog (replay records and fork slots: one round trip each
on the request's or response's path).

    .venv/bin/python bench/cluster_cost.py --dialogs 40

JSON to bench/results/cluster-cost-<UTC time>.json.  A benchmark, not a test: its
times move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from e2m_lab.cluster import Alice, Bob, register_bob, start_cluster, wait_until
from e2m_lab.flows import SDP_ANSWER
from e2m_lab.kamailio_harness import ProxyStarter

ROOT = Path(__file__).resolve().parents[1]


def _dialogs(node, pki, bob: Bob, count: int) -> list[float]:
    times = []
    for _ in range(count):
        alice = Alice(pki)
        try:
            started = time.perf_counter()
            reply = alice.call(node)
            assert reply is not None and reply.status == 200, reply and reply.status
            assert alice.open(reply) == SDP_ANSWER
            alice.ack(node)
            ended = alice.bye(node)
            assert ended is not None and ended.status == 200
            times.append(time.perf_counter() - started)
        finally:
            alice.close()
    return times


def _claims(url: str) -> int:
    """Rows in ``replay_claims`` (replay records and fork slots claimed by the nodes;
    each lives longer than the run)."""
    import psycopg
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM replay_claims WHERE name <> '~probe'").fetchone()[0]


def _summary(name: str, times: list[float], kdmq: tuple[int, int] | None) -> dict:
    ordered = sorted(times)
    out = {"configuration": name, "dialogs": len(times),
           "median_ms": round(statistics.median(ordered) * 1000, 2),
           "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)] * 1000, 2)}
    if kdmq is not None:
        out["kdmq_per_dialog"] = round(kdmq[0] / len(times), 2)
        out["kdmq_octets_per_dialog"] = round(kdmq[1] / len(times))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialogs", type=int, default=40)
    args = parser.parse_args(argv)
    from e2m_lab.capture import Capture, tcpdump_command
    from e2m_lab.cluster import dmq_port
    from e2m_lab.postgres import PostgresServer
    from e2m_plugins.testpki import init_test_pki

    work = Path(tempfile.mkdtemp(prefix="e2m-cluster-cost-"))
    pki = init_test_pki(work / "pki", domain="example.com", proxy_hosts=("proxy.example.com",),
                        users=("alice", "bob"), key_type="rsa")
    pg = PostgresServer()
    results = []
    try:
        pg.start()
        # one node: the shared archive, no DMQ
        starter = ProxyStarter(pki, work / "single")
        bob = Bob(pki)
        try:
            node = starter("node", db_url=pg.create_database("single"),
                           view=("INVITE:application/sdp",))
            register_bob(node, bob)
            _dialogs(node, pki, bob, 3)                   # warm the workers
            results.append(_summary("one node", _dialogs(node, pki, bob, args.dialogs), None))
        finally:
            bob.close()
            starter.stop_all()
        # two nodes, replication on; dialogs through A, KDMQ counted at B
        starter = ProxyStarter(pki, work / "cluster")
        bob = Bob(pki)
        try:
            cluster_db = pg.create_database("cluster")
            cluster = start_cluster(starter, cluster_db)
            register_bob(cluster.a, bob)
            wait_until(lambda: cluster.b.rpc("ul.lookup", "location", "bob").count("Address"),
                       3, "bob on B")
            _dialogs(cluster.a, pki, bob, 3)
            capture = None
            if tcpdump_command() is not None:
                capture = Capture(work / "dmq.pcap", bpf=f"udp and dst port {dmq_port(cluster.b)}")
            claims_before = _claims(cluster_db)
            try:
                times = _dialogs(cluster.a, pki, bob, args.dialogs)
                time.sleep(0.5)
            finally:
                if capture is not None:
                    capture.stop()
            kdmq = None
            if capture is not None:
                sent = [p for _, _, p in capture.datagrams() if p.startswith(b"KDMQ ")]
                kdmq = (len(sent), sum(len(p) for p in sent))
            results.append(_summary("two nodes, DMQ replication", times, kdmq))
            # the shared database's claims (review 37, 39): a round trip each, on the path
            results[-1]["claims_per_dialog"] = round(
                (_claims(cluster_db) - claims_before) / len(times), 2)
        finally:
            bob.close()
            starter.stop_all()
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "cluster-cost", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "results": results}
    out = ROOT / "bench" / "results" / f"cluster-cost-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for row in results:
        print(json.dumps(row))
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
