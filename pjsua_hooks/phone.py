"""The E2M softphone: a :class:`SipEndpoint` whose raw hook runs the UA engine.

pjsua keeps working on plaintext; :class:`E2MPhone` installs the hook so that

- every outgoing message goes through ``UAEngine.protect`` (fail closed: if it
  raises, the message is not sent and the application gets ``SendBlocked``);
- every incoming message goes through ``UAEngine.open``; a refused request is
  answered with the engine's own refusal (488 for plaintext where E2M is
  required, 493 with our certificate, 403 ...), a refused response is dropped
  and recorded;
- policies announced in ``Proxy-Body-Policy`` (REGISTER 200, forwarded
  requests, 496s) are learnt by the engine; the proxy certificates they point
  at are fetched on worker threads (``fetcher.CertificateFetcher``: a total
  deadline, a size limit, URL checks, a few at once, one per host), never on
  the SIP loop, and handed to the engine on the loop;
- after a 496/495/493 to a request we sent the engine's ``react`` decides,
  outside the callback, whether to retry: a MESSAGE is sent again, an INVITE
  becomes a new call (once the certificates it needs are fetched); such an
  answer to nothing we sent is dropped;
- an initial INVITE whose answer could not be protected (E2M required, no
  certificate of the caller, no key to reuse) is refused at once with the
  error table's answer and a ``call_refused`` event, before pjsua gives it a
  call slot;
- a phone with an outbound proxy or a registrar takes requests only from its home
  (those and ``home_sources``): anything else never crossed the home's policy (what it
  archives) and is answered 403 before anything is noted (``_through_home``, reviews
  102, 104); with an outbound proxy, a response from elsewhere is dropped
  (``_answer_from_home``, review 104);
- a 2xx relayed after our INVITE failed (a late fork's answer, RFC 3261 16.7), once the
  engine accepted it, is ACKed and then BYEd by the phone itself and never reaches
  pjsip, whose completed INVITE transaction would re-send the failure's ACK instead
  (``late_2xx.py``, review 129 HB1); the home's 407 to that BYE is answered once with
  the account's credentials (stop 44, ``_late_challenge``).

Nothing a stranger sends ends the loop: every handler runs behind a boundary
that turns an exception into an ``error`` event (class name, no body), and
everything kept per message, event, peer or call is bounded in count and age
(``stats()`` shows the counts; ``docs/threat-model.md``).

Each message and call carries its :class:`e2m_plugins.ua.SecurityInfo`
(encrypted for whom, which proxies could read, signed by whom, key reuse,
split SDP).  Nothing here logs a body, a CEK or a key.

Configuration: the UA.toml of ``e2m_plugins.config.load_ua_config`` plus a
``[phone]`` section (see :class:`PhoneSettings`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from e2m_plugins import sip
from e2m_plugins.body import as_read
from e2m_plugins.uri import aor_of, canonical_ip, identity_of
from e2m_plugins.errors import E2MError
from e2m_plugins.grammar import split_header_list
from e2m_plugins.config import ConfigError, UAConfig, load_ua_config
from e2m_plugins.challenge import Credentials
from e2m_plugins.sip_errors import answer_for
from e2m_plugins.ua import MissingPeerCertificateError, SecurityInfo, UAEngine

from .credentials import PASSWORD_ENV, PasswordError, check_credentials, check_tls_uris, \
    read_password
from .certservice_client import CertServiceClient
from .challenges import RefusedChallenge, keep_answerable
from .fetcher import CertificateFetcher
from .firstcopy import Duplicate, FirstCopy
from .late_2xx import MAX_LATE, LateAnswers, LateTwoXX, Outgoing
from . import pjsip_abi
from .proxysource import ProxySource
from .rawhook import RawSipHook, RxReject

__all__ = ["PhoneSettings", "load_phone_config", "E2MPhone", "OutgoingMessage", "E2MCall",
           "security_dict", "PhoneError"]

KEY_WITNESS_ENV = "E2M_PHONE_KEY_WITNESS"
_PJSIP_RX_LIMIT = 4000       # PJSIP_MAX_PKT_LEN of the pinned wheel
_MEMO = 512                   # plaintext requests / security records kept per phone
_RECORDS_PER_CALL = 32        # security records kept per Call-ID
# How long a received request's transaction key and security record stay: past pjsip's
# own server transactions (64*T1 = 32 s for a MESSAGE, an INVITE's Timer H), so a second,
# different request in a transaction pjsip still holds is always caught (stop 34)
_RX_MAX_AGE = 64.0
# Bounds on what the phone keeps (count; age where it matters).  Sized so a flood
# of 3 KB messages stays within a few MB (docs/threat-model.md).
MAX_EVENTS = 1000             # phone.events, the last ones
MAX_ERRORS = 256              # phone.errors, the last ones
EVENT_MAX_AGE = 600.0         # seconds an event stays in phone.events
MAX_REACTIONS = 64            # 496/495/493 answers waiting for their message or call
REACTION_MAX_AGE = 64.0       # seconds (Timer B): an answer nobody claimed goes
MAX_DONE = 256                # finished messages and calls kept for the application
_EVENT_LIMIT = 256            # the endpoint's callback log (whole messages in it): read
                              # after every pump, so it needs no history; one pump makes
                              # a few dozen callbacks at most (missed ones are counted)
_FETCH_PARALLEL = 4           # certificate fetches at once (one per host)
_FETCH_COOL_DOWN = 30.0       # seconds before a host that failed is fetched again
_RING_HOSTS = 2               # proxies one call's answer waits for (a caller's first ones)


class PhoneError(RuntimeError):
    """Something the phone could not do (start, register, fetch)."""


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class PhoneSettings:
    """The ``[phone]`` section of UA.toml.

    ``registrar``: SIP URI to REGISTER to (none: no registration).
    ``proxy``: outbound proxy URI every request goes through (loose routing;
    ``;lr`` is added).  ``register_via_proxy`` false sends REGISTER straight to
    the registrar (a visited proxy that registers locally would otherwise keep
    it).  ``transport`` udp|tcp, ``host``/``port`` the local listener (0: a
    free port).  ``srtp``: offer and require SRTP (SDES).  ``auto_answer``:
    answer incoming calls with 200.  ``fetch_certificates``: fetch proxy
    certificates from a policy's cert-url (``fetch_timeout`` s in all,
    ``fetch_max_bytes``; only from the policy's own host or one of
    ``cert_url_hosts``; see ``fetcher.check_url``).  ``max_retries``: E2M
    retries per message or call.  ``codecs``
    (empty: pjsua's whole list) and ``srtp_suites`` keep the SDP small: pjsip
    reads at most 4000 bytes per incoming message (PJSIP_MAX_PKT_LEN), and a
    split SDP with two envelopes plus the proxies' headers comes close to it.

    TCP (``transport = "tcp"``): ``tcp_accept`` whether strangers may connect to
    the listener at all (default: only when no ``registrar`` is set; a registered
    phone gets its requests over the connection it opened itself);
    ``tcp_max_connections`` accepted connections kept at once (1-40, default 32;
    pjlib's ioqueue of the pinned wheel has 64 slots, see pjsua_hooks/README.md,
    "TCP"); ``tcp_idle_timeout`` seconds an accepted connection may stay silent
    (one that never sent a whole message: at most 10 s).

    ``udp_tcp_listener`` (default on): a UDP phone also listens on TCP at its UDP
    address and port (RFC 3261 18.2.1), where its proxy sends a request above 1300
    octets (18.1.1: a certificate NOTIFY carrying a large certificate, review 132 HB2).
    The ``tcp_*`` settings and the TCP guard apply to it; ``tcp_accept`` defaults to
    true on a UDP phone (its proxy connects to it); requests on it are held to the home
    by address (``proxysource.py``).  Off: UDP only, as before stop 43.

    ``home_sources``: SIP URIs of the other places the home's requests come from, when
    a ``proxy`` or a ``registrar`` is set (such a phone takes requests only from its
    home: reviews 102, 104): the nodes of a cluster behind a dispatcher front, which
    relay to the phone from their own addresses (``sip:10.0.0.11:5060``, one per node).

    ``certificate_service``: publish our certificate at the home proxy's RFC 6072
    certificate service once registered (with digest credentials) and fetch a peer's
    there before the first protected message to it (``certservice_client.py``);
    ``cert_publish_expires`` / ``cert_subscribe_expires`` the seconds asked for.

    Digest (``credentials.py``): ``password_file`` (relative to UA.toml, mode 0600;
    never ``password`` itself) or the environment variable ``E2M_PHONE_PASSWORD``;
    ``auth_user`` the digest user (default: the AoR's user); ``auth_realm`` the only
    realm whose challenges are answered (default: the AoR's domain; ``challenges.py``
    says which challenges those are).  ``transport = "tls"``
    verifies the proxy's certificate against ``[trust] ca`` (TLS 1.2); the registrar
    and proxy URIs must then be ``sips:`` or carry ``;transport=tls``.
    """

    registrar: str | None = None
    proxy: str | None = None
    register_via_proxy: bool = True
    transport: str = "udp"
    host: str = "127.0.0.1"
    port: int = 0
    srtp: bool = False
    auto_answer: bool = True
    fetch_certificates: bool = True
    fetch_timeout: float = 2.0
    fetch_max_bytes: int = 65536
    cert_url_hosts: tuple[str, ...] = ()
    home_sources: tuple[str, ...] = ()   # cluster nodes behind a front (see above)
    max_retries: int = 2
    log_level: int = 0
    # one codec by default: each more is an m= format and an a=rtpmap line in an
    # INVITE that must stay under pjsip's 4000 bytes (docs/protocol.md §6.2)
    codecs: tuple[str, ...] = ("PCMU/8000",)
    srtp_suites: tuple[str, ...] = ("AES_CM_128_HMAC_SHA1_80",)
    tcp_accept: bool | None = None
    tcp_max_connections: int = 32
    tcp_idle_timeout: float = 120.0
    udp_tcp_listener: bool = True        # a UDP phone listens on TCP at its port (18.2.1)
    password_file: str | None = None     # resolved against the UA.toml's directory
    auth_user: str | None = None         # digest user name (default: the AoR's user)
    auth_realm: str | None = None        # the only realm answered (default: the AoR's domain)
    certificate_service: bool = True     # RFC 6072: publish ours, fetch peers' (issue 15)
    cert_publish_expires: int = 3600     # seconds asked for our publication
    cert_subscribe_expires: int = 3600   # seconds asked for a peer's subscription

    @property
    def accepts_tcp(self) -> bool:
        """Whether a TCP listener takes connections from anyone (see the class doc): a
        UDP phone's listener exists for its proxy to connect to (RFC 3261 18.2.1)."""
        if self.tcp_accept is not None:
            return self.tcp_accept
        return self.registrar is None or self.transport == "udp"

    @property
    def tcp_beside_udp(self) -> bool:
        """Whether the phone opens a TCP listener at its UDP transport's port."""
        return self.transport == "udp" and self.udp_tcp_listener


_PHONE_KEYS = {f for f in PhoneSettings.__dataclass_fields__}


def _phone_settings(raw: dict[str, Any], path: Path) -> PhoneSettings:
    table = raw.get("phone", {})
    problems: list[str] = []
    if not isinstance(table, dict):
        raise ConfigError(path, ["[phone] must be a table"])
    values: dict[str, Any] = {}
    types: dict[str, tuple[type, ...]] = {
        "registrar": (str,), "proxy": (str,), "register_via_proxy": (bool,),
        "transport": (str,), "host": (str,), "port": (int,), "srtp": (bool,),
        "auto_answer": (bool,), "fetch_certificates": (bool,), "fetch_timeout": (int, float),
        "fetch_max_bytes": (int,), "cert_url_hosts": (list,), "home_sources": (list,),
        "max_retries": (int,),
        "log_level": (int,), "codecs": (list,), "srtp_suites": (list,),
        "tcp_accept": (bool,), "tcp_max_connections": (int,), "tcp_idle_timeout": (int, float),
        "udp_tcp_listener": (bool,),
        "password_file": (str,), "auth_user": (str,), "auth_realm": (str,),
        "certificate_service": (bool,),
        "cert_publish_expires": (int,), "cert_subscribe_expires": (int,)}
    for key, value in table.items():
        if key == "password":
            # a UA.toml gets shared and copied; the secret lives elsewhere (see credentials.py)
            problems.append("[phone].password is not allowed: put the digest password in a "
                            "file named by [phone].password_file (mode 0600) or in the "
                            f"environment variable {PASSWORD_ENV}")
            continue
        if key not in _PHONE_KEYS:
            problems.append(f"[phone]: unknown key {key!r}")
            continue
        if not isinstance(value, types[key]) or (isinstance(value, bool) and bool not in types[key]):
            problems.append(f"[phone].{key} has the wrong type")
            continue
        values[key] = value
    for key in ("registrar", "proxy"):
        uri = values.get(key)
        if uri is not None and not uri.lower().startswith(("sip:", "sips:")):
            problems.append(f"[phone].{key} must be a SIP URI, not {uri!r}")
    if values.get("transport", "udp") not in ("udp", "tcp", "tls"):
        problems.append("[phone].transport must be \"udp\", \"tcp\" or \"tls\"")
    problems += check_credentials(values, path) + check_tls_uris(values)
    if not 0 <= values.get("port", 0) <= 65535 or values.get("port") == 5060:
        problems.append("[phone].port must be 0 (a free port) or a port other than 5060")
    if not 0 < values.get("fetch_timeout", 2.0) <= 30:
        problems.append("[phone].fetch_timeout must be between 0 and 30 seconds")
    if not 0 < values.get("fetch_max_bytes", 65536) <= 1 << 20:
        problems.append("[phone].fetch_max_bytes must be between 1 and 1 MiB")
    if not 0 <= values.get("max_retries", 2) <= 3:
        problems.append("[phone].max_retries must be between 0 and 3")
    if not 1 <= values.get("tcp_max_connections", 32) <= 40:
        problems.append("[phone].tcp_max_connections must be between 1 and 40")
    if not 0 < values.get("tcp_idle_timeout", 120.0) <= 3600:
        problems.append("[phone].tcp_idle_timeout must be between 0 and 3600 seconds")
    for key in ("cert_publish_expires", "cert_subscribe_expires"):
        if not 10 <= values.get(key, 3600) <= 86400:
            problems.append(f"[phone].{key} must be between 10 and 86400 seconds")
    for key in ("codecs", "srtp_suites"):
        if key in values:
            if not all(isinstance(v, str) and v for v in values[key]):
                problems.append(f"[phone].{key} must list names")
            else:
                values[key] = tuple(values[key])
    sources = values.get("home_sources", [])
    if not all(isinstance(u, str) and u.lower().startswith(("sip:", "sips:")) for u in sources):
        problems.append("[phone].home_sources must list SIP URIs")
    else:
        values["home_sources"] = tuple(sources)
    hosts = values.get("cert_url_hosts", [])
    if not all(isinstance(h, str) and h for h in hosts):
        problems.append("[phone].cert_url_hosts must list host names")
    else:
        values["cert_url_hosts"] = tuple(h.lower() for h in hosts)
    if problems:
        raise ConfigError(path, problems)
    return PhoneSettings(**values)


def load_phone_config(path: str | Path) -> tuple[UAConfig, PhoneSettings]:
    """UA.toml (the engine's sections, checked by the core) and its ``[phone]`` section."""
    config = load_ua_config(path)
    return config, _phone_settings(dict(config.raw), Path(path))


# --------------------------------------------------------------------------- records

def security_dict(info: SecurityInfo | None, incoming: bool = False) -> dict[str, Any] | None:
    """A SecurityInfo as plain data (for JSON), with its one-line description
    (which says "encrypted by <sender> for us" for what we received)."""
    if info is None:
        return None
    out = asdict(info)
    out["readable_by"] = list(info.readable_by)
    out["signers"] = list(info.signers)
    out["summary"] = info.describe()
    out["direction"] = "rx" if incoming else "tx"
    return out


@dataclass
class OutgoingMessage:
    """One MESSAGE the application asked to send, across its E2M retries."""

    to: str
    text: str = field(repr=False)
    content_type: str = "text/plain"
    attempts: int = 0
    call_ids: list[str] = field(default_factory=list)
    done: bool = False
    ok: bool = False
    status: int | None = None
    reason: str = ""
    security: SecurityInfo | None = None
    retried_after: list[str] = field(default_factory=list)   # e.g. "496: learned proxy..."


@dataclass
class E2MCall:
    """One call (outgoing across its retries, or incoming) and its security."""

    remote: str
    outgoing: bool
    current: Any = None                      # the PhoneCall of the live attempt
    attempts: int = 0
    call_ids: list[str] = field(default_factory=list)
    done: bool = False
    failed: bool = False
    reason: str = ""
    status: int | None = None
    retried_after: list[str] = field(default_factory=list)
    security: list[dict[str, Any]] = field(default_factory=list)  # per SDP: dir, what, info
    was_media_active: bool = False
    update: str | None = None                # the last re-INVITE asked for: "hold" or "unhold"
    update_attempts: int = 0
    # an incoming call's INVITE as pjsua took it: (CSeq, digest of its octets, the
    # caller's tag), so the call never shows another INVITE's offer (reviews 83, 93)
    initial: tuple[int, bytes, str] | None = None

    @property
    def sip_call_id(self) -> str | None:
        return self.call_ids[-1] if self.call_ids else None

    @property
    def media_active(self) -> bool:
        return bool(self.current is not None and self.current.media_active)

    @property
    def confirmed(self) -> bool:
        return bool(self.current is not None and self.current.confirmed)


def _key(msg: sip.SipMessage) -> tuple[str, int, str]:
    number, method = msg.cseq
    return (msg.call_id, number, method)


def _tx_key(msg: sip.SipMessage) -> tuple[str, int, str, str]:
    """A request we sent and the answers to it: its transaction (Call-ID, CSeq, top Via
    branch).  Without the branch, a stray 493 naming the call and CSeq was taken for
    the answer to our request (review 92)."""
    try:
        branch = msg.via_branch()
    except E2MError:
        branch = ""
    return (*_key(msg), branch)


def _rx_key(msg: sip.SipMessage) -> tuple[object, ...]:
    """A received request's transaction as pjsip keys it (``create_tsx_key_3261`` and
    ``_2543``, looked up with every letter's case folded): the method, but none for
    INVITE and ACK (an ACK rides its INVITE's), then an RFC 3261 branch; else (an RFC
    2543 peer) the CSeq number, From tag, Call-ID and the top Via's host and port as a
    number.  Keyed otherwise, a copy pjsip takes for alice's request was another
    transaction here: pjsip took the copy and absorbed her request (reviews 93, 95,
    97).  The branch is readable: ``_on_rx`` refuses a request whose top Via has none,
    several, or one that is not a token."""
    method = "" if msg.method.upper() in ("INVITE", "ACK") else msg.method.lower()
    branch = msg.transaction_branch()
    if branch is not None:
        return ("3261", method, branch)
    via = split_header_list(msg.get_all("Via")[0])[0]
    _, host, port = sip.via_sent_by(via)    # review 100: "Via: ;branch=x" was a 500
    return ("2543", method, msg.cseq[0], (msg.from_tag or "").lower(), msg.call_id.lower(),
            host.lower(), port or 0)


def handed_digest(octets: bytes) -> bytes:
    """The digest a received message's security record is kept under: that of the very
    octets the hook handed pjsip, which pjsua gives back as an event's ``whole_msg``, so
    a record can only describe what pjsip delivered (review 83)."""
    return hashlib.sha256(octets).digest()


def _bounded_put_aged(store: OrderedDict, key: Any, value: Any, now: float) -> None:
    """``_bounded_put`` of ``(now, value)``, the entries older than ``_RX_MAX_AGE`` out
    first (oldest first: insertion order is age order)."""
    while store:
        oldest = next(iter(store.values()))
        if now - oldest[0] <= _RX_MAX_AGE:
            break
        store.popitem(last=False)
    _bounded_put(store, key, (now, value))


_UNNOTED = object()      # a branch _note_sent did not note: its answer is held to the home


def _same_place(source: tuple[str, int] | None, went: tuple[str, int], udp: bool) -> bool:
    """Whether a response's ``source`` is where its request ``went`` (the address, and
    over UDP the port: a TCP peer may answer on a connection of its own)."""
    if source is None:
        return False
    ip, to = canonical_ip(source[0]), canonical_ip(went[0])
    return ip is not None and ip == to and (not udp or source[1] == went[1])


def _bounded_put(store: OrderedDict, key: Any, value: Any) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > _MEMO:
        store.popitem(last=False)


# --------------------------------------------------------------------------- the phone

class E2MPhone:
    """A softphone: one UA engine, one pjsua2 endpoint with the raw hook, one account.

    Use from one thread: ``start()``, then ``poll()`` (or the waiting helpers)
    in a loop; ``close()`` at the end.  ``on_event(dict)`` gets what happened
    (``kind`` plus data; message text only in ``message_in``'s ``text``).
    """

    def __init__(self, config: UAConfig, settings: PhoneSettings | None = None, *,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.settings = settings or PhoneSettings()
        self.engine = UAEngine(config)
        self.on_event = on_event
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        identity = identity_of(config.aor)
        if identity is None or not identity.user:
            raise PhoneError(f"{config.aor} is not a user SIP URI")
        self.user, self.domain = identity.user, identity.host
        self.hook = RawSipHook(on_tx=self._on_tx, on_rx=self._on_rx)
        self.endpoint: Any = None
        self._auth_realm: str | None = None     # set at start() when we have a password
        self.account: Any = None
        self.transport: Any = None
        self.tcp_listener: Any = None     # a UDP phone's TCP listener at its port
        self.messages: list[OutgoingMessage] = []
        self.calls: list[E2MCall] = []
        self.errors: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS)
        self.counts = {"events": 0, "errors": 0, "stray_e2m_answers": 0, "calls_refused": 0,
                       "challenges_refused": 0,
                       "handler_failures": 0, "output_failures": 0, "fetches": 0,
                       "requests_not_via_proxy": 0, "responses_not_via_proxy": 0,
                       "endpoint_events_missed": 0}
        # state shared between the hook callbacks and the main loop (same thread)
        self._plain: OrderedDict[tuple[str, int, str, str], sip.SipMessage] = OrderedDict()
        self._tx_info: OrderedDict[tuple[str, int, str, str], SecurityInfo] = OrderedDict()
        # security of what pjsua was handed: (digest of the octets, what) -> (when, info);
        # and the digest of the one content each received request's transaction
        # (``_rx_key``) was handed on with: (when, digest) (review 83)
        self._rx_info: OrderedDict[tuple[bytes, str], tuple[float, SecurityInfo]] = OrderedDict()
        self._rx_tsx: OrderedDict[tuple[object, ...], tuple[float, bytes]] = \
            OrderedDict()
        # E2M answers to our requests: (Call-ID, CSeq) -> (answer, plaintext, when)
        self._reactions: OrderedDict[tuple[str, int, str, str],
                                     tuple[sip.SipMessage, sip.SipMessage | None, float]] = \
            OrderedDict()
        # E2M answers to a re-INVITE of a confirmed call, handled after the pump
        self._update_reactions: deque[tuple[sip.SipMessage, sip.SipMessage | None]] = \
            deque(maxlen=16)
        self._pending_errors: deque[dict[str, Any]] = deque(maxlen=256)
        self._call_security: dict[str, list[dict[str, Any]]] = {}
        self._by_call_id: dict[str, OutgoingMessage | E2MCall] = {}
        self._sending: OutgoingMessage | E2MCall | None = None
        self._mark = 0
        self._last_fetch_check = 0.0
        self._last_sweep = 0.0
        # retries waiting for certificate fetches: (handle or call, what, deadline)
        self._deferred: list[tuple[OutgoingMessage | E2MCall, str, float]] = []
        # sends waiting for a peer's certificate from its service: (handle, what, AoR, until)
        self._cert_waits: deque[tuple[OutgoingMessage | E2MCall, str, str, float]] = \
            deque(maxlen=64)
        self.certservice: CertServiceClient | None = None
        # where requests (and answers) may come from once we have a home (set at
        # start(): the proxy, the registrar, home_sources; None: peer to peer, from
        # anyone; reviews 102, 104-106)
        self._home_source: ProxySource | None = None
        self._answers_from_home = False
        # our branch -> where pjsip sent it, when that was a home address (None: not)
        self._sent_home: OrderedDict[str, tuple[str, int] | None] = OrderedDict()
        self._cert_tick = 0.0
        self._blocked_statuses: OrderedDict[int, int] = OrderedDict()   # id(handle) -> n
        self._cert_published = False
        s = self.settings
        self.fetcher = CertificateFetcher(
            timeout=s.fetch_timeout, max_bytes=s.fetch_max_bytes, max_parallel=_FETCH_PARALLEL,
            cool_down=_FETCH_COOL_DOWN,
            allowed_hosts=(*s.cert_url_hosts, *getattr(config, "cert_url_hosts", ())),
            own_ports=self._own_ports)
        self._witness = os.environ.get(KEY_WITNESS_ENV) or None
        # new MESSAGEs / initial INVITEs taken, for the replay window and T1*64
        self.first_copies = FirstCopy(max_age=config.replay_window + 32.0,
                                      reliable=s.transport != "udp")
        # late 2xx answered by the phone (review 129 HB1), and the ACKs/BYEs they owe,
        # sent from the loop, outside pjsip's receive callback
        self.late_answers = LateAnswers()
        self._late_out: deque[Outgoing] = deque(maxlen=64)
        # their BYEs' 401/407 (entry, answer, from the home), answered from the loop
        self._late_challenges: deque[tuple[LateTwoXX, sip.SipMessage, bool]] = \
            deque(maxlen=MAX_LATE)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> E2MPhone:
        config, settings = load_phone_config(path)
        return cls(config, settings, **kwargs)

    # -- events ----------------------------------------------------------------------
    def _emit(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {"kind": kind, "phone": self.config.aor, "time": round(time.time(), 3), **data}
        self.events.append(event)
        self.counts["events"] += 1
        if kind == "error":
            self.errors.append(event)
            self.counts["errors"] += 1
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - the application's output must not stop SIP
                self.counts["output_failures"] += 1
        return event

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> E2MPhone:
        from .endpoint import SipEndpoint

        s = self.settings
        auth = self._credentials()     # before pjsua starts: a bad password file stops here
        self._auth_realm = auth[2] if auth else None
        self.endpoint = SipEndpoint(hook=self.hook, require_e2m=self.config.require_e2m,
                                    host=s.host, log_level=s.log_level,
                                    # no User-Agent (pjsua sends none when empty): it
                                    # names our software to every hop (RFC 3261
                                    # §20.41) and costs 32 octets of each INVITE (§6.2)
                                    user_agent="", event_limit=_EVENT_LIMIT,
                                    tcp={"accept": s.accepts_tcp,
                                         "limit": s.tcp_max_connections,
                                         "idle_timeout": s.tcp_idle_timeout,
                                         "first_message_timeout": min(10.0, s.tcp_idle_timeout)})
        self.endpoint.start()      # gate: wheel, platform, self-test; GateError if required
        if s.fetch_certificates:
            # a call whose answer needs a proxy certificate we are fetching rings first
            # (review 162 HB1: the 200 went at once, without that proxy's part)
            self.endpoint.answer_waits = self._answer_waits
        if s.codecs:
            ep = self.endpoint.pj_endpoint
            wanted = [c.lower() for c in s.codecs]
            for codec in ep.codecEnum2():
                name = codec.codecId.lower()
                keep = any(name.startswith(w) for w in wanted)
                ep.codecSetPriority(codec.codecId, 255 - wanted.index(next(
                    w for w in wanted if name.startswith(w))) if keep else 0)
        tls_ca = self.config.trust_anchors if s.transport == "tls" else None
        if s.tcp_beside_udp:
            # RFC 3261 18.2.1: the proxy sends a request above 1300 octets over TCP to
            # our UDP port (review 132 HB2); the account stays on UDP
            self.transport, self.tcp_listener = self.endpoint.add_udp_with_tcp(s.port)
        else:
            self.transport = self.endpoint.add_transport(s.transport, s.port, tls_ca=tls_ca)
        proxies = []
        if s.proxy:
            proxies.append(s.proxy if ";lr" in s.proxy else s.proxy + ";lr")
        registrar = s.registrar
        self.account = self.endpoint.add_account(
            self.user, self.transport, domain=self.domain, registrar=registrar,
            auto_answer=200 if s.auto_answer else None, srtp=s.srtp, proxies=proxies,
            register_via_proxies=s.register_via_proxy, srtp_suites=s.srtp_suites,
            auth=auth, publish=bool(s.certificate_service and registrar and auth and proxies))
        self.account.answer_failure = self._answer_failure
        if proxies or registrar:
            # a phone with a home takes every request from it (review 102; one with a
            # registrar and no outbound proxy too, review 104): the outbound proxy, the
            # registrar routing to our contact, a cluster's nodes behind a front
            # (home_sources); names are looked up here, once
            self._home_source = ProxySource.of_uris(
                (proxies[0] if proxies else None, registrar, *s.home_sources),
                tls=self.transport.kind == "tls", udp=self.transport.kind == "udp")
            # every request we send goes through the outbound proxy, so every answer
            # comes back from it (review 104: the callee's 200 sent straight to us set up
            # a call the home never saw); without one, answers come from where we sent
            self._answers_from_home = bool(proxies)
            guard = self.endpoint.tcp_guard if self.endpoint is not None else None
            if guard is not None and self._home_source is not None:
                # requests from anyone else are refused anyway: their connections are
                # not even completed, so a stranger's churn cannot shut the home out
                # (review 134 K4)
                try:
                    guard.admit_only(address for address, _ in self._home_source.addresses)
                except ValueError as exc:
                    raise PhoneError(f"home_sources: {exc}") from None
        if s.certificate_service and proxies:
            # the service is our home proxy's: without one, a SUBSCRIBE to a peer's
            # domain would need a name lookup on the loop
            self.certservice = self._certificate_service(proxies)
        self._emit("started", local=f"{self.transport.host}:{self.transport.port}",
                   transport=self.transport.kind, tcp_listener=self.tcp_listener is not None,
                   hook_active=self.endpoint.hook_active,
                   gate=self.endpoint.gate_result.reason if self.endpoint.gate_result else None)
        return self

    def _credentials(self) -> tuple[str, str, str] | None:
        """(user, password, realm) for digest challenges, read now and kept only by
        pjsua; only that realm's challenges are answered (``challenges.py``)."""
        try:
            password = read_password(self.settings.password_file)
        except PasswordError as exc:
            raise PhoneError(f"no digest password: {exc}") from None
        if password is None:
            return None
        return (self.settings.auth_user or self.user, password,
                self.settings.auth_realm or self.domain)

    def close(self) -> None:
        self.fetcher.close()
        if self.endpoint is not None:
            try:
                self.endpoint.close()
            finally:
                self.endpoint = None
                self.account = None
                self.tcp_listener = None
                for call in self.calls:
                    call.current = None

    def _own_ports(self) -> set[int]:
        """The SIP ports this phone listens on (a cert-url must not point at them)."""
        return {t.port for t in (self.endpoint.transports.values() if self.endpoint else ())}

    def stats(self) -> dict[str, Any]:
        """What the phone keeps, in numbers, and the bounds (the CLI's ``status``)."""
        guard = self.endpoint.tcp_guard if self.endpoint is not None else None
        account = self.account
        return {
            "events": len(self.events), "errors": len(self.errors),
            "reactions": len(self._reactions), "update_reactions": len(self._update_reactions),
            "messages": len(self.messages), "calls": len(self.calls),
            "live_calls": sum(1 for c in self.calls if not c.done),
            "call_ids": len(self._by_call_id), "call_security": len(self._call_security),
            "plain": len(self._plain), "pjsua_calls": len(account.calls) if account else 0,
            "endpoint_events": len(self.endpoint.events) if self.endpoint else 0,
            "hook_errors": len(self.hook.errors), "fetches_in_flight": self.fetcher.in_flight(),
            "policies": len(self.engine.policies), "deferred_retries": len(self._deferred),
            "first_copies": len(self.first_copies),
            "tcp": guard.stats() if guard is not None else None,
            "certservice": self.certservice.stats() if self.certservice else None,
            "cert_waits": len(self._cert_waits),
            "late_2xx": len(self.late_answers), "late_2xx_counts": dict(self.late_answers.counts),
            "counts": dict(self.counts),
            "limits": {"events": MAX_EVENTS, "errors": MAX_ERRORS, "reactions": MAX_REACTIONS,
                       "done": MAX_DONE, "memo": _MEMO, "endpoint_events": _EVENT_LIMIT,
                       "late_2xx": MAX_LATE}}

    def __enter__(self) -> E2MPhone:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the hook (runs inside pjsip; no pjsua2 calls, no I/O) -----------------------
    def _on_tx(self, data: bytes) -> bytes | None:
        msg = sip.parse(data)
        if self.certservice is not None:
            ours = self.certservice.on_tx(msg)     # our PUBLISH / SUBSCRIBE: no E2M body
            if ours is not None:
                return ours
        if msg.is_request:
            self._note_sent(msg)
            if msg.body:
                _bounded_put(self._plain, _tx_key(msg), msg)
            if self._sending is not None and msg.method in ("MESSAGE", "INVITE") \
                    and msg.call_id not in self._by_call_id:
                self._by_call_id[msg.call_id] = self._sending
                self._sending.call_ids.append(msg.call_id)
        if self._witness and msg.body:
            _witness_keys(self._witness, msg.body)
        protected = self.engine.protect(msg)        # raises: not sent (fail closed)
        out = None if protected.message is msg else protected.message.serialize()
        if msg.body:
            what = msg.method if msg.is_request else f"{msg.status} {msg.method}"
            _bounded_put(self._tx_info, (*_key(msg), what), protected.info)
            self._note_call_security("tx", msg, what, protected.info,
                                     size=len(out) if out is not None else None)
        if out is None:
            return None
        if len(out) > _PJSIP_RX_LIMIT - 500:   # proxies add Via, Record-Route, policy
            self._pending_errors.append({
                "kind": "warning", "direction": "tx", "message": msg.method if msg.is_request else
                f"{msg.status} {msg.method}", "call_id": msg.call_id, "error": "SizeWarning",
                "detail": f"protected message is {len(out)} bytes; a pjsip peer reads at most "
                          f"{_PJSIP_RX_LIMIT}"})
        return out

    def _on_rx(self, data: bytes) -> bytes | None:
        try:
            # exact: pjsip is handed these very octets and would read any past the
            # Content-Length as the body, which no check here would have seen (review 59)
            msg = sip.parse(data, exact=True)
            # initial or in-dialog is the core's reading of the To tag, as pjsip's: never a
            # ";tag=" found in a display name or a quoted parameter (review 25); a Call-ID
            # or tag the core refuses is a bad request here, not an error further on
            in_dialog = msg.to_tag is not None
            _ids = (msg.call_id, msg.from_tag)
            # the transaction pjsip files a request under, read as it reads it; a top
            # Via with no branch, several, or one that is no token is refused here:
            # pjsip would key the last one, or keep the quotes (stop 36, review 97)
            rx_key = _rx_key(msg) if msg.is_request else None
        except E2MError as exc:
            raise RxReject(400, "Bad Request", detail=f"{type(exc).__name__}: {exc}") from None
        if not msg.is_request:
            self._answer_from_home(msg)    # before anything reads it (review 104)
            self._late_retransmission(msg, data)
        answerable = self._answerable_challenges(msg)
        stripped, msg = answerable is not msg, answerable
        if self.certservice is not None and self.certservice.on_rx(
                msg, self.hook.rx_source, tcp=self.hook.rx_over_tcp):
            # an answer to our PUBLISH / SUBSCRIBE (a NOTIFY raises): pjsip gets it as
            # the challenge filter left it (review 29)
            return msg.serialize() if stripped else None
        # (a certificate NOTIFY was answered just above, from its own rule: 481 when not
        # from the proxy; nothing else is noted there for a request)
        self._through_home(msg)
        try:
            opened = self.engine.open(msg)
        except E2MError as err:
            return self._refuse(msg, err)
        self._late_answer(msg, data, opened)
        if not msg.is_request and self.late_answers:
            ended = self.late_answers.bye_answered(msg)
            if ended is not None:
                # what became of the BYE to a late 2xx (pjsip's transaction absorbs it)
                self._pending_errors.append({
                    "kind": "late_answer_bye", "call_id": msg.call_id,
                    "status": msg.status, "reason": msg.reason or ""})
                if msg.status in (401, 407):
                    # a home with [auth] challenges it: answered from the loop, only
                    # when it came from the home itself (``_late_challenge``)
                    self._late_challenges.append(
                        (ended, msg, self._home_source is not None
                         and self._home_source.matches(self.hook.rx_source,
                                                       tcp=self.hook.rx_over_tcp)))
        codes = self.config.codes
        if not msg.is_request and msg.status in (codes.proxy_indecipherable,
                                                 codes.signature_required, 493):
            self._keep_reaction(msg)
        if msg.is_request and msg.method == "INVITE" and not in_dialog:
            self._refuse_unanswerable(msg, opened.info)
        out = self._handed_on(msg, opened, stripped)
        # the record goes with the octets pjsip gets, never with a transaction key alone:
        # a bodiless copy on alice's branch ahead of her real MESSAGE or INVITE is what
        # pjsip delivers, her real one a "retransmission" it absorbs (review 83)
        handed = handed_digest(data if out is None else out)
        what = msg.method if msg.is_request else f"{msg.status} {msg.method}"
        now = time.monotonic()
        if msg.is_request and msg.method != "ACK":
            # (an ACK is no transaction of its own to pjsip: a non-2xx one rides its
            # INVITE's branch, and it is never answered)
            self._one_content_per_transaction(msg, rx_key, what, handed, now)
            self._only_once(msg, opened)
            # remembered only once nothing here refused it: pjsip takes it now
            _bounded_put_aged(self._rx_tsx, rx_key, handed, now)
        elif msg.is_request:
            self._only_once(msg, opened)
        if msg.body or msg.is_request:
            # every request pjsua is handed gets its own record, a bodiless one an empty
            # one (review 25)
            _bounded_put_aged(self._rx_info, (handed, what), opened.info, now)
        if msg.body:
            self._note_call_security("rx", msg, what, opened.info, size=len(data),
                                     handed=handed)
        return out

    def _late_retransmission(self, msg: sip.SipMessage, data: bytes) -> None:
        """The very octets of a late 2xx we answered, again (the callee did not get our
        ACK): the same ACK again, no BYE, and pjsip never sees it (RFC 3261 13.2.2.4).
        By the octets, not the ids: our BYE has ended the keys that opened it."""
        if not self.late_answers or msg.method != "INVITE" or not 200 <= (msg.status or 0) < 300:
            return
        again = self.late_answers.retransmission(data)
        if again is False:
            return
        if again is not None:
            self._late_out.append(again)
        raise RxReject(None, detail="LateAnswer")

    def _late_answer(self, msg: sip.SipMessage, data: bytes, opened: Any) -> None:
        """A 2xx the engine accepted as the answer to an INVITE of ours that had already
        failed (a fork answering after another's 486, or after our CANCEL; RFC 3261
        16.7): ACKed and then BYEd from the loop (``late_2xx.py``), and dropped here:
        pjsip's completed INVITE transaction would answer it with the failure's ACK
        (review 129 HB1).  Only with our From tag, our INVITE's plaintext at hand and,
        where E2M is required, a body the engine opened protected; anything else is
        dropped with nothing sent and nothing kept."""
        if msg.is_request or msg.method != "INVITE" or not 200 <= (msg.status or 0) < 300:
            return
        failure = self.engine.late_answer_to_failed_invite(msg)
        if failure is None:
            if self.engine.names_a_failed_invites_branch(msg):
                # our failed INVITE's branch under other ids (a forgery): pjsip would
                # match it by the branch alone and ACK it with the failure's ACK
                self.late_answers.counts["refused"] += 1
                raise RxReject(None, detail="LateAnswerForged")
            return
        invite = self._plain.get(_tx_key(msg))
        info = opened.info
        sends: list[Outgoing] = []
        if invite is not None and (info.encrypted or info.signed or not self.config.require_e2m):
            via = f"{self.transport.host}:{self.transport.port}" if self.transport \
                else "127.0.0.1:5060"
            sends = self.late_answers.answer(msg, data, invite.from_tag, via)
        else:
            self.late_answers.counts["refused"] += 1
        self._late_out.extend(sends)
        self._pending_errors.append({
            "kind": "late_answer", "call_id": msg.call_id, "status": msg.status,
            "failure": failure, "sent": [o.method for o in sends],
            "reason": "a 2xx after the INVITE failed: ACKed and ended" if sends else
                      "a 2xx after the INVITE failed: dropped, nothing sent"})
        raise RxReject(None, detail="LateAnswer")

    def _late_challenge(self, entry: LateTwoXX, answer: sip.SipMessage,
                        from_home: bool) -> None:
        """A 401/407 to the BYE of a late 2xx: the BYE again with the account's
        credentials, as pjsip would for a request of its own, but only for the home
        proxy's 407 of the home realm, once (twice with stale=true; ``late_2xx.
        LateAnswers.retry_bye``).  Not from the home (a Record-Route that led elsewhere,
        a forger): not answered, whatever realm it names, so nobody else gets a digest
        of our password.  A ``late_answer_bye_auth`` event says what was done (never
        the password, HA1 or nonce)."""
        if from_home:
            out, why = self.late_answers.retry_bye(entry, answer, self._auth_realm,
                                                   self._late_credentials)
        else:
            out, why = None, "the challenge did not come from the home proxy"
            self.late_answers.counts["bye_challenges_refused"] += 1
        self._emit("late_answer_bye_auth", call_id=answer.call_id, status=answer.status,
                   retried=out is not None, tries=entry.auth_tries, reason=why or
                   "sent again with the account's credentials")
        if out is not None:
            self._send_late(out)

    def _late_credentials(self) -> Credentials | None:
        """The account's credentials, read again now (the password is kept by pjsua
        alone between challenges); None when they cannot be read any more."""
        try:
            return self._credentials()
        except PhoneError:
            return None

    def _send_late(self, out: Outgoing) -> None:
        """Hand one ACK/BYE for a late 2xx to pjsip (on the loop, outside its callbacks);
        it goes through the hook and the engine like any request of ours."""
        status = pjsip_abi.send_request(out.data, stateful=out.stateful)
        if status != pjsip_abi.PJ_SUCCESS:
            self._emit("error", direction="tx", message=out.method, error="SendFailed",
                       detail=f"late 2xx: pjsip could not send the {out.method} "
                              f"(status {status})")

    def _through_home(self, msg: sip.SipMessage) -> None:
        """403 for a request that did not come from our outbound proxy or registrar,
        when we have either (reviews 102, 104).  The home's policy, learnt at REGISTER, says what
        it views and archives; a MESSAGE or INVITE sent straight to our contact never
        crossed it (an insider hiding from the archive), so it is refused, whatever
        its method, in a dialog or not: the home proxy record-routes every dialog it
        forwards, so the peer's in-dialog requests come through it too.  Over UDP the
        address and port are compared, over TCP/TLS the address (a registered TCP/TLS
        phone takes only its own connection anyway; a UDP phone's TCP listener takes
        its proxy's connections from any port, RFC 3261 18.2.1).  Nothing is noted and
        pjsua never sees it; an ACK (to this 403) is dropped unanswered.  Known limit: a
        UDP source can be forged by an off-path sender, who sees no answer; TLS closes
        that."""
        home = self._home_source
        if home is None or not msg.is_request:
            return
        source = self.hook.rx_source
        if home.matches(source, tcp=self.hook.rx_over_tcp):
            return
        self.counts["requests_not_via_proxy"] += 1
        where = f"{source[0]}:{source[1]}" if source else "?"
        self._pending_errors.append({
            "kind": "request_refused", "call_id": msg.call_id, "method": msg.method,
            "code": 403, "source": where,
            "reason": "did not come through the home proxy"})
        agent = f"{self.transport.host}:{self.transport.port}" if self.transport else "localhost"
        raise RxReject(403, "Forbidden", headers=[
            ("Warning", f'399 {agent} "Request did not come through the home proxy"')],
            detail="NotViaProxy")

    def _answer_from_home(self, msg: sip.SipMessage) -> None:
        """Drop a response that did not come from our home, when its request went there:
        every request, with an outbound proxy (review 104), else one pjsip sent to a
        home address, as we noted when we sent it (``_note_sent``; review 105: a phone
        with only a registrar; review 106: never as the answer's own To says; review
        108: never as our own headers spell the next hop).  A response to no request we
        noted is held to the home too.  The callee's
        200 sent straight to us would set up a call whose answer the home never saw (its
        archive, its media rule), and our ACK and later requests would follow its
        Contact past the home.  Dropped unanswered and counted, with a
        ``response_dropped`` event."""
        home = self._home_source
        if home is None:
            return
        source = self.hook.rx_source
        if not self._answers_from_home:
            try:
                went = self._sent_home.get(msg.via_branch(), _UNNOTED)
            except E2MError:
                went = _UNNOTED
            if went is None:
                return
            if went is not _UNNOTED and _same_place(source, went, home.udp):
                return     # from where it went: a home socket, or a peer at its address
        if home.matches(source):
            return
        self.counts["responses_not_via_proxy"] += 1
        self._pending_errors.append({
            "kind": "response_dropped", "call_id": msg.call_id,
            "method": msg.method, "status": msg.status,
            "source": f"{source[0]}:{source[1]}" if source else "?",
            "reason": "did not come through the home proxy"})
        raise RxReject(None, detail="NotViaProxy")

    def _note_sent(self, msg: sip.SipMessage) -> None:
        """For a phone with only a registrar: note, by its branch, whether a request we
        send goes to our home, so that its answers are held to the home
        (``_answer_from_home``).  Decided by where pjsip really sends it (the hook's
        ``tx_destination``) against the home's addresses: a route set naming the home
        by another name, or a strict route, goes home all the same (review 108: read
        from the headers, such a re-INVITE was noted as not going home and the callee's
        straight answer was taken).  Any port of a home address is the home (review
        109: the callee moved the route set to the home's other UDP socket), and its
        answers must come from where it went or from the home (review 111: a peer at
        the home's address, called directly, answers from his own port).  A
        destination that cannot be read counts as going home.  Bounded as the other
        records."""
        if self._home_source is None or self._answers_from_home:
            return
        try:
            destination = self.hook.tx_destination
            if destination is None:
                return           # unknown: held to the home (no note)
            home = self._home_source.holds_address(destination[0])
            _bounded_put(self._sent_home, msg.via_branch(), destination if home else None)
        except E2MError:
            pass

    def _handed_on(self, msg: sip.SipMessage, opened: Any, stripped: bool) -> bytes | None:
        """The octets pjsip is handed in place of the datagram (None: the datagram)."""
        if msg.body and opened.message.body == msg.body:
            # a body the engine did not open (plaintext, or not ours to open): pjsip gets
            # it as the core read it, never the octets a laxer parser reads otherwise
            # (reviews 59, 62: a hop's SDP the core took for text moved a call's media)
            try:
                return as_read(opened.message).serialize()
            except E2MError as exc:
                raise RxReject(400, "Bad Request", detail=f"{type(exc).__name__}: {exc}") from None
        if not stripped and opened.message is msg:
            return None
        return opened.message.serialize()

    def _one_content_per_transaction(self, msg: sip.SipMessage, key: tuple[object, ...],
                                     what: str, handed: bytes, now: float) -> None:
        """482 for a request whose transaction (Call-ID, CSeq, method, top Via branch)
        pjsip already took with other octets: pjsip would absorb it as a retransmission
        and deliver nothing, so it is refused here, before it leaves any record, and its
        sender hears it failed instead of a 200 for what pjsip delivered (review 83: a
        hop's bodiless copy ahead of alice's MESSAGE or INVITE on her branch).  The same
        octets again are a retransmission: pjsip's to absorb.  ``key``: ``_rx_key``."""
        first = self._rx_tsx.get(key)
        if first is not None and now - first[0] <= _RX_MAX_AGE:
            if first[1] == handed:
                return
            self._pending_errors.append({
                "kind": "duplicate_refused", "call_id": msg.call_id, "method": msg.method,
                "code": 482, "reason": "a different request in a transaction already taken"})
            raise RxReject(482, "Loop Detected", detail="TransactionCopy")
        self._rx_tsx.pop(key, None)          # an expired entry: this one is new

    def _answerable_challenges(self, msg: sip.SipMessage) -> sip.SipMessage:
        """A 401/407 without the challenges pjsua must not answer with our password
        (another realm's, a callee's 401: ``challenges.py``, review 27); pjsip then
        ends the request with that status.  ``msg`` itself when nothing was taken."""
        if self._auth_realm is None or msg.is_request or msg.status not in (401, 407):
            return msg
        try:
            kept, refused = keep_answerable(msg, self._auth_realm)
        except E2MError:        # no CSeq to read: no challenge of ours either
            kept, refused = msg.remove("WWW-Authenticate").remove("Proxy-Authenticate"), \
                [RefusedChallenge(msg.status, "", None, "unreadable CSeq")]
        for one in refused:
            self.counts["challenges_refused"] += 1
            self._pending_errors.append({
                "kind": "challenge_refused", "call_id": msg.call_id, "code": one.status,
                "method": one.method, "realm": one.realm, "reason": one.why})
        return kept

    def _only_once(self, msg: sip.SipMessage, opened: Any) -> None:
        """A copy of a new MESSAGE or initial INVITE already taken (a digest-challenged
        first attempt sent to us straight): answered, not delivered (``firstcopy.py``)."""
        info = opened.info
        try:
            # a UDP phone's request over its TCP listener: pjsip ends a MESSAGE's
            # transaction with the answer there, as on a TCP phone
            self.first_copies.check(msg, opened.message, info.encrypted or info.signed,
                                    reliable=True if self.hook.rx_over_tcp else None)
        except Duplicate as dup:
            self._pending_errors.append({
                "kind": "duplicate_refused", "call_id": msg.call_id, "method": dup.method,
                "code": dup.code, "reason": "a copy of a request already delivered"})
            raise RxReject(dup.code, dup.reason, detail="Duplicate") from None

    def _keep_reaction(self, msg: sip.SipMessage) -> None:
        """A 496/495/493: kept for the main loop only if it answers a request of ours
        (a stranger's stray answers would otherwise pile up); bounded, oldest out."""
        plain = self._plain.get(_tx_key(msg))
        call = self._by_call_id.get(msg.call_id)
        if plain is None and (call is None or isinstance(call, E2MCall) and call.confirmed):
            # nothing we sent on that branch (a confirmed call's requests all carry SDP
            # or none to react for): pjsip drops it too
            self.counts["stray_e2m_answers"] += 1
            return
        if isinstance(call, E2MCall) and call.confirmed and msg.method == "INVITE":
            self._update_reactions.append((msg, plain))
            return
        key = _tx_key(msg)
        self._reactions[key] = (msg, plain, time.monotonic())
        self._reactions.move_to_end(key)
        while len(self._reactions) > MAX_REACTIONS:
            self._reactions.popitem(last=False)

    def _refuse_unanswerable(self, msg: sip.SipMessage, info: SecurityInfo) -> None:
        """An initial INVITE whose answer we could not protect: E2M required, no
        checked certificate of the caller (a signed offer would have given us one),
        and no key of the caller's that the answer may reuse.  pjsua would give it a
        call slot and answer 200, which the hook cannot let out; pjsip retransmits it
        into the hook until the caller gives up, and the slot stays taken.  It gets
        the error table's answer now instead."""
        if not self.config.require_e2m:
            return
        try:
            peer = sip.parse_address(msg.get("From") or "").uri
        except E2MError:
            peer = None
        if peer is not None and self.engine.certs.user(peer) is not None:
            return
        if self._answer_can_reuse_a_key(msg):
            return
        err = MissingPeerCertificateError(
            "no checked certificate of the caller to protect the answer to")
        response = self.engine.refusal(msg, err)
        answer = answer_for(err, "ua", self.config.codes)
        self._pending_errors.append({
            "kind": "call_refused", "call_id": msg.call_id, "remote": msg.get("From") or "",
            "code": answer.code if answer else None, "error": type(err).__name__,
            "reason": "the answer cannot be protected: no checked certificate of the caller "
                      "and no key of theirs to reuse"})
        self.counts["calls_refused"] += 1
        raise RxReject.from_response(response, detail=type(err).__name__)

    def _answer_can_reuse_a_key(self, invite: sip.SipMessage) -> bool:
        """Whether the caller offered a key (RFC 3185) our answer may go under: one
        only the two of us hold when the answer carries SRTP keys, any named one
        otherwise (``DialogKeys.reusable``, which counts no use)."""
        keys = getattr(self.engine, "dialog_keys", None)
        if keys is None or not self.config.cek_reuse:
            return False
        try:
            if keys.reusable(invite, exclusive=True) is not None:
                return True
            return not self.settings.srtp and keys.reusable(invite, exclusive=False) is not None
        except Exception:  # noqa: BLE001 - cannot tell: let pjsua try
            return True

    def _refuse(self, msg: sip.SipMessage, err: E2MError) -> bytes | None:
        """A refused request gets the engine's answer; a refused response is dropped."""
        start = msg.method if msg.is_request else f"{msg.status} {msg.method}"
        self._pending_errors.append({"direction": "rx", "message": start,
                                     "call_id": msg.call_id, "error": type(err).__name__,
                                     "detail": str(err)[:200]})
        if msg.is_request:
            raise RxReject.from_response(self.engine.refusal(msg, err),
                                         detail=type(err).__name__) from None
        raise RxReject(None, detail=type(err).__name__) from None

    def _note_call_security(self, direction: str, msg: sip.SipMessage, what: str,
                            info: SecurityInfo, size: int | None = None,
                            handed: bytes | None = None) -> None:
        if info.content_type != "application/sdp":
            return
        # size: the message's octets as pjsip received or will send it, so a caller
        # can see how close an INVITE came to PJSIP_MAX_PKT_LEN (docs/protocol.md §6.2)
        records = self._call_security.setdefault(msg.call_id, [])
        # handed: the digest of the octets pjsip got (received messages), so a call shows
        # only the INVITE pjsua took (review 83)
        records.append({"direction": direction, "what": what, "cseq": msg.cseq[0],
                        "info": info, "bytes": size, "handed": handed,
                        "tags": (msg.from_tag or "", msg.to_tag or "")})
        if len(records) > _RECORDS_PER_CALL:
            # the call's first offer and answer stay, then the latest: a peer's endless
            # re-INVITEs in one call no longer grow the phone's memory
            del records[2]
        while len(self._call_security) > _MEMO:
            self._call_security.pop(next(iter(self._call_security)))

    # -- main loop -----------------------------------------------------------------------
    def poll(self, ms: int = 10) -> None:
        """Run pjsip once, then the work the callbacks queued (fetches, retries, events)."""
        self.endpoint.pump(ms)
        self._after_pump()

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll(10)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= end:
                return False
            self.poll(10)
        return True

    def _after_pump(self) -> None:
        """The work the callbacks queued.  Each piece runs behind its own boundary: an
        exception (a bug, or input nobody foresaw) becomes an ``error`` event with its
        class name and the loop goes on."""
        while self._pending_errors:
            err = self._pending_errors.popleft()
            self._guarded("event", self._emit, err.pop("kind", "error"), **err)
        while self._update_reactions:
            self._guarded("reaction", self._react_in_dialog, *self._update_reactions.popleft())
        while self._late_challenges:
            self._guarded("late_2xx", self._late_challenge,
                          *self._late_challenges.popleft())
        while self._late_out:
            self._guarded("late_2xx", self._send_late, self._late_out.popleft())
        found = self.endpoint.events.find(since=self._mark)
        if found and self._mark and found[0].seq > self._mark + 1:
            self.counts["endpoint_events_missed"] += found[0].seq - self._mark - 1
        for event in found:
            self._mark = event.seq
            handler = getattr(self, f"_ev_{event.kind}", None)
            if handler is not None:
                self._guarded(event.kind, handler, event)
        for result in self.fetcher.results():
            self._guarded("fetch", self._fetched, result)
        if self.endpoint.ringing:
            self._guarded("answer", self.endpoint.answer_ringing,
                          lambda wanted: self.engine.holds_proxy_certificate(*wanted))
        now = time.monotonic()
        if self._deferred:
            self._guarded("retry", self._run_deferred, now)
        if self.certservice is not None:
            self._guarded("certservice", self._certservice_work, now)
        if now - self._last_fetch_check > 0.1:
            self._last_fetch_check = now
            self._guarded("fetch", self.fetch_certificates)
        if now - self._last_sweep > 1.0:
            self._last_sweep = now
            self._guarded("sweep", self._sweep, now)

    def _guarded(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the loop's boundary
            self.counts["handler_failures"] += 1
            try:
                self._emit("error", direction="loop", message=what, error=type(exc).__name__,
                           detail="an exception in the phone's loop (class name only)")
            except Exception:  # noqa: BLE001
                pass
            return None

    def _sweep(self, now: float) -> None:
        """Age and count bounds: events, E2M answers nobody claimed, finished messages
        and calls, and pjsua's ended call objects."""
        horizon = time.time() - EVENT_MAX_AGE
        while self.events and self.events[0].get("time", 0) < horizon:
            self.events.popleft()
        while self.errors and self.errors[0].get("time", 0) < horizon:
            self.errors.popleft()
        for key in [k for k, (_, _, t) in self._reactions.items() if now - t > REACTION_MAX_AGE]:
            del self._reactions[key]
        self.messages = _keep_done(self.messages, self._by_call_id)
        self.calls = _keep_done(self.calls, self._by_call_id)
        if self.account is not None:
            released = self.account.release_ended(keep=8)
            if released:
                live = {id(c) for c in released}
                for call in self.calls:
                    if id(call.current) in live:
                        call.current = None

    # pjsua events, copied into phone events
    def _ev_reg(self, ev: Any) -> None:
        ok = ev["code"] // 100 == 2
        data: dict[str, Any] = {"code": ev["code"], "reason": ev["reason"],
                                "expiration": ev["expiration"]}
        if ok and ev["expiration"] > 0:
            data["policies"] = [{"host": p.host, "view": [r.format() for r in p.view],
                                 "verify": [r.format() for r in p.verify], "cert_url": p.url}
                                for p in self.engine.policies.in_force()]
            self.fetch_certificates(force=True)
            self._publish_certificate()
        self._emit("registered" if ok and ev["expiration"] > 0 else
                   "unregistered" if ok else "register_failed", **data)

    def _ev_message(self, ev: Any) -> None:
        whole = ev["whole_msg"]
        info = None
        try:
            msg = sip.parse(whole)
            # the record of these very octets, or none (shown without security)
            found = self._rx_info.get((handed_digest(whole), msg.method))
            info = found[1] if found is not None else None
            call_id = msg.call_id
        except E2MError:
            call_id = None
        body = ev["body"]
        self._emit("message_in", from_uri=ev["from_uri"], to_uri=ev["to_uri"], call_id=call_id,
                   content_type=ev["content_type"],
                   text=body.decode("utf-8", "replace"), security=security_dict(info, True))

    def _ev_message_status(self, ev: Any) -> None:
        handle: OutgoingMessage | None = None
        response = None
        try:
            response = sip.parse(ev["whole_msg"]) if ev["whole_msg"] else None
        except E2MError:
            response = None
        if response is not None:
            found = self._by_call_id.get(response.call_id)
            handle = found if isinstance(found, OutgoingMessage) else None
        if handle is None:    # no response (timeout, blocked): the oldest pending one
            handle = next((m for m in self.messages if not m.done and m.attempts and
                           _same_uri(m.to, ev["to_uri"])), None)
        if handle is None or handle.done:
            return
        if response is None and self._blocked_statuses.get(id(handle)):
            # pjsua's status of an attempt the hook blocked while the peer's
            # certificate is fetched: the retry's own status decides
            self._blocked_statuses[id(handle)] -= 1
            return
        code = ev["code"]
        handle.status, handle.reason = code, ev["reason"]
        if code // 100 == 2:
            handle.done = handle.ok = True
            self._emit("message_sent", to=handle.to, code=code, attempts=handle.attempts,
                       call_id=handle.call_ids[-1] if handle.call_ids else None,
                       retried_after=handle.retried_after, security=security_dict(handle.security))
            return
        if response is not None and self._react(handle, response):
            return
        if not handle.done:
            handle.done = True
            self._emit("message_failed", to=handle.to, code=code, reason=handle.reason,
                       attempts=handle.attempts)

    def _ev_incoming_call(self, ev: Any) -> None:
        acc = self.account
        phone_call = next((c for c in reversed(acc.calls) if c.serial == ev.get("call")),
                          None) if acc is not None else None
        call = E2MCall(remote=ev["remote_uri"], outgoing=False, current=phone_call, attempts=1)
        call.call_ids.append(ev["call_id"])
        try:
            taken = sip.parse(ev["whole_msg"])
            call.initial = (taken.cseq[0], handed_digest(ev["whole_msg"]), taken.from_tag or "")
        except (E2MError, KeyError):
            # unreadable: no received offer of this CSeq is shown as the call's
            call.initial = None
        self.calls.append(call)
        held = self._by_call_id.get(ev["call_id"])
        if not isinstance(held, E2MCall) or held.done:
            # a second dialog under a live call's Call-ID (anyone who read it may make
            # one) must not take the live call's entry: its 496 answers go by it
            self._by_call_id[ev["call_id"]] = call
        self._emit("call_incoming", remote=call.remote, call_id=ev["call_id"],
                   security=self.call_security(call))

    def _answer_failure(self, exc: BaseException | None) -> tuple[int, str]:
        """The final answer to an incoming call whose 200 the hook refused: the error
        table's (``MissingPeerCertificateError``: 403), 500 for anything else."""
        answer = answer_for(exc, "ua", self.config.codes) if isinstance(exc, E2MError) else None
        if answer is None:
            return 500, "Server Internal Error"
        return answer.code, answer.reason

    def _ev_answer_failed(self, ev: Any) -> None:
        self.counts["calls_refused"] += 1
        self._emit("call_refused", call_id=ev["call_id"], code=ev["code"],
                   error="AnswerBlocked", reason=f"the answer could not be sent: {ev['error']}")

    def _call_of(self, ev: Any) -> E2MCall | None:
        """The call a pjsua event is about: the one holding the event's own call object
        (two dialogs may share a Call-ID), else the Call-ID's (an attempt whose object
        the call no longer holds, say one the hook refused to send)."""
        serial = ev.get("call")
        if serial is not None:
            for call in reversed(self.calls):
                if call.current is not None and getattr(call.current, "serial", None) == serial:
                    return call
        found = self._by_call_id.get(ev["call_id"])
        return found if isinstance(found, E2MCall) else None

    def _ev_call_state(self, ev: Any) -> None:
        call = self._call_of(ev)
        if call is None:
            return
        import pjsua2 as pj

        self._emit("call_state", call_id=ev["call_id"], state=ev["state_text"], code=ev["code"],
                   reason=ev["reason"])
        if ev["state"] == pj.PJSIP_INV_STATE_DISCONNECTED and ev["call_id"] == call.sip_call_id:
            call.status = ev["code"]
            response = None
            if ev["whole_msg"]:
                try:
                    response = sip.parse(ev["whole_msg"])
                except E2MError:
                    response = None
            if call.outgoing and response is not None and not response.is_request \
                    and not call.confirmed and self._react(call, response):
                return
            call.done = True
            # No engine.forget_call here: a Call-ID is not a dialog (a stranger may reuse
            # a live call's Call-ID for a call of his own, and its end would take the
            # live call's keys); the engine ends dialogs by the messages it sees.
            if call.outgoing and not call.was_media_active:
                call.failed = True
                call.reason = call.reason or f"{ev['code']} {ev['reason']}"
            self._emit("call_ended", call_id=ev["call_id"], code=ev["code"], reason=ev["reason"],
                       attempts=call.attempts, media_was_active=call.was_media_active,
                       security=self.call_security(call))

    def _ev_media(self, ev: Any) -> None:
        call = self._call_of(ev)
        if call is None:
            return
        import pjsua2 as pj

        names = {pj.PJSUA_CALL_MEDIA_NONE: "none", pj.PJSUA_CALL_MEDIA_ACTIVE: "active",
                 pj.PJSUA_CALL_MEDIA_LOCAL_HOLD: "local_hold",
                 pj.PJSUA_CALL_MEDIA_REMOTE_HOLD: "remote_hold", pj.PJSUA_CALL_MEDIA_ERROR: "error"}
        statuses = [names.get(s, str(s)) for t, s in ev["statuses"] if t == pj.PJMEDIA_TYPE_AUDIO]
        remote = None
        if "active" in statuses:
            call.was_media_active = True
            try:   # main loop, not a hook callback: pjsua2 calls are fine here
                remote = call.current.getStreamInfo(0).remoteRtpAddress
            except Exception:  # noqa: BLE001 - the call may have ended meanwhile
                remote = None
        self._emit("call_media", call_id=ev["call_id"], audio=statuses, remote_rtp=remote,
                   security=self.call_security(call))

    # -- 496 / 495 / 493 ------------------------------------------------------------------
    def _react(self, handle: OutgoingMessage | E2MCall, response: sip.SipMessage) -> bool:
        """Handle an E2M answer to ``handle``'s request; True when a retry went out."""
        entry = self._reactions.pop(_tx_key(response), None)
        if entry is None:
            return False
        answer, plain, _ = entry
        if plain is None:
            self._fail(handle, answer.status, "no plaintext request kept for this answer")
            return True
        reaction = self.engine.react(answer, plain)
        self._emit("e2m_answer", code=answer.status, call_id=answer.call_id,
                   action=reaction.action, reason=reaction.reason, learned=reaction.learned)
        if reaction.action != "retry":
            self._fail(handle, answer.status, f"{answer.status} not followed: {reaction.reason}")
            return True
        if handle.attempts > self.settings.max_retries:
            self._fail(handle, answer.status, f"gave up after {handle.attempts} attempts")
            return True
        handle.retried_after.append(reaction.reason)
        self._retry_after_fetches(handle, "message" if isinstance(handle, OutgoingMessage)
                                  else "call")
        return True

    def _retry_after_fetches(self, handle: OutgoingMessage | E2MCall, what: str) -> None:
        """Send again once the certificates the answer taught us about are fetched
        (off the loop; at most ``fetch_timeout`` + 0.5 s later), or at once."""
        self.fetch_certificates(force=True)
        if self.fetcher.busy():
            self._deferred.append((handle, what, time.monotonic() + self.settings.fetch_timeout
                                   + 0.5))
        else:
            self._retry_now(handle, what)

    def _retry_now(self, handle: OutgoingMessage | E2MCall, what: str) -> None:
        if what == "message":
            self._attempt_message(handle)  # type: ignore[arg-type]
        elif what == "call":
            self._attempt_call(handle)  # type: ignore[arg-type]
        else:
            self._update_again(handle)  # type: ignore[arg-type]

    def _run_deferred(self, now: float) -> None:
        if self.fetcher.busy() and all(now < deadline for _, _, deadline in self._deferred):
            return
        ready, self._deferred = self._deferred, []
        for handle, what, _ in ready:
            self._guarded("retry", self._retry_now, handle, what)

    def _react_in_dialog(self, answer: sip.SipMessage, plain: sip.SipMessage | None) -> None:
        """A 496/495/493 to a re-INVITE: the call stays up (RFC 3261 §14.1), so the same
        operation is asked again once the engine has learnt what the answer says (a
        proxy that restarted and lost the reused key gets its own recipient now)."""
        call = self._by_call_id.get(answer.call_id)
        if not isinstance(call, E2MCall) or call.done or call.current is None:
            return
        reaction = self.engine.react(answer, plain) if plain is not None else None
        self._emit("e2m_answer", code=answer.status, call_id=answer.call_id,
                   action=reaction.action if reaction else "none",
                   reason=reaction.reason if reaction else "no plaintext request kept",
                   learned=reaction.learned if reaction else None)
        if reaction is None or reaction.action != "retry" or call.update is None \
                or call.update_attempts > self.settings.max_retries:
            self._emit("call_update_failed", call_id=answer.call_id, code=answer.status,
                       update=call.update, reason=reaction.reason if reaction else "")
            return
        call.retried_after.append(reaction.reason)
        call.update_attempts += 1
        self._retry_after_fetches(call, "update")

    def _update_again(self, call: E2MCall) -> None:
        if call.done or call.current is None or call.update is None:
            return
        call_id = call.sip_call_id
        try:    # main loop, not a hook callback: pjsua2 calls are fine here
            getattr(call.current, call.update)()
        except Exception as exc:  # noqa: BLE001 - SendBlocked from the hook, pjsua busy
            self._emit("call_update_failed", call_id=call_id, code=None,
                       update=call.update, reason=f"{type(exc).__name__}: {exc}")
            return
        self._emit("call_update_retried", call_id=call_id, update=call.update,
                   attempt=call.update_attempts)

    def _fail(self, handle: OutgoingMessage | E2MCall, code: int | None, reason: str) -> None:
        handle.done = True
        handle.reason = reason
        if isinstance(handle, OutgoingMessage):
            handle.status = code
            self._emit("message_failed", to=handle.to, code=code, reason=reason,
                       attempts=handle.attempts)
        else:
            handle.failed = True
            handle.status = code
            self._emit("call_failed", remote=handle.remote, code=code, reason=reason,
                       attempts=handle.attempts)

    # -- certificates ------------------------------------------------------------------
    def _answer_waits(self, whole_msg: bytes) -> list[tuple[str, bytes | None]]:
        """The proxies an incoming INVITE's answer waits for the certificates of
        (``UAEngine.certificates_to_answer``), their fetches queued before all others:
        the first ``_RING_HOSTS`` it names (a caller's 16 silent hosts must not hold
        another call's answer, review 164 K1).  Inside pjsip's callback."""
        try:
            wanted = self.engine.certificates_to_answer(sip.parse(whole_msg))
        except E2MError:
            return []
        hosts = []
        for cert in wanted[:_RING_HOSTS]:
            # only for what can come: a URL cooling down after a failure is not fetched
            # (review 166 K1: the call rang 3 s for nothing)
            if cert.url and self.fetcher.would_fetch(cert.host, cert.url) \
                    and self.fetcher.submit(cert.host, cert.url, urgent=True) is None:
                hosts.append((cert.host, cert.fingerprint))
        return hosts

    def fetch_certificates(self, force: bool = False) -> list[str]:
        """Start fetching the certificates of learned policies we do not hold (off the
        loop); returns the hosts queued now.  Results arrive in ``_fetched``."""
        if not self.settings.fetch_certificates:
            return []
        queued = []
        for wanted in self.engine.certificates_wanted():
            if not wanted.url:
                continue
            busy = self.fetcher.in_flight()
            refused = self.fetcher.submit(wanted.host, wanted.url, force=force)
            if refused:
                self._emit("error", direction="fetch", message=wanted.host,
                           error="FetchRefused", detail=refused)
            elif self.fetcher.in_flight() > busy:
                queued.append(wanted.host)
                self.counts["fetches"] += 1
        return queued

    def _fetched(self, result: Any) -> None:
        """A fetch ended (on the loop thread): check and keep the certificate."""
        if result.data is None:
            self._emit("error", direction="fetch", message=result.host, error=result.error,
                       detail=result.detail)
            return
        try:
            self.engine.add_proxy_certificate(result.host, result.data)
        except (E2MError, ValueError) as exc:
            self.fetcher.refused(result.host, result.url)   # cooled down as a failed fetch
            self._emit("error", direction="fetch", message=result.host,
                       error=type(exc).__name__, detail=str(exc)[:200])
            return
        self._emit("proxy_certificate", host=result.host, url=result.url)

    def wait_for_fetches(self, timeout: float | None = None) -> bool:
        """Pump until no certificate fetch is running (or ``timeout``, default the
        fetch deadline and a little more)."""
        limit = self.settings.fetch_timeout + 0.5 if timeout is None else timeout
        return self.wait_until(lambda: not self.fetcher.busy(), limit)

    # -- the certificate service (RFC 6072; certservice_client.py) ----------------------
    def _certificate_service(self, proxies: list[str]) -> CertServiceClient:
        """The client, told where NOTIFYs must come from: our outbound proxy (the
        same ``ProxySource`` reading as the phone's own request rule)."""
        udp = self.transport.kind == "udp"
        source = ProxySource.of_uris(proxies[:1], tls=self.transport.kind == "tls", udp=udp)
        s = self.settings
        return CertServiceClient(
            self.engine, self.config.certificate, send_subscribe=self._send_subscribe,
            contact=lambda: self.transport.uri(self.user), proxy_source=source, udp=udp,
            publish_expires=s.cert_publish_expires, subscribe_expires=s.cert_subscribe_expires)

    def _send_subscribe(self, aor: str, headers: list[tuple[str, str]]) -> None:
        """An out-of-dialog SUBSCRIBE through the account (its proxies, its From);
        the hook completes it (``CertServiceClient.on_tx``).  Main loop only."""
        import pjsua2 as pj

        prm = pj.SendRequestParam()
        prm.method = "SUBSCRIBE"
        prm.txOption.targetUri = aor
        for name, value in headers:
            h = pj.SipHeader()
            h.hName, h.hValue = name, value
            prm.txOption.headers.append(h)
        self.account.sendRequest(prm)

    def _publish_certificate(self) -> None:
        """Start (or redo) the publication of our certificate: pjsip's publication
        client sends it, the hook makes it a certificate PUBLISH."""
        if self.certservice is None or not self.account or not self.settings.registrar \
                or self._cert_published:
            return      # pjsip refreshes it from now on
        self._cert_published = True
        import pjsua2 as pj

        status = pj.PresenceStatus()
        status.status = pj.PJSUA_BUDDY_STATUS_ONLINE
        status.note = "certificate"
        self.account.setOnlineStatus(status)

    def _await_peer_certificate(self, handle: OutgoingMessage | E2MCall, to: str,
                                exc: BaseException, what: str) -> bool:
        """A send the hook blocked for want of the peer's certificate: fetch it from
        the peer's certificate service and send again once (True), or fail with why
        the service could not give one (True); False when this is not such a case."""
        failure = getattr(exc, "hook_failure", None)
        if self.certservice is None or not isinstance(getattr(failure, "exception", None),
                                                      MissingPeerCertificateError):
            return False
        aor = _aor_text(to)
        tried = any(r.startswith("certificate service:") for r in handle.retried_after)
        full = len(self._cert_waits) >= (self._cert_waits.maxlen or 0)
        if not tried and not full and self.certservice.want(aor):
            handle.retried_after.append(f"certificate service: fetched {aor}")
            if what == "message":
                self._blocked_statuses[id(handle)] = 1
                while len(self._blocked_statuses) > 64:
                    self._blocked_statuses.popitem(last=False)
            self._cert_waits.append((handle, what, aor, time.monotonic() + 6.0))
            return True
        why = self.certservice.failure(aor) or ("too many sends wait for certificates"
                                                if full else "no checked certificate of it is held")
        name = "INVITE not sent" if what == "call" else "not sent"
        self._fail(handle, None, f"{name}: no usable certificate for {aor}: {why}")
        return True

    def _certservice_work(self, now: float) -> None:
        service = self.certservice
        assert service is not None
        if now - self._cert_tick > 0.1:
            self._cert_tick = now
            service.tick()
        while service.events:
            event = service.events.popleft()
            self._emit(event.pop("kind"), **event)
        for _ in range(len(self._cert_waits)):
            handle, what, aor, until = self._cert_waits.popleft()
            if service.pending(aor) and now < until:
                self._cert_waits.append((handle, what, aor, until))
            else:
                self._guarded("retry", self._retry_now, handle, what)

    # -- application API ---------------------------------------------------------------
    def register(self, timeout: float = 5.0) -> bool:
        """Wait for the REGISTER (sent at start when a registrar is set) to succeed."""
        if not self.settings.registrar:
            return True
        ok = self.wait_until(lambda: bool(self.account.is_registered) or any(
            e["kind"] == "register_failed" for e in self.events), timeout)
        if ok and self.account.is_registered:
            self.fetch_certificates(force=True)
            self.wait_for_fetches()
            self.poll(0)      # hand the results to the engine
            return True
        return False

    def send_message(self, to: str, text: str, content_type: str = "text/plain") -> OutgoingMessage:
        handle = OutgoingMessage(to, text, content_type)
        self.messages.append(handle)
        if self.certservice is not None:
            self.certservice.touch(_aor_text(to))     # keep following its certificate
        self._attempt_message(handle)
        return handle

    def _attempt_message(self, handle: OutgoingMessage) -> None:
        from .endpoint import SendError

        handle.attempts += 1
        self._sending = handle
        try:
            self.account.send_message(handle.to, handle.text, content_type=handle.content_type)
        except SendError as exc:
            if not self._await_peer_certificate(handle, handle.to, exc, "message"):
                self._fail(handle, getattr(exc, "status", None), f"not sent: {exc}")
            return
        finally:
            self._sending = None
        if handle.call_ids:
            handle.security = self._tx_info.get(
                next((k for k in reversed(self._tx_info)
                      if k[0] == handle.call_ids[-1] and k[2] == "MESSAGE"), ("", 0, "", "")))

    def call(self, to: str) -> E2MCall:
        call = E2MCall(remote=to, outgoing=True)
        self.calls.append(call)
        if self.certservice is not None:
            self.certservice.touch(_aor_text(to))
        self._attempt_call(call)
        return call

    def _attempt_call(self, call: E2MCall) -> None:
        from .endpoint import SendError

        call.attempts += 1
        self._sending = call
        try:
            call.current = self.account.make_call(call.remote)
        except SendError as exc:
            if not self._await_peer_certificate(call, call.remote, exc, "call"):
                self._fail(call, getattr(exc, "status", None), f"INVITE not sent: {exc}")
            return
        finally:
            self._sending = None
        self._emit("call_started", remote=call.remote, call_id=call.sip_call_id,
                   attempt=call.attempts)

    def call_security(self, call: E2MCall) -> list[dict[str, Any]]:
        """Per SDP of the call's live dialog: direction, message and its security."""
        records = self._call_security.get(call.sip_call_id or "", [])
        return [{"direction": r["direction"], "what": r["what"], "cseq": r["cseq"],
                 "bytes": r["bytes"],
                 "security": security_dict(r["info"], r["direction"] == "rx")}
                for r in records if self._taken_by_call(call, r)]

    @staticmethod
    def _taken_by_call(call: E2MCall, record: dict[str, Any]) -> bool:
        """Whether a security record may be shown as ``call``'s.  A received INVITE of
        an incoming call: the one pjsua took, its very octets (review 83: a bodiless
        copy on alice's branch is what pjsua answered, her offer only a
        "retransmission" to pjsip), or a re-INVITE inside that call's dialog (a To tag,
        from the caller's tag).  Records are kept per Call-ID: another initial INVITE
        (another CSeq, a second dialog under the Call-ID) is not this call's (review
        93)."""
        if call.outgoing or record["direction"] != "rx" or record["what"] != "INVITE":
            return True
        if call.initial is None:
            return False
        _, handed, caller_tag = call.initial
        from_tag, to_tag = record.get("tags", ("", ""))
        if not to_tag:
            return record.get("handed") == handed
        return bool(caller_tag) and from_tag == caller_tag

    def message_security(self, handle: OutgoingMessage) -> SecurityInfo | None:
        return handle.security

    def hold(self, call: E2MCall) -> None:
        """Put ``call`` on hold (re-INVITE); asked again by itself after a 496/495/493."""
        self._update(call, "hold")

    def unhold(self, call: E2MCall) -> None:
        """Take ``call`` off hold (re-INVITE); asked again by itself after a 496/495/493."""
        self._update(call, "unhold")

    def _update(self, call: E2MCall, operation: str) -> None:
        if call.current is None or call.done:
            raise PhoneError("the call is not up")
        call.update, call.update_attempts = operation, 1
        getattr(call.current, operation)()

    def hangup(self, call: E2MCall) -> None:
        if call.current is not None and not call.current.disconnected:
            call.current.end()

    def done_messages(self) -> bool:
        return all(m.done for m in self.messages)


def _witness_keys(path: str, body: bytes) -> None:
    """Wire tests only (``E2M_PHONE_KEY_WITNESS``): the SHA-256 of each SRTP key we
    offer, as base64 text and as raw bytes, so a capture can be searched for the key
    without the key itself being written anywhere."""
    for match in re.finditer(rb"a=crypto:\S+ \S+ inline:([A-Za-z0-9+/=]+)", body):
        text = match.group(1)
        try:
            raw = base64.b64decode(text)
        except ValueError:
            raw = b""
        record = {"b64_len": len(text), "b64_sha256": hashlib.sha256(text).hexdigest(),
                  "raw_len": len(raw), "raw_sha256": hashlib.sha256(raw).hexdigest()}
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _keep_done(items: list[Any], by_call_id: dict[str, Any]) -> list[Any]:
    """``items`` with at most MAX_DONE finished ones (the newest); the Call-IDs of
    those dropped leave ``by_call_id`` too."""
    done = [i for i in items if i.done]
    if len(done) <= MAX_DONE:
        return items
    drop = {id(i) for i in done[:len(done) - MAX_DONE]}
    for item in items:
        if id(item) in drop:
            for call_id in item.call_ids:
                if by_call_id.get(call_id) is item:
                    del by_call_id[call_id]
    return [i for i in items if id(i) not in drop]


def _same_uri(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        u = u.strip().strip("<>")
        return u.split(";", 1)[0].lower()
    return norm(a) == norm(b)



def _aor_text(uri: str) -> str:
    """The AoR of a target URI (scheme, user, host), or the text itself."""
    try:
        return str(aor_of(uri.strip().strip("<>")))
    except E2MError:
        return uri
