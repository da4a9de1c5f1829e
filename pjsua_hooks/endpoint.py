"""The one pjsua2 Endpoint of a process, with transports, accounts, messages and calls.

Rules this class enforces, each learnt from a crash (``pjsua2-recipes.md`` §6):

- one Endpoint per process at a time (a second ``pj.Endpoint()`` aborts);
- ``threadCnt = 0`` and ``mainThreadOnly``: pjsip does nothing on its own
  threads that reaches Python; every callback runs inside :meth:`pump` on the
  thread that called :meth:`SipEndpoint.start`, and every public method must be
  called from that same thread (others would trip a pjlib assertion);
- shutdown in order: hang up and wait, wait for outstanding MESSAGE answers,
  drop every Call and Buddy, shut the accounts down, unregister the hook, and
  only then ``libDestroy``; a forgotten endpoint is closed at interpreter exit.
- the null audio device (there is no sound hardware), media bound to the same
  host as SIP so SDP ``c=`` lines name it.
"""

from __future__ import annotations

import atexit
import gc
import ipaddress
import itertools
import logging
import re
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import pjsua2 as pj

from .events import EventLog
from .gate import GateError, GateResult, check_environment, gate_result
from .pjsip_abi import PINNED_PLATFORM, PINNED_WHEEL
from .rawhook import HookFailure, RawSipHook
from .selftest import self_test
from .strong_rand import RandomSourceError, install as install_strong_rand
from .tcpguard import TcpGuard, find_listener


__all__ = ["SipEndpoint", "PhoneAccount", "PhoneCall", "TransportInfo",
           "SendError", "SendBlocked", "EndpointError"]

log = logging.getLogger("pjsua_hooks")



def _hostport(host: str, port: int) -> str:
    """``host:port`` as a SIP URI writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if _is_ipv6(host) and not host.startswith("[") else f"{host}:{port}"


def _is_ipv6(host: str) -> bool:
    """Whether ``host`` (an address the phone binds) is an IPv6 literal."""
    try:
        return ipaddress.ip_address(host.strip("[]")).version == 6
    except ValueError:
        return False

class EndpointError(RuntimeError):
    """Misuse of the endpoint (wrong thread, second endpoint, not started)."""


class SendError(RuntimeError):
    """pjsua refused to send a request; ``status`` is the pj_status_t if known."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SendBlocked(SendError):
    """The hook refused to let the message leave (fail closed); see ``hook_failure``."""

    def __init__(self, message: str, hook_failure: HookFailure, status: int | None = None) -> None:
        super().__init__(message, status)
        self.hook_failure = hook_failure


@dataclass(frozen=True)
class TransportInfo:
    id: int
    kind: str          # "udp", "tcp" or "tls"
    host: str
    port: int

    def uri(self, user: str) -> str:
        """A direct SIP URI for ``user`` on this transport."""
        suffix = f";transport={self.kind}" if self.kind in ("tcp", "tls") else ""
        return f"sip:{user}@{_hostport(self.host, self.port)}{suffix}"


def _pj_endpoint_exists() -> bool:
    try:
        pj.Endpoint.instance()
    except pj.Error:
        return False
    return True


def _bytes(text: str) -> bytes:
    # SWIG hands C strings over as UTF-8 with surrogateescape: this gets the octets back.
    return text.encode("utf-8", "surrogateescape")


_ACTIVE: weakref.ref[SipEndpoint] | None = None


def _close_at_exit() -> None:
    ep = _ACTIVE() if _ACTIVE is not None else None
    if ep is not None:
        ep.close()


atexit.register(_close_at_exit)


