"""Write a new plugin package: ``treadle-NAME/`` with its entry point, module, test, README and a
publish workflow.

The module's methods are generated from the real interfaces (``treadle.components`` and
``treadle.hookspecs``): their signatures and docstrings are read when the package is written,
so a scaffold never describes an interface treadle no longer has. Static files are templates
in ``templates/`` (package data), filled by :func:`render`.
"""

from __future__ import annotations

import inspect
import json
import keyword
import re
import shutil
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from treadle import components, hookspecs
from treadle.errors import ConfigError

__all__ = ["KINDS", "Kind", "PluginNames", "create", "render", "treadle_requirement"]


@dataclass(frozen=True)
class Kind:
    """One kind of plugin: its entry-point group, its conformance suite and its template."""

    group: str
    suite: str
    attribute: str  # the suite's class attribute naming the component
    base: type | None  # the class to subclass (None: a factory function or a hook object)
    usage: str  # how a user names it in a Run, with NAME standing for the plugin's name


KINDS: dict[str, Kind] = {
    "callback": Kind("treadle.plugin", "CallbackConformance", "plugin", None, 'plugins=["NAME"]'),
    "strategy": Kind(
        "treadle.strategy", "StrategyConformance", "strategy", components.Strategy,
        'strategy="NAME"',
    ),
    "precision": Kind(
        "treadle.precision", "PrecisionConformance", "precision", components.Precision,
        'precision="NAME"',
    ),
    "optimizer": Kind(
        "treadle.optimizer", "OptimizerConformance", "optimizer", None,
        'optimizer={"name": "NAME", "lr": 1e-3}',
    ),
    "scheduler": Kind(
        "treadle.scheduler", "SchedulerConformance", "scheduler", None,
        'scheduler={"name": "NAME", "warmup_steps": 100}',
    ),
    "logger": Kind(
        "treadle.logger", "LoggerConformance", "logger", components.Logger, 'loggers=["NAME"]'
    ),
    "checkpoint": Kind(
        "treadle.checkpoint", "CheckpointConformance", "checkpoint", components.CheckpointFormat,
        'checkpoint="NAME"',
    ),
    "store": Kind(
        "treadle.store", "StoreConformance", "store", components.CheckpointStore, 'store="NAME"'
    ),
}  # fmt: skip

#: The hooks a new callback implements; every other hook is listed in a comment below them.
CALLBACK_HOOKS = (
    "on_fit_begin",
    "on_step_end",
    "on_log",
    "on_eval_end",
    "on_save_checkpoint",
    "on_load_checkpoint",
    "on_fit_end",
)

_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


def treadle_requirement() -> str:
    """The one place the generated ``dependencies`` line on treadle is made: the running
    treadle's major.minor as the lowest supported version."""
    from treadle import __version__

    major, minor = [*re.findall(r"\d+", __version__), "0", "0"][:2]
    return f"treadle>={major}.{minor}"


@dataclass(frozen=True)
class PluginNames:
    """Every name derived from the plugin's name ``my-thing``."""

    name: str  # my-thing: the entry-point name users write
    distribution: str  # treadle-my-thing
    package: str  # treadle_my_thing
    identifier: str  # my_thing: a factory function's name
    class_name: str  # MyThing

    @classmethod
    def of(cls, name: str) -> PluginNames:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"plugin name {name!r} is not allowed: use lowercase letters, digits and single "
                "hyphens, starting with a letter (e.g. 'my-logger'); it becomes the entry-point "
                "name users write, the distribution treadle-NAME and the package treadle_NAME"
            )
        if name.startswith("treadle-") or name == "treadle":
            raise ConfigError(
                f"plugin name {name!r}: leave out 'treadle-', which is added to the "
                f"distribution's name (give {name.removeprefix('treadle-')!r})"
            )
        identifier = name.replace("-", "_")
        if keyword.iskeyword(identifier):
            raise ConfigError(f"plugin name {name!r} is a Python keyword; choose another")
        return cls(
            name=name,
            distribution=f"treadle-{name}",
            package=f"treadle_{identifier}",
            identifier=identifier,
            class_name="".join(part.capitalize() for part in name.split("-")),
        )


# ---------------------------------------------------------------------- templates


def template(name: str) -> str:
    return (resources.files("treadle.plugins.authoring") / "templates" / name).read_text(
        encoding="utf-8"
    )


