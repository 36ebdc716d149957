"""Pix2Cap-COCO (COCO-panoptic JSON with a ``description`` per segment) -> region-dialogue JSONL.

Follows the Pix2Cap paper's GPT4RoI SFT: segment boxes (xywh -> xyxy, clipped to the image), things and
stuff, non-crowd, area > 0, w and h >= 1, one human/gpt pair per region with GPT4RoI's VG templates.
Beyond it, no caption is silently lost: images with more than ``--max-regions`` kept segments become
several dialogues, and every dropped segment is counted by reason (``--stats``). Malformed input (a repeated
image/segment id, an unlisted ``category_id``, ``iscrowd`` not 0/1, a non-numeric ``area``, a bad box or image
size) is an error naming the file, image, segment and field; ``--skip-bad`` drops and counts what it can.

Record ids are ``pix2cap/<split>/<image_id>/d<k>`` (k-th dialogue of the image); images are
``<image-dir-prefix>/<file_name>`` (default ``<split>2017``) and masks ``<panoptic-dir>/<png>``
(default ``panoptic_<split>2017``), both relative to the dataset root given at train time.

    python -m data_converters.pix2cap --annotations pix2cap_coco_train.json --out train.jsonl --stats stats.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from data_converters.common import (ConversionStats, Region, add_box_filter_argument, add_output_arguments, finish,
                                    image_rng, infer_split, join_image_path, kept_box, kept_caption, kept_unique,
                                    listed_images, region_records, require_keys, skip_or_raise, templates_by_name)
from gpt4roi_sft.errors import DataError, run_cli
from gpt4roi_sft.json_io import load_json

SOURCE = "pix2cap_coco"


def categories_by_id(data: dict, source_file: str) -> dict:
    """``{category id: category}`` of the file's ``categories`` (each needs ``id`` and ``name``; an id listed twice
    would make a segment's category name depend on which entry wins, so it is an error, never skipped)."""
    categories = data.get("categories") or []
    if not isinstance(categories, list):
        raise DataError(f"{source_file}: categories must be a list, got {type(categories).__name__}")
    by_id: dict = {}
    for k, category in enumerate(categories):
        require_keys(category, ("id", "name"), f"{source_file}: categories[{k}]")
        if not isinstance(category["id"], (int, str)) or isinstance(category["id"], bool):
            raise DataError(f"{source_file}: categories[{k}]: id must be an integer or a string, got {category['id']!r}")
        first = by_id.setdefault(category["id"], (k, category))[0]
        if first != k:
            raise DataError(f"{source_file}: categories[{k}]: id {category['id']!r} repeats categories[{first}] "
                            f"({by_id[category['id']][1]['name']!r} and {category['name']!r}); each category id "
                            "must be listed once")
    return {cid: category for cid, (_, category) in by_id.items()}


def segment_regions(seg: dict, *, where: str, width: int, height: int, categories: dict, things_only: bool,
                    skip_bad: bool, mask: str, stats: ConversionStats, min_square_box: float = 0.0) -> Region | None:
    """One ``segments_info`` entry -> a :class:`Region`, or ``None`` (counted in ``stats.dropped``)."""
    category_id = seg.get("category_id")
    hashable = isinstance(category_id, (int, str)) and not isinstance(category_id, bool)
    category = categories.get(category_id) if hashable else None
    if categories and category is None:
        skip_or_raise(f"{where}: category_id {category_id!r} is not listed in categories",
                      "unknown_category", skip_bad=skip_bad, stats=stats)
        return None
    if things_only and category is not None and not category.get("isthing", 1):
        stats.drop("stuff_things_only")
        return None
    bbox = kept_box(seg, where=where, width=width, height=height, skip_bad=skip_bad, stats=stats,
                    min_square_box=min_square_box)
    if bbox is None:
        return None
    description = kept_caption(seg, "description", where=where, stats=stats, skip_bad=skip_bad)
    if description is None:
        return None
    extra: dict = {"segment_id": seg["id"], "mask": mask} if "id" in seg else {"mask": mask}
    if category is not None:
        extra["category"] = category.get("name")
    if isinstance(seg.get("attributes"), dict):
        extra["attributes"] = seg["attributes"]
    return Region(bbox=bbox, caption=description, extra=extra)


