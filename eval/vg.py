"""Visual Genome region captioning, the protocol of GLaMM, Osprey and the Pix2Cap paper.

Input is GLaMM's ``test_caption.json``: COCO JSON where each ``images`` entry is one sample (file names
repeat) and the annotation with the same id holds that sample's ``bbox`` [x, y, w, h] and reference
``caption``. The whole file is validated before any generation, so a bad sample cannot crash a run after
an hour of work. Answers are appended batch by batch to ``predictions.partial.jsonl`` (resumable), then
written as ``predictions.json`` (``[{"image_id", "caption"}]``) and scored with pycocoevalcap's scorers
(``metrics.json`` fractions, ``metrics.txt`` the x100 table). When annotations carry the synthetic
generator's ``attributes`` (``colour``, ``kind``), ``summary.json`` also reports attribute accuracy.

Several processes: ``--shard-id I --num-shards K`` each generate every K-th sample into their own partial
file under ``OUT/shards/``; ``--merge`` (or ``merge`` as the first argument) then joins and scores them.
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from eval import harness
from eval.caption_metrics import format_metrics_table, score_captions, scoring_unavailable_reason
from eval.harness import HarnessConfig
from eval.prediction_store import PredictionStore
from gpt4roi_sft.atomic import write_json_atomic, write_text_atomic
from gpt4roi_sft.constants import GPT4ROI_PREAMBLE, VG_EVAL_QUESTION
from gpt4roi_sft.data.schema import check_box, is_pixel_size, xywh_to_xyxy
from gpt4roi_sft.errors import ConfigError, DataError, run_cli
from gpt4roi_sft.json_io import load_json
from gpt4roi_sft.infer import Captioner, DecodeSettings, RegionRequest

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = GPT4ROI_PREAMBLE + VG_EVAL_QUESTION
PARTIAL_NAME = "predictions.partial.jsonl"


@dataclass
class VGSample:
    """One region to caption: ``box`` is pixel xyxy; ``attributes`` the generator's truth, if any."""

    sample_id: int
    image_path: Path
    box: List[float]
    caption: str
    attributes: Optional[dict] = None


@dataclass(kw_only=True)
class VGEvalConfig(HarnessConfig):
    """Everything one VG evaluation run needs (the CLI's flags, typed)."""

    annotations: Path
    image_root: Optional[Path] = None
    prompt: str = DEFAULT_PROMPT
    decode: DecodeSettings = field(default_factory=lambda: DecodeSettings(max_new_tokens=64))
    spice_jars: Optional[Path] = None
    skip_bad: bool = False


# ---------------------------------------------------------------- reading and validating the test file


def load_vg_test(annotations: Path, image_root: Optional[Path], skip_bad: bool = False) -> Tuple[List[VGSample], List[str]]:
    """Read and validate a GLaMM-format test file; return ``(samples, skipped)``.

    Every problem is found before returning: an image entry without the annotation of the same id (or one
    whose ``image_id`` points elsewhere), a bad bbox or one wholly outside its image (the entry's ``width``
    and ``height``, else the image file's size), a caption that is empty or not a string, a missing image file
    (checked only when ``image_root`` is given). Without ``skip_bad`` any problem raises a
    :class:`DataError` naming the file, the 1-based images entry, the sample id and the total count; with it
    those samples are left out and described in ``skipped``.
    """
    annotations = Path(annotations)
    data = load_json(annotations)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{annotations}: expected a COCO-style object with 'images' and 'annotations' lists")

    anns_by_id: Dict[object, dict] = {}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or "id" not in ann:
            raise DataError(f"{annotations}: an annotation has no 'id': {str(ann)[:80]}")
        anns_by_id[ann["id"]] = ann

    samples: List[VGSample] = []
    problems: List[str] = []
    seen = set()
    for n, entry in enumerate(data["images"], start=1):
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            problems.append(f"images entry {n} lacks 'id' or 'file_name': {str(entry)[:80]}")
            continue
        sid = entry["id"]
        if sid in seen:
            problems.append(f"images entry {n}, sample {sid}: image id appears twice")
            continue
        seen.add(sid)
        try:
            samples.append(_sample(entry, anns_by_id.get(sid), image_root))
        except DataError as exc:
            problems.append(f"images entry {n}, sample {sid}: {exc}")

    orphans = [aid for aid in anns_by_id if aid not in seen]
    if orphans:
        logger.warning("%s: %d annotation(s) match no image id (e.g. %s); they are not evaluated",
                       annotations, len(orphans), orphans[:3])
    if problems and not skip_bad:
        shown = "; ".join(problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"{annotations}: {len(problems)} bad sample(s): {shown}{more}; "
                        f"fix the file or pass --skip-bad to leave them out")
    if problems:
        logger.warning("%s: skipping %d bad sample(s), e.g. %s", annotations, len(problems), problems[0])
    if not samples:
        raise DataError(f"{annotations}: no valid samples to evaluate")
    return samples, problems


