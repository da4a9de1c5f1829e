"""What a hostile message costs the engines, and what signing by default costs (issue 12,
item 10).  See README.md, "Hostile messages" and "Signing by default".

1. **Hostile messages.**  Each shape of ``e2m_lab.costly`` (one UDP datagram, and a
   TCP message near the 256 KiB body limit) through ``ProxyEngine.inspect`` (a proxy
   viewing ``MESSAGE:*``; every shape is labelled for it) and bob's ``UAEngine.open``,
   each timed from the bytes (``sip.parse`` included) and compared with a normal
   MESSAGE as alice's engine makes it by default (signed, encrypted for bob and the
   proxy, labelled) measured in the same run: the ratio of the medians, and the
   median of the per-round ratios to the baseline timed right before each round
   (``paired``: the median of four calls, after one that warms the caches up again).
   Target: the costliest shape at most 100 times the baseline; the report says met /
   NOT met and the run does not fail on it.  It does fail when a hostile message gets
   anything but a defined verdict (proxy: a forward, or a reply from the error table;
   UA: an ``E2MError``).
2. **Signing by default.**  ``protect`` of a MESSAGE and of an INVITE (SDP), bob's
   ``open`` and the proxy's ``inspect`` (viewing, and viewing with verify rules) of
   what alice sends signed (the default) and unsigned (``sign = false``; bob then with
   ``require_signature = false``, the proxy with alice in ``[policy] legacy_peers``),
   for RSA-2048 and EC P-256 keys: µs per message and the ratio signed / unsigned
   (medians, and paired: the two called alternately).

Every engine has a frozen clock and a replay cache that has seen nothing (each round is
a first sighting, as every new message is; a replay would be refused at another cost).
The caches keyed by header values (labels, Content-Type, Content-Disposition, hosts)
are cleared before each hostile call, not before the baseline's: a stranger makes every
value new.

``E2M_HOSTILE_SECONDS`` (0.3) is the measuring time per shape and engine (at least two
rounds), ``E2M_SIGNING_SECONDS`` (0.3) per signing figure, ``E2M_HOSTILE_TRANSPORTS``
("udp,tcp") the sizes built.  ``--benchmark-disable`` runs every path once and checks
its verdict; the report and ``bench/results/hostile-cost-<UTC stamp>.json`` come with
timings only.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property

import pytest

from conftest import RESULTS_DIR, _commit, _loadavg, _machine

from e2m_lab import costly
from e2m_lab.flows import TRUSTED, invite, known_proxy, message, proxy_engine, ua_engine
from e2m_plugins import headers as hdr
from e2m_plugins import certfiles, certpath, mime, sip, uri
from e2m_plugins.errors import E2MError
from e2m_plugins.keycache import MemoryKeyCache
from e2m_plugins.proxy import ProxyEngine, Verdict
from e2m_plugins.replay import MemoryReplayCache
from e2m_plugins.sip_errors import answer_for
from e2m_plugins.testpki import TestPKI, init_test_pki
from e2m_plugins.ua import Opened, UAEngine

HOSTILE_SECONDS = float(os.environ.get("E2M_HOSTILE_SECONDS", "0.3"))
SIGNING_SECONDS = float(os.environ.get("E2M_SIGNING_SECONDS", "0.3"))
TRANSPORTS = tuple(t for t in os.environ.get("E2M_HOSTILE_TRANSPORTS", "udp,tcp").split(",")
                   if t in costly.TRANSPORTS)
TARGET = 100.0                  # the costliest hostile message / the baseline
MIN_ROUNDS, MAX_ROUNDS = 2, 2000

VIEW = ("MESSAGE:*",)                                   # part 1: the proxy of the issue
SIGN_VIEW = ("MESSAGE:*", "INVITE:application/sdp")    # part 2: it also views the SDP
ROLES = ("proxy", "ua")
KEY_TYPES = ("rsa", "ec")
# The kari shape of the issue (16 kari x 16 parts x 4 layers) needs P-256 keys: it runs
# against a second world, whose proxy and bob have them, with that world's baseline.
EC_SHAPES = ("recipients-parts-layers",)


# ------------------------------------------------------------------ the engines

class _FirstSighting:
    """The replay check as the engines make it, on a cache that has seen nothing yet."""

    def __init__(self, window: float, clock: Callable[[], float]) -> None:
        self.window, self.clock = window, clock

    def check_and_record(self, context, branch, *, retransmissions: bool,
                         to_tag: str | None = None) -> None:
        MemoryReplayCache(window=self.window, clock=self.clock).check_and_record(
            context, branch, retransmissions=retransmissions, to_tag=to_tag)

    def admit_fork(self, early: str, tag: str, limit: int, *, made: float | None = None,
                   claim: bool = True, shared: bool = True) -> int | None:
        return 0 if limit > 0 and claim else None


_VALUE_CACHES = tuple(getattr(module, name, None) for module, name in (
    (hdr, "_parse_label_value"), (mime, "parse_content_type"), (mime, "parse_disposition"),
    (mime, "_body_header_name"), (uri, "host_key"), (uri, "identity_of")))


def _cold() -> None:
    for cache in _VALUE_CACHES:
        clear = getattr(cache, "cache_clear", None)
        if clear is not None:
            clear()
    # what a process remembers of certificates (issue 17): a stranger's are all new
    certfiles._READ_MEMO.clear()
    certpath._SIGNATURE_MEMO.clear()


@dataclass
class World:
    """One test PKI (users and proxy of one key type) and engines with a frozen clock."""

    key_type: str
    pki: TestPKI
    now: float = field(default_factory=time.time)
    _shapes: dict[tuple[str, str], costly.Shape] = field(default_factory=dict)

    def ua(self, name: str, **settings) -> UAEngine:
        engine = UAEngine(ua_engine(self.pki, name, **settings).config, clock=lambda: self.now)
        engine.replay = _FirstSighting(engine.config.replay_window, lambda: self.now)
        return engine

    def proxy(self, view: tuple[str, ...], verify: tuple[str, ...] = (),
              **settings) -> ProxyEngine:
        config = proxy_engine(self.pki, TRUSTED, view=view, verify=verify, **settings).config
        at = datetime.fromtimestamp(self.now, timezone.utc)
        return ProxyEngine(config, MemoryKeyCache(), clock=lambda: at,
                           replay=_FirstSighting(config.replay_window, lambda: self.now))

    # -- part 1 ------------------------------------------------------------------

    @cached_property
    def inspecting(self) -> ProxyEngine:
        return self.proxy(VIEW)

    @cached_property
    def bob(self) -> UAEngine:
        return self.ua("bob")

    @cached_property
    def baseline(self) -> bytes:
        """A normal MESSAGE as alice's engine makes it by default, as bytes."""
        alice = self.ua("alice", proxies=(known_proxy(self.pki, TRUSTED, VIEW),))
        return alice.protect(message(self.pki)).message.serialize()

    def shape(self, name: str, transport: str) -> costly.Shape:
        key = (name, transport)
        if key not in self._shapes:
            (built,) = costly.build(self.pki, names=[name], transports=[transport])
            self._shapes[key] = built
        return self._shapes[key]

    def runner(self, role: str, *, cold: bool) -> Callable[[bytes], object]:
        """From the bytes to the verdict: the proxy's Verdict, or bob's Opened or error."""
        if role == "proxy":
            engine = self.inspecting

            def inspect(raw: bytes) -> object:
                if cold:
                    _cold()
                return engine.inspect(sip.parse(raw))
            return inspect
        bob = self.bob

        def open_(raw: bytes) -> object:
            if cold:
                _cold()
            try:
                return bob.open(sip.parse(raw))
            except E2MError as exc:
                return exc
        return open_

    # -- part 2 ------------------------------------------------------------------

    @cached_property
    def signing(self) -> dict[str, Callable[[], object]]:
        """``<op>/<signed|unsigned>`` -> the call, for every figure of part 2."""
        pki = self.pki
        proxies = (known_proxy(pki, TRUSTED, SIGN_VIEW),)
        alice = {True: self.ua("alice", proxies=proxies),
                 False: self.ua("alice", proxies=proxies, sign=False)}
        bob = {True: self.ua("bob"), False: self.ua("bob", require_signature=False)}
        # A proxy takes an unsigned body (no signed SIP context) only to or from a
        # [policy] legacy_peers party: the unsigned figures name alice there.
        lenient = {"legacy_peers": (pki.aor("alice"),)}
        viewing = {True: self.proxy(SIGN_VIEW), False: self.proxy(SIGN_VIEW, **lenient)}
        verifying = {True: self.proxy(SIGN_VIEW, SIGN_VIEW),
                     False: self.proxy(SIGN_VIEW, SIGN_VIEW, **lenient)}
        plain = {"MESSAGE": message(pki), "INVITE": invite(pki)}
        calls: dict[str, Callable[[], object]] = {}
        for signed, variant in ((True, "signed"), (False, "unsigned")):
            for method, request in plain.items():
                sent = alice[signed].protect(request).message.serialize()
                calls[f"protect-{method}/{variant}"] = (
                    lambda a=alice[signed], r=request: a.protect(r))
                calls[f"open-{method}/{variant}"] = (
                    lambda b=bob[signed], s=sent: b.open(sip.parse(s)))
                calls[f"inspect-{method}-view/{variant}"] = (
                    lambda p=viewing[signed], s=sent: p.inspect(sip.parse(s)))
                calls[f"inspect-{method}-verify/{variant}"] = (
                    lambda p=verifying[signed], s=sent: p.inspect(sip.parse(s)))
        return calls


