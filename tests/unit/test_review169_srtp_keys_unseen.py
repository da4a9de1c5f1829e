"""Review 169 (attacker's review of eef5d9f, review 167's fix): SRTP keys that
``body.holds_keys`` does not see, so they reach a proxy or the wire in the clear.

The promise (docs/protocol.md §6, after review 167): SRTP keys (``a=crypto``,
``a=key-mgmt``, ``k=``, ``keying_attributes``) never reach a proxy, and "any body that
goes out unprotected with keys in it (a 488's SDP) is refused whatever its method,
status or ``require``".  The attacker in every case is a passive reader: the proxy a
MESSAGE is sealed for (``view = MESSAGE:*``) or any hop on the wire; the body is what
the user's own stack or application hands the UA engine (``UAEngine.protect``).  The
key measured is ``flows.CRYPTO``'s ``inline:`` value; "in the clear" means its 40
base64 characters appear verbatim in the body sent.

Hole K1: a multipart/signed over a keyed SDP is "protected" and goes out as written
- Attacker: any hop on the wire (and the proxy, which reads it like anyone).
- Messages: an INVITE, a MESSAGE (proxy view) and a 488 whose body is
  ``multipart/signed`` (first part ``application/sdp`` with ``a=crypto``, second an
  ``application/pkcs7-signature``).
- Effect observed: all three sent unchanged, ``encrypted=False``, the 40-character key
  verbatim in the 353-byte body; nothing refused.
- Code at fault: e2m_plugins/ua.py:899 (``has_protection`` sends any S/MIME body as
  is) and e2m_plugins/body.py:152 (``plaintext_leaves``, hence ``holds_keys`` at
  body.py:168, takes a ``multipart/signed`` as one protected unit and never reads its
  signed content; a signature protects nothing from a reader).  Same in a
  ``multipart/mixed`` beside a text (INVITE: sent, 509 bytes, key in the clear).
- Suggested fix: in ``holds_keys`` look through signatures as ``readable_without_key``
  does (the first part of a ``multipart/signed``, the eContent of a signed-data):
  only an envelope hides keys.  (Related, not keys: with ``require`` on, a MESSAGE
  text signed but not encrypted also goes out in the clear through the same gate.)
- Test: ``test_k1_signed_multipart_over_keyed_sdp_is_not_sent``.

Hole K2: an application/pkcs7-mime; smime-type=signed-data holding a keyed SDP
- Attacker: any hop (the SignedData eContent is a plain OCTET STRING).
- Messages: an INVITE, a MESSAGE (proxy view), a 200 whose body is a real
  ``cms.signed.sign`` SignedData (1495 bytes) over ``Content-Type: application/sdp``
  plus ``SRTP_OFFER``.
- Effect observed: all sent as written, ``encrypted=False``, the key verbatim in the DER.
- Code at fault: e2m_plugins/body.py:152 via ``is_protected`` (``mime.is_cms``: any
  pkcs7-mime, whatever its smime-type) and ua.py:899.
- Suggested fix: count only enveloped-data / authEnveloped-data as hiding keys
  (``is_encrypted``); read a signed-data's content (``signed_content``) in
  ``holds_keys``.
- Test: ``test_k2_signed_data_over_keyed_sdp_is_not_sent``.

Hole K3: an offer in a UTF-16 text
- Attacker: the proxy a MESSAGE is sealed for; any hop for a 488.
- Messages: a MESSAGE ``text/plain; charset=utf-16`` (proxy view) and a 488
  ``text/plain; charset=utf-16le``, each "offer:" + ``SRTP_OFFER`` in UTF-16.
- Effect observed: the MESSAGE is sealed for proxy.example.com
  (``readable_by=('proxy.example.com',)``, 2740 bytes); the 488 goes in the clear
  (488 bytes, the key readable once the NULs are dropped).
- Code at fault: e2m_plugins/sdp.py:305-316 (``mentions_keys`` matches ASCII bytes),
  called from body.py:176-179 with no regard to the charset parameter.
- Suggested fix: decode the leaf by its charset (utf-16/32, with or without BOM) before
  ``mentions_keys``, or treat a text whose charset is not ASCII-compatible as holding
  keys (fail closed) where a proxy or the wire would read it.
- Test: ``test_k3_offer_in_utf16_text_is_refused``.

Hole K4: a gzip Content-Encoding hides the offer
- Attacker: the proxy a MESSAGE is sealed for; any hop for a 488.
- Messages: MESSAGE ``text/plain`` + ``Content-Encoding: gzip`` (proxy view), 488
  ``text/plain`` + ``Content-Encoding: gzip``, each body ``gzip(SRTP_OFFER)``.
- Effect observed: the MESSAGE is sealed for proxy.example.com (2447 bytes), the 488 sent
  unencrypted (205 bytes, ``gzip.decompress`` gives the key back).  (A top-level
  ``application/sdp`` under gzip is refused: ``MalformedError`` "SDP is not UTF-8".)
- Code at fault: e2m_plugins/body.py:176 (``decoded`` undoes only the MIME
  Content-Transfer-Encoding; the SIP Content-Encoding, RFC 3261 §20.12, is ignored).
- Suggested fix: refuse a body with a Content-Encoding other than identity wherever
  ``holds_keys`` decides (or decompress it, bounded, before looking).
- Test: ``test_k4_gzip_content_encoding_hides_the_offer``.

Hole K5: keying lines that do not start after an LF
- Attacker: the proxy a MESSAGE is sealed for.
- Messages: a MESSAGE (proxy view) with an offer pasted with bare-CR line ends (an
  old-Mac/editor copy: "offer:\\r" + ``SRTP_OFFER`` with CRLF -> CR), and one with the
  keying line after other text on its line ("use this: a=crypto:1 ... inline:KEY").
- Effect observed: both sealed for proxy.example.com (2479 and 2327 bytes), the key
  inside.  The regex's ``(?m)^`` matches only after an LF; a bare CR ends an SDP line
  for pjmedia (sdp.py's own ``_has_control`` note, review 84).
- Code at fault: e2m_plugins/sdp.py:307 (``^[ \\t]*`` anchor).
- Suggested fix: anchor at ``(?:^|[\\r\\n])`` (and any whitespace), and look for
  SDES key params (``inline:``) anywhere in a text bound for a proxy.
- Test: ``test_k5_keying_lines_not_after_lf_are_refused``.

Hole K6: keys in a multipart's preamble or epilogue
- Attacker: any hop for a 488; the proxy for a MESSAGE.
- Messages: a ``multipart/mixed`` body whose only part is "hi", with an ``a=crypto``
  line in the preamble and in the epilogue; sent as a 488 and as a MESSAGE.
- Effect observed: the 488 goes unencrypted (188 bytes, the key verbatim); the MESSAGE
  is sealed whole for proxy.example.com (2445 bytes; the multipart goes in with its
  preamble).
- Code at fault: e2m_plugins/body.py:168-186 scans leaves only; mime.parse_multipart
  (mime.py:598) drops preamble and epilogue.
- Suggested fix: ``holds_keys`` also runs ``mentions_keys`` on the preamble and the
  epilogue of every multipart (or refuse a non-blank preamble/epilogue).
- Test: ``test_k6_keys_in_preamble_or_epilogue_are_refused``.

Hole K7: keys encoded once more inside a SIP fragment
- Attacker: any hop (INFO), the proxy (MESSAGE).
- Messages: an INFO ``message/sipfrag`` and a MESSAGE ``message/sip`` (proxy view) whose
  fragment is an INVITE with a ``multipart/mixed`` body, its SDP part under
  ``Content-Transfer-Encoding: base64``.
- Effect observed: the INFO goes unencrypted (519 bytes, ``base64`` of the keyed SDP in
  it); the MESSAGE is sealed for proxy.example.com (2760 bytes).  ``holds_keys``'
  docstring acknowledges it ("not looked for"), the documented promise does not.
- Code at fault: e2m_plugins/body.py:168-186 (a ``message/sip``/``sipfrag`` leaf is
  scanned as text only).
- Suggested fix: parse a SIP fragment's own Content-Type and body and recurse (bounded
  by the MIME limits), or refuse a fragment that carries a body where a proxy or the
  wire would read it.
- Test: ``test_k7_base64_sdp_inside_a_sip_fragment_is_refused``.

Hole K8: require off and no certificate for the peer: a whole keyed SDP in the clear
- Attacker: any hop.
- Messages: an INVITE with ``SRTP_OFFER`` (and a MESSAGE ``application/sdp``) from an
  engine with ``require_e2m=False`` and no certificate for bob.
- Effect observed: sent as written, ``encrypted=False``, 241 bytes, the key verbatim —
  although docs/protocol.md §6 (eef5d9f) says any body going out unprotected with keys
  is refused "whatever its method, status or ``require``" (a multipart with the same
  SDP in it IS refused: test_srtp_keys_anywhere).  With ``require`` on it is refused
  (``MissingPeerCertificateError``).
- Code at fault: e2m_plugins/ua.py:953-956 (the ``MissingPeerCertificateError``
  fallback returns the message untouched, never through ``holds_keys``).
- Suggested fix: in that fallback, raise ``PolicyError`` when ``holds_keys(part)``
  (or send the SDP with its keying lines removed).
- Test: ``test_k8_keyed_sdp_not_sent_in_clear_when_peer_has_no_certificate``.

Controls (unmarked, pass): a whole keyed SDP INVITE with a proxy view is split (proxy
reads no key); a keyed INVITE with no proxy is sealed for bob alone; a chat MESSAGE with
no keys is sealed for the proxy; a signed-only multipart over a keyless text still goes
(with ``require`` off) — a fix for K1/K2 must not refuse signatures as such; a keyed
SDP with ``require`` on and no certificate is refused.

Tried and held (figures from ``UAEngine.protect`` on e14655e):
- multipart/alternative and multipart/related holding a keyed SDP part, MESSAGE with
  proxy view: PolicyError "SRTP keys inside a multipart/... body".
- quoted-printable part with a soft line break inside "a=cry=\\r\\npto:": PolicyError
  (``decoded`` undoes QP).
- top-level text/plain under Content-Transfer-Encoding base64: PolicyError.
- top-level ``Application/SDP ; charset=utf-8`` INVITE with proxy view: split like
  ``application/sdp`` (readable_by proxy, split=True, no key in the clear).
- top-level application/sdp under Content-Encoding gzip: MalformedError (not UTF-8).
- multipart nested 12 deep (past max_depth), MESSAGE and 488: LimitExceededError.
- a multipart whose boundary is not the one declared: MalformedError (no close
  delimiter), not a zero-part body.
- ``multipart/mixed[text, multipart/signed[sdp]]`` MESSAGE with require on: refused
  (PolicyError for the plaintext text part) — but the same body in an INVITE is sent
  (counted in K1).
- the review 167 shapes (base64 part, CPIM, pasted offer, ``k=base64:``): refused.
- Honest use: a chat text with a line "a=crypto: carries the key" is refused with a
  proxy view (PolicyError) and sealed for bob alone without one: the documented false
  alarm ("a false alarm stops one message"), not counted as a break.
- Not tried: flows through the real pjsua2 phone (time).

Fixed (stop 49): K1 to K7: the detection moved to ``e2m_plugins/srtp_keys.py``
(``holds_keys``): it reads through signatures (a ``multipart/signed``'s content, a
signed-data's eContent; only an envelope is not looked into), undoes each part's
transfer encoding and content coding (gzip, deflate; an unknown coding counts as keys),
reads the entity inside a SIP fragment or CPIM wrapper, scans every part's bytes,
preamble and epilogue included, with NULs dropped (UTF-16, UTF-32), and finds a keying
line anywhere in a line (``sdp.mentions_keys``, no longer anchored at an LF).
K8 accepted: ``[e2m] require = false`` is the operator's choice to send what cannot be
protected as it was; a whole SDP with SDES keys to a peer without a certificate is what
SRTP with SDES does without E2M (keys to every hop, as over TLS hop by hop).  Stripping
the keys would leave the media in the clear instead.  ``docs/protocol.md`` says so now;
``_refuse_to_send_plaintext`` applies its key check only with ``require`` on, so the
rule is the same for every shape of body.
"""

