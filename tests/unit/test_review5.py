"""A fifth attacker's review (December 2026) of the day's fixes, in memory.

Each ``test_hole_*`` is an attack that SUCCEEDS on the code as it stands; it is kept
as a strict xfail (the assertion is what the fix must make true) until the lead fixes
it.  ``test_held_*`` attacks the code refused, kept where nothing else covered them.
The docstring names the attacker (docs/threat-model.md), what it gets and the fix.
"""

from __future__ import annotations

import pytest

from e2m_lab.certservice_subscriber import PROXY, subscriber
from e2m_lab.flows import (SDP_ANSWER, answered_call, SDP_OFFER, SDP_VIEW, TRUSTED, answer, apply_forward,
                           invite, known_proxy, proxy_engine, reinvite, three_phones,
                           ua_engine)
from e2m_plugins import headers as hdr
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.dialog_keys import MAX_DIALOGS
from e2m_plugins.errors import BindingMismatchError
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import init_test_pki



@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="ec")




def _call(world, alice, bob, call_id):
    """alice (tag a1) calls bob (tag b1); the call is answered and under way."""
    sent = alice.protect(invite(world, call_id=call_id)).message
    reply = bob.protect(answer(bob.open(sent).message)).message
    assert alice.open(reply).message.body == SDP_ANSWER
    return sent




def _carols_hijack(world, carol, call_id):
    """Carol's re-INVITE into alice's call with bob (bob's tags, From carol, signed by
    carol, media to her own port): test_review2_ua's hijack."""
    return carol.protect(reinvite(world, "carol", "alice", call_id, 77, "b1", "a1",
                                   SDP_ANSWER.replace(b"49172", b"40000"))).message


# -- 1. the parties table (e67af50) ------------------------------------------------------

def test_hole_a_bye_with_our_tag_in_from_makes_alice_forget_her_call(world):
    """Insider UA (carol) who read the call's ids off the wire, as in the hijack of
    test_review2_ua.  She first sends alice a BYE with Call-ID of the call, ``From:
    carol;tag=a1`` (alice's OWN tag) and ``To: alice;tag=zz`` (a tag nobody has).

    ``_check_parties`` looks only at our tag where a request carries it (To: ``zz``,
    unknown: passes), but ``_forget_parties`` drops the entry of EITHER tag whose
    Call-ID matches: alice's entry ``a1`` goes.  pjsip finds no dialog with To tag
    ``zz`` and answers 481: the call goes on.  Carol's re-INVITE naming the call (bob's
    tags, From carol, signed as herself) is then taken, and pjsip moves the call's media
    to her.  (The same entry also goes on a BYE with the right ids whose CSeq pjsip
    refuses as out of order, 500: the engine forgets on receipt, before pjsip decides.)

    Seen on a real phone too (tests/pjsua/test_review5_phone.py): pjsip answers the
    BYE 481, then pjsua answers carol's re-INVITE 200, its SDP (SRTP keys included)
    sealed for carol.

    Fix (e2m_plugins/ua.py): ``_forget_parties`` drops ONE entry, that of OUR tag
    (``_local_tag``), never the other party's tag slot; and a BYE's entry goes when
    WE send the 2xx to it (``protect`` of a 2xx whose CSeq method is BYE; our tag is
    its To tag) or our own BYE, not when a BYE arrives (``_open``): pjsip answers 200
    only to a BYE that matched the dialog and its CSeq, so the spoofed BYE of the
    phone test with the right ids and a stale CSeq (pjsip: 500) must not count
    either.  The same holds for ``dialog_keys.end_dialog`` on a received BYE (today a
    refused BYE ends the call's keys: a 496 round trip, no leak)."""
    alice, bob, carol = three_phones(world)
    _call(world, alice, bob, "bye-from@x")
    bye = make_request("BYE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("carol"),
                       to_uri=world.aor("alice"), call_id="bye-from@x", cseq=9,
                       from_tag="a1", to_tag="zz")
    alice.open(bye)                       # no error: it names no dialog of alice's
    with pytest.raises(BindingMismatchError):
        alice.open(_carols_hijack(world, carol, "bye-from@x"))


