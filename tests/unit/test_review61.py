"""A sixty-first attacker's review (December 2026) of 55dfdaa: the archive and the
cluster, core half (``kamailio_app.bootstrap.ProxyApp.observe``, ``content_uid``,
``archive_spool.answer_share``).  The wire halves, on two real Kamailio nodes and a real
PostgreSQL: ``tests/cluster/test_review61_cluster.py``.

How a node archives an answer depends on whether it holds the request's transaction.
Node A (it relayed alice's INVITE) passes ``observe`` the responder and where the
request went (``$avp(e2m_callee)``, ``$avp(e2m_sent_to)``) and the caller
(``$avp(e2m_caller)``); node B, reached by the same answer as a stray reply (the
floating address moved, a front, a retransmission, or a hop's copy), passes none of
them.

Hole 1 (``test_hole_one_answer_gets_two_message_uids_at_two_nodes``): attacker: the
untrusted hop between bob and the domain, or bob himself (an insider callee).  Message:
bob's signed 200, as A archived it, sent again to B.  Effect: ``content_uid`` digests
``request_uri`` (None at B) and ``from_uri``, so the same answer gets a second uid and a
second row in the shared archive (threat model: "stored once on any worker or node").

Hole 2 (``test_hole_a_legitimate_answer_at_the_other_node_shares_the_strangers_share``):
attacker: an off-path stranger during a database outage.  Messages: plaintext stray
200s to INVITEs nobody sent.  Effect: B charges them to ``answer_share(None)``, and it
charges bob's genuine, signed and bound answer to alice's call to the very same share
(no transaction AVP), so the stranger's strays spend the share the legitimate answer
needs: it is lost (wire: ``test_hole_a_strangers_stray_answers_lose_alices_answer_...``).

Hole 4 (``test_hole_a_content_id_with_escape_sequences_rewrites_the_shown_sender``):
attacker: an off-path sender (a From of another domain is never challenged).  Message:
a plaintext MESSAGE to bob, a multipart/mixed whose text part's Content-ID holds
terminal escape sequences (the MIME parser refuses only CR and NUL in part headers).
Effect: the cid is archived as is and ``e2m archive show`` prints it raw: on the
operator's terminal the row's "from" line reads alice (cursor up, erase, rewrite).
Wire: ``tests/kamailio/test_review61_wire.py``.

Tried and held: a copy at the same node gets the same uid (control); at A the answer is
charged to "answers to alice" (control); the request rows of one MESSAGE at two nodes
get one uid (control; the second copy is refused by the replay claims anyway); SIP
headers and SDP lines with control characters are refused by the core; NUL in a part
header is refused.

Fixed (stop 31): a response's uid leaves out what the reading node kept with the
transaction (its sender and Request-URI), so every copy of one answer is one row, the
first recorded; a cluster's stray reply is charged to the answers of the signer its
body is bound by (``answer_share(signer=)``), never to the share a stranger's unsigned
strays fill; a part header with a control character is MalformedError (400 at the
proxy) and ``e2m archive list``/``show`` print every field escaped
(``e2m_plugins.cli.printable``, moved from the phone's printer).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from e2m_plugins.proxy import UNAUTHENTICATED_CALLER, SeenBody, Verdict
from e2m_plugins.sip import make_request, make_response
from kamailio_app.archive_spool import answer_share
from kamailio_app.bootstrap import ProxyApp

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"
SDP = (b"v=0\r\no=bob 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 3456 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


class _Recorder:
    """An archive that keeps what ``record`` was asked to store, keyed by uid."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple] = {}
        self.shares: list[str | None] = []

    def record(self, bodies, media=(), *, uid=None, may_spool=True, share=None):
        self.rows.setdefault(uid, (bodies, media))
        self.shares.append(share)
        return uid


def _app() -> tuple[ProxyApp, _Recorder]:
    store = _Recorder()
    config = SimpleNamespace(archive=SimpleNamespace(fail_request_on_error=False))
    return ProxyApp(config, engine=None, archive=store, events=None), store   # type: ignore[arg-type]


def _invite():
    return make_request("INVITE", BOB, from_uri=ALICE, to_uri=BOB, call_id="r61@127.0.0.1",
                        from_tag="a1", body=b"offer", content_type="application/sdp")


