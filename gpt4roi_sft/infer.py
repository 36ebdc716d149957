"""Batched region-prompted generation, shared by the VG captioning, ViP-Bench and segmentation-captioning harnesses.

A :class:`RegionRequest` is one image, one human turn containing ``<image>`` once and one ``<bbox>`` per
region, and the regions' boxes in pixels of that image (plus their binary masks, which mask-aware models
need). :class:`RegionCaptioner` renders the turn with the
conversation template (open assistant turn), left-pads a batch through the model's processor, generates,
keeps only the new tokens, cuts the text at the template's stop strings and, when asked, strips
GPT4RoI's ``"...: "`` answer prefix.

Harnesses depend only on the callable shape ``captioner(requests) -> list[str]``, so they can be tested
with a fake captioner and no model.

Chat: a request's ``history`` holds the earlier turns, so one request renders a whole multi-turn
conversation; :func:`chat_request` builds such a request from chat messages that name boxes as
``<region1>``, ``<region2>``, ... (the region-chat server's syntax). :meth:`RegionCaptioner.stream` yields
one request's answer piece by piece as it decodes (``transformers``' ``TextIteratorStreamer``).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

from PIL import Image

from gpt4roi_sft.constants import GPT4ROI_PREAMBLE
from gpt4roi_sft.errors import ConfigError

logger = logging.getLogger(__name__)

ImageLike = Union[str, Path, Image.Image]

# GPT4RoI's sampling settings (pix2cap third_party/gpt4roi eval scripts): sample at temperature 0.2.
GPT4ROI_TEMPERATURE = 0.2


@dataclass
class RegionRequest:
    """One generation request.

    image: a path or an RGB PIL image; prompt: the human turn to answer; boxes: list of [x1, y1, x2, y2] in
    pixels of ``image`` (may be empty); history: the earlier turns of a chat, ``{"from": "human"|"gpt",
    "value": str}`` alternating from a human turn (empty for a single question). ``<image>`` appears once,
    in the first human turn; the k-th ``<bbox>`` of history-then-prompt takes ``boxes[k]``.
    masks: optional (H, W) binary arrays in pixels of ``image``, one per box; models whose ``region_mode``
    is ``mask`` or ``box+mask`` need them, box models ignore them.
    """

    image: ImageLike
    prompt: str
    boxes: List[List[float]] = field(default_factory=list)
    history: List[dict] = field(default_factory=list)
    masks: Optional[List] = None


@dataclass
class DecodeSettings:
    """How to decode. Greedy by default; ``do_sample=True, temperature=0.2`` is GPT4RoI's setting."""

    max_new_tokens: int = 128
    # Benchmarks force a length (random weights end answers at random); 0 lets EOS end an answer at once.
    min_new_tokens: int = 0
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

    ``fast`` (a :class:`~gpt4roi_sft.fast_decode.FastDecoding`) decodes with a static KV cache and a compiled
    decode step (:mod:`gpt4roi_sft.fast_decode`); greedy answers are those of the eager path. A call given a
    ``streamer`` decodes eagerly (one request, token by token: nothing to gain from a compiled step).
    :meth:`plan` orders a run's requests into batches for either path.
    """

    def __init__(self, model, processor, template: str = "gpt4roi_v0", settings: Optional[DecodeSettings] = None,
                 fast=None):
        from gpt4roi_sft.conversation import build_prompt, stop_strings

        self.model = model
        self.processor = processor
        self.template = template
        self.settings = settings or DecodeSettings()
        self.fast = fast
        self._build_prompt = build_prompt
        self._stops = list(stop_strings(template))
        # PeftModel forwards .config to its base model
        self.needs_masks = getattr(getattr(model, "config", None), "region_mode", "box") != "box"
        self._slot = None
        if fast is not None:
            from gpt4roi_sft.fast_decode import StaticCacheSlot

            self._slot = StaticCacheSlot(fast)

    def render(self, request: RegionRequest) -> str:
        """The full prompt text for one request (system, human turn, open assistant turn)."""
        messages = list(request.history) + [{"from": "human", "value": request.prompt}]
        return self._build_prompt(self.template, messages, tokenizer=getattr(self.processor, "tokenizer", None))

    def generation_kwargs(self) -> dict:
        """``generate`` arguments of the settings; decoding ends a row at EOS or at a stop string."""
        s = self.settings
        kwargs = {"max_new_tokens": s.max_new_tokens, "do_sample": s.do_sample, **self.stop_kwargs()}
        if s.min_new_tokens:
            kwargs["min_new_tokens"] = s.min_new_tokens
        if s.do_sample:
            kwargs["temperature"] = s.temperature
            if s.top_p is not None:
                kwargs["top_p"] = s.top_p
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
        return kwargs

    def __call__(self, requests: Sequence[RegionRequest], **generate_overrides) -> List[str]:
        """Answers for ``requests``; ``generate_overrides`` (e.g. ``max_new_tokens``, ``streamer``,
        ``stopping_criteria``) replace or extend :meth:`generation_kwargs` for this call."""
        if not requests:
            return []
        return self.decode(self.new_tokens(requests, **generate_overrides))

    def new_tokens(self, requests: Sequence[RegionRequest], **generate_overrides):
        """The generated token ids (len(requests), T) of ``requests``, padded after a row's end; the fast
        path when the captioner has one and no ``streamer`` is given, else eager ``generate``."""
        batch, n = self.prepare(requests), len(requests)  # first: bad requests fail before anything runs
        kwargs = {**self.generation_kwargs(), **generate_overrides}
        if self._slot is None or kwargs.get("streamer") is not None:
            return self.generate(batch, **kwargs)
        length = batch["input_ids"].shape[1] + kwargs["max_new_tokens"]
        fast_kwargs, rows = self._slot.generate_kwargs(self.model.language_model, n, length)
        batch = self._repeat_last_row(batch, rows - n)  # the static cache's shape
        try:
            return self.generate(batch, **kwargs, **fast_kwargs)[:n]
        except Exception as exc:
            if "compile_config" not in fast_kwargs or not _is_compile_failure(exc):
                raise
            # A machine where torch.compile cannot build (no compiler, a triton mismatch) still evaluates.
            logger.warning("compiling the decode step failed (%s: %s); the run goes on with the static cache, "
                           "uncompiled", type(exc).__name__, (str(exc).strip().splitlines() or [""])[0][:200])
            self.fast.compile = False
            fast_kwargs, rows = self._slot.generate_kwargs(self.model.language_model, rows, length)
            return self.generate(batch, **kwargs, **fast_kwargs)[:n]

    def prepare(self, requests: Sequence[RegionRequest]):
        """The model inputs of ``requests``: left-padded, on the model's device and in its dtype.

        Images are opened on a few threads: decoding JPEGs is the largest host cost of a batch.
        """
        from concurrent.futures import ThreadPoolExecutor

        from gpt4roi_sft.data.model_inputs import move_to_device

        texts = [self.render(r) for r in requests]
        if len(requests) > 1:
            with ThreadPoolExecutor(max_workers=min(8, len(requests))) as pool:
                images = list(pool.map(_open_rgb, [r.image for r in requests]))
        else:
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
        return move_to_device(batch, param.device, param.dtype)

    def generate(self, batch, **kwargs):
        """The new tokens (B, T) that ``model.generate`` gives for a prepared ``batch``."""
        import torch

        with torch.inference_mode():
            out = self.model.generate(**batch, **kwargs)
        return _new_tokens(out, batch["input_ids"])

    def decode(self, new_tokens) -> List[str]:
        """Answers from new tokens: cut at the template's stop strings, prefix stripped when the settings ask."""
        decoded = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        answers = [cut_at_stop_strings(t, self._stops) for t in decoded]
        if self.settings.strip_prefix:
            answers = [strip_answer_prefix(a) for a in answers]
        return answers

    def _repeat_last_row(self, batch, copies: int):
        """``batch`` with ``copies`` more rows, each a copy of its last (with that row's images and boxes)."""
        import torch

        if copies <= 0:
            return batch
        ids = batch["input_ids"]
        images = int((ids[-1] == self.processor.image_token_id).sum()) // self.processor.num_image_tokens
        out = dict(batch)
        out["input_ids"] = torch.cat([ids, ids[-1:].expand(copies, -1)])
        out["attention_mask"] = torch.cat([batch["attention_mask"], batch["attention_mask"][-1:].expand(copies, -1)])
        if images:
            pixels = batch["pixel_values"][-images:]
            out["pixel_values"] = torch.cat([batch["pixel_values"]] + [pixels] * copies)
            for key in ("boxes", "region_masks"):
                if batch.get(key) is not None:
                    out[key] = list(batch[key]) + list(batch[key][-images:]) * copies
        return out

    def plan(self, requests: Sequence[RegionRequest], batch_size: Union[int, str] = "auto") -> List[List[int]]:
        """Batches of indices into ``requests``: longest prompts first, then by image, ``batch_size`` per batch.

        Sorting puts prompts of nearly one length together (little padding), makes the first batch the
        longest, so the fast path's static cache has its final size from the first call on, and puts the
        questions about one image side by side, where the fast path shares the image's work. ``"auto"``:
        as many rows as the free device memory holds for the longest prompt and ``max_new_tokens`` each
        (:func:`~gpt4roi_sft.fast_decode.rows_for_memory`), at most ``FastDecoding.max_rows`` (256 for the
        eager path); :data:`~gpt4roi_sft.fast_decode.CPU_ROWS` on the CPU.
        """
        lengths = [self.prompt_length(r) for r in requests]
        images = [str(r.image) if isinstance(r.image, (str, Path)) else f"<{id(r.image)}>" for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (-lengths[i], images[i]))
        if not order:
            return []
        rows = self.auto_batch_size(lengths[order[0]]) if batch_size == "auto" else int(batch_size)
        if rows < 1:
            raise ValueError(f"batch_size must be at least 1 or 'auto', got {batch_size!r}")
        return [order[i:i + rows] for i in range(0, len(order), rows)]

    def auto_batch_size(self, longest_prompt: int) -> int:
        """Rows per batch for prompts of up to ``longest_prompt`` tokens, from the free device memory."""
        from gpt4roi_sft.fast_decode import CPU_ROWS, FastDecoding, available_bytes, rows_for_memory

        fast = self.fast or FastDecoding()
        param = next(self.model.parameters())
        free = available_bytes(param.device, self._slot.held_bytes if self._slot is not None else 0)
        if free is None:
            return CPU_ROWS
        rows = rows_for_memory(free * fast.memory_fraction, longest_prompt, self.settings.max_new_tokens,
                               self.model.config, param.dtype, fast.max_rows, fast.length_multiple)
        logger.info("batch size %d (%.1f GiB free, prompts of up to %d tokens)", rows, free / 2**30, longest_prompt)
        return rows

    def prompt_length(self, request: RegionRequest, tokenizer=None) -> int:
        """Tokens the model reads for ``request``: its rendered prompt with each ``<image>`` expanded.

        ``tokenizer`` (default: the processor's) lets another thread count with its own copy.
        """
        from gpt4roi_sft.constants import IMAGE_TOKEN

        tokenizer = tokenizer or self.processor.tokenizer
        ids = tokenizer(self.render(request))["input_ids"]
        image_runs = ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        return len(ids) + image_runs * (self.processor.num_image_tokens - 1)

    def stop_kwargs(self) -> dict:
        """``generate`` arguments that end each row at the template's stop strings (``transformers``'
        ``stop_strings``), so decoding does not run on past the end of the answer."""
        if not self._stops:
            return {}
        return {"stop_strings": list(self._stops), "tokenizer": self.processor.tokenizer}

    def stream(self, request: RegionRequest, cancel: Optional[threading.Event] = None,
               **generate_overrides) -> Iterator[str]:
        """Yield the answer to one request in pieces as the model decodes it.

        The pieces join to what ``self([request], **generate_overrides)[0]`` returns (same decoding; the
        answer prefix is not stripped): text is held back while it could be the start of a stop string,
        trailing blanks until more text follows, and decoding stops at a stop string. Setting ``cancel``,
        or closing the generator early, stops decoding at the next token. Decoding runs in a thread of
        its own that has ended when the generator finishes.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        tokenizer = self.processor.tokenizer
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        closed = threading.Event()
        criterion = _cancel_criterion(lambda: closed.is_set() or (cancel is not None and cancel.is_set()))
        overrides = dict(generate_overrides, streamer=streamer, stopping_criteria=StoppingCriteriaList([criterion]),
                         **self.stop_kwargs())
        failure: List[BaseException] = []

        def decode():
            try:
                self([request], **overrides)
            except BaseException as exc:  # handed to the consumer below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=decode, name="region-stream", daemon=True)
        worker.start()
        text, sent, exhausted = "", 0, False
        try:
            for piece in streamer:
                text += piece
                if any(stop in text for stop in self._stops if stop):
                    break
                # Hold back the end that may still grow into a stop string, and blanks that may end the answer.
                body = text.strip()
                ready = len(body[: len(body) - _stop_prefix_length(body, self._stops)].rstrip())
                if ready > sent:
                    yield body[sent:ready]
                    sent = ready
            else:
                exhausted = True
            answer = cut_at_stop_strings(text, self._stops)
            if len(answer) > sent:
                yield answer[sent:]
        finally:
            closed.set()
            if not exhausted:
                for _ in streamer:  # read to the end signal, so the decoding thread finishes
                    pass
            worker.join()
        if failure:
            raise failure[0]


def _is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is ``torch.compile`` failing: to trace or build (dynamo's and
    inductor's exceptions), or at run time inside inductor's own code (a CUDA graph that cannot be captured or
    replayed raises a plain RuntimeError there). A genuine error of the model raises again on the uncompiled retry."""
    from torch._dynamo.exc import TorchDynamoException

    while exc is not None:
        if isinstance(exc, TorchDynamoException) or _raised_in_inductor(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _raised_in_inductor(exc: BaseException) -> bool:
    import os

    import torch._inductor

    inductor = os.path.dirname(torch._inductor.__file__) + os.sep
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(inductor):
            return True
        tb = tb.tb_next
    return False


def _cancel_criterion(cancelled: Callable[[], bool]):
    """A ``transformers`` stopping criterion that ends every row once ``cancelled()`` is true."""
    import torch
    from transformers import StoppingCriteria

    class CancelCriterion(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(cancelled()), dtype=torch.bool, device=input_ids.device)

    return CancelCriterion()


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (it may grow into one)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best


def _new_tokens(out, input_ids):
    """The generated part of ``out`` (B, T): HF-style outputs repeat the prompt first, embeds-based ones do not."""
    import torch

    prompt_len = input_ids.shape[1]
    if out.shape[1] >= prompt_len and torch.equal(out[:, :prompt_len].to(input_ids.device), input_ids):
        return out[:, prompt_len:]
    return out


def inference_dtype(device: str, dtype=None):
    """The weights' dtype for generation: bf16 on CUDA (what training used), fp32 on CPU.

    ``dtype`` overrides: a ``torch.dtype`` or one of ``bf16``/``bfloat16``, ``fp16``/``float16``, ``fp32``/``float32``.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype is not None:
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        return names[dtype]
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


REGION_REFERENCE = re.compile(r"<region(\d+)>")
CHAT_ROLES = {"user": "human", "assistant": "gpt"}


def chat_request(image: ImageLike, messages: Sequence[dict], boxes: Sequence[Sequence[float]],
                 preamble: str = GPT4ROI_PREAMBLE) -> RegionRequest:
    """The :class:`RegionRequest` that asks the last of ``messages`` about ``image`` and its ``boxes``.

    ``messages`` are ``{"role": "user"|"assistant", "content": str}``, alternating from a user message and
    ending with one; ``boxes[k-1]`` (pixels, xyxy) is the box users write as ``<regionk>``. The mapping to
    GPT4RoI's prompt format, as its own demo does it:

    - the first mention of ``<regionk>`` in the conversation becomes ``regionk <bbox>`` and that ``<bbox>``
      takes ``boxes[k-1]``; later mentions become plain ``regionk`` (its region token is already in context);
    - the request's boxes are the mentioned boxes in the order of their first mention, so boxes nobody
      mentions are not given to the model;
    - the first user message is prefixed with ``preamble`` (``The <image> provides an overview of the
      picture.\n``), which places the image.

    Raises :class:`~gpt4roi_sft.errors.DataError` naming the message for a bad role or order, a non-string
    content, a ``<regionk>`` without a box, or literal ``<image>``/``<bbox>`` text (the model's own tokens).
    """
    from gpt4roi_sft.constants import BBOX_TOKEN, IMAGE_TOKEN
    from gpt4roi_sft.errors import DataError

    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError("messages: must be a non-empty list of {role, content}")
    turns: List[dict] = []
    order: List[int] = []  # 0-based box indices in order of first mention

    def reference(match: re.Match) -> str:
        k = int(match.group(1))
        if not 1 <= k <= len(boxes):
            have = {0: "no boxes were given", 1: "the only box is <region1>"}.get(
                len(boxes), f"the boxes are <region1>..<region{len(boxes)}>")
            raise DataError(f"{where}: <region{k}> names no box ({have})")
        if k - 1 in order:
            return f"region{k}"
        order.append(k - 1)
        return f"region{k} {BBOX_TOKEN}"

    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in CHAT_ROLES:
            raise DataError(f"{where}: needs a role of {' or '.join(CHAT_ROLES)} and a content")
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise DataError(f"{where}.role: expected {expected!r} (messages alternate, starting with user)")
        content = msg.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}.content: must be a string")
        for token in (IMAGE_TOKEN, BBOX_TOKEN):
            if token in content:
                raise DataError(f"{where}.content: contains {token}; refer to boxes as <region1>, <region2>, ...")
        if msg["role"] == "user":
            content = REGION_REFERENCE.sub(reference, content)
            if i == 0:
                content = preamble + content
        turns.append({"from": CHAT_ROLES[msg["role"]], "value": content})
    if messages[-1].get("role") != "user":
        raise DataError(f"messages[{len(messages) - 1}]: the last message must be the user's question")
    return RegionRequest(image, turns[-1]["value"], [list(boxes[k]) for k in order], history=turns[:-1])


def load_captioner(model_dir: str, template: str = "gpt4roi_v0", settings: Optional[DecodeSettings] = None,
                   adapter_dir: Optional[str] = None, device: Optional[str] = None,
                   torch_dtype=None, fast=None) -> RegionCaptioner:
    """Load a model directory (optionally with a LoRA adapter merged into it) into a captioner.

    ``device`` defaults to CUDA when present; weights load in ``torch_dtype`` (a dtype or its name), by default
    :func:`inference_dtype` of the device: bf16 on CUDA, fp32 on the CPU. ``adapter_dir`` is merged into the
    base weights in memory (:func:`merge_adapter`; the files on disk are untouched), so generation never runs
    through unmerged ``peft`` layers. ``fast``: a :class:`~gpt4roi_sft.fast_decode.FastDecoding` for the
    static-cache, compiled decode path (``None``: eager ``generate``).
    """
    import torch

    from gpt4roi_sft import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = inference_dtype(device, torch_dtype)
    # With an adapter the base loads in fp32, the adapter is added in fp32 and the sum is rounded once to `dtype`:
    # the weights an fp32 merged export gives when it is loaded in `dtype`.
    if adapter_dir:
        check_lora_adapter(adapter_dir)  # before the base model loads, not as a peft traceback after
    model, processor = load_model(model_dir, torch_dtype=torch.float32 if adapter_dir else dtype)
    if adapter_dir:
        model = merge_adapter(model, adapter_dir).to(dtype)
    model = model.to(device).eval()
    return RegionCaptioner(model, processor, template=template, settings=settings, fast=fast)


def check_lora_adapter(adapter_dir: str) -> None:
    """Refuse, in one line naming what is missing, a directory ``peft`` cannot load as a LoRA adapter."""
    from gpt4roi_sft.json_io import load_json

    root = Path(adapter_dir)
    config = root / "adapter_config.json"
    if not config.is_file():
        hint = " (it holds a full model: load it as the model, without an adapter)" if (root / "config.json").is_file() else ""
        raise ConfigError(f"{adapter_dir}: not a LoRA adapter: no adapter_config.json{hint}")
    settings = load_json(config)
    peft_type = settings.get("peft_type") if isinstance(settings, dict) else None
    if peft_type != "LORA":
        raise ConfigError(f"{config}: peft_type is {peft_type!r}, not 'LORA'")
    if not any((root / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ConfigError(f"{adapter_dir}: not a LoRA adapter: no adapter_model.safetensors (its weights)")


def merge_adapter(model, adapter_dir: str):
    """``model`` with the LoRA adapter of ``adapter_dir`` merged into its weights (``peft``'s
    ``merge_and_unload``): plain ``nn.Linear`` layers again, and the adapter's trained copies of whole modules
    (``modules_to_save``: region encoder, projector) in place of the base's. Merging happens in the model's
    dtype, on its device; the adapter files are only read."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    left = [name for name, module in merged.named_modules() if isinstance(module, BaseTunerLayer)]
    if left:
        raise RuntimeError(f"{adapter_dir}: {len(left)} adapter layer(s) were not merged, e.g. {left[0]}")
    logger.info("merged adapter %s", adapter_dir)
    return merged
