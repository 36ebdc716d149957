"""The timed arms (interleaved optimizer steps on one engine), generation throughput and the micro-batch search."""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Optional

import numpy as np
import torch

from bench.flops import FlopModel, mfu
from bench.throughput.device import Clock, peak_memory_gb, reset_peak_memory
from bench.throughput.samples import EOS_ID, PAD_ID

log = logging.getLogger("bench.train_throughput")


@contextlib.contextmanager
def attention_implementation(model, name: Optional[str]):
    """Run the LLM (and tower) with attention ``name`` inside the block; ``None`` leaves the model as it is.

    transformers reads ``config._attn_implementation`` at every forward (kernel and mask alike), so one
    engine can time two arms with different attention kernels, step by step.
    """
    if name is None:
        yield
        return
    configs = {id(c): c for m in model.modules() for c in [getattr(m, "config", None)] if c is not None}
    for c in list(configs.values()):
        for sub in ("text_config", "vision_config"):
            if getattr(c, sub, None) is not None:
                configs[id(getattr(c, sub))] = getattr(c, sub)
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def time_arms(engine, arms: Dict[str, List[dict]], stats: List[List[dict]], warmup: int, device, dtype,
              flop_model: FlopModel, peak: Optional[float], matmul_rate: float,
              attn: Optional[Dict[str, Optional[str]]] = None) -> Dict[str, dict]:
    """Warm up every arm, then run their timed optimizer steps interleaved (A B, B A, A B, ...).

    Interleaving puts both arms under the same machine state (clocks, temperature, other tenants of a shared
    CPU), so their ratio is fairer than two back-to-back blocks. Step ``i`` of every arm holds the same
    samples; tokens/s counts real tokens only, and model FLOPs come from the samples, never the padding.
    ``attn`` maps an arm to the attention implementation its steps run with (None: the model's own).
    """
    from gpt4roi_sft.train.loop import micro_step

    clock = Clock(device)
    attn = attn or {}
    failed: Dict[str, str] = {}
    engine.train()

    def step(name: str, batch: dict) -> torch.Tensor:
        with attention_implementation(engine.module, attn.get(name)):
            return micro_step(engine, batch, device, dtype)

    for name, batches in list(arms.items()):
        try:
            for batch in batches[: max(warmup, 1)]:
                step(name, batch)
        except Exception as exc:  # an optional kernel that does not run here: drop the arm, keep the others
            if name in ("ours", "baseline"):
                raise
            log.warning("arm %s dropped: its warm-up failed with %r", name, exc)
            failed[name] = repr(exc)[:500]
            del arms[name]
    acc = {name: {"times": [], "losses": [], "tokens": 0, "padded": 0, "flops": 0.0, "samples": 0, "peak": 0.0} for name in arms}
    names = list(arms)
    for i in range(warmup, len(stats)):
        for name in (names if (i - warmup) % 2 == 0 else names[::-1]):
            batch, a = arms[name][i], acc[name]
            reset_peak_memory(device)
            t0 = clock.now()
            loss = step(name, batch)
            a["times"].append(clock.now() - t0)
            a["peak"] = max(a["peak"], peak_memory_gb(device))
            a["losses"].append(float(loss))
            a["tokens"] += int(batch["num_tokens"])
            a["padded"] += int(batch["input_ids"].numel())
            a["flops"] += flop_model.batch_flops(stats[i])["total"]
            a["samples"] += len(stats[i])
    results = {}
    for name, a in acc.items():
        seconds = sum(a["times"])
        results[name] = {
            "arm": name,
            "steps": len(a["times"]),
            "seconds": seconds,
            "step_time_s_median": float(np.median(a["times"])),
            "tokens": a["tokens"],
            "tokens_in_batches": a["padded"],
            "padding_fraction": 1.0 - a["tokens"] / max(a["padded"], 1),
            "tokens_per_s": a["tokens"] / seconds,
            "samples_per_s": a["samples"] / seconds,
            "steps_per_s": len(a["times"]) / seconds,
            "model_flops": a["flops"],
            "achieved_tflops": a["flops"] / seconds / 1e12,
            "mfu": mfu(a["flops"], seconds, peak),
            "mfu_vs_matmul": mfu(a["flops"], seconds, matmul_rate),
            "peak_mem_gb": a["peak"],
            "final_loss": a["losses"][-1],
            "attn_implementation": attn.get(name),
        }
        log.info("%s: %.1f tokens/s, %.3f s/step (median), peak memory %.2f GB", name, results[name]["tokens_per_s"],
                 results[name]["step_time_s_median"], results[name]["peak_mem_gb"])
    for name, error in failed.items():
        results[name] = {"arm": name, "failed": error}
    return results


