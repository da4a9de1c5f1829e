"""A fifty-...th attacker's review (December 2026) of ab09b70 (the ninety-third): stop
34's fix of review 89 in the certificate service (``kamailio_app/cert_route.py``
``on_reply``, the cfg's ``event_route[tm:local-request]`` and htable ``e2mnotify``),
on a real Kamailio 5.6 on loopback (each party a socket on a loopback address of its
own; a forged source address on loopback is the same as a real one to the proxy).  The
phone's part of the review is ``tests/pjsua/test_review93_phone.py``.

Hole 1 (``test_hole_a_bar_in_the_ids_confirms_a_forged_subscription``):

- attacker: an **off-path sender** with one real address (no account), as review 89's;
- messages: (1) one fetch of his own (``SUBSCRIBE``, ``Expires: 0``): its 200's To tag
  shows the fixed half of every tag tm gives; the other half is a CRC of the top Via's
  host, port and branch and one of its port, host and Call-ID (Kamailio's
  ``core/tags.h`` ``calc_crc_suffix``), all the sender's own, so he computes offline
  the tag ``LTv`` the proxy will give a SUBSCRIBE he forges and ``LTa`` the one it will
  give his next fetch (review 89 read the forged one's from the table "in his stead";
  here nothing is read: ``kamailio_to_tag``); (2) a SUBSCRIBE (``Expires: 3600``)
  forged from the victim's address, Call-ID ``V`` and From tag ``X|LTa|FTa``; (3) a
  fetch of his own, Call-ID ``V|LTv|X`` and From tag ``FTa``; (4) to its NOTIFY a
  ``200 OK`` with Call-ID ``V``, From tag ``LTv``, To tag ``X|LTa|FTa``.  Twice (two
  forged subscriptions, the per-source bound).
- effect: the cfg keeps the NOTIFY's dialog as ``$ci|$ft|$tt`` =
  ``V|LTv|X|LTa|FTa``; ``on_reply`` compares it with ``"%s|%s|%s" % (call_id, from_tag,
  to_tag)`` of the reply, ``V|LTv|X|LTa|FTa`` too, and confirms the dialog the reply
  names: the forged subscription.  Both forged subscriptions come off probation and
  hold the victim address's places for the hour: the real user there gets 403 Too Many
  Subscriptions.  Review 89's hole 1 back (and with it hole 3: a held large fetch
  released to a forged address over TCP), through a separator that may stand in the
  ids it separates: the core takes any visible ASCII in a Call-ID or tag (``|``
  included; RFC 3261's word and token have no ``|``, but nothing here refuses it).
- at fault: ``kamailio_app/templates/kamailio.cfg.tmpl`` line 353 (``$ci + "|" + $ft +
  "|" + $tt``) and ``kamailio_app/cert_route.py`` line 351 (the same join of the
  reply's ids): two different triples join to one string;
- fix: keep the ids unambiguously (each length-prefixed, or a digest of the three with
  a separator no id may hold, say ``\\x00`` after refusing it, or three htable keys
  ``<branch>:ci``, ``:ft``, ``:tt`` compared one by one); and/or refuse a Call-ID or tag
  outside RFC 3261's word / token at the door.

Controls: the same forged subscriptions with his fetches answered with his own ids stay
on probation and are dropped (the real user is served): the ``|`` ids are taken and
the set-up is review 89's; and every tag computed offline is the one the proxy gave
(``test_control_forged_subscriptions_with_bars_are_dropped_when_answered_honestly``).

Tried and held:

- (run) predicting another NOTIFY's Via branch from one's own: Kamailio's local branch
  is ``z9hG4bK<hash>.<8 hex>000...0.0``, 32 bits that look random; four NOTIFYs in a row
  to one attacker, two of them under one Call-ID, shared nothing;
- (read) the same bar trick against alice's real subscription (review 89's hole 2, a
  481): the stored and the forged strings must line up inside *her* From tag or
  Call-ID, which she chose, so it cannot be aimed at her;
- (read) a reply after the NOTIFY's transaction (2.5 s) fails ``t_check_trans``
  whatever ``e2mnotify`` still holds (64 s); a branch in other case finds no entry (no
  effect); tm's own 408 on a NOTIFY never reaches the reply route; the htable grows by
  one entry per NOTIFY for 64 s, at pike's rate per source (a rate bound, as review
  77's known limit).

Fixed (stop 35): as ``tests/unit/test_review93.py``'s docstring says.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from itertools import count

import pytest

from e2m_lab.certclient import CertClient, closed_and_forgotten
from e2m_lab.kamailio_harness import ProxyHandle, SipUa, start_proxy
from e2m_plugins.sip import SipMessage, make_response
from e2m_plugins.testpki import TestPKI
from kamailio_app.cert_route import UNANSWERED
from tests.kamailio.test_review89_wire import (BOB, USERS, answer_as, bob_der, publish,
                                               rows, wait_rows)

pytestmark = pytest.mark.kamailio

PER_SOURCE = 2
_sources = iter(range(2, 250))
_n = count(1)


def source() -> str:
    return f"127.0.93.{next(_sources)}"


@pytest.fixture(scope="module")
def certproxy(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[ProxyHandle]:
    proxy = start_proxy(tmp_path_factory.mktemp("review93"), pki=pki, e2m=True,
                        auth=True, users=USERS,
                        extra={"certs": {"notify_interval": 1, "min_expires": 2,
                                         "max_subscriptions_per_source": PER_SOURCE}})
    yield proxy
    proxy.stop()


@pytest.fixture
def made(certproxy: ProxyHandle) -> Iterator[list]:
    with closed_and_forgotten(certproxy) as things:
        yield things


def _via(host: str, port: int, branch: str) -> str:
    return f"SIP/2.0/UDP {host}:{port};rport;branch={branch}"


def _subscribe(ua: SipUa, via: str, expires: int, call_id: str, from_tag: str) -> SipMessage:
    request = ua.build("SUBSCRIBE", BOB, to=BOB, call_id=call_id, from_tag=from_tag, headers=[
        ("Event", "certificate"), ("Contact", f"<sip:{ua.source}:{ua.local_port}>"),
        ("Expires", str(expires))])
    return request.replace("Via", via)


def _answers(ua: SipUa, call_id: str, timeout: float) -> tuple[SipMessage | None,
                                                             SipMessage | None]:
    """The final answer and the NOTIFY that ``ua`` gets for ``call_id``."""
    final = notify = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (final is None or notify is None):
        message = ua.receive(max(0.05, deadline - time.monotonic()))
        if message is None or message.call_id != call_id:
            continue
        if message.is_request and message.method == "NOTIFY":
            notify = notify or message
        elif not message.is_request and message.status >= 200:
            final = final or message
    return final, notify


def _crcitt(parts: list[str]) -> str:
    """Kamailio's ``crcitt_string_array`` (core/crc.c): CRC-16/CCITT, reflected (0x8408),
    from 0xFFFF, inverted, written least significant nibble first, padded with '0'."""
    crc = 0xFFFF
    for part in parts:
        for octet in part.encode():
            crc = _CCITT[(crc ^ octet) & 0xFF] ^ (crc >> 8)
    crc = ~crc & 0xFFFF
    out = "" if crc else "0"
    while crc:
        out += "0123456789abcdef"[crc & 0xF]
        crc >>= 4
    return (out + "0000")[:4]


def _ccitt_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x8408 if c & 1 else c >> 1
        table.append(c)
    return table


_CCITT = _ccitt_table()


def kamailio_to_tag(prefix: str, host: str, port: int, branch: str, call_id: str) -> str:
    """The To tag tm gives a request (core/tags.h ``calc_crc_suffix``): its fixed prefix
    (any 200 of the proxy shows it), then a CRC of the top Via's host, port and branch
    and one of its port, host and the Call-ID.  Computable offline: all three are the
    sender's."""
    return (f"{prefix}-{_crcitt([host, str(port), branch])}"
            f"{_crcitt([str(port), host, call_id])}")


