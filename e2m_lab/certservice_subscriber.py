"""alice's certificate-service client (pjsua_hooks.certservice_client) without pjsua:
a UA engine, the client, the SUBSCRIBEs it asks to send and a clock the test moves.
One setup for every test of the client's NOTIFY handling."""

from __future__ import annotations

from dataclasses import dataclass, field

from e2m_plugins.testpki import TestPKI
from e2m_plugins.ua import UAEngine
from pjsua_hooks.certservice_client import CertServiceClient

from .flows import ua_engine

PROXY = ("127.0.0.1", 5999)      # the address NOTIFYs must come from


class ManualClock:
    """Monotonic seconds that move only when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Subscriber:
    engine: UAEngine
    client: CertServiceClient
    clock: ManualClock
    sent: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)


def subscriber(pki: TestPKI) -> Subscriber:
    """alice with no peers, subscribing through the proxy at ``PROXY``."""
    engine = ua_engine(pki, "alice", peers=())
    clock = ManualClock()
    sent: list[tuple[str, list[tuple[str, str]]]] = []
    client = CertServiceClient(engine, pki.user("alice").cert,
                               send_subscribe=lambda aor, headers: sent.append((aor, headers)),
                               contact=lambda: "sip:alice@127.0.0.1:5070",
                               proxy_address=PROXY, clock=clock)
    return Subscriber(engine, client, clock, sent)
