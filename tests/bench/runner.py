"""The suite: alternate the contenders in fresh processes, then summarise as CSV and Markdown.

For each workload the contenders run one after another in a round (bare, treadle, ...), and
the round is repeated: a change of machine load during the suite touches every contender
alike, and each contender is compared with the bare loop of its own round. Every process is
single-threaded (``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``), discards its warm-up
steps, and reports every later step's time. The summary gives, per contender: the median and
interquartile range of the step time (all rounds' steps pooled), the throughput, the time from
process start to the first optimizer step, the peak RSS, the CPU time, and the ratios to the
bare loop (the median over rounds of the per-round ratio).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.worker import MARK

ROOT = Path(__file__).resolve().parents[2]

#: the contenders of the CPU suite, in the order they run within a round
CONTENDERS = ("bare", "treadle", "treadle-default", "hf", "lightning")
REQUIRES = {"hf": ("transformers", "accelerate"), "lightning": ("lightning",)}
TREADLE = ("treadle", "treadle-default")

#: the startup workload: (name, statement timed in a fresh process after ``import torch``)
IMPORTS = (
    ("torch", None),
    ("treadle", "import treadle"),
    ("hf", "from transformers import Trainer"),
    ("lightning", "import lightning.pytorch"),
)


# ------------------------------------------------------------------ processes


def child_env(pycache: Path, cuda: bool = False) -> dict[str, str]:
    """The environment of every worker: one thread, offline, the same hash seed.

    Byte code is cached under ``pycache`` (``PYTHONPYCACHEPREFIX``) even where the environment
    says not to write it: an installed package has its ``.pyc`` files, and a source file
    compiled again at every import would be charged to the import time of whoever imports it.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache.resolve())
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONHASHSEED="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU suite stays on the CPU on a GPU machine
    return env


def spawn(spec: Mapping[str, Any], env: Mapping[str, str], timeout: float) -> dict[str, Any]:
    """Run one worker; its result, or ``{"error": ...}`` with the end of its stderr."""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "tests.bench.worker", json.dumps(spec)],
                cwd=ROOT,
                env={**env, "TREADLE_BENCH_T0": repr(time.time())},
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                timeout=timeout,  # run() kills and reaps the child when it expires
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        process_s = time.perf_counter() - start
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
        if proc.returncode != 0 or not lines:
            stderr.seek(0)
            tail = stderr.read().strip().splitlines()[-15:]
            return {"error": f"exit code {proc.returncode}: " + "\n".join(tail)}
    result: dict[str, Any] = json.loads(lines[-1][len(MARK) :])
    result["process_s"] = process_s
    return result


def missing(modules: Iterable[str]) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


# ------------------------------------------------------------------ statistics


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3); a single value gives itself three times."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class Row:
    """One contender on one workload, summarised over its rounds."""

    workload: str
    contender: str
    rounds: int = 0
    errors: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


