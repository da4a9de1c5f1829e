"""The phone's side of the RFC 6072 certificate service (issue 15 §2).

The home proxy keeps each AoR's certificate (docs/protocol.md §11).  This module does
the SIP of it for the phone; the decisions stay in the core:

- **Publishing our own certificate.**  pjsua2 has no PUBLISH for an arbitrary event, but
  its presence publication (``pjsip_publishc``) already does everything RFC 3903 asks of
  a publisher: digest challenges answered with the account's credentials, the entity-tag
  kept from each 200 and sent back as ``SIP-If-Match``, a refresh before the granted
  time ends, a new initial PUBLISH after a 412, a removal (``Expires: 0``) when the
  account goes.  The phone turns it on; :meth:`CertServiceClient.on_tx` rewrites each of
  its PUBLISHes on the way out: ``Event: certificate``, the DER of our certificate as an
  ``application/pkix-cert`` body with ``Content-Disposition: signal`` in place of the
  PIDF (a binary body cannot go through pjsua2's string API; the raw hook puts the bytes
  on the wire), and an ``Expires`` no later than the certificate's notAfter.
- **Fetching and following a peer's.**  The engine says which peers it wants
  (``UAEngine.peer_certificates_wanted``: a protected message could not be sealed for
  want of their certificate).  :meth:`tick` sends a ``SUBSCRIBE`` (``Event:
  certificate``) for each through ``send_subscribe`` (the phone uses
  ``Account.sendRequest``; the hook adds our Contact and a strict Accept); a NOTIFY in a
  dialog we opened goes to ``UAEngine.accept_certificate_notify``, which checks the
  certificate as a ``[peers]`` entry (chain, SAN URI equal to the AoR, validity, key
  usage) and keeps it for the subscription's time, or drops it when the body is empty.
  The subscription is renewed (a new one, the old one lapses) while we keep talking to
  that peer.  A follow the service refuses (its places for that AoR taken) is replaced
  by one fetch (``Expires: 0``), and for ``OUTCOME_MAX_AGE`` s that peer is fetched
  when wanted rather than followed (review 115).
- **What nobody asked for.**  A certificate NOTIFY in no dialog of ours, or from another
  address than the proxy we subscribed through, is answered 481 and never looked at; a
  NOTIFY whose From or certificate names another AoR is answered 200 (the dialog is
  fine) and its certificate is never used (the engine refuses it).

Bounded: at most ``MAX_FOLLOWED`` subscriptions (pending or active), ``MAX_PENDING``
fetches waiting for their first NOTIFY (each at most ``FETCH_TIMEOUT`` s), the last
``MAX_OUTCOMES`` failures (``OUTCOME_MAX_AGE`` s), ``MAX_EVENTS`` events not yet taken.

Hook callbacks (``on_tx``, ``on_rx``) run inside pjsip: they parse, decide and return,
and never call pjsua2; :meth:`tick` runs on the phone's loop.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_plugins import sip
from e2m_plugins.errors import E2MError
from e2m_plugins.grammar import retry_after_seconds
from e2m_plugins.uri import aor_of, identity_of

from .proxysource import ProxySource
from .rawhook import RxReject

__all__ = ["CertServiceClient", "Subscription", "NotifyAnswer", "MARKER", "CONTENT_TYPE",
           "MAX_FOLLOWED", "MAX_PENDING", "FETCH_TIMEOUT"]

CONTENT_TYPE = "application/pkix-cert"
MARKER = "X-E2M-Cert-Subscription"   # on our SUBSCRIBEs between pjsua and the hook only
MAX_FOLLOWED = 64            # subscriptions kept (pending or active)
MAX_PENDING = 16             # of them waiting for their first NOTIFY
FETCH_TIMEOUT = 5.0          # seconds a fetch may wait for its NOTIFY
MAX_OUTCOMES = 128           # failures remembered per AoR, for the send error
OUTCOME_MAX_AGE = 300.0      # seconds such a failure is remembered
MAX_EVENTS = 256             # events the phone has not taken yet
TERMINATED_CACHE = 60.0      # seconds a certificate from an ended subscription is kept
_RENEW_FRACTION = 0.8        # renew a subscription after this share of its time
BUSY_RETRIES = 2             # a SUBSCRIBE answered "busy, try again" is sent again this often
BUSY_WAIT_MAX = 4.0          # seconds at most before that (a blocked send waits 6 s)
_BUSY = (480, 500, 503)      # the answers that say "not now" with a Retry-After
_BUSY_BARE = (500, 503)      # ... or without one: a visited proxy's tm relays the
                             # service's 503 as a bare 500 (RFC 3261 16.7; review 123)
_BARE_BUSY_WAIT = 2.0        # seconds before sending one so answered again (the service's)


class NotifyAnswer(RxReject):
    """A stateless answer to a NOTIFY from inside the hook, 200 included (a NOTIFY
    of ours is answered at once; pjsua has no subscription to answer it with)."""

    def __init__(self, code: int, reason: str, detail: str = "") -> None:
        Exception.__init__(self, detail or f"NOTIFY answered {code}")
        self.code = code
        self.reason = reason
        self.headers = ()
        self.body = b""
        self.content_type = None


@dataclass
class Subscription:
    """One certificate subscription as the subscriber sees it."""

    aor: str
    token: str
    started: float                     # monotonic
    requested: int                     # Expires asked for
    call_id: str | None = None         # known once the SUBSCRIBE went out
    from_tag: str | None = None
    to_tag: str | None = None          # the notifier's tag (first NOTIFY or the 200)
    expires_at: float | None = None    # monotonic; from the 200 or Subscription-State
    notified: bool = False             # a NOTIFY arrived
    state: str = "pending"             # pending | active | ended
    fingerprint: str | None = None     # of the certificate it gave (None: none)
    notify_cseq: int | None = None     # the highest NOTIFY CSeq taken in its dialog
    restart: bool = False              # an out-of-order NOTIFY came: start a fresh one
    fetch_next: bool = False           # the follow was refused: a fetch takes its place
    retry_at: float | None = None      # monotonic: the service was busy, send it again then
    busy: int = 0                      # times this SUBSCRIBE was answered busy so far


def _retry_after(msg: sip.SipMessage) -> float | None:
    """The seconds of a Retry-After (RFC 3261 20.33: delta-seconds, then parameters or
    a comment), at least 1; None without a readable one."""
    seconds = retry_after_seconds(msg.get("Retry-After"))
    return max(1.0, float(seconds)) if seconds is not None else None


def _fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _sub_state(notify: sip.SipMessage) -> tuple[str, int | None]:
    """The Subscription-State's value and its expires parameter."""
    value = (notify.get("Subscription-State") or "").strip()
    state, _, params = value.partition(";")
    expires = None
    for param in params.split(";"):
        name, _, number = param.partition("=")
        if name.strip().lower() == "expires" and number.strip().isdigit():
            expires = int(number.strip())
    return state.strip().lower(), expires


