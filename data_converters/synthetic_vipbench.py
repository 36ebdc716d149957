"""A small ViP-Bench-layout set built offline, so the harness runs in tests and from the README.

Each source image holds flat-coloured shapes whose colour and kind are known. Questions ask about one
shape (``<obj>``) or two (``<obj1>``, ``<obj2>``); their labelme shapes alternate between rectangles and
polygons (an octagon around the shape, whose enclosing box is the shape's box). The ``bbox`` split draws
rectangles around the referred shapes, the ``human`` split ellipses, and the split texts name the marks in
words as the real benchmark does. Images come from the synthetic Pix2Cap generator's val split when
``--synthetic DIR`` is given, else are drawn here.

    python -m data_converters.synthetic_vipbench --out DIR [--synthetic DIR] [--questions N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from data_converters.synthetic import COLOURS, KINDS
from gpt4roi_sft.atomic import write_json_atomic, write_text_atomic
from gpt4roi_sft.data.schema import xywh_to_xyxy
from gpt4roi_sft.errors import DataError, run_cli

logger = logging.getLogger(__name__)

PALETTE = {name: COLOURS[name] for name in ("red", "blue", "yellow", "purple")}
MARK_COLOURS = (("red", (255, 0, 0)), ("green", (0, 200, 0)))
SIDES = {"square": "4<OR>four", "triangle": "3<OR>three", "circle": "0<OR>none<OR>no sides"}

Shape = Tuple[str, str, List[float]]  # colour, kind, xyxy box


def _draw_scene(rng: np.random.Generator, size=(160, 120)) -> Tuple[Image.Image, List[Shape]]:
    w, h = size
    img = Image.new("RGB", size, (160, 205, 240))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, h // 2, w, h], fill=(70, 150, 60))
    shapes = []
    for col in range(2):
        colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
        kind = KINDS[int(rng.integers(len(KINDS)))]
        side = int(rng.integers(30, 45))
        x1 = col * w // 2 + int(rng.integers(8, w // 2 - side - 8))
        y1 = int(rng.integers(10, h - side - 10))
        box = [x1, y1, x1 + side, y1 + side]
        fill = PALETTE[colour]
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        elif kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x1 + side / 2, y1), (x1, y1 + side), (x1 + side, y1 + side)], fill=fill)
        shapes.append((colour, kind, [float(v) for v in box]))
    return img, shapes


def _synthetic_scenes(synthetic: Path, count: int) -> List[Tuple[Image.Image, List[Shape]]]:
    ann_path = synthetic / "annotations" / "pix2cap_coco_val.json"
    if not ann_path.is_file():
        raise DataError(f"{ann_path}: not found (run python -m data_converters.synthetic --out {synthetic} first)")
    data = json.loads(ann_path.read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    scenes = []
    for ann in data["annotations"]:
        things = [s for s in ann["segments_info"] if "colour" in s.get("attributes", {})]
        if len(things) < 2:
            continue
        img = Image.open(synthetic / "val2017" / files[ann["image_id"]]).convert("RGB")
        shapes = [(s["attributes"]["colour"], s["attributes"]["kind"],
                   xywh_to_xyxy(s["bbox"], f"{ann_path}: segment {s.get('id')}")) for s in things[:2]]
        scenes.append((img, shapes))
        if len(scenes) == count:
            break
    if not scenes:
        raise DataError(f"{ann_path}: no val image with two things to ask about")
    return scenes


def _octagon(box: List[float]) -> List[List[float]]:
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) / 3, (y2 - y1) / 3
    return [[x1 + dx, y1], [x2 - dx, y1], [x2, y1 + dy], [x2, y2 - dy], [x2 - dx, y2], [x1 + dx, y2], [x1, y2 - dy], [x1, y1 + dy]]


def _question(k: int, shapes: List[Shape]) -> Tuple[str, str, List[str], List[int]]:
    """(meta question, answer, capabilities, indices of the shapes referred to, in obj order)."""
    (c0, k0, _), (_, k1, _) = shapes[0], shapes[1]
    variant = k % 4
    if variant == 0:
        return "What colour is the shape <obj>?", c0, ["rec"], [0]
    if variant == 1:
        return "What kind of shape is <obj>?", k0, ["rec"], [0]
    if variant == 2:
        return "How many straight sides does the shape <obj> have?", SIDES[k0], ["rec", "math"], [0]
    return ("What is the colour of <obj1> and what kind of shape is <obj2>?", f"{c0}<AND>{k1}", ["rec", "rel"], [0, 1])


def build_fixture(out: Path, num_questions: int = 8, seed: int = 0, synthetic: Optional[Path] = None) -> dict:
    """Write the fixture under ``out``; return ``{"questions": n, "source_images": m}``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    scenes = (_synthetic_scenes(Path(synthetic), num_questions) if synthetic
              else [_draw_scene(rng) for _ in range(num_questions)])
    for sub in ("source_image", "bbox/images", "human/images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    meta, lines = {}, {"bbox": [], "human": []}
    for k in range(num_questions):
        src_idx = k % len(scenes)
        img, shapes = scenes[src_idx]
        src_name, img_name = f"v1_{src_idx}.png", f"v1_{src_idx}_{k}.png"
        question, answer, caps, refs = _question(k, shapes)
        if not (out / "source_image" / src_name).exists():
            img.save(out / "source_image" / src_name)
            labelme_shapes = []
            for j, (_, _, box) in enumerate(shapes):
                polygon = (src_idx + j) % 2 == 1
                labelme_shapes.append({"label": f"obj{j + 1}" if j else "obj",
                                       "shape_type": "polygon" if polygon else "rectangle",
                                       "points": _octagon(box) if polygon else [box[:2], box[2:]]})
            # labelme names the first object "obj"; a two-object question refers to it as <obj1>.
            write_json_atomic(out / "source_image" / src_name.replace(".png", ".json"),
                              {"shapes": labelme_shapes, "imagePath": src_name,
                               "imageWidth": img.width, "imageHeight": img.height})
        for split, drawer, noun in (("bbox", "rectangle", "rectangle"), ("human", "ellipse", "circle")):
            marked = img.copy()
            draw = ImageDraw.Draw(marked)
            text = question
            for n, idx in enumerate(refs):
                colour_name, rgb = MARK_COLOURS[n]
                x1, y1, x2, y2 = shapes[idx][2]
                getattr(draw, drawer)([x1 - 3, y1 - 3, x2 + 3, y2 + 3], outline=rgb, width=2)
                text = text.replace("<obj>" if len(refs) == 1 else f"<obj{n + 1}>", f"within the {colour_name} {noun}", 1)
            marked.save(out / split / "images" / img_name)
            lines[split].append(json.dumps({"question_id": k, "image": img_name, "text": text, "category": "+".join(caps)}))
        meta[f"v1_{k}"] = {"image_source": src_name, "image": img_name, "question": question, "answer": answer,
                           "capability": caps}
    write_json_atomic(out / "vip-bench-meta-data.json", meta)
    for split in ("bbox", "human"):
        write_text_atomic(out / split / "questions.jsonl", "\n".join(lines[split]) + "\n")
    return {"questions": num_questions, "source_images": min(num_questions, len(scenes))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_converters.synthetic_vipbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--synthetic", type=Path, help="output folder of python -m data_converters.synthetic")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = build_fixture(args.out, args.questions, args.seed, args.synthetic)
    print(f"ViP-Bench fixture: {counts['questions']} questions over {counts['source_images']} images in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
