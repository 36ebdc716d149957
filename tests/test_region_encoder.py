"""RegionEncoder: GPT4RoI's multi-level RoI design, roi_align convention, mask-aware pooling."""

import pytest
import torch
from PIL import Image

from gpt4roi_sft.data.image_transform import ImageTransform
from gpt4roi_sft.model.region_encoder import RegionEncoder, pool_boxes

IMAGE = 112
GRID = 8  # patches per side (112 px / 14)


def _encoder(mode="box", **kw):
    torch.manual_seed(0)
    enc = RegionEncoder(vision_hidden_size=16, hidden_size=16, output_size=24, image_size=IMAGE,
                        roi_output_size=4, fuse_rounds=2, gn_groups=4, mode=mode, **kw)
    enc.init_weights()
    return enc.eval()


def _layer_features(images=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(images, GRID * GRID, 16, generator=g) for _ in range(4)]


def test_shallowest_level_gets_the_largest_map():
    maps = _encoder().multi_level_maps(_layer_features())
    assert [m.shape[-1] for m in maps] == [8 * GRID, 4 * GRID, 2 * GRID, GRID]
    assert all(m.shape[1] == 16 for m in maps)


def test_one_embedding_per_region_in_image_then_box_order():
    enc = _encoder()
    feats = _layer_features(images=2)
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]), torch.tensor([[0.1, 0.2, 0.3, 0.9]])]
    out = enc(feats, boxes)
    assert out.shape == (3, 24)
    alone = enc([f[1:] for f in feats], [boxes[1]])
    torch.testing.assert_close(out[2:], alone, atol=1e-5, rtol=1e-5)


def test_roi_align_box_over_a_coloured_patch_pools_that_patch():
    # 4x4 patches of 28 px, each a unique colour; a box over patch k must pool closest to colour k.
    colours = torch.rand(16, 3, generator=torch.Generator().manual_seed(0)) * 255
    img = Image.new("RGB", (IMAGE, IMAGE))
    for k, c in enumerate(colours):
        r, q = divmod(k, 4)
        img.paste(tuple(int(v) for v in c), (q * 28, r * 28, q * 28 + 28, r * 28 + 28))
    pixels = torch.from_numpy(__import__("numpy").asarray(img, dtype="float32")).permute(2, 0, 1)[None]
    for k in (0, 5, 10, 15):
        r, q = divmod(k, 4)
        box = torch.tensor([[q / 4, r / 4, (q + 1) / 4, (r + 1) / 4]])
        pooled = pool_boxes(pixels, [box], image_size=IMAGE, output_size=4).mean((2, 3))[0]
        assert int(torch.cdist(pooled[None], colours).argmin()) == k


def test_roi_align_is_pixel_aligned_whole_box_is_the_image_mean():
    # aligned=True (mmcv's default, used by GPT4RoI): box [0, S] covers pixel centres 0.5 .. S-0.5 exactly.
    fmap = torch.arange(64.0).reshape(1, 1, 8, 8)
    pooled = pool_boxes(fmap, [torch.tensor([[0.0, 0.0, 1.0, 1.0]])], image_size=IMAGE, output_size=2)
    assert pooled.mean().item() == pytest.approx(fmap.mean().item(), abs=1e-4)


def test_moving_a_box_changes_its_embedding():
    enc, feats = _encoder(), _layer_features()
    a = enc(feats, [torch.tensor([[0.0, 0.0, 0.5, 0.5]])])
    b = enc(feats, [torch.tensor([[0.5, 0.5, 1.0, 1.0]])])
    assert (a - b).abs().max() > 1e-4


def test_mask_mode_needs_masks():
    with pytest.raises(ValueError, match="mask"):
        _encoder("mask")(_layer_features(), [torch.tensor([[0.0, 0.0, 1.0, 1.0]])])


@pytest.mark.parametrize("mode", ["mask", "box+mask"])
def test_mask_aware_modes_tell_apart_two_masks_with_one_box(mode):
    enc, feats = _encoder(mode), _layer_features()
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    left = torch.zeros(1, IMAGE, IMAGE)
    left[:, :, : IMAGE // 2] = 1
    right = 1 - left
    a, b = enc(feats, [box], [left]), enc(feats, [box], [right])
    assert (a - b).abs().max() > 1e-4


def test_transform_boxes_feed_the_encoder_as_fractions():
    # boxes from ImageTransform are fractions of the square; the encoder scales them to pixels itself.
    out = ImageTransform(size=IMAGE)(Image.new("RGB", (224, 112)), [[0, 0, 112, 56]])
    torch.testing.assert_close(out.boxes, torch.tensor([[0.0, 0.0, 0.5, 0.5]]))


@pytest.mark.parametrize("mode", ["box", "box+mask"])
def test_many_images_are_encoded_in_passes_with_the_same_result(mode, monkeypatch):
    """A generation batch of hundreds of distinct images is split so no map passes CUDA's 2**31-element limit."""
    import gpt4roi_sft.model.region_encoder as region_encoder

    enc, feats = _encoder(mode), _layer_features(images=5)
    boxes = [torch.tensor([[0.1 * i, 0.0, 0.6, 0.5 + 0.1 * i]] * (1 + i % 2)) for i in range(5)]
    masks = [torch.zeros(len(b), IMAGE, IMAGE).index_fill_(2, torch.arange(10 * i, 10 * i + 40), 1) for i, b in enumerate(boxes)]
    whole = enc(feats, boxes, masks)
    finest = 16 * GRID * GRID * 64
    monkeypatch.setattr(region_encoder, "MAX_MAP_ELEMENTS", 2 * finest)
    assert enc.images_per_pass(feats) == 2
    calls = []
    monkeypatch.setattr(enc, "multi_level_maps", lambda f, inner=enc.multi_level_maps: calls.append(len(f[0])) or inner(f))
    torch.testing.assert_close(enc(feats, boxes, masks), whole, atol=1e-5, rtol=1e-5)
    assert calls == [2, 2, 1]


def test_a_bf16_encoder_pools_each_of_300_images_own_box_where_the_fp32_box_lies():
    # bf16 holds integers exactly only up to 256 and a fraction to 3 digits: the rois must stay fp32
    enc = _encoder()
    feats = _layer_features(images=300)
    boxes = [torch.tensor([[0.1 + 0.001 * (i % 7), 0.2, 0.61, 0.93]]) for i in range(300)]
    out = enc.to(torch.bfloat16)([f.to(torch.bfloat16) for f in feats], boxes)
    for i in (257, 299):
        alone = enc([f[i:i + 1].to(torch.bfloat16) for f in feats], [boxes[i]])
        torch.testing.assert_close(out[i:i + 1], alone, atol=0, rtol=0)
    maps = enc.multi_level_maps([f[:1].to(torch.bfloat16) for f in feats])
    pooled = enc._box_features(maps, [boxes[0]])
    rounded = enc._box_features(maps, [boxes[0].to(torch.bfloat16)])
    assert not torch.equal(pooled, rounded)  # the fp32 box pools other samples than its bf16 rounding
    assert torch.equal(enc([f[:1].to(torch.bfloat16) for f in feats], [boxes[0]]),
                       enc.to_llm(enc.box_embed(boxes[0].to(torch.bfloat16)) + pooled))
