"""Pix2Cap-COCO's panoptic segmentation-captioning benchmark: PQ, scaled caption metrics and DenseCap-style mAP.

``python -m eval.segcap --gt-json pix2cap_coco_val.json --gt-dir panoptic_val2017 --pred-json PRED.json
--pred-dir PRED_PNG_DIR --out DIR`` scores a prediction in Pix2Cap's format (COCO-panoptic JSON whose
``segments_info`` entries carry a ``caption``, plus one PNG per image, ``id = R + 256*G + 256^2*B``) and writes
``DIR/metrics.json`` (fractions) and ``DIR/metrics.txt`` (x100).

The rules are those of Pix2Cap's evaluator (``datasets/evaluation/caption_distribute_metrics.py`` and
``caption_distribute_map.py``), whose matching is panopticapi's ``pq_compute``:

- **Matching.** A predicted and a ground-truth segment match when they have the same category, the ground
  truth is not crowd, and IoU > 0.5, where the union is ``pred_area + gt_area - intersection`` minus only the
  prediction's overlap with ground-truth VOID (id 0). Predicted areas are counted in the PNG; ground-truth
  areas are the JSON's ``area``. Ground-truth ids in the PNG that the JSON does not list are ignored.
- **Counting.** Every unmatched non-crowd ground-truth segment is a false negative, even where the prediction
  is VOID. An unmatched prediction is a false positive unless more than half of it lies on ground-truth VOID
  plus the crowd region of its category (the last crowd segment of that category in the JSON, as panopticapi).
- **PQ/SQ/RQ** are averaged over the categories with TP + FP + FN > 0 (all / things / stuff).
- **Caption metrics** (BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE; PTB-tokenised; pycocoevalcap's scorers) are
  computed once over all matched pairs (the ground-truth ``description`` is the single reference), then each is
  multiplied by ``n_matched / (TP + FP + FN)``, so missed and spurious segments count as zero-score captions.
  Pix2Cap leaves METEOR out (it prints 0); here it is pycocoevalcap's METEOR 1.5, scaled the same way.
- **mAP** (DenseCap style): one record per predicted segment, paired with its best-IoU ground-truth segment of
  the same category (non-crowd, overlapping it), in the order Pix2Cap visits pairs (images in ground-truth
  order, then ascending ground-truth and predicted ids). A record is a true positive at (IoU threshold t,
  METEOR threshold m) when its caption is not empty, IoU >= t and METEOR > m; precision and recall are
  cumulative over records, recall against the number of ground-truth segments in the JSON (crowd included, as
  Pix2Cap), AP is the 101-point interpolated precision, and mAP the mean over t in {0.3, ..., 0.7} and
  m in {0, 0.05, ..., 0.25}. METEOR is NLTK's ``meteor_score`` (prediction as hypothesis, the ground-truth
  caption as reference, whitespace tokens) when NLTK and its WordNet data load, else pycocoevalcap's METEOR
  1.5 on PTB-tokenised text; ``metrics.json`` says which. Two defects of Pix2Cap's code are not copied: it
  passes the predicted caption *string* where NLTK expects a list of token lists (so it scores against single
  characters, with the ground truth as the hypothesis), and its best-IoU bookkeeping is never updated (so it
  keeps every overlapping pair).
- **Table.** Pix2Cap's printed table (``_print_panoptic_results``) puts the SPICE value under ROUGE and the
  ROUGE value under SPICE; ``metrics.txt`` prints each under its own name.

Bad input (a PNG id absent from the prediction JSON, a JSON segment absent from its PNG, a category not in the
ground truth, a duplicate or VOID segment id, a missing PNG or caption, an image without a prediction) stops
with one line naming the image and segment. Images are read one at a time (``--workers`` processes).
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from gpt4roi_sft.atomic import write_json_atomic, write_text_atomic
from gpt4roi_sft.errors import ConfigError, DataError, run_cli
from gpt4roi_sft.json_io import load_json

logger = logging.getLogger(__name__)

VOID = 0
ID_LIMIT = 256 ** 3  # ids are 24-bit (three PNG channels)
IOU_MATCH = 0.5
MAP_IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MAP_METEOR_THRESHOLDS = (0, 0.05, 0.1, 0.15, 0.2, 0.25)
CAPTION_KEYS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
# eval.caption_metrics names -> the names of this benchmark's table
_FROM_COCO = {"Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}
COLUMN_SWAP_NOTE = ("Pix2Cap's printed table (_print_panoptic_results) shows SPICE under the ROUGE header and "
                    "ROUGE under SPICE; here every column holds its own metric")


# ---------------------------------------------------------------- reading and checking the inputs


def read_panoptic_png(path: Path, where: str) -> np.ndarray:
    """(H, W) int64 segment ids of a COCO-panoptic PNG (panopticapi ``rgb2id``); a missing file is a DataError."""
    from data_converters.synthetic import decode_panoptic

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{where}: PNG {path} not found") from None
    except OSError as exc:
        raise DataError(f"{where}: cannot read PNG {path}: {exc}") from None
    return decode_panoptic(rgb)


@dataclass
class Panoptic:
    """A COCO-panoptic JSON: annotations in file order, categories by id."""

    path: Path
    annotations: List[dict]
    categories: Dict[int, dict]
    images: Dict[int, dict] = field(default_factory=dict)


def load_panoptic(path: Path, needs_categories: bool = True) -> Panoptic:
    """Read a COCO-panoptic JSON (``annotations`` with ``image_id``, ``file_name``, ``segments_info``)."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: expected a COCO-panoptic object with an 'annotations' list")
    categories: Dict[int, dict] = {}
    for cat in data.get("categories") or []:
        if not isinstance(cat, dict) or "id" not in cat:
            raise DataError(f"{path}: a category has no 'id': {str(cat)[:80]}")
        categories[cat["id"]] = cat
    if needs_categories and not categories:
        raise DataError(f"{path}: no 'categories' (with 'id' and 'isthing') to evaluate against")
    for k, ann in enumerate(data["annotations"]):
        if (not isinstance(ann, dict) or "image_id" not in ann or "file_name" not in ann
                or not isinstance(ann.get("segments_info"), list)):
            raise DataError(f"{path}: annotations[{k}] needs 'image_id', 'file_name' and a 'segments_info' list")
    images = {img["id"]: img for img in data.get("images") or [] if isinstance(img, dict) and "id" in img}
    return Panoptic(path, data["annotations"], categories, images)


