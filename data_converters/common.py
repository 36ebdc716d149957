"""What every converter shares: required fields with user-facing errors, the box filters, region dialogues,
statistics and the streaming atomic JSONL writer that checks each record against the schema.

A region dialogue is GPT4RoI's format: one human/gpt pair per region, the human turn a region-caption
template with ``region{i} <bbox>`` (the i-th ``<bbox>`` is ``regions[i-1]``), the first human turn
prefixed with ``The <image> provides an overview of the picture.\\n``, the gpt turn the caption.
Unlike GPT4RoI (which keeps a random 15 and drops the rest), an image with more regions than
``max_regions`` becomes several dialogues, so no caption is lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from data_converters.templates import TEMPLATE_SETS, region_question
from gpt4roi_sft.atomic import atomic_open, write_json_atomic
from gpt4roi_sft.constants import BBOX_TOKEN, GPT4ROI_PREAMBLE, IMAGE_TOKEN
from gpt4roi_sft.data.schema import check_unique_id, coco_box_to_xyxy, is_coordinate, is_pixel_size, validate_record
from gpt4roi_sft.errors import BoxError, DataError, UserError

log = logging.getLogger(__name__)


def require_keys(obj: Any, keys: Sequence[str], where: str) -> None:
    """Raise a :class:`DataError` naming ``where`` unless ``obj`` is a dict holding every key."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


IMAGE_KEYS = ("id", "file_name", "width", "height")


def require_image(img: Any, where: str, extra: Sequence[str] = ()) -> None:
    """:func:`require_keys` for a COCO ``images`` entry (``IMAGE_KEYS`` and ``extra``), whose width and height
    must be positive numbers: they are the frame every box of the image is checked and clipped against."""
    require_keys(img, IMAGE_KEYS + tuple(extra), where)
    for key in ("width", "height"):
        size = img[key]
        if not is_pixel_size(size):
            raise DataError(f"{where} (image {img['id']}): {key} {size!r} must be a positive number")


def kept_unique(seen: dict, key: Any, *, where: str, at: str, field: str, skip_bad: bool,
                stats: "ConversionStats") -> bool:
    """Whether ``key`` is new; it is then remembered as found ``at`` (e.g. ``"segments_info[3]"``).

    A repeated id would silently merge two entries (shared masks, clashing record ids), so it is a
    :class:`DataError` naming ``where``, ``field`` and both places, unless ``skip_bad`` (then the repeat is
    counted as ``duplicate_<field>`` and left out).
    """
    if isinstance(key, bool) or not isinstance(key, (str, int, float)):
        raise DataError(f"{where}: {at}: {field} {key!r} must be a number or a string")
    if key not in seen:
        seen[key] = at
        return True
    skip_or_raise(f"{where}: {field} {key!r} appears twice ({seen[key]} and {at})",
                  "duplicate_" + field.replace(" ", "_"), skip_bad=skip_bad, stats=stats)
    return False


def listed_images(images: list, *, source_file: str, skip_bad: bool, stats: ConversionStats) -> dict:
    """``{image id: image entry}``, each entry checked; a repeated id is refused (see :func:`kept_unique`)."""
    listed: dict = {}
    seen: dict = {}
    for k, img in enumerate(images):
        require_image(img, f"{source_file}: images[{k}]")
        if kept_unique(seen, img["id"], where=source_file, at=f"images[{k}]", field="image id", skip_bad=skip_bad,
                       stats=stats):
            listed[img["id"]] = img
    return listed


def skip_or_raise(message: str, reason: str, *, skip_bad: bool, stats: "ConversionStats") -> None:
    """The ``--skip-bad`` policy for a bad entry: count it as ``reason``, or stop with ``message``."""
    if not skip_bad:
        raise DataError(message)
    stats.drop(reason)


