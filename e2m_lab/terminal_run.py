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
