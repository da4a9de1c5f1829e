"""An in-process stand-in for a Kamailio htable, for tests and benchmarks of
``kamailio_app.keycache_htable.HtableKeyCache`` without Kamailio: one dict of values
with their own expiry, the locks checked for balance, and counters of what would cost
in Kamailio (``gets`` and ``sets``: KSR calls; ``reads``: entries ``items()`` walked)."""

from __future__ import annotations

from collections.abc import Callable


class MemoryHtable:
    """``clock``: seconds now (a test's fake clock); entries expire ``ttl`` after set."""

    def __init__(self, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.clock = clock
        self.data: dict[str, tuple[str, float]] = {}
        self.locked: list[str] = []
        self.gets = 0
        self.sets = 0
        self.reads = 0

    def set(self, key: str, value: str, ttl: int) -> None:
        self.sets += 1
        self.data[key] = (value, self.clock() + ttl)

    def get(self, key: str) -> str | None:
        self.gets += 1
        item = self.data.get(key)
        if item is not None and self.clock() >= item[1]:
            del self.data[key]     # Kamailio's autoexpire: gone once its time is up
            return None
        return item[0] if item else None

    def remove(self, key: str) -> None:
        self.data.pop(key, None)

    def items(self) -> list[tuple[str, str]]:
        # expired entries too: Kamailio's htable timer removes them only now and then,
        # and a sweep must cope with finding them
        self.reads += len(self.data)
        return [(k, v) for k, (v, _) in self.data.items()]

    def lock(self, key: str) -> None:
        self.locked.append(key)

    def unlock(self, key: str) -> None:
        assert self.locked.pop() == key, "htable locks released out of order"
