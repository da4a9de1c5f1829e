"""Review 137 (attacker's review of 9e484f3), area 1: the late 2xx's ACK and BYE on the
real phone (``e2m-phone listen``, default settings), past ``MAX_LATE``.  Set-up as
review 129's module (``tests/pjsua/test_review129_late_2xx_phone.py``, its ``Bob``): a
UDP socket is alice's outbound proxy and answers as bob's devices, each a ``UAEngine``
with bob's credentials (f1 fails the INVITEs, g1..g6 answer late, under alice's offer
key: kekri, signed by bob).

Hole K1: a copy of an evicted late 2xx draws another ACK and BYE
-------------------------------------------------------------------

- Attacker: the **callee** (an insider UA's devices, or anyone holding the offer's
  CEK and bob's signature, i.e. bob) or, where the phone does not require E2M, an
  **untrusted hop** on the INVITE's path (it may forge the plaintext 2xx).  It needs
  ``MAX_LATE // MAX_PER_INVITE + 1`` = 6 failed INVITEs of alice within 32 s (at a
  home with ``[auth]`` each call's first INVITE fails 407; here f1 answers 486).
- Messages: alice calls bob 6 times, f1 answers each 486 (ACKed); then g1..g6 each
  answer each INVITE 200 (36 late 2xx, each sealed and signed as a real one); the
  phone sends ACK + BYE for each (36 BYEs).  Then the same 36 200s again, byte for
  byte, in the same order (what the devices' 2xx retransmissions are).
- Observed: every copy draws a **new ACK (new branch) and a new BYE (new branch)**:
  72 BYEs in all, the phone's ``late_2xx_counts`` ``{'answered': 72, 'acks_again': 0}``
  (secure: 36 BYEs, ``acks_again`` 36, as the control with 6 late 2xx shows).  In a
  scratch run (not kept) sending the 36 copies round after round: 71, 107, 143, ... 575
  BYEs after 15 rounds (about 2 s of the test's clock), then it stopped at 584: not by
  any bound of ``late_2xx.py`` but because the ACKs and BYEs (about 1,170 requests)
  pushed the INVITEs out of the engine's ``_sent`` table (``_MAX_SENT`` = 1024,
  ``e2m_plugins/ua.py:71``), so that every other request alice had in flight was
  forgotten too (its answers become "answers to nothing we sent").  So a forger gets
  about 16 times the documented "one ACK and one BYE per To tag" toward the Contact and
  Record-Route of its choosing (each BYE a client transaction pjsip retransmits over
  UDP until answered, up to 11 sends by Timer F), and each new entry starts with
  ``auth_tries`` 0 at a home with ``[auth]`` (read, not run).
- Code at fault: ``pjsua_hooks/late_2xx.py:396-397`` (``answer`` evicts the oldest entry
  past ``max_entries``, and with it the only record that its 2xx was answered) with
  ``:337-346`` (``retransmission`` knows octets of held entries only) and ``:377``
  (``answer`` treats a 2xx whose key is not held as new); the engine still names the copy
  late (``e2m_plugins/ua.py:1085``, ``late_answer_to_failed_invite``: the INVITE's
  failure is kept 32 s, the retired offer key still opens it).
- Suggested fix: refuse a new late 2xx while the table is full (count it
  ``over_bounds``, send nothing) rather than evicting a live entry: entries leave only
  by age (``MAX_AGE``, the same 32 s the engine keeps the failure); or keep a bounded
  set of the (Call-ID, CSeq, branch, To tag) keys answered for 32 s and never BYE one
  twice.
- Test: ``test_a_copy_of_an_evicted_late_2xx_draws_no_second_bye`` (strict xfail).

Control (unmarked, passes): ``test_control_copies_of_late_2xx_held_draw_acks_only``:
one failed INVITE, 6 late 200s (within ``MAX_LATE``), each sent again: 6 ACKs again on
their first branches, no second BYE, ``answered`` 6 and ``acks_again`` 6.

Tried and held (area 1, the digest retry):

- Who gets a digest: only a 407 whose source matches the home (``_late_challenge``,
  ``ProxySource.matches``; with an outbound proxy ``_answer_from_home`` drops any other
  response first), of the home realm (case-insensitive), strictly read
  (``digest_params``: a parameter twice is refused), with MD5/SHA-256/SHA-512-256 and
  qop auth or none (``MD5-sess``, ``auth-int`` only: refused); run at the unit level on
  odd challenges: a nonce or opaque with CR/LF makes ``quote_string`` raise and the
  retry is refused (no header injection), an escaped quote is re-quoted.  Review
  129's real-phone tests cover another realm's 407, a stranger's 407 and a second 407
  without ``stale``.  Compared with pjsua: pjsua answers a 407 of the home realm to its
  own requests from any source (``challenges.py`` filters by realm only), so the late
  BYE is stricter than the phone's own requests; a callee who rewrites the Record-Route
  to send the BYE to itself gets no 407 answered (not from the home), and the retry
  goes where the first BYE went (built from ``entry.bye``; nothing of the 407 but its
  challenge parameters is used).  Residual (read, not run): with the route through a
  callee's host first, that host can relay the BYE to the home with a spoofed UDP
  source of alice's, so that the home's 407 reaches alice from the home and her retry
  (with the digest) goes through the callee's host: the documented UDP-spoofing limit,
  closed by TLS to the home.
- Unbounded requests from 407s: one BYE of an entry is in flight at a time, at most
  ``MAX_AUTH_TRIES`` (2) retries, the second only for ``stale=true``; an entry evicted
  between the BYE and its 407 gets no retry (``retry_bye``'s first check).  K1 above
  is the way round these bounds.
- The BYE sent elsewhere by the 407: no (above).

Fixed (stop 44), K1: ``LateAnswers`` keeps every late 2xx it answered as a key for
``MAX_AGE`` (``MAX_ANSWERED`` of them), apart from the ``MAX_LATE`` entries that hold
ACKs for copies; an entry evicted for room is still known, so a copy of its 2xx gets
nothing.  (A first fix refused new late 2xx while the table was full; review 138 K2
showed a callee could then fill it against another fork's honest 200.)  On the code
before, the hole test failed (72 BYEs for 36 late 200s sent twice); now each of the
36 is answered once, the 32 held get their ACK again, the 4 evicted get nothing, and
no copy draws a second BYE.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from e2m_lab.flows import ua_engine
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.stranger import HOST
from e2m_plugins import sip
from e2m_plugins.testpki import TestPKI
from pjsua_hooks.late_2xx import MAX_LATE, MAX_PER_INVITE
from tests.pjsua.test_review129_late_2xx_phone import BOB, Bob, pki  # noqa: F401 (fixture)

pytestmark = [pytest.mark.pjsua2]

FORKS = [f"g{i}" for i in range(1, MAX_PER_INVITE + 1)]
# failed INVITEs needed to hold more late 2xx than MAX_LATE (6 To tags each)
CALLS = MAX_LATE // MAX_PER_INVITE + 1


@contextmanager
def alice_calling(tmp_path: Path, pki: TestPKI, tags: list[str]
                  ) -> Iterator[tuple[PhoneProcess, Bob]]:
    """alice's real phone, whose outbound proxy is ``Bob``'s socket, and one bob device
    per tag; both stopped after."""
    bob = Bob(pki)
    for tag in tags:
        bob.devices[tag] = ua_engine(pki, "bob", peers=("alice",))
    bob.answer_byes = True
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{bob.port}"})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        yield alice, bob
    finally:
        alice.stop()
        bob.close()


@pytest.fixture
def alice_and_bob(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Bob]]:
    with alice_calling(tmp_path, pki, FORKS) as pair:
        yield pair


def _failed_invites(alice: PhoneProcess, bob: Bob, count: int) -> list[sip.SipMessage]:
    """alice calls bob ``count`` times; device f1 answers each INVITE 486 (ACKed)."""
    invites = []
    for _ in range(count):
        alice.send(f"call {BOB}")
        invite = bob.receive(lambda m: m.is_request and m.method == "INVITE"
                             and m.call_id not in {i.call_id for i in invites})
        assert invite is not None
        bob.reply(invite, "f1", 486, "Busy Here")
        assert bob.receive(lambda m, c=invite.call_id: m.is_request and m.method == "ACK"
                           and m.call_id == c) is not None
        invites.append(invite)
    return invites


def _late_200(bob: Bob, invite: sip.SipMessage, tag: str) -> tuple[bytes, bool]:
    """Device ``tag`` answers ``invite`` 200 under alice's offer key; waits a while for
    the BYE alice's phone sends for it.  Returns the 200's octets and whether a BYE
    came (none past ``MAX_LATE`` held: stop 44)."""
    bob.reply(invite, tag, 200, "OK")
    data = bob.sent[tag]
    bye = bob.receive(lambda m: m.is_request and m.method == "BYE"
                      and m.call_id == invite.call_id and m.to_tag == tag, timeout=3)
    return data, bye is not None


def _byes(bob: Bob, call_id: str, tag: str) -> list[sip.SipMessage]:
    return [m for m in bob.log if m.is_request and m.method == "BYE"
            and m.call_id == call_id and m.to_tag == tag]


def _late_round(alice: PhoneProcess, bob: Bob, calls: int) -> tuple[list[tuple[str, str, bytes]], dict]:
    """``calls`` failed INVITEs, each answered late by every device of ``FORKS`` (each
    200 gets its ACK and BYE); then the callee's devices send every late 200 once
    more, byte for byte, in the same order (their retransmissions, RFC 3261 13.3.1.4),
    each after the phone's ACK to the one before.  Returns the 200s and what came back
    for the second round: BYEs per 200, ACKs, the phone's counts."""
    invites = _failed_invites(alice, bob, calls)
    answered = {}
    sent = []
    for invite in invites:
        for tag in FORKS:
            data, answered[(invite.call_id, tag)] = _late_200(bob, invite, tag)
            sent.append((invite.call_id, tag, data))
    before = {(c, t): len(_byes(bob, c, t)) for c, t, _ in sent}
    mark = len(bob.log)
    for call_id, tag, data in sent:
        bob.send(data)
        # an ACK again only while the phone holds the 2xx's entry (the newest MAX_LATE)
        bob.receive(lambda m, c=call_id, t=tag: m.is_request and m.method == "ACK"
                    and m.call_id == c and m.to_tag == t, timeout=1.5)
    bob.receive(lambda m: False, timeout=1.5)
    after = {(c, t): len(_byes(bob, c, t)) for c, t, _ in sent}
    acks = sum(1 for m in bob.log[mark:] if m.is_request and m.method == "ACK")
    return sent, {"before": before, "after": after, "acks": acks,
                  "counts": alice.status()["late_2xx_counts"]}


