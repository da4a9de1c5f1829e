"""``e2m-proxy --config PROXY.toml``: render a Kamailio cfg and run Kamailio in the foreground.

Each instance gets a private runtime dir (cfg, ctl socket, JSON-RPC FIFO, pid file), so
several proxies run side by side on one host.  The embedded Python finds this project
and the venv's packages through defines in the rendered cfg (read by ``kemi.py``) and
``PYTHONPATH``.  SIGTERM or SIGINT to the launcher is passed on to Kamailio, which then
stops its workers; the launcher waits for it and removes what it created.

Exit status: Kamailio's own, 2 for an unusable configuration.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import threading
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from types import FrameType
from typing import Any

from e2m_plugins.cli.terminal import guard_terminal

from .config import DEFAULT_EXPIRES, MAX_EXPIRES, MIN_EXPIRES  # the registrar's
from .config import (AppConfig, AppConfigError, ClusterSettings, DispatcherSettings,
                     TlsSettings, load_app_config)
from .pgconn import SEARCH_PATH_OPTION, passfile_text
from .users import UsersError, ensure_users_db

__all__ = ["render_cfg", "write_runtime_files", "tls_cfg_text", "trusted_list_text",
           "python_path", "kamailio_command", "check_config", "main", "LogCutter",
           "TEMPLATE", "KEMI_SCRIPT", "OPEN_REGISTRAR_WARNING", "mask_passwords", "ds_list_text"]

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
TEMPLATE = PACKAGE_DIR / "templates" / "kamailio.cfg.tmpl"
KEMI_SCRIPT = PACKAGE_DIR / "kemi.py"
STOP_TIMEOUT = 10.0  # seconds Kamailio gets to stop before it is killed
STRAGGLER_AFTER = 1.0  # seconds before a child still running is sent SIGTERM again
AUTH_SECRET_FILE = "auth-secret.cfg"   # the digest nonce secret, 0600 in the runtime dir
REPLAY_AUTOEXPIRE = 86400 + 33  # [policy] replay_window is at most 86400 s


def python_path() -> list[str]:
    """Directories the embedded interpreter needs first on sys.path.

    The project root (an editable install is found through a .pth finder, which
    PYTHONPATH entries do not run) and this interpreter's site-packages, which must
    come before Debian's dist-packages so the venv's cryptography wins.
    """
    paths = [str(PROJECT_ROOT)]
    for key in ("purelib", "platlib"):
        site = sysconfig.get_paths()[key]
        if site not in paths and os.path.isdir(site):
            paths.append(site)
    return paths


def _cfg_string(value: str, what: str) -> str:
    # Rendered inside "..." in the cfg: a quote or newline would break (or inject) syntax.
    if any(ch in value for ch in '"\n\r\\'):
        raise AppConfigError(what, [f"{what} {value!r} contains a quote, backslash or newline"])
    return value


def render_cfg(config: AppConfig, runtime_dir: Path, template: Path = TEMPLATE) -> str:
    """The Kamailio cfg text for ``config`` with its runtime files under ``runtime_dir``
    (``write_runtime_files`` writes the ones besides the cfg)."""
    k, limits, auth = config.kamailio, config.limits, config.auth
    defines = []
    if k.http_listener is not None and config.e2m.enabled:
        defines.append("#!define WITH_HTTP")
    if config.e2m.enabled:
        defines.append("#!define WITH_E2M")
    if config.tls is not None:
        defines.append("#!define WITH_TLS")
    if auth is not None:
        defines.append("#!define WITH_AUTH")
    if limits.pike_requests > 0:
        defines.append("#!define WITH_PIKE")
    if limits.trusted:
        defines.append("#!define WITH_TRUSTED")
    if auth is not None and auth.pg is not None:
        defines.append("#!define WITH_POSTGRES")
    if config.e2m.enabled and config.archive.shared:
        defines.append("#!define WITH_SHARED_ARCHIVE")
    if config.certs is not None:
        defines.append("#!define WITH_CERTS")
    cluster = config.cluster if config.cluster is not None and config.cluster.replicates \
        else None
    if cluster is not None:
        defines.append("#!define WITH_DMQ")
        if config.e2m.enabled:
            defines.append("#!define WITH_REPLAY_CLAIMS")
        if cluster.gated:
            defines.append("#!define WITH_SYNC_GATE")
    if config.dispatcher is not None:
        defines.append("#!define WITH_DISPATCHER")
    values = {
        "CONFIG_PATH": _cfg_string(str(config.path), "config path"),
        "PYTHONPATH": _cfg_string(os.pathsep.join(python_path()), "python path"),
        "RUNTIME_DIR": _cfg_string(str(runtime_dir), "runtime dir"),
        "KEMI_SCRIPT": _cfg_string(str(k.kemi_script or KEMI_SCRIPT), "KEMI script"),
        "MODULE_PATH": _cfg_string(k.module_path, "module path"),
        "FEATURE_DEFINES": "\n".join(defines),
        "LOG_LEVEL": str(k.log_level),
        "LISTEN_LINES": "\n".join(_listen_lines(config)),
        "OWN_SIP_PORTS_TEST": " || ".join(f"to_port=={port}" for port in
                                          sorted({item.port for item in config.kamailio.listen})),
        # the domains and the [identity] host: a request for either is for us; in a
        # cluster the domain's advertised address or its front too (in Route, any
        # node takes it as its own)
        "ALIAS_LINES": "\n".join(f"alias={name}" for name in config.local_names
                                 + _cluster_aliases(cluster)),
        "KEYCACHE_SIZE": str(k.keycache_size),
        "KEYCACHE_EXPIRE": str(k.keycache_expire),
        # the longest replay window PROXY.toml may set, plus a transaction's lifetime;
        # each item carries its own, shorter expiry (kamailio_app/replay_htable.py)
        "REPLAY_EXPIRE": str(REPLAY_AUTOEXPIRE),
        "TCP_READ_BUFFER": str(k.tcp_max_message_kb * 1024),
        "TCP_MAX_CONNECTIONS": str(limits.tcp_max_connections),
        "TLS_MAX_CONNECTIONS": str(limits.tls_max_connections),
        "TCP_IDLE_TIMEOUT": str(limits.tcp_idle_timeout),
        # queued TCP writes in all (slow or stalled readers): Kamailio's 10 MiB, less
        # on a small shm
        "TCP_WQ_MAX": str(min(10 * 1024 * 1024, k.shm_mb * 1024 * 1024 // 16)),
        "MAX_EXPIRES": str(MAX_EXPIRES),
        "DEFAULT_EXPIRES": str(DEFAULT_EXPIRES),
        "MIN_EXPIRES": str(MIN_EXPIRES),
        "MAX_CONTACTS": str(limits.max_contacts),
        "PIKE_WINDOW": str(limits.pike_window),
        "PIKE_REQUESTS": str(limits.pike_requests),
        "PIKE_REMOVE_LATENCY": str(2 * limits.pike_window),
        "BAN_TIME": str(limits.ban_time),
        "AUTH_DB_MODULE": auth.db_module if auth is not None else "db_sqlite",
        "AUTH_DB_URL": _cfg_string(auth.db_url, "[auth] db_url") if auth is not None else "",
        "NONCE_EXPIRE": str(auth.nonce_expire if auth is not None else 300),
        "AUTH_SECRET_FILE": _cfg_string(str(runtime_dir / AUTH_SECRET_FILE), "runtime dir"),
        "DB_CONNECT_TIMEOUT": str(config.cluster.connect_timeout if config.cluster else 2),
        "DB_OPTIONS": SEARCH_PATH_OPTION,
        # db_postgres counts whole seconds
        "DB_TIMEOUT": str(-(-config.cluster.statement_timeout_ms // 1000) if config.cluster else 2),
        **_dmq_values(cluster),
        "DS_PROBE_INTERVAL": str(config.dispatcher.probe_interval if config.dispatcher else 10),
        "DS_PING_FROM": _bracket(k.listen[0].host) if k.listen else "localhost",
    }
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"@@{name}@@", value)
    if "@@" in text:
        left = text[text.index("@@"):].split("\n", 1)[0]
        raise RuntimeError(f"template placeholder not filled: {left}")
    return text


def _cluster_aliases(cluster: ClusterSettings | None) -> tuple[str, ...]:
    if cluster is None:
        return ()
    return tuple(name for name in (cluster.advertise, cluster.front) if name)


def _listen_lines(config: AppConfig) -> list[str]:
    """``listen=`` lines: [kamailio] listen (advertising the cluster's address, when
    set), and the DMQ socket, always one of its own (the config refuses a shared one)."""
    cluster = config.cluster if config.cluster is not None and config.cluster.replicates \
        else None
    advertise = f" advertise {cluster.advertise}" if cluster and cluster.advertise else ""
    lines = [f"listen={item.kamailio()}{advertise}" for item in config.kamailio.listen]
    if cluster is not None:
        # KDMQ names the node by its own address: never the advertised one
        dmq = cluster.dmq_address
        lines.append(f"listen=udp:{_bracket(dmq.host)}:{dmq.port}")
    return lines


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _dmq_values(cluster: ClusterSettings | None) -> dict[str, str]:
    """The DMQ placeholders ([cluster] dmq_address, peers); empty without DMQ."""
    if cluster is None:
        return {"DMQ_ADDRESS": "", "DMQ_NOTIFY_LINES": "", "DMQ_MULTI_NOTIFY": "0",
                "DMQ_REPLICATE": "", "DMQ_PING_INTERVAL": "60"}
    if cluster.peers_dns is not None:
        port = cluster.dmq_address.port
        notify = [f"sip:{cluster.peers_dns}:{port}"]
    else:
        notify = [str(peer) for peer in cluster.peers]
    return {
        "DMQ_ADDRESS": _cfg_string(str(cluster.dmq_address), "[cluster] dmq_address"),
        "DMQ_NOTIFY_LINES": "\n".join(
            f'modparam("dmq", "notification_address", "{_cfg_string(uri, "[cluster] peers")}")'
            for uri in notify),
        # one DNS name: every address it resolves to is a node
        "DMQ_MULTI_NOTIFY": "1" if cluster.peers_dns is not None else "0",
        "DMQ_REPLICATE": "dmqreplicate=1;",
        "DMQ_PING_INTERVAL": str(cluster.dmq_ping_interval),
    }


def _tls_profile(tls: TlsSettings, role: str, ca_file: Path) -> str:
    # A client (we connect: next hops, Record-Route over TLS) always verifies the peer;
    # a server asks for client certificates only when verify_client is set.
    verify = "yes" if role == "client" or tls.verify_client else "no"
    return (f"[{role}:default]\nmethod = {tls.method}\nverify_certificate = {verify}\n"
            f"require_certificate = {verify}\nprivate_key = {tls.key}\n"
            f"certificate = {tls.cert}\nca_list = {ca_file}\n")


def tls_cfg_text(tls: TlsSettings, ca_file: Path) -> str:
    """The tls.cfg Kamailio's tls module reads: one server and one client profile."""
    return ("# written by e2m-proxy from PROXY.toml [tls]; edit that, not this copy\n"
            + _tls_profile(tls, "server", ca_file) + "\n" + _tls_profile(tls, "client", ca_file))


