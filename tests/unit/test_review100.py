"""A fifty-...th attacker's review (December 2026) of af54be7: stop 36's phone and
core-parser fixes (review 97's: ``SipMessage.via_branch`` refuses a branch that is no
token or a parameter given twice; ``phone._rx_key`` builds pjsip's key "as pjsip looks
it up"), fresh eyes.  The core half: the phone's record keeping read without pjsua
(``E2MPhone`` built without an endpoint, as ``tests/unit/test_review95.py`` does).  The
real ``e2m-phone`` (pjsua2 2.15): ``tests/pjsua/test_review100_phone.py``.

No hole found.  One robustness finding, not a hole (no effect on the real phone):

- an **off-path sender**'s request whose top Via is ``Via: ;branch=x`` (no
  sent-protocol, no sent-by, no cookie): the core parses it and reads the branch;
  ``_rx_key`` takes the RFC 2543 path and line 350
  (``via.partition(";")[0].split(None, 1)[-1]``) indexes an empty list: ``IndexError``,
  not an ``E2MError``, so ``_on_rx``'s 400 (line 626) is skipped and the raw hook's
  catch-all (``rawhook.py`` line 366) would answer 500.  On the real phone (run,
  ``tests/pjsua/test_review100_phone.py``) neither form, nor ``SIP/2.0/UDP ;branch=x``,
  is answered at all (no sent-by to answer to) and the phone serves on: no effect an
  attacker gains.  Suggested all the same: ``parts = ....split(None, 1)``; ``if
  len(parts) != 2: raise MalformedError("Via without a sent-by")``.

Control: the stranger's request parses and its branch is read (``_on_rx`` reaches
``_rx_key``); a Via with a sent-protocol and an empty sent-by is ``MalformedError``.

What held (tried, not holes; the %-escapes also on the real phone):

- ``%XX`` in the top Via's branch (``z9hG4bK%50j...``; the cookie's own ``z`` as
  ``%7A``, which the core reads as an RFC 2543 branch) or a decoy branch first with
  alice's under an escaped name (``;branch=z9hG4bKdecoy100;br%61nch=<hers>``): the core
  keys each copy apart from alice's request, and so does pjsip 2.15 (it keys the
  parameter as written, no unescaping on this path): pjsip takes the copy and refuses her
  real request itself as a merged request (482, RFC 3261 §8.2.2.2) - she hears it failed,
  nothing is absorbed; the same for an RFC 2543 peer's copy with a %-escaped From tag
  (pjsip shows her MESSAGE);
- a quoted branch, an empty ``branch=`` beside a real one and ``;rport`` twice: 400
  (review 97's fix); a bracketed branch (``branch=[z9hG4bK..]``) is no token: 400;
- the method in other letters (``message``, ``Message``): one key in both (pjsip folds
  the key; ``pjsip_method_init_np`` matches the six ids without case, never a prefix);
  INVITE and ACK share a key, CANCEL and PRACK have their own in both;
- the 2543 sent-by: IPv6 in brackets (pjsip strips them, the phone keeps them: one to
  one), a port written ``:0`` or none (0 in both), ``;received``/``;rport`` (in neither
  key), compact ``v:``, a Via list in one header or in two (the first Via either way);
  TCP keys as UDP in both (no transport in the key);
- pjsip's 2543 key joins fields with ``$``, which a From tag may hold: a copy could move
  the split between tag and Call-ID only when alice's own tag or Call-ID holds a ``$``
  (pjsip's and Kamailio's never do): not kept;
- the stricter ``via_branch`` elsewhere: the proxy's ``message_scope`` (bottom Via) raises
  ``MalformedError`` inside ``inspect``, which answers a request with the error table's
  400 and forwards a response with ``error`` set (never a 500); ``UAEngine._answers``,
  ``dialog_keys._transaction`` and ``phone._tx_key`` catch it.
"""

from __future__ import annotations

import re

import pytest

from e2m_plugins import sip
from e2m_plugins.errors import E2MError
from pjsua_hooks.phone import _rx_key
from tests.unit.test_review95 import _alices, _copy, _phone, _refused_482, _taken

