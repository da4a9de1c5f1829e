"""``e2m-phone``: a command-line E2M softphone on pjsua2.

::

    e2m-phone --config UA.toml [--json] register
    e2m-phone --config UA.toml [--json] message TO TEXT
    e2m-phone --config UA.toml [--json] call TO [--seconds N] [--hold]
    e2m-phone --config UA.toml [--json] listen [--seconds N] [--commands]

Each received message and call is printed with its security attributes
(encrypted for whom, which proxies could read it, signed by whom, key reuse,
split SDP).  A received message's text is printed too: showing it is the
application's job.  ``--json`` prints one JSON object per event line instead.
``listen --commands`` also reads commands from stdin, one per line:
``message TO TEXT``, ``call TO``, ``hold``, ``unhold``, ``hangup``, ``status``
(what the phone keeps, in numbers), ``quit``.

Text output escapes whatever a header or message held that a terminal would not
show as itself (bytes that are not UTF-8, control characters, escape sequences).

Digest: the password comes from ``[phone] password_file`` (mode 0600) or the
environment variable ``E2M_PHONE_PASSWORD``, never from the command line or UA.toml;
nothing printed quotes it.  A refused registration (wrong password: 401, another
user's AoR: 403, a TLS proxy that fails verification: 503) exits 1.

Exit status: 0 success, 1 failure (not registered, message or call failed, a
forged 496 refused, the hook gate failed), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from typing import Any, TextIO

from e2m_plugins.cli import printable
from e2m_plugins.cli.terminal import guard_terminal
from e2m_plugins.config import ConfigError

__all__ = ["main"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class Printer:
    """Events to stdout, as text lines or JSON lines.

    Never raises: whatever a header held is printed escaped (text: see
    ``printable``; JSON: ``json.dumps`` escapes everything outside ASCII), and a
    write that fails (a closed or full pipe) is counted in ``failures``.
    """

    def __init__(self, as_json: bool, out: TextIO = sys.stdout) -> None:
        self.as_json = as_json
        self.out = out
        self.failures = 0

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            if self.as_json:
                line = json.dumps(event, default=str)
            else:
                try:
                    text = _text(event)
                except Exception:  # noqa: BLE001 - an event without the usual fields
                    text = f"{event.get('kind', '?')}: (event not shown)"
                if text is None:
                    return
                line = _encodable(printable(text), getattr(self.out, "encoding", None))
            self.out.write(line + "\n")
            self.out.flush()
        except Exception:  # noqa: BLE001 - output must never stop the phone
            self.failures += 1


def _encodable(line: str, encoding: str | None) -> str:
    """``line`` if the stream's encoding takes it, else with backslash escapes."""
    encoding = encoding or "utf-8"
    try:
        line.encode(encoding)
        return line
    except (UnicodeError, LookupError):
        try:
            return line.encode(encoding, "backslashreplace").decode(encoding)
        except (UnicodeError, LookupError):
            return line.encode("ascii", "backslashreplace").decode("ascii")


def _sec(info: dict[str, Any] | None) -> str:
    return info["summary"] if info else "no body"


def _call_sec(records: list[dict[str, Any]]) -> str:
    lines = [f"{'sent' if r['direction'] == 'tx' else 'received'} {r['what']} "
             f"(CSeq {r['cseq']}): {_sec(r['security'])}" for r in records[-2:]]
    return "\n            ".join(lines) or "no SDP yet"


