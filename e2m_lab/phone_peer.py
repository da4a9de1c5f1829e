"""A stock ``e2m-phone`` calling out through a UDP socket of the test, which answers as
the callee's devices (one ``UAEngine`` per To tag): how reviews 179 and 181 drive the
real phone's early, failure and in-dialog answers without a proxy in the path."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from e2m_plugins import sip
from e2m_plugins.sip import make_response

from .flows import TRUSTED, known_proxy, ua_engine
from .phones import PhoneProcess, write_ua
from .stranger import HOST

BOB = "sip:bob@example.com"


class Devices:
    """The socket alice's phone sends through, answering as bob's devices (``f1``,
    ``f2``), each knowing the proxy ``TRUSTED`` with ``view``.  CANCEL, BYE and (with
    ``auto_prack``) PRACK are answered 200 as they come."""

    def __init__(self, pki: Any, view: tuple[str, ...], auto_prack: bool = True) -> None:
        self.pki = pki
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        proxy = known_proxy(pki, TRUSTED, view)
        self.devices = {t: ua_engine(pki, "bob", peers=("alice",), proxies=(proxy,))
                        for t in ("f1", "f2")}
        self.source: tuple | None = None
        self.log: list[bytes] = []
        self.opened: dict[str, sip.SipMessage] = {}
        self.auto_prack = auto_prack
        self.cseq = 10

    def receive(self, want: Callable[[sip.SipMessage], bool],
                timeout: float = 10.0) -> sip.SipMessage | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, source = self.sock.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                break
            try:
                msg = sip.parse(data)
            except Exception:  # noqa: BLE001 - keep-alives
                continue
            self.log.append(data)
            self.source = self.source or source
            methods = ("CANCEL", "BYE") + (("PRACK",) if self.auto_prack else ())
            if msg.is_request and msg.method in methods:
                self.sock.sendto(make_response(msg, 200, "OK").serialize(), source)
            if want(msg):
                self.source = source
                return msg
        return None

    def send(self, msg: sip.SipMessage | bytes) -> None:
        assert self.source is not None
        self.sock.sendto(msg if isinstance(msg, bytes) else msg.serialize(), self.source)

    def response(self, invite: sip.SipMessage, tag: str, status: int, reason: str,
                 body: bytes = b"", extra: tuple = ()) -> sip.SipMessage:
        """Device ``tag``'s answer to ``invite`` (opened by that device first)."""
        if tag not in self.opened:
            self.opened[tag] = self.devices[tag].open(invite).message
        opened = self.opened[tag]
        response = make_response(opened, status, reason,
                                 [("Contact", f"<sip:bob@{HOST}:{self.port}>"), *extra],
                                 body, "application/sdp" if body else None)
        return response.replace("To", f"{opened.get('To')};tag={tag}")

    def request(self, invite: sip.SipMessage, tag: str, method: str,
                body: bytes = b"") -> sip.SipMessage:
        """An in-dialog request of device ``tag`` to alice's phone."""
        self.cseq += 1
        target = re.sub(r"^.*<|>.*$", "", invite.get("Contact") or "")
        return sip.make_request(method, target, from_uri=BOB, to_uri=self.pki.aor("alice"),
                                call_id=invite.call_id, cseq=self.cseq, from_tag=tag,
                                to_tag=invite.from_tag, via_host=f"{HOST}:{self.port}",
                                extra_headers=[("Contact", f"<sip:bob@{HOST}:{self.port}>")],
                                body=body, content_type="application/sdp" if body else None)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def ringing_phone(tmp_path: Path, pki: Any,
                  devices: Devices) -> Iterator[tuple[PhoneProcess, Devices, sip.SipMessage]]:
    """alice's SRTP phone calling bob through ``devices``: (phone, devices, its INVITE),
    the INVITE checked to carry no key in the clear; both stopped at the end."""
    assert pki.directory is not None
    config = write_ua(tmp_path, "alice", pki.directory, peer="bob",
                      phone={"proxy": f"sip:{HOST}:{devices.port}", "srtp": True})
    alice = PhoneProcess(config, "alice")
    try:
        alice.wait("started", timeout=15)
        alice.send(f"call {BOB}")
        invite = devices.receive(lambda m: m.is_request and m.method == "INVITE")
        assert invite is not None
        assert b"inline:" not in devices.log[-1]
        yield alice, devices, invite
    finally:
        alice.stop()
        devices.close()
