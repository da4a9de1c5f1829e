"""Review 25 (attacker's review of the phone and the UA engine), in process: the UA
engine of bob's phone opens each copy, then ``FirstCopy`` (what ``E2MPhone._on_rx``
does, ``_only_once``) decides whether it is delivered.  The wire form, on a real
``e2m-phone``: ``tests/pjsua/test_review25_phone.py``.

The phone tells a new MESSAGE or initial INVITE from an in-dialog request with a regular
expression over the raw To header (``;tag=`` after the first ``>``: ``firstcopy._to_tagged``,
``phone._to_tag``); the core and pjsip parse the header.  A To display name or a quoted
header parameter that holds ``>;tag=`` (or ``;tag=``) is a tag to the first and none to
the others, and the signed SIP context binds neither (only the To AoR and the To tag).

``test_hole_*`` was a strict xfail on ``2ddf22c`` and passes since ``FirstCopy`` reads
``SipMessage.to_tag``; ``test_control_*``: the same flows without the odd To header.
"""

from __future__ import annotations

import pytest

from e2m_lab.flows import ua_engine
from e2m_plugins import sip
from e2m_plugins.testpki import init_test_pki
from e2m_plugins.ua import next_attempt
from pjsua_hooks.firstcopy import Duplicate, FirstCopy

ODD_TOS = ('"x>;tag=1" <{uri}>',              # a display name
           '<{uri}>;foo="a;tag=1"')             # a quoted header parameter


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, users=("alice", "bob"), key_type="ec")


def _challenged_and_real(world, method: str = "MESSAGE"):
    """alice's first attempt (CSeq 1, refused 407 by her proxy) and her digest retry
    (CSeq 2, another branch), each protected for its own CSeq, as her phone sends them."""
    alice = ua_engine(world, "alice", peers=("bob",))
    plain = sip.make_request(method, world.aor("bob"), from_uri=world.aor("alice"),
                             to_uri=world.aor("bob"), body=b"pay carol 10 euros",
                             content_type="text/plain")
    return alice.protect(plain).message, alice.protect(next_attempt(plain)).message


def _bob_takes(bob, seen: FirstCopy, message: sip.SipMessage) -> sip.SipMessage:
    """What bob's phone does with a request: the engine opens it (signature, binding,
    replay), then FirstCopy; returns what pjsua would be given (Duplicate: 482)."""
    opened = bob.open(message)
    seen.check(message, opened.message, opened.info.encrypted or opened.info.signed)
    return opened.message


def _odd(message: sip.SipMessage, template: str) -> sip.SipMessage:
    odd = message.replace("To", template.format(uri=message.address("To").uri))
    assert odd.to_tag is None and odd.address("To").uri == message.address("To").uri
    return odd


@pytest.mark.parametrize("template", ODD_TOS, ids=("display-name", "quoted-param"))
def test_hole_the_challenged_first_message_with_an_odd_to_is_shown_again(world, template):
    """Attacker: an untrusted on-path hop, or anyone on a leg without TLS, that saw
    alice's first MESSAGE to bob, the one her proxy refused 407 (docs/threat-model.md,
    "The phone with digest and TLS": FirstCopy's row).

    Attack: after the real MESSAGE (the digest retry, CSeq 2) reached bob, send him the
    challenged first attempt (CSeq 1: a valid signed body his replay record never saw)
    straight, with To rewritten as ``"x>;tag=1" <sip:bob@...>`` or
    ``<sip:bob@...>;foo="a;tag=1"``.  The signed context binds the To AoR and the To tag
    (none, for the core), both unchanged, so the engine opens it; FirstCopy's regular
    expression finds ``;tag=`` after the first ``>``, takes it for an in-dialog request
    and lets it pass.

    Effect: the same signed words ("pay carol 10 euros") shown to bob a second time as a
    new message from alice (pjsip, like the core, sees no To tag: a new MESSAGE).  The
    INVITE form rings a second call (wire test).

    Fix: ``FirstCopy.check`` (and ``phone._to_tag``) from ``request.to_tag``, the parsed
    tag the engine and pjsip go by."""
    first, real = _challenged_and_real(world)
    bob, seen = ua_engine(world, "bob", peers=("alice",)), FirstCopy(max_age=332.0)
    _bob_takes(bob, seen, real)
    with pytest.raises(Duplicate):
        _bob_takes(bob, seen, _odd(first, template))


def test_control_the_challenged_first_message_is_482(world):
    first, real = _challenged_and_real(world)
    bob, seen = ua_engine(world, "bob", peers=("alice",)), FirstCopy(max_age=332.0)
    _bob_takes(bob, seen, real)
    with pytest.raises(Duplicate) as dup:
        _bob_takes(bob, seen, first)
    assert dup.value.code == 482


@pytest.mark.parametrize("template", ODD_TOS, ids=("display-name", "quoted-param"))
def test_control_the_odd_to_is_read_by_the_engine_as_no_tag(world, template):
    """The engine (like pjsip) reads no To tag in the odd header and the signed context
    still matches: only the phone's own regular expression sees a tag."""
    first, _ = _challenged_and_real(world)
    bob = ua_engine(world, "bob", peers=("alice",))
    opened = bob.open(_odd(first, template))
    assert opened.info.trusted and opened.message.to_tag is None
