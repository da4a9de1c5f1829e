"""What we know about the C side of one pinned wheel, and the checks that prove it.

pjsua2 exposes no pjsip module API to Python, but the wheel's extension module
exports every pjlib/pjsip C symbol.  Reaching into ``pjsip_tx_data`` and
``pjsip_rx_data`` from ctypes needs struct offsets, and those are only right
for the exact build they came from:

- ``pjsua2-python==2.15.1.post1`` (pjproject 2.15.1, ``--disable-sound
  --disable-video``, default ``PJSIP_MAX_PKT_LEN`` 4000, ``PJ_MAX_OBJ_NAME`` 32),
- Linux x86_64 (LP64: 8-byte pointers and ``pj_ssize_t``, 4-byte ``int``).

The numbers below were derived from the pjproject 2.15.1 headers
(``sip_transport.h``, ``sip_msg.h``, ``ioqueue.h``) by adding up field sizes with
natural alignment, and they agree with an ``offsetof()`` table computed against
the same headers and configuration (``docs/platform-notes.md`` §2.2).  Nothing here is trusted blindly:
every access goes through a check that would fail on a different layout
(see :func:`check_tx` and :func:`check_rx`), and a failed check raises
:class:`AbiError` so the hook fails closed instead of writing to the wrong place.

This module is the only place that knows an offset.  It does not import
pjsua2 until :func:`lib` is first called, so the gate can refuse an unknown
wheel or platform before any of this memory is touched.
"""

from __future__ import annotations

import ctypes as C
import re
import socket
import struct
from dataclasses import dataclass

PINNED_WHEEL = "2.15.1.post1"
PINNED_PJPROJECT = "2.15.1"
PINNED_PLATFORM = ("linux", "x86_64")

PJSIP_MAX_PKT_LEN = 4000      # size of pjsip_rx_data.pkt_info.packet
PJ_SUCCESS = 0
PJ_TRUE, PJ_FALSE = 1, 0
PJSIP_ERRNO_START = 170000    # PJ_ERRNO_START_USER; PJSIP_ERRNO_FROM_SIP_STATUS(c) = this + c

# pjsip_module (sip_module.h): two list pointers, pj_str_t name, int id, int
# priority, 4 life-cycle pointers, 4 message callbacks, on_tsx_state.
MODULE_SIZE = 112
MODULE_NAME = 16              # pj_str_t name, used to read our neighbours' names

# pjsip_tx_data: prev, next, pool, obj_name[32], info, rx_timestamp(16), mgr,
# op_key(pjsip_tx_data_op_key: pj_ioqueue_op_key_t of 34 pointers + 3 pointers),
# lock, msg, saved_strict_route, buf{start,cur,end}.
TX_POOL = 16
TX_OBJ_NAME = 24
TX_MSG = 392
TX_BUF_START, TX_BUF_CUR, TX_BUF_END = 408, 416, 424

# ... then ref_cnt, is_pending, token, cb (432..463), dest_info{name, addr{count,
# entry[PJSIP_MAX_RESOLVED_ADDRESSES] of 44 bytes}, cur_addr}, then tp_info{transport,
# dst_addr(pj_sockaddr, 28), dst_addr_len, dst_name[46], dst_port}: valid only while a
# module's on_tx_request/on_tx_response runs.  The table holds 32 entries in a build
# with IPv6 and 16 without, so both layouts are tried and one must agree with itself
# (the binary address, its text and its port): (dst_addr, dst_name, dst_port).
TX_DESTINATION_LAYOUTS = ((1904, 1936, 1984), (1200, 1232, 1280))

