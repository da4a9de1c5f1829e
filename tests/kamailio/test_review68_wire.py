"""A sixty-eighth attacker's review (December 2026) of a000c40: review 67's fixes of who
a user is (the digest ``uri`` bound to the Request-URI, asserted identities), on a real
Kamailio.

Hole 2 (``test_hole_a_hop_spends_credentials_naming_the_proxy_on_a_target_of_its_own``):
**untrusted hop** in front of home.  Review 67 binds the digest ``uri`` to the
Request-URI (``challenge.credentials_fit_request``), but eb8754d lets any ``uri`` that
names the proxy itself (no user, ``kemi._names_this_proxy``: Kamailio's myself check)
pass *whatever the Request-URI*, because stock SIPp writes ``uri="sip:<remote
host>:<port>"`` (its default when no ``-auth_uri`` is given).  Credentials so made bind
no target at all: alice's client (a SIPp-based UA, a test rig, any UA writing the
proxy's address) sends ``MESSAGE sip:bob@example.com`` with ``Proxy-Authorization: ...
uri="sip:127.0.0.1:<port>" ... nc=00000001``; the hop drops it and sends home
``MESSAGE sip:carol@example.com`` with those credentials and a body of its own: 200,
delivered to carol as alice's, digest-proved.  Review 67's hole 3, back for every such
client (an INVITE so spent calls any number as alice).  At fault:
``e2m_plugins/challenge.py`` ``credentials_fit_request``
(``uri == request_uri or names_us(uri)``).  Fix: accept a ``uri`` naming the proxy only
when the Request-URI names the proxy too (a request to the proxy itself: OPTIONS,
a REGISTER), else 400 as for any other; give SIPp ``-auth_uri`` (or
``[authentication auth_uri=...]``) in the scenarios the project ships.

Hole 3 (``test_hole_a_request_from_the_proxys_own_address_keeps_an_asserted_identity``):
**off-path sender** writing as its UDP source an address ``is_myself_srcip`` takes for
the proxy's: on a node of a cluster, the front's address, which the node names as an
alias (docs/threat-model.md, the front's row on a Route past us: "matches aliases on any
port"), or an advertised address; or any local process (the monitor, a cron job's
script).  (Linux drops off-box packets whose source is one of the box's own addresses
as martians, so the spoofer uses an alias address; this test sends from 127.0.0.1, the
proxy's listen address, which is the same check.)  ``drop_asserted_identity`` keeps
P-Asserted-Identity and its kin on a request that ``exempt_source`` passes, which is
``KSR.is_myself_srcip()`` ("a spiral, a local tool") as well as a ``[limits]
trusted`` peer.  A stranger's ``MESSAGE sip:bob@example.com`` (From
``dave@other.example.net``: not ours, so never challenged) sent from 127.0.0.1 with
``P-Asserted-Identity: <sip:alice@example.com>`` (and P-Preferred-Identity,
Remote-Party-ID) reaches bob with all three: a stock UA that trusts its proxy (RFC
3325) shows the stranger's message as alice's.  The same source was already stopped from
following a Route (threat model row "writing the proxy's own address as the UDP
source"); the identity check kept the old exemption.  At fault:
``kamailio_app/kemi.py`` ``drop_asserted_identity`` (``self.exempt_source()`` for a
request).  Fix: for identities, exempt only a ``[limits] trusted`` peer
(``trusted_peer()``); a spiral's assertion was already cleaned (or kept for a trusted
peer) on its first pass, and a local tool needs no assertion: if one must survive a
spiral, carry it under a mark only the proxy can make (an HMAC of the proxy's
identity key over the Call-ID and the header, checked on the second pass).

Controls: alice's own request whose credentials name the proxy (what SIPp sends)
passes (the exception works), and credentials naming another user's URI are 400 (review
67 holds); the same stranger's request from another address loses the three headers.

Tried and held (see also ``tests/unit/test_review68.py``):
- credentials whose ``uri`` is the Request-URI spelt otherwise (escape, case of scheme
  or host, ``:5060``, ``;transport=``, ``;maddr=``): 400, compared as strings;
- replies: a callee's 200 and 486 with the three headers (names in any case, one
  folded over two lines) lose them through tm's reply route.

Fixed (stop 32): a digest ``uri`` naming the proxy itself fits only a request to the
proxy itself (``challenge.credentials_fit_request``: both must name us), so the hop's
MESSAGE to carol gets 400; the control now shows credentials naming the Request-URI
carry alice's request and ones naming only the proxy do not (SIPp needs
``-auth_uri``; in-dialog requests are bound by the route token instead).  Asserted
identities go from every request and reply but a ``[limits] trusted`` peer's: the
proxy's own address exempts nothing (``kemi.drop_asserted_identity``).  Both holes
turned XPASS; the markers are gone.
"""

