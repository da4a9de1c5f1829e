"""A thirty-sixth attacker's review (December 2026) of 123689b: the phone's dialog keys
after review 35's fix (``DialogKeys.settle`` on the offerer's side, ``answered`` on the
receiver's), and the archive spool's share per sender.

The holes: the offerer's side still settles a key it offered on a response that does
not answer the request that carried it.

- ``settle`` confirms a key offered in a request on any 2xx whose CSeq *number* is the
  request's (``DialogKey.offered_in`` keeps the number, not the method): the 200 to the
  CANCEL of that re-INVITE (CSeq ``n CANCEL``) confirms it, the 487 that follows then
  leaves it (only unconfirmed keys go), while the receiver drops it on its 487
  (``answered``, review 35): the offerer's next body goes under a key the peer dropped.
- ``settle`` drops every unconfirmed key of the dialog on *any* failure response naming
  the dialog (any CSeq, any method, even a stray one pjsip would drop: ``open`` settles
  before pjsip matches a transaction): a 405 to an INFO, or a hop's forged 481, while a
  re-INVITE is pending drops the key that re-INVITE offered; the peer, who got it,
  seals its 200 (the SDP answer) under it, which the offerer can no longer open: the
  200 is dropped, retransmitted and dropped for 32 s, and the re-INVITE times out.

And in the spool: ``message_weight`` counts a Call-ID's octets once a row, but SQLite
keeps it in the row and in the ``call_id`` index, whose entries over ~1000 octets spill
to an overflow page each: media rows of a 1000-octet Call-ID take 5.3 times their
weight in pages, so one stranger's two shares (his calls, and the answers to them)
fill the node's whole spool.

``test_hole_*`` xfail strictly on 123689b; ``test_control_*`` are the same flows without
the attack (they pass).

Fixed: ``DialogKey.offered_in`` is the whole CSeq and ``settle`` confirms or drops only
the keys of the request a response answers, by number and method (a 200 to a CANCEL
or a stray 481 of another CSeq settles nothing); and
``SpoolFile.hold`` charges a message at least the pages its rows took (measured in the
same transaction; over the share, it is rolled back).
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, reinvite
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import make_request, make_response
from tests.unit.test_review35 import NEW_SDP, _call, world  # noqa: F401  (fixture)

OK_HEADERS = [("Contact", "<sip:bob@127.0.0.1:5061>")]


def _in_dialog(world, method: str, sender: str, receiver: str, call_id: str, cseq: int,
               from_tag: str, to_tag: str):
    return make_request(method, f"sip:{receiver}@127.0.0.1:5061", from_uri=world.aor(sender),
                        to_uri=world.aor(receiver), call_id=call_id, cseq=cseq,
                        from_tag=from_tag, to_tag=to_tag)


def _alices_reinvite(world, alice, bob, call_id: str, cseq: int = 2):
    """alice's re-INVITE after the call's keys aged out: a fresh key, offered for reuse;
    bob's engine opens it (and keeps the key, ``received_in`` its CSeq)."""
    sent = alice.protect(reinvite(world, "alice", "bob", call_id, cseq, "a1", "b1", sdp=NEW_SDP))
    assert not sent.info.key_reuse
    return bob.open(sent.message).message


def _opens(engine, message) -> bool:
    try:
        engine.open(message)
    except E2MError:
        return False
    return True


def _alices_next_reinvite_opens_at_bob(world, alice, bob, call_id: str, cseq: int) -> bool:
    out = alice.protect(reinvite(world, "alice", "bob", call_id, cseq, "a1", "b1", sdp=NEW_SDP))
    return _opens(bob, out.message)


# -- a 2xx of the same CSeq number, another method, confirms the key ---------------------

def _cancelled(world, alice, bob, call_id: str, got, confirm: str) -> None:
    """alice CANCELs her re-INVITE (CSeq 2): pjsip at bob answers the CANCEL 200 and the
    re-INVITE 487.  ``confirm``: which 2xx of CSeq number 2 alice's engine sees first."""
    if confirm == "200 CANCEL":
        cancel = _in_dialog(world, "CANCEL", "alice", "bob", call_id, 2, "a1", "b1")
        alice.protect(cancel)
        ok = bob.protect(make_response(bob.open(cancel).message, 200, "OK")).message
    else:                                       # a hop's stray 200 naming CSeq 2
        other = _in_dialog(world, "OPTIONS", "alice", "bob", call_id, 2, "a1", "b1")
        ok = make_response(other, 200, "OK")
    alice.open(ok)
    terminated = bob.protect(make_response(got, 487, "Request Terminated")).message
    alice.open(terminated)


