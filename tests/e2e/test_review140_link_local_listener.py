"""Review 140 (attacker's review of 5d623eb), area 3: the phone's TCP/TLS listener looked up
by what ``[phone] host`` resolves to (``pjsua_hooks/tcpguard.py`` ``_addresses_of``,
``find_listener``) and the start refused when it is not found
(``pjsua_hooks/endpoint.py`` ``_gate_listener``, ``_guard_tcp``).  Real ``e2m-phone
listen`` processes (bob; ``[phone] proxy`` names an address of this machine where nobody
listens), plain sockets, no Kamailio: the ``lab`` fixture of
``tests/e2e/test_phone_stranger.py``, as reviews 138 and 139's modules.  Needs an IPv6
link-local address on an interface other than ``lo`` (here ``eth0``:
``fe80::fc:ff:fe00:1``; a global ``fd00::2`` on the same interface); skipped without one.

Honest break HB1: a phone bound to a scoped IPv6 link-local address no longer starts
-----------------------------------------------------------------------------------

- Who: **nobody** (an honest configuration).  A phone on a LAN whose only IPv6 address is
  link-local must name the interface: ``[phone] host = "fe80::fc:ff:fe00:1%eth0"`` (a
  link-local address cannot be bound without its scope: ``bind`` says EINVAL).  UDP
  phone (with its RFC 3261 TCP listener), ``proxy = "sip:[fe80::fc:ff:fe00:1]:5090"``.
- Observed: pjsip takes the scoped text (its UDP transport binds and publishes
  ``fe80::fc:ff:fe00:1``; ``SipEndpoint(host=...).add_transport("udp")`` run directly);
  the TCP listener is created too, then the phone exits at start, rc 1, stderr
  ``e2m-phone: cannot start: the TCP listener's socket was not found: its connections
  cannot be bounded``.  Same with ``add_transport("tcp")`` and ``add_udp_with_tcp()``
  directly.  The same module run on ``ceb65fb`` (before review 138 K1's fix, which
  made a listener not found fatal, and review 139's, which matches by resolved
  address): the phone starts, ``listener_found: True``, ``admitted_sources: 1``, the
  home's OPTIONS over TCP from the link-local address is answered and a stranger's
  connection is not completed (the hole test below XPASSes there).  So stop 44 took
  the phone away from that configuration.
- Code at fault: ``pjsua_hooks/tcpguard.py:127`` (``_addresses_of``:
  ``ipaddress.ip_address(host.strip("[]"))`` keeps the scope, giving
  ``IPv6Address('fe80::fc:ff:fe00:1%eth0')``) against ``:169`` (``find_listener``
  strips ``%...`` from the socket's side, and ``getsockname`` gives no scope text
  anyway: ``('fe80::fc:ff:fe00:1', port, 0, 4)``).  Since Python 3.9 an IPv6 address
  with a scope id is not equal to (nor hashes as) the same address without one, so the
  ``in wanted`` test is never true.  ``endpoint.py:434-437`` (``_guard_tcp``) and
  ``:394-397`` (TLS) then raise ``EndpointError``.
- Suggested fix: drop the scope on both sides (``ipaddress.ip_address(text.split("%")[0])``
  in ``_addresses_of``, as ``find_listener`` already does for the socket), or compare
  ``(address, scope_id)`` from ``getsockname()[3]`` against ``socket.if_nametoindex``
  of the scope; keep ``admit_only`` as it is (its BPF compares the packed address,
  already scope-free).
- Test: ``test_hb1_a_phone_bound_to_a_scoped_link_local_address_starts_gated``
  (strict xfail).

Controls (unmarked, pass)
-------------------------

- ``test_control_hb1_the_same_phone_on_the_interfaces_global_address_starts_gated``: the
  same configuration with the interface's global IPv6 address (``fd00::2``, no scope)
  starts; the guard has its listener and one admitted address; the home's OPTIONS over
  TCP is answered and a connection from another local address (``::1``) is not
  completed: the IPv6 gate works, only the scoped spelling fails.
- ``test_control_the_scoped_host_resolves_to_the_unscoped_socket_address``: unit-level,
  why: ``_addresses_of`` of the scoped text and the address a listening socket bound
  there reports are different ``ipaddress`` values; the unscoped text matches.

Tried and held
--------------

- Area 3, other host spellings (run, ``SipEndpoint(host=...)`` directly, not kept): the
  interface's global address ``fd00::2`` (UDP, TCP, UDP with TCP): listener found, the
  guard in place (the control above on the real phone).  ``localhost`` and ``127.1`` are
  review 139's tests.  A name resolving to several addresses (``localhost``: 127.0.0.1
  and ::1): pjsip's IPv4 transport binds the IPv4 one, ``find_listener`` accepts any
  of the name's addresses, and within one process no other listening socket shares
  the port (read).  An IPv4-mapped host (``::ffff:127.0.0.1``) reads back the same
  (read).  Near the descriptor limit ``os.listdir`` or ``os.dup`` fail and the
  listener is "not found": the phone refuses to start (fails closed, only at start,
  nothing a stranger reaches; not run).  A failed start: ``add_transport`` closes the
  transport it made and no duplicate socket is kept when the lookup fails; a TLS or
  TCP gate that was attached is closed in ``SipEndpoint.close`` before ``libDestroy``
  (read).
- Area 2, ``notifier.in_dialog_hop`` / ``_transport`` (unit calls, not kept): an IPv6
  Record-Route (``[::1]``, also written ``[0:0:0:0:0:0:0:1]``) from its own port is
  the hop; another UDP port, TCP for a ``transport=tcp`` hop reached over TLS, plain
  TCP for a ``sips`` hop, a datagram for a ``transport=tls`` hop: 481 (the row stays).
  An IPv4-mapped Record-Route against an IPv4 source is refused, at the opening too
  (403), so no subscription is kept that a refresh then breaks.  Not run on a real
  Kamailio over TCP/TLS in the time.
- Area 4, ``late_2xx.retry_bye`` (read): an evicted entry's 407 finds no entry
  (``bye_answered`` reads ``_entries``), so nothing is sent, to anyone; evicting it
  needs 32 more late 2xx (at most 6 per failed INVITE) before the home's 407 comes
  back, which only a hop able to delay the 407 could arrange, and such a hop can drop
  the BYE anyway.  Credentials go only in a BYE answering a 407 that came from the
  home's socket (UDP: address and port; stream: address) naming the home realm; the
  retried BYE follows the same route set as the first, whose first hop sent that 407,
  and the home's ``consume_credentials`` removes them before it forwards.
- Area 1, read only: a rule for INVITE covers UPDATE, PRACK and ACK (``Rule.covers``);
  a response's reading uses its CSeq method, so a reliable 183, an UPDATE's 2xx and a
  late-offer 200 get ``refuse_hidden_parts`` and ``refuse_encoded_plaintext`` and are
  dropped in the core reply route when refused.  A late-offer ACK carrying such an SDP
  is forwarded: the documented open limit (an ACK cannot be refused, counted in
  ``e2m_acks_unread``).

Untried: area 1 on the wire with stock pjsua2 (100rel 183/PRACK, UPDATE, late-offer
re-INVITE); area 2 on a real Kamailio over TCP, TLS and IPv6.

Fixed (stop 44), HB1: ``tcpguard._addresses_of`` drops an address's zone
(``%eth0``) before comparing, as the socket's name has none.  The hole test failed on
the code before (``cannot start``) and passes now; the unit control now shows the
scoped host matching.
"""

