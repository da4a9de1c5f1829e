"""A seventy-second attacker's review (December 2026) of 06451c8: this stop's latest fixes
attacked; here the front's count of the AoRs a source registers
(``kemi.count_registration``, review 71), run against a model of Kamailio's
``e2mregs`` htable as the cfg template declares it (``autoexpire=MAX_EXPIRES``, 3600 s;
htable's default ``updateexpire=1``: an item's expiry is reset when it is updated,
README.htable; an expired item counts from ``initval`` again).

Hole 1 (``test_hole_the_front_forgets_a_sources_count_while_its_aors_live``)

Attacker: an off-path sender (no account) where the registrar is open (no ``[auth]``,
as the default cluster runs), behind the dispatcher front, from one address.

Messages: REGISTERs for ``registrations_per_source`` AoRs (the cap: 3 here; 50 by
default), each refreshed every 1800 s (any interval under ``max_expires`` keeps the
contacts); an hour and a second after the last *new* AoR, REGISTERs for 3 new AoRs;
and so on each hour.

Effect: the front keeps two kinds of item: ``source|AoR`` (one per pair, reset by each
refresh) and ``source`` (the count, touched only when a new pair is counted).  The
refreshes keep the pairs and the contacts alive but never the count: an hour after the
last new AoR the count expires and starts again from 0, while the first AoRs are still
bound.  After the second hour the one source holds 6 AoRs, after n hours 3n: the cap is
a rate (``registrations_per_source`` per ``max_expires``), the per-source registrar
state grows without bound for as long as the attacker refreshes (50 AoRs an hour with
the defaults).  The nodes cannot help: every REGISTER reaches them from the front,
which they take as their own (exempt).  (A node's own ``route_register`` count has the
same shape: it is touched only for an AoR not yet registered.)
At fault: ``kamailio_app/kemi.py`` ``front_counts_registration``: ``if
KSR.htable.sht_inc(_REGS, pair) > 1: return True`` - a refresh returns before the
source's count is touched, and the count's own expiry (e2mregs' autoexpire) is
independent of the pairs it counts.
Fix: keep the count and the pairs one thing: on each refresh of a counted pair also
refresh the source's item (``sht_inc`` then ``sht_dec``, or ``sht_setxi`` with the
table's expiry), so the count outlives the newest of its pairs; better, count the
source's live pairs (``sht_match_name``/``sht_iterator`` over ``source|*``, or an
htable of pairs with ``sht_setex`` per pair and the count taken as the number of
unexpired ones).

Controls (``test_control_...``): a fourth AoR while the three are fresh is 403 and its
pair is not kept; a refresh of a counted AoR is never refused and does not count again.

Tried and held (read, not run unless said):
- Spellings (run: ``test_control_spellings_the_nodes_take_as_one_count_at_most_more``):
  the pair key is ``identity_of(To)`` (user %-decoded, case kept, host folded); the
  nodes' AoR is the %-decoded user as written (``use_domain 0``, ``case_sensitive
  1``).  No spelling the nodes take as one AoR is one pair at the front with another
  the nodes take as a second AoR: host, parameter and password variants make *more*
  pairs (counting against the attacker), never fewer.
- ``Expires: 0`` does not remove a pair nor lower the count (the AoR counts for the
  hour): no evasion; a user who unregisters and comes back within the hour is one pair.
- A refresh of a legitimate user behind a shared NAT is never 403 (its pair is found
  first, ``> 1: return True``); a *new* user behind it is 403 once the address's count
  is full, as the cap intends (and the count never drops for pairs that expired while
  new ones kept it fresh: the NAT's count is all AoRs seen in an unbroken chain of
  hours, not the live ones - an over-count of the same shape as hole 1, not run).
- A REGISTER with a second To is refused before (sanity); several Contacts bind one
  AoR.
- Not run: two *different* REGISTERs for one new AoR at once past a full count: one
  worker's ``sht_inc(pair)`` is 1 and goes on to 403 and ``sht_rm(pair)``; the other's,
  between the two, is 2 and relays (one AoR past the cap per race won; pike's rate
  bounds the tries).  Hole 1 gives more, without racing.

Other targets of this review, read (the front's reply filter: the wire module
``tests/cluster/test_review72_cluster.py``, hole 1 there):
- Stray replies under pike (``source_banned``): a stranger gets a peer banned only by
  forging its UDP source, a known limit ("get an address banned by spoofing UDP from
  it"); with no forging he cannot make a peer send us strays (a compliant UA answers
  to the datagram's source, RFC 3261 18.2.2 ``received``/RFC 3581, not to a Via naming
  us).  Replies that match a transaction are never counted or dropped; a front (no
  engine) counts none; the front's own address is exempt at the nodes (alias), and KDMQ
  is handled before ``route_limits``.  Legitimate strays (a 2xx retransmitted after
  tm's 5 s wait: about 7 in 32 s) stay far below pike's 30 in 2 s.
- The digest ``uri`` held in dialogs: it is compared with ``$ou`` (the Request-URI as
  received), not ``$ru`` after ``loose_route``, so a strict-router-style request (our
  Record-Route in the Request-URI) or one Kamailio rewrites still fits; pjsip writes
  the digest ``uri`` from the request line it sends (re-INVITE, BYE, UPDATE, PRACK,
  SUBSCRIBE refresh, a new Contact target): no legitimate in-dialog flow of our phone
  gets 400 (read; SIPp's one ``-auth_uri`` is the documented exception).
- ``launcher._check_private``: ``--runtime-dir`` is ``resolve()``d first, so
  ``/var/run`` (a symlink to ``/run``) checks ``/run``; ``/run`` and ``/run/user/UID``,
  a home dir ``/home/USER`` run as that user, and ``/tmp`` (1777, sticky) pass; a
  group-writable parent (``/srv/e2m`` 0775 root:admin) or one owned by another user (a
  home dir when run as root, NFS root_squash) is refused, as StrictModes intends.
  Nothing can be planted after the check by another user (the dir is 0700 ours, every
  parent ours or root's and not writable by others); Kamailio unlinks its ctl socket
  and FIFO before making them; a hard link planted before the chmod to one of our own
  files passes the owner check, but ``fs.protected_hardlinks`` (default 1) keeps a user
  from linking files he does not own; ``-w`` is the same dir.

Fixed (stop 32): a refresh of a counted AoR also updates its source's count
(``kemi._touch_count``, at the front and at a node), so the count lives as long as
any of the AoRs it counts; the hole turned XPASS and the marker is gone.
"""

