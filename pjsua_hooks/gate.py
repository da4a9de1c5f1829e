"""The gate in front of the raw hook: the exact wheel, the platform, and a self-test.

The hook writes into pjsip structs at fixed offsets, which are right for one
build only.  :func:`check_environment` refuses anything but that build before
any memory is touched; :func:`self_test` then sends an OPTIONS from the running
endpoint to itself over loopback, rewrites it on the way out and back again,
and checks that both directions were seen by the hook, that pjsua acted on the
rewritten bytes, and that no sanity check failed.  :func:`gate` does both.

A phone that must do E2M refuses to start when the gate fails
(``SipEndpoint(require_e2m=True)`` raises :class:`GateError` with the reason).
"""

from __future__ import annotations

import importlib.metadata
import platform
import secrets
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .pjsip_abi import PINNED_PJPROJECT, PINNED_PLATFORM, PINNED_WHEEL

if TYPE_CHECKING:
    from .endpoint import SipEndpoint

__all__ = ["GateError", "GateResult", "check_environment", "gate", "self_test"]

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


def _result(checks: list[tuple[str, bool, str]], counts: dict[str, int] | None = None) -> GateResult:
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
    return _result(checks)


class _SelfTest:
    """Rewrites that only touch the self-test's own OPTIONS and its answer."""

    PAD_NAME = b"X-E2M-Selftest-Pad"

    def __init__(self, previous: tuple[Any, Any]) -> None:
        self.nonce = secrets.token_hex(8)
        self.marker = f"X-E2M-Selftest: {self.nonce}".encode()
        self.pad_line = self.PAD_NAME + b": " + secrets.token_hex(24).encode()
        self.call_id: bytes | None = None
        self.previous_tx, self.previous_rx = previous
        self.seen = {"tx_req": 0, "tx_resp": 0, "rx_req": 0, "rx_resp": 0}
        self.problems: list[str] = []

    def _call_id(self, data: bytes) -> bytes | None:
        for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() in (b"call-id", b"i"):
                return value.strip()
        return None

    def _ours(self, data: bytes) -> bool:
        if self.marker in data:
            self.call_id = self._call_id(data)
            return True
        return self.call_id is not None and self._call_id(data) == self.call_id

    def tx(self, data: bytes) -> bytes | None:
        if not self._ours(data):
            return self.previous_tx(data) if self.previous_tx else None
        self.seen["tx_resp" if data.startswith(b"SIP/2.0 ") else "tx_req"] += 1
        first, sep, rest = data.partition(b"\r\n")
        return first + sep + self.pad_line + b"\r\n" + rest

    def rx(self, data: bytes) -> bytes | None:
        if not self._ours(data):
            return self.previous_rx(data) if self.previous_rx else None
        self.seen["rx_resp" if data.startswith(b"SIP/2.0 ") else "rx_req"] += 1
        line = self.pad_line + b"\r\n"
        if line not in data:
            self.problems.append("the outgoing rewrite did not reach the wire")
            return None
        return data.replace(line, b"", 1)


