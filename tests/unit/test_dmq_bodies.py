"""``kamailio_app.dmq_bodies``: which KDMQ bodies reach Kamailio's modules (review 190:
a node line dmq refuses leaves its node-list lock held for good; review 192: a node
list's last line without its newline did the same, and an htable or dmq_usrloc body
they cannot take apart stopped the node)."""

from __future__ import annotations

import pytest

from kamailio_app.dmq_bodies import htable_body_ok, node_list_ok, usrloc_body_ok

NODES = {("127.0.0.1", 5090), ("127.0.0.2", 5090), ("::1", 5091)}


@pytest.mark.parametrize("body", [
    "sip:127.0.0.1:5090;status=active\r\nsip:127.0.0.2:5090;status=pending\r\n",
    "sip:[::1]:5091;status=timeout\n",
    "sip:[0:0:0:0:0:0:0:1]:5091;transport=udp;status=disabled\r\n",
])
def test_a_list_of_our_nodes_passes(body):
    assert node_list_ok(body, NODES)


@pytest.mark.parametrize("body", [
    "",                                                          # no node at all
    "sip:127.0.0.1:5090;status=awake\r\n",                       # a state dmq refuses
    "sip:127.0.0.1:5090;status=active\r\n\r\nsip:127.0.0.2:5090;status=active\r\n",
    "sip:127.0.0.9:5090;status=active\r\n",                      # not one of ours
    "sip:node-a.example.net:5090;status=active\r\n",             # a name to resolve
    "sip:127.0.0.1:5090;status=active\r\nsip:127.0.0.1:5090;status=active\r\n",
    "sip:127.0.0.1:5090;transport=tcp;status=active\r\n",        # DMQ is UDP here
    "sip:127.0.0.1:99999;status=active\r\n",
    "sip:127.0.0.1:5090;status=active;x=1\r\n",
    "sip:127.0.0.1:5090\r\n",                                     # no state
    "sip:[::1:5091;status=active\r\n",
])
def test_anything_else_is_refused(body):
    assert not node_list_ok(body, NODES)


def test_more_lines_than_nodes_are_refused():
    body = "sip:127.0.0.1:5090;status=active\r\n" * 4
    assert not node_list_ok(body, NODES)


def test_a_last_line_without_its_newline_is_refused():
    assert not node_list_ok("sip:127.0.0.1:5090;status=active", NODES)


@pytest.mark.parametrize("body", [
    '{"action":3,"htname":"e2mkeys","cname":"k1","type":2,"strval":"sealed","mode":1}',
    '{"action":4,"htname":"e2mseen","cname":"k2"}',
    '{"action":2,"htname":"e2mtargets","cname":"k3","type":0,"intval":7,"mode":0}',
    '{"action":1}',
    '{"cells":[{"htname":"e2mkeys","cname":"k","type":2,"strval":"v","expire":9}]}',
    '{"cells":[]}',
    '{"action":5,"htname":"e2mkeys","type":2,"strval":"^k.*$","mode":0}',   # review 194 HB1
    '{"action":6,"htname":"e2mkeys","type":2,"strval":"k1","mode":1}',
])
def test_an_htable_body_of_its_peers_shape_passes(body):
    assert htable_body_ok(body)


@pytest.mark.parametrize("body", [
    "{}", "[]", "null", '{"htname":1}', '{"action":3}', '{"action":3,"htname":"t"}',
    '{"action":1,"htname":"t"}',
    '{"action":3,"htname":"t","cname":"c","type":2}',              # a string type, no value
    '{"action":3,"htname":"t","cname":"c","type":2,"strval":5}',
    '{"action":9,"htname":"t","cname":"c"}', '{"action":3,"htname":"t","cname":"c","x":1}',
    '{"action":3,"action":3,"htname":"t","cname":"c"}', '{"action":NaN,"htname":"t"}',
    '{"cells":{}}', '{"cells":[{}]}', '{"cells":[{"htname":"t"}]}', '{"cells":[1]}',
    'not json', '{"action":true,"htname":"t","cname":"c"}',
    '{"action":5,"htname":"e2mkeys","cname":"x","type":0,"intval":4096}',  # review 194 K1
    '{"action":6,"htname":"t","type":2,"strval":""}', '{"action":5,"htname":"t"}',
])
def test_any_other_htable_body_is_refused(body):
    assert not htable_body_ok(body)


@pytest.mark.parametrize("body", [
    '{"action":3}',
    '{"action":1,"aor":"alice","ruid":"r1","c":"sip:a@1.2.3.4","expires":60,"q":-1,'
    '"sock":"udp:127.0.0.1:5060","received":"","path":"","callid":"x","user_agent":"",'
    '"instance":"","cseq":1,"flags":0,"cflags":0,"last_modified":1,"methods":1,'
    '"reg_id":0,"server_id":0}',
    '{"multi":[{"action":2,"aor":"alice","ruid":"r1","c":"sip:a@h"}]}',
    '{"multi":{"1":{"action":1,"aor":"bob","ruid":"r2","c":"sip:b@h","q":-1},'
    '"2":{"action":2,"aor":"bob","ruid":"r3","c":"sip:b@h2"}}}',
])
def test_a_usrloc_body_of_its_peers_shape_passes(body):
    assert usrloc_body_ok(body)


@pytest.mark.parametrize("body", [
    "{}", '{"multi":[]}', '{"multi":[{}]}', '{"multi":{}}', '{"multi":{"1":{}}}', '{"action":1}', '{"action":1,"aor":"a"}',
    '{"action":1,"aor":"a","ruid":"r","c":7}', '{"action":7}', '{"aor":"a"}',
    '{"action":1,"aor":"a","ruid":"r","c":"c","sock":"canary text"}',
    '{"action":1,"aor":"a","ruid":"r","c":"c","nope":1}',
])
def test_any_other_usrloc_body_is_refused(body):
    assert not usrloc_body_ok(body)
