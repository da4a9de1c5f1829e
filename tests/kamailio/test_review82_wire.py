"""An eighty-second attacker's review (December 2026) of cdbee39: this stop's newest
fixes attacked (``kemi._sips_leaves_tls`` in ``relay``, ``kemi.moved_route_entries``,
usrloc ``handle_lost_tcp``, ``_asked_lifetime`` and the slots' ``sht_setxi`` lifetime,
``crlf_head``/``_bare_line_ends``, ``db_cmd._PLANTED``), on a real Kamailio 5.6.3.

Hole 1 (``test_hole_a_sips_request_forks_to_a_udp_contact``): **untrusted hop** on
bob's UDP leg (it only reads).  bob holds two bindings, as a user with a desk phone and
a softphone does: ``<sip:bob@...;transport=tls>;q=1.0`` and his UDP phone
``<sip:bob@127.0.0.1:PORT>;q=0.5``.  Alice (TLS, authenticated) sends ``MESSAGE
sips:bob@example.com``.  lookup puts the TLS contact in the Request-URI and appends the
UDP one as a second branch; ``_sips_leaves_tls`` reads only ``$du``/``$ru`` (the first
branch), passes, and ``t_relay`` forks: the UDP phone gets ``MESSAGE
sip:bob@127.0.0.1:PORT`` with the text "secret over sips" in clear - review 81's hole 1
again, through the destination set.  At fault: ``kamailio_app/kemi.py`` line 300
(``target = (KSR.pv.get("$du") if KSR.isdsturiset() else KSR.pv.get("$ru"))``; the
docstring says "the destination set" but the branches appended by lookup are never
read).  Fix: check every branch, not the first: arm a branch route (``t_on_branch``)
that, for a request whose ``$ou`` is ``sips:``, drops (``KSR.drop()`` in the branch
route) each branch whose ``$ru``/``$du`` is not ``sips:``/``;transport=tls``; that also
covers branches added later (a failure route's next contact), and answer 480/Warning
380 when none is left.

Hole 2 (``test_hole_a_hop_adds_its_own_entry_on_the_callers_side``): **untrusted hop**
on bob's UDP leg (it rewrites).  Alice calls bob over TLS; in bob's 200 the hop leaves
both of the proxy's entries (token, TLS socket) untouched and appends one of its own,
``Record-Route: <sip:HOP:5999;lr>``, below them.  ``moved_route_entries`` looks only at
entries carrying our token, so the 200 is relayed; alice's route set (the list
reversed) now starts at the hop: her BYE/re-INVITE and her digest answer go to it over
UDP first, and it can relay them on to us (our token is still in the remaining Route
set).  This is review 81's hole 3 (move the caller's leg off TLS through the hop)
without touching our entry.  At fault: ``kemi.py`` lines 810-823
(``moved_route_entries``: ``ours_in`` returns only entries with our token; nothing
compares the entries on the caller's side of ours).  Fix: in a reply to a request we
record-routed, the Record-Route entries after our caller-side entry must be exactly
those the request carried when we received it (``$T_req(hdr(Record-Route))`` in the
reply route, or keep the count/text in the transaction); drop it otherwise.

Hole 3 (``test_hole_a_hop_pushes_the_moved_entry_past_the_read_bound``): the same hop
does review 81's rewrite (our TLS entry moved to ``sip:HOP:5999``, token kept) and
puts 16 entries of its own above ours (``<sip:HOP:5999;lr;n=i>``).  The check reads at
most 16 Record-Route headers (``_RECORD_ROUTE_SPECS``, ``kemi.py`` line 813) and
``_carried`` at most ``MAX_ROUTE_ENTRIES`` entries / 4096 characters
(``dialog_route.py`` lines 100-103), so the moved entry is never seen: the 200 is
relayed and alice's first route is the hop.  (4 KB of padding in one entry does the
same.)  At fault: the bound fails open.  Fix: fail closed: a reply whose Record-Route
has more than the bound (count ``$hdrc``, text length) is dropped, or read from the
bottom (the caller's side) up, where our entries are.

Hole 4 (``test_hole_registers_binding_nothing_still_hold_slots``, three spellings):
**off-path sender** forging (or sharing) an address S, registrar open.  Three
REGISTERs for junk AoRs that the registrar binds nothing for: ``Contact:
<sip:u@h>;expires=`` with ``Expires: 0`` (an empty parameter: the registrar takes the
header), two contacts each ``;expires=0``, or ``Contact: *, <sip:u@h>`` (refused by the
registrar).  Each binds nothing (a MESSAGE to each junk AoR is 404), yet bob's first
REGISTER from S is 403 "Too Many Registrations From This Address": review 80's hole 1
again, one slot per datagram for ``MAX_EXPIRES``+10 s (an hour), renewable.  At fault:
``kemi.py`` ``_asked_lifetime`` lines 280, 286 and 289-290 (``return MAX_EXPIRES``: "fail
closed" for several contacts, a comma, an unparsable or empty expiry) with line 869
(``lifetime = _asked_lifetime()``) and 896-897 (``sht_setxi`` for that lifetime) run
*before* ``registrar.save``.  Fix: count after ``save`` by what usrloc holds: claim the
slot, save, then read the AoR's contacts (``reg_fetch_contacts("location", "$tu",
...)`` / ``$ulc(...=>expires)``) and give the slot the longest live expiry, releasing it
(``sht_rm``) when none is bound or save failed; or model the registrar (empty
parameter = header, every contact's own expiry, ``*`` alone).

Controls (each passes): a ``sips:`` request to a lone UDP contact is 480 with Warning
380; a ``sip:`` request forks to both of bob's bindings (hole 1's set-up); review 81's
rewrite with our token is still dropped; the untouched route set starts at the TLS
socket; each junk spelling binds nothing; plain ``Expires: 0`` REGISTERs take no slot.

What held (tried, by reading or on the wire):

1. ``sips:`` scheme spelling: ``$ou`` is compared case-insensitively; a ``;transport=TLS``
   contact is taken as TLS; an unparsable target fails closed (480).
2. ``_asked_lifetime`` and Kamailio agree on ``;EXPIRES=``/``;Expires =`` (param names
   lower-cased by the core's grammar), ``Expires:`` with blanks, a bare ``;expires``
   (both use the header), a huge expiry (capped), a shorter refresh (the slot keeps the
   longer time left, overcounting only) and AoR spellings (``%69`` escapes, host case,
   a trailing dot: the core's pair and usrloc's AoR agree, or the core overcounts).
3. ``crlf_head`` on the head read in slices: no way found to make ``$ml - $bs`` end the
   head before a bare CR/LF the phone would see (review 80's row).
4. ``handle_lost_tcp``: stock pjsua keeps its TCP/TLS connection alive (CRLF every
   90 s < ``tcp_idle_timeout`` 120 s) and re-registers when it drops; a stranger can
   close alice's connection only by getting her address banned by pike (the known
   limit "banned by spoofing"), after which her binding is gone until she
   re-registers; not run.
5. ``_PLANTED`` (reasoned, not run for lack of time): a view named ``bodies`` over a
   renamed table (auto-updatable, columns swapped) gets no INSERT grant (``_NODE_GRANTS``
   only grants names among ``_OWNERS``' tables) and is owned by the nodes' account on
   the superuser way (``pg_shdepend``); column defaults are never used (the INSERTs
   name every column); a CHECK constraint, a sequence's MAXVALUE/CYCLE or a dropped
   unique index make inserts fail loudly (500 "Archive Unavailable" or logged), not
   misattribute.

Not tried for lack of time: a failure route's serial forking (no
``t_next_contacts`` in kemi.py today), a strict router with ``sips:``, an entry without
``<>`` (``_ENTRY`` reads only ``<...>``: likely the same as hole 3 if the phone takes it),
``is_myself`` with aliases at a front, and ``_PLANTED`` on a real PostgreSQL.

Fixed (stop 33): (1) a branch route (``ksr_branch_route_sips``, armed in ``relay`` for a
request sent to a ``sips:`` URI) drops every branch that would leave TLS; (3) a reply
whose Record-Route passes the read bound (16 headers, 16 entries, 4 KiB) is not vouched
for and is dropped (``dialog_route.routes_within_bounds``); (4) ``_asked_lifetime``
reads every contact (``grammar.split_header_list``), a ``*`` anywhere, and an empty
``expires=`` as Kamailio does.  Those holes turned XPASS and their markers are gone.
Hole 2 (a hop's own entry added between us and the caller) stayed a strict xfail as a
Known limit that stop.

Fixed (stop 34): (2) in a reply to a request we record-routed, an entry carrying our
token must be followed by exactly the Record-Route the request reached us with, read
from the transaction (``$T_req``) and compared as URIs with their parameters as a set
(``RouteTokens.keeps_callers_side``, ``kemi.callers_side_kept``); the hole turned
XPASS and its marker is gone; it now also asserts the drop is logged.  Added: a
control with the caller behind a record-routing proxy of her own, my variant (that
proxy's entry rewritten by the hop), and review 85's lead (a moved entry beside one
octet that is not UTF-8, which made the check read nothing); both variants failed on
the code before the fix.
"""

