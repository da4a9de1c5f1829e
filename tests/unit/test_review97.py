"""A fifty-...th attacker's review (December 2026) of d91b4b5: stop 35's newest phone and
UA fixes (review 95's: ``phone._rx_key`` builds pjsip's own transaction key, ``UAEngine.react``
follows one E2M answer per request, ``privatefiles`` refuses a root key with an ACL), fresh
eyes.  The core half: the phone's record keeping read without pjsua (``E2MPhone`` built
without an endpoint, as ``tests/unit/test_review95.py`` does).  The same holes on a real
``e2m-phone`` (pjsua2 2.15): ``tests/pjsua/test_review97_phone.py``.

pjsip's key (``pjsip_tsx_create_key``, pjsip 2.15 ``sip_transaction.c``): when the top
Via's ``branch_param`` starts with ``z9hG4bK`` in any case (``pj_strnicmp``), ``s$``,
the method unless INVITE/ACK, and the branch; else (RFC 2543, ``create_tsx_key_2543``)
``s$``, the method unless INVITE/ACK, the CSeq number, the From tag, the Call-ID, the
Via host, ``:`` and the Via port printed as a number (``pj_utoa``).  The key is looked up
with ``pj_hash_get_lower``: every character case-folded.  ``int_parse_via_param`` keeps a
quoted parameter's quotes, and reads a Via whose parameters repeat (the last branch wins).

Holes 1-4 (an RFC 2543 peer: alice's branch has no cookie, review 95's hole 3 set-up):

- attacker: an **untrusted hop** on the leg to bob's UDP phone (or an off-path sender who
  read the request's ids);
- messages: a bodiless copy of alice's MESSAGE (or INVITE) ahead of hers, the same in
  pjsip's key but spelt otherwise: (1) the Call-ID in other letters, (2) the From tag in
  other letters, (3) the Via port with a leading zero (``:05060``), (4) the branch
  ``"z9hG4bKhop"`` quoted (the core unquotes it and sees a cookie: an RFC 3261 key;
  pjsip keeps the quotes: no cookie, the 2543 key, alice's);
- effect: ``_one_content_per_transaction`` finds no taken transaction: no 482.  pjsip
  takes the copy, absorbs alice's real request as its retransmission (run: two 200s,
  bob shown the empty plaintext copy, her signed and sealed text never; no
  ``duplicate_refused``) - review 93/95's swallow;
- at fault: ``pjsua_hooks/phone.py`` ``_rx_key`` lines 350-360: the 2543 tuple (line 360) keeps
  ``msg.from_tag`` and ``msg.call_id`` as written, the sent-by as a string (line 357),
  and the 3261/2543 choice (line 350) reads ``msg.via_branch()`` (line 347), which unquotes;
- fix: key exactly what pjsip prints, folded: ``(method, cseq, from_tag.lower(),
  call_id.lower(), host.lower(), int(port or 0))``, and choose 3261 on the branch's raw
  text (quotes kept).  Simpler and safer: refuse (400) a request whose top Via branch is
  quoted, and a 2543 one outright when the phone sits behind its proxy (Kamailio's Via
  always carries the cookie).

Hole 5 (RFC 3261, every deployment: the top Via is Kamailio's, with the cookie):

- attacker: an **untrusted hop** on the leg to bob's UDP phone;
- messages: alice's call to bob answered and ACKed; she puts it on hold (a re-INVITE,
  CSeq 2, signed, its SDP sealed for bob); the hop sends first a bodiless copy of it on
  her very branch, its top Via with ``;rport`` written twice
  (``...;rport;rport;branch=z9hG4bK...``), then hers;
- effect: the core's ``via_branch`` raises on the repeated parameter
  (``grammar.parse_params``), ``_rx_key`` catches it (lines 346-349, "pjsip refuses such
  a request": it does not) and files the copy under an RFC 2543 key; pjsip reads the Via
  and keys the copy by alice's branch.  No 482: pjsua takes the bodiless re-INVITE
  (offers sendrecv in its 200), her hold is absorbed as its retransmission - she gets
  that 200, bob's media never held - and bob's phone files her signed, sealed hold as
  the call's record (the hook noted it before pjsip absorbed it), though pjsua never
  took it;
- at fault: ``pjsua_hooks/phone.py`` ``_rx_key`` lines 346-349 (an unreadable Via is
  keyed as a 2543 request with branch ""); the FirstCopy check refuses such a Via only
  for a new MESSAGE or initial INVITE (``firstcopy.py`` line 107 raises: 500);
- fix: refuse (400, ``RxReject``) a request whose top Via the core cannot read, in
  ``_on_rx`` before anything else; pjsip's reading must never be laxer than the key's.

Controls: alice's request alone is taken with her security; each copy with every field
as alice wrote it is refused 482; a retransmission (the same octets) and a copy in another
transaction to pjsip (one character more in the Call-ID) are not refused here; a
readable Via with ``;rport`` once keys as RFC 3261.

Tried and held (read, run, and the controls):

- (run, real phone) RFC 3261: a copy with the Call-ID in other letters is refused 482
  (the 3261 key has no Call-ID); the copy with ``;rport`` twice as a new MESSAGE gets
  500 (``FirstCopy.check`` reads the branch and raises), with a To tag 481 (pjsip answers
  statelessly: no transaction), alice's shown;
- (run, model) ``UAEngine.react`` on a 493 on alice's initial INVITE branch after bob's
  200 (a 2xx before the E2M answer): followed once (``retry``; ``_sent`` is not told the
  INVITE was answered 2xx), but no state of the call is lost: bob's later re-INVITE
  opens, alice answers it under a fresh key (not the reused one) which bob opens; a second
  copy is ``none`` (review 95's pop);
- ``_sent_key``/``_tx_key`` take the branch as written: a 493 on our branch in other
  letters reaches pjsip's client transaction but not ``react`` - the same as a hop
  dropping the answer;
- the 3261 key: method as written (a lower-case method makes no pjsip transaction:
  review 95), CANCEL and PRACK keyed apart from their INVITE as pjsip does, an ACK never
  keyed; 401/407 retries come on a new branch (new key);
- ``privatefiles``: a key reached through a symlinked directory (``O_NOFOLLOW`` guards
  the last component only; moving the directory needs write access to its parent: not
  the attackers'); a key replaced between check and open (``read_private_file`` checks
  the opened inode: ``fstat``, ``fgetxattr``); default ACLs on the directory (a key
  made there 0600 gets an ACL whose mask is ``---``: the owner branch refuses any group
  bit, the root branch any ACL).  Lead, not a hole: the root branch takes ``root:<any
  group> 0640`` - every member of that group (Debian's ``ssl-cert``: postgres and
  others) reads the key; the operator's choice, as PostgreSQL's.

Fixed (stop 36): ``_rx_key`` is pjsip's key as pjsip looks it up (every letter's case
folded): the method, none for INVITE and ACK, then an RFC 3261 branch; for an RFC 2543
peer the CSeq number, From tag, Call-ID, and the top Via's host and port read as a
number.  ``SipMessage.via_branch`` refuses a branch that is no token (a quoted one) as
well as a parameter given twice, and ``_on_rx`` reads the key first, so a request whose
top Via the core cannot read is refused 400 before pjsip sees it or anything is noted
(hole 5, and a quoted branch of hole 4; a port pjsip reads as a number of six digits
too).  The model's ``_swallowed`` counts a copy refused 400 as never taken; the phone
module's ``_alices_never_swallowed`` accepts the 400 outcome (alice's MESSAGE shown),
and the control on the four spellings asserts pjsip's key (or the 400) now.
"""

