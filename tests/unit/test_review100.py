"""A fifty-...th attacker's review (December 2026) of af54be7: stop 36's phone and
core-parser fixes (review 97's: ``SipMessage.via_branch`` refuses a branch that is no
token or a parameter given twice; ``phone._rx_key`` builds pjsip's key "as pjsip looks
it up"), fresh eyes.  The core half: the phone's record keeping read without pjsua
(``E2MPhone`` built without an endpoint, as ``tests/unit/test_review95.py`` does).  The
same holes on a real ``e2m-phone`` (pjsua2 2.15): ``tests/pjsua/test_review100_phone.py``.

What pjsip reads that the core does not: pjsip's parser unescapes every ``%XX`` in a
header parameter's name and (unquoted) value (``parse_param_imp`` ->
``parser_get_and_unescape`` -> ``pj_str_unescape``: ``PJSIP_UNESCAPE_IN_PLACE`` is 0 by
default), the Via's (``int_parse_via_param``, ``pjsip_VIA_PARAM_SPEC``) and the From
tag's (``parse_hdr_fromto`` -> ``int_parse_param``) alike.  ``%`` is a token character
(RFC 3261 §25.1), so the core's ``via_branch`` (review 97: "a token") and ``from_tag``
take ``z9hG4bK%41bc`` as written: ``_rx_key`` keys ``z9hg4bk%41bc`` where pjsip keys
``z9hg4bkabc``.

Hole 1 (RFC 3261: every deployment, the top Via at bob is Kamailio's, with the cookie):

- attacker: an **untrusted hop** on the leg to bob's UDP phone (review 83's seat);
- messages: a bodiless copy of alice's MESSAGE (or INVITE) on her very branch with one
  character of it written ``%XX`` (``z9hG4bK%50j...`` for ``z9hG4bKPj...``; or the
  cookie's own ``z`` as ``%7A``), then hers;
- effect: ``_rx_key`` files the copy under another key (for ``%7A9hG4bK`` even an RFC 2543
  one), ``_one_content_per_transaction`` finds nothing taken: no 482.  pjsip unescapes,
  keys the copy by alice's branch, takes it and absorbs her real request as its
  retransmission - review 83/93/95/97's swallow back (run: the copy's 200 twice, bob
  shown the empty plaintext copy, her signed and sealed text never, no
  ``duplicate_refused``);
- at fault: ``e2m_plugins/sip.py`` ``SipMessage.via_branch`` lines 387-392 (the branch
  taken as written once it is a token) and ``pjsua_hooks/phone.py`` ``_rx_key`` line 346
  (``msg.transaction_branch()``);
- fix: refuse (400, in ``_on_rx``) a request whose top Via holds a ``%`` in any
  parameter name or in its branch (no stack we send through writes one: Kamailio's and
  pjsip's branches are alphanumerics, ``.`` and ``-``); or key the branch %-decoded as
  pjsip does (and decode names before ``parse_params``).

Hole 2 (the same seat and effect): the copy's top Via writes a decoy branch of the hop's
and then alice's under an escaped name, ``;branch=z9hG4bKdecoy100;br%61nch=<hers>``.  The
core reads one parameter ``branch`` (the decoy) and another named ``br%61nch``; pjsip
reads ``branch`` twice and keeps the last: alice's.  At fault: ``grammar.parse_param_list``
(names not %-decoded, so ``parse_params`` sees no repeat) via ``via_branch`` line 386;
fix: as hole 1 (a ``%`` in a Via parameter name is refused).

Hole 3 (an RFC 2543 peer, review 95/97's set-up: alice's branch has no cookie): the
copy's From tag with one character ``%XX``-escaped.  pjsip's 2543 key prints the From tag
as it parsed it (unescaped): alice's key; ``_rx_key`` line 351 keeps ``msg.from_tag`` as
written.  Fix: refuse a ``%`` in a From/To tag (400), or decode it as pjsip does.

Controls: each copy is well formed and read by the core (a token branch with the cookie,
a readable From tag); %-decoding it (what pjsip does) gives alice's very branch or tag;
the copy as alice wrote it is refused 482; a copy whose decoded branch differs from hers
(``%51`` for ``P``: ``Q``) is another transaction to pjsip as well, and taken.

What held (tried, not holes): a quoted branch, an empty ``branch=`` beside a real one and
``;rport`` twice are refused 400 (review 97's fix); a branch in brackets
(``branch=[z9hG4bK..]``, which pjsip's newer ``parse_param_imp`` unbrackets) is no token:
400; the method in other letters (``message``, ``Message``) keys the same in both (pjsip
folds the key; ``pjsip_method_init_np`` compares the six ids without case, never a
prefix); ``INVITE``/``ACK`` share the key, a CANCEL and a PRACK have their own in both;
the 2543 sent-by: IPv6 in brackets (pjsip strips them, the phone keeps them: one to one),
a port written ``:0`` or none (both 0), ``;received``/``;rport`` (not in either key),
compact ``v:``, a Via list in one header vs two headers (the first Via either way);
TCP keys as UDP in both (no transport in the key).  In the 2543 key pjsip separates
fields with ``$``, which a From tag may hold: a copy could move the split between tag
and Call-ID only when alice's own tag or Call-ID holds a ``$`` (pjsip's never do): not
kept.

Hole 4 (low: fail-closed, no state lost; the brief's "a stranger's message making a 500
instead of a defined answer"): an **off-path sender**'s request with ``Via: ;branch=x``
(no sent-protocol, no sent-by, a 2543 branch).  The core parses it; ``_rx_key`` line 350
(``"".split(None, 1)[-1]``) raises ``IndexError``, not an ``E2MError``, so ``_on_rx``'s
400 is skipped and the raw hook answers 500 (``rawhook.py`` line 369) and reports a hook
failure.  Fix: in ``_rx_key`` take the sent-by with a check (``parts = ....split(None, 1);
if len(parts) != 2: raise MalformedError``), or read the Via with a real parser.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

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


def _pjsip_reads(value: str) -> str:
    """What ``pj_str_unescape`` makes of a parameter's name or value."""
    return unquote(value)


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


