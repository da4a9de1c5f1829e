"""Review 172 (attacker's review of eef5d9f, 08352e1 and 1480e2a: ``srtp_keys.holds_keys``
deciding whether a body may hold SRTP keys, used by ``UAEngine._protect`` and
``_refuse_to_send_plaintext``).  Require on (the default).  The key measured is
``flows.CRYPTO``'s ``inline:`` value; "the proxy reads it" means its certificate's key
opens an envelope of the protected message and the plaintext holds the key (as review
167 does).  Figures are from ``UAEngine.protect`` on 1480e2a (Python 3.11.2, CPU time).

Hole K1: SDP capability negotiation (RFC 5939) carries SDES keys in ``a=acap`` lines
- Attacker: the proxy that views ``INVITE:application/sdp`` (``flows.SDP_VIEW``);
  for a failure response (488) any hop.
- Messages: an offer as RFC 5939 §3.12 and liblinphone write it: ``m=audio ... RTP/AVP``
  with ``a=acap:1 crypto:1 AES_CM_128_HMAC_SHA1_80 inline:<key>``, ``a=tcap:1
  RTP/SAVP``, ``a=pcfg:1 t=1 a=1`` (a peer supporting capneg takes the potential
  configuration and runs SRTP with that key); the same SDP in bob's 488.
- Effect observed: the INVITE is not split (``split=False``) and is sealed whole for
  peer + proxy.example.com (2548 bytes, ``readable_by=('proxy.example.com',)``); the
  proxy's key opens it and reads the 40-character key.  The 488 goes out unencrypted
  with the key verbatim.  ``has_keys`` and ``mentions_keys`` both say no: the line is
  an ``acap`` attribute and "a=crypto" appears nowhere.
- Code at fault: e2m_plugins/sdp.py:218-220 (``_is_keying``: only ``k=`` and
  ``a=<name>`` with name in ``KEYING_ATTRIBUTES``), sdp.py:34 (``KEYING_ATTRIBUTES`` =
  crypto, key-mgmt), sdp.py:304-317 (``mentions_keys``' pattern wants ``a=crypto``);
  ua.py:918 (``keyed`` false, so the whole SDP is sealed for the audience).
- Suggested fix: count an ``a=acap`` whose value (after the capability number) names a
  keying attribute (``crypto``/``key-mgmt``) as a keying line, in ``_is_keying`` and in
  ``mentions_keys`` (``acap:<n> crypto:``); separate and merge it like ``a=crypto``
  (its section kept); or refuse an SDP with ``a=acap`` holding keys when a proxy reads.
- Test: ``test_k1_capneg_acap_crypto_key_is_never_readable_by_the_proxy``.

Hole K2: a declared charset names a bytes codec: ``charset=bz2`` inflates without bound
- Attacker: whoever shapes a body the engine must send (the user's application, a
  B2BUA passing bodies on; as review 171 K5); paid per message, refused or not.
- Messages: INFO (no proxy) and MESSAGE (proxy view ``MESSAGE:*``) ``text/plain;
  charset=bz2`` whose body is ``bz2.compress`` of zeros.
- Effect observed: ``_mentions`` runs ``codecs.decode(content, "bz2")``: a 79-byte body
  (64 MB of zeros) costs 221 ms CPU, a 208-byte body (256 MB) 882 ms and the process's
  peak RSS 141 -> 554 MB; a body under 256 KB could inflate to terabytes (out of
  memory).  The per-body inflation bound of 1480e2a (``inflate_left``) is not applied.
  Then an untyped ``AttributeError`` ("'bytes' object has no attribute 'encode'")
  escapes ``protect`` (so it is refused, by accident).  ``charset=zlib`` likewise
  (4 KB -> 4 MB, 6 ms; ~1000:1), ``quopri`` the same AttributeError, ``rot13`` an
  untyped TypeError.
- Code at fault: e2m_plugins/srtp_keys.py:117-131 (``codecs.decode`` with any codec
  name a peer-of-the-user wrote, bytes-to-bytes codecs included; only LookupError,
  UnicodeError and ValueError caught).
- Suggested fix: accept only text encodings (``codecs.lookup(cs)._is_text_encoding``,
  or a short allow-list of charsets), count any other name as unreadable (keys), and
  bound the decode to the body limit.
- Test: ``test_k2_a_bz2_charset_costs_a_few_ms_at_most``.

Hole K3: ``charset=punycode`` costs quadratic time
- Attacker: as K2.
- Messages: INFO ``text/plain; charset=punycode`` whose body is "é中" x 50000 encoded
  with Python's punycode codec (100011 bytes, under the 256 KB limit).
- Effect observed: 20010 bytes 46 ms, 100011 bytes 777 ms, 200011 bytes 2826 ms CPU in
  ``protect`` (Python's punycode decoder inserts each code point into a list: O(n²));
  then the body is sent (no keys).
- Code at fault: e2m_plugins/srtp_keys.py:126 (``codecs.decode(content, charset)``
  with any codec).
- Suggested fix: as K2 (punycode and idna are no MIME charsets: refuse them), or
  bound the decoded length for codecs that are not linear.
- Test: ``test_k3_a_punycode_charset_costs_a_few_ms_at_most``.

Controls (unmarked, pass)
- ``test_control_plain_crypto_offer_is_split``: the same offer with ``a=crypto`` (no
  capneg) through the SDP-viewing proxy is split; the proxy reads ``m=audio`` and no key.
- ``test_control_real_charsets_are_cheap_and_sealed``: a 100 000-character MESSAGE text in
  utf-8, iso-8859-1, utf-16 and windows-1252 with a proxy view: sealed for the proxy,
  each under 100 ms.
- ``test_control_keys_in_a_utf16_text_are_refused``: a UTF-16 text holding the offer
  is still refused (review 169 K3's fix held).

Tried and held (figures from 1480e2a)
- The split path with keys the parser reads differently: ``a= crypto``, ``a=crypto :``,
  ``a=CRYPTO``, ``a=\\xa0crypto`` (stripped, lower-cased: split); a bare CR inside a line,
  a NUL, an upper-case type letter ``A=crypto``, a line with leading space, ``a=crypto``
  before ``v=0``: ``MalformedError`` (typed, nothing sent); session-level ``a=crypto``
  and ``k=clear:`` at session and media level: split, put back at their section;
  65 keying lines or one over 1024 bytes: ``LimitExceededError``; duplicated keys: all
  separated.
- Codecs on ``charset``: base64, hex, uu (keys decoded): refused; unicode_escape
  ("a\\x3dcrypto"): decoded text scanned, refused; idna of 254 KB of "a": sent, 16 ms.
- Phone (pjsua2, real Kamailio, tests/e2e/test_two_phones.py on 1480e2a): the SRTP call
  through the SDP-viewing home proxy with CEK reuse, hold and unhold (split offer and
  answer, no ``a=crypto``/``inline:`` and no witnessed key on the wire, the archive's
  SDPs keyless), the command-line call with --hold, and MESSAGE both ways: 3 passed
  in 7.5 s; nothing honest refused.
  Not tried: REFER/NOTIFY sipfrags, UPDATE, 183, CPIM, is-composing and PUBLISH from
  the phone: ``e2m-phone`` issues only call, hold/unhold, message and hangup.

Fixed (stop 49): K1: ``sdp._is_keying`` takes an ``a=acap:<n> <attribute>`` line that
offers a keying attribute as a keying line, so the split seals it for the peer alone
(and ``mentions_keys`` sees it too).  K2, K3: ``srtp_keys`` decodes a declared charset
with ``bytes.decode``, which takes text encodings only (bz2, zlib, quopri, rot13 are a
``LookupError``: the part counts as keys), and counts punycode and idna as unreadable.
"""

