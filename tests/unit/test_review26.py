"""A twenty-sixth attacker's review (December 2026) of ebc7b93: the certificate service
(RFC 6072) at the proxy and at the phone, the archive, digest and TLS.

Two holes, both in the certificate service, each a strict xfail on ``ebc7b93`` (its
assertion is what a fix must make true; both pass since), with ``test_control_*``
tests for the same flows without the attack:

- the proxy's probation of subscriptions made over UDP (``cert_table.SubscriptionTable``)
  is kept per subscription (Call-ID, our tag, their tag, Event id) but lifted per
  *dialog*: ``confirm`` ignores the Event id, so the 2xx a forger's own subscription
  gets at its real address confirms a subscription it forged from a victim's address
  in the same dialog (RFC 6665 §8.2.1 ``id``).  The victim's per-source places are
  then held for the subscription's life, which review 15's probation was for;
- the phone's ``UAEngine._refuse_older`` (review 4's fix against a NOTIFY that brings
  back bob's replaced certificate) is undone by an empty NOTIFY sent just before it.

The fixes: every subscription of one dialog is from one source (a new Event id in a
dialog made from another address is ``SubscriptionTaken``), and the phone keeps, per
AoR, the newest issue time the wire gave, which an empty NOTIFY does not lower.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_plugins import certservice as cs
from e2m_plugins import sip
from e2m_plugins.testpki import init_test_pki, issue_user
from kamailio_app import cert_route
from kamailio_app.cert_route import CertService
from kamailio_app.cert_table import UNCONFIRMED
from kamailio_app.config import CertSettings
from tests.unit.test_review4 import _answer, _notify, _subscribe_to_bob

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


def _der(cert) -> bytes:
    return cert.public_bytes(Encoding.DER)


# --------------------------------------------------------------------------
# The proxy's certificate service, driven the way Kamailio drives it

class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


class _Ns:
    pass


class FakeKSR:
    """What ``CertService`` asks of Kamailio's KSR, for one message at a time.

    ``$ltt(t)`` (the To tag tm gives its answer) is modelled on tm's ``calc_crc_suffix``:
    a tag fixed per instance, "-", and a CRC over the top Via's host, port and branch,
    so two SUBSCRIBEs with the same top Via get the same tag (docs/threat-model.md: "the
    forger ... can work out tm's To tag").  NOTIFYs sent through ``E2M_SEND_REQUEST``
    are kept in ``sent``; answers in ``replies``."""

    TM_TAG = "a6a1c5f60faecf035a1ae5b6e96e979a"

    def __init__(self) -> None:
        self.vars: dict[str, object] = {}
        self.replies: list[int] = []
        self.sent: list[dict[str, object]] = []
        self.pv = _Ns()
        self.pv.get = lambda name: self.vars.get(name)
        self.pv.sets = lambda name, value: self.vars.__setitem__(name, value)
        self.hdr = _Ns()
        self.hdr.append_to_reply = lambda text: None
        self.sl = _Ns()
        self.sl.send_reply = lambda code, reason: self.replies.append(code)
        self.tm = _Ns()
        self.tm.t_check_trans = lambda: 1     # the reply matched one of our NOTIFYs
        self.info = self.err = lambda text: None
        # the cfg's tm:local-request: each NOTIFY's dialog under its Via branch (stop 34)
        self.notify_dialogs: dict[str, str] = {}
        self.htable = _Ns()
        self.htable.sht_get = lambda table, key: self.notify_dialogs.get(key)
        # the first answer acted on consumes its NOTIFY's note (review 150 K1)
        self.htable.sht_rm = lambda table, key: self.notify_dialogs.pop(key, None)
        self.htable.sht_iterator_start = lambda name, table: -1   # no places (cert_connects)

    @staticmethod
    def _ids(notify: dict[str, object]) -> tuple[str, str, str]:
        headers = sip.parse(("NOTIFY %s SIP/2.0\r\n%s\r\n" % (notify["ruri"], notify["headers"]))
                            .encode()).headers
        found = dict((name.lower(), value) for name, value in headers)
        return (found["call-id"], found["from"].partition(";tag=")[2].split(";")[0],
                found["to"].partition(";tag=")[2].split(";")[0])

    def route(self, name: str) -> None:
        assert name == cert_route.SEND_ROUTE
        notify = {"ruri": self.vars["$var(e2m_ruri)"],
                  "nexthop": self.vars["$var(e2m_nexthop)"],
                  "headers": self.vars["$var(e2m_hdrs)"],
                  "body": base64.b64decode(str(self.vars["$var(e2m_body)"])),
                  "branch": "z9hG4bKnotify%d" % len(self.sent)}
        self.sent.append(notify)
        self.notify_dialogs[str(notify["branch"])] = "|".join(self._ids(notify))

    def request(self, message: sip.SipMessage, source: str, port: int = 5060) -> None:
        via = message.get("Via") or ""
        sent_by = via.split()[1].split(";")[0]
        host, _, vport = sent_by.partition(":")
        branch = via.partition("branch=")[2].split(";")[0]
        crc = binascii.crc_hqx((host + (vport or "") + branch).encode(), 0)
        self.vars = {"$rm": message.method, "$si": source, "$sp": port, "$pr": "udp",
                     "$Ri": "203.0.113.1", "$Rp": 5060, "$ru": message.request_uri,
                     "$ltt(t)": f"{self.TM_TAG}-{crc:04x}"}

    def reply_to_notify(self, notify: dict[str, object], status: int = 200) -> None:
        """A reply to one NOTIFY we sent, as tm matched it (its ids and its Via
        branch: the NOTIFY's)."""
        call_id, from_tag, to_tag = self._ids(notify)
        self.vars = {"$rm": "NOTIFY", "$rs": status, "$ci": call_id, "$ft": from_tag,
                     "$tt": to_tag, cert_route._REPLY_BRANCH: notify["branch"]}


@pytest.fixture
def service(pki, tmp_path: Path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(cert_route, "time", clock)
    ksr = FakeKSR()
    svc = CertService(CertSettings(path=tmp_path / "certs.sqlite"), [pki.ca.cert], ksr)
    store_now = clock.now
    cs.publish(sip.make_request("PUBLISH", BOB, from_uri=BOB, to_uri=BOB,
                                extra_headers=[("Event", "certificate")],
                                body=_der(pki.user("bob").cert), content_type=cs.CONTENT_TYPE),
               authenticated=BOB, store=svc.publications, anchors=[pki.ca.cert],
               now=store_now)
    yield svc, ksr, clock
    svc.db.close()


ATTACKER, VICTIM = "198.51.100.10", "192.0.2.50"   # the forger's own address; a visited
VIA = f"{ATTACKER}:5060"                            # proxy's, behind which users subscribe


def _subscribe(*, call_id: str, from_tag: str, event_id: str | None, branch: str,
               via: str = VIA, contact_host: str = ATTACKER, to_tag: str | None = None,
               ruri: str = BOB) -> sip.SipMessage:
    event = "certificate" + (f";id={event_id}" if event_id else "")
    msg = sip.make_request("SUBSCRIBE", ruri, from_uri="sip:mallory@example.net", to_uri=BOB,
                           call_id=call_id, from_tag=from_tag, to_tag=to_tag, via_host=via,
                           extra_headers=[("Event", event), ("Expires", "3600"),
                                          ("Contact", f"<sip:m@{contact_host}:5060>")])
    via_value = msg.get("Via").rsplit("branch=", 1)[0] + f"branch={branch}"
    return msg.replace("Via", via_value)


def _new_subscription(svc, ksr, msg, source: str) -> int:
    ksr.request(msg, source)
    svc.route_subscribe(msg)
    return ksr.replies[-1]


def _colliding_branches(count: int) -> list[str]:
    """Top Via branches other than the first SUBSCRIBE's whose tm tag is the same (tm's
    suffix is a 16-bit CRC: about one branch in 65,536 collides, found offline), so that
    tm takes each forged SUBSCRIBE as a transaction of its own, not a retransmission."""
    target = binascii.crc_hqx((ATTACKER + "5060" + "z9hG4bK-r26").encode(), 0)
    found, n = [], 0
    while len(found) < count:
        branch = f"z9hG4bK-f{n}"
        if binascii.crc_hqx((ATTACKER + "5060" + branch).encode(), 0) == target:
            found.append(branch)
        n += 1
    return found


def _fill_victims_places(svc, ksr, clock) -> None:
    """The attack: a subscription of the forger's own, at its own address, answered;
    then 20 SUBSCRIBEs with the victim's address as their UDP source, in the same
    dialog (same Call-ID, From tag and top Via, so the same tag from tm), each with
    another Event id; then one refresh of its own subscription, whose NOTIFY it
    answers at its own address."""
    own = _subscribe(call_id="r26-c", from_tag="m1", event_id="own", branch="z9hG4bK-r26")
    assert _new_subscription(svc, ksr, own, ATTACKER) == 200
    ksr.reply_to_notify(ksr.sent[-1])
    svc.on_reply()                                     # its own NOTIFY answered: confirmed
    local_tag = FakeKSR.TM_TAG + "-%04x" % binascii.crc_hqx(
        (ATTACKER + "5060" + "z9hG4bK-r26").encode(), 0)
    clock.now += 10                                    # tm forgot the first transaction
    for n, branch in enumerate(_colliding_branches(20)):   # forged: UDP source = the victim
        forged = _subscribe(call_id="r26-c", from_tag="m1", event_id=f"x{n}",
                            branch=branch, contact_host=VICTIM)
        assert _new_subscription(svc, ksr, forged, VICTIM) in (200, 403)   # 200 today
    clock.now += 0.5
    refresh = _subscribe(call_id="r26-c", from_tag="m1", event_id="own", branch="z9hG4bK-r26b",
                         to_tag=local_tag, ruri="sip:203.0.113.1:5060")
    ksr.request(refresh, ATTACKER)
    svc.route_resubscribe(refresh)
    assert ksr.replies[-1] == 200
    ksr.reply_to_notify(ksr.sent[-1])                  # answered at its own address
    svc.on_reply()


def _victims_user_subscribes(svc, ksr, clock) -> int:
    """A real user behind the victim's address follows bob, well after every
    unanswered NOTIFY's transaction is over."""
    clock.now += 30
    svc.on_timer()                                     # drop_unanswered: 4 s after
    clock.now += 1
    real = _subscribe(call_id="r26-real", from_tag="u1", event_id=None, branch="z9hG4bK-u1",
                      via=f"{VICTIM}:5060", contact_host=VICTIM)
    return _new_subscription(svc, ksr, real, VICTIM)


def test_hole_a_forgers_own_answer_confirms_subscriptions_forged_from_a_victims_address(
        service):
    """Off-path sender with one address of its own (no account: SUBSCRIBE needs none).

    Attack: (1) from its own address X, SUBSCRIBE to bob (``Event: certificate;id=own``,
    Call-ID c, From tag m1, top Via ``X:5060;branch=b``); tm's tag for the 200 is a CRC
    of that Via, so the forger knows it.  It answers the NOTIFY: confirmed.  (2) Ten
    seconds later (tm forgot the transaction), 20 SUBSCRIBEs over UDP with the *victim's*
    address V as source (a visited proxy that carries all its users' traffic), the same
    Call-ID and From tag, each with its own Via branch chosen offline so that tm's 16-bit
    CRC gives the same tag (a transaction each, not retransmissions), ``id=x0`` ...
    ``id=x19``: 20 new rows (the key has the
    Event id), each on probation, each NOTIFY going to V, which never answers.  (3) Half
    a second later, from X, a refresh of its own subscription in the dialog (allowed:
    from its source): the proxy sends a NOTIFY to X, X answers 200; ``on_reply`` calls
    ``confirm(call_id, local_tag, remote_tag)``, whose UPDATE has no Event id: all 21
    rows come off probation.

    Effect: the forged subscriptions are never dropped (``drop_unanswered`` takes only
    UNCONFIRMED rows) and never give way at a full bound (``_check_bounds`` evicts only
    UNCONFIRMED rows): V's 20 places are held for the granted hour, and the forger can
    renew them in the dialog with V forged as the source (``route_resubscribe`` checks
    the source address only).  Every user behind V gets ``403 Too Many Subscriptions``
    for following any certificate, which is the attack review 15's probation was made
    against (docs/threat-model.md, "SUBSCRIBEs ... from a forged source up to its
    per-source bound").  As confirmed subscribers, V's rows also get a large
    certificate's NOTIFY over TCP: a connect to an address that never answered, which
    ``_plan`` exists to prevent.

    Fix (kamailio_app/cert_table.py, cert_route.py): confirm only the subscription whose
    NOTIFY was answered: ``on_reply`` reads the NOTIFY's Event id from the transaction
    (``$T_req($hdr(Event))``) and ``confirm``/``forget_dialog`` add ``event_id = ?``;
    and/or ``SubscriptionTable.add`` refuses (``SubscriptionTaken``) a new subscription
    in a dialog (Call-ID, our tag, their tag) that already has one from another source."""
    svc, ksr, clock = service
    _fill_victims_places(svc, ksr, clock)
    assert _victims_user_subscribes(svc, ksr, clock) == 200, \
        "the forged subscriptions still hold the victim's places"


def test_control_forged_subscriptions_in_a_dialog_of_their_own_give_way(service):
    """The same 20 forged SUBSCRIBEs from V, and the forger's own answered subscription
    and refresh, but the forged ones in other dialogs (another From tag each): they stay
    on probation, are dropped 4 s after their first NOTIFY, and the real user behind V
    is served."""
    svc, ksr, clock = service
    own = _subscribe(call_id="r26-c", from_tag="m1", event_id="own", branch="z9hG4bK-r26")
    assert _new_subscription(svc, ksr, own, ATTACKER) == 200
    ksr.reply_to_notify(ksr.sent[-1])
    svc.on_reply()
    clock.now += 10
    for n in range(20):
        forged = _subscribe(call_id="r26-c", from_tag=f"v{n}", event_id=f"x{n}",
                            branch="z9hG4bK-r26", contact_host=VICTIM)
        assert _new_subscription(svc, ksr, forged, VICTIM) == 200
    assert _victims_user_subscribes(svc, ksr, clock) == 200
    assert svc.subscriptions.count(BOB) == 2          # the forger's own and the real user's


def test_control_the_forged_rows_are_on_probation_until_the_forgers_own_answer(service):
    """Where the hole is: right after step (2) the forged rows are UNCONFIRMED; the 2xx
    to the NOTIFY of the forger's *own* subscription (another Event id) clears them."""
    svc, ksr, clock = service
    own = _subscribe(call_id="r26-c", from_tag="m1", event_id="own", branch="z9hG4bK-r26")
    assert _new_subscription(svc, ksr, own, ATTACKER) == 200
    ksr.reply_to_notify(ksr.sent[-1])
    svc.on_reply()
    local_tag = FakeKSR.TM_TAG + "-%04x" % binascii.crc_hqx(
        (ATTACKER + "5060" + "z9hG4bK-r26").encode(), 0)
    clock.now += 10
    forged = _subscribe(call_id="r26-c", from_tag="m1", event_id="x0",
                        branch="z9hG4bK-r26", contact_host=VICTIM)
    if _new_subscription(svc, ksr, forged, VICTIM) == 200:   # (a fix may refuse it: 403)
        row = svc.subscriptions.get("r26-c", local_tag, "m1", "x0")
        assert row is not None and row.source == VICTIM  # the same dialog, the victim's source
        assert svc.subscriptions.flags(row) & UNCONFIRMED


# --------------------------------------------------------------------------
# The phone: a replaced certificate brought back after an empty NOTIFY

@pytest.fixture
def phone(pki):
    from e2m_lab.certservice_subscriber import subscriber
    made = subscriber(pki)
    return made.engine, made.client, made.sent


def _old_and_new_bob(pki):
    compromised = issue_user(pki.ca, BOB, "ec",     # bob's certificate before he replaced it
                             not_before=datetime.now(timezone.utc) - timedelta(days=10))
    return compromised, pki.user("bob").cert        # a Credential; the replacement: issued now


def test_hole_an_empty_notify_first_lets_the_replaced_certificate_back(pki, phone):
    """Untrusted on-path hop (a visited proxy alice subscribes through: NOTIFYs come from
    her outbound proxy's address, which is the hop; or anyone who saw the subscription's
    Call-ID and tags and can send UDP from the proxy's address).

    Bob's key was compromised; he published a new certificate and the service NOTIFYed
    it (CSeq 2).  The hop kept the NOTIFY of the old one (review 4's attack, refused
    since: ``_refuse_older``, "issued before the one held").  Attack: two NOTIFYs in the
    subscription's dialog, both with the CSeq of the last real one (an equal CSeq is
    read again, ``CertServiceClient._notify``; so no out-of-order restart either): the
    first with no body, the second with the old certificate.

    Effect: the empty one drops bob's certificate (``drop_peer_certificate``); with
    nothing held, ``_refuse_older`` has nothing to compare with, and the old certificate
    is kept for the subscription's time.  alice's next MESSAGE to bob is sealed to the
    compromised key, with no event but "peer_certificate" (as for a real change), until
    the service's next NOTIFY (bob's next change, or the renewal at 80 % of 3600 s).

    Fix (e2m_plugins/ua.py): keep, per AoR and for the life of its subscription (or a
    bounded while: ``MAX_SERVICE_PEERS``), the newest notBefore the service ever gave,
    and refuse an older certificate against that high-water mark, not only against the
    one held; a removal does not lower it (bob going back to an older certificate is
    done by issuing a new one, or by the subscription's end)."""
    engine, client, sent = phone
    compromised, replacement = _old_and_new_bob(pki)
    sub = _subscribe_to_bob(engine, client, sent)
    assert _answer(client, _notify(sub, _der(compromised.cert), cseq=1)) == 200
    assert _answer(client, _notify(sub, _der(replacement), cseq=2)) == 200
    assert _der(engine.certs.user(BOB)) == _der(replacement)
    assert _answer(client, _notify(sub, b"", cseq=2)) == 200
    _answer(client, _notify(sub, _der(compromised.cert), cseq=2))
    held = engine.certs.user(BOB)
    assert held is None or _der(held) != _der(compromised.cert), \
        "alice holds bob's replaced (compromised) certificate again"


def test_control_the_replaced_certificate_alone_is_refused(pki, phone):
    """Review 4's attack without the empty NOTIFY first: still refused."""
    engine, client, sent = phone
    compromised, replacement = _old_and_new_bob(pki)
    sub = _subscribe_to_bob(engine, client, sent)
    assert _answer(client, _notify(sub, _der(compromised.cert), cseq=1)) == 200
    assert _answer(client, _notify(sub, _der(replacement), cseq=2)) == 200
    _answer(client, _notify(sub, _der(compromised.cert), cseq=2))
    assert _der(engine.certs.user(BOB)) == _der(replacement)


def test_after_the_attack_alice_seals_nothing_for_the_compromised_key(pki, phone):
    """What the hole meant (alice's MESSAGE sealed for bob's *old*, compromised key),
    and what is left of the attack now: the empty NOTIFY still drops the certificate
    held (a hop can always deny service), the old one is refused, and alice's MESSAGE
    is refused for want of bob's certificate instead of going out for the old key."""
    from e2m_plugins.errors import E2MError
    engine, client, sent = phone
    compromised, replacement = _old_and_new_bob(pki)
    sub = _subscribe_to_bob(engine, client, sent)
    assert _answer(client, _notify(sub, _der(compromised.cert), cseq=1)) == 200
    assert _answer(client, _notify(sub, _der(replacement), cseq=2)) == 200
    assert _answer(client, _notify(sub, b"", cseq=2)) == 200
    _answer(client, _notify(sub, _der(compromised.cert), cseq=2))
    assert engine.certs.user(BOB) is None
    msg = sip.make_request("MESSAGE", BOB, from_uri=ALICE, to_uri=BOB, body=b"secret",
                           content_type="text/plain")
    with pytest.raises(E2MError):
        engine.protect(msg)

# -- the archive: header octets that are not UTF-8 (the review's lead) -----------------

def _response_with_odd_to(to_param: bytes) -> sip.SipMessage:
    return sip.parse(
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-r26\r\n"
        b"From: <sip:alice@example.com>;tag=a1\r\n"
        b"To: <sip:bob@example.com;x=" + to_param + b">;tag=b1\r\n"
        b"Call-ID: r26-archive@example.com\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("to_param", [b"\xe9", b"ok"])
def test_a_responders_to_uri_that_is_not_utf8_is_archived_not_lost(tmp_path, to_param):
    """The review's lead, at the archive: text the core keeps as surrogates (header
    octets that are not UTF-8) made the insert raise ``UnicodeEncodeError``, which is no
    ``ArchiveError`` (the reply route would have logged it and forwarded the body
    unarchived and unspooled).  It failed on ``e18e43c``.  No live path to it was found:
    the core refuses such a URI (``aor_of``) or a Content-ID header before it reads a
    body.  Rows and log lines now write such octets as ``\\xNN``."""
    from e2m_plugins.proxy import SeenBody
    from kamailio_app.archive import SqliteArchive
    from kamailio_app.bootstrap import body_records
    archive = SqliteArchive(tmp_path / "archive.sqlite")
    archive.ensure_schema()
    message = _response_with_odd_to(to_param)
    seen = [SeenBody(None, "application/sdp", b"v=0\r\n", True, "valid", BOB, bound=True)]
    archive.record(body_records(message, seen))
    [row] = archive.bodies()
    assert row.plaintext == b"v=0\r\n"
    assert row.from_uri == "sip:bob@example.com;x=" + ("\\xe9" if to_param == b"\xe9" else "ok")
