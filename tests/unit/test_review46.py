"""A forty-sixth attacker's review (December 2026) of 1438a99: the proxy and cluster as
changed by reviews 39-44 (``git diff 8041f1f..1438a99 -- e2m_plugins kamailio_app``).

``test_hole_*`` xfail strictly on 1438a99 (their assertion is what a fix makes true);
``test_control_*`` are the same flows without the attack (they pass).

Hole 1 (``ProxyEngine._view``, review 44's fix): an INVITE 2xx takes its fork slot only
when a kept key, a key it offers or a signed context touches it.  A 2xx that carries
none of these (a plaintext SDP answer from a callee who does not protect it, accepted by
a caller with ``require_e2m = false``) no longer takes slot 0, so the caller's offer key
is never kept for the dialog's life: her first in-dialog request moves it as a *later
fork's* (``_spend``: ``_fork(claim=False)`` is None, so ``fork = 1``): 200 s
(``EARLY_DIALOG_TTL``), in the shared ``fork:`` group.  Her re-INVITE (a session
refresh, a hold) after that is answered 496.  Before 1438a99 the same call kept it for
life.

Hole 2 (the same rule, a body-less 2xx): with reliable provisional responses (RFC 3262)
the callee's SDP answer rides a reliable 183, sealed under the caller's offer key (which
the caller's phone opens since review 43), and the 200 has no body.  ``_view`` returns
before ``_fork`` for a body-less message, so the answered dialog never takes its slot:
between two E2M phones on every default, the caller's key lives 200 s in the dialog, and
her re-INVITE after that gets 496.

Hole 3 (review 44's packet-rate claims, through ``[policy] legacy_peers``): a body to
or from a legacy peer needs no signed context, and anyone can encrypt to the proxy's
public certificate.  A stranger's stray 200 to INVITE naming a legacy peer, carrying an
unsigned AES-GCM envelope for the proxy with a ``CEKReference`` (one envelope, made
once, put in every datagram: it binds nothing of the message), "offers" a key, so
``_view`` calls ``_fork`` and ``_keep_keys`` keeps the key: one ``replay_claims``
INSERT (and row) per made-up Call-ID, and one key-cache entry, at the stranger's packet
rate.  ``tests/cluster/test_review46_cluster.py`` shows it on a real cluster.

Fixed: an INVITE 2xx takes its fork slot whenever the early dialog holds a kept key
(``ProxyEngine._confirm_fork``), with a plaintext body or none (an INVITE 2xx is always
read now), and never otherwise; a slot is claimed across a cluster only when a signed
context or a kept key is at stake (``admit_fork(shared=...)``), so a legacy-style
unsigned key offered into an early dialog nobody keyed is the node's own business.  A
control that showed hole 1's mechanism (the key a later fork's copy) went with it.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_ANSWER, TRUSTED, answer, apply_forward, known_proxy, \
    proxy_engine, ua_engine
from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.body import new_reference, protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.keycache import DialogScope, MemoryKeyCache
from e2m_plugins.proxy import EARLY_DIALOG_TTL, LATER_FORK_KEEPER
from e2m_plugins.sip import SipMessage, make_request, make_response
from e2m_plugins.testpki import init_test_pki
from kamailio_app.replay_claims import ClaimedReplayCache
from kamailio_app.replay_htable import HtableReplayCache
from tests.cluster.test_replay_claims import _Claims
from tests.unit.test_review12 import SDP_VIEW, _invite

LATER = EARLY_DIALOG_TTL + 50          # a session refresh comes later than this


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


class _Call:
    """alice calls bob through one proxy (its cache on a clock the test moves)."""

    def __init__(self, world, call_id: str, **alice_settings) -> None:
        self.world, self.call_id = world, call_id
        self.now = [1000.0]
        self.cache = MemoryKeyCache(clock=lambda: self.now[0])
        self.proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=self.cache)
        home = known_proxy(world, TRUSTED, SDP_VIEW)
        self.alice = ua_engine(world, "alice", proxies=(home,), **alice_settings)
        self.bob = ua_engine(world, "bob", proxies=(home,))
        offer = self.alice.protect(_invite(world, "alice", "bob", call_id)).message
        verdict = self.proxy.inspect(offer)
        assert verdict.action == "forward", f"{verdict.code} {verdict.error}"
        assert self.alice.dialog_keys and offer      # she offered a key for reuse
        self.who = self.proxy.answer_caller(offer, verdict)
        self.delivered = self.bob.open(apply_forward(offer, verdict)).message

    def response(self, message: SipMessage) -> None:
        """A response of bob's through the proxy to alice, who takes it."""
        assert self.proxy.inspect(message, caller=self.who).action == "forward"
        self.alice.open(message)

    def reinvite(self, cseq: int):
        """alice's re-INVITE (her SDP under her dialog key) as the proxy answers it."""
        out = self.alice.protect(_invite(self.world, "alice", "bob", self.call_id, cseq=cseq,
                                         to_tag="b1"))
        assert out.info.key_reuse                     # under her offer key
        return self.proxy.inspect(out.message)

    def dialog_copy(self):
        found = [entry for (scope, _), entry in self.cache._entries.items()
                 if scope == DialogScope(self.call_id, "a1", "b1")]
        return found[0] if found else None

    def refresh_after_a_while(self):
        """alice's re-INVITE at once, and another one ``LATER`` seconds on."""
        first = self.reinvite(2)
        assert first.action == "forward", f"{first.code} {first.error}"
        self.now[0] += LATER
        return self.reinvite(3)


