"""An eighty-ninth attacker's review (December 2026) of a77ae19: the certificate
service (RFC 6072, ``[certs]``: ``kamailio_app/cert_route.py``,
``cert_table.py``) and how a subscription comes off probation or ends, on a real
Kamailio 5.6 on loopback (each party a socket on a loopback address of its own; a
forged source address on loopback is the same as a real one to the proxy).

All three holes ride one thing: ``CertService.on_reply`` (``kamailio_app/cert_route.py``
line 341, ``t_check_trans``, and line 343, ``dialog_ids(ksr)``; then line 346
``confirm`` and line 348 ``forget_dialog``) asks tm whether
the reply matches *a* NOTIFY transaction of ours, then takes the dialog the reply
itself names (its Call-ID, From tag and To tag) and confirms (2xx) or deletes (481)
that one.  tm matches a reply by its Via branch and CSeq method only, never by Call-ID
or tags; and anyone can get a NOTIFY transaction of ours addressed to himself by one
fetch (``SUBSCRIBE``, ``Expires: 0``, no account needed).  So the rule that made the
known rows hold (a forged 2xx or 481 "matches no transaction of ours: the Via branch is
the one thing it cannot know", docs/threat-model.md, the certificate service table) is
met with the attacker's *own* NOTIFY's branch, and the reply's dialog is whatever he
writes.

Hole 1 (``test_hole_an_answer_to_the_forgers_own_notify_confirms_a_forged_subscription``):
attacker: an **off-path sender** with one real address (no account).  Messages: two
SUBSCRIBEs (``Expires: 3600``) from a forged source, the victim's address (a visited
proxy's: all its users), which never answers; then, from his real address, two
fetches of bob's certificate, and to each NOTIFY he gets a ``200 OK`` with that
NOTIFY's Via and CSeq but the Call-ID he chose for a forged subscription, From tag =
tm's To tag on it (a CRC of the Via he sent: computable offline; read here from the
table in his stead, as ``test_certservice_attacks`` does), To tag = his forged From
tag.  Effect: both forged subscriptions come off probation (``confirm``), are never
dropped by the timer (``drop_unanswered``) nor made room from at a full bound
(``_check_bounds`` evicts unconfirmed rows only): they hold the victim address's
per-source places for the hour, and the real user behind that address gets 403 Too
Many Subscriptions for the hour (she cannot follow bob's certificate: she is not told
when it is replaced or revoked).  The threat model's "What it still can" says a
bound is kept full only with forged SUBSCRIBEs younger than a second; here two
fetches and two replies hold it for ``max_subscribe_expires``.  At fault:
``kamailio_app/cert_route.py`` ``on_reply``: ``call_id, from_tag, to_tag =
dialog_ids(ksr)`` (the reply's ids) after ``ksr.tm.t_check_trans()``;
``cert_table.SubscriptionTable.confirm`` takes them as the proof.  Fix: name the
dialog from the transaction's request, not from the reply: ``$T_req($ci)``,
``$T_req($ft)``, ``$T_req($tt)`` (the NOTIFY we sent), and drop a reply whose own ids
differ; or keep the NOTIFY's branch with the subscription (a column set when the
NOTIFY is sent) and confirm only the row whose branch the reply's Via carries.

Hole 2 (``test_hole_a_481_on_the_attackers_own_notify_ends_alices_subscription``):
attacker: an **untrusted hop** (or anyone who once saw alice's SUBSCRIBE and its
200: the Call-ID and tags; he need not stay on the path).  Messages: one fetch of his
own from anywhere, and to its NOTIFY a ``481`` with that NOTIFY's Via and CSeq but
alice's Call-ID and tags.  Effect: alice's subscription to bob's certificate is
deleted (``forget_dialog``); when bob then publishes a new certificate (a
replacement after a key compromise; or review 60's revocation, whose followers get
an empty NOTIFY) alice is not told: her phone keeps sealing for bob's old key until
its own refresh finds the subscription gone.  This is the known row "a forged 481
... any Via branch" (fixed by ``t_check_trans``) done with a branch of our own.  At
fault and fix: as hole 1 (``forget_dialog(*dialog)`` with the reply's ids).

Hole 3 (``test_hole_cross_confirmed_large_fetches_take_the_proxys_tcp_connections``):
attacker: an **off-path sender** with one real address, as hole 1.  Messages: six UDP
fetches (``Expires: 0``) of bob's 4 KiB certificate from forged addresses whose hosts
never answer TCP's handshake (a black-holed range; here a listener with a full accept
queue); each is held (``Subscription-State: pending``, no body, kept as a row: HELD |
FETCH) until "its subscriber answers"; for each, one fetch of his own and a 200 to
its NOTIFY naming the forged fetch's dialog.  Effect: ``confirm`` releases each held
certificate (the fetch lapses now), the timer sends its final NOTIFY over TCP
(``next_hop_for_size``) and the proxy connects to each forged address: the pending
connects take all of a test proxy's 4 ``tcp_max_connections``, and a real user's TCP
fetch gets no answer.  This is the known row "Forged UDP fetches of a large
certificate ... Now the proxy connects only to an address that answered" undone by
hole 1's reply.  At fault and fix: as hole 1.

Controls: the forged subscriptions, when the attacker answers his own NOTIFYs
honestly (his own fetch's ids), are dropped and the real user is served
(``test_control_*``: the set-up is the known row, and the ids are what matter);
alice answering her own first NOTIFY 481 ends her subscription (the 481 path with
those ids is the live one), and with no attack bob's new certificate reaches her; the
six forged large fetches with the attacker's own fetches answered for themselves
leave the TCP connections free (the real TCP fetch: 200).

Consequences not run as tests (same cause): the same cross answers confirm forged
subscriptions from many forged addresses, so bob's 100 follower places (or the
proxy's 10,000) are held for ``max_subscribe_expires`` by one attacker address at
pike's rate (a fetch and a reply per place), where the threat model says only real,
answering addresses can.

Tried and held (read, not run here; the known rows' tests cover them):
- a 2xx or 481 with a made-up Via branch from anywhere (``t_check_trans``; run again
  here beside the holes: ``test_certservice_attacks`` forged_481 / forged_2xx pass);
- a refresh or unsubscribe inside alice's dialog from another address
  (``route_resubscribe``: 403 unless from ``sub.source``), and a SUBSCRIBE replayed
  from elsewhere or a new Event id in a dialog made elsewhere (``SubscriptionTable.add``:
  ``SubscriptionTaken``);
- PUBLISH for another AoR: the owner is ``sip:<digest user>@<$rd>`` and both sides go
  through ``aor_of`` on the Request-URI (To is never read); a bodiless refresh is
  re-checked against the anchors and CRLs now; ``SIP-If-Match`` of a lapsed or other
  publication is 412;
- serving a revoked or lapsed publication (``served_certificate`` re-checks on every
  fetch and timer NOTIFY);
- the phone: a certificate NOTIFY needs our dialog (Call-ID and our tag), the
  notifier's tag, our proxy's address (and UDP port), a CSeq not below the last; a
  bodiless ``pending`` one changes nothing; what it carries goes through the engine's
  ``[peers]`` checks and the newest-issue-time rule (reviews 4, 5, 26, 65).

Fixed (stop 34): the cfg's ``event_route[tm:local-request]`` keeps each NOTIFY's dialog
(Call-ID, From tag, To tag) under its Via branch in the htable ``e2mnotify`` for 64 s,
and ``CertService.on_reply`` counts a 2xx or 481 only when the reply names the dialog
its own transaction's NOTIFY was sent in.  All three holes turned XPASS; the markers
are gone.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.certclient import CertClient, cert_rows, closed_and_forgotten
from e2m_lab.kamailio_harness import ProxyHandle, SipUa, start_proxy
from e2m_plugins.sip import SipMessage, make_response, parse
from e2m_plugins.testpki import TestPKI, issue_user
from kamailio_app.cert_route import UNANSWERED
from tests.kamailio.test_certservice_attacks import large_certificate, never_accepting

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}
BOB = "sip:bob@example.com"
PER_SOURCE = 2
_sources = iter(range(2, 250))


def source() -> str:
    """A fresh loopback address of this module's own (127.0.89.x)."""
    return f"127.0.89.{next(_sources)}"


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("review89"), pki=pki, e2m=True,
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


