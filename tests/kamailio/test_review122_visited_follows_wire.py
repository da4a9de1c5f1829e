"""Review 122 (attacker's review of 2161459), honest break HB1 on two real Kamailio 5.6
proxies: the users behind a visited proxy (deployment example #3, ``make demo``'s
topology) share ONE per-source bound of the home's certificate service.

No attacker.  Set-up: the home proxy (``start_proxy``: E2M on, open registrar, ``[certs]``
with the product's bounds: 20 subscriptions per source address, 100 per AoR, 10,000
in all) and a visited proxy in front of it (``e2m = false``, ``next_hop`` the home), as
``tests/e2e/conftest.py`` builds them.  Two honest subscribers, alice at 127.0.122.11 and
carol at 127.0.122.12 (``e2m_lab.certclient.CertClient``: the SUBSCRIBE an e2m-phone
sends, every NOTIFY answered 200), each follow twelve peers of example.com
(``SUBSCRIBE sip:peer<n>@example.com``, ``Event: certificate``, ``Expires: 3600``) through
the visited proxy.

- Observed (two runs): alice 12 of 12 followed; carol 8 of 12, then ``403 Too Many
  Subscriptions`` for the other 4.  The home counts the source address the SUBSCRIBE
  came from (``$si``, ``kamailio_app/cert_route.py:116-119``, bound in
  ``kamailio_app/cert_table.py:361-364``): behind the visited proxy that is the
  visited proxy's, for every user it serves.  An e2m-phone follows every peer it talks
  to, up to 64 (``pjsua_hooks/certservice_client.py:66``, ``MAX_FOLLOWED``), so one
  busy phone alone passes 20 (read; not run on a pjsua phone here).  A refused follow falls back to fetches and is not tried
  again for 300 s: for those peers the phone is not told when a certificate is
  replaced or withdrawn (review 107's reason to follow).  The same holds for the users
  behind one NAT address.  Neither README says so (``kamailio_app/README.md``,
  ``max_subscriptions_per_source``; ``pjsua_hooks/README.md``, "follows").
- Suggested fix: count a subscription by who asked for it, not by the last hop: by the
  subscriber's AoR (the From, which the service can require digest for when it has
  ``[auth]``), with the per-source bound kept for unauthenticated ones only; or exempt
  ``[limits] trusted`` peers (a visited proxy the home knows) from the per-source bound
  and rely on the per-AoR and total bounds there; and document the bound next to the
  phone's 64 follows.

Control (unmarked, passes): ``test_control_hb1_straight_to_the_home_each_follows_twelve``:
the same 24 follows sent straight to the home from the two addresses: 24 of 24.

Fixed (stop 40): the per-source bound does not apply to a SUBSCRIBE from one of our own
addresses or a ``[limits]`` trusted peer (``CertService.route_subscribe(exempt=...)``,
``kemi.exempt_source``, the rule pike follows): a proxy's users all subscribe from its
address.  An operator lists a visited proxy elsewhere in ``[limits] trusted``.  The hole
test failed on the code before the fix and passes with it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2m_lab.certclient import CertClient
from e2m_lab.kamailio_harness import ProxyHandle, start_proxy

pytestmark = pytest.mark.kamailio

PEERS = 12


@pytest.fixture(scope="module")
def proxies(pki, tmp_path_factory) -> Iterator[tuple[ProxyHandle, ProxyHandle]]:
    home = start_proxy(tmp_path_factory.mktemp("r122-home"), pki=pki, e2m=True)
    try:
        visited = start_proxy(tmp_path_factory.mktemp("r122-visited"), pki=None, e2m=False,
                              next_hop=home.uri)
        try:
            yield home, visited
        finally:
            visited.stop()
    finally:
        home.stop()


def _follow(port: int, user: str, source: str, first: int) -> list[int | None]:
    client = CertClient(port, user, source=source)
    try:
        codes = []
        for n in range(first, first + PEERS):
            answer, _ = client.subscribe(f"sip:peer{n}@example.com", 3600)
            codes.append(answer.status if answer is not None else None)
            if answer is not None and answer.status != 200:
                print(f"{user}: {answer.status} {answer.reason}")
        client.quiet(0.5)           # the last NOTIFYs answered
        return codes
    finally:
        client.close()


def test_hole_hb1_two_users_behind_the_visited_proxy_follow_twelve_each(proxies):
    _, visited = proxies
    alice = _follow(visited.port, "alice", "127.0.122.11", 0)
    carol = _follow(visited.port, "carol", "127.0.122.12", 100)
    print(f"\nthrough the visited proxy: alice {alice}, carol {carol}")
    assert alice.count(200) == PEERS and carol.count(200) == PEERS, (alice, carol)


def test_control_hb1_straight_to_the_home_each_follows_twelve(proxies):
    home, _ = proxies
    alice = _follow(home.port, "alice", "127.0.122.21", 200)
    carol = _follow(home.port, "carol", "127.0.122.22", 300)
    assert alice.count(200) == PEERS and carol.count(200) == PEERS, (alice, carol)