def _sample(entry: dict, ann: Optional[dict], image_root: Optional[Path]) -> VGSample:
    """The sample of one ``images`` entry; a :class:`DataError` says what is wrong with it."""
    sid = entry["id"]
    if ann is None:
        raise DataError(f"no annotation with id {sid} (GLaMM's format keys each sample's annotation by the image id)")
    if "image_id" in ann and ann["image_id"] != sid:
        raise DataError(f"annotation {sid} has image_id {ann['image_id']} (annotation ids must equal image ids)")
    box = xywh_to_xyxy(ann.get("bbox"))
    caption = ann.get("caption")
    if not isinstance(caption, str):
        raise DataError(f"annotation field 'caption' must be a string (got {type(caption).__name__} {caption!r})")
    if not caption.strip():
        raise DataError("empty reference caption")
    path = (Path(image_root) / entry["file_name"]) if image_root is not None else Path(entry["file_name"])
    if image_root is not None and not path.is_file():
        raise DataError(f"image file {path} not found")
    size = _image_size(entry, path)
    if size is not None:  # the captioner clips a border-crossing box, as here, and refuses one wholly outside
        check_box(box, *size, f"bbox {ann['bbox']}", clip=True)
    attrs = ann.get("attributes")
    return VGSample(sid, path, box, caption.strip(), attrs if isinstance(attrs, dict) else None)


def _image_size(entry: dict, path: Path) -> Optional[Tuple[float, float]]:
    """``(width, height)`` the box is checked against: the entry's, else the image file's (its header only)."""
    if "width" in entry or "height" in entry:
        for key in ("width", "height"):
            value = entry.get(key)
            if not is_pixel_size(value):
                raise DataError(f"images field '{key}' must be a positive number (got {type(value).__name__} {value!r})")
        return entry["width"], entry["height"]
    if not path.is_file():
        return None
    from PIL import Image

    with Image.open(path) as image:
        return image.size


# ---------------------------------------------------------------- generation


def generate_predictions(samples: Sequence[VGSample], captioner: Captioner, store: PredictionStore,
                         prompt: str = DEFAULT_PROMPT, batch_size: Union[int, str] = "auto") -> int:
    """Caption every sample not yet in ``store``, ``batch_size`` at a time (``"auto"``: as many as memory
    holds, when the captioner can plan); return how many were generated."""
    return harness.generate_missing(samples, store, captioner, key=lambda s: str(s.sample_id),
                                    request=lambda s: RegionRequest(s.image_path, prompt, [s.box]),
                                    payload=lambda s, request, answer: {"caption": answer},
                                    batch_size=batch_size, desc="captioning")


# ---------------------------------------------------------------- scoring and reports


def _first_of(caption: str, vocabulary: Sequence[str]) -> Optional[str]:
    """The word of ``vocabulary`` that appears first in ``caption`` (whole words, case-insensitive)."""
    best, best_pos = None, None
    for word in vocabulary:
        m = re.search(rf"\b{re.escape(str(word).lower())}\b", caption.lower())
        if m and (best_pos is None or m.start() < best_pos):
            best, best_pos = word, m.start()
    return best


