"""Review 33 (an attacker's review of review 32's fixes) on a real Kamailio: whom an
answer's archive row names.

Review 32 made the row of an answer name "whom the request was sent to", taking it from
the request's To, kept with the transaction in ``$avp(e2m_callee)`` (``kemi.note_caller``
sets it from ``$tu``).  But the To is written by the caller, and it is not whom the
request was sent to: the proxy routes by the Request-URI, which review 32 records in the
request's row (schema 3) and nowhere in the answer's.  A MESSAGE (or INVITE) to bob with
``To: <sip:carol@example.com>`` reaches bob; bob's answer (RFC 3261 copies the To) is
archived as carol's, and nothing in the answer's row says bob (its ``request_uri`` is
NULL, so ``e2m archive list`` shows no "(sent to ...)" either).  The engine-level half
(an outsider's answer) is ``tests/unit/test_review33.py``.

The holes were strict xfails on ``cb85899`` and are closed (``f2734f1``): the responder
is the Request-URI as received (or the next hop of a Route set past us), both rows keep
where the request went, and a stray unsigned answer names no sender.
"""

from __future__ import annotations

import pytest

from e2m_lab.kamailio_harness import RawUas, register_contact
from e2m_lab.wire import transact
from e2m_plugins.sip import RequestLine, SipMessage, make_request, make_response

pytestmark = pytest.mark.kamailio

_ANSWER = b"I agree to everything"


def _honest_answer(request: SipMessage) -> SipMessage:
    # an ordinary UAS: the 200 copies the request's To (adding its tag)
    return make_response(request, 200, "OK", [], _ANSWER, "text/plain")


def _rows_of_a_message_to_bob(proxy_factory, name: str, *, to_uri: str):
    """alice's plaintext MESSAGE with Request-URI bob and ``To: <to_uri>``; bob (who gets
    it) answers 200 with a text body: the archive rows."""
    proxy = proxy_factory(name, view=("MESSAGE:*",))
    bob = RawUas(_honest_answer)
    try:
        register_contact(proxy, "bob", bob.port)
        request = make_request("MESSAGE", "sip:bob@example.com",
                               from_uri="sip:alice@example.com", to_uri=to_uri,
                               body=b"do you agree?", content_type="text/plain")
        request = request.with_start_line(RequestLine("MESSAGE", "sip:bob@example.com"))
        answer = transact(proxy.port, request, timeout=5)
        assert answer is not None and answer.status == 200
        assert bob.received, "bob never got the MESSAGE"
        return proxy.archive_rows()
    finally:
        bob.close()


def _answer_row(rows):
    (row,) = [r for r in rows if r.direction == "response"]
    assert row.plaintext == _ANSWER
    return row


def test_control_bobs_answer_to_a_message_to_bob_is_archived_as_bobs(proxy_factory):
    row = _answer_row(_rows_of_a_message_to_bob(proxy_factory, "r33-ctl",
                                                to_uri="sip:bob@example.com"))
    assert row.from_uri == "sip:bob@example.com"


def test_hole_bobs_answer_to_a_message_sent_to_bob_is_archived_as_carols(proxy_factory):
    """Attacker: an insider (alice; her own client), or any caller the proxy relays
    (a stranger's plaintext MESSAGE to bob is never challenged).

    Attack: a MESSAGE (or an INVITE) with Request-URI ``sip:bob@example.com`` and
    ``To: <sip:carol@example.com>``.  Bob, an ordinary UAS, answers 200 with a text
    body (or an SDP answer: its media rows the same way), copying the To as RFC 3261
    says.

    Effect: the request's row records ``(sent to sip:bob@example.com)`` (review 32), but
    the answer's row says ``carol -> alice``, "I agree to everything", with
    ``request_uri`` NULL: ``note_caller`` keeps ``$tu`` (the caller's To) as the
    responder, so review 32's fix names the party the caller chose, not whom the
    request went to.  An insider frames carol as having answered (agreed, accepted a
    call and its media); the answerer (bob, or an outsider if the Request-URI was one)
    is named nowhere in the answer's row.

    Fix: keep with the transaction whom the request was routed to (``$ru`` as received,
    or better the AoR the proxy looked up / ``$T_req(ruri)``), not ``$tu``, as the
    responder; and record that Request-URI in the answer's row too (``request_uri``),
    so ``e2m archive list`` shows "(sent to ...)" on the answer.  Or refuse, for an
    out-of-dialog request, a To AoR that is not the Request-URI's AoR."""
    row = _answer_row(_rows_of_a_message_to_bob(proxy_factory, "r33-hole",
                                                to_uri="sip:carol@example.com"))
    assert row.from_uri != "sip:carol@example.com", (row.from_uri, row.to_uri,
                                                     row.request_uri)
    assert "sip:bob@example.com" in (row.from_uri, row.request_uri)


