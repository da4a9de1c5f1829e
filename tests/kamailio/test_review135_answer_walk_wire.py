"""Review 135 (attacker's review of e0f9177), area 1: ``proxy._keyless_content`` and
``ProxyEngine.response_refused`` (review 134 K1's fix).  Real Kamailio
(``proxy_factory``, E2M on, ``view = INVITE:application/sdp``), review 69's stock pjsua2
caller through it, bob a ``RawUas`` registered there (review 133's ``_stock_call``);
the engine-level half is ``tests/unit/test_review135_encrypt_then_sign_answer.py``.

Honest break K1: an answer signed over an envelope (encrypt-then-sign) is dropped
---------------------------------------------------------------------------------

- Who loses: an honest callee whose answer is in RFC 3261 §23.2's order,
  encrypt-then-sign (``application/pkcs7-mime; smime-type=signed-data`` whose signed
  content is an ``enveloped-data`` entity), which ``docs/protocol.md`` §"Order" says the
  project opens ("we open both orders"), sealed for the caller alone or for a proxy
  key the proxy no longer holds.  The same answer in the project's own order
  (sign-then-encrypt, sealed whole) is relayed with its error, as documented ("only a
  body sealed whole is relayed").  A callee or a hop can thus also turn a call's
  answer into a drop, but he could drop it anyway; the loss is the honest flow's.
- Set-up and messages: the stock caller's INVITE; bob's 200 carries a SignedData (bob's
  EC test certificate) over an ``enveloped-data`` MIME entity holding bob's SDP, sealed
  for alice's certificate alone.
- Observed (wire): Kamailio logs ``a INVITE 200 that must be read and cannot be
  (ProxyCannotDecryptError: cannot view the body (application/sdp)): dropped`` for
  bob's 200 and its 3 retransmissions (4 lines), nothing relayed; in the control the
  sign-then-encrypt 200 is logged once ``INVITE response 200 action=forward seen=-
  media=0 error=ProxyCannotDecryptError`` and reaches the caller (a stock pjsua2, it
  then fails on a body it cannot read: ``final_error`` in both runs).  Engine level (unit module): the E2M
  caller ``UAEngine`` alice opens the bound form of that answer to bob's SDP, while
  ``response_refused`` is True for it and False for the sign-then-encrypt answer
  sealed for alice alone.
- Code at fault: ``e2m_plugins/proxy.py:135-147`` (``_keyless_content``):
  ``plaintext_leaves`` stops at the first S/MIME layer, and ``not is_encrypted(part)``
  counts an opaque ``signed-data`` as "signed and not sealed" without looking at what it
  signs (here an envelope: nothing in it is readable without a key).  The same holds
  for a ``multipart/signed`` whose first part is an envelope.
- Suggested fix: in ``_keyless_content`` look through a signature to the signed
  content (the SignedData's eContent, or a ``multipart/signed``'s first part) and
  count it keyless only when that content is itself not an envelope; or decide from
  what ``_read_body`` reached (the layers opened) rather than from the outer types.

Controls (unmarked, pass): ``test_control_sign_then_encrypt_for_the_caller_alone_is_relayed``
(the same content sealed whole, sign-then-encrypt: logged ``INVITE response 200
action=forward ... error=ProxyCannotDecryptError``, relayed, no drop line) and
``test_control_plain_sdp_beside_a_stranger_envelope_is_dropped`` (review 134 K1's
fix working: a plain SDP beside a part sealed for others is dropped).

Tried and held
--------------

- (a) bodies the walk misses, read: ``mime._part_spans`` refuses any ``--boundary``
  outside its delimiters (pjsip's ``pj_strstr`` delimiter search finds nothing we did
  not), duplicate parameters and two Content-Types are malformed, the compact ``c:``
  header is expanded; ``plaintext_leaves`` walks nested multiparts of every subtype
  (``multipart/alternative`` included), so a plain leaf at any depth is keyless.
- (a) ``application/pkcs7-mime; smime-type=enveloped-data`` that is really SignedData
  over an SDP: the walk counts it sealed, but the proxy's reading of it fails and a
  stock caller (pjsip) reads no SDP out of ``application/pkcs7-mime``; an E2M caller
  refuses it unbound (``BindingMismatchError`` seen on the unbound form).  Not a door.
- (b) the proxy lost its key (a fresh ``ProxyEngine`` reading bob's normal
  sign-then-encrypt answer): ``ProxyCannotDecryptError``, ``response_refused`` False:
  relayed.  Only the encrypt-then-sign order is dropped (K1).
- (b) a stock callee's plain SDP 200 through a proxy with a ``verify =
  INVITE:application/sdp`` rule: ``SignatureRequiredError`` and ``response_refused``
  True, so the 200 is dropped (engine, run as a script): every call to a stock callee
  through a verifying proxy fails.  Reported as an observation, not a hole: a verify
  rule names bodies that "must be signed" (docs/protocol.md §5.1), so this may be the
  intended enforcement for answers; the docs do not say so for responses.
- (a) a plain SDP answer under other spellings (engine, ``read_response``, run as a
  script): ``application/sdp;charset=utf-8``, ``Application/SDP``, a ``Content-Encoding:
  gzip`` header, ``Content-Disposition`` ``render``/``early-session``/``session;
  handling=optional``, and inside ``multipart/mixed`` a part with ``early-session``,
  ``Content-Transfer-Encoding: 8bit``, ``charset`` or a spaced parameter: every one is
  summarised (media 127.0.0.9:40404 recorded).  ``multipart/alternative`` and
  ``multipart/related`` are not (K2, ``test_review135_alternative_wire.py``; pjsip takes
  the SDP from the first, not from the second).
- Area 2, ``notifier.in_dialog_hop`` (read, not run): a UDP refresh or unsubscribe must
  come from the recorded hop exactly (``peer.uri() == hop``), a stream one from the same
  address and transport; the row stays on a refused unsubscribe (481) and lapses at its
  expiry; the 403 site check runs first.  A subscription with a route set returns its
  hop for any in-dialog request from the site of its source (``route_set`` short-cut),
  so there the port/transport rule does not apply: needs the dialog's ids and the
  first route's address (the proxy it came through): not a door I could run.

Fixed (stop 43), K1: ``proxy._keyless_content`` looks through a signature: a
``signed-data`` is judged by the entity it carries (``cms.signed.signed_content``, read
and not verified), a ``multipart/signed`` by its first part, so an answer signed over
an envelope is sealed and is relayed with its error as documented.  On the code before,
the 3 hole tests failed; now they pass, and review 134's controls still drop a plain SDP
beside a stranger's envelope.
"""

