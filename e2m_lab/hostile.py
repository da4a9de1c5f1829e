"""Hostile requests, one copy: each is built with the project's own code, then broken.

Used by the error-table tests on the in-memory engines (``tests/unit/test_error_rows.py``),
the same requests sent to a real Kamailio (``tests/kamailio/test_hostile_wire.py``) and
the wire corpus (``tests/reliability/test_hostile_corpus.py``), so all three look at the
same messages.  The tables of expected answers stay in the tests.

The base of most of them is what alice's UA sends to bob through proxy.example.com
(``protected``): a MESSAGE (``e2m_lab.flows.message``, a fresh Call-ID each time) whose
text is signed by alice, encrypted with AES-GCM for bob and the proxy, bound to that very
request, as one part with Content-ID ``CID``, labelled ``Proxy-Required-Body:
proxy.example.com;cid="p1@example.com"``.  Each builder changes one thing.  ``text``
is what the body carries (``SECRET`` by default; the wire tests check it never
reaches a log).

What each builder makes, and the row of the error table (``e2m_plugins.sip_errors``)
it reaches: the error class, then the answer of a proxy that views (and, where said,
verifies) MESSAGE bodies, and of bob's UA.  A dash: no test sends it to that side.

=================================  =====================================================  ============================  ===========
builder                            the request                                            row reached                   proxy / UA
=================================  =====================================================  ============================  ===========
``garbage_der``                    the envelope's octets replaced by broken DER           MalformedError                400 / 400
``truncated_base64``               the envelope in base64, its last 7 characters cut      MalformedError                400 / -
``unknown_cipher``                 an AES-128-CBC envelope whose cipher OID is changed    UnsupportedAlgorithmError     415 / 415
                                   to AES-128-OFB (not for CMS here)
``not_a_recipient``                encrypted for bob only, no label                       ProxyCannotDecryptError       496 / -
``bad_gcm_tag``                    the last octet of the GCM tag flipped                  ProxyCannotDecryptError (p),  496 / 493
                                                                                          DecryptionError (UA)
``tampered_signature``             clear-signed multipart/signed, "pay 10" made "pay 99"  SignatureInvalidError         403 (verifying) / -
``foreign_ca_signer``              signed by an "alice" certificate of another CA         UntrustedSignerError          403 / -
``stranger_signs_as_alice``        signed by carol (our CA, another AoR) as alice         CertificateRejectedError (p), 403 / 403
                                                                                          UntrustedSignerError (UA)
``unsigned``                       not signed                                             SignatureRequiredError        495 (verifying) / -
``oversized``                      a plaintext body of 300 KiB                            LimitExceededError            413 / 413
``compressed_data``                smime-type=compressed-data over the envelope           UnsupportedMediaTypeError     415 / 415
``label_names_missing_part``       the label's cid names no part                          MalformedError                400 / -
``duplicate_labels``               the same label twice                                   MalformedError                400 / -
``label_without_host``             a label with a cid but no host                         MalformedError                400 / -
``for_someone_else``               encrypted for carol only (labelled for the proxy)      ProxyCannotDecryptError (p),  496 / 493
                                                                                          NoMatchingRecipientError (UA)
``only_optional_parts_for_others`` two optional parts, carol's and the proxy's            UndecipherableError           - / 493
``body_from_another_dialog``       an envelope bound to another MESSAGE (cut and pasted)  BindingMismatchError          403 / 403
``stale``                          a body whose signed SIP context is an hour old         ReplayError                   403 / 403
``split_views_differ``             sealed SDP keys that give bob another session than      InconsistentSplitError        - / 403
                                   the proxy reads (a c= line among the keys)
``plaintext_sdp``                  an INVITE with plaintext SDP (a downgrade)             DowngradeError                - / 488
``multipart_without_boundary``     multipart/mixed without its boundary parameter         MalformedError                400 / -
``unknown_transfer_encoding``      Content-Transfer-Encoding x-rot13                      UnsupportedAlgorithmError     415 / -
``content_type_without_subtype``   Content-Type "text"                                    MalformedError                400 / -
``control_character_in_a_header``  a Subject with a control character                     MalformedError (the core's    400 / -
                                                                                          SIP parser, on the bytes)
``too_many_hops``                  Max-Forwards 0                                         (routing, RFC 3261 §16.3)     483 / -
=================================  =====================================================  ============================  ===========
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

from e2m_plugins import mime
from e2m_plugins.body import protect_content, seal_keys, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.cms.signed import sign
from e2m_plugins.sdp import SdpKeys, separate_keys
from e2m_plugins.sip import SipMessage
from e2m_plugins.testpki import TestPKI, issue_user, make_ca

from .flows import SDP_OFFER, SRTP_OFFER, TRUSTED, invite, message

SECRET = b"hostile-case secret text 7f3a"
CID = "p1@example.com"
OVERSIZE = 300 * 1024          # over the core's 256 KiB body limit
AES128_CBC = bytes.fromhex("0609608648016503040102")   # OID 2.16.840.1.101.3.4.1.2


# -- building blocks -----------------------------------------------------------------

def envelope(pki: TestPKI, msg: SipMessage, recipients: tuple[str, ...] = ("bob", TRUSTED),
             text: bytes = SECRET, *, signer: object = "alice", cipher: str | None = None,
             bind: bool = True, handling: str = "required",
             content_id: str = CID, at: float | None = None) -> mime.MimePart:
    """``text`` (text/plain) signed by ``signer`` (a user name, a credential with ``.cert``
    and ``.key``, or None), encrypted for ``recipients`` (user names; a name with a dot
    is a proxy host), bound to ``msg`` unless ``bind`` is false."""
    certs = [pki.proxy(r).cert if "." in r else pki.user(r).cert for r in recipients]
    cred = pki.user(signer) if isinstance(signer, str) else signer
    entity, _ = protect_content("text/plain", text, [recipient_for_certificate(c) for c in certs],
                                signer=(cred.cert, cred.key) if cred else None,
                                content_id=content_id, handling=handling, cipher=cipher,
                                bind_to=msg if bind else None, at=at)
    return entity


def labelled(msg: SipMessage, entity: mime.MimePart, label: str | None = "auto") -> SipMessage:
    """``msg`` carrying ``entity``, with a Proxy-Required-Body: ``label``; "auto" names
    the proxy and the entity's Content-ID, None adds none."""
    out = with_entity(msg, entity)
    if label == "auto":
        label = f'{TRUSTED};cid="{entity.content_id}"' if entity.content_id else TRUSTED
    return out.add("Proxy-Required-Body", label) if label else out


