"""SIPp MESSAGE transactions and INVITE dialogs through the E2M proxy on real Kamailio:
CPU per call and the highest clean rate for E2M off / RSA-2048 ktri / X25519 kari /
kekri, as ratios to the plain relay measured in the same run, with each one's floor
(the relay plus the bare primitives, ``floor_kemi.py``) for the CPU figure, and with
digest on (``off-auth``, ``x25519-auth``) against the same configuration without it.  The work is in
``proxyrates.py``; see bench/README.md ("Proxy rates") for how to read the figures.

A report, not a test: the targets do not fail the run.  Under ``make bench``
(``--benchmark-only``) it runs once, timed as a single pytest-benchmark round whose
duration means nothing; the figures are the table printed at its end and the JSON in
bench/results/.  ``--benchmark-disable`` runs a short smoke pass (a few calls per
configuration).  ``E2M_BENCH_PROXY=0`` leaves it out.
"""

from __future__ import annotations

import os

import pytest

from proxyrates import Plan, report_lines, run_benchmark

pytestmark = [
    pytest.mark.skipif(os.environ.get("E2M_BENCH_PROXY", "1") in ("0", "no", "false"),
                       reason="E2M_BENCH_PROXY=0"),
    pytest.mark.kamailio,
    pytest.mark.sipp,
]


def test_proxy_rates(benchmark, capsys: pytest.CaptureFixture[str]) -> None:
    def log(line: str) -> None:
        with capsys.disabled():
            print("  " + line, flush=True)

    if benchmark.disabled:   # --benchmark-disable: does every configuration work at all?
        report = benchmark(run_benchmark, Plan.from_env(quick=True), log=lambda line: None)
    else:
        with capsys.disabled():
            print("\n  proxy rates: ten Kamailio instances, SIPp, about 15 minutes", flush=True)
        holder: dict[str, dict] = {}
        benchmark.pedantic(lambda: holder.setdefault("report", run_benchmark(Plan.from_env(), log=log)),
                           rounds=1, iterations=1, warmup_rounds=0)
        report = holder["report"]
        with capsys.disabled():
            print("\n" + "\n".join(report_lines(report)), flush=True)

    # Correctness of the measurement itself (not the targets): every configuration ran,
    # and the E2M proxies really opened every body they were meant to (a response they
    # cannot open is still forwarded and would look cheap).
    rows = {(r["workload"], r["config"]) for r in report["figures"]}
    everything = {(w, c) for w in ("message", "dialog")
                  for c in ("off", "rsa", "x25519", "floor-rsa", "floor-x25519",
                            "off-auth", "x25519-b64", "x25519-auth")} | {
        ("dialog", "kekri"), ("dialog", "floor-kekri")}
    if report["plan"]["configs"]:   # E2M_BENCH_CONFIGS: a subset, off always in it
        assert ("message", "off") in rows and rows <= everything, rows
    else:
        assert rows == everything
    # Digest on (issue 14 §5): every call answered its 407s (the scenarios require them)
    # and completed, and each row has its ratio to the same configuration without digest.
    for row in report["figures"]:
        if row["status"] == "digest":
            assert row["failed_calls_in_cpu_runs"] == 0, row
            assert row["cpu_ratio_vs_no_digest"] is not None, row
            assert (row["workload"], row["digest_of"]) in rows, row
    # A floor whose primitives failed would answer a request 500 (its calls fail) and
    # log an ERROR for a response (forwarded all the same).
    assert all(r["failed_calls_in_cpu_runs"] == 0 for r in report["figures"]
               if r["status"] == "floor"), report["figures"]
    assert not any(lines for key, lines in report["kamailio_errors"].items()
                   if key.startswith("floor-")), report["kamailio_errors"]
    # Capacity figures on every row (issue 17), floors included; pinned when it can be.
    for row in report["figures"]:
        assert {"capacity", "capacity_vs_relay", "capacity_vs_floor", "capacity_targets"} <= row.keys()
        assert row["capacity"] is not None, row   # every configuration clean at its first rate
    if len(os.sched_getaffinity(0)) >= 2 and report["plan"]["pin"]:
        pin = report["pinning"]
        assert pin and all(cores == [pin["kamailio_core"]] for cores in pin["kamailio_cores_seen"].values())
    for key, counts in report["verdicts"].items():
        if not counts:
            continue  # log level below info: nothing to count
        assert not any("error=" in k for k in counts), (key, counts)
        assert counts.get("INVITE response forward opened", 0) > 0, (key, counts)
