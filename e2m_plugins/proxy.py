"""The proxy engine: inspect a request or response and say what to do with it.

``ProxyEngine.inspect`` never changes a body.  It finds the parts this proxy
must view (the ones ``Proxy-Required-Body`` labels for its host, or, under its
own policy, every part), opens its own RecipientInfo or a kekri under a CEK it
kept (RFC 3185), checks signatures where policy asks, and returns a
``Verdict``: forward (with headers to add or remove) or reply (code, headers,
body from the one error table), plus what it saw for the services and the
CEKs it kept in the key cache.

Order of checks, as e2m-sec-02 §5 asks: decrypt first (496 when it cannot),
then look for a signature inside (495 when none), a bad signature is 403.
Responses cannot be refused; a response the proxy cannot read is forwarded
with the error recorded in the verdict.
"""

from __future__ import annotations

import hashlib
import math
import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from cryptography.hazmat.primitives import serialization

from . import headers as hdr
from . import mime
from .body import (OpenedPart, check_context, check_signed_by, message_body, open_part,
                   readable_without_key, refuse_encoded_plaintext, refuse_hidden_parts,
                   top_parts)
from .certstore import fingerprint_sha256
from .cms.recipients import CertificateKey, KekLookup, OpeningKey
from .cms.budget import message_budget
from .cms.limits import DEFAULT_LIMITS, Limits
from .config import peer_matches
from .errors import (DecryptionError, E2MError, LimitExceededError, MalformedError,
                     NoMatchingRecipientError, ProxyCannotDecryptError, ReplayError,
                     SignatureRequiredError)
from .keycache import (DialogScope, KeyCache, Scope, TransactionScope, answer_keeper,
                       bounded_keeper)
from .config import DEFAULT_POLICY_EXPIRES, ProxyConfig
from .replay import TRANSACTION_LIFETIME, MemoryReplayCache, ReplayCache
from .srtp_keys import without_keys
from .sdp import MediaLine, media_summary
from .sipcontext import SipContext, message_aors
from .sip import SipMessage
from .sip_errors import answer_for
from .uri import identity_of

__all__ = ["ProxyEngine", "Verdict", "SeenBody", "message_scope", "kept_name", "kept_namer",
           "UNSIGNED_KEEPER", "UNAUTHENTICATED_CALLER", "LATER_FORK_KEEPER"]

PKIX_CERT = "application/pkix-cert"
# Requests that do not go on toward a UAS with a body worth announcing a policy to.
_NO_POLICY_ANNOUNCE = frozenset({"ACK", "CANCEL", "BYE", "REGISTER", "PRACK"})
# Methods whose CEKs live only for one transaction (key-reuse-01: outside a dialog).
_TRANSACTION_METHODS = frozenset({"MESSAGE", "OPTIONS", "REGISTER", "PUBLISH"})
_UNREADABLE = (NoMatchingRecipientError, DecryptionError)
# A key kept from a dialog-creating request lives only as long as that INVITE
# transaction may (Timer C, 3 min, plus margin) unless a 2xx confirms the dialog:
# a far end that never answers leaves no key behind for 12 hours.
EARLY_DIALOG_TTL = 200.0
# After the INVITE failed, a 2xx may still come for as long as its callee retransmits
# one (64*T1, RFC 6026's Timer L): its offer's keys are kept that long, no longer (the
# caller's UA keeps them as long for opening: ``DialogKeys.end_dialog(linger=...)``).
LATE_ANSWER_TTL = TRANSACTION_LIFETIME
# Dialogs (To tags) one early dialog may grow kept keys under (``ProxyEngine._fork``):
# forking (RFC 3261 §13.2.2.4) rarely confirms more than one, re-tagged copies any number
MAX_FORKS = 4


@dataclass(frozen=True, repr=False)
class SeenBody:
    """One body part the proxy viewed: for the archive, never for a log."""

    cid: str | None
    content_type: str
    plaintext: bytes
    encrypted: bool
    signature: str                    # "valid" or "none" (an invalid one is refused earlier)
    signer: str | None
    # signed, with a signed SIP context checked against this message (and recorded
    # against replay): it proves the sender of this message, not only of some message
    bound: bool = False
    # that context's time (None when not bound): the same words signed anew are a new
    # message, a re-encoded copy of one is not (the archive's uid; reviews 84, 86)
    signed_at: int | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.plaintext).hexdigest()

    def __repr__(self) -> str:
        return (f"SeenBody(cid={self.cid!r}, {self.content_type}, {len(self.plaintext)} bytes, "
                f"encrypted={self.encrypted}, signature={self.signature})")

    def summary(self) -> dict[str, Any]:
        """What may be printed: type, length and digest, never the text."""
        return {"cid": self.cid, "content_type": self.content_type, "length": len(self.plaintext),
                "sha256": self.sha256, "encrypted": self.encrypted,
                "signature": self.signature, "signer": self.signer}


class KeptLookup(NamedTuple):
    """A kept key found by kekri identifier while a body was opened (no use counted)."""

    candidate: Scope        # the scope it was found in (the message's, or an early one)
    name: bytes             # its name there (``kept_namer``)
    reference: bytes        # the kekri identifier that named it
    scope: Scope            # the message's own scope


@dataclass(frozen=True)
class BodyReading:
    """What reading a message's body showed, before anything was kept, spent or
    recorded (``ProxyEngine.read_response``): a host that must decide on a response
    before the route that applies its verdict (Kamailio drops a final reply only in
    its core reply route, where tm's transaction AVPs are not at hand) reads it once
    there and hands this to ``inspect``.  It holds the plaintext: never logged."""

    skipped: bool                       # no body, or none of our rules covers it
    opened: tuple[OpenedPart, ...] = field(default=(), repr=False)
    contexts: tuple[SipContext | None, ...] = field(default=(), repr=False)
    looked_up: tuple[KeptLookup, ...] = field(default=(), repr=False)
    seen: tuple[SeenBody, ...] = field(default=(), repr=False)
    media: tuple[MediaLine, ...] = ()
    offers: bool = False                # a part offers a key (CEK reuse)
    error: E2MError | None = field(default=None, repr=False)   # why the reading failed
    of: SipMessage | None = field(default=None, repr=False, compare=False)  # the message read
    public_key_ops: int = 0             # spent reading it, refused or not (cms/budget.py)


_SKIPPED = BodyReading(True)

