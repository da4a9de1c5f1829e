"""Review 32 (an attacker's review of the cluster and the shared archive): the node's
spool while PostgreSQL is away.

The spool (``kamailio_app/archive_spool.py``) is an SQLite file bounded by
``spool_max`` messages and ``spool_max_mb`` MiB.  The stand-in database and the
record helpers are the cluster unit tests' (``tests/cluster/test_cluster_units.py``).
"""

from __future__ import annotations

import pytest

from dataclasses import replace

from tests.cluster.test_cluster_units import _body, _spooled

_MIB = 1024 * 1024
# A stranger's plaintext MESSAGE to one of our users is never challenged, and a proxy
# that views MESSAGE archives it (signature "none"); ~30 KB of text each.
_BIG = b"A" * 30_000


def _fill_by_bytes(archive, sender: str = "mallory") -> int:
    """Spool big messages until the byte bound refuses one; how many went in."""
    n = 0
    while archive.events.counts.get("e2m_archive_lost", 0) == 0:
        archive.record([_body(b"%s %d " % (sender.encode(), n) + _BIG,
                              call_id=f"{sender}-{n}@x")])
        n += 1
    return n - 1


def _drain(archive) -> None:
    for _ in range(100):
        if not archive.pending():
            return
        archive.replay()
    raise AssertionError("the spool did not drain")


def test_control_an_outage_below_the_byte_bound_spools_again_after_a_drain(tmp_path):
    """Without the attack: an outage that never reaches ``spool_max_mb``; after the
    database came back and the spool drained, the next outage spools as before."""
    # one sender: what is tested is the node's bound (the share is tested below)
    archive, shared, _ = _spooled(tmp_path, max_bytes=1 * _MIB, share_percent=100)
    shared.down = True
    for n in range(5):
        archive.record([_body(b"m%d " % n + _BIG, call_id=f"m{n}@x")])
    shared.down = False
    _drain(archive)
    shared.down = True
    archive.record([_body(b"alice's message", call_id="alice@x")])
    assert archive.pending() == 1
    assert archive.events.counts.get("e2m_archive_lost", 0) == 0


def test_hole_a_spool_filled_once_by_bytes_never_takes_a_message_again(tmp_path):
    """Attacker: an off-path sender (a stranger's plaintext MESSAGE to one of our users
    is never challenged and is archived), or any insider; no attack is needed at all
    beyond one long enough outage with big bodies.

    Attack: while the shared database is away (one outage, minutes), send ~30 KB
    MESSAGEs (pike's 30 per 2 s per address is enough: 256 MiB is ~9,000 of them,
    fewer with 60 KB bodies) until the spool reaches ``spool_max_mb``.

    Effect: ``SpooledArchive._to_spool`` bounds the spool by ``spool.size_bytes()``,
    ``page_count * page_size`` of the SQLite file.  SQLite keeps deleted pages on its
    free list (no ``auto_vacuum``, no ``VACUUM``): after the database is back and the
    replay has emptied the spool, the file is as big as before, so at the next outage
    (even a one-second flap) every message of every user is "lost: the spool is full
    (0 messages)", until an operator vacuums the file by hand.  Here: 1 MiB bound,
    33 messages spooled and replayed, then the spool is empty and alice's message of
    the next outage is lost.

    Fix: bound what the spool holds, not the file: sum ``length(plaintext)`` (or
    ``(page_count - freelist_count) * page_size``), or ``PRAGMA auto_vacuum =
    INCREMENTAL`` with ``incremental_vacuum`` after a drain (or ``VACUUM`` when the spool
    empties)."""
    # one sender: what is tested is the node's bound (the share is tested below)
    archive, shared, lines = _spooled(tmp_path, max_bytes=1 * _MIB, share_percent=100)
    shared.down = True
    assert _fill_by_bytes(archive) > 10
    shared.down = False
    _drain(archive)
    assert archive.pending() == 0 and archive.events.counts["e2m_archive_lost"] == 1
    shared.down = True                      # the next outage: a short flap
    archive.record([_body(b"alice's message", call_id="alice@x")])
    assert archive.events.counts["e2m_archive_lost"] == 1, lines[-1]
    assert archive.pending() == 1


def test_control_the_spool_takes_every_users_messages_during_an_outage(tmp_path):
    """Without the attack: ordinary traffic of several users during an outage is spooled
    and replayed whole."""
    archive, shared, _ = _spooled(tmp_path, max_messages=100)
    shared.down = True
    for n in range(10):
        archive.record([replace(_body(b"bob %d" % n, call_id=f"bob-{n}@x"),
                                from_uri="sip:bob@example.com")])
    archive.record([_body(b"alice's message", call_id="alice@x")])
    shared.down = False
    _drain(archive)
    assert b"alice's message" in [r.plaintext for r in shared.bodies(limit=100)]


