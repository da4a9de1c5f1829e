"""Review 180 (attacker's review of ea96db7's LogCutter and 3c955cd's keyed-SDP refusal).

Hole K1: at debug, the auth module logs the digest response each user's password gives
----------------------------------------------------------------------------------------
- Attacker: whoever reads the proxy's log (operator, log shipper, support bundle) and can
  send one REGISTER from anywhere; no capture of the victim's traffic (over TLS there is
  none to capture).
- Messages: a REGISTER as ``alice`` with a guessed password answering the proxy's 401
  (nonce N, nc 00000001, cnonce C, uri ``sip:example.com``, all of the thief's choosing
  but N).
- Effect observed: with ``[kamailio] log_level = "debug"`` the log holds, on a record's
  FIRST line (which ``LogCutter`` passes), ``auth [api.c:292]: auth_check_response():
  Our result = '<32 hex>'``: the response alice's real password gives for the thief's
  N/nc/C/uri.  The test recomputes it from alice's password: equal (1 of 1 attempts).
  It is a verifier of alice's password for offline guessing (MD5 of HA1 and values the
  thief knows), got without ever seeing alice's traffic, for any user name, at will.
  Replaying it at once was refused (401 stale=true: the failed check spent nc 1), so it
  is not an immediate login.
- Code at fault: Kamailio 5.6.3 ``src/modules/auth/api.c:292`` (LM_DBG ``Our result``),
  passed by ``kamailio_app/launcher.py`` ``LogCutter.process`` (only continuation lines
  are dropped; first lines pass unless ``_QUOTING`` names them, launcher.py:405).
- Suggested fix: add ``b"auth [api.c"`` / ``b"auth_check_response(): Our result"`` (and
  ``get_ha1``'s ``HA1 string calculated``, should ``calculate_ha1`` ever be set) to the
  records cut at their first quote, or refuse ``log_level = "debug"`` with ``[auth]``
  (or set ``auth``'s module debug level below DEBUG with ``debug_mode``/``modparam``).
- Test: ``test_debug_log_holds_no_digest_response_of_a_users_password``.

Controls
--------
- ``test_info_log_holds_no_digest_response``: the same attempt at the default level
  (info): no ``Our result`` line, the 401 comes.

Tried and held
--------------
- Replaying the logged response with the same nonce/nc/cnonce: 401 ``stale=true``
  (nc spent by the failed check; one_time_nonce), so K1 is an offline-guessing leak,
  not a login.
- ``auth_db`` ``HA1 string calculated`` (authorize.c:199) is logged only with
  ``calculate_ha1`` set; the cfg sets 0 (HA1 column): not in the log.
- 3c955cd bypass with a multipart/mixed holding a keyed SDP, sealed whole for alice and
  the viewing proxy: refused (UnsupportedMediaTypeError, "an SDP or S/MIME part inside
  a multipart/mixed inside the envelope") before ``_refuse_keys_others_read``.
- Seen, not yet turned into a test (time): app_python3 echoes every KSR call's string
  arguments at debug (apy_kemi.c:266-402, first lines): ``pv.sets("$var(e2m_body)",
  base64(reply body))`` (certificates only), ``htable`` values (sealed key-cache records),
  ``info`` lines; none carried a key in this run's REGISTER/401 flow.

Fixed (stop 50): ``LogCutter`` cuts auth's ``auth_check_response()`` record (and any
"HA1 string calculated" one) at its first quote or "=", so the response never reaches
the log.  The note on ``log_prefix`` was right too: a printed message can carry a line
shaped as a Python traceback record (a folded header), which kept the lines after it;
a traceback's lines now pass only before the first message is handled
(``tests/unit/test_log_cutter.py``).  The hole test failed on the code before the fix
and passes with it.
"""

from __future__ import annotations

import hashlib
import re
import time

import pytest

from e2m_lab.kamailio_harness import SipUa, parse_challenge

pytestmark = [pytest.mark.kamailio]

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
REALM = "example.com"


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _guess(proxy) -> tuple[str, str]:
    """A REGISTER as alice with a wrong password; (the response alice's real password
    gives for the thief's attempt, the proxy's log)."""
    thief = SipUa(proxy.port, user="alice", password="guessed", source="127.0.0.31")
    try:
        answer = thief.register()
        assert answer is not None and answer.status == 401
        sent = next(m for m in reversed(thief.sent) if m.get("Authorization"))
    finally:
        thief.close()
    creds = parse_challenge(sent.get("Authorization") or "")
    ha1 = _md5(f"alice:{REALM}:{USERS['alice']}")
    ha2 = _md5(f"REGISTER:{creds['uri']}")
    real = _md5(":".join((ha1, creds["nonce"], creds["nc"], creds["cnonce"],
                          creds["qop"], ha2)))
    time.sleep(0.5)             # the launcher drains Kamailio's log every 20 ms
    return real, proxy.log_since(0)


def test_debug_log_holds_no_digest_response_of_a_users_password(proxy_factory):
    proxy = proxy_factory("r180-digest", e2m=False, auth=True, users=USERS,
                          log_level="debug")
    real, log = _guess(proxy)
    assert real not in log, [line for line in log.splitlines() if real in line]


def test_info_log_holds_no_digest_response(proxy_factory):
    proxy = proxy_factory("r180-digest-info", e2m=False, auth=True, users=USERS)
    real, log = _guess(proxy)
    assert real not in log and "Our result" not in log