def publish(home: ProxyHandle, made: list, der: bytes) -> None:
    bob = CertClient(home.port, "bob", password=USERS["bob"], source=source())
    made.append(bob)
    answer = bob.publish(der)
    assert answer is not None and answer.status == 200, answer


def bob_der(pki: TestPKI) -> bytes:
    return issue_user(pki.ca, BOB, "ec").cert.public_bytes(Encoding.DER)


def subscribe_request(ua: SipUa, expires: int) -> bytes:
    request = ua.build("SUBSCRIBE", BOB, to=BOB, headers=[
        ("Event", "certificate"), ("Contact", f"<sip:{ua.source}:{ua.local_port}>"),
        ("Expires", str(expires))])
    return request.replace("Via", ua.via()).serialize()


def forge_subscription(home: ProxyHandle, victim: SipUa) -> tuple[SipMessage, str]:
    """One SUBSCRIBE "from" the victim's address (who never answers); the request and
    tm's To tag on its 200 (computable by the forger; read from the table here)."""
    sent = subscribe_request(victim, 3600)
    victim.sock.sendto(sent, ("127.0.0.1", home.port))
    forged = parse(sent)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        found = rows(home, "SELECT local_tag FROM cert_subscriptions WHERE call_id = ?",
                     forged.call_id)
        if found:
            return forged, found[0][0]
        time.sleep(0.05)
    raise AssertionError("the forged SUBSCRIBE was not taken")


