"""An eightieth attacker's review (December 2026) of 3653837: stop 33's fixes attacked -
``kemi.count_registration`` / ``_claim_slot`` (review 78: a source's count is its live
slots ``source#1..N`` in e2mregs, each tagged with its pair's digest bits), review 79's
line-end checks (``kemi._bare_line_ends``, ``sip.parse(exact=True)``) and review 78's
``pgconn.SEARCH_PATH_OPTION`` / ``db_cmd._NODE_SCHEMAS``.  The count is run against
review 72's model of Kamailio's ``e2mregs`` htable and review 74's model of the
registrar's location table (``tests/unit/test_review74.py``), here granting what the
REGISTER asks (``Expires: 0`` binds nothing).

Hole 1 (``test_hole_deregistrations_lock_a_shared_address_out_for_an_hour`` and
``test_hole_a_one_minute_burst_locks_a_shared_address_out_for_an_hour``)

Attacker: an off-path sender forging the UDP source S of an address several phones
share (an office or hotel NAT, CGNAT), where the registrar is open (no ``[auth]``); or,
with no forgery, a stranger sharing S.

Messages: once, from S, ``registrations_per_source`` REGISTERs for AoRs of his own, each
``Expires: 0`` (a de-registration: the registrar binds nothing and answers 200), or
``Expires: 60``.

Effect: S holds no live AoR (none at all with ``Expires: 0``; none after a minute with
``Expires: 60``), yet every slot of S is taken for ``MAX_EXPIRES`` (3600 s) after the
burst: bob's first REGISTER from S a minute (two minutes) later is 403 "Too Many
Registrations From This Address", and so is every new phone behind S for the hour.
Review 78's rule says "a source's count is its live AoRs and nothing else"; here it is
the AoRs *named in a REGISTER* in the last hour, registered or not: one burst of N
datagrams that binds nothing (no trace in the location table, so nothing for the
operator to find) buys an hour's lock-out, 12 times pike's ``ban_time`` (the known limit
"get an address banned by spoofing UDP from it"), renewable with N more datagrams an
hour.  The same without an attacker: phones behind S that de-register (a user logs
out, a phone re-provisioned under another AoR) keep their slots for the hour.
At fault: ``kamailio_app/kemi.py`` ``count_registration``: a slot is claimed before the
registrar reads the Contact and Expires (``index = self._claim_slot(source, limit)``,
then ``KSR.htable.sht_seti(_REGS, _slot_name(source, index), tag)``), with e2mregs'
autoexpire (``MAX_EXPIRES``) as its only lifetime; ``route_register`` then calls
``KSR.registrar.save`` whatever the REGISTER binds.
Fix: claim no slot for a REGISTER that binds nothing (every Contact ``expires=0``,
``Expires: 0``, ``Contact: *``, or no Contact: a fetch) and release the pair's slot
when its AoR is de-registered (``sht_rm`` the slot and the pair); give a slot the
lifetime the registrar granted (``sht_setxi`` with the granted expires, read after
``save`` from the 200's Contact, or the smaller of Expires and ``MAX_EXPIRES``) rather
than ``MAX_EXPIRES``.

The same at a front (``test_hole_the_front_counts_deregistrations_for_an_hour``, control
``test_control_the_front_relays_bob_without_the_burst``): it counts for its nodes.

Controls: ``test_control_without_the_burst_bob_registers_from_s`` (the same timeline
without the burst), ``test_control_the_burst_binds_nothing`` (the set-up: the registrar
binds none of the burst's AoRs, S has no live AoR when bob is refused),
``test_control_a_fourth_live_aor_is_still_refused`` (the cap holds for live AoRs: the
secure behaviour asked for is not "no cap") and
``test_control_the_lock_out_ends_after_max_expires`` (bounded by the autoexpire, as the
README says: the hole is its length against what S registered).

Hole 2 (``test_hole_an_exact_parse_takes_a_head_ending_in_a_bare_cr``,
``test_hole_bare_line_ends_misses_a_blank_line_that_is_a_bare_cr``): the core half of
``tests/kamailio/test_review80_wire.py`` / ``tests/pjsua/test_review80_phone.py``: a
head whose last line is followed by a lone CR (``...Content-Length: 0\\r\\n\\r``) is
taken by ``sip.parse(exact=True)`` (``_parse_head`` strips a trailing CR from a last line
with no LF and reads the empty rest as the blank line; the exact check counts LFs only)
and by ``kemi._bare_line_ends`` (counts LFs only; Kamailio ends the head at a line
starting with CR, ``$bs`` 0).  Relayed down a TCP phone's connection, pjsip (head ends
only at ``\\n\\r\\n``) takes the next message into it: alice's MESSAGE 408.
Fix: refuse a head that does not end in ``\\r\\n\\r\\n`` or holds a CR not followed by LF.

Tried and held (read, or run where named):
- Slot races between workers: two workers claiming one free slot - only the increment
  that takes it from 0 to 1 wins, the other moves on (over-count, fail closed); a late
  increment on a slot already tagged makes it tag+1, which no pair matches: that AoR
  takes a new slot at its next refresh and the orphan expires after ``MAX_EXPIRES``
  (over-count by one, bounded).  Copies of one REGISTER: two slots, one orphaned and
  expiring (documented).
- Tag collisions (28 bits of the digest): a colliding AoR can only be read as a refresh
  of a slot its own pair names, and a pair and its slot are written together with the
  same lifetime, so a collision buys at most one uncounted AoR for the second or so
  between the two writes' expiry; no way to renew another pair's slot.
- A pair pointing at a slot another pair took after expiry: the tag check sends it to a
  new slot (``test_control_a_pair_whose_slot_was_retaken_claims_a_new_one``).
- A refused attempt writes nothing (review 78's own test) and items per source are
  ``2 x registrations_per_source`` at most (slots + pairs), each for ``MAX_EXPIRES``.
- Spellings of one AoR (``sip:``/``sips:``, host case, parameters, %-escapes): the pair
  is a function of the registrar's key or finer (over-count, never under).
- Line ends: a bare CR inside a header line or ``CR CR LF`` (the core's ``_CTL``
  refuses: 400 for every request the core reads), a folded line, leading keep-alive
  CRLFs, the compact ``l:`` (review 79's controls), bare LF anywhere in the head
  (review 79's fix, ``test_control_bare_lf_is_still_refused``).
- ``SEARCH_PATH_OPTION``: see ``tests/cluster/test_review78_cluster.py``; not re-run here.

Fixed (stop 33): ``sip.crlf_head`` (a head ends in CRLF CRLF, every CR and LF in a
CRLF pair) in ``parse(exact=True)`` and ``kemi._bare_line_ends``; ``count_registration``
takes no slot for a REGISTER that binds nothing and gives a slot the lifetime the
binding asked for (``kemi._asked_lifetime``, ``sht_setxi``).  The holes turned XPASS and
the markers are gone; the control "the lock-out ends after MAX_EXPIRES" asserted the
old lifetime and is now ``test_a_one_minute_burst_holds_the_address_for_a_minute_only``.
The fixtures' REGISTER now carries one contact and ``Expires: 3600`` (what their
location model grants), since the proxy reads them.
"""

