"""Run every fuzz target for a while and record what happened.

    .venv/bin/python fuzz/run.py [--seconds 300] [--targets sip,mime] [--jobs 1]

``make fuzz`` calls this with ``FUZZ_SECONDS`` (default 300) per target.
Each target runs under atheris (libFuzzer, coverage-guided) in its own
process, seeded with a corpus the project's code makes right now (fresh test
PKI; no key is written) plus whatever earlier runs added to
``fuzz/results/corpus/<target>/``.  Crash inputs go to
``fuzz/results/crashes/``; the record of the run (executions per target,
exec/s, coverage, corpus size, peak RSS, typed rejections, known-bug hits,
slowest input) to ``fuzz/results/fuzz-<UTC stamp>.json``.  ``fuzz/results``
is git-ignored.

If atheris cannot be imported the runner says so and falls back to
``seeded-mutation`` mode: fuzzkit's random mutator, same targets, same
property, no coverage guidance.  Exit status 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _stat(pattern: str, text: str, cast=int):
    found = re.findall(pattern, text)
    return cast(found[-1]) if found else None


def write_seeds(name: str, corpus: Path) -> int:
    from e2m_lab import fuzzkit
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = fuzzkit.TARGETS[name].seeds(fuzzkit.kit())
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i:02d}").write_bytes(seed)
    return len(seeds)


def run_atheris(name: str, seconds: int, max_len: int, strict: bool) -> dict:
    corpus = RESULTS / "corpus" / name
    crashes = RESULTS / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    seeds = write_seeds(name, corpus)
    stats_file = RESULTS / f".stats-{name}.json"
    stats_file.unlink(missing_ok=True)
    log_file = RESULTS / f"{name}.log"
    slowest_file = RESULTS / f"slowest-{name}"
    slowest_file.unlink(missing_ok=True)
    env = dict(os.environ, FUZZ_STATS_FILE=str(stats_file), FUZZ_STRICT="1" if strict else "0",
               FUZZ_SLOWEST_FILE=str(slowest_file), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(HERE / "atheris_target.py"), name, f"-max_total_time={seconds}",
           "-timeout=10", f"-max_len={max_len}", "-rss_limit_mb=2048", "-print_final_stats=1",
           f"-artifact_prefix={crashes}/{name}-", str(corpus)]
    start = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.monotonic() - start
    text = log_file.read_text(errors="replace")
    inited_rss = _stat(r"INITED.*?rss: (\d+)Mb", text)
    record = {
        "target": name, "mode": "atheris", "seconds": seconds, "wall_seconds": round(wall, 1),
        "exit_code": proc.returncode, "crashed": proc.returncode != 0,
        "seeds": seeds, "executions": _stat(r"stat::number_of_executed_units:\s*(\d+)", text),
        "exec_per_sec": _stat(r"stat::average_exec_per_sec:\s*(\d+)", text),
        "new_units": _stat(r"stat::new_units_added:\s*(\d+)", text),
        "coverage": _stat(r"cov: (\d+)", text), "features": _stat(r"ft: (\d+)", text),
        "corpus_files": len(list(corpus.iterdir())),
        "rss_mb_at_start": inited_rss, "peak_rss_mb": _stat(r"stat::peak_rss_mb:\s*(\d+)", text),
        "crash_files": re.findall(r"Test unit written to (\S+)", text),
        "log": str(log_file.relative_to(HERE.parent)),
    }
    if stats_file.exists():
        record["property"] = json.loads(stats_file.read_text())
        stats_file.unlink()
    if slowest_file.exists():
        record["slowest_replayed_ms"] = replay(name, slowest_file.read_bytes())
    if record["crashed"]:
        tail = text[text.find("=== Uncaught Python exception"):][:3000] if "Uncaught" in text else text[-3000:]
        record["crash_excerpt"] = tail
    return record


def replay(name: str, data: bytes, times: int = 5) -> float:
    """Best of ``times`` runs of ``data`` in this (uninstrumented) process, in ms.

    The fuzzer's slowest input is often a scheduler hiccup on a shared
    machine; timing it again tells that from an input that is really slow.
    """
    from e2m_lab import fuzzkit
    target, kit = fuzzkit.TARGETS[name], fuzzkit.kit()
    return round(min(fuzzkit.run_one(target, kit, data) for _ in range(times)) * 1e3, 2)


def run_mutation(name: str, seconds: int, strict: bool) -> dict:
    """Fallback without atheris: random mutation of the seeds, same property."""
    import random
    import traceback

    from e2m_lab import fuzzkit
    kit = fuzzkit.kit()
    target = fuzzkit.TARGETS[name]
    seeds = target.seeds(kit)
    stats = fuzzkit.Stats()
    rng = random.Random()
    deadline = time.monotonic() + seconds
    crash = None
    while time.monotonic() < deadline and crash is None:
        data = fuzzkit.mutate(rng, seeds)
        try:
            fuzzkit.run_one(target, kit, data, stats, tolerate_known=not strict)
        except Exception:  # noqa: BLE001 - this is what we are looking for
            crashes = RESULTS / "crashes"
            crashes.mkdir(parents=True, exist_ok=True)
            path = crashes / f"{name}-mutation-{int(time.time())}"
            path.write_bytes(data)
            crash = {"file": str(path), "traceback": traceback.format_exc()[-3000:]}
        if stats.runs % 2000 == 0:
            kit.reset_ua()
    return {"target": name, "mode": "seeded-mutation (atheris unavailable: no coverage guidance)",
            "seconds": seconds, "executions": stats.runs, "crashed": crash is not None,
            "crash": crash, "property": {"runs": stats.runs, "rejected": stats.rejected,
                                         "errors": stats.errors, "known_bugs": stats.known,
                                         "max_seconds": stats.max_seconds, "max_size": stats.max_size}}


def main(argv: list[str] | None = None) -> int:
    from e2m_lab import fuzzkit
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "300")),
                        help="fuzzing time per target (default: $FUZZ_SECONDS or 300)")
    parser.add_argument("--targets", default=",".join(fuzzkit.TARGETS),
                        help="comma-separated subset of: " + ", ".join(fuzzkit.TARGETS))
    parser.add_argument("--max-len", type=int, default=16384, help="largest input libFuzzer makes")
    parser.add_argument("--strict", action="store_true",
                        help="treat the known bugs (fuzzkit.KNOWN_BUGS) as crashes too")
    parser.add_argument("--mutation", action="store_true", help="use the fallback fuzzer even if atheris is there")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in fuzzkit.TARGETS]
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)}")

    use_atheris = not args.mutation
    if use_atheris:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not importable here: falling back to the seeded-mutation fuzzer "
                  "(no coverage guidance)", file=sys.stderr)
            use_atheris = False

    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    records = []
    for name in names:
        print(f"fuzzing {name} for {args.seconds} s ...", flush=True)
        rec = (run_atheris(name, args.seconds, args.max_len, args.strict) if use_atheris
               else run_mutation(name, args.seconds, args.strict))
        records.append(rec)
        prop = rec.get("property", {})
        print(f"  {rec['executions'] or 0:>9} executions"
              + (f", {rec.get('exec_per_sec')} exec/s, cov {rec.get('coverage')}, "
                 f"corpus {rec.get('corpus_files')}, rss {rec.get('rss_mb_at_start')}->"
                 f"{rec.get('peak_rss_mb')} MB" if use_atheris else "")
              + f", slowest {prop.get('max_seconds', 0) * 1e3:.1f} ms ({prop.get('max_size')} bytes"
              + (f", {rec['slowest_replayed_ms']} ms replayed)" if "slowest_replayed_ms" in rec else ")")
              + (f", known bugs hit {prop['known_bugs']}" if prop.get("known_bugs") else "")
              + ("  CRASHED: see " + str(rec.get("crash_files") or rec.get("crash")) if rec["crashed"] else ""),
              flush=True)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    report = {"run": "fuzz", "utc": stamp, "seconds_per_target": args.seconds,
              "mode": "atheris" if use_atheris else "seeded-mutation",
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpu_count": os.cpu_count(), "loadavg_at_end": load},
              "known_bugs_tolerated": [] if args.strict else sorted(fuzzkit.KNOWN_BUGS),
              "targets": records}
    out = RESULTS / f"fuzz-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {out.relative_to(HERE.parent)}")
    return 1 if any(r["crashed"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
