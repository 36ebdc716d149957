"""Evaluation throughput: regions/s of VG region captioning, the fast decode path against eager ``generate``.

Both arms run the VG harness' own code on the same synthetic VG test file (``data_converters.synthetic``'s
images, its ``test_caption.json`` repeated to ``--regions`` samples) with one model in memory:
``eval.vg.load_vg_test`` -> ``eval.vg.generate_predictions`` -> ``harness.generate_missing`` ->
``RegionCaptioner.plan`` (longest prompts first) and ``RegionCaptioner.__call__``:

* fast: ``RegionCaptioner(fast=FastDecoding())``: static KV cache, the decode step compiled with CUDA graphs
  (on the CPU: static cache, nothing compiled), questions about one image sharing its vision tower, region maps
  and prompt prefill; batch size from free memory (``--batch-size auto``);
* fast_unshared: the same captioner with ``share_prefix`` off: every row does its own image's work, which is
  what a test file with one region per image costs;
* eager: ``RegionCaptioner()``: plain ``generate``, dynamic KV cache; ``--eager-batch-size`` (64: the setting
  of the earlier H200 measurement).

The synthetic file asks ``regions_per_image`` questions per image (``--regions`` over ``--images`` images of
2-3 objects each, the generator's test file repeated): sharing pays in proportion to it.

Default: GPT4RoI-7B shapes (``bench/throughput/engine.real_config``, CLIP ViT-L/14 at 224 px, Vicuna-7B) with
random bf16 weights built on the GPU, the tiny model's tokenizer; every answer is forced to ``--new-tokens``
tokens (``min_new_tokens``: random weights would end answers at random). ``--tiny``: the tiny test model on
the CPU, so the code path runs in CI.

Per arm: regions/s and new tokens/s over the whole timed run (image decoding, batching and storing included),
the split of one full batch into host preparation, prefill (``max_new_tokens=1``) and decode steps
(ms per step), the first call's time (compilation and CUDA-graph capture for the fast arm), peak memory; and
the share of regions both arms answered alike (greedy; random bf16 weights have many near-ties, so parting
there is expected on the GPU; the tiny fp32 model agrees everywhere). Writes
``bench/results/<date>_<device>_eval.json`` (``regions_per_s``: the fast arm's) and prints a table.

    python bench/eval_throughput.py --tiny      # CPU smoke run
    python bench/eval_throughput.py             # one GPU, <= ~3 min on an H100
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.throughput.device import Clock, device_name, peak_memory_gb, reset_peak_memory
from bench.throughput.engine import ROOT, build_model, real_config
from bench.throughput.report import git_commit, slug

log = logging.getLogger("bench.eval_throughput")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny test model on CPU (CI smoke run)")
    p.add_argument("--regions", type=int, default=None, help="regions the fast arm captions (default 1024; tiny 16)")
    p.add_argument("--eager-regions", type=int, default=None, help="regions the eager arm captions (default 128; tiny 8)")
    p.add_argument("--unshared-regions", type=int, default=None,
                   help="regions of a third arm: the fast path with share_prefix off, i.e. what one region per image "
                        "costs (default 512; tiny 8; 0 skips it)")
    p.add_argument("--batch-size", default="auto", help="fast arm: prompts per batch or 'auto' (from free memory)")
    p.add_argument("--eager-batch-size", type=int, default=None, help="eager arm: prompts per batch (default 64; tiny 4)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per region (default 32; tiny 8)")
    p.add_argument("--images", type=int, default=None, help="distinct synthetic images (default 64; tiny 4)")
    p.add_argument("--repeats", type=int, default=3, help="timings of the one-batch split (median)")
    p.add_argument("--skip-eager", action="store_true", help="time only the fast arm")
    p.add_argument("--attn", default="sdpa", help="attention implementation of the 7B model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/<date>_<device>_eval.json)")
    args = p.parse_args(argv)
    for name, real, small in (("regions", 1024, 16), ("eager_regions", 128, 8), ("unshared_regions", 512, 8),
                              ("eager_batch_size", 64, 4),
                              ("new_tokens", 32, 8), ("images", 64, 4)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.tiny else real)
    if args.batch_size != "auto":
        args.batch_size = int(args.batch_size)
    if min(args.regions, args.eager_regions, args.eager_batch_size, args.new_tokens, args.images) < 1 or args.unshared_regions < 0:
        p.error("--regions, --eager-regions, --eager-batch-size, --new-tokens and --images must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------- inputs
def vg_test_file(workdir: Path, regions: int, images: int, seed: int) -> tuple:
    """The synthetic generator's VG test file repeated to ``regions`` samples; returns (annotations, image root)."""
    from data_converters.synthetic import generate
    from gpt4roi_sft.json_io import load_json

    root = workdir / "data"
    generate(root, 0, images, seed)
    base = load_json(root / "annotations" / "test_caption.json")
    entries, anns = [], []
    for k in range(regions):
        image, ann = base["images"][k % len(base["images"])], base["annotations"][k % len(base["annotations"])]
        entries.append({**image, "id": k + 1})
        anns.append({**ann, "id": k + 1, "image_id": k + 1})
    path = workdir / "test_caption.json"
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": base["categories"]}))
    return path, root


