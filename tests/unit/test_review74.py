"""A seventy-fourth attacker's review (December 2026) of 8e54426: the last fixes of this
stop attacked; here a node's own count of the AoRs a source registers
(``kemi.route_register`` with ``kemi._touch_count``, review 72's fix), run against the
model of Kamailio's ``e2mregs`` htable that review 72 used (``autoexpire`` 3600 s from
an item's last update, ``initval`` 0) and a model of the registrar's location table
(a contact lives ``MAX_EXPIRES`` from its last save).  The database and ``write_output``
parts of this review are in ``tests/cluster/test_review74_cluster.py`` and below.

Hole 1 (``test_hole_a_node_lets_a_second_address_keep_a_sources_aors_uncounted``)

Attacker: an off-path sender (no account) where the registrar is open (no ``[auth]``,
the default cluster), sending straight to a node, from one address S plus a second
address T for the refreshes.  T needs no answer, so it may as well be a forged UDP
source: the off-path sender "sends any SIP message, sees nothing".

Messages: from S, REGISTERs for ``registrations_per_source`` new AoRs (the cap: 3 here);
from T, a REGISTER refreshing every AoR S ever registered, every half hour (any
interval under ``max_expires``); from S, an hour and a second after its last new AoR,
REGISTERs for 3 new AoRs; and so on each hour.

Effect: ``route_register`` asks only whether the To AoR is already registered; if it
is, the REGISTER is a "refresh" and touches the count of *its own* source
(``_touch_count($si)``), whoever registered the AoR.  T's refreshes keep every contact
alive and never count anything against T (every AoR is already registered), while S's
count, no longer touched, expires an hour after its last new AoR and starts from 0.
After n hours two addresses hold 3n AoRs on the node (12 after 4 hours against a cap of
3 per source, 6 for two): review 72's unbounded growth, back with one more address
(or a forged one).  The front does not have the flaw (it counts per ``source|AoR``
pair, so T's first refresh of each AoR counts against T: the control below).
At fault: ``kamailio_app/kemi.py`` ``route_register``: ``if
KSR.registrar.registered_uri("location", $tu) >= 0: _touch_count($si)`` - "registered"
is taken as "registered by this source", and the count is touched for the refreshing
source, not for the one that holds the AoR.
Fix: count as the front does, per ``source|AoR`` pair (``sht_inc(pair) > 1`` is a
refresh of *this* source's AoR, which touches this source's count; a first REGISTER of
an already registered AoR from another source is a new pair and counts against it), or
keep the counting source with the AoR (an htable ``aor -> source``) and touch that
source's count on a refresh from anywhere.

Controls: ``test_control_a_node_refuses_the_fourth_aor_and_passes_refreshes`` (the
node's cap works from one address, refreshes pass and count once);
``test_control_the_front_counts_a_second_addresss_refreshes`` (the same attack at the
front is bounded: T's refreshes count against T, and past its cap are 403).

Tried and held:
- One address alone (review 72's attack) at a node: a refresh from S touches S's count,
  which then lives while any of its AoRs is refreshed (run: the first control).
- A refresh of an AoR S registered, sent from T, makes T's item (inc then dec: 0);
  it never raises T's count, so a stranger cannot fill another source's count by
  refreshing its AoRs (and cannot lower it: ``_touch_count`` leaves the value).
- ``_touch_count`` races: inc then dec is two atomic operations; a new AoR of the
  same source counted between them sees one more than there is, for a moment: a
  403 one REGISTER early at worst, never one late.
- The table's size: e2mregs is ``size=8`` (256 buckets, no item cap), one item per
  source (and per pair at the front) that lives an hour from its last update; a forged
  source costs one REGISTER under pike's per-source rate, as the registrar's own
  contacts do (the known limit of an open registrar).

Other targets, tried and held:
- ``cli.write_output(private=True)`` (run: ``test_control_private_output_...``): a
  symlink at the path is replaced, never written through (its target keeps its
  bytes); a directory at the path fails and leaves no ``.NAME.*`` file; ``-`` is
  stdout.  In a directory others may write without the sticky bit, a user could
  swap the temporary name before the rename and have his own file land at the path,
  but he can anyway replace the path after it: the directory was never safe for an
  output (not a new effect); ``/dev/null``, FIFOs and ``/dev/fd/N`` are now refused
  (mkstemp in their directory) rather than written: a false refusal, no leak.
- ``privatefiles`` (run: ``test_control_a_symlinked_or_shared_key_is_refused``): the
  key read is the file checked (``O_NOFOLLOW`` + ``fstat``).  A symlinked parent
  directory is followed, but whoever controls it can only plant files he owns, which
  the owner check refuses (``fs.protected_hardlinks`` keeps him from linking ours).
  ``[tls] key`` and PROXY.toml are checked by ``lstat`` and read again by path
  (Kamailio, tomllib): a swap between needs a writable parent, which gives him the
  file anyway.  False refusals (no security effect, noted for the README): a key
  0640 root:kamailio read by the kamailio user, any key or PROXY.toml that is a
  symlink (certbot's ``live/`` keys), and a phone's key on FAT/NTFS (mode from
  ``fmask``).  Still read unchecked, none a hole: the phone has no TLS key of its own
  (pjsua verifies the server only) and its digest password file is checked
  (``credentials._read_file``); the archive's SQLite and spool files are claimed 0600
  (``archive._claim_private_file``); the launcher's pgpass is made anew 0600
  (``_write_private``); ``E2M_OWNER_PASSWORD`` is never printed, but the launcher
  hands its whole environment to Kamailio, so an exported owner password lives on in
  the nodes' process environment (same user only: defence in depth, noted).

Fixed (stop 32): a node counts registrations by (source, AoR) pair as the front does
(``kemi.count_registration``, one function for both; ``front_counts_registration`` is
gone), so T's refreshes count against T; the hole turned XPASS and the marker is
gone.
"""

