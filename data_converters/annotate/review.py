"""Checking a sample of the descriptions by hand, and folding the decisions back into the Pix2Cap JSON.

Pix2Cap-COCO had a human-checked subset; this is the tool for one:

1. ``review --in F --sample N --out DIR`` picks N described, not yet reviewed segments at random (``--seed``)
   and writes ``DIR/index.html``, one self-contained page (images inline, no network): each row shows the
   image with the segment highlighted (the rest dimmed, the segment outlined) beside its description and
   accept/reject buttons. The page's "Save decisions" button downloads ``decisions.txt``; the same file is
   also written to ``DIR/decisions.txt`` with every decision ``?`` for editing by hand.
2. ``review --in F --decisions decisions.txt --out F2`` folds the decisions in. ``decisions.txt`` has one
   line per segment, ``<image_id> <segment_id> accept|reject|?`` (``#`` comments; ``?`` = undecided).

How a rejection is folded in: the description is *removed* (``description`` becomes ``""``, so
``data_converters.pix2cap`` drops the segment and counts it as ``empty_description``) and *flagged*
(``review: "rejected"``), and its text is kept in ``rejected_description``, so nothing is lost and a later
``accept`` restores it. Accepted segments get ``review: "accepted"``. ``info.pix2cap_review`` holds the
counts over the whole file; the acceptance rate of a random sample estimates the quality of the rest.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import random
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from data_converters.annotate.marks import inner_band
from data_converters.common import require_keys
from data_converters.synthetic import decode_panoptic
from gpt4roi_sft.atomic import write_json_atomic, write_text_atomic
from gpt4roi_sft.errors import DataError, UserError
from gpt4roi_sft.json_io import load_json

DECISIONS = ("accept", "reject", "?")
HIGHLIGHT = (255, 40, 200)
PANEL_SIDE = 512


def iter_segments(data: dict, source: str) -> Iterator[tuple[dict, dict, dict]]:
    """``(image, annotation, segment)`` for every segment of a Pix2Cap-format dict, in file order."""
    require_keys(data, ("images", "annotations"), source)
    images = {img.get("id"): img for img in data["images"] if isinstance(img, dict)}
    for k, ann in enumerate(data["annotations"]):
        require_keys(ann, ("image_id", "segments_info"), f"{source}: annotations[{k}]")
        img = images.get(ann["image_id"])
        if img is None:
            raise DataError(f"{source}: annotations[{k}]: image {ann['image_id']} is not listed in images")
        for seg in ann["segments_info"]:
            require_keys(seg, ("id",), f"{source}: image {ann['image_id']} segment")
            yield img, ann, seg


def sample_segments(data: dict, n: int, seed: int, source: str) -> list[tuple[dict, dict, dict]]:
    """``n`` random segments that have a description and no review yet, in file order."""
    pool = [t for t in iter_segments(data, source)
            if isinstance(t[2].get("description"), str) and t[2]["description"].strip() and "review" not in t[2]]
    picked = sorted(random.Random(seed).sample(range(len(pool)), min(n, len(pool))))
    return [pool[i] for i in picked]


def highlight(image: Image.Image, mask: np.ndarray, max_side: int = PANEL_SIDE) -> Image.Image:
    """The image with everything outside ``mask`` dimmed and the segment outlined; longer side <= ``max_side``."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    pixels[~mask] = pixels[~mask] * 0.35 + 40
    band = inner_band(mask, max(2, round(min(mask.shape) / 120)))
    pixels[band] = HIGHLIGHT
    out = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    scale = min(1.0, max_side / max(out.size))
    if scale < 1.0:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.Resampling.LANCZOS)
    return out


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Review: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td {{ border-top: 1px solid #ccc; padding: 0.6em; vertical-align: top; }}
td.text {{ max-width: 36em; }}
.desc {{ font-size: 1.15em; margin: 0.4em 0 0.8em; }}
.meta {{ color: #666; font-size: 0.85em; }}
label {{ margin-right: 1.2em; }}
textarea {{ width: 40em; height: 8em; }}
</style></head><body>
<h1>Review of {count} descriptions from {title}</h1>
<p>For each row: is the description right for the <b>highlighted</b> segment (the rest of the image is dimmed)?
Accept it if it names the right thing and says nothing false about its appearance, action or position;
reject it otherwise. Then press <b>Save decisions</b> and fold the file in with<br>
<code>python -m data_converters.annotate review --in {source} --decisions decisions.txt --out reviewed.json</code></p>
<table>
{rows}
</table>
<p><button onclick="save()">Save decisions</button> (also shown below, to copy)</p>
<textarea id="out" readonly></textarea>
<script>
function decisions() {{
  const lines = ["# image_id segment_id accept|reject|?"];
  document.querySelectorAll("tr[data-key]").forEach(function (row) {{
    const picked = row.querySelector("input:checked");
    lines.push(row.dataset.key + " " + (picked ? picked.value : "?"));
  }});
  return lines.join("\\n") + "\\n";
}}
function save() {{
  const text = decisions();
  document.getElementById("out").value = text;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], {{type: "text/plain"}}));
  link.download = "decisions.txt";
  link.click();
}}
</script>
</body></html>
"""

ROW = """<tr data-key="{key}">
<td><img src="{src}" alt="image {image_id} segment {segment_id}"></td>
<td class="text"><div class="meta">image {image_id} ({file_name}), segment {segment_id}, {category}, {words} words</div>
<div class="desc">{description}</div>
<label><input type="radio" name="{name}" value="accept"> accept</label>
<label><input type="radio" name="{name}" value="reject"> reject</label></td>
</tr>"""


def write_review_sheet(data: dict, source: Path, n: int, seed: int, images_dir: Path, panoptic_dir: Path,
                       out_dir: Path) -> int:
    """Write ``out_dir/index.html`` and ``out_dir/decisions.txt`` for ``n`` sampled segments; return how many."""
    categories = {c.get("id"): c.get("name", "?") for c in data.get("categories", []) if isinstance(c, dict)}
    picked = sample_segments(data, n, seed, str(source))
    rows, keys = [], []
    loaded: dict = {}
    for img, ann, seg in picked:
        if img["id"] not in loaded:
            png_name = ann.get("file_name") or str(Path(img["file_name"]).with_suffix(".png"))
            image_path, png_path = images_dir / img["file_name"], panoptic_dir / png_name
            for path in (image_path, png_path):
                if not path.is_file():
                    raise DataError(f"{path}: no such file; pass --images and --panoptic-dir")
            with Image.open(image_path) as im, Image.open(png_path) as png:
                loaded = {img["id"]: (im.convert("RGB"), decode_panoptic(np.asarray(png.convert("RGB"))))}
        image, ids = loaded[img["id"]]
        mask = ids == seg["id"]
        if mask.shape != (image.height, image.width) or not mask.any():
            raise DataError(f"image {img['id']} segment {seg['id']}: no pixels of it in its panoptic PNG")
        key = f"{img['id']} {seg['id']}"
        keys.append(key)
        rows.append(ROW.format(key=key, name=f"d{len(keys)}", src=_data_url(highlight(image, mask)),
                               image_id=img["id"], segment_id=seg["id"], file_name=html.escape(str(img["file_name"])),
                               category=html.escape(str(categories.get(seg.get("category_id"), "?"))),
                               words=len(seg["description"].split()), description=html.escape(seg["description"])))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "index.html", PAGE.format(title=html.escape(source.name), source=html.escape(str(source)),
                                                          count=len(rows), rows="\n".join(rows)))
    write_text_atomic(out_dir / "decisions.txt",
                      "# image_id segment_id accept|reject|?\n" + "".join(f"{key} ?\n" for key in keys))
    return len(rows)


def read_decisions(path: Path) -> dict[tuple[int, int], str]:
    """``{(image_id, segment_id): "accept"|"reject"}`` from a decisions file; ``?`` lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    decisions: dict[tuple[int, int], str] = {}
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 3 or parts[2] not in DECISIONS:
            raise DataError(f"{path}:{number}: expected '<image_id> <segment_id> accept|reject|?', got {line.strip()!r}")
        try:
            key = (int(parts[0]), int(parts[1]))
        except ValueError:
            raise DataError(f"{path}:{number}: image and segment ids must be integers, got {line.strip()!r}") from None
        if parts[2] == "?":
            continue
        if decisions.get(key, parts[2]) != parts[2]:
            raise DataError(f"{path}:{number}: image {key[0]} segment {key[1]} is both accepted and rejected")
        decisions[key] = parts[2]
    return decisions


def apply_decisions(data: dict, decisions: dict[tuple[int, int], str], source: str) -> dict:
    """Fold ``decisions`` into ``data`` in place (see the module docstring); return the review counts."""
    found = set()
    for img, _, seg in iter_segments(data, source):
        key = (img["id"], seg["id"])
        decision = decisions.get(key)
        if decision is None:
            continue
        found.add(key)
        if decision == "accept":
            if seg.get("review") == "rejected" and "rejected_description" in seg:
                seg["description"] = seg.pop("rejected_description")
            seg["review"] = "accepted"
        else:
            if seg.get("review") != "rejected":
                seg["rejected_description"] = seg.get("description", "")
            seg["description"] = ""
            seg["review"] = "rejected"
    unknown = sorted(set(decisions) - found)
    if unknown:
        raise DataError(f"{source}: no segment {unknown[0][1]} in image {unknown[0][0]} "
                        f"({len(unknown)} decision(s) name segments not in the file)")
    reviews = [seg.get("review") for _, _, seg in iter_segments(data, source)]
    accepted, rejected = reviews.count("accepted"), reviews.count("rejected")
    counts = {"accepted": accepted, "rejected": rejected,
              "acceptance_rate": round(accepted / (accepted + rejected), 4) if accepted + rejected else None}
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    info["pix2cap_review"] = counts
    data["info"] = info
    return counts


def _annotation_dirs(data: dict, images: Optional[Path], panoptic_dir: Optional[Path]) -> tuple[Path, Path]:
    recorded = (data.get("info") or {}).get("pix2cap_annotation", {}) if isinstance(data.get("info"), dict) else {}
    images = images or (Path(recorded["images_dir"]) if recorded.get("images_dir") else None)
    panoptic_dir = panoptic_dir or (Path(recorded["panoptic_dir"]) if recorded.get("panoptic_dir") else None)
    if images is None or panoptic_dir is None:
        raise UserError("pass --images and --panoptic-dir (the input does not record where its images are)")
    return images, panoptic_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_converters.annotate review",
        description="Review a random sample of descriptions (--sample N --out DIR), or fold decisions back "
                    "into the JSON (--decisions FILE --out F).")
    parser.add_argument("--in", dest="inp", required=True, type=Path, help="Pix2Cap-format JSON")
    parser.add_argument("--out", required=True, type=Path,
                        help="with --sample: folder for index.html and decisions.txt; with --decisions: JSON to write")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sample", type=int, help="number of segments to review")
    mode.add_argument("--decisions", type=Path, help="decisions file to fold into the JSON")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--images", type=Path, help="image folder (default: the one recorded by the annotator)")
    parser.add_argument("--panoptic-dir", type=Path, help="panoptic PNG folder (default: the one recorded by the annotator)")
    args = parser.parse_args(argv)
    data = load_json(args.inp)
    if args.decisions is not None:
        counts = apply_decisions(data, read_decisions(args.decisions), str(args.inp))
        write_json_atomic(args.out, data, indent=None)
        rate = "n/a" if counts["acceptance_rate"] is None else f"{100 * counts['acceptance_rate']:.1f}%"
        print(f"{args.out}: {counts['accepted']} accepted, {counts['rejected']} rejected in total "
              f"(acceptance {rate}); rejected descriptions emptied, text kept in rejected_description")
        return 0
    if args.sample < 1:
        raise UserError(f"--sample must be >= 1, got {args.sample}")
    images, panoptic_dir = _annotation_dirs(data, args.images, args.panoptic_dir)
    n = write_review_sheet(data, args.inp, args.sample, args.seed, images, panoptic_dir, args.out)
    print(f"{args.out / 'index.html'}: {n} segments to review; decisions go to {args.out / 'decisions.txt'}")
    return 0
