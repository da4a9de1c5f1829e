"""Review 120 (December 2026) of bc215c1, on a real Kamailio 5.6 E2M proxy with its
certificate service ([certs], [auth]): the NOTIFY bookkeeping reviews 89 and 93 rest on.

The common fault (seen, not inferred): ``event_route[tm:local-request]``
(``kamailio_app/templates/kamailio.cfg.tmpl:390``) notes each NOTIFY's dialog under
``$(hdr(Via)[0]{param.value,branch})``, and ``CertService.on_reply`` looks a reply up
under the same expression (``kamailio_app/cert_route.py:58`` ``_REPLY_BRANCH``, used at
line 350).  ``{param.value,...}`` parses a ``name=value;...`` list; a whole Via value
(``SIP/2.0/UDP 127.0.0.1:port;branch=z9hG4bK...``) is no such list: Kamailio logs
``parse_param2(): Invalid character '1' - expected ';'`` (core/parser/parse_param.c:517)
at every NOTIFY and the expression is the empty string.  So htable ``e2mnotify`` holds
ONE item, name ``''`` (``htable.dump``, printed by K2: ``[[''], ['']]``), overwritten by
every NOTIFY any process sends, and a reply that tm matched to any NOTIFY transaction
of ours (``t_check_trans``, line 343) is checked against the dialog of the LAST NOTIFY
sent, not its own.  Review 89's fix holds only when the attacker's NOTIFY happens to be
the last one, which is the order review 89's tests use.

Hole K2 (``test_hole_k2_own_fetch_first_then_forged_subscription_is_confirmed``):
**off-path sender** with one real address (review 89's hole 1, steps reordered).
Set-up: bob's certificate published; ``max_subscriptions_per_source = 2``.  Messages,
twice: (1) a fetch of his own (``SUBSCRIBE``, ``Expires: 0``) from his address; its
NOTIFY left unanswered (the transaction lives 2.5 s); (2) a SUBSCRIBE (``Expires:
3600``) forged "from" the victim's address (127.0.120.x, never answers); its NOTIFY is
now the last one; (3) a 200 to HIS NOTIFY (its Via and CSeq: tm matches it) carrying the
forged dialog's Call-ID, tm's To tag (computable, review 89; read from the table here,
as review 89's test does) and the forged From tag.  Observed: both forged subscriptions
were confirmed and still there 7 s later (probation drops after 4 s); the real user
behind the victim's address got ``403`` to her SUBSCRIBE.  They hold the places for
the hour (``max_subscribe_expires``).
Control ``test_control_k2_the_forger_answering_his_own_dialog_confirms_nothing``: the
same steps, his 200 naming his own fetch: rows gone after 7 s, the real user 200.

Hole K3 (``test_hole_k3_a_481_after_alices_notify_ends_her_subscription``): an
**untrusted hop** on alice's path, or anyone who saw her SUBSCRIBE and its 200 (review
89's hole 2).  Set-up: alice follows bob (confirmed).  Messages: the hop's own fetch
(NOTIFY unanswered); alice refreshes (honest in-dialog SUBSCRIBE): the proxy's NOTIFY
to her, which the hop sees go by, is now the last one; the hop answers HIS NOTIFY
``481`` with alice's Call-ID and tags.  Observed: alice's row deleted (0 rows), and when
bob then replaced his certificate alice got no NOTIFY (0): she keeps sealing for the
old key until her renewal.  Control ``test_control_k3_the_same_481_before_alices_notify_is_ignored``
(review 89's order): 1 row, alice told of bob's new certificate.

Honest break K4 (``test_hole_k4_crossing_first_notifies_drop_an_honest_subscription``):
nobody attacks.  alice subscribes; before her 200 to her first NOTIFY leaves (a round
trip), dave subscribes and gets his NOTIFY; both answer 200.  Observed: alice's 200 was
checked against dave's dialog: never confirmed, dropped by the probation sweep
(``drop_unanswered``, cert_table.py:448) 4 s later, silently (no NOTIFY to her); bob's
new certificate then reached dave (1) and not alice (0).  Any two first NOTIFYs within
one round trip (a busy service, a phone farm starting, a large held certificate whose
release waits for exactly that 2xx) lose all but the last.  Control
``test_control_k4_one_after_the_other_both_stay``: the same two, one after the other:
both rows stay, both told.

Fix (suggested, not tried: product code is not to be changed here): key the note by the
branch itself, ``$via0(branch)`` in the cfg's local-request route and in
``_REPLY_BRANCH`` (kemi already reads ``$via0(branch)`` for e2mbranch), or
``$(hdr(Via)[0]{s.select,...})``; and a unit or wire test that two NOTIFYs make two
``e2mnotify`` items, so the lookup can never collapse again.

Tried and held (this review):
- a forged NOTIFY to an e2m-phone (``pjsua_hooks/certservice_client.py``), read, not run
  on a phone: it must name a dialog the phone opened (Call-ID and our From tag, random),
  the notifier's tag once known, come from the proxy's address (UDP: and port), carry a
  CSeq not below the last; what it carries must chain to the anchors and name the AoR
  and not be older than the newest issue time seen.  An off-path sender cannot match a
  dialog; a hop can only deny (empty NOTIFY, known since review 26; a refused
  certificate marks the peer failed for 300 s: the same as dropping).  pjsua2 here is
  built with ``guid_simple.c`` (Call-IDs and tags from glibc ``rand()`` seeded with a
  32-bit hash); whether an off-path sender who sees one of the phone's ids can predict
  the SUBSCRIBE's was NOT tried.
- SUBSCRIBE fetches from many addresses with long ids (an ``e2mnotify`` value is
  ``Call-ID|tag|tag``): since every NOTIFY writes the same name, the table never grows
  past one item (the hole above is what keeps it small); the fetches' NOTIFY
  transactions themselves are transient: 48 addresses x 10 fetches/s filled a 32 MB
  proxy's shm within 5 s (403/500 to many fetches) and it was back to 3.2 MB 6 s after
  the flood stopped; not pursued (tm's cost, not a table's).

Fixed (stop 40): the cfg's ``tm:local-request`` files each NOTIFY under ``$via0(branch)``
and ``CertService.on_reply`` reads the same (``_REPLY_BRANCH``); a reply without a
branch matches nothing.  ``e2mnotify`` now holds one item per NOTIFY, so it lives 8 s,
not 64 (a NOTIFY's transaction takes an answer for 2.5 s).  K2, K3 and K4 failed on the
code before the fix and pass with it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from e2m_lab.certclient import CertClient, cert_rows, closed_and_forgotten
from e2m_lab.kamailio_harness import ProxyHandle, SipUa, start_proxy
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import TestPKI
from kamailio_app.cert_route import UNANSWERED
from tests.kamailio.test_review89_wire import (BOB, USERS, answer_as, bob_der,
                                               forge_subscription, own_notify)

pytestmark = pytest.mark.kamailio

PER_SOURCE = 2
_sources = iter(range(2, 250))


def source() -> str:
    """A fresh loopback address of this module's own (127.0.120.x)."""
    return f"127.0.120.{next(_sources)}"


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("review120"), pki=pki, e2m=True,
                        auth=True, users=USERS,
                        extra={"certs": {"notify_interval": 1, "min_expires": 2,
                                         "max_subscriptions_per_source": PER_SOURCE}})
    yield proxy
    proxy.stop()