@pytest.fixture(scope="module")
def worlds() -> dict[str, World]:
    """Built on first use: RSA-2048 (the default) and EC P-256 users and proxy."""
    class Lazy(dict):
        def __missing__(self, key_type: str) -> World:
            world = self[key_type] = World(key_type, init_test_pki(
                None, users=("alice", "bob", "carol"), proxy_hosts=(TRUSTED,), key_type=key_type))
            return world

    return Lazy()


# ------------------------------------------------------------------ verdicts

def _proxy_verdict(verdict: object) -> str:
    """The proxy's verdict in words; fails unless it is a forward or a typed reply."""
    assert isinstance(verdict, Verdict), f"inspect returned {verdict!r}"
    if verdict.action == "forward":
        return f"forward ({len(verdict.seen)} seen)" if verdict.seen else "forward"
    assert verdict.action == "reply", verdict
    assert verdict.error not in (None, "InternalError"), f"untyped refusal: {verdict}"
    assert verdict.code is not None and 400 <= verdict.code <= 699, verdict
    return f"{verdict.code} {verdict.error}"


def _ua_refusal(world: World, result: object) -> str:
    """bob's refusal in words; fails unless ``open`` raised a typed error."""
    assert isinstance(result, E2MError), f"bob opened a hostile message: {result!r}"
    answer = answer_for(result, "ua", world.bob.config.codes)
    return f"{answer.code if answer else '-'} {type(result).__name__}"


