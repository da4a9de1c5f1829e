"""Review 84's hole 2 on a real ``e2m-phone listen`` (bob, SRTP, E2M required; no
Kamailio: alice's datagrams as the home proxy would relay them, it never changes a
body).  The core half and the account: ``tests/unit/test_review84.py``.

alice (an insider, her own client) calls bob with an SRTP offer split for the home
proxy (``Proxy-Required-Body`` for proxy.example.com, which views INVITE SDP): the view
says ``c=IN IP4 127.0.0.1``; sealed for bob under her signature go her a=crypto line and
``k=prompt<CR>c=IN IP4 127.0.0.66``.  bob's engine merges the "keying line", pjmedia
ends the ``k=`` line at the CR and takes the ``c=`` after it: bob's ``call_media``
reports ``remote_rtp 127.0.0.66:49170``, an address the proxy never recorded.  The
control (an honest split) reports 127.0.0.1:49170.

Fixed (stop 34): bob's engine refuses a sealed key line holding a control character
(``SdpKeys.decode``, ``merge_keys``, and the merged SDP is read again), so the call is
refused and no SDP naming 127.0.0.66 reaches pjmedia; the hole turned XPASS and its
marker is gone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2m_lab.flows import SRTP_OFFER, TRUSTED, known_proxy, ua_engine
from e2m_lab.phones import PhoneProcess
from e2m_lab.pytest_fixtures import answering_phone
from e2m_lab.stranger import HOST, UdpStranger
from e2m_plugins import sip
from e2m_plugins.sdp import SdpKeys
from e2m_plugins.testpki import TestPKI, init_test_pki

pytestmark = [pytest.mark.pjsua2]

SDP_VIEW = ("INVITE:application/sdp",)
ELSEWHERE = "127.0.0.66"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review84-pki"), users=("alice", "bob"),
                         key_type="ec")


@pytest.fixture
def bob(tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> Iterator[PhoneProcess]:
    yield from answering_phone(tmp_path, pki, request)


def _call(pki: TestPKI, bob: PhoneProcess, peer: UdpStranger, extra: tuple[str, ...],
          monkeypatch: pytest.MonkeyPatch) -> tuple[bytes | None, list[str]]:
    """alice's split SRTP call with ``extra`` sealed key lines; ACKs a 200.  (the first
    answer's head, the remote RTP addresses bob reported)."""
    from e2m_plugins import ua as ua_module
    real = ua_module.separate_keys

    def her_split(content, keying):
        view, keys = real(content, keying)
        return view, SdpKeys(keys.lines + tuple((0, line) for line in extra))

    monkeypatch.setattr(ua_module, "separate_keys", her_split)
    alice = ua_engine(pki, "alice", peers=("bob",),
                      proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    plain = sip.make_request("INVITE", f"sip:bob@{HOST}:{bob.port}", from_uri=pki.aor("alice"),
                             to_uri=pki.aor("bob"), via_host=f"{HOST}:{peer.local_port}",
                             body=SRTP_OFFER, content_type="application/sdp",
                             extra_headers=[("Contact", f"<sip:alice@{HOST}:{peer.local_port}>")])
    protected = alice.protect(plain)
    assert protected.info.split and protected.info.readable_by == (TRUSTED,)
    mark = bob.mark()
    peer.send(protected.message.serialize())
    data = peer.answered(plain.call_id, timeout=10)
    if data is not None and data.startswith(b"SIP/2.0 200"):
        ok = sip.parse(data)
        contact = re.sub(r"^.*<|>.*$", "", ok.get("Contact") or "")
        ack = sip.make_request("ACK", contact, from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
                               call_id=plain.call_id, cseq=1, from_tag=plain.from_tag,
                               to_tag=ok.to_tag, via_host=f"{HOST}:{peer.local_port}")
        peer.send(ack.serialize())
        try:
            bob.wait("call_media", since=mark, timeout=5)
        except Exception:  # noqa: BLE001 - the assertion says what came
            pass
    time.sleep(0.5)
    return (data[:40] if data else data,
            [event.get("remote_rtp") or "" for event in bob.of("call_media", since=mark)])


def test_control_an_honest_split_call_has_its_media_where_the_proxy_saw_it(pki, bob,
                                                                          monkeypatch):
    peer = UdpStranger(bob.port)
    try:
        head, media = _call(pki, bob, peer, (), monkeypatch)
        assert head is not None and head.startswith(b"SIP/2.0 200"), head
        assert media and all(rtp.startswith("127.0.0.1:49170") for rtp in media), media
    finally:
        peer.close()


def test_hole_a_sealed_key_line_with_a_bare_cr_sends_bobs_media_elsewhere(pki, bob,
                                                                         monkeypatch):
    peer = UdpStranger(bob.port)
    try:
        head, media = _call(pki, bob, peer, (f"k=prompt\rc=IN IP4 {ELSEWHERE}",),
                            monkeypatch)
        # secure: refused, or the media where the proxy recorded it (127.0.0.1)
        assert not any(ELSEWHERE in rtp for rtp in media), (head, media)
    finally:
        peer.close()
