"""Review 48 on a real two-node cluster (PostgreSQL, DMQ): one keyed early dialog lets
body-less stray 200s claim a fork slot each in the shared ``replay_claims``
(``tests/unit/test_review48.py`` hole 2 at the engine).

``test_hole_*`` xfail strictly on db5870b; ``test_control_*`` pass.

Fixed: see ``tests/unit/test_review48.py``.
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.flows import SDP_OFFER
from e2m_plugins.body import with_entity
from e2m_plugins.sip import make_request, make_response
from tests.cluster.test_review46_cluster import LEGACY, _entity, _fork_claims, _start

pytestmark = [pytest.mark.postgres, pytest.mark.kamailio, pytest.mark.slow]

_STRAYS = 200
CALL = "r48-mine@attacker.example"


def _strangers_invite(pki, node_port: int, own_port: int, sink_port: int, call_id: str) -> bytes:
    """The stranger's own INVITE (From a made-up AoR, To a user of the legacy domain,
    tag m1), relayed by its Request-URI to the stranger's silent sink, carrying review
    46's unsigned envelope for the node's certificate that offers its CEK for reuse."""
    request = make_request("INVITE", f"sip:dave@127.0.0.1:{sink_port}",
                           from_uri="sip:mallory@stranger.example", to_uri=f"sip:dave@{LEGACY}",
                           call_id=call_id, cseq=1, from_tag="m1",
                           via_host=f"127.0.0.1:{own_port}", body=SDP_OFFER,
                           content_type="application/sdp",
                           extra_headers=[("Contact", f"<sip:mallory@127.0.0.1:{own_port}>")])
    return with_entity(request, _entity(pki, offer_key=True)).serialize()


def _stray(node_port: int, sink_port: int, call_id: str, n: int) -> bytes:
    """A body-less 200 to an INVITE: ``call_id``, To tag m1, From tag new each time."""
    request = make_request("INVITE", f"sip:dave@{LEGACY}", from_uri="sip:mallory@stranger.example",
                           to_uri=f"sip:dave@{LEGACY}", call_id=call_id, cseq=1,
                           from_tag=f"f{n}")
    reply = make_response(request, 200, "OK", [])
    reply = reply.replace("To", f"{request.get('To')};tag=m1")
    reply = reply.remove("Via").add("Via", f"SIP/2.0/UDP 127.0.0.1:{node_port};"
                                            f"branch=z9hG4bK-r48-{n}")
    reply = reply.add("Via", f"SIP/2.0/UDP 127.0.0.1:{sink_port};branch=z9hG4bK-r48s-{n}")
    return reply.serialize()


def _attack(pki, node_port: int, *, invite: bool) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    try:
        call_id = CALL if invite else "r48-nobody@attacker.example"
        if invite:
            sender.sendto(_strangers_invite(pki, node_port, sender.getsockname()[1],
                                            sink.getsockname()[1], call_id),
                          ("127.0.0.1", node_port))
            sink.settimeout(3.0)
            sink.recvfrom(65535)          # relayed: its key is kept in (CALL, m1)
        for n in range(_STRAYS):
            sender.sendto(_stray(node_port, sink.getsockname()[1], call_id, n),
                          ("127.0.0.1", node_port))
            time.sleep(0.002)
    finally:
        sender.close()
        sink.close()


def test_hole_a_strangers_keyed_early_dialog_lets_stray_bare_200s_fill_the_claims(
        proxy_factory, pg_url, pki):
    """Attacker: a stranger who can send UDP to a node's SIP port (no certificate, no
    account, no call to observe, no forged source), on a cluster with
    ``[policy] legacy_peers``.

    Steps: one INVITE of its own to node A (To a user of the legacy domain, From tag
    m1, Request-URI its own silent sink) with one unsigned envelope for the node's
    certificate offering its CEK: kept in the early scope (Call-ID, m1).  Then, within
    the INVITE's 5 s, 200 body-less "200 OK"s with that Call-ID, To tag m1 and a new
    From tag each, the node's Via on top and a second to the sink.

    Effect: every INVITE 2xx is read (a stray one by ``route_stray_reply``);
    ``_early_keyed`` finds the stranger's key under (Call-ID, m1), one of each 2xx's
    early scopes, so each claims slot 0 of a new early dialog (named by the From tag)
    in the shared database: 200 datagrams, 200 INSERTs in SIP workers, 200 rows.

    Fix: see ``tests/unit/test_review48.py::test_hole_stray_bare_200s_under_a_keyed_tag_each_claim_a_shared_slot``."""
    a, _ = _start(proxy_factory, pg_url).nodes
    before = _fork_claims(pg_url)
    _attack(pki, a.port, invite=True)
    time.sleep(0.5)
    added = _fork_claims(pg_url) - before
    assert added <= 4, f"{added} fork-slot claims in replay_claims from one INVITE and " \
                       f"{_STRAYS} stray 200s of a stranger"


def test_control_the_same_strays_without_the_invite_claim_nothing(proxy_factory, pg_url, pki):
    """The same body-less strays for a Call-ID no INVITE keyed: no row (review 46)."""
    a, _ = _start(proxy_factory, pg_url).nodes
    before = _fork_claims(pg_url)
    _attack(pki, a.port, invite=False)
    time.sleep(0.5)
    assert _fork_claims(pg_url) - before == 0
