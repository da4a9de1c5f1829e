"""What the installed ``openssl cms`` can read, found once per session by `.ci/openssl-probe`.

OpenSSL before the fix for its issue 26101 rejects every AuthEnvelopedData that
carries attributes (it decodes them at [2]/[3], not RFC 5083's [1]/[2]).  The
tests that hand openssl such an envelope assert the known limit when the probe
says the binary is affected, and a normal open when it is not.  The probe and the
error signature live in the script only; ``make setup`` uses the same script.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parents[2] / ".ci" / "openssl-probe"

Decrypt = Callable[[Path], subprocess.CompletedProcess[bytes]]


@dataclass(frozen=True)
class OpensslAttributes:
    """The probe's verdict on ``openssl`` and the assertion built on it."""

    affected: bool   # True: rejects AuthEnvelopedData attributes (issue 26101)
    version: str

    def is_tag_error(self, stderr: bytes) -> bool:
        done = subprocess.run(["bash", str(PROBE), "--match-stderr"], input=stderr,
                              capture_output=True, timeout=30)
        assert done.returncode in (0, 1), done.stderr.decode(errors="replace")
        return done.returncode == 1

    def assert_opens_or_known_limit(self, decrypt: Decrypt, with_attrs: Path, without_attrs: Path,
                                    content: bytes) -> None:
        """``with_attrs``, an AuthEnvelopedData with attributes, opens unless openssl is
        affected; then it must fail with the tag error while ``without_attrs`` (the
        same content sealed the same way, no attributes) still opens."""
        control = decrypt(without_attrs)
        assert control.returncode == 0, control.stderr.decode(errors="replace")
        assert control.stdout == content
        done = decrypt(with_attrs)
        if not self.affected:
            assert done.returncode == 0, (self.version, done.stderr.decode(errors="replace"))
            assert done.stdout == content
            return
        assert done.returncode != 0, f"{self.version} opened attributes the probe says it cannot"
        assert self.is_tag_error(done.stderr), done.stderr.decode(errors="replace")


@pytest.fixture(scope="session")
def openssl_attributes() -> OpensslAttributes:
    """The probe run once; a verdict of 'cannot tell' fails the tests that need it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    done = subprocess.run(["bash", str(PROBE)], capture_output=True, timeout=120)
    if done.returncode not in (0, 1):
        pytest.fail(f"openssl-probe could not tell (exit {done.returncode}): "
                    f"{done.stderr.decode(errors='replace').strip()}")
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True, timeout=30).stdout.strip()
    return OpensslAttributes(affected=done.returncode == 1, version=version)
