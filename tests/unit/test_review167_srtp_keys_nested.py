"""Review 167: do SRTP keys (``a=crypto``/``a=key-mgmt``) stay end to end?

The split (e2m-sec-02 §4.2 flow F, docs/protocol.md §6.1) holds wherever the body is
a top-level ``application/sdp`` of a request or a 1xx/2xx.  Two ways around it:

Hole K1: an SDP nested in a MESSAGE's multipart/mixed or message/sipfrag goes whole to the proxy
- Attacker: a curious chosen proxy whose policy views MESSAGE bodies (``MESSAGE:*``,
  ``MESSAGE:multipart/mixed`` or ``MESSAGE:message/sipfrag``); it holds its own key.
- Messages: alice's MESSAGE whose body is ``multipart/mixed`` [text/plain,
  application/sdp with ``a=crypto ... inline:WVNf...``], or ``message/sipfrag`` holding
  an INVITE with that SDP.
- Effect observed: one envelope for bob + proxy.example.com; the proxy's key opens it
  and the plaintext holds ``inline:WVNf`` (4 of 4 cases: two views x two nestings).  A
  top-level ``application/sdp`` MESSAGE is split (control).  For an INVITE the same
  multipart is refused (``PolicyError``), so only MESSAGE (``_protectable``'s "any
  MESSAGE body") is open.
- Code at fault: e2m_plugins/ua.py:915 (``keyed`` is computed only when the whole body
  is ``application/sdp``); ua.py:956-965 (``_protectable`` takes any MESSAGE body whole).
- Suggested fix: in ``_protect`` look for keying lines in every ``application/sdp``
  leaf (``plaintext_leaves``) and inside ``message/sipfrag`` bodies; if one holds keys
  and the audience is not empty, refuse (``PolicyError``) or seal for the peer alone.
- Test: test_k1_nested_sdp_keys_in_a_message_stay_from_the_proxy.

Hole K2: an SDP in a failure response (3xx-6xx) goes out in the clear, keys and all
- Attacker: every hop on the path (no key needed); the chosen proxy too.
- Messages: bob's 488 / 300 / 606 to alice's INVITE carrying an SDP with
  ``a=crypto ... inline:QUJD...`` (an application or stack that answers a refused
  offer with its capabilities, RFC 3261 §21.4.26 allows a body in a 488).
- Effect observed: ``protect`` returns ``Content-Type: application/sdp`` with
  ``inline:QUJD`` in the body for 488, 300 and 606 (3 of 3); a 183 with the same SDP
  is split and sealed (control).  alice's ``_refuse_plaintext`` also skips >= 300, so
  nothing on either side notices.  pjsip itself puts no SDP in its failure answers, so
  the stock phone does not reach this; any app on the engine does.
- Code at fault: e2m_plugins/ua.py:962-963 (``_protectable`` returns False for
  status >= 300) and ua.py:1321 (``_refuse_to_send_plaintext`` returns early for
  status >= 300).
- Suggested fix: in ``_refuse_to_send_plaintext`` drop the status exemption for leaves
  that are ``application/sdp`` with keying lines (``has_keys``): refuse to send them
  (or strip the keying lines) whatever the status.
- Test: test_k2_failure_response_sdp_keys_never_in_the_clear.

Controls
- test_control_top_level_sdp_message_is_split: a MESSAGE whose whole body is
  ``application/sdp`` (Content-Type spelled ``Application/SDP``) is split: the proxy
  reads ``m=audio`` but no ``inline:``.
- test_control_invite_with_nested_sdp_is_refused: the same multipart in an INVITE
  raises ``PolicyError`` (nothing sent).
- test_control_183_with_keys_is_split: bob's 183 with the same SDP is split and
  encrypted, no ``inline:`` on the wire (its view goes under the offer's CEK).

Tried and held
- Split offer and answer (INVITE/200 through ``SDP_VIEW`` proxy): no envelope the proxy
  key opens holds ``inline:``; the sealed keys go under bob's certificate or an
  exclusive dialog key (covered by test_attacks' curious-proxy tests, re-read here).
- CEK reuse: ``_reusable(exclusive=True)`` takes only keys with no readers; a kekri
  wraps a fresh CEK, so a proxy given a RecipientInfo in a reused-key envelope learns
  that envelope's CEK, not the dialog key under which keys are sealed.  The sealed
  keys' CEK is kept as exclusive only when it came by ktri (``_keep_sealed``).
- ``split_sdp=false`` with an audience, ``sign=false`` with an audience, a
  ``[[legacy]]`` peer with an audience: ``PolicyError`` (nothing sent).
- The phone fails closed: pjsua_hooks/phone.py:701 sends nothing when ``protect``
  raises.
- Keying-line detection: case-insensitive names, ``k=`` too; a CR inside a line, a
  non-UTF-8 SDP or a line not ``<letter>=`` is ``MalformedError`` (fail closed).

Fixed (stop 49): K1: ``UAEngine._protect`` refuses (``PolicyError``) a body other than a
whole SDP that holds keys (``body.holds_keys``: a nested SDP with a keying line, or any
other part with a line that looks like one, ``sdp.mentions_keys``) when any proxy would
read it; only a whole SDP is split.  K2: ``_refuse_to_send_plaintext`` refuses any body
passed on as it is that holds keys, whatever the method, the status or ``require``.
"""