from __future__ import annotations

import sys
import time
import types

import pytest

from tests.unit.test_review72 import _Htable   # e2mregs, as review 72 modelled it


class _Location:
    """The registrar's location table: an AoR is registered while a contact saved for it
    within ``max_expires`` lives (the phone asks for the longest; the node grants at
    most ``MAX_EXPIRES``)."""

    def __init__(self, clock, vars_: dict[str, str], max_expires: int) -> None:
        self.clock, self.vars, self.max_expires = clock, vars_, max_expires
        self.aors: dict[str, float] = {}

    def registered_uri(self, table: str, uri: str) -> int:
        return 1 if self.aors.get(uri, 0.0) > self.clock[0] else -1

    def save(self, table: str, flags: int) -> int:
        self.aors[self.vars["$tu"]] = self.clock[0] + self.max_expires
        return 1

    # what the node reads back after save (stop 34: the count settles to what was bound)
    def reg_fetch_contacts(self, table: str, uri: str, profile: str) -> int:
        until = self.aors.get(uri, 0.0)
        if until <= self.clock[0]:
            return -1
        self.vars[f"$ulc({profile}=>count)"] = 1
        self.vars[f"$(ulc({profile}=>expires)[0])"] = int(time.time() + until - self.clock[0])
        return 1

    def reg_free_contacts(self, profile: str) -> int:
        return 1

    def reg_send_reply(self) -> int:
        return 1

    def live(self) -> list[str]:
        return [aor for aor, until in self.aors.items() if until > self.clock[0]]


def _proxy(monkeypatch, *, front: bool):
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
    fake.registrar = _Location(clock, vars_, MAX_EXPIRES)
    fake.sl = types.SimpleNamespace(send_reply=lambda code, reason: replies.append(code))
    fake.is_myself_srcip = lambda: False
    fake.is_myself = lambda uri: False     # no Contact names the proxy
    limits = types.SimpleNamespace(registrations_per_source=3, trusted=())
    monkeypatch.setattr(kemi, "APP", types.SimpleNamespace(
        config=types.SimpleNamespace(limits=limits, auth=None,
                                     dispatcher=object() if front else None),
        engine=None, replicates=False))
    proxy = kemi.kamailio()

    def register(source: str, to_uri: str):
        """403, or None: saved (a node) or relayed (the front)."""
        vars_.update({"$si": source, "$tu": to_uri})
        before = len(replies)
        if front:
            relayed = proxy.count_registration()
            assert relayed == (len(replies) == before)
            if relayed:
                fake.registrar.save("location", 0)      # a node saves what the front relays
        else:
            proxy.route_register()
        return replies[-1] if len(replies) > before else None

    return types.SimpleNamespace(register=register, clock=clock, max_expires=MAX_EXPIRES,
                                 location=fake.registrar)