def _plaintext_200(call: _Call) -> SipMessage:
    """bob's answering device sends its SDP answer in the clear (it does not protect
    answers; alice runs ``require_e2m = false`` and takes it)."""
    return answer(call.delivered, to_tag="b1")


def _reliable_183_then_bare_200(call: _Call) -> tuple[SipMessage, SipMessage]:
    """bob's phone with 100rel: the SDP answer in a reliable 183, protected by his engine
    (under alice's offer key), then a 200 with no body (RFC 3262 §5)."""
    progress = make_response(call.delivered, 183, "Session Progress",
                             [("Contact", "<sip:bob@127.0.0.1:5062>"), ("Require", "100rel"),
                              ("RSeq", "1")], SDP_ANSWER, "application/sdp")
    progress = progress.replace("To", f"{call.delivered.get('To')};tag=b1")
    sealed = call.bob.protect(progress)
    assert sealed.info.key_reuse
    ok = make_response(call.delivered, 200, "OK", [("Contact", "<sip:bob@127.0.0.1:5062>")])
    ok = ok.replace("To", f"{call.delivered.get('To')};tag=b1")
    return sealed.message, call.bob.protect(ok).message


# --------------------------------------------------------------------------- hole 1

def test_hole_plaintext_200_leaves_the_callers_key_200_s_and_her_refresh_gets_496(world):
    """Attacker: none (a legitimate call, review 44's fix), or anyone who makes the
    answer come in the clear.

    Flow: alice (E2M phone, ``require_e2m = false``) calls bob with her SDP offer signed
    and encrypted for bob and the proxy, offering its CEK for reuse (RFC 3185).  bob's
    answering device sends the 200's SDP answer in the clear (a callee that does not
    protect answers); alice takes it, the 2xx confirms her key, and she seals her next
    SDPs under it.

    Effect: ``_view`` no longer calls ``_fork`` for this 2xx (no kept key looked up, no
    key offered, no signed context), so the answered dialog holds no fork slot.  alice's
    first re-INVITE moves her key into the dialog through ``_spend``'s request branch:
    ``_fork(claim=False)`` is None, so ``fork = 1``: kept ``EARLY_DIALOG_TTL`` (200 s)
    under the shared ``fork:`` keeper instead of for the dialog's life on her quota.  Her
    re-INVITE after 250 s (a session refresh, hold/resume) is answered 496 by her own
    proxy.  At 8041f1f the same call kept the key for life and the refresh passed.

    Fix: let the 2xx to an INVITE whose early dialog holds a kept key of the caller take
    its slot whatever its body (the early scope's look-up, not the 2xx's body, says
    whether a key is at stake: ``self.cache`` has a key under ``message_scope``'s
    ``early_scopes()``); keep review 44's rule only for 2xx whose early dialog holds
    none (a stranger's stray)."""
    call = _Call(world, "r46-plain@x", require_e2m=False)
    call.response(_plaintext_200(call))
    later = call.refresh_after_a_while()
    assert later.action == "forward", f"alice's refresh after {LATER:.0f} s: {later.code} " \
                                      f"{later.reason}"


