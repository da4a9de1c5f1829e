"""A fifty-fourth attacker's review (December 2026) of 50e6c26: the mission's promises to
the sender, end to end; here what held on a real Kamailio.

Review 54's holes (``tests/unit/test_review54.py``, ``tests/pjsua/test_review54_phone.py``)
come from a second From, To, Call-ID or CSeq header: the core reads the first, pjsip the
last.  Through the home proxy they do not pass: Kamailio's header parser refuses a
second instance of each of these headers, the request is dropped before the engine or
the archive sees it (sanity cannot even build its 400), and nothing reaches bob.  So the
attacks need a path that skips the proxy (the phone's own listener) or a hop after it.
These controls keep that so.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import TRUSTED, known_proxy, ua_engine
from e2m_lab.kamailio_harness import SipUa, registered_uas

pytestmark = pytest.mark.kamailio

USERS = {"bob": "bob-Secret-2", "carol": "carol-Secret-3"}


@pytest.mark.parametrize("name,value", [
    ("From", '"Alice" <sip:alice@example.com>;tag=zz'),
    ("To", "<sip:bob@example.com>;tag=bobs"),
    ("Call-ID", "alices-call@x"),
    ("CSeq", "7 MESSAGE"),
])
def test_control_the_home_proxy_drops_a_request_with_a_second_singleton_header(
        proxy_factory, pki, name, value):
    """carol (digest-authenticated) sends a signed MESSAGE to bob sealed for him and the
    archiving proxy, with one more ``name`` header at the end: no answer, nothing
    forwarded, nothing archived; the same MESSAGE without it goes through and is
    archived as carol's."""
    proxy = proxy_factory("r54", e2m=True, view=("MESSAGE:*",), auth=True, users=USERS)
    with registered_uas(proxy, "bob", USERS["bob"], "127.0.0.30") as uas:
        ua = SipUa(proxy.port, user="carol", password=USERS["carol"], source="127.0.0.31")
        carol = ua_engine(pki, "carol", peers=("bob",),
                          proxies=(known_proxy(pki, TRUSTED, ("MESSAGE:*",)),))
        try:
            # a first request for the challenge, so the next ones carry credentials at once
            first = ua.request(ua.build("OPTIONS", "sip:bob@example.com", to="sip:bob@example.com"))
            assert first is not None and first.status == 200, first
            before = len(uas.received)

            odd = carol.protect(ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                                         body=b"odd one", content_type="text/plain")).message
            assert ua.request(odd.add(name, value), timeout=2) is None
            time.sleep(0.3)
            assert len(uas.received) == before
            assert not [r for r in proxy.archive_rows() if r.plaintext == b"odd one"]

            plain = carol.protect(ua.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                                           body=b"plain one", content_type="text/plain")).message
            answer = ua.request(plain)
            assert answer is not None and answer.status == 200, answer
            rows = [(r.from_uri, r.signer) for r in proxy.archive_rows() if r.plaintext == b"plain one"]
            assert rows == [("sip:carol@example.com", "sip:carol@example.com")], rows
        finally:
            ua.close()
