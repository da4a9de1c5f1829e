"""A red-team review of the E2M engines: attacks tried in memory with the project's PKI.

Naming says what each test is:

* ``test_hole_*``  - an attack that SUCCEEDED when the review was made (every one of
  them was seen failing).  The test asserts that the attack fails; all are closed now
  and the tests stay as regressions.  The docstring names the
  attacker (off-path sender, untrusted on-path hop, curious chosen proxy, insider UA),
  what it gets, why the code lets it, and a fix.
* ``test_defect_*`` - not an attacker's gain, but a legitimate flow the security code
  broke (found along the way).
* ``test_held_*``  - an attack that was tried and that the code correctly refuses.
  These PASS.

Nothing here changes the engines; every message is built with the project's own
builders (``e2m_lab.flows``) and CMS code, then changed the way the attacker would.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone

import pytest
from asn1crypto import cms as asn1_cms
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_lab.flows import (CRYPTO, SDP_OFFER, SRTP_OFFER, TRUSTED, UNTRUSTED, answer,
                           apply_forward, invite, known_proxy, message, proxy_engine, ua_engine)
from e2m_plugins import headers as hdr
from e2m_plugins import mime
from e2m_plugins.body import message_body, protect_content, top_parts, with_entity
from e2m_plugins.cms import oids
from e2m_plugins.cms.envelope import open_envelope, seal
from e2m_plugins.cms.limits import Limits
from e2m_plugins.cms.recipients import CertificateKey, recipient_for_certificate
from e2m_plugins.config import LegacyPeer, peer_matches
from e2m_plugins.errors import E2MError
from e2m_plugins.proxy import ProxyEngine
from e2m_plugins.sip import RequestLine, SipMessage, make_request, make_response
from e2m_plugins.sipcontext import SipContext
from e2m_plugins.testpki import init_test_pki, issue_proxy, issue_user
from e2m_plugins.ua import UAEngine, next_attempt

SDP_VIEW = ("INVITE:application/sdp",)
NET_PROXY = "proxy.example.net"                  # bob@example.net's home proxy
SPY = "media-spy.attacker.example.org"           # a host in a domain the attacker owns
OTHER_SESSION = (b"v=0\r\no=hop 1 1 IN IP4 203.0.113.66\r\ns=-\r\nc=IN IP4 203.0.113.66\r\n"
                 b"t=0 0\r\nm=audio 6666 RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n") + CRYPTO


@pytest.fixture(scope="module")
def world():
    # One CA for everything (the federated set-up where the CA certifies proxies of
    # several domains); RSA keys, so the legacy (reSIProcate-like) tests can use them too.
    return init_test_pki(None, proxy_hosts=(TRUSTED, UNTRUSTED, NET_PROXY, SPY),
                         users=("alice", "bob", "carol", "mallory"), key_type="rsa")


# -- helpers ---------------------------------------------------------------------------

class Clock:
    """A wall clock the test moves (seconds)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now


def clocked_ua(world, name: str, clock, **settings) -> UAEngine:
    return UAEngine(ua_engine(world, name, **settings).config, clock=clock)


def clocked_proxy(world, host: str, clock, **settings) -> ProxyEngine:
    base = proxy_engine(world, host, **settings)
    return ProxyEngine(base.config, base.cache,
                       clock=lambda: datetime.fromtimestamp(clock(), timezone.utc))


def refuses(engine: UAEngine, msg: SipMessage) -> bool:
    try:
        engine.open(msg)
    except E2MError:
        return True
    return False


def same_cseq_new_branch(sent: SipMessage) -> SipMessage:
    """A captured request sent again as a new transaction (fresh top Via branch)."""
    return next_attempt(sent).replace("CSeq", sent.get("CSeq"))


def signer_of(world, name: str):
    cred = world.user(name)
    return cred.cert, cred.key


def label(msg: SipMessage, host: str, *cids: str) -> SipMessage:
    return msg.add(hdr.PROXY_REQUIRED_BODY,
                   hdr.format_proxy_required_body(hdr.BodyLabel(host, tuple(cids))))


def register_and_learn(world, engine: UAEngine, host: str, view: str) -> None:
    """Alice registers; the registrar's 200 announces ``host``'s policy (the normal way)."""
    register = make_request("REGISTER", f"sip:{world.domain}", from_uri=engine.config.aor,
                            to_uri=engine.config.aor)
    sent = engine.protect(register).message
    policy = hdr.PolicyHeader(host, view=(hdr.Rule.parse(view),)).format()
    engine.open(make_response(sent, 200, "OK", [(hdr.PROXY_BODY_POLICY, policy)]))
    engine.add_proxy_certificate(host, world.proxy(host).cert.public_bytes(Encoding.DER))


# ======================================================================================
# HOLES: each of these tests FAILS today
# ======================================================================================

# -- split SDP: what the UA takes as the offer --------------------------------------------

def test_hole_hop_drops_the_end_to_end_copy_and_bob_takes_the_view_as_the_offer(world):
    """HOLE (untrusted on-path hop): changes what bob reads - alice's SRTP offer arrives
    without its keying lines, as alice's signed, trusted offer.

    Seen with the old split (a proxy view part and a full copy part): the hop deleted
    the full copy and bob took the view as the offer.  Now there is one part: the SDP
    without keys, and the keys sealed for bob inside alice's signature.  The strongest
    form of the attack left: the proxy (it holds the part's CEK) takes the keys out of
    the signed attributes and re-seals the part; the signature no longer verifies.
    """
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, SDP_VIEW),))
    bob = ua_engine(world, "bob")
    sent = alice.protect(invite(world, SRTP_OFFER)).message
    (part,) = top_parts(message_body(sent))
    proxy_key = CertificateKey(world.proxy(TRUSTED).cert, world.proxy(TRUSTED).key)
    opened = open_envelope(part.decoded(), [proxy_key], want_cek=True)
    info = asn1_cms.ContentInfo.load(opened.plaintext)
    attrs = info["content"]["signer_infos"][0]["signed_attrs"]
    kept = [a for a in attrs if a["type"].dotted != oids.SDP_KEYS]
    assert len(kept) == len(attrs) - 1
    info["content"]["signer_infos"][0]["signed_attrs"] = asn1_cms.CMSAttributes(kept)
    resealed = seal(info.dump(force=True),
                    [recipient_for_certificate(world.user("bob").cert),
                     recipient_for_certificate(world.proxy(TRUSTED).cert)],
                    content_type=oids.SIGNED_DATA, cek_reference=opened.cek_reference)
    stripped = with_entity(sent, mime.smime_entity(resealed.der, "authEnveloped-data",
                                                   content_id=part.content_id))
    try:
        got = bob.open(stripped)
    except E2MError:
        return                                            # refused: the attack failed
    assert b"a=crypto" in got.message.body, (
        "bob accepted alice's SRTP offer with its keys stripped, as a trusted offer from "
        f"alice: {got.info.describe()}")


