"""The conversation record and the box convention: the one definition converters, dataset and eval share.

A record is one JSON object per line of a conversation JSONL::

    {"id": "pix2cap/train/397133/d0",            a non-empty string, unique in its file
     "image": "train2017/000000397133.jpg",       relative to the image root given at train time (optional)
     "width": 640, "height": 427,                 original pixel size (required when there are regions)
     "regions": [{"bbox": [x1, y1, x2, y2],       absolute pixels of the original image, xyxy, float
                  "segment_id": 3,                optional: id in the panoptic PNG (mask-aware encoders)
                  "mask": "panoptic_train2017/000000397133.png",  optional
                  "category": "person"}],         optional
     "conversations": [{"from": "human", "value": "<image>\\nWhat is region1 <bbox>?"},
                       {"from": "gpt", "value": "A man in a dark suit ..."}],
     "source": "pix2cap_coco"}

Rules (:func:`validate_record`): no field beyond these (:data:`RECORD_FIELDS`); no gpt answer is empty; the
k-th ``<bbox>`` in the text is ``regions[k]`` and the counts match; ``<image>`` appears exactly once, in the
first human turn, when there is an image, and never otherwise.

Boxes: source datasets give COCO ``[x, y, w, h]`` (:func:`xywh_to_xyxy`, :func:`coco_box_to_xyxy`); records
and generation requests hold absolute pixel ``[x1, y1, x2, y2]`` of the original image; a box crossing the
border is clipped to it (:func:`clip_box`), one with no area or entirely outside is a :class:`BoxError`
(:func:`check_box`, :func:`validate_boxes`). Inside the model boxes are xyxy fractions of the square image
the tower sees (``ImageTransform.map_boxes``).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, List, Optional, Sequence

import numpy as np

from gpt4roi_sft.constants import BBOX_TOKEN, IMAGE_TOKEN
from gpt4roi_sft.conversation import validate_messages
from gpt4roi_sft.errors import BoxError, DataError


# ------------------------------------------------------------------------------------------------ boxes
def xywh_to_xyxy(bbox: Any, where: str = "") -> List[float]:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` floats, not clipped.

    Four finite numbers with ``w > 0`` and ``h > 0``, else a :class:`BoxError` naming ``where``
    (e.g. ``"train.json: image 397133 segment 3"``).
    """
    prefix = f"{where}: " if where else ""
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in bbox)):
        raise BoxError(f"{prefix}bbox {bbox!r} is not [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise BoxError(f"{prefix}bbox {list(bbox)} has a non-finite coordinate")
    if w <= 0 or h <= 0:
        raise BoxError(f"{prefix}bbox {list(bbox)} has no area")
    return [x, y, x + w, y + h]


def clip_box(box: Sequence[float], width: float, height: float) -> List[float]:
    """Pixel xyxy ``box`` clipped to the ``width`` x ``height`` image."""
    x1, y1, x2, y2 = box
    return [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]


def check_box(box: Sequence[float], width: float, height: float, tag: str, clip: bool = False) -> List[float]:
    """Check one pixel xyxy box against a ``width`` x ``height`` image; return it as floats (clipped with ``clip``).

    A non-finite coordinate, ``x2 <= x1`` or ``y2 <= y1``, or a box entirely outside the image is a
    :class:`BoxError` whose message starts with ``tag``; so is a box crossing the border unless ``clip``.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise BoxError(f"{tag} has a non-finite coordinate")
    if x2 <= x1 or y2 <= y1:
        raise BoxError(f"{tag} is empty (needs x2 > x1 and y2 > y1)")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise BoxError(f"{tag} lies entirely outside the {width}x{height} image")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        if not clip:
            raise BoxError(f"{tag} crosses the border of the {width}x{height} image (pass clip=True to clip it)")
        return clip_box((x1, y1, x2, y2), width, height)
    return [x1, y1, x2, y2]


def coco_box_to_xyxy(bbox: Any, width: float, height: float, where: str) -> List[float]:
    """COCO ``[x, y, w, h]`` of a ``width`` x ``height`` image -> absolute xyxy floats clipped to the image.

    A malformed box, or one with nothing inside the image, is a :class:`BoxError` naming ``where`` and the
    box as the file gives it.
    """
    xyxy = xywh_to_xyxy(bbox, where)
    return check_box(xyxy, width, height, f"{where}: bbox {list(bbox)}", clip=True)


def is_coordinate(value: Any) -> bool:
    """A real number that is not a bool (JSON's true/false are Python ints)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_pixel_size(value: Any) -> bool:
    """A positive, finite pixel count (``True`` is a Python int, but no size): an image's width or height."""
    return is_coordinate(value) and math.isfinite(value) and value > 0


def _box_rows(boxes, prefix: str, label: str) -> np.ndarray:
    """``boxes`` as float64 (N, 4); anything but four real numbers per box is a :class:`BoxError` (numpy would
    turn ``"12"`` into 12.0, and fail on a fifth number with a shape error that names nothing)."""
    if hasattr(boxes, "dtype"):  # an array or tensor: its dtype says whether it holds numbers
        arr = np.asarray(boxes)
        if arr.size == 0:
            return np.zeros((0, 4))
        if arr.dtype.kind not in "iuf" or arr.ndim != 2 or arr.shape[1] != 4:
            raise BoxError(f"{prefix}boxes must be (N, 4) numbers [x1, y1, x2, y2], got {arr.dtype} of shape "
                           f"{tuple(arr.shape)}")
        return arr.astype(np.float64)
    if not isinstance(boxes, (list, tuple)):
        raise BoxError(f"{prefix}boxes must be a list of [x1, y1, x2, y2], got {type(boxes).__name__}")
    rows = [box.tolist() if hasattr(box, "tolist") else box for box in boxes]
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4 or not all(is_coordinate(v) for v in row):
            raise BoxError(f"{prefix}{label.format(i)} {row!r} is not [x1, y1, x2, y2] (four numbers)")
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def validate_boxes(boxes, width: int, height: int, where: str = "", clip: bool = False,
                   label: str = "box {}") -> np.ndarray:
    """Check pixel xyxy boxes against a ``width`` x ``height`` image and return them as float32 (N, 4).

    Each box must be four real numbers and goes through :func:`check_box`; errors name ``where`` and the box as
    ``label`` formats its index (e.g. ``"train.jsonl line 7: box 2 [...]"``).
    """
    prefix = f"{where}: " if where else ""
    arr = _box_rows(boxes, prefix, label)
    out = [check_box(b, width, height, f"{prefix}{label.format(i)} {[float(v) for v in b]}", clip)
           for i, b in enumerate(arr)]
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------- record
RECORD_FIELDS = ("id", "image", "width", "height", "regions", "conversations", "source")


def check_unique_id(record: dict, where: str, seen: dict) -> None:
    """Remember ``record``'s id in ``seen`` (id -> where it was first seen); a repeat is a :class:`DataError`.

    ``record`` passed :func:`validate_record`. Ids name items in logs, predictions and skipped-record warnings,
    so two records sharing one make a file's results ambiguous; the message names both places.
    """
    record_id = record["id"]
    first = seen.setdefault(record_id, where)
    if first != where:
        raise DataError(f"{where}: field 'id': {record_id!r} is already the id of {first}")


def _check_mask_fields(region: dict, where: str) -> None:
    """What the mask-aware encoder reads of a region: a panoptic PNG path and the integer id of its segment."""
    if "mask" not in region or "segment_id" not in region:
        raise DataError(f"{where} needs 'mask' and 'segment_id' when masks are loaded")
    if not isinstance(region["mask"], str) or not region["mask"]:
        raise DataError(f"{where}.mask must be a panoptic PNG path (got {region['mask']!r})")
    segment_id = region["segment_id"]
    if not isinstance(segment_id, numbers.Integral) or isinstance(segment_id, bool) or segment_id < 0:
        raise DataError(f"{where}.segment_id must be a non-negative integer (got {segment_id!r})")


def validate_record(record: Any, where: str, *, image_root: Optional[str] = None, require_masks: bool = False) -> None:
    """Check one conversation record against the rules above; raise :class:`DataError` naming ``where``.

    ``image_root``: also check that the image file exists under it (``None``: do not look at files).
    ``require_masks``: every region needs ``mask`` and ``segment_id`` (the mask-aware encoder reads them).
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(RECORD_FIELDS))
    if unknown:  # most often a misspelt field, whose value would be ignored
        raise DataError(f"{where}: unknown field {unknown[0]!r} (a record's fields are {', '.join(RECORD_FIELDS)})")
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise DataError(f"{where}: field 'id' must be a non-empty string (got {record.get('id')!r})")
    if "conversations" not in record:
        raise DataError(f"{where}: missing field 'conversations'")
    messages = record["conversations"]
    validate_messages(messages, where=f"{where}: conversations")
    regions = record.get("regions") or []
    if not isinstance(regions, list):
        raise DataError(f"{where}: 'regions' must be a list")
    n_image = [m["value"].count(IMAGE_TOKEN) for m in messages]
    image = record.get("image")
    if image:
        if sum(n_image) != 1 or n_image[0] != 1:
            raise DataError(
                f"{where}: {IMAGE_TOKEN} must appear exactly once, in the first human turn "
                f"(found {sum(n_image)} time(s), {n_image[0]} in the first turn)"
            )
        for key in ("width", "height"):
            # The size is the frame of the region boxes: a record without regions may leave it null.
            if (regions or record.get(key) is not None) and not is_pixel_size(record.get(key)):
                raise DataError(f"{where}: field '{key}' must be a positive number (got {record.get(key)!r})")
        if image_root is not None and not os.path.isfile(os.path.join(image_root, image)):
            raise DataError(f"{where}: image file not found: {os.path.join(image_root, image)}")
    elif sum(n_image):
        raise DataError(f"{where}: the text has {IMAGE_TOKEN} but the record has no 'image'")
    n_bbox = sum(m["value"].count(BBOX_TOKEN) for m in messages)
    if n_bbox != len(regions):
        raise DataError(f"{where}: the text has {n_bbox} {BBOX_TOKEN} token(s) but the record has {len(regions)} region(s)")
    if regions and not image:
        raise DataError(f"{where}: regions need an image, but the record has no 'image'")
    for k, region in enumerate(regions):
        if not isinstance(region, dict) or "bbox" not in region:
            raise DataError(f"{where}: region {k} has no 'bbox'")
        if require_masks:
            _check_mask_fields(region, f"{where}: regions[{k}]")
    if regions:
        validate_boxes([r["bbox"] for r in regions], record["width"], record["height"], where=where, clip=True,
                       label="regions[{}].bbox")
