"""A fifty-...th attacker's review (December 2026) of 13d9573 (the ninety-fifth): this
stop's phone and UA fixes (reviews 92, 93) and small hardening, fresh eyes.  The core
half: the phone's record keeping read without pjsua (``E2MPhone`` built without an
endpoint, as ``tests/unit/test_review93.py`` does) and ``privatefiles``.  The phone half
on a real ``e2m-phone`` is ``tests/pjsua/test_review95_phone.py``.

Hole 1 (``test_hole_a_copy_on_alices_branch_in_other_letters_is_not_refused``):

- attacker: an **untrusted hop** on the leg to bob's UDP phone (review 83's seat);
- messages: a bodiless copy of alice's signed, sealed MESSAGE (or INVITE) whose top
  Via branch is hers in other letters (``z9hG4bK`` + the rest upper-cased), then her
  real one;
- effect: pjsip keys a server transaction case-insensitively (``pjsip_tsx_create_key``
  then ``pj_hash_get_lower``: the key's hash and comparison fold case), so the copy
  and alice's request are one transaction: pjsua takes the copy, alice's real request
  is absorbed as its retransmission (she gets the copy's 200).  ``phone._rx_key``
  keys by the branch as written, so ``_one_content_per_transaction`` sees two
  transactions and refuses nothing: review 93's swallow is back (no 482, bob not told);
- at fault: ``pjsua_hooks/phone.py`` ``_rx_key`` (lines 348-349, the 3261 key holds
  ``branch`` as written);
- fix: fold the branch's case in the key (``branch.lower()``), as pjsip's hash does.

Hole 2 (``test_hole_a_copy_with_the_cookie_in_other_case_is_not_refused``): the same
with the cookie itself in other case (``Z9HG4BK`` + alice's rest).  pjsip reads the
cookie with ``pj_strnicmp`` (RFC 3261 transaction, its key the branch, case folded):
the same transaction as alice's.  ``_rx_key`` tests ``branch.startswith("z9hG4bK")``
(case-sensitive, line 348) and files the copy as an RFC 2543 one (Call-ID, CSeq, what,
branch): no 482.  Fix: test the cookie case-insensitively, and key on the folded
branch.

Hole 3 (``test_hole_a_2543_copy_on_another_branch_is_not_refused``): alice is an RFC
2543 peer (a branch without the cookie, e.g. a legacy UA straight to bob).  The hop's
bodiless copy carries the same Call-ID, CSeq, From tag and Via sent-by, but another
branch.  pjsip's RFC 2543 key (``create_tsx_key_2543``) is the CSeq method (INVITE and
ACK together), CSeq number, From tag, Call-ID and the top Via's sent-by: no branch.  The
copy and alice's request are one transaction to pjsip; ``_rx_key``'s 2543 key holds the
branch (and no From tag or sent-by): two, no 482.  Fix: key an RFC 2543 request as
``create_tsx_key_2543`` does (method, CSeq number, From tag, Call-ID, sent-by).

Hole 4 (``test_hole_a_root_key_another_user_reads_through_an_acl_is_taken``):

- attacker: a local user named in a POSIX ACL of the proxy's key (review 73's "what
  anyone on the machine may read is no longer a secret");
- set-up: ``root:<daemon group> 0640`` (the form this stop accepts) plus an ACL entry
  ``user:<eve>:r--``: ``st_mode`` shows the ACL mask in the group bits, still
  ``0640``;
- effect: ``read_private_file`` takes the key, and eve reads it (run as her uid);
- at fault: ``e2m_plugins/privatefiles.py`` ``_check`` (lines 36-39: the root branch reads only
  ``st_mode``; with an ACL the group bits are the mask, not the owning group's);
- fix: refuse a file with an extended ACL (``system.posix_acl_access`` holding more
  than the three base entries), as the owner's own 0600 case refuses any mask bit.

Hole 5 (``test_hole_a_second_copy_of_an_answer_on_alices_branch_leaves_a_phantom_key``),
the answer to the brief's "a 496 on alice's real branch from a hop: what may it teach?":

- attacker: an **untrusted hop** on alice's leg (it sees her branch); no forging
  beyond bob's public certificate - or nobody: bob's (or a proxy's 496) retransmitted
  final answer when alice's ACK is lost;
- messages: while alice's hold re-INVITE (CSeq 2) waits, a 493 on her very branch
  with bob's certificate; the phone reacts, pjsua sends the retry (CSeq 3); then the
  same 493 again (a copy), then bob's real 200 to CSeq 3;
- effect: ``phone._keep_reaction`` queues every copy (``_update_reactions``, line
  736, no transaction check: pjsip absorbs the copy as a retransmission) and
  ``_react_in_dialog`` calls ``UAEngine.react`` for each; each passes ``_sent_for`` and
  ``_answers`` (the answer is truly to CSeq 2), and ``react`` protects a "retry" CSeq 3
  that is never sent (line 1294), offering a fresh key after the one pjsua's CSeq 3
  really carried; bob's 200 to CSeq 3 confirms the phantom, alice's next re-INVITE
  (CSeq 4: unhold) goes under a key bob never had: ``NoMatchingRecipientError`` at bob
  (493), a live call's next request refused and an E2M retry spent - review 92's hole
  2 back with the real branch;
- at fault: ``e2m_plugins/ua.py`` ``react`` (``retry = self.protect(next_attempt(
  request))``: state kept for a message the caller may not send; a second answer to a
  transaction already reacted to is followed again) and ``pjsua_hooks/phone.py``
  ``_keep_reaction`` (no once-per-transaction);
- fix: follow one E2M answer per transaction (mark ``_sent`` answered, as pjsip does),
  and let ``protect`` of the request the stack really sends offer the retry's key (the
  engine offers nothing inside ``react``: review 92's suggested fix).

Controls: a copy on alice's branch as written is refused 482; the same octets again,
a CANCEL and an ACK on her INVITE's branch, a new branch, a re-INVITE, a request
after a 401 with a new branch and CSeq, a peer writing the cookie ``Z9HG4BK`` (its own
retransmission), an RFC 2543 peer's retransmission: all taken.  The root key without
an ACL is taken, with 0644 refused, and the ACL truly lets the named user read (run as
her uid).  One 493 on alice's branch, reacted to once, and the retry work: her next
re-INVITE opens at bob.

Tried and held (read, run, and the controls):

- (run, the phone) a copy with the method in lower case (``message``, ``Message``) on
  alice's branch: pjsip answers nothing and makes no transaction, hers is shown;
- (run, the phone) a copy on a branch of its own: pjsip answers her real one 482 itself
  (a merged request), so only the case-folded spellings are holes;
- ``UAEngine.react`` on a single forged answer on alice's real branch: a
  496 teaches only a proxy ``accepts_proxy`` already accepts, with a certificate
  chained to our anchors for that host and not the pinned one replaced; a 495 only
  makes us sign; a 493 only a certificate of the To's AoR that is not older than the
  one held (``_refuse_older``) - each costs one of ``MAX_RETRIES_PER_CALL`` and retires
  the offered key, which is what dropping the answer does too (a hop can always drop);
  a case variant of the branch, another CSeq or method: ``none`` (``_sent_key``
  exact, ``_answers``);
- ``cert_route.on_reply``: the reply's ids come from the same parser as the NOTIFY's
  stored ``$ci|$ft|$tt``; the subscription is then found by SQL equality of each id
  (``cert_table.confirm``): without a ``|`` equal strings are equal ids, and no other
  separator joins them; the stored value is keyed by our own Via branch, which tm
  matched;
- ``launcher.kamailio_environment``: only ``E2M_OWNER_PASSWORD`` is taken out; the
  nodes' own database password is in Kamailio's settings by design (it writes the
  archive), the other variables are the operator's;
- a symlink or a hard link to the key: ``read_private_file`` opens ``O_NOFOLLOW``
  and checks the opened inode (``fstat``); a hard link is the same inode with the same
  mode, owner and ACL (``fs.protected_hardlinks`` keeps a user from linking root's).

Fixed (stop 35): the phone keys a received transaction exactly as pjsip does
(``phone._rx_key``: an RFC 3261 branch with its cookie in any case, lower-cased, and
the method; an RFC 2543 one by method, CSeq number, From tag, Call-ID and sent-by); a
root-owned key with a POSIX access ACL is refused (``privatefiles._has_acl``); and
``UAEngine.react`` follows one E2M answer per request (the request's record is spent
by the first).
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
from collections import OrderedDict, deque
from pathlib import Path

import pytest

from e2m_plugins import privatefiles, sip
from e2m_plugins.privatefiles import PrivateFileError, read_private_file
from pjsua_hooks.phone import E2MPhone, _bounded_put_aged, _rx_key, handed_digest
from pjsua_hooks.rawhook import RxReject

ALICE, BOB = "sip:alice@example.com", "sip:bob@example.com"


def _phone() -> E2MPhone:
    phone = E2MPhone.__new__(E2MPhone)          # only the record keeping, no pjsua
    phone._rx_tsx = OrderedDict()
    phone._rx_info = OrderedDict()
    phone._call_security = {}
    phone._pending_errors = deque()
    return phone


def _taken(phone: E2MPhone, msg: sip.SipMessage, now: float = 0.0) -> None:
    """What ``_on_rx`` does with a request it hands on unchanged (an ACK is never
    keyed)."""
    if msg.method == "ACK":
        return
    handed = handed_digest(msg.serialize())
    phone._one_content_per_transaction(msg, _rx_key(msg), msg.method, handed, now)
    _bounded_put_aged(phone._rx_tsx, _rx_key(msg), handed, now)


def _refused_482(phone: E2MPhone, msg: sip.SipMessage) -> bool:
    try:
        _taken(phone, msg, 0.1)
    except RxReject as exc:
        return exc.code == 482
    return False


def _alices(method: str = "MESSAGE", branch: str | None = None, **kw) -> sip.SipMessage:
    body, ctype = (b"hi", "text/plain") if method == "MESSAGE" else (b"v=0\r\n", "application/sdp")
    msg = sip.make_request(method, "sip:bob@127.0.0.1:5070", from_uri=ALICE, to_uri=BOB,
                           body=body, content_type=ctype, **kw)
    return _on_branch(msg, branch) if branch is not None else msg


def _on_branch(msg: sip.SipMessage, branch: str) -> sip.SipMessage:
    via = msg.get("Via")
    assert via is not None
    return msg.replace("Via", via.replace(msg.via_branch(), branch))


def _copy(real: sip.SipMessage, branch: str) -> sip.SipMessage:
    """The hop's bodiless copy of ``real`` (same Call-ID, From tag, CSeq, sent-by) on
    ``branch``."""
    copy = _on_branch(real.with_body(b"").remove("Content-Type"), branch)
    assert (copy.call_id, copy.cseq, copy.from_tag) == (real.call_id, real.cseq, real.from_tag)
    return copy


def _other_letters(branch: str) -> str:
    assert branch.startswith("z9hG4bK")
    other = branch[:7] + branch[7:].swapcase()
    assert other != branch and other.lower() == branch.lower()
    return other


# -------------------------------------------------------- hole 1: the branch in other letters

@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_copy_on_alices_branch_in_other_letters_is_not_refused(method):
    phone, real = _phone(), _alices(method, branch="z9hG4bKr95cafe.abc1")
    _taken(phone, _copy(real, _other_letters(real.via_branch())))
    assert _refused_482(phone, real)


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_hole_a_copy_with_the_cookie_in_other_case_is_not_refused(method):
    phone, real = _phone(), _alices(method)
    branch = real.via_branch()
    _taken(phone, _copy(real, "Z9HG4BK" + branch[7:]))
    assert _refused_482(phone, real)


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE"])
def test_control_the_copy_on_alices_branch_as_written_is_refused(method):
    phone, real = _phone(), _alices(method, branch="z9hG4bKr95cafe.abc1")
    _taken(phone, _copy(real, real.via_branch()))
    assert _refused_482(phone, real)


def test_control_legitimate_requests_on_and_beside_a_taken_branch_are_taken():
    """Nothing legitimate is refused: the same octets again (a retransmission, also
    from a peer writing the cookie ``Z9HG4BK``), a CANCEL and a non-2xx ACK on the
    INVITE's branch, a re-INVITE, a request after a 401 with a new branch and CSeq."""
    phone = _phone()
    invite = _alices("INVITE")
    _taken(phone, invite)
    assert not _refused_482(phone, invite)                       # retransmission
    branch = invite.via_branch()
    cancel = sip.make_request("CANCEL", "sip:bob@127.0.0.1:5070", from_uri=ALICE, to_uri=BOB,
                              call_id=invite.call_id, cseq=invite.cseq[0],
                              from_tag=invite.from_tag)
    assert not _refused_482(phone, _on_branch(cancel, branch))
    ack = sip.make_request("ACK", "sip:bob@127.0.0.1:5070", from_uri=ALICE, to_uri=BOB,
                           call_id=invite.call_id, cseq=invite.cseq[0],
                           from_tag=invite.from_tag, to_tag="bobs")
    assert not _refused_482(phone, _on_branch(ack, branch))
    again = _alices("INVITE", call_id=invite.call_id, cseq=invite.cseq[0] + 1,
                    from_tag=invite.from_tag)                    # after a 401: new branch
    assert again.via_branch() != branch and not _refused_482(phone, again)
    reinvite = _alices("INVITE", call_id=invite.call_id, cseq=invite.cseq[0] + 2,
                       from_tag=invite.from_tag, to_tag="bobs")
    assert not _refused_482(phone, reinvite)
    upper = _alices("MESSAGE")
    upper = _on_branch(upper, "Z9HG4BK" + upper.via_branch()[7:])
    _taken(phone, upper)
    assert not _refused_482(phone, upper)


