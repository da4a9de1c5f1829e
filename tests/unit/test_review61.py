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

Tried and held: a copy at the same node gets the same uid (control); at A the answer is
charged to "answers to alice" (control); the request rows of one MESSAGE at two nodes
get one uid (control; the second copy is refused by the replay claims anyway).
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
    app.observe(message, verdict, responder=None, sent_to=None, share=None)


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


@pytest.mark.xfail(strict=True, reason="review 61: untrusted hop/insider callee, one answer "
                   "read at two nodes gets two message uids (two archive rows)")
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


@pytest.mark.xfail(strict=True, reason="review 61: off-path stranger, a legitimate answer at "
                   "the other node is charged to the share strangers' stray 200s fill")
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