# pjsip_rx_data: tp_info{pool, transport, tp_data, op_key(34+1 pointers)} = 304,
# pkt_info{timestamp(16), packet[4000], zero, len, src_addr(28), src_addr_len,
# src_name[46], src_port}, msg_info{msg_buf, len, msg, info, 12 header
# shortcuts, parse_err list head}.
RX_POOL = 0
RX_TRANSPORT = 8              # tp_info.transport: the pjsip_transport it came in on
RX_PACKET = 320
RX_PKT_LEN = 4328
RX_SRC_ADDR = 4336
RX_SRC_NAME = 4368
RX_SRC_NAME_SIZE = 46         # PJ_INET6_ADDRSTRLEN
RX_SRC_PORT = 4416
RX_MSG_BUF = 4424
RX_MSG_LEN = 4432
RX_MSG = 4440
RX_INFO = 4448
RX_VIA = 4480                 # msg_info.via: cid, from, to, *via*, ...
RX_SHORTCUTS = tuple(range(4456, 4552, 8))   # cid .. supported: stale after a re-parse
RX_PARSE_ERR = 4552           # list head {prev, next}; empty when both point at itself

# pjsip_transport starts with char obj_name[PJ_MAX_OBJ_NAME]; sip_transport_tcp.c names
# an accepted connection "tcps%p" and one it opened "tcpc%p" (tcp_create()).
TP_OBJ_NAME = 0

# pjsip_msg starts with pjsip_msg_type_e type.
MSG_REQUEST, MSG_RESPONSE = 0, 1

# pjsip_via_hdr: list(16), type(4+4), name(16), sname(16), vptr(8), transport(16),
# sent_by{host(16), port(4)+4}, ttl_param, rport_param, maddr, recvd, branch.
HDR_TYPE = 16
HDR_NAME = 24
PJSIP_H_VIA = 41
VIA_SENT_BY_PORT = 96
VIA_RPORT = 108
VIA_RECVD = 128
VIA_BRANCH = 144

_AF_INET, _AF_INET6 = 2, 10   # Linux values; pjlib passes the OS constants through

_REQUEST_LINE = re.compile(rb"[A-Z][A-Z0-9._!%*+`'~-]* [^ \r\n]+ SIP/2\.0\r\n")


class AbiError(RuntimeError):
    """A run-time sanity check failed: the memory does not look like the build we know."""


class PjStr(C.Structure):
    _fields_ = [("ptr", C.c_void_p), ("slen", C.c_ssize_t)]


RxCallback = C.CFUNCTYPE(C.c_int, C.c_void_p)   # pj_bool_t   (*)(pjsip_rx_data*)
TxCallback = C.CFUNCTYPE(C.c_int, C.c_void_p)   # pj_status_t (*)(pjsip_tx_data*)


class PjsipModule(C.Structure):
    _fields_ = [("prev", C.c_void_p), ("next", C.c_void_p), ("name", PjStr),
                ("id", C.c_int), ("priority", C.c_int),
                ("load", C.c_void_p), ("start", C.c_void_p),
                ("stop", C.c_void_p), ("unload", C.c_void_p),
                ("on_rx_request", RxCallback), ("on_rx_response", RxCallback),
                ("on_tx_request", TxCallback), ("on_tx_response", TxCallback),
                ("on_tsx_state", C.c_void_p)]


assert C.sizeof(PjsipModule) == MODULE_SIZE
assert PjsipModule.name.offset == MODULE_NAME


_LIB: C.CDLL | None = None