def attribute_accuracy(samples: Sequence[VGSample], predictions: Dict[int, str]) -> Optional[dict]:
    """Share of samples whose caption names the region's true colour and kind as its subject.

    The subject's colour and kind are the *first* colour word and the *first* kind word of the caption
    (the vocabularies are the values seen in the test file). Counting any mention would reward a caption
    that names the neighbour it describes the region against. ``chance`` is what always answering the most
    common colour and the most common kind would score. ``per_attribute`` scores each attribute of the test file
    alone the same way (``{"colour": {"accuracy", "chance", "values"}, "kind": ..., "size": ..., ...}``), so a
    run that names colours but guesses kinds shows as such. ``None`` when no sample has ``colour`` and ``kind``.
    """
    rated = [s for s in samples if s.attributes and "colour" in s.attributes and "kind" in s.attributes]
    if not rated:
        return None
    both = zip(named_right(rated, predictions, "colour"), named_right(rated, predictions, "kind"))
    hits = sum(colour_right and kind_right for colour_right, kind_right in both)
    colour = collections.Counter(s.attributes["colour"] for s in rated).most_common(1)[0][0]
    kind = collections.Counter(s.attributes["kind"] for s in rated).most_common(1)[0][0]
    chance_hits = sum(s.attributes["colour"] == colour and s.attributes["kind"] == kind for s in rated)
    return {"accuracy": hits / len(rated), "chance": chance_hits / len(rated), "num_samples": len(rated),
            "most_common_colour": colour, "most_common_kind": kind,
            "per_attribute": per_attribute_accuracy(rated, predictions)}


def named_right(samples: Sequence[VGSample], predictions: Dict[int, str], name: str) -> List[bool]:
    """Per sample (each must have attribute ``name``): is the caption's first word (or phrase) of that attribute's
    vocabulary, the values seen in ``samples``, its true value?"""
    # the longest phrase first, so "upper left" is not read as a shorter value that it contains
    vocabulary = sorted({s.attributes[name] for s in samples}, key=lambda v: (-len(v), v))
    return [_first_of(predictions[s.sample_id], vocabulary) == s.attributes[name] for s in samples]


def per_attribute_accuracy(samples: Sequence[VGSample], predictions: Dict[int, str]) -> Dict[str, dict]:
    """For each string-valued attribute of ``samples``: the share of captions that name it right
    (:func:`named_right`), the share that always answering its most common value scores, and the number of values."""
    names = sorted({k for s in samples for k, v in s.attributes.items() if isinstance(v, str)})
    scores = {}
    for name in names:
        rated = [s for s in samples if isinstance(s.attributes.get(name), str)]
        counts = collections.Counter(s.attributes[name] for s in rated)
        scores[name] = {"accuracy": sum(named_right(rated, predictions, name)) / len(rated),
                        "chance": counts.most_common(1)[0][1] / len(rated), "values": len(counts)}
    return scores


def finalize(samples: Sequence[VGSample], records: Dict[str, dict], out: Path, spice_jars: Optional[Path] = None,
             skipped: Sequence[str] = (), provenance: Optional[dict] = None) -> dict:
    """Write ``predictions.json``, ``metrics.json``, ``metrics.txt`` and ``summary.json``; return the summary.

    ``provenance`` (:func:`eval.harness.provenance` of the store) goes into ``summary.json`` and names the
    model in ``metrics.txt``.
    """
    harness.require_complete([str(s.sample_id) for s in samples], records, out)
    predictions = {s.sample_id: records[str(s.sample_id)]["caption"] for s in samples}
    write_json_atomic(out / "predictions.json", [{"image_id": k, "caption": v} for k, v in predictions.items()])
    unscorable = scoring_unavailable_reason()
    if unscorable:
        # Scores of an earlier run must not sit beside predictions they were not computed from.
        for stale in ("metrics.json", "metrics.txt"):
            (out / stale).unlink(missing_ok=True)
        summary = {"metrics": None, "scoring_note": unscorable, "num_samples": len(samples),
                   "num_skipped": len(skipped), "skipped": list(skipped), "provenance": provenance}
        write_json_atomic(out / "summary.json", summary)
        return summary
    metrics, spice_note = score_captions({s.sample_id: [s.caption] for s in samples}, predictions, spice_jars)
    write_json_atomic(out / "metrics.json", metrics)
    attrs = attribute_accuracy(samples, predictions)
    summary = {"metrics": metrics, "attribute_accuracy": attrs, "num_samples": len(samples),
               "num_skipped": len(skipped), "skipped": list(skipped), "spice_note": spice_note,
               "provenance": provenance}
    write_json_atomic(out / "summary.json", summary)
    lines = [f"VG region captioning: {len(samples)} samples ({len(skipped)} skipped), scores x100"]
    if harness.model_line(provenance):
        lines.append(harness.model_line(provenance))
    lines += ["", format_metrics_table(metrics).rstrip("\n")]
    if spice_note:
        lines.append(f"SPICE: not computed ({spice_note})")
    if attrs:
        lines.append(f"attribute accuracy (colour + kind): {100 * attrs['accuracy']:.1f} "
                     f"(chance {100 * attrs['chance']:.1f}, n={attrs['num_samples']})")
    write_text_atomic(out / "metrics.txt", "\n".join(lines) + "\n")
    return summary