from __future__ import annotations

import pytest

from e2m_lab.kamailio_harness import (SipUa, captured_credentials, message_with_credentials,
                                      registered_uas, start_proxy, wait_delivered)
from e2m_plugins.sip import SipMessage
from e2m_plugins.testpki import TestPKI

pytestmark = pytest.mark.kamailio

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3",
         "dan": "dan-Secret-4", "erin": "erin-Secret-5"}
_ASSERTING = ("P-Asserted-Identity", "P-Preferred-Identity", "Remote-Party-ID")


@pytest.fixture(scope="module")
def home(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory):
    proxy = start_proxy(tmp_path_factory.mktemp("review68-home"), pki=pki, e2m=True,
                        auth=True, users=USERS)
    yield proxy
    proxy.stop()


# -- hole 2: a digest uri naming the proxy binds no target ------------------------------

def _alices_credentials(home, source: str, target: str, digest_uri: str) -> str:
    """alice's answer to home's 407 for a MESSAGE to ``target``, with ``digest_uri`` as
    the digest ``uri`` (SIPp's default: the proxy's address and port)."""
    return captured_credentials(home, "alice", USERS["alice"], source, "MESSAGE", target,
                                digest_uri)


def _send(home, source: str, target: str, credentials: str, text: bytes):
    return message_with_credentials(home, "alice", source, target, credentials, text)


def test_control_credentials_naming_the_request_uri_carry_alices_own_request(home):
    """After the fix: credentials naming the Request-URI carry alice's request; ones
    naming only the proxy (SIPp without ``-auth_uri``) no longer carry even her own
    request to bob, since they bind no target (400, and nothing delivered)."""
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.21") as bob:
        credentials = _alices_credentials(home, "127.0.0.22", "sip:bob@example.com",
                                          "sip:bob@example.com")
        answer = _send(home, "127.0.0.22", "sip:bob@example.com", credentials,
                       b"control: alice to bob, her target as the uri")
        assert answer is not None and answer.status == 200
        assert wait_delivered(bob, b"control: alice to bob, her target as the uri")
        proxy_uri = f"sip:127.0.0.1:{home.port}"
        credentials = _alices_credentials(home, "127.0.0.22", "sip:bob@example.com", proxy_uri)
        answer = _send(home, "127.0.0.22", "sip:bob@example.com", credentials,
                       b"control: alice to bob, SIPp's uri")
        assert answer is not None and answer.status == 400
        assert not wait_delivered(bob, b"control: alice to bob, SIPp's uri", 0.5)
        # credentials naming bob's URI do not carry a request to carol (review 67 holds)
        credentials = _alices_credentials(home, "127.0.0.22", "sip:bob@example.com",
                                          "sip:bob@example.com")
        answer = _send(home, "127.0.0.23", "sip:carol@example.com", credentials, b"no")
        assert answer is not None and answer.status == 400


