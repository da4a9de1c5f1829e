"""Review 134 (attacker's review of 9952d84), area 1: answers dropped in the core reply
route (review 133 K3's fix, ``ProxyEngine.read_response``, ``kemi.read_reply``).  Real
Kamailio (``proxy_factory``, E2M on, ``view = INVITE:application/sdp``), review 69's
stock pjsua2 2.15.1 caller (no E2M hook) through it, bob a ``RawUas`` registered there
(review 133's ``_stock_call``).  This module also holds the review's overall "tried and
held" list; the other holes are in ``test_review134_cert_refresh_move_wire.py`` (K2,
K3) and ``tests/e2e/test_review134_tcp_listener_churn.py`` (K4).

Hole K1: a plain answer SDP beside a part sealed for somebody else is relayed unrecorded
-------------------------------------------------------------------------------------------

- Attacker: an **insider UA** callee (bob, registered behind alice's home proxy), or an
  **untrusted hop** between bob and the proxy, hiding where the call's media goes from
  the archive of a stock (non-E2M) caller.  Review 133's multipart variant, with a
  well-formed envelope instead of junk.
- Messages: the stock caller's plaintext INVITE; bob's 200 is ``multipart/mixed`` of
  (1) a plain ``application/sdp`` with ``c=IN IP4 127.0.0.9``, ``m=audio 40404`` and
  (2) an ``application/pkcs7-mime; smime-type=enveloped-data`` part
  (``handling=optional``) that is a valid CMS envelope (263 octets, one kari) sealed
  for a P-256 certificate nobody involved holds.
- Observed: the proxy logs ``e2m: INVITE response 200 action=forward seen=- media=0
  error=ProxyCannotDecryptError`` and relays the 200; **0 answer media rows**; the
  stock caller (pjsip takes the SDP part of a multipart body) is ``CONFIRMED`` with
  remote RTP **127.0.0.9:40404**.  With five junk octets as part (2) the same 200 is
  dropped (``MalformedError``, review 133's fix): only the kind of error differs.
- Variant, nothing closed to the proxy: part (2) is text sealed for **the proxy's own
  certificate** and signed by a self-signed P-256 key (``protect_content``, whole MIME
  part): logged ``... media=0 error=UntrustedSignerError``, relayed, 0 answer rows, the
  stock caller ``CONFIRMED`` on **127.0.0.9:40404**.  In a one-off script (not kept;
  ``ProxyEngine.read_response`` on the same body) a part signed by alice (trusted, not the
  responder) gives ``SignatureRequiredError`` and one bound to another message
  ``BindingMismatchError``: none is refused (``response_refused`` False), so any
  E2M error but ``MalformedError``/``LimitExceededError`` in one part lets a plain SDP
  beside it through unrecorded.
- Mid-dialog (run): the stock caller, CONFIRMED on bob's clean answer (answer row
  127.0.0.1:40404), re-INVITEs him; bob's 200 (``o=`` version 2) is K1's multipart with
  the stranger's envelope: ``INVITE response 200 ... media=0
  error=ProxyCannotDecryptError``, relayed; the caller's second media state names
  **127.0.0.9:40404** and the call stays CONFIRMED, while the archive's only answer
  row still says 127.0.0.1:40404.
- Code at fault: ``e2m_plugins/proxy.py:127`` (``REFUSED_RESPONSE_ERRORS`` leaves out
  ``ProxyCannotDecryptError``) and ``:762``/``:767`` (``_read_body`` raises in
  ``_check_policy`` before the media of the parts that *did* open is summarised), so
  ``kamailio_app/kemi.py:2417-2418`` (``read_reply``) lets it go and tm's route records
  nothing (the same for an ``E2MError`` from ``open_part``, an untrusted signer,
  ``_context`` or ``check_signed_by`` at ``:755-765``).  ``docs/threat-model.md``
  (review 133 K3 row) keeps relaying "a body sealed for others" because "the callee
  can always hide from the proxy behind a body the caller alone opens": true for an
  E2M caller, not here, where the caller opens only the plain SDP, which the proxy
  could read too.
- Fix: in ``_read_body`` summarise the opened parts' SDP before the policy check and,
  for a response, treat any reading error as refused when an opened plaintext
  ``application/sdp`` part sits beside the failing one (drop it in the core reply
  route), or record that media with the error before relaying.  Either keeps "an
  answer sealed for the caller alone is relayed".
- Tests: ``test_plain_answer_sdp_beside_a_part_sealed_for_others_is_not_relayed_unrecorded``,
  ``test_plain_answer_sdp_beside_a_badly_signed_part_for_the_proxy_is_not_relayed_unrecorded``
  and ``test_reinvite_answer_beside_a_part_sealed_for_others_does_not_move_media_unrecorded``
  (strict xfails).

Control (unmarked, passes): ``test_control_a_junk_part_beside_the_plain_sdp_is_dropped``:
the same answer with a junk part is dropped in the core reply route (4 retransmissions
logged ``a INVITE 200 that must be read and cannot be (MalformedError ...): dropped``),
the caller is never CONFIRMED, no answer row.

Tried and held (all areas of the brief)
---------------------------------------

- Area 1, the ``$mi`` mark (read): Kamailio numbers each message a process receives
  (``msg->id``), the core reply route and tm's onreply route see the same ``sip_msg``;
  ``route_reply`` re-reads whenever the kept mark differs, so a reading cannot pass to
  another reply in the same process; a reply the core route drops never reaches tm's
  route; a stray reply is read once (``route_stray_reply`` uses the core route's
  reading).  No cross-process state is involved.
- Area 1, CPU (read): the body is read in the core route now also for a reply later
  dropped there (an own-realm 407 with a body), but a stray reply was already read
  (review 69) and every read is under ``message_budget``: no new unbounded cost.
- Area 1, honest answers dropped (run once as a script, not kept): an E2M UA's 493
  with its certificate (``UAEngine.refusal``) read by a viewing proxy: no error, not
  refused.  Callee DoS:
  a callee (or a hop on his leg) can only drop his own answers; other forks' answers
  are read on their own.
- Area 1, key accounting (read): the reading keeps ``looked_up`` from the core route
  and tm's route spends with the transaction's caller (``keeper`` asked only when the
  answer offers a key), as before; ``_inspect_response`` and ``read_response`` take
  the method from the same ``cseq``.
- Area 2, late copies (read): ``replay_key_of`` records, keeps and spends nothing; the
  remembered answer is keyed by the signed context, To tag and Request-URI
  (``late_copies.answer_key``), so only a copy of the signed request gets it, and it
  holds a status line only.  A stranger's stale or reused nonce does buy the body's
  reading before the challenge, bounded by ``message_budget`` and pike, the same cost
  as any stranger's request to a local user (unchallenged anyway): documented.
- Area 3, IPv6 spellings (read): ``_same_address`` compares ``ipaddress`` values, so
  ``[::1]``/``0:0::1`` agree and an IPv4-mapped spelling differs (481, fail closed); a
  refresh from another address is still 403 (control in the K2 module).  Cluster
  (read, as review 127): a phone sends in-dialog requests to the Contact it was given,
  its node's, and only that node claims the row's NOTIFYs.
- Area 4, late 2xx (read): state is bounded (``MAX_LATE`` 32, 6 per INVITE, 16 ACKs,
  ``_late_out`` deque of 64, ``_failed_at`` under ``_MAX_SENT``); the text handed to
  pjsip is re-parsed by the project's parser and pjsip's, and a parse error is an
  ``AbiError`` caught by ``_guarded``; the ACK/BYE destination is the forged 2xx's
  Record-Route/Contact, as for any answered call (documented bound).  A forged 2xx
  with a live call's Call-ID ends only the forged tag's slot (``_end_dialog`` with
  ``peer_tag``).
- Area 3, more (read): a TCP subscription moved by a TCP refresh from the same address
  is stop 43's intent (an honest reconnect looks the same); a TLS one moved to plain
  TCP needs the dialog's ids, which TLS hides from hops; on IPv6 the 403 rule is per
  /56 (``sources.site_of``), so a refresh from another address in the subscriber's
  /56 reaches ``refresh_dialog`` and is 481 (exact address compared), while an
  unsubscribe from there ends the follow (K3's class).
- Area 5, the listener under a stranger's churn below ~200 connections a second (run):
  the proxy's TCP connect got in and alice was told (K4 module); requests over the
  listener from another address are 403 (stop 43's own tests).
- Area 6, IPv6 phone (run): two e2m-phones on ``::1`` through a home listening on
  ``udp:[::1]`` exchange a MESSAGE: 200 at the first attempt, delivered, archived in
  plaintext (``tests/e2e/test_review134_ipv6_message.py``, with its IPv4 control).

Not tried (ideas left): the K1 door in an UPDATE's or reliable 183's answer (same
``_read_body`` as the re-INVITE's, run, so expected alike); the late-2xx ACK/BYE
built with the forged 2xx's From URI (``late_2xx._request`` copies the 2xx's From,
whose tag alone is checked) and what a home without ``[auth]`` does with it; K2 against the real
e2m-phone (its 481 handling and renewal timing were read, not run); a stale-nonce
stranger's cost measured on the wire; K4 with the proxy's large MESSAGE or INVITE
instead of the NOTIFY, and over IPv6.

Fixed (stop 43), K1: a response whose reading fails in any way is dropped in the core
reply route when some part of its body is readable without a key
(``proxy._keyless_content``: a plaintext leaf, or a signed part not sealed); only a
body sealed whole is relayed with its error (nobody but its recipients acts on it), as
documented.  ``MalformedError`` and ``LimitExceededError`` are dropped whatever the
body.  On the code before (stop 43's first K3 fix), the 3 hole tests failed; now the
three 200s are dropped and the stock caller is not CONFIRMED on 127.0.0.9 (nor moved to
it by the re-INVITE).
"""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from e2m_lab.kamailio_harness import PROXY_HOST
from e2m_plugins import mime
from e2m_plugins.body import protect_content
from e2m_plugins.cms.envelope import seal
from e2m_plugins.cms.recipients import recipient_for_certificate
from tests.kamailio.test_review133_answer_sdp_wire import CLEAN, _reinvited_call, _stock_call

