"""The generated pages of the docs site, written from the code at every ``mkdocs build``.

An MkDocs hook (``hooks:`` in mkdocs.yml). Nothing it writes is committed, so no page can be
stale:

- ``reference/hooks.md``: every hook of ``treadle.hookspecs`` (docstring, arguments, event or
  provider, HF ``Trainer`` and Lightning equivalents); a hook without a docstring, or without a
  row in ``LIGHTNING``, fails the build;
- ``reference/components.md``: every entry point of the installed ``treadle`` distribution, by
  kind, with its options (signature: type, default; docstring ``Args:``/``Options:``: meaning);
- ``reference/config.md``: every ``treadle.Config`` field, its type, default and ``#:`` comment;
- ``reference/run-file.md``: every top-level key a ``treadle run`` file accepts
  (``treadle.plugins.commands.runfile.RUN_KEYS``);
- ``reference/api.md``: the public Python API, rendered by mkdocstrings;
- and, inside hand-written pages, a marker line ``<!-- generated: NAME -->`` is replaced by the
  generated text ``NAME`` (``loop``: the loop of hookspecs' docstring; ``first-party-plugins``
  and ``contrib-plugins``: the plugin directory).

Every failure is a ``DocsError``: the build stops with a message naming what is undocumented.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
REPO_URL = "https://github.com/treadle-dev/treadle"
SOURCE_URL = f"{REPO_URL}/blob/main"


class DocsError(Exception):
    """Something the docs must say is missing from the code (the build fails)."""


# ------------------------------------------------------------------------------ docstrings


def _dedent_docstring(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def rst_to_markdown(text: str) -> str:
    """The reST that docstrings use, as Markdown: ``::`` literal blocks become fences."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            head = line.rstrip()[:-2].rstrip()
            out.append(head + ":" if head else "")
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            body = inspect.cleandoc("\n".join(block))
            out += ["", "```text", body, "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


_SECTION = re.compile(r"^(Args|Arguments|Options|Parameters|Keyword Args):\s*$")
_OTHER_SECTION = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")


def split_sections(doc: str) -> tuple[str, dict[str, str]]:
    """A Google-style docstring: its text before any section, and its ``Args:``/``Options:``
    entries as ``{name: description}`` (``**options`` keeps its stars)."""
    body: list[str] = []
    options: dict[str, str] = {}
    current: str | None = None
    in_args = in_other = False
    for line in doc.splitlines():
        if _SECTION.match(line):
            in_args, in_other, current = True, False, None
            continue
        if _OTHER_SECTION.match(line) and not line.startswith(" "):
            in_args, in_other = False, True
            continue
        if in_args:
            # "name: text", "name (type): text", or several names sharing one text
            match = re.match(r"^    (\*{0,2}\w+(?:, \*{0,2}\w+)*)(?: \([^)]*\))?:\s*(.*)$", line)
            if match:
                current = match.group(1)
                for name in current.split(", "):
                    options[name] = match.group(2).strip()
            elif line.startswith("     ") and current:
                for name in current.split(", "):
                    options[name] += " " + line.strip()
            elif line.strip():
                in_args = False
                body.append(line)
            continue
        if in_other:
            if line.startswith(" ") or not line.strip():
                continue
            in_other = False
        body.append(line)
    return "\n".join(body).strip(), options


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    text = " ".join(text.split())
    return f"``{text}``" if "`" in text else f"`{text}`"


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")


# ------------------------------------------------------------------------------ hooks

#: The Lightning equivalent of every hook (``None``: Lightning has none). A hook missing here,
#: or a name here that is no hook, fails the build: the table is kept complete both ways.
LIGHTNING: dict[str, str | None] = {
    "on_init_end": None,
    "on_fit_begin": "`on_fit_start` / `on_train_start`",
    "on_epoch_begin": "`on_train_epoch_start`",
    "on_step_begin": "`on_train_batch_start` (of the window's first micro-batch)",
    "on_micro_step_begin": "`on_train_batch_start`",
    "on_before_backward": "`on_before_backward`",
    "on_after_backward": "`on_after_backward`",
    "on_micro_step_end": "`on_train_batch_end`",
    "on_before_optimizer_step": "`on_before_optimizer_step` (clip in `configure_gradient_clipping`)",
    "on_after_optimizer_step": "`on_before_zero_grad`",
    "on_step_end": "`on_train_batch_end` (of the window's last micro-batch)",
    "on_epoch_end": "`on_train_epoch_end`",
    "on_fit_end": "`on_train_end` / `on_fit_end`",
    "on_exception": "`on_exception`",
    "on_log": "`Logger.log_metrics` (called by `self.log`)",
    "on_eval_begin": "`on_validation_epoch_start`",
    "on_eval_step_end": "`on_validation_batch_end`",
    "on_eval_end": "`on_validation_epoch_end`",
    "on_predict_begin": "`on_predict_start`",
    "on_predict_step_end": "`on_predict_batch_end`",
    "on_predict_end": "`on_predict_end`",
    "on_save_checkpoint": "`on_save_checkpoint(checkpoint)`",
    "on_save_end": None,
    "on_load_checkpoint": "`on_load_checkpoint(checkpoint)`",
    "make_train_loader": "`train_dataloader()`",
    "make_eval_loader": "`val_dataloader()`",
    "make_optimizer": "`configure_optimizers()`",
    "make_scheduler": "`configure_optimizers()` (its `lr_scheduler`)",
    "compute_loss": "`training_step` (the loss it returns)",
    "training_step": "`training_step` with `automatic_optimization = False`",
    "eval_step": "`validation_step`",
    "compute_metrics": "`on_validation_epoch_end` (with torchmetrics)",
    "predict_step": "`predict_step`",
}


def hook_specs(module: Any = None) -> list[tuple[str, Callable[..., Any], bool]]:
    """``(name, function, firstresult)`` of every hook specification, in source order."""
    if module is None:
        import treadle.hookspecs as module
    found = []
    for name, function in vars(module).items():
        options = getattr(function, "treadle_spec", None)
        if options is not None:
            found.append((name, function, bool(options.get("firstresult"))))
    found.sort(key=lambda item: inspect.getsourcelines(item[1])[1])
    return found


def hf_equivalent(doc: str) -> str | None:
    match = re.search(r"\(HF: (.+?)\.?\)", doc, flags=re.S)
    return " ".join(match.group(1).split()) if match else None


def hook_reference(module: Any = None, lightning: dict[str, str | None] | None = None) -> str:
    lightning = LIGHTNING if lightning is None else lightning
    specs = hook_specs(module)
    names = [name for name, _, _ in specs]
    undocumented = [name for name, function, _ in specs if not (function.__doc__ or "").strip()]
    if undocumented:
        raise DocsError(
            f"hooks without a docstring (write one in core/hookspecs.py): {undocumented}"
        )
    missing, stale = sorted(set(names) - set(lightning)), sorted(set(lightning) - set(names))
    if missing or stale:
        raise DocsError(
            "docs/_hooks/gen_reference.py LIGHTNING must name every hook exactly once: "
            f"missing {missing}, not hooks {stale}"
        )
    lines = [
        "# Hook reference",
        "",
        "Generated from [`core/hookspecs.py`](" + SOURCE_URL + "/core/hookspecs.py) when the "
        "site is built. **Events** call every implementation; **providers** are `firstresult` "
        "hooks that replace a built-in step (the first non-`None` result wins, the kernel's "
        "own implementation runs last). Where each hook fires in the loop: "
        "[Architecture](../architecture.md#the-loop).",
        "",
        "| hook | kind | HF `Trainer` | Lightning |",
        "|---|---|---|---|",
    ]
    for name, function, firstresult in specs:
        hf = hf_equivalent(_dedent_docstring(function))
        lines.append(
            f"| [`{name}`](#{_anchor(name)}) | {'provider' if firstresult else 'event'} "
            f"| {hf or '—'} | {lightning[name] or '—'} |"
        )
    for name, function, firstresult in specs:
        doc = _dedent_docstring(function)
        signature = inspect.signature(function)
        lines += [
            "",
            f"## `{name}`",
            "",
            f"**{'Provider' if firstresult else 'Event'}**"
            + (" (`firstresult`: the first non-`None` result is used)" if firstresult else ""),
            "",
            "```python",
            f"@treadle.hookimpl\ndef {name}{str(signature).replace(chr(39), '')}: ...",
            "```",
            "",
            rst_to_markdown(doc),
            "",
            "| argument | type |",
            "|---|---|",
        ]
        for parameter in signature.parameters.values():
            annotation = parameter.annotation
            text = (
                annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
            )
            lines.append(f"| `{parameter.name}` | {_code(text)} |")
        hf = hf_equivalent(doc)
        lines += [
            "",
            f"HF `Trainer`: {hf or '—'} · Lightning: {lightning[name] or '—'}",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the loop


def loop_pseudocode(module: Any = None) -> str:
    """The literal block of hookspecs' module docstring that holds the loop."""
    if module is None:
        import treadle.hookspecs as module
    text = rst_to_markdown(inspect.cleandoc(module.__doc__ or ""))
    for block in re.findall(r"```text\n(.*?)```", text, flags=re.S):
        if "run.fit()" in block:
            return "```text\n" + block + "```\n"
    raise DocsError("core/hookspecs.py's module docstring has no literal block with run.fit()")


# ------------------------------------------------------------------------------ components

KIND_TITLES = {
    "strategy": ("Strategies", "`strategy=`: where and how the model runs"),
    "precision": ("Precision", "`precision=`: number formats, autocast, loss scaling"),
    "optimizer": ("Optimizers", "`optimizer=`: a factory called with the model"),
    "scheduler": ("Schedulers", "`scheduler=`: a factory called with the optimizer"),
    "logger": ("Loggers", "`loggers=`: where metrics go"),
    "checkpoint": ("Checkpoint formats", "`checkpoint=`: how tensors are written"),
    "store": ("Checkpoint stores", "`store=`: where checkpoints are kept, and how"),
    "plugin": ("Plugins", "`plugins=`: callbacks and techniques, by name"),
    "adapter": ("Adapters", "turn a foreign callback object into a treadle plugin"),
    "command": ("Commands", "`treadle NAME ...` subcommands"),
}
_NO_OPTIONS = {"adapter", "command"}  # called by the kernel, not configured by users


def entry_points(distribution: str = "treadle") -> dict[str, list[importlib.metadata.EntryPoint]]:
    """The ``treadle.*`` entry points a distribution declares, by kind in ``KIND_TITLES`` order."""
    grouped: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for point in importlib.metadata.distribution(distribution).entry_points:
        if point.group.startswith("treadle."):
            grouped.setdefault(point.group.removeprefix("treadle."), []).append(point)
    unknown = set(grouped) - set(KIND_TITLES)
    if unknown:
        raise DocsError(f"entry-point kinds without a title in KIND_TITLES: {sorted(unknown)}")
    return {
        kind: sorted(grouped[kind], key=lambda p: p.name) for kind in KIND_TITLES if kind in grouped
    }


def options_of(obj: Any) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, description)`` of every option a component takes: its class
    ``__init__`` or factory signature, described by the docstring's ``Args:``/``Options:``."""
    docs: dict[str, str] = {}
    # a subclass documents what it adds; what it inherits is documented by its bases
    sources = [*reversed(obj.__mro__), obj.__init__] if isinstance(obj, type) else [obj]
    for source in sources:
        if source is not object and source.__doc__:
            docs |= split_sections(inspect.cleandoc(source.__doc__))[1]
    from treadle.plugins.commands.plugins import options

    rows = []
    for option in options(obj):
        name = option.name
        # a factory whose signature shows the options it forwards (the optimizers show their
        # torch class's) documents them all at once, as ``**options``
        description = docs.get(name) or docs.get(name.lstrip("*")) or docs.get("**options")
        if not description:
            raise DocsError(
                f"{obj.__module__}:{obj.__qualname__} does not document its option {name!r} "
                "(an Args: or Options: section of its docstring)"
            )
        if option.default is not None:
            default = option.default
        else:
            default = "" if name.startswith("**") else "required"
        rows.append((name, option.type, default, description))
    return rows


def _source_link(point: importlib.metadata.EntryPoint) -> str:
    module = point.value.partition(":")[0]
    parts = module.split(".")
    if parts[:2] == ["treadle", "plugins"]:
        path = "plugins/" + "/".join(parts[2:])
    elif parts[0] == "treadle":
        path = "core/" + "/".join(parts[1:])
    else:
        return f"`{point.value}`"
    file = ROOT / f"{path}.py"
    if not file.exists():
        file = ROOT / path / "__init__.py"
    return f"[`{point.value}`]({SOURCE_URL}/{file.relative_to(ROOT).as_posix()})"


def component_reference() -> str:
    lines = [
        "# Component reference",
        "",
        "Every first-party component and plugin, read from the entry points of the installed "
        "`treadle` distribution when the site is built, with the options its class or factory "
        "takes (type and default from the signature, meaning from the docstring). Pass options "
        'as `{"name": NAME, **options}` in Python or as a table with `name = "NAME"` in a run '
        "file. A third-party package adds names the same way: `treadle plugins` lists what is "
        "installed.",
    ]
    for kind, points in entry_points().items():
        title, what = KIND_TITLES[kind]
        lines += ["", f"## {title}", "", f"{what}. Entry-point group `treadle.{kind}`."]
        for point in points:
            try:
                obj = point.load()
            except Exception as exc:
                raise DocsError(
                    f"first-party entry point {kind} {point.name!r} = {point.value!r} cannot be "
                    f"loaded: {type(exc).__name__}: {exc}"
                ) from exc
            summary, _ = split_sections(_dedent_docstring(obj))
            if not summary:
                raise DocsError(f"{kind} {point.name!r} ({point.value}) has no docstring")
            lines += [
                "",
                f"### {point.name} {{#{kind}-{_anchor(point.name)}}}",
                "",
                f"{_source_link(point)}",
                "",
                rst_to_markdown(summary),
            ]
            if kind in _NO_OPTIONS:
                continue
            rows = [] if inspect.ismodule(obj) else options_of(obj)  # a module takes none
            if not rows:
                lines += ["", "No options."]
                continue
            lines += ["", "| option | type | default | description |", "|---|---|---|---|"]
            for name, type_, default, description in rows:
                lines.append(
                    f"| `{name}` | {_code(type_) if type_ else ''} | "
                    f"{_code(default) if default else ''} | {_cell(description)} |"
                )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ Config


def config_fields() -> list[tuple[str, str, str, str]]:
    """``(name, type, default, comment)`` of every ``treadle.Config`` field: the ``#:``
    comment above its line in core/config.py (the comment is the field's documentation)."""
    import attrs

    from treadle.config import Config

    source = Path(inspect.getsourcefile(Config) or "").read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    class_node = next(
        n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Config"
    )
    comments: dict[str, str] = {}
    annotations: dict[str, str] = {}
    for node in class_node.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            annotations[name] = ast.get_source_segment(source, node.annotation) or ""
            above: list[str] = []
            row = node.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#:"):
                above.insert(0, lines[row].strip()[2:].strip())
                row -= 1
            comments[name] = " ".join(above)
    fields = attrs.fields(Config)
    found = []
    for field in fields:
        if not comments.get(field.name):
            raise DocsError(f"Config.{field.name} has no #: comment in core/config.py")
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        found.append(
            (field.name, annotations.get(field.name, ""), repr(default), comments[field.name])
        )
    stale = set(comments) - {f.name for f in fields}
    if stale:
        raise DocsError(f"documented Config names that are not fields: {sorted(stale)}")
    return found


def config_reference() -> str:
    lines = [
        "# Config reference",
        "",
        "Every field of `treadle.Config`, generated from [`core/config.py`]("
        f"{SOURCE_URL}/core/config.py) when the site is built (each field's `#:` comment is its "
        "documentation). In a run file they go in the `[config]` table; on the command line, "
        "`treadle run run.toml --set max_steps=100`. Unknown names are rejected with the "
        "closest field.",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, type_, default, comment in config_fields():
        lines.append(f"| `{name}` | {_code(type_)} | {_code(default)} | {_cell(comment)} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ run file

#: What each top-level key of a run file is. A key ``treadle.plugins.commands.runfile``
#: accepts without a row here, or a row for a key it does not accept, fails the build.
RUN_KEYS: dict[str, tuple[str, str, str]] = {
    "model": (
        "string or table",
        "required",
        "An import path `package.module:factory`, called with no arguments, or a table "
        '`{factory = "package.module:factory", **kwargs}` called with the kwargs. Built inside '
        "the strategy's model-init context, after seeding with `config.seed`.",
    ),
    "train_data": (
        "string or table",
        "required",
        "Like `model`: a factory returning a `DataLoader`, a `Dataset` (batched with "
        "`config.batch_size`) or an iterable of batches.",
    ),
    "eval_data": (
        "string or table",
        "optional",
        "Like `train_data`; the factory may return a dict of named data sets.",
    ),
    "loss_fn": (
        "string",
        "optional",
        "An import path to `loss_fn(outputs, batch)`, for models that do not return a loss.",
    ),
    "config": (
        "table",
        "optional",
        "`treadle.Config` fields: see the [Config reference](config.md). "
        "`--set KEY=VALUE` on the command line overrides one.",
    ),
    "strategy": (
        "string or table",
        "optional (`single`)",
        'A strategy name, or a table `name = "..."` plus its options '
        "([Strategies](components.md#strategies)).",
    ),
    "precision": (
        "string or table",
        "optional (`fp32`)",
        "A precision name or table ([Precision](components.md#precision)).",
    ),
    "optimizer": (
        "string or table",
        "optional (`adamw`)",
        "An optimizer name or table ([Optimizers](components.md#optimizers)).",
    ),
    "scheduler": (
        "string or table",
        "optional (none)",
        "A scheduler name or table ([Schedulers](components.md#schedulers)).",
    ),
    "loggers": (
        "string, table or array of tables",
        "optional (`console`, `jsonl`)",
        '`[[loggers]]` tables, each `name = "..."` plus options '
        "([Loggers](components.md#loggers)); one name stands for a list of one.",
    ),
    "checkpoint": (
        "string or table",
        "optional (`safetensors`)",
        "A checkpoint format name or table "
        "([Checkpoint formats](components.md#checkpoint-formats)).",
    ),
    "store": (
        "string or table",
        "optional (`directory`)",
        "A checkpoint store name or table ([Checkpoint stores](components.md#checkpoint-stores)).",
    ),
    "plugins": (
        "array of strings or tables",
        "optional",
        '`[[plugins]]` tables: `name = "..."` plus options for an installed plugin '
        '([Plugins](components.md#plugins)), or `import = "package.module:Class"` plus the '
        "class's options; a string is a name or an import path.",
    ),
}


def run_file_keys() -> set[str]:
    from treadle.plugins.commands import runfile

    return set(runfile.RUN_KEYS)


def run_file_schema() -> str:
    accepted = run_file_keys()
    missing, stale = sorted(accepted - set(RUN_KEYS)), sorted(set(RUN_KEYS) - accepted)
    if missing or stale:
        raise DocsError(
            "docs/_hooks/gen_reference.py RUN_KEYS must describe every key a run file accepts: "
            f"undescribed {missing}, not accepted {stale}"
        )
    lines = [
        "# Run-file schema",
        "",
        "A run file is the TOML form of `treadle.Run(...)`, started with `treadle run FILE` "
        "(or `treadle launch --nproc-per-node N FILE`). These are all the top-level keys it "
        "accepts (generated from `treadle.plugins.commands.runfile` when the site is built); "
        "any other key is an error naming the known ones. Import paths are resolved with the "
        "run file's folder and the current directory on `sys.path`. Tutorial: "
        "[a run file](../tutorials/run-file.md).",
        "",
        "| key | TOML type | required / default | what it is |",
        "|---|---|---|---|",
    ]
    for key in sorted(accepted, key=list(RUN_KEYS).index):
        kind, required, text = RUN_KEYS[key]
        lines.append(f"| `{key}` | {kind} | {required} | {text} |")
    lines += [
        "",
        "A table's options are checked against the component's signature before anything is "
        "built: an unknown option is an error listing the accepted ones.",
        "",
        "```toml",
        'model = "toy:build_model"            # toy.py beside the run file',
        'train_data = { factory = "toy:build_data", rows = 256 }',
        "",
        "[config]",
        "max_steps = 100",
        "batch_size = 16",
        'output_dir = "runs/toy"',
        "",
        "[optimizer]",
        'name = "adamw"',
        "lr = 1e-3",
        "",
        "[[loggers]]",
        'name = "jsonl"',
        "",
        "[[plugins]]",
        'name = "early-stopping"',
        "patience = 3",
        "```",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ directory


def first_party_plugins() -> str:
    lines = []
    for kind, points in entry_points().items():
        title, _ = KIND_TITLES[kind]
        lines += ["", f"### {title}", "", "| name | what it does |", "|---|---|"]
        for point in points:
            obj = point.load()
            summary = split_sections(_dedent_docstring(obj))[0].split("\n\n")[0]
            link = f"reference/components.md#{kind}-{_anchor(point.name)}"
            lines.append(f"| [`{point.name}`]({link}) | {_cell(summary)} |")
    return "\n".join(lines).strip() + "\n"


def contrib_distributions(root: Path = ROOT / "contrib") -> list[dict[str, Any]]:
    found = []
    for path in sorted(root.glob("*/pyproject.toml")):
        project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
        groups = project.get("entry-points", {})
        found.append(
            {
                "name": project["name"],
                "version": project.get("version", "?"),
                "description": project.get("description", ""),
                "folder": path.parent.relative_to(ROOT).as_posix(),
                "entry_points": {
                    group.removeprefix("treadle."): dict(points)
                    for group, points in groups.items()
                    if group.startswith("treadle.")
                },
            }
        )
    return found


def contrib_plugins() -> str:
    lines = []
    for dist in contrib_distributions():
        lines += [
            "",
            f"### {dist['name']} {dist['version']}",
            "",
            f"{dist['description']} Source: [`{dist['folder']}`]({SOURCE_URL}/{dist['folder']}).",
            "",
            "| kind | name | entry point |",
            "|---|---|---|",
        ]
        for kind, points in dist["entry_points"].items():
            for name, value in points.items():
                lines.append(f"| {kind} | `{name}` | `{value}` |")
    return "\n".join(lines).strip() + "\n"


# ------------------------------------------------------------------------------ mkdocs hooks

API_PAGE = """# Python API

The public names of `treadle`, rendered from their docstrings by mkdocstrings.

::: treadle.Run

::: treadle.Config
    options:
      show_if_no_docstring: false
      members: [from_dict]

::: treadle.Strategy

::: treadle.Precision

::: treadle.Logger

::: treadle.CheckpointFormat

::: treadle.LossSum

::: treadle.State

::: treadle.seed_everything

::: treadle.load_weights

::: treadle.errors
"""

GENERATED_PAGES: dict[str, Callable[[], str]] = {
    "reference/hooks.md": hook_reference,
    "reference/components.md": component_reference,
    "reference/config.md": config_reference,
    "reference/run-file.md": run_file_schema,
    "reference/api.md": lambda: API_PAGE,
}

MARKERS: dict[str, Callable[[], str]] = {
    "loop": loop_pseudocode,
    "first-party-plugins": first_party_plugins,
    "contrib-plugins": contrib_plugins,
}
_MARKER = re.compile(r"^<!-- generated: ([\w-]+) -->$", flags=re.M)


def expand_markers(markdown: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in MARKERS:
            raise DocsError(f"unknown generated section {name!r}; known: {sorted(MARKERS)}")
        return MARKERS[name]()

    return _MARKER.sub(replace, markdown)


# a link from a page to a file of the repository outside docs/ (../core/x.py): on GitHub it
# works as it is; on the site it becomes a link to the file on GitHub
_OUTSIDE_LINK = re.compile(
    r"\]\(((?:\.\./)+)((?:core|plugins|tests|contrib|examples|\.ci)/[^)#\s]*|README\.md|pyproject\.toml|noxfile\.py|constraints\.txt)(#[^)\s]*)?\)"
)


def link_outside_docs(markdown: str, page_path: str) -> str:
    depth = page_path.count("/") + 1  # ../ steps from the page's folder to the repository root

    def replace(match: re.Match[str]) -> str:
        if len(match.group(1)) // 3 != depth:
            return match.group(0)
        return f"]({SOURCE_URL}/{match.group(2)}{match.group(3) or ''})"

    return _OUTSIDE_LINK.sub(replace, markdown)


def iter_generated() -> Iterator[tuple[str, str]]:
    for path, make in GENERATED_PAGES.items():
        yield path, make()


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    try:
        generated = list(iter_generated())
    except DocsError as exc:  # a clean "Error: ..." line instead of a traceback
        raise PluginError(f"docs/_hooks/gen_reference.py: {exc}") from exc
    for path, content in generated:
        existing = files.get_file_from_path(path)
        if existing is not None:
            raise DocsError(f"docs/{path} is generated at build time; delete the committed copy")
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    from mkdocs.exceptions import PluginError

    try:
        return link_outside_docs(expand_markers(markdown), page.file.src_uri)
    except DocsError as exc:
        raise PluginError(f"docs/{page.file.src_uri}: {exc}") from exc
