"""Review 186 (attacker's review of f5fd795): the keys WE send, and the dialog key they go
under.

A UA seals its own keyed SDP whole under a kept dialog key when that key is "exclusive"
(``DialogKeys.reuse(exclusive=True)``). The four rounds of this stop checked the holders of
a kept key against the sender's signed context and the envelope's recipient count. They
never checked whose CEK is kept. The signed context names the reference but not the CEK.
Sign-then-encrypt leaves the envelope outside the signature. ``open_message`` opens any
number of nested envelopes.

Hole K1: a hop wraps the peer's offer in an envelope of its own, and its CEK is kept as the
dialog key
- Attacker: any hop on the signalling path, or anyone who can change a message in transit
  (no TLS). It needs no E2M role, no certificate and no policy. The UA accepts nothing
  from it except an extra envelope.
- Messages: bob calls alice; no proxy views SDP. bob's INVITE carries the keyed SDP sealed
  for alice alone, and its envelope offers CEKReference R (RFC 3185). R sits in the clear
  in the AuthEnvelopedData authAttrs. The hop takes the INVITE's whole CMS (2,151 octets)
  and seals it again, as content type auth-enveloped-data, for alice's certificate (a
  public key). It sets the CEKReference attribute to R and picks the CEK itself (2,623
  octets). alice opens the outer envelope, then bob's, then bob's signature: every check
  passes (the context is bob's and signed, it names R and no reader, and both envelopes
  have one recipient key).
- Effect observed: ``alice.open`` accepts it (``readable_by=()``, keys used). alice keeps
  R with the HOP's CEK: ``exclusive=True, readers=frozenset()``; bob's own CEK for R is
  never kept. alice's 200 (SRTP offer) goes whole under ``kekri(R)``
  (``key_reuse=True, readable_by=()``). The hop opens it with its CEK: 1,698 octets of
  alice's signed SDP, with her ``inline:WVNf...`` SRTP key. bob gets ``DecryptionError``, but the hop already has the
  key. It can also re-seal alice's signed content to bob's certificate, so the call goes
  on and nobody sees the attack.
  Second form: bob knows the SDP-viewing proxy and splits. The hop wraps the view part the
  same way. alice keeps R (the hop's CEK) with readers {proxy}. Her 200's SDP view goes
  under ``kekri(R)`` alone (``split=True, readable_by=(proxy,)``). The hop reads about
  1,900 octets of it, media addresses included. The proxy that should view it cannot
  open it, with either its certificate or bob's real CEK for R (``DecryptionError``).
- Code at fault: ``e2m_plugins/ua.py:1520-1536`` (``_keep_received`` keeps
  ``opened.cek_references``, one per envelope layer, outermost first. The first one whose
  reference equals the signed ``context.cek_reference`` wins, and ``dialog_keys.py:466-470``
  (``_keep``) never replaces a kept reference). With ``layers.py:112-135``
  (``_open_layers`` opens envelope inside envelope, up to ``max_nesting_depth`` 4) and
  ``ua.py:1180-1181`` (``_refuse_keys_others_read`` only asks whether each envelope is for
  us alone, which a hop's wrap for us is).
- Suggested fix: keep a reference only from the envelope the sender made: the one whose
  plaintext is the SignedData that carries the context. A part with more than one
  envelope layer offers no key. Better still, refuse a sign-then-encrypt part with an
  envelope outside the sender's, since no E2M sender makes one. Bind the CEK to the offer
  too: the sender could sign a hash of the offered CEK (for instance HMAC(CEK, "e2m
  cek-reference" || R)) in the SIP context, and the receiver would keep R only when the
  envelope's CEK matches it. That also holds against a reader proxy that re-seals a
  single envelope.
- Tests: ``test_k1_hop_wrapped_offer_does_not_key_alices_answer`` (whole keyed SDP) and
  ``test_k1_hop_wrapped_split_offer_does_not_key_alices_view`` (the split's view).

Controls
- ``test_control_hop_wrap_is_accepted_and_the_hop_holds_r``: what the hop does is
  possible. alice accepts the wrapped INVITE, and the kept R is the hop's CEK. This test
  checks only that the attack can be mounted. It passes on f5fd795 and with any fix that
  keeps the wrapped INVITE usable.
- ``test_control_unwrapped_offer_keys_an_answer_bob_opens``: the honest call. alice keeps
  bob's CEK for R, her keyed 200 goes under ``kekri(R)``, bob opens it and finds alice's
  key, and a hop holding some other CEK cannot open it.

Tried and held
- A wrap that names a made-up reference W, or a wrap of a body that offered nothing (bob's
  200 under alice's INVITE key): the signed context names no W, so nothing is kept
  (``test_held_wrap_with_a_reference_bob_did_not_offer_keeps_nothing``).
- The sealed keys (``e2m-sdp-keys``) cannot be wrapped: they are a signed attribute, and
  their envelope is inside bob's signature. ``_keep_sealed`` keeps bob's own CEK. The
  split form (second K1 test) therefore leaks the SDP view, not the SRTP keys.
- A wrap for a receive-direction gain (the hop wraps bob's keyed SDP for alice): the hop
  reads nothing, because bob's inner envelope is still closed to it. Checked by reading:
  ``_for_us_alone`` accepts both layers, and the hop learns no key.
- 496-retry, retired keys and forks (read, not filed): ``retire_held_by`` retires only keys
  whose readers name the refusing host. ``settle`` drops a key offered in a request
  answered 496. A fork's keys live under its own tag. None of these gives a proxy a key
  kept exclusive. Each K1 test fails on f5fd795 on its own assertion (checked with
  ``--runxfail``: the hop read the key or the view).

Fixed (stop 50): a part's CEK reference is taken from its innermost envelope only, the
sender's (``OpenedPart.cek_references``, for the UA and the proxy alike): a hop can only
add envelopes outside it.  Both hole tests failed on the code before the fix and pass
with it; the premise control now checks that bob's key is the one kept for R.  (A first
fix refused every part sealed more than once; it changed the cost shape the budget
tests of reviews 158 to 165 build on, four-deep envelopes, and was not needed.)
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SDP_VIEW, SRTP_ANSWER, SRTP_OFFER, TRUSTED, known_proxy,
                           ua_engine)
from e2m_plugins import mime
from e2m_plugins.body import message_body, with_entity
from e2m_plugins.cms import oids
from e2m_plugins.cms.envelope import open_envelope, seal
from e2m_plugins.cms.recipients import KekLookup, recipient_for_certificate
from e2m_plugins.errors import E2MError
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import init_test_pki

ALICE_KEY = b"inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"    # SRTP_OFFER's key
BOB_KEY = b"inline:QUJDX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"      # SRTP_ANSWER's key


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob"), proxy_hosts=(TRUSTED,))


def _bobs_invite(pki, call_id: str, *, bob_knows_proxy: bool = False):
    """bob's protected INVITE to alice (keyed SDP), and the key bob offered in it (for the
    viewing proxy's case, the one the view offers: its readers name the proxy)."""
    proxies = (known_proxy(pki, TRUSTED, SDP_VIEW),) if bob_knows_proxy else ()
    bob = ua_engine(pki, "bob", peers=("alice",), proxies=proxies)
    inv = make_request("INVITE", "sip:alice@example.com", from_uri=pki.aor("bob"),
                       to_uri=pki.aor("alice"), call_id=call_id, cseq=1, from_tag="b1",
                       extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>")],
                       body=SRTP_ANSWER, content_type="application/sdp")
    sent = bob.protect(inv)
    assert sent.info.split == bob_knows_proxy
    offered = [k for k in bob.dialog_keys.kept(sent.message)
               if bool(k.readers) == bob_knows_proxy]
    assert len(offered) == 1, offered
    return bob, sent.message, offered[0]


