"""Flickr30k Entities (MDETR ``final_flickr_mergedGT_<split>.json``) -> GPT4RoI's grounded-caption dialogues.

MDETR's file is COCO-style: one ``images`` entry per (image, caption) pair (``id, file_name, width, height,
caption``) and one ``annotations`` entry per grounded box (``image_id, bbox`` xywh, ``area, iscrowd,
category_id, tokens_positive`` = character spans of the caption). As GPT4RoI's ``Flickr30k`` dataset does, each
entry becomes one dialogue over its boxes (at most ``--max-regions``, 150, in a random order):

- human: ``The <image> provides an overview of the picture.\\n`` + one of 30 questions asking for the areas
  ``region1 <bbox>,region2 <bbox>,...,`` (GPT4RoI's exact form, trailing comma included); gpt: the caption;
- then per box i: one of 10 questions about ``region {i}`` (no ``<bbox>``: the box was given above); gpt: the
  caption's text at the box's first ``tokens_positive`` span.

Boxes are kept as GPT4RoI keeps them: not ignored, inside the image, ``area > 0``, ``w, h >= 1``, not crowd, and
(``--min-square-box``, GPT4RoI: 2) wider and taller than that in the 224-px square; an entry left without boxes
is dropped. GPT4RoI draws the order and the questions anew each epoch; here they are drawn once per entry from
``--seed``. Record ids are ``flickr30k/<split>/<entry id>``.

    python -m data_converters.flickr30k --annotations final_flickr_mergedGT_train.json --out flickr30k.jsonl \
        --image-dir-prefix flickr30k-images --min-square-box 2
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from data_converters.common import (ConversionStats, add_box_filter_argument, add_output_arguments,
                                    annotations_by_image, finish, image_rng, infer_split, join_image_path, kept_box,
                                    require_image)
from data_converters.templates import FLICKR_ALL_REGIONS, FLICKR_ONE_REGION, REGION_PLACEHOLDER
from gpt4roi_sft.constants import GPT4ROI_PREAMBLE
from gpt4roi_sft.errors import DataError, run_cli
from gpt4roi_sft.json_io import load_json

SOURCE = "flickr30k_entities"
MAX_BOXES = 150  # GPT4RoI's max_gt_per_img for Flickr30k


def phrase(caption: str, ann: dict, where: str) -> str:
    """The caption text of the box's first ``tokens_positive`` span (GPT4RoI keeps only the first)."""
    spans = ann.get("tokens_positive")
    if not isinstance(spans, list) or not spans or not isinstance(spans[0], (list, tuple)) or len(spans[0]) != 2:
        raise DataError(f"{where}: tokens_positive must be a list of [start, end] character spans, got {spans!r}")
    start, end = spans[0]
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(caption)):
        raise DataError(f"{where}: tokens_positive span {spans[0]} lies outside the {len(caption)}-character caption")
    return caption[start:end]


def convert_flickr30k(data: dict, *, source_file: str, split: str = "train", image_dir_prefix: str = "",
                      max_regions: int = MAX_BOXES, seed: int = 0, skip_bad: bool = False, min_square_box: float = 0.0,
                      stats: ConversionStats | None = None) -> Iterator[dict]:
    """Yield one grounded-caption dialogue per (image, caption) entry of a parsed MDETR Flickr30k dict."""
    stats = stats if stats is not None else ConversionStats()
    boxes_of = annotations_by_image(data, source_file)
    for k, img in enumerate(data["images"]):
        require_image(img, f"{source_file}: images[{k}]", extra=("caption",))
        stats.images += 1
        caption = img["caption"]
        if not isinstance(caption, str) or not caption.strip():
            stats.drop("empty_caption")
            continue
        width, height = int(img["width"]), int(img["height"])
        regions = []
        for j, ann in boxes_of.get(img["id"], ()):
            where = f"{source_file}: image {img['id']} annotation {ann.get('id', j)}"
            if ann.get("ignore", False):
                stats.drop("ignored")
                continue
            try:
                bbox = kept_box(ann, where=where, width=width, height=height, skip_bad=skip_bad, stats=stats,
                                min_square_box=min_square_box)
                if bbox is not None:
                    regions.append((bbox, phrase(caption, ann, where)))
            except DataError:
                if not skip_bad:
                    raise
                stats.drop("bad_annotation")
        if not regions:
            stats.images_without_regions += 1
            continue
        rng = image_rng(seed, img["id"])
        rng.shuffle(regions)
        if len(regions) > max_regions:
            stats.drop("regions_over_max", len(regions) - max_regions)
            regions = regions[:max_regions]
        listed = "".join(f"region{i} <bbox>," for i in range(1, len(regions) + 1))
        first = GPT4ROI_PREAMBLE + rng.choice(FLICKR_ALL_REGIONS).replace(REGION_PLACEHOLDER, listed)
        turns = [{"from": "human", "value": first}, {"from": "gpt", "value": caption}]
        for i, (_, text) in enumerate(regions, start=1):
            turns.append({"from": "human", "value": rng.choice(FLICKR_ONE_REGION).replace(REGION_PLACEHOLDER, f"region {i}")})
            turns.append({"from": "gpt", "value": text})
            stats.add_caption(text)
        stats.records += 1
        stats.regions += len(regions)
        yield {"id": f"flickr30k/{split}/{img['id']}", "image": join_image_path(image_dir_prefix, img["file_name"]),
               "width": width, "height": height, "regions": [{"bbox": b} for b, _ in regions],
               "conversations": turns, "source": SOURCE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_converters.flickr30k", description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, type=Path, help="MDETR final_flickr_mergedGT_<split>.json")
    parser.add_argument("--split", help="split name used in record ids (default: from the file name)")
    parser.add_argument("--max-regions", type=int, default=MAX_BOXES, help=f"boxes per dialogue (GPT4RoI: {MAX_BOXES})")
    add_output_arguments(parser, regions=False)
    add_box_filter_argument(parser)
    args = parser.parse_args(argv)
    data = load_json(args.annotations)
    stats = ConversionStats(input=str(args.annotations))
    records = convert_flickr30k(data, source_file=args.annotations.name, split=args.split or infer_split(args.annotations),
                                image_dir_prefix=args.image_dir_prefix or "", max_regions=args.max_regions,
                                seed=args.seed, skip_bad=args.skip_bad, min_square_box=args.min_square_box, stats=stats)
    return finish(args, records, stats)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
