"""Predictions for the panoptic segmentation-captioning benchmark from our region captioner, then the evaluator.

Two tracks, both writing Pix2Cap's prediction format (COCO-panoptic JSON with a ``caption`` per segment, and
one PNG per image) and then scoring it with :mod:`eval.segcap`:

- **given segments** (no ``--segmenter``): every segment of a panoptic annotation is captioned; by default the
  ground truth itself (its crowd segments are left VOID, which the matching ignores), or the user's own
  segments (``--segments-json``/``--segments-dir``). With ground-truth segments PQ is 100, so the numbers
  measure caption quality alone.
- **two-stage** (``--segmenter DIR``): a transformers ``Mask2FormerForUniversalSegmentation`` directory (e.g. a
  COCO-panoptic checkpoint) segments each image (``post_process_panoptic_segmentation`` of its image processor,
  stuff labels fused per class), its labels are mapped to the ground truth's categories by name, and each
  segment is captioned.

Each segment is one request, ``region1 <bbox>`` over the segment's bounding box, with its binary mask when the
model is mask-aware (``region_mode`` ``mask`` or ``box+mask``). Requests are batched across images by the
captioner's plan (one image's segments side by side, ``--batch-size auto`` from free device memory).

Model loading, decoding, sharding and resuming come from :mod:`eval.harness`. The work resumes after a kill:
segmentations (``segments.partial.jsonl``, PNG written first) and captions (``captions.partial.jsonl``) are
appended as they finish, and a rerun does only what is missing. Each store is tied to what produces it: the
captions to the model and adapter weights, decoding, template, prompt, the ground-truth JSON, the user's
segments JSON and the segmenter's setup; the segmentations to the segmenter's weights and thresholds. Resuming
with another of any of them is a one-line error naming it; ``--overwrite`` starts afresh. ``--shard-id I
--num-shards K`` split the images between processes (stores under ``OUT/shards/``), ``--merge`` joins them,
writes the prediction and scores it; ``--score-only`` does the same for a single process's stores, without the
model.

``OUT/`` holds ``predictions.json``, ``panoptic_pred/`` (PNGs), ``metrics.json`` and ``metrics.txt`` (both
naming the model, and the segmenter of the two-stage track).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from eval import harness, segcap
from eval.harness import HarnessConfig
from eval.prediction_store import PredictionStore
from gpt4roi_sft.atomic import atomic_open, write_json_atomic
from gpt4roi_sft.constants import GPT4ROI_PREAMBLE, VG_EVAL_QUESTION
from gpt4roi_sft.errors import ConfigError, DataError, run_cli
from gpt4roi_sft.infer import Captioner, DecodeSettings, RegionRequest
from gpt4roi_sft.provenance import describe_model

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = GPT4ROI_PREAMBLE + VG_EVAL_QUESTION  # the VG region-captioning prompt
PRED_PNG_DIR = "panoptic_pred"
SEGMENTS_STORE = "segments.partial.jsonl"
CAPTIONS_STORE = "captions.partial.jsonl"
# Requests waiting for a batch. A mask-aware request holds one (H, W) mask per segment (300 kB at 640x480), so
# a whole split's requests (COCO val: ~25k segments) cannot be built up front; 512 is two of the largest batches.
POOL_REQUESTS = 512


@dataclass
class SegmenterSettings:
    """``post_process_panoptic_segmentation`` thresholds; defaults are Mask2Former's COCO-panoptic inference."""

    threshold: float = 0.8
    mask_threshold: float = 0.5
    overlap_threshold: float = 0.8
    batch_size: int = 2  # images per forward pass; a throughput knob, not part of the segmentation's setup

    def thresholds(self) -> dict:
        return {"threshold": self.threshold, "mask_threshold": self.mask_threshold,
                "overlap_threshold": self.overlap_threshold}


