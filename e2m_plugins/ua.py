"""The UA engine: protect what a user agent sends, open what it receives.

``UAEngine`` holds the local identity, the checked certificates of peers and
proxies, the proxy policies it has learned (configured, from policy headers,
from 496/495 answers; each with an expiry) and, per dialog, the CEKs that may
be reused (RFC 3185).  It does no I/O: SIP messages in, SIP messages and
decisions out.

Who may read what, the rule every method here follows:

* the peer UA reads every protected body;
* a proxy reads a body only if its policy (view or verify) names that method
  and content type, and only with a certificate that passed our checks;
* SRTP keys (``a=crypto``, ``a=key-mgmt``) never reach a proxy: an SDP with
  keys that a proxy must view is split into a proxy view and a full copy;
* a reused CEK is only used for content that every holder of that CEK may
  read, and never outside the dialog it came from.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import headers as hdr
from . import mime
from .body import (OpenedPart, check_binding, check_signed_by, has_protection, message_body, new_reference,
                   open_part, protect_content, top_parts, with_entity)
from .certstore import (CertStore, check_proxy_certificate,
                        matches_fingerprint, parse_sip_uri)
from .cms.recipients import (CertificateKey, KekLookup, OpeningKey, Recipient,
                             recipient_for_certificate, reuse_kek)
from .errors import (CertificateRejectedError, DowngradeError, E2MError,
                     NoMatchingRecipientError, DecryptionError, PolicyError, UndecipherableError,
                     UntrustedSignerError)
from .certfiles import readable_certificate
from .config import DEFAULT_POLICY_EXPIRES, KnownProxy, UAConfig
from .sdp import consistent, has_keys, split_for_proxy
from .sip import SipMessage, canonical_name, make_response, parse_address, split_header_list
from .sip_errors import answer_for

__all__ = ["UAEngine", "SecurityInfo", "Protected", "Opened", "Reaction", "next_attempt",
           "CertificateWanted", "MissingPeerCertificateError", "LearnedPolicy"]

# Methods whose body is a session description negotiated inside a dialog.
_SESSION_METHODS = frozenset({"INVITE", "UPDATE", "PRACK", "ACK"})
MAX_RETRIES_PER_CALL = 3         # 496/495/493 answers we follow for one Call-ID
MAX_DIALOGS = 4096               # bound on dialogs with kept CEKs
MAX_POLICIES = 256               # bound on learned proxy policies


class MissingPeerCertificateError(PolicyError):
    """No checked certificate (and no reusable key) for the peer: we cannot encrypt."""


@dataclass(frozen=True)
class SecurityInfo:
    """What protected (or would have protected) one message, for the application."""

    encrypted: bool = False
    peer: str | None = None
    readable_by: tuple[str, ...] = ()        # proxy hosts that can read (some of) the body
    signed: bool = False
    signers: tuple[str, ...] = ()
    trusted: bool = False                    # every signature chained to our anchors
    key_reuse: bool = False                  # a kekri under a reused CEK was used
    split: bool = False                      # separate proxy view and end-to-end copy
    content_type: str | None = None
    consistent: bool | None = None           # split SDP: proxy view matches the full copy
    received: bool = False                   # True: ``peer`` sent it to us

    def describe(self) -> str:
        if not self.encrypted and not self.signed:
            return "plaintext"
        parts = []
        if self.encrypted and self.received:
            parts.append(f"encrypted by {self.peer or 'the peer'} for us"
                         + (f" and {', '.join(self.readable_by)}" if self.readable_by else ""))
        elif self.encrypted:
            who = [self.peer or "peer", *self.readable_by]
            parts.append("encrypted for " + ", ".join(who))
        if self.split:
            parts.append("split SDP (keys end-to-end only)")
        if self.key_reuse:
            parts.append("reused dialog key")
        if self.signed:
            parts.append(f"signed by {', '.join(self.signers) or '?'}"
                         f" ({'trusted' if self.trusted else 'untrusted'})")
        return "; ".join(parts)


@dataclass(frozen=True)
class Protected:
    message: SipMessage
    info: SecurityInfo


@dataclass(frozen=True)
class Opened:
    message: SipMessage                      # the body is plaintext now
    info: SecurityInfo


@dataclass(frozen=True)
class Reaction:
    """What to do after an error response: retry with ``request``, or give up."""

    action: str                              # "retry", "fail" or "none"
    reason: str
    request: SipMessage | None = None
    learned: str | None = None               # proxy host or peer AoR we learned about


@dataclass(frozen=True)
class CertificateWanted:
    """A policy we learned whose certificate the adapter must fetch from ``url``."""

    host: str
    url: str | None
    fingerprint: bytes | None


@dataclass
class LearnedPolicy:
    host: str
    view: tuple[hdr.Rule, ...]
    verify: tuple[hdr.Rule, ...]
    expires_at: float | None                 # None: configured, never expires
    fingerprint: bytes | None = None
    url: str | None = None

    def wants(self, method: str, content_type: str) -> bool:
        return any(r.matches(method, content_type) for r in (*self.view, *self.verify))

    def wants_signature(self, method: str, content_type: str) -> bool:
        return any(r.matches(method, content_type) for r in self.verify)


@dataclass
class DialogKey:
    """A CEK both ends of a dialog hold, and who else holds it."""

    reference: bytes
    cek: bytes = field(repr=False)
    readers: frozenset[str]                  # proxy hosts that hold it too
    exclusive: bool                          # no one but the two UAs (and ``readers``)
    created: float
    uses: int = 0
    confirmed: bool = True                   # False: ours, and the peer has not shown it has it
    retired: bool = False                    # a reader lost it (496): opens, never reused
    offered_in: int | None = None            # CSeq of our request that carried it, if one did


def _aor(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return parse_address(value).uri
    except E2MError:
        return None


class UAEngine:
    """One user agent's E2M state and decisions.  Thread-safe (one lock)."""

    def __init__(self, config: UAConfig, *, clock: Callable[[], float] = time.time,
                 now: Callable[[], datetime] | None = None) -> None:
        self.config = config
        self._clock = clock
        self._now = now or (lambda: datetime.fromtimestamp(self._clock(), timezone.utc))
        self._lock = threading.RLock()
        self._own_key = CertificateKey(config.certificate, config.private_key)
        self.certs = CertStore(config.trust_anchors, clock=self._now)
        for aor, cert in config.peers.items():
            self.certs.add_user(aor, cert)
        self._policies: dict[str, LearnedPolicy] = {}
        for proxy in config.proxies:
            self._add_known_proxy(proxy)
        self._dialog_keys: dict[tuple[str, str], list[DialogKey]] = {}
        self._keeps = 0
        self._retries: dict[str, int] = {}
        self._sign_for: set[str] = set()      # "METHOD" that a 495 asked us to sign

    def __repr__(self) -> str:
        return f"UAEngine({self.config.aor}, {len(self._policies)} proxy policies)"

    # ------------------------------------------------------------------
    # Policies and certificates

    def _add_known_proxy(self, proxy: KnownProxy) -> None:
        self.certs.add_proxy(proxy.host, proxy.certificate)
        self._policies[hdr.host_key(proxy.host)] = LearnedPolicy(proxy.host, proxy.view,
                                                                 proxy.verify, None)

    def policies(self) -> list[LearnedPolicy]:
        """The proxy policies in force now (expired ones are forgotten)."""
        with self._lock:
            now = self._clock()
            for key in [k for k, p in self._policies.items()
                        if p.expires_at is not None and p.expires_at <= now]:
                del self._policies[key]
            return list(self._policies.values())

    def learn(self, message: SipMessage) -> list[str]:
        """Take the ``Proxy-Body-Policy`` headers of ``message``; returns the hosts learned.

        A policy is only a request: nothing is sent to a proxy until its
        certificate passed our checks (chain, SAN dNSName = host, time, and the
        announced fingerprint).  Malformed policy headers are ignored.
        """
        if not self.config.accept_policy_headers:
            return []
        try:
            announced = hdr.parse_policy_headers(message.get_all(hdr.PROXY_BODY_POLICY))
        except E2MError:
            return []
        learned = []
        with self._lock:
            for policy in announced:
                if not self.accepts_proxy(policy.host, _aor(message.get("To"))):
                    continue  # a stranger's policy: never widen who reads on its word
                key = hdr.host_key(policy.host)
                existing = self._policies.get(key)
                if existing is not None and existing.expires_at is None:
                    continue  # configured policy wins over what the wire says
                if policy.expires == 0:
                    self._policies.pop(key, None)
                    continue
                if len(self._policies) >= MAX_POLICIES and key not in self._policies:
                    continue
                expires = self._clock() + (policy.expires if policy.expires is not None
                                           else DEFAULT_POLICY_EXPIRES)
                cert = self.certs.proxy(policy.host)
                if cert is not None and policy.cert_fingerprint is not None \
                        and not matches_fingerprint(cert, policy.cert_fingerprint):
                    self.certs.remove_proxy(policy.host)  # the proxy changed its key
                self._policies[key] = LearnedPolicy(policy.host, policy.view, policy.verify,
                                                    expires, policy.cert_fingerprint,
                                                    policy.cert_url)
                learned.append(policy.host)
        return learned

    def accepts_proxy(self, host: str, peer: str | None = None) -> bool:
        """Whether ``host`` may be asked to read our bodies at all (digest §7: the
        proxy's name in our domain or the peer's).  ``[e2m] accept_proxies``
        overrides: exact hosts, or ``.domain`` suffixes."""
        name = hdr.host_key(host)
        allowed = list(self.config.accept_proxies)
        if not allowed:
            for aor in (self.config.aor, peer):
                identity = parse_sip_uri(aor) if aor else None
                if identity is not None:
                    allowed += [identity.host.lower(), "." + identity.host.lower()]
        return any(name == a or (a.startswith(".") and name.endswith(a)) for a in allowed)

    def certificates_wanted(self) -> list[CertificateWanted]:
        """Learned policies whose proxy certificate we do not hold yet."""
        return [CertificateWanted(p.host, p.url, p.fingerprint) for p in self.policies()
                if self.certs.proxy(p.host) is None]

    def add_proxy_certificate(self, host: str, der_or_pem: bytes) -> x509.Certificate:
        """Check and keep a proxy certificate (fetched from a policy's URL, or a 496 body).

        Raises ``CertificateRejectedError`` when it is not ``host``'s, is not
        trusted, has expired, or does not match the fingerprint ``host`` announced.
        """
        cert = _certificate_from(der_or_pem)
        with self._lock:
            policy = self._policies.get(hdr.host_key(host))
            if policy is not None and policy.fingerprint is not None \
                    and not matches_fingerprint(cert, policy.fingerprint):
                raise CertificateRejectedError(
                    f"certificate for {host} does not match the fingerprint it announced")
            self.certs.add_proxy(host, cert)  # chain, name and time checks
        return cert

    def add_peer_certificate(self, aor: str, der_or_pem: bytes) -> x509.Certificate:
        cert = _certificate_from(der_or_pem)
        self.certs.add_user(aor, cert)
        return cert

    def _readers_for(self, method: str, content_type: str) -> tuple[list[LearnedPolicy], bool]:
        """Proxies that must read such a body (with a usable certificate), and
        whether any of them (or a 495 we got) wants it signed."""
        wanted = [p for p in self.policies() if p.wants(method, content_type)
                  and self.certs.proxy(p.host) is not None]
        sign = (self.config.sign or method in self._sign_for
                or any(p.wants_signature(method, content_type) for p in wanted))
        return wanted, sign

    # ------------------------------------------------------------------
    # Dialog keys (RFC 3185 reuse)

    @staticmethod
    def _dialog_slots(message: SipMessage) -> list[tuple[str, str]]:
        """Where a dialog's keys live: Call-ID plus each tag of the dialog.

        The dialog-creating request has only the UAC's tag; keys stored
        under it are found again from either side once the To tag exists.
        """
        tags = [t for t in (message.from_tag, message.to_tag) if t]
        return [(message.call_id, t.lower()) for t in tags]

    def _keys(self, message: SipMessage) -> list[DialogKey]:
        now = self._clock()
        found: list[DialogKey] = []
        for slot in self._dialog_slots(message):
            for key in self._dialog_keys.get(slot, []):
                if key not in found and key.confirmed and now - key.created < self.config.cek_max_age \
                        and key.uses < self.config.cek_max_uses:
                    found.append(key)
        return found

    def _keep(self, message: SipMessage, key: DialogKey) -> None:
        slots = self._dialog_slots(message)
        if not slots:
            return
        self._keeps += 1
        if self._keeps % 256 == 0:  # now and then, not on every message: O(dialogs)
            now = self._clock()
            for stale in [s for s, keys in self._dialog_keys.items()
                          if all(now - k.created >= self.config.cek_max_age for k in keys)]:
                del self._dialog_keys[stale]  # dialogs that ended without a BYE we saw
        if len(self._dialog_keys) >= MAX_DIALOGS and slots[0] not in self._dialog_keys:
            # dicts keep insertion order: the first slot is the oldest dialog
            del self._dialog_keys[next(iter(self._dialog_keys))]
        bucket = self._dialog_keys.setdefault(slots[0], [])
        if any(k.reference == key.reference and k.retired for k in self._all_keys(message)):
            key.retired = True      # seen again (a retransmission): still not to be reused
        bucket[:] = [k for k in bucket if k.reference != key.reference][-7:] + [key]

    def _all_keys(self, message: SipMessage) -> list[DialogKey]:
        return [k for slot in self._dialog_slots(message) for k in self._dialog_keys.get(slot, [])]

    def _forget_keys_held_by(self, message: SipMessage, host: str) -> None:
        """``host`` answered 496 inside a dialog: it lost the keys we thought it
        held (say it restarted).  They are not reused again, so the retry is keyed
        afresh for the peer and the proxy, with a new reference both can reuse.
        They still open what was already sent under them (a 200 retransmitted
        because its ACK was lost in the restart) until they age out."""
        name = hdr.host_key(host)
        for slot in self._dialog_slots(message):
            for key in self._dialog_keys.get(slot, []):
                if name in {hdr.host_key(r) for r in key.readers if r != "?"}:
                    key.retired = True

    def forget_call(self, call_id: str) -> None:
        """The application saw the call end without a message we opened (a local
        timeout, a transport error): every key of that Call-ID goes."""
        with self._lock:
            for slot in [s for s in self._dialog_keys if s[0] == call_id]:
                del self._dialog_keys[slot]
            self._retries.pop(call_id, None)

    def end_dialog(self, message: SipMessage) -> None:
        """BYE (sent or received), or a failed INVITE: the dialog's keys go."""
        with self._lock:
            for slot in self._dialog_slots(message):
                self._dialog_keys.pop(slot, None)

    def _reusable(self, message: SipMessage, *, exclusive: bool) -> DialogKey | None:
        """The newest kept key fit for the content: for ``exclusive`` content (SRTP
        keys) one only the two UAs hold; otherwise any key whose holders we can
        all name, since they were chosen for this dialog's earlier bodies."""
        if not self.config.cek_reuse:
            return None
        keys = [k for k in reversed(self._keys(message)) if not k.retired]  # newest first
        if exclusive:
            return next((k for k in keys if k.exclusive and not k.readers), None)
        # Prefer the key the most proxies hold: they read the offer, so they read the answer.
        shared = [k for k in keys if "?" not in k.readers]
        return max(shared, key=lambda k: len(k.readers), default=None)

    # ------------------------------------------------------------------
    # Protect

    def protect(self, message: SipMessage) -> Protected:
        """Encrypt the body of an outgoing request or response as policy says.

        Raises ``MissingPeerCertificateError`` (nothing may be sent) when
        E2M is required and the peer cannot be encrypted to.
        """
        with self._lock:
            return self._protect(message)

    def _protect(self, message: SipMessage) -> Protected:
        method = message.method
        if message.is_request and method == "BYE":
            self.end_dialog(message)
        part = message_body(message)
        if part is None or has_protection(part) or not self._protectable(message, part):
            return Protected(message, SecurityInfo(content_type=part.content_type.mime_type
                                                   if part else None))
        ctype = part.content_type.mime_type
        content = part.decoded()
        peer = _aor(message.get("To") if message.is_request else message.get("From"))
        proxies, sign = self._readers_for(method, ctype)
        signer = (self.config.certificate, self.config.private_key) if sign else None
        reuse_ok = self.config.cek_reuse and method in _SESSION_METHODS
        shared = self._reusable(message, exclusive=False) if reuse_ok else None
        # Whoever must read it, plus whoever already holds the dialog key we reuse.
        audience = frozenset(p.host for p in proxies) | (shared.readers if shared else frozenset())
        keyed = ctype == "application/sdp" and has_keys(content, self.config.keying_attributes)
        split = self.config.split_sdp and keyed and bool(audience)
        seal = dict(message=message, peer=peer, ctype=ctype, signer=signer, reuse_ok=reuse_ok,
                    labels=audience - {"?"})   # bound into each envelope: stripping shows
        try:
            if split:
                view = split_for_proxy(content, self.config.keying_attributes).proxy_view
                view_entity, view_reused = self._seal_for(
                    content=view, readers=audience, exclusive=False, handling="optional", **seal)
                full_entity, full_reused = self._seal_for(
                    content=content, readers=frozenset(), exclusive=True, handling="required",
                    **seal)
                entity = mime.multipart_mixed([view_entity, full_entity])
                label_cid, reused = view_entity.content_id, view_reused or full_reused
            else:
                entity, reused = self._seal_for(content=content, readers=audience,
                                                exclusive=not audience, handling="required",
                                                **seal)
                label_cid = entity.content_id
        except MissingPeerCertificateError:
            if self.config.require_e2m:
                raise
            return Protected(message, SecurityInfo(content_type=ctype))
        out = with_entity(message.remove(hdr.PROXY_REQUIRED_BODY), entity)
        for host in sorted(audience - {"?"}):
            out = out.add(hdr.PROXY_REQUIRED_BODY, hdr.format_proxy_required_body(
                hdr.BodyLabel(host, (label_cid,) if label_cid else ())))
        info = SecurityInfo(encrypted=True, peer=peer, readable_by=tuple(sorted(audience)),
                            signed=sign, signers=(self.config.aor,) if sign else (),
                            trusted=sign, key_reuse=reused, split=split, content_type=ctype)
        return Protected(out, info)

    @staticmethod
    def _protectable(message: SipMessage, part: mime.MimePart) -> bool:
        """SDP in any request or success response, and the body of a MESSAGE request.

        Error answers (a 493's certificate, a 415's text) and other bodies pass
        as they are: they are not content the user asked to protect.
        """
        if not message.is_request and (message.status or 0) >= 300:
            return False
        ctype = part.content_type.mime_type
        return ctype == "application/sdp" or (message.is_request and message.method == "MESSAGE")

    def _seal_for(self, *, message: SipMessage, peer: str | None, ctype: str, content: bytes,
                  readers: frozenset[str], exclusive: bool, labels: frozenset[str],
                  signer: tuple[x509.Certificate, object] | None, reuse_ok: bool,
                  handling: str) -> tuple[mime.MimePart, bool]:
        """One envelope for the peer plus ``readers``; returns (entity, reused a key).

        A reusable dialog key becomes a kekri (RFC 3185: KEK = reversed CEK);
        readers that do not hold it get their own RecipientInfo.  Without one,
        the peer's checked certificate is needed, and a fresh CEKReference
        offers the new key for reuse in this dialog.
        """
        recipients: list[Recipient] = []
        key = self._reusable(message, exclusive=exclusive) if reuse_ok else None
        holders: frozenset[str] = frozenset()
        if key is not None:
            key.uses += 1
            recipients.append(reuse_kek(key.cek, key.reference))
            holders = key.readers
        else:
            peer_cert = self.certs.user(peer) if peer else None
            if peer_cert is None:
                raise MissingPeerCertificateError(f"no checked certificate for {peer or 'the peer'}")
            recipients.append(recipient_for_certificate(peer_cert))
        for host in sorted(readers - holders - {"?"}):
            cert = self.certs.proxy(host)
            if cert is not None:
                recipients.append(recipient_for_certificate(cert))
        reference = new_reference() if reuse_ok and key is None else None
        cid = mime.new_content_id(self._local_host())
        entity, sealed = protect_content(ctype, content, recipients, signer=signer,  # type: ignore[arg-type]
                                         cek_reference=reference, content_id=cid,
                                         handling=handling,
                                         bind_to=message if self.config.bind_to_message else None,
                                         bind_labels=sorted(labels))
        if reference is not None:
            # Not reusable until the peer shows it holds it: the request may be refused.
            self._keep(message, DialogKey(reference, sealed.cek, readers, not readers,
                                          self._clock(), confirmed=False,
                                          offered_in=message.cseq[0] if message.is_request else None))
        return entity, key is not None

    def _local_host(self) -> str:
        identity = parse_sip_uri(self.config.aor)
        return identity.host if identity else "localhost"

    # ------------------------------------------------------------------
    # Open

    def open(self, message: SipMessage) -> Opened:
        """Decrypt and verify an incoming message; the body becomes plaintext.

        Raises the typed error the caller turns into a SIP answer with
        ``sip_errors.answer_for(error, "ua")`` (for a request) or reports to
        the application (for a response): ``DowngradeError`` for plaintext
        where E2M is required, 493-class errors for bodies not for us,
        403-class for bad or foreign signatures.
        """
        self.learn(message)
        with self._lock:
            return self._open(message)

    def _open(self, message: SipMessage) -> Opened:
        method = message.method
        if message.is_request and method == "BYE":
            self.end_dialog(message)
        if not message.is_request and method == "INVITE" and (message.status or 0) >= 300:
            self.end_dialog(message)
        self._settle_own_keys(message)
        part = message_body(message)
        if part is None:
            return Opened(message, SecurityInfo())
        peer = _aor(message.get("From") if message.is_request else message.get("To"))
        if not has_protection(part):
            if self.config.require_e2m and self._protectable(message, part) \
                    and not (method == "ACK" and not part.body):
                raise DowngradeError(f"plaintext {part.content_type.mime_type} body where "
                                     "E2M protection is required")
            return Opened(message, SecurityInfo(content_type=part.content_type.mime_type))
        labels = self._labels_by_cid(message)
        chosen: OpenedPart | None = None
        view: OpenedPart | None = None
        for candidate in top_parts(part):
            try:
                opened = open_part(candidate, self._opening_keys(message),
                                   trust_anchors=self.config.trust_anchors, at=self._now())
            except (NoMatchingRecipientError, DecryptionError):
                if candidate.handling == "optional":
                    continue  # a part for a proxy, not for us (e2m-sec-02 §4.2)
                raise
            check_binding(opened, message, labels_present=self._named_hosts(message))
            self._check_signer(message, opened, peer)
            self._keep_received(message, opened, labels)
            if candidate.handling == "optional":
                view = view or opened
            elif chosen is None:
                chosen = opened
        chosen = chosen or view
        if chosen is None:
            raise UndecipherableError("no body part is for us")
        if self.config.require_e2m and not chosen.encrypted and self._protectable(
                message, chosen.entity):
            raise DowngradeError("signed but not encrypted where E2M protection is required")
        agreed = None
        if view is not None and view is not chosen and chosen.content_type == "application/sdp":
            agreed = consistent(view.content, chosen.content, self.config.keying_attributes)
        readers = labels.get(chosen.cid or "", set()) | labels.get("*", set())
        if view is not None:
            readers |= labels.get(view.cid or "", set())   # the proxies read the split view
        info = SecurityInfo(
            encrypted=chosen.encrypted, peer=peer, received=True,
            readable_by=tuple(sorted(readers)),
            signed=chosen.signed, signers=chosen.signers, trusted=chosen.signed,
            key_reuse=any(e.recipient.kind == "kekri" for e in chosen.envelopes),
            split=view is not None and view is not chosen, content_type=chosen.content_type,
            consistent=agreed)
        plain = with_entity(message, mime.make_part(chosen.entity.content_type, chosen.content))
        return Opened(plain, info)

    def _settle_own_keys(self, message: SipMessage) -> None:
        """A 2xx, or a request inside the dialog, shows the peer got the keys we
        offered; a failure response shows it did not, so they go.  A 2xx speaks
        only for the request it answers: a retransmitted 200 of an earlier
        transaction must not vouch for a key offered since (say in a retry that
        was never sent), and a request from the peer vouches only for keys we
        offered in responses."""
        status = message.status or 0
        if message.is_request and not message.to_tag:
            return
        vouched_for = None if message.is_request else message.cseq[0]
        for slot in self._dialog_slots(message):
            bucket = self._dialog_keys.get(slot, [])
            if not message.is_request and status >= 300:
                bucket[:] = [k for k in bucket if k.confirmed]
            elif message.is_request or 200 <= status < 300:
                for key in bucket:
                    if key.offered_in is None or key.offered_in == vouched_for:
                        key.confirmed = True
        if 200 <= status < 300:
            self._retries.pop(message.call_id, None)  # the retries worked: start counting anew

    def _opening_keys(self, message: SipMessage) -> list[OpeningKey]:
        """Our own key, and this dialog's kept CEKs found by kekri identifier."""
        kept = {key.reference: key for key in self._keys(message)}

        def kek_for(reference: bytes) -> bytes | None:
            key = kept.get(reference)
            if key is None:
                return None
            key.uses += 1  # the count covers both directions of the dialog
            return key.cek[::-1]  # RFC 3185: the KEK is the CEK reversed

        return [self._own_key, KekLookup(kek_for)]

    def _check_signer(self, message: SipMessage, opened: OpenedPart, peer: str | None) -> None:
        """A request must be signed by its sender; a verified sender certificate
        that we can encrypt to is kept, so we can answer without a 493 round trip."""
        if not opened.signed or peer is None:
            return
        if message.is_request:
            try:
                check_signed_by(opened, peer, self.config.trust_anchors, self._now())
            except E2MError as exc:
                raise UntrustedSignerError(f"signature is not the sender's: {exc}") from None
        if self.certs.user(peer) is None:
            for cert in opened.signer_certificates:
                try:
                    self.certs.add_user(peer, cert)
                    break
                except E2MError:
                    continue  # not encryptable or not the peer's: keep looking

    @staticmethod
    def _named_hosts(message: SipMessage) -> set[str]:
        """Proxies the message still names: labels, and policies announced on it (a
        proxy may remove its own label, and then announces itself toward the UAS)."""
        hosts: set[str] = set()
        try:
            hosts |= {label.proxy_host for label in
                      hdr.parse_proxy_required_bodies(message.get_all(hdr.PROXY_REQUIRED_BODY))}
        except E2MError:
            pass
        try:
            hosts |= {p.host for p in hdr.parse_policy_headers(message.get_all(hdr.PROXY_BODY_POLICY))}
        except E2MError:
            pass
        return hosts

    @staticmethod
    def _labels_by_cid(message: SipMessage) -> dict[str, set[str]]:
        """Proxy hosts named by Proxy-Required-Body, per Content-ID ("*": whole body)."""
        out: dict[str, set[str]] = {}
        try:
            labels = hdr.parse_proxy_required_bodies(message.get_all(hdr.PROXY_REQUIRED_BODY))
        except E2MError:
            return out
        for label in labels:
            for cid in label.cids or ("*",):
                out.setdefault(mime.normalize_cid(cid) if cid != "*" else "*",
                               set()).add(label.proxy_host)
        return out

    def _keep_received(self, message: SipMessage, opened: OpenedPart,
                       labels: dict[str, set[str]]) -> None:
        """Keep the CEK the sender offered for reuse, with who else holds it."""
        if not self.config.cek_reuse or message.method not in _SESSION_METHODS:
            return
        for reference, cek, count in opened.cek_references:
            readers = frozenset(labels.get(opened.cid or "", set()) | labels.get("*", set()))
            exclusive = count == 1 and not readers
            if count > 1 + len(readers):
                exclusive = False  # holders we cannot name: only for what they already read
                readers = readers | {"?"}
            self._keep(message, DialogKey(reference, cek, readers, exclusive, self._clock()))

    def refusal(self, request: SipMessage, error: BaseException) -> SipMessage | None:
        """The SIP answer to an incoming request that ``open`` refused (error table,
        role "ua"); None when the error is answered by nobody (a local decision).
        A 493 carries our certificate so the sender can encrypt to it."""
        answer = answer_for(error, "ua", self.config.codes)
        if answer is None or not request.is_request or request.method == "ACK":
            return None
        headers: list[tuple[str, str]] = []
        warning = answer.warning_header(self._local_host())
        if warning:
            headers.append(("Warning", warning))
        if answer.accept:
            headers.append(("Accept", answer.accept))
        body, ctype = (b"", None)
        if answer.needs_certificate:
            body = self.config.certificate.public_bytes(serialization.Encoding.DER)
            ctype = "application/pkix-cert"
        return make_response(request, answer.code, answer.reason, headers, body, ctype)

    # ------------------------------------------------------------------
    # React to error responses

    def react(self, response: SipMessage, request: SipMessage) -> Reaction:
        """After 496, 495 or 493 to ``request`` (the plaintext we meant to send):
        learn what the response teaches, once it passes our checks, and give the
        re-protected request to send again (new CSeq and branch).

        A forged 496 (certificate for another host, untrusted, expired, or not
        the announced one) gives ``fail`` and nothing is sent.
        """
        codes = self.config.codes
        status = response.status or 0
        with self._lock:
            self._settle_own_keys(response)
            count = self._retries.get(request.call_id, 0)
            if status not in (codes.proxy_indecipherable, codes.signature_required, 493):
                return Reaction("none", f"{status} is not an E2M answer")
            if count >= MAX_RETRIES_PER_CALL:
                return Reaction("fail", f"gave up after {count} E2M retries")
            try:
                if status == codes.proxy_indecipherable:
                    learned = self._learn_496(response, request)
                elif status == codes.signature_required:
                    learned = self._learn_495(response, request)
                else:
                    learned = self._learn_493(response, request)
            except E2MError as exc:
                return Reaction("fail", str(exc))
            if len(self._retries) > MAX_DIALOGS:
                self._retries.clear()
            self._retries[request.call_id] = count + 1
        retry = self.protect(next_attempt(request)).message
        return Reaction("retry", f"{status}: learned {learned}", retry, learned)

    def _learn_496(self, response: SipMessage, request: SipMessage) -> str:
        part = message_body(response)
        if part is None or part.content_type.mime_type not in ("application/pkix-cert",):
            raise CertificateRejectedError("496 without an application/pkix-cert certificate")
        warnings = hdr.parse_content_type_warnings(response.get_all("Warning"),
                                                   self.config.codes.warn_code)
        policies = []
        try:
            policies = hdr.parse_policy_headers(response.get_all(hdr.PROXY_BODY_POLICY))
        except E2MError:
            pass
        hosts = [_agent_host(w[0]) for w in warnings] + [p.host for p in policies]
        if not hosts:
            raise CertificateRejectedError("496 names no proxy (no Warning, no policy header)")
        host = hosts[0]
        if not self.accepts_proxy(host, _aor(request.get("To"))):
            raise CertificateRejectedError(f"496 from {host}, which is not a proxy we accept")
        policy = hdr.policy_for(policies, host)
        cert = _certificate_from(part.decoded())
        if policy is not None and policy.cert_fingerprint is not None \
                and not matches_fingerprint(cert, policy.cert_fingerprint):
            raise CertificateRejectedError("496 certificate does not match its policy fingerprint")
        check_proxy_certificate(cert, host, self.config.trust_anchors, self._now())
        self.certs.add_proxy(host, cert)
        self._forget_keys_held_by(request, host)
        method = request.method
        needed = [w[1] for w in warnings if hdr.host_key(_agent_host(w[0])) == hdr.host_key(host)]
        view = tuple(hdr.Rule(method, t) for t in needed) or (hdr.Rule(method, "*"),)
        key = hdr.host_key(host)
        old = self._policies.get(key)
        expires = self._clock() + (policy.expires if policy and policy.expires else DEFAULT_POLICY_EXPIRES)
        if policy is not None:
            view = tuple(dict.fromkeys((*policy.view, *view)))
        merged_view = tuple(dict.fromkeys((*(old.view if old else ()), *view)))
        verify = tuple(dict.fromkeys((*(old.verify if old else ()),
                                      *(policy.verify if policy else ()))))
        self._policies[key] = LearnedPolicy(host, merged_view, verify,
                                            None if old and old.expires_at is None else expires,
                                            policy.cert_fingerprint if policy else None,
                                            policy.cert_url if policy else None)
        return host

    def _learn_495(self, response: SipMessage, request: SipMessage) -> str:
        self.learn(response)
        self._sign_for.add(request.method)
        return f"signature for {request.method}"

    def _learn_493(self, response: SipMessage, request: SipMessage) -> str:
        part = message_body(response)
        peer = _aor(request.get("To"))
        if part is None or peer is None:
            raise CertificateRejectedError("493 without a certificate to encrypt to")
        if part.content_type.mime_type not in ("application/pkix-cert",):
            raise CertificateRejectedError("493 body is not application/pkix-cert")
        self.add_peer_certificate(peer, part.decoded())
        return peer


