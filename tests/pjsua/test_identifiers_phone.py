"""A phone's Call-IDs, tags and Via branches do not follow glibc ``rand()`` (stop 41),
on real pjsua2.

The attack (review 122 measured it; stop 41 made it a test): pjlib's GUIDs are made
from ``rand()``, four characters per output (``"0-9aAbB..zZ-."[byte & 63]``).  Whoever
knows the generator's state knows the phone's next Call-ID, From tag and branch; the
state is glibc's lagged additive one, seeded once from 32 bits, and every MESSAGE
hands its recipient 25 consecutive outputs.  Here the state is set with ``srand`` in
the phone's process, as a stand-in for an attacker who worked it out, and the
identifiers of the next MESSAGE are looked for among the GUIDs the next 200 outputs
make.  Before the fix (``pjsua_hooks.strong_rand`` not installed) the From tag, the
Call-ID and the branch were each found there; with it none is.

Controls: the GUID model finds a GUID made from glibc outputs the test draws itself
(so the attack's search is sound; it found all three identifiers before the fix), and
``pj_rand`` with the fix stays within ``rand()``'s range (0 to 2^31 - 1), spread over it.
"""

from __future__ import annotations

import ctypes as C
import re

import pytest

pytestmark = pytest.mark.pjsua2
pytest.importorskip("pjsua2")

from e2m_plugins import sip  # noqa: E402
from pjsua_hooks import strong_rand  # noqa: E402
from pjsua_hooks.rawhook import RawSipHook  # noqa: E402

_CHARS = "0123456789" + "".join(a + a.upper() for a in "abcdefghijklmnopqrstuvwxyz") + "-."
WINDOW = 200        # outputs after the seed in which the identifiers are looked for


def _guid(outputs: list[int]) -> str:
    """pjlib's GUID (guid_simple) from 8 consecutive ``rand()`` outputs."""
    return "".join(_CHARS[(value >> shift) & 63] for value in outputs for shift in (0, 8, 16, 24))


def _predicted(seed: int) -> set[str]:
    """Every GUID 8 consecutive outputs after ``srand(seed)`` make (libc's own generator)."""
    libc = C.CDLL(None)
    libc.srand(seed)
    outputs = [libc.rand() for _ in range(WINDOW)]
    return {_guid(outputs[i:i + 8]) for i in range(WINDOW - 7)}


def _identifiers(data: bytes) -> dict[str, str]:
    msg = sip.parse(data)
    branch = msg.via_branch() or ""
    return {"from tag": msg.from_tag or "", "call-id": msg.call_id.split("@")[0],
            "branch": re.sub(r"^z9hG4bKPj", "", branch)}


def test_the_next_messages_identifiers_are_not_glibcs(make_endpoint, udp_peer) -> None:  # type: ignore[no-untyped-def]
    ep = make_endpoint(hook=RawSipHook(), require_e2m=True)
    alice = ep.add_account("alice", ep.add_transport("udp"))
    predicted = _predicted(777)
    C.CDLL(None).srand(777)            # the state an attacker worked out
    alice.send_message(udp_peer.uri("bob"), "hello")
    sent = udp_peer.collect(ep.pump, 3.0, until=lambda got: any(
        d.startswith(b"MESSAGE ") for d in got))
    message = next(d for d in sent if d.startswith(b"MESSAGE "))
    ids = _identifiers(message)
    assert all(len(value) == 32 for value in ids.values()), ids   # pjlib GUIDs
    found = {name: value for name, value in ids.items() if value in predicted}
    assert not found, f"predicted from glibc's state: {sorted(found)}"


def test_control_the_guid_model_matches_glibc_outputs() -> None:
    libc = C.CDLL(None)
    libc.srand(4242)
    outputs = [libc.rand() for _ in range(8)]
    assert _guid(outputs) in _predicted(4242)
    assert len(_guid(outputs)) == 32 and set(_guid(outputs)) <= set(_CHARS)


def test_control_pj_rand_keeps_rands_range(make_endpoint) -> None:  # type: ignore[no-untyped-def]
    make_endpoint(hook=RawSipHook(), require_e2m=True)
    from pjsua2 import _pjsua2

    library = C.CDLL(_pjsua2.__file__)
    library.pj_rand.restype = C.c_int
    values = [library.pj_rand() for _ in range(2000)]
    assert all(0 <= v <= 2 ** 31 - 1 for v in values)
    assert len(set(values)) > 1990 and max(values) > 2 ** 30      # spread over the range
    assert strong_rand.installed() is not None
