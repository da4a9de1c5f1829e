"""An eightieth attacker's review (December 2026) of 3653837: review 79's line-end fix
attacked, here a real ``e2m-phone`` (pjsua2) registered over TCP behind a real Kamailio
5.6.3 (review 79's fixtures: E2M on, open registrar, no view rule, so alice's sealed
MESSAGEs pass it unopened).

Hole (``test_hole_one_bare_cr_message_wedges_a_tcp_phones_connection``): **a head whose
blank line is a lone CR wedges a TCP phone's connection, as a bare LF did.**

- Attacker: an **off-path sender** (or any user: an **insider UA**) who knows bob's AoR.
- Messages: one bodiless MESSAGE to ``sip:bob@example.com`` over UDP, every line ending
  in CRLF, but the blank line after ``Content-Length: 0`` a single ``\\r`` (the datagram's
  last octet).  Kamailio ends the head at a line starting with CR, ``$bs`` is 0, and
  ``_bare_line_ends`` finds no LF without its CR; the core's exact parse strips the CR
  and takes the empty rest for the blank line.  The proxy relays it down bob's TCP
  connection ending in ``\\r\\n\\r``.
- Effect: pjsip ends a stream's head only at ``\\n\\r\\n``: it keeps reading, and alice's
  signed, sealed MESSAGE that the proxy sends next on that connection is taken into the
  first message (cut by its ``Content-Length: 0``), then its body for the start of a
  third: alice gets 408, bob is shown nothing.
- At fault and fix: see ``tests/kamailio/test_review80_wire.py`` (``kemi._bare_line_ends``
  counts only LFs; ``sip.parse(exact=True)`` likewise; require a head that ends in
  ``\\r\\n\\r\\n`` and holds no CR without its LF).

Control (``test_control_a_crlf_bodiless_message_then_alices_reach_a_tcp_phone``): the same
two MESSAGEs, the first with a CRLF blank line: alice's is answered 200 and shown.

Fixed (stop 33): a head whose blank line is a bare CR is refused at the proxy
(``sip.crlf_head``); the hole turned XPASS with the real phone and the marker is gone.
"""

from __future__ import annotations

import os
import time

import pytest

from e2m_plugins import sip
from tests.pjsua.test_review79_phone import (Sender, _run, pki, proxy,  # noqa: F401
                                             tcp_bob)

pytestmark = [pytest.mark.pjsua2, pytest.mark.kamailio]


def _first(sender: Sender, *, bare_cr: bool) -> tuple[bytes, str]:
    call_id = "r80-first-%d-%d@127.0.0.1" % (os.getpid(), time.monotonic_ns())
    plain = sip.make_request("MESSAGE", "sip:bob@example.com", from_uri="sip:mallory@example.com",
                             to_uri="sip:bob@example.com", call_id=call_id,
                             via_host="127.0.0.1:%d" % sender.port, body=b"", content_type=None)
    wire = plain.serialize()
    assert wire.endswith(b"Content-Length: 0\r\n\r\n")
    return (wire[:-1] if bare_cr else wire), call_id


def test_control_a_crlf_bodiless_message_then_alices_reach_a_tcp_phone(pki, proxy,  # noqa: F811
                                                                         tcp_bob):  # noqa: F811
    first, second, shown = _run(pki, proxy, tcp_bob, lambda s: _first(s, bare_cr=False))
    assert first is not None                      # the phone answered the bodiless one
    assert second is not None and second.startswith(b"SIP/2.0 200"), second
    assert any(t.startswith("meet at noon") for t in shown), shown


def test_hole_one_bare_cr_message_wedges_a_tcp_phones_connection(pki, proxy,  # noqa: F811
                                                                  tcp_bob):  # noqa: F811
    first, second, shown = _run(pki, proxy, tcp_bob, lambda s: _first(s, bare_cr=True))
    print(f"\nfirst answer {first and first[:30]!r}, alice's {second and second[:30]!r}")
    assert second is not None and second.startswith(b"SIP/2.0 200"), \
        "alice's MESSAGE after the bare-CR one was never answered"
    assert any(t.startswith("meet at noon") for t in shown), shown
