"""LLaVA-Instruct-150K (``llava_instruct_150k.json``) -> image-only conversation JSONL (no regions).

Input: ``[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]``. The ``<image>`` token
ends up exactly once, at the start of the first human turn (LLaVA puts it first or last; both become
``<image>\\n<question>``). Turns must alternate human/gpt starting with human. ``width``/``height`` are
read from the image headers when ``--image-root`` is given, else written as ``null`` (records without
regions need no size). Record ids are ``llava_instruct/<id>``.

    python -m data_converters.llava_instruct --annotations llava_instruct_150k.json --out llava.jsonl \
        --image-dir-prefix coco/train2017
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from data_converters.common import ConversionStats, add_output_arguments, finish, join_image_path
from gpt4roi_sft.constants import IMAGE_TOKEN
from gpt4roi_sft.errors import DataError, run_cli
from gpt4roi_sft.json_io import load_json

SOURCE = "llava_instruct_150k"
ROLES = ("human", "gpt")


def image_first_turns(conversations: list, where: str) -> list[dict]:
    """Check alternation and move ``<image>`` to the front of the first human turn (once)."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: conversations must be a non-empty list")
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") != ROLES[k % 2] or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {k} must be {{'from': '{ROLES[k % 2]}', 'value': str}}")
        value = turn["value"]
        if IMAGE_TOKEN in value:
            value = value.replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "").replace(IMAGE_TOKEN, "")
            value = value.strip()
        turns.append({"from": turn["from"], "value": value})
    turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}"
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


def convert_llava_instruct(data: list, *, source_file: str, image_dir_prefix: str = "",
                           image_root: Path | None = None, skip_bad: bool = False,
                           stats: ConversionStats | None = None) -> Iterator[dict]:
    """Yield one region-free record per LLaVA conversation."""
    stats = stats if stats is not None else ConversionStats()
    if not isinstance(data, list):
        raise DataError(f"{source_file}: expected a JSON list of conversations, got {type(data).__name__}")
    for k, item in enumerate(data):
        where = f"{source_file}: entry {k} (id {item.get('id') if isinstance(item, dict) else '?'})"
        stats.images += 1
        try:
            if not isinstance(item, dict) or "image" not in item or "id" not in item:
                raise DataError(f"{where}: needs 'id', 'image' and 'conversations'")
            turns = image_first_turns(item.get("conversations"), where)
            image = join_image_path(image_dir_prefix, item["image"])
            width, height = image_size(image_root, image, where)
        except DataError:
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
        yield {"id": f"llava_instruct/{item['id']}", "image": image, "width": width, "height": height,
               "regions": [], "conversations": turns, "source": SOURCE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_converters.llava_instruct",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, type=Path, help="llava_instruct_150k.json")
    parser.add_argument("--image-root", type=Path, help="read width/height from the images under this folder")
    add_output_arguments(parser, regions=False)
    args = parser.parse_args(argv)
    data = load_json(args.annotations)
    stats = ConversionStats(input=str(args.annotations))
    records = convert_llava_instruct(data, source_file=args.annotations.name,
                                     image_dir_prefix=args.image_dir_prefix or "", image_root=args.image_root,
                                     skip_bad=args.skip_bad, stats=stats)
    return finish(args, records, stats)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
