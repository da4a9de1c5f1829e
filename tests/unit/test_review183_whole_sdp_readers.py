"""Review 183 (attacker's review of 3c955cd): who else reads a whole keyed SDP a UA uses.

3c955cd made ``UAEngine._refuse_keys_others_read`` refuse a keyed SDP sealed whole unless
the receiver is its envelope's one recipient (``recipient_count == 1``, any count for a
``[[legacy]]`` peer) and the sender names no reader.  A RecipientInfo count is not a
reader count, and the chosen part is not the whole body.

Hole K1: a keyed SDP sealed whole under a reused CEK the proxy holds is used
- Attacker: bob (or a buggy peer) answering alice, whose INVITE the SDP-viewing proxy
  read (alice knows ``proxy.example.com`` with ``view = INVITE:application/sdp``); the
  proxy is the one who gains bob's media key.
- Messages: alice's split SRTP INVITE (SDP view sealed for bob and the proxy, with a
  CEKReference: alice keeps that CEK with readers {proxy}).  bob's 200 carries
  ``flows.SRTP_ANSWER`` whole, signed, its context naming no reader, sealed under ONE
  kekri: ``reuse_kek(cek, reference)`` of alice's INVITE (RFC 3185, KEK = reversed CEK).
- Effect observed: ``alice.open`` accepts it, ``SecurityInfo(readable_by=(),
  key_reuse=True, split=False)`` and the SDP handed to the phone holds bob's
  ``inline:QUJD...`` key; the proxy opens the same envelope with the CEK it read from
  the INVITE (1,668 octets of plaintext, key included).
- Code at fault: ``e2m_plugins/ua.py:1171`` (``shared`` counts RecipientInfos only; a
  kekri's holders are the dialog key's ``readers``, never looked at) and
  ``ua.py:1172`` (``_readers_of`` is the sender's word only).
- Suggested fix: when any envelope of the chosen part was opened by a kekri, take the
  found ``DialogKey`` (``PendingUses._found``) and refuse unless it is ``exclusive`` with
  no ``readers`` (what ``DialogKeys.reuse(exclusive=True)`` demands of our own sends).
- Test: ``test_k1_whole_keyed_answer_under_a_cek_the_proxy_holds_is_refused``.

Hole K2: sealed SDP keys under a reused CEK the proxy holds are used
- Attacker, messages: as K1, but bob splits: the view sealed under the kekri, its
  context naming the proxy, and ``e2m-sdp-keys`` = ``seal_keys(keys, reuse_kek(cek,
  reference))``: one RecipientInfo, so ``open_sealed_keys`` passes it.
- Effect observed: ``alice.open`` accepts, ``split=True, key_reuse=True``, the phone's
  SDP holds ``inline:QUJD...``; the proxy's ``open_sealed_keys`` with the INVITE's CEK
  returns the same keying line (1 line).
- Code at fault: ``e2m_plugins/body.py:452`` (``recipient_count != 1`` is the only
  test; a kekri recipient is whoever holds the CEK) and ``ua.py:1148``
  (``_with_sealed_keys`` passes the dialog keys without their readers).
- Suggested fix: as K1, for the sealed-keys envelope: a kekri there must name a dialog
  key with no readers (``exclusive``), else ``InconsistentSplitError``.
- Test: ``test_k2_sealed_keys_under_a_cek_the_proxy_holds_are_refused``.

Hole K3: a ``[[legacy]]`` peer may seal its keyed SDP for anyone
- Attacker: a ``[[legacy]]`` peer (bob: reSIProcate-like, CBC, unsigned or signed).
- Messages: bob's INVITE with ``flows.SRTP_OFFER`` whole, sealed (AES-128-CBC, ktri) for
  alice and the proxy (or alice and carol, or alice, bob and the proxy), no label.
- Effect observed: accepted every time, ``readable_by=()``, the phone's SDP holds
  bob's key; the docstring and docs/protocol.md allow "one for itself", the code allows
  any number of recipients of any identity (4 of 4 variants accepted).
- Code at fault: ``e2m_plugins/ua.py:1171`` (``legacy is None and ...``: the count is not
  looked at for a legacy peer at all).
- Suggested fix: for a legacy peer allow at most two RecipientInfos, every one naming
  our certificate or the legacy peer's own (issuer-serial or SKI of the certificate we
  hold for it); else refuse.
- Test: ``test_k3_legacy_peer_sealing_its_keys_for_others_is_refused`` (3 cases).

Hole K4: a second part alice opens carries the same keys, sealed for the proxy too
- Attacker: bob (as 179 K1).
- Messages: bob's 200 as ``multipart/mixed``: part 1 ``SRTP_ANSWER`` sealed for alice
  alone (required, no reader), part 2 the same keyed SDP sealed for alice and the
  proxy (required), its context naming the proxy, labelled for its Content-ID.
- Effect observed: accepted, ``readable_by=()``, the phone's SDP holds ``inline:QUJD``;
  alice opened part 2 herself (it is in ``offered``) and never checked it.
- Code at fault: ``e2m_plugins/ua.py:1121`` (only ``chosen`` is checked; the other
  opened parts, and their readers, are not).
- Suggested fix: a keyed whole SDP must be the body's only top part (see K5); at least,
  run the check over every opened part and the readers of all of them.
- Test: ``test_k4_same_keys_in_a_second_part_the_proxy_reads_are_refused``.

Hole K5: an ``optional`` part for the proxy beside a keyed SDP for alice alone
- Attacker: bob.
- Messages: bob's 200 as ``multipart/mixed``: part 1 ``SRTP_ANSWER`` sealed for alice
  alone (required), part 2 the same keyed SDP sealed for the proxy alone,
  ``handling=optional``, labelled for the proxy by its Content-ID (also with no label).
- Effect observed: accepted, ``readable_by=()``, keys used; the proxy opens part 2
  with its certificate key and reads ``inline:QUJD...``.  Alice cannot read part 2,
  but sees a part for someone else beside keys she is told only she reads.
- Code at fault: ``e2m_plugins/ua.py:1100`` (a part not for us is skipped) with
  ``ua.py:1121`` (the keys check ignores that there was one).
- Suggested fix: a keyed whole SDP is used only when it is the body's only top part
  (the UA's own split never sends more; the draft's "full copy + view" form then needs
  its keys split, as ours).
- Test: ``test_k5_keys_beside_a_part_for_the_proxy_are_refused`` (labelled, unlabelled).

Controls
- ``test_control_the_proxy_holds_the_invites_cek``: the proxy opens alice's INVITE
  envelope with its own key and gets a CEK and reference (K1/K2's premise).
- ``test_control_honest_calls_use_their_keys``: SRTP calls with the SDP-viewing proxy
  known to nobody, both, alice only, bob only: answer, bob's re-INVITE, alice's 200 to
  it and alice's UPDATE all open with the peer's key (16 opens).
- ``test_control_legacy_peer_sealing_for_us_and_itself_is_accepted``: a legacy peer's
  keyed SDP for alice and bob (and alice alone) is used.
- ``test_control_keyed_sdp_for_alice_alone_is_used``: the honest single part.

Tried and held
- Keying lines in forms ``has_keys`` might miss (``a=acap:1 crypto:``, ``a=crypto 1``,
  ``a=CRYPTO:``, a ``k=clear:`` line, a configured ``x-key`` attribute, a bare-CR line
  end, ``a=key-mgmt:mikey``), sealed whole for alice and the proxy: all 7 refused
  (``InconsistentSplitError``, the bare CR by the fail-closed parse)
  (``test_held_keying_forms_sealed_for_the_proxy_are_refused``).
- A legacy peer whose label names the proxy (for the whole body): refused
  (``test_held_legacy_label_naming_the_proxy_is_refused``).
- A signed-only (not encrypted) keyed SDP: ``require_e2m`` on, ``DowngradeError``; off,
  accepted (``encrypted=False``), which is what ``require = false`` chooses for plaintext
  anyway (``test_held_signed_only_keyed_sdp``).
- tests/e2e/test_two_phones.py on 9f1ec56: 9 passed in 12.4 s (the honest phone calls).
- The strict-xfail tests were checked with ``--runxfail``: every hole test fails on its
  own assertion (the keys were used), none on a set-up error.

Fixed (stop 50): ``UAEngine._refuse_keys_others_read`` uses keys in a whole SDP only
when it is the body's one top part (K4, K5), no reader is named, and each envelope is
for us alone (``_for_us_alone``): under a dialog key, one no proxy holds
(``PendingUses.exclusive``: K1; the same check for the sealed keys' envelope: K2); else
one recipient key, or for a ``[[legacy]]`` peer two, naming only our certificate and
its own (``recipients.addressed_only_to``: K3).  While at it, ``recipient_count`` now
counts recipient keys, not RecipientInfos (one kari may carry several), and a kept key
whose envelope had more holders than the sender named is never exclusive.  Every hole
test failed on the code before the fix and passes with it; the controls still pass.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import (SDP_VIEW, SRTP_ANSWER, SRTP_OFFER, TRUSTED, answer, invite,
                           known_proxy, reinvite, ua_engine)
from e2m_plugins import headers as hdr, mime
from e2m_plugins.body import (message_body, open_part, open_sealed_keys, protect_content,
                              seal_keys, top_parts, with_entity)
from e2m_plugins.cms import oids
from e2m_plugins.cms.envelope import open_envelope
from e2m_plugins.cms.recipients import (CertificateKey, KekLookup, recipient_for_certificate,
                                        reuse_kek)
from e2m_plugins.cms.signed import sign
from e2m_plugins.config import LegacyPeer
from e2m_plugins.errors import DowngradeError, E2MError, InconsistentSplitError
from e2m_plugins.sdp import separate_keys
from e2m_plugins.sip import make_request
from e2m_plugins.sipcontext import context_for
from e2m_plugins.testpki import init_test_pki

BOB_KEY = b"inline:QUJDX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"     # SRTP_ANSWER's key


@pytest.fixture(scope="module")
def pki():
    return init_test_pki(None, users=("alice", "bob", "carol"), proxy_hosts=(TRUSTED,))


@pytest.fixture(scope="module")
def rsa_pki():
    return init_test_pki(None, users=("alice", "bob", "carol"), proxy_hosts=(TRUSTED,),
                         key_type="rsa")


def _sdp_proxy(pki):
    return (known_proxy(pki, TRUSTED, SDP_VIEW),)


def _uses_keys(engine, msg) -> bool:
    """Whether ``engine`` hands its phone an SDP with bob's key (False: refused)."""
    try:
        opened = engine.open(msg)
    except E2MError:
        return False
    return BOB_KEY in (opened.message.body or b"")