from __future__ import annotations

import sys
import types

import pytest


class _Htable:
    """Kamailio's htable as e2mregs is declared: integer items from ``initval`` 0,
    ``autoexpire`` seconds after their last update (``updateexpire`` 1, the default),
    an expired item counting from ``initval`` again."""

    def __init__(self, clock, autoexpire: int) -> None:
        self.clock, self.autoexpire = clock, autoexpire
        self.items: dict[str, tuple[int, float]] = {}

    def _live(self, key: str) -> int:
        value, expires = self.items.get(key, (0, 0.0))
        return value if expires > self.clock[0] else 0

    def sht_inc(self, table: str, key: str) -> int:
        value = self._live(key) + 1
        self.items[key] = (value, self.clock[0] + self.autoexpire)
        return value

    def sht_dec(self, table: str, key: str) -> int:
        value = self._live(key) - 1
        self.items[key] = (value, self.clock[0] + self.autoexpire)
        return value

    def sht_get(self, table: str, key: str) -> int:
        return self._live(key)                    # initval=0: a missing item reads 0

    def sht_seti(self, table: str, key: str, value: int) -> int:
        self.items[key] = (value, self.clock[0] + self.autoexpire)
        return 1

    def sht_setxi(self, table: str, key: str, value: int, expire: int) -> int:
        self.items[key] = (value, self.clock[0] + expire)    # this item's own expiry
        return 1

    def sht_rm(self, table: str, key: str) -> int:
        self.items.pop(key, None)
        return 1


