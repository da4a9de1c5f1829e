"""A sixty-eighth attacker's review (December 2026) of a000c40: the last fixes of review
67 (``git log 632f6c5~1..a000c40``), attacked: the digest ``uri`` bound to the
Request-URI, identity headers removed from replies, the nonce secret derived from the
proxy's key, case-sensitive AoRs in the registrar, and the body the phone re-serialises.

``test_hole_*`` xfail strictly on a000c40 (their assertion is the secure behaviour);
``test_control_*`` are the same flows without the attack (they pass).

Hole 1 (case-sensitive AoRs, the key cache's keeper): review 67 made AoRs
case-sensitive in the registrar, "as digest and the core read a user": ``Alice`` and
``alice`` are two users, two passwords, two certificates.  The proxy's key quota is not:
``proxy._keeper`` lower-cases the whole AoR (``str(identity).lower()``, written when one
user was meant to have one spelling), so every key ``Alice``'s signed requests offer
counts against ``alice``'s quota (``max_entries // KEEPER_SHARE``, 1,250 by default),
and past it ``MemoryKeyCache._trim_keeper`` (the Kamailio sweep's ``over_quota``
likewise) drops that group's oldest long-lived key: alice's live call's.

  Attacker: an insider UA holding account ``Alice`` (her own password and certificate
  for ``sip:Alice@example.com``) and an accomplice who answers her calls (or a second
  phone of hers).  Messages: ``Alice``'s signed INVITEs offering a key, each answered
  by a 200 sealed under it (CEK reuse): the proxy moves each key into its dialog for
  12 h, keeper ``sip:alice@example.com``.  Effect: once the quota is full, alice's live
  call's key goes; her next re-INVITE in it is answered 496 by her own proxy (and bob's
  bodies under it are unreadable).  The test scales the quota to 4; the default takes
  1,250 calls, well within a day of an insider's script.  Fix: a keeper spells the
  user part as digest and the registrar do (``identity_of`` with the host lower-cased
  and the user as written, after unescaping), i.e. ``_keeper`` must not lower-case the
  user part.

Tried, and held:
  - ``challenge.credentials_fit_request`` with escapes (``%62ob``), a scheme or host in
    another case, a default port, ``;transport=``: every one differs from ``$ou`` as a
    string and is refused (strict; a false refusal at worst, no target of the hop's);
  - two credentials of our realm, one naming the Request-URI and a decoy naming the
    proxy: both must fit (``all``), the decoy is then harmless as digest binds the
    method and the uri the check read;
  - a ``uri`` parameter spelt ``URI=`` or repeated: ``_digest_param`` finds it in any
    case, a repeated one is None (refused);
  - ``mime.as_read`` (target 5): a compact ``c`` part header is Content-Type to the
    core too; a space before a part header's colon is malformed (``_HEADER_NAME``); a
    folded part header is unfolded and written on one line; a quoted parameter holding
    ``;boundary=`` stays one quoted value; the fresh boundary is 128 random bits checked
    against every written part; a backslash in Content-Type parameters is refused;
  - the nonce secret (target 3; read, not run): HKDF over the private key with its own label and the
    host (no other derived key shares it); ``--print-cfg`` shows only the
    ``import_file`` path; the file is 0600, written O_EXCL|O_NOFOLLOW; a nonce from a
    node with another ``[auth] realm`` names that realm, and ``auth_check`` of ours
    finds no credentials of our realm (a new challenge).  Not a hole, noted: with
    ``--runtime-dir`` given, ``launcher._cleanup`` leaves ``auth-secret.cfg`` behind
    (its list of files omits it); it is 0600 beside the private key the same user
    holds, so nobody new reads it.

Fixed (stop 32): ``proxy._keeper`` folds the host only (case, parameters) and keeps
the user part as written, so ``Alice``'s keys count against her own quota (the hole
turned XPASS, the marker is gone).  The file review 68 noted as left behind with
``--runtime-dir`` is now removed at exit with the other runtime files.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import TRUSTED, proxy_engine
from e2m_plugins.challenge import credentials_fit_request
from e2m_plugins.keycache import MemoryKeyCache
from e2m_plugins.testpki import init_test_pki
from tests.unit.test_review12 import SDP_VIEW, _call, _reinvite_in_live_call, _ua

QUOTA = 4          # max_per_keeper, scaled down from max_entries // KEEPER_SHARE (1,250)


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,),
                         users=("alice", "bob", "Alice", "carol", "mallory"), key_type="ec")


def _live_call_then_flood(world, attacker: str, calls: int):
    """alice is in a call with bob (her key kept for the dialog); ``attacker`` then
    places ``calls`` calls to mallory, each answered under her offer key.  The proxy's
    verdict on alice's re-INVITE in her live call."""
    now = [1000.0]
    cache = MemoryKeyCache(max_per_keeper=QUOTA, clock=lambda: now[0])
    proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=cache)
    alice, bob = _ua(world, "alice", "bob"), _ua(world, "bob", "alice")
    _call(world, proxy, alice, bob, "alice", "bob", "r68-live@x", to_tag="c1")
    now[0] += 300                     # the call runs; its early copy has expired
    caller, accomplice = _ua(world, attacker, "mallory"), _ua(world, "mallory", attacker)
    for n in range(calls):
        _call(world, proxy, caller, accomplice, attacker, "mallory", f"r68-flood{n}@x",
              to_tag=f"m{n}", from_tag=f"f{n}")
    return _reinvite_in_live_call(world, proxy, alice, "alice", "bob", "r68-live@x")