def _segments_by_id(ann: dict, where: str, caption_key: str, categories: Dict[int, dict],
                    require_area: bool) -> Dict[int, dict]:
    """``{id: segment}`` of one annotation, checking ids, categories and captions."""
    segments: Dict[int, dict] = {}
    for k, seg in enumerate(ann["segments_info"]):
        if not isinstance(seg, dict) or "id" not in seg or "category_id" not in seg:
            raise DataError(f"{where}: segments_info[{k}] needs 'id' and 'category_id'")
        sid = seg["id"]
        if not isinstance(sid, int) or isinstance(sid, bool) or sid < 0:
            raise DataError(f"{where} segment {sid!r}: id must be a non-negative integer")
        if sid == VOID:
            raise DataError(f"{where} segment 0: id 0 is VOID in the PNG and cannot name a segment")
        if sid in segments:
            raise DataError(f"{where} segment {sid}: the id appears twice in segments_info")
        if seg["category_id"] not in categories:
            raise DataError(f"{where} segment {sid}: category_id {seg['category_id']} is not a ground-truth category")
        caption = seg.get(caption_key)
        if not isinstance(caption, str):
            raise DataError(f"{where} segment {sid}: '{caption_key}' must be a string, got {caption!r}")
        if require_area and not isinstance(seg.get("area"), (int, float)):
            raise DataError(f"{where} segment {sid}: ground truth needs a numeric 'area'")
        segments[sid] = seg
    return segments


# ---------------------------------------------------------------- one image


