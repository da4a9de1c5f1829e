"""``lazy_property``: ``functools.cached_property`` without its lock.

Python 3.11's ``cached_property`` takes an ``RLock`` on every first read of each
attribute (removed in 3.12), about 0.6 µs; a parsed SIP message, MIME part and
certificate node read some twenty such attributes per message on the proxy's hot path.
Every property here computes a pure value from immutable data, so two threads that race
to the first read compute the same value twice and store equal results: no lock is
needed.  Like ``cached_property`` it is a non-data descriptor: once stored in the
instance's ``__dict__`` the value is read from there, without calling anything.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar, overload

__all__ = ["lazy_property"]

T = TypeVar("T")


class lazy_property(Generic[T]):  # noqa: N801 - used as a decorator, like cached_property
    def __init__(self, func: Callable[[Any], T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> lazy_property[T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value
