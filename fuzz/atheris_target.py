"""libFuzzer (atheris) entry point for one ``e2m_lab.fuzzkit`` target.

    python fuzz/atheris_target.py <target> [libFuzzer flags] [corpus dir ...]

``fuzz/run.py`` starts one of these per target; run by hand for a single
target or to replay a crash file (``python fuzz/atheris_target.py sip crash-…``).
Only ``e2m_plugins`` is instrumented for coverage.  The property is
``fuzzkit.run_one``: an E2MError is a clean "no"; a known bug (fuzzkit.KNOWN_BUGS)
is counted and stepped over unless ``FUZZ_STRICT=1``; anything else, or an
input under 64 KiB that takes a second or more, is a crash.

``FUZZ_SLOWEST_FILE``: where to keep the slowest input, so the runner can
time it again and tell a slow input from a busy machine.

``FUZZ_STATS_FILE``: where to keep a small JSON record (inputs run, typed
rejections, known-bug hits, slowest input) — rewritten on every new slowest
input and every 2,000 inputs, because libFuzzer ends the process without
running Python's exit handlers.
"""

from __future__ import annotations

import json
import os
import sys

import atheris

with atheris.instrument_imports(include=["e2m_plugins"]):
    from e2m_lab import fuzzkit

STRICT = os.environ.get("FUZZ_STRICT") == "1"
STATS_FILE = os.environ.get("FUZZ_STATS_FILE")
SLOWEST_FILE = os.environ.get("FUZZ_SLOWEST_FILE")  # the slowest input so far, to replay
RESET_EVERY = 2000  # a fresh UA engine now and then: what bob learns must not pile up across a run


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in fuzzkit.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} <{'|'.join(sorted(fuzzkit.TARGETS))}> [libFuzzer args]")
    target = fuzzkit.TARGETS[sys.argv[1]]
    kit = fuzzkit.kit()
    stats = fuzzkit.Stats()

    def save() -> None:
        if STATS_FILE:
            record = {"target": target.name, "runs": stats.runs, "rejected": stats.rejected,
                      "errors": stats.errors, "known_bugs": stats.known,
                      "max_seconds": stats.max_seconds, "max_size": stats.max_size}
            with open(STATS_FILE + ".tmp", "w") as f:
                json.dump(record, f)
            os.replace(STATS_FILE + ".tmp", STATS_FILE)

    def one_input(data: bytes) -> None:
        slowest = stats.max_seconds
        fuzzkit.run_one(target, kit, data, stats, tolerate_known=not STRICT)
        if stats.runs % RESET_EVERY == 0:
            kit.reset_ua()
            save()
        elif stats.max_seconds > slowest:
            save()
        if stats.max_seconds > slowest and SLOWEST_FILE:
            with open(SLOWEST_FILE, "wb") as f:
                f.write(data)

    atheris.Setup([sys.argv[0]] + sys.argv[2:], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