def _event(message: sip.SipMessage) -> str:
    return (message.get("Event") or "").split(";", 1)[0].strip().lower()


class CertServiceClient:
    """The certificate-service client of one phone.

    ``engine``: the phone's ``UAEngine``.  ``own_certificate``: our certificate (the one
    UA.toml names).  ``send_subscribe(aor, headers)``: send an out-of-dialog SUBSCRIBE to
    ``aor`` with these extra headers (on the loop).  ``contact()``: our Contact URI.
    ``proxy_address``: (host, port) NOTIFYs must come from (our outbound proxy; the
    port only over UDP, ``udp``), or None; or ``proxy_source``, that place as the phone
    already holds it (``proxysource.ProxySource``, which both of them ask: one answer to
    "is this our proxy").  ``publish_expires`` /
    ``subscribe_expires``: what we ask for.
    """

    def __init__(self, engine: Any, own_certificate: x509.Certificate, *,
                 send_subscribe: Callable[[str, list[tuple[str, str]]], None],
                 contact: Callable[[], str], proxy_address: tuple[str, int] | None = None,
                 udp: bool = True, proxy_source: ProxySource | None = None,
                 publish_expires: int = 3600, subscribe_expires: int = 3600,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.aor = str(aor_of(engine.config.aor))
        self.own_der = own_certificate.public_bytes(Encoding.DER)
        self.own_not_after = own_certificate.not_valid_after_utc.timestamp()
        self.send_subscribe = send_subscribe
        self.contact = contact
        self.proxy_address = proxy_address
        self.udp = udp
        if proxy_source is None and proxy_address is not None:
            proxy_source = ProxySource([proxy_address], udp=udp)
        self.proxy_source = proxy_source
        self.publish_expires = publish_expires
        self.subscribe_expires = subscribe_expires
        self._clock = clock
        self._wall = wall
        self._subs: OrderedDict[str, Subscription] = OrderedDict()     # token -> sub
        self._current: dict[str, str] = {}                              # aor -> token
        self._failures: OrderedDict[str, tuple[str, float]] = OrderedDict()  # aor -> why
        self._follow_refused: OrderedDict[str, float] = OrderedDict()     # aor -> when
        self._used: OrderedDict[str, float] = OrderedDict()             # aor -> last use
        self._publish_calls: OrderedDict[str, str] = OrderedDict()      # Call-ID -> action
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.counts = {"published": 0, "publish_failed": 0, "subscribed": 0, "fetched": 0,
                       "notifies": 0,
                       "notifies_refused": 0, "certificates_kept": 0, "certificates_refused": 0,
                       "certificates_dropped": 0, "fetches_timed_out": 0, "events_dropped": 0}

    # -- state for the phone -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"subscriptions": len(self._subs), "pending": self._pending_count(),
                "failures": len(self._failures), "counts": dict(self.counts),
                "limits": {"followed": MAX_FOLLOWED, "pending": MAX_PENDING,
                           "failures": MAX_OUTCOMES}}

    def _pending_count(self) -> int:
        return sum(1 for s in self._subs.values() if not s.notified and s.state != "ended")

    def pending(self, aor: str) -> bool:
        """Whether a fetch for ``aor`` is waiting for its first NOTIFY (or, its follow
        refused, for the fetch that takes its place)."""
        sub = self._sub_of(aor)
        return sub is not None and not sub.notified and (
            sub.state != "ended" or sub.fetch_next or sub.retry_at is not None)

    def failure(self, aor: str) -> str | None:
        """Why ``aor``'s certificate could not be had from its service (recent), or None."""
        found = self._failures.get(self._name(aor))
        if found is None or self._clock() - found[1] > OUTCOME_MAX_AGE:
            return None
        return found[0]

    def touch(self, aor: str) -> None:
        """We are talking to ``aor``: keep following its certificate."""
        name = self._name(aor)
        self._used[name] = self._clock()
        self._used.move_to_end(name)
        while len(self._used) > MAX_FOLLOWED * 2:
            self._used.popitem(last=False)

    def want(self, aor: str) -> bool:
        """Fetch ``aor``'s certificate now unless a fetch or a live subscription already
        answers for it; True when one is (now) pending."""
        name = self._name(aor)
        self.touch(name)
        sub = self._sub_of(name)
        if sub is not None and (sub.state != "ended" or sub.fetch_next
                                or sub.retry_at is not None):
            return not sub.notified
        return self._subscribe(name, fetch=self._follow_was_refused(name))

    # -- the loop -----------------------------------------------------------------------
    def tick(self) -> None:
        """Start the fetches the engine asks for, end fetches nobody answered, renew
        the subscriptions of peers still in use, forget what lapsed."""
        now = self._clock()
        for token, sub in list(self._subs.items()):
            if sub.retry_at is not None:
                if now >= sub.retry_at:
                    renewal = self._current.get(sub.aor) != token
                    self._forget(token)
                    self._subscribe(sub.aor, renew=renewal, fetch=sub.requested == 0,
                                    busy=sub.busy)
            elif sub.fetch_next:
                self._forget(token)
                self._subscribe(sub.aor, fetch=True)
            elif sub.state == "ended" or (sub.expires_at is not None and now > sub.expires_at):
                self._forget(token)
            elif not sub.notified and now - sub.started > FETCH_TIMEOUT:
                self.counts["fetches_timed_out"] += 1
                if self._current.get(sub.aor) == token:     # not a renewal: it failed
                    self._fail(sub.aor, "the certificate service did not answer within "
                               f"{FETCH_TIMEOUT:.0f} s")
                self._forget(token)
        for name in [a for a, (_, t) in self._failures.items() if now - t > OUTCOME_MAX_AGE]:
            del self._failures[name]
        for name in [a for a, t in self._follow_refused.items() if now - t > OUTCOME_MAX_AGE]:
            del self._follow_refused[name]
        for aor in self.engine.peer_certificates_wanted():
            sub = self._sub_of(aor)
            if sub is None and self.failure(aor) is None:
                name = self._name(aor)
                self._subscribe(name, fetch=self._follow_was_refused(name))
        self._follow_peers_in_use(now)
        for aor, token in list(self._current.items()):
            sub = self._subs.get(token)
            if sub is None or sub.expires_at is None or not sub.notified:
                continue
            granted = max(1.0, sub.expires_at - sub.started)
            used = self._used.get(aor)
            renewing = any(o.aor == aor and not o.notified for o in self._subs.values())
            due = now - sub.started > granted * _RENEW_FRACTION \
                and used is not None and now - used < max(granted, 60.0)
            if not renewing and (due or sub.restart) and not self._follow_was_refused(aor):
                sub.restart = False
                self._subscribe(aor, renew=True)

    def _follow_peers_in_use(self, now: float) -> None:
        """Follow the certificate of every peer we talk to, whatever taught it (a
        signature, a 493, the service): only a subscription hears of a replacement or a
        withdrawal, and a phone that learnt bob's key from his signature kept sealing
        for it after bob replaced it at his service (review 107).  A peer in
        ``[peers]``, one followed already and one whose service failed lately are
        skipped; never more fetches at once than ``MAX_PENDING``, and a follow never
        pushes another subscription out: past ``MAX_FOLLOWED`` a slot that frees up
        goes to the most recently used peer not followed (review 109: 65 peers in use
        evicted each other and were subscribed again at every turn, 7,800 SUBSCRIBEs a
        minute)."""
        window = max(float(self.subscribe_expires), 60.0)
        for aor, used in reversed(list(self._used.items())):      # the latest first
            if self._pending_count() >= MAX_PENDING or len(self._subs) >= MAX_FOLLOWED:
                return
            if now - used > window or self._sub_of(aor) is not None \
                    or self.failure(aor) is not None or self._follow_was_refused(aor) \
                    or self.engine.is_configured_peer(aor):
                continue
            self._subscribe(aor)

    def _subscribe(self, aor: str, renew: bool = False, fetch: bool = False,
                   busy: int = 0) -> bool:
        """Follow ``aor``'s certificate (a subscription for ``subscribe_expires``), or
        with ``fetch`` have it once (``Expires: 0``, RFC 6665 4.4.3: one NOTIFY)."""
        if self._pending_count() >= MAX_PENDING:
            self._fail(aor, f"too many certificate fetches at once ({MAX_PENDING})")
            return False
        while len(self._subs) >= MAX_FOLLOWED:
            self._forget(next(iter(self._subs)))
        token = secrets.token_hex(8)
        sub = Subscription(aor=aor, token=token, started=self._clock(),
                           requested=0 if fetch else self.subscribe_expires, busy=busy)
        self._subs[token] = sub
        if not renew:
            self._current[aor] = token
        self._failures.pop(aor, None)
        self.counts["fetched" if fetch else "subscribed"] += 1
        try:
            self.send_subscribe(aor, [("Event", "certificate"), ("Expires",
                                                                   str(sub.requested)),
                                      (MARKER, token)])
        except Exception as exc:  # noqa: BLE001 - pjsua refused: the fetch failed
            self._forget(token)
            self._fail(aor, f"the SUBSCRIBE could not be sent ({type(exc).__name__})")
            return False
        self._emit("cert_subscribe", aor=aor, renew=renew)
        return True

    def _follow_was_refused(self, aor: str) -> bool:
        """The service refused to let us follow ``aor`` lately (``OUTCOME_MAX_AGE``):
        its certificate is fetched when wanted, the follow tried again after that."""
        when = self._follow_refused.get(aor)
        return when is not None and self._clock() - when <= OUTCOME_MAX_AGE

    def _forget(self, token: str) -> None:
        sub = self._subs.pop(token, None)
        if sub is not None and self._current.get(sub.aor) == token:
            del self._current[sub.aor]

    def _sub_of(self, aor: str) -> Subscription | None:
        token = self._current.get(self._name(aor))
        return self._subs.get(token) if token else None

    def _fail(self, aor: str, why: str) -> None:
        self._failures[aor] = (why, self._clock())
        self._failures.move_to_end(aor)
        while len(self._failures) > MAX_OUTCOMES:
            self._failures.popitem(last=False)
        self._emit("peer_certificate_failed", aor=aor, reason=why)

    def _emit(self, kind: str, **data: Any) -> None:
        if len(self.events) == self.events.maxlen:
            self.counts["events_dropped"] += 1
        self.events.append({"kind": kind, **data})

    @staticmethod
    def _name(aor: str) -> str:
        try:
            return str(aor_of(aor))
        except E2MError:
            return aor

    # -- the hook, outgoing (inside pjsip: no pjsua2 calls) --------------------------------
    def on_tx(self, msg: sip.SipMessage) -> bytes | None:
        """Our PUBLISH or SUBSCRIBE, rewritten for the wire; None for anything else."""
        if not msg.is_request:
            return None
        if msg.method == "PUBLISH" and _event(msg) in ("presence", "certificate"):
            return self._publish_tx(msg)
        if msg.method == "SUBSCRIBE" and msg.has(MARKER):
            return self._subscribe_tx(msg)
        return None

    def _publish_tx(self, msg: sip.SipMessage) -> bytes | None:
        try:
            target = str(aor_of(parse_uri_of(msg.get("To"))))
        except E2MError:
            return None
        if target != self.aor:
            return None
        out = msg.replace("Event", "certificate").remove("Accept")
        expires = (msg.get("Expires") or "").strip()
        if expires != "0":
            # no later than the certificate's notAfter (the proxy checks it too)
            left = int(self.own_not_after - self._wall())
            out = out.replace("Expires", str(max(0, min(self.publish_expires, left))))
        if msg.body:
            out = out.remove("Content-Disposition").with_body(self.own_der, CONTENT_TYPE) \
                .add("Content-Disposition", "signal")
            action = "modify" if msg.has("SIP-If-Match") else "initial"
        elif expires == "0":
            action = "remove"
        else:
            action = "refresh"
        self._publish_calls[msg.call_id] = action
        self._publish_calls.move_to_end(msg.call_id)
        while len(self._publish_calls) > 8:
            self._publish_calls.popitem(last=False)
        return out.serialize()

    def _subscribe_tx(self, msg: sip.SipMessage) -> bytes:
        token = (msg.get(MARKER) or "").strip()
        out = msg.remove(MARKER).remove("Accept").remove("Contact") \
            .add("Accept", CONTENT_TYPE).add("Contact", f"<{self.contact()}>")
        sub = self._subs.get(token)
        if sub is not None and sub.call_id is None:
            sub.call_id, sub.from_tag = msg.call_id, msg.from_tag
        return out.serialize()

    # -- the hook, incoming -------------------------------------------------------------
    def on_rx(self, msg: sip.SipMessage, source: tuple[str, int] | None, *,
              tcp: bool = False) -> bool:
        """True when ``msg`` is ours and was taken in (a response to our SUBSCRIBE or
        PUBLISH: pjsua still needs it); raises ``NotifyAnswer`` for a certificate
        NOTIFY (ours or not); False for anything else.  ``tcp``: it came over a TCP
        connection (a NOTIFY above 1300 octets to a UDP phone, RFC 3261 18.1.1)."""
        if msg.is_request:
            if msg.method == "NOTIFY" and _event(msg) == "certificate":
                raise self._notify(msg, source, tcp)
            return False
        method = msg.cseq[1]
        if method == "PUBLISH" and msg.call_id in self._publish_calls:
            self._publish_answer(msg)
            return True
        if method == "SUBSCRIBE":
            sub = self._by_dialog(msg.call_id, msg.from_tag)
            if sub is not None:
                self._subscribe_answer(sub, msg)
                return True
        return False

    def _publish_answer(self, msg: sip.SipMessage) -> None:
        status = msg.status or 0
        if status < 200 or status in (401, 407):
            return
        action = self._publish_calls.get(msg.call_id, "?")
        if status < 300:
            self.counts["published"] += 1
            self._emit("certificate_published", action=action, code=status,
                       expires=msg.get("Expires"), fingerprint=_fingerprint(self.own_der))
        else:
            self.counts["publish_failed"] += 1
            self._emit("certificate_publish_failed", action=action, code=status,
                       reason=msg.reason, warning=(msg.get("Warning") or "")[:200])

    def _subscribe_answer(self, sub: Subscription, msg: sip.SipMessage) -> None:
        status = msg.status or 0
        if status < 200 or status in (401, 407):
            return      # pjsua answers a challenge itself, in the same dialog
        if status >= 300:
            sub.state = "ended"
            wait = _retry_after(msg) if status in _BUSY else None
            if wait is None and status in _BUSY_BARE:
                wait = _BARE_BUSY_WAIT
            if wait is not None and sub.busy < BUSY_RETRIES:
                # "not now" (the service's cap on new subscriptions, review 121): the
                # same SUBSCRIBE again after Retry-After (at most BUSY_WAIT_MAX, so a
                # blocked send still gets it), neither a refusal nor a failure yet
                sub.retry_at = self._clock() + min(wait, BUSY_WAIT_MAX)
                sub.busy += 1
                self._emit("cert_service_busy", aor=sub.aor, code=status, retry_in=wait)
                return
            if sub.requested > 0:
                # A follow refused (e.g. 403 Too Many Subscriptions: a stranger's
                # subscriptions hold the AoR's places, review 115): the service still
                # answers a fetch.  For a first follow the next tick sends it (the send
                # waits meanwhile); a refused renewal leaves the subscription it renews
                # to live out its term, and no renewal is sent while the refusal is
                # remembered (each tick sent another: review 119).
                renewal = self._current.get(sub.aor) != sub.token
                if not renewal:
                    sub.fetch_next = True
                self._emit("cert_follow_refused", aor=sub.aor, code=status, renew=renewal)
                self._follow_refused[sub.aor] = self._clock()
                self._follow_refused.move_to_end(sub.aor)
                while len(self._follow_refused) > MAX_OUTCOMES:
                    self._follow_refused.popitem(last=False)
                return
            self._fail(sub.aor, f"the certificate service answered {status} "
                                f"{(msg.reason or '')[:60]}")
            return
        if sub.requested == 0:
            return      # a fetch: it lives until its one NOTIFY (or FETCH_TIMEOUT)
        granted = (msg.get("Expires") or "").strip()
        seconds = int(granted) if granted.isdigit() else sub.requested
        sub.expires_at = sub.started + min(seconds, sub.requested)
        if sub.to_tag is None:
            sub.to_tag = msg.to_tag

    def _by_dialog(self, call_id: str, our_tag: str | None) -> Subscription | None:
        if not our_tag:
            return None
        for sub in self._subs.values():
            if sub.call_id == call_id and sub.from_tag == our_tag:
                return sub
        return None

    def _notify(self, notify: sip.SipMessage, source: tuple[str, int] | None,
                tcp: bool = False) -> NotifyAnswer:
        self.counts["notifies"] += 1
        if not notify.from_tag:    # RFC 3261 §8.1.1.3; the notifier's tag is how we match it
            return self._refuse_notify(400, "Bad Request", "a certificate NOTIFY without a From tag")
        sub = self._by_dialog(notify.call_id, notify.to_tag)
        if sub is None or sub.state == "ended" or (sub.to_tag is not None
                                                   and notify.from_tag != sub.to_tag):
            return self._refuse_notify(481, "Subscription Does Not Exist",
                                       "a certificate NOTIFY in no subscription of ours")
        if self.proxy_source is not None and source is not None \
                and not self._from_proxy(source, tcp):
            return self._refuse_notify(481, "Subscription Does Not Exist",
                                       f"a certificate NOTIFY from {source[0]}:{source[1]}, "
                                       "not from the proxy we subscribed through")
        cseq = notify.cseq[0]
        if sub.notify_cseq is not None and cseq < sub.notify_cseq:
            # RFC 3261 §12.2.2: out of order; a hop's kept copy of an older NOTIFY. And
            # if a hop pushed the CSeq up, the real ones now land here: a fresh
            # subscription (a new dialog) on the next tick gets past that.
            sub.restart = True
            return self._refuse_notify(500, "Server Internal Error",
                                       f"a certificate NOTIFY with CSeq {cseq} after "
                                       f"{sub.notify_cseq}")
        sub.notify_cseq = cseq    # an equal one is read again: a retransmission says
                                  # the same, and older content is refused below (ua.py)
        if sub.to_tag is None:
            sub.to_tag = notify.from_tag
        state, left = _sub_state(notify)
        if state == "pending" and not notify.body:
            # the service holds the certificate back until we answered at our address
            # (one too large for UDP comes later, over TCP): nothing was removed, and a
            # fetch or a renewal waits for the NOTIFY that carries it (review 65)
            return NotifyAnswer(200, "OK")
        now = self._clock()
        if state == "active" and sub.requested > 0:
            if left is not None:
                sub.expires_at = now + min(left, sub.requested)
            keep = (sub.expires_at or now + sub.requested) - now
        else:       # a fetch, or the subscription's end: kept a little while
            keep = TERMINATED_CACHE
        first = not sub.notified
        sub.notified = True
        try:
            cert = self.engine.accept_certificate_notify(notify, sub.aor, max(1.0, keep))
        except E2MError as exc:
            # the dialog is ours and fine; what it carries is not used
            self.counts["certificates_refused"] += 1
            sub.fingerprint = None
            self._fail(sub.aor, f"the certificate from its service was refused: {exc}")
            self._emit("peer_certificate_refused", aor=sub.aor, reason=str(exc)[:200])
        else:
            if cert is None:
                sub.fingerprint = None
                self.counts["certificates_dropped"] += 1
                self._fail(sub.aor, "its certificate service has no certificate for it"
                           if first else "its certificate was removed from its service")
                self._emit("peer_certificate_removed", aor=sub.aor, first=first)
            else:
                fp = _fingerprint(cert.public_bytes(Encoding.DER))
                changed = fp != sub.fingerprint
                sub.fingerprint = fp
                self.counts["certificates_kept"] += 1
                self._failures.pop(sub.aor, None)
                if changed:
                    identity = identity_of(sub.aor)
                    self._emit("peer_certificate", aor=sub.aor, fingerprint=fp,
                               source="certificate service of "
                                      f"{identity.host if identity else '?'}",
                               expires_in=int(keep))
        if state == "terminated" or sub.requested == 0:
            sub.state = "ended"
        else:
            sub.state = "active"
            self._retire_others(sub)
        return NotifyAnswer(200, "OK")

    def _from_proxy(self, source: tuple[str, int], tcp: bool = False) -> bool:
        """Whether ``source`` is our proxy: its address (in one spelling; a host name
        resolved when the client was built), and over UDP its port (over TCP/TLS a
        connection the proxy opened comes from a port of its choosing; so does the one
        it opens to a UDP phone's TCP listener for a large NOTIFY, ``tcp``).  The
        phone's request rule asks the same helper (``ProxySource.matches``, review 102)."""
        assert self.proxy_source is not None
        return self.proxy_source.matches(source, tcp=tcp)

    def _retire_others(self, sub: Subscription) -> None:
        """A renewed subscription took over: the older ones for that AoR go (their
        next NOTIFY gets 481, which ends them at the notifier)."""
        self._current[sub.aor] = sub.token
        for token, other in list(self._subs.items()):
            if other.aor == sub.aor and token != sub.token and other.notified:
                self._subs.pop(token, None)

    def _refuse_notify(self, code: int, reason: str, why: str) -> NotifyAnswer:
        self.counts["notifies_refused"] += 1
        self._emit("cert_notify_refused", code=code, reason=why)
        return NotifyAnswer(code, reason, why)


def parse_uri_of(value: str | None) -> str:
    """The URI of a From/To header value."""
    return sip.parse_address(value or "").uri
