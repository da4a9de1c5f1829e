"""SIPp through the E2M proxy on real Kamailio: CPU per call and the highest clean rate.

Four configurations, each its own Kamailio instance started with ``e2m-proxy`` (the
launcher the operators use), all running at once so that every measurement can be
interleaved with the baseline's (ten instances with the floors and digest ones below):

=========  ==============================================================================
``off``    ``[e2m] enabled = false``: the same KEMI Python script as a plain relay (baseline)
``rsa``    E2M on, the proxy's certificate RSA-2048: every body it reads is opened by ktri
``x25519`` E2M on, the proxy's certificate X25519: every body it reads is opened by kari
``kekri``  E2M on (X25519 certificate), CEK reuse: the INVITE offer (kari, with a
           CEKReference) leaves its CEK in the shared htable and the 200 OK answer is
           opened under kekri with it (RFC 3185)
=========  ==============================================================================

and, for the CPU figure only, one *floor* per E2M configuration (``floor-x25519``,
``floor-rsa``, ``floor-kekri``): the plain relay running ``bench/floor_kemi.py``, which
for each body only reads the message and runs the bare cryptographic primitives
opening it needs, with no parsing at all.  Its CPU above ``off`` is a lower bound for
any E2M proxy in Kamailio's Python, so the report can say how much of a target's
budget is left for everything else (``headroom_us_per_call``).

With *digest on* (issue 14 §5): ``off-auth`` and ``x25519-auth``, the ``off`` and
``x25519`` proxies with ``[auth]`` (alice a user; her From is in the proxy's domain, so
her MESSAGE, INVITE and BYE each get a 407 and are sent again with credentials by
SIPp's ``[authentication]``).  Each digest row also gets its ratio to the same
configuration without digest (``cpu_ratio_vs_no_digest``, ``digest_extra_us_per_call``,
``capacity_vs_no_digest``): what authentication costs per MESSAGE and per dialog.
Alice's bodies go base64 there (SIPp garbles a binary body when it fills in the
credentials), so ``x25519-auth``'s counterpart is ``x25519-b64``: ``x25519`` on those
same base64 bodies.
``--configs`` / ``E2M_BENCH_CONFIGS`` runs a subset (``off`` and a digest
configuration's counterpart are always added).

Two workloads, driven by SIPp (UAC alice -> proxy -> SIPp UAS bob, the UAS being the
proxy's ``next_hop``):

``message``  one MESSAGE transaction per call (encrypted text for bob and the proxy; the
             200 has no body).  Not run for ``kekri``: a MESSAGE's CEK lives for one
             transaction (``keycache``: key-reuse-01 outside a dialog), so no MESSAGE can
             be opened under kekri.
``dialog``   one INVITE dialog per call: INVITE with the encrypted offer, 100, 200 with the
             encrypted answer, ACK, BYE, 200.  ``rsa``/``x25519``: both bodies by public
             key, no reuse (two RSA decryptions / X25519 exchanges per dialog);
             ``kekri``: the offer by X25519, the answer under kekri; ``off`` relays the
             ``kekri`` bodies unread.

Bodies: made once, before the run, by the project's UA engines (``UAEngine.protect``
with ``bind=False``), signed as by default, so each is one envelope *without* the SIP
context (docs/protocol.md §2).  The proxies name alice and bob as ``[policy]
legacy_peers``, which is what lets a body without a context through, so one body
serves every call and SIPp can make its own Call-IDs and tags at any rate; what the
proxy skips compared to bound bodies is reading the context and the replay check (an
htable write).  CEK reuse
still works per call: the proxy keeps the offer's CEK under that call's dialog
(Call-ID, From tag), finds it again for that call's 200 and drops it on that call's BYE.

What is measured (see bench/README.md, "Proxy rates"):

* CPU per call: utime+stime (``/proc/<pid>/stat``) of every process of the instance's
  Kamailio (its process group), before and after a fixed-rate run, divided by the calls
  completed; ``/proc/<pid>/task/*/schedstat`` (ns) is recorded beside it.  Rounds are
  interleaved (off, rsa, x25519, kekri, rotating the order each round) and each round's
  ratio to ``off`` is taken; the figure is the median of those per-round ratios.
* Highest rate with zero failed calls: SIPp at fixed rates on a ladder, a few seconds a
  step, the configurations interleaved at each step, until a step has a failed call or
  falls behind; the figure is the last clean rate, as a ratio to ``off``'s.

Run by ``bench/test_proxy_rates.py`` (``make bench``) or directly:
``python bench/proxyrates.py [--quick]``.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

BENCH_DIR = Path(__file__).resolve().parent
FLOOR_SCRIPT = BENCH_DIR / "floor_kemi.py"
ROOT = BENCH_DIR.parent
SIPP_DIR = BENCH_DIR / "sipp"
RESULTS_DIR = BENCH_DIR / "results"

from e2m_plugins.testpki import TestPKI, init_test_pki  # noqa: E402
from e2m_plugins.config import KnownProxy  # noqa: E402
from e2m_plugins.sip import SipMessage, canonical_name  # noqa: E402

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER, TRUSTED, answer, invite, message, rules, ua_engine
from e2m_lab.kamailio_harness import ProxyHandle, start_proxy
from e2m_lab.processes import stop_process
from e2m_lab.sipp import sipp_stats, start_sipp

CLK_TCK = os.sysconf("SC_CLK_TCK")
DIGEST_USER = "alice"   # the UAC's From user, who answers the 407s of the digest configurations

# ------------------------------------------------------------------ the plan


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass
class Plan:
    """How long and how hard; every knob has an E2M_BENCH_* environment variable."""

    workers: int = 2                      # Kamailio UDP workers per instance
    log_level: str = "info"               # the shipped default
    archive: bool = False                 # the SQLite archive service (off: measure E2M)
    # Kamailio shared memory per instance: a UDP non-INVITE transaction stays 32 s
    # (Timer J) after its 200, so the relay at 7000 MESSAGE/s holds ~220k of them: with
    # 256 MB it ran out of shm before it ran out of CPU.
    shm_mb: int = 1024
    keycache_size: int | None = None      # 2**n htable buckets; None: the shipped default
    cpu_rounds: int = 3
    cpu_seconds: float = 3.0
    # The fixed rates of the CPU phase: well below what every configuration sustains.
    cpu_rate: dict[str, float] = field(default_factory=lambda: {"message": 200.0, "dialog": 50.0})
    step_seconds: float = 2.0
    # Rungs above the CPU phase's rate (which counts as the first rung when every CPU run
    # of a configuration was clean), about x1.45 apart, up to a stated ceiling: the top
    # rung (12000 MESSAGE/s, 8400 dialogs/s) is above what one core relays and near
    # what SIPp's UAC and UAS make together on the other.
    ladder: dict[str, list[float]] = field(default_factory=lambda: {
        "message": [300, 450, 650, 950, 1400, 2000, 2800, 4000, 5800, 8400, 12000],
        "dialog": [75, 110, 160, 230, 330, 480, 700, 1000, 1400, 2000, 2900, 4200, 6000, 8400],
    })
    # Once a configuration fails a rung, this many bisection steps (geometric midpoint)
    # between its last clean rung and the failing one: one rung is x1.45, two steps x1.1.
    refine_steps: int = 2
    # The whole rate phase this many times (E2M_BENCH_RATE_ROUNDS): a capacity is the
    # median of its rounds', as its first failing rate.  One rung is x1.45 and a single
    # round's figure moves by a rung from run to run (stop 52: the same dialog path
    # reached 301/s and 398/s in one run), so the kekri-to-x25519 target needs several.
    rate_rounds: int = 1
    # Kamailio on one core and SIPp (and this process) on another, when there are two.
    pin: bool = True
    recv_timeout_ms: int = 2500
    # Comma-separated configuration keys to run (None: all); E2M_BENCH_CONFIGS or
    # --configs.  ``off`` and a digest configuration's counterpart are always added.
    configs: str | None = None
    text: bytes = (b"Hello. This is confidential: the quarterly numbers are attached to the "
                   b"ticket, please do not forward them outside the team before Friday.")

    @classmethod
    def from_env(cls, quick: bool = False) -> Plan:
        plan = cls()
        if quick:
            plan.cpu_rounds, plan.cpu_seconds, plan.step_seconds = 1, 1.0, 1.0
            plan.cpu_rate = {"message": 50.0, "dialog": 20.0}
            plan.ladder = {"message": [100], "dialog": [40]}
            plan.refine_steps = 0
            plan.shm_mb = 256
        plan.pin = os.environ.get("E2M_BENCH_PIN", "1") not in ("", "0", "no", "false")
        plan.refine_steps = _env_int("E2M_BENCH_REFINE_STEPS", plan.refine_steps)
        plan.rate_rounds = max(1, _env_int("E2M_BENCH_RATE_ROUNDS", plan.rate_rounds))
        plan.workers = _env_int("E2M_BENCH_WORKERS", plan.workers)
        plan.shm_mb = _env_int("E2M_BENCH_SHM_MB", plan.shm_mb)
        if "E2M_BENCH_KEYCACHE_SIZE" in os.environ:
            plan.keycache_size = _env_int("E2M_BENCH_KEYCACHE_SIZE", 10)
        plan.log_level = os.environ.get("E2M_BENCH_LOG_LEVEL", plan.log_level)
        plan.archive = os.environ.get("E2M_BENCH_ARCHIVE", "0") not in ("", "0", "no", "false")
        plan.configs = os.environ.get("E2M_BENCH_CONFIGS") or None
        plan.cpu_rounds = _env_int("E2M_BENCH_CPU_ROUNDS", plan.cpu_rounds)
        plan.cpu_seconds = _env_float("E2M_BENCH_CPU_SECONDS", plan.cpu_seconds)
        plan.step_seconds = _env_float("E2M_BENCH_STEP_SECONDS", plan.step_seconds)
        for workload in ("message", "dialog"):
            key = f"E2M_BENCH_CPU_RATE_{workload.upper()}"
            if key in os.environ:
                plan.cpu_rate[workload] = float(os.environ[key])
        return plan


# Kamailio handles per call: request + response (MESSAGE); INVITE, 200, ACK, BYE, 200
# (dialog; the 100 is its own).  Only used to quote a per-SIP-message figure.
SIP_MESSAGES_PER_CALL = {"message": 2, "dialog": 5}
WORKLOADS = ("message", "dialog")
# Issue 4's CPU-per-call targets (x the plain relay), kept for the record: issue 17
# replaced them with the capacity targets below (the floor showed them unreachable).
TARGETS = {"rsa": 3.0, "x25519": 1.5, "kekri": 1.5}
# Issue 17: highest clean rate, same pinned run.  (figure, workload, config, minimum)
CAPACITY_FLOOR_TARGET = 0.7          # every E2M configuration: capacity / its floor's
CAPACITY_RELAY_TARGETS = {("message", "x25519"): 0.5, ("dialog", "x25519"): 0.7,
                          ("dialog", "kekri"): 0.7}


# ------------------------------------------------------------------ bodies


@dataclass
class Traffic:
    """What SIPp sends for one configuration: headers and body bytes per workload."""

    message: SipMessage | None      # the MESSAGE (None: workload not run)
    offer: SipMessage               # the INVITE
    answer: SipMessage              # bob's 200 OK to it


@dataclass
class Config:
    key: str
    label: str
    e2m: bool
    proxy_key_type: str | None
    traffic: Traffic
    opens_per_call: dict[str, str]  # what the proxy opens, for the report
    floor_of: str | None = None     # a floor: the E2M configuration whose primitives it runs
    # Digest on (issue 14 §5): the configuration this one is, but without [auth]; alice
    # answers the proxy's 407s with these credentials (made for the run, never logged).
    digest_of: str | None = None
    password: str | None = field(default=None, repr=False)


def _known_proxy(pki: TestPKI, key_type: str) -> KnownProxy:
    return KnownProxy(TRUSTED, pki.proxy(TRUSTED, key_type).cert,
                      rules("MESSAGE:text/plain", "INVITE:application/sdp"), rules())


def _traffic(pki: TestPKI, key_type: str, *, reuse: bool, text: bytes) -> Traffic:
    """Bodies made by alice's and bob's UA engines, unbound (one body for all calls)."""
    proxy = _known_proxy(pki, key_type)
    alice = ua_engine(pki, "alice", proxies=(proxy,), bind=False, cek_reuse=reuse)
    bob = ua_engine(pki, "bob", proxies=(proxy,), bind=False, cek_reuse=reuse,
                    require_signature=False)   # it opens alice's unbound offer
    sent = alice.protect(message(pki, text))
    offer = alice.protect(invite(pki, SDP_OFFER))
    # bob opens the offer (so he holds its CEK when reuse is on) and answers
    opened = bob.open(offer.message).message
    reply = bob.protect(answer(opened, SDP_ANSWER))
    assert sent.info.readable_by == (TRUSTED,) and offer.info.readable_by == (TRUSTED,)
    assert reply.info.key_reuse is reuse, "the answer is under kekri exactly when reuse is on"
    return Traffic(sent.message, offer.message, reply.message)


def _base64_transfer(msg: SipMessage | None) -> SipMessage | None:
    """``msg`` with its body sent base64 (Content-Transfer-Encoding), the same envelope.
    For the digest configurations: SIPp fills in ``[authentication]`` by moving the rest
    of the message with strlen, so a binary DER body is garbled after its first NUL
    octet.  The outer transfer encoding is not under any signature."""
    if msg is None:
        return None
    text = base64.b64encode(msg.body)
    body = b"\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    return msg.replace("Content-Transfer-Encoding", "base64").with_body(body)


def make_configs(pki: TestPKI, text: bytes) -> list[Config]:
    rsa = _traffic(pki, "rsa", reuse=False, text=text)
    x25519 = _traffic(pki, "x25519", reuse=False, text=text)
    kekri = _traffic(pki, "x25519", reuse=True, text=text)
    x25519_b64 = Traffic(_base64_transfer(x25519.message), _base64_transfer(x25519.offer),
                         x25519.answer)
    kekri_b64 = Traffic(None, _base64_transfer(kekri.offer), kekri.answer)
    configs = [
        Config("off", "E2M off (plain KEMI relay)", False, None,
               Traffic(x25519.message, kekri.offer, kekri.answer),
               {"message": "nothing", "dialog": "nothing"}),
        Config("rsa", "E2M, RSA-2048 ktri", True, "rsa", rsa,
               {"message": "1 ktri", "dialog": "2 ktri (offer, answer)"}),
        Config("x25519", "E2M, X25519 kari", True, "x25519", x25519,
               {"message": "1 kari", "dialog": "2 kari (offer, answer)"}),
        Config("kekri", "E2M, CEK reuse (kekri answer)", True, "x25519",
               Traffic(None, kekri.offer, kekri.answer),
               {"dialog": "1 kari (offer) + 1 kekri (answer)"}),
        *[Config(f"floor-{key}", f"floor of {key}: relay + bare primitives, no parsing", False,
                 None, traffic, {w: "primitives only" for w in ("message", "dialog")}, floor_of=key)
          for key, traffic in (("rsa", rsa), ("x25519", x25519),
                               ("kekri", Traffic(None, kekri.offer, kekri.answer)))],
        # Digest on: the same proxies with [auth]; every request alice sends but ACK is
        # challenged (407) and sent again with credentials.  Alice's bodies go base64
        # (see _base64_transfer), so x25519-auth is compared with x25519-b64, the
        # x25519 proxy on those same base64 bodies without digest.
        Config("x25519-b64", "E2M, X25519 kari, alice's bodies base64", True, "x25519", x25519_b64,
               {"message": "1 kari", "dialog": "2 kari (offer, answer)"}),
        Config("off-auth", "E2M off, digest on", False, None,
               Traffic(x25519_b64.message, kekri_b64.offer, kekri.answer),
               {"message": "nothing", "dialog": "nothing"},
               digest_of="off", password=secrets.token_urlsafe(18)),
        Config("x25519-auth", "E2M, X25519 kari, digest on", True, "x25519", x25519_b64,
               {"message": "1 kari", "dialog": "2 kari (offer, answer)"},
               digest_of="x25519-b64", password=secrets.token_urlsafe(18)),
    ]
    # each digest configuration right after its counterpart: the CPU rounds run the
    # instances in this order (rotated), so the two are measured next to each other
    ordered = [c for c in configs if not c.digest_of]
    for cfg in (c for c in configs if c.digest_of):
        ordered.insert(next(i for i, c in enumerate(ordered) if c.key == cfg.digest_of) + 1, cfg)
    return ordered


def select_configs(configs: list[Config], wanted: str | None) -> list[Config]:
    """The configurations named in ``wanted`` (comma-separated; None or empty: all), with
    what their figures are ratios to: ``off`` always, a digest configuration's
    counterpart without digest.  Unknown names are an error."""
    if not wanted:
        return configs
    by_key = {cfg.key: cfg for cfg in configs}
    names = {name.strip() for name in wanted.split(",") if name.strip()}
    unknown = sorted(names - by_key.keys())
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; known: {sorted(by_key)}")
    names.add("off")
    names |= {by_key[n].digest_of for n in list(names) if by_key[n].digest_of}
    return [cfg for cfg in configs if cfg.key in names]


def check_bodies(pki: TestPKI, configs: list[Config]) -> dict[str, Any]:
    """Open every body once with a proxy engine (in process) as a sanity check, and
    describe what each carries (recipient kinds), for the report."""
    from e2m_plugins.body import message_body, top_parts
    from e2m_plugins.cms import describe_envelope
    from e2m_plugins.cmsinput import load_cms_message
    from e2m_plugins import mime

    def kinds(msg: SipMessage) -> list[str]:
        part = top_parts(message_body(msg))[0]
        der = load_cms_message(mime.encode_part(part)).der
        return [r.kind for r in describe_envelope(der).recipients]

    out: dict[str, Any] = {}
    for cfg in configs:
        t = cfg.traffic
        out[cfg.key] = {
            "message": None if t.message is None else {"bytes": len(t.message.body),
                                                       "recipients": kinds(t.message)},
            "offer": {"bytes": len(t.offer.body), "recipients": kinds(t.offer)},
            "answer": {"bytes": len(t.answer.body), "recipients": kinds(t.answer)},
        }
    return out


# ------------------------------------------------------------------ SIPp files

# Written by the scenario itself; everything else of the engine's message is copied.
_SCENARIO_MADE = {"via", "from", "to", "call-id", "cseq", "max-forwards", "contact",
                  "content-length", "record-route"}


def scenario_headers(msg: SipMessage) -> str:
    """The lines that replace @@HEADERS@@ in a SIPp scenario: the engine's message's
    headers but those the scenario writes itself (shared with ``soak.py``)."""
    lines = []
    for name, value in msg.headers:
        if canonical_name(name) in _SCENARIO_MADE:
            continue
        if any(ch in value for ch in "\r\n") or "]]>" in name + value or "[" in value:
            raise ValueError(f"header {name} cannot go into a SIPp scenario as is")
        lines.append(f"      {name}: {value}\n")
    return "".join(lines)


def render_scenario(template: str, msg: SipMessage, target: Path) -> Path:
    """bench/sipp/``template`` with ``msg``'s headers in place of @@HEADERS@@, written to
    ``target`` (also used by ``soak.py``)."""
    text = (SIPP_DIR / template).read_text()
    text = text.replace("@@HEADERS@@\n", scenario_headers(msg))
    if "@@" in text:
        raise ValueError(f"{template}: a placeholder was left")
    target.write_text(text)
    return target


# ------------------------------------------------------------------ CPU from /proc


def kamailio_pids(main_pid: int) -> list[int]:
    """Every process of one Kamailio instance: it runs in its own process group."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[2]) == main_pid:          # field 5 of stat: pgrp
            pids.append(int(entry))
    return sorted(pids)