def own_notify(home: ProxyHandle, attacker: SipUa) -> SipMessage:
    """The attacker's own fetch from his real address: the NOTIFY it brings, unanswered
    (its transaction is live for 2.5 s)."""
    sent = parse(subscribe_request(attacker, 0))
    attacker.send(sent)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        message = attacker.receive(deadline - time.monotonic())
        if message is not None and message.is_request and message.method == "NOTIFY" \
                and message.call_id == sent.call_id:
            return message
    raise AssertionError("no NOTIFY for the attacker's fetch")


def answer_as(notify: SipMessage, code: int, call_id: str, local_tag: str,
              remote_tag: str, subscriber: str) -> SipMessage:
    """A reply to ``notify`` (its Via, its CSeq: tm matches it) naming another dialog."""
    reason = "OK" if code == 200 else "Call/Transaction Does Not Exist"
    return make_response(notify, code, reason) \
        .replace("Call-ID", call_id) \
        .replace("From", f"<{BOB}>;tag={local_tag}") \
        .replace("To", f"<{subscriber}>;tag={remote_tag}")


def wait_rows(home: ProxyHandle, sql: str, want: list, *args, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    got = rows(home, sql, *args)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.2)
        got = rows(home, sql, *args)
    return got


# -- hole 1: an off-path sender confirms forged subscriptions ---------------------------