class SipEndpoint:
    """Owns the pjsua2 Endpoint, the raw hook, transports and accounts.

    ``hook``: the :class:`RawSipHook` to install (None: a hook with no
    callbacks, still gated and self-tested, so callbacks can be set later).
    ``require_e2m``: if the gate (wheel version, platform, self-test) fails,
    :meth:`start` raises :class:`pjsua_hooks.gate.GateError` instead of running
    without the hook.  ``log_level`` goes to pjsua's console writer (0: quiet);
    ``log_messages`` also logs whole SIP messages (the wire form; keep it off
    where bodies could be plaintext).
    """

    def __init__(self, *, hook: RawSipHook | None = None, require_e2m: bool = False,
                 host: str = "127.0.0.1", log_level: int = 0, log_messages: bool = False,
                 user_agent: str = "e2m-sip pjsua2", self_test_timeout: float = 5.0,
                 tcp: dict[str, Any] | None = None, event_limit: int = 10000) -> None:
        self.hook = hook if hook is not None else RawSipHook()
        self.require_e2m = require_e2m
        self.host = host
        self.log_level = log_level
        self.log_messages = log_messages
        self.user_agent = user_agent
        self.self_test_timeout = self_test_timeout
        self.tcp_settings = dict(tcp or {})      # TcpGuard keywords for a TCP transport
        self.tcp_guard: TcpGuard | None = None
        self.tls_gate: TcpGuard | None = None     # the TLS listener, closed for good
        self.events = EventLog(self.pump, limit=event_limit)
        self.gate_result: GateResult | None = None
        self.hook_active = False
        self.transports: dict[int, TransportInfo] = {}
        self.accounts: list[PhoneAccount] = []
        self._wrappers: weakref.WeakSet[Any] = weakref.WeakSet()   # every pj object we made
        self._keepalive: list[PhoneAccount] = []   # internal accounts with work in flight
        self._ep: Any = None
        self._writer: Any = None
        self._owner: int | None = None
        self._started = False
        # The automatic answer of an incoming call whose answer needs certificates the
        # phone is fetching: given the INVITE, the hosts to wait for (none: answer at
        # once); the phone sets it and answers the calls left ringing (``ringing``).
        self.answer_waits: Callable[[bytes], list[Any]] = lambda whole_msg: []
        self.ringing: list[tuple[Any, str, list[Any], float]] = []

    def answer_ringing(self, held: Callable[[Any], bool]) -> int:
        """Answer each call left ringing for certificates (``answer_waits``: what it
        names) once every one it waits for is ``held``, or its time is up (then without them: the proxy
        may drop that answer, as it would have at once); one that ended is let go.
        Returns how many were answered."""
        now, answered, still = time.monotonic(), 0, []
        for call, call_id, hosts, deadline in self.ringing:
            if call.disconnected:
                continue
            if now < deadline and not all(held(wanted) for wanted in hosts):
                still.append((call, call_id, hosts, deadline))
                continue
            call.account.answer_call(call, call_id, call.account.auto_answer)
            answered += 1
        self.ringing = still
        return answered

    # -- life cycle -------------------------------------------------------------
    def start(self) -> SipEndpoint:
        """Create and start pjsua, gate and install the hook.  Returns self."""
        global _ACTIVE
        if self._started:
            return self
        if _ACTIVE is not None and _ACTIVE() is not None:
            raise EndpointError("a SipEndpoint is already running in this process")
        env = check_environment()
        if not env.ok and self.require_e2m:
            # Do not even touch pjsua: the offsets are for another build.
            self.gate_result = env
            raise GateError(env)
        if env.ok:
            from . import pjsip_abi

            pjsip_abi.silence_pjlib_log()   # no banner from libCreate
            env = gate_result(list(env.checks) + [_random_source_check()])
            if not env.ok and self.require_e2m:
                self.gate_result = env
                raise GateError(env)
        if _pj_endpoint_exists():
            # A second pj.Endpoint() aborts the process; refuse instead.
            raise EndpointError("an earlier pjsua2 Endpoint object is still alive (held by a "
                                "reference or a traceback); it must be gone before a new start")
        self._owner = threading.get_ident()
        _ACTIVE = weakref.ref(self)
        # No local name for the Endpoint: a traceback through this frame would
        # keep it alive, and the next start would find it.
        self._ep = _Endpoint(self)
        try:
            self._ep.libCreate()
            cfg = pj.EpConfig()
            cfg.uaConfig.threadCnt = 0
            cfg.uaConfig.mainThreadOnly = True
            cfg.uaConfig.userAgent = self.user_agent
            # no a=X-nat line: it tells the peer nothing it uses, and every SDP octet
            # counts toward pjsip's 4000-byte receive limit (docs/protocol.md §6.2)
            cfg.uaConfig.natTypeInSdp = 0
            cfg.logConfig.level = self.log_level
            cfg.logConfig.consoleLevel = self.log_level
            # Always on: it registers mod-pjsua-log, the hook's neighbour; whether
            # whole messages reach the log is decided by the writer below.
            cfg.logConfig.msgLogging = 1
            cfg.logConfig.decor = 0
            self._writer = _LogWriter(self.log_messages)
            cfg.logConfig.writer = self._writer
            cfg.medConfig.threadCnt = 1
            self._ep.libInit(cfg)
            self._ep.audDevManager().setNullDev()
            if env.ok:
                self.hook.register()      # checks it sits right after pjsua's logger
                self.hook_active = True
            self._ep.libStart()
            self._started = True
            if env.ok:
                st = self_test(self, timeout=self.self_test_timeout)
                result = gate_result(list(env.checks) + list(st.checks), st.counts)
                self.hook.reset_counts()   # counts describe the application's traffic
            else:
                result = env
            self.gate_result = result
            if not result.ok:
                if self.require_e2m:
                    raise GateError(result)
                log.warning("E2M hook disabled: %s", result.reason)
                self.hook.unregister()
                self.hook_active = False
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> SipEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def pj_endpoint(self) -> Any:
        """The underlying ``pjsua2.Endpoint`` (owner thread only)."""
        self._check()
        return self._ep

    def close(self, timeout: float = 2.0) -> None:
        """Shut everything down in the order pjsua needs.  Safe to call twice.

        Accounts stay alive (and are not shut down) until after ``libDestroy``:
        pjsip terminates pending transactions while it is destroyed, and their
        callbacks look the account up, which aborts if it was deleted.  The hook
        stays registered too, so nothing leaves unprotected during the destroy.
        """
        global _ACTIVE
        ep = self._ep
        if ep is None:
            return
        if self._owner is not None and threading.get_ident() != self._owner:
            raise EndpointError("close() must run on the thread that started the endpoint")
        accounts = self.accounts + self._keepalive
        try:
            if self._started:
                try:
                    ep.hangupAllCalls()
                except Exception:
                    pass
                self.events.wait_until(lambda: all(not a.live_calls() for a in accounts), timeout)
                self.events.wait_until(lambda: all(a.pending_messages == 0 for a in accounts),
                                       timeout)
                mark = self.events.mark()
                registered = [a for a in accounts if a.is_registered]
                for acc in registered:
                    try:
                        acc.setRegistration(False)
                    except Exception:
                        pass
                if registered:
                    self.events.wait_until(lambda: len(self.events.find(
                        "reg", since=mark, where=lambda e: e["expiration"] <= 0 or e["code"] >= 300))
                        >= len(registered), timeout)
            for acc in accounts:
                acc._release_calls_and_buddies()
            gc.collect()   # wrappers nobody else holds go now, while pjsua can take it
            # Wrappers still held (ours: the accounts; the application's: calls it
            # kept) would run C++ destructors after libDestroy, and ~Call asserts.
            for obj in list(self._wrappers):
                obj.thisown = False
            if self.tcp_guard is not None:
                self.tcp_guard.close()      # our copy of the listening socket goes first
            if self.tls_gate is not None:
                self.tls_gate.close()
            # NO_RX_MSG: we waited for what matters above; skips pjsua's 1 s sleep.
            ep.libDestroy(pj.PJSUA_DESTROY_NO_RX_MSG)
            self.hook.registered = False     # pjsip_endpt_destroy unregistered it
            self.hook_active = False
        finally:
            if self.tcp_guard is not None:
                self.tcp_guard.close()
                self.tcp_guard = None
            if self.tls_gate is not None:
                self.tls_gate.close()
                self.tls_gate = None
            self.hook.on_rx_transport = None
            self._ep = None
            self._started = False
            self.accounts.clear()
            self._keepalive.clear()
            ep = accounts = None   # the last references go before the collection
            gc.collect()
            if _ACTIVE is not None and _ACTIVE() is self:
                _ACTIVE = None

    # -- event loop ---------------------------------------------------------------
    def _check(self) -> None:
        if self._ep is None:
            raise EndpointError("the endpoint is not running")
        if threading.get_ident() != self._owner:
            raise EndpointError("pjsua2 calls must come from the thread that started the endpoint")

    def pump(self, ms: int = 10) -> int:
        """Run pjsip's event loop once for up to ``ms`` ms; callbacks run here."""
        self._check()
        handled = self._ep.libHandleEvents(ms)
        if self.tcp_guard is not None:
            for handle in self.tcp_guard.due():
                try:
                    self._ep.transportShutdown(handle)
                except Exception:  # noqa: BLE001 - pj.Error: already going
                    pass
        return handled

    def _on_transport_state(self, prm: Any) -> None:
        """pjsua's transport state callback (inside the pump; pjsip calls it right
        after accepting a connection, and lets it shut that connection down)."""
        guard = self.tcp_guard
        if guard is None or str(prm.type).upper() != "TCP":
            return
        if guard.on_state(prm.hnd, prm.state):
            self._ep.transportShutdown(prm.hnd)

    def run_for(self, seconds: float) -> None:
        """Pump for ``seconds`` (e.g. to let media flow)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump(10)

    # -- transports -----------------------------------------------------------------
    def add_transport(self, kind: str = "udp", port: int = 0, *,
                      tls_ca: Sequence[Any] | None = None) -> TransportInfo:
        """A UDP, TCP or TLS listener on ``host``; port 0 picks a free one.

        TLS needs ``tls_ca`` (the ``cryptography`` certificates to trust): the
        servers we connect to must present a chain to one of them and name the host
        we dial (DNS or IP SAN); TLS 1.2 only (the pinned wheel has nothing newer).
        """
        self._check()
        # pjsip's IPv4 types do not take an IPv6 address (PJ_ERESOLVE; review 133 K2)
        types = ({"udp": pj.PJSIP_TRANSPORT_UDP6, "tcp": pj.PJSIP_TRANSPORT_TCP6,
                  "tls": pj.PJSIP_TRANSPORT_TLS6} if _is_ipv6(self.host) else
                 {"udp": pj.PJSIP_TRANSPORT_UDP, "tcp": pj.PJSIP_TRANSPORT_TCP,
                  "tls": pj.PJSIP_TRANSPORT_TLS})
        if kind not in types:
            raise ValueError("kind must be 'udp', 'tcp' or 'tls'")
        tc = pj.TransportConfig()
        tc.port = port
        tc.boundAddress = self.host
        if kind == "tls":
            _verifying_tls(tc.tlsConfig, tls_ca)
        tid = self._ep.transportCreate(types[kind], tc)
        name = self._ep.transportGetInfo(tid).localName
        host, _, port_text = name.rpartition(":")
        info = TransportInfo(tid, kind, host.strip("[]"), int(port_text))
        self.transports[tid] = info
        try:
            self._gate_listener(kind, info)
        except EndpointError:
            self.transports.pop(tid, None)
            self._ep.transportClose(tid)
            raise
        return info

    def _gate_listener(self, kind: str, info: TransportInfo) -> None:
        """The guard of a new TCP or TLS listener (``EndpointError`` when its socket
        cannot be gated)."""
        if kind == "tcp" and self.tcp_guard is None:
            self._guard_tcp(info)
        if kind == "tls" and self.tls_gate is None:
            # pjsip's TLS listener has no certificate, so nobody completes a handshake
            # with it, yet each connection takes one of pjlib's 64 ioqueue slots (see
            # tcpguard.py): the kernel completes none; the proxy reaches us on the
            # connection we opened.
            gate = TcpGuard(lambda handle: None, accept=False)
            if not gate.attach_listener(find_listener(self.host, info.port)):
                # ungated, a stranger's connections would take pjlib's 64 slots and
                # abort the process (review 138 K1): no phone rather than that one
                raise EndpointError("the TLS listener's socket was not found: it cannot "
                                    "be kept from strangers")
            self.tls_gate = gate

    def add_udp_with_tcp(self, port: int = 0, *, tries: int = 8
                         ) -> tuple[TransportInfo, TransportInfo]:
        """A UDP transport and a TCP listener at the same address and port.

        RFC 3261 18.2.1: a UA that listens for UDP on a port listens for TCP there too,
        because a proxy sends a request above 1300 octets over TCP to that port
        (18.1.1; review 132 HB2: the certificate service's large NOTIFY).  The TCP
        listener gets the TCP guard of a TCP phone (``tcp`` settings).  Accounts stay
        bound to the UDP transport (their Via and Contact say UDP, and pjsip's own
        switch to TCP for large requests is skipped for a bound account).  Port 0: a
        free UDP port, tried again when that port is taken for TCP."""
        for attempt in range(tries):
            udp = self.add_transport("udp", port)
            try:
                return udp, self.add_transport("tcp", udp.port)
            except EndpointError:          # it cannot be gated: no other port helps
                self.close_transport(udp)
                raise
            except Exception:  # noqa: BLE001 - pj.Error: the port is taken for TCP
                self.close_transport(udp)
                if port or attempt == tries - 1:
                    raise
        raise ValueError("tries must be at least 1")

    def _guard_tcp(self, info: TransportInfo) -> None:
        """Bound the TCP connections (``tcpguard.TcpGuard``); without the hook there is
        no per-message activity to see, so only the count limits apply then."""
        from . import pjsip_abi

        settings = dict(self.tcp_settings)
        if not self.hook_active:
            settings["idle_timeout"] = settings["first_message_timeout"] = float("inf")
        guard = TcpGuard(pjsip_abi.tcp_direction, **settings)
        if not guard.attach_listener(find_listener(self.host, info.port)):
            # without its gate a stranger's churn takes pjlib's 64 slots and aborts the
            # process (review 138 K1: a phone bound to 0.0.0.0 was never gated)
            raise EndpointError("the TCP listener's socket was not found: its connections "
                                "cannot be bounded")
        self.tcp_guard = guard
        self.hook.on_rx_transport = guard.on_message

    def close_transport(self, info: TransportInfo) -> None:
        self._check()
        if info.kind == "tcp" and self.tcp_guard is not None:
            self.tcp_guard.close()
            self.tcp_guard = None
            self.hook.on_rx_transport = None
        if info.kind == "tls" and self.tls_gate is not None:
            self.tls_gate.close()
            self.tls_gate = None
        self._ep.transportClose(info.id)
        self.transports.pop(info.id, None)

    # -- accounts --------------------------------------------------------------------
    def probe_account(self, uri: str, transport: TransportInfo) -> PhoneAccount:
        """An unregistered account on ``transport`` for the self-test's OPTIONS."""
        self._check()
        acc = PhoneAccount(self, uri, None)
        cfg = pj.AccountConfig()
        cfg.idUri = uri
        cfg.sipConfig.transportId = transport.id
        cfg.regConfig.registerOnAdd = False
        acc.create(cfg)
        return acc

    def retain_until_close(self, account: PhoneAccount) -> None:
        """Keep ``account`` until ``close``: deleting it with a transaction still pending
        would make pjsua's final callback abort the process."""
        self._keepalive.append(account)

    def add_account(self, user: str, transport: TransportInfo, *, domain: str | None = None,
                    registrar: str | None = None, auth: tuple[str, str, str] | None = None,
                    auto_answer: int | None = 200, srtp: bool = False,
                    proxies: Sequence[str] = (),
                    register_via_proxies: bool = True,
                    srtp_suites: Sequence[str] = (),
                    publish: bool = False) -> PhoneAccount:
        """An account bound to ``transport``.

        ``domain`` defaults to the transport's host:port (a direct, registrar-less
        identity).  ``registrar`` is a SIP URI to REGISTER to; ``auth`` a
        (username, password, realm) for digest challenges of that realm alone.  ``auto_answer`` is the
        status to answer incoming calls with (None: leave them ringing).
        ``register_via_proxies`` False sends REGISTER straight to the registrar
        while other requests still take ``proxies``.  ``srtp_suites`` limits the
        SRTP crypto suites offered (e.g. ``AES_CM_128_HMAC_SHA1_80``).
        """
        self._check()
        if domain is None:
            domain = _hostport(transport.host, transport.port)
        ac = pj.AccountConfig()
        ac.idUri = f"sip:{user}@{domain}"
        ac.sipConfig.transportId = transport.id
        for uri in proxies:
            ac.sipConfig.proxies.append(uri)
        if registrar:
            ac.regConfig.registrarUri = registrar
            ac.regConfig.registerOnAdd = True
            if not register_via_proxies:
                ac.regConfig.proxyUse = 0   # neither outbound nor account proxy
        else:
            ac.regConfig.registerOnAdd = False
        # pjsip's publication client (RFC 3903: auth, SIP-ETag, refresh); the phone's
        # hook turns its presence PUBLISH into a certificate one (certservice_client.py)
        ac.presConfig.publishEnabled = publish
        if auth:
            # the home realm only, never "*": a realm is the challenger's to name
            user, password, realm = auth
            ac.sipConfig.authCreds.append(pj.AuthCredInfo("digest", realm, user, 0, password))
        # No RFC 4028 session timers: Session-Expires, Min-SE and "timer" cost 42
        # octets of every INVITE toward the 4000-byte limit (docs/protocol.md §6.2),
        # and the proxies keep no dialog state a refresh would keep alive.  The price:
        # a call whose peer vanished without a BYE is not ended by a failed refresh.
        ac.callConfig.timerUse = pj.PJSUA_SIP_TIMER_INACTIVE
        ac.mediaConfig.transportConfig.port = 0
        ac.mediaConfig.transportConfig.boundAddress = self.host
        if srtp:
            ac.mediaConfig.srtpUse = pj.PJMEDIA_SRTP_MANDATORY
            ac.mediaConfig.srtpSecureSignaling = 0
            for name in srtp_suites:
                suite = pj.SrtpCrypto()
                suite.name = name
                ac.mediaConfig.srtpOpt.cryptos.append(suite)
        acc = PhoneAccount(self, ac.idUri, auto_answer)
        acc.registrar = registrar
        acc.create(ac)
        self.accounts.append(acc)
        return acc

    # -- hook errors --------------------------------------------------------------------
    def hook_failures(self, since: int = 0) -> list[HookFailure]:
        """Errors the hook recorded (refused sends, dropped messages)."""
        return list(self.hook.errors)[since:]


def _verifying_tls(tls: Any, anchors: Sequence[Any] | None) -> None:
    """Set a pjsua ``TlsConfig`` to verify servers against ``anchors``, TLS 1.2 only.

    ``proto`` must be set as well as ``method``: its default (TLS 1.0-1.2) wins over
    ``method``, and pjsua would then agree to TLS 1.1 (pjsua2-recipes, "TLS").
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    if not anchors:
        raise ValueError("a TLS transport needs the CA certificates to verify the proxy")
    tls.CaBuf = "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in anchors)
    tls.verifyServer = True
    tls.verifyClient = False
    tls.method = pj.PJSIP_TLSV1_2_METHOD
    tls.proto = pj.PJ_SSL_SOCK_PROTO_TLS1_2


def _random_source_check() -> tuple[str, bool, str]:
    """pjsip's Call-IDs, tags and branches from the OS random source, not glibc's
    ``rand()`` (stop 41): a gate check, so an E2M phone does not start without it."""
    try:
        install_strong_rand()
    except (RandomSourceError, OSError) as exc:
        return ("random", False, f"pjsip's identifiers would come from glibc rand(): {exc}")
    return ("random", True, "pjsip's rand() draws from the OS random source")


class _Endpoint(pj.Endpoint):
    """pj.Endpoint with the transport state callback handed to the SipEndpoint."""

    def __init__(self, owner: SipEndpoint) -> None:
        super().__init__()
        self._owner = weakref.ref(owner)

    def onTransportState(self, prm: Any) -> None:
        owner = self._owner()
        if owner is None:
            return
        try:
            owner._on_transport_state(prm)
        except Exception:  # noqa: BLE001 - nothing may escape into pjsip
            log.exception("transport state callback failed")


class _LogWriter(pj.LogWriter):
    """pjsua's console log goes to Python logging instead of stderr.

    Whole SIP messages (the "TX/RX ... --end msg--" entries) are dropped unless
    asked for: they are the wire form, which is plaintext wherever E2M is off.
    """

    def __init__(self, messages: bool) -> None:
        super().__init__()
        self.messages = messages

    def write(self, entry: Any) -> None:
        text = entry.msg.rstrip()
        if not self.messages and text.endswith("--end msg--"):
            return
        log.debug("pjsua: %s", redact_pjsua_line(text))


# pjsua quotes the IM text in its own lines ("Message '<text>' delivered
# successfully", "Failed to deliver message '<text>': 496/...") and prints the
# SRTP master key at level 5 ("TX: AES_CM_128_HMAC_SHA1_80 key=<key>").
# Each PhoneCall's own number, named by its events: two calls may share one SIP Call-ID
# (a second dialog under a live call's), so the Call-ID cannot say whose event it is.
_CALL_SERIALS = itertools.count(1)
_MAX_RINGING = 32             # calls left ringing for certificates at once (more: answered)
_RING_FOR_CERTIFICATES = 3.0  # s at most: the phone's fetch (2 s by default) and a tick

_IM_TEXT = re.compile(r"(message ')(.*)('(?: delivered|:))", re.IGNORECASE | re.DOTALL)
_KEY_VALUE = re.compile(r"\b(key|salt)=\S+", re.IGNORECASE)


def redact_pjsua_line(text: str) -> str:
    """A pjsua log line without message text or key material."""
    text = _IM_TEXT.sub(lambda m: f"{m.group(1)}<{len(m.group(2))} chars>{m.group(3)}", text)
    return _KEY_VALUE.sub(lambda m: f"{m.group(1)}=<redacted>", text)


class _SendGuard:
    """Turns a pj.Error from a send into SendBlocked when the hook refused it."""

    def __init__(self, endpoint: SipEndpoint) -> None:
        self.hook = endpoint.hook
        self.before = endpoint.hook.error_total

    def fail(self, what: str, exc: Exception) -> SendError:
        info = exc.info() if hasattr(exc, "info") else str(exc)
        status = getattr(exc, "status", None)
        new = self.hook.error_total - self.before
        recent = list(self.hook.errors)[-new:] if new > 0 else []
        blocked = [e for e in recent if e.direction == "tx" and e.blocked]
        if blocked:
            return SendBlocked(f"{what} not sent: the hook refused it ({blocked[-1].detail})",
                               blocked[-1], status)
        return SendError(f"{what} failed: {info}", status)


class PhoneAccount(pj.Account):
    """A pjsua2 Account that records its callbacks as events."""

    def __init__(self, endpoint: SipEndpoint, uri: str, auto_answer: int | None) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.uri = uri
        self.auto_answer = auto_answer
        self.calls: list[Any] = []
        self.pending_messages = 0
        self.registrar: str | None = None
        self.is_registered = False
        self._buddies: dict[str, Any] = {}
        endpoint._wrappers.add(self)

    # pjsua2 callbacks (run inside pump)
    def onRegState(self, prm: Any) -> None:
        self.is_registered = prm.code // 100 == 2 and prm.expiration > 0
        self.endpoint.events.add("reg", self.uri, code=prm.code, reason=prm.reason,
                                 expiration=prm.expiration,
                                 whole_msg=_bytes(prm.rdata.wholeMsg) if prm.rdata else b"")

    def onInstantMessage(self, prm: Any) -> None:
        whole = _bytes(prm.rdata.wholeMsg)
        self.endpoint.events.add("message", self.uri, from_uri=prm.fromUri, to_uri=prm.toUri,
                                 content_type=prm.contentType, body=_bytes(prm.msgBody),
                                 whole_msg=whole)

    def onInstantMessageStatus(self, prm: Any) -> None:
        self.pending_messages = max(0, self.pending_messages - 1)
        self.endpoint.events.add("message_status", self.uri, code=prm.code,
                                 reason=prm.reason, to_uri=prm.toUri, body=_bytes(prm.msgBody),
                                 whole_msg=_bytes(prm.rdata.wholeMsg))

    def onSendRequest(self, prm: Any) -> None:
        tsx = prm.e.body.tsxState
        whole = b""
        if tsx.type == pj.PJSIP_EVENT_RX_MSG:
            whole = _bytes(tsx.src.rdata.wholeMsg)
        self.endpoint.events.add("send_request", self.uri, code=tsx.tsx.statusCode,
                                 reason=tsx.tsx.statusText, whole_msg=whole)

    def onIncomingCall(self, prm: Any) -> None:
        call = PhoneCall(self, prm.callId)
        self.calls.append(call)
        ci = call.getInfo()
        call._note_info(ci)
        self.endpoint.events.add("incoming_call", self.uri, call_id=ci.callIdString,
                                 call=call.serial, remote_uri=ci.remoteUri,
                                 whole_msg=_bytes(prm.rdata.wholeMsg))
        if self.auto_answer is None:
            return
        waits = self.endpoint.answer_waits(_bytes(prm.rdata.wholeMsg)) \
            if 200 <= self.auto_answer < 300 else []
        if waits and len(self.endpoint.ringing) < _MAX_RINGING:
            # ring while the certificates its answer needs are fetched (the 180 takes
            # the INVITE's policies): answered by ``answer_ringing`` (review 162 HB1)
            if self.answer_call(call, ci.callIdString, 180):
                self.endpoint.ringing.append((call, ci.callIdString, waits,
                                              time.monotonic() + _RING_FOR_CERTIFICATES))
            return
        self.answer_call(call, ci.callIdString, self.auto_answer)

    def answer_call(self, call: PhoneCall, call_id: str, status: int) -> bool:
        """Answer ``call`` with ``status``; one the hook refuses is answered with
        ``answer_failure``'s final error instead (False)."""
        guard = _SendGuard(self.endpoint)
        op = pj.CallOpParam()
        op.statusCode = status
        try:
            call.answer(op)
        except Exception as exc:  # noqa: BLE001 - pj.Error; nothing may escape into pjsip
            self._refuse_unanswered(call, call_id, guard.fail("answer", exc))
            return False
        return True

    def _refuse_unanswered(self, call: PhoneCall, call_id: str, failure: SendError) -> None:
        """The automatic answer could not be sent (the hook refused it, e.g. it could
        not be protected): answer with ``answer_failure``'s final error instead, so the
        caller knows at once and the call slot is freed."""
        blocked = getattr(failure, "hook_failure", None)
        code, reason = self.answer_failure(blocked.exception if blocked else None)
        self.endpoint.events.add("answer_failed", self.uri, call_id=call_id, code=code,
                                 reason=reason, error=str(failure)[:200])
        op = pj.CallOpParam()
        op.statusCode = code
        op.reason = reason
        try:
            call.answer(op)
        except Exception:  # noqa: BLE001 - then hang up as pjsua sees fit
            try:
                call.hangup(pj.CallOpParam())
            except Exception:  # noqa: BLE001
                pass

    @staticmethod
    def answer_failure(exc: BaseException | None) -> tuple[int, str]:
        """The final answer for an incoming call whose automatic answer was refused
        (``exc`` is what the hook's callback raised); the phone sets its own."""
        code = getattr(exc, "code", None)
        if isinstance(code, int) and 400 <= code <= 699:
            return code, "Not Acceptable Here" if code == 488 else "Refused"
        return 500, "Server Internal Error"

    def release_ended(self, keep: int = 8) -> list[Any]:
        """Let go of disconnected calls beyond the newest ``keep``; returns them.

        pjsua2's ``~Call`` clears the user data of its call *slot* and hangs up what
        runs in it, and slots are reused: a wrapper is only dropped while no other
        live call holds its slot and pjsua reports the slot idle.  The caller must
        drop its own references too (the wrapper goes when the last one does).
        """
        ended = [c for c in self.calls if c.disconnected]
        if len(ended) <= keep:
            return []
        busy = {c.getId() for c in self.calls if not c.disconnected}
        released = []
        for call in ended[:len(ended) - keep]:
            try:
                slot = call.getId()
                if slot in busy or call.isActive():
                    continue
            except Exception:  # noqa: BLE001 - cannot tell: keep it
                continue
            released.append(call)
        if released:
            gone = {id(c) for c in released}
            self.calls = [c for c in self.calls if id(c) not in gone]
        return released

    # application API
    def send_message(self, to_uri: str, text: str, *, content_type: str = "text/plain",
                     headers: Iterable[tuple[str, str]] = ()) -> int:
        """Send a MESSAGE; returns an event mark to wait for its "message_status".

        Raises SendBlocked if the hook refused it (nothing was sent), or
        SendError if pjsua could not send it.
        """
        self.endpoint._check()
        bud = self._buddies.get(to_uri)
        if bud is None:
            bc = pj.BuddyConfig()
            bc.uri = to_uri
            bc.subscribe = False
            bud = pj.Buddy()
            self.endpoint._wrappers.add(bud)
            bud.create(self, bc)
            self._buddies[to_uri] = bud
        prm = pj.SendInstantMessageParam()
        prm.contentType = content_type
        prm.content = text
        for name, value in headers:
            h = pj.SipHeader()
            h.hName, h.hValue = name, value
            prm.txOption.headers.append(h)
        mark = self.endpoint.events.mark()
        guard = _SendGuard(self.endpoint)
        self.pending_messages += 1
        try:
            bud.sendInstantMessage(prm)
        except Exception as exc:  # pj.Error
            raise guard.fail("MESSAGE", exc) from None
        return mark

    def make_call(self, to_uri: str, *, headers: Iterable[tuple[str, str]] = ()) -> Any:
        """Start a call; returns the PhoneCall.  SendBlocked if the hook refused the INVITE."""
        self.endpoint._check()
        call = PhoneCall(self)
        op = pj.CallOpParam(True)
        for name, value in headers:
            h = pj.SipHeader()
            h.hName, h.hValue = name, value
            op.txOption.headers.append(h)
        guard = _SendGuard(self.endpoint)
        self.calls.append(call)
        try:
            call.makeCall(to_uri, op)
        except Exception as exc:
            # pjsua already ended the call; the wrapper must still go before libDestroy.
            self.calls.remove(call)
            call = None
            raise guard.fail("INVITE", exc) from None
        return call

    def live_calls(self) -> list[Any]:
        return [c for c in self.calls if not c.disconnected]

    def _release_calls_and_buddies(self) -> None:
        self.calls.clear()
        self._buddies.clear()


class PhoneCall(pj.Call):
    """A pjsua2 Call whose state is copied out in the callbacks.

    ``getInfo()`` raises after DISCONNECTED, so what a caller may need later
    (state, status, media) lives on the object.
    """

    def __init__(self, account: Any, call_id: int | None = None) -> None:
        if call_id is None:
            super().__init__(account)
        else:
            super().__init__(account, call_id)
        self.account = account
        self.endpoint: SipEndpoint = account.endpoint
        self.endpoint._wrappers.add(self)
        self.state = pj.PJSIP_INV_STATE_NULL
        self.state_text = "NULL"
        self.last_status = 0
        self.last_reason = ""
        self.sip_call_id = ""
        self.serial = next(_CALL_SERIALS)
        self.media: list[tuple[int, int]] = []   # (media type, status) per stream
        self.disconnected = False

    def _note_info(self, ci: Any) -> None:
        self.state, self.state_text = ci.state, ci.stateText
        self.last_status, self.last_reason = ci.lastStatusCode, ci.lastReason
        self.sip_call_id = ci.callIdString

    def onCallState(self, prm: Any) -> None:
        ci = self.getInfo()
        self._note_info(ci)
        whole = b""
        try:
            if prm.e.type == pj.PJSIP_EVENT_TSX_STATE and \
                    prm.e.body.tsxState.type == pj.PJSIP_EVENT_RX_MSG:
                whole = _bytes(prm.e.body.tsxState.src.rdata.wholeMsg)
        except Exception:
            whole = b""
        if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.disconnected = True
        self.endpoint.events.add("call_state", self.account.uri, call_id=ci.callIdString,
                                 call=self.serial, state=ci.state,
                                 state_text=ci.stateText, code=ci.lastStatusCode,
                                 reason=ci.lastReason, whole_msg=whole)

    def onCallMediaState(self, prm: Any) -> None:
        ci = self.getInfo()     # read into a variable: ci.media of a temporary is freed
        self.media = [(m.type, m.status) for m in ci.media]
        self.endpoint.events.add("media", self.account.uri, call_id=ci.callIdString,
                                 call=self.serial, statuses=tuple(self.media))

    # application API
    @property
    def media_active(self) -> bool:
        return any(t == pj.PJMEDIA_TYPE_AUDIO and s == pj.PJSUA_CALL_MEDIA_ACTIVE
                   for t, s in self.media)

    @property
    def confirmed(self) -> bool:
        return self.state == pj.PJSIP_INV_STATE_CONFIRMED

    def hold(self) -> None:
        """Put the call on hold (a re-INVITE with a=sendonly)."""
        self.endpoint._check()
        guard = _SendGuard(self.endpoint)
        try:
            self.setHold(pj.CallOpParam(True))
        except Exception as exc:
            raise guard.fail("hold re-INVITE", exc) from None

    def unhold(self) -> None:
        """Take the call off hold (a re-INVITE with the UNHOLD flag)."""
        self.endpoint._check()
        op = pj.CallOpParam(True)
        op.opt.flag |= pj.PJSUA_CALL_UNHOLD
        guard = _SendGuard(self.endpoint)
        try:
            self.reinvite(op)
        except Exception as exc:
            raise guard.fail("unhold re-INVITE", exc) from None

    def respond(self, code: int = 200, reason: str = "") -> None:
        """Answer an incoming call (180, 200, or a 4xx-6xx to refuse it)."""
        self.endpoint._check()
        op = pj.CallOpParam()
        op.statusCode = code
        if reason:
            op.reason = reason
        self.answer(op)

    def end(self, code: int = 0) -> None:
        """Hang up (BYE, CANCEL or a final answer, as the state needs)."""
        self.endpoint._check()
        if self.disconnected:
            return
        op = pj.CallOpParam()
        op.statusCode = code
        self.hangup(op)


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
        return gate_result(list(env.checks) + [_random_source_check()] + list(result.checks),
                           result.counts)
    temp = SipEndpoint(self_test_timeout=timeout)
    try:
        temp.start()   # runs check_environment and self_test itself
        assert temp.gate_result is not None
        return temp.gate_result
    finally:
        temp.close()
