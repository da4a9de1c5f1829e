"""Writing an htable item that has a life of its own.

Kamailio 5.6's ``sht_setxs`` (``ht_set_cell_ex``) writes a string over an item in place
when the old value is a string at least as long; otherwise it makes a new cell, gives
the expiry to the old cell and frees that one, so the new cell never expires (fixed
upstream in May 2026, after 5.6.3).  Every item the proxy keeps for a while (call
notes, the key cache, answers kept for late copies) would then stay in shared memory
for the proxy's life whenever it was rewritten longer (stop 46).  ``put_expiring`` sets
the expiry again, on the cell the write left, whenever the write may have replaced it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["put_expiring"]


def put_expiring(ksr: Any, table: str, key: str, value: str, seconds: int,
                 previous: Any = None) -> int:
    """Write ``value`` as item ``key`` of ``table``, to expire in ``seconds``; what
    ``sht_setxs`` answered (negative: not written).  ``previous`` is the value read
    just before under the item's lock, if any: when it is a string at least as long,
    the write was in place and the expiry is right.  Otherwise (None included: an
    expired item that is still there reads as None) the expiry is set again.  A table
    replicated over DMQ sends that expiry once more; its peers were right already
    (they apply a value, then its expiry, as two actions)."""
    written = ksr.htable.sht_setxs(table, key, value, seconds)
    if written >= 0 and not (isinstance(previous, str) and _octets(previous) >= _octets(value)):
        ksr.htable.sht_setex(table, key, seconds)
    return written


def _octets(text: str) -> int:
    # Kamailio compares the strings' octets: "ééé" is 3 characters but 6 octets
    return len(text.encode("utf-8", "surrogateescape"))
