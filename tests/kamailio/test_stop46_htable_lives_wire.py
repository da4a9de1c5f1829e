"""Every htable item the proxy writes with a life of its own must expire (stop 46).

Kamailio 5.6.3's htable (``ht_set_cell_ex``), asked to write a string with an expiry of
its own (``sht_setxs``) over an item whose current value is shorter (or not a string),
makes a new cell for the longer value and gives the expiry to the old cell, which it
frees: the new one has no expiry at all and stays for the proxy's life (fixed upstream
in May 2026, commit e3751e6e6e "fix expire value assignment on string cell
replacements"; Debian 12's 5.6.3 has the bug).  Review 147 saw it on ``e2mconnects``
(``expire: NEVER``).

Found in stop 46 reading that table's code; the attack below is mine.

Hole (stop 46): a keyed call's notes never expire
-------------------------------------------------

- Attacker: an insider UA (or any caller through the proxy: honest traffic does it too).
- Messages: a keyed INVITE through the proxy, answered 200 under the offer key (CEK
  reuse), never ended with a BYE (a call whose BYE is lost, or one the insider never
  ends); each such call leaves its items behind.
- Effect observed before the fix: the caller's ``e2mtargets`` note is rewritten longer
  at the 2xx (``note_dialog_targets``: the 12-h dialog note) and the key cache's record
  of the dialog is rewritten longer when the answer's key use is counted: both show no
  expiry in ``htable.get`` (``math.inf`` below) where they should live at most the
  dialog's 12 h.  One call, two items in shared memory for good; a loop of calls fills
  it (``[proxy] shm``), and the proxy stops relaying.
- Fix: every write of an item with a life of its own goes through
  ``kamailio_app.htable_items.put_expiring``, which sets the expiry again on the cell
  the write left (``sht_setex``) when the write could have replaced the cell.
- Tests: ``test_hole_a_keyed_calls_notes_all_expire``; the items of a plain-relay call
  are the control.
"""

from __future__ import annotations

import math
import time

import pytest

from tests.kamailio.test_review127_cek_reuse_wire import _Call

pytestmark = pytest.mark.kamailio


def _lives(proxy) -> dict[str, list[float]]:
    return {table: list(proxy.htable_lives(table).values())
            for table in ("e2mkeys", "e2mtargets")}


def test_hole_a_keyed_calls_notes_all_expire(proxy_factory, pki):
    call = _Call(proxy_factory, pki, "s46-lives")
    try:
        call.answer("f2", 200)            # (device 2 also answers the re-INVITE)
        got = call.until_200()
        assert got and got[-1].status == 200, [(m.status, m.to_tag) for m in got]
        assert call.reinvite(got[-1]) == 200
        time.sleep(0.5)
        lives = _lives(call.proxy)
        assert lives["e2mkeys"] and lives["e2mtargets"], lives
        for table, values in lives.items():
            assert all(value < math.inf for value in values), (table, lives)
            assert all(value <= 12 * 3600 + 5 for value in values), (table, lives)
    finally:
        call.close()