# -- K1 / K2: a kekri under the CEK of an INVITE the proxy read ---------------------------

def _reused_key_answer(pki, call_id: str, *, split: bool):
    """alice's split SRTP INVITE read by the proxy; bob's 200 under its CEK (kekri).
    Returns (alice, the 200, the proxy's KekLookup for that CEK)."""
    alice = ua_engine(pki, "alice", peers=("bob",), proxies=_sdp_proxy(pki))
    bob = ua_engine(pki, "bob", peers=("alice",), proxies=_sdp_proxy(pki))
    sent = alice.protect(invite(pki, SRTP_OFFER, call_id=call_id))
    assert sent.info.split and sent.info.readable_by == (TRUSTED,)
    proxy = pki.proxy(TRUSTED)
    env = open_envelope(top_parts(message_body(sent.message))[0].decoded(),
                        [CertificateKey(proxy.cert, proxy.key)], want_cek=True)
    ok = answer(bob.open(sent.message).message, SRTP_ANSWER)
    kek = reuse_kek(env.cek, env.cek_reference)
    bob_cred = pki.user("bob")
    common = dict(signer=(bob_cred.cert, bob_cred.key), bind_to=ok, at=time.time(),
                  content_id=mime.new_content_id("example.com"))
    if split:
        view, keys = separate_keys(SRTP_ANSWER)
        entity, _ = protect_content("application/sdp", view, [kek], readers=[TRUSTED],
                                    sealed_keys=seal_keys(keys, kek).der, **common)
        msg = with_entity(ok, entity).add(
            hdr.PROXY_REQUIRED_BODY, hdr.format_proxy_required_body(hdr.BodyLabel(TRUSTED, ())))
    else:
        entity, _ = protect_content("application/sdp", SRTP_ANSWER, [kek], readers=[], **common)
        msg = with_entity(ok, entity)
    look = KekLookup(lambda ref: env.cek[::-1] if ref == env.cek_reference else None)
    return alice, msg, look


