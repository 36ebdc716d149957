"""GPT4RoI's multi-level RoI encoder: one LLM token per region box (or mask).

Follows ``MLVLROIQueryModule`` of jshilong/GPT4RoI (gpt4roi/models/layers.py); sub-module names mirror
it (``mlvl_fuse.input_conv``, ``mlvl_fuse.fuse_convs.{i}.conv/gn``, ``pconvs``, ``flatten_linear``) so the
released checkpoint maps one to one (see :mod:`gpt4roi_sft.model.checkpoint_keys`).

Pipeline for four ViT layers of patch features, each (I, G*G, C_vit) with G the patch grid:
  1. reshape to maps (I, C_vit, G, G); bilinearly resize (align_corners=True) to 8G, 4G, 2G, G: the
     shallowest layer gets the largest map, so fine detail survives where it is still present;
  2. concatenate two coordinate channels (x, y in [-1, 1]), per-level 1x1 conv to C;
  3. ``fuse_rounds`` rounds of cross-level mixing: each level keeps C/2 own channels, takes C/4 from the
     next-deeper and C/4 from the next-shallower level (resized), then a 3x3 conv + GroupNorm + ReLU
     shared by all levels within the round;
  4. ``torchvision.ops.roi_align`` per level, output R x R, ``sampling_ratio=2``, ``aligned=True``
     (mmcv's RoIAlign default, which GPT4RoI used: pixel centres sit at +0.5, so a box [0, S] covers the
     whole map), boxes in pixels of the S x S image with ``spatial_scale = level_size / S``;
  5. per-level 3x3 conv, sum over levels, ReLU, flatten (C*R*R) -> Linear(C);
  6. plus a box-coordinate MLP 4 -> C/4 -> C (ReLU + LayerNorm after each), then Linear(C -> LLM width).

Mask-aware modes average the fused features of each level under the region's binary mask (resized to the
level, area-weighted), sum the levels, and apply ``mask_linear`` (C -> C); ``mask`` uses that instead of
the RoIAlign feature, ``box+mask`` adds the two. The box MLP is used in every mode (it is the region's
position; for masks the mask's bounding box is the natural input).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

NUM_LEVELS = 4
# Elements of the finest multi-level map built in one pass (see RegionEncoder.images_per_pass); 2**31 is where
# CUDA's upsampling kernels stop, and half of it keeps one pass of a large generation batch a few GB.
MAX_MAP_ELEMENTS = 2**30


def pool_boxes(fmap: torch.Tensor, boxes: list[torch.Tensor], image_size: int, output_size: int) -> torch.Tensor:
    """RoIAlign of xyxy-fraction ``boxes`` (I tensors (N_i, 4)) on ``fmap`` (I, C, H, W) -> (sum N_i, C, R, R).

    mmcv semantics as in GPT4RoI: boxes in pixels of the ``image_size`` square, ``spatial_scale`` =
    map side / image side, ``sampling_ratio=2``, ``aligned=True`` (pixel centres at +0.5).
    """
    rois = torch.cat(
        [torch.cat([b.new_full((len(b), 1), float(i)), b * image_size], dim=1) for i, b in enumerate(boxes)]
    ).float()
    return roi_align(
        fmap.float(),
        rois,
        output_size=output_size,
        spatial_scale=fmap.shape[-1] / image_size,
        sampling_ratio=2,
        aligned=True,
    ).to(fmap.dtype)


class ConvGNReLU(nn.Module):
    """3x3 conv (no bias) + GroupNorm + ReLU; mmcv's ``ConvModule`` with a GN norm, same parameter names."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gn(self.conv(x)))