def render(text: str, values: Mapping[str, str]) -> str:
    """Replace each ``{{ key }}``; a key without a value is an error, not a silent blank."""

    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{ {key} }}}} has no value")
        return values[key]

    return re.sub(r"\{\{ (\w+) \}\}", value, text)


# ---------------------------------------------------------------------- generated code

#: Names an annotation or body may use, and the import each needs (added only when used).
_IMPORTS = {
    "contextlib": ("plain", "import contextlib"),
    "json": ("plain", "import json"),
    "Callable": ("plain", "from collections.abc import Callable"),
    "Iterable": ("plain", "from collections.abc import Iterable"),
    "Iterator": ("plain", "from collections.abc import Iterator"),
    "Mapping": ("plain", "from collections.abc import Mapping"),
    "MutableMapping": ("plain", "from collections.abc import MutableMapping"),
    "Path": ("plain", "from pathlib import Path"),
    "Any": ("plain", "from typing import Any"),
    "ClassVar": ("plain", "from typing import ClassVar"),
    "torch": ("third", "import torch"),
    "nn": ("third", "from torch import nn"),
    "safetensors": ("third", "import safetensors.torch"),
    "treadle": ("third", "import treadle"),
    "LossSum": ("typing", "from treadle.state import LossSum"),
    "ResumableSampler": ("typing", "from treadle.data import ResumableSampler"),
    "Run": ("typing", "from treadle.run import Run"),
    "Snapshot": ("typing", "from treadle.checkpoint import Snapshot"),
    "DirectoryStore": ("third", "from treadle.plugins.checkpoint.directory import DirectoryStore"),
}


def imports_for(code: str) -> str:
    """The import block ``code`` needs (typing-only names under ``TYPE_CHECKING``)."""
    # names in docstrings and comments need no import
    code = re.sub(r'"""(.|\n)*?"""', "", code)
    code = re.sub(r"#.*", "", code)
    used = {name for name in _IMPORTS if re.search(rf"(?<![\w.]){name}\b", code)}
    sections: dict[str, list[str]] = {"plain": [], "third": [], "typing": []}
    for name in sorted(used):
        where, line = _IMPORTS[name]
        sections[where].append(line)
    if sections["typing"]:
        sections["plain"].append("from typing import TYPE_CHECKING")
    blocks = [sorted(set(sections[k])) for k in ("plain", "third") if sections[k]]
    text = "\n\n".join("\n".join(_merge(block)) for block in blocks)
    if sections["typing"]:
        typing = "\n".join(f"    {line}" for line in sorted(sections["typing"]))
        text += f"\n\nif TYPE_CHECKING:\n{typing}"
    return "from __future__ import annotations\n\n" + text


def _merge(lines: list[str]) -> list[str]:
    """``from m import a`` and ``from m import b`` as ``from m import a, b``; sorted like isort."""
    merged: dict[str, list[str]] = {}
    plain = []
    for line in lines:
        if line.startswith("from "):
            module, _, name = line[5:].partition(" import ")
            merged.setdefault(module, []).append(name)
        else:
            plain.append(line)
    froms = [
        f"from {m} import {', '.join(sorted(set(n), key=_isort_key))}"
        for m, n in sorted(merged.items())
    ]
    return sorted(plain) + froms


def _literal(value: Any) -> str:
    """``repr`` with double-quoted strings, as ``ruff format`` writes them."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _isort_key(name: str) -> tuple[int, str]:
    """isort's order within one import: CONSTANTS, then Classes, then functions."""
    return (0 if name.isupper() else 1 if name[:1].isupper() else 2, name)


