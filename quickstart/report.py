"""The quickstart's before/after report: ``report.json``, ``report.md`` and a captioned held-out image.

``python -m quickstart.report --before DIR --after DIR --train-dir DIR --annotations FILE
--image-root DIR --out DIR`` reads two finished ``eval.vg`` runs (the untrained and the trained model on the
same held-out test file) and the training run, and writes the comparison a new user reads first.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Dict, List

from eval.vg import load_vg_test
from gpt4roi_sft.atomic import write_json_atomic, write_text_atomic
from gpt4roi_sft.errors import DataError

METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def _read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; run eval.vg into {run_dir} first")
    return json.loads(path.read_text(encoding="utf-8"))


def build_report(before: dict, after: dict, train_log: List[dict]) -> dict:
    """The report.json payload: metrics of both runs, attribute accuracy with chance, the training summary."""
    b_attr, a_attr = before.get("attribute_accuracy") or {}, after.get("attribute_accuracy") or {}
    report = {
        "before": before["metrics"],
        "after": after["metrics"],
        "attribute_accuracy": {"before": b_attr.get("accuracy"), "after": a_attr.get("accuracy"), "chance": a_attr.get("chance")},
        "num_samples": after.get("num_samples"),
    }
    if train_log:
        report["training"] = {
            "steps": train_log[-1]["step"],
            "first_loss": train_log[0]["loss"],
            "last_loss": train_log[-1]["loss"],
            "seconds": round(sum(r.get("step_time_s", 0.0) for r in train_log), 1),
        }
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
    if report.get("training"):
        t = report["training"]
        lines += ["", f"Training: {t['steps']} steps, loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}, "
                      f"{t['seconds']:.0f} s of steps (see loss.png)."]
    cider = report["after"].get("CIDEr"), report["before"].get("CIDEr")
    if None not in cider:
        lines += ["", f"CIDEr gain: {100 * (cider[0] - cider[1]):+.1f} points."]
    return "\n".join(lines) + "\n"


def draw_captions(image_path: Path, boxes: List[List[float]], captions: List[str], out_path: Path) -> None:
    """The held-out image with each box numbered and its generated caption written underneath."""
    import textwrap

    from PIL import Image, ImageDraw

    image = Image.open(image_path).convert("RGB")
    scale = max(1, 480 // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    colours = [(255, 255, 255), (255, 64, 64), (64, 160, 255), (255, 200, 0), (0, 220, 120), (200, 0, 255)]
    wrapped = [textwrap.wrap(f"region{i + 1}: {c}", width=max(30, image.width // 7)) for i, c in enumerate(captions)]
    line_h = 14
    text_h = sum(len(w) for w in wrapped) * line_h + 10
    canvas = Image.new("RGB", (image.width, image.height + text_h), (24, 24, 24))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = image.height + 5
    for i, (box, lines) in enumerate(zip(boxes, wrapped)):
        colour = colours[i % len(colours)]
        x1, y1, x2, y2 = (v * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        draw.text((x1 + 3, y1 + 2), str(i + 1), fill=colour)
        for line in lines:
            draw.text((5, y), line, fill=colour)
            y += line_h
    tmp = out_path.with_name("." + out_path.name + ".tmp.png")
    canvas.save(tmp)
    tmp.replace(out_path)


def captioned_example(annotations: Path, image_root: Path, predictions: Dict[int, str], out_path: Path) -> None:
    """Draw the first held-out image with all of its test regions and their predicted captions."""
    samples, _ = load_vg_test(annotations, image_root)
    first = samples[0].image_path
    shown = [s for s in samples if s.image_path == first and s.sample_id in predictions]
    draw_captions(first, [s.box for s in shown], [predictions[s.sample_id] for s in shown], out_path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quickstart.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="eval.vg output dir of the untrained model")
    p.add_argument("--after", type=Path, required=True, help="eval.vg output dir of the trained model")
    p.add_argument("--train-dir", type=Path, required=True, help="training output dir (train_log.jsonl, loss.png)")
    p.add_argument("--annotations", type=Path, required=True)
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    before, after = _read_summary(args.before), _read_summary(args.after)
    log_path = args.train_dir / "train_log.jsonl"
    train_log = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.is_file() else []
    report = build_report(before, after, train_log)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "report.json", report)
    write_text_atomic(args.out / "report.md", report_markdown(report))
    if (args.train_dir / "loss.png").is_file():
        shutil.copyfile(args.train_dir / "loss.png", args.out / "loss.png")
    preds = {p["image_id"]: p["caption"] for p in json.loads((args.after / "predictions.json").read_text())}
    captioned_example(args.annotations, args.image_root, preds, args.out / "example_captions.png")
    print(report_markdown(report), end="")
    return 0


if __name__ == "__main__":
    import sys

    from gpt4roi_sft.errors import run_cli

    sys.exit(run_cli(main))