def summarise_training(
    workload: str,
    records: list[dict[str, Any]],
    contenders: Sequence[str],
    samples_per_step: int,
    tokens_per_step: int,
) -> list[Row]:
    """Pool each contender's rounds; ratios are per round against that round's bare loop."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_round.setdefault(record["round"], {})[record["contender"]] = record
    rows = []
    for contender in contenders:
        row = Row(workload, contender)
        good = []
        for results in by_round.values():
            result = results.get(contender)
            if result is None:
                continue
            if "error" in result:
                row.errors.append(result["error"])
            else:
                good.append(result)
        row.rounds = len(good)
        if good:
            row.values = _training_values(
                contender, good, by_round, samples_per_step, tokens_per_step
            )
        rows.append(row)
    return rows


def _training_values(
    contender: str,
    good: list[dict[str, Any]],
    by_round: Mapping[int, Mapping[str, dict[str, Any]]],
    samples_per_step: int,
    tokens_per_step: int,
) -> dict[str, Any]:
    steps = [t for r in good for t in r["step_times_s"]]
    q1, q2, q3 = quartiles(steps)
    measured_steps = sum(len(r["step_times_s"]) for r in good)
    steps_per_s = measured_steps / sum(r["measured_s"] for r in good)
    step_ratio, speed, cpu_ratio, ttfs_ratio, rss_delta, same = [], [], [], [], [], []
    for r in good:
        base = by_round[r["round"]].get("bare")
        if base is None or "error" in base:
            continue
        step_ratio.append(
            statistics.median(r["step_times_s"]) / statistics.median(base["step_times_s"])
        )
        speed.append(base["measured_s"] / r["measured_s"])
        cpu_ratio.append(r["measured_cpu_s"] / base["measured_cpu_s"])
        ttfs_ratio.append(r["first_step_s"] / base["first_step_s"])
        rss_delta.append(r["peak_rss_mb"] - base["peak_rss_mb"])
        same.append(
            r["final_loss"] == base["final_loss"]
            and r["weights_checksum"] == base["weights_checksum"]
        )
    return {
        "step_ms_median": q2 * 1e3,
        "step_ms_q1": q1 * 1e3,
        "step_ms_q3": q3 * 1e3,
        "steps_per_s": steps_per_s,
        "samples_per_s": steps_per_s * samples_per_step,
        "tokens_per_s": steps_per_s * tokens_per_step if tokens_per_step else None,
        "step_ratio": median(step_ratio),
        "throughput_ratio": median(speed),
        "cpu_per_step_ms": sum(r["measured_cpu_s"] for r in good) / measured_steps * 1e3,
        "cpu_ratio": median(cpu_ratio),
        "first_step_s": median(r["first_step_s"] for r in good),
        "first_step_ratio": median(ttfs_ratio),
        "peak_rss_mb": median(r["peak_rss_mb"] for r in good),
        "rss_delta_mb": median(rss_delta),
        "cpu_s": median(r["cpu_user_s"] + r["cpu_sys_s"] for r in good),
        "process_s": median(r["process_s"] for r in good),
        "load_1min": median(r["load_before"][0] for r in good),
        "final_loss": good[-1]["final_loss"],
        "same_as_bare": (all(same) if same else None) if contender != "bare" else None,
        "gpu_peak_mem_gb": median(r.get("gpu_peak_mem_gb") for r in good),
    }


def summarise_imports(records: list[dict[str, Any]], names: Sequence[str]) -> list[Row]:
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_round.setdefault(record["round"], {})[record["contender"]] = record
    rows = []
    for name in names:
        row = Row("startup", name)
        good = [res[name] for res in by_round.values() if name in res and "error" not in res[name]]
        row.errors = [
            res[name]["error"] for res in by_round.values() if "error" in res.get(name, {})
        ]
        row.rounds = len(good)
        if good:
            q1, q2, q3 = quartiles([r["import_s"] for r in good])
            # the second import alone (none for the ``import torch`` row)
            extra = [x * 1e3 for x in quartiles([r["over_first_s"] for r in good])]
            e1, e2, e3 = extra if dict(IMPORTS)[name] else (None, None, None)
            row.values = {
                "import_ms_median": q2 * 1e3,
                "import_ms_q1": q1 * 1e3,
                "import_ms_q3": q3 * 1e3,
                "over_torch_ms": e2,
                "over_torch_ms_q1": e1,
                "over_torch_ms_q3": e3,
                "peak_rss_mb": median(r["peak_rss_mb"] for r in good),
                "cpu_s": median(r["cpu_user_s"] + r["cpu_sys_s"] for r in good),
            }
        rows.append(row)
    return rows


# ------------------------------------------------------------------ targets


@dataclass
class Target:
    name: str
    measured: float | None
    limit: float
    at_most: bool  # the measured value must be <= limit (else >=)
    unit: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.limit if self.at_most else self.measured >= self.limit


def targets(rows: Sequence[Row]) -> list[Target]:
    """The kernel's performance targets (docs/performance.md), checked against this run."""
    found = {(r.workload, r.contender): r.values for r in rows}
    out = []

    def value(workload: str, contender: str, key: str) -> float | None:
        return found.get((workload, contender), {}).get(key)

    for contender, limit in (("treadle", 1.03), ("treadle-default", 1.05)):
        out.append(
            Target(
                f"mlp step time / bare, {contender}",
                value("mlp", contender, "step_ratio"),
                limit,
                True,
                "x",
            )
        )
    for workload in ("gpt2", "bert"):
        for contender in TREADLE:
            out.append(
                Target(
                    f"{workload} throughput / bare, {contender}",
                    value(workload, contender, "throughput_ratio"),
                    0.99,
                    False,
                    "x",
                )
            )
    out.append(
        Target(
            "import treadle after import torch",
            value("startup", "treadle", "over_torch_ms"),
            50.0,
            True,
            " ms",
        )
    )
    for workload in ("mlp", "gpt2", "bert"):
        for contender in TREADLE:
            out.append(
                Target(
                    f"{workload} time to first step / bare, {contender}",
                    value(workload, contender, "first_step_ratio"),
                    1.2,
                    True,
                    "x",
                )
            )
    for workload in ("mlp", "gpt2", "bert"):
        for contender in TREADLE:
            out.append(
                Target(
                    f"{workload} peak RSS - bare, {contender}",
                    value(workload, contender, "rss_delta_mb"),
                    30.0,
                    True,
                    " MB",
                )
            )
    return [t for t in out if t.measured is not None]