from __future__ import annotations

import pytest

from e2m_plugins.body import protect_content
from e2m_plugins.cms.envelope import seal
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.cms.signed import sign
from e2m_plugins import mime
from tests.kamailio.test_review133_answer_sdp_wire import CLEAN, _stock_call
from tests.kamailio.test_review134_answer_sealed_part_wire import _call, _mixed, \
    _stranger_envelope

pytestmark = pytest.mark.kamailio

_INNER = b"Content-Type: application/sdp\r\n\r\n" + CLEAN
_ENVELOPE_HEAD = (b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data;"
                  b" name=smime.p7m\r\nContent-Transfer-Encoding: binary\r\n\r\n")


def encrypt_then_sign(pki) -> bytes:
    """bob's SDP sealed for alice alone, the envelope entity signed by bob (RFC 3261
    §23.2's order)."""
    envelope = seal(_INNER, [recipient_for_certificate(pki.user("alice", "ec").cert)]).der
    bob = pki.user("bob", "ec")
    return sign(_ENVELOPE_HEAD + envelope, bob.cert, bob.key)


def sign_then_encrypt(pki) -> tuple[bytes, str]:
    entity, _ = protect_content("application/sdp", CLEAN, [
        recipient_for_certificate(pki.user("alice", "ec").cert)],
        signer=(pki.user("bob", "ec").cert, pki.user("bob", "ec").key))
    return entity.body, str(entity.content_type)


def _answer(proxy_factory, tmp_path, body: bytes, content_type: str, name: str):
    got, answers, _, log = _stock_call(proxy_factory, tmp_path, body, name,
                                       content_type=content_type)
    seen = [ln[ln.index("e2m: "):] for ln in log.splitlines()
            if "e2m: INVITE response" in ln or "INVITE 200 that must be read" in ln]
    print(f"\n{name}: caller {got}; answer rows {len(answers)}; log {seen}")
    return got, seen


def test_encrypt_then_sign_answer_for_the_caller_alone_is_relayed(proxy_factory, tmp_path,
                                                                  pki):
    """Secure (and documented for a body sealed whole): relayed with its error, as the
    same answer in sign-then-encrypt order is."""
    _, seen = _answer(proxy_factory, tmp_path, encrypt_then_sign(pki),
                      "application/pkcs7-mime; smime-type=signed-data; name=smime.p7m",
                      "r135e")
    assert not any("that must be read and cannot be" in ln for ln in seen), seen
    assert any("INVITE response 200 action=forward" in ln for ln in seen), seen


def test_control_sign_then_encrypt_for_the_caller_alone_is_relayed(proxy_factory, tmp_path,
                                                                   pki):
    body, content_type = sign_then_encrypt(pki)
    _, seen = _answer(proxy_factory, tmp_path, body, content_type, "r135s")
    assert not any("that must be read and cannot be" in ln for ln in seen), seen
    assert any("INVITE response 200 action=forward" in ln
               and "ProxyCannotDecryptError" in ln for ln in seen), seen


def test_control_plain_sdp_beside_a_stranger_envelope_is_dropped(proxy_factory, tmp_path):
    got, answers, seen = _call(proxy_factory, tmp_path, _mixed(_stranger_envelope()),
                               "r135m")
    assert got.get("state") != "CONFIRMED", got
    assert answers == []
    assert any("that must be read and cannot be" in ln for ln in seen), seen