def _verdict(world: World, role: str, result: object) -> str:
    return _proxy_verdict(result) if role == "proxy" else _ua_refusal(world, result)


def _check_baseline(role: str, result: object) -> None:
    if role == "proxy":
        assert isinstance(result, Verdict) and result.action == "forward", result
        assert [s.signature for s in result.seen] == ["valid"], result
    else:
        assert isinstance(result, Opened), result
        assert result.info.encrypted and result.info.signed and result.info.trusted


# ------------------------------------------------------------------ measuring

def _rounds(seconds_per_call: float, budget: float) -> int:
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget / max(seconds_per_call, 1e-6))))


def _once(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _alternate(path: Callable[[], object], other: Callable[[], object], seconds: float) -> float:
    """Median of path/other over calls made alternately (order flipped each pair)."""
    clock, ratios, flip = time.perf_counter, [], False
    deadline = clock() + seconds
    while clock() < deadline or len(ratios) < 20:
        if flip:
            t0 = clock(); other(); t1 = clock(); path(); t2 = clock()
            a, b = t2 - t1, t1 - t0
        else:
            t0 = clock(); path(); t1 = clock(); other(); t2 = clock()
            a, b = t1 - t0, t2 - t1
        flip = not flip
        ratios.append(a / b)
    return statistics.median(ratios)


@dataclass
class HostileRow:
    world: str
    shape: costly.Shape
    role: str
    verdict: str
    median: float               # seconds
    rounds: int
    paired_ratio: float         # median of per-round hostile / adjacent baseline call


@dataclass
class Report:
    """What this module measured; printed at the end of the run and kept as JSON."""

    load_at_start: list[float] | None = field(default_factory=_loadavg)
    baselines: dict[tuple[str, str], float] = field(default_factory=dict)   # (world, role)
    hostile: list[HostileRow] = field(default_factory=list)
    signing: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (kt, op, variant)
    signing_paired: dict[tuple[str, str], float] = field(default_factory=dict)

    def ratio(self, row: HostileRow) -> float | None:
        base = self.baselines.get((row.world, row.role))
        return row.median / base if base else None

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.baselines and not self.signing:
            return
        tr = terminalreporter
        out = {"benchmark": "hostile-cost", "target_max_ratio": TARGET}
        if self.hostile:
            out["hostile"] = self._print_hostile(tr)
        if self.signing:
            out["signing"] = self._print_signing(tr)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out.update(utc=stamp, commit=_commit(),
                   machine={**_machine(), "loadavg_at_start": self.load_at_start})
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"hostile-cost-{stamp}.json"
        path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        tr.write_line(f"  load average 1/5/15 min: start {self.load_at_start}, end {_loadavg()}")
        tr.write_line(f"  written: {path}")

    def _print_hostile(self, tr) -> dict:
        tr.write_sep("=", "hostile messages: cost / a normal signed+encrypted MESSAGE (same run)")
        for (world, role), base in sorted(self.baselines.items()):
            tr.write_line(f"  baseline {world:<3} {role:<5} {base * 1e3:8.3f} ms")
        rows = sorted(self.hostile, key=lambda r: -(self.ratio(r) or 0.0))
        tr.write_line(f"  {'shape':<34} {'bytes':>7} {'role':<5} {'ms':>9} {'ratio':>8} "
                      f"{'paired':>8}  verdict")
        records = []
        for row in rows:
            ratio = self.ratio(row)
            label = f"{row.shape.key}" + ("" if row.world == "rsa" else f" [{row.world}]")
            tr.write_line(f"  {label:<34} {len(row.shape.raw):>7} {row.role:<5} "
                          f"{row.median * 1e3:9.2f} {_x(ratio):>8} {_x(row.paired_ratio):>8}  "
                          f"{row.verdict}")
            records.append({"world": row.world, "shape": row.shape.name,
                            "transport": row.shape.transport, "who": row.shape.who,
                            "bytes": len(row.shape.raw), "count": row.shape.count,
                            "what": row.shape.what, "role": row.role, "verdict": row.verdict,
                            "median_ms": row.median * 1e3, "rounds": row.rounds,
                            "ratio": ratio, "paired_ratio": row.paired_ratio})
        summary: dict[str, object] = {
            "baselines_ms": {f"{w}/{r}": v * 1e3 for (w, r), v in sorted(self.baselines.items())},
            "rows": records}
        tr.write_sep("-", f"costliest per role (target: at most {TARGET:.0f}x)")
        for role in ROLES:
            mine = [r for r in rows if r.role == role and self.ratio(r) is not None]
            if not mine:
                continue
            worst = max(mine, key=lambda r: self.ratio(r))
            worst_paired = max(r.paired_ratio for r in mine)
            ratio = self.ratio(worst)
            status = ("met" if ratio <= TARGET else "NOT met") + " / " + \
                ("met" if worst_paired <= TARGET else "NOT met")
            over = sum(1 for r in mine if self.ratio(r) > TARGET)
            tr.write_line(f"  {role:<5} {worst.shape.key:<32} {_x(ratio):>8} "
                          f"(paired max {_x(worst_paired)}): {status}; "
                          f"{over} of {len(mine)} over the target")
            summary[f"costliest_{role}"] = {"shape": worst.shape.key, "world": worst.world,
                                            "ratio": ratio, "paired_max": worst_paired,
                                            "met": ratio <= TARGET and worst_paired <= TARGET,
                                            "over_target": over, "measured": len(mine)}
        return summary

    def _print_signing(self, tr) -> dict:
        tr.write_sep("=", "signing by default: µs per message, signed / unsigned (same run)")
        tr.write_line(f"  {'keys':<4} {'operation':<22} {'signed':>10} {'unsigned':>10} "
                      f"{'ratio':>7} {'paired':>7}")
        records = []
        for kt in KEY_TYPES:
            for op in SIGN_OPS:
                signed = self.signing.get((kt, op, "signed"))
                unsigned = self.signing.get((kt, op, "unsigned"))
                if signed is None and unsigned is None:
                    continue
                ratio = signed / unsigned if signed and unsigned else None
                paired = self.signing_paired.get((kt, op))
                note = "  (unsigned: refused 495)" if op.endswith("-verify") else ""
                tr.write_line(f"  {kt:<4} {op:<22} {_us(signed):>10} {_us(unsigned):>10} "
                              f"{_x(ratio, 2):>7} {_x(paired, 2):>7}{note}")
                records.append({"keys": kt, "operation": op,
                                "signed_us": signed and signed * 1e6,
                                "unsigned_us": unsigned and unsigned * 1e6,
                                "ratio": ratio, "paired_ratio": paired})
        return {"rows": records}


def _x(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.0f} µs"


@pytest.fixture(scope="module")
def report(request) -> Report:
    """Registered as a plugin, so that it prints in the terminal summary."""
    found = request.config.pluginmanager.get_plugin("e2m-hostile-cost-report")
    if found is None:
        found = Report()
        request.config.pluginmanager.register(found, "e2m-hostile-cost-report")
    return found


# ------------------------------------------------------------------ 1. hostile messages

CASES = [(kt, name, transport, role)
         for kt, names in (("rsa", tuple(costly.SHAPES)), ("ec", EC_SHAPES))
         for name in names
         for transport in TRANSPORTS if transport in costly.SHAPES[name][2]
         for role in ROLES]


@pytest.mark.parametrize("kt", KEY_TYPES)
@pytest.mark.parametrize("role", ROLES)
def test_baseline(benchmark, worlds, report, kt, role):
    """The normal MESSAGE every ratio is taken against (bob opens it, the proxy views it)."""
    world = worlds[kt]
    run, raw = world.runner(role, cold=False), world.baseline
    result, first = _once(lambda: run(raw))
    _check_baseline(role, result)
    if benchmark.disabled:
        benchmark(lambda: run(raw))
        return
    benchmark.pedantic(run, args=(raw,), rounds=_rounds(first, HOSTILE_SECONDS),
                       warmup_rounds=3)
    report.baselines[(kt, role)] = benchmark.stats.stats.median


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[3]}-{c[1]}-{c[2]}"
                         + ("" if c[0] == "rsa" else f"-{c[0]}"))
