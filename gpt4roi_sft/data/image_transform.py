"""Image -> square tensor for the CLIP tower, with the boxes and masks moved along.

GPT4RoI squashes the image to the tower's square size; LLaVA-1.5 pads it to a square with the mean colour
first. Both keep every pixel of every region in view (a centre crop would cut regions away). Boxes leave
this module as xyxy fractions of the square the tower sees, which is what the region encoder expects.

Resize modes:
  squash       resize to S x S with PIL bicubic;
  pad          pad to a square with the mean colour, then resize;
  clip_squash  GPT4RoI's inference transform (its demo, the Pix2Cap VG and ViP-Bench scripts, and its VCR and
               LLaVA training sets): CLIP's processor without the centre crop (shortest edge to S with PIL
               bicubic, long edge ``int(S * long / short)``, rescale, normalise), then a bilinear
               (``align_corners=False``) resize of the normalised tensor to S x S. Boxes are fractions of the
               original image, as in a plain squash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gpt4roi_sft.constants import CLIP_MEAN, CLIP_STD
from gpt4roi_sft.data.schema import validate_boxes
from gpt4roi_sft.errors import BoxError

RESIZE_MODES = ("squash", "pad", "clip_squash")


@dataclass
class TransformedImage:
    pixel_values: torch.Tensor  # (3, S, S) float32, CLIP-normalised
    boxes: torch.Tensor  # (N, 4) xyxy fractions of the S x S square, in [0, 1]
    masks: Optional[torch.Tensor]  # (N, S, S) float32 in {0, 1}, or None


@dataclass
class ImageTransform:
    """Resize (``squash`` or ``pad``) to ``size`` x ``size``, normalise, and map boxes/masks alike."""

    size: int = 224
    resize_mode: str = "squash"
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")

    def _square_geometry(self, width: int, height: int):
        """Return (scale_x, scale_y, offset_x, offset_y) mapping original pixels to the square's pixels."""
        s = float(self.size)
        if self.resize_mode in ("squash", "clip_squash"):
            return s / width, s / height, 0.0, 0.0
        side = max(width, height)
        scale = s / side
        return scale, scale, (side - width) / 2 * scale, (side - height) / 2 * scale

    def _normalise(self, image: Image.Image) -> torch.Tensor:
        arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (arr - mean) / std

    def image_to_tensor(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        if self.resize_mode == "clip_squash":
            short, long = min(w, h), max(w, h)
            new_long = int(self.size * long / short)
            image = image.resize((self.size, new_long) if w <= h else (new_long, self.size), Image.BICUBIC)
            tensor = self._normalise(image)[None]
            return F.interpolate(tensor, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        if self.resize_mode == "pad" and w != h:
            side = max(w, h)
            fill = tuple(int(round(m * 255)) for m in self.mean)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image = canvas
        return self._normalise(image.resize((self.size, self.size), Image.BICUBIC))

    def map_boxes(self, boxes: np.ndarray, width: int, height: int) -> torch.Tensor:
        """Pixel xyxy boxes of the original image -> xyxy fractions of the output square."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        sx, sy, ox, oy = self._square_geometry(width, height)
        mapped = boxes * np.array([sx, sy, sx, sy], dtype=np.float32) + np.array([ox, oy, ox, oy], dtype=np.float32)
        return torch.from_numpy(np.clip(mapped / self.size, 0.0, 1.0))

    def map_masks(self, masks: np.ndarray, width: int, height: int) -> torch.Tensor:
        """(N, H, W) binary masks of the original image -> (N, S, S) float masks on the output square."""
        out = []
        for m in masks:
            img = Image.fromarray((np.asarray(m) > 0).astype(np.uint8) * 255)
            if self.resize_mode == "pad" and width != height:
                side = max(width, height)
                canvas = Image.new("L", (side, side), 0)
                canvas.paste(img, ((side - width) // 2, (side - height) // 2))
                img = canvas
            img = img.resize((self.size, self.size), Image.NEAREST)
            out.append(torch.from_numpy((np.asarray(img) > 127).astype(np.float32)))
        if not out:
            return torch.zeros((0, self.size, self.size), dtype=torch.float32)
        return torch.stack(out)

    def __call__(self, image: Image.Image, boxes=None, masks=None, where: str = "", clip: bool = False) -> TransformedImage:
        """Transform one image with its pixel xyxy ``boxes`` (validated, see :func:`validate_boxes`)."""
        width, height = image.size
        boxes = validate_boxes(boxes if boxes is not None else [], width, height, where=where, clip=clip)
        mask_tensor = None
        if masks is not None:
            if len(masks) != len(boxes):
                raise BoxError(f"{where}: {len(masks)} masks for {len(boxes)} boxes")
            mask_tensor = self.map_masks(masks, width, height)
        return TransformedImage(self.image_to_tensor(image), self.map_boxes(boxes, width, height), mask_tensor)
