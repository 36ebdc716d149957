"""The timed arms (interleaved optimizer steps on one engine), generation throughput and the token-budget search."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from bench.flops import FlopModel, mfu
from bench.throughput.device import Clock, peak_memory_gb, reset_peak_memory
from bench.throughput.levers import ArmSpec, LeverSwitch, attention_configs, lever_settings
from bench.throughput.samples import EOS_ID, PAD_ID, SamplePool

log = logging.getLogger("bench.train_throughput")


@contextlib.contextmanager
def attention_implementation(model, name: Optional[str]):
    """Run the LLM (and tower) with attention ``name`` inside the block; ``None`` leaves the model as it is.

    One engine can so time two arms with different attention kernels, step by step (see :func:`attention_configs`).
    """
    if name is None:
        yield
        return
    configs = attention_configs(model)
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


@dataclass
class Arm:
    """One timed arm: its spec, its collated micro-batches (warm-up first) and each step's per-sample stats."""

    spec: ArmSpec
    batches: List[dict]
    stats: List[List[dict]]
    attn: Optional[str] = None  # attention implementation its steps run with (None: the model's own)
    required: bool = False  # a required arm that cannot run fails the benchmark; others are dropped with the reason


OUTLIER_FACTOR = 1.5  # a timed step slower than this many medians is flagged


def time_arms(engine, arms: Dict[str, Arm], warmup: int, device, dtype, flop_model: FlopModel, peak: Optional[float],
              matmul_rate: float, switch: LeverSwitch, comm, accum: int = 1, profile_busy: bool = False) -> Dict[str, dict]:
    """Warm up every arm, then run their timed optimizer steps interleaved (A B C, C B A, A B C, ...).

    Interleaving puts every arm under the same machine state (clocks, temperature, other tenants of a shared
    CPU), so their ratios are fairer than back-to-back blocks. A step is the trainer's own
    :func:`~gpt4roi_sft.train.loop.optimizer_step` over ``accum`` consecutive micro-batches of the arm (the
    engine's gradient accumulation steps; ``--grad-accum``), run with its arm's levers switched on (switching
    happens outside the timed region); the clock synchronises the device before and after the step. Arms with
    the same grouping hold the same samples in step ``i``; tokens/s counts real tokens only and model FLOPs come
    from the samples, never the padding. Per arm: total-time and median-based rates, the timed steps' seconds,
    steps slower than ``OUTLIER_FACTOR`` x the median (and whether one of their row shapes was new to the
    process, e.g. a fresh kernel plan or recompile), and the distinct (rows, width) shapes it ran.

    Each step also records when the host had issued all of its work (``optimizer_step`` returned, before the
    clock's synchronisation): ``host_issue_s`` is that time, ``device_tail_s`` the wait for the device after it. A
    tail near zero means the device kept up with the host (the step is bound by the host's issuing); a long tail
    means work was queued faster than the device ran it. A synchronisation inside the step counts as issue time.
    With ``profile_busy``, one more step per arm runs under ``torch.profiler`` after the timed ones (see
    :func:`device_busy`).
    """
    from gpt4roi_sft.train.loop import optimizer_step

    clock = Clock(device)
    failed: Dict[str, str] = {}
    seen_shapes = set()
    engine.train()

    def step_slice(i: int) -> slice:  # the micro-batches (and their samples' stats) of optimizer step i
        return slice(i * accum, (i + 1) * accum)

    def run_step(arm: Arm, micro: List[dict]) -> torch.Tensor:
        with attention_implementation(engine.module, arm.attn):
            return optimizer_step(engine, micro, comm, device, dtype)

    for name, arm in list(arms.items()):
        try:
            for i in range(max(warmup, 1)):
                micro = arm.batches[step_slice(i)]
                seen_shapes.update(tuple(b["input_ids"].shape) for b in micro)
                switch.set(arm.spec.levers)
                run_step(arm, micro)
        except Exception as exc:  # a lever or kernel that does not run here: drop the arm, keep the others
            if arm.required:
                raise
            log.warning("arm %s dropped: its warm-up failed with %r", name, exc)
            failed[name] = repr(exc)[:500]
            del arms[name]
            _recover(engine, device, accum)
    switch.set(frozenset())
    acc = {name: {"times": [], "issue": [], "losses": [], "tokens": [], "padded": 0, "flops": [], "samples": 0,
                  "peak": 0.0, "shapes": [], "new": []} for name in arms}
    names = list(arms)
    n_steps = min(len(a.batches) for a in arms.values()) // accum if arms else 0
    for i in range(warmup, n_steps):
        for name in (names if (i - warmup) % 2 == 0 else names[::-1]):
            arm, a = arms[name], acc[name]
            micro, stats = arm.batches[step_slice(i)], arm.stats[step_slice(i)]
            shapes = [tuple(b["input_ids"].shape) for b in micro]
            switch.set(arm.spec.levers)
            reset_peak_memory(device)
            t0 = clock.now()
            loss = run_step(arm, micro)
            issued = time.perf_counter()
            a["times"].append(clock.now() - t0)
            a["issue"].append(issued - t0)
            a["peak"] = max(a["peak"], peak_memory_gb(device))
            a["losses"].append(float(loss))
            a["tokens"].append(sum(int(b["num_tokens"]) for b in micro))
            a["padded"] += sum(int(b["input_ids"].numel()) for b in micro)
            a["flops"].append(sum(flop_model.batch_flops(samples)["total"] for samples in stats))
            a["samples"] += sum(len(samples) for samples in stats)
            a["shapes"].append(max(shapes, key=lambda s: s[0] * s[1]))
            a["new"].append(any(s not in seen_shapes for s in shapes))
            seen_shapes.update(shapes)
    busy = {}
    if profile_busy and device.type == "cuda":
        for name, arm in arms.items():
            switch.set(arm.spec.levers)
            busy[name] = device_busy(lambda: run_step(arm, arm.batches[-accum:]), clock)
    switch.set(frozenset())
    results = {name: arm_result(name, arms[name], a, warmup, peak, matmul_rate, accum) for name, a in acc.items()}
    for name, measured in busy.items():
        results[name]["profiled_step"] = measured
    for name, error in failed.items():
        results[name] = {"arm": name, "failed": error}
    return results


