"""ViP-Bench (ViP-LLaVA's visual-prompt benchmark) for GPT4RoI-style models, graded by an LLM judge.

Data layout (the official release)::

    DATA/vip-bench-meta-data.json           {"v1_<question_id>": {image_source, image, question, answer, capability}}
    DATA/{bbox,human}/questions.jsonl       {"question_id", "image", "text", "category"}
    DATA/{bbox,human}/images/               the images with the visual prompts drawn in
    DATA/source_image/                      plain images + labelme JSON (shapes: label obj/objN, rectangle|polygon)

Two inference modes:

- ``region`` (default; how the Pix2Cap paper ran GPT4RoI): the plain source image and the *meta* question,
  each ``<objN>`` replaced by ``regionN <bbox>`` with the enclosing box of that labelme shape (a bare
  ``<obj>`` is region1), prefixed by GPT4RoI's ``The <image> provides an overview of the picture.\\n``.
- ``visual``: the split's drawn image and its ``questions.jsonl`` text, no boxes.

Several processes: ``--shard-id I --num-shards K`` each answer every K-th question into their own file under
``OUT/shards/``; ``--merge`` (or ``merge`` as the first argument) joins them, then grades and scores.

Outputs under ``OUT``: ``predictions.jsonl`` (resumable), ``results.json`` (the official grader input
``{"v1_<id>": answer}``), ``grades.json`` (judge cache), ``scores.json``, ``scores.csv``, ``report.md``.
Aggregation is the official one: per capability, the mean score of the questions whose capability list
contains it, x100; overall, the mean over all questions, x100; mean and (population) std over runs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from eval import harness
from eval.harness import HarnessConfig
from eval.judge import ChatCompletionsJudge, GradeCache, Judge, JudgeItem, JudgeSettings, grade_all, resolve_api_key
from eval.prediction_store import PredictionStore
from gpt4roi_sft.atomic import write_json_atomic, write_text_atomic
from gpt4roi_sft.constants import GPT4ROI_PREAMBLE
from gpt4roi_sft.data.schema import is_coordinate, is_pixel_size, validate_boxes
from gpt4roi_sft.errors import ConfigError, DataError, run_cli
from gpt4roi_sft.json_io import load_json
from gpt4roi_sft.infer import Captioner, DecodeSettings, RegionRequest

logger = logging.getLogger(__name__)

SPLITS = ("bbox", "human")
MODES = ("region", "visual")
META_FILE = "vip-bench-meta-data.json"
PREDICTIONS_NAME = "predictions.jsonl"
OBJ_PATTERN = re.compile(r"<obj(\d*)>")
# The paper's columns and the capability strings that feed them (MM-Vet's names for the last two as aliases:
# ViP-Bench's exact Rel/Lang strings are not documented; unknown strings get columns of their own).
PAPER_COLUMNS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("Rec", ("rec",)), ("OCR", ("ocr",)), ("Know", ("know",)), ("Math", ("math",)),
    ("Rel", ("rel", "spat")), ("Lang", ("lang", "gen")))


@dataclass
class VipQuestion:
    """One benchmark question, with everything both modes and the judge need."""

    qid: str  # "v1_<question_id>"
    question_id: int
    text: str  # the split's questions.jsonl text (names the drawn mark)
    split_image: Path
    meta_question: str  # with <obj>/<objN> placeholders
    answer: str  # with <AND>/<OR>
    capabilities: List[str]
    source_image: Path
    obj_boxes: Dict[str, List[float]] = field(default_factory=dict)  # labelme label -> enclosing xyxy


# ---------------------------------------------------------------- data


def enclosing_box(points: Sequence[Sequence[float]]) -> List[float]:
    """xyxy box around a labelme shape's points (two corners for a rectangle, the vertices of a polygon)."""
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    return [min(xs), min(ys), max(xs), max(ys)]


def _is_point(p) -> bool:
    return isinstance(p, list) and len(p) == 2 and all(map(is_coordinate, p))


