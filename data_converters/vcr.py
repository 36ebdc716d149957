"""VCR (``train.jsonl`` + per-image metadata JSON) -> GPT4RoI's three VCR dialogue variants.

Each ``train.jsonl`` line has ``img_fn``, ``metadata_fn`` (both relative to the ``vcr1images`` folder),
``objects`` (detected class names) and the original strings ``question_orig``, ``answer_orig``,
``rationale_orig``, in which an object is written as its 1-based number (``"Why is 2 smiling?"``). The metadata
JSON holds ``boxes`` (``[x1, y1, x2, y2, score]`` per object, pixels) and ``width``/``height``. Following GPT4RoI's
``gpt4roi/datasets/vcr.py``, ``--variant`` picks:

- ``full`` (``VCRDataset``): every object's box, listed first as ``region1 <bbox>,...,regionN <bbox>`` inside one of
  six phrasings (``Given <spi>,`` ...) glued to the question; each standalone number N in the question, answer
  and rationale becomes ``{objects[N]} at regionN``. GPT4RoI indexes the names with N itself (not N - 1), so
  names are one object late and a text naming the last object is dropped; that is kept by default
  (``--one-based-names`` corrects it). Then a "why" question (one of 39) and the rationale.
- ``single`` (``SingleVCRDataset``): questions naming exactly one object whose answer names only it (and, for
  the "why" turn, whose rationale too): the question's number becomes ``region1 <bbox>`` (that object's box
  only), the answer's (and rationale's) ``{name} at region1``; no "why" turn when the rationale names others.
- ``multi`` (``MultiVCRDataset``): the same for questions naming several objects: the k-th number of the
  question becomes ``region{k} <bbox>`` in the question and ``{name} at region{k}`` in the answer and rationale
  (a repeated number keeps its first region, and its box is listed again, as in GPT4RoI); a question whose
  ``<bbox>`` count then differs from its numbers (a number inside a word, ``2nd``) is dropped.

Every dialogue starts with ``The <image> provides an overview of the picture.\\n``. GPT4RoI draws phrasings once
per load; here once per line from ``--seed``. Record ids are ``vcr/<variant>/<line number>``.

    python -m data_converters.vcr --annotations vcr/train.jsonl --image-root vcr/vcr1images --variant full \
        --image-dir-prefix vcr1images --out vcr_full.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from data_converters.common import ConversionStats, add_output_arguments, finish, image_rng, join_image_path
from data_converters.templates import VCR_REFERENCE, VCR_WHY
from gpt4roi_sft.constants import GPT4ROI_PREAMBLE
from gpt4roi_sft.data.schema import check_box, clip_box
from gpt4roi_sft.errors import BoxError, DataError, run_cli
from gpt4roi_sft.json_io import load_json

SOURCE = "vcr"
VARIANTS = ("full", "single", "multi")
_NUMBER = re.compile(r"\b(\d+)\b")
_DIGITS = re.compile(r"\d+")


class Skip(Exception):
    """This line gives no dialogue in this variant (counted under ``reason``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _name_numbers(text: str, names: Sequence[str], one_based: bool) -> str:
    """``full``: every standalone number N -> ``{name} at regionN``; a number naming no object drops the line."""
    def repl(m: re.Match) -> str:
        n = int(m.group(1))
        k = n - 1 if one_based else n
        if not 0 <= k < len(names):
            raise Skip("number_not_an_object")
        return f"{names[k]} at region{n}"

    return _NUMBER.sub(repl, text)


def full_dialogue(ann: dict, boxes: list, rng: random.Random, one_based: bool):
    names = ann["objects"]
    listed = ",".join(f"region{i} <bbox>" for i in range(1, len(names) + 1))
    prefix = rng.choice(VCR_REFERENCE).replace("<spi>", listed)
    q, a, why = (_name_numbers(ann[k], names, one_based) for k in ("question_orig", "answer_orig", "rationale_orig"))
    turns = [("human", prefix + q), ("gpt", a), ("human", rng.choice(VCR_WHY)), ("gpt", why)]
    return turns, boxes[: len(names)]


def _format(q_digits: List[str], a_digits: List[str], why_digits: List[str]) -> int:
    """GPT4RoI's ``judge_format``: 0 when the answer's numbers are the question's, 1 when the rationale's are too."""
    fmt = 0 if set(a_digits).issubset(q_digits) else -1
    if set(a_digits).union(why_digits).issubset(set(q_digits)):
        fmt = 1
    return fmt


def subset_dialogue(ann: dict, boxes: list, rng: random.Random, multi: bool):
    names = ann["objects"]
    q, a, why = ann["question_orig"], ann["answer_orig"], ann["rationale_orig"]
    q_digits, a_digits, why_digits = _DIGITS.findall(q), _DIGITS.findall(a), _DIGITS.findall(why)
    fmt = _format(q_digits, a_digits, why_digits)
    if fmt < 0:
        raise Skip("answer_names_other_objects")
    if not a_digits:
        raise Skip("answer_names_no_object")
    index = [int(d) - 1 for d in q_digits]
    if any(i < 0 or i >= len(boxes) for i in index):
        raise Skip("number_not_an_object")
    chosen = [boxes[i] for i in index]
    if (len(q_digits) <= 1) == multi:
        raise Skip("one_object" if multi else "several_objects")
    if not multi:
        q = _DIGITS.sub("region1 <bbox>", q)
        a = a.replace(a_digits[0], f"{names[index[0]]} at region1")
        if fmt == 1 and why_digits:
            why = why.replace(why_digits[0], f"{names[int(why_digits[0]) - 1]} at region1")
    else:
        marks = [f"\x00{'Q' * (k + 1)}\x00" for k in range(len(q_digits))]  # no digits: never matched again
        for k, d in enumerate(q_digits):  # placeholders first, so a replaced number is not replaced again
            pattern = re.compile(r"\b" + str(int(d)) + r"\b")
            q, a = pattern.sub(marks[k], q), pattern.sub(marks[k], a)
            if fmt == 1:
                why = pattern.sub(marks[k], why)
        for k, d in enumerate(q_digits):
            name = names[int(d) - 1]
            q = q.replace(marks[k], f"region{k + 1} <bbox>")
            a = a.replace(marks[k], f"{name} at region{k + 1}")
            if fmt == 1:
                why = why.replace(marks[k], f"{name} at region{k + 1}")
    if q.count("<bbox>") != len(chosen):  # a number inside a word ("2nd") was counted but not replaced
        raise Skip("box_count_mismatch")
    turns = [("human", q), ("gpt", a)]
    if fmt == 1:
        turns += [("human", rng.choice(VCR_WHY)), ("gpt", why)]
    return turns, chosen


def _metadata(image_root: Path, ann: dict, where: str) -> dict:
    path = image_root / ann["metadata_fn"]
    meta = load_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("boxes"), list):
        raise DataError(f"{where}: {path} has no 'boxes' list")
    if "width" not in meta or "height" not in meta:
        from PIL import Image  # header read only

        try:
            with Image.open(image_root / ann["img_fn"]) as im:
                meta["width"], meta["height"] = im.size
        except FileNotFoundError:
            raise DataError(f"{where}: {path} has no width/height and the image is missing") from None
    return meta


