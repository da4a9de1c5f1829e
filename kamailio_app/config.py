"""The Kamailio side of PROXY.toml: ``[kamailio]``, ``[archive]``, ``[e2m]``, ``[auth]``,
``[tls]``, ``[limits]``, ``[cluster]`` and ``[certs]``.

The file is shared with the core: ``[identity]``, ``[trust]`` and ``[policy]``
belong to ``e2m_plugins.config.load_proxy_config``, which is called only when
E2M is enabled (an untrusted routing hop has no identity).  Sections this
module does not know are left alone so the two loaders can grow apart; it only reads
``[identity] host`` (the proxy answers for that name, like ``domains``) and, as the
defaults of ``[tls]``, ``[identity] cert``/``key`` and ``[trust] ca``.

Every mistake is collected and reported together in one ``AppConfigError``, one
line per mistake, so an operator fixes the file in one go.  Paths are relative
to the config file, not to the working directory of whoever starts the proxy.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from e2m_plugins.config import ConfigError
from e2m_plugins.errors import MalformedError
from e2m_plugins.uri import canonical_ip
from e2m_plugins.privatefiles import PrivateFileError, check_private_file
from e2m_plugins.uri import parse_uri

from .pgconn import PgUrl, PgUrlError

__all__ = [
    "AppConfig", "AppConfigError", "ArchiveSettings", "AuthSettings", "CertSettings",
    "ClusterSettings", "DispatcherSettings", "DmqUri", "E2MSettings", "parse_dmq_uri",
    "KamailioSettings", "LimitSettings", "Listener", "TlsSettings", "load_app_config",
    "parse_app_config", "LOG_LEVELS", "DB_MODULES",
]

# Kamailio's numeric debug levels, by the names operators use.
LOG_LEVELS = {"alert": -5, "bug": -4, "crit": -3, "err": -1, "error": -1, "warn": 0,
              "warning": 0, "notice": 1, "info": 2, "debug": 3, "dbg": 3}

_PROTOS = ("udp", "tcp", "tls")
SHM_ALLOCATORS = ("tlsf", "qm", "fm")     # Kamailio's -x choices
# The registrar's contact lifetimes in seconds (the longest kept, what a contact asking
# none gets, the shortest granted); the open registrar's count of AoRs follows them.
MAX_EXPIRES = 3600
DEFAULT_EXPIRES = 600
MIN_EXPIRES = 60
# [auth] db_url schemes and the Kamailio module that speaks each.
DB_MODULES = {"sqlite": "db_sqlite", "mysql": "db_mysql", "postgres": "db_postgres",
              "text": "db_text"}
_DB_URL = re.compile(r"(?P<scheme>[a-z]+)://[^\s\"\\]+")
_DB_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Only TLS 1.2 and later: Kamailio 5.6's tls module offers "TLSv1.2+" as its floor.
TLS_MIN_VERSIONS = {"TLSv1.2": "TLSv1.2+"}
_SIP_URI = re.compile(r"sips?:[^\s<>\"]+", re.IGNORECASE)
_DOMAIN = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_HTTP_PATH = re.compile(r"/[A-Za-z0-9._~/-]{0,200}")


def _is_sip_uri(text: str) -> bool:
    # The regex also keeps '"', '<', '>' and white space out of the generated cfg.
    if not _SIP_URI.fullmatch(text):
        return False
    try:
        parse_uri(text)
    except MalformedError:
        return False
    return True


class AppConfigError(ConfigError):
    """PROXY.toml's Kamailio sections are unusable; ``problems`` holds one line per mistake.

    The core's ``ConfigError`` with its own name, so callers can catch either."""


@dataclass(frozen=True)
class Listener:
    """One ``proto:host:port`` socket; IPv6 hosts are kept without brackets."""

    proto: str
    host: str
    port: int

    def kamailio(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.proto}:{host}:{self.port}"

    def __str__(self) -> str:
        return self.kamailio()


@dataclass(frozen=True)
class KamailioSettings:
    listen: tuple[Listener, ...]
    workers: int = 4
    shm_mb: int = 256
    pkg_mb: int = 16
    # Kamailio's allocator for shared memory (-x).  Debian's build makes qm, its
    # default, keep debugging records on every fragment: tlsf measured 34% less CPU
    # per relayed call (bench/README.md); qm stays for hunting a leak.
    shm_allocator: str = "tlsf"
    next_hop: str | None = None
    log_level: int = 2
    # Extra names Kamailio treats as itself (is_myself), e.g. the SIP domain.
    domains: tuple[str, ...] = ()
    # Path of the proxy certificate on the TCP listener (xhttp).
    cert_path: str = "/e2m/cert.der"
    # Key cache: 2**keycache_size htable buckets, entries expire after this many seconds.
    keycache_size: int = 10
    keycache_expire: int = 43200
    # Largest SIP message accepted on TCP (Kamailio's tcp_rd_buf_size); the core
    # parses messages up to 320 KiB (S/MIME bodies up to 256 KiB).
    tcp_max_message_kb: int = 320
    binary: str = "/usr/sbin/kamailio"
    module_path: str = "/usr/lib/x86_64-linux-gnu/kamailio/modules"
    # Another KEMI script in place of kamailio_app/kemi.py (relative to the config
    # file): a site's own routing built on ours, or the benchmark's floor script.
    kemi_script: Path | None = None

    @property
    def http_listener(self) -> Listener | None:
        """The first TCP listener: where xhttp serves the certificate."""
        return next((item for item in self.listen if item.proto == "tcp"), None)

    @property
    def sip_listener(self) -> Listener:
        """The first UDP listener (or the first one): where tests send SIP."""
        return next((item for item in self.listen if item.proto == "udp"), self.listen[0])

    @property
    def tls_listener(self) -> Listener | None:
        """The first TLS listener, if any."""
        return next((item for item in self.listen if item.proto == "tls"), None)

    @property
    def next_hop_tls(self) -> bool:
        """Whether next_hop is reached over TLS (a sips: URI or ;transport=tls)."""
        hop = (self.next_hop or "").lower()
        return hop.startswith("sips:") or ";transport=tls" in hop