def convert_pix2cap(data: dict, *, source_file: str, split: str, image_dir_prefix: str, panoptic_dir: str,
                    max_regions: int = 15, seed: int = 0, things_only: bool = False, templates=(),
                    skip_bad: bool = False, stats: ConversionStats | None = None, min_square_box: float = 0.0,
                    max_dialogues: int | None = None) -> Iterator[dict]:
    """Yield conversation records for a parsed Pix2Cap-COCO annotation dict, in annotation order."""
    stats = stats if stats is not None else ConversionStats()
    templates = templates or templates_by_name("gpt4roi_vg")
    require_keys(data, ("images", "annotations"), source_file)
    categories = categories_by_id(data, source_file)
    images = listed_images(data["images"], source_file=source_file, skip_bad=skip_bad, stats=stats)
    annotated: dict = {}
    for k, ann in enumerate(data["annotations"]):
        require_keys(ann, ("image_id", "segments_info"), f"{source_file}: annotations[{k}]")
        image_id = ann["image_id"]
        if not kept_unique(annotated, image_id, where=source_file, at=f"annotations[{k}]", field="image_id",
                           skip_bad=skip_bad, stats=stats):
            continue
        img = images.get(image_id)
        if img is None:
            if skip_bad:
                stats.drop("image_not_listed", len(ann["segments_info"]))
                continue
            raise DataError(f"{source_file}: annotations[{k}]: image {image_id} is not listed in images")
        stats.images += 1
        width, height = img["width"], img["height"]
        png = ann.get("file_name") or str(Path(img["file_name"]).with_suffix(".png"))
        mask = join_image_path(panoptic_dir, png)
        regions, segment_ids = [], {}
        for j, seg in enumerate(ann["segments_info"]):
            where = f"{source_file}: image {image_id} segment {seg.get('id', '?') if isinstance(seg, dict) else '?'}"
            if not isinstance(seg, dict):
                raise DataError(f"{where}: expected a JSON object")
            if "id" in seg and not kept_unique(segment_ids, seg["id"], where=f"{source_file}: image {image_id}",
                                               at=f"segments_info[{j}]", field="segment id", skip_bad=skip_bad,
                                               stats=stats):
                continue
            region = segment_regions(seg, where=where, width=width, height=height, categories=categories,
                                     things_only=things_only, skip_bad=skip_bad, mask=mask, stats=stats,
                                     min_square_box=min_square_box)
            if region is not None:
                regions.append(region)
        yield from region_records(regions, record_id=f"pix2cap/{split}/{image_id}",
                                  image=join_image_path(image_dir_prefix, img["file_name"]), width=width,
                                  height=height, source=SOURCE, max_regions=max_regions,
                                  rng=image_rng(seed, image_id), templates=templates, stats=stats,
                                  max_dialogues=max_dialogues)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_converters.pix2cap", description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, type=Path, help="pix2cap_coco_{train,val}.json")
    parser.add_argument("--split", help="split name used in record ids (default: from the file name)")
    parser.add_argument("--panoptic-dir", help="folder of the panoptic PNGs in the records (default panoptic_<split>2017)")
    parser.add_argument("--things-only", action="store_true", help="keep thing segments only (drop stuff)")
    add_output_arguments(parser)
    add_box_filter_argument(parser)
    args = parser.parse_args(argv)
    split = args.split or infer_split(args.annotations)
    prefix = args.image_dir_prefix if args.image_dir_prefix is not None else f"{split}2017"
    panoptic_dir = args.panoptic_dir if args.panoptic_dir is not None else f"panoptic_{split}2017"
    templates = templates_by_name(args.templates)
    data = load_json(args.annotations)
    stats = ConversionStats(input=str(args.annotations))
    records = convert_pix2cap(data, source_file=args.annotations.name, split=split, image_dir_prefix=prefix,
                              panoptic_dir=panoptic_dir, max_regions=args.max_regions, seed=args.seed,
                              things_only=args.things_only, templates=templates, skip_bad=args.skip_bad,
                              stats=stats, min_square_box=args.min_square_box, max_dialogues=args.max_dialogues)
    return finish(args, records, stats)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
