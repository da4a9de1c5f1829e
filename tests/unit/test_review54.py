"""A fifty-fourth attacker's review (December 2026) of 50e6c26: the mission's promises to
the sender, end to end (the archive's view against the peer's, who a body is shown
as coming from, what a curious chosen proxy and an untrusted hop can learn or forge).

One gap, seen on the engine here and on a real ``e2m-phone`` in
``tests/pjsua/test_review54_phone.py``: **the core reads the first instance of a
header RFC 3261 allows once (From, To, Call-ID, CSeq), pjsip the last one.**
``sip.parse`` keeps every instance and ``SipMessage.get``/``address``/``cseq`` take the
first; pjsip's parser sets ``rdata->msg_info.from/to/cid/cseq`` to each instance it
meets, so the last one wins for pjsua (the shown sender, dialog matching, the CSeq check,
the headers its answer copies).  Every check the UA engine makes (the signer is the From,
the signed SIP context names this message, the parties of a dialog of ours, replay,
``FirstCopy``) is made on the first instances; what the phone shows and which call
pjsip gives the request to come from the last ones, which no signature covers.

- ``test_hole_a_second_from_header_shows_a_signed_message_as_anothers``:
  **insider UA** (carol, a certificate of our CA) sending straight to bob's phone (its
  UDP port takes anyone's requests), or an **untrusted hop** past the home proxy that
  appends a header to carol's genuine message.  A MESSAGE From carol, signed by carol
  and sealed for bob, with a second ``From: "Alice" <sip:alice@example.com>`` at the
  end.  The engine opens it as carol's (signer = first From); pjsua shows it From
  alice, the security record "signed, trusted".  The same with an INVITE: the call
  rings as alice's, and bob's 200 is sealed for alice (pjsip's answer copies the last
  From), the SRTP of carol's offer is played as alice's call.
- ``test_hole_a_third_partys_invite_with_second_ids_passes_the_parties_check``:
  **insider UA** (carol) who read the ids of alice's live call with bob (or a third
  party the call was forwarded from).  A new INVITE of her own (her Call-ID, her From,
  To bob without a tag), signed by her, followed by a second ``Call-ID``, ``To``
  (with bob's tag) and ``CSeq`` of alice's call.  The engine sees an initial INVITE
  from carol: no parties check (review 2's fix, ``UAEngine._check_parties``) applies;
  pjsip matches Call-ID and tags from the last instances and takes it as a re-INVITE
  in alice's call: bob's media moves to carol's address (on the real phone,
  ``call_media`` of alice's call shows carol's RTP address).

Looked at and held (traced through the code; only the Kamailio drop below was also
run as a test, and no test is kept for the rest):

- The same requests through the home proxy (Kamailio 5.6): a second From, To, Call-ID
  or CSeq makes Kamailio's header parser fail; the request is dropped (sanity cannot
  even send its 400), nothing is archived or forwarded
  (``tests/kamailio/test_review54_wire.py``, controls).
- Hiding MESSAGE text from an archive that views MESSAGE: a decoy plus a part for bob
  alone (496, known), a top-level ``multipart/alternative`` or ``message/cpim`` holding
  a CMS for bob alone (the proxy archives it as opaque bytes, but bob's engine does not
  open nested CMS either: he cannot read it), a ``multipart/signed`` whose signed part
  is a multipart holding such a CMS (the same), a nested enveloped layer for bob alone
  inside the proxy's layer (``layers.open_message`` follows it: 496), an inner
  ``Content-Length`` that cuts the text (both sides cut alike: one parser), base64 or
  quoted-printable transfer encodings at either level (one ``decoded()``), a
  transfer-encoded multipart (refused), ``compressed-data`` (415/refused both sides),
  two Content-Type headers (refused), ``handling=optional`` on the part bob reads
  (the proxy opens every part when its rules cover the method, and archives them all).
- Octets after Content-Length on UDP: Kamailio's sanity answers 400 for a request; for
  a response the core, Kamailio and pjsip all cut at Content-Length.
- A forged 496 with a certificate for a host of the peer's domain: learnt for every
  call, but ``_readers_for`` asks ``accepts_proxy`` again per peer; a forged 496 naming
  the home proxy with its real (public) certificate only widens what that chosen proxy
  reads, as a real 496 may.
- A curious chosen proxy and the SDP keys: the sealed keys are one RecipientInfo for
  bob, inside alice's signed attributes; bob keeps their CEK as exclusive only when it
  was sealed to his certificate (not a kekri), so the proxy's copy of the offer key
  never carries bob's keys.

Fixed (stop 30): a message with more than one From, To, Call-ID or CSeq (compact forms
counted with their long ones) is malformed: ``sip.parse`` refuses it (the phone answers
400 before pjsip sees it), and ``UAEngine.open`` and ``ProxyEngine.inspect`` check what
they are given (``SipMessage.check_unambiguous``).  The holes' markers are gone; they
are guards now.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SRTP_ANSWER, SRTP_OFFER, TRUSTED, answer, known_proxy, reinvite,
                           ua_engine)
from e2m_plugins.errors import BindingMismatchError, E2MError
from e2m_plugins.sip import SipMessage, make_request
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)
CAROLS_SDP = SRTP_OFFER.replace(b"49170", b"40404").replace(b"o=alice", b"o=carol")


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"))


def _phones(world):
    proxy = known_proxy(world, TRUSTED, SDP_VIEW)
    return (ua_engine(world, "alice", peers=("bob",), proxies=(proxy,)),
            ua_engine(world, "bob", peers=("alice", "carol"), proxies=(proxy,)),
            ua_engine(world, "carol", peers=("bob",), proxies=(proxy,)))


def _carols_message(world, carol) -> SipMessage:
    plain = make_request("MESSAGE", "sip:bob@example.com", from_uri=world.aor("carol"),
                         to_uri=world.aor("bob"), body=b"Pay the invoice to IBAN XX00 1234",
                         content_type="text/plain")
    return carol.protect(plain).message


# == a second From =================================================================

def test_control_carols_signed_message_is_hers(world):
    """Without the attack: carol's MESSAGE opens at bob as carol's, signed, trusted."""
    _, bob, carol = _phones(world)
    opened = bob.open(_carols_message(world, carol))
    assert opened.info.peer == world.aor("carol") and opened.info.trusted
    assert [v for v in opened.message.get_all("From")] == [opened.message.get("From")]


def test_hole_a_second_from_header_shows_a_signed_message_as_anothers(world):
    """Attacker: insider UA carol (certificate of our CA), straight to bob's phone; or an
    untrusted hop past the home proxy, appending a header to carol's real message.

    Message: carol's MESSAGE (From carol, signed by carol, sealed for bob) with one more
    header at the end: ``From: "Alice" <sip:alice@example.com>;tag=zz``.

    Effect: ``UAEngine.open`` reads the first From (``SipMessage.address``), checks the
    signer against it and passes the message on to pjsip with both From headers;
    pjsip keeps the last one (``rdata->msg_info.from``), so pjsua's ``message_in``
    says ``from_uri: "Alice" <sip:alice@example.com>`` with the security record
    "signed ... (trusted)" (seen on the real phone: ``tests/pjsua/test_review54_phone.py``).

    At fault: ``e2m_plugins/sip.py`` ``parse`` (and ``SipMessage.get``) take a message
    with two From headers and read the first; ``UAEngine._open`` never looks at the
    others.  Fix: refuse (400) any message with more than one From, To, Call-ID or CSeq
    (RFC 3261 §7.3.1 allows one; Kamailio already drops them), in ``sip.parse`` or at the
    top of ``UAEngine.open`` / ``ProxyEngine.inspect`` and the phone's ``_on_rx``."""
    _, bob, carol = _phones(world)
    sent = _carols_message(world, carol).add("From", f'"Alice" <{world.aor("alice")}>;tag=zz')
    assert [h for h in sent.get_all("From")][-1].endswith("tag=zz")
    with pytest.raises(E2MError):
        bob.open(sent)


