"""Review 175 (attacker's review of cce9e28, review 174's fix): the receiving side of
the SDP split, CEK reuse, and what the proxy stores.

Hole K1: the proxy archives the SRTP master keys of every SDP it reads in the clear
- Attacker: whoever reads the proxy's archive (``e2m archive show``, the SQLite file or
  the PostgreSQL table ``bodies``; an operator, a backup, a later breach): no action on
  the wire.  The victims are the callers the E2M core lets through unprotected: a stock
  RFC 3261 phone using SDES over TLS (its keys are hidden on the wire by TLS, hop by
  hop), a ``[policy] legacy_peers`` peer, a UA with ``require = false``.
- Messages: a plaintext INVITE whose SDP is ``flows.SRTP_OFFER`` (``m=audio ... RTP/SAVP``,
  ``a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNf...``, 40 characters of master key and
  salt) through a proxy with ``view = INVITE application/sdp`` (``flows.SDP_VIEW``), and
  the stock callee's 200 with ``flows.SRTP_ANSWER`` (``inline:QUJD...``).
- Effect observed: ``ProxyEngine.inspect`` forwards both, and ``Verdict.seen`` holds the
  whole SDP, key line included (offer: 241 bytes, answer: 214 bytes); ``bootstrap.
  body_records`` makes archive rows of them and ``SqliteArchive.record`` stores them: the
  row read back (``ArchivedBody.plaintext``) holds ``inline:WVNf...`` and ``inline:QUJD...``
  verbatim, so both directions of the call's SRTP can be decrypted from a recording for
  as long as the archive is kept.  The E2M split keeps keys out of the proxy's view
  (control), the archive of the clear does not.  ``[policy] keying_attributes``
  (documented "as for the UA": attributes that stay end to end) is read into
  ``ProxyConfig`` and used nowhere in ``proxy.py``.
- Code at fault: ``e2m_plugins/proxy.py:1017`` (``_seen`` hands ``part.content`` as is to
  ``SeenBody.plaintext``), ``e2m_plugins/proxy.py:813`` (``seen`` built from every opened
  part, plaintext ones included), ``kamailio_app/bootstrap.py:110`` (``plaintext=
  item.plaintext`` into the row); ``ProxyConfig.keying_attributes`` unused.
- Suggested fix: in ``_seen`` (or ``body_records``) archive an SDP with its keying lines
  removed (``sdp.separate_keys(content, config.keying_attributes)``, or replaced by a
  marker such as ``a=crypto:<removed>``), and any other part for which
  ``srtp_keys.holds_keys`` is true with its key values masked; the media summary already
  carries what a firewall needs.
- Test: ``test_k1_the_archive_keeps_no_srtp_key`` (parametrised: stock offer, stock answer).

Controls
- ``test_control_split_offer_leaves_no_key_in_the_archive``: alice's E2M engine splits the
  same offer through the same proxy; the archived view holds ``m=audio`` and no key.
- ``test_control_keyless_plain_sdp_is_archived_whole``: a plain RTP/AVP SDP in the clear
  is archived byte for byte (the fix must keep the archive's record of media).

Tried and held (engine, cce9e28)
- Who is ``peer`` (``sender=``) for sealed keys: a request's From AoR, a response's To
  AoR.  bob's in-dialog re-INVITE to alice with a split SRTP offer: alice merges bob's key,
  ``split=True``, signers ``('sip:bob@example.com',)``; the same body carried by a request
  whose From is ``"sip:bob@example.com" <sip:carol@example.com>`` (display-name trick):
  ``BindingMismatchError`` ("names a dialog of ours with ... other parties"), before the
  signer check, which would take carol's URI as the peer (``test_held_display_name_trick_is_refused``).
- Dialog key after a proxy read the offer: alice's split offer through the SDP-viewing
  proxy, bob's split 200, alice's split re-INVITE: every envelope the proxy's certificate
  opens (view under the reused view key's ktri, 2 of 2 messages) holds no ``inline:``;
  alice's re-INVITE sealed keys go under a kekri of the key bob's answer sealed for her
  alone (``_keep_sealed``), which the proxy never held; bob's ``DialogKeys`` hold the view
  key with readers ``{proxy.example.com}`` (not exclusive) and the sealed-keys key with
  none (``test_held_dialog_keys_after_a_proxy_read_the_offer``).
- The sealed-keys envelope is a signed attribute of the sender: a co-signer's is refused
  (review 174's fix), a proxy cannot move it into another call or direction without the
  sender's key; only the sender's own engine chooses its CEK (fresh ktri, or a kekri under
  a key whose ``exclusive`` entry no proxy holds).
- Not a finding here: with ``require_signature = false`` an unsigned 200 sealed to alice
  alone with a CEKReference is kept as exclusive (``_keep_received`` falls back to labels,
  one recipient) and would carry alice's next keys; in that mode the unsigned answer's
  writer is the peer as far as alice can tell (documented fallback, docs/protocol.md §2).
- Not done in the time (about 20 minutes): a second certificate of alice's from another
  anchor in ``[trust]`` co-signing with keys (the withdrawn-key thief is accepted in
  docs/threat-model.md, review 107: signatures are checked by name, not pinned); the phone
  and the Kamailio archive path for K1 (the same ``body_records`` the KEMI app calls).

Fixed (stop 49): what the proxy archives of a part (``SeenBody.plaintext``) is
``srtp_keys.without_keys``: an SDP without its keying lines (the view a split gives),
any other part with each keying line's value cut, or a "withheld" line when keys may
remain (a coding or charset the cut cannot read through).  The media summary and
everything the proxy forwards are unchanged.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SDP_OFFER, SDP_VIEW, SRTP_ANSWER, SRTP_OFFER, TRUSTED, answer,
                           invite, known_proxy, proxy_engine, reinvite, ua_engine)
from e2m_plugins.body import message_body, top_parts
from e2m_plugins.cms.envelope import open_envelope
from e2m_plugins.cms.recipients import CertificateKey
from e2m_plugins.errors import BindingMismatchError, E2MError, UntrustedSignerError
from e2m_plugins.sip import SipMessage
from e2m_plugins.testpki import init_test_pki
from kamailio_app.archive import SqliteArchive
from kamailio_app.bootstrap import body_records

ALICE_KEY = b"WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"     # flows.SRTP_OFFER's inline key
BOB_KEY = b"QUJDX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"       # flows.SRTP_ANSWER's


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"))


def _archive(tmp_path, message: SipMessage, seen) -> list[bytes]:
    """Store ``seen`` as the KEMI app does and read the rows back."""
    archive = SqliteArchive(tmp_path / "archive.sqlite")
    archive.ensure_schema()
    archive.record(body_records(message, seen, responder="sip:bob@example.com"))
    return [row.plaintext for row in archive.bodies(call_id=message.call_id)]


def _proxy_opens(world, message: SipMessage) -> list[bytes]:
    """Every plaintext the proxy's certificate opens in ``message`` (envelopes only)."""
    cred = world.proxy(TRUSTED)
    out = []
    body = message_body(message)
    for part in top_parts(body) if body is not None else []:
        try:
            out.append(open_envelope(part.decoded(), [CertificateKey(cred.cert, cred.key)]).plaintext)
        except E2MError:
            continue
    return out