def test_control_the_proxy_holds_the_invites_cek(pki):
    _, whole, look = _reused_key_answer(pki, "r183-c-whole", split=False)
    plain = open_envelope(message_body(whole).decoded(), [look]).plaintext
    assert BOB_KEY in plain                      # the proxy reads bob's whole SDP
    _, split, look = _reused_key_answer(pki, "r183-c-split", split=True)
    alice = ua_engine(pki, "alice")
    opened = open_part(top_parts(message_body(split))[0], [look],
                       trust_anchors=alice.config.trust_anchors)
    keys, _ = open_sealed_keys(opened, [look], sender=pki.aor("bob"))
    assert any(BOB_KEY.decode() in line for _, line in keys.lines)   # and the sealed keys


def test_k1_whole_keyed_answer_under_a_cek_the_proxy_holds_is_refused(pki):
    alice, msg, _ = _reused_key_answer(pki, "r183-k1", split=False)
    assert not _uses_keys(alice, msg)


def test_k2_sealed_keys_under_a_cek_the_proxy_holds_are_refused(pki):
    alice, msg, _ = _reused_key_answer(pki, "r183-k2", split=True)
    assert not _uses_keys(alice, msg)


# -- K3: a [[legacy]] peer ------------------------------------------------------------------

_LENIENT = dict(accept_unsigned=True, accept_unsigned_cbc=True)


