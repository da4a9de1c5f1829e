"""``make demo-cluster``: a home domain on two Kamailio nodes, one killed mid-call.

Two home nodes (``e2m-proxy`` with ``[cluster]``: DMQ between them, the archive and
users in one PostgreSQL) and a private PostgreSQL (``e2m_lab.postgres``), all on
loopback.  The phones are the core's UA engines on UDP sockets (``e2m_lab.cluster``:
alice calls, bob answers, each body protected end to end and readable by the domain's
proxy), not pjsua2 softphones.  The demo:

1. bob registers at node A; node B serves the registration too (dmq_usrloc);
2. alice calls bob through node A with an encrypted SDP offer; bob's answer comes
   back through node B (the domain's floating address moved), which opens it with the
   key A kept (htable replication, the entry sealed for the domain's nodes only);
3. node A is killed with SIGKILL in the middle of the call;
4. alice's re-INVITE and a MESSAGE to bob go through node B, then her BYE: the call
   survived, the keys are gone;
5. node A is started again and catches up from B (DMQ sync) at once;
6. the shared archive holds every body either node read: nothing A archived is lost.

It prints what each node saw (its log lines about bodies, and its counters) and ends
with ``DEMO PASSED`` (exit 0) only if every expectation held, else ``DEMO FAILED``
(exit 1).  Every process it starts is stopped, also on failure or Ctrl-C.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .cluster import (REPLICATION, Alice, Bob, Cluster, answers, contacts, counters,
                      register_bob, start_cluster, wait_until)
from .flows import SDP_ANSWER, SDP_OFFER
from .kamailio_harness import ProxyHandle, ProxyStarter, SipUa

MOVED_OFFER = SDP_OFFER.replace(b"49170", b"49180")    # what alice's re-INVITE offers
_SEEN = re.compile(r"e2m: (\S+ (?:request|response)(?: \d+)? action=\S+ seen=\S+)")


class Demo:
    """The steps, each one checked; ``results`` lists (expectation, held)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.results: list[tuple[str, bool]] = []

    def expect(self, what: str, held: bool) -> bool:
        self.results.append((what, bool(held)))
        print(f"  [{'ok' if held else 'FAILED'}] {what}", flush=True)
        return bool(held)

    def run(self) -> bool:
        from e2m_plugins.testpki import init_test_pki
        from .postgres import PostgresServer
        print("e2m demo-cluster: two home nodes, one PostgreSQL, two phones (on loopback; "
              "the phones are the core's UA engines on UDP sockets, not pjsua2)")
        pki = init_test_pki(self.work / "pki", domain="example.com",
                            proxy_hosts=("proxy.example.com",), users=("alice", "bob"),
                            key_type="rsa")
        pg = PostgresServer()
        starter = ProxyStarter(pki, self.work)
        alice, bob = Alice(pki), Bob(pki)
        cluster = None
        try:
            pg.start()
            print(f"PostgreSQL on 127.0.0.1:{pg.port}; starting node A and node B ...")
            cluster = start_cluster(starter, pg.create_database("demo"))
            print(f"node A on {cluster.a.uri}, node B on {cluster.b.uri}; DMQ peers up")
            self.call(cluster, alice, bob)
        finally:
            if cluster is not None:
                self.report(cluster)
            alice.close()
            bob.close()
            starter.stop_all()
            pg.stop()
        return bool(self.results) and all(held for _, held in self.results)

    def call(self, cluster: Cluster, alice: Alice, bob: Bob) -> None:
        a, b = cluster.nodes
        print("\n1. bob registers at node A")
        register_bob(a, bob)
        self.expect("node B serves bob's registration made at A (dmq_usrloc)",
                    _within(lambda: contacts(b, "bob"), REPLICATION))

        print("2. alice calls bob through node A; his answer comes back through node B")
        bob.answer_to = b.port
        reply = alice.call(a)
        ok = reply is not None and reply.status == 200
        self.expect("the call is answered (200)", ok)
        if not ok:
            return
        self.expect("alice opens bob's answer", alice.open(reply) == SDP_ANSWER)
        self.expect("node B opened the answer with the key node A kept",
                    [r.plaintext for r in answers(b, alice.call_id)] == [SDP_ANSWER])
        alice.ack(b)
        self.expect("node B holds the call's keys (replicated)",
                    _within(lambda: b.htable_items() > 0, REPLICATION))

        print("3. node A is killed (SIGKILL) in the middle of the call")
        print(f"   node A's counters before: {_nonzero(counters(a))}")
        a.kill()
        self.expect("node A is gone", not a.alive() and a.options(timeout=0.3) is None)

        print("4. alice's re-INVITE, a MESSAGE to bob and the BYE go through node B")
        again = alice.reinvite(b)
        self.expect("the re-INVITE through B is answered and its answer opens",
                    again is not None and again.status == 200
                    and alice.open(again) == SDP_ANSWER)
        carol = SipUa(b.port, user="carol")
        try:
            sent = carol.message("bob", b"are you still there?")
        finally:
            carol.close()
        self.expect("bob (registered at A) gets a MESSAGE through B",
                    sent is not None and sent.status == 200)
        ended = alice.bye(b)
        self.expect("the BYE through B ends the call (200)",
                    ended is not None and ended.status == 200)
        self.expect("the call's keys are gone from node B",
                    _within(lambda: b.htable_items() == 0, REPLICATION))

        print("5. node A starts again")
        second = Alice(alice.pki)
        try:
            up = second.call(b)                  # a call set up on B while A is down
            if up is not None and up.status == 200:
                second.ack(b)
            started = a.start()
            self.expect("node A is back", started)
            if started:
                synced = time.monotonic()
                caught = _within(lambda: contacts(a, "bob")
                                 and a.htable_items() == b.htable_items() > 0, 5)
                print(f"   caught up {time.monotonic() - synced:.2f} s after it answered")
                self.expect("node A caught up from B: bob's registration and the keys of "
                            "the call B carries (DMQ sync)", caught)
                bye = second.bye(a)
                self.expect("that call ends through node A", bye is not None and bye.status == 200)
        finally:
            second.close()

        print("6. the shared archive")
        rows = [(r.direction, r.plaintext) for r in b.archive_rows()
                if r.call_id == alice.call_id]
        self.expect("every body of the call is archived once: A's offer and B's answer, "
                    "B's re-INVITE and its answer",
                    rows == [("request", SDP_OFFER), ("response", SDP_ANSWER),
                             ("request", MOVED_OFFER), ("response", SDP_ANSWER)])

    def report(self, cluster: Cluster) -> None:
        print("\nwhat each node saw:")
        for node, label in ((cluster.a, "node A"), (cluster.b, "node B")):
            print(f"  {label} ({node.uri}):")
            for line in _seen_lines(node):
                print(f"    {line}")
            if node.alive():
                print(f"    counters now (since its last start): {_nonzero(counters(node))}")


def _nonzero(values: dict[str, int]) -> dict[str, int]:
    return {name: value for name, value in values.items() if value}


def _seen_lines(node: ProxyHandle) -> list[str]:
    """The node's one-line summaries of what it read (no body is ever logged)."""
    return [match.group(1) for match in _SEEN.finditer(node.log_since(0))]


def _within(check, timeout: float) -> bool:
    try:
        wait_until(check, timeout, "")
        return True
    except AssertionError:
        return False


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="e2m-demo-cluster-"))
    # Ctrl-C or SIGTERM: unwind through the finally blocks, which stop everything
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        passed = Demo(work).run()
    except Exception as exc:  # noqa: BLE001 - any failure is a failed demo, said plainly
        print(f"\nerror: {type(exc).__name__}: {exc}")
        passed = False
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nDEMO PASSED" if passed else "\nDEMO FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
