"""Synthetic Pix2Cap-COCO: shapes over background bands, in the real dataset's files and layout.

The project cannot download COCO or Pix2Cap, so tests and the quickstart use this stand-in. Every image
has two "stuff" bands (sky on top; grass, sand or water below) and 2-3 "things" (a circle, square or
triangle with one of six flat colours and one of three sizes). Things sit in separate columns, so they
never overlap and each box shows mostly its own colour. Every segment carries a ~15-25 word
``description`` naming its colour, kind, size and position relative to a neighbour, so a model can only
caption a region correctly by looking inside it; the ground truth is also kept as an extra
``attributes`` key on each segment for evaluation (attribute accuracy).

Written layout (``DIR`` = ``--out``), matching the real dataset::

    DIR/train2017/<12-digit id>.jpg, DIR/val2017/<12-digit id>.jpg
    DIR/panoptic_train2017/<id>.png, DIR/panoptic_val2017/<id>.png    id = R + 256*G + 256**2*B
    DIR/annotations/pix2cap_coco_{train,val}.json                      COCO-panoptic + description
    DIR/annotations/test_caption.json                                  GLaMM-format VG test file (val things)

Thing attributes: ``{"colour", "kind", "size", "position"}``; stuff attributes: ``{"kind"}`` only.
Deterministic for a seed: each image draws from its own generator seeded by (seed, split, index).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_converters.templates import GPT4ROI_VG, region_question
from gpt4roi_sft.atomic import write_json_atomic
from gpt4roi_sft.constants import GPT4ROI_PREAMBLE, VG_EVAL_QUESTION
from gpt4roi_sft.errors import UserError, run_cli

log = logging.getLogger(__name__)

# Flat RGB colours, chosen far apart from each other and from the stuff colours below.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "blue": (35, 65, 230),
    "yellow": (245, 225, 40),
    "purple": (150, 45, 190),
    "orange": (250, 140, 25),
    "black": (20, 20, 20),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
# Side of the shape as a fraction of its cell (the cell is the thing's column, at most 0.6 of the height).
SIZES: dict[str, float] = {"small": 0.5, "medium": 0.72, "large": 0.95}
TOP_STUFF = "sky"
BOTTOM_STUFF: tuple[str, ...] = ("grass", "sand", "water")
STUFF_COLOURS: dict[str, tuple[int, int, int]] = {
    "sky": (160, 205, 240),
    "grass": (70, 150, 60),
    "sand": (215, 195, 145),
    "water": (45, 100, 150),
}
# How descriptions name the stuff (an adjective that is never a thing colour).
STUFF_PHRASES: dict[str, str] = {"sky": "clear sky", "grass": "green grass", "sand": "soft sand", "water": "calm water"}

CATEGORIES: list[dict] = [
    {"id": i + 1, "name": kind, "supercategory": "shape", "isthing": 1} for i, kind in enumerate(KINDS)
] + [
    {"id": 101 + i, "name": name, "supercategory": "background", "isthing": 0}
    for i, name in enumerate((TOP_STUFF,) + BOTTOM_STUFF)
]
CATEGORY_IDS: dict[str, int] = {c["name"]: c["id"] for c in CATEGORIES}

SPLITS: tuple[str, ...] = ("train", "val")
# Image ids: train from 1, val from VAL_ID_OFFSET + 1, so ids never collide across splits.
VAL_ID_OFFSET = 500_000
WIDTH_RANGE = (160, 320)
HEIGHT_RANGE = (120, 240)


@dataclass
class Thing:
    colour: str
    kind: str
    size: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 inclusive-exclusive pixel bounds of the drawn cell
    centre: tuple[float, float]
    position: str = ""  # e.g. "upper left"
    segment_id: int = 0


@dataclass
class Scene:
    width: int
    height: int
    horizon: int  # first row of the bottom stuff band
    bottom: str
    things: list[Thing] = field(default_factory=list)


def _phrase(t: Thing, with_size: bool = True) -> str:
    return f"{t.size} {t.colour} {t.kind}" if with_size else f"{t.colour} {t.kind}"


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _ground_phrase(t: Thing, scene: Scene) -> str:
    if t.centre[1] < scene.horizon:
        return f"in the {STUFF_PHRASES[TOP_STUFF]}"
    return f"on the {STUFF_PHRASES[scene.bottom]}"


def describe_thing(t: Thing, neighbour: Thing, scene: Scene, pattern: int) -> str:
    """One sentence naming colour, kind, size, position and the side of ``neighbour`` it is on."""
    side = "left" if t.centre[0] < neighbour.centre[0] else "right"
    other_side = "right" if side == "left" else "left"
    ground = _ground_phrase(t, scene)
    if pattern == 0:
        return (f"A {_phrase(t)} sits in the {t.position} of the picture, "
                f"to the {side} of a {_phrase(neighbour)}, {ground}.")
    if pattern == 1:
        return (f"This is a {_phrase(t)} {ground}, placed in the {t.position} of the image "
                f"and just {side} of the {_phrase(neighbour, False)}.")
    return (f"In the {t.position} of the scene sits a {t.colour} {t.kind} of {t.size} size {ground}, "
            f"with a {_phrase(neighbour, False)} to its {other_side}.")


def describe_stuff(name: str, on_it: list[Thing], top: bool) -> str:
    """One sentence naming the stuff, where it is, and the things in front of (or on) it."""
    where = "fills the top part of the picture" if top else "covers the bottom part of the picture"
    if not on_it:
        return f"The {STUFF_PHRASES[name]} {where}, and no shape stands in front of it at all."
    relation = "behind" if top else "under"
    return f"The {STUFF_PHRASES[name]} {where}, {relation} {_listing(['a ' + _phrase(t) for t in on_it])}."


THING_PATTERNS = 3


def caption_corpus() -> list[str]:
    """Sentences covering every word the generator (and the converters' prompts) can emit.

    Used to train the tiny models' tokenizer: every colour, kind, size, position, stuff and connective
    word appears, plus the GPT4RoI region-caption templates, the VG evaluation question and the preamble.
    """
    scene = Scene(width=300, height=200, horizon=100, bottom=BOTTOM_STUFF[0])
    sentences: list[str] = []
    horizontals = ("left", "middle", "right")
    colours, sizes = list(COLOURS), list(SIZES)
    combos = [(c, k, s) for c in colours for k in KINDS for s in sizes]
    k = 0
    for pattern in range(THING_PATTERNS):
        for colour, kind, size in combos:
            for other_kind in KINDS:  # every kind in every sentence-final slot
                for upper in (True, False):
                    k += 1
                    scene.bottom = BOTTOM_STUFF[k % len(BOTTOM_STUFF)]
                    cy = 50.0 if upper else 150.0
                    pos = f"{'upper' if upper else 'lower'} {horizontals[k % 3]}"
                    t = Thing(colour, kind, size, (0, 0, 1, 1), (100.0 + (k % 2) * 100, cy), pos)
                    n = Thing(colours[k % len(colours)], other_kind, sizes[k % len(sizes)], (0, 0, 1, 1), (150.0, cy))
                    sentences.append(describe_thing(t, n, scene, pattern))
    for name, top in [(TOP_STUFF, True)] + [(b, False) for b in BOTTOM_STUFF]:
        sentences.append(describe_stuff(name, [], top))
        for colour, kind, size in combos:
            t = Thing(colour, kind, size, (0, 0, 1, 1), (0.0, 0.0))
            sentences.append(describe_stuff(name, [Thing("red", "circle", "small", t.box, t.centre), t], top))
    sentences.extend(region_question(t, 1) for t in GPT4ROI_VG)
    sentences.append(GPT4ROI_PREAMBLE + VG_EVAL_QUESTION)
    return sentences


def _position(cx: float, cy: float, width: int, horizon: int) -> str:
    # "upper" means in front of the sky, so position and ground phrase never contradict each other
    vertical = "upper" if cy < horizon else "lower"
    horizontal = "left" if cx < width / 3 else ("right" if cx >= 2 * width / 3 else "middle")
    return f"{vertical} {horizontal}"


def _thing_mask(kind: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape filling its square cell."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    if kind == "circle":
        r = side / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    if kind == "square":
        return np.ones((side, side), dtype=bool)
    # triangle pointing up: apex at the top centre, base along the bottom row
    half_width = yy / side * (side / 2)
    return np.abs(xx - side / 2) <= half_width


def make_scene(rng: np.random.Generator) -> Scene:
    """Draw an image size, a horizon, a bottom stuff and 2-3 non-overlapping things (one per column)."""
    width = int(rng.integers(WIDTH_RANGE[0] // 8, WIDTH_RANGE[1] // 8 + 1)) * 8
    height = int(rng.integers(HEIGHT_RANGE[0] // 8, HEIGHT_RANGE[1] // 8 + 1)) * 8
    horizon = int(height * rng.uniform(0.4, 0.6))
    scene = Scene(width, height, horizon, str(rng.choice(BOTTOM_STUFF)))
    n = int(rng.integers(2, 4))  # 2-3 things: each spans a few ViT patches at 112 px
    col_w = width / n
    cell = min(col_w, 0.6 * height)
    colours, kinds, sizes = list(COLOURS), list(KINDS), list(SIZES)
    for c in range(n):
        size = sizes[int(rng.integers(len(sizes)))]
        side = max(6, int(cell * SIZES[size]))
        x1 = int(c * col_w + rng.uniform(0, max(col_w - side, 0)))
        y1 = int(rng.uniform(0, height - side))
        t = Thing(colours[int(rng.integers(len(colours)))], kinds[int(rng.integers(len(kinds)))], size,
                  (x1, y1, x1 + side, y1 + side), (x1 + side / 2, y1 + side / 2))
        t.position = _position(*t.centre, width, horizon)
        scene.things.append(t)
    return scene


@dataclass
class RenderedImage:
    rgb: np.ndarray  # (H, W, 3) uint8
    segments: np.ndarray  # (H, W) int32 panoptic segment ids
    segments_info: list[dict]


def _bbox_area(mask: np.ndarray) -> tuple[list[int], int]:
    """COCO-panoptic ``[x, y, w, h]`` (tight, inclusive extents) and pixel count of a boolean mask."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    area = int(mask.sum())
    if area == 0:
        return [0, 0, 0, 0], 0
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)], area