@dataclass(kw_only=True)
class SegCapRunConfig(HarnessConfig):
    """One prediction + evaluation run (the CLI's flags, typed). Shards split the images."""

    data: Path
    split: str = "val"
    segmenter: Optional[Path] = None
    segments_json: Optional[Path] = None
    segments_dir: Optional[Path] = None
    prompt: str = DEFAULT_PROMPT
    decode: DecodeSettings = field(default_factory=lambda: DecodeSettings(max_new_tokens=64))
    segmenter_settings: SegmenterSettings = field(default_factory=SegmenterSettings)
    max_images: Optional[int] = None
    evaluate: bool = True
    workers: int = 1
    spice_jars: Optional[Path] = None
    map_meteor: str = "auto"


@dataclass
class DataLayout:
    """Where a Pix2Cap-layout dataset keeps one split (``--data`` is the folder holding ``annotations/``)."""

    gt_json: Path
    gt_dir: Path
    image_dir: Path

    @classmethod
    def of(cls, data: Path, split: str) -> "DataLayout":
        data = Path(data)
        layout = cls(data / "annotations" / f"pix2cap_coco_{split}.json", data / f"panoptic_{split}2017",
                     data / f"{split}2017")
        for path, what in ((layout.gt_json, "annotations file"), (layout.gt_dir, "panoptic PNG folder"),
                           (layout.image_dir, "image folder")):
            if not path.exists():
                raise DataError(f"--data {data}: {what} {path} not found (expected the Pix2Cap-COCO layout: "
                                f"annotations/pix2cap_coco_{split}.json, panoptic_{split}2017/, {split}2017/)")
        return layout


# ---------------------------------------------------------------- the segmenter


class PanopticSegmenter:
    """A transformers universal-segmentation model (Mask2Former) whose labels map to the benchmark's categories.

    ``__call__(images) -> [(ids (H, W) int64 with 0 = VOID, [{"id", "category_id", "score"}])]``. Labels are
    matched to ground-truth category names case-insensitively; a label with no such category becomes VOID
    (logged once), and stuff labels are fused into one segment per class, as panoptic evaluation expects.
    transformers' post-processing assumes unpadded inputs, so each image's mask logits are cropped to its own
    (unpadded) extent of the batch first.
    """

    def __init__(self, model, processor, categories: Dict[int, dict], settings: SegmenterSettings):
        self.model, self.processor, self.settings = model, processor, settings
        by_name = {str(c.get("name", "")).lower(): cid for cid, c in categories.items()}
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.label_to_category = {k: by_name[v.lower()] for k, v in id2label.items() if v.lower() in by_name}
        unmapped = sorted(v for k, v in id2label.items() if k not in self.label_to_category)
        if not self.label_to_category:
            raise ConfigError(f"segmenter labels ({', '.join(sorted(id2label.values())[:5])}, ...) match no ground-truth "
                              f"category name ({', '.join(sorted(by_name)[:5])}, ...)")
        if unmapped:
            logger.warning("segmenter: %d label(s) match no ground-truth category and are left VOID: %s",
                           len(unmapped), ", ".join(unmapped[:10]))
        self.stuff_labels = {k for k, c in self.label_to_category.items() if categories[c].get("isthing") != 1}

    def __call__(self, images: Sequence) -> List[Tuple[np.ndarray, List[dict]]]:
        import torch

        param = next(self.model.parameters())
        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        s = self.settings
        masks = outputs.masks_queries_logits  # (B, Q, h, w) at a fixed stride of the padded batch
        pixel_mask = inputs.get("pixel_mask")
        results = []
        for i, im in enumerate(images):
            logits = masks[i:i + 1]
            if pixel_mask is not None:
                rows = int(pixel_mask[i].any(dim=1).sum()) * masks.shape[-2] / pixel_mask.shape[-2]
                cols = int(pixel_mask[i].any(dim=0).sum()) * masks.shape[-1] / pixel_mask.shape[-1]
                logits = logits[..., : max(1, round(rows)), : max(1, round(cols))]
            one = type(outputs)(class_queries_logits=outputs.class_queries_logits[i:i + 1], masks_queries_logits=logits)
            r = self.processor.post_process_panoptic_segmentation(
                one, threshold=s.threshold, mask_threshold=s.mask_threshold, overlap_mask_area_threshold=s.overlap_threshold,
                label_ids_to_fuse=self.stuff_labels, target_sizes=[(im.height, im.width)])[0]
            results.append(self.to_panoptic(r["segmentation"], r["segments_info"]))
        return results

    def to_panoptic(self, segmentation, segments_info: List[dict]) -> Tuple[np.ndarray, List[dict]]:
        """Post-processed output -> ids with 0 = VOID (unassigned and unmapped pixels) and one entry per id."""
        ids = np.asarray(segmentation.cpu() if hasattr(segmentation, "cpu") else segmentation).astype(np.int64)
        out = np.zeros_like(ids)
        segments: Dict[int, dict] = {}
        for info in segments_info:  # fused stuff repeats its id once per merged query
            sid, label = int(info["id"]), int(info["label_id"])
            if sid <= 0 or label not in self.label_to_category:
                continue
            if sid not in segments:
                segments[sid] = {"id": sid, "category_id": self.label_to_category[label], "score": float(info["score"])}
                out[ids == sid] = sid
            else:
                segments[sid]["score"] = max(segments[sid]["score"], float(info["score"]))
        present = set(np.unique(out).tolist())
        return out, [s for sid, s in segments.items() if sid in present]


