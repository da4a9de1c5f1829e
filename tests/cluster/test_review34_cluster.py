"""Review 34 on a real node and a real PostgreSQL killed for the outage: whose share of
the spool a callee's answers are charged to.

kemi charges a response to its request's caller (``route_reply``: ``$avp(e2m_caller)``,
``observe(..., caller)``), however many responses the callee sends.  The helpers are
``tests/cluster/test_spool_share_wire.py``'s and ``test_cluster_wire.py``'s.

The hole failed on f94124b (a strict xfail).  Fixed: an answer is charged to a share of
its own, "answers to <caller>" (``archive_spool.answer_share``), so a callee's answers
can use up only that share, never the caller's own messages'.
"""

from __future__ import annotations

import secrets
import time

import pytest

from e2m_lab.flows import SDP_ANSWER
from e2m_plugins.sip import make_response
from tests.cluster.test_cluster_wire import Alice, _home, _stat, _stored
from tests.cluster.test_spool_share_wire import alices_texts_then_catch_up

pytestmark = [pytest.mark.kamailio, pytest.mark.postgres]

SPOOL_MAX = 50          # with the default share of 12 %: six messages a sender


def _ringing_callee(uas, proxy_port: int, provisionals: int):
    """bob's responder: to an INVITE, ``provisionals`` 183s, each with a plaintext SDP
    of its own (another session version: another message for the archive), sent to the
    proxy before the final 486; anything else: 200."""
    def respond(request):
        if request.method != "INVITE":
            return make_response(request, 200, "OK")
        tag = secrets.token_hex(4)
        for n in range(provisionals):
            sdp = SDP_ANSWER.replace(b"2808844564 2808844564", b"%d %d" % (n + 1, n + 1))
            ringing = make_response(request, 183, "Session Progress",
                                    [("Contact", "<sip:bob@127.0.0.1>")], sdp,
                                    "application/sdp")
            ringing = ringing.replace("To", f"{request.get('To')};tag={tag}")
            uas.sock.sendto(ringing.serialize(), ("127.0.0.1", proxy_port))
            time.sleep(0.02)
        busy = make_response(request, 486, "Busy Here")
        return busy.replace("To", f"{request.get('To')};tag={tag}")
    return respond


def _call_then_messages(proxy_factory, pki, own_postgres, provisionals: int):
    """Database killed; alice calls bob, who answers ``provisionals`` 183s and then 486;
    alice sends three MESSAGEs; database back and the spool replayed.  alice's texts."""
    proxy, uas = _home(proxy_factory, own_postgres.url,
                       extra={"archive": {"spool_max": SPOOL_MAX}})
    uas.responder = _ringing_callee(uas, proxy.port, provisionals)
    alice = Alice(pki, proxy)
    own_postgres.kill()
    tag = secrets.token_hex(4)
    assert alice.invite(f"call-{tag}".encode()) == 486
    time.sleep(0.5)
    return proxy, alices_texts_then_catch_up(alice, proxy, own_postgres, tag)


def test_control_a_callees_one_183_leaves_alice_her_share(proxy_factory, pki, own_postgres):
    """Without the attack: bob rings once (one 183 with SDP); alice's INVITE, the 183
    and her three MESSAGEs are all spooled and replayed."""
    proxy, texts = _call_then_messages(proxy_factory, pki, own_postgres, provisionals=1)
    stored = _stored(proxy)
    assert all(stored[text] == 1 for text in texts)
    assert _stat(proxy, "e2m_archive_lost") == 0


@pytest.mark.slow
def test_hole_a_callees_183s_use_up_the_callers_share_and_her_messages_are_lost(
        proxy_factory, pki, own_postgres):
    """Attacker: any callee a user of ours calls (an insider, or an outsider: no account
    and no certificate needed; a callee that rings with a plaintext SDP).

    Attack: during a database outage, answer alice's INVITE with many 183s, each with a
    plaintext SDP of its own (another o= version), then 486.  (Here 8 with spool_max 50:
    alice's share is 6; at the defaults, 1200 183s to one INVITE, ~20 s at 60 a second,
    or spread over the calls alice makes.)

    Effect: the proxy reads every 183 (``INVITE:application/sdp``) and ``route_reply``
    charges each to the request's caller (``$avp(e2m_caller)``, alice: her signed, bound
    context), so bob's answers fill alice's share; her own three signed MESSAGEs after
    the call are lost ("over its share of the spool").  The share per sender was meant
    to keep one party's traffic from costing another's messages; a callee picks whose.

    Fix: charge an answer to the pair that answers_keeper names for its keys
    (``answer_keeper(caller, responder)``: caller and the Request-URI it was sent to),
    or to the responder's own group, so a callee uses up only a share of his own; or
    count at most a few answers per transaction against the caller."""
    proxy, texts = _call_then_messages(proxy_factory, pki, own_postgres, provisionals=8)
    stored = _stored(proxy)
    lost = _stat(proxy, "e2m_archive_lost")
    print(f"\nalice's archived {sum(stored[t] for t in texts)} of {len(texts)}, lost {lost}")
    assert all(stored[text] == 1 for text in texts), "alice's messages were lost"
