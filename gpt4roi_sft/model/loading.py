"""``load_model(path) -> (model, processor)``: one entry point for every checkpoint layout we read.

Layouts, told apart by ``config.json``:
  (a) ``llava-hf`` LLaVA (``model_type: llava`` with ``text_config``): tower, ``multi_modal_projector``
      (2-layer GELU MLP) and LLM are loaded; the region encoder starts fresh;
  (b) this project's own directories (``model_type: gpt4roi``);
  (c) an LLM directory plus ``vision_tower=<CLIP dir>``: projector and region encoder start fresh;
  (d) original LLaVA (``LlavaLlamaForCausalLM`` with ``mm_vision_tower``, ``model.mm_projector.*``),
      including GPT4RoI's merged checkpoint (``model.spi_module.*``, see :mod:`.checkpoint_keys`).

Every weight in the files must find a home and every weight of the model must be loaded, except the
parts that start fresh in that layout; otherwise :class:`CheckpointError` names the weight. Missing
``<image>`` / ``<bbox>`` tokens are added to the tokenizer, their embedding rows set to the mean row.

A layout (d) checkpoint written with ``mm_use_im_start_end`` (GPT4RoI-7B, GPT4RoI-P2C-7B, LLaVA v0) opens in
GPT4RoI's own layout instead, with nothing added: the vocabulary stays as trained (32006 for GPT4RoI, the
tokenizer's ``[PAD] <im_patch> <bbox> <point> <im_start> <im_end>`` checked against the embedding rows, and
tokenizing as GPT4RoI's training did, see :mod:`.gpt4roi_tokenizer`), the
processor reads prompts from the ``gpt4roi_original`` template and resizes with ``clip_squash``, the region
levels follow GPT4RoI's ``hidden_states[-2::-3]`` reversed, last four (:func:`gpt4roi_region_layers`).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from typing import Optional

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig

from gpt4roi_sft.constants import BBOX_TOKEN, IM_END_TOKEN, IM_PATCH_TOKEN, IM_START_TOKEN, IMAGE_TOKEN
from gpt4roi_sft.data.image_transform import ImageTransform
from gpt4roi_sft.errors import ConfigError, UserError
from gpt4roi_sft.model.configuration import GPT4RoIConfig
from gpt4roi_sft.model.checkpoint_keys import convert_llava_original_state_dict, is_gpt4roi_state_dict
from gpt4roi_sft.model.modeling import GPT4RoIForCausalLM, default_attn_implementation
from gpt4roi_sft.model.processing import GPT4RoIProcessor

logger = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint directory lacks a weight the model needs, or holds one it has no place for."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a directory's ``*.safetensors`` files (or ``pytorch_model*.bin`` when none)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    state = {}
    if files:
        for f in files:
            state.update(load_file(f))
        return state
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin weight files")
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{path}: no config.json (not a model directory)")
    with open(cfg_path) as f:
        return json.load(f)


def default_region_layers(num_layers: int) -> list[int]:
    """GPT4RoI's choice for ViT-L (24 blocks -> outputs of blocks 14, 17, 20, 23), for any depth.

    Shallow towers get evenly spread blocks from the first one on (a shallow level carries region identity).
    """
    if num_layers >= 11:
        return [num_layers - 10, num_layers - 7, num_layers - 4, num_layers - 1]
    return [max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75, 1.0)]


def gpt4roi_region_layers(num_layers: int, select_layer: int = -2) -> list[int]:
    """GPT4RoI's region levels: ``hidden_states[select_layer::-3]``, reversed, the last four (shallowest first).

    ``hidden_states`` of a ``num_layers``-block ViT has ``num_layers + 1`` entries (index 0: the embeddings); for
    ViT-L (24 blocks) this is [14, 17, 20, 23]. Needs a tower deep enough to give four levels (10 blocks).
    """
    layers = list(range(num_layers + 1))[select_layer::-3][::-1][-4:]
    if len(layers) < 4:
        raise ConfigError(f"GPT4RoI's region levels need a vision tower of at least 10 blocks, this one has {num_layers}")
    return layers


def _vision_key(key: str) -> str:
    return re.sub(r"^vision_tower\.(?:vision_model\.)?", "vision_tower.", key)


def _llava_hf_key(key: str) -> str:
    key = re.sub(r"^model\.", "", key) if key.startswith(("model.vision_tower", "model.multi_modal_projector", "model.language_model")) else key
    key = re.sub(r"^language_model\.(?!model\.|lm_head\.)", "language_model.model.", key)
    key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
    return _vision_key(key)


def _clip_state(path: str) -> dict:
    out = {}
    for k, v in read_state_dict(path).items():
        if k.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale")):
            continue
        out[_vision_key("vision_tower." + k)] = v
    return out


def _llm_state(path: str) -> dict:
    out = {}
    for k, v in read_state_dict(path).items():
        out["language_model." + (k if k.startswith(("model.", "lm_head.")) else "model." + k)] = v
    return out


def _vision_config(path: Optional[str], what: str) -> CLIPVisionConfig:
    if not path or not os.path.isdir(path):
        raise ConfigError(f"{what}: vision tower directory {path!r} not found (pass vision_tower=<CLIP dir>)")
    return CLIPVisionConfig.from_pretrained(path)


def _ensure_tokens(model: GPT4RoIForCausalLM, tokenizer) -> None:
    """Add ``<image>``/``<bbox>`` if missing; new embedding rows (input and output) = mean of the old rows."""
    missing = [t for t in (IMAGE_TOKEN, BBOX_TOKEN) if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    vocab = len(tokenizer)
    old = model.get_input_embeddings().weight.shape[0]
    if vocab > old:
        model.resize_token_embeddings(vocab, mean_resizing=False)
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None:
                    emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model.config.bbox_token_id = tokenizer.convert_tokens_to_ids(BBOX_TOKEN)


def _assemble(config: GPT4RoIConfig, state: dict, fresh_prefixes: tuple[str, ...], where: str) -> GPT4RoIForCausalLM:
    """Build the model and load ``state``; unexpected or (outside ``fresh_prefixes``) missing weights raise."""
    model = GPT4RoIForCausalLM(config)
    expected = model.state_dict()
    unexpected = sorted(k for k in state if k not in expected)
    if unexpected:
        raise CheckpointError(f"{where}: unexpected weight {unexpected[0]!r} ({len(unexpected)} in all) has no place in the model")
    missing = sorted(k for k in expected if k not in state and not k.startswith(fresh_prefixes))
    if missing:
        raise CheckpointError(f"{where}: missing weight {missing[0]!r} ({len(missing)} in all)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where}: weight {k!r} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)
    return model


def _load_own(path: str, attn: str, torch_dtype) -> tuple[GPT4RoIForCausalLM, GPT4RoIProcessor]:
    """Our own directories load through ``from_pretrained``: weights are placed into a model built on the meta
    device (no random initialisation of billions of parameters first), then checked key by key."""
    config = GPT4RoIConfig.from_pretrained(path)
    config._attn_implementation = attn
    weight_files = glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "pytorch_model*.bin"))
    if not weight_files:
        raise CheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin weight files")
    try:
        model, info = GPT4RoIForCausalLM.from_pretrained(
            path, config=config, dtype=torch_dtype or torch.float32, output_loading_info=True
        )
    except RuntimeError as exc:  # e.g. a weight whose shape does not fit
        raise CheckpointError(f"{path}: {str(exc).splitlines()[0]}") from None
    unexpected, missing = sorted(info.get("unexpected_keys") or []), sorted(info.get("missing_keys") or [])
    if unexpected:
        raise CheckpointError(f"{path}: unexpected weight {unexpected[0]!r} ({len(unexpected)} in all) has no place in the model")
    if missing:
        raise CheckpointError(f"{path}: missing weight {missing[0]!r} ({len(missing)} in all)")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        key, have, want = mismatched[0]
        raise CheckpointError(f"{path}: weight {key!r} has shape {tuple(have)}, the model expects {tuple(want)}")
    if config.freeze_vision_tower:  # loading replaced the parameters the constructor had frozen
        model.vision_tower.requires_grad_(False)
    return model, GPT4RoIProcessor.from_pretrained(path)


def _processor(path: str, tokenizer, config: GPT4RoIConfig) -> GPT4RoIProcessor:
    transform = ImageTransform(size=config.image_size, resize_mode=config.resize_mode)
    return GPT4RoIProcessor(tokenizer, transform, config.num_image_tokens)


def _load_llava_hf(path: str, raw: dict, attn: str):
    from transformers import LlavaConfig

    lc = LlavaConfig.from_pretrained(path)
    if lc.vision_feature_select_strategy != "default" or not isinstance(lc.vision_feature_layer, int):
        raise ConfigError(f"{path}: only vision_feature_select_strategy 'default' with one vision_feature_layer is supported")
    if lc.projector_hidden_act != "gelu" or not lc.multimodal_projector_bias:
        raise ConfigError(f"{path}: projector must be GELU with bias (got {lc.projector_hidden_act!r})")
    vcfg = lc.vision_config.to_dict()
    config = GPT4RoIConfig(
        vision_config=vcfg,
        text_config=lc.text_config.to_dict(),
        projector_type="mlp2x_gelu",
        vision_feature_layer=lc.vision_feature_layer,
        region_feature_layers=default_region_layers(lc.vision_config.num_hidden_layers),
        region_gn_groups=math.gcd(64, lc.vision_config.hidden_size),
        image_token_id=lc.image_token_index,
        resize_mode="pad",
    )
    config._attn_implementation = attn
    state = {_llava_hf_key(k): v for k, v in read_state_dict(path).items()}
    model = _assemble(config, state, ("region_encoder.",), path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


REGION_FIELDS = ("region_feature_layers", "region_hidden_size", "roi_output_size", "region_fuse_rounds",
                 "region_gn_groups", "region_mode")


# config.json keys of original-LLaVA / GPT4RoI checkpoints that describe the multimodal wrapper, not the LLM.
_LLAVA_WRAPPER_KEYS = ("use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "sep_image_conv_front",
                       "max_sequence_length")


def _load_llava_original(path: str, raw: dict, vision_tower: Optional[str], attn: str):
    # GPT4RoI's own region-encoder sizes are the defaults; a config.json may override them by our field names.
    region = {k: raw[k] for k in REGION_FIELDS if k in raw}
    skip = ("architectures", "model_type", "auto_map") + REGION_FIELDS + _LLAVA_WRAPPER_KEYS
    text = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in skip}
    text["model_type"] = "llama"
    vision_path = vision_tower or raw.get("mm_vision_tower")
    vcfg = _vision_config(vision_path, path)
    state = read_state_dict(path)
    has_regions = is_gpt4roi_state_dict(state)
    try:
        state = convert_llava_original_state_dict(state)
    except KeyError as exc:
        raise CheckpointError(f"{path}: {exc.args[0]}") from None
    select_layer = raw.get("mm_vision_select_layer", -2)
    original_layout = bool(raw.get("mm_use_im_start_end"))
    if original_layout:
        rows = state["language_model.model.embed_tokens.weight"].shape[0]
        tokenizer = _original_tokenizer(path, rows)
        _check_original_tokenizer(tokenizer, rows, path)
        text["vocab_size"] = rows
        for key, token in (("pad_token_id", tokenizer.pad_token), ("bos_token_id", tokenizer.bos_token),
                           ("eos_token_id", tokenizer.eos_token)):
            if token is not None:  # LLaVA v0 configs carry pad -1, bos 0, eos 1 (not the tokenizer's ids)
                text[key] = tokenizer.convert_tokens_to_ids(token)
        layers = gpt4roi_region_layers(vcfg.num_hidden_layers, select_layer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        layers = default_region_layers(vcfg.num_hidden_layers)
    projector = raw.get("mm_projector_type", "linear")
    config = GPT4RoIConfig(
        vision_config=vcfg.to_dict(),
        text_config=text,
        projector_type=projector,
        vision_feature_layer=select_layer,
        **{
            "region_feature_layers": layers,
            "region_gn_groups": math.gcd(64, vcfg.hidden_size),
            **region,
        },
    )
    if original_layout:
        config.image_token_id = tokenizer.convert_tokens_to_ids(IM_PATCH_TOKEN)
        config.bbox_token_id = tokenizer.convert_tokens_to_ids(BBOX_TOKEN)
        config.resize_mode = "clip_squash"
    config._attn_implementation = attn
    if not any(k.startswith("vision_tower.") for k in state):
        state.update(_clip_state(vision_path))
    model = _assemble(config, state, () if has_regions else ("region_encoder.",), path)
    return model, tokenizer


def _original_tokenizer(path: str, rows: Optional[int] = None):
    """A GPT4RoI-layout directory's tokenizer as GPT4RoI trained with it: rebuilt from ``tokenizer.model`` when the
    directory has one (files written by GPT4RoI's own scripts), else its ``tokenizer.json`` (written by
    :mod:`gpt4roi_sft.model.apply_delta`, already in that form)."""
    from gpt4roi_sft.model.gpt4roi_tokenizer import SENTENCEPIECE_FILE, TokenizerError, build_gpt4roi_tokenizer, check_against

    if os.path.isfile(os.path.join(path, SENTENCEPIECE_FILE)):
        try:
            tokenizer = build_gpt4roi_tokenizer(path, rows)
        except TokenizerError as exc:
            raise CheckpointError(str(exc)) from None
        try:
            check_against(tokenizer, AutoTokenizer.from_pretrained(path), path)
        except (OSError, ValueError, TypeError):
            pass
        return tokenizer
    return AutoTokenizer.from_pretrained(path)


def _check_original_tokenizer(tokenizer, rows: int, path: str) -> None:
    """GPT4RoI's layout tokens are single added tokens and the tokenizer covers exactly the embedding rows.

    A tokenizer one token short (32005 for GPT4RoI's 32006 rows: a base whose tokenizer already had a pad token,
    so ``[PAD]`` was never added) would shift every later id; ``python -m gpt4roi_sft.model.apply_delta`` writes
    the right one.
    """
    for token in (IM_START_TOKEN, IM_PATCH_TOKEN, IM_END_TOKEN, BBOX_TOKEN):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise CheckpointError(f"{path}: the tokenizer has no {token} token, which GPT4RoI's layout "
                                  "(mm_use_im_start_end) needs")
    if len(tokenizer) != rows:
        raise CheckpointError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the embedding has {rows} rows "
                              "(GPT4RoI: 32006 = LLaMA's 32000 + [PAD] <im_patch> <bbox> <point> <im_start> <im_end>); "
                              "rebuild the directory with python -m gpt4roi_sft.model.apply_delta")


def _load_llm_plus_clip(path: str, vision_tower: str, attn: str, projector_type: str):
    vcfg = _vision_config(vision_tower, path)
    tcfg = AutoConfig.from_pretrained(path)
    config = GPT4RoIConfig(
        vision_config=vcfg.to_dict(),
        text_config=tcfg.to_dict(),
        projector_type=projector_type,
        region_feature_layers=default_region_layers(vcfg.num_hidden_layers),
        region_gn_groups=math.gcd(64, vcfg.hidden_size),
    )
    config._attn_implementation = attn
    state = _llm_state(path)
    state.update(_clip_state(vision_tower))
    model = _assemble(config, state, ("region_encoder.", "multi_modal_projector."), path)
    return model, AutoTokenizer.from_pretrained(path)


def load_processor(path: str) -> Optional[GPT4RoIProcessor]:
    """The processor of a model directory without reading its weights, or ``None`` where the processor depends on
    them (layouts that add ``<image>``/``<bbox>`` to the tokenizer at load time).

    Our own directories and GPT4RoI-layout checkpoints (``mm_use_im_start_end``) qualify; this is what
    ``train_sft.py --check`` tokenizes the data with.
    """
    path = os.fspath(path)
    raw = _read_config(path)
    if raw.get("model_type") == "gpt4roi":
        return GPT4RoIProcessor.from_pretrained(path)
    if raw.get("mm_use_im_start_end") and ("mm_vision_tower" in raw or any("Llava" in a for a in raw.get("architectures") or [])):
        tokenizer = _original_tokenizer(path)
        vision = raw.get("mm_vision_tower")
        size, patch = 224, 14
        if vision and os.path.isdir(vision):
            vcfg = CLIPVisionConfig.from_pretrained(vision)
            size, patch = int(vcfg.image_size), int(vcfg.patch_size)
        return GPT4RoIProcessor(tokenizer, ImageTransform(size=size, resize_mode="clip_squash"), (size // patch) ** 2,
                                "im_start_end")
    return None


def load_model(
    path: str,
    vision_tower: Optional[str] = None,
    torch_dtype: Optional[torch.dtype] = None,
    attn_implementation: Optional[str] = None,
    device=None,
    projector_type: str = "mlp2x_gelu",
):
    """Open a checkpoint directory and return ``(model, processor)``; see the module docstring for layouts.

    Args:
        path: model directory (ours, llava-hf, original LLaVA / GPT4RoI, or a bare causal LM).
        vision_tower: CLIP directory; required for a bare LLM, overrides ``mm_vision_tower`` otherwise.
        torch_dtype: cast the model to this dtype (default: keep float32).
        attn_implementation: ``sdpa``, ``flash_attention_2``, ``eager``...; default flash-attn when it imports.
        device: move the model there.
        projector_type: projector of a fresh LLM + CLIP pair (``mlp2x_gelu`` or ``linear``).
    """
    path = os.fspath(path)
    raw = _read_config(path)
    attn = attn_implementation or default_attn_implementation()
    model_type = raw.get("model_type")
    if model_type == "gpt4roi":
        model, processor = _load_own(path, attn, torch_dtype)
    else:
        processor = None
        if model_type == "llava" and "text_config" in raw:
            model, tokenizer = _load_llava_hf(path, raw, attn)
        elif "mm_vision_tower" in raw or any("Llava" in a for a in raw.get("architectures") or []):
            model, tokenizer = _load_llava_original(path, raw, vision_tower, attn)
            if raw.get("mm_use_im_start_end"):  # GPT4RoI's own layout: nothing is added to the vocabulary
                transform = ImageTransform(size=model.config.image_size, resize_mode="clip_squash")
                processor = GPT4RoIProcessor(tokenizer, transform, model.config.num_image_tokens, "im_start_end")
        elif vision_tower is not None:
            model, tokenizer = _load_llm_plus_clip(path, vision_tower, attn, projector_type)
        else:
            raise ConfigError(
                f"{path}: model_type {model_type!r} is not a multimodal checkpoint; pass vision_tower=<CLIP dir> "
                "to pair this LLM with a CLIP tower"
            )
        if processor is None:
            _ensure_tokens(model, tokenizer)
            processor = _processor(path, tokenizer, model.config)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    logger.info("loaded %s (%s attention)", path, attn)
    return model, processor


__all__ = ["load_model", "load_processor", "CheckpointError", "read_state_dict", "default_region_layers", "gpt4roi_region_layers"]
