"""Conversation JSONL -> training items, read lazily through a byte-offset index.

The index is one pass over the file reading lines as bytes (only the offsets are kept, never the
records), so a multi-GB JSONL costs a few bytes per record of memory and each item costs one seek and
one ``json.loads``. Every record is validated when read; errors name the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from gpt4roi_sft.constants import BBOX_TOKEN, IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN
from gpt4roi_sft.conversation import get_template, tokenize_conversation
from gpt4roi_sft.data.image_transform import ImageTransform
from gpt4roi_sft.data.model_inputs import LAYOUT_TOKENS, SampleEncoder
from gpt4roi_sft.data.schema import check_unique_id, validate_record
from gpt4roi_sft.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Rough bytes per token of English JSON text, for the cheap length estimate used by length grouping.
BYTES_PER_TOKEN = 4.0


@dataclass
class LineIndex:
    """Where each record of one JSONL file lies: byte ``offsets``, byte ``sizes``, 1-based ``line_numbers``."""

    path: str
    offsets: np.ndarray  # (R,) int64
    sizes: np.ndarray  # (R,) int64
    line_numbers: np.ndarray  # (R,) int64
    has_image: np.ndarray  # (R,) bool, a cheap guess from the raw bytes


def index_jsonl(path: str) -> LineIndex:
    """Scan ``path`` once (line by line, as bytes) and record where each non-blank line starts.

    A file without a record is a :class:`DataError` naming it: it is a conversion that wrote nothing or a wrong
    path, and the sampler would only find out later, without the file's name.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: conversation file not found")
    offsets, sizes, lines, images = [], [], [], []
    pos = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                offsets.append(pos)
                sizes.append(len(raw))
                lines.append(lineno)
                images.append(b'"image"' in raw and b'"image": null' not in raw)
            pos += len(raw)
    if not offsets:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    return LineIndex(
        path,
        np.asarray(offsets, dtype=np.int64),
        np.asarray(sizes, dtype=np.int64),
        np.asarray(lines, dtype=np.int64),
        np.asarray(images, dtype=bool),
    )


def check_image_size(record: dict, width: int, height: int, where: str) -> None:
    """The image file's ``width`` x ``height`` is the record's size, or that size uniformly rescaled.

    Boxes follow a resized file by the ratio of the sizes; a file whose aspect ratio differs from the record's
    would stretch them, so it is a :class:`DataError`. Each side may be off by a pixel (the rescale rounds).
    """
    rw, rh = float(record["width"]), float(record["height"])
    if abs(width / rw * rh - height) <= 1.0 or abs(height / rh * rw - width) <= 1.0:
        return
    raise DataError(f"{where}: fields 'width', 'height' say {record['width']}x{record['height']}, but the image "
                    f"{record['image']} is {width}x{height}, another aspect ratio (the boxes would be stretched)")


