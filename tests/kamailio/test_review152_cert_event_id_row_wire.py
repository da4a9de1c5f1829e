"""Review 152 on a real Kamailio: another Event id in someone else's follow dialog.
Review 133's module fixture ``home`` (SQLite tables, ``notify_interval`` 2 s); review
142's ``colliding_via`` (tm's To tag of an initial SUBSCRIBE, forged offline).

Hole K3: a co-tenant of a follower's address ends its follow from any port (a new Event id, then 481)
-------------------------------------------------------------------------------------------------------

- Attacker: review 136 K2's and 151 K2's: a user behind the same NAT as the follower
  (or its hop), or a co-tenant of its host, who knows the follow's Call-ID, From (tag)
  and the service's To tag; no spoofing, none of the follow's URIs, Contact or route
  set.  The port rules of reviews 134 K3, 136 K2 and 151 (in-dialog requests only from
  the follow's own port) are what he must go round.
- Messages: from his own UDP port ``Q`` of that address, an **initial** ``SUBSCRIBE
  sip:bob@example.com`` with the follow's Call-ID and From, no To tag, a top Via chosen
  so that tm's To tag is the follow's (``colliding_via``), ``Event:
  certificate;id=x``, ``Contact: <sip:m@SRC:Q>``, ``Expires: 600``; then he answers the
  NOTIFY it draws ``481``.
- Effect observed: ``SubscriptionTable.add`` takes it as a new subscription **in the
  follow's dialog** (same source address: the only check of a new Event id; another
  port is not compared, nor is it a copy): 200, a row ``(Call-ID, tag, tag, "x")`` whose
  NOTIFY goes to ``SRC:Q``.  His 481 to that NOTIFY reaches ``on_reply``, which
  ``forget_dialog``s the **whole dialog**: carol's follow (Event id "") is gone, 2 rows
  to 0, with no final NOTIFY to her; bob then replaces his certificate and carol is told
  **0** times (1 in the control), until her next refresh draws 481.  The same request
  made as an in-dialog unsubscribe from ``Q``: 481, carol's row kept (control).  The
  same forgery against a routed follow (a Record-Route naming ``SRC:Q``, the address
  ``_next_hop`` requires) takes the same path (read, not run).
- Code at fault: ``kamailio_app/cert_table.py:405-412`` (``add``: another Event id of a
  held dialog is checked for its source address only) with
  ``kamailio_app/cert_route.py:497-501`` (a 481 to one row's NOTIFY forgets every row
  of the dialog) and ``:240`` (tm's To tag, which the sender's Via decides, names the
  dialog).
- Suggested fix: a first SUBSCRIBE naming a held dialog under a new Event id is taken
  only from where ``in_dialog_hop`` takes the dialog's rows (the same port for UDP; the
  hop for a routed one), or refused (403) outright (an RFC 6665 subscriber adds an id
  to a dialog by an in-dialog SUBSCRIBE, which carries the To tag); and a 481 ends
  only the subscription whose NOTIFY drew it (``forget`` by the NOTIFY's Event id).
- Test: ``test_a_new_event_id_from_another_port_does_not_end_the_follow`` (strict xfail).

Controls
--------

- ``test_control_an_unsubscribe_from_another_port_is_481``: the port rule this goes
  round: mallory's in-dialog ``Expires: 0`` from ``Q`` is 481 and carol's row stays.
- ``test_control_without_the_collision_it_is_a_dialog_of_its_own``: the same request
  with an ordinary Via draws another To tag; mallory's 481 forgets only his dialog,
  carol's row stays and she is told of bob's change.

Fixed (stop 47): K1 to K3, see ``tests/unit/test_review152_opening_port_rules.py``.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from e2m_plugins.testpki import issue_user
from tests.kamailio.test_review133_cert_refresh_wire import (  # noqa: F401 - fixtures
    BOB, INTERVAL, client, der_of, home, made, publish, refresh, source)
from tests.kamailio.test_review142_routed_follow_wire import colliding_via

pytestmark = pytest.mark.kamailio


def rows(home, call_id: str) -> list[tuple]:
    with sqlite3.connect(home.directory / "certs.sqlite") as conn:
        return conn.execute("SELECT event_id, next_hop FROM cert_subscriptions WHERE "
                            "call_id = ? ORDER BY event_id", (call_id,)).fetchall()


def direct_follow(home, made, pki):
    """bob published; carol follows him over UDP (confirmed by her answer)."""
    publish(home, made, der_of(pki.user("bob", "ec")))
    src = source()
    carol = client(home, made, "carol", src=src)
    answer, dialog = carol.subscribe(BOB, 600)
    assert answer is not None and answer.status == 200 and dialog is not None, answer
    assert len(carol.wait_notifies(1)) == 1
    time.sleep(0.3)
    assert [r[0] for r in rows(home, dialog.call_id)] == [""]
    return src, carol, dialog


def forged_new_id(home, mallory, carol, dialog, via: tuple[str, str]) -> list:
    """mallory's initial SUBSCRIBE in carol's dialog ids with Event id x, from his own
    port; every NOTIFY it draws answered 481 (mallory.notify_answer).  The answers."""
    host, branch = via
    ua = mallory.ua
    where = f"{ua.source}:{ua.local_port}"
    ua.send("\r\n".join([
        f"SUBSCRIBE {BOB} SIP/2.0",
        f"Via: SIP/2.0/UDP {host}:5060;rport;branch={branch}", "Max-Forwards: 70",
        f"From: {carol.subscribes[0].get('From')}", f"To: <{BOB}>",
        f"Call-ID: {dialog.call_id}", "CSeq: 1 SUBSCRIBE", "Event: certificate;id=x",
        "Expires: 600", "Accept: application/pkix-cert", f"Contact: <sip:m@{where}>",
        "Content-Length: 0", "", ""]).encode())
    mallory.notify_answer = 481
    mallory.wait_notifies(1, timeout=3.0)
    mallory.quiet(0.5)
    return [m for m in ua.received if not m.is_request]


def told_of_change(home, made, pki, carol) -> int:
    before = len(carol.notifies)
    publish(home, made, der_of(issue_user(pki.ca, BOB, "ec")))
    carol.quiet(INTERVAL + 2.0)
    return len(carol.notifies) - before


def test_a_new_event_id_from_another_port_does_not_end_the_follow(home, made, pki):
    src, carol, dialog = direct_follow(home, made, pki)
    mallory = client(home, made, "alice", src=src)
    answers = forged_new_id(home, mallory, carol, dialog,
                            colliding_via(dialog.to_tag, dialog.call_id))
    final = [a.status for a in answers if a.status >= 200][:1]
    # (stop 47) refused 403 now; were it taken, its 481 must not end carol's follow
    assert final in ([200], [403]), final
    assert final == [403] or len(mallory.notifies) >= 1                # answered 481
    assert "" in [r[0] for r in rows(home, dialog.call_id)]
    assert told_of_change(home, made, pki, carol) == 1


def test_control_an_unsubscribe_from_another_port_is_481(home, made, pki):
    src, carol, dialog = direct_follow(home, made, pki)
    mallory = client(home, made, "alice", src=src)
    answer = refresh(mallory, dialog, cseq=carol.subscribes[-1].cseq[0] + 1, expires=0)
    assert answer is not None and answer.status == 481, answer
    assert [r[0] for r in rows(home, dialog.call_id)] == [""]


def test_control_without_the_collision_it_is_a_dialog_of_its_own(home, made, pki):
    src, carol, dialog = direct_follow(home, made, pki)
    mallory = client(home, made, "alice", src=src)
    answers = forged_new_id(home, mallory, carol, dialog, ("h.invalid", "z9hG4bKr152plain"))
    finals = [a for a in answers if a.status >= 200]
    assert finals and finals[0].status == 200 and finals[0].to_tag != dialog.to_tag
    assert len(mallory.notifies) >= 1
    time.sleep(0.3)
    assert [r[0] for r in rows(home, dialog.call_id)] == [""]
    assert told_of_change(home, made, pki, carol) == 1