@dataclass(frozen=True)
class CpuSample:
    ticks: int          # utime + stime, clock ticks, summed over the processes
    ns: int             # on-CPU time from schedstat, summed over every task
    processes: int


def cpu_sample(pids: list[int]) -> CpuSample:
    ticks = ns = alive = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                stat = handle.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            ticks += int(fields[11]) + int(fields[12])     # fields 14, 15: utime, stime
            alive += 1
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as handle:
                    ns += int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return CpuSample(ticks, ns, alive)


# ------------------------------------------------------------------ pinning


@dataclass(frozen=True)
class Pinning:
    """Which core Kamailio runs on and which one SIPp (and this process) runs on; None
    when the machine has fewer than two usable cores or pinning is switched off."""

    kamailio_core: int
    sipp_core: int

    def to_json(self) -> dict[str, Any]:
        return {"kamailio_core": self.kamailio_core, "sipp_core": self.sipp_core,
                "how": "os.sched_setaffinity on every thread of every process of each "
                       "Kamailio instance after it started (its process group); SIPp "
                       "inherits the bench process's affinity, set to the other core"}


def choose_pinning(plan: Plan) -> Pinning | None:
    if not plan.pin or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    return Pinning(kamailio_core=cores[-1], sipp_core=cores[0])


def pin_pids(pids: list[int], core: int) -> int:
    """Every thread of ``pids`` onto ``core``; returns how many threads were pinned
    (a process gone meanwhile is skipped)."""
    pinned = 0
    for pid in pids:
        try:
            tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tasks:
            try:
                os.sched_setaffinity(tid, {core})
                pinned += 1
            except OSError:
                continue
    return pinned


