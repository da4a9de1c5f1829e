"""A hundred-and-fifty-sixth attacker's review (December 2026) of ba41823 (with ad5fba6
and b7d4e98 before it): the per-branch cap on the replies the engine reads in one of
the proxy's own tm transactions (``kemi._reading_left``: htable ``e2mreplyreads`` keyed
by ``$T(id_index):$T(id_label):$T_branch_idx`` after the core reply route's
``t_check_trans``, ``READS_PER_BRANCH`` = 16, the rest dropped unread).  Run on a real
Kamailio 5.6.3.

Hole K1: the cap is per branch, and the callee chooses how many branches there are
-----------------------------------------------------------------------------------

- Attacker: the callee (an insider with one account, here mallory), helped by any
  caller: dave, a stranger with no account, from another address of hers.  Mallory
  registers ``max_contacts`` (10, the default) contacts for her AoR, all UDP sockets of
  hers on one address; ``registrar.lookup`` forks every INVITE to her to all of them
  (``kemi.py:1881``), so one INVITE is one transaction with 10 branches.
- Messages: one INVITE from dave to mallory; on each of the 10 branches 20
  ``183 Session Progress``, each with review 153's body (four ``application/pkcs7-mime``
  envelopes sealed to the proxy), sent round-robin, ~30 a second in all (6.7 s).
- Effect observed: on ba41823, 160 of 200 183s read by the engine for that one INVITE
  (16 on each of the 10 branches; 640 private-key operations), 10 ``more than 16
  replies`` warnings (the run printed; three more runs all past the test's bound).
  Review 153's K1 was 120 reads on one ringing INVITE; the cap brings one branch to 16
  but the callee multiplies it by 10 with registrations alone, and nothing counts the
  replies against anyone: at a stranger's pike rate (30 requests in 2 s from one
  address, no account needed) that is 15 INVITEs a second, 2,400 bodies (9,600
  private-key operations) a second to read from one caller address and one callee
  account, far past what two cores do (review 153 measured the same body at several ms
  each; an ad hoc run here sent the 200 183s at once: 150 read within ~0.45 s, about 330
  a second for the whole proxy, so one such INVITE is half a second of both cores and
  the pike rate is ~7 times what it can read). ``MAX_FORKS`` (4,
  ``e2m_plugins/proxy.py:70``) bounds the early dialogs whose keys are kept, not the
  branches read.
- Code at fault: ``kamailio_app/kemi.py:732-734`` (``_reading_left``: the count is
  named by the branch index too, so a transaction's budget is 16 x its branches);
  ``kemi.py:1881`` forks to every contact, up to ``max_contacts``
  (``kamailio_app/config.py:331``); docs/threat-model.md's residual ("up to 16 bodies
  per branch of each transaction ... bounded by its callers' pike rates") leaves out the
  factor the callee controls.
- Suggested fix: count per transaction as well (key ``$T(id_index):$T(id_label)``), with a
  budget that does not grow with the callee's contacts past ``MAX_FORKS``: e.g. at most
  16 per branch and 64 (16 x MAX_FORKS) per transaction; or read the 1xx of at most
  ``MAX_FORKS`` branches (the engine keeps keys for no more early dialogs than that)
  and relay the others' bodies unread only where the policy allows, else drop them.
- Test: ``test_hole_forks_multiply_the_cap_per_invite`` (asserts at most
  16 x MAX_FORKS = 64 reads for one INVITE).

Controls
--------

- ``test_control_one_branch_is_capped``: one contact, 20 such 183s on its branch: 16
  read, 4 dropped unread, one warning.

Tried and held
--------------

- The key is three numbers tm matched, not a string the sender writes: review 155's
  respellings (trailing ``0`` on the branch id or hash index, case) land on one count
  (review 155's tests pass on ba41823, XPASS before the markers went).  A branch id
  past ``nr_of_outgoings`` matches nothing (a stray, under pike).  Read in
  ``t_lookup.c``/``tm.c`` 5.6.3: ``t_check_trans`` on a reply calls
  ``tm_ctx_set_branch_index(branch)`` each time, so ``$T_branch_idx`` is never the
  previous message's.
- Memory of ``e2mreplyreads`` (read, not run): an item's key is at most
  ``10:10:2`` digits plus separators (about 25 characters), about 150 bytes with the
  cell; items are made only by replies that tm matched and that need reading, so at
  most branches x transactions, each living 40 s after its last count: a stranger at
  the pike rate (15 INVITEs/s) to a 10-contact callee makes 150 items a second, 6,000
  live (~0.9 MB) per caller address; the product's 256 MB (``config.py:100``) holds
  that for ~280 such addresses.  No longer the attacker's length (review 155 K2).
- Re-INVITEs, PRACKs, UPDATEs: each is a transaction of its own (new label), so its
  own count; a 2xx retransmitted while the ACK is lost matches the transaction only
  during tm's wait (5 s: ~3 copies), later copies are strays under pike; a reliable 183
  resent until its PRACK is 7 copies at most (0.5 s doubling within 32 s).  I found no
  honest single-branch call past 16 (not run with phones for lack of time).
- TCP/TLS: the key is transport-blind (tm's ids), so the same cap applies; not run.

Fixed (stop 47), K1: ``kemi._reading_left`` also counts per transaction (its hash index
and label) and reads at most ``READS_PER_TRANSACTION`` = 16 x ``MAX_FORKS`` = 64 per
INVITE, whatever the number of branches.  The strict xfail failed (XPASS) on the fix.
The module's helper now removes mallory's contacts after each flood: the hole test run
after the control got 503 for its tenth contact (``max_contacts`` 10) and so failed
whatever the code, which hid whether a fix worked.
"""