def _hop_wrap(pki, message, reference: bytes):
    """What the hop sends on: the body's CMS sealed again for alice's certificate, with the
    CEKReference ``reference`` (read in the clear) and a CEK of the hop's.  Returns (the
    message, the hop's lookup for that CEK)."""
    part = message_body(message)
    inner = part.decoded()
    outer = seal(inner, [recipient_for_certificate(pki.user("alice").cert, use_ski=True)],
                 content_type=oids.AUTH_ENVELOPED_DATA, cek_reference=reference)
    entity = mime.smime_entity(outer.der, "authEnveloped-data", content_id=part.content_id,
                               handling=part.handling)
    look = KekLookup(lambda ref: outer.cek[::-1] if ref == reference else None)
    return with_entity(message, entity), look, outer.cek


def _alices_200(opened_invite, sdp: bytes):
    ok = make_response(opened_invite, 200, "OK", [("Contact", "<sip:alice@127.0.0.1:5061>")],
                       sdp, "application/sdp")
    return ok.replace("To", f"{opened_invite.get('To')};tag=a9")


def _hop_reads(message, look) -> bytes | None:
    """The plaintext of ``message``'s body for whoever holds ``look``'s CEK (None: closed)."""
    try:
        return open_envelope(message_body(message).decoded(), [look]).plaintext
    except E2MError:
        return None


