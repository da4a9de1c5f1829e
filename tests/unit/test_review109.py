"""Review 109 (an attacker's review of e180fd3), unit half: hole K3 (the certificate
client's following of peers), and the list of what was tried and held over the whole
review.  Holes K1 (phone and wire) and K2 (cluster) are in
``tests/pjsua/test_review109_phone.py``, ``tests/kamailio/test_review109_wire.py`` and
``tests/cluster/test_review109_dmq_loop.py``.

Hole K3 (``test_hole_k3_sixty_five_peers_in_use_make_the_phone_subscribe_without_end``):
**nobody** (an honest flow; the home proxy is the one harmed, and then alice).

- Set-up: alice's real ``CertServiceClient`` (``e2m_lab.certservice_subscriber``) with a
  service that answers each SUBSCRIBE at once with an active NOTIFY carrying the peer's
  own certificate; alice has messaged or called 65 distinct peers within the hour
  (``touch``, as ``send_message``/``call`` do; none in ``[peers]``); her phone's loop
  ticks every 0.1 s (``phone._certservice_work``).
- Effect (seen): 64 peers: 64 SUBSCRIBEs in the minute, once each.  65 peers: 7,800
  SUBSCRIBEs in one minute (13 per tick, 130 per second, without end), 7,800 NOTIFYs
  taken, 15,344 events dropped.  ``_follow_peers_in_use`` subscribes for every peer
  used in the last ``subscribe_expires`` (3600 s; ``_used`` holds up to 128) that has
  no subscription; ``_subscribe`` makes room at ``MAX_FOLLOWED`` (64) by forgetting the
  oldest subscription; that peer has none at the next tick and is subscribed again,
  evicting the next: the set is bounded, its traffic is not.  Read, not run: the home
  proxy's pike (30 requests in 2 s per source by default) would ban alice's phone
  address at that rate, and each forgotten subscription lives on at the service until
  its next NOTIFY gets 481.
- At fault: ``pjsua_hooks/certservice_client.py:245-259`` (``_follow_peers_in_use``)
  with ``:265-266`` (``_subscribe``'s eviction of the oldest).
- Fix: follow at most ``MAX_FOLLOWED`` peers (the most recently used, ``_used``'s
  newest 64) and never evict a live subscription to follow another peer; or rate-limit
  new SUBSCRIBEs per peer (one per ``OUTCOME_MAX_AGE``) and overall.

Control (passes unmarked): ``test_control_k3_sixty_four_peers_are_subscribed_to_once``
(64 peers: exactly 64 SUBSCRIBEs in the minute, 64 subscriptions kept).

Tried and held over the review (read unless said run):

- Phone (target 1): see the phone module.  Also: ``tx_destination`` is read only for
  on_tx and cleared after (``rawhook._tx``), a retransmission skips it by the
  emitted-bytes shortcut but keeps its noted branch; ``_sent_home`` misses count as
  home.
- Proxy (target 2): REGISTER at a node naming its own DMQ socket is 403 (run); a
  binding at B naming A's SIP socket: at most 2 transactions (run); a UDP contact on the
  proxy's host at another port binds and is reached (review 107's control, not re-run);
  the proxy relaying an entry of ours moved to a port it does not listen on: dropped
  (run, wire control).
- Certificates (target 3): the number of subscriptions is bounded (64) and pending
  fetches (16); an unanswered fetch fails after 5 s and is skipped 300 s; ``touch``
  comes only from alice's own sends, so no outsider can grow ``_used``; ``_learn_signer``
  replaces a held certificate only with a strictly newer ``notBefore`` from an accepted
  message, and ``_withdrawn`` refuses ``<=`` the withdrawn one's ``notBefore`` (a
  hop's replayed old signature cannot bring it back); a ``[peers]`` entry is never
  replaced nor followed.

Untried (time): IPv6 listeners and a phone over IPv6; a registrar named by a DNS name
resolving to several addresses; a cluster behind a front with ``home_sources`` (a node
record-routing the front while the phone sends to a node); a forged empty NOTIFY
through a front; dispatcher probes and the certificate service's NOTIFY through a
front against the new send check; whether an untrusted hop can make alice's peers
exceed 64 (it cannot make her send, read); TCP/TLS connections the proxy opened.

Fixed (stop 38): ``CertServiceClient._follow_peers_in_use`` never makes a follow push
another subscription out: past ``MAX_FOLLOWED`` the most recent peers are followed and
the rest not.  The hole test failed on the code before (checked) and passes.
"""

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


def test_hole_k3_sixty_five_peers_in_use_make_the_phone_subscribe_without_end(pki):
    sent, stats = _one_minute(pki, MAX_FOLLOWED + 1)
    print("SUBSCRIBEs in one minute:", sent, stats)
    # secure: bounded as the subscriptions are: at most one fetch per peer in the minute
    assert sent <= MAX_FOLLOWED + 1, sent
