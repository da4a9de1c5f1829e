"""The one TOML writer of the lab: the small subset our UA.toml and PROXY.toml files use."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["toml_value", "write_toml", "toml_text"]


def toml_value(value: Any) -> str:
    """A TOML literal for the values our configs hold (bool, number, list, string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def toml_text(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """``{section: {key: value}}`` as TOML; keys are quoted (AoRs in ``[peers]`` need it)."""
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in table.items()
                  if v is not None]
        lines.append("")
    return "\n".join(lines)


def write_toml(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``toml_text(sections)`` to ``path``, 0600: a config may hold a database
    password, and the proxy refuses one others can read (review 73)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(toml_text(sections))
    return path
