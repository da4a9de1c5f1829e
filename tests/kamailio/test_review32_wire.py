"""Review 32's fourth hole on a real Kamailio: an answer's archive row names whom the
request was sent to (the request's To, kept with the transaction in
``$avp(e2m_callee)``), not the answer's own To, which whoever answers writes.  Seen
failing before the fix (``95cdc94``: the row said carol).  The engine-level half is
``tests/unit/test_review32.py``."""

from __future__ import annotations

import pytest

from e2m_lab.kamailio_harness import RawUas, register_contact
from e2m_lab.wire import transact
from e2m_plugins.sip import SipMessage, make_request, make_response

pytestmark = pytest.mark.kamailio


def _answering_as(to_uri: str):
    def respond(request: SipMessage) -> SipMessage:
        ok = make_response(request, 200, "OK", [], b"I agree to everything", "text/plain")
        return ok.replace("To", f"<{to_uri}>;tag=e1")
    return respond


@pytest.mark.parametrize("answer_to,row_from", [
    ("sip:bob@example.com", "sip:bob@example.com"),        # control: an honest answer
    ("sip:carol@example.com", "sip:bob@example.com"),      # bob writes carol's name
])
def test_an_answers_row_names_whom_the_request_was_sent_to(proxy_factory, answer_to,
                                                           row_from):
    proxy = proxy_factory("r32", view=("MESSAGE:*",))
    bob = RawUas(_answering_as(answer_to))
    try:
        register_contact(proxy, "bob", bob.port)
        request = make_request("MESSAGE", "sip:bob@example.com",
                               from_uri="sip:alice@example.com", to_uri="sip:bob@example.com",
                               body=b"hello bob", content_type="text/plain")
        answer = transact(proxy.port, request, timeout=5)
        assert answer is not None and answer.status == 200
        rows = [(r.direction, r.from_uri, r.plaintext) for r in proxy.archive_rows()]
        assert ("response", row_from, b"I agree to everything") in rows, rows
    finally:
        bob.close()


def test_a_request_row_records_whom_it_was_sent_to(proxy_factory, capsys):
    """Review 32's third hole: a MESSAGE to bob with ``To: carol`` was archived as sent
    to carol and nothing said it went to bob.  The row now keeps the Request-URI as
    received (schema 3), and ``e2m archive list`` shows it where it is not the To."""
    from e2m_plugins.cli import main as e2m_main
    from e2m_plugins.sip import RequestLine
    proxy = proxy_factory("r32-ruri", view=("MESSAGE:*",))
    bob = RawUas()
    try:
        register_contact(proxy, "bob", bob.port)
        request = make_request("MESSAGE", "sip:bob@example.com",
                               from_uri="sip:alice@example.com",
                               to_uri="sip:carol@example.com", body=b"the plans",
                               content_type="text/plain")
        request = request.with_start_line(RequestLine("MESSAGE", "sip:bob@example.com"))
        answer = transact(proxy.port, request, timeout=5)
        assert answer is not None and answer.status == 200
        (row,) = [r for r in proxy.archive_rows() if r.direction == "request"]
        assert (row.to_uri, row.request_uri) == ("sip:carol@example.com", "sip:bob@example.com")
        assert e2m_main(["archive", "list", "--config", str(proxy.config_path)]) == 0
        assert "(sent to sip:bob@example.com)" in capsys.readouterr().out
    finally:
        bob.close()
