"""``e2m-phone`` processes for the demo and the end-to-end tests, and their UA.toml files.

- ``PhoneProcess``: ``e2m-phone --json listen --commands`` as a child process (pjsua
  allows one endpoint per process, and a pjsip abort must not take the caller with
  it), driven over stdin and read as JSON events;
- ``run_phone``: one ``e2m-phone --json`` command to completion;
- ``write_ua``: a UA.toml for a user of the test PKI; ``redact``: an event fit for a
  failure report.

Nothing here prints a message text, an SDP or a key.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tomlfile import toml_value

ROOT = Path(__file__).resolve().parents[1]
PHONE = [sys.executable, "-m", "pjsua_hooks.cli"]
_TEXT_STARTED = re.compile(rb"listening on \S+ (\S+:[0-9]+)")

__all__ = ["PhoneProcess", "CliResult", "run_phone", "write_ua", "redact", "PHONE", "ROOT"]


class PhoneProcess:
    """``e2m-phone --json listen --commands`` in a child process.

    ``as_json=False`` runs it in text mode (``e2m-phone listen --commands``): each
    stdout line becomes an event ``{"kind": "text", "line": <bytes>}`` (its
    ``started`` line is still recognised, so ``port`` works).  ``keep_kinds``: keep
    only events of these kinds (a long run under a flood would otherwise hold every
    event here); ``counts`` has every kind's number either way.
    """

    def __init__(self, config: Path, name: str, env: Mapping[str, str] | None = None, *,
                 as_json: bool = True, keep_kinds: set[str] | None = None) -> None:
        self.name = name
        self.as_json = as_json
        self.keep_kinds = keep_kinds
        self.counts: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []
        self._new = threading.Condition()
        self.stderr_path = config.parent / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            [*PHONE, "--config", str(config), *(["--json"] if as_json else []),
             "listen", "--commands"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env={**os.environ, **(env or {})}, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if self.as_json:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
            else:
                event = {"kind": "text", "line": line.rstrip(b"\n")}
                match = _TEXT_STARTED.search(line)
                if match:
                    event = {"kind": "started", "local": match.group(1).decode(), "line": line}
            with self._new:
                kind = event.get("kind", "?")
                self.counts[kind] = self.counts.get(kind, 0) + 1
                if self.keep_kinds is None or kind in self.keep_kinds:
                    self.events.append(event)
                self._new.notify_all()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def of(self, kind: str, since: int = 0) -> list[dict[str, Any]]:
        """Events of ``kind`` seen so far (after index ``since``)."""
        with self._new:
            return [e for e in self.events[since:] if e["kind"] == kind]

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The phone's own counts (the ``status`` command): what it keeps, bounded."""
        mark = self.mark()
        self.send("status")
        return self.wait("status", since=mark, timeout=timeout)

    def wait(self, kind: str, where: Callable[[dict[str, Any]], bool] | None = None,
             timeout: float = 15.0, since: int = 0, any_kind: bool = False) -> dict[str, Any]:
        """The first event of ``kind`` (of any kind with ``any_kind``) after index
        ``since`` that ``where`` accepts."""
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for event in self.events[since:]:
                    if (any_kind or event["kind"] == kind) and (where is None or where(event)):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    kinds = [e["kind"] for e in self.events[-15:]]
                    raise AssertionError(f"{self.name}: no {kind!r} event within {timeout:.0f}s "
                                         f"(rc={self.process.poll()}); last events: {kinds}")
                self._new.wait(timeout=min(left, 0.2))

    def mark(self) -> int:
        with self._new:
            return len(self.events)

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    @property
    def port(self) -> int:
        """The phone's SIP port, from its ``started`` event."""
        return int(self.wait("started")["local"].rsplit(":", 1)[1])

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process.poll() is None:
            try:
                self.send("quit")
                self.process.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()
        self._reader.join(timeout=2)
        self._stderr.close()
        return self.process.returncode

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


def write_ua(directory: Path, name: str, pki_dir: Path, *, peer: str | None,
             phone: dict[str, Any], e2m: dict[str, Any] | None = None,
             domain: str = "example.com") -> Path:
    """UA.toml for ``name`` (credentials ``<name>.crt/.key`` of the test PKI), whose
    AoRs (its own and ``peer``'s) are in ``domain``."""
    value = toml_value

    lines = ["[identity]", f'aor = "sip:{name}@{domain}"',
             f"cert = {value(pki_dir / (name + '.crt'))}",
             f"key = {value(pki_dir / (name + '.key'))}",
             "[trust]", f"ca = [{value(pki_dir / 'ca.crt')}]"]
    if peer:
        lines += ["[peers]", f'"sip:{peer}@{domain}" = {value(pki_dir / (peer + ".crt"))}']
    if e2m:
        lines += ["[e2m]"] + [f"{k} = {value(v)}" for k, v in e2m.items()]
    lines += ["[phone]"] + [f"{k} = {value(v)}" for k, v in phone.items()]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def redact(event: dict[str, Any]) -> dict[str, Any]:
    """An event fit for a failure report: message text replaced by its length."""
    out = {k: (f"{v[:60]}...[{len(v)} chars]" if isinstance(v, str) and len(v) > 200 else v)
           for k, v in event.items()}
    if "text" in out:
        out["text"] = f"[{len(event['text'])} chars]"
    if isinstance(out.get("line"), bytes):    # a text-mode line may quote a message
        out["line"] = f"[{len(out['line'])} bytes]"
    sec = out.get("security")
    if isinstance(sec, dict):
        out["security"] = sec.get("summary")
    elif isinstance(sec, list):
        out["security"] = [f"{r['direction']} {r['what']}: {(r['security'] or {}).get('summary')}"
                           for r in sec[-2:]]
    return out


@dataclass
class CliResult:
    rc: int
    events: list[dict[str, Any]]
    stderr: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]


def run_phone(config: Path, *args: str, timeout: float = 30.0,
              env: dict[str, str] | None = None) -> CliResult:
    """One ``e2m-phone --json`` command to completion."""
    done = subprocess.run([*PHONE, "--config", str(config), "--json", *args], cwd=ROOT,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    events = []
    for line in done.stdout.decode(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return CliResult(done.returncode, events, done.stderr.decode(errors="replace"))
