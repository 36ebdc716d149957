"""``GPT4RoIForCausalLM``: image tokens and region tokens spliced into any ``transformers`` causal LM.

Batch layout (docs/architecture.md): ``input_ids`` (B, L) already hold ``num_image_tokens`` copies of
``image_token_id`` per image and one ``bbox_token_id`` per region; ``pixel_values`` (I, 3, S, S) has one
image per image-token run in row-major order; ``boxes`` is a list of I tensors (N_i, 4) of xyxy fractions,
and the ``<bbox>`` tokens of the flattened batch take the concatenated boxes in order. Packed rows pass
``position_ids`` restarting at 0 per sample and no ``attention_mask``; the LLM then builds a block-diagonal
causal mask from the position ids, so no token attends across samples.

The vision tower and the region encoder run on every forward, on a dummy image / box whose result enters
with weight 0 when the batch has none: under ZeRO-3 every rank must gather the same parameters.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from gpt4roi_sft.model.configuration import GPT4RoIConfig
from gpt4roi_sft.model.region_encoder import RegionEncoder

logger = logging.getLogger(__name__)


def default_attn_implementation() -> str:
    """``flash_attention_2`` when the ``flash_attn`` package imports, else PyTorch's fused ``sdpa``."""
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


class MultiModalProjector(nn.Module):
    """Patch features (..., C_vit) -> LLM width: ``linear`` (GPT4RoI/LLaVA v0) or ``mlp2x_gelu`` (LLaVA-1.5).

    Parameter names match ``llava-hf``'s ``multi_modal_projector`` (``linear_1``, ``linear_2``).
    """

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, projector_type: str):
        super().__init__()
        self.projector_type = projector_type
        self.linear_1 = nn.Linear(vision_hidden_size, text_hidden_size)
        if projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)
        elif projector_type != "linear":
            raise ValueError(f"projector_type must be 'linear' or 'mlp2x_gelu', got {projector_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        if self.projector_type == "mlp2x_gelu":
            x = self.linear_2(self.act(x))
        return x


def check_multimodal_counts(config, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                            boxes: Optional[list]) -> None:
    """Raise ``ValueError`` when image-token runs and images, or ``<bbox>`` tokens and boxes, disagree in number.

    Counting reads ``input_ids``: free on the host, a device sync on a GPU. The training loop therefore checks
    its host batches with this and turns the model's own check off (``validate_counts_on_device``).
    """
    n_image_tokens = int((input_ids == config.image_token_id).sum())
    if n_image_tokens % config.num_image_tokens:
        raise ValueError(f"{n_image_tokens} image tokens is not a multiple of num_image_tokens={config.num_image_tokens}")
    n_images = n_image_tokens // config.num_image_tokens
    n_pixels = pixel_values.shape[0] if pixel_values is not None and len(pixel_values) > 0 else 0
    if n_pixels != n_images:
        raise ValueError(f"input_ids hold {n_images} <image> runs but pixel_values has {n_pixels} images")
    boxes = list(boxes) if boxes is not None else []
    n_boxes = sum(len(b) for b in boxes)
    n_bbox_tokens = int((input_ids == config.bbox_token_id).sum())
    if n_boxes != n_bbox_tokens:
        raise ValueError(f"{n_bbox_tokens} <bbox> tokens in input_ids but {n_boxes} boxes were given")
    if n_boxes and len(boxes) != n_images:
        raise ValueError(f"boxes has {len(boxes)} entries for {n_images} images (one list per image)")


class GPT4RoIPreTrainedModel(PreTrainedModel):
    config_class = GPT4RoIConfig
    config: GPT4RoIConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _no_split_modules = ["CLIPEncoderLayer", "LlamaDecoderLayer"]
    _skip_keys_device_placement = "past_key_values"

    def _init_weights(self, module):
        # Sub-models initialise themselves; only our own layers need it.
        if isinstance(module, RegionEncoder):
            module.init_weights()


class GPT4RoIForCausalLM(GPT4RoIPreTrainedModel, GenerationMixin):
    """CLIP vision tower + projector + :class:`RegionEncoder` + causal LM (``language_model``).

    Two run-time switches (instance attributes, never saved with the model) serve the training loop:
    ``validate_counts_on_device`` (default True) counts image and ``<bbox>`` tokens in every forward, which is a
    device sync on a GPU; ``linear_cross_entropy`` (default None), when set, is a fused
    ``f(hidden (N, D), weight (V, D), labels (N,), ignore_index) -> summed loss`` that training forwards with
    labels use instead of materialising the logits (e.g. Liger's kernel; see ``gpt4roi_sft.train.speedups``).
    """

    validate_counts_on_device = True
    linear_cross_entropy = None

    def __init__(self, config: GPT4RoIConfig):
        super().__init__(config)
        vcfg, tcfg = config.vision_config, config.text_config
        self.vision_tower = CLIPVisionModel(vcfg)
        self.multi_modal_projector = MultiModalProjector(vcfg.hidden_size, tcfg.hidden_size, config.projector_type)
        self.region_encoder = RegionEncoder.from_config(config)
        self.language_model = AutoModelForCausalLM.from_config(tcfg)
        self.post_init()
        if config.freeze_vision_tower:
            self.vision_tower.requires_grad_(False)

    # --- embedding plumbing used by transformers, peft and the trainer ---
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    @property
    def vision_tower_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vision_tower.parameters())

    # --- multimodal embedding ---
    def _vision_hidden_states(self, pixel_values: torch.Tensor):
        ctx = torch.no_grad() if self.vision_tower_frozen else nullcontext()
        with ctx:
            out = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        return out.hidden_states

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        pixel_values: Optional[torch.Tensor] = None,
        boxes: Optional[list[torch.Tensor]] = None,
        region_masks: Optional[list[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Token embeddings (B, L, D) with image features and region tokens written in place.

        Raises ``ValueError`` when image-token runs and images, or ``<bbox>`` tokens and boxes, disagree
        in number (both counts are named).
        """
        cfg = self.config
        if self.validate_counts_on_device or input_ids.device.type == "cpu":
            check_multimodal_counts(cfg, input_ids, pixel_values, boxes)
        embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == cfg.image_token_id
        bbox_mask = input_ids == cfg.bbox_token_id
        have_images = pixel_values is not None and len(pixel_values) > 0
        boxes = list(boxes) if boxes is not None else []
        n_boxes = sum(len(b) for b in boxes)

        if not have_images:  # keep the vision/region path in the graph (ZeRO-3): a dummy image, weight 0
            pixel_values = embeds.new_zeros(1, 3, cfg.image_size, cfg.image_size)
        hidden_states = self._vision_hidden_states(pixel_values)
        image_features = self.multi_modal_projector(hidden_states[cfg.vision_feature_layer][:, 1:]).to(embeds.dtype)
        if have_images:
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)
        else:
            embeds = embeds + 0.0 * image_features.sum()

        layer_features = [hidden_states[i][:, 1:] for i in cfg.region_feature_layers]
        needs_masks = cfg.region_mode != "box"
        if n_boxes:
            if needs_masks and region_masks is None:
                raise ValueError(f"region_mode {cfg.region_mode!r} needs region_masks")
            # Boxes and masks may arrive on the host (processor output); the encoder runs where the embeddings are.
            masks = [m.to(embeds.device) for m in region_masks] if needs_masks else None
            region_tokens = self.region_encoder(layer_features, [b.to(embeds.device) for b in boxes], masks)
            embeds = embeds.masked_scatter(bbox_mask.unsqueeze(-1), region_tokens.to(embeds.dtype))
        else:
            first = [f[:1] for f in layer_features]
            dummy_box = [embeds.new_tensor([[0.0, 0.0, 1.0, 1.0]])]
            dummy_mask = [embeds.new_ones(1, cfg.image_size, cfg.image_size)] if needs_masks else None
            embeds = embeds + 0.0 * self.region_encoder(first, dummy_box, dummy_mask).sum().to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        boxes: Optional[list[torch.Tensor]] = None,
        region_masks: Optional[list[torch.Tensor]] = None,
        labels: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        past_key_values=None,
        use_cache: Optional[bool] = None,
        num_items_in_batch: Optional[int] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, L, V) and, with ``labels`` (B, L), the mean next-token cross-entropy over labelled tokens.

        ``num_items_in_batch`` (labelled tokens across gradient-accumulation micro-batches) replaces the
        per-batch count as the loss denominator when given.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_multimodal(input_ids, pixel_values, boxes, region_masks)
        if attention_mask is None and position_ids is not None and past_key_values is None and not use_cache:
            # Packed rows: transformers derives the block-diagonal mask from position_ids only without a cache.
            use_cache = False
        if past_key_values is not None:
            kwargs["cache"] = past_key_values  # transformers >= 5.2x renamed the argument
        if labels is not None and self.training and self.linear_cross_entropy is not None:
            # Fused loss: the LLM's last hidden states go straight into the loss kernel; no (B, L, V) logits.
            hidden = self.language_model.get_decoder()(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
            ).last_hidden_state
            return CausalLMOutputWithPast(loss=self.fused_causal_lm_loss(hidden, labels, num_items_in_batch))
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )
        if labels is not None:
            out.loss = self.causal_lm_loss(out.logits, labels, num_items_in_batch)
        return out

    def causal_lm_loss(self, logits: torch.Tensor, labels: torch.LongTensor, num_items_in_batch=None) -> torch.Tensor:
        """Token t predicts label t+1; mean over labelled targets (or sum / ``num_items_in_batch``)."""
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
        total = F.cross_entropy(shift_logits, shift_labels, ignore_index=self.config.ignore_index, reduction="sum")
        return self._mean_over_targets(total, shift_labels, num_items_in_batch)

    def fused_causal_lm_loss(self, hidden: torch.Tensor, labels: torch.LongTensor, num_items_in_batch=None) -> torch.Tensor:
        """:meth:`causal_lm_loss` from the last hidden states (B, L, D) through ``linear_cross_entropy`` and the
        output head's weight, without the logits."""
        head = self.language_model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("linear_cross_entropy: an output head with a bias is not supported")
        shift_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(hidden.device)
        total = self.linear_cross_entropy(shift_hidden, head.weight, shift_labels, self.config.ignore_index)
        return self._mean_over_targets(total, shift_labels, num_items_in_batch)

    def _mean_over_targets(self, total: torch.Tensor, shift_labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """``total`` over the trained-token count (1 where that is 0), computed on the device without reading it back."""
        if num_items_in_batch is None:
            num_items_in_batch = (shift_labels != self.config.ignore_index).sum()
        if torch.is_tensor(num_items_in_batch):
            count = num_items_in_batch.to(total.device, total.dtype)
            return total / torch.where(count > 0, count, torch.ones_like(count))
        return total / (num_items_in_batch if num_items_in_batch else 1)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.language_model.prepare_inputs_for_generation(*args, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        boxes: Optional[list[torch.Tensor]] = None,
        region_masks: Optional[list[torch.Tensor]] = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Decode after a (left-padded) multimodal prompt; returns only the new tokens (B, T_new).

        The prompt is embedded once with its image and regions; decoding then runs in the language model
        with its KV cache. ``generate_kwargs`` are those of ``transformers``' ``generate``
        (``max_new_tokens``, ``do_sample``, ``temperature``, ``eos_token_id``, ...).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_multimodal(input_ids, pixel_values, boxes, region_masks)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)


__all__ = ["GPT4RoIForCausalLM", "GPT4RoIPreTrainedModel", "MultiModalProjector", "check_multimodal_counts",
           "default_attn_implementation"]
