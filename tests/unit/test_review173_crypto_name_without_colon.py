"""Review 173 (attacker's review of fe3afff): the SDP split and the peer's merge.

Hole K1: an ``a=crypto`` line whose name ends with a space, not a colon, is a key
pjmedia reads but the split does not
- Attacker: any party on the signalling path that is not the callee: the SDP-viewing
  proxy the caller chose (it reads the split's view), or anyone on the wire when the
  callee answers 488 with ``require`` on.  The sender needs no malice: a stack that
  writes ``a=crypto 1 ...`` (RFC 4568 wants ``a=crypto:1 ...``) is all it takes.
- Messages: INVITE with ``m=audio 4000 RTP/SAVP 0`` and
  ``a=crypto 1 AES_CM_128_HMAC_SHA1_80 inline:WVNf...`` (space after ``crypto``), to a
  proxy with ``view = INVITE application/sdp``; and a 488 with that SDP.
- Effect observed: pjmedia 2.15.1 (``pjmedia_sdp_parse`` + ``pjmedia_sdp_print`` through
  the pjsua2 wheel) reads the line as attribute ``crypto`` with value
  `` 1 AES_CM_128_HMAC_SHA1_80 inline:WVNf...`` and prints it back as
  ``a=crypto: 1 AES_...``; pjproject 2.15's ``parse_attr_crypto`` tokenises the value
  with ``pj_strtok`` on " ", which skips the leading space, so the tag is 1 and the key
  is used: two pjsua2 accounts with SRTP mandatory, offer and answer rewritten on the
  wire to ``a=crypto 1 ...``, confirm the call with audio active both ways
  (tests/pjsua/test_review173_spaced_crypto_phone.py; rewritten to ``a=cryptx 1`` the
  callee answers 406 Not Acceptable instead).  The e2m side: ``sdp.has_keys`` False, ``sdp.mentions_keys`` False; the
  INVITE is not split (``info.split`` False), the whole SDP with its 40-character key
  is sealed for the proxy, which opens it and reads the key; the 488 goes out with the
  key in the clear (no ``PolicyError``).  Same for ``a=key-mgmt mikey ...``
  (has_keys False).
- Code at fault: ``e2m_plugins/sdp.py:68`` (``SdpLine.attribute`` takes the name as what
  comes before ":", so ``crypto 1 aes_cm_... inline`` is no keying name) and
  ``e2m_plugins/sdp.py:324`` (``_keying_line_pattern`` wants ":" or the line's end after
  the name); used by ``_is_keying`` (sdp.py:218) and ``holds_keys``.
- Suggested fix: take an attribute's name as pjmedia does, the leading run of token
  characters (``_ATTRIBUTE_NAME``, already used by ``_one_reading``), in
  ``SdpLine.attribute``/``_is_keying``, and in ``mentions_keys`` let any non-token
  character (space, tab, ";", "/") end the name, not only ":".  Removing too much is the
  safe side.
- Test: ``test_k1_crypto_name_ended_by_a_space_is_never_readable_by_the_proxy``
  (parametrised: invite-sdp-view, 488-in-the-clear, key-mgmt-invite).

Controls
- ``test_control_pjmedia_reads_a_crypto_name_ended_by_a_space``: the pjmedia oracle
  (ctypes into the pjsua2 wheel) reads ``a=crypto 1 ...`` as ``crypto`` (skipped without
  pjsua2).
- ``test_control_plain_crypto_offer_is_split``: the RFC form is split, the proxy's view
  has no key.
- ``test_control_honest_capneg_offer_round_trips``: an RFC 5939 offer with a keying
  ``a=acap:1 crypto:...`` and two non-key acaps (``a=acap:2 rtcp-mux``,
  ``a=acap:3 ptime:20``) and ``a=pcfg:1 t=1 a=1,2|3``: split, bob gets every line back,
  the proxy reads acap 2 and 3 and the pcfg but no key.
- ``test_control_dtls_fingerprint_and_zrtp_hash_are_not_keys``: an ``a=fingerprint``
  (DTLS-SRTP, ``UDP/TLS/RTP/SAVP``) and ``a=zrtp-hash`` offer is neither refused nor
  split: both are public (a hash of a certificate, a hash commitment), the proxy may
  read them.

Tried and held
- ``a=CRYPTO:1``, ``a= crypto:1``, ``a=acap:1 a=crypto:1`` (the last by mentions_keys
  only): all seen as keys (split or refused).
- Acap lines moved to the section's end by the merge (after ``a=pcfg``): RFC 5939
  gives capabilities no order, and pjmedia 2.15 keeps ``acap``/``pcfg`` as opaque
  attributes (it has no capability negotiation), so no stack here reads the move.
- An acap number reused by a non-key acap (``a=acap:1 rtcp-mux`` in the view, the
  sealed ``a=acap:1 crypto:...``): the merge accepts it and bob gets both, as alice
  sent them (RFC 5939 §3.4.1 forbids the reuse, but it is the sender's own SDP; the
  merged SDP equals the sent one, the proxy cannot alter either: both are signed).
- ``a=acap:1crypto:...`` (no space after the number) and ``a=acap:1 crypto 1 ...``:
  not seen as keys, but neither is a capability any RFC 5939 parser reads as
  ``crypto`` (the grammar wants ``<n> 1*WSP <attribute>``, an attribute ``name:value``),
  and pjmedia keeps both opaque: not reported.
- The real phone (tests/pjsua/test_review173_update_phone.py, bob's ``e2m-phone``,
  SRTP, require on; alice her own engine on a UDP socket): an in-dialog UPDATE with a
  new split SRTP offer is answered 200 (2672 bytes, ``split=True``, view readable by
  proxy.example.com under the dialog key, no ``inline:`` on the wire nor in what the
  proxy's certificate opens); an in-dialog REFER is answered 202 and both NOTIFY
  sipfrags go out (``100 Trying``, then ``500``: the transferred INVITE to
  ``sip:alice@127.0.0.1:<p>``, an AOR bob has no certificate for, is refused before it
  leaves, as require wants).  Nothing honest refused.
- Not done in the time: 183 early media with SDP (``e2m-phone listen`` answers 200
  itself; no 183 without new phone scaffolding).

Fixed (stop 49): ``sdp._is_keying`` names an ``a=`` line's attribute as pjmedia does, by
the leading run of token characters (``a=crypto 1 ...`` is a crypto line, split and
sealed for the peer alone; an ``a=acap`` offer likewise), and ``mentions_keys`` ends the
name where pjmedia ends it (at the first character that is no token character).
"""