def test_hole_insider_hides_message_text_behind_an_sdp_view(world):
    """HOLE (insider UA): hides a MESSAGE's text from the archive.

    ``ProxyEngine._check_policy`` lets one part stay closed when it is ``handling=required``
    and an opened ``handling=optional`` part is an SDP ("a split SDP's full copy").  It
    never checks that the method carries sessions or that the closed part is an SDP.  Alice
    sends a MESSAGE: part 1 an SDP decoy for bob and the archive (optional, labelled),
    part 2 the real text for bob only (required).  The archive (view ``MESSAGE:*``, no
    verify rule) stores the SDP and forwards; bob's ``_open`` takes the required text and
    compares view and copy only when the copy is an SDP, so he shows the text, and even
    reports it ``readable_by`` the archive.

    Fix: at the proxy allow the closed copy only for SDP-carrying methods (INVITE, UPDATE,
    PRACK, ACK and their answers); at the UA refuse a view whose type differs from the
    required part it sits beside.
    """
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",))
    bob = ua_engine(world, "bob")
    original = message(world, b"(see attachment)")
    decoy, _ = protect_content("application/sdp", SDP_OFFER,
                               [recipient_for_certificate(world.user("bob").cert),
                                recipient_for_certificate(world.proxy(TRUSTED).cert)],
                               signer=signer_of(world, "alice"), content_id="view@example.com",
                               handling="optional", bind_to=original, readers=[TRUSTED])
    real, _ = protect_content("text/plain", b"Sell everything before the audit.",
                              [recipient_for_certificate(world.user("bob").cert)],
                              signer=signer_of(world, "alice"), content_id="real@example.com",
                              handling="required", bind_to=original)
    sent = label(with_entity(original, mime.multipart_mixed([decoy, real])),
                 TRUSTED, "view@example.com")
    verdict = proxy.inspect(sent)
    if verdict.action == "reply":
        return                                            # the archive refused: attack failed
    archived = [s.plaintext for s in verdict.seen]
    try:
        shown = bob.open(apply_forward(sent, verdict)).message.body
    except E2MError:
        return                                            # bob refused: attack failed
    pytest.fail(f"archive stored {archived!r}; bob shows {shown!r}")


def test_hole_insider_wraps_the_full_copy_in_a_multipart_to_escape_the_split_check(world):
    """HOLE (insider UA): shows the firewall one session and gives bob another.

    The threat model says a split SDP whose copies disagree is refused (403 "Split SDP
    copies differ").  ``UAEngine._open`` runs ``consistent()`` only when the required
    part's type is ``application/sdp``.  Alice puts the other session (media to
    203.0.113.66, with its key) in a ``multipart/mixed`` as the required copy: the proxy
    records 127.0.0.1:49170, bob's stack reads the SDP inside the multipart and sends media
    to 203.0.113.66.

    Fix: beside an SDP view, require the required part to be ``application/sdp`` itself
    (refuse any other type), then check consistency.
    """
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW)
    bob = ua_engine(world, "bob")
    original = invite(world, SRTP_OFFER)
    view, _ = protect_content("application/sdp", SDP_OFFER,
                              [recipient_for_certificate(world.user("bob").cert),
                               recipient_for_certificate(world.proxy(TRUSTED).cert)],
                              signer=signer_of(world, "alice"), content_id="view@example.com",
                              handling="optional", bind_to=original, readers=[TRUSTED])
    wrapped = mime.parse_entity(mime.encode_part(mime.multipart_mixed(
        [mime.parse_entity(mime.inner_entity("application/sdp", OTHER_SESSION))])))
    full, _ = protect_content(str(wrapped.content_type), wrapped.body,
                              [recipient_for_certificate(world.user("bob").cert)],
                              signer=signer_of(world, "alice"), content_id="full@example.com",
                              handling="required", bind_to=original)
    sent = label(with_entity(original, mime.multipart_mixed([view, full])),
                 TRUSTED, "view@example.com")
    verdict = proxy.inspect(sent)
    if verdict.action == "reply":
        return
    seen_by_firewall = [(m.address, m.port) for m in verdict.media]
    try:
        got = bob.open(apply_forward(sent, verdict)).message
    except E2MError:
        return
    pytest.fail(f"firewall saw {seen_by_firewall}; bob got {got.get('Content-Type')} with "
                f"203.0.113.66 in it: {b'203.0.113.66' in got.body}")


# -- replay ------------------------------------------------------------------------------

