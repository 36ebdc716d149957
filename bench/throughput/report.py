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
from gpt4roi_sft.train.speedups import compile_health


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def format_table(result: dict) -> str:
    """The printed summary: one row per arm (total-time and median rates, speedup on medians), then the extras."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    rows = [("arm", "spec", "tokens/s", "median tok/s", "x base (median)", "s/step", "host s", "busy", "MFU", "MFU median",
             "MFU(matmul)", "peak GB", "padding", "shapes", "outliers")]
    for arm in [a for a in result["arms"].values() if "failed" not in a]:
        busy = (arm.get("profiled_step") or {}).get("device_busy_fraction")
        rows.append((arm["arm"], arm["spec"], f"{arm['tokens_per_s']:.1f}", f"{arm['tokens_per_s_median']:.1f}",
                     num(arm.get("speedup_vs_baseline_median"), ".2f"), f"{arm['step_time_s_median']:.3f}",
                     num(arm.get("host_issue_s_median"), ".3f"), pct(busy),
                     pct(arm["mfu"]), pct(arm["mfu_median"]), pct(arm["mfu_vs_matmul"]), f"{arm['peak_mem_gb']:.2f}",
                     pct(arm["padding_fraction"]), str(arm["distinct_shapes"]), str(len(arm["outlier_steps"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"device: {result['device']}  |  {result['settings']['label']}"]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines += [f"arm {a['arm']} dropped: {a['failed']}" for a in result["arms"].values() if "failed" in a]
    lines.append("host s: median time until the host had issued a step's work (the rest of s/step is the wait for the "
                 "device); busy: time the device was busy / wall time of one profiled step (--profile-busy)")
    peak = result["peak_tflops"]
    lines.append(f"headline arm: {result['ours_arm']}   speedup vs baseline: median {num(result['speedup_vs_baseline_median'], '.2f')}x, "
                 f"total time {num(result['speedup_vs_baseline'], '.2f')}x   matmul rate: {result['matmul_tflops']:.2f} TFLOP/s   "
                 f"peak: {'n/a' if peak is None else f'{peak:.0f} TFLOP/s'}")
    for arm in [a for a in result["arms"].values() if "failed" not in a and a["outlier_steps"]]:
        shown = ", ".join(f"step {o['step']} {o['seconds']:.3f}s ({o['x_median']}x{', new shape' if o['new_shape'] else ''})"
                          for o in arm["outlier_steps"][:4])
        lines.append(f"outliers of {arm['arm']} (> 1.5x median): {shown}")
    if result.get("generation"):
        g = result["generation"]
        lines.append(f"generation: {g['regions_per_s']:.2f} regions/s (batch {g['batch_size']}, {g['new_tokens_per_region']} new tokens each)")
    for search in result.get("budget_search") or []:
        within = f" within {search['memory_cap_gb']:.0f} GB" if search.get("memory_cap_gb") else ""
        stopped = f"; stopped: {search['stopped_by']}" if search.get("stopped_by") else ""
        lines.append(f"largest data.pack_tokens that fits{within} ({checkpointing_words(search)}, levers "
                     f"{'+'.join(search['levers']) or 'none'}): {search['max_pack_tokens']} tokens "
                     f"(first OOM: {search['first_oom'] or 'none up to ' + str(search['limit'])}{stopped})")
    return "\n".join(lines)


def checkpointing_words(search: dict) -> str:
    every = search.get("checkpoint_every") or 1
    if not search["gradient_checkpointing"]:
        return "without activation checkpointing"
    return "activation checkpointing of " + ("every decoder layer" if every == 1 else f"one decoder layer in {every}")


def checkpointing_suffix(entry: dict, word: str = "ckpt") -> str:
    """``ckpt`` (every layer), ``ckpt-every2`` (one layer in 2) or nothing, for a search or the run's settings."""
    if not entry.get("gradient_checkpointing"):
        return ""
    every = entry.get("checkpoint_every") or 1
    return word + (f"-every{every}" if every > 1 else "")


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

    rows = [("setting", "best arm", "tokens/s", "median tok/s", "x base (median)", "x base (total)", "MFU", "MFU median",
             "MFU(matmul)", "peak GB", "regions/s", "max budget")]
    for r in results:
        gen = r.get("generation") or {}
        budgets = "/".join(str(s["max_pack_tokens"]) + checkpointing_suffix(s) for s in r.get("budget_search") or []) or "n/a"
        tag = r["settings"].get("tag")
        rows.append((f"{tag}: {r['settings']['label']}" if tag else r["settings"]["label"], str(r.get("ours_arm")),
                     num(r["tokens_per_s"], ".1f"), num(r.get("tokens_per_s_median"), ".1f"),
                     num(r.get("speedup_vs_baseline_median"), ".2f"), num(r["speedup_vs_baseline"], ".2f"),
                     num(r["mfu"], ".3f"), num(r.get("mfu_median"), ".3f"), num(r["mfu_vs_matmul"], ".3f"),
                     num(r["peak_mem_gb"], ".1f"), num(gen.get("regions_per_s"), ".1f"), budgets))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    devices = sorted({r["device"] for r in results})
    return "\n".join([f"device: {', '.join(devices)}"] + ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                                                  for i, (c, w) in enumerate(zip(row, widths))) for row in rows])