def labelme_boxes(path: Path) -> Dict[str, List[float]]:
    """``{label: xyxy}`` from a labelme file; several shapes with one label give the box around all of them."""
    data = load_json(path)
    boxes: Dict[str, List[float]] = {}
    for i, shape in enumerate(data.get("shapes") or [], start=1):  # "shape 1": the first, as an annotator counts
        label, kind, points = shape.get("label"), shape.get("shape_type", "polygon"), shape.get("points")
        need = 2 if kind == "rectangle" else 3
        if kind not in ("rectangle", "polygon"):
            raise DataError(f"{path}: shape {i} ({label}) has shape_type {kind!r}; expected rectangle or polygon")
        if not isinstance(points, list) or len(points) < need or not all(map(_is_point, points)):
            raise DataError(f"{path}: shape {i} ({label}) needs at least {need} [x, y] points of numbers, "
                            f"got {str(points)[:80]}")
        box = enclosing_box(points)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise DataError(f"{path}: shape {i} ({label}) encloses no area: {box}")
        if label in boxes:
            old = boxes[label]
            box = [min(old[0], box[0]), min(old[1], box[1]), max(old[2], box[2]), max(old[3], box[3])]
        boxes[label] = box
    width, height = (_image_size_field(data, key, path) for key in ("imageWidth", "imageHeight"))
    if width is not None and height is not None:
        for label, box in boxes.items():  # border-crossing boxes are clipped at generation, as in training
            validate_boxes([box], width, height, where=f"{path}: {label}", clip=True)
    return boxes


def _image_size_field(data: dict, key: str, path: Path) -> Optional[float]:
    """labelme's ``imageWidth``/``imageHeight``: absent (no box check), or a positive number; anything else
    would silently skip the check of every box against the image."""
    value = data.get(key)
    if value is None:
        return None
    if not is_pixel_size(value):
        raise DataError(f"{path}: {key} must be a positive number (got {value!r})")
    return value


def _box_for(label_digits: str, boxes: Dict[str, List[float]]) -> Optional[List[float]]:
    # A bare <obj> is object 1; files label it "obj" or "obj1".
    names = [f"obj{label_digits}"] + (["obj", "obj1"] if label_digits in ("", "1") else [])
    for name in names:
        if name in boxes:
            return boxes[name]
    return None


def region_prompt(meta_question: str, boxes: Dict[str, List[float]], backticks: bool = False) -> Tuple[str, List[List[float]]]:
    """GPT4RoI's prompt for a meta question: ``<objN>`` -> ``regionN <bbox>``, boxes in the order of the ``<bbox>`` tokens.

    ``backticks=True`` writes ```regionN <bbox>``` as the Pix2Cap conversion script does.
    """
    ordered: List[List[float]] = []

    def replace(match: re.Match) -> str:
        digits = match.group(1)
        box = _box_for(digits, boxes)
        if box is None:
            raise KeyError(f"obj{digits}")
        ordered.append(box)
        ref = f"region{digits or 1} <bbox>"
        return f"`{ref}`" if backticks else ref

    return GPT4ROI_PREAMBLE + OBJ_PATTERN.sub(replace, meta_question), ordered


def load_vipbench(root: Path, split: str, mode: str = "region") -> List[VipQuestion]:
    """Read and validate the split's questions, the meta data and (region mode) the labelme boxes.

    Every problem across the whole set is collected first and reported in one :class:`DataError`
    (with the first few named), so nothing is generated for a broken download.
    """
    root = Path(root)
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    meta_path, questions_path = root / META_FILE, root / split / "questions.jsonl"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found (is {root} a ViP-Bench folder?)")
    meta = load_json(meta_path)
    if not questions_path.is_file():
        raise DataError(f"{questions_path}: not found")

    problems: List[str] = []
    questions: List[VipQuestion] = []
    labelme_cache: Dict[Path, Dict[str, List[float]]] = {}
    for lineno, raw in enumerate(questions_path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{questions_path} line {lineno}"
        try:
            q = json.loads(raw.decode("utf-8"))
            qnum, image, text = int(q["question_id"]), q["image"], q["text"]
        except UnicodeDecodeError as exc:
            problems.append(f"{where}: not UTF-8 text (byte {exc.start} of the line: {raw[exc.start]:#04x})")
            continue
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{where}: not a question record ({exc})")
            continue
        qid = f"v1_{qnum}"
        m = meta.get(qid)
        if not isinstance(m, dict) or not all(k in m for k in ("image_source", "question", "answer", "capability")):
            problems.append(f"{where}: {qid} missing from {META_FILE} or lacks image_source/question/answer/capability")
            continue
        caps = m["capability"]
        if not isinstance(caps, list) or not caps or not str(m["answer"]).strip():
            problems.append(f"{qid}: empty answer or capability list in {META_FILE}")
            continue
        item = VipQuestion(qid, qnum, text, root / split / "images" / image, m["question"], m["answer"],
                           [str(c) for c in caps], root / "source_image" / m["image_source"])
        if mode == "visual":
            if not item.split_image.is_file():
                problems.append(f"{qid}: image {item.split_image} not found")
                continue
        else:
            if not item.source_image.is_file():
                problems.append(f"{qid}: source image {item.source_image} not found")
                continue
            labelme = item.source_image.with_suffix(".json")
            try:
                if labelme not in labelme_cache:
                    labelme_cache[labelme] = labelme_boxes(labelme)
            except DataError as exc:
                problems.append(f"{qid}: {exc}")
                continue
            item.obj_boxes = labelme_cache[labelme]
            try:
                region_prompt(item.meta_question, item.obj_boxes)
            except KeyError as exc:
                problems.append(f"{qid}: question names <{exc.args[0]}> but {labelme} has no shape labelled so")
                continue
        questions.append(item)

    seen = set()
    for q in questions:
        if q.qid in seen:
            problems.append(f"{q.qid}: question id appears twice in {questions_path}")
        seen.add(q.qid)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"{root}: {len(problems)} problem(s) in ViP-Bench {split}: {'; '.join(problems[:3])}{more}")
    if not questions:
        raise DataError(f"{questions_path}: no questions")
    return questions


