"""Time the Pix2Cap-COCO converter on a full-size annotation file (no images needed).

Builds a COCO-panoptic JSON the size of Pix2Cap-COCO (20,550 images, 167,254 captioned segments of
~23 words, ~50 MB) from a fixed seed, then runs ``python -m data_converters.pix2cap`` on it as a user
would (JSON load included) and prints the wall time.

    python bench/convert_pix2cap.py [--images 20550] [--captions 167254] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("a man in dark suit stands near the wooden table with red cup on it while small dog sleeps under "
         "chair beside window and green plant grows in white pot casting long shadow across floor").split()


def full_size_annotations(n_images: int, n_captions: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    images, annotations = [], []
    per_image = [n_captions // n_images + (1 if i < n_captions % n_images else 0) for i in range(n_images)]
    sid = 0
    for i, n in enumerate(per_image):
        w, h = rng.choice((640, 480, 427, 500)), rng.choice((480, 427, 640, 375))
        segments = []
        for _ in range(n):
            sid += 1
            x, y = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
            bw, bh = rng.uniform(1, w - x + 20), rng.uniform(1, h - y + 20)  # some cross the border
            words = rng.choices(WORDS, k=rng.randint(15, 31))
            segments.append({"id": sid, "category_id": rng.randint(1, 200), "iscrowd": 0,
                             "bbox": [round(x, 1), round(y, 1), round(bw, 1), round(bh, 1)],
                             "area": int(bw * bh * 0.6), "description": " ".join(words).capitalize() + "."})
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": w, "height": h})
        annotations.append({"image_id": i + 1, "file_name": f"{i + 1:012d}.png", "segments_info": segments})
    categories = [{"id": c, "name": f"class{c}", "supercategory": "x", "isthing": int(c <= 80)} for c in range(1, 201)]
    return {"images": images, "annotations": annotations, "categories": categories}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_550)
    parser.add_argument("--captions", type=int, default=167_254)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        src = work / "pix2cap_coco_train.json"
        src.write_text(json.dumps(full_size_annotations(args.images, args.captions)), encoding="utf-8")
        out, stats = work / "train.jsonl", work / "stats.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_converters.pix2cap", "--annotations", str(src), "--out", str(out),
                        "--stats", str(stats)], check=True, cwd=Path(__file__).resolve().parents[1])
        seconds = time.perf_counter() - start
        summary = json.loads(stats.read_text())
        print(json.dumps({"input_mb": round(src.stat().st_size / 2 ** 20, 1),
                          "output_mb": round(out.stat().st_size / 2 ** 20, 1), "seconds": round(seconds, 2),
                          "images": summary["images"], "records": summary["records"],
                          "regions": summary["regions"], "captions_per_second": round(summary["regions"] / seconds)}))


if __name__ == "__main__":
    main()
