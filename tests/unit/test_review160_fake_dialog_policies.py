"""Review 160 (an attacker's review of fa4a16f): review 159's fixes to the phone's
learned policies (``UAEngine._park_invite_policies``, ``_settle_invite_policies``,
``_learn_495``, ``LearnedPolicies._dialog_victim``) and what they left.  The phone's
side of K1 runs on a real pjsua2 phone in
``tests/pjsua/test_review160_fake_dialog_policies_phone.py``.

Hole K1: a made-up To tag makes any stranger's request "a dialog we are in": its
policies are learnt for a day and the phone fetches them (review 159 K2 and issue 12
around the parking)
- Attacker: an off-path stranger, no certificate, no dialog, nothing guessed.
- Messages: one bodiless request of any method (INFO, BYE, OPTIONS, MESSAGE, NOTIFY,
  UPDATE, a re-INVITE) with ``To: <sip:alice@...>;tag=<anything>``, a Call-ID of no
  call of hers, From ``sip:mallory@<her domain>`` and up to 16 ``Proxy-Body-Policy``
  values for hosts of her domain, a ``cert-url`` on each, ``expires=86400``.
- Effect observed: ``open`` accepts it (``_check_parties`` only checks a tag it knows),
  ``learn`` files the 16 policies at once (a To tag skips the parking, which only an
  initial INVITE gets): 16 entries, 16 ``certificates_wanted`` for 86,400 s, per request
  (unit); 7 of 7 methods tried.  On the real phone one INFO, answered 481 by pjsua, made
  it open 1 HTTP connection to the URL it named within 2.5 s (the pjsua module), the very
  effect review 159 K2 fixed for an initial INVITE; an OPTIONS with a To tag teaches what
  issue 12 stopped an OPTIONS without one from teaching.
- Code at fault: ``e2m_plugins/ua.py:365`` (``_policy_origin``: "``message.method ==
  'INVITE' or message.to_tag``" takes any request with a To tag for a dialog of ours,
  without asking ``_parties``), reached from ``open`` (``ua.py:996``) because
  ``_check_parties`` (``ua.py:538``) lets a tag it does not know through.
- Suggested fix: a request with a To tag teaches only when that tag is ours in
  ``_parties`` under the same Call-ID and parties (a dialog we answered or began), and
  for a dialog not yet confirmed park it as an initial INVITE's policies are.
- Test: ``test_hole_k1_a_request_with_a_made_up_to_tag_teaches_nothing``.

Hole K2: at the dialogs' bound, ties go to the oldest dialog: 256 one-policy dialogs
push out carol's call's single policy
- Attacker: the K1 stranger (256 made-up dialogs); or, read not run, any peers whose
  dialogs together reach 256 single entries (review 159 accepted "until every dialog
  holds one", not "the oldest goes first").
- Messages: 256 bodiless INFOs as in K1, each with its own Call-ID and one policy.
- Effect observed: alice's call with carol held the policy carol's 200 taught
  (``pc.example.com``, view ``INVITE:*``): gone after the 256th INFO (in force 1, then
  0; 0.03 s of work for all 256): her next re-INVITE leaves carol's proxy out.  With 16
  policies per INFO it held after 40 INFOs (the largest dialogs give way first).
- Code at fault: ``e2m_plugins/learned_policies.py:285`` (``_dialog_victim``:
  ``max(by_scope.values(), key=len)`` picks, among dialogs of equal size, the first in
  the table, the oldest: the honest call that learnt first).
- Suggested fix: K1's fix; and among equally large dialogs, evict from the newest one
  (or refuse the new entry when its dialog would be no smaller than the largest), so a
  call's single policy is never what a flood of single-entry dialogs pushes out.
- Test: ``test_hole_k2_single_policy_dialogs_do_not_push_out_the_oldest_call``.

Hole K3: spellings of one peer's From give one dialog as many "dialogs" as it likes:
the per-dialog bound of 16 does not hold
- Attacker: bob, an insider in a call with alice (his INVITE, answered): no K1 needed.
- Messages: in-dialog INFOs (his tag, alice's tag, the Call-ID: all right) with From
  spelt ``sip:bob@example.com``, ``sip:bob@EXAMPLE.com``, ``sip:bob@example.com;x=1``,
  ``sip:%62ob@example.com``, ..., each with 16 policies of his domain.
- Effect observed: ``_check_parties`` compares identities and lets each through; the
  scope is the From as written, so 6 spellings held 96 entries (6 scopes of 16) in one
  dialog, where review 159's fix allows 16; 16 spellings fill the dialogs' 256.  A
  ``<sip:bob@example.com:5060>`` was refused (BindingMismatchError).
- Code at fault: ``e2m_plugins/ua.py:369-370`` (``_policy_origin``: ``peer =
  _aor(From)``, ``dialog_scope(call_id, peer)``: the URI as written, not its identity
  as ``_peer_name`` names a peer for the parked INVITEs and the 495 asks).
- Suggested fix: scope by the dialog (our tag, or Call-ID and ``_peer_name`` of the
  peer), and learn only under the spelling the dialog was made with.
- Test: ``test_hole_k3_spellings_of_one_peer_hold_at_most_one_dialogs_worth``.

Controls (unmarked, pass): ``test_control_k1_the_same_request_without_a_to_tag_teaches_nothing``,
``test_control_k2_fewer_single_policy_dialogs_leave_carols_policy``,
``test_control_k3_one_spelling_holds_sixteen``.

Tried and held:
- the 495 ask is keyed by ``_peer_name`` of the To (identity) both where it is learnt
  and where it is read (``_asked_to_sign``), so ``sip:bob@EXAMPLE.com`` in the 495's
  request and ``sip:bob@example.com`` later name one peer (read); a 495 to a
  ``[[legacy]]`` ``sign = false`` peer fails the send (review 159's test);
- an initial INVITE's parked policies: the key is (Call-ID, ``_peer_name`` of From), a
  refused INVITE's 403 drops them, a policy-less INVITE neither adds nor drops; a
  stranger's policies are taken only by a 1xx/2xx the phone sends with her Call-ID and
  her From identity, i.e. to her own call (the documented residual).  Read, not run: an
  INVITE of anyone who can see bob's Call-ID, From bob, with one junk policy value
  replaces (and its 403 then drops) bob's parked policies: such a hop could strip the
  header anyway;
- the eviction's work: 256 learns at the bound, 16 per request, 0.04 s for 40 requests
  of 16 (``_dialog_victim`` is linear in the table, 256 entries): no cost to speak of;
- ``expires=0`` withdraws only the same source's entry (read): it frees no room for
  another source;
- honest side, read not run: the real phone answers 200 at once (``auto_answer = 200``,
  ``endpoint.py:684``), no 180, so the INVITE's policy is taken just before the 200 is
  protected and its certificate is not held yet: the 200 goes without that proxy's
  part on a first call (as before fa4a16f: the fetch is asynchronous, the answer
  immediate);
- ``pjsua_hooks/late_2xx.py`` (read): every table bounded (32 entries, 1,024 answered,
  6 To tags per INVITE, 16 ACKs per 2xx, 32 s); only a 2xx the engine accepted for an
  INVITE of ours that failed reaches it; an on-path forger could fill ``_answered``
  only with 171 failed INVITEs of alice's in 32 s;
- ``pjsua_hooks/tcpguard.py`` (read): accepted connections capped (32), slots counted
  with their 1.5 s of closing, the listener gated by BPF at the budget.

Fixed (stop 48), each hole test no longer marked (each failed on fa4a16f):
- K1: ``_policy_origin`` takes an in-dialog request only when ``_in_our_dialog``: its To
  tag is ours in an INVITE dialog we are in (``_parties``), with its Call-ID and parties.
- K2: of the dialogs holding the most, the one that learnt last gives way
  (``LearnedPolicies._dialog_victim``).  Since K1's fix a made-up dialog teaches nothing,
  so ``_flood_single`` learns its 256 one-policy dialogs into the table directly, as
  256 real dialogs would.
- K3: a dialog's scope names the peer by identity (``ua._peer_name``) where policies are
  learnt, looked up and ended.
Left as review 160 found it: the phone answers 200 without a 180, so a first call's
caller-side proxy certificate is not fetched before the 200 is protected (as before
fa4a16f).
"""