def generation_throughput(engine, items: List[dict], args, device, dtype) -> dict:
    """Regions/s of batched generation (the VG harness's shape: one box per prompt, left padding).

    Each prompt is a sample's system/image prefix plus its first question; generation is forced to
    ``--gen-new-tokens`` new tokens (``min_new_tokens``) so random weights do the same work as a trained model.
    """
    from gpt4roi_sft.data.collator import PaddingCollator
    from gpt4roi_sft.data.model_inputs import move_to_device
    from gpt4roi_sft.train.modes import unwrap_base_model

    model = unwrap_base_model(engine.module)
    bbox_id = model.config.bbox_token_id
    prompts = []
    for it in items:
        ids = it["input_ids"].tolist()
        first_bbox = ids.index(bbox_id)
        cut = first_bbox + 4  # the rest of the question after its <bbox>
        prompts.append({"input_ids": it["input_ids"][:cut], "labels": it["labels"][:cut],
                        "pixel_values": it["pixel_values"], "boxes": it["boxes"][:1]})
    collate = PaddingCollator(PAD_ID, padding_side="left")
    batches = [collate(prompts[i : i + args.gen_batch]) for i in range(0, len(prompts) - args.gen_batch + 1, args.gen_batch)]
    if not batches:
        raise ValueError(f"--gen-batch {args.gen_batch} is larger than the {len(prompts)} prompts available")
    clock = Clock(device)
    engine.eval()
    kwargs = dict(max_new_tokens=args.gen_new_tokens, min_new_tokens=args.gen_new_tokens, do_sample=False,
                  pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    with torch.no_grad():
        inputs = move_to_device(batches[0], device, dtype)
        inputs.pop("labels", None)
        model.generate(**inputs, **kwargs)  # warm-up
        t0 = clock.now()
        regions = new_tokens = 0
        for batch in batches:
            inputs = move_to_device(batch, device, dtype)
            inputs.pop("labels", None)
            out = model.generate(**inputs, **kwargs)
            regions += out.shape[0]
            new_tokens += out.numel()
        seconds = clock.now() - t0
    engine.train()
    return {"regions_per_s": regions / seconds, "new_tokens_per_s": new_tokens / seconds, "batch_size": args.gen_batch,
            "new_tokens_per_region": args.gen_new_tokens, "regions": regions, "seconds": seconds}


def find_max_micro_batch(engine, make_items, pack_len_per_sample: int, device, dtype, limit: int) -> dict:
    """Largest packed micro-batch (samples per step) that runs a training step without running out of memory.

    Doubles from 1 until an out-of-memory error, then bisects between the last fit and the first failure.
    Runs last: an optimizer step interrupted by OOM can leave the engine unusable.
    """
    from gpt4roi_sft.data.collator import PackingCollator
    from gpt4roi_sft.train.loop import micro_step

    def fits(n: int) -> bool:
        batch = PackingCollator(n * pack_len_per_sample, PAD_ID)(make_items(n))
        try:
            micro_step(engine, batch, device, dtype)
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return False

    good, bad, n = 0, None, 1
    try:
        while n <= limit and fits(n):
            good, n = n, n * 2
        bad = n if n <= limit else None
        while bad is not None and bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(mid) else (good, mid)
    except Exception as exc:  # an engine left inconsistent by an earlier OOM: keep the lower bound found so far
        log.warning("micro-batch search stopped after %d fit: %s", good, exc)
        return {"max_micro_batch": good, "first_oom": bad, "limit": limit, "stopped_by": repr(exc)[:300]}
    return {"max_micro_batch": good, "first_oom": bad, "limit": limit}