from __future__ import annotations

import bz2
import time

import pytest

from e2m_lab.key_checks import failure_answer_with, proxy_reads

from e2m_lab.flows import SDP_VIEW, SRTP_OFFER, TRUSTED, invite, known_proxy, ua_engine
from e2m_plugins.errors import E2MError, PolicyError
from e2m_plugins.sip import SipMessage, make_request
from e2m_plugins.testpki import init_test_pki

KEY = b"WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"   # flows.CRYPTO's inline key


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _proxy_opens(world, msg) -> list[bytes]:
    return proxy_reads(world, msg)


def _request(world, method: str, body: bytes, ctype: str) -> SipMessage:
    return make_request(method, f"sip:bob@{world.domain}", from_uri=world.aor("alice"),
                        to_uri=world.aor("bob"), body=body, content_type=ctype)


def _cpu_ms(engine, msg: SipMessage) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.process_time()
        try:
            engine.protect(msg)
        except Exception:       # noqa: BLE001 - the cost is what is measured here
            pass
        best = min(best, (time.process_time() - start) * 1000)
    return best


# -- K1: RFC 5939 capability negotiation --------------------------------------------

CAPNEG_OFFER = (SRTP_OFFER.replace(b"RTP/SAVP", b"RTP/AVP")
                .replace(b"a=crypto:1 ", b"a=acap:1 crypto:1 ")
                + b"a=tcap:1 RTP/SAVP\r\na=pcfg:1 t=1 a=1\r\n")