def build_models(args, workdir: Path, device: torch.device):
    """``(model, processor, label)``: the tiny model, or 7B shapes with random bf16 weights and the tiny tokenizer."""
    from gpt4roi_sft import load_model
    from gpt4roi_sft.data.image_transform import ImageTransform
    from gpt4roi_sft.model.processing import GPT4RoIProcessor
    from quickstart.tiny_model import build_tiny_model

    tiny_dir = build_tiny_model(str(workdir / "tiny"), seed=args.seed)
    if args.tiny:
        model, processor = load_model(tiny_dir, attn_implementation="sdpa")
        return model.to(device).eval(), processor, "tiny model (fp32)"
    _, tiny_processor = load_model(tiny_dir)
    tokenizer = tiny_processor.tokenizer
    config = real_config(224, args.attn)
    config.image_token_id, config.bbox_token_id = tiny_processor.image_token_id, tiny_processor.bbox_token_id
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_model(config, device, torch.bfloat16).eval()
    gen = model.language_model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = text.bos_token_id, text.eos_token_id, text.pad_token_id
    log.info("built the 7B-shaped model in %.1f s", time.perf_counter() - t0)
    processor = GPT4RoIProcessor(tokenizer, ImageTransform(size=config.image_size), config.num_image_tokens)
    return model, processor, "GPT4RoI-7B shapes, random bf16 weights, 224 px"


# ------------------------------------------------------------------------------------------------- arms
class TokenCounter:
    """Counts the tokens a captioner generates (pads after a row's end excluded) while in a ``with`` block, by
    wrapping its ``new_tokens`` (the method ``__call__`` decodes through)."""

    def __init__(self, captioner):
        self.captioner = captioner
        self.count = 0

    def __enter__(self):
        pad = self.captioner.processor.tokenizer.pad_token_id
        inner = self.captioner.new_tokens

        def counted(requests, **overrides):
            out = inner(requests, **overrides)
            self.count += int((out != pad).sum())
            return out

        self.captioner.new_tokens = counted
        return self

    def __exit__(self, *exc):
        del self.captioner.new_tokens


