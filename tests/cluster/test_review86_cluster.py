"""An eighty-sixth attacker's review (December 2026) of 39747f2: the per-source
registration count's settling (``kemi.settle_registration``, ``_replied_seconds``) on a
dispatcher front, on two real Kamailio nodes, a front and the harness's PostgreSQL.
The rest of the review: ``tests/unit/test_review86.py``,
``tests/kamailio/test_review86_wire.py``.

Hole (``test_hole_a_front_never_settles_a_wrapping_expires_holds_slots``): attacker: an
**off-path sender** forging (or sharing: a NAT, a hotel) a source address S, the
registrar open (no [auth]), the cap on the front (review 71's fix).  Messages: three
REGISTERs from S through the front, each for a junk AoR with ``Expires: 4294967296``
(review 85's wrap).  Effect: the front claims a slot per AoR for what it reads (an
hour); the node's registrar reads 0 and binds nothing, and its 2xx lists no Contact, so
``_replied_seconds`` is 0 and the slot should be freed.  It is not: in tm's onreply
route ``settle_registration`` names the pair by ``$si``, which there is the *node's*
address, not S (and ``exempt_source`` is asked of the node too), so it finds no slot
and returns: every claim keeps the lifetime read from the request.  bob's first
REGISTER from S is 403 "Too Many Registrations" for an hour, nothing being bound there
(review 85's hole 2, fixed on a single proxy, stands on a front; likewise every plain
de-registration holds its slot the 10 s slack, and review 85's hole 1, a single-quoted
``;x='y;expires=0;z='`` the front reads as a removal, is never raised to the hour the
node bound, so the cap lapses after 10 s).  At fault: ``kamailio_app/kemi.py``
``_registration_pair`` (``source = KSR.pv.get("$si")``) as called from
``settle_registration`` in ``ksr_onreply_route`` (the ``self.settle_registration(
_replied_seconds())`` line); ``counts_registrations``/``exempt_source`` read the reply's
source too.  Fix: in the reply route read the request's source and AoR from the
transaction (``$T_req($si)``, ``$T_req($tu)``) or keep the pair name in an AVP
(``$avp(e2m_reg_pair)``) set by ``count_registration``, which tm carries into the reply
route; and settle on a non-2xx final as on a 2xx with no Contact (free the claim).

Control: through the same front, plain REGISTERs are counted (the fourth AoR from one
address is 403), and the wrapping REGISTER binds nothing on either node.

Fixed (stop 34): the front settles in its reply route by the request's source and To
(``$T_req($si)``, ``$T_req($tu)``, ``settle_registration(in_reply=True)``), and until the
node's 2xx a front's claim lives no longer than the REGISTER's transaction
(``_UNSETTLED``, 32 s), so one the node refuses or never answers holds nothing for
long.  The hole turned XPASS; the marker is gone.
"""

from __future__ import annotations

import pytest

from e2m_lab.cluster import contacts
from e2m_lab.kamailio_harness import build_request, udp_transaction
from tests.cluster.test_review71_cluster import _front, _limited_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

LIMIT = 3
WRAPPING = "4294967296"        # 2^32: 0 to Kamailio's Expires parser, an hour to ours


def _register(user: str, contact: str, expires: str) -> bytes:
    return build_request("REGISTER", "sip:example.com", from_user=user, to_user=user,
                         headers=[("Contact", contact), ("Expires", expires)])


def _status(proxy, request: bytes, source: str):
    answer = udp_transaction(proxy.port, request, source=source)
    return answer.status if answer is not None else None


@pytest.fixture
def front(proxy_factory, pg_url):
    nodes = _limited_cluster(proxy_factory, pg_url, LIMIT)
    handle = _front(proxy_factory, nodes,
                    limits={"registrations_per_source": LIMIT, "pike_requests": 0})
    return handle, nodes


def test_control_the_front_counts_plain_registrations(front):
    proxy, _ = front
    shared = "127.0.0.181"
    codes = [_status(proxy, _register(f"r86p{n}", f"<sip:r86p{n}@{shared}:4444>", "3600"),
                     shared) for n in range(LIMIT + 1)]
    assert codes == [200] * LIMIT + [403], codes


def test_control_the_wrapping_expires_binds_nothing_behind_the_front(front):
    proxy, nodes = front
    a, b = nodes.nodes
    assert _status(proxy, _register("r86w", "<sip:r86w@127.0.0.9:4444>", WRAPPING),
                   "127.0.0.182") == 200
    assert contacts(a, "r86w") == [] and contacts(b, "r86w") == []


def test_hole_a_front_never_settles_a_wrapping_expires_holds_slots(front):
    proxy, nodes = front
    a, b = nodes.nodes
    shared = "127.0.0.183"
    users = [f"r86j{n}" for n in range(LIMIT)]
    codes = [_status(proxy, _register(u, f"<sip:{u}@127.0.0.9:4444>", WRAPPING), shared)
             for u in users]
    assert codes == [200] * LIMIT, codes
    assert not any(contacts(a, u) or contacts(b, u) for u in users)   # nothing bound
    bob = _status(proxy, _register("r86bob", f"<sip:r86bob@{shared}:4444>", "3600"), shared)
    # secure: nothing is bound from the address, so bob's first REGISTER is 200
    assert bob == 200, f"bob's first REGISTER from {shared} through the front got {bob}"
