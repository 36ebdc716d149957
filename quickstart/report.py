"""The quickstart's before/after report: ``report.json``, ``report.md`` and a captioned held-out image.

``python -m quickstart.report --before DIR --after DIR --train-dir DIR --annotations FILE
--image-root DIR --out DIR`` reads two finished ``eval.vg`` runs (the untrained and the trained model on the
same held-out test file) and the training run, and writes the comparison a new user reads first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from eval.vg import load_vg_test
from gpt4roi_sft.atomic import write_json_atomic, write_text_atomic
from gpt4roi_sft.errors import DataError
from gpt4roi_sft.train.metrics_log import plot_loss

METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def _read_output(run_dir: Path, name: str, producer: str = "eval.vg"):
    """``run_dir/name`` parsed, or a one-line error naming the command that writes it."""
    path = run_dir / name
    if not path.is_file():
        raise DataError(f"{path}: missing; run {producer} into {run_dir} first")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_summary(run_dir: Path) -> dict:
    return _read_output(run_dir, "summary.json")


def evaluated_model(summary: dict) -> Optional[dict]:
    """``{"path", "fingerprint", "step", ...}`` of the model an ``eval.vg`` summary was produced by."""
    return (((summary.get("provenance") or {}).get("produced_by")) or {}).get("model")


SEGCAP_KEYS = ("PQ", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "mAP")


def segcap_summary(metrics: dict) -> dict:
    """The report's part of an ``eval.segcap`` ``metrics.json``: PQ, the scaled caption metrics and mAP."""
    return {**{k: metrics.get(k) for k in SEGCAP_KEYS}, "images": metrics.get("images"),
            "segments": metrics.get("gt_segments"), "model": evaluated_model({"provenance": metrics.get("provenance")})}


def build_report(before: dict, after: dict, train_log: List[dict], segcap: Optional[dict] = None) -> dict:
    """The report.json payload: metrics of both runs, attribute accuracy with chance, the training summary and the
    checkpoint the trained model was exported from.

    Scores of a checkpoint other than the one training ended at are refused (a :class:`DataError`), so the
    report never puts one run's step count beside another checkpoint's scores.
    """
    b_attr, a_attr = before.get("attribute_accuracy") or {}, after.get("attribute_accuracy") or {}
    report = {
        "before": before["metrics"],
        "after": after["metrics"],
        "attribute_accuracy": {"before": b_attr.get("accuracy"), "after": a_attr.get("accuracy"), "chance": a_attr.get("chance"),
                               "per_attribute_after": a_attr.get("per_attribute")},
        "num_samples": after.get("num_samples"),
        "evaluated": {"before": evaluated_model(before), "after": evaluated_model(after)},
    }
    if segcap is not None:
        report["segmentation_captioning"] = seg = segcap_summary(segcap)
        prints = ((seg["model"] or {}).get("fingerprint"), (evaluated_model(after) or {}).get("fingerprint"))
        if None not in prints and prints[0] != prints[1]:
            raise DataError(f"the segmentation-captioning scores are of model weights {prints[0]}, the region "
                            f"captioning ones of {prints[1]}; evaluate the same trained model in both")
    if train_log:
        report["training"] = {
            "steps": train_log[-1]["step"],
            "first_loss": train_log[0]["loss"],
            "last_loss": train_log[-1]["loss"],
            "seconds": round(sum(r.get("step_time_s", 0.0) for r in train_log), 1),
        }
        step = (evaluated_model(after) or {}).get("step")
        if step is not None and step != train_log[-1]["step"]:
            raise DataError(f"the trained model's scores are of the checkpoint at step {step}, but training reached "
                            f"step {train_log[-1]['step']}; export and evaluate the latest checkpoint again "
                            f"(scripts/quickstart.sh does both)")
    return report