def next_attempt(request: SipMessage) -> SipMessage:
    """The same request as a new transaction: CSeq + 1 and a fresh top Via branch."""
    number, method = request.cseq
    out = request.replace("CSeq", f"{number + 1} {method}")
    headers = list(out.headers)
    for index, (name, value) in enumerate(headers):
        if canonical_name(name) == "via":
            first = split_header_list(value)[0]
            head, _, params = first.partition(";")
            kept = [p for p in params.split(";")
                    if p.strip() and not p.strip().lower().startswith("branch=")]
            fresh = ";".join([head.rstrip(), *kept, "branch=z9hG4bK" + os.urandom(8).hex()])
            headers[index] = (name, fresh + value[len(first):])
            break
    return SipMessage(out.start_line, tuple(headers), out.body)


def _certificate_from(data: bytes) -> x509.Certificate:
    cert = readable_certificate(data) if not data.lstrip().startswith(b"-----") else None
    if cert is None:
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError:
            raise CertificateRejectedError("not a readable certificate") from None
    return cert


def _agent_host(agent: str) -> str:
    """The host of a warn-agent (``host`` or ``host:port``; IPv6 in brackets)."""
    if agent.startswith("["):
        return agent[1:agent.index("]")] if "]" in agent else agent
    return agent.rsplit(":", 1)[0] if agent.count(":") == 1 else agent
