"""A ninety-sixth attacker's review (December 2026) of d91b4b5: stop 35's newest proxy
fixes (reviews 94, 95) on a real Kamailio - a BYE's 2xx ends a dialog's keys only when
the BYE's Request-URI is the remote target of the party it did not come from
(``e2mtargets``, ``kemi.end_answered_dialog``); the door's 482 for a branch another
live request holds (``e2mbranch``); the ``;e2mnr=`` mark.  The core half (the kemi
calls with a stand-in ``KSR``) is ``tests/unit/test_review96.py``; its docstring has
the whole report (attacker, messages, effect, code at fault, fix, and what held).

``test_hole_*`` xfail strictly on d91b4b5 (their assertion is the secure behaviour);
``test_control_*`` pass and show the set-up is sound.

Hole 1 (``test_hole_a_bye_to_the_peers_target_routed_past_us_ends_the_live_calls_keys``):
attacker: an **untrusted hop** on either leg (it read the INVITE's Contact and
Record-Route and the 200's To tag), no credentials even with ``[auth]`` (a From not
ours, in a dialog, passes ``route_auth``); or an **insider UA**.  Messages: in alice's
live call with bob (bob's 200 read by the proxy under her offer key), a bare ``BYE``
"from bob's side" (bob's tag as From tag, a From URI of anyone's, alice's tag as To tag)
whose Request-URI is alice's own Contact - exactly the target review 94's fix wants -
and whose Route is the dialog's (our entry with its token) followed by one more entry,
``<sip:x@<hop>;lr>``.  ``loose_route`` takes ours off and sends the BYE to the next
Route entry, the hop's UAS, which answers ``200``; alice never sees the BYE.  Effect:
``end_answered_dialog`` compares only the Request-URI as received (``$T_req($ou)``)
with the noted target - equal - and ends the dialog's keys (records 2 -> 0); alice's
next re-INVITE under the dialog key is answered 496 by her own proxy (bob's answers
go unread: no archive row, no media line): review 94's hole 1 back.

Hole 2 (``test_hole_a_display_name_holding_a_uri_is_noted_as_the_target``): alice's
Contact ``"<sip:x@hop>" <sip:alice@127.0.0.1:5061>``; ``_target`` cuts at the first
``<`` (inside the quotes) and notes ``sip:x@hop``; the hop form's BYE to ``sip:x@hop``,
answered 200 there, ends the live call's keys (2 -> 0, her re-INVITE 496).

Hole 3 (``test_hole_a_decoy_branch_first_gets_a_mark_for_alices_transaction``, three
variants): review 94's minting hop with alice's Via carrying a decoy branch first (or a
quoted parameter holding one, or an empty ``branch=``): the door reads the first, so
the hop's in-dialog INVITE is relayed and marked; bob's stripped stray 200 with that
Via below ours reaches alice with an empty route set (Contact the hop's).

Hole 4 (``test_hole_every_keyless_call_keeps_two_targets_for_12_hours``): 20 plain
calls from one address to the sender's own UAS, answered 200, hold no key, yet leave 40
``e2mtargets`` entries (12 h each, no per-user bound).

Controls: ``test_control_*`` below (a 481 at the hop ends nothing; review 94's form
holds; a plain display name; alice's Via as written is 482; keyless calls are answered
and hold no key).

What held on this Kamailio (run, no test kept unless named): a BYE to alice's target
with ``;maddr=<hop>`` in its Request-URI went to the target's host, not to maddr (408,
nothing at the hop); sipsak's ``-T``, ``-F``, OPTIONS and digest REGISTER/MESSAGE make a
new branch per CSeq, so the 482 door refuses none of them
(``test_stock_clients_wire.py`` passes); on a cluster, the call's BYE through the other
node ends its keys and targets on both (``tests/cluster/test_review96_cluster.py``).
The rest of what held is in ``tests/unit/test_review96.py``'s docstring.

Fixed (stop 36): holes 1 and 4, as ``tests/unit/test_review96.py``'s docstring says (the
BYE's Route past ours must be the other side's part of the dialog's route set; a keyless
call's targets go at its 2xx); their markers are off.  Holes 2 and 3 too (the Contact
read as a name-addr; the branch tm reads): the same docstring.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from e2m_lab.flows import TRUSTED, invite, known_proxy, ua_engine
from e2m_lab.kamailio_harness import (RawUas, SipUa, answer_under_offer_key,
                                      register_contact, udp_transaction)
from e2m_plugins.sip import SipMessage, make_request, make_response
from tests.kamailio.test_review94_wire import ALICES_NEW_SDP, SDP_VIEW, _bobs_phone

pytestmark = pytest.mark.kamailio

ALICES_CONTACT = "sip:alice@127.0.0.1:5061"        # e2m_lab.flows.invite's Contact


def _bye_past_us_then_records(proxy_factory, pki, name: str, *, ruri, past_us: bool,
                              answer: int = 200, contact=None, hop_at=None):
    """alice's call with bob read by the proxy; then (``ruri`` not None) the hop's BYE
    "from bob's side" to ``ruri`` with the dialog's Route plus, when ``past_us``, an
    entry of the hop's UAS after ours.  Returns (records after bob's 200, records after
    the BYE, BYEs the hop's UAS got, status of alice's re-INVITE under the dialog key)."""
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW)
    bob_engine = ua_engine(pki, "bob")
    bob = RawUas(_bobs_phone)
    hop = RawUas(lambda request: make_response(request, answer, "OK" if answer == 200
                                               else "Call Does Not Exist"))
    if hop_at is not None:              # the hop's UAS on an address of its choosing
        moved = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        moved.bind(hop_at)
        moved.settimeout(0.2)
        hop.sock, old = moved, hop.sock
        time.sleep(0.3)
        old.close()
    alice_ua = SipUa(proxy.port, user="alice", timeout=5)
    try:
        register_contact(proxy, "bob", bob.port)
        alice = ua_engine(pki, "alice", proxies=(known_proxy(pki, TRUSTED, SDP_VIEW),))
        call_id = f"review96-{time.monotonic_ns()}@x"
        request = invite(pki, call_id=call_id).replace("Via", alice_ua.via())
        assert request.get("Contact") == f"<{ALICES_CONTACT}>"
        if contact is not None:
            request = request.replace("Contact", contact(hop.port))
        offer = alice.protect(request)
        alice_ua.send(offer.message)
        (delivered,) = bob.wait_for(1, method="INVITE")
        answer_under_offer_key(proxy, bob_engine, bob, delivered)
        deadline, got = time.monotonic() + 5, None
        while time.monotonic() < deadline:
            got = alice_ua.receive(timeout=1)
            if got is not None and not got.is_request and got.status == 200:
                break
        assert got is not None and got.status == 200, "bob's 200 did not reach alice"
        alice.open(got)
        time.sleep(0.3)
        after_answer = proxy.htable_items()
        if ruri is not None:
            ruri = ruri(hop.port) if callable(ruri) else ruri
            # from bob's side: From bob, To alice (the dialog's parties, review 98)
            bye = make_request("BYE", ruri, from_uri=pki.aor("bob"),
                               to_uri=pki.aor("alice"), call_id=call_id, cseq=7,
                               from_tag=got.to_tag or "", to_tag=got.from_tag or "",
                               body=b"")
            for route in got.get_all("Record-Route"):     # bob's side: in order
                bye = bye.add("Route", route)
            if past_us:
                bye = bye.add("Route", f"<sip:x@127.0.0.1:{hop.port};lr>")
            reply = udp_transaction(proxy.port, bye, timeout=5)
            assert reply is not None and reply.status == answer, reply
            time.sleep(0.3)
        after_bye = proxy.htable_items()
        byes = hop.wait_for(1, timeout=0.2, method="BYE")
        assert not [m for m in bob.received if m.method == "BYE"], "bob got the BYE"
        if byes:
            assert byes[0].request_uri == ruri, byes[0].request_uri
        plain = make_request("INVITE", f"sip:bob@127.0.0.1:{bob.port}",
                             from_uri=pki.aor("alice"), to_uri=pki.aor("bob"),
                             call_id=call_id, cseq=2, from_tag="a1",
                             to_tag=got.to_tag or "b1", body=ALICES_NEW_SDP,
                             content_type="application/sdp",
                             extra_headers=[("Contact",
                                             f"<sip:alice@127.0.0.1:{alice_ua.local_port}>")])
        again = alice.protect(plain)
        assert again.info.key_reuse          # sealed for the proxy under the dialog key
        again = again.message
        for route in reversed(got.get_all("Record-Route")):
            again = again.add("Route", route)
        reply = alice_ua.transact(again.replace("Via", alice_ua.via()))
        return after_answer, after_bye, len(byes), (reply.status if reply is not None else 0)
    finally:
        alice_ua.close()
        bob.close()
        hop.close()


def test_control_the_hops_bye_past_us_refused_there_ends_nothing(proxy_factory, pki):
    """The BYE with alice's target and a Route past ours is relayed to the hop's UAS (not
    to alice, not to bob): a 481 there ends nothing, her re-INVITE is read (200)."""
    after_answer, after_bye, byes, status = _bye_past_us_then_records(
        proxy_factory, pki, "r96-past-481", ruri=ALICES_CONTACT, past_us=True, answer=481)
    assert byes == 1
    assert after_answer >= 1 and after_bye == after_answer
    assert status == 200, f"alice's re-INVITE got {status}"


def test_control_review_94s_form_ends_nothing(proxy_factory, pki):
    """Review 94's fix holds for its own form: the hop's UAS as the Request-URI (no
    Route past ours), answered 200 there, ends nothing."""
    after_answer, after_bye, byes, status = _r94_form(proxy_factory, pki)
    assert byes == 1
    assert after_answer >= 1 and after_bye == after_answer
    assert status == 200, f"alice's re-INVITE got {status}"


def _r94_form(proxy_factory, pki):
    from tests.kamailio.test_review94_wire import _bye_elsewhere_then_records
    return _bye_elsewhere_then_records(proxy_factory, pki, "hop")


def test_hole_a_bye_to_the_peers_target_routed_past_us_ends_the_live_calls_keys(
        proxy_factory, pki):
    after_answer, after_bye, byes, status = _bye_past_us_then_records(
        proxy_factory, pki, "r96-past-200", ruri=ALICES_CONTACT, past_us=True)
    assert byes == 1 and after_answer >= 1
    assert status == 200 and after_bye == after_answer, (
        f"alice's re-INVITE got {status} from her own proxy; {after_answer} key records "
        f"before the BYE, {after_bye} after")


def test_control_a_bye_along_the_route_set_to_the_target_ends_the_keys(proxy_factory, pki):
    """Stop 36: what the fix keeps.  The same BYE "from bob's side" with the dialog's
    Route only (nothing past ours: alice's side of the route set is empty) goes to
    alice's Contact, where a UAS stands in for her phone; its 200 ends the keys (so
    her next re-INVITE under them gets 496, as after any BYE)."""
    after_answer, after_bye, byes, status = _bye_past_us_then_records(
        proxy_factory, pki, "r96-along-200", ruri=ALICES_CONTACT, past_us=False,
        hop_at=("127.0.0.1", 5061))
    assert byes == 1 and after_answer >= 1
    assert after_bye == 0, f"{after_bye} key records after the dialog's own BYE"
    assert status == 496


# -- hole 2: a quoted display name with '<' in it names another target ---------------------

def _hops_target(port: int) -> str:
    return f"sip:x@127.0.0.1:{port}"


def _contact_with_display(display: str):
    return lambda port: f'"{display.format(port=port)}" <{ALICES_CONTACT}>'


def test_control_a_plain_display_name_keeps_alices_target(proxy_factory, pki):
    """alice's Contact with a display name of plain letters: the hop's BYE to its own UAS
    (Request-URI not alice's target, no Route past ours), answered 200, ends nothing."""
    after_answer, after_bye, byes, status = _bye_past_us_then_records(
        proxy_factory, pki, "r96-display-ok", ruri=_hops_target, past_us=False,
        contact=_contact_with_display("alice"))
    assert byes == 1
    assert after_answer >= 1 and after_bye == after_answer
    assert status == 200, f"alice's re-INVITE got {status}"


def test_hole_a_display_name_holding_a_uri_is_noted_as_the_target(proxy_factory, pki):
    after_answer, after_bye, byes, status = _bye_past_us_then_records(
        proxy_factory, pki, "r96-display-hole", ruri=_hops_target, past_us=False,
        contact=_contact_with_display("<sip:x@127.0.0.1:{port}>"))
    assert byes == 1 and after_answer >= 1
    assert status == 200 and after_bye == after_answer, (
        f"alice's re-INVITE got {status} from her own proxy; {after_answer} key records "
        f"before the BYE, {after_bye} after")


# -- hole 3: the door reads a Via's first branch, Kamailio and pjsip its last -----------------

from tests.kamailio.test_review88_wire import HOP, _route_set, _starts_at_our_tls  # noqa: E402
from tests.kamailio.test_review94_wire import (_BRANCH, USERS, _alices_via,  # noqa: E402
                                               _MintingHop, _vias)
from tests.kamailio.test_review81_wire import _alice_tls  # noqa: E402

DECOY = "z9hG4bK-decoy96"


_DECOYS = {"decoy-first": f";branch={DECOY};branch=",
           "quoted-param": f';x="a;branch={DECOY}";branch=',
           "empty-first": ";branch=;branch="}


def _doubled(via: str, variant: str = "decoy-first") -> str:
    """The Via with a branch of the hop's own put before the one it carries (or a quoted
    parameter holding one, or an empty one): the door (``_branch_taken``) reads the first
    ``branch`` it splits out, pjsip's parser keeps the last non-empty one
    (``int_parse_via_param`` overwrites ``branch_param``)."""
    return re.sub(r";branch=", _DECOYS[variant], via, count=1, flags=re.IGNORECASE)


class _DoubleBranchHop(_MintingHop):
    """Review 94's minting hop, with alice's Via carrying the hop's decoy branch first:
    on its own in-dialog INVITE (to get the mark) and as the Via below ours in bob's
    stripped, stray 200 (so the mark fits it, and alice's stack still reads her own
    branch last).  ``double`` False: review 94's form (her Via as it is)."""

    def __init__(self, home, double: bool, variant: str = "decoy-first") -> None:
        super().__init__(home, "mint")
        self.double, self.variant = double, variant

    def _mint(self, request: SipMessage) -> str | None:
        via = _alices_via(request)
        if self.double:
            via = _doubled(via, self.variant)
        forged = make_request(
            "INVITE", f"sip:hop@127.0.0.1:{self.hop_uas.port}",
            from_uri="sip:bob@example.com", to_uri="sip:alice@example.com",
            call_id=request.get("Call-ID"), cseq=request.cseq[0] + 50, from_tag="hop96",
            to_tag=request.from_tag or "",
            extra_headers=[("Contact", f"<sip:hop@127.0.0.1:{self.hop_uas.port}>")])
        forged = forged.replace("Via", via)
        for route in [e.strip() for value in request.get_all("Record-Route")
                      for e in value.split(",") if "e2m-rr=" in e]:
            forged = forged.add("Route", route)
        self.sock.sendto(forged.serialize(), ("127.0.0.1", self.home.port))
        got = self.hop_uas.wait_for(1, method="INVITE", timeout=3)
        if not got:
            self.sock.settimeout(1.0)
            try:
                self.refused_with = int(self.sock.recv(65535).split(b" ", 2)[1])
            except (OSError, ValueError, IndexError):
                pass
            return None
        found = re.search(r";e2mnr=([0-9a-fA-F]+)", _vias(got[0])[0], re.IGNORECASE)
        return found.group(1) if found else None

    def respond(self, request: SipMessage):
        answer = make_response(request, 200, "OK")
        if request.method != "INVITE":
            return answer
        with self._lock:
            if self._answer is not None:
                return self._answer
            try:
                answer = answer.replace("To", f"{request.get('To')};tag=bt96")
                self.minted = self._mint(request)
                answer = answer.remove("Record-Route").add("Contact", f"<sip:bob@{HOP}>")
                vias = _vias(answer)
                ours = _BRANCH.sub(lambda m: m.group(1) + m.group(2)[:-1]
                                   + ("x" if m.group(2)[-1:] != "x" else "y"), vias[0])
                if self.minted:
                    ours += f";e2mnr={self.minted}"
                below = _doubled(vias[1], self.variant) if self.double else vias[1]
                answer = answer.remove("Via")
                for via in [ours, below] + vias[2:]:
                    answer = answer.add("Via", via)
                self._answer = answer
            except Exception as exc:  # noqa: BLE001 - the test reads it
                self.errors.append(repr(exc))
            return self._answer


def _double_branch_call(proxy_factory, pki, name: str, double: bool, sources,
                        variant: str = "decoy-first"):
    home = proxy_factory(name, e2m=False, tls=True, auth=True, users=USERS)
    bob = _DoubleBranchHop(home, double, variant)
    register_contact(home, "bob", bob.uas.port, password=USERS["bob"], source=sources[0])
    ua = _alice_tls(home, pki, sources[1])
    ua.password = USERS["alice"]
    try:
        assert ua.register().status == 200
        mark = home.log_mark()
        ok = ua.request(ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com"),
                        timeout=6)
        return home, ok, home.log_since(mark), bob
    finally:
        ua.close()
        bob.close()


def test_control_alices_branch_as_written_is_refused_482(proxy_factory, pki):
    """Stop 35's fix for its own form: the hop's INVITE under alice's very Via is 482 at
    the door, no mark is made, the stripped stray 200 is dropped."""
    home, ok, log, bob = _double_branch_call(proxy_factory, pki, "r96-branch-ctl", False,
                                             ("127.0.96.1", "127.0.96.2"))
    assert not bob.errors, bob.errors
    assert (bob.minted, bob.refused_with) == (None, 482)
    assert "(no Record-Route), not ours: dropped" in log, log
    assert ok is None or ok.status != 200


def test_control_the_doubled_via_is_one_branch_to_pjsip():
    """What alice's stack reads: pjsip's Via parser keeps the last ``branch`` it meets
    (``int_parse_via_param``: ``hdr->branch_param = pvalue`` for each one), so the
    doubled Via below ours names her INVITE's branch; the door reads the first."""
    alices = "SIP/2.0/TLS 127.0.96.2:40000;rport;branch=z9hG4bK-ua96"
    doubled = _doubled(alices)
    branches = re.findall(r";branch=([^;,\s]+)", doubled)
    assert branches == [DECOY, "z9hG4bK-ua96"]     # pjsip: the last; the door: the first


@pytest.mark.parametrize("variant", sorted(_DECOYS))
def test_hole_a_decoy_branch_first_gets_a_mark_for_alices_transaction(proxy_factory, pki,
                                                                     variant):
    n = sorted(_DECOYS).index(variant)
    home, ok, log, bob = _double_branch_call(proxy_factory, pki, f"r96-branch-hole{n}", True,
                                             (f"127.0.96.{3 + 2 * n}", f"127.0.96.{4 + 2 * n}"),
                                             variant)
    assert not bob.errors, bob.errors
    # secure: the hop's INVITE naming alice's branch (where her stack reads it) is
    # refused as stop 35's door refuses it as written, and no stray 200 without our
    # Record-Route reaches alice
    assert ok is None or _starts_at_our_tls(home, ok), (bob.minted, bob.refused_with,
                                                        _route_set(ok), ok.get("Contact"))
    assert (bob.minted, bob.refused_with) == (None, 482)


# -- hole 4: 12 h of targets for every answered call, keys or none --------------------------

def _sink(request: SipMessage) -> SipMessage:
    """The insider's own UAS: a 200 with a To tag and a Contact to every INVITE (the
    Record-Route copied back, as a UAS does)."""
    answer = make_response(request, 200, "OK")
    if request.method != "INVITE":
        return answer
    answer = answer.replace("To", f"{request.get('To')};tag=s{request.get('CSeq')[:1]}x")
    return answer.add("Contact", "<sip:sink@127.0.0.1:9>")


def _keyless_calls(proxy_factory, name: str, calls: int) -> tuple[int, int, int]:
    """``calls`` plain-SDP calls from one source to the insider's own UAS (no [auth]:
    any sender; with it, any user of ours), answered 200, never ended; returns (200s,
    key-cache records, e2mtargets entries)."""
    from e2m_lab.flows import SDP_OFFER
    from e2m_plugins.sip import parse
    proxy = proxy_factory(name, e2m=True, view=SDP_VIEW)
    sink = RawUas(_sink)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(3)
    port = sock.getsockname()[1]
    answered = 0
    try:
        for n in range(calls):         # under pike's default rate (30 per 2 s)
            request = make_request(
                "INVITE", f"sip:sink@127.0.0.1:{sink.port}", from_uri="sip:eve@example.com",
                to_uri="sip:sink@example.net", call_id=f"r96-grow-{n}-{time.monotonic_ns()}@x",
                cseq=1, from_tag=f"e{n}", body=SDP_OFFER, content_type="application/sdp",
                extra_headers=[("Contact", f"<sip:eve@127.0.0.1:{port}>")])
            request = request.replace("Via", f"SIP/2.0/UDP 127.0.0.1:{port};rport;"
                                             f"branch=z9hG4bK-r96g{n}x{time.monotonic_ns()}")
            sock.sendto(request.serialize(), ("127.0.0.1", proxy.port))
            while True:
                reply = parse(sock.recvfrom(65535)[0])
                if (reply.status or 0) >= 200:
                    answered += reply.status == 200
                    break
            time.sleep(0.08)
        time.sleep(0.3)
        return answered, proxy.htable_items(), proxy.htable_items("e2mtargets")
    finally:
        sock.close()
        sink.close()


CALLS = 20


def test_control_keyless_calls_are_answered_and_hold_no_keys(proxy_factory):
    """The set-up: each plain call is relayed and answered 200; the proxy holds no key
    for any of them (nothing a BYE would ever have to end)."""
    answered, keys, _ = _keyless_calls(proxy_factory, "r96-grow-ctl", CALLS)
    assert (answered, keys) == (CALLS, 0)


def test_hole_every_keyless_call_keeps_two_targets_for_12_hours(proxy_factory):
    answered, keys, targets = _keyless_calls(proxy_factory, "r96-grow-hole", CALLS)
    assert (answered, keys) == (CALLS, 0)
    # secure: a dialog whose keys the proxy does not hold keeps nothing for 12 h (its
    # targets only gate the end of keys), or what one user keeps is bounded
    assert targets == 0, f"{targets} e2mtargets entries for {CALLS} calls holding no key"
