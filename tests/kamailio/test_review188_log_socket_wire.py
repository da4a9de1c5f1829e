"""Review 188: Kamailio's stderr as an AF_UNIX socket read per process (9e498ef), on a
real proxy.  The unit tests are tests/unit/test_review188_log_socket.py.

Hole K1: a just-forked process's DEBUG records name pid 0 and pass whole
- Attacker: whoever reads the proxy's log at ``log_level = "debug"``.
- Messages: none (start-up).
- Effect observed: ``fork_process`` logs "seeding PRNG with %u", "seeding cryptorand
  generator with %u" and "test random numbers %u %lu %u %u" in the child before the
  parent wrote its pid to ``pt`` (core/pt.c:307-312, 5.6.3), so they read `` 5(0)
  DEBUG:``; the child's cutter (credentials: its real pid) does not take them for
  records and a new cutter keeps lines before its first record, so they pass uncut.
  Three starts with 8 workers: 12, 16, 12 uncut DEBUG lines (e.g. `` 5(0) DEBUG:
  <core> [core/pt.c:313]: fork_process(): test random numbers 1412286534 1392104661
  3361878807 1931120207``).
- Code at fault: kamailio_app/launcher.py:453 and :467 (see the unit module).
- Suggested fix: a record naming another pid is cut (or dropped), never kept; "lines
  before any record" are kept only until any process wrote one.
- Test: ``test_no_debug_text_passes_at_start``.

Honest break HB1: once the launcher's stderr is gone, a few thousand logged lines stop the proxy
- Attacker: any off-path UDP sender, after the operator's log reader died
  (``e2m-proxy ... 2>&1 | logger`` whose reader exited; a closed terminal).
- Messages: 3 000 MESSAGEs with a broken Via (``;;;@@``), one ERROR record each at
  the default info level, in ~0.6 s.
- Effect observed: ``_pump_log`` meets BrokenPipeError writing its stderr and returns
  (launcher.py:642); the reader socket stays open (``_run`` holds it), so once the
  socket's buffer is full (2 731 80-octet lines here, ~540 on a stock wmem_max) every
  UDP worker blocks in ``sock_alloc_send_pskb`` writing stderr: 0 of 5 OPTIONS were
  answered afterwards; the launcher stays alive and says nothing.  (The pipe before
  9e498ef did the same after ~13 000 lines.)
- Code at fault: kamailio_app/launcher.py:642-643 (the pump's end on an output error
  leaves Kamailio's log unread) and :697-702.
- Suggested fix: on an output error keep reading and discard (or stop Kamailio and
  exit non-zero, so a supervisor restarts it); never leave the socket unread.
- Test: ``test_a_closed_stderr_does_not_stop_the_proxy``.

Controls
- ``test_a_bad_kemi_script_shows_its_traceback``: a Python syntax error in the KEMI
  script at start: the launcher exits non-zero and its stderr shows the traceback's
  lines (the ``SyntaxError`` line included).
- ``test_a_flood_at_info_level_leaves_honest_requests_served``: 4 senders, 6 000
  broken-Via MESSAGEs in ~0.3 s (~20 000/s) against a 2-worker proxy: OPTIONS answered during and
  after, the records cut and no Via tag of the flood in the log (the pump kept up).
  Run: 1 183 of 1 183 OPTIONS answered during the flood, 6 000 of 6 000 records logged, cut.

Tried and held
- Shutdown (SIGTERM to the launcher): the ``Exit`` lines of every process reach the
  log (``pump.join`` after the group's SIGKILL; the socket ends when the last process
  is gone).  Checked in the flood control's teardown by the harness (exit code 0).
- Start-up errors: a bad cfg: ``kamailio -c`` runs before (``e2m-proxy`` with the
  config check); the traceback control covers Kamailio's own start.
- Closed stderr without a flood: the proxy keeps serving until the buffer fills.

Fixed (stop 50): K1, a line before a process's first record passes only while no
process has written a record at all (Python's own warnings at start), and a line shaped
as a record naming another pid never does: the pid-0 lines of ``fork_process`` now go
as a continuation (one marker).  HB1, when the launcher's stderr fails the pump reads
on and lets the log go, so Kamailio's workers never block on a full log socket.  The
tests failed on the code before the fix and pass with it.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from e2m_lab.kamailio_harness import free_port, write_proxy_config
from e2m_lab.proxy_process import answers_options

pytestmark = pytest.mark.kamailio

ROOT = Path(__file__).resolve().parents[2]


def _broken(tag: str = "") -> bytes:
    return (f"MESSAGE sip:bob@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:9 ;;;@@branch=z9hG4bK{secrets.token_hex(4)}{tag}\r\n"
            f"From: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n"
            f"Call-ID: r188-{secrets.token_hex(4)}\r\nCSeq: 1 MESSAGE\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def _send(port: int, count: int, source: str = "127.0.0.1", tag: str = "") -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    for i in range(count):
        sock.sendto(_broken(tag), ("127.0.0.1", port))
        if i % 100 == 99:
            time.sleep(0.02)
    sock.close()


def test_no_debug_text_passes_at_start(proxy_factory):
    proxy = proxy_factory("r188-debug", e2m=False, log_level="debug", workers=8)
    assert proxy.options() is not None
    time.sleep(0.5)
    log = proxy.log_since(0)
    uncut = [line for line in log.splitlines()
             if " DEBUG: " in line and "debug text cut" not in line]
    assert not uncut, f"{len(uncut)} uncut DEBUG lines, e.g. {uncut[0][:200]}"


def _launch(tmp_path: Path, **settings) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    config = write_proxy_config(tmp_path, port, pki=None, e2m=False, **settings)
    runtime = tmp_path / "rt"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "kamailio_app.launcher", "--config", str(config),
         "--runtime-dir", str(runtime)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    return launcher, port, runtime


def _stop(launcher: subprocess.Popen, runtime: Path) -> None:
    try:
        kamailio = int((runtime / "kamailio.pid").read_text())
    except (OSError, ValueError):
        kamailio = None
    if launcher.poll() is None:
        launcher.terminate()
        try:
            launcher.wait(15)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
    if kamailio is not None:
        try:
            os.killpg(kamailio, 9)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_ready(launcher: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 30
    while not answers_options(port):
        assert launcher.poll() is None and time.monotonic() < deadline, "did not start"
        time.sleep(0.1)


def test_a_closed_stderr_does_not_stop_the_proxy(tmp_path):
    launcher, port, runtime = _launch(tmp_path)
    try:
        _wait_ready(launcher, port)
        launcher.stderr.close()
        _send(port, 3000)
        time.sleep(1.0)
        answered = sum(answers_options(port) for _ in range(5))
        assert answered == 5, f"{answered} of 5 OPTIONS answered"
    finally:
        _stop(launcher, runtime)


def test_a_bad_kemi_script_shows_its_traceback(tmp_path, monkeypatch):
    package = tmp_path / "bad" / "kamailio_app"
    # the KEMI script Kamailio loads: the project's, with a syntax error added
    import shutil
    shutil.copytree(ROOT / "kamailio_app", package)
    script = package / "kemi.py"
    if not script.exists():
        pytest.skip("no kamailio_app/kemi.py")
    script.write_text(script.read_text() + "\ndef r188_broken(:\n")
    port = free_port()
    config = write_proxy_config(tmp_path, port, pki=None, e2m=False)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'bad'}{os.pathsep}{ROOT}")
    done = subprocess.run([sys.executable, "-m", "kamailio_app.launcher", "--config",
                           str(config), "--runtime-dir", str(tmp_path / "rt")],
                          cwd=tmp_path / "bad", env=env, capture_output=True, timeout=60)
    err = done.stderr.decode(errors="replace")
    assert done.returncode != 0
    assert "SyntaxError" in err and "r188_broken" in err, err[-3000:]


def test_a_flood_at_info_level_leaves_honest_requests_served(proxy_factory):
    proxy = proxy_factory("r188-flood", e2m=False, log_level="info")
    mark = proxy.log_mark()
    tags = [f"T{i}{secrets.token_hex(3)}" for i in range(4)]
    senders = [threading.Thread(target=_send, args=(proxy.port, 1500, f"127.0.0.{20 + i}", tag))
               for i, tag in enumerate(tags)]
    started = time.monotonic()
    for sender in senders:
        sender.start()
    during, tries = 0, 0
    while any(sender.is_alive() for sender in senders):
        tries += 1
        during += proxy.options(timeout=1.0) is not None
    for sender in senders:
        sender.join()
    took = time.monotonic() - started
    assert proxy.options() is not None
    time.sleep(0.5)
    log = proxy.log_since(mark)
    records = log.count("parse_via(): parsing via on: <... [cut by e2m-proxy")
    assert during >= tries - 1, f"{during} of {tries} OPTIONS answered during a {took:.1f} s flood"
    assert records > 1000, f"{records} parse_via records logged of 6000 sent"
    assert not any(tag in log for tag in tags)
    print(f"r188 flood: {during}/{tries} OPTIONS during {took:.1f} s, {records} records")