def make_request(q: VipQuestion, mode: str, backticks: bool = False) -> RegionRequest:
    """The generation request for one question in ``mode``."""
    if mode == "region":
        prompt, boxes = region_prompt(q.meta_question, q.obj_boxes, backticks)
        return RegionRequest(q.source_image, prompt, boxes)
    return RegionRequest(q.split_image, GPT4ROI_PREAMBLE + q.text, [])


# ---------------------------------------------------------------- generation


def generate_answers(questions: Sequence[VipQuestion], captioner: Captioner, store: PredictionStore, mode: str,
                     batch_size: Union[int, str] = "auto", backticks: bool = False) -> int:
    """Answer every question not yet in ``store``; return how many were generated."""
    def payload(q: VipQuestion, request: RegionRequest, answer: str) -> dict:
        return {"question_id": q.question_id, "prompt": request.prompt, "boxes": request.boxes, "text": answer}

    return harness.generate_missing(questions, store, captioner, key=lambda q: q.qid,
                                    request=lambda q: make_request(q, mode, backticks), payload=payload,
                                    batch_size=batch_size, desc="ViP-Bench")


# ---------------------------------------------------------------- scores


def aggregate(questions: Sequence[VipQuestion], scores: Dict[str, Dict[int, float]], runs: int) -> dict:
    """The official aggregation over ``runs``; only graded questions count (``complete`` says if all were).

    Returns ``{"overall", "std", "by_capability", "runs": [{"overall", "by_capability"}], "num_graded",
    "complete"}``; numbers are x100 and unrounded (the official table rounds to one decimal). ``overall``
    and ``by_capability`` are ``None`` when nothing is graded.
    """
    caps = sorted({c for q in questions for c in q.capabilities})
    per_run = []
    graded_any = set()
    for run in range(runs):
        graded = [q for q in questions if run in scores.get(q.qid, {})]
        graded_any.update(q.qid for q in graded)
        if not graded:
            continue
        by_cap = {}
        for c in caps:
            members = [scores[q.qid][run] for q in graded if c in q.capabilities]
            by_cap[c] = 100.0 * sum(members) / len(members) if members else None
        per_run.append({"overall": 100.0 * sum(scores[q.qid][run] for q in graded) / len(graded), "by_capability": by_cap})
    complete = all(run in scores.get(q.qid, {}) for q in questions for run in range(runs))
    if not per_run:
        return {"overall": None, "std": None, "by_capability": {c: None for c in caps}, "runs": [],
                "num_graded": 0, "complete": False}
    totals = np.array([r["overall"] for r in per_run])
    by_cap = {}
    for c in caps:
        vals = [r["by_capability"][c] for r in per_run if r["by_capability"][c] is not None]
        by_cap[c] = float(np.mean(vals)) if vals else None
    return {"overall": float(totals.mean()), "std": float(totals.std()), "by_capability": by_cap, "runs": per_run,
            "num_graded": len(graded_any), "complete": complete}