def test_hole_one_sender_fills_the_spool_and_everyone_elses_messages_are_lost(tmp_path):
    """Attacker: an off-path sender (plaintext MESSAGEs to one of our users, never
    challenged, archived with signature "none") or one insider.

    Attack: while the shared database is away, send MESSAGEs at pike's rate (15 a second
    from one address is ~11 minutes for ``spool_max`` = 10,000; 30 KB bodies reach
    ``spool_max_mb`` = 256 MiB in ~10 minutes; more addresses, less time).

    Effect: the spool's bounds are for the node as a whole: once they are reached, every
    later message of every user (alice's signed MESSAGE, every call's SDP and media
    rows) is "lost: the spool is full" for the rest of the outage, and with the hole
    above, for good.  The attacker's junk is what the shared archive gets back.  Here
    (``spool_max`` = 20): mallory's 20 messages are spooled, alice's is lost.

    Fix: a share of the spool per sender, as the key cache does per keeper (the AoR
    digest or a signature proved, else one shared group for unauthenticated/plaintext
    senders, e.g. at most 1/8 of each bound): past its share a sender's own messages
    are lost, never another's.

    Fixed: ``[archive] spool_share`` (12 % of each bound by default) per share; who pays
    is passed with the rows (``share``: the transaction's authenticated caller, else the
    one unauthenticated group, which the stranger's ``record`` without one falls in).
    alice's message, sent as the proxy's caller for her, now goes in.
    ``tests/cluster/test_spool_share_wire.py`` shows it on a real node."""
    archive, shared, _ = _spooled(tmp_path, max_messages=20)
    shared.down = True
    for n in range(40):                    # the stranger's flood
        archive.record([replace(_body(b"junk %d" % n, call_id=f"junk-{n}@x"),
                                from_uri="sip:eve@example.net", signature="none")])
    archive.record([_body(b"alice's message", call_id="alice@x")],
                   share="sip:alice@example.com")
    assert archive.events.counts["e2m_archive_lost"] == 40 - 2     # 12 % of 20: two
    shared.down = False
    _drain(archive)
    assert b"alice's message" in [r.plaintext for r in shared.bodies(limit=100)]


# --------------------------------------------------------------------------- whom a row names

V_MESSAGE = ("MESSAGE:*",)


@pytest.fixture(scope="module")
def world():
    from e2m_lab.flows import TRUSTED
    from e2m_plugins.testpki import init_test_pki
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="ec")


def _message_through_the_proxy(world, *, to: str, request_uri: str, seal_for: str):
    """alice's signed, encrypted MESSAGE with ``To: <to>`` and Request-URI ``request_uri``,
    sealed for ``seal_for`` (her own client picks whose certificate a To AoR gets), through
    a proxy that views MESSAGE: (proxy verdict, archive rows, what was forwarded)."""
    from e2m_lab.flows import TRUSTED, apply_forward, known_proxy, message, proxy_engine, ua_engine
    from e2m_plugins.sip import RequestLine
    from kamailio_app.bootstrap import body_records
    proxy = proxy_engine(world, TRUSTED, view=V_MESSAGE)
    alice = ua_engine(world, "alice", peers=("bob", "carol"),
                      proxies=(known_proxy(world, TRUSTED, V_MESSAGE),))
    own = alice.certs.user
    alice.certs.user = lambda aor: (world.user(seal_for).cert if aor == world.aor(to)
                                    else own(aor))
    request = message(world, b"the plans", sender="alice", recipient=to)
    request = request.with_start_line(RequestLine("MESSAGE", request_uri))
    sent = alice.protect(request).message
    verdict = proxy.inspect(sent)
    return verdict, body_records(sent, verdict.seen), apply_forward(sent, verdict)


def _bob(world):
    from e2m_lab.flows import TRUSTED, known_proxy, ua_engine
    return ua_engine(world, "bob", peers=("alice", "carol"),
                     proxies=(known_proxy(world, TRUSTED, V_MESSAGE),))


def test_control_a_message_to_bob_is_archived_as_to_bob(world):
    verdict, rows, forwarded = _message_through_the_proxy(
        world, to="bob", request_uri=f"sip:bob@{world.domain}", seal_for="bob")
    assert verdict.action == "forward" and rows[0].signature == "valid"
    assert (rows[0].from_uri, rows[0].to_uri) == (world.aor("alice"), world.aor("bob"))
    assert _bob(world).open(forwarded).message.body == b"the plans"


