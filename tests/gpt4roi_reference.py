"""A reference GPT4RoI, written for the tests after jshilong/GPT4RoI's code and independent of this project's model.

It reads a checkpoint directory the way GPT4RoI's ``SPILlavaMPTForCausalLM`` does (``config.json`` with ``mm_*``
fields, ``model.*`` / ``lm_head`` / ``model.mm_projector`` / ``model.spi_module`` weights, the CLIP tower from
``mm_vision_tower``) and runs its forward in its own module order and arithmetic:

- text: ``preprocess_multimodal`` (``<image>`` -> ``<im_start>`` + 256 ``<im_patch>`` + ``<im_end>``) and the
  v0 ``preprocess`` (system + ``\\n\\n``, ``### Human: ...\\n`` / ``### Assistant: ...\\n`` turns, then ``### ``);
- image: CLIP's processor without centre crop, then a bilinear resize of the normalised tensor to 224 x 224
  (GPT4RoI's inference, its VCR and LLaVA datasets, the Pix2Cap evaluation scripts); boxes divided by w, h;
- ``LlavaLlamaModel`` embedding: ``hidden_states[-2][:, 1:]`` through ``mm_projector`` spliced after
  ``<im_start>``; ``hidden_states[-2::-3]``, reversed, last 4, into ``MLVLROIQueryModule``; region features
  written over the ``<bbox>`` embeddings by mask arithmetic;
- ``MLVLFuseModule`` (coordinate channels, 1x1 convs, shuffle rounds with ConvModule = conv + GN + ReLU) and
  ``MlvlRoIExtractor`` with mmcv's RoIAlign (``aligned=True``, ``sampling_ratio=2``, ``spatial_scale`` =
  1 / stride for strides 14/8, 14/4, 14/2, 14), re-implemented here after mmcv 1.4.7's kernel
  (``bilinear_interpolate`` and ``roi_align_forward``), not torchvision's;
- the LLaMA decoder (``transformers``' ``LlamaModel`` as in GPT4RoI) and ``lm_head``.

Sizes GPT4RoI hard-codes for ViT-L / LLaMA-7B (1024, 4096, 256) are parameters here so tiny models fit;
the 16 x 16 patch grid, 224 px, 14 x 14 RoIAlign and GroupNorm(64) stay as in GPT4RoI.
"""

from __future__ import annotations

import glob
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


# ----------------------------------------------------------------------------------------------- text
def preprocess_multimodal(value: str, image_token_len: int = 256) -> str:
    return value.replace("<image>", "<im_start>" + "<im_patch>" * image_token_len + "<im_end>")


def preprocess_v0(conversation: list) -> str:
    """``_add_speaker_and_signal`` of GPT4RoI's train.py."""
    text = f"{SYSTEM}\n\n"
    for sentence in conversation:
        role = {"human": "Human", "gpt": "Assistant"}[sentence["from"]]
        text += "### " + role + ": " + sentence["value"] + "\n"
    return text + "### "


# ---------------------------------------------------------------------------------------------- image
def gpt4roi_image(image, size: int = 224) -> torch.Tensor:
    """GPT4RoI's inference image: CLIP processor (no centre crop) then bilinear to ``size`` x ``size``."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size})
    pixels = processor(image, do_center_crop=False, return_tensors="pt")["pixel_values"][0]
    return F.interpolate(pixels[None], size=(size, size), mode="bilinear", align_corners=False)[0]


# --------------------------------------------------------------------------------- mmcv RoIAlign (CPU)
def _bilinear_axis(coord: torch.Tensor, size: int):
    """mmcv's ``bilinear_interpolate`` along one axis: (valid, low, high, w_low, w_high) for sample coords."""
    valid = (coord >= -1.0) & (coord <= size)
    c = coord.clamp(min=0)
    low = c.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    c = torch.where(at_end, low.to(c.dtype), c)
    frac = c - low.to(c.dtype)
    return valid, low, high, 1.0 - frac, frac