def build_result(args, *, config, device: torch.device, attn: str, arms: Dict[str, dict], flop_model: FlopModel,
                 peak: Optional[float], matmul_rate: float, matmul_n: int, counts: dict, generation: Optional[dict],
                 searches: Optional[List[dict]], items: List[dict], engine_steps: Optional[dict] = None) -> dict:
    """The results JSON of one run: the headline figures of the fastest packed arm (by median tokens/s), every
    arm with its speedup over the padded baseline, the settings and levers."""
    on_cpu = device.type != "cuda"
    ran = {k: a for k, a in arms.items() if "failed" not in a}
    base = ran.get("baseline") or next((a for a in ran.values() if a["spec"].startswith("padded")), None)
    for arm in ran.values():
        arm["speedup_vs_baseline_median"] = arm["tokens_per_s_median"] / base["tokens_per_s_median"] if base else None
        arm["speedup_vs_baseline"] = arm["tokens_per_s"] / base["tokens_per_s"] if base else None
    packed = [a for a in ran.values() if a["spec"].startswith("packed")]
    ours = max(packed, key=lambda a: a["tokens_per_s_median"])
    mode = "full-FT" if args.full_ft else f"LoRA r={args.lora_r}"
    grouping = f"pack_tokens {args.pack_tokens}" if args.pack_tokens else f"micro-batch {args.micro_batch}"
    on_deepspeed = args.engine == "deepspeed"
    label = (f"{'tiny' if args.tiny else '7B'} {mode} {f'ZeRO-{args.zero}' if on_deepspeed else 'no-DeepSpeed'} {args.precision} {config.image_size}px {grouping}"
             f"{checkpointing_suffix(vars(args), ' grad-ckpt')}{f' accum {args.grad_accum}' if args.grad_accum > 1 else ''}")
    result = {
        "device": device_name(device),
        "ours_arm": ours["arm"],
        "levers": ours["levers"],
        "tokens_per_s": ours["tokens_per_s"],
        "tokens_per_s_median": ours["tokens_per_s_median"],
        "mfu": ours["mfu"],
        "mfu_median": ours["mfu_median"],
        "mfu_vs_matmul": ours["mfu_vs_matmul"],
        "mfu_vs_matmul_median": ours["mfu_vs_matmul_median"],
        "peak_mem_gb": ours["peak_mem_gb"],
        "baseline_tokens_per_s": base["tokens_per_s"] if base else None,
        "baseline_tokens_per_s_median": base["tokens_per_s_median"] if base else None,
        "baseline_mfu": base["mfu"] if base else None,
        "baseline_mfu_vs_matmul": base["mfu_vs_matmul"] if base else None,
        "baseline_peak_mem_gb": base["peak_mem_gb"] if base else None,
        "speedup_vs_baseline": ours["speedup_vs_baseline"],
        "speedup_vs_baseline_median": ours["speedup_vs_baseline_median"],
        "steps_per_s": ours["steps_per_s"],
        "peak_mem_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss (monotonic over the run)",
        "matmul_tflops": matmul_rate / 1e12,
        "matmul": {"n": matmul_n, "dtype": "fp32" if on_cpu else "bf16"},
        "peak_tflops": peak / 1e12 if peak else None,
        "flops_per_token": ours["model_flops"] / max(ours["tokens"], 1),
        "flop_model": flop_model.describe(),
        "arms": arms,
        "generation": generation,
        "budget_search": searches,
        "parameters": counts,
        "engine_steps": engine_steps,
        # a compiled arm whose region hit dynamo's recompile limit ran partly eager: its time is not compile's
        "torch_compile": compile_health(),
        "settings": {
            "label": label,
            "tag": args.tag,
            "tiny": args.tiny,
            "image_size": config.image_size,
            "arms": {a.name: a.describe() for a in args.arms},
            "micro_batch": None if args.pack_tokens else args.micro_batch,
            "pack_tokens": args.pack_tokens,
            "pack_length": args.pack_length,
            "pad_to_multiple": args.pad_to_multiple,
            "steps": args.steps,
            "warmup": args.warmup,
            "gradient_accumulation_steps": args.grad_accum,
            "engine": args.engine,
            "zero": args.zero if on_deepspeed else None,
            "ds_overrides": list(args.ds_override),
            "client_optimizer": args.client_optimizer,
            "fused_adamw": counts.get("fused_adamw"),
            "full_ft": args.full_ft,
            "lora_r": None if args.full_ft else args.lora_r,
            "lora_dropout": None if args.full_ft else args.lora_dropout,
            "gradient_checkpointing": args.gradient_checkpointing,
            "checkpoint_every": args.checkpoint_every if args.gradient_checkpointing else None,
            "precision": args.precision,
            "attn_implementation": attn,
            "ours_attn_implementation": args.ours_attn or attn,
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
