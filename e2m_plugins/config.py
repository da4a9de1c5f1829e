"""Configuration as data: UA.toml and PROXY.toml, validated when loaded.

Both loaders read a TOML file, resolve every path relative to the file, load
the certificates and keys it names, and collect *every* mistake before
raising one ``ConfigError`` whose message lists them, one per line.  Sections
that belong to an adapter (``[kamailio]``, ``[archive]``, ``[phone]`` ...) are
not checked here; they are kept in ``raw`` for the adapter to validate.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from . import certstore
from .errors import E2MError
from .headers import Rule
from .certfiles import load_certificate, load_certificates, load_private_key
from .sdp import KEYING_ATTRIBUTES
from .sip_errors import DEFAULT_CODES, E2MCodes
from .uri import identity_of, validate_host

__all__ = ["ConfigError", "ProxyRule", "ProxyConfig", "UAConfig", "KnownProxy",
           "load_proxy_config", "load_ua_config", "parse_rules"]

T = TypeVar("T")

DEFAULT_POLICY_EXPIRES = 3600        # seconds a UA may keep a learned policy
DEFAULT_CEK_MAX_AGE = 3600.0         # a reused CEK is rolled after this long ...
DEFAULT_CEK_MAX_USES = 100           # ... or this many messages


class ConfigError(ValueError):
    """A configuration file with one or more mistakes; ``problems`` lists them."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s):\n{lines}")


ProxyRule = Rule  # METHOD:type/subtype, shared with the policy header grammar


def parse_rules(values: object, where: str, problems: list[str]) -> tuple[Rule, ...]:
    """A list of ``METHOD:type/subtype`` strings; bad entries become problems."""
    if values is None:
        return ()
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        problems.append(f"{where} must be a list of \"METHOD:type/subtype\" strings")
        return ()
    rules = []
    for text in values:
        try:
            rules.append(Rule.parse(text))
        except E2MError as exc:
            problems.append(f"{where}: {text!r}: {exc}")
    return tuple(rules)