@pytest.mark.parametrize("confirm", ["200 CANCEL", "stray 200 OPTIONS"])
def test_hole_a_cancelled_reinvites_key_is_confirmed_by_the_200_to_its_cancel(world, confirm):
    """Attacker: nobody (alice, or her app, CANCELs a re-INVITE that takes long: pjsip at
    bob answers the CANCEL 200 and the re-INVITE 487, in that order, as RFC 3261 §9.2
    says), or the untrusted hop, which sends alice a stray 200 naming the dialog and the
    re-INVITE's CSeq number under any method (``open`` settles before pjsip drops a
    response matching no transaction), then makes the re-INVITE fail (answers 491).

    Attack: once the call's keys aged out, alice's re-INVITE (CSeq 2) offers a fresh key.
    ``DialogKeys.settle`` confirms it on the ``200 CANCEL`` (``offered_in`` is the CSeq
    number, and ``2 CANCEL`` has the number 2); the 487 then drops only unconfirmed keys,
    so alice keeps it.  Bob's engine drops it on his 487 (``answered``, review 35).

    Effect: alice's next re-INVITE (hold, resume, a session-timer refresh) goes under a
    key bob does not have: 493 and a retry, every time a re-INVITE of hers was CANCELled
    (review 35's hole, from the offerer's side).  Were her next body a 200 (answering
    bob's re-INVITE), bob could not open it at all and would drop it.

    Fix: ``offered_in`` keeps the request's whole CSeq (number and method) and ``settle``
    confirms only on a 2xx whose CSeq is that (a 2xx to CANCEL confirms nothing); and only
    for a response to a request we sent (``_sent_for``), as ``_ends_dialog`` does."""
    call_id = f"r36-cancel-{confirm.split()[1]}@x"
    clock, alice, bob = _call(world, call_id)
    got = _alices_reinvite(world, alice, bob, call_id)
    _cancelled(world, alice, bob, call_id, got, confirm)
    assert _alices_next_reinvite_opens_at_bob(world, alice, bob, call_id, 3)


def test_control_a_reinvite_refused_488_leaves_no_key_at_either_side(world):
    """The same re-INVITE failing without a CANCEL (bob answers 488): both sides drop the
    key (review 35), and alice's next re-INVITE opens at bob."""
    call_id = "r36-488@x"
    clock, alice, bob = _call(world, call_id)
    got = _alices_reinvite(world, alice, bob, call_id)
    alice.open(bob.protect(make_response(got, 488, "Not Acceptable Here")).message)
    assert _alices_next_reinvite_opens_at_bob(world, alice, bob, call_id, 3)


def test_control_a_reinvite_answered_200_keeps_the_key_at_both_sides(world):
    call_id = "r36-200@x"
    clock, alice, bob = _call(world, call_id)
    got = _alices_reinvite(world, alice, bob, call_id)
    ok = bob.protect(make_response(got, 200, "OK", OK_HEADERS, SDP_ANSWER,
                                   "application/sdp")).message
    assert _opens(alice, ok)
    nxt = alice.protect(reinvite(world, "alice", "bob", call_id, 3, "a1", "b1", sdp=NEW_SDP))
    assert nxt.info.key_reuse                  # the re-INVITE's key, confirmed by its 200
    assert _opens(bob, nxt.message)


# -- a failure to another request (or a stray one) drops the pending re-INVITE's key -----

def _failure_meanwhile(world, alice, bob, call_id: str, kind: str):
    if kind == "bob's 405 to alice's INFO":
        info = _in_dialog(world, "INFO", "alice", "bob", call_id, 3, "a1", "b1")
        alice.protect(info)
        return bob.protect(make_response(bob.open(info).message, 405, "Method Not Allowed")).message
    stray = _in_dialog(world, "OPTIONS", "alice", "bob", call_id, 77, "a1", "b1")
    return make_response(stray, 481, "Call/Transaction Does Not Exist")   # a hop's forgery