def _rung_confirmed_and_cancelled(world, alice, n):
    """A stranger's INVITE rings alice (our 180, our tag t{n}); the stranger sends a
    200 'to' it with alice's tag in From (a response names our tag in From) and the
    same Call-ID and parties; then it CANCELs and alice answers the INVITE 487."""
    call = make_request("INVITE", world.aor("alice"), from_uri="sip:flood@example.net",
                        to_uri=world.aor("alice"), call_id=f"ring5-{n}@x", from_tag=f"f{n}")
    ringing = make_response(call, 180, "Ringing").replace("To", f"<{world.aor('alice')}>;tag=t{n}")
    alice.protect(ringing)
    forged = make_response(call, 200, "OK") \
        .replace("From", f"<{world.aor('alice')}>;tag=t{n}") \
        .replace("To", f"<sip:flood@example.net>;tag=f{n}")
    alice.open(forged)
    alice.protect(make_response(call, 487, "Request Terminated").replace("To", ringing.get("To")))


def test_hole_a_forged_2xx_keeps_rung_calls_in_the_parties_table(world):
    """Off-path sender + insider UA: test_review2_ua's flood of rung and cancelled
    calls, with one more datagram per call.  The stranger knows every id of its own
    call (alice's tag came in her 180), so before its CANCEL it sends alice a 200 to
    the INVITE with alice's tag in From and the same two parties.  ``_check_parties``
    finds the entry and the parties match (a set: order does not count);
    ``_note_confirmed(sent=False)`` then marks the entry confirmed, with no check that
    the 2xx answers an INVITE WE sent (pjsip drops it: alice is the UAS there).  The
    487 alice sends after the CANCEL no longer ends the entry
    (``_ends_our_answered_attempt`` spares confirmed ones), so 4,096 such calls push
    alice's live call out again and carol's re-INVITE is taken (fail open), as before
    e67af50.

    Fix (e2m_plugins/ua.py ``_note_confirmed``): a received 2xx confirms our tag only
    when it answers an INVITE we sent (``_sent_for(message)`` is not None, and the tag
    is the From tag of that INVITE); a 2xx we send confirms the To tag."""
    alice, bob, carol = three_phones(world)
    _call(world, alice, bob, "long5@x")
    for n in range(MAX_DIALOGS + 10):
        _rung_confirmed_and_cancelled(world, alice, n)
    with pytest.raises(BindingMismatchError):
        alice.open(_carols_hijack(world, carol, "long5@x"))


def test_held_spoofed_in_dialog_invites_leave_a_ringing_callers_entry(world):
    """Insider UA (carol) reading alice's own call to bob off the wire while it rings
    (the UAC side; test_review2_ua covers the UAS side).  She sends alice INVITEs with
    the call's Call-ID, ``From: bob;tag=b1``, ``To: alice;tag=a1``, no body (the parties
    match, the engine takes them), and pjsip answers them with failures (in the early
    dialog; then 500 for a CSeq below one it saw).  Before bc39b5c each failure, through
    ``protect``, dropped alice's entry (the 2xx then confirmed nothing, the ACK recorded
    it again unconfirmed, the next failure dropped it) and carol's re-INVITE was taken.
    Now only a failure in the transaction our own 18x answered ends an entry; a UAC's
    entry ends by what it receives (``_ends_dialog``) or a BYE."""
    alice, bob, carol = three_phones(world)
    sent = alice.protect(invite(world, call_id="early@x")).message
    got = bob.open(sent).message
    alice.open(make_response(got, 180, "Ringing").replace("To", f"{sent.get('To')};tag=b1"))

    def spoofed(cseq):
        request = make_request("INVITE", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                               to_uri=world.aor("alice"), call_id="early@x", cseq=cseq,
                               from_tag="b1", to_tag="a1")
        alice.open(request)                                   # parties match: taken
        alice.protect(make_response(request, 500, "Server Internal Error"))

    spoofed(100)
    reply = bob.protect(answer(got)).message
    alice.open(reply)
    alice.protect(make_request("ACK", "sip:bob@127.0.0.1:5062", from_uri=world.aor("alice"),
                               to_uri=world.aor("bob"), call_id="early@x", from_tag="a1",
                               to_tag="b1"))
    assert "early@x" in {c for c, _ in alice._parties.values()}     # recorded again
    spoofed(50)
    with pytest.raises(BindingMismatchError):
        alice.open(_carols_hijack(world, carol, "early@x"))