def lib() -> C.CDLL:
    """The already-loaded pjsua2 extension, with the prototypes we call declared."""
    global _LIB
    if _LIB is None:
        from pjsua2 import _pjsua2  # the wheel's extension; CDLL reuses the loaded copy

        handle = C.CDLL(_pjsua2.__file__)
        handle.pjsua_get_pjsip_endpt.restype = C.c_void_p
        handle.pjsua_get_pjsip_endpt.argtypes = []
        handle.pjsip_endpt_register_module.restype = C.c_int
        handle.pjsip_endpt_register_module.argtypes = [C.c_void_p, C.c_void_p]
        handle.pjsip_endpt_unregister_module.restype = C.c_int
        handle.pjsip_endpt_unregister_module.argtypes = [C.c_void_p, C.c_void_p]
        handle.pj_pool_alloc.restype = C.c_void_p
        handle.pj_pool_alloc.argtypes = [C.c_void_p, C.c_size_t]
        handle.pjsip_parse_rdata.restype = C.c_void_p
        handle.pjsip_parse_rdata.argtypes = [C.c_void_p, C.c_size_t, C.c_void_p]
        handle.pjsip_endpt_respond_stateless.restype = C.c_int
        handle.pjsip_endpt_respond_stateless.argtypes = [
            C.c_void_p, C.c_void_p, C.c_int, C.c_void_p, C.c_void_p, C.c_void_p]
        # building and sending a request of our own (late_2xx.py)
        handle.pjsip_endpt_create_tdata.restype = C.c_int
        handle.pjsip_endpt_create_tdata.argtypes = [C.c_void_p, C.POINTER(C.c_void_p)]
        handle.pjsip_tx_data_add_ref.restype = None
        handle.pjsip_tx_data_add_ref.argtypes = [C.c_void_p]
        handle.pjsip_tx_data_dec_ref.restype = C.c_int
        handle.pjsip_tx_data_dec_ref.argtypes = [C.c_void_p]
        handle.pjsip_parse_msg.restype = C.c_void_p
        handle.pjsip_parse_msg.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t, C.c_void_p]
        handle.pjsip_endpt_send_request_stateless.restype = C.c_int
        handle.pjsip_endpt_send_request_stateless.argtypes = [
            C.c_void_p, C.c_void_p, C.c_void_p, C.c_void_p]
        handle.pjsip_endpt_send_request.restype = C.c_int
        handle.pjsip_endpt_send_request.argtypes = [
            C.c_void_p, C.c_void_p, C.c_int32, C.c_void_p, C.c_void_p]
        handle.pj_log_set_level.restype = None
        handle.pj_log_set_level.argtypes = [C.c_int]
        _LIB = handle
    return _LIB


# -- small memory helpers ------------------------------------------------------

def _ptr(addr: int) -> int:
    return C.c_void_p.from_address(addr).value or 0


def _set_ptr(addr: int, value: int | None) -> None:
    C.c_void_p.from_address(addr).value = value


def _int(addr: int) -> int:
    return C.c_int.from_address(addr).value


def _pjstr(addr: int) -> bytes:
    s = PjStr.from_address(addr)
    if not s.ptr or s.slen <= 0:
        return b""
    if s.slen > 1024:
        raise AbiError("implausible pj_str_t length")
    return C.string_at(s.ptr, s.slen)


def looks_like_sip(data: bytes) -> bool:
    """A status line or a request line at the very start."""
    return data.startswith(b"SIP/2.0 ") or _REQUEST_LINE.match(data) is not None


def error_status(sip_code: int) -> int:
    """PJSIP_ERRNO_FROM_SIP_STATUS: a pj_status_t pjsip maps back to ``sip_code``."""
    if not 100 <= sip_code <= 699:
        raise ValueError("SIP status code out of range")
    return PJSIP_ERRNO_START + sip_code


# -- the module list -----------------------------------------------------------

def module_name_at(module_addr: int) -> str:
    """Name of the pjsip module at ``module_addr`` (for the neighbour check)."""
    return _pjstr(module_addr + MODULE_NAME).decode("ascii", "replace")


# -- outgoing: pjsip_tx_data ----------------------------------------------------

def tx_bytes(tdata: int) -> bytes:
    """The encoded outgoing message, after the sanity checks pass."""
    if not tdata:
        raise AbiError("tx: NULL tdata")
    name = C.string_at(tdata + TX_OBJ_NAME, 4)
    if name != b"tdta":
        raise AbiError("tx: obj_name is not 'tdta...'")
    start, cur, end = _ptr(tdata + TX_BUF_START), _ptr(tdata + TX_BUF_CUR), _ptr(tdata + TX_BUF_END)
    if not (start and start < cur <= end and cur - start <= 1 << 20):
        raise AbiError("tx: buffer pointers out of order")
    data = C.string_at(start, cur - start)
    if not looks_like_sip(data):
        raise AbiError("tx: buffer does not start like a SIP message")
    msg = _ptr(tdata + TX_MSG)
    if msg:  # the parsed message the buffer was printed from
        expect = MSG_RESPONSE if data.startswith(b"SIP/2.0 ") else MSG_REQUEST
        if _int(msg) != expect:
            raise AbiError("tx: pjsip_msg type does not match the start line")
    return data