def load_segmenter(path: Path, categories: Dict[int, dict], settings: SegmenterSettings) -> PanopticSegmenter:
    """``Mask2FormerForUniversalSegmentation`` + its image processor from a local directory."""
    import torch
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    if not Path(path).is_dir():
        raise ConfigError(f"--segmenter {path}: not a directory")
    model = Mask2FormerForUniversalSegmentation.from_pretrained(str(path))
    processor = AutoImageProcessor.from_pretrained(str(path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return PanopticSegmenter(model.to(device).eval(), processor, categories, settings)


def segmentation_setup(config: SegCapRunConfig, layout: DataLayout) -> Tuple[dict, dict]:
    """``(setup, produced_by)`` of the two-stage track's segmentations: what is compared on resume, and the
    description beside it. ``setup``: the segmenter's weights fingerprint (``None`` for a segmenter handed in
    without a directory), its thresholds and the SHA-256 of the ground-truth JSON (its images and category
    names decide what is segmented and how labels map)."""
    from gpt4roi_sft.provenance import file_sha256

    about = describe_model(config.segmenter, "segmenter")
    setup = {"segmenter": about["fingerprint"] if about else None,
             "thresholds": config.segmenter_settings.thresholds(),
             "inputs": {"annotations": file_sha256(layout.gt_json)}}
    return setup, {"segmenter": about}


def open_segments_store(config: SegCapRunConfig, layout: DataLayout) -> PredictionStore:
    """This shard's store of segmentations, tied to :func:`segmentation_setup` (another segmenter or other
    thresholds: a one-line error naming them, or a fresh start with ``config.overwrite``)."""
    setup, produced_by = segmentation_setup(config, layout)
    return PredictionStore(harness.store_path(config.out, SEGMENTS_STORE, config.shard_id, config.num_shards),
                           setup, produced_by=produced_by, overwrite=config.overwrite)


# ---------------------------------------------------------------- segments


def _image_name(ann: dict, images: Dict[object, dict]) -> str:
    img = images.get(ann["image_id"])
    return img["file_name"] if img else os.path.splitext(ann["file_name"])[0] + ".jpg"


def _write_png(path: Path, ids: np.ndarray) -> None:
    from PIL import Image

    from data_converters.synthetic import encode_panoptic

    with atomic_open(path, "wb", encoding=None) as fh:
        Image.fromarray(encode_panoptic(ids)).save(fh, format="PNG")


def segment_images(annotations: Sequence[dict], images: Dict[object, dict], layout: DataLayout, out: Path,
                   store: PredictionStore, segmenter: Optional[Callable], batch_size: int = 2) -> Dict[str, dict]:
    """Run ``segmenter`` on every image not yet in ``store`` (key: image id); PNGs go to ``OUT/panoptic_pred``.

    ``segmenter(images) -> [(ids, segments_info)]`` (see :class:`PanopticSegmenter`); it may be ``None`` when
    every image is already done.
    """
    from PIL import Image
    from tqdm import tqdm

    todo = [a for a in annotations if str(a["image_id"]) not in store]
    if len(todo) < len(annotations):
        logger.info("resuming: %d of %d images already segmented", len(annotations) - len(todo), len(annotations))
    for start in tqdm(range(0, len(todo), batch_size), desc="segmenting", unit="batch", disable=not todo):
        batch = todo[start:start + batch_size]
        pictures = []
        for ann in batch:
            path = layout.image_dir / _image_name(ann, images)
            if not path.is_file():
                raise DataError(f"image {ann['image_id']}: {path} not found")
            with Image.open(path) as im:
                pictures.append(im.convert("RGB"))
        results = segmenter(pictures)
        if len(results) != len(batch):
            raise RuntimeError(f"segmenter returned {len(results)} results for {len(batch)} images")
        for ann, (ids, segments) in zip(batch, results):
            _write_png(out / PRED_PNG_DIR / ann["file_name"], ids)  # before the record: a record implies its PNG
        store.append((str(a["image_id"]), {"file_name": a["file_name"], "segments_info": s})
                     for a, (_, s) in zip(batch, results))
    return store.records


@dataclass
class SegmentSource:
    """The segments to caption for one image: its PNG and the listed segments (``id``, ``category_id``)."""

    image_id: object
    image_path: Path
    png: Path
    file_name: str
    segments: List[dict]


def given_segment_sources(source: segcap.Panoptic, source_dir: Path, annotations: Sequence[dict],
                          images: Dict[object, dict], layout: DataLayout) -> List[SegmentSource]:
    """The segments of ``source`` (ground truth or user-given) for each evaluated image; crowd segments skipped."""
    by_image = {a["image_id"]: a for a in source.annotations}
    out = []
    for ann in annotations:
        src = by_image.get(ann["image_id"])
        if src is None:
            raise DataError(f"{source.path}: image {ann['image_id']} has no segments")
        segments = [s for s in src["segments_info"] if s.get("iscrowd", 0) != 1]
        for s in segments:
            if "id" not in s or "category_id" not in s:
                raise DataError(f"{source.path}: image {ann['image_id']}: a segment lacks 'id' or 'category_id'")
        out.append(SegmentSource(ann["image_id"], layout.image_dir / _image_name(ann, images),
                                 Path(source_dir) / src["file_name"], ann["file_name"], segments))
    return out


def segmented_sources(annotations: Sequence[dict], images: Dict[object, dict], layout: DataLayout, out: Path,
                      records: Dict[str, dict]) -> List[SegmentSource]:
    """The two-stage track's segments of each image, from the segmentation ``records`` (key: image id)."""
    harness.require_complete([str(a["image_id"]) for a in annotations], records, out)
    return [SegmentSource(a["image_id"], layout.image_dir / _image_name(a, images), out / PRED_PNG_DIR / a["file_name"],
                          a["file_name"], records[str(a["image_id"])]["segments_info"]) for a in annotations]


# ---------------------------------------------------------------- captions


def segment_regions(ids: np.ndarray, segment_ids: Sequence[int]) -> Dict[int, Tuple[List[float], np.ndarray]]:
    """``{id: (xyxy pixel box, (H, W) bool mask)}`` for the ids present in ``ids``."""
    regions = {}
    for sid in segment_ids:
        mask = ids == sid
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            continue
        regions[sid] = ([float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)], mask)
    return regions


def segment_key(src: SegmentSource, segment_id) -> str:
    return f"{src.image_id}/{segment_id}"


def caption_segments(sources: Sequence[SegmentSource], captioner: Captioner, store: PredictionStore,
                     prompt: str = DEFAULT_PROMPT, batch_size: Union[int, str] = "auto") -> int:
    """Caption every segment not yet in ``store`` (key ``image_id/segment_id``); return how many were captioned.

    Not :func:`eval.harness.generate_missing`, which builds every request up front: a mask-aware request holds
    a full-size mask per segment. Requests are built image by image (each PNG read once) into a pool of about
    :data:`POOL_REQUESTS`; the captioner's ``plan`` (when it has one) orders the pool and sizes its batches
    (one image's segments side by side, ``"auto"`` from free device memory); the full batches run and a last,
    short one waits for the next images. A captioner without ``plan`` gets the requests in order,
    ``batch_size`` at a time (8 for ``"auto"``). Each batch is stored (and fsynced) before the next starts.
    """
    from tqdm import tqdm

    todo = sum(1 for src in sources for s in src.segments if segment_key(src, s["id"]) not in store)
    if not todo:
        return 0
    total = sum(len(src.segments) for src in sources)
    if todo < total:
        logger.info("resuming: %d of %d segments already captioned", total - todo, total)
    needs_masks = getattr(captioner, "needs_masks", False)  # a lazily loaded captioner loads its model here
    plan = getattr(captioner, "plan", None)
    pool_size = max(POOL_REQUESTS, 0 if batch_size == "auto" else int(batch_size))
    pool: List[Tuple[str, RegionRequest]] = []
    done = 0

    def batches_of(requests: List[RegionRequest]) -> List[List[int]]:
        if plan is not None:
            return plan(requests, batch_size)
        rows = 8 if batch_size == "auto" else int(batch_size)
        return [list(range(i, min(i + rows, len(requests)))) for i in range(0, len(requests), rows)]

    def run_pool(final: bool) -> None:
        nonlocal pool, done
        batches = batches_of([r for _, r in pool])
        waiting: List[int] = []
        if not final and len(batches) > 1 and len(batches[-1]) < len(batches[0]):
            waiting = batches.pop()
        for batch in batches:
            asked = [pool[i] for i in batch]
            answers = captioner([r for _, r in asked])
            if len(answers) != len(asked):
                raise RuntimeError(f"captioner returned {len(answers)} answers for {len(asked)} requests")
            store.append((key, {"caption": a}) for (key, _), a in zip(asked, answers))
            done += len(asked)
            bar.update(len(asked))
        pool = [pool[i] for i in waiting]

    with tqdm(total=todo, desc="captioning segments", unit="seg") as bar:
        for src in sources:
            keys = {s["id"]: segment_key(src, s["id"]) for s in src.segments}
            wanted = [sid for sid, key in keys.items() if key not in store]
            if not wanted:
                continue
            if not src.image_path.is_file():
                raise DataError(f"image {src.image_id}: {src.image_path} not found")
            ids = segcap.read_panoptic_png(src.png, f"image {src.image_id}")
            regions = segment_regions(ids, wanted)
            absent = [keys[sid] for sid in wanted if sid not in regions]
            if absent:  # listed but without pixels: nothing to caption, and no segment in the prediction
                store.append((key, {"caption": "", "absent": True}) for key in absent)
                bar.update(len(absent))
            for sid, (box, mask) in regions.items():
                pool.append((keys[sid], RegionRequest(src.image_path, prompt, [box],
                                                      masks=[mask] if needs_masks else None)))
            if len(pool) >= pool_size:
                run_pool(final=False)
        if pool:
            run_pool(final=True)
    return done


# ---------------------------------------------------------------- the prediction files


def write_predictions(sources: Sequence[SegmentSource], captions: Dict[str, dict], categories: Dict[int, dict],
                      images: Dict[object, dict], out: Path) -> Tuple[Path, Path]:
    """``OUT/predictions.json`` + ``OUT/panoptic_pred/*.png``: listed, present, captioned segments only."""
    harness.require_complete([segment_key(src, s["id"]) for src in sources for s in src.segments], captions, out)
    png_dir = out / PRED_PNG_DIR
    annotations = []
    for src in sources:
        ids = segcap.read_panoptic_png(src.png, f"image {src.image_id}")
        regions = segment_regions(ids, [s["id"] for s in src.segments])
        keep = np.zeros(ids.shape, dtype=bool)
        infos = []
        for s in src.segments:
            if s["id"] not in regions:
                continue
            box, mask = regions[s["id"]]
            keep |= mask
            caption = captions[segment_key(src, s["id"])]["caption"]
            x1, y1, x2, y2 = box
            infos.append({"id": int(s["id"]), "category_id": s["category_id"], "iscrowd": 0,
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()), "caption": caption})
        target, kept = png_dir / src.file_name, np.where(keep, ids, 0)
        if src.png != target or not np.array_equal(kept, ids):
            _write_png(target, kept)
        annotations.append({"image_id": src.image_id, "file_name": src.file_name, "segments_info": infos})
    wanted = {src.image_id for src in sources}
    payload = {"images": [img for iid, img in images.items() if iid in wanted], "annotations": annotations,
               "categories": list(categories.values())}
    write_json_atomic(out / "predictions.json", payload, indent=None)
    return out / "predictions.json", png_dir


