"""Data-loading throughput on CPU: how many Pix2Cap training samples per second the input pipeline makes.

The GPU must never wait for data. This times the real path a training run takes, on synthetic Pix2Cap-COCO
files: ``data_converters.synthetic`` -> ``data_converters.pix2cap`` -> :class:`ConversationDataset` (JSONL
read through the byte-offset index, JPEG decode, resize to the tower's square, template + tokenization +
label mask, ``<image>`` expansion) -> collator (packing or padding) -> ``DataLoader`` with 0 and 2 workers.

The synthetic images are 160-320 px wide; ``--upscale 2`` (the default) re-saves them (and scales their
boxes) to 320-640 x 240-480, about COCO's size, so JPEG decode costs what it would on the real data.

    python bench/data_loading.py [--images 64] [--image-size 336] [--workers 0 2] [--out FILE]

A 7B LoRA step on one GPU consumes a few samples per second (bench/train_throughput.py reports
samples/s), so the figure to compare against is that, per GPU, with the cores the machine has per GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

log = logging.getLogger("bench.data_loading")

ROOT = Path(__file__).resolve().parents[1]


def make_dataset_files(workdir: Path, images: int, upscale: int, seed: int) -> Path:
    """Synthetic Pix2Cap-COCO under ``workdir/data`` converted to ``workdir/train.jsonl``; returns the JSONL path."""
    from data_converters import pix2cap, synthetic

    data = workdir / "data"
    synthetic.generate(data, train_images=images, val_images=0, seed=seed)
    jsonl = workdir / "train.jsonl"
    pix2cap.main(["--annotations", str(data / "annotations" / "pix2cap_coco_train.json"), "--out", str(jsonl),
                  "--seed", str(seed)])
    if upscale > 1:
        upscale_records(jsonl, data, upscale)
    return jsonl


def upscale_records(jsonl: Path, image_root: Path, factor: int) -> None:
    """Re-save every image ``factor`` times larger (quality 92, as COCO-like JPEGs) and scale the records to match."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    done = set()
    for rec in records:
        if rec["image"] not in done:
            path = image_root / rec["image"]
            with Image.open(path) as im:
                im.convert("RGB").resize((im.width * factor, im.height * factor), Image.BICUBIC).save(path, quality=92)
            done.add(rec["image"])
        rec["width"], rec["height"] = rec["width"] * factor, rec["height"] * factor
        for region in rec["regions"]:
            region["bbox"] = [v * factor for v in region["bbox"]]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))


def build_dataset(jsonl: Path, image_root: Path, image_size: int, max_length: int):
    """The training dataset with the tiny model's tokenizer and a CLIP-sized image transform."""
    from gpt4roi_sft.constants import IMAGE_TOKEN
    from gpt4roi_sft.data.dataset import ConversationDataset
    from gpt4roi_sft.data.image_transform import ImageTransform
    from quickstart.tiny_model import tiny_tokenizer_corpus
    from gpt4roi_sft.tokenization import train_llama_like_tokenizer

    tokenizer = train_llama_like_tokenizer(tiny_tokenizer_corpus())
    num_image_tokens = (image_size // 14) ** 2
    return ConversationDataset(str(jsonl), image_root=str(image_root), tokenizer=tokenizer,
                               image_transform=ImageTransform(size=image_size, resize_mode="squash"),
                               image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                               num_image_tokens=num_image_tokens, template="gpt4roi_v0", max_length=max_length)


def time_loader(dataset, collator, workers: int, micro_batch: int, passes: int) -> dict:
    """Samples/s over ``passes`` epochs; the first batch (worker start-up) is reported apart from the steady rate."""
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    first = None
    samples = tokens = 0
    for _ in range(passes):
        loader = DataLoader(dataset, batch_size=micro_batch, shuffle=False, collate_fn=collator, num_workers=workers)
        for batch in loader:
            if first is None:
                first = time.perf_counter() - t0
                steady_start, steady_samples = time.perf_counter(), 0
            else:
                steady_samples += len(batch["boxes"])
            samples += len(batch["boxes"])
            tokens += int(batch["num_tokens"])
    total = time.perf_counter() - t0
    steady = time.perf_counter() - steady_start
    return {"workers": workers, "samples": samples, "seconds": total, "samples_per_s": samples / total,
            "steady_samples_per_s": steady_samples / steady if steady > 0 else None, "first_batch_s": first,
            "tokens_per_s": tokens / total}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="synthetic images (one dialogue each)")
    p.add_argument("--image-size", type=int, default=336, help="square side the tower sees (224 or 336)")
    p.add_argument("--upscale", type=int, default=2, help="enlarge the synthetic JPEGs to about COCO size")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--collator", choices=("packing", "padding"), default="packing")
    p.add_argument("--passes", type=int, default=2, help="epochs over the files per worker count")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/<date>_cpu_data_loading.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bench.throughput.device import device_name
    from gpt4roi_sft.atomic import write_json_atomic
    from gpt4roi_sft.data.collator import PackingCollator, PaddingCollator

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        jsonl = make_dataset_files(work, args.images, args.upscale, args.seed)
        log.info("synthetic data + conversion: %.1f s", time.perf_counter() - t0)
        dataset = build_dataset(jsonl, work / "data", args.image_size, args.max_length)
        collator = (PackingCollator(args.micro_batch * args.max_length, 0) if args.collator == "packing"
                    else PaddingCollator(0))
        runs: List[dict] = []
        for workers in args.workers:
            runs.append(time_loader(dataset, collator, workers, args.micro_batch, args.passes))
            log.info("%d workers: %.1f samples/s", workers, runs[-1]["samples_per_s"])
        lengths = [len(dataset[i]["input_ids"]) for i in range(min(len(dataset), 32))]
    result = {
        "device": device_name(torch.device("cpu")),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_end": os.getloadavg()[0],  # other tenants of a shared machine show up here
        "runs": runs,
        "settings": {"images": args.images, "records": len(dataset), "image_size": args.image_size, "upscale": args.upscale,
                     "micro_batch": args.micro_batch, "collator": args.collator, "passes": args.passes,
                     "mean_sample_tokens_first_32": sum(lengths) / len(lengths)},
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    out = args.out or ROOT / "bench" / "results" / f"{_dt.date.today().isoformat()}_cpu_data_loading.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result, indent=1)
    print(f"device: {result['device']}")
    print(f"{'workers':>7}  {'samples/s':>9}  {'steady samples/s':>16}  {'first batch s':>13}")
    for r in runs:
        steady = "n/a" if r["steady_samples_per_s"] is None else f"{r['steady_samples_per_s']:.1f}"
        print(f"{r['workers']:>7}  {r['samples_per_s']:>9.1f}  {steady:>16}  {r['first_batch_s']:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