@pytest.mark.parametrize("shape", ["invite-sdp-view", "488-in-the-clear"])
def test_k1_capneg_acap_crypto_key_is_never_readable_by_the_proxy(world, shape):
    assert KEY in CAPNEG_OFFER and b"a=crypto" not in CAPNEG_OFFER
    sdp_proxy = (known_proxy(world, TRUSTED, SDP_VIEW),)
    alice = ua_engine(world, "alice", proxies=sdp_proxy)
    offer = invite(world, CAPNEG_OFFER, call_id=f"r172-k1-{shape}")
    try:
        if shape == "invite-sdp-view":
            out = alice.protect(offer).message
        else:
            bob, reply = failure_answer_with(world, CAPNEG_OFFER, call_id="r172-k1-488", proxies=sdp_proxy,
                                             tag="b172")
            out = bob.protect(reply).message
    except PolicyError:
        return                                  # refused: nothing sent (secure)
    assert KEY not in (out.body or b""), "the key went out in the clear"
    assert all(KEY not in plain for plain in _proxy_opens(world, out)), "the proxy reads the key"


def test_the_capneg_offer_is_split_and_bob_gets_it_back_whole(world):
    """Stop 49: the fix seals the acap key for bob alone, and bob's engine puts it back:
    he reads the offer's every line, the proxy the rest."""
    sdp_proxy = (known_proxy(world, TRUSTED, SDP_VIEW),)
    alice = ua_engine(world, "alice", proxies=sdp_proxy)
    bob = ua_engine(world, "bob", proxies=sdp_proxy)
    protected = alice.protect(invite(world, CAPNEG_OFFER, call_id="r172-k1-bob"))
    assert protected.info.split
    got = bob.open(protected.message).message
    assert sorted(got.body.splitlines()) == sorted(CAPNEG_OFFER.splitlines())
    readable = _proxy_opens(world, protected.message)
    assert readable and all(b"a=pcfg:1" in p and KEY not in p for p in readable)


def test_control_plain_crypto_offer_is_split(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    protected = alice.protect(invite(world, SRTP_OFFER, call_id="r172-control-split"))
    assert protected.info.split and protected.info.readable_by == (TRUSTED,)
    readable = _proxy_opens(world, protected.message)
    assert readable and all(b"m=audio" in p and KEY not in p for p in readable)


# -- K2, K3: codecs a charset parameter may name ------------------------------------

@pytest.mark.parametrize("method", ["INFO", "MESSAGE"])
def test_k2_a_bz2_charset_costs_a_few_ms_at_most(world, method):
    body = bz2.compress(b"\0" * (64 * 1024 * 1024))
    assert len(body) < 200
    engine = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),)
                       if method == "MESSAGE" else ())
    msg = _request(world, method, body, "text/plain; charset=bz2")
    assert _cpu_ms(engine, msg) < 30
    try:
        engine.protect(msg)
    except E2MError:
        pass                                     # a typed refusal is fine (not AttributeError)


def test_k3_a_punycode_charset_costs_a_few_ms_at_most(world):
    body = ("\u00e9\u4e2d" * 50000).encode("punycode")
    assert len(body) < 256 * 1024
    msg = _request(world, "INFO", body, "text/plain; charset=punycode")
    assert _cpu_ms(ua_engine(world, "alice", proxies=()), msg) < 30


@pytest.mark.parametrize("charset", ["utf-8", "iso-8859-1", "utf-16", "windows-1252"])
def test_control_real_charsets_are_cheap_and_sealed(world, charset):
    text = ("Grüße, see you at 10. " * 5000)[:100_000]
    body = text.encode(charset)
    engine = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    msg = _request(world, "MESSAGE", body, f"text/plain; charset={charset}")
    protected = engine.protect(msg)
    assert protected.info.encrypted and protected.info.readable_by == (TRUSTED,)
    assert _cpu_ms(engine, msg) < 100


def test_control_keys_in_a_utf16_text_are_refused(world):
    body = ("offer:\r\n" + SRTP_OFFER.decode()).encode("utf-16")
    engine = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    with pytest.raises(PolicyError, match="SRTP keys"):
        engine.protect(_request(world, "MESSAGE", body, "text/plain; charset=utf-16"))