@pytest.mark.parametrize("kind", ["bob's 405 to alice's INFO", "a hop's stray 481"])
def test_hole_a_failure_to_another_request_drops_the_pending_reinvites_key(world, kind):
    """Attacker: the untrusted hop (or anyone who learnt the dialog's Call-ID and tags:
    no transaction is needed), which sends alice a stray 481 naming the dialog under any
    CSeq while her re-INVITE is pending; or nobody: alice sends an INFO (DTMF) or a
    MESSAGE inside the call while her re-INVITE is pending and bob's pjsip answers it
    405/415/488.

    Attack: alice's re-INVITE (CSeq 2, the call's keys aged out) offers a fresh key, which
    bob keeps at ``open``.  The failure reaches alice's ``open`` first: ``settle`` drops
    every unconfirmed key of the dialog on a failure of any CSeq, so the re-INVITE's
    key goes at alice.  Bob answers the re-INVITE 200 and, as the newest key of the
    dialog, seals its SDP answer under it (``reusable``: they read the offer, they read
    the answer).

    Effect: alice cannot open bob's 200 (``open`` raises; the phone drops it, ``_refuse``):
    bob retransmits it for 32 s, every copy dropped, alice's re-INVITE times out, no ACK
    reaches bob, and pjsip ends the call on both sides (RFC 3261 §13.3.1.4).  A hold, a
    resume or a session-timer refresh ends the call.

    Fix: ``settle`` drops on a failure only the keys offered in the request it answers
    (``offered_in`` == the response's CSeq, number and method; keys offered in responses
    are not dropped by a failure to another request), and only for a response to a
    request we sent (``_sent_for``): a stray answer settles nothing."""
    call_id = "r36-fail-" + kind.split()[-1] + "@x"
    clock, alice, bob = _call(world, call_id)
    got = _alices_reinvite(world, alice, bob, call_id)
    alice.open(_failure_meanwhile(world, alice, bob, call_id, kind))
    ok = bob.protect(make_response(got, 200, "OK", OK_HEADERS, SDP_ANSWER, "application/sdp"))
    assert ok.info.key_reuse                   # under the key alice offered
    assert _opens(alice, ok.message)


def test_control_the_failure_after_the_200_leaves_the_key(world):
    """The same failure after bob's 200 reached alice: the key was confirmed, it stays,
    and bob's next body under it opens."""
    call_id = "r36-after@x"
    clock, alice, bob = _call(world, call_id)
    got = _alices_reinvite(world, alice, bob, call_id)
    ok = bob.protect(make_response(got, 200, "OK", OK_HEADERS, SDP_ANSWER, "application/sdp"))
    assert ok.info.key_reuse and _opens(alice, ok.message)
    alice.open(_failure_meanwhile(world, alice, bob, call_id, "a hop's stray 481"))
    later = bob.protect(reinvite(world, "bob", "alice", call_id, 1, "b1", "a1", sdp=SDP_ANSWER))
    assert later.info.key_reuse and _opens(alice, later.message)


# -- the archive spool: what a share weighs against the pages it takes ---------------------

from kamailio_app.archive_spool import answer_share  # noqa: E402
from e2m_plugins.sip import MAX_ID_OCTETS  # noqa: E402
from tests.unit.test_review34 import _alices_message, _through, proxy  # noqa: E402,F401

_MIB = 1024 * 1024


