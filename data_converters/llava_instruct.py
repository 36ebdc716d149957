"""LLaVA-Instruct-150K (``llava_instruct_150k.json``) -> conversation JSONL, optionally with GPT4RoI's detections.

Input: ``[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]``. The ``<image>`` token
ends up exactly once, at the start of the first human turn (LLaVA puts it first or last; both become
``<image>\\n<question>``). Turns must alternate human/gpt starting with human. ``width``/``height`` are
read from the image headers when ``--image-root`` is given, else written as ``null`` (records without
regions need no size). Record ids are ``llava_instruct/<id>``.

``--detections llava_150k_bbox_pred_results.pkl`` (GPT4RoI's EVA-02 LVIS detections: a list of
``{"filename", "pred_bboxes": (N, 5) xyxy fractions + score, "labels": (N,) LVIS label}``) writes GPT4RoI's
``det_llava`` format instead: ``<image>`` is replaced where it stands by ``The <image> provides an overview of the
picture. \\n`` or, with probability 0.5, by ``The <image> provides an overview of the picture. Here is also some
regional information about the image, such as <bbox> may feature a {class},<bbox> may feature a {class},....\\n``
with those boxes as regions (score > 0.3, width and height > 0.02 of the image, the first 100; the first 10
unfiltered ones when none pass). Class names are GPT4RoI's (its list is shifted by one from
``shaver_(electric)`` on, see :mod:`data_converters.lvis`; ``--lvis-names exact`` for the right ones). GPT4RoI
flips the coin per epoch; here once per entry from ``--seed``. The pickle is read with an unpickler that admits
numpy arrays and plain containers only. Needs ``--image-root`` (the boxes become pixels).

    python -m data_converters.llava_instruct --annotations llava_instruct_150k.json --out llava.jsonl \
        --image-dir-prefix coco/train2017
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from data_converters.common import (ConversionStats, add_output_arguments, finish, image_rng, join_image_path,
                                    kept_unique)
from data_converters.lvis import gpt4roi_name, lvis_name
from gpt4roi_sft.constants import BBOX_TOKEN, IMAGE_TOKEN
from gpt4roi_sft.data.schema import check_box, clip_box
from gpt4roi_sft.errors import BoxError, DataError, run_cli
from gpt4roi_sft.json_io import load_json

SOURCE = "llava_instruct_150k"
DET_SOURCE = "llava_instruct_150k_det"
ROLES = ("human", "gpt")
WITHOUT_BOXES = "The <image> provides an overview of the picture. \n"
WITH_BOXES = "The <image> provides an overview of the picture. Here is also some regional information about the image, such as {}.\n"


class _ArraysOnly(pickle.Unpickler):
    """Unpickles lists, dicts, strings, numbers and numpy arrays; any other class is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}; only numpy arrays and plain containers are read")


def load_detections(path: Path) -> dict:
    """``{filename: (boxes (N, 5) float, labels (N,) int)}`` from GPT4RoI's detection pickle."""
    try:
        with open(path, "rb") as fh:
            items = _ArraysOnly(fh).load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a detection pickle ({exc})") from None
    if not isinstance(items, (list, tuple)):
        raise DataError(f"{path}: expected a list of detection results, got {type(items).__name__}")
    out = {}
    for k, item in enumerate(items):
        if not isinstance(item, dict) or not {"filename", "pred_bboxes", "labels"} <= set(item):
            raise DataError(f"{path}: entry {k} needs 'filename', 'pred_bboxes' and 'labels'")
        boxes = np.asarray(item["pred_bboxes"], dtype=np.float64).reshape(-1, 5)
        labels = np.asarray(item["labels"]).astype(np.int64).reshape(-1)
        if len(labels) != len(boxes):
            raise DataError(f"{path}: entry {k} ({item['filename']}): {len(boxes)} boxes but {len(labels)} labels")
        out[str(item["filename"])] = (boxes, labels)
    return out


def selected_detections(boxes: np.ndarray, labels: np.ndarray, score_threshold: float = 0.3, max_boxes: int = 100):
    """GPT4RoI's choice: score above the threshold, more than 2% of the image wide and tall, the first
    ``max_boxes``; when nothing passes, the first 10 boxes as they are."""
    keep = boxes[:, 4] > score_threshold
    b, lab = boxes[keep][:, :4], labels[keep]
    wide = ((b[:, 2] - b[:, 0]) > 0.02) & ((b[:, 3] - b[:, 1]) > 0.02)
    b, lab = b[wide][:max_boxes], lab[wide][:max_boxes]
    if len(b) == 0:
        b, lab = boxes[:10, :4], labels[:10]
    return b, lab


