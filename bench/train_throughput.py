"""Training throughput and MFU of GPT4RoI fine-tuning: packed ("ours") against padded ("baseline") batches.

Both arms run through the project's real trainer path (``apply_training_mode`` + ``build_engine``: DeepSpeed
ZeRO, bf16, LoRA r=128 on all LLM linears with the region encoder and projector trained) on the *same*
synthetic Pix2Cap-shaped samples in the same process, one after the other, each after its own warm-up:

* ours: :class:`PackingCollator` (one row per micro-batch by default, ``position_ids``, no
  ``attention_mask``: the model keeps attention inside each sample) plus the model's own speed-ups;
* baseline: :class:`PaddingCollator`, padding to the longest sample of the micro-batch.

Default: real shapes with random weights, built in bf16 directly on the GPU and never written to disk
(Vicuna-7B: 32 layers, width 4096, 32 heads, vocab 32000, MLP 11008; CLIP ViT-L/14 at ``--image-size``;
the region encoder at GPT4RoI's defaults). ``--tiny``: the tiny test model on CPU, a few steps, so the code
path runs in CI. Reports real (unpadded) tokens/s, MFU against the device's dense bf16 peak and against a
GEMM rate measured in the same run (see ``bench/flops.py``), peak memory, and speedup over the baseline;
writes ``bench/results/<date>_<device>[_<tag>].json`` and prints a table.

    python bench/train_throughput.py --tiny                        # CPU smoke run
    python bench/train_throughput.py --image-size 336 --steps 10   # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable for `bench.flops`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.flops import FlopModel, measure_matmul_rate, mfu, peak_flops_for
from gpt4roi_sft.constants import IGNORE_INDEX

log = logging.getLogger("bench.train_throughput")

ROOT = Path(__file__).resolve().parents[1]
ZERO_CONFIGS = {"2": "ds_configs/zero2.json", "3": "ds_configs/zero3.json", "3_offload": "ds_configs/zero3_offload.json"}

# Token ids of the synthetic vocabulary: LLaMA's <unk>, <s>, </s>, then pad, then the two added tokens.
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
FIRST_TEXT_ID = 5


# ------------------------------------------------------------------------------------------------ model
def real_config(image_size: int, attn: str):
    """GPT4RoI-7B shapes: Vicuna-7B + CLIP ViT-L/14 at ``image_size`` + GPT4RoI's region encoder defaults.

    The vocabulary stays at LLaMA's 32000; ``<image>`` and ``<bbox>`` take its last two ids (the weights
    are random, so which rows they use does not matter for speed).
    """
    from gpt4roi_sft.model.configuration import GPT4RoIConfig

    config = GPT4RoIConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=image_size,
            projection_dim=768,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            tie_word_embeddings=False,
        ),
        projector_type="linear",
        image_token_id=31998,
        bbox_token_id=31999,
    )
    config._attn_implementation = attn
    return config


def tiny_bench_config(attn: str):
    """The tiny test model's config (``gpt4roi_sft.tiny``), with the synthetic vocabulary's token ids."""
    from gpt4roi_sft.model.tiny import tiny_config

    config = tiny_config(vocab_size=1200, image_token_id=3, bbox_token_id=4, pad_token_id=PAD_ID)
    config._attn_implementation = attn
    return config


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random weights allocated directly on ``device`` in ``dtype`` (a 7B model never exists in fp32 or on CPU)."""
    from gpt4roi_sft.model.modeling import GPT4RoIForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPT4RoIForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class SampleShape:
    """How a synthetic Pix2Cap dialogue is laid out, in tokens."""

    num_image_tokens: int
    image_size: int
    vocab_size: int
    image_token_id: int
    bbox_token_id: int
    min_len: int = 600
    max_len: int = 1500
    max_regions: int = 15
    system_tokens: int = 40  # system prompt + "The <image> provides an overview of the picture."
    question_tokens: tuple = (12, 20)  # "### Human: Can you describe region3 <bbox>?" and the like
    answer_tokens: tuple = (26, 40)  # ~25-word caption + "###" separator