def paper_row(scores: dict) -> Dict[str, Optional[float]]:
    """``{"Rec", "OCR", "Know", "Math", "Rel", "Lang", <other capabilities>, "All"}`` from :func:`aggregate`."""
    by_cap = dict(scores["by_capability"])
    row: Dict[str, Optional[float]] = {}
    for column, aliases in PAPER_COLUMNS:
        row[column] = next((by_cap.pop(a) for a in aliases if a in by_cap), None)
    for c in sorted(by_cap):
        row[c] = by_cap[c]
    row["All"] = scores["overall"]
    return row


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def write_reports(out: Path, scores: dict, model_name: str) -> None:
    """``scores.json`` (as given), ``scores.csv`` and ``report.md`` (the paper's table, one decimal)."""
    write_json_atomic(out / "scores.json", scores)
    row = paper_row(scores)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", *row, "std", "runs", "judge", "graded", "questions"])
    writer.writerow([model_name, *(_fmt(v) for v in row.values()), _fmt(scores["std"]),
                     " ".join(_fmt(r["overall"]) for r in scores["runs"]), scores["judge"] or "",
                     scores["num_graded"], scores["num_questions"]])
    write_text_atomic(out / "scores.csv", buf.getvalue())
    lines = [f"# ViP-Bench ({scores['split']} split, {scores['mode']} mode)", "",
             "| Model | " + " | ".join(row) + " |", "|---" * (len(row) + 1) + "|",
             f"| {model_name} | " + " | ".join(_fmt(v) for v in row.values()) + " |", ""]
    if harness.model_line(scores.get("provenance")):
        lines += [harness.model_line(scores["provenance"]), ""]
    if scores["judge"] is None:
        lines.append(f"**Ungraded**: no judge was configured, so the {scores['num_questions']} answers in "
                     f"`results.json` are ungraded (not scored as 0). Rerun with --judge-base-url and --judge-model.")
    else:
        lines.append(f"Judge: `{scores['judge']}` ({scores['num_runs']} run(s); std of All over runs "
                     f"{_fmt(scores['std'])}). Scores from judges other than GPT-4 are not comparable to published numbers.")
        if not scores["complete"]:
            lines.append(f"**Incomplete**: {scores['num_questions'] - scores['num_graded']} of {scores['num_questions']} "
                         f"questions are ungraded ({scores.get('judge_error') or 'judge stopped'}); the scores cover "
                         f"graded questions only. Rerun to grade the rest (cached grades are kept).")
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")


# ---------------------------------------------------------------- the run


@dataclass(kw_only=True)
class VipBenchConfig(HarnessConfig):
    """Everything one ViP-Bench run needs (the CLI's flags, typed)."""

    data: Path
    split: str
    mode: str = "region"
    decode: DecodeSettings = field(default_factory=lambda: DecodeSettings(max_new_tokens=256))
    backticks: bool = False
    judge: Optional[JudgeSettings] = None
    runs: int = 1


def run(config: VipBenchConfig, captioner: Optional[Captioner] = None, api_key: Optional[str] = None,
        judge: Optional[Judge] = None) -> Optional[dict]:
    """Generate (or resume), grade and score; return ``scores.json``'s content (``None`` for one shard of several).

    ``captioner`` defaults to the model of ``config.model`` (loaded only if something is left to answer);
    ``judge`` to the OpenAI-compatible endpoint of ``config.judge`` (with ``api_key``); no judge, no grades.
    """
    _check(config)
    questions = load_vipbench(config.data, config.split, config.mode)
    mine = harness.shard(questions, config.shard_id, config.num_shards)
    store = harness.open_store(config, PREDICTIONS_NAME, inputs=input_files(config),
                               settings={"split": config.split, "mode": config.mode, "backticks": config.backticks},
                               model_required=captioner is None)
    generate_answers(mine, captioner or harness.captioner_for(config), store, config.mode, config.batch_size,
                     config.backticks)
    if config.num_shards > 1:
        logger.info("shard %d of %d done (%d questions); run with --merge once every shard is done",
                    config.shard_id, config.num_shards, len(mine))
        return None
    return grade_and_score(config, questions, store.records, api_key, judge, harness.provenance(store))


def input_files(config: VipBenchConfig) -> Dict[str, Path]:
    """The files whose content decides the questions: the meta data and the split's questions."""
    root = Path(config.data)
    return {"meta": root / META_FILE, "questions": root / config.split / "questions.jsonl"}