from __future__ import annotations

import pytest

from e2m_plugins import sip
from e2m_plugins.errors import E2MError
from pjsua_hooks.phone import _rx_key
from tests.unit.test_review95 import _alices, _copy, _on_branch, _phone, _refused_482, _taken

HERS = "r2543-alice"


def _via(msg: sip.SipMessage, old: str, new: str) -> sip.SipMessage:
    via = msg.get("Via")
    assert via is not None and old in via, (via, old)
    return msg.replace("Via", via.replace(old, new, 1))


def _other_call_id(copy: sip.SipMessage) -> sip.SipMessage:
    assert copy.call_id.swapcase() != copy.call_id
    return copy.replace("Call-ID", copy.call_id.swapcase())


def _other_from_tag(copy: sip.SipMessage) -> sip.SipMessage:
    tag = copy.from_tag or ""
    assert tag.swapcase() != tag
    return copy.replace("From", (copy.get("From") or "").replace(f"tag={tag}",
                                                                 f"tag={tag.swapcase()}"))


def _zero_port(copy: sip.SipMessage) -> sip.SipMessage:
    return _via(copy, "127.0.0.1:5060", "127.0.0.1:05060")


def _quoted_cookie(copy: sip.SipMessage) -> sip.SipMessage:
    return _via(copy, f"branch={HERS}", 'branch="z9hG4bKhop97"')


