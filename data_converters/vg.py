"""Visual Genome region captions (GRiT's COCO-format ``train.json``) -> region-dialogue JSONL.

GRiT's file has ``images`` (``id, file_name, width, height``) and ``annotations`` (``image_id, bbox`` xywh,
``caption``). As in GPT4RoI, each dialogue holds at most ``--max-regions`` (15) regions; unlike GPT4RoI,
the rest are not thrown away but go to further dialogues of the same image. Record ids are
``vg/<image_id>/d<k>``.

    python -m data_converters.vg --annotations train.json --out vg.jsonl --image-dir-prefix vg/images
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from data_converters.common import (ConversionStats, Region, add_box_filter_argument, add_output_arguments,
                                    annotations_by_image, finish,
                                    image_rng, join_image_path, kept_box, kept_caption, listed_images,
                                    region_records, templates_by_name)
from gpt4roi_sft.errors import DataError, run_cli
from gpt4roi_sft.json_io import load_json

SOURCE = "vg"


def caption_region(ann: dict, *, where: str, width: int, height: int, skip_bad: bool,
                   stats: ConversionStats, min_square_box: float = 0.0) -> Region | None:
    """One COCO-style caption annotation -> a :class:`Region`, or ``None`` (counted in ``stats.dropped``)."""
    bbox = kept_box(ann, where=where, width=width, height=height, skip_bad=skip_bad, stats=stats,
                    min_square_box=min_square_box)
    if bbox is None:
        return None
    caption = kept_caption(ann, "caption", where=where, stats=stats, skip_bad=skip_bad)
    return None if caption is None else Region(bbox=bbox, caption=caption)


def convert_vg(data: dict, *, source_file: str, image_dir_prefix: str = "", max_regions: int = 15, seed: int = 0,
               templates=(), skip_bad: bool = False, stats: ConversionStats | None = None,
               min_square_box: float = 0.0, max_dialogues: int | None = None) -> Iterator[dict]:
    """Yield region dialogues for a parsed GRiT VG annotation dict, in ``images`` order."""
    stats = stats if stats is not None else ConversionStats()
    templates = templates or templates_by_name("gpt4roi_vg")
    by_image = annotations_by_image(data, source_file)
    listed = listed_images(data["images"], source_file=source_file, skip_bad=skip_bad, stats=stats)
    for image_id, img in listed.items():
        stats.images += 1
        regions = []
        for j, ann in by_image.get(image_id, ()):
            where = f"{source_file}: image {image_id} annotation {ann.get('id', j)}"
            region = caption_region(ann, where=where, width=img["width"], height=img["height"],
                                    skip_bad=skip_bad, stats=stats, min_square_box=min_square_box)
            if region is not None:
                regions.append(region)
        yield from region_records(regions, record_id=f"vg/{image_id}",
                                  image=join_image_path(image_dir_prefix, img["file_name"]), width=img["width"],
                                  height=img["height"], source=SOURCE, max_regions=max_regions,
                                  rng=image_rng(seed, image_id), templates=templates, stats=stats,
                                  max_dialogues=max_dialogues)
    orphans = [image_id for image_id in by_image if image_id not in listed]
    if orphans:
        if not skip_bad:
            raise DataError(f"{source_file}: annotations refer to image {orphans[0]} which is not listed in images"
                            f" ({len(orphans)} such images)")
        stats.drop("image_not_listed", sum(len(by_image[i]) for i in orphans))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_converters.vg", description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, type=Path, help="GRiT VG train.json (COCO format)")
    add_output_arguments(parser)
    add_box_filter_argument(parser)
    args = parser.parse_args(argv)
    templates = templates_by_name(args.templates)
    data = load_json(args.annotations)
    stats = ConversionStats(input=str(args.annotations))
    records = convert_vg(data, source_file=args.annotations.name, image_dir_prefix=args.image_dir_prefix or "",
                         max_regions=args.max_regions, seed=args.seed, templates=templates,
                         skip_bad=args.skip_bad, stats=stats, min_square_box=args.min_square_box,
                         max_dialogues=args.max_dialogues)
    return finish(args, records, stats)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