def _legacy_invite(pki, call_id: str, recipients: list[str], labels: tuple[str, ...] = (),
                   sdp: bytes = SRTP_OFFER):
    """bob's (a reSIProcate-like peer's) INVITE: ``sdp`` whole, CBC, ktri, unsigned."""
    msg = make_request("INVITE", "sip:alice@example.com", from_uri=pki.aor("bob"),
                       to_uri=pki.aor("alice"), call_id=call_id, cseq=1, from_tag="b1",
                       extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>")],
                       body=sdp, content_type="application/sdp")
    certs = {"alice": pki.user("alice").cert, "bob": pki.user("bob").cert,
             "carol": pki.user("carol").cert, TRUSTED: pki.proxy(TRUSTED).cert}
    entity, _ = protect_content("application/sdp", sdp,
                                [recipient_for_certificate(certs[r]) for r in recipients],
                                cipher="aes-128-cbc",
                                content_id=mime.new_content_id("example.com"))
    msg = with_entity(msg, entity)
    for host in labels:
        msg = msg.add(hdr.PROXY_REQUIRED_BODY,
                      hdr.format_proxy_required_body(hdr.BodyLabel(host, ())))
    return msg


def _legacy_alice(pki):
    return ua_engine(pki, "alice", peers=("bob",),
                     legacy=(LegacyPeer(pki.aor("bob"), **_LENIENT),))


def _legacy_uses(pki, msg) -> bool:
    try:
        opened = _legacy_alice(pki).open(msg)
    except E2MError:
        return False
    return b"inline:WVNf" in (opened.message.body or b"")


@pytest.mark.parametrize("recipients", [["alice", TRUSTED], ["alice", "carol"],
                                        ["alice", "bob", TRUSTED]])
def test_k3_legacy_peer_sealing_its_keys_for_others_is_refused(rsa_pki, recipients):
    msg = _legacy_invite(rsa_pki, f"r183-k3-{len(recipients)}-{recipients[-1]}", recipients)
    assert not _legacy_uses(rsa_pki, msg)


@pytest.mark.parametrize("recipients", [["alice"], ["alice", "bob"]])
def test_control_legacy_peer_sealing_for_us_and_itself_is_accepted(rsa_pki, recipients):
    msg = _legacy_invite(rsa_pki, f"r183-c3-{len(recipients)}", recipients)
    assert _legacy_uses(rsa_pki, msg)