def _forged_then_answered(home, made, pki, cross: bool) -> tuple[list, SipMessage | None]:
    publish(home, made, bob_der(pki))
    victim = SipUa(home.port, user="carol", source=source())
    attacker = SipUa(home.port, user="carol", source=source())
    made += [victim, attacker]
    forged = [forge_subscription(home, victim) for _ in range(PER_SOURCE)]
    for request, local_tag in forged:
        notify = own_notify(home, attacker)
        if cross:       # his own NOTIFY's Via and CSeq, the forged dialog's ids
            reply = answer_as(notify, 200, request.call_id, local_tag,
                              request.from_tag or "", victim.aor)
        else:           # his own NOTIFY answered honestly
            reply = make_response(notify, 200, "OK")
        attacker.send(reply)
    time.sleep(0.3)
    unconfirmed = rows(home, "SELECT count(*) FROM cert_subscriptions WHERE source = ? "
                             "AND (pending & 2) = 2", victim.source)
    left = wait_rows(home, "SELECT count(*) FROM cert_subscriptions WHERE source = ?",
                     [(0,)], victim.source, timeout=UNANSWERED + 3)
    # the real user behind the victim's address (another port) follows bob
    real = CertClient(home.port, "alice", source=victim.source)
    made.append(real)
    answer, _ = real.subscribe(BOB, 600)
    print(f"\n{PER_SOURCE} forged subscriptions from {victim.source}, "
          f"{'cross-' if cross else 'honestly '}answered: unconfirmed right after "
          f"{unconfirmed[0][0]}, left after {UNANSWERED + 3:.0f} s {left[0][0]}; "
          f"the real user there: {answer.status if answer else None}")
    return left, answer


def test_hole_an_answer_to_the_forgers_own_notify_confirms_a_forged_subscription(home, made,
                                                                                  pki):
    left, answer = _forged_then_answered(home, made, pki, cross=True)
    assert left == [(0,)], "the forged subscriptions came off probation and stay"
    assert answer is not None and answer.status == 200, answer


def test_control_forged_subscriptions_are_dropped_when_the_forger_answers_his_own(home, made,
                                                                                  pki):
    """The same forged SUBSCRIBEs and the same fetches, the attacker's 200s naming his
    own fetches: the forged rows stay on probation, are dropped, the real user is
    served (the known row holds; the reply's ids are what confirm)."""
    left, answer = _forged_then_answered(home, made, pki, cross=False)
    assert left == [(0,)]
    assert answer is not None and answer.status == 200, answer


# -- hole 2: a 481 on the attacker's own NOTIFY ends alice's subscription ---------------

def _alice_follows(home, made, pki, answer_code: int = 200):
    publish(home, made, bob_der(pki))
    alice = CertClient(home.port, "alice", source=source())
    made.append(alice)
    alice.notify_answer = answer_code
    answer, dialog = alice.subscribe(BOB, 600)
    assert answer is not None and answer.status == 200 and dialog is not None, answer
    assert len(alice.wait_notifies(1)) == 1
    return alice, dialog


def test_hole_a_481_on_the_attackers_own_notify_ends_alices_subscription(home, made, pki):
    alice, dialog = _alice_follows(home, made, pki)
    time.sleep(1.2)                                     # past the notify interval
    attacker = SipUa(home.port, user="carol", source=source())
    made.append(attacker)
    notify = own_notify(home, attacker)
    attacker.send(answer_as(notify, 481, dialog.call_id, dialog.to_tag, dialog.from_tag,
                            alice.ua.aor))
    time.sleep(0.5)
    left = rows(home, "SELECT count(*) FROM cert_subscriptions WHERE call_id = ?",
                dialog.call_id)
    publish(home, made, bob_der(pki))                   # bob replaces his certificate
    told = alice.quiet(3.0)
    print(f"\nalice's subscription after the 481: {left[0][0]} row(s); NOTIFYs of bob's "
          f"new certificate: {len(told)}")
    assert left == [(1,)], "a 481 on the attacker's own NOTIFY ended alice's subscription"
    assert told and told[-1].body, "alice was not told of bob's new certificate"


def test_control_alice_is_told_of_bobs_new_certificate(home, made, pki):
    """No attack: bob's new certificate reaches alice in a NOTIFY."""
    alice, dialog = _alice_follows(home, made, pki)
    time.sleep(1.2)
    publish(home, made, bob_der(pki))
    told = alice.quiet(3.0)
    assert told and told[-1].body


