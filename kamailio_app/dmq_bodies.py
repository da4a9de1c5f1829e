"""What a KDMQ body from a peer's address may hold before Kamailio's modules read it.

Kamailio 5.6.3's DMQ handlers trust their peers: a body they cannot take apart can
stop the node.  ``extract_node_list`` (dmq) returns with the node list's lock held on
a line it refuses, so DMQ answers nothing more, and logs the line (review 190);
htable's and dmq_usrloc's handlers read fields of a JSON document that is not there
(``{}``: signal 11 in the DMQ worker, and Kamailio stops every process: review 192).
A peer's address proves little (UDP: a forged source on the DMQ network will do), so
each body goes to its module only in the shape that module's own peers write, and
only when its Content-Length is the body's length (the modules read that many octets,
the checks read the datagram).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from e2m_plugins.uri import canonical_ip

_NODE = re.compile(r"sip:(\[[0-9A-Fa-f:.]+\]|[0-9.]+):([0-9]{1,5})(?:;transport=udp)?"
                   r";status=(?:active|disabled|timeout|pending)\r?")


def node_list_ok(body: str, nodes: Collection[tuple[str, int]]) -> bool:
    """Whether ``body`` is a node list dmq reads safely: every line ends in a newline
    (dmq drops each line's last octet) and is a node of ``nodes`` (canonical address,
    port), each at most once."""
    if not body.endswith("\n"):
        return False
    lines = body[:-1].split("\n")
    if len(lines) > len(nodes):
        return False
    seen = set()
    for line in lines:
        match = _NODE.fullmatch(line)
        if match is None:
            return False
        try:
            node = (canonical_ip(match.group(1).strip("[]")), int(match.group(2)))
        except ValueError:
            return False
        if node not in nodes or node in seen:
            return False
        seen.add(node)
    return True


def _document(body: str) -> dict[str, Any] | None:
    """``body`` as one JSON object with at least one member, no name twice and no
    NaN or Infinity (what srjson and Python would read alike); None otherwise."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in items]
        if len(set(names)) != len(names):
            raise ValueError("a name twice")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(name)

    try:
        doc = json.loads(body, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) and doc else None


def _number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields_ok(doc: dict[str, Any], strings: Collection[str], numbers: Collection[str],
               required: Collection[str]) -> bool:
    """Every member a known one of its type (the modules take a string's C pointer
    without looking), and the ``required`` ones there."""
    for name, value in doc.items():
        if name in strings:
            if not isinstance(value, str):
                return False
        elif name in numbers:
            if not _number(value):
                return False
        else:
            return False
    return all(name in doc for name in required)


_HT_STRINGS = ("htname", "cname", "strval")
_HT_SYNC, _HT_ACTIONS = 1, range(1, 7)      # ht_dmq.h: NONE, SYNC, SET_CELL, ... RM_CELL_SW
_HT_REMOVALS = (5, 6)                        # RM_CELL_RE, RM_CELL_SW
_AVP_VAL_STR = 2


def htable_body_ok(body: str) -> bool:
    """An htable KDMQ: a sync request (``{"action":1}``), one action on a cell
    (``action``, ``htname``, ``cname``, the value its ``type`` says), a removal by
    regex or prefix (``htname``, a string ``strval``), or a sync's ``{"cells": [...]}``
    of complete cells."""
    doc = _document(body)
    if doc is None:
        return False
    if next(iter(doc)) == "cells":
        cells = doc["cells"]
        return len(doc) == 1 and isinstance(cells, list) and all(
            isinstance(cell, dict) and _fields_ok(cell, _HT_STRINGS, ("type", "intval", "expire"),
                                                  ("htname", "cname", "type"))
            and _value_ok(cell) for cell in cells)
    if not _fields_ok(doc, _HT_STRINGS, ("action", "type", "intval", "mode"), ("action",)) \
            or doc["action"] not in _HT_ACTIONS:
        return False
    if doc["action"] == _HT_SYNC:
        return len(doc) == 1           # a request for the tables ({"action":1})
    if "htname" not in doc:
        return False
    if doc["action"] in _HT_REMOVALS:
        # a removal by regex or prefix: htable reads the value as that string, whatever
        # the type says (a number there was an uninitialised string: review 194), and
        # names no cell
        return bool(doc.get("type", 0) & _AVP_VAL_STR) and bool(doc.get("strval"))
    return "cname" in doc and _value_ok(doc)


def _value_ok(cell: dict[str, Any]) -> bool:
    kind = cell.get("type")
    if kind is None:
        return "strval" not in cell and "intval" not in cell
    return ("strval" in cell) if kind & _AVP_VAL_STR else ("strval" not in cell)


_UL_STRINGS = ("aor", "ruid", "c", "received", "sock", "path", "callid", "user_agent",
               "instance")
_UL_NUMBERS = ("action", "expires", "cseq", "flags", "cflags", "q", "last_modified",
               "methods", "reg_id", "server_id")
_UL_UPDATE, _UL_RM, _UL_SYNC = 1, 2, 3     # usrloc_sync.h: NONE, UPDATE, RM, SYNC
_SOCKET = re.compile(r"(?:udp|tcp|tls|sctp|ws|wss):(?:\[[0-9A-Fa-f:.]+\]|[0-9.]+):[0-9]{1,5}")


def usrloc_body_ok(body: str) -> bool:
    """A dmq_usrloc KDMQ: one contact action, or ``{"multi": {...}}`` of them (numbered
    members, as dmq_usrloc writes them; an array is read alike)."""
    doc = _document(body)
    if doc is None:
        return False
    if next(iter(doc)) == "multi":      # {"multi": {"1": {...}, "2": {...}}}
        actions = doc["multi"]
        if isinstance(actions, dict):
            actions = list(actions.values())
        return len(doc) == 1 and isinstance(actions, list) and bool(actions) and all(
            isinstance(action, dict) and _contact_action_ok(action) for action in actions)
    return _contact_action_ok(doc)


def _contact_action_ok(action: dict[str, Any]) -> bool:
    if not action or not _fields_ok(action, _UL_STRINGS, _UL_NUMBERS, ("action",)):
        return False
    if "sock" in action and not _SOCKET.fullmatch(action["sock"]):
        return False         # dmq_usrloc logs a socket it cannot parse, whole
    kind = action["action"]
    if kind in (_UL_UPDATE, _UL_RM):
        return all(action.get(name) for name in ("aor", "ruid", "c"))
    return kind == _UL_SYNC