def test_hole_user_Alice_evicts_alices_live_call_key(world):
    verdict = _live_call_then_flood(world, "Alice", QUOTA + 2)
    assert verdict.action == "forward", \
        f"alice's re-INVITE after Alice's calls: {verdict.code} {verdict.reason} ({verdict.detail})"


def test_control_another_user_calling_as_much_leaves_alices_key(world):
    """carol, a user whose name is not alice's in another case, places as many calls:
    her quota is her own, and alice's re-INVITE is read."""
    verdict = _live_call_then_flood(world, "carol", QUOTA + 2)
    assert verdict.action == "forward", f"{verdict.code} {verdict.reason}"


def test_control_alice_and_Alice_are_two_signers(world):
    """The set-up is sound: Alice's calls are signed as ``sip:Alice@example.com`` and
    read by the proxy (``_call`` asserts the 200 under her key was read), and alice's
    live call alone is refreshed fine."""
    verdict = _live_call_then_flood(world, "Alice", 0)
    assert verdict.action == "forward"


@pytest.mark.parametrize("uri", [
    "sip:%62ob@example.com", "SIP:bob@example.com", "sip:bob@EXAMPLE.com",
    "sip:bob@example.com:5060", "sip:bob@example.com;transport=udp",
    "sip:bob@example.com;maddr=192.0.2.9",
])
def test_control_credentials_for_another_spelling_do_not_fit(uri):
    """Held: the digest ``uri`` is compared with the Request-URI as received, octet for
    octet; any other spelling is refused (a false refusal at worst)."""
    creds = (f'Digest username="alice", realm="example.com", nonce="n1", uri="{uri}", '
             f'response="0123456789abcdef0123456789abcdef", qop=auth, nc=00000001, '
             f'cnonce="c1"')
    assert not credentials_fit_request([creds], "example.com", "sip:bob@example.com")


def test_control_as_read_writes_one_boundary_and_expands_a_compact_type():
    """Held (core side of target 5): a part typed by a compact ``c`` header is written
    back as ``Content-Type: application/sdp``; a quoted parameter holding
    ``;boundary=y`` and a part parameter holding ``--e2m-`` stay quoted values, and the
    multipart gets one fresh boundary, last, that no part contains.  (pjsip's own
    reading of the result is review 59/62's phone test; not re-run here.)"""
    from e2m_plugins import mime
    raw = (b'--x\r\nc: application/sdp\r\n\r\nv=0\r\n'
           b'--x\r\nContent-Type: text/plain; a="--e2m-;boundary=y"\r\n\r\nhi\r\n--x--\r\n')
    part = mime.MimePart((("Content-Type", 'multipart/mixed; foo="q;boundary=y"; boundary=x'),),
                         raw)
    out = mime.as_read(part)
    boundary = out.content_type.param("boundary")
    assert [n for n, _ in out.content_type.params] == ["foo", "boundary"]
    assert boundary.startswith("e2m-") and out.body.count(f"--{boundary}".encode()) == 3
    children = mime.parse_multipart(out)
    assert [c.content_type.mime_type for c in children] == ["application/sdp", "text/plain"]
    assert children[0].headers == (("Content-Type", "application/sdp"),)