# ------------------------------------------------------------ hole 3: an RFC 2543 peer

def test_hole_a_2543_copy_on_another_branch_is_not_refused():
    phone, real = _phone(), _alices("MESSAGE", branch="r2543-1")
    _taken(phone, _copy(real, "r2543-2"))
    assert _refused_482(phone, real)


def test_control_a_2543_peers_retransmission_and_copy_on_its_branch():
    phone, real = _phone(), _alices("MESSAGE", branch="r2543-1")
    _taken(phone, real)
    assert not _refused_482(phone, real)                       # the same octets again
    phone = _phone()
    _taken(phone, _copy(real, "r2543-1"))
    assert _refused_482(phone, real)                           # its own branch: 482


# ---------------------------------------------------- hole 4: a root key read through an ACL

_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
EVE = 65534          # nobody: the local user the ACL names
DAEMON = 4242        # the daemon's uid and group (kamailio)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.fixture
def root_key(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a root-owned key")
    key = tmp_path / "proxy.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nr95\n-----END PRIVATE KEY-----\n")
    os.chown(key, 0, DAEMON)
    os.chmod(key, 0o640)
    return key


def _as_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(privatefiles.os, "geteuid", lambda: DAEMON)


def _with_eve_acl(key: Path) -> None:
    try:
        os.setxattr(key, "system.posix_acl_access", _acl(
            (_ACL_USER_OBJ, 6, _NO_ID), (_ACL_USER, 4, EVE), (_ACL_GROUP_OBJ, 4, _NO_ID),
            (_ACL_MASK, 4, _NO_ID), (_ACL_OTHER, 0, _NO_ID)))
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs here: {exc}")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o640


