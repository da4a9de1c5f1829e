"""Review 189: who holds a key, once more, on 14762fe's fix (a part's CEK reference comes
from its innermost envelope only, the sender's; ``OpenedPart.cek_references``), with the
earlier fixes of this stop (``_refuse_keys_others_read``, ``_for_us_alone``,
``PendingUses.exclusive/holders``, ``recipient_count`` per recipient key).

No hole found in the time given (about 20 minutes, tree 6b6757f).  Every attempt below
held, engine-level; each is a passing control here.

Controls
--------
- ``test_control_hop_wrap_for_alice_and_proxy_keeps_bobs_key_with_named_reader``: a hop
  wraps bob's split INVITE (his envelope for alice and the viewing proxy P, offering R)
  in an AuthEnvelopedData of its own for alice AND P, naming R with its own CEK
  (outer recipient count 2, inner 2).  alice opens it (bob's signature, keys from his
  sealed attribute), keeps bob's CEK for R (not the hop's) with readers {P}, never
  exclusive; her keyed 200 is split, and the hop's CEK opens nothing of it.
- ``test_control_reader_remade_envelope_fresh_reference_keeps_nothing``: P, a named
  reader, opens bob's envelope and re-makes it for alice alone (count 1) around bob's
  signed content, offering a reference R' of its own: bob's signed context names R,
  so nothing is kept (0 keys).  The innermost envelope is P's here: only the signed
  context's reference check stops it.
- ``test_control_reader_remade_envelope_same_reference_stays_with_its_reader``: the
  same re-made for alice alone naming R: P's CEK is kept for R, but with readers {P}
  from bob's signed context (recipient count 1 <= 1 + 1), not exclusive; alice's
  keyed 200 is split (the view under it, her keys sealed for bob alone), so P reads
  the view it was named for and no SRTP key (0 of 1 ``inline:`` in what P opens).
- ``test_control_cosigned_wrap_keeps_bobs_key``: nested signatures by two signers with
  envelopes between them: carol (a trusted user) signs over the hop's envelope for
  alice (naming R) which holds bob's whole CMS (envelope, then bob's signature).
  Layers S(carol), E(hop), E(bob), S(bob): ``envelopes[-1]`` is bob's; alice keeps
  bob's CEK (carol's signature has no SIP context, bob's is the one context).
- ``test_control_encrypt_then_sign_wrap_keeps_bobs_key``: RFC 3261 §23.2's order, built
  by hand: bob's SignedData (his signed context naming R) over his own envelope for
  alice (R), then the hop's envelope around it naming R.  Layers E(hop), S(bob),
  E(bob): the innermost is bob's; kept CEK = bob's.
- ``test_control_proxy_keeps_bobs_key_not_the_hops``: the proxy side (3).  A hop wraps
  bob's split INVITE for P and alice with (a) R itself, (b) a reference R_h bob never
  offered.  P's engine views the SDP in both, and keeps bob's CEK for R (keeper
  bob), nothing under R_h (not kept, so no quota spent for it); in (a) the kept
  CEK is bob's, not the hop's, with bob's CEKMaxDecrypts (none).
- ``test_control_honest_reuse_through_viewing_proxy``: honest flow (4), engine path
  bob -> P -> alice and back: alice's 200 reuses bob's offered key (readers {P}), P
  views both SDPs and its cached CEK for R is the one alice reused; bob opens it.

Tried and held
--------------
- (1) envelope order: layers are appended outermost first (``layers._open_layers``),
  through CMS nesting and MIME nesting alike (a multipart/signed's first part, an
  entity inside a plaintext); a hop can only add layers outside the sender's
  signature, so the sender's envelope stays innermost in sign-then-encrypt,
  encrypt-then-sign and co-signed nestings (controls above).  The innermost envelope
  is someone else's only when that one could read the sender's signed content: a
  named reader (its re-made key is kept with it as a reader) or, for a fresh
  reference, nobody keeps anything (the signed context's ``cek_reference`` must
  match: ua.py ``_keep_received``, proxy.py ``_keep_keys``).
- (2) the UA judges every envelope of a whole keyed SDP (``all(_for_us_alone(e) for e
  in chosen.envelopes)``): a hop's outer envelope for alice alone does not make
  bob's inner one for alice and P "ours alone", and an outer one for two makes an
  honest body fail (only a denial, which a hop has anyway).  ``_keep_received``
  reads the recipient count and kekri holders of the innermost envelope, the one
  whose CEK it keeps.
- (3) proxy: a hop's outer envelope's reference is never kept, and its
  CEKMaxDecrypts cannot win over the sender's (the innermost is last in the loop
  of ``_keep_keys``).  Legacy bodies (no signed context) are kept under the shared
  unsigned quota whatever their layering, as documented; a CBC envelope's
  unprotected reference is RFC 3185's own weakness, documented in
  docs/protocol.md §2.
- The controls can fail: with ``cek_references`` put back to every envelope's
  reference (the code before review 186's fix), 4 of the 8 fail (the hop wrap for
  alice and P, the co-signed and encrypt-then-sign wraps, the proxy's R case: the
  hop's CEK kept for R).
- (4) tests/unit/test_review186_rewrapped_offer.py and
  tests/kamailio/test_review127_cek_reuse_wire.py: 11 passed on 6b6757f (44 s); the
  honest engine flow above passes.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SDP_VIEW, SRTP_ANSWER, SRTP_OFFER, TRUSTED, known_proxy,
                           proxy_engine, ua_engine)
from e2m_plugins import mime
from e2m_plugins.body import message_body, with_entity
from e2m_plugins.cms import oids
from e2m_plugins.cms.envelope import open_envelope, seal
from e2m_plugins.cms.recipients import CertificateKey, KekLookup, recipient_for_certificate
from e2m_plugins.cms.signed import sign
from e2m_plugins.errors import E2MError
from e2m_plugins.proxy import kept_namer, message_scope
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.sipcontext import context_for
from e2m_plugins.testpki import init_test_pki

ALICE_KEY = b"inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"    # SRTP_OFFER's key
BOB_KEY = b"inline:QUJDX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"      # SRTP_ANSWER's key


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob", "carol"), proxy_hosts=(TRUSTED,))


def _viewing(pki):
    return (known_proxy(pki, TRUSTED, SDP_VIEW),)


def _bobs_invite(pki, call_id: str, *, split: bool = True):
    bob = ua_engine(pki, "bob", peers=("alice",), proxies=_viewing(pki) if split else ())
    inv = make_request("INVITE", "sip:alice@example.com", from_uri=pki.aor("bob"),
                       to_uri=pki.aor("alice"), call_id=call_id, cseq=1, from_tag="b1",
                       extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>")],
                       body=SRTP_ANSWER, content_type="application/sdp")
    sent = bob.protect(inv)
    assert sent.info.split == split
    [offered] = [k for k in bob.dialog_keys.kept(sent.message) if bool(k.readers) == split]
    return bob, sent.message, offered


def _alice(pki):
    return ua_engine(pki, "alice", peers=("bob",), proxies=_viewing(pki))


def _recip(pki, who: str):
    cert = pki.proxy(who).cert if who == TRUSTED else pki.user(who).cert
    return recipient_for_certificate(cert, use_ski=True)


def _entity(message, der: bytes, smime_type: str = "authEnveloped-data"):
    part = message_body(message)
    return with_entity(message, mime.smime_entity(der, smime_type, content_id=part.content_id,
                                                  handling=part.handling))


def _hop_wrap(pki, message, reference: bytes, recipients=("alice",)):
    """The body's CMS sealed again by the hop, naming ``reference`` with its own CEK."""
    inner = message_body(message).decoded()
    outer = seal(inner, [_recip(pki, r) for r in recipients],
                 content_type=oids.AUTH_ENVELOPED_DATA, cek_reference=reference)
    return _entity(message, outer.der), outer.cek


