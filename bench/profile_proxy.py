"""Where the E2M proxy's CPU goes: ``ProxyEngine.inspect`` in one process, under cProfile.

The same bodies and the same PROXY.toml as the rate benchmark (``proxyrates.py``), and
the same sequence of messages Kamailio hands the KEMI script per call: for ``message``
the MESSAGE and its 200; for ``dialog`` INVITE, 200 (answer), ACK, BYE, 200.  Each
message is serialized and parsed again (``kemi._read_message`` parses the bytes it
reads from Kamailio), Call-ID, tags and branch fresh per call, one key cache for the
run (``MemoryKeyCache``; in Kamailio it is the htable), so the kekri answer finds the
offer's CEK and the BYE drops it.

Prints, per configuration and workload, the µs per call without the profiler (median
of batches) and the top functions by own time and by cumulative time.  Not part of
``make bench``; run it as ``.venv/bin/python bench/profile_proxy.py [--calls N]``.

``--live CONFIG [--workload message|dialog] [--rate R] [--seconds S] [--py-spy PATH]``
profiles a real Kamailio instead: one instance of CONFIG started as the rate benchmark
starts it (pinned to one core, SIPp on the other), SIPp at R calls/s, and py-spy
(``pip install py-spy`` in any venv) sampling every process of the instance for S
seconds; prints the functions by own and by inclusive share of the samples.

``--timed CONFIG,... [--workload W] [--rate R] [--seconds S] [--rounds N]`` runs each
configuration N times, interleaved, with ``bench/timed_kemi.py`` as Kamailio's script,
and prints the thread CPU time per call of the script's main functions side by side
(the comparison behind issue 17's kekri figures: py-spy's shares mislead when two
workers share one core).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

# its neighbour: run as `python bench/profile_proxy.py`, bench/ is on the path
import proxyrates as pr  # noqa: E402

from e2m_plugins.keycache import MemoryKeyCache  # noqa: E402
from e2m_plugins.config import load_proxy_config  # noqa: E402
from e2m_plugins.proxy import ProxyEngine  # noqa: E402
from e2m_plugins.sip import SipMessage, make_request, parse  # noqa: E402
from e2m_lab.kamailio_harness import write_proxy_config


def _engine(pki, cfg: pr.Config, workdir: Path) -> ProxyEngine:
    extra = {}
    if cfg.proxy_key_type != "rsa":
        cred = pki.proxy(pr.TRUSTED, cfg.proxy_key_type)
        extra["identity"] = {"cert": str(cred.cert_path), "key": str(cred.key_path)}
    # as in the rate benchmark: one unbound body for every call (proxyrates.BODIES_SENT)
    extra["policy"] = {"legacy_peers": [pki.aor("alice"), pki.aor("bob")]}
    path = write_proxy_config(workdir / cfg.key, 5999, pki=pki, e2m=True, archive=False, extra=extra)
    return ProxyEngine(load_proxy_config(path), MemoryKeyCache())


def _retag(msg: SipMessage, call: int, *, to_tag: str | None = None) -> SipMessage:
    """The engine-made message as a fresh call: new Call-ID, From tag and branch."""
    out = msg.replace("Call-ID", f"{call}-profile@127.0.0.1")
    out = out.replace("From", f"<sip:alice@example.com>;tag=a{call}")
    out = out.replace("Via", f"SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-p{call}")
    if to_tag is not None:
        out = out.replace("To", f"<sip:bob@example.com>;tag={to_tag}")
    return out


def _wire(msg: SipMessage) -> bytes:
    return msg.serialize()


def call_maker(cfg: pr.Config, workload: str) -> Callable[[int], list[bytes]]:
    t = cfg.traffic
    if workload == "message":
        def message_call(n: int) -> list[bytes]:
            request = _retag(t.message, n)
            from e2m_plugins.sip import make_response
            return [_wire(request), _wire(make_response(request, 200, "OK"))]
        return message_call

    def dialog_call(n: int) -> list[bytes]:
        from e2m_plugins.sip import make_response
        offer = _retag(t.offer, n)
        answer = _retag(t.answer, n, to_tag=f"b{n}")
        common = dict(from_uri="sip:alice@example.com", to_uri="sip:bob@example.com",
                      call_id=f"{n}-profile@127.0.0.1", from_tag=f"a{n}", to_tag=f"b{n}")
        ack = make_request("ACK", "sip:bob@127.0.0.1:5062", cseq=1, **common)
        bye = make_request("BYE", "sip:bob@127.0.0.1:5062", cseq=2, **common)
        return [_wire(offer), _wire(answer), _wire(ack), _wire(bye), _wire(make_response(bye, 200, "OK"))]
    return dialog_call


def drive(engine: ProxyEngine, wires: list[list[bytes]], check: bool = False) -> None:
    for call in wires:
        for raw in call:
            message = parse(raw)
            verdict = engine.inspect(message)
            if not message.is_request:   # Kamailio's tm reply route: a BYE's 2xx ends keys
                engine.end_answered(message.cseq[1], message.status or 0, message.call_id,
                                    message.from_tag, message.to_tag)
            if check:
                assert verdict.action == "forward" and verdict.error is None, verdict


def profile(cfg: pr.Config, workload: str, engine: ProxyEngine, calls: int, top: int) -> dict:
    make = call_maker(cfg, workload)
    warm = [make(n) for n in range(50)]
    drive(engine, warm, check=True)
    batches = []
    base = 1000
    for _ in range(5):
        wires = [make(base + n) for n in range(calls // 5)]
        base += calls
        start = time.perf_counter()
        drive(engine, wires)
        batches.append((time.perf_counter() - start) / len(wires) * 1e6)
    wires = [make(base + n) for n in range(calls)]
    prof = cProfile.Profile()
    prof.enable()
    drive(engine, wires)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt

    def rows(key: str) -> list[dict]:
        out = []
        entries = stats.stats  # type: ignore[attr-defined]
        ranked = sorted(entries.items(), key=lambda kv: kv[1][2 if key == "tottime" else 3], reverse=True)
        for (filename, line, name), (cc, nc, tt, ct, _callers) in ranked:
            if key == "cumtime" and "e2m_plugins" not in filename:
                continue  # the cumulative view: the project's own functions
            short = filename.split("/work/main/")[-1] if "/work/main/" in filename else filename
            out.append({"function": f"{short}:{line}({name})", "calls_per_call": nc / calls,
                        "tottime_us_per_call": tt / calls * 1e6, "cumtime_us_per_call": ct / calls * 1e6,
                        "share_of_profiled": (tt if key == "tottime" else ct) / total})
            if len(out) >= top:
                break
        return out
    return {"config": cfg.key, "workload": workload, "calls": calls,
            "us_per_call_unprofiled": statistics.median(batches),
            "profiled_total_us_per_call": total / calls * 1e6,
            "top_tottime": rows("tottime"), "top_cumtime": rows("cumtime")}


# -- inside a running worker (py-spy) -------------------------------------------------

def _frame_name(frame: str, by_function: bool = False) -> str:
    """py-spy's "func (path:line)" shortened to "func (file:line)", or to "func (file)"
    when ``by_function`` (a function's lines summed: the flat profile's real shape)."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")")
    short = path.split("/work/main/")[-1] if "/work/main/" in path else path.rsplit("/", 1)[-1]
    if by_function:
        short = short.rsplit(":", 1)[0]
    return f"{name} ({short})"


