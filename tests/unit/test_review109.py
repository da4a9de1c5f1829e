"""(draft)"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.certservice_subscriber import PROXY, subscriber
from e2m_plugins import sip
from e2m_plugins.testpki import init_test_pki, issue_user
from pjsua_hooks.certservice_client import MAX_FOLLOWED, NotifyAnswer

ALICE = "sip:alice@example.com"


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


class Services:
    """Every peer's certificate service: each SUBSCRIBE alice's client asks to send is
    answered at once (a 200 and an active NOTIFY carrying the peer's certificate)."""

    def __init__(self, pki, made, peers) -> None:
        self.made = made
        self.certs = {aor: issue_user(pki.ca, aor, "ec").cert.public_bytes(Encoding.DER)
                      for aor in peers}
        self.handled = 0

    def serve(self) -> int:
        client, sent = self.made.client, self.made.sent
        new = sent[self.handled:]
        self.handled = len(sent)
        for aor, headers in new:
            request = sip.make_request("SUBSCRIBE", aor, from_uri=ALICE, to_uri=aor,
                                       extra_headers=[*headers,
                                                      ("Route", "<sip:127.0.0.1:5999;lr>")])
            sub = sip.parse(client.on_tx(request))
            notify = sip.make_request(
                "NOTIFY", "sip:alice@127.0.0.1:5070", from_uri=aor, to_uri=ALICE,
                call_id=sub.call_id, from_tag="srv1", to_tag=sub.from_tag, cseq=1,
                extra_headers=[("Event", "certificate"),
                               ("Subscription-State", "active;expires=3600")],
                body=self.certs[aor], content_type="application/pkix-cert")
            with pytest.raises(NotifyAnswer) as caught:
                client.on_rx(notify, PROXY)
            assert caught.value.code == 200, caught.value
        return len(new)


def _one_minute(pki, peers: int) -> tuple[int, dict]:
    """alice has messaged ``peers`` distinct peers within the hour (``touch``, as
    ``send_message`` does); her phone's certificate loop runs for one minute (a tick
    every 0.1 s, as ``_certservice_work``), each SUBSCRIBE answered at once.  How many
    SUBSCRIBEs it sent, and the client's stats."""
    made = subscriber(pki)
    aors = [f"sip:p{i}@example.com" for i in range(peers)]
    services = Services(pki, made, aors)
    for aor in aors:
        made.client.touch(aor)
    sent = 0
    for _ in range(600):
        made.clock.now += 0.1
        made.client.tick()
        sent += services.serve()
    return sent, made.client.stats()


def test_control_k3_sixty_four_peers_are_subscribed_to_once(pki):
    sent, stats = _one_minute(pki, MAX_FOLLOWED)
    assert sent == MAX_FOLLOWED
    assert stats["subscriptions"] == MAX_FOLLOWED


@pytest.mark.xfail(strict=True, reason="review 109 hole K3: with one peer in use more than "
                   "MAX_FOLLOWED, the phone re-subscribes without end (7,800 SUBSCRIBEs a minute)")
def test_hole_k3_sixty_five_peers_in_use_make_the_phone_subscribe_without_end(pki):
    sent, stats = _one_minute(pki, MAX_FOLLOWED + 1)
    print("SUBSCRIBEs in one minute:", sent, stats)
    # secure: bounded as the subscriptions are: at most one fetch per peer in the minute
    assert sent <= MAX_FOLLOWED + 1, sent