# -- K1 --------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["stock-offer", "stock-answer"])
def test_k1_the_archive_keeps_no_srtp_key(world, tmp_path, which):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    offer = invite(world, SRTP_OFFER, call_id=f"r175-k1-{which}")
    verdict = proxy.inspect(offer)
    assert verdict.action == "forward"
    message, key = offer, ALICE_KEY
    if which == "stock-answer":
        message, key = answer(offer, SRTP_ANSWER), BOB_KEY
        verdict = proxy.inspect(message)
        assert verdict.action == "forward"
    assert verdict.seen, "the proxy views the SDP (its media line is archived)"
    rows = _archive(tmp_path, message, verdict.seen)
    assert rows and all(b"m=audio" in row for row in rows)
    assert not any(key in row or b"inline:" in row for row in rows), (
        f"archived {[len(r) for r in rows]} bytes with the SRTP master key in the clear")
    assert not any(key in s.plaintext for s in verdict.seen)


# -- controls --------------------------------------------------------------------------

def test_control_split_offer_leaves_no_key_in_the_archive(world, tmp_path):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    sent = alice.protect(invite(world, SRTP_OFFER, call_id="r175-control-split"))
    assert sent.info.split
    verdict = proxy.inspect(sent.message)
    rows = _archive(tmp_path, sent.message, verdict.seen)
    assert rows and b"m=audio" in rows[0] and ALICE_KEY not in rows[0] and b"inline:" not in rows[0]


def test_control_keyless_plain_sdp_is_archived_whole(world, tmp_path):
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    offer = invite(world, SDP_OFFER, call_id="r175-control-plain")
    verdict = proxy.inspect(offer)
    assert _archive(tmp_path, offer, verdict.seen) == [SDP_OFFER]


# -- tried and held --------------------------------------------------------------------

def _call(world, call_id: str):
    """alice calls bob through the SDP-viewing proxy with SRTP both ways."""
    sdp_proxy = (known_proxy(world, TRUSTED, SDP_VIEW),)
    alice = ua_engine(world, "alice", proxies=sdp_proxy)
    bob = ua_engine(world, "bob", proxies=sdp_proxy)
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    sent = alice.protect(invite(world, SRTP_OFFER, call_id=call_id))
    proxy.inspect(sent.message)
    got = bob.open(sent.message)
    ok = bob.protect(answer(got.message, SRTP_ANSWER))
    proxy.inspect(ok.message)
    opened = alice.open(ok.message)
    assert ok.info.split and opened.info.split and BOB_KEY in opened.message.body
    return alice, bob, proxy, sent.message, ok.message


def test_held_dialog_keys_after_a_proxy_read_the_offer(world):
    alice, bob, proxy, offer, ok = _call(world, "r175-held-reuse")
    again = reinvite(world, "alice", "bob", "r175-held-reuse", 2, offer.from_tag, ok.to_tag,
                     SRTP_OFFER)
    sent = alice.protect(again)
    assert sent.info.split and sent.info.key_reuse
    for message in (offer, ok, sent.message):
        for plain in _proxy_opens(world, message):
            assert b"inline:" not in plain and ALICE_KEY not in plain and BOB_KEY not in plain
    got = bob.open(sent.message)
    assert got.info.split and ALICE_KEY in got.message.body
    kept = bob.dialog_keys.kept(sent.message)
    assert any(k.readers == frozenset({TRUSTED}) and not k.exclusive for k in kept)
    assert all(not k.readers for k in kept if k.exclusive)


def test_held_display_name_trick_is_refused(world):
    alice, bob, proxy, offer, ok = _call(world, "r175-held-from")
    in_dialog = reinvite(world, "bob", "alice", "r175-held-from", 1, ok.to_tag, offer.from_tag,
                        SRTP_ANSWER)
    sent = bob.protect(in_dialog)
    assert sent.info.split
    opened = alice.open(sent.message)
    assert opened.info.split and opened.info.signers == ("sip:bob@example.com",)
    assert BOB_KEY in opened.message.body
    trick = sent.message.replace("From", f'"sip:bob@example.com" <sip:carol@example.com>'
                                 f";tag={ok.to_tag}")
    with pytest.raises((BindingMismatchError, UntrustedSignerError)):
        alice.open(trick)