def _sockaddr_text(addr: int) -> tuple[str, int] | None:
    """(address, port) of the pj_sockaddr at ``addr``; None for another family."""
    family = C.c_uint16.from_address(addr).value
    port = struct.unpack("!H", C.string_at(addr + 2, 2))[0]
    if family == _AF_INET:
        return socket.inet_ntop(socket.AF_INET, C.string_at(addr + 4, 4)), port
    if family == _AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, C.string_at(addr + 8, 16)), port
    return None


def tx_destination(tdata: int) -> tuple[str, int] | None:
    """Where pjsip is sending this message: (address, port) from ``tp_info``, read
    during on_tx only.  None when neither known layout agrees with itself (the binary
    destination, its text and its port must say the same, as ``rx_view`` checks)."""
    if not tdata:
        return None
    for addr, name, port in TX_DESTINATION_LAYOUTS:
        binary = _sockaddr_text(tdata + addr)
        if binary is None:
            continue
        text = C.string_at(tdata + name, RX_SRC_NAME_SIZE).split(b"\0", 1)[0]
        if 0 < binary[1] == _int(tdata + port) and text == binary[0].encode("ascii"):
            return binary
    return None


def tx_replace(tdata: int, data: bytes) -> None:
    """Point the tdata's buffer at a pool copy of ``data``.

    The capacity is at least PJSIP_MAX_PKT_LEN: if pjsip later invalidates the
    buffer and reprints the message (a 401/407 retry), it prints into this
    same buffer and our module sees the new plaintext again.
    """
    cap = max(len(data), PJSIP_MAX_PKT_LEN) + 1
    pool = _ptr(tdata + TX_POOL)
    if not pool:
        raise AbiError("tx: NULL pool")
    buf = lib().pj_pool_alloc(pool, cap)
    if not buf:
        raise MemoryError("pj_pool_alloc failed")
    C.memmove(buf, data, len(data))
    C.memset(buf + len(data), 0, cap - len(data))
    _set_ptr(tdata + TX_BUF_START, buf)
    _set_ptr(tdata + TX_BUF_CUR, buf + len(data))
    _set_ptr(tdata + TX_BUF_END, buf + cap)


# -- incoming: pjsip_rx_data -----------------------------------------------------

@dataclass(frozen=True)
class RxView:
    """What the hook read from one rdata; addresses stay valid only inside the callback."""

    data: bytes
    src_host: str
    src_port: int
    is_request: bool
    recvd: bytes          # what the transport stamped as Via received= (requests)
    rport: int            # Via rport as stamped (-1: the request had no rport)
    transport: int = 0    # the pjsip_transport* it arrived on (an identity, never read)


def _list_empty(head: int) -> bool:
    return _ptr(head) == head and _ptr(head + 8) == head


