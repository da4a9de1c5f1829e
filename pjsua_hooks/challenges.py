"""Which digest challenges the phone lets pjsua answer.

pjsua answers a 401 or 407 with the password of every ``AuthCredInfo`` whose realm
matches the challenge's (``*`` matches any).  Whoever sends a challenge chooses its
realm and nonce, and the answer over them lets him test password guesses offline, so
the phone answers only its home registrar and proxy (review 27):

* a challenge must name the home realm (``[phone] auth_realm``, by default the
  AoR's domain: the home proxy's ``[auth] realm`` defaults to its first domain);
* a 401 (``WWW-Authenticate``) is a registrar's or a UAS's challenge.  Ours
  challenges REGISTER with 401 and every other request with 407, so a 401 to
  anything but REGISTER is the callee's, whatever realm it claims;
* a 407 of the home realm from further on is the home proxy's to stop: it relays
  no challenge that names its own realm (``e2m_plugins/challenge.py``).

A challenge the phone refuses is taken out of the response before pjsip reads it;
pjsip then ends the request with that status, as with a wrong password.
"""

from __future__ import annotations

from dataclasses import dataclass

from e2m_plugins.challenge import CHALLENGE_HEADERS, challenge_realm
from e2m_plugins.sip import SipMessage

__all__ = ["RefusedChallenge", "keep_answerable"]


@dataclass(frozen=True)
class RefusedChallenge:
    """A challenge taken out of a response (what the event says; never the nonce)."""

    status: int
    method: str
    realm: str | None
    why: str


def keep_answerable(response: SipMessage, home_realm: str
                    ) -> tuple[SipMessage, list[RefusedChallenge]]:
    """``response`` with only the challenges pjsua may answer, and those taken out.
    pjsip answers both challenge headers in a 401 or a 407; only the one the status
    names can be our home's.  Anything but a 401 or 407 comes back as it is."""
    status = response.status
    own = CHALLENGE_HEADERS.get(status or 0)
    if own is None or response.is_request:
        return response, []
    method = response.cseq[1]
    refused: list[RefusedChallenge] = []
    kept = response
    for header in CHALLENGE_HEADERS.values():
        def refuse(value: str, header: str = header) -> bool:
            realm = challenge_realm(value)
            if header != own:
                why = f"{header} in a {status}"
            elif status == 401 and method != "REGISTER":
                why = "a 401 to a request other than REGISTER is the callee's"
            elif realm is None or realm.lower() != home_realm.lower():
                why = "not the home realm"
            else:
                return False
            refused.append(RefusedChallenge(status, method, realm, why))
            return True
        kept = kept.remove(header, where=refuse)
    return (kept if refused else response), refused