def self_test(endpoint: SipEndpoint, *, timeout: float = 5.0) -> GateResult:
    """OPTIONS to ourselves through the hook; pumps the endpoint meanwhile.

    Uses a temporary UDP transport and account, removed again afterwards.
    """
    import pjsua2 as pj

    from .endpoint import PhoneAccount

    checks: list[tuple[str, bool, str]] = []
    hook = endpoint.hook
    full = endpoint.pj_endpoint.libVersion().full   # no local: see SipEndpoint.start
    checks.append(("pjproject", full == PINNED_PJPROJECT,
                   f"pjproject {full}" if full == PINNED_PJPROJECT else
                   f"pjproject {full} is running, the offsets are for {PINNED_PJPROJECT}"))
    if not hook.registered:
        checks.append(("hook", False, "the hook module is not registered"))
        return _result(checks)
    prev, nxt = hook.neighbours
    checks.append(("position", True, f"hook sits between {prev} and {nxt}"))

    errors_before = hook.error_total
    test = _SelfTest((hook.on_tx, hook.on_rx))
    transport = endpoint.add_transport("udp", 0)
    acc = PhoneAccount(endpoint, f"sip:e2m-selftest@{transport.host}:{transport.port}", None)
    cfg = pj.AccountConfig()
    cfg.idUri = acc.uri
    cfg.sipConfig.transportId = transport.id
    cfg.regConfig.registerOnAdd = False
    acc.create(cfg)
    status: dict[str, Any] = {}
    mark = endpoint.events.mark()

    def answered() -> bool:
        found = endpoint.events.find("send_request", source=acc.uri, since=mark)
        if found:
            status["code"], status["whole"] = found[0]["code"], found[0]["whole_msg"]
        return bool(found)

    try:
        with hook.override(test.tx, test.rx):
            prm = pj.SendRequestParam()
            prm.method = "OPTIONS"
            prm.txOption.targetUri = acc.uri
            h = pj.SipHeader()
            h.hName, h.hValue = test.marker.decode().split(": ", 1)
            prm.txOption.headers.append(h)
            try:
                acc.sendRequest(prm)
            except Exception as exc:
                info = exc.info() if hasattr(exc, "info") else str(exc)
                checks.append(("send", False, f"the self-test OPTIONS could not be sent: {info}"))
            else:
                endpoint.events.wait_until(answered, timeout)
    finally:
        if "code" in status:
            acc.shutdown()
            endpoint.close_transport(transport)
        else:
            # A transaction is still pending: deleting the account now would make
            # its final callback abort.  The endpoint keeps it until close().
            endpoint._keepalive.append(acc)
        del acc

    code = status.get("code")
    sent = not any(name == "send" for name, _, _ in checks)
    checks.append(("answer", code == 200 or not sent,
                   "self-test OPTIONS answered 200" if code == 200 else "not sent" if not sent else
                   f"self-test OPTIONS got {code or 'no answer'} within {timeout:.0f}s"))
    both = all(test.seen[k] >= 1 for k in test.seen)
    checks.append(("directions", both, f"hook saw {test.seen}" if both else
                   f"the hook did not see the message both ways: {test.seen}"))
    if code == 200:
        clean = test.pad_line not in status.get("whole", b"")
        checks.append(("reparse", clean, "pjsua acted on the rewritten incoming bytes" if clean
                       else "pjsua saw the incoming message before the hook rewrote it"))
    for problem in test.problems:
        checks.append(("wire", False, problem))
    new_errors = list(hook.errors)[-(hook.error_total - errors_before):] \
        if hook.error_total > errors_before else []
    checks.append(("sanity", not new_errors, "no sanity-check errors" if not new_errors else
                   "hook errors during the self-test: " + "; ".join(e.detail for e in new_errors)))
    return _result(checks, test.seen)


def gate(endpoint: SipEndpoint | None = None, *, expected_version: str = PINNED_WHEEL,
         expected_platform: tuple[str, str] = PINNED_PLATFORM,
         timeout: float = 5.0) -> GateResult:
    """Environment checks, then the self-test.

    With ``endpoint`` (started, hook registered) the test runs on it; without,
    a temporary endpoint is started and closed again (only possible while no
    other endpoint runs in this process).
    """
    env = check_environment(expected_version=expected_version, expected_platform=expected_platform)
    if not env.ok:
        return env
    if endpoint is not None:
        result = self_test(endpoint, timeout=timeout)
        return _result(list(env.checks) + list(result.checks), result.counts)
    from .endpoint import SipEndpoint

    temp = SipEndpoint(self_test_timeout=timeout)
    try:
        temp.start()   # runs check_environment and self_test itself
        assert temp.gate_result is not None
        return temp.gate_result
    finally:
        temp.close()
