"""The phone's own answer to a 2xx that comes after its INVITE failed (review 129 HB1).

A proxy relays a 2xx that comes after the INVITE's failure (RFC 3261 16.7: a second
fork answered after the first one's 486, or after the caller's CANCEL), and the UA
engine opens it (``UAEngine.late_answer_to_failed_invite``).  pjsip does not: its
INVITE client transaction, Completed after the failure, takes the 2xx for a
retransmitted final answer and sends the failure's ACK again (To tag of the failure),
sends no BYE, and the callee's device retransmits its 2xx for 64*T1.  RFC 3261 13.2.2.4
wants each 2xx ACKed and, since the caller no longer wants the call, a BYE after the
ACK.  So the phone answers such a 2xx itself and never hands it to pjsip:

- an ACK for the 2xx: a new branch, the 2xx's To (its tag), the INVITE's From, Call-ID
  and CSeq number, Request-URI the 2xx's Contact, Route set the 2xx's Record-Route
  reversed: what pjsip's dialog does with a 2xx it takes (``dlg_update_routeset``: the
  route set of a confirmed dialog is the Record-Route set alone, so the request goes
  through the home proxy because the home record-routes, as every in-dialog request of
  the phone does);
- then a BYE in that dialog (CSeq one above the INVITE's), sent in a client
  transaction: retransmitted over UDP until answered, its final answer absorbed there;
- the 2xx again, byte for byte (the callee's retransmission, relayed by the proxies): the
  same ACK again, no second BYE (13.2.2.4).

How they are sent: the request is written here as text with the project's SIP model,
and pjsip's own parser turns it into the message of a fresh ``pjsip_tx_data``
(``pjsip_abi.send_request``), which ``pjsip_endpt_send_request`` (BYE) or
``pjsip_endpt_send_request_stateless`` (ACK) send.  Chosen over
``pjsip_endpt_create_request_from_hdr`` because that needs pjsip header objects built
and linked through more struct offsets (list heads inside ``pjsip_msg``), where this
needs only the one offset the hook already checks (``tdata->msg``), and a header pjsip's
parser would skip is refused rather than lost.  Either way pjsip routes, resolves, fills
in the Via's sent-by and passes the request through every module, the E2M hook included:
the engine sees the ACK and the BYE like any request of ours (bodiless: no CMS; the BYE
ends that fork's keys, the INVITE's retired ones open another fork's late 2xx until
their own end).  Sent from the phone's loop (``_after_pump``),
never from inside pjsip's receive callback.

Who can make the phone do this, and how much:

- Only a 2xx the engine accepted (decrypted and verified where it carries a protected
  body; a plaintext one only where E2M is not required) that answers an INVITE of ours
  by Call-ID, CSeq and our Via branch, whose first final answer was a failure at most
  32 s (64*T1) ago, with our From tag, a To tag and one sip/sips Contact.  Our branch and
  the Call-ID are on the wire: a hop on the INVITE's path (or the callee's devices) can
  forge such a 2xx; an off-path stranger would have to guess the branch (``strong_rand``)
  and, with an outbound proxy, send from its address.  A forger of it can anyway answer
  the INVITE itself; what it gains here is at most one ACK and one BYE per To tag toward
  the Contact and Record-Route of its choosing (``MAX_PER_INVITE`` To tags per INVITE,
  ``MAX_ACKS`` ACKs per 2xx, the ACKs of ``MAX_LATE`` 2xx kept for their copies, and
  ``MAX_ANSWERED`` 2xx known as answered, each for ``MAX_AGE`` seconds: an entry
  evicted for room is still known, so no 2xx draws a second BYE, reviews 137 K1 and
  138 K2).
- A retransmission is recognised by the very octets that came the first time, never by
  its ids (a copy the engine would no longer open must still get its ACK).
- A 2xx that carries a failed INVITE's branch under other ids is dropped by the phone
  (``UAEngine.names_a_failed_invites_branch``): pjsip's transaction layer matches by the
  branch alone and would ACK it with the failure's ACK.

Limits: the route is pjsip's for a confirmed dialog, the Record-Route set alone; a 2xx
without Record-Route sends the ACK and BYE straight to its Contact (the home proxy
record-routes every dialog, so this does not arise through it; elsewhere the BYE's
answer, not from the home, is dropped and pjsip retransmits the BYE until Timer F).  A
host name in the first hop is resolved by pjsip as for any in-dialog request.  Run over
UDP (``tests/pjsua/test_review129_late_2xx_phone.py``, through Kamailio) and over TLS to
a Kamailio home (``tests/e2e/test_late_2xx_phone_wire.py``); TCP not run.

A home with ``[auth]`` (stop 44).  It challenges its users' in-dialog requests too, and
the BYE, sent outside pjsua's dialogs, is answered 407.  The phone then sends it once
more with the account's credentials, as pjsip does for its own requests (RFC 3261 22.2,
RFC 7616): the same request with CSeq + 1, a new branch and a Proxy-Authorization
computed from the challenge (qop=auth with nc 1 and a fresh cnonce when offered, else
the RFC 2069 form; MD5, SHA-256 or SHA-512-256, pjsip 2.15.1's set) over the BYE's
method and Request-URI (``LateAnswers.retry_bye``; the digest itself: ``e2m_plugins.challenge.digest_authorization``).  Why
here, in Python, and not through pjsip's client auth session (``pjsip_auth_clt_init``,
``_set_credentials``, ``_reinit_req``): that needs a session struct allocated and kept
per request, a ``pjsip_cred_info`` array laid out by hand, the BYE's tdata kept alive
past its transaction, and the 407's rdata read inside pjsip's callback: more offsets
to get wrong, each a crash or a write to the wrong place, against a few lines of
hashing the RFC fixes (checked against RFC 7616 3.9.1's vectors).  The password is read
again from the phone's own settings (its file or ``E2M_PHONE_PASSWORD``) only once a
challenge passed every check below, used for the one hash and dropped; neither it nor
HA1 is kept, logged or put in an event.

Which challenges are answered (the attacker's angle: a forged 407 must neither make the
phone send without bound nor hand a digest of its password, which its sender could test
guesses against, to anyone but the home):

- only a 407 that came from the home proxy (the phone's home source, as for
  ``_answer_from_home``; a phone without a home answers none), to the BYE in flight of
  a late 2xx still held, its first final answer;
- only its Proxy-Authenticate of the home realm (``auth_realm``, the one realm pjsua
  answers, ``challenges.py``), read strictly (a parameter twice, an item that is no
  pair: refused); a 401 to a BYE is the callee's and is never answered;
- at most ``MAX_AUTH_TRIES`` BYEs with credentials per late 2xx: the first challenge
  is answered, a second only when it says ``stale=true`` (a nonce that ran out), a third
  never.  One BYE per late 2xx is in flight at a time (the next one is made only from
  the final answer of the last), and the entries are capped (``MAX_LATE``, ``MAX_AGE``).

Another limit: the digest's ``uri`` is the Request-URI as we wrote it; pjsip prints the
Request-URI from its parse, the same text for any Contact seen so far, but a Contact it
would print otherwise (parameter case, escapes) would make the home refuse the BYE
(400, credentials for another URI) rather than relay it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from e2m_plugins import sip
from e2m_plugins.challenge import (DIGEST_ALGORITHMS, Credentials, digest_authorization,
                                   digest_params)
from e2m_plugins.errors import E2MError, MalformedError
from e2m_plugins.grammar import split_header_list
from e2m_plugins.replay import TRANSACTION_LIFETIME
from e2m_plugins.uri import parse_uri

__all__ = ["LateAnswers", "LateTwoXX", "Outgoing", "build_ack", "build_bye",
           "MAX_LATE", "MAX_ANSWERED", "MAX_PER_INVITE",
           "MAX_ACKS", "MAX_AGE", "MAX_AUTH_TRIES"]

MAX_LATE = 32              # late 2xx whose ACK is held for their copies (oldest out)
MAX_ANSWERED = 1024        # late 2xx known as answered, each MAX_AGE: never a second BYE
MAX_PER_INVITE = 6         # To tags answered per failed INVITE (forks; MAX_SLOTS_PER_CALL)
MAX_ACKS = 16              # ACKs per late 2xx: its retransmissions in 64*T1 are about 11
MAX_AGE = TRANSACTION_LIFETIME     # 64*T1: the callee retransmits its 2xx this long
MAX_ROUTES = 8             # Record-Route entries taken over (a longer set is refused)
MAX_AUTH_TRIES = 2         # BYEs with credentials per late 2xx: one, and one more if stale
MAX_CHALLENGE_PARAM = 512  # characters of a nonce or opaque echoed back (Kamailio's: ~40)

@dataclass(frozen=True)
class Outgoing:
    """A request for pjsip to send: whole text, and whether in a client transaction."""

    data: bytes
    stateful: bool
    method: str


@dataclass
class LateTwoXX:
    """One late 2xx answered: its ACK (sent again for a retransmission), how often."""

    invite: tuple[str, int, str]        # Call-ID, CSeq number, our Via branch
    to_tag: str
    ack: bytes
    first_seen: float
    acks: int = 1
    digests: set[bytes] = field(default_factory=set)
    bye_branch: str = ""                # to tell the BYE's final answer (``bye_answered``)
    bye_status: int = 0
    bye: bytes = b""                    # the BYE last sent (its retry is made from it)
    auth_tries: int = 0                 # BYEs sent again with credentials
    key: tuple[str, int, str, str] = ("", 0, "", "")


def _one_uri(value: str) -> str:
    """The URI of a name-addr or addr-spec, checked: sip/sips, no URI headers."""
    uri = sip.parse_address(value).uri
    parsed = parse_uri(uri)
    if parsed.headers:
        raise MalformedError("a URI with headers")
    return uri


def route_set(response: sip.SipMessage) -> list[str]:
    """The 2xx's Record-Route entries reversed, as Route values (RFC 3261 12.1.2)."""
    entries: list[str] = []
    for value in response.get_all("Record-Route"):
        entries.extend(split_header_list(value))
    if len(entries) > MAX_ROUTES:
        raise MalformedError("too many Record-Route entries")
    for entry in entries:
        _one_uri(entry)
    return [entry.strip() for entry in reversed(entries)]


