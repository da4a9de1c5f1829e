"""Review 159 (an attacker's review of 384cc70): the phone's learned policy store and
what it obeys (``e2m_plugins/learned_policies.py``, ``UAEngine.learn``, ``react``), and
its fetches.  The phone's side of K2 runs on a real pjsua2 phone in
``tests/pjsua/test_review159_invite_policies_phone.py``.

Hole K1: a 495 from anyone who answers one request makes the UA sign that method to
every peer, for ever
- Attacker: whoever can answer one request of ours on its transaction: the callee's
  own UA (an insider), any hop on the path (it reads our Via branch), a proxy of the
  peer's domain.  No certificate, no policy, no host is needed.
- Messages: one ``495`` to one MESSAGE of alice's to bob (Call-ID, CSeq and top Via
  branch copied from the request), nothing else.
- Effect observed: ``react`` retries ("495: learned signature for MESSAGE") and adds
  "MESSAGE" to ``UAEngine._sign_for``; from then on every MESSAGE alice sends, to any
  peer, is signed: a UA set ``sign = false`` signs her MESSAGE to carol 3 days later
  (``info.signed`` False before, True after 259,200 s), and so does a ``[[legacy]]``
  peer set ``sign = false`` (a stack that cannot take our signatures: its bodies break
  until the phone restarts).  A 496 teaches a policy that lapses (``max_policy_expires``)
  and is asked again per peer (``_readers_for`` re-checks ``accepts_proxy``); a 495
  neither lapses nor is scoped.
- Code at fault: ``e2m_plugins/ua.py:1437`` (``_learn_495``: ``self._sign_for.add``, a set
  without age or peer) read at ``ua.py:714`` (``_readers_for``: ``method in
  self._sign_for``) and ``ua.py:782`` (``sign = asked or ...``: overrides both
  ``config.sign`` and ``legacy.sign``).
- Suggested fix: keep what a 495 asks as a learned entry like a 496's (per peer or
  dialog, ``max_policy_expires`` at most; best, only when a policy of an accepted proxy
  with a ``verify`` rule came with it), and never sign to a ``[[legacy]]`` peer with
  ``sign = false`` on a 495's word (fail the send instead).
- Tests: ``test_hole_k1_a_495_does_not_make_us_sign_to_everyone_for_ever``,
  ``test_hole_k1_a_495_does_not_override_a_legacy_peers_sign_false``.

Hole K2: a stranger's INVITE teaches the UA policies, which the phone then fetches
- Attacker: an off-path stranger (any caller; with a home, any caller the home proxy
  relays: it removes only policy values naming itself, ``proxy.py:465``), no
  certificate, no dialog.
- Messages: one bodiless initial INVITE, From ``sip:mallory@<her domain>``, with 16
  ``Proxy-Body-Policy`` values for hosts of her domain (``cert-url`` on each host,
  ``expires=86400``).
- Effect observed: ``open`` accepts the INVITE (the phone then answers it 403: no
  certificate of the caller) and ``learn`` files 16 dialog-scoped policies for 86,400 s;
  17 such INVITEs fill the table (256 entries, 256 ``certificates_wanted``).  The phone
  asks for those every 0.1 s (``phone.py:1174``): on the real phone one refused INVITE
  made it open an HTTP connection to the URL it named within 2.5 s (1 connection, run:
  the pjsua module); read, not run: the entry stays wanted while it lives, so each host
  is asked again after the fetcher's 30 s cool-down, up to 256 hosts of the stranger's
  naming (any port; names in her own DNS may point anywhere) for up to a day.  The policies also count against the 256 dialog entries of K3.
- Code at fault: ``e2m_plugins/ua.py:312`` (``_policy_origin``: "``message.method ==
  'INVITE' or message.to_tag``" takes any initial INVITE as "a dialog we are in"), called
  by ``open`` at ``ua.py:929`` before the phone refuses the call
  (``phone.py:766 _refuse_unanswerable``); ``ua.py:539`` (``certificates_wanted``: every
  scope).
- Suggested fix: learn from an incoming initial INVITE only once we answered it 2xx (or
  from an INVITE whose body was opened from a checked peer), and fetch only the
  certificates of policies for everything we send or of dialogs that were confirmed.
- Test: ``test_hole_k2_a_strangers_bodiless_invite_teaches_nothing``.

Hole K3: one peer takes every dialog policy entry, and the other calls' policies go
- Attacker: an insider UA (bob) in a call with alice (his own INVITE, answered).
- Messages: 16 in-dialog requests (INFO, bodiless) each with 16 ``Proxy-Body-Policy``
  values for hosts of bob's domain, ``expires=86400``.
- Effect observed: the table holds 256 entries, all bob's; the policy alice's call with
  carol learnt from carol's 200 (``pc.example.com``, view ``INVITE:*``) is gone (1 entry
  before, 0 after): her next re-INVITE to carol leaves carol's proxy out (a 496 round
  trip, one of ``MAX_RETRIES_PER_CALL``), or, if that proxy does not answer 496, the
  body passes unread by a proxy that asked to read it.
- Code at fault: ``e2m_plugins/learned_policies.py:246`` (``_put``: one pool of
  ``MAX_DIALOG_POLICIES`` for every dialog; a new entry evicts the one of any dialog
  that expires first).
- Suggested fix: a bound per dialog scope (16, one message's worth) beside the global
  one, and evict within the scope that is full, never another dialog's entries.
- Test: ``test_hole_k3_one_dialog_cannot_evict_another_dialogs_policy``.

Controls (unmarked, pass): ``test_control_k1_without_a_495_the_ua_does_not_sign``,
``test_control_k1_the_495_retry_is_signed``,
``test_control_k2_a_strangers_options_teaches_nothing``,
``test_control_k3_below_the_bound_the_other_calls_policy_stays``.

Tried and held:
- a 496's ``Proxy-Body-Policy`` with a ``cert-url`` on another host is kept as is by
  ``learn_496`` (``ua.py:1432``, no ``_own_url_only``) but the phone's fetcher checks the
  URL host against the policy host again (``fetcher.check_url``): nothing fetched (read);
- a 496 naming a host outside our and the peer's domain, or with a certificate of
  another host or not matching ``cert-fp``: ``fail``, nothing learnt (read,
  ``_learn_496``);
- a policy learnt for bob's domain is not used for carol (``_readers_for`` re-asks
  ``accepts_proxy`` per peer), read;
- a certificate NOTIFY in no subscription of ours, or not from the proxy: 481 before the
  body is looked at; the per-NOTIFY work is bounded (one certificate, counted, the
  events deque at 256) (read, ``certservice_client._notify``);
- the phone's fetcher: at most 4 at once, one per host, 30 s cool-down, 512 hosts
  remembered (read); K2 uses it within those bounds, which is why it is an
  amplification and not a wedge.

Fixed (stop 48), each hole test no longer marked (each failed on 384cc70):
- K1: a 495 asks a signature of that method to that peer only (the To AoR), for
  3600 s at most (``max_policy_expires``), 256 asks kept (``UAEngine._learn_495``,
  ``_asked_to_sign``); a 495 to what goes to a ``[[legacy]]`` peer set ``sign = false``
  fails the send.
- K2: an initial INVITE's policies wait for our answer (``_park_invite_policies``, 64
  INVITEs, 180 s): a 1xx above 100 or a 2xx we send takes them before it is
  protected (so the certificate is fetched while the phone rings), a failure drops
  them.  ``test_stop48_k2_*`` show both sides.
- K3: at most 16 entries per dialog (``MAX_POLICIES_PER_DIALOG``, one message's worth),
  a full dialog pushing out its own; at the dialogs' bound of 256 the dialog holding
  the most gives one up (``LearnedPolicies._dialog_victim``).  The hole test asked for
  256 entries, all but one bob's; with the per-dialog bound bob keeps 16, so it and
  its control count 17.  ``test_stop48_k3_many_dialogs_at_the_bound_push_out_the_largest_first``
  fills the dialogs' bound from 20 dialogs.
"""