def pinned_to(pids: list[int]) -> set[int]:
    """The union of the cores ``pids``' threads may run on (a check for the report)."""
    cores: set[int] = set()
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                cores |= os.sched_getaffinity(int(tid))
            except OSError:
                continue
    return cores


# ------------------------------------------------------------------ instances


@dataclass
class Instance:
    config: Config
    proxy: ProxyHandle
    uas: subprocess.Popen
    uas_port: int
    scenarios: dict[str, Path]
    bodies: dict[str, Path]
    kamailio_pid: int
    pids: list[int]
    uas_args: list[str] = field(default_factory=list)
    uas_dir: Path | None = None

    def cpu(self) -> CpuSample:
        return cpu_sample(self.pids)

    def restart_uas(self) -> None:
        """A fresh UAS on the same SIP port (the proxy's next hop): the old one's calls,
        and the 2xx it would retransmit for 32 s for each call whose ACK never came, go
        with it."""
        stop_process(self.uas)
        assert self.uas_dir is not None
        self.uas, _ = start_sipp(self.uas_args, cwd=self.uas_dir,
                                 output=self.uas_dir / "uas.out", sip_port=self.uas_port)

    def stop(self) -> None:
        stop_process(self.uas)
        self.proxy.stop()





@contextmanager
def _floor_mode(mode: str | None) -> Iterator[None]:
    if mode is None:
        yield
        return
    os.environ["E2M_BENCH_FLOOR"] = mode
    try:
        yield
    finally:
        del os.environ["E2M_BENCH_FLOOR"]


