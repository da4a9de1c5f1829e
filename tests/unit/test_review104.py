"""A fifty-...th attacker's review (December 2026) of 3724e89: stop 37's fixes, fresh eyes
(the key cache's ``gone`` and the dialog targets, the ACK's attribution, the phone's
home-source rule).  The core half; the phone half (a real ``e2m-phone``):
``tests/pjsua/test_review104_phone.py``.

Hole 1 (``test_hole_a_later_forks_targets_outlive_its_200_s_keys``): **insider UA**
(mallory, her own password and certificate, calling her own UAS: review 99's seat).
Stop 37 ties a keyed dialog's ``e2mtargets`` entries to its key-cache record through
``HtableKeyCache(gone=dialog_targets.forgetter)``, but ``gone`` is only called when
*this code* removes a record (``_write`` with no key left, ``drop_scope``, or a sweep
that read the record and then found it gone).  A record whose keys simply reach their
expiry is removed by Kamailio's htable itself (item expiry, ``timer_interval`` 10 s,
or on the next ``sht_get``) and nobody calls ``gone``; the sweep runs only every
``max_entries // 10`` puts per worker (1,000 by default), so it almost never reads such
a record in the seconds between its keys' expiry and the table's removal.  That is
harmless while a dialog's keys and targets live alike (12 h each), but a dialog's
record may hold only *short* keys while ``note_dialog_targets`` gives its targets
``_targets_life`` (12 h): a later fork's keys (``EARLY_DIALOG_TTL``, 200 s).  The first
2xx of an INVITE the proxy relayed is kept as a later fork's whenever an earlier dialog
of the same Call-ID and caller's tag took the early dialog's first slot
(``ReplayCache.admit_fork``, kept the replay window plus a transaction's life).

Messages: call 1: mallory's keyed INVITE (Call-ID X, tag a1, CSeq 1), her UAS's 200
(To tag t0) sealed under her offer key (the proxy moves it into the dialog: slot 0),
ACK, BYE and its 200 (the keys and targets go, ``gone`` called by ``drop_scope``); at
once call 2: a new keyed INVITE under the same Call-ID and tag (CSeq 3: a new
transaction; ``note_caller_target`` notes the caller afresh, call 1's entry is gone),
her UAS's 200 on To tag t1 sealed under the new offer key.  ``_fork`` gives t1 slot 1:
its key is kept in dialog (X, a1, t1) for 200 s as a later fork's, which is enough for
``holds_dialog_keys``: ``note_dialog_targets`` writes both entries for 12 h.  No BYE.

Effect: 200 s later the record is gone (the htable's expiry: here the stand-in's
``get``, as Kamailio's timer does), no ``gone`` was called, and the two entries stay
for 12 h: the state review 99 bounded grows again with keyed calls (0.45 KiB a call;
one such dialog per Call-ID and tag, since its own caller entry then blocks the next;
any number of Call-IDs at pike's rate).  With no key left, the BYE that would end them
ends nothing either.  (Read, not run: call 1 need not be ended if its 2xx is signed
but keeps no key: it still claims slot 0 in ``_view`` and its caller entry goes at once,
``holds_dialog_keys`` being false.)

At fault: ``kamailio_app/kemi.py`` ``note_dialog_targets`` (``life =
_targets_life(self.app)``, kemi.py:1548-1552): the entries' lifetime is the longest a
key can live, not what the dialog's record holds; and ``keycache_htable.HtableKeyCache``
(``_write``/``sweep``) cannot see an expiry the htable performs itself.  Fix: give the
targets the record's own remaining life (the latest ``expires`` of the dialog's keys,
which ``holds_dialog_keys`` could return), and extend them when a later put extends the
record (``_write`` knows the new life: call a ``kept(scope, until)`` hook beside
``gone``); or keep the targets inside the key-cache record itself.

Control (``test_control_a_first_dialogs_targets_live_with_its_keys``): the same call 2
under a fresh Call-ID is slot 0: its key and its targets both live (12 h), and call 1's
BYE took its own targets (``gone`` from ``drop_scope``).

Tried and held (core; ``test_control_gone_forgets_only_its_own_dialog``): ``forgetter``
names dialogs with the tags case-folded as ``DialogScope`` does (its own scope in other
letters forgets the call's entries; another fork's record under the same Call-ID and
caller's tag forgets nothing: the ``d`` name binds both tags); ``gone`` of an early scope
(one tag) forgets nothing; ``drop`` of a reference the record never held writes nothing
(``len(rest) == len(kept)``) and calls no ``gone``.  Read, not run: ``_drop_labels`` with
a record the table already took calls ``gone`` with the scope the sweep read; the ACK's
``bound`` is ``signed and context`` checked against the ACK itself, whose signed context
binds the method and CSeq number (a body signed for the INVITE, a re-INVITE or another
dialog's ACK fails ``check_message``: ``inspect_only`` logs it, no row), and
``check_signed_by`` holds the signer to the From; two different unbound ACK bodies under
one dialog's ids are two rows (``content_uid`` takes each body's digest and from_uri);
a CANCEL is still ``inspect_only(archive=False)``; an in-dialog PRACK/UPDATE "From" one
of our users is challenged for that user (``auth_check`` flag 1), a foreign From is as
unproven as out of a dialog (docs/threat-model.md: "a foreign From reaches our users
without digest": known).

Fixed (stop 37), hole 1: a dialog's ``e2mtargets`` entries live as long as the keys the
cache holds for it (``ProxyEngine.dialog_keys_life``, ``scope_life`` on both key caches,
``kemi._targets_life``), never past ``keycache_expire``: a later fork's 200 s.  The model's
fake htable now honours each entry's TTL, as Kamailio's does; the hole test failed on the
code before (checked) and passes.
"""

