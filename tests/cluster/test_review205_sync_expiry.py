"""Review 205 (attacker's review) of 3090404: review 203's two leads on replicated htable
items (e2mkeys, e2mseen, e2mtargets, e2manswered) that could lose their expiry on a
two-node DMQ cluster (Kamailio 5.6.3, ``ht_set_cell_ex`` gives the expiry to the freed
cell when a longer string replaces a shorter one, stop 46).

No hole found in the time given (about 15 minutes); no strict-xfail test here.

Controls
- ``test_control_peer_restart_never_empties_the_list_and_sync_keeps_expiry``: cluster
  with ``dmq_ping_interval`` 5 s.  A item written short on A (replicated to B); B
  stopped; the same item rewritten longer on A (B down) and a new item added; 12 s (two
  pings) later A's ``dmq.list_nodes`` still lists B (a notification peer is never
  deleted); B started again, it syncs from A: both items on both nodes have a finite
  life within their 60 s, and every item of the four tables on both nodes is finite.

Tried and held (read at Kamailio 5.6.3)
- Lead 1, a second start-up sync on the node that kept running: ``ping_servers``
  resets ``dmq_init_callback_done`` only when the node list holds nothing but the
  local node (``src/modules/dmq/dmq_funcs.c`` ~524).  A peer that misses a ping is
  deleted only on a second 408 *and* only if it is not a notification address:
  ``notification_resp_callback_f`` (``notification_peer.c`` ~606-616) keeps a
  notification peer as PENDING ("not deleting notification peer").  The project
  configures every peer as a notification address ([cluster] peers ->
  ``notification_address``), so the list never empties and a running node asks for a
  sync only once, at its own start.  Observed: B down 12 s with 5-s pings, A still
  lists it (control above).
- Lead 1 at the restarted node's own start: it starts with empty tables and the sync
  gate answers 503 to every request but the peers' KDMQ until its sync is done, so no
  call writes an item there first; ``ht_dmq_handle_sync`` then takes the "add" path
  (``ht_api.c`` ~611), which keeps the expiry (control: the item rewritten longer while
  B was down reached B with 50-61 s, not inf).  The only way to hold a shorter copy
  first is A's ordinary replication of the same item racing A's dump; the dump
  applied over it loses the expiry, but A's replication of the longer value (if it
  comes after) rewrites it in place with ``now + autoexpire`` then its own expiry; if
  it came before, the dump is the same length (in place, expiry kept).  Not
  reproduced; bounded unless a KDMQ is lost.
- Lead 2 (the value and the expiry applied in the other order on the peer): the item
  keeps ``now + autoexpire`` (at most 12 h for e2mtargets, 32 s for e2manswered), never
  inf: ``ht_set_cell`` with exv 0 and ``updateexpire`` (default 1) always writes an
  expiry, and ``ht_set_cell_expire`` on a missing item does nothing.  Not reproduced
  in the time given; bounded, so not a finding under this brief (memory that only
  grows).
- Seen on the way (operator path, not a finding): the ``htable.setxs`` RPC on A (short,
  then longer) left A's own item at ``inf`` (5.6.3, stop 46; the app's
  ``put_expiring`` sets the expiry again, the RPC does not), and A's start-up dump then
  did not carry that item to B at all (B held only the other item, 39.8 s left).
  Review 203's second control reads only B after the same RPC writes, so it does not
  show this.  The control here sets the expiry again (``htable.setex``) as the app does.
- Not done in the time: the project's own sweeps for e2mseen, e2mtargets, e2manswered
  (``HtableKeyCache.sweep`` covers e2mkeys by its sealed expiry) were not read.
"""

from __future__ import annotations

import math
import time

import pytest

from e2m_lab.cluster import REPLICATION, dmq_port, wait_dmq_up, wait_until

pytestmark = [pytest.mark.kamailio, pytest.mark.slow]

_TABLES = ("e2mkeys", "e2mseen", "e2mtargets", "e2manswered")
_LONGEST = 43200 + 2
_LONG = "a-much-longer-value-written-while-the-peer-was-down"


@pytest.fixture
def cluster(proxy_factory, pg_url):
    from e2m_lab.cluster import start_cluster
    return start_cluster(proxy_factory, pg_url, cluster={"dmq_ping_interval": 5})


def _listed(node, peer) -> bool:
    port = f"port: {dmq_port(peer)}"
    return any("local: 0" in entry and port in entry
               for entry in node.rpc("dmq.list_nodes").split("}"))


def test_control_peer_restart_never_empties_the_list_and_sync_keeps_expiry(cluster):
    a, b = cluster.nodes
    a.rpc("htable.setxs", "e2mtargets", "r205-x", "s", "60")
    wait_until(lambda: "r205-x" in b.htable_lives("e2mtargets"), REPLICATION,
               "the short write on B")
    b.stop()
    a.rpc("htable.setxs", "e2mtargets", "r205-x", _LONG, "60")
    # the rpc, like 5.6.3's sht_setxs, leaves a longer rewrite without expiry on A
    # itself; the app's put_expiring sets it again, as here
    a.rpc("htable.setex", "e2mtargets", "r205-x", "60")
    a.rpc("htable.setxs", "e2mtargets", "r205-y", _LONG, "60")
    time.sleep(12)
    assert _listed(a, b), a.rpc("dmq.list_nodes")
    assert b.start()
    wait_dmq_up(cluster.nodes)
    wait_until(lambda: _LONG in b.rpc("htable.get", "e2mtargets", "r205-x"),
               REPLICATION + 3, "A's dump on B")
    time.sleep(1.0)
    for node in (a, b):
        lives = node.htable_lives("e2mtargets")
        for name in ("r205-x", "r205-y"):
            assert math.isfinite(lives[name]) and 30 <= lives[name] <= 61, (
                node.name, name, lives[name])
        for table in _TABLES:
            for name, life in node.htable_lives(table).items():
                assert math.isfinite(life) and life <= _LONGEST, (node.name, table, name)