# ---------------------------------------------------------------- the run


@dataclass
class Benchmark:
    """What a run reads before generating anything: the split's layout, its ground truth, the evaluated images."""

    layout: DataLayout
    gt: segcap.Panoptic
    annotations: List[dict]


def load_benchmark(config: SegCapRunConfig) -> Benchmark:
    layout = DataLayout.of(config.data, config.split)
    gt = segcap.load_panoptic(layout.gt_json)
    annotations = gt.annotations[: config.max_images] if config.max_images else gt.annotations
    if not annotations:
        raise DataError(f"{layout.gt_json}: no annotations")
    return Benchmark(layout, gt, list(annotations))


def is_two_stage(config: SegCapRunConfig, segmenter: Optional[Callable] = None) -> bool:
    two_stage = config.segmenter is not None or segmenter is not None
    if two_stage and config.segments_json is not None:
        raise ConfigError("--segments-json and --segmenter are two different tracks; give one")
    return two_stage


def given_sources(config: SegCapRunConfig, bench: Benchmark) -> List[SegmentSource]:
    """Every evaluated image's given segments (the ground truth's, or ``--segments-json``'s), all checked."""
    gt, layout = bench.gt, bench.layout
    if config.segments_json is not None:
        source = segcap.load_panoptic(config.segments_json, needs_categories=False)
        source_dir = config.segments_dir or Path(config.segments_json).with_suffix("")
    else:
        source, source_dir = gt, layout.gt_dir
    sources = given_segment_sources(source, source_dir, bench.annotations, gt.images, layout)
    for src in sources:
        for s in src.segments:
            if s["category_id"] not in gt.categories:
                raise DataError(f"{source.path}: image {src.image_id} segment {s['id']}: category_id "
                                f"{s['category_id']} is not a ground-truth category")
    return sources