def kept_box(ann: dict, *, where: str, width: float, height: float, skip_bad: bool,
             stats: "ConversionStats", min_square_box: float = 0.0) -> list[float] | None:
    """The xyxy box of a COCO-style segment/annotation, or ``None`` when it is filtered out (and counted).

    Filters (GPT4RoI / Pix2Cap SFT): crowd, ``area <= 0``, ``w < 1`` or ``h < 1``, and with ``min_square_box``
    boxes no larger than that in the 224 px square (:func:`small_in_square`). A missing or malformed box, one
    outside the image, an ``iscrowd`` other than 0/1 or a non-numeric ``area`` is an error naming ``where`` unless ``skip_bad``
    (then counted).
    """
    crowd = ann.get("iscrowd", 0)
    if not isinstance(crowd, int) or crowd not in (0, 1):  # bool is an int; "0" would be truthy
        skip_or_raise(f"{where}: iscrowd {crowd!r} must be 0 or 1", "bad_iscrowd", skip_bad=skip_bad,
                      stats=stats)
        return None
    if crowd:
        stats.drop("crowd")
        return None
    if "bbox" not in ann:
        if skip_bad:
            stats.drop("missing_bbox")
            return None
        raise DataError(f"{where}: no bbox")
    area = ann.get("area", 1)
    if not is_coordinate(area) or not math.isfinite(area):
        skip_or_raise(f"{where}: area {area!r} is not a finite number", "bad_area", skip_bad=skip_bad, stats=stats)
        return None
    if area <= 0:
        stats.drop("zero_area")
        return None
    try:
        bbox = ann["bbox"]
        if len(bbox) == 4 and (float(bbox[2]) < 1 or float(bbox[3]) < 1):
            stats.drop("box_under_1px")
            return None
        box = coco_box_to_xyxy(bbox, width, height, where)
    except (BoxError, TypeError, ValueError) as exc:
        if skip_bad:
            stats.drop("bad_box")
            return None
        raise exc if isinstance(exc, BoxError) else BoxError(f"{where}: bbox {ann['bbox']!r} is not [x, y, w, h]")
    if min_square_box > 0 and small_in_square(box, width, height, min_square_box):
        stats.drop("small_in_224_square")
        return None
    return box


# GPT4RoI's mmdet pipelines squash images to 224 x 224 and then drop boxes not wider and taller than 2 px there
# (``FilterAnnotationsFlickr(min_gt_bbox_wh=(2.0, 2.0))`` in its VG, RefCOCOg, Flickr30k and Pix2Cap sets).
SQUARE_SIDE = 224
MIN_SQUARE_BOX = 2.0


