"""The hook's self-test: an OPTIONS from the running endpoint to itself, through the hook.

It rewrites its own OPTIONS and the answer on the way out and back again, and checks
that both directions were seen by the hook, that pjsua acted on the rewritten bytes,
and that no sanity check failed.  It knows the endpoint only through ``SelfTestHost``
(``SipEndpoint`` is one), so the endpoint can run it at start without an import circle.
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

from e2m_plugins.uri import canonical_ip

from .gate import GateResult, gate_result
from .pjsip_abi import PINNED_PJPROJECT

__all__ = ["SelfTestHost", "self_test"]


class SelfTestHost(Protocol):
    """What the self-test needs from a started endpoint."""

    hook: Any
    events: Any

    @property
    def pj_endpoint(self) -> Any: ...

    def add_transport(self, kind: str = "udp", port: int = 0) -> Any: ...

    def close_transport(self, info: Any) -> None: ...

    def probe_account(self, uri: str, transport: Any) -> Any: ...

    def retain_until_close(self, account: Any) -> None: ...


class _SelfTest:
    """Rewrites that only touch the self-test's own OPTIONS and its answer."""

    PAD_NAME = b"X-E2M-Selftest-Pad"

    def __init__(self, previous: tuple[Any, Any], hook: Any = None) -> None:
        self.hook = hook
        self.destinations: list[tuple[str, int] | None] = []
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
        if self.hook is not None and not data.startswith(b"SIP/2.0 "):
            self.destinations.append(self.hook.tx_destination)
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


def self_test(endpoint: SelfTestHost, *, timeout: float = 5.0) -> GateResult:
    """OPTIONS to ourselves through the hook; pumps the endpoint meanwhile.

    Uses a temporary UDP transport and account, removed again afterwards.
    """
    import pjsua2 as pj

    checks: list[tuple[str, bool, str]] = []
    hook = endpoint.hook
    full = endpoint.pj_endpoint.libVersion().full   # no local: see SipEndpoint.start
    checks.append(("pjproject", full == PINNED_PJPROJECT,
                   f"pjproject {full}" if full == PINNED_PJPROJECT else
                   f"pjproject {full} is running, the offsets are for {PINNED_PJPROJECT}"))
    if not hook.registered:
        checks.append(("hook", False, "the hook module is not registered"))
        return gate_result(checks)
    prev, nxt = hook.neighbours
    checks.append(("position", True, f"hook sits between {prev} and {nxt}"))

    errors_before = hook.error_total
    test = _SelfTest((hook.on_tx, hook.on_rx), hook)
    transport = endpoint.add_transport("udp", 0)
    acc = endpoint.probe_account(transport.uri("e2m-selftest"), transport)
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
            endpoint.retain_until_close(acc)
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
    # the phone holds answers to where pjsip really sent a request (review 108): the
    # destination read from the tx data must be the address the OPTIONS went to
    where = (transport.host, transport.port)
    told = bool(test.destinations) and all(
        d is not None and canonical_ip(d[0]) == canonical_ip(where[0]) and d[1] == where[1]
        for d in test.destinations)
    checks.append(("destination", told or not sent,
                   f"the hook read the destination {where[0]}:{where[1]}" if told else
                   f"the hook read the destination as {test.destinations}, not {where}"))
    for problem in test.problems:
        checks.append(("wire", False, problem))
    new_errors = list(hook.errors)[-(hook.error_total - errors_before):] \
        if hook.error_total > errors_before else []
    checks.append(("sanity", not new_errors, "no sanity-check errors" if not new_errors else
                   "hook errors during the self-test: " + "; ".join(e.detail for e in new_errors)))
    return gate_result(checks, test.seen)