def open_captions_store(config: SegCapRunConfig, layout: DataLayout, segmentation: Optional[dict],
                        model_required: bool = True) -> PredictionStore:
    """This shard's store of captions, tied by :func:`eval.harness.open_store` to the model, decoding,
    template, prompt, the ground-truth JSON, ``--segments-json`` and the segmentation's setup (two-stage)."""
    inputs = {"annotations": layout.gt_json}
    if config.segments_json is not None:
        inputs["segments"] = Path(config.segments_json)
    return harness.open_store(config, CAPTIONS_STORE, inputs=inputs,
                              settings={"prompt": config.prompt, "segmentation": segmentation},
                              model_required=model_required)


def run(config: SegCapRunConfig, captioner: Optional[Captioner] = None, segmenter: Optional[Callable] = None) -> Optional[dict]:
    """Predict (or resume) and evaluate; returns the metrics (``None`` with ``evaluate=False`` or for one shard
    of several).

    ``captioner``/``segmenter`` default to the models of ``config`` (loaded only when something is left to do;
    ``--model`` and ``--segmenter`` must exist either way: stored work is reused only for what produced it).
    """
    out = Path(config.out)
    bench = load_benchmark(config)
    gt, layout = bench.gt, bench.layout
    mine = harness.shard(bench.annotations, config.shard_id, config.num_shards)
    if is_two_stage(config, segmenter):
        segments = open_segments_store(config, layout)
        captions = open_captions_store(config, layout, segments.metadata, model_required=captioner is None)
        if segmenter is None and any(str(a["image_id"]) not in segments for a in mine):
            segmenter = load_segmenter(config.segmenter, gt.categories, config.segmenter_settings)
        records = segment_images(mine, gt.images, layout, out, segments, segmenter, config.segmenter_settings.batch_size)
        sources = segmented_sources(mine, gt.images, layout, out, records)
        about = {**harness.provenance(captions), "segmentation": harness.provenance(segments)}
    else:
        every = given_sources(config, bench)  # the whole input is checked, whichever shard this is
        captions = open_captions_store(config, layout, None, model_required=captioner is None)
        sources = harness.shard(every, config.shard_id, config.num_shards)
        about = harness.provenance(captions)
    caption_segments(sources, captioner or harness.captioner_for(config), captions, config.prompt, config.batch_size)
    if config.num_shards > 1:
        logger.info("shard %d of %d done (%d images); run with --merge once every shard is done",
                    config.shard_id, config.num_shards, len(mine))
        return None
    return finalize(config, bench, sources, captions.records, about)