def mmcv_roi_align(feat: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
                   sampling_ratio: int = 2, aligned: bool = True) -> torch.Tensor:
    """mmcv.ops.RoIAlign (avg pool): feat (N, C, H, W), rois (R, 5) [batch, x1, y1, x2, y2] -> (R, C, P, P)."""
    _, channels, height, width = feat.shape
    out = feat.new_zeros(len(rois), channels, output_size, output_size)
    offset = 0.5 if aligned else 0.0
    for r, roi in enumerate(rois):
        b = int(roi[0])
        x1, y1, x2, y2 = (roi[1:] * spatial_scale - offset).tolist()
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / output_size, roi_h / output_size
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / output_size)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / output_size)
        ph = torch.arange(output_size, dtype=torch.float32)
        iy = torch.arange(grid_h, dtype=torch.float32)
        ix = torch.arange(grid_w, dtype=torch.float32)
        ys = (y1 + ph[:, None] * bin_h + (iy[None, :] + 0.5) * bin_h / grid_h).reshape(-1)
        xs = (x1 + ph[:, None] * bin_w + (ix[None, :] + 0.5) * bin_w / grid_w).reshape(-1)
        vy, yl, yh, wyl, wyh = _bilinear_axis(ys, height)
        vx, xl, xh, wxl, wxh = _bilinear_axis(xs, width)
        f = feat[b]
        val = (wyl[:, None] * wxl[None, :] * f[:, yl][:, :, xl] + wyl[:, None] * wxh[None, :] * f[:, yl][:, :, xh]
               + wyh[:, None] * wxl[None, :] * f[:, yh][:, :, xl] + wyh[:, None] * wxh[None, :] * f[:, yh][:, :, xh])
        val = val * (vy[:, None] & vx[None, :])
        val = val.reshape(channels, output_size, grid_h, output_size, grid_w)
        out[r] = val.sum(dim=(2, 4)) / max(grid_h * grid_w, 1)
    return out