def render(scene: Scene, rng: np.random.Generator) -> RenderedImage:
    """Paint the scene and its panoptic segment map; fill in descriptions and attributes."""
    h, w = scene.height, scene.width
    ids: list[int] = []
    while len(ids) < 2 + len(scene.things):  # distinct ids spread over all three PNG channels
        candidate = int(rng.integers(1, 256 ** 3))
        if candidate not in ids:
            ids.append(candidate)
    sky_id, ground_id = int(ids[0]), int(ids[1])
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    seg = np.empty((h, w), dtype=np.int32)
    rgb[: scene.horizon] = STUFF_COLOURS[TOP_STUFF]
    rgb[scene.horizon:] = STUFF_COLOURS[scene.bottom]
    seg[: scene.horizon] = sky_id
    seg[scene.horizon:] = ground_id
    thing_infos = []
    for t, sid in zip(scene.things, ids[2:]):
        t.segment_id = int(sid)
        x1, y1, x2, y2 = t.box
        mask = _thing_mask(t.kind, x2 - x1)
        rgb[y1:y2, x1:x2][mask] = COLOURS[t.colour]
        seg[y1:y2, x1:x2][mask] = t.segment_id
    infos = []
    for name, sid, top in ((TOP_STUFF, sky_id, True), (scene.bottom, ground_id, False)):
        bbox, area = _bbox_area(seg == sid)
        if area == 0:
            continue
        on_it = [t for t in scene.things if (t.centre[1] < scene.horizon) == top]
        infos.append({"id": sid, "category_id": CATEGORY_IDS[name], "iscrowd": 0, "bbox": bbox, "area": area,
                      "description": describe_stuff(name, on_it, top), "attributes": {"kind": name}})
    for t in scene.things:
        neighbour = min((o for o in scene.things if o is not t), key=lambda o: abs(o.centre[0] - t.centre[0]))
        x1, y1, x2, y2 = t.box
        local_bbox, area = _bbox_area(seg[y1:y2, x1:x2] == t.segment_id)
        bbox = [local_bbox[0] + x1, local_bbox[1] + y1, local_bbox[2], local_bbox[3]]
        thing_infos.append({
            "id": t.segment_id, "category_id": CATEGORY_IDS[t.kind], "iscrowd": 0, "bbox": bbox, "area": area,
            "description": describe_thing(t, neighbour, scene, int(rng.integers(THING_PATTERNS))),
            "attributes": {"colour": t.colour, "kind": t.kind, "size": t.size, "position": t.position},
        })
    return RenderedImage(rgb, seg, infos + thing_infos)