@dataclass
class ImageResult:
    """What one image contributes.

    stats: ``{category_id: [iou_sum, tp, fp, fn]}``; matched: ``(key, gt caption, predicted caption)`` of each
    matched pair; records: ``(iou, predicted caption, gt caption)`` of the mAP pairs in Pix2Cap's order.
    """

    image_id: object
    stats: Dict[int, list]
    matched: List[Tuple[str, str, str]]
    records: List[Tuple[float, str, str]]
    num_gt: int


def pair_intersections(gt_ids: np.ndarray, pred_ids: np.ndarray) -> List[Tuple[int, int, int]]:
    """``(gt id, predicted id, pixels)`` for every overlapping pair, ascending by (gt id, predicted id).

    Panoptic maps are mostly long runs of one id pair along each row, so the pairs are counted over runs
    (a sort of ~10^4 runs instead of ~10^5-10^6 pixels); the result equals ``np.unique(gt * 2^24 + pred)``.
    """
    key = gt_ids.ravel().astype(np.uint64) * np.uint64(ID_LIMIT) + pred_ids.ravel().astype(np.uint64)
    if key.size == 0:
        return []
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    lengths = np.diff(np.append(starts, key.size))
    values, inverse = np.unique(key[starts], return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=lengths, minlength=len(values))
    return [(int(v) // ID_LIMIT, int(v) % ID_LIMIT, int(c)) for v, c in zip(values, counts)]


def evaluate_image(gt_ann: dict, pred_ann: dict, gt_ids: np.ndarray, pred_ids: np.ndarray,
                   categories: Dict[int, dict], where: str = "") -> ImageResult:
    """Match one image's segments with panopticapi's rules; ``gt_ids``/``pred_ids`` are (H, W) segment ids."""
    image_id = gt_ann["image_id"]
    where = where or f"image {image_id}"
    gt_segms = _segments_by_id(gt_ann, f"ground truth {where}", "description", categories, require_area=True)
    pred_segms = _segments_by_id(pred_ann, f"prediction {where}", "caption", categories, require_area=False)
    if gt_ids.shape != pred_ids.shape:
        raise DataError(f"prediction {where}: PNG is {pred_ids.shape[1]}x{pred_ids.shape[0]}, "
                        f"ground truth is {gt_ids.shape[1]}x{gt_ids.shape[0]}")

    pairs = pair_intersections(gt_ids, pred_ids)  # ascending (gt id, predicted id, pixels)
    pred_area: Dict[int, int] = {}
    for _, p, n in pairs:
        pred_area[p] = pred_area.get(p, 0) + n
    for p in pred_area:
        if p != VOID and p not in pred_segms:
            raise DataError(f"prediction {where} segment {p}: id is in the PNG but not in segments_info")
    absent = [s for s in pred_segms if s not in pred_area]
    if absent:
        raise DataError(f"prediction {where} segment {absent[0]}: listed in segments_info but absent from the PNG"
                        + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))

    intersection = {(g, p): n for g, p, n in pairs}

    stats: Dict[int, list] = {}

    def stat(cat: int) -> list:
        return stats.setdefault(cat, [0.0, 0, 0, 0])

    gt_matched, pred_matched = set(), set()
    matched: List[Tuple[str, str, str]] = []
    best: Dict[int, Tuple[float, int]] = {}  # predicted id -> (best IoU, gt id), for mAP
    for g, p, inter in pairs:
        if g not in gt_segms or p not in pred_segms:
            continue
        gseg, pseg = gt_segms[g], pred_segms[p]
        if gseg.get("iscrowd", 0) == 1 or gseg["category_id"] != pseg["category_id"]:
            continue
        union = pred_area[p] + gseg["area"] - inter - intersection.get((VOID, p), 0)
        if union <= 0:
            raise DataError(f"ground truth {where} segment {g}: 'area' {gseg['area']} is smaller than its {inter} "
                            f"pixels in the PNG")
        iou = inter / union
        if p not in best or iou > best[p][0]:
            best[p] = (iou, g)
        if iou > IOU_MATCH:
            s = stat(gseg["category_id"])
            s[0] += iou
            s[1] += 1
            gt_matched.add(g)
            pred_matched.add(p)
            matched.append((f"{image_id}_{g}", gseg["description"], pseg["caption"]))

    crowd_by_category: Dict[int, int] = {}
    for g, gseg in gt_segms.items():
        if g in gt_matched:
            continue
        if gseg.get("iscrowd", 0) == 1:
            crowd_by_category[gseg["category_id"]] = g
            continue
        stat(gseg["category_id"])[3] += 1

    for p, pseg in pred_segms.items():
        if p in pred_matched:
            continue
        ignored = intersection.get((VOID, p), 0)
        crowd = crowd_by_category.get(pseg["category_id"])
        if crowd is not None:
            ignored += intersection.get((crowd, p), 0)
        if ignored / pred_area[p] > 0.5:
            continue
        stat(pseg["category_id"])[2] += 1

    records = [(iou, pred_segms[p]["caption"], gt_segms[g]["description"])
               for p, (iou, g) in sorted(best.items(), key=lambda kv: (kv[1][1], kv[0]))]
    return ImageResult(image_id, stats, matched, records, len(gt_segms))


def _evaluate_pair(task) -> ImageResult:
    gt_ann, pred_ann, gt_dir, pred_dir, categories = task
    where = f"image {gt_ann['image_id']}"
    gt_ids = read_panoptic_png(Path(gt_dir) / gt_ann["file_name"], f"ground truth {where}")
    pred_ids = read_panoptic_png(Path(pred_dir) / pred_ann["file_name"], f"prediction {where}")
    return evaluate_image(gt_ann, pred_ann, gt_ids, pred_ids, categories, where)


def pair_annotations(gt: Panoptic, pred: Panoptic) -> List[Tuple[dict, dict]]:
    """``(gt annotation, predicted annotation)`` for every ground-truth image, in ground-truth order."""
    by_image: Dict[object, dict] = {}
    for ann in pred.annotations:
        if ann["image_id"] in by_image:
            raise DataError(f"{pred.path}: image {ann['image_id']} has two annotations")
        by_image[ann["image_id"]] = ann
    pairs = []
    missing = []
    for ann in gt.annotations:
        if ann["image_id"] not in by_image:
            missing.append(ann["image_id"])
            continue
        pairs.append((ann, by_image[ann["image_id"]]))
    if missing:
        raise DataError(f"{pred.path}: image {missing[0]} has no prediction"
                        + (f" (and {len(missing) - 1} more images)" if len(missing) > 1 else ""))
    extra = len(by_image) - len(pairs)
    if extra:
        logger.warning("%s: %d predicted image(s) are not in the ground truth; they are ignored", pred.path, extra)
    return pairs


def stream_images(pairs: Sequence[Tuple[dict, dict]], gt_dir: Path, pred_dir: Path, categories: Dict[int, dict],
                  workers: int = 1) -> Iterator[ImageResult]:
    """Evaluate image by image (``workers`` processes), yielding results in ground-truth order."""
    from tqdm import tqdm

    tasks = ((g, p, str(gt_dir), str(pred_dir), categories) for g, p in pairs)
    bar = dict(total=len(pairs), desc="segcap images", unit="img", mininterval=2.0)
    if workers <= 1:
        for task in tqdm(tasks, **bar):
            yield _evaluate_pair(task)
        return
    ctx = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    with ctx.Pool(workers) as pool:
        yield from tqdm(pool.imap(_evaluate_pair, tasks, chunksize=8), **bar)


# ---------------------------------------------------------------- aggregate metrics


def pq_average(stats: Dict[int, list], categories: Dict[int, dict], isthing: Optional[bool]) -> Dict[str, Optional[float]]:
    """PQ, SQ, RQ averaged over the categories (of the kind ``isthing``; all when None) with TP + FP + FN > 0."""
    pq = sq = rq = 0.0
    n = 0
    for cat_id, cat in categories.items():
        if isthing is not None and (cat.get("isthing") == 1) != isthing:
            continue
        iou, tp, fp, fn = stats.get(cat_id, (0.0, 0, 0, 0))
        if tp + fp + fn == 0:
            continue
        n += 1
        pq += iou / (tp + 0.5 * fp + 0.5 * fn)
        sq += iou / tp if tp else 0.0
        rq += tp / (tp + 0.5 * fp + 0.5 * fn)
    if n == 0:
        return {"PQ": None, "SQ": None, "RQ": None, "n": 0}
    return {"PQ": pq / n, "SQ": sq / n, "RQ": rq / n, "n": n}


def scaled_caption_metrics(matched: Sequence[Tuple[str, str, str]], total: int,
                           spice_jars: Optional[Path] = None, meteor=None) -> Tuple[Dict[str, Optional[float]], Dict[str, Optional[float]], Optional[str]]:
    """Caption metrics of the matched pairs, unscaled and scaled by ``len(matched) / total``.

    Returns ``(scaled, unscaled, spice_note)``; values are ``None`` when nothing can be scored (no segment at
    all, or SPICE unavailable) and 0 when there are segments but no matched pair. ``meteor``: the
    ``eval.caption_metrics.MeteorJar`` to ask (default: the process's shared one).
    """
    from eval.caption_metrics import score_captions, spice_unavailable_reason

    if total == 0 or not matched:
        spice_note = spice_unavailable_reason(spice_jars)
        zero = None if total == 0 else 0.0
        scaled = {k: (None if k == "SPICE" and spice_note else zero) for k in CAPTION_KEYS}
        return scaled, {k: None for k in CAPTION_KEYS}, spice_note
    refs = {key: [gt] for key, gt, _ in matched}
    preds = {key: pred for key, _, pred in matched}
    raw, spice_note = score_captions(refs, preds, spice_jars, meteor=meteor)
    unscaled = {_FROM_COCO[k]: raw[k] for k in _FROM_COCO}
    factor = len(matched) / total
    scaled = {k: (None if v is None else v * factor) for k, v in unscaled.items()}
    return scaled, unscaled, spice_note


# ---------------------------------------------------------------- mAP


def nltk_wordnet():
    """NLTK's WordNet reader when NLTK and its ``wordnet`` data load, else ``None`` (METEOR then falls back)."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except (ImportError, LookupError, OSError):
        return None


def nltk_meteor_scores(records: Sequence[Tuple[float, str, str]], wordnet, meteor=None) -> List[float]:
    """NLTK ``meteor_score`` of each record: the prediction's whitespace tokens against the ground truth's."""
    from nltk.translate.meteor_score import meteor_score

    return [meteor_score([gt.split()], pred.split(), wordnet=wordnet) for _, pred, gt in records]


def coco_meteor_scores(records: Sequence[Tuple[float, str, str]], meteor=None) -> List[float]:
    """pycocoevalcap METEOR 1.5 of each record on PTB-tokenised text (per-pair scores).

    ``meteor``: the ``MeteorJar`` to ask (default: the process's shared one; pairs it already scored for the
    caption metrics are not scored again).
    """
    from eval.caption_metrics import ptb_tokenize, shared_meteor_jar

    if not records:
        return []
    gts = ptb_tokenize({i: [gt] for i, (_, _, gt) in enumerate(records)})
    res = ptb_tokenize({i: [pred] for i, (_, pred, _) in enumerate(records)})
    return (meteor or shared_meteor_jar()).compute_score(gts, res)[1]


def average_precision(ious: np.ndarray, meteors: np.ndarray, has_caption: np.ndarray, num_gt: int,
                      min_iou: float, min_meteor: float) -> float:
    """Pix2Cap's AP: cumulative TP/FP over the records in order, 101-point max-interpolated precision."""
    tp = (has_caption & (ious >= min_iou) & (meteors > min_meteor)).astype(np.float64)
    fp = 1.0 - tp
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / num_gt
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).tiny)
    total = 0.0
    points = np.arange(0, 1.01, 0.01)
    for t in points:
        above = prec[rec >= t]
        total += float(above.max()) if above.size else 0.0
    return total / len(points)


