"""Review 22's open relay on one proxy: who may make it follow a Route set past itself.

The twenty-second review (``tests/cluster/test_review22_cluster.py``) found that behind a
dispatcher front every stranger passed ``may_route_onward``: the front's alias made its
address "myself".  The same question had two more answers that were wrong, shown here
on a single proxy with ``[auth]``: a request from an address in ``[limits] trusted``
(which README tells operators to use for a visited proxy, carrying all of its users'
traffic) and one from the proxy's own address (a spoofed UDP source, or anything local)
were both relayed past the proxy to any address, for a stranger who never authenticated.
``[limits] trusted`` says whom pike leaves alone, not who may relay through us; a
source address names the last hop, not the request's author.  Now only a user who proved
a password (or a proxy without ``[auth]``, which warns that it relays for anyone) has a
preloaded Route followed.  Each ``test_hole_*`` failed on ``3e41190``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2m_lab.kamailio_harness import ProxyHandle, RawUas, SipUa, start_proxy, wait_delivered
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import TestPKI

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
VISITED = "127.0.0.52"      # a visited proxy's address, listed in the home proxy's trusted


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("review22-home"), pki=pki, e2m=True, auth=True,
                        users=USERS, extra={"limits": {"trusted": [VISITED]}})
    yield proxy
    proxy.stop()


@pytest.fixture
def elsewhere() -> Iterator[RawUas]:
    """Anyone's UAS on the Internet (none of our users): answers 200."""
    uas = RawUas(lambda request: make_response(request, 200, "OK"))
    yield uas
    uas.close()


def preloaded_message(ua: SipUa, first_route: str, elsewhere: RawUas, text: bytes):
    """dave of another domain writes to bob (ours: never challenged) with a Route set
    whose next entry is an address of his choosing."""
    return ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                    routes=[first_route, f"<sip:127.0.0.1:{elsewhere.port};lr>"],
                    body=text, content_type="text/plain")


def assert_refused_not_relayed(ua: SipUa, first_route: str, elsewhere: RawUas,
                               text: bytes) -> None:
    """dave's preloaded MESSAGE is answered 403 and reaches nothing past the proxy."""
    answer = ua.transact(preloaded_message(ua, first_route, elsewhere, text))
    relayed = wait_delivered(elsewhere, text, timeout=0.7)
    assert not relayed, f"relayed past the proxy (answer {answer.status if answer else None})"
    assert answer is not None and answer.status == 403, answer


def _refused_from(home: ProxyHandle, elsewhere: RawUas, source: str, text: bytes) -> None:
    ua = SipUa(home.port, user="dave", domain="other.example.net", source=source)
    try:
        assert_refused_not_relayed(ua, f"<sip:127.0.0.1:{home.port};lr>", elsewhere, text)
    finally:
        ua.close()


def test_hole_a_strangers_request_through_a_trusted_peer_is_relayed_anywhere(home, elsewhere):
    """Off-path sender behind a peer the home proxy lists in ``[limits] trusted`` (README:
    a visited proxy carries all of its users' traffic from one address, list it there).
    The peer relays anyone's request, so dave's MESSAGE arrives from the peer's address
    with ``Route: <home;lr>, <anywhere;lr>``.  ``may_route_onward`` took a trusted source
    for a trusted author: the home proxy relayed it to the address of dave's choice.
    Now: 403 Route Not Allowed, nothing relayed."""
    _refused_from(home, elsewhere, VISITED, b"review22: via a trusted peer")


def test_hole_a_request_from_the_proxys_own_address_is_relayed_anywhere(home, elsewhere):
    """Off-path sender who writes the proxy's own address as the UDP source (or anything
    local to it): ``is_myself_srcip`` called it "a spiral or a local tool", and the
    preloaded Route was followed to any address (the answer goes to the proxy, the
    relayed request still reaches its target).  Now: 403, nothing relayed."""
    _refused_from(home, elsewhere, "127.0.0.1", b"review22: from myself")


def test_control_an_authenticated_users_preloaded_route_is_followed(home, elsewhere):
    """What the rule keeps: alice proves her password, and her MESSAGE with a Route set
    past the proxy goes where the Route says."""
    ua = SipUa(home.port, user="alice", password=USERS["alice"], source=VISITED)
    try:
        text = b"review22: alice routes onward"
        answer = ua.request(preloaded_message(ua, f"<sip:127.0.0.1:{home.port};lr>",
                                              elsewhere, text))
        assert answer is not None and answer.status == 200, answer
        assert wait_delivered(elsewhere, text, timeout=2.0)
    finally:
        ua.close()


def test_control_a_trusted_peer_is_still_not_limited(home):
    """``[limits] trusted`` keeps its meaning: the peer's address is never banned by pike
    (many requests in a burst from it all get answers)."""
    ua = SipUa(home.port, user="dave", domain="other.example.net", source=VISITED)
    try:
        answers = [ua.transact(ua.build("OPTIONS", f"sip:127.0.0.1:{home.port}"))
                   for _ in range(40)]
        assert all(a is not None and a.status == 200 for a in answers), \
            [a.status if a else None for a in answers]
    finally:
        ua.close()
