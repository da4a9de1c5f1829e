"""Review 126, hole K1 on a real Kamailio 5.6 home proxy (``view =
INVITE:application/sdp``, SQLite archive, open registrar; bob a ``RawUas`` registered
there).  The write-up is in ``tests/unit/test_review126_inner_multipart.py``; the
phone's half (pjsip takes the hidden SDP) in
``tests/pjsua/test_review126_inner_multipart_phone.py``.

alice's INVITE (UDP, ``SipUa``) carries, signed by her, bound to the message and sealed
for bob and ``proxy.example.com`` (``Proxy-Required-Body: proxy.example.com``), a
``multipart/mixed`` whose one part is her SDP offer.  The proxy opens it, archives one
``multipart/mixed`` row and relays it to bob, but writes no media row and logs no
``e2m media:`` line for it.  The control is her engine's own offer (the SDP as the
whole inner entity): one media row and one log line.

Fixed (stop 41): ``body.open_part`` (the proxy's and the UA's one reader) refuses a
multipart inside the envelope that holds an SDP or an S/MIME part at any depth
(``UnsupportedMediaTypeError``: 415 at the proxy, a refused body at the phone), so no
side hands on a media description the proxy did not view.  A MESSAGE of text parts is
still read (new control); the UA now seals a multipart with its boundary (it was
dropped, making such a MESSAGE unreadable once its parts were looked into).  Every hole
test failed on the code before the fix (a ``git stash`` of ``e2m_plugins``) and passes
with it; the markers are off.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from e2m_lab.flows import TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_plugins import headers as hdr
from e2m_plugins.cms import recipient_for_certificate
from tests.pjsua.test_review126_inner_multipart_phone import inner_multipart_invite

pytestmark = pytest.mark.kamailio

SDP_VIEW = ("INVITE:application/sdp",)


def _through(proxy_factory, pki, name: str, hidden: bool) -> dict[str, object]:
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW)
    bob = RawUas()
    alice_ua = SipUa(proxy.port, user="alice", timeout=5)
    try:
        register_contact(proxy, "bob", bob.port)
        call_id = f"review126-{name}-{time.monotonic_ns()}@x"
        plain = invite(pki, call_id=call_id).replace("Via", alice_ua.via())
        if hidden:
            wire = inner_multipart_invite(
                pki, plain, readers=(TRUSTED,),
                recipients=(recipient_for_certificate(pki.proxy(TRUSTED).cert),)
            ).add(hdr.PROXY_REQUIRED_BODY, TRUSTED)
        else:
            alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
            wire = alice.protect(plain).message
        mark = proxy.log_mark()
        alice_ua.send(wire)
        delivered = bob.wait_for(1, method="INVITE")
        time.sleep(0.5)
        log = proxy.log_since(mark)
        with sqlite3.connect(proxy.archive_path) as db:
            bodies = db.execute("SELECT content_type FROM bodies WHERE call_id = ?",
                                (call_id,)).fetchall()
            media = db.execute("SELECT media, address, port FROM media WHERE call_id = ?",
                               (call_id,)).fetchall()
        return {"relayed": len(delivered),
                "relayed_type": delivered[0].get("Content-Type") if delivered else None,
                "bodies": [b[0] for b in bodies], "media_rows": media,
                "media_log": log.count("e2m media: INVITE")}
    finally:
        alice_ua.close()
        bob.close()


def test_control_k1_wire_her_engines_offer_is_summarised(proxy_factory, pki):
    out = _through(proxy_factory, pki, "r126-ctl", hidden=False)
    print(out)
    assert out["relayed"] == 1 and out["bodies"] == ["application/sdp"], out
    assert len(out["media_rows"]) == 1 and out["media_log"] == 1, out


def test_hole_k1_wire_an_sdp_in_an_inner_multipart_has_no_media_row(proxy_factory, pki):
    out = _through(proxy_factory, pki, "r126-hole", hidden=True)
    print(out)
    # secure: refused, or its media recorded as any offer's
    assert out["relayed"] == 0 or (len(out["media_rows"]) == 1 and out["media_log"] == 1), out