def test_hole_replay_of_a_body_made_by_a_clock_that_runs_ahead(world):
    """HOLE (untrusted on-path hop): a captured MESSAGE is shown and archived twice.

    ``MemoryReplayCache`` (and ``HtableReplayCache``) keep an entry for window + 32 s
    counted from when it was *first seen*, but accept a body while its *claimed* time is
    within the window.  A body made by a sender whose clock runs more than 32 s ahead of
    the reader's (a phone without NTP) is still inside the window after its record is
    gone.  Here alice's clock is 120 s fast; the hop resends her
    MESSAGE (new branch, same CSeq) 340 s later: the proxy archives it again and bob
    shows it again (any time between +332 s and +420 s works).

    Fix: keep each entry until ``max(first_seen, context.time) + window + 32``, or on expiry
    raise the stale floor to the expired entry's (unclamped) time.
    """
    clock = Clock()
    start = clock.now
    alice = clocked_ua(world, "alice", lambda: clock() + 120.0,
                       proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    bob = clocked_ua(world, "bob", clock)
    proxy = clocked_proxy(world, TRUSTED, clock, view=("MESSAGE:*",))
    sent = alice.protect(message(world, b"Transfer 5000 to account 42.")).message
    first = proxy.inspect(sent)
    assert first.action == "forward"
    bob.open(apply_forward(sent, first))
    clock.now = start + 340.0
    replay = same_cseq_new_branch(sent)
    again = proxy.inspect(replay)
    proxy_took_it = again.action == "forward" and bool(again.seen)
    bob_took_it = not refuses(bob, apply_forward(replay, first))
    assert not proxy_took_it and not bob_took_it, (
        f"replay 340 s later: archived again={proxy_took_it}, shown again={bob_took_it}")


def test_hole_replay_after_the_receivers_clock_is_pushed_forward_and_back(world):
    """HOLE (untrusted on-path hop that also answers the phone's plain NTP): replay.

    Entries expire by wall clock and are deleted for good (``_expire``), without raising
    the stale floor that eviction raises.  The hop lets bob see alice's MESSAGE, waits
    100 s, steps bob's clock 300 s ahead while one fresh message arrives (any traffic:
    here carol's), which sweeps alice's entry out, then steps the clock back and resends
    alice's MESSAGE: it is inside the window and no longer remembered.

    Fix: expire entries on a monotonic clock, or raise the floor to the time of every
    entry that ``_expire`` drops, as eviction does.
    """
    clock = Clock()
    start = clock.now
    alice = clocked_ua(world, "alice", clock)
    carol = clocked_ua(world, "carol", clock)
    bob = clocked_ua(world, "bob", clock)
    sent = alice.protect(message(world, b"Open the door at 9.")).message
    bob.open(sent)
    clock.now = start + 100.0
    fresh = carol.protect(message(world, b"hi", sender="carol")).message
    clock.now = start + 399.0           # the hop's NTP answer: ~300 s ahead
    bob.open(fresh)                     # sweeps entries first seen before start + 68
    clock.now = start + 101.0           # and back
    assert refuses(bob, same_cseq_new_branch(sent)), "alice's MESSAGE was accepted twice"


def test_hole_replay_keys_of_two_different_messages_collide(world):
    """HOLE (low; insider UA with an odd AoR): two different messages share a replay key.

    ``SipContext.replay_key`` hashes the message fields joined by NUL.  AoR user parts are
    percent-decoded, so ``%00`` and ``%40`` put NUL and '@' into them and the join is
    ambiguous: From ``sip:u@example.com`` / To ``sip:v%40x%00sip%3Aw@example.com`` and
    From ``sip:u%40example.com%00sip%3Av@x`` / To ``sip:w@example.com`` give one key.  A
    user holding a certificate for such an AoR who learns another message's Call-ID,
    tag and CSeq first can burn its key (403 at the proxy, or pass as its
    "retransmission" at a UA).

    Fix: hash an unambiguous encoding (the DER of the message fields, or length prefixes).
    """
    one = SipContext("c1", "t1", 1, "MESSAGE", "sip:u@example.com",
                     "sip:v@x\x00sip:w@example.com", 0, 0)
    two = SipContext("c1", "t1", 1, "MESSAGE", "sip:u@example.com\x00sip:v@x",
                     "sip:w@example.com", 0, 0)
    assert not one.same_message(two)
    assert one.replay_key() != two.replay_key(), "different messages, same replay key"


# -- the proxy takes what nobody signed ----------------------------------------------------

def test_hole_proxy_takes_an_unsigned_context_and_burns_the_real_messages_key(world):
    """HOLE (untrusted on-path hop before a view-only archive): the archive stores the
    hop's text under alice and alice's real MESSAGE is refused as a replay.

    docs/protocol.md §2 "Who must bind": a proxy requires a *signed* context.
    ``ProxyEngine._context`` accepts any context, including one that only the envelope's
    ``authAttrs`` carry - which anyone who encrypts to the proxy can write.  The hop copies
    alice's message fields into its own body (unsigned, encrypted to bob's and the
    proxy's public certificates) and sends it first: the proxy archives it (signature
    "none") and records the replay key; alice's genuine MESSAGE then gets 403 "Replayed
    or stale body".  (A proxy with a ``verify`` rule answers 495 before recording: held.)

    Fix: in ``_context``, require ``part.context_signed`` for senders outside
    ``legacy_peers``, and record the replay only for signed contexts.
    """
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",))
    sent = alice.protect(message(world, b"I accept the offer.")).message
    (part,) = top_parts(message_body(sent))
    forged_entity, _ = protect_content(
        "text/plain", b"I decline the offer.",
        [recipient_for_certificate(world.user("bob").cert),
         recipient_for_certificate(world.proxy(TRUSTED).cert)],
        bind_to=sent, readers=[TRUSTED], content_id=part.content_id)
    forged = proxy.inspect(with_entity(sent, forged_entity))
    real = proxy.inspect(sent)
    assert forged.action == "reply" and real.action == "forward", (
        f"archived the hop's {[s.plaintext for s in forged.seen]!r}; alice's own message: "
        f"{real.code} {real.detail}")


# -- legacy CBC: the padding oracle is still there -------------------------------------------

def _resip_message(world, text: bytes, *, sender: str = "alice") -> SipMessage:
    """A reSIProcate-like MESSAGE: CBC EnvelopedData for bob and the archive, unsigned,
    no SIP context (what ``legacy_peers`` exists for)."""
    msg = message(world, text, sender=sender)
    entity, _ = protect_content("text/plain", text,
                                [recipient_for_certificate(world.user("bob").cert),
                                 recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                cipher="aes-128-cbc")
    return label(with_entity(msg, entity), TRUSTED)


def _cbc_blocks(msg: SipMessage) -> tuple[bytes, list[bytes]]:
    (part,) = top_parts(message_body(msg))
    der = part.decoded()
    info = asn1_cms.ContentInfo.load(der)["content"]["encrypted_content_info"]
    ct = info["encrypted_content"].native
    return der, [info["content_encryption_algorithm"]["parameters"].native] + \
        [ct[i:i + 16] for i in range(0, len(ct), 16)]


def _with_ciphertext(msg: SipMessage, der: bytes, iv: bytes, ciphertext: bytes) -> SipMessage:
    info = asn1_cms.ContentInfo.load(der)
    eci = info["content"]["encrypted_content_info"]
    eci["content_encryption_algorithm"] = {
        "algorithm": eci["content_encryption_algorithm"]["algorithm"].native, "parameters": iv}
    eci["encrypted_content"] = ciphertext
    return with_entity(msg, mime.smime_entity(info.dump(force=True), "enveloped-data"))


def _oracle_queries(msg: SipMessage, block: int):
    """Vaudenay's queries for the last byte of plaintext block ``block`` (1-based): the
    ciphertext cut after that block, the block before it XORed with guess ^ 0x01."""
    der, blocks = _cbc_blocks(msg)
    for guess in range(256):
        before = bytearray(blocks[block - 1])
        before[-1] ^= guess ^ 0x01
        body = b"".join(blocks[1:block - 1]) + bytes(before) + blocks[block]
        yield guess, _with_ciphertext(msg, der, blocks[0], body)


SECRET_TEXT = b"The vault code is 7391; the alarm code is 2046. Burn this message."


def test_hole_padding_oracle_at_the_proxy_for_a_legacy_peers_body(world):
    """HOLE (untrusted on-path hop): decrypts a legacy sender's MESSAGE, one byte per at
    most 256 queries, through the archive proxy's answers.

    The threat model says the CBC oracle is closed for ``legacy_peers`` because every
    failure after decryption is the same 496.  But success is a different answer: an
    unsigned legacy body is text, so a forged ciphertext whose last block happens to pad
    correctly decrypts to garbage text that still parses and is forwarded, while bad
    padding is 496.  Forward-or-496 is exactly Vaudenay's padding oracle.  This test
    recovers the last byte of the fourth plaintext block.

    Fix: take CBC from a legacy sender only when it is signed inside (sign-then-encrypt:
    every tampered ciphertext then fails the signature, so all forged queries get one
    answer - see ``test_held_signed_legacy_cbc_gives_the_hop_no_oracle``); unsigned CBC
    only behind a separate, loudly documented setting.
    """
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",),
                         legacy_peers=(world.aor("alice"),))
    msg = _resip_message(world, SECRET_TEXT)
    # unsigned CBC, even from a legacy peer, gets the one answer every failure gets
    assert (proxy.inspect(msg).action, proxy.inspect(msg).code) == ("reply", 496)
    answers = {guess: (v.action, v.code) for guess, query in _oracle_queries(msg, 4)
               for v in [proxy.inspect(query)]}
    recovered = [chr(g) for g, a in answers.items() if a[0] == "forward"]
    cred = world.proxy(TRUSTED)
    der, _ = _cbc_blocks(msg)
    plain = open_envelope(der, [CertificateKey(cred.cert, cred.key)],
                          limits=Limits(accept_cbc=True)).plaintext
    assert len(set(answers.values())) == 1, (
        f"oracle: {Counter(answers.values())}; recovered {recovered}, the real byte is "
        f"{chr(plain[63])!r}")


def test_the_oracle_is_back_only_where_unsigned_cbc_is_accepted_by_name(world):
    """``[policy] legacy_unsigned_cbc = true`` (documented as exactly this) brings the
    oracle back: the setting is the operator's informed choice for a peer that cannot
    sign, and it is off by default.  This test pins that the setting means what the
    docs say, so nobody mistakes it for safe."""
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",),
                         legacy_peers=(world.aor("alice"),), legacy_unsigned_cbc=True)
    msg = _resip_message(world, SECRET_TEXT)
    assert proxy.inspect(msg).action == "forward"
    answers = {(v.action, v.code) for _, query in _oracle_queries(msg, 4)
               for v in [proxy.inspect(query)]}
    assert answers == {("forward", None), ("reply", 496)}