def rx_view(rdata: int) -> RxView:
    """Read the incoming message, after the sanity checks pass."""
    if not rdata:
        raise AbiError("rx: NULL rdata")
    pkt = rdata + RX_PACKET
    mbuf, mlen = _ptr(rdata + RX_MSG_BUF), _int(rdata + RX_MSG_LEN)
    pkt_len = C.c_ssize_t.from_address(rdata + RX_PKT_LEN).value
    if not (0 < pkt_len <= PJSIP_MAX_PKT_LEN and 0 < mlen <= pkt_len):
        raise AbiError("rx: implausible packet/message lengths")
    # msg_buf must point into rdata->pkt_info.packet (pjsip_rx_data_clone relies on it).
    if not (pkt <= mbuf and mbuf + mlen <= pkt + pkt_len):
        raise AbiError("rx: msg_buf outside pkt_info.packet")
    data = C.string_at(mbuf, mlen)
    if not looks_like_sip(data):
        raise AbiError("rx: message does not start like SIP")
    src_name = C.string_at(rdata + RX_SRC_NAME).decode("ascii", "replace")
    src_port = _int(rdata + RX_SRC_PORT)
    # The binary source address must say the same as src_name/src_port.
    binary = _sockaddr_text(rdata + RX_SRC_ADDR)
    if binary is None:
        raise AbiError("rx: unknown source address family")
    if binary != (src_name, src_port):
        raise AbiError("rx: src_addr disagrees with src_name/src_port")
    msg = _ptr(rdata + RX_MSG)
    if not msg:
        raise AbiError("rx: no parsed message")
    is_request = not data.startswith(b"SIP/2.0 ")
    if _int(msg) != (MSG_REQUEST if is_request else MSG_RESPONSE):
        raise AbiError("rx: pjsip_msg type does not match the start line")
    if not _list_empty(rdata + RX_PARSE_ERR):
        raise AbiError("rx: parse error list is not an empty list head")
    via = _ptr(rdata + RX_VIA)
    if not via or _int(via + HDR_TYPE) != PJSIP_H_VIA or _pjstr(via + HDR_NAME) != b"Via":
        raise AbiError("rx: top Via shortcut is not a Via header")
    recvd, rport = _pjstr(via + VIA_RECVD), _int(via + VIA_RPORT)
    if is_request and recvd != src_name.encode():
        # the transport manager always stamps received= on requests
        raise AbiError("rx: Via received= was not stamped with the source address")
    return RxView(data, src_name, src_port, is_request, recvd, rport, _ptr(rdata + RX_TRANSPORT))


def rx_replace(rdata: int, view: RxView, data: bytes) -> None:
    """Write ``data`` over the message in place and make pjsip parse it again.

    In place, because pjsua clones incoming INVITEs with pjsip_rx_data_clone(),
    which assumes msg_buf points into pkt_info.packet; and never past the old
    length, because on TCP the following bytes are the next message.  The new
    parse gets fresh header shortcuts, and the top Via gets back the received/
    rport values the transport manager had stamped on the old one.
    """
    mbuf, mlen = _ptr(rdata + RX_MSG_BUF), _int(rdata + RX_MSG_LEN)
    if len(data) > mlen:
        raise AbiError("rx: a rewritten message may not be longer than the original")
    if not looks_like_sip(data) or data.startswith(b"SIP/2.0 ") == view.is_request:
        raise AbiError("rx: a rewrite must keep the message a request/response")
    old_via = _ptr(rdata + RX_VIA)
    recvd = PjStr.from_buffer_copy(C.string_at(old_via + VIA_RECVD, C.sizeof(PjStr)))
    C.memmove(mbuf, data, len(data))
    # The scanner wants a NUL after the message; keep the byte it covers (on
    # TCP it can be the first byte of the next message) and put it back after.
    saved = C.string_at(mbuf + len(data), 1)
    C.memset(mbuf + len(data), 0, 1)
    for off in RX_SHORTCUTS:
        _set_ptr(rdata + off, None)
    _set_ptr(rdata + RX_INFO, None)          # cached description of the old message
    C.c_int.from_address(rdata + RX_MSG_LEN).value = len(data)
    try:
        msg = lib().pjsip_parse_rdata(mbuf, len(data), rdata)
    finally:
        C.memmove(mbuf + len(data), saved, 1)
    if not msg or not _list_empty(rdata + RX_PARSE_ERR):
        raise AbiError("rx: pjsip could not parse the rewritten message")
    # The basic checks pjsip made on the original, which a rewrite could undo.
    for off, what in ((4456, "Call-ID"), (4464, "From"), (4472, "To"), (RX_VIA, "Via"),
                      (4488, "CSeq")):
        if not _ptr(rdata + off):
            raise AbiError(f"rx: the rewritten message has no {what}")
    if view.is_request:
        via = _ptr(rdata + RX_VIA)
        C.memmove(via + VIA_RECVD, C.addressof(recvd), C.sizeof(PjStr))
        if _int(via + VIA_RPORT) == 0:
            C.c_int.from_address(via + VIA_RPORT).value = view.src_port


