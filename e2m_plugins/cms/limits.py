"""Resource limits applied while opening untrusted CMS input."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LimitExceededError


@dataclass(frozen=True)
class Limits:
    """Upper bounds for untrusted input; the defaults suit SIP bodies.

    SIP over UDP keeps bodies near 1300 octets and TCP bodies rarely pass a few
    kilobytes, so 256 KiB leaves room for certificates without inviting abuse.
    """

    max_body_bytes: int = 256 * 1024
    max_recipients: int = 16
    max_nesting_depth: int = 4
    max_certificates: int = 16
    max_signers: int = 8
    max_attributes: int = 32

    def check_size(self, length: int) -> None:
        if length > self.max_body_bytes:
            raise LimitExceededError(
                f"body of {length} bytes exceeds the limit of {self.max_body_bytes}")

    def check_count(self, what: str, count: int, bound: int) -> None:
        if count > bound:
            raise LimitExceededError(f"{count} {what} exceed the limit of {bound}")


DEFAULT_LIMITS = Limits()