from __future__ import annotations

import base64
import gzip

import pytest

from e2m_lab.key_checks import keys_kept_secret

from e2m_lab.flows import SRTP_OFFER, TRUSTED, invite, known_proxy, message, ua_engine
from e2m_plugins.cms.signed import sign
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki

KEY = b"WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"   # flows.CRYPTO's inline key
_B = "r169"
_SIGNED_CT = (f'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; '
              f"boundary={_B}")
_SIGNED_DATA_CT = "application/pkcs7-mime; smime-type=signed-data; name=smime.p7m"


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _alice(world, view=("MESSAGE:*",), **settings):
    proxies = (known_proxy(world, TRUSTED, view),) if view else ()
    return ua_engine(world, "alice", proxies=proxies, **settings)


def _kept_secret(engine, msg: SipMessage) -> bool:
    return keys_kept_secret(engine, msg, key=KEY)


def _fail(world, body: bytes, ctype: str, call_id: str) -> SipMessage:
    return make_response(invite(world, call_id=call_id), 488, "Not Acceptable Here", [],
                         body, ctype)


def _signed_multipart() -> bytes:
    return (f"--{_B}\r\nContent-Type: application/sdp\r\n\r\n".encode() + SRTP_OFFER
            + f"\r\n--{_B}\r\nContent-Type: application/pkcs7-signature\r\n\r\nMIIB\r\n"
              f"--{_B}--\r\n".encode())