def median_time(clock: Clock, fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock.now()
        fn()
        times.append(clock.now() - t0)
    return statistics.median(times)


def time_arm(name: str, captioner, samples, rows: int, args, device, workdir: Path) -> dict:
    """One arm through the VG harness: a first (untimed) batch, the timed run, then the split of one batch."""
    from eval import vg
    from eval.prediction_store import PredictionStore
    from gpt4roi_sft.infer import RegionRequest

    clock = Clock(device)
    reset_peak_memory(device)
    t0 = clock.now()
    vg.generate_predictions(samples[:rows], captioner, PredictionStore(workdir / f"{name}_first.jsonl"), batch_size=rows)
    first_s = clock.now() - t0
    log.info("%s: first batch of %d (compile, capture) took %.1f s", name, rows, first_s)

    store = PredictionStore(workdir / f"{name}.jsonl")
    with TokenCounter(captioner) as counter:
        t0 = clock.now()
        vg.generate_predictions(samples, captioner, store, batch_size=rows)
        seconds = clock.now() - t0
    new_tokens = counter.count

    requests = [RegionRequest(s.image_path, vg.DEFAULT_PROMPT, [s.box]) for s in samples[:rows]]
    prepare_s = median_time(clock, lambda: captioner.prepare(requests), args.repeats)
    prefill_s = median_time(clock, lambda: captioner.new_tokens(requests, max_new_tokens=1, min_new_tokens=1), args.repeats) - prepare_s
    batch_s = median_time(clock, lambda: captioner.new_tokens(requests), args.repeats) - prepare_s
    result = {
        "arm": name, "regions": len(samples), "batch_size": rows, "seconds": seconds,
        "regions_per_image": len(samples) / len({s.image_path for s in samples}),
        "regions_per_s": len(samples) / seconds, "new_tokens": new_tokens, "new_tokens_per_s": new_tokens / seconds,
        "first_batch_s": first_s, "prepare_s_per_batch": prepare_s, "prefill_s_per_batch": prefill_s,
        "ms_per_decode_step": 1000 * (batch_s - prefill_s) / max(args.new_tokens - 1, 1),
        "peak_mem_gb": peak_memory_gb(device),
        "answers": {key: rec["caption"] for key, rec in store.records.items()},
    }
    log.info("%s: %.1f regions/s, %.1f new tokens/s, %.1f ms per decode step, prefill %.3f s per batch of %d",
             name, result["regions_per_s"], result["new_tokens_per_s"], result["ms_per_decode_step"], prefill_s, rows)
    return result


def run(args) -> dict:
    from eval import vg
    from gpt4roi_sft.fast_decode import FastDecoding
    from gpt4roi_sft.infer import DecodeSettings, RegionCaptioner, RegionRequest

    on_cuda = torch.cuda.is_available()
    if not args.tiny and not on_cuda:
        raise SystemExit("eval_throughput: the 7B mode needs a CUDA GPU; use --tiny on CPU")
    device = torch.device("cuda", 0) if on_cuda and not args.tiny else torch.device("cpu")
    result = {"device": device_name(device), "date": dt.date.today().isoformat(), "git_commit": git_commit(),
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
              "arms": {}}
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        workdir = Path(tmp)
        annotations, image_root = vg_test_file(workdir, max(args.regions, args.eager_regions, args.unshared_regions),
                                               args.images, args.seed)
        samples, _ = vg.load_vg_test(annotations, image_root)
        model, processor, label = build_models(args, workdir, device)
        settings = DecodeSettings(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        fast = RegionCaptioner(model, processor, settings=settings, fast=FastDecoding())
        request = RegionRequest(samples[0].image_path, vg.DEFAULT_PROMPT, [samples[0].box])
        prompt_tokens = fast.prompt_length(request)
        rows = fast.auto_batch_size(prompt_tokens) if args.batch_size == "auto" else args.batch_size
        result.update(model=label, prompt_tokens=prompt_tokens, new_tokens_per_region=args.new_tokens,
                      settings={"tiny": args.tiny, "batch_size": args.batch_size, "attn": args.attn, "seed": args.seed,
                                "images": args.images, "dtype": str(next(model.parameters()).dtype)})
        if not args.skip_eager:
            eager = RegionCaptioner(model, processor, settings=settings)
            result["arms"]["eager"] = time_arm("eager", eager, samples[:args.eager_regions], args.eager_batch_size,
                                               args, device, workdir)
            write(args, result)  # an eager figure survives a fast arm that runs out of time
        result["arms"]["fast"] = time_arm("fast", fast, samples[:args.regions], rows, args, device, workdir)
        if args.unshared_regions:  # the same captioner (cache, compiled step), each row doing its own image's work
            write(args, result)
            fast.fast.share_prefix = False
            result["arms"]["fast_unshared"] = time_arm("fast_unshared", fast, samples[:args.unshared_regions], rows,
                                                       args, device, workdir)
    summarize(result)
    for arm in result["arms"].values():
        arm.pop("answers", None)
    return result


def summarize(result: dict) -> None:
    """The headline fields from the arms timed so far (a run cut short by its time limit still carries them)."""
    arms = result["arms"]
    fast, eager = arms.get("fast"), arms.get("eager")
    result["regions_per_s"] = fast["regions_per_s"] if fast else None
    result["regions_per_s_unshared"] = arms["fast_unshared"]["regions_per_s"] if "fast_unshared" in arms else None
    result["speedup_vs_eager"] = fast["regions_per_s"] / eager["regions_per_s"] if fast and eager else None
    if fast and eager and "answers" in eager and "answers" in fast:
        both = eager["answers"]
        result["answers_equal_fraction"] = sum(fast["answers"].get(k) == v for k, v in both.items()) / len(both)


def results_path(args, result: dict) -> Path:
    if args.out:
        return args.out
    kind = "cpu" if result["device"].startswith("CPU") else slug(result["device"])
    return ROOT / "bench" / "results" / f"{result['date']}_{kind}_eval.json"


def write(args, result: dict) -> Path:
    from gpt4roi_sft.atomic import write_json_atomic

    path = results_path(args, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    summarize(result)
    write_json_atomic(path, {k: v for k, v in result.items() if k != "arms"}
                      | {"arms": {n: {k: v for k, v in a.items() if k != "answers"} for n, a in result["arms"].items()}},
                      indent=1)
    return path


def format_table(result: dict) -> str:
    rows = [("arm", "batch", "regions/img", "regions/s", "new tok/s", "ms/step", "prefill s/batch", "prepare s/batch", "first s", "peak GB")]
    for a in result["arms"].values():
        rows.append((a["arm"], str(a["batch_size"]), f"{a['regions_per_image']:.1f}", f"{a['regions_per_s']:.1f}", f"{a['new_tokens_per_s']:.0f}",
                     f"{a['ms_per_decode_step']:.1f}", f"{a['prefill_s_per_batch']:.3f}", f"{a['prepare_s_per_batch']:.3f}",
                     f"{a['first_batch_s']:.1f}", f"{a['peak_mem_gb']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"device: {result['device']}  |  {result['model']}  |  prompt {result['prompt_tokens']} tokens, "
             f"{result['new_tokens_per_region']} new tokens per region"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if result.get("speedup_vs_eager") is not None:
        same = result.get("answers_equal_fraction")
        lines.append(f"fast vs eager: {result['speedup_vs_eager']:.2f}x regions/s" + (
            f"; answers equal for {100 * same:.0f}% of the eager arm's regions" if same is not None else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args)
    path = write(args, result)
    log.info("wrote %s", path)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
