"""Review 135 (attacker's review of e0f9177), area 1 (a), hole K2: an answer SDP inside
``multipart/alternative`` reaches a stock caller unrecorded.  Real Kamailio
(``proxy_factory``, E2M on, ``view = INVITE:application/sdp``), review 69's stock pjsua2
2.15.1 caller, bob a ``RawUas`` registered there (review 133's ``_stock_call``).

Hole K2
-------

- Attacker: an **insider UA** callee (bob), or an **untrusted hop** on his leg, hiding
  where a stock caller's media goes from the archive.  No error, no key, nothing sealed.
- Messages: the stock caller's plaintext INVITE; bob's 200 has ``Content-Type:
  multipart/alternative;boundary=r135alt`` and one part, ``Content-Type:
  application/sdp``, an SDP with ``c=IN IP4 127.0.0.9`` and ``m=audio 40404``.
- Observed: the proxy logs ``e2m: INVITE response 200 action=forward
  seen=multipart/alternative/171B/sig=none media=0`` (no error, so neither review 133's
  nor review 134's drop rule applies) and relays the 200; **0 answer media rows**; the
  stock caller is ``CONFIRMED`` with remote RTP **127.0.0.9:40404**.  The same part in
  ``multipart/mixed`` (control) is recorded: 1 answer row 127.0.0.9:40404.
- Code at fault: ``e2m_plugins/body.py:114`` (``top_parts``: only ``multipart/mixed`` is
  split; any other multipart is one part) and ``e2m_plugins/proxy.py:797-798``
  (``_read_body`` summarises media only of parts whose type is ``application/sdp``): the
  viewed part is the whole ``multipart/alternative``, so no SDP is summarised and the
  SDP view's refusals (reviews 128-131) never see it.  pjsip
  (``pjsip_rdata_get_sdp_info2``) takes the ``application/sdp`` part of a body of any
  ``multipart/*`` type.
- Suggested fix: in ``_read_body`` (or ``top_parts`` for the proxy's view) refuse, for
  a method the view covers, any multipart other than ``multipart/mixed`` and
  ``multipart/signed`` (MalformedError: dropped in the core reply route, 415/400 for a
  request), or summarise every ``application/sdp`` leaf ``plaintext_leaves`` finds.
  The offer side, engine only (a script, not kept): ``ProxyEngine.inspect`` of an INVITE
  whose body is the same ``multipart/alternative`` gives ``forward``, no error, no
  media; a stock callee reading it on the wire was not run.
- Test: ``test_sdp_in_multipart_alternative_is_not_relayed_unrecorded`` (strict xfail).

Controls (unmarked, pass): ``test_control_sdp_in_multipart_mixed_is_recorded`` (the same
SDP in ``multipart/mixed``: CONFIRMED on 127.0.0.9:40404 and that row recorded), and
``test_held_sdp_in_multipart_related_is_not_taken`` (``multipart/related`` with the
same part: relayed unrecorded too, ``media=0``, but the stock caller takes no SDP from
it: pjsua2 ``final_error``, not CONFIRMED; tried and held for a stock caller; since the
fix the proxy drops it as well, and the test asserts that).

Fixed (stop 44), K2: the view refuses an SDP or S/MIME part nested in the clear in a
multipart the audience split does not take apart (``alternative``, ``related``, a
``mixed`` inside the top ``mixed``), for every method its rules cover: a request gets
415, a response is dropped in the core reply route (``body.refuse_hidden_parts``, the
rule review 126 set inside an envelope).  The hole test was a strict xfail on the code
before; the engine-level tests (``tests/unit/test_nested_sdp_view.py``) failed there
too (10 of 11) and pass now.
"""

from __future__ import annotations

import pytest

from tests.kamailio.test_review133_answer_sdp_wire import CLEAN, _stock_call

pytestmark = pytest.mark.kamailio

_B = "r135alt"
HIDDEN = CLEAN.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 127.0.0.9")


def _wrapped(subtype: str, part_headers: str = "Content-Type: application/sdp") -> bytes:
    return (f"--{_B}\r\n{part_headers}\r\n\r\n".encode() + HIDDEN
            + f"\r\n--{_B}--\r\n".encode())


def _run(proxy_factory, tmp_path, subtype: str, name: str):
    got, answers, _, log = _stock_call(proxy_factory, tmp_path, _wrapped(subtype), name,
                                       content_type=f"multipart/{subtype};boundary={_B}")
    seen = [ln[ln.index("e2m: "):] for ln in log.splitlines()
            if "e2m: INVITE response" in ln or "INVITE 200 that must be read" in ln]
    print(f"\n{subtype}: caller {got}; answer rows "
          f"{[(r['address'], r['port']) for r in answers]}; log {seen}")
    return got, answers, seen


def test_sdp_in_multipart_alternative_is_not_relayed_unrecorded(proxy_factory, tmp_path):
    """Secure: the media a stock caller takes from a relayed answer is media the proxy
    recorded for it (or the answer is not relayed)."""
    got, answers, _ = _run(proxy_factory, tmp_path, "alternative", "r135alt")
    taken = got.get("final_rtp") or got.get("remote_rtp")
    assert got.get("state") != "CONFIRMED" or \
        any(f"{row['address']}:{row['port']}" == taken for row in answers), (got, answers)


def test_control_sdp_in_multipart_mixed_is_recorded(proxy_factory, tmp_path):
    got, answers, _ = _run(proxy_factory, tmp_path, "mixed", "r135mix")
    assert got.get("state") == "CONFIRMED", got
    taken = got.get("final_rtp") or got.get("remote_rtp")
    assert any(f"{row['address']}:{row['port']}" == taken for row in answers), (got, answers)


def test_held_sdp_in_multipart_related_is_not_taken(proxy_factory, tmp_path):
    got, answers, seen = _run(proxy_factory, tmp_path, "related", "r135rel")
    assert got.get("state") != "CONFIRMED", got
    assert answers == [] and any("UnsupportedMediaTypeError" in ln and "dropped" in ln
                                 for ln in seen), seen
