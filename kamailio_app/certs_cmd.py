"""``e2m-proxy certs list|show|remove --config PROXY.toml [AOR]``: the certificates
published to the proxy's certificate service ([certs], docs/protocol.md §11).

``remove`` deletes an AoR's publication and marks its followers as owed a NOTIFY; the
running proxy's timer sends each of them an empty one within a second or so (within
``notify_interval`` of its last NOTIFY), or at its next start.  Certificates are public:
``show`` prints the PEM; nothing here reads a private key.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from e2m_plugins.cli import printable
from e2m_plugins.cli.terminal import guard_terminal
from e2m_plugins.certpath import certificate_identities
from e2m_plugins.errors import E2MError
from e2m_plugins.uri import aor_of

from .cert_table import CertDatabase, CertTableError, PublicationTable, SubscriptionTable

__all__ = ["main"]


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _aor(text: str) -> str:
    return str(aor_of(text if text.startswith(("sip:", "sips:")) else f"sip:{text}"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e2m-proxy certs",
        description="The certificates published to the proxy's certificate service.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("list", "one line per published certificate"),
                       ("show", "one certificate in full, with its PEM"),
                       ("remove", "remove an AoR's certificate; its followers are told")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", required=True, help="PROXY.toml")
        if name != "list":
            sub.add_argument("aor", help="the AoR, e.g. sip:bob@example.com")
        if name == "show":
            sub.add_argument("--out", help="also write the certificate (DER) to this file")
    return parser


def _list(publications: PublicationTable, subscriptions: SubscriptionTable) -> int:
    rows = publications.all()
    if not rows:
        print("no certificates published")
    for p in rows:
        # an AoR and a publisher came from a peer: what would not show as itself is
        # written out, so no name passes for another (review 199)
        print(printable(f"{p.aor}  {p.fingerprint}  notAfter {_when(p.not_after)}  "
                        f"expires {_when(p.expires)}  by {p.published_by}  "
                        f"followers {subscriptions.count(p.aor)}"))
    return 0


def _show(publications: PublicationTable, subscriptions: SubscriptionTable, aor: str,
          out: str | None) -> int:
    p = publications.current(aor)
    if p is None:
        print(f"e2m-proxy certs: no certificate published for {aor}", file=sys.stderr)
        return 1
    cert = x509.load_der_x509_certificate(p.der)
    try:
        names = ", ".join(certificate_identities(cert).uris) or "none"
    except E2MError as exc:
        names = f"unreadable ({exc})"
    lines = [f"AoR            {p.aor}", f"fingerprint    {p.fingerprint}",
             f"subject        {cert.subject.rfc4514_string()}", f"SAN URIs       {names}",
             f"issuer         {cert.issuer.rfc4514_string()}",
             f"serial         {cert.serial_number:x}",
             f"valid          {_when(p.not_before)} to {_when(p.not_after)}",
             f"expires        {_when(p.expires)}",
             f"published by {p.published_by} at {_when(p.published_at)}",
             f"followers      {subscriptions.count(p.aor)}"]
    print("\n".join(printable(line) for line in lines))     # a subject hides nothing (review 199)
    print(cert.public_bytes(Encoding.PEM).decode("ascii"), end="")
    if out:
        Path(out).write_bytes(p.der)
    return 0


def _remove(publications: PublicationTable, subscriptions: SubscriptionTable,
            aor: str) -> int:
    with publications.locked():
        removed = publications.remove(aor)
        told = subscriptions.changed(aor) if removed else 0
    if not removed:
        print(f"e2m-proxy certs: no certificate published for {aor}", file=sys.stderr)
        return 1
    print(f"removed the certificate of {aor}; the running proxy tells its {told} "
          f"follower(s)")
    return 0


def main(argv: list[str]) -> int:
    guard_terminal()          # it may be run on its own: what it lists, senders wrote
    args = _parser().parse_args(argv)
    from .config import load_app_config      # late: the launcher imports this module
    try:
        config = load_app_config(args.config)
    except ValueError as exc:
        print(f"e2m-proxy certs: {exc}", file=sys.stderr)
        return 2
    if config.certs is None:
        print("e2m-proxy certs: PROXY.toml has no certificate service ([certs] enabled = "
              "false, or [e2m] enabled = false)", file=sys.stderr)
        return 2
    try:
        aor = _aor(args.aor) if args.command != "list" else ""
    except E2MError:
        print(f"e2m-proxy certs: {args.aor!r} is not an AoR (sip:user@host)", file=sys.stderr)
        return 2
    db = CertDatabase(config.certs.path, busy_timeout_ms=5000)
    publications, subscriptions = PublicationTable(db), SubscriptionTable(db)
    try:
        if args.command == "list":
            return _list(publications, subscriptions)
        if args.command == "show":
            return _show(publications, subscriptions, aor, args.out)
        return _remove(publications, subscriptions, aor)
    except CertTableError as exc:
        print(f"e2m-proxy certs: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