from __future__ import annotations

import re

import pytest

from e2m_lab.kamailio_harness import RawUas, SipUa, register_contact
from e2m_plugins.sip import SipMessage, make_response

pytestmark = [pytest.mark.kamailio, pytest.mark.openssl]

# review 81's TLS set-up: its users, alice over TLS, bob's phone, a MESSAGE to bob
from tests.kamailio.test_review81_wire import (USERS, _alice_tls, _bob_phone,  # noqa: E402
                                               _message_to_bob)


def _bind(proxy, contact: str, source: str) -> None:
    """bob binds ``contact`` (a full Contact value) over UDP, authenticated."""
    ua = SipUa(proxy.port, user="bob", password=USERS["bob"], source=source)
    try:
        reg = ua.build("REGISTER", "sip:example.com", headers=[("Expires", "600")])
        answer = ua.request(reg.replace("Contact", contact))
        assert answer is not None and answer.status == 200, answer
    finally:
        ua.close()


# -- hole 1: a sips: request forks to bob's second (UDP) contact ---------------------

def test_control_a_sips_request_to_a_lone_udp_contact_is_refused(proxy_factory, pki):
    """Review 81's fix holds for one contact: 480 with Warning 380, nothing relayed."""
    home = proxy_factory("r82-sips-one", e2m=False, tls=True, auth=True, users=USERS)
    bob = _bob_phone()
    register_contact(home, "bob", bob.port, password=USERS["bob"], source="127.0.0.121")
    ua = _alice_tls(home, pki, "127.0.0.122")
    try:
        assert ua.register().status == 200
        answer = _message_to_bob(ua, "sips", b"secret over sips")
        assert answer is not None and answer.status == 480, answer
        assert "380" in (answer.get("Warning") or "")
        assert bob.wait_for(1, method="MESSAGE", timeout=1.5) == []
    finally:
        ua.close()
        bob.close()