def _dup_rport(copy: sip.SipMessage) -> sip.SipMessage:
    return _via(copy, ";branch=", ";rport;rport;branch=")


def _swallowed(real: sip.SipMessage, mutate) -> bool:
    """Whether ``real`` passes after the hop's ``mutate``d copy was taken (no 482)."""
    phone = _phone()
    copy = mutate(_copy(real, real.via_branch()))
    try:
        _rx_key(copy)
    except E2MError:
        return False        # fixed: ``_on_rx`` refuses it 400, pjsip never sees it
    _taken(phone, copy)
    return not _refused_482(phone, real)


# ---------------------------------------------------------- holes 1-4: an RFC 2543 peer

_2543 = {"call_id_case": _other_call_id, "from_tag_case": _other_from_tag,
         "port_leading_zero": _zero_port, "quoted_cookie_branch": _quoted_cookie}


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_control_the_2543_copy_as_alice_wrote_it_is_refused(method):
    real = _alices(method, branch=HERS)
    assert real.get("Via").startswith("SIP/2.0/UDP 127.0.0.1:5060;")
    assert not _swallowed(real, lambda c: c)


def test_control_a_2543_retransmission_and_another_transaction_are_taken():
    real = _alices("MESSAGE", branch=HERS)
    phone = _phone()
    _taken(phone, real)
    assert not _refused_482(phone, real)                    # the same octets again
    assert _swallowed(real, lambda c: c.replace("Call-ID", c.call_id + "x"))   # pjsip's too


def test_control_what_pjsip_reads_the_same_is_the_same_to_pjsip():
    """The four spellings are pjsip's own key for alice's (folded case, the port a
    number, a quoted branch no cookie).  Fixed (stop 36): ``_rx_key`` gives pjsip's
    key for the first three, and refuses the quoted branch (no token)."""
    real = _alices("MESSAGE", branch=HERS)
    for name, mutate in _2543.items():
        copy = mutate(_copy(real, HERS))
        if name == "quoted_cookie_branch":
            with pytest.raises(E2MError):
                _rx_key(copy)
        else:
            assert _rx_key(copy) == _rx_key(real), name
        assert (copy.cseq, copy.call_id.lower(), (copy.from_tag or "").lower()) == \
            (real.cseq, real.call_id.lower(), (real.from_tag or "").lower()), name


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_2543_copy_with_the_call_id_in_other_letters_is_not_refused(method):
    assert not _swallowed(_alices(method, branch=HERS), _other_call_id)


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_2543_copy_with_the_from_tag_in_other_letters_is_not_refused(method):
    assert not _swallowed(_alices(method, branch=HERS), _other_from_tag)


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_2543_copy_with_a_leading_zero_in_the_port_is_not_refused(method):
    assert not _swallowed(_alices(method, branch=HERS), _zero_port)


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_2543_copy_on_a_quoted_cookie_branch_is_not_refused(method):
    assert not _swallowed(_alices(method, branch=HERS), _quoted_cookie)


# ------------------------------------- hole 5: RFC 3261, a Via the core cannot read

def _alices_reinvite() -> sip.SipMessage:
    return _alices("INVITE", call_id="r97-hold@x", cseq=2, from_tag="a97", to_tag="b97")


def test_control_a_readable_via_with_rport_keys_as_rfc_3261():
    real = _alices_reinvite()
    once = _via(real, ";branch=", ";rport;branch=")
    assert _rx_key(once) == _rx_key(real) and _rx_key(real)[0] == "3261"
    assert not _swallowed(real, lambda c: _via(c, ";branch=", ";rport;branch="))
    with pytest.raises(E2MError):
        _dup_rport(real).via_branch()            # the core cannot read it; pjsip can


def test_hole_a_copy_with_a_via_the_core_cannot_read_is_not_refused():
    assert not _swallowed(_alices_reinvite(), _dup_rport)