from __future__ import annotations

import pytest

from e2m_lab.key_checks import failure_answer_with, proxy_reads

from e2m_lab.flows import SDP_VIEW, SRTP_OFFER, TRUSTED, invite, known_proxy, ua_engine
from e2m_plugins.errors import PolicyError
from e2m_plugins.sdp import has_keys, mentions_keys
from e2m_plugins.testpki import init_test_pki

KEY = b"WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"   # flows.CRYPTO's inline key
MIKEY = b"AQAFgM0XflABAAAAAAAAAAAAAAsAyO7A"

SPACED_OFFER = SRTP_OFFER.replace(b"a=crypto:1 ", b"a=crypto 1 ")
MIKEY_OFFER = SRTP_OFFER.replace(b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + KEY,
                                 b"a=key-mgmt mikey " + MIKEY)


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _proxy_opens(world, msg) -> list[bytes]:
    return proxy_reads(world, msg)


def _pjmedia_reads(sdp: bytes) -> bytes | None:
    """The SDP as pjmedia 2.15 parsed it, printed back (None: it does not parse)."""
    import ctypes as C
    from pjsua2 import _pjsua2
    lib = C.CDLL(_pjsua2.__file__)
    assert lib.pj_init() == 0
    factory = C.create_string_buffer(1 << 16)            # a pj_caching_pool, with room
    lib.pj_caching_pool_init(factory, None, 0)
    lib.pj_pool_create.restype = C.c_void_p
    pool = lib.pj_pool_create(factory, b"r173", 4000, 4000, None)
    parsed = C.c_void_p()
    try:
        if lib.pjmedia_sdp_parse(C.c_void_p(pool), C.c_char_p(sdp), C.c_size_t(len(sdp)),
                                 C.byref(parsed)) != 0:
            return None
        buf = C.create_string_buffer(65536)
        size = lib.pjmedia_sdp_print(parsed, buf, C.c_size_t(len(buf)))
        return buf.raw[:size]
    finally:
        lib.pj_pool_release(C.c_void_p(pool))
        lib.pj_caching_pool_destroy(factory)
        lib.pj_shutdown()