def _fmt(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def report_markdown(report: dict) -> str:
    rows = ["| model | " + " | ".join(METRIC_KEYS) + " | attribute acc. |", "|---" * (len(METRIC_KEYS) + 2) + "|"]
    attr = report["attribute_accuracy"]
    for name in ("before", "after"):
        cells = [_fmt(report[name].get(k)) for k in METRIC_KEYS]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(attr[name])} |")
    lines = [
        "# Quickstart report",
        "",
        "Region captioning on the held-out synthetic images (GLaMM-format VG protocol, scores x100), for the",
        "untrained tiny model (before) and the same model after fine-tuning (after).",
        "",
        *rows,
        "",
        f"Attribute accuracy: share of held-out regions whose caption names the region's true colour and kind as "
        f"its subject; guessing the most common colour and kind scores {_fmt(attr['chance'])}.",
    ]
    per = attr.get("per_attribute_after")
    if per:
        lines += ["", "Each attribute alone (after; the most common value's share in brackets): " + ", ".join(
            f"{name} {_fmt(score['accuracy'])} ({_fmt(score['chance'])}, {score['values']} values)"
            for name, score in per.items()) + "."]
    if report.get("training"):
        t = report["training"]
        lines += ["", f"Training: {t['steps']} steps, loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}, "
                      f"{t['seconds']:.0f} s of steps (see loss.png)."]
    after_model = (report.get("evaluated") or {}).get("after")
    if after_model:
        source = (f"exported from the checkpoint at step {after_model['step']}" if after_model.get("step") is not None
                  else "not an export of a training checkpoint")
        lines += ["", f"Evaluated (after): `{after_model['path']}`, {source} (weights {after_model['fingerprint']})."]
    cider = report["after"].get("CIDEr"), report["before"].get("CIDEr")
    if None not in cider:
        lines += ["", f"CIDEr gain: {100 * (cider[0] - cider[1]):+.1f} points."]
    seg = report.get("segmentation_captioning")
    if seg:
        lines += ["", "Segmentation captioning (Pix2Cap-COCO's protocol, `eval.segcap`): the trained model captions the "
                  f"ground-truth panoptic segments of {seg['images']} held-out images ({seg['segments']} segments), "
                  "so PQ is 100 by construction and the caption metrics are not scaled down; mAP is DenseCap-style "
                  "(METEOR thresholds x IoU thresholds). Scores x100:", "",
                  "| " + " | ".join(SEGCAP_KEYS) + " |", "|---" * len(SEGCAP_KEYS) + "|",
                  "| " + " | ".join(_fmt(seg.get(k)) for k in SEGCAP_KEYS) + " |"]
    return "\n".join(lines) + "\n"


