"""The UA engine: protect what a user agent sends, open what it receives.

``UAEngine`` holds the local identity, the checked certificates of peers and
proxies, the proxy policies it has learned (``learned_policies.LearnedPolicies``:
configured, from policy headers, from 496/495 answers; each with an expiry) and,
per dialog, the CEKs that may be reused (``dialog_keys.DialogKeys``, RFC 3185),
and decides with them what to protect, how to open and how to react to errors.
It does no I/O: SIP messages in, SIP messages and decisions out.

Who may read what, the rule every method here follows:

* the peer UA reads every protected body;
* a proxy reads a body only if its policy (view or verify) names that method
  and content type, and only with a certificate that passed our checks;
* SRTP keys (``a=crypto``, ``a=key-mgmt``) never reach a proxy: an SDP with
  keys that a proxy must view goes without them, and the keys are sealed for the
  peer alone inside its signature (``e2m-sdp-keys``, docs/protocol.md §6.1);
* a reused CEK is only used for content that every holder of that CEK may
  read, and never outside the dialog it came from.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import headers as hdr
from . import mime
from .headers import SESSION_METHODS
from .body import (OpenedPart, check_context, check_signed_by, has_protection, message_body,
                   new_reference, open_part, open_sealed_keys, plaintext_leaves, protect_content,
                   seal_keys, top_parts, with_entity)
from .certstore import CertStore, check_not_a_ca, check_proxy_certificate, matches_fingerprint
from .cms.budget import message_budget
from .cms.envelope import OpenedEnvelope
from .cms.limits import DEFAULT_LIMITS, Limits
from .cms.recipients import (CertificateKey, OpeningKey, Recipient, addressed_only_to,
                             recipient_for_certificate, reuse_kek)
from .errors import (BindingMismatchError, CertificateRejectedError, DowngradeError, E2MError,
                     InconsistentSplitError, MalformedError, MergedRequestError,
                     NoMatchingRecipientError, DecryptionError, LimitExceededError,
                     PolicyError, SignatureRequiredError, UndecipherableError,
                     UntrustedSignerError)
from .certfiles import readable_certificate
from .config import DEFAULT_POLICY_EXPIRES, LegacyPeer, UAConfig
from .dialog_keys import (MAX_DIALOGS, MAX_SLOTS_PER_CALL, DialogKey, DialogKeys, PendingUses,
                          dialog_parties)
from .learned_policies import LearnedPolicies, LearnedPolicy, dialog_scope
from .replay import TRANSACTION_LIFETIME, MemoryReplayCache
from .srtp_keys import holds_keys
from .sdp import SdpKeys, has_keys, merge_keys, separate_keys
from .sipcontext import SipContext
from .grammar import split_header_list
from .sip import SipMessage, canonical_name, make_response, parse_address
from .uri import aor_of, host_key, http_url_host, identity_of, split_hostport
from .sip_errors import answer_for

__all__ = ["UAEngine", "SecurityInfo", "Protected", "Opened", "Reaction", "next_attempt",
           "CertificateWanted", "MissingPeerCertificateError"]

# Methods whose body is a session description negotiated inside a dialog.
MAX_RETRIES_PER_CALL = 3         # 496/495/493 answers we follow for one Call-ID
_MAX_SENT = 1024                 # requests remembered to tell answers from strangers
_SENT_LIFETIME = 64.0            # ... a transaction's lifetime (64*T1)
# An INVITE rings until its final answer, however seldom the callee sends a 1xx (a
# proxy's Timer C runs over 3 minutes): forgetting it after 64 s lost the answered
# dialog's 2xx, and with it which dialog a BYE ends (review 47)
_INVITE_LIFETIME = 600.0
MAX_SERVICE_PEERS = 256          # peer certificates kept from a certificate service
MAX_PEERS_WANTED = 64            # peers we could not encrypt to, for the adapter to fetch
MAX_SIGN_ASKS = 256              # (method, peer) pairs a 495 asked us to sign, kept at once
MAX_WAITING_INVITES = 64         # initial INVITEs whose policies wait for our answer
INVITE_POLICY_WAIT = 180.0       # ... at most this long (Timer C: a call rings 3 minutes)
_WANTED_LIFETIME = 300.0


def _lifetime(method: str) -> float:
    return _INVITE_LIFETIME if method == "INVITE" else _SENT_LIFETIME


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
    trusted: bool = False                    # signed by the peer (From/To AoR), chained to our anchors
    key_reuse: bool = False                  # a kekri under a reused CEK was used
    split: bool = False                      # SDP keys sealed for the peer alone
    content_type: str | None = None
    received: bool = False                   # True: ``peer`` sent it to us

    def describe(self) -> str:
        if not self.encrypted and not self.signed:
            return "plaintext"
        parts = []
        if self.encrypted and self.received:
            # "by <peer>" only when the peer's signature verified: anyone can encrypt to us
            sender = self.peer if self.trusted and self.peer else "an unauthenticated sender"
            parts.append(f"encrypted by {sender} for us"
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


def _kekri_id(envelope: OpenedEnvelope) -> bytes:
    """The key identifier (a CEKReference, RFC 3185) of the kekri that opened ``envelope``."""
    return bytes.fromhex(envelope.recipient.identifier.split("=", 1)[1])


def _aor(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return parse_address(value).uri
    except E2MError:
        return None


def _peer_name(peer: str | None) -> str:
    """A peer as the engine's tables name it (its identity, else the URI as written)."""
    if peer is None:
        return "-"
    return str(identity_of(peer) or peer)


def _top_branch(message: SipMessage) -> str | None:
    try:
        return message.via_branch()
    except MalformedError:
        return None