def small_in_square(bbox: Sequence[float], width: float, height: float, min_side: float = MIN_SQUARE_BOX,
                    side: int = SQUARE_SIDE) -> bool:
    """Whether pixel xyxy ``bbox`` is at most ``min_side`` wide or tall once the image is squashed to ``side``."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    sx, sy = side / float(width), side / float(height)
    w = min(x2 * sx, side) - max(x1 * sx, 0.0)
    h = min(y2 * sy, side) - max(y1 * sy, 0.0)
    return not (w > min_side and h > min_side)


def kept_caption(ann: dict, key: str, *, where: str, stats: "ConversionStats", skip_bad: bool = False) -> str | None:
    """``ann[key]`` as a caption, or ``None`` when missing/empty (counted as ``missing_<key>``/``empty_<key>``).

    The text is kept exactly (no stripping, unicode untouched); a non-string value is an error, and so is one
    holding ``<image>`` or ``<bbox>`` (the record's text must hold them exactly once per image and region),
    unless ``skip_bad`` (then counted as ``token_in_<key>``).
    """
    caption = ann.get(key)
    if caption is None:
        stats.drop(f"missing_{key}")
        return None
    if not isinstance(caption, str):
        raise DataError(f"{where}: {key} is {type(caption).__name__}, expected a string")
    if not caption.strip():
        stats.drop(f"empty_{key}")
        return None
    for token in (IMAGE_TOKEN, BBOX_TOKEN):
        if token in caption:
            skip_or_raise(f"{where}: {key} holds {token}, which the record format reserves", f"token_in_{key}",
                          skip_bad=skip_bad, stats=stats)
            return None
    return caption


@dataclass
class ConversionStats:
    """Counts a converter reports with ``--stats``: what went in, what came out, what was dropped and why."""

    input: str = ""
    images: int = 0
    images_without_regions: int = 0
    records: int = 0
    regions: int = 0
    captions: int = 0
    caption_words: int = 0
    dropped: Counter = field(default_factory=Counter)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def add_caption(self, caption: str) -> None:
        self.captions += 1
        self.caption_words += len(caption.split())

    def as_dict(self) -> dict:
        return {
            "input": self.input,
            "images": self.images,
            "images_without_regions": self.images_without_regions,
            "records": self.records,
            "regions": self.regions,
            "captions": self.captions,
            "words_per_caption_mean": round(self.caption_words / self.captions, 3) if self.captions else 0.0,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": sum(self.dropped.values()),
        }

    def summary(self) -> str:
        d = self.as_dict()
        dropped = ", ".join(f"{k}={v}" for k, v in d["dropped"].items()) or "none"
        return (f"{d['images']} images -> {d['records']} records, {d['regions']} regions, "
                f"{d['words_per_caption_mean']} words/caption; dropped: {dropped}")


@dataclass
class Region:
    """One captioned region before it is placed in a dialogue. ``extra`` goes into the record's region."""

    bbox: list[float]  # absolute xyxy
    caption: str
    extra: dict = field(default_factory=dict)

    def record_region(self) -> dict:
        return {"bbox": self.bbox, **self.extra}


def annotations_by_image(data: Any, source_file: str) -> dict:
    """``{image_id: [(k, annotation), ...]}`` of a COCO-style dict, which must hold ``images`` and ``annotations``."""
    require_keys(data, ("images", "annotations"), source_file)
    by_image: dict = defaultdict(list)
    for k, ann in enumerate(data["annotations"]):
        require_keys(ann, ("image_id",), f"{source_file}: annotations[{k}]")
        by_image[ann["image_id"]].append((k, ann))
    return by_image


def split_dialogues(regions: Sequence[Region], max_regions: int, rng: random.Random) -> list[list[Region]]:
    """Shuffle ``regions`` and cut them into the fewest dialogues of at most ``max_regions``, sizes balanced.

    Every region lands in exactly one dialogue (balanced sizes avoid a trailing one-region dialogue).
    """
    if max_regions < 1:
        raise UserError(f"--max-regions must be >= 1, got {max_regions}")
    order = list(regions)
    rng.shuffle(order)
    n_chunks = max(1, math.ceil(len(order) / max_regions))
    base, extra = divmod(len(order), n_chunks)
    chunks, start = [], 0
    for k in range(n_chunks):
        size = base + (1 if k < extra else 0)
        chunks.append(order[start:start + size])
        start += size
    return [c for c in chunks if c]


def region_conversations(captions: Sequence[str], rng: random.Random, templates: Sequence[str]) -> list[dict]:
    """GPT4RoI region dialogue: a random template per region, ``region{i} <bbox>``, preamble on turn one."""
    turns = []
    for i, caption in enumerate(captions, start=1):
        question = region_question(rng.choice(templates), i)
        if i == 1:
            question = GPT4ROI_PREAMBLE + question
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": caption})
    return turns


def region_records(regions: Sequence[Region], *, record_id: str, image: str, width: int, height: int,
                   source: str, max_regions: int, rng: random.Random, templates: Sequence[str],
                   stats: ConversionStats, numbered: bool = True, max_dialogues: int | None = None) -> Iterator[dict]:
    """Turn one image's regions into one or more conversation records ``<record_id>/d<k>``.

    ``numbered=False`` (one dialogue per source entry, e.g. a referring expression) keeps ``record_id`` as is.
    An image left without regions gives no record and is counted in ``stats.images_without_regions``.
    ``max_dialogues`` keeps only that many dialogues per image (1: GPT4RoI's one dialogue of at most
    ``max_regions`` random regions per image; the other regions are counted as ``regions_over_max_dialogues``).
    """
    if not regions:
        stats.images_without_regions += 1
        return
    if max_dialogues is not None and len(regions) > max_dialogues * max_regions:
        order = list(regions)
        rng.shuffle(order)
        stats.drop("regions_over_max_dialogues", len(order) - max_dialogues * max_regions)
        regions = order[: max_dialogues * max_regions]
    chunks = split_dialogues(regions, max_regions, rng)
    if not numbered and len(chunks) > 1:
        raise ValueError(f"{record_id}: {len(chunks)} dialogues need numbered ids")
    for k, chunk in enumerate(chunks):
        stats.records += 1
        stats.regions += len(chunk)
        for region in chunk:
            stats.add_caption(region.caption)
        yield {"id": f"{record_id}/d{k}" if numbered else record_id, "image": image, "width": width, "height": height,
               "regions": [r.record_region() for r in chunk],
               "conversations": region_conversations([r.caption for r in chunk], rng, templates),
               "source": source}


def image_rng(seed: int, key: Any) -> random.Random:
    """A generator per image, so an image's dialogues do not depend on the order images are read in."""
    return random.Random(f"{seed}/{key}")


def infer_split(path: Path) -> str:
    """``pix2cap_coco_train.json`` -> ``train``, ``finetune_refcocog_val.json`` -> ``val``; else the stem."""
    parts = path.stem.split("_")
    for split in ("train", "val", "test"):
        if split in parts:
            return split
    return path.stem


def join_image_path(prefix: str, file_name: str) -> str:
    return f"{prefix.rstrip('/')}/{file_name}" if prefix else file_name


def write_jsonl(path: Path, records: Iterable[dict], source: str = "") -> int:
    """Stream ``records`` to ``path`` as JSON lines (unicode kept) through a temp file renamed at the end.

    Each record is checked against the conversation schema (:func:`gpt4roi_sft.data.schema.validate_record`)
    before it is written, so a converter cannot write a file the trainer would reject; the error names the
    ``source`` file and the record id (which holds the entry's id), as the user fixes the input, not the output.
    If the iteration or a check raises, nothing is left at ``path`` (an older file there stays as it was).
    """
    n, seen = 0, {}
    with atomic_open(path, "w") as fh:
        for record in records:
            written_as = f"{path.name}: record {n + 1}"
            where = (f"{source}: record {record.get('id')} ({written_as})" if source
                     else f"{written_as} ({record.get('id')})")
            validate_record(record, where)
            check_unique_id(record, where, seen)
            fh.write(json.dumps(record, ensure_ascii=False))
            fh.write("\n")
            n += 1
    return n


def templates_by_name(name: str) -> tuple[str, ...]:
    if name not in TEMPLATE_SETS:
        raise UserError(f"--templates: unknown template set {name!r} (known: {', '.join(TEMPLATE_SETS)})")
    return TEMPLATE_SETS[name]


def add_output_arguments(parser: argparse.ArgumentParser, regions: bool = True) -> None:
    """The options every converter takes: output, stats, seed, skip-bad (and the region-dialogue ones)."""
    parser.add_argument("--out", required=True, type=Path, help="conversation JSONL to write")
    parser.add_argument("--stats", type=Path, help="write conversion counts to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed for region order and template choice")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and count) bad boxes and entries instead of stopping with an error")
    parser.add_argument("--image-dir-prefix", default=None,
                        help="prefix joined to each image file name in the records' 'image' field")
    if regions:
        parser.add_argument("--max-regions", type=int, default=15, help="regions per dialogue (more -> several dialogues)")
        parser.add_argument("--max-dialogues", type=int, default=None,
                            help="dialogues kept per image (1: GPT4RoI's one random <= --max-regions subset; default all)")
        parser.add_argument("--templates", default="gpt4roi_vg", choices=sorted(TEMPLATE_SETS))



def add_box_filter_argument(parser: argparse.ArgumentParser) -> None:
    """``--min-square-box``: GPT4RoI's small-box filter (pass 2 for its stage-2 data)."""
    parser.add_argument("--min-square-box", type=float, default=0.0,
                        help="drop boxes not wider and taller than this many pixels in the image squashed to "
                             f"{SQUARE_SIDE} px (GPT4RoI: {MIN_SQUARE_BOX}; default 0 keeps them)")


def finish(args: argparse.Namespace, records: Iterable[dict], stats: ConversionStats) -> int:
    """Write the records (and stats), print a one-line summary; shared tail of every converter's main."""
    write_jsonl(args.out, records, source=Path(stats.input).name)
    if args.stats:
        write_json_atomic(args.stats, stats.as_dict())
    print(f"{args.out}: {stats.summary()}")
    return 0