def test_hole_padding_oracle_at_a_ua_that_accepts_unsigned_legacy_bodies(world):
    """HOLE (untrusted on-path hop): the same oracle at bob's UA, whose ``[[legacy]]``
    entry for alice has ``accept_unsigned = true``: 493 for bad padding, an answer from
    the application (200) for good padding.

    Fix: as above (no unsigned CBC, or at least not without a setting that says it is an
    oracle).
    """
    bob = ua_engine(world, "bob", legacy=(LegacyPeer(world.aor("alice"), accept_unsigned=True),))
    msg = _resip_message(world, SECRET_TEXT)
    outcomes = Counter()
    for _guess, query in _oracle_queries(msg, 4):
        try:
            bob.open(query)
            outcomes["opened (200)"] += 1
        except E2MError as exc:
            outcomes[type(exc).__name__] += 1
    assert len(outcomes) == 1, f"oracle at the UA: {dict(outcomes)}"


def test_hole_hop_rewrites_from_to_put_a_normal_users_cbc_under_legacy_rules(world):
    """HOLE (untrusted on-path hop): the proxy's legacy exception is chosen by From, which
    the hop writes.

    Alice (a normal UA) writes to a ``[[legacy]]`` peer that cannot verify (``sign =
    false``): CBC, unsigned, no context, for the peer and the archive.  The proxy refuses it
    from alice (see the defect below), but after the hop rewrites From to a name in
    ``legacy_peers`` it opens it - so alice's message, which she never marked legacy,
    gets the padding oracle above and no replay check.

    Fix: do not decide the legacy exception from an unauthenticated header alone: accept
    CBC only when it is signed by the legacy sender (then From is checked against the
    signature), or bind the legacy exception to the transport/peer the proxy knows.
    """
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),),
                      legacy=(LegacyPeer(world.aor("bob"), sign=False),))
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",),
                         legacy_peers=(world.aor("bob"),))
    sent = alice.protect(message(world, b"alice's own words")).message
    rewritten = sent.replace("From", f"<{world.aor('bob')}>;tag={sent.from_tag}")
    verdict = proxy.inspect(rewritten)
    assert not verdict.seen, f"opened alice's CBC body as a legacy sender's: {verdict.seen}"


