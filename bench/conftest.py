"""Fixtures and the end-of-run report for the CMS opening benchmarks.

Self-contained on purpose: ``pytest bench`` never loads ``tests/conftest.py``
(it is not on the path from the rootdir to ``bench/``), so the PKI, the body
and the timing plan live here.

Every target is judged on figures measured in this very run: an absolute
number from a shared, noisy machine says little, a ratio against a baseline
timed minutes earlier on the same machine says much more.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pytest

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

from e2m_plugins.testpki import TestPKI, init_test_pki  # noqa: E402

# The markers kamailio, sipp, pjsua2, tcpdump, openssl: skipped where that is missing.
pytest_plugins = ["e2m_lab.needs"]

BODY_BYTES = 1024

# Seconds of measuring per benchmark (calibration and warm-up come on top).
# Nine benchmarks at the default keep the whole run well under a minute.
BUDGET_SECONDS = float(os.environ.get("E2M_BENCH_SECONDS", "1.5"))
# One round repeats the call until it lasts at least this long, so the timer's
# own cost stays far below the figures being subtracted from one another.
MIN_ROUND_SECONDS = 25e-6
MIN_ROUNDS, MAX_ROUNDS = 30, 20_000
# Seconds for each paired (interleaved) cross-check, see ``paired`` below.
PAIRED_SECONDS = float(os.environ.get("E2M_BENCH_PAIRED_SECONDS", "1.0"))


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def bench_pki() -> TestPKI:
    """In-memory CA with bob as RSA-2048, P-256 and X25519 (nothing on disk)."""
    pki = init_test_pki(None, users=("bob",), proxy_hosts=(), key_type="rsa")
    pki.user("bob", "ec")
    pki.user("bob", "x25519")
    return pki


def _sdp_body(size: int = BODY_BYTES) -> bytes:
    """An SDP offer such as an INVITE carries, padded to exactly ``size`` bytes."""
    lines = [
        "v=0",
        "o=bob 2890844526 2890844527 IN IP4 198.51.100.7",
        "s=-",
        "c=IN IP4 198.51.100.7",
        "t=0 0",
        "m=audio 49170 RTP/SAVP 111 0 8 101",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ptime:20",
        "a=sendrecv",
        "a=rtcp:49171 IN IP4 198.51.100.7",
        "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:32",
        "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:32",
        "m=video 51372 RTP/SAVP 96 97",
        "a=rtpmap:96 H264/90000",
        "a=fmtp:96 profile-level-id=42e01f;packetization-mode=1",
        "a=rtpmap:97 VP8/90000",
        "a=rtcp-fb:96 nack pli",
        "a=rtcp-fb:97 nack pli",
        "a=sendrecv",
    ]
    text = "".join(line + "\r\n" for line in lines).encode("ascii")
    head, tail = b"a=x-pad:", b"\r\n"
    fill = size - len(text) - len(head) - len(tail)
    if fill < 0:
        raise ValueError("the SDP template is longer than the body size")
    body = text + head + b"0" * fill + tail
    assert len(body) == size
    return body


@pytest.fixture(scope="session")
def sdp_body() -> bytes:
    return _sdp_body()


# ------------------------------------------------------------ measuring

def _plan(fn: Callable[[], object], budget: float) -> tuple[int, int, int]:
    """(rounds, iterations, warmup_rounds) so one benchmark takes about ``budget`` s."""
    fn()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= 0.02 or calls >= 1 << 16:
            break
        calls *= 2
    per_call = max(elapsed / calls, 1e-9)
    iterations = max(1, math.ceil(MIN_ROUND_SECONDS / per_call))
    rounds = int(budget / (per_call * iterations))
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, rounds))
    return rounds, iterations, max(3, rounds // 20)


@dataclass
class Collected:
    """Medians (seconds) of this run's benchmarks, by short name."""

    medians: dict[str, float] = field(default_factory=dict)
    rounds: dict[str, int] = field(default_factory=dict)
    iterations: dict[str, int] = field(default_factory=dict)
    paired: dict[str, dict[str, float]] = field(default_factory=dict)


_COLLECTED = pytest.StashKey[Collected]()


