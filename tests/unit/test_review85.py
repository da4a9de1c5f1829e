"""An eighty-fifth attacker's review (December 2026) of 4ad57e0: ``kemi._asked_lifetime``
(every contact read with ``grammar.split_header_list``) against what Kamailio 5.6's
registrar binds; the wire half, with the registrar itself, is
``tests/kamailio/test_review85_wire.py`` (its docstring has the full write-up).

Hole 1 (``test_hole_a_single_quoted_parameter_is_read_as_a_removal``): **off-path
sender** (or a stranger sharing an address) on an open registrar.  ``Contact:
<sip:u@h>;x='y;expires=0;z='`` with ``Expires: 3600``: Kamailio's parameter parser
quotes with ``'`` as with ``"`` (one parameter ``x``, no ``expires``: bound for the
header's hour), the core's grammar takes ``'`` as a token character and reads
``expires=0``: ``_asked_lifetime`` is 0 and ``count_registration`` takes no slot.  Any
number of AoRs from one address.  At fault: ``kemi.py`` line 299 with line 895.

Hole 2 (``test_hole_an_expires_header_of_two_to_the_32_is_read_as_an_hour``): the same
attacker, ``Expires: 4294967296``: Kamailio's ``parse_expires`` wraps it to 0 (nothing
bound), ``_asked_lifetime`` caps it to ``MAX_EXPIRES`` (lines 303, 305): three such
REGISTERs hold a shared address's slots for an hour.

Controls: a plain contact is read as the header's hour; ``Expires: 0`` and a lone ``*``
as nothing; a double-quoted ``expires="60"`` as Kamailio reads it (60).

Tried and held: ``<uri>, *`` (0 here; Kamailio refuses it, 400, nothing bound), a
duplicated ``expires`` (both take the last), ``;expires=`` empty (the header's).
"""

from __future__ import annotations

import sys
import types

import pytest


@pytest.fixture
def lifetime(monkeypatch):
    fake = types.ModuleType("KSR")
    fake.kx = types.SimpleNamespace(get_def=lambda name: None)
    monkeypatch.setitem(sys.modules, "KSR", fake)
    sys.modules.pop("kamailio_app.kemi", None)
    import kamailio_app.kemi as kemi
    monkeypatch.setattr(kemi, "KSR", fake)

    def asked(contacts: list[str], expires: str | None) -> int:
        values: dict[str, object] = {"$hdrc(Contact)": len(contacts), "$hdr(Expires)": expires}
        for i, contact in enumerate(contacts):
            values["$(hdr(Contact)[%d])" % i] = contact
        fake.pv = types.SimpleNamespace(get=values.get)
        return kemi._asked_lifetime()
    yield asked
    sys.modules.pop("kamailio_app.kemi", None)


def test_control_a_plain_contact_is_read_as_the_headers_hour(lifetime):
    assert lifetime(["<sip:u@192.0.2.1:4444>"], "3600") == 3600


def test_control_removals_are_read_as_nothing(lifetime):
    assert lifetime(["<sip:u@192.0.2.1:4444>"], "0") == 0
    assert lifetime(["*"], "0") == 0


def test_control_a_double_quoted_expiry_is_read_as_kamailio_reads_it(lifetime):
    # Kamailio's registrar answered ;expires=60 for this contact (wire probe)
    assert lifetime(['<sip:u@192.0.2.1:4444>;expires="60"'], "3600") == 60


@pytest.mark.xfail(strict=True, reason="review 85: off-path sender on an open registrar, "
                   "';x='y;expires=0;z='' is a removal to the count, an hour's binding to "
                   "Kamailio (single quotes): no slot taken")
def test_hole_a_single_quoted_parameter_is_read_as_a_removal(lifetime):
    # Kamailio binds this contact for 3600 s (its 200: ;expires=3600)
    assert lifetime(["<sip:u@192.0.2.1:4444>;x='y;expires=0;z='"], "3600") == 3600


@pytest.mark.xfail(strict=True, reason="review 85: off-path sender sharing an address, "
                   "'Expires: 4294967296' binds nothing (Kamailio wraps it to 0) yet the count "
                   "reads an hour")
def test_hole_an_expires_header_of_two_to_the_32_is_read_as_an_hour(lifetime):
    # Kamailio answers 200 with no Contact: nothing bound
    assert lifetime(["<sip:u@192.0.2.1:4444>"], "4294967296") == 0