# -- policies learnt from strangers ------------------------------------------------------

def _stranger_invite(world, policy: str, *, from_uri: str, call_id: str | None = None,
                     body: bytes = b"") -> SipMessage:
    return make_request("INVITE", world.aor("alice"), from_uri=from_uri, to_uri=world.aor("alice"),
                        call_id=call_id, body=body,
                        content_type="application/sdp" if body else None,
                        extra_headers=[(hdr.PROXY_BODY_POLICY, policy)])


def test_hole_a_strangers_invite_makes_the_phone_fetch_a_url_of_its_choosing(world):
    """HOLE (off-path sender): makes alice's phone send an HTTP GET to any host and port
    >= 1024 (here a LAN router's admin page), the attack the threat model lists as fixed.

    ``UAEngine.learn`` runs first in ``open``, before any check, and ``_policy_origin``
    treats *every* incoming INVITE (and every request with a To tag) as "a dialog we are in",
    with its From as the peer.  ``accepts_proxy`` then accepts a policy host in the From's
    domain - chosen by the sender, an IP literal included - and ``_own_url_only`` keeps a
    cert-url on that host.  The INVITE is refused (488), but the policy stays (dialog
    scope, up to ``max_policy_expires``), and ``certificates_wanted()`` (every scope) hands
    the URL to the fetcher at the next registration or E2M retry.

    Fix: learn from a request only after ``open`` accepted it (signed by its From), and only
    for a dialog that then exists; or never learn from requests at all.
    """
    alice = ua_engine(world, "alice")
    url = "http://192.168.1.1:8080/cgi-bin/reboot?now=1"
    refused = refuses(alice, _stranger_invite(world, f'192.168.1.1;view="INVITE:*";cert-url="{url}"',
                                              from_uri="sip:x@192.168.1.1", body=b"junk"))
    assert refused
    wanted = [w.url for w in alice.certificates_wanted()]
    assert url not in wanted, f"alice's phone would fetch {wanted}"


def test_hole_strangers_invites_push_the_home_proxys_policy_out(world):
    """HOLE (off-path sender): 256 bodiless INVITEs, each with a policy for a host in its
    own From domain (``expires=86400``), fill ``LearnedPolicies`` (256 entries); a full
    table pushes out the learnt entry that expires *first* - the registrar's (3600 s).
    Alice's next MESSAGE is no longer encrypted for the home archive (a 496 round trip
    per message type until relearnt, and the announced ``cert-fp`` pin is gone).

    Fix: as above; and keep entries learnt from our own transactions apart from
    dialog-scoped ones (separate bounds), so the latter can never evict the former.
    """
    alice = ua_engine(world, "alice")
    register_and_learn(world, alice, TRUSTED, "MESSAGE:*")
    assert TRUSTED in alice.protect(message(world)).info.readable_by
    for i in range(256):
        refuses(alice, _stranger_invite(world, f'h{i}.example.net;view="INVITE:*";expires=86400',
                                        from_uri=f"sip:x@h{i}.example.net"))
    readers = alice.protect(message(world)).info.readable_by
    assert TRUSTED in readers, f"the home proxy's policy was pushed out: readers {readers}"


def test_hole_hop_plants_a_dialog_policy_for_a_host_in_a_domain_it_chooses(world):
    """HOLE (untrusted on-path hop; needs a certificate for its host from a CA alice
    trusts): alice's later SDP in an established call is encrypted for the hop's spy host.

    The policy-header defence is "only our domain or the peer's".  But the peer is the
    From of whatever request carries the policy.  Knowing the call's Call-ID, the hop sends
    alice a separate bodiless INVITE with that Call-ID, a From in ``attacker.example.org``
    and a policy for ``media-spy.attacker.example.org``; it is filed under the call's scope.
    Alice's re-INVITE in the real call (with bob) then names the spy as a reader.

    Fix: as above; and judge a dialog policy against the dialog's real peer, not against
    the message that carried it.
    """
    alice = ua_engine(world, "alice")
    bob = ua_engine(world, "bob")
    call = "call-under-attack@e2m"
    offer = alice.protect(invite(world, call_id=call)).message
    alice.open(bob.protect(answer(bob.open(offer).message)).message)
    refuses(alice, _stranger_invite(world, f'{SPY};view="INVITE:application/sdp"',
                                    from_uri="sip:x@attacker.example.org", call_id=call))
    try:   # what the phone's fetcher would do with the cert-url / a 496 body
        alice.add_proxy_certificate(SPY, world.proxy(SPY).cert.public_bytes(Encoding.DER))
    except E2MError:
        pass
    reinvite = alice.protect(invite(world, call_id=call, cseq=2, to_tag="b1"))
    assert SPY not in reinvite.info.readable_by, reinvite.info.describe()