def _pjsip_branch(msg: sip.SipMessage) -> str:
    """The top Via's branch as pjsip reads it: names and values %-decoded, the last
    ``branch`` wins (``int_parse_via_param``)."""
    via = (msg.get("Via") or "").split(",")[0]
    found = ""
    for part in via.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if _pjsip_reads(name).lower() == "branch" and value:
            found = _pjsip_reads(value)
    return found


# ------------------------------------------------------------------ controls

@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_control_the_escaped_copies_are_well_formed_and_pjsip_reads_alices_ids(method):
    real = _alices(method, branch=BRANCH)
    for index in (7, 0):
        copy = _escaped_branch(real, index)
        assert "%" in copy.via_branch()                      # the core reads a token
        assert _pjsip_branch(copy) == BRANCH == _pjsip_branch(real)
    named = _escaped_name(real)
    assert named.via_branch() == "z9hG4bKdecoy100"           # the core: the decoy
    assert _pjsip_branch(named) == BRANCH                    # pjsip: the last, hers
    r2543 = _alices(method, branch=HERS)
    tagged = _escaped_from_tag(r2543)
    assert tagged.from_tag != r2543.from_tag
    assert _pjsip_reads(tagged.from_tag or "") == r2543.from_tag


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_control_the_copy_as_alice_wrote_it_is_refused_482(method):
    for branch in (BRANCH, HERS):
        real = _alices(method, branch=branch)
        assert not _swallowed(real, _copy(real, real.via_branch()))


def test_control_a_copy_whose_decoded_branch_differs_is_another_transaction():
    """``%51`` is ``Q``, not alice's ``P``: another key to pjsip, taken as new here too."""
    real = _alices("MESSAGE", branch=BRANCH)
    other = _copy(real, BRANCH[:7] + "%51" + BRANCH[8:])
    assert _pjsip_branch(other) != BRANCH
    assert _swallowed(real, other)


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


@pytest.mark.xfail(strict=True, reason="review 100: off-path sender, 'Via: ;branch=x' makes "
                   "_rx_key raise IndexError: the hook's 500, not the defined 400")
def test_hole_a_via_without_sent_by_gets_an_unread_500_not_a_400():
    try:
        _rx_key(_bare_via())
    except E2MError:
        return                                   # _on_rx answers 400 Bad Request
    # (no exception would be a key for a Via pjsip cannot read either: not secure)
    pytest.fail("_rx_key keyed a Via without a sent-by")


# ------------------------------------------------------------------ hole 1

@pytest.mark.xfail(strict=True, reason="review 100: untrusted hop, a %-escaped copy of "
                   "alice's branch is another key to the phone, hers to pjsip: swallowed")
@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_copy_on_alices_branch_with_a_percent_escape_is_not_refused(method):
    real = _alices(method, branch=BRANCH)
    assert not _swallowed(real, _escaped_branch(real, 8))


@pytest.mark.xfail(strict=True, reason="review 100: untrusted hop, the cookie's z as %7A: "
                   "a 2543 key to the phone, alice's 3261 key to pjsip: swallowed")
@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_copy_with_the_cookie_percent_escaped_is_not_refused(method):
    real = _alices(method, branch=BRANCH)
    assert not _swallowed(real, _escaped_branch(real, 0))


# ------------------------------------------------------------------ hole 2

@pytest.mark.xfail(strict=True, reason="review 100: untrusted hop, ;branch=decoy;br%61nch="
                   "hers: the core keys the decoy, pjsip the last branch: swallowed")
@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_copy_with_alices_branch_under_an_escaped_name_is_not_refused(method):
    real = _alices(method, branch=BRANCH)
    assert not _swallowed(real, _escaped_name(real))


# ------------------------------------------------------------------ hole 3

@pytest.mark.xfail(strict=True, reason="review 100: untrusted hop, a 2543 copy with the From "
                   "tag %-escaped is pjsip's key for alice's, not the phone's: swallowed")
@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_2543_copy_with_a_percent_escaped_from_tag_is_not_refused(method):
    real = _alices(method, branch=HERS)
    assert not _swallowed(real, _escaped_from_tag(real))


def test_control_no_stack_of_ours_writes_a_percent_in_a_branch():
    """The fix (a ``%`` refused in a top Via's parameter names and branch) refuses no
    honest request: the core's own branches (``make_request``) hold none."""
    for _ in range(50):
        msg = sip.make_request("MESSAGE", "sip:bob@127.0.0.1", from_uri="sip:a@x",
                               to_uri="sip:b@x")
        assert re.fullmatch(r"z9hG4bK[A-Za-z0-9.\-]+", msg.via_branch())
        assert "%" not in (msg.from_tag or "")