def _many_lines_sdp(lines: int = 64) -> bytes:
    """An offer of ``lines`` tiny ``m=`` sections (``sdp.MAX_MEDIA`` is 64): 1.5 KB."""
    head = ["v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "c=IN IP4 192.0.2.1", "t=0 0"]
    media = ["m=audio %d RTP/AVP 0" % (4000 + 2 * n) for n in range(lines)]
    return ("\r\n".join(head + media) + "\r\n").encode()


def _strangers_invite_with_call_id(world, n: int, call_id_len: int):
    from e2m_plugins.sip import make_request
    call_id = (f"junk-{n:05d}-" + "x" * call_id_len)[:call_id_len - len("@rival.example")] \
        + "@rival.example"
    return make_request("INVITE", world.aor("bob"), from_uri=f"sip:eve{n}@rival.example",
                        to_uri=world.aor("bob"), call_id=call_id, from_tag=f"e{n}",
                        body=_many_lines_sdp(), content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:eve@192.0.2.1>")])


def _answer_through(proxy, archive, response):
    """What kemi does with an answer (``route_reply``, ``ProxyApp.observe``): a stray
    one, or one to a stranger's call, is charged to ``answer_share(None)``."""
    from kamailio_app.archive import content_uid
    from kamailio_app.bootstrap import _identity, body_records, media_records
    verdict = proxy.inspect(response)
    bodies = body_records(response, verdict.seen)
    media = media_records(response, verdict.media)
    assert media
    archive.record(bodies, media, uid=content_uid(_identity(response), bodies, media),
                   share=answer_share(None))


def _strangers_flood_then_alice(world, proxy, tmp_path, call_id_len: int):
    """During an outage, a stranger fills both shares he has: the unauthenticated
    callers' (his INVITEs) and the answers to them (200s with the same offer, from a
    callee he runs, or stray ones at a cluster node's shared address)."""
    from tests.cluster.test_cluster_units import _spooled
    archive, shared, lines = _spooled(tmp_path, max_bytes=8 * _MIB)
    shared.down = True
    for n in range(400):                     # until both his shares are full
        if archive.events.counts.get("e2m_archive_lost", 0) >= 4:
            break
        invite_ = _strangers_invite_with_call_id(world, n, call_id_len)
        share, _, _ = _through(proxy, archive, invite_)
        assert share == "unauthenticated:"
        _answer_through(proxy, archive, make_response(
            invite_, 200, "OK", [("Contact", "<sip:eve@192.0.2.9>")], _many_lines_sdp(),
            "application/sdp"))
    strangers_lost = archive.events.counts.get("e2m_archive_lost", 0)
    _alices_message(world, proxy, archive, b"alice's report")
    alice_lost = archive.events.counts.get("e2m_archive_lost", 0) - strangers_lost
    return archive, strangers_lost, alice_lost, lines


def test_control_a_strangers_two_shares_of_many_line_offers_leave_alice_room(world, proxy,
                                                                             tmp_path):
    """The same flood with Call-IDs of an ordinary length: both of the stranger's shares
    fill (his later messages are lost), and alice's signed MESSAGE is spooled."""
    archive, strangers_lost, alice_lost, lines = _strangers_flood_then_alice(
        world, proxy, tmp_path, 60)
    assert strangers_lost > 0
    assert alice_lost == 0, lines[-1][1]


def test_hole_long_call_ids_make_each_share_take_five_times_its_weight_in_pages(
        world, proxy, tmp_path):
    """Attacker: off-path sender (a stranger: plaintext INVITEs to bob are never
    challenged; the answers to his calls come from a callee he runs, or are stray 200s
    sent to a cluster node), during a database outage.  Equally one insider (her own
    share and the answers to her calls), or two insiders' accounts.

    Attack: INVITEs whose Call-ID is 1000 octets (``sip.MAX_ID_OCTETS`` is 1024) with an
    offer of 64 tiny ``m=`` lines (1.5 KB), each answered by a 200 with the same offer:
    every media row repeats the Call-ID, 128 rows a call.

    Effect: ``message_weight`` counts the Call-ID's octets once a row, but SQLite keeps
    it twice (the row and ``media_call_id``), and an index entry over ~1000 octets
    (``maxLocal`` of a 4 KiB index page) spills its tail to an overflow page of its own:
    4 KiB for 500 octets.  The rows take 5.3 times their weight in pages (measured: 5.31
    at 1000 octets, 2.1 at 990, 1.2 at 100), so each share's 12 % of the weight bound
    is 64 % of the node's page bound: the stranger's two shares fill the whole spool,
    and alice's signed MESSAGE (her own share, empty) is lost: "the spool is full".
    The share per sender promised that a stranger's flood loses only the strangers'
    messages; at the defaults (256 MiB, 12 %) the stranger needs ~400 INVITEs.

    Fix: weigh what the rows take in SQLite, not their columns' octets: count the
    indexed columns twice and round an indexed value over ~900 octets up to a page
    (or weigh each message by the pages it added, ``PAGES_IN_USE_SQL`` before and after
    the insert inside ``hold``'s transaction, and refuse it past the share); or store
    and index a bounded Call-ID (its SHA-256 past 64 octets, as ``bounded_keeper`` does)."""
    assert MAX_ID_OCTETS >= 1000
    archive, strangers_lost, alice_lost, lines = _strangers_flood_then_alice(
        world, proxy, tmp_path, 1000)
    print(f"\nstrangers' lost: {strangers_lost}; pages {archive.spool.size_bytes()}; "
          f"last: {lines[-1][1] if lines else '-'}")
    assert alice_lost == 0, "alice's message was lost: " + lines[-1][1]