def test_hole_a_proxy_chosen_for_one_peer_reads_messages_to_everyone(world):
    """HOLE (curious chosen proxy): bodies meant for others.

    ``accepts_proxy`` lets a 496 (or a 495's or OPTIONS 200's policy) name a host in the
    *peer's* domain - right for that peer.  But ``learn_496`` (and ``_policy_origin`` for
    495/496/REGISTER/OPTIONS answers) files the policy with scope None, "for everything we
    send", and ``_readers_for`` never asks ``accepts_proxy`` again for the message at hand.
    bob@example.net's home proxy answers one MESSAGE to bob with a 496; from then on every
    MESSAGE alice sends, to carol@example.com included, carries a RecipientInfo for it.
    A proxy of example.net on alice's path (a visited network) or any hop that passes it
    the ciphertext reads alice's messages to her own colleagues.

    Fix: file a policy learnt through the peer's domain under that peer (or domain) and
    re-check ``accepts_proxy(host, peer)`` in ``_readers_for`` for every message.
    """
    bob_net = "sip:bob@example.net"
    alice = ua_engine(world, "alice", peers=("carol",))
    alice.certs.add_user(bob_net, issue_user(world.ca, bob_net).cert)
    to_bob = make_request("MESSAGE", bob_net, from_uri=world.aor("alice"), to_uri=bob_net,
                          body=b"hi bob", content_type="text/plain")
    sent = alice.protect(to_bob).message
    refusal = make_response(sent, 496, "Proxy Indecipherable",
                            [("Warning", f'380 {NET_PROXY} "Required to view \'text/plain\'"')],
                            world.proxy(NET_PROXY).cert.public_bytes(Encoding.DER),
                            "application/pkix-cert")
    assert alice.react(refusal, to_bob).action == "retry"   # right for bob@example.net
    to_carol = alice.protect(message(world, b"for carol only", recipient="carol"))
    assert NET_PROXY not in to_carol.info.readable_by, to_carol.info.describe()


# -- protect ------------------------------------------------------------------------------

def test_hole_an_sdp_inside_a_multipart_goes_out_in_the_clear(world):
    """HOLE (untrusted on-path hop, when the application sends a multipart body - e.g. an
    emergency INVITE with SDP + PIDF-LO, RFC 6442, or SIP-I): reads the SRTP keys.

    ``_protectable`` looks at the top Content-Type only (``application/sdp``, or any
    MESSAGE); a ``multipart/mixed`` INVITE is passed through untouched, ``a=crypto`` and
    all, although ``[e2m] require`` promises never to send SDP in the clear (and the
    receiving side would refuse it, 488: too late, the keys were on the wire).  The same
    happens to a multipart that already holds one S/MIME part (``has_protection``).

    Fix: with ``require`` on, walk the body like ``_refuse_plaintext`` does and protect (or
    refuse to send, ``PolicyError``) any body holding an SDP or MESSAGE leaf in the clear.
    """
    alice = ua_engine(world, "alice")
    pidf = b'<?xml version="1.0"?><presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:alice@example.com"/>'
    body = mime.multipart_mixed([mime.parse_entity(mime.inner_entity("application/sdp", SRTP_OFFER)),
                                 mime.parse_entity(mime.inner_entity("application/pidf+xml", pidf))])
    try:
        sent = alice.protect(with_entity(invite(world, SRTP_OFFER), body))
    except E2MError:
        return
    assert b"inline:" not in sent.message.body, "SRTP key sent in the clear: " + sent.info.describe()


# -- work per message ----------------------------------------------------------------------

def _best_ms(fn, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def test_hole_a_bodiless_request_full_of_tiny_policies_costs_hundreds_of_messages(world):
    """HOLE (off-path sender): one 300 KiB OPTIONS costs a proxy (and a UA) several hundred
    times a normal protected MESSAGE - the target is at most 100x.

    ``Proxy-Body-Policy: a,a,a,...`` - 40 header lines of 3,900 one-letter hosts each,
    ~156,000 policies.  The proxy parses every one (``_policies_in_our_name``) for any
    request it relays, body or not; the UA parses all of them in ``learn`` *before*
    deciding the message is a stranger's.  No public-key budget is touched.

    Fix: bound policy values per message (e.g. 16, as labels are bounded by parts) and
    fail closed above it; at the UA decide the origin before parsing.
    """
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",))
    normal = iter([alice.protect(message(world)).message for _ in range(12)])
    normal_ms = _best_ms(lambda: proxy.inspect(next(normal)), 10)
    flood = [(hdr.PROXY_BODY_POLICY, ",".join(["a"] * 3900))] * 40
    hostile = make_request("OPTIONS", world.aor("bob"), from_uri="sip:x@example.net",
                           to_uri=world.aor("bob"), extra_headers=flood)
    assert len(hostile.serialize()) < 320 * 1024
    hostile_ms = _best_ms(lambda: proxy.inspect(hostile), 2)
    assert hostile_ms <= 100 * normal_ms, (
        f"hostile {hostile_ms:.0f} ms vs normal {normal_ms:.2f} ms: {hostile_ms / normal_ms:.0f}x")


# ======================================================================================
# DEFECTS the security code introduced (not an attacker's gain); the spiral stays open
# ======================================================================================

@pytest.mark.xfail(strict=True, reason="known limit (docs/protocol.md §7): a spiral back "
                   "through the same proxy is refused as a replay; route spirals past "
                   "the engine or give each pass its own proxy host")
def test_defect_a_spiral_through_the_same_proxy_is_refused_as_a_replay(world):
    """DEFECT: a request that spirals (leaves the proxy and comes back to it with a new
    Request-URI, e.g. through an application server) is a new transaction for tm, so the
    engine sees the same SIP context twice and answers 403 "Replayed or stale body".
    docs/protocol.md §7 expects spirals ("on an earlier pass of a spiral").

    Fix: key the proxy's replay record with the bottom-most Via branch (the originating
    UAC's, the same on every pass) and treat a repeat with the same bottom branch as a
    spiral, or let Kamailio mark spirals (its own Via below the top).
    """
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",))
    sent = alice.protect(message(world)).message
    first = proxy.inspect(sent)
    assert first.action == "forward"
    back = apply_forward(sent, first).insert("Via", f"SIP/2.0/UDP {TRUSTED};branch=z9hG4bKpass1")
    back = back.insert("Via", "SIP/2.0/UDP app.example.com;branch=z9hG4bKapp1")
    back = back.with_start_line(RequestLine("MESSAGE", "sip:bob@10.0.0.5:5060"))
    second = proxy.inspect(back)
    assert second.action == "forward", f"spiral refused: {second.code} {second.detail}"


def test_defect_a_normal_user_writing_to_a_legacy_peer_is_refused_by_the_archive(world):
    """DEFECT: alice's ``[[legacy]]`` entry for bob makes her send CBC; the proxy accepts
    CBC only when From is in ``legacy_peers`` (bob), so alice's every MESSAGE to bob gets
    496, and each retry is CBC again.  (The operator would have to name every user who
    may write to a legacy peer - and that is the From the hop rewrites, above.)

    Fix: decide per envelope what may be CBC (the recipient set, or a signed marker), or
    let ``legacy_peers`` also cover the legacy peer as recipient when the body is signed.
    """
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),),
                      legacy=(LegacyPeer(world.aor("bob"), sign=True),))
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",), legacy_peers=(world.aor("bob"),))
    verdict = proxy.inspect(alice.protect(message(world)).message)
    assert verdict.action == "forward", f"{verdict.code} {verdict.error}"