from __future__ import annotations

import time

import pytest

from e2m_plugins import headers as hdr
from e2m_plugins.learned_policies import MAX_DIALOG_POLICIES, MAX_POLICIES_PER_DIALOG
from e2m_plugins.sip import SipMessage, make_request
from e2m_plugins.testpki import init_test_pki
from e2m_lab.flows import ua_engine
from tests.unit.test_review159_learned_policies import _calls, _policies


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob", "carol"), key_type="ec")


def _stranger(world, method: str, n: int, *, to_tag: str | None, count: int = 16) -> SipMessage:
    return make_request(method, world.aor("alice"), from_uri="sip:mallory@evil.test",
                        to_uri=world.aor("alice"), call_id=f"mallory160-{method}-{n}",
                        from_tag=f"m{n}", to_tag=to_tag, extra_headers=[
                            ("Contact", "<sip:mallory@127.0.0.1:5099>"),
                            *_policies(f"h{n}", "evil.test", count)])


METHODS = ["INFO", "BYE", "OPTIONS", "MESSAGE", "NOTIFY", "UPDATE", "INVITE"]


# -- K1 --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_hole_k1_a_request_with_a_made_up_to_tag_teaches_nothing(world, method):
    alice = ua_engine(world, "alice", peers=("bob",))
    alice.open(_stranger(world, method, 1, to_tag="nosuchdialog"))
    assert len(alice.policies) == 0 and alice.certificates_wanted() == [], \
        f"{len(alice.policies)} policies, {len(alice.certificates_wanted())} to fetch"


