"""The pure parts of the DMQ cluster, without Kamailio: ``[cluster]`` dmq_address,
peers and advertise and ``[dispatcher]`` in PROXY.toml, what the launcher renders for
them, and the key cache's seal shared by the nodes (an entry sealed by one node opens
on another, one sealed by anyone else is refused and removed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2m_plugins.keycache import DialogScope, scope_key
from e2m_lab.memory_htable import MemoryHtable
from kamailio_app.config import AppConfigError, DmqUri, parse_app_config
from kamailio_app.keycache_htable import HtableKeyCache
from kamailio_app.launcher import ds_list_text, render_cfg

DB = "postgres://e2m:pw@127.0.0.1:5432/e2m"
LISTEN = {"listen": ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"], "domains": ["example.com"]}
DMQ = {"dmq_address": "sip:127.0.0.1:5090", "peers": ["sip:127.0.0.2:5090"],
       "advertise": "192.0.2.20:5060"}


def _config(tmp_path: Path, **sections):
    return parse_app_config({"kamailio": LISTEN, "e2m": {"enabled": False}, **sections},
                            tmp_path / "PROXY.toml")


def test_dmq_settings_are_read(tmp_path):
    cluster = _config(tmp_path, cluster={"db_url": DB, **DMQ}).cluster
    assert cluster.replicates and cluster.dmq_address == DmqUri("127.0.0.1", 5090)
    assert cluster.peers == (DmqUri("127.0.0.2", 5090),) and cluster.peers_dns is None
    assert cluster.advertise == "192.0.2.20:5060"
    by_name = _config(tmp_path, cluster={"db_url": DB, "dmq_address": "sip:10.0.0.1:5090",
                                         "peers": "nodes.example.com"}).cluster
    assert by_name.peers_dns == "nodes.example.com" and by_name.peers == ()
    assert not _config(tmp_path, cluster={"db_url": DB}).cluster.replicates


@pytest.mark.parametrize("bad, says", [
    ({"dmq_address": "10.0.0.1:5090", "peers": ["sip:10.0.0.2:5090"]}, "dmq_address"),
    ({"dmq_address": "sip:10.0.0.1:5090"}, "peers: is needed"),
    ({"dmq_address": "sip:10.0.0.1:5090", "peers": ["sip:10.0.0.1:5090"]}, "own dmq_address"),
    ({"dmq_address": "sip:10.0.0.1:5090", "peers": ["sip:x:70000"]}, "peers"),
    ({"dmq_address": "sip:10.0.0.1:5090", "peers": "not a name!"}, "peers"),
    ({"peers": ["sip:10.0.0.2:5090"]}, "dmq_address: is needed"),
    ({"dmq_address": "sip:10.0.0.1:5090", "peers": ["sip:10.0.0.2:5090"],
      "advertise": 'x"; loadmodule "evil'}, "advertise"),
    ({"dmq_address": "sip:10.0.0.1:5090", "peers": ["sip:10.0.0.2:5090"],
      "front": "10.0.0.10"}, "front"),                       # a front needs its port
    ({"dmq_address": "sip:10.0.0.1:5090", "peers": ["sip:10.0.0.2:5090"],
      "front": "10.0.0.10:5060", "advertise": "10.0.0.20:5060"}, "exclude each other"),
    ({"front": "10.0.0.10:5060"}, "dmq_address: is needed"),
    ({**DMQ, "dmq_ping_interval": 4}, "dmq_ping_interval"),      # under DMQ's own floor
    ({**DMQ, "dmq_ping_interval": "5"}, "dmq_ping_interval"),
    ({**DMQ, "dmq_address": "sip:0.0.0.0:5090"}, "wildcard"),              # review 42
    ({**DMQ, "dmq_address": "sip:127.0.0.1:5060"}, "socket of its own"),   # the SIP port
])
def test_dmq_mistakes_are_refused(tmp_path, bad, says):
    with pytest.raises(AppConfigError) as caught:
        _config(tmp_path, cluster={"db_url": DB, **bad})
    assert says in str(caught.value)


def test_the_cfg_replicates_only_with_dmq(tmp_path):
    text = render_cfg(_config(tmp_path, cluster={"db_url": DB, **DMQ}), tmp_path)
    assert "#!define WITH_DMQ" in text
    assert 'modparam("dmq", "server_address", "sip:127.0.0.1:5090")' in text
    assert 'modparam("dmq", "notification_address", "sip:127.0.0.2:5090")' in text
    assert 'modparam("dmq", "multi_notify", 0)' in text
    assert 'modparam("dmq", "ping_interval", 60)' in text              # DMQ's default
    quick = render_cfg(_config(tmp_path, cluster={"db_url": DB, **DMQ, "dmq_ping_interval": 5}),
                       tmp_path)
    assert 'modparam("dmq", "ping_interval", 5)' in quick
    assert "autoexpire=43200;dmqreplicate=1;" in text                 # e2mkeys
    # and e2mseen, e2mtargets (stop 35), e2manswered (stop 42: a late copy at the other node)
    assert text.count("dmqreplicate=1;") == 4
    assert "e2mtargets=>size=12;autoexpire=43200;dmqreplicate=1;" in text
    # the SIP listeners advertise the domain's address and take it as their own; the
    # DMQ socket (added: no listener was on it) keeps its own address
    assert "listen=udp:127.0.0.1:5060 advertise 192.0.2.20:5060" in text
    assert "listen=udp:127.0.0.1:5090\n" in text and "alias=192.0.2.20:5060" in text
    single = render_cfg(_config(tmp_path, cluster={"db_url": DB}), tmp_path)
    assert "#!define WITH_DMQ" not in single and "dmqreplicate=1" not in single
    assert "advertise" not in single.split("####### Modules")[0]
    dns = render_cfg(_config(tmp_path, cluster={"db_url": DB, "dmq_address": "sip:127.0.0.1:5090",
                                                "peers": "nodes.example.com"}), tmp_path)
    assert 'modparam("dmq", "notification_address", "sip:nodes.example.com:5090")' in dns
    assert 'modparam("dmq", "multi_notify", 1)' in dns


def test_a_node_behind_a_front_takes_the_front_as_its_own_and_keeps_its_via(tmp_path):
    """[cluster] front: the front's address is an alias (its Route is ours), the
    listeners advertise nothing (Via stays the node's: responses come back to it)."""
    dmq = {k: v for k, v in DMQ.items() if k != "advertise"}
    config = _config(tmp_path, cluster={"db_url": DB, **dmq, "front": "10.0.0.10:5060"})
    assert config.cluster.front == "10.0.0.10:5060" and config.cluster.advertise is None
    text = render_cfg(config, tmp_path)
    assert "alias=10.0.0.10:5060" in text
    assert "listen=udp:127.0.0.1:5060\n" in text and " advertise " not in text


def test_dispatcher_front(tmp_path):
    config = _config(tmp_path, dispatcher={"destinations": ["sip:10.0.0.1:5060",
                                                            "sip:10.0.0.2:5060"],
                                           "algorithm": "round-robin", "probe_interval": 2})
    assert config.dispatcher.algorithm == 4
    text = render_cfg(config, tmp_path)
    assert "#!define WITH_DISPATCHER" in text and 'loadmodule "dispatcher.so"' in text
    assert 'modparam("dispatcher", "ds_ping_interval", 2)' in text
    assert ds_list_text(config.dispatcher).splitlines()[1:] == ["1 sip:10.0.0.1:5060 8",
                                                               "1 sip:10.0.0.2:5060 8"]
    with pytest.raises(AppConfigError, match="a front routes only"):
        parse_app_config({"kamailio": LISTEN, "dispatcher": {"destinations": ["sip:a:1"]}},
                         tmp_path / "PROXY.toml")   # [e2m] is on by default
    with pytest.raises(AppConfigError, match="destinations"):
        _config(tmp_path, dispatcher={"destinations": []})


# --------------------------------------------------------------------------- the seal

SCOPE = DialogScope("call-1@example.com", "a", "b")


def _node(table, seal, origin, counted, refused):
    return HtableKeyCache(table, seal_key=seal, origin=origin,
                          count=lambda name, n: counted.append((origin, name)),
                          refused=refused.append)


def test_an_entry_kept_by_one_node_opens_on_the_other_and_counts_as_replicated():
    table, counted, refused = MemoryHtable(), [], []
    seal = bytes(range(32))
    a = _node(table, seal, "sip:a:5090", counted, refused)
    b = _node(table, seal, "sip:b:5090", counted, refused)
    a.put(SCOPE, b"ref", bytes(16))
    found = b.get(SCOPE, b"ref")
    assert found is not None and found.cek == bytes(16)
    assert ("sip:a:5090", "e2m_ceks_kept") in counted
    assert ("sip:b:5090", "e2m_ceks_replicated") in counted and refused == []
    assert a.get(SCOPE, b"ref") is not None
    assert counted.count(("sip:a:5090", "e2m_ceks_replicated")) == 0   # its own key


def test_an_entry_sealed_by_anyone_else_is_refused_and_removed():
    """A rogue peer's record (its own seal key), a record moved to another scope's
    name, and noise: none is used; each is reported and removed."""
    table, counted, refused = MemoryHtable(), [], []
    rogue = _node(table, bytes(32), "sip:rogue:5090", counted, refused)
    b = _node(table, bytes(range(32)), "sip:b:5090", counted, refused)
    rogue.put(SCOPE, b"ref", b"\x01" * 16)
    assert b.get(SCOPE, b"ref") is None
    assert refused == [scope_key(SCOPE)] and scope_key(SCOPE) not in table.data
    b.put(SCOPE, b"one", b"\x02" * 16)                    # genuine, then moved
    moved = DialogScope("call-2@example.com", "a", "b")
    table.set(scope_key(moved), table.get(scope_key(SCOPE)), 600)
    assert b.get(moved, b"one") is None
    noise = DialogScope("call-3@example.com", "a", "b")
    table.set(scope_key(noise), "bm9pc2U=", 600)
    assert b.get(noise, b"three") is None
    assert len(refused) == 3 and b.get(SCOPE, b"one").cek == b"\x02" * 16


def test_a_sweep_or_a_put_that_meets_a_forged_record_reports_it_too():
    """The node logs every record it refuses (name only), whichever path meets it: a
    put writing over it, or the sweep removing it."""
    table, counted, refused = MemoryHtable(), [], []
    rogue = _node(table, bytes(32), "sip:rogue:5090", counted, refused)
    b = _node(table, bytes(range(32)), "sip:b:5090", counted, refused)
    rogue.put(SCOPE, b"ref", b"\x01" * 16)
    b.put(SCOPE, b"mine", b"\x02" * 16)                     # writes over the forged one
    assert refused == [scope_key(SCOPE)] and b.get(SCOPE, b"ref") is None
    other = DialogScope("call-9@example.com", "a", "b")
    rogue.put(other, b"ref", b"\x01" * 16)
    assert b.sweep() == 1 and refused == [scope_key(SCOPE), scope_key(other)]
    assert b.get(SCOPE, b"mine").cek == b"\x02" * 16


def test_a_sweep_that_read_a_forged_record_keeps_the_good_one_written_since():
    """The sweep reads the whole table first and acts after: a record that did not
    open then, and that a put has since written over with a good one, stays."""
    table, counted, refused = MemoryHtable(), [], []
    rogue = _node(table, bytes(32), "sip:rogue:5090", counted, refused)
    b = _node(table, bytes(range(32)), "sip:b:5090", counted, refused)
    rogue.put(SCOPE, b"ref", b"\x01" * 16)
    read_before = table.items()
    b.put(SCOPE, b"mine", b"\x02" * 16)                     # over the forged record
    table.items = lambda: read_before                      # the sweep's earlier read
    b.sweep()
    assert b.get(SCOPE, b"mine").cek == b"\x02" * 16


@pytest.mark.kamailio     # kamailio -c on what the launcher renders
@pytest.mark.parametrize("name", ["cluster-node-a.toml", "cluster-node-b.toml",
                                  "cluster-front.toml"])
def test_cluster_example_configs_are_valid(name, pki, tmp_path):
    """The two nodes and the dispatcher front in kamailio_app/examples: the launcher
    accepts them and Kamailio accepts the cfg it renders (the nodes' database is not
    reached: --print-cfg, as an operator checks before `db init`)."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    for item in (root / "kamailio_app" / "examples").iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    (tmp_path / "pki").symlink_to(pki.directory)
    if name.startswith("cluster-node"):
        # it holds the database password: refused while others may read it (review 73)
        refused = subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "--config",
                                  str(tmp_path / name), "--print-cfg"],
                                 cwd=root, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "chmod 600" in refused.stderr, refused.stderr
        (tmp_path / name).chmod(0o600)
    shown = subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "--config",
                            str(tmp_path / name), "--print-cfg"],
                           cwd=root, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr[-1500:]
    cfg = tmp_path / "rendered.cfg"
    cfg.write_text(shown.stdout)
    if "WITH_DISPATCHER" in shown.stdout:     # the list file the launcher writes at start
        (tmp_path / "ds.list").write_text("1 sip:192.0.2.11:5060 8\n")
        cfg.write_text(shown.stdout.replace(
            shown.stdout.split('"list_file", "')[1].split('"')[0], str(tmp_path / "ds.list")))
    checked = subprocess.run(["kamailio", "-c", "-f", str(cfg)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr[-1500:]


def test_kdmq_is_taken_only_over_udp_from_a_peer_to_this_nodes_dmq_socket(tmp_path):
    """Review 40: a peer's address and port alone were enough, over TCP (anyone on the
    peer's host can connect from its free TCP port of that number) and on a public SIP
    listener (a forged UDP source).  Addresses compare in one spelling (IPv6 as
    getaddrinfo and Kamailio's ``$si`` may write it differently)."""
    from kamailio_app.bootstrap import ProxyApp
    config = _config(tmp_path, cluster={"db_url": DB, "dmq_address": "sip:127.0.0.1:5090",
                                        "peers": ["sip:127.0.0.2:5090", "sip:[::1]:5091"]})
    app = ProxyApp(config)
    ours = ("127.0.0.1", 5090)
    assert app.dmq_accepts(("127.0.0.2", 5090), "udp", ours)
    assert app.dmq_accepts(("0:0:0:0:0:0:0:1", 5091), "UDP", ours)
    assert app.dmq_accepts(("[::1]", 5091), "udp", ours)
    assert not app.dmq_accepts(("127.0.0.2", 5090), "tcp", ours)
    assert not app.dmq_accepts(("127.0.0.2", 5090), "udp", ("127.0.0.1", 5060))  # a SIP port
    assert not app.dmq_accepts(("127.0.0.2", 5091), "udp", ours)
    assert not app.dmq_accepts(("127.0.0.3", 5090), "udp", ours)
    assert not app.dmq_accepts(("not an address", 5090), "udp", ours)
    single = ProxyApp(_config(tmp_path, cluster={"db_url": DB}))
    assert not single.dmq_accepts(("127.0.0.2", 5090), "udp", ours)


def test_a_replicating_e2m_node_uses_the_shared_schema_even_without_an_archive(tmp_path):
    """Review 40: the replay claims are in the shared database's schema; a cluster with
    no [archive] never got them (db init made nothing, the proxy started anyway)."""
    cluster = {"db_url": DB, **DMQ}
    on = parse_app_config({"kamailio": LISTEN, "cluster": cluster}, tmp_path / "PROXY.toml")
    assert on.e2m.enabled and not on.archive.shared and on.shared_schema
    assert not _config(tmp_path, cluster=cluster).shared_schema        # e2m off: no claims
    assert not parse_app_config({"kamailio": LISTEN, "cluster": {"db_url": DB}},
                                tmp_path / "PROXY.toml").shared_schema  # no DMQ: no claims