# -- K1 ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["invite", "message-proxy", "488", "invite-mixed"])
def test_k1_signed_multipart_over_keyed_sdp_is_not_sent(world, shape):
    body = _signed_multipart()
    if shape == "invite":
        msg = invite(world, call_id="r169-k1a").with_body(body, _SIGNED_CT)
        engine = _alice(world, ())
    elif shape == "message-proxy":
        msg, engine = message(world, body, content_type=_SIGNED_CT), _alice(world)
    elif shape == "488":
        msg, engine = _fail(world, body, _SIGNED_CT, "r169-k1b"), _alice(world, ())
    else:
        outer = (f"--o\r\nContent-Type: text/plain\r\n\r\nhi\r\n--o\r\nContent-Type: {_SIGNED_CT}"
                 "\r\n\r\n").encode() + body + b"\r\n--o--\r\n"
        msg = invite(world, call_id="r169-k1c").with_body(outer, "multipart/mixed;boundary=o")
        engine = _alice(world, ())
    assert _kept_secret(engine, msg)


# -- K2 ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["invite", "message-proxy", "200"])
def test_k2_signed_data_over_keyed_sdp_is_not_sent(world, shape):
    cred = world.user("alice")
    der = sign(b"Content-Type: application/sdp\r\n\r\n" + SRTP_OFFER, cred.cert, cred.key)
    assert KEY in der
    if shape == "invite":
        msg = invite(world, call_id="r169-k2a").with_body(der, _SIGNED_DATA_CT)
        engine = _alice(world, ())
    elif shape == "message-proxy":
        msg, engine = message(world, der, content_type=_SIGNED_DATA_CT), _alice(world)
    else:
        msg = make_response(invite(world, call_id="r169-k2b"), 200, "OK",
                            [("Contact", "<sip:alice@127.0.0.1>")], der, _SIGNED_DATA_CT)
        msg, engine = msg.replace("To", f"<{world.aor('bob')}>;tag=r169"), _alice(world, ())
    assert _kept_secret(engine, msg)