def ds_list_text(dispatcher: DispatcherSettings) -> str:
    """dispatcher's list file: set 1, one node a line, probed (flag 8: always)."""
    lines = ["# written by e2m-proxy from PROXY.toml [dispatcher]; edit that, not this copy"]
    lines += [f"1 {node} 8" for node in dispatcher.destinations]
    return "\n".join(lines) + "\n"


def trusted_list_text(networks: tuple[str, ...]) -> str:
    """permissions' address file: group 1, address, prefix length, one line each."""
    lines = ["# written by e2m-proxy from PROXY.toml [limits] trusted"]
    for text in networks:
        network = ipaddress.ip_network(text)
        lines.append(f"1 {network.network_address} {network.prefixlen}")
    return "\n".join(lines) + "\n"


def write_runtime_files(config: AppConfig, runtime_dir: Path) -> None:
    """The files the cfg names besides itself: tls.cfg with its CA bundle, the trusted
    address list, and (for [auth] users) the SQLite subscriber database if missing."""
    if config.tls is not None:
        bundle = runtime_dir / "tls-ca.pem"
        _write_private(bundle, b"".join(path.read_bytes().rstrip(b"\n") + b"\n"
                                        for path in config.tls.ca))
        _write_private(runtime_dir / "tls.cfg", tls_cfg_text(config.tls, bundle))
    if config.limits.trusted:
        _write_private(runtime_dir / "trusted.list", trusted_list_text(config.limits.trusted))
    if config.dispatcher is not None:
        _write_private(runtime_dir / "ds.list", ds_list_text(config.dispatcher))
    if config.auth is not None and config.auth.users is not None:
        ensure_users_db(config.auth.users)
    if config.auth is not None:
        _write_private(runtime_dir / AUTH_SECRET_FILE,
                       'modparam("auth", "secret", "%s")\n' % auth_nonce_secret(config))
    if config.auth is not None and config.auth.pg is not None:
        # libpq's password file for db_postgres: the password stays out of the cfg
        _write_private(runtime_dir / "pgpass", passfile_text(config.auth.pg))