pytestmark = pytest.mark.kamailio

_BOUNDARY = "r134b"


def _self_signed():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "somebody else")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(134)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    return cert, key


def _stranger_envelope() -> bytes:
    """A well-formed CMS envelope sealed for a certificate nobody here holds (the
    caller's stack would not open it either: a stock caller has no S/MIME)."""
    return seal(b"nothing", [recipient_for_certificate(_self_signed()[0])]).der


def _part_for_the_proxy_badly_signed(pki) -> bytes:
    """A whole MIME part (headers and body) the proxy itself opens: text sealed for its
    certificate, signed by a self-signed key no anchor vouches for."""
    entity, _ = protect_content("text/plain", b"nothing", [
        recipient_for_certificate(pki.proxy(PROXY_HOST).cert)], signer=_self_signed(),
        handling="optional")
    return mime.encode_part(entity)


def _mixed(second: bytes, *, whole_part: bool = False) -> bytes:
    """bob's plain SDP on 127.0.0.9 beside an ``optional`` S/MIME part: ``second`` as
    its body, or (``whole_part``) as the whole part."""
    head = b"" if whole_part else (
        "Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m"
        "\r\nContent-Transfer-Encoding: binary\r\n"
        "Content-Disposition: attachment;handling=optional\r\n\r\n").encode()
    return (f"--{_BOUNDARY}\r\nContent-Type: application/sdp\r\n\r\n".encode()
            + CLEAN.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 127.0.0.9")
            + f"\r\n--{_BOUNDARY}\r\n".encode() + head
            + second + f"\r\n--{_BOUNDARY}--\r\n".encode())