def _bobs_answer():
    ok = make_response(_invite(), 200, "OK", [], SDP, "application/sdp")
    # bob's signed, bound answer, as the engine reports it at either node
    seen = (SeenBody(None, "application/sdp", SDP, True, "valid", BOB, bound=True),)
    return ok, Verdict("forward", seen=seen)


def _at_a(app, message, verdict):
    # kemi at the node holding the transaction: responder and sent_to from the AVPs
    app.observe(message, verdict, responder=BOB, sent_to=BOB, share=ALICE)


def _at_b(app, message, verdict):
    # kemi at the other node (route_stray_reply): no transaction, no AVPs
    app.observe(message, verdict, responder=None, sent_to=None, share=None, stray=True)


def test_control_a_copy_of_an_answer_at_the_same_node_is_one_message():
    app, store = _app()
    ok, verdict = _bobs_answer()
    _at_a(app, ok, verdict)
    _at_a(app, ok, verdict)
    assert len(store.rows) == 1


def test_control_the_request_rows_of_one_message_at_two_nodes_are_one_message():
    app, store = _app()
    request = _invite()
    seen = (SeenBody(None, "application/sdp", b"offer", True, "valid", ALICE, bound=True),)
    verdict = Verdict("forward", seen=seen)
    app.observe(request, verdict, responder=None, sent_to=BOB, share=ALICE)
    app.observe(request, verdict, responder=None, sent_to=BOB, share=ALICE)
    assert len(store.rows) == 1


def test_hole_one_answer_gets_two_message_uids_at_two_nodes():
    app, store = _app()
    ok, verdict = _bobs_answer()
    _at_a(app, ok, verdict)
    _at_b(app, ok, verdict)
    assert len(store.rows) == 1, [(b[0].from_uri, b[0].request_uri) for b, _ in store.rows.values()]


def test_control_at_the_node_with_the_transaction_the_answer_is_charged_to_alices_share():
    app, store = _app()
    ok, verdict = _bobs_answer()
    _at_a(app, ok, verdict)
    assert store.shares == [answer_share(ALICE)] and answer_share(ALICE) != answer_share(None)


def test_hole_a_legitimate_answer_at_the_other_node_shares_the_strangers_share():
    app, store = _app()
    stray = make_request("INVITE", "sip:nobody@stranger.example",
                         from_uri="sip:mallory@stranger.example",
                         to_uri="sip:nobody@stranger.example", call_id="stray@x", from_tag="m")
    stray_ok = make_response(stray, 200, "OK", [], SDP, "application/sdp")
    plain = Verdict("forward", seen=(SeenBody(None, "application/sdp", SDP, False, "none", None),))
    _at_b(app, stray_ok, plain)                  # the stranger's
    ok, verdict = _bobs_answer()
    _at_b(app, ok, verdict)                      # bob's genuine answer to alice
    strangers, bobs = store.shares
    assert strangers == answer_share(UNAUTHENTICATED_CALLER)
    assert bobs != strangers


# --------------------------------------------------------------------------- hole 4

# ``e2m archive show`` prints cid ten lines below from: go up ten, write a "from" line of
# our choosing over the real one, come back down and write an ordinary-looking cid line
_FORGED_CID = ("x\x1b[10A\x1b[1G\x1b[2Kfrom          sip:alice@example.com"
               "\x1b[10B\x1b[1G\x1b[2Kcid           note1@stranger.example")


def _screen(text: str) -> list[str]:
    """What a VT100-style terminal shows for ``text``: the few sequences used here
    (cursor up/down ``A``/``B``, column ``G``, erase line ``2K``), printable text, and
    newlines."""
    import re
    lines, row, col = [[]], 0, 0
    for token in re.findall(r"\x1b\[\d*[A-Za-z]|\n|.", text, re.S):
        if token == "\n":
            row, col = row + 1, 0
        elif token.startswith("\x1b["):
            n, op = int(token[2:-1] or 1), token[-1]
            row = max(0, row - n) if op == "A" else row + n if op == "B" else row
            col = n - 1 if op == "G" else col
            if op == "K":
                while len(lines) <= row:
                    lines.append([])
                lines[row] = []
            continue
        else:
            while len(lines) <= row:
                lines.append([])
            line = lines[row]
            line.extend(" " * (col - len(line)))
            line[col:col + 1] = [token]
            col += 1
        while len(lines) <= row:
            lines.append([])
    return ["".join(line) for line in lines]