def test_control_hop_wrap_opens_and_keeps_bobs_key_for_r(pki):
    """The premise, as it now ends: the wrapped INVITE (bob's envelope inside the hop's,
    R in the clear) opens at alice with bob's signature and keys, and what she keeps
    for R is bob's CEK, from the innermost envelope.  Before stop 50 it was the hop's."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    _bob, sent, offered = _bobs_invite(pki, "r186-c1")
    assert offered.reference in message_body(sent).decoded()      # R is in the clear
    wrapped, _look, hop_cek = _hop_wrap(pki, sent, offered.reference)
    got = alice.open(wrapped)
    assert BOB_KEY in got.message.body and got.info.trusted
    [kept] = alice.dialog_keys.kept(wrapped)
    assert kept.reference == offered.reference and kept.cek == offered.cek != hop_cek


def test_control_unwrapped_offer_keys_an_answer_bob_opens(pki):
    alice = ua_engine(pki, "alice", peers=("bob",))
    bob, sent, offered = _bobs_invite(pki, "r186-c2")
    got = alice.open(sent).message
    [kept] = alice.dialog_keys.kept(sent)
    assert kept.cek == offered.cek and kept.exclusive and not kept.readers
    ok = alice.protect(_alices_200(got, SRTP_OFFER))
    assert ok.info.key_reuse and not ok.info.readable_by
    assert ALICE_KEY in bob.open(ok.message).message.body
    _w, other_look, _c = _hop_wrap(pki, sent, offered.reference)
    assert _hop_reads(ok.message, other_look) is None


def test_k1_hop_wrapped_offer_does_not_key_alices_answer(pki):
    alice = ua_engine(pki, "alice", peers=("bob",))
    _bob, sent, offered = _bobs_invite(pki, "r186-k1")
    wrapped, look, _hop_cek = _hop_wrap(pki, sent, offered.reference)
    try:
        got = alice.open(wrapped).message
    except E2MError:
        return                       # refused: secure
    ok = alice.protect(_alices_200(got, SRTP_OFFER))
    plain = _hop_reads(ok.message, look)
    assert plain is None or ALICE_KEY not in plain, (ok.info, len(plain or b""))


def test_k1_hop_wrapped_split_offer_does_not_key_alices_view(pki):
    alice = ua_engine(pki, "alice", peers=("bob",))
    _bob, sent, offered = _bobs_invite(pki, "r186-k1s", bob_knows_proxy=True)
    assert offered.readers == frozenset({TRUSTED})
    wrapped, look, _hop_cek = _hop_wrap(pki, sent, offered.reference)
    try:
        got = alice.open(wrapped).message
    except E2MError:
        return
    ok = alice.protect(_alices_200(got, SRTP_OFFER))
    assert ok.info.split                     # alice's keys stay sealed (the view is the leak)
    plain = _hop_reads(ok.message, look)
    assert plain is None or b"c=IN IP4" not in plain, (ok.info, len(plain or b""))


def test_held_wrap_with_a_reference_bob_did_not_offer_keeps_nothing(pki):
    alice = ua_engine(pki, "alice", peers=("bob",))
    _bob, sent, _offered = _bobs_invite(pki, "r186-h1")
    wrapped, _look, hop_cek = _hop_wrap(pki, sent, b"r186-made-up-ref")
    try:
        alice.open(wrapped)
    except E2MError:
        return
    assert all(k.cek != hop_cek for k in alice.dialog_keys.kept(wrapped))
    assert all(k.reference != b"r186-made-up-ref" for k in alice.dialog_keys.kept(wrapped))