def densecap_map(records: Sequence[Tuple[float, str, str]], meteors: Sequence[float], num_gt: int) -> dict:
    """mAP over the IoU x METEOR thresholds, its breakdown, and ``mAP_det`` (METEOR ignored, Pix2Cap's detmap)."""
    if num_gt == 0:
        return {"mAP": None, "mAP_det": None, "breakdown": {}}
    ious = np.array([r[0] for r in records], dtype=np.float64)
    has_caption = np.array([bool(r[1]) for r in records], dtype=bool)
    scores = np.asarray(meteors, dtype=np.float64)
    breakdown, det = {}, []
    for t in MAP_IOU_THRESHOLDS:
        for m in MAP_METEOR_THRESHOLDS:
            breakdown[f"iou{t}_meteor{m}"] = average_precision(ious, scores, has_caption, num_gt, t, m)
        det.append(average_precision(ious, scores, has_caption, num_gt, t, -1.0))
    return {"mAP": float(np.mean(list(breakdown.values()))), "mAP_det": float(np.mean(det)), "breakdown": breakdown}


# ---------------------------------------------------------------- the whole evaluation


@dataclass
class SegCapConfig:
    """The evaluator's inputs (the CLI's flags, typed)."""

    gt_json: Path
    gt_dir: Path
    pred_json: Path
    pred_dir: Path
    out: Path
    workers: int = 1
    spice_jars: Optional[Path] = None
    map_meteor: str = "auto"  # auto | nltk | pycocoevalcap


