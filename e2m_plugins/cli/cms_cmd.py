"""``e2m cms``: encrypt, decrypt, sign, verify and inspect CMS messages.

Input may be DER, PEM or an S/MIME entity; output is DER.  ``inspect`` shows
structure and algorithms only: never content, content keys or private keys.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..cms import (
    DEFAULT_CIPHER,
    ENCRYPT_CIPHERS,
    Attribute,
    CertificateKey,
    SharedKEK,
    content_info_type,
    describe_envelope,
    open_envelope,
    recipient_for_certificate,
    seal,
)
from ..cms import der, oids
from ..cms.signed import describe_signed, sign
from ..cmsinput import load_cms_message, verify_input
from ..cms.limits import DEFAULT_LIMITS
from ..errors import E2MError, MalformedError
from ..certpath import certificate_identities
from ..certfiles import load_certificate, load_certificates, load_private_key
from . import CliFailure, Group, UsageError, printable, read_input, write_output

__all__ = ["GROUP", "describe_cms", "render_text"]


# ------------------------------------------------------------------ helpers

def hex_bytes(text: str) -> bytes:
    """argparse type: hex, optionally with a 0x prefix or ':' separators."""
    cleaned = text.strip().replace(":", "").replace(" ", "")
    if cleaned[:2].lower() == "0x":
        cleaned = cleaned[2:]
    try:
        value = bytes.fromhex(cleaned)
    except ValueError:
        # Do not echo the text: it may be a key.
        raise argparse.ArgumentTypeError("not a hex string") from None
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _load_cert(path: str, what: str) -> x509.Certificate:
    data = read_input(path, what)
    try:
        return load_certificate(data)
    except E2MError as exc:
        raise CliFailure(f"{what} {path}: {exc}") from None


def _load_cert_bundle(path: str, what: str) -> list[x509.Certificate]:
    data = read_input(path, what)
    try:
        return load_certificates(data)
    except E2MError as exc:
        raise CliFailure(f"{what} {path}: {exc}") from None


def _load_key(path: str, cert: x509.Certificate | None = None) -> Any:
    data = read_input(path, "private key")
    try:
        key = load_private_key(data)
    except E2MError as exc:
        raise CliFailure(f"private key {path}: {exc}") from None
    if cert is not None and not _same_public_key(cert, key):
        raise CliFailure(f"private key {path} does not belong to certificate "
                         f"{cert.subject.rfc4514_string()}")
    return key


def _same_public_key(cert: x509.Certificate, key: Any) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    except (ValueError, TypeError, AttributeError):
        return False


def _kek_pairs(ids: list[bytes] | None, keks: list[bytes] | None) -> list[SharedKEK]:
    ids, keks = ids or [], keks or []
    if len(ids) != len(keks):
        raise UsageError("--kek-id and --kek must be given in pairs (the n-th --kek-id names the n-th --kek)")
    pairs = []
    for key_id, kek in zip(ids, keks):
        if len(kek) not in (16, 24, 32):
            raise UsageError("--kek must be 16, 24 or 32 bytes (32, 48 or 64 hex digits)")
        pairs.append(SharedKEK(key_id=key_id, kek=kek))
    return pairs


def _load_input(path: str) -> tuple[bytes, bytes | None, str]:
    """CMS DER, detached content from multipart/signed (if any), and the input form."""
    raw = read_input(path)
    message = load_cms_message(raw)
    return message.der, message.detached_content, _input_form(raw, message.mime_type)


def _input_form(raw: bytes, mime_type: str | None) -> str:
    if mime_type:
        return f"mime {mime_type}"
    if raw[:1] == b"\x30":
        return "der"
    if raw.lstrip().startswith(b"-----BEGIN"):
        return "pem"
    return "base64"


def _note(message: str) -> None:
    # Progress notes go to stderr so stdout stays clean for --out - and scripts.
    print(f"e2m: {message}", file=sys.stderr)


# ------------------------------------------------------------------ encrypt

def _cmd_encrypt(args: argparse.Namespace) -> int:
    keks = _kek_pairs(args.kek_id, args.kek)
    if not args.recip and not keks:
        raise UsageError("give at least one --recip CERT or --kek-id/--kek pair")
    if args.cek_max_decrypts is not None and args.cek_reference is None:
        raise UsageError("--cek-max-decrypts needs --cek-reference")
    recipients: list[Any] = []
    for path in args.recip or []:
        cert = _load_cert(path, "recipient certificate")
        recipients.append(recipient_for_certificate(cert, oaep=args.oaep, use_ski=args.ski))
    recipients.extend(keks)
    content = read_input(args.input)
    sealed = seal(content, recipients, cipher=args.cipher, cek_reference=args.cek_reference,
                  cek_max_decrypts=args.cek_max_decrypts)
    write_output(args.out, sealed.der)
    kind = "auth-enveloped-data" if args.cipher.endswith("gcm") else "enveloped-data"
    _note(f"wrote {kind} ({args.cipher}, {len(recipients)} recipient(s), {len(sealed.der)} bytes)")
    return 0


# ------------------------------------------------------------------ decrypt

def _cmd_decrypt(args: argparse.Namespace) -> int:
    certs, key_paths = args.recip or [], args.key or []
    if len(certs) != len(key_paths):
        raise UsageError("--recip and --key must be given in pairs (the n-th --key opens the n-th --recip)")
    keys: list[Any] = []
    for cert_path, key_path in zip(certs, key_paths):
        cert = _load_cert(cert_path, "recipient certificate")
        keys.append(CertificateKey(cert, _load_key(key_path, cert)))
    keys.extend(_kek_pairs(args.kek_id, args.kek))
    if not keys:
        raise UsageError("give at least one --recip CERT --key KEY pair or --kek-id/--kek pair")
    envelope, _, _ = _load_input(args.input)
    # CBC (no integrity) and 3DES are refused unless asked for: this is an offline tool,
    # so no oracle, but the default is what the engines accept.
    limits = replace(DEFAULT_LIMITS, accept_cbc=args.accept_cbc,
                     accept_legacy_algorithms=args.accept_legacy)
    opened = open_envelope(envelope, keys, limits=limits)
    write_output(args.out, opened.plaintext, private=True)
    note = (f"opened {opened.envelope_type} ({opened.content_algorithm}) via "
            f"{opened.recipient.kind} {opened.recipient.identifier}")
    if opened.cek_reference is not None:
        note += f"; cek-reference {opened.cek_reference.hex()}"
    _note(note)
    return 0


# ------------------------------------------------------------------ sign

def _cmd_sign(args: argparse.Namespace) -> int:

    cert = _load_cert(args.signer, "signer certificate")
    key = _load_key(args.key, cert)
    extra: list[x509.Certificate] = []
    for path in args.chain or []:
        extra.extend(_load_cert_bundle(path, "certificate"))
    content = read_input(args.input)
    try:
        signed = sign(content, cert, key, detached=args.detached,
                      include_certificate=not args.no_certs, extra_certs=extra,
                      rsa_pss=args.rsa_pss, digest=args.digest)
    except ValueError as exc:  # e.g. an X25519 key, which cannot sign
        raise CliFailure(str(exc)) from None
    write_output(args.out, signed)
    _note(f"wrote signed-data ({'detached' if args.detached else 'encapsulated'}, "
          f"{len(signed)} bytes)")
    return 0


# ------------------------------------------------------------------ verify

def _signer_lines(result: Any) -> list[str]:
    lines: list[str] = []
    for signer in result.signers:
        ids = signer.identities
        names = list(ids.uris) + list(ids.dns_names)
        if not names:
            names = list(ids.emails) or [ids.common_name or signer.certificate.subject.rfc4514_string()]
        lines.extend(n for n in names if n not in lines)
    return lines


def _cmd_verify(args: argparse.Namespace) -> int:
    anchors: list[x509.Certificate] = []
    for path in args.ca:
        anchors.extend(_load_cert_bundle(path, "CA certificate"))
    extra: list[x509.Certificate] = []
    for path in args.certfile or []:
        extra.extend(_load_cert_bundle(path, "certificate"))
    message = load_cms_message(read_input(args.input))
    content = read_input(args.content, "content") if args.content else None
    result = verify_input(message, trust_anchors=anchors, detached_content=content,
                          check_time=not args.no_time_check, extra_certs=extra)
    write_output(args.out, result.content)
    stream = sys.stderr if args.out == "-" else sys.stdout
    for line in _signer_lines(result):
        print(printable(line), file=stream)     # a CN hides nothing (review 199)
    _note(f"verification successful: {len(result.signers)} signer(s), content type {result.content_type}")
    return 0


# ------------------------------------------------------------------ inspect

def _attribute_entry(attr: Attribute) -> dict[str, Any]:
    values: list[Any] = []
    for value in attr.values:
        try:
            tlv = der.read_all(value)
            if attr.oid == oids.CEK_REFERENCE and tlv.tag == der.OCTET_STRING:
                values.append(der.octets(tlv).hex())
            elif attr.oid == oids.CEK_MAX_DECRYPTS and tlv.tag == der.INTEGER:
                values.append(der.integer(tlv))
            elif attr.oid == oids.CONTENT_TYPE_ATTR and tlv.tag == der.OID:
                values.append(oids.name_of(der.oid(tlv)))
            else:
                values.append(value.hex())
        except MalformedError:
            values.append(value.hex())
    return {"name": attr.name, "oid": attr.oid, "values": values}


def _describe_envelope(data: bytes) -> dict[str, Any]:
    desc = describe_envelope(data)
    return {
        "envelope_type": desc.envelope_type,
        "encrypted_content_type": desc.content_type,
        "content_algorithm": desc.content_algorithm,
        "ciphertext_bytes": desc.ciphertext_bytes,
        "recipients": [
            {"kind": r.kind, "identifier": r.identifier, "key_algorithm": r.key_algorithm,
             **({"wrap_algorithm": r.wrap_algorithm} if r.wrap_algorithm else {})}
            for r in desc.recipients],
        "authenticated_attributes": [_attribute_entry(a) for a in desc.authenticated_attributes],
        "unprotected_attributes": [_attribute_entry(a) for a in desc.unprotected_attributes],
    }


def _certificate_entry(cert: x509.Certificate) -> dict[str, Any]:
    ids = certificate_identities(cert)
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "identities": list(ids.uris) + list(ids.dns_names) + list(ids.emails),
            "not_after": cert.not_valid_after_utc.isoformat()}


def _describe_signed(data: bytes, depth: int) -> dict[str, Any]:
    """The core's description of a SignedData, shaped for JSON and text output."""
    described = describe_signed(data)
    signers = []
    for signer in described.signers:
        entry: dict[str, Any] = {"signer_id": signer.identifier}
        if signer.issuer:
            entry["issuer"] = signer.issuer
        entry["digest_algorithm"] = signer.digest_algorithm
        entry["signature_algorithm"] = signer.signature_algorithm
        entry["signed_attributes"] = [{"name": name, **({"value": value} if value is not None else {})}
                                      for name, value in signer.signed_attributes]
        signers.append(entry)
    result: dict[str, Any] = {
        "encapsulated_content_type": described.content_type,
        "detached": described.detached,
    }
    if described.content_bytes is not None:
        result["content_bytes"] = described.content_bytes  # the size only, never the content
    result["certificates"] = [_certificate_entry(c) for c in described.certificates]
    if described.unreadable_certificates:
        result["unreadable_certificates"] = described.unreadable_certificates
    result["signers"] = signers
    if described.nested_cms is not None:
        # Only CMS layers are opened up; a data payload stays unread.
        result["encapsulated"] = _describe_any(described.nested_cms, depth + 1)
    return result