def test_control_a_sip_request_forks_to_both_of_bobs_contacts(proxy_factory, pki):
    """The set-up of hole 1 is sound: bob's two bindings (a TLS one preferred, q=1.0,
    and his UDP phone, q=0.5) are both live and a plain ``sip:`` MESSAGE is forked to
    both: the UDP phone gets it (as it may: alice did not ask for TLS)."""
    home = proxy_factory("r82-sip-fork", e2m=False, tls=True, auth=True, users=USERS)
    bob = _bob_phone()
    _bind(home, f"<sip:bob@127.0.0.1:{bob.port}>;q=0.5", "127.0.0.123")
    _bind(home, "<sip:bob@127.0.0.1:9;transport=tls>;q=1.0", "127.0.0.123")
    ua = _alice_tls(home, pki, "127.0.0.124")
    try:
        assert ua.register().status == 200
        answer = _message_to_bob(ua, "sip", b"plain sip, forked")
        assert answer is not None
        got = bob.wait_for(1, method="MESSAGE", timeout=3)
        assert [m.body for m in got] == [b"plain sip, forked"]
    finally:
        ua.close()
        bob.close()


def test_hole_a_sips_request_forks_to_a_udp_contact(proxy_factory, pki):
    home = proxy_factory("r82-sips-fork", e2m=False, tls=True, auth=True, users=USERS)
    bob = _bob_phone()
    _bind(home, f"<sip:bob@127.0.0.1:{bob.port}>;q=0.5", "127.0.0.125")
    _bind(home, "<sip:bob@127.0.0.1:9;transport=tls>;q=1.0", "127.0.0.125")
    ua = _alice_tls(home, pki, "127.0.0.126")
    try:
        assert ua.register().status == 200
        answer = _message_to_bob(ua, "sips", b"secret over sips")
        assert answer is not None            # authenticated and answered
        got = bob.wait_for(1, method="MESSAGE", timeout=3)
        # secure: no branch of a sips: request leaves over UDP
        assert got == [], "forked over UDP: %r" % [(m.request_uri, m.body) for m in got]
    finally:
        ua.close()
        bob.close()


# -- holes 2, 3: a hop on bob's leg moves alice's leg without touching our entry ------

