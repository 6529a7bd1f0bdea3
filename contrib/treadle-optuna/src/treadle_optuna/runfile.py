"""Run files read and written: the TOML that ``treadle run`` executes.

The standard library reads TOML but does not write it; a run file needs only strings, numbers,
booleans, lists, tables and arrays of tables (``[[plugins]]``), which ``dumps`` writes so that
``tomllib.loads(dumps(spec)) == spec``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from treadle import ConfigError

__all__ = ["dumps", "read", "write"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read run file {path}: {exc}") from exc


def write(path: str | Path, spec: Mapping[str, Any], header: str = "") -> Path:
    """Write ``spec`` atomically: workers sharing a study may write the same file at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(comment + dumps(spec), encoding="utf-8")
    os.replace(temporary, path)
    return path


def dumps(spec: Mapping[str, Any]) -> str:
    lines: list[str] = []
    _table(spec, (), lines)
    return "\n".join(lines).strip("\n") + "\n"


def _table(table: Mapping[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    # plain values first: after a [header] every key belongs to that table
    for key, value in table.items():
        if not _is_table(value) and not _is_table_array(value):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if _is_table(value):
            lines += ["", f"[{_dotted((*path, key))}]"]
            _table(value, (*path, key), lines)
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{_dotted((*path, key))}]]"]
                _table(item, (*path, key), lines)


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(_key(part) for part in path)


def _key(key: Any) -> str:
    key = str(key)
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest text that reads back as the same float
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # a table inside a list
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise ConfigError(
        f"cannot write {type(value).__name__} {value!r} to a run file (TOML holds strings, "
        "numbers, booleans, lists and tables)"
    )