# -- K3 ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["message-proxy", "488"])
def test_k3_offer_in_utf16_text_is_refused(world, shape):
    text = "offer:\r\n" + SRTP_OFFER.decode()
    if shape == "message-proxy":
        msg = message(world, text.encode("utf-16"), content_type="text/plain; charset=utf-16")
        engine = _alice(world)
    else:
        msg = _fail(world, text.encode("utf-16-le"), "text/plain; charset=utf-16le", "r169-k3")
        engine = _alice(world, ())
    assert _kept_secret(engine, msg)


# -- K4 ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["message-proxy", "488"])
def test_k4_gzip_content_encoding_hides_the_offer(world, shape):
    packed = gzip.compress(b"offer:\r\n" + SRTP_OFFER)
    assert KEY in gzip.decompress(packed)
    if shape == "message-proxy":
        msg, engine = message(world, packed), _alice(world)
    else:
        msg, engine = _fail(world, packed, "text/plain", "r169-k4"), _alice(world, ())
    assert _kept_secret(engine, msg.add("Content-Encoding", "gzip"))


# -- K5 ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["bare-cr", "mid-line"])
def test_k5_keying_lines_not_after_lf_are_refused(world, shape):
    if shape == "bare-cr":
        text = b"offer:\r" + SRTP_OFFER.replace(b"\r\n", b"\r")
    else:
        text = b"use this: a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + KEY + b"\r\n"
    assert _kept_secret(_alice(world), message(world, text))