def device_busy(step: Callable[[], object], clock: Clock) -> dict:
    """One step under ``torch.profiler`` (device activity only): how long the device was busy, against the step's
    wall time. ``device_busy_s`` is the union of its kernels' and copies' time intervals (overlapping streams count
    once); ``device_kernel_s`` their plain sum. A busy fraction near 1 means the device, not the host, sets the step
    time. The profiler's own overhead lengthens the step, so its seconds are not the timed arm's."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = clock.now()
        step()
        seconds = clock.now() - t0
    raw = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if raw is not None:
        spans = [(e.start_ns(), e.end_ns()) for e in raw.events() if e.device_type() == torch.autograd.DeviceType.CUDA]
        kernel_s = sum(b - a for a, b in spans) / 1e9
        busy_s = busy_length(spans) / 1e9
    else:  # no raw events in this torch: the summed kernel time only (an upper bound of the busy time)
        kernel_s = sum(e.self_device_time_total for e in prof.key_averages()
                       if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / 1e6
        busy_s = None
    shown = busy_s if busy_s is not None else kernel_s
    return {"seconds": seconds, "device_kernel_s": kernel_s, "device_busy_s": busy_s,
            "device_busy_fraction": min(1.0, shown / seconds) if seconds > 0 else None}


def busy_length(spans: List[tuple]) -> int:
    """Total length covered by ``(start, end)`` intervals, each stretch counted once."""
    total, reach = 0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def arm_result(name: str, arm: Arm, a: dict, warmup: int, peak: Optional[float], matmul_rate: float,
               accum: int = 1) -> dict:
    """Totals, medians and outliers of one arm's timed (optimizer) steps of ``accum`` micro-batches each; an
    outlier's ``shape`` is the largest row shape of its step."""
    times = np.asarray(a["times"])
    issue = np.asarray(a["issue"])
    tokens = np.asarray(a["tokens"], dtype=np.float64)
    flops = np.asarray(a["flops"])
    seconds = float(times.sum())
    median = float(np.median(times))
    warm_shapes = {tuple(b["input_ids"].shape) for b in arm.batches[: max(warmup, 1) * accum]}
    shapes = sorted(warm_shapes | set(a["shapes"]))

    def med_rate(per_step, over):
        return None if over is None else float(np.median(per_step / times / over))

    outliers = [{"step": warmup + k, "seconds": round(float(t), 4), "x_median": round(float(t / median), 2),
                 "shape": list(a["shapes"][k]), "new_shape": a["new"][k]}
                for k, t in enumerate(times) if t > OUTLIER_FACTOR * median]
    result = {
        "arm": name,
        "spec": arm.spec.describe(),
        "levers": lever_settings(arm.spec),
        "steps": len(times),
        "micro_batches_per_step": accum,
        "seconds": seconds,
        "step_times_s": [round(float(t), 4) for t in times],
        "step_time_s_median": median,
        "host_issue_s_median": float(np.median(issue)),
        "device_tail_s_median": float(np.median(times - issue)),
        "tokens": int(tokens.sum()),
        "tokens_per_step_mean": float(tokens.mean()),
        "tokens_in_batches": a["padded"],
        "padding_fraction": 1.0 - float(tokens.sum()) / max(a["padded"], 1),
        "tokens_per_s": float(tokens.sum()) / seconds,
        "tokens_per_s_median": float(np.median(tokens / times)),
        "samples_per_s": a["samples"] / seconds,
        "steps_per_s": len(times) / seconds,
        "model_flops": float(flops.sum()),
        "achieved_tflops": float(flops.sum()) / seconds / 1e12,
        "mfu": mfu(float(flops.sum()), seconds, peak),
        "mfu_median": med_rate(flops, peak),
        "mfu_vs_matmul": mfu(float(flops.sum()), seconds, matmul_rate),
        "mfu_vs_matmul_median": med_rate(flops, matmul_rate),
        "peak_mem_gb": a["peak"],
        "final_loss": a["losses"][-1],
        "attn_implementation": arm.attn,
        "distinct_shapes": len(shapes),
        "shapes": [list(s) for s in shapes],
        "outlier_steps": outliers,
    }
    log.info("%s: %.1f tokens/s (median %.1f), %.3f s/step median (host issued its work in %.3f s), %d shapes, "
             "%d outlier step(s), peak %.2f GB", name, result["tokens_per_s"], result["tokens_per_s_median"], median,
             result["host_issue_s_median"], len(shapes), len(outliers), result["peak_mem_gb"])
    return result