def _target(response: sip.SipMessage) -> str:
    contacts = [c for v in response.get_all("Contact") for c in split_header_list(v)]
    if len(contacts) != 1:
        raise MalformedError("a 2xx to an INVITE needs exactly one Contact")
    return _one_uri(contacts[0])


def _compose(start: sip.StartLine, headers: list[tuple[str, str]]) -> bytes:
    # no Content-Length: pjsip keeps a parsed one among the headers and prints its own
    # after them, and Kamailio refuses a request with two (seen on the wire)
    lines = [str(start), *(f"{name}: {value}" for name, value in headers)]
    text = "\r\n".join(lines) + "\r\n\r\n"
    sip.parse(text.encode("utf-8", "surrogateescape"))     # what we write must read back
    return text.encode("utf-8", "surrogateescape")


def _request(method: str, response: sip.SipMessage, number: int, via: str,
             branch: str) -> bytes:
    headers: list[tuple[str, str]] = [("Via", f"SIP/2.0/UDP {via};rport;branch={branch}"),
                                      ("Max-Forwards", "70")]
    headers.extend(("Route", r) for r in route_set(response))
    for name in ("From", "To", "Call-ID"):
        value = response.get(name)
        if value is None:
            raise MalformedError(f"a 2xx without {name}")
        headers.append((name, value))
    headers.append(("CSeq", f"{number} {method}"))
    return _compose(sip.RequestLine(method, _target(response)), headers)