def synthetic_sample(shape: SampleShape, rng: np.random.Generator, index: int) -> dict:
    """One dataset item (docs/architecture.md) shaped like a Pix2Cap dialogue: one image, k regions, k captions.

    Token ids are drawn directly (no tokenizer): ``<image>`` already expanded, one ``<bbox>`` per region
    in its question, labels only on the answer spans. Regions are dropped until the sample fits
    ``max_len``; the last answer is lengthened if it falls under ``min_len``.
    """

    def text(n: int) -> List[int]:
        return rng.integers(FIRST_TEXT_ID, shape.vocab_size - 2, size=n).tolist()

    head = shape.system_tokens // 2  # system prompt and "The", then the image, then "provides an overview ..."
    prefix = [BOS_ID] + text(head) + [shape.image_token_id] * shape.num_image_tokens + text(shape.system_tokens - head)
    turns = []
    for _ in range(int(rng.integers(1, shape.max_regions + 1))):
        q = text(int(rng.integers(*shape.question_tokens)))
        q[len(q) // 2] = shape.bbox_token_id
        turns.append((q, text(int(rng.integers(*shape.answer_tokens)))))
    while len(turns) > 1 and len(prefix) + sum(len(q) + len(a) for q, a in turns) > shape.max_len:
        turns.pop()
    short = shape.min_len - (len(prefix) + sum(len(q) + len(a) for q, a in turns))
    if short > 0:
        q, a = turns[-1]
        turns[-1] = (q, a + text(short))
    ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    for q, a in turns:
        ids += q + a
        labels += [IGNORE_INDEX] * len(q) + a
    ids, labels = ids[: shape.max_len], labels[: shape.max_len]
    n = len(turns)
    xy = rng.uniform(0.0, 0.7, size=(n, 2))
    wh = rng.uniform(0.05, 0.3, size=(n, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + wh], axis=1), dtype=torch.float32)
    pixels = torch.from_numpy(rng.standard_normal((3, shape.image_size, shape.image_size), dtype=np.float32))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "pixel_values": pixels,
        "boxes": boxes,
        "id": f"synthetic/{index}",
        "num_dropped_turns": 0,
    }


def sample_stats(items: List[dict]) -> List[dict]:
    """What the FLOP count needs of each sample."""
    return [{"seq_len": len(it["input_ids"]), "num_images": 1, "num_regions": len(it["boxes"])} for it in items]


# ----------------------------------------------------------------------------------------------- engine
def init_single_process_group(on_cpu: bool, port: Optional[int]) -> None:
    """A one-process group, as ``train_sft.py`` makes when no launcher set ``WORLD_SIZE``.

    ``port`` (``--port``) wins over an inherited ``MASTER_PORT``; without either, 29531.
    """
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ["MASTER_PORT"] = str(port or os.environ.get("MASTER_PORT", 29531))
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")


def training_config(args, ds_config_path: str):
    """The typed recipe the trainer would read for this benchmark (LoRA or full fine-tuning)."""
    from gpt4roi_sft.config import load_config

    overrides = [
        f"train.micro_batch_size={args.micro_batch}",
        "train.gradient_accumulation_steps=1",
        f"train.precision={args.precision}",
        "train.lr_scheduler=constant",
        f"deepspeed.config={ds_config_path}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        "model.freeze=stage2",  # GPT4RoI stage 2: everything but the vision tower
    ]
    if not args.full_ft:
        overrides += ["lora.enabled=true", f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}", "lora.target_modules=all-linear"]
    return load_config(None, overrides)


def deepspeed_config_path(args, workdir: Path) -> str:
    """The repository's ZeRO JSON; with ``--client-optimizer`` an offload config loses its DeepSpeed optimizer.

    DeepSpeed's CPU Adam compiles a C++ extension on first use (minutes on a bare GPU machine); the client
    ``torch.optim.AdamW`` that ``build_engine`` supplies needs no build.
    """
    path = ROOT / ZERO_CONFIGS[args.zero]
    if not (args.client_optimizer and args.zero == "3_offload"):
        return str(path)
    ds = json.loads(path.read_text())
    ds.pop("optimizer", None)
    ds["zero_force_ds_cpu_optimizer"] = False
    out = workdir / "zero3_offload_client_optimizer.json"
    out.write_text(json.dumps(ds, indent=1))
    return str(out)


def prepare_engine(model, args, on_cpu: bool, workdir: Path):
    """``apply_training_mode`` then ``build_engine``: exactly the objects ``train_sft.py`` trains."""
    from gpt4roi_sft.train.loop import build_engine
    from gpt4roi_sft.train.modes import apply_training_mode, trainable_parameter_count, unwrap_base_model

    cfg = training_config(args, deepspeed_config_path(args, workdir))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = apply_training_mode(model, cfg)
    counts = trainable_parameter_count(model)
    log.info("parameters: %d total, %d trainable", counts["total"], counts["trainable"])
    hidden = unwrap_base_model(model).config.text_config.hidden_size
    engine, _, stage = build_engine(model, cfg, 1, hidden, args.warmup + args.steps + 64, on_cpu)
    return engine, stage, counts


