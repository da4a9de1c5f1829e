"""Callbacks recorded as events that a caller can wait for while pumping pjsip.

pjsua2 calls back into Python from inside ``libHandleEvents``; the callbacks
only append an :class:`Event` here.  Application code and tests then wait for
the event they need with a timeout, pumping the event loop meanwhile, on the
one thread that owns the endpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Event", "EventLog"]


@dataclass(frozen=True)
class Event:
    """One callback.  ``data`` may hold message text: it never shows in the repr."""

    kind: str                 # "message", "message_status", "call_state", "media", "reg", ...
    source: str               # the account or call it belongs to
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    at: float = field(default_factory=time.monotonic)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def __repr__(self) -> str:
        safe = {k: v for k, v in self.data.items()
                if isinstance(v, (int, float, bool)) or k in ("state", "reason", "state_text")}
        return f"Event({self.kind!r}, {self.source!r}, {safe})"


Predicate = Callable[[Event], bool]


class EventLog:
    """An append-only list of events with waiting helpers; the oldest go beyond
    ``limit`` (a quarter more is kept before they are trimmed).

    ``pump(ms)`` runs the event loop for up to ``ms`` milliseconds; it is
    given by the endpoint that owns the log.
    """

    def __init__(self, pump: Callable[[int], object], limit: int = 10000) -> None:
        self._pump = pump
        self._events: list[Event] = []
        self._seq = 0
        self._limit = limit

    def add(self, kind: str, source: str, **data: Any) -> Event:
        self._seq += 1
        ev = Event(kind, source, data, self._seq)
        self._events.append(ev)
        if len(self._events) > self._limit + self._limit // 4:   # trimmed in batches
            del self._events[: len(self._events) - self._limit]
        return ev

    def mark(self) -> int:
        """A position: ``find``/``wait`` with ``since=mark`` see only later events."""
        return self._seq

    def find(self, kind: str | None = None, *, source: str | None = None,
             where: Predicate | None = None, since: int = 0) -> list[Event]:
        # Sequence numbers are consecutive: the events after ``since`` are a tail.
        start = max(0, since - self._events[0].seq + 1) if self._events else 0
        return [e for e in self._events[start:]
                if e.seq > since and (kind is None or e.kind == kind)
                and (source is None or e.source == source) and (where is None or where(e))]

    def wait(self, kind: str, *, source: str | None = None, where: Predicate | None = None,
             since: int = 0, timeout: float = 5.0) -> Event:
        """The first matching event after ``since``; pumps until it comes.

        Raises TimeoutError (naming the events that did arrive) after ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(kind, source=source, where=where, since=since)
            if found:
                return found[0]
            if time.monotonic() >= deadline:
                recent = self.find(since=since)[-8:]
                raise TimeoutError(f"no {kind!r} event from {source or 'any source'} within "
                                   f"{timeout:.1f}s; recent: {recent}")
            self._pump(10)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Pump until ``predicate()`` is true; False on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            self._pump(10)
        return True

    def __len__(self) -> int:
        return len(self._events)
