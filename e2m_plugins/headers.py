"""The E2M header grammar: Proxy-Required-Body, Warning 380, Proxy-Body-Policy.

Each function takes or returns the *raw value* of one header instance (the
text after the colon); :mod:`e2m_plugins.sip` gives those values.  The
grammar and the reasons behind each choice are in ``docs/protocol.md`` §5.

Proxy-Required-Body (draft-ietf-sip-e2m-sec-02 §6) is parsed leniently
because the draft's ABNF and its examples disagree: cid quoted or not, with
or without <brackets>, comma lists of cids or of whole labels inside one
value, several cid params in one label.  We emit the strict ABNF form, one
cid per header instance: ``host;cid="id"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

from .errors import LimitExceededError, MalformedError
from .grammar import (SIP, SIP_TOKEN, SIP_TOKEN_PATTERN, format_param, parse_param_list,
                      parse_params, quote_string, split_header_list, unquote_string)
from .sip import canonical_method
from .uri import check_http_url, host_key, validate_host

__all__ = [
    "DEFAULT_WARN_CODE", "SESSION_METHODS", "BodyLabel", "PolicyHeader", "Rule", "WarningValue",
    "content_type_warning", "format_labels", "format_proxy_required_body",
    "format_warning", "labels_for", "parse_content_type_warnings",
    "parse_policy_headers", "parse_proxy_required_bodies", "parse_proxy_required_body",
    "parse_warnings", "policy_for",
]

PROXY_REQUIRED_BODY = "Proxy-Required-Body"
PROXY_BODY_POLICY = "Proxy-Body-Policy"
DEFAULT_WARN_CODE = 380  # draft value; RFC 5630 took 380 for "SIPS Not Allowed"
WARN_TEXT = "Required to view '{}'"

_TOKEN = SIP_TOKEN  # one grammar for tokens and parameters: e2m_plugins.grammar
_CID = re.compile(r'[^\s<>"\\]+')
_CID_CONTINUATION = re.compile(r"cid[ \t]*=", re.IGNORECASE)
_WARNING = re.compile(r'([0-9]{3})[ \t]+([^\s"]+)[ \t]+(".*")', re.DOTALL)
_WARN_TEXT = re.compile(r"\s*required\s+to\s+view\s+'?([^'\s]+?)'?\s*", re.IGNORECASE)
_MEDIA_TYPE = re.compile(rf"{SIP_TOKEN_PATTERN}/{SIP_TOKEN_PATTERN}")


# -- hosts -----------------------------------------------------------------

def _split_host(item: str) -> tuple[str, str]:
    host, _, params = item.partition(";")
    if not host.strip(" \t"):
        raise MalformedError("missing host")
    return validate_host(host), params


def _format_param(name: str, value: str | None, force_quote: bool = False) -> str:
    if not SIP.is_token(name):
        raise MalformedError(f"bad parameter name {name!r}")
    return ";" + format_param(name, value, SIP, force_quote)


# -- Proxy-Required-Body ---------------------------------------------------

@dataclass(frozen=True)
class BodyLabel:
    """One proxy and the Content-IDs it is asked to view; no cid = whole body.

    ``cids`` are bare ids (no quotes, no <brackets>), outer body first.
    ``params`` holds any other generic-params (lower-case names).
    """

    proxy_host: str
    cids: tuple[str, ...] = ()
    params: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "proxy_host", validate_host(self.proxy_host))
        object.__setattr__(self, "cids", tuple(_normalise_cid(c) for c in self.cids))
        params = {k.lower(): v for k, v in self.params.items()}
        if "cid" in params:
            raise MalformedError("cids go in BodyLabel.cids, not in params")
        object.__setattr__(self, "params", params)

    @property
    def whole_body(self) -> bool:
        return not self.cids

    def is_for(self, host: str) -> bool:
        return host_key(self.proxy_host) == host_key(host)


def _normalise_cid(raw: str | None) -> str:
    if raw is None:
        raise MalformedError("cid parameter without a value")
    cid = raw.strip(" \t")
    if cid.startswith("<") and cid.endswith(">"):
        cid = cid[1:-1].strip(" \t")
    if not _CID.fullmatch(cid):
        raise MalformedError("bad cid value")
    return cid


def _add_params(text: str, cids: list[str], params: dict[str, str | None]) -> None:
    # cid is the one parameter a label may repeat (the draft's target-body list);
    # any other given twice in one label is as ambiguous as anywhere else.
    for name, value in parse_param_list(text):
        if name == "cid":
            cids.append(_normalise_cid(value))
        elif name in params:
            raise MalformedError(f"header parameter {name} given twice")
        else:
            params[name] = value


def parse_proxy_required_body(value: str) -> list[BodyLabel]:
    """All labels in one raw Proxy-Required-Body value.

    A comma item that starts with ``cid=`` continues the previous label (the
    draft's ``target-body`` list); any other item starts a new label.
    """
    return list(_parse_label_value(value))


# A whole-body label is the same string in every message through a proxy, so the
# parse is kept (bounded; labels are immutable apart from ``params``, which no
# caller changes: labels_for copies it).
@lru_cache(maxsize=256)
def _parse_label_value(value: str) -> tuple[BodyLabel, ...]:
    pending: list[tuple[str, list[str], dict[str, str | None]]] = []
    for item in split_header_list(value):
        if _CID_CONTINUATION.match(item):
            if not pending:
                raise MalformedError("cid list without a proxy host")
            _add_params(item, pending[-1][1], pending[-1][2])
            continue
        host, rest = _split_host(item)
        pending.append((host, [], {}))
        _add_params(rest, pending[-1][1], pending[-1][2])
    if not pending:
        raise MalformedError("empty Proxy-Required-Body")
    return tuple(BodyLabel(h, tuple(c), p) for h, c, p in pending)


MAX_LABELS_PER_MESSAGE = 64            # 16 parts, each labelled for 4 proxies
MAX_LABEL_BYTES_PER_MESSAGE = 16 * 1024


def parse_proxy_required_bodies(values: Iterable[str]) -> list[BodyLabel]:
    """Labels from every Proxy-Required-Body instance, in header order.

    ``LimitExceededError`` past ``MAX_LABELS_PER_MESSAGE`` labels or
    ``MAX_LABEL_BYTES_PER_MESSAGE`` octets, checked before the values are parsed."""
    values = list(values)
    if sum(len(v) for v in values) > MAX_LABEL_BYTES_PER_MESSAGE:
        raise LimitExceededError("Proxy-Required-Body headers too large")
    labels = [label for value in values for label in parse_proxy_required_body(value)]
    if len(labels) > MAX_LABELS_PER_MESSAGE:
        raise LimitExceededError(f"more than {MAX_LABELS_PER_MESSAGE} body labels in one message")
    return labels


def labels_for(labels: Iterable[BodyLabel], host: str) -> BodyLabel | None:
    """Merge every label naming ``host``: cids in order without repeats, or
    whole body if any of them has no cid.  None when ``host`` is not named."""
    mine = [label for label in labels if label.is_for(host)]
    if not mine:
        return None
    if len(mine) == 1 and len(set(mine[0].cids)) == len(mine[0].cids):
        return mine[0]          # the usual case: nothing to merge
    params: dict[str, str | None] = {}
    for label in mine:
        for k, v in label.params.items():
            params.setdefault(k, v)
    if any(label.whole_body for label in mine):
        return BodyLabel(mine[0].proxy_host, (), params)
    cids = tuple(dict.fromkeys(c for label in mine for c in label.cids))
    return BodyLabel(mine[0].proxy_host, cids, params)


def format_proxy_required_body(label: BodyLabel) -> str:
    """One header value, ``host;cid="id"`` (the draft's ABNF form).

    A label with several cids needs several headers: use :func:`format_labels`.
    """
    if len(label.cids) > 1:
        raise ValueError("one cid per header instance; use format_labels")
    out = label.proxy_host
    if label.cids:
        out += _format_param("cid", label.cids[0], force_quote=True)
    for name, value in label.params.items():
        out += _format_param(name, value)
    return out


def format_labels(labels: Iterable[BodyLabel]) -> list[str]:
    """Header values for ``labels``: one per cid, in order (outer body first)."""
    out: list[str] = []
    for label in labels:
        if label.whole_body:
            out.append(format_proxy_required_body(label))
        for cid in label.cids:
            out.append(format_proxy_required_body(
                BodyLabel(label.proxy_host, (cid,), label.params)))
    return out


# -- Warning (RFC 3261 §20.43) ---------------------------------------------

@dataclass(frozen=True)
class WarningValue:
    code: int
    agent: str
    text: str

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 999:
            raise MalformedError("warn-code must have three digits")
        if not self.agent or re.search(r'[\s"]', self.agent):
            raise MalformedError("bad warn-agent")

    def format(self) -> str:
        return f"{self.code:03d} {self.agent} {quote_string(self.text)}"


def format_warning(warnings: Iterable[WarningValue]) -> str:
    """One Warning header value holding ``warnings`` comma-separated."""
    return ", ".join(w.format() for w in warnings)


def _parse_warning_value(item: str) -> WarningValue:
    m = _WARNING.fullmatch(item.strip(" \t"))
    if not m:
        raise MalformedError("bad warning-value")
    return WarningValue(int(m.group(1)), m.group(2), unquote_string(m.group(3)))


def _as_values(values: str | Iterable[str]) -> list[str]:
    return [values] if isinstance(values, str) else list(values)


def parse_warnings(values: str | Iterable[str]) -> list[WarningValue]:
    """Every warning-value in one raw Warning value or in a list of them."""
    return [_parse_warning_value(item)
            for value in _as_values(values) for item in split_header_list(value)]


def content_type_warning(agent_host: str, content_type: str,
                         code: int = DEFAULT_WARN_CODE) -> str:
    """``380 host "Required to view 'type/subtype'"``, the draft's 496 Warning."""
    if not _MEDIA_TYPE.fullmatch(content_type):
        raise ValueError("content type must be type/subtype without parameters")
    return WarningValue(code, agent_host, WARN_TEXT.format(content_type.lower())).format()


def parse_content_type_warnings(values: str | Iterable[str],
                                code: int = DEFAULT_WARN_CODE) -> list[tuple[str, str]]:
    """(agent, content type) for each E2M warning with ``code``.

    Warnings with other codes or other texts (e.g. RFC 5630's 380 "SIPS Not
    Allowed") and values that do not parse are skipped: they are not ours.
    """
    found: list[tuple[str, str]] = []
    for value in _as_values(values):
        try:
            warnings = parse_warnings(value)
        except MalformedError:
            continue
        for w in warnings:
            m = _WARN_TEXT.fullmatch(w.text) if w.code == code else None
            if m and _MEDIA_TYPE.fullmatch(m.group(1)):
                found.append((w.agent, m.group(1).lower()))
    return found


# -- Proxy-Body-Policy -----------------------------------------------------

def _check_media_range(ctype: str) -> str:
    ctype = ctype.lower()
    if ctype == "*":
        return ctype
    main, slash, sub = ctype.partition("/")
    if not slash or main == "*" or not _TOKEN.fullmatch(main) or not _TOKEN.fullmatch(sub):
        raise MalformedError("bad content type in policy rule")
    if "*" in sub and sub != "*":
        raise MalformedError("bad content type in policy rule")
    return ctype


# The methods that carry an INVITE session's offers and answers.
SESSION_METHODS = frozenset({"INVITE", "UPDATE", "PRACK", "ACK"})


@dataclass(frozen=True)
class Rule:
    """``METHOD:type/subtype``; ``*`` for any method, ``*`` or ``type/*`` for types."""

    method: str
    content_type: str

    def __post_init__(self) -> None:
        if not _TOKEN.fullmatch(self.method):
            raise MalformedError("bad method in policy rule")
        object.__setattr__(self, "content_type", _check_media_range(self.content_type))

    @classmethod
    def parse(cls, text: str) -> Rule:
        method, colon, ctype = text.strip(" \t").partition(":")
        if not colon:
            raise MalformedError("policy rule needs METHOD:content-type")
        return cls(method.strip(" \t"), ctype.strip(" \t"))

    def format(self) -> str:
        return f"{self.method}:{self.content_type}"

    def covers(self, method: str) -> bool:
        """Whether the rule is about ``method`` (case-sensitive, RFC 3261 §7.1).  A rule
        for INVITE is about the session it sets up: its offers and answers also ride
        UPDATE (RFC 3311), PRACK (RFC 3262) and ACK (RFC 3261 §13.2.1), and a rule
        that let those pass unread would let a UA move the media past the proxy."""
        method = canonical_method(method)   # "invite" is an INVITE to every stack after us
        return self.method in ("*", method) or (
            self.method == "INVITE" and method in SESSION_METHODS)

    def matches(self, method: str, content_type: str | None) -> bool:
        """``covers`` the method; media types are not case-sensitive.
        A message without a body (``content_type`` None) matches nothing."""
        if not self.covers(method):
            return False
        if content_type is None:
            return False
        actual = content_type.split(";", 1)[0].strip(" \t").lower()
        if self.content_type == "*":
            return True
        if self.content_type.endswith("/*"):
            return actual.partition("/")[0] == self.content_type[:-2]
        return actual == self.content_type


def _parse_rules(value: str | None) -> tuple[Rule, ...]:
    if value is None:
        raise MalformedError("view/verify need a value")
    return tuple(Rule.parse(part) for part in value.split(",") if part.strip(" \t"))


def _parse_fingerprint(value: str | None) -> bytes:
    text = (value or "").strip(" \t")
    algo, colon, digits = text.partition(":")
    if not colon or algo.lower() != "sha256":
        raise MalformedError("cert-fp must be sha256:<hex>")
    if re.fullmatch(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}", digits):
        digits = digits.replace(":", "")  # the openssl -fingerprint form
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", digits):
        raise MalformedError("cert-fp needs 64 hex digits")
    return bytes.fromhex(digits)


def _parse_expires(value: str | None) -> int:
    if value is None or not re.fullmatch(r"[0-9]{1,10}", value):
        raise MalformedError("bad expires")
    seconds = int(value)
    if seconds > 2**32 - 1:
        raise MalformedError("expires out of range")
    return seconds


_KNOWN = ("view", "verify", "cert-fp", "cert-url", "expires")


@dataclass(frozen=True)
class PolicyHeader:
    """What one proxy needs, announced ahead of time (our extension).

    ``cert_fingerprint`` is the raw SHA-256 digest of the certificate's DER.
    ``extensions`` keeps unknown params so they can be forwarded; they have no
    meaning here.
    """

    host: str
    view: tuple[Rule, ...] = ()
    verify: tuple[Rule, ...] = ()
    cert_fingerprint: bytes | None = None
    cert_url: str | None = None
    expires: int | None = None
    extensions: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", validate_host(self.host))
        object.__setattr__(self, "view", tuple(self.view))
        object.__setattr__(self, "verify", tuple(self.verify))
        if self.cert_fingerprint is not None and len(self.cert_fingerprint) != 32:
            raise MalformedError("cert fingerprint must be a SHA-256 digest")
        if self.cert_url is not None:
            check_http_url(self.cert_url)
        if self.expires is not None and not 0 <= self.expires <= 2**32 - 1:
            raise MalformedError("expires out of range")
        ext = {k.lower(): v for k, v in self.extensions.items()}
        if any(k in _KNOWN for k in ext):
            raise MalformedError("a known parameter cannot be an extension")
        object.__setattr__(self, "extensions", ext)

    @classmethod
    def parse(cls, value: str) -> PolicyHeader:
        """One policy-value; MalformedError for anything we cannot trust."""
        if len(split_header_list(value)) != 1:
            raise MalformedError("one policy per value; use parse_policy_headers")
        host, rest = _split_host(value)
        known: dict[str, str | None] = {}
        extensions: dict[str, str | None] = {}
        for name, pvalue in parse_params(rest).items():  # a repeat is malformed
            (known if name in _KNOWN else extensions)[name] = pvalue
        return cls(
            host,
            view=_parse_rules(known["view"]) if "view" in known else (),
            verify=_parse_rules(known["verify"]) if "verify" in known else (),
            cert_fingerprint=(_parse_fingerprint(known["cert-fp"])
                              if "cert-fp" in known else None),
            cert_url=check_http_url(known["cert-url"]) if "cert-url" in known else None,
            expires=_parse_expires(known["expires"]) if "expires" in known else None,
            extensions=extensions,
        )

    def format(self) -> str:
        out = self.host
        if self.view:
            out += _format_param("view", ",".join(r.format() for r in self.view), True)
        if self.verify:
            out += _format_param("verify", ",".join(r.format() for r in self.verify), True)
        if self.cert_fingerprint is not None:
            out += _format_param("cert-fp", "sha256:" + self.cert_fingerprint.hex(), True)
        if self.cert_url is not None:
            out += _format_param("cert-url", self.cert_url, True)
        if self.expires is not None:
            out += _format_param("expires", str(self.expires))
        for name, value in self.extensions.items():
            out += _format_param(name, value)
        return out

    def view_matches(self, method: str, content_type: str | None) -> bool:
        """True when this proxy must be able to read such a body."""
        return any(rule.matches(method, content_type) for rule in self.view)

    def verify_matches(self, method: str, content_type: str | None) -> bool:
        """True when this proxy wants such a body signed."""
        return any(rule.matches(method, content_type) for rule in self.verify)

    def is_for(self, host: str) -> bool:
        return host_key(self.host) == host_key(host)


MAX_POLICIES_PER_MESSAGE = 16          # more than any path of proxies announces
MAX_POLICY_BYTES_PER_MESSAGE = 16 * 1024


def parse_policy_headers(values: str | Iterable[str]) -> list[PolicyHeader]:
    """Policies from every Proxy-Body-Policy value (comma lists allowed).

    ``LimitExceededError`` past ``MAX_POLICIES_PER_MESSAGE`` policies or
    ``MAX_POLICY_BYTES_PER_MESSAGE`` octets, checked before parsing each value: one
    message must not cost hundreds of policies' parsing."""
    values = _as_values(values)
    if sum(len(v) for v in values) > MAX_POLICY_BYTES_PER_MESSAGE:
        raise LimitExceededError("Proxy-Body-Policy headers too large")
    out: list[PolicyHeader] = []
    for value in values:
        items = split_header_list(value)
        if len(out) + len(items) > MAX_POLICIES_PER_MESSAGE:
            raise LimitExceededError(f"more than {MAX_POLICIES_PER_MESSAGE} policies in one message")
        out += [PolicyHeader.parse(item) for item in items]
    return out


def policy_for(policies: Iterable[PolicyHeader], host: str) -> PolicyHeader | None:
    """The first policy announced by ``host``."""
    return next((p for p in policies if p.is_for(host)), None)