# ------------------------------------------------------------------------------------------------ timing
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


class Clock:
    """Wall time of device work: synchronises the device before reading the host clock."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """``torch.cuda.max_memory_allocated`` since the last reset; on CPU the process's peak RSS so far.

    RSS cannot be reset, so on CPU both arms report the same high-water mark of the whole process.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def pad_packed_batch(batch: dict, length: int) -> dict:
    """A packed batch widened to ``length`` columns; the added tail is one more padding sequence (positions from 0).

    A fixed row length lets compiled attention kernels (flex attention) reuse one compilation across steps
    instead of recompiling for every packed length. Real tokens, labels and ``num_tokens`` are unchanged.
    """
    rows, width = batch["input_ids"].shape
    extra = length - width
    if extra <= 0:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], torch.full((rows, extra), PAD_ID, dtype=torch.long)], dim=1)
    out["labels"] = torch.cat([batch["labels"], torch.full((rows, extra), IGNORE_INDEX, dtype=torch.long)], dim=1)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra).expand(rows, extra)], dim=1)
    return out


def collate_steps(items: List[dict], micro_batch: int, collator) -> List[dict]:
    """Consecutive groups of ``micro_batch`` items, collated; step i always holds the same samples in both arms."""
    return [collator(items[i : i + micro_batch]) for i in range(0, len(items) - micro_batch + 1, micro_batch)]


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
    from gpt4roi_sft.train.loop import move_to_device
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


# ------------------------------------------------------------------------------------------------ report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} logical cores)"


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


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny test model on CPU (CI smoke run)")
    p.add_argument("--image-size", type=int, default=224, choices=(224, 336), help="CLIP ViT-L/14 input side (real mode)")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per optimizer step (default 4; tiny 2)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per arm (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each arm (default 3; tiny 2)")
    p.add_argument("--zero", choices=sorted(ZERO_CONFIGS), default="2", help="ds_configs/zero{2,3,3_offload}.json")
    p.add_argument("--client-optimizer", action="store_true",
                   help="with --zero 3_offload: torch AdamW instead of DeepSpeed's CPU Adam (no C++ build)")
    p.add_argument("--full-ft", action="store_true", help="full fine-tuning (all but the vision tower) instead of LoRA")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 128; tiny 8)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="default bf16; tiny fp32 (CPUs without bf16 matrix units run bf16 far slower)")
    p.add_argument("--attn", default=None, help="attention implementation the model is built with (default: sdpa)")
    p.add_argument("--ours-attn", default=None,
                   help="attention for the packed arm only, e.g. flex_attention (block-sparse packed masks; "
                        "CUDA only: no flex backward on CPU); default: as --attn")
    p.add_argument("--pack-length", type=int, default=None,
                   help="tokens per packed row (default: micro-batch x --max-len, i.e. one row per micro-batch)")
    p.add_argument("--min-len", type=int, default=None, help="shortest sample in tokens (default 600; tiny 120)")
    p.add_argument("--max-len", type=int, default=None, help="longest sample in tokens (default 1500; tiny 320)")
    p.add_argument("--matmul-size", type=int, default=None, help="GEMM side for the in-run matmul rate (default 8192; CPU 1024)")
    p.add_argument("--flex-arm", action="store_true",
                   help="add a third arm: packed rows padded to one fixed length, flex attention (block-sparse; "
                        "CUDA only, dropped with a note if its warm-up fails)")
    p.add_argument("--skip-baseline", action="store_true", help="time only the packed arm (speedup left null)")
    p.add_argument("--eval-generation", action="store_true", help="also time batched generation (regions/s)")
    p.add_argument("--gen-batch", type=int, default=None, help="prompts per generate call (default 16; tiny 2)")
    p.add_argument("--gen-new-tokens", type=int, default=None, help="tokens generated per region (default 32; tiny 4)")
    p.add_argument("--max-microbatch-search", action="store_true", help="find the largest packed micro-batch that fits (GPU only)")
    p.add_argument("--search-limit", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=None, help="MASTER_PORT of the one-process group (default: $MASTER_PORT or 29531)")
    p.add_argument("--tag", default="", help="suffix of the results file name (e.g. lora-z2-224)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default <out-dir>/<date>_<device>[_<tag>].json)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--summarize", type=Path, nargs="+", metavar="JSON",
                   help="print one table row per results file (several settings) and exit")
    args = p.parse_args(argv)
    if args.summarize:
        return args
    tiny = args.tiny
    for name, real, small in (("micro_batch", 4, 2), ("steps", 10, 2), ("warmup", 3, 2), ("lora_r", 128, 8),
                              ("min_len", 600, 120), ("max_len", 1500, 320), ("gen_batch", 16, 2), ("gen_new_tokens", 32, 4),
                              ("precision", "bf16", "fp32")):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else real)
    if args.min_len > args.max_len:
        p.error(f"--min-len {args.min_len} exceeds --max-len {args.max_len}")
    if args.steps < 1 or args.micro_batch < 1 or args.warmup < 0:
        p.error("--steps and --micro-batch must be >= 1, --warmup >= 0")
    return args