class RoIAlign(nn.Module):
    def __init__(self, output_size: int, spatial_scale: float, sampling_ratio: int = 2, aligned: bool = True):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, feat, rois):
        return mmcv_roi_align(feat, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


# ------------------------------------------------------------------------------ the region module
class ConvModule(nn.Module):
    """mmcv ConvModule(3x3, norm_cfg=GN(64)): conv without bias (bias='auto'), then GN, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.gn = nn.GroupNorm(64, channels)

    def forward(self, x):
        return F.relu(self.gn(self.conv(x)))


class MLVLFuseModule(nn.Module):
    def __init__(self, input_dims: int, embed_dims: int, num_levels: int = 4, num_fuse: int = 5):
        super().__init__()
        self.embed_dims, self.num_levels = embed_dims, num_levels
        self.shuffle_channles = embed_dims // 4
        self.fuse_lvl_list = [(lvl, min(lvl + 1, num_levels - 1), max(lvl - 1, 0)) for lvl in range(num_levels)]
        self.remain_chs = embed_dims - self.shuffle_channles * 2
        self.input_conv = nn.ModuleList(nn.Conv2d(input_dims + 2, embed_dims, 1) for _ in range(num_levels))
        self.fuse_convs = nn.ModuleList(ConvModule(embed_dims) for _ in range(num_fuse))

    @staticmethod
    def generate_coordinate(featmap_sizes, device):
        x_range = torch.linspace(-1, 1, featmap_sizes[-1], device=device)
        y_range = torch.linspace(-1, 1, featmap_sizes[-2], device=device)
        y, x = torch.meshgrid(y_range, x_range, indexing="ij")
        y = y.expand([featmap_sizes[0], 1, -1, -1])
        x = x.expand([featmap_sizes[0], 1, -1, -1])
        return torch.cat([x, y], 1)

    def _single_shuffle(self, inputs, conv_module):
        fused = []
        for tar_lvl, top_lvl, dow_lvl in self.fuse_lvl_list:
            tar, top, down = inputs[tar_lvl], inputs[top_lvl], inputs[dow_lvl]
            remain = tar[:, : self.remain_chs]
            from_top = top[:, self.remain_chs:][:, self.shuffle_channles:]
            from_top = F.interpolate(from_top.to(torch.float32), size=tar.shape[-2:], mode="bilinear", align_corners=True)
            from_down = down[:, self.remain_chs:][:, : self.shuffle_channles]
            from_down = F.interpolate(from_down.to(torch.float32), size=tar.shape[-2:], mode="bilinear", align_corners=True)
            fused.append(torch.cat([remain, from_top, from_down], dim=1))
        return [conv_module(item) for item in fused]

    def forward(self, inputs):
        inputs = [torch.cat([f, self.generate_coordinate(f.shape, f.device)], dim=1) for f in inputs]
        inputs = [self.input_conv[lvl](item) for lvl, item in enumerate(inputs)]
        for conv_m in self.fuse_convs:
            inputs = self._single_shuffle(inputs, conv_m)
        return inputs


class MlvlRoIExtractor(nn.Module):
    def __init__(self, embed_dims: int, out_dims: int, pos_dims: int, output_size: int = 14,
                 featmap_strides=(14 / 8, 14 / 4, 14 / 2, 14)):
        super().__init__()
        self.roi_layers = nn.ModuleList(RoIAlign(output_size, 1 / s, sampling_ratio=2) for s in featmap_strides)
        self.out_channels = embed_dims
        self.output_size = output_size
        self.pconvs = nn.ModuleList(nn.Conv2d(embed_dims, embed_dims, 3, stride=1, padding=1)
                                    for _ in range(len(featmap_strides)))
        self.pos_embedd = nn.Sequential(nn.Linear(4, pos_dims), nn.ReLU(inplace=True), nn.LayerNorm(pos_dims),
                                        nn.Linear(pos_dims, embed_dims), nn.ReLU(inplace=True), nn.LayerNorm(embed_dims))
        self.updims = nn.Linear(embed_dims, out_dims)
        self.flatten_linear = nn.Linear(embed_dims * output_size ** 2, embed_dims)

    def forward(self, feats, rois):
        num_imgs = len(rois)
        pos_embedd = self.pos_embedd(torch.cat(rois, dim=0))
        new_rois = []
        for img_id, single in enumerate(rois):
            single = single * 224
            new_rois.append(torch.cat([single.new_ones(len(single))[:, None] * img_id, single], dim=1))
        rois = torch.cat(new_rois)
        roi_feats = feats[0].new_zeros(len(feats), rois.size(0), self.out_channels, self.output_size, self.output_size)
        for i in range(len(feats)):
            roi_feats[i] = self.roi_layers[i](feats[i].to(torch.float32), rois.to(torch.float32))
        fused = F.relu(sum(self.pconvs[i](roi_feats[i]) for i in range(len(feats))))
        fused = self.flatten_linear(fused.flatten(1, -1)) + pos_embedd
        fused = self.updims(fused)
        return [fused[rois[:, 0] == i] for i in range(num_imgs)]


class MLVLROIQueryModule(nn.Module):
    def __init__(self, embed_dims: int, out_dims: int, pos_dims: int, num_levels: int = 4):
        super().__init__()
        self.mlvl_fuse = MLVLFuseModule(embed_dims, embed_dims, num_levels, num_fuse=5)
        self.roi_align = MlvlRoIExtractor(embed_dims, out_dims, pos_dims)

    def forward(self, mlvl_feats, bboxes):
        h = w = int(math.sqrt(mlvl_feats[0].shape[1]))
        assert h == 16 and w == 16
        b, c = mlvl_feats[0].shape[0], mlvl_feats[0].shape[-1]
        mlvl_feats = [item.reshape(b, h, w, c).permute(0, 3, 1, 2) for item in mlvl_feats]
        base = mlvl_feats[0].shape[-2:]
        to_shape = [(base[0] * 2 ** level, base[1] * 2 ** level) for level in range(len(mlvl_feats))][::-1]
        mlvl_feats = [F.interpolate(f, size=s, mode="bilinear", align_corners=True) for f, s in zip(mlvl_feats, to_shape)]
        return self.roi_align(self.mlvl_fuse(mlvl_feats), bboxes)


# ------------------------------------------------------------------------------------- the model
def read_checkpoint(path: str) -> dict:
    state = {}
    for f in sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))):
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


class ReferenceGPT4RoI(nn.Module):
    """``SPILlavaMPTForCausalLM`` for a checkpoint directory: ``forward(input_ids, images, bboxes) -> logits``."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        cfg = json.load(open(os.path.join(path, "config.json")))
        self.config = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.vision_tower = CLIPVisionModel.from_pretrained(cfg["mm_vision_tower"]).eval()
        llama_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
                      "vocab_size", "hidden_act")
        self.llama = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in llama_keys}, attn_implementation="eager"))
        state = read_checkpoint(path)
        vit = self.vision_tower.config.hidden_size
        self.mm_projector = nn.Linear(cfg["mm_hidden_size"], cfg["hidden_size"])
        pos_dims = state["model.spi_module.roi_align.pos_embedd.0.weight"].shape[0]
        self.spi_module = MLVLROIQueryModule(vit, cfg["hidden_size"], pos_dims)
        take = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
        self.mm_projector.load_state_dict(take("model.mm_projector."))
        self.spi_module.load_state_dict(take("model.spi_module."))
        llama_state = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector.", "model.spi_module."))}
        missing, unexpected = self.llama.load_state_dict(llama_state, strict=False)
        assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
        ids = self.tokenizer.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>", "<bbox>"])
        self.im_patch_token, self.im_start_token, self.im_end_token, self.bbox_token = ids
        self.eval()

    def input_ids(self, conversation: list) -> torch.Tensor:
        conversation = [dict(c, value=preprocess_multimodal(c["value"])) for c in conversation]
        return self.tokenizer(preprocess_v0(conversation), return_tensors="pt").input_ids

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, images: torch.Tensor, bboxes=None) -> torch.Tensor:
        """``SPILlavaLlamaModel.forward`` up to the LLaMA call (run on the prompt; decoding steps skip it)."""
        inputs_embeds = self.llama.model.embed_tokens(input_ids)
        image_forward_outs = self.vision_tower(images, output_hidden_states=True)
        select = self.config.get("mm_vision_select_layer", -1)
        image_features = image_forward_outs.hidden_states[select][:, 1:]
        mlvl_spi_features = image_forward_outs.hidden_states[select::-3]
        mlvl_spi_features = mlvl_spi_features[::-1][-4:]
        mlvl_spi_features = [item[:, 1:] for item in mlvl_spi_features]
        if bboxes is not None and len(bboxes) > 0:
            mlvl_spi_features = self.spi_module(mlvl_spi_features, bboxes)
        else:
            mlvl_spi_features = [None for _ in range(len(input_ids))]
        image_features = self.mm_projector(image_features)
        new_input_embeds = []
        for cur_image_idx, (cur_input_ids, cur_input_embeds, spi_feat) in enumerate(
                zip(input_ids, inputs_embeds, mlvl_spi_features)):
            assert (cur_input_ids == self.im_start_token).sum() == (cur_input_ids == self.im_end_token).sum() == 1
            pos = int(torch.where(cur_input_ids == self.im_start_token)[0][0])
            feats = image_features[cur_image_idx]
            num_patches = feats.shape[0]
            assert cur_input_ids[pos + num_patches + 1] == self.im_end_token
            new = torch.cat((cur_input_embeds[: pos + 1], feats, cur_input_embeds[pos + num_patches + 1:]), dim=0)
            spi_mask = cur_input_ids == self.bbox_token
            if spi_feat is not None:
                spi_embeds = torch.zeros_like(new)
                spi_embeds[spi_mask] = spi_feat.to(spi_embeds.dtype)
                new = new * (~spi_mask).to(new.dtype)[:, None] + spi_embeds
            else:
                assert spi_mask.sum() == 0
            new_input_embeds.append(new)
        return torch.stack(new_input_embeds, dim=0)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, images: torch.Tensor, bboxes=None) -> torch.Tensor:
        hidden = self.llama.model(inputs_embeds=self.embed(input_ids, images, bboxes)).last_hidden_state
        return self.llama.lm_head(hidden)

    @torch.no_grad()
    def generate_greedy(self, input_ids, images, bboxes, max_new_tokens: int, cut_at_first_stop: bool = False) -> str:
        """GPT4RoI's eval loop, greedy: stop at the config's EOS or once ``###`` appears; strip a trailing ``###``
        and keep what follows the first ``': '``.

        ``cut_at_first_stop`` cuts the text at its first ``###`` instead of removing a trailing one, as this
        project's harnesses do; the two differ only when the model writes four or more ``#`` at the stop
        (GPT4RoI's rule then keeps the extra ones).
        """
        ids = input_ids
        out = self.llama.model(inputs_embeds=self.embed(input_ids, images, bboxes), use_cache=True)
        for _ in range(max_new_tokens):
            nxt = self.llama.lm_head(out.last_hidden_state[:, -1]).argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            # later steps: one plain token embedding on the cache (GPT4RoI skips the image path when L == 1)
            out = self.llama.model(inputs_embeds=self.llama.model.embed_tokens(nxt),
                                   cache=out.past_key_values, use_cache=True)
            if int(nxt) == self.config.get("eos_token_id") or "###" in self.tokenizer.decode(
                    ids[0, input_ids.shape[1]:], skip_special_tokens=True):
                break
        out = self.tokenizer.decode(ids[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
        if cut_at_first_stop and "###" in out:
            out = out[: out.index("###")].strip()
        if out.endswith("###"):
            out = out[:-3]
        return out.split(": ", 1)[-1].strip()


# ------------------------------------------------------------------------- a tiny released checkpoint
CORPUS = [
    "The <image> provides an overview of the picture.",
    "Can you give a description of the region mentioned by region1 <bbox>?",
    "What can you tell me about the region indicated by region2 <bbox> in the image?",
    "A red square on the grass. A blue circle in the sky. A yellow triangle near a tree.",
    "Assistant: Human: a small dog runs across the field while a man watches from the bench.",
]
GPT4ROI_TOKENS = ("[PAD]", "<im_patch>", "<bbox>", "<point>", "<im_start>", "<im_end>")


def bare_llama_tokenizer(vocab_size: int = 600):
    """A LLaMA-like base tokenizer (``<unk>``, ``<s>``, ``</s>`` and BPE pieces; no pad token)."""
    from data_converters.templates import GPT4ROI_VG
    from gpt4roi_sft.tokenization import train_llama_like_tokenizer

    corpus = list(CORPUS) + [SYSTEM, "### Human:", "### Assistant:"] + list(GPT4ROI_VG)
    return train_llama_like_tokenizer(corpus, vocab_size=vocab_size, added_tokens=False)


def gpt4roi_tokenizer():
    """The bare tokenizer with GPT4RoI's additions made in GPT4RoI's order (train.py, spi_llava.py)."""
    tok = bare_llama_tokenizer()
    base = len(tok)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.add_tokens(["<im_patch>"], special_tokens=True)
    tok.add_tokens(["<bbox>", "<point>"], special_tokens=True)
    tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    assert tok.convert_tokens_to_ids(list(GPT4ROI_TOKENS)) == list(range(base, base + 6))
    return tok


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Weights that make every path count: ~N(0, 1/fan_in) matrices, N(0, 0.1) biases, norms near 1."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # LayerNorm / GroupNorm / RMSNorm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def write_tiny_gpt4roi(out_dir, seed: int = 0, vit_layers: int = 11, shards: int = 2, tokenizer=None) -> str:
    """A random tiny GPT4RoI checkpoint laid out as the released one: sharded ``pytorch_model-*.bin`` with an
    index, GPT4RoI's key names, its tokenizer additions and a LLaVA-v0 ``config.json`` whose ``mm_vision_tower``
    is a tiny CLIP ViT (224 px, patch 14, 64 wide) saved beside it. ``tokenizer`` (default :func:`gpt4roi_tokenizer`)
    sets the vocabulary."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clip_dir = os.path.join(out_dir, "clip-vit-tiny")
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=vit_layers,
                                              num_attention_heads=4, image_size=224, patch_size=14, projection_dim=64))
    _randomise(vision, gen)
    vision.save_pretrained(clip_dir)
    tok = tokenizer if tokenizer is not None else gpt4roi_tokenizer()
    llama_cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     rms_norm_eps=1e-6, vocab_size=len(tok), hidden_act="silu")
    llama = LlamaForCausalLM(LlamaConfig(**llama_cfg))
    _randomise(llama, gen)
    projector = nn.Linear(64, 64)
    spi = MLVLROIQueryModule(64, 64, 16)
    _randomise(projector, gen)
    _randomise(spi, gen)
    state = dict(llama.state_dict())
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    state.update({f"model.spi_module.{k}": v for k, v in spi.state_dict().items()})
    keys = list(state)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}, "weight_map": {}}
    per = -(-len(keys) // shards)
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].clone().contiguous() for k in keys[s * per:(s + 1) * per]}
        torch.save(part, os.path.join(out_dir, name))
        index["weight_map"].update({k: name for k in part})
    json.dump(index, open(os.path.join(out_dir, "pytorch_model.bin.index.json"), "w"))
    config = dict(llama_cfg, architectures=["SPILlavaMPTForCausalLM"], model_type="llava", bos_token_id=1,
                  eos_token_id=2, pad_token_id=-1, initializer_range=0.02, max_sequence_length=2048,
                  mm_hidden_size=64, mm_use_im_start_end=True, mm_vision_select_layer=-2, mm_vision_tower=clip_dir,
                  sep_image_conv_front=False, tie_word_embeddings=False, torch_dtype="float32",
                  transformers_version="4.28.0.dev0", tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False,
                  use_cache=False, use_mm_proj=True)
    json.dump(config, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    tok.save_pretrained(out_dir)
    return out_dir


# -------------------------------------------------------------- LLaMA's tokenizer, as GPT4RoI's training ran it
SP_CORPUS = CORPUS + [SYSTEM, "### Human: ### Assistant: Given There are in the image, why? What is the dog doing?",
                      "Could you please give me a detailed description of these areas? region 1 may feature a cat",
                      "person at region2 wants to share. 0123456789 ,.;:!?`'\"()[]"] * 3


def train_llama_sentencepiece(out_dir, vocab_size: int = 400) -> str:
    """A tiny ``tokenizer.model`` trained with LLaMA's SentencePiece settings (BPE, byte fallback, split digits,
    dummy prefix, identity normalisation, whitespace kept; <unk>=0, <s>=1, </s>=2)."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SP_CORPUS * 20), model_prefix=prefix, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    os.remove(prefix + ".vocab")
    return prefix + ".model"


def write_transformers_428_tokenizer(out_dir, sentencepiece_file: str, pad: str | None = "[PAD]",
                                     added: bool = True) -> None:
    """Tokenizer files as transformers 4.28's slow ``LlamaTokenizer.save_pretrained`` wrote them for GPT4RoI
    (``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``)."""
    import sentencepiece as spm
    import shutil

    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(sentencepiece_file, os.path.join(out_dir, "tokenizer.model"))
    size = spm.SentencePieceProcessor(model_file=sentencepiece_file).get_piece_size()
    tok = lambda t: {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": True, "rstrip": False,  # noqa: E731
                     "single_word": False}
    json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": tok("<s>"), "clean_up_tokenization_spaces": False,
               "eos_token": tok("</s>"), "model_max_length": 2048, "pad_token": None, "padding_side": "right",
               "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": tok("<unk>")},
              open(os.path.join(out_dir, "tokenizer_config.json"), "w"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if pad:
        special["pad_token"] = pad
    json.dump(special, open(os.path.join(out_dir, "special_tokens_map.json"), "w"))
    if added:
        json.dump({t: size + k for k, t in enumerate(GPT4ROI_TOKENS)}, open(os.path.join(out_dir, "added_tokens.json"), "w"))


def slow_gpt4roi_tokens(sentencepiece_file: str, text: str) -> list:
    """What transformers 4.28's slow ``LlamaTokenizer`` with GPT4RoI's added tokens made of ``text``: ``<s>``, then the
    text split at added tokens, the spaces beside each dropped, each remaining piece SentencePiece-encoded alone."""
    import re

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sentencepiece_file)
    no_split = list(GPT4ROI_TOKENS) + ["<s>", "</s>", "<unk>"]
    parts = [p for p in re.split("(" + "|".join(map(re.escape, no_split)) + ")", text) if p]
    for i, p in enumerate(parts):
        if p in no_split:
            if i > 0:
                parts[i - 1] = parts[i - 1].rstrip()
            if i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
    out = ["<s>"]
    for p in parts:
        if p in no_split:
            out.append(p)
        elif p:
            out += sp.encode(p, out_type=str)
    return out