def score_stored(config: SegCapRunConfig) -> Optional[dict]:
    """Write the prediction from the stores of all ``config.num_shards`` shards in ``--out`` and score it
    (``--merge``, ``--score-only``); no model is loaded."""
    out = Path(config.out)
    bench = load_benchmark(config)
    captions = harness.merge_shards(out, CAPTIONS_STORE, config.num_shards)
    about = harness.merged_provenance(out, CAPTIONS_STORE, config.num_shards)
    stored_two_stage = ((about.get("setup") or {}).get("settings") or {}).get("segmentation") is not None
    if is_two_stage(config) != stored_two_stage:
        raise ConfigError(f"{out}: its captions are of {'a --segmenter' if stored_two_stage else 'given'} segments; "
                          f"pass the options of the run that wrote them")
    if stored_two_stage:
        records = harness.merge_shards(out, SEGMENTS_STORE, config.num_shards)
        sources = segmented_sources(bench.annotations, bench.gt.images, bench.layout, out, records)
        about = {**about, "segmentation": harness.merged_provenance(out, SEGMENTS_STORE, config.num_shards)}
    else:
        sources = given_sources(config, bench)
    return finalize(config, bench, sources, captions, about)


def finalize(config: SegCapRunConfig, bench: Benchmark, sources: Sequence[SegmentSource], captions: Dict[str, dict],
             provenance: dict) -> Optional[dict]:
    """Write ``predictions.json`` and the PNGs, then (unless ``config.evaluate`` is off) score them; ``provenance``
    goes into ``metrics.json`` and names the model (and segmenter) in ``metrics.txt``."""
    out, gt = Path(config.out), bench.gt
    pred_json, pred_dir = write_predictions(sources, captions, gt.categories, gt.images, out)
    logger.info("wrote %s and %s/", pred_json, pred_dir)
    if not config.evaluate:
        return None
    gt_json = bench.layout.gt_json
    if len(bench.annotations) < len(gt.annotations):
        gt_json = out / "gt_subset.json"
        ids = {a["image_id"] for a in bench.annotations}
        write_json_atomic(gt_json, {"images": [i for k, i in gt.images.items() if k in ids],
                                    "annotations": list(bench.annotations),
                                    "categories": list(gt.categories.values())}, indent=None)
    return segcap.evaluate(segcap.SegCapConfig(gt_json=gt_json, gt_dir=bench.layout.gt_dir, pred_json=pred_json,
                                               pred_dir=pred_dir, out=out, workers=config.workers,
                                               spice_jars=config.spice_jars, map_meteor=config.map_meteor),
                           provenance=provenance)