def test_hostile_message(benchmark, worlds, report, case):
    kt, name, transport, role = case
    world = worlds[kt]
    shape = world.shape(name, transport)
    run = world.runner(role, cold=True)
    base, base_raw = world.runner(role, cold=False), world.baseline

    def hostile() -> object:
        return run(shape.raw)

    if benchmark.disabled:
        _verdict(world, role, benchmark(hostile))
        return
    result, first = _once(hostile)
    verdict = _verdict(world, role, result)
    _, base_first = _once(lambda: base(base_raw))
    baseline_times: list[float] = []

    def baseline_calls() -> None:
        # Before each round, untimed by pytest-benchmark.  Right after a large hostile
        # call the next baseline calls run with cold caches (the first up to 5x slower):
        # one call is dropped, the median of the next four is the round's baseline.
        times = []
        for _ in range(5):
            start = time.perf_counter()
            base(base_raw)
            times.append(time.perf_counter() - start)
        baseline_times.append(statistics.median(times[1:]))

    rounds = _rounds(first + 5 * base_first, HOSTILE_SECONDS)
    benchmark.pedantic(hostile, setup=baseline_calls, rounds=rounds)
    times = benchmark.stats.stats.data
    paired = statistics.median(t / b for t, b in zip(times, baseline_times))
    report.hostile.append(HostileRow(kt, shape, role, verdict, benchmark.stats.stats.median,
                                     rounds, paired))