# ------------------------------------------------------------------ output


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for dist in ("torch", "treadle", "transformers", "accelerate", "lightning", "pluggy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def markdown(
    rows: Sequence[Row],
    env: Mapping[str, Any],
    settings: Mapping[str, Any],
    notes: Sequence[str],
) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    load = settings["load"]
    lines = [
        f"### treadle benchmark ({settings['mode']}, {settings['date']})",
        "",
        f"{env['cpu']}, {env['cores']} cores, Python {env['python']}; {versions}.  ",
        f"One thread per process; {settings['rounds']} rounds, contenders alternating within "
        f"each round. Load average (1, 5, 15 min) at start {load['start']}, at end "
        f"{load['end']}; CPU time of all workers {settings['cpu_s']:.0f} s, wall time "
        f"{settings['wall_s']:.0f} s.",
        "",
    ]
    training = [r for r in rows if r.workload != "startup"]
    if training:
        lines += [
            "| workload | contender | step ms (median) | IQR ms | samples/s | step time / bare "
            "| throughput / bare | CPU time / bare | first step s | first step / bare "
            "| peak RSS MB | RSS - bare MB | final loss | same weights as bare |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|",
        ]
        for r in training:
            v = r.values
            if not v:
                failed = f"| {r.workload} | {r.contender} | failed: {_short(r.errors)} |"
                lines.append(failed + " |" * 11)
                continue
            lines.append(
                f"| {r.workload} | {r.contender} | {_fmt(v['step_ms_median'], 3)} | "
                f"{_fmt(v['step_ms_q1'], 3)}..{_fmt(v['step_ms_q3'], 3)} | "
                f"{_fmt(v['samples_per_s'], 0)} | {_fmt(v['step_ratio'], 3)} | "
                f"{_fmt(v['throughput_ratio'], 3)} | {_fmt(v['cpu_ratio'], 3)} | "
                f"{_fmt(v['first_step_s'])} | {_fmt(v['first_step_ratio'])} | "
                f"{_fmt(v['peak_rss_mb'], 0)} | {_fmt(v['rss_delta_mb'], 1)} | "
                f"{v['final_loss']:.6f} | {_same(r.contender, v['same_as_bare'])} |"
            )
        lines.append("")
    startup = [r for r in rows if r.workload == "startup"]
    if startup:
        lines += [
            "| fresh process: `import torch`, then | total ms (median) | IQR ms "
            "| the second import alone: median ms | IQR ms | peak RSS MB |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for r in startup:
            v = r.values
            if not v:
                lines.append(f"| {r.contender} | failed: {_short(r.errors)} | | | |")
                continue
            lines.append(
                f"| `{dict(IMPORTS)[r.contender] or 'import torch'}` | {_fmt(v['import_ms_median'], 0)} | "
                f"{_fmt(v['import_ms_q1'], 0)}..{_fmt(v['import_ms_q3'], 0)} | "
                f"{_fmt(v['over_torch_ms'], 1)} | "
                f"{_range(v['over_torch_ms_q1'], v['over_torch_ms_q3'], 1)} | "
                f"{_fmt(v['peak_rss_mb'], 0)} |"
            )
        lines.append("")
    checked = targets(rows)
    if checked:
        lines += ["| target | measured | limit | met |", "|---|--:|--:|:-:|"]
        for t in checked:
            sign = "≤" if t.at_most else "≥"
            lines.append(
                f"| {t.name} | {_fmt(t.measured, 3)}{t.unit} | {sign} {t.limit:g}{t.unit} | "
                f"{_fmt(t.met)} |"
            )
        lines.append("")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def _range(low: float | None, high: float | None, digits: int) -> str:
    return "—" if low is None or high is None else f"{_fmt(low, digits)}..{_fmt(high, digits)}"


def _same(contender: str, same: bool | None) -> str:
    """Asserted for treadle (it must do the bare loop's arithmetic); informative for peers."""
    if same is None or contender in TREADLE:
        return _fmt(same)
    return "yes" if same else "no"


def _short(errors: Sequence[str]) -> str:
    return errors[0].splitlines()[-1][:80] if errors else "?"


def write_csv(path: Path, rows: Sequence[Row], settings: Mapping[str, Any]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.values if k not in keys]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mode", "date", "workload", "contender", "rounds", "errors", *keys])
        for r in rows:
            writer.writerow(
                [
                    settings["mode"],
                    settings["date"],
                    r.workload,
                    r.contender,
                    r.rounds,
                    len(r.errors),
                ]
                + [r.values.get(k) for k in keys]
            )


# ------------------------------------------------------------------ the command


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="treadle against the bare PyTorch loop, the HF Trainer and Lightning.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps and rounds: indicative only"
    )
    parser.add_argument("--rounds", type=int, help="rounds per workload (default 10, quick 3)")
    parser.add_argument(
        "--workloads",
        default="startup,mlp,gpt2,bert",
        help="comma-separated, from: startup, mlp, gpt2, bert (default: all)",
    )
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated, from: {', '.join(CONTENDERS)} (bare is always run)",
    )
    parser.add_argument(
        "--steps", type=int, help="measured steps per process (overrides the workload's)"
    )
    parser.add_argument(
        "--warmup", type=int, help="warm-up steps per process (overrides the workload's)"
    )
    parser.add_argument(
        "--out", default="runs/bench", help="directory for bench.csv, bench.md, raw.jsonl"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per process")
    parser.add_argument(
        "--cuda", action="store_true", help="the GPU variant instead (tests/bench/cuda.py)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="--cuda: batch size (default: fill the device)"
    )
    parser.add_argument("--peak-tflops", type=float, help="--cuda: the device's dense bf16 peak")
    parser.add_argument("--device", help="--cuda: the device (default cuda; cpu for a smoke test)")
    parser.add_argument("--seq-len", type=int, help="--cuda: tokens per sample (default 1024)")
    return parser.parse_args(argv)


def import_spec(name: str, warm_up: bool = False) -> dict[str, Any]:
    statement = dict(IMPORTS)[name]
    return {"kind": "import", "statements": ["import torch"] + ([statement] if statement else [])}


class Recorder:
    """Appends every process's result to ``raw.jsonl`` as it arrives (a crash keeps them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def add(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def alternate(
    workload: str,
    names: Sequence[str],
    rounds: int,
    make_spec: Any,
    env: Mapping[str, str],
    timeout: float,
    recorder: Recorder,
) -> list[dict[str, Any]]:
    """Run ``names`` in turn, ``rounds`` times; one fresh process each.

    A first, untimed round (``make_spec(name, warm_up=True)``) fills the byte-code and file
    caches, so that the first timed process of each contender starts as the others do. Each
    round starts one contender later than the last (A B C, B C A, C A B, ...), so that no
    contender always runs first, or always right after the same other one.
    """
    for name in names:
        result = spawn(make_spec(name, warm_up=True), env, timeout)
        print(f"[{workload} warm-up] {name}: {_progress(result)}", file=sys.stderr, flush=True)
    records = []
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in [*names[shift:], *names[:shift]]:
            result = spawn(make_spec(name), env, timeout)
            record = {"workload": workload, "contender": name, "round": round_, **result}
            recorder.add(record)
            records.append(record)
            print(
                f"[{workload} {round_ + 1}/{rounds}] {name}: {_progress(result)}",
                file=sys.stderr,
                flush=True,
            )
    return records


def _progress(result: Mapping[str, Any]) -> str:
    if "error" in result:
        return "FAILED " + str(result["error"]).splitlines()[-1][:200]
    if "import_s" in result:
        return f"import {result['import_s'] * 1e3:.0f} ms"
    times = result["step_times_s"]
    return (
        f"{statistics.median(times) * 1e3:.3f} ms/step (median of {len(times)}), "
        f"first step at {result['first_step_s']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MB"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cuda:
        from tests.bench import cuda

        return cuda.main(args)
    from tests.bench.workloads import WORKLOADS

    started, load_start = time.perf_counter(), os.getloadavg()
    rounds = args.rounds or (3 if args.quick else 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(out / "raw.jsonl")
    env = child_env(out / "pycache")
    notes: list[str] = []
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    contenders = ["bare"]
    for name in CONTENDERS[1:]:
        if name not in wanted:
            continue
        lacking = missing(REQUIRES.get(name, ()))
        if lacking:
            notes.append(
                f"{name} skipped: {', '.join(lacking)} not installed (`pip install -e .[bench]`)"
            )
        else:
            contenders.append(name)
    rows: list[Row] = []
    records: list[dict[str, Any]] = []
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        if name == "startup":
            names = [n for n, _ in IMPORTS if n in ("torch", "treadle") or n in contenders]
            got = alternate("startup", names, rounds, import_spec, env, args.timeout, recorder)
            records += got
            rows += summarise_imports(got, names)
            continue
        workload = WORKLOADS.get(name)
        if workload is None or name == "gpt2-124m":
            raise SystemExit(f"unknown workload {name!r}; choose from startup, mlp, gpt2, bert")
        lacking = missing(workload.requires)
        if lacking:
            notes.append(f"{name} skipped: {', '.join(lacking)} not installed")
            continue
        steps = args.steps or (workload.quick_steps if args.quick else workload.steps)
        warmup = args.warmup or (workload.quick_warmup if args.quick else workload.warmup)

        def spec(
            contender: str,
            warm_up: bool = False,
            workload: Any = workload,
            steps: int = steps,
            warmup: int = warmup,
        ) -> dict[str, Any]:
            return {
                "kind": "train",
                "workload": workload.name,
                "contender": contender,
                "device": "cpu",
                "warmup": 1 if warm_up else warmup,
                "steps": 2 if warm_up else steps,
                "batch_size": workload.batch_size,
                "seq_len": workload.seq_len,
            }

        got = alternate(name, contenders, rounds, spec, env, args.timeout, recorder)
        records += got
        rows += summarise_training(
            name, got, contenders, workload.batch_size, workload.tokens_per_batch()
        )
        notes.append(
            f"{name}: {workload.description}; {warmup} warm-up + {steps} measured steps per process"
        )
    failed = [r for r in rows if r.errors]
    differs = [r for r in rows if r.contender in TREADLE and r.values.get("same_as_bare") is False]
    for r in failed:
        notes.append(
            f"{r.workload}/{r.contender}: {len(r.errors)} process(es) failed: {_short(r.errors)}"
        )
    settings = {
        "mode": "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rounds": rounds,
        "load": {"start": _load(load_start), "end": _load(os.getloadavg())},
        "cpu_s": sum(r.get("cpu_user_s", 0) + r.get("cpu_sys_s", 0) for r in records),
        "wall_s": time.perf_counter() - started,
    }
    notes += [
        "step time: median and interquartile range of every measured step of every round; "
        "ratios: median over rounds of (contender / the same round's bare loop); "
        "throughput / bare > 1 is faster than bare, step time / bare < 1 likewise.",
        "same weights as bare: final loss and weight checksum equal to the bare loop's, bit for bit.",
    ]
    table = markdown(rows, environment(), settings, notes)
    write_csv(out / "bench.csv", rows, settings)
    (out / "bench.md").write_text(table)
    print(
        f"\nwrote {out / 'bench.csv'}, {out / 'bench.md'}, {out / 'raw.jsonl'}\n", file=sys.stderr
    )
    print(table)
    # the suite's one assertion: treadle does the bare loop's arithmetic, exactly
    if differs:
        which = ", ".join(f"{r.workload}/{r.contender}" for r in differs)
        print(f"FAILED: {which} did not end with the bare loop's weights", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _load(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)