def start_instance(cfg: Config, pki: TestPKI, workdir: Path, plan: Plan,
                   kemi_script: Path | None = None) -> Instance:
    """One proxy of ``cfg`` and SIPp's answering side; ``kemi_script``: another KEMI
    script than the configuration's (``timed_kemi.py`` for ``profile_proxy --timed``)."""
    base = workdir / cfg.key
    base.mkdir(parents=True, exist_ok=True)
    t = cfg.traffic
    bodies = {"offer": base / "offer.bin", "answer": base / "answer.bin"}
    bodies["offer"].write_bytes(t.offer.body)
    bodies["answer"].write_bytes(t.answer.body)
    uac = "_auth" if cfg.digest_of else ""   # digest on: the UAC answers 407s
    scenarios = {"dialog": render_scenario(f"uac_dialog{uac}.tmpl.xml", t.offer, base / "uac_dialog.xml"),
                 "uas": render_scenario("uas.tmpl.xml", t.answer, base / "uas.xml")}
    if t.message is not None:
        bodies["message"] = base / "message.bin"
        bodies["message"].write_bytes(t.message.body)
        scenarios["message"] = render_scenario(f"uac_message{uac}.tmpl.xml", t.message,
                                               base / "uac_message.xml")

    # every port SIPp binds is a fresh one; a start that loses a port is retried
    uas_args = ["sipp", "-sf", str(scenarios["uas"]), "-i", "127.0.0.1",
                "-nostdin", "-key", "answerfile", str(bodies["answer"]),
                "-trace_err", "-error_file", str(base / "uas-errors.log")]
    uas, uas_ports = start_sipp(uas_args, cwd=base, output=base / "uas.out")
    uas_port = uas_ports.sip
    try:
        extra: dict[str, dict[str, Any]] = {}
        if cfg.e2m and cfg.proxy_key_type != "rsa":
            cred = pki.proxy(TRUSTED, cfg.proxy_key_type)
            extra["identity"] = {"cert": str(cred.cert_path), "key": str(cred.key_path)}
        extra["kamailio"] = {"shm_mb": plan.shm_mb}
        # SIPp sends one body for every call, so the bodies carry no SIP context: the
        # proxy takes them only because alice and bob are named legacy senders (no
        # context, hence no replay check).  What this skips per body: the context and
        # replay checks (one DER read, one htable write).
        extra["policy"] = {"legacy_peers": [pki.aor("alice"), pki.aor("bob")]}
        if cfg.floor_of:
            extra["kamailio"]["kemi_script"] = str(FLOOR_SCRIPT)
        elif kemi_script is not None:
            extra["kamailio"]["kemi_script"] = str(kemi_script)
        if plan.keycache_size is not None:
            extra["kamailio"]["keycache_size"] = plan.keycache_size
        settings: dict[str, Any] = dict(next_hop=f"sip:127.0.0.1:{uas_port}", workers=plan.workers,
                                        log_level=plan.log_level, extra=extra)
        if cfg.e2m:
            settings["archive"] = plan.archive
        if cfg.digest_of:
            # [auth] with its defaults (users.sqlite, realm example.com: alice's From is
            # ours, so the proxy challenges her); alice added as the operator adds users
            settings.update(auth=True, users={DIGEST_USER: cfg.password})
        with _floor_mode(cfg.floor_of):   # the launcher and Kamailio inherit it
            proxy = start_proxy(base / "proxy", pki=pki if cfg.e2m else None, e2m=cfg.e2m, **settings)
    except BaseException:
        stop_process(uas)
        raise
    if cfg.floor_of and f"benchmark floor script, mode {cfg.floor_of}" not in proxy.log_since(0):
        proxy.stop()
        stop_process(uas)
        raise RuntimeError(f"{cfg.key}: Kamailio did not load {FLOOR_SCRIPT.name}")
    pid_file = proxy.runtime_dir / "kamailio.pid"
    deadline = time.monotonic() + 5
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    main_pid = int(pid_file.read_text())
    return Instance(cfg, proxy, uas, uas_port, scenarios, bodies, main_pid, kamailio_pids(main_pid),
                    uas_args, base)


# ------------------------------------------------------------------ one SIPp run


@dataclass
class Run:
    config: str
    workload: str
    rate: float
    calls: int
    successful: int
    failed: int
    retransmissions: int
    elapsed: float
    rc: int | None
    cpu_ticks: int
    cpu_ns: int
    timed_out: bool = False

    @property
    def achieved_rate(self) -> float:
        return self.successful / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cpu_us_per_call(self) -> float | None:
        return self.cpu_ticks / CLK_TCK * 1e6 / self.successful if self.successful else None

    @property
    def cpu_ns_us_per_call(self) -> float | None:
        return self.cpu_ns / 1e3 / self.successful if self.successful else None

    @property
    def clean(self) -> bool:
        """Every call completed, none failed, and the run took at most 10 % (+0.4 s for
        starting SIPp and the last call) longer than the rate says: a proxy that falls
        behind without losing calls is not keeping up either."""
        return (not self.timed_out and self.failed == 0 and self.successful == self.calls
                and self.elapsed <= self.calls / self.rate * 1.1 + 0.4)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "workload": self.workload, "rate": self.rate,
                "calls": self.calls, "successful": self.successful, "failed": self.failed,
                "retransmissions": self.retransmissions, "elapsed_s": round(self.elapsed, 3),
                "achieved_rate": round(self.achieved_rate, 1), "rc": self.rc,
                "timed_out": self.timed_out, "cpu_ticks": self.cpu_ticks, "cpu_ns": self.cpu_ns,
                "cpu_us_per_call": self.cpu_us_per_call,
                "cpu_schedstat_us_per_call": self.cpu_ns_us_per_call, "clean": self.clean}


_STAT_COUNTERS = ("SuccessfulCall(C)", "FailedCall(C)", "Retransmissions(C)", "TotalCallCreated")


def run_sipp(inst: Instance, workload: str, rate: float, seconds: float, plan: Plan,
             workdir: Path) -> Run:
    """``rate`` calls/s for ``seconds``; Kamailio CPU sampled right before and after."""
    calls = max(1, int(round(rate * seconds)))
    stats = workdir / f"{inst.config.key}-{workload}-{int(rate)}-{time.monotonic_ns()}.csv"
    key = "message" if workload == "message" else "offer"
    args = ["sipp", f"127.0.0.1:{inst.proxy.port}", "-sf", str(inst.scenarios[workload]),
            "-i", "127.0.0.1", "-nostdin",
            "-r", f"{rate:g}", "-rp", "1000", "-m", str(calls),
            "-recv_timeout", str(plan.recv_timeout_ms),
            "-key", "bodyfile", str(inst.bodies[key]),
            "-trace_stat", "-stf", str(stats), "-fd", "3600"]
    if inst.config.digest_of:
        # a password made for this run, for a throwaway users.sqlite: on the command
        # line because that is how SIPp takes it
        # (the digest uri must be the Request-URI: SIPp's default, the proxy's address,
        # fits only a request to the proxy itself; one uri for every request of the
        # run, so a dialog's INVITE names the UAS, as its BYE does: uac_dialog_auth)
        target = "bob@example.com" if workload == "message" else f"bob@127.0.0.1:{inst.uas_port}"
        args += ["-au", DIGEST_USER, "-ap", str(inst.config.password), "-auth_uri", target,
                 "-key", "uas_port", str(inst.uas_port)]
    budget = seconds * 1.5 + plan.recv_timeout_ms / 1000 + 10
    before = inst.cpu()
    start = time.monotonic()
    # ports from start_sipp (retried on fresh ones if SIPp cannot bind); stderr kept
    process, _ = start_sipp(args, cwd=workdir, output=stats.with_suffix(".stderr"),
                            screen=False, exit_ok=True)
    timed_out = False
    try:
        rc = process.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_process(process)
        rc = process.returncode
    elapsed = time.monotonic() - start
    after = inst.cpu()
    counters = sipp_stats(stats, _STAT_COUNTERS)
    return Run(inst.config.key, workload, rate, calls,
               counters.get("SuccessfulCall(C)", 0), counters.get("FailedCall(C)", 0),
               counters.get("Retransmissions(C)", 0), elapsed, rc,
               after.ticks - before.ticks, after.ns - before.ns, timed_out)


