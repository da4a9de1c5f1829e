"""Soak: SIPp through the trusted E2M proxy (real Kamailio started by ``e2m-proxy``) for
a long time at half load, with Kamailio's shared and private memory sampled throughout.

Traffic, two SIPp UACs at once, alice -> proxy -> a SIPp UAS (bob, the proxy's next_hop):

``message``  one MESSAGE per call: text encrypted for bob and the proxy (X25519 kari),
             the proxy opens it; 200 without a body.
``dialog``   one INVITE dialog per call with CEK reuse (RFC 3185): the offer encrypted for
             bob and the proxy (kari, with a CEKReference), the 200's answer made by bob's
             UA engine under the offer's CEK (kekri); the proxy keeps the CEK in its
             shared htable for the answer and drops it on BYE.  ACK, BYE, 200.

The bodies are made once by the core's UA engines with ``bind=False`` (envelopes
without the SIP context, which the proxy takes only because alice and bob are named
``[policy] legacy_peers``), so one envelope serves every call while SIPp makes fresh
Call-IDs and tags.

Rate: half load.  The highest zero-failure rates come from the benchmark's results
(``bench/results/proxy-rates-*.json``: ``message``/``x25519`` and ``dialog``/``kekri``,
the highest ``max_clean_rate`` recorded); without results a quick ladder is measured
here.  Both workloads run at once, so each gets a quarter of its own highest clean
rate: the two fractions add up to one half of what the proxy can do.

Memory: every ``SOAK_SAMPLE_SECONDS`` (default 10) ``kamcmd core.shmmem`` (shared:
used, real_used, fragments) and ``kamcmd pkg.stats`` (private memory of every
process, summed and the largest), plus the key cache's entry count.  Flatness is
judged on the samples from minute 4 to the end, once an INVITE's branch note (222 s)
has filled its table (for runs shorter than 8 minutes: from the end of the first third): least-squares slope, growth over the window
(slope x window) and max - min.  "Drained" compares a sample after the traffic with
one before it, once the fork slots (the replay table ``e2mseen``, one per answered
dialog, each living the replay window), the branch notes (``e2mbranch``, 64 s, and
``e2minvbranch``, 222 s for an INVITE) and the loop notes (``e2mloop``, 32 s: one per
relayed request) are counted and flushed: they outlive the traffic by design, and their
number follows the rate the ladder chose.

Result: JSON in ``bench/results/soak-<UTC>.json`` (or ``--out``); exit 0 only with
zero failed calls, memory flat and no Python traceback in the Kamailio log.

    SOAK_SECONDS=600 python bench/soak.py            # make soak
    python bench/soak.py --seconds 60 --sample 5     # the CI version
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

from e2m_plugins.testpki import TestPKI, init_test_pki  # noqa: E402
from e2m_plugins.config import KnownProxy  # noqa: E402
from e2m_plugins.sip import SipMessage  # noqa: E402

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, TRUSTED, answer, invite, message, rules, ua_engine
from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_lab.processes import stop_process
from e2m_lab.sipp import sipp_stats, start_sipp
from e2m_lab.wire import memory_sample, pkg_moved, pkg_over_common_processes

# proxyrates is this script's neighbour: run as `python bench/soak.py`, bench/ is on the path
import proxyrates as pr  # noqa: E402  (the SIPp scenario header block)

TEXT = (b"Soak test text: the figures for the quarter are in the ticket, please keep "
        b"them inside the team until Friday.")
FALLBACK_LADDER = {"message": [50, 100, 200, 400, 800], "dialog": [15, 30, 60, 120, 240]}
SOURCE_CONFIG = {"message": "x25519", "dialog": "kekri"}   # what this soak runs

# --------------------------------------------------------------------------- bodies

@dataclass
class Bodies:
    message: SipMessage
    offer: SipMessage
    answer: SipMessage


def make_bodies(pki: TestPKI) -> Bodies:
    proxy = KnownProxy(TRUSTED, pki.proxy(TRUSTED, "x25519").cert,
                       rules("MESSAGE:text/plain", "INVITE:application/sdp"), rules())
    alice = ua_engine(pki, "alice", proxies=(proxy,), bind=False, cek_reuse=True)
    bob = ua_engine(pki, "bob", proxies=(proxy,), bind=False, cek_reuse=True,
                    require_signature=False)   # it opens alice's unbound offer
    sent = alice.protect(message(pki, TEXT))
    offer = alice.protect(invite(pki, SDP_OFFER))
    reply = bob.protect(answer(bob.open(offer.message).message, SDP_ANSWER))
    assert sent.info.readable_by == (TRUSTED,) and offer.info.readable_by == (TRUSTED,)
    assert reply.info.key_reuse, "the answer must go under the offer's CEK (kekri)"
    return Bodies(sent.message, offer.message, reply.message)


# --------------------------------------------------------------------------- rates

def benchmark_rates() -> dict[str, Any] | None:
    """The highest zero-failure rate per workload from the newest bench/proxyrates.py
    result that has both (older results were measured on older code)."""
    for path in sorted(glob.glob(str(RESULTS_DIR / "proxy-rates-*.json")), reverse=True):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        found = {}
        for row in data.get("figures", []):
            workload = row.get("workload")
            if SOURCE_CONFIG.get(workload) == row.get("config") and row.get("max_clean_rate"):
                found[workload] = {"rate": float(row["max_clean_rate"]), "source": Path(path).name,
                                   "config": row["config"],
                                   "first_failing_rate": row.get("first_failing_rate")}
        if set(found) == set(SOURCE_CONFIG):
            return found
    return None


# --------------------------------------------------------------------------- SIPp

_COUNTERS = ("SuccessfulCall(C)", "FailedCall(C)", "Retransmissions(C)", "TotalCallCreated",
             "OutOfCallMsgs(C)", "DeadCallMsgs(C)", "FailedMaxUDPRetrans(C)",
             "FailedUnexpectedMessage(C)", "FailedCallRejected(C)", "FailedCmdNotSent(C)",
             "FailedRegexpDoesntMatch(C)", "FailedRegexpHdrNotFound(C)", "FailedOutboundCongestion(C)",
             "FailedTimeoutOnRecv(C)", "FailedTimeoutOnSend(C)")





def uac(proxy: ProxyHandle, scenario: Path, body: Path, rate: float, calls: int,
        workdir: Path, tag: str) -> tuple[subprocess.Popen, Path, Path]:
    stats = workdir / f"{tag}.csv"
    errors = workdir / f"{tag}-errors.log"
    args = ["sipp", f"127.0.0.1:{proxy.port}", "-sf", str(scenario), "-i", "127.0.0.1",
            "-nostdin", "-r", f"{rate:g}", "-rp", "1000",
            "-m", str(calls), "-recv_timeout", "8000", "-key", "bodyfile", str(body),
            "-trace_stat", "-stf", str(stats), "-fd", "5",
            "-trace_err", "-error_file", str(errors)]
    # ports from start_sipp (retried on fresh ones if SIPp cannot bind); stderr kept
    process, _ = start_sipp(args, cwd=workdir, output=workdir / f"{tag}.stderr",
                            screen=False, exit_ok=True)
    return process, stats, errors


# --------------------------------------------------------------------------- world

@dataclass
class World:
    proxy: ProxyHandle
    uas: subprocess.Popen
    scenarios: dict[str, Path]
    bodies: dict[str, Path]
    workdir: Path

    def stop(self) -> None:
        stop_process(self.uas)
        self.proxy.stop()


def start_world(workdir: Path, *, archive: bool, workers: int, log_level: str) -> World:
    pki = init_test_pki(workdir / "pki", domain="example.com", proxy_hosts=(TRUSTED,),
                        users=("alice", "bob"), key_type="rsa")
    pki.proxy(TRUSTED, "x25519")
    made = make_bodies(pki)
    bodies = {"message": workdir / "message.bin", "offer": workdir / "offer.bin",
              "answer": workdir / "answer.bin"}
    bodies["message"].write_bytes(made.message.body)
    bodies["offer"].write_bytes(made.offer.body)
    bodies["answer"].write_bytes(made.answer.body)
    # the rate benchmark's scenarios: two UACs at once are told apart by SIPp's [pid]
    scenarios = {"message": pr.render_scenario("uac_message.tmpl.xml", made.message,
                                               workdir / "uac_message.xml"),
                 "dialog": pr.render_scenario("uac_dialog.tmpl.xml", made.offer,
                                              workdir / "uac_dialog.xml"),
                 "uas": pr.render_scenario("uas.tmpl.xml", made.answer, workdir / "uas.xml")}
    # every port SIPp binds is a fresh one; a start that loses a port is retried
    uas_proc, uas_ports = start_sipp(
        ["sipp", "-sf", str(scenarios["uas"]), "-i", "127.0.0.1", "-nostdin",
         "-key", "answerfile", str(bodies["answer"]), "-trace_err",
         "-error_file", str(workdir / "uas-errors.log")],
        cwd=workdir, output=workdir / "uas.out")
    uas_port = uas_ports.sip
    try:
        cred = pki.proxy(TRUSTED, "x25519")
        proxy = start_proxy(workdir / "proxy", pki=pki, e2m=True, next_hop=f"sip:127.0.0.1:{uas_port}",
                            workers=workers, log_level=log_level, archive=archive,
                            extra={"identity": {"cert": str(cred.cert_path), "key": str(cred.key_path)},
                                   "kamailio": {"shm_mb": 128},
                                   # one body for every call: no SIP context, so alice
                                   # and bob must be legacy senders (see make_bodies)
                                   "policy": {"legacy_peers": [pki.aor("alice"),
                                                                 pki.aor("bob")]}})
    except BaseException:
        stop_process(uas_proc)
        raise
    return World(proxy, uas_proc, scenarios, bodies, workdir)


def quick_ladder(world: World, log) -> dict[str, Any]:
    """Without benchmark results: the highest rate of a short ladder with zero failures."""
    out = {}
    for workload, ladder in FALLBACK_LADDER.items():
        best = None
        for rate in ladder:
            body = world.bodies["message" if workload == "message" else "offer"]
            proc, stats, _ = uac(world.proxy, world.scenarios[workload], body, rate,
                                 int(rate * 3), world.workdir, f"ladder-{workload}-{rate}")
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(proc)
            counts = sipp_stats(stats, _COUNTERS)
            clean = (proc.returncode == 0 and counts.get("FailedCall(C)", 1) == 0
                     and counts.get("SuccessfulCall(C)", 0) == int(rate * 3))
            log(f"ladder {workload} {rate}/s: {counts.get('SuccessfulCall(C)')} ok, "
                f"{counts.get('FailedCall(C)')} failed -> {'clean' if clean else 'NOT clean'}")
            if not clean:
                break
            best = rate
            time.sleep(1)
        out[workload] = {"rate": float(best or ladder[0] / 2), "source": "measured here (quick ladder)",
                         "config": SOURCE_CONFIG[workload]}
    return out


# --------------------------------------------------------------------------- analysis

def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (units per second)."""
    if len(points) < 3:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