@dataclass(frozen=True)
class ClusterSettings:
    """``[cluster]``: what the nodes of one domain share.  ``db``: the PostgreSQL of
    the archive and the users (``db_url``), with the bounds on every wait for it."""

    db: PgUrl
    connect_timeout: int = 2
    statement_timeout_ms: int = 2000
    # DMQ between the nodes (Kamailio's dmq, dmq_usrloc, htable dmqreplicate); None:
    # this node replicates nothing.  ``peers``: the other nodes' DMQ URIs, or one DNS
    # name (``peers_dns``) whose addresses are all the nodes (dmq multi_notify).
    dmq_address: DmqUri | None = None
    peers: tuple[DmqUri, ...] = ()
    peers_dns: str | None = None
    # The domain's SIP address every node puts in Via and Record-Route and takes as
    # its own: an in-dialog request or a response reaches any node (a front, DNS or a
    # floating address decides which), not only the one that was on the path.
    advertise: str | None = None
    # The dispatcher front (``HOST:PORT``) this node sits behind, instead of a floating
    # address: the node puts it in Record-Route and takes it as its own, so every
    # in-dialog request of a dialog goes back through the front, which hands it to a
    # live node; Via stays the node's own, so responses come back to the node that
    # forwarded the request.
    front: str | None = None
    # The sync gate (kamailio_app/sync_gate.py): after a start the node answers 503
    # until it has caught up with its peers (DMQ sync) or takes them as unreachable
    # (not active after ``sync_unreachable_after`` s), and serves anyway after
    # ``sync_wait`` s; 0: no gate.  ``sync_quiet_ms``: no dump message from a peer
    # for this long ends its sync.
    sync_wait: int = 30
    sync_unreachable_after: int = 6
    sync_quiet_ms: int = 1000
    # DMQ pings each peer this often (s); a peer that misses one is taken as gone, so
    # this bounds how long a dead node is still counted as up (e2m_dmq_peers_up).
    dmq_ping_interval: int = 60

    @property
    def replicates(self) -> bool:
        return self.dmq_address is not None

    @property
    def gated(self) -> bool:
        """A node with DMQ peers waits for their state before it serves."""
        return self.replicates and self.sync_wait > 0


@dataclass(frozen=True)
class DispatcherSettings:
    """``[dispatcher]``: this proxy is a front for the nodes of a cluster (Kamailio's
    dispatcher module): every request goes to a node it picks, failing over to the
    next when one does not answer, nodes probed with OPTIONS."""

    destinations: tuple[DmqUri, ...]
    algorithm: int = 0              # dispatcher's: 0 hash over Call-ID, 4 round-robin
    probe_interval: int = 10        # seconds between OPTIONS to each node


DISPATCH_ALGORITHMS = {"hash-callid": 0, "round-robin": 4}