def _text(e: dict[str, Any]) -> str | None:
    kind = e["kind"]
    if kind == "started":
        return f"{e['phone']}: listening on {e['transport']} {e['local']}"
    if kind == "registered":
        pols = ", ".join(f"{p['host']} view={','.join(p['view'])}" for p in e.get("policies", []))
        return f"registered ({e['code']}, expires {e['expiration']} s); proxy policies: {pols or 'none'}"
    if kind == "register_failed":
        return f"registration failed: {e['code']} {e['reason']}"
    if kind == "proxy_certificate":
        return f"certificate of {e['host']} fetched and checked"
    if kind == "message_in":
        return f"message from {e['from_uri']}: {e['text']!r}\n  security: {_sec(e['security'])}"
    if kind == "message_sent":
        retry = f" after {', '.join(e['retried_after'])}" if e["retried_after"] else ""
        return (f"message to {e['to']} delivered ({e['code']}, attempt {e['attempts']}{retry})\n"
                f"  security: {_sec(e['security'])}")
    if kind == "message_failed":
        return f"message to {e['to']} FAILED: {e['code']} {e['reason']}"
    if kind == "e2m_answer":
        return f"E2M answer {e['code']}: {e['action']} ({e['reason']})"
    if kind == "call_incoming":
        return f"call from {e['remote']}\n  security: {_call_sec(e['security'])}"
    if kind == "call_started":
        return f"calling {e['remote']} (attempt {e['attempt']})"
    if kind == "call_media":
        return f"call media: {', '.join(e['audio']) or 'none'}\n  security: {_call_sec(e['security'])}"
    if kind == "call_state":
        return f"call {e['state']} ({e['code']} {e['reason']})"
    if kind == "call_ended":
        return f"call ended ({e['code']} {e['reason']}); media was active: {e['media_was_active']}"
    if kind == "call_failed":
        return f"call to {e['remote']} FAILED: {e['code']} {e['reason']}"
    if kind == "call_refused":
        who = f" from {e['remote']}" if e.get("remote") else ""
        return f"call{who} refused with {e['code']}: {e['reason']}"
    if kind == "duplicate_refused":
        return f"a second copy of a {e['method']} refused with {e['code']} (already delivered)"
    if kind == "request_refused":
        return f"a {e['method']} from {e['source']} refused with {e['code']}: {e['reason']}"
    if kind == "response_dropped":
        return f"a {e['status']} to {e['method']} from {e['source']} dropped: {e['reason']}"
    if kind == "late_answer":
        sent = " and ".join(e.get("sent") or ()) or "nothing"
        return f"a {e['status']} after the call failed ({e['failure']}): sent {sent}"
    if kind == "late_answer_bye":
        return f"the BYE ending that late call got {e['status']} {e['reason']}"
    if kind == "warning":
        return f"warning ({e['direction']} {e['message']}): {e['detail']}"
    if kind == "error":
        return f"error ({e['direction']} {e['message']}): {e['error']}: {e['detail']}"
    if kind in ("result", "command_error", "info", "status"):
        return f"{kind}: " + ", ".join(f"{k}={v}" for k, v in e.items()
                                      if k not in ("kind", "phone", "time"))
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="e2m-phone", description="E2M softphone (pjsua2)")
    p.add_argument("--config", required=True, help="UA.toml with a [phone] section")
    p.add_argument("--json", action="store_true", help="one JSON object per event line")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("register", help="register and learn the proxies' policies")
    m = sub.add_parser("message", help="send one MESSAGE")
    m.add_argument("to")
    m.add_argument("text")
    m.add_argument("--timeout", type=float, default=10.0)
    c = sub.add_parser("call", help="call, talk, hang up")
    c.add_argument("to")
    c.add_argument("--seconds", type=float, default=2.0)
    c.add_argument("--hold", action="store_true", help="hold and unhold during the call")
    c.add_argument("--timeout", type=float, default=10.0)
    lst = sub.add_parser("listen", help="answer calls, print messages")
    lst.add_argument("--seconds", type=float, default=0.0, help="0: until quit or a signal")
    lst.add_argument("--commands", action="store_true", help="read commands from stdin")
    return p


class _Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: object) -> None:
        self.requested = True


