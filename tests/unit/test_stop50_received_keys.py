"""Stop 50, after review 179 K1: a UA uses SRTP keys from a whole SDP only when nobody
but itself could read them.

Review 179 showed alice's phone taking bob's keyed 183 and 200 sealed whole for her and
the viewing proxy, his signed context naming the proxy.  The fix could have looked at
the named readers only; these tests also seal the keyed SDP for a second recipient the
context does not name (the proxy reads it all the same), and keep the honest forms
working: a keyed SDP sealed for alice alone, and a keyless SDP any proxy may read.
Each refusal test failed on the code before the fix (the keys were used).
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import SRTP_ANSWER, SRTP_OFFER, TRUSTED, known_proxy, ua_engine
from e2m_plugins import headers as hdr, mime
from e2m_plugins.body import protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.errors import InconsistentSplitError
from e2m_plugins.sdp import separate_keys
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return init_test_pki(tmp_path_factory.mktemp("stop50-keys"), users=("alice", "bob"),
                         proxy_hosts=(TRUSTED,))


def _answer_to_alice(pki, sdp: bytes, recipients: list[str], readers: list[str]):
    """alice's SRTP INVITE (sealed to bob alone: no proxy of hers views SDP), and bob's
    200 whose ``sdp`` is sealed whole for ``recipients``, signed by him, his signed
    context naming ``readers``."""
    alice = ua_engine(pki, "alice", peers=("bob",))
    bob = ua_engine(pki, "bob", peers=("alice",),
                    proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
    invite = make_request("INVITE", "sip:bob@example.com", from_uri=pki.aor("alice"),
                          to_uri=pki.aor("bob"), call_id=f"k-{time.monotonic_ns()}@x",
                          cseq=1, from_tag="a1", extra_headers=[("Contact", "<sip:a@h>")],
                          body=SRTP_OFFER, content_type="application/sdp")
    sent = alice.protect(invite).message
    got = bob.open(sent).message
    answer = make_response(got, 200, "OK", [("Contact", "<sip:b@h>")], sdp, "application/sdp")
    answer = answer.replace("To", f"{got.get('To')};tag=b1")
    certs = {"alice": pki.user("alice").cert, TRUSTED: pki.proxy(TRUSTED).cert}
    bob_cred = pki.user("bob")
    entity, _ = protect_content(
        "application/sdp", sdp,
        [recipient_for_certificate(certs[r], use_ski=True) for r in recipients],
        signer=(bob_cred.cert, bob_cred.key), bind_to=answer, readers=readers,
        at=time.time(), content_id=mime.new_content_id("example.com"))
    answer = with_entity(answer, entity)
    for host in readers:          # the label the viewing proxy relays it with
        answer = answer.add(hdr.PROXY_REQUIRED_BODY,
                            hdr.format_proxy_required_body(hdr.BodyLabel(host, ())))
    return alice, answer


def test_keys_sealed_for_a_proxy_the_context_names_are_refused(pki):
    alice, answer = _answer_to_alice(pki, SRTP_ANSWER, ["alice", TRUSTED], [TRUSTED])
    with pytest.raises(InconsistentSplitError):
        alice.open(answer)


def test_keys_sealed_for_a_second_recipient_no_context_names_are_refused(pki):
    alice, answer = _answer_to_alice(pki, SRTP_ANSWER, ["alice", TRUSTED], [])
    with pytest.raises(InconsistentSplitError):
        alice.open(answer)


def test_keys_sealed_for_alice_alone_are_used(pki):
    alice, answer = _answer_to_alice(pki, SRTP_ANSWER, ["alice"], [])
    opened = alice.open(answer)
    assert b"inline:" in opened.message.body and not opened.info.readable_by


def test_a_keyless_sdp_a_proxy_reads_is_taken(pki):
    keyless, _ = separate_keys(SRTP_ANSWER)
    alice, answer = _answer_to_alice(pki, keyless, ["alice", TRUSTED], [TRUSTED])
    opened = alice.open(answer)
    assert opened.message.body == keyless and opened.info.readable_by == (TRUSTED,)


def test_one_kari_carrying_keys_for_two_recipients_counts_two(tmp_path):
    """A KeyAgreeRecipientInfo may carry a RecipientEncryptedKey for each of several
    recipients: counted as one RecipientInfo, an envelope for alice and the proxy in
    one kari passed every "one recipient" rule (the sealed keys' too).  Failed on the
    code before stop 50 (recipient_count 1)."""
    from asn1crypto import cms as asn1_cms

    from e2m_plugins.cms.envelope import open_envelope, seal
    from e2m_plugins.cms.recipients import CertificateKey

    ec_pki = init_test_pki(tmp_path / "ec", users=("alice",), proxy_hosts=(TRUSTED,),
                           key_type="ec")
    alice, proxy = ec_pki.user("alice"), ec_pki.proxy(TRUSTED)
    sealed = seal(b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + b"A" * 40,
                  [recipient_for_certificate(alice.cert), recipient_for_certificate(proxy.cert)])
    info = asn1_cms.ContentInfo.load(sealed.der)
    infos = info["content"]["recipient_infos"]
    assert [i.name for i in infos] == ["kari", "kari"]

    # alice's kari (named by issuer and serial) keeps its ephemeral key and gets the
    # proxy's wrapped key beside hers; the SET's order is not the order sealed (review 184)
    serials = [i.chosen["recipient_encrypted_keys"][0]["rid"].chosen["serial_number"].native
               for i in infos]
    mine = serials.index(alice.cert.serial_number)
    first, second = infos[mine].chosen, infos[1 - mine].chosen
    keys = first["recipient_encrypted_keys"]
    keys.append(second["recipient_encrypted_keys"][0])
    first["recipient_encrypted_keys"] = keys
    del infos[1 - mine]
    info["content"]["recipient_infos"] = infos
    merged = info.dump(force=True)
    opened = open_envelope(merged, [CertificateKey(alice.cert, alice.key)])
    assert opened.recipient_count == 2