def _look(cek: bytes, reference: bytes) -> KekLookup:
    return KekLookup(lambda ref: cek[::-1] if ref == reference else None)


def _reads(message, lookup) -> bytes | None:
    try:
        return open_envelope(message_body(message).decoded(), [lookup]).plaintext
    except E2MError:
        return None


def _proxy_opens_bobs_envelope(pki, message) -> bytes:
    cred = pki.proxy(TRUSTED)
    env = open_envelope(message_body(message).decoded(), [CertificateKey(cred.cert, cred.key)])
    assert env.content_type == "signed-data"
    return env.plaintext


def _alices_200(opened_invite, sdp: bytes = SRTP_OFFER):
    ok = make_response(opened_invite, 200, "OK", [("Contact", "<sip:alice@127.0.0.1:5061>")],
                       sdp, "application/sdp")
    return ok.replace("To", f"{opened_invite.get('To')};tag=a9")


def _proxy_kept(proxy, message, reference):
    return proxy.cache.get(message_scope(message), kept_namer(message)(reference), count=False)


# ---------------------------------------------------------------------------- UA side


def test_control_hop_wrap_for_alice_and_proxy_keeps_bobs_key_with_named_reader(pki):
    alice = _alice(pki)
    _bob, sent, offered = _bobs_invite(pki, "r189-c1")
    wrapped, hop_cek = _hop_wrap(pki, sent, offered.reference, ("alice", TRUSTED))
    got = alice.open(wrapped)
    assert got.info.trusted and got.info.split and BOB_KEY in got.message.body
    # (bob's sealed keys' own reference is kept too, exclusive: his signed attribute)
    [kept] = [k for k in alice.dialog_keys.kept(wrapped) if k.reference == offered.reference]
    assert kept.cek == offered.cek != hop_cek
    assert not any(k.cek == hop_cek for k in alice.dialog_keys.kept(wrapped))
    assert kept.readers == frozenset({TRUSTED}) and not kept.exclusive
    ok = alice.protect(_alices_200(got.message))
    assert ok.info.split
    assert _reads(ok.message, _look(hop_cek, offered.reference)) is None