class _Reader:
    """Typed access to a TOML table that records problems instead of raising."""

    def __init__(self, data: Mapping[str, Any], base: Path, problems: list[str]) -> None:
        self.data, self.base, self.problems = data, base, problems

    def table(self, name: str, required: bool = True) -> Mapping[str, Any]:
        value = self.data.get(name)
        if value is None:
            if required:
                self.problems.append(f"missing section [{name}]")
            return {}
        if not isinstance(value, dict):
            self.problems.append(f"[{name}] must be a table")
            return {}
        return value

    def get(self, table: Mapping[str, Any], where: str, key: str, kind: type[T] | tuple,
            default: T | None = None, required: bool = False) -> T | None:
        if key not in table:
            if required:
                self.problems.append(f"{where}.{key} is required")
            return default
        value = table[key]
        if isinstance(value, bool) and kind in (int, float):
            self.problems.append(f"{where}.{key} must be a number, not a boolean")
            return default
        if not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.problems.append(f"{where}.{key} must be {expected}")
            return default
        return value

    def load(self, where: str, relative: str | None, loader: Callable[[Path], T]) -> T | None:
        if relative is None:
            return None
        path = (self.base / relative)
        try:
            return loader(path)
        except FileNotFoundError:
            self.problems.append(f"{where}: file not found: {path}")
        except (E2MError, ValueError, TypeError) as exc:
            self.problems.append(f"{where}: cannot load {path}: {exc}")
        return None

    def unknown_keys(self, table: Mapping[str, Any], where: str, known: set[str]) -> None:
        for key in table:
            if key not in known:
                self.problems.append(f"{where}: unknown key {key!r}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None


def _codes(reader: _Reader) -> E2MCodes:
    table = reader.table("codes", required=False)
    reader.unknown_keys(table, "[codes]", {"proxy_indecipherable", "signature_required",
                                           "warn_code", "accept"})
    values = {key: reader.get(table, "[codes]", key, int if key != "accept" else str)
              for key in table if key in ("proxy_indecipherable", "signature_required",
                                          "warn_code", "accept")}
    try:
        return E2MCodes(**{k: v for k, v in values.items() if v is not None})
    except ValueError as exc:
        reader.problems.append(f"[codes]: {exc}")
        return DEFAULT_CODES


def _anchors(reader: _Reader) -> tuple[x509.Certificate, ...]:
    trust = reader.table("trust")
    reader.unknown_keys(trust, "[trust]", {"ca"})
    files = reader.get(trust, "[trust]", "ca", list, required=True) or []
    anchors: list[x509.Certificate] = []
    for item in files:
        if not isinstance(item, str):
            reader.problems.append("[trust].ca must list file names")
            continue
        anchors.extend(reader.load("[trust].ca", item, load_certificates) or [])
    if files and not anchors and not reader.problems:
        reader.problems.append("[trust].ca holds no certificate")
    return tuple(anchors)


def _keying(reader: _Reader, table: Mapping[str, Any], where: str) -> tuple[str, ...]:
    extra = reader.get(table, where, "keying_attributes", list, default=[]) or []
    if not all(isinstance(a, str) and a for a in extra):
        reader.problems.append(f"{where}.keying_attributes must list attribute names")
        return KEYING_ATTRIBUTES
    return tuple(dict.fromkeys([*KEYING_ATTRIBUTES, *(a.lower() for a in extra)]))


# --------------------------------------------------------------------------
# Proxy


@dataclass(frozen=True, repr=False)
class ProxyConfig:
    """What the proxy engine needs, loaded and checked."""

    host: str
    certificate: x509.Certificate
    private_key: PrivateKeyTypes
    trust_anchors: tuple[x509.Certificate, ...]
    view: tuple[Rule, ...] = ()
    verify: tuple[Rule, ...] = ()
    codes: E2MCodes = DEFAULT_CODES
    cert_url: str | None = None
    policy_expires: int = DEFAULT_POLICY_EXPIRES
    remove_own_label: bool = False
    announce_policy: bool = True
    keying_attributes: tuple[str, ...] = KEYING_ATTRIBUTES
    path: Path | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # the key stays out of logs
        return (f"ProxyConfig(host={self.host!r}, view={[r.format() for r in self.view]}, "
                f"verify={[r.format() for r in self.verify]})")


_PROXY_POLICY_KEYS = {"view", "verify", "cert_url", "expires", "remove_own_label",
                      "announce", "keying_attributes"}


def load_proxy_config(path: str | Path) -> ProxyConfig:
    """Read PROXY.toml: ``[identity]`` host/cert/key, ``[trust]`` ca, ``[policy]``,
    optional ``[codes]``.  Raises ``ConfigError`` listing every mistake."""
    path = Path(path)
    data = _read_toml(path)
    problems: list[str] = []
    reader = _Reader(data, path.parent, problems)

    identity = reader.table("identity")
    host = reader.get(identity, "[identity]", "host", str, required=True)
    if host is not None:
        try:
            host = validate_host(host)
        except E2MError as exc:
            problems.append(f"[identity].host: {exc}")
    cert = reader.load("[identity].cert", reader.get(identity, "[identity]", "cert", str,
                                                     required=True), load_certificate)
    key = reader.load("[identity].key", reader.get(identity, "[identity]", "key", str,
                                                   required=True), load_private_key)
    anchors = _anchors(reader)

    policy = reader.table("policy")
    reader.unknown_keys(policy, "[policy]", _PROXY_POLICY_KEYS)
    view = parse_rules(policy.get("view"), "[policy].view", problems)
    verify = parse_rules(policy.get("verify"), "[policy].verify", problems)
    cert_url = reader.get(policy, "[policy]", "cert_url", str)
    expires = reader.get(policy, "[policy]", "expires", int, default=DEFAULT_POLICY_EXPIRES)
    if expires is not None and not 0 <= expires <= 2**31:
        problems.append("[policy].expires must be between 0 and 2^31 seconds")
    remove_label = reader.get(policy, "[policy]", "remove_own_label", bool, default=False)
    announce = reader.get(policy, "[policy]", "announce", bool, default=True)
    keying = _keying(reader, policy, "[policy]")
    codes = _codes(reader)

    if cert is not None and host is not None and anchors:
        try:
            certstore.check_proxy_certificate(cert, host, anchors, for_encryption=True)
        except E2MError as exc:
            problems.append(f"[identity].cert: {exc}")
    if problems:
        raise ConfigError(path, problems)
    assert host and cert is not None and key is not None
    return ProxyConfig(host=host, certificate=cert, private_key=key, trust_anchors=anchors,
                       view=view, verify=verify, codes=codes, cert_url=cert_url,
                       policy_expires=int(expires or 0), remove_own_label=bool(remove_label),
                       announce_policy=bool(announce), keying_attributes=keying, path=path,
                       raw=data)


# --------------------------------------------------------------------------
# UA


@dataclass(frozen=True)
class KnownProxy:
    """A proxy configured ahead of time: its certificate and what it must see."""

    host: str
    certificate: x509.Certificate
    view: tuple[Rule, ...] = ()
    verify: tuple[Rule, ...] = ()


@dataclass(frozen=True, repr=False)
class UAConfig:
    """What the UA engine needs, loaded and checked."""

    aor: str
    certificate: x509.Certificate
    private_key: PrivateKeyTypes
    trust_anchors: tuple[x509.Certificate, ...]
    peers: Mapping[str, x509.Certificate] = field(default_factory=dict)
    proxies: tuple[KnownProxy, ...] = ()
    require_e2m: bool = True
    sign: bool = False
    cek_reuse: bool = True
    split_sdp: bool = True
    accept_policy_headers: bool = True
    bind_to_message: bool = True              # SIP binding attribute in AuthEnvelopedData
    accept_proxies: tuple[str, ...] = ()     # empty: hosts in our domain or the peer's
    cek_max_age: float = DEFAULT_CEK_MAX_AGE
    cek_max_uses: int = DEFAULT_CEK_MAX_USES
    keying_attributes: tuple[str, ...] = KEYING_ATTRIBUTES
    codes: E2MCodes = DEFAULT_CODES
    path: Path | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"UAConfig(aor={self.aor!r}, peers={sorted(self.peers)}, "
                f"proxies={[p.host for p in self.proxies]})")