@pytest.fixture
def made(home: ProxyHandle) -> Iterator[list]:
    with closed_and_forgotten(home) as things:
        yield things


rows = cert_rows


def wait_rows(home: ProxyHandle, sql: str, want: list, *args, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    got = rows(home, sql, *args)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.2)
        got = rows(home, sql, *args)
    return got


def publish(home: ProxyHandle, made: list, der: bytes) -> None:
    bob = CertClient(home.port, "bob", password=USERS["bob"], source=source())
    made.append(bob)
    answer = bob.publish(der)
    assert answer is not None and answer.status == 200, answer


def notify_keys(home: ProxyHandle) -> list[str]:
    """The names e2mnotify holds now (htable.dump), for the printout."""
    text = home.rpc("htable.dump", "e2mnotify")
    return [line.split("name:", 1)[1].strip() for line in text.splitlines() if "name:" in line]


# -- hole K2: review 89's hole 1 back, with the steps in another order ------------------

def _forged_after_own_fetch(home, made, pki, cross: bool):
    """For each of the victim address's places: the attacker's own fetch first (its
    NOTIFY left unanswered), then one SUBSCRIBE forged "from" the victim, then the
    attacker's answer to HIS NOTIFY: ``cross`` names the forged dialog, else his own."""
    publish(home, made, bob_der(pki))
    victim = SipUa(home.port, user="carol", source=source())
    attacker = SipUa(home.port, user="carol", source=source())
    made += [victim, attacker]
    keys = []
    for _ in range(PER_SOURCE):
        notify = own_notify(home, attacker)
        request, local_tag = forge_subscription(home, victim)
        keys.append(notify_keys(home))
        if cross:
            reply = answer_as(notify, 200, request.call_id, local_tag,
                              request.from_tag or "", victim.aor)
        else:
            reply = make_response(notify, 200, "OK")
        attacker.send(reply)
        time.sleep(0.2)
    left = wait_rows(home, "SELECT count(*) FROM cert_subscriptions WHERE source = ?",
                     [(0,)], victim.source, timeout=UNANSWERED + 3)
    real = CertClient(home.port, "alice", source=victim.source)
    made.append(real)
    answer, _ = real.subscribe(BOB, 600)
    print(f"\n{PER_SOURCE} forged subscriptions from {victim.source} "
          f"({'cross-' if cross else 'honestly '}answered): left after "
          f"{UNANSWERED + 3:.0f} s {left[0][0]}; e2mnotify names {keys}; the real user "
          f"there: {answer.status if answer else None}")
    return left, answer


def test_hole_k2_own_fetch_first_then_forged_subscription_is_confirmed(home, made, pki):
    left, answer = _forged_after_own_fetch(home, made, pki, cross=True)
    assert left == [(0,)], "the forged subscriptions came off probation and stay"
    assert answer is not None and answer.status == 200, answer