def test_control_reader_remade_envelope_fresh_reference_keeps_nothing(pki):
    alice = _alice(pki)
    _bob, sent, offered = _bobs_invite(pki, "r189-c2")
    signed = _proxy_opens_bobs_envelope(pki, sent)
    fresh = b"\x42" * 16
    remade = seal(signed, [_recip(pki, "alice")], content_type=oids.SIGNED_DATA,
                  cek_reference=fresh)
    got = alice.open(_entity(sent, remade.der))
    assert BOB_KEY in got.message.body
    kept = alice.dialog_keys.kept(sent)
    assert not any(k.reference == fresh or k.cek == remade.cek for k in kept)
    assert not any(k.reference == offered.reference for k in kept)


def test_control_reader_remade_envelope_same_reference_stays_with_its_reader(pki):
    alice = _alice(pki)
    _bob, sent, offered = _bobs_invite(pki, "r189-c3")
    signed = _proxy_opens_bobs_envelope(pki, sent)
    remade = seal(signed, [_recip(pki, "alice")], content_type=oids.SIGNED_DATA,
                  cek_reference=offered.reference)
    got = alice.open(_entity(sent, remade.der))
    kept = [k for k in alice.dialog_keys.kept(sent) if k.reference == offered.reference]
    assert len(kept) == 1 and kept[0].cek == remade.cek
    assert kept[0].readers == frozenset({TRUSTED}) and not kept[0].exclusive
    ok = alice.protect(_alices_200(got.message))
    assert ok.info.split and ok.info.readable_by == (TRUSTED,)
    seen = _reads(ok.message, _look(remade.cek, offered.reference))
    assert seen is not None and ALICE_KEY not in seen      # the view, never her keys


