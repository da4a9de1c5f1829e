"""The lab's child processes: stopping them (SIPp, tcpdump, helpers) the same way
everywhere, and finding a server's processes (Kamailio's, PostgreSQL's) in /proc."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

__all__ = ["stop_process", "processes_with", "PARENT", "GROUP"]

# fields of /proc/<pid>/stat after the command name: state, parent, process group
PARENT, GROUP = 1, 2


def processes_with(field: int, value: int) -> list[int]:
    """The pids whose /proc stat ``field`` (``PARENT`` or ``GROUP``) is ``value``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2:].split()[field]) == value:
            found.append(int(entry))
    return sorted(found)


def stop_process(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it does not go within ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