def test_control_a_protected_200_keeps_the_key_for_life_and_the_refresh_passes(world):
    call = _Call(world, "r46-ok@x", require_e2m=False)
    ok = call.bob.protect(answer(call.delivered, to_tag="b1"))
    assert ok.info.encrypted and ok.info.signed
    call.response(ok.message)
    assert call.dialog_copy() is not None and call.dialog_copy().keeper != LATER_FORK_KEEPER
    assert call.refresh_after_a_while().action == "forward"


# --------------------------------------------------------------------------- hole 2

def test_hole_answer_in_a_reliable_183_then_bare_200_refresh_gets_496(world):
    """Attacker: none (a legitimate call between two E2M phones, every setting at its
    default); anyone on the path gets the same by stripping nothing.

    Flow: alice calls bob offering her key; bob's phone answers with 100rel (RFC 3262):
    the SDP answer in a reliable 183 sealed under alice's offer key (her phone opens it
    since review 43), PRACK, then a 200 OK with no body.  alice seals her re-INVITEs
    under her key, as the 2xx confirmed it.

    Effect: the 183 claims no fork (an 18x confirms no dialog) and moves nothing;
    ``_view`` returns before ``_fork`` for the body-less 200; so the answered dialog
    holds no fork slot and alice's first re-INVITE moves her key as a later fork's
    (200 s, the shared ``fork:`` keeper).  Her session refresh after 250 s is answered
    496 by her own proxy (and any body bob seals under her key later as well).

    Fix: as hole 1: the INVITE's 2xx takes its slot (``_fork``) when its early dialog
    holds a kept key of the caller, body or none (a body-less 2xx can be looked up by its
    early scope before ``_view``'s early return)."""
    call = _Call(world, "r46-100rel@x")
    progress, ok = _reliable_183_then_bare_200(call)
    call.response(progress)
    call.response(ok)
    later = call.refresh_after_a_while()
    assert later.action == "forward", f"alice's refresh after {LATER:.0f} s: {later.code} " \
                                      f"{later.reason}"


def test_control_the_same_call_with_the_answer_in_the_200_passes(world):
    call = _Call(world, "r46-100rel-ok@x")
    ok = call.bob.protect(answer(call.delivered, to_tag="b1"))
    call.response(ok.message)
    assert call.refresh_after_a_while().action == "forward"


# --------------------------------------------------------------------------- hole 3

LEGACY = "resip.example.org"


def _node(world):
    """A cluster node with ``[policy] legacy_peers`` (review 44's ``_node`` otherwise)."""
    claims, cache = _Claims(), MemoryKeyCache()
    node = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=cache, legacy_peers=(LEGACY,))
    node.replay = ClaimedReplayCache(HtableReplayCache(MemoryHtable(), window=300), claims)
    return node, claims, cache


def stranger_body(world):
    """One unsigned AES-GCM envelope for the proxy's (public) certificate, offering its
    CEK for reuse; no signature, no SIP context: it binds nothing."""
    entity, _ = protect_content("application/sdp", SDP_ANSWER,
                                [recipient_for_certificate(world.proxy(TRUSTED).cert)],
                                cek_reference=new_reference())
    return entity