def respond_stateless(rdata: int, code: int, reason: bytes | None) -> int:
    """pjsip_endpt_respond_stateless(); returns the pj_status_t."""
    text = None
    if reason:
        holder = C.create_string_buffer(reason)
        text = PjStr(C.addressof(holder), len(reason))
    handle = lib()
    return handle.pjsip_endpt_respond_stateless(
        handle.pjsua_get_pjsip_endpt(), rdata, code,
        C.byref(text) if text is not None else None, None, None)


def send_request(data: bytes, *, stateful: bool) -> int:
    """Have pjsip send the whole request ``data`` (start line, headers, body) as if it
    had built it: a new tdata whose message pjsip's own parser makes from ``data``, then
    ``pjsip_endpt_send_request`` (``stateful``: a client transaction, retransmitted over
    UDP, whose final answer it absorbs) or ``pjsip_endpt_send_request_stateless``.
    Either way pjsip picks the destination from the Route set and Request-URI, resolves
    it, fills in the top Via's transport and sent-by (keeping its branch), prints the
    message and passes it through every module's ``on_tx_request``, the hook's too.
    Call on a pjlib-registered thread, outside pjsip's callbacks.  Returns the
    pj_status_t; raises :class:`AbiError` when ``data`` does not parse cleanly (a header
    pjsip's parser skipped would be lost silently)."""
    if not _REQUEST_LINE.match(data):
        raise AbiError("send: not a request")
    handle = lib()
    endpt = handle.pjsua_get_pjsip_endpt()
    tdata = C.c_void_p()
    status = handle.pjsip_endpt_create_tdata(endpt, C.byref(tdata))
    if status != PJ_SUCCESS or not tdata.value:
        return status or -1
    addr = tdata.value
    handle.pjsip_tx_data_add_ref(addr)     # created at 0: the send takes this reference
    sent = False
    try:
        if C.string_at(addr + TX_OBJ_NAME, 4) != b"tdta":
            raise AbiError("send: obj_name is not 'tdta...'")
        pool = _ptr(addr + TX_POOL)
        if not pool or _ptr(addr + TX_MSG):
            raise AbiError("send: a new tdata without a pool, or with a message")
        # the text lives in the tdata's pool (the parsed headers point into it), with the
        # NUL the scanner wants after it
        buf = handle.pj_pool_alloc(pool, len(data) + 1)
        if not buf:
            raise MemoryError("pj_pool_alloc failed")
        C.memmove(buf, data, len(data))
        C.memset(buf + len(data), 0, 1)
        errors = handle.pj_pool_alloc(pool, 64)     # pjsip_parser_err_report list head
        if not errors:
            raise MemoryError("pj_pool_alloc failed")
        _set_ptr(errors, errors)
        _set_ptr(errors + 8, errors)
        msg = handle.pjsip_parse_msg(pool, buf, len(data), errors)
        if not msg or not _list_empty(errors):
            raise AbiError("send: pjsip could not parse the request cleanly")
        if _int(msg) != MSG_REQUEST:
            raise AbiError("send: pjsip parsed something else than a request")
        _set_ptr(addr + TX_MSG, msg)
        sent = True
        if stateful:
            # takes the reference whatever happens (sip_util_statefull.c)
            return handle.pjsip_endpt_send_request(endpt, addr, -1, None, None)
        status = handle.pjsip_endpt_send_request_stateless(endpt, addr, None, None)
        if status != PJ_SUCCESS:
            # failed before its resolver callback, which would have let it go
            handle.pjsip_tx_data_dec_ref(addr)
        return status
    finally:
        if not sent:
            handle.pjsip_tx_data_dec_ref(addr)


def tcp_direction(transport: int) -> str | None:
    """"in" for a TCP connection pjsip accepted, "out" for one it opened, None for
    anything else (UDP, a NULL or unknown handle), from the transport's obj_name."""
    if not transport:
        return None
    name = C.string_at(transport + TP_OBJ_NAME, 6)
    if name.startswith(b"tcps0x"):
        return "in"
    if name.startswith(b"tcpc0x"):
        return "out"
    return None


def silence_pjlib_log() -> None:
    """Level 0 for pjlib's log before libCreate(), so no banner reaches stderr."""
    lib().pj_log_set_level(0)