@dataclass(frozen=True)
class DmqUri:
    """A DMQ node address, ``sip:HOST:PORT`` (UDP)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"sip:{host}:{self.port}"


_DMQ_URI = re.compile(r"sip:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")
_ADVERTISE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?")


def parse_dmq_uri(text: str) -> DmqUri | None:
    """``sip:HOST:PORT`` as a ``DmqUri``; None when it is not one."""
    match = _DMQ_URI.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match or not 0 < int(match.group(2)) < 65536:
        return None
    host = match.group(1).strip("[]").lower()
    return DmqUri(canonical_ip(host) or host, int(match.group(2)))


@dataclass(frozen=True)
class ArchiveSettings:
    path: Path | None = None              # the SQLite archive (None: none, or shared)
    fail_request_on_error: bool = False
    busy_timeout_ms: int = 200
    shared: bool = False                  # in [cluster] db_url (PostgreSQL)
    spool: Path | None = None             # shared: this node's file for what PG missed
    spool_max: int = 10000                # messages in the spool; 0: no spool
    spool_max_mb: int = 256
    spool_share: int = 12                 # percent of both bounds one sender may hold

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.shared


@dataclass(frozen=True)
class E2MSettings:
    enabled: bool = True


@dataclass(frozen=True)
class AuthSettings:
    """``[auth]``: digest authentication against Kamailio's ``subscriber`` table.

    ``users`` is the embedded SQLite file (created with Kamailio's schema when missing);
    ``db_url`` names an operator's own database instead (then ``users`` is None)."""

    realm: str
    db_url: str                  # what Kamailio reads (a PostgreSQL one without password)
    users: Path | None = None
    table: str = "subscriber"
    nonce_expire: int = 300
    pg: PgUrl | None = None      # a PostgreSQL subscriber table ([cluster] or [auth] db_url)

    @property
    def db_module(self) -> str:
        return DB_MODULES[self.db_url.split("://", 1)[0]]


@dataclass(frozen=True)
class TlsSettings:
    """``[tls]``: the certificate served on tls: listeners and the CAs that verify
    clients (``verify_client``) and every next hop reached over TLS."""

    cert: Path
    key: Path
    ca: tuple[Path, ...]
    verify_client: bool = False
    min_version: str = "TLSv1.2"

    @property
    def method(self) -> str:
        """Kamailio's tls.cfg ``method`` for ``min_version``."""
        return TLS_MIN_VERSIONS[self.min_version]


# Each TCP or TLS connection holds its whole read buffer (tcp_max_message_kb) in
# shared memory from the moment it is accepted (Kamailio 5.6 tcpconn_new), a TLS one
# also OpenSSL's state; at most this share of shm may go to connections.
CONNECTION_SHM_SHARE = 0.5
TCP_CONNECTION_OVERHEAD_KB = 2
TLS_CONNECTION_OVERHEAD_KB = 64


def connection_cost_kb(kamailio: KamailioSettings) -> int:
    """Shared memory one connection may hold: its read buffer, plus OpenSSL's state
    when the proxy speaks TLS (counted for every connection, the worst case)."""
    extra = TLS_CONNECTION_OVERHEAD_KB if kamailio.tls_listener is not None \
        else TCP_CONNECTION_OVERHEAD_KB
    return kamailio.tcp_max_message_kb + extra


def default_max_connections(kamailio: KamailioSettings) -> int:
    """As many connections as fit in ``CONNECTION_SHM_SHARE`` of shm (at least 16)."""
    budget_kb = int(kamailio.shm_mb * 1024 * CONNECTION_SHM_SHARE)
    return max(16, budget_kb // connection_cost_kb(kamailio))


@dataclass(frozen=True)
class LimitSettings:
    """``[limits]``: what one source (or one AoR) may take.  On by default.

    ``pike_requests`` requests per ``pike_window`` seconds from one address (Kamailio's
    ``pike``; 0 switches it off); over that, the address is banned for ``ban_time``
    seconds (every request dropped, a TCP/TLS connection closed).  ``trusted``
    addresses and networks, and the proxy's own addresses, are never limited.
    ``max_contacts`` contacts per AoR (registrar); ``registrations_per_source`` AoRs one
    address may register while the registrar is open (no ``[auth]``).  Connections:
    ``tcp_max_connections`` TCP+TLS in all, ``tls_max_connections`` of them TLS (both
    by default what fits in half of shm), closed after ``tcp_idle_timeout`` idle
    seconds; one that carried no SIP message within ``tcp_first_message_timeout``
    seconds is closed whatever keep-alives it sent, and one address (not ours, not
    trusted) holds at most ``tcp_connections_per_source`` (by default a quarter of the
    table, at most 32): ``tcp_sweep.py``."""

    pike_requests: int = 30
    pike_window: int = 2
    ban_time: int = 300
    trusted: tuple[str, ...] = ()
    max_contacts: int = 10
    registrations_per_source: int = 50
    tcp_max_connections: int = 0          # 0 before parse_app_config fills it in
    tls_max_connections: int = 0
    tcp_idle_timeout: int = 120
    tcp_first_message_timeout: int = 10
    tcp_connections_per_source: int = 0   # 0 before parse_app_config fills it in


@dataclass(frozen=True)
class CertSettings:
    """``[certs]``: the RFC 6072 certificate service of our domains (docs/protocol.md
    §11).  Publications and subscriptions are kept in the SQLite file ``path``; the
    expiry bounds are seconds; a subscription gets at most one NOTIFY about changes
    per ``notify_interval``; subscriptions are bounded per AoR, per source address
    and in all, and the SUBSCRIBEs (fetches, follows and renewals) served per second
    in all (``max_subscribes_per_second``, 0: unbounded)."""

    path: Path
    min_expires: int = 60
    default_publish_expires: int = 3600
    max_publish_expires: int = 7 * 86400
    default_subscribe_expires: int = 86400
    max_subscribe_expires: int = 86400
    notify_interval: int = 60
    max_subscriptions_per_aor: int = 100
    max_subscriptions_per_source: int = 20
    max_subscriptions: int = 10000
    # each costs a server transaction and a NOTIFY's, some 15 KB of shared memory for
    # about 5 s: strangers under pike's rate from 48 addresses filled 32 MB with
    # fetches in 4 s (review 120), and with renewals of their own subscriptions (121)
    max_subscribes_per_second: int = 100


@dataclass(frozen=True)
class AppConfig:
    path: Path
    kamailio: KamailioSettings
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    e2m: E2MSettings = field(default_factory=E2MSettings)
    auth: AuthSettings | None = None        # None: the registrar is open
    tls: TlsSettings | None = None          # None: no TLS at all
    limits: LimitSettings = field(default_factory=LimitSettings)
    identity_host: str | None = None        # [identity] host: answered as ourselves
    cluster: ClusterSettings | None = None  # None: one node, SQLite (the default)
    certs: CertSettings | None = None       # None: no certificate service
    dispatcher: DispatcherSettings | None = None   # None: not a front for a cluster

    @property
    def local_names(self) -> tuple[str, ...]:
        """Host names Kamailio treats as itself: the domains, then the identity host."""
        names = list(self.kamailio.domains)
        if self.identity_host and self.identity_host not in names:
            names.append(self.identity_host)
        return tuple(names)

    @property
    def shared_schema(self) -> bool:
        """The node writes tables of its own in ``[cluster] db_url``: the shared archive,
        or the replay claims every replicating E2M node makes (review 40: a cluster with
        no [archive] had no claims table, and its nodes quietly went without them)."""
        cluster = self.cluster
        return cluster is not None and (self.archive.shared
                                        or (self.e2m.enabled and cluster.replicates))


# --------------------------------------------------------------------------


class _Checker:
    """Reads typed values out of one table and records what is wrong."""

    def __init__(self, section: str, table: Any, problems: list[str]) -> None:
        self.section = section
        self.problems = problems
        if table is None:
            table = {}
        if not isinstance(table, dict):
            problems.append(f"[{section}] must be a table")
            table = {}
        self.table: dict[str, Any] = table

    def bad(self, key: str, what: str) -> None:
        self.problems.append(f"[{self.section}] {key}: {what}")

    def unknown(self, known: tuple[str, ...]) -> None:
        # A typo (wokers = 8) would otherwise silently keep the default.
        for key in sorted(set(self.table) - set(known)):
            self.bad(key, f"unknown setting (known: {', '.join(known)})")

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(key, f"must be an integer, got {type(value).__name__}")
            return default
        if not low <= value <= high:
            self.bad(key, f"must be between {low} and {high}, got {value}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            self.bad(key, f"must be true or false, got {value!r}")
            return default
        return value

    def string(self, key: str, default: str | None) -> str | None:
        value = self.table.get(key, default)
        if value is not None and not isinstance(value, str):
            self.bad(key, f"must be a string, got {type(value).__name__}")
            return default
        return value

    def path(self, key: str, base: Path) -> Path | None:
        raw = self.string(key, None)
        if raw is None:
            return None
        if not raw.strip():
            self.bad(key, "must not be empty")
            return None
        return Path(raw) if Path(raw).is_absolute() else (base / raw).resolve()

    def paths(self, key: str, base: Path) -> tuple[Path, ...] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            self.bad(key, "must be a list of file names")
            return None
        return tuple(Path(v) if Path(v).is_absolute() else (base / v).resolve() for v in value)


def _listener(text: Any, index: int, check: _Checker) -> Listener | None:
    where = f"listen[{index}]"
    if not isinstance(text, str):
        check.bad(where, "must be a string like \"udp:127.0.0.1:5070\"")
        return None
    proto, _, rest = text.partition(":")
    host, colon, port_text = rest.rpartition(":")
    if proto.lower() not in _PROTOS:
        check.bad(where, f"{text!r}: protocol must be one of {', '.join(_PROTOS)}")
        return None
    if not colon or not port_text.isascii() or not port_text.isdigit():
        check.bad(where, f"{text!r}: needs proto:host:port")
        return None
    port = int(port_text)
    if not 1 <= port <= 65535:
        check.bad(where, f"{text!r}: port out of range")
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # A listen address must be local; names need DNS, which the cfg switches off.
        check.bad(where, f"{text!r}: host must be an IP address")
        return None
    return Listener(proto.lower(), str(address), port)


def _kamailio(table: Any, base: Path, problems: list[str]) -> KamailioSettings | None:
    check = _Checker("kamailio", table, problems)
    if table is None:
        problems.append("[kamailio] section is missing (it needs at least listen = [...])")
        return None
    check.unknown(("listen", "workers", "shm_mb", "pkg_mb", "shm_allocator", "next_hop", "log_level",
                   "domains", "cert_path", "keycache_size", "keycache_expire", "binary",
                   "module_path", "tcp_max_message_kb", "kemi_script"))
    raw_listen = check.table.get("listen")
    listeners: list[Listener] = []
    if not isinstance(raw_listen, list) or not raw_listen:
        check.bad("listen", "must be a non-empty list like [\"udp:127.0.0.1:5070\"]")
    else:
        for i, item in enumerate(raw_listen):
            got = _listener(item, i, check)
            if got is not None:
                if got in listeners:
                    check.bad(f"listen[{i}]", f"{got} is listed twice")
                listeners.append(got)
    workers = check.integer("workers", 4, 1, 64)
    shm = check.integer("shm_mb", 256, 32, 65536)
    pkg = check.integer("pkg_mb", 16, 8, 1024)
    allocator = check.string("shm_allocator", "tlsf") or "tlsf"
    if allocator not in SHM_ALLOCATORS:
        check.bad("shm_allocator", f"{allocator!r} is not one of {', '.join(SHM_ALLOCATORS)}")
        allocator = "tlsf"
    next_hop = check.string("next_hop", None)
    if next_hop is not None and not _is_sip_uri(next_hop):
        check.bad("next_hop", f"{next_hop!r} is not a sip: or sips: URI")
        next_hop = None
    level = _log_level(check)
    domains = _domains(check)
    cert_path = check.string("cert_path", "/e2m/cert.der") or "/e2m/cert.der"
    if not _HTTP_PATH.fullmatch(cert_path):
        check.bad("cert_path", f"{cert_path!r} must be an absolute URL path of safe characters")
    ks = check.integer("keycache_size", 10, 4, 20)
    ke = check.integer("keycache_expire", 43200, 10, 7 * 86400)
    tcp_kb = check.integer("tcp_max_message_kb", 320, 16, 16 * 1024)
    binary = check.string("binary", "/usr/sbin/kamailio") or "/usr/sbin/kamailio"
    mpath = check.string("module_path", KamailioSettings.module_path) or KamailioSettings.module_path
    script = _kemi_script(check, base)
    if not listeners:
        return None
    return KamailioSettings(listen=tuple(listeners), workers=workers, shm_mb=shm, pkg_mb=pkg,
                            shm_allocator=allocator, next_hop=next_hop, log_level=level, domains=domains,
                            cert_path=cert_path, keycache_size=ks, keycache_expire=ke,
                            tcp_max_message_kb=tcp_kb,
                            binary=binary, module_path=mpath, kemi_script=script)


def _kemi_script(check: _Checker, base: Path) -> Path | None:
    raw = check.string("kemi_script", None)
    if raw is None:
        return None
    path = (base / raw).resolve()
    if path.suffix != ".py" or not path.is_file():
        check.bad("kemi_script", f"{str(path)!r} is not an existing Python file (.py)")
        return None
    return path


def _log_level(check: _Checker) -> int:
    value = check.table.get("log_level", 2)
    if isinstance(value, str) and value.lower() in LOG_LEVELS:
        return LOG_LEVELS[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and -5 <= value <= 3:
        return value
    check.bad("log_level", f"must be one of {', '.join(sorted(LOG_LEVELS))} or -5..3, got {value!r}")
    return 2


def _domains(check: _Checker) -> tuple[str, ...]:
    value = check.table.get("domains", [])
    if not isinstance(value, list):
        check.bad("domains", "must be a list of host names")
        return ()
    out = []
    for item in value:
        if not isinstance(item, str) or not _DOMAIN.fullmatch(item):
            check.bad("domains", f"{item!r} is not a host name")
        else:
            out.append(item.lower())
    return tuple(out)


def _cluster(table: Any, problems: list[str]) -> ClusterSettings | None:
    if table is None:
        return None
    check = _Checker("cluster", table, problems)
    check.unknown(("db_url", "db_connect_timeout", "db_statement_timeout_ms", "dmq_address",
                   "peers", "advertise", "front", "sync_wait", "sync_unreachable_after",
                   "sync_quiet_ms", "dmq_ping_interval"))
    connect_timeout = check.integer("db_connect_timeout", 2, 2, 30)
    statement_ms = check.integer("db_statement_timeout_ms", 2000, 100, 60000)
    dmq = _cluster_dmq(check)
    dmq.update(_cluster_sync(check))
    # DMQ's own floor is 5 s; every ping is a KDMQ request to each peer
    dmq["dmq_ping_interval"] = check.integer("dmq_ping_interval", 60, 5, 3600)
    raw = check.string("db_url", None)
    if raw is None:
        check.bad("db_url", "is needed: postgres://user:password@host:port/database")
        return None
    try:
        url = PgUrl.parse(raw)
    except PgUrlError as exc:
        check.bad("db_url", str(exc))
        return None
    return ClusterSettings(db=url, connect_timeout=connect_timeout,
                           statement_timeout_ms=statement_ms, **dmq)


def _cluster_sync(check: _Checker) -> dict[str, Any]:
    """The sync gate's bounds: ``sync_wait`` 0 (no gate) or at least
    ``sync_unreachable_after`` (DMQ's notification of a peer times out after 5 s)."""
    wait = check.integer("sync_wait", 30, 0, 600)
    unreachable = check.integer("sync_unreachable_after", 6, 1, 600)
    quiet = check.integer("sync_quiet_ms", 1000, 100, 10000)
    if wait and unreachable > wait:
        check.bad("sync_unreachable_after", f"({unreachable} s) is more than sync_wait "
                                            f"({wait} s): the wait would end first")
    return {"sync_wait": wait, "sync_unreachable_after": unreachable, "sync_quiet_ms": quiet}


def _cluster_dmq(check: _Checker) -> dict[str, Any]:
    """``dmq_address``, ``peers``, ``advertise`` and ``front`` of ``[cluster]`` (all
    optional, but the others only with a dmq_address; advertise or front, not both)."""
    out: dict[str, Any] = {}
    raw = check.string("dmq_address", None)
    if raw is not None:
        address = parse_dmq_uri(raw)
        if address is None:
            check.bad("dmq_address", f"{raw!r} is not sip:HOST:PORT (this node's DMQ socket)")
        else:
            out["dmq_address"] = address
    peers = check.table.get("peers")
    if isinstance(peers, str):
        if _DOMAIN.fullmatch(peers.strip()):
            out["peers_dns"] = peers.strip().lower()
        else:
            check.bad("peers", f"{peers!r} is not a DNS name (or give a list of sip:HOST:PORT)")
    elif isinstance(peers, list):
        parsed = [parse_dmq_uri(item) if isinstance(item, str) else None for item in peers]
        if not peers or None in parsed:
            check.bad("peers", "must be a non-empty list of sip:HOST:PORT (the other nodes' "
                               "dmq_address)")
        elif out.get("dmq_address") in parsed:
            check.bad("peers", "lists this node's own dmq_address")
        else:
            out["peers"] = tuple(dict.fromkeys(parsed))
    elif peers is not None:
        check.bad("peers", "must be a list of sip:HOST:PORT or a DNS name")
    advertise = check.string("advertise", None)
    if advertise is not None:
        match = _ADVERTISE.fullmatch(advertise.strip())
        if not match or (match.group(2) and not 0 < int(match.group(2)) < 65536):
            check.bad("advertise", f"{advertise!r} is not HOST[:PORT]")
        else:
            out["advertise"] = advertise.strip().lower()
    front = check.string("front", None)
    if front is not None:
        match = _ADVERTISE.fullmatch(front.strip())
        if not match or not match.group(2) or not 0 < int(match.group(2)) < 65536:
            check.bad("front", f"{front!r} is not HOST:PORT (the dispatcher front's SIP address)")
        elif advertise is not None:
            check.bad("front", "and advertise exclude each other: a floating address or a "
                               "front carries the dialogs, not both")
        else:
            out["front"] = front.strip().lower()
    if "dmq_address" in out and not (out.get("peers") or out.get("peers_dns")):
        check.bad("peers", "is needed with dmq_address: the other nodes (a list or a DNS name)")
    if "dmq_address" not in out and raw is None and (peers is not None or advertise or front):
        check.bad("dmq_address", "is needed with peers, advertise and front (this node's DMQ "
                                 "socket)")
    return out


def _archive(table: Any, base: Path, problems: list[str],
             cluster: ClusterSettings | None = None) -> ArchiveSettings:
    check = _Checker("archive", table, problems)
    check.unknown(("path", "fail_request_on_error", "busy_timeout_ms", "spool", "spool_max",
                   "spool_max_mb", "spool_share"))
    shared = cluster is not None and table is not None
    spool, spool_max, spool_mb, spool_share = None, 10000, 256, 12
    if shared:
        if "path" in check.table:
            check.bad("path", "with [cluster] db_url the archive is in PostgreSQL; leave path "
                              "out (spool names this node's file for what it could not take)")
        spool = check.path("spool", base) or (base / "archive-spool.sqlite").resolve()
        if not spool.parent.is_dir():
            check.bad("spool", f"directory {spool.parent} does not exist")
        spool_max = check.integer("spool_max", 10000, 0, 10_000_000)
        spool_mb = check.integer("spool_max_mb", 256, 1, 1024 * 1024)
        spool_share = check.integer("spool_share", 12, 1, 100)
    else:
        for key in ("spool", "spool_max", "spool_max_mb", "spool_share"):
            if key in check.table:
                check.bad(key, "is used only with [cluster] db_url (the shared archive)")
    raw = check.string("path", None) if not shared else None
    path = None
    if raw is not None:
        if not raw.strip():
            check.bad("path", "must not be empty (leave it out to disable the archive)")
        else:
            path = (base / raw).resolve() if not Path(raw).is_absolute() else Path(raw)
            if not path.parent.is_dir():
                check.bad("path", f"directory {path.parent} does not exist")
    fail = check.boolean("fail_request_on_error", False)
    busy = check.integer("busy_timeout_ms", 200, 0, 5000)
    return ArchiveSettings(path=path, fail_request_on_error=fail, busy_timeout_ms=busy,
                           shared=shared, spool=spool, spool_max=spool_max,
                           spool_max_mb=spool_mb, spool_share=spool_share)


def _e2m(table: Any, problems: list[str]) -> E2MSettings:
    check = _Checker("e2m", table, problems)
    check.unknown(("enabled",))
    return E2MSettings(enabled=check.boolean("enabled", True))


def _cfg_safe(check: _Checker, key: str, value: str) -> bool:
    # Rendered inside "..." in the cfg (and tls.cfg): no quote, backslash or line break.
    if any(ch in value for ch in '"\\\n\r#'):
        check.bad(key, f"{value!r} must not contain quotes, backslashes, '#' or line breaks")
        return False
    return True


def _auth(data: dict[str, Any], kamailio: KamailioSettings | None, base: Path,
          problems: list[str], cluster: ClusterSettings | None = None) -> AuthSettings | None:
    if "auth" not in data:
        return None
    check = _Checker("auth", data["auth"], problems)
    check.unknown(("users", "realm", "db_url", "table", "nonce_expire"))
    domains = kamailio.domains if kamailio is not None else ()
    realm = check.string("realm", domains[0] if domains else None)
    if realm is None:
        check.bad("realm", "is needed when [kamailio] domains is empty")
        realm = ""
    elif not _DOMAIN.fullmatch(realm):
        check.bad("realm", f"{realm!r} must be a host name like the SIP domain")
    table = check.string("table", "subscriber") or "subscriber"
    if not _DB_NAME.fullmatch(table):
        check.bad("table", f"{table!r} is not a table name")
    expire = check.integer("nonce_expire", 300, 1, 3600)
    db_url = check.string("db_url", None)
    users: Path | None = None
    pg: PgUrl | None = None
    if db_url is None and cluster is not None:
        if "users" in check.table:
            check.bad("users", "with [cluster] db_url the users are in PostgreSQL (the "
                               "subscriber table there); leave users out")
        pg, db_url = cluster.db, cluster.db.kamailio_url()
    elif db_url is not None:
        if "users" in check.table:
            check.bad("db_url", "give either users (an SQLite file) or db_url, not both")
        match = _DB_URL.fullmatch(db_url)
        if match is None or match.group("scheme") not in DB_MODULES:
            check.bad("db_url", f"must be <scheme>://... with a scheme of "
                                f"{', '.join(sorted(DB_MODULES))}")
            db_url = None
        elif match.group("scheme") == "postgres":
            # the password goes to a passfile, never into the rendered cfg
            try:
                pg = PgUrl.parse(db_url)
                db_url = pg.kamailio_url()
            except PgUrlError as exc:
                check.bad("db_url", str(exc))
                db_url = None
    else:
        users = check.path("users", base) or (base / "users.sqlite").resolve()
        if not users.parent.is_dir():
            check.bad("users", f"directory {users.parent} does not exist")
        elif _cfg_safe(check, "users", str(users)):
            # db_sqlite reads sqlite://<host>/<file>: an absolute file needs a fourth slash
            db_url = f"sqlite:///{users}"
    if db_url is None:
        return None
    return AuthSettings(realm=realm, db_url=db_url, users=users, table=table,
                        nonce_expire=expire, pg=pg)


def _table_paths(data: dict[str, Any], section: str, key: str, base: Path) -> list[Path]:
    """File names another section gives (as the core reads them), for [tls] defaults."""
    table = data.get(section)
    value = table.get(key) if isinstance(table, dict) else None
    values = value if isinstance(value, list) else [value]
    return [Path(v) if Path(v).is_absolute() else (base / v).resolve()
            for v in values if isinstance(v, str) and v.strip()]


def _tls_key_usable(check: _Checker, cert: Path) -> None:
    """A key that cannot sign (X25519, the core's key-agreement certificates) cannot
    serve TLS: say so instead of letting Kamailio fail at start."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import x448, x25519
        loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError) as exc:
        check.bad("cert", f"{cert} is not a PEM certificate ({exc})")
        return
    if isinstance(loaded.public_key(), (x25519.X25519PublicKey, x448.X448PublicKey)):
        check.bad("cert", f"{cert} holds a key-agreement key (X25519/X448), which cannot "
                          "serve TLS; issue a TLS certificate (e2m pki init --tls) and name it")


def _tls(data: dict[str, Any], kamailio: KamailioSettings | None, base: Path,
         problems: list[str]) -> TlsSettings | None:
    used = kamailio is not None and (kamailio.tls_listener is not None or kamailio.next_hop_tls)
    if "tls" not in data and not used:
        return None
    check = _Checker("tls", data.get("tls"), problems)
    check.unknown(("cert", "key", "ca", "verify_client", "min_version"))
    if kamailio is not None and kamailio.next_hop_tls and kamailio.tls_listener is None:
        problems.append("[kamailio] next_hop is reached over TLS: listen needs a tls: socket "
                        "(Kamailio sends TLS from one)")
    elif kamailio is not None and kamailio.tls_listener is None:
        problems.append("[tls] is set but [kamailio] listen has no tls: socket")
    cert = check.path("cert", base)
    key = check.path("key", base)
    if cert is None and key is None:
        identity = (_table_paths(data, "identity", "cert", base),
                    _table_paths(data, "identity", "key", base))
        if identity[0] and identity[1]:
            cert, key = identity[0][0], identity[1][0]
    if cert is None or key is None:
        check.bad("cert", "cert and key are needed (default: [identity] cert and key)")
    ca = check.paths("ca", base)
    if ca is None:
        ca = tuple(_table_paths(data, "trust", "ca", base)) or None
    if not ca:
        check.bad("ca", "needs the CA files that verify clients and next hops "
                        "(default: [trust] ca)")
    for what, file in (("cert", cert), ("key", key), *(("ca", c) for c in ca or ())):
        if file is not None and not file.is_file():
            check.bad(what, f"{file} does not exist")
        elif file is not None:
            _cfg_safe(check, what, str(file))
    if cert is not None and cert.is_file():
        _tls_key_usable(check, cert)
    if key is not None and key.is_file():
        try:
            check_private_file(key, "TLS key")     # Kamailio reads it as it is
        except PrivateFileError as exc:
            check.bad("key", str(exc))
    verify = check.boolean("verify_client", False)
    version = check.string("min_version", "TLSv1.2") or "TLSv1.2"
    if version not in TLS_MIN_VERSIONS:
        check.bad("min_version", f"{version!r}: Kamailio 5.6 offers {', '.join(TLS_MIN_VERSIONS)} "
                                 "(TLS 1.0 and 1.1 are never accepted)")
        version = "TLSv1.2"
    if cert is None or key is None or not ca:
        return None
    return TlsSettings(cert=cert, key=key, ca=tuple(ca), verify_client=verify,
                       min_version=version)


def _networks(check: _Checker) -> tuple[str, ...]:
    value = check.table.get("trusted", [])
    if not isinstance(value, list):
        check.bad("trusted", "must be a list of addresses or networks like \"192.0.2.0/24\"")
        return ()
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except (TypeError, ValueError):
            check.bad("trusted", f"{item!r} is not an IP address or network")
    return tuple(out)


def _limits(table: Any, kamailio: KamailioSettings | None, problems: list[str]) -> LimitSettings:
    check = _Checker("limits", table, problems)
    check.unknown(("pike_requests", "pike_window", "ban_time", "trusted", "max_contacts",
                   "registrations_per_source", "tcp_max_connections", "tls_max_connections",
                   "tcp_idle_timeout", "tcp_first_message_timeout",
                   "tcp_connections_per_source"))
    d = LimitSettings()
    fits = default_max_connections(kamailio) if kamailio is not None else 16
    tcp_max = check.integer("tcp_max_connections", fits, 1, 65535)
    if kamailio is not None and "tcp_max_connections" in check.table:
        ceiling = int(kamailio.shm_mb * 1024 * 0.9) // connection_cost_kb(kamailio)
        if tcp_max > ceiling:
            check.bad("tcp_max_connections",
                      f"{tcp_max} connections of up to {connection_cost_kb(kamailio)} KiB each "
                      f"(tcp_max_message_kb plus overhead) would take all of shm_mb = "
                      f"{kamailio.shm_mb}; at most {ceiling} (or raise shm_mb, or lower "
                      "tcp_max_message_kb)")
            tcp_max = min(fits, ceiling)
    tls_max = check.integer("tls_max_connections", tcp_max, 1, 65535)
    idle = check.integer("tcp_idle_timeout", d.tcp_idle_timeout, 5, 86400)
    first = check.integer("tcp_first_message_timeout", min(d.tcp_first_message_timeout, idle),
                          1, idle)
    per_source = check.integer("tcp_connections_per_source",
                               min(32, max(1, tcp_max // 4)), 1, tcp_max)
    return LimitSettings(
        pike_requests=check.integer("pike_requests", d.pike_requests, 0, 1_000_000),
        pike_window=check.integer("pike_window", d.pike_window, 1, 300),
        ban_time=check.integer("ban_time", d.ban_time, 1, 7 * 86400),
        trusted=_networks(check),
        max_contacts=check.integer("max_contacts", d.max_contacts, 0, 10_000),
        registrations_per_source=check.integer("registrations_per_source",
                                               d.registrations_per_source, 0, 10_000_000),
        tcp_max_connections=tcp_max, tls_max_connections=min(tls_max, tcp_max),
        tcp_idle_timeout=idle, tcp_first_message_timeout=first,
        tcp_connections_per_source=per_source)


_CERT_KEYS = ("enabled", "path", "min_expires", "default_publish_expires",
              "max_publish_expires", "default_subscribe_expires", "max_subscribe_expires",
              "notify_interval", "max_subscriptions_per_aor", "max_subscriptions_per_source",
              "max_subscriptions", "max_subscribes_per_second")


def _certs(table: Any, e2m: E2MSettings, base: Path, problems: list[str]) -> CertSettings | None:
    """On by default where E2M is (the checks on a published certificate need the
    core's [trust] ca); off on a plain routing hop."""
    check = _Checker("certs", table, problems)
    check.unknown(_CERT_KEYS)
    if not check.boolean("enabled", e2m.enabled):
        return None
    if not e2m.enabled:
        check.bad("enabled", "the certificate service needs [e2m] enabled (its [trust] ca "
                             "checks what is published)")
        return None
    path = check.path("path", base) or (base / "certs.sqlite").resolve()
    if not path.parent.is_dir():
        check.bad("path", f"directory {path.parent} does not exist")
    d = CertSettings(path=path)
    minimum = check.integer("min_expires", d.min_expires, 1, 3600)
    max_publish = check.integer("max_publish_expires", d.max_publish_expires, minimum,
                                366 * 86400)
    max_subscribe = check.integer("max_subscribe_expires", d.max_subscribe_expires, minimum,
                                  30 * 86400)
    return CertSettings(
        path=path, min_expires=minimum, max_publish_expires=max_publish,
        default_publish_expires=check.integer(
            "default_publish_expires", min(d.default_publish_expires, max_publish), minimum,
            max_publish),
        max_subscribe_expires=max_subscribe,
        default_subscribe_expires=check.integer(
            "default_subscribe_expires", min(d.default_subscribe_expires, max_subscribe),
            minimum, max_subscribe),
        notify_interval=check.integer("notify_interval", d.notify_interval, 1, 3600),
        max_subscriptions_per_aor=check.integer("max_subscriptions_per_aor",
                                                d.max_subscriptions_per_aor, 1, 100_000),
        max_subscriptions_per_source=check.integer("max_subscriptions_per_source",
                                                   d.max_subscriptions_per_source, 1, 100_000),
        max_subscriptions=check.integer("max_subscriptions", d.max_subscriptions, 1,
                                        10_000_000),
        max_subscribes_per_second=check.integer(
            "max_subscribes_per_second", d.max_subscribes_per_second, 0,
            1_000_000))


def _identity_host(data: dict[str, Any]) -> str | None:
    table = data.get("identity")
    host = table.get("host") if isinstance(table, dict) else None
    # The core checks [identity] host itself; here only a usable name is taken over.
    if isinstance(host, str) and _DOMAIN.fullmatch(host.strip()):
        return host.strip().lower()
    return None


_WILDCARDS = ("0.0.0.0", "::", "*")


def _dmq_socket_of_its_own(kamailio: KamailioSettings, cluster: ClusterSettings,
                           problems: list[str]) -> None:
    """KDMQ is told from SIP by the socket it arrives on (``ProxyApp.dmq_accepts``), so
    the DMQ socket must be one no SIP listener serves: a shared one would take a
    stranger's forged UDP KDMQ sent to the SIP port (review 42)."""
    dmq = cluster.dmq_address
    if dmq is None:
        return
    host = canonical_ip(dmq.host)
    if not host:
        # as a listen address: names need DNS, which the cfg switches off, and one
        # spelling is what tells the socket from the SIP listeners (review 44)
        problems.append(f"[cluster] dmq_address: {dmq} must name an IP address (this "
                        "node's DMQ socket)")
        return
    if host in _WILDCARDS:
        problems.append(f"[cluster] dmq_address: {dmq} is a wildcard; give the one address "
                        "of this node's DMQ socket on the nodes' own network")
        return
    for item in kamailio.listen:
        if item.proto == "udp" and item.port == dmq.port and item.host in (host, *_WILDCARDS):
            problems.append(f"[cluster] dmq_address: {dmq} is also served by [kamailio] listen "
                            f"{item}; DMQ needs a socket of its own (another port), reached "
                            "by the nodes alone")


def parse_app_config(data: dict[str, Any], path: str | Path) -> AppConfig:
    """Validate an already-parsed TOML document; ``path`` anchors relative paths."""
    path = Path(path).resolve()
    problems: list[str] = []
    kamailio = _kamailio(data.get("kamailio"), path.parent, problems)
    cluster = _cluster(data.get("cluster"), problems)
    archive = _archive(data.get("archive"), path.parent, problems, cluster)
    e2m = _e2m(data.get("e2m"), problems)
    auth = _auth(data, kamailio, path.parent, problems, cluster)
    tls = _tls(data, kamailio, path.parent, problems)
    limits = _limits(data.get("limits"), kamailio, problems)
    certs = _certs(data.get("certs"), e2m, path.parent, problems)
    dispatcher = _dispatcher(data.get("dispatcher"), problems)
    if kamailio is not None and cluster is not None:
        _dmq_socket_of_its_own(kamailio, cluster, problems)
    if dispatcher is not None and (e2m.enabled or (kamailio and kamailio.next_hop)):
        problems.append("[dispatcher]: a front routes only ([e2m] enabled = false, no "
                        "[kamailio] next_hop): the nodes behind it read the bodies")
    if problems or kamailio is None:
        raise AppConfigError(path, problems or ["[kamailio] is unusable"])
    return AppConfig(path=path, kamailio=kamailio, archive=archive, e2m=e2m, auth=auth,
                     tls=tls, limits=limits, identity_host=_identity_host(data),
                     cluster=cluster, certs=certs, dispatcher=dispatcher)


def _dispatcher(table: Any, problems: list[str]) -> DispatcherSettings | None:
    if table is None:
        return None
    check = _Checker("dispatcher", table, problems)
    check.unknown(("destinations", "algorithm", "probe_interval"))
    raw = check.table.get("destinations")
    parsed = [parse_dmq_uri(item) if isinstance(item, str) else None
              for item in (raw if isinstance(raw, list) else [])]
    if not parsed or None in parsed:
        check.bad("destinations", "must be a non-empty list of sip:HOST:PORT (the nodes)")
        return None
    name = check.string("algorithm", "hash-callid")
    if name not in DISPATCH_ALGORITHMS:
        check.bad("algorithm", f"must be one of {', '.join(DISPATCH_ALGORITHMS)}, got {name!r}")
        name = "hash-callid"
    return DispatcherSettings(destinations=tuple(dict.fromkeys(parsed)),
                              algorithm=DISPATCH_ALGORITHMS[name],
                              probe_interval=check.integer("probe_interval", 10, 1, 3600))


def load_app_config(path: str | Path) -> AppConfig:
    """Read and validate PROXY.toml's Kamailio sections; ``AppConfigError`` lists every mistake."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise AppConfigError(path, [f"cannot read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise AppConfigError(path, [f"not valid TOML: {exc}"]) from None
    config = parse_app_config(data, path)
    urls = (config.cluster.db if config.cluster else None,
            config.auth.pg if config.auth else None)
    if any(url is not None and url.password for url in urls):
        # that password opens every archived plaintext and the users' HA1s (review 73)
        try:
            check_private_file(path, "PROXY.toml, which holds a database password,")
        except PrivateFileError as exc:
            raise AppConfigError(path, [str(exc)]) from None
    return config
