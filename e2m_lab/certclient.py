"""A client of the proxy's RFC 6072 certificate service, for tests: PUBLISH with digest
authentication, SUBSCRIBE (fetch or follow), and the NOTIFYs that come back, each
answered 200 (or what ``notify_answer`` says) and kept byte-exact.

Built on ``SipUa`` (one loopback source address, UDP, TCP or TLS).  What a phone must
send is in docs/protocol.md §11; this is the same SIP, written out by hand.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from e2m_plugins.sip import SipMessage, make_response

from .kamailio_harness import SipUa, parse_address_uri

__all__ = ["CertClient", "Dialog", "CONTENT_TYPE", "cert_rows", "forget_certificates",
           "closed_and_forgotten"]

CONTENT_TYPE = "application/pkix-cert"


@dataclass
class Dialog:
    """A subscription as the subscriber sees it (from the 200 to its SUBSCRIBE)."""

    aor: str
    call_id: str
    from_tag: str
    to_tag: str
    target: str                      # the notifier's Contact
    routes: list[str] = field(default_factory=list)


class CertClient:
    """One user's UA talking to the certificate service of ``port``."""

    def __init__(self, port: int, user: str, *, password: str | None = None,
                 source: str = "127.0.0.1", transport: str = "udp", **kwargs: Any) -> None:
        self.ua = SipUa(port, user=user, password=password, source=source,
                        transport=transport, **kwargs)
        self.notifies: list[SipMessage] = []     # every NOTIFY received, in order
        self.subscribes: list[SipMessage] = []   # every SUBSCRIBE sent, in order
        self.notify_times: list[float] = []
        self.notify_answer = 200
        self._seen = 0                           # messages of ua.received looked at

    def close(self) -> None:
        self.ua.close()

    # -- PUBLISH ---------------------------------------------------------------------
    def publish(self, der: bytes | None, *, aor: str | None = None, to: str | None = None,
                expires: int | None = None,
                etag: str | None = None, event: str | None = "certificate",
                content_type: str = CONTENT_TYPE,
                extra: list[tuple[str, str]] | None = None) -> SipMessage | None:
        """PUBLISH ``der`` (None: a refresh or removal without body) to ``aor``
        (default: our own; ``to``: another To than the AoR), answering a digest
        challenge when we have a password."""
        target = aor or self.ua.aor
        headers = [("Event", event)] if event else []
        if expires is not None:
            headers.append(("Expires", str(expires)))
        if etag is not None:
            headers.append(("SIP-If-Match", etag))
        if der:
            headers.append(("Content-Disposition", "signal"))
        headers += extra or []
        request = self.ua.build("PUBLISH", target, to=to or target, headers=headers,
                                body=der or b"",
                                content_type=content_type if der else None)
        return self.ua.request(request)

    # -- SUBSCRIBE -------------------------------------------------------------------
    def subscribe(self, aor: str, expires: int | None, *, event: str = "certificate",
                  extra: list[tuple[str, str]] | None = None,
                  dialog: Dialog | None = None) -> tuple[SipMessage | None, Dialog | None]:
        """A SUBSCRIBE to ``aor`` (``dialog``: a refresh inside it); the final answer and
        the dialog it made or kept (None when refused)."""
        headers = [("Event", event), ("Contact", self.ua.contact),
                   ("Accept", CONTENT_TYPE)]
        if expires is not None:
            headers.append(("Expires", str(expires)))
        headers += extra or []
        if dialog is None:
            request = self.ua.build("SUBSCRIBE", aor, to=aor, headers=headers)
        else:
            request = self.ua.build("SUBSCRIBE", dialog.target, to=aor, call_id=dialog.call_id,
                                    from_tag=dialog.from_tag, to_tag=dialog.to_tag,
                                    headers=headers, routes=dialog.routes)
        answer = self.ua.request(request)
        sent = self.ua.sent[-1]               # as sent (a retry after 407 has a new CSeq)
        self.subscribes.append(sent)
        self._answer_notifies()
        if answer is None or answer.status != 200:
            return answer, None
        if dialog is not None:
            return answer, dialog
        contact = answer.get("Contact")
        return answer, Dialog(aor=aor, call_id=sent.call_id, from_tag=sent.from_tag or "",
                              to_tag=answer.to_tag or "",
                              target=parse_address_uri(contact) if contact else "",
                              routes=list(reversed(answer.get_all("Record-Route"))))

    def wait_notifies(self, count: int, timeout: float = 5.0) -> list[SipMessage]:
        """Every NOTIFY received so far, once there are ``count`` (or ``timeout`` ran out)."""
        deadline = time.monotonic() + timeout
        while len(self.notifies) < count and time.monotonic() < deadline:
            if self.ua.receive(min(0.2, max(0.01, deadline - time.monotonic()))) is not None:
                self._answer_notifies()
        return list(self.notifies)

    def quiet(self, seconds: float) -> list[SipMessage]:
        """Listen for ``seconds``; the NOTIFYs that came meanwhile."""
        before = len(self.notifies)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.ua.receive(max(0.01, deadline - time.monotonic())) is not None:
                self._answer_notifies()
        return self.notifies[before:]

    def _answer_notifies(self) -> None:
        fresh = self.ua.received[self._seen:]
        self._seen = len(self.ua.received)
        for message in fresh:
            if not message.is_request or message.method != "NOTIFY":
                continue
            # a retransmission (the same CSeq in the same dialog) is answered, not kept
            if not any(m.call_id == message.call_id and m.cseq == message.cseq
                       and m.from_tag == message.from_tag for m in self.notifies):
                self.notifies.append(message)
                self.notify_times.append(time.monotonic())
            self.ua.send(make_response(message, self.notify_answer, "OK"
                                       if self.notify_answer == 200 else "Gone"))


# -- a test's certificate tables (a single proxy's SQLite file) ---------------------------

def cert_rows(home: Any, sql: str, *args: Any) -> list[tuple]:
    """The rows ``sql`` reads from ``home``'s certificate tables (a ``ProxyHandle``)."""
    with sqlite3.connect(home.directory / "certs.sqlite") as conn:
        return conn.execute(sql, args).fetchall()


def forget_certificates(home: Any) -> None:
    """Empty ``home``'s publications and subscriptions, so the next test starts bare."""
    db = home.directory / "certs.sqlite"
    if db.exists():
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM cert_publications")
            conn.execute("DELETE FROM cert_subscriptions")


@contextmanager
def closed_and_forgotten(home: Any) -> Iterator[list]:
    """A list a test puts its clients and sockets in: each is closed after it, even on
    failure, and ``home``'s certificate tables are emptied."""
    things: list = []
    try:
        yield things
    finally:
        for thing in things:
            thing.close()
        forget_certificates(home)
