"""How much public-key work one message may cost, counted before each operation.

A signature check, an RSA decryption, an ECDH exchange, a certificate signature
on a path or a CRL: each is counted against the budget of the message being
handled *before* it runs, so a hostile body (many recipients for our key, many
look-alike CA certificates, many parts) is refused with ``LimitExceededError``
after a fixed amount of work instead of stalling a Kamailio worker or a phone.

The budget is per message, not per call: an engine opens every part of one SIP
message inside ``with message_budget(n):``, and every CMS layer below it spends
from that one budget.  Code that runs without an engine around it (the CLI, a
test) gets a fresh budget for each top-level open or verify (``spend`` starts one
when none is active, see ``budget_scope``).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from ..errors import LimitExceededError

__all__ = ["WorkBudget", "message_budget", "budget_scope", "spend", "DEFAULT_PUBLIC_KEY_OPS"]

# A signed and encrypted INVITE with a split SDP costs about 8 (two decryptions, two
# signatures, two short chains); 32 leaves room for intermediates and a CRL or two.
DEFAULT_PUBLIC_KEY_OPS = 32


@dataclass
class WorkBudget:
    """Public-key operations left for one message."""

    limit: int = DEFAULT_PUBLIC_KEY_OPS
    spent: int = 0

    def spend(self, what: str, count: int = 1) -> None:
        """Count ``count`` operations of kind ``what``; refuse before going over."""
        if self.spent + count > self.limit:
            raise LimitExceededError(
                f"more than {self.limit} public-key operations for one message ({what})")
        self.spent += count


_CURRENT: contextvars.ContextVar[WorkBudget | None] = contextvars.ContextVar(
    "e2m_work_budget", default=None)


class message_budget:
    """A fresh budget for everything done for one message inside the block
    (``with message_budget(n) as budget:``).

    A class rather than a ``contextmanager`` generator: the CMS layers enter a scope
    several times per message, and a generator-based one costs four Python calls each.
    """

    __slots__ = ("_limit", "_token")

    def __init__(self, limit: int = DEFAULT_PUBLIC_KEY_OPS) -> None:
        self._limit = limit
        self._token: contextvars.Token | None = None

    def __enter__(self) -> WorkBudget:
        budget = WorkBudget(self._limit)
        self._token = _CURRENT.set(budget)
        return budget

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None


class budget_scope(message_budget):
    """The budget already in force, or a fresh one for this block when none is.

    Top-level entry points of the CMS layer (``open_message``, ``verify``,
    ``open_envelope``) wrap their work in this, so each call made outside an
    engine is bounded too, and a call made inside one spends the message's budget.
    """

    __slots__ = ()

    def __enter__(self) -> WorkBudget:
        current = _CURRENT.get()
        if current is not None:
            return current          # the enclosing scope's: nothing to reset on exit
        return super().__enter__()


def spend(what: str, count: int = 1) -> None:
    """Count public-key work against the budget in force (one is always in force
    inside ``budget_scope``; outside any scope this is a programming error)."""
    current = _CURRENT.get()
    if current is None:
        raise RuntimeError("public-key work outside a budget_scope")
    current.spend(what, count)
