"""A pjsip module, registered through ctypes, that sees every SIP message as bytes.

pjsua keeps working on plaintext; this module sits between pjsua and the wire:

- **outgoing**: pjsip calls ``on_tx_*`` from the highest priority number down.
  ``mod-msg-print`` (8) has already printed the message into ``tdata->buf`` when
  we (7, registered after ``mod-pjsua-log`` which is also 7) get it, and the
  logger after us records what really goes on the wire.  ``on_tx(data)``
  returns new bytes (or None) and the buffer is replaced.  If ``on_tx`` raises,
  the send is refused with a pj_status_t error: nothing leaves (fail closed),
  pjsua reports the failure to the application (pj.Error, a 5xx status) and the
  error is recorded in :attr:`RawSipHook.errors`.
- **incoming**: modules run from the lowest number up, so the logger has seen
  the wire bytes and we rewrite the message before the transaction, dialog and
  invite layers and pjsua see it.  ``on_rx(data)`` returns new bytes (or None);
  the new bytes are written in place and pjsip parses them again.  If ``on_rx``
  raises :class:`RxReject`, the message is dropped and a request is answered
  statelessly with the code it carries (or not at all when ``code`` is None);
  any other exception drops the message too and answers a request 500.  An
  incoming message the callback could not vouch for is never passed on as if
  it were fine.

Callbacks run on whichever thread pjsip polls from (the main thread with the
:mod:`pjsua_hooks.endpoint` settings).  They must be pure Python: no pjsua2
calls (pjsip holds its locks around module callbacks).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import pjsip_abi as abi

__all__ = ["HookFailure", "RawSipHook", "RxReject", "TxCallback", "RxCallback",
           "HOOK_MODULE_NAME", "HOOK_PRIORITY", "LOGGER_MODULE_NAME"]

TxCallback = Callable[[bytes], Optional[bytes]]
RxCallback = Callable[[bytes], Optional[bytes]]

HOOK_MODULE_NAME = "mod-e2m-hook"
LOGGER_MODULE_NAME = "mod-pjsua-log"   # PJSIP_MOD_PRIORITY_TRANSPORT_LAYER - 1
HOOK_PRIORITY = 7                      # same number as the logger, registered after it
_RECENT_OUTPUTS = 512                  # retransmission memo size


class RxReject(Exception):
    """Raised by an ``on_rx`` callback: drop this message, answer a request with ``code``.

    ``code`` None drops without an answer (the higher layer answers itself, or
    the message was a response).  ``headers`` and ``body`` are added to the
    stateless answer pjsip builds (Via, From, To, Call-ID, CSeq come from the
    request).  ACKs are never answered.
    """

    def __init__(self, code: int | None, reason: str | None = None, *,
                 headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
                 content_type: str | None = None, detail: str = "") -> None:
        if code is not None and not 300 <= code <= 699:
            raise ValueError("a rejection answer must be a 3xx-6xx code")
        if body and not content_type:
            raise ValueError("a body needs a content type")
        super().__init__(detail or (f"rejected with {code}" if code else "dropped"))
        self.code = code
        self.reason = reason
        self.headers = tuple(headers)
        self.body = bytes(body)
        self.content_type = content_type

    @classmethod
    def from_response(cls, response: object, *, detail: str = "") -> RxReject:
        """From a complete response built above (``e2m_plugins.sip.SipMessage``,
        e.g. ``UAEngine.refusal()``; None: drop without answer).  pjsip builds
        Via, From, To, Call-ID and CSeq itself; the rest is carried over."""
        if response is None:
            return cls(None, detail=detail)
        own = {"via", "v", "from", "f", "to", "t", "call-id", "i", "cseq",
               "content-length", "l", "content-type", "c"}
        headers = [(n, v) for n, v in response.headers  # type: ignore[attr-defined]
                   if n.strip().lower() not in own]
        body = response.body  # type: ignore[attr-defined]
        ctype = response.get("Content-Type") if body else None  # type: ignore[attr-defined]
        return cls(response.status, response.reason, headers=headers,  # type: ignore[attr-defined]
                   body=body, content_type=ctype, detail=detail)

    @classmethod
    def from_answer(cls, answer: object, *, agent: str = "localhost",
                    certificate_der: bytes | None = None, detail: str = "") -> RxReject:
        """From an ``e2m_plugins.sip_errors.SipAnswer`` (None: drop without answer)."""
        if answer is None:
            return cls(None, detail=detail)
        headers: list[tuple[str, str]] = []
        warning = answer.warning_header(agent)  # type: ignore[attr-defined]
        if warning:
            headers.append(("Warning", warning))
        if answer.accept:  # type: ignore[attr-defined]
            headers.append(("Accept", answer.accept))  # type: ignore[attr-defined]
        body, ctype = b"", None
        if answer.needs_certificate and certificate_der:  # type: ignore[attr-defined]
            body, ctype = certificate_der, "application/pkix-cert"
        return cls(answer.code, answer.reason, headers=headers, body=body,  # type: ignore[attr-defined]
                   content_type=ctype, detail=detail)


@dataclass(frozen=True)
class HookFailure:
    """One thing the hook refused or could not do.  Never holds message bodies."""

    direction: str            # "tx" or "rx"
    kind: str                 # "callback", "reject", "abi", "result", "answer"
    start_line: str           # first line of the message, for orientation
    detail: str               # exception type and text (engines keep plaintext out)
    blocked: bool             # the message was not sent / not delivered
    when: float = field(default_factory=time.time)
    exception: BaseException | None = field(default=None, compare=False, repr=False)


def _start_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0][:200].decode("utf-8", "replace")


def _framing_problem(data: bytes, like: bytes) -> str | None:
    """Why ``data`` cannot replace ``like`` on the wire, or None when it can."""
    if not isinstance(data, (bytes, bytearray)):
        return "callback returned %s, not bytes" % type(data).__name__
    if data.split(b"\r\n", 1)[0] != like.split(b"\r\n", 1)[0]:
        return "callback changed the start line"
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        return "no end of headers"
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() in (b"content-length", b"l"):
            if length is not None or not value.strip().isdigit():
                return "bad or repeated Content-Length"
            length = int(value.strip())
    if length is None:
        return "no Content-Length"
    if length != len(body):
        return "Content-Length %d but %d body bytes" % (length, len(body))
    return None


@dataclass
class _PendingAnswer:
    thread: int
    reject: RxReject


class RawSipHook:
    """The raw message hook.  Create, :meth:`register` after ``libInit``, keep a
    reference while the endpoint lives, :meth:`unregister` before ``libDestroy``.

    ``on_tx(data) -> bytes | None`` and ``on_rx(data) -> bytes | None`` take and
    give whole messages (start line, headers, body); ``None`` leaves a message
    unchanged.  Results must keep the start line and carry a matching
    Content-Length; an incoming rewrite may not be longer than the original
    (it is written in place).  During ``on_rx`` :attr:`rx_source` is the
    (host, port) the message came from and :attr:`rx_over_tcp` whether it came over
    a TCP connection; during ``on_tx``, :attr:`tx_destination` the
    (host, port) pjsip sends it to (None when it cannot be read).
    """

    def __init__(self, on_tx: TxCallback | None = None, on_rx: RxCallback | None = None, *,
                 on_error: Callable[[HookFailure], None] | None = None,
                 name: str = HOOK_MODULE_NAME, max_errors: int = 256) -> None:
        self.on_tx = on_tx
        self.on_rx = on_rx
        self.on_error = on_error
        self.errors: deque[HookFailure] = deque(maxlen=max_errors)
        self.error_total = 0      # errors ever recorded (the deque forgets old ones)
        self.counts = {"tx": 0, "rx": 0, "tx_rewritten": 0, "rx_rewritten": 0,
                       "tx_blocked": 0, "rx_dropped": 0, "tx_retransmitted": 0}
        self.rx_source: tuple[str, int] | None = None
        # During on_rx: whether the message came over a TCP connection (a UDP phone
        # takes its proxy's large requests on a TCP listener, RFC 3261 18.2.1)
        self.rx_over_tcp = False
        self.tx_destination: tuple[str, int] | None = None
        # Told the pjsip_transport* of every message that arrives whole (before
        # on_rx; the endpoint's TCP guard counts activity per connection).
        self.on_rx_transport: Callable[[int], None] | None = None
        self.neighbours: tuple[str, str] = ("", "")
        self._override: tuple[TxCallback | None, RxCallback | None] | None = None
        self._answer: _PendingAnswer | None = None
        self._emitted: OrderedDict[bytes, None] = OrderedDict()
        self._name = name.encode("ascii")
        self._name_buf = abi.C.create_string_buffer(self._name)
        # The C callbacks and the module struct must outlive the registration.
        self._c_rx = abi.RxCallback(self._rx_entry)
        self._c_tx = abi.TxCallback(self._tx_entry)
        mod = abi.PjsipModule()
        mod.name = abi.PjStr(abi.C.addressof(self._name_buf), len(self._name))
        mod.id = -1
        mod.priority = HOOK_PRIORITY
        mod.on_rx_request = self._c_rx
        mod.on_rx_response = self._c_rx
        mod.on_tx_request = self._c_tx
        mod.on_tx_response = self._c_tx
        self._mod = mod
        self.registered = False

    # -- life cycle ---------------------------------------------------------
    def register(self) -> None:
        """Insert the module into pjsip's list (after libInit, on a pjsip thread).

        Checks that it landed right after pjsua's logger and before the
        message printer; anything else means another layout or build.
        """
        if self.registered:
            return
        lib = abi.lib()
        status = lib.pjsip_endpt_register_module(lib.pjsua_get_pjsip_endpt(),
                                                 abi.C.byref(self._mod))
        if status != abi.PJ_SUCCESS:
            raise RuntimeError(f"pjsip_endpt_register_module failed: status {status}")
        self.registered = True
        prev = abi.module_name_at(self._mod.prev) if self._mod.prev else ""
        nxt = abi.module_name_at(self._mod.next) if self._mod.next else ""
        self.neighbours = (prev, nxt)
        if prev != LOGGER_MODULE_NAME:
            self.unregister()
            raise abi.AbiError(f"hook module landed after {prev!r}, not {LOGGER_MODULE_NAME!r}")

    def unregister(self) -> None:
        """Take the module out again (before libDestroy)."""
        if not self.registered:
            return
        lib = abi.lib()
        lib.pjsip_endpt_unregister_module(lib.pjsua_get_pjsip_endpt(), abi.C.byref(self._mod))
        self.registered = False

    @contextmanager
    def override(self, on_tx: TxCallback | None, on_rx: RxCallback | None) -> Iterator[None]:
        """Route every message to other callbacks for a while (the self-test)."""
        old = self._override
        self._override = (on_tx, on_rx)
        try:
            yield
        finally:
            self._override = old

    def clear_errors(self) -> None:
        self.errors.clear()

    def reset_counts(self) -> None:
        """Zero the counters (the endpoint does this after its self-test)."""
        for key in self.counts:
            self.counts[key] = 0

    # -- bookkeeping ---------------------------------------------------------
    def _callbacks(self) -> tuple[TxCallback | None, RxCallback | None]:
        return self._override if self._override is not None else (self.on_tx, self.on_rx)

    def _record(self, direction: str, kind: str, data: bytes, detail: str, blocked: bool,
                exc: BaseException | None = None) -> None:
        if exc is not None:
            # A traceback would keep the frames of whoever made pjsip send (and
            # their pjsua2 objects) alive: the next Endpoint could not start.
            exc.__traceback__ = None
            exc.__context__ = exc.__cause__ = None
        err = HookFailure(direction, kind, _start_line(data), detail[:300], blocked, exception=exc)
        self.errors.append(err)
        self.error_total += 1
        if self.on_error is not None:
            try:
                self.on_error(err)
            except Exception:  # an observer must not break message handling
                pass

    def _remember(self, data: bytes) -> None:
        key = hashlib.sha256(data).digest()
        self._emitted[key] = None
        self._emitted.move_to_end(key)
        while len(self._emitted) > _RECENT_OUTPUTS:
            self._emitted.popitem(last=False)

    # -- outgoing --------------------------------------------------------------
    def _tx_entry(self, tdata: int) -> int:
        # Called from C: nothing may escape.  Any failure refuses the send.
        data = b""
        try:
            data = abi.tx_bytes(tdata)
            self.counts["tx"] += 1
            return self._tx(tdata, data)
        except abi.AbiError as exc:
            self.counts["tx_blocked"] += 1
            self._record("tx", "abi", data, str(exc), True, exc)
        except BaseException as exc:  # noqa: BLE001 - fail closed on anything
            self.counts["tx_blocked"] += 1
            self._record("tx", "result", data, f"{type(exc).__name__}: {exc}", True, exc)
        return abi.error_status(500)

    def _tx(self, tdata: int, data: bytes) -> int:
        pending = self._answer
        if (pending is not None and pending.thread == threading.get_ident()
                and data.startswith(b"SIP/2.0 %d " % pending.reject.code)):
            self._answer = None
            abi.tx_replace(tdata, _complete_answer(data, pending.reject))
            return abi.PJ_SUCCESS
        if hashlib.sha256(data).digest() in self._emitted:
            # A retransmission of bytes our callback already produced.
            self.counts["tx_retransmitted"] += 1
            return abi.PJ_SUCCESS
        on_tx = self._callbacks()[0]
        if on_tx is None:
            return abi.PJ_SUCCESS
        try:
            self.tx_destination = abi.tx_destination(tdata)
            new = on_tx(data)
        except Exception as exc:
            self.counts["tx_blocked"] += 1
            self._record("tx", "callback", data, f"{type(exc).__name__}: {exc}", True, exc)
            code = getattr(exc, "code", None)
            return abi.error_status(code if isinstance(code, int) and 400 <= code <= 699 else 500)
        finally:
            self.tx_destination = None
        if new is None or new == data:
            return abi.PJ_SUCCESS
        problem = _framing_problem(new, data)
        if problem:
            self.counts["tx_blocked"] += 1
            self._record("tx", "result", data, problem, True)
            return abi.error_status(500)
        new = bytes(new)
        abi.tx_replace(tdata, new)
        self._remember(new)
        self.counts["tx_rewritten"] += 1
        return abi.PJ_SUCCESS

    # -- incoming --------------------------------------------------------------
    def _rx_entry(self, rdata: int) -> int:
        # Called from C.  PJ_TRUE = consumed (dropped), PJ_FALSE = pass on.
        try:
            view = abi.rx_view(rdata)
        except BaseException as exc:  # noqa: BLE001 - cannot read it: do not pass it
            self.counts["rx_dropped"] += 1
            self._record("rx", "abi", b"", f"{type(exc).__name__}: {exc}", True, exc)
            return abi.PJ_TRUE
        if self.on_rx_transport is not None:
            try:
                self.on_rx_transport(view.transport)
            except Exception:  # an observer must not break message handling
                pass
        try:
            self.counts["rx"] += 1
            return self._rx(rdata, view)
        except BaseException as exc:  # noqa: BLE001
            self.counts["rx_dropped"] += 1
            self._record("rx", "result", view.data, f"{type(exc).__name__}: {exc}", True, exc)
            return abi.PJ_TRUE
        finally:
            self.rx_source = None
            self.rx_over_tcp = False

    def _rx(self, rdata: int, view: abi.RxView) -> int:
        on_rx = self._callbacks()[1]
        if on_rx is None:
            return abi.PJ_FALSE
        self.rx_source = (view.src_host, view.src_port)
        self.rx_over_tcp = abi.tcp_direction(view.transport) is not None
        data = view.data
        try:
            new = on_rx(data)
        except RxReject as rej:
            self.counts["rx_dropped"] += 1
            self._record("rx", "reject", data, str(rej), True, rej)
            if rej.code is not None:
                self._answer_request(rdata, view, rej)
            return abi.PJ_TRUE
        except Exception as exc:
            self.counts["rx_dropped"] += 1
            self._record("rx", "callback", data, f"{type(exc).__name__}: {exc}", True, exc)
            self._answer_request(rdata, view, RxReject(500, "Server Internal Error"))
            return abi.PJ_TRUE
        if new is None or new == data:
            return abi.PJ_FALSE
        problem = _framing_problem(new, data)
        if problem is None and len(new) > len(data):
            problem = "rewritten message longer than the original (%d > %d)" % (len(new), len(data))
        if problem:
            # Nothing was written yet, so the rdata is intact for an answer.
            self.counts["rx_dropped"] += 1
            self._record("rx", "result", data, problem, True)
            self._answer_request(rdata, view, RxReject(500, "Server Internal Error"))
            return abi.PJ_TRUE
        try:
            abi.rx_replace(rdata, view, bytes(new))
        except abi.AbiError as exc:
            # The rdata may be half-rewritten: drop without touching it again.
            self.counts["rx_dropped"] += 1
            self._record("rx", "abi", data, str(exc), True, exc)
            return abi.PJ_TRUE
        self.counts["rx_rewritten"] += 1
        return abi.PJ_FALSE

    def _answer_request(self, rdata: int, view: abi.RxView, rej: RxReject) -> None:
        if not view.is_request or view.data.startswith(b"ACK ") or rej.code is None:
            return
        self._answer = _PendingAnswer(threading.get_ident(), rej)
        try:
            reason = rej.reason.encode("utf-8") if rej.reason else None
            status = abi.respond_stateless(rdata, rej.code, reason)
            if status != abi.PJ_SUCCESS:
                self._record("rx", "answer", view.data,
                             f"stateless {rej.code} failed: status {status}", True)
        finally:
            self._answer = None


def _complete_answer(data: bytes, rej: RxReject) -> bytes:
    """pjsip's stateless answer plus the headers and body the rejection carries."""
    if not rej.headers and not rej.body:
        return data
    from e2m_plugins import sip  # the one SIP model; imported late, hook stays light

    msg = sip.parse(data)
    for name, value in rej.headers:
        msg = msg.add(name, value)
    if rej.body:
        msg = msg.remove("Content-Type").with_body(rej.body, rej.content_type)
    return msg.serialize()
