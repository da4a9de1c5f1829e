"""Review 10 on a real Kamailio: which From spellings digest authentication lets through
as one user, and whom the reply route then charges for the answer's key.

``route_auth`` asks credentials of every From ``from_ours`` takes as local (each
``[kamailio] domains`` entry, the identity host, every address Kamailio takes as itself)
and ``auth_check`` holds only the From's user part to the credentials' user name; the
reply route charged the From as written (``$avp(e2m_caller)``, from
``ProxyEngine.answer_caller``), and now charges the user digest proved, in our first
domain.  tests/unit/test_review10.py shows what the extra caller groups let an
insider do.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import SDP_OFFER
from e2m_lab.kamailio_harness import SipUa, registered_uas
from e2m_plugins.sip import SipMessage, make_request
from tests.kamailio.test_answer_caller_wire import _bobs_phone, _charged

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)
USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


def _invite(caller: str, tag: str) -> SipMessage:
    """A plaintext SDP offer to bob from ``caller`` (a ``view`` rule asks no signature)."""
    return make_request("INVITE", "sip:bob@example.com", from_uri=caller,
                        to_uri="sip:bob@example.com",
                        call_id=f"review10-{tag}-{time.monotonic_ns()}@x", from_tag=tag,
                        body=SDP_OFFER, content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:caller@127.0.0.1:9>")])


def test_hole_one_password_is_a_caller_group_for_every_name_of_ours(proxy_factory, pki):
    """Insider UA (alice, a user of ours with a password): her From written with the
    identity host or the proxy's listen address instead of her domain passes digest as
    alice (Kamailio 5.6 auth_check, flag 1) and reaches bob's auto-answering phone; each
    answer's key is charged to that spelling, a caller group (1/8 of the cache) of its
    own.  Fixed: the reply route charges the identity digest proved (``$au`` in our
    first domain: kemi.py ``digest_aor``), not the From (tests/unit/test_review10.py,
    first test); this failed before."""
    proxy = proxy_factory("review10", e2m=True, view=SDP_VIEW, auth=True, users=USERS)
    spellings = ("sip:alice@example.com", "sip:alice@proxy.example.com",
                 f"sip:alice@127.0.0.1:{proxy.port}")
    charged = []
    with registered_uas(proxy, "bob", USERS["bob"], "127.0.0.30") as uas:
        uas.responder = _bobs_phone(pki, uas)
        alice = SipUa(proxy.port, user="alice", password=USERS["alice"], source="127.0.0.31")
        try:
            for n, caller in enumerate(spellings):
                mark = proxy.log_mark()
                ok = alice.request(_invite(caller, f"a{n}"))
                assert ok is not None and ok.status == 200, (caller, ok)
                charged.append(_charged(proxy, mark))
        finally:
            alice.close()
    assert charged == ["sip:alice@example.com"] * len(spellings), charged