# -- 2. the key cache's quota per keeper (b2ad4b8) ---------------------------------------

LEGACY = "sip:old@legacy.example"


def _legacy_answer_charged_to(world, victim, n):
    """A 200 'from' the legacy peer, To ``victim``, to an INVITE the attacker sent
    through the proxy (tm matches a response by its Via branch alone, never by From or
    To): an unsigned GCM body for the proxy with a fresh CEKReference.  Legacy rules
    apply (From is a ``legacy_peers`` name), so no signature is asked for, and the
    keeper is the response's To: the victim."""
    request = make_request("INVITE", "sip:old@legacy.example", from_uri=LEGACY,
                           to_uri=world.aor(victim), call_id=f"legacy-{n}@x",
                           from_tag=f"l{n}")
    response = make_response(request, 200, "OK", [("Contact", "<sip:old@192.0.2.9>")]) \
        .replace("To", f"<{world.aor(victim)}>;tag=v{n}")
    entity, _ = protect_content("application/sdp", SDP_OFFER,
                                [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                cek_reference=new_reference())
    return with_entity(response, entity).add(
        hdr.PROXY_REQUIRED_BODY, hdr.format_proxy_required_body(hdr.BodyLabel(TRUSTED, ())))


def test_hole_unsigned_legacy_keys_are_charged_to_the_victims_quota(world):
    """Off-path sender (or any insider) where ``[policy] legacy_peers`` names a peer.
    ``_keep_keys`` charges a key to ``_keeper(self._sender_of(message))``: the From of
    a request, the To of a response, as WRITTEN.  For a signed body that is the signer
    (``check_signed_by``); a legacy peer's body needs no signature, so whoever sends it
    names the keeper.  The attacker sends an INVITE of its own through the proxy to an
    address it answers from, and answers it with 200s 'From' the legacy peer, To alice,
    each with an unsigned GCM body for the proxy and a new CEKReference (no digest is
    asked of a response).  Each key counts against alice's quota (1/8 of the cache):
    past it, alice's OWN keys go, the call under way first; her re-INVITE under the
    dialog key is then unreadable at the proxy (496 round trip, the archive misses
    bob's answers).  The same with a request From alice where [auth] is off, or From a
    remote domain's user (digest only covers our users).

    Fix (e2m_plugins/proxy.py ``_keep_keys``): the keeper is the signer's AoR for a part
    whose SIP context is signed (then it is the sender, checked); a key from a part
    with no signed context (legacy) is charged to one keeper for all unverified keys,
    e.g. ``"legacy:" + the legacy_peers name that matched`` (or a fixed
    ``"unverified"``), never to the AoR the message claims."""
    from e2m_plugins.keycache import MemoryKeyCache
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, legacy_peers=(LEGACY,),
                         cache=MemoryKeyCache(max_entries=16))          # quota: 2 keys
    alice = answered_call(world, proxy, "victim-call@x")
    for n in range(4):
        assert proxy.inspect(_legacy_answer_charged_to(world, "alice", n)).action == "forward"
    reinvite = alice.protect(invite(world, call_id="victim-call@x", cseq=2, to_tag="b1"))
    assert proxy.inspect(reinvite.message).seen


# -- 3 and 4. the phone's certificate service client (45e879d) ---------------------------

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


def _phone(world):
    made = subscriber(world)
    return made.engine, made.client, made.sent