def panoptic_segment_mask(png_path: str, segment_id: int) -> np.ndarray:
    """(H, W) bool mask of ``segment_id`` in a COCO-panoptic PNG (``id = R + 256*G + 256^2*B``)."""
    rgb = np.asarray(Image.open(png_path).convert("RGB"), dtype=np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    return ids == int(segment_id)


class ConversationDataset(torch.utils.data.Dataset):
    """Records of one or more conversation JSONL files as training items.

    ``dataset[i]`` is ``{"input_ids": (L,) long, "labels": (L,) long, "pixel_values": (3, S, S) float or
    None, "boxes": (N, 4) float xyxy fractions of the square, "region_masks": (N, S, S) float (only with
    ``load_masks``), "id": str, "num_dropped_turns": int}``. ``<image>`` is expanded to
    ``num_image_tokens`` copies of ``image_token_id`` (never trained); each ``<bbox>`` stays one token
    and ``boxes[k]`` belongs to the k-th. When truncation to ``max_length`` drops trailing turns, the
    regions their ``<bbox>`` tokens referred to are dropped too.

    Files are concatenated in the order given; :attr:`source_sizes` gives each file's record count (the
    mixture sampler draws from these ranges). ``image_layout`` is the processor's (``im_start_end``: GPT4RoI's
    released checkpoints, whose template writes the image tokens itself; then ``image_token_id`` is
    ``<im_patch>``); the template must write the same layout.
    """

    def __init__(
        self,
        paths_or_path: Union[str, Sequence[str]],
        image_root: Optional[str],
        tokenizer,
        image_transform: ImageTransform,
        image_token_id: int,
        num_image_tokens: int,
        template: str = "gpt4roi_v0",
        max_length: int = 2048,
        load_masks: bool = False,
        skip_bad_records: bool = False,
        image_layout: str = "image_token",
    ):
        paths = [paths_or_path] if isinstance(paths_or_path, (str, os.PathLike)) else list(paths_or_path)
        if not paths:
            raise ConfigError("ConversationDataset needs at least one JSONL path")
        self.paths = [str(p) for p in paths]
        self.image_root = image_root or ""
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.template = template
        self.max_length = int(max_length)
        self.load_masks = load_masks
        self.skip_bad_records = skip_bad_records
        self.num_skipped = 0
        if get_template(template).image_layout != image_layout:
            raise ConfigError(f"data.template {template!r} writes the {get_template(template).image_layout!r} image "
                              f"layout but the model's processor reads {image_layout!r} (GPT4RoI checkpoints: "
                              "gpt4roi_original)")
        self.image_layout = image_layout
        expanded = image_layout == "im_start_end"
        for tok in LAYOUT_TOKENS[image_layout]:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id or tokenizer(tok, add_special_tokens=False)["input_ids"] != [tid]:
                raise ConfigError(f"the tokenizer must hold {tok} as one added token (add it before building the dataset)")
        self._tokenizer_bbox_id = tokenizer.convert_tokens_to_ids(BBOX_TOKEN)
        if expanded:
            start, end = tokenizer.convert_tokens_to_ids([IM_START_TOKEN, IM_END_TOKEN])
            self.encoder = SampleEncoder(image_transform, self.image_token_id, self.num_image_tokens,
                                         bbox_token_id=self._tokenizer_bbox_id, image_layout=image_layout,
                                         image_start_id=start, image_end_id=end)
        else:
            self.encoder = SampleEncoder(image_transform, self.image_token_id, self.num_image_tokens,
                                         bbox_token_id=self._tokenizer_bbox_id,
                                         source_image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        # Tokens an image adds beyond what the tokenized text already holds (the template writes them itself
        # in GPT4RoI's layout).
        self._image_extra_tokens = 0 if expanded else self.num_image_tokens - 1
        self.indexes = [index_jsonl(p) for p in self.paths]
        self.source_sizes = [len(ix.offsets) for ix in self.indexes]
        self._starts = np.cumsum([0] + self.source_sizes)
        logger.info("indexed %d records from %d file(s)", len(self), len(self.paths))

    def __len__(self) -> int:
        return int(self._starts[-1])

    # ----------------------------------------------------------------------------------------- reading
    def _locate(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        f = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self.indexes[f], i - int(self._starts[f])

    def where(self, i: int) -> str:
        """``"file.jsonl line N"`` for record ``i``, as errors name it."""
        ix, j = self._locate(i)
        return f"{ix.path} line {int(ix.line_numbers[j])}"

    def read_record(self, i: int) -> dict:
        """Parse record ``i`` (one seek + one line); invalid JSON is a :class:`DataError` naming file and line."""
        ix, j = self._locate(i)
        with open(ix.path, "rb") as f:
            f.seek(int(ix.offsets[j]))
            raw = f.read(int(ix.sizes[j]))
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.where(i)}: invalid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise DataError(f"{self.where(i)}: a record must be a JSON object, got {type(record).__name__}")
        return record

    def validate_record(self, record: dict, where: str, check_files: bool = True) -> None:
        """Check the record schema (:func:`gpt4roi_sft.data.schema.validate_record`); raise :class:`DataError` naming ``where``."""
        validate_record(record, where, image_root=self.image_root if check_files else None, require_masks=self.load_masks)

    def build_item(self, record: dict, where: str) -> dict:
        """Validate, tokenize and transform one parsed record into a training item."""
        self.validate_record(record, where)
        messages = record["conversations"]
        has_image = bool(record.get("image"))
        budget = self.max_length - (self._image_extra_tokens if has_image else 0)
        try:
            tok = tokenize_conversation(self.tokenizer, messages, self.template, max_length=budget)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        kept_messages = messages[: len(messages) - tok.num_dropped_turns]
        num_regions = sum(m["value"].count(BBOX_TOKEN) for m in kept_messages)
        regions = (record.get("regions") or [])[:num_regions]
        image, boxes, masks = None, np.zeros((0, 4)), None
        if has_image:
            image_path = os.path.join(self.image_root, record["image"])
            try:
                image = Image.open(image_path)
                image.load()
            except OSError as exc:
                raise DataError(f"{where}: cannot read image {image_path} ({exc})") from None
            width, height = image.size
            if regions:  # boxes are in the record's pixel frame; follow the file if it was resized since
                check_image_size(record, width, height, where)
                sx, sy = width / float(record["width"]), height / float(record["height"])
                boxes = np.asarray([r["bbox"] for r in regions], dtype=np.float64).reshape(-1, 4) * [sx, sy, sx, sy]
            if self.load_masks:
                masks = [self._region_mask(r, where, (height, width)) for r in regions]
        item = self.encoder(tok.input_ids, tok.labels, image, boxes, masks, where=where, clip=True)
        if self.load_masks and not has_image:
            item["region_masks"] = torch.zeros((0, self.image_transform.size, self.image_transform.size))
        item["id"] = str(record.get("id", where))
        item["num_dropped_turns"] = tok.num_dropped_turns
        return item

    def _region_mask(self, region: dict, where: str, shape) -> np.ndarray:
        png = os.path.join(self.image_root, region["mask"])
        if not os.path.isfile(png):
            raise DataError(f"{where}: mask file not found: {png}")
        mask = panoptic_segment_mask(png, region["segment_id"])
        if mask.shape != tuple(shape):
            raise DataError(f"{where}: mask {png} is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}")
        if not mask.any():
            raise DataError(f"{where}: segment {region['segment_id']} does not occur in {png}")
        return mask

    def __getitem__(self, i: int) -> dict:
        if not self.skip_bad_records:
            return self.build_item(self.read_record(i), self.where(i))
        # A bad record is replaced by the next good one: deterministic, so resumed runs see the same data.
        for step in range(min(len(self), 1000)):
            j = (i + step) % len(self)
            try:
                return self.build_item(self.read_record(j), self.where(j))
            except DataError as exc:
                self.num_skipped += 1
                logger.warning("skipping bad record (%d skipped so far): %s", self.num_skipped, exc)
        raise DataError(f"no readable record found near record {i} of {self.paths}")

    # ------------------------------------------------------------------------------------- whole-file
    def lengths(self) -> np.ndarray:
        """(R,) approximate token lengths from byte sizes (no parsing), image tokens included."""
        sizes = np.concatenate([ix.sizes for ix in self.indexes]).astype(np.float64)
        images = np.concatenate([ix.has_image for ix in self.indexes])
        est = np.ceil(sizes / BYTES_PER_TOKEN) + images * self.num_image_tokens
        return np.minimum(est, self.max_length).astype(np.int64)

    def validate_all(self, raise_on_error: bool = True, tokenize: bool = False) -> List[str]:
        """Check every record (JSON, schema, regions, boxes, image files, ids unique per file) without loading images.

        Returns the list of error messages; with ``raise_on_error`` a non-empty list raises one
        :class:`DataError` that counts them and shows the first few. ``tokenize`` also checks that each
        conversation's first pair fits ``max_length`` (slower).
        """
        errors = []
        seen = {path: {} for path in self.paths}  # per file: id -> where it was first seen
        for i in range(len(self)):
            where = self.where(i)
            try:
                record = self.read_record(i)
                self.validate_record(record, where)
                check_unique_id(record, where, seen[self._locate(i)[0].path])
                if tokenize:
                    budget = self.max_length - (self._image_extra_tokens if record.get("image") else 0)
                    tokenize_conversation(self.tokenizer, record["conversations"], self.template, budget)
            except DataError as exc:
                msg = str(exc)
                errors.append(msg if msg.startswith(where) else f"{where}: {msg}")
        if errors and raise_on_error:
            shown = "; ".join(errors[:5])
            raise DataError(f"{len(errors)} bad record(s) in {', '.join(self.paths)}: {shown}" + (" ..." if len(errors) > 5 else ""))
        return errors