def protected(pki: TestPKI, text: bytes = SECRET, *, label: str | None = "auto",
              change: Callable[[mime.MimePart], mime.MimePart] | None = None,
              **settings: object) -> SipMessage:
    """Alice's MESSAGE to bob carrying ``envelope(**settings)``, labelled (``label`` as
    for ``labelled``); with the defaults a valid request.  ``change`` breaks the entity."""
    msg = message(pki, text)
    entity = envelope(pki, msg, text=text, **settings)
    return labelled(msg, change(entity) if change else entity, label)


def replace_body(entity: mime.MimePart, body: bytes) -> mime.MimePart:
    return mime.MimePart(entity.headers, body)


def transfer_encoding(entity: mime.MimePart, value: str, body: bytes | None = None) -> mime.MimePart:
    """``entity`` with Content-Transfer-Encoding ``value`` (and ``body``, if given)."""
    hs = [(n, v) for n, v in entity.headers if n.lower() != "content-transfer-encoding"]
    return mime.MimePart((*hs, ("Content-Transfer-Encoding", value)),
                         entity.body if body is None else body)


def flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


# -- the envelope ----------------------------------------------------------------------

def garbage_der(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, change=lambda env: replace_body(env, b"\x30\x80\x02\x01\x05garbage"))


def truncated_base64(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, change=lambda env: transfer_encoding(
        env, "base64", base64.b64encode(env.body)[:-7]))


def _cbc_to_ofb(env: mime.MimePart) -> mime.MimePart:
    assert AES128_CBC in env.body
    ofb = AES128_CBC[:-1] + b"\x03"                 # ... .1.3, aes128-OFB
    return replace_body(env, env.body.replace(AES128_CBC, ofb))