_UA_E2M_KEYS = {"require", "sign", "cek_reuse", "split_sdp", "accept_policy_headers", "accept_proxies",
                "bind",
                "cek_max_age", "cek_max_uses", "keying_attributes"}


def _ua_proxies(reader: _Reader, anchors: tuple[x509.Certificate, ...]) -> tuple[KnownProxy, ...]:
    entries = reader.data.get("proxies", [])
    if not isinstance(entries, list):
        reader.problems.append("[[proxies]] must be an array of tables")
        return ()
    found = []
    for index, entry in enumerate(entries):
        where = f"[[proxies]] #{index + 1}"
        if not isinstance(entry, dict):
            reader.problems.append(f"{where} must be a table")
            continue
        reader.unknown_keys(entry, where, {"host", "cert", "view", "verify"})
        host = reader.get(entry, where, "host", str, required=True)
        cert = reader.load(f"{where}.cert", reader.get(entry, where, "cert", str, required=True),
                           load_certificate)
        view = parse_rules(entry.get("view"), f"{where}.view", reader.problems)
        verify = parse_rules(entry.get("verify"), f"{where}.verify", reader.problems)
        if host is None or cert is None:
            continue
        try:
            host = validate_host(host)
            if anchors:
                certstore.check_proxy_certificate(cert, host, anchors)
        except E2MError as exc:
            reader.problems.append(f"{where}: {exc}")
            continue
        found.append(KnownProxy(host, cert, view, verify))
    return tuple(found)