# ------------------------------------------------------------------ the phases

QUIET_SHARE = 0.02      # of one core: Kamailio idles at about 0.1 % here (idle_cpu_us_per_second)
QUIET_MOST_S = 15.0


def settle(inst: Instance) -> float:
    """After a run that was not clean, what it left behind stops before the next run
    on ``inst``: the UAS is restarted (SIPp retransmits each unACKed 200 for 32 s, and
    every copy is read again by the proxy: the next rung would measure that tail, not
    its own rate), then Kamailio's CPU is watched until one second uses under
    ``QUIET_SHARE`` of a core, at most ``QUIET_MOST_S``.  Returns the seconds waited.
    The proxy's tables keep what the failed calls left (keys of calls never ended),
    as a proxy in service would."""
    started = time.monotonic()
    inst.restart_uas()
    before = inst.cpu()
    while time.monotonic() - started < QUIET_MOST_S:
        time.sleep(1.0)
        after = inst.cpu()
        if (after.ns - before.ns) / 1e9 < QUIET_SHARE:
            break
        before = after
    return time.monotonic() - started


def _rotated(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cpu_phase(instances: list[Instance], plan: Plan, workdir: Path,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Fixed-rate runs, interleaved: each round runs every configuration once per workload."""
    runs: list[Run] = []
    for rnd in range(plan.cpu_rounds):
        for workload in WORKLOADS:
            for inst in _rotated(instances, rnd):
                if workload not in inst.scenarios:
                    continue
                run = run_sipp(inst, workload, plan.cpu_rate[workload], plan.cpu_seconds, plan, workdir)
                runs.append(run)
                log(f"cpu round {rnd + 1}/{plan.cpu_rounds} {workload:<7} {inst.config.key:<7}"
                    f" {run.successful}/{run.calls} calls, {run.failed} failed,"
                    f" {_fmt(run.cpu_us_per_call, 0)} µs/call (schedstat {_fmt(run.cpu_ns_us_per_call, 0)})")
                time.sleep(0.3)
    return {"runs": runs}


def rate_phase(instances: list[Instance], plan: Plan, workdir: Path, cpu_runs: list[Run],
               log: Callable[[str], None]) -> dict[str, Any]:
    """Step the rate up the ladder; at each rung every configuration still clean runs once
    (order rotating), the floors included.  A failed step is repeated once before it
    counts (a neighbour's burst on a shared machine should not end the search); after
    each failed run the instance settles first (``settle``), so no run measures the
    previous one's retransmissions.  The CPU
    phase's fixed rate is the first rung: a configuration whose CPU runs were all clean
    starts above it, one with an unclean CPU run is reported below it and not stepped.
    Each configuration climbs until it fails or the ladder ends (its ceiling); then
    ``plan.refine_steps`` bisection steps between its last clean rate and its first
    failing one, all configurations interleaved."""
    runs: list[Run] = []
    best: dict[str, dict[str, float | None]] = {w: {} for w in WORKLOADS}
    first_failure: dict[str, dict[str, float | None]] = {w: {} for w in WORKLOADS}

    def attempt(inst: Instance, workload: str, rate: float) -> bool:
        for tries in (1, 2):
            run = run_sipp(inst, workload, rate, plan.step_seconds, plan, workdir)
            runs.append(run)
            log(f"rate {workload:<7} {inst.config.key:<12} {rate:>6g}/s try {tries}:"
                f" {run.successful}/{run.calls} ok, {run.failed} failed,"
                f" {run.retransmissions} retrans, {run.achieved_rate:.0f}/s achieved"
                f" -> {'clean' if run.clean else 'NOT clean'}")
            if run.clean:
                time.sleep(0.3)
                return True
            log(f"  {inst.config.key}: settled in {settle(inst):.1f} s (fresh UAS, Kamailio quiet)")
        return False

    for workload in WORKLOADS:
        alive = []
        for inst in instances:
            if workload not in inst.scenarios:
                continue
            mine = [r for r in cpu_runs if r.workload == workload and r.config == inst.config.key]
            clean = bool(mine) and all(r.clean for r in mine)
            best[workload][inst.config.key] = plan.cpu_rate[workload] if clean else None
            first_failure[workload][inst.config.key] = None if clean else plan.cpu_rate[workload]
            if clean:
                alive.append(inst)
        time.sleep(1.0)   # let the previous workload's transactions finish
        failed: list[Instance] = []
        for step, rate in enumerate(plan.ladder[workload]):
            if not alive:
                break
            for inst in _rotated(list(alive), step):
                if attempt(inst, workload, rate):
                    best[workload][inst.config.key] = rate
                else:
                    first_failure[workload][inst.config.key] = rate
                    alive.remove(inst)
                    failed.append(inst)
        for step in range(plan.refine_steps):
            for inst in _rotated(failed, step):
                low = best[workload][inst.config.key]
                high = first_failure[workload][inst.config.key]
                if low is None or high is None:
                    continue
                mid = float(round((low * high) ** 0.5))
                if not low < mid < high:
                    continue
                if attempt(inst, workload, mid):
                    best[workload][inst.config.key] = mid
                else:
                    first_failure[workload][inst.config.key] = mid
    return {"runs": runs, "best": best, "first_failure": first_failure}


def rate_rounds(instances: list[Instance], plan: Plan, workdir: Path, cpu_runs: list[Run],
                log: Callable[[str], None]) -> dict[str, Any]:
    """``rate_phase`` ``plan.rate_rounds`` times; each configuration's capacity and first
    failing rate are the medians of its rounds' (a first failing rate is None, clean at
    the ladder's top, when it was so in any round); ``rounds`` keeps each round's."""
    rounds = []
    for number in range(plan.rate_rounds):
        if number:
            log(f"rate phase, round {number + 1} of {plan.rate_rounds}")
            time.sleep(2.0)
        rounds.append(rate_phase(instances, plan, workdir, cpu_runs, log))
    if len(rounds) == 1:
        return {**rounds[0], "rounds": [{"best": rounds[0]["best"],
                                         "first_failure": rounds[0]["first_failure"]}]}
    best: dict[str, dict[str, float | None]] = {w: {} for w in WORKLOADS}
    first_failure: dict[str, dict[str, float | None]] = {w: {} for w in WORKLOADS}
    for workload in WORKLOADS:
        for key in {k for r in rounds for k in r["best"][workload]}:
            found = [r["best"][workload].get(key) for r in rounds]
            best[workload][key] = _median([v for v in found if v is not None])
            fails = [r["first_failure"][workload].get(key) for r in rounds]
            first_failure[workload][key] = None if None in fails else _median(fails)
    return {"runs": [run for r in rounds for run in r["runs"]], "best": best,
            "first_failure": first_failure,
            "rounds": [{"best": r["best"], "first_failure": r["first_failure"]} for r in rounds]}


def summarize(cpu: dict[str, Any], rates: dict[str, Any], configs: list[Config]) -> list[dict[str, Any]]:
    """One row per (workload, configuration): CPU per call and its ratio to ``off``, the
    highest clean rate and its ratio to ``off``'s, the target and whether it is met."""
    by: dict[tuple[str, str], list[Run]] = {}
    rounds: dict[tuple[str, int], dict[str, Run]] = {}
    counter: dict[tuple[str, str], int] = {}
    for run in cpu["runs"]:
        by.setdefault((run.workload, run.config), []).append(run)
        n = counter.get((run.workload, run.config), 0)
        counter[(run.workload, run.config)] = n + 1
        rounds.setdefault((run.workload, n), {})[run.config] = run
    rows = []
    for workload in WORKLOADS:
        for cfg in configs:
            mine = by.get((workload, cfg.key))
            if not mine:
                continue
            per_round, per_round_ns = [], []
            for (w, _n), group in sorted(rounds.items()):
                if w != workload or cfg.key not in group or "off" not in group:
                    continue
                a, b = group[cfg.key], group["off"]
                if a.cpu_us_per_call and b.cpu_us_per_call:
                    per_round.append(a.cpu_us_per_call / b.cpu_us_per_call)
                if a.cpu_ns_us_per_call and b.cpu_ns_us_per_call:
                    per_round_ns.append(a.cpu_ns_us_per_call / b.cpu_ns_us_per_call)
            ticks = sum(r.cpu_ticks for r in mine)
            calls = sum(r.successful for r in mine)
            base = by.get((workload, "off"), [])
            pooled = None
            if calls and base and sum(r.successful for r in base) and sum(r.cpu_ticks for r in base):
                pooled = (ticks / calls) / (sum(r.cpu_ticks for r in base) / sum(r.successful for r in base))
            best = rates["best"][workload].get(cfg.key)
            off_best = rates["best"][workload].get("off")
            ratio = _median(per_round)
            target = TARGETS.get(cfg.key)
            rows.append({
                "workload": workload, "config": cfg.key, "label": cfg.label,
                "proxy_opens_per_call": cfg.opens_per_call.get(workload),
                "cpu_us_per_call": _median([r.cpu_us_per_call for r in mine if r.cpu_us_per_call]),
                "cpu_us_per_sip_message": (None if not calls else
                                           ticks / CLK_TCK * 1e6 / calls / SIP_MESSAGES_PER_CALL[workload]),
                "cpu_schedstat_us_per_call": _median([r.cpu_ns_us_per_call for r in mine
                                                      if r.cpu_ns_us_per_call]),
                "e2m_extra_us_per_opened_body": _extra_per_body(workload, cfg, mine, base),
                "cpu_ratio": ratio, "cpu_ratio_per_round": per_round, "cpu_ratio_pooled": pooled,
                "cpu_ratio_schedstat": _median(per_round_ns),
                "failed_calls_in_cpu_runs": sum(r.failed for r in mine),
                "max_clean_rate": best, "first_failing_rate": rates["first_failure"][workload].get(cfg.key),
                "rate_ratio": (best / off_best) if best and off_best else None,
                # off clean up to the ladder's top: its real ceiling is higher, the ratio lower
                "rate_ratio_is_upper_bound": bool(cfg.key != "off" and best and off_best
                                                  and rates["first_failure"][workload].get("off") is None),
                "cpu_target_max": target,
                "status": ("baseline" if cfg.key == "off" else "floor" if cfg.floor_of else
                           "digest" if cfg.digest_of else
                           "n/a" if ratio is None or target is None else
                           "met" if ratio <= target else "NOT met"),
            })
    _add_floor_figures(rows)
    _add_capacity_figures(rows, rates)
    _add_digest_figures(rows, rounds, by, configs)
    return rows


# Requests per call the proxy challenges with digest on (the UAC answers each 407 once):
# the MESSAGE; the INVITE and the BYE (ACKs never are).
CHALLENGED_PER_CALL = {"message": 1, "dialog": 2}


def _add_digest_figures(rows: list[dict[str, Any]], rounds: dict[tuple[str, int], dict[str, Run]],
                        by: dict[tuple[str, str], list[Run]], configs: list[Config]) -> None:
    """On each digest row, what authentication costs: the CPU ratio to the same
    configuration without digest (median of the per-round ratios, and pooled), the CPU
    per call it adds, that per challenged request, and the capacity ratio."""
    index = {(r["workload"], r["config"]): r for r in rows}
    for cfg in configs:
        if not cfg.digest_of:
            continue
        for workload in WORKLOADS:
            row, base = index.get((workload, cfg.key)), index.get((workload, cfg.digest_of))
            if row is None or base is None:
                continue
            per_round = []
            for (w, _n), group in sorted(rounds.items()):
                if w == workload and cfg.key in group and cfg.digest_of in group:
                    a, b = group[cfg.key].cpu_us_per_call, group[cfg.digest_of].cpu_us_per_call
                    if a and b:
                        per_round.append(a / b)
            mine, theirs = by.get((workload, cfg.key), []), by.get((workload, cfg.digest_of), [])
            pooled = None
            if sum(r.successful for r in mine) and sum(r.successful for r in theirs):
                a = sum(r.cpu_ticks for r in mine) / sum(r.successful for r in mine)
                b = sum(r.cpu_ticks for r in theirs) / sum(r.successful for r in theirs)
                pooled = a / b if b else None
            extra = (None if row["cpu_us_per_call"] is None or base["cpu_us_per_call"] is None
                     else row["cpu_us_per_call"] - base["cpu_us_per_call"])
            row.update({
                "digest_of": cfg.digest_of,
                "digest_challenged_requests_per_call": CHALLENGED_PER_CALL[workload],
                "cpu_ratio_vs_no_digest": _median(per_round),
                "cpu_ratio_vs_no_digest_per_round": per_round,
                "cpu_ratio_vs_no_digest_pooled": pooled,
                "digest_extra_us_per_call": extra,
                "digest_extra_us_per_challenged_request": (
                    None if extra is None else extra / CHALLENGED_PER_CALL[workload]),
                "capacity_vs_no_digest": _ratio(row["capacity"], base["capacity"]),
                "capacity_vs_no_digest_is_upper_bound": bool(base["capacity_is_lower_bound"]),
            })


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _add_capacity_figures(rows: list[dict[str, Any]], rates: dict[str, Any]) -> None:
    """``capacity``: the highest clean rate; ``capacity_vs_relay``: against ``off``'s;
    ``capacity_vs_floor``: against this configuration's floor's.  A capacity clean at the
    ladder's top is a lower bound (``capacity_is_lower_bound``), and a ratio whose
    denominator is one is an upper bound (``..._is_upper_bound``)."""
    index = {(r["workload"], r["config"]): r for r in rows}
    for row in rows:
        fails = rates["first_failure"][row["workload"]]
        row["capacity"] = row["max_clean_rate"]
        row["capacity_is_lower_bound"] = bool(row["capacity"] and fails.get(row["config"]) is None)
    for row in rows:
        workload = row["workload"]
        off = index.get((workload, "off"))
        base = row["config"].removeprefix("floor-")
        floor = index.get((workload, f"floor-{base}")) if row["config"] != "off" else None
        for name, other in (("relay", off), ("floor", floor)):
            ratio = None if other is None or other is row else _ratio(row["capacity"], other["capacity"])
            row[f"capacity_vs_{name}"] = ratio
            row[f"capacity_vs_{name}_is_upper_bound"] = bool(
                ratio is not None and other["capacity_is_lower_bound"])
        row["capacity_targets"] = capacity_targets(row, index)


def capacity_targets(row: dict[str, Any], index: dict[tuple[str, str], dict[str, Any]]
                     ) -> list[dict[str, Any]]:
    """Issue 17's targets that apply to this row, each with its value and met / NOT met."""
    out: list[dict[str, Any]] = []
    key = row["config"]
    if key in TARGETS:   # an E2M configuration
        out.append({"figure": "capacity_vs_floor", "min": CAPACITY_FLOOR_TARGET,
                    "value": row["capacity_vs_floor"]})
    goal = CAPACITY_RELAY_TARGETS.get((row["workload"], key))
    if goal is not None:
        out.append({"figure": "capacity_vs_relay", "min": goal, "value": row["capacity_vs_relay"]})
    if row["workload"] == "dialog" and key == "kekri":
        x = index.get(("dialog", "x25519"))
        out.append({"figure": "capacity / x25519's", "min": 1.0,
                    "value": None if x is None else _ratio(row["capacity"], x["capacity"])})
    for target in out:
        value = target["value"]
        target["status"] = "n/a" if value is None else "met" if value >= target["min"] - 1e-9 else "NOT met"
    return out


def _add_floor_figures(rows: list[dict[str, Any]]) -> None:
    """Beside each E2M row, its floor's: the floor's CPU ratio, what this configuration
    spends above its floor (parsing, policy, key cache, logging), and the headroom the
    target leaves above the floor (negative: the target is below the primitives' cost)."""
    index = {(r["workload"], r["config"]): r for r in rows}
    for row in rows:
        floor = index.get((row["workload"], f"floor-{row['config']}"))
        off = index.get((row["workload"], "off"))
        if floor is None or off is None or row["cpu_target_max"] is None:
            continue
        mine, low, base = row["cpu_us_per_call"], floor["cpu_us_per_call"], off["cpu_us_per_call"]
        row["floor_cpu_ratio"] = floor["cpu_ratio"]
        row["above_floor_us_per_call"] = None if mine is None or low is None else mine - low
        row["headroom_us_per_call"] = (None if low is None or base is None
                                       else row["cpu_target_max"] * base - low)


BODIES_OPENED_PER_CALL = {"message": 1, "dialog": 2}
BODIES_SENT = ("one body per configuration and direction, sent for every call: signed and "
               "encrypted by alice's and bob's UA engines without the SIP context "
               "(bind=False); the proxies name alice and bob in [policy] legacy_peers, which "
               "is what admits a context-less body, so no replay check applies to it")


def _extra_per_body(workload: str, cfg: Config, mine: list[Run], base: list[Run]) -> float | None:
    """(µs/call of this configuration - µs/call of off) / bodies the proxy opens per call:
    what E2M adds per body it reads, all of it (KEMI adapter, parsing, crypto, logging)."""
    if not cfg.e2m:
        return None
    a = _median([r.cpu_us_per_call for r in mine if r.cpu_us_per_call])
    b = _median([r.cpu_us_per_call for r in base if r.cpu_us_per_call])
    return None if a is None or b is None else (a - b) / BODIES_OPENED_PER_CALL[workload]


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _capacity_text(value: float | None, lower: bool) -> str:
    return "-" if value is None else ("≥" if lower else "") + f"{value:g}/s"


def _ratio_text(value: float | None, upper: bool) -> str:
    return "-" if value is None else ("≤" if upper else "") + f"{value:.2f}"


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    head = (f"  {'workload':<8} {'config':<12} {'µs/call':>8} {'CPU ratio':>9} {'floor CPU':>9}"
            f"  {'capacity':>9} {'first fail':>10} {'vs relay':>8} {'vs floor':>8}"
            f" {'floor cap':>9}  capacity targets")
    lines = [head]
    index = {(r["workload"], r["config"]): r for r in rows}
    for r in rows:
        floor = index.get((r["workload"], f"floor-{r['config']}"))
        fail = r["first_failing_rate"]
        targets = "; ".join(f"{t['figure'].replace('capacity_', '')} ≥ {t['min']:g}: {t['status']}"
                            for t in r["capacity_targets"]) or (
            "baseline" if r["config"] == "off" else "floor" if r["status"] == "floor" else "")
        lines.append(
            f"  {r['workload']:<8} {r['config']:<12} {_fmt(r['cpu_us_per_call'], 0):>8}"
            f" {_fmt(r['cpu_ratio'], 2, 'x'):>9} {_fmt(r.get('floor_cpu_ratio'), 2, 'x'):>9}"
            f"  {_capacity_text(r['capacity'], r['capacity_is_lower_bound']):>9}"
            f" {('-' if fail is None else f'{fail:g}/s'):>10}"
            f" {_ratio_text(r['capacity_vs_relay'], r['capacity_vs_relay_is_upper_bound']):>8}"
            f" {_ratio_text(r['capacity_vs_floor'], r['capacity_vs_floor_is_upper_bound']):>8}"
            f" {_capacity_text(floor['capacity'] if floor else None, bool(floor and floor['capacity_is_lower_bound'])):>9}"
            f"  {targets}")
    return lines


def format_digest_table(rows: list[dict[str, Any]]) -> list[str]:
    """What digest authentication costs: each digest row against its counterpart."""
    digest = [r for r in rows if r.get("digest_of")]
    if not digest:
        return []
    index = {(r["workload"], r["config"]): r for r in rows}
    lines = ["Digest on: CPU per call against the same configuration without digest (same run)",
             f"  {'workload':<8} {'config':<12} {'µs/call':>8} {'without':>8} {'ratio':>6}"
             f" {'pooled':>6} {'+µs/call':>9} {'+µs/407':>8}  {'capacity':>9} {'without':>9} {'ratio':>6}"]
    for r in digest:
        base = index[(r["workload"], r["digest_of"])]
        lines.append(
            f"  {r['workload']:<8} {r['config']:<12} {_fmt(r['cpu_us_per_call'], 0):>8}"
            f" {_fmt(base['cpu_us_per_call'], 0):>8} {_fmt(r['cpu_ratio_vs_no_digest'], 2, 'x'):>6}"
            f" {_fmt(r['cpu_ratio_vs_no_digest_pooled'], 2, 'x'):>6}"
            f" {_fmt(r['digest_extra_us_per_call'], 0):>9}"
            f" {_fmt(r['digest_extra_us_per_challenged_request'], 0):>8}"
            f"  {_capacity_text(r['capacity'], r['capacity_is_lower_bound']):>9}"
            f" {_capacity_text(base['capacity'], base['capacity_is_lower_bound']):>9}"
            f" {_ratio_text(r['capacity_vs_no_digest'], r['capacity_vs_no_digest_is_upper_bound']):>6}")
    lines.append("  +µs/407: the CPU digest adds per challenged request (MESSAGE; INVITE and BYE),"
                 " each a 407 and the request again with credentials")
    return lines


def _machine() -> dict[str, Any]:
    def version(cmd: list[str]) -> str | None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0].strip() if text else None
    import cryptography
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cryptography": cryptography.__version__, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "kamailio": version(["/usr/sbin/kamailio", "-v"]), "sipp": version(["sipp", "-v"]),
            "clk_tck": CLK_TCK}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_benchmark(plan: Plan, log: Callable[[str], None] = print,
                  workdir: Path | None = None) -> dict[str, Any]:
    """Everything: PKI, bodies, the proxies (floors too) and UASes, both phases; returns the report."""
    started = time.monotonic()
    load_start = _loadavg()
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="e2m-proxy-rates-")) if own_tmp else workdir
    pki = init_test_pki(workdir / "pki", proxy_hosts=(TRUSTED,), users=("alice", "bob"))
    configs = select_configs(make_configs(pki, plan.text), plan.configs)
    bodies = check_bodies(pki, configs)
    instances: list[Instance] = []
    pinning = choose_pinning(plan)
    own_affinity = os.sched_getaffinity(0) if pinning else None
    pinned: dict[str, list[int]] = {}
    try:
        if pinning:   # SIPp (UAS now, UAC per run) inherits this process's core
            os.sched_setaffinity(0, {pinning.sipp_core})
        for cfg in configs:
            inst = start_instance(cfg, pki, workdir, plan)
            instances.append(inst)
            if pinning:
                # the whole process group, again (a process may have forked meanwhile)
                inst.pids = kamailio_pids(inst.kamailio_pid)
                pin_pids(inst.pids, pinning.kamailio_core)
                pinned[cfg.key] = sorted(pinned_to(inst.pids))
        log("proxies up: " + ", ".join(f"{i.config.key} on {i.proxy.port} "
                                        f"({len(i.pids)} Kamailio processes)" for i in instances))
        log("pinning: " + (f"Kamailio on core {pinning.kamailio_core}, SIPp on core {pinning.sipp_core}"
                           if pinning else "none (fewer than two usable cores, or E2M_BENCH_PIN=0)"))
        if pinning and any(cores != [pinning.kamailio_core] for cores in pinned.values()):
            raise RuntimeError(f"Kamailio not pinned to core {pinning.kamailio_core}: {pinned}")
        time.sleep(1.0)
        idle_before = [i.cpu() for i in instances]
        time.sleep(1.0)
        idle = {i.config.key: (i.cpu().ns - b.ns) / 1e3 for i, b in zip(instances, idle_before)}
        runs_dir = workdir / "runs"
        runs_dir.mkdir()
        cpu = cpu_phase(instances, plan, runs_dir, log)
        marks = {i.config.key: i.proxy.log_mark() for i in instances}
        rates = rate_rounds(instances, plan, runs_dir, cpu["runs"], log)
        errors = {i.config.key: _error_lines(i.proxy) for i in instances}
        verdicts = {i.config.key: verdict_counts(i.proxy, 0, marks[i.config.key])
                    for i in instances if i.config.e2m}
        verdicts_rate = {i.config.key: verdict_counts(i.proxy, marks[i.config.key])
                         for i in instances if i.config.e2m}
    finally:
        for inst in instances:
            inst.stop()
        if own_affinity is not None:
            os.sched_setaffinity(0, own_affinity)
    rows = summarize(cpu, rates, configs)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "benchmark": "proxy-rates", "utc": stamp, "commit": _commit(),
        "machine": {**_machine(), "loadavg_at_start": load_start, "loadavg_at_end": _loadavg()},
        "plan": {"workers": plan.workers, "shm_mb": plan.shm_mb, "keycache_size": plan.keycache_size,
                 "log_level": plan.log_level, "archive": plan.archive,
                 "cpu_rounds": plan.cpu_rounds, "cpu_seconds": plan.cpu_seconds,
                 "cpu_rate": plan.cpu_rate, "step_seconds": plan.step_seconds, "ladder": plan.ladder,
                 "ladder_ceiling": {w: max(r) for w, r in plan.ladder.items()},
                 "refine_steps": plan.refine_steps, "rate_rounds": plan.rate_rounds,
                 "pin": plan.pin,
                 "recv_timeout_ms": plan.recv_timeout_ms, "configs": plan.configs},
        "pinning": None if pinning is None else {**pinning.to_json(), "kamailio_cores_seen": pinned},
        "bodies_sent": BODIES_SENT,
        "bodies": bodies,
        "idle_cpu_us_per_second": idle,
        "sip_messages_per_call": SIP_MESSAGES_PER_CALL,
        "figures": rows,
        "targets": {"cpu_per_call_issue4_replaced": dict(TARGETS),
                    "capacity_vs_floor_min": CAPACITY_FLOOR_TARGET,
                    "capacity_vs_relay_min": {f"{w} {c}": v for (w, c), v in CAPACITY_RELAY_TARGETS.items()},
                    "dialog_kekri_vs_x25519_min": 1.0},
        "kamailio_errors": errors,
        "verdicts": verdicts,
        "verdicts_rate_phase": verdicts_rate,
        "cpu_runs": [r.to_json() for r in cpu["runs"]],
        "rate_runs": [r.to_json() for r in rates["runs"]],
        "rate_rounds": rates["rounds"],
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"proxy-rates-{stamp}.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    report["path"] = str(out)
    if own_tmp:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _error_lines(proxy: ProxyHandle, limit: int = 20) -> list[str]:
    """Kamailio ERROR lines (counts matter: an exception in the E2M path shows here)."""
    lines = [line for line in proxy.log_since(0).splitlines() if " ERROR: " in line]
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