# ------------------------------------------------------------------ 2. signing by default

SIGN_OPS = ("protect-MESSAGE", "protect-INVITE", "open-MESSAGE", "open-INVITE",
            "inspect-MESSAGE-view", "inspect-INVITE-view",
            "inspect-MESSAGE-verify", "inspect-INVITE-verify")


def _check_signing(op: str, signed: bool, result: object) -> None:
    if op.startswith("protect-"):
        assert result.info.encrypted and result.info.signed is signed, result.info
    elif op.startswith("open-"):
        assert isinstance(result, Opened) and result.info.signed is signed, result
    elif signed or op.endswith("-view"):
        assert isinstance(result, Verdict) and result.action == "forward", result
        assert [s.signature for s in result.seen] == ["valid" if signed else "none"], result
    else:   # verify rules and no signature: the 495 of the error table
        assert isinstance(result, Verdict) and result.code == 495, result


@pytest.mark.parametrize("variant", ("signed", "unsigned"))
@pytest.mark.parametrize("op", SIGN_OPS)
@pytest.mark.parametrize("kt", KEY_TYPES)
def test_signing_cost(benchmark, worlds, report, kt, op, variant):
    calls = worlds[kt].signing
    fn = calls[f"{op}/{variant}"]
    result, first = _once(fn)
    _check_signing(op, variant == "signed", result)
    if benchmark.disabled:
        benchmark(fn)
        return
    benchmark.pedantic(fn, rounds=_rounds(first, SIGNING_SECONDS), warmup_rounds=3)
    report.signing[(kt, op, variant)] = benchmark.stats.stats.median
    if variant == "signed":
        report.signing_paired[(kt, op)] = _alternate(fn, calls[f"{op}/unsigned"],
                                                     SIGNING_SECONDS)