from __future__ import annotations

import base64
import sys
import types

import pytest

from e2m_plugins import sip
from e2m_plugins.errors import MalformedError
from tests.unit.test_review74 import front, node  # noqa: F401  (fixtures)

S = "192.0.2.80"                 # a shared address: the stranger forges it, bob sits behind it


def _granting(proxy):
    """The location model grants what the REGISTER asks (``Expires: 0`` binds nothing);
    ``register(source, aor, expires)``."""
    location = proxy.location

    def save(table: str, flags: int) -> int:
        expires = location.vars.get("e2m-test-expires", proxy.max_expires)
        aor = location.vars["$tu"]
        if expires == 0:
            location.aors.pop(aor, None)
        else:
            location.aors[aor] = proxy.clock[0] + min(expires, proxy.max_expires)
        return 1
    location.save = save

    def register(source: str, aor: str, expires: int):
        location.vars["e2m-test-expires"] = expires
        location.vars["$hdr(Expires)"] = str(expires)     # what the proxy reads
        return proxy.register(source, aor)
    return register


def _burst(proxy, register, expires: int) -> None:
    assert [register(S, f"sip:junk{n}@example.com", expires) for n in range(3)] == [None] * 3


def test_control_without_the_burst_bob_registers_from_s(node):  # noqa: F811
    register = _granting(node)
    node.clock[0] += 60
    assert register(S, "sip:bob@example.com", 3600) is None
    assert node.location.live() == ["sip:bob@example.com"]


def test_control_the_burst_binds_nothing(node):  # noqa: F811
    register = _granting(node)
    _burst(node, register, 0)
    assert node.location.live() == []
    _burst(node, register, 60)
    node.clock[0] += 120
    assert node.location.live() == []


def test_control_a_fourth_live_aor_is_still_refused(node):  # noqa: F811
    register = _granting(node)
    assert [register(S, f"sip:user{n}@example.com", 3600) for n in range(4)] == \
        [None, None, None, 403]


def test_a_one_minute_burst_holds_the_address_for_a_minute_only(node):  # noqa: F811
    """Fixed (stop 33; was the control "the lock-out ends after MAX_EXPIRES"): slots
    live as long as the binding asked for, so three one-minute junk registrations
    hold S for about a minute, then bob registers."""
    register = _granting(node)
    _burst(node, register, 60)
    assert register(S, "sip:bob@example.com", 3600) == 403       # the cap, while they live
    node.clock[0] += 60 + 11
    assert register(S, "sip:bob@example.com", 3600) is None


