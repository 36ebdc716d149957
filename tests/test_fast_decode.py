"""The fast decode path (static KV cache, compiled decode step) answers what eager ``generate`` answers.

The tiny model's language-model matrices are redrawn with a larger spread (std 0.15) so that greedy answers
differ from prompt to prompt and from step to step: an untrained tiny model repeats one token, which any
decode path would reproduce. Greedy answers are compared token for token.

On the GPU (``gpu``-marked, skipped without CUDA): a random model of 7B widths in bf16, compiled. There the
two paths may part where bf16 cannot tell two tokens apart (``first_divergence_is_a_tie``).
"""

import sys

import pytest
import torch
from PIL import Image

from conftest import REPO
from gpt4roi_sft.constants import GPT4ROI_PREAMBLE
from gpt4roi_sft.fast_decode import (FastDecoding, kv_bytes_per_token, prefill_bytes_per_token, rows_for_memory,
                                     vision_bytes_per_image)
from gpt4roi_sft.infer import DecodeSettings, RegionCaptioner, RegionRequest, load_captioner

QUESTION = GPT4ROI_PREAMBLE + "What is region1 <bbox>?"


def spread_language_model(model, seed=0, std=0.15):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.language_model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    captioner = load_captioner(tiny_model_dir, settings=DecodeSettings(max_new_tokens=16), device="cpu")
    spread_language_model(captioner.model)
    return captioner


def fast_twin(eager, **fast):
    return RegionCaptioner(eager.model, eager.processor, settings=eager.settings, fast=FastDecoding(**fast))


@pytest.fixture(scope="module")
def image():
    img = Image.new("RGB", (160, 120), (120, 170, 230))
    img.paste((200, 40, 40), (10, 10, 60, 60))
    img.paste((250, 220, 30), (70, 20, 150, 110))
    return img


def requests_of(image, n):
    """Prompts of three lengths (one to three regions), each box elsewhere."""
    return [RegionRequest(image, QUESTION + " And region1 <bbox>?" * (i % 3), [[4 + 4 * i, 6 + 3 * i, 80, 100]] * (1 + i % 3))
            for i in range(n)]


def test_fast_path_gives_the_eager_greedy_tokens(eager, image):
    requests = requests_of(image, 16)  # three prompt lengths: three shared prefills, written two at a time
    want = eager.new_tokens(requests)
    assert len({tuple(row.tolist()) for row in want}) >= 8, "the prompts should get different answers"
    assert torch.equal(fast_twin(eager).new_tokens(requests), want)


def test_a_dynamic_cache_gets_the_shared_prefill_too(eager, image):
    from transformers import DynamicCache

    requests = requests_of(image, 6)
    batch = eager.prepare(requests)
    kwargs = eager.generation_kwargs()
    with torch.inference_mode():
        want = eager.model.generate(**batch, **kwargs)
        cache = DynamicCache(config=eager.model.language_model.config)
        got = eager.model.generate(**batch, **kwargs, cache=cache, share_prefix=True)
    assert torch.equal(got, want)


def test_a_smaller_batch_is_padded_to_the_cache_rows_and_keeps_its_answers(eager, image):
    fast = fast_twin(eager)
    requests = requests_of(image, 7)
    fast(requests)
    cache = fast._slot.cache
    assert fast(requests[4:]) == eager(requests[4:])
    assert fast._slot.cache is cache and fast._slot.rows == 7, "one cache for the whole run"


def test_a_longer_prompt_grows_the_static_cache(eager, image):
    fast = fast_twin(eager, length_multiple=8)
    short, long = requests_of(image, 1), requests_of(image, 3)[2:]
    fast(short)
    before = fast._slot.length
    assert fast(long) == eager(long)
    assert fast._slot.length > before and fast._slot.length % 8 == 0


def test_compiled_decode_step_gives_the_eager_greedy_tokens(eager, image):
    requests = requests_of(image, 4)  # the first and the last share their prefill
    fast = fast_twin(eager, compile=True, compile_mode="default")
    assert torch.equal(fast.new_tokens(requests, max_new_tokens=6), eager.new_tokens(requests, max_new_tokens=6))
    assert hasattr(eager.model.language_model, "_compiled_call"), "the decode step should have been compiled"


def test_a_streamed_answer_decodes_eagerly_and_joins_to_the_fast_answer(eager, image, monkeypatch):
    fast = fast_twin(eager)
    calls = []
    real = fast.model.generate

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fast.model, "generate", recording)
    request = requests_of(image, 2)[1]
    assert "".join(fast.stream(request)) == fast([request])[0]
    assert "cache" not in calls[0] and "streamer" in calls[0]
    assert "cache" in calls[1]