def _callee_behind_hop(rewrite, branch: bool = False) -> RawUas:
    """bob's UAS; its 200 passes a hop on his UDP leg that applies ``rewrite`` to the
    whole Record-Route list (top first) of the proxy's double Record-Route and, with
    ``branch``, changes the last character of the proxy's Via branch (review 86: tm
    then finds no transaction)."""
    uas = RawUas()

    def respond(request: SipMessage) -> SipMessage:
        answer = make_response(request, 200, "OK")
        if request.method == "INVITE":
            answer = answer.replace("To", f"{request.get('To')};tag=bt82")
            answer = answer.add("Contact", f"<sip:bob@127.0.0.1:{uas.port}>")
            answer = answer.remove("Record-Route")         # the hop's version instead
            for route in rewrite(list(request.get_all("Record-Route"))):
                answer = answer.add("Record-Route", route)
            if branch:
                vias = answer.get_all("Via")
                top = re.sub(r"(branch=[^;,\s]*)([^;,\s])", lambda m: m.group(1) +
                             ("x" if m.group(2) != "x" else "y"), vias[0], count=1)
                answer = answer.remove("Via")
                for via in [top] + vias[1:]:
                    answer = answer.add("Via", via)
        return answer
    uas.responder = respond
    return uas


HOP_PORT = 5999        # the hop's own UDP address (nothing needs to listen: the test
                       # reads the route set alice is handed)


def _alices_first_hop(ok: SipMessage | None) -> str | None:
    """The entry alice's in-dialog requests go to first (RFC 3261 12.1.2: the route
    set is the Record-Route list reversed), when she got a 200."""
    if ok is None or ok.status != 200:
        return None
    routes = [r.strip() for value in ok.get_all("Record-Route") for r in value.split(",")]
    return routes[-1] if routes else None


def _call(home, pki, bob_source, alice_source, rewrite,
          callers_side: list[str] = ()) -> tuple[SipMessage | None, str]:
    """alice's INVITE (with ``callers_side`` as the Record-Route her own side's proxies
    added) to bob behind the hop; the 200 (None if dropped) and the proxy's log."""
    bob = _callee_behind_hop(rewrite)
    register_contact(home, "bob", bob.port, password=USERS["bob"], source=bob_source)
    ua = _alice_tls(home, pki, alice_source)
    try:
        assert ua.register().status == 200
        mark = home.log_mark()
        invite = ua.build("INVITE", "sip:bob@example.com", to="sip:bob@example.com",
                          headers=[("Record-Route", r) for r in callers_side])
        ok = ua.request(invite, timeout=4)
        return ok, home.log_since(mark)
    finally:
        ua.close()
        bob.close()


def test_control_a_rewritten_entry_with_our_token_is_still_dropped(proxy_factory, pki):
    """Review 81's fix holds for its own attack: our TLS entry rewritten to the hop
    (token kept) and the 200 is dropped."""
    home = proxy_factory("r82-rr-moved", e2m=False, tls=True, auth=True, users=USERS)

    def moved(routes: list[str]) -> list[str]:
        return [re.sub(r"sip:127\.0\.0\.1:\d+;transport=tls", f"sip:127.0.0.1:{HOP_PORT}", r)
                for r in routes]
    ok, log = _call(home, pki, "127.0.0.127", "127.0.0.128", moved)
    assert ok is None or ok.status != 200, ok
    assert "not ours: dropped" in log


def test_control_the_untouched_route_set_leads_alice_to_the_tls_socket(proxy_factory, pki):
    home = proxy_factory("r82-rr-ok", e2m=False, tls=True, auth=True, users=USERS)
    ok, _ = _call(home, pki, "127.0.0.129", "127.0.0.130", lambda routes: routes)
    first = _alices_first_hop(ok)
    assert first is not None and f":{home.tls_port};transport=tls" in first, ok


def test_hole_a_hop_adds_its_own_entry_on_the_callers_side(proxy_factory, pki):
    home = proxy_factory("r82-rr-added", e2m=False, tls=True, auth=True, users=USERS)

    def added(routes: list[str]) -> list[str]:      # ours untouched, one more below
        return routes + [f"<sip:127.0.0.1:{HOP_PORT};lr>"]
    ok, log = _call(home, pki, "127.0.0.131", "127.0.0.132", added)
    first = _alices_first_hop(ok)
    # secure: a 200 that reaches alice starts her route set at our TLS socket
    assert first is None or f":{home.tls_port};transport=tls" in first, first
    assert "added or changed on the caller's side of ours), not ours: dropped" in log