class MultiLevelFuse(nn.Module):
    """Coordinate channels, per-level 1x1 conv, then rounds of cross-level channel mixing."""

    def __init__(self, input_dim: int, hidden_size: int, num_rounds: int, gn_groups: int):
        super().__init__()
        self.shuffle_channels = hidden_size // 4
        self.own_channels = hidden_size - 2 * self.shuffle_channels
        self.input_conv = nn.ModuleList(nn.Conv2d(input_dim + 2, hidden_size, 1) for _ in range(NUM_LEVELS))
        self.fuse_convs = nn.ModuleList(ConvGNReLU(hidden_size, gn_groups) for _ in range(num_rounds))

    @staticmethod
    def coordinate_channels(feat: torch.Tensor) -> torch.Tensor:
        """(I, 2, H, W): x then y, each linearly spaced in [-1, 1]."""
        n, _, h, w = feat.shape
        ys = torch.linspace(-1, 1, h, device=feat.device, dtype=feat.dtype)
        xs = torch.linspace(-1, 1, w, device=feat.device, dtype=feat.dtype)
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([x, y]).unsqueeze(0).expand(n, -1, -1, -1)

    def _mix(self, feats: list[torch.Tensor], conv: ConvGNReLU) -> list[torch.Tensor]:
        out = []
        last = len(feats) - 1
        for lvl, target in enumerate(feats):
            deeper, shallower = feats[min(lvl + 1, last)], feats[max(lvl - 1, 0)]
            size = target.shape[-2:]
            own = target[:, : self.own_channels]
            from_deeper = deeper[:, self.own_channels + self.shuffle_channels :]
            from_shallower = shallower[:, self.own_channels : self.own_channels + self.shuffle_channels]
            from_deeper = F.interpolate(from_deeper, size=size, mode="bilinear", align_corners=True)
            from_shallower = F.interpolate(from_shallower, size=size, mode="bilinear", align_corners=True)
            out.append(conv(torch.cat([own, from_deeper, from_shallower], dim=1)))
        return out

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = [conv(torch.cat([f, self.coordinate_channels(f)], dim=1)) for conv, f in zip(self.input_conv, feats)]
        for conv in self.fuse_convs:
            feats = self._mix(feats, conv)
        return feats