def test_plan_puts_the_longest_prompts_first(eager, image):
    requests = requests_of(image, 7)  # lengths by index: short, middle, long, short, ...
    batches = eager.plan(requests, 3)
    lengths = [eager.prompt_length(requests[i]) for batch in batches for i in batch]
    assert sorted(i for batch in batches for i in batch) == list(range(7))
    assert [len(b) for b in batches] == [3, 3, 1] and lengths == sorted(lengths, reverse=True)


def test_auto_batch_size_on_the_cpu_is_eight_rows(eager, image):
    assert [len(b) for b in eager.plan(requests_of(image, 10), "auto")] == [8, 2]


def test_kv_cache_of_a_7b_llama_token_is_half_a_mebibyte():
    sys.path.insert(0, str(REPO))
    from bench.throughput.engine import real_config

    config = real_config(224, "sdpa")
    assert kv_bytes_per_token(config.text_config, torch.bfloat16) == 2 * 32 * 32 * 128 * 2 == 512 * 1024


def test_rows_for_memory_fill_the_budget_in_multiples_of_eight():
    sys.path.insert(0, str(REPO))
    from bench.throughput.engine import real_config

    config = real_config(224, "sdpa")
    prompt, new = 330, 32
    per_row = (384 * kv_bytes_per_token(config.text_config, torch.bfloat16)  # 362 tokens rounded up to 384
               + prompt * prefill_bytes_per_token(config.text_config, torch.bfloat16)
               + vision_bytes_per_image(config.vision_config, torch.bfloat16))
    assert rows_for_memory(100.5 * per_row, prompt, new, config, torch.bfloat16, 256, 64) == 96
    assert rows_for_memory(5.5 * per_row, prompt, new, config, torch.bfloat16, 256, 64) == 5
    assert rows_for_memory(1e15, prompt, new, config, torch.bfloat16, 256, 64) == 256
    assert rows_for_memory(0, prompt, new, config, torch.bfloat16, 256, 64) == 1


# ---------------------------------------------------------------------------------------------- GPU
def first_divergence_is_a_tie(eager_logits, row, step, eager_token, fast_token, atol=0.05, rtol=2 ** -7) -> bool:
    """Whether the eager run scored the fast path's token within bf16 noise of its own at the first step where
    the two differ: a gap of at most ``atol + rtol * |logit|`` (``2 ** -7`` is two bf16 roundings of a logit)."""
    logits = eager_logits[step][row].float()
    gap = float(logits[eager_token] - logits[fast_token])
    return gap <= atol + rtol * float(logits[eager_token].abs())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_path_matches_eager_on_a_7b_shaped_model_up_to_bf16_ties(tiny_model_dir, image):
    """7B widths (4096 hidden, 32 heads, 11008 MLP, CLIP ViT-L/14 at 224 px), 4 LLM layers to keep the compile
    short; random bf16 weights; 16 prompts of three lengths, 24 greedy tokens each."""
    sys.path.insert(0, str(REPO))
    from bench.throughput.engine import build_model, real_config
    from gpt4roi_sft.data.image_transform import ImageTransform
    from gpt4roi_sft.model.processing import GPT4RoIProcessor

    tiny = load_captioner(tiny_model_dir, device="cpu")
    tokenizer = tiny.processor.tokenizer
    config = real_config(224, "sdpa")
    config.text_config.num_hidden_layers = 4
    config.image_token_id, config.bbox_token_id = tiny.processor.image_token_id, tiny.processor.bbox_token_id
    config.text_config.pad_token_id, config.text_config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = build_model(config, torch.device("cuda"), torch.bfloat16).eval()
    model.language_model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = GPT4RoIProcessor(tokenizer, ImageTransform(size=224), config.num_image_tokens)
    settings = DecodeSettings(max_new_tokens=24)
    eager = RegionCaptioner(model, processor, settings=settings)
    fast = RegionCaptioner(model, processor, settings=settings, fast=FastDecoding())
    requests = requests_of(image, 16)

    batch = eager.prepare(requests)
    out = model.generate(**batch, **eager.generation_kwargs(), output_logits=True, return_dict_in_generate=True)
    want = out.sequences
    fast.new_tokens(requests)  # compiles and records the decode step
    got = fast.new_tokens(requests)
    assert got.shape[0] == want.shape[0] == 16
    for row in range(16):
        a, b = want[row].tolist(), got[row].tolist()
        step = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if step is None:
            longer = a[len(b):] or b[len(a):]  # a batch may stop later than the other: pads only
            assert set(longer) <= {tokenizer.pad_token_id}
        else:
            assert first_divergence_is_a_tie(out.logits, row, step, a[step], b[step]), \
                f"row {row} parts at step {step} where eager preferred its token by more than bf16 noise"