def evaluate_given_segments(model_dir, data_dir, out, adapter=None, split: str = "val",
                            batch_size: Union[int, str] = "auto", max_new_tokens: int = 64,
                            max_images: Optional[int] = None, overwrite: bool = False,
                            captioner: Optional[Captioner] = None) -> dict:
    """Caption the ground-truth segments of ``data_dir``'s ``split`` with ``model_dir`` and score them.

    The one-call form for reports (e.g. the quickstart's): returns ``metrics.json``'s content; files in ``out``.
    Captions already in ``out`` are reused when they come from this same model and setup; those of another are
    refused unless ``overwrite``.
    """
    config = SegCapRunConfig(data=Path(data_dir), out=Path(out), split=split,
                             model=Path(model_dir) if model_dir else None, adapter=Path(adapter) if adapter else None,
                             batch_size=batch_size, decode=DecodeSettings(max_new_tokens=max_new_tokens),
                             max_images=max_images, overwrite=overwrite)
    return run(config, captioner=captioner)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.segcap_predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True,
                   help="dataset root with annotations/pix2cap_coco_<split>.json, panoptic_<split>2017/, <split>2017/")
    p.add_argument("--split", default="val")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--segmenter", type=Path, help="Mask2FormerForUniversalSegmentation directory (two-stage track)")
    p.add_argument("--segments-json", type=Path, help="caption these panoptic segments instead of the ground truth's")
    p.add_argument("--segments-dir", type=Path, help="PNG folder of --segments-json (default: its name without .json)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="human turn with <image> and one <bbox>")
    p.add_argument("--max-images", type=int, help="only the first N images of the split")
    harness.add_model_args(p, max_new_tokens=64)
    harness.add_shard_args(p)
    p.add_argument("--segmenter-threshold", type=float, default=0.8, help="query score threshold")
    p.add_argument("--mask-threshold", type=float, default=0.5)
    p.add_argument("--overlap-threshold", type=float, default=0.8)
    p.add_argument("--segmenter-batch-size", type=int, default=2)
    p.add_argument("--no-eval", action="store_true", help="write the predictions only")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="evaluator processes")
    p.add_argument("--spice-jars", type=Path, help="folder with stanford-corenlp-3.6.0.jar and -models.jar")
    p.add_argument("--map-meteor", default="auto", choices=("auto", "nltk", "pycocoevalcap"))
    p.add_argument("--nltk-data", type=Path, help="extra NLTK data folder holding corpora/wordnet")
    return p


