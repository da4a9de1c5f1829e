"""A sixth attacker's review (December 2026) of the fifth review's fixes, in memory.

Each ``test_hole_*`` is an attack that SUCCEEDS on the code as it stands; it is kept
as a strict xfail (the assertion is what the fix must make true) until the lead fixes
it.  ``test_held_*`` attacks the code refused, kept where nothing else covered them.
The docstring names the attacker (docs/threat-model.md), what it gets and the fix.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import (SDP_ANSWER, SDP_OFFER, TRUSTED, answer, apply_forward, invite,
                           known_proxy, proxy_engine, ua_engine)
from e2m_plugins.dialog_keys import MAX_DIALOGS
from e2m_plugins.keycache import MemoryKeyCache
from e2m_plugins.sip import make_request, make_response
from e2m_plugins.testpki import init_test_pki

SDP_VIEW = ("INVITE:application/sdp",)


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob", "carol"),
                         key_type="ec")


def _small_proxy(world):
    """A proxy viewing SDP with a cache of 16 keys: a keeper's quota is 2."""
    return proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=MemoryKeyCache(max_entries=16))


def _alices_call_with_bob(world, proxy, call_id):
    """alice calls bob through ``proxy``; bob's answer offers the call's key, kept at
    the proxy and charged to alice (the caller).  Returns alice's engine."""
    via = (known_proxy(world, TRUSTED, SDP_VIEW),)
    alice = ua_engine(world, "alice", peers=("bob", "carol"), proxies=via, cek_reuse=False)
    bob = ua_engine(world, "bob", peers=("alice", "carol"), proxies=via)
    sent = alice.protect(invite(world, call_id=call_id)).message
    got = bob.open(apply_forward(sent, proxy.inspect(sent))).message
    ok = bob.protect(answer(got)).message
    assert proxy.inspect(ok, caller=world.aor("alice")).seen
    alice.open(ok)
    assert call_id in {scope.call_id for scope, _ in proxy.cache._entries}
    return alice


def _alices_key_still_kept(world, proxy, alice, call_id) -> bool:
    """Whether the proxy still reads alice's re-INVITE in her call (under its key)."""
    reinvite = alice.protect(invite(world, call_id=call_id, cseq=2, to_tag="b1"))
    return call_id in {scope.call_id for scope, _ in proxy.cache._entries} \
        and bool(proxy.inspect(reinvite.message).seen)


# -- 2. key quota attribution (b59a157) --------------------------------------------------