def alternating_turns(conversations: list, where: str) -> list[dict]:
    """Copies of the turns, checked to alternate human/gpt from a human turn and to hold no ``<bbox>``
    (the record format reserves it for regions; only GPT4RoI's detection preamble adds them)."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: conversations must be a non-empty list")
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") != ROLES[k % 2] or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {k} must be {{'from': '{ROLES[k % 2]}', 'value': str}}")
        if BBOX_TOKEN in turn["value"]:
            raise DataError(f"{where}: turn {k} value holds {BBOX_TOKEN}, which the record format reserves for regions")
    return [{"from": t["from"], "value": t["value"]} for t in conversations]


def image_first_turns(conversations: list, where: str) -> list[dict]:
    """Check alternation and move ``<image>`` to the front of the first human turn (once)."""
    turns = alternating_turns(conversations, where)
    for turn in turns:
        value = turn["value"]
        if IMAGE_TOKEN in value:
            value = value.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "")
            turn["value"] = value.strip()
    turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}"
    return turns


def image_in_place_turns(conversations: list, where: str) -> list[dict]:
    """Check alternation; ``<image>`` must appear once, in the first turn, where it stays (GPT4RoI replaces it there)."""
    turns = alternating_turns(conversations, where)
    if turns[0]["value"].count(IMAGE_TOKEN) != 1 or any(IMAGE_TOKEN in t["value"] for t in turns[1:]):
        raise DataError(f"{where}: {IMAGE_TOKEN} must appear once, in the first turn, for GPT4RoI's detection format")
    return turns


def image_size(image_root: Path | None, file_name: str, where: str) -> tuple[int | None, int | None]:
    if image_root is None:
        return None, None
    from PIL import Image  # header read only; pixels are never decoded here

    path = image_root / file_name
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(f"{where}: image file {path} is missing") from None


def detection_turn(value: str, boxes: np.ndarray, labels: np.ndarray, width: int, height: int, with_boxes: bool,
                   names: str, where: str):
    """The first human turn in GPT4RoI's det_llava format and the pixel boxes of its ``<bbox>`` tokens.

    Boxes with no area left once clipped to the image are left out (the schema admits none)."""
    if not with_boxes:
        return value.replace(IMAGE_TOKEN, WITHOUT_BOXES), []
    name = gpt4roi_name if names == "gpt4roi" else lvis_name
    listed, pixels = "", []
    for k, (box, label) in enumerate(zip(boxes, labels)):
        px = clip_box([box[0] * width, box[1] * height, box[2] * width, box[3] * height], width, height)
        try:
            check_box(px, width, height, f"{where}: detection {k}")
        except BoxError:
            continue
        listed += f"<bbox> may feature a {name(int(label))},"
        pixels.append(px)
    return value.replace(IMAGE_TOKEN, WITH_BOXES.format(listed)), pixels


def convert_llava_instruct(data: list, *, source_file: str, image_dir_prefix: str = "",
                           image_root: Path | None = None, skip_bad: bool = False,
                           stats: ConversionStats | None = None, detections: Optional[dict] = None,
                           seed: int = 0, box_probability: float = 0.5, lvis_names: str = "gpt4roi",
                           score_threshold: float = 0.3, max_boxes: int = 100) -> Iterator[dict]:
    """Yield one record per LLaVA conversation: region-free, or GPT4RoI's det_llava format with ``detections``."""
    stats = stats if stats is not None else ConversionStats()
    if detections is not None and image_root is None:
        raise DataError("--detections needs --image-root (the boxes are fractions of each image's size)")
    if not isinstance(data, list):
        raise DataError(f"{source_file}: expected a JSON list of conversations, got {type(data).__name__}")
    ids: dict = {}
    for k, item in enumerate(data):
        where = f"{source_file}: entry {k} (id {item.get('id') if isinstance(item, dict) else '?'})"
        stats.images += 1
        try:
            if not isinstance(item, dict) or "image" not in item or "id" not in item:
                raise DataError(f"{where}: needs 'id', 'image' and 'conversations'")
            # Ids are compared as the record ids will spell them: "7" and 7 both give llava_instruct/7.
            kept_unique(ids, str(item["id"]), where=source_file, at=f"entry {k}", field="id", skip_bad=False,
                        stats=stats)
            if detections is None:
                turns = image_first_turns(item.get("conversations"), where)
            else:
                turns = image_in_place_turns(item.get("conversations"), where)
            image = join_image_path(image_dir_prefix, item["image"])
            width, height = image_size(image_root, image, where)
            regions = []
            if detections is not None:
                if item["image"] not in detections:
                    raise DataError(f"{where}: no detections for {item['image']} in the pickle")
                boxes, labels = selected_detections(*detections[item["image"]], score_threshold, max_boxes)
                with_boxes = image_rng(seed, item["id"]).random() < box_probability
                turns[0]["value"], regions = detection_turn(turns[0]["value"], boxes, labels, width, height,
                                                            with_boxes, lvis_names, where)
        except (DataError, BoxError):
            if not skip_bad:
                raise
            stats.drop("bad_entry")
            continue
        if len(turns) % 2:
            stats.drop("unanswered_last_turn")
            turns = turns[:-1]
            if not turns:
                continue
        stats.records += 1
        for turn in turns[1::2]:
            stats.add_caption(turn["value"])
        stats.regions += len(regions)
        yield {"id": f"llava_instruct/{item['id']}", "image": image, "width": width, "height": height,
               "regions": [{"bbox": b} for b in regions], "conversations": turns,
               "source": SOURCE if detections is None else DET_SOURCE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_converters.llava_instruct",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, type=Path, help="llava_instruct_150k.json")
    parser.add_argument("--image-root", type=Path, help="read width/height from the images under this folder")
    parser.add_argument("--detections", type=Path, help="GPT4RoI's llava_150k_bbox_pred_results.pkl: write its det_llava format")
    parser.add_argument("--box-probability", type=float, default=0.5, help="share of entries given the detections")
    parser.add_argument("--lvis-names", choices=("gpt4roi", "exact"), default="gpt4roi",
                        help="class names as GPT4RoI's shifted list gave them (default) or LVIS's own")
    add_output_arguments(parser, regions=False)
    args = parser.parse_args(argv)
    data = load_json(args.annotations)
    detections = load_detections(args.detections) if args.detections else None
    stats = ConversionStats(input=str(args.annotations))
    records = convert_llava_instruct(data, source_file=args.annotations.name,
                                     image_dir_prefix=args.image_dir_prefix or "", image_root=args.image_root,
                                     skip_bad=args.skip_bad, stats=stats, detections=detections, seed=args.seed,
                                     box_probability=args.box_probability, lvis_names=args.lvis_names)
    return finish(args, records, stats)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