def test_questions_about_one_image_run_its_vision_tower_once(eager, image):
    seen = []
    hook = eager.model.vision_tower.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        fast_twin(eager).new_tokens(requests_of(image, 5), max_new_tokens=2)
        eager.new_tokens(requests_of(image, 5), max_new_tokens=2)
    finally:
        hook.remove()
    assert seen == [1, 5]


def test_prompts_agreeing_up_to_their_region_token_are_prefilled_once(eager, image):
    rows = []
    hook = eager.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(tuple(kwargs["inputs_embeds"].shape[:2])) if "inputs_embeds" in kwargs
        and kwargs["inputs_embeds"] is not None else None, with_kwargs=True)
    requests = [RegionRequest(image, QUESTION, [[4 + 9 * i, 6, 80, 100]]) for i in range(4)]
    try:
        fast_twin(eager).new_tokens(requests, max_new_tokens=2)
    finally:
        hook.remove()
    length = eager.prompt_length(requests[0])
    prefix, rest = rows[0], rows[1]
    assert prefix[0] == 1 and rest[0] == 4, "one shared prefill, then every row's own tokens"
    assert prefix[1] + rest[1] == length and rest[1] < 10


def test_shared_images_give_each_region_the_token_it_gets_alone(eager, image):
    from gpt4roi_sft.model.modeling import unique_images

    other = image.transpose(Image.FLIP_LEFT_RIGHT)
    requests = [RegionRequest(img, QUESTION + " And region1 <bbox>?", [[4 + 9 * i, 6, 80, 100], [50, 10, 150, 90 - i]])
                for i, img in enumerate([image, other, image, other, image])]
    batch = eager.prepare(requests)
    assert unique_images(batch["pixel_values"])[0].shape[0] == 2
    with torch.no_grad():
        shared = eager.model.embed_multimodal(batch["input_ids"], batch["pixel_values"], batch["boxes"], share_images=True)
        alone = eager.model.embed_multimodal(batch["input_ids"], batch["pixel_values"], batch["boxes"])
    assert torch.allclose(shared, alone, atol=1e-5)


def test_rows_differing_in_one_element_are_never_shared():
    from gpt4roi_sft.model.modeling import unique_rows

    embeds = torch.randn(1, 7, 16).repeat(4, 1, 1)
    mask = torch.ones(4, 7, dtype=torch.long)
    embeds[2, 5, 3] += 1e-6
    mask[3, 0] = 0
    first, inverse = unique_rows(embeds, mask)
    assert inverse.tolist()[0] == inverse.tolist()[1] and len(set(inverse.tolist())) == 3
    assert first.tolist()[inverse[0]] == 0


def test_a_decode_step_that_cannot_compile_falls_back_to_the_uncompiled_static_cache(eager, image, monkeypatch, caplog):
    from torch._dynamo.exc import TorchDynamoException

    def cannot_compile(config):
        def compiled(*args, **kwargs):
            raise TorchDynamoException("no C compiler")
        return compiled

    monkeypatch.setattr(eager.model.language_model, "get_compiled_call", cannot_compile)
    fast = fast_twin(eager, compile=True)
    requests = requests_of(image, 3)
    assert fast(requests) == eager(requests)
    assert fast.fast.compile is False and "compiling the decode step failed" in caplog.text


def test_a_cuda_graph_failure_inside_inductor_falls_back_and_a_model_error_does_not(eager, image, monkeypatch):
    """A RuntimeError raised in inductor's code (how a CUDA graph that cannot be captured fails) takes the
    uncompiled path; the same error raised by the model's own code reaches the caller."""
    import os

    import torch._inductor

    inductor_file = os.path.join(os.path.dirname(torch._inductor.__file__), "cudagraph_trees.py")
    namespace = {}
    exec(compile("def replay(*a, **k):\n    raise RuntimeError('CUDA graph capture failed')\n", inductor_file, "exec"),
         namespace)
    monkeypatch.setattr(eager.model.language_model, "get_compiled_call", lambda config: namespace["replay"])
    fast = fast_twin(eager, compile=True)
    requests = requests_of(image, 2)
    assert fast(requests) == eager(requests) and fast.fast.compile is False

    def model_error(*args, **kwargs):
        raise RuntimeError("shape mismatch in the model")

    monkeypatch.setattr(eager.model.language_model, "get_compiled_call", lambda config: model_error)
    fast = fast_twin(eager, compile=True)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        fast(requests)
