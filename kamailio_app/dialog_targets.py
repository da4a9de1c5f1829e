"""What the proxy keeps per dialog to tell where a BYE went: the htable ``e2mtargets``.

A BYE's 2xx ends a dialog's keys only when the BYE went to the dialog's other party
(``kemi.note_caller_target``, ``note_dialog_targets``, ``note_bye_way``,
``end_answered_dialog``; reviews 92, 94, 96).  For that the proxy notes, per dialog,
each party's remote target (its Contact, as a digest) and its side of the route set:

* ``c`` + digest(Call-ID, caller's tag): ``<caller's target>:<side>``, for the INVITE's
  life (``UNANSWERED``); at its first 2xx ``|<digest of the callee's tag>`` is added;
* ``d`` + digest(Call-ID, both tags sorted): ``<digest of the callee's tag>|<callee's
  target>:<side>``, written at that 2xx.

Both are kept ``DIALOG`` seconds only while the key cache holds keys for the dialog,
and they go with its record: at a BYE's 2xx, and whenever the key cache removes the
dialog's record otherwise (its last key spent or expired, the keeper's quota, the
cache's bound: ``forgetter``), so a user whose keys her quota pushes out leaves no
12-hour targets behind (review 99).  Tags compare case-insensitively (RFC 3261 §19.3),
as the key cache's scopes do: a name is made from them lower-cased.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from e2m_plugins.keycache import DialogScope, Scope

from .dialog_route import UNREAD_ROUTE_SET

TABLE = "e2mtargets"
UNANSWERED = 64     # s: an INVITE's life (fr_inv_timer 30 s) and its wait
DIALOG = 43200      # s: a dialog's keys live no longer (keycache.MAX_TTL)


def digest(text: str) -> str:
    """The short digest the table holds in place of a target, a tag or a name."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def tag_digest(tag: str) -> str:
    return digest(tag.lower())


def dialog_name(call_id: str, tag: str, other: str) -> str:
    """A dialog's name in the table, the same from either side."""
    first, second = sorted((tag.lower(), other.lower()))
    return "d" + digest("\n".join((call_id, first, second)))


def caller_name(call_id: str, caller: str) -> str:
    return "c" + digest("\n".join((call_id, caller.lower())))


def target_and_side(text: str | None) -> tuple[str, str]:
    """(remote target, route-set side) of a value part ``target:side``; the side
    ``UNREAD_ROUTE_SET`` when none was noted."""
    target, _, side = (text or "").partition(":")
    return target, side or UNREAD_ROUTE_SET


def callers_tag(held: str, tag: str, other: str) -> str:
    """Of a dialog's two tags, the caller's: the one that is not the callee's whose
    digest the dialog's entry ``held`` begins with."""
    return other if tag_digest(tag) == held.split("|", 1)[0] else tag


def forget(ksr: Any, call_id: str, tag: str, other: str) -> None:
    """Remove a dialog's two entries (nothing when they are not there)."""
    name = dialog_name(call_id, tag, other)
    held = ksr.htable.sht_get(TABLE, name)
    if not isinstance(held, str):
        return
    ksr.htable.sht_rm(TABLE, name)
    ksr.htable.sht_rm(TABLE, caller_name(call_id, callers_tag(held, tag, other)))


def forgetter(ksr: Any) -> Callable[[Scope], None]:
    """What the key cache calls with each scope whose record it removed
    (``HtableKeyCache(gone=...)``): a confirmed dialog's targets go with its keys."""
    def gone(scope: Scope) -> None:
        if isinstance(scope, DialogScope) and len(scope.tags) == 2:
            forget(ksr, scope.call_id, *scope.tags)
    return gone
