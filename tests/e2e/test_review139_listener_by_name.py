"""Review 139 (attacker's review of 420c994), area 1: the phone's TCP/TLS listener found by
the address it is bound to (``find_listener``, ``_same_host``), the ungated listener as
an ``EndpointError`` (``SipEndpoint._gate_listener``), ``admit_program`` with up to 64
addresses.  Real ``e2m-phone listen`` processes (bob, ``[phone] proxy`` at 127.0.0.2
where nobody listens), plain sockets from other loopback addresses, no Kamailio (the
``lab`` fixture of ``tests/e2e/test_phone_stranger.py``, as review 138's module).

Honest break HB1: a phone whose ``host`` is a name no longer starts
--------------------------------------------------------------------

- Who: **nobody** (an honest configuration).  ``[phone] host = "localhost"`` (any host
  name pjsip resolves; ``"127.1"`` too, an ``inet_aton`` spelling pjsip takes), with a
  proxy: the UDP phone with its TCP listener, a TCP phone, a TLS phone.
- Observed: the phone exits at start, rc 1, stderr ``e2m-phone: cannot start: the TCP
  listener's socket was not found: its connections cannot be bounded`` (UDP, TCP and
  ``127.1``), ``... the TLS listener's socket was not found: it cannot be kept from
  strangers`` (TLS).  On the parent commit ``ceb65fb`` (before review 138's fix) the same
  configurations started, published ``127.0.0.1:<port>``, and the guard had found the
  listener (``stats()["tcp"]``: ``listener_found: True``, ``admitted_sources: 1``): the
  gate worked for them and the fix took it from them.  The listener exists: pjsip bound
  it to 127.0.0.1 (the address the name resolves to), which ``find_listener`` is asked
  to match against the text ``"localhost"``.  This very module run on ``ceb65fb``: the
  three HB1 tests pass there (XPASS(strict): started, listener found, the home's OPTIONS
  answered, 127.0.0.50 not connected, TLS connected by nobody).
- Code at fault: ``pjsua_hooks/tcpguard.py:121-125`` (``_same_host``: when ``host`` is
  not an IP literal it compares the socket's address text with the name, which can never
  be equal) called with ``self.host``, the configured text, at
  ``pjsua_hooks/endpoint.py:394`` (TLS) and ``:434`` (TCP); both now raise
  ``EndpointError`` (``:397``, ``:437``), which ``phone.py`` turns into "cannot start".
  Nothing in the settings (``phone.py:171``, ``:222``) says ``host`` must be an IP
  literal, and ``pjsua_hooks/README.md`` does not either.
- Suggested fix: match the listener by port and by what pjsip actually bound: compare
  with the resolved ``host`` (``getaddrinfo``, as pjsip's ``pj_sockaddr_in_set_str_addr``
  resolves it), or with the wildcard *or* the published address (``info.host``), or
  refuse a non-literal ``host`` when the settings are loaded with a clear message.
- Test: ``test_hb1_a_phone_bound_by_name_starts_with_its_gate[udp|tcp|tls]`` (strict
  xfail).

Controls (unmarked, pass)
-------------------------

- ``test_control_hb1_the_same_phone_bound_by_address_starts_gated[udp|tcp|tls]``: the
  same configurations with ``host = "127.0.0.1"`` start; the TCP guard has its listener
  and one admitted address; the home's OPTIONS over TCP is answered and 127.0.0.50's
  connection is never completed (TLS: no connection from anyone completes).
- ``test_control_a_wildcard_phone_admits_the_home_alone``: review 138 K1's fix working on
  ``0.0.0.0``: listener found, the home answered, the stranger not connected.

Tried and held (area 1)
-----------------------

- ``admit_program`` read and run on real listening sockets (``/tmp``-only script, not
  kept): with 64 addresses (63 IPv6 + one IPv4, 585 instructions; one IPv6 + 63 IPv4) the
  admitted source connected and 127.0.0.3 did not; on a dual-stack ``::`` listener the
  IPv4 home (127.0.0.2) and the IPv6 home (``::1``) connected, 127.0.0.3 did not, and
  ``::1`` no longer connected once the filter admitted only ``::2``.  Every ``jf`` offset
  lands on the next address (9 instructions per IPv6 address, 2 per IPv4); the ``ja``
  lands on the IPv4 block.  The kernel's socket-option memory (``optmem_max`` 131072
  here) takes the 585-instruction filter, and an accepted connection inherits it.
- A wildcard-bound phone (``0.0.0.0``, the control) is found and gated now; ``::`` and
  TLS on ``0.0.0.0`` are review 138's own tests (not re-run here).
- ``_same_host`` with a second socket on the same port: within one process no other
  listening socket can share the port with a different address once ``0.0.0.0`` holds
  it (bind fails), and a UDP socket is not ``SOCK_STREAM`` (read).
- A home of 65 distinct addresses: ``admit_only`` raises, ``E2MPhone.start`` turns it
  into ``PhoneError`` (read); duplicates, IPv4-mapped spellings and names that do not
  resolve are not counted (read).

Area 2, ``pjsua_hooks/late_2xx.py`` (read; the unit controls are in
``tests/unit/test_review139_late_2xx_and_sdp.py``)
------------------------------------------------------------------------------------

- A second BYE for one 2xx: the key (Call-ID, CSeq number, branch, To tag lower-cased)
  is the engine's own exact match (``UAEngine._sent_key`` compares Call-ID and branch as
  received), so a re-cased branch or Call-ID is not a late answer at all; an entry
  evicted for room stays in ``_answered`` for ``MAX_AGE`` and its copy gets nothing; once
  ``_answered`` forgets it (``> MAX_AGE`` after the 2xx) the engine no longer calls any
  2xx of that INVITE late (its failure is older still, ``TRANSACTION_LIFETIME`` is the
  same 32 s).  Control: 40 late 200s over 7 INVITEs, every one again with other octets:
  40 BYEs, not one more.
- Keeping an honest late 2xx unanswered: ``_answered`` at 1024 needs 171 failed INVITEs
  of the victim within 32 s (6 To tags each); the 6-per-INVITE bound is the one
  pre-existing since review 129 (a callee that answers the same INVITE with 6 tags first
  takes its places, as before).  Control: after 40 entries (8 evicted) a new INVITE's
  late 200 still gets its ACK and BYE.
- State: ``_entries`` at most 32, ``_answered`` at most 1024 keys, each aged out.
- An evicted entry's BYE answered 407 is not retried (``bye_answered`` looks in
  ``_entries`` only): needs 32 more late 2xx between a BYE and its challenge; a hop able
  to delay that 407 can drop the BYE anyway (read, not run).

Area 3, ``e2m_plugins/sdp.py`` (differential, run, not kept)
-------------------------------------------------------------

- 200 000 random SDPs of real lines joined by CRLF or LF, with 0-3 insertions of CR, LF,
  NUL, CRLF, VT, FF, FS, 0xFF, ``é``, an encoded surrogate (ED A0 80), an overlong
  ``/`` (C0 AF), U+2028, U+0085, a BOM, an out-of-range F4 90 80 80, a truncated
  sequence: ``parse_lines``, ``media_summary`` and ``separate_keys`` of the new
  ``sdp.py`` and of the one before (``921de1b``) gave the same lines, summaries, views
  and exception classes for every input (0 differences).  ``str.split("\\n")`` splits at
  LF alone (U+2028 and U+0085 are not line ends for it, unlike ``splitlines``); no
  ASCII octet occurs inside a UTF-8 sequence, so the byte and text lines align.
- The ``lru_cache`` on ``_canonical_address``: a pure check that returns None or
  raises; exceptions are not cached, so a refused address is refused every time; keys
  are the exact strings (``010.0.0.1`` and ``10.0.0.1`` are different entries); 256
  entries bound it.  Flushing it with many addresses costs only the old speed.
- ``SdpLine`` as a ``NamedTuple``: no code hashes, compares or ``replace``\\ s lines
  (grep); ``attribute`` is still a property.
- Only difference found: which error comes first when an SDP has both a non-UTF-8 octet
  and an earlier bad line (now always "SDP is not UTF-8"); both are refusals.

Area 4, ``notifier.in_dialog_hop`` / ``_transport``, ``body.refuse_encoded_plaintext``:
not reached in the time (read ``_transport`` only: ``sips`` with ``transport=tcp`` or
none is TLS, anything else is what it says).

Fixed (stop 44), HB1: ``find_listener`` matches the listening socket against what the
phone's host resolves to (an address as it is; a name or an ``inet_aton`` form such as
``127.1`` through ``getaddrinfo``, as pjsip resolved it when binding).  The three hole
tests failed on the code before (``cannot start``) and pass now; the controls still
pass, and so does review 138's module.
"""