def auth_nonce_secret(config: AppConfig) -> str:
    """The secret Kamailio's auth module makes and checks nonces with: with E2M on,
    derived from the proxy's private key, alike on every node of a cluster (a nonce
    one node gave is good at the other; each node still counts its uses, as a copy
    sent to both nodes at once is a known limit of a cluster, review 37); without an
    identity, one made at start."""
    if config.e2m.enabled:
        from .bootstrap import identity_key
        return identity_key(_proxy_config(config.path), b"e2m digest nonce v1 ").hex()
    return secrets.token_hex(32)


@lru_cache(maxsize=2)
def _proxy_config(path: Path) -> Any:
    """The core's PROXY.toml sections, read once per launcher (certificates and keys
    loaded and checked)."""
    from e2m_plugins.config import load_proxy_config
    return load_proxy_config(path)


def _write_private(path: Path, data: str | bytes) -> None:
    """``data`` in a new file only its owner reads: every runtime file (what Kamailio
    loads must be ours from its first byte: a file someone planted before the dir was
    made private keeps its owner and his open descriptor, review 70)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def kamailio_command(config: AppConfig, cfg_path: Path, runtime_dir: Path) -> list[str]:
    k = config.kamailio
    return [k.binary, "-DD", "-E", "-f", str(cfg_path),
            "-m", str(k.shm_mb), "-M", str(k.pkg_mb), "-x", k.shm_allocator,
            "-n", str(k.workers),
            "-Y", str(runtime_dir), "-w", str(runtime_dir),
            "-P", str(runtime_dir / "kamailio.pid")]


def check_config(path: str | Path) -> AppConfig:
    """Load the Kamailio sections and, with E2M on, the core's sections too.

    Raises ``AppConfigError`` (or the core's ``ConfigError``, also a ValueError)
    listing every problem, before anything is started.
    """
    config = load_app_config(path)
    if config.e2m.enabled:
        try:
            import e2m_plugins.config  # noqa: F401 - present, or a plain relay must be asked for
        except ImportError as exc:
            raise AppConfigError(path, [f"[e2m] enabled = true but the E2M engine is not "
                                        f"available ({exc}); set enabled = false for a "
                                        f"plain routing proxy"]) from None
        _proxy_config(config.path)
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e2m-proxy", description="Run Kamailio as an E2M proxy (or a plain routing hop). "
        "'e2m-proxy users add|remove|list --config PROXY.toml' manages the [auth] users; "
        "'e2m-proxy certs list|show|remove --config PROXY.toml [AOR]' the published "
        "certificates; 'e2m-proxy db init|upgrade|status|replay --config PROXY.toml' the "
        "databases.")
    parser.add_argument("--config", required=True, help="PROXY.toml")
    parser.add_argument("--runtime-dir", help="private dir for the cfg, ctl socket, FIFO and "
                        "pid file (default: a new temporary dir, removed on exit)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the rendered cfg (kamailio -c), then exit")
    parser.add_argument("--print-cfg", action="store_true", help="print the rendered cfg and exit")
    return parser


class RuntimeDirError(ValueError):
    """A requested runtime dir someone else could use, or one Kamailio cannot use."""


# Kamailio's ctl module takes a unix socket path of at most this many octets
CTL_PATH_MAX = 104
CTL_SOCKET = "kamailio_ctl"


def _prepare_runtime(requested: str | None) -> tuple[Path, bool]:
    if requested:
        path = Path(requested).resolve()
        if len(os.fsencode(path / CTL_SOCKET)) > CTL_PATH_MAX:
            # else Kamailio stops at start with "init_unix_sock: name too long"
            raise RuntimeDirError(
                f"runtime dir {path} is too long: {path / CTL_SOCKET} must fit in "
                f"{CTL_PATH_MAX} octets (a unix socket's path); give a shorter one")
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_private(path)
        return path, False
    return Path(tempfile.mkdtemp(prefix="e2m-proxy-")).resolve(), True


def _check_private(path: Path) -> None:
    # The control socket and the RPC FIFO run any RPC for whoever reaches them (ul.add
    # binds a user's AoR to any contact), and the nonce secret and pgpass live here too.
    # As OpenSSH's StrictModes: the dir ours alone, nothing in it another's, and no
    # parent someone else could rename it away in (review 70).
    me = os.geteuid()
    info = path.lstat()
    if info.st_uid != me or info.st_mode & 0o077:
        raise RuntimeDirError(
            f"runtime dir {path} is mode {info.st_mode & 0o777:04o}, owner uid {info.st_uid}: "
            "it holds the control socket and RPC FIFO, so it must be ours alone (chmod 700; "
            "systemd: RuntimeDirectoryMode=0700)")
    for entry in os.scandir(path):
        owner = entry.stat(follow_symlinks=False).st_uid
        if owner != me:
            raise RuntimeDirError(f"runtime dir {path} holds {entry.name}, owned by uid "
                                  f"{owner}: remove it (it may have been planted)")
    for parent in path.parents:
        held = parent.lstat()
        writable = held.st_mode & 0o022 and not held.st_mode & stat.S_ISVTX
        if held.st_uid not in (me, 0) or writable:
            raise RuntimeDirError(
                f"runtime dir {path}: its parent {parent} (mode {held.st_mode & 0o7777:04o}, "
                f"owner uid {held.st_uid}) lets others rename it away and plant another")


def _cleanup(runtime_dir: Path, created: bool) -> None:
    if created:
        shutil.rmtree(runtime_dir, ignore_errors=True)
        return
    for name in (CTL_SOCKET, "kamailio_rpc.fifo", "kamailio.pid", "tls.cfg", "tls-ca.pem",
                 "trusted.list", "pgpass", "ds.list", AUTH_SECRET_FILE):
        try:
            (runtime_dir / name).unlink()
        except OSError:
            pass


# A Kamailio log record starts "%2d(pid) LEVEL: " (process number, process id), with the
# writer's own pid; anything else continues the last one.
_RECORD = re.compile(rb"^ ?\d+\((\d+)\) [A-Z]+: ")
# A record written while a message is handled has the cfg's log_prefix ("{$mt ...}")
# right after its level.
_IN_MESSAGE = re.compile(rb"^ ?\d+\(\d+\) [A-Z]+: \{")
# Records above DEBUG that quote a message on their first line, cut at its first quote
# or "=": the core's parser (parse_via quotes the rest of the message, body included,
# at ERROR and whatever sip_parser_log says) and the TCP reader (a framing error is
# logged at ERROR with the whole buffer).  Any record that prints a buffer the way
# Kamailio does, "[[...]]" (the translator, htable's and dmq_usrloc's KDMQ bodies that
# are not JSON, jsonrpcs: review 185), is cut at its "[[".
_QUOTING = (b"[core/parser/", b"message=<", b"[core/tcp_read.c")
_CUT = b"... [cut by e2m-proxy: the rest may quote a message body]"
# A DEBUG record keeps its place and function only: at that level Kamailio writes what
# it handles, and no list of the records that quote a secret stays whole (the first 100
# octets of every datagram; auth's digest response, an offline guessing oracle, review
# 180; the HA1 a database row held, review 182; every KSR call's arguments).  Our own
# lines are INFO.
# (anywhere in a line: Kamailio writes some records in two pieces, the first without
# its newline, and another process's record can start right after it)
_DEBUG = re.compile(rb"\d+\(\d+\) DEBUG: ")
_DEBUG_CUT = b" [debug text cut by e2m-proxy]\n"
# Lines after a record's first are a buffer it prints: at DEBUG the core prints every
# relayed reply (msg_translator.c), every stateless forward (forward.c), every TCP
# write (tcp_main.c), tm an INVITE it reparses (review 178 and stop 50); so they all go
# but those of a Python traceback written at start-up (no message handled yet: why the
# script did not load).  Later a traceback's lines go too: an exception's text may
# quote a message, and a printed message can hold a line that looks like this record
# (a folded header), which must not make the lines after it pass (review 180).
_TRACEBACK = re.compile(rb"^ ?\d+\(\d+\) [A-Z]+: app_python3 \[python_support\.c:\d+\]: "
                        rb"python_handle_exception\(\): (?:[^ ]+: )?"
                        rb"Unhandled exception in the Python code:")
_DROPPED = b"    [the lines after this record cut by e2m-proxy: they may quote a message]\n"


class LogState:
    """What one proxy's cutters share: whether any process has written a record yet,
    and whether any has handled a message."""

    def __init__(self) -> None:
        self.recorded = False
        self.serving = False


class LogCutter:
    """Passes Kamailio's stderr on, line by line, with every DEBUG record cut after its
    function's name, every other record that may quote a message on its first line
    (``_QUOTING``) cut at its first quote, and the continuation lines of every record
    dropped (one marker line in their place), but a Python traceback's written before
    the first message.

    Kamailio 5.6 has no setting that keeps parse_via's error out of the log: it quotes
    from the broken Via to the end of the message at ERROR.  ``sip_parser_log_oneline``
    (set in the cfg) keeps such a record on one line, and this cuts it there.  Lines
    longer than ``LIMIT`` arrive in pieces: the pieces of a cut line go too."""

    LIMIT = 65536

    def __init__(self, *, pid: int | None = None, shared: LogState | None = None) -> None:
        self._pid = pid                  # the writer's: its records name it (None: unknown)
        self._shared = shared if shared is not None else LogState()
        self._keep_continuation = None   # None: no record of ours yet (see ``process``)
        self._marked = False             # the current record's marker line is written
        self._rest_of_line = None        # None: at a line start; else keep (True) or drop

    def process(self, chunk: bytes) -> bytes:
        """What to write for ``chunk`` (a line, or a piece of one, as readline gives)."""
        ends = chunk.endswith(b"\n")
        if self._rest_of_line is not None:             # the tail of a long line
            keep = self._rest_of_line
            self._rest_of_line = None if ends else keep
            return chunk if keep else b""
        record = _RECORD.match(chunk)
        if record and (self._pid is None or int(record.group(1)) == self._pid):
            self._shared.recorded = True
            if _IN_MESSAGE.match(chunk):
                self._shared.serving = True
            out, quoting = self._first_line(chunk)
            self._keep_continuation = not self._shared.serving and bool(_TRACEBACK.match(chunk))
            self._marked = False
            keep = not quoting
            if quoting and not ends:     # cut before its end: the end goes
                out = out if out.endswith(b"\n") else out + b"\n"
        else:
            # Lines before any record at all are Python's own at start (a warning);
            # once any process wrote one, a line before this writer's first record is
            # not one (a new process's records name pid 0 until the fork is done:
            # review 188) and goes like a continuation.
            # A line shaped as a record that names another pid is never one to keep.
            keep = self._keep_continuation if self._keep_continuation is not None \
                else not self._shared.recorded and record is None
            out = chunk if keep else (b"" if self._marked else _DROPPED)
            self._marked = True
        self._rest_of_line = None if ends else keep
        return out

    @classmethod
    def _first_line(cls, line: bytes) -> tuple[bytes, bool]:
        """What to write of a record's first line, and whether anything was cut."""
        debug = _DEBUG.search(line)
        head = line if debug is None else line[:debug.start()]
        dump = head.find(b"[[")
        if dump >= 0:       # Kamailio's way to print a buffer: "[[...]]" (review 185)
            return head[:dump + 2] + _CUT + b"\n", True
        if any(mark in head for mark in _QUOTING):
            return cls._cut(head), True            # a DEBUG record after it goes with it
        if debug is None:
            return line, False
        return head + cls._debug_cut(line[debug.start():]), True

    @staticmethod
    def _debug_cut(line: bytes) -> bytes:
        """A DEBUG record up to its function's name (``func():``), or its place
        (``[file:line]:``); the log prefix before them names the message's method,
        CSeq and Call-ID, which every level writes."""
        end = line.find(b"(): ")
        if end >= 0:
            return line[:end + 3] + _DEBUG_CUT
        end = line.find(b"]: ")
        return (line[:end + 2] if end >= 0 else line[:_DEBUG.match(line).end() - 1]) + _DEBUG_CUT

    @staticmethod
    def _cut(line: bytes) -> bytes:
        start = line.find(b"(): ")
        start = start + 4 if start >= 0 else 0
        quoted = [i for i in (line.find(mark, start) for mark in b"<['\"=") if i >= 0]
        text = line.rstrip(b"\n")
        end = min(quoted) + 1 if quoted else min(len(text), start + 200)
        return text + b"\n" if end >= len(text) else line[:end] + _CUT + b"\n"


# Kamailio's log is drained every LOG_POLL seconds instead of by a reader blocked on
# it: every write to a pipe or socket someone waits on wakes that reader on another
# core, and that cost a worker about 30 µs of CPU per log line (bench/README.md, "Log
# lines").  PIPE_BYTES hold LOG_POLL s of any log rate a proxy can write.
LOG_POLL = 0.02
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031     # fcntl.F_SETPIPE_SZ (Linux); named in fcntl only from 3.10 on
# Kamailio's processes share its stderr, and glibc writes a record longer than 8 KiB in
# 8 KiB pieces: another process's record could land between two, and the next piece,
# text a sender chose, start a line of its own (review 187).  So stderr is a Unix
# socket whose reader learns each write's process (SO_PASSCRED; Linux delivers one
# writer's bytes per read), and each process's bytes make lines of their own.
MAX_WRITERS = 1024       # line states kept: Kamailio has tens of processes
_UCRED = struct.Struct("3i")


class _Writer:
    """One process's bytes on their way to the log: the line it is writing and its
    ``LogCutter``."""

    def __init__(self, pid: int | None, shared: LogState) -> None:
        self.pending = b""
        self.cutter = LogCutter(pid=pid, shared=shared)

    def feed(self, data: bytes, final: bool = False) -> bytes:
        """What to write for ``data``: the chunks readline(LIMIT) would give (whole
        lines, or LIMIT-long pieces), cut by offset, one slice per chunk (a full pipe is
        a thousand lines); with ``final``, the unfinished line too."""
        self.pending += data
        chunks, pos, pending = [], 0, self.pending
        while pos < len(pending):
            end = pending.find(b"\n", pos, pos + LogCutter.LIMIT)
            if end < 0 and len(pending) - pos < LogCutter.LIMIT and not final:
                break                      # the rest of this line is still coming
            cut = end + 1 if end >= 0 else min(len(pending), pos + LogCutter.LIMIT)
            chunks.append(pending[pos:cut])
            pos = cut
        self.pending = pending[pos:]
        return b"".join(self.cutter.process(chunk) for chunk in chunks)


def log_socket() -> tuple[socket.socket, socket.socket]:
    """(reader, writer): the writer is Kamailio's stderr, the reader ``_pump_log``'s."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    for sock, option, forced in ((reader, socket.SO_RCVBUF, 33), (writer, socket.SO_SNDBUF, 32)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, PIPE_BYTES)    # SO_*BUFFORCE: root
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, option, PIPE_BYTES)    # capped by the kernel
    reader.setblocking(False)
    return reader, writer


def _read_socket(sock: socket.socket) -> tuple[list[tuple[int | None, bytes]], bool]:
    """What the writers have sent since the last call, each read with its process id,
    and whether every writer is gone."""
    got: list[tuple[int | None, bytes]] = []
    space = socket.CMSG_SPACE(_UCRED.size)
    while True:
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(PIPE_BYTES, space)
        except BlockingIOError:
            return got, False
        if not data:
            return got, True
        pid = None
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS \
                    and len(value) >= _UCRED.size:
                pid = _UCRED.unpack_from(value)[0]
        got.append((pid, data))


def _read_pipe(fd: int) -> tuple[list[tuple[int | None, bytes]], bool]:
    """A pipe's bytes (one stream: no process ids), and whether it ended."""
    try:
        data = os.read(fd, PIPE_BYTES)
    except BlockingIOError:
        return [], False
    return ([(None, data)] if data else []), not data


def _pump_log(source, out) -> None:
    """Pass Kamailio's log from ``source`` (``log_socket``'s reader, or a pipe) to
    ``out`` through a ``LogCutter`` per writing process, until every writer is gone."""
    if isinstance(source, socket.socket):
        def read() -> tuple[list[tuple[int | None, bytes]], bool]:
            return _read_socket(source)
    else:
        fd = source.fileno()
        try:
            import fcntl
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
            os.set_blocking(fd, False)
        except OSError:
            pass      # 64 KiB would fill within a poll at a flood's rate: block on it instead

        def read() -> tuple[list[tuple[int | None, bytes]], bool]:
            return _read_pipe(fd)
    writers: OrderedDict[int | None, _Writer] = OrderedDict()
    shared = LogState()
    while True:
        try:
            got, ended = read()
        except (OSError, ValueError):
            return
        if not got and not ended:
            time.sleep(LOG_POLL)
            continue
        written = []
        for pid, data in got:
            writer = writers.get(pid)
            if writer is None:
                if len(writers) >= MAX_WRITERS:     # a gone process's unfinished line
                    written.append(writers.popitem(last=False)[1].feed(b"", final=True))
                writer = writers[pid] = _Writer(pid, shared)
            writers.move_to_end(pid)
            written.append(writer.feed(data))
        if ended:
            written.extend(writer.feed(b"", final=True) for writer in writers.values())
        if out is not None and any(written):
            try:
                out.write(b"".join(written))
                out.flush()
            except (OSError, ValueError):
                # our stderr is gone: read on and let it go, or Kamailio's workers would
                # block on a full log socket and stop serving (review 188 HB1)
                out = None
        if ended:
            return                          # Kamailio's end: what was left went too


def _group_members(group: int) -> list[int]:
    """The processes of process group ``group`` (from /proc), its leader excluded."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == group:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == group:
            members.append(int(entry.name))
    return members


def _wait_stopped(child: subprocess.Popen) -> int:
    """Kamailio's exit code once it stopped, SIGKILL after ``STOP_TIMEOUT``.  A child
    still there after a second gets SIGTERM again: the TCP main process started just
    before the stop sometimes misses the first and keeps the main process waiting
    for it; the main process itself is not signalled twice (its shutdown runs once)."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        try:
            return child.wait(timeout=min(STRAGGLER_AFTER, max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                os.killpg(child.pid, signal.SIGKILL)
                return child.wait()
            for pid in _group_members(child.pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass


# Secrets of the operator's own commands: never Kamailio's, whose every process parses
# what strangers send (the owner account's password would undo what the nodes' account
# is kept from, review 73).
_NOT_FOR_KAMAILIO = ("E2M_OWNER_PASSWORD",)


def kamailio_environment() -> dict[str, str]:
    """This process's environment less what Kamailio must not hold."""
    return {name: value for name, value in os.environ.items()
            if name not in _NOT_FOR_KAMAILIO}


def _run(command: list[str], env: dict[str, str]) -> int:
    # Own session: a terminal's Ctrl-C reaches only us, and we stop Kamailio in order.
    # Kamailio's log (stderr) goes through LogCutter on its way to ours.
    reader, writer = log_socket()
    try:
        child = subprocess.Popen(command, env=env, start_new_session=True, stderr=writer)
    finally:
        writer.close()       # Kamailio's processes hold it: their end is the log's end
    pump = threading.Thread(target=_pump_log, args=(reader, sys.stderr.buffer), daemon=True)
    pump.start()
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        # To the whole group, as systemd's default KillMode does for Kamailio: once we
        # saw the TCP main process miss the main process's SIGTERM and keep the
        # shutdown waiting until the SIGKILL below.
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping:
                    code = _wait_stopped(child)
                    break
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        # Workers that outlived the main process (should not happen) go too.
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        pump.join(timeout=2)     # the last lines (Kamailio's shutdown) reach the log
    # Kamailio exits non-zero after a SIGTERM it asked for; report a clean stop as 0.
    return 0 if stopping and code in (0, -signal.SIGTERM, 255, 1) else code


_URL_PASSWORD = re.compile(r"(\b[a-z]+://[^:@/\s\"]+:)[^@\s\"]+@")


def mask_passwords(text: str) -> str:
    """``scheme://user:password@`` as ``scheme://user:***@``: what --print-cfg shows."""
    return _URL_PASSWORD.sub(r"\1***@", text)


OPEN_REGISTRAR_WARNING = ("e2m-proxy: warning: PROXY.toml has no [auth] section: the "
                          "registrar is open, anyone may register any user and receive "
                          "their calls and messages")


def main(argv: list[str] | None = None) -> int:
    guard_terminal()         # Kamailio's log and our listings quote what senders wrote
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["users"]:
        from .users import main as users_main
        return users_main(argv[1:])
    if argv[:1] == ["db"]:
        from .db_cmd import main as db_main
        return db_main(argv[1:])
    if argv[:1] == ["certs"]:
        from .certs_cmd import main as certs_main
        return certs_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        config = check_config(args.config)
    except ValueError as exc:  # AppConfigError and the core's ConfigError
        print(f"e2m-proxy: {exc}", file=sys.stderr)
        return 2
    if config.auth is None and config.dispatcher is None and not args.print_cfg:
        print(OPEN_REGISTRAR_WARNING, file=sys.stderr)
    if not args.print_cfg:
        from .db_cmd import preflight
        problem = preflight(config)
        if problem is not None:
            print(f"e2m-proxy: {problem}", file=sys.stderr)
            return 2
    if sys.version_info[:2] != (3, 11):
        print("e2m-proxy: warning: Kamailio embeds Python 3.11; this interpreter is "
              f"{sys.version.split()[0]}, so compiled packages may not load", file=sys.stderr)
    try:
        runtime_dir, created = _prepare_runtime(args.runtime_dir)
    except RuntimeDirError as exc:
        print(f"e2m-proxy: {exc}", file=sys.stderr)
        return 2
    try:
        cfg_path = runtime_dir / "kamailio.cfg"
        try:
            _write_private(cfg_path, render_cfg(config, runtime_dir))
            if not args.print_cfg:
                write_runtime_files(config, runtime_dir)
        except (AppConfigError, UsersError) as exc:
            print(f"e2m-proxy: {exc}", file=sys.stderr)
            return 2
        if args.print_cfg:
            sys.stdout.write(mask_passwords(cfg_path.read_text()))
            return 0
        env = kamailio_environment()
        extra = os.pathsep.join(python_path())
        env["PYTHONPATH"] = extra + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["E2M_PROXY_CONFIG"] = str(config.path)
        if args.check:
            return subprocess.run([config.kamailio.binary, "-c", "-f", str(cfg_path)],
                                  env=env).returncode
        return _run(kamailio_command(config, cfg_path, runtime_dir), env)
    finally:
        _cleanup(runtime_dir, created)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