HERS = "r2543-alice"          # an RFC 2543 peer's branch (no cookie)
BRANCH = "z9hG4bKPjr100cafe.abc1"


def _esc(text: str, index: int) -> str:
    """``text`` with its character at ``index`` written as ``%XX`` (RFC 3261 escaped)."""
    return f"{text[:index]}%{ord(text[index]):02X}{text[index + 1:]}"


def _via(msg: sip.SipMessage, old: str, new: str) -> sip.SipMessage:
    via = msg.get("Via")
    assert via is not None and old in via, (via, old)
    return msg.replace("Via", via.replace(old, new, 1))


def _swallowed(real: sip.SipMessage, copy: sip.SipMessage) -> bool:
    """Whether ``real`` passes after the hop's ``copy`` was taken (no 482)."""
    phone = _phone()
    try:
        _rx_key(copy)
    except E2MError:
        return False        # refused 400 by ``_on_rx``: pjsip never sees it
    _taken(phone, copy)
    return not _refused_482(phone, real)


def _escaped_branch(real: sip.SipMessage, index: int = 7) -> sip.SipMessage:
    branch = real.via_branch()
    return _copy(real, _esc(branch, index))


def _escaped_name(real: sip.SipMessage) -> sip.SipMessage:
    branch = real.via_branch()
    return _via(_copy(real, branch), f";branch={branch}",
                f";branch=z9hG4bKdecoy100;br%61nch={branch}")


def _escaped_from_tag(real: sip.SipMessage) -> sip.SipMessage:
    copy = _copy(real, real.via_branch())
    tag = copy.from_tag or ""
    return copy.replace("From", (copy.get("From") or "").replace(f"tag={tag}",
                                                                 f"tag={_esc(tag, 0)}"))


# ------------------------------------------------------------------ controls

@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_control_the_copy_as_alice_wrote_it_is_refused_482(method):
    for branch in (BRANCH, HERS):
        real = _alices(method, branch=branch)
        assert not _swallowed(real, _copy(real, real.via_branch()))


def _bare_via() -> sip.SipMessage:
    real = _alices("MESSAGE", branch=HERS)
    return sip.parse(real.replace("Via", f";branch={HERS}").serialize(), exact=True)


def test_control_a_via_without_sent_by_is_read_by_the_core():
    """The stranger's request parses (the core reads no Via grammar beyond its
    parameters) and its branch is a token: ``_on_rx`` goes on to ``_rx_key``."""
    bare = _bare_via()
    assert bare.via_branch() == HERS and bare.transaction_branch() is None
    with pytest.raises(E2MError):                 # a Via with a sent-protocol but no host
        _rx_key(sip.parse(_alices("MESSAGE", branch=HERS).replace(
            "Via", f"SIP/2.0/UDP ;branch={HERS}").serialize(), exact=True))
    # fixed (stop 36): no sent-by at all is a MalformedError too, so ``_on_rx`` answers
    # 400 (it was an IndexError: the hook's catch-all 500)
    with pytest.raises(E2MError):
        _rx_key(bare)


# ------------------------------------------------------------------ what held

@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_control_percent_escaped_copies_are_another_transaction_here_as_in_pjsip(method):
    """The core keys a %-escaped branch (or parameter name, or 2543 From tag) as written,
    as pjsip 2.15 does (run: ``tests/pjsua/test_review100_phone.py``): each copy is a
    transaction of its own, alice's real request is not refused 482 here and pjsip
    answers it itself (482, a merged request): never absorbed."""
    real = _alices(method, branch=BRANCH)
    for copy in (_escaped_branch(real, 8), _escaped_branch(real, 0), _escaped_name(real)):
        assert "%" in copy.get("Via")
        assert _swallowed(real, copy)
    assert _escaped_branch(real, 0).transaction_branch() is None      # a 2543 key
    assert _escaped_name(real).via_branch() == "z9hG4bKdecoy100"
    r2543 = _alices(method, branch=HERS)
    assert _swallowed(r2543, _escaped_from_tag(r2543))
