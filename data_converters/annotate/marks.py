"""Set-of-Mark rendering: every segment of a request outlined in its own colour, its number drawn inside it.

What the VLM must be able to read:

- **outlines** are unfilled: a band ``thickness`` pixels wide along the inside of each segment's border, so
  neighbouring outlines sit side by side instead of covering each other, and the segment's own pixels stay
  visible. Image borders are not outlined (a segment ends there anyway).
- **colours** come from a palette of far-apart colours; each segment takes the one that stands out most
  from the image pixels under its outline while differing from the colours of segments near it.
- **numbers** sit in a filled box of the outline's colour (black or white text, whichever contrasts) at the
  segment's deepest point (farthest from its border, found by repeated erosion: scipy is not a
  dependency), moved to the next-deepest place when that would cover an earlier number. A segment too
  small to hold its box (or less than twice its size) gets the box just outside its bounding box instead,
  so the box does not hide it.
- **order**: numbers follow the caller's order (largest segment first in the pipeline); small segments'
  numbers are placed last, where the large segments left room.

Large images are first downscaled to ``max_side`` (the VLM would downsample them anyway, and the marks'
sizes are relative to what it sees).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Far-apart, saturated colours (after Trubetskoy's "20 distinct colours"), plus white and black.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (255, 255, 255), (0, 0, 0),
)
# Bumped whenever the drawing changes in a way a VLM could read differently (part of the cache key).
MARK_STYLE_VERSION = 1
# The depth search runs on a copy of the segment's crop at most this many cells on its longer side.
_DEPTH_GRID = 96
_CANDIDATES = 64


@dataclass(frozen=True)
class MarkStyle:
    """Sizes of the marks, relative to the (possibly downscaled) image's shorter side."""

    max_side: int = 1024
    font_fraction: float = 0.045  # number height / shorter side
    min_font: int = 12
    max_font: int = 40
    outline_fraction: float = 1 / 200  # outline width / shorter side (at least 2 px)

    def fingerprint(self) -> dict:
        return {"version": MARK_STYLE_VERSION, **asdict(self)}


@dataclass
class Label:
    """Where one number was drawn: ``box`` is (x1, y1, x2, y2) in the marked image's pixels."""

    number: int
    segment_id: int
    colour: tuple[int, int, int]
    box: tuple[int, int, int, int]
    inside: bool  # the box lies entirely inside the segment


@dataclass
class MarkedImage:
    image: Image.Image  # RGB, the marks drawn in
    labels: list[Label]
    scale: float  # marked size / original size


def _erode(mask: np.ndarray, square: bool) -> np.ndarray:
    """One step of binary erosion with a 3x3 cross (``square=False``) or 3x3 square; outside counts as False."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    if square:
        out[1:, 1:] &= mask[:-1, :-1]
        out[1:, :-1] &= mask[:-1, 1:]
        out[:-1, 1:] &= mask[1:, :-1]
        out[:-1, :-1] &= mask[1:, 1:]
    return out


def inner_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` px of its border. Edge padding: the array's edge is no border."""
    core = mask
    for k in range(width):
        core = _erode(np.pad(core, 1, mode="edge"), square=bool(k % 2))[1:-1, 1:-1]
    return mask & ~core


