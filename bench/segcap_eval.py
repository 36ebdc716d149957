"""Time the segmentation-captioning evaluator (``python -m eval.segcap``) on data the size of Pix2Cap-COCO val.

Writes a synthetic ground truth of 2,338 COCO-sized images (640x480 by default; three stuff bands and eight
things per image, ~23-word captions; some crowd segments and VOID pixels) and a perturbed prediction (segments
dropped, merged, shifted, spurious; captions partly reworded), then runs the evaluator as a user would, in a
subprocess, and records the wall time with the stage times from its log.

    python bench/segcap_eval.py [--images 2338] [--width 640 --height 480] [--workers 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("a man in dark suit stands near the wooden table with red cup on it while small dog sleeps under "
         "chair beside window and green plant grows in white pot casting long shadow across floor").split()
THINGS = tuple(range(1, 81))
STUFF = tuple(range(92, 201, 2))


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(17, 29))).capitalize() + "."


def _reword(caption: str, rng: random.Random) -> str:
    words = caption.rstrip(".").split()
    for _ in range(max(1, len(words) // 4)):
        words[rng.randrange(len(words))] = rng.choice(WORDS)
    return " ".join(words) + "."


def make_image(rng: random.Random, width: int, height: int):
    """Ground-truth ids, gt segments, predicted ids, predicted segments for one image."""
    gt = np.zeros((height, width), dtype=np.int64)
    segs = []
    sid = 0
    bands = np.linspace(0, height, 4).astype(int)
    for k, cat in enumerate(rng.sample(STUFF, 3)):
        sid += 1
        gt[bands[k]:bands[k + 1]] = sid
        segs.append({"id": sid, "category_id": cat, "iscrowd": 0})
    for _ in range(8):
        sid += 1
        w, h = rng.randint(width // 12, width // 3), rng.randint(height // 12, height // 3)
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        gt[y:y + h, x:x + w] = sid
        segs.append({"id": sid, "category_id": rng.choice(THINGS), "iscrowd": int(rng.random() < 0.03)})
    gt[: height // 40] = 0  # a VOID strip, as COCO-panoptic has unlabelled pixels
    pred = gt.copy()
    for seg in segs:
        r = rng.random()
        if r < 0.1:  # dropped: VOID in the prediction
            pred[pred == seg["id"]] = 0
        elif r < 0.3:  # shifted
            mask = gt == seg["id"]
            pred[np.roll(mask, rng.randint(3, 25), axis=1) & (pred == 0)] = seg["id"]
            pred[mask & ~np.roll(mask, rng.randint(3, 25), axis=1)] = 0
    things = [s for s in segs if s["category_id"] in THINGS]
    if rng.random() < 0.3 and len(things) >= 2:  # merged: the second thing takes the first's id
        pred[pred == things[1]["id"]] = things[0]["id"]
    spurious = sid + 1
    if rng.random() < 0.5:
        y, x = rng.randint(0, height - 30), rng.randint(0, width - 30)
        pred[y:y + 30, x:x + 30] = spurious
    gt_segments, pred_segments = [], []
    for seg in segs:
        seg["description"] = _caption(rng)
        ys, xs = np.nonzero(gt == seg["id"])
        if len(xs):  # a thing painted over entirely by later ones is no segment
            seg.update(area=len(xs), bbox=[int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)])
            gt_segments.append(seg)
    present = set(np.unique(pred).tolist())
    for seg in segs:
        if seg["id"] in present:
            cap = seg["description"] if rng.random() < 0.3 else _reword(seg["description"], rng)
            pred_segments.append({"id": seg["id"], "category_id": seg["category_id"], "caption": cap})
    if spurious in present:
        pred_segments.append({"id": spurious, "category_id": rng.choice(THINGS), "caption": _caption(rng)})
    return gt, gt_segments, pred, pred_segments


def write_dataset(work: Path, n_images: int, width: int, height: int, seed: int = 0):
    from data_converters.synthetic import encode_panoptic

    rng = random.Random(seed)
    gt_dir, pred_dir = work / "panoptic_val2017", work / "pred_png"
    gt_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    images, gt_anns, pred_anns = [], [], []
    for i in range(1, n_images + 1):
        gt, gt_segments, pred, pred_segments = make_image(rng, width, height)
        name = f"{i:012d}.png"
        Image.fromarray(encode_panoptic(gt)).save(gt_dir / name, compress_level=1)
        Image.fromarray(encode_panoptic(pred)).save(pred_dir / name, compress_level=1)
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": width, "height": height})
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": gt_segments})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": pred_segments})
    categories = ([{"id": c, "name": f"thing{c}", "isthing": 1} for c in THINGS]
                  + [{"id": c, "name": f"stuff{c}", "isthing": 0} for c in STUFF])
    gt_json, pred_json = work / "pix2cap_coco_val.json", work / "pred.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": categories}))
    pred_json.write_text(json.dumps({"images": images, "annotations": pred_anns, "categories": categories}))
    return gt_json, gt_dir, pred_json, pred_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2338)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep the data here; an existing one is reused")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>_cpu_segcap_eval.json)")
    args = parser.parse_args(argv)
    from bench.throughput.device import device_name
    from gpt4roi_sft.atomic import write_json_atomic

    import torch

    with tempfile.TemporaryDirectory(prefix="bench_segcap_") as tmp:
        work = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        if args.workdir and (work / "pred.json").is_file():  # a kept --workdir is reused as it is
            gt_json, gt_dir, pred_json, pred_dir = (work / "pix2cap_coco_val.json", work / "panoptic_val2017",
                                                    work / "pred.json", work / "pred_png")
            args.images = len(json.loads(gt_json.read_text())["annotations"])
        else:
            gt_json, gt_dir, pred_json, pred_dir = write_dataset(work, args.images, args.width, args.height, args.seed)
        make_s = time.perf_counter() - t0
        print(f"{args.images} ground-truth and predicted images ready in {make_s:.1f} s", file=sys.stderr)
        cmd = [sys.executable, "-m", "eval.segcap", "--gt-json", str(gt_json), "--gt-dir", str(gt_dir),
               "--pred-json", str(pred_json), "--pred-dir", str(pred_dir), "--out", str(work / "eval"),
               "--workers", str(args.workers)]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        metrics = json.loads((work / "eval" / "metrics.json").read_text())
        stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"stage (\S+): ([0-9.]+) s", proc.stderr)}
    result = {
        "device": device_name(torch.device("cpu")),
        "load_average_1m_at_end": os.getloadavg()[0],  # other tenants of a shared machine show up here
        "seconds": seconds,
        "images_per_s": args.images / seconds,
        "stages_s": stages,
        "settings": {"images": args.images, "width": args.width, "height": args.height, "workers": args.workers,
                     "gt_segments": metrics["gt_segments"], "map_records": metrics["map_records"],
                     "map_meteor": metrics["notes"]["mAP_meteor"], "spice": metrics["notes"]["spice"] is None},
        "counts": {k: metrics[k] for k in ("TP", "FP", "FN", "n_matched")},
        "data_generation_s": make_s,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    out = args.out or ROOT / "bench" / "results" / f"{_dt.date.today().isoformat()}_cpu_segcap_eval.json"
    write_json_atomic(out, result, indent=1)
    print(f"device: {result['device']}")
    print(f"{args.images} images ({args.width}x{args.height}, {metrics['gt_segments']} gt segments, "
          f"{args.workers} workers): {seconds:.1f} s, {result['images_per_s']:.1f} images/s; stages {stages}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