def main(argv=None) -> int:
    import sys

    args = build_parser().parse_args(harness.merge_word_to_flag(sys.argv[1:] if argv is None else argv))
    harness.setup_run(args)
    if min(args.segmenter_batch_size, args.workers) < 1:
        raise ConfigError("--segmenter-batch-size and --workers must be at least 1")
    if args.max_images is not None and args.max_images < 1:
        raise ConfigError("--max-images must be at least 1")
    if args.nltk_data is not None:
        segcap.add_nltk_data(args.nltk_data)
    config = SegCapRunConfig(
        **harness.config_kwargs(args), data=args.data, split=args.split, segmenter=args.segmenter,
        segments_json=args.segments_json, segments_dir=args.segments_dir, prompt=args.prompt,
        segmenter_settings=SegmenterSettings(args.segmenter_threshold, args.mask_threshold, args.overlap_threshold,
                                             args.segmenter_batch_size),
        max_images=args.max_images, evaluate=not args.no_eval, workers=args.workers, spice_jars=args.spice_jars,
        map_meteor=args.map_meteor)
    out = Path(config.out)
    if args.merge or args.score_only:  # the stores already in --out; no model, no GPU
        score_stored(config)
    elif run(config) is None and config.num_shards > 1:
        print(f"shard {config.shard_id} of {config.num_shards} done; merge with: python -m eval.segcap_predict merge "
              f"--data {config.data} --out {out} --num-shards {config.num_shards} [the options of the run]")
        return 0
    if config.evaluate:
        print((out / "metrics.txt").read_text(), end="")
    else:
        print(f"wrote {out / 'predictions.json'} and {out / PRED_PNG_DIR}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