# -- K1 --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["invite-sdp-view", "488-in-the-clear", "key-mgmt-invite"])
def test_k1_crypto_name_ended_by_a_space_is_never_readable_by_the_proxy(world, shape):
    body = MIKEY_OFFER if shape == "key-mgmt-invite" else SPACED_OFFER
    secret = MIKEY if shape == "key-mgmt-invite" else KEY
    assert secret in body and b"a=crypto:" not in body
    sdp_proxy = (known_proxy(world, TRUSTED, SDP_VIEW),)
    alice = ua_engine(world, "alice", proxies=sdp_proxy)
    try:
        if shape != "488-in-the-clear":
            out = alice.protect(invite(world, body, call_id=f"r173-k1-{shape}")).message
        else:
            bob, reply = failure_answer_with(world, body, call_id="r173-k1-488", proxies=sdp_proxy,
                                             tag="b173")
            out = bob.protect(reply).message
    except PolicyError:
        return                                  # refused: nothing sent (secure)
    assert secret not in (out.body or b""), "the key went out in the clear"
    assert all(secret not in plain for plain in _proxy_opens(world, out)), "the proxy reads the key"


# -- controls ----------------------------------------------------------------------

def test_control_pjmedia_reads_a_crypto_name_ended_by_a_space():
    pytest.importorskip("pjsua2")
    read = _pjmedia_reads(SPACED_OFFER)
    assert read is not None
    assert b"a=crypto: 1 AES_CM_128_HMAC_SHA1_80 inline:" + KEY in read


def test_control_plain_crypto_offer_is_split(world):
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    protected = alice.protect(invite(world, SRTP_OFFER, call_id="r173-control-split"))
    assert protected.info.split and protected.info.readable_by == (TRUSTED,)
    readable = _proxy_opens(world, protected.message)
    assert readable and all(b"m=audio" in p and KEY not in p for p in readable)


CAPNEG_OFFER = (SRTP_OFFER.replace(b"RTP/SAVP", b"RTP/AVP")
                .replace(b"a=crypto:1 ", b"a=acap:1 crypto:1 ")
                + b"a=acap:2 rtcp-mux\r\na=acap:3 ptime:20\r\na=tcap:1 RTP/SAVP\r\n"
                + b"a=pcfg:1 t=1 a=1,2|3\r\n")


def test_control_honest_capneg_offer_round_trips(world):
    sdp_proxy = (known_proxy(world, TRUSTED, SDP_VIEW),)
    alice = ua_engine(world, "alice", proxies=sdp_proxy)
    bob = ua_engine(world, "bob", proxies=sdp_proxy)
    protected = alice.protect(invite(world, CAPNEG_OFFER, call_id="r173-capneg"))
    assert protected.info.split
    got = bob.open(protected.message).message
    assert sorted(got.body.splitlines()) == sorted(CAPNEG_OFFER.splitlines())
    readable = _proxy_opens(world, protected.message)
    assert readable and all(b"a=acap:2 rtcp-mux" in p and b"a=pcfg:1" in p and KEY not in p
                            for p in readable)


DTLS_OFFER = (SRTP_OFFER.replace(b"RTP/SAVP", b"UDP/TLS/RTP/SAVP")
              .replace(b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + KEY,
                       b"a=setup:actpass\r\na=fingerprint:sha-256 " + b":".join([b"AB"] * 32)
                       + b"\r\na=zrtp-hash:1.10 " + b"0" * 64))


def test_control_dtls_fingerprint_and_zrtp_hash_are_not_keys(world):
    assert not has_keys(DTLS_OFFER) and not mentions_keys(DTLS_OFFER)
    sdp_proxy = (known_proxy(world, TRUSTED, SDP_VIEW),)
    alice = ua_engine(world, "alice", proxies=sdp_proxy)
    bob = ua_engine(world, "bob", proxies=sdp_proxy)
    protected = alice.protect(invite(world, DTLS_OFFER, call_id="r173-dtls"))
    assert protected.info.encrypted and not protected.info.split
    assert bob.open(protected.message).message.body == DTLS_OFFER