from __future__ import annotations

import socket

import pytest

from tests.e2e.test_phone_stranger import lab, pki  # noqa: F401 (fixtures)
from tests.e2e.test_udp_phone_tcp_listener import _tcp_request

pytestmark = [pytest.mark.pjsua2]

HOME = "127.0.0.2"            # the outbound proxy's address (nobody listens there)
STRANGER = "127.0.0.50"       # an off-path sender's address
PROXY = {"udp": f"sip:{HOME}:5090", "tcp": f"sip:{HOME}:5090;transport=tcp",
         "tls": f"sips:{HOME}:5091"}


def _answered(port: int, source: str) -> int | None:
    """The final status an OPTIONS over a fresh TCP connection from ``source`` gets
    (None: no connection completed, or no answer)."""
    answer = _tcp_request(port, "OPTIONS", source=source, timeout=2)
    return None if answer is None else answer.status


def _connects(port: int, source: str) -> bool:
    """Whether a TCP connection from ``source`` to 127.0.0.1:``port`` completes."""
    with socket.socket() as sock:
        sock.settimeout(2)
        sock.bind((source, 0))
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _gated(bob, transport: str) -> None:
    """The started phone keeps strangers off its listener and lets its home in."""
    assert bob.alive
    if transport == "tls":
        # the TLS listener's gate is shut for good: nobody's connection completes
        assert not _connects(bob.port, STRANGER)
        return
    status = bob.status()["tcp"]
    assert status["listener_found"] and status["admitted_sources"] == 1, status
    assert _answered(bob.port, HOME) is not None          # the home gets in
    assert _answered(bob.port, STRANGER) is None          # the stranger does not


# -- honest break HB1: a phone bound by name ---------------------------------------------

@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_hb1_a_phone_bound_by_name_starts_with_its_gate(lab, transport):
    bob = lab.phone(phone={"transport": transport, "host": "localhost",
                           "proxy": PROXY[transport]}, wait_started=False)
    try:
        bob.wait("started", timeout=15)
    except AssertionError:
        raise AssertionError(f"the phone did not start (rc={bob.process.poll()}): "
                             f"{bob.stderr()[-300:]!r}") from None
    _gated(bob, transport)


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_control_hb1_the_same_phone_bound_by_address_starts_gated(lab, transport):
    bob = lab.phone(phone={"transport": transport, "host": "127.0.0.1",
                           "proxy": PROXY[transport]})
    _gated(bob, transport)


def test_control_a_wildcard_phone_admits_the_home_alone(lab):
    bob = lab.phone(phone={"transport": "udp", "host": "0.0.0.0", "proxy": PROXY["udp"]})
    _gated(bob, "udp")