from __future__ import annotations

import time
import types

import pytest

from e2m_lab.flows import TRUSTED, answer, apply_forward, known_proxy, proxy_engine, ua_engine
from e2m_lab.memory_htable import MemoryHtable
from e2m_plugins.keycache import DialogScope
from e2m_plugins.proxy import EARLY_DIALOG_TTL
from e2m_plugins.testpki import init_test_pki
from kamailio_app.dialog_targets import TABLE, dialog_name
from kamailio_app.dialog_targets import forgetter
from kamailio_app.keycache_htable import HtableKeyCache
from tests.unit.test_review12 import SDP_VIEW, _invite
from tests.unit.test_review94 import fake_ksr  # noqa: F401  (a fixture)

DIALOG_TARGET = 43200


@pytest.fixture(scope="module")
def world():
    return init_test_pki(None, proxy_hosts=(TRUSTED,), users=("alice", "bob"), key_type="ec")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Node:
    """The kemi side the targets live in: ``note_caller_target``/``note_dialog_targets``
    over a fake ``KSR`` whose e2mtargets remembers each entry's TTL, with the real
    ``ProxyEngine`` on the shared key cache built as ``bootstrap`` builds it
    (``gone=dialog_targets.forgetter``) over the stand-in htable on ``clock``."""

    def __init__(self, fake, kemi, world, clock: Clock) -> None:
        self.fake, self.kemi, self.clock = fake, kemi, clock
        self.table: dict = {}
        self.ttls: dict = {}
        self.ends: dict = {}

        def get(name, key):
            # the item's own expiry (sht_setxs), as Kamailio's htable keeps it
            if (name, key) in self.table and self.clock() >= self.ends[key]:
                self.table.pop((name, key), None)
                self.ttls.pop(key, None)
            return self.table.get((name, key))
        fake.htable = types.SimpleNamespace(
            sht_get=get,
            sht_setxs=lambda name, key, value, ttl: (self.table.__setitem__((name, key), value),
                                                     self.ttls.__setitem__(key, ttl),
                                                     self.ends.__setitem__(key, self.clock() + ttl),
                                                     1)[-1],
            sht_setex=lambda name, key, ttl: (self.ttls.__setitem__(key, ttl),
                                              self.ends.__setitem__(key, self.clock() + ttl),
                                              1)[-1],
            sht_rm=lambda name, key: (self.table.pop((name, key), None),
                                      self.ttls.pop(key, None)))
        fake.info = lambda text: None
        self.htable = MemoryHtable(clock)
        self.cache = HtableKeyCache(self.htable, clock=clock, gone=forgetter(fake))
        self.proxy = proxy_engine(world, TRUSTED, view=SDP_VIEW, cache=self.cache)
        self.node = types.SimpleNamespace(app=types.SimpleNamespace(engine=self.proxy))
        self.proxies = (known_proxy(world, TRUSTED, SDP_VIEW),)
        self.alice = ua_engine(world, "alice", peers=("alice", "bob"), proxies=self.proxies)

    def _pv(self, values: dict) -> None:
        self.fake.pv = types.SimpleNamespace(get=values.get, seti=values.__setitem__)

    def call(self, call_id: str, cseq: int, to_tag: str) -> bool:
        """mallory's keyed INVITE (tag a1) through the proxy and her UAS's 200 on
        ``to_tag`` under the offer's key, as kemi sees them; True when the 200 reused it."""
        offer = self.alice.protect(_invite(self.fake_world, "alice", "bob", call_id,
                                           cseq=cseq)).message
        invite = {"$fu": str(offer.address("From").uri), "$tu": str(offer.address("To").uri),
                  "$rm": "INVITE", "$ci": call_id, "$ft": "a1",
                  "$hdr(Contact)": "<sip:mallory@203.0.113.9:5060>"}
        self._pv(invite)
        self.kemi.kamailio.note_caller_target(self.node)
        verdict = self.proxy.inspect(offer)
        assert verdict.action == "forward", verdict.detail
        who = self.proxy.answer_caller(offer, verdict)
        # her own UAS (any stack of hers: a fresh engine, which remembers no ended call)
        uas = ua_engine(self.fake_world, "bob", peers=("bob", "alice"), proxies=self.proxies)
        ok = uas.protect(answer(uas.open(apply_forward(offer, verdict)).message,
                                to_tag=to_tag))
        assert self.proxy.inspect(ok.message, caller=who).action == "forward"
        self._pv({**invite, "$rs": 200, "$T_req($tt)": "", "$tt": to_tag,
                  "$hdr(Contact)": "<sip:sink@203.0.113.9:5999>"})
        self.kemi.kamailio.note_dialog_targets(self.node)
        return bool(ok.info.key_reuse)

    def bye(self, call_id: str, to_tag: str) -> None:
        """The BYE's 200 as ``end_answered_dialog`` acts on it (the engine's end, which
        calls ``gone``)."""
        self.proxy.end_answered("BYE", 200, call_id, "a1", to_tag)

    def targets_ttl(self, call_id: str, to_tag: str) -> int | None:
        name = dialog_name(call_id, "a1", to_tag)
        return self.ttls.get(name) if self.fake.htable.sht_get(TABLE, name) is not None \
            else None

    def holds(self, call_id: str, to_tag: str) -> bool:
        return self.cache.holds_scope(DialogScope(call_id, "a1", to_tag))

    def later(self, seconds: float) -> None:
        """Time passes; Kamailio's htable timer (``timer_interval`` 10 s) takes the
        expired items, then a worker's periodic sweep runs."""
        self.clock.now += seconds
        for key in list(self.htable.data):
            self.htable.get(key)           # the stand-in drops an expired item here
        self.cache.sweep()