def _eve_reads(key: Path) -> bool:
    os.chmod(key.parent, 0o755)
    for parent in key.parents:          # eve must reach it (pytest's dirs are 0700)
        if parent == Path("/tmp") or parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
    # the system's interpreter: a clone's venv may sit in a dir eve cannot enter
    done = subprocess.run(["/usr/bin/python3", "-c", f"open({str(key)!r}, 'rb').read()"],
                          user=EVE, group=EVE, extra_groups=[], capture_output=True,
                          timeout=10)
    return done.returncode == 0


def test_hole_a_root_key_another_user_reads_through_an_acl_is_taken(root_key, monkeypatch):
    _with_eve_acl(root_key)
    assert _eve_reads(root_key)                    # the effect: eve reads the key
    _as_daemon(monkeypatch)
    with pytest.raises(PrivateFileError):
        read_private_file(root_key, "proxy key")


def test_control_a_root_key_of_the_daemons_group_is_taken_0644_refused(root_key,
                                                                       monkeypatch):
    assert not _eve_reads(root_key)                # no ACL: eve cannot read it
    _as_daemon(monkeypatch)
    assert b"r95" in read_private_file(root_key, "proxy key")
    os.chmod(root_key, 0o644)
    with pytest.raises(PrivateFileError):
        read_private_file(root_key, "proxy key")