def resolve_map_meteor(choice: str, wordnet=None) -> Tuple[str, Optional[Callable], str]:
    """``(name, scorer(records, meteor=None) -> scores, note)`` for mAP's METEOR; ``wordnet`` overrides NLTK's data."""
    if choice not in ("auto", "nltk", "pycocoevalcap"):
        raise ConfigError(f"--map-meteor {choice!r}: expected auto, nltk or pycocoevalcap")
    if choice in ("auto", "nltk"):
        wn = wordnet if wordnet is not None else nltk_wordnet()
        if wn is not None:
            return "nltk", (lambda recs, meteor=None: nltk_meteor_scores(recs, wn)), "NLTK meteor_score (as Pix2Cap)"
        if choice == "nltk":
            raise ConfigError("--map-meteor nltk: NLTK or its WordNet data is not available "
                              "(pip install nltk, then nltk.download('wordnet') or --nltk-data DIR)")
    note = ("pycocoevalcap METEOR 1.5 per pair (Pix2Cap uses NLTK's meteor_score, whose WordNet data was not "
            "found; install nltk and its 'wordnet' data to match it)")
    return "pycocoevalcap-1.5", coco_meteor_scores, note


def evaluate(config: SegCapConfig, wordnet=None, provenance: Optional[dict] = None) -> dict:
    """Score a prediction against the ground truth; write ``metrics.json`` and ``metrics.txt``; return the metrics.

    ``provenance`` (what made the prediction: :func:`eval.harness.provenance` of its captions' store, with the
    segmentation's under ``"segmentation"`` for the two-stage track) goes into ``metrics.json`` and names the
    model and segmenter in ``metrics.txt``.
    """
    gt = load_panoptic(config.gt_json)
    pred = load_panoptic(config.pred_json, needs_categories=False)
    for folder, what in ((config.gt_dir, "--gt-dir"), (config.pred_dir, "--pred-dir")):
        if not Path(folder).is_dir():
            raise DataError(f"{what} {folder}: not a folder")
    meteor_name, meteor_fn, meteor_note = resolve_map_meteor(config.map_meteor, wordnet)
    pairs = pair_annotations(gt, pred)
    if not pairs:
        raise DataError(f"{config.gt_json}: no annotations to evaluate")

    stats: Dict[int, list] = {}
    matched: List[Tuple[str, str, str]] = []
    records: List[Tuple[float, str, str]] = []
    num_gt = 0
    clock = time.perf_counter()
    for result in stream_images(pairs, config.gt_dir, config.pred_dir, gt.categories, config.workers):
        for cat, (iou, tp, fp, fn) in result.stats.items():
            s = stats.setdefault(cat, [0.0, 0, 0, 0])
            s[0] += iou
            s[1] += tp
            s[2] += fp
            s[3] += fn
        matched.extend(result.matched)
        records.extend(result.records)
        num_gt += result.num_gt

    tp, fp, fn = (sum(s[i] for s in stats.values()) for i in (1, 2, 3))
    total = tp + fp + fn
    pq = {name: pq_average(stats, gt.categories, isthing)
          for name, isthing in (("all", None), ("things", True), ("stuff", False))}
    clock = _stage("images", clock)
    # Both ask the process's shared METEOR 1.5 (eval.caption_metrics.shared_meteor_jar): one start-up.
    scaled, unscaled, spice_note = scaled_caption_metrics(matched, total, config.spice_jars)
    clock = _stage("captions", clock)
    logger.info("mAP: METEOR of %d best-IoU pairs with %s", len(records), meteor_name)
    ap = densecap_map(records, meteor_fn(records), num_gt)
    _stage("mAP", clock)

    metrics = {
        "PQ": pq["all"]["PQ"], "SQ": pq["all"]["SQ"], "RQ": pq["all"]["RQ"],
        "PQ_th": pq["things"]["PQ"], "SQ_th": pq["things"]["SQ"], "RQ_th": pq["things"]["RQ"],
        "PQ_st": pq["stuff"]["PQ"], "SQ_st": pq["stuff"]["SQ"], "RQ_st": pq["stuff"]["RQ"],
        **scaled,
        "mAP": ap["mAP"],
        "TP": tp, "FP": fp, "FN": fn, "n_matched": len(matched), "images": len(pairs),
        "gt_segments": num_gt, "map_records": len(records),
        "categories": {"all": pq["all"]["n"], "things": pq["things"]["n"], "stuff": pq["stuff"]["n"]},
        "caption_scale": (len(matched) / total) if total else None,
        "unscaled": unscaled,
        "mAP_det": ap["mAP_det"],
        "mAP_breakdown": ap["breakdown"],
        "per_category": {str(c): {"iou_sum": s[0], "TP": s[1], "FP": s[2], "FN": s[3]} for c, s in sorted(stats.items())},
        "notes": {
            "scaling": "BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE are computed on matched pairs and multiplied by "
                       "n_matched / (TP + FP + FN), as Pix2Cap; 'unscaled' has the matched-pair values",
            "meteor": "pycocoevalcap METEOR 1.5 on matched pairs (Pix2Cap comments METEOR out and reports 0)",
            "mAP_meteor": meteor_note,
            "spice": spice_note,
            "table": COLUMN_SWAP_NOTE,
        },
        "provenance": provenance,
    }
    out = Path(config.out)
    write_json_atomic(out / "metrics.json", _json_safe(metrics))
    write_text_atomic(out / "metrics.txt", format_table(metrics))
    return metrics