# Fixed (stop 34): what follows our entry must be what the request reached us with.
CALLERS_PROXY = "<sip:127.0.0.1:7777;transport=tls;lr>"


def test_control_the_callers_own_proxy_stays_her_first_hop(proxy_factory, pki):
    """alice behind a proxy of her own that record-routed: the 200 carries its entry
    below ours, as the INVITE did, and passes; her route set starts at her proxy."""
    home = proxy_factory("r82-rr-callers", e2m=False, tls=True, auth=True, users=USERS)
    ok, _ = _call(home, pki, "127.0.0.137", "127.0.0.138", lambda routes: routes,
                  callers_side=[CALLERS_PROXY])
    assert ok is not None and ok.status == 200, ok
    assert _alices_first_hop(ok) == CALLERS_PROXY


def test_a_hop_rewriting_the_callers_own_proxy_entry_is_dropped(proxy_factory, pki):
    """My variant of review 82's hole: the hop leaves ours alone and rewrites the entry
    below it (alice's own proxy, her first hop) to itself: the 200 is dropped."""
    home = proxy_factory("r82-rr-callers-moved", e2m=False, tls=True, auth=True, users=USERS)

    def rewritten(routes: list[str]) -> list[str]:
        return [r.replace("127.0.0.1:7777;transport=tls", f"127.0.0.1:{HOP_PORT}")
                for r in routes]
    ok, log = _call(home, pki, "127.0.0.139", "127.0.0.140", rewritten,
                    callers_side=[CALLERS_PROXY])
    assert ok is None or f"127.0.0.1:{HOP_PORT}" not in (_alices_first_hop(ok) or ""), ok
    assert "caller's side of ours), not ours: dropped" in log


def test_hole_a_hop_pushes_the_moved_entry_past_the_read_bound(proxy_factory, pki):
    home = proxy_factory("r82-rr-pushed", e2m=False, tls=True, auth=True, users=USERS)

    def pushed(routes: list[str]) -> list[str]:
        moved = [re.sub(r"sip:127\.0\.0\.1:\d+;transport=tls", f"sip:127.0.0.1:{HOP_PORT}", r)
                 for r in routes]
        return [f"<sip:127.0.0.1:{HOP_PORT};lr;n={i}>" for i in range(16)] + moved
    ok, log = _call(home, pki, "127.0.0.133", "127.0.0.134", pushed)
    first = _alices_first_hop(ok)
    # secure: dropped as review 81's rewrite is
    assert first is None or f"127.0.0.1:{HOP_PORT}" not in first, first


def test_a_moved_entry_written_without_brackets_is_not_vouched_for(proxy_factory, pki):
    """Stop 33, my own variant: the hop moves our TLS entry to itself and drops the
    ``<>`` around it, so the entry check (which reads ``<...>`` entries) would not see
    our token.  RFC 3261's Record-Route is a name-addr: an entry without brackets is
    not vouched for, and the 200 is dropped."""
    home = proxy_factory("r82-rr-bare", e2m=False, tls=True, auth=True, users=USERS)

    def bare(routes: list[str]) -> list[str]:
        moved = [re.sub(r"sip:127\.0\.0\.1:\d+;transport=tls", f"sip:127.0.0.1:{HOP_PORT}", r)
                 for r in routes]
        return [r.strip().lstrip("<").replace(">", "", 1) for r in moved]
    ok, log = _call(home, pki, "127.0.0.135", "127.0.0.136", bare)
    first = _alices_first_hop(ok)
    assert first is None or f"127.0.0.1:{HOP_PORT}" not in first, first
    assert "not ours: dropped" in log


# -- hole 4: REGISTERs the registrar reads as binding nothing hold slots for an hour --

def _register_raw(user: str, contact: str, expires: str | None) -> bytes:
    from e2m_lab.kamailio_harness import build_request
    headers = [("Contact", contact)]
    if expires is not None:
        headers.append(("Expires", expires))
    return build_request("REGISTER", "sip:example.com", from_user=user, to_user=user,
                         headers=headers)


@pytest.fixture
def capped(proxy_factory):
    return proxy_factory("r82-cap", e2m=False,
                         limits={"pike_requests": 0, "registrations_per_source": 3})


def _status(proxy, request: bytes, source: str):
    from e2m_lab.kamailio_harness import udp_transaction
    answer = udp_transaction(proxy.port, request, source=source)
    return answer.status if answer is not None else None