def summarize_raw(paths: list[Path], top: int, by_function: bool = False) -> dict:
    """Own and inclusive sample shares per function (or per line) over py-spy
    ``--format raw`` files."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_frame_name(f, by_function) for f in stack.split(";") if f and not f.startswith("process ")
                      and not f.startswith("thread ")]
            if not frames:
                continue
            total += n
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n

    def ranked(table: dict[str, int]) -> list[dict]:
        return [{"function": k, "samples": v, "share": v / total if total else 0.0}
                for k, v in sorted(table.items(), key=lambda kv: kv[1], reverse=True)[:top]]
    return {"samples": total, "own": ranked(own), "inclusive": ranked(inclusive)}


def live(config_key: str, workload: str, rate: float, seconds: float, top: int,
         py_spy: str, by_function: bool = False) -> dict:
    """One instance of ``config_key`` (as the rate benchmark starts it, pinned when it
    can be), SIPp at ``rate`` for ``seconds`` + 2, and py-spy sampling every Kamailio
    process of the instance for ``seconds`` in the middle of it."""
    import os
    import subprocess
    workdir = Path(tempfile.mkdtemp(prefix="e2m-proxy-live-"))
    pki = pr.init_test_pki(workdir / "pki", proxy_hosts=(pr.TRUSTED,), users=("alice", "bob"))
    cfg = next(c for c in pr.make_configs(pki, pr.Plan().text) if c.key == config_key)
    plan = pr.Plan()
    pinning = pr.choose_pinning(plan)
    own = os.sched_getaffinity(0)
    if pinning:
        os.sched_setaffinity(0, {pinning.sipp_core})
    inst = pr.start_instance(cfg, pki, workdir, plan)
    try:
        inst.pids = pr.kamailio_pids(inst.kamailio_pid)
        if pinning:
            pr.pin_pids(inst.pids, pinning.kamailio_core)
        import threading
        holder: dict = {}
        runner = threading.Thread(target=lambda: holder.setdefault("run", pr.run_sipp(
            inst, workload, rate, seconds + 2, plan, workdir)))
        runner.start()
        time.sleep(1.0)
        outs = [workdir / f"spy-{pid}.txt" for pid in inst.pids]
        spies = [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                   "--rate", "200", "--format", "raw", "--nonblocking",
                                   "--output", str(out)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid, out in zip(inst.pids, outs)]
        for spy in spies:
            spy.wait()
        runner.join()
        run = holder["run"]
        result = summarize_raw(outs, top, by_function)
    finally:
        inst.stop()
        os.sched_setaffinity(0, own)
    return {"config": config_key, "workload": workload, "rate": rate, "seconds": seconds,
            "pinned": pinning is not None, "run": run.to_json(), **result}


TIMED_SCRIPT = Path(__file__).with_name("timed_kemi.py")
REQUESTS_PER_CALL = {"message": 1, "dialog": 3}     # what SIPp's caller sends per call


def timed(config_keys: list[str], workload: str, rate: float, seconds: float,
          rounds: int) -> dict:
    """Each configuration in turn, ``rounds`` times (interleaved, so drift in the
    machine falls on all alike): one instance with ``timed_kemi.py`` as its script, SIPp
    at ``rate`` for ``seconds``; the thread CPU time of each timed function per call
    (``calls`` per call, ``us`` per call), from every process's last totals."""
    import os
    workdir = Path(tempfile.mkdtemp(prefix="e2m-proxy-timed-"))
    pki = pr.init_test_pki(workdir / "pki", proxy_hosts=(pr.TRUSTED,), users=("alice", "bob"))
    configs = {c.key: c for c in pr.make_configs(pki, pr.Plan().text)}
    plan = pr.Plan()
    pinning = pr.choose_pinning(plan)
    own = os.sched_getaffinity(0)
    totals: dict[str, dict[str, list[float]]] = {key: {} for key in config_keys}
    runs: dict[str, list[dict]] = {key: [] for key in config_keys}
    try:
        if pinning:
            os.sched_setaffinity(0, {pinning.sipp_core})
        for round_ in range(rounds):
            for key in config_keys:
                out = workdir / f"timing-{key}-{round_}"
                out.mkdir()
                os.environ["E2M_TIMING_DIR"] = str(out)      # Kamailio inherits it
                try:
                    inst = pr.start_instance(configs[key], pki, workdir / f"{key}-{round_}", plan,
                                             kemi_script=TIMED_SCRIPT)
                finally:
                    del os.environ["E2M_TIMING_DIR"]
                try:
                    inst.pids = pr.kamailio_pids(inst.kamailio_pid)
                    if pinning:
                        pr.pin_pids(inst.pids, pinning.kamailio_core)
                    runs[key].append(pr.run_sipp(inst, workload, rate, seconds, plan, workdir).to_json())
                finally:
                    inst.stop()
                for path in out.glob("timing-*.tsv"):
                    for line in path.read_text().splitlines():
                        label, calls, micros = line.split("\t")
                        row = totals[key].setdefault(label, [0.0, 0.0])
                        row[0] += int(calls)
                        row[1] += float(micros)
    finally:
        os.sched_setaffinity(0, own)
    result = {}
    for key in config_keys:
        requests = totals[key].get("kamailio.ksr_request_route", [0.0])[0]
        calls = requests / REQUESTS_PER_CALL[workload] or 1.0
        result[key] = {
            "calls_timed": calls,
            "cpu_us_per_call_instance": statistics.median(r["cpu_us_per_call"] for r in runs[key]),
            "failed_calls": sum(r["failed"] for r in runs[key]),
            "functions": {label: {"calls": n / calls, "us": us / calls}
                          for label, (n, us) in sorted(totals[key].items(),
                                                       key=lambda kv: -kv[1][1])}}
    return {"configs": config_keys, "workload": workload, "rate": rate, "seconds": seconds,
            "rounds": rounds, "pinned": pinning is not None, "timed": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--live", metavar="CONFIG",
                        help="profile a running Kamailio of this configuration with py-spy instead")
    parser.add_argument("--workload", default="message", choices=pr.WORKLOADS)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy binary (any venv)")
    parser.add_argument("--by-function", action="store_true",
                        help="live: sum each function's lines (default: one row per line)")
    parser.add_argument("--timed", metavar="CONFIG,...",
                        help="live, Kamailio running bench/timed_kemi.py: thread CPU time of"
                             " the script's main functions per call, configurations side by side")
    parser.add_argument("--rounds", type=int, default=3, help="--timed: interleaved rounds")
    args = parser.parse_args(argv)
    if args.timed:
        keys = args.timed.split(",")
        result = timed(keys, args.workload, args.rate, args.seconds, args.rounds)
        print(f"== {args.workload} at {args.rate:g}/s, {args.rounds} rounds of {args.seconds:g} s"
              f" ({'pinned' if result['pinned'] else 'not pinned'}): thread CPU µs per call")
        labels = list(dict.fromkeys(label for key in keys
                                    for label in result["timed"][key]["functions"]))
        print(f"   {'function':<40}" + "".join(f"{key:>16}" for key in keys))
        print(f"   {'(whole instance, median of rounds)':<40}" + "".join(
            f"{result['timed'][key]['cpu_us_per_call_instance']:>16.0f}" for key in keys))
        for label in labels:
            cells = []
            for key in keys:
                row = result["timed"][key]["functions"].get(label)
                cells.append(f"{row['us']:>9.0f} ×{row['calls']:<5.1f}" if row else f"{'-':>16}")
            print(f"   {label:<40}" + "".join(cells))
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        pr.RESULTS_DIR.mkdir(exist_ok=True)
        path = pr.RESULTS_DIR / f"proxy-profile-timed-{stamp}.json"
        path.write_text(json.dumps({"benchmark": "proxy-profile-timed", "utc": stamp, **result},
                                   indent=2) + "\n")
        print(f"written: {path}")
        return 0
    if args.live:
        result = live(args.live, args.workload, args.rate, args.seconds, args.top, args.py_spy,
                      args.by_function)
        run = result["run"]
        print(f"== {args.live} / {args.workload} at {args.rate:g}/s ({'pinned' if result['pinned'] else 'not pinned'}):"
              f" {run['successful']}/{run['calls']} calls ok, {run['cpu_us_per_call']} µs CPU/call;"
              f" {result['samples']} py-spy samples in Kamailio's Python")
        for view in ("own", "inclusive"):
            print(f"   by {view} samples:")
            for row in result[view]:
                print(f"   {row['share']:>6.1%}  {row['function']}")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        pr.RESULTS_DIR.mkdir(exist_ok=True)
        path = pr.RESULTS_DIR / f"proxy-profile-live-{stamp}.json"
        path.write_text(json.dumps({"benchmark": "proxy-profile-live", "utc": stamp, **result}, indent=2) + "\n")
        print(f"written: {path}")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="e2m-proxy-profile-"))
    pki = pr.init_test_pki(workdir / "pki", proxy_hosts=(pr.TRUSTED,), users=("alice", "bob"))
    configs = [c for c in pr.make_configs(pki, pr.Plan().text) if c.e2m]
    results = []
    for cfg in configs:
        for workload in pr.WORKLOADS:
            if workload == "message" and cfg.traffic.message is None:
                continue
            result = profile(cfg, workload, _engine(pki, cfg, workdir), args.calls, args.top)
            results.append(result)
            out = io.StringIO()
            print(f"\n== {cfg.key} / {workload}: {result['us_per_call_unprofiled']:.0f} µs per call"
                  f" in ProxyEngine.inspect (+ parse), unprofiled; opens {cfg.opens_per_call[workload]}",
                  file=out)
            print(f"   {'own µs/call':>11} {'cum µs/call':>11} {'share':>6}  function (by own time, profiled)",
                  file=out)
            for row in result["top_tottime"]:
                print(f"   {row['tottime_us_per_call']:>11.1f} {row['cumtime_us_per_call']:>11.1f}"
                      f" {row['share_of_profiled']:>6.1%}  {row['function']}", file=out)
            print(f"   {'':>11} {'cum µs/call':>11} {'share':>6}  project functions by cumulative time",
                  file=out)
            for row in result["top_cumtime"]:
                print(f"   {'':>11} {row['cumtime_us_per_call']:>11.1f} {row['share_of_profiled']:>6.1%}"
                      f"  {row['function']}", file=out)
            print(out.getvalue(), end="")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    pr.RESULTS_DIR.mkdir(exist_ok=True)
    path = pr.RESULTS_DIR / f"proxy-profile-{stamp}.json"
    path.write_text(json.dumps({"benchmark": "proxy-profile", "utc": stamp, "results": results}, indent=2) + "\n")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
