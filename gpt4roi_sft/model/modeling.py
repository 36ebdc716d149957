"""``GPT4RoIForCausalLM``: image tokens and region tokens spliced into any ``transformers`` causal LM.

Batch layout (docs/architecture.md): ``input_ids`` (B, L) already hold ``num_image_tokens`` copies of
``image_token_id`` per image and one ``bbox_token_id`` per region; ``pixel_values`` (I, 3, S, S) has one
image per image-token run in row-major order; ``boxes`` is a list of I tensors (N_i, 4) of xyxy fractions,
and the ``<bbox>`` tokens of the flattened batch take the concatenated boxes in order. Packed rows pass
``position_ids`` restarting at 0 per sample and no ``attention_mask``; the LLM then builds a block-diagonal
causal mask from the position ids, so no token attends across samples (``torch_varlen`` and flash attention
instead read the samples' boundaries, ``cu_seq_lens_q``/``max_length_q``, which pass through ``**kwargs``;
under ``torch_varlen`` no mask is built at all, see ``varlen_attention.skip_mask_building``).

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
from gpt4roi_sft.model import varlen_attention  # noqa: F401  (registers attn_implementation="torch_varlen")

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
            # pixel values may arrive from the host (processor output): the tower runs where its weights are
            pixels = pixel_values.to(device=self.vision_tower.device, dtype=self.vision_tower.dtype)
            out = self.vision_tower(pixels, output_hidden_states=True)
        return out.hidden_states

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        pixel_values: Optional[torch.Tensor] = None,
        boxes: Optional[list[torch.Tensor]] = None,
        region_masks: Optional[list[torch.Tensor]] = None,
        share_images: bool = False,
    ) -> torch.Tensor:
        """Token embeddings (B, L, D) with image features and region tokens written in place.

        ``share_images`` (generation): images that are equal pixel for pixel go through the vision tower and
        the region encoder's multi-level maps once, with the boxes of all their rows (GPT4RoI's maps cost
        ~2 TFLOP per image at 224 px, more than the prefill of a VG prompt's text).

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
        inverse = None
        if share_images and have_images:  # compared where the embeddings are: the inverse then indexes there too
            pixel_values, inverse = unique_images(pixel_values.to(embeds.device))
        hidden_states = self._vision_hidden_states(pixel_values)
        image_features = self.multi_modal_projector(hidden_states[cfg.vision_feature_layer][:, 1:]).to(embeds.dtype)
        if inverse is not None:
            image_features = image_features[inverse]
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
            boxes = [b.to(embeds.device) for b in boxes]
            if inverse is not None:
                boxes, masks, order = regions_by_image(boxes, masks, inverse)
                region_tokens = self.region_encoder(layer_features, boxes, masks)
                region_tokens = region_tokens.new_empty(region_tokens.shape).index_copy_(0, order, region_tokens)
            else:
                region_tokens = self.region_encoder(layer_features, boxes, masks)
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
        attention_mask = varlen_attention.skip_mask_building(self.language_model.config, attention_mask, kwargs,
                                                             past_key_values is not None or bool(use_cache), inputs_embeds)
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
        share_prefix: bool = False,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Decode after a (left-padded) multimodal prompt; returns only the new tokens (B, T_new).

        The prompt is embedded once with its image and regions; decoding then runs in the language model
        with its KV cache. ``generate_kwargs`` are those of ``transformers``' ``generate``
        (``max_new_tokens``, ``do_sample``, ``temperature``, ``eos_token_id``, ``cache``, ...).

        ``share_prefix`` (with an empty ``cache`` of B rows): rows that show the same image share its vision
        tower and region maps, and rows whose prompts agree up to the first ``<bbox>`` (same tokens, same
        image: every region question about one image) are prefilled up to there once, their keys and values
        copied into each row's cache; ``generate`` then prefills only the rest. Exact arithmetic gives the
        same tokens; in floating point the shared rows' prefill runs in a smaller batch.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_multimodal(input_ids, pixel_values, boxes, region_masks, share_images=share_prefix)
        cache = generate_kwargs.get("cache")
        if share_prefix and cache is not None:
            self._prefill_shared_prefix(embeds, input_ids, attention_mask, cache)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    def _prefill_shared_prefix(self, embeds: torch.Tensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor,
                               cache) -> None:
        """Fill ``cache`` (empty, B rows) with the keys and values of the prompts' common stretch: the tokens
        before the first ``<bbox>`` of any row, computed once per distinct stretch. Does nothing when no two
        rows share it.

        A static cache is written in place, distinct stretches a few at a time, so the shared prefill never
        holds more than an eighth of the cache's rows beside it; another cache gets all rows through ``update``.
        """
        from transformers import DynamicCache
        from transformers.cache_utils import StaticLayer

        if cache.get_seq_length() != 0:
            return
        is_bbox = input_ids == self.config.bbox_token_id
        batch, length = input_ids.shape
        first = torch.where(is_bbox.any(1), is_bbox.int().argmax(1), length)
        prefix = min(int(first.min()), length - 1)  # generate must prefill at least one token itself
        if prefix < 1:
            return
        rows, inverse = unique_rows(embeds[:, :prefix], attention_mask[:, :prefix])
        if rows is None:
            return
        text = self.language_model.config
        static = all(type(layer) is StaticLayer for layer in cache.layers)  # plain full-attention layers
        if static:
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            cache.early_initialization(batch_size=batch, num_heads=text.num_key_value_heads or text.num_attention_heads,
                                       head_dim=head_dim, dtype=embeds.dtype, device=embeds.device)
        step = max(1, batch // 8) if static else len(rows)
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            # The positions transformers' generate gives a left-padded prompt: real tokens count from 0.
            mask = attention_mask[chunk, :prefix]
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            shared = DynamicCache(config=text)
            self.language_model(inputs_embeds=embeds[chunk, :prefix], attention_mask=mask, position_ids=positions,
                                cache=shared, use_cache=True, logits_to_keep=1)
            targets = ((inverse >= start) & (inverse < start + len(chunk))).nonzero().squeeze(1)
            local = inverse[targets] - start
            for layer_idx, (layer, part) in enumerate(zip(cache.layers, shared.layers)):
                if static:
                    layer.keys[targets, :, :prefix] = part.keys[local]
                    layer.values[targets, :, :prefix] = part.values[local]
                else:
                    cache.update(part.keys[local], part.values[local], layer_idx)
        if static:
            for layer in cache.layers:
                layer.cumulative_length.fill_(prefix)


def _equal_rows(*tensors: torch.Tensor):
    """``(representatives, inverse)`` of the rows (first dimension) that are equal bit for bit in every one of
    ``tensors``: ``t[representatives][inverse] == t`` for each; ``(None, None)`` when all rows differ.

    Rows are grouped by a hash of their bits (integer arithmetic, so equal rows hash alike whatever order a
    reduction takes), then checked against their group's first row: a hash collision costs the sharing, it
    never merges rows that differ.
    """
    n, device = tensors[0].shape[0], tensors[0].device
    bits = [t.reshape(n, -1).contiguous().view(torch.int16) for t in tensors]  # every dtype here is >= 16 bits
    generator = torch.Generator().manual_seed(0)
    signature = torch.zeros(n, dtype=torch.int64, device=device)
    for b in bits:
        for start in range(0, b.shape[1], _HASH_CHUNK):
            part = b[:, start:start + _HASH_CHUNK].long()
            coeff = torch.randint(1, 2**16, (part.shape[1],), generator=generator).to(device)
            signature = (signature + (part * coeff).sum(1)) % _HASH_PRIME  # |sum| < 2^47: no overflow
    _, inverse = torch.unique(signature, return_inverse=True)
    distinct = int(inverse.max()) + 1
    if distinct == n:
        return None, None
    first = torch.full((distinct,), n, device=device).scatter_reduce(0, inverse, torch.arange(n, device=device), "amin")
    source = first[inverse]
    for b in bits:
        for start in range(0, b.shape[1], _HASH_CHUNK):
            part = b[:, start:start + _HASH_CHUNK]
            if not torch.equal(part[source], part):
                return None, None
    return first, inverse


_HASH_CHUNK = 1 << 16
_HASH_PRIME = (1 << 61) - 1


def unique_images(pixel_values: torch.Tensor):
    """``(distinct images (U, 3, S, S), inverse (I,))`` with ``distinct[inverse] == pixel_values``;
    ``(pixel_values, None)`` when no two images are equal."""
    first, inverse = _equal_rows(pixel_values)
    return (pixel_values, None) if first is None else (pixel_values[first], inverse)


def unique_rows(embeds: torch.Tensor, attention_mask: torch.Tensor):
    """``(representative rows (U,), inverse (B,))`` of rows whose embeddings (B, P, D) and mask (B, P) are
    equal; ``(None, None)`` when all rows differ."""
    return _equal_rows(embeds, attention_mask)


def regions_by_image(boxes: list[torch.Tensor], masks: Optional[list[torch.Tensor]], inverse: torch.Tensor):
    """The boxes (and masks) of I images regrouped onto their U distinct images, and ``order``: for each
    region in the regrouped order, its index in the original (image order, then box order)."""
    distinct = int(inverse.max()) + 1
    starts = [0]
    for b in boxes:
        starts.append(starts[-1] + len(b))
    runs = [[] for _ in range(distinct)]
    for image, u in enumerate(inverse.tolist()):
        runs[u].append(image)
    grouped_boxes = [torch.cat([boxes[i] for i in runs[u]]) for u in range(distinct)]
    grouped_masks = [torch.cat([masks[i] for i in runs[u]]) for u in range(distinct)] if masks is not None else None
    order = [k for u in range(distinct) for i in runs[u] for k in range(starts[i], starts[i + 1])]
    return grouped_boxes, grouped_masks, torch.tensor(order, device=grouped_boxes[0].device)


__all__ = ["GPT4RoIForCausalLM", "GPT4RoIPreTrainedModel", "MultiModalProjector", "check_multimodal_counts",
           "default_attn_implementation"]