def _call(proxy_factory, tmp_path, body: bytes, name: str):
    got, answers, _, log = _stock_call(proxy_factory, tmp_path, body, name,
                                       content_type=f"multipart/mixed;boundary={_BOUNDARY}")
    seen = [ln[ln.index("e2m: "):] for ln in log.splitlines()
            if "e2m: INVITE response" in ln or "INVITE 200 that must be read" in ln]
    print(f"\n{name}: caller {got}; answer rows {[(r['address'], r['port']) for r in answers]}"
          f"; log {seen}")
    return got, answers, seen


def test_plain_answer_sdp_beside_a_part_sealed_for_others_is_not_relayed_unrecorded(
        proxy_factory, tmp_path):
    """Secure: the media a stock caller takes from a relayed answer is media the proxy
    recorded for it (or the answer is not relayed)."""
    got, answers, _ = _call(proxy_factory, tmp_path, _mixed(_stranger_envelope()), "r134s")
    taken = got.get("final_rtp") or got.get("remote_rtp")
    assert got.get("state") != "CONFIRMED" or \
        any(f"{row['address']}:{row['port']}" == taken for row in answers), (got, answers)


def test_plain_answer_sdp_beside_a_badly_signed_part_for_the_proxy_is_not_relayed_unrecorded(
        proxy_factory, tmp_path, pki):
    """The same door with a part sealed for the proxy itself (nothing is closed to it),
    signed by a self-signed key: secure as above."""
    got, answers, _ = _call(proxy_factory, tmp_path,
                            _mixed(_part_for_the_proxy_badly_signed(pki), whole_part=True),
                            "r134u")
    taken = got.get("final_rtp") or got.get("remote_rtp")
    assert got.get("state") != "CONFIRMED" or \
        any(f"{row['address']}:{row['port']}" == taken for row in answers), (got, answers)