REGION_COLOURS = [(255, 80, 80), (80, 170, 255), (255, 210, 0), (0, 220, 120), (220, 120, 255), (255, 150, 40)]
PANEL = (24, 24, 24)
TEXT = (235, 235, 235)
FONT_SIZE = 15
PICTURE_WIDTH = 720


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _wrap(text: str, fits) -> List[str]:
    """Greedy word wrap: the longest run of words ``fits(line)`` accepts, continuation lines indented."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else (word if not lines else f"    {word}")
        if line and not fits(candidate):
            lines.append(line)
            line = f"    {word}"
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines


def caption_lines(regions: List[dict], fits) -> List[Tuple[int, str, str]]:
    """``(region index, kind, text line)`` for each region: its reference, then the caption before and after
    training (``kind`` is the heading each line belongs to), wrapped so that ``fits(line)`` holds."""
    out = []
    for i, region in enumerate(regions):
        for kind, label in (("reference", f"region{i + 1} reference:"), ("before", "before training:"),
                            ("after", "after training:")):
            out.extend((i, kind, line) for line in _wrap(f"{label} {region[kind]}", fits))
    return out


def draw_captions(image_path: Path, regions: List[dict], out_path: Path) -> List[Tuple[int, str, str]]:
    """The held-out image with each region's box and number, and below it, per region, the reference caption and
    the captions before and after training. Returns the text lines drawn.

    ``regions``: ``{"box": [x1, y1, x2, y2] pixels, "reference", "before", "after"}``. Boxes get a black outer and
    a coloured inner stroke and numbers sit on a filled tag, so they read on light and dark images alike; the
    text is light on a dark panel, at a size that stays legible when the picture is shown scaled down.
    """
    from PIL import Image, ImageDraw

    image = Image.open(image_path).convert("RGB")
    scale = PICTURE_WIDTH / image.width
    image = image.resize((PICTURE_WIDTH, max(1, round(image.height * scale))), Image.BICUBIC)
    font = _font(FONT_SIZE)
    lines = caption_lines(regions, fits=lambda line: font.getlength(line) <= PICTURE_WIDTH - 20)
    line_h = FONT_SIZE + 5
    gaps = 8 * max(0, len(regions) - 1)
    canvas = Image.new("RGB", (image.width, image.height + len(lines) * line_h + gaps + 16), PANEL)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, region in enumerate(regions):
        colour = REGION_COLOURS[i % len(REGION_COLOURS)]
        x1, y1, x2, y2 = (v * scale for v in region["box"])
        draw.rectangle([x1, y1, x2, y2], outline=(0, 0, 0), width=5)
        draw.rectangle([x1 + 1, y1 + 1, x2 - 1, y2 - 1], outline=colour, width=3)
        tag = str(i + 1)
        tw, th = font.getbbox(tag)[2:]
        tx, ty = max(0, x1), max(0, y1 - th - 6) if y1 > th + 6 else y1 + 3
        draw.rectangle([tx, ty, tx + tw + 8, ty + th + 6], fill=colour, outline=(0, 0, 0), width=1)
        draw.text((tx + 4, ty + 2), tag, fill=(0, 0, 0), font=font)
    y = image.height + 8
    previous = 0
    for index, kind, line in lines:
        if index != previous:
            y += 8
            previous = index
        fill = REGION_COLOURS[index % len(REGION_COLOURS)] if kind == "reference" else TEXT
        draw.text((10, y), line, fill=fill, font=font)
        y += line_h
    tmp = out_path.with_name("." + out_path.name + ".tmp.png")
    canvas.save(tmp)
    tmp.replace(out_path)
    return lines


def captioned_example(annotations: Path, image_root: Path, before: Dict[int, str], after: Dict[int, str],
                      out_path: Path) -> List[Tuple[int, str, str]]:
    """Draw the first held-out image that has several test regions, with their references and both captions."""
    samples, _ = load_vg_test(annotations, image_root)
    by_image: Dict[Path, list] = {}
    for s in samples:
        if s.sample_id in after and s.sample_id in before:
            by_image.setdefault(s.image_path, []).append(s)
    if not by_image:
        raise DataError(f"{annotations}: no held-out sample has both a before and an after caption")
    shown = next((group for group in by_image.values() if len(group) >= 2), next(iter(by_image.values())))
    regions = [{"box": s.box, "reference": s.caption, "before": before[s.sample_id] or "(empty)",
                "after": after[s.sample_id] or "(empty)"} for s in shown]
    return draw_captions(shown[0].image_path, regions, out_path)


def _predictions(run_dir: Path) -> Dict[int, str]:
    return {p["image_id"]: p["caption"] for p in _read_output(run_dir, "predictions.json")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quickstart.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="eval.vg output dir of the untrained model")
    p.add_argument("--after", type=Path, required=True, help="eval.vg output dir of the trained model")
    p.add_argument("--train-dir", type=Path, required=True, help="training output dir (train_log.jsonl, loss.png)")
    p.add_argument("--annotations", type=Path, required=True)
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--segcap", type=Path, help="eval.segcap_predict output dir of the trained model (ground-truth segments)")
    args = p.parse_args(argv)
    before, after = _read_summary(args.before), _read_summary(args.after)
    log_path = args.train_dir / "train_log.jsonl"
    train_log = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.is_file() else []
    segcap = _read_output(args.segcap, "metrics.json", "eval.segcap_predict") if args.segcap is not None else None
    report = build_report(before, after, train_log, segcap)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "report.json", report)
    write_text_atomic(args.out / "report.md", report_markdown(report))
    if train_log:
        plot_loss(args.train_dir, str(args.out / "loss.png"))
    captioned_example(args.annotations, args.image_root, _predictions(args.before), _predictions(args.after),
                      args.out / "example_captions.png")
    print(report_markdown(report), end="")
    return 0


if __name__ == "__main__":
    import sys

    from gpt4roi_sft.errors import run_cli

    sys.exit(run_cli(main))