def _why(exc: BaseException) -> str:
    """An error in words: a pjsua2 ``Error`` has no ``str`` (review 133 K2), its
    ``info()`` names the call, the status and the reason."""
    info = getattr(exc, "info", None)
    if callable(info):
        try:
            return str(info()).strip() or type(exc).__name__
        except Exception:  # noqa: BLE001 - fall back to the name
            pass
    return str(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    guard_terminal()         # a peer's reason phrase, a display name: shown, never obeyed
    args = _parser().parse_args(argv)
    printer = Printer(args.json)
    try:
        from .phone import E2MPhone
        phone = E2MPhone.from_file(args.config, on_event=printer)
    except ConfigError as exc:
        print(f"e2m-phone: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - one clear line, no traceback
        print(f"e2m-phone: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    try:
        try:
            phone.start()
        except Exception as exc:  # GateError, pjsua errors
            print(f"e2m-phone: cannot start: {_why(exc)}", file=sys.stderr)
            return EXIT_FAIL
        if phone.settings.registrar and not phone.register(timeout=8.0):
            print("e2m-phone: registration failed", file=sys.stderr)
            return EXIT_FAIL
        command = args.command
        if command == "register":
            rc = EXIT_OK
        elif command == "message":
            rc = _message(phone, args.to, args.text, args.timeout, stop)
        elif command == "call":
            rc = _call(phone, args.to, args.seconds, args.hold, args.timeout, stop)
        else:
            rc = _listen(phone, args.seconds, args.commands, stop, printer)
        printer({"kind": "result", "phone": phone.config.aor, "time": round(time.time(), 3),
                 "command": command, "ok": rc == EXIT_OK})
        return rc
    except KeyboardInterrupt:
        return EXIT_FAIL
    finally:
        phone.close()


def _message(phone: Any, to: str, text: str, timeout: float, stop: _Stop) -> int:
    handle = phone.send_message(to, text)
    phone.wait_until(lambda: handle.done or stop.requested, timeout)
    if not handle.done:
        print(f"e2m-phone: no final answer to the MESSAGE within {timeout:.0f} s", file=sys.stderr)
        return EXIT_FAIL
    if not handle.ok:
        print(f"e2m-phone: message failed: {printable(str(handle.reason))}", file=sys.stderr)
    return EXIT_OK if handle.ok else EXIT_FAIL


def _call(phone: Any, to: str, seconds: float, hold: bool, timeout: float, stop: _Stop) -> int:
    import pjsua2 as pj

    call = phone.call(to)
    up = phone.wait_until(lambda: call.done or stop.requested or
                          (call.confirmed and call.media_active), timeout)
    if not up or call.done or not call.media_active:
        phone.hangup(call)
        phone.wait_until(lambda: call.done, 5)
        why = printable(str(call.reason)) if call.reason else "no media within the timeout"
        print(f"e2m-phone: call failed: {why}", file=sys.stderr)
        return EXIT_FAIL
    ok = True
    phone.run_for(seconds / 2 if hold else seconds)
    if hold and not call.done:
        audio = pj.PJMEDIA_TYPE_AUDIO
        try:
            phone.hold(call)
            held = phone.wait_until(lambda: (audio, pj.PJSUA_CALL_MEDIA_LOCAL_HOLD)
                                    in call.current.media, 5)
            phone.unhold(call)
            back = phone.wait_until(lambda: call.media_active, 5)
        except Exception as exc:  # SendBlocked from the hook
            print(f"e2m-phone: hold/unhold failed: {exc}", file=sys.stderr)
            held = back = False
        phone._emit("info", hold=held, unhold=back)
        ok = held and back
        phone.run_for(seconds / 2)
    phone.hangup(call)
    phone.wait_until(lambda: call.done, 5)
    return EXIT_OK if ok and call.was_media_active else EXIT_FAIL


def _listen(phone: Any, seconds: float, commands: bool, stop: _Stop, printer: Printer) -> int:
    end = time.monotonic() + seconds if seconds > 0 else None
    buffer = b""
    stdin_open = commands
    fd = sys.stdin.fileno() if commands else -1
    failures = 0
    while not stop.requested and (end is None or time.monotonic() < end):
        try:
            phone.poll(10)
            failures = 0
        except Exception as exc:  # noqa: BLE001 - pjsua's own loop failed: say so, go on
            failures += 1
            print(f"e2m-phone: event loop: {type(exc).__name__}", file=sys.stderr)
            if failures >= 100:
                return EXIT_FAIL
        if not stdin_open:
            continue
        ready, _, _ = select.select([fd], [], [], 0)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            stdin_open = False
            break   # the controller went away: stop
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if _command(phone, line.decode("utf-8", "replace").strip(), printer) == "quit":
                stop.requested = True
    for call in phone.calls:
        phone.hangup(call)
    phone.wait_until(lambda: all(c.done or c.current is None for c in phone.calls), 5)
    return EXIT_OK


def _command(phone: Any, line: str, printer: Printer) -> str | None:
    if not line:
        return None
    word, _, rest = line.partition(" ")
    live = [c for c in phone.calls if not c.done and c.current is not None]
    try:
        if word == "quit":
            return "quit"
        if word == "status":
            printer({"kind": "status", "phone": phone.config.aor,
                     "time": round(time.time(), 3), **phone.stats()})
            return None
        if word == "message":
            to, _, text = rest.partition(" ")
            if not to or not text:
                raise ValueError("usage: message TO TEXT")
            phone.send_message(to, text)
        elif word == "call":
            if not rest:
                raise ValueError("usage: call TO")
            phone.call(rest.strip())
        elif word in ("hold", "unhold", "hangup"):
            if not live:
                raise ValueError("no live call")
            call = live[-1]
            getattr(phone, word)(call)      # phone.hold / unhold / hangup
        else:
            raise ValueError(f"unknown command {word!r}")
    except Exception as exc:  # noqa: BLE001 - report and keep listening
        printer({"kind": "command_error", "phone": phone.config.aor, "time": round(time.time(), 3),
                 "command": word, "error": f"{type(exc).__name__}: {exc}"})
    return None


if __name__ == "__main__":
    sys.exit(main())
