"""A ninety-sixth attacker's review (December 2026) of d91b4b5: stop 35's BYE targets on a
cluster (htable ``e2mtargets``, DMQ-replicated): the dialog's targets noted at node A
(alice's INVITE, bob's 200) must reach node B, so that the call's own BYE through B ends
its keys on both nodes.  The report is ``tests/unit/test_review96.py``'s docstring; this
module holds what was run on two real nodes (a control: it held).
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.cluster import start_cluster
from e2m_lab.flows import TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import (RawUas, SipUa, answer_under_offer_key,
                                      register_contact, udp_transaction)
from e2m_plugins.sip import make_request
from tests.kamailio.test_review94_wire import SDP_VIEW, _bobs_phone

pytestmark = [pytest.mark.kamailio, pytest.mark.postgres]


def _wait(check, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_control_the_calls_bye_through_the_other_node_ends_its_keys(proxy_factory, pg_url,
                                                                     pki):
    """alice's call set up through node A; her BYE to bob's Contact goes through node B
    (the floating address moved, or a front chose B): B holds the dialog's targets (DMQ)
    and bob's 200 there ends the keys on both nodes, and the targets too."""
    cluster = start_cluster(proxy_factory, pg_url)
    a, b = cluster.nodes
    bob_engine = ua_engine(pki, "bob")
    bob = RawUas(_bobs_phone)
    alice_ua = SipUa(a.port, user="alice", timeout=5)
    try:
        register_contact(a, "bob", bob.port)
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        call_id = f"review96c-{time.monotonic_ns()}@x"
        offer = alice.protect(invite(pki, call_id=call_id).replace("Via", alice_ua.via()))
        alice_ua.send(offer.message)
        (delivered,) = bob.wait_for(1, method="INVITE")
        answer_under_offer_key(a, bob_engine, bob, delivered)
        deadline, got = time.monotonic() + 5, None
        while time.monotonic() < deadline:
            got = alice_ua.receive(timeout=1)
            if got is not None and not got.is_request and got.status == 200:
                break
        assert got is not None and got.status == 200, "bob's 200 did not reach alice"
        alice.open(got)
        assert _wait(lambda: b.htable_items("e2mtargets") == a.htable_items("e2mtargets") >= 2)
        assert _wait(lambda: b.htable_items() == a.htable_items() >= 1)
        bye = make_request("BYE", f"sip:bob@127.0.0.1:{bob.port}", from_uri=pki.aor("alice"),
                           to_uri=pki.aor("bob"), call_id=call_id, cseq=5,
                           from_tag=got.from_tag or "", to_tag=got.to_tag or "", body=b"")
        for route in reversed(got.get_all("Record-Route")):
            bye = bye.add("Route", route)
        reply = udp_transaction(b.port, bye, timeout=5)
        assert reply is not None and reply.status == 200, reply
        assert [m for m in bob.received if m.method == "BYE"], "bob never got the BYE"
        assert _wait(lambda: (a.htable_items(), b.htable_items()) == (0, 0)), \
            (a.htable_items(), b.htable_items())
        assert _wait(lambda: (a.htable_items("e2mtargets"), b.htable_items("e2mtargets"))
                     == (0, 0)), (a.htable_items("e2mtargets"), b.htable_items("e2mtargets"))
    finally:
        alice_ua.close()
        bob.close()
