"""No padding oracle in the timing: RSA key-transport failures vs a good decryption.

``open_envelope`` on envelopes for one RSA-2048 recipient (PKCS#1 v1.5), from
``fuzz/oracle_cases.py`` (the same inputs ``tests/fuzz/test_oracle_answers.py``
checks for identical answers):

    good                 the envelope opens
    good (again)         the same, a second series: its difference to "good" is the noise
    bad padding          encryptedKey decrypts to a block that is not PKCS#1 v1.5 (type 01)
    bad padding, no sep  ... a type 02 block with no 00 separator
    wrong CEK            good padding around a CEK of the right length but the wrong value
    wrong CEK length     good padding around a 24-octet CEK (AES-128 wants 16)
    wrong private key    the RecipientInfo names us, the private key is another one
    tampered tag         (GCM) the mac's last octet flipped; (CBC) bad final padding

All kinds run interleaved, one call each per round in a fresh random order,
so load that drifts over seconds hits them alike; each figure is the median
of the per-round differences to "good" (µs).  "noise" is the same figure for
"good (again)"; "notch" is the half width 1.58·IQR/√n of a median's
uncertainty (the box-plot notch).  A failure is "within noise" when its
difference is no larger than the larger of the noise, the good-vs-good notch
and its own notch.  The figure that matters most to a Bleichenbacher
attacker, bad padding minus wrong CEK (non-conforming vs conforming, both
failures), is printed on its own line.

Seconds per cipher: ``E2M_ORACLE_SECONDS`` (default 4).  The figures print
at the end of the test and go to ``bench/results/oracle-<UTC stamp>.json``.
Nothing is asserted about time (the house rule: targets do not fail the run).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent

from e2m_lab import oracle_cases

from e2m_plugins.cms.envelope import open_envelope  # noqa: E402
from e2m_plugins.cms.limits import Limits  # noqa: E402
from e2m_plugins.errors import DecryptionError  # noqa: E402

SECONDS = float(os.environ.get("E2M_ORACLE_SECONDS", "4"))
MIN_ROUNDS = 200
KINDS = {  # label -> oracle_cases name
    "good": "good",
    "good (again)": "good",
    "bad padding": "bad padding: block type 01",
    "bad padding, no sep": "bad padding: no 00 separator",
    "wrong CEK": "good padding, wrong CEK",
    "wrong CEK length": "good padding, CEK of 24 octets",
    "wrong private key": "wrong private key",
}
TAMPER = {"aes-128-gcm": "tampered GCM tag", "aes-128-cbc": "bad CBC padding"}
_REPORT: dict[str, dict] = {}
CBC_ACCEPTED = Limits(accept_cbc=True)   # CBC is refused by default; timed as a deployment accepting it


@pytest.fixture(scope="module")
def rsa_recipient(bench_pki):
    bob = bench_pki.user("bob")
    return bob.cert, bob.key


def _call(case):
    def run() -> bool:
        try:
            open_envelope(case.der, list(case.keys), limits=CBC_ACCEPTED)
            return True
        except DecryptionError:
            return False
    return run


def _notch(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return 1.58 * (q[2] - q[0]) / len(values) ** 0.5


def _interleaved(calls: dict[str, object], seconds: float) -> dict[str, list[float]]:
    clock = time.perf_counter_ns
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    rng = random.Random(0)
    for _ in range(5):                       # warm-up
        for fn in calls.values():
            fn()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(times["good"]) < MIN_ROUNDS:
        rng.shuffle(names)
        for name in names:
            fn = calls[name]
            t0 = clock()
            fn()
            times[name].append((clock() - t0) / 1e3)   # µs
    return times


@pytest.mark.parametrize("cipher", ["aes-128-gcm", "aes-128-cbc"])
def test_key_transport_failures_take_the_time_of_a_good_decryption(benchmark, rsa_recipient, cipher, request):
    cert, key = rsa_recipient
    cases = oracle_cases.cases(cert, key, cipher=cipher)
    kinds = dict(KINDS, **{"tampered tag" if "gcm" in cipher else "bad CBC padding": TAMPER[cipher]})
    calls = {label: _call(cases[name]) for label, name in kinds.items()}
    # correctness first: the good one opens, every other one fails (CBC: a random
    # CEK passes PKCS#7 once in 256; rebuild until it fails, as the answer test does)
    assert calls["good"]() and calls["good (again)"]()
    for label in kinds:
        for _ in range(6):
            if label.startswith("good") or not calls[label]():
                break
            cases = oracle_cases.cases(cert, key, cipher=cipher)
            calls[label] = _call(cases[kinds[label]])
        else:
            pytest.fail(f"{label} keeps opening")

    benchmark.extra_info["cipher"] = cipher
    benchmark.pedantic(calls["good"], rounds=30, iterations=1, warmup_rounds=3)
    if benchmark.disabled:
        return

    times = _interleaved(calls, SECONDS)
    n = len(times["good"])
    good = times["good"]
    diffs = {label: [t - g for t, g in zip(times[label], good)] for label in kinds if label != "good"}
    noise_diffs = diffs["good (again)"]
    noise = abs(statistics.median(noise_diffs))
    notch = _notch(noise_diffs)
    bound = max(noise, notch)
    rows = {}
    for label in kinds:
        med = statistics.median(times[label])
        row = {"median_us": round(med, 1)}
        if label != "good":
            d = statistics.median(diffs[label])
            row.update(paired_diff_us=round(d, 1), notch_us=round(_notch(diffs[label]), 1),
                       within_noise=abs(d) <= max(bound, _notch(diffs[label])))
        rows[label] = row
    pad_vs_cek = [a - b for a, b in zip(times["bad padding"], times["wrong CEK"])]
    summary = {
        "cipher": cipher, "rounds": n, "seconds": SECONDS,
        "noise_us": round(noise, 1), "noise_notch_us": round(notch, 1),
        "bad_padding_minus_wrong_cek_us": round(statistics.median(pad_vs_cek), 1),
        "bad_padding_minus_wrong_cek_notch_us": round(_notch(pad_vs_cek), 1),
        "kinds": rows,
    }
    _REPORT[cipher] = summary
    _print(request, summary)


def _print(request, s: dict) -> None:
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None:
        return
    if capture is not None:
        with capture.global_and_fixture_disabled():
            _write(tr, s)
    else:
        _write(tr, s)


def _write(tr, s: dict) -> None:
    tr.write_line("")
    tr.write_sep("-", f"RSA key transport timing, {s['cipher']}: {s['rounds']} interleaved rounds")
    tr.write_line(f"  {'kind':<22}{'median':>11}{'- good (paired)':>18}{'notch':>9}  within noise")
    for label, row in s["kinds"].items():
        if "paired_diff_us" in row:
            tr.write_line(f"  {label:<22}{row['median_us']:>9.1f}µs{row['paired_diff_us']:>+16.1f}µs"
                          f"{row['notch_us']:>7.1f}µs  {'yes' if row['within_noise'] else 'NO'}")
        else:
            tr.write_line(f"  {label:<22}{row['median_us']:>9.1f}µs")
    tr.write_line(f"  noise (good again - good): {s['noise_us']:.1f} µs, notch {s['noise_notch_us']:.1f} µs;"
                  f"  bad padding - wrong CEK: {s['bad_padding_minus_wrong_cek_us']:+.1f} µs"
                  f" (notch {s['bad_padding_minus_wrong_cek_notch_us']:.1f} µs)")


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    yield
    if not _REPORT:
        return
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    out = BENCH_DIR / "results" / f"oracle-{stamp}.json"
    out.write_text(json.dumps({"benchmark": "oracle-timing", "utc": stamp, "loadavg_at_end": load,
                               "results": _REPORT}, indent=2, ensure_ascii=False) + "\n")
