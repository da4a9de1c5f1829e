"""Review 30's fix on one proxy: what the core will not read as an id (a Call-ID or tag
over ``sip.MAX_ID_OCTETS``) is refused in a request and makes a response unreadable,
without an error trace and without a half-written archive row; since review 64 such a
response is dropped, not relayed unread.  The attack itself (a
stranger's long Call-ID stopping the shared archive) is in
``tests/cluster/test_review30_cluster.py``."""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, SDP_OFFER
from e2m_lab.kamailio_harness import RawUas, register_contact
from e2m_lab.wire import transact
from e2m_plugins.sip import MAX_ID_OCTETS, SipMessage, make_request, make_response

pytestmark = pytest.mark.kamailio


def _bob_answers_with_tag(tag: str):
    def respond(request: SipMessage) -> SipMessage:
        answer = make_response(request, 200, "OK")
        answer = answer.replace("To", f"{request.get('To')};tag={tag}")
        return answer.add("Contact", "<sip:bob@127.0.0.1>").with_body(SDP_ANSWER,
                                                                      "application/sdp")
    return respond


def _plain_invite(call_id: str) -> SipMessage:
    return make_request("INVITE", "sip:bob@example.com", from_uri="sip:eve@example.net",
                        to_uri="sip:bob@example.com", call_id=call_id, body=SDP_OFFER,
                        content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:eve@127.0.0.1>")])


@pytest.mark.parametrize("length,archived", [(40, True), (MAX_ID_OCTETS + 1, False)])
def test_a_callees_over_long_to_tag_makes_its_answer_unreadable(proxy_factory, length,
                                                                 archived):
    proxy = proxy_factory("r30-tag")
    bob = RawUas(_bob_answers_with_tag("b" * length))
    try:
        register_contact(proxy, "bob", bob.port)
        mark = proxy.log_mark()
        answer = transact(proxy.port, _plain_invite(f"r30-{length}@x"),
                          timeout=5 if archived else 2)
        # an answer the proxy must read and cannot is dropped, never relayed unread
        # (review 64; it was forwarded unread before)
        assert (answer is not None and answer.status == 200) == archived
        rows = [(r.method, r.direction) for r in proxy.archive_rows()]
        assert (("INVITE", "response") in rows) == archived, rows
        assert ("INVITE", "request") in rows
        log = proxy.log_since(mark)
        assert ("that must be read and cannot be" in log) != archived
        assert "reply route failed" not in log and "Traceback" not in log
    finally:
        bob.close()


def test_a_request_with_an_over_long_call_id_is_refused_400(proxy_factory):
    proxy = proxy_factory("r30-callid")
    bob = RawUas()
    try:
        register_contact(proxy, "bob", bob.port)
        answer = transact(proxy.port, _plain_invite("c" * (MAX_ID_OCTETS + 1)), timeout=5)
        assert answer is not None and answer.status == 400
        assert bob.received == [] and proxy.archive_rows() == []
    finally:
        bob.close()