_VERDICT = re.compile(r"e2m: (\w+) (request|response(?: \d+)?) action=(\w+) seen=(\S+)(.*)$")


def verdict_counts(proxy: ProxyHandle, start: int = 0, end: int | None = None) -> dict[str, int]:
    """What the engine said, counted from its info lines: proof that every body was
    really opened (a response the proxy cannot open is forwarded all the same, only
    with ``error=`` in the line, and would make the figures look too good)."""
    counts: dict[str, int] = {}
    text = proxy.log_since(start)
    if end is not None:
        text = text[:max(0, end - start)]   # offsets in bytes; the log is ASCII
    for line in text.splitlines():
        match = _VERDICT.search(line)
        if not match:
            continue
        method, direction, action, seen, rest = match.groups()
        opened = "opened" if seen != "-" else "nothing opened"
        key = f"{method} {direction.split()[0]} {action} {opened}"
        if "error=" in rest:
            key += " error=" + rest.split("error=", 1)[1].split()[0]
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def report_lines(report: dict[str, Any]) -> list[str]:
    pin = report.get("pinning")
    lines = ["Proxy rates: capacity (highest clean rate) and Kamailio CPU per call, ratios within this run",
             "  " + ("pinned: every Kamailio process on core %d, SIPp on core %d"
                     % (pin["kamailio_core"], pin["sipp_core"]) if pin else "NOT pinned"),
             *format_table(report["figures"])]
    lines.append("  µs/call: utime+stime of all Kamailio processes / calls at the CPU phase's fixed rate"
                 " (median of rounds); CPU ratio: median of per-round ratios to off")
    lines.append("  floor CPU: the CPU ratio of the same bodies' bare primitives (floor-* rows, no parsing)")
    lines.append("  capacity: highest clean rate (≥: clean at the ladder's top); first fail: lowest"
                 " failing rate; vs relay / vs floor: capacity over off's / the floor's (≤: the other"
                 " was clean at the top); floor cap: the floor's capacity")
    rounds = report.get("rate_rounds") or []
    if len(rounds) > 1:
        lines.append(f"  capacity and first fail: medians of {len(rounds)} rate rounds; each round's capacity:")
        for workload in WORKLOADS:
            keys = sorted({k for r in rounds for k in r["best"][workload]})
            lines.append(f"    {workload}: " + ", ".join(
                f"{key} " + "/".join(_fmt(r["best"][workload].get(key), 0) for r in rounds)
                for key in keys))
    lines.extend(format_digest_table(report["figures"]))
    idle = report["idle_cpu_us_per_second"]
    lines.append("  idle Kamailio CPU (µs/s): " + ", ".join(f"{k} {v:.0f}" for k, v in idle.items()))
    for key, counts in report["verdicts"].items():
        lines.append(f"  {key} verdicts in the CPU phase: " + (", ".join(f"{k}: {v}" for k, v in counts.items())
                                              or "none logged (log_level below info?)"))
    errors = {k: len(v) for k, v in report["kamailio_errors"].items() if v}
    if errors:
        lines.append(f"  Kamailio ERROR lines: {errors} (see the JSON)")
    m = report["machine"]
    lines.append(f"  load average: start {m['loadavg_at_start']}, end {m['loadavg_at_end']};"
                 f" wall {report['wall_seconds']} s")
    lines.append(f"  written: {report['path']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per phase: a smoke test")
    parser.add_argument("--configs", metavar="KEY,...",
                        help="run only these configurations (off, rsa, x25519, kekri, floor-rsa,"
                             " floor-x25519, floor-kekri, off-auth, x25519-auth); off and a digest"
                             " configuration's counterpart are added (default: E2M_BENCH_CONFIGS, else all)")
    args = parser.parse_args(argv)
    import signal
    # a TERM (a timeout, a kill) unwinds like Ctrl-C, so run_benchmark stops its instances
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    plan = Plan.from_env(quick=args.quick)
    if args.configs:
        plan.configs = args.configs
    report = run_benchmark(plan, log=lambda s: print(s, flush=True))
    print("\n".join(report_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