def depth_map(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Approximate distance to the border for a boolean crop: ``(depth (h', w') int, cell size in px)``.

    The crop is pooled to at most ``_DEPTH_GRID`` cells a side (a cell is in when half its pixels are),
    padded with False (so the crop's own edge is a border), then eroded alternately with a cross and a
    square (an octagonal distance, close to Euclidean) until empty; depth counts the surviving steps.
    """
    h, w = mask.shape
    cell = max(1, math.ceil(max(h, w) / _DEPTH_GRID))
    if cell > 1:
        ph, pw = -h % cell, -w % cell
        padded = np.pad(mask, ((0, ph), (0, pw)))
        pooled = padded.reshape((h + ph) // cell, cell, (w + pw) // cell, cell).mean(axis=(1, 3)) >= 0.5
    else:
        pooled = mask
    current = np.pad(pooled, 1)
    depth = np.zeros(current.shape, dtype=np.int32)
    step = 0
    while current.any():
        depth += current
        current = _erode(current, square=bool(step % 2))
        step += 1
    return depth[1:-1, 1:-1], cell


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _luminance(c: Sequence[int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _pick_colour(ring_mean: np.ndarray, near: list[tuple[int, int, int]], used: dict) -> tuple[int, int, int]:
    """The palette colour farthest from the pixels under the outline, avoiding colours of nearby segments."""
    best, best_score = PALETTE[0], -math.inf
    for colour in PALETTE:
        score = float(np.linalg.norm(np.asarray(colour, dtype=np.float32) - ring_mean))
        if colour in near:
            score -= 1000.0
        score -= 20.0 * used.get(colour, 0)  # spread the palette when nothing else decides
        if score > best_score:
            best, best_score = colour, score
    return best


def _place_label(mask: np.ndarray, bbox: tuple[int, int, int, int], size: tuple[int, int],
                 image_size: tuple[int, int], placed: list[tuple[int, int, int, int]]) -> tuple[tuple[int, int, int, int], bool]:
    """A ``size`` box inside the segment (deepest free place), or just outside its bbox when none fits."""
    width, height = image_size
    bw, bh = size
    x0, y0, x1, y1 = bbox

    def box_at(cx: float, cy: float) -> tuple[int, int, int, int]:
        left = int(round(min(max(cx - bw / 2, 0), width - bw)))
        top = int(round(min(max(cy - bh / 2, 0), height - bh)))
        return left, top, left + bw, top + bh

    crop = mask[y0:y1, x0:x1]
    depth, cell = depth_map(crop)
    candidates = []
    if depth.any():
        ys, xs = np.nonzero(depth)
        cy_mean, cx_mean = ys.mean(), xs.mean()
        order = np.lexsort(((ys - cy_mean) ** 2 + (xs - cx_mean) ** 2, -depth[ys, xs]))[:_CANDIDATES]
        candidates = [(x0 + (xs[i] + 0.5) * cell, y0 + (ys[i] + 0.5) * cell) for i in order]
    else:  # thinner than one cell everywhere: its pixels nearest the centroid
        ys, xs = np.nonzero(crop)
        nearest = np.argsort((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)[:_CANDIDATES]
        candidates = [(x0 + xs[i] + 0.5, y0 + ys[i] + 0.5) for i in nearest]
    best, best_cover = None, -1.0
    for cx, cy in candidates:
        box = box_at(cx, cy)
        if any(_overlaps(box, p) for p in placed):
            continue
        cover = float(mask[box[1]:box[3], box[0]:box[2]].mean())
        if cover > best_cover:
            best, best_cover = box, cover
            if cover >= 1.0:
                return box, True
    if best is not None and best_cover >= 0.5 and bw * bh <= 0.5 * crop.sum():
        return best, False
    # Too small (or crowded): beside the bounding box, so the box does not hide the segment.
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    around = [(cx, y0 - bh / 2), (cx, y1 + bh / 2), (x0 - bw / 2, cy), (x1 + bw / 2, cy),
              (x0 - bw / 2, y0 - bh / 2), (x1 + bw / 2, y0 - bh / 2), (x0 - bw / 2, y1 + bh / 2), (x1 + bw / 2, y1 + bh / 2)]
    for cx2, cy2 in around:
        box = box_at(cx2, cy2)
        if not any(_overlaps(box, p) for p in placed):
            return box, False
    return (best if best is not None else box_at(*candidates[0])), False


def render_marks(image: Image.Image, segments: np.ndarray, numbered: Sequence[tuple[int, int]],
                 style: MarkStyle = MarkStyle()) -> MarkedImage:
    """Draw the marks of ``numbered`` = ``[(number, segment id), ...]`` onto a copy of ``image``.

    ``segments``: (H, W) integer panoptic ids, same size as ``image``. Segments not listed are left unmarked;
    a listed segment with no pixels is a ``ValueError`` (the caller filters those out first).
    """
    image = image.convert("RGB")
    if (image.height, image.width) != segments.shape:
        raise ValueError(f"image is {image.width}x{image.height} but the segment map is {segments.shape[1]}x{segments.shape[0]}")
    scale = min(1.0, style.max_side / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        segments = np.asarray(Image.fromarray(segments.astype(np.int32), mode="I").resize(size, Image.Resampling.NEAREST))
    width, height = image.size
    short = min(width, height)
    thickness = max(2, round(short * style.outline_fraction))
    font_size = int(min(style.max_font, max(style.min_font, round(short * style.font_fraction))))
    font = _font(font_size)
    pixels = np.array(image)
    source = pixels.copy()

    infos = []
    for number, segment_id in numbered:
        mask = segments == segment_id
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if rows.size == 0:
            raise ValueError(f"segment {segment_id} has no pixels")
        bbox = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        x0, y0, x1, y1 = bbox
        # a margin beyond the bbox, so only the image's own edge is padded as "more of the segment"
        m = thickness + 1
        cx0, cy0, cx1, cy1 = max(0, x0 - m), max(0, y0 - m), min(width, x1 + m), min(height, y1 + m)
        band = np.zeros_like(mask)
        band[cy0:cy1, cx0:cx1] = inner_band(mask[cy0:cy1, cx0:cx1], thickness)
        infos.append((number, segment_id, mask, bbox, band))

    # Colours: decided in drawing order, each avoiding those of segments whose (grown) boxes touch.
    used: dict = {}
    colours: list[tuple[int, int, int]] = []
    margin = thickness * 3
    for k, (_, _, mask, bbox, band) in enumerate(infos):
        ring = source[band] if band.any() else source[mask]
        grown = (bbox[0] - margin, bbox[1] - margin, bbox[2] + margin, bbox[3] + margin)
        near = [colours[j] for j in range(k) if _overlaps(grown, infos[j][3])]
        colour = _pick_colour(ring.reshape(-1, 3).mean(axis=0), near, used)
        used[colour] = used.get(colour, 0) + 1
        colours.append(colour)
        pixels[band] = colour

    marked = Image.fromarray(pixels)
    draw = ImageDraw.Draw(marked)
    pad = max(2, font_size // 6)
    placed: list[tuple[int, int, int, int]] = []
    labels = []
    for (number, segment_id, mask, bbox, _), colour in zip(infos, colours):
        text = str(number)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        size = (min(width, right - left + 2 * pad), min(height, bottom - top + 2 * pad))
        box, inside = _place_label(mask, bbox, size, (width, height), placed)
        placed.append(box)
        ink = (0, 0, 0) if _luminance(colour) > 140 else (255, 255, 255)
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour, outline=ink, width=1)
        draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, font=font, fill=ink, anchor="mm",
                  stroke_width=max(0, font_size // 24), stroke_fill=ink)
        labels.append(Label(number, segment_id, colour, box, inside))
    return MarkedImage(marked, labels, scale)