def _message_routed_past_us(proxy_factory, name: str, capsys, *, preloaded: bool):
    """alice's plaintext MESSAGE to carol (Request-URI and To both carol), with (or
    without) a pre-loaded Route set that leads past the proxy to ``eve`` (a host of the
    caller's choosing): (eve's and carol's receipts, the request's row, the archive
    list's text)."""
    from e2m_plugins.cli import main as e2m_main
    proxy = proxy_factory(name, view=("MESSAGE:*",))
    carol, eve = RawUas(_honest_answer), RawUas(_honest_answer)
    try:
        register_contact(proxy, "carol", carol.port)
        route = ([("Route", f"<sip:127.0.0.1:{proxy.port};lr>"),
                  ("Route", f"<sip:127.0.0.1:{eve.port};lr>")] if preloaded else [])
        request = make_request("MESSAGE", "sip:carol@example.com",
                               from_uri="sip:alice@example.com",
                               to_uri="sip:carol@example.com", body=b"the plans",
                               content_type="text/plain", extra_headers=route)
        answer = transact(proxy.port, request, timeout=5)
        assert answer is not None and answer.status == 200
        (row,) = [r for r in proxy.archive_rows() if r.direction == "request"]
        capsys.readouterr()
        assert e2m_main(["archive", "list", "--config", str(proxy.config_path)]) == 0
        return len(eve.received), len(carol.received), row, capsys.readouterr().out, eve.port
    finally:
        carol.close()
        eve.close()


def test_control_a_message_to_carol_goes_to_carol_and_is_archived_so(proxy_factory, capsys):
    to_eve, to_carol, row, listing, _ = _message_routed_past_us(
        proxy_factory, "r33-route-ctl", capsys, preloaded=False)
    assert (to_eve, to_carol) == (0, 1)
    assert (row.to_uri, row.request_uri) == ("sip:carol@example.com",) * 2
    assert "sent to" not in listing


def test_hole_a_message_routed_to_an_outsider_is_archived_as_sent_to_carol(proxy_factory,
                                                                          capsys):
    """Attacker: an insider (alice; with ``[auth]`` any digest-authenticated user may
    follow a Route set past us, ``may_route_onward``; without it, anyone).

    Attack: a MESSAGE (or INVITE) with Request-URI and To ``sip:carol@example.com`` and
    a pre-loaded route set ``Route: <sip:proxy;lr>, <sip:eve.rival.example;lr>``: the
    proxy honours it (``route_target``: ``loose_route`` sets the destination; the
    Request-URI is untouched).

    Effect: the request goes to eve's host, never to carol (carol's phone gets
    nothing), yet the archive row says ``alice -> carol`` with ``request_uri`` carol, so
    ``e2m archive list`` shows no "(sent to ...)": review 32's fix records the
    Request-URI as received, which is not where a loose route sends the request.  An
    insider's exfiltration (the plans, plaintext or encrypted for eve's key) is booked
    as an internal message to a colleague; eve's answer is archived as carol's too
    (see the hole above).

    Fix: record where the proxy actually relayed the request (``$du`` when set, else
    the Request-URI after lookup; the pre-loaded Route set as received), and show it in
    ``e2m archive list``; or refuse, for a request from one of our users to one of our
    users, a Route set that leads past us."""
    to_eve, to_carol, row, listing, eve_port = _message_routed_past_us(
        proxy_factory, "r33-route-hole", capsys, preloaded=True)
    assert (to_eve, to_carol) == (1, 0), "the request did not go to eve's host"
    assert f"127.0.0.1:{eve_port}" in listing, (row.to_uri, row.request_uri, listing)