from __future__ import annotations

import ipaddress
import socket
import uuid

import pytest

from e2m_lab.stranger import final_answer_over, sip_request
from e2m_plugins import sip
from pjsua_hooks.tcpguard import _addresses_of
from tests.e2e.test_phone_stranger import lab, pki  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.pjsua2]

PROXY_PORT = 5090          # nobody listens there: the phone only needs its home's address


def _v6_addresses() -> list[tuple[str, str, int]]:
    """(address, interface, scope) of every IPv6 address here (/proc/net/if_inet6)."""
    found = []
    try:
        with open("/proc/net/if_inet6") as table:
            for line in table:
                hexa, _, _, scope, _, name = line.split()
                found.append((str(ipaddress.IPv6Address(int(hexa, 16))), name, int(scope, 16)))
    except OSError:
        pass
    return found


def _link_local() -> tuple[str, str]:
    for address, name, scope in _v6_addresses():
        if scope == 0x20 and name != "lo":
            return address, name
    pytest.skip("no IPv6 link-local address on this machine")


def _global_on(interface: str) -> str:
    for address, name, scope in _v6_addresses():
        if scope == 0 and name == interface:
            return address
    pytest.skip(f"no global IPv6 address on {interface}")


def _options(target: str, port: int, *, source: str, scope_id: int = 0,
             timeout: float = 2.0) -> sip.SipMessage | None:
    """An OPTIONS over a fresh TCP connection from ``source`` to [target]:port; its final
    answer (None: no connection completed, or no answer)."""
    sock = socket.socket(socket.AF_INET6)
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0, 0, scope_id))
        sock.connect((target, port, 0, scope_id))
        local = sock.getsockname()[1]
        sock.sendall(sip_request("OPTIONS", f"sip:bob@[{target}]:{port};transport=tcp",
                                 via=f"SIP/2.0/TCP [{source}]:{local}",
                                 call_id=uuid.uuid4().hex))
        return final_answer_over(sock, timeout)
    except OSError:
        return None
    finally:
        sock.close()


def _started(bob) -> None:
    try:
        bob.wait("started", timeout=15)
    except AssertionError:
        raise AssertionError(f"the phone did not start (rc={bob.process.poll()}): "
                             f"{bob.stderr()[-200:]!r}") from None


def _gated(bob, address: str, scope_id: int, stranger: str) -> None:
    status = bob.status()["tcp"]
    assert status["listener_found"] and status["admitted_sources"] == 1, status
    # the home (its address is the phone's own here) gets in; another address does not
    assert _options(address, bob.port, source=address, scope_id=scope_id) is not None
    assert _options(address, bob.port, source=stranger, scope_id=scope_id) is None


def test_hb1_a_phone_bound_to_a_scoped_link_local_address_starts_gated(lab):
    address, interface = _link_local()
    bob = lab.phone(phone={"transport": "udp", "host": f"{address}%{interface}",
                           "proxy": f"sip:[{address}]:{PROXY_PORT}"}, wait_started=False)
    _started(bob)
    _gated(bob, address, socket.if_nametoindex(interface), _global_on(interface))


def test_control_hb1_the_same_phone_on_the_interfaces_global_address_starts_gated(lab):
    _, interface = _link_local()
    address = _global_on(interface)
    bob = lab.phone(phone={"transport": "udp", "host": address,
                           "proxy": f"sip:[{address}]:{PROXY_PORT}"}, wait_started=False)
    _started(bob)
    _gated(bob, address, 0, "::1")


def test_control_the_scoped_host_resolves_to_the_unscoped_socket_address():
    address, interface = _link_local()
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind((address, 0, 0, socket.if_nametoindex(interface)))
        listener.listen(1)
        bound = ipaddress.ip_address(listener.getsockname()[0].split("%")[0])
    # since stop 44 the zone is dropped before comparing (before: not found, the break)
    assert bound in _addresses_of(f"{address}%{interface}")
    assert bound in _addresses_of(address)