def test_hole_an_insiders_message_to_bob_is_archived_as_sent_to_carol(world):
    """Attacker: an insider (alice, digest-authenticated, her own client).

    Attack: a MESSAGE with Request-URI ``sip:bob@example.com`` (or any outsider's,
    ``sip:eve@rival.example``: the proxy routes by the Request-URI) and ``To:
    <sip:carol@example.com>``, signed as herself with a signed SIP context that names
    carol as the To AoR (true of the header), encrypted for the proxy and for bob's
    certificate (her client chooses whose key a To AoR gets).

    Effect: the proxy checks the context against the message (To AoR carol: it matches),
    reads, archives and forwards: the row says ``alice -> carol``, signature ``valid``;
    bob (the real recipient) opens it and shows it as alice's.  The archive never
    records the Request-URI, so its reader is told a message went to a colleague that
    went to someone else (to an outsider: an exfiltration the archive books as an
    internal message; or carol is framed as its addressee).

    Fix: record who the message was for: the Request-URI as received (and the target
    the proxy relayed to) in the row; or, for an out-of-dialog request from one of our
    users, refuse a Request-URI whose AoR is not the To AoR (403), or bind the
    Request-URI's AoR in the signed context.  (A UAS could also refuse a request whose
    To is not its own AoR: bob's engine took this one.)"""
    verdict, rows, forwarded = _message_through_the_proxy(
        world, to="carol", request_uri=f"sip:bob@{world.domain}", seal_for="bob")
    assert _bob(world).open(forwarded).message.body == b"the plans"   # bob reads it
    # fixed by recording whom it was sent to: the Request-URI as received (schema 3)
    assert verdict.action == "reply" or rows[0].request_uri == f"sip:bob@{world.domain}", \
        (verdict.action, [(r.from_uri, r.to_uri, r.signature) for r in rows])


def _alices_message_to_eve_and_eves_answer(world, *, to_in_answer: str):
    """alice's plaintext MESSAGE to an outsider (eve@rival.example) through a proxy that
    views MESSAGE, and eve's 200 with a text body and ``To: <to_in_answer>``: the
    archive rows of the 200."""
    from e2m_lab.flows import TRUSTED, proxy_engine
    from e2m_plugins.sip import make_request, make_response
    from kamailio_app.bootstrap import body_records
    proxy = proxy_engine(world, TRUSTED, view=V_MESSAGE)
    request = make_request("MESSAGE", "sip:eve@rival.example", from_uri=world.aor("alice"),
                           to_uri="sip:eve@rival.example", body=b"hi eve",
                           content_type="text/plain")
    assert proxy.inspect(request).action == "forward"
    ok = make_response(request, 200, "OK", [], b"I agree to everything", "text/plain")
    ok = ok.replace("To", f"<{to_in_answer}>;tag=e1")
    verdict = proxy.inspect(ok, caller=world.aor("alice"))
    # kemi keeps whom the request was sent to ($avp(e2m_callee): the Request-URI as
    # received, no Route set followed here) and where ($avp(e2m_sent_to)), and passes them
    return body_records(ok, verdict.seen, responder=request.request_uri,
                        sent_to=request.request_uri)


def test_control_an_outsiders_answer_is_archived_under_the_outsider(world):
    (row,) = _alices_message_to_eve_and_eves_answer(world, to_in_answer="sip:eve@rival.example")
    assert (row.from_uri, row.signature) == ("sip:eve@rival.example", "none")


def test_hole_an_outsiders_answer_is_archived_as_one_of_our_users(world):
    """Attacker: any UAS a request of ours reaches (an outsider alice messages or calls,
    or an insider's own external contact); no account, no certificate.

    Attack: answer alice's MESSAGE to ``sip:eve@rival.example`` with a 200 carrying a
    plaintext text body and ``To: <sip:carol@example.com>;tag=e1`` (tm matches a reply by
    its Via branch, never by To; the proxy reads every response with a body).

    Effect: ``body_records`` takes a response's sender from its To header: the archive
    row says ``carol -> alice``, text "I agree to everything" (signature ``none``).  For a
    request the proxy demands carol's digest before any row names her as the sender
    (review 2: ``carol@example.com.``); for a response, anyone who answers writes rows
    in her name (an INVITE's 200 with a plaintext SDP: an "answer from carol" and its
    media rows the same way).

    Fix: name the responder by what the proxy sent the request to: the request's To
    (tm's ``$T_req(To)``, kept in an AVP as ``e2m_caller`` is) for an unsigned body, and
    archive a response whose To URI is not its request's with the request's (or refuse
    to read it); a signed body's signer stays checked against the To as now."""
    (row,) = _alices_message_to_eve_and_eves_answer(world, to_in_answer="sip:carol@example.com")
    assert row.from_uri != world.aor("carol"), (row.from_uri, row.signature, row.plaintext)
