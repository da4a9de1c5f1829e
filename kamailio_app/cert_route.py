"""The certificate service inside Kamailio: PUBLISH and SUBSCRIBE of ``Event:
certificate`` to our domains' AoRs answered here, NOTIFYs sent from here.

The decisions are the core's (``e2m_plugins.certservice`` for what a request gets,
``e2m_plugins.notifier`` for the dialog); the state is in ``cert_table``.  This module
reads what Kamailio knows about the request (source, socket, the To tag tm gives our
answer, who digest authentication proved), answers through tm, and sends each NOTIFY
with ``t_uac_send`` in the cfg's native route ``E2M_SEND_REQUEST``: the body travels
base64 in ``$var(e2m_body)`` and is decoded there, since a Python str cannot carry DER
into Kamailio.

Who sends what: a SIP worker answers a SUBSCRIBE and sends its first NOTIFY at once
(RFC 6665 §4.2.2); a PUBLISH, a sweep or ``e2m-proxy certs remove`` only marks the
followers of an AoR (``pending``); the timer process (rtimer, every second, ``on_timer``)
sends what is due, at most one NOTIFY per subscription per ``notify_interval``, with
the certificate as it is then (replacements in between are coalesced).  Work per
timer tick is bounded (``BATCH``).  No log line carries a body.

A SUBSCRIBE over UDP may carry a forged source address: a subscription is on
probation until one of its NOTIFYs is answered 2xx (``on_reply``, only for a reply tm
matched to our NOTIFY), and the timer drops it ``UNANSWERED`` seconds after its first
NOTIFY otherwise.  A NOTIFY too large for UDP goes over TCP (RFC 3261 §18.1.1,
``notifier.next_hop_for_size``), but never to an address that has not answered yet:
a TCP connect to a forged address that never answers holds one of the proxy's TCP
connections for the whole connect timeout.  Until then its NOTIFY goes over UDP with
``Subscription-State: pending`` and no body (the certificate "held"); the 2xx to it
releases the certificate, sent by the timer (a fetch: in its final NOTIFY).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, NamedTuple

from e2m_plugins import certservice, notifier
from e2m_plugins.certservice import Answer, ServiceSettings
from e2m_plugins.errors import E2MError, MalformedError
from e2m_plugins.sip import SipMessage

from .cert_connects import MAX_CONNECTS, OpenedConnections
from .cert_table import (FETCH, HELD, UNCONFIRMED, CertDatabase, CertTableError,
                         PublicationTable, SubscriptionLimits, SubscriptionRefused,
                         SubscriptionTable, SubscriptionTaken, source_site)
from .config import CertSettings, Listener
from .dialog_route import dialog_ids
from .sources import SITE_SHARES, site_of

__all__ = ["CertService", "BATCH", "SEND_ROUTE"]

BATCH = 100                      # NOTIFYs (and sweeps) per timer tick at most
# A NOTIFY's transaction is over after 2.5 s (the cfg's event_route[tm:local-request]);
# a subscription none of whose NOTIFYs was answered 2xx by then is dropped.
UNANSWERED = 4.0
# A fetch whose certificate is held back (below) is kept this long for its answer.
HOLD = 32
SEND_ROUTE = "E2M_SEND_REQUEST"  # native route in the cfg template
NOTIFY_TABLE = "e2mnotify"       # branch -> "Call-ID|From tag|To tag" of each NOTIFY sent
_REPLY_BRANCH = "$via0(branch)"  # as the cfg files it (review 120: one empty name for all)
_CHANGES = ("published", "replaced", "removed")
_SUBSCRIBES = "e2mcertsubs"          # the pipelimit pipe of SUBSCRIBEs served
RETRY_UNSENT = 2                     # s: a NOTIFY owed but not sent is tried again after
BUSY_RETRY_AFTER = 2                 # s, in the 503 past max_subscribes_per_second (a pipe counted per second)


class Notified(NamedTuple):
    """What ``CertService._notify`` did: whether the NOTIFY went, and whether its
    certificate was held back (too large for UDP before the subscriber answered)."""

    sent: bool
    held: bool
    retry: bool         # not sent now, owed again (a place toward its address may free)


def _header_text(headers: Iterable[tuple[str, str]]) -> str:
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    if any(ch in line[:-2] for line in lines for ch in "\r\n\x00"):
        raise ValueError("a NOTIFY header contains CR, LF or NUL")
    return "".join(lines)


def contact_uri(proto: str, host: str, port: int | str) -> str:
    """Our Contact at the socket ``proto:host:port`` (what a subscription keeps, and
    how its NOTIFYs find that socket again)."""
    host = f"[{host}]" if ":" in host else host
    proto = proto.lower()
    return f"sip:{host}:{port}" + ("" if proto == "udp" else f";transport={proto}")


class CertService:
    """The service for one proxy; ``ksr`` is Kamailio's KSR module."""

    def __init__(self, settings: CertSettings, anchors: Any, ksr: Any,
                 db: CertDatabase | None = None,
                 listeners: Iterable[Listener] | None = None) -> None:
        self.settings = settings
        # our Contact at each of our sockets -> that socket: a NOTIFY leaves from the
        # socket its subscription was made at, the one address its subscriber takes
        # NOTIFYs from (a cluster node's DMQ socket, or another node, was answered 481
        # and the follow forgotten: review 123 HB4); None: not known (any socket)
        listeners = None if listeners is None else list(listeners)
        self._sockets = None if listeners is None else {
            contact_uri(item.proto, item.host, item.port): item.kamailio()
            for item in listeners}
        self.anchors = anchors
        self.ksr = ksr
        self.connects = OpenedConnections(ksr, (item.port for item in listeners or ()
                                                if item.proto in ("tcp", "tls")))
        self.db = db if db is not None else CertDatabase(settings.path)
        self.publications = PublicationTable(self.db)
        self.subscriptions = SubscriptionTable(self.db)
        self.rules = ServiceSettings(
            min_expires=settings.min_expires,
            default_publish_expires=settings.default_publish_expires,
            max_publish_expires=settings.max_publish_expires,
            default_subscribe_expires=settings.default_subscribe_expires,
            max_subscribe_expires=settings.max_subscribe_expires)
        self.limits = SubscriptionLimits(
            per_aor=settings.max_subscriptions_per_aor,
            per_source=settings.max_subscriptions_per_source,
            per_site=SITE_SHARES * settings.max_subscriptions_per_source,
            total=settings.max_subscriptions)

    # -- which requests are ours ---------------------------------------------------------
    def takes(self) -> bool:
        """A PUBLISH or SUBSCRIBE outside a dialog to a user of our domains, whose Event
        is ``certificate``, or absent (489), or a PUBLISH of a certificate under another
        event (489).  Any other event goes where it went before."""
        ksr = self.ksr
        method = ksr.pv.get("$rm") or ""
        if method not in ("PUBLISH", "SUBSCRIBE") or not ksr.is_myself_ruri() \
                or not ksr.pv.get("$rU"):
            return False
        event = (ksr.pv.get("$hdr(Event)") or "").partition(";")[0].strip().lower()
        if event in ("", certservice.EVENT):
            return True
        ctype = (ksr.pv.get("$cT") or "").partition(";")[0].strip().lower()
        return method == "PUBLISH" and ctype == certservice.CONTENT_TYPE

    def takes_in_dialog(self) -> bool:
        """A SUBSCRIBE inside a dialog sent to our own Contact: a refresh or an
        unsubscribe of one of ours (481 when it is none)."""
        ksr = self.ksr
        return ksr.pv.get("$rm") == "SUBSCRIBE" and bool(ksr.is_myself_ruri()) \
            and not ksr.pv.get("$rU")

    # -- what Kamailio knows about the request ---------------------------------------
    def _peer(self) -> notifier.Peer:
        ksr = self.ksr
        return notifier.Peer(ksr.pv.get("$si") or "", int(ksr.pv.get("$sp") or 0),
                             (ksr.pv.get("$pr") or "udp").lower())

    def _contact(self) -> str:
        """Our Contact: the socket the request came in on."""
        ksr = self.ksr
        return contact_uri(ksr.pv.get("$pr") or "", ksr.pv.get("$Ri") or "",
                           ksr.pv.get("$Rp") or 0)

    def _reply(self, code: int, reason: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        for name, value in headers:
            self.ksr.hdr.append_to_reply(_header_text([(name, value)]))
        self.ksr.sl.send_reply(code, reason)

    def _log(self, method: str, aor: str | None, outcome: str) -> None:
        self.ksr.info("e2m certs: %s %s from %s: %s\n"
                      % (method, aor or "-", self.ksr.pv.get("$si") or "-", outcome))

    def _answer(self, method: str, answer: Answer) -> None:
        self._reply(answer.code, answer.reason, answer.headers)
        self._log(method, answer.aor or self.ksr.pv.get("$ru"),
                  f"refused {answer.code}: {answer.detail}")

    # -- PUBLISH -------------------------------------------------------------------------
    def route_publish(self, message: SipMessage, authenticated_user: str | None,
                      auth_configured: bool) -> None:
        """``authenticated_user``: the user digest authentication proved for this
        request (None: none), owner of that user's AoRs in our domains."""
        owner = None
        if authenticated_user:
            owner = f"sip:{authenticated_user}@{self.ksr.pv.get('$rd')}"
        now = time.time()
        try:
            with self.publications.locked():
                answer = certservice.publish(message, authenticated=owner,
                                             store=self.publications, anchors=self.anchors,
                                             now=now, settings=self.rules)
                followers = self.subscriptions.changed(answer.aor) \
                    if answer.changed in _CHANGES and answer.aor else 0
        except CertTableError as exc:
            self.ksr.err("e2m certs: PUBLISH: %s\n" % exc)
            self._reply(500, "Server Internal Error", [("Retry-After", "5")])
            return
        if answer.code != 200:
            if answer.code == 403 and owner is None:
                answer = Answer(403, "Forbidden", aor=answer.aor, detail=(
                    "not authenticated: From is not one of our users" if auth_configured else
                    "publishing needs digest authentication of the AoR's owner, and "
                    "PROXY.toml has no [auth]"))
            self._answer("PUBLISH", answer)
            return
        self._reply(200, "OK", answer.headers)
        current = self.publications.current(answer.aor or "")
        what = f"{answer.changed} {current.fingerprint[:23]}" if current else answer.changed
        self._log("PUBLISH", answer.aor, f"200 {what} by {owner}, expires {answer.expires}, "
                                         f"{followers} follower(s) to tell")

    # -- SUBSCRIBE -----------------------------------------------------------------------
    def admits_subscribe(self) -> bool:
        """Whether a SUBSCRIBE (a fetch, a follow or a renewal) may be served now: at
        most ``max_subscribes_per_second`` in all (pipelimit, shared by the workers).
        One more is answered 503 with Retry-After, statelessly, before any transaction:
        each served one costs a server transaction and a NOTIFY's, and fetches keep
        nothing to count them by (strangers from 48 addresses, each under pike's rate,
        filled 32 MB of shared memory in 4 s with fetches: review 120, and with renewals
        of their own subscriptions: review 121)."""
        limit = self.settings.max_subscribes_per_second
        if limit <= 0 or self.ksr.pipelimit.pl_check_limit(_SUBSCRIBES, "TAILDROP",
                                                           limit) > 0:
            return True
        self.ksr.statistics.update_stat("e2m_certs_busy", 1)
        self._reply(503, "Service Unavailable", [("Retry-After", str(BUSY_RETRY_AFTER))])
        return False

    def route_subscribe(self, message: SipMessage, exempt: bool = False) -> None:
        """An initial SUBSCRIBE: a fetch (Expires: 0) or a new subscription.  ``exempt``:
        from one of our own addresses or a ``[limits]`` trusted peer (a proxy whose
        users all subscribe from its address): no per-source bound, as pike counts
        none (the users behind a visited proxy shared 20 follows: review 122)."""
        now = time.time()
        limits = replace(self.limits, per_source=self.limits.total,
                         per_site=self.limits.total) if exempt else self.limits
        try:
            answer = certservice.subscribe(message, store=self.publications, anchors=self.anchors,
                                           now=now, settings=self.rules)
            if answer.code != 200:
                self._answer("SUBSCRIBE", answer)
                return
            sub = notifier.open_dialog(message, local_tag=self.ksr.pv.get("$ltt(t)") or "",
                                       peer=self._peer(), contact=self._contact(),
                                       event_id=certservice.event_id(message),
                                       expires=now + (answer.expires or HOLD))
            body = answer.body or b""
            held = self._plan(sub, 1, answer.expires or HOLD, body, confirmed=False)[4]
            flags = (HELD | (0 if answer.expires else FETCH)) if held else 0
            cseq = self.subscriptions.add(sub, limits, now, flags, opened_by=self._peer()) \
                if answer.expires or held else 1
        except SubscriptionTaken as exc:
            self._reply(403, "Forbidden")
            self._log("SUBSCRIBE", message.request_uri, f"refused 403: {exc}")
            return
        except SubscriptionRefused as exc:
            self._reply(403, "Too Many Subscriptions")
            self._log("SUBSCRIBE", message.request_uri, f"refused 403: {exc}")
            return
        except E2MError as exc:
            code = 400 if isinstance(exc, MalformedError) else 403
            self._reply(code, "Bad Request" if code == 400 else "Forbidden")
            self._log("SUBSCRIBE", message.request_uri, f"refused {code}: {exc}")
            return
        except CertTableError as exc:
            self.ksr.err("e2m certs: SUBSCRIBE: %s\n" % exc)
            self._reply(500, "Server Internal Error", [("Retry-After", "5")])
            return
        self._reply(200, "OK", [*answer.headers, ("Contact", f"<{sub.contact}>")])
        self._notify(sub, cseq, answer.expires or (HOLD if held else 0), body, confirmed=False)
        self._log("SUBSCRIBE", sub.aor, f"200 {'follow ' if answer.expires else 'fetch'}"
                                        f"{answer.expires or ''}, NOTIFY with "
                                        + ("the certificate held until the subscriber "
                                           "answers" if held else f"{len(body)} bytes"))

    def route_resubscribe(self, message: SipMessage) -> None:
        """A SUBSCRIBE inside one of our dialogs: a refresh, or an unsubscribe
        (Expires: 0); 481 for a dialog we do not have."""
        now = time.time()
        try:
            sub = self.subscriptions.get(message.call_id, message.to_tag or "",
                                         message.from_tag or "",
                                         certservice.event_id(message) or "")
            if sub is None:
                self._reply(481, "Subscription Does Not Exist")
                self._log("SUBSCRIBE", None, "refused 481: no such subscription")
                return
            if site_of(self._peer().ip) != source_site(sub.source):   # kept as counted
                # its NOTIFYs go to sub.source only: a refresh or an unsubscribe from
                # elsewhere is someone who saw the dialog's identifiers
                self._reply(403, "Forbidden")
                self._log("SUBSCRIBE", sub.aor, "refused 403: not from the subscription's "
                                                "source address")
                return
            answer = certservice.subscribe(message, store=self.publications, anchors=self.anchors,
                                           now=now, settings=self.rules, aor=sub.aor)
            if answer.code != 200:
                self._answer("SUBSCRIBE", answer)
                return
            flags = self.subscriptions.flags(sub) or 0
            if answer.expires:
                sub = notifier.refresh_dialog(sub, message, now + answer.expires,
                                              self._peer())
                cseq = self.subscriptions.refreshed(sub, now)
            else:
                # an unsubscribe too: a datagram from another port must not end it
                # (review 134 K3); its final NOTIFY goes where the request came from
                sub = replace(sub, next_hop=notifier.in_dialog_hop(sub, self._peer()))
                cseq = self.subscriptions.remove(sub)
        except notifier.SubscriberMovedError as exc:
            # the row stays (a forged datagram must not end it): it lapses at its expiry
            self._reply(481, "Subscription Does Not Exist")
            self._log("SUBSCRIBE", sub.aor, f"refused 481: {exc}; subscribe anew")
            return
        except E2MError as exc:
            self._reply(400, "Bad Request")
            self._log("SUBSCRIBE", None, f"refused 400: {exc}")
            return
        except CertTableError as exc:
            self.ksr.err("e2m certs: SUBSCRIBE: %s\n" % exc)
            self._reply(500, "Server Internal Error", [("Retry-After", "5")])
            return
        if cseq is None:                     # gone meanwhile (the timer, a 481)
            self._reply(481, "Subscription Does Not Exist")
            return
        self._reply(200, "OK", [*answer.headers, ("Contact", f"<{sub.contact}>")])
        confirmed = not flags & UNCONFIRMED
        notified = self._notify(sub, cseq, answer.expires, answer.body or b"", confirmed)
        if notified.held and answer.expires:
            self.subscriptions.hold(sub)
        elif answer.expires and confirmed:
            self._owe(sub, notified, time.time())
        self._log("SUBSCRIBE", sub.aor, f"200 {'refresh' if answer.expires else 'unsubscribe'}"
                                        f" {answer.expires}")

    # -- NOTIFY --------------------------------------------------------------------------
    @staticmethod
    def _plan(sub: notifier.Subscription, cseq: int, expires_left: int, body: bytes,
              confirmed: bool) -> tuple[str, str, str, bytes, bool]:
        """The NOTIFY to send: Request-URI, next hop, header text, body, and whether
        the certificate is held back (too large for UDP, and the subscriber has not
        answered at its address yet: no TCP connect to what may be a forged one)."""
        request = notifier.notify_request(sub, cseq)
        event_id = sub.event_id or None
        state = certservice.notify_headers(expires_left, bool(body), event_id)
        headers = _header_text([*request.headers, *state])
        size = len(f"NOTIFY {request.request_uri} SIP/2.0\r\n") + len(headers) + 2 + len(body)
        hop = notifier.next_hop_for_size(request.next_hop, size)
        if confirmed or hop == request.next_hop:
            return request.request_uri, hop, headers, body, False
        state = [(name, f"pending;expires={expires_left}"
                  if name == "Subscription-State" and expires_left > 0 else value)
                 for name, value in certservice.notify_headers(expires_left, False, event_id)]
        return (request.request_uri, request.next_hop,
                _header_text([*request.headers, *state]), b"", True)

    def _may_send(self, sub: notifier.Subscription, hop: str) -> tuple[str | None, int]:
        """How a NOTIFY goes to ``hop``, and the connection found there (0: none looked
        up or found): None over UDP; "own" over a follow's own TCP or TLS connection
        (``notifier.own_connection``), which is open; "gone" never, that
        connection being gone (nobody listens at its port, and its subscriber hears at
        its next refresh, over a new one); "open" to any other stream destination, which
        takes a place (``cert_connects``: at most ``MAX_CONNECTS`` per address, each
        for a short life).  Strangers' follows and fetches aimed at their own silent
        ports filled the proxy's whole connection table (review 145); a lookup is not
        trusted to say that no connection will be opened (review 148 K1)."""
        destination = notifier.stream_destination(hop)
        if destination is None:
            return None, 0
        if not notifier.own_connection(sub, hop):
            return "open", 0
        found = self.connects.conid_to("%s:%s" % destination)
        return ("own" if found else "gone"), found

    def _unsent(self, sub: notifier.Subscription, hop: str, own: bool) -> None:
        """A NOTIFY that did not go: counted (``e2m_certs_unsent``) and logged."""
        host, port = notifier.stream_destination(hop) or ("", 0)
        self.ksr.statistics.update_stat("e2m_certs_unsent", 1)
        self._log("NOTIFY", sub.aor, f"not sent: no connection to {host}:{port}"
                  + ("" if own else f", and no place of ours free toward that address "
                                      f"(at most {MAX_CONNECTS})"))

    def _notify(self, sub: notifier.Subscription, cseq: int, expires_left: int,
                body: bytes, confirmed: bool = True) -> Notified:
        """Send one NOTIFY, if it may go (``_may_send``, ``OpenedConnections``).
        Whether it went, and whether its certificate was held back."""
        ruri, hop, headers, body, held = self._plan(sub, cseq, expires_left, body, confirmed)
        verdict, found = self._may_send(sub, hop)
        if verdict == "gone":
            # not owed again (review 147 K2: a follow whose connection is gone was
            # retried every 2 s for its whole life)
            self._unsent(sub, hop, own=True)
            return Notified(False, held, retry=False)
        ksr = self.ksr
        ksr.pv.sets("$var(e2m_method)", "NOTIFY")
        ksr.pv.sets("$var(e2m_ruri)", ruri)
        ksr.pv.sets("$var(e2m_nexthop)", hop)
        # (a subscription made at no socket of ours, its node gone: tm picks one).  Over
        # a follow's own connection the socket is not forced: tm then takes the
        # connection the lookup above found, whichever local address it has (forced,
        # it asks for that socket's, and would open a new one: review 148 K1)
        ksr.pv.sets("$var(e2m_socket)", "" if verdict == "own" else
                    (self._sockets or {}).get(sub.contact, ""))
        ksr.pv.sets("$var(e2m_hdrs)", headers)
        ksr.pv.sets("$var(e2m_body)", base64.b64encode(body).decode("ascii"))
        host, port = notifier.stream_destination(hop) or ("", 0)
        if verdict == "open":
            if not self.connects.open_with(host, port, lambda: ksr.route(SEND_ROUTE)):
                # owed again: a place toward that address frees within CONNECT_LIFETIME
                self._unsent(sub, hop, own=False)
                return Notified(False, held, retry=True)
        elif verdict == "own":
            self.connects.send_over(host, port, found, lambda: ksr.route(SEND_ROUTE))
        else:
            ksr.route(SEND_ROUTE)
        return Notified(True, held, retry=False)

    def _owe(self, sub: notifier.Subscription, notified: Notified, now: float) -> None:
        """A confirmed subscription's NOTIFY that did not go is owed again, due
        ``RETRY_UNSENT`` s later (review 146 HB1: it was lost until a refresh)."""
        if notified.retry:
            self.subscriptions.owe(sub, due_at=now + RETRY_UNSENT,
                                   interval=self.settings.notify_interval)

    def _body(self, aor: str, now: float, cache: dict[str, bytes]) -> bytes:
        if aor not in cache:
            cache[aor] = certservice.served_certificate(self.publications, aor, self.anchors, now)
        return cache[aor]

    def on_timer(self) -> int:
        """One tick of the timer process: lapsed publications are removed (their
        followers owed a NOTIFY), lapsed subscriptions get their final NOTIFY, due
        ones theirs; the connections the service opened are held to their bounds
        (``OpenedConnections.sweep``).  How many NOTIFYs it sent."""
        now = time.time()
        try:
            self.connects.sweep()
        except ValueError as exc:
            # no listing: no place is freed (no connection is opened past the bound),
            # and the NOTIFYs that need none still go
            self.ksr.err("e2m certs: connections not listed: %s\n" % exc)
        dropped = self.subscriptions.drop_unanswered(now - UNANSWERED, BATCH)
        if dropped:
            self.ksr.info("e2m certs: %d subscription(s) dropped: their NOTIFY was never "
                          "answered\n" % dropped)
        for aor in self.publications.lapsed(now, BATCH):
            with self.db.write():
                if self.publications.remove_lapsed(aor, now):
                    told = self.subscriptions.changed(aor)
                    self.ksr.info("e2m certs: the publication of %s lapsed; %d follower(s) "
                                  "to tell\n" % (aor, told))
        bodies: dict[str, bytes] = {}
        sent = 0
        mine = None if self._sockets is None else set(self._sockets)
        for claim in self.subscriptions.claim_lapsed(now, BATCH, mine):
            sub, cseq = claim
            sent += self._notify(sub, cseq, 0, self._body(sub.aor, now, bodies),
                                 claim.confirmed).sent
        for claim in self.subscriptions.claim_due(now, self.settings.notify_interval, BATCH,
                                                  mine):
            sub, cseq = claim
            notified = self._notify(sub, cseq, max(1, int(sub.expires - now)),
                                    self._body(sub.aor, now, bodies), claim.confirmed)
            if notified.held:
                self.subscriptions.hold(sub)
            elif claim.confirmed:
                self._owe(sub, notified, now)
            sent += notified.sent
        return sent

    def on_reply(self) -> None:
        """A reply seen by the core reply route, for every reply that arrives: only one
        tm matched to a NOTIFY transaction of ours counts (a reply is anyone's
        datagram: its Call-ID and tags are no proof).  A 481 ends that subscription
        (RFC 6665 §4.2.2); a 2xx confirms that its subscriber is where it said."""
        ksr = self.ksr
        status = ksr.pv.get("$rs") or 0
        if ksr.pv.get("$rm") != "NOTIFY" or not (status == 481 or 200 <= status < 300):
            return
        if ksr.tm.t_check_trans() <= 0:
            return
        call_id, from_tag, to_tag = dialog_ids(ksr)
        dialog = (call_id, from_tag or "", to_tag or "")
        # tm matched the reply by its Via branch alone: a fetch of one's own gets one a
        # NOTIFY transaction to answer with any dialog's ids (review 89).  The dialog is
        # the one that transaction's NOTIFY was sent in (the cfg's tm:local-request).
        branch = ksr.pv.get(_REPLY_BRANCH) or ""
        sent_in = ksr.htable.sht_get(NOTIFY_TABLE, branch) if branch else None
        # kept as "Call-ID|From tag|To tag": ids holding a bar (no RFC 3261 word or
        # token does) could join to another dialog's string; without one, equal strings
        # are equal ids, whatever the NOTIFY's held (review 93)
        if any("|" in part for part in dialog) or \
                sent_in != "%s|%s|%s" % (call_id, dialog[1], dialog[2]):
            return
        # the first answer to a NOTIFY is the one acted on: tm matches every copy of it
        # for the transaction's life, and each would list the connection table again
        # (review 150 K1: 1,500 copies over a twin held both cores)
        ksr.htable.sht_rm(NOTIFY_TABLE, branch)
        self.connects.close_answered()
        if status != 481:
            self.subscriptions.confirm(*dialog, now=time.time())
            return
        if self.subscriptions.forget_dialog(*dialog):
            ksr.info("e2m certs: a subscriber answered 481: its subscription is gone\n")
