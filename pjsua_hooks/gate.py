"""The gate in front of the raw hook: the exact wheel and the platform, and its verdict.

The hook writes into pjsip structs at fixed offsets, which are right for one
build only.  :func:`check_environment` refuses anything but that build before
any memory is touched; ``pjsua_hooks.selftest`` then checks the running endpoint
(``pjsua_hooks.endpoint.gate`` does both).  Both report a :class:`GateResult`.

A phone that must do E2M refuses to start when the gate fails
(``SipEndpoint(require_e2m=True)`` raises :class:`GateError` with the reason).
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from dataclasses import dataclass, field

from .pjsip_abi import PINNED_PLATFORM, PINNED_WHEEL

__all__ = ["GateError", "GateResult", "check_environment", "gate_result"]

WHEEL_DIST = "pjsua2-python"


@dataclass(frozen=True)
class GateResult:
    """``ok`` and, when not, ``reason``: one sentence a user can act on."""

    ok: bool
    reason: str
    checks: tuple[tuple[str, bool, str], ...] = ()
    counts: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok


class GateError(RuntimeError):
    """The E2M hook cannot be trusted here, and E2M is required."""

    def __init__(self, result: GateResult) -> None:
        super().__init__(f"E2M is required but the pjsua2 hook gate failed: {result.reason}")
        self.result = result


def gate_result(checks: list[tuple[str, bool, str]], counts: dict[str, int] | None = None) -> GateResult:
    """One verdict from named checks ``(name, ok, detail)``: ok only if every check is."""
    failed = [detail for _, ok, detail in checks if not ok]
    reason = "; ".join(failed) if failed else "all checks passed"
    return GateResult(not failed, reason, tuple(checks), dict(counts or {}))


def check_environment(*, expected_version: str = PINNED_WHEEL,
                      expected_platform: tuple[str, str] = PINNED_PLATFORM) -> GateResult:
    """The installed wheel and the platform are exactly the ones the offsets are for."""
    checks: list[tuple[str, bool, str]] = []
    try:
        version = importlib.metadata.version(WHEEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is None:
        checks.append(("wheel", False, f"{WHEEL_DIST} is not installed "
                       f"(pip install {WHEEL_DIST}=={expected_version})"))
    elif version != expected_version:
        checks.append(("wheel", False, f"{WHEEL_DIST} {version} is installed, but the hook's "
                       f"struct offsets are only known for {expected_version}"))
    else:
        checks.append(("wheel", True, f"{WHEEL_DIST} {version}"))
    plat = (sys.platform, platform.machine())
    if plat != tuple(expected_platform) or sys.maxsize <= 2**32:
        checks.append(("platform", False, f"platform {plat[0]}/{plat[1]} "
                       f"({'64' if sys.maxsize > 2**32 else '32'}-bit), but the offsets are for "
                       f"{expected_platform[0]}/{expected_platform[1]} 64-bit"))
    else:
        checks.append(("platform", True, f"{plat[0]}/{plat[1]}"))
    return gate_result(checks)
