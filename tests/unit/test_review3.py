"""A third attacker's review (December 2026), in memory: policy rule coverage
(``Rule.covers``, commit 154fb61) and the archive's content uid (``content_uid``).

``test_hole_*`` succeeded when this review ran and pass since the fix (a standard method
in any case is that method to ``Rule.covers``: ``sip.canonical_method``);
``test_held_*`` the code refused.  Messages are built with the project's own
builders and test PKI, then changed the way the attacker would.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import SDP_OFFER, TRUSTED, invite, proxy_engine
from e2m_plugins.body import protect_content, with_entity
from e2m_plugins.cms.recipients import recipient_for_certificate
from e2m_plugins.sip import make_response

SDP_VIEW = ("INVITE:application/sdp",)
MOVED = SDP_OFFER.replace(b"127.0.0.1", b"203.0.113.66")


@pytest.fixture(scope="module")
def world():
    from e2m_plugins.testpki import init_test_pki
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"))


def _sealed_for(world, message, reader: str, signer: str):
    """``message`` with the moved SDP encrypted for ``reader`` alone (not the proxy)."""
    cred = world.user(signer)
    part, _ = protect_content("application/sdp", MOVED,
                              [recipient_for_certificate(world.user(reader).cert)],
                              signer=(cred.cert, cred.key), bind_to=message)
    return with_entity(message, part)


def _passed_unread(verdict) -> bool:
    """Forwarded without the proxy opening the SDP, unnoticed: no refusal, no media
    seen, and no error recorded (a response cannot be refused: the proxy forwards it
    and records that it could not open it)."""
    return verdict.action != "reply" and verdict.error is None and not any(
        m.address == "203.0.113.66" for m in verdict.media)


@pytest.mark.parametrize("method", ["invite", "Invite", "ack", "update", "prack"])
def test_hole_a_lower_case_method_carries_the_sdp_past_the_invite_rule(world, method):
    """HOLE (insider UA): ``Rule.covers`` compares the method as written (RFC 3261 §7.1
    says methods are case-sensitive), but the UAs and Kamailio do not: pjsip's
    ``pjsip_method_init_np`` takes INVITE/ACK/BYE/CANCEL/OPTIONS/REGISTER in any case
    (pjsua2 2.15.1 raised ``onIncomingCall`` for ``invite``, seen in this review); older
    pjsip compared UPDATE and PRACK case-insensitively too (2.15: case-sensitive), and
    Kamailio parses the method name case-insensitively (tm, is_method).  So alice's UA sends ``update`` (or
    ``invite`` to start a call) whose SDP, encrypted for bob alone, moves the media: the
    INVITE rule does not cover it, the proxy forwards it unread, bob's phone takes it as
    an UPDATE.  Seen: forwarded with no refusal and no media recorded."""
    request = invite(world, call_id=f"case-{method}@x", cseq=2, method=method, sdp=b"",
                     to_tag=None if method.upper() == "INVITE" else "b1")
    request = _sealed_for(world, request, "bob", "alice")
    verdict = proxy_engine(world, TRUSTED, view=SDP_VIEW).inspect(request)
    assert not _passed_unread(verdict), f"{method} with bob-only SDP forwarded unread"


def test_hole_a_183_whose_cseq_says_invite_in_lower_case_passes_unread(world, cseq="1 invite"):
    """HOLE (insider UA, the callee): the method of a response is its CSeq's; bob answers
    alice's INVITE with a 183 whose CSeq reads ``1 invite`` and whose SDP (for alice
    alone) moves the media.  Kamailio's tm matches the response by its branch (the CSeq
    method parsed case-insensitively) and pjsip the same, so alice takes the answer;
    the proxy's INVITE rule does not cover ``invite``: forwarded unread."""
    request = invite(world, call_id="case-183@x")
    reply = make_response(request, 183, "Session Progress")
    reply = reply.replace("CSeq", cseq)
    reply = _sealed_for(world, reply, "alice", "bob")
    verdict = proxy_engine(world, TRUSTED, view=SDP_VIEW).inspect(reply)
    assert not _passed_unread(verdict), "183 with alice-only SDP forwarded unread"


@pytest.mark.parametrize("method", ["INVITE", "UPDATE", "PRACK"])
def test_held_the_same_attack_spelled_in_capitals_is_refused(world, method):
    """The control for P1: written as RFC 3261 spells it, the proxy refuses the
    bob-only SDP (it cannot view what its INVITE rule asks for)."""
    request = invite(world, call_id=f"caps-{method}@x", cseq=2, method=method, sdp=b"",
                     to_tag=None if method == "INVITE" else "b1")
    request = _sealed_for(world, request, "bob", "alice")
    verdict = proxy_engine(world, TRUSTED, view=SDP_VIEW).inspect(request)
    assert not _passed_unread(verdict)
    assert verdict.action == "reply" and verdict.code == 496, verdict


def test_held_a_183_with_a_capital_cseq_is_not_forwarded_unread(world):
    """The control for the 183: with ``CSeq: 1 INVITE`` the proxy records that it could
    not open what its INVITE rule asks for."""
    request = invite(world, call_id="caps-183@x")
    reply = make_response(request, 183, "Session Progress")
    reply = _sealed_for(world, reply, "alice", "bob")
    verdict = proxy_engine(world, TRUSTED, view=SDP_VIEW).inspect(reply)
    assert not _passed_unread(verdict), verdict
    assert verdict.error == "ProxyCannotDecryptError", verdict