def stray_legacy_200(world, n: int, entity) -> SipMessage:
    """A 200 to an INVITE nobody sent, from a made-up legacy-domain callee, its own
    Call-ID and tags each time, carrying ``entity``."""
    request = make_request("INVITE", f"sip:dave@{LEGACY}", from_uri=world.aor("alice"),
                           to_uri=f"sip:dave@{LEGACY}", call_id=f"stray-{n}@attacker.example",
                           cseq=1, from_tag=f"s{n}", body=SDP_ANSWER,
                           content_type="application/sdp")
    return with_entity(answer(request, to_tag=f"t{n}"), entity)


def test_hole_strangers_legacy_stray_200s_each_claim_a_fork_slot(world):
    """Attacker: a stranger (no certificate, no account, not on any path) who can send
    UDP to a node's SIP port, on a cluster whose proxies name ``[policy] legacy_peers``
    (an RFC 3261 S/MIME domain, ``docs/protocol.md`` §7).

    Attack: review 44's stray 200s to INVITE (made-up Call-ID and tags each time), with
    To naming a user of the legacy domain, each carrying the same unsigned AES-GCM
    envelope for the proxy's public certificate with a ``CEKReference`` (made once: it
    binds nothing of the message).

    Effect: a legacy body needs no signed context (``_context`` returns None), so
    ``_first_sighting`` passes without a replay record; the envelope "offers" a key,
    so review 44's new condition holds and ``_view`` calls ``_fork``, and
    ``_keep_keys`` claims the slot again and keeps the key: one PostgreSQL INSERT round
    trip in a SIP worker and one ``replay_claims`` row (333 s) per datagram, plus a
    replicated ``e2mseen`` slot item and a replicated key-cache entry, at the stranger's
    packet rate: review 44's hole through another door.

    Fix: claim a fork slot in the shared database only for a 2xx whose early dialog
    holds a key this cluster kept (``_spend``'s look-up) or whose body carries a signed
    context (its replay record claimed first); a 2xx offering an unsigned key into an
    early dialog nobody keyed takes its slot in the node's own table only (or keeps its
    key in the transaction's scope, claiming nothing)."""
    node, claims, cache = _node(world)
    entity = stranger_body(world)
    for n in range(50):
        assert node.inspect(stray_legacy_200(world, n, entity)).action == "forward"
    assert claims.asked == 0, f"{claims.asked} claims in the shared database (and " \
                              f"{len(cache)} kept keys) for 50 strays of a stranger"


def test_control_without_legacy_peers_the_same_strays_are_refused_unread(world):
    """Without ``legacy_peers`` the unsigned envelope needs a signed context: 495-class
    refusal of the body, no claim (review 44's fix holds for non-legacy strays)."""
    claims, cache = _Claims(), MemoryKeyCache()
    node = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=cache)
    node.replay = ClaimedReplayCache(HtableReplayCache(MemoryHtable(), window=300), claims)
    entity = stranger_body(world)
    for n in range(5):
        node.inspect(stray_legacy_200(world, n, entity))
    assert claims.asked == 0 and len(cache) == 0


def test_control_legacy_plaintext_strays_claim_nothing(world):
    """A plaintext stray to the legacy domain (no key offered) claims nothing."""
    node, claims, _ = _node(world)
    for n in range(5):
        request = make_request("INVITE", f"sip:dave@{LEGACY}", from_uri=world.aor("alice"),
                               to_uri=f"sip:dave@{LEGACY}", call_id=f"plain-{n}@x", cseq=1,
                               from_tag=f"s{n}", body=SDP_ANSWER, content_type="application/sdp")
        assert node.inspect(answer(request, to_tag=f"t{n}")).action == "forward"
    assert claims.asked == 0
