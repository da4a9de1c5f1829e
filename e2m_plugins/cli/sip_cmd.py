"""``e2m sip``: run the UA and proxy engines on raw SIP messages.

    e2m sip protect --ua UA.toml --in PLAIN.sip --out OUT.sip
    e2m sip open    --ua UA.toml --in IN.sip --out PLAIN.sip
    e2m sip inspect --proxy PROXY.toml --in IN.sip      # JSON verdict on stdout

Each run is one message with no memory of earlier ones: policies come from the
config only, and a body under a reused dialog key (kekri) cannot be opened.
``open`` writes the plaintext only to ``--out``; what it prints (on stderr) are
the security attributes.  ``inspect`` prints lengths and SHA-256 digests of
what the proxy viewed, never the text.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import E2MError
from ..keycache import MemoryKeyCache
from ..config import load_proxy_config, load_ua_config
from ..proxy import ProxyEngine
from ..sip import SipMessage, parse
from ..sip_errors import answer_for
from ..ua import UAEngine
from . import Group, printable, read_input, write_output

__all__ = ["GROUP"]


def _message(path: str) -> SipMessage:
    return parse(read_input(path, "SIP message"))


def _cmd_protect(args: argparse.Namespace) -> int:
    engine = UAEngine(load_ua_config(args.ua))
    protected = engine.protect(_message(args.input))
    write_output(args.out, protected.message.serialize())
    print(f"protected: {printable(protected.info.describe())}", file=sys.stderr)
    return 0


def _cmd_open(args: argparse.Namespace) -> int:
    engine = UAEngine(load_ua_config(args.ua))
    message = _message(args.input)
    try:
        opened = engine.open(message)
    except E2MError as exc:
        answer = answer_for(exc, "ua", engine.config.codes)
        if answer is not None and message.is_request:
            raise type(exc)(f"{exc} (a UA answers {answer.code} {answer.reason})") from None
        raise
    write_output(args.out, opened.message.serialize(), private=True)
    print(f"opened: {printable(opened.info.describe())}", file=sys.stderr)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    engine = ProxyEngine(load_proxy_config(args.proxy), MemoryKeyCache())
    verdict = engine.inspect(_message(args.input))
    print(json.dumps(verdict.to_json(), indent=2))
    return 0


def _add_commands(commands: argparse._SubParsersAction) -> None:
    protect = commands.add_parser("protect", help="encrypt (and sign) a message as a UA would")
    protect.add_argument("--ua", required=True, metavar="UA.toml")
    protect.add_argument("--in", dest="input", required=True, metavar="PLAIN.sip")
    protect.add_argument("--out", required=True, metavar="OUT.sip")
    protect.set_defaults(handler=_cmd_protect)

    open_ = commands.add_parser("open", help="decrypt and verify a message as a UA would")
    open_.add_argument("--ua", required=True, metavar="UA.toml")
    open_.add_argument("--in", dest="input", required=True, metavar="IN.sip")
    open_.add_argument("--out", required=True, metavar="PLAIN.sip")
    open_.set_defaults(handler=_cmd_open)

    inspect = commands.add_parser("inspect", help="a proxy's verdict on a message, as JSON")
    inspect.add_argument("--proxy", required=True, metavar="PROXY.toml")
    inspect.add_argument("--in", dest="input", required=True, metavar="IN.sip")
    inspect.set_defaults(handler=_cmd_inspect)


GROUP = Group("sip", "run the UA and proxy engines on raw SIP messages", _add_commands)
