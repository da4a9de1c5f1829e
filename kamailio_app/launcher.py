"""``e2m-proxy --config PROXY.toml``: render a Kamailio cfg and run Kamailio in the foreground.

Each instance gets a private runtime dir (cfg, ctl socket, JSON-RPC FIFO, pid file), so
several proxies run side by side on one host.  The embedded Python finds this project
and the venv's packages through defines in the rendered cfg (read by ``kemi.py``) and
``PYTHONPATH``.  SIGTERM or SIGINT to the launcher is passed on to Kamailio, which then
stops its workers; the launcher waits for it and removes what it created.

Exit status: Kamailio's own, 2 for an unusable configuration.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import FrameType

from .config import AppConfig, AppConfigError, load_app_config

__all__ = ["render_cfg", "python_path", "kamailio_command", "check_config", "main",
           "TEMPLATE", "KEMI_SCRIPT"]

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
TEMPLATE = PACKAGE_DIR / "templates" / "kamailio.cfg.tmpl"
KEMI_SCRIPT = PACKAGE_DIR / "kemi.py"
STOP_TIMEOUT = 10.0  # seconds Kamailio gets to stop before it is killed
REPLAY_AUTOEXPIRE = 86400 + 33  # [policy] replay_window is at most 86400 s


def python_path() -> list[str]:
    """Directories the embedded interpreter needs first on sys.path.

    The project root (an editable install is found through a .pth finder, which
    PYTHONPATH entries do not run) and this interpreter's site-packages, which must
    come before Debian's dist-packages so the venv's cryptography wins.
    """
    paths = [str(PROJECT_ROOT)]
    for key in ("purelib", "platlib"):
        site = sysconfig.get_paths()[key]
        if site not in paths and os.path.isdir(site):
            paths.append(site)
    return paths


def _cfg_string(value: str, what: str) -> str:
    # Rendered inside "..." in the cfg: a quote or newline would break (or inject) syntax.
    if any(ch in value for ch in '"\n\r\\'):
        raise AppConfigError(what, [f"{what} {value!r} contains a quote, backslash or newline"])
    return value


def render_cfg(config: AppConfig, runtime_dir: Path, template: Path = TEMPLATE) -> str:
    """The Kamailio cfg text for ``config`` with its runtime files under ``runtime_dir``."""
    k = config.kamailio
    defines = []
    if k.http_listener is not None and config.e2m.enabled:
        defines.append("#!define WITH_HTTP")
    if config.e2m.enabled:
        defines.append("#!define WITH_E2M")
    values = {
        "CONFIG_PATH": _cfg_string(str(config.path), "config path"),
        "PYTHONPATH": _cfg_string(os.pathsep.join(python_path()), "python path"),
        "RUNTIME_DIR": _cfg_string(str(runtime_dir), "runtime dir"),
        "KEMI_SCRIPT": _cfg_string(str(k.kemi_script or KEMI_SCRIPT), "KEMI script"),
        "MODULE_PATH": _cfg_string(k.module_path, "module path"),
        "FEATURE_DEFINES": "\n".join(defines),
        "LOG_LEVEL": str(k.log_level),
        "LISTEN_LINES": "\n".join(f"listen={item.kamailio()}" for item in k.listen),
        "ALIAS_LINES": "\n".join(f"alias={name}" for name in k.domains),
        "KEYCACHE_SIZE": str(k.keycache_size),
        "KEYCACHE_EXPIRE": str(k.keycache_expire),
        # the longest replay window PROXY.toml may set, plus a transaction's lifetime;
        # each item carries its own, shorter expiry (kamailio_app/replay_htable.py)
        "REPLAY_EXPIRE": str(REPLAY_AUTOEXPIRE),
        "TCP_READ_BUFFER": str(k.tcp_max_message_kb * 1024),
    }
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"@@{name}@@", value)
    if "@@" in text:
        left = text[text.index("@@"):].split("\n", 1)[0]
        raise RuntimeError(f"template placeholder not filled: {left}")
    return text


def kamailio_command(config: AppConfig, cfg_path: Path, runtime_dir: Path) -> list[str]:
    k = config.kamailio
    return [k.binary, "-DD", "-E", "-f", str(cfg_path),
            "-m", str(k.shm_mb), "-M", str(k.pkg_mb), "-n", str(k.workers),
            "-Y", str(runtime_dir), "-w", str(runtime_dir),
            "-P", str(runtime_dir / "kamailio.pid")]


def check_config(path: str | Path) -> AppConfig:
    """Load the Kamailio sections and, with E2M on, the core's sections too.

    Raises ``AppConfigError`` (or the core's ``ConfigError``, also a ValueError)
    listing every problem, before anything is started.
    """
    config = load_app_config(path)
    if config.e2m.enabled:
        try:
            from e2m_plugins.config import load_proxy_config
        except ImportError as exc:
            raise AppConfigError(path, [f"[e2m] enabled = true but the E2M engine is not "
                                        f"available ({exc}); set enabled = false for a "
                                        f"plain routing proxy"]) from None
        load_proxy_config(config.path)
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e2m-proxy", description="Run Kamailio as an E2M proxy (or a plain routing hop).")
    parser.add_argument("--config", required=True, help="PROXY.toml")
    parser.add_argument("--runtime-dir", help="private dir for the cfg, ctl socket, FIFO and "
                        "pid file (default: a new temporary dir, removed on exit)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the rendered cfg (kamailio -c), then exit")
    parser.add_argument("--print-cfg", action="store_true", help="print the rendered cfg and exit")
    return parser


def _prepare_runtime(requested: str | None) -> tuple[Path, bool]:
    if requested:
        path = Path(requested).resolve()
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix="e2m-proxy-")).resolve(), True


def _cleanup(runtime_dir: Path, created: bool) -> None:
    if created:
        shutil.rmtree(runtime_dir, ignore_errors=True)
        return
    for name in ("kamailio_ctl", "kamailio_rpc.fifo", "kamailio.pid"):
        try:
            (runtime_dir / name).unlink()
        except OSError:
            pass


def _run(command: list[str], env: dict[str, str]) -> int:
    # Own session: a terminal's Ctrl-C reaches only us, and we stop Kamailio in order.
    child = subprocess.Popen(command, env=env, start_new_session=True)
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        # To the whole group, as systemd's default KillMode does for Kamailio: once we
        # saw the TCP main process miss the main process's SIGTERM and keep the
        # shutdown waiting until the SIGKILL below.
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping:
                    try:
                        code = child.wait(timeout=STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        os.killpg(child.pid, signal.SIGKILL)
                        code = child.wait()
                    break
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        # Workers that outlived the main process (should not happen) go too.
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    # Kamailio exits non-zero after a SIGTERM it asked for; report a clean stop as 0.
    return 0 if stopping and code in (0, -signal.SIGTERM, 255, 1) else code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = check_config(args.config)
    except ValueError as exc:  # AppConfigError and the core's ConfigError
        print(f"e2m-proxy: {exc}", file=sys.stderr)
        return 2
    if sys.version_info[:2] != (3, 11):
        print("e2m-proxy: warning: Kamailio embeds Python 3.11; this interpreter is "
              f"{sys.version.split()[0]}, so compiled packages may not load", file=sys.stderr)
    runtime_dir, created = _prepare_runtime(args.runtime_dir)
    try:
        cfg_path = runtime_dir / "kamailio.cfg"
        try:
            cfg_path.write_text(render_cfg(config, runtime_dir))
        except AppConfigError as exc:
            print(f"e2m-proxy: {exc}", file=sys.stderr)
            return 2
        if args.print_cfg:
            sys.stdout.write(cfg_path.read_text())
            return 0
        env = dict(os.environ)
        extra = os.pathsep.join(python_path())
        env["PYTHONPATH"] = extra + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["E2M_PROXY_CONFIG"] = str(config.path)
        if args.check:
            return subprocess.run([config.kamailio.binary, "-c", "-f", str(cfg_path)],
                                  env=env).returncode
        return _run(kamailio_command(config, cfg_path, runtime_dir), env)
    finally:
        _cleanup(runtime_dir, created)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