from __future__ import annotations

import time

import pytest

from e2m_lab.flows import SDP_OFFER, answer, message, ua_engine
from e2m_plugins import headers as hdr
from e2m_plugins.config import LegacyPeer, UAConfig
from e2m_plugins.learned_policies import (MAX_DIALOG_POLICIES, MAX_POLICIES_PER_DIALOG,
                                          LearnedPolicies)
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import UAEngine


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _alice(world, clock: Clock, **settings) -> UAEngine:
    cred = world.user("alice")
    config = UAConfig(aor=world.aor("alice"), certificate=cred.cert, private_key=cred.key,
                      trust_anchors=(world.ca.cert,),
                      peers={world.aor(p): world.user(p).cert for p in ("bob", "carol")},
                      **settings)
    return UAEngine(config, clock=clock)


def _answer_495(world, alice: UAEngine) -> tuple[SipMessage, object]:
    """alice's MESSAGE to bob, answered 495 by whoever is on its transaction."""
    plain = message(world)
    sent = alice.protect(plain).message
    refusal = make_response(sent, 495, "Signature Required", [], b"", None)
    return plain, alice.react(refusal, plain)


# -- K1 --------------------------------------------------------------------------------

def test_hole_k1_a_495_does_not_make_us_sign_to_everyone_for_ever(world):
    clock = Clock()
    alice = _alice(world, clock, sign=False)
    _, reaction = _answer_495(world, alice)
    assert reaction.action == "retry"
    clock.now += 3 * 86400
    later = alice.protect(message(world, recipient="carol"))
    assert not later.info.signed, "3 days later, to carol, on one 495 of bob's call"