@pytest.fixture(scope="module")
def world():
    from e2m_lab.flows import TRUSTED
    from e2m_plugins.testpki import init_test_pki
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


def _strangers_message_shown(world, tmp_path, capsys, content_id: str) -> str:
    """An off-path stranger's plaintext MESSAGE to bob (a From of another domain: never
    challenged), a multipart/mixed with one text part whose Content-ID is
    ``content_id``, through a proxy that views MESSAGE; archived as kemi archives it;
    then ``e2m archive show 1`` as the operator runs it: what it printed."""
    from e2m_lab.flows import TRUSTED, proxy_engine
    from e2m_plugins.cli import main as e2m_main
    from kamailio_app.archive import Archive
    from kamailio_app.bootstrap import body_records
    body = (b"--XX\r\nContent-Type: text/plain\r\nContent-ID: <" + content_id.encode()
            + b">\r\n\r\nmeet me at noon\r\n--XX--\r\n")
    request = make_request("MESSAGE", BOB, from_uri="sip:eve@stranger.example",
                           to_uri=BOB, body=body, content_type="multipart/mixed;boundary=XX")
    verdict = proxy_engine(world, TRUSTED, view=("MESSAGE:*",)).inspect(request)
    assert verdict.action == "forward" and len(verdict.seen) == 1, verdict
    db = tmp_path / "archive.sqlite"
    Archive(db).record(body_records(request, verdict.seen))
    capsys.readouterr()
    assert e2m_main(["archive", "show", "1", "--db", str(db)]) == 0
    return capsys.readouterr().out


def test_control_an_archived_part_is_shown_with_its_sender_and_content_id(world, tmp_path,
                                                                           capsys):
    shown = _strangers_message_shown(world, tmp_path, capsys, "note1@stranger.example")
    screen = _screen(shown)
    assert "from          sip:eve@stranger.example" in screen
    assert "cid           note1@stranger.example" in screen
    # the emulator renders a forged cid as the hole's effect (checked on a plain string)
    assert "from          sip:alice@example.com" in _screen("from          sip:eve\n" * 1
                                                            + "\n" * 9 + _FORGED_CID)


def test_hole_a_content_id_with_escape_sequences_rewrites_the_shown_sender(world, tmp_path,
                                                                            capsys):
    """Fixed twice: the core refuses a part header with a control character (the proxy
    answers 400, nothing is archived), and ``e2m archive show`` escapes what a stored
    row holds (a row from before, any other field)."""
    from e2m_lab.flows import TRUSTED, proxy_engine
    from e2m_plugins.cli import main as e2m_main
    from kamailio_app.archive import Archive, BodyRecord
    body = (b"--XX\r\nContent-Type: text/plain\r\nContent-ID: <" + _FORGED_CID.encode()
            + b">\r\n\r\nmeet me at noon\r\n--XX--\r\n")
    request = make_request("MESSAGE", BOB, from_uri="sip:eve@stranger.example",
                           to_uri=BOB, body=body, content_type="multipart/mixed;boundary=XX")
    verdict = proxy_engine(world, TRUSTED, view=("MESSAGE:*",)).inspect(request)
    assert (verdict.action, verdict.code, verdict.error) == ("reply", 400, "MalformedError")
    db = tmp_path / "archive.sqlite"
    Archive(db).record([BodyRecord(call_id="r61@x", from_uri="sip:eve@stranger.example",
                                   to_uri=BOB, method="MESSAGE", direction="request",
                                   content_type="text/plain", plaintext=b"meet me at noon",
                                   sha256="0" * 64, signature="none", cid=_FORGED_CID)])
    capsys.readouterr()
    assert e2m_main(["archive", "show", "1", "--db", str(db)]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\\x1b[10A" in shown
    screen = _screen(shown)
    # the operator's terminal must show the row's real sender (the phone's cli.Printer
    # escapes such octets as \x1b; the archive tool prints the stored cid raw)
    assert "from          sip:eve@stranger.example" in screen, screen[:16]