def _stage(name: str, since: float) -> float:
    now = time.perf_counter()
    logger.info("stage %s: %.1f s", name, now - since)
    return now


def _json_safe(obj):
    """NaN/inf (a SPICE failure can give NaN) become null so metrics.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _pct(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{100 * value:.1f}"


def producers(provenance: Optional[dict]) -> List[str]:
    """``model: PATH (weights ...)`` and ``segmenter: PATH (weights ...)`` lines for the report, when known."""
    if not provenance:
        return []
    from eval.harness import model_line

    lines = [model_line(provenance)]
    segmenter = (((provenance.get("segmentation") or {}).get("produced_by")) or {}).get("segmenter")
    if segmenter:
        lines.append(f"segmenter: {segmenter['path']} (weights {segmenter['fingerprint']})")
    return [line for line in lines if line]


def format_table(m: dict) -> str:
    """The x100 report: PQ/SQ/RQ for all, things, stuff; scaled caption metrics and mAP for all."""
    head = f"{'':8s}| {'PQ':>6} {'SQ':>6} {'RQ':>6} | " + " ".join(f"{k:>7}" for k in CAPTION_KEYS) + f" | {'mAP':>6}"
    rows = [f"Panoptic segmentation-captioning (Pix2Cap-COCO protocol): {m['images']} images, scores x100",
            *producers(m.get("provenance")), "", head, "-" * len(head)]
    for label, sfx in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        caps = " ".join(f"{_pct(m[k]) if sfx == '' else '':>7}" for k in CAPTION_KEYS)
        mAP = _pct(m["mAP"]) if sfx == "" else ""
        rows.append(f"{label:8s}| {_pct(m['PQ' + sfx]):>6} {_pct(m['SQ' + sfx]):>6} {_pct(m['RQ' + sfx]):>6} | "
                    f"{caps} | {mAP:>6}")
    cats = m["categories"]
    rows += ["", f"TP {m['TP']}  FP {m['FP']}  FN {m['FN']}  matched pairs scored {m['n_matched']}; "
                 f"categories all/things/stuff {cats['all']}/{cats['things']}/{cats['stuff']}",
             "caption metrics: matched pairs only, x n_matched / (TP + FP + FN)"
             + (f" = {m['caption_scale']:.4f}" if m["caption_scale"] is not None else ""),
             "unscaled (matched pairs): " + "  ".join(f"{k} {_pct(m['unscaled'][k])}" for k in CAPTION_KEYS),
             f"mAP_det (METEOR ignored) {_pct(m['mAP_det'])}",
             f"METEOR: {m['notes']['meteor']}",
             f"mAP METEOR: {m['notes']['mAP_meteor']}"]
    if m["notes"]["spice"]:
        rows.append(f"SPICE: not computed ({m['notes']['spice']})")
    rows.append(f"note: {COLUMN_SWAP_NOTE}")
    return "\n".join(rows) + "\n"


def add_nltk_data(folder: Path) -> None:
    """Let NLTK find its data (``corpora/wordnet``) in ``folder`` too (entry points call this for ``--nltk-data``)."""
    try:
        import nltk
    except ImportError:
        raise ConfigError("--nltk-data needs nltk installed (pip install nltk)") from None
    nltk.data.path.insert(0, str(folder))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.segcap", description=__doc__.split("\n\n")[0])
    p.add_argument("--gt-json", type=Path, required=True, help="ground truth, e.g. pix2cap_coco_val.json")
    p.add_argument("--gt-dir", type=Path, required=True, help="ground-truth PNG folder, e.g. panoptic_val2017")
    p.add_argument("--pred-json", type=Path, required=True, help="COCO-panoptic JSON with 'caption' per segment")
    p.add_argument("--pred-dir", type=Path, required=True, help="predicted PNG folder")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json and metrics.txt")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes reading images")
    p.add_argument("--spice-jars", type=Path, help="folder with stanford-corenlp-3.6.0.jar and -models.jar")
    p.add_argument("--map-meteor", default="auto", choices=("auto", "nltk", "pycocoevalcap"),
                   help="METEOR used by mAP: NLTK's (Pix2Cap's) when its WordNet data loads, else pycocoevalcap 1.5")
    p.add_argument("--nltk-data", type=Path, help="extra NLTK data folder holding corpora/wordnet")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.nltk_data is not None:
        add_nltk_data(args.nltk_data)
    config = SegCapConfig(gt_json=args.gt_json, gt_dir=args.gt_dir, pred_json=args.pred_json, pred_dir=args.pred_dir,
                          out=args.out, workers=args.workers, spice_jars=args.spice_jars, map_meteor=args.map_meteor)
    evaluate(config)
    print((Path(args.out) / "metrics.txt").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
