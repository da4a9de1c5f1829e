"""KEMI script for the benchmark's *floor*: the plain relay plus the bare work no
Python E2M proxy can avoid for each body, and nothing else.

Loaded instead of kamailio_app/kemi.py through ``[kamailio] kemi_script`` in a
proxy with ``[e2m] enabled = false`` (so routing is exactly the plain relay's).
For every request or response with a body it reads the message byte-exact (the
same ``$mb`` through base64 as the real script) and runs the cryptographic
primitives opening one envelope needs, on key material made at start:

  x25519  X25519 exchange with a peer key loaded from bytes, HKDF-SHA256,
          AES key unwrap, AES-128-GCM decryption of 1 KiB
  rsa     RSA-2048 PKCS#1 v1.5 decryption of a 16-byte key, AES-128-GCM of 1 KiB
  kekri   requests as x25519; responses AES key unwrap + AES-128-GCM only (the
          answer under the offer's reused CEK)

and, in every mode, what checking the sender's signature needs for each body (the
bench's bodies are signed, as UAs sign by default): the SHA-256 of the content and the
signer's RSA-2048 PKCS#1 v1.5 SHA-256 signature over 200 bytes of signed attributes
(the bench's test PKI: RSA-2048 users, a P-256 CA).  The signer's certificate is loaded
and its CA's ECDSA signature checked once per process, as the proxy remembers them;
until stop 52 the floor did that for every body too (about 70 µs of a 145 µs x25519
body in one process): it spent more than a proxy must, and its capacity read low.

No SIP, MIME or CMS parsing, no policy, no key cache, no log line: what it costs
above the relay is a lower bound for any E2M proxy in Kamailio's Python.  The
mode comes from the environment variable E2M_BENCH_FLOOR.  Never for production.
"""

import base64
import os
import sys


def _add_project_path():
    # app_python3 put bench/ first; the project and the venv come from the cfg define.
    import KSR
    value = KSR.kx.get_def("E2M_PYTHONPATH")
    extra = value.strip('"').split(os.pathsep) if isinstance(value, str) else []
    for entry in reversed([e for e in extra if e and e not in sys.path]):
        sys.path.insert(0, entry)


_add_project_path()

import KSR  # noqa: E402
import datetime  # noqa: E402

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import (  # noqa: E402
    X25519PrivateKey, X25519PublicKey)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: E402
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap  # noqa: E402

from kamailio_app import kemi  # noqa: E402

MODES = {"x25519": ("x25519", "x25519"), "rsa": ("rsa", "rsa"), "kekri": ("x25519", "kekri")}
BODY_BYTES = 1024


class FloorMaterial:
    """Keys and ciphertexts made once; each open repeats the per-body work on them."""

    def __init__(self):
        cek = os.urandom(16)
        self.kek = os.urandom(16)
        self.wrapped = aes_key_wrap(self.kek, cek)
        self.nonce = os.urandom(12)
        self.content = AESGCM(cek).encrypt(self.nonce, os.urandom(BODY_BYTES), None)
        self.x25519 = X25519PrivateKey.generate()
        self.peer = X25519PrivateKey.generate().public_key().public_bytes_raw()
        self.rsa = rsa.generate_private_key(65537, 2048)
        self.rsa_wrapped = self.rsa.public_key().encrypt(cek, padding.PKCS1v15())
        self._make_signature()

    def _make_signature(self):
        ca = ec.generate_private_key(ec.SECP256R1())
        signer = rsa.generate_private_key(65537, 2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "floor")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(signer.public_key()).serial_number(1)
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(ca, hashes.SHA256()))
        self.ca_public = ca.public_key()
        self.cert_der = cert.public_bytes(Encoding.DER)
        self.attrs = os.urandom(200)
        self.signature = signer.sign(self.attrs, padding.PKCS1v15(), hashes.SHA256())
        self._checked = {}

    def verify(self, content):
        # The signer's certificate, read from the body (a copy: its lookup hashes it as a
        # body's would), is loaded and its CA signature checked once per process, as the
        # proxy does (certfiles' and certpath's memos): what a certificate proves does not
        # change between bodies, so that check is no body's unavoidable work.
        der = bytes(self.cert_der)
        key = self._checked.get(der)
        if key is None:
            cert = x509.load_der_x509_certificate(der)
            self.ca_public.verify(cert.signature, cert.tbs_certificate_bytes,
                                  ec.ECDSA(hashes.SHA256()))
            key = self._checked[der] = cert.public_key()
        digest = hashes.Hash(hashes.SHA256())
        digest.update(content)
        digest.finalize()
        key.verify(self.signature, self.attrs, padding.PKCS1v15(), hashes.SHA256())

    def open(self, kind):
        if kind == "rsa":
            cek = self.rsa.decrypt(self.rsa_wrapped, padding.PKCS1v15())
        else:
            if kind == "x25519":
                shared = self.x25519.exchange(X25519PublicKey.from_public_bytes(self.peer))
                HKDF(hashes.SHA256(), 16, None, b"e2m floor").derive(shared)
            cek = aes_key_unwrap(self.kek, self.wrapped)
        content = AESGCM(cek).decrypt(self.nonce, self.content, None)
        self.verify(content)
        return content


def _read_raw():
    return base64.b64decode(KSR.pv.get(kemi._WHOLE) or "")


class floor_kamailio(kemi.kamailio):
    def __init__(self, request_kind, response_kind):
        super().__init__()
        self.request_kind, self.response_kind = request_kind, response_kind
        self.material = FloorMaterial()

    def relay(self, inspect):
        if inspect and kemi._has_body():
            _read_raw()
            self.material.open(self.request_kind)
        super().relay(inspect)

    def route_reply(self):
        if kemi._has_body():
            _read_raw()
            self.material.open(self.response_kind)


def mod_init():
    mode = os.environ.get("E2M_BENCH_FLOOR", "")
    if mode not in MODES:
        raise RuntimeError("E2M_BENCH_FLOOR must be one of %s" % ", ".join(MODES))
    base = kemi.mod_init()
    if base.app.e2m:
        raise RuntimeError("the floor script runs on a proxy with [e2m] enabled = false")
    KSR.info("e2m: benchmark floor script, mode %s\n" % mode)
    return floor_kamailio(*MODES[mode])
