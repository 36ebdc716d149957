"""Training throughput and MFU of GPT4RoI fine-tuning: arms of batching and throughput levers, timed on one engine.

Every arm runs through the project's real trainer path (``apply_training_mode`` + ``build_engine``: DeepSpeed
ZeRO, bf16, LoRA r=128 on all LLM linears with the region encoder and projector trained) on synthetic
Pix2Cap-shaped samples, in the same process, with the timed steps of all arms interleaved:

* ``baseline=padded``: :class:`PaddingCollator`, padding to the longest sample of the micro-batch;
* ``ours=packed``: :class:`PackingCollator` rows (``position_ids``, no ``attention_mask``: the model keeps
  attention inside each sample), widths rounded to ``--pad-to-multiple``;
* more arms via ``--arm NAME=COLLATE[+LEVER...][@BUDGET]``: the levers of ``bench/throughput/levers.py``
  (LoRA dropout 0, Liger kernels, channels-last, regional compile, DeepSpeed sync-free), switched on and off
  between steps on the same engine, and token budgets per micro-batch (``--pack-tokens``, ``data.pack_tokens``).

Arms with the same grouping see the *same* samples in every step. Default: real shapes with random weights,
built in bf16 directly on the GPU and never written to disk (Vicuna-7B: 32 layers, width 4096, 32 heads, vocab
32000, MLP 11008; CLIP ViT-L/14 at ``--image-size``; the region encoder at GPT4RoI's defaults). ``--tiny``: the
tiny test model on CPU, a few steps, so the code path runs in CI. Reports real (unpadded) tokens/s over the
total time and as the median of the steps, MFU against the device's dense bf16 peak and against a GEMM rate
measured in the same run (see ``bench/flops.py``), peak memory, speedups over the baseline (total and median),
the distinct row shapes and the outlier steps; optionally the largest token budget that fits
(``--max-budget-search``); writes ``bench/results/<date>_<device>[_<tag>].json`` and prints a table.

    python bench/train_throughput.py --tiny                                     # CPU smoke run
    python bench/train_throughput.py --image-size 336 --pack-tokens 4096 \
        --arm baseline=padded --arm packed=packed --arm fast=packed+nodrop+liger   # one GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.flops import FlopModel, measure_matmul_rate, peak_flops_for
from bench.throughput.arms import Arm, find_max_budget, generation_throughput, time_arms
from bench.throughput.engine import (ROOT, ZERO_CONFIGS, build_model, init_single_process_group, prepare_engine,
                                     real_config, tiny_bench_config)
from bench.throughput.levers import ArmSpec, LeverSwitch, parse_arm, parse_arms
from bench.throughput.report import build_result, format_table, results_path, summary_table
from bench.throughput.samples import PAD_ID, SamplePool, SampleShape, collate_groups, pad_packed_batch, sample_stats

log = logging.getLogger("bench.train_throughput")


# -------------------------------------------------------------------------------------------------- main
DEFAULT_ARMS = ["baseline=padded", "ours=packed"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny test model on CPU (CI smoke run)")
    p.add_argument("--image-size", type=int, default=224, choices=(224, 336), help="CLIP ViT-L/14 input side (real mode)")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per micro-batch without --pack-tokens (default 4; tiny 2)")
    p.add_argument("--pack-tokens", type=int, default=None,
                   help="token budget per micro-batch for every arm (data.pack_tokens); default: --micro-batch samples")
    p.add_argument("--arm", action="append", default=None, metavar="NAME=COLLATE[+LEVER...][@BUDGET]",
                   help="an arm to time (repeatable); levers: nodrop, liger, channels_last, compile, ds_sync_free "
                        f"(bench/throughput/levers.py). Default: {' '.join(DEFAULT_ARMS)}")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per arm (default 20; tiny 2)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (train.gradient_accumulation_steps): each timed step is the "
                        "trainer's optimizer_step over this many micro-batches, e.g. 4 for GPT4RoI's global batch of 16 "
                        "samples on one GPU at ~4 samples per 3072-token micro-batch")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each arm (default 3; tiny 2)")
    p.add_argument("--zero", choices=sorted(ZERO_CONFIGS), default="2", help="ds_configs/zero{1,2,3,3_offload}.json")
    p.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed",
                   help="the trainer's train.engine: deepspeed (ZeRO), or torch (one process without DeepSpeed, "
                        "gpt4roi_sft/train/torch_engine.py: fp32 masters, multi-tensor clip, fused AdamW), LoRA "
                        "only, no ds_* lever")
    p.add_argument("--ds-override", action="append", default=[], metavar="KEY=VALUE",
                   help="deepspeed.overrides item, e.g. zero_optimization.overlap_comm=false (repeatable)")
    p.add_argument("--client-optimizer", action="store_true",
                   help="with --zero 3_offload: torch AdamW instead of DeepSpeed's CPU Adam (no C++ build)")
    p.add_argument("--full-ft", action="store_true", help="full fine-tuning (all but the vision tower) instead of LoRA")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 128; tiny 8)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="the recipes' LoRA dropout (arms with nodrop run without)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="with --gradient-checkpointing: every n-th decoder layer only (model.checkpoint_every)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="default bf16; tiny fp32 (CPUs without bf16 matrix units run bf16 far slower)")
    p.add_argument("--attn", default=None, help="attention implementation the model is built with (default: sdpa)")
    p.add_argument("--ours-attn", default=None,
                   help="attention for the packed arms only, e.g. flex_attention (CUDA only); default: as --attn")
    p.add_argument("--pack-length", type=int, default=None,
                   help="tokens per packed row (data.max_length); default 2048 (tiny 512) with --pack-tokens, "
                        "else micro-batch x --max-len (one row per micro-batch)")
    p.add_argument("--pad-to-multiple", type=int, default=128, help="packed row widths rounded up to this (data.pad_to_multiple)")
    p.add_argument("--min-len", type=int, default=None, help="shortest sample in tokens (default 600; tiny 120)")
    p.add_argument("--max-len", type=int, default=None, help="longest sample in tokens (default 1500; tiny 320)")
    p.add_argument("--matmul-size", type=int, default=None, help="GEMM side for the in-run matmul rate (default 8192; CPU 1024)")
    p.add_argument("--flex-arm", action="store_true",
                   help="add an arm: the first packed arm's rows padded to one fixed length, flex attention (block-sparse; "
                        "CUDA only, dropped with a note if its warm-up fails)")
    p.add_argument("--skip-baseline", action="store_true", help="time no padded arm (speedups left null)")
    p.add_argument("--profile-busy", action="store_true",
                   help="after the timed steps, one more step per arm under torch.profiler: the device's kernel time "
                        "against the step's wall time (GPU only; arms' profiled_step)")
    p.add_argument("--eval-generation", action="store_true", help="also time batched generation (regions/s)")
    p.add_argument("--gen-batch", type=int, default=None, help="prompts per generate call (default 16; tiny 2)")
    p.add_argument("--gen-new-tokens", type=int, default=None, help="tokens generated per region (default 32; tiny 4)")
    p.add_argument("--max-budget-search", action="store_true",
                   help="last: find the largest data.pack_tokens that trains a step without running out of memory")
    p.add_argument("--search-levers", default="", help="levers the search runs with, e.g. nodrop+liger")
    p.add_argument("--search-checkpointing", default="both", metavar="off|both|off,2,1",
                   help="activation checkpointing of each search, switched at run time: off (none), an n (every n-th "
                        "decoder layer; 1: all), comma-separated; both = off,1. Run from the least saving to the most")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="the budget search tries no new budget after this many seconds from the start, so a run "
                        "under an outer time limit still writes its results (stopped_by says so)")
    p.add_argument("--search-memory-gb", type=float, default=None,
                   help="the budget search may allocate at most this many GB (1e9 bytes), e.g. 84 for an 80 GB H100 "
                        "(79.1 GiB = 84.9 GB, ~0.5 GB of it CUDA's context) searched on a larger card; default: all")
    p.add_argument("--search-start", type=int, default=None, help="first budget tried (default 4096; tiny 512)")
    p.add_argument("--search-limit", type=int, default=None, help="largest budget tried (default 131072; tiny 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=None, help="MASTER_PORT of the one-process group (default: $MASTER_PORT or a free port)")
    p.add_argument("--tag", default="", help="suffix of the results file name (e.g. lora-z2-224)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default <out-dir>/<date>_<device>[_<tag>].json)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--summarize", type=Path, nargs="+", metavar="JSON",
                   help="print one table row per results file (several settings) and exit")
    args = p.parse_args(argv)
    if args.summarize:
        return args
    tiny = args.tiny
    for name, real, small in (("micro_batch", 4, 2), ("steps", 20, 2), ("warmup", 3, 2), ("lora_r", 128, 8),
                              ("min_len", 600, 120), ("max_len", 1500, 320), ("gen_batch", 16, 2), ("gen_new_tokens", 32, 4),
                              ("precision", "bf16", "fp32"), ("search_start", 4096, 512), ("search_limit", 131072, 2048)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else real)
    if args.pack_length is None:
        args.pack_length = (512 if tiny else 2048) if args.pack_tokens else args.micro_batch * args.max_len
    if args.min_len > args.max_len:
        p.error(f"--min-len {args.min_len} exceeds --max-len {args.max_len}")
    try:
        args.search_variants = parse_checkpointing_variants(args.search_checkpointing)
    except ValueError as exc:
        p.error(f"--search-checkpointing: {exc}")
    if args.checkpoint_every < 1:
        p.error("--checkpoint-every must be >= 1")
    if args.steps < 1 or args.micro_batch < 1 or args.warmup < 0 or args.grad_accum < 1:
        p.error("--steps, --micro-batch and --grad-accum must be >= 1, --warmup >= 0")
    if args.grad_accum > 1 and args.max_budget_search:
        p.error("--max-budget-search tries one micro-batch per optimizer step; run it without --grad-accum (a "
                "micro-batch's memory does not depend on the accumulation)")
    if args.pack_length < args.max_len:
        p.error(f"--pack-length {args.pack_length} is shorter than the longest sample (--max-len {args.max_len})")
    try:
        args.arms = parse_arms(args.arm or DEFAULT_ARMS)
        args.search_lever_set = frozenset(parse_arm("search=packed" + "".join("+" + l for l in args.search_levers.split("+") if l)).levers)
    except ValueError as exc:
        p.error(str(exc))
    if args.skip_baseline:
        args.arms = [a for a in args.arms if a.collate != "padded"]
    for arm in args.arms:
        budget = arm.budget or args.pack_tokens
        if budget is not None and budget < args.max_len:
            p.error(f"arm {arm.name}: budget {budget} is below the longest sample (--max-len {args.max_len})")
    if args.engine == "torch":
        if args.zero != "2" or args.ds_override or args.full_ft or args.client_optimizer:
            p.error("--engine torch has no DeepSpeed: it takes no --zero, --ds-override, --client-optimizer or --full-ft")
        with_ds = sorted(lever for lever in set().union(args.search_lever_set, *(a.levers for a in args.arms))
                         if lever.startswith("ds_"))
        if with_ds:
            p.error(f"--engine torch has no DeepSpeed: drop the {', '.join(with_ds)} lever(s)")
    if not any(a.collate == "packed" for a in args.arms):
        p.error("at least one packed arm is needed (the headline figures are the fastest packed arm's)")
    return args


def build_arms(args, pool: SamplePool, n_steps: int) -> Dict[str, Arm]:
    """Every arm's collated micro-batches, ``--grad-accum`` per optimizer step, for ``n_steps`` steps: arms with
    the same grouping (budget) hold the same samples per step."""
    from gpt4roi_sft.data.collator import PackingCollator, PaddingCollator

    groups: Dict[Optional[int], List[List[dict]]] = {}
    arms: Dict[str, Arm] = {}
    for spec in args.arms:
        budget = spec.budget or args.pack_tokens
        if budget not in groups:
            groups[budget] = pool.groups(n_steps * args.grad_accum, args.micro_batch, budget)
        if spec.collate == "padded":
            collator = PaddingCollator(PAD_ID)
        else:
            collator = PackingCollator(args.pack_length, PAD_ID, pad_to_multiple=args.pad_to_multiple)
        arms[spec.name] = Arm(spec, collate_groups(groups[budget], collator), [sample_stats(g) for g in groups[budget]],
                              attn=args.ours_attn if spec.collate == "packed" else None,
                              required=spec.collate == "padded" or spec == args.arms[0])
    if args.flex_arm:  # the first packed arm's rows at one fixed length (a multiple of flex attention's 128-token blocks)
        first = next(a for a in arms.values() if a.spec.collate == "packed")
        fixed = -(-max(b["input_ids"].shape[1] for b in first.batches) // 128) * 128
        spec = ArmSpec("ours_flex", "packed", first.spec.levers, first.spec.budget)
        arms["ours_flex"] = Arm(spec, [pad_packed_batch(b, fixed) for b in first.batches], first.stats, attn="flex_attention")
    return arms


def run(args) -> dict:
    """Build, time the arms (and the extras), and return the result dict (also written to disk)."""
    import tempfile

    started = time.monotonic()

    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if not args.tiny and on_cpu:
        raise SystemExit("train_throughput: the real-shape (7B) mode needs a CUDA GPU; use --tiny on CPU")
    device = torch.device("cpu") if on_cpu else torch.device("cuda", 0)
    if not on_cpu:
        torch.cuda.set_device(device)
    if args.profile_busy and on_cpu:
        log.warning("--profile-busy measures a GPU's kernel time; skipped on the CPU")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    attn = args.attn or "sdpa"
    torch.manual_seed(args.seed)
    comm = init_single_process_group(on_cpu, args.port)

    config = tiny_bench_config(attn) if args.tiny else real_config(args.image_size, attn)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    log.info("built %s model in %.1f s", "tiny" if args.tiny else "7B", time.perf_counter() - t0)
    flop_model = FlopModel.from_config(config, lora_rank=None if args.full_ft else args.lora_r, full_ft=args.full_ft)

    shape = SampleShape(config.num_image_tokens, config.image_size, config.text_config.vocab_size, config.image_token_id,
                        config.bbox_token_id, min_len=args.min_len, max_len=args.max_len)
    pool = SamplePool(shape, args.seed)
    arms = build_arms(args, pool, args.warmup + args.steps)

    peak = None if on_cpu else peak_flops_for(torch.cuda.get_device_name(device))
    matmul_n = args.matmul_size or (1024 if on_cpu else 8192)
    matmul_rate = measure_matmul_rate(device, torch.float32 if on_cpu else torch.bfloat16, matmul_n)

    with tempfile.TemporaryDirectory(prefix="bench_ds_") as workdir:
        engine, stage, counts = prepare_engine(model, args, on_cpu, Path(workdir))
        switch = LeverSwitch(engine, device)
        results = time_arms(engine, arms, args.warmup, device, dtype, flop_model, peak, matmul_rate, switch, comm,
                            accum=args.grad_accum, profile_busy=args.profile_busy)
        # what the engine ran for the arms (warm-up, timed and profiled steps): optimizer steps x --grad-accum micro-steps
        engine_steps = {"optimizer": int(engine.global_steps), "micro": int(engine.micro_steps)}
        generation = None
        if args.eval_generation:
            if stage == 3:
                log.warning("--eval-generation skipped under ZeRO-3 (parameters are partitioned)")
            else:
                generation = generation_throughput(engine, pool.items, args, device, dtype)
        searches = None
        if args.max_budget_search:
            searches = []
            cap = cap_device_memory(device, args.search_memory_gb)
            deadline = None if args.time_limit_s is None else started + args.time_limit_s
            for every in args.search_variants:
                set_checkpointing(engine.module, every)
                start = max(args.search_start, searches[-1]["max_pack_tokens"]) if searches else args.search_start
                found = find_max_budget(engine, pool, switch, args.search_lever_set, args.pack_length, args.pad_to_multiple,
                                        device, dtype, start, args.search_limit, deadline=deadline)
                found.update(gradient_checkpointing=every is not None, checkpoint_every=every,
                             levers=sorted(args.search_lever_set), memory_cap_gb=cap)
                searches.append(found)
                if "stopped_by" in found:
                    break

    return build_result(args, config=config, device=device, attn=attn, arms=results, flop_model=flop_model, peak=peak,
                        matmul_rate=matmul_rate, matmul_n=matmul_n, counts=counts, generation=generation,
                        searches=searches, items=pool.items, engine_steps=engine_steps)


def parse_checkpointing_variants(text: str) -> List[Optional[int]]:
    """``"off,2,1"`` -> ``[None, 2, 1]`` (None: no checkpointing; n: every n-th decoder layer), from the least
    activation memory saved to the most, so each search can start at the budget the one before it found."""
    variants: List[Optional[int]] = []
    for part in ("off,1" if text.strip() == "both" else text).split(","):
        part = part.strip()
        if part == "off":
            variants.append(None)
        elif part.isdigit() and int(part) >= 1:
            variants.append(int(part))
        else:
            raise ValueError(f"{part!r} is neither off nor a layer interval >= 1")
    if len(set(variants)) != len(variants):
        raise ValueError(f"{text!r} names a variant twice")
    order = sorted(variants, key=lambda v: -1 if v is None else 1.0 / v)
    if variants != order:
        raise ValueError(f"{text!r}: give them from the least saving to the most ({','.join('off' if v is None else str(v) for v in order)})")
    return variants


def set_checkpointing(model, every: Optional[int]) -> None:
    """Activation checkpointing of the engine's model switched at run time (None: off), as model.checkpoint_every sets it."""
    from gpt4roi_sft.train.modes import enable_activation_checkpointing, unwrap_base_model

    if every is None:
        unwrap_base_model(model).gradient_checkpointing_disable()
    else:
        enable_activation_checkpointing(model, every)


def cap_device_memory(device: torch.device, gb: Optional[float]) -> Optional[float]:
    """Limit this process's CUDA allocations to ``gb`` (so a large card answers for a smaller one); returns the cap
    in force (None: the whole device). What the engine already holds counts against it, as it would there."""
    if gb is None:
        return None
    if device.type != "cuda":
        log.warning("--search-memory-gb caps CUDA memory; ignored on the CPU")
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if gb * 1e9 >= total:
        log.warning("--search-memory-gb %.1f is not below this device's %.1f GB; searching all of it", gb, total / 1e9)
        return None
    torch.cuda.empty_cache()  # cached blocks above the cap would otherwise stay usable
    torch.cuda.set_per_process_memory_fraction(gb * 1e9 / total, device)
    log.info("budget search capped at %.1f GB of %.1f GB", gb, total / 1e9)
    return gb


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summary_table([json.loads(path.read_text()) for path in args.summarize]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "gpt4roi_sft.train.speedups"):  # levers switch every step
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
