"""Review 33 (an attacker's review of reviews 31 and 32's fixes), engine level: whom an
answer's archive row names.

Review 32 names an answer's sender by the request's To, kept with the transaction
(``kemi.note_caller`` keeps ``$tu`` in ``$avp(e2m_callee)``, ``observe`` passes it to
``bootstrap.body_records`` as ``responder``).  The To is the caller's to write and is
not where the request went (the Request-URI, or a pre-loaded Route, routes it).  The
wire halves: ``tests/kamailio/test_review33_wire.py`` (bob's honest answer archived as
carol's; a request routed past us archived as sent to carol) and
``tests/cluster/test_review33_cluster.py`` (a stray answer, no transaction, archived
under its own To).  Helpers are review 32's.
"""

from __future__ import annotations

import pytest

from tests.unit.test_review32 import V_MESSAGE, world  # noqa: F401 - the fixture

_EVE = "sip:eve@rival.example"


def _outsiders_answer_rows(world, *, to: str):  # noqa: F811
    """alice's plaintext MESSAGE with Request-URI eve (an outsider) and ``To: <to>``
    through a proxy that views MESSAGE; eve's 200 (a text body; its To copied from the
    request, as RFC 3261 says): the rows of the request and of the answer, the
    responder taken as kemi takes it now (the Request-URI as received)."""
    from e2m_lab.flows import TRUSTED, proxy_engine
    from e2m_plugins.sip import make_request, make_response
    from kamailio_app.bootstrap import body_records
    proxy = proxy_engine(world, TRUSTED, view=V_MESSAGE)
    request = make_request("MESSAGE", _EVE, from_uri=world.aor("alice"), to_uri=to,
                           body=b"shall we?", content_type="text/plain")
    verdict = proxy.inspect(request)
    assert verdict.action == "forward"
    asked = body_records(request, verdict.seen)
    ok = make_response(request, 200, "OK", [], b"I agree to everything", "text/plain")
    answer = proxy.inspect(ok, caller=world.aor("alice"))
    # kemi keeps whom the request was sent to ($avp(e2m_callee): the Request-URI as
    # received, no Route set followed here) and where ($avp(e2m_sent_to)), and passes them
    return asked, body_records(ok, answer.seen, responder=request.request_uri,
                        sent_to=request.request_uri)


def test_control_an_outsiders_answer_to_a_message_to_him_names_him(world):  # noqa: F811
    (asked,), (row,) = _outsiders_answer_rows(world, to=_EVE)
    assert (asked.to_uri, asked.request_uri) == (_EVE, _EVE)
    assert (row.from_uri, row.signature) == (_EVE, "none")


def test_hole_an_insider_makes_an_outsiders_answer_a_colleagues(world):  # noqa: F811
    """Attacker: an insider (alice, her own client) with an outsider who answers (eve at
    rival.example: her own account elsewhere, or a colluder); no forged reply needed,
    eve's UAS is an ordinary one.

    Attack: a MESSAGE (or INVITE) with Request-URI ``sip:eve@rival.example`` and
    ``To: <sip:carol@example.com>``; eve answers 200 with a text body (an INVITE's 200:
    an SDP answer), copying the To.

    Effect: the request's row says ``alice -> carol (sent to eve)`` (review 32), but the
    answer's row says ``carol -> alice``, "I agree to everything", with no
    ``request_uri``: review 32's fix takes the responder from ``$tu``, which the caller
    wrote, so the insider chooses which colleague the archive books an outsider's
    answer (or call acceptance and media) to.  Review 32's fourth hole, moved from the
    answerer to the caller.

    Fix: keep the Request-URI the request was routed by (``$ru`` after lookup, or the
    destination actually relayed to) as the responder, never the To; and write it into
    the answer's row (``request_uri`` for a response: the request's), so the listing
    shows "(sent to ...)" on both."""
    (asked,), (row,) = _outsiders_answer_rows(world, to=world.aor("carol"))
    assert asked.request_uri == _EVE                   # review 32: the request's row holds
    assert row.from_uri != world.aor("carol"), (row.from_uri, row.to_uri, row.request_uri)