def _subscribe(client, sent):
    """The SUBSCRIBE pjsua sends for the client's last ``send_subscribe``, through the
    hook."""
    from e2m_plugins import sip
    request = sip.make_request("SUBSCRIBE", BOB, from_uri=ALICE, to_uri=BOB,
                               extra_headers=[*sent[-1][1], ("Route", "<sip:127.0.0.1:5999;lr>")])
    return sip.parse(client.on_tx(request))


def _want_bob(engine, client, sent):
    from e2m_plugins import sip
    from e2m_plugins.ua import MissingPeerCertificateError
    msg = sip.make_request("MESSAGE", BOB, from_uri=ALICE, to_uri=BOB, body=b"hi",
                           content_type="text/plain")
    with pytest.raises(MissingPeerCertificateError):
        engine.protect(msg)
    client.tick()
    return _subscribe(client, sent)


def _notify(sub, body: bytes, cseq: int, from_tag: str | None = "srv1"):
    from e2m_plugins import sip
    notify = sip.make_request(
        "NOTIFY", "sip:alice@127.0.0.1:5070", from_uri=BOB, to_uri=ALICE,
        call_id=sub.call_id, from_tag=from_tag, to_tag=sub.from_tag, cseq=cseq,
        extra_headers=[("Event", "certificate"), ("Subscription-State", "active;expires=3600")],
        body=body, content_type="application/pkix-cert" if body else None)
    return notify if from_tag else notify.replace("From", f"<{BOB}>")   # no tag at all


def _answer(client, notify) -> int:
    from pjsua_hooks.certservice_client import NotifyAnswer
    with pytest.raises(NotifyAnswer) as caught:
        client.on_rx(notify, PROXY)
    return caught.value.code


def _der(cert) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding
    return cert.public_bytes(Encoding.DER)


def test_hole_a_notify_rewritten_to_a_huge_cseq_locks_the_phone_on_its_certificate(world):
    """Untrusted on-path hop, for ONE message.  The first NOTIFY of alice's subscription
    carries bob's certificate; the hop forwards it with ``CSeq: 2147483647`` (the CSeq
    is in no signature).  The phone takes it (200) and notes the CSeq
    (``Subscription.notify_cseq``).  Bob's key is then compromised: he publishes a new
    certificate, and the service NOTIFYs it (CSeq 2), then would NOTIFY its removal:
    every one is 500 "out of order" (``CertServiceClient._notify``), so alice goes on
    encrypting to the compromised key, with no event saying so, until the subscription
    is renewed (80 % of its time, 48 min of 3600 s, and only while alice talks to bob;
    ``_refuse_older`` is no help here: the one held IS the newest it saw).  Dropping
    NOTIFYs would need the hop on the path the whole time; this needs one rewrite.

    Fix (pjsua_hooks/certservice_client.py ``_notify``): a NOTIFY refused as out of
    order marks its subscription for a fresh one (a new dialog, so a CSeq the hop
    pushed up no longer counts): set a flag that ``tick`` reads to call
    ``self._subscribe(sub.aor, renew=True)`` (at most one renewal at a time, as now);
    ``_retire_others`` then drops the locked dialog when the new one is notified.
    Older content stays refused by ``UAEngine._refuse_older``."""
    from datetime import datetime, timedelta, timezone

    from e2m_plugins.testpki import issue_user
    engine, client, sent = _phone(world)
    compromised = issue_user(world.ca, BOB, "ec",
                             not_before=datetime.now(timezone.utc) - timedelta(days=10)).cert
    replacement = world.user("bob").cert                      # issued after it
    sub = _want_bob(engine, client, sent)
    assert _answer(client, _notify(sub, _der(compromised), cseq=2147483647)) == 200
    assert _answer(client, _notify(sub, _der(replacement), cseq=2)) == 500
    assert _der(engine.certs.user(BOB)) == _der(compromised)
    # What the fix must give: the refused NOTIFY starts a fresh subscription on the next
    # tick, whose first NOTIFY (the service's current state) is taken.
    client.tick()
    assert len(sent) == 2, "no fresh SUBSCRIBE after an out-of-order NOTIFY"
    fresh = _subscribe(client, sent)
    assert _answer(client, _notify(fresh, _der(replacement), cseq=1, from_tag="srv2")) == 200
    assert _der(engine.certs.user(BOB)) == _der(replacement)