# A response whose body the proxy cannot take apart or summarise (the SDP view's
# refusals, a part that does not parse, one past the limits) is dropped, not relayed
# unread: a stock caller would act on what the archive never recorded (review 133).
# So is one whose reading failed in any other way when some part of it is readable
# without a key (``_keyless_content``): a plain SDP beside a part sealed for others
# or badly signed (review 134 K1).  Only a body sealed whole is relayed with its error:
# nobody but its recipients acts on it.
REFUSED_RESPONSE_ERRORS = (MalformedError, LimitExceededError)


def _keyless_content(message: SipMessage) -> bool:
    """Whether any part of ``message``'s body can be read without a key: plaintext, or
    signed over something that is (a signature is looked through: signed over an
    envelope, RFC 3261 §23.2's encrypt-then-sign, is sealed; review 135 K1).  True too
    for a body that cannot be walked, or past the MIME limits."""
    try:
        body = message_body(message)
        return body is not None and readable_without_key(body)
    except E2MError:
        return True




@dataclass(frozen=True)
class Verdict:
    """What the adapter must do with one message."""

    action: str                                   # "forward" or "reply"
    code: int | None = None
    reason: str | None = None
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[tuple[str, str], ...] = ()
    body: bytes = field(default=b"", repr=False)
    content_type: str | None = None
    seen: tuple[SeenBody, ...] = ()
    media: tuple[MediaLine, ...] = ()
    error: str | None = None                      # the error class name: safe to log
    detail: str | None = None                     # why, in words that hold no plaintext
    # the names of the keys this request kept that were not kept before, in its own
    # scope: what ``end_attempt`` drops when its transaction fails (the host keeps them
    # with the transaction: Kamailio in a transaction AVP)
    kept: tuple[bytes, ...] = ()
    # a request's replay key (``SipContext.replay_key``): recorded with this verdict
    # (forwarded: the host may remember its answer), or the one its copy repeats (a
    # ``ReplayError`` refusal: the host may give the remembered answer instead)
    replay_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action, "code": self.code, "reason": self.reason,
            "add_headers": [list(h) for h in self.add_headers],
            "remove_headers": [list(h) for h in self.remove_headers],
            "body_content_type": self.content_type, "body_length": len(self.body),
            "viewed": [s.summary() for s in self.seen],
            "media": [{"media": m.media, "address": m.address, "port": m.port,
                       "proto": m.proto, "codecs": [c for _, c in m.codecs],
                       "direction": m.direction} for m in self.media],
            "error": self.error, "detail": self.detail,
        }

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False)


def message_scope(message: SipMessage) -> Scope:
    """Where a CEK seen in ``message`` may be reused: its dialog or its transaction."""
    number, method = message.cseq
    if method in _TRANSACTION_METHODS:
        return TransactionScope(message.call_id, number, message.via_branch(bottom=True))
    from_tag = message.from_tag
    if not from_tag:
        raise MalformedError("From without a tag")
    return DialogScope(message.call_id, from_tag, message.to_tag)


def kept_name(message: SipMessage, reference: bytes) -> bytes:
    """The name a CEK offered under ``reference`` is kept by in ``message``'s scope.

    Call-ID and tags say nothing about who the dialog is between, and a kept key is
    never replaced: a user who saw another's INVITE could first offer a CEK of her own
    under its Call-ID, From tag and reference (signed as herself), and the victim's key
    would be ignored.  So the name binds the dialog's two AoRs, in either order (both
    directions find it); the keeping message's AoRs are bound by its signed context."""
    return kept_namer(message)(reference)


def dialog_parties(message: SipMessage) -> tuple[str, str]:
    """The two AoRs a dialog is between, in either direction the same (sorted); a
    signed message's are bound by its SIP context."""
    try:
        parties = message_aors(message)
    except MalformedError:   # no user part (a legacy peer's odd From): the URIs as written
        parties = (message.address("From").uri, message.address("To").uri)
    first, second = sorted(parties)
    return first, second


def kept_namer(message: SipMessage) -> Callable[[bytes], bytes]:
    """``kept_name`` for many references of one message: the AoRs are read once (a
    stranger's body may hold hundreds of kekri)."""
    first, second = dialog_parties(message)
    prefix = hashlib.sha256(b"e2m kept cek\x00" + first.encode("utf-8", "surrogateescape")
                            + b"\x00" + second.encode("utf-8", "surrogateescape") + b"\x00")

    def name(reference: bytes) -> bytes:
        digest = prefix.copy()
        digest.update(reference)
        return digest.digest()
    return name


UNSIGNED_KEEPER = "unsigned:"   # every key an unsigned body offers, one quota for all
# The caller of every answer to a request whose From nobody authenticated: one quota for all
# (``ProxyEngine.answer_caller``).  Never an AoR as ``_keeper`` spells one.
UNAUTHENTICATED_CALLER = "unauthenticated:"
# Every key kept under a later fork of an early dialog (``ProxyEngine._fork``): anyone
# re-tagging a 2xx makes those, so they turn over only each other, never a party's keys
LATER_FORK_KEEPER = "fork:"


def _request_replay_key(contexts: Sequence[SipContext]) -> str:
    """What a request is recorded under: its first signed context with its To tag (a
    new sender's To tag is bound, a copy under another fails ``check_context``, so it
    is part of the record: her requests in two forks may share a CSeq)."""
    return contexts[0].replay_key(contexts[0].to_tag)


def _made(contexts: Sequence[SipContext | None]) -> float | None:
    """When the message's body says it was made (its first SIP context), if it says."""
    return next((float(c.time) for c in contexts if c is not None), None)


def _keeper(sender: str) -> str:
    """An AoR as a keeper (whose quota a signed key counts against), one spelling per
    AoR (host case, parameters, escapes) so that one user cannot count as many.  The
    user part keeps its case: ``Alice`` is another user than ``alice`` to digest, the
    registrar and the core, and must not spend her quota (review 68)."""
    identity = identity_of(sender)
    return str(identity) if identity is not None else sender.lower()


def _sender(request: SipMessage) -> str:
    return request.address("From").uri