def test_control_alices_own_481_ends_her_subscription(home, made, pki):
    """The 481 path with alice's ids is the live one: her own 481 to her first NOTIFY
    ends her subscription."""
    alice, dialog = _alice_follows(home, made, pki, answer_code=481)
    left = wait_rows(home, "SELECT count(*) FROM cert_subscriptions WHERE call_id = ?",
                     [(0,)], dialog.call_id, timeout=2)
    assert left == [(0,)]


# -- hole 3: cross-confirmed large fetches make the proxy connect to forged addresses -----

def _large_fetches_then_answered(proxy_factory, pki, name: str,
                                 cross: bool) -> SipMessage | None:
    """Six UDP fetches of bob's 4 KiB certificate "from" addresses that never answer
    TCP's handshake (a listener whose accept queue is full), the attacker answering a
    NOTIFY of his own fetch for each; then a real user's TCP fetch.  Its answer."""
    proxy = proxy_factory(name, e2m=True, auth=True, users=USERS,
                          limits={"tcp_max_connections": 4})
    things: list = []
    try:
        bob = CertClient(proxy.port, "bob", password=USERS["bob"], source=source())
        things.append(bob)
        assert bob.publish(large_certificate(pki, BOB, 4 * 1024)).status == 200
        attacker = SipUa(proxy.port, user="carol", source=source())
        things.append(attacker)
        for _ in range(6):
            forged = SipUa(proxy.port, user="carol", source=source())
            things.append(forged)
            things += never_accepting(forged.source, forged.local_port)
            request, local_tag = forge_fetch(proxy, forged)
            notify = own_notify(proxy, attacker)      # bodiless "pending": held for him too
            reply = answer_as(notify, 200, request.call_id, local_tag,
                              request.from_tag or "", forged.aor) if cross \
                else make_response(notify, 200, "OK")
            attacker.send(reply)
        time.sleep(1.5)                               # a timer tick sends what is owed
        real = CertClient(proxy.port, "alice", source=source(), transport="tcp")
        things.append(real)
        answer, _ = real.subscribe(BOB, 0)
        print(f"\n6 forged large fetches, {'cross-' if cross else 'honestly '}answered: a "
              f"real TCP fetch got {answer.status if answer else None}")
        return answer
    finally:
        for thing in things:
            thing.close()


def forge_fetch(home: ProxyHandle, victim: SipUa) -> tuple[SipMessage, str]:
    """One fetch (Expires: 0) "from" ``victim``: held (too large for UDP), kept as a
    row until its subscriber answers; the request and tm's To tag."""
    sent = subscribe_request(victim, 0)
    victim.sock.sendto(sent, ("127.0.0.1", home.port))
    forged = parse(sent)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        found = rows(home, "SELECT local_tag FROM cert_subscriptions WHERE call_id = ?",
                     forged.call_id)
        if found:
            return forged, found[0][0]
        time.sleep(0.05)
    raise AssertionError("the forged fetch was not kept")


def test_hole_cross_confirmed_large_fetches_take_the_proxys_tcp_connections(proxy_factory,
                                                                             pki):
    answer = _large_fetches_then_answered(proxy_factory, pki, "r89-tcp-hole", cross=True)
    assert answer is not None and answer.status == 200, answer


def test_control_honestly_answered_large_fetches_leave_the_tcp_connections(proxy_factory,
                                                                            pki):
    """The same six forged large fetches and the same own fetches answered for
    themselves: nothing is owed over TCP to the forged addresses, the real user's TCP
    fetch is served (the known row holds under this set-up)."""
    answer = _large_fetches_then_answered(proxy_factory, pki, "r89-tcp-control", cross=False)
    assert answer is not None and answer.status == 200, answer