def test_hole_low_a_notify_with_no_from_tag_is_taken_in_our_dialog(world):
    """LOW (untrusted hop, or anyone who read the subscription's Call-ID and our tag).
    ``_notify`` compares the NOTIFY's From tag with the notifier's tag only when the
    NOTIFY has one (``notify.from_tag and notify.from_tag != sub.to_tag``): a NOTIFY with
    NO From tag is read in the dialog whatever tag the notifier has, although RFC 3261
    §8.1.1.3 makes the From tag mandatory and RFC 6665 matches a NOTIFY to its
    subscription by it (pjsip's own dialogs answer such a request 400 or 481).  Who knows
    the Call-ID and our tag can write the notifier's tag too, so this widens nothing
    for a hop; it is the one check a forking or confused notifier's second dialog would
    otherwise meet.

    Fix (``CertServiceClient._notify``): a certificate NOTIFY without a From tag is 400
    (or 481), never read; and ``sub.to_tag`` is never set from an empty tag."""
    engine, client, sent = _phone(world)
    sub = _want_bob(engine, client, sent)
    assert _answer(client, _notify(sub, _der(world.user("bob").cert), cseq=1)) == 200
    assert _answer(client, _notify(sub, b"", cseq=2, from_tag=None)) >= 400
    assert engine.certs.user(BOB) is not None


def test_hole_calls_to_an_answering_victim_spend_its_quota(world):
    """Insider UA (carol) against a victim that answers by itself (``e2m-phone listen``
    does; so do a voicemail, an IVR, a conference bridge).  A key an answer offers is
    charged to the answer's signer, the callee (``_keeper(_sender_of)``: To of a
    response).  Carol calls bob again and again without offering a key to reuse
    (``cek_reuse = false`` on her side), so each of bob's answers offers a new one:
    every one counts against BOB's quota, and past it bob's own oldest key goes: the
    key bob's answer offered in his real call with alice.  That call's later bodies
    under bob's key are then unreadable at the proxy (496, or bob's answers forwarded
    unread).  Shown with a bound of 16 (quota 2) and four of carol's calls.

    Fix: charge a key kept from a RESPONSE to the caller of its transaction (the From of
    the request, which digest (our users) or the INVITE's signature vouched for), not to
    the responder: carol's calls then spend carol's quota.  The response's own From is
    written by the callee and checked against nothing, so it must not be taken as is:
    in Kamailio the reply route reads the request's From from the transaction
    (``$T_req($fu)``) and passes it to the engine (e.g. ``ProxyEngine.inspect(response,
    caller=...)``; ``_keep_keys`` then uses ``_keeper(caller)``)."""
    from e2m_plugins.keycache import MemoryKeyCache
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(max_entries=16))
    via = (known_proxy(world, TRUSTED, SDP_VIEW),)
    alice = ua_engine(world, "alice", proxies=via, cek_reuse=False)
    bob = ua_engine(world, "bob", peers=("alice", "carol"), proxies=via)
    carol = ua_engine(world, "carol", peers=("bob",), proxies=via, cek_reuse=False)
    sent = alice.protect(invite(world, call_id="bobs-call@x")).message
    verdict = proxy.inspect(sent)
    got = bob.open(apply_forward(sent, verdict)).message
    ok = bob.protect(answer(got)).message
    # the host keeps answer_caller with the transaction (Kamailio: $avp(e2m_caller));
    # alice is one of ours, digest-authenticated
    caller = proxy.answer_caller(sent, verdict, digest_user=world.aor("alice"))
    assert proxy.inspect(ok, caller=caller).seen   # offers the call's key
    kept = [scope for scope, _ in proxy.cache._entries]
    assert [s.call_id for s in kept] == ["bobs-call@x"]
    for n in range(4):
        call = make_request("INVITE", world.aor("bob"), from_uri=world.aor("carol"),
                            to_uri=world.aor("bob"), call_id=f"to-bob-{n}@x", body=SDP_OFFER,
                            content_type="application/sdp",
                            extra_headers=[("Contact", "<sip:carol@127.0.0.1:5063>")])
        offer = carol.protect(call).message
        verdict = proxy.inspect(offer)
        rung = bob.open(apply_forward(offer, verdict)).message
        assert proxy.inspect(bob.protect(answer(rung, to_tag=f"bb{n}")).message,
                             caller=proxy.answer_caller(offer, verdict,
                                                        digest_user=world.aor("carol"))).seen
    assert "bobs-call@x" in {scope.call_id for scope, _ in proxy.cache._entries}, \
        "carol's calls to bob pushed the key of bob's call with alice out"