def _branch() -> str:
    return sip.RFC3261_BRANCH_COOKIE + secrets.token_hex(12)


def build_ack(response: sip.SipMessage, via: str) -> bytes:
    """The ACK for a 2xx to our INVITE (RFC 3261 13.2.2.4): a new branch, the INVITE's
    CSeq number, the 2xx's Contact as Request-URI, its Record-Route reversed as Route.
    ``via``: our sent-by (pjsip writes its transport's own over it)."""
    return _request("ACK", response, response.cseq[0], via, _branch())


def build_bye(response: sip.SipMessage, via: str) -> bytes:
    """A BYE in the dialog the 2xx made, CSeq one above the INVITE's (RFC 3261 15)."""
    return _request("BYE", response, response.cseq[0] + 1, via, _branch())


def _home_challenge(response: sip.SipMessage, home_realm: str
                    ) -> tuple[dict[str, str] | None, str]:
    """The challenge of a 407 to our BYE that we may answer, or (None, why not).

    Only a 407's Proxy-Authenticate of the home realm: the home challenges its users'
    requests with 407 (``kamailio_app``), a 401 to a BYE is the callee's (as
    ``challenges.py`` rules for pjsua), and another realm's answer would hand its
    sender a digest of our password to test guesses against.  The topmost one of the
    home realm with an algorithm and qop we can answer is taken (RFC 8760 2.4)."""
    if response.status != 407:
        return None, f"a {response.status} (only the home proxy's 407 is answered)"
    why = "no Digest challenge of the home realm"
    for value in response.get_all("Proxy-Authenticate"):
        params = digest_params(value)
        if params is None or params.get("realm", "").lower() != home_realm.lower():
            continue
        nonce = params.get("nonce")
        algorithm = params.get("algorithm", "MD5").upper()
        qops = [q.strip().lower() for q in params.get("qop", "").split(",") if q.strip()]
        if not nonce or any(len(params.get(p, "")) > MAX_CHALLENGE_PARAM
                            for p in ("nonce", "opaque")):
            why = "a home challenge without a usable nonce"
        elif algorithm not in DIGEST_ALGORITHMS:
            why = f"a home challenge with algorithm {algorithm[:32]!r}"
        elif qops and "auth" not in qops:
            why = "a home challenge offering no qop=auth"
        else:
            return params, ""
    return None, why