MEMORY_SERIES = ("shm_real_used", "shm_used", "pkg_real_used_sum", "pkg_real_used_max",
                 "rss_anon_sum", "rss_anon_max")
# Flat means: growth over the window (slope x window length) at most this, in bytes,
# or this share of the series' mean, whichever is larger.
FLAT_BYTES = {"shm_real_used": 1 << 20, "shm_used": 1 << 20,
              "pkg_real_used_sum": 512 << 10, "pkg_real_used_max": 256 << 10,
              "rss_anon_sum": 2 << 20, "rss_anon_max": 1 << 20}
FLAT_SHARE = 0.02


def analyse(samples: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Flatness while traffic runs (samples marked ``phase == "load"``)."""
    loaded = [s for s in samples if s.get("phase") == "load"]
    # after the longest-lived note has filled (an INVITE's branch note, 222 s): till
    # then its table grows by design
    start = 240.0 if seconds >= 480 else seconds / 3
    window = [s for s in loaded if s["t"] >= start]
    first = [s for s in loaded if s["t"] < seconds / 3]
    last = [s for s in loaded if s["t"] >= 2 * seconds / 3]
    out: dict[str, Any] = {"window_from_s": round(start, 1), "window_samples": len(window)}
    flat = True
    for name in MEMORY_SERIES:
        points = [(s["t"], float(s[name])) for s in window if s.get(name) is not None]
        values = [p[1] for p in points]
        k = slope(points)
        span = (points[-1][0] - points[0][0]) if len(points) > 1 else 0.0
        growth = None if k is None else k * span
        bound = max(FLAT_BYTES[name], FLAT_SHARE * statistics.fmean(values)) if values else None
        ok = growth is not None and growth <= bound
        flat = flat and ok
        third = None
        f = [s[name] for s in first if s.get(name) is not None]
        la = [s[name] for s in last if s.get(name) is not None]
        if f and la:
            third = statistics.fmean(la) - statistics.fmean(f)
        out[name] = {"slope_bytes_per_min": None if k is None else round(k * 60, 1),
                     "growth_over_window_bytes": None if growth is None else round(growth),
                     "max_minus_min_bytes": (max(values) - min(values)) if values else None,
                     "min": min(values) if values else None, "max": max(values) if values else None,
                     "mean": round(statistics.fmean(values)) if values else None,
                     "flat_bound_bytes": None if bound is None else round(bound),
                     "flat": ok, "last_third_minus_first_third_bytes":
                         None if third is None else round(third)}
    out["flat"] = flat
    return out


# --------------------------------------------------------------------------- run

def run(seconds: float, sample_every: float, load: float, out: Path | None,
        archive: bool, workers: int, log_level: str, log=print) -> dict[str, Any]:
    began = datetime.now(timezone.utc)
    workdir = Path(tempfile.mkdtemp(prefix="e2m-soak-"))
    world = start_world(workdir, archive=archive, workers=workers, log_level=log_level)
    result: dict[str, Any] = {}
    try:
        maxima = benchmark_rates()
        if maxima is None:
            log("no proxy-rates results in bench/results: measuring a quick ladder")
            maxima = quick_ladder(world, log)
            time.sleep(2)
        share = load / 2          # two workloads at once: each a share of its own maximum
        rates = {w: max(1.0, round(m["rate"] * share, 1)) for w, m in maxima.items()}
        calls = {w: max(1, int(rates[w] * seconds)) for w in rates}
        log(f"soak {seconds:.0f} s: MESSAGE {rates['message']}/s, INVITE dialogs "
            f"{rates['dialog']}/s ({share:.2f} of each highest clean rate: "
            f"{maxima['message']['rate']:.0f} and {maxima['dialog']['rate']:.0f})")
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()

        def sample(phase: str = "load") -> None:
            entry: dict[str, Any] = {"t": round(time.monotonic() - t0, 2), "phase": phase}
            try:
                entry.update(memory_sample(world.proxy))
                entry["keycache_entries"] = world.proxy.htable_items()
            except Exception as exc:  # noqa: BLE001 - a missed sample is recorded, not fatal
                entry["error"] = f"{type(exc).__name__}: {exc}"
            samples.append(entry)

        sample("before")
        procs = {
            "message": uac(world.proxy, world.scenarios["message"], world.bodies["message"],
                           rates["message"], calls["message"], workdir, "soak-message"),
            "dialog": uac(world.proxy, world.scenarios["dialog"], world.bodies["offer"],
                          rates["dialog"], calls["dialog"], workdir, "soak-dialog"),
        }
        stop = threading.Event()

        def sampler() -> None:
            while not stop.wait(sample_every):
                sample()
                if samples[-1].get("shm_real_used") is not None and len(samples) % 6 == 0:
                    log(f"t={samples[-1]['t']:.0f}s shm {samples[-1]['shm_real_used']} "
                        f"pkg {samples[-1]['pkg_real_used_sum']} keys {samples[-1].get('keycache_entries')}")

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        budget = seconds * 1.5 + 30
        timed_out = []
        for name, (proc, _, _) in procs.items():
            try:
                proc.wait(timeout=max(1.0, budget - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                timed_out.append(name)
                stop_process(proc)
        elapsed = time.monotonic() - t0
        stop.set()
        thread.join(timeout=5)
        # Drained: transactions' wait timers (5 s) and retransmission timers run out;
        # then shared memory must be back near where it was before the traffic.
        for _ in range(10):
            time.sleep(2.0)
            sample("after")
            if len(samples) >= 2 and samples[-2]["phase"] == "after" \
                    and samples[-1].get("shm_real_used") == samples[-2].get("shm_real_used"):
                break
        # What outlives the traffic by design: the replay window's records and fork slots
        # (e2mseen, each living window + 33 s), one or more per call, and the branch each
        # request came with (e2mbranch, 64 s, e2minvbranch, 222 s for an INVITE: review
        # 94's 482; unflushed, an INVITE's read 1 MB at 82 dialogs/s), so their memory grows
        # with the rate the ladder chose, and each relayed request's loop note (e2mloop,
        # 32 s: review 112's 482).  Counted, then let go, so that what is left to
        # compare with "before" is what nothing should hold.  A dialog's targets
        # (e2mtargets) go with its BYE's 2xx: what is left of them is counted too.
        seen_after_drain = _items(world.proxy, "e2mseen")
        branches_after_drain = _sum_items(world.proxy, ("e2mbranch", "e2minvbranch"))
        loops_after_drain = _items(world.proxy, "e2mloop")
        targets_after_drain = _items(world.proxy, "e2mtargets")
        for table in ("e2mseen", "e2mbranch", "e2minvbranch", "e2mloop"):
            world.proxy.rpc("htable.flush", table)
        time.sleep(0.5)
        sample("after")
        workloads = {}
        failed_total = 0
        for name, (proc, stats, errors) in procs.items():
            counts = sipp_stats(stats, _COUNTERS)
            failed = counts.get("FailedCall(C)", 0)
            missing = calls[name] - counts.get("SuccessfulCall(C)", 0)
            failed_total += failed + max(0, missing)
            try:
                error_text = errors.read_text(errors="replace")
            except OSError:
                error_text = ""
            error_lines = sum(1 for line in error_text.splitlines()
                              if line.strip() and not line.startswith("-"))
            workloads[name] = {"rate": rates[name], "planned_calls": calls[name],
                               "successful": counts.get("SuccessfulCall(C)", 0), "failed": failed,
                               "not_completed": max(0, missing),
                               "retransmissions": counts.get("Retransmissions(C)", 0),
                               "counters": counts, "sipp_rc": proc.returncode,
                               "timed_out": name in timed_out, "sipp_error_lines": error_lines,
                               "sipp_errors": sipp_error_kinds(error_text)}
        kamailio_log = world.proxy.log_since(0)
        verdict_errors: dict[str, int] = {}
        for match in re.finditer(r"e2m: (\w+ (?:request|response(?: \d+)?)) action=\w+ .*? error=(\w+)",
                                 kamailio_log):
            key = f"{match.group(1)} {match.group(2)}"
            verdict_errors[key] = verdict_errors.get(key, 0) + 1
        opened = {
            "message_requests_viewed": len(re.findall(r"e2m: MESSAGE request action=forward seen=text/plain", kamailio_log)),
            "invite_offers_viewed": len(re.findall(r"e2m: INVITE request action=forward seen=application/sdp", kamailio_log)),
            "invite_answers_viewed": len(re.findall(r"e2m: INVITE response 200 action=forward seen=application/sdp", kamailio_log)),
        }
        pkg_left_out = pkg_over_common_processes(samples)
        analysis = analyse(samples, elapsed)
        analysis["pkg_processes_left_out"] = pkg_left_out
        before = next(s for s in samples if s["phase"] == "before")
        after = [s for s in samples if s["phase"] == "after"][-1]
        analysis["drained"] = {name: (None if before.get(name) is None or after.get(name) is None
                                      else after[name] - before[name])
                               for name in ("shm_real_used", "shm_used", "pkg_real_used_sum",
                                            "rss_anon_sum", "keycache_entries")}
        analysis["drained"]["pkg_moved_by_process"] = pkg_moved(before, after)
        analysis["drained"]["replay_records_let_go"] = seen_after_drain
        analysis["drained"]["branches_let_go"] = branches_after_drain
        analysis["drained"]["loop_notes_let_go"] = loops_after_drain
        analysis["drained"]["dialog_targets_left"] = targets_after_drain
        tracebacks = kamailio_log.count("Traceback")
        errors_logged = len(re.findall(r"\bERROR:", kamailio_log))
        ok = failed_total == 0 and analysis["flat"] and tracebacks == 0 and not timed_out
        result = {
            "benchmark": "soak", "utc": began.strftime("%Y%m%dT%H%M%SZ"),
            "commit": _commit(),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpu_count": os.cpu_count(), "loadavg_at_start": None,
                        "loadavg_at_end": list(os.getloadavg()),
                        "kamailio": _version(["kamailio", "-v"]), "sipp": _version(["sipp", "-v"])},
            "plan": {"seconds": seconds, "sample_seconds": sample_every, "load": load,
                     "share_of_each_max": share, "workers": workers, "log_level": log_level,
                     "archive": archive, "proxy_key": "x25519", "shm_mb": 128},
            "max_clean_rates": maxima, "workloads": workloads, "failed_calls": failed_total,
            "elapsed_s": round(elapsed, 1), "proxy_viewed": opened,
            "verdict_errors": verdict_errors, "kamailio_error_lines": errors_logged,
            "python_tracebacks": tracebacks, "memory": analysis, "samples": samples, "ok": ok,
        }
    finally:
        world.stop()
    target = out or RESULTS_DIR / f"soak-{result.get('utc', began.strftime('%Y%m%dT%H%M%SZ'))}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2))
    result["written_to"] = str(target)
    if os.environ.get("SOAK_KEEP") == "1":
        result["workdir"] = str(workdir)
    else:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    return result


_SIPP_ERROR_KINDS = ("Aborting call on unexpected message", "Dead call", "receive timeout",
                     "Max retrans", "timeout")
_SIPP_RECEIVED = re.compile(r"received 'SIP/2\.0 (\d{3})")
_SIPP_ENTRY = re.compile(r"\n|(?=\d{4}-\d\d-\d\d\t\d\d:)")


def sipp_error_kinds(text: str) -> dict[str, int]:
    """SIPp's error log in counts by kind, with the status a call got instead of the one
    it waited for, so that a failed soak says why without its workdir."""
    kinds: dict[str, int] = {}
    for line in _SIPP_ENTRY.split(text):    # SIPp runs some entries together on a line
        kind = next((k for k in _SIPP_ERROR_KINDS if k.lower() in line.lower()), None)
        if kind is None:
            continue
        status = _SIPP_RECEIVED.search(line)
        kind += f" {status.group(1)}" if status else ""
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _items(proxy: Any, table: str) -> int | None:
    try:
        return proxy.htable_items(table)
    except Exception:  # noqa: BLE001 - a missed count is recorded as None, not fatal
        return None


def _sum_items(proxy: Any, tables: tuple[str, ...]) -> int | None:
    counts = [_items(proxy, table) for table in tables]
    return None if None in counts else sum(counts)


def _commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


def _version(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return ((done.stdout or done.stderr).strip().splitlines() or [None])[0]


def summary(result: dict[str, Any]) -> str:
    lines = [f"soak {result['elapsed_s']} s -> {result.get('written_to')}"]
    for name, w in result["workloads"].items():
        lines.append(f"  {name:<8} {w['rate']}/s: {w['successful']}/{w['planned_calls']} ok, "
                     f"{w['failed']} failed, {w['not_completed']} not completed, "
                     f"{w['retransmissions']} retransmissions")
        if w.get("sipp_errors"):
            lines.append(f"           SIPp's errors: {w['sipp_errors']}")
    mem = result["memory"]
    for name in MEMORY_SERIES:
        m = mem[name]
        lines.append(f"  {name:<18} slope {m['slope_bytes_per_min']} B/min, growth "
                     f"{m['growth_over_window_bytes']} B (bound {m['flat_bound_bytes']}), "
                     f"max-min {m['max_minus_min_bytes']} B -> {'flat' if m['flat'] else 'NOT flat'}")
    lines.append(f"  after the traffic drained, minus before it: {mem['drained']}")
    lines.append(f"  proxy viewed: {result['proxy_viewed']}; verdict errors: {result['verdict_errors']}")
    lines.append(f"  failed calls {result['failed_calls']}, tracebacks {result['python_tracebacks']}"
                 f" -> {'OK' if result['ok'] else 'NOT OK'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    parser.add_argument("--sample", type=float, default=float(os.environ.get("SOAK_SAMPLE_SECONDS", 10)))
    parser.add_argument("--load", type=float, default=float(os.environ.get("SOAK_LOAD", 0.5)),
                        help="share of the proxy's capacity (default 0.5: half load)")
    parser.add_argument("--archive", action="store_true", default=os.environ.get("SOAK_ARCHIVE") == "1")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("SOAK_WORKERS", 2)))
    parser.add_argument("--log-level", default=os.environ.get("SOAK_LOG_LEVEL", "info"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.seconds, args.sample, args.load, args.out, args.archive, args.workers,
                 args.log_level, log=lambda s: print(s, flush=True))
    print(summary(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