def test_a_callee_writing_another_from_in_its_answer_charges_the_caller_still(world):
    """The callee writes its response's From (tm never compares it with the request's)
    and signs a context to match: charged by that From, bob's answers to carol's calls
    would spend alice's quota.  The host passes the caller it kept with the transaction
    (``answer_caller`` of the request: carol, who signed it), and the key is carol's."""
    from e2m_plugins.keycache import MemoryKeyCache
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(max_entries=16))
    via = (known_proxy(world, TRUSTED, SDP_VIEW),)
    bob = ua_engine(world, "bob", peers=("alice", "carol"), proxies=via)
    carol = ua_engine(world, "carol", peers=("bob",), proxies=via, cek_reuse=False)
    call = make_request("INVITE", world.aor("bob"), from_uri=world.aor("carol"),
                        to_uri=world.aor("bob"), call_id="rewritten@x", body=SDP_OFFER,
                        content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:carol@127.0.0.1:5063>")])
    offer = carol.protect(call).message
    seen = proxy.inspect(offer)
    rung = bob.open(apply_forward(offer, seen)).message
    reply = answer(rung, to_tag="bb1")
    reply = reply.replace("From", f"<{world.aor('alice')}>;tag={rung.from_tag}")
    caller = proxy.answer_caller(offer, seen)
    verdict = proxy.inspect(bob.protect(reply).message, caller=caller)
    assert verdict.seen
    keepers = {entry.keeper for entry in proxy.cache._entries.values()}
    assert keepers == {"answer:sip%3Acarol%40example.com sip%3Abob%40example.com"}  # not alice


def test_the_caller_may_be_asked_only_when_an_answer_offers_a_key(world):
    """The reply route passes a function (Kamailio reads the transaction's AVP only
    then): it is asked once for an answer that offers a key (and the key is the pair's,
    as with a plain string), never for one that offers none."""
    from e2m_plugins.keycache import MemoryKeyCache
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(max_entries=16))
    via = (known_proxy(world, TRUSTED, SDP_VIEW),)
    asked: list[str] = []

    def caller() -> str:
        asked.append("asked")
        return world.aor("carol")
    for reuse, call_id in ((True, "offers@x"), (False, "offers-none@x")):
        bob = ua_engine(world, "bob", peers=("carol",), proxies=via, cek_reuse=reuse)
        carol = ua_engine(world, "carol", peers=("bob",), proxies=via, cek_reuse=False)
        call = make_request("INVITE", world.aor("bob"), from_uri=world.aor("carol"),
                            to_uri=world.aor("bob"), call_id=call_id, body=SDP_OFFER,
                            content_type="application/sdp",
                            extra_headers=[("Contact", "<sip:carol@127.0.0.1:5063>")])
        offer = carol.protect(call).message
        rung = bob.open(apply_forward(offer, proxy.inspect(offer))).message
        assert proxy.inspect(bob.protect(answer(rung, to_tag="bb1")).message, caller=caller).seen
        assert len(asked) == 1                       # the first answer only
    keepers = {entry.keeper for entry in proxy.cache._entries.values()}
    assert keepers == {"answer:sip%3Acarol%40example.com sip%3Abob%40example.com"}