def test_hole_a_hop_spends_credentials_naming_the_proxy_on_a_target_of_its_own(home):
    with registered_uas(home, "carol", USERS["carol"], "127.0.0.24") as carol:
        proxy_uri = f"sip:127.0.0.1:{home.port}"
        # alice writes to bob; the hop in front of home keeps her request and drops it
        credentials = _alices_credentials(home, "127.0.0.25", "sip:bob@example.com", proxy_uri)
        answer = _send(home, "127.0.0.26", "sip:carol@example.com", credentials,
                       b"hole: the hop's words, as alice, to carol")
        delivered = wait_delivered(carol, b"hole: the hop's words, as alice, to carol", 1.0)
        assert answer is not None and answer.status >= 400 and not delivered, (
            f"answered {answer.status if answer else None}, delivered to carol: {delivered}")


# -- hole 3: the proxy's own address keeps an asserted identity --------------------------

def _strangers_message(home, source: str, text: bytes) -> SipMessage | None:
    dave = SipUa(home.port, user="dave", domain="other.example.net", source=source)
    try:
        request = dave.build("MESSAGE", "sip:bob@example.com", to="sip:bob@example.com",
                             body=text, content_type="text/plain",
                             headers=[(n, "<sip:alice@example.com>") for n in _ASSERTING])
        return dave.transact(request)
    finally:
        dave.close()


def _assertions(bob, text: bytes):
    got = next(m for m in bob.received if m.body == text)
    return {n: got.get(n) for n in _ASSERTING}


def test_control_a_strangers_assertion_goes(home):
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.27") as bob:
        answer = _strangers_message(home, "127.0.0.28", b"control: dave asserting alice")
        assert answer is not None and answer.status == 200
        assert wait_delivered(bob, b"control: dave asserting alice")
        assert _assertions(bob, b"control: dave asserting alice") == dict.fromkeys(_ASSERTING)


def test_hole_a_request_from_the_proxys_own_address_keeps_an_asserted_identity(home):
    with registered_uas(home, "bob", USERS["bob"], "127.0.0.29") as bob:
        answer = _strangers_message(home, "127.0.0.1", b"hole: dave as alice, from 127.0.0.1")
        assert answer is not None and answer.status == 200
        assert wait_delivered(bob, b"hole: dave as alice, from 127.0.0.1")
        assert _assertions(bob, b"hole: dave as alice, from 127.0.0.1") == \
            dict.fromkeys(_ASSERTING), "the stranger's message reached bob asserting alice"


# -- held: a callee's assertion in other spellings ---------------------------------------

def _asserting_carol_spelt_otherwise(status: int):
    lines = (b"p-asserted-identity: <sip:carol@example.com>\r\n"
             b"P-PREFERRED-IDENTITY : <sip:carol@example.com>\r\n"
             b"Remote-Party-Id:\r\n <sip:carol@example.com>;party=called;screen=yes\r\n")

    def respond(request: SipMessage) -> bytes:
        from e2m_plugins.sip import make_response
        head, _, body = make_response(request, status, "OK" if status == 200 else "Busy Here"
                                      ).serialize().partition(b"\r\n\r\n")
        return head + b"\r\n" + lines + b"\r\n" + body
    return respond


@pytest.mark.parametrize("status,callee", [(200, "dan"), (486, "erin")])
def test_control_an_answers_assertion_in_other_spellings_goes(home, status, callee):
    """Held: header names in other cases, a space before the colon, a value folded onto
    the next line, in a 200 and a 486: tm's reply route removes all three.  (A callee
    of its own each: a contact left by another test would fork the MESSAGE, and tm
    holds a 486 until the dead branch times out.)"""
    with registered_uas(home, callee, USERS[callee], f"127.0.0.{30 + status % 7}",
                        responder=_asserting_carol_spelt_otherwise(status)):
        alice = SipUa(home.port, user="alice", password=USERS["alice"], source="127.0.0.38")
        try:
            answer = alice.message(callee, b"held: who answers?")
            assert answer is not None and answer.status == status
            assert b"carol" not in answer.serialize(), answer.serialize()
        finally:
            alice.close()