# ======================================================================================
# HELD: attacks tried that the code refuses; these PASS
# ======================================================================================

def test_held_a_verifying_proxy_refuses_the_unsigned_context_before_recording_it(world):
    """Hop, as in the unsigned-context hole, against a proxy with ``verify = MESSAGE:*``:
    495 comes before the replay record, so alice's message still goes through."""
    alice = ua_engine(world, "alice", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",), verify=("MESSAGE:*",))
    sent = alice.protect(message(world)).message
    (part,) = top_parts(message_body(sent))
    forged_entity, _ = protect_content(
        "text/plain", b"forged", [recipient_for_certificate(world.user("bob").cert),
                                  recipient_for_certificate(world.proxy(TRUSTED).cert)],
        bind_to=sent, readers=[TRUSTED], content_id=part.content_id)
    assert proxy.inspect(with_entity(sent, forged_entity)).code == 495
    assert proxy.inspect(sent).action == "forward"


def test_held_a_message_decoy_whose_hidden_part_is_optional_is_496(world):
    """Insider: the decoy is required (archive and bob), the real text an optional part for
    bob alone.  An optional closed part is never "a split copy": 496."""
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",))
    original = message(world)
    decoy, _ = protect_content("text/plain", b"Lunch?",
                               [recipient_for_certificate(world.user("bob").cert),
                                recipient_for_certificate(world.proxy(TRUSTED).cert)],
                               signer=signer_of(world, "alice"), content_id="d@example.com",
                               bind_to=original, readers=[TRUSTED])
    hidden, _ = protect_content("text/plain", b"the real plan",
                                [recipient_for_certificate(world.user("bob").cert)],
                                signer=signer_of(world, "alice"), content_id="h@example.com",
                                handling="optional", bind_to=original)
    sent = label(with_entity(original, mime.multipart_mixed([decoy, hidden])), TRUSTED, "d@example.com")
    verdict = proxy.inspect(sent)
    assert verdict.action == "reply" and verdict.code == 496


def test_held_a_signed_legacy_cbc_body_gives_the_hop_no_oracle(world):
    """Hop: the padding-oracle queries against a legacy sender that signs inside the CBC
    envelope all get the same 496 (a good pad still fails the signature)."""
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",), legacy_peers=(world.aor("alice"),))
    msg = message(world, SECRET_TEXT)
    entity, _ = protect_content("text/plain", SECRET_TEXT,
                                [recipient_for_certificate(world.user("bob").cert),
                                 recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                signer=signer_of(world, "alice"), cipher="aes-128-cbc")
    signed = label(with_entity(msg, entity), TRUSTED)
    assert proxy.inspect(signed).action == "forward"
    answers = {(v.action, v.code) for _g, q in _oracle_queries(signed, 6) for v in [proxy.inspect(q)]}
    assert answers == {("reply", 496)}


def test_held_from_rewritten_to_a_legacy_sender_does_not_unbind_a_gcm_body(world):
    """Hop: rewrites From of carol's (strict, GCM, signed, bound) MESSAGE to a legacy
    sender's AoR: the context names carol, so 403 at the proxy and at bob."""
    carol = ua_engine(world, "carol", proxies=(known_proxy(world, TRUSTED, ("MESSAGE:*",)),))
    proxy = proxy_engine(world, TRUSTED, view=("MESSAGE:*",), legacy_peers=(world.aor("alice"),))
    bob = ua_engine(world, "bob", legacy=(LegacyPeer(world.aor("alice"), accept_unsigned=True),))
    sent = carol.protect(message(world, sender="carol")).message
    rewritten = sent.replace("From", f"<{world.aor('alice')}>;tag={sent.from_tag}")
    verdict = proxy.inspect(rewritten)
    assert verdict.action == "reply" and verdict.code == 403 and not verdict.seen
    assert refuses(bob, rewritten)


def test_held_the_pinned_proxy_certificate_survives_a_496_in_other_spelling(world):
    """Hop: a 496 whose warn-agent is ``PROXY.EXAMPLE.COM.`` with a rogue certificate of
    the same CA: host keys are compared case-free without the dot, the pin holds."""
    pinned = known_proxy(world, TRUSTED, SDP_VIEW)
    alice = ua_engine(world, "alice", proxies=(pinned,))
    rogue = issue_proxy(world.ca, TRUSTED.upper() + ".")
    request = invite(world)
    alice.protect(request)
    refusal = make_response(request, 496, "Proxy Indecipherable",
                            [("Warning", f'380 {TRUSTED.upper()}. "Required to view \'application/sdp\'"')],
                            rogue.cert.public_bytes(Encoding.DER), "application/pkix-cert")
    assert alice.react(refusal, request).action == "fail"
    assert alice.certs.proxy(TRUSTED).public_bytes(Encoding.DER) == \
        pinned.certificate.public_bytes(Encoding.DER)


def test_held_legacy_domain_matching_is_exact(world):
    """Look-alike hosts, suffixes, user parts with ';' and IPv6 spellings."""
    assert not peer_matches("example.net", "sip:a@example.net.evil.com")
    assert not peer_matches("example.net", "sip:a@evilexample.net")
    assert not peer_matches("example.net", "sip:a@sub.example.net")
    assert peer_matches("example.net", "sip:a@EXAMPLE.NET.")
    assert not peer_matches("sip:bob@example.com", "sip:bob;x=1@example.com")
    assert not peer_matches("sip:bob@example.com", "sip:bob:pw@example.com")
    assert peer_matches("[2001:db8::1]", "sip:a@[2001:DB8:0:0::1]")
    assert not peer_matches("2001:db8::1", "sip:a@[2001:db8::1]")   # not an AoR, not a domain


def test_held_call_id_case_and_cseq_spelling(world):
    """Hop: a Call-ID in other case is another message (403); CSeq ``01`` is the same
    number, so it is recognised as the replay it is."""
    alice = ua_engine(world, "alice")
    bob = ua_engine(world, "bob")
    sent = alice.protect(message(world)).message
    assert refuses(bob, sent.replace("Call-ID", sent.call_id.upper()))
    bob.open(sent)
    number, method = sent.cseq
    assert refuses(bob, same_cseq_new_branch(sent).replace("CSeq", f"0{number} {method}"))


def test_held_a_responses_status_is_bound(world):
    """Hop: bob's signed 183 answer re-sent as a 200 (or a 200 as a 183) is refused."""
    alice = ua_engine(world, "alice")
    bob = ua_engine(world, "bob")
    offer = alice.protect(invite(world)).message
    opened = bob.open(offer)
    early = answer(opened.message)
    early = SipMessage(early.start_line.__class__(183, "Session Progress"), early.headers, early.body)
    sent = bob.protect(early).message
    as_200 = SipMessage(sent.start_line.__class__(200, "OK"), sent.headers, sent.body)
    assert refuses(alice, as_200)


def test_held_same_branch_after_the_transaction_lifetime_is_a_replay(world):
    """Last hop: resends alice's MESSAGE with the *same* top branch; within 32 s it passes
    as a retransmission (pjsip absorbs it over UDP), after 32 s it is a replay."""
    clock = Clock()
    alice = clocked_ua(world, "alice", clock)
    bob = clocked_ua(world, "bob", clock)
    sent = alice.protect(message(world)).message
    bob.open(sent)
    clock.now += 10
    bob.open(sent)                                   # a retransmission
    clock.now += 30
    assert refuses(bob, sent)


def test_held_a_strangers_policy_stays_in_its_own_call(world):
    """Off-path: a single stranger INVITE's policy for a host in its domain (with a CA
    certificate) does not reach alice's MESSAGEs or her other calls."""
    alice = ua_engine(world, "alice")
    refuses(alice, _stranger_invite(world, f'{SPY};view="*:*"', from_uri="sip:x@attacker.example.org"))
    try:
        alice.add_proxy_certificate(SPY, world.proxy(SPY).cert.public_bytes(Encoding.DER))
    except E2MError:
        pass
    assert SPY not in alice.protect(message(world)).info.readable_by
    assert SPY not in alice.protect(invite(world)).info.readable_by


def test_held_an_unbound_or_unsigned_extra_part_makes_bob_refuse(world):
    """Hop: adds to alice's signed, bound MESSAGE an optional part for bob that it made
    (unsigned) or that alice made for another message: bob refuses the whole body."""
    alice = ua_engine(world, "alice")
    bob = ua_engine(world, "bob")
    sent = alice.protect(message(world)).message
    (part,) = top_parts(message_body(sent))
    extra, _ = protect_content("text/plain", b"also this", [recipient_for_certificate(world.user("bob").cert)],
                               content_id="x@example.com", handling="optional", bind_to=sent)
    assert refuses(bob, with_entity(sent, mime.multipart_mixed([part, extra])))
    other = alice.protect(message(world, b"other")).message
    (other_part,) = top_parts(message_body(other))
    moved = mime.smime_entity(other_part.decoded(), "authEnveloped-data",
                              content_id="y@example.com", handling="optional")
    assert refuses(bob, with_entity(sent, mime.multipart_mixed([part, moved])))


def test_held_a_curious_proxy_cannot_get_srtp_keys_by_a_whole_body_496(world):
    """Curious chosen proxy: answers alice's SRTP INVITE with a 496 without Warning (the
    whole body).  The retry is split: it reads the view only, never ``a=crypto``."""
    alice = ua_engine(world, "alice")
    register_and_learn(world, alice, TRUSTED, "MESSAGE:*")
    request = invite(world, SRTP_OFFER)
    alice.protect(request)
    refusal = make_response(request, 496, "Proxy Indecipherable", [],
                            world.proxy(TRUSTED).cert.public_bytes(Encoding.DER), "application/pkix-cert")
    refusal = refusal.add(hdr.PROXY_BODY_POLICY, hdr.PolicyHeader(TRUSTED, view=(hdr.Rule.parse("INVITE:*"),)).format())
    reaction = alice.react(refusal, request)
    assert reaction.action == "retry"
    cred = world.proxy(TRUSTED)
    for part in top_parts(message_body(reaction.request)):
        try:
            plain = open_envelope(part.decoded(), [CertificateKey(cred.cert, cred.key)]).plaintext
        except E2MError:
            continue
        assert b"inline:" not in plain
