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
from .certfiles import load_certificate, load_certificates, load_crls, load_private_key_file
from .certpath import TrustAnchors
from .sdp import KEYING_ATTRIBUTES
from .sip_errors import DEFAULT_CODES, E2MCodes
from .uri import host_key, identity_of, validate_host

__all__ = ["ConfigError", "ProxyRule", "ProxyConfig", "UAConfig", "KnownProxy",
           "load_proxy_config", "load_ua_config", "parse_rules"]

T = TypeVar("T")

DEFAULT_POLICY_EXPIRES = 3600        # seconds a UA may keep a learned policy
DEFAULT_MAX_POLICY_EXPIRES = 86400   # ... and never longer, whatever a policy says
DEFAULT_REPLAY_WINDOW = 300.0        # seconds a body's SIP context time may be off
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


def _anchors(reader: _Reader) -> TrustAnchors:
    """``[trust] ca`` (required) and ``crls`` (optional): the anchors, carrying the CRLs
    that every chain check applies (``certpath.verify_chain``)."""
    trust = reader.table("trust")
    reader.unknown_keys(trust, "[trust]", {"ca", "crls"})
    files = reader.get(trust, "[trust]", "ca", list, required=True) or []
    anchors: list[x509.Certificate] = []
    for item in files:
        if not isinstance(item, str):
            reader.problems.append("[trust].ca must list file names")
            continue
        anchors.extend(reader.load("[trust].ca", item, load_certificates) or [])
    if files and not anchors and not reader.problems:
        reader.problems.append("[trust].ca holds no certificate")
    crls = []
    for item in reader.get(trust, "[trust]", "crls", list, default=[]) or []:
        if not isinstance(item, str):
            reader.problems.append("[trust].crls must list file names")
            continue
        crls.extend(reader.load("[trust].crls", item, load_crls) or [])
    return TrustAnchors(anchors, crls=crls)


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
    replay_window: float = DEFAULT_REPLAY_WINDOW
    # RFC 3261 S/MIME stacks (AoRs or domains): a body to or from them may be CBC
    # (signed) or without a SIP context.  Everyone else: neither.
    legacy_peers: tuple[str, ...] = ()
    # ... and their CBC bodies even unsigned: a padding oracle for any on-path hop.
    legacy_unsigned_cbc: bool = False
    path: Path | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def crls(self) -> tuple[x509.CertificateRevocationList, ...]:
        """The ``[trust] crls`` (carried by ``trust_anchors``)."""
        return getattr(self.trust_anchors, "crls", ())

    def __repr__(self) -> str:  # the key stays out of logs
        return (f"ProxyConfig(host={self.host!r}, view={[r.format() for r in self.view]}, "
                f"verify={[r.format() for r in self.verify]})")


_PROXY_POLICY_KEYS = {"view", "verify", "cert_url", "expires", "remove_own_label",
                      "announce", "keying_attributes", "replay_window", "legacy_peers",
                      "legacy_unsigned_cbc"}


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
                                                   required=True), load_private_key_file)
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
    window = _replay_window(reader, policy, "[policy]")
    legacy_peers = _peer_names(reader, policy, "[policy]", "legacy_peers")
    legacy_unsigned_cbc = reader.get(policy, "[policy]", "legacy_unsigned_cbc", bool, default=False)
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
                       announce_policy=bool(announce), keying_attributes=keying,
                       replay_window=window, legacy_peers=legacy_peers,
                       legacy_unsigned_cbc=bool(legacy_unsigned_cbc), path=path, raw=data)


# --------------------------------------------------------------------------
# UA