# == a third party's INVITE with a second Call-ID, To and CSeq =======================

def _live_call(world, alice, bob) -> tuple[SipMessage, SipMessage]:
    """alice calls bob (SRTP); bob's engine has the dialog and its parties."""
    sent = alice.protect(make_request(
        "INVITE", "sip:bob@example.com", from_uri=world.aor("alice"), to_uri=world.aor("bob"),
        call_id="live@x", from_tag="a1", body=SRTP_OFFER, content_type="application/sdp",
        extra_headers=[("Contact", "<sip:alice@127.0.0.1:5061>")])).message
    got = bob.open(sent).message
    reply = bob.protect(answer(got, SRTP_ANSWER)).message
    assert alice.open(reply).message.body == SRTP_ANSWER
    return sent, reply


def test_control_a_third_partys_reinvite_into_the_call_is_refused(world):
    """Without the attack: carol's re-INVITE written with the call's ids (review 2) is
    refused by the parties check."""
    alice, bob, carol = _phones(world)
    _live_call(world, alice, bob)
    hijack = carol.protect(reinvite(world, "carol", "bob", "live@x", 2, "a1", "b1",
                                    CAROLS_SDP)).message
    with pytest.raises(BindingMismatchError):
        bob.open(hijack)


def _second_ids(world, carol) -> SipMessage:
    """carol's own new INVITE to bob (first Call-ID, From, To, CSeq: hers, signed), with
    alice's call's Call-ID, To (bob's tag) and a next CSeq after them, which pjsip reads."""
    own = carol.protect(make_request(
        "INVITE", "sip:bob@127.0.0.1:5062", from_uri=world.aor("carol"),
        to_uri=world.aor("bob"), call_id="carols-own@x", from_tag="a1", body=CAROLS_SDP,
        content_type="application/sdp",
        extra_headers=[("Contact", "<sip:carol@127.0.0.1:5063>")])).message
    return (own.add("Call-ID", "live@x").add("To", f"<{world.aor('bob')}>;tag=b1")
            .add("CSeq", "2 INVITE"))