@pytest.fixture
def node(fake_ksr, world):  # noqa: F811
    fake, kemi = fake_ksr
    made = Node(fake, kemi, world, Clock())
    made.fake_world = world
    return made


def test_control_a_first_dialogs_targets_live_with_its_keys(node):
    """Call 1 (slot 0): its key moved into the dialog for 12 h, targets 12 h; its BYE
    takes both (``gone`` from ``drop_scope``).  A call under a fresh Call-ID is slot 0
    too: after 200 s its key and its targets are both still there."""
    assert node.call("r104-one@x", 1, "t0")
    assert node.holds("r104-one@x", "t0")
    assert node.targets_ttl("r104-one@x", "t0") == DIALOG_TARGET
    node.bye("r104-one@x", "t0")
    assert not node.holds("r104-one@x", "t0")
    assert node.targets_ttl("r104-one@x", "t0") is None          # gone() took them
    assert node.call("r104-fresh@x", 1, "t1")
    node.later(EARLY_DIALOG_TTL + 11)
    assert node.holds("r104-fresh@x", "t1")
    assert node.targets_ttl("r104-fresh@x", "t1") == DIALOG_TARGET


def test_hole_a_later_forks_targets_outlive_its_200_s_keys(node):
    assert node.call("r104-same@x", 1, "t0")
    node.bye("r104-same@x", "t0")
    assert node.targets_ttl("r104-same@x", "t0") is None
    assert node.call("r104-same@x", 3, "t1")      # same Call-ID and tag: a later fork
    assert node.holds("r104-same@x", "t1")        # its key is kept (for 200 s) ...
    # secure: its targets no longer than its keys (12 h on 640725e..3724e89)
    assert node.targets_ttl("r104-same@x", "t1") <= EARLY_DIALOG_TTL
    node.later(EARLY_DIALOG_TTL + 11)
    assert not node.holds("r104-same@x", "t1")    # the key cache kept its bound
    assert node.targets_ttl("r104-same@x", "t1") is None, \
        "the dialog holds no key, yet its e2mtargets entries stay 12 h"


def test_control_gone_forgets_only_its_own_dialog(node):
    """Held: ``gone`` names the dialog as the key cache does (tags case-folded), so a
    record of another fork under the same Call-ID and caller's tag, or an early scope,
    forgets nothing of the call's; ``drop`` of a reference the record never held
    writes nothing and calls no ``gone``."""
    assert node.call("r104-Case@x", 1, "T0")
    gone = forgetter(node.fake)
    gone(DialogScope("r104-Case@x", "a1", "t9"))           # another fork's record
    gone(DialogScope("r104-Case@x", "a1"))                 # the early scope's
    assert node.targets_ttl("r104-Case@x", "T0") == DIALOG_TARGET
    sets = node.htable.sets
    node.cache.drop(DialogScope("r104-Case@x", "A1", "t0"), b"\x00" * 20)
    assert node.htable.sets == sets and node.holds("r104-Case@x", "t0")
    assert node.targets_ttl("r104-Case@x", "T0") == DIALOG_TARGET
    gone(DialogScope("r104-Case@x", "A1", "t0"))           # its own, in other letters
    assert node.targets_ttl("r104-Case@x", "T0") is None
    assert not any(key[1].startswith("c") for key in node.table)
