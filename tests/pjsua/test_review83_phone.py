"""An eighty-third attacker's review (December 2026) of 4ad57e0: the phone as a
target (``pjsua_hooks/``, ``e2m-phone``) against an off-path sender, an untrusted hop
and an insider UA.  Real ``e2m-phone listen`` processes (pjsua2) and plain sockets on
loopback, no Kamailio.

Hole 1, ``test_hole_a_bodiless_copy_in_the_same_transaction_takes_alices_security``:

- attacker: an untrusted hop on the leg to bob's phone (UDP, no TLS), which holds
  alice's signed, encrypted MESSAGE for a moment;
- messages: a MESSAGE without a body that copies alice's start line, Via (the same
  branch), From (with her tag), To, Call-ID and CSeq, then alice's real MESSAGE right
  after it (two datagrams, back to back);
- effect: the engine opens the bodiless copy without complaint (``require`` or not),
  ``FirstCopy`` keeps only protected requests, pjsua delivers it and answers 200; alice's
  real MESSAGE then opens, and ``E2MPhone._on_rx`` records its SecurityInfo under the
  same key (Call-ID, CSeq, method, top Via branch: review 25's fix) over the copy's empty
  record, while pjsip takes it for a retransmission of the copy's transaction (answers
  200 again, delivers nothing).  ``_ev_message`` runs after the pump and finds alice's
  record: bob's phone shows an empty message as "encrypted by sip:alice@example.com for
  us; signed by sip:alice@example.com (trusted)", alice's text is never shown, and
  alice's phone says "delivered" (200).  A false "encrypted/signed" mark on a message
  nobody signed, and a signed message silently swallowed.  (Review 25's row was the
  bodiless copy *after* alice's, on a new branch; this one goes *ahead* on hers.)
- at fault: ``pjsua_hooks/phone.py`` ``E2MPhone._on_rx``:
  ``_bounded_put(self._rx_info, _rx_key(msg, what), opened.info)`` overwrites the record
  of the transaction pjsua is handed with that of a later message pjsip will absorb;
  ``_ev_message`` looks it up by ``_rx_key`` of pjsua's ``whole_msg``.
- fix: never let a second message take a record a first one left under the same
  transaction key: a request whose (Call-ID, CSeq, method, branch) is already recorded
  with other content is a copy pjsip would absorb, so refuse it in the hook (482, not
  handed to pjsip) or keep the first record (``setdefault``); more robust, key the record
  by a digest of the very octets handed to pjsip (the opened message's ``serialize()``,
  or the datagram when unchanged) and look it up by the digest of ``whole_msg``.

Controls: alice's MESSAGE alone is shown with her text and security; the same bodiless
copy on a branch of its own is shown empty and "plaintext" (alice's then gets pjsip's
482 for a merged request: a drop, which a hop can always do).

Tried and held:

- a ``302 Moved Temporarily`` from the path (alice's outbound proxy's seat) with
  ``Contact: <sip:carol@example.com>``, carol a user alice holds a certificate of: no
  second INVITE leaves alice's phone (pjsua2 does not follow the redirect), so her offer
  is never sealed for carol (``test_control_a_302_from_the_path_is_not_followed``;
  ``test_control_carol_reads_what_alice_seals_for_her`` shows carol would have read it);
  a 302 to bob's own AoR is not followed either;
- the digest password file (``credentials.py`` / ``privatefiles``): symlink, group or
  other bits, non-UTF-8, over-long: refused at load and again at start (read only);
- challenges: only a 407 (or a REGISTER's 401) in ``auth_realm`` reaches pjsip
  (``challenges.py``, read only);
- stray 496/495/493 answers: counted and dropped unless they answer a request we sent
  (read only; ``_keep_reaction``).

Not tried for lack of time: the same copy-ahead with an INVITE (a bodiless INVITE on
the real one's branch, then the real one: ``_call_security`` is kept per Call-ID, so the
call pjsua answers would be shown with the real INVITE's security).

Fixed (stop 34): the INVITE variant was tried
(``test_hole_a_bodiless_invite_in_the_same_transaction_takes_alices_security``, a strict
xfail on 3959cf7: pjsua answered the bodiless copy and the call showed alice's offer as
"encrypted by ... signed by sip:alice@example.com (trusted)").  ``E2MPhone._on_rx`` now
keeps a received message's security record under the SHA-256 of the very octets it hands
pjsip (``handed_digest``; the opened message, or the datagram when unchanged) and
``_ev_message`` looks it up by the digest of pjsua's ``whole_msg`` (byte-identical: the
controls show alice's security through it); a record that matches no delivered octets is
no record (shown "plaintext").  The hook also remembers, per received request's
transaction key (Call-ID, CSeq, method, top Via branch), the digest it was handed on with
(count ``_MEMO`` and 64 s, past pjsip's own transactions): the same octets again are a
retransmission for pjsip to absorb, other octets are refused 482 (``duplicate_refused``
event) before they leave any record, so alice's real MESSAGE or INVITE is no longer
swallowed under the copy's 200 and never lends its security to the copy.  An incoming
call remembers the digest of the INVITE pjsua took (``E2MCall.initial``, from the
``incoming_call`` event's ``whole_msg``) and shows a received INVITE record of that CSeq
only when its octets match (``_taken_by_call``), which holds even when a flood pushed the
transaction entry out.  The hole's last assertion was ``any(text == alice's)``, which no
phone can meet when pjsip has already taken the copy's transaction (a hop can always drop
alice's message): it now accepts, instead, her real one refused 482 and bob told
(``duplicate_refused``); what bob is shown as signed or encrypted is still alice's text
only.  A copy carrying the hop's own plaintext text held before the fix too (488 under
``require``: ``test_control_a_plaintext_copy_ahead_on_alices_branch_is_refused``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER, ua_engine
from e2m_lab.phones import PhoneProcess, write_ua
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST, UdpStranger
from e2m_plugins import sip
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import TestPKI, init_test_pki
from e2m_plugins.uri import aor_of

pytestmark = [pytest.mark.pjsua2]

BOB = "sip:bob@example.com"
CAROL = "sip:carol@example.com"
ALICES_TEXT = b"review 83: the meeting moved to 15:00"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review83-pki"),
                         users=("alice", "bob", "carol"), key_type="ec")


class Hop:
    """A UDP socket alice's phone sends every request through (its outbound proxy)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]

    def invites(self, timeout: float, count: int = 1) -> list[tuple[sip.SipMessage, tuple]]:
        """The INVITEs alice sends within ``timeout`` (stops after ``count``)."""
        found: list[tuple[sip.SipMessage, tuple]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(found) < count:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, source = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                break
            try:
                msg = sip.parse(data)
            except Exception:  # noqa: BLE001 - keep-alives
                continue
            if msg.is_request and msg.method == "INVITE" and \
                    all(m.via_branch() != msg.via_branch() for m, _ in found):
                found.append((msg, source))
        return found

    def redirect(self, invite: sip.SipMessage, source: tuple, target: str) -> None:
        moved = make_response(invite, 302, "Moved Temporarily", [("Contact", f"<{target}>")])
        moved = moved.replace("To", f"{invite.get('To')};tag=r83hop")
        self.sock.sendto(moved.serialize(), source)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def alice(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[PhoneProcess, Hop]]:
    hop = Hop()
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{hop.port}", "srtp": True})
    # carol is a user alice holds a certificate of (a [peers] entry, as the certificate
    # service's would be after one message to her)
    text = config.read_text().replace(
        "[peers]\n", f'[peers]\n"{CAROL}" = "{pki.directory / "carol.crt"}"\n')
    config.write_text(text)
    process = PhoneProcess(config, "alice")
    try:
        process.wait("started", timeout=15)
        yield process, hop
    finally:
        process.stop()
        hop.close()


def _redirected(alice: PhoneProcess, hop: Hop, target: str
                ) -> tuple[sip.SipMessage, list[tuple[sip.SipMessage, tuple]]]:
    """alice calls bob; the hop answers 302 to ``target``; the INVITE and what alice
    sends after it within 4 s."""
    alice.send(f"call {BOB}")
    first = hop.invites(timeout=10)
    assert first, "alice sent no INVITE"
    invite, source = first[0]
    hop.redirect(invite, source, target)
    later = [(m, s) for m, s in hop.invites(timeout=4, count=3)
             if m.via_branch() != invite.via_branch()]
    return invite, later


def test_control_a_302_from_the_path_is_not_followed(alice, pki):
    """Held: a 302 from the path (Contact carol, a user alice holds a certificate of)
    is not followed: no second INVITE leaves alice's phone (pjsua2's redirect default
    stops there), so the hop cannot move her call to carol."""
    phone, hop = alice
    invite, later = _redirected(phone, hop, CAROL)
    assert aor_of(sip.parse_address(invite.get("To")).uri) == aor_of(BOB)
    assert later == []


def test_control_carol_reads_what_alice_seals_for_her(alice, pki):
    """The 302 control's carol is a real reader: alice's own call to carol is sealed for
    carol's key (so a followed redirect would have been a leak)."""
    phone, hop = alice
    phone.send(f"call {CAROL}")
    found = hop.invites(timeout=10)
    assert found, "alice sent no INVITE to carol"
    opened = ua_engine(pki, "carol", peers=("alice", "bob")).open(found[0][0])
    assert b"a=crypto" in opened.message.body


# ------------------------------------------------------------------ hole 1: the record

@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest
        ) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _alices_message(pki: TestPKI, bob: PhoneProcess, peer: UdpStranger
                    ) -> sip.SipMessage:
    """alice's signed, encrypted MESSAGE to bob as it would cross the hop."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    plain = sip.make_request("MESSAGE", f"sip:bob@{HOST}:{bob.port}",
                             from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
                             via_host=f"{HOST}:{peer.local_port}",
                             body=ALICES_TEXT, content_type="text/plain")
    return alice.protect(plain).message


def _bodiless_copy(real: sip.SipMessage, text: bytes = b"") -> sip.SipMessage:
    """The same request (Call-ID, From with its tag, CSeq, top Via branch), no body
    (or the hop's own plaintext ``text``)."""
    copy = real.with_body(b"")
    for name in ("Content-Disposition", "Content-Encoding", "Content-Transfer-Encoding"):
        copy = copy.remove(name)
    if text:
        copy = copy.replace("Content-Type", "text/plain").with_body(text)
    assert (copy.call_id, copy.cseq, copy.via_branch(), copy.from_tag) == \
        (real.call_id, real.cseq, real.via_branch(), real.from_tag)
    return copy


def _sent_ahead(pki: TestPKI, bob: PhoneProcess, *, same_branch: bool | None,
                text: bytes = b"") -> tuple[list[dict], int | None, list[int], list[dict]]:
    """The hop holds alice's MESSAGE, sends bob a bodiless copy of it (the same
    transaction when ``same_branch``, a new branch when False, none when None), then
    alice's real one right after it.  bob's message_in events since, the first final
    answer on alice's branch (the copy's, when it went first), every final answer on it,
    and bob's duplicate_refused events since."""
    peer = UdpStranger(bob.port)
    try:
        real = _alices_message(pki, bob, peer)
        copy = _bodiless_copy(real, text)
        if not same_branch:
            via = real.get("Via") or ""
            copy = copy.replace("Via", via.replace(real.via_branch(), real.via_branch() + "x"))
        mark = bob.mark()
        if same_branch is not None:
            peer.send(copy.serialize())
        peer.send(real.serialize())
        time.sleep(1.5)
        answers = [sip.parse(d) for d in peer.drain(0.5)]
        finals = [a.status for a in answers if a.via_branch() == real.via_branch()
                  and a.status >= 200]
        return bob.of("message_in", since=mark), next(iter(finals), None), finals, \
            bob.of("duplicate_refused", since=mark)
    finally:
        peer.close()


def test_hole_a_bodiless_copy_in_the_same_transaction_takes_alices_security(pki, bob):
    """See the module docstring, hole 1 (and "Fixed (stop 34)" for the last assertion)."""
    _copy_ahead_is_never_shown_as_alices(*_sent_ahead(pki, bob, same_branch=True))


def test_control_a_plaintext_copy_ahead_on_alices_branch_is_refused(pki, bob):
    """Hole 1 with the hop's own words (tried at stop 34, held before the fix too): the
    copy ahead on alice's branch carries a ``text/plain`` body of the hop's choosing.
    bob's phone requires E2M, so the engine refuses the copy (488) before pjsip makes a
    transaction of it; alice's real one is then delivered with her text and security."""
    shown, status, finals, _ = _sent_ahead(pki, bob, same_branch=True,
                                           text=b"review 83: moved to 16:00")
    assert finals[:1] == [488] and 200 in finals, finals
    assert [e["text"] for e in shown] == [ALICES_TEXT.decode()]
    sec = shown[0]["security"]
    assert sec["encrypted"] and sec["signed"] and sec["trusted"], sec["summary"]


def _copy_ahead_is_never_shown_as_alices(shown: list[dict], status: int | None,
                                         finals: list[int], refused: list[dict]) -> None:
    assert status == 200                       # the copy's answer on alice's branch
    assert shown, "bob's phone showed nothing"
    for event in shown:
        sec = event["security"] or {}
        # secure: what bob is shown as signed by alice is alice's text
        assert not (sec.get("signed") or sec.get("encrypted")) or \
            event["text"] == ALICES_TEXT.decode(), (event["text"], sec.get("summary"))
    # alice's text is shown, or her real one is not silently swallowed as a
    # retransmission: it is refused (482: a hop can always drop it) and bob is told
    assert any(e["text"] == ALICES_TEXT.decode() for e in shown) or \
        (482 in finals and [r["code"] for r in refused] == [482]), \
        ([(e["text"], (e["security"] or {}).get("summary")) for e in shown], finals, refused)


def test_control_alices_message_alone_is_shown_with_her_text_and_security(pki, bob):
    """The set-up is sound: the same MESSAGE of alice's, sent alone, is answered 200 and
    shown with her text as encrypted by and signed by alice (trusted)."""
    shown, status, _, _ = _sent_ahead(pki, bob, same_branch=None)
    assert status == 200
    assert [e["text"] for e in shown] == [ALICES_TEXT.decode()]
    sec = shown[0]["security"]
    assert sec["encrypted"] and sec["signed"] and sec["trusted"], sec["summary"]


def test_control_a_bodiless_copy_on_another_branch_is_shown_as_plaintext(pki, bob):
    """The copy on a branch of its own is its own transaction with its own record: shown
    empty and "plaintext"; alice's real one, a merged request now (same Call-ID, From
    tag and CSeq), gets pjsip's 482 and alice sees a failure (a hop may always drop her
    message; nothing is shown under her name)."""
    shown, status, _, _ = _sent_ahead(pki, bob, same_branch=False)
    assert status == 482
    assert [e["text"] for e in shown] == [""]
    sec = shown[0]["security"]
    assert sec is None or not (sec["signed"] or sec["encrypted"] or sec["trusted"])


# ------------------------------------------------------- hole 1, the INVITE variant (stop 34)

def _invite_sent_ahead(pki: TestPKI, bob: PhoneProcess, *, copy_ahead: bool
                       ) -> tuple[list[dict], list[int]]:
    """The hop holds alice's signed, encrypted INVITE (SDP offer), sends bob a bodiless
    copy of it on her branch (same Call-ID, From tag, CSeq) when ``copy_ahead``, then
    her real one right after it.  bob's call events since, and every final answer on
    her branch."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    peer = UdpStranger(bob.port)
    try:
        plain = sip.make_request(
            "INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("alice"),
            to_uri=pki.aor("bob"), via_host=f"{HOST}:{peer.local_port}", body=SRTP_OFFER,
            content_type="application/sdp",
            extra_headers=[("Contact", f"<sip:alice@{HOST}:{peer.local_port}>")])
        real = alice.protect(plain).message
        mark = bob.mark()
        if copy_ahead:
            peer.send(_bodiless_copy(real).serialize())
        peer.send(real.serialize())
        time.sleep(2.0)
        answers = [sip.parse(d) for d in peer.drain(0.5)]
        finals = [a.status for a in answers if not a.is_request and
                  a.via_branch() == real.via_branch() and a.status >= 200]
        kinds = ("call_incoming", "call_media", "call_state", "call_ended")
        return [e for kind in kinds for e in bob.of(kind, since=mark)], finals
    finally:
        peer.close()


def _rx_invite_marks(events: list[dict]) -> list[str]:
    """The summaries of every received-INVITE record shown as encrypted or signed."""
    return [(r["security"] or {}).get("summary", "")
            for e in events for r in (e.get("security") or [])
            if r["direction"] == "rx" and r["what"] == "INVITE" and r["security"]
            and (r["security"]["encrypted"] or r["security"]["signed"])]


def test_hole_a_bodiless_invite_in_the_same_transaction_takes_alices_security(pki, bob):
    """Hole 1 with an INVITE (the variant the review did not try): a bodiless copy of
    alice's INVITE on her branch, then her real one.  pjsua answers the copy (no offer
    from anyone: bob's phone offers in its 200); the real one is the same transaction to
    pjsip.  The call bob's phone shows must not carry alice's signed, encrypted offer as
    its received INVITE: the INVITE pjsua took had no body at all."""
    events, finals = _invite_sent_ahead(pki, bob, copy_ahead=True)
    assert any(e["kind"] == "call_incoming" for e in events), events
    assert _rx_invite_marks(events) == [], _rx_invite_marks(events)


def test_control_alices_invite_alone_is_shown_with_her_security(pki, bob):
    """The set-up is sound: alice's INVITE alone rings bob, is answered 200, and the call
    shows her offer as encrypted and signed."""
    events, finals = _invite_sent_ahead(pki, bob, copy_ahead=False)
    assert 200 in finals, finals
    assert any(e["kind"] == "call_incoming" for e in events), events
    assert _rx_invite_marks(events), events
