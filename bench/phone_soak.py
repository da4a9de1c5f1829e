"""Phone soak: an ``e2m-phone listen`` (bob) under mixed hostile and valid traffic for a
long time, its memory sampled throughout (issue 13).

Processes, all on loopback and free ports, no Kamailio: bob (UDP, E2M required, the
phone under test), alice (a second ``e2m-phone``, her outbound proxy set to bob's
address so her MESSAGEs reach him directly), a silent HTTP server (a cert-url that
never answers), and this script as the stranger.

Valid traffic: alice sends bob an E2M MESSAGE every ``--valid-interval`` seconds (0.5);
each must be answered 200 at alice (``message_sent``) and arrive at bob
(``message_in``).

Hostile traffic, round after round from one UDP socket, each round answered by an
OPTIONS before the next (so bob's socket buffer never overflows and "answered" means
"handled"):

``refused``     plaintext MESSAGEs with a 3 KB Call-ID (bob answers 488, logs an error)
``stray493``    493s with a certificate, answering nothing bob sent
``invite``      body-less INVITEs from an unknown caller (refused at once, 403)
``policies``    OPTIONS announcing 30 policies whose cert-url never answers
``garbage``     datagrams that are no SIP, and one with invalid UTF-8 in From
``spoofed``     a MESSAGE "from alice" with a plaintext body (488)

Memory: bob's VmRSS every ``--sample`` seconds.  Flat means: the median of the last
third of the samples is at most ``--tolerance`` MiB (default 6) above the median of
the first third, the first ``--warmup`` seconds (default 5) left out.  What fills
legitimately: the stores hostile traffic fills (events 1000, errors 256, the hook's
256 failures) are full within seconds; the ones valid messages fill (the endpoint's
callback log, 256 whole messages; the 512-entry security memos; the engine's replay
cache, 332 s of signed bodies) take a few minutes at 2 messages/s and hold about 2 MB
together.  An unbounded store instead grows by ~3.5 MB per 1000 refused 3 KB
messages, and a run sends ~1600 of those per second; hence 6 MiB.

Result: JSON in ``bench/results/phone-soak-<UTC>.json`` (or ``--out``); exit 0 only
when every valid MESSAGE was answered and delivered, bob never stopped, and memory is
flat.

    python bench/phone_soak.py --seconds 600          # make soak-phone
    python bench/phone_soak.py --seconds 40           # the make test form
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

from e2m_lab.phones import PhoneProcess, redact, write_ua  # noqa: E402 (the venv has the project)
from e2m_lab.stranger import (CertServer, UdpStranger, rss_kib, sip_request,  # noqa: E402
                              sip_response)
from e2m_plugins.testpki import init_test_pki  # noqa: E402

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"
POLICY_HOSTS = [f"127.0.0.{i}" for i in range(1, 31)]


def _hostile_round(stranger: UdpStranger, bob_port: int, cert: bytes, server: CertServer,
                   index: int) -> dict[str, int]:
    """One round of every hostile kind; returns how many of each were sent."""
    sent = {"refused": 0, "stray493": 0, "invite": 0, "policies": 0, "garbage": 0,
            "spoofed": 0}
    pad = "c" * 3000
    for n in range(8):
        stranger.send(sip_request("MESSAGE", stranger.target, via=stranger.via,
                                  call_id=f"{pad}-{index}-{n}", body=b"plaintext",
                                  content_type="text/plain"))
        sent["refused"] += 1
    for _ in range(8):
        stranger.send(sip_response(493, "Undecipherable", method="MESSAGE",
                                   via=f"SIP/2.0/UDP 127.0.0.1:{bob_port}", body=cert,
                                   content_type="application/pkix-cert"))
        sent["stray493"] += 1
    stranger.request("INVITE")
    sent["invite"] += 1
    if index % 10 == 0:
        stranger.request("OPTIONS", headers=[
            ("Proxy-Body-Policy", f'{h};view="MESSAGE:*";cert-url="{server.url(h)}"')
            for h in POLICY_HOSTS])
        sent["policies"] += 1
    stranger.send(b"\x00\xff garbage that is no SIP at all " * 20)
    stranger.request("MESSAGE", from_='"\udcff\udcfe" <sip:mallory@example.net>;tag=g1',
                     body=b"x", content_type="text/plain")
    sent["garbage"] += 2
    stranger.request("MESSAGE", from_=f"<{ALICE}>;tag=sp", body=b"hello from 'alice'",
                     content_type="text/plain")
    sent["spoofed"] += 1
    return sent


def run_phone_soak(seconds: float, workdir: Path, *, sample: float = 1.0,
                   valid_interval: float = 0.5, warmup: float = 5.0,
                   tolerance_mib: float = 6.0, hostile_traffic: bool = True,
                   bob_e2m: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the soak; returns the result (see the module docstring)."""
    pki = init_test_pki(workdir / "pki", users=("alice", "bob"), key_type="ec")
    assert pki.directory is not None
    server = CertServer("silent", hosts=POLICY_HOSTS)
    (workdir / "bob").mkdir(exist_ok=True)
    (workdir / "alice").mkdir(exist_ok=True)
    bob_cfg = write_ua(workdir / "bob", "bob", pki.directory, peer="alice",
                       phone={"srtp": True, "fetch_timeout": 2.0},
                       e2m={"accept_proxies": POLICY_HOSTS, **(bob_e2m or {})})
    # only what the result needs: bob prints an event for every hostile message
    bob = PhoneProcess(bob_cfg, "bob", keep_kinds={"started", "status", "message_in",
                                                    "result"})
    alice: PhoneProcess | None = None
    stranger: UdpStranger | None = None
    samples: list[tuple[float, int]] = []
    hostile = {"refused": 0, "stray493": 0, "invite": 0, "policies": 0, "garbage": 0,
               "spoofed": 0, "rounds": 0, "unanswered_probes": 0}
    valid_sent = 0
    stop = threading.Event()
    try:
        bob_port = bob.port
        alice_cfg = write_ua(workdir / "alice", "alice", pki.directory, peer="bob",
                             phone={"srtp": True, "proxy": f"sip:127.0.0.1:{bob_port}"})
        alice = PhoneProcess(alice_cfg, "alice")
        alice.wait("started", timeout=15)
        stranger = UdpStranger(bob_port)
        cert = (pki.directory / "alice.crt").read_bytes()

        def sampler() -> None:
            while not stop.wait(sample):
                samples.append((time.monotonic(), rss_kib(bob.pid)))

        start = time.monotonic()
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        next_valid = start
        end = start + seconds
        while time.monotonic() < end and bob.alive:
            now = time.monotonic()
            if now >= next_valid:
                valid_sent += 1
                alice.send(f"message {BOB} valid message {valid_sent}")
                next_valid = now + valid_interval
            if hostile_traffic:
                for kind, count in _hostile_round(stranger, bob_port, cert, server,
                                                  hostile["rounds"]).items():
                    hostile[kind] += count
                hostile["rounds"] += 1
            else:
                time.sleep(0.01)
            if stranger.probe(timeout=5) is None:
                hostile["unanswered_probes"] += 1
            stranger.drain()
        stop.set()
        thread.join(timeout=5)
        # let the last valid MESSAGEs finish (UDP retransmissions at most 32 s)
        deadline = time.monotonic() + 35
        while time.monotonic() < deadline and len(alice.of("message_sent")) \
                + len(alice.of("message_failed")) < valid_sent:
            time.sleep(0.2)
        time.sleep(0.5)
        status = bob.status() if bob.alive else None
    finally:
        stop.set()
        bob_alive = bob.alive
        for proc in (alice, bob):
            if proc is not None:
                proc.stop()
        if stranger is not None:
            stranger.close()
        server.close()

    answered = [e for e in alice.of("message_sent")] if alice else []
    failed = alice.of("message_failed") if alice else []
    received = [e for e in bob.of("message_in") if e.get("from_uri", "").find("alice") >= 0
                and e.get("security") and e["security"].get("encrypted")]
    window = [(t, r) for t, r in samples if t - samples[0][0] >= warmup] if samples else []
    third = max(1, len(window) // 3)
    first = statistics.median(r for _, r in window[:third]) if window else 0
    last = statistics.median(r for _, r in window[-third:]) if window else 0
    growth_mib = (last - first) / 1024
    flat = bool(window) and growth_mib <= tolerance_mib
    ok_valid = valid_sent > 0 and len(answered) == valid_sent and not failed \
        and all(e["code"] == 200 for e in answered) and len(received) == valid_sent
    result = {
        "when": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "seconds": seconds, "sample_seconds": sample, "warmup_seconds": warmup,
        "valid": {"sent": valid_sent, "answered_200": len(answered), "failed": len(failed),
                  "received_encrypted": len(received), "ok": ok_valid},
        "hostile": hostile,
        "memory": {"samples": len(samples), "first_kib": samples[0][1] if samples else None,
                   "max_kib": max((r for _, r in samples), default=None),
                   "first_third_median_kib": first, "last_third_median_kib": last,
                   "growth_mib": round(growth_mib, 2), "tolerance_mib": tolerance_mib,
                   "flat": flat, "rss_kib": [r for _, r in samples]},
        "bob_alive_at_end": bob_alive, "bob_status": status,
        "bob_rc": bob.process.returncode,
        "bob_stderr_tail": bob.stderr()[-2000:],
        "bob_last_events": [redact(e) for e in bob.events[-10:]],
        "bob_event_counts": dict(bob.counts),
    }
    result["ok"] = bool(ok_valid and flat and bob_alive)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--sample", type=float, default=1.0)
    parser.add_argument("--valid-interval", type=float, default=0.5)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--tolerance", type=float, default=6.0, help="MiB")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="e2m-phone-soak-") as tmp:
        result = run_phone_soak(args.seconds, Path(tmp), sample=args.sample,
                                valid_interval=args.valid_interval, warmup=args.warmup,
                                tolerance_mib=args.tolerance)
    out = args.out or RESULTS_DIR / f"phone-soak-{result['when']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    mem, valid = result["memory"], result["valid"]
    print(f"phone soak {args.seconds:.0f} s: valid {valid['answered_200']}/{valid['sent']} "
          "answered, "
          f"{valid['received_encrypted']} delivered; hostile rounds {result['hostile']['rounds']} "
          f"({result['hostile']['refused']} refused MESSAGEs, {result['hostile']['stray493']} "
          f"stray 493s, {result['hostile']['invite']} INVITEs); RSS first third "
          f"{mem['first_third_median_kib'] / 1024:.1f} MiB, last third "
          f"{mem['last_third_median_kib'] / 1024:.1f} MiB (growth {mem['growth_mib']} MiB, "
          f"tolerance {mem['tolerance_mib']}); {'OK' if result['ok'] else 'FAILED'} -> {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