def test_hole_a_callee_spends_its_callers_quota_with_many_provisional_answers(world):
    """Insider UA (carol) as a CALLEE.  Since b59a157 a key a response offers is
    charged to the caller of its transaction (``_view(..., payer=caller)``).  A callee
    answers one INVITE with as many 18x as it likes (RFC 3262 or not, each with a To
    tag and a body under a fresh CEKReference): each is kept in the dialog's scope
    (a To tag: not ``early``, so not short-lived) and charged to the CALLER.  alice
    calls carol once; carol's four 183s fill alice's quota (2 of 16) and alice's
    oldest key goes: the key of her call under way with bob, whose later bodies the
    proxy then cannot read (496 round trip, the archive misses them).  Before
    b59a157 the same keys were charged to carol, the signer.  The reverse of
    test_review5's hole (callers spending a callee's quota), one call instead of four.

    Fix (e2m_plugins/proxy.py ``_keep_keys``): a response can charge the caller for at
    most ONE key per transaction (per Call-ID, CSeq and To tag: a fork's answers each
    get one); further keys in responses to the same request are charged to the
    responder (``_keeper(To)``, the signer ``check_signed_by`` checked), or not kept.
    E.g. remember in the cache, per (scope, CSeq) already charged to the caller, a
    bounded LRU set; or charge a response's key to ``caller`` only if it is a 2xx or
    the first reliable 18x (anything else to the signer)."""
    proxy = _small_proxy(world)
    alice = _alices_call_with_bob(world, proxy, "alices-live-call@x")
    via = (known_proxy(world, TRUSTED, SDP_VIEW),)
    call = make_request("INVITE", world.aor("carol"), from_uri=world.aor("alice"),
                        to_uri=world.aor("carol"), call_id="to-carol@x", from_tag="a9",
                        body=SDP_OFFER, content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:alice@127.0.0.1:5061>")])
    offer = alice.protect(call).message
    delivered = apply_forward(offer, proxy.inspect(offer))
    for n in range(4):
        # carol's own code offers a fresh CEK in each answer (a new engine each time)
        carol = ua_engine(world, "carol", peers=("alice",), proxies=via)
        rung = carol.open(delivered).message
        progress = make_response(rung, 183, "Session Progress",
                                 [("Contact", "<sip:carol@127.0.0.1:5063>")],
                                 SDP_ANSWER, "application/sdp") \
            .replace("To", f"{rung.get('To')};tag=cc")
        verdict = proxy.inspect(carol.protect(progress).message, caller=world.aor("alice"))
        assert verdict.seen
    assert _alices_key_still_kept(world, proxy, alice, "alices-live-call@x"), \
        "carol's 183s pushed the key of alice's call with bob out of alice's quota"


def test_hole_a_stray_answer_charges_the_from_its_responder_wrote(world):
    """Insider UA (bob) where ``[cluster]`` is on.  ``route_stray_reply`` reads a
    response that matches no transaction of the node (its Via is the cluster's
    address): ``$T_req($fu)`` is then null, ``caller`` is None, and
    ``_inspect_response`` falls back to ``response.address("From").uri``: the From the
    RESPONDER wrote, checked against nothing (bob signs a context to match it, as in
    test_review5's ``test_a_callee_writing_another_from_*``).  Bob sends the node 200s
    with his own To, ``From: alice`` and a fresh key each, Via the cluster's address:
    every key counts against ALICE's quota (a To tag: long-lived) and her call's key
    goes.  No call of alice's is needed.

    Fix (e2m_plugins/proxy.py ``_inspect_response``): with no ``caller``, charge the
    responder, the signer (``_sender_of``: To, which ``check_signed_by`` checked), or
    one shared keeper for answers to nothing we relayed (e.g. ``"stray:"``), never the
    response's own From."""
    proxy = _small_proxy(world)
    alice = _alices_call_with_bob(world, proxy, "alices-call@x")
    via = (known_proxy(world, TRUSTED, SDP_VIEW),)
    carol = ua_engine(world, "carol", peers=("bob",), proxies=via, cek_reuse=False)
    for n in range(4):
        # an INVITE of carol's (bob's accomplice) gives bob a body to answer; the answer
        # goes to a node that relayed nothing, with From rewritten to alice
        call = make_request("INVITE", world.aor("bob"), from_uri=world.aor("carol"),
                            to_uri=world.aor("bob"), call_id=f"stray-{n}@x",
                            from_tag=f"s{n}", body=SDP_OFFER, content_type="application/sdp",
                            extra_headers=[("Contact", "<sip:carol@127.0.0.1:5063>")])
        offer = carol.protect(call).message
        bob = ua_engine(world, "bob", peers=("alice", "carol"), proxies=via)
        rung = bob.open(apply_forward(offer, proxy.inspect(offer))).message
        reply = answer(rung, to_tag=f"bs{n}") \
            .replace("From", f"<{world.aor('alice')}>;tag={rung.from_tag}")
        assert proxy.inspect(bob.protect(reply).message).seen   # no caller: no transaction
    assert _alices_key_still_kept(world, proxy, alice, "alices-call@x"), \
        "bob's stray answers 'From' alice pushed alice's call key out of her quota"


# -- 4. the CA check only on service paths (26dd5a1) -------------------------------------

def _ca_certificate_for(world, aor: str) -> bytes:
    """A CA:TRUE certificate (keyCertSign) chained to our CA with ``aor`` as its SAN URI:
    what a sub-CA the anchor delegated to could carry; DER."""
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sub-CA")]))
            .issuer_name(world.ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=True, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(aor)]),
                           critical=False)
            .sign(world.ca.key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_hole_low_a_493_still_teaches_a_ca_certificate_as_a_users(world):
    """Hop (or the callee) answering alice's MESSAGE to bob with 493 and an
    ``application/pkix-cert`` body: a CA certificate chained to our anchor with bob's
    SAN URI.  26dd5a1 moved the CA refusal out of ``check_user_names`` into
    ``check_not_a_ca``, called for PUBLISH and NOTIFY only (``expires_in`` set); the
    493 path (``UAEngine._learn_493`` -> ``add_peer_certificate(peer, der)``, no
    ``expires_in``) is a certificate from the wire too, yet is now taken: alice
    retries to the CA's key and keeps it as bob's (test_review4's
    ``test_low_the_phone_keeps_a_ca_certificate_as_a_users`` covers the service paths
    only).  Low: the holder of such a sub-CA could issue a leaf for bob anyway, unless
    its path length or name constraints forbid it; what the project refuses for a
    service's certificate it should refuse from a 493.

    Fix (e2m_plugins/ua.py ``_learn_493``): call ``check_not_a_ca(cert)`` before
    ``add_peer_certificate`` (only what is put in ``[peers]`` by hand may be CA:TRUE;
    a configured ``[peers]`` entry already wins over a 493's)."""
    from e2m_lab.flows import message
    from e2m_plugins.errors import NoMatchingRecipientError
    from e2m_plugins.testpki import issue_user
    alice = ua_engine(world, "alice", peers=())
    alice.certs.add_user(world.aor("bob"), issue_user(world.ca, world.aor("bob")).cert)
    bob = ua_engine(world, "bob")
    plain = message(world)
    sent = alice.protect(plain).message
    with pytest.raises(NoMatchingRecipientError) as caught:
        bob.open(sent)
    refusal = bob.refusal(sent, caught.value)
    forged = refusal.with_body(_ca_certificate_for(world, world.aor("bob")),
                               "application/pkix-cert")
    reaction = alice.react(forged, plain)
    assert reaction.action != "retry", "alice took a CA certificate from a 493 as bob's"


# -- 1. the parties table: what fills it (c4aec51) ---------------------------------------

def test_hole_our_notifies_in_strangers_subscriptions_push_a_live_call_out(world):
    """Off-path sender (a stranger's SUBSCRIBEs, each its own dialog) + insider UA
    (carol, who read alice's call ids).  ``_record_parties`` records our tag for every
    request WE send inside a dialog of any method (``method != INVITE and not to_tag``
    is the only exclusion), before ``_protect`` (so also for one that is then refused).
    pjsua answers a presence SUBSCRIBE and sends a NOTIFY in its dialog (From our new
    tag, To the stranger's): one entry per SUBSCRIBE, which no BYE, no failure and no
    DISCONNECTED ever ends: only the LRU bound does, after MAX_DIALOGS of them.  So
    4,096 SUBSCRIBEs (no call set up, no ring) push alice's call under way out of the
    table and carol's re-INVITE into it is taken (fail open), the attack c4aec51's
    parties rules closed for INVITEs.

    Fix (e2m_plugins/ua.py ``_record_parties``): record only INVITE dialogs: our INVITE
    and our 1xx/2xx to one (as now), and an in-dialog request only when its tag is
    ALREADY in the table (refresh it, never add); a NOTIFY / SUBSCRIBE / REFER dialog
    has no parties entry to protect."""
    from test_review5 import _call, _carols_hijack
    from e2m_lab.flows import three_phones
    from e2m_plugins.errors import BindingMismatchError, E2MError
    alice, bob, carol = three_phones(world)
    _call(world, alice, bob, "live6@x")
    for n in range(MAX_DIALOGS + 10):
        notify = make_request("NOTIFY", f"sip:flood{n}@192.0.2.7", from_uri=world.aor("alice"),
                              to_uri=f"sip:flood{n}@example.net", call_id=f"sub-{n}@x",
                              from_tag=f"p{n}", to_tag=f"s{n}",
                              extra_headers=[("Event", "presence"),
                                             ("Subscription-State", "active;expires=600")])
        try:
            alice.protect(notify)
        except E2MError:
            pass                       # refused or not, the entry was recorded first
    with pytest.raises(BindingMismatchError):
        alice.open(_carols_hijack(world, carol, "live6@x"))


# -- 3. the certificate client's restart flag (64e74b1) ----------------------------------

def test_held_out_of_order_notifies_start_one_fresh_subscription_at_a_time(world):
    """Untrusted on-path hop flooding alice's certificate subscription with NOTIFYs
    whose CSeq is below the last (each sets ``Subscription.restart``).  Ticks then send
    ONE fresh SUBSCRIBE while it is unanswered (``renewing`` holds the rest back), the
    locked dialog is retired once the fresh one is notified (its NOTIFYs then 481, not
    500: no further restart from it), and each round of the flood costs at most one
    SUBSCRIBE per NOTIFY round trip: no storm."""
    from test_review5 import BOB, _answer, _der, _notify, _phone, _subscribe, _want_bob
    engine, client, sent = _phone(world)
    sub = _want_bob(engine, client, sent)
    assert _answer(client, _notify(sub, _der(world.user("bob").cert), cseq=100)) == 200
    tag = "srv1"
    for round_ in range(3):
        before = len(sent)
        for n in range(50):
            assert _answer(client, _notify(sub, b"", cseq=1 + n, from_tag=tag)) == 500
        for _ in range(5):
            client._clock.now += 1.0
            client.tick()
        assert len(sent) == before + 1, "the flood sent more than one SUBSCRIBE"
        fresh = _subscribe(client, sent)
        assert _answer(client, _notify(fresh, _der(world.user("bob").cert), cseq=100,
                                       from_tag=f"srv{round_ + 2}")) == 200
        assert _answer(client, _notify(sub, b"", cseq=1, from_tag=tag)) == 481  # retired
        sub, tag = fresh, f"srv{round_ + 2}"
    assert _der(engine.certs.user(BOB)) == _der(world.user("bob").cert)