def test_held_legacy_label_naming_the_proxy_is_refused(rsa_pki):
    for recipients in (["alice"], ["alice", TRUSTED]):
        msg = _legacy_invite(rsa_pki, f"r183-h3-{len(recipients)}", recipients, (TRUSTED,))
        with pytest.raises(InconsistentSplitError):
            _legacy_alice(rsa_pki).open(msg)


# -- K4 / K5: a second top part ------------------------------------------------------------

def _two_part_answer(pki, call_id: str, parts, *, label_cids: bool = True):
    """alice's SRTP INVITE to bob (no proxy of hers); bob's 200 whose body is a
    multipart/mixed of ``parts``: (sdp, recipients, handling, readers) each, signed by
    bob, each context naming its readers (labelled by Content-ID)."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    bob = ua_engine(pki, "bob", peers=("alice",), proxies=_sdp_proxy(pki))
    sent = alice.protect(invite(pki, SRTP_OFFER, call_id=call_id)).message
    ok = answer(bob.open(sent).message, SRTP_ANSWER)
    certs = {"alice": pki.user("alice").cert, TRUSTED: pki.proxy(TRUSTED).cert}
    bob_cred = pki.user("bob")
    entities, labels = [], []
    for sdp, recipients, handling, readers in parts:
        cid = mime.new_content_id("example.com")
        entity, _ = protect_content(
            "application/sdp", sdp,
            [recipient_for_certificate(certs[r], use_ski=True) for r in recipients],
            signer=(bob_cred.cert, bob_cred.key), bind_to=ok, readers=readers,
            at=time.time(), content_id=cid, handling=handling)
        entities.append(entity)
        labels += [(host, cid) for host in readers]
    msg = with_entity(ok, entities[0] if len(entities) == 1 else mime.multipart_mixed(entities))
    if label_cids:
        for host, cid in labels:
            msg = msg.add(hdr.PROXY_REQUIRED_BODY,
                          hdr.format_proxy_required_body(hdr.BodyLabel(host, (cid,))))
    return alice, msg


def test_k4_same_keys_in_a_second_part_the_proxy_reads_are_refused(pki):
    alice, msg = _two_part_answer(pki, "r183-k4", [
        (SRTP_ANSWER, ["alice"], "required", []),
        (SRTP_ANSWER, ["alice", TRUSTED], "required", [TRUSTED])])
    assert not _uses_keys(alice, msg)


@pytest.mark.parametrize("labelled", [True, False])
def test_k5_keys_beside_a_part_for_the_proxy_are_refused(pki, labelled):
    alice, msg = _two_part_answer(pki, f"r183-k5-{labelled}", [
        (SRTP_ANSWER, ["alice"], "required", []),
        (SRTP_ANSWER, [TRUSTED], "optional", [TRUSTED])], label_cids=labelled)
    # the proxy reads the keys in the part meant for it
    proxy = pki.proxy(TRUSTED)
    second = top_parts(message_body(msg))[1]
    assert BOB_KEY in open_envelope(second.decoded(),
                                    [CertificateKey(proxy.cert, proxy.key)]).plaintext
    assert not _uses_keys(alice, msg)


def test_control_keyed_sdp_for_alice_alone_is_used(pki):
    alice, msg = _two_part_answer(pki, "r183-c4", [(SRTP_ANSWER, ["alice"], "required", [])])
    assert _uses_keys(alice, msg)


# -- honest flows -----------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["none", "both", "alice", "bob"])
def test_control_honest_calls_use_their_keys(pki, who):
    sp = _sdp_proxy(pki)
    alice = ua_engine(pki, "alice", peers=("bob",), proxies=sp if who in ("both", "alice") else ())
    bob = ua_engine(pki, "bob", peers=("alice",), proxies=sp if who in ("both", "bob") else ())
    call_id = f"r183-honest-{who}"
    sent = alice.protect(invite(pki, SRTP_OFFER, call_id=call_id))
    got = bob.open(sent.message).message
    assert b"inline:WVNf" in got.body
    ok = bob.protect(answer(got, SRTP_ANSWER))
    assert BOB_KEY in alice.open(ok.message).message.body
    re_invite = bob.protect(reinvite(pki, "bob", "alice", call_id, 2, "b1", "a1", SRTP_ANSWER))
    opened = alice.open(re_invite.message)
    assert re_invite.info.key_reuse and BOB_KEY in opened.message.body
    ok2 = alice.protect(answer(opened.message, SRTP_OFFER))
    assert b"inline:WVNf" in bob.open(ok2.message).message.body
    update = alice.protect(invite(pki, SRTP_OFFER, call_id=call_id, cseq=2, to_tag="b1",
                                  method="UPDATE"))
    assert b"inline:WVNf" in bob.open(update.message).message.body


# -- tried and held ---------------------------------------------------------------------------

_CRYPTO_TAIL = b" AES_CM_128_HMAC_SHA1_80 inline:QUJDX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"
_BASE = SRTP_ANSWER.replace(b"a=crypto:1" + _CRYPTO_TAIL + b"\r\n", b"")
_FORMS = {
    "acap": _BASE + b"a=acap:1 crypto:1" + _CRYPTO_TAIL + b"\r\n",
    "spaced": _BASE + b"a=crypto 1" + _CRYPTO_TAIL + b"\r\n",
    "upper": _BASE + b"a=CRYPTO:1" + _CRYPTO_TAIL + b"\r\n",
    "k-line": _BASE.replace(b"t=0 0\r\n", b"t=0 0\r\nk=clear:c2VjcmV0c2VjcmV0\r\n"),
    "configured": _BASE + b"a=x-key:1" + _CRYPTO_TAIL + b"\r\n",
    "bare-cr": _BASE + b"a=rtcp-mux\ra=crypto:1" + _CRYPTO_TAIL + b"\r\n",
    "mikey": _BASE + b"a=key-mgmt:mikey AQAFgM0XflABAAAAAAAAAAAAAAsAyO5R\r\n",
}


@pytest.mark.parametrize("form", sorted(_FORMS))
def test_held_keying_forms_sealed_for_the_proxy_are_refused(pki, form):
    assert b"crypto:1" + _CRYPTO_TAIL not in _BASE
    alice = ua_engine(pki, "alice", peers=("bob",), keying_attributes=("crypto", "key-mgmt",
                                                                        "x-key"))
    bob = ua_engine(pki, "bob", peers=("alice",))
    sent = alice.protect(invite(pki, SRTP_OFFER, call_id=f"r183-form-{form}")).message
    ok = answer(bob.open(sent).message, _FORMS[form])
    bob_cred = pki.user("bob")
    entity, _ = protect_content(
        "application/sdp", _FORMS[form],
        [recipient_for_certificate(pki.user("alice").cert, use_ski=True),
         recipient_for_certificate(pki.proxy(TRUSTED).cert, use_ski=True)],
        signer=(bob_cred.cert, bob_cred.key), bind_to=ok, readers=[], at=time.time(),
        content_id=mime.new_content_id("example.com"))
    with pytest.raises(InconsistentSplitError):
        alice.open(with_entity(ok, entity))


@pytest.mark.parametrize("require", [True, False])
def test_held_signed_only_keyed_sdp(pki, require):
    alice = ua_engine(pki, "alice", peers=("bob",), require_e2m=require)
    bob = ua_engine(pki, "bob", peers=("alice",), require_e2m=require)
    sent = alice.protect(invite(pki, SRTP_OFFER, call_id=f"r183-so-{require}")).message
    ok = answer(bob.open(sent).message, SRTP_ANSWER)
    ctx = context_for(ok, time=time.time(), readers=[], content_id=None, handling="required",
                      cek_reference=None)
    bob_cred = pki.user("bob")
    der = sign(mime.inner_entity("application/sdp", SRTP_ANSWER), bob_cred.cert, bob_cred.key,
               extra_attributes=((oids.SIP_CONTEXT, ctx.encode()),))
    msg = with_entity(ok, mime.smime_entity(der, "signed-data"))
    if require:
        with pytest.raises(DowngradeError):
            alice.open(msg)
    else:
        opened = alice.open(msg)            # require = false: keys in the clear are its choice
        assert not opened.info.encrypted and BOB_KEY in opened.message.body