def _bound(proxy, user: str) -> bool:
    from e2m_lab.kamailio_harness import build_request
    message = build_request("MESSAGE", f"sip:{user}@example.com", to_user=user,
                            body=b"hi", content_type="text/plain")
    return _status(proxy, message, "127.0.0.199") != 404


# (Contact, Expires) spellings a stranger sends for his junk AoRs
_NOTHING = {
    "empty-expires-param": ("<sip:{u}@127.0.0.9:4444>;expires=", "0"),
    "two-contacts-expires-0": ("<sip:{u}@127.0.0.9:4444>;expires=0, "
                               "<sip:{u}@127.0.0.9:4445>;expires=0", "0"),
    "star-with-another": ("*, <sip:{u}@127.0.0.9:4444>", "0"),
}


@pytest.mark.parametrize("shape", sorted(_NOTHING))
def test_control_each_junk_register_binds_nothing(capped, shape):
    contact, expires = _NOTHING[shape]
    user = f"r82c{shape[:5]}"
    _status(capped, _register_raw(user, contact.format(u=user), expires), "127.0.0.140")
    assert not _bound(capped, user)


@pytest.mark.parametrize("shape", sorted(_NOTHING))
def test_hole_registers_binding_nothing_still_hold_slots(capped, shape):
    contact, expires = _NOTHING[shape]
    shared = "127.0.0.%d" % (141 + sorted(_NOTHING).index(shape))
    users = [f"r82j{n}{shape[:5]}" for n in range(3)]
    for user in users:
        _status(capped, _register_raw(user, contact.format(u=user), expires), shared)
    assert not any(_bound(capped, u) for u in users)        # the set-up: nothing bound
    bob = _status(capped, _register_raw("r82bob" + shape[:4],
                                        f"<sip:r82bob@{shared}:4444>", "3600"), shared)
    assert bob == 200, f"bob's first REGISTER from {shared} got {bob}, nothing bound there"


def test_control_plain_deregistrations_take_no_slot(capped):
    """Review 80's fix holds for its own spelling (one contact, ``Expires: 0``), and
    the same junk spellings with a live binding count (the cap is not simply off)."""
    shared = "127.0.0.150"
    for n in range(3):
        assert _status(capped, _register_raw(f"r82p{n}", f"<sip:r82p{n}@{shared}:4444>",
                                             "0"), shared) == 200
    assert _status(capped, _register_raw("r82pbob", f"<sip:r82pbob@{shared}:4444>", "3600"),
                   shared) == 200


def test_a_moved_entry_beside_an_octet_that_is_not_utf8_is_dropped(proxy_factory, pki):
    """Review 85's lead: one octet that is not UTF-8 in any Record-Route entry made the
    entry check read nothing (``UnicodeDecodeError`` → no entries), so review 81's
    rewrite passed beside it.  Now what cannot be read is not vouched for."""
    home = proxy_factory("r82-rr-octet", e2m=False, tls=True, auth=True, users=USERS)

    def moved(routes: list[str]) -> list[str]:
        return [re.sub(r"sip:127\.0\.0\.1:\d+;transport=tls", f"sip:127.0.0.1:{HOP_PORT}", r)
                for r in routes] + ["<sip:127.0.0.1:5998;lr;x=\udcff>"]
    ok, log = _call(home, pki, "127.0.0.141", "127.0.0.142", moved)
    assert ok is None or f"127.0.0.1:{HOP_PORT}" not in str(ok.get_all("Record-Route")), ok
    assert "not UTF-8), not ours: dropped" in log


def test_a_hop_taking_our_entries_out_is_dropped(proxy_factory, pki):
    """Stop 34, my variant after review 86: the hop takes our entries out of bob's 200
    and puts its own in their place, no token at all, so no entry check ever saw one of
    ours.  A reply to a request we record-routed must hold our entry: dropped."""
    home = proxy_factory("r82-rr-removed", e2m=False, tls=True, auth=True, users=USERS)

    def replaced(routes: list[str]) -> list[str]:
        return [f"<sip:127.0.0.1:{HOP_PORT};lr>"]
    ok, log = _call(home, pki, "127.0.0.143", "127.0.0.144", replaced)
    assert ok is None or f"127.0.0.1:{HOP_PORT}" not in (_alices_first_hop(ok) or ""), ok
    assert "(no entry of ours), not ours: dropped" in log