def test_hole_a_third_partys_invite_with_second_ids_passes_the_parties_check(world):
    """Attacker: insider UA carol who read the ids of alice's live call with bob
    (Call-ID, alice's tag, bob's tag: headers travel in the clear without TLS, or the
    call was forwarded from her).

    Message, straight to bob's phone: an INVITE of her own (``Call-ID: carols-own@x``,
    From carol with alice's From tag, To bob without a tag, CSeq 1), signed by carol and
    sealed for bob, then ``Call-ID: live@x``, ``To: <sip:bob@example.com>;tag=b1`` and
    ``CSeq: 2 INVITE`` appended.

    Effect: the engine reads the first instances: an initial INVITE from carol, signed by
    carol, nothing to compare with a dialog of ours (``_check_parties`` looks only at a
    To tag, and the first To has none), ``FirstCopy`` sees a new Call-ID; it is opened.
    pjsip matches it by the last Call-ID and tags: a re-INVITE in alice's confirmed
    call.  On the real phone pjsua answers 200 and ``call_media`` of alice's call moves
    to carol's RTP address (127.0.0.1:40404), playing carol's SRTP (her ``a=crypto``) as
    alice's: review 2's hole (``test_hole_an_insider_reinvites_into_another_users_dialog``)
    is open again.  A BYE made the same way ends alice's call.

    At fault and fix: as above (one instance of From, To, Call-ID, CSeq or refused)."""
    alice, bob, carol = _phones(world)
    _live_call(world, alice, bob)
    sent = _second_ids(world, carol)
    assert sent.get_all("Call-ID") == ["carols-own@x", "live@x"]
    with pytest.raises(E2MError):
        bob.open(sent)