@pytest.mark.parametrize("method", METHODS)
def test_control_k1_the_same_request_without_a_to_tag_teaches_nothing(world, method):
    alice = ua_engine(world, "alice", peers=("bob",))
    alice.open(_stranger(world, method, 1, to_tag=None))
    assert len(alice.policies) == 0 and alice.certificates_wanted() == []


# -- K2 --------------------------------------------------------------------------------

def _carols(alice, scope: str) -> list[str]:
    return [p.host for p in alice.policies.in_force(scope) if p.scope == scope]


def _flood_single(world, alice, count: int) -> None:
    # (review 160 flooded with fake-dialog INFOs; since K1's fix those teach nothing, so
    # the dialogs are learnt into the table as ``count`` real dialogs would teach them:
    # one policy each, each its own Call-ID)
    for n in range(count):
        alice.policies.learn_header(hdr.PolicyHeader(
            f"h{n}x0.evil.test", view=(hdr.Rule("INVITE", "*"),), expires=86400),
            source=f"dialog mallory-{n}", scope=f"mallory-{n} sip:mallory@evil.test")


def test_hole_k2_single_policy_dialogs_do_not_push_out_the_oldest_call(world):
    alice, scope = _calls(world, 0)
    assert _carols(alice, scope) == ["pc.example.com"]
    started = time.perf_counter()
    _flood_single(world, alice, MAX_DIALOG_POLICIES)
    took = time.perf_counter() - started
    assert took < 5.0
    assert _carols(alice, scope) == ["pc.example.com"], \
        f"carol's policy gone after {MAX_DIALOG_POLICIES} INFOs ({len(alice.policies)} kept)"


def test_control_k2_fewer_single_policy_dialogs_leave_carols_policy(world):
    alice, scope = _calls(world, 0)
    _flood_single(world, alice, MAX_DIALOG_POLICIES - 1)
    assert len(alice.policies) == MAX_DIALOG_POLICIES
    assert _carols(alice, scope) == ["pc.example.com"]


# -- K3 --------------------------------------------------------------------------------

SPELLINGS = ["sip:bob@example.com", "sip:bob@EXAMPLE.com", "sip:bob@example.com;x=1",
             "sip:%62ob@example.com", "sip:bob@Example.com",
             "sip:bob@example.COM;transport=udp"]


def _bob_spells(world, spellings: list[str]):
    alice, _ = _calls(world, 0)
    for i, spelt in enumerate(spellings):
        alice.open(make_request("INFO", "sip:alice@127.0.0.1:5061", from_uri=spelt,
                                to_uri=world.aor("alice"), call_id="call-ba", cseq=10 + i,
                                from_tag="b1", to_tag="a9",
                                extra_headers=_policies(f"s{i}", "example.com")))
    return alice


def test_hole_k3_spellings_of_one_peer_hold_at_most_one_dialogs_worth(world):
    alice = _bob_spells(world, SPELLINGS)
    bobs = [p for p in alice.policies.everywhere() if p.scope and p.scope.startswith("call-ba ")]
    assert len(bobs) <= MAX_POLICIES_PER_DIALOG, \
        f"bob's one dialog holds {len(bobs)} in {len({p.scope for p in bobs})} scopes"


def test_control_k3_one_spelling_holds_sixteen(world):
    alice = _bob_spells(world, SPELLINGS[:1] * 3)
    bobs = [p for p in alice.policies.everywhere() if p.scope and p.scope.startswith("call-ba ")]
    assert len(bobs) == MAX_POLICIES_PER_DIALOG
