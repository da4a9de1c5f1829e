"""Review 126 (attacker's review of 93e0f81): CEK reuse on the wire, Content-Type
spellings of E2M bodies, and Event/Accept spellings of the certificate service.

One hole found (K1), seen in the core (this module), on a real Kamailio 5.6
(``tests/kamailio/test_review126_inner_multipart_wire.py``) and on a real pjsua2 phone
(``tests/pjsua/test_review126_inner_multipart_phone.py``).

Hole K1: an SDP inside a multipart inside the envelope
------------------------------------------------------

- Attacker: an **insider UA** (alice, a registered user with her own certificate; the
  same works for bob's answer) who wants a call whose media her home proxy never
  records.  The home proxy views ``INVITE:application/sdp`` (the deployed default) for
  its media records and firewall lines (``e2m media: ...``, the ``media`` table).
- Set-up and messages: alice's INVITE as her engine would send it (signed by her, the
  signed SIP context bound to the message, AuthEnvelopedData for bob and
  ``proxy.example.com``, ``Proxy-Required-Body: proxy.example.com``), except that the
  entity inside the envelope is ``Content-Type: multipart/mixed; boundary=r126`` whose
  one part is ``Content-Type: application/sdp`` and her offer (built with
  ``body.protect_content``, as her own code would; her engine refuses to send such a
  body in the clear, not sealed).  Likewise bob's 200 with his answer so wrapped.
- Effect (seen):
  * core: the proxy engine forwards it, ``seen`` = one ``multipart/mixed`` body, 0
    ``media`` lines (the control, her engine's own offer: ``application/sdp``, 1 line);
    bob's engine accepts it (encrypted, signed by alice, trusted) and hands pjsua
    ``multipart/mixed; boundary=r126`` with the SDP inside.  The same for bob's 200
    at alice's engine.
  * real Kamailio: relayed to bob (1 INVITE), archived as one ``multipart/mixed`` row,
    **0 media rows and 0 ``e2m media:`` log lines** (control: 1 and 1).
  * real phone (bob's ``e2m-phone``, SRTP, E2M required): **200 OK**, and
    ``call_media`` ``remote_rtp: 127.0.0.1:41260``, the port of the hidden SDP: pjsip
    finds an ``application/sdp`` part in a multipart body (``pjsip_rdata_get_sdp_info``)
    and negotiates from it.  The phone also keeps no call-security record for it
    (``phone.py:948`` records only ``application/sdp``).
- Code at fault: ``e2m_plugins/proxy.py:645-646`` summarises media only for a part
  whose inner type is ``application/sdp``; ``e2m_plugins/body.py:186-190``
  (``open_part``) refuses a nested S/MIME entity inside the envelope but accepts any
  multipart; ``e2m_plugins/ua.py:937-990`` (``_open``) hands the application that
  inner multipart as it is (``with_entity(message, make_part(chosen.entity.content_type,
  content))``).  The checks that every SDP is where the proxy reads it
  (``ua._refuse_plaintext``, ``plaintext_leaves``) look at the outer body only.
- Suggested fix: in ``open_part`` (so the proxy and the UA agree), refuse an inner
  entity that is a multipart (E2M puts one entity per envelope: the SDP or the IM text
  itself, e2m-sec-02 §4.2 splits audiences with an outer multipart), or at least one
  holding an ``application/sdp`` leaf at any depth; or have the proxy summarise
  ``media`` from every SDP leaf of the inner entity and the UA hand pjsua only a
  single-entity body.

Controls (unmarked, pass): ``test_control_k1_her_engines_offer_is_summarised`` (the
same call through the same engines, her engine's own body: 1 media line, bob gets
``application/sdp``), ``test_control_k1_a_plaintext_sdp_in_an_outer_multipart_is_refused``
(the outer-body rule works: 488-class ``DowngradeError`` at bob), and the wire and phone
modules' controls (her engine's offer: 1 media row, 1 log line; 200 on the phone).

Tried and held (this review)
----------------------------

- Content-Type spellings of alice's honest sealed MESSAGE, through the home proxy
  engine (view ``MESSAGE:text/plain``) and bob's engine, all agreeing: no Content-Type
  change, ``Application/PKCS7-MIME; SMIME-TYPE="authEnveloped-data"; NAME="smime.p7m"``,
  bare ``application/pkcs7-mime`` (type read from the ContentInfo),
  ``application/x-pkcs7-mime``, ``smime-type=auth-enveloped-data``, a wrong label
  (``enveloped-data`` or ``signed-data`` on an AuthEnvelopedData: the DER decides),
  ``application / pkcs7-mime``, an extra ``handling=optional`` parameter: both read the
  text, signed and encrypted.  ``certs-only``, ``compressed-data`` and a top-level
  ``application/pkcs7-signature``: 415 at both.  ``smime-type`` given twice: 400 / 
  ``MalformedError`` at both.  Relabelled ``text/plain`` or ``application/octet-stream``
  by a hop: the proxy archives the DER under that type (an unsigned row, as any
  plaintext body a hop may send), bob refuses it 488 (``DowngradeError``): no side reads
  a body the other treats as plain text.
- Event and Accept spellings on certificate SUBSCRIBEs, on a real Kamailio (a scratch
  module, not kept; ``[certs]`` on, next hop a ``RawUas``): ``Event: presence`` and
  ``o: presence`` are routed to the next hop (Kamailio's ``$hdr(Event)`` reads ``o``);
  ``Event: Certificate;id=x``, ``o: certificate``, ``EVENT: CERTIFICATE`` served 200;
  ``Event: certificate;id="x y"`` 400 (the id must be a token); ``Event: presence`` then
  ``Event: certificate`` routed as presence, the reverse served (both the proxy and the
  core take the first); ``Event: certificate, presence`` and ``certificate.winfo``
  routed; no Event 489; ``Accept: text/plain`` and an empty Accept 406, ``Accept:
  text/plain`` plus ``Accept: application/pkix-cert`` 200.  Only RFC nit:
  ``Accept: application/pkix-cert;q=0`` is served 200 (q=0 means "not acceptable");
  no security effect.  The phone's NOTIFY rule (``certservice_client._event``) reads the
  same first Event, compact form included, lower-cased, and matches the dialog first.
- CEK reuse: read (``proxy._keep_keys``, ``_spend``, ``_fork``, ``dialog_keys``); the
  wire runs of earlier reviews' fixtures (``answer_under_offer_key``) were not extended
  in the time (listed as untried in the report).

Fixed (stop 41): ``body.open_part`` (the proxy's and the UA's one reader) refuses a
multipart inside the envelope that holds an SDP or an S/MIME part at any depth
(``UnsupportedMediaTypeError``: 415 at the proxy, a refused body at the phone), so no
side hands on a media description the proxy did not view.  A MESSAGE of text parts is
still read (new control); the UA now seals a multipart with its boundary (it was
dropped, making such a MESSAGE unreadable once its parts were looked into).  Every hole
test failed on the code before the fix (a ``git stash`` of ``e2m_plugins``) and passes
with it; the markers are off.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SDP_ANSWER, SDP_OFFER, SDP_VIEW, TRUSTED, answer, apply_forward,
                           invite, known_proxy, message, proxy_engine, ua_engine)
from e2m_plugins import headers as hdr
from e2m_plugins import mime
from e2m_plugins.body import protect_content, with_entity
from e2m_plugins.cms import recipient_for_certificate
from e2m_plugins.errors import DowngradeError, E2MError
from e2m_plugins.testpki import TestPKI, init_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return init_test_pki(tmp_path_factory.mktemp("review126-unit"), proxy_hosts=(TRUSTED,),
                         users=("alice", "bob"), key_type="ec")


def _wrapped(pki: TestPKI, plain, sdp: bytes, signer: str, peer: str, readers=()):
    """``plain`` carrying ``sdp`` in a multipart/mixed inside an envelope for ``peer`` and
    the home proxy, signed by ``signer`` and bound to ``plain``."""
    inner = mime.multipart_mixed([mime.make_part("application/sdp", sdp)], boundary="r126")
    content = mime.encode_part(inner).split(b"\r\n\r\n", 1)[1]
    entity, _ = protect_content(
        str(inner.content_type), content,
        [recipient_for_certificate(pki.user(peer).cert),
         recipient_for_certificate(pki.proxy(TRUSTED).cert)],
        signer=(pki.user(signer).cert, pki.user(signer).key), bind_to=plain,
        readers=list(readers))
    return with_entity(plain, entity)


def _engines(pki: TestPKI):
    return (ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),)),
            ua_engine(pki, "bob"), proxy_engine(pki, TRUSTED, view=SDP_VIEW))


def test_control_k1_her_engines_offer_is_summarised(pki):
    alice, bob, proxy = _engines(pki)
    sent = alice.protect(invite(pki, call_id="r126-ctl")).message
    verdict = proxy.inspect(sent)
    assert verdict.action == "forward"
    assert [s.content_type for s in verdict.seen] == ["application/sdp"]
    assert len(verdict.media) == 1
    assert bob.open(apply_forward(sent, verdict)).message.get("Content-Type") == "application/sdp"


def test_control_k1_a_plaintext_sdp_in_an_outer_multipart_is_refused(pki):
    _alice, bob, _proxy = _engines(pki)
    plain = invite(pki, call_id="r126-outer")
    outer = mime.multipart_mixed([mime.make_part("application/sdp", SDP_OFFER)])
    with pytest.raises(DowngradeError):
        bob.open(with_entity(plain, outer))


def test_hole_k1_an_offer_in_an_inner_multipart(pki):
    _alice, bob, proxy = _engines(pki)
    plain = invite(pki, call_id="r126-offer")
    sent = _wrapped(pki, plain, SDP_OFFER, "alice", "bob",
                    readers=(TRUSTED,)).add(hdr.PROXY_REQUIRED_BODY, TRUSTED)
    verdict = proxy.inspect(sent)
    seen = (verdict.action, [s.content_type for s in verdict.seen], len(verdict.media))
    try:
        handed = bob.open(apply_forward(sent, verdict)).message.get("Content-Type")
    except E2MError as exc:    # refused is secure too (stop 41: 415)
        handed = f"refused: {exc}"
    # observed on 93e0f81: ('forward', ['multipart/mixed'], 0), 'multipart/mixed; boundary=r126'
    assert seen[0] == "reply" or seen[2] == 1, (seen, handed)
    assert not handed.startswith("multipart/"), (seen, handed)


def test_hole_k1_an_answer_in_an_inner_multipart(pki):
    alice, bob, proxy = _engines(pki)
    sent = alice.protect(invite(pki, call_id="r126-answer")).message
    delivered = bob.open(apply_forward(sent, proxy.inspect(sent))).message
    ok = _wrapped(pki, answer(delivered), SDP_ANSWER, "bob", "alice")
    verdict = proxy.inspect(ok)
    seen = (verdict.action, [s.content_type for s in verdict.seen], len(verdict.media))
    try:
        handed = alice.open(apply_forward(ok, verdict)).message.get("Content-Type")
    except E2MError as exc:
        handed = f"refused: {exc}"
    # observed on 93e0f81: ('forward', ['multipart/mixed'], 0), 'multipart/mixed; boundary=r126'
    assert seen[2] == 1 or not handed.startswith("multipart/"), (seen, handed)


def test_control_stop41_a_message_of_text_parts_is_still_read(pki):
    """The fix refuses an inner multipart holding an SDP or S/MIME only: alice's MESSAGE
    whose body is a multipart of two text parts is sealed whole, read by the proxy (one
    multipart seen) and by bob as she wrote it."""
    view = ("MESSAGE:multipart/mixed",)
    alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, view),))
    bob, proxy = ua_engine(pki, "bob"), proxy_engine(pki, TRUSTED, view=view)
    parts = mime.multipart_mixed([mime.make_part("text/plain", b"see the note"),
                                  mime.make_part("text/plain", b"and this one")],
                                 boundary="r126t")
    plain = message(pki)
    plain = with_entity(plain, parts)
    sent = alice.protect(plain).message
    verdict = proxy.inspect(sent)
    assert verdict.action == "forward"
    assert [s.content_type for s in verdict.seen] == ["multipart/mixed"]
    got = bob.open(apply_forward(sent, verdict)).message
    assert got.get("Content-Type").startswith("multipart/mixed")
    assert b"see the note" in got.body and b"and this one" in got.body