def unknown_cipher(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, cipher="aes-128-cbc", change=_cbc_to_ofb)   # CBC: not bound


def not_a_recipient(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, recipients=("bob",), label=None)


def for_someone_else(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, recipients=("carol",))


def bad_gcm_tag(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, change=lambda env: replace_body(env, flip_last(env.body)))


def compressed_data(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, change=lambda env: mime.MimePart(
        tuple((n, v.replace("authEnveloped-data", "compressed-data")) for n, v in env.headers),
        env.body))


def only_optional_parts_for_others(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    msg = message(pki, text)
    parts = [envelope(pki, msg, (who,), text, handling="optional", content_id=cid)
             for who, cid in (("carol", "a@x"), (TRUSTED, "b@x"))]
    return with_entity(msg, mime.multipart_mixed(parts))


def body_from_another_dialog(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    """A valid protected body, bound to another MESSAGE (another Call-ID and tag)."""
    msg, other = message(pki, text), message(pki, text)
    return labelled(msg, envelope(pki, other, text=text))


def stale(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    """A valid body whose signed SIP context was made an hour ago (a captured message
    sent again later, with everything else fresh)."""
    return protected(pki, text, at=time.time() - 3600)


def split_views_differ(pki: TestPKI) -> SipMessage:
    """An INVITE whose sealed SDP keys would show bob another session than the SDP the
    proxy reads (a ``c=`` line among the keying lines), signed by alice and bound."""
    msg = invite(pki, SRTP_OFFER)
    alice = pki.user("alice")
    bob, proxy = pki.user("bob").cert, pki.proxy(TRUSTED).cert
    view, keys = separate_keys(SRTP_OFFER)
    lying = SdpKeys(((0, "c=IN IP4 203.0.113.66"), *keys.lines))
    sealed = seal_keys(lying, recipient_for_certificate(bob)).der
    entity, _ = protect_content("application/sdp", view,
                                [recipient_for_certificate(bob), recipient_for_certificate(proxy)],
                                signer=(alice.cert, alice.key), content_id="view@example.com",
                                bind_to=msg, readers=[TRUSTED], sealed_keys=sealed)
    return labelled(msg, entity, f'{TRUSTED};cid="view@example.com"')


def oversized(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return message(pki, text + b"x" * (OVERSIZE - len(text)))


def plaintext_sdp(pki: TestPKI) -> SipMessage:
    return invite(pki, SDP_OFFER)


# -- the signature -----------------------------------------------------------------------

def tampered_signature(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    alice = pki.user("alice")
    entity = mime.inner_entity("text/plain", b"pay 10 " + text)
    signed = mime.multipart_signed(entity, sign(entity, alice.cert, alice.key, detached=True))
    return message(pki, text).with_body(signed.body.replace(b"pay 10", b"pay 99"),
                                        signed.header("Content-Type"))


def foreign_ca_signer(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    stranger = issue_user(make_ca("Elsewhere CA"), pki.aor("alice"))
    return protected(pki, text, signer=stranger)


def stranger_signs_as_alice(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, signer="carol")


def unsigned(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, signer=None)


# -- the labels ----------------------------------------------------------------------------

def label_names_missing_part(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, label=f'{TRUSTED};cid="nothere@example.com"')


def duplicate_labels(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text).add("Proxy-Required-Body", f'{TRUSTED};cid="{CID}"')


def label_without_host(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, label=f';cid="{CID}"')


# -- MIME and SIP around it --------------------------------------------------------------------

def multipart_without_boundary(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return message(pki, text).with_body(
        b"--x\r\nContent-Type: text/plain\r\n\r\n" + text + b"\r\n--x--\r\n", "multipart/mixed")


def unknown_transfer_encoding(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text, change=lambda env: transfer_encoding(env, "x-rot13"))


def content_type_without_subtype(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return message(pki, text).with_body(text, "text")


def control_character_in_a_header(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text).add("Subject", "x\x01y")


def too_many_hops(pki: TestPKI, *, text: bytes = SECRET) -> SipMessage:
    return protected(pki, text).replace("Max-Forwards", "0")