def merge_shards(out: Path, num_shards: int) -> Dict[str, dict]:
    """Join the predictions of all ``num_shards`` shards under ``out/shards`` (first record of an id wins)."""
    return harness.merge_shards(out, PARTIAL_NAME, num_shards)


def evaluate(config: VGEvalConfig, captioner: Optional[Captioner] = None) -> Optional[dict]:
    """Run (or resume) one evaluation; returns the summary, or ``None`` for a shard of a multi-shard run.

    ``captioner`` defaults to the model of ``config.model`` (loaded only if something is left to generate, but
    required to exist either way: stored predictions are reused only for the model that wrote them).
    """
    samples, skipped = load_vg_test(config.annotations, config.image_root, config.skip_bad)
    mine = harness.shard(samples, config.shard_id, config.num_shards)
    store = harness.open_store(config, PARTIAL_NAME, inputs={"annotations": config.annotations},
                               settings={"prompt": config.prompt}, model_required=captioner is None)
    generate_predictions(mine, captioner or harness.captioner_for(config), store, config.prompt, config.batch_size)
    if config.num_shards > 1:
        logger.info("shard %d of %d done (%d samples); run with --merge once every shard is done",
                    config.shard_id, config.num_shards, len(mine))
        return None
    return finalize(samples, store.records, Path(config.out), config.spice_jars, skipped, harness.provenance(store))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.vg", description=__doc__.split("\n\n")[0])
    p.add_argument("--annotations", type=Path, required=True, help="GLaMM-format test_caption.json")
    p.add_argument("--image-root", type=Path, help="folder the file_name entries are relative to")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="human turn with <image> and one <bbox>")
    p.add_argument("--spice-jars", type=Path, help="folder with stanford-corenlp-3.6.0.jar and -models.jar")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad samples instead of stopping")
    harness.add_model_args(p, max_new_tokens=64)
    harness.add_shard_args(p)
    return p


def main(argv=None) -> int:
    import sys

    args = build_parser().parse_args(harness.merge_word_to_flag(sys.argv[1:] if argv is None else argv))
    harness.setup_run(args)
    if args.image_root is None and not (args.merge or args.score_only):
        raise ConfigError("--image-root is required to generate predictions")
    config = VGEvalConfig(**harness.config_kwargs(args), annotations=args.annotations, image_root=args.image_root,
                          prompt=args.prompt, spice_jars=args.spice_jars, skip_bad=args.skip_bad)
    if args.merge or args.score_only:  # the predictions already in --out; no model, no GPU
        samples, skipped = load_vg_test(config.annotations, config.image_root, config.skip_bad)
        summary = finalize(samples, merge_shards(Path(config.out), config.num_shards), Path(config.out),
                           config.spice_jars, skipped,
                           harness.merged_provenance(Path(config.out), PARTIAL_NAME, config.num_shards))
        if args.score_only and summary["metrics"] is None:  # asked to score, and cannot: not a success
            raise ConfigError(f"--score-only: {summary['scoring_note']}; the predictions stay in "
                              f"{Path(config.out) / 'predictions.json'}")
    else:
        summary = evaluate(config)
    if summary is not None and summary["metrics"] is None:
        print(f"predictions written to {Path(config.out) / 'predictions.json'}; {summary['scoring_note']}. Score them on "
              f"any machine that has both: python -m eval.vg --score-only --annotations {config.annotations} --out {config.out}"
              + (f" --num-shards {config.num_shards}" if config.num_shards > 1 else ""))
    elif summary is not None:
        print((Path(config.out) / "metrics.txt").read_text(), end="")
    else:
        print(f"shard {config.shard_id} of {config.num_shards} done; merge with: python -m eval.vg merge "
              f"--annotations {config.annotations} --out {config.out} --num-shards {config.num_shards}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