from __future__ import annotations

import socket
import time

import pytest

from e2m_lab.kamailio_harness import SipUa, start_proxy
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI
from tests.kamailio.test_review153_transaction_replies_wire import _SDP, _envelopes, _wait_reads

pytestmark = pytest.mark.kamailio

USERS = {"mallory": "mallory-Secret-156"}

_CAP = 16            # kemi.READS_PER_BRANCH
_MAX_FORKS = 4       # e2m_plugins.proxy.MAX_FORKS
_CONTACTS = 10       # [limits] max_contacts default
_PER_BRANCH = 20
_GAP = 1 / 30
_PARTS = 4


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory):
    proxy = start_proxy(tmp_path_factory.mktemp("review156-home"), pki=pki, e2m=True,
                        auth=True, users=USERS)
    yield proxy
    proxy.stop()




def _register(proxy, source: str, contacts: list[str],
              expires: int = 600) -> sip.SipMessage | None:
    ua = SipUa(proxy.port, user="mallory", password=USERS["mallory"], source=source,
               timeout=3.0)
    try:
        reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", str(expires))])
        reg = reg.replace("Contact", ", ".join(contacts))
        return ua.request(reg)
    finally:
        ua.close()


def _reply_to(invite: sip.SipMessage, status: str, *, entity=None, tag: str,
              source: str) -> bytes:
    from e2m_plugins.body import with_entity
    lines = "".join(f"Via: {v}\r\n" for v in invite.get_all("Via"))
    lines += "".join(f"Record-Route: {r}\r\n" for r in invite.get_all("Record-Route"))
    head = (f"SIP/2.0 {status}\r\n{lines}"
            f"From: {invite.get('From')}\r\n"
            f"To: {invite.get('To')};tag={tag}\r\n"
            f"Call-ID: {invite.get('Call-ID')}\r\n"
            f"CSeq: {invite.get('CSeq')}\r\n"
            f"Contact: <sip:mallory@{source}>\r\n")
    if entity is not None:
        return with_entity(sip.parse((head + "Content-Length: 0\r\n\r\n").encode()),
                           entity).serialize()
    return (head + "Content-Length: 0\r\n\r\n").encode()






def _forked_flood(proxy, pki, contacts: int, source: str, caller: str, tag: str):
    """Mallory registers ``contacts`` sockets at ``source``; dave calls her; each branch
    sends ``_PER_BRANCH`` 183s with the envelopes.  (reads, branches, log)"""
    socks = []
    for _ in range(contacts):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source, 0))
        s.settimeout(5)
        socks.append(s)
    dave = None
    try:
        answer = _register(proxy, source, [f"<sip:mallory@{source}:{s.getsockname()[1]}>"
                                           for s in socks])
        assert answer is not None and answer.status == 200, answer
        assert len(answer.get_all("Contact")) >= 1
        dave = SipUa(proxy.port, user="dave", domain="other.example.net", source=caller)
        invite = dave.build("INVITE", "sip:mallory@example.com", to="sip:mallory@example.com",
                            call_id=f"r156-{tag}-{time.time_ns()}@other.example.net",
                            body=_SDP, content_type="application/sdp")
        dave.send(invite.replace("Via", dave.via()))
        branches = []
        for s in socks:
            data, addr = s.recvfrom(65535)
            got = sip.parse(data)
            assert got.method == "INVITE", got.method
            branches.append((s, got, addr))
        entity = _envelopes(pki)
        mark = proxy.log_mark()
        started = time.monotonic()
        for _ in range(_PER_BRANCH):
            for n, (s, got, addr) in enumerate(branches):
                s.sendto(_reply_to(got, "183 Session Progress", entity=entity,
                                   tag=f"r156{tag}{n}", source=source), addr)
                time.sleep(_GAP)
        read = _wait_reads(proxy, mark, _PER_BRANCH * contacts, 90.0, still=4.0)
        took = time.monotonic() - started
        log = proxy.log_since(mark)
        for n, (s, got, addr) in enumerate(branches):
            s.sendto(_reply_to(got, "486 Busy Here", tag=f"r156{tag}{n}", source=source),
                     addr)
        return read, len(branches), took, log
    finally:
        if dave is not None:
            dave.close()
        for s in socks:
            s.close()
        # (stop 47) her contacts go, so the next test's fit under max_contacts (10): the
        # hole test after the control got 503 for its tenth, and so failed whatever the fix
        _register(proxy, source, ["*"], expires=0)


def test_control_one_branch_is_capped(home, pki):
    read, branches, _, log = _forked_flood(home, pki, 1, "127.0.156.3", "127.0.156.4", "one")
    assert branches == 1
    assert read == _CAP, (read, log[-2000:])
    assert log.count(f"more than {_CAP} replies to read on one branch") == 1


def test_hole_forks_multiply_the_cap_per_invite(home, pki):
    read, branches, took, log = _forked_flood(home, pki, _CONTACTS, "127.0.156.1",
                                              "127.0.156.2", "fork")
    assert branches == _CONTACTS
    assert read <= _CAP * _MAX_FORKS, (
        f"{read} of {_PER_BRANCH * branches} 183s read for one INVITE forked to "
        f"{branches} contacts of one callee ({_PARTS} envelopes each, "
        f"{read * _PARTS} private-key operations, {took:.1f} s), "
        f"{log.count('more than')} warnings")