_LOAD_AT_START = pytest.StashKey[object]()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - not on every platform
        return None


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_COLLECTED] = Collected()
    config.stash[_LOAD_AT_START] = _loadavg()


@pytest.fixture
def measure(request: pytest.FixtureRequest, benchmark) -> Callable[..., object]:
    """``measure(name, fn)``: benchmark ``fn`` and keep its median under ``name``."""
    collected = request.config.stash[_COLLECTED]

    def run(name: str, fn: Callable[[], object], budget: float = BUDGET_SECONDS) -> object:
        if benchmark.disabled:  # --benchmark-disable: just check that it runs
            return benchmark(fn)
        rounds, iterations, warmup = _plan(fn, budget)
        result = benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=warmup)
        if benchmark.stats is not None:
            collected.medians[name] = benchmark.stats.stats.median
            collected.rounds[name] = rounds
            collected.iterations[name] = iterations
        return result

    return run


@pytest.fixture
def paired(request: pytest.FixtureRequest, benchmark) -> Callable[..., None]:
    """``paired(name, path, baseline)``: time the two calls alternately, one by one.

    Two benchmarks run one after the other see different machine load; here
    every ``path`` call has a ``baseline`` call right next to it (order
    alternating), and the medians of the per-pair ratio and difference come
    out nearly unaffected by load that drifts over seconds.
    """
    collected = request.config.stash[_COLLECTED]

    def run(name: str, path: Callable[[], object], baseline: Callable[[], object],
            seconds: float = PAIRED_SECONDS) -> None:
        if benchmark.disabled:
            return
        clock = time.perf_counter
        for _ in range(5):
            path(), baseline()
        ratios, diffs = [], []
        deadline = clock() + seconds
        flip = False
        while clock() < deadline or len(ratios) < 50:
            if flip:
                t0 = clock(); baseline(); t1 = clock(); path(); t2 = clock()
                b, a = t1 - t0, t2 - t1
            else:
                t0 = clock(); path(); t1 = clock(); baseline(); t2 = clock()
                a, b = t1 - t0, t2 - t1
            flip = not flip
            ratios.append(a / b)
            diffs.append(a - b)
        ratios.sort()
        diffs.sort()
        collected.paired[name] = {"ratio": ratios[len(ratios) // 2], "diff": diffs[len(diffs) // 2],
                                  "pairs": len(ratios)}

    return run


# ------------------------------------------------------------ the report

@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str               # "x" for a ratio, "us" for microseconds
    target: float | None    # upper bound, or None for information only
    compute: Callable[[dict[str, float]], float]
    needs: tuple[str, ...]
    paired: tuple[str, str] | None = None   # (pair name, "ratio" or "diff")


def _us(seconds: float) -> float:
    return seconds * 1e6


FIGURES = (
    Figure("ktri_rsa_vs_pkcs7", "ktri RSA open_envelope / pkcs7_decrypt_der", "x", 1.15,
           lambda m: m["ktri_rsa_open"] / m["ktri_rsa_pkcs7"], ("ktri_rsa_open", "ktri_rsa_pkcs7"),
           ("ktri_rsa_vs_pkcs7", "ratio")),
    Figure("kekri_abs_us", "kekri (CEK reuse) open_envelope", "us", 40.0,
           lambda m: _us(m["kekri_open"]), ("kekri_open",)),
    Figure("kari_x25519_overhead_us", "kari X25519 open - raw X25519 exchange", "us", 40.0,
           lambda m: _us(m["kari_x25519_open"] - m["raw_x25519_exchange"]),
           ("kari_x25519_open", "raw_x25519_exchange"), ("kari_x25519_vs_exchange", "diff")),
    Figure("kari_p256_overhead_us", "kari P-256 open - raw P-256 ECDH", "us", None,
           lambda m: _us(m["kari_p256_open"] - m["raw_p256_exchange"]),
           ("kari_p256_open", "raw_p256_exchange"), ("kari_p256_vs_exchange", "diff")),
    Figure("ktri_rsa_overhead_us", "ktri RSA open - raw RSA decrypt", "us", None,
           lambda m: _us(m["ktri_rsa_open"] - m["raw_rsa_decrypt"]), ("ktri_rsa_open", "raw_rsa_decrypt"),
           ("ktri_rsa_vs_raw_decrypt", "diff")),
    Figure("kekri_overhead_us", "kekri open - raw unwrap+GCM", "us", None,
           lambda m: _us(m["kekri_open"] - m["raw_unwrap_gcm"]), ("kekri_open", "raw_unwrap_gcm"),
           ("kekri_vs_unwrap_gcm", "diff")),
)


def _status(value: float | None, target: float | None) -> str:
    if value is None:
        return "n/a"
    if target is None:
        return "info"
    return "met" if value <= target else "NOT met"


def _evaluate(medians: dict[str, float], pairs: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    rows = []
    for fig in FIGURES:
        value = fig.compute(medians) if all(n in medians for n in fig.needs) else None
        paired_value = None
        if fig.paired is not None and fig.paired[0] in pairs:
            raw = pairs[fig.paired[0]][fig.paired[1]]
            paired_value = raw if fig.unit == "x" else _us(raw)
        rows.append({"figure": fig.key, "label": fig.label, "unit": fig.unit,
                     "value": value, "target_max": fig.target, "status": _status(value, fig.target),
                     "paired_value": paired_value,
                     "paired_status": _status(paired_value, fig.target) if fig.paired else None})
    return rows


def _machine() -> dict[str, object]:
    import cryptography
    info: dict[str, object] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cryptography": cryptography.__version__,
        "cpu_count": os.cpu_count(),
    }
    info["loadavg_at_end"] = _loadavg()
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        info["openssl"] = backend.openssl_version_text()
    except Exception:  # pragma: no cover - backend layout differs across versions
        info["openssl"] = None
    try:
        import pytest_benchmark
        info["pytest_benchmark"] = pytest_benchmark.__version__
    except Exception:  # pragma: no cover
        info["pytest_benchmark"] = None
    return info


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _format(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}x" if unit == "x" else f"{value:.1f} µs"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    collected = config.stash.get(_COLLECTED, None)
    if collected is None or not collected.medians:
        return
    medians = collected.medians
    rows = _evaluate(medians, collected.paired)

    tr = terminalreporter
    tr.write_sep("=", "CMS open: medians of this run")
    for name in sorted(medians):
        tr.write_line(f"  {name:<22} {_us(medians[name]):>10.1f} µs"
                      f"   ({collected.rounds[name]} rounds x {collected.iterations[name]})")
    tr.write_sep("-", "targets (judged on this run only)")
    width = max(len(r["label"]) for r in rows)
    tr.write_line(f"  {'figure':<{width}}  {'medians':>10}  {'paired':>10}  {'target':>11}  status (medians / paired)")
    for r in rows:
        target = "-" if r["target_max"] is None else "≤ " + _format(r["target_max"], r["unit"])
        status = r["status"] if r["paired_status"] is None else f"{r['status']} / {r['paired_status']}"
        tr.write_line(f"  {r['label']:<{width}}  {_format(r['value'], r['unit']):>10}"
                      f"  {_format(r['paired_value'], r['unit']):>10}  {target:>11}  {status}")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "benchmark": "cms-open",
        "utc": stamp,
        "commit": _commit(),
        "body_bytes": BODY_BYTES,
        "machine": {**_machine(), "loadavg_at_start": config.stash.get(_LOAD_AT_START, None)},
        "medians_us": {k: _us(v) for k, v in sorted(medians.items())},
        "rounds": dict(sorted(collected.rounds.items())),
        "iterations": dict(sorted(collected.iterations.items())),
        "paired": {k: {"median_ratio": v["ratio"], "median_diff_us": _us(v["diff"]), "pairs": v["pairs"]}
                   for k, v in sorted(collected.paired.items())},
        "figures": rows,
        "targets": {r["figure"]: r["target_max"] for r in rows if r["target_max"] is not None},
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"cms-open-{stamp}.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    tr.write_line(f"  load average 1/5/15 min: start {report['machine']['loadavg_at_start']},"
                  f" end {report['machine']['loadavg_at_end']}")
    tr.write_line(f"  written: {out}")