from __future__ import annotations

import pytest

from e2m_lab.key_checks import proxy_reads

from e2m_lab.flows import (SDP_VIEW, SRTP_ANSWER, SRTP_OFFER, TRUSTED, invite, known_proxy,
                           message, ua_engine)
from e2m_plugins.errors import PolicyError
from e2m_plugins.sip import make_response
from e2m_plugins.testpki import init_test_pki

OFFER_KEY = b"inline:WVNf"
ANSWER_KEY = b"inline:QUJD"
_B = "r167"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _proxy_opens(world, msg) -> list[bytes]:
    return proxy_reads(world, msg)


def _multipart() -> tuple[bytes, str]:
    body = (f"--{_B}\r\nContent-Type: text/plain\r\n\r\nsee the offer\r\n--{_B}\r\n"
            "Content-Type: application/sdp\r\n\r\n").encode() + SRTP_OFFER \
        + f"\r\n--{_B}--\r\n".encode()
    return body, f"multipart/mixed;boundary={_B}"


def _sipfrag() -> tuple[bytes, str]:
    body = (b"INVITE sip:bob@example.com SIP/2.0\r\nContent-Type: application/sdp\r\n"
            b"Content-Length: %d\r\n\r\n" % len(SRTP_OFFER)) + SRTP_OFFER
    return body, "message/sipfrag"


NESTED = {"multipart": (_multipart, "MESSAGE:multipart/mixed"),
          "sipfrag": (_sipfrag, "MESSAGE:message/sipfrag")}


@pytest.mark.parametrize("view", ["star", "typed"])
@pytest.mark.parametrize("nesting", sorted(NESTED))
def test_k1_nested_sdp_keys_in_a_message_stay_from_the_proxy(world, nesting, view):
    make, typed = NESTED[nesting]
    alice = ua_engine(world, "alice", proxies=(
        known_proxy(world, TRUSTED, ("MESSAGE:*" if view == "star" else typed,)),))
    body, ctype = make()
    assert OFFER_KEY in body
    try:
        sent = alice.protect(message(world, body, content_type=ctype)).message
    except PolicyError:
        return                       # refused: the keys never left (secure)
    assert OFFER_KEY not in sent.body
    readable = _proxy_opens(world, sent)
    assert all(OFFER_KEY not in plain for plain in readable), \
        "the chosen proxy's key opens an envelope holding the SRTP key"


def _call(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    got = bob.open(alice.protect(invite(world, SRTP_OFFER, call_id="r167-k2")).message).message
    return bob, got


def _reply(got, code: int):
    return make_response(got, code, "Refused", [("Contact", "<sip:bob@127.0.0.1:5062>")],
                         SRTP_ANSWER, "application/sdp").replace(
        "To", f"{got.get('To')};tag=b167")


@pytest.mark.parametrize("code", [300, 488, 606])
def test_k2_failure_response_sdp_keys_never_in_the_clear(world, code):
    bob, got = _call(world)
    try:
        out = bob.protect(_reply(got, code)).message
    except PolicyError:
        return                       # refused: nothing sent (secure)
    assert ANSWER_KEY not in (out.body or b""), f"{code} carries the SRTP key in the clear"
    assert all(ANSWER_KEY not in plain for plain in _proxy_opens(world, out))


def test_control_top_level_sdp_message_is_split(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    protected = alice.protect(message(world, SRTP_OFFER, content_type="Application/SDP"))
    assert protected.info.split
    readable = _proxy_opens(world, protected.message)
    assert readable and all(b"m=audio" in p and b"inline:" not in p for p in readable)


def test_control_invite_with_nested_sdp_is_refused(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    body, ctype = _multipart()
    with pytest.raises(PolicyError):
        alice.protect(invite(world, call_id="r167-mp").with_body(body, ctype))


def test_control_183_with_keys_is_split(world):
    bob, got = _call(world)
    protected = bob.protect(_reply(got, 183))
    assert protected.info.split and protected.info.encrypted
    assert ANSWER_KEY not in protected.message.body
    # the view goes under the offer's CEK (kekri), not the proxy's certificate
    assert all(ANSWER_KEY not in p for p in _proxy_opens(world, protected.message))