def test_control_k2_the_forger_answering_his_own_dialog_confirms_nothing(home, made, pki):
    """Control: the same steps, the forger's 200s naming his own fetch: the forged rows
    stay on probation and go; the real user behind that address is served."""
    left, answer = _forged_after_own_fetch(home, made, pki, cross=False)
    assert left == [(0,)]
    assert answer is not None and answer.status == 200, answer


# -- hole K3: review 89's hole 2 back: a 481 timed after alice's NOTIFY ------------------

def _alice_follows(home, made):
    alice = CertClient(home.port, "alice", source=source())
    made.append(alice)
    answer, dialog = alice.subscribe(BOB, 600)
    assert answer is not None and answer.status == 200 and dialog is not None, answer
    assert len(alice.wait_notifies(1)) == 1
    return alice, dialog


def _481_after(home, made, pki, alice_notified_last: bool):
    publish(home, made, bob_der(pki))
    alice, dialog = _alice_follows(home, made)
    time.sleep(1.2)                                     # past the notify interval
    attacker = SipUa(home.port, user="carol", source=source())
    made.append(attacker)
    notify = own_notify(home, attacker)                 # his fetch, NOTIFY unanswered
    if alice_notified_last:
        # alice refreshes (an honest in-dialog SUBSCRIBE): its NOTIFY is the last sent;
        # a hop on her path sees it go by
        answer, _ = alice.subscribe(BOB, 600, dialog=dialog)
        assert answer is not None and answer.status == 200, answer
        assert len(alice.wait_notifies(2)) == 2
    attacker.send(answer_as(notify, 481, dialog.call_id, dialog.to_tag, dialog.from_tag,
                            alice.ua.aor))
    time.sleep(0.5)
    left = rows(home, "SELECT count(*) FROM cert_subscriptions WHERE call_id = ?",
                dialog.call_id)
    time.sleep(1.2)
    publish(home, made, bob_der(pki))                   # bob replaces his certificate
    told = alice.quiet(3.0)
    print(f"\nalice's subscription after the 481: {left[0][0]} row(s); NOTIFYs of bob's "
          f"new certificate: {len(told)}")
    return left, told


def test_hole_k3_a_481_after_alices_notify_ends_her_subscription(home, made, pki):
    left, told = _481_after(home, made, pki, alice_notified_last=True)
    assert left == [(1,)], "a 481 on the attacker's own NOTIFY ended alice's subscription"
    assert told and told[-1].body, "alice was not told of bob's new certificate"


def test_control_k3_the_same_481_before_alices_notify_is_ignored(home, made, pki):
    """Control (review 89's case): the attacker's NOTIFY is the last one sent: his 481
    naming alice's dialog changes nothing; bob's new certificate reaches alice."""
    left, told = _481_after(home, made, pki, alice_notified_last=False)
    assert left == [(1,)]
    assert told and told[-1].body


# -- honest break K4: two subscribers whose first NOTIFYs cross -------------------------

def _two_subscribers(home, made, pki, overlap: bool):
    """alice and dave follow bob; with ``overlap`` alice's 200 to her first NOTIFY
    leaves after dave's NOTIFY was sent (any two subscriptions within a round trip)."""
    publish(home, made, bob_der(pki))
    alice = CertClient(home.port, "alice", source=source())
    dave = CertClient(home.port, "carol", source=source())
    made += [alice, dave]
    if overlap:
        alice._answer_notifies = lambda: None           # her answer is still on its way
    first, a_dialog = alice.subscribe(BOB, 600)
    if overlap:
        second, d_dialog = dave.subscribe(BOB, 600)
        assert len(dave.wait_notifies(1)) == 1
        del alice._answer_notifies
        assert len(alice.wait_notifies(1)) == 1
    else:
        assert len(alice.wait_notifies(1)) == 1
        second, d_dialog = dave.subscribe(BOB, 600)
        assert len(dave.wait_notifies(1)) == 1
    assert first.status == 200 and second.status == 200
    time.sleep(UNANSWERED + 3)                          # the probation sweep
    left = {name: rows(home, "SELECT count(*) FROM cert_subscriptions WHERE call_id = ?",
                       d.call_id)[0][0] for name, d in (("alice", a_dialog), ("dave", d_dialog))}
    publish(home, made, bob_der(pki))                   # bob replaces his certificate
    told = {"alice": alice.quiet(3.0), "dave": dave.quiet(0.5)}
    print(f"\nrows after the sweep {left}; NOTIFYs of bob's new certificate "
          f"{ {k: len(v) for k, v in told.items()} }")
    return left, told


def test_hole_k4_crossing_first_notifies_drop_an_honest_subscription(home, made, pki):
    left, told = _two_subscribers(home, made, pki, overlap=True)
    assert left == {"alice": 1, "dave": 1}
    assert told["alice"] and told["alice"][-1].body


def test_control_k4_one_after_the_other_both_stay(home, made, pki):
    left, told = _two_subscribers(home, made, pki, overlap=False)
    assert left == {"alice": 1, "dave": 1}
    assert told["alice"] and told["alice"][-1].body and told["dave"]
