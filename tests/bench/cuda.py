"""The GPU variant: GPT-2 124M in bf16-mixed on one device, as tokens/s and model FLOPs utilisation.

``python -m tests.bench --cuda`` (``--quick`` for a short run; ``--batch-size`` to skip the
search; ``--peak-tflops`` for a device the table below does not know). Same method as the CPU
suite: fresh processes, contenders alternating within each round, warm-up steps discarded,
ratios against the bare loop of the same round. The batch size fills the device: a first
process (bare loop) tries decreasing sizes and keeps the largest whose peak memory stays under
90% of the device; every contender then uses it.

Throughput is exact: the step clock synchronises the device at the two ends of the measured
interval (and nowhere else). Model FLOPs per token follow the PaLM paper (appendix B) as
nanoGPT's ``estimate_mfu`` does: ``6 N + 12 L H Q T`` with ``N`` the parameters without the
position embeddings, ``L`` layers, ``H`` heads, ``Q`` the head size and ``T`` the sequence length.
On a GPU the weights are not bit-for-bit reproducible (atomics in the backward), so final
losses are reported, not compared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.bench import runner
from tests.bench.workloads import WORKLOADS

CONTENDERS = ("bare", "treadle", "hf", "lightning")

#: dense bf16 tensor-core peak, TFLOP/s, by a substring of ``torch.cuda.get_device_name()``;
#: the first match wins, so more specific names come first
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)

BATCH_CANDIDATES = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def flops_per_token(seq_len: int) -> float:
    """``6 N + 12 L H Q T`` for ``GPT2Config()`` (GPT-2 124M)."""
    from transformers import GPT2Config

    c = GPT2Config()
    # parameters: tied token embedding, position embedding, per layer (2 LayerNorms, attention
    # qkv + projection, MLP up + down), final LayerNorm
    # (position embeddings are not counted: nanoGPT's non_embedding convention)
    d, v, layers = c.n_embd, c.vocab_size, c.n_layer
    per_layer = (
        2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    )
    params_without_positions = v * d + layers * per_layer + 2 * d
    return 6 * params_without_positions + 12 * layers * c.n_head * (d // c.n_head) * seq_len


def main(args: argparse.Namespace) -> int:
    workload = WORKLOADS["gpt2-124m"]
    device = args.device or "cuda"
    seq_len = args.seq_len or workload.seq_len
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (workload.quick_steps if args.quick else workload.steps)
    warmup = args.warmup or (workload.quick_warmup if args.quick else workload.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recorder = runner.Recorder(out / "raw-cuda.jsonl")
    env = runner.child_env(out / "pycache", cuda=True)
    started, load_start = time.perf_counter(), os.getloadavg()
    notes: list[str] = []
    contenders = ["bare"]
    for name in CONTENDERS[1:]:
        lacking = runner.missing(runner.REQUIRES.get(name, ()))
        if lacking:
            notes.append(f"{name} skipped: {', '.join(lacking)} not installed")
        else:
            contenders.append(name)
    batch_size = args.batch_size
    if batch_size is None:
        probe = runner.spawn(
            {"kind": "probe", "workload": workload.name, "device": device, "seq_len": seq_len,
             "candidates": list(BATCH_CANDIDATES)},
            env,
            args.timeout,
        )  # fmt: skip
        if "error" in probe:
            print(f"batch size search failed: {probe['error']}", file=sys.stderr)
            return 1
        batch_size = int(probe["batch_size"])
        notes.append(
            f"batch size {batch_size}: the largest of {list(BATCH_CANDIDATES)} whose bare-loop "
            f"peak memory ({probe['peak_gb']:.1f} GB) stays under 90% of the device "
            f"({probe['total_gb']:.1f} GB)"
        )

    def spec(contender: str, warm_up: bool = False) -> dict[str, Any]:
        return {
            "kind": "train",
            "workload": workload.name,
            "contender": contender,
            "device": device,
            "precision": "bf16-mixed",
            "warmup": 1 if warm_up else warmup,
            "steps": 2 if warm_up else steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
        }

    records = runner.alternate(workload.name, contenders, rounds, spec, env, args.timeout, recorder)
    tokens = batch_size * seq_len
    rows = runner.summarise_training(workload.name, records, contenders, batch_size, tokens)
    device_name = next((r.get("gpu_name") for r in records if r.get("gpu_name")), None) or device
    peak = peak_flops(device_name, args.peak_tflops)
    per_token = flops_per_token(seq_len)
    for row in rows:
        if row.values and peak:
            row.values["mfu"] = row.values["tokens_per_s"] * per_token / peak
    if peak is None:
        notes.append(f"MFU not computed: peak FLOP/s of {device_name!r} unknown (--peak-tflops)")
    settings = {
        "mode": "quick" if args.quick else "full",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rounds": rounds,
        "load": {"start": runner._load(load_start), "end": runner._load(os.getloadavg())},
        "wall_s": time.perf_counter() - started,
        "device": device_name,
        "peak_tflops": peak / 1e12 if peak else None,
        "flops_per_token": per_token,
        "batch_size": batch_size,
        "seq_len": seq_len,
    }
    notes += [
        f"{workload.description}; batch {batch_size} x {seq_len} tokens; {warmup} warm-up + "
        f"{steps} measured steps per process",
        f"model FLOPs per token {per_token / 1e9:.3f} GFLOP (6N + 12LHQT); MFU = tokens/s x that "
        f"/ peak ({settings['peak_tflops'] or '?'} TFLOP/s dense bf16)",
    ] + [
        f"{r.contender}: {len(r.errors)} process(es) failed: {runner._short(r.errors)}"
        for r in rows
        if r.errors
    ]
    table = markdown(rows, settings, notes)
    runner.write_csv(out / "bench-cuda.csv", rows, settings)
    (out / "bench-cuda.md").write_text(table)
    print(f"\nwrote {out / 'bench-cuda.csv'}, {out / 'bench-cuda.md'}\n", file=sys.stderr)
    print(table)
    return 1 if any(r.errors for r in rows) else 0


def markdown(rows: Sequence[runner.Row], settings: Mapping[str, Any], notes: Sequence[str]) -> str:
    fmt = runner._fmt
    lines = [
        f"### treadle GPU benchmark ({settings['mode']}, {settings['date']})",
        "",
        f"{settings['device']}; {settings['rounds']} rounds, contenders alternating; wall time "
        f"{settings['wall_s']:.0f} s.",
        "",
        "| contender | tokens/s | throughput / bare | MFU | step ms (host median) "
        "| first step s | GPU peak GB | final loss |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        v = r.values
        if not v:
            lines.append(f"| {r.contender} | failed: {runner._short(r.errors)} |" + " |" * 6)
            continue
        mfu = f"{v['mfu'] * 100:.1f}%" if v.get("mfu") is not None else "—"
        lines.append(
            f"| {r.contender} | {fmt(v['tokens_per_s'], 0)} | {fmt(v['throughput_ratio'], 3)} | "
            f"{mfu} | {fmt(v['step_ms_median'], 1)} | {fmt(v['first_step_s'])} | "
            f"{fmt(v['gpu_peak_mem_gb'], 1)} | {v['final_loss']:.4f} |"
        )
    lines.append("")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
