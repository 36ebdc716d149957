"""Batched region-prompted generation, shared by the VG captioning, ViP-Bench and segmentation-captioning harnesses.

A :class:`RegionRequest` is one image, one human turn containing ``<image>`` once and one ``<bbox>`` per
region, and the regions' boxes in pixels of that image (plus their binary masks, which mask-aware models
need). :class:`RegionCaptioner` renders the turn with the
conversation template (open assistant turn), left-pads a batch through the model's processor, generates,
keeps only the new tokens, cuts the text at the template's stop strings and, when asked, strips
GPT4RoI's ``"...: "`` answer prefix.

Harnesses depend only on the callable shape ``captioner(requests) -> list[str]``, so they can be tested
with a fake captioner and no model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from PIL import Image

logger = logging.getLogger(__name__)

ImageLike = Union[str, Path, Image.Image]

# GPT4RoI's sampling settings (pix2cap third_party/gpt4roi eval scripts): sample at temperature 0.2.
GPT4ROI_TEMPERATURE = 0.2


@dataclass
class RegionRequest:
    """One generation request.

    image: a path or an RGB PIL image; prompt: the human turn (``<image>`` once, one ``<bbox>`` per box);
    boxes: list of [x1, y1, x2, y2] in pixels of ``image`` (may be empty);
    masks: optional (H, W) binary arrays in pixels of ``image``, one per box; models whose ``region_mode``
    is ``mask`` or ``box+mask`` need them, box models ignore them.
    """

    image: ImageLike
    prompt: str
    boxes: List[List[float]] = field(default_factory=list)
    masks: Optional[List] = None


@dataclass
class DecodeSettings:
    """How to decode. Greedy by default; ``do_sample=True, temperature=0.2`` is GPT4RoI's setting."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = GPT4ROI_TEMPERATURE
    top_p: Optional[float] = None
    # GPT4RoI's own eval keeps the text after the first ": " (its model sometimes answers "region1: ...").
    strip_prefix: bool = False


Captioner = Callable[[Sequence[RegionRequest]], List[str]]


def cut_at_stop_strings(text: str, stops: Sequence[str]) -> str:
    """Return ``text`` up to the earliest occurrence of any stop string, stripped of surrounding blanks."""
    end = len(text)
    for stop in stops:
        if stop:
            pos = text.find(stop)
            if pos != -1:
                end = min(end, pos)
    return text[:end].strip()


def strip_answer_prefix(text: str) -> str:
    """GPT4RoI's post-processing: keep what follows the first ``": "`` if there is one."""
    head, sep, tail = text.partition(": ")
    return tail.strip() if sep else text.strip()


def _open_rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


class RegionCaptioner:
    """Generate answers for a batch of :class:`RegionRequest` with a GPT4RoI-style model.

    ``model`` and ``processor`` come from ``gpt4roi_sft.load_model``; ``template`` names a conversation
    template of ``gpt4roi_sft.conversation``. Calling the captioner with N requests returns N strings.
    """

    def __init__(self, model, processor, template: str = "gpt4roi_v0", settings: Optional[DecodeSettings] = None):
        from gpt4roi_sft.conversation import build_prompt, stop_strings

        self.model = model
        self.processor = processor
        self.template = template
        self.settings = settings or DecodeSettings()
        self._build_prompt = build_prompt
        self._stops = list(stop_strings(template))
        # PeftModel forwards .config to its base model
        self.needs_masks = getattr(getattr(model, "config", None), "region_mode", "box") != "box"

    def render(self, request: RegionRequest) -> str:
        """The full prompt text for one request (system, human turn, open assistant turn)."""
        messages = [{"from": "human", "value": request.prompt}]
        return self._build_prompt(self.template, messages, tokenizer=getattr(self.processor, "tokenizer", None))

    def generation_kwargs(self) -> dict:
        s = self.settings
        kwargs = {"max_new_tokens": s.max_new_tokens, "do_sample": s.do_sample}
        if s.do_sample:
            kwargs["temperature"] = s.temperature
            if s.top_p is not None:
                kwargs["top_p"] = s.top_p
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
        return kwargs

    def __call__(self, requests: Sequence[RegionRequest]) -> List[str]:
        import torch

        if not requests:
            return []
        texts = [self.render(r) for r in requests]
        images = [_open_rgb(r.image) for r in requests]
        boxes = [[list(map(float, b)) for b in r.boxes] for r in requests]
        region_masks = None
        if self.needs_masks:
            missing = [i for i, r in enumerate(requests) if r.masks is None or len(r.masks) != len(r.boxes)]
            if missing:
                raise ValueError(f"request {missing[0]}: this model's region_mode needs one mask per box")
            region_masks = [r.masks for r in requests]
        # Boxes crossing the border by rounding are clipped, as GLaMM's evaluation effectively does.
        batch = self.processor(images=images, texts=texts, boxes=boxes, region_masks=region_masks,
                               padding_side="left", clip_boxes=True)
        param = next(self.model.parameters())
        batch = _to_device(batch, param.device)
        if batch.get("pixel_values") is not None:
            batch["pixel_values"] = batch["pixel_values"].to(param.dtype)
        with torch.inference_mode():
            out = self.model.generate(**batch, **self.generation_kwargs())
        new_tokens = _new_tokens(out, batch["input_ids"])
        decoded = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        answers = [cut_at_stop_strings(t, self._stops) for t in decoded]
        if self.settings.strip_prefix:
            answers = [strip_answer_prefix(a) for a in answers]
        return answers


def _new_tokens(out, input_ids):
    """The generated part of ``out`` (B, T): HF-style outputs repeat the prompt first, embeds-based ones do not."""
    import torch

    prompt_len = input_ids.shape[1]
    if out.shape[1] >= prompt_len and torch.equal(out[:, :prompt_len].to(input_ids.device), input_ids):
        return out[:, prompt_len:]
    return out


def _to_device(batch, device):
    """Move every tensor (and every tensor inside a list, e.g. per-image boxes) of ``batch`` to ``device``."""
    import torch

    moved = {}
    for key, value in dict(batch).items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            moved[key] = [v.to(device) for v in value]
        else:
            moved[key] = value
    return moved


def load_captioner(model_dir: str, template: str = "gpt4roi_v0", settings: Optional[DecodeSettings] = None,
                   adapter_dir: Optional[str] = None, device: Optional[str] = None) -> RegionCaptioner:
    """Load a model directory (optionally with a LoRA adapter applied by ``peft``) into a captioner."""
    import torch

    from gpt4roi_sft import load_model

    model, processor = load_model(model_dir)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
        logger.info("applied adapter %s", adapter_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    return RegionCaptioner(model, processor, template=template, settings=settings)