def _describe_any(data: bytes, depth: int) -> dict[str, Any]:
    if depth > DEFAULT_LIMITS.max_nesting_depth:
        raise MalformedError("CMS layers nested too deeply")
    DEFAULT_LIMITS.check_size(len(data))
    kind = oids.name_of(content_info_type(data))
    out: dict[str, Any] = {"content_type": kind}
    if kind in ("enveloped-data", "auth-enveloped-data"):
        out["envelope"] = _describe_envelope(data)
    elif kind == "signed-data":
        out["signed_data"] = _describe_signed(data, depth)
    else:
        out["note"] = "no details for this content type"
    return out


def describe_cms(raw: bytes) -> dict[str, Any]:
    """A JSON-ready description of a CMS message: structure only, no content or keys."""
    message = load_cms_message(raw)
    out = {"input": _input_form(raw, message.mime_type), "der_bytes": len(message.der)}
    if message.smime_type:
        out["smime_type"] = message.smime_type
    if message.detached_content is not None:
        out["detached_content_bytes"] = len(message.detached_content)
    out.update(_describe_any(message.der, 0))
    return out


def render_text(value: Any, indent: int = 0) -> list[str]:
    """Indented ``key: value`` lines; lists of records become ``-`` items."""
    pad = "  " * indent
    lines: list[str] = []
    for key, item in value.items():
        label = key.replace("_", "-")
        if isinstance(item, dict):
            lines.append(f"{pad}{label}:")
            lines.extend(render_text(item, indent + 1))
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            lines.append(f"{pad}{label}:")
            for record in item:
                sub = render_text(record, indent + 2)
                lines.append(f"{pad}  - {sub[0].lstrip()}")
                lines.extend(sub[1:])
        elif isinstance(item, list):
            # names and values from the CMS are the sender's: what would not show as
            # itself (a zero-width space in a CN reads "alice") is written out (review 197)
            shown = ', '.join(printable(str(i)) for i in item) if item else '(none)'
            lines.append(f"{pad}{label}: {shown}")
        elif isinstance(item, bool):
            lines.append(f"{pad}{label}: {'yes' if item else 'no'}")
        else:
            lines.append(f"{pad}{label}: {printable(str(item))}")
    return lines