class UAEngine:
    """One user agent's E2M state and decisions.

    ``policies`` (``LearnedPolicies``) and ``dialog_keys`` (``DialogKeys``) are
    the proxy policies and the per-dialog CEKs the decisions use; adapters may
    read them.  Thread-safe: one lock around each decision (the two tables
    have their own locks, taken inside it).
    """

    def __init__(self, config: UAConfig, *, clock: Callable[[], float] = time.time,
                 now: Callable[[], datetime] | None = None, bind: bool = True) -> None:
        """``bind=False`` leaves the SIP context out of what we send: only for load
        generators that send one body many times (the benchmarks), whose receivers
        must then name this UA a legacy sender.  It is not a setting of UA.toml."""
        self.config = config
        self._bind = bind
        self._clock = clock
        self._now = now or (lambda: datetime.fromtimestamp(self._clock(), timezone.utc))
        self._lock = threading.RLock()
        self._own_key = CertificateKey(config.certificate, config.private_key)
        self.certs = CertStore(config.trust_anchors, clock=self._now)
        for aor, cert in config.peers.items():
            self.certs.add_user(aor, cert)
        self.policies = LearnedPolicies(clock=self._clock,
                                        max_expires=config.max_policy_expires)
        for proxy in config.proxies:
            self.certs.add_proxy(proxy.host, proxy.certificate)
            self.policies.configure(proxy.host, proxy.view, proxy.verify)
        self.dialog_keys = DialogKeys(max_age=config.cek_max_age, max_uses=config.cek_max_uses,
                                      clock=self._clock)
        self._retries: OrderedDict[str, int] = OrderedDict()
        # (method, peer) a 495 asked us to sign -> when the ask lapses (``_learn_495``)
        self._sign_asks: OrderedDict[tuple[str, str], float] = OrderedDict()
        # (Call-ID, caller) of an initial INVITE -> (when, origin, its policies), until
        # we ring, answer or refuse it (``_park_invite_policies``)
        self._invite_policies: OrderedDict[
            tuple[str, str], tuple[float, tuple[str, str | None, str | None],
                                   list[hdr.PolicyHeader]]] = OrderedDict()
        self.replay = MemoryReplayCache(window=config.replay_window, clock=self._clock)
        # Requests we sent, so an answer can be told from a stranger's message:
        # (Call-ID, CSeq number, method, top Via branch) ->
        # (Request-URI, when sent, sent inside a dialog, its first final status or 0)
        self._sent: OrderedDict[tuple[str, int, str, str], tuple[str, float, bool, int]] = \
            OrderedDict()
        # Dialog-creating INVITEs of ours that failed (the key of ``_sent``) -> when the
        # failure came: a 2xx relayed after it (RFC 3261 16.7) is owed an ACK and a BYE
        # for TRANSACTION_LIFETIME (``late_answer_to_failed_invite``).  Bounded as _sent.
        self._failed_at: OrderedDict[tuple[str, int, str, str], float] = OrderedDict()
        # Peer certificates from a certificate service (RFC 6072): AoR -> when the
        # subscription that gave it lapses.  [peers] entries are never in here.
        self._service_peers: OrderedDict[str, float] = OrderedDict()
        # AoR -> the newest notBefore a certificate from the wire had (``_refuse_older``)
        self._newest_from_wire: OrderedDict[str, datetime] = OrderedDict()
        # AoR -> the notBefore of the certificate its service withdrew (an empty
        # NOTIFY): that one and older ones are refused from the wire (review 107)
        self._withdrawn: OrderedDict[str, datetime] = OrderedDict()
        self._peers_wanted: OrderedDict[str, float] = OrderedDict()
        self._configured_peers = {str(aor_of(aor)) for aor in config.peers}
        # Our tag in each INVITE dialog we are in -> (Call-ID, its two parties' AoRs),
        # from what we send: a message naming our dialog with other parties is a third
        # who read the ids off the wire (``_check_parties``).  Bounded, LRU.
        self._parties: OrderedDict[str, tuple[str, frozenset[str]]] = OrderedDict()
        # Tags in _parties whose dialog a 2xx confirmed -> the remote tag it confirmed:
        # a failure we send to a re-INVITE there (491, 488) leaves the dialog, and only
        # a BYE with that remote tag ends it (not ours to a second fork of the INVITE).
        self._confirmed: dict[str, str] = {}
        # Tags in _parties that our own 1xx/2xx began -> that INVITE's top Via branch:
        # only a failure in that same transaction (the 487 after a CANCEL) ends it.
        self._answered: dict[str, str] = {}
        # ... and -> the caller's tag in it (lower-cased): a slot of that dialog's keys
        self._callers: dict[str, str] = {}
        # Tags in _parties of INVITEs we sent -> the To tags their 1xx/2xx brought (each
        # fork's, lower-cased, at most MAX_SLOTS_PER_CALL): slots of early dialogs (55)
        self._early_peers: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"UAEngine({self.config.aor}, {len(self.policies)} proxy policies)"

    # ------------------------------------------------------------------
    # Policies and certificates

    def learn(self, message: SipMessage) -> list[str]:
        """Take the ``Proxy-Body-Policy`` headers of ``message``; returns the hosts learned.

        Only from those we asked (docs/protocol.md §6): an answer to one of our own
        requests (a REGISTER or OPTIONS 200; the policy then holds for all we send),
        or a message of a dialog we are in (it then holds in that dialog only).  A
        stranger's message teaches nothing, however it is addressed.  A policy is
        only a request: nothing is sent to a proxy until its certificate passed our
        checks (chain, SAN dNSName = host, time, and the announced fingerprint); its
        ``cert-url`` is kept only on the policy's own host or a ``[e2m]
        cert_url_hosts`` host.  Malformed policy headers are ignored.
        """
        if not self.config.accept_policy_headers:
            return []
        values = message.get_all(hdr.PROXY_BODY_POLICY)
        if not values:
            return []
        with self._lock:
            origin = self._policy_origin(message)   # before any parsing: a stranger's costs nothing
            if origin is None:
                return []
            try:   # bounded: more than any path of proxies announces is not read at all
                announced = hdr.parse_policy_headers(values)
            except E2MError:
                return []
            # a stranger's policy never widens who reads on its word
            accepted = [self._own_url_only(policy) for policy in announced
                        if self.accepts_proxy(policy.host, origin[2])]
            if message.is_request and message.method == "INVITE" and not message.to_tag:
                self._park_invite_policies(message.call_id, origin, accepted)
                return []
            return self._take_policies(origin, accepted)

    def _take_policies(self, origin: tuple[str, str | None, str | None],
                       policies: list[hdr.PolicyHeader]) -> list[str]:
        """Keep ``policies`` (accepted from ``origin``); the hosts learnt (lock held)."""
        source, scope, _ = origin
        learned = []
        for policy in policies:
            if self.policies.learn_header(policy, source=source, scope=scope) is None:
                continue  # configured, or withdrawn
            cert = self.certs.proxy(policy.host)
            if scope is None and cert is not None and policy.cert_fingerprint is not None \
                    and not matches_fingerprint(cert, policy.cert_fingerprint) \
                    and not self.policies.is_configured(policy.host):
                # the proxy changed its key (said for everything we send: a dialog's
                # peer's word takes no certificate from the other calls, review 164 K2)
                self.certs.remove_proxy(policy.host)
            learned.append(policy.host)
        return learned

    def _park_invite_policies(self, call_id: str, origin: tuple[str, str | None, str | None],
                              policies: list[hdr.PolicyHeader]) -> None:
        """An initial INVITE's policies wait for our answer (lock held): anyone may send
        one, bodiless, unsigned, from a domain whose names point anywhere, and a kept
        policy is a certificate the phone goes to fetch (review 159 K2: a refused
        stranger's INVITE made the phone fetch from the URL it named).  Taken when we
        ring or answer it (``_settle_invite_policies``), dropped when we refuse it."""
        if not policies:
            return       # nothing of ours to wait for (and what waits stays)
        key = (call_id, _peer_name(origin[2]))
        self._invite_policies.pop(key, None)
        self._invite_policies[key] = (self._clock(), origin, policies)
        while len(self._invite_policies) > MAX_WAITING_INVITES:
            self._invite_policies.popitem(last=False)

    def certificates_to_answer(self, invite: SipMessage) -> list[CertificateWanted]:
        """The proxies whose certificates the policies waiting on ``invite`` (an initial
        INVITE we opened) name with a ``cert-url`` and we do not hold, in the order it
        names them: an answer sent now would leave them out, and a proxy that must read
        it drops it.  A host that answers automatically rings first (the 1xx takes the
        policies), fetches them and answers once they are held (review 162 HB1)."""
        with self._lock:
            waiting = self._invite_policies.get(
                (invite.call_id, _peer_name(_aor(invite.get("From")))))
            if waiting is None:
                return []
            return [CertificateWanted(p.host, p.cert_url, p.cert_fingerprint)
                    for p in waiting[2]
                    if p.cert_url and self._needs_certificate(p.host, p.cert_fingerprint)]

    def holds_proxy_certificate(self, host: str, fingerprint: bytes | None = None) -> bool:
        """A certificate of ``host`` passed our checks and is kept (the one
        ``fingerprint`` names, when given)."""
        with self._lock:
            return not self._needs_certificate(host, fingerprint)

    def _settle_invite_policies(self, response: SipMessage) -> None:
        """Our response to an initial INVITE: a 1xx above 100 or a 2xx takes the
        policies it carried (before the response is protected: its body is for their
        proxies too); a failure drops them (lock held)."""
        status = response.status or 0
        if response.is_request or response.method != "INVITE" or status <= 100:
            return
        key = (response.call_id, _peer_name(_aor(response.get("From"))))
        waiting = self._invite_policies.pop(key, None)
        if waiting is None or status >= 300:
            return
        parked, origin, policies = waiting
        if self._clock() - parked <= INVITE_POLICY_WAIT:
            self._take_policies(origin, policies)

    def _policy_origin(self, message: SipMessage) -> tuple[str, str | None, str | None] | None:
        """(source, scope, peer) a policy on ``message`` may be learnt from, or None.

        An answer to a REGISTER or OPTIONS we sent: source is the Request-URI we sent
        it to, for everything (scope None).  Any other message of a dialog we are in
        (an answer to our INVITE, a request of the peer's INVITE dialog): for that
        dialog only.  Anything else is a stranger's word."""
        if not message.is_request:
            sent = self._sent_for(message)
            status = message.status or 0
            if sent is None:
                return None
            peer = _aor(message.get("To"))
            if not 200 <= status < 300:
                # a 496 or 495 too: anyone on the transaction writes one, and its policy
                # header was learnt for everything we send (review 162 K1: one 495 made
                # alice sign to every peer again).  A 496's policy for the proxy whose
                # certificate it carries is taken once that is checked (``_learn_496``)
                return None
            if message.method in ("REGISTER", "OPTIONS"):
                return f"{message.method} {sent[0]}", None, peer
            scope = dialog_scope(message.call_id, _peer_name(peer))
            return f"dialog {scope}", scope, peer
        if (message.method == "INVITE" and not message.to_tag) or self._in_our_dialog(message):
            # accepted by open (signed by its From, when it had a body): its dialog, with
            # that peer only, so a request of another sender in the same Call-ID plants
            # nothing in this one (an initial INVITE's wait for our answer: learn).  The
            # scope names the peer as the dialog's parties do, however its From is spelt
            # (review 160 K3: six spellings of bob held six dialogs' worth)
            peer = _aor(message.get("From"))
            scope = dialog_scope(message.call_id, _peer_name(peer))
            return f"dialog {scope}", scope, peer
        return None

    def _in_our_dialog(self, request: SipMessage) -> bool:
        """The request's To tag is ours in an INVITE dialog we are in, under its Call-ID
        and between its parties (``_parties``, from what we sent).  A made-up tag names
        no dialog (review 160 K1: any request with one taught its policies)."""
        tag = request.to_tag.lower() if request.to_tag else None
        known = self._parties.get(tag) if tag else None
        return known is not None and known == (request.call_id, dialog_parties(request))

    def _own_url_only(self, policy: hdr.PolicyHeader) -> hdr.PolicyHeader:
        """The policy without a ``cert-url`` that points at another host than its own
        (or one of ``[e2m] cert_url_hosts``): a stranger must not make us fetch from
        anywhere it likes."""
        if policy.cert_url is None:
            return policy
        try:
            where = host_key(http_url_host(policy.cert_url))
        except E2MError:
            where = ""
        if where in (host_key(policy.host), *self.config.cert_url_hosts):
            return policy
        return replace(policy, cert_url=None)

    @staticmethod
    def _sent_key(message: SipMessage) -> tuple[str, int, str, str]:
        number, method = message.cseq
        return message.call_id, number, method, message.via_branch()

    def _sent_for(self, response: SipMessage) -> tuple[str, float, bool, int] | None:
        """The request of ours ``response`` answers, while its transaction may still be
        answered (``_SENT_LIFETIME`` since it was sent or last answered 1xx), else None."""
        try:
            sent = self._sent.get(self._sent_key(response))
        except E2MError:
            return None
        if sent is None or self._clock() - sent[1] > _lifetime(response.cseq[1]):
            return None
        return sent

    def _record_sent(self, request: SipMessage) -> None:
        """Remember a request we send for a transaction's lifetime (bounded)."""
        if request.method in ("ACK", "CANCEL"):
            return
        try:
            key = self._sent_key(request)
        except E2MError:
            return
        now = self._clock()
        self._sent[key] = (request.start_line.request_uri, now, bool(request.to_tag), 0)
        self._sent.move_to_end(key)
        while self._sent and (len(self._sent) > _MAX_SENT
                              or now - next(iter(self._sent.values()))[1] > _INVITE_LIFETIME):
            self._sent.popitem(last=False)

    @staticmethod
    def _local_tag(message: SipMessage, *, sent: bool) -> str | None:
        """Our own tag on ``message``: From of a request we send or a response we get,
        To of a response we send or a request we get."""
        ours_in_from = message.is_request == sent
        tag = message.from_tag if ours_in_from else message.to_tag
        return tag.lower() if tag else None

    def _record_parties(self, message: SipMessage) -> None:
        """Remember who an INVITE dialog of ours is between (our tag -> Call-ID and the
        two AoRs), from what we send in it: our INVITEs (re-INVITEs too), our answers to
        an INVITE that make one.  Not other answers (pjsua's to a stranger's OPTIONS
        must not push our dialogs out), nor other requests (our NOTIFYs in a stranger's
        subscription; a REGISTER's tag may come back under another Call-ID): those only
        keep an entry of that dialog fresh.  The first record stays; the least recently
        used goes first."""
        if message.method != "INVITE" or (not message.is_request and (message.status or 0) >= 300):
            # a request of ours inside an INVITE dialog keeps its entry fresh; any other
            # dialog we send in (our NOTIFYs in a stranger's subscription) adds none
            if message.is_request and message.to_tag:
                known = self._local_tag(message, sent=True)
                if known in self._parties and self._parties[known][0] == message.call_id:
                    self._parties.move_to_end(known)
            return
        tag = self._local_tag(message, sent=True)
        parties = dialog_parties(message)
        if not tag or not parties:
            return
        branch = None if message.is_request else _top_branch(message)
        if tag not in self._parties and branch is not None:
            self._answered[tag] = branch
            if message.from_tag:
                self._callers[tag] = message.from_tag.lower()
        self._parties.setdefault(tag, (message.call_id, parties))
        self._parties.move_to_end(tag)
        while len(self._parties) > MAX_DIALOGS:
            self._drop_party(self._parties.popitem(last=False)[0])

    def _drop_party(self, tag: str) -> None:
        self._parties.pop(tag, None)
        self._confirmed.pop(tag, None)
        self._answered.pop(tag, None)
        self._callers.pop(tag, None)
        self._early_peers.pop(tag, None)

    def _note_confirmed(self, message: SipMessage, *, sent: bool) -> None:
        """A 2xx to an INVITE confirms the dialog of our tag in it: one we send, or one
        we get to an INVITE we sent (a stranger's forged 200 to his own call confirms
        nothing, else its 487 would no longer end it)."""
        if message.is_request or message.method != "INVITE" or not 200 <= (message.status or 0) < 300:
            return
        if not sent and self._sent_for(message) is None:
            return
        tag = self._local_tag(message, sent=sent)
        remote = message.from_tag if sent else message.to_tag
        if tag in self._parties and remote:
            self._confirmed.setdefault(tag, remote.lower())     # the first 2xx's, not a fork's

    def _note_early_peer(self, response: SipMessage) -> None:
        """A 1xx/2xx with a To tag to an INVITE we sent: that tag is the peer's in an
        early dialog of ours (a fork's), whose keys live under it before any 2xx."""
        if response.is_request or response.method != "INVITE" \
                or not 100 < (response.status or 0) < 300 or not response.to_tag:
            return
        if self._sent_for(response) is None:
            return
        tag = self._local_tag(response, sent=False)
        remote = response.to_tag.lower()
        # only a tag that holds keys (a slot needs a body the peer signed): a hop's bare
        # 180s with made-up tags must not fill the list before the callee's (review 56)
        if tag not in self._parties or not self.dialog_keys.holds(response, remote):
            return
        peers = self._early_peers.setdefault(tag, [])
        if remote not in peers and len(peers) < MAX_SLOTS_PER_CALL:
            peers.append(remote)

    def _forget_parties(self, message: SipMessage, *, sent: bool) -> None:
        """The dialog ``message`` ends: the entry of our tag in it goes, so the table
        holds dialogs still under way and no flood of ended ones (a stranger's INVITE and
        CANCEL, again and again) pushes a live call out of it (which would let carol in,
        fail open).  Only on what shows the end for sure: our BYE, our 2xx to a BYE, a
        failure ending our INVITE, our failure to the INVITE we rang for; never a BYE
        we get (pjsip may refuse it, 481 or 500, and the call goes on)."""
        tag = self._local_tag(message, sent=sent)
        known = self._parties.get(tag) if tag else None
        if known is None or known[0] != message.call_id:
            return
        remote = message.to_tag if message.is_request == sent else message.from_tag
        confirmed = self._confirmed.get(tag)
        if confirmed is not None and (remote or "").lower() != confirmed:
            return        # another dialog of the same INVITE (a fork we end), not this one
        self._drop_party(tag)

    def _ends_by_our_word(self, message: SipMessage) -> bool:
        """Our BYE, or our 2xx to a BYE."""
        if message.method != "BYE":
            return False
        return message.is_request or 200 <= (message.status or 0) < 300

    def _ends_our_answered_attempt(self, response: SipMessage) -> bool:
        """A failure we send to the INVITE whose 18x began the entry, before any 2xx
        confirmed it (a 487 after a CANCEL, a 486, a 603), ends it.  A failure to
        another INVITE naming our tag (a hop's, answered 481 or 491) ends nothing."""
        if response.is_request or response.method != "INVITE" or (response.status or 0) < 300:
            return False
        tag = self._local_tag(response, sent=True)
        began = self._answered.get(tag) if tag is not None else None
        return began is not None and tag not in self._confirmed and began == _top_branch(response)

    def _check_parties(self, message: SipMessage) -> None:
        """``BindingMismatchError`` for a message that names one of our INVITE dialogs
        (our tag: To of a request, From of a response) with another Call-ID or other
        parties than the dialog's.  pjsip finds the dialog of a request by the tags
        alone (not even the Call-ID), so carol, signing as herself, could otherwise
        re-INVITE, answer or end alice's call with bob (moving its media to her)."""
        if message.is_request and not message.to_tag and message.from_tag:
            self._refuse_a_live_dialogs_tag(message)
        tag = self._local_tag(message, sent=False)
        known = self._parties.get(tag) if tag else None
        if known is None:
            return
        self._parties.move_to_end(tag)
        if known != (message.call_id, dialog_parties(message)):
            raise BindingMismatchError("the message names a dialog of ours with another "
                                       "Call-ID or other parties")

    def _refuse_a_live_dialogs_tag(self, request: SipMessage) -> None:
        """``MergedRequestError`` (482) for a new dialog (a request without a To tag) whose
        sender wrote, in any letter case, a tag of a dialog of ours under way under this
        Call-ID: our own (review 51), or the peer's in it (review 53).  No UA picks
        another's tag, nor its own twice (the same INVITE by two paths is a merged
        request, RFC 3261 §8.2.2.2); the keys of a dialog live under its tags, so such a
        dialog could fill or end the live one's.  A retransmission of the INVITE that
        began a dialog we answered (its top Via branch) is pjsip's to absorb."""
        tag, call_id = request.from_tag.lower(), request.call_id
        mine = self._parties.get(tag)
        if mine is not None and mine[0] == call_id:
            raise MergedRequestError("a new dialog names one of our own tags as its "
                                     "sender's")
        branch = _top_branch(request)
        for ours, remote in self._remote_tags(call_id):
            began = self._answered.get(ours)
            if remote == tag and (began is None or began != branch):
                raise MergedRequestError("a new dialog names the peer's tag of a dialog "
                                         "of ours under way")

    def _remote_tags(self, call_id: str) -> list[tuple[str, str]]:
        """(our tag, a peer's tag) of each dialog of ours under ``call_id`` whose peer's
        tag we know: the one its first 2xx confirmed, the caller's of an INVITE we
        answered, each fork's of an INVITE of ours that is ringing (review 55).
        Lower-cased."""
        found = []
        for ours, (known_call_id, _) in self._parties.items():
            if known_call_id != call_id:
                continue
            remotes = {self._confirmed.get(ours), self._callers.get(ours),
                       *self._early_peers.get(ours, ())}
            found.extend((ours, remote) for remote in remotes if remote)
        return found

    def accepts_proxy(self, host: str, peer: str | None = None) -> bool:
        """Whether ``host`` may be asked to read our bodies at all (digest §7: the
        proxy's name in our domain or the peer's).  ``[e2m] accept_proxies``
        overrides: exact hosts, or ``.domain`` suffixes."""
        name = host_key(host)
        allowed = list(self.config.accept_proxies)
        if not allowed:
            for aor in (self.config.aor, peer):
                identity = identity_of(aor) if aor else None
                if identity is not None:
                    allowed += [identity.host.lower(), "." + identity.host.lower()]
        return any(name == a or (a.startswith(".") and name.endswith(a)) for a in allowed)

    def certificates_wanted(self) -> list[CertificateWanted]:
        """Learned policies whose proxy certificate we do not hold yet, or whose held one
        is not the one they announce (the proxy changed its key: review 166 HB1), each
        host and URL once, those for everything we send first: a dialog's URL for a host
        must not stand before the registrar's (review 166 K2)."""
        with self._lock:
            out: dict[tuple[str, str | None], CertificateWanted] = {}
            for p in sorted(self.policies.everywhere(), key=lambda p: p.scope is not None):
                if self._needs_certificate(p.host, p.fingerprint):
                    out.setdefault((host_key(p.host), p.url),
                                   CertificateWanted(p.host, p.url, p.fingerprint))
            return list(out.values())

    def _needs_certificate(self, host: str, fingerprint: bytes | None) -> bool:
        """No certificate of ``host`` is held, or the one held is not the one
        ``fingerprint`` (when given) names (lock held)."""
        held = self.certs.proxy(host)
        return held is None or (fingerprint is not None
                                and not matches_fingerprint(held, fingerprint))

    def add_proxy_certificate(self, host: str, der_or_pem: bytes) -> x509.Certificate:
        """Check and keep a proxy certificate (fetched from a policy's URL, or a 496 body).

        Raises ``CertificateRejectedError`` when it is not ``host``'s, is not
        trusted, has expired, or does not match the fingerprint ``host`` announced.
        """
        cert = _certificate_from(der_or_pem)
        with self._lock:
            self._check_not_pinned(host, cert)
            fingerprint = self.policies.fingerprint(host)
            if fingerprint is not None and not matches_fingerprint(cert, fingerprint):
                raise CertificateRejectedError(
                    f"certificate for {host} does not match the fingerprint it announced")
            held = self.certs.proxy(host)
            if held is not None and not any(
                    matches_fingerprint(cert, announced)
                    for announced in self.policies.announced_fingerprints(host)):
                # another key replaces the held one only where a policy in force names
                # it (a dialog's too: a proxy that changed its key, review 166 HB1); a
                # dialog's word alone never drops the held one (review 164 K2)
                raise CertificateRejectedError(
                    f"a certificate for {host} is held, and no policy names this one")
            self.certs.add_proxy(host, cert)  # chain, name and time checks
        return cert

    def _check_not_pinned(self, host: str, cert: x509.Certificate) -> None:
        """A configured proxy's certificate is pinned: nothing from the wire (a fetch, a
        496) replaces it, even one the same CA issued for that name."""
        if not self.policies.is_configured(host):
            return
        pinned = self.certs.proxy(host)
        der = serialization.Encoding.DER
        if pinned is None or pinned.public_bytes(der) != cert.public_bytes(der):
            raise CertificateRejectedError(f"{host} is configured with another certificate, "
                                           "which no answer replaces")

    def add_peer_certificate(self, aor: str, der_or_pem: bytes, *,
                             expires_in: float | None = None) -> x509.Certificate:
        """Check and keep a peer's certificate exactly as a ``[peers]`` entry is checked
        (chain to ``[trust] ca``, SAN URI equal to ``aor``, validity, key usage).

        ``expires_in``: it came from a certificate service (RFC 6072) and is kept for
        that long (at most ``MAX_SERVICE_PEERS`` of them, the oldest dropped).  A
        configured ``[peers]`` entry wins: ``CertificateRejectedError`` for another
        certificate of that AoR.  Raises ``CertificateRejectedError`` naming the AoR
        and the failed check."""
        cert = _certificate_from(der_or_pem)
        name = str(aor_of(aor))
        with self._lock:
            if name in self._configured_peers:
                held = self.certs.user(name)
                der = serialization.Encoding.DER
                if held is None or held.public_bytes(der) != cert.public_bytes(der):
                    raise CertificateRejectedError(
                        f"{name} is configured in [peers] with another certificate")
                return held
            if expires_in is not None:
                check_not_a_ca(cert)
            if expires_in is not None:
                self._refuse_older(name, cert)
            self.certs.add_user(name, cert)
            self._peers_wanted.pop(name, None)
            if expires_in is not None:
                self._note_from_wire(name, cert)
                self._service_peers.pop(name, None)
                self._service_peers[name] = self._clock() + max(0.0, expires_in)
                while len(self._service_peers) > MAX_SERVICE_PEERS:
                    oldest, _ = self._service_peers.popitem(last=False)
                    self.certs.remove_user(oldest)
        return cert

    def _refuse_older(self, name: str, cert: x509.Certificate) -> None:
        """A certificate from the wire (a service's NOTIFY, a 493) issued before the one
        held for ``name``, or before the newest one the wire ever gave for it, is
        refused: a hop that kept bob's replaced certificate would otherwise bring it
        back, and an empty NOTIFY of its own, sent first, dropped the one held (review
        26).  So bob cannot go back to an older certificate over the wire: he gets a
        new one issued."""
        held = self.certs.user(name)
        newest = self._newest_from_wire.get(name)
        for known in (held.not_valid_before_utc if held is not None else None, newest):
            if known is not None and cert.not_valid_before_utc < known:
                raise CertificateRejectedError(
                    f"{name}: the service gave a certificate issued before one it gave")
        withdrawn = self._withdrawn.get(name)
        if withdrawn is not None and cert.not_valid_before_utc <= withdrawn:
            # a thief of the withdrawn key still signs with it: its signature must not
            # teach it back (review 107)
            raise CertificateRejectedError(f"{name}: a certificate its service withdrew")

    def _note_from_wire(self, name: str, cert: x509.Certificate) -> None:
        """The newest issue time the wire gave for ``name``: kept when the certificate
        goes (an empty NOTIFY), bounded as the service's peers are."""
        issued = cert.not_valid_before_utc
        newest = self._newest_from_wire.pop(name, None)
        self._newest_from_wire[name] = issued if newest is None else max(newest, issued)
        while len(self._newest_from_wire) > MAX_SERVICE_PEERS:
            self._newest_from_wire.popitem(last=False)

    def drop_peer_certificate(self, aor: str) -> bool:
        """Forget a peer certificate the service gave (an empty NOTIFY: it was removed);
        a ``[peers]`` entry stays."""
        name = str(aor_of(aor))
        with self._lock:
            if name in self._configured_peers:
                return False
            self._service_peers.pop(name, None)
            held = self.certs.user(name)
            if held is not None:
                issued = held.not_valid_before_utc
                known = self._withdrawn.pop(name, None)
                self._withdrawn[name] = issued if known is None else max(known, issued)
                while len(self._withdrawn) > MAX_SERVICE_PEERS:
                    self._withdrawn.popitem(last=False)
            return self.certs.remove_user(name)

    def is_configured_peer(self, aor: str) -> bool:
        """Whether ``aor``'s certificate is a ``[peers]`` entry (nothing on the wire
        replaces it, so there is nothing to follow)."""
        try:
            return str(aor_of(aor)) in self._configured_peers
        except E2MError:
            return False

    def peer_certificates_wanted(self) -> list[str]:
        """AoRs a protected message could not be encrypted to for want of their
        certificate (the last five minutes, at most 64): for the adapter to fetch
        from the peer's certificate service and then send again."""
        with self._lock:
            now = self._clock()
            for aor in [a for a, since in self._peers_wanted.items()
                        if now - since > _WANTED_LIFETIME]:
                del self._peers_wanted[aor]
            return list(self._peers_wanted)

    def accept_certificate_notify(self, notify: SipMessage, subscribed_to: str,
                                  expires_in: float) -> x509.Certificate | None:
        """A NOTIFY of our ``certificate`` subscription to ``subscribed_to`` (the adapter
        matched it to the subscription's dialog): its From must be that AoR
        (RFC 6072 §6.1); a body is a new certificate, no body means it was removed.
        Returns the certificate kept, or None when it was dropped."""
        try:
            sender = str(aor_of(parse_address(notify.get("From") or "").uri))
        except E2MError:
            sender = None
        wanted = str(aor_of(subscribed_to))
        if sender != wanted:
            raise CertificateRejectedError(f"a NOTIFY for {wanted} came from {sender or 'nobody'}")
        if not notify.body:
            self.drop_peer_certificate(wanted)
            return None
        return self.add_peer_certificate(wanted, notify.body, expires_in=expires_in)

    def _peer_certificate(self, aor: str) -> x509.Certificate | None:
        """The certificate to encrypt to ``aor``: configured, learnt from a signature, or
        from the service while its subscription lasts; None records it as wanted."""
        name = _peer_name(aor)
        lapses = self._service_peers.get(name)
        if lapses is not None and self._clock() > lapses:
            del self._service_peers[name]
            self.certs.remove_user(name)
        cert = self.certs.user(aor)
        if cert is None and name not in self._configured_peers:
            self._peers_wanted.pop(name, None)
            self._peers_wanted[name] = self._clock()
            while len(self._peers_wanted) > MAX_PEERS_WANTED:
                self._peers_wanted.popitem(last=False)
        return cert

    def _readers_for(self, method: str, content_type: str, call_id: str,
                     peer: str | None) -> tuple[list[LearnedPolicy], bool]:
        """Proxies that must read such a body to ``peer`` in that call (with a usable
        certificate), and whether any of them (or a 495 we got) wants it signed.  Each is
        asked again whether it may read what goes to this peer: a proxy of the peer's
        domain learnt for one peer reads nothing we send to others."""
        wanted = [p for p in self.policies.wanting(method, content_type,
                                                   scope=dialog_scope(call_id, _peer_name(peer)))
                  if self.certs.proxy(p.host) is not None
                  and (self.policies.is_configured(p.host) or self.accepts_proxy(p.host, peer))]
        asked = self._asked_to_sign(method, peer) or any(
            p.wants_signature(method, content_type) for p in wanted)
        return wanted, asked

    def _asked_to_sign(self, method: str, peer: str | None) -> bool:
        """A 495 to a ``method`` of ours to ``peer`` asked for a signature, and the ask
        has not lapsed (``_learn_495``)."""
        key = (method, _peer_name(peer))
        lapses = self._sign_asks.get(key)
        if lapses is not None and self._clock() >= lapses:
            del self._sign_asks[key]
            return False
        return lapses is not None

    def legacy_peer(self, aor: str | None) -> LegacyPeer | None:
        """The ``[[legacy]]`` entry for ``aor`` (an RFC 3261 stack), if any."""
        return next((entry for entry in self.config.legacy if entry.matches(aor)), None)

    def forget_call(self, call_id: str) -> None:
        """The application saw the call end without a message we opened (a local
        timeout, a transport error): every key of that Call-ID goes."""
        with self._lock:
            self.dialog_keys.forget_call(call_id)
            self.policies.end_call(call_id)
            for key in [k for k in self._invite_policies if k[0] == call_id]:
                del self._invite_policies[key]
            self._retries.pop(call_id, None)
            # The parties entries stay: another dialog of ours may share the Call-ID (a
            # stranger's second call reusing it), and an entry left behind only refuses.

    # ------------------------------------------------------------------
    # Protect

    def protect(self, message: SipMessage) -> Protected:
        """Encrypt the body of an outgoing request or response as policy says.

        Raises ``MissingPeerCertificateError`` (nothing may be sent) when
        E2M is required and the peer cannot be encrypted to.
        """
        with self._lock:
            if message.is_request:
                self._record_sent(message)
            else:
                self._settle_invite_policies(message)
            self._record_parties(message)
            ends_attempt = self._ends_our_answered_attempt(message)
            if ends_attempt or (not message.is_request and self._ends_by_our_word(message)):
                # our 2xx to a BYE (pjsip sends it only for a dialog it has: a hop's BYE
                # with a made-up tag gets 481 and ends nothing, review 49), or our
                # failure to the INVITE we rang for (the 487 after a CANCEL: our own 183
                # key goes too, review 49); our own BYE ends its keys in _protect
                self._end_dialog(message, sent=True)
            if ends_attempt or self._ends_by_our_word(message):
                self._forget_parties(message, sent=True)
            protected = self._protect(message)
            # only what is sent confirms a dialog and settles keys: a 200 we could not
            # seal is never sent (the stack answers 500 instead, which must end the
            # attempt, review 56)
            self._note_confirmed(message, sent=True)
            if not message.is_request:
                # our answer settles the keys the request offered (every response the
                # stack sends passes here, its own 491 and 487 too)
                self.dialog_keys.answered(message)
            return protected

    def _protect(self, message: SipMessage) -> Protected:
        method = message.method
        if message.is_request and method == "BYE":
            self._end_dialog(message, sent=True)
        part = message_body(message)
        if part is None or has_protection(part) or not self._protectable(message, part):
            if part is not None:
                self._refuse_to_send_plaintext(message, part)
            return Protected(message, SecurityInfo(content_type=part.content_type.mime_type
                                                   if part else None))
        ctype = part.content_type.mime_type
        content = part.decoded()
        peer = _aor(message.get("To") if message.is_request else message.get("From"))
        legacy = self.legacy_peer(peer)
        proxies, asked = self._readers_for(method, ctype, message.call_id, peer)
        # Signed by default (encryption alone says nothing about who wrote it); a
        # legacy peer that cannot verify gets it unsigned unless a proxy asks.
        sign = asked or (self.config.sign and (legacy is None or legacy.sign))
        signer = (self.config.certificate, self.config.private_key) if sign else None
        reuse_ok = self.config.cek_reuse and method in SESSION_METHODS and legacy is None
        shared = self.dialog_keys.reusable(message, exclusive=False,
                                           acceptable=self._chooser(peer)) if reuse_ok else None
        # Whoever must read it, plus whoever already holds the dialog key we reuse.
        audience = frozenset(p.host for p in proxies) | (shared.readers if shared else frozenset())
        keyed = ctype == "application/sdp" and has_keys(content, self.config.keying_attributes)
        if audience and not keyed and ctype != "application/sdp" \
                and holds_keys(part, self.config.keying_attributes):
            # only a whole SDP is split; keys inside anything else (an SDP in a MESSAGE's
            # multipart, an INVITE in a sipfrag) would be sealed for the proxies too
            # (review 167 K1)
            raise PolicyError(f"SRTP keys inside a {ctype} body would reach "
                              + ", ".join(sorted(audience))
                              + ": send the SDP as the whole body, or without its keys")
        if keyed and audience and not self.config.split_sdp:
            # SRTP keys never go under a key a proxy could hold: split, or do not send.
            raise PolicyError("an SDP with SRTP keys would reach " + ", ".join(sorted(audience))
                              + "; [e2m] split_sdp = false forbids the split that keeps them out")
        split = keyed and bool(audience)
        if split and (signer is None or legacy is not None):
            # Sealed keys are trusted for their signature: unsigned, whoever holds the
            # shared key (the proxy) could put its own keys in their place.
            raise PolicyError("an SDP with SRTP keys can pass a proxy only signed, and not "
                              "to a [[legacy]] peer (which cannot read sealed keys)")
        # a multipart's boundary goes in with it (it was lost, and the whole entity
        # became unreadable once its parts were looked into: review 126)
        sealed_type = str(part.content_type) if part.content_type.is_multipart else ctype
        seal = dict(message=message, peer=peer, ctype=sealed_type, signer=signer,
                    reuse_ok=reuse_ok, cipher="aes-128-cbc" if legacy is not None else None)
        try:
            sealed_keys, keys_reused = None, False
            if split:
                # The proxy reads the SDP without its keys; the keys go to the peer alone,
                # under our signature, and the peer puts them back (docs/protocol.md §6.1).
                content, keys = separate_keys(content, self.config.keying_attributes)
                sealed_keys, keys_reused = self._seal_keys(message, peer, keys, reuse_ok)
            entity, reused = self._seal_for(content=content, readers=audience,
                                            exclusive=not audience, handling="required",
                                            sealed_keys=sealed_keys, **seal)
            label_cid, reused = entity.content_id, reused or keys_reused
        except MissingPeerCertificateError:
            if self.config.require_e2m:
                raise
            return Protected(message, SecurityInfo(content_type=ctype))
        out = with_entity(message.remove(hdr.PROXY_REQUIRED_BODY), entity)
        for host in sorted(audience - {"?"}):
            out = out.add(hdr.PROXY_REQUIRED_BODY, hdr.format_proxy_required_body(
                hdr.BodyLabel(host, (label_cid,) if label_cid else ())))
        info = SecurityInfo(encrypted=True, peer=peer, readable_by=tuple(sorted(audience - {"?"})),
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
                  readers: frozenset[str], exclusive: bool,
                  signer: tuple[x509.Certificate, object] | None, reuse_ok: bool,
                  handling: str, cipher: str | None,
                  sealed_keys: bytes | None = None) -> tuple[mime.MimePart, bool]:
        """One envelope for the peer plus ``readers``; returns (entity, reused a key).

        The part's signed SIP context says who may read it (``readers`` and whoever
        holds the reused key): what the peer decides key exclusivity from.
        """
        recipients, key, reference = self._peer_recipient(message, peer, exclusive, reuse_ok)
        holders = key.readers if key is not None else frozenset()
        legacy = self.legacy_peer(peer) is not None
        for host in sorted(readers - holders - {"?"}):
            cert = self.certs.proxy(host)
            if cert is not None:
                recipients.append(_recipient(cert, legacy))
        cid = mime.new_content_id(self._local_host())
        entity, sealed = protect_content(ctype, content, recipients, signer=signer,  # type: ignore[arg-type]
                                         cek_reference=reference, content_id=cid,
                                         handling=handling, cipher=cipher,
                                         bind_to=message if self._bind else None,
                                         readers=sorted((readers | holders) - {"?"}),
                                         at=self._clock(), sealed_keys=sealed_keys)
        if reference is not None:
            # Not reusable until the peer shows it holds it: the request may be refused.
            self.dialog_keys.offer(message, reference, sealed.cek, readers)
        return entity, key is not None

    def _seal_keys(self, message: SipMessage, peer: str | None, keys: SdpKeys,
                   reuse_ok: bool) -> tuple[bytes, bool]:
        """An SDP's keying lines for the peer alone: under the dialog key only the two
        of us hold, else its certificate (the new key then offered as exclusive)."""
        recipients, key, reference = self._peer_recipient(message, peer, True, reuse_ok)
        sealed = seal_keys(keys, recipients[0], cek_reference=reference)
        if reference is not None:
            self.dialog_keys.offer(message, reference, sealed.cek, frozenset())
        return sealed.der, key is not None

    def _peer_recipient(self, message: SipMessage, peer: str | None, exclusive: bool,
                        reuse_ok: bool) -> tuple[list[Recipient], DialogKey | None, bytes | None]:
        """The peer's RecipientInfo, the dialog key it reuses (or None) and the fresh
        CEKReference to offer (or None).  A reusable dialog key becomes a kekri (RFC 3185:
        KEK = reversed CEK); without one, the peer's checked certificate is needed."""
        key = self.dialog_keys.reuse(message, exclusive=exclusive,
                                     acceptable=self._chooser(peer)) if reuse_ok else None
        if key is not None:
            return [reuse_kek(key.cek, key.reference)], key, None
        peer_cert = self._peer_certificate(peer) if peer else None
        if peer_cert is None:
            raise MissingPeerCertificateError(f"no checked certificate for {peer or 'the peer'}")
        return ([_recipient(peer_cert, self.legacy_peer(peer) is not None)], None,
                new_reference() if reuse_ok else None)

    def _chooser(self, peer: str | None) -> Callable[[str], bool]:
        """Whether we would ask ``host`` to read our bodies ourselves: configured, or
        one ``accepts_proxy`` takes (as for a policy we act on).  A dialog key whose
        holders are not all such hosts is not reused for what we send (review 75)."""
        return lambda host: self.policies.is_configured(host) or self.accepts_proxy(host, peer)

    def _local_host(self) -> str:
        identity = identity_of(self.config.aor)
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
        # every part, layer, signature and certificate path of this one message spends
        # one budget of public-key operations (cms/budget.py)
        message.check_unambiguous()
        with self._lock, message_budget(DEFAULT_LIMITS.max_public_key_ops):
            opened = self._open(message)
            # what a response shows about our dialogs and keys, only once it is accepted:
            # a 2xx refused (a hop's, with a made-up tag) must not pin the dialog's peer
            # tag nor confirm keys (review 56)
            self._note_confirmed(message, sent=False)
            self._note_early_peer(message)
            self._settle(message)
        # only a message we accepted may teach us anything (a refused one is a stranger's)
        self.learn(message)
        return opened

    def _open(self, message: SipMessage) -> Opened:
        method = message.method
        self._check_parties(message)
        if not message.is_request and method == "INVITE" and self._ends_dialog(message):
            # a dialog-creating INVITE's keys still open a 2xx relayed after its failure
            # (RFC 3261 16.7) as long as the proxies keep theirs (review 127), and none
            # is used to send again; a dialog the peer says is gone (408, 481) ends
            sent = self._sent_for(message)
            late = TRANSACTION_LIFETIME if sent is not None and not sent[2] else None
            self._end_dialog(message, sent=False, linger=late)
            self._forget_parties(message, sent=False)
        part = message_body(message)
        if part is None:
            return Opened(message, SecurityInfo())
        peer = _aor(message.get("From") if message.is_request else message.get("To"))
        legacy = self.legacy_peer(peer)
        self._refuse_plaintext(message, part)
        if not has_protection(part):
            return Opened(message, SecurityInfo(content_type=part.content_type.mime_type))
        named = self._named_hosts(message)
        limits = DEFAULT_LIMITS if legacy is None else Limits(
            accept_cbc=True, accept_unsigned_cbc=legacy.accept_unsigned_cbc)
        chosen: OpenedPart | None = None
        contexts: dict[int, SipContext | None] = {}
        offered: list[OpenedPart] = []       # their CEKs are kept once every check passed
        dialog_keys = self.dialog_keys.opening_lookup(message)   # spent once accepted
        keys = [self._own_key, dialog_keys.lookup]
        for candidate in top_parts(part):
            try:
                opened = open_part(candidate, keys,
                                   trust_anchors=self.config.trust_anchors, at=self._now(),
                                   limits=limits)
            except (NoMatchingRecipientError, DecryptionError):
                if candidate.handling == "optional":
                    continue  # a part for a proxy, not for us (e2m-sec-02 §4.2)
                raise
            self._check_signer(message, opened, peer, legacy)
            context = check_context(opened, message, labels_present=named)
            if (context is None or not opened.context_signed) and self._strict(legacy):
                raise BindingMismatchError(
                    "the body is not bound to this message (no signed SIP context); only a "
                    "[[legacy]] peer may send such bodies")
            contexts[id(opened)] = context if opened.context_signed else None
            offered.append(opened)
            if chosen is None and candidate.handling != "optional":
                chosen = opened
        if chosen is None:
            raise UndecipherableError("no body part is for us")
        if self.config.require_e2m and not chosen.encrypted and self._protectable(
                message, chosen.entity):
            raise DowngradeError("signed but not encrypted where E2M protection is required")
        content, sealed = self._with_sealed_keys(chosen, keys, limits, peer)
        if sealed is None:
            self._refuse_keys_others_read(message, part, chosen, contexts, dialog_keys, peer,
                                          legacy)
        elif not self._for_us_alone(sealed, dialog_keys, peer, None):
            raise InconsistentSplitError("the SDP keys were sealed under a key others hold")
        self._check_replay(message, [c for c in contexts.values() if c is not None])
        # only now, the message accepted: a refused one (a replay, a downgrade) keeps
        # nothing and uses no dialog key up (review 63)
        dialog_keys.spend()
        for opened in offered:
            self._keep_received(message, opened, contexts[id(opened)], dialog_keys)
            self._learn_signer(peer, opened)
        if sealed is not None:
            self._keep_sealed(message, sealed)
        split = sealed is not None
        readers = self._readers_of(message, chosen, contexts)
        signed_by_peer = chosen.signed and peer is not None
        info = SecurityInfo(
            encrypted=chosen.encrypted, peer=peer, received=True,
            readable_by=tuple(sorted(readers)),
            signed=chosen.signed, signers=chosen.signers, trusted=signed_by_peer,
            key_reuse=any(e.recipient.kind == "kekri" for e in chosen.envelopes),
            split=split, content_type=chosen.content_type)
        plain = with_entity(message, mime.make_part(chosen.entity.content_type, content))
        return Opened(plain, info)

    def _with_sealed_keys(self, chosen: OpenedPart, keys: list[OpeningKey], limits: Limits,
                          peer: str | None) -> tuple[bytes, OpenedEnvelope | None]:
        """The content with the SDP keys sealed for us put back (docs/protocol.md §6.1),
        and the envelope they came in (None: there were none); only the peer's own
        signature may carry them."""
        found = open_sealed_keys(chosen, keys, sender=peer, limits=limits)
        if found is None:
            return chosen.content, None
        keys, envelope = found
        return merge_keys(chosen.content, keys, self.config.keying_attributes), envelope

    def _refuse_keys_others_read(self, message: SipMessage, part: mime.MimePart,
                                 chosen: OpenedPart, contexts: dict[int, SipContext | None],
                                 found: PendingUses, peer: str | None,
                                 legacy: LegacyPeer | None) -> None:
        """SRTP keys in a whole SDP are used only when nobody but us could read them: the
        body's one top part, no reader in the sender's context or labels, and each of
        its envelopes for us alone (``_for_us_alone``).  A peer that seals its keyed SDP
        for a proxy as well, or beside a copy for one, hands that proxy its media's key:
        what a split is for (reviews 179 K1, 183 K1, K3 to K5)."""
        if chosen.content_type != "application/sdp" or not chosen.encrypted:
            return       # in the clear: the require check above decides
        try:
            keyed = has_keys(chosen.content, self.config.keying_attributes)
        except E2MError:
            keyed = True     # pjmedia may read what we cannot: fail closed
        if not keyed:
            return
        if len(top_parts(part)) != 1 or self._readers_of(message, chosen, contexts) \
                or not all(self._for_us_alone(e, found, peer, legacy) for e in chosen.envelopes):
            raise InconsistentSplitError("SRTP keys in an SDP others may read: keys come only "
                                         "sealed for us, or in an SDP nobody else reads")

    def _for_us_alone(self, envelope: OpenedEnvelope, found: PendingUses, peer: str | None,
                      legacy: LegacyPeer | None) -> bool:
        """Whether only we (and the sender) can open ``envelope``: under a dialog key, one
        no proxy holds (review 183 K1, K2); else one recipient key, ours (a ``[[legacy]]``
        peer may add one for its own certificate: review 183 K3)."""
        if envelope.recipient.kind == "kekri":   # and no one else's key beside it (review 184 K1)
            return envelope.recipient_count == 1 and found.exclusive(_kekri_id(envelope))
        if envelope.recipient_count == 1:
            return True
        own = self._peer_certificate(peer) if legacy is not None and peer else None
        return own is not None and envelope.recipient_count == 2 and addressed_only_to(
            envelope.recipient_infos, [self.config.certificate, own])

    def _keep_sealed(self, message: SipMessage, envelope: OpenedEnvelope) -> None:
        """The sealed keys' CEK, sealed for us alone, may carry our own keys back: kept as
        a key no proxy holds, only when sealed to our certificate (a kekri under a
        dialog key says nothing new, and under a key a proxy holds it must not become
        "ours alone")."""
        if self.config.cek_reuse and message.method in SESSION_METHODS \
                and envelope.recipient.kind != "kekri" \
                and envelope.cek_reference is not None and envelope.cek is not None:
            self.dialog_keys.keep_received(message, envelope.cek_reference, envelope.cek,
                                           readers=frozenset())

    def _ends_dialog(self, response: SipMessage) -> bool:
        """A failure answer to an INVITE of ours ends its keys' dialog when the INVITE
        made the dialog, or says the dialog is gone (481, 408: RFC 3261 §12.2.1.2).  A
        re-INVITE's failure (a proxy's 407, a 491) leaves the dialog as it was: only the
        keys offered in that request go (``DialogKeys.settle``), else the peer would
        go on answering under keys we had dropped.  An answer to nothing we sent
        (a stranger's) ends nothing, and neither does a failure to an INVITE already
        answered 2xx (its transaction is over: pjsip drops it; only a hop that saw the
        INVITE sends it).  The first final status of each request is noted here."""
        status = response.status or 0
        sent = self._sent_for(response)
        if sent is None:
            return False
        key = self._sent_key(response)
        if status < 200:
            # an INVITE waits as long as the callee rings: each 1xx keeps it longer
            self._sent[key] = (sent[0], self._clock(), *sent[2:])
            self._sent.move_to_end(key)
            return False
        first = sent[3]
        if not first:
            self._sent[key] = (*sent[:3], status)
        if status < 300 or 200 <= first < 300:
            return False
        in_dialog = sent[2]
        if not first and not in_dialog:
            now = self._clock()
            self._failed_at[key] = now
            while self._failed_at and (len(self._failed_at) > _MAX_SENT or now - next(
                    iter(self._failed_at.values())) > TRANSACTION_LIFETIME):
                self._failed_at.popitem(last=False)
        return not in_dialog or status in (408, 481)

    def _ends_a_late_answer(self, bye: SipMessage) -> bool:
        """Whether our BYE ends a dialog a 2xx made after its INVITE had failed: the
        INVITE one CSeq below it in that Call-ID failed within TRANSACTION_LIFETIME."""
        try:
            number = bye.cseq[0] - 1
        except E2MError:
            return False
        now = self._clock()
        return any(key[0] == bye.call_id and key[1] == number
                   and now - failed <= TRANSACTION_LIFETIME
                   for key, failed in self._failed_at.items())

    def names_a_failed_invites_branch(self, response: SipMessage) -> bool:
        """Whether ``response`` carries the Via branch of a dialog-creating INVITE of ours
        that failed at most TRANSACTION_LIFETIME ago, whatever its Call-ID and CSeq say.
        pjsip's transaction layer matches a response by that branch alone: its
        completed INVITE transaction answers any such 2xx with the failure's ACK."""
        try:
            branch = response.via_branch()
        except E2MError:
            return False
        now = self._clock()
        with self._lock:
            return any(key[3] == branch and now - failed <= TRANSACTION_LIFETIME
                       for key, failed in self._failed_at.items())

    def late_answer_to_failed_invite(self, response: SipMessage) -> int | None:
        """The first final status (a failure) of the dialog-creating INVITE of ours that
        the 2xx ``response`` answers, when that failure came at most TRANSACTION_LIFETIME
        ago; else None (no 2xx, an answer to nothing we sent, to a re-INVITE, to an
        INVITE whose first final answer was a 2xx or that has none yet).  Such a 2xx is
        owed an ACK and then a BYE (RFC 3261 13.2.2.4): the caller no longer has the
        call.  Call it on a response ``open`` accepted: it says whose answer it is by
        Call-ID, CSeq and our Via branch only, which a hop on the path also knows."""
        if response.is_request or response.method != "INVITE" \
                or not 200 <= (response.status or 0) < 300:
            return None
        with self._lock:
            sent = self._sent_for(response)
            if sent is None or sent[2] or not 300 <= sent[3]:
                return None
            try:
                failed = self._failed_at.get(self._sent_key(response))
            except E2MError:
                return None
            if failed is None or self._clock() - failed > TRANSACTION_LIFETIME:
                return None
            return sent[3]

    def _end_dialog(self, message: SipMessage, *, sent: bool,
                    linger: float | None = None) -> None:
        """The dialog (or the INVITE attempt) is over: its keys and its policies go.  A
        BYE ends here when we send it or our 2xx to it (never when it arrives: pjsip
        may refuse it, 481, and the call goes on: review 49).  It takes the keys under
        our own tag (the INVITE's, which every fork shares) and the call's policies only
        when it ends the dialog the INVITE's first 2xx made, or that dialog is not known
        (``_confirmed`` lost it); a BYE of another fork ends only its own (review 45)."""
        local = self._local_tag(message, sent=sent)
        outward = message.is_request == sent
        remote = message.to_tag if outward else message.from_tag
        # the slots of every other dialog of ours under the Call-ID stay: a second dialog
        # (a hop's bare INVITE, which pjsip takes as a new call) never ends the live
        # call's (review 51), and one held open never keeps the live call's after its
        # end (review 53)
        others = self._tags_of_other_dialogs(message, local, remote)
        if message.method == "BYE":
            confirmed = self._confirmed.get(local) if local else None
            if (remote or "").lower() != confirmed and not (sent and confirmed is None) \
                    or sent and confirmed is None and self._ends_a_late_answer(message):
                # (our BYE to a 2xx after the INVITE failed: the INVITE's retired keys
                # still open another fork's late 2xx until their open_until, review 129)
                self.dialog_keys.end_dialog(message, peer_tag=remote or "", keep=others)
                return
        self.dialog_keys.end_dialog(message, keep=others, linger=linger)
        # the policies of this dialog's peer only (a third party's call under the same
        # Call-ID ends its own, review 51), and not while another dialog of ours with
        # that peer is under way: a policy's scope is the Call-ID and the peer (53)
        peer = _aor(message.get("To") if outward else message.get("From"))
        if not self._another_dialog_with(message.call_id, peer, local):
            self.policies.end_scope(dialog_scope(message.call_id, _peer_name(peer)))

    def _tags_of_other_dialogs(self, message: SipMessage, local: str | None,
                               remote: str | None) -> frozenset[str]:
        """The tags (lower-cased) whose keys another dialog of ours under ``message``'s
        Call-ID holds, the one of our tag ``local`` (its peer's ``remote``) ending: each
        one's own tag and the peers' tags an INVITE of ours learnt from responses it
        accepted; a caller's tag of an INVITE we answered only when it is none of the
        ending dialog's, since a caller writes it (a hop's held dialog naming the callee's
        tag must not keep the real call's keys past its end: reviews 55, 56)."""
        sure, written = self._dialog_tags(local)
        own = sure | written | {(remote or "").lower()}
        kept: set[str] = set()
        for ours, (call_id, _) in self._parties.items():
            if ours != local and call_id == message.call_id:
                sure, written = self._dialog_tags(ours)
                kept |= sure | (written - own)
        return frozenset(kept)

    def _dialog_tags(self, ours: str | None) -> tuple[set[str], set[str]]:
        """(the tags of our dialog of tag ``ours`` that are sure: ours, and for an INVITE
        we sent the peers' tags from responses we accepted; the tag its caller wrote, for
        an INVITE we answered)."""
        if ours is None or ours not in self._parties:
            return {ours} if ours else set(), set()
        if ours in self._answered:
            return {ours}, {t for t in (self._confirmed.get(ours), self._callers.get(ours)) if t}
        confirmed = self._confirmed.get(ours)
        return {ours, *self._early_peers.get(ours, ()), *([confirmed] if confirmed else [])}, set()

    def _another_dialog_with(self, call_id: str, peer: str | None, local: str | None) -> bool:
        """Whether a dialog of ours other than the one of our tag ``local`` is under way
        under ``call_id`` with ``peer`` as one of its parties."""
        return any(ours != local and known_call_id == call_id and peer in parties
                   for ours, (known_call_id, parties) in self._parties.items())

    def _strict(self, legacy: LegacyPeer | None) -> bool:
        """Whether a body must be signed and bound (everyone but a lenient legacy peer)."""
        return self.config.require_signature and not (legacy is not None and legacy.accept_unsigned)

    def _refuse_plaintext(self, message: SipMessage, part: mime.MimePart) -> None:
        """``DowngradeError`` for content that must be protected found in the clear
        anywhere in the body, however deeply nested: an SDP, or a MESSAGE's text."""
        if not self.config.require_e2m or (not message.is_request and (message.status or 0) >= 300):
            return
        if message.method == "ACK" and not part.body:
            return
        for leaf in plaintext_leaves(part):
            ctype = leaf.content_type.mime_type
            if ctype == "application/sdp" or (message.is_request and message.method == "MESSAGE"):
                raise DowngradeError(f"plaintext {ctype} body where E2M protection is required")

    def _refuse_to_send_plaintext(self, message: SipMessage, part: mime.MimePart) -> None:
        """A body we would pass on as it is must hold no SDP or MESSAGE text in the clear
        at any depth (a multipart of SDP and a location object, a multipart beside an
        S/MIME part): we do not protect such bodies part by part, so with ``require`` on
        they are not sent at all (``PolicyError``), rather than their keys going out."""
        if not self.config.require_e2m:
            return           # as it was, SDES keys too: what require = false chooses
        if holds_keys(part, self.config.keying_attributes):
            # SRTP keys never go out in the clear, whatever the method or status (a 488
            # with the callee's keyed SDP was sent as written: review 167 K2), wherever
            # they sit (a signature hides nothing: review 169)
            raise PolicyError(f"a {part.content_type.mime_type} body with SRTP keys would go "
                              "out in the clear: keys travel only in a protected offer or answer")
        if not message.is_request and (message.status or 0) >= 300:
            return
        for leaf in plaintext_leaves(part):
            ctype = leaf.content_type.mime_type
            if ctype == "application/sdp" or (message.is_request and message.method == "MESSAGE"):
                raise PolicyError(f"a {ctype} inside a {part.content_type.mime_type} body would go "
                                  "out in the clear: send it as the whole body to have it protected")

    def _check_replay(self, message: SipMessage, contexts: list[SipContext]) -> None:
        """A request's body seen before is a replay (a repeat with the same top Via
        branch within a transaction's lifetime is a retransmission); a response's must
        at least be recent (pjsip drops a response that matches none of our
        transactions)."""
        if not contexts:
            return
        if message.is_request:
            self.replay.check_and_record(contexts[0], message.via_branch(), retransmissions=True)
        else:
            contexts[0].check_time(self._clock(), self.config.replay_window)

    @staticmethod
    def _readers_of(message: SipMessage, chosen: OpenedPart,
                    contexts: dict[int, SipContext | None]) -> set[str]:
        """Who else may read what we got: the readers the sender signed for, or, for a
        body with no signed context (a legacy peer), what its labels claim."""
        context = contexts.get(id(chosen))
        if context is not None:
            return set(context.readers)
        labels = UAEngine._labels_by_cid(message)
        return labels.get(chosen.cid or "", set()) | labels.get("*", set())

    def _settle(self, message: SipMessage) -> None:
        """What ``message`` shows about the keys we offered (``DialogKeys.settle``);
        a 2xx also shows the retries worked, so they are counted anew.  A response
        settles only the keys of the request its whole CSeq names (``settle``), and only
        when it answers a request we sent (``_sent_for``: its Via branch too), so a
        stray one naming the dialog and the CSeq settles nothing (review 38)."""
        if not message.is_request and self._sent_for(message) is None:
            return
        self.dialog_keys.settle(message)
        if 200 <= (message.status or 0) < 300:
            self._retries.pop(message.call_id, None)

    def _check_signer(self, message: SipMessage, opened: OpenedPart, peer: str | None,
                      legacy: LegacyPeer | None) -> None:
        """A body must be signed by its sender: the From of a request, the To of a
        response (unless ``[e2m] require_signature`` is off or a ``[[legacy]]`` entry
        accepts unsigned bodies from the peer).  The signer's certificate is kept once
        the message is accepted (``_learn_signer``)."""
        if not opened.signed:
            if self._strict(legacy):
                raise SignatureRequiredError(
                    "unsigned body refused ([e2m] require_signature; a [[legacy]] peer may be "
                    "allowed accept_unsigned)")
            return
        if peer is None:
            raise UntrustedSignerError("the body is signed but the message names no sender")
        try:
            check_signed_by(opened, peer)
        except E2MError as exc:
            raise UntrustedSignerError(f"signature is not the sender's: {exc}") from None

    def _learn_signer(self, peer: str | None, opened: OpenedPart) -> None:
        """A verified sender certificate we can encrypt to is kept, so we can answer
        without a 493 round trip: only from a message accepted (a refused replay must
        not plant one), and checked as every certificate from the wire is (not a CA,
        not issued before one held or given for that peer: a hop's copy of an old
        signed message must not bring a replaced key back, review 65).  A newer
        certificate of the peer's own replaces one held from the wire (review 107: bob
        signs with his new key after the old one was stolen); one its service withdrew
        is never learnt again."""
        if peer is None or not opened.signed:
            return
        with self._lock:
            held = self.certs.user(peer)
            if held is not None and (str(aor_of(peer)) in self._configured_peers or not any(
                    c.not_valid_before_utc > held.not_valid_before_utc
                    for c in opened.signer_certificates)):
                return
            for cert in opened.signer_certificates:
                try:
                    check_not_a_ca(cert)
                    self._refuse_older(peer, cert)
                    self.certs.add_user(peer, cert)
                except E2MError:
                    continue  # not encryptable, not the peer's, or older: keep looking
                self._note_from_wire(peer, cert)
                return

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
                       context: SipContext | None, found: PendingUses) -> None:
        """Keep the CEK the sender offered for reuse, with who else holds it: the readers
        of its signed SIP context, and only the reference that context names (one a
        co-recipient put in a re-made envelope is not the sender's offer).

        Without a signed context (only where ``_strict`` allows it: a legacy peer, or
        ``require_signature`` off) nothing vouches for the holders; the labels are the
        best guess.  Either way a recipient key beyond us and the named readers is an
        unknown holder, so such a key is never taken for SRTP keys; and a key offered
        under a dialog key is held by whoever holds that one too."""
        if not self.config.cek_reuse or message.method not in SESSION_METHODS:
            return
        if not message.is_request and self._sent_for(message) is None:
            return    # an answer to nothing we sent keeps nothing (review 47: a flood of them)
        for reference, cek, envelope in opened.cek_references:
            readers: frozenset[str] | None
            if context is not None:
                if context.cek_reference != reference:
                    continue
                readers = frozenset(context.readers)
                if envelope.recipient_count > 1 + len(readers):
                    readers = None       # more holders than the sender named: unknown ones
            else:
                labels = self._labels_by_cid(message)
                named = frozenset(labels.get(opened.cid or "", set()) | labels.get("*", set()))
                readers = named if envelope.recipient_count <= 1 + len(named) else None
            if readers is not None and envelope.recipient.kind == "kekri":
                # whoever holds the key it came under can unwrap it too (review 184 K2)
                holders = found.holders(_kekri_id(envelope))
                readers = None if holders is None else readers | holders
            self.dialog_keys.keep_received(message, reference, cek, readers=readers)

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
        the announced one) gives ``fail`` and nothing is sent.  An answer to nothing
        we sent (``_sent_for``: its Via branch too), or to another request than
        ``request``, gives ``none``: a stray 493 the SIP stack drops must not retire
        the dialog's keys nor offer a key for a retry never sent (review 92).
        """
        codes = self.config.codes
        status = response.status or 0
        with self._lock:
            self._settle(response)
            count = self._retries.get(request.call_id, 0)
            if status not in (codes.proxy_indecipherable, codes.signature_required, 493):
                return Reaction("none", f"{status} is not an E2M answer")
            if self._sent_for(response) is None or not _answers(response, request):
                return Reaction("none", f"{status} answers nothing we sent")
            # one E2M answer per request: a second copy (a hop's replay, a retransmission
            # for a lost ACK) must not offer a key for another retry (review 95)
            self._sent.pop(self._sent_key(response), None)
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
            self._retries.pop(request.call_id, None)
            self._retries[request.call_id] = count + 1
            while len(self._retries) > MAX_DIALOGS:    # the oldest call's count goes first
                self._retries.popitem(last=False)
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
        self._check_not_pinned(host, cert)
        self.certs.add_proxy(host, cert)
        self.dialog_keys.retire_held_by(request, host)
        method = request.method
        needed = [w[1] for w in warnings if host_key(_agent_host(w[0])) == host_key(host)]
        view = tuple(hdr.Rule(method, t) for t in needed) or (hdr.Rule(method, "*"),)
        self.policies.learn_496(host, view, policy)
        return host

    def _learn_495(self, response: SipMessage, request: SipMessage) -> str:
        """A 495 asks a signature of what goes to this request's peer, for a while:
        anyone on the transaction may send one (the peer's own UA, any hop), so what it
        asks holds for that method to that peer only, and lapses as a policy without
        ``expires`` does (review 159 K1: one 495 signed every MESSAGE to every peer for
        good).  Never of a ``[[legacy]]`` peer set ``sign = false``: its stack cannot
        take our signatures (the send fails instead)."""
        peer = _aor(request.get("To"))
        legacy = self.legacy_peer(peer)
        if legacy is not None and not legacy.sign:
            raise PolicyError(f"495 asks a signature of {peer}, a [[legacy]] peer set "
                              "sign = false")
        key = (request.method, _peer_name(peer))
        self._sign_asks.pop(key, None)
        self._sign_asks[key] = self._clock() + min(DEFAULT_POLICY_EXPIRES,
                                                   self.config.max_policy_expires)
        while len(self._sign_asks) > MAX_SIGN_ASKS:
            self._sign_asks.popitem(last=False)
        return f"signature for {request.method} to {peer}"

    def _learn_493(self, response: SipMessage, request: SipMessage) -> str:
        part = message_body(response)
        peer = _aor(request.get("To"))
        if part is None or peer is None:
            raise CertificateRejectedError("493 without a certificate to encrypt to")
        if part.content_type.mime_type not in ("application/pkix-cert",):
            raise CertificateRejectedError("493 body is not application/pkix-cert")
        cert = _certificate_from(part.decoded())
        check_not_a_ca(cert)            # from the wire, as a service's would be
        name = str(aor_of(peer))
        self._refuse_older(name, cert)                  # a hop's copy of a replaced one
        self.add_peer_certificate(peer, cert.public_bytes(serialization.Encoding.DER))
        # the peer opened nothing: had the body gone under a dialog key, the retry
        # must not go under it again (review 35)
        self.dialog_keys.retire_dialog(request)
        with self._lock:
            self._note_from_wire(name, cert)
        return peer


def _answers(response: SipMessage, request: SipMessage) -> bool:
    """Whether ``response`` names ``request``'s transaction (Call-ID, CSeq, top Via
    branch)."""
    try:
        return (response.call_id, response.cseq, response.via_branch()) == \
            (request.call_id, request.cseq, request.via_branch())
    except E2MError:
        return False


def _recipient(cert: x509.Certificate, legacy: bool) -> Recipient:
    """The RecipientInfo for ``cert``: named by its subjectKeyIdentifier when it carries
    one (24 octets in a kari, not the 62 of issuer and serial number: an INVITE must fit
    pjsip's 4000 bytes, docs/protocol.md §6.2), by issuerAndSerialNumber in a
    ``[[legacy]]`` peer's envelope (RFC 3261 stacks look for that form) and for a
    certificate without the extension (no one has to compute RFC 5280's method 1)."""
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return recipient_for_certificate(cert)
    return recipient_for_certificate(cert, use_ski=not legacy)


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
    """A certificate given as DER or PEM (a 493/496 body, a fetched cert-url), counted
    before cryptography reads it either way (``readable_certificate``; review 105: a PEM
    one was read uncounted)."""
    if b"-----BEGIN" in data:      # PEM, text before the block allowed (RFC 7468 §2)
        data = _pem_certificate_der(data)
    try:
        cert = readable_certificate(data)
    except LimitExceededError as exc:     # counted before it is read (names, SAN, elements)
        raise CertificateRejectedError(f"certificate refused: {exc}") from None
    if cert is None:
        raise CertificateRejectedError("not a readable certificate")
    return cert


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN (X509 )?CERTIFICATE-----([A-Za-z0-9+/=\s]*?)"
                              rb"-----END \1?CERTIFICATE-----")


def _pem_certificate_der(data: bytes) -> bytes:
    """The DER of the first certificate in a PEM text."""
    found = _PEM_CERTIFICATE.search(data)
    if found is None:
        raise CertificateRejectedError("not a readable certificate")
    try:
        return base64.b64decode(b"".join(found.group(2).split()), validate=True)
    except (ValueError, binascii.Error):
        raise CertificateRejectedError("not a readable certificate") from None


def _agent_host(agent: str) -> str:
    """The host of a warn-agent (``host`` or ``host:port``; IPv6 in brackets); an
    agent that is no host is returned as it is and matches no proxy."""
    try:
        return split_hostport(agent)[0]
    except MalformedError:
        return agent