@dataclass(frozen=True)
class LegacyPeer:
    """A peer that cannot do what E2M requires by default (an RFC 3261 S/MIME stack
    such as reSIProcate): we send it CBC EnvelopedData with RSA PKCS#1 v1.5 and
    issuerAndSerialNumber, signed only if it verifies, and accept CBC (and, with
    ``accept_unsigned``, unsigned bodies) from it alone."""

    match: str                      # an AoR (sip:user@host) or a domain
    sign: bool = True               # the peer verifies our signatures
    accept_unsigned: bool = False
    # Unsigned CBC gives any on-path hop a padding oracle on the peer's bodies to us:
    # only for a peer that cannot sign (reSIProcate), on a path one trusts.
    accept_unsigned_cbc: bool = False

    def matches(self, aor: str | None) -> bool:
        return aor is not None and peer_matches(self.match, aor)


def peer_matches(name: str, aor: str) -> bool:
    """Whether ``aor`` is ``name`` (an AoR) or in the domain ``name``."""
    identity = identity_of(aor)
    if identity is None:
        return False
    if ":" in name and not name.startswith("["):   # an AoR, not a domain
        return identity_of(name) == identity
    try:
        return identity.host == host_key(name)
    except E2MError:
        return False


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
    sign: bool = True
    require_signature: bool = True           # a body must be signed by its sender
    cek_reuse: bool = True
    split_sdp: bool = True
    accept_policy_headers: bool = True
    accept_proxies: tuple[str, ...] = ()     # empty: hosts in our domain or the peer's
    cert_url_hosts: tuple[str, ...] = ()     # besides the policy's own host
    max_policy_expires: int = DEFAULT_MAX_POLICY_EXPIRES
    replay_window: float = DEFAULT_REPLAY_WINDOW
    legacy: tuple[LegacyPeer, ...] = ()
    cek_max_age: float = DEFAULT_CEK_MAX_AGE
    cek_max_uses: int = DEFAULT_CEK_MAX_USES
    keying_attributes: tuple[str, ...] = KEYING_ATTRIBUTES
    codes: E2MCodes = DEFAULT_CODES
    path: Path | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def crls(self) -> tuple[x509.CertificateRevocationList, ...]:
        """The ``[trust] crls`` (carried by ``trust_anchors``)."""
        return getattr(self.trust_anchors, "crls", ())

    def __repr__(self) -> str:
        return (f"UAConfig(aor={self.aor!r}, peers={sorted(self.peers)}, "
                f"proxies={[p.host for p in self.proxies]})")


_UA_E2M_KEYS = {"require", "sign", "require_signature", "cek_reuse", "split_sdp",
                "accept_policy_headers", "accept_proxies", "cert_url_hosts", "max_policy_expires",
                "replay_window", "cek_max_age", "cek_max_uses", "keying_attributes"}


def _array_of_tables(reader: _Reader, name: str) -> list[tuple[str, dict]]:
    """(where, table) for each ``[[name]]`` entry; what is not a table is a problem."""
    entries = reader.data.get(name, [])
    if not isinstance(entries, list):
        reader.problems.append(f"[[{name}]] must be an array of tables")
        return []
    found = []
    for index, entry in enumerate(entries):
        where = f"[[{name}]] #{index + 1}"
        if isinstance(entry, dict):
            found.append((where, entry))
        else:
            reader.problems.append(f"{where} must be a table")
    return found


def _ua_proxies(reader: _Reader, anchors: tuple[x509.Certificate, ...]) -> tuple[KnownProxy, ...]:
    found = []
    for where, entry in _array_of_tables(reader, "proxies"):
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


def _ua_legacy(reader: _Reader) -> tuple[LegacyPeer, ...]:
    found = []
    for where, entry in _array_of_tables(reader, "legacy"):
        reader.unknown_keys(entry, where, {"peer", "sign", "accept_unsigned", "accept_unsigned_cbc"})
        name = reader.get(entry, where, "peer", str, required=True)
        if name is None:
            continue
        if not _is_peer_name(name):
            reader.problems.append(f"{where}.peer: not an AoR or a domain: {name!r}")
            continue
        found.append(LegacyPeer(
            name.strip(), bool(reader.get(entry, where, "sign", bool, default=True)),
            bool(reader.get(entry, where, "accept_unsigned", bool, default=False)),
            bool(reader.get(entry, where, "accept_unsigned_cbc", bool, default=False))))
    return tuple(found)


