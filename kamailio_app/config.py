"""The Kamailio side of PROXY.toml: ``[kamailio]``, ``[archive]`` and ``[e2m]``.

The file is shared with the core: ``[identity]``, ``[trust]`` and ``[policy]``
belong to ``e2m_plugins.config.load_proxy_config``, which is called only when
E2M is enabled (an untrusted routing hop has no identity).  Sections this
module does not know are left alone so the two loaders can grow apart.

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
from e2m_plugins.uri import parse_uri

__all__ = [
    "AppConfig", "AppConfigError", "ArchiveSettings", "E2MSettings", "KamailioSettings",
    "Listener", "load_app_config", "parse_app_config", "LOG_LEVELS",
]

# Kamailio's numeric debug levels, by the names operators use.
LOG_LEVELS = {"alert": -5, "bug": -4, "crit": -3, "err": -1, "error": -1, "warn": 0,
              "warning": 0, "notice": 1, "info": 2, "debug": 3, "dbg": 3}

_PROTOS = ("udp", "tcp")
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


@dataclass(frozen=True)
class ArchiveSettings:
    path: Path | None = None              # None: no archive
    fail_request_on_error: bool = False
    busy_timeout_ms: int = 200


@dataclass(frozen=True)
class E2MSettings:
    enabled: bool = True


@dataclass(frozen=True)
class AppConfig:
    path: Path
    kamailio: KamailioSettings
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    e2m: E2MSettings = field(default_factory=E2MSettings)


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
    check.unknown(("listen", "workers", "shm_mb", "pkg_mb", "next_hop", "log_level",
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
                            next_hop=next_hop, log_level=level, domains=domains,
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


def _archive(table: Any, base: Path, problems: list[str]) -> ArchiveSettings:
    check = _Checker("archive", table, problems)
    check.unknown(("path", "fail_request_on_error", "busy_timeout_ms"))
    raw = check.string("path", None)
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
    return ArchiveSettings(path=path, fail_request_on_error=fail, busy_timeout_ms=busy)


def _e2m(table: Any, problems: list[str]) -> E2MSettings:
    check = _Checker("e2m", table, problems)
    check.unknown(("enabled",))
    return E2MSettings(enabled=check.boolean("enabled", True))


def parse_app_config(data: dict[str, Any], path: str | Path) -> AppConfig:
    """Validate an already-parsed TOML document; ``path`` anchors relative paths."""
    path = Path(path).resolve()
    problems: list[str] = []
    kamailio = _kamailio(data.get("kamailio"), path.parent, problems)
    archive = _archive(data.get("archive"), path.parent, problems)
    e2m = _e2m(data.get("e2m"), problems)
    if problems or kamailio is None:
        raise AppConfigError(path, problems or ["[kamailio] is unusable"])
    return AppConfig(path=path, kamailio=kamailio, archive=archive, e2m=e2m)


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
    return parse_app_config(data, path)