def run(args) -> dict:
    """Build, time both arms (and the extras), and return the result dict (also written to disk)."""
    import tempfile

    from deepspeed.accelerator import get_accelerator

    from gpt4roi_sft.data.collator import PackingCollator, PaddingCollator

    on_cpu = get_accelerator().device_name() == "cpu"
    if not args.tiny and on_cpu:
        raise SystemExit("train_throughput: the real-shape (7B) mode needs a CUDA GPU; use --tiny on CPU")
    device = torch.device("cpu") if on_cpu else torch.device("cuda", 0)
    if not on_cpu:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    attn = args.attn or "sdpa"
    torch.manual_seed(args.seed)
    init_single_process_group(on_cpu, args.port)

    config = tiny_bench_config(attn) if args.tiny else real_config(args.image_size, attn)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    log.info("built %s model in %.1f s", "tiny" if args.tiny else "7B", time.perf_counter() - t0)
    flop_model = FlopModel.from_config(config, lora_rank=None if args.full_ft else args.lora_r, full_ft=args.full_ft)

    shape = SampleShape(config.num_image_tokens, config.image_size, config.text_config.vocab_size, config.image_token_id,
                        config.bbox_token_id, min_len=args.min_len, max_len=args.max_len)
    rng = np.random.default_rng(args.seed)
    n_steps = args.warmup + args.steps
    items = [synthetic_sample(shape, rng, i) for i in range(n_steps * args.micro_batch)]
    stats = [sample_stats(items[i : i + args.micro_batch]) for i in range(0, len(items), args.micro_batch)]
    pack_len = args.pack_length or args.micro_batch * args.max_len

    peak = None if on_cpu else peak_flops_for(torch.cuda.get_device_name(device))
    matmul_n = args.matmul_size or (1024 if on_cpu else 8192)
    matmul_rate = measure_matmul_rate(device, torch.float32 if on_cpu else torch.bfloat16, matmul_n)

    with tempfile.TemporaryDirectory(prefix="bench_ds_") as workdir:
        engine, stage, counts = prepare_engine(model, args, on_cpu, Path(workdir))
        packed = collate_steps(items, args.micro_batch, PackingCollator(pack_len, PAD_ID))
        arms = {"ours": packed}
        if args.flex_arm:  # packed rows at one fixed length (a multiple of flex attention's 128-token blocks)
            fixed = -(-pack_len // 128) * 128
            arms["ours_flex"] = [pad_packed_batch(b, fixed) for b in packed]
        if not args.skip_baseline:
            arms["baseline"] = collate_steps(items, args.micro_batch, PaddingCollator(PAD_ID))
        arms = time_arms(engine, arms, stats, args.warmup, device, dtype, flop_model, peak, matmul_rate,
                         attn={"ours": args.ours_attn, "ours_flex": "flex_attention"})
        generation = None
        if args.eval_generation:
            if stage == 3:
                log.warning("--eval-generation skipped under ZeRO-3 (parameters are partitioned)")
            else:
                generation = generation_throughput(engine, items, args, device, dtype)
        search = None
        if args.max_microbatch_search:
            if on_cpu:
                log.warning("--max-microbatch-search needs a GPU; skipped")
            else:
                extra_rng = np.random.default_rng(args.seed + 1)
                search = find_max_micro_batch(engine, lambda n: [synthetic_sample(shape, extra_rng, i) for i in range(n)],
                                              args.max_len, device, dtype, args.search_limit)

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


def results_path(args, result: dict) -> Path:
    if args.out:
        return args.out
    kind = "cpu" if result["device"].startswith("CPU") else slug(result["device"])
    name = f"{_dt.date.today().isoformat()}_{kind}{'_' + slug(args.tag) if args.tag else ''}.json"
    return args.out_dir / name


def summary_table(results: List[dict]) -> str:
    """One row per results file: the figures the issue's targets are stated in."""

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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summary_table([json.loads(path.read_text()) for path in args.summarize]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args)
    from gpt4roi_sft.atomic import write_json_atomic

    path = results_path(args, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result, indent=1)
    log.info("wrote %s", path)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