def _is_peer_name(name: str) -> bool:
    if ":" in name and not name.startswith("["):   # an AoR, not a domain
        identity = identity_of(name)
        return identity is not None and identity.user is not None
    try:
        validate_host(name)
    except E2MError:
        return False
    return True


def _peer_names(reader: _Reader, table: Mapping[str, Any], where: str, key: str) -> tuple[str, ...]:
    names = reader.get(table, where, key, list, default=[]) or []
    if not all(isinstance(n, str) and _is_peer_name(n) for n in names):
        reader.problems.append(f"{where}.{key} must list AoRs (sip:user@host) or domains")
        return ()
    return tuple(n.strip() for n in names)


def _replay_window(reader: _Reader, table: Mapping[str, Any], where: str) -> float:
    window = reader.get(table, where, "replay_window", (int, float), default=DEFAULT_REPLAY_WINDOW)
    if window is None or isinstance(window, bool) or not 1 <= window <= 86400:
        reader.problems.append(f"{where}.replay_window must be between 1 and 86400 seconds")
        return DEFAULT_REPLAY_WINDOW
    return float(window)


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
                                                   required=True), load_private_key_file)
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
        sign=reader.get(e2m, "[e2m]", "sign", bool, default=True),
        require_signature=reader.get(e2m, "[e2m]", "require_signature", bool, default=True),
        max_policy_expires=reader.get(e2m, "[e2m]", "max_policy_expires", int,
                                      default=DEFAULT_MAX_POLICY_EXPIRES),
        replay_window=_replay_window(reader, e2m, "[e2m]"),
        cek_reuse=reader.get(e2m, "[e2m]", "cek_reuse", bool, default=True),
        split_sdp=reader.get(e2m, "[e2m]", "split_sdp", bool, default=True),
        accept_policy_headers=reader.get(e2m, "[e2m]", "accept_policy_headers", bool, default=True),
        cek_max_age=float(reader.get(e2m, "[e2m]", "cek_max_age", (int, float),
                                     default=DEFAULT_CEK_MAX_AGE) or DEFAULT_CEK_MAX_AGE),
        cek_max_uses=reader.get(e2m, "[e2m]", "cek_max_uses", int, default=DEFAULT_CEK_MAX_USES),
    )
    accept = reader.get(e2m, "[e2m]", "accept_proxies", list, default=[]) or []
    if not all(isinstance(h, str) and h.strip() for h in accept):
        problems.append("[e2m].accept_proxies must list host names or .domain suffixes")
    else:
        settings["accept_proxies"] = tuple(h.strip().lower() for h in accept)
    hosts = reader.get(e2m, "[e2m]", "cert_url_hosts", list, default=[]) or []
    if not all(isinstance(h, str) and h.strip() for h in hosts):
        problems.append("[e2m].cert_url_hosts must list host names")
    else:
        settings["cert_url_hosts"] = tuple(h.strip().lower() for h in hosts)
    if not 0 <= (settings["max_policy_expires"] or 0) <= 2**31:
        problems.append("[e2m].max_policy_expires must be between 0 and 2^31 seconds")
    if settings["cek_max_age"] <= 0 or (settings["cek_max_uses"] or 0) < 1:
        problems.append("[e2m]: cek_max_age must be > 0 and cek_max_uses >= 1")
    keying = _keying(reader, e2m, "[e2m]")
    peers = _ua_peers(reader, anchors)
    proxies = _ua_proxies(reader, anchors)
    settings["legacy"] = _ua_legacy(reader)
    codes = _codes(reader)
    if problems:
        raise ConfigError(path, problems)
    assert aor and cert is not None and key is not None
    return UAConfig(aor=aor, certificate=cert, private_key=key, trust_anchors=anchors,
                    peers=peers, proxies=proxies, keying_attributes=keying, codes=codes,
                    path=path, raw=data, **settings)  # type: ignore[arg-type]