def _boxes(meta: dict, where: str) -> list:
    width, height = meta["width"], meta["height"]
    out = []
    for k, b in enumerate(meta["boxes"]):
        if not isinstance(b, (list, tuple)) or len(b) < 4:
            raise DataError(f"{where}: boxes[{k}] is not [x1, y1, x2, y2, score]")
        box = clip_box([float(v) for v in b[:4]], width, height)
        check_box(box, width, height, f"{where}: boxes[{k}]")
        out.append(box)
    return out


def convert_vcr(lines: Sequence[str], *, source_file: str, image_root: Path, variant: str = "full",
                image_dir_prefix: str = "", seed: int = 0, one_based_names: bool = False, skip_bad: bool = False,
                stats: Optional[ConversionStats] = None) -> Iterator[dict]:
    """Yield the ``variant`` dialogues of VCR's JSON lines (``lines`` are the raw lines of ``train.jsonl``)."""
    if variant not in VARIANTS:
        raise DataError(f"--variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    stats = stats if stats is not None else ConversionStats()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source_file} line {lineno}"
        stats.images += 1
        try:
            try:
                ann = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc})") from None
            for key in ("img_fn", "metadata_fn", "objects", "question_orig", "answer_orig", "rationale_orig"):
                if key not in ann:
                    raise DataError(f"{where}: missing field {key}")
            meta = _metadata(image_root, ann, where)
            boxes = _boxes(meta, where)
            rng = image_rng(seed, f"{variant}/{lineno}")
            if variant == "full":
                turns, chosen = full_dialogue(ann, boxes, rng, one_based_names)
            else:
                turns, chosen = subset_dialogue(ann, boxes, rng, multi=variant == "multi")
        except Skip as skip:
            stats.drop(skip.reason)
            continue
        except (DataError, BoxError):
            if not skip_bad:
                raise
            stats.drop("bad_line")
            continue
        conversations = [{"from": role, "value": text} for role, text in turns]
        conversations[0]["value"] = GPT4ROI_PREAMBLE + conversations[0]["value"]
        stats.records += 1
        stats.regions += len(chosen)
        for turn in conversations[1::2]:
            stats.add_caption(turn["value"])
        yield {"id": f"vcr/{variant}/{lineno}", "image": join_image_path(image_dir_prefix, ann["img_fn"]),
               "width": meta["width"], "height": meta["height"], "regions": [{"bbox": b} for b in chosen],
               "conversations": conversations, "source": f"{SOURCE}_{variant}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_converters.vcr", description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, type=Path, help="VCR train.jsonl")
    parser.add_argument("--image-root", required=True, type=Path, help="the vcr1images folder (metadata_fn, img_fn)")
    parser.add_argument("--variant", choices=VARIANTS, default="full")
    parser.add_argument("--one-based-names", action="store_true",
                        help="full variant: name object N by objects[N-1] (GPT4RoI used objects[N])")
    add_output_arguments(parser, regions=False)
    args = parser.parse_args(argv)
    if not args.annotations.is_file():
        raise DataError(f"{args.annotations}: file not found")
    lines = args.annotations.read_text(encoding="utf-8").splitlines()
    stats = ConversionStats(input=str(args.annotations))
    records = convert_vcr(lines, source_file=args.annotations.name, image_root=args.image_root, variant=args.variant,
                          image_dir_prefix=args.image_dir_prefix or "", seed=args.seed,
                          one_based_names=args.one_based_names, skip_bad=args.skip_bad, stats=stats)
    return finish(args, records, stats)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