def _annotation(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return ""
    return value if isinstance(value, str) else inspect.formatannotation(value)


def wrapped(head: str, arguments: list[str], tail: str, indent: str) -> str:
    """``head(arguments)tail`` on one line if it fits in 100 columns, else the arguments on
    their own line, else one per line (the layouts ``ruff format`` chooses)."""
    one_line = f"{indent}{head}({', '.join(arguments)}){tail}"
    if len(one_line) <= 100:
        return one_line
    inner = f"{indent}    {', '.join(arguments)}"
    if len(inner) <= 100:
        return f"{indent}{head}(\n{inner}\n{indent}){tail}"
    each = "".join(f"{indent}    {argument},\n" for argument in arguments)
    return f"{indent}{head}(\n{each}{indent}){tail}"


def signature_text(function: Callable[..., Any], *, self_name: str | None = "self") -> str:
    """``(self, a: T, *, b: U = 1) -> R`` as written in the source, annotations unquoted."""
    arguments, returns = signature_parts(function, self_name=self_name)
    return f"({', '.join(arguments)})" + returns


def signature_parts(
    function: Callable[..., Any], *, self_name: str | None = "self"
) -> tuple[list[str], str]:
    """The parameters as written, and `` -> R`` (or nothing)."""
    signature = inspect.signature(function)
    parts: list[str] = []
    star_done = False
    kinds = inspect.Parameter
    params = list(signature.parameters.values())
    if self_name and (not params or params[0].name != self_name):
        parts.append(self_name)
    for index, param in enumerate(params):
        text = param.name
        if param.kind is kinds.VAR_POSITIONAL:
            text, star_done = f"*{param.name}", True
        elif param.kind is kinds.VAR_KEYWORD:
            text = f"**{param.name}"
        elif param.kind is kinds.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        annotation = _annotation(param.annotation)
        if annotation and param.name != self_name:
            text += f": {annotation}"
        if param.default is not kinds.empty:
            default = _literal(param.default)
            text += f" = {default}" if annotation else f"={default}"
        parts.append(text)
        following = params[index + 1] if index + 1 < len(params) else None
        if param.kind is kinds.POSITIONAL_ONLY and (
            following is None or following.kind is not kinds.POSITIONAL_ONLY
        ):
            parts.append("/")
    returns = _annotation(signature.return_annotation)
    return parts, (f" -> {returns}" if returns else "")


def _call_arguments(function: Callable[..., Any]) -> list[str]:
    """The arguments that pass a method's own parameters on to ``super()``."""
    out = []
    for param in list(inspect.signature(function).parameters.values())[1:]:
        if param.kind is param.VAR_POSITIONAL:
            out.append(f"*{param.name}")
        elif param.kind is param.VAR_KEYWORD:
            out.append(f"**{param.name}")
        elif param.kind is param.KEYWORD_ONLY:
            out.append(f"{param.name}={param.name}")
        else:
            out.append(param.name)
    return out


def _docstring(text: str | None, indent: str, fallback: str) -> str:
    body = inspect.cleandoc(text) if text else fallback
    body = body.replace("\\", "\\\\")
    lines = body.splitlines()
    if len(lines) == 1 and len(indent) + len(lines[0]) + 6 <= 100:
        return f'{indent}"""{lines[0]}"""\n'
    inner = "\n".join(f"{indent}{line}" if line else "" for line in lines)
    return f'{indent}"""{inner.lstrip()}\n{indent}"""\n'


def interface_methods(base: type) -> list[tuple[str, Callable[..., Any]]]:
    """The public methods ``base`` defines itself (not hooks, not properties), in source order."""
    found = []
    for name, value in base.__dict__.items():
        if name.startswith("_") or not inspect.isfunction(value):
            continue
        if hasattr(value, f"{hookspecs.PROJECT}_impl"):
            continue  # the base's own hook implementations (Logger's) are not to override
        found.append((name, value))
    return found


def method_code(
    base: type, name: str, function: Callable[..., Any], body: str | None = None
) -> str:
    """One method of the generated class: the base's signature and docstring; by default a
    body that calls the base, which a plugin replaces with its own."""
    indent = " " * 8
    default_body = textwrap.dedent(
        wrapped(f"return super().{name}", _call_arguments(function), "", indent)
    )
    arguments, returns = signature_parts(function)
    code = wrapped(f"def {name}", arguments, f"{returns}:", "    ") + "\n"
    code += _docstring(function.__doc__, indent, f"See ``treadle.{base.__name__}.{name}``.")
    lines = textwrap.dedent(body).strip() if body else default_body
    code += textwrap.indent(lines, indent) + "\n"
    return code


def hook_code(name: str, body: str) -> str:
    """A ``@treadle.hookimpl`` method with the hook's full signature and docstring."""
    spec = getattr(hookspecs, name)
    arguments, returns = signature_parts(spec)
    code = "    @treadle.hookimpl\n"
    code += wrapped(f"def {name}", arguments, f"{returns}:", "    ") + "\n"
    code += _docstring(spec.__doc__, " " * 8, name)
    code += textwrap.indent(textwrap.dedent(body).strip(), " " * 8) + "\n"
    return code


def other_hooks_comment(skip: tuple[str, ...]) -> str:
    """Every other hook, one line each, as a comment: the menu a callback author picks from."""
    lines = [
        "    # Other hooks you may implement, taking only the arguments you need (a provider",
        "    # returns a value that replaces treadle's default step; see treadle.hookspecs):",
    ]
    for name in dir(hookspecs):
        spec = getattr(hookspecs, name)
        if name in skip or not hasattr(spec, f"{hookspecs.PROJECT}_spec"):
            continue
        arguments = ", ".join(inspect.signature(spec).parameters)
        provider = spec.treadle_spec.get("firstresult") if hasattr(spec, "treadle_spec") else False
        lines.append(f"    #   {name}({arguments})" + ("  [provider]" if provider else ""))
    return "\n".join(lines) + "\n"


# Bodies that make the generated component work as it is (and pass its conformance suite);
# every other method calls the base class. Keyed by (kind, method).
_BODIES = {
    ("logger", "start"): """
        self.path = Path(run.output_dir) / "{{ name }}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
    """,
    ("logger", "log"): """
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **metrics}) + "\\n")
            self._file.flush()
    """,
    ("logger", "finish"): """
        if self._file is not None:
            self._file.close()
            self._file = None
    """,
    ("checkpoint", "save_tensors"): """
        file = f"{stem}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        safetensors.torch.save_file(tensors, str(Path(directory) / file))
        return [file]
    """,
    ("checkpoint", "load_tensors"): """
        return safetensors.torch.load_file(str(Path(directory) / f"{stem}.safetensors"))
    """,
}

_HOOK_BODIES = {
    "on_fit_begin": "pass",
    "on_step_end": "self.steps_seen += 1",
    "on_log": "pass",
    "on_eval_end": "pass",
    "on_save_checkpoint": 'plugin_state["{{ name }}"] = {"steps_seen": self.steps_seen}',
    "on_load_checkpoint": """
        own = plugin_state.get("{{ name }}")
        if own is not None:
            self.steps_seen = int(own["steps_seen"])
    """,
    "on_fit_end": "pass",
}


def class_body(kind: str) -> str:
    base = KINDS[kind].base
    if base is None:  # a callback: hooks instead of a base class's methods
        code = "\n".join(hook_code(name, _HOOK_BODIES[name]) for name in CALLBACK_HOOKS)
        return code + "\n" + other_hooks_comment(CALLBACK_HOOKS)
    return "\n".join(
        method_code(base, name, function, _BODIES.get((kind, name)))
        for name, function in interface_methods(base)
    )


def module_text(kind: str, names: PluginNames, values: Mapping[str, str]) -> str:
    """The plugin's module: the kind's template with the generated methods and its imports."""
    body = render(template(f"module_{kind}.py.tmpl"), {**values, "methods": class_body(kind)})
    body = render(body, values)  # placeholders inside the generated bodies
    docstring, _, code = body.partition('"""\n\n')
    return f'{docstring}"""\n\n{imports_for(code)}\n\n\n{code.strip()}\n'


# ---------------------------------------------------------------------- the package


def create(kind: str, name: str, directory: Path, *, force: bool = False) -> Path:
    """Write ``directory/treadle-NAME/`` for a plugin of ``kind``; return its path.

    Raises:
        ConfigError: unknown kind, bad name, or the folder exists (and ``force`` is False).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")
    names = PluginNames.of(name)
    root = Path(directory) / names.distribution
    if root.exists():
        if not force:
            raise ConfigError(
                f"{root} already exists; choose another --dir or name, or pass --force to "
                "replace it"
            )
        shutil.rmtree(root) if root.is_dir() else root.unlink()
    info = KINDS[kind]
    target = names.identifier if kind in ("optimizer", "scheduler") else names.class_name
    values = {
        "kind": kind,
        "name": names.name,
        "distribution": names.distribution,
        "package": names.package,
        "identifier": names.identifier,
        "class_name": names.class_name,
        "target": target,
        "group": info.group,
        "kind_entry": info.group.removeprefix("treadle."),
        "suite": info.suite,
        "attribute": info.attribute,
        "usage": info.usage.replace("NAME", names.name),
        "requirement": treadle_requirement(),
        "base": info.base.__name__ if info.base else "",
    }
    files = {
        "pyproject.toml": render(template("pyproject.toml.tmpl"), values),
        "README.md": render(template("README.md.tmpl"), values),
        ".github/workflows/publish.yml": render(template("publish.yml.tmpl"), values),
        f"src/{names.package}/__init__.py": module_text(kind, names, values),
        f"src/{names.package}/py.typed": "",
        f"tests/test_{names.identifier}.py": render(template(f"test_{kind}.py.tmpl"), values),
    }
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