def _cmd_inspect(args: argparse.Namespace) -> int:
    description = describe_cms(read_input(args.input))
    if args.json:
        print(json.dumps(description, indent=2))
    else:
        print("\n".join(render_text(description)))
    return 0


# ------------------------------------------------------------------ parser

def _io_args(parser: argparse.ArgumentParser, out: bool = True) -> None:
    parser.add_argument("--in", dest="input", metavar="FILE", required=True,
                        help="input file ('-' for stdin)")
    if out:
        parser.add_argument("--out", metavar="FILE", required=True, help="output file ('-' for stdout)")


def _kek_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kek-id", action="append", type=hex_bytes, metavar="HEX",
                        help="identifier of a pre-shared key-encryption key (kekri); repeatable")
    parser.add_argument("--kek", action="append", type=hex_bytes, metavar="HEX",
                        help="the KEK for the --kek-id in the same position (16, 24 or 32 bytes)")


def _add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("encrypt", help="encrypt for certificates and/or shared KEKs (DER out)",
                            description="Encrypt a file into one CMS envelope for every recipient.")
    p.add_argument("--recip", action="append", metavar="CERT",
                   help="recipient certificate: RSA (ktri), P-256 or X25519 (kari); repeatable")
    p.add_argument("--oaep", action="store_true", help="RSAES-OAEP (SHA-256) instead of PKCS#1 v1.5")
    p.add_argument("--ski", action="store_true", help="name recipients by subjectKeyIdentifier")
    _kek_args(p)
    p.add_argument("--cipher", choices=ENCRYPT_CIPHERS, default=DEFAULT_CIPHER,
                   help=f"content cipher (default {DEFAULT_CIPHER}; GCM gives AuthEnvelopedData)")
    p.add_argument("--cek-reference", type=hex_bytes, metavar="HEX",
                   help="add an RFC 3185 CEKReference so recipients may keep the CEK")
    p.add_argument("--cek-max-decrypts", type=int, metavar="N", help="add CEKMaxDecrypts (needs --cek-reference)")
    _io_args(p)
    p.set_defaults(handler=_cmd_encrypt)

    p = commands.add_parser("decrypt", help="decrypt an envelope with a certificate key or a KEK",
                            description="Decrypt a CMS envelope (DER, PEM or S/MIME).")
    p.add_argument("--recip", action="append", metavar="CERT", help="our certificate; repeatable")
    p.add_argument("--key", action="append", metavar="KEY", help="private key for the --recip in the same position")
    p.add_argument("--accept-cbc", action="store_true",
                   help="open EnvelopedData (CBC, no integrity: anyone on the path could have changed it)")
    p.add_argument("--accept-legacy", action="store_true",
                   help="open 3DES content and accept SHA-1 signatures (old senders)")
    _kek_args(p)
    _io_args(p)
    p.set_defaults(handler=_cmd_decrypt)

    p = commands.add_parser("sign", help="sign a file (SignedData, DER out)",
                            description="Sign a file into CMS SignedData.")
    p.add_argument("--signer", metavar="CERT", required=True, help="signer certificate")
    p.add_argument("--key", metavar="KEY", required=True, help="signer private key")
    p.add_argument("--detached", action="store_true", help="leave the content out of the SignedData")
    p.add_argument("--digest", choices=("sha256", "sha384", "sha512"), default="sha256")
    p.add_argument("--rsa-pss", action="store_true", help="RSASSA-PSS instead of PKCS#1 v1.5 (RSA keys)")
    p.add_argument("--chain", action="append", metavar="CERT",
                   help="extra certificates to include (intermediates); repeatable")
    p.add_argument("--no-certs", action="store_true", help="do not include the signer certificate")
    _io_args(p)
    p.set_defaults(handler=_cmd_sign)

    p = commands.add_parser("verify", help="verify SignedData and write its content",
                            description="Verify CMS SignedData against trust anchors; write the content "
                                        "to --out and print the signer identities.")
    p.add_argument("--ca", action="append", metavar="CERT", required=True,
                   help="trust anchor certificate (or PEM bundle); repeatable")
    p.add_argument("--certfile", action="append", metavar="CERT",
                   help="untrusted extra certificates (intermediates); repeatable")
    p.add_argument("--content", metavar="FILE", help="the signed content of a detached signature")
    p.add_argument("--no-time-check", action="store_true", help="do not check certificate validity periods")
    _io_args(p)
    p.set_defaults(handler=_cmd_verify)

    p = commands.add_parser("inspect", help="show structure and algorithms (never content or keys)",
                            description="Describe a CMS message: content type, recipients, signers, "
                                        "algorithms and attributes.")
    _io_args(p, out=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_inspect)


GROUP = Group("cms", "encrypt, decrypt, sign, verify and inspect CMS messages", _add_commands)