def grade_and_score(config: VipBenchConfig, questions: Sequence[VipQuestion], records: Dict[str, dict],
                    api_key: Optional[str] = None, judge: Optional[Judge] = None,
                    provenance: Optional[dict] = None) -> dict:
    """``results.json``, the grades (cached in ``grades.json``) and the reports, from the stored answers.

    ``provenance`` (:func:`eval.harness.provenance` of the answers' store) ties the grade cache to the answers'
    setup and names the model in the reports.
    """
    _check(config)
    out = Path(config.out)
    harness.require_complete([q.qid for q in questions], records, out)
    answers = {q.qid: records[q.qid]["text"] for q in questions}
    write_json_atomic(out / "results.json", answers)

    if judge is None and config.judge is not None:
        judge = ChatCompletionsJudge(config.judge, api_key=api_key)
    judge_id, judge_error, grades = None, None, {}
    if judge is not None:
        items = [JudgeItem(q.qid, q.text, q.meta_question, q.answer, answers[q.qid]) for q in questions]
        cache = GradeCache(out / "grades.json", (provenance or {}).get("setup"), overwrite=config.overwrite)
        outcome = grade_all(items, judge, cache, config.runs)
        judge_id, judge_error, grades = outcome.judge_model, outcome.error, outcome.scores
    else:
        logger.warning("no judge configured: %d answers written ungraded to %s", len(questions), out / "results.json")
    scores = aggregate(questions, grades, config.runs)
    scores.update({"judge": judge_id, "judge_error": judge_error, "split": config.split, "mode": config.mode,
                   "num_questions": len(questions), "num_runs": config.runs,
                   "ungraded": [q.qid for q in questions if len(grades.get(q.qid, {})) < config.runs],
                   "provenance": provenance})
    about = (provenance or {}).get("produced_by") or {}
    named = about.get("adapter") or about.get("model") or {}
    write_reports(out, scores, Path(str(named.get("path") or config.adapter or config.model or "model")).name)
    return scores


def _check(config: VipBenchConfig) -> None:
    if config.mode not in MODES:
        raise ConfigError(f"--mode {config.mode!r}: expected one of {', '.join(MODES)}")
    if config.runs < 1:
        raise ConfigError("--runs must be at least 1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.vipbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="ViP-Bench folder (official layout)")
    p.add_argument("--split", choices=SPLITS, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=MODES, default="region", help="region: source image + boxes (default); visual: drawn image")
    p.add_argument("--backtick-regions", action="store_true", help="write `regionN <bbox>` with backticks as Pix2Cap's script")
    harness.add_model_args(p, max_new_tokens=256)
    harness.add_shard_args(p)
    p.add_argument("--judge-base-url", help="OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1; "
                                            "key from JUDGE_API_KEY, else OPENAI_API_KEY")
    p.add_argument("--judge-model")
    p.add_argument("--runs", type=int, default=1, help="independent judge runs (the paper used 5)")
    p.add_argument("--judge-concurrency", type=int, default=4)
    p.add_argument("--judge-timeout", type=float, default=60.0)
    p.add_argument("--judge-max-retries", type=int, default=5, help="retries after an API error (then the item stays ungraded)")
    p.add_argument("--judge-backoff", type=float, default=2.0, help="first backoff in seconds (doubles, max 60)")
    return p


def main(argv=None) -> int:
    import sys

    args = build_parser().parse_args(harness.merge_word_to_flag(sys.argv[1:] if argv is None else argv))
    if bool(args.judge_base_url) != bool(args.judge_model):
        raise ConfigError("--judge-base-url and --judge-model go together")
    if args.judge_concurrency < 1 or args.judge_max_retries < 0:
        raise ConfigError("--judge-concurrency must be >= 1, --judge-max-retries >= 0")
    harness.setup_run(args)
    judge = None
    if args.judge_base_url:
        judge = JudgeSettings(base_url=args.judge_base_url, model=args.judge_model, timeout_s=args.judge_timeout,
                              max_api_retries=args.judge_max_retries, backoff_s=args.judge_backoff,
                              concurrency=args.judge_concurrency)
    config = VipBenchConfig(**harness.config_kwargs(args), data=args.data, split=args.split, mode=args.mode,
                            backticks=args.backtick_regions, judge=judge, runs=args.runs)
    api_key = resolve_api_key(os.environ) if judge else None
    if args.merge:
        questions = load_vipbench(config.data, config.split, config.mode)
        scores = grade_and_score(config, questions, harness.merge_shards(Path(config.out), PREDICTIONS_NAME,
                                                                         config.num_shards), api_key,
                                 provenance=harness.merged_provenance(Path(config.out), PREDICTIONS_NAME,
                                                                      config.num_shards))
    else:
        scores = run(config, api_key=api_key)
    if scores is None:
        print(f"shard {config.shard_id} of {config.num_shards} done; merge with: python -m eval.vipbench merge "
              f"--data {config.data} --split {config.split} --mode {config.mode} --out {config.out} "
              f"--num-shards {config.num_shards} [--judge-base-url URL --judge-model NAME --runs N]")
    else:
        print((Path(args.out) / "report.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
