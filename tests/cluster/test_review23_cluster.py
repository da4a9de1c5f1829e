"""Review 23 behind a dispatcher front: review 22's fix asks ``may_route_onward`` only
when ``loose_route`` set a destination URI, which it does for a loose next hop (``;lr``)
and not for a strict one.  Through the front, a stranger's MESSAGE to one of our users
with ``Route: <sip:front;lr>, <sip:anywhere>`` (no ``;lr``): the front hands it to a node
with the Route set untouched; the node takes the front's entry as its own (its alias),
and Kamailio's strict-router handling (``handle_sr``) rewrites the Request-URI to
``sip:anywhere`` and sets no destination; ``route_target`` then relays by the new
Request-URI.  The same hole as ``tests/kamailio/test_review23_wire.py`` for the whole
domain behind a front.  ``test_hole_*`` was a strict xfail on ``80c8f6c`` and passes now;
``test_control_*`` is the same request with ``;lr`` (403, review 22's fix holds there).
"""

from __future__ import annotations

import pytest

from e2m_lab.kamailio_harness import wait_delivered
from tests.cluster.test_review22_cluster import FRONT_IP, _behind_a_front, _UaVia, elsewhere  # noqa: F401

pytestmark = pytest.mark.kamailio


def _through_the_front(proxy_factory, pg_url, elsewhere, next_hop: str, text: bytes):  # noqa: F811
    front, _a, _b = _behind_a_front(proxy_factory, pg_url)
    ua = _UaVia(FRONT_IP, front.port, user="dave", domain="other.example.net",
                source="127.0.0.51", timeout=4)
    try:
        request = ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                           routes=[f"<sip:{FRONT_IP}:{front.port};lr>", next_hop],
                           body=text, content_type="text/plain")
        answer = ua.transact(request)
        return answer, wait_delivered(elsewhere, text, timeout=1.0)
    finally:
        ua.close()


def test_hole_a_strict_next_hop_through_the_front_is_relayed_anywhere(  # noqa: F811
        proxy_factory, pg_url, elsewhere):
    """Attacker: off-path sender (no account, no spoofing).
    Attack: through the front, a MESSAGE to bob@example.com with ``Route:
    <sip:front;lr>, <sip:anywhere>``.
    Effect: the node relays it to ``anywhere`` (an INVITE: record-routed first, a route
    token for the stranger).
    Fix: in ``route_target``, a Route entry past the proxy is one whatever ``loose_route``
    made of it: refuse unless ``may_route_onward`` when a destination was set *or* the
    Request-URI changed (strict next hop), or check the Route set before ``loose_route``."""
    answer, relayed = _through_the_front(proxy_factory, pg_url, elsewhere,
                                         f"<sip:127.0.0.1:{elsewhere.port}>",
                                         b"review23: strict hop behind the front")
    assert not relayed, f"relayed past the node (answer {answer.status if answer else None})"


def test_control_a_loose_next_hop_through_the_front_is_refused(  # noqa: F811
        proxy_factory, pg_url, elsewhere):
    """The same with ``;lr``: 403 Route Not Allowed, nothing relayed (review 22)."""
    answer, relayed = _through_the_front(proxy_factory, pg_url, elsewhere,
                                         f"<sip:127.0.0.1:{elsewhere.port};lr>",
                                         b"review23: loose hop behind the front")
    assert not relayed
    assert answer is not None and answer.status == 403, answer