@pytest.fixture
def node(monkeypatch):
    yield _proxy(monkeypatch, front=False)
    sys.modules.pop("kamailio_app.kemi", None)


@pytest.fixture
def front(monkeypatch):
    yield _proxy(monkeypatch, front=True)
    sys.modules.pop("kamailio_app.kemi", None)


S = "198.51.100.7"          # the attacker's address
T = "203.0.113.9"           # his second one (or any forged source: no answer is needed)


def _aor(n: int) -> str:
    return f"sip:user{n}@example.com"


def _hours(proxy, hours: int) -> list[int]:
    """Each hour: 3 new AoRs from S; every live AoR refreshed from T each half hour."""
    held: list[int] = []
    for hour in range(hours):
        held += [n for n in range(hour * 3, hour * 3 + 3)
                 if proxy.register(S, _aor(n)) is None]
        for _ in range(2):
            proxy.clock[0] += proxy.max_expires / 2
            for n in held:
                proxy.register(T, _aor(n))
        proxy.clock[0] += 1
    return held


def test_control_a_node_refuses_the_fourth_aor_and_passes_refreshes(node):
    assert [node.register(S, _aor(n)) for n in range(4)] == [None, None, None, 403]
    for _ in range(6):                      # three hours of refreshes from S itself
        node.clock[0] += node.max_expires / 2
        assert [node.register(S, _aor(n)) for n in range(3)] == [None] * 3
    assert node.register(S, _aor(3)) == 403           # review 72's fix: the count lives
    assert node.register(T, _aor(3)) is None          # another source: its own count
    assert sorted(node.location.live()) == sorted(_aor(n) for n in range(4))


def test_control_the_front_counts_a_second_addresss_refreshes(front):
    held = _hours(front, 4)
    live = front.location.live()
    print(f"\nfront: AoRs S registered {len(held)}, live {len(live)} (cap 3 per source)")
    assert len(live) <= 6, f"two sources hold {len(live)} AoRs at the front"


def test_hole_a_node_lets_a_second_address_keep_a_sources_aors_uncounted(node):
    held = _hours(node, 4)
    live = node.location.live()
    print(f"\nnode: AoRs S registered {len(held)}, live {len(live)} (cap 3 per source)")
    assert len(live) <= 6, (f"two addresses hold {len(live)} AoRs on the node against a cap "
                            f"of 3 per source: {sorted(live)}")


def test_control_private_output_replaces_a_symlink_and_leaves_nothing_on_error(tmp_path):
    from e2m_plugins.cli import CliFailure, write_output
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    link = tmp_path / "out.txt"
    link.symlink_to(victim)
    write_output(str(link), b"secret", private=True)
    assert victim.read_bytes() == b"keep me"
    assert not link.is_symlink() and link.read_bytes() == b"secret"
    assert (link.stat().st_mode & 0o777) == 0o600
    (tmp_path / "dir").mkdir()
    with pytest.raises((CliFailure, SystemExit, OSError)):
        write_output(str(tmp_path / "dir"), b"secret", private=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_control_a_symlinked_or_shared_key_is_refused(tmp_path):
    from e2m_plugins.privatefiles import PrivateFileError, read_private_file
    key = tmp_path / "key.pem"
    key.write_bytes(b"k")
    key.chmod(0o600)
    assert read_private_file(key) == b"k"
    link = tmp_path / "link.pem"
    link.symlink_to(key)
    with pytest.raises(PrivateFileError):
        read_private_file(link)
    key.chmod(0o640)
    with pytest.raises(PrivateFileError):
        read_private_file(key)
