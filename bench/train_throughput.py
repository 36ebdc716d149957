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
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.flops import FlopModel, measure_matmul_rate, peak_flops_for
from bench.throughput.arms import find_max_micro_batch, generation_throughput, time_arms
from bench.throughput.engine import (ROOT, ZERO_CONFIGS, build_model, init_single_process_group, prepare_engine,
                                     real_config, tiny_bench_config)
from bench.throughput.report import build_result, format_table, results_path, summary_table
from bench.throughput.samples import PAD_ID, SampleShape, collate_steps, pad_packed_batch, sample_stats, synthetic_sample

log = logging.getLogger("bench.train_throughput")


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

    return build_result(args, config=config, device=device, attn=attn, arms=arms, stats=stats, items=items,
                        flop_model=flop_model, peak=peak, matmul_rate=matmul_rate, matmul_n=matmul_n,
                        pack_len=pack_len, counts=counts, generation=generation, search=search)


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