def test_control_a_junk_part_beside_the_plain_sdp_is_dropped(proxy_factory, tmp_path):
    """The rule working nearby (review 133 K3's fix): the same answer with five octets
    of junk as its S/MIME part is dropped in the core reply route; the caller is never
    CONFIRMED."""
    got, answers, seen = _call(proxy_factory, tmp_path, _mixed(b"\x30\x03\x02\x01\x00"),
                               "r134j")
    assert got.get("state") != "CONFIRMED", got
    assert answers == []
    assert any("that must be read and cannot be (MalformedError" in ln for ln in seen), seen


# -- the same door in a re-INVITE's answer -------------------------------------------

def _reinvited(proxy_factory, tmp_path, reanswer: bytes, name: str):
    """Review 133's re-INVITING stock caller: bob answers the first INVITE with the
    clean SDP (127.0.0.1:40404) and the re-INVITE with ``reanswer`` (multipart)."""
    got, answers, invites, seen = _reinvited_call(
        proxy_factory, tmp_path, reanswer, name,
        content_type=f"multipart/mixed;boundary={_BOUNDARY}")
    print(f"\nre-INVITE: caller {got}; INVITEs at bob {invites}; answer rows "
          f"{[(r['address'], r['port']) for r in answers]}; log {seen}")
    return got, answers


def test_reinvite_answer_beside_a_part_sealed_for_others_does_not_move_media_unrecorded(
        proxy_factory, tmp_path):
    """Mid-dialog: secure, the address the stock caller sends to after the re-INVITE
    is one the proxy recorded (or the answer is not relayed)."""
    got, answers = _reinvited(proxy_factory, tmp_path, _mixed(_stranger_envelope()),
                              "r134r")
    assert got.get("first_state") == "CONFIRMED", got
    taken = got.get("after_reinvite")
    assert any(f"{row['address']}:{row['port']}" == taken for row in answers), (got, answers)