def test_hole_k1_a_495_does_not_override_a_legacy_peers_sign_false(world):
    clock = Clock()
    alice = _alice(world, clock, legacy=(LegacyPeer(world.aor("carol"), sign=False),))
    assert not alice.protect(message(world, recipient="carol")).info.signed
    _, reaction = _answer_495(world, alice)
    assert reaction.action == "retry"
    assert not alice.protect(message(world, recipient="carol")).info.signed


def test_control_k1_without_a_495_the_ua_does_not_sign(world):
    clock = Clock()
    alice = _alice(world, clock, sign=False)
    assert not alice.protect(message(world)).info.signed
    assert not alice.protect(message(world, recipient="carol")).info.signed


def test_control_k1_the_495_retry_is_signed(world):
    clock = Clock()
    alice = _alice(world, clock, sign=False)
    _, reaction = _answer_495(world, alice)
    assert reaction.action == "retry" and reaction.request is not None
    bob = ua_engine(world, "bob", peers=("alice",))
    assert bob.open(reaction.request).info.signed


# -- K2 --------------------------------------------------------------------------------

def _policies(prefix: str, domain: str, count: int = 16) -> list[tuple[str, str]]:
    return [(hdr.PROXY_BODY_POLICY, hdr.PolicyHeader(
        f"{prefix}x{i}.{domain}", view=(hdr.Rule("INVITE", "*"),),
        cert_url=f"http://{prefix}x{i}.{domain}:8080/c", expires=86400).format())
        for i in range(count)]


def _stranger(world, method: str, n: int) -> SipMessage:
    return make_request(method, world.aor("alice"), from_uri="sip:mallory@evil.test",
                        to_uri=world.aor("alice"), call_id=f"mallory-{method}-{n}",
                        from_tag=f"m{n}", extra_headers=[
                            ("Contact", "<sip:mallory@127.0.0.1:5099>"),
                            *_policies(f"h{n}", "evil.test")])


def test_hole_k2_a_strangers_bodiless_invite_teaches_nothing(world):
    alice = ua_engine(world, "alice", peers=("bob",))
    for n in range(17):
        alice.open(_stranger(world, "INVITE", n))
    assert len(alice.policies) == 0 and alice.certificates_wanted() == [], \
        f"{len(alice.policies)} policies, {len(alice.certificates_wanted())} to fetch"


def test_control_k2_a_strangers_options_teaches_nothing(world):
    alice = ua_engine(world, "alice", peers=("bob",))
    for n in range(17):
        alice.open(_stranger(world, "OPTIONS", n))
    assert len(alice.policies) == 0 and alice.certificates_wanted() == []


