"""Running a command as an operator's terminal sees it (reviews 193, 195): stdout and
stderr on one pty, its octets as written (no newline translation)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the project first on PYTHONPATH, warnings off, ``extra``."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PYTHONWARNINGS": "ignore", **extra}


def e2m_argv(*args: str) -> list[str]:
    """``e2m`` with ``args``, run from this tree's code."""
    return [sys.executable, "-c", "import sys; from e2m_plugins.cli import main; "
            "sys.exit(main(sys.argv[1:]))", *args]


def on_a_terminal(argv: list[str], *, cwd: Path | None = None,
                  **env: str) -> tuple[int, bytes]:
    """Run ``argv`` with stdout and stderr on one pty; (exit code, what it wrote)."""
    import termios
    leader, follower = pty.openpty()
    try:
        attrs = termios.tcgetattr(follower)
        attrs[1] &= ~termios.OPOST            # octets as written
        termios.tcsetattr(follower, termios.TCSANOW, attrs)
        proc = subprocess.Popen(argv, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL,
                                env=child_env(**env), cwd=cwd)
        os.close(follower)
        follower = -1
        out = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=30), out
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


def certs_show_on_a_terminal(pki, directory: Path, aor: str, der: bytes) -> tuple[int, bytes]:
    """``e2m-proxy certs show aor`` on a pty, after the certificate service took ``der``
    for ``aor`` (checked as it would be, then written to the table as it writes)
    (reviews 193, 199)."""
    import datetime
    import hashlib
    import time
    from e2m_plugins.certservice import Publication, check_published_certificate
    from kamailio_app.cert_table import CertDatabase, PublicationTable
    check_published_certificate(der, aor, [pki.ca.cert],
                                datetime.datetime.now(datetime.timezone.utc))
    d = pki.directory
    config = directory / "home.toml"
    config.write_text(f'[kamailio]\nlisten = ["udp:127.0.0.1:5070"]\ndomains = ["example.com"]\n'
                      f'[e2m]\nenabled = true\n[identity]\nhost = "proxy.example.com"\n'
                      f'cert = "{d}/proxy-proxy.example.com.crt"\n'
                      f'key = "{d}/proxy-proxy.example.com.key"\n[trust]\nca = ["{d}/ca.crt"]\n'
                      f'[policy]\nview = ["MESSAGE:text/plain"]\nverify = []\n'
                      f'[certs]\npath = "certs.sqlite"\n')
    db = CertDatabase(directory / "certs.sqlite")
    db.ensure_schema()
    now = time.time()
    PublicationTable(db).save(Publication(
        aor=aor, der=der, fingerprint="sha256:" + hashlib.sha256(der).hexdigest(),
        not_before=now - 10, not_after=now + 3000, etag="e1", expires=now + 600,
        published_by="eve", published_at=now))
    db.close()
    return on_a_terminal([sys.executable, "-c", "import sys; from kamailio_app.certs_cmd "
                          "import main; sys.exit(main(sys.argv[1:]))", "show", aor,
                          "--config", str(config)], cwd=directory)


def self_signed_message(directory: Path, content: bytes, cn: str, *,
                        san_uri: str | None = None) -> tuple[Path, Path]:
    """A self-signed P-256 signer named ``cn`` (with ``san_uri`` as its SAN URI, if
    given) and a SignedData of ``content`` by it: (its PEM, the DER file), for
    ``e2m cms verify --ca <pem>`` (reviews 195, 197)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from e2m_plugins.cms.signed import sign
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30)))
    if san_uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san_uri)]), False)
    cert = builder.sign(key, hashes.SHA256())
    pem = directory / f"{cn.encode('unicode_escape').decode('ascii')[:40]}.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    p7 = pem.with_suffix(".p7")
    p7.write_bytes(sign(content, cert, key, detached=False, include_certificate=True,
                        extra_certs=[], rsa_pss=False, digest="sha256"))
    return pem, p7