def test_control_cosigned_wrap_keeps_bobs_key(pki):
    alice = _alice(pki)
    _bob, sent, offered = _bobs_invite(pki, "r189-c4")
    inner = message_body(sent).decoded()
    hop = seal(inner, [_recip(pki, "alice")], content_type=oids.AUTH_ENVELOPED_DATA,
               cek_reference=offered.reference)
    carol = pki.user("carol")
    cosigned = sign(hop.der, carol.cert, carol.key, content_type=oids.AUTH_ENVELOPED_DATA)
    got = alice.open(_entity(sent, cosigned, "signed-data"))    # S(carol) E(hop) E(bob) S(bob)
    assert BOB_KEY in got.message.body
    [kept] = [k for k in alice.dialog_keys.kept(sent) if k.reference == offered.reference]
    assert kept.cek == offered.cek != hop.cek


def test_control_encrypt_then_sign_wrap_keeps_bobs_key(pki):
    """bob's RFC 3261 §23.2 body (his signature over his envelope), hop-wrapped."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    bob = pki.user("bob")
    inv = make_request("INVITE", "sip:alice@example.com", from_uri=pki.aor("bob"),
                       to_uri=pki.aor("alice"), call_id="r189-c5", cseq=1, from_tag="b1",
                       extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>")],
                       body=SRTP_ANSWER, content_type="application/sdp")
    reference = b"\x17" * 16
    bobs_env = seal(mime.inner_entity("application/sdp", SRTP_ANSWER),
                    [_recip(pki, "alice")], cek_reference=reference)
    cid = mime.new_content_id("example.com")
    context = context_for(inv, time=__import__("time").time(), readers=(), content_id=cid,
                          handling="required", cek_reference=reference)
    signed = sign(bobs_env.der, bob.cert, bob.key, content_type=oids.AUTH_ENVELOPED_DATA,
                  extra_attributes=((oids.SIP_CONTEXT, context.encode()),))
    hop = seal(signed, [_recip(pki, "alice")], content_type=oids.SIGNED_DATA,
               cek_reference=reference)
    message = with_entity(inv, mime.smime_entity(hop.der, "authEnveloped-data",
                                                 content_id=cid, handling="required"))
    got = alice.open(message)                                    # E(hop) S(bob) E(bob)
    kept = [k for k in alice.dialog_keys.kept(message) if k.reference == reference]
    assert kept and all(k.cek == bobs_env.cek != hop.cek for k in kept), got.info


# ---------------------------------------------------------------------------- proxy side


@pytest.mark.parametrize("same_reference", [True, False], ids=["R", "R_h"])
def test_control_proxy_keeps_bobs_key_not_the_hops(pki, same_reference):
    proxy = proxy_engine(pki, TRUSTED, view=SDP_VIEW)
    _bob, sent, offered = _bobs_invite(pki, f"r189-c6-{same_reference}")
    hop_ref = offered.reference if same_reference else b"\x5a" * 16
    wrapped, hop_cek = _hop_wrap(pki, sent, hop_ref, (TRUSTED, "alice"))
    verdict = proxy.inspect(wrapped)
    assert verdict.action == "forward", verdict
    assert any(s.content_type == "application/sdp" for s in verdict.seen)
    kept = _proxy_kept(proxy, wrapped, offered.reference)
    assert kept is not None and kept.cek == offered.cek != hop_cek
    assert kept.keeper and "bob" in kept.keeper
    if not same_reference:
        assert _proxy_kept(proxy, wrapped, hop_ref) is None


def test_control_honest_reuse_through_viewing_proxy(pki):
    proxy = proxy_engine(pki, TRUSTED, view=SDP_VIEW)
    alice = _alice(pki)
    bob, sent, offered = _bobs_invite(pki, "r189-c7")
    verdict = proxy.inspect(sent)
    assert verdict.action == "forward", verdict
    got = alice.open(sent)
    ok = alice.protect(_alices_200(got.message))
    assert ok.info.key_reuse and ok.info.split and ok.info.readable_by == (TRUSTED,)
    back = proxy.inspect(ok.message)
    assert back.action == "forward"
    assert any(s.content_type == "application/sdp" and b"m=audio" in s.plaintext
               for s in back.seen)
    assert _proxy_kept(proxy, sent, offered.reference).cek == offered.cek
    assert ALICE_KEY in bob.open(ok.message).message.body