def _prefix(attacker: SipUa) -> str:
    """One fetch of his own: the fixed part of the proxy's To tags."""
    call_id = f"r93-probe-{os.getpid()}-{next(_n)}"
    via = _via(attacker.source, attacker.local_port, f"z9hG4bK-r93p{next(_n)}x{os.getpid()}")
    attacker.send(_subscribe(attacker, via, 0, call_id, f"p{next(_n)}"))
    final, notify = _answers(attacker, call_id, 2.0)
    assert final is not None and final.status == 200 and final.to_tag, final
    if notify is not None:
        attacker.send(make_response(notify, 200, "OK"))
    return final.to_tag.partition("-")[0]


def _barred(certproxy: ProxyHandle, made: list, pki: TestPKI, cross: bool
            ) -> tuple[list, SipMessage | None, list[tuple[str, str]]]:
    """Review 89's attack with ``|`` in the ids.  The forged rows left after probation,
    the real user's answer at the victim's address, and (computed, given) tag pairs."""
    publish(certproxy, made, bob_der(pki))
    victim = SipUa(certproxy.port, user="carol", source=source())
    attacker = SipUa(certproxy.port, user="carol", source=source())
    made += [victim, attacker]
    prefix = _prefix(attacker)
    pairs = []
    for _ in range(PER_SOURCE):
        n = next(_n)
        v_branch, a_branch = f"z9hG4bK-r93v{n}x{os.getpid()}", f"z9hG4bK-r93a{n}x{os.getpid()}"
        v_call, x, ft_a = f"r93-forged-{os.getpid()}-{n}", f"x{n}", f"a{n}"
        # offline: the tags the proxy will give the forged SUBSCRIBE and his own fetch
        lt_v = kamailio_to_tag(prefix, victim.source, victim.local_port, v_branch, v_call)
        own_call = f"{v_call}|{lt_v}|{x}"
        lt_a = kamailio_to_tag(prefix, attacker.source, attacker.local_port, a_branch,
                               own_call)
        forged_tag = f"{x}|{lt_a}|{ft_a}"
        victim.send(_subscribe(victim, _via(victim.source, victim.local_port, v_branch),
                               3600, v_call, forged_tag))
        deadline = time.monotonic() + 2
        given: list = []
        while not given and time.monotonic() < deadline:
            given = rows(certproxy, "SELECT local_tag, remote_tag FROM cert_subscriptions "
                                    "WHERE call_id = ?", v_call)
            time.sleep(0.05)
        assert given, "the forged SUBSCRIBE was not taken"
        pairs.append((lt_v, given[0][0]))
        attacker.send(_subscribe(attacker, _via(attacker.source, attacker.local_port,
                                                a_branch), 0, own_call, ft_a))
        final, notify = _answers(attacker, own_call, 2.0)
        assert final is not None and final.status == 200, final
        assert notify is not None, "no NOTIFY for his own fetch"
        pairs.append((lt_a, notify.from_tag))
        if cross:     # the forged dialog's ids: joined, they read as his own NOTIFY's
            reply = answer_as(notify, 200, v_call, lt_v, forged_tag, victim.aor)
        else:
            reply = make_response(notify, 200, "OK")
        attacker.send(reply)
    time.sleep(0.3)
    left = wait_rows(certproxy, "SELECT count(*) FROM cert_subscriptions WHERE source = ?",
                     [(0,)], victim.source, timeout=UNANSWERED + 3)
    real = CertClient(certproxy.port, "alice", source=victim.source)
    made.append(real)
    answer, _ = real.subscribe(BOB, 600)
    print(f"\n{PER_SOURCE} forged subscriptions from {victim.source} "
          f"({'bar-' if cross else 'honestly '}answered): left after probation "
          f"{left[0][0]}; the real user there: {answer.status if answer else None}; "
          f"tags computed/given: {pairs}")
    return left, answer, pairs


def test_hole_a_bar_in_the_ids_confirms_a_forged_subscription(certproxy, made, pki):
    left, answer, _ = _barred(certproxy, made, pki, cross=True)
    assert left == [(0,)], "the forged subscriptions came off probation and stay"
    assert answer is not None and answer.status == 200, answer


def test_control_forged_subscriptions_with_bars_are_dropped_when_answered_honestly(
        certproxy, made, pki):
    """The same forged SUBSCRIBEs and fetches (``|`` in their ids, taken by the proxy),
    his own NOTIFYs answered with their own ids: the forged rows are dropped, the real
    user is served; and every tag the attacker computed offline is the one the proxy
    gave (the forged subscription's and his own fetch's)."""
    left, answer, pairs = _barred(certproxy, made, pki, cross=False)
    assert left == [(0,)]
    assert answer is not None and answer.status == 200, answer
    assert all(computed == given for computed, given in pairs), pairs