# -- K6 ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["message-proxy", "488"])
def test_k6_keys_in_preamble_or_epilogue_are_refused(world, shape):
    line = b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + KEY + b"\r\n"
    body = (b"preamble\r\n" + line + f"--{_B}\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            f"--{_B}--\r\n".encode() + line)
    ctype = f"multipart/mixed;boundary={_B}"
    if shape == "message-proxy":
        msg, engine = message(world, body, content_type=ctype), _alice(world)
    else:
        msg, engine = _fail(world, body, ctype, "r169-k6"), _alice(world, ())
    assert _kept_secret(engine, msg)


# -- K7 ---------------------------------------------------------------------------

def _fragment() -> bytes:
    inner = (f"--{_B}\r\nContent-Type: application/sdp\r\nContent-Transfer-Encoding: base64"
             "\r\n\r\n").encode() + base64.encodebytes(SRTP_OFFER) + f"--{_B}--\r\n".encode()
    return (f"INVITE sip:bob@example.com SIP/2.0\r\nContent-Type: multipart/mixed;boundary={_B}"
            f"\r\nContent-Length: {len(inner)}\r\n\r\n").encode() + inner


@pytest.mark.parametrize("shape", ["info-sipfrag", "message-sip-proxy"])
def test_k7_base64_sdp_inside_a_sip_fragment_is_refused(world, shape):
    if shape == "info-sipfrag":
        msg = make_request("INFO", f"sip:bob@{world.domain}", from_uri=world.aor("alice"),
                           to_uri=world.aor("bob"), body=_fragment(),
                           content_type="message/sipfrag")
        engine = _alice(world, ())
    else:
        msg, engine = message(world, _fragment(), content_type="message/sip"), _alice(world)
    assert _kept_secret(engine, msg)


# -- K8 ---------------------------------------------------------------------------

@pytest.mark.xfail(strict=True, reason="review 169 hole K8 (accepted, stop 49): [e2m] require = "
                   "false sends a body for a peer without a certificate as it was, SDES keys too")
@pytest.mark.parametrize("shape", ["invite", "message-sdp"])
def test_k8_keyed_sdp_not_sent_in_clear_when_peer_has_no_certificate(world, shape):
    engine = ua_engine(world, "alice", peers=("alice",), require_e2m=False)
    msg = invite(world, SRTP_OFFER, call_id="r169-k8") if shape == "invite" \
        else message(world, SRTP_OFFER, content_type="application/sdp")
    assert _kept_secret(engine, msg)


# -- Controls -----------------------------------------------------------------------

def test_control_whole_keyed_sdp_with_proxy_is_split(world):
    protected = _alice(world, ("INVITE:application/sdp",)).protect(
        invite(world, SRTP_OFFER, call_id="r169-c1"))
    assert protected.info.split and protected.info.readable_by == (TRUSTED,)
    assert KEY not in protected.message.body


def test_control_keyed_invite_without_proxy_is_sealed_for_bob(world):
    protected = _alice(world, ()).protect(invite(world, SRTP_OFFER, call_id="r169-c2"))
    assert protected.info.encrypted and protected.info.readable_by == ()
    assert KEY not in protected.message.body


def test_control_keyless_chat_goes_to_the_proxy(world):
    protected = _alice(world).protect(message(world, b"see you at 10, room k=3\r\n"))
    assert protected.info.encrypted and protected.info.readable_by == (TRUSTED,)


def test_control_signed_keyless_text_still_goes(world):
    body = (f"--{_B}\r\nContent-Type: text/plain\r\n\r\nhello\r\n--{_B}\r\n"
            f"Content-Type: application/pkcs7-signature\r\n\r\nMIIB\r\n--{_B}--\r\n").encode()
    protected = _alice(world, (), require_e2m=False).protect(
        message(world, body, content_type=_SIGNED_CT))
    assert protected.message.body == body


def test_control_keyed_sdp_no_certificate_with_require_is_refused(world):
    engine = ua_engine(world, "alice", peers=("alice",), require_e2m=True)
    assert _kept_secret(engine, invite(world, SRTP_OFFER, call_id="r169-c3"))
    with pytest.raises(E2MError):
        engine.protect(invite(world, SRTP_OFFER, call_id="r169-c4"))
