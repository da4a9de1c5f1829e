"""Operating the proxy: archive failures per ``fail_request_on_error``, clean stop on SIGTERM,
and the archive read back with ``e2m archive`` from the proxy's own config."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest

from e2m_lab.flows import message
from e2m_lab.kamailio_harness import ROOT, udp_send
from e2m_lab.sipp import register

pytestmark = pytest.mark.kamailio   # and sipp where a test uses the fixture

TEXT = b"archive me, or say why not"


def _break_archive(proxy) -> None:
    """Make the archive unwritable: its file becomes a directory (root ignores modes)."""
    for suffix in ("", "-wal", "-shm"):
        path = proxy.archive_path.with_name(proxy.archive_path.name + suffix)
        if path.exists():
            path.unlink()
    proxy.archive_path.mkdir()


def test_failed_archive_write_fails_the_request_when_configured(proxy_factory, sipp, raw_uas, pki):
    proxy = proxy_factory("strict-archive", view=("MESSAGE:*",), fail_request_on_error=True)
    register(proxy, "bob", raw_uas.port, sipp)
    _break_archive(proxy)
    answer = udp_send(proxy.port, message(pki, TEXT))
    assert answer is not None and answer.status == 500
    assert raw_uas.wait_for(1, timeout=0.5, method="MESSAGE") == []
    assert "archive failed: ArchiveError" in proxy.log_since(0)


def test_failed_archive_write_is_logged_and_the_request_goes_on_by_default(proxy_factory, sipp,
                                                                         raw_uas, pki):
    proxy = proxy_factory("lenient-archive", view=("MESSAGE:*",))
    register(proxy, "bob", raw_uas.port, sipp)
    _break_archive(proxy)
    answer = udp_send(proxy.port, message(pki, TEXT))
    assert answer is not None and answer.status == 200
    (got,) = raw_uas.wait_for(1, method="MESSAGE")
    assert got.body == TEXT
    log = proxy.log_since(0)
    assert "archive failed: ArchiveError" in log and TEXT.decode() not in log


def test_archive_command_reads_what_the_proxy_wrote(proxy_factory, sipp, raw_uas, pki, tmp_path):
    proxy = proxy_factory("archiving", view=("MESSAGE:*",))
    register(proxy, "bob", raw_uas.port, sipp)
    sent = message(pki, TEXT)
    assert udp_send(proxy.port, sent).status == 200
    listed = subprocess.run([sys.executable, "-m", "e2m_plugins.cli", "archive", "list",
                             "--config", str(proxy.config_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert sent.call_id in listed.stdout and TEXT.decode() not in listed.stdout
    out = tmp_path / "plain.txt"
    shown = subprocess.run([sys.executable, "-m", "e2m_plugins.cli", "archive", "show", "1",
                            "--config", str(proxy.config_path), "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert out.read_bytes() == TEXT and TEXT.decode() not in shown.stdout


def test_sigterm_stops_kamailio_and_cleans_the_runtime_dir(proxy_factory):
    proxy = proxy_factory("stopping", e2m=False)
    run = proxy.runtime_dir
    assert (run / "kamailio_ctl").exists() and (run / "kamailio.pid").exists()
    pid = int((run / "kamailio.pid").read_text())
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=15) == 0
    assert not (run / "kamailio_ctl").exists() and not (run / "kamailio.pid").exists()
    assert not (run / "kamailio_rpc.fifo").exists()
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
    assert proxy.options(timeout=0.5) is None
    shutil.rmtree(run, ignore_errors=True)


def test_stop_ends_kamailio_even_when_the_launcher_died_first(proxy_factory):
    """The launcher runs Kamailio in a session of its own: killed with SIGKILL it cannot
    pass anything on, and Kamailio keeps serving.  ProxyProcess.stop must still end it."""
    proxy = proxy_factory("orphaned", e2m=False)
    pid = int((proxy.runtime_dir / "kamailio.pid").read_text())
    proxy.process.kill()
    proxy.process.wait(timeout=5)
    assert proxy.options(timeout=1.0) is not None        # orphaned, still answering
    proxy.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and subprocess.run(["kill", "-0", str(pid)],
                                                         capture_output=True).returncode == 0:
        time.sleep(0.05)
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
    assert proxy.options(timeout=0.5) is None