class ProxyEngine:
    """One proxy's E2M decisions; thread-safe as long as the key cache is."""

    def __init__(self, config: ProxyConfig, cache: KeyCache, *,
                 clock: Callable[[], datetime] | None = None,
                 replay: ReplayCache | None = None) -> None:
        self.config = config
        self.cache = cache
        self._clock = clock
        # Shared by every worker in Kamailio (an htable); one per engine elsewhere.
        self.replay = replay if replay is not None else MemoryReplayCache(
            window=config.replay_window, clock=lambda: self._now().timestamp())
        self._legacy_limits = Limits(accept_cbc=True,
                                     accept_unsigned_cbc=config.legacy_unsigned_cbc)
        self._own_key = CertificateKey(config.certificate, config.private_key)
        self._cert_der = config.certificate.public_bytes(serialization.Encoding.DER)
        self._policy_value = hdr.PolicyHeader(
            config.host, view=config.view, verify=config.verify,
            cert_fingerprint=hashlib.sha256(self._cert_der).digest(),
            cert_url=config.cert_url,
            # absent means DEFAULT_POLICY_EXPIRES to a UA (§6): 13 octets less per INVITE
            expires=None if config.policy_expires == DEFAULT_POLICY_EXPIRES
            else config.policy_expires).format()

    def __repr__(self) -> str:
        return f"ProxyEngine({self.config.host}, cache={len(self.cache)} keys)"

    # -- public ------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def certificate_der(self) -> bytes:
        return self._cert_der

    @property
    def fingerprint(self) -> str:
        return fingerprint_sha256(self.config.certificate)

    def policy_header(self) -> tuple[str, str]:
        """This proxy's ``Proxy-Body-Policy`` header (name, value)."""
        return hdr.PROXY_BODY_POLICY, self._policy_value

    def read_response(self, response: SipMessage, *,
                      max_public_key_ops: int | None = None) -> BodyReading:
        """Read a response's body as ``inspect`` would, keeping, spending and recording
        nothing; never raises ``E2MError`` (a failure is the reading's ``error``).  The
        host drops the response when ``response_refused`` says so, else passes the
        reading to ``inspect``, which then does not read the body again.  An ACK is
        read so too: it cannot be answered either, only dropped (review 141).  The
        reading says the public-key operations it spent, refused or not, so a host can
        bound what the replies of one transaction spend (review 161 K2), and give a
        smaller budget than a message's (``max_public_key_ops``): what they have left."""
        limit = DEFAULT_LIMITS.max_public_key_ops
        budget = message_budget(limit if max_public_key_ops is None
                                else max(0, min(limit, max_public_key_ops)))
        spent = None
        try:
            response.check_unambiguous()
            with budget as spent:
                return replace(self._read_body(response, response.cseq[1]), of=response,
                               public_key_ops=spent.spent)
        except E2MError as exc:
            return BodyReading(True, error=exc, of=response,
                               public_key_ops=spent.spent if spent is not None else 0)

    def replay_key_of(self, request: SipMessage) -> str | None:
        """The replay key ``inspect`` would record ``request`` under (``Verdict.replay_key``),
        read without recording, keeping or spending anything; None when its body binds
        no signed context or cannot be read.  For a host that must recognise a late copy
        of an answered request before it would inspect it (its credentials no longer
        pass: a nonce used once, review 133 K4)."""
        try:
            request.check_unambiguous()
            with message_budget(DEFAULT_LIMITS.max_public_key_ops):
                reading = self._read_body(request, request.method)
        except E2MError:
            return None
        contexts = [c for c in reading.contexts if c is not None]
        return _request_replay_key(contexts) if contexts else None

    @staticmethod
    def response_refused(reading: BodyReading) -> bool:
        """Whether a response so read must not be relayed: its reading failed, and the
        failure is one of ``REFUSED_RESPONSE_ERRORS`` or some part of the body can be
        read without a key (``_keyless_content``)."""
        if reading.error is None:
            return False
        if isinstance(reading.error, REFUSED_RESPONSE_ERRORS):
            return True
        return reading.of is not None and _keyless_content(reading.of)

    def inspect(self, message: SipMessage, *,
                caller: str | Callable[[], str | None] | None = None,
                reading: BodyReading | None = None) -> Verdict:
        """The verdict for one request or response (never raises ``E2MError``).

        A response is forwarded: it cannot be answered.  What could not be read is in
        ``error``; a host that can still drop it asks ``read_response`` first (a body
        the view refuses must not reach the caller unrecorded, review 133) and passes
        that ``reading`` here; so does it for an ACK (read as a response is: review
        141), whose body is then read once (review 158 K2: twice, two budgets).
        ``caller``: for a response, what ``answer_caller`` said for the request it
        answers (the host keeps it with the transaction: Kamailio in a transaction
        AVP; the response's own From is the callee's to write).  A key an answer
        offers counts against the pair's small share and the caller's own quota
        (``keycache.keeper_groups``): neither party can spend a third party's.
        Without ``caller`` (an answer to nothing we relayed) it counts against the
        responder (its signer) alone.  ``caller`` may be a function giving it, asked
        only when the answer offers a key."""
        if reading is not None and reading.of is not message:
            reading = None          # another message's reading: this one is read afresh
        try:
            if reading is not None and reading.error is not None:
                raise reading.error
            message.check_unambiguous()
            # one budget of public-key operations for the whole message (cms/budget.py)
            with message_budget(DEFAULT_LIMITS.max_public_key_ops):
                if message.is_request:
                    return self._inspect_request(message, reading)
                return self._inspect_response(message, caller, reading)
        except E2MError as exc:
            if message.is_request:
                return self.refuse(message, exc)
            return Verdict("forward", error=type(exc).__name__, detail=str(exc))

    def answer_caller(self, request: SipMessage | str, verdict: Verdict | None, *,
                      digest_user: str | None = None) -> str:
        """Who pays for a key an answer to ``request`` offers: the host keeps it with the
        transaction and passes it to ``inspect(response, caller=...)``.

        Only an identity this proxy authenticated for the request names a caller:
        ``digest_user``, the AoR the host's digest authentication proved (Kamailio: the
        credentials' user in our domain; digest proves a user name, so every host name
        of ours a From may write is this one AoR); else the From when ``verdict`` (this
        engine's, for this request) viewed a part signed by it with a signed SIP context
        checked against this request (``SeenBody.bound``: a legacy peer's body binds no
        request, and a captured one could be put in any).  Any other From (a
        stranger's, which reaches our users unchallenged, or anyone's where [auth] is
        off) is whatever its sender wrote: all such callers are one group,
        ``UNAUTHENTICATED_CALLER``, so answers to calls from made-up Froms turn over
        only each other's keys.  ``request`` may be the From URI as the host parsed it,
        for a request it relayed unread (``verdict`` None)."""
        try:
            if digest_user:
                return _keeper(digest_user)
            if verdict is None or not any(s.bound for s in verdict.seen):
                return UNAUTHENTICATED_CALLER
            return _keeper(request if isinstance(request, str) else _sender(request))
        except E2MError:      # nothing to name: the host relays it anyway
            return UNAUTHENTICATED_CALLER

    def refuse(self, request: SipMessage, error: BaseException) -> Verdict:
        """The reply the error table gives for ``error``, with our certificate and policy."""
        answer = answer_for(error, "proxy", self.config.codes)
        assert answer is not None  # every proxy row answers
        add: list[tuple[str, str]] = []
        warning = answer.warning_header(self.config.host)
        if warning:
            add.append(("Warning", warning))
        if answer.accept:
            add.append(("Accept", answer.accept))
        if self.config.announce_policy:
            add.append(self.policy_header())
        body, ctype = (self._cert_der, PKIX_CERT) if answer.needs_certificate else (b"", None)
        name = type(error).__name__ if isinstance(error, E2MError) else "InternalError"
        return Verdict("reply", answer.code, answer.reason, tuple(add), body=body,
                       content_type=ctype, error=name, detail=str(error),
                       replay_key=getattr(error, "replay_key", None))

    # -- requests ----------------------------------------------------------

    def _inspect_request(self, request: SipMessage,
                         reading: BodyReading | None = None) -> Verdict:
        method = request.method
        # (a BYE ends its dialog's keys only at its 2xx: ``end_answered``)
        kept: list[bytes] = []
        recorded: list[str] = []
        seen, media = self._view(request, method,
                                 keeper=lambda: _keeper(self._sender_of(request)), kept=kept,
                                 recorded=recorded, reading=reading)
        return Verdict("forward", add_headers=self._announce(request),
                       remove_headers=self._own_labels(request) + self._policies_in_our_name(request),
                       seen=seen, media=media, kept=tuple(kept),
                       replay_key=recorded[0] if recorded else None)

    def _announce(self, request: SipMessage) -> tuple[tuple[str, str], ...]:
        if not self.config.announce_policy or request.method in _NO_POLICY_ANNOUNCE:
            return ()
        if not self.config.view and not self.config.verify:
            return ()  # nothing to ask of anyone
        return (self.policy_header(),)

    def _policies_in_our_name(self, message: SipMessage) -> tuple[tuple[str, str], ...]:
        """Policy headers that name this proxy, put in by someone else (or by us on an
        earlier pass of a spiral): they go from every message we relay, a request (ours
        is added, so the UAS learns our policy from us alone) or a response (review 57:
        a callee's 200 must not teach the caller a policy in our name).  Only a value
        that mentions our host is parsed at all (a plain substring test first), so a
        message stuffed with policies costs nothing; a value that mentions us and does
        not parse goes too."""
        ours = self.config.host.lower()
        out = []
        for value in message.get_all(hdr.PROXY_BODY_POLICY):
            if ours not in value.lower():
                continue
            try:
                named = hdr.policy_for(hdr.parse_policy_headers([value]), self.config.host)
            except E2MError:
                named = True   # unreadable and in our name: it can only mislead
            if named is not None:
                out.append((hdr.PROXY_BODY_POLICY, value))
        return tuple(out)

    def _own_labels(self, request: SipMessage) -> tuple[tuple[str, str], ...]:
        if not self.config.remove_own_label:
            return ()
        out = []
        for value in request.get_all(hdr.PROXY_REQUIRED_BODY):
            labels = hdr.parse_proxy_required_body(value)
            if labels and all(label.is_for(self.config.host) for label in labels):
                out.append((hdr.PROXY_REQUIRED_BODY, value))
        return tuple(out)

    # -- responses ---------------------------------------------------------

    def _inspect_response(self, response: SipMessage,
                          caller: str | Callable[[], str | None] | None = None,
                          reading: BodyReading | None = None) -> Verdict:
        # A failure answer drops no key: one branch's 486 (bob's other device, or a
        # hop's forgery) leaves the offer's key to the branches still ringing, a 491 to
        # a re-INVITE or a late 487 of the answered branch leaves the dialog's keys.
        # The attempt's keys go when the whole INVITE failed (the host's failure route:
        # ``end_attempt``) or at their early expiry.
        _, method = response.cseq

        def keeper() -> str:
            # an answer to a request we relayed: the pair's quota; an answer to nothing
            # we relayed (a cluster's stray reply, which anyone on the path can copy):
            # a pair with the unauthenticated callers, never the From it wrote nor the
            # responder's own group (the keys his own requests offer)
            responder = _keeper(self._sender_of(response))
            who = caller() if callable(caller) else caller
            if not who or who == UNAUTHENTICATED_CALLER:
                return answer_keeper(UNAUTHENTICATED_CALLER, responder)
            return answer_keeper(_keeper(who), responder)
        seen, media = self._view(response, method, keeper=keeper, kept=[], reading=reading)
        return Verdict("forward", remove_headers=self._policies_in_our_name(response),
                       seen=seen, media=media)

    def end_answered(self, method: str, status: int, call_id: str, from_tag: str | None,
                     to_tag: str | None) -> None:
        """An answer to a request this proxy relayed, with that request's Call-ID and tags
        (the host's transaction, never a stray answer: whoever learnt a dialog's ids
        could write one): a BYE's 2xx ends the dialog's keys (``end_dialog``).  Not the
        BYE itself: one the callee refuses (a stale CSeq, a third party's From) ends
        nothing there, and the call's next answers must still be read (review 92)."""
        if method == "BYE" and 200 <= status < 300:
            self.end_dialog(call_id, from_tag, to_tag)

    def holds_dialog_keys(self, call_id: str, tag: str | None, other_tag: str | None) -> bool:
        """Whether the cache holds keys for the confirmed dialog (Call-ID and both tags):
        what a BYE's 2xx would end (``end_dialog``)."""
        return self.dialog_keys_life(call_id, tag, other_tag) is not None

    def dialog_keys_life(self, call_id: str, tag: str | None,
                         other_tag: str | None) -> float | None:
        """Seconds until the last key the cache holds for the confirmed dialog expires
        (a later fork's keep only ``EARLY_DIALOG_TTL``), None when it holds none.  A
        cache that cannot tell (no ``scope_life``) is taken to hold some for ever."""
        if not call_id or not tag or not other_tag:
            return None
        life = getattr(self.cache, "scope_life", None)
        return math.inf if life is None else life(DialogScope(call_id, tag, other_tag))

    def end_dialog(self, call_id: str, from_tag: str | None, to_tag: str | None) -> None:
        """A BYE ended the dialog (Call-ID and both tags; its 2xx: ``end_answered``): the
        keys kept for it go (key-reuse-01).  Only that dialog's own scope: Call-ID and a
        tag name no party, and whoever learnt them (a branch the INVITE reached, a call
        forwarded from her) can write a BYE for a dialog that never was, so of the early
        scopes the
        offer's keys wait in it takes only the names its own scope held (the copies of
        keys moved into it: ``KeyCache.drop_scope``); the rest go at
        ``EARLY_DIALOG_TTL``, or with the failure of the transaction that kept them
        (``end_attempt``).  A BYE without both tags ends nothing."""
        if not call_id or not from_tag or not to_tag:
            return
        self.cache.drop_scope(DialogScope(call_id, from_tag, to_tag))

    def end_attempt(self, scope: Scope, kept: Iterable[bytes], *,
                    answer_may_follow: bool = False) -> None:
        """A request's transaction ended without success (a failure answer, a timeout, a
        CANCEL's 487, a relay that failed): the keys that request kept (``Verdict.kept``
        and the request's ``message_scope``) go now, not at their expiry.  Only those:
        another request under the same Call-ID and From tag (a third party's, failing
        on purpose) drops nothing of the caller's.  ``answer_may_follow`` (the request
        went out and an answer ended it): an INVITE's keys live ``LATE_ANSWER_TTL``
        more instead, for a 2xx that still comes (a forking proxy's other branch, or
        the callee's after its own 486, passed on as a late 2xx: review 125)."""
        for name in kept:
            if answer_may_follow and isinstance(scope, DialogScope):
                self.cache.expire_within(scope, name, LATE_ANSWER_TTL)
            else:
                self.cache.drop(scope, name)

    @staticmethod
    def check_readable(message: SipMessage) -> None:
        """``E2MError`` for a message the engine cannot even take apart: its headers
        (``check_unambiguous``), its ids, its body's MIME framing and top parts (two
        parts with one Content-ID, review 66).  What a host must not relay unread when
        it cannot refuse it (a response: Kamailio drops it in its core reply route)."""
        message.check_unambiguous()
        _ids = (message.call_id, message.from_tag, message.to_tag)
        part = message_body(message)
        if part is not None:
            top_parts(part)

    @staticmethod
    def response_needs_reading(method: str, status: int, *, has_body: bool,
                               has_policy: bool) -> bool:
        """False when ``inspect`` of this response would do nothing at all: nothing to
        view (a 200 to MESSAGE, a 180 without SDP, a failure: it drops no key) and no
        ``Proxy-Body-Policy`` that may name us (review 57).  A host may then forward it
        unread."""
        return has_body or has_policy

    @staticmethod
    def needs_no_reading(method: str, *, has_body: bool, has_label: bool,
                         has_policy: bool) -> bool:
        """True when ``inspect`` of this request would forward it and do nothing else: a
        BYE or CANCEL without a body, a Proxy-Required-Body or a Proxy-Body-Policy
        header (which may name us: review 57) has nothing to view, announce or remove
        (a BYE's keys go at its 2xx, a CANCEL's with its INVITE's failure).  A host may
        then relay it without reading the message."""
        return method in ("BYE", "CANCEL") and not has_body and not has_label \
            and not has_policy

    # -- viewing -----------------------------------------------------------

    def _labels(self, message: SipMessage) -> hdr.BodyLabel | None:
        labels = hdr.parse_proxy_required_bodies(message.get_all(hdr.PROXY_REQUIRED_BODY))
        cids = [cid for label in labels if label.is_for(self.config.host) for cid in label.cids]
        if len(set(mime.normalize_cid(c) for c in cids)) != len(cids):
            raise MalformedError("Proxy-Required-Body names the same part twice for this proxy")
        return hdr.labels_for(labels, self.config.host)

    def _rules_apply(self, method: str) -> bool:
        return any(rule.covers(method) for rule in (*self.config.view, *self.config.verify))

    def _targets(self, parts: list[mime.MimePart], label: hdr.BodyLabel | None,
                 method: str) -> list[mime.MimePart]:
        """The parts to open: every part when our own policy covers the method (a label
        that names only some parts must not hide the others from us), else the ones
        our label names."""
        if label is not None:
            for cid in label.cids:
                if mime.find_by_cid(parts, cid) is None:
                    raise MalformedError("Proxy-Required-Body names a part that is not in the body")
        if label is None or label.whole_body or self._rules_apply(method):
            return parts
        return [part for cid in label.cids if (part := mime.find_by_cid(parts, cid)) is not None]

    def _sender_of(self, message: SipMessage) -> str:
        """Who made the body: the From of a request, the responder (To) of a response."""
        return message.address("From" if message.is_request else "To").uri

    def _is_legacy(self, message: SipMessage) -> bool:
        """A body to or from a ``[policy] legacy_peers`` party (an RFC 3261 S/MIME stack)
        may be CBC or lack a SIP context: its sender writes what the legacy side opens.
        A CBC body must still be signed (``legacy_unsigned_cbc`` aside), and then the
        signature is the sender's, so a hop that rewrites From gains nothing."""
        parties = (message.address("From").uri, message.address("To").uri)
        return any(peer_matches(name, aor) for name in self.config.legacy_peers
                   for aor in parties)

    def _keys_for(self, message: SipMessage,
                  looked_up: list[KeptLookup]) -> list[OpeningKey]:
        """Our certificate key, and the CEKs we kept, found by kekri identifier
        while the envelope is opened (no second pass over the CMS).  A lookup spends
        no use of the key: each kept key found is noted in ``looked_up`` (a
        ``KeptLookup``) and ``_spend`` counts it once the message passed every check, so
        replayed or refused copies cannot use a dialog key up."""
        worked_out: list[tuple[Scope, Callable[[bytes], bytes]]] = []

        def kept_kek(reference: bytes) -> bytes | None:
            # Scopes are worked out only when the envelope has a kekri at all, and once
            # per message: a stranger's body may hold hundreds of kekri.
            if not worked_out:
                worked_out.append((message_scope(message), kept_namer(message)))
            scope, namer = worked_out[0]
            name = namer(bytes(reference))
            scopes = [scope, *(scope.early_scopes() if isinstance(scope, DialogScope) else ())]
            for candidate in scopes:
                kept = self.cache.get(candidate, name, count=False)
                if kept is None:
                    continue
                looked_up.append(KeptLookup(candidate, name, bytes(reference), scope))
                return kept.cek[::-1]  # RFC 3185: the KEK is the CEK reversed
            return None

        return [self._own_key, KekLookup(kept_kek)]

    def _spend(self, message: SipMessage, opened: list[OpenedPart],
               contexts: list[SipContext | None],
               looked_up: list[KeptLookup],
               keeper: Callable[[], str]) -> None:
        """One use of each kept key that opened a part of this (accepted) message; a key
        found under the dialog's early scope by a message that confirms the dialog is
        kept for the dialog's life: by the INVITE's 2xx (``_fork``: the early dialog's
        first dialog; the next few for the early expiry; no more), or by a request of
        the offerer's own.  It stays its offerer's (her key, and the signer
        ``scope_victim`` counts).  Anyone else's request (a callee who holds the offer's
        CEK and makes up dialogs, a gateway's early UPDATE) uses it where it is."""
        used = {e.recipient.identifier for p in opened for e in p.envelopes
                if e.recipient.kind == "kekri"}
        spent: set[tuple[Scope, bytes]] = set()
        for candidate, name, reference, scope in looked_up:
            if f"kekid={reference.hex()}" not in used or (candidate, name) in spent:
                continue               # found, but not what opened a part; or counted
            spent.add((candidate, name))   # one use a message, however many parts
            kept = self.cache.get(candidate, name)
            # (a key whose last use this was is gone: nothing to keep for the dialog)
            if kept is None or kept.max_decrypts == 0 or candidate == scope \
                    or not self._confirms_dialog(message) or not isinstance(scope, DialogScope):
                continue
            early = candidate.tags[0] if isinstance(candidate, DialogScope) else ""
            others = [tag for tag in scope.tags if tag != early] or [early]
            if message.is_request:
                # only the offerer's own request moves her key (signed by her; its copies
                # are replays): the callee, or a gateway in an early dialog, uses it where
                # it is.  It claims no fork (her PRACK to a ringing gateway must not take
                # the answer's): a dialog the INVITE's 2xx made keeps it for its life, any
                # other (a hop re-tagging her requests) as a later fork's.
                # (a kept keeper is bounded: a long AoR is kept as its hash)
                if bounded_keeper(self._signed_keeper(opened, contexts, keeper)) != kept.keeper:
                    continue
                # Her signed re-INVITE, which binds its To tag, may claim the slot a
                # 2xx nothing vouched for left free (a plaintext answer, or none after
                # a reliable 183: review 46); her other requests can be early ones.
                fork = self._fork(message, contexts, early, others[0],
                                  claim=message.method == "INVITE")
                if fork is None:
                    fork = 1
            elif message.cseq[1] != "INVITE":
                continue       # a 2xx to an early UPDATE or PRACK confirms no dialog
            else:
                fork = self._fork(message, contexts, early, others[0],
                                  keyed=kept.keeper not in (None, UNSIGNED_KEEPER,
                                                            LATER_FORK_KEEPER))
                if fork is None:
                    continue
            self.cache.put(scope, name, kept.cek, max_decrypts=kept.max_decrypts,
                           ttl=EARLY_DIALOG_TTL if fork else None,
                           keeper=LATER_FORK_KEEPER if fork else kept.keeper or UNSIGNED_KEEPER)

    @staticmethod
    def _signed_keeper(opened: list[OpenedPart], contexts: list[SipContext | None],
                       keeper: Callable[[], str]) -> str:
        """``keeper()`` when a part of the message is signed with a signed context checked
        against it; else the one shared unsigned group (a legacy body's From proves
        nothing, and a captured one binds no request)."""
        if any(part.signed and context is not None for part, context in zip(opened, contexts)):
            return keeper()
        return UNSIGNED_KEEPER

    def _view(self, message: SipMessage, method: str, *, keeper: Callable[[], str],
              kept: list[bytes], recorded: list[str] | None = None,
              reading: BodyReading | None = None
              ) -> tuple[tuple[SeenBody, ...], tuple[MediaLine, ...]]:
        """What the message shows us; ``keeper()`` says whose quota a key it offers
        counts against (a request's sender; a response's caller and responder together),
        asked only when it offers one.  The names of keys it kept afresh in its own
        scope go in ``kept``; a request's replay key, once recorded, in ``recorded``.
        ``reading``: the message's ``_read_body``, when the host had it done already
        (``read_response``)."""
        if reading is None:
            reading = self._read_body(message, method)
        if reading.skipped:
            return (), ()
        opened, contexts = list(reading.opened), list(reading.contexts)
        looked_up, offers = list(reading.looked_up), reading.offers
        seen, media = reading.seen, reading.media
        if self._first_sighting(message, [c for c in contexts if c is not None],
                                keeps=bool(looked_up) or offers, recorded=recorded):
            # keyed matters only to a message with no signed context (``_fork``: a signed
            # one's claim is shared anyway), so only then is it worked out (a cache read)
            keyed = bool(looked_up) and all(c is None for c in contexts) \
                and self._signers_key_opened(opened, looked_up)
            if opened and self._invite_2xx(message) and (
                    looked_up or offers or any(c is not None for c in contexts)):
                # the dialog an INVITE's 2xx confirms takes its fork even when the 2xx
                # moves and keeps nothing: the caller's own requests then move her key.
                # Not a 2xx nothing vouches for and no key touches (a plaintext or bare
                # one, anyone's: review 48): it would take slot 0 from the real answer,
                # and on a cluster each slot is a shared claim (reviews 44, 46).  Such a
                # dialog takes its slot from the caller's own re-INVITE (``_spend``).
                self._fork(message, contexts, message.from_tag, message.to_tag or "",
                           keyed=keyed)
            self._spend(message, opened, contexts, looked_up, keeper)
            kept.extend(self._keep_keys(message, opened, contexts, keeper, keyed=keyed))
        return seen, media

    def _read_body(self, message: SipMessage, method: str) -> BodyReading:
        """All ``_view`` checks before it keeps, spends or records anything: the body
        opened, its contexts, the policy, the signers and the SDP summary.  Read before
        anything is kept or spent: a message it refuses (``E2MError``) must leave no key
        behind (review 28), and a response it refuses is dropped (review 133)."""
        label = self._labels(message)
        body = message_body(message)
        if body is None:
            if label is not None and label.cids:
                raise MalformedError("Proxy-Required-Body names a part but there is no body")
            return _SKIPPED
        if label is None and not self._rules_apply(method):
            return _SKIPPED  # not for us: forward untouched, unread
        parts = top_parts(body)
        targets = self._targets(parts, label, method)
        sender = self._sender_of(message)
        legacy = self._is_legacy(message)
        limits = self._legacy_limits if legacy else DEFAULT_LIMITS
        opened: list[OpenedPart] = []
        unreadable: list[mime.MimePart] = []
        looked_up: list[KeptLookup] = []
        keys = self._keys_for(message, looked_up)
        for part in targets:
            try:
                opened.append(open_part(part, keys, trust_anchors=self.config.trust_anchors,
                                        at=self._now(), limits=limits))
            except _UNREADABLE:
                unreadable.append(part)
        contexts = [self._context(part, message, legacy) for part in opened]
        self._check_policy(method, label, opened, unreadable)
        if self._rules_apply(method):
            for part in opened:
                if not (part.encrypted or part.signed):   # open_part checked the others
                    refuse_hidden_parts(part.entity, limits, where="in the clear")
                    refuse_encoded_plaintext(part.entity, limits)
        for part in opened:
            if part.signed:   # a signature must be the sender's: From, or the responder (To)
                check_signed_by(part, sender)
        seen = tuple(self._seen(p, c) for p, c in zip(opened, contexts))
        media = tuple(m for p in opened if p.content_type == "application/sdp"
                      for m in media_summary(p.content))
        return BodyReading(False, tuple(opened), tuple(contexts), tuple(looked_up), seen,
                           media, any(part.cek_references for part in opened))

    def _context(self, part: OpenedPart, message: SipMessage, legacy: bool) -> SipContext | None:
        """The part's SIP context, checked against the message; a *signed* one is required
        of every protected part but those to or from ``[policy] legacy_peers``.  A context
        only the envelope's authAttrs carry proves nothing (anyone who can encrypt to us
        writes one): such a body is answered 495, so a sender that meant it signs."""
        context = check_context(part, message)
        protected = part.encrypted or part.signed   # plaintext has nothing to bind
        if not protected or legacy:
            return context if part.context_signed else None
        if context is None or not part.context_signed:
            raise SignatureRequiredError("the body carries no signed SIP context (only "
                                         "[policy] legacy_peers may send such bodies)")
        return context

    def _first_sighting(self, message: SipMessage, contexts: list[SipContext], *,
                        keeps: bool, recorded: list[str] | None = None) -> bool:
        """A request whose body was seen before is a replay (tm absorbed the real
        retransmissions before we were asked): refused.  A response must at least be
        recent; one that ``keeps`` (spends a kept key, or offers one) is recorded too,
        by its context and To tag (each fork's 2xx is its own; a body from a sender before
        ``e2m-sip-to-tag`` binds no To tag, a newer one's copy under another fails
        ``check_context``).  A copy of it (a 2xx retransmission, or a hop replaying it) is
        still read and forwarded but is not a first sighting: it spends no use and
        keeps or moves no key.  (How many To tags one early dialog may grow keys
        under: ``_fork``.)"""
        if not contexts:
            return True
        if message.is_request:
            key = _request_replay_key(contexts)
            try:
                self.replay.check_and_record(contexts[0], None, retransmissions=False,
                                             to_tag=contexts[0].to_tag)
            except ReplayError as exc:
                # which message it repeats: a host that remembers that one's answer gives
                # it to a late retransmission (``Verdict.replay_key``; review 123 HB2)
                exc.replay_key = key          # type: ignore[attr-defined]
                raise
            if recorded is not None:
                recorded.append(key)
            return True
        contexts[0].check_time(self._now().timestamp(), self.config.replay_window)
        if not keeps:
            return True
        try:
            # lower-cased, as dialog scopes and fork slots are: a copy in another case is
            # the same dialog, so it must be the same copy too
            self.replay.check_and_record(contexts[0], None, retransmissions=False,
                                         to_tag=(message.to_tag or "").lower())
        except ReplayError:
            return False
        return True

    def _signers_key_opened(self, opened: list[OpenedPart],
                            looked_up: list[KeptLookup]) -> bool:
        """Whether a kept key that a signed body offered opened a part of this message:
        its sender holds a key someone signed for this dialog's two parties (kept names
        bind them).  A key found but not used (a kekri naming a reference read off the
        wire), an unsigned one (anyone's, a stranger's own: review 50) or a later
        fork's does not count."""
        used = {e.recipient.identifier for p in opened for e in p.envelopes
                if e.recipient.kind == "kekri"}
        for found in looked_up:
            # read again, not taken from the lookup: the record may have changed since
            # the reading (another worker's drop, a put after it, a node's replicated
            # record), and what counts is the key as it is now (reviews 196, 198)
            if f"kekid={found.reference.hex()}" in used:
                kept = self.cache.get(found.candidate, found.name, count=False)
                if kept is not None and kept.keeper not in (None, UNSIGNED_KEEPER,
                                                            LATER_FORK_KEEPER):
                    return True
        return False

    def _fork(self, message: SipMessage, contexts: Sequence[SipContext | None], early: str,
              other: str, *, claim: bool = True, keyed: bool = False) -> int | None:
        """Which dialog grown from the early dialog (Call-ID, tag ``early``, between the
        message's two AoRs) the one with tag ``other`` is: 0 for the first, up to
        ``MAX_FORKS - 1``, None past them (``claim=False``: or when it holds none).
        A body from a sender before ``e2m-sip-to-tag`` binds no To tag, so a hop
        re-tagging copies of its 2xx (or the callee, who holds the offer's CEK and signs
        answers of his own) makes as many dialogs as it likes: only the first keeps keys
        for a dialog's life, the next forks keep them for ``EARLY_DIALOG_TTL`` (RFC 3261
        §13.2.2.4: a caller usually ends those), and the rest none."""
        # bound to the dialog's parties, as kept names are: a third party who learnt the
        # Call-ID and tag (a call forwarded from her) cannot use the slots up
        first, second = dialog_parties(message)
        # claimed across a cluster only when a signature is at stake: a signed context,
        # or a key a signed body offered opened the message (``keyed``); an unsigned key
        # (a legacy sender's, or a stranger's own under any early dialog) is the node's
        # own business (reviews 46, 50)
        shared = any(c is not None for c in contexts) or keyed
        return self.replay.admit_fork(f"{message.call_id}\n{early.lower()}\n{first}\n{second}",
                                      other.lower(), MAX_FORKS, made=_made(contexts),
                                      claim=claim, shared=shared)

    def _first_tag(self, message: SipMessage, contexts: list[SipContext | None]) -> int:
        """0 for the first To tag one response (its signed context) is seen with, 1 for
        any other: a sender before ``e2m-sip-to-tag`` binds no To tag, so re-tagged
        copies of its 2xx to an UPDATE would each keep its keys for a dialog's life
        under a made-up tag."""
        context = next((c for c in contexts if c is not None), None)
        if context is None:
            return 0
        slot = self.replay.admit_fork("\n" + context.replay_key(),
                                      (message.to_tag or "").lower(), 1, made=float(context.time))
        return 1 if slot is None else 0

    def _check_policy(self, method: str, label: hdr.BodyLabel | None,
                      opened: list[OpenedPart], unreadable: list[mime.MimePart]) -> None:
        """496 when a needed body stays closed, then 495 when a needed signature is missing.

        Every part under our label or our policy must open: an SDP's keys travel inside
        the part we read, sealed for the peer (docs/protocol.md §6.1), so nothing is
        legitimately closed to us; a closed part is where an insider would hide the real
        text behind a decoy for the archive.
        """
        view_rules = [r for r in self.config.view if r.covers(method)]
        verify_rules = [r for r in self.config.verify if r.covers(method)]
        if unreadable and (label is not None or view_rules or verify_rules):
            needed = self._needed_type(view_rules, label)
            raise ProxyCannotDecryptError(f"cannot view the body ({needed or 'whole body'})",
                                          content_type=needed)
        for part in opened:
            if any(r.matches(method, part.content_type) for r in verify_rules) and not part.signed:
                raise SignatureRequiredError(f"{part.content_type} body is not signed")

    @staticmethod
    def _needed_type(view_rules: Sequence[hdr.Rule], label: hdr.BodyLabel | None) -> str | None:
        """The one concrete type our view rules name, for Warning 380; None = whole body."""
        types = {r.content_type for r in view_rules}
        if len(types) == 1:
            (only,) = types
            if only != "*" and not only.endswith("/*"):
                return only
        return None

    @classmethod
    def _invite_2xx(cls, message: SipMessage) -> bool:
        """A 2xx to an INVITE, with both tags: the one response that claims a fork."""
        return not message.is_request and cls._confirms_dialog(message) \
            and message.cseq[1] == "INVITE" and bool(message.from_tag)

    @staticmethod
    def _confirms_dialog(message: SipMessage) -> bool:
        return bool(message.to_tag) and (message.is_request or 200 <= (message.status or 0) < 300)

    def _keep_keys(self, message: SipMessage, opened: list[OpenedPart],
                   contexts: list[SipContext | None], keeper: Callable[[], str], *,
                   keyed: bool = False) -> list[bytes]:
        """Keep the keys the message offers; the names of those its scope did not hold
        yet (a key already kept is never replaced, and not this message's to drop)."""
        # Only the reference the sender's context offers (a legacy body has none to say).
        # Whose quota it counts against: ``keeper()`` for a signed part; one shared
        # keeper for unsigned ones (a legacy peer's), whose From proves nothing.
        # A signature with no signed context (a legacy peer's) binds no request: a
        # captured body put in new requests must not spend its signer's quota.
        offered = [(ref, part.signed and context is not None)
                   for part, context in zip(opened, contexts)
                   for ref in part.cek_references
                   if context is None or context.cek_reference == ref[0]]
        if not offered:
            return []
        signer = keeper() if any(signed for _, signed in offered) else UNSIGNED_KEEPER
        references = [(ref, signer if signed else UNSIGNED_KEEPER) for ref, signed in offered]
        scope = message_scope(message)
        early = isinstance(scope, DialogScope) and scope.early
        # an INVITE's 2xx's keys: which dialog of the early one is this?  (An 18x, or a 2xx
        # to an early UPDATE or PRACK, claims no fork: the dialog the INVITE's 2xx confirms
        # may be another device's than the one ringing.)
        if not early and isinstance(scope, DialogScope) and self._confirms_dialog(message) \
                and not message.is_request and message.from_tag:
            if self._invite_2xx(message):
                fork = self._fork(message, contexts, message.from_tag, message.to_tag or "",
                                  keyed=keyed)
                if fork is None:
                    return []
            else:
                # a 2xx to an UPDATE, PRACK or INFO confirms no dialog: its first To tag
                # keeps its keys, a re-tagged copy's only as a later fork's
                fork = self._first_tag(message, contexts)
            if fork:              # a later fork's keys: the early expiry, one shared group
                early = True
                references = [(ref, LATER_FORK_KEEPER) for ref, _ in references]
        namer = kept_namer(message)
        fresh: list[bytes] = []
        for (reference, cek, _envelope), keeper in references:
            max_decrypts = None
            for env in (e for p in opened for e in p.envelopes):
                if env.cek_reference == reference:
                    max_decrypts = env.cek_max_decrypts
            name = namer(reference)
            # (two workers keeping one name at the same instant, for two requests with the
            # same ids, parties and reference, may both count it as theirs)
            if message.is_request and self.cache.get(scope, name, count=False) is None:
                fresh.append(name)
            self.cache.put(scope, name, cek, max_decrypts=max_decrypts,
                           ttl=EARLY_DIALOG_TTL if early else None, keeper=keeper)
        return fresh

    def _seen(self, part: OpenedPart, context: SipContext | None) -> SeenBody:
        signers = part.signers
        # what the archive keeps: never SRTP keys, which a UA sending its SDP unsplit
        # (a stock phone's SDES, a legacy peer) lets us read (review 175 K1)
        kept = without_keys(part.entity, part.content, self.config.keying_attributes)
        return SeenBody(part.cid, part.content_type, kept, part.encrypted,
                        "valid" if part.signed else "none", signers[0] if signers else None,
                        bound=part.signed and context is not None,
                        signed_at=context.time if part.signed and context is not None
                        else None)

    def _now(self) -> datetime:
        return self._clock() if self._clock else datetime.now(timezone.utc)
