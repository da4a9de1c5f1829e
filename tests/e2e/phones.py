"""Helpers for the end-to-end tests: UA.toml files, one-shot ``e2m-phone`` runs,
and a bare UDP "proxy" that can forge answers.  Phone processes, captures and SRTP
key witnesses come from ``pjsua_hooks.lab`` (shared with ``make demo``).

Each phone runs in its own process (pjsua allows one endpoint per process, and a
pjsip abort must not take the test run with it).  Nothing here prints a message
text or an SDP: reports show event kinds and security attributes only.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kamailio_harness import UdpResponder
from pjsua_hooks.lab import PHONE, ROOT, toml_value


def write_ua(directory: Path, name: str, pki_dir: Path, *, peer: str | None,
             phone: dict[str, Any], e2m: dict[str, Any] | None = None) -> Path:
    """UA.toml for ``name`` (credentials ``<name>.crt/.key`` of the test PKI)."""
    value = toml_value

    lines = ["[identity]", f'aor = "sip:{name}@example.com"',
             f"cert = {value(pki_dir / (name + '.crt'))}",
             f"key = {value(pki_dir / (name + '.key'))}",
             "[trust]", f"ca = [{value(pki_dir / 'ca.crt')}]"]
    if peer:
        lines += ["[peers]", f'"sip:{peer}@example.com" = {value(pki_dir / (peer + ".crt"))}']
    if e2m:
        lines += ["[e2m]"] + [f"{k} = {value(v)}" for k, v in e2m.items()]
    lines += ["[phone]"] + [f"{k} = {value(v)}" for k, v in phone.items()]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def redact(event: dict[str, Any]) -> dict[str, Any]:
    """An event fit for a failure report: message text replaced by its length."""
    out = dict(event)
    if "text" in out:
        out["text"] = f"[{len(out['text'])} chars]"
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


# --------------------------------------------------------------------------- forging peer


# A bare UDP socket standing in as the phone's outbound proxy: answers every request
# with ``answer(request_bytes) -> bytes | None`` and keeps what arrived.
ForgingProxy = UdpResponder
