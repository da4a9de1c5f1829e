"""Stop 47, review 137 HB2 on a real Kamailio: a routed UDP subscription opened from
another port than its Record-Route names (a hop behind a port-translating NAT, or one
that record-routes a fixed socket) is refreshed and ended from the port it was opened
from.  Review 133's module fixture ``home`` (SQLite tables); carol subscribes over UDP
with the Record-Route of a hop whose record-routed socket is a second client at her
address (it gets the NOTIFYs and answers them).

Before stop 47 (``tests/unit/test_review137_notifier_hop.py`` at the core): every
refresh from carol's port was 481, so she subscribed anew at each refresh and could
not end the follow.  Now the subscription keeps the opening port (column
``source_port``) and takes its dialog's requests from it too; a third port of the
same address is still 481 (review 136 K2).
"""

from __future__ import annotations

import time

import pytest

from tests.kamailio.test_review133_cert_refresh_wire import (  # noqa: F401 - fixtures
    BOB, client, der_of, home, made, next_hop, publish, refresh, source)

pytestmark = pytest.mark.kamailio


def routed_from_another_port(home, made, pki):
    """bob's certificate published; carol follows it over UDP through a hop at her
    address whose record-routed socket (``hop``) is not her port.  Confirmed by the
    hop's answer to the first NOTIFY."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    src = source()
    hop = client(home, made, "alice", src=src)
    carol = client(home, made, "carol", src=src)
    route = f"sip:{src}:{hop.ua.local_port};lr"
    answer, dialog = carol.subscribe(BOB, 600, extra=[("Record-Route", f"<{route}>")])
    assert answer is not None and answer.status == 200 and dialog is not None, answer
    assert len(hop.wait_notifies(1)) == 1
    time.sleep(0.3)
    assert next_hop(home, dialog.call_id) == [(route, src)]
    return src, route, hop, carol, dialog


def test_the_port_that_opened_a_routed_follow_refreshes_and_ends_it(home, made, pki):
    src, route, hop, carol, dialog = routed_from_another_port(home, made, pki)
    cseq = carol.subscribes[-1].cseq[0]
    answer = refresh(carol, dialog, cseq=cseq + 1, expires=600)
    assert answer is not None and answer.status == 200, answer
    assert len(hop.wait_notifies(2)) == 2            # the refresh's NOTIFY, to the hop
    assert next_hop(home, dialog.call_id) == [(route, src)]
    answer = refresh(carol, dialog, cseq=cseq + 2, expires=0)
    assert answer is not None and answer.status == 200, answer
    assert next_hop(home, dialog.call_id) == []


def test_control_a_third_port_of_that_address_is_481(home, made, pki):
    src, route, hop, carol, dialog = routed_from_another_port(home, made, pki)
    mallory = client(home, made, "alice", src=src)
    answer = refresh(mallory, dialog, cseq=carol.subscribes[-1].cseq[0] + 1, expires=0)
    assert answer is not None and answer.status == 481, answer
    assert next_hop(home, dialog.call_id) == [(route, src)]
