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

Fixed (stop 34): the count no longer rests on reading the REGISTER as the registrar
would.  Any REGISTER with a Contact claims a slot for what we read (a removal: the
slack alone), and once the registrar has saved, the slot is settled to what it bound:
the longest binding the AoR has left in usrloc (a node, ``_bound_seconds``) or in the
node's 2xx (a front, ``_replied_seconds``), freed when nothing is bound
(``settle_registration``).  ``_asked_lifetime`` is now only the claim's first guess,
so the two holes above, which asserted what it reads, could not turn XPASS: they are
replaced by the same attacks against the count itself, on review 74's node model
(``test_a_single_quoted_contact_bound_for_an_hour_holds_a_slot``,
``test_a_register_that_binds_nothing_frees_its_slot``; both failed on the code before
the fix), and the wire holes turned XPASS on a real Kamailio.
"""

from __future__ import annotations

import sys
import types

import pytest

from tests.unit.test_review74 import node  # noqa: F401  (fixture)


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


# -- stop 34: the count settles to what the registrar bound -------------------------

S = "192.0.2.85"


def test_a_single_quoted_contact_bound_for_an_hour_holds_a_slot(node):  # noqa: F811
    """Hole 1 against the count: we read a removal, the registrar binds for an hour
    (review 74's model binds every save for ``MAX_EXPIRES``): each AoR holds a slot and
    the fourth is refused."""
    node.location.vars.update({"$(hdr(Contact)[0])": "<sip:u@192.0.2.1:4444>;x='y;expires=0;z='",
                               "$hdr(Expires)": "3600"})
    assert [node.register(S, f"sip:q{n}@example.com") for n in range(4)] == \
        [None, None, None, 403]


def test_a_register_that_binds_nothing_frees_its_slot(node):  # noqa: F811
    """Hole 2 against the count: we read an hour, the registrar binds nothing (the
    Expires wraps to 0): three such REGISTERs leave S free for bob."""
    location = node.location
    location.save = lambda table, flags: 1                        # nothing bound
    location.vars.update({"$(hdr(Contact)[0])": "<sip:u@192.0.2.1:4444>",
                          "$hdr(Expires)": "4294967296"})
    assert [node.register(S, f"sip:w{n}@example.com") for n in range(3)] == [None] * 3
    del location.save                                             # the model's own again
    location.vars["$hdr(Expires)"] = "3600"
    assert node.register(S, "sip:bob@example.com") is None