def encode_panoptic(segments: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 RGB with ``id = R + 256*G + 256**2*B`` (panopticapi id2rgb)."""
    little_endian = np.ascontiguousarray(segments, dtype="<u4")
    return little_endian.view(np.uint8).reshape(*segments.shape, 4)[..., :3]


def decode_panoptic(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 segment ids (panopticapi rgb2id)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def image_file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def generate_split(out: Path, split: str, num_images: int, seed: int) -> dict:
    """Write one split's JPEGs and panoptic PNGs; return its COCO-panoptic annotation dict."""
    img_dir, pan_dir = out / f"{split}2017", out / f"panoptic_{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    pan_dir.mkdir(parents=True, exist_ok=True)
    split_index = SPLITS.index(split)
    offset = 0 if split == "train" else VAL_ID_OFFSET
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_index, i])
        scene = make_scene(rng)
        rendered = render(scene, rng)
        image_id = offset + i + 1
        name = image_file_name(image_id)
        png_name = name.replace(".jpg", ".png")
        Image.fromarray(rendered.rgb).save(img_dir / name, quality=92)
        Image.fromarray(encode_panoptic(rendered.segments)).save(pan_dir / png_name, compress_level=1)
        images.append({"id": image_id, "file_name": name, "width": scene.width, "height": scene.height})
        annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": rendered.segments_info})
    return {"info": {"description": f"synthetic Pix2Cap-COCO ({split}, seed {seed})"},
            "images": images, "annotations": annotations, "categories": CATEGORIES}