@pytest.fixture
def front(monkeypatch):
    """``kemi.kamailio`` as a front (open registrar, ``registrations_per_source`` 3) on
    a fake KSR; ``register(source, to_uri)`` gives 403 or None (relayed)."""
    clock = [0.0]
    fake = types.ModuleType("KSR")
    fake.kx = types.SimpleNamespace(get_def=lambda name: None)
    monkeypatch.setitem(sys.modules, "KSR", fake)
    sys.modules.pop("kamailio_app.kemi", None)
    import kamailio_app.kemi as kemi
    from kamailio_app.launcher import MAX_EXPIRES
    monkeypatch.setattr(kemi, "KSR", fake)
    # a REGISTER with one contact asking the longest lifetime, as the location model
    # grants (review 80: a slot lives as long as the binding asked for)
    vars_: dict[str, str] = {"$hdrc(Contact)": 1, "$(hdr(Contact)[0])": "<sip:ua@192.0.2.1>",
                             "$hdr(Expires)": "3600"}
    replies: list[int] = []
    fake.pv = types.SimpleNamespace(get=lambda name: vars_.get(name),
                                    sets=lambda name, value: vars_.__setitem__(name, value))
    fake.htable = _Htable(clock, MAX_EXPIRES)
    fake.sl = types.SimpleNamespace(send_reply=lambda code, reason: replies.append(code))
    fake.is_myself_srcip = lambda: False
    fake.is_myself = lambda uri: False     # no Contact names the proxy
    limits = types.SimpleNamespace(registrations_per_source=3, trusted=())
    monkeypatch.setattr(kemi, "APP", types.SimpleNamespace(
        config=types.SimpleNamespace(limits=limits, auth=None, dispatcher=object()),
        replicates=False))
    proxy = kemi.kamailio()

    def register(source: str, to_uri: str):
        vars_.update({"$si": source, "$tu": to_uri})
        before = len(replies)
        relayed = proxy.count_registration()
        assert relayed == (len(replies) == before)
        return None if relayed else replies[-1]

    yield types.SimpleNamespace(register=register, clock=clock, max_expires=MAX_EXPIRES)
    sys.modules.pop("kamailio_app.kemi", None)


STRANGER = "198.51.100.7"


def _aor(n: int) -> str:
    return f"sip:user{n}@example.com"


def test_control_the_fourth_aor_is_refused_and_refreshes_pass(front):
    assert [front.register(STRANGER, _aor(n)) for n in range(4)] == [None, None, None, 403]
    front.clock[0] += 1800
    assert [front.register(STRANGER, _aor(n)) for n in range(3)] == [None] * 3  # refreshes
    assert front.register(STRANGER, _aor(3)) == 403                            # still full
    assert front.register("198.51.100.8", _aor(3)) is None   # another source: its own count


def test_control_spellings_the_nodes_take_as_one_count_at_most_more(front):
    """``user%41`` / ``userA``, ``EXAMPLE.com``, ``;transport=tcp``: one pair each as the
    nodes take them (one AoR), or more; never one pair for two of the nodes' AoRs."""
    spellings = ["sip:userA@example.com", "sip:user%41@example.com",
                 "sip:userA@EXAMPLE.COM", "sip:userA@example.com;transport=tcp"]
    assert [front.register(STRANGER, uri) for uri in spellings] == [None] * 4
    assert front.register(STRANGER, "sip:usera@example.com") is None     # 2nd AoR (case)
    assert front.register(STRANGER, "sip:userB@example.com") is None     # 3rd
    assert front.register(STRANGER, "sip:userC@example.com") == 403


def test_hole_the_front_forgets_a_sources_count_while_its_aors_live(front):
    live: list[int] = []
    for hour in range(4):
        new = [n for n in range(hour * 3, hour * 3 + 3)
               if front.register(STRANGER, _aor(n)) is None]
        live += new
        # refreshed every half hour (the contacts live): the pairs never expire
        for _ in range(2):
            front.clock[0] += front.max_expires / 2
            assert all(front.register(STRANGER, _aor(n)) is None for n in live)
        front.clock[0] += 1
    print(f"\nAoRs one source holds after 4 hours: {len(live)} (cap 3)")
    assert len(live) <= 3, f"one source holds {len(live)} AoRs past the cap of 3: {live}"
