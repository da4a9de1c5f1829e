"""``e2m pki``: make a test PKI and issue more certificates from its CA.

For tests and demos only: keys are written unencrypted (mode 0600).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cryptography.x509.oid import NameOID

from ..errors import E2MError
from ..testpki import (Credential, KeyType, init_test_pki, issue_proxy, issue_tls_server,
                       issue_user, load_ca, tls_stem, write_credential)
from ..uri import parse_uri
from . import CliFailure, Group, UsageError, positive_int

__all__ = ["GROUP"]

LEAF_KEY_TYPES = ("rsa", "ec", "x25519", "ed25519")
CA_KEY_TYPES = ("ec", "rsa", "ed25519")
# init_test_pki names its CA "E2M Test CA (<domain>)"; issue reads the domain back.
_CA_NAME = re.compile(r"^E2M Test CA \((?P<domain>[^()]+)\)$")


def _files(cred: Credential) -> list[Path]:
    return [p for p in (cred.cert_path, cred.key_path) if p is not None]


def _cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if (directory / "ca.crt").exists() or (directory / "ca.key").exists():
        if not args.force:
            raise CliFailure(f"{directory} already holds a CA; use --force to replace it "
                             "(certificates it issued will no longer verify)")
    proxies = args.proxy if args.proxy else [f"proxy.{args.domain}"]
    users = args.user if args.user else ["alice", "bob"]
    tls_ips = (args.tls_ip or []) if args.tls or args.tls_ip else None
    try:
        pki = init_test_pki(directory, domain=args.domain, proxy_hosts=proxies, users=users,
                            key_type=args.key_type, ca_key_type=args.ca_key_type,
                            tls_ips=tls_ips)
    except ValueError as exc:  # e.g. a user name that makes no SIP AoR
        raise CliFailure(str(exc)) from None
    made = _files(pki.ca)
    for cred in (list(pki.users.values()) + list(pki.proxies.values())
                 + list(pki.tls_servers.values())):
        made.extend(_files(cred))
    for path in made:
        print(path)
    return 0


def _domain_of(ca: Credential, explicit: str | None) -> str:
    if explicit:
        return explicit
    names = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    match = _CA_NAME.match(str(names[0].value)) if names else None
    if match is None:
        raise UsageError("cannot tell the SIP domain from the CA name; give --domain or a full AoR")
    return match.group("domain")


def _stem(directory: Path, base: str, key_type: str, force: bool) -> str:
    # The TestPKI layout: <base> first, <base>-<keytype> when <base> is taken.
    for stem in (base, f"{base}-{key_type}"):
        if not (directory / f"{stem}.crt").exists() and not (directory / f"{stem}.key").exists():
            return stem
    if force:
        return f"{base}-{key_type}"
    raise CliFailure(f"{directory / base}.crt and {directory / base}-{key_type}.crt exist already; "
                     "use --force to replace the latter")


def _cmd_issue(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not (directory / "ca.crt").exists():
        raise CliFailure(f"{directory} holds no ca.crt; run 'e2m pki init {directory}' first")
    try:
        ca = load_ca(directory)
    except E2MError as exc:
        raise CliFailure(f"CA in {directory}: {exc}") from None
    key_type: KeyType = args.key_type or "rsa"
    if args.ip and not args.tls:
        raise UsageError("--ip goes with --tls")
    try:
        if args.user:
            name = args.user
            aor = name if ":" in name else f"sip:{name}@{_domain_of(ca, args.domain)}"
            cred = issue_user(ca, aor, key_type, days=args.days)  # ValueError unless a SIP URI
            if ":" in name:
                uri = parse_uri(aor)
                base = uri.user or uri.host
            else:
                base = name
        elif args.tls:
            key_type = args.key_type or "ec"
            base = tls_stem(args.tls)
            cred = issue_tls_server(ca, args.tls, key_type, args.ip or (), days=args.days)
        else:
            base = f"proxy-{args.proxy.strip().lower()}"
            cred = issue_proxy(ca, args.proxy, key_type, days=args.days)
    except ValueError as exc:
        raise CliFailure(str(exc)) from None
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", base):
        raise CliFailure(f"{base!r} cannot be used as a file name")
    written = write_credential(cred, directory, _stem(directory, base, key_type, args.force))
    for path in _files(written):
        print(path)
    return 0


def _add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("init", help="create a test CA with user and proxy certificates",
                            description="Create a test PKI: ca.crt/.key, <user>.crt/.key, "
                                        "proxy-<host>.crt/.key.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--domain", default="example.com", help="SIP domain of the users (default example.com)")
    p.add_argument("--proxy", action="extend", nargs="+", metavar="HOST",
                   help="proxy host names (default proxy.<domain>); repeatable")
    p.add_argument("--user", action="extend", nargs="+", metavar="NAME",
                   help="user names, sip:<name>@<domain> (default alice bob); repeatable")
    p.add_argument("--key-type", choices=LEAF_KEY_TYPES, default="rsa", help="leaf key type (default rsa)")
    p.add_argument("--ca-key-type", choices=CA_KEY_TYPES, default="ec", help="CA key type (default ec)")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.add_argument("--tls", action="store_true",
                   help="also a TLS server certificate for each proxy host "
                        "(proxy-<host>-tls.crt/.key: EC P-256, SAN dNSName)")
    p.add_argument("--tls-ip", action="append", metavar="IP",
                   help="an IP address SAN in those TLS certificates (implies --tls); "
                        "repeatable")
    p.set_defaults(handler=_cmd_init)

    p = commands.add_parser("issue", help="issue one more certificate from DIR's CA",
                            description="Issue a user or proxy certificate signed by DIR/ca.key.")
    p.add_argument("dir", metavar="DIR")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="NAME", help="user name (sip:<name>@<domain>) or a full sip: AoR")
    who.add_argument("--proxy", metavar="HOST", help="proxy host name")
    who.add_argument("--tls", metavar="HOST",
                     help="a TLS server certificate for proxy HOST (SAN dNSName)")
    p.add_argument("--ip", action="append", metavar="IP",
                   help="with --tls: an IP address SAN; repeatable")
    p.add_argument("--domain", help="SIP domain (default: read from the CA name)")
    p.add_argument("--key-type", choices=LEAF_KEY_TYPES, default=None,
                   help="key type (default rsa; ec for --tls, which takes ec or rsa)")
    p.add_argument("--days", type=positive_int, default=825, help="validity in days (default 825)")
    p.add_argument("--force", action="store_true", help="replace <name>-<keytype>.crt if it exists")
    p.set_defaults(handler=_cmd_issue)


GROUP = Group("pki", "make a test PKI and issue certificates (tests and demos only)", _add_commands)