def test_a_copy_of_an_evicted_late_2xx_draws_no_second_bye(alice_and_bob):
    """CALLS (6) failed INVITEs x 6 devices = 36 late 200s > MAX_LATE (32).  Secure: each
    late 200 ends in one BYE, however often it comes (late_2xx.py: "one ACK and one BYE
    per To tag")."""
    alice, bob = alice_and_bob
    sent, seen = _late_round(alice, bob, CALLS)
    assert len(sent) > MAX_LATE
    # since stop 44 every late 200 is answered once; a copy of one whose entry made
    # room (the oldest) gets nothing, and none draws a second BYE (before: 72 BYEs)
    assert set(seen["before"].values()) == {1}, seen["before"]
    assert seen["after"] == seen["before"], (sum(seen["after"].values()), seen["counts"])
    assert seen["counts"]["answered"] == len(sent), seen["counts"]
    assert seen["acks"] == MAX_LATE, seen["acks"]
    assert seen["counts"]["over_bounds"] == len(sent) - MAX_LATE, seen["counts"]


def test_control_copies_of_late_2xx_held_draw_acks_only(alice_and_bob):
    """One failed INVITE x 6 devices (within MAX_LATE): each 200 again gets the same ACK,
    no second BYE."""
    alice, bob = alice_and_bob
    sent, seen = _late_round(alice, bob, 1)
    assert len(sent) == MAX_PER_INVITE <= MAX_LATE
    assert set(seen["before"].values()) == {1}
    assert seen["after"] == seen["before"], seen
    assert seen["acks"] == len(sent)
    assert seen["counts"]["answered"] == len(sent) and \
        seen["counts"]["acks_again"] == len(sent), seen["counts"]