class RegionEncoder(nn.Module):
    """Multi-level ViT features + boxes (and optional masks) -> one LLM-width embedding per region.

    Args:
        vision_hidden_size: ViT width C_vit.
        hidden_size: encoder width C (GPT4RoI: 1024).
        output_size: LLM hidden size.
        image_size: side S of the square image, in pixels (boxes are scaled to it for RoIAlign).
        roi_output_size: RoIAlign output side R (GPT4RoI: 14).
        fuse_rounds: rounds of cross-level mixing (GPT4RoI: 5).
        gn_groups: GroupNorm groups (GPT4RoI: 64).
        mode: ``box``, ``mask`` or ``box+mask``.

    ``channels_last`` (a run-time switch, default False) runs the convolutions on channels-last (NHWC) activations,
    the layout cuDNN's bf16 tensor-core kernels work in; the weights keep their layout (ZeRO flattens them anyway)
    and the results are the same.
    """

    channels_last = False

    def __init__(
        self,
        vision_hidden_size: int,
        hidden_size: int,
        output_size: int,
        image_size: int,
        roi_output_size: int = 14,
        fuse_rounds: int = 5,
        gn_groups: int = 64,
        mode: str = "box",
    ):
        super().__init__()
        self.image_size = image_size
        self.roi_output_size = roi_output_size
        self.mode = mode
        self.uses_box = mode in ("box", "box+mask")
        self.uses_mask = mode in ("mask", "box+mask")
        self.mlvl_fuse = MultiLevelFuse(vision_hidden_size, hidden_size, fuse_rounds, gn_groups)
        if self.uses_box:
            self.pconvs = nn.ModuleList(nn.Conv2d(hidden_size, hidden_size, 3, padding=1) for _ in range(NUM_LEVELS))
            self.flatten_linear = nn.Linear(hidden_size * roi_output_size**2, hidden_size)
        if self.uses_mask:
            self.mask_linear = nn.Linear(hidden_size, hidden_size)
        box_hidden = max(hidden_size // 4, 4)
        self.box_embed = nn.Sequential(
            nn.Linear(4, box_hidden),
            nn.ReLU(),
            nn.LayerNorm(box_hidden),
            nn.Linear(box_hidden, hidden_size),
            nn.ReLU(),
            nn.LayerNorm(hidden_size),
        )
        self.to_llm = nn.Linear(hidden_size, output_size)

    @classmethod
    def from_config(cls, config) -> "RegionEncoder":
        """The encoder a :class:`~gpt4roi_sft.model.configuration.GPT4RoIConfig` describes: its ``region_*``
        fields, the tower's width and image size, and the LLM's width."""
        return cls(
            vision_hidden_size=config.vision_config.hidden_size,
            hidden_size=config.region_hidden_size,
            output_size=config.text_config.hidden_size,
            image_size=config.image_size,
            roi_output_size=config.roi_output_size,
            fuse_rounds=config.region_fuse_rounds,
            gn_groups=config.region_gn_groups,
            mode=config.region_mode,
        )

    def init_weights(self):
        """GPT4RoI's init: convs ~ N(0, 0.01), zero bias; linears and norms keep PyTorch defaults."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def multi_level_maps(self, layer_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Four (I, G*G, C_vit) patch features, shallowest first -> fused maps (I, C, 8G..G)."""
        maps = []
        for lvl, feat in enumerate(layer_features):
            n, p, c = feat.shape
            g = int(round(p**0.5))
            if g * g != p:
                raise ValueError(f"region level {lvl}: {p} patches do not form a square grid")
            side = g * 2 ** (NUM_LEVELS - 1 - lvl)
            grid = feat.transpose(1, 2).reshape(n, c, g, g)
            maps.append(self._layout(F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=True)))
        return self.mlvl_fuse(maps)

    def images_per_pass(self, layer_features: Sequence[torch.Tensor]) -> int:
        """How many images' maps one pass builds: the finest map of all of them stays under ``MAX_MAP_ELEMENTS``.

        A generation batch of a few hundred distinct images (one region each) would otherwise build a map of
        more than 2**31 elements, which CUDA's upsampling kernels refuse, and hold it all in memory at once."""
        _, p, c = layer_features[0].shape
        finest = c * p * 4 ** (NUM_LEVELS - 1)
        return max(1, MAX_MAP_ELEMENTS // finest)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _box_features(self, maps: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        pooled = [conv(self._layout(pool_boxes(fmap, boxes, self.image_size, self.roi_output_size)))
                  for conv, fmap in zip(self.pconvs, maps)]
        fused = F.relu(torch.stack(pooled).sum(0))
        return self.flatten_linear(fused.flatten(1))

    def _mask_features(self, maps: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        levels = []
        for fmap in maps:
            per_image = []
            for i, m in enumerate(masks):
                if len(m) == 0:
                    continue
                small = F.interpolate(m[:, None].to(fmap.dtype), size=fmap.shape[-2:], mode="area")[:, 0]
                weight = small / small.flatten(1).sum(1).clamp_min(1e-6)[:, None, None]
                per_image.append(torch.einsum("nhw,chw->nc", weight, fmap[i]))
            levels.append(torch.cat(per_image))
        return self.mask_linear(torch.stack(levels).sum(0))

    def forward(
        self,
        layer_features: Sequence[torch.Tensor],
        boxes: list[torch.Tensor],
        masks: Optional[list[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Encode every region of every image.

        Args:
            layer_features: 4 tensors (I, G*G, C_vit), patch features of the region layers, shallowest first.
            boxes: I tensors (N_i, 4), xyxy fractions of the square image.
            masks: I tensors (N_i, S, S) in {0, 1}; required by the ``mask`` and ``box+mask`` modes.
        Returns:
            (sum N_i, output_size): region embeddings in image order, then box order.
        """
        if len(boxes) != layer_features[0].shape[0]:
            raise ValueError(f"{len(boxes)} box lists for {layer_features[0].shape[0]} images")
        step = self.images_per_pass(layer_features)
        if len(boxes) > step:  # regions come out in image order, so chunks of images concatenate in order
            return torch.cat([self(
                [f[i:i + step] for f in layer_features], boxes[i:i + step], None if masks is None else masks[i:i + step])
                for i in range(0, len(boxes), step)])
        maps = self.multi_level_maps(layer_features)
        all_boxes = torch.cat(list(boxes)).to(maps[0].dtype)
        feats = self.box_embed(all_boxes)
        if self.uses_box:
            # RoIAlign takes the fp32 boxes: in bf16 a box edge would move by up to 0.66 px at 336 px, and an image
            # index above 256 in the rois' first column would round to another image's
            feats = feats + self._box_features(maps, [b.float() for b in boxes])
        if self.uses_mask:
            if masks is None or len(masks) != len(boxes):
                raise ValueError(f"region_mode {self.mode!r} needs one mask tensor per image, got {masks and len(masks)}")
            feats = feats + self._mask_features(maps, list(masks))
        return self.to_llm(feats)


__all__ = ["RegionEncoder", "pool_boxes", "MultiLevelFuse", "ConvGNReLU"]