def _recover(engine, device, accum: int = 1) -> None:
    """After a failed step (out of memory, a kernel that cannot run): drop partial gradients and cached blocks.

    With gradient accumulation, a step that failed after some of its micro-batches leaves DeepSpeed's count of
    micro-steps off the accumulation boundary, and every later step would then apply the optimizer in its
    middle: that is an error here, not a silently different benchmark.
    """
    try:
        engine.zero_grad()
    except Exception as exc:  # the engine may be past saving; the next step will tell
        log.warning("zero_grad after a failed step: %r", exc)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    off = getattr(engine, "micro_steps", 0) % accum
    if off:
        raise RuntimeError(f"a step failed after {off} of its {accum} micro-batches: the engine's optimizer steps no "
                           "longer fall on the benchmark's step boundaries; drop the failing arm or run without --grad-accum")


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


class SearchTimeUp(Exception):
    """The budget search reached its deadline."""


def find_max_budget(engine, pool: SamplePool, switch: LeverSwitch, levers, row_length: int, pad_to_multiple: int,
                    device, dtype, start: int, limit: int, granularity: int = 1024,
                    deadline: Optional[float] = None) -> dict:
    """Largest token budget per packed micro-batch that trains a step without running out of memory.

    Doubles from ``start`` until an out-of-memory error (or ``limit``), then bisects to ``granularity`` tokens.
    The micro-batch of budget ``n`` is the pool's first token-budget group (real tokens <= n), in rows of
    ``row_length`` rounded to ``pad_to_multiple``, run with ``levers``. Runs last: an optimizer step interrupted
    by OOM can leave the engine unusable, so a later non-OOM failure ends the search with the bound found so far.
    ``deadline`` (``time.monotonic()``): no budget is tried after it; the bound found so far is returned with
    ``stopped_by`` saying so.
    """
    from gpt4roi_sft.data.collator import PackingCollator
    from gpt4roi_sft.train.loop import micro_step

    collate = PackingCollator(row_length, PAD_ID, pad_to_multiple=pad_to_multiple)
    peaks: Dict[int, float] = {}

    def fits(n: int) -> bool:
        if deadline is not None and time.monotonic() > deadline:
            raise SearchTimeUp(f"time limit reached before trying {n} tokens")
        (group,) = pool.groups(1, 1, budget=n)
        batch = collate(group)
        switch.set(levers)
        reset_peak_memory(device)
        try:
            micro_step(engine, batch, device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            peaks[n] = peak_memory_gb(device)
            log.info("budget %d tokens (%d real, shape %s): fits, peak %.1f GB", n, batch["num_tokens"],
                     tuple(batch["input_ids"].shape), peaks[n])
            return True
        except torch.cuda.OutOfMemoryError:
            log.info("budget %d tokens: out of memory", n)
            _recover(engine, device)
            return False

    good, bad, n, stopped_by = 0, None, start, None
    try:
        while n <= limit and fits(n):
            good, n = n, n * 2
        bad = n if n <= limit else None
        while bad is not None and bad - good > granularity:
            mid = (good + bad) // 2 // granularity * granularity
            if mid <= good:
                break
            good, bad = (mid, bad) if fits(mid) else (good, mid)
    except Exception as exc:  # the deadline, or an engine left inconsistent by an earlier OOM: keep the bound so far
        stopped_by = str(exc) if isinstance(exc, SearchTimeUp) else repr(exc)[:300]
        log.warning("budget search stopped after %d fit: %s", good, stopped_by)
    finally:
        switch.set(frozenset())
    found = {"max_pack_tokens": good, "first_oom": bad, "limit": limit, "peak_mem_gb": peaks.get(good)}
    return {**found, "stopped_by": stopped_by} if stopped_by else found