def _ua_peers(reader: _Reader, anchors: tuple[x509.Certificate, ...]) -> dict[str, x509.Certificate]:
    table = reader.table("peers", required=False)
    peers: dict[str, x509.Certificate] = {}
    for aor, relative in table.items():
        where = f"[peers].{aor!r}"
        if not isinstance(relative, str):
            reader.problems.append(f"{where} must be a certificate file name")
            continue
        cert = reader.load(where, relative, load_certificate)
        if cert is None:
            continue
        try:
            if anchors:
                certstore.check_user_certificate(cert, aor, anchors)
        except E2MError as exc:
            reader.problems.append(f"{where}: {exc}")
            continue
        peers[aor] = cert
    return peers


def load_ua_config(path: str | Path) -> UAConfig:
    """Read UA.toml: ``[identity]`` aor/cert/key, ``[trust]`` ca, ``[peers]``,
    ``[[proxies]]``, optional ``[e2m]`` and ``[codes]``."""
    path = Path(path)
    data = _read_toml(path)
    problems: list[str] = []
    reader = _Reader(data, path.parent, problems)

    identity = reader.table("identity")
    aor = reader.get(identity, "[identity]", "aor", str, required=True)
    cert = reader.load("[identity].cert", reader.get(identity, "[identity]", "cert", str,
                                                     required=True), load_certificate)
    key = reader.load("[identity].key", reader.get(identity, "[identity]", "key", str,
                                                   required=True), load_private_key)
    anchors = _anchors(reader)
    if aor is not None and identity_of(aor) is None:
        problems.append(f"[identity].aor: not a SIP URI: {aor!r}")
    elif aor is not None and cert is not None and anchors:
        try:
            certstore.check_user_certificate(cert, aor, anchors)
        except E2MError as exc:
            problems.append(f"[identity].cert: {exc}")

    e2m = reader.table("e2m", required=False)
    reader.unknown_keys(e2m, "[e2m]", _UA_E2M_KEYS)
    settings = dict(
        require_e2m=reader.get(e2m, "[e2m]", "require", bool, default=True),
        sign=reader.get(e2m, "[e2m]", "sign", bool, default=False),
        cek_reuse=reader.get(e2m, "[e2m]", "cek_reuse", bool, default=True),
        split_sdp=reader.get(e2m, "[e2m]", "split_sdp", bool, default=True),
        accept_policy_headers=reader.get(e2m, "[e2m]", "accept_policy_headers", bool, default=True),
        bind_to_message=reader.get(e2m, "[e2m]", "bind", bool, default=True),
        cek_max_age=float(reader.get(e2m, "[e2m]", "cek_max_age", (int, float),
                                     default=DEFAULT_CEK_MAX_AGE) or DEFAULT_CEK_MAX_AGE),
        cek_max_uses=reader.get(e2m, "[e2m]", "cek_max_uses", int, default=DEFAULT_CEK_MAX_USES),
    )
    accept = reader.get(e2m, "[e2m]", "accept_proxies", list, default=[]) or []
    if not all(isinstance(h, str) and h.strip() for h in accept):
        problems.append("[e2m].accept_proxies must list host names or .domain suffixes")
    else:
        settings["accept_proxies"] = tuple(h.strip().lower() for h in accept)
    if settings["cek_max_age"] <= 0 or (settings["cek_max_uses"] or 0) < 1:
        problems.append("[e2m]: cek_max_age must be > 0 and cek_max_uses >= 1")
    keying = _keying(reader, e2m, "[e2m]")
    peers = _ua_peers(reader, anchors)
    proxies = _ua_proxies(reader, anchors)
    codes = _codes(reader)
    if problems:
        raise ConfigError(path, problems)
    assert aor and cert is not None and key is not None
    return UAConfig(aor=aor, certificate=cert, private_key=key, trust_anchors=anchors,
                    peers=peers, proxies=proxies, keying_attributes=keying, codes=codes,
                    path=path, raw=data, **settings)  # type: ignore[arg-type]