def raw_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class LateAnswers:
    """The late 2xx the phone answered, bounded in count and age.

    ``retransmission(data)``: the ACK to send again for octets already answered (None:
    not one of ours, or its ACKs used up).  ``answer(response, data, our_from_tag, via)``:
    what to send for a new late 2xx the engine accepted (ACK, then BYE; only an ACK for
    another copy of a 2xx already answered; nothing past the bounds).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_LATE, max_age: float = MAX_AGE,
                 max_acks: int = MAX_ACKS, max_per_invite: int = MAX_PER_INVITE) -> None:
        self._clock = clock
        self.max_entries, self.max_age = max_entries, max_age
        self.max_acks, self.max_per_invite = max_acks, max_per_invite
        # (Call-ID, CSeq number, branch, To tag lower-cased) -> entry
        self._entries: OrderedDict[tuple[str, int, str, str], LateTwoXX] = OrderedDict()
        # every key answered within max_age -> when: an entry evicted for room is still
        # known, so a copy of its 2xx draws no second BYE (review 137 K1), and a full
        # entry table never keeps an honest late 2xx from its ACK and BYE (review 138 K2)
        self._answered: OrderedDict[tuple[str, int, str, str], float] = OrderedDict()
        self.counts = {"answered": 0, "acks_again": 0, "refused": 0, "over_bounds": 0,
                       "bye_auth_retries": 0, "bye_challenges_refused": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def _sweep(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.first_seen <= self.max_age:
                break
            self._entries.popitem(last=False)
        while self._answered and now - next(iter(self._answered.values())) > self.max_age:
            self._answered.popitem(last=False)

    def _again(self, entry: LateTwoXX) -> Outgoing | None:
        if entry.acks >= self.max_acks:
            self.counts["over_bounds"] += 1
            return None
        entry.acks += 1
        self.counts["acks_again"] += 1
        return Outgoing(entry.ack, False, "ACK")

    def retransmission(self, data: bytes) -> Outgoing | None | bool:
        """For octets already answered: the ACK again (or None past ``max_acks``);
        False when these octets are not a late 2xx we answered."""
        self._sweep(self._clock())
        digest = raw_digest(data)
        for entry in self._entries.values():
            if digest in entry.digests:
                return self._again(entry)
        return False

    def bye_answered(self, response: sip.SipMessage) -> LateTwoXX | None:
        """The entry whose BYE ``response`` finally answers, the first time (its status
        noted); None for anything else, or a retransmitted answer."""
        if response.is_request or response.method != "BYE" or (response.status or 0) < 200:
            return None
        try:
            branch = response.via_branch()
        except E2MError:
            return None
        for entry in self._entries.values():
            if entry.bye_branch == branch and not entry.bye_status:
                entry.bye_status = response.status or 0
                return entry
        return None

    def answer(self, response: sip.SipMessage, data: bytes, our_from_tag: str | None,
               via: str) -> list[Outgoing]:
        """What to send for a late 2xx the engine accepted as the answer to our failed
        INVITE (``UAEngine.late_answer_to_failed_invite``); empty: nothing (a forged
        one, a malformed one, past the bounds).  ``data``: its octets as received."""
        now = self._clock()
        self._sweep(now)
        try:
            number, _ = response.cseq
            invite = (response.call_id, number, response.via_branch())
            from_tag, to_tag = response.from_tag, response.to_tag
            if not from_tag or not our_from_tag or from_tag.lower() != our_from_tag.lower() \
                    or not to_tag:
                raise MalformedError("not our dialog's tags")
            key = (*invite, to_tag.lower())
            entry = self._entries.get(key)
            if entry is not None:
                # another copy of a 2xx already answered (other octets): an ACK, no BYE
                if len(entry.digests) < self.max_acks:
                    entry.digests.add(raw_digest(data))
                again = self._again(entry)
                return [again] if again is not None else []
            if key in self._answered or len(self._answered) >= MAX_ANSWERED \
                    or sum(1 for k in self._answered if k[:3] == invite) >= self.max_per_invite:
                # a copy of a 2xx whose entry made room for newer ones (its ACK is gone:
                # nothing, and above all no second BYE), or past the bounds
                self.counts["over_bounds"] += 1
                return []
            ack, bye = build_ack(response, via), build_bye(response, via)
        except E2MError:
            self.counts["refused"] += 1
            return []
        self._entries[key] = LateTwoXX(invite, to_tag.lower(), ack, now,
                                       digests={raw_digest(data)},
                                       bye_branch=sip.parse(bye).via_branch(), bye=bye,
                                       key=key)
        self._answered[key] = now
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        self.counts["answered"] += 1
        return [Outgoing(ack, False, "ACK"), Outgoing(bye, True, "BYE")]

    def retry_bye(self, entry: LateTwoXX, response: sip.SipMessage, home_realm: str | None,
                  credentials: Callable[[], Credentials | None]
                  ) -> tuple[Outgoing | None, str]:
        """The BYE of ``entry`` again with credentials, answering the 407 ``response``
        that ``bye_answered`` just gave it (RFC 3261 22.2: same Call-ID, CSeq + 1, a new
        branch), or (None, why not).  At most ``MAX_AUTH_TRIES`` per late 2xx: the first
        challenge is answered, a second one only when it says ``stale=true`` (the nonce
        ran out, not the password), as pjsip does for its own requests; one BYE of an
        entry is in flight at a time, since only its final answer brings us here.
        ``credentials`` is called only once the challenge passed every check, so the
        password is read for the home realm's challenge alone and dropped after."""
        if self._entries.get(entry.key) is not entry:
            return None, "the late 2xx is no longer held"
        why = ""
        challenge: dict[str, str] | None = None
        if home_realm is None:
            why = "no digest credentials configured"
        elif entry.bye_status != response.status:
            why = "not the final answer to this BYE"
        elif entry.auth_tries >= MAX_AUTH_TRIES:
            why = "challenged again after a stale retry"
        else:
            challenge, why = _home_challenge(response, home_realm)
            if challenge is not None and entry.auth_tries \
                    and challenge.get("stale", "").lower() != "true":
                # our credentials were refused with a fresh nonce: the same password would
                # be refused again (a wrong password, or a forger wanting more digests)
                challenge, why = None, "challenged again without stale=true"
        creds = credentials() if challenge is not None else None
        if challenge is None or creds is None:
            self.counts["bye_challenges_refused"] += 1
            return None, why or "no digest credentials configured"
        try:
            bye = sip.parse(entry.bye)
            number = bye.cseq[0] + 1
            old_via = bye.get("Via") or ""
            via = old_via.rsplit(";branch=", 1)[0] + f";branch={_branch()}"
            uri = bye.request_uri
            if uri is None:
                raise MalformedError("our BYE has no Request-URI")
            authorization = digest_authorization(challenge, creds, "BYE", uri)
            kept = [(n, v) for n, v in bye.headers
                    if n.lower() not in ("via", "cseq", "proxy-authorization")]
            text = _compose(bye.start_line, [("Via", via), *kept, ("CSeq", f"{number} BYE"),
                                             ("Proxy-Authorization", authorization)])
        except (E2MError, ValueError):
            self.counts["bye_challenges_refused"] += 1
            return None, "the challenge cannot be answered in a well-formed BYE"
        entry.bye, entry.bye_status = text, 0
        entry.bye_branch = sip.parse(text).via_branch()
        entry.auth_tries += 1
        self.counts["bye_auth_retries"] += 1
        return Outgoing(text, True, "BYE"), ""