# -- K3 --------------------------------------------------------------------------------

def _calls(world, flood: int) -> tuple[UAEngine, str]:
    """alice in a call with carol (carol's 200 taught pc.example.com) and bob's call to
    alice, answered; bob then sends ``flood`` INFOs with 16 policies each."""
    alice = ua_engine(world, "alice", peers=("bob", "carol"))
    bob = ua_engine(world, "bob", peers=("alice",))
    carol = ua_engine(world, "carol", peers=("alice",))
    inv = make_request("INVITE", world.aor("carol"), from_uri=world.aor("alice"),
                       to_uri=world.aor("carol"), call_id="call-ac", from_tag="a1",
                       body=SDP_OFFER, content_type="application/sdp",
                       extra_headers=[("Contact", "<sip:alice@127.0.0.1:5061>")])
    delivered = carol.open(alice.protect(inv).message).message
    ok = answer(delivered, to_tag="c1").add(hdr.PROXY_BODY_POLICY, hdr.PolicyHeader(
        "pc.example.com", view=(hdr.Rule("INVITE", "*"),)).format())
    alice.open(carol.protect(ok).message)
    scope = next(p.scope for p in alice.policies.everywhere() if p.host == "pc.example.com")
    binv = make_request("INVITE", world.aor("alice"), from_uri=world.aor("bob"),
                        to_uri=world.aor("alice"), call_id="call-ba", from_tag="b1",
                        body=SDP_OFFER, content_type="application/sdp",
                        extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>")])
    taken = alice.open(bob.protect(binv).message).message
    alice.protect(answer(taken, to_tag="a9"))
    for n in range(flood):
        info = make_request("INFO", "sip:alice@127.0.0.1:5061", from_uri=world.aor("bob"),
                            to_uri=world.aor("alice"), call_id="call-ba", cseq=2 + n,
                            from_tag="b1", to_tag="a9",
                            extra_headers=_policies(f"b{n}", "example.com"))
        alice.open(info)
    return alice, scope


def test_hole_k3_one_dialog_cannot_evict_another_dialogs_policy(world):
    alice, scope = _calls(world, 16)
    # (review 159 asked for 256 entries here, all but one bob's; the fix bounds one
    # dialog at 16, so bob's flood keeps 16 beside carol's one)
    assert len(alice.policies) == 1 + MAX_POLICIES_PER_DIALOG
    assert [p.host for p in alice.policies.in_force(scope) if p.scope == scope] == \
        ["pc.example.com"]


def test_control_k3_below_the_bound_the_other_calls_policy_stays(world):
    alice, scope = _calls(world, 15)
    assert len(alice.policies) == 1 + MAX_POLICIES_PER_DIALOG
    assert [p.host for p in alice.policies.in_force(scope) if p.scope == scope] == \
        ["pc.example.com"]


def test_stop48_k3_many_dialogs_at_the_bound_push_out_the_largest_first():
    """Sixteen full dialogs of one peer and carol's one policy fill the dialogs' bound
    with room for one; the peer's next dialogs push out their own kind (the dialog
    holding the most), never carol's single entry."""
    clock = Clock()
    table = LearnedPolicies(clock=clock)

    def learn(scope: str, host: str) -> None:
        clock.now += 1
        table.learn_header(hdr.PolicyHeader(host, view=(hdr.Rule("INVITE", "*"),),
                                            expires=3600), source=scope, scope=scope)
    learn("call-ac carol", "pc.example.com")
    for d in range(20):
        for i in range(MAX_POLICIES_PER_DIALOG):
            learn(f"call-b{d} bob", f"b{d}x{i}.example.com")
    assert len(table) == MAX_DIALOG_POLICIES
    assert [p.host for p in table.in_force("call-ac carol") if p.scope] == ["pc.example.com"]
    assert all(len([p for p in table.everywhere() if p.scope == f"call-b{d} bob"])
               <= MAX_POLICIES_PER_DIALOG for d in range(20))


def _invite_with_policy(world, n: int) -> SipMessage:
    bob = ua_engine(world, "bob", peers=("alice",))
    inv = make_request("INVITE", world.aor("alice"), from_uri=world.aor("bob"),
                       to_uri=world.aor("alice"), call_id=f"call-pb{n}", from_tag=f"b{n}",
                       body=SDP_OFFER, content_type="application/sdp",
                       extra_headers=[("Contact", "<sip:bob@127.0.0.1:5062>"),
                                      (hdr.PROXY_BODY_POLICY, hdr.PolicyHeader(
                                          "pb.example.com", view=(hdr.Rule("INVITE", "*"),),
                                          cert_url="http://pb.example.com/c").format())])
    return bob.protect(inv).message


@pytest.mark.parametrize("status", [180, 183, 200])
def test_stop48_k2_an_invite_we_ring_or_answer_teaches_its_policies(world, status):
    """The honest side of K2: the caller's proxy announced on its INVITE is learnt (for
    that dialog) once we ring or answer, before that response is protected, so its
    certificate is fetched while the phone rings."""
    alice = ua_engine(world, "alice", peers=("bob",))
    taken = alice.open(_invite_with_policy(world, status)).message
    assert len(alice.policies) == 0 and alice.certificates_wanted() == []
    alice.protect(make_response(taken, status, "Ringing"))
    hosts = [p.host for p in alice.policies.everywhere()]
    assert hosts == ["pb.example.com"], hosts
    assert [w.url for w in alice.certificates_wanted()] == ["http://pb.example.com/c"]


@pytest.mark.parametrize("status", [100, 403, 486])
def test_stop48_k2_an_invite_we_refuse_teaches_nothing(world, status):
    alice = ua_engine(world, "alice", peers=("bob",))
    taken = alice.open(_invite_with_policy(world, status)).message
    alice.protect(make_response(taken, status, "No"))
    if status == 100:      # a 100 decides nothing: the 200 after it still takes them
        alice.protect(make_response(taken, 200, "OK"))
        assert [p.host for p in alice.policies.everywhere()] == ["pb.example.com"]
    else:
        assert len(alice.policies) == 0 and alice.certificates_wanted() == []


def test_stop48_hb162_the_answer_waits_for_the_certificates_its_invite_names(world):
    """Review 162 HB1's engine side: the policies waiting on an INVITE name the proxies
    whose certificates an answer needs (with a cert-url, not held); once taken (the
    180), the INVITE names none: the phone then waits on ``holds_proxy_certificate``."""
    alice = ua_engine(world, "alice", peers=("bob",))
    invite = _invite_with_policy(world, 162)
    taken = alice.open(invite).message
    assert [(w.host, w.url) for w in alice.certificates_to_answer(taken)] == \
        [("pb.example.com", "http://pb.example.com/c")]
    assert not alice.holds_proxy_certificate("pb.example.com")
    alice.protect(make_response(taken, 180, "Ringing"))
    assert alice.certificates_to_answer(taken) == []
    assert [w.host for w in alice.certificates_wanted()] == ["pb.example.com"]


def test_stop48_k166_each_url_once_those_for_everything_first(world):
    """Review 166 K2's engine side: a host wanted under two URLs (a dialog's and the
    registrar's) is asked for under each once, the registrar's first."""
    alice = ua_engine(world, "alice", peers=("bob",))
    rule = (hdr.Rule("INVITE", "*"),)
    alice.policies.learn_header(hdr.PolicyHeader("px.example.com", view=rule,
                                                 cert_url="http://evil.example.com/c"),
                                source="dialog d", scope="call-1 sip:mallory@example.com")
    alice.policies.learn_header(hdr.PolicyHeader("px.example.com", view=rule,
                                                 cert_url="http://px.example.com/c"),
                                source="REGISTER sip:example.com")
    alice.policies.learn_header(hdr.PolicyHeader("px.example.com", view=rule,
                                                 cert_url="http://px.example.com/c"),
                                source="dialog e", scope="call-2 sip:bob@example.com")
    assert [w.url for w in alice.certificates_wanted()] == \
        ["http://px.example.com/c", "http://evil.example.com/c"]