def test_control_our_own_key_with_the_same_acl_is_refused(root_key, monkeypatch):
    """The same ACL on a key the daemon owns 0600 shows as 0640 (the mask) and is
    refused: only the root branch lets the mask through."""
    os.chown(root_key, DAEMON, DAEMON)
    os.chmod(root_key, 0o600)
    _with_eve_acl(root_key)
    _as_daemon(monkeypatch)
    with pytest.raises(PrivateFileError):
        read_private_file(root_key, "proxy key")


# ----------------------------------------- hole 5: one answer on alice's branch, twice

def _reinvite_answered_493(world, call_id: str, copies: int):
    """alice and bob in an SRTP call (alice's key reused by bob's 200); alice's
    re-INVITE CSeq 2 is answered 493 on her own branch (bob's public certificate) and
    the phone reacts (``_keep_reaction`` -> ``_react_in_dialog`` -> ``react``); pjsua
    sends the retry as CSeq 3 (``_on_tx`` -> ``protect``); then ``copies - 1`` more
    copies of the same 493 reach the hook (a retransmission for a lost ACK, or the hop's
    replay) and are reacted to as well; bob answers CSeq 3 with 200 under its key, then
    alice's CSeq 4 re-INVITE: what bob's engine makes of it."""
    from cryptography.hazmat.primitives import serialization

    from e2m_lab.flows import SRTP_ANSWER, SRTP_OFFER, answer, invite, reinvite, ua_engine
    from e2m_plugins.sip import make_response
    alice = ua_engine(world, "alice", peers=("bob",))
    bob = ua_engine(world, "bob", peers=("alice",))
    first = invite(world, call_id=call_id, sdp=SRTP_OFFER)
    alice.open(bob.protect(answer(bob.open(alice.protect(first).message).message,
                                  SRTP_ANSWER)).message)
    plain2 = reinvite(world, "alice", "bob", call_id, 2, "a1", "b1", sdp=SRTP_OFFER)
    sent2 = alice.protect(plain2).message
    cert = world.user("bob").cert.public_bytes(serialization.Encoding.DER)
    r493 = make_response(sent2, 493, "Undecipherable", [], cert, "application/pkix-cert")
    assert r493.via_branch() == sent2.via_branch() and alice._sent_for(r493) is not None
    alice.open(r493)
    assert alice.react(r493, plain2).action == "retry"
    sent3 = alice.protect(reinvite(world, "alice", "bob", call_id, 3, "a1", "b1",
                                   sdp=SRTP_OFFER)).message
    for _ in range(copies - 1):
        alice.open(r493)
        alice.react(r493, plain2)
    ok3 = bob.protect(answer(bob.open(sent3).message, SRTP_ANSWER))
    assert ok3.info.key_reuse
    alice.open(ok3.message)
    sent4 = alice.protect(reinvite(world, "alice", "bob", call_id, 4, "a1", "b1",
                                   sdp=SRTP_OFFER)).message
    return bob.open(sent4)


@pytest.fixture(scope="module")
def world():
    from e2m_plugins.testpki import init_test_pki
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


def test_control_one_493_on_alices_branch_and_the_retry_work(world):
    opened = _reinvite_answered_493(world, "r95-one@x", copies=1)
    assert opened.info.encrypted and b"a=crypto" in opened.message.body


def test_hole_a_second_copy_of_an_answer_on_alices_branch_leaves_a_phantom_key(world):
    from e2m_plugins.errors import E2MError
    try:
        opened = _reinvite_answered_493(world, "r95-two@x", copies=2)
    except E2MError as exc:
        pytest.fail(f"bob refused alice's next re-INVITE: {type(exc).__name__}: {exc}")
    assert b"a=crypto" in opened.message.body