def test_control_a_pair_whose_slot_was_retaken_claims_a_new_one(node):  # noqa: F811
    """alice's pair outlives her slot (written a moment later); carol takes the slot;
    alice's next REGISTER is not taken for a refresh of carol's slot."""
    register = _granting(node)
    assert register(S, "sip:alice@example.com", 3600) is None
    htable = sys.modules["KSR"].htable
    value, _ = htable.items[f"{S}#1"]
    htable.items[f"{S}#1"] = (value, node.clock[0] - 1)        # the slot alone expired
    assert register(S, "sip:carol@example.com", 3600) is None    # takes slot 1
    assert register(S, "sip:alice@example.com", 3600) is None    # a new slot, not carol's
    assert htable.sht_get("e2mregs", f"{S}#2") not in (0, None)
    assert register(S, "sip:dave@example.com", 3600) is None
    assert register(S, "sip:erin@example.com", 3600) == 403


def test_hole_deregistrations_lock_a_shared_address_out_for_an_hour(node):  # noqa: F811
    register = _granting(node)
    _burst(node, register, 0)
    node.clock[0] += 60
    bob = register(S, "sip:bob@example.com", 3600)
    assert bob is None, (f"bob's first REGISTER from {S} got {bob} a minute after three "
                         f"de-registrations; live AoRs from S: {node.location.live()}")


def test_hole_a_one_minute_burst_locks_a_shared_address_out_for_an_hour(node):  # noqa: F811
    register = _granting(node)
    _burst(node, register, 60)
    node.clock[0] += 120
    assert node.location.live() == []
    bob = register(S, "sip:bob@example.com", 3600)
    assert bob is None, f"bob's REGISTER from {S} got {bob} with no live AoR there"


def test_hole_the_front_counts_deregistrations_for_an_hour(front):  # noqa: F811
    register = _granting(front)
    _burst(front, register, 0)
    front.clock[0] += 60
    bob = register(S, "sip:bob@example.com", 3600)
    assert bob is None, f"the front refused bob's first REGISTER from {S}: {bob}"


def test_control_the_front_relays_bob_without_the_burst(front):  # noqa: F811
    register = _granting(front)
    front.clock[0] += 60
    assert register(S, "sip:bob@example.com", 3600) is None


# -- line ends ------------------------------------------------------------------

def _bodiless() -> bytes:
    wire = sip.make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:mallory@example.com",
                            to_uri="sip:bob@example.com", via_host="127.0.0.1:5070").serialize()
    assert wire.endswith(b"Content-Length: 0\r\n\r\n")
    return wire


def test_control_a_crlf_head_parses_exactly():
    assert sip.parse(_bodiless(), exact=True).method == "MESSAGE"


def test_control_bare_lf_is_still_refused():
    with pytest.raises(MalformedError):
        sip.parse(_bodiless()[:-2] + b"\n", exact=True)


@pytest.mark.parametrize("shape", [b"X-Pad: a\rb\r\n\r\n", b"X-Pad: ab\r\r\n\r\n"],
                         ids=["bare-cr-in-a-line", "cr-cr-lf"])
def test_control_a_cr_inside_a_line_is_refused(shape):
    with pytest.raises(MalformedError):
        sip.parse(_bodiless()[:-2] + shape, exact=True)


def test_hole_an_exact_parse_takes_a_head_ending_in_a_bare_cr():
    with pytest.raises(MalformedError):
        sip.parse(_bodiless()[:-1], exact=True)


def _kemi_with(monkeypatch, data: bytes, body_size: int):
    fake = types.ModuleType("KSR")
    fake.kx = types.SimpleNamespace(get_def=lambda name: None)
    monkeypatch.setitem(sys.modules, "KSR", fake)
    sys.modules.pop("kamailio_app.kemi", None)
    import kamailio_app.kemi as kemi
    monkeypatch.setattr(kemi, "KSR", fake)
    vars_: dict[str, int] = {}

    def get(name):
        if name == "$ml":
            return len(data)
        if name == "$bs":
            return body_size
        if name == kemi._PIECE:
            off, n = vars_["$var(e2m_off)"], vars_["$var(e2m_len)"]
            return base64.b64encode(data[off:off + n]).decode()
        if name == kemi._WHOLE:            # since stop 37 the head is read from the whole
            return base64.b64encode(data).decode()
        return None
    fake.pv = types.SimpleNamespace(get=get, seti=lambda name, value: vars_.__setitem__(name, value))
    return kemi


@pytest.fixture
def unload_kemi():
    yield
    sys.modules.pop("kamailio_app.kemi", None)


def test_control_bare_line_ends_catches_a_bare_lf(monkeypatch, unload_kemi):
    wire = _bodiless()[:-2] + b"\n"
    assert _kemi_with(monkeypatch, wire, 0)._framing_problem() == (400, "Lines Must End In CRLF")
    assert _kemi_with(monkeypatch, _bodiless(), 0)._framing_problem() is None


def test_hole_bare_line_ends_misses_a_blank_line_that_is_a_bare_cr(monkeypatch, unload_kemi):
    wire = _bodiless()[:-1]            # Kamailio: head ends at the CR line, $bs = 0
    assert _kemi_with(monkeypatch, wire, 0)._framing_problem() == (400, "Lines Must End In CRLF")
