"""The result of a throughput run: its JSON (file name, contents) and the printed tables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from bench.flops import FlopModel
from bench.throughput.device import device_name
from bench.throughput.engine import ROOT


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def format_table(result: dict) -> str:
    """The printed summary: one row per arm, then speedup and the extras."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    rows = [("arm", "tokens/s", "samples/s", "s/step", "MFU(peak)", "MFU(matmul)", "TFLOP/s", "peak mem GB", "padding")]
    for arm in [a for a in result["arms"].values() if "failed" not in a]:
        rows.append((arm["arm"], f"{arm['tokens_per_s']:.1f}", f"{arm['samples_per_s']:.2f}", f"{arm['step_time_s_median']:.3f}",
                     pct(arm["mfu"]), pct(arm["mfu_vs_matmul"]), f"{arm['achieved_tflops']:.3f}", f"{arm['peak_mem_gb']:.2f}",
                     pct(arm["padding_fraction"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"device: {result['device']}  |  {result['settings']['label']}"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines += [f"arm {a['arm']} failed: {a['failed']}" for a in result["arms"].values() if "failed" in a]
    speedup = result["speedup_vs_baseline"]
    peak = result["peak_tflops"]
    lines.append(f"speedup vs baseline: {'n/a' if speedup is None else f'{speedup:.2f}x'}   "
                 f"matmul rate: {result['matmul_tflops']:.2f} TFLOP/s   peak: {'n/a' if peak is None else f'{peak:.0f} TFLOP/s'}")
    if result.get("generation"):
        g = result["generation"]
        lines.append(f"generation: {g['regions_per_s']:.2f} regions/s (batch {g['batch_size']}, {g['new_tokens_per_region']} new tokens each)")
    if result.get("max_micro_batch"):
        lines.append(f"largest packed micro-batch that fits: {result['max_micro_batch']['max_micro_batch']} samples")
    return "\n".join(lines)


def results_path(args, result: dict) -> Path:
    if args.out:
        return args.out
    kind = "cpu" if result["device"].startswith("CPU") else slug(result["device"])
    name = f"{_dt.date.today().isoformat()}_{kind}{'_' + slug(args.tag) if args.tag else ''}.json"
    return args.out_dir / name


def summary_table(results: List[dict]) -> str:
    """One row per results file: the figures the throughput targets are stated in."""

    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    rows = [("setting", "tokens/s", "baseline tok/s", "speedup", "MFU", "MFU(matmul)", "peak GB", "steps/s", "regions/s", "max mb")]
    for r in results:
        gen, search = r.get("generation") or {}, r.get("max_micro_batch") or {}
        tag = r["settings"].get("tag")
        rows.append((f"{tag}: {r['settings']['label']}" if tag else r["settings"]["label"], num(r["tokens_per_s"], ".1f"), num(r["baseline_tokens_per_s"], ".1f"),
                     num(r["speedup_vs_baseline"], ".2f"), num(r["mfu"], ".3f"), num(r["mfu_vs_matmul"], ".3f"),
                     num(r["peak_mem_gb"], ".1f"), num(r["steps_per_s"], ".3f"), num(gen.get("regions_per_s"), ".1f"),
                     num(search.get("max_micro_batch"), "d")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    devices = sorted({r["device"] for r in results})
    return "\n".join([f"device: {', '.join(devices)}"] + ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                                                  for i, (c, w) in enumerate(zip(row, widths))) for row in rows])


def build_result(args, *, config, device: torch.device, attn: str, arms: Dict[str, dict], stats: List[List[dict]],
                 items: List[dict], flop_model: FlopModel, peak: Optional[float], matmul_rate: float, matmul_n: int,
                 pack_len: int, counts: dict, generation: Optional[dict], search: Optional[dict]) -> dict:
    """The results JSON of one run: the headline figures of the fastest packed arm, every arm, the settings."""
    on_cpu = device.type != "cuda"
    # The headline "ours" is the fastest packed arm that ran; which one is recorded.
    packed_arms = [a for k, a in arms.items() if k.startswith("ours") and "failed" not in a]
    ours, base = max(packed_arms, key=lambda a: a["tokens_per_s"]), arms.get("baseline")
    mode = "full-FT" if args.full_ft else f"LoRA r={args.lora_r}"
    label = (f"{'tiny' if args.tiny else '7B'} {mode} ZeRO-{args.zero} {args.precision} "
             f"{config.image_size}px micro-batch {args.micro_batch}{' grad-ckpt' if args.gradient_checkpointing else ''}")
    per_step = flop_model.batch_flops([s for step in stats[args.warmup :] for s in step])
    result = {
        "device": device_name(device),
        "ours_arm": ours["arm"],
        "tokens_per_s": ours["tokens_per_s"],
        "mfu": ours["mfu"],
        "mfu_vs_matmul": ours["mfu_vs_matmul"],
        "peak_mem_gb": ours["peak_mem_gb"],
        "baseline_tokens_per_s": base["tokens_per_s"] if base else None,
        "baseline_mfu": base["mfu"] if base else None,
        "baseline_mfu_vs_matmul": base["mfu_vs_matmul"] if base else None,
        "baseline_peak_mem_gb": base["peak_mem_gb"] if base else None,
        "speedup_vs_baseline": ours["tokens_per_s"] / base["tokens_per_s"] if base else None,
        "steps_per_s": ours["steps_per_s"],
        "peak_mem_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss (monotonic over the run)",
        "matmul_tflops": matmul_rate / 1e12,
        "matmul": {"n": matmul_n, "dtype": "fp32" if on_cpu else "bf16"},
        "peak_tflops": peak / 1e12 if peak else None,
        "flops_per_token": per_step["total"] / sum(s["seq_len"] for step in stats[args.warmup :] for s in step),
        "flops_breakdown_timed_samples": per_step,
        "flop_model": flop_model.describe(),
        "arms": arms,
        "generation": generation,
        "max_micro_batch": search,
        "parameters": counts,
        "settings": {
            "label": label,
            "tag": args.tag,
            "tiny": args.tiny,
            "image_size": config.image_size,
            "micro_batch": args.micro_batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "zero": args.zero,
            "client_optimizer": args.client_optimizer,
            "full_ft": args.full_ft,
            "lora_r": None if args.full_ft else args.lora_r,
            "gradient_checkpointing": args.gradient_checkpointing,
            "precision": args.precision,
            "attn_implementation": attn,
            "ours_attn_implementation": args.ours_attn or attn,
            "pack_length": pack_len,
            "sample_len_range": [args.min_len, args.max_len],
            "mean_sample_len": float(np.mean([len(it["input_ids"]) for it in items])),
            "mean_regions": float(np.mean([len(it["boxes"]) for it in items])),
            "seed": args.seed,
        },
        "load_average_1m_at_end": os.getloadavg()[0],  # other tenants of a shared machine show up here
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "git_commit": git_commit()},
    }
    return result
