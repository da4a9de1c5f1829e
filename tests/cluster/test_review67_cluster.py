"""A sixty-seventh attacker's review (December 2026) of 2fcd1c5: who a user is - digest,
registration, TLS and the dispatcher front; here on a real cluster behind a front.

Hole (``test_hole_a_caching_ua_behind_the_front_gets_500_from_the_other_node``): **nobody**
(an ordinary two-node cluster behind its dispatcher front; an untrusted hop or any
on-path party that sends a user's request to the other node gets the same).  Each
node's ``auth`` module draws its own random secret at start (the cfg sets no
``secret``), so a nonce one node gave is not a nonce to the other.  For such a nonce
``auth_check`` returns -1, which ``kemi.route_auth`` takes for "auth_db could not read
the users (its database is away)": ``500 Server Internal Error`` with ``Retry-After: 5``,
never a fresh challenge.  A UA that reuses the last challenge with the next nonce count
(as stock UAs do, and as ``SipUa`` does) is challenged by the node its REGISTER's
Call-ID hashes to; every later request with a new Call-ID (each MESSAGE, each call) that
the front's hash over Call-ID sends to the other node is answered 500, and so again
after the Retry-After, for as long as the UA keeps that nonce: half of alice's twelve
messages were refused on a healthy cluster.  After a failover (node A gone) every UA
that A challenged since B started gets 500 from B for good.  (Kamailio takes a nonce
older than its own start for stale and challenges afresh; one younger than its start
but not its own is "invalid": on a cluster every nonce of the other node.  So one
proxy's restart is mostly harmless, a cluster's normal operation is not.)
At fault: ``kemi.route_auth`` (``rc == _AUTH_ERROR`` answered 500 whatever made
``auth_check`` fail) with the cfg template's auth modparams.  Fix: answer a fresh
challenge (``stale=true``) when the credentials' nonce is not one this node can read,
and keep the 500 for a database that cannot be read (tell them apart before
``auth_check``: e.g. ``KSR.auth_db`` asked separately, or auth's own nonce check
through ``$adn`` and a ``pv_auth_check``-style call without the database).  Do not just
share ``modparam("auth", "secret", ...)`` between the nodes: one-time nonces and nonce
counts are each node's own, so alice's captured credentials would then be spent once
per node (a replay at the other node).

Control: the same UA sending everything to the node that challenged it gets 200 every
time; its first, unauthenticated try at the other node is challenged (407), so the
users and the nodes are sound.

Fixed (stop 31): the digest nonce secret is derived from the proxy's private key, alike
on every node (``launcher.auth_nonce_secret``, in a 0600 file of the runtime dir that
the cfg includes): a nonce one node gave is checked at the other.  Each node still
counts a nonce's uses, so credentials captured by a hop can be spent once more at the
other node: the same class as a copy sent to both nodes at once (review 37, a known
limit), and only for the request's own method and Request-URI (which digest binds and
the proxy now checks, review 67's third hole).
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.cluster import start_cluster
from e2m_lab.kamailio_harness import SipUa, registered_uas, wait_delivered

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


def _front(proxy_factory, nodes):
    a, b = nodes.nodes
    return proxy_factory("front", e2m=False, archive=False,
                         extra={"dispatcher": {"destinations": [a.uri, b.uri],
                                               "probe_interval": 600}})


def _messages(ua: SipUa, count: int, tag: str) -> list[int | None]:
    statuses = []
    for n in range(count):
        answer = ua.message("bob", f"{tag} {n}".encode())
        statuses.append(answer.status if answer is not None else None)
    return statuses


def test_control_a_caching_ua_at_the_node_that_challenged_it_is_served(proxy_factory, pg_url):
    nodes = start_cluster(proxy_factory, pg_url, auth=True, users=USERS)
    a, b = nodes.nodes
    with registered_uas(a, "bob", USERS["bob"], "127.0.0.80") as bob:
        time.sleep(0.5)
        ua = SipUa(a.port, user="alice", password=USERS["alice"], source="127.0.0.81")
        stranger = SipUa(b.port, user="alice", source="127.0.0.82")
        try:
            assert _messages(ua, 6, "control") == [200] * 6
            assert wait_delivered(bob, b"control 5")
            first = stranger.transact(stranger.build(
                "MESSAGE", "sip:bob@example.com", to="sip:bob@example.com", body=b"x",
                content_type="text/plain"))
            assert first is not None and first.status == 407
        finally:
            ua.close()
            stranger.close()


def test_hole_a_caching_ua_behind_the_front_gets_500_from_the_other_node(proxy_factory,
                                                                        pg_url):
    nodes = start_cluster(proxy_factory, pg_url, auth=True, users=USERS)
    front = _front(proxy_factory, nodes)
    with registered_uas(front, "bob", USERS["bob"], "127.0.0.83"):
        time.sleep(0.5)
        ua = SipUa(front.port, user="alice", password=USERS["alice"], source="127.0.0.84")
        try:
            assert ua.register().status == 200
            statuses = _messages(ua, 12, "hole")
            assert statuses == [200] * 12, f"alice's messages through the front: {statuses}"
        finally:
            ua.close()
