"""RefCOCOg referring expressions (MDETR ``finetune_refcocog_*.json``) -> one-region dialogue JSONL.

MDETR's files list one ``images`` entry per expression (``id, file_name, width, height, caption``) and
the referred object's box in ``annotations`` (``image_id`` = that entry's id, ``bbox`` xywh). GPT4RoI's
stage 2 asks for each expression with its VG region-caption templates (``region1 <bbox>``), so each
expression becomes one record ``refcocog/<split>/<entry id>`` with one region. An entry with several
boxes keeps the first (the others are counted as ``extra_box``).

    python -m data_converters.refcocog --annotations finetune_refcocog_train.json --out refcocog.jsonl \
        --image-dir-prefix coco/train2014
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from data_converters.common import (ConversionStats, Region, add_box_filter_argument, add_output_arguments,
                                    annotations_by_image, finish,
                                    image_rng, infer_split, join_image_path, kept_box, kept_caption, region_records,
                                    require_image, templates_by_name)
from gpt4roi_sft.errors import run_cli
from gpt4roi_sft.json_io import load_json

SOURCE = "refcocog"


def convert_refcocog(data: dict, *, source_file: str, split: str = "train", image_dir_prefix: str = "",
                     seed: int = 0, templates=(), skip_bad: bool = False,
                     stats: ConversionStats | None = None, min_square_box: float = 0.0,
                     min_words: int = 0) -> Iterator[dict]:
    """Yield one single-region dialogue per expression of a parsed MDETR RefCOCOg dict.

    ``min_words`` drops expressions of fewer words (split on single spaces, as GPT4RoI's RefCOCO sets do
    with 3); ``min_square_box`` is :func:`data_converters.common.kept_box`'s small-box filter."""
    stats = stats if stats is not None else ConversionStats()
    templates = templates or templates_by_name("gpt4roi_vg")
    boxes = annotations_by_image(data, source_file)
    for k, img in enumerate(data["images"]):
        require_image(img, f"{source_file}: images[{k}]")
        stats.images += 1
        where = f"{source_file}: image {img['id']}"
        anns = [ann for _, ann in boxes.get(img["id"], [])]
        if not anns:
            stats.drop("no_box")
            stats.images_without_regions += 1
            continue
        if len(anns) > 1:
            stats.drop("extra_box", len(anns) - 1)
        bbox = kept_box(anns[0], where=f"{where} annotation {anns[0].get('id', 0)}", width=img["width"],
                        height=img["height"], skip_bad=skip_bad, stats=stats, min_square_box=min_square_box)
        caption = None if bbox is None else kept_caption(img, "caption", where=where, stats=stats,
                                                         skip_bad=skip_bad)
        if caption is not None and len(caption.split(" ")) < min_words:
            stats.drop("caption_under_min_words")
            caption = None
        regions = [Region(bbox=bbox, caption=caption)] if caption is not None else []
        yield from region_records(regions, record_id=f"refcocog/{split}/{img['id']}",
                                  image=join_image_path(image_dir_prefix, img["file_name"]), width=img["width"],
                                  height=img["height"], source=SOURCE, max_regions=1,
                                  rng=image_rng(seed, img["id"]), templates=templates, stats=stats, numbered=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_converters.refcocog", description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, type=Path, help="MDETR finetune_refcocog_<split>.json")
    parser.add_argument("--split", help="split name used in record ids (default: from the file name)")
    add_output_arguments(parser, regions=False)
    parser.add_argument("--templates", default="gpt4roi_vg")
    parser.add_argument("--min-words", type=int, default=0, help="drop expressions of fewer words (GPT4RoI: 3)")
    add_box_filter_argument(parser)
    args = parser.parse_args(argv)
    templates = templates_by_name(args.templates)
    data = load_json(args.annotations)
    stats = ConversionStats(input=str(args.annotations))
    records = convert_refcocog(data, source_file=args.annotations.name, split=args.split or infer_split(args.annotations),
                               image_dir_prefix=args.image_dir_prefix or "", seed=args.seed, templates=templates,
                               skip_bad=args.skip_bad, stats=stats, min_square_box=args.min_square_box,
                               min_words=args.min_words)
    return finish(args, records, stats)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