def vg_test_file(panoptic: dict, split: str = "val") -> dict:
    """GLaMM-format VG test file: one ``images`` entry per thing region, the annotation with the same id.

    ``file_name`` is relative to the generator's output directory (e.g. ``val2017/000000500001.jpg``);
    stuff segments are left out so every sample has a colour and a kind to score.
    """
    things = {c["id"] for c in panoptic["categories"] if c["isthing"]}
    by_image = {img["id"]: img for img in panoptic["images"]}
    images, annotations = [], []
    for ann in panoptic["annotations"]:
        img = by_image[ann["image_id"]]
        for seg in ann["segments_info"]:
            if seg["category_id"] not in things:
                continue
            k = len(images) + 1
            images.append({"id": k, "file_name": f"{split}2017/{img['file_name']}",
                           "width": img["width"], "height": img["height"], "source_image_id": img["id"]})
            annotations.append({"id": k, "image_id": k, "bbox": list(seg["bbox"]), "area": seg["area"],
                                "iscrowd": 0, "category_id": 1, "caption": seg["description"],
                                "segment_id": seg["id"], "attributes": dict(seg["attributes"])})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}


def generate(out: Path, train_images: int, val_images: int, seed: int) -> dict[str, int]:
    """Write the whole synthetic dataset under ``out``; return image and segment counts."""
    counts = {}
    for split, n in (("train", train_images), ("val", val_images)):
        panoptic = generate_split(out, split, n, seed)
        write_json_atomic(out / "annotations" / f"pix2cap_coco_{split}.json", panoptic, indent=None)
        counts[f"{split}_images"] = n
        counts[f"{split}_segments"] = sum(len(a["segments_info"]) for a in panoptic["annotations"])
        if split == "val":
            test = vg_test_file(panoptic, split)
            write_json_atomic(out / "annotations" / "test_caption.json", test, indent=None)
            counts["vg_test_samples"] = len(test["images"])
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_converters.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (the dataset root)")
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--val-images", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train_images < 0 or args.val_images < 0:
        raise UserError("--train-images and --val-images must be >= 0")
    start = time.perf_counter()
    counts = generate(args.out, args.train_images, args.val_images, args.seed)
    seconds = time.perf_counter() - start
    total = args.train_images + args.val_images
    print(f"wrote {total} images to {args.out} in {seconds:.2f}s ({total / max(seconds, 1e-9):.0f} images/s): "
          + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
